//! The training loop as a run object: [`Run`] holds what a run works on (the session, the
//! executor, the train and valid splits) and its state (parameters, optimizer, the loop's
//! position, the curve, timings). Its methods are the loop's parts: [`Run::step`] trains
//! on one batch, [`Run::evaluate`] validates and keeps the best checkpoint and early
//! stopping, [`Run::checkpoint`] writes `last.ckpt`; [`Run::fit`] drives them over the
//! experiment's stages and epochs, and [`Run::finish`] tests the best parameters (the
//! `best.ckpt` this run wrote, else the last ones) and writes
//! the run's figures. The loop lives here, outside the backends: an executor only runs
//! the training step it is given.
//!
//! A run is data-parallel when its [`Group`] has several ranks (`mpirun -n N mdl run`):
//! every rank runs this loop over the same global batches; each trains on its share of
//! every batch and the ranks combine their gradients before the update
//! ([`crate::dist::exchange`]), evaluate their shares of each split and merge the outputs
//! ([`Session::evaluate_in`]), and compare the fingerprints of their parameters at the end of
//! every epoch. Rank 0 alone writes the run folder (checkpoints, log, figures); the
//! checkpoints the loop reads back it reads and hands to the others. A group of one runs
//! the loop exactly as a plain process.

use super::checkpoint;
use super::folder::{RunFolder, Trust};
use super::progress::Progress;
use super::stages::{frozen_by, Schedule};
use super::{optim_config, skipped_rows, RunMetrics, RunTiming, Session};
use crate::analysis::gradients::{self, GradientRecord, StepCosine, StepNorms};
use crate::data::{Batch, MiniBatches, Splits};
use crate::dist::exchange::{self, ExchangeTimes};
use crate::dist::{self, Group};
use crate::experiment::{EarlyStopping, Experiment};
use mdl_runtime::backend::Executor;
use mdl_runtime::exec::Mode;
use mdl_runtime::optim::Optimizer;
use mdl_runtime::tensor::{Tensor, Value};
use mdl_runtime::training::{self, TrainStep};
use mdl_runtime::{Graph, ParamInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One row of `curve.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: u64,
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_auc: Option<f64>,
    pub valid_gauc: Option<f64>,
    pub valid_logloss: Option<f64>,
    /// The stage it was taken in (only for an experiment that declares stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<usize>,
    /// The first task's other metrics (`rmse`, `hr@10`, ...: a kind other than binary), a
    /// column each after the others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub valid_more: BTreeMap<String, f64>,
}

/// How a declared stage ended (`metrics.json`'s `stages`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub name: String,
    /// Its steps, and the step its best evaluation was taken at (whose parameters the
    /// next stage started from).
    pub steps: u64,
    pub best_step: u64,
    /// Its early-stopping metric, and that metric's best value in the stage.
    pub metric: String,
    pub best: Option<f64>,
    pub stopped_early: bool,
}

/// One row of `curve_tasks.csv`: a valid metric of one task (overall, or within one domain)
/// at one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskCurvePoint {
    pub step: u64,
    pub epoch: usize,
    pub task: String,
    /// The domain id (as in `metrics.json`'s `per_domain`), or none for the whole split.
    pub domain: Option<u32>,
    pub metric: String,
    pub value: f64,
}

impl TaskCurvePoint {
    /// The rows of one evaluation's report: every task's AUC, gAUC and LogLoss, and its AUC
    /// and LogLoss within each domain; undefined metrics are left out.
    fn rows(step: u64, epoch: usize, report: &crate::metrics::Report) -> Vec<TaskCurvePoint> {
        let mut rows = Vec::new();
        let mut push = |task: &str, domain: Option<u32>, metric: &str, value: Option<f64>| {
            if let Some(value) = value {
                rows.push(TaskCurvePoint { step, epoch, task: task.to_string(), domain, metric: metric.into(), value });
            }
        };
        for (task, m) in &report.per_task {
            push(task, None, "auc", m.auc);
            push(task, None, "gauc", m.gauc);
            push(task, None, "logloss", m.logloss);
            for (name, &v) in &m.more {
                push(task, None, name, Some(v));
            }
            for (&d, dm) in &m.per_domain {
                push(task, Some(d), "auc", dm.auc);
                push(task, Some(d), "logloss", dm.logloss);
                for (name, &v) in &dm.more {
                    push(task, Some(d), name, Some(v));
                }
            }
        }
        rows
    }
}

/// Where the loop is; saved in `last.ckpt` for `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub stage: usize,
    pub epoch_in_stage: usize,
    /// Epochs finished over all stages (it also seeds the shuffle of the next epoch).
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub step: u64,
    pub best: Option<f64>,
    pub best_step: u64,
    pub bad_evals: usize,
    pub stopped_early: bool,
    pub loss_sum: f64,
    pub loss_count: u64,
    pub curve: Vec<CurvePoint>,
    /// Every task's valid metrics at each evaluation (`curve_tasks.csv`; empty in
    /// checkpoints of an mdl before it).
    #[serde(default)]
    pub task_curve: Vec<TaskCurvePoint>,
    /// The training loss of every step, step `i + 1` at index `i` (`loss.csv`; empty in
    /// checkpoints of an mdl before it).
    #[serde(default)]
    pub losses: Vec<f32>,
    /// Where each epoch's steps begin in `losses`: `(epoch, index of its first step)`, an
    /// entry per epoch that has steps. Epochs are not a fixed number of steps: a stage ends
    /// one early or trains on a subset of the rows.
    #[serde(default)]
    pub loss_epochs: Vec<(usize, usize)>,
    /// Steps taken in the stage under way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stage_steps: u64,
    /// The declared stages done so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageResult>,
    /// The gradient norms and cosines recorded (`train.record_grad_norms`,
    /// `train.grad_cosine`).
    #[serde(default, skip_serializing_if = "GradientRecord::is_empty")]
    pub gradients: GradientRecord,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl LoopState {
    fn new() -> LoopState {
        LoopState {
            stage: 0,
            epoch_in_stage: 0,
            epoch: 0,
            batch_in_epoch: 0,
            step: 0,
            best: None,
            best_step: 0,
            bad_evals: 0,
            stopped_early: false,
            loss_sum: 0.0,
            loss_count: 0,
            curve: Vec::new(),
            task_curve: Vec::new(),
            losses: Vec::new(),
            loss_epochs: Vec::new(),
            stage_steps: 0,
            stages: Vec::new(),
            gradients: GradientRecord::default(),
        }
    }

    /// The epoch under way is done: the next one starts at its first batch.
    fn end_epoch(&mut self) {
        self.batch_in_epoch = 0;
        self.epoch_in_stage += 1;
        self.epoch += 1;
    }

    /// The mean training loss since the last evaluation, which starts the next mean.
    fn take_train_loss(&mut self) -> f64 {
        let mean = if self.loss_count > 0 { self.loss_sum / self.loss_count as f64 } else { f64::NAN };
        self.loss_sum = 0.0;
        self.loss_count = 0;
        mean
    }
}

/// How [`Run::fit`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopEnd {
    /// Every stage trained, or `max_steps` or early stopping ended the run: it can finish.
    Finished,
    /// `--stop-after` stopped it, as if interrupted: `--resume` continues it.
    StoppedAsAsked,
}

