//! Training and evaluation of a compiled model on prepared data: the main job.
//!
//! A [`Session`] is the model side of a run: the compiled spec, its training graph
//! (forward + backward, optimised) and evaluation graph (logits only), and the binding of
//! data arrays to graph inputs. A [`Run`] (`run.rs`) is the loop: parameters, optimizer
//! and loop state, with shuffled mini-batches, row-sparse embedding updates, gradient
//! clipping, periodic validation with early stopping, and atomic checkpoints
//! (`checkpoint.rs`). [`train`] drives the stages of a run end to end: it evaluates the
//! test split with the best parameters and writes the run folder, which `folder.rs` keeps
//! whole (its own, locked, with a manifest of checksums and a copy of the spec):
//!
//! | file | contents |
//! |---|---|
//! | `manifest.json` | run id, mdl version and commit, SHA-256 of the experiment, the spec files, the data (cache key) and every file below but the checkpoints and the log, whether the run finished |
//! | `spec/` | the spec and every file it `use`s, as the run compiled them (what `--resume`, `mdl eval` and `mdl predict` compile) |
//! | `config.yaml` | the resolved experiment (what `--resume` and `mdl eval` read back) |
//! | `fitted.json` | vocabularies and normalisers fitted on train |
//! | `metrics.json` | valid and test metrics of the best checkpoint, the best step |
//! | `curve.csv` | step, epoch, train loss, valid metrics (of the first task) at each evaluation |
//! | `curve_tasks.csv` | every task's valid metrics at each evaluation, overall and per domain (long format: `step,epoch,split,task,domain,metric,value`) |
//! | `loss.csv` | the training loss of every step (`step,epoch,loss`) |
//! | `grad_norms.csv` | with `train.record_grad_norms`: the gradient norm of every parameter group at every step (`step,epoch,group,norm`) |
//! | `grad_cosine.csv` | with `train.grad_cosine`: two named losses' gradient norms on one parameter (or the objective's through two named paths) and their cosine (`step,epoch,param,of,a,b,norm_a,norm_b,cosine`) |
//! | `best.ckpt` | the parameters of the best evaluation (with the run id, as `last.ckpt`) |
//! | `last.ckpt` | parameters, optimizer state and loop position, for `--resume` |
//! | `train.log` | what the terminal showed, with timings |
//! | `timing.json` | throughput and times of this process's part of the run ([`RunTiming`]) |
//! | `.lock` | the pid of the process writing the folder, locked while it does |
//!
//! `metrics.json` holds no timings, so the same seed gives a byte-identical file; the
//! timings go to `timing.json`, which `mdl report` reads beside it.
//!
//! Before the plans are built, `memory.rs` estimates the memory the run needs and refuses
//! one that cannot fit; on every step `health.rs` stops a run whose loss diverges or stops
//! being finite (naming the first op and parameter that gave a value that is not).

pub mod bind;
mod checkpoint;
pub mod folder;
pub mod health;
pub mod memory;
pub mod progress;
pub mod run;
pub mod stages;

use crate::data::{self, Dataset, Fitted, Prepared, Splits};
use crate::experiment::{Experiment, OptimizerName};
use crate::files::sha256_hex;
use crate::lower::{compile_file_sized, logit_output, Compiled, Sizes};
use crate::metrics::{Report, TaskRows};
use crate::tasks::TaskKind;
use bind::InputBinding;
use folder::{ReadFolder, Resumed, RunFolder, Trust};
use mdl_runtime::backend::Executor;
use mdl_runtime::exec::Mode;
use mdl_runtime::optim::{OptimConfig, OptimKind};
use mdl_runtime::tensor::Tensor;
use mdl_runtime::{autodiff, passes, Graph, ParamInfo};
use progress::Progress;
pub use run::{CurvePoint, LoopEnd, LoopState, Run, Start};
use serde::Serialize;
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

/// Compiles the experiment's spec (with its hyperparameter overrides) with the sizes its
/// schema gives ([`bind::schema_sizes`]). It needs no data, so `mdl run` and `mdl bench`
/// call it before reading any: a bad spec is reported at once, not after the data has
/// loaded.
pub fn compile_spec(exp: &Experiment) -> Result<Compiled, String> {
    compile_spec_at(exp, &exp.spec).map(|(compiled, _)| compiled)
}

