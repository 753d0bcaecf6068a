//! Checking and lowering: a parsed spec becomes a forward dataflow graph.
//!
//! The two arrows `check` and `lower` of the pipeline in docs/architecture.md are one walk
//! here, on purpose: a spec is a small program that runs once at compile time (loops
//! unroll, blocks inline, `if` decides on hyperparameters), and every tensor operation it
//! performs adds a node through the runtime's checked graph builder. Because shapes are
//! symbolic (`[B, 16*count(fields)]`), that single walk proves the spec's shapes for every
//! dataset and batch size before any data is read; an error is reported at the span of the
//! expression that caused it, and the walk goes on (the failed value becomes `Poison`,
//! which absorbs later uses) so several independent errors are reported at once.
//!
//! What this module owns: the entry points ([`compile_file`], [`compile`]), what they
//! return ([`Compiled`], [`Feature`], [`Hyper`]) and the graph names of inputs and outputs,
//! and the elaborator's state. Every fallible step returns `R`, whose error is the
//! [`Reported`] token of a diagnostic already recorded. The walk itself is split by
//! construct family:
//!
//! | module       | owns |
//! |--------------|------|
//! | `load`       | the files: the standard library, the root spec and its `use`s; blocks and the chosen model |
//! | `model`      | hyperparameters, labels, tasks and losses; the assembled [`Compiled`] |
//! | `stmt`       | statements and control flow: `let`, rebinding, `for`, `if`, groups, `return` |
//! | `budget`     | the limits on unrolled loop iterations, graph ops and loop nesting |
//! | `sizes`      | the data's sizes ([`Sizes`]) as numbers, and the error where a statement needs one that is not bound |
//! | `expr`       | expressions and operators, comparisons, indexing, compile-time arithmetic |
//! | `call`       | calls: argument binding, block inlining, dispatch to built-ins |
//! | [`builtins`] | the built-in functions, each with its parameters and its lowering |
//! | `scope`      | names and naming scopes of parameters and nodes, unknown-name reports |
//! | `tensor`     | tensor operations as checked graph nodes, values used as tensors |
//! | `per`        | per-domain grouping (`per g { ... }`) and how grouped values meet others |
//! | `input`      | input declarations and inputs used as tensors |
//! | `param`      | parameter declarations and initialisers |
//! | [`value`]    | the compile-time values and the environment of `let` bindings |
//!
//! The standard library of blocks written in `.mdl` is `specs/std.mdl`, compiled into the
//! binary.

mod budget;
pub mod builtins;
mod call;
mod expr;
mod input;
mod load;
mod model;
mod param;
mod per;
mod scope;
mod sizes;
mod stmt;
mod tensor;
pub mod value;

pub use model::hyper_to_val;
pub use sizes::Sizes;

use crate::diag::{Diagnostic, Diagnostics, Reported, SourceMap, Span};
use crate::syntax::ast;
use input::FeatureNodes;
use mdl_runtime::{Graph, NodeId};
use per::PerCtx;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::rc::Rc;

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
    /// Task names in declaration order of `label`; each has a `label/<task>` input but a
    /// `candidates` task, which reads no column.
    pub tasks: Vec<String>,
    /// The kind of each task, in the order of `tasks`.
    pub task_kinds: Vec<crate::tasks::TaskKind>,
    /// Every hyperparameter with its resolved value.
    pub hyper: BTreeMap<String, Hyper>,
    /// The id spaces whose vocabularies the graph reads (`sample_ids`): each has the
    /// inputs [`vocab_input`] and [`vocab_starts_input`].
    pub vocabularies: BTreeSet<String>,
    /// The id spaces and bin counts `frequency_bin` reads: each has the input
    /// [`frequency_bins_input`].
    pub frequency_bins: BTreeSet<(String, usize)>,
    /// Where the spec defines each parameter, as `file:line:col`: the statement of the
    /// model's body that made it (a `param`, a built-in such as `embedding`, or the call
    /// of the block that holds it, `linear(h, 1)`).
    pub param_places: BTreeMap<String, String>,
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
/// The prefix of the graph outputs that hold `probe(x, "name")` values.
pub const PROBE_PREFIX: &str = "probe/";
/// The graph output of the probe named `name` (its scope path and name).
pub fn probe_output(name: &str) -> String {
    format!("{PROBE_PREFIX}{name}")
}
/// The graph output of a named loss (`loss name = e`): the scalar `e` alone, beside the
/// total `loss`, so that a training stage can make its objective of some of them.
pub fn loss_output(name: &str) -> String {
    format!("loss/{name}")
}
/// The named losses of a compiled model (its `loss/<name>` outputs), in name order.
pub fn loss_names(graph: &mdl_runtime::Graph) -> Vec<String> {
    graph.outputs.keys().filter_map(|k| k.strip_prefix("loss/")).map(str::to_string).collect()
}
/// The symbol for the number of columns (or domains) of an input.
pub fn count_sym(feature: &str) -> String {
    format!("count({feature})")
}
/// The graph input holding the train count of every id of an input's id space (0 for
/// padding and out-of-vocabulary ids), which `sample_ids` draws from.
pub fn vocab_input(space: &str) -> String {
    format!("vocab/{space}")
}
/// The graph input holding the first id of each column of an input's id space, then the
/// number of ids (`sample_ids` draws from the column of each id).
pub fn vocab_starts_input(space: &str) -> String {
    format!("vocab/{space}/starts")
}
/// The graph input holding the frequency bin of every id of an input's id space
/// (`frequency_bin(x, bins)`), as a number: `[rows]`.
pub fn frequency_bins_input(space: &str, bins: usize) -> String {
    format!("vocab/{space}/bins{bins}")
}
/// The symbol for the number of table rows an input's ids address.
pub fn rows_sym(feature: &str) -> String {
    format!("rows({feature})")
}

