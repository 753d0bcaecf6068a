//! Indexing ops: Gather (embedding lookup), SparseRows (its row-sparse gradient),
//! SegmentSum (sum rows by group id), OneHot, the ops that make ids: Bucketize (real
//! values to bucket ids), IdDiv / IdMod (integer division and remainder of ids), GroupIds
//! (ids moved into their group's block of a per-group table) and TopK
//! (the positions of the k largest or smallest values along an axis), and the selection
//! along an axis: TakeAlong (numpy's `take_along_axis`) and its adjoint ScatterAdd, with
//! [`AlongIds`], the walk over their ids that the jit's kernels share.

use super::emit::Emit;
use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{numel, shape_to_string, Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{Float, Ids, Tensor, Value};

pub(super) fn need_ids(o: &Operand, op: &Op) -> Result<(), ShapeError> {
    if o.dtype != DType::I {
        return shape_err(format!("{} needs ids, got real values {}", op.name(), o.describe()));
    }
    Ok(())
}

pub(super) fn need_dense_float(o: &Operand, op: &Op) -> Result<(), ShapeError> {
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
        Op::GroupIds { .. } => {
            need_ids(&x[0], op)?;
            need_ids(&x[1], op)?;
            if x[1].shape.len() != 1 || x[0].shape.first() != Some(&x[1].shape[0]) {
                return shape_err(format!(
                    "group_ids needs ids [N, ...] and groups [N], got {} and {}",
                    x[0].describe(),
                    x[1].describe()
                ));
            }
            Ok(Signature { shape: x[0].shape.to_vec(), dtype: DType::I, kind: ValueKind::Dense })
        }
        Op::TakeAlong { axis } => {
            need_dense_float(&x[0], op)?;
            need_ids(&x[1], op)?;
            along_ids_fit(op, x[0].shape, x[1].shape, *axis)?;
            let mut out = x[0].shape.to_vec();
            out[*axis] = x[1].shape[*axis].clone();
            Ok(Signature::dense(out))
        }
        Op::ScatterAdd { axis, size } => {
            need_dense_float(&x[0], op)?;
            need_ids(&x[1], op)?;
            along_ids_fit(op, x[0].shape, x[1].shape, *axis)?;
            if x[1].shape[*axis] != x[0].shape[*axis] {
                return shape_err(format!(
                    "scatter_add: ids {} and values {} differ along axis {axis}",
                    x[1].describe(),
                    x[0].describe()
                ));
            }
            let mut out = x[0].shape.to_vec();
            out[*axis] = size.clone();
            Ok(Signature::dense(out))
        }
        Op::TopK { axis, k, .. } => {
            need_dense_float(&x[0], op)?;
            let Some(n) = x[0].shape.get(*axis) else {
                return shape_err(format!("{}: axis {axis} is out of range for {}", op.name(), x[0].describe()));
            };
            // A constant k against a size known only with data is checked when run.
            let fits = k == n
                || match (k.as_const(), n.as_const()) {
                    (Some(k), Some(n)) => k <= n,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
            if k.as_const().is_some_and(|k| k < 1) || !fits {
                return shape_err(format!(
                    "{}: k must be between 1 and the size of axis {axis} of {}, which is {n}",
                    op.name(),
                    x[0].describe()
                ));
            }
            let mut out = x[0].shape.to_vec();
            out[*axis] = k.clone();
            Ok(Signature { shape: out, dtype: DType::I, kind: ValueKind::Dense })
        }
        _ => shape_err(format!("{} is not an indexing op", op.name())),
    }
}

/// The ids of TakeAlong and ScatterAdd against the values `values` they select from or
/// scatter: the same rank, `axis` in it, and on every other axis the values' size or 1.
fn along_ids_fit(op: &Op, values: &[Dim], ids: &[Dim], axis: usize) -> Result<(), ShapeError> {
    if axis >= values.len() {
        return shape_err(format!("{}: axis {axis} is out of range for {}", op.name(), shape_to_string(values)));
    }
    if ids.len() != values.len() {
        return shape_err(format!(
            "{}: ids {} need the rank of the values {}",
            op.name(),
            shape_to_string(ids),
            shape_to_string(values)
        ));
    }
    if let Some(d) = (0..ids.len()).find(|&d| d != axis && !ids[d].is_one() && ids[d] != values[d]) {
        return shape_err(format!(
            "{}: ids {} do not fit the values {} on axis {d} (size {} or 1 needed)",
            op.name(),
            shape_to_string(ids),
            shape_to_string(values),
            values[d]
        ));
    }
    Ok(())
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
/// TakeAlong: the cotangent scattered back to the positions it came from (ScatterAdd);
/// ScatterAdd: its cotangent taken along the same ids. No gradient reaches ids.
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
        Op::TakeAlong { axis } => {
            let (x, idx) = (node.inputs[0], node.inputs[1]);
            let size = e.graph.dim(x, *axis);
            Ok(vec![Some(e.op(Op::ScatterAdd { axis: *axis, size }, &[dy, idx])?), None])
        }
        Op::ScatterAdd { axis, .. } => {
            Ok(vec![Some(e.op(Op::TakeAlong { axis: *axis }, &[dy, node.inputs[1]])?), None])
        }
        Op::OneHot { .. } | Op::Bucketize { .. } | Op::IdDiv { .. } | Op::IdMod { .. } | Op::TopK { .. } => {
            Ok(vec![None])
        }
        Op::GroupIds { .. } => Ok(vec![None, None]),
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
        Op::GroupIds { rows } => {
            let (ids, groups) = (args[0].ids(&name)?, args[1].ids(&name)?);
            let rows = cx.size(rows)?;
            // Ids [N, i...] against groups [N]: sample n's ids are a run of `per` ids.
            let per = ids.numel().checked_div(groups.numel()).unwrap_or(0).max(1);
            let mut data = Vec::with_capacity(ids.numel());
            for (i, id) in checked_ids(ids, rows, &name).enumerate() {
                let group = groups.data[i / per];
                let moved = group as u64 * rows as u64 + id? as u64;
                let moved = u32::try_from(moved).map_err(|_| ExecError::BadOperand {
                    op: name.clone(),
                    message: format!("id {moved} (group {group}, {rows} rows a group) does not fit 32 bits"),
                })?;
                data.push(moved);
            }
            Ok(Value::Ids(Ids { shape: ids.shape.clone(), data }))
        }
        Op::TakeAlong { axis } => {
            let (x, ids) = (args[0].dense(&name)?, args[1].ids(&name)?);
            let walk = AlongIds::new(out, &ids.shape, *axis);
            let n = x.shape[*axis];
            let mut data = Vec::with_capacity(out.iter().product());
            for o in 0..walk.outer {
                for p in 0..walk.len {
                    for i in 0..walk.inner {
                        let id = walk.id(&ids.data, n, o, p, i).map_err(|(id, limit)| id_error(&name, id, limit))?;
                        data.push(x.data[(o * n + id) * walk.inner + i]);
                    }
                }
            }
            Ok(Value::Dense(Tensor { shape: out.to_vec(), data }))
        }
        Op::ScatterAdd { axis, .. } => {
            let (src, ids) = (args[0].dense(&name)?, args[1].ids(&name)?);
            let walk = AlongIds::new(&src.shape, &ids.shape, *axis);
            let n = out[*axis];
            let mut data = vec![T::ZERO; out.iter().product()];
            let mut at = 0;
            for o in 0..walk.outer {
                for p in 0..walk.len {
                    for i in 0..walk.inner {
                        let id = walk.id(&ids.data, n, o, p, i).map_err(|(id, limit)| id_error(&name, id, limit))?;
                        data[(o * n + id) * walk.inner + i] += src.data[at];
                        at += 1;
                    }
                }
            }
            Ok(Value::Dense(Tensor { shape: out.to_vec(), data }))
        }
        &Op::TopK { axis, largest, .. } => {
            let x = args[0].dense(&name)?;
            let data = top_k(&x.data, &x.shape, axis, out[axis], largest).ok_or_else(|| ExecError::BadOperand {
                op: name,
                message: format!("k = {} is above the size of axis {axis} of {:?}", out[axis], x.shape),
            })?;
            Ok(Value::Ids(Ids { shape: out.to_vec(), data }))
        }
        _ => Err(ExecError::BadOperand { op: name, message: "not an indexing op".into() }),
    }
}

