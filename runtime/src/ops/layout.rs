//! Layout ops: Reshape, Permute, Broadcast, Concat, Slice, Pad.

use super::elementwise::broadcast_shapes;
use super::{shape_err, Op, Operand, ShapeError, Signature};
use crate::ir::dim::{numel, shape_to_string, Dim};

fn check_axis(axis: usize, rank: usize, what: &str) -> Result<(), ShapeError> {
    if axis >= rank {
        return shape_err(format!("{what}: axis {axis} is out of range for a rank-{rank} value"));
    }
    Ok(())
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
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
            Ok(Signature::dense(shape.clone()))
        }
        Op::Permute { perm } => {
            let rank = x[0].shape.len();
            let mut seen = vec![false; rank];
            if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
                return shape_err(format!("{perm:?} is not a permutation of the {rank} axes of {}", x[0].describe()));
            }
            Ok(Signature::dense(perm.iter().map(|&p| x[0].shape[p].clone()).collect()))
        }
        Op::Broadcast { shape } => {
            let b = broadcast_shapes(x[0].shape, shape)?;
            if &b != shape {
                return shape_err(format!("cannot broadcast {} to {}", x[0].describe(), shape_to_string(shape)));
            }
            Ok(Signature::dense(b))
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
            Ok(Signature::dense(out))
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
            Ok(Signature::dense(out))
        }
        Op::Pad { axis, before, after } => {
            check_axis(*axis, x[0].shape.len(), "pad")?;
            let mut out = x[0].shape.to_vec();
            out[*axis] = &(&out[*axis] + before) + after;
            Ok(Signature::dense(out))
        }
        _ => shape_err(format!("{} is not a layout op", op.name())),
    }
}
