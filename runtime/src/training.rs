//! Training steps with an executor: run the training graph on a batch, clip the gradients,
//! step the optimizer. An [`Executor`] only runs graphs; training is built here on top of
//! it, from two capabilities a backend may offer:
//!
//! - compiled kernels for the host's optimizer step ([`Executor::update_kernels`], the
//!   jit's; without them the optimizer's reference loops run), and
//! - training on a device ([`Executor::device_training`], [`DeviceTraining`]): the backend
//!   keeps the gradients, the optimizer's state and the updated parameters on its device.
//!
//! A trainer calls [`train_step`], [`update`] and [`sync`], which ask for the capability
//! and otherwise step on the host ([`host_train_step`]). A data-parallel trainer splits a
//! host step in two, [`gradients`] and [`apply_gradients`], and combines the gradients of
//! all its processes in between.
//!
//! A step also advances the model's untrained state (running statistics, the graph's
//! [`StateInfo`] table): the training graph computes each state's next value as the output
//! `state/<name>`, and [`advance_states`] copies it in, on every path, only when the loss
//! is finite (as the update). No optimizer sees a state.

use crate::backend::Executor;
use crate::backend::Values;
use crate::exec::Mode;
use crate::ir::dim::Binding;
use crate::ir::graph::{state_output, Graph, ParamInfo};
use crate::optim::{clip_global_norm, LrScale, Optimizer};
use crate::tensor::{Tensor, Value};
use std::collections::HashMap;

/// What one training step runs: the training graph on one batch, and how to update.
pub struct TrainStep<'a> {
    pub graph: &'a Graph,
    pub binding: &'a Binding,
    pub feeds: &'a HashMap<String, Value<f32>>,
    pub mode: &'a Mode,
    /// The parameters' descriptions (the gradient of `p` is the output `grad/p`).
    pub info: &'a [ParamInfo],
    /// Parameters this step leaves as they are (a training stage's frozen ones).
    pub frozen: &'a dyn Fn(&ParamInfo) -> bool,
    /// Clip the gradients' global norm to this.
    pub clip_norm: Option<f64>,
    /// The factors on the learning rates: a schedule's, and per parameter a stage's
    /// per-group ones.
    pub lr_scale: &'a LrScale,
}

/// What one training step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// The batch's loss (before the update).
    pub loss: f32,
    /// Seconds spent on clipping and the update, after the graph ran.
    pub update_secs: f64,
}

/// Training carried out on a backend's device, which keeps its own copies of parameters
/// (and of the optimizer's state) there. The results are those of the host's step up to
/// the device's rounding.
pub trait DeviceTraining {
    /// One training step ([`train_step`]) with the gradients, the update and the state on
    /// the device. Afterwards the host's `params` and `optimizer` state lag behind until
    /// [`DeviceTraining::sync`]; until then the executor's runs use its own, current copies.
    fn train_step(
        &mut self,
        step: &TrainStep<'_>,
        params: &mut HashMap<String, Tensor<f32>>,
        optimizer: &mut Optimizer<f32>,
    ) -> Result<StepOutcome, String>;

    /// One optimizer step with gradients the caller has ([`update`]), keeping the device's
    /// copies of the parameters current.
    fn update(
        &mut self,
        optimizer: &mut Optimizer<f32>,
        params: &mut HashMap<String, Tensor<f32>>,
        grads: &HashMap<String, Value<f32>>,
        info: &[ParamInfo],
        frozen: &dyn Fn(&ParamInfo) -> bool,
        lr_scale: &LrScale,
    ) -> Result<(), String>;

    /// Brings the host's `params` and `optimizer` state up to date with what
    /// [`DeviceTraining::train_step`] left on the device.
    fn sync(&mut self, params: &mut HashMap<String, Tensor<f32>>, optimizer: &mut Optimizer<f32>)
        -> Result<(), String>;
}

/// One training step: runs `step.graph` (a training graph: a scalar output `loss` and
/// `grad/<param>` outputs), clips the gradients to `step.clip_norm` (their global norm,
/// [`clip_global_norm`]) and updates the parameters with `optimizer`. The update is
/// skipped when the loss is not finite (the caller decides what to do).
///
/// On a backend with [`DeviceTraining`] the step stays on the device, and the caller runs
/// [`sync`] before reading `params` or the optimizer's state (a checkpoint); otherwise it
/// is [`host_train_step`].
pub fn train_step<E: Executor + ?Sized>(
    exec: &mut E,
    step: &TrainStep<'_>,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
) -> Result<StepOutcome, String> {
    if let Some(device) = exec.device_training() {
        return device.train_step(step, params, optimizer);
    }
    host_train_step(exec, step, params, optimizer)
}

/// [`train_step`] on the host: the graph's gradients read out of its results
/// ([`gradients`]), clipped there, and handed to [`update`] ([`apply_gradients`]).
pub fn host_train_step<E: Executor + ?Sized>(
    exec: &mut E,
    step: &TrainStep<'_>,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
) -> Result<StepOutcome, String> {
    let computed = gradients(exec, step, params)?;
    let loss = computed.loss;
    let start = std::time::Instant::now();
    apply_gradients(exec, step, params, optimizer, computed)?;
    Ok(StepOutcome { loss, update_secs: start.elapsed().as_secs_f64() })
}

