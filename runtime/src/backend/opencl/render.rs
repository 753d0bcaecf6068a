//! OpenCL C rendering of the kernels the OpenCL backend runs: the second rendering of the
//! fused-kernel description ([`FusedKernel`]) that `backend::jit::codegen` renders with
//! Cranelift, and the tiled matrix product.
//!
//! This module is plain text generation (no OpenCL calls), so it owns:
//! - [`fused`]: one `__kernel` per [`FusedKernel`]. One work item computes one output
//!   element. The elementwise domain's axes are split into *kept* axes (the output's) and
//!   *reduced* axes (those of the reduction epilogue, none without one); the sizes of both
//!   and, per operand, its strides along them (0 on a broadcast axis) come at run time in
//!   the `meta` array laid out by [`fused_meta`]. The work item decomposes its output index
//!   into kept-axis indices, then, for each reduced index in row-major order, evaluates the
//!   body once and adds the result, which is the summation order of `Op::Reduce`'s eval
//!   rule. The body uses the scalar semantics of `ops::elementwise` (stable sigmoid and
//!   softplus, relu/step/sign/comparisons as selects, constants as exact bit patterns).
//! - [`matmul`]: a batched matrix product with tiles of both operands staged in local
//!   memory and a register block of outputs per work item; transposition and a shared
//!   right operand are strides. A program carries one kernel per candidate tiling
//!   ([`MATMUL_TILES`]) that the device's work-group limit allows; the backend times them
//!   on first use of each product shape and keeps the fastest.
//! - [`update`]: one kernel per optimizer rule, the second rendering of the rule's one
//!   description ([`Rule::step`]) that `backend::jit::update` renders with Cranelift.
//! - [`program`]: the source of a whole plan (all its fused kernels and the matmul) as one
//!   program, so the OpenCL compiler runs once per plan. `FP_CONTRACT` is off, so `a*b + c`
//!   rounds twice exactly as interp does.

use crate::ops::elementwise::{GELU_A, GELU_K};
use crate::ops::fused::{FusedKernel, Instr};
use crate::ops::{BinaryOp, ReduceOp, UnaryOp};
use crate::optim::{Coeff, Rule, UpdateArith};
use std::fmt::Write;

/// A tile configuration of the matmul kernel: the block of the output per work group
/// (`bm` rows × `bn` columns), the depth of the operand tiles staged in local memory (`bk`),
/// and the work group (`wg`×`wg` work items, each computing a `bm/wg` × `bn/wg` register
/// block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub wg: usize,
}

/// The candidates the backend tunes over on first use of each product shape (see
/// `OpenCl`'s matmul): small and large register blocks, small and large work groups.
/// Every one sums over `k` in the same order, so they give identical results.
pub const MATMUL_TILES: [Tiles; 4] = [
    Tiles { bm: 32, bn: 32, bk: 16, wg: 8 },
    Tiles { bm: 64, bn: 64, bk: 16, wg: 8 },
    Tiles { bm: 64, bn: 64, bk: 16, wg: 16 },
    Tiles { bm: 32, bn: 64, bk: 32, wg: 8 },
];

/// The kernel name of candidate `i` of [`MATMUL_TILES`].
pub fn matmul_name(i: usize) -> String {
    format!("mdl_matmul_{i}")
}

/// The tiled matmul kernel `name` with tiles `t`: `c[p] = op(a[p]) @ op(b[p])` for batch
/// `p` (the third global axis); element `(i, l)` of `op(a)` is `a[p * a_batch + i * a_rs +
/// l * a_cs]`, and likewise for `b` (`b_batch` is 0 for a right operand shared by every
/// batch). Each work group stages `bm`×`bk` and `bk`×`bn` tiles of the operands in local
/// memory; each work item accumulates a block of outputs (rows `ty + wg*i`, columns `tx +
/// wg*j`) in registers, summing over `k` in order.
pub fn matmul(name: &str, t: Tiles) -> String {
    MATMUL_TEMPLATE
        .replace("@NAME@", name)
        .replace("@BM@", &t.bm.to_string())
        .replace("@BN@", &t.bn.to_string())
        .replace("@BK@", &t.bk.to_string())
        .replace("@WG@", &t.wg.to_string())
        .replace("@RM@", &(t.bm / t.wg).to_string())
        .replace("@RN@", &(t.bn / t.wg).to_string())
}

