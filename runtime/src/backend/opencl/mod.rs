//! The OpenCL backend (`opencl`, cargo feature `opencl`): runs graphs on an OpenCL device
//! through the `ocl` crate. Tested on PoCL (OpenCL on the CPU); meant for GPUs.
//!
//! This module owns:
//! - **device discovery** ([`probe`], [`devices`], [`OpenCl::new`]): the platform count
//!   comes from the raw `clGetPlatformIDs` (microseconds), never from `ocl`'s
//!   `Platform::list/default/first` or an implicit-platform `Context`/`ProQue` build, which
//!   wait about 10 s and then panic on a machine without a platform. With none, creating
//!   the executor fails at once with a clear error. Devices are numbered over all platforms
//!   in order (what `mdl devices` prints); the default is the first GPU, else the first
//!   device.
//! - **the executor** ([`OpenCl`]): the interp driver (`interp::execute`: node order, feed
//!   and result checks, values freed after their last use) over the jit's fused plan (the
//!   fusion pass [`crate::fuse`] runs once per graph; plans are cached per graph by value).
//!   On the device run:
//!   - every `Op::Fused` kernel, rendered as OpenCL C from the same [`FusedKernel`]
//!     description the jit compiles with Cranelift (see [`render`]), reduction epilogues
//!     included;
//!   - every `MatMul`, as a tiled kernel with local-memory tiles (`render::MATMUL`).
//!
//!   - row gathers, every layout op (as copies between strided views), lone sums and
//!     means, and softmax over any axis;
//!   - the row-sparse gradients of embedding tables (`SparseRows`), each row summed by one
//!     work item per element in the host's order (the host groups the ids by row), so
//!     the result is deterministic and equal to the host's combine
//!     ([`OpenCl::with_sparse_rows_on_device`]).
//!
//!   All kernels of a plan are one OpenCL program, built once per distinct source text
//!   (PoCL also caches builds on disk under `POCL_CACHE_DIR`). Every other op (segment
//!   sums, one-hots, group products, ...) runs on the host through its eval rule, so the
//!   backend is complete by construction and agrees with interp.
//! - **values between device kernels on the device** ([`DeviceEval`]): a device result
//!   read only by device kernels is never read back; one the host also reads is read back
//!   once, and its buffer still serves the device readers.
//! - **parameters resident on the device**: a parameter read by a device kernel gets a
//!   device buffer once per executor, uploaded whole on first use. Each buffer remembers
//!   the host tensor it mirrors ([`HostStamp`]: its storage and a sample of its values); a
//!   run handed other tensors (a loaded checkpoint, a caller's own values) uploads them
//!   whole.
//! - **training on the device** ([`Executor::train_step`], module [`train`]): the
//!   gradients of resident parameters stay on the device, the global norm for clipping is
//!   reduced there, and the optimizer's rule runs there on state kept there for the whole
//!   run, so a step sends the batch up and brings the loss down. The host's tensors and
//!   optimizer state lag until [`Executor::sync`] (the trainer syncs before every
//!   checkpoint); meanwhile runs use the device's copies, and a host op reading such a
//!   parameter has it read back.
//! - **updates made on the host** ([`Executor::update`], for callers that run the graph
//!   and the optimizer apart): first a sync, then the optimizer on the host (the
//!   reference rule, with the jit's compiled update kernels), then the updated values of
//!   each resident parameter written to its buffer — a dense parameter whole, an
//!   embedding table only the rows its row-sparse gradient touched (one upload of those
//!   rows and a scatter kernel). The contract: a caller changes a parameter in place only
//!   through `Executor::update` or a training step (the trainer and `mdl bench` use the
//!   step); an in-place change made otherwise is seen only if it moves one of the sampled
//!   values.
//!
//! A program that does not build is an error that shows the compiler's build log with the
//! offending source lines (`render::annotate_build_log`).

pub mod render;
mod train;

use super::interp::{execute, Evaluator, Lifetimes, Operands};
use super::{op_kind, ExecError, Executor, Mode, OpProfile, PlanCache, StepOutcome, TrainStep, Values};
use crate::exec::EvalCx;
use crate::ir::dim::Binding;
use crate::ir::graph::{Graph, NodeId, ParamInfo};
use crate::ops::fused::{broadcast_all, broadcasts_to, FusedKernel};
use crate::ops::{self, DType, Op, ValueKind};
use crate::optim::Optimizer;
use crate::rows::RowGroups;
use crate::tensor::{broadcast_strides, Tensor, Value};
use ocl::enums::{DeviceInfo as ClDeviceInfo, DeviceInfoResult};
use ocl::flags::DeviceType;
use ocl::{Buffer, Context, Device, Kernel, Platform, Program, Queue};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The error when no platform is installed.
pub const NO_PLATFORM: &str = "no OpenCL platform found; install an ICD such as pocl-opencl-icd";

/// The platform ids, from the raw `clGetPlatformIDs` (fast, and never waits for a
/// platform to appear). Empty when none is installed.
fn platform_ids() -> Vec<ocl::core::PlatformId> {
    let mut n: ocl::ffi::cl_uint = 0;
    // SAFETY: the count query writes only `n`.
    let status = unsafe { ocl::ffi::clGetPlatformIDs(0, std::ptr::null_mut(), &mut n) };
    if status != 0 || n == 0 {
        return Vec::new();
    }
    let mut ids: Vec<ocl::ffi::cl_platform_id> = vec![std::ptr::null_mut(); n as usize];
    // SAFETY: `ids` has room for `n` ids; `got` is written with how many were stored.
    let mut got: ocl::ffi::cl_uint = 0;
    let status = unsafe { ocl::ffi::clGetPlatformIDs(n, ids.as_mut_ptr(), &mut got) };
    if status != 0 {
        return Vec::new();
    }
    ids.truncate(got as usize);
    // SAFETY: the ids come from the OpenCL runtime itself.
    ids.into_iter().filter(|p| !p.is_null()).map(|p| unsafe { ocl::core::PlatformId::from_raw(p) }).collect()
}

/// How many OpenCL platforms this machine has (0 when no ICD is installed).
pub fn probe() -> usize {
    platform_ids().len()
}

/// One OpenCL device, as `mdl devices` lists it.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    /// The number `--device N` takes: devices numbered over all platforms in order.
    pub index: usize,
    pub platform: String,
    pub name: String,
    /// `GPU`, `CPU`, `accelerator` or `other`.
    pub kind: &'static str,
    pub compute_units: u32,
    pub global_mem_bytes: u64,
}