/// A compiled spec with the files the compiler read and their text: the spec first, then
/// every file it `use`s (the standard library is part of mdl).
pub type CompiledSpec = (Compiled, Vec<(PathBuf, String)>);

/// Why [`compile_spec_sized`] failed: the rendered diagnostics, and whether a statement
/// needed a size that was not bound (the prepared data gives every size).
#[derive(Debug)]
pub struct SpecError {
    pub message: String,
    pub needs_data: bool,
}

/// Compiles the experiment's model from the spec file `spec` (the experiment's own, or a
/// run folder's copy of it) with the sizes its schema gives ([`bind::schema_sizes`]).
pub fn compile_spec_at(exp: &Experiment, spec: &Path) -> Result<CompiledSpec, String> {
    compile_spec_sized(exp, spec, &bind::schema_sizes(&exp.data.schema)).map_err(|e| e.message)
}

/// The compile of a run before its data is read: the spec with the schema's sizes, or
/// `None` when a statement needs a size only the prepared data gives (`rows(x)`, or the
/// domains where the schema does not declare them): [`compile_for_data`] then compiles it.
pub fn compile_before_data(exp: &Experiment, spec: &Path) -> Result<Option<CompiledSpec>, String> {
    match compile_spec_sized(exp, spec, &bind::schema_sizes(&exp.data.schema)) {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.needs_data => Ok(None),
        Err(e) => Err(e.message),
    }
}

/// The model as a run on `fitted` data compiles it, the same graph in training, `--resume`,
/// `mdl eval`, `predict`, `serve` and `export`: with the schema's sizes, or, where a
/// statement needs a size only the data gives, with every size of the data.
pub fn compile_for_data(exp: &Experiment, spec: &Path, fitted: &Fitted) -> Result<CompiledSpec, String> {
    match compile_before_data(exp, spec)? {
        Some(c) => Ok(c),
        None => compile_spec_sized(exp, spec, &bind::fitted_sizes(fitted)).map_err(|e| e.message),
    }
}

/// Compiles the experiment's model from `spec` with the data's sizes that are known.
pub fn compile_spec_sized(exp: &Experiment, spec: &Path, sizes: &Sizes) -> Result<CompiledSpec, SpecError> {
    let mut map = crate::diag::SourceMap::new();
    let overrides = exp.hyper_overrides().map_err(|message| SpecError { message, needs_data: false })?;
    let compiled = compile_file_sized(&mut map, spec, exp.model.as_deref(), &overrides, sizes).map_err(|f| {
        SpecError { message: crate::diag::render_all(&map, &f.diagnostics), needs_data: !f.needs.is_empty() }
    })?;
    // File 0 is the spec; the standard library is the entry `lower` adds under its name.
    let files = (0..map.len() as u32)
        .filter(|&f| f == 0 || map.name(f) != "std.mdl" || map.text(f) != crate::lower::STD_SOURCE)
        .map(|f| (PathBuf::from(map.name(f)), map.text(f).to_string()))
        .collect();
    Ok((compiled, files))
}

/// The forward graph as it runs in training (batch statistics, [`passes::for_phase`]) with
/// the gradient of the loss for every parameter and the next value of every state
/// (`state/<name>`), optimised: what a training step runs.
pub fn build_training_graph(c: &Compiled) -> Result<mdl_runtime::Graph, String> {
    let forward = training_forward(c);
    let loss = *forward.outputs.get("loss").ok_or("the model has no loss output")?;
    let forward = passes::wide_products_toward(&forward, loss);
    let loss = forward.outputs["loss"];
    let wrt: Vec<String> = forward.params.iter().map(|p| p.name.clone()).collect();
    let g = autodiff::differentiate(&forward, loss, &wrt).map_err(|e| e.to_string())?;
    Ok(passes::optimize(&g))
}

