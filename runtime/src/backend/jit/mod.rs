//! The fast CPU backend (`jit`): f32 only, the default path for training.
//!
//! It runs graphs with the interp driver (same node order, feed and result checks, values
//! freed after their last use — see [`super::driver`]) but computes the ops that dominate
//! a training step with fast kernels:
//! - **MatMul** through the `gemm` crate (AVX-512 kernels when the CPU has them, chosen at
//!   run time; plain SIMD otherwise). Transposed operands are passed as strides, never
//!   copied; `[..., m, k] @ [k, n]` is one GEMM over the flattened rows; batched products
//!   are a loop of GEMMs. Large products use all cores; vector and outer products have
//!   loops of their own, and a long reduction into a small output is split along the
//!   reduction ([`product`]). With
//!   [`Products::Bf16`] (`train.precision: bf16`) they run on the [`bf16`] kernel instead:
//!   operands rounded to bf16, f32 sums, on AMX-BF16's tiles or AVX512-BF16's `vdpbf16ps`.
//! - **Elementwise** unary and binary ops over contiguous slices, with the broadcast
//!   patterns models produce (same shape, scalar, trailing-axes bias, per-row scale) as
//!   straight loops the compiler vectorises, split over two threads when large.
//! - **Reductions** over the trailing axes or one middle axis as contiguous loops (max and
//!   min in the eval rule's order, so its values exactly); with the
//!   fast kernels, a lone sum or mean runs as a fused kernel instead
//!   ([`crate::fuse::lone_reduction`], as on OpenCL).
//! - **Fused elementwise kernels**: before the first run of a graph, the fusion pass
//!   ([`crate::fuse`]) turns maximal groups of unary/binary ops (with the scalars and
//!   broadcasts feeding them, and a sum or mean that is their only reader) into
//!   `Op::Fused` nodes, which run as Cranelift-compiled SIMD loops ([`codegen`]). The fused plan is cached per graph: the executor keeps the last
//!   few graphs it ran and recognises a graph by value (same nodes, same tables), so
//!   calling `run` every training step neither re-runs the pass nor recompiles, and a
//!   changed graph never meets a stale plan. Each distinct kernel is compiled once per
//!   process. Results are keyed by the caller's node ids and output names; node numbers
//!   in error messages are those of the fused graph.
//!
//! - **Slices read in place**: a fused kernel (or a lone sum or mean) whose operand is a
//!   slice reads the sliced tensor through strides ([`window`]), and the slice is not
//!   copied; a concat's parts are written into their slices of its output by the kernels
//!   that make them (a fused producer, a broadcast read in place, or a copy).
//!
//! Every other op (and every unusual shape of the above, and any kernel Cranelift cannot
//! compile) falls back to its eval rule in `ops`, so the backend is complete by
//! construction and agrees with interp.
//!
//! With profiling on, the time of each op kind is recorded for `mdl bench`.

mod bag;
pub mod bf16;
pub mod codegen;
mod group;
mod kernels;
mod layout;
mod math;
pub mod pool;
mod product;
pub mod speed;
mod update;
mod window;
pub use window::parts_read_from_concats;

