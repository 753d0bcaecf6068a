//! The small vocabulary the gradient rules are written in: [`Emit`] adds checked IR nodes
//! to a graph, tagged with the scope of the forward node they differentiate, and skips
//! no-op reshapes and broadcasts. [`Emit::unbroadcast`] sums a cotangent back to the
//! shape of an operand that was broadcast.

use super::{BinaryOp, Op, ReduceOp, ShapeError, UnaryOp};
use crate::ir::dim::{Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};

pub struct Emit<'g> {
    pub graph: &'g mut Graph,
    scope: String,
}

impl<'g> Emit<'g> {
    /// An emitter for the gradient of `node`.
    pub fn new(graph: &'g mut Graph, node: &Node) -> Emit<'g> {
        Emit { graph, scope: format!("grad:{}", node.scope) }
    }

    pub fn shape(&self, id: NodeId) -> Shape {
        self.graph.shape(id).clone()
    }

    pub fn op(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, ShapeError> {
        self.graph.add(op, inputs, &self.scope)
    }

    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> Result<NodeId, ShapeError> {
        self.op(Op::Unary(u), &[x])
    }

    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> Result<NodeId, ShapeError> {
        self.op(Op::Binary(b), &[x, y])
    }

    pub fn add(&mut self, x: NodeId, y: NodeId) -> Result<NodeId, ShapeError> {
        self.binary(BinaryOp::Add, x, y)
    }

    pub fn sub(&mut self, x: NodeId, y: NodeId) -> Result<NodeId, ShapeError> {
        self.binary(BinaryOp::Sub, x, y)
    }

    pub fn mul(&mut self, x: NodeId, y: NodeId) -> Result<NodeId, ShapeError> {
        self.binary(BinaryOp::Mul, x, y)
    }

    pub fn div(&mut self, x: NodeId, y: NodeId) -> Result<NodeId, ShapeError> {
        self.binary(BinaryOp::Div, x, y)
    }

    pub fn neg(&mut self, x: NodeId) -> Result<NodeId, ShapeError> {
        self.unary(UnaryOp::Neg, x)
    }

    pub fn scalar(&mut self, v: f64) -> Result<NodeId, ShapeError> {
        self.op(Op::Scalar(v), &[])
    }

    /// `c - x` for a constant `c`.
    pub fn rsub(&mut self, c: f64, x: NodeId) -> Result<NodeId, ShapeError> {
        let c = self.scalar(c)?;
        self.sub(c, x)
    }

    /// `x` reshaped to `shape` (no node when it already has that shape).
    pub fn reshape(&mut self, x: NodeId, shape: &[Dim]) -> Result<NodeId, ShapeError> {
        if self.graph.shape(x).as_slice() == shape {
            return Ok(x);
        }
        self.op(Op::Reshape { shape: shape.to_vec() }, &[x])
    }

    /// `x` broadcast to `shape` (no node when it already has that shape).
    pub fn broadcast(&mut self, x: NodeId, shape: &[Dim]) -> Result<NodeId, ShapeError> {
        if self.graph.shape(x).as_slice() == shape {
            return Ok(x);
        }
        self.op(Op::Broadcast { shape: shape.to_vec() }, &[x])
    }

    pub fn permute(&mut self, x: NodeId, perm: Vec<usize>) -> Result<NodeId, ShapeError> {
        self.op(Op::Permute { perm }, &[x])
    }

    /// `x` with its last two axes swapped.
    pub fn transpose(&mut self, x: NodeId) -> Result<NodeId, ShapeError> {
        let rank = self.graph.shape(x).len();
        let mut perm: Vec<usize> = (0..rank).collect();
        if rank >= 2 {
            perm.swap(rank - 2, rank - 1);
        }
        self.permute(x, perm)
    }

    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: Vec<usize>, keep_dims: bool) -> Result<NodeId, ShapeError> {
        self.op(Op::Reduce { op, axes, keep_dims }, &[x])
    }

    pub fn matmul(&mut self, a: NodeId, b: NodeId, trans_a: bool, trans_b: bool) -> Result<NodeId, ShapeError> {
        self.op(Op::MatMul { trans_a, trans_b }, &[a, b])
    }

    /// The cotangent `ct` of a broadcast result summed back to `target`, the shape of the
    /// operand that was broadcast: leading axes the operand lacks and axes where it has
    /// size 1 are summed, then the result is reshaped to `target`.
    pub fn unbroadcast(&mut self, ct: NodeId, target: &[Dim]) -> Result<NodeId, ShapeError> {
        let shape = self.shape(ct);
        if shape.as_slice() == target {
            return Ok(ct);
        }
        let lead = shape.len().saturating_sub(target.len());
        let axes: Vec<usize> =
            (0..shape.len()).filter(|&i| i < lead || (target[i - lead].is_one() && !shape[i].is_one())).collect();
        let summed = if axes.is_empty() { ct } else { self.reduce(ReduceOp::Sum, ct, axes, true)? };
        self.reshape(summed, target)
    }

    /// The number of elements of `shape` as a scalar node: a constant when the shape is
    /// static, otherwise the sum of a broadcast one (so symbolic sizes such as the batch
    /// are counted at run time).
    pub fn count(&mut self, shape: &[Dim]) -> Result<NodeId, ShapeError> {
        let n = crate::ir::dim::numel(shape);
        if let Some(c) = n.as_const() {
            return self.scalar(c as f64);
        }
        let one = self.scalar(1.0)?;
        let ones = self.broadcast(one, shape)?;
        self.reduce(ReduceOp::Sum, ones, (0..shape.len()).collect(), false)
    }
}
