//! Checking and lowering: a parsed spec becomes a forward dataflow graph.
//!
//! The two arrows `check` and `lower` of DESIGN.md's pipeline are one walk here, on
//! purpose: a spec is a small program that runs once at compile time (loops unroll,
//! blocks inline, `if` decides on hyperparameters), and every tensor operation it performs
//! adds a node through the runtime's checked graph builder. Because shapes are symbolic
//! (`[B, 16*count(fields)]`), that single walk proves the spec's shapes for every dataset
//! and batch size before any data is read; an error is reported at the span of the
//! expression that caused it, and the walk goes on (the failed value becomes `Poison`,
//! which absorbs later uses) so several independent errors are reported at once.
//!
//! What this module owns: name resolution, block calls and argument binding, compile-time
//! values ([`value`]), the built-in functions ([`builtins`]), per-domain grouping (`per`),
//! tasks and losses. The standard library of blocks written in `.mdl` is `specs/std.mdl`,
//! compiled into the binary.

pub mod builtins;
pub mod value;

use crate::diag::{suggest, Diagnostic, SourceMap, Span};
use crate::syntax::ast::{self, BinOp, Expr, ExprKind, InputKind, Stmt, UnOp};
use mdl_runtime::ops::{BinaryOp, Op, UnaryOp};
use mdl_runtime::{DType, Dim, Graph, Init, NodeId};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use value::{Env, Tv, Val};

/// The standard library, always in scope.
pub const STD_SOURCE: &str = include_str!("../../specs/std.mdl");

/// The kind of a declared input.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureKind {
    /// Ids `[B, count(g)]`.
    Categorical,
    /// Ids and mask `[B, count(g), len]`; `of`: the categorical input whose ids they share.
    Sequence { len: usize, of: Option<String> },
    /// Values `[B, count(g)]`.
    Numeric,
    /// Domain ids `[B]`, `count(g)` domains.
    Domain,
}

/// An input the spec declares; the experiment binds columns to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Feature {
    pub name: String,
    pub kind: FeatureKind,
    pub span: Span,
}

/// A hyperparameter value (a default from the spec or an override from an experiment).
#[derive(Clone, Debug, PartialEq)]
pub enum Hyper {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    List(Vec<Hyper>),
}

/// A compiled model: its forward graph and what it needs from data.
#[derive(Debug)]
pub struct Compiled {
    pub model: String,
    /// Outputs: `loss` (scalar) and `logit/<task>` (`[B]`) per task.
    pub graph: Graph,
    pub features: Vec<Feature>,
    /// Task names in declaration order of `label`; each has a `label/<task>` input.
    pub tasks: Vec<String>,
    /// Every hyperparameter with its resolved value.
    pub hyper: BTreeMap<String, Hyper>,
}

/// Graph input names for a feature's parts.
pub fn ids_input(feature: &str) -> String {
    feature.to_string()
}
pub fn mask_input(feature: &str) -> String {
    format!("{feature}/mask")
}
pub fn label_input(task: &str) -> String {
    format!("label/{task}")
}
pub fn logit_output(task: &str) -> String {
    format!("logit/{task}")
}
/// The symbol for the number of columns (or domains) of an input.
pub fn count_sym(feature: &str) -> String {
    format!("count({feature})")
}
/// The symbol for the number of table rows an input's ids address.
pub fn rows_sym(feature: &str) -> String {
    format!("rows({feature})")
}

/// Reads a spec file and everything it uses, and compiles the model in it (the only one,
/// or the one named). `overrides` replace hyperparameter defaults.
pub fn compile_file(
    map: &mut SourceMap,
    path: &Path,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
) -> Result<Compiled, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![Diagnostic::error(Span::default(), format!("cannot read {}: {e}", path.display()))])?;
    let file = map.add(path.display().to_string(), text);
    compile(map, file, path.parent(), model, overrides)
}

/// Compiles the model in an already loaded file (`dir` resolves its `use` paths).
pub fn compile(
    map: &mut SourceMap,
    file: u32,
    dir: Option<&Path>,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
) -> Result<Compiled, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut roots = vec![(file, dir)];
    if map.text(file) != STD_SOURCE {
        roots.insert(0, (map.add("std.mdl", STD_SOURCE.to_string()), None));
    }
    let mut modules = Vec::new();
    for (f, d) in roots {
        match crate::syntax::parse(map, f) {
            Ok(m) => modules.push((m, d.map(|p: &Path| p.to_path_buf()))),
            Err(mut e) => diags.append(&mut e),
        }
    }
    // `use "x.mdl"`: load once each, relative to the using file.
    let mut i = modules.len().saturating_sub(1);
    let mut loaded: Vec<std::path::PathBuf> = Vec::new();
    while i < modules.len() {
        let uses: Vec<(String, Span)> = modules[i]
            .0
            .items
            .iter()
            .filter_map(|it| match it {
                ast::Item::Use { path, span } => Some((path.clone(), *span)),
                _ => None,
            })
            .collect();
        let base = modules[i].1.clone().unwrap_or_default();
        for (p, span) in uses {
            let full = base.join(&p);
            if loaded.contains(&full) {
                continue;
            }
            loaded.push(full.clone());
            match std::fs::read_to_string(&full) {
                Ok(text) => {
                    let f = map.add(full.display().to_string(), text);
                    match crate::syntax::parse(map, f) {
                        Ok(m) => modules.push((m, full.parent().map(|d| d.to_path_buf()))),
                        Err(mut e) => diags.append(&mut e),
                    }
                }
                Err(e) => diags.push(Diagnostic::error(span, format!("cannot read `{p}`: {e}")).label("imported here")),
            }
        }
        i += 1;
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut blocks: HashMap<String, Rc<ast::BlockDef>> = HashMap::new();
    let mut models: Vec<ast::ModelDef> = Vec::new();
    for (m, _) in &modules {
        for it in &m.items {
            match it {
                ast::Item::Block(b) => {
                    if builtins::is_builtin(&b.name.name) {
                        diags.push(
                            Diagnostic::error(b.name.span, format!("`{}` is a built-in function", b.name.name))
                                .label("cannot be redefined")
                                .hint("choose another name for the block"),
                        );
                    } else if let Some(prev) = blocks.get(&b.name.name) {
                        diags.push(
                            Diagnostic::error(b.name.span, format!("block `{}` is defined twice", b.name.name))
                                .label("second definition")
                                .note(prev.name.span, "first defined here"),
                        );
                    } else {
                        blocks.insert(b.name.name.clone(), Rc::new(b.clone()));
                    }
                }
                ast::Item::Model(md) => models.push(md.clone()),
                ast::Item::Use { .. } => {}
            }
        }
    }
    // Only models of the root file count.
    models.retain(|m| m.span.file == file);
    let chosen = match model {
        Some(name) => models.iter().find(|m| m.name.name == name).cloned().ok_or_else(|| {
            let names: Vec<&str> = models.iter().map(|m| m.name.name.as_str()).collect();
            let mut d = Diagnostic::error(Span { file, start: 0, end: 0 }, format!("no model `{name}` in this file"));
            if let Some(s) = suggest(name, names.iter().copied()) {
                d = d.hint(format!("did you mean `{s}`?"));
            }
            d
        }),
        None => match models.len() {
            1 => Ok(models[0].clone()),
            0 => Err(Diagnostic::error(Span { file, start: 0, end: 0 }, "this file defines no model")
                .hint("a spec needs `model name(...) { ... }`")),
            _ => Err(Diagnostic::error(models[1].name.span, "this file defines more than one model")
                .label("second model")
                .hint("name the model to compile")),
        },
    };
    let chosen = match chosen {
        Ok(m) => m,
        Err(d) => {
            diags.push(d);
            return Err(diags);
        }
    };
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut el = Elab::new(blocks);
    let compiled = el.model(&chosen, overrides);
    if el.diags.is_empty() {
        if let Some(c) = compiled {
            return Ok(c);
        }
    }
    if el.diags.is_empty() {
        el.diags.push(Diagnostic::error(chosen.name.span, "internal error: the model produced no graph"));
    }
    Err(el.diags)
}