use super::driver::{execute, Evaluator, Lifetimes, Operands};
use super::{profile_key, ExecError, Executor, Mode, NodeTime, OpProfile, PlanCache, Values};
use crate::exec::EvalCx;
use crate::ir::dim::{eval_shape, Binding};
use crate::ir::graph::{Graph, NodeId};
use crate::ops::{self, Op};
use crate::optim::{SlotsMut, StepCoeffs, UpdateKernels};
use crate::tensor::{Tensor, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A graph as the jit runs it: `fused` is the caller's graph after the fusion pass,
/// `lifetimes` those of `fused` (computed once, used every run).
#[derive(Debug)]
struct Plan {
    fused: Graph,
    lifetimes: Lifetimes,
    /// The nodes computed by the embedding-bag kernels ([`bag`]), which read other
    /// operands than their inputs (as `lifetimes` records).
    bags: HashMap<NodeId, bag::Kernel>,
    /// The kernels that read slices in place ([`window`]): their operands are the sliced
    /// tensors (as `lifetimes` records), each with its window.
    windows: HashMap<NodeId, Vec<Option<window::Window>>>,
    /// The concats that write their parts in place ([`window`]): their operands are the
    /// parts' producers' operands (as `lifetimes` records).
    concats: HashMap<NodeId, Vec<window::Part>>,
}

/// The fast CPU executor.
#[derive(Debug)]
pub struct Jit {
    /// Worker threads for large kernels (at least 1).
    threads: usize,
    profile: OpProfile,
    /// Run the fusion pass and the Cranelift kernels (on by default).
    fusion: bool,
    codegen: codegen::Options,
    /// Fused plans of recently run graphs.
    plans: PlanCache<Plan>,
    /// Buffers of freed values, reused by later ops and later runs ([`pool`]).
    pool: pool::Pool,
    /// How the matrix products compute (f32 unless [`Jit::with_products`] says bf16).
    products: Products,
}

/// One matrix product's operands, as every product kernel takes them ([`product`], the
/// [`bf16`] kernels): `op(a)[m, k] · op(b)[k, n]`, `a` stored row-major with `a_cols`
/// columns and read transposed when `ta` (likewise `b`); a transposed operand is a pair of
/// strides, never a copy.
#[derive(Clone, Copy, Debug)]
pub struct ProductOperands<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: &'a [f32],
    pub ta: bool,
    pub a_cols: usize,
    pub b: &'a [f32],
    pub tb: bool,
    pub b_cols: usize,
}

/// The arithmetic of the jit's matrix products (`MatMul`, forward and backward; the group
/// products stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Products {
    /// f32 operands and sums (the `gemm` crate).
    #[default]
    F32,
    /// Operands rounded to bf16, f32 sums ([`bf16`]), by this kernel.
    Bf16(bf16::Dot),
}

impl Default for Jit {
    fn default() -> Jit {
        Jit::new()
    }
}

impl Jit {
    /// An executor using all the machine's cores ([`default_threads`]).
    pub fn new() -> Jit {
        Jit::with_threads(default_threads())
    }

    pub fn with_threads(threads: usize) -> Jit {
        Jit {
            threads: threads.max(1),
            profile: OpProfile::default(),
            fusion: true,
            codegen: codegen::Options::default(),
            plans: PlanCache::default(),
            pool: pool::Pool::default(),
            products: Products::F32,
        }
    }

    /// Matrix products in f32 (the default) or bf16. Panics when a bf16 kernel needs a CPU
    /// feature this CPU lacks (ask [`bf16::Dot::available`] first).
    pub fn with_products(mut self, products: Products) -> Jit {
        if let Products::Bf16(dot) = products {
            assert!(dot.available(), "the bf16 products' {dot:?} kernel needs a CPU feature this one lacks");
        }
        self.products = products;
        self
    }

    /// Turns elementwise fusion on or off (off: every op runs on its own kernel).
    pub fn with_fusion(mut self, on: bool) -> Jit {
        self.fusion = on;
        self.plans.clear();
        self
    }

    /// Exact kernels (`true`: [`codegen::Options::EXACT`], every result bit-identical to
    /// interp) or fast ones (`false`, the default: fma contraction and inline
    /// transcendentals, within a few ulp).
    pub fn with_exact_kernels(mut self, exact: bool) -> Jit {
        self.codegen = if exact { codegen::Options::EXACT } else { codegen::Options::default() };
        self
    }

    /// The fused plan of `graph`, made on first sight ([`PlanCache`]).
    fn plan(&mut self, graph: &Graph) -> &Plan {
        if !self.plans.promote(graph) {
            let fused = if self.fusion { crate::fuse::fuse_elementwise(graph) } else { graph.clone() };
            let fused = match self.fusion.then(|| window::parts_read_from_concats(&fused)).flatten() {
                Some(rewired) => rewired,
                None => fused,
            };
            let (mut reads, bags) = bag::find(&fused);
            let windows = if self.fusion { window::find(&fused, &mut reads) } else { HashMap::new() };
            let concats = if self.fusion { window::find_concats(&fused, &mut reads) } else { HashMap::new() };
            let lifetimes = Lifetimes::with_reads(&fused, false, &reads);
            self.plans.insert(graph, Plan { fused, lifetimes, bags, windows, concats });
        }
        self.plans.first().expect("a plan was just found or made")
    }