fn id_error(op: &str, id: u32, limit: usize) -> ExecError {
    ExecError::IdOutOfRange { op: op.to_string(), id, limit }
}

/// The walk of TakeAlong and ScatterAdd over their ids: the selected values have the shape
/// `full`, seen as `[outer, len, inner]` around the axis; the ids broadcast to it (an axis of
/// size 1 in the ids serves every index of that axis). [`AlongIds::at`] is the offset in the
/// ids of element `(o, p, i)`.
#[derive(Debug)]
pub struct AlongIds {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    outer_at: Vec<usize>,
    inner_at: Vec<usize>,
    step: usize,
}

impl AlongIds {
    /// For ids of shape `ids` (same rank as `full`, each axis `full`'s size or 1).
    pub fn new(full: &[usize], ids: &[usize], axis: usize) -> AlongIds {
        let mut strides = vec![0usize; ids.len()];
        let mut s = 1;
        for d in (0..ids.len()).rev() {
            strides[d] = if ids[d] == 1 { 0 } else { s };
            s *= ids[d];
        }
        let offsets = |axes: std::ops::Range<usize>| {
            let mut at = vec![0usize];
            for d in axes {
                let stride = strides[d];
                at = at.iter().flat_map(|&base| (0..full[d]).map(move |j| base + j * stride)).collect();
            }
            at
        };
        let (outer_at, inner_at) = (offsets(0..axis), offsets(axis + 1..full.len()));
        AlongIds {
            outer: outer_at.len(),
            len: full[axis],
            inner: inner_at.len(),
            outer_at,
            inner_at,
            step: strides[axis],
        }
    }