/// Per-domain context while elaborating `per g { ... }`.
#[derive(Clone)]
struct PerCtx {
    feature: String,
    idx: NodeId,
    groups: Dim,
}

struct FeatureNodes {
    kind: FeatureKind,
    /// Ids (categorical, sequence, domain) or values (numeric).
    main: NodeId,
    mask: Option<NodeId>,
}

/// Control flow out of a statement list.
enum Flow {
    Next,
    Return(Val),
}

/// The elaborator: walks a model, building the graph.
pub(crate) struct Elab {
    blocks: HashMap<String, Rc<ast::BlockDef>>,
    pub(crate) graph: Graph,
    pub(crate) diags: Vec<Diagnostic>,
    features: BTreeMap<String, FeatureNodes>,
    feature_decls: Vec<Feature>,
    labels: Vec<(String, Span)>,
    tasks: BTreeMap<String, (NodeId, Span)>,
    /// Tasks whose logit failed to compile (their errors are already reported).
    failed_tasks: Vec<String>,
    losses: Vec<NodeId>,
    /// Parameter name path (`deep/mlp/linear1`).
    scope: Vec<String>,
    /// How many times each scope path was entered (to make names unique).
    scope_uses: HashMap<String, usize>,
    group: Option<String>,
    per: Option<PerCtx>,
    depth: usize,
    in_model: bool,
    dropout_streams: u64,
}

pub(crate) type R<T> = Result<T, ()>;

const MAX_CALL_DEPTH: usize = 64;
const MAX_UNROLL: usize = 100_000;

impl Elab {
    fn new(blocks: HashMap<String, Rc<ast::BlockDef>>) -> Elab {
        Elab {
            blocks,
            graph: Graph::new(),
            diags: Vec::new(),
            features: BTreeMap::new(),
            feature_decls: Vec::new(),
            labels: Vec::new(),
            tasks: BTreeMap::new(),
            failed_tasks: Vec::new(),
            losses: Vec::new(),
            scope: Vec::new(),
            scope_uses: HashMap::new(),
            group: None,
            per: None,
            depth: 0,
            in_model: false,
            dropout_streams: 0,
        }
    }

    /// Reports an error; the caller returns `Err(())`.
    pub(crate) fn error<T>(&mut self, span: Span, msg: impl Into<String>) -> R<T> {
        self.diags.push(Diagnostic::error(span, msg));
        Err(())
    }

