//! The fast f32 kernels of the `jit` backend. Each returns `Ok(None)` for a case it does
//! not cover, and the caller falls back to the op's eval rule. Output buffers come from
//! the executor's [`Pool`]; operands this node is the last reader of may be taken
//! ([`Operands::take`]) instead of copied: a reshape of such an operand is the same
//! buffer with a new shape, a slice along the first axis shortens it in place, and a
//! `SparseRows` keeps its ids and values as they are.

use super::group::{group_matmul, group_outer};
use super::layout::{broadcast, concat, gather, pad, permute, scatter_add, segment_sum, slice, take_along};
use super::math;
use super::pool::Pool;
use super::{product, Products};
use crate::backend::driver::Operands;
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ops::elementwise::{BinaryLoop, UnaryLoop};
use crate::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::rng::SplitMix64;
use crate::tensor::{Tensor, Value};

/// Elements above which an elementwise kernel is split over threads.
pub(super) const ELEMENTWISE_PARALLEL: usize = 1 << 17;

/// `exact`: compute what the eval rule computes bit for bit (else softmax may use the
/// polynomial exp and reassociate its row sum, see [`super::codegen::Options`]).
pub fn fast(
    op: &Op,
    operands: &mut Operands<f32>,
    cx: &EvalCx,
    threads: usize,
    exact: bool,
    products: Products,
    pool: &mut Pool,
) -> Result<Option<Value<f32>>, ExecError> {
    if let Some(v) = moved(op, operands, cx)? {
        return Ok(Some(v));
    }
    let args = operands.args(op)?;
    let name = || op.name();
    Ok(match op {
        Op::MatMul { trans_a, trans_b } => Some(Value::Dense(product::matmul(
            args[0].dense(&name())?,
            args[1].dense(&name())?,
            *trans_a,
            *trans_b,
            cx.out_shape,
            threads,
            products,
            pool,
        ))),
        Op::Binary(b) => {
            binary(*b, args[0].dense(&name())?, args[1].dense(&name())?, cx.out_shape, threads, pool).map(Value::Dense)
        }
        Op::Unary(u) => Some(Value::Dense(unary(*u, args[0].dense(&name())?, threads, pool))),
        Op::Reduce { op: r, axes, .. } => {
            reduce(*r, args[0].dense(&name())?, axes, cx.out_shape, pool).map(Value::Dense)
        }
        Op::Softmax { axis } => softmax(args[0].dense(&name())?, *axis, threads, exact, pool).map(Value::Dense),
        Op::Broadcast { .. } => Some(Value::Dense(broadcast(args[0].dense(&name())?, cx.out_shape, pool))),
        Op::Concat { axis } if args.iter().all(|a| a.dense("concat").is_ok()) => {
            let parts: Vec<&Tensor<f32>> = args.iter().map(|a| a.dense("concat")).collect::<Result<_, _>>()?;
            Some(Value::Dense(concat(&parts, *axis, cx.out_shape, pool)))
        }
        Op::Gather => {
            let (table, ids) = (args[0].dense(&name())?, args[1].ids(&name())?);
            Some(Value::Dense(
                gather(table, &ids.data, cx.out_shape, threads, pool)
                    .map_err(|(id, limit)| ExecError::IdOutOfRange { op: name(), id, limit })?,
            ))
        }
        Op::TakeAlong { axis } => {
            let (x, ids) = (args[0].dense(&name())?, args[1].ids(&name())?);
            Some(Value::Dense(
                take_along(x, ids, *axis, cx.out_shape, threads, pool)
                    .map_err(|(id, limit)| ExecError::IdOutOfRange { op: name(), id, limit })?,
            ))
        }
        Op::ScatterAdd { axis, .. } => {
            let (src, ids) = (args[0].dense(&name())?, args[1].ids(&name())?);
            Some(Value::Dense(
                scatter_add(src, ids, *axis, cx.out_shape, threads, pool)
                    .map_err(|(id, limit)| ExecError::IdOutOfRange { op: name(), id, limit })?,
            ))
        }
        Op::SegmentSum { .. } => {
            let (x, idx) = (args[0].dense(&name())?, args[1].ids(&name())?);
            Some(Value::Dense(
                segment_sum(x, &idx.data, cx.out_shape, threads, pool)
                    .map_err(|(id, limit)| ExecError::IdOutOfRange { op: name(), id, limit })?,
            ))
        }
        Op::Slice { axis, start, .. } => match args[0].dense(&name()) {
            Ok(x) => slice(x, *axis, cx.size(start)?, cx.out_shape, threads, pool).map(Value::Dense),
            Err(_) => None,
        },
        Op::Pad { axis, before, .. } => {
            Some(Value::Dense(pad(args[0].dense(&name())?, *axis, cx.size(before)?, cx.out_shape, threads, pool)))
        }
        Op::Permute { perm } => match args[0].dense(&name()) {
            Ok(x) => Some(Value::Dense(permute(x, perm, cx.out_shape, threads, pool))),
            Err(_) => None,
        },
        Op::GroupMatMul { trans_w } => {
            let (x, w, idx) = (args[0].dense(&name())?, args[1].dense(&name())?, args[2].ids(&name())?);
            Some(Value::Dense(group_matmul(&name(), x, w, &idx.data, *trans_w, threads, pool)?))
        }
        Op::GroupOuter { groups } => {
            let (x, dy, idx) = (args[0].dense(&name())?, args[1].dense(&name())?, args[2].ids(&name())?);
            Some(Value::Dense(group_outer(&name(), x, dy, &idx.data, cx.size(groups)?, threads, pool)?))
        }
        Op::Reshape { .. } | Op::StopGrad | Op::Path { .. }
            if matches!(args[0], Arg::Param(_) | Arg::Value(Value::Dense(_))) =>
        {
            let x = args[0].dense(&name())?;
            let mut data = pool.take(x.data.len());
            data.copy_from_slice(&x.data);
            Some(Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data }))
        }
        // Training draws: dropout's mask keeps an element (scaled) unless a draw of `p`
        // drops it, a Bernoulli mask is 1 where the draw holds. Evaluation runs the eval rule.
        Op::DropMask { p, stream } if cx.mode.training && *p > 0.0 => {
            Some(Value::Dense(draw_mask(*p, *stream, 0.0, (1.0 / (1.0 - p)) as f32, cx, threads, pool)))
        }
        Op::Bernoulli { p, stream } if cx.mode.training => {
            Some(Value::Dense(draw_mask(*p, *stream, 1.0, 0.0, cx, threads, pool)))
        }
        _ => None,
    })
}