/// Serialises device discovery and context creation in a process: some platforms (PoCL)
/// initialise their devices on first use and crash when two threads do that at once.
static DISCOVERY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every device of every platform, with the `ocl` handles.
fn all_devices() -> Result<Vec<(Platform, Device, DeviceSummary)>, String> {
    let _one_at_a_time = DISCOVERY.lock().unwrap_or_else(|e| e.into_inner());
    let ids = platform_ids();
    if ids.is_empty() {
        return Err(NO_PLATFORM.into());
    }
    let mut out = Vec::new();
    for id in ids {
        let platform = Platform::new(id);
        let pname = platform.name().unwrap_or_else(|e| format!("(unnamed platform: {e})"));
        let devices =
            Device::list_all(platform).map_err(|e| format!("OpenCL platform {pname}: cannot list devices: {e}"))?;
        for device in devices {
            let kind = match device.info(ClDeviceInfo::Type) {
                Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::GPU) => "GPU",
                Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::CPU) => "CPU",
                Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::ACCELERATOR) => "accelerator",
                _ => "other",
            };
            let compute_units = match device.info(ClDeviceInfo::MaxComputeUnits) {
                Ok(DeviceInfoResult::MaxComputeUnits(n)) => n,
                _ => 0,
            };
            let global_mem_bytes = match device.info(ClDeviceInfo::GlobalMemSize) {
                Ok(DeviceInfoResult::GlobalMemSize(n)) => n,
                _ => 0,
            };
            let summary = DeviceSummary {
                index: out.len(),
                platform: pname.clone(),
                name: device.name().unwrap_or_else(|_| "(unnamed device)".into()).trim().to_string(),
                kind,
                compute_units,
                global_mem_bytes,
            };
            out.push((platform, device, summary));
        }
    }
    Ok(out)
}

/// The devices of all platforms, numbered as `--device N` takes them; an error (within
/// milliseconds) when no platform is installed.
pub fn devices() -> Result<Vec<DeviceSummary>, String> {
    Ok(all_devices()?.into_iter().map(|(_, _, s)| s).collect())
}

/// The default device: the first GPU, else the first device.
pub fn default_device() -> Result<usize, String> {
    let all = devices()?;
    if all.is_empty() {
        return Err("the OpenCL platforms list no devices".into());
    }
    Ok(all.iter().find(|d| d.kind == "GPU").map_or(0, |d| d.index))
}

/// A graph as the backend runs it: the fused graph, the name of each distinct fused
/// kernel in the plan's program, the program's source, and the parameters some device
/// kernel reads.
struct Plan {
    fused: Graph,
    kernels: HashMap<FusedKernel, String>,
    program_source: String,
    device_params: Vec<String>,
    /// The value lifetimes of `fused`, computed once.
    lifetimes: Lifetimes,
    /// Per node: a device kernel computes it (a fused kernel or a MatMul), unless its
    /// shapes make it fall back to the host at run time.
    on_device: Vec<bool>,
    /// Per node: computed on the device, not kept, and read only by device kernels: its
    /// value stays in device memory and is never read back ([`DeviceEval`]).
    device_only: Vec<bool>,
    /// Per node: some device kernel reads it (its device buffer is kept for them).
    device_read: Vec<bool>,
    /// Per node: another node of `fused` reads it.
    read_by_node: Vec<bool>,
}

/// Which nodes of `fused` run on the device, which stay there, and which device kernels
/// read (see [`Plan`]).
fn placement(
    fused: &Graph,
    kernels: &HashMap<FusedKernel, String>,
    lifetimes: &Lifetimes,
    sparse_rows: bool,
) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
    let n = fused.len();
    let on_device: Vec<bool> = fused
        .ids()
        .map(|id| {
            let node = fused.node(id);
            let real = node.sig.dtype == DType::F && node.sig.kind == ValueKind::Dense;
            match &node.op {
                Op::Fused(k) => kernels.contains_key(k.as_ref()),
                op @ Op::Reduce { .. } => reduce_kernel(op, node).is_some_and(|k| kernels.contains_key(&k)),
                Op::MatMul { .. } => true,
                Op::SparseRows { .. } => sparse_rows && node.sig.dtype == DType::F,
                op => real && (matches!(op, Op::Gather | Op::Softmax { .. }) || is_layout(op)),
            }
        })
        .collect();
    let (mut host_read, mut device_read) = (vec![false; n], vec![false; n]);
    for id in fused.ids() {
        for &i in &fused.node(id).inputs {
            if on_device[id.index()] {
                device_read[i.index()] = true;
            } else {
                host_read[i.index()] = true;
            }
        }
    }
    let device_only = fused
        .ids()
        .map(|id| {
            let i = id.index();
            on_device[i] && device_read[i] && !host_read[i] && !lifetimes.keeps(id)
        })
        .collect();
    (on_device, device_only, device_read)
}

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
    /// The optimizer's state on the device ([`Executor::train_step`]).
    optimizer: train::DeviceOptimizer,
    /// Parameter bytes written to the device since the executor was made.
    param_bytes: u64,
    /// All bytes written to and read from the device since the executor was made.
    bytes_up: u64,
    bytes_down: u64,
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

fn cl_err(what: &str, e: impl std::fmt::Display) -> ExecError {
    ExecError::BadOperand { op: "opencl".into(), message: format!("{what}: {e}") }
}

/// A new buffer on `queue`'s device holding `data` (`what` names it in errors). Callers
/// count the bytes: [`OpenCl::upload`] into the executor's totals, `DeviceRun::upload`
/// into a run's.
fn new_buffer<T: ocl::OclPrm>(queue: &Queue, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
    Buffer::<T>::builder()
        .queue(queue.clone())
        .len(data.len())
        .copy_host_slice(data)
        .build()
        .map_err(|e| cl_err(&format!("uploading {what}"), e))
}