const MATMUL_TEMPLATE: &str = r#"
__kernel __attribute__((reqd_work_group_size(@WG@, @WG@, 1)))
void @NAME@(__global const float* a, __global const float* b, __global float* c,
                const int m, const int n, const int k,
                const int a_batch, const int a_rs, const int a_cs,
                const int b_batch, const int b_rs, const int b_cs) {
    __local float ta[@BK@][@BM@];
    __local float tb[@BK@][@BN@];
    const int tx = get_local_id(0);
    const int ty = get_local_id(1);
    const int tid = ty * @WG@ + tx;
    const int col0 = get_group_id(0) * @BN@;
    const int row0 = get_group_id(1) * @BM@;
    const int p = get_global_id(2);
    a += p * a_batch;
    b += p * b_batch;
    c += p * m * n;
    float acc[@RM@][@RN@];
    for (int i = 0; i < @RM@; i++) {
        for (int j = 0; j < @RN@; j++) {
            acc[i][j] = 0.0f;
        }
    }
    for (int t = 0; t < k; t += @BK@) {
        for (int e = tid; e < @BM@ * @BK@; e += @WG@ * @WG@) {
            const int i = e / @BK@, l = e % @BK@;
            const int r = row0 + i, kk = t + l;
            ta[l][i] = (r < m && kk < k) ? a[r * a_rs + kk * a_cs] : 0.0f;
        }
        for (int e = tid; e < @BK@ * @BN@; e += @WG@ * @WG@) {
            const int l = e / @BN@, j = e % @BN@;
            const int col = col0 + j, kk = t + l;
            tb[l][j] = (kk < k && col < n) ? b[kk * b_rs + col * b_cs] : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int l = 0; l < @BK@; l++) {
            float av[@RM@], bv[@RN@];
            for (int i = 0; i < @RM@; i++) {
                av[i] = ta[l][ty + @WG@ * i];
            }
            for (int j = 0; j < @RN@; j++) {
                bv[j] = tb[l][tx + @WG@ * j];
            }
            for (int i = 0; i < @RM@; i++) {
                for (int j = 0; j < @RN@; j++) {
                    acc[i][j] += av[i] * bv[j];
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int i = 0; i < @RM@; i++) {
        const int r = row0 + ty + @WG@ * i;
        for (int j = 0; j < @RN@; j++) {
            const int col = col0 + tx + @WG@ * j;
            if (r < m && col < n) {
                c[r * n + col] = acc[i][j];
            }
        }
    }
}
"#;

/// A float constant as OpenCL C: its exact f32 bit pattern.
fn constant(c: f64) -> String {
    format!("as_float(0x{:08x}u)", (c as f32).to_bits())
}

fn unary(u: UnaryOp, x: &str) -> String {
    match u {
        UnaryOp::Neg => format!("-{x}"),
        UnaryOp::Exp => format!("exp({x})"),
        UnaryOp::Log => format!("log({x})"),
        UnaryOp::Sqrt => format!("sqrt({x})"),
        UnaryOp::Recip => format!("1.0f / {x}"),
        UnaryOp::Relu => format!("({x} > 0.0f ? {x} : 0.0f)"),
        UnaryOp::Sigmoid => format!("({x} >= 0.0f ? 1.0f / (1.0f + exp(-{x})) : exp({x}) / (1.0f + exp({x})))"),
        UnaryOp::Tanh => format!("tanh({x})"),
        UnaryOp::Softplus => format!("(fmax({x}, 0.0f) + log1p(exp(-fabs({x}))))"),
        UnaryOp::Abs => format!("fabs({x})"),
        UnaryOp::Step => format!("({x} > 0.0f ? 1.0f : 0.0f)"),
        UnaryOp::Sign => format!("({x} > 0.0f ? 1.0f : ({x} < 0.0f ? -1.0f : 0.0f))"),
        UnaryOp::Floor => format!("floor({x})"),
        UnaryOp::Gelu => format!("mdl_gelu({x})"),
    }
}

fn binary(b: BinaryOp, x: &str, y: &str) -> String {
    match b {
        BinaryOp::Add => format!("{x} + {y}"),
        BinaryOp::Sub => format!("{x} - {y}"),
        BinaryOp::Mul => format!("{x} * {y}"),
        BinaryOp::Div => format!("{x} / {y}"),
        BinaryOp::Max => format!("fmax({x}, {y})"),
        BinaryOp::Min => format!("fmin({x}, {y})"),
        BinaryOp::Gt => format!("({x} > {y} ? 1.0f : 0.0f)"),
        BinaryOp::Eq => format!("({x} == {y} ? 1.0f : 0.0f)"),
        BinaryOp::Ge => format!("({x} >= {y} ? 1.0f : 0.0f)"),
        BinaryOp::Ne => format!("({x} != {y} ? 1.0f : 0.0f)"),
        BinaryOp::Prelu => format!("({x} > 0.0f ? {x} : {y} * {x})"),
        BinaryOp::Keep => format!("({x} != 0.0f ? {y} : -0.0f)"),
    }
}

/// `mdl_gelu`, the helper the fused kernels call for [`UnaryOp::Gelu`]: its eval rule,
/// with the sigmoid rendered as [`UnaryOp::Sigmoid`] is.
fn gelu() -> String {
    let z = format!("{} * (x + {} * (x * x * x))", constant(GELU_K), constant(GELU_A));
    let s = unary(UnaryOp::Sigmoid, "z");
    format!("float mdl_gelu(float x) {{\n    const float z = {z};\n    const float s = {s};\n    return s == 0.0f ? 0.0f : x * s;\n}}\n")
}

/// The body's statements: `v<i>` holds instruction `i`; operand `k`'s element is read at
/// offset `o<k>`.
fn body(kernel: &FusedKernel, indent: &str) -> String {
    let mut s = String::new();
    for (at, instr) in kernel.body.iter().enumerate() {
        let value = match *instr {
            Instr::Input(i) => format!("x{i}[o{i}]"),
            Instr::Const(c) => constant(c),
            Instr::Unary(u, a) => unary(u, &format!("v{a}")),
            Instr::Binary(b, x, y) => binary(b, &format!("v{x}"), &format!("v{y}")),
        };
        let _ = writeln!(s, "{indent}const float v{at} = {value};");
    }
    s
}

/// The OpenCL C source of one fused kernel named `name`. Arguments: `meta` (see
/// [`fused_meta`]), the output, then the kernel's operands in order.
pub fn fused(kernel: &FusedKernel, name: &str) -> String {
    let mut s = String::new();
    let operands: String = (0..kernel.inputs).map(|k| format!(", __global const float* x{k}")).collect();
    let _ = writeln!(s, "// {}", kernel.summary());
    let _ = writeln!(s, "__kernel void {name}(__global const int* meta, __global float* out{operands}) {{");
    s.push_str("    const int nk = meta[0], nr = meta[1], total = meta[2], count = meta[3];\n");
    s.push_str("    const int o = get_global_id(0);\n");
    s.push_str("    if (o >= total) return;\n");
    s.push_str("    const int w = nk + nr;\n");
    for k in 0..kernel.inputs {
        let _ = writeln!(s, "    __global const int* s{k} = meta + 4 + w + {k} * w;");
        let _ = writeln!(s, "    int b{k} = 0;");
    }
    s.push_str("    int rem = o;\n");
    s.push_str("    for (int a = nk - 1; a >= 0; a--) {\n");
    s.push_str("        const int d = meta[4 + a];\n        const int i = rem % d;\n        rem /= d;\n");
    for k in 0..kernel.inputs {
        let _ = writeln!(s, "        b{k} += i * s{k}[a];");
    }
    s.push_str("    }\n");
    let last = kernel.body.len() - 1;
    match &kernel.reduce {
        None => {
            for k in 0..kernel.inputs {
                let _ = writeln!(s, "    const int o{k} = b{k};");
            }
            s.push_str(&body(kernel, "    "));
            let _ = writeln!(s, "    out[o] = v{last};");
        }
        Some(r) => {
            s.push_str("    float acc = 0.0f;\n");
            s.push_str("    for (int r = 0; r < count; r++) {\n");
            for k in 0..kernel.inputs {
                let _ = writeln!(s, "        int o{k} = b{k};");
            }
            s.push_str("        int rr = r;\n");
            s.push_str("        for (int a = nr - 1; a >= 0; a--) {\n");
            s.push_str("            const int d = meta[4 + nk + a];\n            const int i = rr % d;\n            rr /= d;\n");
            for k in 0..kernel.inputs {
                let _ = writeln!(s, "            o{k} += i * s{k}[nk + a];");
            }
            s.push_str("        }\n");
            s.push_str(&body(kernel, "        "));
            let _ = writeln!(s, "        acc += v{last};");
            s.push_str("    }\n");
            match r.op {
                ReduceOp::Mean => s.push_str("    out[o] = acc / (float)count;\n"),
                ReduceOp::Sum | ReduceOp::Max | ReduceOp::Min => s.push_str("    out[o] = acc;\n"),
            }
        }
    }
    s.push_str("}\n");
    s
}

/// The `meta` array of a fused kernel run: `[nk, nr, total, count, kept sizes...,
/// reduced sizes..., then per operand its strides along the kept axes and along the
/// reduced axes]`, where `domain` is the elementwise domain (the broadcast of all operand
/// shapes), `reduced` the axes the epilogue reduces (empty without one), and `strides[k]`
/// operand `k`'s strides over `domain` (0 where it is broadcast). `None` when an index
/// would not fit an OpenCL `int`.
pub fn fused_meta(domain: &[usize], reduced: &[usize], strides: &[Vec<usize>]) -> Option<Vec<i32>> {
    let kept: Vec<usize> = (0..domain.len()).filter(|a| !reduced.contains(a)).collect();
    let total: usize = kept.iter().map(|&a| domain[a]).product();
    let count: usize = reduced.iter().map(|&a| domain[a]).product();
    let fits = |v: usize| i32::try_from(v).ok();
    fits(domain.iter().product::<usize>())?;
    let mut meta = vec![fits(kept.len())?, fits(reduced.len())?, fits(total)?, fits(count)?];
    for &a in kept.iter().chain(reduced) {
        meta.push(fits(domain[a])?);
    }
    for s in strides {
        for &a in kept.iter().chain(reduced) {
            meta.push(fits(s[a])?);
        }
    }
    Some(meta)
}

/// The most axes a [`COPY`] view may have.
pub const COPY_MAX_RANK: usize = 8;

/// The layout kernels: every layout op is a copy between two strided views.
/// `mdl_copy` writes element `i` of a view of `shape` (row-major over `rank` axes, `total`
/// elements): `out[out_base + Σ idx·out_strides] = in[in_base + Σ idx·in_strides]`, with
/// `meta = [rank, total, out_base, in_base, shape.., out_strides.., in_strides..]`. A
/// permute, broadcast or slice is one call (input strides permuted, zero, or offset); a
/// concat one call per part into its place in the output; a pad one call into a zeroed
/// output. `mdl_gather` copies row `ids[r]` of a `[rows, width]` table to row `r` (ids
/// are checked on the host before the launch); `mdl_scatter_rows` writes row `r` of
/// `values` to row `rows[r]` of a table (distinct rows, checked on the host: the updated
/// rows of a resident parameter). `mdl_sum_rows` writes element `c` of the `k`-th
/// combined row of a row-sparse gradient: the sum, from zero and in order, of element `c`
/// of the entries `order[starts[k]..starts[k + 1]]` of `values`.
/// `mdl_softmax` computes one softmax (a `size`-long vector `inner` elements apart) per
/// work item, in the eval rule's order: the maximum, the exponentials and their sum, the
/// quotients.
pub const COPY: &str = r#"
__kernel void mdl_copy(__global const int* meta, __global float* out, __global const float* in) {
    const int i = get_global_id(0);
    const int rank = meta[0];
    if (i >= meta[1]) return;
    int rest = i, o = meta[2], s = meta[3];
    for (int a = rank - 1; a >= 0; --a) {
        const int size = meta[4 + a];
        const int at = rest % size;
        rest /= size;
        o += at * meta[4 + rank + a];
        s += at * meta[4 + 2 * rank + a];
    }
    out[o] = in[s];
}

__kernel void mdl_gather(__global float* out, __global const float* table, __global const uint* ids,
                         const int width, const int total) {
    const int i = get_global_id(0);
    if (i >= total) return;
    const int r = i / width;
    out[i] = table[(long)ids[r] * width + (i - r * width)];
}

__kernel void mdl_sum_rows(__global float* out, __global const float* values, __global const uint* order,
                           __global const uint* starts, const int width, const int total) {
    const int i = get_global_id(0);
    if (i >= total) return;
    const int k = i / width;
    const int c = i - k * width;
    float s = 0.0f;
    for (uint j = starts[k]; j < starts[k + 1]; j++) s += values[(long)order[j] * width + c];
    out[i] = s;
}

__kernel void mdl_softmax(__global float* out, __global const float* in, const int size, const int inner,
                          const int total) {
    const int g = get_global_id(0);
    if (g >= total) return;
    const int o = g / inner;
    const long base = (long)o * size * inner + (g - o * inner);
    float m = -INFINITY;
    for (int k = 0; k < size; k++) m = fmax(m, in[base + (long)k * inner]);
    float t = 0.0f;
    for (int k = 0; k < size; k++) {
        const float e = exp(in[base + (long)k * inner] - m);
        out[base + (long)k * inner] = e;
        t += e;
    }
    for (int k = 0; k < size; k++) out[base + (long)k * inner] = out[base + (long)k * inner] / t;
}

__kernel void mdl_scatter_rows(__global float* table, __global const uint* rows, __global const float* values,
                               const int width, const int total) {
    const int i = get_global_id(0);
    if (i >= total) return;
    const int r = i / width;
    table[(long)rows[r] * width + (i - r * width)] = values[i];
}
"#;

/// The gradients' norm, for a training step that keeps gradients, state and parameters on
/// the device: `mdl_sum_squares` adds the squares of `g[0..total)` into one partial sum per
/// work group (`MDL_NORM_WG` work items, a power of two), written to `partial[at + group]`;
/// the host adds the partials in `f64` for the global norm.
pub const SUM_SQUARES: &str = r#"
__kernel void mdl_sum_squares(__global float* partial, const int at, __global const float* g, const int total) {
    __local float acc[MDL_NORM_WG];
    const int lid = get_local_id(0);
    float s = 0.0f;
    for (int e = get_global_id(0); e < total; e += get_global_size(0)) s += g[e] * g[e];
    acc[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int apart = MDL_NORM_WG / 2; apart > 0; apart >>= 1) {
        if (lid < apart) acc[lid] += acc[lid + apart];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) partial[at + get_group_id(0)] = acc[0];
}
"#;

/// The kernel name of the update kernel of `rule` ([`update`]).
pub fn update_name(rule: Rule) -> String {
    format!("mdl_update_{}", rule.name())
}

/// The update kernel of `rule`, rendered from the rule's one description ([`Rule::step`],
/// one C statement per operation; `FP_CONTRACT` is off, and the device's `sqrt` and
/// division may differ from the host's in the last bit). Work item `e` steps one element
/// of a parameter: its gradient is `g[e] · gscale` (the clipping factor, 1 without), and
/// `mode` says which parameter element that is: 0, a dense parameter (element `e`); 1,
/// combined rows of a table (row `e / width` of `g` is row `rows[e / width]` of the table;
/// rows distinct). `s1`, `s2` are the rule's state slots in the parameter's layout (Adam's
/// moments; Adagrad's accumulator in `s1`; a slot the rule keeps none of is not read). The
/// step's coefficients follow as `float` arguments in [`Coeff::ALL`] order.
pub fn update(rule: Rule) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "\n__kernel void {}(__global float* w, __global float* s1, __global float* s2, __global const float* g,\n\
         __global const uint* rows, const int width, const int total, const int mode, const float gscale",
        update_name(rule)
    );
    for c in Coeff::ALL {
        let _ = write!(s, ", const float {}", c.name());
    }
    s.push_str(") {\n");
    s.push_str("    const int e = get_global_id(0);\n    if (e >= total) return;\n    long at = e;\n");
    s.push_str("    if (mode == 1) {\n        const int r = e / width;\n");
    s.push_str("        at = (long)rows[r] * width + (e - r * width);\n    }\n");
    let slot_names = ["s1", "s2"];
    let mut c = CStatements { body: s, temps: 0 };
    let w = c.define("w[at]".to_string());
    let g = c.define("g[e] * gscale".to_string());
    let mut slots: Vec<CValue> = slot_names[..rule.slots()].iter().map(|n| c.define(format!("{n}[at]"))).collect();
    let new_w = rule.step(&mut c, w, g, &mut slots);
    let mut s = c.body;
    for (name, v) in slot_names.iter().zip(&slots) {
        let _ = writeln!(s, "    {name}[at] = {};", v.text());
    }
    let _ = writeln!(s, "    w[at] = {};\n}}", new_w.text());
    s
}

/// A value of a rendered update step: a temporary `u<n>` or a coefficient argument.
#[derive(Clone, Copy, Debug)]
enum CValue {
    Temp(usize),
    Coeff(Coeff),
}

impl CValue {
    fn text(self) -> String {
        match self {
            CValue::Temp(n) => format!("u{n}"),
            CValue::Coeff(c) => c.name().to_string(),
        }
    }
}

/// [`UpdateArith`] as OpenCL C: each operation one `const float` statement appended to
/// `body`.
struct CStatements {
    body: String,
    temps: usize,
}

impl CStatements {
    fn define(&mut self, expr: String) -> CValue {
        let _ = writeln!(self.body, "    const float u{} = {};", self.temps, expr);
        self.temps += 1;
        CValue::Temp(self.temps - 1)
    }

    fn infix(&mut self, x: CValue, op: char, y: CValue) -> CValue {
        self.define(format!("{} {} {}", x.text(), op, y.text()))
    }
}

impl UpdateArith for CStatements {
    type V = CValue;
    fn coeff(&mut self, c: Coeff) -> CValue {
        CValue::Coeff(c)
    }
    fn add(&mut self, x: CValue, y: CValue) -> CValue {
        self.infix(x, '+', y)
    }
    fn sub(&mut self, x: CValue, y: CValue) -> CValue {
        self.infix(x, '-', y)
    }
    fn mul(&mut self, x: CValue, y: CValue) -> CValue {
        self.infix(x, '*', y)
    }
    fn div(&mut self, x: CValue, y: CValue) -> CValue {
        self.infix(x, '/', y)
    }
    fn sqrt(&mut self, x: CValue) -> CValue {
        self.define(format!("sqrt({})", x.text()))
    }
}

/// The work group of `mdl_sum_squares`: the largest power of two up to 256 that the
/// device allows.
pub fn norm_work_group(max_work_group: usize) -> usize {
    let mut n = 1;
    while n * 2 <= max_work_group.min(256) {
        n *= 2;
    }
    n
}

/// The axes of a copy between two strided views of `shape`, as `(size, out stride, in
/// stride)` from the outermost: axes of size 1 dropped and neighbours that are contiguous
/// in both views merged, so a concat of `[B, F, d]` parts along axis 1 has two.
fn merged_axes(shape: &[usize], out_strides: &[usize], in_strides: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut axes: Vec<(usize, usize, usize)> = Vec::new();
    for ((&n, &o), &i) in shape.iter().zip(out_strides).zip(in_strides) {
        if n == 1 {
            continue;
        }
        match axes.last_mut() {
            Some(last) if last.1 == o * n && last.2 == i * n => *last = (last.0 * n, o, i),
            _ => axes.push((n, o, i)),
        }
    }
    axes
}

/// The metadata of one [`COPY`] `mdl_copy` call ([`merged_axes`], so fewer divisions per
/// element), or `None` when a size or offset does not fit an `int` or the view has more
/// than [`COPY_MAX_RANK`] axes.
pub fn copy_meta(
    shape: &[usize],
    out_base: usize,
    out_strides: &[usize],
    in_base: usize,
    in_strides: &[usize],
) -> Option<Vec<i32>> {
    let axes = merged_axes(shape, out_strides, in_strides);
    if axes.len() > COPY_MAX_RANK {
        return None;
    }
    let fits = |v: usize| i32::try_from(v).ok();
    let mut meta = vec![fits(axes.len())?, fits(shape.iter().product())?, fits(out_base)?, fits(in_base)?];
    for k in 0..3 {
        for a in &axes {
            meta.push(fits([a.0, a.1, a.2][k])?);
        }
    }
    Some(meta)
}

/// A copy between two views as rows of contiguous elements, for the runtime's own
/// rectangle copy (`clEnqueueCopyBufferRect`), in elements: `rows` runs of `run` elements,
/// the `r`-th from `in_base + r · in_pitch` to `out_base + r · out_pitch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub rows: usize,
    pub run: usize,
    pub out_base: usize,
    pub out_pitch: usize,
    pub in_base: usize,
    pub in_pitch: usize,
}

