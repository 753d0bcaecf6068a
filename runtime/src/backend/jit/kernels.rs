//! The fast f32 kernels of the `jit` backend. Each returns `Ok(None)` for a case it does
//! not cover, and the caller falls back to the op's eval rule. Output buffers come from
//! the executor's [`Pool`]; operands this node is the last reader of may be taken
//! ([`Operands::take`]) instead of copied: a reshape of such an operand is the same
//! buffer with a new shape, a slice along the first axis shortens it in place, and a
//! `SparseRows` keeps its ids and values as they are.

use super::pool::Pool;
use crate::backend::interp::Operands;
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::tensor::{Tensor, Value};
use gemm::Parallelism;

/// Work (multiply-adds) above which a GEMM is split over threads.
const GEMM_PARALLEL_WORK: usize = 1 << 21;
/// Elements above which an elementwise kernel is split over threads.
const ELEMENTWISE_PARALLEL: usize = 1 << 17;

pub fn fast(op: &Op, operands: &mut Operands<f32>, cx: &EvalCx, threads: usize, pool: &mut Pool) -> Result<Option<Value<f32>>, ExecError> {
    if let Some(v) = moved(op, operands, cx)? {
        return Ok(Some(v));
    }
    let args = operands.args(op)?;
    let name = || op.name();
    Ok(match op {
        Op::MatMul { trans_a, trans_b } => Some(Value::Dense(matmul(
            args[0].dense(&name())?,
            args[1].dense(&name())?,
            *trans_a,
            *trans_b,
            cx.out_shape,
            threads,
            pool,
        ))),
        Op::Binary(b) => binary(*b, args[0].dense(&name())?, args[1].dense(&name())?, cx.out_shape, threads, pool).map(Value::Dense),
        Op::Unary(u) => Some(Value::Dense(unary(*u, args[0].dense(&name())?, threads, pool))),
        Op::Reduce { op: r, axes, .. } => reduce(*r, args[0].dense(&name())?, axes, cx.out_shape, pool).map(Value::Dense),
        Op::Softmax { axis } => softmax_last_axis(args[0].dense(&name())?, *axis, threads, pool).map(Value::Dense),
        Op::Broadcast { .. } => Some(Value::Dense(broadcast(args[0].dense(&name())?, cx.out_shape, pool))),
        Op::Concat { axis } if args.iter().all(|a| a.dense("concat").is_ok()) => {
            let parts: Vec<&Tensor<f32>> = args.iter().map(|a| a.dense("concat")).collect::<Result<_, _>>()?;
            Some(Value::Dense(concat(&parts, *axis, cx.out_shape, pool)))
        }
        Op::Gather => {
            let (table, ids) = (args[0].dense(&name())?, args[1].ids(&name())?);
            Some(Value::Dense(gather(table, &ids.data, cx.out_shape, threads, pool).map_err(|(id, limit)| ExecError::IdOutOfRange { op: name(), id, limit })?))
        }
        Op::Reshape { .. } if matches!(args[0], Arg::Param(_) | Arg::Value(Value::Dense(_))) => {
            let x = args[0].dense(&name())?;
            let mut data = pool.take(x.data.len());
            data.copy_from_slice(&x.data);
            Some(Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data }))
        }
        _ => None,
    })
}

