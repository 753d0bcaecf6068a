//! Cranelift code generation for fused elementwise kernels (`Op::Fused`, made by
//! [`crate::fuse`]), and the driver that runs them over tensors.
//!
//! This module owns:
//! - **the compiled function**: one per distinct ([`FusedKernel`], splat pattern, fma,
//!   store or accumulate) key, compiled once per process into a shared Cranelift JIT
//!   module and cached. Its ABI is [`KernelFn`]: `rows` rows of `n` elements; operand `k`
//!   of row `r` starts `r * row_strides[k]` elements after `ptrs[k]` and is read either
//!   contiguously or, for a *splat* operand, as one value for the whole row; output row
//!   `r` starts `r * out_row_stride` elements after `out`. The body runs on F32X4
//!   vectors (unrolled four times for small bodies), then a scalar tail. `a*b + c`
//!   becomes one `fma` when the CPU has it and [`Options::fma`] is on. Relu, step, sign,
//!   max, min and the comparisons are compares and bit-selects. The transcendentals
//!   ([`UnaryOp::is_transcendental`]: exp, log, tanh, sigmoid, softplus) have no Cranelift
//!   instruction: by default they are inline polynomials ([`super::math`], within 2 ulp);
//!   with [`Options::inline_math`] off they call the eval rule's scalar function
//!   ([`UnaryOp::apply`], four lanes per call) and agree with interp bit for bit. The
//!   Cranelift rendering of each op is an exhaustive match, so a new op does not compile
//!   until it has one;
//! - **reduction epilogues**: a kernel ending in a sum or mean over axes
//!   ([`crate::ops::fused::Reduction`]) adds each row's results to the output row
//!   (reduced rows) or, lane by lane, to one output element (a reduced row), in the
//!   summation order of `Op::Reduce`, so it too agrees with interp exactly — unless
//!   [`Options::reassociate`] is on (the default): then a row sum is kept in four vector
//!   lanes, and when the work is large, rows that add into the same outputs are split in
//!   two halves, each with its own partial output (on two threads when the executor has
//!   them, else one after the other: the split, and so every bit of the result, does not
//!   depend on the thread count);
//! - **the driver** [`run`]: it collapses the kernel's domain into `[outer..., rows, n]`,
//!   where `n` is the longest run of trailing axes in which every operand is contiguous or
//!   fully broadcast (and the output contiguous or reduced), computes each call's operand
//!   and output offsets, and splits the rows (or, for a single row, the elements) over two
//!   threads when the work is large and the halves write disjoint output.
//!
//! Whatever cannot be compiled (a host Cranelift does not support, a kernel over
//! [`MAX_BODY`] instructions, a code generator error) is reported as an `Err`, and the jit
//! backend falls back to the kernel's eval rule; nothing here panics on a kernel.

use super::math::Math;
use crate::ops::fused::{broadcast_all, broadcasts_to, FusedKernel, Instr};
use crate::ops::{BinaryOp, ReduceOp, UnaryOp};
use crate::tensor::{broadcast_strides, strides, Tensor};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, InstBuilder, MemFlagsData, SigRef, StackSlot, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The most instructions a kernel body may have to be compiled (larger ones run on the
/// eval rule; the fusion pass never makes them).
pub const MAX_BODY: usize = 512;
/// Bodies with at most this many ops get the four-vector unrolled loop.
const UNROLL_MAX_OPS: usize = 16;
/// Work (elements × (ops + 1)) above which a kernel is split over two threads.
const PARALLEL_WORK: usize = 1 << 18;

/// How kernels are compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Options {
    /// Contract `a*b + c` (and `a*b - c`, `c - a*b`) into one fused multiply-add when the
    /// CPU has one. It rounds once instead of twice, so results differ from interp in the
    /// last bits; off, a fused kernel computes exactly what the unfused ops compute.
    pub fma: bool,
    /// Compute exp, log, tanh, sigmoid and softplus inline as polynomials ([`super::math`]:
    /// within a few ulp, many times faster); off, they call the eval rule's scalar
    /// functions and agree with interp bit for bit.
    pub inline_math: bool,
    /// Let reductions sum in another order than `Op::Reduce`: a row sum in four vector
    /// lanes, and rows that add into the same outputs split in two halves with a partial
    /// output each (run on two threads when there are; the same bits on one). Faster (no
    /// serial chain of adds, both cores), different from interp in the last bits.
    pub reassociate: bool,
}

impl Options {
    /// Every kernel computes exactly what the unfused eval rules compute: no fma
    /// contraction, transcendentals through the eval rule's functions.
    pub const EXACT: Options = Options { fma: false, inline_math: false, reassociate: false };
}

impl Default for Options {
    fn default() -> Options {
        Options { fma: true, inline_math: true, reassociate: true }
    }
}

/// A compiled kernel: `(rows, n, ptrs, row_strides, out, out_row_stride)`, see the module
/// docs. Row `r` of the output starts `r * out_row_stride` elements after `out`.
type KernelFn = unsafe extern "C" fn(
    rows: usize,
    n: usize,
    ptrs: *const *const f32,
    row_strides: *const isize,
    out: *mut f32,
    out_row_stride: isize,
);

/// What a kernel does with each row's results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Mode {
    /// Store the row's `n` results.
    Store,
    /// Add the row's `n` results to the `n` output elements (a reduction over rows).
    AccumulateRow,
    /// Add the row's `n` results, in order, to one output element (a reduction over the
    /// row).
    AccumulateScalar,
}

/// What a compiled function is specialised on.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    kernel: FusedKernel,
    /// Per operand: read one value per row (stride 0 along the row) instead of a run.
    splat: Vec<bool>,
    fma: bool,
    inline_math: bool,
    /// A row sum kept in vector lanes ([`Options::reassociate`], `AccumulateScalar` only).
    lane_sums: bool,
    mode: Mode,
}

/// The process-wide compiler and its cache of compiled kernels (failures are cached too,
/// so a kernel that cannot be compiled is tried once).
pub(super) struct Compiler {
    module: JITModule,
    ctx: cranelift_codegen::Context,
    fctx: FunctionBuilderContext,
    has_fma: bool,
    cache: HashMap<Key, Result<KernelFn, String>>,
}

static COMPILER: OnceLock<Result<Mutex<Compiler>, String>> = OnceLock::new();

pub(super) fn compiler() -> Result<&'static Mutex<Compiler>, String> {
    COMPILER.get_or_init(|| Compiler::new().map(Mutex::new)).as_ref().map_err(|e| e.clone())
}

