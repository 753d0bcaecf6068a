//! The jit's matrix products (`Op::MatMul`): which kernel computes a product, and how a
//! product is split over the threads.
//!
//! This module owns:
//! - [`gemm_into`]: one f32 product by the `gemm` crate, a transposed operand read through
//!   strides, never copied; at bf16 precision the kernels of [`super::bf16`] instead.
//! - [`matmul`]: the op over its leading axes. A right operand shared by every leading index
//!   makes one product of all the rows; other batches run product by product, split over
//!   the threads by leading index when each is too small to split itself (attention scores).
//!   [`matmul_into`] writes the rows a given distance apart, into a concat's slice: gemm
//!   does so itself, the other kernels through a buffer copied row by row.
//! - [`product`]: the kernel for one product, chosen by its shape:
//!   - a **vector product** (one output column, `n == 1`; one output row, `m == 1`, is the
//!     same product transposed) and an **outer product** (`k == 1`) do one multiply-add per
//!     element read or written, so memory bounds them: straight loops, the rows split over
//!     the threads, in f32 at either precision (bf16 operands would only add the packing's
//!     passes over memory). gemm ran DIN's `[409600, 64] · [64, 1]` at a third of the
//!     memory's speed;
//!   - a **long reduction into a small output** (a weight gradient `xᵀ·dy` over many rows:
//!     a layer applied to every position of a sequence, as DIN's activation unit is to
//!     B·S·L = 409600 rows) is split along the reduction, because gemm splits only the
//!     output over threads and ran such a product on one. The parts are fixed by the shape
//!     ([`reduction_parts`]), each is computed whole on one thread, and the partial
//!     products are added in part order, so the sums do not depend on the thread count;
//!   - any other product: gemm (its own threads), or the bf16 kernel.
//!
//! Products split here run on rayon's threads, as gemm's own do, never on threads spawned
//! for the product: gemm keeps its packing buffers per thread, and a fresh thread pays
//! for new ones (and DIN's forward products after a backward whose split ran on spawned
//! threads took 1.3–1.8× as long; measured with per-node timings). The other kernels
//! keep spawning scoped threads for their two halves: on rayon's threads DeepFM's step,
//! many halves of under a millisecond, took 7 % longer.

use super::bf16;
use super::kernels::split;
use super::pool::Pool;
use super::{ProductOperands, Products};
use crate::ops::linalg::batch_index;
use crate::tensor::Tensor;
use gemm::Parallelism;

/// Work (multiply-adds) above which a GEMM is split over threads.
pub(super) const GEMM_PARALLEL_WORK: usize = 1 << 21;
/// A reduction at least this long into an output of at most [`SPLIT_OUTPUT`] elements is
/// split ([`reduction_parts`]).
const SPLIT_REDUCTION: usize = 1 << 15;
/// The largest output (elements) whose product is split along the reduction: at most
/// [`SPLIT_PARTS`] partial products of this size are held at once (4 MB).
const SPLIT_OUTPUT: usize = 1 << 16;
/// The most parts a reduction is split into (each at least half of [`SPLIT_REDUCTION`]).
const SPLIT_PARTS: usize = 16;

/// Row and column strides of the logical matrix stored row-major as `[rows, cols]`,
/// transposed or not.
fn strides(cols: usize, trans: bool) -> (isize, isize) {
    if trans {
        (1, cols as isize)
    } else {
        (cols as isize, 1)
    }
}

/// `out[m, n] = op(a)[m, k] · op(b)[k, n]`, every element of `out` written. `a` is stored
/// row-major with `a_cols` columns and read transposed when `ta` (likewise `b`): a
/// transposed operand is a pair of strides, never a copy.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    a_cols: usize,
    b: &[f32],
    tb: bool,
    b_cols: usize,
    par: Parallelism,
) {
    gemm_rows_into(out, n, ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols }, par)
}

/// [`gemm_into`] of the product `p` with the output's rows `ld` elements apart (`ld >= n`;
/// the elements between rows are left alone).
fn gemm_rows_into(out: &mut [f32], ld: usize, p: ProductOperands, par: Parallelism) {
    let ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols } = p;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ld >= n && out.len() >= (m - 1) * ld + n && a.len() >= m * k && b.len() >= k * n,
        "gemm operands shorter than their shapes"
    );
    if k == 0 {
        out.chunks_mut(ld).take(m).for_each(|row| row[..n].fill(0.0));
        return;
    }
    let (a_rs, a_cs) = strides(a_cols, ta);
    let (b_rs, b_cs) = strides(b_cols, tb);
    // SAFETY: the assert above: each pointer addresses a live slice covering the rows ×
    // cols reached through its strides (`a_cols`/`b_cols` are the stored row lengths).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ld as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `MatMul` of `a` and `b` (transposed as `ta`, `tb`) into a tensor of `out_shape`.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    ta: bool,
    tb: bool,
    out_shape: &[usize],
    threads: usize,
    precision: Products,
    pool: &mut Pool,
) -> Tensor<f32> {
    // Every element is written, so the buffer need not be zeros.
    let mut out = pool.take(out_shape.iter().product());
    let n = out_shape[out_shape.len() - 1];
    let (a, b) = ((&a.data[..], &a.shape[..]), (&b.data[..], &b.shape[..]));
    matmul_into(a, b, ta, tb, out_shape, &mut out, n, threads, precision, pool);
    Tensor { shape: out_shape.to_vec(), data: out }
}

