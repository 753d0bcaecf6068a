//! Tensor operations as graph nodes: every op goes through the runtime's checked graph
//! builder, whose shape errors are reported at the span of the expression; elementwise
//! operators (with the rule that rejects an accidental sample-by-sample broadcast), matrix
//! products, and compile-time values used as tensors.

use super::value::{Tv, Val};
use super::{Elab, R};
use crate::diag::{Diagnostic, Span};
use mdl_runtime::ops::{BinaryOp, Op, UnaryOp};
use mdl_runtime::{Dim, NodeId};

impl Elab {
    /// Adds an op, reporting a shape error at `span`.
    pub(crate) fn add(&mut self, op: Op, inputs: &[NodeId], span: Span) -> R<NodeId> {
        let scope = self.scope_path();
        match self.graph.add(op, inputs, &scope) {
            Ok(id) => Ok(id),
            Err(e) => self.error(span, e.0),
        }
    }

    /// A constant scalar node.
    pub(crate) fn scalar(&mut self, v: f64, span: Span) -> R<NodeId> {
        self.add(Op::Scalar(v), &[], span)
    }

    /// The (symbolic) shape of a node.
    pub(crate) fn shape(&self, id: NodeId) -> &[Dim] {
        self.graph.shape(id)
    }

    /// The shape of a node as messages print it: `[B, 16]`.
    pub(crate) fn shape_str(&self, id: NodeId) -> String {
        mdl_runtime::ir::dim::shape_to_string(self.graph.shape(id))
    }

    /// An elementwise binary op with broadcasting, after aligning the operands' grouping.
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
            return Err(self.report(d));
        }
        Ok(Tv { node, grouped })
    }

    /// An elementwise unary op; the grouping is kept.
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

    /// A value used as a tensor: numbers and constant sizes become scalar nodes, numeric
    /// inputs their values; anything else is an error at `span`.
    pub(crate) fn expect_tensor(&mut self, v: Val, span: Span) -> R<Tv> {
        match v {
            Val::Tensor(t) => Ok(t),
            Val::Float(f) => Ok(Tv { node: self.scalar(f, span)?, grouped: false }),
            Val::Int(d) => match d.as_const() {
                Some(c) => Ok(Tv { node: self.scalar(c as f64, span)?, grouped: false }),
                None => Err(self.number_needed("a size used as a value", &d, span)),
            },
            Val::Feature(name) => self.feature_tensor(&name, span),
            Val::Ids { .. } => {
                let d = Diagnostic::error(span, "expected a tensor, found ids")
                    .label("ids made in the spec are not values")
                    .hint("look them up in a table: `E[ids]` with `let E = embedding(ids, dim)`");
                Err(self.report(d))
            }
            Val::Poison(reported) => Err(reported),
            other => self.error(span, format!("expected a tensor, found {}", other.kind())),
        }
    }
}