/// The copy of [`copy_meta`] as a [`RowCopy`], when it is one: the innermost merged axis
/// contiguous in both views and at most one axis outside it, whose strides are at least a
/// run (rows that do not overlap; a broadcast's zero stride is not one), and each base's
/// offset within its row plus the run at most the pitch.
pub fn row_copy(
    shape: &[usize],
    out_base: usize,
    out_strides: &[usize],
    in_base: usize,
    in_strides: &[usize],
) -> Option<RowCopy> {
    let axes = merged_axes(shape, out_strides, in_strides);
    let (run, rows, out_pitch, in_pitch) = match axes.as_slice() {
        [] => (1, 1, 1, 1),
        [(n, 1, 1)] => (*n, 1, *n, *n),
        [(rows, o, i), (run, 1, 1)] if *o >= *run && *i >= *run => (*run, *rows, *o, *i),
        _ => return None,
    };
    // Each row within one pitch of the buffer's start of row (runtimes check the origin's
    // offset within a row plus the run against the pitch).
    let fits = |base: usize, pitch: usize| base % pitch + run <= pitch;
    (fits(out_base, out_pitch) && fits(in_base, in_pitch)).then_some(RowCopy {
        rows,
        run,
        out_base,
        out_pitch,
        in_base,
        in_pitch,
    })
}

