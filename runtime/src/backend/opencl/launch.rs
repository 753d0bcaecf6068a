//! Kernel launches and the data that crosses to and from the device. This module owns:
//! - [`Transfers`]: every upload, write and read-back of the backend goes through it and
//!   is counted there (the totals [`Executor::transfers`] reports);
//! - [`Launcher`] and its [`Launcher::launch`]: the one way a kernel is launched (by name
//!   from a built program, with its work sizes and arguments, errors naming the kernel);
//! - [`DeviceRun`]: what one run's kernels need (the plan's program and kernel names, the
//!   resident parameters, the matmul tuning) and the kernels a run launches: copies
//!   between strided views (or the runtime's rectangle copy for rows), row gathers,
//!   softmax, fused kernels and tiled matmuls, each tuned once per product shape.
//!
//! [`Executor::transfers`]: crate::backend::Executor::transfers

use super::resident::ParamBuffer;
use super::{cl_err, render};
use crate::backend::ExecError;
use crate::ops::fused::{broadcast_all, broadcasts_to, FusedKernel};
use crate::tensor::{broadcast_strides, Tensor};
use ocl::{Buffer, Kernel, Program, Queue, SpatialDims};
use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bytes written to and read from the device since the executor was made.
#[derive(Debug, Default)]
pub(super) struct Transfers {
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Transfers {
    /// The bytes written and read so far.
    pub(super) fn totals(&self) -> (u64, u64) {
        (self.up.get(), self.down.get())
    }

    /// A new buffer on `queue`'s device holding `data` (`what` names it in errors).
    pub(super) fn upload<T: ocl::OclPrm>(&self, queue: &Queue, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
        let buffer = Buffer::<T>::builder()
            .queue(queue.clone())
            .len(data.len())
            .copy_host_slice(data)
            .build()
            .map_err(|e| cl_err(&format!("uploading {what}"), e))?;
        self.up.set(self.up.get() + std::mem::size_of_val(data) as u64);
        Ok(buffer)
    }

    /// `data` written over `buffer` (of its length); `context` leads the error.
    pub(super) fn write(&self, buffer: &Buffer<f32>, data: &[f32], context: &str) -> Result<(), ExecError> {
        buffer.write(data).enq().map_err(|e| cl_err(context, e))?;
        self.up.set(self.up.get() + std::mem::size_of_val(data) as u64);
        Ok(())
    }

    /// `buffer`'s first `out.len()` values read into `out`; `context` leads the error.
    pub(super) fn read_into(&self, buffer: &Buffer<f32>, out: &mut [f32], context: &str) -> Result<(), ExecError> {
        buffer.read(&mut *out).enq().map_err(|e| cl_err(context, e))?;
        self.down.set(self.down.get() + std::mem::size_of_val(out) as u64);
        Ok(())
    }
}

/// One argument of a kernel launch, in the order of the kernel's parameters.
pub(super) enum Arg<'a> {
    Floats(&'a Buffer<f32>),
    Uints(&'a Buffer<u32>),
    Ints(&'a Buffer<i32>),
    Int(i32),
    Float(f32),
}

/// A queue, a built program and the transfer counters: what every kernel launch, upload
/// and read-back of a run or an update goes through.
#[derive(Clone, Copy)]
pub(super) struct Launcher<'a> {
    pub(super) queue: &'a Queue,
    pub(super) program: &'a Program,
    pub(super) transfers: &'a Transfers,
}

impl Launcher<'_> {
    /// Launches kernel `name` over `global` work items (in work groups of `local` when
    /// given) with `args`; the launch is queued, not waited for.
    ///
    /// # Safety
    ///
    /// Every buffer in `args` holds every element the kernel addresses for these work
    /// sizes and scalar arguments: the kernels trust their arguments.
    pub(super) unsafe fn launch(
        &self,
        name: &str,
        global: impl Into<SpatialDims>,
        local: Option<SpatialDims>,
        args: &[Arg<'_>],
    ) -> Result<(), ExecError> {
        let mut builder = Kernel::builder();
        builder.program(self.program).name(name).queue(self.queue.clone()).global_work_size(global);
        if let Some(local) = local {
            builder.local_work_size(local);
        }
        for arg in args {
            match *arg {
                Arg::Floats(b) => builder.arg(b),
                Arg::Uints(b) => builder.arg(b),
                Arg::Ints(b) => builder.arg(b),
                Arg::Int(v) => builder.arg(v),
                Arg::Float(v) => builder.arg(v),
            };
        }
        let kernel = builder.build().map_err(|e| cl_err(&format!("kernel {name}"), e))?;
        // SAFETY: the caller vouches for the buffers (this function's contract).
        unsafe { kernel.enq() }.map_err(|e| cl_err(&format!("running kernel {name}"), e))
    }

    /// A new device buffer holding `data`, counted.
    pub(super) fn upload<T: ocl::OclPrm>(&self, data: &[T], what: &str) -> Result<Buffer<T>, ExecError> {
        self.transfers.upload(self.queue, data, what)
    }

    /// A new device buffer of `len` values, uninitialised.
    pub(super) fn output(&self, len: usize) -> Result<Buffer<f32>, ExecError> {
        Buffer::<f32>::builder()
            .queue(self.queue.clone())
            .len(len)
            .build()
            .map_err(|e| cl_err("allocating an output", e))
    }

    /// The first `len` values of `b`, read back (counted).
    pub(super) fn read(&self, b: &Buffer<f32>, len: usize) -> Result<Vec<f32>, ExecError> {
        let mut data = vec![0f32; len];
        self.transfers.read_into(b, &mut data, "reading a result")?;
        Ok(data)
    }
}

/// The device-side state one run's kernels need.
pub(super) struct DeviceRun<'a> {
    pub(super) link: Launcher<'a>,
    pub(super) kernels: &'a HashMap<FusedKernel, String>,
    pub(super) params: &'a HashMap<usize, ParamBuffer>,
    pub(super) tuning: &'a MatmulTuning,
}

/// A product's shape as tuning knows it: `(m, n, k, trans_a, trans_b, batches, shared
/// right operand)`.
type ProductShape = (usize, usize, usize, bool, bool, usize, bool);

/// The matmul tilings this device can run and the one chosen for each product shape.
#[derive(Debug, Default)]
pub(super) struct MatmulTuning {
    /// Indices into `render::MATMUL_TILES` whose work group the device allows.
    pub(super) allowed: Vec<usize>,
    /// The tiling chosen per product shape.
    pub(super) chosen: std::cell::RefCell<HashMap<ProductShape, usize>>,
    /// A tiling used for every product (tests), instead of tuning.
    pub(super) forced: Option<usize>,
}

/// Products with fewer multiply-adds than this take the first tiling untimed: tuning
/// would cost more than it could save.
const TUNE_MIN_WORK: usize = 1 << 22;

impl DeviceRun<'_> {
    /// The resident buffer of the parameter `t` is, if it is one.
    pub(super) fn param(&self, t: &Tensor<f32>) -> Option<Buffer<f32>> {
        self.param_entry(t).map(|p| p.buffer.clone())
    }

