//! bf16 matrix products of the jit (`train.precision: bf16`): both operands rounded to
//! bf16 (round to nearest even), products of pairs summed in f32, with the AVX512-BF16
//! dot-product instruction (`vdpbf16ps`) where the CPU has it.
//!
//! Layout. An operand pair `(x[2p], x[2p + 1])` along the reduction axis is one 32-bit
//! word (the even element in the low half), which is what `vdpbf16ps` multiplies lane by
//! lane. The left operand is packed row by row (`[m_padded][k_pairs]`, `m` padded to a
//! whole micro-tile with zero rows), the right one into panels of [`NR`] columns
//! (`[panels][k_pairs][NR]`, short columns padded with zeros), an odd `k` padded with a
//! zero element. The micro-kernel keeps an [`MR`] × [`NR`] tile of f32 sums in 16 vector
//! registers; each pair step loads two vectors of the panel and broadcasts one word per row.
//! Rows are taken in blocks of [`MC`] so that a block of the left operand and the whole
//! packed right operand stay in L2 while every panel passes over the block.
//!
//! The same micro-kernel is also built on plain AVX-512F ([`Dot::Emulated`]: the pair
//! split into two f32 vectors and two fmas), so that the packing, the blocking and the
//! numbers can be tested and measured on a CPU without the instruction. Both compute
//! `Σ_p (a_even·b_even + a_odd·b_odd)` with exact bf16 products and f32 sums; they may differ
//! in the last bit of a pair's sum (and the instruction treats subnormal inputs as zero).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of a micro-tile.
pub const MR: usize = 8;
/// Columns of a micro-tile (two vectors of 16 f32).
pub const NR: usize = 32;
/// Rows of the left operand per cache block.
const MC: usize = 128;
/// Work (multiply-adds) above which a product is split over the threads.
const PARALLEL_WORK: usize = 1 << 21;

/// How the pairs' dot products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dot {
    /// `vdpbf16ps` (AVX512-BF16).
    Hardware,
    /// The same sums on AVX-512F: each pair word split into two f32 vectors and two fmas
    /// (slower than f32 products: it exists to test and measure the kernel anywhere).
    Emulated,
}

impl Dot {
    /// The way this CPU can run: `Hardware` with AVX512-BF16, `Emulated` with AVX-512F
    /// only, `None` without AVX-512F (or off x86-64).
    pub fn detect() -> Option<Dot> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(if is_x86_feature_detected!("avx512bf16") { Dot::Hardware } else { Dot::Emulated });
            }
        }
        None
    }

    /// Whether this CPU can run the kernel in this way.
    pub fn available(self) -> bool {
        match (self, Dot::detect()) {
            (_, None) => false,
            (Dot::Hardware, Some(found)) => found == Dot::Hardware,
            (Dot::Emulated, Some(_)) => true,
        }
    }
}

/// `x` rounded to bf16 (to nearest, ties to even), as its 16 bits; a NaN stays a NaN.
/// Branch-free, so that the packing loops vectorise.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if bits & 0x7fff_ffff > 0x7f80_0000 { quiet_nan } else { rounded }) as u16
}

/// The f32 a bf16 stands for (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// One pair word: `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// A logical `[rows, cols]` matrix stored row-major with `stored_cols` columns, read
/// transposed when `trans`: element `(r, c)` is at `r * row_step + c * col_step`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    row_step: usize,
    col_step: usize,
}

impl View<'_> {
    fn new(data: &[f32], stored_cols: usize, trans: bool) -> View<'_> {
        let (row_step, col_step) = if trans { (1, stored_cols) } else { (stored_cols, 1) };
        View { data, row_step, col_step }
    }

    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_step + c * self.col_step]
    }
}