/// How many distinct kernels this process has compiled successfully (for tests and
/// reports).
pub fn compiled_kernels() -> usize {
    compiler().ok().and_then(|c| c.lock().ok().map(|c| c.cache.values().filter(|r| r.is_ok()).count())).unwrap_or(0)
}

impl Compiler {
    fn new() -> Result<Compiler, String> {
        let mut flags = settings::builder();
        let set = |flags: &mut settings::Builder, k: &str, v: &str| {
            flags.set(k, v).map_err(|e| format!("cranelift setting {k}: {e}"))
        };
        set(&mut flags, "opt_level", "speed")?;
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "is_pic", "false")?;
        let isa = cranelift_native::builder()
            .map_err(|e| format!("cranelift does not support this host: {e}"))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| format!("cranelift: {e}"))?;
        let has_fma = isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let ctx = module.make_context();
        Ok(Compiler { module, ctx, fctx: FunctionBuilderContext::new(), has_fma, cache: HashMap::new() })
    }

    /// The compiled function of `key`, compiling it on first use.
    fn get(&mut self, key: &Key) -> Result<KernelFn, String> {
        if let Some(r) = self.cache.get(key) {
            return r.clone();
        }
        let r = self.compile(key);
        self.cache.insert(key.clone(), r.clone());
        r
    }

    /// Compiles one function of `params` pointer-sized parameters and no results into the
    /// shared module, its body built by `build(builder, pointer type, has_fma)`; returns
    /// its machine code, which lives for the rest of the process. For other kernel kinds
    /// than fused ones (the optimizer updates, [`super::update`]), which keep their own
    /// caches.
    pub(super) fn compile_function(
        &mut self,
        name: &str,
        params: usize,
        build: impl FnOnce(&mut FunctionBuilder, Type, bool),
    ) -> Result<*const u8, String> {
        let ptr = self.module.target_config().pointer_type();
        let mut sig = self.module.make_signature();
        for _ in 0..params {
            sig.params.push(AbiParam::new(ptr));
        }
        let id = self.module.declare_function(name, Linkage::Local, &sig).map_err(|e| format!("cranelift: {e}"))?;
        self.ctx.func.signature = sig;
        let config = self.module.target_config();
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            build(&mut b, ptr, self.has_fma);
            b.seal_all_blocks();
            b.finalize(config);
        }
        let defined = self.module.define_function(id, &mut self.ctx).map_err(|e| format!("cranelift: {e:?}"));
        self.module.clear_context(&mut self.ctx);
        defined?;
        self.module.finalize_definitions().map_err(|e| format!("cranelift: {e}"))?;
        Ok(self.module.get_finalized_function(id))
    }

    fn compile(&mut self, key: &Key) -> Result<KernelFn, String> {
        key.kernel.validate()?;
        if key.kernel.body.len() > MAX_BODY {
            return Err(format!(
                "a fused kernel of {} instructions is over the limit of {MAX_BODY}",
                key.kernel.body.len()
            ));
        }
        if key.splat.len() != key.kernel.inputs {
            return Err("one splat flag per operand is needed".into());
        }
        let name = format!("fused{}", self.cache.len());
        let code = self.compile_function(&name, 6, |b, ptr, has_fma| Emitter::build(b, key, has_fma, ptr))?;
        // SAFETY: `code` is the finalized machine code of a function built above with the
        // signature of `KernelFn` (six pointer-sized integer parameters, no results) in the
        // host's default calling convention, which is `extern "C"`. The module is never
        // freed, so the code lives for the rest of the process.
        Ok(unsafe { std::mem::transmute::<*const u8, KernelFn>(code) })
    }
}

// ------------------------------------------------------------------ helpers called from jit code

/// Four lanes of a transcendental in place, with the eval rule's scalar function
/// ([`UnaryOp::apply`]); `op` is the op's index in [`UnaryOp::ALL`].
extern "C" fn unary_lanes(op: u32, p: *mut f32) {
    // SAFETY: generated code passes a 16-byte stack slot holding four f32s.
    let lanes = unsafe { std::slice::from_raw_parts_mut(p, 4) };
    for v in lanes {
        *v = unary_scalar(op, *v);
    }
}

/// One element of a transcendental, as [`unary_lanes`]; NaN for an index that names no op
/// (generated code passes only valid ones; a panic must not unwind into it).
extern "C" fn unary_scalar(op: u32, x: f32) -> f32 {
    UnaryOp::ALL.get(op as usize).map_or(f32::NAN, |u| u.apply(x))
}

// ------------------------------------------------------------------ code emission

/// How an instruction is emitted when fma contraction applies: `a*b + c` with `c`
/// negated (`a*b - c`) or `a` negated (`c - a*b`).
#[derive(Clone, Copy)]
struct Fma {
    a: usize,
    b: usize,
    c: usize,
    neg_a: bool,
    neg_c: bool,
}

/// Builds the body of one kernel function.
struct Emitter<'k> {
    key: &'k Key,
    ptr: Type,
    /// Instructions folded into a later fma (not emitted on their own).
    folded: Vec<bool>,
    fma: Vec<Option<Fma>>,
    /// Per-row operand pointers (bytes) and the output pointer.
    p: Vec<Variable>,
    out: Variable,
    /// The running sum of the current row (`Mode::AccumulateScalar`).
    acc: Variable,
    /// Its four lane sums, with [`Key::lane_sums`].
    acc_lanes: Variable,
    /// Splat operands' values in the current row: scalar and vector.
    splat_s: Vec<Option<Value>>,
    splat_v: Vec<Option<Value>>,
    /// Constants per instruction index, scalar and vector; and 0, 1, -1.
    consts_s: HashMap<usize, Value>,
    consts_v: HashMap<usize, Value>,
    zero: (Value, Value),
    one: (Value, Value),
    minus_one: (Value, Value),
    slot: Option<StackSlot>,
    vec_sig: Option<SigRef>,
    scalar_sig: Option<SigRef>,
    mem: MemFlagsData,
    /// The CPU has fma (used by the inline polynomials whatever [`Options::fma`] says).
    has_fma: bool,
}

