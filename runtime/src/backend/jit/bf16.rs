//! bf16 matrix products of the jit (`train.precision: bf16`): both operands rounded to
//! bf16 (round to nearest even), products of pairs summed in f32, on AMX-BF16's tiles or
//! AVX512-BF16's dot-product instruction, whichever the CPU has ([`Dot`]).
//!
//! Layout. An operand pair `(x[2p], x[2p + 1])` along the reduction axis is one 32-bit
//! word (the even element in the low half), which is what both instructions multiply.
//! Every kernel reads the same packing, so the one that runs anywhere ([`Dot::Emulated`])
//! tests the packing of all of them:
//! - the left operand `[m, k]` in blocks of [`BLOCK_ROWS`] rows (the last padded with zero
//!   rows), each row's `k / 2` words padded with zero words to `stride`, a whole number of
//!   [`TILE`] words, and each block stored as `stride / 16` chunks of `[32 rows][16 words]`
//!   ([`left_word`]): the two AMX tiles a step of the reduction reads are 2 KB in one run
//!   (measured 12–18 % faster products than rows of `stride` words, whose tiles gather 32
//!   lines 1.5 KB apart);
//! - the right one `[k, n]` in panels of [`NR`] columns, `[n_panels][stride][NR]`, short
//!   panels and the padding words zero (an AMX tile of it is 16 pair rows of 16 columns).
//!
//! Each thread packs its own rows of the left operand; the right one is packed once. The
//! threads are rayon's, as for every product ([`super::product`]): a thread that used AMX
//! keeps its tile state, where a fresh one would fault it in.
//!
//! Kernels. [`Dot::Amx`] keeps a 32 × 32 block of f32 sums in four tiles and steps over
//! the reduction 32 elements at a time: two tiles of the left operand, two of the right,
//! four `tdpbf16ps` (each 16 × 16 × 32 products), the left tiles of a later step
//! prefetched into L1. [`Dot::Avx512Bf16`] keeps an [`MR`] ×
//! [`NR`] tile of sums in 16 vector registers; each pair step loads two vectors of the
//! panel, broadcasts one word per row and issues `vdpbf16ps`. On the Xeons that have both,
//! `vdpbf16ps` runs no faster than f32 fmas (measured: half `gemm`'s f32 speed with the
//! packing), so only AMX makes bf16 pay there. Rows are taken in blocks so that a block of
//! the left operand and a panel stay in L2 while the panels pass over the block.
//!
//! The `vdpbf16ps` micro-kernel is also built on plain AVX-512F ([`Dot::Emulated`]: the pair
//! split into two f32 vectors and two fmas), so that the packing, the blocking and the
//! numbers can be tested and measured on a CPU without either instruction. All compute
//! `Σ_p (a_even·b_even + a_odd·b_odd)` with exact bf16 products and f32 sums; they may differ
//! in the rounding of a pair's sum and the order of the sums (and the instructions treat
//! subnormal inputs as zero).
//!
//! Hand-written (no maintained Rust crate multiplies bf16 on AMX): AMX's instructions are
//! not stable intrinsics in Rust 1.95, so they are `asm!`, and Linux hands a process the
//! tiles' state only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once, in
//! [`Dot::detect`]).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::pool::Pool;
use super::ProductOperands;

/// Rows of a `vdpbf16ps` micro-tile.
pub const MR: usize = 8;
/// Columns of a panel of the right operand (two vectors of 16 f32, two AMX tiles).
pub const NR: usize = 32;
/// Rows and pair words of an AMX tile (16 rows of 64 bytes).
pub const TILE: usize = 16;
/// The left operand's rows are packed in blocks of this many (an AMX block of sums).
pub const BLOCK_ROWS: usize = 2 * TILE;
/// Rows of the left operand per cache block (`vdpbf16ps`).
const MC: usize = 128;
/// Rows of the left operand per cache block (AMX; measured flat from 32 to 512 on
/// [4096, 768]·[768, 256], slower over all 4096 rows).
const MC_AMX: usize = 256;
/// Work (multiply-adds) above which a product is split over the threads.
const PARALLEL_WORK: usize = 1 << 21;

