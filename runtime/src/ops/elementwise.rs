//! Elementwise ops: Unary and Binary (with numpy-style broadcasting).

use super::{shape_err, Op, Operand, ShapeError, Signature};
use crate::ir::dim::{shape_to_string, Dim, Shape};

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