impl<'k> Emitter<'k> {
    fn build(b: &mut FunctionBuilder, key: &'k Key, has_fma: bool, ptr: Type) {
        let body = &key.kernel.body;
        let fma = key.fma && has_fma;
        let mut uses = vec![0usize; body.len()];
        for instr in body {
            match *instr {
                Instr::Unary(_, a) => uses[a] += 1,
                Instr::Binary(_, x, y) => {
                    uses[x] += 1;
                    uses[y] += 1;
                }
                Instr::Input(_) | Instr::Const(_) => {}
            }
        }
        let mut folded = vec![false; body.len()];
        let mut plan = vec![None; body.len()];
        if fma {
            let single_mul = |i: usize, folded: &[bool]| match body[i] {
                Instr::Binary(BinaryOp::Mul, a, b) if uses[i] == 1 && !folded[i] => Some((a, b)),
                _ => None,
            };
            for (at, instr) in body.iter().enumerate() {
                let Instr::Binary(op, x, y) = *instr else { continue };
                let contracted = match op {
                    BinaryOp::Add => single_mul(x, &folded)
                        .map(|(a, b)| (x, Fma { a, b, c: y, neg_a: false, neg_c: false }))
                        .or_else(|| {
                            single_mul(y, &folded).map(|(a, b)| (y, Fma { a, b, c: x, neg_a: false, neg_c: false }))
                        }),
                    BinaryOp::Sub => {
                        single_mul(x, &folded).map(|(a, b)| (x, Fma { a, b, c: y, neg_a: false, neg_c: true })).or_else(
                            || single_mul(y, &folded).map(|(a, b)| (y, Fma { a, b, c: x, neg_a: true, neg_c: false })),
                        )
                    }
                    _ => None,
                };
                if let Some((mul, f)) = contracted {
                    folded[mul] = true;
                    plan[at] = Some(f);
                }
            }
        }

        let inputs = key.kernel.inputs;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let (rows, n, ptrs, row_strides, out_ptr, out_row_stride) =
            (params[0], params[1], params[2], params[3], params[4], params[5]);
        let mem = MemFlagsData::new().with_notrap();
        let word = ptr.bytes() as i32;

        let mut p = Vec::with_capacity(inputs);
        let mut row_step = Vec::with_capacity(inputs);
        for k in 0..inputs {
            let base = b.ins().load(ptr, mem, ptrs, word * k as i32);
            let stride = b.ins().load(ptr, mem, row_strides, word * k as i32);
            row_step.push(b.ins().ishl_imm_u(stride, 2));
            let v = b.declare_var(ptr);
            b.def_var(v, base);
            p.push(v);
        }
        let out = b.declare_var(ptr);
        b.def_var(out, out_ptr);
        let out_step = b.ins().ishl_imm_u(out_row_stride, 2);
        let acc = b.declare_var(types::F32);
        let acc_lanes = b.declare_var(types::F32X4);
        let row = b.declare_var(ptr);
        let zero_i = b.ins().iconst(ptr, 0);
        b.def_var(row, zero_i);
        let idx = b.declare_var(ptr);

        let scalar_vec = |b: &mut FunctionBuilder, c: f32| {
            let s = b.ins().f32const(c);
            let v = b.ins().splat(types::F32X4, s);
            (s, v)
        };
        let zero = scalar_vec(b, 0.0);
        let one = scalar_vec(b, 1.0);
        let minus_one = scalar_vec(b, -1.0);
        let mut consts_s = HashMap::new();
        let mut consts_v = HashMap::new();
        for (at, instr) in body.iter().enumerate() {
            if let Instr::Const(c) = *instr {
                // Rounded to f32 as the eval rule rounds `Op::Scalar`.
                let (s, v) = scalar_vec(b, c as f32);
                consts_s.insert(at, s);
                consts_v.insert(at, v);
            }
        }
        let needs_call =
            !key.inline_math && body.iter().any(|i| matches!(*i, Instr::Unary(u, _) if u.is_transcendental()));
        let (slot, vec_sig, scalar_sig) = if needs_call {
            let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16, 4));
            let call_conv = b.func.signature.call_conv;
            let mut vs = cranelift_codegen::ir::Signature::new(call_conv);
            vs.params.push(AbiParam::new(types::I32));
            vs.params.push(AbiParam::new(ptr));
            let mut ss = cranelift_codegen::ir::Signature::new(call_conv);
            ss.params.push(AbiParam::new(types::I32));
            ss.params.push(AbiParam::new(types::F32));
            ss.returns.push(AbiParam::new(types::F32));
            (Some(slot), Some(b.import_signature(vs)), Some(b.import_signature(ss)))
        } else {
            (None, None, None)
        };

        let mut e = Emitter {
            key,
            ptr,
            folded,
            fma: plan,
            p,
            out,
            acc,
            acc_lanes,
            splat_s: vec![None; inputs],
            splat_v: vec![None; inputs],
            consts_s,
            consts_v,
            zero,
            one,
            minus_one,
            slot,
            vec_sig,
            scalar_sig,
            mem,
            has_fma,
        };

        let row_head = b.create_block();
        let row_body = b.create_block();
        let x4_head = b.create_block();
        let x4_body = b.create_block();
        let v_head = b.create_block();
        let v_body = b.create_block();
        let tail_head = b.create_block();
        let tail_body = b.create_block();
        let row_end = b.create_block();
        let exit = b.create_block();
        b.ins().jump(row_head, &[]);

        // for row in 0..rows
        b.switch_to_block(row_head);
        let r = b.use_var(row);
        let more = b.ins().icmp(IntCC::UnsignedLessThan, r, rows);
        b.ins().brif(more, row_body, &[], exit, &[]);

        b.switch_to_block(row_body);
        for k in 0..inputs {
            if key.splat[k] {
                let pk = b.use_var(e.p[k]);
                let s = b.ins().load(types::F32, mem, pk, 0);
                e.splat_s[k] = Some(s);
                e.splat_v[k] = Some(b.ins().splat(types::F32X4, s));
            }
        }
        let zero_i = b.ins().iconst(ptr, 0);
        b.def_var(idx, zero_i);
        if key.mode == Mode::AccumulateScalar {
            let o = b.use_var(out);
            let start = b.ins().load(types::F32, mem, o, 0);
            b.def_var(e.acc, start);
            b.def_var(e.acc_lanes, e.zero.1);
        }
        // Unrolled bodies keep four vectors live: only for small bodies without calls or
        // polynomials (Cranelift uses 16 vector registers; more spills).
        let transcendental = body.iter().any(|i| matches!(*i, Instr::Unary(u, _) if u.is_transcendental()));
        let unroll = key.kernel.op_count() <= UNROLL_MAX_OPS && !transcendental;
        b.ins().jump(if unroll { x4_head } else { v_head }, &[]);

        // Four vectors at a time, then one, then single elements.
        let loops =
            [(x4_head, x4_body, 16i64, v_head), (v_head, v_body, 4, tail_head), (tail_head, tail_body, 1, row_end)];
        for (head, body_block, step, next) in loops {
            b.switch_to_block(head);
            let i = b.use_var(idx);
            let left = b.ins().isub(n, i);
            let fits = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, left, step);
            b.ins().brif(fits, body_block, &[], next, &[]);
            b.switch_to_block(body_block);
            let i = b.use_var(idx);
            let offset = b.ins().ishl_imm_u(i, 2);
            if step == 1 {
                let v = e.body(b, types::F32, offset);
                e.emit_result(b, types::F32, v, offset);
            } else {
                for lane_block in 0..(step / 4) as i32 {
                    let off = b.ins().iadd_imm_s(offset, 16 * lane_block as i64);
                    let v = e.body(b, types::F32X4, off);
                    e.emit_result(b, types::F32X4, v, off);
                }
            }
            let i = b.ins().iadd_imm_s(i, step);
            b.def_var(idx, i);
            b.ins().jump(head, &[]);
        }

        // Next row: store a row sum, advance every operand and the output by their row
        // strides.
        b.switch_to_block(row_end);
        if key.mode == Mode::AccumulateScalar {
            let o = b.use_var(out);
            let mut total = b.use_var(e.acc);
            if key.lane_sums {
                let lanes = b.use_var(e.acc_lanes);
                for lane in 0..4u8 {
                    let x = b.ins().extractlane(lanes, lane);
                    total = b.ins().fadd(total, x);
                }
            }
            b.ins().store(mem, total, o, 0);
        }
        for (&var, &step) in e.p.iter().zip(&row_step) {
            let pk = b.use_var(var);
            let next = b.ins().iadd(pk, step);
            b.def_var(var, next);
        }
        let o = b.use_var(out);
        let o = b.ins().iadd(o, out_step);
        b.def_var(out, o);
        let r = b.use_var(row);
        let r = b.ins().iadd_imm_s(r, 1);
        b.def_var(row, r);
        b.ins().jump(row_head, &[]);

        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }

    /// What the kernel's mode does with the results `v` (`ty`) at byte `offset` of the row.
    fn emit_result(&self, b: &mut FunctionBuilder, ty: Type, v: Value, offset: Value) {
        match self.key.mode {
            Mode::Store => {
                let o = b.use_var(self.out);
                let addr = b.ins().iadd(o, offset);
                b.ins().store(self.mem, v, addr, 0);
            }
            Mode::AccumulateRow => {
                let o = b.use_var(self.out);
                let addr = b.ins().iadd(o, offset);
                let old = b.ins().load(ty, self.mem, addr, 0);
                let sum = b.ins().fadd(old, v);
                b.ins().store(self.mem, sum, addr, 0);
            }
            Mode::AccumulateScalar => {
                if ty == types::F32X4 && self.key.lane_sums {
                    let lanes = b.use_var(self.acc_lanes);
                    let lanes = b.ins().fadd(lanes, v);
                    b.def_var(self.acc_lanes, lanes);
                    return;
                }
                // Lane by lane, in index order: the summation order of `Op::Reduce`.
                let mut total = b.use_var(self.acc);
                if ty == types::F32X4 {
                    for lane in 0..4u8 {
                        let x = b.ins().extractlane(v, lane);
                        total = b.ins().fadd(total, x);
                    }
                } else {
                    total = b.ins().fadd(total, v);
                }
                b.def_var(self.acc, total);
            }
        }
    }

    /// The kernel body on one lane group (`ty` = F32X4 or F32) at byte `offset` in the row.
    fn body(&self, b: &mut FunctionBuilder, ty: Type, offset: Value) -> Value {
        let vector = ty == types::F32X4;
        let kernel = &self.key.kernel;
        let mut regs: Vec<Option<Value>> = vec![None; kernel.body.len()];
        let reg = |regs: &[Option<Value>], i: usize| regs[i].expect("operands are emitted before their users");
        for (at, instr) in kernel.body.iter().enumerate() {
            if self.folded[at] {
                continue;
            }
            let v = match *instr {
                Instr::Input(k) => {
                    if self.key.splat[k] {
                        let v = if vector { self.splat_v[k] } else { self.splat_s[k] };
                        v.expect("splat operands are loaded at the start of each row")
                    } else {
                        let pk = b.use_var(self.p[k]);
                        let addr = b.ins().iadd(pk, offset);
                        b.ins().load(ty, self.mem, addr, 0)
                    }
                }
                Instr::Const(_) => {
                    let table = if vector { &self.consts_v } else { &self.consts_s };
                    table[&at]
                }
                Instr::Unary(u, a) => self.unary(b, ty, u, reg(&regs, a)),
                Instr::Binary(op, x, y) => match self.fma[at] {
                    Some(f) => {
                        let (a, bb, c) = (reg(&regs, f.a), reg(&regs, f.b), reg(&regs, f.c));
                        let a = if f.neg_a { b.ins().fneg(a) } else { a };
                        let c = if f.neg_c { b.ins().fneg(c) } else { c };
                        b.ins().fma(a, bb, c)
                    }
                    None => self.binary(b, ty, op, reg(&regs, x), reg(&regs, y)),
                },
            };
            regs[at] = Some(v);
        }
        reg(&regs, kernel.body.len() - 1)
    }

    fn constants(&self, ty: Type) -> (Value, Value, Value) {
        if ty == types::F32X4 {
            (self.zero.1, self.one.1, self.minus_one.1)
        } else {
            (self.zero.0, self.one.0, self.minus_one.0)
        }
    }

    /// `mask ? a : b`, with `mask` the result of an `fcmp` on `ty`.
    fn select(&self, b: &mut FunctionBuilder, ty: Type, mask: Value, x: Value, y: Value) -> Value {
        if ty == types::F32X4 {
            let m = b.ins().bitcast(types::F32X4, MemFlagsData::new(), mask);
            b.ins().bitselect(m, x, y)
        } else {
            b.ins().select(mask, x, y)
        }
    }

    fn unary(&self, b: &mut FunctionBuilder, ty: Type, u: UnaryOp, x: Value) -> Value {
        if u.is_transcendental() && !self.key.inline_math {
            return self.call(b, ty, u, x);
        }
        let (zero, one, minus_one) = self.constants(ty);
        let math = Math { ty, fma: self.has_fma };
        match u {
            UnaryOp::Neg => b.ins().fneg(x),
            UnaryOp::Abs => b.ins().fabs(x),
            UnaryOp::Sqrt => b.ins().sqrt(x),
            UnaryOp::Recip => b.ins().fdiv(one, x),
            UnaryOp::Relu => {
                // `0 < x ? x : 0` (a `maxps x, 0`): NaN and -0 give +0, as in the eval rule.
                let m = b.ins().fcmp(FloatCC::LessThan, zero, x);
                self.select(b, ty, m, x, zero)
            }
            UnaryOp::Step => {
                let m = b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                self.select(b, ty, m, one, zero)
            }
            UnaryOp::Sign => {
                let gt = b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let lt = b.ins().fcmp(FloatCC::LessThan, x, zero);
                let neg = self.select(b, ty, lt, minus_one, zero);
                self.select(b, ty, gt, one, neg)
            }
            UnaryOp::Exp => math.exp(b, x),
            UnaryOp::Log => math.log(b, x),
            UnaryOp::Tanh => math.tanh(b, x),
            UnaryOp::Sigmoid => math.sigmoid(b, x),
            UnaryOp::Softplus => math.softplus(b, x),
            UnaryOp::Gelu => math.gelu(b, x),
            UnaryOp::Floor => b.ins().floor(x),
        }
    }

    /// A transcendental through the eval rule's scalar function ([`unary_lanes`] on a
    /// vector, [`unary_scalar`] on one element).
    fn call(&self, b: &mut FunctionBuilder, ty: Type, u: UnaryOp, x: Value) -> Value {
        let (slot, vec_sig, scalar_sig) = (
            self.slot.expect("a kernel with calls has a slot"),
            self.vec_sig.expect("a kernel with calls has signatures"),
            self.scalar_sig.expect("a kernel with calls has signatures"),
        );
        let op = b.ins().iconst(types::I32, u as i64);
        if ty == types::F32X4 {
            b.ins().stack_store(self.ptr, x, slot, 0);
            let addr = b.ins().stack_addr(self.ptr, slot, 0);
            let callee = b.ins().iconst(self.ptr, unary_lanes as extern "C" fn(u32, *mut f32) as usize as i64);
            b.ins().call_indirect(vec_sig, callee, &[op, addr]);
            b.ins().stack_load(self.ptr, types::F32X4, slot, 0)
        } else {
            let callee = b.ins().iconst(self.ptr, unary_scalar as extern "C" fn(u32, f32) -> f32 as usize as i64);
            let call = b.ins().call_indirect(scalar_sig, callee, &[op, x]);
            b.inst_results(call)[0]
        }
    }

    fn binary(&self, b: &mut FunctionBuilder, ty: Type, op: BinaryOp, x: Value, y: Value) -> Value {
        let (zero, one, _) = self.constants(ty);
        match op {
            BinaryOp::Add => b.ins().fadd(x, y),
            BinaryOp::Sub => b.ins().fsub(x, y),
            BinaryOp::Mul => b.ins().fmul(x, y),
            BinaryOp::Div => b.ins().fdiv(x, y),
            // Rust's `max`/`min`: the other operand when one is NaN.
            BinaryOp::Max => {
                let lt = b.ins().fcmp(FloatCC::LessThan, x, y);
                let nan = b.ins().fcmp(FloatCC::Unordered, x, x);
                let take_y = b.ins().bor(lt, nan);
                self.select(b, ty, take_y, y, x)
            }
            BinaryOp::Min => {
                let lt = b.ins().fcmp(FloatCC::LessThan, y, x);
                let nan = b.ins().fcmp(FloatCC::Unordered, x, x);
                let take_y = b.ins().bor(lt, nan);
                self.select(b, ty, take_y, y, x)
            }
            BinaryOp::Gt => {
                let m = b.ins().fcmp(FloatCC::GreaterThan, x, y);
                self.select(b, ty, m, one, zero)
            }
            BinaryOp::Eq => {
                let m = b.ins().fcmp(FloatCC::Equal, x, y);
                self.select(b, ty, m, one, zero)
            }
            BinaryOp::Ge => {
                let m = b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, y);
                self.select(b, ty, m, one, zero)
            }
            BinaryOp::Ne => {
                // Unordered or unequal: NaN differs from everything.
                let m = b.ins().fcmp(FloatCC::NotEqual, x, y);
                self.select(b, ty, m, one, zero)
            }
            BinaryOp::Prelu => {
                let m = b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let sloped = b.ins().fmul(y, x);
                self.select(b, ty, m, x, sloped)
            }
            BinaryOp::Keep => {
                let m = b.ins().fcmp(FloatCC::NotEqual, x, zero);
                let minus_zero = b.ins().fneg(zero);
                self.select(b, ty, m, y, minus_zero)
            }
        }
    }
}