impl OpenCl {
    /// An executor on device `index` (as numbered by [`devices`]), or on the default device
    /// (first GPU, else first device) when `None`.
    pub fn new(index: Option<usize>) -> Result<OpenCl, String> {
        let mut all = all_devices()?;
        if all.is_empty() {
            return Err("the OpenCL platforms list no devices".into());
        }
        let index = match index {
            Some(i) if i < all.len() => i,
            Some(i) => {
                return Err(format!(
                    "OpenCL device {i} does not exist (this machine has {}; see `mdl devices`)",
                    all.len()
                ))
            }
            None => all.iter().find(|d| d.2.kind == "GPU").map_or(0, |d| d.2.index),
        };
        let (platform, device, summary) = all.swap_remove(index);
        let _one_at_a_time = DISCOVERY.lock().unwrap_or_else(|e| e.into_inner());
        let context = Context::builder()
            .platform(platform)
            .devices(device)
            .build()
            .map_err(|e| format!("OpenCL device {index} ({}): cannot create a context: {e}", summary.name))?;
        let queue = Queue::new(&context, device, None)
            .map_err(|e| format!("OpenCL device {index} ({}): cannot create a queue: {e}", summary.name))?;
        let max_work_group = match device.info(ClDeviceInfo::MaxWorkGroupSize) {
            Ok(DeviceInfoResult::MaxWorkGroupSize(n)) => n,
            _ => 64,
        };
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
            bytes_up: 0,
            bytes_down: 0,
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
    /// and the updated values [`Executor::update`] writes).
    pub fn param_bytes_uploaded(&self) -> u64 {
        self.param_bytes
    }

    /// The parameters whose device copy a training step updated since the host last
    /// saw them ([`Executor::sync`] brings them back), sorted.
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

    /// Puts the plan of `graph` first in `plans`, making it (and building its program) on
    /// first sight.
    fn plan(&mut self, graph: &Graph) -> Result<(), ExecError> {
        if self.plans.promote(graph) {
            return Ok(());
        }
        let fused = crate::fuse::fuse_elementwise(graph);
        let mut order: Vec<FusedKernel> = Vec::new();
        let mut kernels: HashMap<FusedKernel, String> = HashMap::new();
        for id in fused.ids() {
            let node = fused.node(id);
            let kernel = match &node.op {
                Op::Fused(k) => Some(k.as_ref().clone()),
                op => reduce_kernel(op, node),
            };
            if let Some(k) = kernel {
                if !kernels.contains_key(&k) {
                    kernels.insert(k.clone(), render::fused_name(order.len()));
                    order.push(k);
                }
            }
        }
        let program_source = render::program(&order.iter().collect::<Vec<_>>(), self.max_work_group);
        self.build_program(&program_source)?;
        let lifetimes = Lifetimes::new(&fused, false);
        let (on_device, device_only, device_read) = placement(&fused, &kernels, &lifetimes, self.sparse_rows_on_device);
        let mut device_params: Vec<String> = Vec::new();
        for id in fused.ids().filter(|id| on_device[id.index()]) {
            for &i in &fused.node(id).inputs {
                if let Op::Param { name } = &fused.node(i).op {
                    if !device_params.contains(name) {
                        device_params.push(name.clone());
                    }
                }
            }
        }
        let mut read_by_node = vec![false; fused.len()];
        for id in fused.ids() {
            for &i in &fused.node(id).inputs {
                read_by_node[i.index()] = true;
            }
        }
        self.plans.insert(
            graph,
            Plan {
                fused,
                kernels,
                program_source,
                device_params,
                lifetimes,
                on_device,
                device_only,
                device_read,
                read_by_node,
            },
        );
        Ok(())
    }

    /// Builds OpenCL C `source` for this executor's device unless a program with that text
    /// was built already; a build error shows the build log with the source lines it names.
    pub fn build_program(&mut self, source: &str) -> Result<(), ExecError> {
        if self.programs.contains_key(source) {
            return Ok(());
        }
        let program =
            Program::builder().src(format!("#line 1\n{source}")).devices(self.device).build(&self.context).map_err(
                |e| {
                    let log = e.to_string();
                    ExecError::BadOperand {
                        op: "opencl program".into(),
                        message: format!(
                            "the kernels did not build on {}:\n{}",
                            self.summary.name,
                            render::annotate_build_log(&log, source)
                        ),
                    }
                },
            )?;
        self.programs.insert(source.to_string(), program);
        Ok(())
    }

    /// The device buffers of the plan's device parameters ([`OpenCl::param_buffer`]),
    /// keyed by the host data address the driver will hand the eval rules.
    fn refresh_params(
        &mut self,
        params: &HashMap<String, Tensor<f32>>,
    ) -> Result<HashMap<usize, ParamBuffer>, ExecError> {
        let mut by_addr = HashMap::new();
        let names = self.plans.first().map(|p| p.device_params.clone()).unwrap_or_default();
        for name in &names {
            let Some(t) = params.get(name) else { continue };
            if t.data.is_empty() {
                continue;
            }
            let (buffer, ahead) = self.param_buffer(name, t, false)?;
            by_addr.insert(t.data.as_ptr() as usize, ParamBuffer { buffer, ahead });
        }
        Ok(by_addr)
    }

    /// The device copy of parameter `name` for the host tensor `t`, and whether it is ahead
    /// of `t` (a device training step updated it since the host last saw it): the resident
    /// buffer when it mirrors `t` ([`HostStamp`]), else `t` uploaded whole. The upload goes
    /// into the resident buffer, except over one that is ahead: then, unless
    /// `replace_ahead`, into a buffer for this run only, so that the device's update is not
    /// lost to a caller that ran other tensors before [`Executor::sync`].
    fn param_buffer(
        &mut self,
        name: &str,
        t: &Tensor<f32>,
        replace_ahead: bool,
    ) -> Result<(Buffer<f32>, bool), ExecError> {
        let stamp = HostStamp::of(&t.data);
        if let Some(r) = self.resident.get(name).filter(|r| r.stamp == stamp) {
            return Ok((r.buffer.clone(), r.ahead));
        }
        let what = format!("parameter {name}");
        self.param_bytes += 4 * t.data.len() as u64;
        let buffer = match self.resident.get(name) {
            Some(r) if r.ahead && !replace_ahead => return Ok((self.upload(&t.data, &what)?, false)),
            Some(r) if r.buffer.len() == t.data.len() => {
                let b = r.buffer.clone();
                b.write(&t.data).enq().map_err(|e| cl_err(&format!("uploading {what}"), e))?;
                self.bytes_up += 4 * t.data.len() as u64;
                b
            }
            _ => self.upload(&t.data, &what)?,
        };
        self.resident.insert(name.to_string(), Resident { buffer: buffer.clone(), stamp, ahead: false });
        Ok((buffer, false))
    }

    /// A new device buffer holding `data` ([`new_buffer`]), counted in [`Executor::transfers`].
    fn upload<T: ocl::OclPrm>(&mut self, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
        self.bytes_up += std::mem::size_of_val(data) as u64;
        new_buffer(&self.queue, data, what)
    }

    /// Writes the values `update` just gave `param` to its resident buffer, which mirrored
    /// the tensor before the update: the whole tensor for a dense gradient, the rows of a
    /// row-sparse one (through `mdl_scatter_rows`). A parameter without a resident buffer
    /// has nothing to keep current.
    fn write_updated(&mut self, name: &str, param: &Tensor<f32>, grad: &Value<f32>) -> Result<(), ExecError> {
        let Some(buffer) = self.resident.get(name).map(|r| r.buffer.clone()) else { return Ok(()) };
        let what = |e| cl_err(&format!("writing the update of parameter {name}"), e);
        let rows = match grad {
            Value::RowSparse { shape, rows, .. } if shape.len() > 1 && !rows.is_empty() => {
                // Usually combined already (distinct, ascending): then borrowed as it is.
                let unique: std::borrow::Cow<[u32]> = if rows.windows(2).all(|p| p[0] < p[1]) {
                    std::borrow::Cow::Borrowed(rows)
                } else {
                    let mut r = rows.clone();
                    r.sort_unstable();
                    r.dedup();
                    std::borrow::Cow::Owned(r)
                };
                Some((unique, shape[1..].iter().product::<usize>()))
            }
            _ => None,
        };
        let program = self.plans.first().and_then(|p| self.programs.get(&p.program_source)).cloned();
        let before = self.bytes_up;
        match (rows, program) {
            (Some((rows, width)), Some(program)) if i32::try_from(rows.len() * width).is_ok() && width > 0 => {
                let total = rows.len() * width;
                let mut values = Vec::with_capacity(total);
                for &r in rows.iter() {
                    values.extend_from_slice(&param.data[r as usize * width..(r as usize + 1) * width]);
                }
                let values = self.upload(&values, &format!("the updated rows of {name}"))?;
                let rows_buf = self.upload(&rows, &format!("the updated rows' ids of {name}"))?;
                let k = Kernel::builder()
                    .program(&program)
                    .name("mdl_scatter_rows")
                    .queue(self.queue.clone())
                    .global_work_size(total)
                    .arg(&buffer)
                    .arg(&rows_buf)
                    .arg(&values)
                    .arg(width as i32)
                    .arg(total as i32)
                    .build()
                    .map_err(what)?;
                // SAFETY: the optimizer checked every row against the table before updating
                // it, so each write stays inside the buffer (the table's size); rows are
                // distinct, so no two work items write one element.
                unsafe { k.enq() }.map_err(what)?;
            }
            _ => {
                buffer.write(&param.data).enq().map_err(what)?;
                self.bytes_up += 4 * param.data.len() as u64;
            }
        }
        self.param_bytes += self.bytes_up - before;
        if let Some(r) = self.resident.get_mut(name) {
            r.stamp = HostStamp::of(&param.data);
        }
        Ok(())
    }
}

/// A parameter's device copy.
struct Resident {
    buffer: Buffer<f32>,
    /// The host tensor the buffer was last made equal to.
    stamp: HostStamp,
    /// A device training step updated the buffer since: it is newer than that tensor.
    ahead: bool,
}

/// A parameter's device buffer for one run, and whether it is ahead of the host tensor.
struct ParamBuffer {
    buffer: Buffer<f32>,
    ahead: bool,
}

/// What a resident parameter buffer was last made equal to: the host tensor's storage
/// (address and length) and a sample of its values (64 evenly spaced elements, the first
/// and the last, by bits). A tensor with another stamp is uploaded whole; the sample
/// catches new values placed at a reused address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostStamp {
    addr: usize,
    len: usize,
    sample: u64,
}