/// The ops that reuse an operand this node is the last reader of: a reshape (the same
/// elements in the same order), a slice along the first axis (a prefix after moving the
/// kept rows to the front) and `SparseRows` (its ids and values as they are). `None` when
/// the operand cannot be taken (it is read later, fed, or a parameter).
fn moved(op: &Op, operands: &mut Operands<f32>, cx: &EvalCx) -> Result<Option<Value<f32>>, ExecError> {
    let out = cx.out_shape;
    let bad = |message: &str| ExecError::BadOperand { op: op.name(), message: message.into() };
    match op {
        Op::Reshape { .. } => Ok(match operands.take(0) {
            Some(Value::Dense(t)) => Some(Value::Dense(Tensor { shape: out.to_vec(), data: t.data })),
            Some(Value::Ids(t)) => Some(Value::Ids(Tensor { shape: out.to_vec(), data: t.data })),
            Some(_) => return Err(bad("cannot reshape a row-sparse gradient")),
            None => None,
        }),
        Op::Slice { axis, start, .. } => {
            let Some(x) = operands.arg(0) else { return Ok(None) };
            let shape = match x {
                Arg::Value(Value::Dense(t)) | Arg::Param(t) => &t.shape,
                Arg::Value(Value::Ids(t)) => &t.shape,
                Arg::Value(_) => return Ok(None),
            };
            // Only a slice whose kept elements are one contiguous run.
            if shape[..*axis].iter().any(|&d| d != 1) {
                return Ok(None);
            }
            let inner: usize = shape[axis + 1..].iter().product();
            let (start, len, size) = (cx.size(start)?, out[*axis], shape[*axis]);
            if start + len > size {
                return Ok(None);
            }
            let (from, n) = (start * inner, len * inner);
            fn cut<E: Copy>(mut data: Vec<E>, from: usize, n: usize) -> Vec<E> {
                data.copy_within(from..from + n, 0);
                data.truncate(n);
                data
            }
            Ok(match operands.take(0) {
                Some(Value::Dense(t)) => Some(Value::Dense(Tensor { shape: out.to_vec(), data: cut(t.data, from, n) })),
                Some(Value::Ids(t)) => Some(Value::Ids(Tensor { shape: out.to_vec(), data: cut(t.data, from, n) })),
                Some(_) => return Err(bad("cannot slice a row-sparse gradient")),
                None => None,
            })
        }
        Op::SparseRows { .. } => {
            let name = op.name();
            let limit = out[0];
            {
                let ids = operands.arg(0).ok_or_else(|| bad("an operand was freed too early"))?.ids(&name)?;
                if let Some(&id) = ids.data.iter().find(|&&id| id as usize >= limit) {
                    return Err(ExecError::IdOutOfRange { op: name, id, limit });
                }
                operands.arg(1).ok_or_else(|| bad("an operand was freed too early"))?.dense(&name)?;
            }
            let rows = match operands.take(0) {
                Some(Value::Ids(t)) => t.data,
                Some(_) => return Err(bad("expected ids")),
                None => operands.arg(0).ok_or_else(|| bad("an operand was freed too early"))?.ids(&name)?.data.clone(),
            };
            let data = match operands.take(1) {
                Some(Value::Dense(t)) => t.data,
                Some(_) => return Err(bad("expected a dense tensor")),
                None => operands.arg(1).ok_or_else(|| bad("an operand was freed too early"))?.dense(&name)?.data.clone(),
            };
            let mut value_shape = vec![rows.len()];
            value_shape.extend_from_slice(&out[1..]);
            Ok(Some(Value::RowSparse { shape: out.to_vec(), rows, values: Tensor { shape: value_shape, data } }))
        }
        _ => Ok(None),
    }
}

// ------------------------------------------------------------------ matmul

/// Row and column strides of the logical matrix stored row-major as `[rows, cols]`,
/// transposed or not.
fn strides(cols: usize, trans: bool) -> (isize, isize) {
    if trans {
        (1, cols as isize)
    } else {
        (cols as isize, 1)
    }
}

