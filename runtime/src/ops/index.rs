//! Indexing ops: Gather (embedding lookup), SparseRows (its row-sparse gradient),
//! SegmentSum (sum rows by group id) and OneHot.

use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};

fn need_ids(o: &Operand, op: &Op) -> Result<(), ShapeError> {
    if o.dtype != DType::I {
        return shape_err(format!("{} needs ids, got real values {}", op.name(), o.describe()));
    }
    Ok(())
}

fn need_dense_float(o: &Operand, op: &Op) -> Result<(), ShapeError> {
    if o.dtype != DType::F || o.kind != ValueKind::Dense {
        return shape_err(format!("{} needs a real-valued dense operand, got {}", op.name(), o.describe()));
    }
    Ok(())
}

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    match op {
        Op::Gather => {
            need_dense_float(&x[0], op)?;
            need_ids(&x[1], op)?;
            if x[0].shape.is_empty() {
                return shape_err("gather needs a table of rank ≥ 1");
            }
            let mut out = x[1].shape.to_vec();
            out.extend_from_slice(&x[0].shape[1..]);
            Ok(Signature::dense(out))
        }
        Op::SparseRows { rows } => {
            need_ids(&x[0], op)?;
            need_dense_float(&x[1], op)?;
            let (ids, dy) = (x[0].shape, x[1].shape);
            if dy.len() < ids.len() || &dy[..ids.len()] != ids {
                return shape_err(format!("sparse_rows: values {} do not start with the id shape {}", x[1].describe(), x[0].describe()));
            }
            let mut out = vec![rows.clone()];
            out.extend_from_slice(&dy[ids.len()..]);
            Ok(Signature { shape: out, dtype: DType::F, kind: ValueKind::RowSparse })
        }
        Op::SegmentSum { segments } => {
            need_dense_float(&x[0], op)?;
            need_ids(&x[1], op)?;
            if x[1].shape.len() != 1 || x[0].shape.is_empty() || x[0].shape[0] != x[1].shape[0] {
                return shape_err(format!("segment_sum needs x [N, ...] and ids [N], got {} and {}", x[0].describe(), x[1].describe()));
            }
            let mut out = vec![segments.clone()];
            out.extend_from_slice(&x[0].shape[1..]);
            Ok(Signature::dense(out))
        }
        Op::OneHot { depth } => {
            need_ids(&x[0], op)?;
            let mut out = x[0].shape.to_vec();
            out.push(depth.clone());
            Ok(Signature::dense(out))
        }
        _ => shape_err(format!("{} is not an indexing op", op.name())),
    }
}

