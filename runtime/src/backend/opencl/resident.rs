//! Residency: what the backend keeps on the device between runs, and how it stays equal
//! to the host's tensors. This module owns:
//! - **parameters resident on the device** ([`Resident`]): a parameter read by a device
//!   kernel gets a device buffer once per executor, uploaded whole on first use. Each
//!   buffer remembers the host tensor it mirrors ([`HostStamp`]: its storage and a sample
//!   of its values); a run handed other tensors (a loaded checkpoint, a caller's own
//!   values) uploads them whole. A buffer a device training step updated is *ahead* of the
//!   host until a sync reads it back.
//! - **the per-run parameter buffers** ([`OpenCl::refresh_params`], [`ParamBuffer`]) the
//!   evaluator finds by host data address;
//! - **updates made on the host** written back ([`OpenCl::write_updated`]): a dense
//!   parameter whole, an embedding table only the rows its row-sparse gradient touched
//!   (one upload of those rows and a scatter kernel); a running statistic a training step
//!   advanced, whole ([`OpenCl::write_state`]).
//!
//! The contract: a caller changes a parameter in place only through `training::update` or
//! a training step; an in-place change made otherwise is seen only if it moves one of the
//! sampled values.

use super::launch::Arg;
use super::OpenCl;
use crate::backend::ExecError;
use crate::tensor::{Tensor, Value};
use ocl::Buffer;
use std::collections::HashMap;

impl OpenCl {
    /// The device buffers of the plan's device parameters ([`OpenCl::param_buffer`]),
    /// keyed by the host data address the driver will hand the eval rules.
    pub(super) fn refresh_params(
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
    /// lost to a caller that ran other tensors before [`DeviceTraining::sync`](crate::training::DeviceTraining::sync).
    pub(super) fn param_buffer(
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
                self.transfers.write(&b, &t.data, &format!("uploading {what}"))?;
                b
            }
            _ => self.upload(&t.data, &what)?,
        };
        self.resident.insert(name.to_string(), Resident { buffer: buffer.clone(), stamp, ahead: false });
        Ok((buffer, false))
    }

    /// A new device buffer holding `data`, counted in the executor's transfers.
    pub(super) fn upload<T: ocl::OclPrm>(&self, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
        self.transfers.upload(&self.queue, data, what)
    }

    /// Writes the values `update` just gave `param` to its resident buffer, which mirrored
    /// the tensor before the update: the whole tensor for a dense gradient, the rows of a
    /// row-sparse one (through `mdl_scatter_rows`). A parameter without a resident buffer
    /// has nothing to keep current.
    pub(super) fn write_updated(
        &mut self,
        name: &str,
        param: &Tensor<f32>,
        grad: &Value<f32>,
    ) -> Result<(), ExecError> {
        let Some(buffer) = self.resident.get(name).map(|r| r.buffer.clone()) else { return Ok(()) };
        let what = format!("writing the update of parameter {name}");
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
        let before = self.transfers.totals().0;
        match (rows, program) {
            (Some((rows, width)), Some(program)) if i32::try_from(rows.len() * width).is_ok() && width > 0 => {
                let total = rows.len() * width;
                let mut values = Vec::with_capacity(total);
                for &r in rows.iter() {
                    values.extend_from_slice(&param.data[r as usize * width..(r as usize + 1) * width]);
                }
                let values = self.upload(&values, &format!("the updated rows of {name}"))?;
                let rows_buf = self.upload(&rows, &format!("the updated rows' ids of {name}"))?;
                let args = [
                    Arg::Floats(&buffer),
                    Arg::Uints(&rows_buf),
                    Arg::Floats(&values),
                    Arg::Int(width as i32),
                    Arg::Int(total as i32),
                ];
                // SAFETY: the optimizer checked every row against the table before updating
                // it, so each write stays inside the buffer (the table's size); rows are
                // distinct, so no two work items write one element.
                unsafe { self.launcher(&program).launch("mdl_scatter_rows", total, None, &args) }?;
            }
            _ => self.transfers.write(&buffer, &param.data, &what)?,
        }
        self.param_bytes += self.transfers.totals().0 - before;
        if let Some(r) = self.resident.get_mut(name) {
            r.stamp = HostStamp::of(&param.data);
        }
        Ok(())
    }
}

impl OpenCl {
    /// Writes state `name` (a running statistic), which a training step just advanced in
    /// place on the host, whole to its resident buffer, if it has one. Not counted as a
    /// parameter upload: a state changes on every step by design.
    pub(super) fn write_state(&mut self, name: &str, state: &Tensor<f32>) -> Result<(), ExecError> {
        let Some(buffer) = self.resident.get(name).map(|r| r.buffer.clone()) else { return Ok(()) };
        self.transfers.write(&buffer, &state.data, &format!("writing running statistic {name}"))?;
        if let Some(r) = self.resident.get_mut(name) {
            r.stamp = HostStamp::of(&state.data);
        }
        Ok(())
    }
}

/// A parameter's device copy.
pub(super) struct Resident {
    pub(super) buffer: Buffer<f32>,
    /// The host tensor the buffer was last made equal to.
    pub(super) stamp: HostStamp,
    /// A device training step updated the buffer since: it is newer than that tensor.
    pub(super) ahead: bool,
}

/// A parameter's device buffer for one run, and whether it is ahead of the host tensor.
pub(super) struct ParamBuffer {
    pub(super) buffer: Buffer<f32>,
    pub(super) ahead: bool,
}

/// What a resident parameter buffer was last made equal to: the host tensor's storage
/// (address and length) and a sample of its values (64 evenly spaced elements, the first
/// and the last, by bits). A tensor with another stamp is uploaded whole; the sample
/// catches new values placed at a reused address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HostStamp {
    addr: usize,
    len: usize,
    sample: u64,
}

impl HostStamp {
    pub(super) fn of(data: &[f32]) -> HostStamp {
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