/// The left operand `[m, k]` as pair words, `m` rounded up to whole tiles of [`MR`] rows
/// (zero rows), and the strides of word `(row, pair)` in it: row-major (`[rows][k_pairs]`,
/// converted row by row) when `a` is stored row-major; in panels of [`MR`] rows
/// (`[rows / MR][k_pairs][MR]`, converted two stored rows at a time) when it is read
/// transposed. Either way the tile of rows `r..r + MR` starts at word `r * k_pairs`.
fn pack_left(a: View, m: usize, k: usize, k_pairs: usize) -> (Vec<u32>, LeftStrides) {
    let rows = m.div_ceil(MR) * MR;
    let mut out = vec![0u32; rows * k_pairs];
    if a.col_step == 1 {
        for (r, dst) in out.chunks_exact_mut(k_pairs).take(m).enumerate() {
            let row = &a.data[r * a.row_step..r * a.row_step + k];
            for (d, two) in dst.iter_mut().zip(row.chunks_exact(2)) {
                *d = pair(two[0], two[1]);
            }
            if k % 2 == 1 {
                dst[k_pairs - 1] = pair(row[k - 1], 0.0);
            }
        }
        (out, LeftStrides { row: k_pairs, pair: 1 })
    } else {
        // Stored row `l` of a transposed operand is column `l` of the logical one: each
        // pair of stored rows fills word `p` of every row.
        for p in 0..k_pairs {
            let even = &a.data[2 * p * a.col_step..2 * p * a.col_step + m];
            let odd = (2 * p + 1 < k).then(|| &a.data[(2 * p + 1) * a.col_step..(2 * p + 1) * a.col_step + m]);
            for (tile, words) in out.chunks_exact_mut(k_pairs * MR).enumerate() {
                let first = tile * MR;
                let dst = &mut words[p * MR..(p + 1) * MR];
                let count = (m - first.min(m)).min(MR);
                for (i, d) in dst.iter_mut().enumerate().take(count) {
                    *d = pair(even[first + i], odd.map_or(0.0, |o| o[first + i]));
                }
            }
        }
        (out, LeftStrides { row: 1, pair: MR })
    }
}

/// Where word `(row, pair)` of a tile of the packed left operand is: `row * row + pair * pair`.
#[derive(Clone, Copy)]
struct LeftStrides {
    row: usize,
    pair: usize,
}

/// The right operand `[k, n]` as panels of pair words, `[n_panels][k_pairs][NR]`.
fn pack_right(b: View, k: usize, n: usize, k_pairs: usize) -> Vec<u32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0u32; panels * k_pairs * NR];
    for (panel, dst) in out.chunks_exact_mut(k_pairs * NR).enumerate() {
        let (c0, c1) = (panel * NR, ((panel + 1) * NR).min(n));
        for (p, words) in dst.chunks_exact_mut(NR).enumerate() {
            let (r0, r1) = (2 * p, 2 * p + 1);
            if b.col_step == 1 && r1 < k {
                let (even, odd) = (&b.data[r0 * b.row_step + c0..], &b.data[r1 * b.row_step + c0..]);
                for ((w, &lo), &hi) in words.iter_mut().zip(&even[..c1 - c0]).zip(&odd[..c1 - c0]) {
                    *w = pair(lo, hi);
                }
            } else {
                for (c, w) in (c0..c1).zip(words.iter_mut()) {
                    *w = pair(b.at(r0, c), if r1 < k { b.at(r1, c) } else { 0.0 });
                }
            }
        }
    }
    out
}

/// Generates a micro-kernel: the `MR × NR` tile at `out` (row stride `ldc`, `rows × cols`
/// of it written) from `left` (a tile of `MR` rows of `k_pairs` words at `strides`) and one
/// packed panel. `$dot(acc, a_pair_vector, b_pair_vector)` is the pair step.
macro_rules! micro_kernel {
    ($name:ident, $features:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            k_pairs: usize,
            left: *const u32,
            strides: LeftStrides,
            panel: *const u32,
            out: *mut f32,
            ldc: usize,
            rows: usize,
            cols: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for p in 0..k_pairs {
                let b0 = _mm512_loadu_si512(panel.add(p * NR) as *const _);
                let b1 = _mm512_loadu_si512(panel.add(p * NR + 16) as *const _);
                for (r, tile_row) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(*left.add(r * strides.row + p * strides.pair) as i32);
                    tile_row[0] = $dot(tile_row[0], a, b0);
                    tile_row[1] = $dot(tile_row[1], a, b1);
                }
            }
            for (r, tile_row) in acc.iter().enumerate().take(rows) {
                let row = out.add(r * ldc);
                for (half, &v) in tile_row.iter().enumerate() {
                    let first = half * 16;
                    if cols >= first + 16 {
                        _mm512_storeu_ps(row.add(first), v);
                    } else if cols > first {
                        let mask: __mmask16 = (1u32 << (cols - first)) as u16 - 1;
                        _mm512_mask_storeu_ps(row.add(first), mask, v);
                    }
                }
            }
        }
    };
}

/// `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot_hardware(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: bit casts of 512-bit vectors.
    unsafe {
        _mm512_dpbf16_ps(acc, std::mem::transmute::<__m512i, __m512bh>(a), std::mem::transmute::<__m512i, __m512bh>(b))
    }
}

