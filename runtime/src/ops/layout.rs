//! Layout ops: Reshape, Permute, Broadcast, Concat, Slice, Pad.
//!
//! All but Pad also move ids (so id tensors can be flattened and joined, as the gradient of
//! Gather needs); they carry no gradient for ids.

use super::elementwise::broadcast_shapes;
use super::emit::Emit;
use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{numel, shape_to_string, Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{broadcast_strides, gather_strided, strides, Float, Tensor, Value};

fn check_axis(axis: usize, rank: usize, what: &str) -> Result<(), ShapeError> {
    if axis >= rank {
        return shape_err(format!("{what}: axis {axis} is out of range for a rank-{rank} value"));
    }
    Ok(())
}

/// Layout ops move reals or ids; the result has the operands' element type.
fn check_operands(op: &Op, x: &[Operand]) -> Result<DType, ShapeError> {
    let dtype = x[0].dtype;
    for o in x {
        if o.kind != ValueKind::Dense {
            return shape_err(format!("{} cannot read a row-sparse gradient", op.name()));
        }
        if o.dtype != dtype {
            return shape_err(format!("{} cannot mix ids and real values", op.name()));
        }
    }
    if dtype == DType::I && matches!(op, Op::Pad { .. }) {
        return shape_err("pad needs real-valued operands, got ids");
    }
    Ok(dtype)
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    let dtype = check_operands(op, x)?;
    let sig = |shape: Shape| Ok(Signature { shape, dtype, kind: ValueKind::Dense });
    match op {
        Op::Reshape { shape } => {
            let (from, to) = (numel(x[0].shape), numel(shape));
            if from != to {
                return shape_err(format!(
                    "cannot reshape {} ({from} elements) to {} ({to} elements)",
                    x[0].describe(),
                    shape_to_string(shape)
                ));
            }
            sig(shape.clone())
        }
        Op::Permute { perm } => {
            let rank = x[0].shape.len();
            let mut seen = vec![false; rank];
            if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
                return shape_err(format!("{perm:?} is not a permutation of the {rank} axes of {}", x[0].describe()));
            }
            sig(perm.iter().map(|&p| x[0].shape[p].clone()).collect())
        }
        Op::Broadcast { shape } => {
            let b = broadcast_shapes(x[0].shape, shape)?;
            if &b != shape {
                return shape_err(format!("cannot broadcast {} to {}", x[0].describe(), shape_to_string(shape)));
            }
            sig(b)
        }
        Op::Concat { axis } => {
            let first = x[0].shape;
            check_axis(*axis, first.len(), "concat")?;
            let mut total = Dim::lit(0);
            for o in x {
                if o.shape.len() != first.len()
                    || o.shape.iter().zip(first).enumerate().any(|(i, (a, b))| i != *axis && a != b)
                {
                    return shape_err(format!(
                        "cannot concatenate {} and {} along axis {axis}: the other axes differ",
                        x[0].describe(),
                        o.describe()
                    ));
                }
                total = &total + &o.shape[*axis];
            }
            let mut out = first.to_vec();
            out[*axis] = total;
            sig(out)
        }
        Op::Slice { axis, start, len } => {
            check_axis(*axis, x[0].shape.len(), "slice")?;
            let size = &x[0].shape[*axis];
            let rest = &(size - start) - len;
            let negative = |d: &Dim| d.as_const().is_some_and(|c| c < 0);
            if negative(start) || negative(len) || negative(&rest) {
                return shape_err(format!("slice {start}..{start}+{len} is outside axis {axis} of size {size}"));
            }
            let mut out = x[0].shape.to_vec();
            out[*axis] = len.clone();
            sig(out)
        }
        Op::Pad { axis, before, after } => {
            check_axis(*axis, x[0].shape.len(), "pad")?;
            let mut out = x[0].shape.to_vec();
            out[*axis] = &(&out[*axis] + before) + after;
            sig(out)
        }
        _ => shape_err(format!("{} is not a layout op", op.name())),
    }
}

