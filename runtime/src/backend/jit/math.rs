//! Exp, log, sigmoid, tanh and softplus as Cranelift instruction sequences, on F32X4
//! vectors or scalar F32 alike, for the fused kernels ([`super::codegen`]).
//!
//! Cranelift has no transcendental instructions. Calling the eval rule's scalar functions
//! (one call per four lanes, each lane through libm) made these ops the slowest part of
//! the kernels that use them: DIN's attention sigmoid, RankingLoss's softplus over the
//! B × B pair matrix. Inline, they are a few multiply-adds per vector:
//!
//! - `exp(x) = 2ⁿ · p(r)`: `n = round(x / ln 2)` (by the 1.5·2²³ shifter: the rounded
//!   integer lands in the low mantissa bits), `r = x − n·ln 2` with ln 2 split in two parts
//!   (exact first product), `p` the degree-7 minimax polynomial of Cephes' `expf`, and `2ⁿ` built from `n`'s bits (as `2ⁿ⁻¹ · 2`, so that `n = 128` stays finite).
//!   Below −86.5 the result is 0, above ln(f32::MAX) it is +∞; NaN stays NaN.
//! - `log(x) = e·ln 2 + log(m)` with `x = m·2ᵉ`, `m` in [√½, √2), and `log(m)` from
//!   Cephes' `logf` polynomial in `m − 1`; subnormals are scaled by 2²³ first; 0 gives −∞,
//!   +∞ gives +∞, negatives and NaN give NaN.
//! - `sigmoid(x) = 1 / (1 + exp(−x))`; `tanh(x) = ±(1 − 2 / (exp(2|x|) + 1))`, and
//!   below |x| = 0.625, where that cancels, Cephes' odd polynomial `x + x³·q(x²)`;
//!   `softplus(x) = relu(x) + log1p(exp(−|x|))`, with `log1p(u) = log(w)·u / (w − 1)`
//!   for `w = 1 + u` (exact as `u` → 0).
//!
//! [`exp`] is the same exp in Rust, for the jit's Rust kernels (softmax).
//!
//! Each is within a few ulp of the exact result (the test in `runtime/tests/fuse.rs`
//! sweeps them against f64), as libm's are, but not bit-identical to the eval rule's. With
//! [`super::codegen::Options::inline_math`] off, kernels call the eval rule's functions
//! instead and agree with interp bit for bit.

use crate::ops::elementwise::{GELU_A, GELU_K};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

/// Emits the sequences on one lane type (`F32X4` or `F32`), with hardware fma or without.
pub(super) struct Math {
    pub ty: Type,
    pub fma: bool,
}

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above this, `exp` is +∞ (ln of f32::MAX).
const EXP_HI: f32 = 88.722_83;
/// Below this, `exp` is 0 (2ⁿ⁻¹ would leave the normal range).
const EXP_LO: f32 = -86.5;
/// `expf` minimax coefficients, highest degree first (`p(r) = 1 + r + r²·q(r)`).
const EXP_Q: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
/// `logf` coefficients, highest degree first (`log(1 + f) = f − f²/2 + f³·q(f)`).
const LOG_Q: [f32; 9] = [
    7.037_683_6e-2,
    -0.115_146_1,
    0.116_769_98,
    -0.124_201_41,
    0.142_493_23,
    -0.166_680_57,
    0.200_007_15,
    -0.249_999_94,
    0.333_333_3,
];

/// Below this |x|, tanh uses its odd polynomial (Cephes' `tanhf`, highest degree first).
const TANH_SMALL: f32 = 0.625;
const TANH_Q: [f32; 5] = [-5.704_988_7e-3, 2.063_909e-2, -5.373_971_6e-2, 0.133_314_42, -0.333_332_8];