/// How the pairs' dot products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dot {
    /// AMX-BF16's `tdpbf16ps` on tiles of 16 × 32 and 32 × 16 bf16.
    Amx,
    /// AVX512-BF16's `vdpbf16ps`.
    Avx512Bf16,
    /// The `vdpbf16ps` sums on AVX-512F: each pair word split into two f32 vectors and two
    /// fmas (slower than f32 products: it exists to test and measure the kernel anywhere).
    Emulated,
}

impl Dot {
    /// Every kernel, fastest first.
    pub const ALL: [Dot; 3] = [Dot::Amx, Dot::Avx512Bf16, Dot::Emulated];

    /// The fastest kernel this CPU runs, `None` without AVX-512F (or off x86-64).
    pub fn detect() -> Option<Dot> {
        Dot::ALL.into_iter().find(|d| d.available())
    }

    /// Whether this CPU can run the kernel: AVX-512F for all three, AVX512-BF16 for
    /// `Avx512Bf16`, AMX-TILE and AMX-BF16 (and the kernel's leave to use the tiles) for `Amx`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if !is_x86_feature_detected!("avx512f") {
                return false;
            }
            match self {
                Dot::Emulated => true,
                Dot::Avx512Bf16 => is_x86_feature_detected!("avx512bf16"),
                Dot::Amx => amx::usable(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// What the kernel computes with, in words (for the run's log and `products-bench`).
    pub fn describe(self) -> &'static str {
        match self {
            Dot::Amx => "AMX-BF16 tiles, tdpbf16ps",
            Dot::Avx512Bf16 => "AVX512-BF16 vdpbf16ps",
            Dot::Emulated => "vdpbf16ps emulated on AVX-512F",
        }
    }

    /// The name `MDL_BF16_KERNEL` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            Dot::Amx => "amx",
            Dot::Avx512Bf16 => "avx512bf16",
            Dot::Emulated => "emulated",
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
}

/// Where word `p` of row `r` of the packed left operand is (see the module's doc).
pub fn left_word(r: usize, p: usize, stride: usize) -> usize {
    (r / BLOCK_ROWS) * BLOCK_ROWS * stride + (p / TILE) * BLOCK_ROWS * TILE + (r % BLOCK_ROWS) * TILE + p % TILE
}

/// A buffer of the jit's [`Pool`] as pair words (the packed operands live in the pool, so a
/// step's packing reuses the buffers of the step before: a fresh allocation of megabytes
/// paid its page faults on every product, as long as the packing itself).
fn words(buf: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid
    // for both; the slice is borrowed for the result's lifetime.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u32, buf.len()) }
}

/// Words of the packed left operand for `rows` rows (padded to whole blocks).
fn left_len(rows: usize, stride: usize) -> usize {
    rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * stride
}

/// The packing of both operands into pair words, in AVX-512F vectors: each operand is read
/// once and its words written in 64-byte runs, whichever way it is stored (a transposed
/// operand goes through 16 × 16 transposes of words in registers). Measured: the scalar
/// packing it replaces took as long as AMX's products themselves.
#[cfg(target_arch = "x86_64")]
mod pack {
    use super::{View, BLOCK_ROWS, NR, TILE};
    use std::arch::x86_64::*;