/// What `vdpbf16ps` computes, on AVX-512F: the odd elements' product added first.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn dot_emulated(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let (a_odd, b_odd) =
        (_mm512_castsi512_ps(_mm512_and_si512(a, high)), _mm512_castsi512_ps(_mm512_and_si512(b, high)));
    let (a_even, b_even) =
        (_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
    _mm512_fmadd_ps(a_even, b_even, _mm512_fmadd_ps(a_odd, b_odd, acc))
}

/// The signature of the micro-kernels [`micro_kernel!`] makes.
#[cfg(target_arch = "x86_64")]
type TileKernel = unsafe fn(usize, *const u32, LeftStrides, *const u32, *mut f32, usize, usize, usize);

micro_kernel!(tile_hardware, "avx512f,avx512bf16", dot_hardware);
micro_kernel!(tile_emulated, "avx512f", dot_emulated);

/// Rows `rows` of the product from the packed operands into `out` (the rows' slice).
#[allow(clippy::too_many_arguments)]
fn rows_block(
    dot: Dot,
    left: &[u32],
    strides: LeftStrides,
    right: &[u32],
    k_pairs: usize,
    n: usize,
    out: &mut [f32],
    rows: usize,
) {
    let panels = n.div_ceil(NR);
    // The micro-kernel of `dot`, chosen once.
    #[cfg(target_arch = "x86_64")]
    let tile: TileKernel = match dot {
        Dot::Hardware => tile_hardware,
        Dot::Emulated => tile_emulated,
    };
    for block in (0..rows).step_by(MC) {
        let block_end = (block + MC).min(rows);
        for panel in 0..panels {
            let cols = (n - panel * NR).min(NR);
            let panel_words = &right[panel * k_pairs * NR..(panel + 1) * k_pairs * NR];
            for r in (block..block_end).step_by(MR) {
                let tile_rows = (block_end - r).min(MR);
                let tile_left = &left[r * k_pairs..(r + MR) * k_pairs];
                let tile_out = &mut out[r * n + panel * NR..(r + tile_rows - 1) * n + panel * NR + cols];
                // SAFETY: `tile_left` holds MR rows of `k_pairs` words (the packing pads to
                // whole tiles), the panel `k_pairs × NR` words, and `tile_out` reaches the
                // last element written (row `tile_rows - 1`, column `cols - 1` of the tile,
                // at stride `n`); the CPU has the features (`Dot::available`, checked by the
                // caller).
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    tile(
                        k_pairs,
                        tile_left.as_ptr(),
                        strides,
                        panel_words.as_ptr(),
                        tile_out.as_mut_ptr(),
                        n,
                        tile_rows,
                        cols,
                    );
                }
            }
        }
    }
}

/// `out[m, n] = bf16(op(a))[m, k] · bf16(op(b))[k, n]` with f32 sums, every element of
/// `out` written; operands as in the f32 `gemm_into` (row-major with `a_cols`/`b_cols`
/// stored columns, transposed when `ta`/`tb`). Large products split their rows over
/// `threads` (at most two halves). Panics when `dot` is not [`Dot::available`].
#[allow(clippy::too_many_arguments)]
pub fn product(
    dot: Dot,
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
    threads: usize,
) {
    assert!(dot.available(), "the bf16 product's {dot:?} kernel needs a CPU feature this one lacks");
    assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "bf16 operands shorter than their shapes");
    if m == 0 || n == 0 {
        return;
    }
    let k_pairs = k.div_ceil(2);
    let (left, strides) = pack_left(View::new(a, a_cols, ta), m, k, k_pairs);
    let right = pack_right(View::new(b, b_cols, tb), k, n, k_pairs);
    let out = &mut out[..m * n];
    if threads > 1 && m >= 2 * MR && m * n * k >= PARALLEL_WORK {
        let half = (m / 2).div_ceil(MR) * MR;
        let (lo, hi) = out.split_at_mut(half * n);
        let (left_lo, left_hi) = left.split_at(half * k_pairs);
        std::thread::scope(|s| {
            s.spawn(|| rows_block(dot, left_lo, strides, &right, k_pairs, n, lo, half));
            rows_block(dot, left_hi, strides, &right, k_pairs, n, hi, m - half);
        });
    } else {
        rows_block(dot, &left, strides, &right, k_pairs, n, out, m);
    }
}