/// A mask of `cx.out_shape` whose element `i` is `hit` where the `i`-th draw of the node's
/// stream ([`SplitMix64::keyed`] by the run's seed, the step and `stream`) is below `p`
/// ([`SplitMix64::chance`]), else `miss`: the eval rules' values, bit for bit. The draws are
/// counter-based, so each thread starts its half at its own offset of the stream.
fn draw_mask(p: f64, stream: u64, hit: f32, miss: f32, cx: &EvalCx, threads: usize, pool: &mut Pool) -> Tensor<f32> {
    let n = cx.out_shape.iter().product();
    let mut data = pool.take(n);
    let start = SplitMix64::keyed(cx.mode.seed, cx.mode.step, stream);
    split(&mut data, threads, 1, |offset, out| {
        let mut rng = start.clone();
        rng.advance(offset as u64);
        for y in out.iter_mut() {
            *y = if rng.chance(p) { hit } else { miss };
        }
    });
    Tensor { shape: cx.out_shape.to_vec(), data }
}

/// The ops that reuse an operand this node is the last reader of: a reshape (the same
/// elements in the same order), a stop-gradient (the operand itself), a slice along the
/// first axis (a prefix after moving the kept rows to the front) and `SparseRows` (its ids
/// and values as they are). `None` when
/// the operand cannot be taken (it is read later, fed, or a parameter).
fn moved(op: &Op, operands: &mut Operands<f32>, cx: &EvalCx) -> Result<Option<Value<f32>>, ExecError> {
    let out = cx.out_shape;
    let bad = |message: &str| ExecError::BadOperand { op: op.name(), message: message.into() };
    match op {
        // The forward value of a stop-gradient or a path is its operand, as it is.
        Op::StopGrad | Op::Path { .. } => Ok(operands.take(0)),
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
                None => {
                    operands.arg(1).ok_or_else(|| bad("an operand was freed too early"))?.dense(&name)?.data.clone()
                }
            };
            let mut value_shape = vec![rows.len()];
            value_shape.extend_from_slice(&out[1..]);
            Ok(Some(Value::RowSparse { shape: out.to_vec(), rows, values: Tensor { shape: value_shape, data } }))
        }
        _ => Ok(None),
    }
}

// ------------------------------------------------------------------ softmax