    /// Lanes `0..count` of 16 f32 from `p` (the rest zero).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32, count: usize) -> __m512 {
        if count >= 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << count) - 1) as u16, p)
        }
    }

    /// Each lane rounded to bf16 as [`super::to_bf16`] rounds it, in the lane's low 16 bits.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32(bits, 16);
        let bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
        let quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, quiet_nan)
    }

    /// Lane `i`: the pair word of `even[i]` and `odd[i]` (lanes `count..` zero; `odd`
    /// `None`: zero halves).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn words_across(even: *const f32, odd: Option<*const f32>, count: usize) -> __m512i {
        let lo = round(load(even, count));
        match odd {
            Some(odd) => _mm512_or_si512(lo, _mm512_slli_epi32(round(load(odd, count)), 16)),
            None => lo,
        }
    }

    /// Lane `p`: the pair word of `x[2p]` and `x[2p + 1]`, from the `count` floats at `x`
    /// (at most 32; the rest zero).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn words_along(x: *const f32, count: usize) -> __m512i {
        let lo = _mm512_cvtepi32_epi16(round(load(x, count.min(16))));
        let hi =
            if count > 16 { _mm512_cvtepi32_epi16(round(load(x.add(16), count - 16))) } else { _mm256_setzero_si256() };
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    /// Transposes 16 × 16 words in place: lane `j` of `rows[i]` goes to lane `i` of `rows[j]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose(rows: &mut [__m512i; 16]) {
        // Pairs of rows interleaved by 32-bit, then 64-bit lanes, then 128-bit blocks twice.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
        }
        for i in 0..4 {
            for j in 0..2 {
                rows[4 * i + 2 * j] = _mm512_unpacklo_epi64(t[4 * i + j], t[4 * i + 2 + j]);
                rows[4 * i + 2 * j + 1] = _mm512_unpackhi_epi64(t[4 * i + j], t[4 * i + 2 + j]);
            }
        }
        for i in 0..2 {
            for j in 0..4 {
                t[8 * i + j] = _mm512_shuffle_i32x4(rows[8 * i + j], rows[8 * i + 4 + j], 0x88);
                t[8 * i + 4 + j] = _mm512_shuffle_i32x4(rows[8 * i + j], rows[8 * i + 4 + j], 0xdd);
            }
        }
        for j in 0..8 {
            rows[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
            rows[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
        }
    }

    /// Rows `first..first + rows` of the left operand `[m, k]` as pair words into `out`
    /// (any contents before), in blocks of BLOCK_ROWS rows ([`super::left_word`]; zero
    /// rows and zero words beyond `k`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds the operand; `stride >= k / 2` is a multiple of 16;
    /// `out` holds [`super::left_len`] words.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn left(a: View, first: usize, rows: usize, k: usize, stride: usize, out: &mut [u32]) {
        let k_pairs = k.div_ceil(2);
        let padded = super::left_len(rows, stride);
        assert!(out.len() >= padded);
        if !rows.is_multiple_of(BLOCK_ROWS) {
            out[rows / BLOCK_ROWS * BLOCK_ROWS * stride..padded].fill(0);
        }
        let dst = out.as_mut_ptr() as *mut __m512i;
        if a.col_step == 1 {
            for r in 0..rows {
                let row = a.data[(first + r) * a.row_step..][..k].as_ptr();
                for p in (0..k_pairs).step_by(TILE) {
                    let words = words_along(row.add(2 * p), (k - 2 * p).min(2 * TILE));
                    _mm512_storeu_si512(dst.byte_add(super::left_word(r, p, stride) * 4), words);
                }
            }
        } else {
            // Stored row `l` is column `l` of the logical operand: 16 rows' words `p..p + 16`
            // come from 32 stored rows, across, and are transposed into place.
            assert!(a.data.len() >= (k - 1) * a.col_step + first + rows);
            let mut block = [_mm512_setzero_si512(); 16];
            for r in (0..rows).step_by(TILE) {
                let count = (rows - r).min(TILE);
                for p in (0..k_pairs).step_by(TILE) {
                    for (i, words) in block.iter_mut().enumerate() {
                        let (even, odd) = (2 * (p + i), 2 * (p + i) + 1);
                        let at = |l: usize| a.data.as_ptr().add(l * a.col_step + first + r);
                        *words = if even >= k {
                            _mm512_setzero_si512()
                        } else {
                            words_across(at(even), (odd < k).then(|| at(odd)), count)
                        };
                    }
                    transpose(&mut block);
                    for (i, &words) in block.iter().enumerate().take(count) {
                        _mm512_storeu_si512(dst.byte_add(super::left_word(r + i, p, stride) * 4), words);
                    }
                }
            }
        }
    }

    /// The right operand `[k, n]` as panels of pair words, `[n_panels][stride][NR]` (zero
    /// words beyond `k` and `n`), into `out` (any contents before).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `b` holds the operand; `stride >= k / 2` is a multiple of 16;
    /// `out` holds `n_panels · stride · NR` words.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn right(b: View, k: usize, n: usize, stride: usize, out: &mut [u32]) {
        let k_pairs = k.div_ceil(2);
        let len = n.div_ceil(NR) * stride * NR;
        out[..len].fill(0);
        // Word (p, c): panel c / NR, its row p, lane c % NR.
        let base = out.as_mut_ptr() as *mut __m512i;
        let at = |p: usize, c: usize| base.byte_add(((c / NR * stride + p) * NR + c % NR) * 4);
        if b.col_step == 1 {
            assert!(b.data.len() >= (k - 1) * b.row_step + n);
            for p in 0..k_pairs {
                let row = |l: usize| b.data.as_ptr().add(l * b.row_step);
                for c in (0..n).step_by(TILE) {
                    let words = words_across(
                        row(2 * p).add(c),
                        (2 * p + 1 < k).then(|| row(2 * p + 1).add(c)),
                        (n - c).min(TILE),
                    );
                    _mm512_storeu_si512(at(p, c), words);
                }
            }
        } else {
            // Column `c` of the logical operand is stored row `c`: 16 columns' words
            // `p..p + 16` come from 16 stored rows, along, and are transposed into place.
            let mut block = [_mm512_setzero_si512(); 16];
            for c in (0..n).step_by(TILE) {
                let count = (n - c).min(TILE);
                for p in (0..k_pairs).step_by(TILE) {
                    for (i, words) in block.iter_mut().enumerate() {
                        *words = if i < count {
                            let column = b.data[(c + i) * b.col_step..][..k].as_ptr();
                            words_along(column.add(2 * p), (k - 2 * p).min(2 * TILE))
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    transpose(&mut block);
                    for (i, &words) in block.iter().enumerate().take(k_pairs - p) {
                        _mm512_storeu_si512(at(p + i, c), words);
                    }
                }
            }
        }
    }
}