/// What the training graph computed on one batch, before any update: the loss, the
/// gradient of every parameter that has one (`grad/<name>`), and the next value of every
/// state the graph advances (`state/<name>`). A data-parallel trainer combines these across
/// processes before [`apply_gradients`].
#[derive(Clone, Debug)]
pub struct StepGradients {
    pub loss: f32,
    pub grads: HashMap<String, Value<f32>>,
    pub states: HashMap<String, Tensor<f32>>,
}

/// Runs `step.graph` on its batch and takes out the loss, the parameters' gradients and
/// the states' next values ([`StepGradients`]). The gradients and states are left out when
/// the loss is not finite (nothing is updated then).
pub fn gradients<E: Executor + ?Sized>(
    exec: &mut E,
    step: &TrainStep<'_>,
    params: &HashMap<String, Tensor<f32>>,
) -> Result<StepGradients, String> {
    let mut out = exec.run(step.graph, step.binding, step.feeds, params, step.mode).map_err(|e| e.to_string())?;
    let loss = out.scalar("loss").ok_or("the training graph has no scalar output `loss`")?;
    let mut grads = HashMap::new();
    let mut states = HashMap::new();
    if loss.is_finite() {
        for p in step.info {
            if let Some(g) = out.take_output(&format!("grad/{}", p.name)) {
                grads.insert(p.name.clone(), g);
            }
        }
        for st in &step.graph.states {
            let Some(next) = out.take_output(&state_output(&st.name)) else { continue };
            let Value::Dense(next) = next else {
                return Err(format!("state `{}`: its update is not a dense tensor", st.name));
            };
            states.insert(st.name.clone(), next);
        }
    }
    Ok(StepGradients { loss, grads, states })
}

/// The update of one training step from what [`gradients`] computed (possibly combined
/// with other processes' since): when the loss is finite, the gradients clipped to
/// `step.clip_norm`, the optimizer's step ([`update`]) and the states' next values copied
/// in; nothing when it is not.
pub fn apply_gradients<E: Executor + ?Sized>(
    exec: &mut E,
    step: &TrainStep<'_>,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
    computed: StepGradients,
) -> Result<(), String> {
    if !computed.loss.is_finite() {
        return Ok(());
    }
    let mut grads = computed.grads;
    if let Some(c) = step.clip_norm {
        clip_global_norm(&mut grads, c);
    }
    update(exec, optimizer, params, &grads, step.info, step.frozen, step.lr_scale)?;
    for st in &step.graph.states {
        if let Some(next) = computed.states.get(&st.name) {
            set_state(params, &st.name, next)?;
        }
    }
    Ok(())
}

/// Copies a state's next value into its tensor in `params`, in place.
fn set_state(params: &mut HashMap<String, Tensor<f32>>, name: &str, next: &Tensor<f32>) -> Result<(), String> {
    let t = params.get_mut(name).ok_or_else(|| format!("state `{name}` has no value"))?;
    if t.shape != next.shape {
        return Err(format!("state `{name}` has shape {:?}, its update has shape {:?}", t.shape, next.shape));
    }
    t.data.copy_from_slice(&next.data);
    Ok(())
}

/// Copies the next value of each state of `graph` (its output `state/<name>`, taken out of
/// `out`) into that state's tensor in `params`, in place; returns the names of the states
/// it changed. A state whose output the graph lacks stays as it is (an evaluation graph
/// has none). A backend that keeps copies of the model's tensors refreshes those names.
pub fn advance_states(
    graph: &Graph,
    out: &mut Values<f32>,
    params: &mut HashMap<String, Tensor<f32>>,
) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    for st in &graph.states {
        let Some(next) = out.take_output(&state_output(&st.name)) else { continue };
        let Value::Dense(next) = next else {
            return Err(format!("state `{}`: its update is not a dense tensor", st.name));
        };
        set_state(params, &st.name, &next)?;
        changed.push(st.name.clone());
    }
    Ok(changed)
}

/// One optimizer step ([`Optimizer::step`], with its arguments) on gradients the caller
/// has: through the backend's [`DeviceTraining`] when it has one (which keeps its device
/// copies current), else on the host with the backend's compiled update kernels, else
/// with the optimizer's reference loops. The results are the reference optimizer's. A
/// caller that runs an executor with a device changes parameters in place only through
/// this function or [`train_step`] (or hands it new tensors).
pub fn update<E: Executor + ?Sized>(
    exec: &mut E,
    optimizer: &mut Optimizer<f32>,
    params: &mut HashMap<String, Tensor<f32>>,
    grads: &HashMap<String, Value<f32>>,
    info: &[ParamInfo],
    frozen: &dyn Fn(&ParamInfo) -> bool,
    lr_scale: &LrScale,
) -> Result<(), String> {
    if let Some(device) = exec.device_training() {
        return device.update(optimizer, params, grads, info, frozen, lr_scale);
    }
    match exec.update_kernels() {
        Some(kernels) => optimizer.step_with(params, grads, info, frozen, lr_scale, kernels),
        None => optimizer.step(params, grads, info, frozen, lr_scale),
    }
}

/// Brings the host's `params` and `optimizer` state up to date with what [`train_step`]
/// left on a device; nothing for backends that compute in host memory.
pub fn sync<E: Executor + ?Sized>(
    exec: &mut E,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
) -> Result<(), String> {
    match exec.device_training() {
        Some(device) => device.sync(params, optimizer),
        None => Ok(()),
    }
}
