//! Training and evaluation of a compiled model on prepared data: the main job.
//!
//! One [`Session`] holds everything a run needs: the compiled spec, its training graph
//! (forward + backward, optimised) and evaluation graph (logits only), the binding of data
//! arrays to graph inputs, the parameters and the optimizer. [`train`] runs the stages of
//! an experiment with shuffled mini-batches, row-sparse embedding updates, gradient
//! clipping, periodic validation with early stopping, and atomic checkpoints; it evaluates
//! the test split with the best parameters and writes the run folder:
//!
//! | file | contents |
//! |---|---|
//! | `config.yaml` | the resolved experiment (what `--resume` and `mdl eval` read back) |
//! | `fitted.json` | vocabularies and normalisers fitted on train |
//! | `metrics.json` | valid and test metrics of the best checkpoint, the best step |
//! | `curve.csv` | step, epoch, train loss, valid metrics at each evaluation |
//! | `best.ckpt` | the parameters of the best evaluation |
//! | `last.ckpt` | parameters, optimizer state and loop position, for `--resume` |
//! | `train.log` | what the terminal showed, with timings |
//! | `timing.json` | throughput and times of this process's part of the run ([`RunTiming`]) |
//!
//! `metrics.json` holds no timings, so the same seed gives a byte-identical file; the
//! timings go to `timing.json`, which `mdl report` reads beside it.

pub mod bind;
pub mod progress;

use crate::data::{self, Dataset, Fitted, PrepareOptions};
use crate::experiment::{Experiment, OptimizerName, Stage};
use crate::lower::{compile_file, logit_output, Compiled};
use crate::metrics::Report;
use bind::InputBinding;
use mdl_runtime::backend::{Executor, TrainStep};
use mdl_runtime::exec::Mode;
use mdl_runtime::optim::{OptimConfig, OptimKind, Optimizer};
use mdl_runtime::tensor::Tensor;
use mdl_runtime::{autodiff, checkpoint, passes, Graph, ParamInfo};
use progress::Progress;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A compiled model bound to a data layout, with its graphs.
pub struct Session {
    pub compiled: Compiled,
    pub train_graph: Graph,
    pub eval_graph: Graph,
    pub inputs: InputBinding,
}

/// Compiles the experiment's spec (with its hyperparameter overrides). It needs no data,
/// so `mdl run` and `mdl bench` call it before reading any: a bad spec is reported at
/// once, not after the data has loaded.
pub fn compile_spec(exp: &Experiment) -> Result<Compiled, String> {
    let mut map = crate::diag::SourceMap::new();
    let overrides = exp.hyper_overrides()?;
    compile_file(&mut map, &exp.spec, exp.model.as_deref(), &overrides).map_err(|d| crate::diag::render_all(&map, &d))
}

/// The forward graph with the gradient of the loss for every parameter, optimised: what
/// a training step runs.
pub fn build_training_graph(c: &Compiled) -> Result<mdl_runtime::Graph, String> {
    let loss = *c.graph.outputs.get("loss").ok_or("the model has no loss output")?;
    let wrt: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
    let g = autodiff::differentiate(&c.graph, loss, &wrt).map_err(|e| e.to_string())?;
    Ok(passes::optimize(&g))
}

impl Session {
    /// Compiles the experiment's spec and binds it to the fitted data layout.
    pub fn new(exp: &Experiment, fitted: &Fitted) -> Result<Session, String> {
        Session::with_compiled(compile_spec(exp)?, fitted)
    }

    /// Binds a compiled spec ([`compile_spec`]) to the fitted data layout and derives the
    /// train (with backward) and eval graphs.
    pub fn with_compiled(compiled: Compiled, fitted: &Fitted) -> Result<Session, String> {
        let inputs = InputBinding::new(&compiled, &fitted.schema, &fitted.layout())?;
        let train_graph = build_training_graph(&compiled)?;
        let mut eval = compiled.graph.clone();
        eval.outputs.retain(|name, _| name.starts_with("logit/"));
        let eval_graph = passes::optimize(&eval);
        Ok(Session { compiled, train_graph, eval_graph, inputs })
    }

