//! Source ops and gradient barriers: Input, Param, Scalar, the constant tensors (Arange,
//! Triangle, Eye: one op each, whatever their size), the constant ids (IdList), the
//! training loop's counters (Counter), DropMask, StopGrad, the named gradient path Path, and
//! the phase choice TrainEval (batch statistics in training, running ones in evaluation).

use super::emit::Emit;
use super::{Counter, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::Dim;
use crate::ir::graph::{Graph, Node, NodeId};
use crate::rng::SplitMix64;
use crate::tensor::{Float, Ids, Tensor, Value};

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    super::require_dense_real(op, x)?;
    match op {
        Op::Scalar(_) | Op::Counter(_) => Ok(Signature::dense(vec![])),
        Op::Arange { n } => Ok(Signature::dense(vec![n.clone()])),
        Op::Triangle { n, .. } | Op::Eye { n } => Ok(Signature::dense(vec![n.clone(), n.clone()])),
        Op::IdList { ids } => {
            Ok(Signature { shape: vec![Dim::from(ids.len())], dtype: DType::I, kind: ValueKind::Dense })
        }
        Op::DropMask { p, .. } => {
            if !(0.0..1.0).contains(p) {
                return super::shape_err(format!("dropout rate must be in [0, 1), got {p}"));
            }
            Ok(Signature::dense(x[0].shape.to_vec()))
        }
        Op::StopGrad | Op::Path { .. } => Ok(Signature::dense(x[0].shape.to_vec())),
        Op::TrainEval => {
            if x[0].shape != x[1].shape {
                return super::shape_err(format!(
                    "the training value {} and the evaluation value {} must have one shape",
                    x[0].describe(),
                    x[1].describe()
                ));
            }
            Ok(Signature::dense(x[0].shape.to_vec()))
        }
        _ => super::shape_err(format!("{} is not a source op", op.name())),
    }
}

/// Sources have no operands; DropMask and StopGrad pass no gradient to theirs, Path passes
/// its cotangent on as it is. TrainEval
/// passes it to the operand the run chooses: its cotangents are `TrainEval(dy, 0)` and
/// `TrainEval(0, dy)` (resolved with the rest by `passes::for_phase`).
pub fn grad(graph: &mut Graph, node: &Node, _id: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    if matches!(node.op, Op::Path { .. }) {
        return Ok(vec![Some(dy)]);
    }
    if node.op == Op::TrainEval {
        let mut e = Emit::new(graph, node);
        let zero = e.scalar(0.0)?;
        let zeros = e.broadcast(zero, &e.shape(dy))?;
        let in_training = e.op(Op::TrainEval, &[dy, zeros])?;
        let in_evaluation = e.op(Op::TrainEval, &[zeros, dy])?;
        return Ok(vec![Some(in_training), Some(in_evaluation)]);
    }
    Ok(vec![None; node.inputs.len()])
}

/// Scalar, the constant tensors, DropMask, StopGrad, Path and TrainEval (Input and Param are read by the
/// backend, not computed).
pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let square = |holds: &dyn Fn(i64, i64) -> bool| {
        let n = cx.out_shape[0];
        let data = (0..n * n).map(|i| if holds((i / n) as i64, (i % n) as i64) { T::ONE } else { T::ZERO }).collect();
        Value::Dense(Tensor { shape: vec![n, n], data })
    };
    match op {
        Op::Scalar(v) => Ok(Value::Dense(Tensor::scalar(T::from_f64(*v)))),
        Op::Counter(c) => {
            let v = match c {
                Counter::Step => cx.mode.step,
                Counter::Epoch => cx.mode.epoch,
                Counter::Stage => cx.mode.stage,
            };
            Ok(Value::Dense(Tensor::scalar(T::from_f64(v as f64))))
        }
        Op::Arange { .. } => {
            let n = cx.out_shape[0];
            Ok(Value::Dense(Tensor { shape: vec![n], data: (0..n).map(T::from_usize).collect() }))
        }
        Op::Triangle { upper: false, k, .. } => Ok(square(&|row, col| col <= row + k)),
        Op::Triangle { upper: true, k, .. } => Ok(square(&|row, col| col >= row + k)),
        Op::Eye { .. } => Ok(square(&|row, col| row == col)),
        Op::IdList { ids } => Ok(Value::Ids(Ids { shape: vec![ids.len()], data: ids.clone() })),
        Op::StopGrad | Op::Path { .. } => Ok(Value::Dense(args[0].dense(&op.name())?.clone())),
        Op::TrainEval => {
            let chosen = args[if cx.mode.training { 0 } else { 1 }];
            Ok(Value::Dense(chosen.dense("train_eval")?.clone()))
        }
        Op::DropMask { p, stream } => {
            let shape = args[0].dense("dropmask")?.shape.clone();
            if !cx.mode.training || *p == 0.0 {
                return Ok(Value::Dense(Tensor::full(shape, T::ONE)));
            }
            let keep = T::from_f64(1.0 / (1.0 - p));
            let mut rng = SplitMix64::keyed(cx.mode.seed, cx.mode.step, *stream);
            let n = shape.iter().product();
            let data = (0..n).map(|_| if rng.chance(*p) { T::ZERO } else { keep }).collect();
            Ok(Value::Dense(Tensor { shape, data }))
        }
        _ => Err(ExecError::BadOperand { op: op.name(), message: "not evaluated by the source rules".into() }),
    }
}
