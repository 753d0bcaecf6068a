//! The OpenCL backend (`opencl`, cargo feature `opencl`): runs graphs on an OpenCL device
//! through the `ocl` crate. Tested on PoCL (OpenCL on the CPU); meant for GPUs.
//!
//! This module owns the executor ([`OpenCl`]): the shared driver
//! ([`crate::backend::driver::execute`]: node order, feed and result checks, values freed
//! after their last use) over the jit's fused plan, with the evaluator below. Its parts,
//! one job per file:
//! - [`device`]: device discovery (platforms counted by the raw `clGetPlatformIDs`, never
//!   by `ocl`'s `Platform::list/default/first`, which wait and then panic on a machine
//!   without a platform) and opening a device;
//! - `plan`: the placement plan, what runs on the device and what on the host, and the
//!   one OpenCL program per plan (built once per distinct source text; PoCL also caches
//!   builds on disk under `POCL_CACHE_DIR`);
//! - `resident`: parameters kept on the device between runs, their host stamps, and the
//!   host's updates written back;
//! - `launch`: every kernel launch through one helper, every upload and read-back counted,
//!   and the kernels of a run (copies, gathers, softmax, fused kernels, tuned matmuls);
//! - `eval`: the evaluator the driver calls per node, which keeps values between device
//!   kernels on the device;
//! - `train`: training on the device ([`DeviceTraining`], the capability the trainer asks
//!   for through [`Executor::device_training`]): gradients, the global norm
//!   and the optimizer's rule and state stay on the device; the host lags until
//!   [`DeviceTraining::sync`];
//! - [`render`]: the OpenCL C of every kernel, rendered from the same [`FusedKernel`]
//!   descriptions the jit compiles.
//!
//! **Updates made on the host** ([`DeviceTraining::update`], for callers that run the graph and
//! the optimizer apart): first a sync, then the optimizer on the host (the reference rule,
//! with the jit's compiled update kernels), then the updated values of each resident
//! parameter written to its buffer. A program that does not build is an error that shows
//! the compiler's build log with the offending source lines
//! (`render::annotate_build_log`).
//!
//! [`FusedKernel`]: crate::ops::fused::FusedKernel

mod device;
mod eval;
mod launch;
mod plan;
pub mod render;
mod resident;
mod train;

pub use device::{default_device, devices, probe, DeviceSummary, NO_PLATFORM};

use super::driver::execute;
use super::{ExecError, Executor, Mode, NodeTime, OpProfile, PlanCache, Values};
use crate::ir::dim::Binding;
use crate::ir::graph::{Graph, NodeId};
use crate::tensor::{Tensor, Value};
use crate::training::DeviceTraining;
use eval::DeviceEval;
use launch::{DeviceRun, Launcher, MatmulTuning, Transfers};
use ocl::{Context, Device, Program, Queue};
use plan::Plan;
use resident::{HostStamp, Resident};
use std::collections::HashMap;
use std::time::Duration;

/// The OpenCL executor.
pub struct OpenCl {
    device: Device,
    summary: DeviceSummary,
    context: Context,
    queue: Queue,
    plans: PlanCache<Plan>,
    /// Built programs by source text.
    programs: HashMap<String, Program>,
    /// Device copies of parameters read by device kernels, by name.
    resident: HashMap<String, Resident>,
    /// The optimizer's state on the device ([`DeviceTraining::train_step`]).
    optimizer: train::DeviceOptimizer,
    /// Parameter bytes written to the device since the executor was made.
    param_bytes: u64,
    /// All bytes written to and read from the device since the executor was made.
    transfers: Transfers,
    /// The device's largest work group (work items).
    max_work_group: usize,
    /// Combine row-sparse gradients on the device ([`DeviceEval::sparse_rows`]), the
    /// default: the same sums as the host's, and on PoCL a faster step too (DeepFM: 31 ms
    /// of kernels against 25 ms of host work plus reading back 39 MB of entries).
    sparse_rows_on_device: bool,
    /// The matmul tilings the device allows and the one chosen per product shape.
    tuning: MatmulTuning,
    profile: OpProfile,
    /// Values read back from the device since the executor was made.
    read_back: u64,
}

impl std::fmt::Debug for OpenCl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCl").field("device", &self.summary).field("plans", &self.plans.len()).finish()
    }
}

/// An OpenCL failure while doing `what`.
fn cl_err(what: &str, e: impl std::fmt::Display) -> ExecError {
    ExecError::BadOperand { op: "opencl".into(), message: format!("{what}: {e}") }
}

impl OpenCl {
    /// An executor on device `index` (as numbered by [`devices`]), or on the default device
    /// (first GPU, else first device) when `None`.
    pub fn new(index: Option<usize>) -> Result<OpenCl, String> {
        let device::Opened { device, summary, context, queue, max_work_group } = device::open(index)?;
        let allowed: Vec<usize> = render::MATMUL_TILES
            .iter()
            .enumerate()
            .filter(|(_, t)| t.wg * t.wg <= max_work_group)
            .map(|(i, _)| i)
            .collect();
        Ok(OpenCl {
            device,
            summary,
            context,
            queue,
            plans: PlanCache::default(),
            programs: HashMap::new(),
            resident: HashMap::new(),
            optimizer: Default::default(),
            param_bytes: 0,
            transfers: Transfers::default(),
            max_work_group,
            sparse_rows_on_device: true,
            tuning: MatmulTuning { allowed, ..Default::default() },
            profile: OpProfile::default(),
            read_back: 0,
        })
    }

