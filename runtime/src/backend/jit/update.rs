//! The optimizer's update rules as Cranelift kernels ([`Kernels`], the jit's
//! [`UpdateKernels`]): SGD, Adam and Adagrad over a dense parameter or over the touched rows
//! of an embedding table, split over both threads when large.
//!
//! The rule itself, its coefficients and its state belong to [`crate::optim`]; this module
//! renders the rule's one description ([`Rule::step`]) into Cranelift instructions, one
//! instruction per operation ([`Emit`]: no fma contraction, IEEE `sqrt` and division), so
//! a jit step leaves parameters and moments bit-identical to the reference optimizer's,
//! which evaluates the same description. What is the jit's own: the loops over rows and
//! elements, the vector width and the threads. One function per rule is compiled once
//! per process:
//!
//! `fn(w, g, s1, s2, rows, n_rows, width, coeffs, first_row)` updates, for each `j <
//! n_rows`, the `width` elements of row `rows[j] − first_row` of `w` and of the state slots
//! `s1`, `s2` (Adam's `m` and `v`, Adagrad's accumulator) from row `j` of the compact
//! gradient `g`, in F32X4 vectors and a scalar tail. `coeffs` holds the step's
//! [`StepCoeffs`] as nine f32s in [`COEFFS`] order. A dense parameter is one row of its
//! whole length (`rows = [0]`).

use super::codegen::compiler;
use crate::optim::{Coeff, Rule, SlotsMut, StepCoeffs, UpdateArith, UpdateKernels};
use crate::rows::combine_duplicate_rows;
use crate::tensor::Value;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value as ClValue};
use cranelift_frontend::FunctionBuilder;
use std::sync::OnceLock;

/// Elements (rows × width) above which an update is split over two threads.
const PARALLEL_WORK: usize = 1 << 16;

/// How many coefficients a kernel reads ([`Coeff::ALL`], the fields of [`StepCoeffs`]).
const COEFFS: usize = Coeff::ALL.len();

type UpdateFn = unsafe extern "C" fn(
    w: *mut f32,
    g: *const f32,
    s1: *mut f32,
    s2: *mut f32,
    rows: *const u32,
    n_rows: usize,
    width: usize,
    coeffs: *const f32,
    first_row: usize,
);

/// The compiled kernel of `rule`, compiled on first use (`Err` when Cranelift cannot
/// compile for this host; the caller then runs the reference loops).
fn kernel(rule: Rule) -> Result<UpdateFn, String> {
    static KERNELS: [OnceLock<Result<usize, String>>; Rule::ALL.len()] = [const { OnceLock::new() }; Rule::ALL.len()];
    let at = Rule::ALL.iter().position(|&r| r == rule).expect("every rule is in Rule::ALL");
    let code = KERNELS[at].get_or_init(|| {
        let mut c = compiler()?.lock().map_err(|_| "the kernel compiler is poisoned".to_string())?;
        let name = format!("update_{}", rule.name());
        c.compile_function(&name, 9, |b, ptr, _| build(b, rule, ptr)).map(|code| code as usize)
    });
    // SAFETY: the code was built by `build` with nine pointer-sized parameters and no
    // results in the host's default (`extern "C"`) calling convention, which is the
    // signature of `UpdateFn`; the module is never freed.
    code.clone().map(|code| unsafe { std::mem::transmute::<usize, UpdateFn>(code) })
}

/// Whether every rule's kernel compiles on this host (else updates run on the reference
/// loops); the first call compiles them.
pub fn compiled() -> Result<(), String> {
    Rule::ALL.into_iter().try_for_each(|r| kernel(r).map(|_| ()))
}

