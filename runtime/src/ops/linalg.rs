//! Matrix products: MatMul (batched or shared right operand), GroupMatMul, GroupOuter.

use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::ir::dim::Dim;

fn last_two(shape: &[Dim], trans: bool) -> (Dim, Dim) {
    let n = shape.len();
    let (r, c) = (shape[n - 2].clone(), shape[n - 1].clone());
    if trans {
        (c, r)
    } else {
        (r, c)
    }
}

fn need_ids(o: &Operand, op: &Op, what: &str) -> Result<(), ShapeError> {
    if o.dtype != DType::I || o.shape.len() != 1 {
        return shape_err(format!("{}: {what} must be a rank-1 id vector, got {}", op.name(), o.describe()));
    }
    Ok(())
}

fn need_dense_float(o: &Operand, op: &Op) -> Result<(), ShapeError> {
    if o.dtype != DType::F || o.kind != ValueKind::Dense {
        return shape_err(format!("{} needs real-valued dense operands", op.name()));
    }
    Ok(())
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    match op {
        Op::MatMul { trans_a, trans_b } => {
            let (a, b) = (x[0].shape, x[1].shape);
            if a.len() < 2 || b.len() < 2 {
                return shape_err(format!("matmul needs operands of rank ≥ 2, got {} and {}", x[0].describe(), x[1].describe()));
            }
            let (m, ka) = last_two(a, *trans_a);
            let (kb, n) = last_two(b, *trans_b);
            if ka != kb {
                return shape_err(format!(
                    "matmul of {} and {}: inner sizes {ka} and {kb} differ",
                    x[0].describe(),
                    x[1].describe()
                ));
            }
            let batch_a = &a[..a.len() - 2];
            let batch_b = &b[..b.len() - 2];
            if !batch_b.is_empty() && batch_a != batch_b {
                return shape_err(format!(
                    "batched matmul of {} and {}: leading axes differ",
                    x[0].describe(),
                    x[1].describe()
                ));
            }
            let mut out = batch_a.to_vec();
            out.push(m);
            out.push(n);
            Ok(Signature::dense(out))
        }
        Op::GroupMatMul { trans_w } => {
            need_dense_float(&x[0], op)?;
            need_dense_float(&x[1], op)?;
            need_ids(&x[2], op, "the group index")?;
            let (xs, w) = (x[0].shape, x[1].shape);
            if xs.len() != 2 || w.len() != 3 {
                return shape_err(format!("group_matmul needs x [N, k] and w [G, k, n], got {} and {}", x[0].describe(), x[1].describe()));
            }
            let (k, n) = last_two(w, *trans_w);
            if xs[1] != k {
                return shape_err(format!("group_matmul: x has {} columns but each weight has {k} rows", xs[1]));
            }
            if x[2].shape[0] != xs[0] {
                return shape_err(format!("group_matmul: {} rows but {} group ids", xs[0], x[2].shape[0]));
            }
            Ok(Signature::dense(vec![xs[0].clone(), n]))
        }
        Op::GroupOuter { groups } => {
            need_dense_float(&x[0], op)?;
            need_dense_float(&x[1], op)?;
            need_ids(&x[2], op, "the group index")?;
            let (xs, dy) = (x[0].shape, x[1].shape);
            if xs.len() != 2 || dy.len() != 2 || xs[0] != dy[0] || x[2].shape[0] != xs[0] {
                return shape_err(format!("group_outer needs x [N, k], dy [N, n], idx [N], got {} and {}", x[0].describe(), x[1].describe()));
            }
            Ok(Signature::dense(vec![groups.clone(), xs[1].clone(), dy[1].clone()]))
        }
        _ => shape_err(format!("{} is not a matrix product", op.name())),
    }
}
