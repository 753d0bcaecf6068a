//! The OpenCL backend's training on the device ([`DeviceTraining`]): gradients, the optimizer's
//! state and the updated parameters stay on the device for the whole run.
//!
//! One step:
//! 1. The training graph runs with the gradients of resident parameters (those a device
//!    kernel reads) kept where the device computed them: a dense gradient as its buffer, a
//!    row-sparse one as its combined rows ([`DeviceGrad`]). Only the loss comes back.
//! 2. With `clip_norm`, the global norm adds the device's partial sums of squares
//!    (`mdl_sum_squares`, read back as one float per work group and summed in `f64`) to
//!    the host gradients' norm; the clipping factor scales the device gradients inside the
//!    update kernel and the host ones in place.
//! 3. The optimizer's coefficients come from the host [`Optimizer`] (which counts the
//!    step); the rule's update kernel (`mdl_update_<rule>`, rendered from `optim`'s one
//!    description of the rule) applies it to each resident parameter and its state on the
//!    device: every element of a dense parameter, only the touched rows of a table. The
//!    state buffers are created on first use, fresh on the device or uploaded from the
//!    host optimizer's state (a resumed run).
//!
//! The training graph's running statistics come back to the host with its other outputs:
//! [`crate::training::advance_states`] updates the host's state tensors and each resident
//! copy is written whole.
//!
//! Gradients the host computed (a row-sparse gradient combined by the host's rule, the
//! default on a CPU device) go up combined, as rows and their values, for the same update.
//! Parameters no device kernel reads are updated on the host with the jit's kernels.
//!
//! After a step the device is ahead: the host's tensors and the optimizer's state are
//! stale until [`DeviceTraining::sync`] ([`OpenCl::sync_to_host`]) reads back what changed. Until
//! then a run uses the device copies, and a host op that reads such a parameter gets it
//! read back for that run. The device state continues the host optimizer it was made with
//! as long as that optimizer's rule and step count match; after `reset` (or any update
//! made elsewhere) it is dropped and made again from the host's.

use super::launch::Arg;
use super::{cl_err, render, HostStamp, OpenCl, Resident};
use crate::backend::ExecError;
use crate::ir::graph::ParamInfo;
use crate::optim::{clip_scale, global_norm, scale_gradients, LrScale, OptimKind, Optimizer, Rule, StepCoeffs};
use crate::rows::{combine_duplicate_rows, combine_rows_in_place};
use crate::tensor::{Tensor, Value};
use crate::training::{DeviceTraining, StepOutcome, TrainStep};
use ocl::{Buffer, Program};
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

/// A gradient the device computed and kept.
pub(super) enum DeviceGrad {
    Dense(Buffer<f32>),
    /// A row-sparse gradient combined on the device: the distinct `rows` (ascending) and
    /// their summed values, `width` per row.
    Rows {
        rows: Vec<u32>,
        values: Buffer<f32>,
        width: usize,
    },
}

impl DeviceGrad {
    /// The gradient's values (those of the combined rows for a row-sparse one).
    fn values(&self) -> &Buffer<f32> {
        match self {
            DeviceGrad::Dense(b) => b,
            DeviceGrad::Rows { values, .. } => values,
        }
    }
}

/// The optimizer's state on the device.
#[derive(Default)]
pub(super) struct DeviceOptimizer {
    /// The rule and step count of the host optimizer this state continues.
    kind: Option<OptimKind>,
    steps: u64,
    /// Per parameter: its state buffers (Adam: `m`, `v`; Adagrad: the accumulator) and the
    /// parameter's shape.
    slots: HashMap<String, (Vec<Buffer<f32>>, Vec<usize>)>,
    /// Parameters whose state here is newer than the host optimizer's.
    ahead: BTreeSet<String>,
    /// One-element buffers passed for the arguments a rule or mode does not read.
    unused: Option<(Buffer<f32>, Buffer<u32>)>,
}