/// Emits the kernel of `rule` (see the module docs for its parameters): the loops, and
/// in their body the loads of `w`, `g` and the rule's slots, the rule's step and the stores.
fn build(b: &mut FunctionBuilder, rule: Rule, ptr: Type) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p: Vec<ClValue> = b.block_params(entry).to_vec();
    let (w, g, s1, s2, rows, n_rows, width, coeffs, first_row) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
    let mem = MemFlagsData::new().with_notrap();
    let scalar: [ClValue; COEFFS] = std::array::from_fn(|k| b.ins().load(types::F32, mem, coeffs, 4 * k as i32));
    let vector: [ClValue; COEFFS] = scalar.map(|s| b.ins().splat(types::F32X4, s));

    let j = b.declare_var(ptr);
    let i = b.declare_var(ptr);
    let (wp, gp, s1p, s2p) = (b.declare_var(ptr), b.declare_var(ptr), b.declare_var(ptr), b.declare_var(ptr));
    let zero = b.ins().iconst(ptr, 0);
    b.def_var(j, zero);
    let [row_head, row_body, v_head, v_body, t_head, t_body, row_end, exit] = [(); 8].map(|_| b.create_block());
    b.ins().jump(row_head, &[]);

    // for j in 0..n_rows: the row's pointers.
    b.switch_to_block(row_head);
    let jv = b.use_var(j);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, jv, n_rows);
    b.ins().brif(more, row_body, &[], exit, &[]);
    b.switch_to_block(row_body);
    let jv = b.use_var(j);
    let at = b.ins().ishl_imm_u(jv, 2);
    let at = b.ins().iadd(rows, at);
    let row = b.ins().load(types::I32, mem, at, 0);
    let row = if ptr == types::I32 { row } else { b.ins().uextend(ptr, row) };
    let row = b.ins().isub(row, first_row);
    let elem = b.ins().imul(row, width);
    let bytes = b.ins().ishl_imm_u(elem, 2);
    for (var, base) in [(wp, w), (s1p, s1), (s2p, s2)] {
        let a = b.ins().iadd(base, bytes);
        b.def_var(var, a);
    }
    let gelem = b.ins().imul(jv, width);
    let gbytes = b.ins().ishl_imm_u(gelem, 2);
    let ga = b.ins().iadd(g, gbytes);
    b.def_var(gp, ga);
    b.def_var(i, zero);
    b.ins().jump(v_head, &[]);

    // Four elements at a time, then one.
    for (head, body, step, next) in [(v_head, v_body, 4i64, t_head), (t_head, t_body, 1, row_end)] {
        b.switch_to_block(head);
        let iv = b.use_var(i);
        let left = b.ins().isub(width, iv);
        let fits = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, left, step);
        b.ins().brif(fits, body, &[], next, &[]);
        b.switch_to_block(body);
        let ty = if step == 1 { types::F32 } else { types::F32X4 };
        let iv = b.use_var(i);
        let off = b.ins().ishl_imm_u(iv, 2);
        let [wa, ga, s1a, s2a] = [wp, gp, s1p, s2p].map(|v| {
            let base = b.use_var(v);
            b.ins().iadd(base, off)
        });
        let wv = b.ins().load(ty, mem, wa, 0);
        let gv = b.ins().load(ty, mem, ga, 0);
        let slot_addrs = &[s1a, s2a][..rule.slots()];
        let mut slots: Vec<ClValue> = slot_addrs.iter().map(|&at| b.ins().load(ty, mem, at, 0)).collect();
        let coeffs = if step == 1 { &scalar } else { &vector };
        let new_w = rule.step(&mut Emit { b: &mut *b, coeffs }, wv, gv, &mut slots);
        for (&v, &at) in slots.iter().zip(slot_addrs) {
            b.ins().store(mem, v, at, 0);
        }
        b.ins().store(mem, new_w, wa, 0);
        let iv = b.ins().iadd_imm_s(iv, step);
        b.def_var(i, iv);
        b.ins().jump(head, &[]);
    }

    b.switch_to_block(row_end);
    let jv = b.use_var(j);
    let jv = b.ins().iadd_imm_s(jv, 1);
    b.def_var(j, jv);
    b.ins().jump(row_head, &[]);

    b.switch_to_block(exit);
    b.ins().return_(&[]);
}

/// [`UpdateArith`] as Cranelift instructions on values of one type (F32 or F32X4), with
/// the step's coefficients already loaded (splat for vectors): each operation is one
/// instruction, so the kernel computes the reference's operations exactly.
struct Emit<'a, 'f> {
    b: &'a mut FunctionBuilder<'f>,
    coeffs: &'a [ClValue; COEFFS],
}

impl UpdateArith for Emit<'_, '_> {
    type V = ClValue;
    fn coeff(&mut self, c: Coeff) -> ClValue {
        self.coeffs[c as usize]
    }
    fn add(&mut self, x: ClValue, y: ClValue) -> ClValue {
        self.b.ins().fadd(x, y)
    }
    fn sub(&mut self, x: ClValue, y: ClValue) -> ClValue {
        self.b.ins().fsub(x, y)
    }
    fn mul(&mut self, x: ClValue, y: ClValue) -> ClValue {
        self.b.ins().fmul(x, y)
    }
    fn div(&mut self, x: ClValue, y: ClValue) -> ClValue {
        self.b.ins().fdiv(x, y)
    }
    fn sqrt(&mut self, x: ClValue) -> ClValue {
        self.b.ins().sqrt(x)
    }
}