    /// The run's entry for the parameter `t` is, if it is one.
    pub(super) fn param_entry(&self, t: &Tensor<f32>) -> Option<&ParamBuffer> {
        self.params.get(&(t.data.as_ptr() as usize)).filter(|p| p.buffer.len() == t.data.len())
    }

    /// One `mdl_copy` launch ([`render::COPY`]): the view `shape` of `input` (from
    /// `in_base`, `in_strides`) into `out` (at `out_base`, `out_strides`). `None` when the
    /// sizes do not fit the kernel's `int`s.
    pub(super) fn copy(
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
                self.link.queue.as_core(),
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
        let meta = self.link.upload(&meta, "copy metadata")?;
        // SAFETY: the view's offsets stay inside both buffers (shapes checked by the ops'
        // shape rules and the callers).
        unsafe {
            self.link.launch("mdl_copy", total, None, &[Arg::Ints(&meta), Arg::Floats(out), Arg::Floats(input)])
        }?;
        Ok(Some(()))
    }

    /// Rows `ids` of `table` (`[rows, width]` in a buffer): `None` (run on the host,
    /// which reports it) when an id is out of range or a size does not fit an `int`.
    pub(super) fn gather(
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
        let out = self.link.output(total)?;
        let args = [
            Arg::Floats(&out),
            Arg::Floats(table),
            Arg::Uints(ids_on_device),
            Arg::Int(width as i32),
            Arg::Int(total as i32),
        ];
        // SAFETY: every id is below `rows` (checked above), so reads stay in the table.
        unsafe { self.link.launch("mdl_gather", total, None, &args) }?;
        Ok(Some(out))
    }