impl Math {
    fn int_ty(&self) -> Type {
        if self.ty == types::F32X4 {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn c(&self, b: &mut FunctionBuilder, v: f32) -> Value {
        let s = b.ins().f32const(v);
        if self.ty == types::F32X4 {
            b.ins().splat(types::F32X4, s)
        } else {
            s
        }
    }

    fn ci(&self, b: &mut FunctionBuilder, v: i32) -> Value {
        let s = b.ins().iconst(types::I32, v as i64);
        if self.ty == types::F32X4 {
            b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    fn to_int(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        b.ins().bitcast(self.int_ty(), MemFlagsData::new(), x)
    }

    fn to_float(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        b.ins().bitcast(self.ty, MemFlagsData::new(), x)
    }

    /// `a·x + c`, one rounding with hardware fma.
    fn madd(&self, b: &mut FunctionBuilder, a: Value, x: Value, c: Value) -> Value {
        if self.fma {
            b.ins().fma(a, x, c)
        } else {
            let p = b.ins().fmul(a, x);
            b.ins().fadd(p, c)
        }
    }

    /// Horner's rule over `coefs` (highest degree first) at `x`.
    fn poly(&self, b: &mut FunctionBuilder, coefs: &[f32], x: Value) -> Value {
        let mut q = self.c(b, coefs[0]);
        for &k in &coefs[1..] {
            let k = self.c(b, k);
            q = self.madd(b, q, x, k);
        }
        q
    }

    /// `mask ? x : y`, `mask` from an `fcmp` on this lane type.
    pub fn select(&self, b: &mut FunctionBuilder, mask: Value, x: Value, y: Value) -> Value {
        if self.ty == types::F32X4 {
            let m = b.ins().bitcast(types::F32X4, MemFlagsData::new(), mask);
            b.ins().bitselect(m, x, y)
        } else {
            b.ins().select(mask, x, y)
        }
    }

    pub fn exp(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        // No clamp (Cranelift's NaN-propagating fmin/fmax cost seven instructions each):
        // outside [EXP_LO, EXP_HI] the lanes compute garbage that the selects at the end
        // replace; NaN stays NaN throughout.
        let (hi, lo) = (self.c(b, EXP_HI), self.c(b, EXP_LO));
        let xc = x;
        let (log2e, shifter) = (self.c(b, std::f32::consts::LOG2_E), self.c(b, 12_582_912.0));
        let t = self.madd(b, xc, log2e, shifter);
        let n = b.ins().fsub(t, shifter);
        let (ln2_hi, ln2_lo) = (self.c(b, -LN2_HI), self.c(b, -LN2_LO));
        let r = self.madd(b, n, ln2_hi, xc);
        let r = self.madd(b, n, ln2_lo, r);
        let q = self.poly(b, &EXP_Q, r);
        let r2 = b.ins().fmul(r, r);
        let p = self.madd(b, q, r2, r);
        let one = self.c(b, 1.0);
        let p = b.ins().fadd(p, one);
        // 2ⁿ⁻¹ from the shifter's low bits (n sits in them as a two's-complement integer).
        let bits = self.to_int(b, t);
        let shift = b.ins().iconst(types::I32, 23);
        let exponent = b.ins().ishl(bits, shift);
        let half_bias = self.ci(b, 0x3F00_0000);
        let scale_bits = b.ins().iadd(exponent, half_bias);
        let scale = self.to_float(b, scale_bits);
        let y = b.ins().fmul(p, scale);
        let y = b.ins().fadd(y, y);
        let (inf, zero) = (self.c(b, f32::INFINITY), self.c(b, 0.0));
        let over = b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let y = self.select(b, over, inf, y);
        let under = b.ins().fcmp(FloatCC::LessThan, x, lo);
        self.select(b, under, zero, y)
    }

    pub fn log(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        // Subnormals: scaled into the normal range, their exponent corrected below.
        let min_normal = self.c(b, f32::MIN_POSITIVE);
        let tiny = b.ins().fcmp(FloatCC::LessThan, x, min_normal);
        let two23 = self.c(b, 8_388_608.0);
        let scaled = b.ins().fmul(x, two23);
        let xs = self.select(b, tiny, scaled, x);
        let bits = self.to_int(b, xs);
        let shift = b.ins().iconst(types::I32, 23);
        let biased = b.ins().ushr(bits, shift);
        let bias = self.ci(b, 127);
        let e_int = b.ins().isub(biased, bias);
        let mantissa_mask = self.ci(b, 0x007F_FFFF);
        let one_bits = self.ci(b, 0x3F80_0000);
        let m_bits = b.ins().band(bits, mantissa_mask);
        let m_bits = b.ins().bor(m_bits, one_bits);
        let m = self.to_float(b, m_bits);
        let e = b.ins().fcvt_from_sint(self.ty, e_int);
        // m in [1, 2) → [√½, √2): halve the large ones and count one more in the exponent.
        let sqrt2 = self.c(b, std::f32::consts::SQRT_2);
        let big = b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
        let half = self.c(b, 0.5);
        let halved = b.ins().fmul(m, half);
        let m = self.select(b, big, halved, m);
        let (one, zero) = (self.c(b, 1.0), self.c(b, 0.0));
        let carry = self.select(b, big, one, zero);
        let e = b.ins().fadd(e, carry);
        let minus23 = self.c(b, -23.0);
        let fix = self.select(b, tiny, minus23, zero);
        let e = b.ins().fadd(e, fix);
        let f = b.ins().fsub(m, one);
        let z = b.ins().fmul(f, f);
        let q = self.poly(b, &LOG_Q, f);
        let fz = b.ins().fmul(f, z);
        let y = b.ins().fmul(q, fz);
        let ln2_lo = self.c(b, LN2_LO);
        let y = self.madd(b, e, ln2_lo, y);
        let minus_half = self.c(b, -0.5);
        let y = self.madd(b, z, minus_half, y);
        let r = b.ins().fadd(f, y);
        let ln2_hi = self.c(b, LN2_HI);
        let r = self.madd(b, e, ln2_hi, r);
        // The edges: +∞ → +∞, ±0 → −∞, negative or NaN → NaN.
        let inf = self.c(b, f32::INFINITY);
        let is_inf = b.ins().fcmp(FloatCC::Equal, x, inf);
        let r = self.select(b, is_inf, inf, r);
        let neg_inf = self.c(b, f32::NEG_INFINITY);
        let is_zero = b.ins().fcmp(FloatCC::Equal, x, zero);
        let r = self.select(b, is_zero, neg_inf, r);
        let nan = self.c(b, f32::NAN);
        let negative = b.ins().fcmp(FloatCC::LessThan, x, zero);
        let unordered = b.ins().fcmp(FloatCC::Unordered, x, x);
        let invalid = b.ins().bor(negative, unordered);
        self.select(b, invalid, nan, r)
    }

    pub fn sigmoid(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let minus_x = b.ins().fneg(x);
        let e = self.exp(b, minus_x);
        let one = self.c(b, 1.0);
        let d = b.ins().fadd(one, e);
        b.ins().fdiv(one, d)
    }

    pub fn tanh(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let a = b.ins().fabs(x);
        let two_a = b.ins().fadd(a, a);
        let e = self.exp(b, two_a);
        let (one, two) = (self.c(b, 1.0), self.c(b, 2.0));
        let d = b.ins().fadd(e, one);
        let q = b.ins().fdiv(two, d);
        let t = b.ins().fsub(one, q);
        let minus_t = b.ins().fneg(t);
        let zero = self.c(b, 0.0);
        let negative = b.ins().fcmp(FloatCC::LessThan, x, zero);
        let large = self.select(b, negative, minus_t, t);
        // Near 0 that difference cancels: there, x + x³·q(x²).
        let z = b.ins().fmul(x, x);
        let q = self.poly(b, &TANH_Q, z);
        let xz = b.ins().fmul(x, z);
        let small = self.madd(b, q, xz, x);
        let edge = self.c(b, TANH_SMALL);
        let is_small = b.ins().fcmp(FloatCC::LessThan, a, edge);
        self.select(b, is_small, small, large)
    }

    /// [`UnaryOp::Gelu`](crate::ops::UnaryOp::Gelu): `x · σ(k·(x + a·x³))`, `0` where the
    /// sigmoid is `0`, with this module's sigmoid.
    pub fn gelu(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let x2 = b.ins().fmul(x, x);
        let x3 = b.ins().fmul(x2, x);
        let a = self.c(b, GELU_A as f32);
        let ax3 = b.ins().fmul(a, x3);
        let inner = b.ins().fadd(x, ax3);
        let k = self.c(b, GELU_K as f32);
        let z = b.ins().fmul(k, inner);
        let s = self.sigmoid(b, z);
        let product = b.ins().fmul(x, s);
        let zero = self.c(b, 0.0);
        let vanished = b.ins().fcmp(FloatCC::Equal, s, zero);
        self.select(b, vanished, zero, product)
    }

    pub fn softplus(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let a = b.ins().fabs(x);
        let minus_a = b.ins().fneg(a);
        let u = self.exp(b, minus_a);
        let one = self.c(b, 1.0);
        let w = b.ins().fadd(one, u);
        let l = self.log(b, w);
        // log1p(u) = log(w) · u / (w − 1): the rounding of w cancels out.
        let wm1 = b.ins().fsub(w, one);
        let lu = b.ins().fmul(l, u);
        let ratio = b.ins().fdiv(lu, wm1);
        let exact = b.ins().fcmp(FloatCC::Equal, w, one);
        let log1p = self.select(b, exact, u, ratio);
        // relu(x) as the eval rule's `max(x, 0)`: 0 < x ? x : 0.
        let zero = self.c(b, 0.0);
        let positive = b.ins().fcmp(FloatCC::LessThan, zero, x);
        let relu = self.select(b, positive, x, zero);
        b.ins().fadd(relu, log1p)
    }
}

/// [`Math::exp`]'s algorithm in Rust, for the jit's Rust kernels (softmax rows): the same
/// range reduction and polynomial, without fma (plain multiply-adds round twice; still
/// within 2 ulp), branch-free so that loops over slices vectorise.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut q = EXP_Q[0];
    for &k in &EXP_Q[1..] {
        q = q * r + k;
    }
    let p = q * (r * r) + r + 1.0;
    let scale = f32::from_bits((t.to_bits() << 23).wrapping_add(0x3F00_0000));
    let y = p * scale * 2.0;
    let y = if x > EXP_HI { f32::INFINITY } else { y };
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}
