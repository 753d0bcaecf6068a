//! Elementwise ops: Unary and Binary (with numpy-style broadcasting).

use super::emit::Emit;
use super::{shape_err, BinaryOp, Op, Operand, ShapeError, Signature, UnaryOp};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{shape_to_string, Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{broadcast_strides, walk2, Float, Tensor, Value};

/// The broadcast of two shapes: axes aligned from the right, equal or one of them 1.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Shape, ShapeError> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { Some(&a[i + a.len() - n]) } else { None };
        let db = if i + b.len() >= n { Some(&b[i + b.len() - n]) } else { None };
        out.push(match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            (Some(x), Some(y)) if y.is_one() => x.clone(),
            (Some(x), Some(y)) => {
                return shape_err(format!(
                    "shapes {} and {} do not broadcast: axis {} is {x} vs {y}",
                    shape_to_string(a),
                    shape_to_string(b),
                    i as isize - n as isize
                ))
            }
            (None, None) => unreachable!("n is the longer rank"),
        });
    }
    Ok(out)
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    match op {
        Op::Unary(_) => Ok(Signature::dense(x[0].shape.to_vec())),
        Op::Binary(_) => Ok(Signature::dense(broadcast_shapes(x[0].shape, x[1].shape)?)),
        _ => shape_err(format!("{} is not elementwise", op.name())),
    }
}

/// `x` is the operand, `y` this node's output (reused where the derivative is a function
/// of it), `dy` the output's cotangent. Binary cotangents are summed back over broadcast axes.
pub fn grad(graph: &mut Graph, node: &Node, y: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    let mut e = Emit::new(graph, node);
    match &node.op {
        Op::Unary(u) => {
            let x = node.inputs[0];
            let dx = match u {
                UnaryOp::Neg => e.neg(dy)?,
                UnaryOp::Exp => e.mul(y, dy)?,
                UnaryOp::Log => e.div(dy, x)?,
                UnaryOp::Sqrt => {
                    let two_y = e.add(y, y)?;
                    e.div(dy, two_y)?
                }
                UnaryOp::Recip => {
                    let y2 = e.mul(y, y)?;
                    let t = e.mul(y2, dy)?;
                    e.neg(t)?
                }
                UnaryOp::Relu => {
                    let step = e.unary(UnaryOp::Step, x)?;
                    e.mul(step, dy)?
                }
                UnaryOp::Sigmoid => {
                    let one_minus_y = e.rsub(1.0, y)?;
                    let slope = e.mul(y, one_minus_y)?;
                    e.mul(slope, dy)?
                }
                UnaryOp::Tanh => {
                    let y2 = e.mul(y, y)?;
                    let slope = e.rsub(1.0, y2)?;
                    e.mul(slope, dy)?
                }
                UnaryOp::Softplus => {
                    let s = e.unary(UnaryOp::Sigmoid, x)?;
                    e.mul(s, dy)?
                }
                UnaryOp::Abs => {
                    let s = e.unary(UnaryOp::Sign, x)?;
                    e.mul(s, dy)?
                }
                UnaryOp::Step | UnaryOp::Sign => return Ok(vec![None]),
            };
            Ok(vec![Some(dx)])
        }
        Op::Binary(b) => {
            let (a, bb) = (node.inputs[0], node.inputs[1]);
            let (da, db) = match b {
                BinaryOp::Add => (dy, dy),
                BinaryOp::Sub => (dy, e.neg(dy)?),
                BinaryOp::Mul => (e.mul(dy, bb)?, e.mul(dy, a)?),
                BinaryOp::Div => {
                    // d(a/b)/db = -a/b² = -y/b
                    let dy_y = e.mul(dy, y)?;
                    let q = e.div(dy_y, bb)?;
                    (e.div(dy, bb)?, e.neg(q)?)
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // The operand equal to the result takes the cotangent (`a` on ties).
                    let a_won = e.binary(BinaryOp::Eq, y, a)?;
                    let da = e.mul(a_won, dy)?;
                    (da, e.sub(dy, da)?)
                }
                BinaryOp::Gt | BinaryOp::Eq => return Ok(vec![None, None]),
            };
            let (sa, sb) = (e.shape(a), e.shape(bb));
            Ok(vec![Some(e.unbroadcast(da, &sa)?), Some(e.unbroadcast(db, &sb)?)])
        }
        _ => shape_err(format!("{} is not elementwise", node.op.name())),
    }
}