/// The forward graph as a training step runs it, before its objective is differentiated
/// (here, and for a stage's objective in `stages.rs`). The caller makes its sibling
/// products toward the objective one wider product ([`passes::wide_products_toward`]) before
/// differentiating, so that the backward is wide too.
pub(crate) fn training_forward(c: &Compiled) -> mdl_runtime::Graph {
    let mut forward = passes::for_phase(&c.graph, true);
    // Probes are read in evaluation only (`mdl analyze`): a step computes none of them.
    forward.outputs.retain(|name, _| !name.starts_with(crate::lower::PROBE_PREFIX));
    forward
}

/// The logits of the model as it runs in evaluation (running statistics), optimised: what
/// evaluation and `mdl predict` run.
pub fn build_eval_graph(c: &Compiled) -> mdl_runtime::Graph {
    let mut eval = passes::for_phase(&c.graph, false);
    eval.outputs.retain(|name, _| name.starts_with("logit/"));
    passes::optimize(&eval)
}

/// The evaluation graph with the values of the model's probes (`probe(x, "name")`) as
/// outputs beside the logits: what `mdl analyze` runs on a split.
pub fn build_probe_graph(c: &Compiled) -> mdl_runtime::Graph {
    let mut eval = passes::for_phase(&c.graph, false);
    eval.outputs.retain(|name, _| name.starts_with("logit/") || name.starts_with(crate::lower::PROBE_PREFIX));
    passes::optimize(&eval)
}

impl Session {
    /// Compiles the experiment's spec and binds it to the fitted data layout.
    pub fn new(exp: &Experiment, fitted: &Fitted) -> Result<Session, String> {
        Session::with_compiled(compile_for_data(exp, &exp.spec, fitted)?.0, fitted)
    }

