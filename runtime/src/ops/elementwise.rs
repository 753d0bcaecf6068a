//! Elementwise ops: Unary and Binary (with numpy-style broadcasting).
//!
//! This file is the one home of an elementwise op: its variant (declared once, which also
//! lists it in `ALL`), its scalar arithmetic ([`UnaryOp::apply`], [`BinaryOp::apply`]: the
//! eval rule, the fused kernels' eval rule, the jit's direct kernels and its exact-math
//! helpers all call it), its classes (exhaustive matches, so a new variant does not compile
//! until it is classified), and its shape, gradient and eval rules. Only the two code
//! generators (Cranelift in `backend/jit/codegen.rs`, OpenCL C in `backend/opencl/render.rs`)
//! write an op again, each as an exhaustive match.

use super::emit::Emit;
use super::{require_dense_real, shape_err, Op, Operand, ShapeError, Signature};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{shape_to_string, Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{broadcast_strides, walk2, Float, Tensor, Value};

/// Declares an elementwise op enum from one list of variants and derives from that list
/// `ALL` (every variant, in declaration order, so `ALL[op as usize] == op`) and
/// `specialise` (runs a loop given the op's `apply` as a closure of its own type, so the
/// loop is compiled, and vectorised, once per op instead of matching on the op per element).
macro_rules! elementwise_ops {
    (@apply $name:ident::$variant:ident, ($($arg:ident),+)) => {
        move |$($arg: T),+| $name::$variant.apply($($arg),+)
    };
    (
        $(#[$meta:meta])*
        pub enum $name:ident $params:tt specialised by $job:ident {
            $($(#[$vmeta:meta])* $variant:ident,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order (tests and passes iterate it).
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// `job` run with this op's scalar function ([`Self::apply`]) as its closure.
            pub fn specialise<T: Float, J: $job<T>>(self, job: J) -> J::Output {
                match self {
                    $($name::$variant => job.run(elementwise_ops!(@apply $name::$variant, $params)),)+
                }
            }
        }
    };
}

/// A loop over elements that takes a unary op's scalar function (see [`UnaryOp::specialise`]).
pub trait UnaryLoop<T> {
    type Output;
    fn run<F: Fn(T) -> T + Copy + Sync>(self, f: F) -> Self::Output;
}

/// A loop over elements that takes a binary op's scalar function (see [`BinaryOp::specialise`]).
pub trait BinaryLoop<T> {
    type Output;
    fn run<F: Fn(T, T) -> T + Copy + Sync>(self, f: F) -> Self::Output;
}

elementwise_ops! {
    /// A one-operand elementwise op.
    pub enum UnaryOp(x) specialised by UnaryLoop {
        Neg,
        Exp,
        Log,
        Sqrt,
        Recip,
        Relu,
        Sigmoid,
        Tanh,
        /// `log(1 + e^x)`, computed stably.
        Softplus,
        Abs,
        /// `1` where `x > 0`, else `0` (the derivative of relu; zero gradient).
        Step,
        /// `-1`, `0` or `1` (zero gradient).
        Sign,
        /// The largest integer `<= x` (zero gradient); ±inf, NaN and ±0 are kept.
        Floor,
        /// GELU in its tanh form, `x · σ(k · (x + 0.044715·x³))` with `k = 2·sqrt(2/π)`
        /// (`0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`), and `0` where the sigmoid is
        /// `0` (so `gelu(-inf) = 0`).
        Gelu,
    }
}

elementwise_ops! {
    /// A two-operand elementwise op (operands broadcast numpy-style).
    pub enum BinaryOp(a, b) specialised by BinaryLoop {
        Add,
        Sub,
        Mul,
        Div,
        Max,
        Min,
        /// `1` where `a > b`, else `0` (zero gradient).
        Gt,
        /// `1` where `a == b`, else `0` (zero gradient).
        Eq,
        /// `1` where `a >= b`, else `0` (zero gradient).
        Ge,
        /// `1` where `a != b` (NaN included), else `0` (zero gradient).
        Ne,
        /// PReLU: `a` where `a > 0`, else `b · a` (`b` is the slope; LeakyReLU is a constant
        /// slope). Differentiable in both.
        Prelu,
        /// `b` where `a != 0` (NaN included), else `-0`: half of `where(c, x, y)`, which is
        /// `keep(c, x) + keep(c == 0, y)` exactly (`v + -0 = v` for every `v`, ±0 too). The
        /// gradient flows to `b` only.
        Keep,
    }
}

impl UnaryOp {
    /// The op on one element: the scalar semantics every backend must reproduce.
    #[inline]
    pub fn apply<T: Float>(self, x: T) -> T {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Recip => T::ONE / x,
            UnaryOp::Relu => {
                if x > T::ZERO {
                    x
                } else {
                    T::ZERO
                }
            }
            UnaryOp::Sigmoid => {
                if x >= T::ZERO {
                    T::ONE / (T::ONE + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (T::ONE + e)
                }
            }
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Softplus => x.max(T::ZERO) + (-x.abs()).exp().ln_1p(),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Step => indicator(x > T::ZERO),
            UnaryOp::Sign => {
                if x > T::ZERO {
                    T::ONE
                } else if x < T::ZERO {
                    -T::ONE
                } else {
                    T::ZERO
                }
            }
            UnaryOp::Floor => x.floor(),
            UnaryOp::Gelu => {
                let s = UnaryOp::Sigmoid.apply(T::from_f64(GELU_K) * (x + T::from_f64(GELU_A) * (x * x * x)));
                if s == T::ZERO {
                    T::ZERO
                } else {
                    x * s
                }
            }
        }
    }

    /// Worth recomputing for every output element when its own value is smaller (the
    /// fusion pass lets such ops join a group across a broadcast): no transcendental, no
    /// division, no square root.
    pub fn is_cheap(self) -> bool {
        use UnaryOp::*;
        match self {
            Neg | Relu | Abs | Step | Sign | Floor => true,
            Exp | Log | Sqrt | Recip | Sigmoid | Tanh | Softplus | Gelu => false,
        }
    }

    /// Computed by a libm function, with no machine instruction: the jit computes it with an
    /// inline polynomial (or, exactly, through [`Self::apply`]), and the fusion pass fuses
    /// it even alone (SIMD polynomials and device builtins beat one element at a time).
    pub fn is_transcendental(self) -> bool {
        use UnaryOp::*;
        match self {
            Exp | Log | Tanh | Sigmoid | Softplus | Gelu => true,
            Neg | Sqrt | Recip | Relu | Abs | Step | Sign | Floor => false,
        }
    }

    /// Carries a gradient to its operand (`step`, `sign` and `floor` have derivative zero
    /// wherever they have one, and autodiff sends none through them).
    pub fn is_differentiable(self) -> bool {
        use UnaryOp::*;
        match self {
            Neg | Exp | Log | Sqrt | Recip | Relu | Sigmoid | Tanh | Softplus | Abs | Gelu => true,
            Step | Sign | Floor => false,
        }
    }
}

impl BinaryOp {
    /// The op on one pair of elements: the scalar semantics every backend must reproduce.
    #[inline]
    pub fn apply<T: Float>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Gt => indicator(a > b),
            BinaryOp::Eq => indicator(a == b),
            BinaryOp::Ge => indicator(a >= b),
            BinaryOp::Ne => indicator(a != b),
            BinaryOp::Prelu => {
                if a > T::ZERO {
                    a
                } else {
                    b * a
                }
            }
            BinaryOp::Keep => {
                if a != T::ZERO {
                    b
                } else {
                    -T::ZERO
                }
            }
        }
    }

    /// Worth recomputing for every output element (see [`UnaryOp::is_cheap`]).
    pub fn is_cheap(self) -> bool {
        use BinaryOp::*;
        match self {
            Add | Sub | Mul | Max | Min | Gt | Eq | Ge | Ne | Prelu | Keep => true,
            Div => false,
        }
    }

    /// Carries a gradient to its operands (the comparisons do not; `keep` to `b` only).
    pub fn is_differentiable(self) -> bool {
        use BinaryOp::*;
        match self {
            Add | Sub | Mul | Div | Max | Min | Prelu | Keep => true,
            Gt | Eq | Ge | Ne => false,
        }
    }
}

/// GELU's constants: `k = 2·sqrt(2/π)` and the cubic coefficient.
pub const GELU_K: f64 = 1.595_769_121_605_730_7;
pub const GELU_A: f64 = 0.044_715;

/// `1` when `c`, else `0`.
#[inline]
fn indicator<T: Float>(c: bool) -> T {
    if c {
        T::ONE
    } else {
        T::ZERO
    }
}

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
    require_dense_real(op, x)?;
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
                UnaryOp::Gelu => {
                    // d/dx x·σ(z) = σ(z) + x·σ(z)·(1 - σ(z))·z', z = k·(x + a·x³),
                    // z' = k + 3·a·k·x².
                    let x2 = e.mul(x, x)?;
                    let x3 = e.mul(x2, x)?;
                    let a = e.scalar(GELU_A)?;
                    let ax3 = e.mul(a, x3)?;
                    let inner = e.add(x, ax3)?;
                    let k = e.scalar(GELU_K)?;
                    let z = e.mul(k, inner)?;
                    let s = e.unary(UnaryOp::Sigmoid, z)?;
                    let one_minus_s = e.rsub(1.0, s)?;
                    let ds = e.mul(s, one_minus_s)?;
                    let c3 = e.scalar(3.0 * GELU_A * GELU_K)?;
                    let c3x2 = e.mul(c3, x2)?;
                    let dz = e.add(k, c3x2)?;
                    let xds = e.mul(x, ds)?;
                    let t = e.mul(xds, dz)?;
                    let slope = e.add(s, t)?;
                    e.mul(slope, dy)?
                }
                UnaryOp::Step | UnaryOp::Sign | UnaryOp::Floor => return Ok(vec![None]),
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
                BinaryOp::Prelu => {
                    // d/da = 1 where a > 0, else the slope; d/db = min(a, 0).
                    let step = e.unary(UnaryOp::Step, a)?;
                    let below = e.rsub(1.0, step)?;
                    let sloped = e.mul(below, bb)?;
                    let slope = e.add(step, sloped)?;
                    let zero = e.scalar(0.0)?;
                    let negative_part = e.binary(BinaryOp::Min, a, zero)?;
                    (e.mul(slope, dy)?, e.mul(negative_part, dy)?)
                }
                BinaryOp::Keep => {
                    let db = e.binary(BinaryOp::Keep, a, dy)?;
                    let sb = e.shape(bb);
                    return Ok(vec![None, Some(e.unbroadcast(db, &sb)?)]);
                }
                BinaryOp::Gt | BinaryOp::Eq | BinaryOp::Ge | BinaryOp::Ne => return Ok(vec![None, None]),
            };
            let (sa, sb) = (e.shape(a), e.shape(bb));
            Ok(vec![Some(e.unbroadcast(da, &sa)?), Some(e.unbroadcast(db, &sb)?)])
        }
        _ => shape_err(format!("{} is not elementwise", node.op.name())),
    }
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    match op {
        Op::Unary(u) => {
            let x = args[0].dense(&name)?;
            Ok(Value::Dense(Tensor { shape: x.shape.clone(), data: x.data.iter().map(|&v| u.apply(v)).collect() }))
        }
        Op::Binary(b) => {
            let (a, bb) = (args[0].dense(&name)?, args[1].dense(&name)?);
            let f = |x, y| b.apply(x, y);
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
