//! Reductions: Reduce (sum, mean, max over axes) and Softmax.

use super::{shape_err, Op, Operand, ShapeError, Signature};
use crate::ir::dim::Dim;

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    let rank = x[0].shape.len();
    match op {
        Op::Reduce { axes, keep_dims, .. } => {
            if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= rank) {
                return shape_err(format!("reduce axes {axes:?} must be sorted, distinct and < {rank} for {}", x[0].describe()));
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