/// [`matmul`] of operands given as (values, shape) into `out`, whose rows (of the `n`
/// columns of `out_shape`) are `ld` elements apart (`ld >= n`; a concat's slice along its
/// last axis, [`super::window::concat`]): row `r` of the flattened leading axes and rows
/// starts at `out[r * ld]`. The elements between rows are left alone.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_into(
    (a_data, a_shape): (&[f32], &[usize]),
    (b_data, b_shape): (&[f32], &[usize]),
    ta: bool,
    tb: bool,
    out_shape: &[usize],
    out: &mut [f32],
    ld: usize,
    threads: usize,
    precision: Products,
    pool: &mut Pool,
) {
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (a_rows, a_cols) = (a_shape[ra - 2], a_shape[ra - 1]);
    let (b_rows, b_cols) = (b_shape[rb - 2], b_shape[rb - 1]);
    let (m, k) = if ta { (a_cols, a_rows) } else { (a_rows, a_cols) };
    let n = if tb { b_rows } else { b_cols };
    let lead = &out_shape[..out_shape.len() - 2];
    let batch: usize = lead.iter().product();
    if m == 0 || n == 0 || batch == 0 {
        return;
    }
    if rb == 2 && !ta && a_shape[..ra - 2] == *lead {
        // Shared right operand: all leading axes of `a` are rows of one product.
        let rows = batch * m;
        let operands = ProductOperands { m: rows, n, k, a: a_data, ta, a_cols, b: b_data, tb, b_cols };
        product(precision, out, operands, ld, threads, pool);
    } else {
        let (a_step, b_step) = (a_rows * a_cols, b_rows * b_cols);
        // The operands' leading index per product (numpy broadcasting of the leading axes).
        let (a_index, b_index) = (batch_index(lead, &a_shape[..ra - 2]), batch_index(lead, &b_shape[..rb - 2]));
        // One product per leading index, each `m` rows of `out`. Products too small to
        // split themselves (attention scores: [N, d] @ [d, N] per sample) are split by
        // leading index over the threads.
        let products = |first: usize, out: &mut [f32], threads: usize, pool: &mut Pool| {
            for (j, o) in out.chunks_mut(m * ld).enumerate() {
                let (ai, bi) = (a_index[first + j], b_index[first + j]);
                let (a, b) = (&a_data[ai * a_step..(ai + 1) * a_step], &b_data[bi * b_step..(bi + 1) * b_step]);
                product(precision, o, ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols }, ld, threads, pool);
            }
        };
        let each = m * n * k;
        let out = &mut out[..(batch * m - 1) * ld + n];
        if threads > 1 && batch > 1 && each < GEMM_PARALLEL_WORK && batch * each >= GEMM_PARALLEL_WORK {
            let half = batch / 2;
            let (lo, hi) = out.split_at_mut(half * m * ld);
            // The first half's thread packs bf16 operands into buffers of its own (small
            // products: below the pool's threshold).
            rayon::join(|| products(0, lo, 1, &mut Pool::default()), || products(half, hi, 1, pool));
        } else {
            products(0, out, threads, pool);
        }
    }
}

impl<'a> ProductOperands<'a> {
    /// The same product transposed: `outᵀ[n, m] = op(b)ᵀ · op(a)ᵀ` (the same memory when
    /// `m` or `n` is 1).
    fn transposed(self) -> ProductOperands<'a> {
        let ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols } = self;
        ProductOperands { m: n, n: m, k, a: b, ta: !tb, a_cols: b_cols, b: a, tb: !ta, b_cols: a_cols }
    }

    /// The product over the reduction's indices `from..to` only.
    fn reduction(self, from: usize, to: usize) -> ProductOperands<'a> {
        // A reduction index is a row of a stored transposed `a` (a column otherwise), and a
        // row of a stored plain `b` (a column of a transposed one).
        let a = if self.ta { &self.a[from * self.a_cols..] } else { &self.a[from..] };
        let b = if self.tb { &self.b[from..] } else { &self.b[from * self.b_cols..] };
        ProductOperands { k: to - from, a, b, ..self }
    }
}

/// How many parts the product of an `[m, n]` output over a reduction of `k` is split into
/// along the reduction (1: not split). Fixed by the shape: the sums are the same on any
/// number of threads.
fn reduction_parts(m: usize, n: usize, k: usize) -> usize {
    if k >= SPLIT_REDUCTION && m * n <= SPLIT_OUTPUT {
        (k / (SPLIT_REDUCTION / 2)).min(SPLIT_PARTS)
    } else {
        1
    }
}