/// The source of a plan's program: the matmul kernels, the layout and scatter kernels
/// ([`COPY`]), the gradients' norm ([`SUM_SQUARES`]), one update kernel per optimizer rule
/// ([`update`]) and `kernels[i]` as `mdl_fused_<i>`.
pub fn program(kernels: &[&FusedKernel], max_work_group: usize) -> String {
    let mut s = String::new();
    s.push_str("// mdl: kernels of one plan, rendered from fused-kernel descriptions\n");
    s.push_str("#pragma OPENCL FP_CONTRACT OFF\n");
    for (i, t) in MATMUL_TILES.iter().enumerate() {
        if t.wg * t.wg <= max_work_group {
            s.push_str(&matmul(&matmul_name(i), *t));
        }
    }
    s.push_str(COPY);
    s.push_str(&gelu());
    let _ = writeln!(s, "#define MDL_NORM_WG {}", norm_work_group(max_work_group));
    s.push_str(SUM_SQUARES);
    for rule in Rule::ALL {
        s.push_str(&update(rule));
    }
    for (i, k) in kernels.iter().enumerate() {
        s.push('\n');
        s.push_str(&fused(k, &fused_name(i)));
    }
    s
}

/// The kernel name of the `i`-th fused kernel of a program.
pub fn fused_name(i: usize) -> String {
    format!("mdl_fused_{i}")
}