/// Softmax over any axis, blocks of `size × inner` elements (one per outer index) split
/// over the threads: the last axis row by row ([`softmax_rows`]), another axis with the
/// `inner` positions side by side ([`softmax_columns`]), so every pass runs along
/// contiguous memory. `exact`: libm's exp, sums in order, division, the eval rule's
/// operations in its order per position, so bit-identical to interp; otherwise the
/// polynomial exp ([`math::exp`], which vectorises), a last-axis row summed in eight
/// lanes, and the reciprocal multiplied.
fn softmax(x: &Tensor<f32>, axis: usize, threads: usize, exact: bool, pool: &mut Pool) -> Option<Tensor<f32>> {
    if axis >= x.shape.len() || x.data.is_empty() {
        return None;
    }
    let size = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = pool.take(x.data.len());
    split(&mut out, threads, size * inner, |off, o| {
        let src = &x.data[off..off + o.len()];
        for (block, from) in o.chunks_exact_mut(size * inner).zip(src.chunks_exact(size * inner)) {
            if inner == 1 {
                softmax_rows(block, from, exact);
            } else {
                softmax_columns(block, from, inner, exact);
            }
        }
    });
    Some(Tensor { shape: x.shape.clone(), data: out })
}

/// One softmax over a contiguous row.
fn softmax_rows(row: &mut [f32], src: &[f32], exact: bool) {
    let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if exact {
        let mut total = 0.0f32;
        for (y, &v) in row.iter_mut().zip(src) {
            let e = (v - max).exp();
            *y = e;
            total += e;
        }
        for y in row.iter_mut() {
            *y /= total;
        }
    } else {
        for (y, &v) in row.iter_mut().zip(src) {
            *y = math::exp(v - max);
        }
        let mut lanes = [0.0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
        }
        let total = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        let inv = 1.0 / total;
        row.iter_mut().for_each(|y| *y *= inv);
    }
}

/// `inner` softmaxes at once over a `[size, inner]` block, each down a column: the
/// maxima, exponentials, sums (in order down the column) and quotients of all columns are
/// computed row after row, along contiguous memory.
fn softmax_columns(block: &mut [f32], src: &[f32], inner: usize, exact: bool) {
    let mut max = vec![f32::NEG_INFINITY; inner];
    for row in src.chunks_exact(inner) {
        max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    let mut total = vec![0.0f32; inner];
    for (dst, row) in block.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
        for (((y, &v), &m), t) in dst.iter_mut().zip(row).zip(&max).zip(total.iter_mut()) {
            let e = if exact { (v - m).exp() } else { math::exp(v - m) };
            *y = e;
            *t += e;
        }
    }
    if exact {
        for dst in block.chunks_exact_mut(inner) {
            dst.iter_mut().zip(&total).for_each(|(y, &t)| *y /= t);
        }
    } else {
        let inv: Vec<f32> = total.iter().map(|t| 1.0 / t).collect();
        for dst in block.chunks_exact_mut(inner) {
            dst.iter_mut().zip(&inv).for_each(|(y, &r)| *y *= r);
        }
    }
}

// ------------------------------------------------------------------ elementwise

/// Runs `f(offset, out_chunk)` over `out` in one or two pieces.
pub(super) fn split<F: Fn(usize, &mut [f32]) + Sync>(out: &mut [f32], threads: usize, align: usize, f: F) {
    split_if(threads >= 2 && out.len() >= ELEMENTWISE_PARALLEL, out, align, f)
}