// ------------------------------------------------------------------ the driver

/// The kernel's domain (the elementwise result's shape) collapsed to `[outer..., rows, n]`,
/// with each operand's strides and the output's (elements; 0 along broadcast axes for an
/// operand, along reduced axes for the output).
struct Layout {
    /// Sizes of the outer axes (possibly none).
    outer: Vec<usize>,
    /// Per operand, its strides over the outer axes.
    outer_strides: Vec<Vec<usize>>,
    out_outer_strides: Vec<usize>,
    rows: usize,
    row_strides: Vec<isize>,
    out_row_stride: usize,
    n: usize,
    /// Per operand: stride 0 along the row (one value per row).
    splat: Vec<bool>,
    /// The output advances along the row (else the row is summed into one element).
    out_along_row: bool,
}

/// Collapses `domain` for operands read with `strides` (one list per operand, over the
/// domain's axes) and an output written with `out_strides`: size-1 axes go, and adjacent
/// axes merge where every operand and the output step through both as through one.
fn layout(strides: &[Vec<usize>], out_strides: &[usize], domain: &[usize]) -> Layout {
    let k = strides.len();
    let all = |axis: usize| strides.iter().map(move |s| s[axis]).chain(std::iter::once(out_strides[axis]));
    let mut dims: Vec<usize> = Vec::new();
    // Per kept dim: the strides of every operand, then the output's.
    let mut merged: Vec<Vec<usize>> = Vec::new();
    for (axis, &size) in domain.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let fits = merged.last().is_some_and(|last| last.iter().zip(all(axis)).all(|(&prev, s)| prev == s * size));
        if fits {
            *dims.last_mut().expect("a dim per merged stride list") *= size;
            *merged.last_mut().expect("checked above") = all(axis).collect();
        } else {
            dims.push(size);
            merged.push(all(axis).collect());
        }
    }
    if dims.is_empty() {
        dims.push(1);
        merged.push(vec![0; k + 1]);
    }
    // Along a row the kernel reads each operand contiguously or as one value, and writes
    // the output contiguously or sums it into one element. Where a window steps by more
    // along the innermost axis, that axis becomes the rows, of one element each.
    if merged.last().is_some_and(|last| last.iter().any(|&s| s > 1)) {
        dims.push(1);
        merged.push(vec![1; k + 1]);
    }
    let m = dims.len();
    let n = dims[m - 1];
    let splat = (0..k).map(|j| merged[m - 1][j] == 0).collect();
    let out_along_row = merged[m - 1][k] != 0;
    let (rows, row_strides, out_row_stride) = if m >= 2 {
        (dims[m - 2], (0..k).map(|j| merged[m - 2][j] as isize).collect(), merged[m - 2][k])
    } else {
        (1, vec![0; k], 0)
    };
    let outer_dims = m.saturating_sub(2);
    Layout {
        outer: dims[..outer_dims].to_vec(),
        outer_strides: (0..k).map(|j| merged[..outer_dims].iter().map(|s| s[j]).collect()).collect(),
        out_outer_strides: merged[..outer_dims].iter().map(|s| s[k]).collect(),
        rows,
        row_strides,
        out_row_stride,
        n,
        splat,
        out_along_row,
    }
}