fn matmul(a: &Tensor<f32>, b: &Tensor<f32>, ta: bool, tb: bool, out_shape: &[usize], threads: usize, pool: &mut Pool) -> Tensor<f32> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (a_rows, a_cols) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (b_rows, b_cols) = (b.shape[rb - 2], b.shape[rb - 1]);
    let (m, k) = if ta { (a_cols, a_rows) } else { (a_rows, a_cols) };
    let n = if tb { b_rows } else { b_cols };
    let batch: usize = a.shape[..ra - 2].iter().product();
    // Every element is written (gemm with `read_dst` off), so the buffer need not be zeros.
    let mut out = if m == 0 || n == 0 || k == 0 { vec![0.0f32; out_shape.iter().product()] } else { pool.take(out_shape.iter().product()) };
    let (a_rs, a_cs) = strides(a_cols, ta);
    let (b_rs, b_cs) = strides(b_cols, tb);
    let par = |work: usize| if threads > 1 && work >= GEMM_PARALLEL_WORK { Parallelism::Rayon(threads) } else { Parallelism::None };
    if m == 0 || n == 0 {
        return Tensor { shape: out_shape.to_vec(), data: out };
    }
    // SAFETY (all gemm calls below): every pointer addresses a live buffer whose extent
    // covers the rows × cols reached through the given strides, by the shape rule of MatMul.
    if rb == 2 && !ta {
        // Shared right operand: all leading axes of `a` are rows of one product.
        let rows = batch * m;
        unsafe {
            gemm::gemm(
                rows, n, k, out.as_mut_ptr(), 1, n as isize, false, a.data.as_ptr(), a_cs, a_rs, b.data.as_ptr(), b_cs, b_rs,
                0.0, 1.0, false, false, false, par(rows * n * k),
            );
        }
    } else {
        let a_step = a_rows * a_cols;
        let b_step = if rb == 2 { 0 } else { b_rows * b_cols };
        // One product per leading index. Products too small to split themselves (attention
        // scores: [N, d] @ [d, N] per sample) are split by leading index over the threads.
        let products = |first: usize, out: &mut [f32], par: Parallelism| {
            for (j, o) in out.chunks_exact_mut(m * n).enumerate() {
                let i = first + j;
                unsafe {
                    gemm::gemm(
                        m, n, k, o.as_mut_ptr(), 1, n as isize, false, a.data.as_ptr().add(i * a_step), a_cs, a_rs,
                        b.data.as_ptr().add(i * b_step), b_cs, b_rs, 0.0, 1.0, false, false, false, par,
                    );
                }
            }
        };
        let each = m * n * k;
        if threads > 1 && batch > 1 && each < GEMM_PARALLEL_WORK && batch * each >= GEMM_PARALLEL_WORK {
            let half = batch / 2;
            let (lo, hi) = out.split_at_mut(half * m * n);
            std::thread::scope(|s| {
                s.spawn(|| products(0, lo, Parallelism::None));
                products(half, hi, Parallelism::None);
            });
        } else {
            products(0, &mut out, par(each));
        }
    }
    Tensor { shape: out_shape.to_vec(), data: out }
}

// ------------------------------------------------------------------ softmax

/// Softmax over the last axis (`None` for other axes: the eval rule does those), rows split
/// over the threads. Per row: the maximum, `exp(x - max)` summed in order, then each
/// divided by the sum — the eval rule's operations in its order, so the result is
/// bit-identical to interp.
fn softmax_last_axis(x: &Tensor<f32>, axis: usize, threads: usize, pool: &mut Pool) -> Option<Tensor<f32>> {
    if axis + 1 != x.shape.len() || x.data.is_empty() {
        return None;
    }
    let size = x.shape[axis];
    let mut out = pool.take(x.data.len());
    split(&mut out, threads, size, |off, o| {
        let len = o.len();
        for (row, src) in o.chunks_exact_mut(size).zip(x.data[off..off + len].chunks_exact(size)) {
            let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut total = 0.0f32;
            for (y, &v) in row.iter_mut().zip(src) {
                let e = (v - max).exp();
                *y = e;
                total += e;
            }
            for y in row.iter_mut() {
                *y /= total;
            }
        }
    });
    Some(Tensor { shape: x.shape.clone(), data: out })
}

// ------------------------------------------------------------------ elementwise

