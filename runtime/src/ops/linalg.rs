//! Matrix products: MatMul (batched, its leading axes broadcast numpy-style), GroupMatMul,
//! GroupOuter; [`batch_index`] maps a product's leading index to its operands' (shared with
//! the jit's kernel).

use super::emit::Emit;
use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{numel, shape_to_string, Dim};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{Float, Ids, Tensor, Value};

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
            super::require_dense_real(op, x)?;
            let (a, b) = (x[0].shape, x[1].shape);
            if a.len() < 2 || b.len() < 2 {
                return shape_err(format!(
                    "matmul needs operands of rank ≥ 2, got {} and {}",
                    x[0].describe(),
                    x[1].describe()
                ));
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
            let Ok(mut out) = super::elementwise::broadcast_shapes(batch_a, batch_b) else {
                return shape_err(format!(
                    "matmul of {} and {}: leading axes {} and {} do not broadcast",
                    x[0].describe(),
                    x[1].describe(),
                    shape_to_string(batch_a),
                    shape_to_string(batch_b)
                ));
            };
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
                return shape_err(format!(
                    "group_matmul needs x [N, k] and w [G, k, n], got {} and {}",
                    x[0].describe(),
                    x[1].describe()
                ));
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
                return shape_err(format!(
                    "group_outer needs x [N, k], dy [N, n], idx [N], got {} and {}",
                    x[0].describe(),
                    x[1].describe()
                ));
            }
            Ok(Signature::dense(vec![groups.clone(), xs[1].clone(), dy[1].clone()]))
        }
        _ => shape_err(format!("{} is not a matrix product", op.name())),
    }
}

