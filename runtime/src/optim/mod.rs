//! Optimizers (SGD, Adam, Adagrad) with row-sparse updates of embedding tables, global-norm
//! gradient clipping, and the optimizer state that checkpoints carry.
//!
//! This module owns the update rules and their per-parameter state; it does not know how
//! gradients were produced or which parameters a training stage freezes (the caller says so
//! through the `frozen` predicate of [`Optimizer::step`]). Each rule's per-element
//! arithmetic is written once, in [`rule`] ([`Rule::step`]): this module's loops evaluate
//! it ([`HostLoops`], the reference) and the backends render it into their kernels.
//!
//! # Update rules
//!
//! With `g` the gradient, `w` the parameter, `t` the global step (1 on the first call of
//! [`Optimizer::step`]) and `lr` the learning rate times the parameter's factor in the
//! step's [`LrScale`] (a schedule's factor, times a per-group factor where a stage gives one):
//!
//! - L2 is added to the gradient first: `g ← g + l2 · w`.
//! - SGD: `w ← w − lr · g`.
//! - Adam: `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//!   `w ← w − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + ε)` (ε added to the bias-corrected
//!   root, as in Kingma & Ba).
//! - Adagrad: `a ← a + g²`, `w ← w − lr · g / (sqrt(a) + ε)`, with `a` starting at
//!   `initial_accumulator`.
//!
//! Embedding tables (`ParamInfo::embedding`) use `embedding_lr` and `embedding_l2` when
//! those are set, and `lr` / `l2` otherwise.
//!
//! # Row-sparse gradients
//!
//! A [`Value::RowSparse`] gradient is first combined ([`crate::rows`]: duplicate rows
//! summed, in their original order, exactly as [`Value::to_dense`] sums them), and then only the rows it
//! names are updated, in ascending row order: the parameters, moments and accumulators of
//! every other row are neither read nor written, so a step costs time proportional to the
//! rows a batch touched, not to the table.
//!
//! - SGD without L2 is exactly the dense update of the densified gradient (untouched rows
//!   have a zero gradient and would not move anyway).
//! - Adagrad without L2 is likewise exactly the dense update (a zero gradient adds nothing
//!   to the accumulator and moves nothing).
//! - Adam is *lazy* (the semantics of TensorFlow's `LazyAdam`): the moments of a row are
//!   decayed and updated only on the steps that touch it, while the bias correction uses
//!   the global step count `t`. A row touched on every step therefore follows dense Adam
//!   exactly; a row skipped on some steps keeps its stale moments instead of decaying them
//!   towards zero (and, unlike dense Adam, does not keep drifting on momentum).
//! - L2 on a row-sparse gradient is applied to the touched rows only; untouched rows are not
//!   decayed.
//!
//! A parameter that has no entry in the gradient map is not updated at all on that step
//! (for Adam its moments are not decayed either), and a frozen parameter is skipped
//! entirely, its state left as it was.
//!
//! # State
//!
//! [`Optimizer::state`] exports the state as named tensors: `adam.m/<param>`,
//! `adam.v/<param>`, `adagrad.accum/<param>`, and `optim.step`, the global step written as
//! four base-2¹⁶ digits (least significant first) so that it is exact even in `f32`.
//! [`Optimizer::load_state`] restores it; a resumed optimizer continues bit-identically.

pub mod rule;

pub use rule::{Coeff, Evaluate, Rule, UpdateArith};

use crate::ir::graph::ParamInfo;
use crate::rows::{combine_rows_in_place, for_each_combined_row, row_width};
use crate::tensor::{Float, Tensor, Value};
use std::borrow::Cow;
use std::collections::HashMap;

/// Which update rule, with its own constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimKind {
    Sgd,
    Adam { beta1: f64, beta2: f64, eps: f64 },
    Adagrad { eps: f64, initial_accumulator: f64 },
}

