//! Device discovery and opening: which OpenCL platforms and devices this machine has
//! ([`probe`], [`devices`], [`default_device`]) and an opened device with its context and
//! queue ([`open`], what [`super::OpenCl::new`] builds on).
//!
//! The platform count comes from the raw `clGetPlatformIDs` (microseconds), never from
//! `ocl`'s `Platform::list/default/first` or an implicit-platform `Context`/`ProQue`
//! build, which wait about 10 s and then panic on a machine without a platform. With none,
//! opening a device fails at once with a clear error ([`NO_PLATFORM`]). Devices are
//! numbered over all platforms in order (what `mdl devices` prints); the default is the
//! first GPU, else the first device. Discovery and context creation are serialised in a
//! process ([`DISCOVERY`]).

use ocl::enums::{DeviceInfo as ClDeviceInfo, DeviceInfoResult};
use ocl::flags::DeviceType;
use ocl::{Context, Device, Platform, Queue};

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

/// An opened device: its handles and the largest work group it runs.
pub(super) struct Opened {
    pub(super) device: Device,
    pub(super) summary: DeviceSummary,
    pub(super) context: Context,
    pub(super) queue: Queue,
    /// The device's largest work group (work items).
    pub(super) max_work_group: usize,
}

/// Device `index` (as numbered by [`devices`]), or the default device (first GPU, else
/// first device) when `None`, with a context and a queue.
pub(super) fn open(index: Option<usize>) -> Result<Opened, String> {
    let mut all = all_devices()?;
    if all.is_empty() {
        return Err("the OpenCL platforms list no devices".into());
    }
    let index = match index {
        Some(i) if i < all.len() => i,
        Some(i) => {
            return Err(format!("OpenCL device {i} does not exist (this machine has {}; see `mdl devices`)", all.len()))
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
    Ok(Opened { device, summary, context, queue, max_work_group })
}
