//! Source ops and gradient barriers: Input, Param, Scalar, DropMask, StopGrad.

use super::{Op, Operand, ShapeError, Signature};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::rng::SplitMix64;
use crate::tensor::{Float, Tensor, Value};

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    super::require_dense_real(op, x)?;
    match op {
        Op::Scalar(_) => Ok(Signature::dense(vec![])),
        Op::DropMask { p, .. } => {
            if !(0.0..1.0).contains(p) {
                return super::shape_err(format!("dropout rate must be in [0, 1), got {p}"));
            }
            Ok(Signature::dense(x[0].shape.to_vec()))
        }
        Op::StopGrad => Ok(Signature::dense(x[0].shape.to_vec())),
        _ => super::shape_err(format!("{} is not a source op", op.name())),
    }
}

/// Sources have no operands; DropMask and StopGrad pass no gradient to theirs.
pub fn grad(_graph: &mut Graph, node: &Node, _id: NodeId, _dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    Ok(vec![None; node.inputs.len()])
}

/// Scalar, DropMask and StopGrad (Input and Param are read by the backend, not computed).
pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    match op {
        Op::Scalar(v) => Ok(Value::Dense(Tensor::scalar(T::from_f64(*v)))),
        Op::StopGrad => Ok(Value::Dense(args[0].dense("stopgrad")?.clone())),
        Op::DropMask { p, stream } => {
            let shape = args[0].dense("dropmask")?.shape.clone();
            if !cx.mode.training || *p == 0.0 {
                return Ok(Value::Dense(Tensor::full(shape, T::ONE)));
            }
            let keep = T::from_f64(1.0 / (1.0 - p));
            let mut rng = SplitMix64::keyed(cx.mode.seed, cx.mode.step, *stream);
            let n = shape.iter().product();
            let data = (0..n).map(|_| if rng.next_f64() >= *p { keep } else { T::ZERO }).collect();
            Ok(Value::Dense(Tensor { shape, data }))
        }
        _ => Err(ExecError::BadOperand { op: op.name(), message: "not evaluated by the source rules".into() }),
    }
}