impl OptimKind {
    /// Adam with the usual constants: β1 = 0.9, β2 = 0.999, ε = 1e-8.
    pub const fn adam() -> OptimKind {
        OptimKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    /// Adagrad with ε = 1e-10 and accumulators starting at 0.
    pub const fn adagrad() -> OptimKind {
        OptimKind::Adagrad { eps: 1e-10, initial_accumulator: 0.0 }
    }

    /// The lower-case name (`sgd`, `adam`, `adagrad`), for messages and state names.
    pub fn name(&self) -> &'static str {
        self.rule().name()
    }

    /// The update rule, without its constants (those enter a step through [`StepCoeffs`]).
    pub fn rule(&self) -> Rule {
        match self {
            OptimKind::Sgd => Rule::Sgd,
            OptimKind::Adam { .. } => Rule::Adam,
            OptimKind::Adagrad { .. } => Rule::Adagrad,
        }
    }
}

/// How to train: the rule, learning rates and L2 strengths.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    /// L2 strength for every parameter that is not an embedding table.
    pub l2: f64,
    /// Learning rate of embedding tables; `lr` when unset.
    pub embedding_lr: Option<f64>,
    /// L2 strength of embedding tables; `l2` when unset.
    pub embedding_l2: Option<f64>,
}

impl OptimConfig {
    /// `kind` at learning rate `lr`, no L2, tables trained like everything else.
    pub fn new(kind: OptimKind, lr: f64) -> OptimConfig {
        OptimConfig { kind, lr, l2: 0.0, embedding_lr: None, embedding_l2: None }
    }

    /// The learning rate of a parameter (before the step's scale).
    pub fn lr_for(&self, embedding: bool) -> f64 {
        if embedding {
            self.embedding_lr.unwrap_or(self.lr)
        } else {
            self.lr
        }
    }

    /// The L2 strength of a parameter.
    pub fn l2_for(&self, embedding: bool) -> f64 {
        if embedding {
            self.embedding_l2.unwrap_or(self.l2)
        } else {
            self.l2
        }
    }

    /// Checks that every number is usable: rates and strengths finite and `>= 0`, betas in
    /// `[0, 1)`, ε finite and `> 0`.
    pub fn validate(&self) -> Result<(), String> {
        let non_negative = |what: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("optimizer: {} must be a finite number >= 0, not {}", what, v))
            }
        };
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("optimizer: {} must be a finite number > 0, not {}", what, v))
            }
        };
        let beta = |what: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("optimizer: {} must be in [0, 1), not {}", what, v))
            }
        };
        non_negative("lr", self.lr)?;
        non_negative("l2", self.l2)?;
        if let Some(v) = self.embedding_lr {
            non_negative("embedding_lr", v)?;
        }
        if let Some(v) = self.embedding_l2 {
            non_negative("embedding_l2", v)?;
        }
        match self.kind {
            OptimKind::Sgd => {}
            OptimKind::Adam { beta1, beta2, eps } => {
                beta("beta1", beta1)?;
                beta("beta2", beta2)?;
                positive("eps", eps)?;
            }
            OptimKind::Adagrad { eps, initial_accumulator } => {
                positive("eps", eps)?;
                non_negative("initial_accumulator", initial_accumulator)?;
            }
        }
        Ok(())
    }
}

impl Default for OptimConfig {
    /// Adam at learning rate 1e-3.
    fn default() -> OptimConfig {
        OptimConfig::new(OptimKind::adam(), 1e-3)
    }
}

/// The name of the global step in exported state.
pub const STEP_STATE_NAME: &str = "optim.step";
const ADAM_M_PREFIX: &str = "adam.m/";
const ADAM_V_PREFIX: &str = "adam.v/";
const ADAGRAD_ACCUM_PREFIX: &str = "adagrad.accum/";
/// The global step is stored as this many base-2¹⁶ digits.
const STEP_DIGITS: usize = 4;

/// The state one parameter carries between steps, in the parameter's shape.
#[derive(Clone, Debug, PartialEq)]
enum Slots<T> {
    Adam { m: Tensor<T>, v: Tensor<T> },
    Adagrad { accum: Tensor<T> },
}