    pub(crate) fn report(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn scope_name(&self) -> String {
        self.scope.join("/")
    }

    /// The current naming scope, for nodes added directly.
    pub(crate) fn scope_path(&self) -> String {
        self.scope_name()
    }

    /// Enters a naming scope; a repeated segment under the same parent gets a number.
    fn enter_scope(&mut self, seg: &str) {
        let base = if self.scope.is_empty() { seg.to_string() } else { format!("{}/{seg}", self.scope_name()) };
        let n = self.scope_uses.entry(base).or_insert(0);
        let name = if *n == 0 { seg.to_string() } else { format!("{seg}{n}") };
        *n += 1;
        self.scope.push(name);
    }

    fn leave_scope(&mut self) {
        self.scope.pop();
    }

    // ---------------------------------------------------------------- graph helpers

    /// Adds an op, reporting a shape error at `span`.
    pub(crate) fn add(&mut self, op: Op, inputs: &[NodeId], span: Span) -> R<NodeId> {
        let scope = self.scope_name();
        match self.graph.add(op, inputs, &scope) {
            Ok(id) => Ok(id),
            Err(e) => self.error(span, e.0),
        }
    }

    pub(crate) fn scalar(&mut self, v: f64, span: Span) -> R<NodeId> {
        self.add(Op::Scalar(v), &[], span)
    }

    pub(crate) fn shape(&self, id: NodeId) -> &[Dim] {
        self.graph.shape(id)
    }

    pub(crate) fn shape_str(&self, id: NodeId) -> String {
        mdl_runtime::ir::dim::shape_to_string(self.graph.shape(id))
    }

    /// Whether the leading axis of a tensor runs over samples (or domains, when grouped).
    pub(crate) fn has_lead(&self, t: Tv) -> bool {
        t.grouped || self.shape(t.node).first().is_some_and(|d| d.has_batch())
    }

    /// Turns a grouped value into a per-sample one: row `i` = entry `domain[i]`.
    pub(crate) fn materialise(&mut self, t: Tv, span: Span) -> R<Tv> {
        if !t.grouped {
            return Ok(t);
        }
        let Some(per) = self.per.clone() else {
            return self.error(span, "internal error: a per-domain value outside `per`");
        };
        let node = self.add(Op::Gather, &[t.node, per.idx], span)?;
        Ok(Tv { node, grouped: false })
    }

    pub(crate) fn materialise_val(&mut self, v: Val, span: Span) -> R<Val> {
        match v {
            Val::Tensor(t) => Ok(Val::Tensor(self.materialise(t, span)?)),
            Val::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    out.push(self.materialise_val(it, span)?);
                }
                Ok(Val::List(out))
            }
            other => Ok(other),
        }
    }

    /// Brings two tensors to a common grouping: a grouped value meeting a per-sample one
    /// is materialised; meeting a shared (non-batch) one, it stays grouped.
    fn align(&mut self, a: Tv, b: Tv, span: Span) -> R<(Tv, Tv, bool)> {
        if a.grouped == b.grouped {
            return Ok((a, b, a.grouped));
        }
        let (g, o) = if a.grouped { (a, b) } else { (b, a) };
        if self.has_lead(o) {
            let g2 = self.materialise(g, span)?;
            return Ok(if a.grouped { (g2, o, false) } else { (o, g2, false) });
        }
        Ok((a, b, true))
    }

    pub(crate) fn binary(&mut self, op: BinaryOp, a: Tv, b: Tv, span: Span) -> R<Tv> {
        let (a, b, grouped) = self.align(a, b, span)?;
        let node = self.add(Op::Binary(op), &[a.node, b.node], span)?;
        // numpy would broadcast [B] against [B, 1] to [B, B]; in a model that is always a
        // mistake, so it is an error here.
        // Operands of equal rank ([B, 1] - [1, B]) pair samples on purpose (in-batch
        // losses); a rank mismatch doing it is the accident.
        let batch_axes = |s: &[Dim]| s.iter().filter(|d| d.has_batch()).count();
        let (na, nb, nout) =
            (batch_axes(self.shape(a.node)), batch_axes(self.shape(b.node)), batch_axes(self.shape(node)));
        let same_rank = self.shape(a.node).len() == self.shape(b.node).len();
        if nout > na.max(nb) && !same_rank {
            let d = Diagnostic::error(
                span,
                format!(
                    "{} and {} broadcast to {}, which pairs every sample with every other",
                    self.shape_str(a.node),
                    self.shape_str(b.node),
                    self.shape_str(node)
                ),
            )
            .hint("give both the same rank, e.g. with `unsqueeze(x, 1)`, `squeeze(x, 1)` or `keep = true`");
            self.report(d);
            return Err(());
        }
        Ok(Tv { node, grouped })
    }

    pub(crate) fn unary(&mut self, op: UnaryOp, a: Tv, span: Span) -> R<Tv> {
        let node = self.add(Op::Unary(op), &[a.node], span)?;
        Ok(Tv { node, grouped: a.grouped })
    }

    /// `a @ b` with the grouping rules: per-sample `[B, k]` times per-domain `[D, k, n]`
    /// is a grouped matmul; everything else is an ordinary (possibly batched) matmul.
    pub(crate) fn matmul(&mut self, a: Tv, b: Tv, span: Span) -> R<Tv> {
        if b.grouped && !a.grouped && self.has_lead(a) {
            let Some(per) = self.per.clone() else {
                return self.error(span, "internal error: grouped weight outside `per`");
            };
            if self.shape(a.node).len() != 2 || self.shape(b.node).len() != 3 {
                return self.error(
                    span,
                    format!(
                        "a per-domain matrix product needs a [B, k] input and a [k, n] weight, got {} and a per-domain {}",
                        self.shape_str(a.node),
                        mdl_runtime::ir::dim::shape_to_string(&self.shape(b.node)[1..])
                    ),
                );
            }
            let node = self.add(Op::GroupMatMul { trans_w: false }, &[a.node, b.node, per.idx], span)?;
            return Ok(Tv { node, grouped: false });
        }
        let (a, b, grouped) = if a.grouped && !b.grouped && !self.has_lead(b) {
            (a, b, true)
        } else {
            let a = self.materialise(a, span)?;
            let b = self.materialise(b, span)?;
            (a, b, false)
        };
        let node = self.add(Op::MatMul { trans_a: false, trans_b: false }, &[a.node, b.node], span)?;
        Ok(Tv { node, grouped })
    }

    // ---------------------------------------------------------------- model

    fn model(&mut self, m: &ast::ModelDef, overrides: &BTreeMap<String, Hyper>) -> Option<Compiled> {
        self.in_model = true;
        let mut env = Env::new();
        let mut hyper = BTreeMap::new();
        for (name, _) in overrides {
            if !m.params.iter().any(|p| &p.name.name == name) {
                let names: Vec<&str> = m.params.iter().map(|p| p.name.name.as_str()).collect();
                let mut d =
                    Diagnostic::error(m.name.span, format!("model `{}` has no hyperparameter `{name}`", m.name.name))
                        .label("overridden by the experiment");
                if let Some(s) = suggest(name, names.iter().copied()) {
                    d = d.hint(format!("did you mean `{s}`?"));
                }
                self.report(d);
            }
        }
        for p in &m.params {
            let v = if let Some(h) = overrides.get(&p.name.name) {
                Ok(hyper_to_val(h))
            } else if let Some(def) = &p.default {
                self.expr(&mut env, def)
            } else {
                self.error(p.name.span, format!("hyperparameter `{}` needs a default value", p.name.name))
            };
            let v = v.unwrap_or(Val::Poison);
            if let Some(h) = val_to_hyper(&v) {
                hyper.insert(p.name.name.clone(), h);
            } else if v != Val::Poison {
                let _: R<()> = self.error(
                    p.name.span,
                    format!("a hyperparameter must be a number, string, boolean or list, not {}", v.kind()),
                );
            }
            env.define(&p.name.name, v);
        }
        let flow = self.stmts(&mut env, &m.body);
        if let Ok(Flow::Return(_)) = flow {
            let _: R<()> = self.error(m.name.span, "a model cannot `return`; declare `task`s and a `loss`");
        }
        // Every label needs its task, every task its label.
        let labels = self.labels.clone();
        for (name, span) in &labels {
            if !self.tasks.contains_key(name) && !self.failed_tasks.contains(name) {
                self.report(
                    Diagnostic::error(*span, format!("label `{name}` has no task"))
                        .hint(format!("add `task {name} = <logit>` to the model")),
                );
            }
        }
        if self.losses.is_empty() && self.diags.is_empty() {
            self.report(
                Diagnostic::error(m.name.span, format!("model `{}` has no loss", m.name.name))
                    .hint("add e.g. `loss bce(click)`"),
            );
        }
        if !self.diags.is_empty() {
            return None;
        }
        let mut total = self.losses[0];
        for &l in &self.losses.clone()[1..] {
            total = self.add(Op::Binary(BinaryOp::Add), &[total, l], m.name.span).ok()?;
        }
        self.graph.outputs.insert("loss".into(), total);
        for (name, (node, _)) in &self.tasks {
            self.graph.outputs.insert(logit_output(name), *node);
        }
        Some(Compiled {
            model: m.name.name.clone(),
            graph: std::mem::take(&mut self.graph),
            features: self.feature_decls.clone(),
            tasks: labels.iter().map(|(n, _)| n.clone()).collect(),
            hyper,
        })
    }

    // ---------------------------------------------------------------- statements

    fn stmts(&mut self, env: &mut Env, stmts: &[Stmt]) -> R<Flow> {
        for s in stmts {
            match self.stmt(env, s) {
                Ok(Flow::Next) => {}
                Ok(Flow::Return(v)) => return Ok(Flow::Return(v)),
                // The error is reported; carry on with the next statement so independent
                // errors are all found.
                Err(()) => {}
            }
        }
        Ok(Flow::Next)
    }

    fn model_only(&mut self, what: &str, span: Span) -> R<()> {
        if !self.in_model || self.depth > 0 {
            return self.error(span, format!("`{what}` belongs in a model, not inside a block"));
        }
        Ok(())
    }

    fn stmt(&mut self, env: &mut Env, s: &Stmt) -> R<Flow> {
        match s {
            Stmt::Input { name, kind, span } => {
                self.model_only("input", *span)?;
                self.declare_input(env, name, kind, *span)?;
            }
            Stmt::Label { names, span } => {
                self.model_only("label", *span)?;
                for n in names {
                    if self.labels.iter().any(|(l, _)| l == &n.name) {
                        return self.error(n.span, format!("label `{}` is declared twice", n.name));
                    }
                    self.graph.input(&label_input(&n.name), vec![Dim::batch()], DType::F);
                    self.labels.push((n.name.clone(), n.span));
                }
            }
            Stmt::Let { name, value, .. } => {
                self.enter_scope(&name.name);
                let v = self.expr(env, value);
                self.leave_scope();
                env.define(&name.name, v.clone().unwrap_or(Val::Poison));
                v?;
            }
            Stmt::Assign { name, value, .. } => {
                if env.get(&name.name).is_none() {
                    return self.unknown_name(env, &name.name, name.span);
                }
                // No naming scope here: a rebinding in a loop (`h = linear(h, w)`) names
                // its parameters after the block (`mlp/linear1/W`), not the variable.
                let v = self.expr(env, value);
                env.assign(&name.name, v.clone().unwrap_or(Val::Poison));
                v?;
            }
            Stmt::ParamDecl { name, shape, init, .. } => {
                let t = self.param_decl(env, name, shape, init.as_ref())?;
                env.define(&name.name, Val::Tensor(t));
            }
            Stmt::For { var, iter, body, .. } => {
                let items = self.iterable(env, iter)?;
                for item in items {
                    env.push();
                    env.define(&var.name, item);
                    let flow = self.stmts(env, body);
                    env.pop();
                    if let Ok(Flow::Return(v)) = flow {
                        return Ok(Flow::Return(v));
                    }
                }
            }
            Stmt::If { cond, then, otherwise, .. } => {
                let c = self.expr(env, cond)?;
                let b = match c {
                    Val::Bool(b) => b,
                    Val::Poison => return Err(()),
                    other => {
                        return self
                            .error(cond.span, format!("an `if` condition must be a boolean, found {}", other.kind()))
                    }
                };
                let branch = if b { Some(then) } else { otherwise.as_ref() };
                if let Some(body) = branch {
                    env.push();
                    let flow = self.stmts(env, body);
                    env.pop();
                    return flow;
                }
            }
            Stmt::Group { name, body, .. } => {
                let saved = self.group.replace(name.name.clone());
                let flow = self.stmts(env, body);
                self.group = saved;
                return flow;
            }
            Stmt::Return { value, span } => {
                if self.depth == 0 {
                    return self.error(*span, "`return` is only allowed inside a block");
                }
                let v = self.expr(env, value)?;
                return Ok(Flow::Return(v));
            }
            Stmt::Task { name, value, span } => {
                self.model_only("task", *span)?;
                if self.task(env, name, value, *span).is_err() {
                    // Reported already; later uses of the task stay quiet.
                    env.define(&name.name, Val::Poison);
                    self.failed_tasks.push(name.name.clone());
                    return Err(());
                }
            }
            Stmt::Loss { value, span } => {
                self.model_only("loss", *span)?;
                let v = self.expr(env, value)?;
                let t = self.expect_tensor(v, value.span)?;
                if !self.shape(t.node).is_empty() {
                    let d = Diagnostic::error(
                        value.span,
                        format!("a loss must be a scalar, found a tensor {}", self.shape_str(t.node)),
                    )
                    .hint("reduce it, e.g. `mean(...)`");
                    self.report(d);
                    return Err(());
                }
                self.losses.push(t.node);
            }
            Stmt::Expr { value } => {
                self.expr(env, value)?;
            }
        }
        Ok(Flow::Next)
    }

    fn declare_input(&mut self, env: &mut Env, name: &ast::Ident, kind: &InputKind, span: Span) -> R<()> {
        if self.features.contains_key(&name.name) {
            return self.error(name.span, format!("input `{}` is declared twice", name.name));
        }
        let count = Dim::sym(&count_sym(&name.name));
        let b = Dim::batch();
        let (fk, main, mask) = match kind {
            InputKind::Categorical => {
                let id = self.graph.input(&ids_input(&name.name), vec![b, count], DType::I);
                (FeatureKind::Categorical, id, None)
            }
            InputKind::Numeric => {
                let id = self.graph.input(&ids_input(&name.name), vec![b, count], DType::F);
                (FeatureKind::Numeric, id, None)
            }
            InputKind::Domain => {
                let id = self.graph.input(&ids_input(&name.name), vec![b], DType::I);
                (FeatureKind::Domain, id, None)
            }
            InputKind::Sequence { len, of } => {
                let lv = self.expr(env, len)?;
                let n = match lv {
                    Val::Int(d) => match d.as_const() {
                        Some(n) if n > 0 => n as usize,
                        _ => {
                            return self
                                .error(len.span, format!("a sequence length must be a positive constant, found {d}"))
                        }
                    },
                    other => {
                        return self
                            .error(len.span, format!("a sequence length must be an integer, found {}", other.kind()))
                    }
                };
                if let Some(o) = of {
                    match self.features.get(&o.name) {
                        Some(f) if f.kind == FeatureKind::Categorical => {}
                        Some(_) => return self.error(o.span, format!("`{}` is not a categorical input", o.name)),
                        None => {
                            let names: Vec<String> = self.features.keys().cloned().collect();
                            let mut d = Diagnostic::error(o.span, format!("unknown input `{}`", o.name))
                                .label("must be a categorical input declared above");
                            if let Some(s) = suggest(&o.name, names.iter().map(|s| s.as_str())) {
                                d = d.hint(format!("did you mean `{s}`?"));
                            }
                            self.report(d);
                            return Err(());
                        }
                    }
                }
                let shape = vec![b, count, Dim::lit(n as i64)];
                let id = self.graph.input(&ids_input(&name.name), shape.clone(), DType::I);
                let m = self.graph.input(&mask_input(&name.name), shape, DType::F);
                (FeatureKind::Sequence { len: n, of: of.as_ref().map(|o| o.name.clone()) }, id, Some(m))
            }
        };
        self.features.insert(name.name.clone(), FeatureNodes { kind: fk.clone(), main, mask });
        self.feature_decls.push(Feature { name: name.name.clone(), kind: fk, span });
        env.define(&name.name, Val::Feature(name.name.clone()));
        Ok(())
    }

    fn task(&mut self, env: &mut Env, name: &ast::Ident, value: &Expr, span: Span) -> R<()> {
        if !self.labels.iter().any(|(l, _)| l == &name.name) {
            let names: Vec<String> = self.labels.iter().map(|(l, _)| l.clone()).collect();
            let mut d = Diagnostic::error(name.span, format!("task `{}` has no label", name.name))
                .label("declare it with `label` first");
            if let Some(s) = suggest(&name.name, names.iter().map(|s| s.as_str())) {
                d = d.hint(format!("did you mean `{s}`?"));
            }
            self.report(d);
            return Err(());
        }
        if self.tasks.contains_key(&name.name) {
            return self.error(name.span, format!("task `{}` is defined twice", name.name));
        }
        self.enter_scope(&name.name);
        let v = self.expr(env, value);
        self.leave_scope();
        let t = self.expect_tensor(v?, value.span)?;
        let t = self.materialise(t, value.span)?;
        let shape = self.shape(t.node).to_vec();
        let b = Dim::batch();
        let ok = shape == [b.clone()] || (shape.len() == 2 && shape[0] == b && shape[1].is_one());
        if !ok {
            return self.error(
                value.span,
                format!("the logit of task `{}` must be [B] or [B, 1], found {}", name.name, self.shape_str(t.node)),
            );
        }
        let node = if shape.len() == 2 { self.add(Op::Reshape { shape: vec![b] }, &[t.node], span)? } else { t.node };
        self.tasks.insert(name.name.clone(), (node, span));
        env.define(&name.name, Val::Task(name.name.clone()));
        Ok(())
    }

    fn param_decl(&mut self, env: &mut Env, name: &ast::Ident, shape: &[Expr], init: Option<&Expr>) -> R<Tv> {
        let mut dims = Vec::new();
        for d in shape {
            let v = self.expr(env, d)?;
            match v {
                Val::Int(x) => {
                    if x.as_const().is_some_and(|c| c <= 0) {
                        return self.error(d.span, format!("a parameter size must be positive, found {x}"));
                    }
                    if x.has_batch() {
                        return self.error(d.span, "a parameter size cannot depend on the batch size");
                    }
                    dims.push(x)
                }
                other => {
                    return self.error(d.span, format!("a parameter size must be an integer, found {}", other.kind()))
                }
            }
        }
        let init = match init {
            None => {
                if dims.len() >= 2 {
                    Init::Glorot
                } else {
                    Init::Zeros
                }
            }
            Some(e) => self.init_expr(env, e)?,
        };
        let grouped = self.per.is_some();
        if let Some(per) = &self.per {
            dims.insert(0, per.groups.clone());
        }
        let full = self.param_name(&name.name);
        let node = self.graph.param(&full, dims, init, self.group.clone(), false);
        Ok(Tv { node, grouped })
    }

    /// A unique parameter name under the current scope.
    pub(crate) fn param_name(&mut self, leaf: &str) -> String {
        let base = if self.scope.is_empty() { leaf.to_string() } else { format!("{}/{leaf}", self.scope_name()) };
        let mut name = base.clone();
        let mut k = 1;
        while self.graph.param_info(&name).is_some() {
            name = format!("{base}{k}");
            k += 1;
        }
        name
    }

    fn init_expr(&mut self, env: &mut Env, e: &Expr) -> R<Init> {
        let ExprKind::Call { callee, args } = &e.kind else {
            return self.error(e.span, "an initialiser is a call such as `glorot()`, `zeros()` or `normal(0.01)`");
        };
        let mut nums = Vec::new();
        for a in args {
            match self.expr(env, &a.value)? {
                Val::Float(f) => nums.push(f),
                Val::Int(d) => match d.as_const() {
                    Some(c) => nums.push(c as f64),
                    None => return self.error(a.value.span, "an initialiser argument must be a constant"),
                },
                other => {
                    return self.error(
                        a.value.span,
                        format!("an initialiser argument must be a number, found {}", other.kind()),
                    )
                }
            }
        }
        let want = |n: usize, this: &mut Elab| -> R<()> {
            if nums.len() != n {
                return this.error(e.span, format!("`{}` takes {n} argument(s), found {}", callee.name, nums.len()));
            }
            Ok(())
        };
        Ok(match callee.name.as_str() {
            "glorot" => {
                want(0, self)?;
                Init::Glorot
            }
            "zeros" => {
                want(0, self)?;
                Init::Zeros
            }
            "ones" => {
                want(0, self)?;
                Init::Ones
            }
            "constant" => {
                want(1, self)?;
                Init::Const(nums[0])
            }
            "normal" => {
                want(1, self)?;
                Init::Normal(nums[0])
            }
            "uniform" => {
                want(1, self)?;
                Init::Uniform(nums[0])
            }
            other => {
                let known = ["glorot", "zeros", "ones", "constant", "normal", "uniform"];
                let mut d = Diagnostic::error(callee.span, format!("unknown initialiser `{other}`"))
                    .label(format!("expected one of: {}", known.join(", ")));
                if let Some(s) = suggest(other, known) {
                    d = d.hint(format!("did you mean `{s}`?"));
                }
                self.report(d);
                return Err(());
            }
        })
    }

    // ---------------------------------------------------------------- expressions

    pub(crate) fn expect_tensor(&mut self, v: Val, span: Span) -> R<Tv> {
        match v {
            Val::Tensor(t) => Ok(t),
            Val::Float(f) => Ok(Tv { node: self.scalar(f, span)?, grouped: false }),
            Val::Int(d) => match d.as_const() {
                Some(c) => Ok(Tv { node: self.scalar(c as f64, span)?, grouped: false }),
                None => self
                    .error(span, format!("the size {d} is only known with data; it cannot be used as a number here")),
            },
            Val::Feature(name) => self.feature_tensor(&name, span),
            Val::Poison => Err(()),
            other => self.error(span, format!("expected a tensor, found {}", other.kind())),
        }
    }

    /// An input used as a tensor: numeric values, or a hint for ids.
    fn feature_tensor(&mut self, name: &str, span: Span) -> R<Tv> {
        let Some(f) = self.features.get(name) else {
            return self.error(span, format!("unknown input `{name}`"));
        };
        match f.kind {
            FeatureKind::Numeric => Ok(Tv { node: f.main, grouped: false }),
            FeatureKind::Categorical | FeatureKind::Sequence { .. } => {
                let d = Diagnostic::error(span, format!("`{name}` holds ids, not values"))
                    .label("used as a tensor here")
                    .hint(format!("look its ids up in a table: `E[{name}]` with `let E = embedding({name}, dim)`"));
                self.report(d);
                Err(())
            }
            FeatureKind::Domain => {
                let d = Diagnostic::error(span, format!("`{name}` holds domain ids, not values"))
                    .label("used as a tensor here")
                    .hint(format!("use `one_hot({name})`, `per {name} {{ ... }}`, or an embedding"));
                self.report(d);
                Err(())
            }
        }
    }

    pub(crate) fn feature_nodes(&self, name: &str) -> Option<(FeatureKind, NodeId, Option<NodeId>)> {
        self.features.get(name).map(|f| (f.kind.clone(), f.main, f.mask))
    }

    pub(crate) fn per_ctx(&self) -> Option<(String, NodeId, Dim)> {
        self.per.as_ref().map(|p| (p.feature.clone(), p.idx, p.groups.clone()))
    }

    pub(crate) fn next_dropout_stream(&mut self) -> u64 {
        self.dropout_streams += 1;
        self.dropout_streams
    }

    pub(crate) fn group_name(&self) -> Option<String> {
        self.group.clone()
    }

    pub(crate) fn task_logit(&self, name: &str) -> Option<NodeId> {
        self.tasks.get(name).map(|t| t.0)
    }

    fn unknown_name<T>(&mut self, env: &Env, name: &str, span: Span) -> R<T> {
        let mut cands = env.names();
        cands.extend(self.blocks.keys().cloned());
        cands.extend(builtins::names().iter().map(|s| s.to_string()));
        let mut d = Diagnostic::error(span, format!("unknown name `{name}`")).label("not defined");
        if let Some(s) = suggest(name, cands.iter().map(|s| s.as_str())) {
            d = d.hint(format!("did you mean `{s}`?"));
        }
        self.report(d);
        Err(())
    }

    fn iterable(&mut self, env: &mut Env, e: &Expr) -> R<Vec<Val>> {
        match self.expr(env, e)? {
            Val::List(items) => Ok(items),
            Val::Poison => Err(()),
            other => self.error(e.span, format!("expected a list or a range to iterate over, found {}", other.kind())),
        }
    }

    pub(crate) fn expr(&mut self, env: &mut Env, e: &Expr) -> R<Val> {
        match &e.kind {
            ExprKind::Int(n) => Ok(Val::int(*n)),
            ExprKind::Float(f) => Ok(Val::Float(*f)),
            ExprKind::Str(s) => Ok(Val::Str(s.clone())),
            ExprKind::Bool(b) => Ok(Val::Bool(*b)),
            ExprKind::Var(name) => match env.get(name) {
                Some(Val::Poison) => Err(()),
                Some(v) => Ok(v.clone()),
                None => self.unknown_name(env, name, e.span),
            },
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut failed = false;
                for it in items {
                    match self.expr(env, it) {
                        Ok(v) => out.push(v),
                        Err(()) => failed = true,
                    }
                }
                if failed {
                    Err(())
                } else {
                    Ok(Val::List(out))
                }
            }
            ExprKind::Comprehension { elem, var, iter } => {
                let items = self.iterable(env, iter)?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    env.push();
                    env.define(&var.name, item);
                    let v = self.expr(env, elem);
                    env.pop();
                    out.push(v?);
                }
                Ok(Val::List(out))
            }
            ExprKind::Range { lo, hi } => {
                let a = self.const_int(env, lo)?;
                let b = self.const_int(env, hi)?;
                if b - a > MAX_UNROLL as i64 {
                    return self.error(
                        e.span,
                        format!("range of {} items is too long to unroll (at most {MAX_UNROLL})", b - a),
                    );
                }
                Ok(Val::List((a..b.max(a)).map(Val::int).collect()))
            }
            ExprKind::Call { callee, args } => self.call(env, callee, args, e.span),
            ExprKind::Index { base, index } => self.index(env, base, index, e.span),
            ExprKind::Unary { op, operand } => {
                let v = self.expr(env, operand)?;
                match (op, v) {
                    (UnOp::Not, Val::Bool(b)) => Ok(Val::Bool(!b)),
                    (UnOp::Neg, Val::Int(d)) => Ok(Val::Int(&Dim::lit(0) - &d)),
                    (UnOp::Neg, Val::Float(f)) => Ok(Val::Float(-f)),
                    (UnOp::Neg, v @ (Val::Tensor(_) | Val::Feature(_))) => {
                        let t = self.expect_tensor(v, operand.span)?;
                        Ok(Val::Tensor(self.unary(UnaryOp::Neg, t, e.span)?))
                    }
                    (_, Val::Poison) => Err(()),
                    (op, v) => self.error(
                        e.span,
                        format!("`{}` cannot be applied to {}", if *op == UnOp::Not { "not" } else { "-" }, v.kind()),
                    ),
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.expr(env, lhs);
                let b = self.expr(env, rhs);
                let (a, b) = (a?, b?);
                self.binop(*op, a, b, lhs.span, rhs.span, e.span)
            }
            ExprKind::Per { group, body, value } => self.per_block(env, group, body, value, e.span),
            ExprKind::Block { body, value } => {
                env.push();
                let flow = self.stmts(env, body);
                let v = match flow {
                    Ok(Flow::Return(_)) => self.error(e.span, "`return` cannot leave a `{ ... }` expression"),
                    _ => self.expr(env, value),
                };
                env.pop();
                v
            }
        }
    }

    pub(crate) fn const_int(&mut self, env: &mut Env, e: &Expr) -> R<i64> {
        match self.expr(env, e)? {
            Val::Int(d) => match d.as_const() {
                Some(c) => Ok(c),
                None => self.error(e.span, format!("expected a constant integer, found the data-dependent size {d}")),
            },
            other => self.error(e.span, format!("expected an integer, found {}", other.kind())),
        }
    }

    fn binop(&mut self, op: BinOp, a: Val, b: Val, sa: Span, sb: Span, span: Span) -> R<Val> {
        use BinOp::*;
        if matches!(a, Val::Poison) || matches!(b, Val::Poison) {
            return Err(());
        }
        match op {
            And | Or => match (a, b) {
                (Val::Bool(x), Val::Bool(y)) => Ok(Val::Bool(if op == And { x && y } else { x || y })),
                (x, y) => self.error(span, format!("`and`/`or` need booleans, found {} and {}", x.kind(), y.kind())),
            },
            Concat => match (a, b) {
                (Val::List(mut x), Val::List(y)) => {
                    x.extend(y);
                    Ok(Val::List(x))
                }
                (Val::Str(x), Val::Str(y)) => Ok(Val::Str(x + &y)),
                (x, y) => self
                    .error(span, format!("`++` joins two lists or two strings, found {} and {}", x.kind(), y.kind())),
            },
            Eq | Ne | Lt | Le | Gt | Ge => self.compare(op, a, b, span),
            Add | Sub | Mul | Div | MatMul => {
                // Compile-time arithmetic first.
                match (&a, &b, op) {
                    (Val::Int(x), Val::Int(y), Add) => return Ok(Val::Int(x + y)),
                    (Val::Int(x), Val::Int(y), Sub) => return Ok(Val::Int(x - y)),
                    (Val::Int(x), Val::Int(y), Mul) => return Ok(Val::Int(x * y)),
                    (Val::Int(x), Val::Int(y), Div) => {
                        if let (Some(p), Some(q)) = (x.as_const(), y.as_const()) {
                            if q == 0 {
                                return self.error(sb, "division by zero");
                            }
                            return Ok(if p % q == 0 { Val::int(p / q) } else { Val::Float(p as f64 / q as f64) });
                        }
                        if let Some(q) = y.as_const() {
                            if let Some(d) = x.div_exact(q) {
                                return Ok(Val::Int(d));
                            }
                        }
                        return self.error(span, format!("cannot divide the size {x} by {y} exactly"));
                    }
                    _ => {}
                }
                let num = |v: &Val| match v {
                    Val::Float(f) => Some(*f),
                    Val::Int(d) => d.as_const().map(|c| c as f64),
                    _ => None,
                };
                if let (Some(x), Some(y)) = (num(&a), num(&b)) {
                    if op != MatMul {
                        return Ok(Val::Float(match op {
                            Add => x + y,
                            Sub => x - y,
                            Mul => x * y,
                            _ => {
                                if y == 0.0 {
                                    return self.error(sb, "division by zero");
                                }
                                x / y
                            }
                        }));
                    }
                }
                let is_tensorish = |v: &Val| matches!(v, Val::Tensor(_) | Val::Feature(_));
                if !(is_tensorish(&a) || is_tensorish(&b))
                    || !matches!(a, Val::Tensor(_) | Val::Feature(_) | Val::Int(_) | Val::Float(_))
                    || !matches!(b, Val::Tensor(_) | Val::Feature(_) | Val::Int(_) | Val::Float(_))
                {
                    let sym = match op {
                        Add => "+",
                        Sub => "-",
                        Mul => "*",
                        Div => "/",
                        _ => "@",
                    };
                    return self.error(span, format!("`{sym}` cannot combine {} and {}", a.kind(), b.kind()));
                }
                let ta = self.expect_tensor(a, sa)?;
                let tb = self.expect_tensor(b, sb)?;
                let t = match op {
                    Add => self.binary(BinaryOp::Add, ta, tb, span)?,
                    Sub => self.binary(BinaryOp::Sub, ta, tb, span)?,
                    Mul => self.binary(BinaryOp::Mul, ta, tb, span)?,
                    Div => self.binary(BinaryOp::Div, ta, tb, span)?,
                    _ => self.matmul(ta, tb, span)?,
                };
                Ok(Val::Tensor(t))
            }
        }
    }

    fn compare(&mut self, op: BinOp, a: Val, b: Val, span: Span) -> R<Val> {
        use std::cmp::Ordering;
        let ord: Option<Ordering> = match (&a, &b) {
            (Val::Int(x), Val::Int(y)) => {
                if x == y {
                    Some(Ordering::Equal)
                } else {
                    match (x.as_const(), y.as_const()) {
                        (Some(p), Some(q)) => Some(p.cmp(&q)),
                        _ => {
                            if matches!(op, BinOp::Eq | BinOp::Ne) {
                                return self.error(span, format!("whether {x} equals {y} depends on the data"));
                            }
                            return self.error(span, format!("cannot order the data-dependent sizes {x} and {y}"));
                        }
                    }
                }
            }
            (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
                let f = |v: &Val| match v {
                    Val::Float(f) => *f,
                    Val::Int(d) => d.as_const().unwrap_or(0) as f64,
                    _ => 0.0,
                };
                f(&a).partial_cmp(&f(&b))
            }
            (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
            (Val::Bool(x), Val::Bool(y)) if matches!(op, BinOp::Eq | BinOp::Ne) => Some(x.cmp(y)),
            _ => return self.error(span, format!("cannot compare {} with {}", a.kind(), b.kind())),
        };
        let Some(o) = ord else { return Ok(Val::Bool(false)) };
        Ok(Val::Bool(match op {
            BinOp::Eq => o == Ordering::Equal,
            BinOp::Ne => o != Ordering::Equal,
            BinOp::Lt => o == Ordering::Less,
            BinOp::Le => o != Ordering::Greater,
            BinOp::Gt => o == Ordering::Greater,
            _ => o != Ordering::Less,
        }))
    }

    fn index(&mut self, env: &mut Env, base: &Expr, index: &Expr, span: Span) -> R<Val> {
        let b = self.expr(env, base)?;
        match b {
            Val::List(items) => {
                let i = self.const_int(env, index)?;
                let n = items.len() as i64;
                let k = if i < 0 { i + n } else { i };
                if k < 0 || k >= n {
                    return self.error(index.span, format!("index {i} is out of range for a list of {n}"));
                }
                Ok(items[k as usize].clone())
            }
            Val::Table { node, ids_of } => {
                let iv = self.expr(env, index)?;
                let Val::Feature(fname) = iv else {
                    return self
                        .error(index.span, format!("a table is indexed by an input's ids, found {}", iv.kind()));
                };
                let Some((kind, ids, _)) = self.feature_nodes(&fname) else {
                    return self.error(index.span, format!("unknown input `{fname}`"));
                };
                let space = match &kind {
                    FeatureKind::Categorical | FeatureKind::Domain => fname.clone(),
                    FeatureKind::Sequence { of: Some(o), .. } => o.clone(),
                    FeatureKind::Sequence { of: None, .. } => fname.clone(),
                    FeatureKind::Numeric => {
                        return self
                            .error(index.span, format!("`{fname}` holds values, not ids; it cannot index a table"))
                    }
                };
                if space != ids_of {
                    let d = Diagnostic::error(
                        index.span,
                        format!("this table holds rows for the ids of `{ids_of}`, but `{fname}` has its own ids"),
                    )
                    .hint(if matches!(kind, FeatureKind::Sequence { .. }) {
                        format!("declare the sequence as `input {fname} : sequence(len) of {ids_of}` to share the ids")
                    } else {
                        format!("make a table for it: `embedding({fname}, dim)`")
                    });
                    self.report(d);
                    return Err(());
                }
                let out = self.add(Op::Gather, &[node, ids], span)?;
                Ok(Val::Tensor(Tv { node: out, grouped: false }))
            }
            Val::Poison => Err(()),
            other => self.error(base.span, format!("{} cannot be indexed", other.kind())),
        }
    }

    fn per_block(&mut self, env: &mut Env, group: &ast::Ident, body: &[Stmt], value: &Expr, span: Span) -> R<Val> {
        if self.per.is_some() {
            return self.error(group.span, "`per` blocks cannot be nested");
        }
        let Some(v) = env.get(&group.name).cloned() else {
            return self.unknown_name(env, &group.name, group.span);
        };
        let Val::Feature(fname) = v else {
            return self.error(group.span, format!("`per` needs a domain input, found {}", v.kind()));
        };
        let Some((FeatureKind::Domain, idx, _)) = self.feature_nodes(&fname) else {
            return self.error(group.span, format!("`per` needs a domain input; `{fname}` is not declared `: domain`"));
        };
        self.per = Some(PerCtx { feature: fname.clone(), idx, groups: Dim::sym(&count_sym(&fname)) });
        self.enter_scope(&format!("per_{fname}"));
        env.push();
        let flow = self.stmts(env, body);
        let v = match flow {
            Ok(Flow::Return(_)) => self.error(span, "`return` cannot leave a `per` block"),
            _ => self.expr(env, value),
        };
        let v = v.and_then(|v| self.materialise_val(v, span));
        env.pop();
        self.leave_scope();
        self.per = None;
        v
    }

    // ---------------------------------------------------------------- calls

    fn call(&mut self, env: &mut Env, callee: &ast::Ident, args: &[ast::Arg], span: Span) -> R<Val> {
        // Evaluate arguments first (all of them, so errors in several are reported).
        let mut pos = Vec::new();
        let mut named: Vec<(ast::Ident, Val, Span)> = Vec::new();
        let mut failed = false;
        for a in args {
            match self.expr(env, &a.value) {
                Ok(v) => match &a.name {
                    Some(n) => named.push((n.clone(), v, a.value.span)),
                    None => pos.push((v, a.value.span)),
                },
                Err(()) => failed = true,
            }
        }
        if failed {
            return Err(());
        }
        if let Some(block) = self.blocks.get(&callee.name).cloned() {
            return self.call_block(&block, pos, named, span);
        }
        if builtins::is_builtin(&callee.name) {
            let bound = self.bind_args(&callee.name, builtins::params(&callee.name), pos, named, span, None)?;
            return builtins::call(self, &callee.name, bound, span);
        }
        self.unknown_name(env, &callee.name, callee.span)
    }

    /// Binds positional and named arguments to parameter names (with defaults).
    pub(crate) fn bind_args(
        &mut self,
        fname: &str,
        params: Vec<(String, Option<Val>)>,
        pos: Vec<(Val, Span)>,
        named: Vec<(ast::Ident, Val, Span)>,
        span: Span,
        def_span: Option<Span>,
    ) -> R<Vec<(String, Val, Span)>> {
        let mut slots: Vec<Option<(Val, Span)>> = vec![None; params.len()];
        if pos.len() > params.len() {
            let mut d = Diagnostic::error(
                pos[params.len()].1,
                format!("`{fname}` takes {} argument(s), but {} were given", params.len(), pos.len() + named.len()),
            )
            .label("unexpected argument");
            if let Some(ds) = def_span {
                d = d.note(ds, format!("`{fname}` is defined here"));
            }
            self.report(d);
            return Err(());
        }
        for (i, p) in pos.into_iter().enumerate() {
            slots[i] = Some(p);
        }
        for (n, v, s) in named {
            match params.iter().position(|(p, _)| p == &n.name) {
                Some(i) => {
                    if slots[i].is_some() {
                        return self.error(n.span, format!("argument `{}` is given twice", n.name));
                    }
                    slots[i] = Some((v, s));
                }
                None => {
                    let mut d = Diagnostic::error(n.span, format!("`{fname}` has no parameter `{}`", n.name))
                        .label("unknown argument");
                    if let Some(sg) = suggest(&n.name, params.iter().map(|(p, _)| p.as_str())) {
                        d = d.hint(format!("did you mean `{sg}`?"));
                    } else {
                        let list: Vec<&str> = params.iter().map(|(p, _)| p.as_str()).collect();
                        d = d.hint(format!("its parameters are: {}", list.join(", ")));
                    }
                    if let Some(ds) = def_span {
                        d = d.note(ds, format!("`{fname}` is defined here"));
                    }
                    self.report(d);
                    return Err(());
                }
            }
        }
        let mut out = Vec::with_capacity(params.len());
        for ((name, default), slot) in params.into_iter().zip(slots) {
            match (slot, default) {
                (Some((v, s)), _) => out.push((name, v, s)),
                (None, Some(d)) => out.push((name, d, span)),
                (None, None) => {
                    let mut d = Diagnostic::error(span, format!("`{fname}` is missing its argument `{name}`"))
                        .label("in this call");
                    if let Some(ds) = def_span {
                        d = d.note(ds, format!("`{fname}` is defined here"));
                    }
                    self.report(d);
                    return Err(());
                }
            }
        }
        Ok(out)
    }

    fn call_block(
        &mut self,
        block: &ast::BlockDef,
        pos: Vec<(Val, Span)>,
        named: Vec<(ast::Ident, Val, Span)>,
        span: Span,
    ) -> R<Val> {
        if self.depth >= MAX_CALL_DEPTH {
            return self
                .error(span, format!("blocks call each other more than {MAX_CALL_DEPTH} deep (endless recursion?)"));
        }
        // Defaults are evaluated in the block's own (empty) environment.
        let mut params = Vec::new();
        let mut denv = Env::new();
        for p in &block.params {
            let d = match &p.default {
                Some(e) => Some(self.expr(&mut denv, e)?),
                None => None,
            };
            params.push((p.name.name.clone(), d));
        }
        let bound = self.bind_args(&block.name.name, params, pos, named, span, Some(block.name.span))?;
        let mut benv = Env::new();
        for (n, v, _) in bound {
            benv.define(&n, v);
        }
        self.depth += 1;
        self.enter_scope(&block.name.name);
        let flow = self.stmts(&mut benv, &block.body);
        self.leave_scope();
        self.depth -= 1;
        match flow {
            Ok(Flow::Return(v)) => Ok(v),
            Ok(Flow::Next) => self.error(span, format!("block `{}` ended without `return`", block.name.name)),
            Err(()) => Err(()),
        }
    }
}