/// Reads a spec file (a regular `.mdl` file) and everything it uses, and compiles the model
/// in it (the only one, or the one named). `overrides` replace hyperparameter defaults.
/// The data's sizes stay symbolic (see [`compile_file_sized`]).
pub fn compile_file(
    map: &mut SourceMap,
    path: &Path,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
) -> Result<Compiled, Vec<Diagnostic>> {
    compile_file_sized(map, path, model, overrides, &Sizes::default()).map_err(|f| f.diagnostics)
}

/// Why a compilation failed: its diagnostics, and the sizes some statement needed as a
/// number while they were not bound (a caller that can bind more of them, from the data,
/// compiles again).
#[derive(Debug)]
pub struct Failed {
    pub diagnostics: Vec<Diagnostic>,
    /// The symbols (`count(fields)`, `rows(items)`) a statement needed as numbers.
    pub needs: BTreeSet<String>,
}

/// [`compile_file`] with the data's sizes that are known: `count(x)`, `rows(x)` and the
/// number of domains are then numbers the spec can loop over and compute with.
pub fn compile_file_sized(
    map: &mut SourceMap,
    path: &Path,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
    sizes: &Sizes,
) -> Result<Compiled, Failed> {
    let failed = |diagnostics| Failed { diagnostics, needs: BTreeSet::new() };
    // Only spec files: a diagnostic shows lines of its file, never those of another kind
    // of file (`spec: /etc/passwd`).
    if path.extension().is_none_or(|e| e != "mdl") {
        let message = format!("cannot read {}: a spec file's name ends in `.mdl`", path.display());
        return Err(failed(vec![Diagnostic::error(Span::default(), message)]));
    }
    let text = crate::files::read_text(path).map_err(|e| {
        failed(vec![Diagnostic::error(Span::default(), format!("cannot read {}: {e}", path.display()))])
    })?;
    let file = map.add(path.display().to_string(), text);
    compile_sized(map, file, path.parent(), model, overrides, sizes)
}

/// Compiles the model in an already loaded file (`dir` resolves its `use` paths).
pub fn compile(
    map: &mut SourceMap,
    file: u32,
    dir: Option<&Path>,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
) -> Result<Compiled, Vec<Diagnostic>> {
    compile_sized(map, file, dir, model, overrides, &Sizes::default()).map_err(|f| f.diagnostics)
}