/// Runs `f` over the flattened rows `[start, end)` of `lay`; `out` is the part of the
/// output that starts at element `out_base` and holds everything those rows write.
fn launch_rows(
    f: KernelFn,
    data: &[&[f32]],
    lay: &Layout,
    start: usize,
    end: usize,
    out: &mut [f32],
    out_base: usize,
) -> Result<(), String> {
    let k = data.len();
    let mut ptrs: Vec<*const f32> = vec![std::ptr::null(); k];
    let mut offsets = vec![0usize; k];
    let mut s = start;
    while s < end {
        let (o, r) = (s / lay.rows, s % lay.rows);
        let len = (lay.rows - r).min(end - s);
        for (j, off) in offsets.iter_mut().enumerate() {
            *off = r * lay.row_strides[j] as usize;
        }
        let mut out_off = r * lay.out_row_stride;
        let mut rest = o;
        for a in (0..lay.outer.len()).rev() {
            let i = rest % lay.outer[a];
            rest /= lay.outer[a];
            for (j, off) in offsets.iter_mut().enumerate() {
                *off += i * lay.outer_strides[j][a];
            }
            out_off += i * lay.out_outer_strides[a];
        }
        for j in 0..k {
            let last = offsets[j] + (len - 1) * lay.row_strides[j] as usize + if lay.splat[j] { 0 } else { lay.n - 1 };
            if last >= data[j].len() {
                return Err(format!("operand {j} would be read out of bounds"));
            }
            ptrs[j] = data[j].as_ptr().wrapping_add(offsets[j]);
        }
        let out_last = out_off + (len - 1) * lay.out_row_stride + if lay.out_along_row { lay.n - 1 } else { 0 };
        if out_off < out_base || out_last - out_base >= out.len() {
            return Err("the output would be written out of bounds".into());
        }
        let dst = out[out_off - out_base..].as_mut_ptr();
        // SAFETY: `f` reads, for each operand j, elements `ptrs[j] + r*row_strides[j] + i`
        // (i < n, or i = 0 when splat) for r < len, all inside `data[j]`, and writes
        // `dst + r*out_row_stride + i` (i < n, or i = 0 for a row sum), all inside `out`
        // (both checked above).
        unsafe { f(len, lay.n, ptrs.as_ptr(), lay.row_strides.as_ptr(), dst, lay.out_row_stride as isize) };
        s += len;
    }
    Ok(())
}

