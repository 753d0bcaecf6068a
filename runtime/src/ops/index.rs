//! Indexing ops: Gather (embedding lookup), SparseRows (its row-sparse gradient),
//! SegmentSum (sum rows by group id), OneHot, and the ops that make ids: Bucketize (real
//! values to bucket ids) and IdDiv / IdMod (integer division and remainder of ids).

use super::emit::Emit;
use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{numel, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{Float, Ids, Tensor, Value};

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
                return shape_err(format!(
                    "sparse_rows: values {} do not start with the id shape {}",
                    x[1].describe(),
                    x[0].describe()
                ));
            }
            let mut out = vec![rows.clone()];
            out.extend_from_slice(&dy[ids.len()..]);
            Ok(Signature { shape: out, dtype: DType::F, kind: ValueKind::RowSparse })
        }
        Op::SegmentSum { segments } => {
            need_dense_float(&x[0], op)?;
            need_ids(&x[1], op)?;
            if x[1].shape.len() != 1 || x[0].shape.is_empty() || x[0].shape[0] != x[1].shape[0] {
                return shape_err(format!(
                    "segment_sum needs x [N, ...] and ids [N], got {} and {}",
                    x[0].describe(),
                    x[1].describe()
                ));
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
        Op::Bucketize { boundaries } => {
            need_dense_float(&x[0], op)?;
            if boundaries.is_empty() || boundaries.iter().any(|b| !b.is_finite()) {
                return shape_err(format!("bucketize needs finite boundaries, got {boundaries:?}"));
            }
            if let Some(w) = boundaries.windows(2).find(|w| w[0] >= w[1]) {
                return shape_err(format!("bucketize boundaries must increase strictly: {} follows {}", w[1], w[0]));
            }
            Ok(Signature { shape: x[0].shape.to_vec(), dtype: DType::I, kind: ValueKind::Dense })
        }
        Op::IdDiv { by } | Op::IdMod { by } => {
            need_ids(&x[0], op)?;
            if *by == 0 {
                return shape_err(format!("{} divides by zero", op.name()));
            }
            Ok(Signature { shape: x[0].shape.to_vec(), dtype: DType::I, kind: ValueKind::Dense })
        }
        _ => shape_err(format!("{} is not an indexing op", op.name())),
    }
}

/// Whether the gradient of `table` is row-sparse: it is a parameter flagged `embedding`
/// whose every use is the table of a Gather. (Used any other way, the dense gradient of the
/// other uses must be added to it, so it is dense.)
pub fn has_row_sparse_grad(graph: &Graph, table: NodeId) -> bool {
    let Op::Param { name } = &graph.node(table).op else { return false };
    graph.param_info(name).is_some_and(|p| p.embedding)
        && graph.users(table).all(|(user, slot)| slot == 0 && graph.node(user).op == Op::Gather)
}

/// Gather: ids and cotangent flattened to `[n]` and `[n, r...]`, then one SparseRows for an
/// embedding table (the autodiff joins the uses of a table into one) or a SegmentSum for any
/// other table. SparseRows: its values' cotangent gathers the rows back. SegmentSum: a Gather.
pub fn grad(graph: &mut Graph, node: &Node, _y: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    let sparse = node.op == Op::Gather && has_row_sparse_grad(graph, node.inputs[0]);
    let mut e = Emit::new(graph, node);
    match &node.op {
        Op::Gather => {
            let (table, ids) = (node.inputs[0], node.inputs[1]);
            let table_shape = e.shape(table);
            let n = numel(e.graph.shape(ids));
            let mut rows_shape: Shape = vec![n.clone()];
            rows_shape.extend_from_slice(&table_shape[1..]);
            let ids_flat = e.reshape(ids, &[n])?;
            let dy_flat = e.reshape(dy, &rows_shape)?;
            let rows = table_shape[0].clone();
            let dt = if sparse {
                e.op(Op::SparseRows { rows }, &[ids_flat, dy_flat])?
            } else {
                e.op(Op::SegmentSum { segments: rows }, &[dy_flat, ids_flat])?
            };
            Ok(vec![Some(dt), None])
        }
        Op::SparseRows { .. } => Ok(vec![None, Some(e.op(Op::Gather, &[dy, node.inputs[0]])?)]),
        Op::SegmentSum { .. } => Ok(vec![Some(e.op(Op::Gather, &[dy, node.inputs[1]])?), None]),
        Op::OneHot { .. } | Op::Bucketize { .. } | Op::IdDiv { .. } | Op::IdMod { .. } => Ok(vec![None]),
        _ => shape_err(format!("{} is not an indexing op", node.op.name())),
    }
}