/// Generates a `vdpbf16ps`-style micro-kernel: the `MR × NR` tile at `out` (row stride
/// `ldc`, `rows × cols` of it written) from `left` (word 0 of the first of `MR` packed rows,
/// [`left_word`]: word `p` of row `i` at `(p / 16) · 512 + i · 16 + p % 16`;
/// `k_pairs` of them used) and one packed panel. `$dot(acc, a_pair_vector, b_pair_vector)`
/// is the pair step.
macro_rules! micro_kernel {
    ($name:ident, $features:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            k_pairs: usize,
            left: *const u32,
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
                    let a = _mm512_set1_epi32(*left.add((p / TILE) * BLOCK_ROWS * TILE + r * TILE + p % TILE) as i32);
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
type TileKernel = unsafe fn(usize, *const u32, *const u32, *mut f32, usize, usize, usize);

micro_kernel!(tile_hardware, "avx512f,avx512bf16", dot_hardware);
micro_kernel!(tile_emulated, "avx512f", dot_emulated);

/// The `rows` rows of the product whose packed left operand is `left`, into `out` (those
/// rows' slice), with a vector micro-kernel.
#[allow(clippy::too_many_arguments)]
fn vector_rows(
    dot: Dot,
    left: &[u32],
    stride: usize,
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
        Dot::Avx512Bf16 => tile_hardware,
        Dot::Emulated => tile_emulated,
        Dot::Amx => unreachable!("AMX products run in amx::rows"),
    };
    for block in (0..rows).step_by(MC) {
        let block_end = (block + MC).min(rows);
        for panel in 0..panels {
            let cols = (n - panel * NR).min(NR);
            let panel_words = &right[panel * stride * NR..(panel + 1) * stride * NR];
            for r in (block..block_end).step_by(MR) {
                let tile_rows = (block_end - r).min(MR);
                let tile_left = &left[left_word(r, 0, stride)..left_word(r + MR - 1, stride - 1, stride) + 1];
                let tile_out = &mut out[r * n + panel * NR..(r + tile_rows - 1) * n + panel * NR + cols];
                // SAFETY: `tile_left` reaches word `stride - 1 >= k_pairs - 1` of the tile's
                // last row (the packing pads to whole blocks of rows), the panel `stride × NR` words, and
                // `tile_out` reaches the last element written (row `tile_rows - 1`, column
                // `cols - 1` of the tile, at stride `n`); the CPU has the features
                // (`Dot::available`, checked by `product`).
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    tile(k_pairs, tile_left.as_ptr(), panel_words.as_ptr(), tile_out.as_mut_ptr(), n, tile_rows, cols);
                }
            }
        }
    }
}