/// A build log with the source line each `FILE:LINE:COL` location names printed under it,
/// so a rendering bug shows the code it produced. Line numbers are those of `source`: the
/// backend compiles it after a `#line 1` directive, so text a platform adds in front of
/// it (PoCL does) does not shift them.
pub fn annotate_build_log(log: &str, source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    for l in log.lines() {
        out.push_str(l);
        out.push('\n');
        if let Some(n) = location_line(l).filter(|&n| n >= 1 && n <= lines.len()) {
            let _ = writeln!(out, "    source line {n}: {}", lines[n - 1].trim_end());
        }
    }
    out
}

/// The line of the first `:LINE:COL` in a log line.
fn location_line(l: &str) -> Option<usize> {
    let b = l.as_bytes();
    for (at, _) in l.match_indices(':') {
        let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        let after = at + 1 + digits;
        if digits > 0 && b.get(after) == Some(&b':') && b.get(after + 1).is_some_and(|c| c.is_ascii_digit()) {
            return l[at + 1..after].parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Adagrad kernel is the rule's description statement by statement: the gradient
    /// scaled, L2, the accumulator, the step, then the stores; SGD reads no state.
    #[test]
    fn update_kernels_render_the_rule_statement_by_statement() {
        let adagrad = update(Rule::Adagrad);
        let body = &adagrad[adagrad.find("    const float u0").expect("a body")..];
        assert_eq!(
            body,
            "    const float u0 = w[at];\n    const float u1 = g[e] * gscale;\n    const float u2 = s1[at];\n\
             \x20   const float u3 = l2 * u0;\n    const float u4 = u1 + u3;\n    const float u5 = u4 * u4;\n\
             \x20   const float u6 = u2 + u5;\n    const float u7 = sqrt(u6);\n    const float u8 = u7 + eps;\n\
             \x20   const float u9 = lr * u4;\n    const float u10 = u9 / u8;\n    const float u11 = u0 - u10;\n\
             \x20   s1[at] = u6;\n    w[at] = u11;\n}\n"
        );
        assert!(adagrad.starts_with("\n__kernel void mdl_update_adagrad("));
        let sgd = update(Rule::Sgd);
        assert!(!sgd.contains("s1[") && !sgd.contains("s2["), "{sgd}");
        let adam = update(Rule::Adam);
        assert!(adam.contains("    s1[at] = ") && adam.contains("    s2[at] = "), "{adam}");
        for rule in Rule::ALL {
            let args: Vec<String> = Coeff::ALL.iter().map(|c| format!("const float {}", c.name())).collect();
            assert!(update(rule).contains(&args.join(", ")), "{rule:?}: the coefficients in Coeff::ALL order");
        }
    }

    /// Row copies: a concat part of `[4, 3, 2]` into `[4, 5, 2]` (axis 1, at 2) is 4 rows
    /// of 6; a slice along the first axis or a whole copy is one run; a broadcast (zero
    /// stride), a permute (inner stride not 1) and a three-level view are not row copies.
    #[test]
    fn row_copies_are_recognised() {
        assert_eq!(
            row_copy(&[4, 3, 2], 4, &[10, 2, 1], 0, &[6, 2, 1]),
            Some(RowCopy { rows: 4, run: 6, out_base: 4, out_pitch: 10, in_base: 0, in_pitch: 6 })
        );
        assert_eq!(
            row_copy(&[2, 3], 0, &[3, 1], 6, &[3, 1]),
            Some(RowCopy { rows: 1, run: 6, out_base: 0, out_pitch: 6, in_base: 6, in_pitch: 6 })
        );
        assert_eq!(row_copy(&[4, 3], 0, &[3, 1], 0, &[0, 1]), None, "broadcast");
        assert_eq!(row_copy(&[3, 4], 0, &[4, 1], 0, &[1, 3]), None, "permute");
        assert_eq!(row_copy(&[2, 3, 2], 0, &[6, 2, 1], 0, &[13, 4, 1]), None, "three levels");
    }

    #[test]
    fn build_log_locations_show_their_source_line() {
        let source = "__kernel void k(__global float* x) {\n    x[0] = nope;\n}\n";
        let log = "error: /tmp/pocl/tempfile_x.cl:2:12: use of undeclared identifier 'nope'\n1 error generated.";
        let annotated = annotate_build_log(log, source);
        assert!(annotated.contains("    source line 2:     x[0] = nope;"), "{annotated}");
        assert_eq!(location_line("<source>:14:3: error"), Some(14));
        assert_eq!(location_line("no location: here"), None);
    }
}