impl<T: Float> Slots<T> {
    /// Fresh state for a parameter of `shape`; `None` for SGD, which keeps none.
    fn fresh(kind: &OptimKind, shape: &[usize]) -> Option<Slots<T>> {
        match *kind {
            OptimKind::Sgd => None,
            OptimKind::Adam { .. } => {
                Some(Slots::Adam { m: Tensor::zeros(shape.to_vec()), v: Tensor::zeros(shape.to_vec()) })
            }
            OptimKind::Adagrad { initial_accumulator, .. } => {
                Some(Slots::Adagrad { accum: Tensor::full(shape.to_vec(), T::from_f64(initial_accumulator)) })
            }
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Slots::Adam { m, .. } => &m.shape,
            Slots::Adagrad { accum } => &accum.shape,
        }
    }
}

/// The constants of one step for one class of parameters (tables or the rest), in `T`:
/// what an update kernel reads besides the parameter, its gradient and its state.
#[derive(Clone, Copy, Debug)]
pub struct StepCoeffs<T> {
    pub lr: T,
    pub l2: T,
    /// Adam: `lr / (1 − β1ᵗ)`.
    pub adam_step_size: T,
    /// Adam: `1 / sqrt(1 − β2ᵗ)`.
    pub adam_inv_sqrt_bias2: T,
    pub beta1: T,
    pub one_minus_beta1: T,
    pub beta2: T,
    pub one_minus_beta2: T,
    pub eps: T,
}

impl<T: Float> StepCoeffs<T> {
    fn new(config: &OptimConfig, embedding: bool, lr_scale: f64, step: u64) -> StepCoeffs<T> {
        let lr = config.lr_for(embedding) * lr_scale;
        let mut c = StepCoeffs {
            lr: T::from_f64(lr),
            l2: T::from_f64(config.l2_for(embedding)),
            adam_step_size: T::ZERO,
            adam_inv_sqrt_bias2: T::ONE,
            beta1: T::ZERO,
            one_minus_beta1: T::ONE,
            beta2: T::ZERO,
            one_minus_beta2: T::ONE,
            eps: T::ZERO,
        };
        match config.kind {
            OptimKind::Sgd => {}
            OptimKind::Adam { beta1, beta2, eps } => {
                let t = step as f64;
                c.adam_step_size = T::from_f64(lr / (1.0 - beta1.powf(t)));
                c.adam_inv_sqrt_bias2 = T::from_f64(1.0 / (1.0 - beta2.powf(t)).sqrt());
                c.beta1 = T::from_f64(beta1);
                c.one_minus_beta1 = T::from_f64(1.0 - beta1);
                c.beta2 = T::from_f64(beta2);
                c.one_minus_beta2 = T::from_f64(1.0 - beta2);
                c.eps = T::from_f64(eps);
            }
            OptimKind::Adagrad { eps, .. } => c.eps = T::from_f64(eps),
        }
        c
    }
}

/// The state of one parameter as an update kernel writes it, each slot in the
/// parameter's layout.
#[derive(Debug)]
pub enum SlotsMut<'a, T> {
    Sgd,
    Adam { m: &'a mut [T], v: &'a mut [T] },
    Adagrad { accum: &'a mut [T] },
}

impl<T> SlotsMut<'_, T> {
    /// The rule that keeps these slots.
    pub fn rule(&self) -> Rule {
        match self {
            SlotsMut::Sgd => Rule::Sgd,
            SlotsMut::Adam { .. } => Rule::Adam,
            SlotsMut::Adagrad { .. } => Rule::Adagrad,
        }
    }

    /// The same slots, reborrowed (to hand them on and use them again).
    pub fn reborrow(&mut self) -> SlotsMut<'_, T> {
        match self {
            SlotsMut::Sgd => SlotsMut::Sgd,
            SlotsMut::Adam { m, v } => SlotsMut::Adam { m, v },
            SlotsMut::Adagrad { accum } => SlotsMut::Adagrad { accum },
        }
    }
}

fn slots_mut<T>(slots: Option<&mut Slots<T>>) -> SlotsMut<'_, T> {
    match slots {
        None => SlotsMut::Sgd,
        Some(Slots::Adam { m, v }) => SlotsMut::Adam { m: &mut m.data, v: &mut v.data },
        Some(Slots::Adagrad { accum }) => SlotsMut::Adagrad { accum: &mut accum.data },
    }
}