/// How a stage ended, for [`Run::fit`].
enum StageEnd {
    /// All its epochs (or steps) trained: on to the next stage.
    Done,
    /// Its early stopping ended it: on to the next stage, if there is one.
    StoppedEarly,
    /// `max_steps` reached: no further stage.
    RunOver,
    StoppedAsAsked,
}

/// How [`Run::start`] begins.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// Fresh parameters.
    Fresh,
    /// From the folder's `last.ckpt` when there is one; a checkpoint of another run (by
    /// its run id) is refused unless the trust is `--force`.
    Resume(Trust),
}

/// A training run in progress (see the module doc).
pub struct Run<'a> {
    exp: &'a Experiment,
    session: &'a Session,
    exec: &'a mut dyn Executor,
    data: Splits<'a>,
    params: HashMap<String, Tensor<f32>>,
    optimizer: Optimizer<f32>,
    state: LoopState,
    /// The run folder, its run id and its log.
    out: PathBuf,
    run_id: String,
    /// Whether checkpoints of another run are refused (`--force` accepts them).
    trust: Trust,
    log: Progress,
    best_path: PathBuf,
    last_path: PathBuf,
    batch: Batch,
    /// Steps over all stages (for the progress line): `max_steps`, else every epoch's.
    total_steps: u64,
    /// Trainable scalars (all parameter tensors' elements).
    parameters: usize,
    /// When the loop started.
    loop_started: Instant,
    /// Steps, rows and seconds in training steps (forward, backward, update) in this
    /// process; evaluations and checkpoints are not counted.
    steps_here: u64,
    rows_here: usize,
    step_secs: f64,
    /// The divergence guard.
    health: super::health::Health,
    /// The stages, resolved against the spec and the data.
    schedule: Schedule,
    /// The ranks of a data-parallel run ([`dist::Solo`] for a plain one).
    group: &'a dyn Group,
    /// Time spent exchanging gradients with the other ranks.
    exchange_times: ExchangeTimes,
    /// For `train.grad_cosine`: the training graphs of its two losses, each with the
    /// gradient of its parameter only.
    cosine_graphs: Option<[Graph; 2]>,
}