/// The forward function of a unary op.
fn unary_fn<T: Float>(u: UnaryOp) -> fn(T) -> T {
    match u {
        UnaryOp::Neg => |x| -x,
        UnaryOp::Exp => |x| x.exp(),
        UnaryOp::Log => |x| x.ln(),
        UnaryOp::Sqrt => |x| x.sqrt(),
        UnaryOp::Recip => |x| T::ONE / x,
        UnaryOp::Relu => |x| if x > T::ZERO { x } else { T::ZERO },
        UnaryOp::Sigmoid => |x| {
            if x >= T::ZERO {
                T::ONE / (T::ONE + (-x).exp())
            } else {
                let e = x.exp();
                e / (T::ONE + e)
            }
        },
        UnaryOp::Tanh => |x| x.tanh(),
        UnaryOp::Softplus => |x| x.max(T::ZERO) + (-x.abs()).exp().ln_1p(),
        UnaryOp::Abs => |x| x.abs(),
        UnaryOp::Step => |x| if x > T::ZERO { T::ONE } else { T::ZERO },
        UnaryOp::Sign => |x| {
            if x > T::ZERO {
                T::ONE
            } else if x < T::ZERO {
                -T::ONE
            } else {
                T::ZERO
            }
        },
    }
}

/// The forward function of a binary op.
fn binary_fn<T: Float>(b: BinaryOp) -> fn(T, T) -> T {
    fn indicator<T: Float>(c: bool) -> T {
        if c {
            T::ONE
        } else {
            T::ZERO
        }
    }
    match b {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
        BinaryOp::Max => |a, b| a.max(b),
        BinaryOp::Min => |a, b| a.min(b),
        BinaryOp::Gt => |a, b| indicator(a > b),
        BinaryOp::Eq => |a, b| indicator(a == b),
    }
}

/// A unary op on one element: the scalar semantics every backend must reproduce (the
/// fused kernels' eval rule calls it, so fused and unfused graphs cannot drift apart).
pub fn apply_unary<T: Float>(op: UnaryOp, x: T) -> T {
    unary_fn::<T>(op)(x)
}

/// A binary op on one pair of elements (see [`apply_unary`]).
pub fn apply_binary<T: Float>(op: BinaryOp, a: T, b: T) -> T {
    binary_fn::<T>(op)(a, b)
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    match op {
        Op::Unary(u) => {
            let x = args[0].dense(&name)?;
            let f = unary_fn::<T>(*u);
            Ok(Value::Dense(Tensor { shape: x.shape.clone(), data: x.data.iter().map(|&v| f(v)).collect() }))
        }
        Op::Binary(b) => {
            let (a, bb) = (args[0].dense(&name)?, args[1].dense(&name)?);
            let f = binary_fn::<T>(*b);
            let data = if a.shape == bb.shape {
                a.data.iter().zip(&bb.data).map(|(&x, &y)| f(x, y)).collect()
            } else {
                let out = cx.out_shape;
                let mut data = Vec::with_capacity(out.iter().product());
                let (sa, sb) = (broadcast_strides(&a.shape, out), broadcast_strides(&bb.shape, out));
                walk2(out, &sa, &sb, |i, j| data.push(f(a.data[i], bb.data[j])));
                data
            };
            Ok(Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data }))
        }
        _ => Err(ExecError::BadOperand { op: name, message: "not an elementwise op".into() }),
    }
}