/// A gradient for [`OpenCl::update_on_device`].
enum Grad<'a> {
    Device(DeviceGrad),
    Host(&'a Value<f32>),
}

impl DeviceTraining for OpenCl {
    fn train_step(
        &mut self,
        step: &TrainStep<'_>,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<StepOutcome, String> {
        self.device_train_step(step, params, optimizer)
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
        lr_scale: &LrScale,
    ) -> Result<(), String> {
        // A device training step may have left newer values on the device: those first.
        self.sync_to_host(params, optimizer).map_err(|e| e.to_string())?;
        // Which device copies mirror the tensors about to change: only those are kept
        // current here (any other is uploaded whole by the next run).
        let mirrored: Vec<&String> = grads
            .keys()
            .filter(|n| match (self.resident.get(*n), params.get(*n)) {
                (Some(r), Some(t)) => r.stamp == HostStamp::of(&t.data),
                _ => false,
            })
            .collect();
        let kernels = crate::backend::jit::Jit::host_update_kernels();
        optimizer.step_with(params, grads, info, frozen, lr_scale, &kernels)?;
        for name in mirrored {
            if let Some(t) = params.get(name) {
                self.write_updated(name, t, &grads[name]).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
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
    pub(super) fn device_train_step(
        &mut self,
        step: &TrainStep<'_>,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<StepOutcome, String> {
        let text = |e: ExecError| e.to_string();
        self.plan(step.graph).map_err(text)?;
        let info: HashMap<&str, &ParamInfo> = step.info.iter().map(|p| (p.name.as_str(), p)).collect();
        let grad_name = |p: &str| format!("grad/{p}");
        let stay = {
            let plan = self.plans.first().ok_or("no plan was made")?;
            let mut named = vec![0usize; plan.fused.len()];
            for &id in plan.fused.outputs.values() {
                named[id.index()] += 1;
            }
            let mut stay = vec![false; plan.fused.len()];
            for p in step.info.iter().filter(|p| !(step.frozen)(p) && plan.device_params.contains(&p.name)) {
                if let Some(&id) = plan.fused.outputs.get(&grad_name(&p.name)) {
                    stay[id.index()] = named[id.index()] == 1 && !plan.read_by_node[id.index()];
                }
            }
            stay
        };
        let (mut values, mut kept) =
            self.execute_plan(step.binding, step.feeds, params, step.mode, Some(&stay)).map_err(text)?;
        let loss = values.scalar("loss").ok_or("the training graph has no scalar output `loss`")?;
        if !loss.is_finite() {
            return Ok(StepOutcome { loss, update_secs: 0.0 });
        }
        let start = Instant::now();

        // The gradients, on the device or on the host (frozen ones too: they count in the
        // norm, as on the host path).
        let plan = self.plans.first().ok_or("no plan was made")?;
        let program = self.programs.get(&plan.program_source).cloned().ok_or("the plan's program was not built")?;
        let mut on_device: Vec<(&ParamInfo, DeviceGrad)> = Vec::new();
        let mut on_host: HashMap<String, Value<f32>> = HashMap::new();
        for p in step.info {
            let Some(&id) = plan.fused.outputs.get(&grad_name(&p.name)) else { continue };
            match kept.remove(&id) {
                Some(g) => on_device.push((p, g)),
                None => {
                    if let Some(g) = values.take_output(&grad_name(&p.name)) {
                        on_host.insert(p.name.clone(), g);
                    }
                }
            }
        }
        let updated = |name: &str| info.get(name).is_some_and(|p| !(step.frozen)(p));
        // Everything is checked before anything changes.
        for (p, g) in &on_device {
            let t = params
                .get(&p.name)
                .ok_or_else(|| format!("optimizer: parameter `{}` has a gradient but no value", p.name))?;
            let fits = match g {
                DeviceGrad::Dense(b) => b.len() == t.data.len(),
                DeviceGrad::Rows { rows, width, .. } => {
                    t.shape.len() > 1
                        && *width == t.shape[1..].iter().product::<usize>()
                        && rows.iter().all(|&r| (r as usize) < t.shape[0])
                }
            };
            if !fits {
                return Err(format!(
                    "optimizer: the gradient of `{}` on the device does not fit the parameter's shape {:?}",
                    p.name, t.shape
                ));
            }
        }
        for (name, g) in on_host.iter().filter(|(n, _)| updated(n)) {
            let t =
                params.get(name).ok_or_else(|| format!("optimizer: parameter `{name}` has a gradient but no value"))?;
            optimizer.check_gradient(name, t, g)?;
        }

        let mut scale = 1.0f32;
        if let Some(max_norm) = step.clip_norm {
            combine_rows_in_place(&mut on_host);
            let host = global_norm(&on_host);
            let device = self.sum_squares(&program, on_device.iter().map(|(_, g)| g.values())).map_err(text)?;
            if let Some(s) = clip_scale::<f32>((host * host + device).sqrt(), max_norm) {
                scale_gradients(&mut on_host, s);
                scale = s;
            }
        }

        let kind = optimizer.config().kind;
        if self.optimizer.kind != Some(kind) || self.optimizer.steps != optimizer.step_count() {
            let unused = self.optimizer.unused.take();
            self.optimizer =
                DeviceOptimizer { kind: Some(kind), steps: optimizer.step_count(), unused, ..Default::default() };
        }
        let coeffs = optimizer.advance(step.lr_scale)?;
        let host_kernels = crate::backend::jit::Jit::host_update_kernels();
        let mut names: Vec<&String> = on_host.keys().filter(|n| updated(n)).collect();
        names.sort();
        for name in names {
            let c = &coeffs.of(name, info[name.as_str()].embedding);
            if self.resident.contains_key(name.as_str()) {
                self.update_on_device(&program, name, &params[name], Grad::Host(&on_host[name]), c, 1.0, optimizer)
                    .map_err(text)?;
            } else if let Some(t) = params.get_mut(name) {
                optimizer.apply(name, t, &on_host[name], c, &host_kernels);
            }
        }
        for (p, g) in on_device.into_iter().filter(|(p, _)| updated(&p.name)) {
            let c = &coeffs.of(&p.name, p.embedding);
            self.update_on_device(&program, &p.name, &params[&p.name], Grad::Device(g), c, scale, optimizer)
                .map_err(text)?;
        }
        self.optimizer.steps = optimizer.step_count();
        for name in crate::training::advance_states(step.graph, &mut values, params)? {
            self.write_state(&name, &params[&name]).map_err(text)?;
        }
        if let Some(profile) = self.profile.recording() {
            self.queue.finish().map_err(|e| e.to_string())?;
            profile.record("optimizer update".into(), start.elapsed());
        }
        Ok(StepOutcome { loss, update_secs: start.elapsed().as_secs_f64() })
    }

    /// The sum of the squares of every element of `grads`, added in `f64` from per-work-
    /// group partial sums (`mdl_sum_squares`), read back in one transfer.
    fn sum_squares<'g>(
        &mut self,
        program: &Program,
        grads: impl Iterator<Item = &'g Buffer<f32>>,
    ) -> Result<f64, ExecError> {
        let grads: Vec<&Buffer<f32>> = grads.filter(|g| g.len() > 0).collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let wg = render::norm_work_group(self.max_work_group);
        let groups: Vec<usize> = grads.iter().map(|g| g.len().div_ceil(wg).clamp(1, 64)).collect();
        let err = |e| cl_err("the gradients' norm on the device", e);
        let partial = Buffer::<f32>::builder()
            .queue(self.queue.clone())
            .len(groups.iter().sum::<usize>())
            .build()
            .map_err(err)?;
        let mut at = 0usize;
        for (g, &n) in grads.iter().zip(&groups) {
            let total = i32::try_from(g.len()).map_err(|_| {
                cl_err("the gradients' norm on the device", format!("a gradient of {} values is too large", g.len()))
            })?;
            let args = [Arg::Floats(&partial), Arg::Int(at as i32), Arg::Floats(g), Arg::Int(total)];
            // SAFETY: work group `q < n` writes `partial[at + q]`, inside the buffer of
            // `Σ n` values; reads stay below `total`, the gradient's length.
            unsafe { self.launcher(program).launch("mdl_sum_squares", n * wg, Some(wg.into()), &args) }?;
            at += n;
        }
        let mut sums = vec![0f32; at];
        self.transfers.read_into(&partial, &mut sums, "the gradients' norm on the device")?;
        Ok(sums.iter().map(|&v| v as f64).sum())
    }

    /// One step of the optimizer's rule on resident parameter `name` (host tensor `t`,
    /// whose device copy [`OpenCl::param_buffer`] gives) and its device state, with
    /// gradient `grad` times `scale`; the parameter and its state are then ahead of the
    /// host's.
    #[allow(clippy::too_many_arguments)]
    fn update_on_device(
        &mut self,
        program: &Program,
        name: &str,
        t: &Tensor<f32>,
        grad: Grad<'_>,
        c: &StepCoeffs<f32>,
        scale: f32,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<(), ExecError> {
        let (w, _) = self.param_buffer(name, t, true)?;
        let (unused_f, unused_u) = self.unused_buffers()?;
        // (mode, gradient values, rows or marks, row width, elements)
        let (mode, g, rows, width, total) = match &grad {
            Grad::Device(DeviceGrad::Dense(b)) => (0, b.clone(), unused_u, 1, b.len()),
            Grad::Device(DeviceGrad::Rows { rows, values, width }) => {
                if rows.is_empty() {
                    return Ok(());
                }
                (1, values.clone(), self.upload(rows, "a gradient's rows")?, *width, values.len())
            }
            Grad::Host(Value::Dense(g)) => (0, self.upload(&g.data, "a gradient")?, unused_u, 1, g.data.len()),
            Grad::Host(Value::RowSparse { shape, rows, values }) => {
                let width: usize = shape[1..].iter().product();
                let combined = combine_duplicate_rows(rows, &values.data, width);
                if combined.rows.is_empty() || width == 0 {
                    return Ok(());
                }
                let rows_buf = self.upload(&combined.rows, "a gradient's rows")?;
                (1, self.upload(&combined.values, "a gradient")?, rows_buf, width, combined.values.len())
            }
            Grad::Host(Value::Ids(_)) => return Ok(()),
        };
        let (Ok(total32), Ok(width32)) = (i32::try_from(total), i32::try_from(width)) else {
            return Err(cl_err(
                &format!("updating parameter {name} on the device"),
                format!("{total} values are too many for the update kernel"),
            ));
        };
        if total == 0 {
            return Ok(());
        }
        let slots = self.device_slots(name, &t.shape, optimizer)?;
        let rule = self.optimizer.kind.map_or(Rule::Sgd, |k| k.rule());
        let mut args = vec![
            Arg::Floats(&w),
            Arg::Floats(slots.first().unwrap_or(&unused_f)),
            Arg::Floats(slots.get(1).unwrap_or(&unused_f)),
            Arg::Floats(&g),
            Arg::Uints(&rows),
            Arg::Int(width32),
            Arg::Int(total32),
            Arg::Int(mode),
            Arg::Float(scale),
        ];
        args.extend(c.values().map(Arg::Float));
        // SAFETY: in mode 0 the gradient has the parameter's length (checked before the
        // step), and element `e < total` is written; in mode 1 the rows are distinct and
        // inside the table (checked before the step), so each work item writes its own
        // element of the parameter and of state buffers of its length. The rules that read
        // no state get one-element buffers they never touch.
        unsafe { self.launcher(program).launch(&render::update_name(rule), total, None, &args) }?;
        if let Some(r) = self.resident.get_mut(name) {
            r.ahead = true;
        }
        if !slots.is_empty() {
            self.optimizer.ahead.insert(name.to_string());
        }
        Ok(())
    }

    /// The state buffers of parameter `name` (of `shape`): the device's, else made from the
    /// host optimizer's state when it has one, else fresh.
    fn device_slots(
        &mut self,
        name: &str,
        shape: &[usize],
        optimizer: &mut Optimizer<f32>,
    ) -> Result<Vec<Buffer<f32>>, ExecError> {
        if let Some((buffers, s)) = self.optimizer.slots.get(name) {
            if s == shape {
                return Ok(buffers.clone());
            }
        }
        let err = |e| cl_err(&format!("the optimizer state of parameter {name} on the device"), e);
        let len: usize = shape.iter().product();
        let fresh = |v: f32| Buffer::<f32>::builder().queue(self.queue.clone()).len(len).fill_val(v).build();
        let buffers: Vec<Buffer<f32>> = if optimizer.has_state(name) {
            let mut out = Vec::new();
            for t in optimizer.state_of_mut(name, shape) {
                out.push(self.upload(&t.data, &format!("the optimizer state of {name}"))?);
            }
            out
        } else {
            match optimizer.config().kind {
                OptimKind::Sgd => Vec::new(),
                OptimKind::Adam { .. } => vec![fresh(0.0).map_err(err)?, fresh(0.0).map_err(err)?],
                OptimKind::Adagrad { initial_accumulator, .. } => vec![fresh(initial_accumulator as f32).map_err(err)?],
            }
        };
        self.optimizer.slots.insert(name.to_string(), (buffers.clone(), shape.to_vec()));
        Ok(buffers)
    }

    fn unused_buffers(&mut self) -> Result<(Buffer<f32>, Buffer<u32>), ExecError> {
        if self.optimizer.unused.is_none() {
            let err = |e| cl_err("allocating placeholder buffers", e);
            let f = Buffer::<f32>::builder().queue(self.queue.clone()).len(1).fill_val(0.0).build().map_err(err)?;
            let u = Buffer::<u32>::builder().queue(self.queue.clone()).len(1).fill_val(0).build().map_err(err)?;
            self.optimizer.unused = Some((f, u));
        }
        Ok(self.optimizer.unused.clone().expect("set above"))
    }

    /// [`DeviceTraining::sync`]: reads back every parameter a device step updated into `params`
    /// (when the tensor is still there, of the same length) and the device's optimizer
    /// state into `optimizer` (when it continues that optimizer; otherwise it is dropped).
    pub(super) fn sync_to_host(
        &mut self,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<(), ExecError> {
        for (name, r) in self.resident.iter_mut().filter(|(_, r)| r.ahead) {
            let Some(t) = params.get_mut(name) else { continue };
            if t.data.len() != r.buffer.len() {
                continue;
            }
            self.transfers.read_into(&r.buffer, &mut t.data, &format!("reading back parameter {name}"))?;
            *r = Resident { buffer: r.buffer.clone(), stamp: HostStamp::of(&t.data), ahead: false };
        }
        let same =
            self.optimizer.kind == Some(optimizer.config().kind) && self.optimizer.steps == optimizer.step_count();
        if !same {
            let unused = self.optimizer.unused.take();
            self.optimizer = DeviceOptimizer { unused, ..Default::default() };
            return Ok(());
        }
        for name in std::mem::take(&mut self.optimizer.ahead) {
            let Some((buffers, shape)) = self.optimizer.slots.get(&name) else { continue };
            for (t, b) in optimizer.state_of_mut(&name, shape).into_iter().zip(buffers) {
                self.transfers.read_into(b, &mut t.data, &format!("reading back the optimizer state of {name}"))?;
            }
        }
        Ok(())
    }
}