    /// Binds a compiled spec ([`compile_spec`]) to the fitted data layout and derives the
    /// train (with backward) and eval graphs.
    pub fn with_compiled(compiled: Compiled, fitted: &Fitted) -> Result<Session, String> {
        let inputs = InputBinding::new(&compiled, fitted)?;
        let train_graph = build_training_graph(&compiled)?;
        let eval_graph = build_eval_graph(&compiled);
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

    /// The model's tensors at the start of training: parameters from their initialisers
    /// and `seed`, states (running statistics) at their initial values.
    pub fn initial_tensors(&self, seed: u64) -> Result<HashMap<String, Tensor<f32>>, String> {
        mdl_runtime::init::init_model::<f32>(&self.compiled.graph, &self.inputs.sizes, seed)
    }

    /// Runs the evaluation graph over the rows `rows` of a dataset (in batches of
    /// `batch_size` from `rows.start`) and hands `each` every batch's output of every task:
    /// `(task index, first row, width, values)`, the values `rows × width` (one per row, or a
    /// row of class / candidate logits). A value that is not finite is an error naming its
    /// row.
    fn outputs(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
        rows: std::ops::Range<usize>,
        mut each: impl FnMut(usize, usize, usize, &[f32]),
    ) -> Result<(), String> {
        let tasks = &self.compiled.tasks;
        let mut batch = ds.new_batch();
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + batch_size).min(rows.end);
            ds.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
            let feeds = self.inputs.feeds(&batch);
            let binding = self.inputs.with_batch(batch.rows);
            let out = exec.run(&self.eval_graph, &binding, &feeds, params, &Mode::eval()).map_err(|e| e.to_string())?;
            for (t, task) in tasks.iter().enumerate() {
                let logits =
                    out.dense(&logit_output(task)).ok_or_else(|| format!("no logit output for task {task}"))?;
                let width = (logits.data.len() / batch.rows.max(1)).max(1);
                if let Some(i) = logits.data.iter().position(|z| !z.is_finite()) {
                    return Err(health::non_finite_score(task, logits.data[i], start + i / width, ds));
                }
                each(t, start, width, &logits.data);
            }
            start = end;
        }
        Ok(())
    }

    /// The score of every task for every row of a dataset, `[rows, tasks]` row-major: the
    /// probability of a binary task, the prediction of a regression task, the arg-max
    /// class (position) of a classes (candidates) task ([`crate::tasks::TaskKind::score`]).
    pub fn predict(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
    ) -> Result<Vec<f32>, String> {
        let kinds = &self.compiled.task_kinds;
        let width = kinds.len();
        let mut scores = vec![0.0f32; ds.rows * width];
        self.outputs(exec, params, ds, batch_size, 0..ds.rows, |t, start, row_width, values| {
            for (r, row) in values.chunks(row_width).enumerate() {
                scores[(start + r) * width + t] = kinds[t].score(row);
            }
        })?;
        Ok(scores)
    }

    /// Metrics of the model on a dataset (per task, per domain, gAUC by user; see
    /// [`crate::metrics`] for what each kind of task reports).
    pub fn evaluate(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
    ) -> Result<Report, String> {
        let outputs = self.task_outputs(exec, params, ds, batch_size, 0..ds.rows)?;
        self.report(&outputs, ds)
    }

    /// [`Session::evaluate`] shared among the ranks of `group`: each scores its share of the
    /// split's batches (the same batches one process scores), the outputs are gathered in
    /// rank order, and every rank computes the metrics from all of them: the report is the
    /// one a single process computes from the same parameters, exactly.
    pub fn evaluate_in(
        &self,
        group: &dyn crate::dist::Group,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
    ) -> Result<Report, String> {
        if group.size() == 1 {
            return self.evaluate(exec, params, ds, batch_size);
        }
        let batch_size = batch_size.max(1);
        let batches = crate::dist::share(ds.rows.div_ceil(batch_size), group.size(), group.rank());
        let rows = (batches.start * batch_size).min(ds.rows)..(batches.end * batch_size).min(ds.rows);
        let mine = self.task_outputs(exec, params, ds, batch_size, rows);
        let mine = crate::dist::agree(group, mine)?;
        let mut outputs = Vec::with_capacity(mine.len());
        for task in &mine {
            outputs.push(group.all_gather_f32(task)?.values);
        }
        self.report(&outputs, ds)
    }

    /// Every task's outputs on the rows `rows` of a dataset, in row order: the probability
    /// of a binary task, the prediction of a regression task, the row of logits of a
    /// classes or candidates task.
    fn task_outputs(
        &self,
        exec: &mut dyn Executor,
        params: &HashMap<String, Tensor<f32>>,
        ds: &Dataset,
        batch_size: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<f32>>, String> {
        let kinds = &self.compiled.task_kinds;
        let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); kinds.len()];
        self.outputs(exec, params, ds, batch_size, rows, |t, _, _, values| match kinds[t] {
            TaskKind::Binary | TaskKind::Regression { .. } => {
                outputs[t].extend(values.iter().map(|&z| kinds[t].score(std::slice::from_ref(&z))))
            }
            _ => outputs[t].extend_from_slice(values),
        })?;
        Ok(outputs)
    }

    /// The metrics of every task's outputs on all rows of `ds` ([`Session::task_outputs`]).
    fn report(&self, outputs: &[Vec<f32>], ds: &Dataset) -> Result<Report, String> {
        let kinds = &self.compiled.task_kinds;
        let width = self.inputs.tasks_in_data;
        let labels: Vec<Vec<f32>> = self
            .inputs
            .task_columns
            .iter()
            .map(|c| match c {
                Some(c) => (0..ds.rows).map(|r| ds.labels[r * width + c]).collect(),
                None => Vec::new(),
            })
            .collect();
        let rows: Vec<TaskRows> = self
            .compiled
            .tasks
            .iter()
            .zip(kinds)
            .enumerate()
            .map(|(t, (name, kind))| TaskRows {
                name,
                kind,
                outputs: &outputs[t],
                width: outputs[t].len().checked_div(ds.rows).unwrap_or(1).max(1),
                labels: &labels[t],
            })
            .collect();
        let domain = (!ds.domain.is_empty()).then_some(ds.domain.as_slice());
        let user = (!ds.user.is_empty()).then_some(ds.user.as_slice());
        Report::of_tasks(&rows, domain, user).map_err(|e| e.to_string())
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
    /// How each declared stage ended (none without `train.stages`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<run::StageResult>,
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
    /// The exchange of a data-parallel run (`mpirun` with more than one rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallelTiming>,
}