impl<'a> Run<'a> {
    /// Starts a run in the folder `out` of the run `run_id` (logging to `log`) on the train
    /// and valid splits of `data`, as a rank of `group`: fresh parameters, or when resuming
    /// the parameters, optimizer state and loop position of the folder's `last.ckpt` when
    /// there is one (and it is this run's).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        exp: &'a Experiment,
        session: &'a Session,
        exec: &'a mut dyn Executor,
        data: Splits<'a>,
        (out, run_id): (&Path, &str),
        group: &'a dyn Group,
        mut log: Progress,
        start: Start,
    ) -> Result<Run<'a>, String> {
        let run_id = run_id.to_string();
        if group.size() > 1 && exec.device_training().is_some() {
            return Err(format!(
                "backend {} keeps its training on a device, which data-parallel training (mpirun with {} ranks) does not combine yet: use the jit or interp backend",
                exp.backend,
                group.size()
            ));
        }
        let t = &exp.train;
        if (t.record_grad_norms || t.grad_cosine.is_some()) && exec.device_training().is_some() {
            let key = if t.record_grad_norms { "train.record_grad_norms" } else { "train.grad_cosine" };
            return Err(format!(
                "{key}: backend {} keeps the gradients on its device, where they are not recorded yet: use the jit or interp backend",
                exp.backend
            ));
        }
        if t.grad_cosine.is_some() && group.size() > 1 {
            return Err(format!(
                "train.grad_cosine: a data-parallel run ({} ranks) sees a share of each batch per rank; record the cosine in a run of one process",
                group.size()
            ));
        }
        let cosine_graphs = match &t.grad_cosine {
            Some(c) => {
                let wrt = std::slice::from_ref(&c.param);
                let graph = |name: &String| match c.compared().0 {
                    "paths" => super::stages::path_gradients(&session.compiled, name, wrt),
                    _ => super::stages::objective_gradients(&session.compiled, std::slice::from_ref(name), wrt),
                };
                let names = c.compared().1;
                Some([graph(&names[0])?, graph(&names[1])?])
            }
            None => None,
        };
        let (resume, trust) = match start {
            Start::Fresh => (false, Trust { force: false }),
            Start::Resume(trust) => (true, trust),
        };
        let mut optimizer = Optimizer::<f32>::new(optim_config(exp))?;
        let last_path = out.join("last.ckpt");
        let batches = MiniBatches::new(data.train.rows, exp.train.batch_size, exp.train.seed);
        let last = if resume { read_checkpoint(group, &last_path, session)? } else { None };
        let (params, mut state) = if let Some(last) = last {
            trust.checkpoint_id(&last_path, last.run_id.as_deref(), &run_id)?;
            optimizer.load_state(last.optimizer)?;
            if last.state.batch_in_epoch >= batches.batches_per_epoch() {
                return Err(format!(
                    "{}: the run stopped {} batches into an epoch, which has {} at train.batch_size {}: resume with the batch size it trained with",
                    last_path.display(),
                    last.state.batch_in_epoch,
                    batches.batches_per_epoch(),
                    exp.train.batch_size
                ));
            }
            log.line(&format!("resumed from {} at step {}", last_path.display(), last.state.step));
            (last.params, last.state)
        } else {
            if resume {
                log.line("no checkpoint to resume from; starting fresh");
            }
            let mut params = session.initial_tensors(exp.train.seed)?;
            for line in super::stages::warm_start(exp, &session.compiled, &mut params)? {
                log.line(&line);
            }
            (params, LoopState::new())
        };
        if t.record_grad_norms && state.gradients.groups.is_empty() {
            state.gradients.groups = gradients::group_names(session.params());
        }
        let parameters: usize = session.params().iter().filter_map(|p| params.get(&p.name)).map(|t| t.data.len()).sum();
        log.line(&format!("{parameters} parameters"));
        let schedule = Schedule::new(exp, session, data.train)?;
        let bs = exp.train.batch_size.max(1);
        let stage_steps = |p: &super::stages::Planned| match (p.stage.steps, p.stage.epochs) {
            (Some(n), _) => n,
            (None, e) => (e.unwrap_or(0) * p.rows.as_ref().map_or(data.train.rows, Vec::len).div_ceil(bs)) as u64,
        };
        let total_steps = exp.train.max_steps.unwrap_or(schedule.stages.iter().map(stage_steps).sum());
        Ok(Run {
            exp,
            session,
            exec,
            data,
            params,
            optimizer,
            state,
            out: out.to_path_buf(),
            run_id,
            trust,
            log,
            best_path: out.join("best.ckpt"),
            last_path,
            batch: data.train.new_batch(),
            total_steps,
            parameters,
            loop_started: Instant::now(),
            steps_here: 0,
            rows_here: 0,
            step_secs: 0.0,
            health: Default::default(),
            schedule,
            group,
            exchange_times: ExchangeTimes::default(),
            cosine_graphs,
        })
    }

    /// Trains the experiment's stages from where the run is, evaluating at the cadence of
    /// `train.eval_every` and writing `last.ckpt` at each evaluation and the end of each
    /// epoch and stage, until every stage is done, `train.max_steps`, early stopping, or
    /// `stop_after` steps in this process.
    pub fn fit(&mut self, stop_after: Option<u64>) -> Result<LoopEnd, String> {
        let stages = self.schedule.stages.len();
        let eval_every = self.exp.train.eval_every.steps()?;
        while self.state.stage < stages {
            let last = self.state.stage + 1 == stages;
            match self.fit_stage(self.state.stage, eval_every, stop_after)? {
                StageEnd::Done | StageEnd::StoppedEarly if !last => self.next_stage()?,
                StageEnd::Done => {
                    self.state.stage += 1;
                    self.state.epoch_in_stage = 0;
                    self.checkpoint()?;
                }
                StageEnd::StoppedEarly | StageEnd::RunOver => break,
                StageEnd::StoppedAsAsked => return Ok(LoopEnd::StoppedAsAsked),
            }
        }
        // A final evaluation when the last steps were not evaluated (max_steps, eval cadence).
        if self.state.curve.last().map(|c| c.step) != Some(self.state.step) && self.state.step > 0 {
            self.evaluate()?;
            self.checkpoint()?;
        }
        self.record_stage(self.state.stage.min(stages - 1));
        // The device's parameters back on the host before other tensors (the best ones) run.
        self.sync()?;
        Ok(LoopEnd::Finished)
    }

    /// The rest of stage `i`: at its start (nothing of it trained yet) its copies, its
    /// optimizer reset and its log line; then its remaining epochs (or steps), each from the
    /// batch the run is at, over the train rows it reads.
    fn fit_stage(&mut self, i: usize, eval_every: Option<u64>, stop_after: Option<u64>) -> Result<StageEnd, String> {
        if self.state.stopped_early {
            // Resumed from the checkpoint of the evaluation that stopped the stage.
            return Ok(StageEnd::StoppedEarly);
        }
        let stage = self.schedule.stages[i].stage.clone();
        let rows = self.schedule.stages[i].rows.clone();
        let frozen = frozen_by(&stage);
        if self.state.epoch_in_stage == 0 && self.state.batch_in_epoch == 0 && self.state.stage_steps == 0 {
            if self.schedule.declared || !self.exp.train.group_lr.is_empty() {
                let line = self.schedule.describe(i, self.exp, self.data.train.rows);
                self.log.line(&line);
            }
            if !stage.copy.is_empty() {
                self.sync()?;
                for line in self.schedule.copy_into(i, &mut self.params)? {
                    self.log.line(&format!("stage `{}`: {line}", stage.name));
                }
            }
            if stage.reset_optimizer {
                self.optimizer.reset();
            }
        }
        let mut batches = MiniBatches::new(
            rows.as_ref().map_or(self.data.train.rows, Vec::len),
            self.exp.train.batch_size,
            self.exp.train.seed,
        );
        while stage.epochs.is_none_or(|e| self.state.epoch_in_stage < e) {
            let order: Vec<Vec<usize>> = batches
                .epoch(self.state.epoch as u64)
                .map(|c| match &rows {
                    Some(rows) => c.iter().map(|&r| rows[r]).collect(),
                    None => c.to_vec(),
                })
                .collect();
            if self.state.batch_in_epoch > order.len() {
                return Err(format!(
                    "the run stopped {} batches into an epoch of stage `{}`, which has {}",
                    self.state.batch_in_epoch,
                    stage.name,
                    order.len()
                ));
            }
            for rows in &order[self.state.batch_in_epoch..] {
                if self.exp.train.max_steps.is_some_and(|m| self.state.step >= m) {
                    return Ok(StageEnd::RunOver);
                }
                self.step(rows, &frozen)?;
                self.state.stage_steps += 1;
                let stage_done = stage.steps.is_some_and(|n| self.state.stage_steps >= n);
                // A stage that ends mid-epoch ends the epoch: the next one starts afresh.
                let end_of_epoch = self.state.batch_in_epoch == order.len() || stage_done;
                if end_of_epoch {
                    self.state.end_epoch();
                    self.check_ranks_agree()?;
                }
                let due = match eval_every {
                    Some(n) => self.state.step.is_multiple_of(n),
                    None => end_of_epoch,
                };
                if due {
                    self.evaluate()?;
                }
                if due || end_of_epoch {
                    self.checkpoint()?;
                }
                if self.state.stopped_early {
                    return Ok(StageEnd::StoppedEarly);
                }
                if stop_after.is_some_and(|n| self.steps_here >= n) {
                    self.log.line(&format!("stopping after {} steps as asked (resume with --resume)", self.steps_here));
                    return Ok(StageEnd::StoppedAsAsked);
                }
                if stage_done {
                    return Ok(StageEnd::Done);
                }
            }
        }
        Ok(StageEnd::Done)
    }

    /// Ends a stage that another follows: its last steps evaluated (when they were not),
    /// its result recorded, its best parameters restored (`best.ckpt`, written at its best
    /// evaluation), and the next stage's early stopping started afresh; then `last.ckpt`.
    fn next_stage(&mut self) -> Result<(), String> {
        if self.state.curve.last().map(|c| c.step) != Some(self.state.step) && self.state.step > 0 {
            self.evaluate()?;
        }
        let i = self.state.stage;
        self.record_stage(i);
        if self.state.best.is_some() {
            self.sync()?;
            let best = self.read_best()?;
            self.trust.checkpoint_id(&self.best_path, best.run_id.as_deref(), &self.run_id)?;
            // New tensors: a device backend uploads them whole.
            self.params = best.params;
            self.log.line(&format!(
                "stage `{}` ends at step {}: its best parameters (step {}, valid {} {}) go on",
                self.schedule.stages[i].stage.name,
                self.state.step,
                self.state.best_step,
                self.schedule.stages[i].early_stopping.metric,
                fmt_opt(self.state.best)
            ));
        }
        let state = &mut self.state;
        state.stage += 1;
        state.epoch_in_stage = 0;
        state.stage_steps = 0;
        state.best = None;
        state.bad_evals = 0;
        state.stopped_early = false;
        self.checkpoint()
    }

    /// Records how declared stage `i` ended (once).
    fn record_stage(&mut self, i: usize) {
        if !self.schedule.declared || self.state.stages.len() != i {
            return;
        }
        let planned = &self.schedule.stages[i];
        let result = StageResult {
            name: planned.stage.name.clone(),
            steps: self.state.stage_steps,
            best_step: self.state.best_step,
            metric: planned.early_stopping.metric.clone(),
            best: self.state.best,
            stopped_early: self.state.stopped_early,
        };
        self.state.stages.push(result);
    }

    /// The early stopping of the stage under way.
    fn early_stopping(&self) -> EarlyStopping {
        let i = self.state.stage.min(self.schedule.stages.len() - 1);
        self.schedule.stages[i].early_stopping.clone()
    }

    /// One training step on the train rows `rows`, with the parameters `frozen` says
    /// untouched; returns its loss. A loss that is not finite ends the run with an error.
    pub fn step(&mut self, rows: &[usize], frozen: &dyn Fn(&ParamInfo) -> bool) -> Result<f64, String> {
        let started = Instant::now();
        if self.steps_here == 0 {
            self.log.line(&format!("first batch starts {:.2}s after launch", self.log.elapsed_secs()));
        }
        // A rank of a data-parallel run trains on its share of the batch's rows.
        let (ranks, rank) = (self.group.size(), self.group.rank());
        let shard = if ranks == 1 { rows } else { &rows[dist::share(rows.len(), ranks, rank)] };
        self.data.train.gather(shard, &mut self.batch).map_err(|e| e.to_string())?;
        let feeds = self.session.inputs.feeds(&self.batch);
        let binding = self.session.inputs.with_batch(self.batch.rows);
        let stage = self.state.stage.min(self.schedule.stages.len() - 1);
        let mode = Mode::train(rank_seed(self.exp.train.seed, rank), self.state.step)
            .in_epoch(self.state.epoch as u64)
            .in_stage(stage as u64);
        let step = TrainStep {
            graph: self.schedule.graph(stage, self.session),
            binding: &binding,
            feeds: &feeds,
            mode: &mode,
            info: self.session.params(),
            frozen,
            clip_norm: self.exp.train.clip_norm,
            lr_scale: &self.schedule.stages[stage].lr_scale,
        };
        let (number, epoch) = (self.state.step + 1, self.state.epoch + 1);
        let mut cosine = None;
        if let (Some(graphs), Some(c)) = (&self.cosine_graphs, &self.exp.train.grad_cosine) {
            if number.is_multiple_of(c.every) {
                let mut grad = |g: &Graph| -> Result<Option<Value<f32>>, String> {
                    let mut out = self.exec.run(g, &binding, &feeds, &self.params, &mode).map_err(|e| e.to_string())?;
                    Ok(out.take_output(&format!("grad/{}", c.param)))
                };
                let (a, b) = (grad(&graphs[0])?, grad(&graphs[1])?);
                let zero = || Value::Dense(Tensor::zeros(vec![1]));
                let (na, nb, cos) = gradients::cosine(&a.unwrap_or_else(zero), &b.unwrap_or_else(zero));
                let (norm_a, norm_b, cosine_ab) = (na as f32, nb as f32, cos.map(|c| c as f32));
                cosine = Some(StepCosine { step: number, epoch, norm_a, norm_b, cosine: cosine_ab });
            }
        }
        let record = self.exp.train.record_grad_norms;
        let (loss, norms) = if ranks == 1 && !record {
            (training::train_step(&mut *self.exec, &step, &mut self.params, &mut self.optimizer)?.loss as f64, None)
        } else if ranks == 1 {
            // The host's step in its two halves (as `train_step` takes them), the gradients
            // measured in between.
            let computed = training::gradients(&mut *self.exec, &step, &self.params)?;
            let norms = gradients::group_norms(step.info, &computed.grads);
            let loss = computed.loss as f64;
            training::apply_gradients(&mut *self.exec, &step, &mut self.params, &mut self.optimizer, computed)?;
            (loss, Some(norms))
        } else {
            let weight = shard.len() as f64 / rows.len() as f64;
            let (exec, times) = (&mut *self.exec, &mut self.exchange_times);
            let (loss, norms) = data_parallel_step(
                self.group,
                exec,
                &step,
                &mut self.params,
                &mut self.optimizer,
                times,
                weight,
                record,
            )?;
            (loss as f64, norms)
        };
        if !loss.is_finite() {
            // The step updated nothing: its parameters are the ones that gave this loss.
            self.sync()?;
            let cause = (!shard.is_empty())
                .then(|| super::health::first_non_finite(self.session, &binding, &feeds, &self.params, &mode))
                .flatten()
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            return Err(format!(
                "the loss became {loss} at step {} (epoch {}){cause}; lower train.lr or set train.clip_norm",
                self.state.step + 1,
                self.state.epoch + 1
            ));
        }
        self.health.check_loss(loss, self.state.step + 1, self.exp.train.lr)?;
        self.state.step += 1;
        self.state.batch_in_epoch += 1;
        self.state.loss_sum += loss;
        self.state.loss_count += 1;
        if self.state.loss_epochs.last().map(|&(epoch, _)| epoch) != Some(self.state.epoch) {
            self.state.loss_epochs.push((self.state.epoch, self.state.losses.len()));
        }
        self.state.losses.push(loss as f32);
        if let Some(norms) = norms {
            self.state.gradients.norms.push(StepNorms { step: number, epoch, norms });
        }
        self.state.gradients.cosine.extend(cosine);
        self.steps_here += 1;
        self.rows_here += rows.len();
        self.step_secs += started.elapsed().as_secs_f64();
        let rate = self.rows_here as f64 / self.step_secs.max(1e-9);
        self.log.progress(self.state.step, self.total_steps, self.state.epoch + 1, loss, rate);
        Ok(loss)
    }

    /// Validates the current parameters: a point of the curve (with the mean train loss
    /// since the last one), `best.ckpt` when the early-stopping metric improved, early
    /// stopping after `patience` evaluations without improvement, and the log line.
    pub fn evaluate(&mut self) -> Result<(), String> {
        let (valid, batch_size) = (self.data.valid, self.exp.train.batch_size);
        let mut report = self.session.evaluate_in(self.group, &mut *self.exec, &self.params, valid, batch_size)?;
        let early = &self.early_stopping();
        if early.metric == crate::tasks::OBJECTIVE_METRIC {
            let objective = self.valid_objective()?;
            report.more.insert(early.metric.clone(), objective);
        }
        let stage = self.schedule.declared.then_some(self.state.stage.min(self.schedule.stages.len() - 1));
        let metric = report.metric(&early.metric);
        if metric.is_none() {
            return Err(super::health::undefined_metric(&early.metric, &report, &self.data.valid.source));
        }
        let state = &mut self.state;
        let train_loss = state.take_train_loss();
        state.curve.push(CurvePoint {
            step: state.step,
            epoch: state.epoch,
            train_loss,
            valid_auc: report.auc,
            valid_gauc: report.gauc,
            valid_logloss: report.logloss,
            stage,
            valid_more: report.more.clone(),
        });
        let rows = TaskCurvePoint::rows(state.step, state.epoch, &report);
        state.task_curve.extend(rows);
        let improved = match (metric, state.best) {
            (Some(m), Some(b)) => {
                if early.maximize()? {
                    m > b
                } else {
                    m < b
                }
            }
            (Some(_), None) => true,
            (None, _) => false,
        };
        if improved {
            state.best = metric;
            state.best_step = state.step;
            state.bad_evals = 0;
            // The checkpoint needs the parameters on the host.
            self.sync()?;
            if self.group.rank() == 0 {
                checkpoint::save(&self.best_path, &self.params, None, &self.state, &self.run_id)?;
            }
        } else {
            state.bad_evals += 1;
            if state.bad_evals >= early.patience {
                state.stopped_early = true;
            }
        }
        let state = &self.state;
        self.log.line(&format!(
            "step {} epoch {}: train loss {:.5}, valid auc {} gauc {} logloss {}{}{}",
            state.step,
            // The epoch the step belongs to, counted from 1 as the progress line counts it: an
            // evaluation at an epoch's end names that epoch, one mid-way the epoch under way.
            if state.batch_in_epoch == 0 { state.epoch } else { state.epoch + 1 },
            train_loss,
            fmt_opt(report.auc),
            fmt_opt(report.gauc),
            fmt_opt(report.logloss),
            more_text(&report.more),
            if improved {
                " (best)".to_string()
            } else if state.stopped_early {
                format!(" (no improvement in {} evaluations: stopping early)", state.bad_evals)
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The objective of the stage under way on the valid split, as evaluation computes it
    /// (running statistics, fixed draws): each batch's value weighted by its rows (every rank
    /// of a data-parallel run computes it over the whole split, so all of them agree).
    fn valid_objective(&mut self) -> Result<f64, String> {
        let i = self.state.stage.min(self.schedule.stages.len() - 1);
        let graph = self.schedule.stages[i].valid_objective.as_ref().ok_or("the stage has no valid objective")?;
        let valid = self.data.valid;
        let mut batch = valid.new_batch();
        let (mut sum, mut start) = (0.0f64, 0);
        while start < valid.rows {
            let end = (start + self.exp.train.batch_size.max(1)).min(valid.rows);
            valid.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
            let feeds = self.session.inputs.feeds(&batch);
            let binding = self.session.inputs.with_batch(batch.rows);
            let out = self.exec.run(graph, &binding, &feeds, &self.params, &Mode::eval()).map_err(|e| e.to_string())?;
            let loss = out.scalar("loss").ok_or("the valid objective has no scalar output `loss`")?;
            sum += loss as f64 * batch.rows as f64;
            start = end;
        }
        let objective = sum / valid.rows.max(1) as f64;
        if !objective.is_finite() {
            return Err(format!(
                "the valid objective (early-stopping metric `loss`) is {objective} at step {}",
                self.state.step
            ));
        }
        Ok(objective)
    }

    /// Writes `last.ckpt`: parameters, optimizer state and the loop's position, from which
    /// `--resume` continues.
    pub fn checkpoint(&mut self) -> Result<(), String> {
        self.sync()?;
        if self.group.rank() != 0 {
            return Ok(());
        }
        checkpoint::save(&self.last_path, &self.params, Some(&self.optimizer), &self.state, &self.run_id)
    }

    /// The run's `best.ckpt` (rank 0 reads it and hands it to the other ranks).
    fn read_best(&self) -> Result<checkpoint::Loaded, String> {
        read_checkpoint(self.group, &self.best_path, self.session)?.ok_or_else(|| {
            format!("{} is missing: the run's best parameters are not in the folder", self.best_path.display())
        })
    }

    /// At the end of an epoch of a data-parallel run: the fingerprints of every rank's
    /// parameters ([`exchange::params_hash`]) compared, an error when they differ, a log line
    /// when they do not.
    fn check_ranks_agree(&mut self) -> Result<(), String> {
        if self.group.size() == 1 {
            return Ok(());
        }
        self.sync()?;
        let mine = exchange::params_hash(&self.params);
        let all = self.group.all_gather_bytes(&mine.to_le_bytes())?;
        let hashes: Vec<u64> =
            all.values.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
        exchange::check_identical(&hashes, self.state.step, self.state.epoch)?;
        self.log.line(&format!(
            "step {} epoch {}: parameters identical on all {} ranks (fingerprint {mine:016x})",
            self.state.step,
            self.state.epoch,
            self.group.size()
        ));
        Ok(())
    }

    /// Brings the host's parameters and optimizer state up to date with the executor's.
    fn sync(&mut self) -> Result<(), String> {
        training::sync(&mut *self.exec, &mut self.params, &mut self.optimizer)
    }

    /// Evaluates valid and test with the best parameters (the `best.ckpt` this run wrote
    /// at its best step, else the last ones: never a file it did not write) and writes the
    /// run's figures into `folder`: `metrics.json`, `curve.csv`, `timing.json`, the closing
    /// lines of the log, and the manifest, which then says the run has finished.
    /// `compile_ms` and `plan_ms` are the times [`RunTiming`] reports.
    /// On a rank other than 0 of a data-parallel run, `folder` is `None`: it takes part in
    /// the evaluations and writes nothing.
    pub fn finish(mut self, folder: Option<&mut RunFolder>, compile_ms: f64, plan_ms: f64) -> Result<(), String> {
        self.log.finish();
        let train_secs = self.loop_started.elapsed().as_secs_f64();
        // Training is over (`last.ckpt` holds the optimizer's state): its moments go before
        // the best parameters are read, and the last parameters once they are, so that the
        // end of a run needs no more memory than its steps (on the 100× replica the
        // moments are 0.54 GB and each set of parameters 0.27 GB).
        self.optimizer.reset();
        let best = if self.state.best.is_some() {
            self.params = HashMap::new();
            let best = self.read_best()?;
            self.trust.checkpoint_id(&self.best_path, best.run_id.as_deref(), &self.run_id)?;
            if best.state.step != self.state.best_step {
                self.trust.problem(format!(
                    "{} holds the parameters of step {}, not those of the best step {}",
                    self.best_path.display(),
                    best.state.step,
                    self.state.best_step
                ))?;
            }
            best.params
        } else {
            std::mem::take(&mut self.params)
        };
        let bs = self.exp.train.batch_size;
        let valid = self.session.evaluate_in(self.group, &mut *self.exec, &best, self.data.valid, bs)?;
        let test = self.session.evaluate_in(self.group, &mut *self.exec, &best, self.data.test, bs)?;
        let Some(folder) = folder else { return Ok(()) };
        let out = &self.out;
        let state = &self.state;
        let metrics = RunMetrics {
            model: self.session.compiled.model.clone(),
            best_step: state.best_step,
            steps: state.step,
            epochs: state.epoch,
            stopped_early: state.stopped_early,
            parameters: self.parameters,
            valid,
            test,
            skipped_rows: skipped_rows(self.data),
            stages: state.stages.clone(),
        };
        let json = serde_json::to_string_pretty(&metrics).map_err(|e| e.to_string())?;
        folder.write("metrics.json", json.as_bytes())?;
        folder.write("curve.csv", curve_csv(&state.curve, &self.schedule).as_bytes())?;
        folder.write("curve_tasks.csv", task_curve_csv(&state.task_curve).as_bytes())?;
        folder.write("loss.csv", loss_csv(&state.losses, &state.loss_epochs).as_bytes())?;
        if self.exp.train.record_grad_norms {
            folder.write("grad_norms.csv", gradients::norms_csv(&state.gradients).as_bytes())?;
        }
        if let Some(c) = &self.exp.train.grad_cosine {
            let (of, names) = c.compared();
            folder.write("grad_cosine.csv", gradients::cosine_csv(&state.gradients, of, names, &c.param).as_bytes())?;
        }
        let rows_per_s = self.rows_here as f64 / self.step_secs.max(1e-9);
        let timing = RunTiming {
            backend: self.exp.backend.to_string(),
            device: self.exec.device_name(),
            compile_ms,
            plan_ms,
            train_rows: self.rows_here,
            step_secs: self.step_secs,
            train_rows_per_s: rows_per_s,
            eval_secs: train_secs - self.step_secs,
            total_secs: self.log.elapsed_secs(),
            data_parallel: (self.group.size() > 1).then(|| super::DataParallelTiming {
                ranks: self.group.size(),
                wait_ms_per_step: self.exchange_times.wait_secs * 1e3 / self.steps_here.max(1) as f64,
                all_reduce_ms_per_step: self.exchange_times.dense_secs * 1e3 / self.steps_here.max(1) as f64,
                sparse_exchange_ms_per_step: self.exchange_times.sparse_secs * 1e3 / self.steps_here.max(1) as f64,
            }),
        };
        let json = serde_json::to_string_pretty(&timing).map_err(|e| e.to_string())?;
        folder.write("timing.json", json.as_bytes())?;
        folder.manifest.finished = true;
        folder.save_manifest()?;
        self.log.line(&format!(
            "test: auc {} gauc {} logloss {}{} (best step {} of {}, {})",
            fmt_opt(metrics.test.auc),
            fmt_opt(metrics.test.gauc),
            fmt_opt(metrics.test.logloss),
            more_text(&metrics.test.more),
            state.best_step,
            state.step,
            epochs_trained(state.epoch, state.batch_in_epoch)
        ));
        self.log.line(&format!(
            "training {:.1}s: steps {:.1}s ({:.0} train rows/s), evaluation {:.1}s; total {:.1}s; run folder {}",
            train_secs,
            self.step_secs,
            rows_per_s,
            train_secs - self.step_secs,
            self.log.elapsed_secs(),
            out.display()
        ));
        if let Some(dp) = &timing.data_parallel {
            self.log.line(&format!(
                "data-parallel over {} ranks, per step (in the step time above): waiting for the slowest rank {:.2} ms, all-reduce {:.2} ms, sparse exchange {:.2} ms",
                dp.ranks, dp.wait_ms_per_step, dp.all_reduce_ms_per_step, dp.sparse_exchange_ms_per_step
            ));
        }
        Ok(())
    }
}

/// The checkpoint at `path`, checked against the model, or `None` when there is none; in
/// a data-parallel run rank 0 reads it and hands its bytes to every rank (which need not
/// see rank 0's files).
fn read_checkpoint(group: &dyn Group, path: &Path, session: &Session) -> Result<Option<checkpoint::Loaded>, String> {
    if group.size() == 1 {
        return if path.exists() { checkpoint::load(path, session).map(Some) } else { Ok(None) };
    }
    let bytes = dist::bytes_from_leader(group, || match path.exists() {
        true => std::fs::read(path).map(Some).map_err(|e| format!("cannot read {}: {e}", path.display())),
        false => Ok(None),
    })?;
    bytes.map(|b| checkpoint::load_bytes(path, &b, session)).transpose()
}

/// One data-parallel training step on this rank's share of a global batch (`weight`: its
/// share of the rows): the graph's gradients, combined with every other rank's
/// ([`exchange::combine`]), then the update every rank applies alike. Returns the global
/// batch's loss.
#[allow(clippy::too_many_arguments)]
fn data_parallel_step(
    group: &dyn Group,
    exec: &mut dyn Executor,
    step: &TrainStep<'_>,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
    times: &mut ExchangeTimes,
    weight: f64,
    record_norms: bool,
) -> Result<(f32, Option<Vec<f32>>), String> {
    let local = if weight > 0.0 { Some(training::gradients(exec, step, params)?) } else { None };
    let names: Vec<&str> = step.info.iter().map(|p| p.name.as_str()).collect();
    let states: Vec<&str> = step.graph.states.iter().map(|s| s.name.as_str()).collect();
    let combined = exchange::combine(group, local, weight, &names, &states, params, times)?;
    let loss = combined.loss;
    // The norms of the combined gradients: every rank records the same ones.
    let norms = record_norms.then(|| gradients::group_norms(step.info, &combined.grads));
    training::apply_gradients(exec, step, params, optimizer, combined)?;
    Ok((loss, norms))
}

/// The seed of rank `rank`'s random draws (dropout masks): the run's seed on rank 0, an
/// independent stream on each other rank (their rows are other rows of the batch).
fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.5}")).unwrap_or_else(|| "-".into())
}

/// The first task's metrics beyond auc / gauc / logloss, for a log line (` rmse 0.12345`).
fn more_text(more: &BTreeMap<String, f64>) -> String {
    more.iter().map(|(name, v)| format!(" {name} {v:.5}")).collect()
}

/// `curve.csv`: a row per evaluation; a column per metric of the first task beyond auc,
/// gauc and logloss, and `valid_loss` when a stage stops early on `loss` (empty where a
/// point has no value); with declared stages, each row also
/// names its stage and the groups that trained and were frozen in it.
fn curve_csv(curve: &[CurvePoint], schedule: &Schedule) -> String {
    let mut s = String::from("step,epoch,train_loss,valid_auc,valid_gauc,valid_logloss");
    // Every point's: a stage that stops early on `loss` adds it to its own points only.
    let more: Vec<&String> =
        curve.iter().flat_map(|c| c.valid_more.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for name in &more {
        s.push_str(&format!(",valid_{name}"));
    }
    s.push_str(if schedule.declared { ",stage,trains,frozen\n" } else { "\n" });
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    for c in curve {
        s.push_str(&format!(
            "{},{},{:.6},{},{},{}",
            c.step,
            c.epoch,
            c.train_loss,
            f(c.valid_auc),
            f(c.valid_gauc),
            f(c.valid_logloss)
        ));
        for name in &more {
            s.push(',');
            s.push_str(&f(c.valid_more.get(*name).copied()));
        }
        s.push('\n');
        if let Some(planned) = c.stage.and_then(|i| schedule.stages.get(i)) {
            // `;` between groups keeps each list one CSV field.
            s.insert_str(
                s.len() - 1,
                &format!(",{},{},{}", planned.stage.name, planned.trains.join(";"), planned.frozen.join(";")),
            );
        }
    }
    s
}

/// `curve_tasks.csv`, long format: one row per evaluation, task, domain (empty for the whole
/// split) and metric. Values are written in full (the shortest text that reads back the
/// same `f64`).
fn task_curve_csv(rows: &[TaskCurvePoint]) -> String {
    let mut s = String::from("step,epoch,split,task,domain,metric,value\n");
    for r in rows {
        let domain = r.domain.map(|d| d.to_string()).unwrap_or_default();
        s.push_str(&format!("{},{},valid,{},{domain},{},{}\n", r.step, r.epoch, r.task, r.metric, r.value));
    }
    s
}

/// `loss.csv`: the training loss of every step, with the epoch (counted from 1) it belongs
/// to (`epochs` as [`LoopState::loss_epochs`]; without them, as in a run resumed from a
/// checkpoint that predates them, the first epoch).
fn loss_csv(losses: &[f32], epochs: &[(usize, usize)]) -> String {
    let mut s = String::from("step,epoch,loss\n");
    let mut at = 0;
    for (i, loss) in losses.iter().enumerate() {
        while epochs.get(at + 1).is_some_and(|&(_, first)| first <= i) {
            at += 1;
        }
        let epoch = epochs.get(at).map_or(0, |&(epoch, _)| epoch) + 1;
        s.push_str(&format!("{},{epoch},{loss}\n", i + 1));
    }
    s
}

/// How much training the final log line reports: whole epochs, and the steps of an epoch
/// that `train.max_steps` ended part way ("1 epoch", "0 epochs and 20 steps").
fn epochs_trained(epochs: usize, steps_into_next: usize) -> String {
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    match steps_into_next {
        0 => plural(epochs, "epoch"),
        steps => format!("{} and {}", plural(epochs, "epoch"), plural(steps, "step")),
    }
}

#[cfg(test)]
mod tests {
    use super::epochs_trained;

    #[test]
    fn the_final_line_counts_a_partial_epoch_in_steps() {
        assert_eq!(epochs_trained(4, 0), "4 epochs");
        assert_eq!(epochs_trained(1, 0), "1 epoch");
        assert_eq!(epochs_trained(0, 20), "0 epochs and 20 steps");
        assert_eq!(epochs_trained(2, 1), "2 epochs and 1 step");
    }
}