/// A hyperparameter as a compile-time value.
pub fn hyper_to_val(h: &Hyper) -> Val {
    match h {
        Hyper::Int(n) => Val::int(*n),
        Hyper::Float(f) => Val::Float(*f),
        Hyper::Str(s) => Val::Str(s.clone()),
        Hyper::Bool(b) => Val::Bool(*b),
        Hyper::List(items) => Val::List(items.iter().map(hyper_to_val).collect()),
    }
}

fn val_to_hyper(v: &Val) -> Option<Hyper> {
    Some(match v {
        Val::Int(d) => Hyper::Int(d.as_const()?),
        Val::Float(f) => Hyper::Float(*f),
        Val::Str(s) => Hyper::Str(s.clone()),
        Val::Bool(b) => Hyper::Bool(*b),
        Val::List(items) => Hyper::List(items.iter().map(val_to_hyper).collect::<Option<Vec<_>>>()?),
        _ => return None,
    })
}

impl std::fmt::Display for Hyper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hyper::Int(n) => write!(f, "{n}"),
            Hyper::Float(x) => write!(f, "{x}"),
            Hyper::Str(s) => write!(f, "{s:?}"),
            Hyper::Bool(b) => write!(f, "{b}"),
            Hyper::List(items) => {
                let parts: Vec<String> = items.iter().map(|h| h.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}