/// What the ranks of a data-parallel run spent exchanging gradients, per training step
/// (part of its `step_secs`). `train_rows` and `train_rows_per_s` count the global batches'
/// rows.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DataParallelTiming {
    pub ranks: usize,
    /// Waiting for the slowest rank to finish its share of the batch (the first exchange).
    pub wait_ms_per_step: f64,
    /// The dense gradients and the states ([`crate::dist::all_reduce_sum`]).
    pub all_reduce_ms_per_step: f64,
    /// The row-sparse embedding gradients' ids and values.
    pub sparse_exchange_ms_per_step: f64,
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

/// Options of `mdl run` beyond the experiment file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--out` (with `resume`, the run folder to resume).
    pub out: Option<PathBuf>,
    pub resume: bool,
    /// `--force`: a fresh run clears its `--out` (a run folder); a resume goes on past a
    /// changed experiment, changed data or a checkpoint of another run, saying so.
    pub force: bool,
    /// Stop (as if killed) after this many steps in this process — for tests of `--resume`.
    pub stop_after: Option<u64>,
}

/// Trains an experiment end to end and writes its run folder. Returns the run folder.
///
/// Its stages each report their errors before the next costs anything: the run folder of
/// a resumed run (a finished one is reported and left as it is), the backend (a missing
/// device), the spec, the folder of a fresh run and the data, the session and the
/// backend's plans; then the [`Run`] is started (or resumed), fitted, and finished with the
/// test metrics. A fresh run that fails before it starts leaves no folder behind.
pub fn train(exp: &Experiment, opts: &RunOptions) -> Result<PathBuf, String> {
    train_in(exp, opts, &crate::dist::Solo)
}