    /// The device this executor runs on.
    pub fn device(&self) -> &DeviceSummary {
        &self.summary
    }

    /// How many computed values were read back from the device since the executor was
    /// made (results of device kernels that the host or the caller reads).
    pub fn values_read_back(&self) -> u64 {
        self.read_back
    }

    /// Parameter bytes written to the device since the executor was made (whole uploads
    /// and the updated values [`DeviceTraining::update`] writes).
    pub fn param_bytes_uploaded(&self) -> u64 {
        self.param_bytes
    }

    /// The parameters whose device copy a training step updated since the host last
    /// saw them ([`DeviceTraining::sync`] brings them back), sorted.
    pub fn params_ahead(&self) -> Vec<String> {
        let mut names: Vec<String> = self.resident.iter().filter(|(_, r)| r.ahead).map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }

    /// Combines row-sparse gradients on the device (`true`, the default) or on the host
    /// by the eval rule (`false`); both give the same sums.
    pub fn with_sparse_rows_on_device(mut self, on: bool) -> OpenCl {
        self.sparse_rows_on_device = on;
        self.plans.clear();
        self
    }

    /// Runs every product with matmul tiling `i` of `render::MATMUL_TILES` instead of the
    /// tuned one (`None`: tune again); an error when the device cannot run it.
    pub fn force_matmul_tiles(&mut self, i: Option<usize>) -> Result<(), String> {
        if let Some(i) = i {
            if !self.tuning.allowed.contains(&i) {
                return Err(format!(
                    "matmul tiling {i} is not one this device runs (it allows {:?})",
                    self.tuning.allowed
                ));
            }
        }
        self.tuning.forced = i;
        self.tuning.chosen.borrow_mut().clear();
        Ok(())
    }

    /// The matmul tilings chosen so far: `(m, n, k, tiling)` per product shape tuned.
    pub fn matmul_tilings(&self) -> Vec<(usize, usize, usize, render::Tiles)> {
        let mut v: Vec<_> = self
            .tuning
            .chosen
            .borrow()
            .iter()
            .map(|(key, &i)| (key.0, key.1, key.2, render::MATMUL_TILES[i]))
            .collect();
        v.sort_by_key(|t| (t.0, t.1, t.2));
        v
    }

    /// How many distinct programs this executor has built.
    pub fn programs_built(&self) -> usize {
        self.programs.len()
    }
}

impl Executor for OpenCl {
    fn name(&self) -> &'static str {
        "opencl"
    }

    fn device_name(&self) -> Option<String> {
        Some(format!("{} ({}, {})", self.summary.name, self.summary.kind, self.summary.platform))
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

    fn transfers(&self) -> Option<(u64, u64)> {
        Some(self.transfers.totals())
    }

    /// The fused plan of `graph` and its OpenCL program, built before the first run.
    fn prepare(&mut self, graph: &Graph, _binding: &Binding) -> Result<(), ExecError> {
        self.plan(graph)
    }

    fn run(
        &mut self,
        graph: &Graph,
        binding: &Binding,
        feeds: &HashMap<String, Value<f32>>,
        params: &HashMap<String, Tensor<f32>>,
        mode: &Mode,
    ) -> Result<Values<f32>, ExecError> {
        self.plan(graph)?;
        let (values, _) = self.execute_plan(binding, feeds, params, mode, None)?;
        Ok(values.rekey(graph))
    }

    /// Training stays on the device ([`train`]).
    fn device_training(&mut self) -> Option<&mut dyn DeviceTraining> {
        Some(self)
    }
}

impl OpenCl {
    /// Runs the first plan (made by [`OpenCl::plan`]); its values keyed by the plan's
    /// fused graph. `stay` marks, per node of that graph, outputs to keep on the device
    /// when a device kernel computes them: their values are empty stand-ins and their
    /// buffers come back as the second result.
    fn execute_plan(
        &mut self,
        binding: &Binding,
        feeds: &HashMap<String, Value<f32>>,
        params: &HashMap<String, Tensor<f32>>,
        mode: &Mode,
        stay: Option<&[bool]>,
    ) -> Result<(Values<f32>, HashMap<NodeId, train::DeviceGrad>), ExecError> {
        let resident = self.refresh_params(params)?;
        let OpenCl { plans, programs, queue, profile, read_back, tuning, transfers, .. } = self;
        let plan = plans.first().ok_or_else(|| cl_err("plan", "not made"))?;
        let program = programs.get(&plan.program_source).ok_or_else(|| cl_err("program", "not built"))?;
        let dev = DeviceRun {
            link: Launcher { queue, program, transfers },
            kernels: &plan.kernels,
            params: &resident,
            tuning,
        };
        let mut evaluator = DeviceEval {
            dev,
            plan,
            resident: HashMap::new(),
            uploaded: Default::default(),
            uploaded_ids: Default::default(),
            profile: profile.recording(),
            read_back: Default::default(),
            stay,
            stayed: HashMap::new(),
        };
        let values = execute(&plan.fused, &plan.lifetimes, binding, feeds, params, mode, &mut evaluator);
        *read_back += evaluator.read_back.get();
        Ok((values?, evaluator.stayed))
    }

    /// The launcher of `program` on this executor's queue, counting into its transfers.
    fn launcher<'a>(&'a self, program: &'a Program) -> Launcher<'a> {
        Launcher { queue: &self.queue, program, transfers: &self.transfers }
    }
}