/// Runs `f` on a single row over the elements `[start, end)` of it: storing them into
/// `out`, or (a row sum) adding them into `out[0]`.
fn launch_elements(
    f: KernelFn,
    data: &[&[f32]],
    lay: &Layout,
    start: usize,
    end: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let out_len = if lay.out_along_row { end - start } else { 1 };
    for (j, (d, &splat)) in data.iter().zip(&lay.splat).enumerate() {
        let need = if splat { 1 } else { end };
        if d.len() < need || out.len() != out_len {
            return Err(format!("operand {j} would be read out of bounds"));
        }
    }
    let ptrs: Vec<*const f32> =
        data.iter().zip(&lay.splat).map(|(d, &splat)| d.as_ptr().wrapping_add(if splat { 0 } else { start })).collect();
    // SAFETY: one row of `end - start` elements: a contiguous operand holds elements
    // `start..end`, a splat operand its first one (checked above); `out` has the row's
    // length (or one element, for a row sum).
    unsafe { f(1, end - start, ptrs.as_ptr(), lay.row_strides.as_ptr(), out.as_mut_ptr(), 0) };
    Ok(())
}

/// Runs two halves of the work, on two threads when `threads >= 2`, else one after the
/// other; either way they compute the same values (how the work is split never depends on
/// the thread count).
fn both<A, B>(threads: usize, a: A, b: B) -> Result<(), String>
where
    A: FnOnce() -> Result<(), String> + Send,
    B: FnOnce() -> Result<(), String>,
{
    if threads < 2 {
        return a().and(b());
    }
    std::thread::scope(|s| {
        let other = s.spawn(a);
        let mine = b();
        other.join().map_err(|_| "a kernel thread panicked".to_string())?.and(mine)
    })
}

/// Runs the compiled `kernel` on `operands` (each broadcast to their common shape, then
/// reduced when the kernel ends in a reduction) into a tensor of `out_shape`, on up to
/// `threads` threads. `Err` says why it could not (the caller then uses the eval rule).
pub fn run(
    kernel: &FusedKernel,
    operands: &[&Tensor<f32>],
    out_shape: &[usize],
    threads: usize,
    opts: Options,
) -> Result<Tensor<f32>, String> {
    run_with(kernel, operands, out_shape, threads, opts, &mut |len, _| vec![0.0; len])
}

/// How one call of a kernel runs: its compiled function's key and the loop layout over
/// the operands' common (broadcast) domain.
struct Launch {
    key: Key,
    lay: Layout,
    domain: Vec<usize>,
    /// The domain is empty (and the kernel stores): the result is all zeros, nothing runs.
    empty: bool,
}