/// Applies the rule ([`Rule::step`], evaluated on numbers) to `w[range]` and its state,
/// given that range's gradient.
fn update_range<T: Float>(
    w: &mut [T],
    slots: &mut SlotsMut<'_, T>,
    range: std::ops::Range<usize>,
    g: &[T],
    c: &StepCoeffs<T>,
) {
    let a = &mut Evaluate(c.values());
    match slots {
        SlotsMut::Sgd => {
            for (w, &g) in w[range].iter_mut().zip(g) {
                *w = Rule::Sgd.step(a, *w, g, &mut []);
            }
        }
        SlotsMut::Adam { m, v } => {
            let (m, v) = (&mut m[range.clone()], &mut v[range.clone()]);
            for (((w, &g), m), v) in w[range].iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let mut s = [*m, *v];
                *w = Rule::Adam.step(a, *w, g, &mut s);
                [*m, *v] = s;
            }
        }
        SlotsMut::Adagrad { accum } => {
            for ((w, &g), acc) in w[range.clone()].iter_mut().zip(g).zip(accum[range].iter_mut()) {
                let mut s = [*acc];
                *w = Rule::Adagrad.step(a, *w, g, &mut s);
                [*acc] = s;
            }
        }
    }
}

/// Where one parameter's update runs: [`HostLoops`] (this module's loops, the reference)
/// or a backend's compiled kernels. An implementation computes exactly the rule of the
/// module docs, element by element in the same operation order, on the parameter `w`,
/// its `slots` and its checked gradient (dense of `w`'s length, or row-sparse with rows
/// inside the table and `rows × width` values); a row-sparse gradient's rows are
/// combined as [`for_each_combined_row`] combines them.
pub trait UpdateKernels<T> {
    fn apply(&self, w: &mut [T], slots: SlotsMut<'_, T>, grad: &Value<T>, coeffs: &StepCoeffs<T>);
}

/// The update loops of this module, on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostLoops;

impl<T: Float> UpdateKernels<T> for HostLoops {
    fn apply(&self, w: &mut [T], mut slots: SlotsMut<'_, T>, grad: &Value<T>, c: &StepCoeffs<T>) {
        match grad {
            Value::Dense(g) => update_range(w, &mut slots, 0..w.len(), &g.data, c),
            Value::Ids(_) => {}
            Value::RowSparse { shape, rows, values } => {
                let width = row_width(shape);
                for_each_combined_row(rows, &values.data, width, |row, g| {
                    let start = row as usize * width;
                    update_range(w, &mut slots, start..start + width, g, c);
                });
            }
        }
    }
}

/// The global L2 norm of all gradients, as if every row-sparse gradient were densified
/// (duplicate rows combined before squaring). Ids are ignored. Summed in `f64`, in name
/// order, so the result does not depend on the map's iteration order.
pub fn global_norm<T: Float>(grads: &HashMap<String, Value<T>>) -> f64 {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let sum_squares = |data: &[T]| data.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>();
    let mut total = 0.0;
    for name in names {
        total += match &grads[name] {
            Value::Dense(t) => sum_squares(&t.data),
            Value::Ids(_) => 0.0,
            Value::RowSparse { shape, rows, values } => {
                let width = row_width(shape);
                if values.data.len() != rows.len() * width {
                    // Malformed; count what is there rather than guess at rows.
                    sum_squares(&values.data)
                } else {
                    let mut squares = 0.0;
                    for_each_combined_row(rows, &values.data, width, |_, g| squares += sum_squares(g));
                    squares
                }
            }
        };
    }
    total.sqrt()
}

/// Scales all gradients in place so that their global norm (see [`global_norm`]) is at
/// most `max_norm`, and returns the norm before clipping. Row-sparse gradients are first
/// combined ([`combine_rows_in_place`]). Gradients are left unchanged when
/// the norm is within bounds, and also when it is not finite (the caller sees the returned
/// NaN or infinity and decides whether to skip the step).
pub fn clip_global_norm<T: Float>(grads: &mut HashMap<String, Value<T>>, max_norm: f64) -> f64 {
    // Combined once here, the gradients need no second sort in the optimizer, and scaling
    // touches each row once.
    combine_rows_in_place(grads);
    let norm = global_norm(grads);
    if let Some(scale) = clip_scale::<T>(norm, max_norm) {
        scale_gradients(grads, scale);
    }
    norm
}

/// The factor that brings gradients of global norm `norm` down to `max_norm`: `None` when
/// they are within bounds, or when the norm is not finite (see [`clip_global_norm`]).
pub fn clip_scale<T: Float>(norm: f64, max_norm: f64) -> Option<T> {
    (norm.is_finite() && max_norm >= 0.0 && norm > max_norm).then(|| T::from_f64(max_norm / norm))
}

/// Multiplies every gradient value by `scale` (ids are left alone).
pub fn scale_gradients<T: Float>(grads: &mut HashMap<String, Value<T>>, scale: T) {
    for grad in grads.values_mut() {
        let data = match grad {
            Value::Dense(t) => &mut t.data,
            Value::RowSparse { values, .. } => &mut values.data,
            Value::Ids(_) => continue,
        };
        for v in data.iter_mut() {
            *v = *v * scale;
        }
    }
}

/// An optimizer: the configuration, the global step and each parameter's state.
#[derive(Clone, Debug)]
pub struct Optimizer<T: Float> {
    config: OptimConfig,
    /// Completed steps; the next step is number `steps + 1`.
    steps: u64,
    slots: HashMap<String, Slots<T>>,
}

/// The factors on the configured learning rates for one step: `all` for every parameter (a
/// schedule's or a stage's factor), times `per_param[name]` where a parameter has one (a
/// stage's per-group learning rates). `1.0` is the configured rates; `LrScale::from(f)` is a
/// factor `f` for all.
#[derive(Clone, Debug, PartialEq)]
pub struct LrScale {
    pub all: f64,
    pub per_param: HashMap<String, f64>,
}

impl LrScale {
    /// The factor of parameter `name`.
    pub fn of(&self, name: &str) -> f64 {
        self.all * self.per_param.get(name).copied().unwrap_or(1.0)
    }