/// The AMX kernel: the tiles' configuration, Linux's leave to use them, and the block
/// loop. `tmm0..tmm3` hold a 32 × 32 block of sums (rows 0–15 and 16–31 by columns 0–15
/// and 16–31), `tmm4`, `tmm5` the left operand's two row tiles, `tmm6`, `tmm7` the panel's
/// two column tiles.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{BLOCK_ROWS, MC_AMX, NR, TILE};
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    /// How many steps along the reduction ahead the left operand's tiles are prefetched
    /// into L1 (its 32 lines per step): measured +8 % on `products-bench`'s shapes, three
    /// rounds alternated with none, 1, 2 and 4 steps (2 and 4 alike; the right operand's
    /// tiles too: no further gain).
    const PREFETCH_STEPS: usize = 4;

    /// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and
    /// Linux lets this process use the tiles' state (asked once).
    pub fn usable() -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| {
            // CPUID leaf 7 exists on every x86-64 CPU with AVX-512F (checked first).
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
            tile && bf16 && ask_for_tiles()
        })
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux (5.16 and later)
    /// gives a process the tiles' state only when asked; it fails on older kernels.
    #[cfg(target_os = "linux")]
    fn ask_for_tiles() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request about this process's permissions; no memory is passed.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn ask_for_tiles() -> bool {
        false
    }

    /// `ldtilecfg`'s 64 bytes: palette 1, tiles 0–7 of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn full_tiles() -> Config {
            let mut bytes = [0u8; 64];
            bytes[0] = 1;
            for t in 0..8 {
                bytes[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
                bytes[48 + t] = TILE as u8; // rows
            }
            Config(bytes)
        }
    }

    /// A tile of sums stored where the block's edge cuts it, then copied in part.
    #[repr(C, align(64))]
    struct Scratch([[f32; TILE]; TILE]);

    /// Stores sum tile `$t` at rows `$r`, columns `$c` of `out` (`n` columns, `rows` rows),
    /// through the scratch tile where the output ends inside it.
    macro_rules! store {
        ($t:literal, $out:expr, $n:expr, $rows:expr, $r:expr, $c:expr, $scratch:expr) => {{
            let (r, c, n, rows) = ($r, $c, $n, $rows);
            if r < rows && c < n {
                let (valid_rows, valid_cols) = ((rows - r).min(TILE), (n - c).min(TILE));
                if valid_rows == TILE && valid_cols == TILE {
                    asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $out.add(r * n + c), s = in(reg) n * 4, options(nostack));
                } else {
                    asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $scratch.0.as_mut_ptr(), s = in(reg) TILE * 4, options(nostack));
                    for i in 0..valid_rows {
                        std::ptr::copy_nonoverlapping($scratch.0[i].as_ptr(), $out.add((r + i) * n + c), valid_cols);
                    }
                }
            }
        }};
    }

    /// The `rows` rows of the product whose packed left operand is `left` (blocks of
    /// BLOCK_ROWS rows, [`super::left_word`]), into `out` (those rows, `n` columns), from the packed right
    /// operand (`[panels][stride][NR]`).
    ///
    /// # Safety
    /// [`usable`] is true; `left` and `right` are packed as [`super::product`] packs them,
    /// `stride` a multiple of [`TILE`]; `out` holds `rows × n` elements.
    pub unsafe fn rows(left: &[u32], stride: usize, right: &[u32], n: usize, out: *mut f32, rows: usize) {
        let config = Config::full_tiles();
        let mut scratch = Scratch([[0.0; TILE]; TILE]);
        let padded_rows = rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS;
        debug_assert!(left.len() >= padded_rows * stride && right.len() >= n.div_ceil(NR) * stride * NR);
        let (left_bytes, panel_bytes) = (TILE * 4, NR * 4);
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack));
        for block in (0..padded_rows).step_by(MC_AMX) {
            for panel in 0..n.div_ceil(NR) {
                let panel_words = right.as_ptr().add(panel * stride * NR);
                for r in (block..(block + MC_AMX).min(padded_rows)).step_by(BLOCK_ROWS) {
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    let block = left.as_ptr().add(super::left_word(r, 0, stride));
                    for p in (0..stride).step_by(TILE) {
                        let top = block.add(p * BLOCK_ROWS);
                        // The left tiles of the step PREFETCH_STEPS ahead (into the next
                        // block of rows at the end of this one: the packing is contiguous).
                        let ahead = top.wrapping_add(PREFETCH_STEPS * TILE * BLOCK_ROWS) as *const i8;
                        for line in 0..BLOCK_ROWS {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
                        }
                        asm!(
                            "tileloadd tmm4, [{top} + {lb}*1]",
                            "tileloadd tmm5, [{bottom} + {lb}*1]",
                            "tileloadd tmm6, [{b0} + {pb}*1]",
                            "tileloadd tmm7, [{b1} + {pb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            top = in(reg) top,
                            bottom = in(reg) top.add(TILE * TILE),
                            lb = in(reg) left_bytes,
                            b0 = in(reg) panel_words.add(p * NR),
                            b1 = in(reg) panel_words.add(p * NR + TILE),
                            pb = in(reg) panel_bytes,
                            options(nostack, readonly),
                        );
                    }
                    let c = panel * NR;
                    store!("0", out, n, rows, r, c, scratch);
                    store!("1", out, n, rows, r, c + TILE, scratch);
                    store!("2", out, n, rows, r + TILE, c, scratch);
                    store!("3", out, n, rows, r + TILE, c + TILE, scratch);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// `out[m, n] = bf16(op(a))[m, k] · bf16(op(b))[k, n]` with f32 sums, every element of
/// `out` written ([`ProductOperands`]). Large products split their rows over `threads`, each
/// thread packing its own rows; the packed operands' buffers come from `pool` and go back
/// to it. Panics when `dot` is not [`Dot::available`].
pub fn product(dot: Dot, out: &mut [f32], p: ProductOperands, threads: usize, pool: &mut Pool) {
    let ProductOperands { m, n, k, a, ta, a_cols, b, tb, b_cols } = p;
    assert!(dot.available(), "the bf16 product's {dot:?} kernel needs a CPU feature this one lacks");
    assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "bf16 operands shorter than their shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    // Off x86-64 no kernel is available (asserted above).
    #[cfg(target_arch = "x86_64")]
    {
        let k_pairs = k.div_ceil(2);
        let stride = k_pairs.div_ceil(TILE) * TILE;
        let mut right_words = pool.take(n.div_ceil(NR) * stride * NR);
        // SAFETY: `dot.available()` implies AVX-512F; the operands hold their shapes
        // (asserted); `stride` is a multiple of 16 of at least `k / 2`; the buffer was
        // taken for the panels.
        unsafe { pack::right(View::new(b, b_cols, tb), k, n, stride, words(&mut right_words)) };
        let a = View::new(a, a_cols, ta);
        let parts = if m * n * k >= PARALLEL_WORK { threads.clamp(1, m.div_ceil(BLOCK_ROWS)) } else { 1 };
        let part_rows = m.div_ceil(parts).div_ceil(BLOCK_ROWS) * BLOCK_ROWS;
        let mut lefts: Vec<Vec<f32>> =
            (0..m.div_ceil(part_rows)).map(|i| pool.take(left_len(part_rows.min(m - i * part_rows), stride))).collect();
        let right: &[u32] = words(&mut right_words);
        let run = move |first: usize, out: &mut [f32], left: &mut Vec<f32>| {
            let rows = out.len() / n;
            let left = words(left);
            // SAFETY: as for the right operand; the rows are the operand's, and `left` was
            // taken for them.
            unsafe { pack::left(a, first, rows, k, stride, left) };
            match dot {
                // SAFETY: `product` asserted AMX usable; `left` and `right` are packed here
                // with `stride` a multiple of TILE; `out` holds `rows × n` elements.
                Dot::Amx => unsafe { amx::rows(left, stride, right, n, out.as_mut_ptr(), rows) },
                _ => vector_rows(dot, left, stride, right, k_pairs, n, out, rows),
            }
        };
        let mut chunks = out[..m * n].chunks_mut(part_rows * n).zip(lefts.iter_mut()).enumerate();
        let (_, (first_chunk, first_left)) = chunks.next().expect("m > 0");
        let run = &run;
        rayon::scope(|s| {
            for (i, (chunk, left)) in chunks {
                s.spawn(move |_| run(i * part_rows, chunk, left));
            }
            run(0, first_chunk, first_left);
        });
        pool.put(right_words);
        for left in lefts {
            pool.put(left);
        }
    }
}
