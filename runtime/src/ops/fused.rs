//! Fused elementwise kernels: the `Fused` op, which the fusion pass
//! ([`crate::fuse::fuse_elementwise`]) makes from chains of Unary/Binary ops after autodiff.
//!
//! This family file owns the kernel description ([`FusedKernel`]: an SSA body of
//! [`Instr`]s over the node's operands, optionally followed by a sum or mean over axes, a
//! [`Reduction`]) and the op's three rules:
//! - `shape`: the numpy broadcast of all operand shapes (each operand is read broadcast to
//!   it, exactly as a chain of Binary ops would read it), reduced by the `Reduce` shape
//!   rule when the kernel ends in a reduction;
//! - `grad`: an error, because fusion runs after autodiff (the backward graph is fused too,
//!   so nothing ever differentiates a fused node);
//! - `eval`: the body evaluated element by element with the scalar functions of
//!   `elementwise` ([`UnaryOp::apply`], [`BinaryOp::apply`]), in the same order as the unfused
//!   chain, then the `Reduce` eval rule, so a fused graph gives bit-identical results to
//!   the graph it came from.
//!
//! The Cranelift code generator for these kernels is `backend::jit::codegen`.

use super::elementwise::broadcast_shapes;
use super::{reduce, shape_err, BinaryOp, DType, Op, Operand, ReduceOp, ShapeError, Signature, UnaryOp, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::Shape;
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{broadcast_strides, Float, Tensor, Value};
use std::hash::{Hash, Hasher};

/// A chain of elementwise ops fused into one kernel: operands are the node's inputs, each
/// broadcast (numpy rules) to the broadcast of all their shapes; `body` is SSA, its last
/// instruction is the result, which `reduce` (when present) sums over axes.
///
/// Kernels compare and hash by value (constants by their bits), so a backend can compile
/// each distinct kernel once and find it again from any graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FusedKernel {
    pub inputs: usize,
    pub body: Vec<Instr>,
    /// A reduction epilogue: the kernel's output is `Reduce { op, axes, keep_dims }` of
    /// the elementwise result, which is never stored.
    pub reduce: Option<Reduction>,
}

/// The reduction epilogue of a fused kernel: a `Reduce` (sum or mean) over `axes` of the
/// elementwise result, with the same semantics and summation order as `Op::Reduce`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reduction {
    pub op: ReduceOp,
    pub axes: Vec<usize>,
    pub keep_dims: bool,
}

impl Reduction {
    /// The reduction as a standalone op.
    pub fn as_op(&self) -> Op {
        Op::Reduce { op: self.op, axes: self.axes.clone(), keep_dims: self.keep_dims }
    }
}

/// One instruction of a kernel body. Operands of `Unary` and `Binary` are indices of
/// earlier instructions of the same body.
#[derive(Clone, Copy, Debug)]
pub enum Instr {
    /// The element of operand `i` (broadcast to the output shape).
    Input(usize),
    /// A constant (rounded to the backend's float type, as `Op::Scalar` is).
    Const(f64),
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
}

/// Constants compare by their bits: `0.0` and `-0.0` differ, a NaN equals itself (as in CSE).
impl PartialEq for Instr {
    fn eq(&self, other: &Instr) -> bool {
        match (self, other) {
            (Instr::Input(a), Instr::Input(b)) => a == b,
            (Instr::Const(a), Instr::Const(b)) => a.to_bits() == b.to_bits(),
            (Instr::Unary(u, a), Instr::Unary(v, b)) => u == v && a == b,
            (Instr::Binary(p, a, b), Instr::Binary(q, c, d)) => p == q && a == c && b == d,
            _ => false,
        }
    }
}

impl Eq for Instr {}

impl Hash for Instr {
    fn hash<H: Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match *self {
            Instr::Input(i) => i.hash(h),
            Instr::Const(c) => c.to_bits().hash(h),
            Instr::Unary(u, a) => (u, a).hash(h),
            Instr::Binary(b, x, y) => (b, x, y).hash(h),
        }
    }
}

impl FusedKernel {
    /// Checks that the body is well formed: not empty, every operand index refers to an
    /// earlier instruction, every `Input` to an operand of the kernel.
    pub fn validate(&self) -> Result<(), String> {
        if self.body.is_empty() {
            return Err("a fused kernel needs at least one instruction".into());
        }
        if self.reduce.as_ref().is_some_and(|r| !r.op.adds()) {
            return Err("a fused kernel's reduction is a sum or a mean".into());
        }
        for (at, instr) in self.body.iter().enumerate() {
            let earlier = |operand: usize| {
                if operand < at {
                    Ok(())
                } else {
                    Err(format!("instruction {at} ({instr:?}) reads instruction {operand}, which is not before it"))
                }
            };
            match *instr {
                Instr::Input(i) if i >= self.inputs => {
                    return Err(format!(
                        "instruction {at} reads input {i}, but the kernel has {} input(s)",
                        self.inputs
                    ))
                }
                Instr::Input(_) | Instr::Const(_) => {}
                Instr::Unary(_, a) => earlier(a)?,
                Instr::Binary(_, a, b) => {
                    earlier(a)?;
                    earlier(b)?
                }
            }
        }
        Ok(())
    }

    /// The ops of the body in order, then the reduction (`add,relu,mul,sum`), for listings
    /// and profiles.
    pub fn summary(&self) -> String {
        let mut ops: Vec<String> = self
            .body
            .iter()
            .filter_map(|i| match i {
                Instr::Unary(u, _) => Some(format!("{u:?}").to_lowercase()),
                Instr::Binary(b, _, _) => Some(format!("{b:?}").to_lowercase()),
                Instr::Input(_) | Instr::Const(_) => None,
            })
            .collect();
        if let Some(r) = &self.reduce {
            ops.push(format!("{:?}", r.op).to_lowercase());
        }
        ops.join(",")
    }