/// Runs `f(offset, out_chunk)` over `out` in one or two pieces.
fn split<F: Fn(usize, &mut [f32]) + Sync>(out: &mut [f32], threads: usize, align: usize, f: F) {
    let n = out.len();
    if threads < 2 || n < ELEMENTWISE_PARALLEL {
        f(0, out);
        return;
    }
    let half = (n / 2).div_ceil(align.max(1)) * align.max(1);
    let (lo, hi) = out.split_at_mut(half.min(n));
    std::thread::scope(|s| {
        s.spawn(|| f(0, lo));
        f(half.min(n), hi);
    });
}

fn unary(u: UnaryOp, x: &Tensor<f32>, threads: usize, pool: &mut Pool) -> Tensor<f32> {
    let mut out = pool.take(x.data.len());
    macro_rules! map {
        ($f:expr) => {
            split(&mut out, threads, 1, |off, o| {
                let len = o.len();
                let src = &x.data[off..off + len];
                for (d, &v) in o.iter_mut().zip(src) {
                    *d = $f(v);
                }
            })
        };
    }
    match u {
        UnaryOp::Neg => map!(|v: f32| -v),
        UnaryOp::Exp => map!(|v: f32| v.exp()),
        UnaryOp::Log => map!(|v: f32| v.ln()),
        UnaryOp::Sqrt => map!(|v: f32| v.sqrt()),
        UnaryOp::Recip => map!(|v: f32| 1.0 / v),
        UnaryOp::Relu => map!(|v: f32| if v > 0.0 { v } else { 0.0 }),
        UnaryOp::Sigmoid => map!(|v: f32| if v >= 0.0 { 1.0 / (1.0 + (-v).exp()) } else { let e = v.exp(); e / (1.0 + e) }),
        UnaryOp::Tanh => map!(|v: f32| v.tanh()),
        UnaryOp::Softplus => map!(|v: f32| v.max(0.0) + (-v.abs()).exp().ln_1p()),
        UnaryOp::Abs => map!(|v: f32| v.abs()),
        UnaryOp::Step => map!(|v: f32| if v > 0.0 { 1.0 } else { 0.0 }),
        UnaryOp::Sign => map!(|v: f32| if v > 0.0 { 1.0 } else if v < 0.0 { -1.0 } else { 0.0 }),
    }
    Tensor { shape: x.shape.clone(), data: out }
}

/// How operand `b` broadcasts against `a` (whose shape is the output's).
enum Pattern {
    /// Same number of elements in the same order.
    Same,
    /// One value.
    Scalar,
    /// `b` repeats every `period` elements (a bias over the trailing axes).
    Cycle(usize),
    /// Each run of `run` elements of `a` meets one element of `b` (a per-row scale).
    Runs(usize),
}

fn pattern(a: &[usize], b: &[usize]) -> Option<Pattern> {
    let nb: usize = b.iter().product();
    let na: usize = a.iter().product();
    if a == b {
        return Some(Pattern::Same);
    }
    if nb == 1 {
        return Some(Pattern::Scalar);
    }
    // Align b to a's rank (leading 1s).
    if b.len() > a.len() {
        return None;
    }
    let mut bb = vec![1usize; a.len() - b.len()];
    bb.extend_from_slice(b);
    // Trailing match: b = [1, .., 1, a[j..]] → cycle.
    if (0..=a.len()).any(|j| bb[..j].iter().all(|&d| d == 1) && bb[j..] == a[j..]) {
        return Some(Pattern::Cycle(nb.max(1)));
    }
    // Leading match: b = [a[..j], 1, .., 1] → runs.
    if (0..=a.len()).any(|j| bb[..j] == a[..j] && bb[j..].iter().all(|&d| d == 1)) {
        return Some(Pattern::Runs(na / nb.max(1)));
    }
    None
}

