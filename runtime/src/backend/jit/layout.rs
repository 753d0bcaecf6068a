//! Layout kernels of the jit: ops that only move elements (gather by id, broadcast,
//! concat, slice, pad, permute, take along an axis and its adjoint scatter-add), each
//! writing a pooled buffer with block copies, split over the threads by leading rows when
//! large, and gather's adjoint, the segment sum. The eval rules in `ops::layout` compute the
//! same values into fresh vectors; these exist because a step runs them on every
//! activation and its gradient (DIN's slices, PEPNet's pads, AutoInt's head permutes).

use super::kernels::split;
use super::pool::Pool;
use crate::ops::index::AlongIds;
use crate::tensor::Tensor;

/// `dst.copy_from_slice(src)` (equal lengths) for the short runs layout ops copy per
/// outer index (16 floats per field in DIN's attention concat and its slices): eight
/// floats at a time inline, where `copy_from_slice` would call `memcpy` per run.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    if dst.len() >= 64 {
        dst.copy_from_slice(src);
        return;
    }
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let a: &mut [f32; 8] = a.try_into().expect("chunks of eight");
        let b: &[f32; 8] = b.try_into().expect("chunks of eight");
        *a = *b;
    }
    for (a, &b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = b;
    }
}

/// `(outer, inner)`: the element counts before and after `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