/// [`train`] as a rank of `group` (`mpirun -n N mdl run`): every rank reads the data,
/// compiles the model and runs the loop; rank 0 alone opens, claims and writes the run
/// folder and decides what depends on it (the spec a resume compiles, the run id), which
/// it hands to the others. A failure of one rank before the loop is every rank's failure
/// ([`crate::dist::agree`]). A group of one is [`train`].
pub fn train_in(exp: &Experiment, opts: &RunOptions, group: &dyn crate::dist::Group) -> Result<PathBuf, String> {
    use crate::dist::{agree, from_leader};
    // What the run computes: the threads (`train.threads`, `--threads`) are left out, so a
    // resume on another thread count is the same experiment.
    let config = serde_yaml::to_string(&exp.recorded()).map_err(|e| e.to_string())?;
    let config_sha256 = sha256_hex(config.as_bytes());
    let trust = Trust { force: opts.force };
    let mut resumed = None;
    let finished = from_leader(group, || match (opts.resume, &opts.out) {
        (true, Some(dir)) => match RunFolder::resume(dir, trust, &config_sha256)? {
            Resumed::Finished(message) => {
                crate::say!("{message}");
                Ok(Some(dir.clone()))
            }
            Resumed::Open(folder) => {
                resumed = Some(folder);
                Ok(None)
            }
        },
        (true, None) => Err("--resume needs the run folder".into()),
        (false, _) => Ok(None),
    })?;
    if let Some(dir) = finished {
        return Ok(dir);
    }
    let mut exec = agree(group, exp.executor())?;
    let spec_started = Instant::now();
    // A resumed run compiles the folder's copy of its spec, unless the experiment now
    // names another spec (with --force).
    let mut notes = Vec::new();
    let (spec, from_copy) = from_leader(group, || {
        let Some(folder) = &resumed else { return Ok((exp.spec.clone(), false)) };
        let changes = if folder.manifest.config_sha256 == config_sha256 {
            Vec::new()
        } else {
            let path = folder.dir().join("config.yaml");
            let old = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            folder::config_changes(&old, &config)
        };
        if !changes.is_empty() {
            trust.problem(format!(
                "the experiment differs from the one {} started with: {}",
                folder.dir().display(),
                changes.join("; ")
            ))?;
        }
        let same_spec = !changes.iter().any(|c| c.starts_with("spec:") || c.starts_with("model:"));
        if let (true, Some((copy, spec_notes))) = (same_spec, folder.spec(trust)?) {
            notes = spec_notes;
            return Ok((copy, true));
        }
        Ok((exp.spec.clone(), false))
    })?;
    // A spec that needs a size only the prepared data gives compiles once the data is in.
    let early = compile_before_data(exp, &spec)?;
    if let Some((compiled, _)) = &early {
        stages::check(exp, compiled)?;
        stages::check_init_from(exp, compiled)?;
        check_metric(exp, compiled)?;
    }
    let spec_time = spec_started.elapsed();
    let mut claim_note = None;
    let mut claimed = None;
    let (out, run_id) = from_leader(group, || {
        let folder = match resumed.take() {
            Some(folder) => folder,
            None => {
                let dir = opts.out.clone().unwrap_or_else(|| exp.out_dir());
                let (folder, note) = RunFolder::claim(&dir, opts.out.is_some(), opts.force, &config_sha256)?;
                claim_note = note;
                folder
            }
        };
        let place = (folder.dir().to_path_buf(), folder.run_id().to_string());
        claimed = Some(folder);
        Ok(place)
    })?;
    let started = (|| {
        let mut log = match &claimed {
            Some(_) => Progress::new(&out.join("train.log"))?,
            None => Progress::silent(),
        };
        log.line(&format!("mdl run {} -> {} (run {run_id})", exp.name, out.display()));
        if group.size() > 1 {
            log.line(&format!("data-parallel: {} ranks (rank 0 writes the run folder)", group.size()));
        }
        for note in claim_note.iter().chain(&notes) {
            log.line(note);
        }
        if let Some(device) = exec.device_name() {
            log.line(&format!("device: {device}"));
        }
        if exp.backend == crate::backends::Backend::Jit {
            let threads = exp.train.threads.unwrap_or_else(mdl_runtime::backend::jit::default_threads);
            log.line(&format!("jit threads: {threads}"));
        }
        if let Some(line) = exp.products()?.1 {
            log.line(&line);
        }
        // A spec compiled only once the data is in reads its labels as 0/1 (checked below).
        let schema = match &early {
            Some((compiled, _)) => label_schema(&exp.data.schema, compiled),
            None => exp.data.schema.clone(),
        };
        let prep = load_data(exp, &schema, &mut log)?;
        let recorded_key = claimed.as_ref().and_then(|folder| folder.manifest.data_key.as_ref());
        if let (Some(was), Some(now)) = (recorded_key, &prep.stats.cache_key) {
            if opts.resume && was != now {
                trust.problem(format!(
                    "the data differs from the data the run started with (the content of its train, valid or test file, or the schema: data key {} then, {} now)",
                    &was[..was.len().min(12)],
                    &now[..now.len().min(12)]
                ))?;
            }
        }
        let session_started = Instant::now();
        let (compiled, spec_files) = match early {
            Some(c) => c,
            None => {
                log.line(
                    "the spec needs sizes of the data its schema does not give: compiled with the prepared data's",
                );
                let c = compile_spec_sized(exp, &spec, &bind::fitted_sizes(&prep.fitted)).map_err(|e| e.message)?;
                if label_schema(&exp.data.schema, &c.0) != schema {
                    return Err("a spec that needs sizes only the prepared data gives (rows(x), undeclared domains) \
                                takes 0/1 labels only for now; declare the domains' count in the schema"
                        .into());
                }
                stages::check(exp, &c.0)?;
                stages::check_init_from(exp, &c.0)?;
                check_metric(exp, &c.0)?;
                c
            }
        };
        let session = Session::with_compiled(compiled, &prep.fitted)?;
        let compile_ms = (session_started.elapsed() + spec_time).as_secs_f64() * 1e3;
        memory::check_run(&session, exp, exp.train.batch_size.min(prep.train.rows))?;
        let plan_ms = session.prepare(exec.as_mut(), exp.train.batch_size.min(prep.train.rows))?;
        log.line(&format!(
            "model {}: {} parameter tensors, {} train-graph ops, compiled in {compile_ms:.1} ms, {} plan ready in {plan_ms:.1} ms",
            session.compiled.model,
            session.params().len(),
            session.train_graph.len(),
            exp.backend,
        ));
        Ok::<_, String>((log, prep, session, spec_files, compile_ms, plan_ms))
    })();
    let (log, prep, session, spec_files, compile_ms, plan_ms) = match agree(group, started) {
        Ok(started) => started,
        Err(e) => {
            if let Some(folder) = claimed {
                folder.discard();
            }
            return Err(e);
        }
    };
    // The vocabularies go to `fitted.json` and are let go: the run reads only the splits.
    let Prepared { fitted, train, valid, test, stats } = prep;
    let fitted_json = serde_json::to_string(&fitted).map_err(|e| e.to_string())?;
    drop(fitted);
    memory::return_freed();
    let splits = Splits { train: &train, valid: &valid, test: &test };
    let start = if opts.resume { Start::Resume(trust) } else { Start::Fresh };
    // The run folder records the run once it has started: a resume that cannot start
    // leaves it as it was.
    let place = (out.as_path(), run_id.as_str());
    let started = Run::start(exp, &session, exec.as_mut(), splits, place, group, log, start);
    let mut run = match agree(group, started) {
        Ok(run) => run,
        Err(e) => {
            if let Some(folder) = claimed {
                folder.discard();
            }
            return Err(e);
        }
    };
    if let Some(folder) = &mut claimed {
        if !from_copy {
            folder.snapshot_spec(&spec_files)?;
        }
        for (name, bytes) in [("config.yaml", config.as_bytes()), ("fitted.json", fitted_json.as_bytes())] {
            if !folder.holds(name, bytes) {
                folder.write(name, bytes)?;
            }
        }
        folder.manifest.config_sha256 = config_sha256;
        folder.manifest.data_key = stats.cache_key.clone();
        folder.save_manifest()?;
    }
    drop(fitted_json);
    if run.fit(opts.stop_after)? == LoopEnd::Finished {
        run.finish(claimed.as_mut(), compile_ms, plan_ms)?;
    }
    Ok(out)
}

