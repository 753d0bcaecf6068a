//! Group products on the jit (`GroupMatMul`, `GroupOuter`): each row of a batch is
//! multiplied by the weight of its group (its domain, in STAR and Crocodile).
//!
//! Rows are counting-sorted by group once per op, the operands are gathered into that
//! order (one pooled buffer each), and every group becomes one GEMM over its contiguous
//! block of rows; `GroupMatMul` scatters its result rows back to batch order. A batch whose
//! rows already come grouped (sorted) skips the gather and the scatter. The eval rules do
//! a dot product per row and output element instead, which made STAR's step 10× slower.

use super::pool::Pool;
use super::product::{gemm_into, GEMM_PARALLEL_WORK};
use crate::exec::ExecError;
use crate::tensor::Tensor;
use gemm::Parallelism;

/// The rows of each group: group `g` holds `order[starts[g]..starts[g + 1]]`.
struct Grouping {
    order: Vec<u32>,
    starts: Vec<usize>,
    /// Whether `order` is `0..rows` (the rows already come grouped).
    sorted: bool,
}

/// Counting sort of the row indices by group (stable), or the first group id out of range
/// (named as `op`'s error).
fn grouping(idx: &[u32], groups: usize, op: &str) -> Result<Grouping, ExecError> {
    let mut starts = vec![0usize; groups + 1];
    for &g in idx {
        if g as usize >= groups {
            return Err(ExecError::IdOutOfRange { op: op.into(), id: g, limit: groups });
        }
        starts[g as usize + 1] += 1;
    }
    for g in 0..groups {
        starts[g + 1] += starts[g];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; idx.len()];
    for (row, &g) in idx.iter().enumerate() {
        order[next[g as usize]] = row as u32;
        next[g as usize] += 1;
    }
    let sorted = order.iter().enumerate().all(|(i, &r)| i == r as usize);
    Ok(Grouping { order, starts, sorted })
}

/// The rows of `x` (`width` columns each) in group order, in a pooled buffer.
fn gather_rows(x: &[f32], width: usize, order: &[u32], pool: &mut Pool) -> Vec<f32> {
    let mut out = pool.take(order.len() * width);
    for (dst, &row) in out.chunks_exact_mut(width.max(1)).zip(order) {
        let row = row as usize;
        dst.copy_from_slice(&x[row * width..(row + 1) * width]);
    }
    out
}

fn parallelism(threads: usize, work: usize) -> Parallelism {
    if threads > 1 && work >= GEMM_PARALLEL_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `y[i] = x[i] · w[idx[i]]` with `x: [N, k]`, `w: [G, k, n]` (`[G, n, k]` when `trans_w`).
pub fn group_matmul(
    name: &str,
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    idx: &[u32],
    trans_w: bool,
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, ExecError> {
    let (rows, k) = (x.shape[0], x.shape[1]);
    let groups = w.shape[0];
    let n = if trans_w { w.shape[1] } else { w.shape[2] };
    let grouping = grouping(idx, groups, name)?;
    let mut out = pool.take(rows * n);
    if n == 0 || rows == 0 {
        return Ok(Tensor { shape: vec![rows, n], data: out });
    }
    let sorted_x = (!grouping.sorted).then(|| gather_rows(&x.data, k, &grouping.order, pool));
    let mut ys = (!grouping.sorted).then(|| pool.take(rows * n));
    {
        let xs: &[f32] = sorted_x.as_deref().unwrap_or(&x.data);
        let target: &mut [f32] = ys.as_deref_mut().unwrap_or(&mut out);
        for g in 0..groups {
            let (lo, hi) = (grouping.starts[g], grouping.starts[g + 1]);
            if lo == hi {
                continue;
            }
            let block = &mut target[lo * n..hi * n];
            if k == 0 {
                block.fill(0.0);
                continue;
            }
            let wg = &w.data[g * k * n..(g + 1) * k * n];
            let par = parallelism(threads, (hi - lo) * k * n);
            gemm_into(
                block,
                hi - lo,
                n,
                k,
                &xs[lo * k..hi * k],
                false,
                k,
                wg,
                trans_w,
                if trans_w { k } else { n },
                par,
            );
        }
    }
    if let Some(ys) = &ys {
        for (src, &row) in ys.chunks_exact(n).zip(&grouping.order) {
            let row = row as usize;
            out[row * n..(row + 1) * n].copy_from_slice(src);
        }
    }
    for buf in [sorted_x, ys].into_iter().flatten() {
        pool.put(buf);
    }
    Ok(Tensor { shape: vec![rows, n], data: out })
}

/// `dw[g] = Σ_{i: idx[i] = g} x[i]ᵀ · dy[i]` with `x: [N, k]`, `dy: [N, n]`: `[G, k, n]`.
pub fn group_outer(
    name: &str,
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    idx: &[u32],
    groups: usize,
    threads: usize,
    pool: &mut Pool,
) -> Result<Tensor<f32>, ExecError> {
    let (k, n) = (x.shape[1], dy.shape[1]);
    let grouping = grouping(idx, groups, name)?;
    let mut out = pool.take(groups * k * n);
    let (xs, dys) = if grouping.sorted {
        (None, None)
    } else {
        (Some(gather_rows(&x.data, k, &grouping.order, pool)), Some(gather_rows(&dy.data, n, &grouping.order, pool)))
    };
    {
        let xs: &[f32] = xs.as_deref().unwrap_or(&x.data);
        let dys: &[f32] = dys.as_deref().unwrap_or(&dy.data);
        for (g, block) in out.chunks_exact_mut((k * n).max(1)).enumerate().take(groups) {
            let (lo, hi) = (grouping.starts[g], grouping.starts[g + 1]);
            if lo == hi {
                block.fill(0.0);
                continue;
            }
            let par = parallelism(threads, (hi - lo) * k * n);
            gemm_into(block, k, n, hi - lo, &xs[lo * k..hi * k], true, k, &dys[lo * n..hi * n], false, n, par);
        }
    }
    for buf in [xs, dys].into_iter().flatten() {
        pool.put(buf);
    }
    Ok(Tensor { shape: vec![groups, k, n], data: out })
}