/// [`compile`] with the data's sizes that are known ([`compile_file_sized`]).
pub fn compile_sized(
    map: &mut SourceMap,
    file: u32,
    dir: Option<&Path>,
    model: Option<&str>,
    overrides: &BTreeMap<String, Hyper>,
    sizes: &Sizes,
) -> Result<Compiled, Failed> {
    let failed = |diagnostics| Failed { diagnostics, needs: BTreeSet::new() };
    let modules = load::parse_all(map, file, dir).map_err(failed)?;
    let (blocks, chosen) = load::definitions(&modules, file, model).map_err(failed)?;
    let mut el = Elab::new(blocks, sizes.clone());
    match el.model(&chosen, overrides) {
        Ok(mut compiled) => {
            compiled.param_places =
                el.param_spans.iter().map(|(name, &span)| (name.clone(), map.place(span))).collect();
            Ok(compiled)
        }
        Err(_) => Err(Failed { diagnostics: el.diags.into_vec(), needs: el.needs }),
    }
}

/// The blocks in scope, by name (ordered, so that hints list them the same on every run).
type Blocks = BTreeMap<String, Rc<ast::BlockDef>>;

/// The elaborator: walks a model, building the graph.
pub(crate) struct Elab {
    blocks: Blocks,
    pub(crate) graph: Graph,
    diags: Diagnostics,
    features: BTreeMap<String, FeatureNodes>,
    feature_decls: Vec<Feature>,
    labels: Vec<(String, Span)>,
    /// The declared kind of each label.
    label_kinds: BTreeMap<String, crate::tasks::TaskKind>,
    tasks: BTreeMap<String, (NodeId, Span)>,
    /// Tasks whose logit failed to compile (their errors are already reported).
    failed_tasks: Vec<String>,
    losses: Vec<NodeId>,
    /// Named losses (`loss name = e`) and where each was declared.
    loss_names: BTreeMap<String, Span>,
    /// Parameter name path (`deep/mlp/linear1`).
    scope: Vec<String>,
    /// How many times each scope path was entered (to make names unique).
    scope_uses: HashMap<String, usize>,
    group: Option<String>,
    per: Option<PerCtx>,
    depth: usize,
    /// The call in the model's body whose block is being inlined (none at the model's level).
    model_call: Option<Span>,
    /// Where each parameter was made ([`Compiled::param_places`]).
    param_spans: BTreeMap<String, Span>,
    in_model: bool,
    dropout_streams: u64,
    /// The id spaces `sample_ids` draws from ([`Compiled::vocabularies`]).
    pub(crate) vocabularies: BTreeSet<String>,
    /// The bins `frequency_bin` reads ([`Compiled::frequency_bins`]).
    pub(crate) frequency_bins: BTreeSet<(String, usize)>,
    budget: budget::Budget,
    /// The data's sizes that are bound.
    sizes: Sizes,
    /// The unbound sizes a statement needed as numbers (see [`Failed::needs`]).
    needs: BTreeSet<String>,
}

/// The result of every fallible step: its error says a diagnostic was recorded.
pub(crate) type R<T> = Result<T, Reported>;

impl Elab {
    fn new(blocks: Blocks, sizes: Sizes) -> Elab {
        Elab {
            blocks,
            graph: Graph::new(),
            diags: Diagnostics::new(),
            features: BTreeMap::new(),
            feature_decls: Vec::new(),
            labels: Vec::new(),
            label_kinds: BTreeMap::new(),
            tasks: BTreeMap::new(),
            failed_tasks: Vec::new(),
            losses: Vec::new(),
            loss_names: BTreeMap::new(),
            scope: Vec::new(),
            scope_uses: HashMap::new(),
            group: None,
            per: None,
            depth: 0,
            model_call: None,
            param_spans: BTreeMap::new(),
            in_model: false,
            dropout_streams: 0,
            vocabularies: BTreeSet::new(),
            frequency_bins: BTreeSet::new(),
            budget: budget::Budget::default(),
            sizes,
            needs: BTreeSet::new(),
        }
    }

    /// Records a diagnostic; the token it returns is the caller's error.
    pub(crate) fn report(&mut self, d: Diagnostic) -> Reported {
        self.diags.report(d)
    }

    /// Reports an error at `span`.
    pub(crate) fn error<T>(&mut self, span: Span, msg: impl Into<String>) -> R<T> {
        Err(self.report(Diagnostic::error(span, msg)))
    }

    /// A fresh random stream for the next random op (`dropout`, `bernoulli`, `permutation`,
    /// `sample_ids`), so that each has its own draws.
    pub(crate) fn next_dropout_stream(&mut self) -> u64 {
        self.dropout_streams += 1;
        self.dropout_streams
    }
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