/// The early-stopping metric must be one the first task's kind defines (an `auc` for a
/// regression task would be undefined at the first evaluation), or `loss` (the stage's
/// objective, which every model has). Checked before any data is read.
fn check_metric(exp: &Experiment, compiled: &Compiled) -> Result<(), String> {
    let (Some(task), Some(kind)) = (compiled.tasks.first(), compiled.task_kinds.first()) else {
        return Ok(());
    };
    let defined = crate::tasks::metrics_of(kind);
    let stages = exp.train.stages.iter().enumerate();
    let staged = stages.filter_map(|(i, s)| s.early_stopping.as_ref().map(|e| (format!("train.stages[{i}]."), e)));
    for (key, early) in std::iter::once((String::from("train."), &exp.train.early_stopping)).chain(staged) {
        let metric = &early.metric;
        early.maximize()?;
        if !defined.contains(metric) && metric != crate::tasks::OBJECTIVE_METRIC {
            return Err(format!(
                "{key}early_stopping.metric: `{metric}` is not a metric of the first task `{task}`, which is {} (its metrics: {})",
                kind.describe(),
                defined.join(", ")
            ));
        }
    }
    Ok(())
}

/// The experiment's schema with each label column's values as the spec declares its task
/// ([`crate::tasks::LabelValues`]): what the data layer reads the cells as.
pub fn label_schema(schema: &data::Schema, compiled: &Compiled) -> data::Schema {
    let mut schema = schema.clone();
    for label in &mut schema.labels {
        let kind = compiled.tasks.iter().position(|t| *t == label.name).map(|i| &compiled.task_kinds[i]);
        if let Some(values) = kind.and_then(|k| k.label_values()) {
            label.values = values;
        }
    }
    schema
}