    /// Compiles the optimizer's update kernels (once per process): `Err` with the reason
    /// when they do not compile on this host (the updates then run on the reference loops).
    pub fn compile_update_kernels() -> Result<(), String> {
        update::compiled()
    }

    /// The jit's update kernels on the threads [`Jit::new`] uses, for another backend that
    /// updates parameters on the host.
    #[cfg(feature = "opencl")]
    pub(crate) fn host_update_kernels() -> impl crate::optim::UpdateKernels<f32> {
        update::Kernels { threads: default_threads() }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `(buffers taken from the pool, buffers freshly allocated)` for results of pooled
    /// sizes since the executor was made: in the steady state of training, the second
    /// stops growing except for the values handed to the caller.
    pub fn pool_counts(&self) -> (u64, u64) {
        self.pool.counts()
    }
}

/// The threads [`Jit::new`] uses: the machine's cores as the OS reports them to this
/// process (`std::thread::available_parallelism`, which follows CPU affinity and cgroup
/// quotas), 1 when it cannot tell. The matrix products spread over all of them (rayon);
/// the other large kernels split their work in two halves. The values computed do not
/// depend on the thread count: where partial sums are formed, the split is fixed by the
/// work, and the threads only decide whether the halves run side by side.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The jit's per-node evaluator for one run: fast kernels, fused kernels, the eval rules
/// as fallback; freed values go to the pool.
struct JitEval<'r> {
    /// The graph run (the plan's fused graph).
    graph: &'r Graph,
    threads: usize,
    products: Products,
    options: codegen::Options,
    profile: Option<&'r mut OpProfile>,
    pool: &'r mut pool::Pool,
    bags: &'r HashMap<NodeId, bag::Kernel>,
    windows: &'r HashMap<NodeId, Vec<Option<window::Window>>>,
    concats: &'r HashMap<NodeId, Vec<window::Part>>,
}

impl Evaluator<f32> for JitEval<'_> {
    fn eval(
        &mut self,
        id: NodeId,
        op: &Op,
        operands: &mut Operands<'_, '_, f32>,
        cx: &EvalCx,
    ) -> Result<Value<f32>, ExecError> {
        let start = self.profile.is_some().then(Instant::now);
        let mut fallback = false;
        let bag = self.bags.get(&id);
        let windows = self.windows.get(&id);
        // A lone sum or mean as a fused kernel ([`crate::fuse::lone_reduction`]): vector
        // lane sums and both threads, where the direct kernel sums in `Op::Reduce`'s order
        // on one; so only when reductions may reassociate, or when it reads a slice in
        // place (without reassociation it sums in `Op::Reduce`'s order too).
        let lone = match op {
            Op::Reduce { .. } if self.options.reassociate || windows.is_some() => crate::fuse::lone_reduction(op),
            _ => None,
        };
        let fused = match op {
            Op::Fused(kernel) => Some(kernel.as_ref()),
            _ => lone.as_ref(),
        };
        let concat = match op {
            Op::Concat { axis } => self.concats.get(&id).map(|parts| (*axis, parts)),
            _ => None,
        };
        let out = match (fused, bag) {
            _ if concat.is_some() => {
                let (axis, parts) = concat.expect("checked by the guard");
                let args = operands.args(op)?;
                match window::concat(parts, axis, &args, cx, self.threads, self.options, self.products, self.pool) {
                    Ok(t) => Value::Dense(t),
                    Err(_) => {
                        fallback = true;
                        window::concat_eval(op, parts, &args, cx)?
                    }
                }
            }
            (_, Some(bag)) => bag::run(bag, op, operands, cx, self.threads, !self.options.reassociate, self.pool)?,
            (Some(kernel), None) => {
                let args = operands.args(op)?;
                let tensors: Result<Vec<&Tensor<f32>>, ExecError> = args.iter().map(|a| a.dense("fused")).collect();
                let pool = &mut *self.pool;
                let (threads, options) = (self.threads, self.options);
                let ran = match windows {
                    Some(w) => window::run(kernel, &tensors?, w, cx, threads, options, pool),
                    None => codegen::run_with(kernel, &tensors?, cx.out_shape, threads, options, &mut |n, z| {
                        pool.alloc(n, z)
                    }),
                };
                match (ran, windows) {
                    (Ok(t), _) => Value::Dense(t),
                    (Err(_), Some(w)) => {
                        fallback = true;
                        window::eval(op, &args, w, cx)?
                    }
                    (Err(_), None) => {
                        fallback = true;
                        ops::eval(op, &args, cx)?
                    }
                }
            }
            (None, None) => {
                match kernels::fast(
                    op,
                    operands,
                    cx,
                    self.threads,
                    !self.options.inline_math,
                    self.products,
                    self.pool,
                )? {
                    Some(v) => v,
                    None => {
                        fallback = !matches!(op, Op::Input { .. } | Op::Param { .. } | Op::Scalar(_));
                        ops::eval(op, &operands.args(op)?, cx)?
                    }
                }
            }
        };
        if let (Some(t), Some(profile)) = (start, self.profile.as_deref_mut()) {
            let key = match bag {
                Some(bag::Kernel::Pool { .. }) => "embedding_bag".to_string(),
                Some(bag::Kernel::Rows { .. }) => "sparse_rows(bag)".to_string(),
                None => profile_key(op, fallback),
            };
            profile.record_node(key, self.graph, id, t.elapsed());
        }
        Ok(out)
    }

    fn free(&mut self, value: Value<f32>) {
        if let Value::Dense(t) = value {
            self.pool.put(t.data);
        }
    }
}