impl HostStamp {
    fn of(data: &[f32]) -> HostStamp {
        let n = data.len();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |v: f32| h = (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3);
        if n > 0 {
            for k in 0..64 {
                mix(data[k * n / 64]);
            }
            mix(data[n - 1]);
        }
        HostStamp { addr: data.as_ptr() as usize, len: n, sample: h }
    }
}

/// The device-side state one run's kernels need.
struct DeviceRun<'a> {
    queue: &'a Queue,
    program: &'a Program,
    kernels: &'a HashMap<FusedKernel, String>,
    params: &'a HashMap<usize, ParamBuffer>,
    tuning: &'a MatmulTuning,
    /// Bytes this run wrote to and read from the device.
    up: std::cell::Cell<u64>,
    down: std::cell::Cell<u64>,
}

/// The matmul tilings this device can run and the one chosen for each product shape.
#[derive(Debug, Default)]
struct MatmulTuning {
    /// Indices into `render::MATMUL_TILES` whose work group the device allows.
    allowed: Vec<usize>,
    /// Products `(m, n, k, trans_a, trans_b, batches, shared right operand)` → tiling.
    chosen: std::cell::RefCell<HashMap<(usize, usize, usize, bool, bool, usize, bool), usize>>,
    /// A tiling used for every product (tests), instead of tuning.
    forced: Option<usize>,
}

/// Products with fewer multiply-adds than this take the first tiling untimed: tuning
/// would cost more than it could save.
const TUNE_MIN_WORK: usize = 1 << 22;

