//! The fast CPU backend (`jit`): f32 only, the default path for training.
//!
//! It runs graphs with the interp driver (same node order, feed and result checks, values
//! freed after their last use — see `interp::execute`) but computes the ops that dominate
//! a training step with fast kernels:
//! - **MatMul** through the `gemm` crate (AVX-512 kernels when the CPU has them, chosen at
//!   run time; plain SIMD otherwise). Transposed operands are passed as strides, never
//!   copied; `[..., m, k] @ [k, n]` is one GEMM over the flattened rows; batched products
//!   are a loop of GEMMs. Large products use both cores.
//! - **Elementwise** unary and binary ops over contiguous slices, with the broadcast
//!   patterns models produce (same shape, scalar, trailing-axes bias, per-row scale) as
//!   straight loops the compiler vectorises, split over two threads when large.
//! - **Reductions** over the trailing axes or one middle axis as contiguous loops.
//!
//! Every other op (and every unusual shape of the above) falls back to its eval rule in
//! `ops`, so the backend is complete by construction and agrees with interp. Cranelift
//! fused elementwise kernels are the next step of this backend (see the jit issue).
//!
//! With profiling on, the time of each op kind is recorded for `mdl bench`.

mod kernels;

use super::interp::execute;
use super::{ExecError, Executor, Mode, Values};
use crate::exec::{Arg, EvalCx};
use crate::ir::dim::Binding;
use crate::ir::graph::Graph;
use crate::ops::{self, Op};
use crate::tensor::{Tensor, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The fast CPU executor.
#[derive(Debug)]
pub struct Jit {
    /// Worker threads for large kernels (1 or 2 on the target machines).
    threads: usize,
    profiling: bool,
    profile: HashMap<String, (Duration, usize)>,
}

impl Default for Jit {
    fn default() -> Jit {
        Jit::new()
    }
}

impl Jit {
    /// An executor using the machine's cores (at most 2: more did not pay on CTR shapes).
    pub fn new() -> Jit {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Jit::with_threads(cores.min(2))
    }

    pub fn with_threads(threads: usize) -> Jit {
        Jit { threads: threads.max(1), profiling: false, profile: HashMap::new() }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// The profile key of an op: its kind, without sizes.
fn kind(op: &Op) -> String {
    let name = op.name();
    name.split_whitespace().next().unwrap_or("").to_string()
}

impl Executor for Jit {
    fn name(&self) -> &'static str {
        "jit"
    }

    fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        if on {
            self.profile.clear();
        }
    }

    fn profile(&self) -> Vec<(String, Duration, usize)> {
        let mut v: Vec<(String, Duration, usize)> = self.profile.iter().map(|(k, (d, n))| (k.clone(), *d, *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1));
        v
    }

    fn run(
        &mut self,
        graph: &Graph,
        binding: &Binding,
        feeds: &HashMap<String, Value<f32>>,
        params: &HashMap<String, Tensor<f32>>,
        mode: &Mode,
    ) -> Result<Values<f32>, ExecError> {
        let threads = self.threads;
        let profiling = self.profiling;
        let profile = &mut self.profile;
        let mut eval = |op: &Op, args: &[Arg<f32>], cx: &EvalCx| -> Result<Value<f32>, ExecError> {
            let start = profiling.then(Instant::now);
            let out = match kernels::fast(op, args, cx, threads)? {
                Some(v) => v,
                None => ops::eval(op, args, cx)?,
            };
            if let Some(t) = start {
                let e = profile.entry(kind(op)).or_insert((Duration::ZERO, 0));
                e.0 += t.elapsed();
                e.1 += 1;
            }
            Ok(out)
        };
        execute(graph, binding, feeds, params, mode, false, &mut eval)
    }
}
