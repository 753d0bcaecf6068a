//! Per-domain grouping: `per g { ... }` blocks, inside which parameters get a leading
//! axis with one entry per domain, and the rules by which such grouped values meet
//! per-sample ones (materialised by a gather over the domain ids, or kept grouped).

use super::stmt::Flow;
use super::value::{Env, Tv, Val};
use super::{Elab, FeatureKind, R};
use crate::diag::Span;
use crate::syntax::ast::{self, Expr, Stmt};
use mdl_runtime::ops::Op;
use mdl_runtime::{Dim, NodeId};

/// Per-domain context while elaborating `per g { ... }`.
#[derive(Clone)]
pub(super) struct PerCtx {
    /// The domain ids `[B]`.
    pub(super) idx: NodeId,
    /// The number of domains.
    pub(super) groups: Dim,
}

impl Elab {
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

    /// [`Elab::materialise`] for a value: the tensors in it, lists included.
    pub(crate) fn materialise_val(&mut self, v: Val, span: Span) -> R<Val> {
        match v {
            Val::Tensor(t) => Ok(Val::Tensor(self.materialise(t, span)?)),
            Val::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items.iter().cloned() {
                    out.push(self.materialise_val(it, span)?);
                }
                Ok(Val::List(out.into()))
            }
            other => Ok(other),
        }
    }

    /// Brings two tensors to a common grouping: a grouped value meeting a per-sample one
    /// is materialised; meeting a shared (non-batch) one, it stays grouped.
    pub(super) fn align(&mut self, a: Tv, b: Tv, span: Span) -> R<(Tv, Tv, bool)> {
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

    /// Inside a `per` block: its domain ids `[B]` and the number of domains.
    pub(crate) fn per_domains(&self) -> Option<(NodeId, Dim)> {
        self.per.as_ref().map(|p| (p.idx, p.groups.clone()))
    }

    /// `per g { body; value }`: the body's parameters get one entry per domain of `g`;
    /// the value comes out per sample.
    pub(super) fn per_block(
        &mut self,
        env: &mut Env,
        group: &ast::Ident,
        body: &[Stmt],
        value: &Expr,
        span: Span,
    ) -> R<Val> {
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
        self.per = Some(PerCtx { idx, groups: self.count_dim(&fname, true) });
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
}