/// The jit carries out the optimizer's updates with its compiled kernels ([`update`]) on
/// its threads.
impl UpdateKernels<f32> for Jit {
    fn apply(&self, w: &mut [f32], slots: SlotsMut<'_, f32>, grad: &Value<f32>, coeffs: &StepCoeffs<f32>) {
        update::Kernels { threads: self.threads }.apply(w, slots, grad, coeffs)
    }
}

impl Executor for Jit {
    fn name(&self) -> &'static str {
        "jit"
    }

    fn set_profiling(&mut self, on: bool) {
        self.profile.set_on(on);
    }

    fn profile(&self) -> Vec<(String, Duration, usize)> {
        self.profile.sorted()
    }

    fn set_profiling_by_node(&mut self, on: bool) {
        self.profile.set_by_node(on);
    }

    fn node_profile(&self) -> Vec<NodeTime> {
        self.profile.nodes_sorted()
    }

    /// The fused plan of `graph`, and every fused kernel compiled for the operand shapes
    /// `binding` gives (a kernel that cannot be compiled runs on its eval rule, as in `run`).
    fn prepare(&mut self, graph: &Graph, binding: &Binding) -> Result<(), ExecError> {
        let codegen = self.codegen;
        let fused = &self.plan(graph).fused;
        let shape =
            |id: NodeId| eval_shape(&fused.node(id).sig.shape, binding).map_err(|message| ExecError::Size { message });
        for id in fused.ids() {
            let node = fused.node(id);
            if let Op::Fused(kernel) = &node.op {
                let shapes = node.inputs.iter().map(|&i| shape(i)).collect::<Result<Vec<_>, _>>()?;
                let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
                let _ = codegen::precompile(kernel, &shapes, &shape(id)?, codegen);
            }
        }
        Ok(())
    }

    /// `optim`'s rules compiled by Cranelift ([`update`]) on this executor's threads: the
    /// same results as the reference loops, bit for bit.
    fn update_kernels(&self) -> Option<&dyn UpdateKernels<f32>> {
        Some(self)
    }

    fn run(
        &mut self,
        graph: &Graph,
        binding: &Binding,
        feeds: &HashMap<String, Value<f32>>,
        params: &HashMap<String, Tensor<f32>>,
        mode: &Mode,
    ) -> Result<Values<f32>, ExecError> {
        self.plan(graph);
        let Jit { plans, profile, pool, threads, codegen, fusion, products, .. } = self;
        let plan = plans.first().expect("a plan was just made");
        let mut eval = JitEval {
            graph: &plan.fused,
            threads: *threads,
            products: *products,
            options: *codegen,
            profile: profile.recording(),
            pool,
            bags: &plan.bags,
            windows: &plan.windows,
            concats: &plan.concats,
        };
        let values = execute(&plan.fused, &plan.lifetimes, binding, feeds, params, mode, &mut eval);
        pool.end_run();
        let values = values?;
        Ok(if *fusion { values.rekey(graph) } else { values })
    }
}