    /// Builds `exec`'s runnable plans of the train and eval graphs at `batch` rows ahead of
    /// the first step ([`Executor::prepare`]); returns the milliseconds it took.
    pub fn prepare(&self, exec: &mut dyn Executor, batch: usize) -> Result<f64, String> {
        let t = Instant::now();
        let binding = self.inputs.with_batch(batch);
        exec.prepare(&self.train_graph, &binding).map_err(|e| e.to_string())?;
        exec.prepare(&self.eval_graph, &binding).map_err(|e| e.to_string())?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    pub fn params(&self) -> &[ParamInfo] {
        &self.compiled.graph.params
    }

    /// Predicted probabilities `[rows, tasks]` for a whole dataset.
    pub fn predict(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
    ) -> Result<Vec<f32>, String> {
        let tasks = &self.compiled.tasks;
        let mut scores = vec![0.0f32; ds.rows * tasks.len()];
        let mut batch = ds.new_batch();
        let mut start = 0;
        while start < ds.rows {
            let end = (start + batch_size).min(ds.rows);
            ds.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
            let feeds = self.inputs.feeds(&batch);
            let binding = self.inputs.with_batch(batch.rows);
            let out = exec.run(&self.eval_graph, &binding, &feeds, params, &Mode::eval()).map_err(|e| e.to_string())?;
            for (t, task) in tasks.iter().enumerate() {
                let logits =
                    out.dense(&logit_output(task)).ok_or_else(|| format!("no logit output for task {task}"))?;
                for (r, &z) in logits.data.iter().enumerate() {
                    scores[(start + r) * tasks.len() + t] = sigmoid(z);
                }
            }
            start = end;
        }
        Ok(scores)
    }

    /// Metrics of the model on a dataset (per task, per domain, gAUC by user).
    pub fn evaluate(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
    ) -> Result<Report, String> {
        let scores = self.predict(exec, params, ds, batch_size)?;
        let t = self.compiled.tasks.len();
        let width = self.inputs.tasks_in_data;
        let mut labels = Vec::with_capacity(ds.rows * t);
        for r in 0..ds.rows {
            for &c in &self.inputs.task_columns {
                labels.push(ds.labels[r * width + c]);
            }
        }
        let domain = (!ds.domain.is_empty()).then_some(ds.domain.as_slice());
        let user = (!ds.user.is_empty()).then_some(ds.user.as_slice());
        Report::compute(&self.compiled.tasks, &scores, &labels, domain, user).map_err(|e| e.to_string())
    }
}

fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// One row of `curve.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: u64,
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_auc: Option<f64>,
    pub valid_gauc: Option<f64>,
    pub valid_logloss: Option<f64>,
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
        }
    }
}

/// The final figures of a run (`metrics.json`).
#[derive(Clone, Debug, Serialize)]
pub struct RunMetrics {
    pub model: String,
    pub best_step: u64,
    pub steps: u64,
    pub epochs: usize,
    pub stopped_early: bool,
    /// Trainable scalars (all parameter tensors' elements).
    pub parameters: usize,
    pub valid: Report,
    pub test: Report,
    pub skipped_rows: BTreeMap<String, u64>,
}

/// Times of a run (`timing.json`), for the process that finished it: after `--resume` they
/// cover only the resumed part.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RunTiming {
    pub backend: String,
    /// The backend's device (name, kind, platform), for one that has a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Parse → training and evaluation graphs (with the backward pass).
    pub compile_ms: f64,
    /// Graphs → the backend's runnable plans of both, at the batch size (the jit's fusion
    /// pass and kernel compilation; 0 for backends with nothing to prepare).
    #[serde(default)]
    pub plan_ms: f64,
    /// Rows trained on and the seconds spent in training steps (forward, backward, update).
    pub train_rows: usize,
    pub step_secs: f64,
    /// `train_rows / step_secs`.
    pub train_rows_per_s: f64,
    /// Periodic validation and checkpoints during training.
    pub eval_secs: f64,
    pub total_secs: f64,
}