/// The launch of `kernel` on operands of `shapes` giving `out_shape`, or why it cannot run
/// (the caller then uses the eval rule).
fn launch_of(
    kernel: &FusedKernel,
    shapes: &[&[usize]],
    own_strides: &[Vec<usize>],
    out_shape: &[usize],
    out_strides: Option<&[usize]>,
    opts: Options,
) -> Result<Launch, String> {
    if shapes.len() != kernel.inputs || own_strides.len() != kernel.inputs {
        return Err(format!("the kernel takes {} operand(s), got {}", kernel.inputs, shapes.len()));
    }
    let domain = match &kernel.reduce {
        None => out_shape.to_vec(),
        Some(_) => broadcast_all(shapes.iter().copied()).ok_or("the operands do not broadcast together")?,
    };
    for (j, x) in shapes.iter().enumerate() {
        if !broadcasts_to(x, &domain) {
            return Err(format!("operand {j} of shape {x:?} does not broadcast to {domain:?}"));
        }
    }
    // The output as the domain sees it: its own shape with the reduced axes kept as 1.
    let kept: Vec<usize> = match &kernel.reduce {
        None => domain.clone(),
        Some(r) => {
            if r.axes.iter().any(|&a| a >= domain.len()) {
                return Err(format!("reduction axes {:?} out of range for {domain:?}", r.axes));
            }
            let kept: Vec<usize> =
                domain.iter().enumerate().map(|(i, &d)| if r.axes.contains(&i) { 1 } else { d }).collect();
            let squeezed: Vec<usize> =
                domain.iter().enumerate().filter(|(i, _)| !r.axes.contains(i)).map(|(_, &d)| d).collect();
            if out_shape != kept && out_shape != squeezed {
                return Err(format!("a reduction of {domain:?} over {:?} cannot give {out_shape:?}", r.axes));
            }
            kept
        }
    };
    let empty = domain.iter().product::<usize>() == 0;
    if empty && kernel.reduce.is_some() {
        // An empty mean is 0/0: left to the eval rule, which has the edge cases.
        return Err("an empty reduction".into());
    }
    let strides: Vec<Vec<usize>> = shapes.iter().zip(own_strides).map(|(x, own)| stretched(x, own, &domain)).collect();
    let out_strides = match out_strides {
        Some(o) if kernel.reduce.is_none() && o.len() == domain.len() => stretched(&domain, o, &domain),
        Some(_) => return Err("only a kernel without reduction writes through strides".into()),
        None => broadcast_strides(&kept, &domain),
    };
    let lay = layout(&strides, &out_strides, &domain);
    let mode = match (&kernel.reduce, lay.out_along_row) {
        (None, _) => Mode::Store,
        (Some(_), true) => Mode::AccumulateRow,
        (Some(_), false) => Mode::AccumulateScalar,
    };
    let lane_sums = opts.reassociate && mode == Mode::AccumulateScalar;
    let key = Key {
        kernel: kernel.clone(),
        splat: lay.splat.clone(),
        fma: opts.fma,
        inline_math: opts.inline_math,
        lane_sums,
        mode,
    };
    Ok(Launch { key, lay, domain, empty })
}

/// The strides with which an operand of `shape`, stored with `own` strides, is read when
/// broadcast to `out` (as [`broadcast_strides`] for a contiguous operand): axes aligned
/// from the right; a missing axis or a size-1 axis that stretches reads stride 0.
fn stretched(shape: &[usize], own: &[usize], out: &[usize]) -> Vec<usize> {
    let lead = out.len() - shape.len().min(out.len());
    (0..out.len()).map(|i| if i < lead || (shape[i - lead] == 1 && out[i] != 1) { 0 } else { own[i - lead] }).collect()
}

fn compiled(key: &Key) -> Result<KernelFn, String> {
    compiler()?.lock().map_err(|_| "the kernel compiler was poisoned by a panic".to_string())?.get(key)
}

/// Compiles (once per process) the function that [`run_with`] would use for operands of
/// `shapes`, so that building a plan, not its first run, pays for compilation. `Err` says
/// why the kernel cannot run on the jit (its node then runs on the eval rule).
pub fn precompile(kernel: &FusedKernel, shapes: &[&[usize]], out_shape: &[usize], opts: Options) -> Result<(), String> {
    let own: Vec<Vec<usize>> = shapes.iter().map(|x| strides(x)).collect();
    let launch = launch_of(kernel, shapes, &own, out_shape, None, opts)?;
    if !launch.empty {
        compiled(&launch.key)?;
    }
    Ok(())
}

/// [`run`], with the output buffer from `alloc(len, zeroed)`: a vector of `len` elements,
/// which must be zeros when `zeroed` is true (a reduction adds into it) and may hold
/// anything otherwise (every element is written). The jit backend passes its buffer pool.
pub fn run_with(
    kernel: &FusedKernel,
    operands: &[&Tensor<f32>],
    out_shape: &[usize],
    threads: usize,
    opts: Options,
    alloc: &mut dyn FnMut(usize, bool) -> Vec<f32>,
) -> Result<Tensor<f32>, String> {
    if let Some(j) = operands.iter().position(|x| x.data.len() != x.shape.iter().product::<usize>()) {
        return Err(format!(
            "operand {j} holds {} values for the shape {:?}",
            operands[j].data.len(),
            operands[j].shape
        ));
    }
    let strided: Vec<Strided> =
        operands.iter().map(|x| Strided { data: &x.data, shape: &x.shape, strides: strides(&x.shape) }).collect();
    run_strided(kernel, &strided, out_shape, threads, opts, alloc)
}

/// An operand of [`run_strided`]: the elements of `shape` read from `data` with `strides`
/// (row-major for a whole tensor; a window of a larger tensor, such as a slice along an
/// axis read in place, has the larger tensor's strides and starts at its first element).
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub shape: &'a [usize],
    pub strides: Vec<usize>,
}