/// `x[.., start..start + len, ..]` along any axis: per outer index one contiguous run of
/// `len × inner` elements. `None` when the range leaves the axis (the eval rule reports it).
pub(super) fn slice(
    x: &Tensor<f32>,
    axis: usize,
    start: usize,
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Option<Tensor<f32>> {
    let (size, len) = (x.shape[axis], out_shape[axis]);
    if start + len > size {
        return None;
    }
    let (outer, inner) = around(&x.shape, axis);
    let run = len * inner;
    let mut out = pool.take(outer * run);
    if run > 0 {
        split(&mut out, threads, run, |off, o| {
            for (j, dst) in o.chunks_exact_mut(run).enumerate() {
                let base = ((off / run + j) * size + start) * inner;
                copy_run(dst, &x.data[base..base + run]);
            }
        });
    }
    Some(Tensor { shape: out_shape.to_vec(), data: out })
}

/// `before` and `after` zeros around `x` along `axis`.
pub(super) fn pad(
    x: &Tensor<f32>,
    axis: usize,
    before: usize,
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Tensor<f32> {
    let (outer, inner) = around(&x.shape, axis);
    let (run, row) = (x.shape[axis] * inner, out_shape[axis] * inner);
    let mut out = pool.take(outer * row);
    if row > 0 {
        split(&mut out, threads, row, |off, o| {
            for (j, dst) in o.chunks_exact_mut(row).enumerate() {
                let src = &x.data[(off / row + j) * run..][..run];
                let (head, rest) = dst.split_at_mut(before * inner);
                let (body, tail) = rest.split_at_mut(run);
                head.fill(0.0);
                copy_run(body, src);
                tail.fill(0.0);
            }
        });
    }
    Tensor { shape: out_shape.to_vec(), data: out }
}

/// Axes reordered: output axis `a` is input axis `perm[a]`. The output is written in order;
/// its last axis reads the input with one stride (a block copy when that stride is 1).
pub(super) fn permute(
    x: &Tensor<f32>,
    perm: &[usize],
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Tensor<f32> {
    let total: usize = out_shape.iter().product();
    let mut out = pool.take(total);
    if total == 0 {
        return Tensor { shape: out_shape.to_vec(), data: out };
    }
    let mut own = vec![1usize; x.shape.len()];
    for a in (0..x.shape.len().saturating_sub(1)).rev() {
        own[a] = own[a + 1] * x.shape[a + 1];
    }
    if x.shape.len() == 1 {
        out.copy_from_slice(&x.data);
        return Tensor { shape: out_shape.to_vec(), data: out };
    }
    let strides: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
    let row = total / out_shape[0];
    split(&mut out, threads, row, |off, o| copy_view(&x.data, out_shape, &strides, off / row, o));
    Tensor { shape: out_shape.to_vec(), data: out }
}

/// Writes the view of `src` with `shape` and element `strides`, from index `first` of axis
/// 0 on, into `out` in row-major order (as many leading rows as `out` holds).
fn copy_view(src: &[f32], shape: &[usize], strides: &[usize], first: usize, out: &mut [f32]) {
    let rank = shape.len();
    let (inner, step) = (shape[rank - 1], strides[rank - 1]);
    let mut idx = vec![0usize; rank - 1];
    let mut at = 0usize;
    if rank > 1 {
        idx[0] = first;
        at = first * strides[0];
    }
    for dst in out.chunks_exact_mut(inner) {
        if step == 1 {
            copy_run(dst, &src[at..at + inner]);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = src[at + j * step];
            }
        }
        // Advance the index over the outer axes, last fastest.
        for a in (0..rank - 1).rev() {
            idx[a] += 1;
            at += strides[a];
            if idx[a] < shape[a] || a == 0 {
                break;
            }
            at -= strides[a] * idx[a];
            idx[a] = 0;
        }
    }
}

/// Rows of `table` by id, copied into one pooled buffer (split over two threads when
/// large); `Err((id, rows))` for the first id outside the table, before anything is copied.
pub(super) fn gather(
    table: &Tensor<f32>,
    ids: &[u32],
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, (u32, usize)> {
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
                copy_run(dst, &table.data[id * width..(id + 1) * width]);
            }
        };
        split(&mut out, threads, width, |off, o| copy(off / width, o));
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// SegmentSum, the adjoint of [`gather`]: `out[g] = Σ_{i: idx[i] = g} x[i]`, the rows added
/// in order as the eval rule adds them (so the sums are its, bit for bit), with the
/// columns split over two threads when large (each thread sums its columns of every row
/// into a buffer of its own). STAR's per-domain statistics run it on every activation of
/// its partitioned normalisation and on their gradients.
pub(super) fn segment_sum(
    x: &Tensor<f32>,
    idx: &[u32],
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, (u32, usize)> {
    let segments = out_shape[0];
    if let Some(&id) = idx.iter().find(|&&id| id as usize >= segments) {
        return Err((id, segments));
    }
    let width: usize = x.shape[1..].iter().product();
    let mut out = pool.zeroed(segments * width);
    // The sums of columns `cols` of every row into `acc` (`segments` rows of that many).
    let sum_columns = |cols: std::ops::Range<usize>, acc: &mut [f32]| {
        let w = cols.len();
        for (row, &g) in x.data.chunks_exact(width).zip(idx) {
            let g = g as usize;
            for (o, &v) in acc[g * w..(g + 1) * w].iter_mut().zip(&row[cols.clone()]) {
                *o += v;
            }
        }
    };
    if threads >= 2 && x.data.len() >= super::kernels::ELEMENTWISE_PARALLEL && width >= 2 {
        let half = width / 2;
        let mut right = vec![0.0f32; segments * (width - half)];
        let mut left = vec![0.0f32; segments * half];
        std::thread::scope(|s| {
            s.spawn(|| sum_columns(half..width, &mut right));
            sum_columns(0..half, &mut left);
        });
        for (g, dst) in out.chunks_exact_mut(width).enumerate() {
            dst[..half].copy_from_slice(&left[g * half..(g + 1) * half]);
            dst[half..].copy_from_slice(&right[g * (width - half)..(g + 1) * (width - half)]);
        }
    } else if width > 0 {
        sum_columns(0..width, &mut out);
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// Numpy broadcast of `x` to `out_shape` as block copies: the trailing axes where input
/// and output agree form a contiguous block; a broadcast last axis becomes runs of fills.
pub(super) fn broadcast(x: &Tensor<f32>, out_shape: &[usize], pool: &mut Pool) -> Tensor<f32> {
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
        copy_run(&mut out[at..at + block], &x.data[src..src + block]);
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
pub(super) fn concat(parts: &[&Tensor<f32>], axis: usize, out_shape: &[usize], pool: &mut Pool) -> Tensor<f32> {
    let outer: usize = out_shape[..axis].iter().product();
    let total: usize = out_shape.iter().product();
    let slabs: Vec<usize> = parts.iter().map(|p| p.shape[axis..].iter().product()).collect();
    let mut out = pool.take(total);
    let mut at = 0usize;
    for o in 0..outer {
        for (p, &w) in parts.iter().zip(&slabs) {
            copy_run(&mut out[at..at + w], &p.data[o * w..(o + 1) * w]);
            at += w;
        }
    }
    Tensor { shape: out_shape.to_vec(), data: out }
}

/// TakeAlong: `out[o, p, i] = x[o, ids(o, p, i), i]` over the walk of [`AlongIds`], split
/// over the threads by outer index; where the ids are the same across the inner axes, each
/// one copies a run of `inner` values. `Err((id, limit))` for the first id past the axis,
/// before anything is copied.
pub(super) fn take_along(
    x: &Tensor<f32>,
    ids: &Tensor<u32>,
    axis: usize,
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, (u32, usize)> {
    let n = x.shape[axis];
    if let Some(&id) = ids.data.iter().find(|&&id| id as usize >= n) {
        return Err((id, n));
    }
    let walk = AlongIds::new(out_shape, &ids.shape, axis);
    let (len, inner) = (walk.len, walk.inner);
    let mut out = pool.take(out_shape.iter().product());
    let block = len * inner;
    if block > 0 {
        let runs = walk.runs();
        split(&mut out, threads, block, |off, o| {
            for (j, dst) in o.chunks_exact_mut(block).enumerate() {
                let outer = off / block + j;
                let src = &x.data[outer * n * inner..(outer + 1) * n * inner];
                for (p, row) in dst.chunks_exact_mut(inner).enumerate() {
                    if runs {
                        let id = ids.data[walk.at(outer, p, 0)] as usize;
                        copy_run(row, &src[id * inner..(id + 1) * inner]);
                    } else {
                        for (i, d) in row.iter_mut().enumerate() {
                            *d = src[ids.data[walk.at(outer, p, i)] as usize * inner + i];
                        }
                    }
                }
            }
        });
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// ScatterAdd: zeros with `src[o, p, i]` added at `[o, ids(o, p, i), i]`, in the eval rule's
/// order (so the same sums, bit for bit), split over the threads by outer index (each writes
/// its own block of the output). `Err((id, limit))` for the first id past the axis.
pub(super) fn scatter_add(
    src: &Tensor<f32>,
    ids: &Tensor<u32>,
    axis: usize,
    out_shape: &[usize],
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, (u32, usize)> {
    let n = out_shape[axis];
    if let Some(&id) = ids.data.iter().find(|&&id| id as usize >= n) {
        return Err((id, n));
    }
    let walk = AlongIds::new(&src.shape, &ids.shape, axis);
    let (len, inner) = (walk.len, walk.inner);
    let mut out = pool.zeroed(out_shape.iter().product());
    let block = n * inner;
    if block > 0 {
        let runs = walk.runs();
        split(&mut out, threads, block, |off, o| {
            for (j, dst) in o.chunks_exact_mut(block).enumerate() {
                let outer = off / block + j;
                let from = &src.data[outer * len * inner..(outer + 1) * len * inner];
                for (p, row) in from.chunks_exact(inner).enumerate() {
                    if runs {
                        let id = ids.data[walk.at(outer, p, 0)] as usize;
                        for (d, &v) in dst[id * inner..(id + 1) * inner].iter_mut().zip(row) {
                            *d += v;
                        }
                    } else {
                        for (i, &v) in row.iter().enumerate() {
                            dst[ids.data[walk.at(outer, p, i)] as usize * inner + i] += v;
                        }
                    }
                }
            }
        });
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}