    fn check(&self) -> Result<(), String> {
        let ok = |f: f64| f.is_finite() && f >= 0.0;
        if !ok(self.all) {
            return Err(format!("optimizer: lr_scale must be a finite number >= 0, not {}", self.all));
        }
        let mut bad: Vec<(&String, &f64)> = self.per_param.iter().filter(|(_, &f)| !ok(f)).collect();
        bad.sort_by(|a, b| a.0.cmp(b.0));
        match bad.first() {
            Some((name, f)) => {
                Err(format!("optimizer: the lr factor of `{name}` must be a finite number >= 0, not {f}"))
            }
            None => Ok(()),
        }
    }
}

impl From<f64> for LrScale {
    fn from(all: f64) -> LrScale {
        LrScale { all, per_param: HashMap::new() }
    }
}

/// The coefficients of one step, for each parameter: they differ between embedding tables
/// and the rest (`embedding_lr`, `embedding_l2`) and with each parameter's [`LrScale`].
#[derive(Clone, Debug)]
pub struct StepCoeffSet<'a> {
    config: OptimConfig,
    step: u64,
    scale: &'a LrScale,
}

impl StepCoeffSet<'_> {
    /// Those of parameter `name`, an embedding table when `embedding`.
    pub fn of<T: Float>(&self, name: &str, embedding: bool) -> StepCoeffs<T> {
        StepCoeffs::new(&self.config, embedding, self.scale.of(name), self.step)
    }
}

/// One parameter update planned by the validation pass of [`Optimizer::step`].
struct PlannedUpdate<'a, T> {
    name: &'a str,
    embedding: bool,
    grad: &'a Value<T>,
}