/// Reads (or loads from the cache) the experiment's three splits, logging their sizes and
/// the malformed rows skipped in each.
fn load_data(exp: &Experiment, schema: &data::Schema, log: &mut Progress) -> Result<Prepared, String> {
    let paths = exp.split_files()?;
    // `train.threads` (`--threads`) reads train as well as it trains.
    let options = data::PrepareOptions { threads: exp.train.threads.unwrap_or(0), ..exp.data.prepare_options() };
    let prep = data::prepare(schema, &paths, &options).map_err(|e| e.to_string())?;
    log.line(&format!(
        "data: train {} / valid {} / test {} rows, loaded in {:.2}s ({})",
        prep.train.rows,
        prep.valid.rows,
        prep.test.rows,
        prep.stats.total_seconds,
        prep.stats.cache_summary()
    ));
    for (name, count) in skipped_rows(prep.splits()) {
        log.line(&format!("data: skipped {count} malformed rows in {name} (bad_rows: skip)"));
    }
    if prep.train.rows == 0 {
        return Err("the train split has no rows".into());
    }
    Ok(prep)
}

/// The malformed rows skipped in each split that had any, by split name (`metrics.json`'s
/// `skipped_rows`).
fn skipped_rows(data: Splits) -> BTreeMap<String, u64> {
    [("train", data.train), ("valid", data.valid), ("test", data.test)]
        .into_iter()
        .filter(|(_, ds)| ds.skipped.count > 0)
        .map(|(name, ds)| (name.to_string(), ds.skipped.count as u64))
        .collect()
}

/// A finished (or interrupted) run, read back from its folder.
pub struct LoadedRun {
    pub experiment: Experiment,
    /// The data encoders fitted on its train split.
    pub fitted: Fitted,
    pub session: Session,
    /// The best parameters (`best.ckpt`, else `last.ckpt`).
    pub params: HashMap<String, Tensor<f32>>,
}

/// Loads a finished (or interrupted) run: its experiment, fitted data encoders, model and
/// best parameters, every file checked against the run folder's manifest (see
/// [`open_run`]).
pub fn load_run(run: &Path) -> Result<LoadedRun, String> {
    open_run(run, Trust { force: false })
}

/// [`load_run`], with `trust` deciding what a run folder that does not hold together
/// means (an error, or with `--force` a warning): a file changed since the run wrote it,
/// a checkpoint of another run, a folder without a manifest. The model is compiled from
/// the folder's copy of the spec, with a note on stderr when the original has changed.
pub fn open_run(run: &Path, trust: Trust) -> Result<LoadedRun, String> {
    let folder = ReadFolder::open(run, trust)?;
    let cfg = run.join("config.yaml");
    let text = String::from_utf8(folder.read("config.yaml")?).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let exp: Experiment = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let fitted_path = run.join("fitted.json");
    let fitted: Fitted =
        serde_json::from_slice(&folder.read("fitted.json")?).map_err(|e| format!("{}: {e}", fitted_path.display()))?;
    let (spec, notes) = folder.spec(&exp.spec)?;
    for note in notes {
        crate::say!("{note}");
    }
    let session = Session::with_compiled(compile_for_data(&exp, &spec, &fitted)?.0, &fitted)?;
    // best.ckpt, written at the best evaluation; the last parameters only when the run
    // never had one (an undefined validation metric).
    let (best, last) = (run.join("best.ckpt"), run.join("last.ckpt"));
    let ckpt = if best.exists() { best } else { last };
    let loaded = checkpoint::load(&ckpt, &session)?;
    if let Some(manifest) = folder.manifest() {
        trust.checkpoint_id(&ckpt, loaded.run_id.as_deref(), &manifest.run_id)?;
    }
    let state = &loaded.state;
    if ckpt.ends_with("best.ckpt") && state.step != state.best_step {
        trust.problem(format!(
            "{} holds the parameters of step {}, not those of its best step {}",
            ckpt.display(),
            state.step,
            state.best_step
        ))?;
    } else if ckpt.ends_with("last.ckpt") && state.best.is_some() {
        trust.problem(format!(
            "{} is missing: the run's best parameters (step {}) are not in the folder",
            run.join("best.ckpt").display(),
            state.best_step
        ))?;
    }
    Ok(LoadedRun { experiment: exp, fitted, session, params: loaded.params })
}