/// Runs `f(offset, chunk)` over `out`: in two pieces on two threads when `parallel` (the
/// first piece a multiple of `align` elements), else in one.
pub(super) fn split_if<F: Fn(usize, &mut [f32]) + Sync>(parallel: bool, out: &mut [f32], align: usize, f: F) {
    let n = out.len();
    if !parallel {
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

/// `u` over `x`, with the eval rule's scalar function ([`UnaryOp::apply`]) compiled into
/// the loop for this op alone ([`UnaryOp::specialise`]).
fn unary(u: UnaryOp, x: &Tensor<f32>, threads: usize, pool: &mut Pool) -> Tensor<f32> {
    struct Map<'a> {
        x: &'a [f32],
        out: &'a mut [f32],
        threads: usize,
    }
    impl UnaryLoop<f32> for Map<'_> {
        type Output = ();
        fn run<F: Fn(f32) -> f32 + Copy + Sync>(self, f: F) {
            let src = self.x;
            split(self.out, self.threads, 1, |off, o| {
                let len = o.len();
                for (d, &v) in o.iter_mut().zip(&src[off..off + len]) {
                    *d = f(v);
                }
            })
        }
    }
    let mut out = pool.take(x.data.len());
    u.specialise(Map { x: &x.data, out: &mut out, threads });
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

fn binary(
    op: BinaryOp,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Option<Tensor<f32>> {
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
    op.specialise(Broadcast { big: &big.data, small: &small.data, swapped, pat, out: &mut out, threads });
    Some(Tensor { shape: out_shape.to_vec(), data: out })
}

/// A binary op over an operand with the output's shape (`big`) and one that broadcasts
/// against it by `pat` (`small`; the op's first operand when `swapped`), with the eval
/// rule's scalar function ([`BinaryOp::apply`]) compiled into the loops for this op alone.
struct Broadcast<'a> {
    big: &'a [f32],
    small: &'a [f32],
    swapped: bool,
    pat: Pattern,
    out: &'a mut [f32],
    threads: usize,
}

impl BinaryLoop<f32> for Broadcast<'_> {
    type Output = ();
    fn run<F: Fn(f32, f32) -> f32 + Copy + Sync>(self, f: F) {
        let Broadcast { big, small, swapped, pat, out, threads } = self;
        let g = |x: f32, y: f32| if swapped { f(y, x) } else { f(x, y) };
        match pat {
            Pattern::Same => split(out, threads, 1, |off, o| {
                let len = o.len();
                let (x, y) = (&big[off..off + len], &small[off..off + len]);
                for ((d, &p), &q) in o.iter_mut().zip(x).zip(y) {
                    *d = g(p, q);
                }
            }),
            Pattern::Scalar => {
                let q = small[0];
                split(out, threads, 1, |off, o| {
                    let len = o.len();
                    for (d, &p) in o.iter_mut().zip(&big[off..off + len]) {
                        *d = g(p, q);
                    }
                })
            }
            Pattern::Cycle(period) => split(out, threads, period, |off, o| {
                for (c, chunk) in o.chunks_mut(period).enumerate() {
                    let x = &big[off + c * period..off + c * period + chunk.len()];
                    for ((d, &p), &q) in chunk.iter_mut().zip(x).zip(small) {
                        *d = g(p, q);
                    }
                }
            }),
            Pattern::Runs(run) => split(out, threads, run, |off, o| {
                for (c, chunk) in o.chunks_mut(run).enumerate() {
                    let q = small[(off / run) + c];
                    let x = &big[off + c * run..off + c * run + chunk.len()];
                    for (d, &p) in chunk.iter_mut().zip(x) {
                        *d = g(p, q);
                    }
                }
            }),
        }
    }
}

// ------------------------------------------------------------------ reductions

/// A reduction over a contiguous run of axes (`[outer, reduced, inner]` after grouping):
/// sum or mean, or max or min ([`pick`]).
fn reduce(op: ReduceOp, x: &Tensor<f32>, axes: &[usize], out_shape: &[usize], pool: &mut Pool) -> Option<Tensor<f32>> {
    if axes.is_empty() || axes.windows(2).any(|w| w[1] != w[0] + 1) {
        return None;
    }
    let (first, last) = (axes[0], axes[axes.len() - 1]);
    let outer: usize = x.shape[..first].iter().product();
    let red: usize = x.shape[first..=last].iter().product();
    let inner: usize = x.shape[last + 1..].iter().product();
    if !op.adds() {
        return Some(Tensor { shape: out_shape.to_vec(), data: pick(op == ReduceOp::Max, x, outer, red, inner, pool) });
    }
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

/// Max (`largest`) or min over the middle axis of `x` seen as `[outer, red, inner]`: the
/// eval rule's update (a term replaces the running value when it is larger, or smaller, or
/// NaN, so NaN wins and the first of equal terms stays) in its order, so the same values
/// bit for bit, along contiguous rows.
fn pick(largest: bool, x: &Tensor<f32>, outer: usize, red: usize, inner: usize, pool: &mut Pool) -> Vec<f32> {
    let mut out = pool.take(outer * inner);
    out.fill(if largest { f32::NEG_INFINITY } else { f32::INFINITY });
    let better = |v: f32, acc: f32| v.is_nan() || if largest { v > acc } else { v < acc };
    if inner == 1 {
        for (o, row) in out.iter_mut().zip(x.data.chunks(red.max(1))) {
            for &v in row {
                if better(v, *o) {
                    *o = v;
                }
            }
        }
    } else {
        for (i, dst) in out.chunks_exact_mut(inner).enumerate() {
            for r in 0..red {
                let src = &x.data[(i * red + r) * inner..(i * red + r + 1) * inner];
                for (d, &v) in dst.iter_mut().zip(src) {
                    if better(v, *d) {
                        *d = v;
                    }
                }
            }
        }
    }
    out
}