impl DeviceRun<'_> {
    /// The resident buffer of the parameter `t` is, if it is one.
    fn param(&self, t: &Tensor<f32>) -> Option<Buffer<f32>> {
        self.param_entry(t).map(|p| p.buffer.clone())
    }

    fn param_entry(&self, t: &Tensor<f32>) -> Option<&ParamBuffer> {
        self.params.get(&(t.data.as_ptr() as usize)).filter(|p| p.buffer.len() == t.data.len())
    }

    /// A new device buffer holding `data` ([`new_buffer`]), counted as this run's.
    fn upload<T: ocl::OclPrm>(&self, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
        self.up.set(self.up.get() + std::mem::size_of_val(data) as u64);
        new_buffer(self.queue, data, what)
    }

    /// One `mdl_copy` launch ([`render::COPY`]): the view `shape` of `input` (from
    /// `in_base`, `in_strides`) into `out` (at `out_base`, `out_strides`). `None` when the
    /// sizes do not fit the kernel's `int`s.
    fn copy(
        &self,
        shape: &[usize],
        out: &Buffer<f32>,
        out_at: (usize, &[usize]),
        input: &Buffer<f32>,
        in_at: (usize, &[usize]),
    ) -> Result<Option<()>, ExecError> {
        let total: usize = shape.iter().product();
        if total == 0 {
            return Ok(Some(()));
        }
        if let Some(r) = render::row_copy(shape, out_at.0, out_at.1, in_at.0, in_at.1) {
            // Rows of contiguous elements: the runtime's rectangle copy (a memcpy per row on
            // PoCL, a copy engine on a GPU) instead of a kernel's index arithmetic.
            let f = std::mem::size_of::<f32>();
            ocl::core::enqueue_copy_buffer_rect::<f32, _, _, _>(
                self.queue.as_core(),
                input.as_core(),
                out.as_core(),
                // ocl scales the origins' and the region's first axis by the element size.
                [r.in_base % r.in_pitch, r.in_base / r.in_pitch, 0],
                [r.out_base % r.out_pitch, r.out_base / r.out_pitch, 0],
                [r.run, r.rows, 1],
                r.in_pitch * f,
                r.in_pitch * input.len().div_ceil(r.in_pitch) * f,
                r.out_pitch * f,
                r.out_pitch * out.len().div_ceil(r.out_pitch) * f,
                None::<&ocl::core::Event>,
                None::<&mut ocl::core::Event>,
            )
            .map_err(|e| cl_err("copying rows", e))?;
            return Ok(Some(()));
        }
        let Some(meta) = render::copy_meta(shape, out_at.0, out_at.1, in_at.0, in_at.1) else { return Ok(None) };
        let meta = self.upload(&meta, "copy metadata")?;
        let k = Kernel::builder()
            .program(self.program)
            .name("mdl_copy")
            .queue(self.queue.clone())
            .global_work_size(total)
            .arg(&meta)
            .arg(out)
            .arg(input)
            .build()
            .map_err(|e| cl_err("kernel mdl_copy", e))?;
        // SAFETY: the view's offsets stay inside both buffers (shapes checked by the ops'
        // shape rules and the callers).
        unsafe { k.enq() }.map_err(|e| cl_err("running kernel mdl_copy", e))?;
        Ok(Some(()))
    }

    /// Rows `ids` of `table` (`[rows, width]` in a buffer): `None` (run on the host,
    /// which reports it) when an id is out of range or a size does not fit an `int`.
    fn gather(
        &self,
        table: &Buffer<f32>,
        rows: usize,
        width: usize,
        ids: &[u32],
        ids_on_device: &Buffer<u32>,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let total = ids.len() * width;
        if total == 0
            || i32::try_from(total).is_err()
            || i32::try_from(width).is_err()
            || ids.iter().any(|&id| id as usize >= rows)
        {
            return Ok(None);
        }
        let out = self.output(total)?;
        let k = Kernel::builder()
            .program(self.program)
            .name("mdl_gather")
            .queue(self.queue.clone())
            .global_work_size(total)
            .arg(&out)
            .arg(table)
            .arg(ids_on_device)
            .arg(width as i32)
            .arg(total as i32)
            .build()
            .map_err(|e| cl_err("kernel mdl_gather", e))?;
        // SAFETY: every id is below `rows` (checked above), so reads stay in the table.
        unsafe { k.enq() }.map_err(|e| cl_err("running kernel mdl_gather", e))?;
        Ok(Some(out))
    }

    /// A softmax along `axis` of a value of `shape` (one work item per vector); `None` when
    /// a size does not fit an `int`.
    fn softmax(&self, x: &Buffer<f32>, shape: &[usize], axis: usize) -> Result<Option<Buffer<f32>>, ExecError> {
        let (size, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        let len: usize = shape.iter().product();
        let vectors = len.checked_div(size).unwrap_or(0);
        if len == 0 || i32::try_from(len).is_err() {
            return Ok(None);
        }
        let out = self.output(len)?;
        let k = Kernel::builder()
            .program(self.program)
            .name("mdl_softmax")
            .queue(self.queue.clone())
            .global_work_size(vectors)
            .arg(&out)
            .arg(x)
            .arg(size as i32)
            .arg(inner as i32)
            .arg(vectors as i32)
            .build()
            .map_err(|e| cl_err("kernel mdl_softmax", e))?;
        // SAFETY: work item `g < vectors` reads and writes `size` elements `inner` apart from
        // `(g / inner) * size * inner + g % inner`, all below `len`, the length of both.
        unsafe { k.enq() }.map_err(|e| cl_err("running kernel mdl_softmax", e))?;
        Ok(Some(out))
    }

    fn output(&self, len: usize) -> Result<Buffer<f32>, ExecError> {
        Buffer::<f32>::builder()
            .queue(self.queue.clone())
            .len(len)
            .build()
            .map_err(|e| cl_err("allocating an output", e))
    }

    fn read(&self, b: &Buffer<f32>, len: usize) -> Result<Vec<f32>, ExecError> {
        let mut data = vec![0f32; len];
        b.read(&mut data).enq().map_err(|e| cl_err("reading a result", e))?;
        self.down.set(self.down.get() + 4 * len as u64);
        Ok(data)
    }

    /// A fused kernel on the device, reading `inputs` (the operands' device buffers) with
    /// the operands' shapes; `None` when its shapes are outside what the rendered kernel
    /// handles (empty tensors, indices beyond `int`), which then run on the host.
    fn fused(
        &self,
        kernel: &FusedKernel,
        shapes: &[&[usize]],
        inputs: &[Buffer<f32>],
        out_shape: &[usize],
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let Some(name) = self.kernels.get(kernel) else { return Ok(None) };
        let domain = match &kernel.reduce {
            None => out_shape.to_vec(),
            Some(_) => match broadcast_all(shapes.iter().copied()) {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        if shapes.iter().any(|x| !broadcasts_to(x, &domain) || x.iter().product::<usize>() == 0) {
            return Ok(None);
        }
        let total: usize = out_shape.iter().product();
        if total == 0 || domain.iter().product::<usize>() == 0 {
            return Ok(None);
        }
        let reduced: Vec<usize> = kernel.reduce.as_ref().map_or(Vec::new(), |r| r.axes.clone());
        let strides: Vec<Vec<usize>> = shapes.iter().map(|x| broadcast_strides(x, &domain)).collect();
        let Some(meta) = render::fused_meta(&domain, &reduced, &strides) else { return Ok(None) };
        let meta = self.upload(&meta, "kernel metadata")?;
        let out = self.output(total)?;
        let mut builder = Kernel::builder();
        builder.program(self.program).name(name.as_str()).queue(self.queue.clone()).global_work_size(total);
        builder.arg(&meta).arg(&out);
        for b in inputs {
            builder.arg(b);
        }
        let k = builder.build().map_err(|e| cl_err(&format!("kernel {name}"), e))?;
        // SAFETY: every buffer argument holds the elements the meta strides address.
        unsafe { k.enq() }.map_err(|e| cl_err(&format!("running kernel {name}"), e))?;
        Ok(Some(out))
    }

    /// A MatMul on the device of operands with shapes `sa`, `sb` in buffers `ab`, `bb`
    /// (`None`: a shape the kernel does not take, run on the host).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        sa: &[usize],
        sb: &[usize],
        ab: &Buffer<f32>,
        bb: &Buffer<f32>,
        trans_a: bool,
        trans_b: bool,
        out_shape: &[usize],
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let (ra, rb) = (sa.len(), sb.len());
        if ra < 2 || rb < 2 || out_shape.len() < 2 {
            return Ok(None);
        }
        let (m, n) = (out_shape[out_shape.len() - 2], out_shape[out_shape.len() - 1]);
        let k = if trans_a { sa[ra - 2] } else { sa[ra - 1] };
        let batches: usize = sa[..ra - 2].iter().product();
        let shared = rb == 2;
        if !shared && sb[..rb - 2].iter().product::<usize>() != batches {
            return Ok(None);
        }
        let total = batches * m * n;
        let (a_len, b_len) = (sa.iter().product::<usize>(), sb.iter().product::<usize>());
        if total == 0 || k == 0 || a_len == 0 || b_len == 0 {
            return Ok(None);
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        if !fits(a_len) || !fits(b_len) || !fits(total) || !fits(batches) {
            return Ok(None);
        }
        let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
        let b_batch = if shared { 0 } else { k * n };
        let out = self.output(total)?;
        let launch = |i: usize| -> Result<(), ExecError> {
            let t = render::MATMUL_TILES[i];
            let name = render::matmul_name(i);
            let groups = |v: usize, block: usize| v.div_ceil(block) * t.wg;
            let mut builder = Kernel::builder();
            builder
                .program(self.program)
                .name(name.as_str())
                .queue(self.queue.clone())
                .global_work_size([groups(n, t.bn), groups(m, t.bm), batches])
                .local_work_size([t.wg, t.wg, 1]);
            builder.arg(ab).arg(bb).arg(&out);
            for v in [m, n, k, m * k, a_rs, a_cs, b_batch, b_rs, b_cs] {
                builder.arg(v as i32);
            }
            let kernel = builder.build().map_err(|e| cl_err(&format!("kernel {name}"), e))?;
            // SAFETY: the strides address only elements of `a`, `b` and `out` (bounds
            // checked in the kernel).
            unsafe { kernel.enq() }.map_err(|e| cl_err(&format!("running kernel {name}"), e))
        };
        let key = (m, n, k, trans_a, trans_b, batches, shared);
        let tuning = self.tuning;
        let known = tuning.forced.or_else(|| tuning.chosen.borrow().get(&key).copied());
        let first = *tuning.allowed.first().ok_or_else(|| cl_err("matmul", "the device allows no tiling"))?;
        match known {
            Some(i) => launch(i)?,
            None if tuning.allowed.len() == 1 || batches * m * n * k < TUNE_MIN_WORK => {
                tuning.chosen.borrow_mut().insert(key, first);
                launch(first)?;
            }
            None => {
                // Each candidate once to build and warm it, once timed; all write the same
                // values into `out`. A candidate that fails to launch is left out.
                let finish = || self.queue.finish().map_err(|e| cl_err("waiting for the device", e));
                let mut best: Option<(Duration, usize)> = None;
                for &i in &tuning.allowed {
                    if launch(i).and_then(|()| finish()).is_err() {
                        continue;
                    }
                    let t = Instant::now();
                    launch(i)?;
                    finish()?;
                    let took = t.elapsed();
                    if best.is_none_or(|(d, _)| took < d) {
                        best = Some((took, i));
                    }
                }
                let i = best.map_or(first, |(_, i)| i);
                tuning.chosen.borrow_mut().insert(key, i);
                if best.is_none() {
                    launch(i)?;
                }
            }
        }
        Ok(Some(out))
    }
}

/// The backend's evaluator for the interp driver: device kernels where they apply, the
/// eval rules otherwise; per-kind times when profiling.
///
/// **Values between device kernels stay on the device.** Each device result's buffer is
/// kept, by node, while device kernels still read it, so a device reader never uploads a
/// value the device computed. A `device_only` value ([`Plan`]) is not read back at all:
/// the driver gets an empty stand-in ([`Evaluator::deferred`]); should a reader fall back
/// to the host after all (a shape its kernel does not take), the value is read back for
/// it then. Buffers are dropped at their value's last reader. The gradients a training
/// step keeps on the device (`stay`) are stand-ins too, their buffers handed to the step
/// ([`train::DeviceGrad`]).
struct DeviceEval<'a> {
    dev: DeviceRun<'a>,
    plan: &'a Plan,
    /// Device buffers of computed values that device kernels still read, by node.
    resident: HashMap<NodeId, Buffer<f32>>,
    /// Host values (feeds, host results) uploaded for a device reader in this run, by
    /// node, so that their other device readers do not upload them again; dropped at the
    /// value's last reader. Ids apart.
    uploaded: std::cell::RefCell<HashMap<NodeId, Buffer<f32>>>,
    uploaded_ids: std::cell::RefCell<HashMap<NodeId, Buffer<u32>>>,
    profile: Option<&'a mut OpProfile>,
    /// Values read back in this run.
    read_back: std::cell::Cell<u64>,
    /// Per node: an output to keep on the device when a device kernel computes it (the
    /// gradients of a device training step; unread by other nodes).
    stay: Option<&'a [bool]>,
    /// The device values of the `stay` outputs, by node.
    stayed: HashMap<NodeId, train::DeviceGrad>,
}

impl DeviceEval<'_> {
    /// The device buffer of operand `k` (node `input`, host value `t`): the value's own
    /// buffer when the device computed it, else the resident parameter or an upload.
    fn buffer(&self, input: NodeId, t: &Tensor<f32>) -> Result<Buffer<f32>, ExecError> {
        if let Some(b) = self.resident.get(&input).cloned().or_else(|| self.dev.param(t)) {
            return Ok(b);
        }
        if let Some(b) = self.uploaded.borrow().get(&input) {
            return Ok(b.clone());
        }
        let b = self.dev.upload(&t.data, "an operand")?;
        self.uploaded.borrow_mut().insert(input, b.clone());
        Ok(b)
    }

    /// The device buffer of the ids of node `input`: uploaded by its first device reader
    /// in this run, kept for the others.
    fn ids_buffer(&self, input: NodeId, ids: &[u32]) -> Result<Buffer<u32>, ExecError> {
        if let Some(b) = self.uploaded_ids.borrow().get(&input) {
            return Ok(b.clone());
        }
        let b = self.dev.upload(ids, "ids")?;
        self.uploaded_ids.borrow_mut().insert(input, b.clone());
        Ok(b)
    }

    /// A row-sparse gradient `SparseRows(ids, values)` combined on the device
    /// ([`DeviceEval::combine_rows`]) and read back: distinct ascending rows, each the sum
    /// of its entries in their original order, bit for bit what the host's combine gives.
    /// `None` (the eval rule on the host) where `combine_rows` declines.
    fn sparse_rows(
        &self,
        id: NodeId,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<Value<f32>>, ExecError> {
        let Some(train::DeviceGrad::Rows { rows, values, width }) = self.combine_rows(id, args, cx)? else {
            return Ok(None);
        };
        let data = self.dev.read(&values, rows.len() * width)?;
        self.read_back.set(self.read_back.get() + 1);
        let mut value_shape = vec![rows.len()];
        value_shape.extend_from_slice(&cx.out_shape[1..]);
        Ok(Some(Value::RowSparse { shape: cx.out_shape.to_vec(), rows, values: Tensor { shape: value_shape, data } }))
    }

    /// The entries of `SparseRows(ids, values)` summed per row on the device, left there:
    /// the host groups the ids by row ([`RowGroups`]: it has them, a feed or a host value)
    /// and uploads the grouping; `mdl_sum_rows` adds each row's entries in their original
    /// order starting from zero, as `Value::to_dense` does, so the result is deterministic
    /// and equal to the host's combine. `None` (the eval rule on the host) for an id
    /// outside the table, which then fails as interp does, and for sizes beyond `int`.
    fn combine_rows(
        &self,
        id: NodeId,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<train::DeviceGrad>, ExecError> {
        let (ids, values) = (args[0].ids("sparse_rows")?, args[1].dense("sparse_rows")?);
        let (limit, width) = (cx.out_shape[0], cx.out_shape[1..].iter().product::<usize>());
        let total = ids.data.len() * width;
        if width == 0
            || ids.data.is_empty()
            || values.shape.iter().product::<usize>() != total
            || i32::try_from(total).is_err()
            || ids.data.iter().any(|&r| r as usize >= limit)
        {
            return Ok(None);
        }
        let err = |e| cl_err("sparse_rows on the device", e);
        let groups = RowGroups::of(&ids.data);
        let values = self.buffer(self.plan.fused.node(id).inputs[1], values)?;
        let order = self.dev.upload(&groups.order, "the order of a gradient's entries")?;
        let starts = self.dev.upload(&groups.starts, "the rows of a gradient's entries")?;
        let combined = groups.rows.len() * width;
        let out = self.dev.output(combined)?;
        let k = Kernel::builder()
            .program(self.dev.program)
            .name("mdl_sum_rows")
            .queue(self.dev.queue.clone())
            .global_work_size(combined)
            .arg(&out)
            .arg(&values)
            .arg(&order)
            .arg(&starts)
            .arg(width as i32)
            .arg(combined as i32)
            .build()
            .map_err(err)?;
        // SAFETY: `order` holds positions of entries (below `ids.len()`, so each entry's
        // `width` values lie in `values`, which holds `total`), `starts` has one more element
        // than there are rows, and work item `i < combined` writes `out[i]`.
        unsafe { k.enq() }.map_err(err)?;
        Ok(Some(train::DeviceGrad::Rows { rows: groups.rows, values: out, width }))
    }

    /// After node `id` (its value `out`, computed on the device or not): drops the device
    /// buffers of operands it was the last reader of, and records its time when profiling.
    fn finish(
        &mut self,
        id: NodeId,
        out: Value<f32>,
        device: bool,
        start: Option<Instant>,
        op: &Op,
    ) -> Result<Value<f32>, ExecError> {
        let inputs = &self.plan.fused.node(id).inputs;
        for (&i, &dies) in inputs.iter().zip(self.plan.lifetimes.dying(id)) {
            if dies {
                self.resident.remove(&i);
                self.uploaded.get_mut().remove(&i);
                self.uploaded_ids.get_mut().remove(&i);
            }
        }
        if let (Some(t), Some(profile)) = (start, self.profile.as_deref_mut()) {
            if device {
                // Kernels run asynchronously: wait, so the time is this kernel's.
                self.dev.queue.finish().map_err(|e| cl_err("waiting for the device", e))?;
            }
            profile.record(kind(op, device), t.elapsed());
        }
        Ok(out)
    }

    /// Runs `op` on the device when it has a kernel for it; `None` otherwise.
    fn on_device(
        &self,
        id: NodeId,
        op: &Op,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        if !self.plan.on_device[id.index()] {
            return Ok(None);
        }
        let out_shape = cx.out_shape;
        let inputs = &self.plan.fused.node(id).inputs;
        if let Op::Gather = op {
            let (table, ids) = (args[0].dense("gather")?, args[1].ids("gather")?);
            let width = table.shape[1..].iter().product();
            let t = self.buffer(inputs[0], table)?;
            let id_buf = self.ids_buffer(inputs[1], &ids.data)?;
            return self.dev.gather(&t, table.shape[0], width, &ids.data, &id_buf);
        }
        let xs: Vec<&Tensor<f32>> = args.iter().map(|a| a.dense(&op.name())).collect::<Result<_, _>>()?;
        if is_layout(op) {
            let bufs: Vec<Buffer<f32>> =
                inputs.iter().zip(&xs).map(|(&i, x)| self.buffer(i, x)).collect::<Result<_, _>>()?;
            return self.layout(op, &xs, &bufs, cx);
        }
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
        let bufs: Vec<Buffer<f32>> =
            inputs.iter().zip(&xs).map(|(&i, x)| self.buffer(i, x)).collect::<Result<_, _>>()?;
        match op {
            Op::Fused(kernel) => self.dev.fused(kernel, &shapes, &bufs, out_shape),
            Op::Reduce { .. } => match reduce_kernel(op, self.plan.fused.node(id)) {
                Some(kernel) => self.dev.fused(&kernel, &shapes, &bufs, out_shape),
                None => Ok(None),
            },
            Op::MatMul { trans_a, trans_b } => {
                self.dev.matmul(shapes[0], shapes[1], &bufs[0], &bufs[1], *trans_a, *trans_b, out_shape)
            }
            Op::Softmax { axis } => self.dev.softmax(&bufs[0], shapes[0], *axis),
            _ => Ok(None),
        }
    }

    /// A layout op as copies between views of the operands' buffers (a reshape is the
    /// operand's own buffer); `None` for what the copy kernel does not take.
    fn layout(
        &self,
        op: &Op,
        xs: &[&Tensor<f32>],
        bufs: &[Buffer<f32>],
        cx: &EvalCx,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let out_shape = cx.out_shape;
        let total: usize = out_shape.iter().product();
        if total == 0 || xs.iter().any(|x| x.shape.iter().product::<usize>() == 0) {
            return Ok(None);
        }
        if let Op::Reshape { .. } = op {
            return Ok(Some(bufs[0].clone()));
        }
        let out = self.dev.output(total)?;
        let out_strides = row_major(out_shape);
        let x_strides = row_major(&xs[0].shape);
        let done = match op {
            Op::Permute { perm } => {
                let strides: Vec<usize> = perm.iter().map(|&p| x_strides[p]).collect();
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (0, &strides))?
            }
            Op::Broadcast { .. } => {
                let strides = broadcast_strides(&xs[0].shape, out_shape);
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (0, &strides))?
            }
            Op::Slice { axis, start, .. } => {
                let start = cx.size(start)?;
                if start + out_shape[*axis] > xs[0].shape[*axis] {
                    return Ok(None);
                }
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (start * x_strides[*axis], &x_strides))?
            }
            Op::Pad { axis, before, .. } => {
                let before = cx.size(before)?;
                out.cmd().fill(0.0f32, None).enq().map_err(|e| cl_err("zeroing a pad", e))?;
                self.dev.copy(
                    &xs[0].shape,
                    &out,
                    (before * out_strides[*axis], &out_strides),
                    &bufs[0],
                    (0, &x_strides),
                )?
            }
            Op::Concat { axis } => {
                let mut at = 0usize;
                let mut all = Some(());
                for (x, b) in xs.iter().zip(bufs) {
                    let done = self.dev.copy(
                        &x.shape,
                        &out,
                        (at * out_strides[*axis], &out_strides),
                        b,
                        (0, &row_major(&x.shape)),
                    )?;
                    all = all.and(done);
                    at += x.shape[*axis];
                }
                all
            }
            _ => None,
        };
        Ok(done.map(|()| out))
    }

    /// `op` on the host by its eval rule, reading back the operands that stayed on the
    /// device, and the parameters whose device copy is ahead of the host's (updated by a
    /// device training step).
    fn on_host(
        &self,
        id: NodeId,
        op: &Op,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Value<f32>, ExecError> {
        let inputs = &self.plan.fused.node(id).inputs;
        let stayed = |i: NodeId| self.plan.device_only[i.index()] && self.resident.contains_key(&i);
        let ahead = |a: &crate::exec::Arg<'_, f32>| match a {
            crate::exec::Arg::Param(t) => self.dev.param_entry(t).filter(|p| p.ahead).map(|p| &p.buffer),
            _ => None,
        };
        if !inputs.iter().zip(args).any(|(&i, a)| stayed(i) || ahead(a).is_some()) {
            return ops::eval(op, args, cx);
        }
        let mut read: Vec<Option<Tensor<f32>>> = Vec::with_capacity(inputs.len());
        for (&i, a) in inputs.iter().zip(args) {
            let device_copy = match (stayed(i), a) {
                (true, crate::exec::Arg::Value(Value::Dense(t))) => Some((t, &self.resident[&i])),
                (false, crate::exec::Arg::Param(t)) => ahead(a).map(|b| (*t, b)),
                _ => None,
            };
            read.push(match device_copy {
                Some((t, buffer)) => {
                    let len = t.shape.iter().product();
                    self.read_back.set(self.read_back.get() + 1);
                    Some(Tensor { shape: t.shape.clone(), data: self.dev.read(buffer, len)? })
                }
                None => None,
            });
        }
        let args: Vec<crate::exec::Arg<'_, f32>> = args
            .iter()
            .zip(&read)
            .map(|(a, r)| r.as_ref().map_or_else(|| a.clone(), crate::exec::Arg::Param))
            .collect();
        ops::eval(op, &args, cx)
    }
}