/// [`run_with`] on operands read through their strides: every element an operand's shape
/// and strides reach must lie in its `data` (checked; `Err` otherwise).
pub fn run_strided(
    kernel: &FusedKernel,
    operands: &[Strided],
    out_shape: &[usize],
    threads: usize,
    opts: Options,
    alloc: &mut dyn FnMut(usize, bool) -> Vec<f32>,
) -> Result<Tensor<f32>, String> {
    let own = checked(operands)?;
    let shapes: Vec<&[usize]> = operands.iter().map(|x| x.shape).collect();
    let Launch { key, lay, domain, empty } = launch_of(kernel, &shapes, &own, out_shape, None, opts)?;
    let total: usize = out_shape.iter().product();
    if empty {
        return Ok(Tensor { shape: out_shape.to_vec(), data: vec![0.0; total] });
    }
    let f = compiled(&key)?;
    let data: Vec<&[f32]> = operands.iter().map(|x| x.data).collect();
    let mut out = alloc(total, key.mode != Mode::Store);
    debug_assert_eq!(out.len(), total);
    dispatch(f, &data, &lay, &domain, kernel.op_count(), key.mode, threads, opts, &mut out)?;
    if let Some(r) = &kernel.reduce {
        if r.op == ReduceOp::Mean {
            // As `Op::Reduce`: the sum divided by the count, in f32.
            let count = r.axes.iter().map(|&a| domain[a]).product::<usize>() as f64 as f32;
            out.iter_mut().for_each(|v| *v /= count);
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// Runs `kernel` (which has no reduction) on `operands`, writing its result of `shape`
/// into `out` through `out_strides` (element `i` of the result at `Σ i_a · out_strides[a]`):
/// a window of a larger tensor, such as a concat's slice of its output. Elements of `out`
/// outside the window are left as they are. `Err` says why it could not (nothing written
/// then when the error comes before the run).
pub fn run_into(
    kernel: &FusedKernel,
    operands: &[Strided],
    shape: &[usize],
    out: &mut [f32],
    out_strides: &[usize],
    threads: usize,
    opts: Options,
) -> Result<(), String> {
    let own = checked(operands)?;
    let shapes: Vec<&[usize]> = operands.iter().map(|x| x.shape).collect();
    let reach = shape.iter().zip(out_strides).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>();
    if out_strides.len() != shape.len() || shape.iter().product::<usize>() > 0 && reach >= out.len() {
        return Err(format!("a result of shape {shape:?} reaches past its {} places", out.len()));
    }
    let Launch { key, lay, domain, empty } = launch_of(kernel, &shapes, &own, shape, Some(out_strides), opts)?;
    if empty {
        return Ok(());
    }
    let f = compiled(&key)?;
    let data: Vec<&[f32]> = operands.iter().map(|x| x.data).collect();
    dispatch(f, &data, &lay, &domain, kernel.op_count(), key.mode, threads, opts, out)
}

/// The own strides of strided operands, each checked to stay inside its data.
fn checked(operands: &[Strided]) -> Result<Vec<Vec<usize>>, String> {
    for (j, x) in operands.iter().enumerate() {
        let reach = x.shape.iter().zip(&x.strides).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>();
        if x.strides.len() != x.shape.len() || x.shape.iter().product::<usize>() > 0 && reach >= x.data.len() {
            return Err(format!("operand {j} of shape {:?} reaches past its {} values", x.shape, x.data.len()));
        }
    }
    Ok(operands.iter().map(|x| x.strides.clone()).collect())
}

/// Runs the compiled `f` over the whole domain into `out` (zeros when it accumulates):
/// in two halves when the work (`ops` per element) is large, on two threads when there
/// are (see [`run`]).
#[allow(clippy::too_many_arguments)]
fn dispatch(
    f: KernelFn,
    data: &[&[f32]],
    lay: &Layout,
    domain: &[usize],
    ops: usize,
    mode: Mode,
    threads: usize,
    opts: Options,
    out: &mut [f32],
) -> Result<(), String> {
    let total = out.len();
    let all_rows = lay.rows * lay.outer.iter().product::<usize>();
    let work = domain.iter().product::<usize>() * (ops + 1);
    // The outermost collapsed axis, and the output's stride along it: two threads may split
    // it only where they write disjoint output (a reduced axis has output stride 0).
    let (first, first_out_stride) = match lay.outer.first() {
        Some(&d) => (d, lay.out_outer_strides[0]),
        None => (lay.rows, lay.out_row_stride),
    };
    // Large work is split in two whatever the thread count (a reduction's partial sums must
    // not depend on it); `both` runs the halves on two threads when there are.
    if work < PARALLEL_WORK {
        launch_rows(f, data, lay, 0, all_rows, out, 0)?;
    } else if first >= 2 && (first_out_stride != 0 || mode == Mode::Store && all_rows >= 2) {
        let half = first / 2;
        let mid = half * (all_rows / first);
        // The first element the second half writes.
        let split = if mode == Mode::Store && first_out_stride == 0 { mid * lay.n } else { half * first_out_stride };
        let (lo, hi) = out.split_at_mut(split.min(total));
        both(
            threads,
            move || launch_rows(f, data, lay, 0, mid, lo, 0),
            move || launch_rows(f, data, lay, mid, all_rows, hi, split),
        )?;
    } else if opts.reassociate && mode != Mode::Store && all_rows >= 2 && total * 16 <= domain.iter().product::<usize>()
    {
        // Rows that add into the same outputs: the second half into zeros, added after.
        let mid = all_rows / 2;
        let mut partial = vec![0.0f32; total];
        let partial_ref = &mut partial;
        let out_ref = &mut *out;
        both(
            threads,
            move || launch_rows(f, data, lay, 0, mid, out_ref, 0),
            move || launch_rows(f, data, lay, mid, all_rows, partial_ref, 0),
        )?;
        out.iter_mut().zip(&partial).for_each(|(o, p)| *o += p);
    } else if opts.reassociate && mode == Mode::AccumulateScalar && all_rows == 1 {
        // One long row summed: each thread sums half of it into its own partial.
        let mid = ((lay.n / 2).div_ceil(16) * 16).min(lay.n);
        let mut partial = [0.0f32];
        let (lo, hi) = (&mut out[..1], &mut partial[..]);
        both(
            threads,
            move || launch_elements(f, data, lay, 0, mid, lo),
            move || launch_elements(f, data, lay, mid, lay.n, hi),
        )?;
        out[0] += partial[0];
    } else if mode == Mode::Store && all_rows == 1 {
        // One long row: split its elements (the first half a multiple of 16).
        let mid = ((lay.n / 2).div_ceil(16) * 16).min(lay.n);
        let row = out.get_mut(..lay.n).ok_or("the output would be written out of bounds")?;
        let (lo, hi) = row.split_at_mut(mid);
        both(
            threads,
            move || launch_elements(f, data, lay, 0, mid, lo),
            move || launch_elements(f, data, lay, mid, lay.n, hi),
        )?;
    } else {
        launch_rows(f, data, lay, 0, all_rows, out, 0)?;
    }
    Ok(())
}