    /// The offset in the ids of element `(o, p, i)`.
    #[inline]
    pub fn at(&self, o: usize, p: usize, i: usize) -> usize {
        self.outer_at[o] + p * self.step + self.inner_at[i]
    }

    /// Whether the ids are the same across the inner axes (each id then selects a run of
    /// `inner` contiguous values).
    pub fn runs(&self) -> bool {
        self.inner_at.iter().all(|&a| a == 0)
    }

    /// The id of element `(o, p, i)`, checked to be below `limit` (`Err((id, limit))`).
    #[inline]
    pub fn id(&self, ids: &[u32], limit: usize, o: usize, p: usize, i: usize) -> Result<usize, (u32, usize)> {
        let id = ids[self.at(o, p, i)];
        if (id as usize) < limit {
            Ok(id as usize)
        } else {
            Err((id, limit))
        }
    }
}

/// `a` before `b` in TopK's order (`largest`: decreasing, else increasing; NaN above every
/// number; equal values, `-0.0` and `0.0` included, by position).
fn ranks_before<T: Float>(a: (T, usize), b: (T, usize), largest: bool) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let by_value = match (a.0.is_nan(), b.0.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal),
    };
    let by_value = if largest { by_value.reverse() } else { by_value };
    by_value.then(a.1.cmp(&b.1))
}

/// TopK's positions over `x` of `shape` along `axis`, `k` of them per lane, in order
/// (`None` when `k` is above the axis's size). Shared by the eval rule and the jit.
pub fn top_k<T: Float>(x: &[T], shape: &[usize], axis: usize, k: usize, largest: bool) -> Option<Vec<u32>> {
    let n = shape[axis];
    if k > n {
        return None;
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![0u32; outer * k * inner];
    let mut lane: Vec<(T, usize)> = Vec::with_capacity(n);
    for o in 0..outer {
        for i in 0..inner {
            lane.clear();
            lane.extend((0..n).map(|j| (x[(o * n + j) * inner + i], j)));
            let order = |a: &(T, usize), b: &(T, usize)| ranks_before(*a, *b, largest);
            if k < n && k > 0 {
                lane.select_nth_unstable_by(k - 1, order);
            }
            lane[..k].sort_unstable_by(order);
            for (p, &(_, j)) in lane[..k].iter().enumerate() {
                out[(o * k + p) * inner + i] = j as u32;
            }
        }
    }
    Some(out)
}
