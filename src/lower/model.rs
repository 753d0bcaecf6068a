//! The model: its hyperparameters (defaults and experiment overrides), labels, tasks
//! and losses, and the assembled [`Compiled`] with its `loss` and `logit/<task>` outputs.

use super::stmt::Flow;
use super::value::{Env, Val};
use super::{label_input, logit_output, Compiled, Elab, Hyper, R};
use crate::diag::{suggest, Diagnostic, Span};
use crate::syntax::ast::{self, Expr};
use crate::tasks::TaskKind;
use mdl_runtime::ops::{BinaryOp, Op};
use mdl_runtime::{DType, Dim, NodeId};
use std::collections::BTreeMap;

impl Elab {
    /// Elaborates the model with its hyperparameters (`overrides` replace defaults).
    pub(super) fn model(&mut self, m: &ast::ModelDef, overrides: &BTreeMap<String, Hyper>) -> R<Compiled> {
        self.in_model = true;
        let mut env = Env::new();
        let mut hyper = BTreeMap::new();
        for name in overrides.keys() {
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
            let v = v.unwrap_or_else(Val::Poison);
            if let Some(h) = val_to_hyper(&v) {
                hyper.insert(p.name.name.clone(), h);
            } else if !matches!(v, Val::Poison(_)) {
                self.report(Diagnostic::error(
                    p.name.span,
                    format!("a hyperparameter must be a number, string, boolean or list, not {}", v.kind()),
                ));
            }
            env.define(&p.name.name, v);
        }
        let flow = self.stmts(&mut env, &m.body);
        if let Ok(Flow::Return(_)) = flow {
            self.report(Diagnostic::error(m.name.span, "a model cannot `return`; declare `task`s and a `loss`"));
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
        self.diags.check()?;
        let mut total = self.losses[0];
        for &l in &self.losses.clone()[1..] {
            total = self.add(Op::Binary(BinaryOp::Add), &[total, l], m.name.span)?;
        }
        self.graph.outputs.insert("loss".into(), total);
        for (name, (node, _)) in &self.tasks {
            self.graph.outputs.insert(logit_output(name), *node);
        }
        Ok(Compiled {
            model: m.name.name.clone(),
            graph: std::mem::take(&mut self.graph),
            features: self.feature_decls.clone(),
            tasks: labels.iter().map(|(n, _)| n.clone()).collect(),
            task_kinds: labels.iter().map(|(n, _)| self.label_kinds[n].clone()).collect(),
            hyper,
            vocabularies: std::mem::take(&mut self.vocabularies),
            frequency_bins: std::mem::take(&mut self.frequency_bins),
            param_places: BTreeMap::new(),
        })
    }

    /// `label a, b : kind`: each name gets its kind and, unless it is a `candidates` task,
    /// its `label/<name>` input `[B]`.
    pub(super) fn declare_labels(&mut self, env: &mut Env, names: &[ast::Ident], kind: Option<&Expr>) -> R<()> {
        let kind = match kind {
            Some(k) => self.task_kind(env, k)?,
            None => TaskKind::Binary,
        };
        for n in names {
            if self.labels.iter().any(|(l, _)| l == &n.name) {
                return self.error(n.span, format!("label `{}` is declared twice", n.name));
            }
            if kind.label_values().is_some() {
                self.graph.input(&label_input(&n.name), vec![Dim::batch()], DType::F);
            }
            self.labels.push((n.name.clone(), n.span));
            self.label_kinds.insert(n.name.clone(), kind.clone());
        }
        Ok(())
    }

    /// The kind after a label's `:`: `binary`, `regression(log = false)`, `classes(n, top = [])`
    /// or `candidates(top = [10])`, its arguments compile-time values.
    fn task_kind(&mut self, env: &mut Env, e: &Expr) -> R<TaskKind> {
        const KINDS: [&str; 4] = ["binary", "regression", "classes", "candidates"];
        let (name, args) = match &e.kind {
            ast::ExprKind::Var(name) => (ast::Ident { name: name.clone(), span: e.span }, &[][..]),
            ast::ExprKind::Call { callee, args } => (callee.clone(), &args[..]),
            _ => {
                let d = Diagnostic::error(e.span, "expected a task kind after `:`")
                    .hint(format!("one of: {}", KINDS.join(", ")));
                return Err(self.report(d));
            }
        };
        let params: Vec<(String, Option<Val>)> = match name.name.as_str() {
            "binary" => vec![],
            "regression" => vec![("log".into(), Some(Val::Bool(false)))],
            "classes" => vec![("n".into(), None), ("top".into(), Some(Val::List(Vec::new().into())))],
            "candidates" => vec![("top".into(), Some(Val::List([Val::int(10)].into())))],
            other => {
                let mut d = Diagnostic::error(name.span, format!("unknown task kind `{other}`"))
                    .label(format!("expected one of: {}", KINDS.join(", ")));
                if let Some(s) = suggest(other, KINDS) {
                    d = d.hint(format!("did you mean `{s}`?"));
                }
                return Err(self.report(d));
            }
        };
        let mut pos = Vec::new();
        let mut named = Vec::new();
        for a in args {
            let v = self.expr(env, &a.value)?;
            match &a.name {
                Some(n) => named.push((n.clone(), v, a.value.span)),
                None => pos.push((v, a.value.span)),
            }
        }
        let bound = self.bind_args(&name.name, params, pos, named, e.span, None)?;
        let arg = |n: &str| bound.iter().find(|(p, _, _)| p == n).map(|(_, v, s)| (v.clone(), *s));
        let top = match arg("top") {
            None => Vec::new(),
            Some((Val::List(items), s)) => {
                let mut top = Vec::new();
                for item in items.iter() {
                    match const_int(item) {
                        Some(k) if k > 0 => top.push(k as usize),
                        _ => {
                            return self
                                .error(s, "`top` must be a list of positive integers (the k of HR@k and NDCG@k)")
                        }
                    }
                }
                top
            }
            Some((other, s)) => {
                return self.error(s, format!("`top` must be a list of positive integers, found {}", other.kind()))
            }
        };
        Ok(match name.name.as_str() {
            "binary" => TaskKind::Binary,
            "regression" => match arg("log") {
                Some((Val::Bool(log), _)) => TaskKind::Regression { log },
                Some((other, s)) => {
                    return self.error(s, format!("`log` must be true or false, found {}", other.kind()))
                }
                None => TaskKind::Regression { log: false },
            },
            "classes" => {
                let Some((n, s)) = arg("n") else { return self.error(e.span, "`classes` needs its number of classes") };
                match const_int(&n) {
                    Some(n) if n >= 2 => TaskKind::Classes { n: n as usize, top },
                    _ => {
                        return self.error(
                            s,
                            format!(
                                "the number of classes must be a constant integer of at least 2, found {}",
                                n.kind()
                            ),
                        )
                    }
                }
            }
            _ => TaskKind::Candidates { top },
        })
    }

    /// `task name = logit`; a task that fails is remembered, so that later uses of it
    /// and its label stay quiet.
    pub(super) fn task(&mut self, env: &mut Env, name: &ast::Ident, value: &Expr, span: Span) -> R<()> {
        if let Err(reported) = self.task_logit_of(env, name, value, span) {
            env.define(&name.name, Val::Poison(reported));
            self.failed_tasks.push(name.name.clone());
            return Err(reported);
        }
        Ok(())
    }

    /// `loss value` (or `loss name = value`): a scalar, added to the model's total loss; a
    /// named one is also the output `loss/<name>`.
    pub(super) fn loss(&mut self, env: &mut Env, name: Option<&ast::Ident>, value: &Expr) -> R<()> {
        if let Some(n) = name {
            if let Some(first) = self.loss_names.get(&n.name) {
                let d = Diagnostic::error(n.span, format!("loss `{}` is declared twice", n.name))
                    .note(*first, "first declared here")
                    .hint("give each loss its own name");
                return Err(self.report(d));
            }
        }
        let v = self.expr(env, value)?;
        let t = self.expect_tensor(v, value.span)?;
        if !self.shape(t.node).is_empty() {
            let d = Diagnostic::error(
                value.span,
                format!("a loss must be a scalar, found a tensor {}", self.shape_str(t.node)),
            )
            .hint("reduce it, e.g. `mean(...)`");
            return Err(self.report(d));
        }
        self.losses.push(t.node);
        if let Some(n) = name {
            self.loss_names.insert(n.name.clone(), n.span);
            self.graph.outputs.insert(super::loss_output(&n.name), t.node);
        }
        Ok(())
    }

    /// The declared kind of a label.
    pub(crate) fn task_kind_of(&self, name: &str) -> Option<TaskKind> {
        self.label_kinds.get(name).cloned()
    }

    /// The logit `[B]` of a task defined so far.
    pub(crate) fn task_logit(&self, name: &str) -> Option<NodeId> {
        self.tasks.get(name).map(|t| t.0)
    }

    /// Checks a task's logit (`[B]` or `[B, 1]`) and makes it the task's output.
    fn task_logit_of(&mut self, env: &mut Env, name: &ast::Ident, value: &Expr, span: Span) -> R<()> {
        if !self.labels.iter().any(|(l, _)| l == &name.name) {
            let names: Vec<String> = self.labels.iter().map(|(l, _)| l.clone()).collect();
            let mut d = Diagnostic::error(name.span, format!("task `{}` has no label", name.name))
                .label("declare it with `label` first");
            if let Some(s) = suggest(&name.name, names.iter().map(|s| s.as_str())) {
                d = d.hint(format!("did you mean `{s}`?"));
            }
            return Err(self.report(d));
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
        if !ok && self.label_kinds[&name.name].scalar_output() {
            return self.error(
                value.span,
                format!("the logit of task `{}` must be [B] or [B, 1], found {}", name.name, self.shape_str(t.node)),
            );
        }
        let kind = self.label_kinds[&name.name].clone();
        let ok = match &kind {
            TaskKind::Binary | TaskKind::Regression { .. } => ok,
            TaskKind::Classes { n, .. } => shape.len() == 2 && shape[0] == b && shape[1] == Dim::lit(*n as i64),
            TaskKind::Candidates { .. } => shape.len() == 2 && shape[0] == b,
        };
        if !ok {
            let want = match &kind {
                TaskKind::Classes { n, .. } => format!("[B, {n}] (one logit per class)"),
                _ => "[B, N] (one score per candidate, the positive first)".to_string(),
            };
            return self.error(
                value.span,
                format!(
                    "the logit of the {} task `{}` must be {want}, found {}",
                    kind.describe(),
                    name.name,
                    self.shape_str(t.node)
                ),
            );
        }
        let node = if shape.len() == 2 && kind.scalar_output() {
            self.add(Op::Reshape { shape: vec![b] }, &[t.node], span)?
        } else {
            t.node
        };
        self.tasks.insert(name.name.clone(), (node, span));
        env.define(&name.name, Val::Task(name.name.clone()));
        Ok(())
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

/// A compile-time integer's value, if it is known (not a symbolic size).
fn const_int(v: &Val) -> Option<i64> {
    match v {
        Val::Int(d) => d.as_const(),
        _ => None,
    }
}