impl Evaluator<f32> for DeviceEval<'_> {
    fn eval(
        &mut self,
        id: NodeId,
        op: &Op,
        operands: &mut Operands<'_, '_, f32>,
        cx: &EvalCx,
    ) -> Result<Value<f32>, ExecError> {
        let start = self.profile.is_some().then(Instant::now);
        let args = operands.args(op)?;
        let stays = self.stay.is_some_and(|s| s[id.index()]);
        if let (Op::SparseRows { .. }, true, true) = (op, self.plan.on_device[id.index()], stays) {
            if let Some(grad) = self.combine_rows(id, &args, cx)? {
                self.stayed.insert(id, grad);
                let mut value_shape = vec![0];
                value_shape.extend_from_slice(&cx.out_shape[1..]);
                let stand_in = Value::RowSparse {
                    shape: cx.out_shape.to_vec(),
                    rows: Vec::new(),
                    values: Tensor { shape: value_shape, data: Vec::new() },
                };
                return self.finish(id, stand_in, true, start, op);
            }
        }
        if let (Op::SparseRows { .. }, true) = (op, self.plan.on_device[id.index()]) {
            let rows = self.sparse_rows(id, &args, cx)?;
            let device = rows.is_some();
            let out = match rows {
                Some(v) => v,
                None => self.on_host(id, op, &args, cx)?,
            };
            return self.finish(id, out, device, start, op);
        }
        let buffer = self.on_device(id, op, &args, cx)?;
        let device = buffer.is_some();
        let out = match buffer {
            Some(b) if stays => {
                self.stayed.insert(id, train::DeviceGrad::Dense(b));
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: Vec::new() })
            }
            Some(b) if self.plan.device_only[id.index()] => {
                self.resident.insert(id, b);
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: Vec::new() })
            }
            Some(b) => {
                let data = self.dev.read(&b, cx.out_shape.iter().product())?;
                self.read_back.set(self.read_back.get() + 1);
                if self.plan.device_read[id.index()] {
                    self.resident.insert(id, b);
                }
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data })
            }
            None => self.on_host(id, op, &args, cx)?,
        };
        self.finish(id, out, device, start, op)
    }

    fn deferred(&self, id: NodeId) -> bool {
        (self.plan.device_only[id.index()] && self.resident.contains_key(&id)) || self.stayed.contains_key(&id)
    }
}