fn binary(op: BinaryOp, a: &Tensor<f32>, b: &Tensor<f32>, out_shape: &[usize], threads: usize, pool: &mut Pool) -> Option<Tensor<f32>> {
    // Put the operand with the output's shape first; remember whether we swapped.
    let (big, small, swapped) = if a.shape == out_shape {
        (a, b, false)
    } else if b.shape == out_shape {
        (b, a, true)
    } else {
        return None;
    };
    let pat = pattern(&big.shape, &small.shape)?;
    let mut out = pool.take(big.data.len());
    macro_rules! apply {
        ($f:expr) => {{
            let f = $f;
            let g = |x: f32, y: f32| if swapped { f(y, x) } else { f(x, y) };
            match pat {
                Pattern::Same => split(&mut out, threads, 1, |off, o| {
                    let len = o.len();
                    let (x, y) = (&big.data[off..off + len], &small.data[off..off + len]);
                    for ((d, &p), &q) in o.iter_mut().zip(x).zip(y) {
                        *d = g(p, q);
                    }
                }),
                Pattern::Scalar => {
                    let q = small.data[0];
                    split(&mut out, threads, 1, |off, o| {
                        let len = o.len();
                        for (d, &p) in o.iter_mut().zip(&big.data[off..off + len]) {
                            *d = g(p, q);
                        }
                    })
                }
                Pattern::Cycle(period) => split(&mut out, threads, period, |off, o| {
                    for (c, chunk) in o.chunks_mut(period).enumerate() {
                        let x = &big.data[off + c * period..off + c * period + chunk.len()];
                        for ((d, &p), &q) in chunk.iter_mut().zip(x).zip(&small.data) {
                            *d = g(p, q);
                        }
                    }
                }),
                Pattern::Runs(run) => split(&mut out, threads, run, |off, o| {
                    for (c, chunk) in o.chunks_mut(run).enumerate() {
                        let q = small.data[(off / run) + c];
                        let x = &big.data[off + c * run..off + c * run + chunk.len()];
                        for (d, &p) in chunk.iter_mut().zip(x) {
                            *d = g(p, q);
                        }
                    }
                }),
            }
        }};
    }
    match op {
        BinaryOp::Add => apply!(|x: f32, y: f32| x + y),
        BinaryOp::Sub => apply!(|x: f32, y: f32| x - y),
        BinaryOp::Mul => apply!(|x: f32, y: f32| x * y),
        BinaryOp::Div => apply!(|x: f32, y: f32| x / y),
        BinaryOp::Max => apply!(|x: f32, y: f32| if x >= y { x } else { y }),
        BinaryOp::Min => apply!(|x: f32, y: f32| if x <= y { x } else { y }),
        BinaryOp::Gt => apply!(|x: f32, y: f32| if x > y { 1.0 } else { 0.0 }),
        BinaryOp::Eq => apply!(|x: f32, y: f32| if x == y { 1.0 } else { 0.0 }),
    }
    Some(Tensor { shape: out_shape.to_vec(), data: out })
}

// ------------------------------------------------------------------ reductions