/// The optimizer an experiment asks for.
pub fn optim_config(exp: &Experiment) -> OptimConfig {
    let t = &exp.train;
    let kind = match t.optimizer {
        OptimizerName::Sgd => OptimKind::Sgd,
        OptimizerName::Adam => OptimKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        OptimizerName::Adagrad => OptimKind::Adagrad { eps: 1e-10, initial_accumulator: 0.0 },
    };
    OptimConfig { kind, lr: t.lr, l2: t.l2, embedding_lr: t.embedding_lr, embedding_l2: Some(t.embedding_l2) }
}

fn frozen_by(stage: &Stage) -> impl Fn(&ParamInfo) -> bool + '_ {
    move |p: &ParamInfo| {
        let g = p.group.as_deref();
        let frozen = g.is_some_and(|g| stage.freeze.iter().any(|f| f == g));
        let not_trained = stage.train_only.as_ref().is_some_and(|only| !g.is_some_and(|g| only.iter().any(|o| o == g)));
        frozen || not_trained
    }
}

const OPT_PREFIX: &str = "optimizer/";

/// Writes parameters (and optionally optimizer state) with loop metadata, atomically.
fn save_checkpoint(
    path: &Path,
    params: &HashMap<String, Tensor<f32>>,
    opt: Option<&Optimizer<f32>>,
    state: &LoopState,
) -> Result<(), String> {
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor<f32>)> = names.into_iter().map(|n| (n.clone(), params[n].clone())).collect();
    if let Some(o) = opt {
        tensors.extend(o.state().into_iter().map(|(n, t)| (format!("{OPT_PREFIX}{n}"), t)));
    }
    let meta = serde_json::to_string(state).map_err(|e| e.to_string())?;
    checkpoint::save(path, &tensors, &meta).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a checkpoint: parameters, optimizer state, loop state.
fn load_checkpoint(
    path: &Path,
) -> Result<(HashMap<String, Tensor<f32>>, Vec<(String, Tensor<f32>)>, LoopState), String> {
    let (tensors, meta) = checkpoint::load(path).map_err(|e| e.to_string())?;
    let state: LoopState = serde_json::from_str(&meta).map_err(|e| format!("{}: bad metadata: {e}", path.display()))?;
    let mut params = HashMap::new();
    let mut opt = Vec::new();
    for (n, t) in tensors {
        match n.strip_prefix(OPT_PREFIX) {
            Some(rest) => opt.push((rest.to_string(), t)),
            None => {
                params.insert(n, t);
            }
        }
    }
    Ok((params, opt, state))
}

/// Checks loaded parameters against the model (names and shapes).
fn check_params(session: &Session, params: &HashMap<String, Tensor<f32>>, from: &Path) -> Result<(), String> {
    for p in session.params() {
        let want = mdl_runtime::ir::dim::eval_shape(&p.shape, &session.inputs.sizes)?;
        match params.get(&p.name) {
            Some(t) if t.shape == want => {}
            Some(t) => {
                return Err(format!(
                    "{}: parameter {} has shape {:?}, the model needs {:?}",
                    from.display(),
                    p.name,
                    t.shape,
                    want
                ))
            }
            None => return Err(format!("{}: parameter {} is missing", from.display(), p.name)),
        }
    }
    Ok(())
}

/// Options of `mdl run` beyond the experiment file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub out: Option<PathBuf>,
    pub resume: bool,
    /// Stop (as if killed) after this many steps in this process — for tests of `--resume`.
    pub stop_after: Option<u64>,
}