/// `out[m, n] = op(a) · op(b)` (every element written, rows `ld` apart) on up to `threads`
/// threads, by the kernel its shape calls for (module docs). Only gemm writes rows apart;
/// the other kernels write a pooled buffer, copied row by row.
fn product(precision: Products, out: &mut [f32], p: ProductOperands, ld: usize, threads: usize, pool: &mut Pool) {
    if ld != p.n && p.m > 1 {
        let by_gemm = precision == Products::F32 && p.n > 1 && p.k > 1 && reduction_parts(p.m, p.n, p.k) == 1;
        if by_gemm {
            let par = if threads > 1 && p.m * p.n * p.k >= GEMM_PARALLEL_WORK {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            return gemm_rows_into(out, ld, p, par);
        }
        let mut rows = pool.take(p.m * p.n);
        product(precision, &mut rows, p, p.n, threads, pool);
        for (dst, src) in out.chunks_mut(ld).zip(rows.chunks_exact(p.n)) {
            dst[..p.n].copy_from_slice(src);
        }
        pool.put(rows);
        return;
    }
    // One row (`m = 1`) is contiguous whatever `ld`.
    let p = if p.m == 1 && p.n > 1 { p.transposed() } else { p };
    let parts = reduction_parts(p.m, p.n, p.k);
    if parts == 1 {
        return direct(precision, out, p, threads, pool);
    }
    let len = p.m * p.n;
    // Part 0's product goes to `out`, the others' to `partials`, added in part order.
    let mut partials = pool.take((parts - 1) * len);
    let mut slots: Vec<(usize, &mut [f32])> =
        std::iter::once(&mut out[..len]).chain(partials.chunks_exact_mut(len)).enumerate().collect();
    let run = |slots: &mut [(usize, &mut [f32])], pool: &mut Pool| {
        for (j, o) in slots {
            direct(precision, o, p.reduction(*j * p.k / parts, (*j + 1) * p.k / parts), 1, pool);
        }
    };
    let run = &run;
    // Consecutive parts per thread, on rayon's threads (module docs); the first share (part
    // 0 among them) uses `pool`, the others pack bf16 operands into buffers of their own.
    rayon::scope(|s| {
        let mut shares = slots.chunks_mut(parts.div_ceil(threads.clamp(1, parts)));
        let own = shares.next().expect("at least one part");
        for share in shares {
            s.spawn(move |_| run(share, &mut Pool::default()));
        }
        run(own, pool);
    });
    for part in partials.chunks_exact(len) {
        out[..len].iter_mut().zip(part).for_each(|(o, v)| *o += v);
    }
    pool.put(partials);
}

/// [`product`] without the split along the reduction.
fn direct(precision: Products, out: &mut [f32], p: ProductOperands, threads: usize, pool: &mut Pool) {
    let ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols } = p;
    if n == 1 {
        // op(b) is k contiguous values whether stored [k, 1] or [1, k].
        return vector(&mut out[..m], m, k, a, ta, a_cols, &b[..k], threads);
    }
    if k == 1 {
        // op(a) is m contiguous values, op(b) n.
        return outer(&mut out[..m * n], &a[..m], &b[..n], threads);
    }
    let par =
        if threads > 1 && m * n * k >= GEMM_PARALLEL_WORK { Parallelism::Rayon(threads) } else { Parallelism::None };
    match precision {
        Products::F32 => gemm_into(out, m, n, k, a, ta, a_cols, b, tb, b_cols, par),
        Products::Bf16(dot) => {
            let threads = if matches!(par, Parallelism::None) { 1 } else { threads };
            bf16::product(dot, out, p, threads, pool)
        }
    }
}

/// `out[m] = op(a)[m, k] · x[k]`.
#[allow(clippy::too_many_arguments)]
fn vector(out: &mut [f32], m: usize, k: usize, a: &[f32], ta: bool, a_cols: usize, x: &[f32], threads: usize) {
    if ta {
        // a stored [k, ·]: out accumulates x[p] times row p (the rows split by columns).
        split(out, threads, 16, |off, o| {
            o.fill(0.0);
            for (p, &xp) in x.iter().enumerate() {
                let row = &a[p * a_cols + off..][..o.len()];
                o.iter_mut().zip(row).for_each(|(o, v)| *o += xp * v);
            }
        });
    } else {
        split(out, threads, 1, |off, o| {
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(&a[(off + i) * a_cols..][..k], x);
            }
        });
    }
    debug_assert_eq!(out.len(), m);
}

/// `x · y` in sixteen lane sums (which the compiler keeps in vector registers), added at
/// the end.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (xs, ys) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(a, b)| a * b).sum();
    for (xc, yc) in xs.zip(ys) {
        for l in 0..16 {
            lanes[l] += xc[l] * yc[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out[i, j] = x[i] · y[j]`.
fn outer(out: &mut [f32], x: &[f32], y: &[f32], threads: usize) {
    let n = y.len();
    split(out, threads, n, |off, o| {
        for (row, &xi) in o.chunks_exact_mut(n).zip(&x[off / n..]) {
            row.iter_mut().zip(y).for_each(|(o, v)| *o = xi * v);
        }
    });
}