/// Sum or mean over a contiguous run of axes (`[outer, reduced, inner]` after grouping).
fn reduce(op: ReduceOp, x: &Tensor<f32>, axes: &[usize], out_shape: &[usize], pool: &mut Pool) -> Option<Tensor<f32>> {
    if op == ReduceOp::Max || axes.is_empty() || axes.windows(2).any(|w| w[1] != w[0] + 1) {
        return None;
    }
    let (first, last) = (axes[0], axes[axes.len() - 1]);
    let outer: usize = x.shape[..first].iter().product();
    let red: usize = x.shape[first..=last].iter().product();
    let inner: usize = x.shape[last + 1..].iter().product();
    let mut out = pool.zeroed(outer * inner);
    if inner == 1 {
        for (o, row) in out.iter_mut().zip(x.data.chunks(red.max(1))) {
            *o = row.iter().sum();
        }
    } else {
        for i in 0..outer {
            let dst = &mut out[i * inner..(i + 1) * inner];
            for r in 0..red {
                let src = &x.data[(i * red + r) * inner..(i * red + r + 1) * inner];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
    }
    if op == ReduceOp::Mean && red > 0 {
        let s = 1.0 / red as f32;
        out.iter_mut().for_each(|v| *v *= s);
    }
    Some(Tensor { shape: out_shape.to_vec(), data: out })
}

// ------------------------------------------------------------------ layout

/// Rows of `table` by id, copied into one pooled buffer (split over two threads when
/// large); `Err((id, rows))` for the first id outside the table, before anything is copied.
fn gather(table: &Tensor<f32>, ids: &[u32], out_shape: &[usize], threads: usize, pool: &mut Pool) -> Result<Tensor<f32>, (u32, usize)> {
    let limit = table.shape[0];
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= limit) {
        return Err((id, limit));
    }
    let width: usize = table.shape[1..].iter().product();
    let mut out = pool.take(ids.len() * width);
    if width > 0 {
        let copy = |first: usize, out: &mut [f32]| {
            for (dst, &id) in out.chunks_exact_mut(width).zip(&ids[first..]) {
                let id = id as usize;
                dst.copy_from_slice(&table.data[id * width..(id + 1) * width]);
            }
        };
        if threads > 1 && out.len() >= ELEMENTWISE_PARALLEL && ids.len() >= 2 {
            let half = ids.len() / 2;
            let (lo, hi) = out.split_at_mut(half * width);
            std::thread::scope(|s| {
                s.spawn(|| copy(0, lo));
                copy(half, hi);
            });
        } else {
            copy(0, &mut out);
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// Numpy broadcast of `x` to `out_shape` as block copies: the trailing axes where input
/// and output agree form a contiguous block; a broadcast last axis becomes runs of fills.
fn broadcast(x: &Tensor<f32>, out_shape: &[usize], pool: &mut Pool) -> Tensor<f32> {
    let rank = out_shape.len();
    let mut ins = vec![1usize; rank - x.shape.len()];
    ins.extend_from_slice(&x.shape);
    let total: usize = out_shape.iter().product();
    let mut out = pool.take(total);
    let mut at = 0usize;
    // Trailing axes equal in both: one contiguous block per outer index.
    let mut t = rank;
    while t > 0 && ins[t - 1] == out_shape[t - 1] {
        t -= 1;
    }
    let block: usize = out_shape[t..].iter().product();
    // Input strides (0 on broadcast axes) over the outer axes.
    let mut in_strides = vec![0usize; t];
    let mut acc = block;
    for a in (0..t).rev() {
        in_strides[a] = if ins[a] == 1 { 0 } else { acc };
        acc *= ins[a];
    }
    let outer: usize = out_shape[..t].iter().product();
    let mut idx = vec![0usize; t];
    let mut src = 0usize;
    for _ in 0..outer {
        out[at..at + block].copy_from_slice(&x.data[src..src + block]);
        at += block;
        // Advance the multi-index and the source offset.
        for a in (0..t).rev() {
            idx[a] += 1;
            src += in_strides[a];
            if idx[a] < out_shape[a] {
                break;
            }
            src -= in_strides[a] * idx[a];
            idx[a] = 0;
        }
    }
    Tensor { shape: out_shape.to_vec(), data: out }
}

/// Concatenation along `axis`: per outer index, each part's contiguous slab in turn.
fn concat(parts: &[&Tensor<f32>], axis: usize, out_shape: &[usize], pool: &mut Pool) -> Tensor<f32> {
    let outer: usize = out_shape[..axis].iter().product();
    let total: usize = out_shape.iter().product();
    let slabs: Vec<usize> = parts.iter().map(|p| p.shape[axis..].iter().product()).collect();
    let mut out = pool.take(total);
    let mut at = 0usize;
    for o in 0..outer {
        for (p, &w) in parts.iter().zip(&slabs) {
            out[at..at + w].copy_from_slice(&p.data[o * w..(o + 1) * w]);
            at += w;
        }
    }
    Tensor { shape: out_shape.to_vec(), data: out }
}