/// A lone sum or mean of a dense real value as a fused kernel with an empty body (its
/// reduction epilogue does the work), so it runs on the device like any fused kernel.
fn reduce_kernel(op: &Op, node: &crate::ir::graph::Node) -> Option<FusedKernel> {
    match op {
        Op::Reduce { op: r @ (ops::ReduceOp::Sum | ops::ReduceOp::Mean), axes, keep_dims }
            if node.sig.dtype == DType::F && node.sig.kind == ValueKind::Dense =>
        {
            let reduce = Some(ops::fused::Reduction { op: *r, axes: axes.clone(), keep_dims: *keep_dims });
            Some(FusedKernel { inputs: 1, body: vec![ops::fused::Instr::Input(0)], reduce })
        }
        _ => None,
    }
}

/// Whether `op` is a layout op the device runs as copies ([`DeviceEval::layout`]).
fn is_layout(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Pad { .. }
    )
}

/// Row-major element strides of `shape`.
fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    strides
}

/// The profile key of an op: `<kind>` for a device kernel, `<kind> (host)` for an eval
/// rule on the host.
fn kind(op: &Op, device: bool) -> String {
    let base = op_kind(op);
    if device {
        base
    } else {
        format!("{base} (host)")
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

    /// The optimizer on the host (with the jit's compiled update kernels), then each
    /// updated resident parameter written to its device buffer: only the touched rows of
    /// a table (see the module docs).
    fn update(
        &mut self,
        optimizer: &mut Optimizer<f32>,
        params: &mut HashMap<String, Tensor<f32>>,
        grads: &HashMap<String, Value<f32>>,
        info: &[ParamInfo],
        frozen: &dyn Fn(&ParamInfo) -> bool,
        lr_scale: f64,
    ) -> Result<(), String> {
        // A device training step may have left newer values on the device: those first.
        self.sync(params, optimizer)?;
        // Which device copies mirror the tensors about to change: only those are kept
        // current here (any other is uploaded whole by the next run).
        let mirrored: Vec<&String> = grads
            .keys()
            .filter(|n| match (self.resident.get(*n), params.get(*n)) {
                (Some(r), Some(t)) => r.stamp == HostStamp::of(&t.data),
                _ => false,
            })
            .collect();
        let kernels = super::jit::Jit::host_update_kernels();
        optimizer.step_with(params, grads, info, frozen, lr_scale, &kernels)?;
        for name in mirrored {
            if let Some(t) = params.get(name) {
                self.write_updated(name, t, &grads[name]).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    fn transfers(&self) -> Option<(u64, u64)> {
        Some((self.bytes_up, self.bytes_down))
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

    fn train_step(
        &mut self,
        step: &TrainStep<'_>,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<StepOutcome, String> {
        self.device_train_step(step, params, optimizer)
    }

    fn sync(
        &mut self,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<(), String> {
        self.sync_to_host(params, optimizer).map_err(|e| e.to_string())
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
        let OpenCl { plans, programs, queue, profile, read_back, tuning, bytes_up, bytes_down, .. } = self;
        let plan = plans.first().ok_or_else(|| cl_err("plan", "not made"))?;
        let program = programs.get(&plan.program_source).ok_or_else(|| cl_err("program", "not built"))?;
        let dev = DeviceRun {
            queue,
            program,
            kernels: &plan.kernels,
            params: &resident,
            tuning,
            up: Default::default(),
            down: Default::default(),
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
        *bytes_up += evaluator.dev.up.get();
        *bytes_down += evaluator.dev.down.get();
        Ok((values?, evaluator.stayed))
    }
}
