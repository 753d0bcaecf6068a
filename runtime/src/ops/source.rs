//! Source ops and gradient barriers: Input, Param, Scalar, DropMask, StopGrad.

use super::{Op, Operand, ShapeError, Signature};

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
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