/// Every id, checked to be below `limit`.
fn checked_ids<'a>(ids: &'a Ids, limit: usize, op: &'a str) -> impl Iterator<Item = Result<usize, ExecError>> + 'a {
    ids.data.iter().map(move |&id| {
        if (id as usize) < limit {
            Ok(id as usize)
        } else {
            Err(ExecError::IdOutOfRange { op: op.to_string(), id, limit })
        }
    })
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    let out = cx.out_shape;
    match op {
        Op::Gather => {
            let (table, ids) = (args[0].dense(&name)?, args[1].ids(&name)?);
            let width: usize = table.shape[1..].iter().product();
            let mut data = Vec::with_capacity(out.iter().product());
            for row in checked_ids(ids, table.shape[0], &name) {
                let row = row?;
                data.extend_from_slice(&table.data[row * width..(row + 1) * width]);
            }
            Ok(Value::Dense(Tensor { shape: out.to_vec(), data }))
        }
        Op::SparseRows { .. } => {
            let (ids, values) = (args[0].ids(&name)?, args[1].dense(&name)?);
            for row in checked_ids(ids, out[0], &name) {
                row?;
            }
            let mut value_shape = vec![ids.numel()];
            value_shape.extend_from_slice(&out[1..]);
            Ok(Value::RowSparse {
                shape: out.to_vec(),
                rows: ids.data.clone(),
                values: Tensor { shape: value_shape, data: values.data.clone() },
            })
        }
        Op::SegmentSum { .. } => {
            let (x, idx) = (args[0].dense(&name)?, args[1].ids(&name)?);
            let width: usize = x.shape[1..].iter().product();
            let mut data = vec![T::ZERO; out.iter().product()];
            for (i, seg) in checked_ids(idx, out[0], &name).enumerate() {
                let seg = seg?;
                let src = &x.data[i * width..(i + 1) * width];
                for (o, &v) in data[seg * width..(seg + 1) * width].iter_mut().zip(src) {
                    *o += v;
                }
            }
            Ok(Value::Dense(Tensor { shape: out.to_vec(), data }))
        }
        Op::OneHot { .. } => {
            let ids = args[0].ids(&name)?;
            let depth = out[out.len() - 1];
            let mut data = vec![T::ZERO; out.iter().product()];
            for (i, id) in checked_ids(ids, depth, &name).enumerate() {
                data[i * depth + id?] = T::ONE;
            }
            Ok(Value::Dense(Tensor { shape: out.to_vec(), data }))
        }
        Op::Bucketize { boundaries } => {
            let x = args[0].dense(&name)?;
            let bounds: Vec<T> = boundaries.iter().map(|&b| T::from_f64(b)).collect();
            let data = x.data.iter().map(|&v| bounds.partition_point(|&b| b <= v) as u32).collect();
            Ok(Value::Ids(Ids { shape: x.shape.clone(), data }))
        }
        Op::IdDiv { by } | Op::IdMod { by } => {
            let ids = args[0].ids(&name)?;
            let by = *by;
            let data = match op {
                Op::IdDiv { .. } => ids.data.iter().map(|&id| id / by).collect(),
                _ => ids.data.iter().map(|&id| id % by).collect(),
            };
            Ok(Value::Ids(Ids { shape: ids.shape.clone(), data }))
        }
        _ => Err(ExecError::BadOperand { op: name, message: "not an indexing op".into() }),
    }
}