/// The jit's update kernels: `optim`'s rules compiled, over `threads` threads.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub threads: usize,
}

/// A rule's compiled kernel and the step's coefficients it reads.
#[derive(Clone, Copy)]
struct Step<'a> {
    f: UpdateFn,
    coeffs: &'a [f32; COEFFS],
}

/// A parameter (or a part of it) and its state slots, `None` for a slot the rule keeps
/// none of.
struct Run<'a> {
    w: &'a mut [f32],
    s1: Option<&'a mut [f32]>,
    s2: Option<&'a mut [f32]>,
}

impl Run<'_> {
    /// The elements before `at` and those from `at` on, of the parameter and its slots.
    fn split_at(self, at: usize) -> (Self, Self) {
        fn split(s: Option<&mut [f32]>, at: usize) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
            match s.map(|s| s.split_at_mut(at)) {
                Some((x, y)) => (Some(x), Some(y)),
                None => (None, None),
            }
        }
        let (w0, w1) = self.w.split_at_mut(at);
        let ((a0, a1), (b0, b1)) = (split(self.s1, at), split(self.s2, at));
        (Run { w: w0, s1: a0, s2: b0 }, Run { w: w1, s1: a1, s2: b1 })
    }

    /// Runs kernel `k` over `rows` (ascending, `g` holding one compact row each), the rows
    /// after the first half going to a second thread when `parallel`.
    fn call(self, k: Step<'_>, g: &[f32], rows: &[u32], width: usize, first_row: usize, parallel: bool) {
        if parallel && rows.len() >= 2 {
            let h = rows.len() / 2;
            let cut = (rows[h] as usize - first_row) * width;
            let (lo, hi) = self.split_at(cut);
            let (g_lo, g_hi) = g.split_at(h * width);
            std::thread::scope(|s| {
                s.spawn(|| lo.call(k, g_lo, &rows[..h], width, first_row, false));
                hi.call(k, g_hi, &rows[h..], width, rows[h] as usize, false);
            });
            return;
        }
        let null = std::ptr::null_mut::<f32>();
        let s1 = self.s1.map_or(null, |s| s.as_mut_ptr());
        let s2 = self.s2.map_or(null, |s| s.as_mut_ptr());
        // SAFETY: every row `r` of `rows` satisfies `first_row <= r` and `(r − first_row + 1)
        // × width <= w.len()` (and the same for the slots, which have `w`'s length), because
        // the caller checked the rows against the table and splits only at a row boundary;
        // `g` holds `rows.len() × width` elements; a null slot is never read by the rules
        // that have no such slot.
        unsafe {
            (k.f)(
                self.w.as_mut_ptr(),
                g.as_ptr(),
                s1,
                s2,
                rows.as_ptr(),
                rows.len(),
                width,
                k.coeffs.as_ptr(),
                first_row,
            )
        }
    }
}

impl UpdateKernels<f32> for Kernels {
    fn apply(&self, w: &mut [f32], slots: SlotsMut<'_, f32>, grad: &Value<f32>, c: &StepCoeffs<f32>) {
        let Ok(f) = kernel(slots.rule()) else {
            return crate::optim::HostLoops.apply(w, slots, grad, c);
        };
        let (s1, s2) = match slots {
            SlotsMut::Sgd => (None, None),
            SlotsMut::Adam { m, v } => (Some(m), Some(v)),
            SlotsMut::Adagrad { accum } => (Some(accum), None),
        };
        let coeffs = c.values();
        let k = Step { f, coeffs: &coeffs };
        let run = Run { w, s1, s2 };
        match grad {
            Value::Dense(g) => {
                let n = run.w.len().min(g.data.len());
                let parallel = self.threads > 1 && n >= PARALLEL_WORK;
                if parallel {
                    let h = n / 2;
                    let (lo, hi) = run.split_at(h);
                    std::thread::scope(|s| {
                        s.spawn(|| lo.call(k, &g.data[..h], &[0], h, 0, false));
                        hi.call(k, &g.data[h..], &[0], n - h, 0, false);
                    });
                } else {
                    run.call(k, &g.data, &[0], n, 0, false);
                }
            }
            Value::Ids(_) => {}
            Value::RowSparse { shape, rows, values } => {
                let width: usize = shape.iter().skip(1).product();
                let combined = combine_duplicate_rows(rows, &values.data, width);
                let parallel = self.threads > 1 && combined.values.len() >= PARALLEL_WORK;
                run.call(k, &combined.values, &combined.rows, width, 0, parallel);
            }
        }
    }
}