    /// A softmax along `axis` of a value of `shape` (one work item per vector); `None` when
    /// a size does not fit an `int`.
    pub(super) fn softmax(
        &self,
        x: &Buffer<f32>,
        shape: &[usize],
        axis: usize,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let (size, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        let len: usize = shape.iter().product();
        let vectors = len.checked_div(size).unwrap_or(0);
        if len == 0 || i32::try_from(len).is_err() {
            return Ok(None);
        }
        let out = self.link.output(len)?;
        let args = [
            Arg::Floats(&out),
            Arg::Floats(x),
            Arg::Int(size as i32),
            Arg::Int(inner as i32),
            Arg::Int(vectors as i32),
        ];
        // SAFETY: work item `g < vectors` reads and writes `size` elements `inner` apart from
        // `(g / inner) * size * inner + g % inner`, all below `len`, the length of both.
        unsafe { self.link.launch("mdl_softmax", vectors, None, &args) }?;
        Ok(Some(out))
    }

    /// A fused kernel on the device, reading `inputs` (the operands' device buffers) with
    /// the operands' shapes; `None` when its shapes are outside what the rendered kernel
    /// handles (empty tensors, indices beyond `int`), which then run on the host.
    pub(super) fn fused(
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
        let meta = self.link.upload(&meta, "kernel metadata")?;
        let out = self.link.output(total)?;
        let mut args = vec![Arg::Ints(&meta), Arg::Floats(&out)];
        args.extend(inputs.iter().map(Arg::Floats));
        // SAFETY: every buffer argument holds the elements the meta strides address.
        unsafe { self.link.launch(name, total, None, &args) }?;
        Ok(Some(out))
    }

    /// A MatMul on the device of operands with shapes `sa`, `sb` in buffers `ab`, `bb`
    /// (`None`: a shape the kernel does not take, run on the host).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
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
        // Leading axes broadcast otherwise (one operand repeated along some of them) run on
        // the host.
        if out_shape[..out_shape.len() - 2] != sa[..ra - 2] || !shared && sb[..rb - 2] != sa[..ra - 2] {
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
        let out = self.link.output(total)?;
        let launch = |i: usize| -> Result<(), ExecError> {
            let t = render::MATMUL_TILES[i];
            let name = render::matmul_name(i);
            let groups = |v: usize, block: usize| v.div_ceil(block) * t.wg;
            let mut args = vec![Arg::Floats(ab), Arg::Floats(bb), Arg::Floats(&out)];
            args.extend([m, n, k, m * k, a_rs, a_cs, b_batch, b_rs, b_cs].map(|v| Arg::Int(v as i32)));
            let global = [groups(n, t.bn), groups(m, t.bm), batches];
            // SAFETY: the strides address only elements of `a`, `b` and `out` (bounds
            // checked in the kernel).
            unsafe { self.link.launch(&name, global, Some([t.wg, t.wg, 1].into()), &args) }
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
                let finish = || self.link.queue.finish().map_err(|e| cl_err("waiting for the device", e));
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
