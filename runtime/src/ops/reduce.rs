//! Reductions: Reduce (sum, mean, max, min over axes) and Softmax.

use super::emit::Emit;
use super::{shape_err, BinaryOp, Op, Operand, ReduceOp, ShapeError, Signature};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{strides, walk2, Float, Tensor, Value};

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    super::require_dense_real(op, x)?;
    let rank = x[0].shape.len();
    match op {
        Op::Reduce { axes, keep_dims, .. } => {
            if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= rank) {
                return shape_err(format!(
                    "reduce axes {axes:?} must be sorted, distinct and < {rank} for {}",
                    x[0].describe()
                ));
            }
            let mut out = Vec::new();
            for (i, d) in x[0].shape.iter().enumerate() {
                if !axes.contains(&i) {
                    out.push(d.clone());
                } else if *keep_dims {
                    out.push(Dim::lit(1));
                }
            }
            Ok(Signature::dense(out))
        }
        Op::Softmax { axis } => {
            if *axis >= rank {
                return shape_err(format!("softmax axis {axis} is out of range for {}", x[0].describe()));
            }
            Ok(Signature::dense(x[0].shape.to_vec()))
        }
        _ => shape_err(format!("{} is not a reduction", op.name())),
    }
}

/// `shape` with the reduced `axes` kept as size 1.
fn keep_dims_shape(shape: &[Dim], axes: &[usize]) -> Shape {
    shape.iter().enumerate().map(|(i, d)| if axes.contains(&i) { Dim::lit(1) } else { d.clone() }).collect()
}

/// Sum: the cotangent broadcast back; Mean: divided by the count; Max and Min: shared
/// equally by the elements equal to the result; Softmax: `y * (dy - sum(dy * y))`.
pub fn grad(graph: &mut Graph, node: &Node, y: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    let mut e = Emit::new(graph, node);
    let x = node.inputs[0];
    let xs = e.shape(x);
    let dx = match &node.op {
        Op::Reduce { op, axes, .. } => {
            let kept = keep_dims_shape(&xs, axes);
            let dy_kept = e.reshape(dy, &kept)?;
            match op {
                ReduceOp::Sum => e.broadcast(dy_kept, &xs)?,
                ReduceOp::Mean => {
                    let reduced: Shape = axes.iter().map(|&a| xs[a].clone()).collect();
                    let count = e.count(&reduced)?;
                    let share = e.div(dy_kept, count)?;
                    e.broadcast(share, &xs)?
                }
                ReduceOp::Max | ReduceOp::Min => {
                    let y_kept = e.reshape(y, &kept)?;
                    let is_max = e.binary(BinaryOp::Eq, x, y_kept)?;
                    let ties = e.reduce(ReduceOp::Sum, is_max, axes.clone(), true)?;
                    let share = e.div(dy_kept, ties)?;
                    e.mul(is_max, share)?
                }
            }
        }
        Op::Softmax { axis } => {
            let dy_y = e.mul(dy, y)?;
            let total = e.reduce(ReduceOp::Sum, dy_y, vec![*axis], true)?;
            let centered = e.sub(dy, total)?;
            e.mul(y, centered)?
        }
        _ => return shape_err(format!("{} is not a reduction", node.op.name())),
    };
    Ok(vec![Some(dx)])
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    let x = args[0].dense(&name)?;
    match op {
        Op::Reduce { op: kind, axes, .. } => {
            // Walk the input once; each element lands in the output slot whose strides
            // along the reduced axes are zero.
            let kept: Vec<usize> =
                x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            let mut into = strides(&kept);
            for &a in axes {
                into[a] = 0;
            }
            let n_out: usize = kept.iter().product();
            let init = match kind {
                ReduceOp::Sum | ReduceOp::Mean => T::ZERO,
                ReduceOp::Max => T::NEG_INFINITY,
                ReduceOp::Min => -T::NEG_INFINITY,
            };
            let mut acc = vec![init; n_out];
            let own = strides(&x.shape);
            match kind {
                ReduceOp::Sum | ReduceOp::Mean => walk2(&x.shape, &own, &into, |i, o| acc[o] += x.data[i]),
                ReduceOp::Max => walk2(&x.shape, &own, &into, |i, o| {
                    let v = x.data[i];
                    if v > acc[o] || v.is_nan() {
                        acc[o] = v;
                    }
                }),
                ReduceOp::Min => walk2(&x.shape, &own, &into, |i, o| {
                    let v = x.data[i];
                    if v < acc[o] || v.is_nan() {
                        acc[o] = v;
                    }
                }),
            }
            if *kind == ReduceOp::Mean {
                let count: usize = axes.iter().map(|&a| x.shape[a]).product();
                let count = T::from_usize(count);
                acc.iter_mut().for_each(|v| *v = *v / count);
            }
            Ok(Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: acc }))
        }
        Op::Softmax { axis } => {
            let size = x.shape[*axis];
            let outer: usize = x.shape[..*axis].iter().product();
            let inner: usize = x.shape[axis + 1..].iter().product();
            let mut data = x.data.clone();
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| o * size * inner + k * inner + i;
                    let mut max = T::NEG_INFINITY;
                    for k in 0..size {
                        max = max.max(data[at(k)]);
                    }
                    let mut total = T::ZERO;
                    for k in 0..size {
                        let e = (data[at(k)] - max).exp();
                        data[at(k)] = e;
                        total += e;
                    }
                    for k in 0..size {
                        data[at(k)] = data[at(k)] / total;
                    }
                }
            }
            Ok(Value::Dense(Tensor { shape: x.shape.clone(), data }))
        }
        _ => Err(ExecError::BadOperand { op: name, message: "not a reduction".into() }),
    }
}