/// Each layout op's adjoint is another layout op (Slice ↔ Pad, Concat → Slices,
/// Permute → the inverse permutation, Broadcast → a sum back to the operand's shape).
pub fn grad(graph: &mut Graph, node: &Node, _y: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    if graph.sig(node.inputs[0]).dtype == DType::I {
        return Ok(vec![None; node.inputs.len()]);
    }
    let mut e = Emit::new(graph, node);
    let x = node.inputs[0];
    let xs = e.shape(x);
    let dx = match &node.op {
        Op::Reshape { .. } => e.reshape(dy, &xs)?,
        Op::Permute { perm } => {
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            e.permute(dy, inverse)?
        }
        Op::Broadcast { .. } => e.unbroadcast(dy, &xs)?,
        Op::Concat { axis } => {
            let mut start = Dim::lit(0);
            let mut parts = Vec::with_capacity(node.inputs.len());
            for &xi in &node.inputs {
                let len = e.graph.dim(xi, *axis);
                parts.push(Some(e.op(Op::Slice { axis: *axis, start: start.clone(), len: len.clone() }, &[dy])?));
                start = &start + &len;
            }
            return Ok(parts);
        }
        Op::Slice { axis, start, len } => {
            let after = &(&xs[*axis] - start) - len;
            e.op(Op::Pad { axis: *axis, before: start.clone(), after }, &[dy])?
        }
        Op::Pad { axis, before, .. } => {
            e.op(Op::Slice { axis: *axis, start: before.clone(), len: xs[*axis].clone() }, &[dy])?
        }
        _ => return shape_err(format!("{} is not a layout op", node.op.name())),
    };
    Ok(vec![Some(dx)])
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    if let Ok(first) = args[0].ids(&name) {
        let mut xs = vec![first];
        for a in &args[1..] {
            xs.push(a.ids(&name)?);
        }
        return Ok(Value::Ids(move_elements(op, &xs, cx, 0)?));
    }
    let xs = args.iter().map(|a| a.dense(&name)).collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Dense(move_elements(op, &xs, cx, T::ZERO)?))
}

/// `(outer, inner)`: the element counts before and after `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

/// The layout ops on either element type (`zero` fills Pad).
fn move_elements<E: Copy>(op: &Op, xs: &[&Tensor<E>], cx: &EvalCx, zero: E) -> Result<Tensor<E>, ExecError> {
    let out = cx.out_shape;
    let x = xs[0];
    let bad = |message: String| ExecError::BadOperand { op: op.name(), message };
    let data = match op {
        Op::Reshape { .. } => x.data.clone(),
        Op::Permute { perm } => {
            let own = strides(&x.shape);
            let permuted: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
            gather_strided(&x.data, out, &permuted, 0)
        }
        Op::Broadcast { .. } => gather_strided(&x.data, out, &broadcast_strides(&x.shape, out), 0),
        Op::Concat { axis } => {
            let (outer, inner) = around(out, *axis);
            let mut data = Vec::with_capacity(out.iter().product());
            for o in 0..outer {
                for xi in xs {
                    let chunk = xi.shape[*axis] * inner;
                    data.extend_from_slice(&xi.data[o * chunk..(o + 1) * chunk]);
                }
            }
            data
        }
        Op::Slice { axis, start, .. } => {
            let (start, len, size) = (cx.size(start)?, out[*axis], x.shape[*axis]);
            if start + len > size {
                return Err(bad(format!("slice {start}..{} is outside an axis of size {size}", start + len)));
            }
            let (outer, inner) = around(&x.shape, *axis);
            let mut data = Vec::with_capacity(out.iter().product());
            for o in 0..outer {
                let base = (o * size + start) * inner;
                data.extend_from_slice(&x.data[base..base + len * inner]);
            }
            data
        }
        Op::Pad { axis, before, after } => {
            let (before, after, size) = (cx.size(before)?, cx.size(after)?, x.shape[*axis]);
            let (outer, inner) = around(&x.shape, *axis);
            let mut data = Vec::with_capacity(out.iter().product());
            for o in 0..outer {
                data.extend(std::iter::repeat_n(zero, before * inner));
                data.extend_from_slice(&x.data[o * size * inner..(o + 1) * size * inner]);
                data.extend(std::iter::repeat_n(zero, after * inner));
            }
            data
        }
        _ => return Err(bad("not a layout op".into())),
    };
    Tensor::new(out.to_vec(), data).ok_or_else(|| bad(format!("the result does not have the shape {out:?}")))
}