    /// The number of Unary and Binary instructions (the ops the kernel replaces).
    pub fn op_count(&self) -> usize {
        self.body.iter().filter(|i| matches!(i, Instr::Unary(..) | Instr::Binary(..))).count()
    }

    /// One output element from one element of each operand. `registers` holds one slot per
    /// instruction. The kernel must be valid ([`FusedKernel::validate`]).
    fn eval_element<T: Float>(&self, operands: &[T], registers: &mut [T]) -> T {
        for (at, instr) in self.body.iter().enumerate() {
            registers[at] = match *instr {
                Instr::Input(i) => operands[i],
                Instr::Const(c) => T::from_f64(c),
                Instr::Unary(u, a) => u.apply(registers[a]),
                Instr::Binary(b, x, y) => b.apply(registers[x], registers[y]),
            };
        }
        registers[self.body.len() - 1]
    }
}

/// Whether a concrete shape broadcasts (numpy rules) to `out` without changing `out`.
pub fn broadcasts_to(shape: &[usize], out: &[usize]) -> bool {
    shape.len() <= out.len() && shape.iter().rev().zip(out.iter().rev()).all(|(&s, &o)| s == o || s == 1)
}

/// The numpy broadcast of concrete shapes, or `None` when they do not broadcast.
pub fn broadcast_all<'a>(shapes: impl IntoIterator<Item = &'a [usize]>) -> Option<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        if s.len() > out.len() {
            let mut wider = vec![1; s.len() - out.len()];
            wider.extend_from_slice(&out);
            out = wider;
        }
        let lead = out.len() - s.len();
        for (o, &d) in out[lead..].iter_mut().zip(s) {
            match (*o, d) {
                (a, b) if a == b => {}
                (1, b) => *o = b,
                (_, 1) => {}
                _ => return None,
            }
        }
    }
    Some(out)
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    let Op::Fused(kernel) = op else {
        return shape_err(format!("{} is not a fused kernel", op.name()));
    };
    super::require_dense_real(op, x)?;
    kernel.validate().map_err(ShapeError)?;
    let mut out: Shape = Vec::new();
    for operand in x {
        out = broadcast_shapes(&out, operand.shape)?;
    }
    match &kernel.reduce {
        None => Ok(Signature::dense(out)),
        Some(r) => reduce::shape(&r.as_op(), &[Operand { shape: &out, dtype: DType::F, kind: ValueKind::Dense }]),
    }
}

/// Fused nodes are made after autodiff and have no gradient rule.
pub fn grad(_graph: &mut Graph, node: &Node, _y: NodeId, _dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    shape_err(format!(
        "{} has no gradient rule: elementwise fusion runs after autodiff, on the forward and backward graph together",
        node.op.name()
    ))
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    let bad = |message: String| ExecError::BadOperand { op: name.clone(), message };
    let Op::Fused(kernel) = op else {
        return Err(bad("not a fused kernel".into()));
    };
    kernel.validate().map_err(bad)?;
    if args.len() != kernel.inputs {
        return Err(bad(format!("the kernel takes {} operand(s), got {}", kernel.inputs, args.len())));
    }
    let operands: Vec<&Tensor<T>> = args.iter().map(|a| a.dense(&name)).collect::<Result<_, _>>()?;
    // The elementwise result's shape: the output's, or what the reduction reduces.
    let broadcast;
    let out_shape = match &kernel.reduce {
        None => cx.out_shape,
        Some(_) => {
            broadcast = broadcast_all(operands.iter().map(|x| x.shape.as_slice()))
                .ok_or_else(|| bad("the operands do not broadcast together".into()))?;
            broadcast.as_slice()
        }
    };
    for (k, x) in operands.iter().enumerate() {
        if !broadcasts_to(&x.shape, out_shape) {
            return Err(bad(format!("operand {k} of shape {:?} does not broadcast to {out_shape:?}", x.shape)));
        }
    }
    let strides: Vec<Vec<usize>> = operands.iter().map(|x| broadcast_strides(&x.shape, out_shape)).collect();
    let total: usize = out_shape.iter().product();
    let mut data = Vec::with_capacity(total);
    let mut offsets = vec![0usize; operands.len()];
    let mut index = vec![0usize; out_shape.len()];
    let mut elements = vec![T::ZERO; operands.len()];
    let mut registers = vec![T::ZERO; kernel.body.len()];
    for _ in 0..total {
        for ((element, x), &offset) in elements.iter_mut().zip(&operands).zip(&offsets) {
            *element = x.data[offset];
        }
        data.push(kernel.eval_element(&elements, &mut registers));
        // Advance the output index (an odometer) and every operand's offset with it.
        for axis in (0..out_shape.len()).rev() {
            index[axis] += 1;
            for (offset, s) in offsets.iter_mut().zip(&strides) {
                *offset += s[axis];
            }
            if index[axis] < out_shape[axis] {
                break;
            }
            for (offset, s) in offsets.iter_mut().zip(&strides) {
                *offset -= s[axis] * out_shape[axis];
            }
            index[axis] = 0;
        }
    }
    let elementwise = Value::Dense(Tensor { shape: out_shape.to_vec(), data });
    match &kernel.reduce {
        None => Ok(elementwise),
        Some(r) => reduce::eval(&r.as_op(), &[Arg::Value(&elementwise)], cx),
    }
}