impl<T: Float> Optimizer<T> {
    /// A fresh optimizer (no state, step 0); fails when the configuration is unusable.
    pub fn new(config: OptimConfig) -> Result<Optimizer<T>, String> {
        config.validate()?;
        Ok(Optimizer { config, steps: 0, slots: HashMap::new() })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Steps completed so far (0 for a fresh or reset optimizer).
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// Forgets all state and the step count, as at creation (for staged training).
    pub fn reset(&mut self) {
        self.slots.clear();
        self.steps = 0;
    }

    /// Applies one update to every parameter that has a gradient in `grads` and is not
    /// `frozen`, with learning rates multiplied by the factors of `lr_scale` ([`LrScale`]).
    ///
    /// Everything is checked before anything changes: a gradient for a parameter missing
    /// from `info` or `params`, a gradient whose shape differs from its parameter's, a row
    /// outside the table, ids given as a gradient, or state of another shape give an error
    /// and leave parameters, state and step count as they were.
    pub fn step(
        &mut self,
        params: &mut HashMap<String, Tensor<T>>,
        grads: &HashMap<String, Value<T>>,
        info: &[ParamInfo],
        frozen: &dyn Fn(&ParamInfo) -> bool,
        lr_scale: &LrScale,
    ) -> Result<(), String> {
        self.step_with(params, grads, info, frozen, lr_scale, &HostLoops)
    }

    /// [`Optimizer::step`] with each parameter's update carried out by `kernels` (a
    /// backend's compiled update kernels); the checks, the state and the coefficients are
    /// this optimizer's, so the result is the same as `step`'s.
    pub fn step_with(
        &mut self,
        params: &mut HashMap<String, Tensor<T>>,
        grads: &HashMap<String, Value<T>>,
        info: &[ParamInfo],
        frozen: &dyn Fn(&ParamInfo) -> bool,
        lr_scale: &LrScale,
        kernels: &dyn UpdateKernels<T>,
    ) -> Result<(), String> {
        lr_scale.check()?;
        let info_by_name: HashMap<&str, &ParamInfo> = info.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut plan: Vec<PlannedUpdate<'_, T>> = Vec::with_capacity(grads.len());
        for (name, grad) in grads {
            let Some(&param_info) = info_by_name.get(name.as_str()) else {
                return Err(format!("optimizer: a gradient for `{}`, which is not a known parameter", name));
            };
            if frozen(param_info) {
                continue;
            }
            let Some(param) = params.get(name) else {
                return Err(format!("optimizer: parameter `{}` has a gradient but no value", name));
            };
            self.check_gradient(name, param, grad)?;
            plan.push(PlannedUpdate { name, embedding: param_info.embedding, grad });
        }
        plan.sort_by(|a, b| a.name.cmp(b.name));

        let coeffs = self.advance(lr_scale)?;
        for update in plan {
            let Some(param) = params.get_mut(update.name) else { continue };
            self.apply(update.name, param, update.grad, &coeffs.of(update.name, update.embedding), kernels);
        }
        Ok(())
    }

    /// Starts step number `step_count() + 1` and returns its coefficients, for a caller
    /// that carries out the updates itself (a device backend, or [`Optimizer::apply`] per
    /// parameter). The caller has checked every gradient first ([`Optimizer::check_gradient`]),
    /// as [`Optimizer::step`] does, so that a bad one changes nothing.
    pub fn advance<'a>(&mut self, lr_scale: &'a LrScale) -> Result<StepCoeffSet<'a>, String> {
        lr_scale.check()?;
        self.steps += 1;
        Ok(StepCoeffSet { config: self.config.clone(), step: self.steps, scale: lr_scale })
    }

    /// Updates one parameter with its checked gradient and this step's `coeffs` (from
    /// [`Optimizer::advance`]), its state created fresh on first use, through `kernels`.
    pub fn apply(
        &mut self,
        name: &str,
        param: &mut Tensor<T>,
        grad: &Value<T>,
        coeffs: &StepCoeffs<T>,
        kernels: &dyn UpdateKernels<T>,
    ) {
        if !self.slots.contains_key(name) {
            if let Some(fresh) = Slots::fresh(&self.config.kind, &param.shape) {
                self.slots.insert(name.to_string(), fresh);
            }
        }
        kernels.apply(&mut param.data, slots_mut(self.slots.get_mut(name)), grad, coeffs);
    }

    /// Whether parameter `name` has state yet (SGD keeps none).
    pub fn has_state(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// The state tensors of parameter `name` in the parameter's `shape` (Adam: `m`, `v`;
    /// Adagrad: the accumulator; SGD: none), created fresh when it has none or has state of
    /// another shape: for a backend that keeps the state elsewhere during training and
    /// copies it back here.
    pub fn state_of_mut(&mut self, name: &str, shape: &[usize]) -> Vec<&mut Tensor<T>> {
        if self.slots.get(name).is_none_or(|s| s.shape() != shape) {
            match Slots::fresh(&self.config.kind, shape) {
                Some(fresh) => self.slots.insert(name.to_string(), fresh),
                None => return Vec::new(),
            };
        }
        match self.slots.get_mut(name) {
            Some(Slots::Adam { m, v }) => vec![m, v],
            Some(Slots::Adagrad { accum }) => vec![accum],
            None => Vec::new(),
        }
    }

    /// The checks [`Optimizer::step`] makes of one parameter's gradient (shape, kind, rows
    /// inside the table) and of its state's shape.
    pub fn check_gradient(&self, name: &str, param: &Tensor<T>, grad: &Value<T>) -> Result<(), String> {
        if param.shape.iter().product::<usize>() != param.data.len() {
            return Err(format!(
                "optimizer: parameter `{}` has shape {:?} but {} values",
                name,
                param.shape,
                param.data.len()
            ));
        }
        match grad {
            Value::Dense(g) => {
                if g.shape != param.shape || g.data.len() != param.data.len() {
                    return Err(format!(
                        "optimizer: the gradient of `{}` has shape {:?} ({} values) but the parameter has shape {:?}",
                        name,
                        g.shape,
                        g.data.len(),
                        param.shape
                    ));
                }
            }
            Value::Ids(_) => return Err(format!("optimizer: the gradient of `{}` is ids, not numbers", name)),
            Value::RowSparse { shape, rows, values } => {
                if *shape != param.shape || shape.is_empty() {
                    return Err(format!(
                        "optimizer: the row-sparse gradient of `{}` is for a table of shape {:?} but the parameter has shape {:?}",
                        name, shape, param.shape
                    ));
                }
                let width = row_width(shape);
                if values.data.len() != rows.len() * width {
                    return Err(format!(
                        "optimizer: the row-sparse gradient of `{}` has {} rows of width {} but {} values",
                        name,
                        rows.len(),
                        width,
                        values.data.len()
                    ));
                }
                let table_rows = shape[0];
                if let Some(&bad) = rows.iter().find(|&&r| r as usize >= table_rows) {
                    return Err(format!(
                        "optimizer: the row-sparse gradient of `{}` names row {} of a table with {} rows",
                        name, bad, table_rows
                    ));
                }
            }
        }
        if let Some(slots) = self.slots.get(name) {
            if slots.shape() != param.shape.as_slice() {
                return Err(format!(
                    "optimizer: the state of `{}` has shape {:?} but the parameter has shape {:?}",
                    name,
                    slots.shape(),
                    param.shape
                ));
            }
        }
        Ok(())
    }

    /// The state as named tensors, sorted by name (see the module doc for the names).
    pub fn state(&self) -> Vec<(String, Tensor<T>)> {
        self.state_views().into_iter().map(|(n, t)| (n, t.into_owned())).collect()
    }

    /// [`Optimizer::state`] without copying the slots: the step counter is made, the
    /// moments are borrowed. A checkpoint is written from these, so that saving Adam's
    /// state of a 68M-value model does not first copy its 0.54 GB.
    pub fn state_views(&self) -> Vec<(String, Cow<'_, Tensor<T>>)> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        let mut digits = Vec::with_capacity(STEP_DIGITS);
        for i in 0..STEP_DIGITS {
            digits.push(T::from_f64(((self.steps >> (16 * i)) & 0xffff) as f64));
        }
        out.push((STEP_STATE_NAME.to_string(), Cow::Owned(Tensor { shape: vec![STEP_DIGITS], data: digits })));
        for (name, slots) in &self.slots {
            match slots {
                Slots::Adam { m, v } => {
                    out.push((format!("{}{}", ADAM_M_PREFIX, name), Cow::Borrowed(m)));
                    out.push((format!("{}{}", ADAM_V_PREFIX, name), Cow::Borrowed(v)));
                }
                Slots::Adagrad { accum } => {
                    out.push((format!("{}{}", ADAGRAD_ACCUM_PREFIX, name), Cow::Borrowed(accum)))
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Replaces the state with one exported by [`Optimizer::state`] of an optimizer of the
    /// same kind. Fails, changing nothing, on a missing or malformed `optim.step`, a name of
    /// another kind or unknown, a duplicate, a tensor whose shape disagrees with its data,
    /// or an Adam parameter with only one of its moments or moments of different shapes.
    pub fn load_state(&mut self, named: Vec<(String, Tensor<T>)>) -> Result<(), String> {
        let kind = self.config.kind.name();
        let mut steps = None;
        let mut first_moments: HashMap<String, Tensor<T>> = HashMap::new();
        let mut second_moments: HashMap<String, Tensor<T>> = HashMap::new();
        let mut slots: HashMap<String, Slots<T>> = HashMap::new();
        for (name, tensor) in named {
            if tensor.shape.iter().product::<usize>() != tensor.data.len() {
                return Err(format!(
                    "optimizer state `{}` has shape {:?} but {} values",
                    name,
                    tensor.shape,
                    tensor.data.len()
                ));
            }
            let duplicate = if name == STEP_STATE_NAME {
                steps.replace(decode_step(&tensor)?).is_some()
            } else if let (true, Some(param)) = (kind == "adam", name.strip_prefix(ADAM_M_PREFIX)) {
                first_moments.insert(param.to_string(), tensor).is_some()
            } else if let (true, Some(param)) = (kind == "adam", name.strip_prefix(ADAM_V_PREFIX)) {
                second_moments.insert(param.to_string(), tensor).is_some()
            } else if let (true, Some(param)) = (kind == "adagrad", name.strip_prefix(ADAGRAD_ACCUM_PREFIX)) {
                slots.insert(param.to_string(), Slots::Adagrad { accum: tensor }).is_some()
            } else {
                return Err(format!("optimizer state `{}` does not belong to a {} optimizer", name, kind));
            };
            if duplicate {
                return Err(format!("optimizer state `{}` appears twice", name));
            }
        }
        let Some(steps) = steps else {
            return Err(format!("optimizer state has no `{}`", STEP_STATE_NAME));
        };
        for (param, m) in first_moments {
            let Some(v) = second_moments.remove(&param) else {
                return Err(format!(
                    "optimizer state has `{}{}` but no `{}{}`",
                    ADAM_M_PREFIX, param, ADAM_V_PREFIX, param
                ));
            };
            if m.shape != v.shape {
                return Err(format!(
                    "optimizer state of `{}`: the moments have shapes {:?} and {:?}",
                    param, m.shape, v.shape
                ));
            }
            slots.insert(param, Slots::Adam { m, v });
        }
        if let Some(param) = second_moments.keys().min() {
            return Err(format!(
                "optimizer state has `{}{}` but no `{}{}`",
                ADAM_V_PREFIX, param, ADAM_M_PREFIX, param
            ));
        }
        self.steps = steps;
        self.slots = slots;
        Ok(())
    }
}

/// The global step from its base-2¹⁶ digits ([`STEP_STATE_NAME`]).
fn decode_step<T: Float>(tensor: &Tensor<T>) -> Result<u64, String> {
    if tensor.shape != [STEP_DIGITS] {
        return Err(format!(
            "optimizer state `{}` has shape {:?}, expected [{}]",
            STEP_STATE_NAME, tensor.shape, STEP_DIGITS
        ));
    }
    let mut steps = 0u64;
    for (i, digit) in tensor.data.iter().enumerate() {
        let d = digit.to_f64();
        if !(d.fract() == 0.0 && (0.0..65536.0).contains(&d)) {
            return Err(format!("optimizer state `{}` holds {}, not a base-65536 digit", STEP_STATE_NAME, d));
        }
        steps |= (d as u64) << (16 * i);
    }
    Ok(steps)
}