/// Trains an experiment end to end and writes its run folder. Returns the run folder.
pub fn train(exp: &Experiment, opts: &RunOptions) -> Result<PathBuf, String> {
    // The backend first: a missing device is reported before any data is read.
    let mut backend = make_executor(&exp.backend)?;
    // Then the spec: a bad one is reported before the run folder or the data.
    let ts = Instant::now();
    let compiled = compile_spec(exp)?;
    let spec_time = ts.elapsed();
    let out = opts.out.clone().unwrap_or_else(|| exp.out_dir());
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut log = Progress::new(&out.join("train.log"))?;
    let t0 = Instant::now();

    log.line(&format!("mdl run {} -> {}", exp.name, out.display()));
    if let Some(device) = backend.device_name() {
        log.line(&format!("device: {device}"));
    }
    let paths = exp.split_paths()?;
    let prep = data::prepare(
        &exp.data.schema,
        &paths,
        &PrepareOptions { bad_rows: exp.data.bad_rows.into(), ..Default::default() },
    )
    .map_err(|e| e.to_string())?;
    log.line(&format!(
        "data: train {} / valid {} / test {} rows, loaded in {:.2}s ({})",
        prep.train.rows,
        prep.valid.rows,
        prep.test.rows,
        prep.stats.total_seconds,
        if prep.stats.cache_hit { "cache hit" } else { "parsed, cache written" }
    ));
    let mut skipped = BTreeMap::new();
    for (name, ds) in [("train", &prep.train), ("valid", &prep.valid), ("test", &prep.test)] {
        if ds.skipped.count > 0 {
            log.line(&format!("data: skipped {} malformed rows in {name} (bad_rows: skip)", ds.skipped.count));
            skipped.insert(name.to_string(), ds.skipped.count as u64);
        }
    }
    if prep.train.rows == 0 {
        return Err("the train split has no rows".into());
    }

    let tc = Instant::now();
    let session = Session::with_compiled(compiled, &prep.fitted)?;
    let compile_ms = (tc.elapsed() + spec_time).as_secs_f64() * 1e3;
    let plan_ms = session.prepare(backend.as_mut(), exp.train.batch_size.min(prep.train.rows))?;
    log.line(&format!(
        "model {}: {} parameter tensors, {} train-graph ops, compiled in {compile_ms:.1} ms, {} plan ready in {plan_ms:.1} ms",
        session.compiled.model,
        session.params().len(),
        session.train_graph.len(),
        exp.backend,
    ));

    write_atomic(&out.join("config.yaml"), serde_yaml::to_string(exp).map_err(|e| e.to_string())?.as_bytes())?;
    write_atomic(&out.join("fitted.json"), serde_json::to_string(&prep.fitted).map_err(|e| e.to_string())?.as_bytes())?;

    let mut optimizer = Optimizer::<f32>::new(optim_config(exp))?;
    let exec: &mut dyn Executor = backend.as_mut();
    let last = out.join("last.ckpt");
    let (mut params, mut state) = if opts.resume && last.exists() {
        let (params, opt_state, state) = load_checkpoint(&last)?;
        check_params(&session, &params, &last)?;
        optimizer.load_state(opt_state)?;
        log.line(&format!("resumed from {} at step {}", last.display(), state.step));
        (params, state)
    } else {
        if opts.resume {
            log.line("no checkpoint to resume from; starting fresh");
        }
        let params = mdl_runtime::init::init_params::<f32>(session.params(), &session.inputs.sizes, exp.train.seed)?;
        (params, LoopState::new())
    };
    let n_params: usize = params.values().map(|t| t.data.len()).sum();
    log.line(&format!("{n_params} parameters"));

    let stages = exp.stages();
    let eval_every = exp.train.eval_every.steps()?;
    let maximize = exp.train.early_stopping.maximize()?;
    let bs = exp.train.batch_size;
    let mut batches = data::MiniBatches::new(prep.train.rows, bs, exp.train.seed);
    let per_epoch = batches.batches_per_epoch();
    let total_epochs: usize = stages.iter().map(|s| s.epochs).sum();
    let total_steps = exp.train.max_steps.unwrap_or((total_epochs * per_epoch) as u64);
    let mut batch = prep.train.new_batch();
    let mut steps_this_process = 0u64;
    let best_path = out.join("best.ckpt");
    let train_start = Instant::now();
    let mut rows_done = 0usize;
    // Time spent in training steps only (forward, backward, update), not evaluation.
    let mut step_secs = 0.0f64;

    'stages: while state.stage < stages.len() && !state.stopped_early {
        let stage = &stages[state.stage];
        let frozen = frozen_by(stage);
        if state.epoch_in_stage == 0 && state.batch_in_epoch == 0 && stage.reset_optimizer {
            optimizer.reset();
        }
        while state.epoch_in_stage < stage.epochs {
            let order: Vec<Vec<usize>> = batches.epoch(state.epoch as u64).map(|c| c.to_vec()).collect();
            while state.batch_in_epoch < order.len() {
                if exp.train.max_steps.is_some_and(|m| state.step >= m) {
                    break 'stages;
                }
                let step_start = Instant::now();
                if steps_this_process == 0 {
                    log.line(&format!("first batch starts {:.2}s after launch", t0.elapsed().as_secs_f64()));
                }
                let rows = &order[state.batch_in_epoch];
                prep.train.gather(rows, &mut batch).map_err(|e| e.to_string())?;
                let feeds = session.inputs.feeds(&batch);
                let binding = session.inputs.with_batch(batch.rows);
                let mode = Mode::train(exp.train.seed, state.step);
                let step = TrainStep {
                    graph: &session.train_graph,
                    binding: &binding,
                    feeds: &feeds,
                    mode: &mode,
                    info: session.params(),
                    frozen: &frozen,
                    clip_norm: exp.train.clip_norm,
                    lr_scale: 1.0,
                };
                let loss = exec.train_step(&step, &mut params, &mut optimizer)?.loss as f64;
                if !loss.is_finite() {
                    return Err(format!(
                        "the loss became {loss} at step {} (epoch {}); lower train.lr or set train.clip_norm",
                        state.step + 1,
                        state.epoch + 1
                    ));
                }
                state.step += 1;
                state.batch_in_epoch += 1;
                state.loss_sum += loss;
                state.loss_count += 1;
                steps_this_process += 1;
                rows_done += batch.rows;
                step_secs += step_start.elapsed().as_secs_f64();
                let rate = rows_done as f64 / step_secs.max(1e-9);
                log.progress(state.step, total_steps, state.epoch + 1, loss, rate);

                let end_of_epoch = state.batch_in_epoch == order.len();
                let due = match eval_every {
                    Some(n) => state.step % n == 0,
                    None => end_of_epoch,
                };
                if due {
                    if end_of_epoch {
                        state.batch_in_epoch = 0;
                        state.epoch_in_stage += 1;
                        state.epoch += 1;
                    }
                    evaluate_and_checkpoint(
                        &session,
                        exec,
                        &mut params,
                        &mut optimizer,
                        &mut state,
                        &prep.valid,
                        bs,
                        maximize,
                        exp,
                        &best_path,
                        &last,
                        &mut log,
                    )?;
                    if state.stopped_early {
                        break 'stages;
                    }
                } else if end_of_epoch {
                    state.batch_in_epoch = 0;
                    state.epoch_in_stage += 1;
                    state.epoch += 1;
                    exec.sync(&mut params, &mut optimizer)?;
                    save_checkpoint(&last, &params, Some(&optimizer), &state)?;
                }
                if opts.stop_after.is_some_and(|n| steps_this_process >= n) {
                    log.line(&format!("stopping after {steps_this_process} steps as asked (resume with --resume)"));
                    return Ok(out);
                }
                if end_of_epoch {
                    break;
                }
            }
        }
        state.stage += 1;
        state.epoch_in_stage = 0;
        exec.sync(&mut params, &mut optimizer)?;
        save_checkpoint(&last, &params, Some(&optimizer), &state)?;
    }
    // A final evaluation when the last steps were not evaluated (max_steps, eval cadence).
    if state.curve.last().map(|c| c.step) != Some(state.step) && state.step > 0 {
        evaluate_and_checkpoint(
            &session,
            exec,
            &mut params,
            &mut optimizer,
            &mut state,
            &prep.valid,
            bs,
            maximize,
            exp,
            &best_path,
            &last,
            &mut log,
        )?;
    }
    // The device's parameters back on the host before other tensors (the best ones) run.
    exec.sync(&mut params, &mut optimizer)?;
    log.finish();
    let train_secs = train_start.elapsed().as_secs_f64();

    // Test with the best parameters.
    let best_params = if best_path.exists() {
        let (p, _, _) = load_checkpoint(&best_path)?;
        p
    } else {
        params
    };
    let valid = session.evaluate(exec, &best_params, &prep.valid, bs)?;
    let test = session.evaluate(exec, &best_params, &prep.test, bs)?;
    let metrics = RunMetrics {
        model: session.compiled.model.clone(),
        best_step: state.best_step,
        steps: state.step,
        epochs: state.epoch,
        stopped_early: state.stopped_early,
        parameters: n_params,
        valid,
        test,
        skipped_rows: skipped,
    };
    let json = serde_json::to_string_pretty(&metrics).map_err(|e| e.to_string())?;
    write_atomic(&out.join("metrics.json"), json.as_bytes())?;
    write_curve(&out.join("curve.csv"), &state.curve)?;
    let timing = RunTiming {
        backend: exp.backend.clone(),
        device: exec.device_name(),
        compile_ms,
        plan_ms,
        train_rows: rows_done,
        step_secs,
        train_rows_per_s: rows_done as f64 / step_secs.max(1e-9),
        eval_secs: train_secs - step_secs,
        total_secs: t0.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&timing).map_err(|e| e.to_string())?;
    write_atomic(&out.join("timing.json"), json.as_bytes())?;
    log.line(&format!(
        "test: auc {} gauc {} logloss {} (best step {}, {} epochs)",
        fmt_opt(metrics.test.auc),
        fmt_opt(metrics.test.gauc),
        fmt_opt(metrics.test.logloss),
        state.best_step,
        state.epoch
    ));
    log.line(&format!(
        "training {:.1}s: steps {:.1}s ({:.0} train rows/s), evaluation {:.1}s; total {:.1}s; run folder {}",
        train_secs,
        step_secs,
        rows_done as f64 / step_secs.max(1e-9),
        train_secs - step_secs,
        t0.elapsed().as_secs_f64(),
        out.display()
    ));
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn evaluate_and_checkpoint(
    session: &Session,
    exec: &mut dyn Executor,
    params: &mut HashMap<String, Tensor<f32>>,
    optimizer: &mut Optimizer<f32>,
    state: &mut LoopState,
    valid: &Dataset,
    bs: usize,
    maximize: bool,
    exp: &Experiment,
    best_path: &Path,
    last: &Path,
    log: &mut Progress,
) -> Result<(), String> {
    let report = session.evaluate(exec, params, valid, bs)?;
    // The checkpoints below need the parameters and the optimizer state on the host.
    exec.sync(params, optimizer)?;
    let metric = match exp.train.early_stopping.metric.as_str() {
        "gauc" => report.gauc,
        "logloss" => report.logloss,
        _ => report.auc,
    };
    let train_loss = if state.loss_count > 0 { state.loss_sum / state.loss_count as f64 } else { f64::NAN };
    state.loss_sum = 0.0;
    state.loss_count = 0;
    state.curve.push(CurvePoint {
        step: state.step,
        epoch: state.epoch,
        train_loss,
        valid_auc: report.auc,
        valid_gauc: report.gauc,
        valid_logloss: report.logloss,
    });
    let improved = match (metric, state.best) {
        (Some(m), Some(b)) => {
            if maximize {
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
        save_checkpoint(best_path, params, None, state)?;
    } else {
        state.bad_evals += 1;
        if state.bad_evals >= exp.train.early_stopping.patience {
            state.stopped_early = true;
        }
    }
    log.line(&format!(
        "step {} epoch {}: train loss {:.5}, valid auc {} gauc {} logloss {}{}",
        state.step,
        // The epoch the step belongs to, counted from 1 as the progress line counts it: an
        // evaluation at an epoch's end names that epoch, one mid-way the epoch under way.
        if state.batch_in_epoch == 0 { state.epoch } else { state.epoch + 1 },
        train_loss,
        fmt_opt(report.auc),
        fmt_opt(report.gauc),
        fmt_opt(report.logloss),
        if improved {
            " (best)".to_string()
        } else if state.stopped_early {
            format!(" (no improvement in {} evaluations: stopping early)", state.bad_evals)
        } else {
            String::new()
        }
    ));
    save_checkpoint(last, params, Some(optimizer), state)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.5}")).unwrap_or_else(|| "-".into())
}

fn write_curve(path: &Path, curve: &[CurvePoint]) -> Result<(), String> {
    let mut s = String::from("step,epoch,train_loss,valid_auc,valid_gauc,valid_logloss\n");
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    for c in curve {
        s.push_str(&format!(
            "{},{},{:.6},{},{},{}\n",
            c.step,
            c.epoch,
            c.train_loss,
            f(c.valid_auc),
            f(c.valid_gauc),
            f(c.valid_logloss)
        ));
    }
    write_atomic(path, s.as_bytes())
}

/// The backends this build has, by name (`opencl` also as `opencl:N`, device N of
/// `mdl devices`).
#[cfg(feature = "opencl")]
pub const BACKENDS: &[&str] = &["jit", "interp", "opencl"];
/// The backends this build has, by name.
#[cfg(not(feature = "opencl"))]
pub const BACKENDS: &[&str] = &["jit", "interp"];

/// The error for `opencl` in a build without the feature.
pub const NO_OPENCL_FEATURE: &str =
    "this mdl was built without the `opencl` feature: cargo build --release --features opencl";

/// Checks a backend name (`jit`, `interp`, `opencl`, `opencl:N`) against this build.
pub fn check_backend(name: &str) -> Result<(), String> {
    let (base, device) = match name.split_once(':') {
        Some((b, d)) => (b, Some(d)),
        None => (name, None),
    };
    if base == "opencl" && !cfg!(feature = "opencl") {
        return Err(NO_OPENCL_FEATURE.into());
    }
    if let Some(d) = device {
        if base != "opencl" || d.parse::<usize>().is_err() {
            return Err(format!("backend `{name}`: only `opencl:N` takes a device number N (see `mdl devices`)"));
        }
    }
    if !BACKENDS.contains(&base) {
        return Err(format!("backend `{name}` is not available in this build (available: {})", BACKENDS.join(", ")));
    }
    Ok(())
}

/// The environment variable that chooses where the OpenCL backend combines row-sparse
/// gradients: `device` (the default) or `host` (by the eval rule; the same sums).
pub const OPENCL_COMBINE_VAR: &str = "MDL_OPENCL_COMBINE";

/// The executor for a backend name.
pub fn make_executor(name: &str) -> Result<Box<dyn Executor>, String> {
    check_backend(name)?;
    match name.split_once(':').map_or(name, |(b, _)| b) {
        "interp" => Ok(Box::new(mdl_runtime::backend::Interp)),
        "jit" => Ok(Box::new(mdl_runtime::backend::jit::Jit::new())),
        #[cfg(feature = "opencl")]
        "opencl" => {
            let device = name.split_once(':').and_then(|(_, d)| d.parse::<usize>().ok());
            let exec = mdl_runtime::backend::opencl::OpenCl::new(device)?;
            let exec = match std::env::var(OPENCL_COMBINE_VAR).as_deref() {
                Err(_) => exec,
                Ok("device") => exec.with_sparse_rows_on_device(true),
                Ok("host") => exec.with_sparse_rows_on_device(false),
                Ok(other) => return Err(format!("{OPENCL_COMBINE_VAR}={other}: expected `device` or `host`")),
            };
            Ok(Box::new(exec))
        }
        other => Err(format!("backend `{other}` is not available in this build (available: {})", BACKENDS.join(", "))),
    }
}

/// Writes a file through a temporary name and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Loads a finished (or interrupted) run: its experiment, fitted data encoders, model and best parameters.
pub fn load_run(run: &Path) -> Result<(Experiment, Fitted, Session, HashMap<String, Tensor<f32>>), String> {
    let cfg = run.join("config.yaml");
    let text = std::fs::read_to_string(&cfg)
        .map_err(|e| format!("{} is not a run folder: cannot read {}: {e}", run.display(), cfg.display()))?;
    let exp: Experiment = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let fitted_path = run.join("fitted.json");
    let fitted: Fitted = serde_json::from_str(
        &std::fs::read_to_string(&fitted_path).map_err(|e| format!("cannot read {}: {e}", fitted_path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", fitted_path.display()))?;
    let session = Session::new(&exp, &fitted)?;
    let ckpt = if run.join("best.ckpt").exists() { run.join("best.ckpt") } else { run.join("last.ckpt") };
    let (params, _, _) = load_checkpoint(&ckpt)?;
    check_params(&session, &params, &ckpt)?;
    Ok((exp, fitted, session, params))
}