/// MatMul: `dA = dC·op(B)ᵀ`, `dB = op(A)ᵀ·dC`, written with the trans flags so no operand is
/// transposed in memory; with a shared `b: [k, n]` the leading axes of `a` and `dC` are folded
/// into rows for `dB` (one rank-2 product, no per-sample outer products). With other
/// broadcast leading axes, each product has the output's leading axes and is summed back
/// over the axes its operand was broadcast along (`Emit::unbroadcast`).
/// GroupMatMul: `dx = GroupMatMul(dy, w, !trans_w)`, `dw = GroupOuter(x, dy)` (operands
/// swapped when `trans_w`, which yields the transposed weight layout directly).
/// GroupOuter: the adjoints are GroupMatMuls with the cotangent as the weights.
pub fn grad(graph: &mut Graph, node: &Node, _y: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    let mut e = Emit::new(graph, node);
    match &node.op {
        &Op::MatMul { trans_a, trans_b } => {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            let (a_shape, b_shape) = (e.shape(a), e.shape(b));
            let shared = b_shape.len() == 2 && a_shape.len() > 2;
            if !shared && a_shape[..a_shape.len() - 2] != b_shape[..b_shape.len() - 2] {
                let da = if trans_a { e.matmul(b, dy, trans_b, true)? } else { e.matmul(dy, b, false, !trans_b)? };
                let db = if trans_b { e.matmul(dy, a, true, trans_a)? } else { e.matmul(a, dy, !trans_a, false)? };
                return Ok(vec![Some(e.unbroadcast(da, &a_shape)?), Some(e.unbroadcast(db, &b_shape)?)]);
            }
            let da = match (trans_a, shared) {
                (false, _) => e.matmul(dy, b, false, !trans_b)?,
                (true, false) => e.matmul(b, dy, trans_b, true)?,
                (true, true) => {
                    let t = e.matmul(dy, b, false, !trans_b)?;
                    e.transpose(t)?
                }
            };
            let db = if !shared {
                if trans_b {
                    e.matmul(dy, a, true, trans_a)?
                } else {
                    e.matmul(a, dy, !trans_a, false)?
                }
            } else {
                let r = a_shape.len();
                let (m, k) =
                    if trans_a { (&a_shape[r - 1], &a_shape[r - 2]) } else { (&a_shape[r - 2], &a_shape[r - 1]) };
                let rows = &numel(&a_shape[..r - 2]) * m;
                let n = e.graph.dim(dy, r - 1);
                let a_rows = if trans_a { e.transpose(a)? } else { a };
                let a2 = e.reshape(a_rows, &[rows.clone(), k.clone()])?;
                let dy2 = e.reshape(dy, &[rows, n])?;
                if trans_b {
                    e.matmul(dy2, a2, true, false)?
                } else {
                    e.matmul(a2, dy2, true, false)?
                }
            };
            Ok(vec![Some(da), Some(db)])
        }
        &Op::GroupMatMul { trans_w } => {
            let (x, w, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
            let groups = e.graph.dim(w, 0);
            let dx = e.op(Op::GroupMatMul { trans_w: !trans_w }, &[dy, w, idx])?;
            let (left, right) = if trans_w { (dy, x) } else { (x, dy) };
            let dw = e.op(Op::GroupOuter { groups }, &[left, right, idx])?;
            Ok(vec![Some(dx), Some(dw), None])
        }
        Op::GroupOuter { .. } => {
            let (x, d_right, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
            let dx = e.op(Op::GroupMatMul { trans_w: true }, &[d_right, dy, idx])?;
            let d_right_ct = e.op(Op::GroupMatMul { trans_w: false }, &[x, dy, idx])?;
            Ok(vec![Some(dx), Some(d_right_ct), None])
        }
        _ => shape_err(format!("{} is not a matrix product", node.op.name())),
    }
}

/// For each leading index of a product's output (leading axes `out`), the leading index of
/// an operand whose leading axes `lead` broadcast to them (numpy rules: missing axes on the
/// left and axes of size 1 repeat).
pub fn batch_index(out: &[usize], lead: &[usize]) -> Vec<usize> {
    let skip = out.len() - lead.len();
    let mut index = vec![0usize];
    for (d, &size) in out.iter().enumerate() {
        let own = if d < skip { 1 } else { lead[d - skip] };
        index = index.iter().flat_map(|&i| (0..size).map(move |j| i * own + if own == 1 { 0 } else { j })).collect();
    }
    index
}

/// The group of row `i`, checked against the number of groups.
fn group_of(idx: &Ids, i: usize, groups: usize, op: &str) -> Result<usize, ExecError> {
    let g = idx.data[i];
    if g as usize >= groups {
        return Err(ExecError::IdOutOfRange { op: op.into(), id: g, limit: groups });
    }
    Ok(g as usize)
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let name = op.name();
    let out = cx.out_shape;
    let mut c = vec![T::ZERO; out.iter().product()];
    match *op {
        Op::MatMul { trans_a, trans_b } => {
            let (a, b) = (args[0].dense(&name)?, args[1].dense(&name)?);
            let (ra, rb) = (a.rank(), b.rank());
            let (m, n) = (out[out.len() - 2], out[out.len() - 1]);
            let k = if trans_a { a.shape[ra - 2] } else { a.shape[ra - 1] };
            let lead = &out[..out.len() - 2];
            let (a_index, b_index) = (batch_index(lead, &a.shape[..ra - 2]), batch_index(lead, &b.shape[..rb - 2]));
            let mut b_block = vec![T::ZERO; if trans_b { k * n } else { 0 }];
            for (p, (&ai, &bi)) in a_index.iter().zip(&b_index).enumerate() {
                let a_off = ai * m * k;
                let b_off = bi * k * n;
                let c_off = p * m * n;
                // op(B) as a contiguous [k, n] block, so the inner loop runs along rows.
                let bm: &[T] = if trans_b {
                    for l in 0..k {
                        for j in 0..n {
                            b_block[l * n + j] = b.data[b_off + j * k + l];
                        }
                    }
                    &b_block
                } else {
                    &b.data[b_off..b_off + k * n]
                };
                for i in 0..m {
                    let c_row = &mut c[c_off + i * n..c_off + (i + 1) * n];
                    for l in 0..k {
                        let av = if trans_a { a.data[a_off + l * m + i] } else { a.data[a_off + i * k + l] };
                        for (cv, &bv) in c_row.iter_mut().zip(&bm[l * n..(l + 1) * n]) {
                            *cv += av * bv;
                        }
                    }
                }
            }
        }
        Op::GroupMatMul { trans_w } => {
            let (x, w, idx) = (args[0].dense(&name)?, args[1].dense(&name)?, args[2].ids(&name)?);
            let (rows, k, n) = (x.shape[0], x.shape[1], out[1]);
            let groups = w.shape[0];
            for i in 0..rows {
                let g = group_of(idx, i, groups, &name)?;
                let wg = &w.data[g * k * n..(g + 1) * k * n];
                let x_row = &x.data[i * k..(i + 1) * k];
                let y_row = &mut c[i * n..(i + 1) * n];
                if trans_w {
                    for (j, yv) in y_row.iter_mut().enumerate() {
                        *yv = x_row.iter().zip(&wg[j * k..(j + 1) * k]).fold(T::ZERO, |s, (&xv, &wv)| s + xv * wv);
                    }
                } else {
                    for (l, &xv) in x_row.iter().enumerate() {
                        for (yv, &wv) in y_row.iter_mut().zip(&wg[l * n..(l + 1) * n]) {
                            *yv += xv * wv;
                        }
                    }
                }
            }
        }
        Op::GroupOuter { .. } => {
            let (x, dy, idx) = (args[0].dense(&name)?, args[1].dense(&name)?, args[2].ids(&name)?);
            let (rows, k, n, groups) = (x.shape[0], x.shape[1], dy.shape[1], out[0]);
            for i in 0..rows {
                let g = group_of(idx, i, groups, &name)?;
                let dy_row = &dy.data[i * n..(i + 1) * n];
                for (l, &xv) in x.data[i * k..(i + 1) * k].iter().enumerate() {
                    let at = (g * k + l) * n;
                    for (cv, &dv) in c[at..at + n].iter_mut().zip(dy_row) {
                        *cv += xv * dv;
                    }
                }
            }
        }
        _ => return Err(ExecError::BadOperand { op: name, message: "not a matrix product".into() }),
    }
    Ok(Value::Dense(Tensor { shape: out.to_vec(), data: c }))
}
