//! `mdl bench`: how fast an experiment's model compiles, trains and evaluates on a
//! backend, on the experiment's real data. Prints figures; asserts nothing.
//!
//! It also gives the GEMM-bound limit of a training step ([`GemmBound`]): the matrix
//! products of the training graph (MatMul, GroupMatMul, GroupOuter) and their time per
//! step, and `batch / that time`, the most samples/s any step could reach while it still
//! does those products at that speed. The time is the products' own share of the per-op
//! profile (the same kernels on the same shapes inside the step); a backend without a
//! profile has each product timed alone instead (which then includes the backend's
//! per-run overhead, so the limit comes out low).

use crate::backends::Backend;
use crate::data;
use crate::experiment::Experiment;
use crate::train::{compile_before_data, compile_for_data, Session};
use mdl_runtime::exec::Mode;
use mdl_runtime::ir::dim::eval_shape;
use mdl_runtime::ops::Op;
use mdl_runtime::optim::Optimizer;
use mdl_runtime::tensor::{Tensor, Value};
use mdl_runtime::training::{train_step, TrainStep};
use mdl_runtime::{Binding, DType, Dim, Graph};
use std::collections::HashMap;
use std::time::Instant;

/// What one benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub backend: Backend,
    /// The backend's device, for one that has one ([`Executor::device_name`]).
    ///
    /// [`Executor::device_name`]: mdl_runtime::backend::Executor::device_name
    pub device: Option<String>,
    pub model: String,
    pub batch: usize,
    pub compile_ms: f64,
    /// Graphs → the backend's runnable plans ([`Session::prepare`]).
    pub plan_ms: f64,
    pub first_step_ms: f64,
    pub step_ms: f64,
    /// Of `step_ms`: the optimizer update (with clipping), after the graph ran.
    pub update_ms: f64,
    /// Bytes written to and read from the device per timed step (device backends).
    pub transfers_per_step: Option<(f64, f64)>,
    pub train_samples_per_sec: f64,
    pub eval_samples_per_sec: f64,
    pub profile: Vec<(String, std::time::Duration, usize)>,
    /// The slowest nodes of the step, largest first (`mdl bench --nodes N`: up to N; empty
    /// without).
    pub nodes: Vec<mdl_runtime::backend::NodeTime>,
    pub timed_steps: usize,
    pub gemm: GemmBound,
}

/// The matrix products of one training step, and how fast the backend does them alone.
#[derive(Clone, Debug, Default)]
pub struct GemmBound {
    /// Product nodes in the training graph.
    pub products: usize,
    /// Their floating-point operations per step (2 per multiply-add).
    pub flops_per_step: f64,
    /// Their time per step: inside the step (from the profile) or each run alone.
    pub secs_per_step: f64,
    pub timed_in_step: bool,
}

impl GemmBound {
    pub fn gflops(&self) -> f64 {
        self.flops_per_step / self.secs_per_step.max(1e-12) / 1e9
    }
}

/// Multiply-adds of a product node from its operand and output shapes.
fn product_flops(op: &Op, inputs: &[Vec<usize>], out: &[usize]) -> f64 {
    let numel = |s: &[usize]| s.iter().product::<usize>() as f64;
    let last = |s: &[usize]| s.last().copied().unwrap_or(1) as f64;
    match op {
        // out [..., m, n] from a [..., m, k]: k is a's contracted axis.
        Op::MatMul { trans_a, .. } => {
            let a = &inputs[0];
            let k = if *trans_a { a.get(a.len().wrapping_sub(2)).copied().unwrap_or(1) as f64 } else { last(a) };
            2.0 * numel(out) * k
        }
        // out [N, n] from x [N, k].
        Op::GroupMatMul { .. } => 2.0 * numel(out) * last(&inputs[0]),
        // x [N, k], dy [N, n].
        Op::GroupOuter { .. } => 2.0 * numel(&inputs[0]) * last(&inputs[1]),
        _ => 0.0,
    }
}

/// Counts the matrix products of `graph` and their flops; with `time_alone`, also times
/// each alone on `exec` (random operands, the shapes of `binding`; identical products are
/// timed once).
fn gemm_bound(
    graph: &Graph,
    binding: &Binding,
    exec: &mut dyn mdl_runtime::backend::Executor,
    time_alone: bool,
) -> Result<GemmBound, String> {
    let mut timed: HashMap<String, f64> = HashMap::new();
    let mut bound = GemmBound::default();
    for id in graph.ids() {
        let node = graph.node(id);
        if !matches!(node.op, Op::MatMul { .. } | Op::GroupMatMul { .. } | Op::GroupOuter { .. }) {
            continue;
        }
        let inputs: Vec<Vec<usize>> =
            node.inputs.iter().map(|&i| eval_shape(graph.shape(i), binding)).collect::<Result<_, _>>()?;
        let out = eval_shape(graph.shape(id), binding)?;
        bound.products += 1;
        bound.flops_per_step += product_flops(&node.op, &inputs, &out);
        if !time_alone {
            continue;
        }
        let key = format!("{} {inputs:?}", node.op.name());
        if let Some(secs) = timed.get(&key) {
            bound.secs_per_step += secs;
            continue;
        }
        let mut g = Graph::new();
        let mut feeds = HashMap::new();
        let mut operands = Vec::new();
        for (slot, (&src, shape)) in node.inputs.iter().zip(&inputs).enumerate() {
            let name = format!("x{slot}");
            let ids = graph.sig(src).dtype == DType::I;
            operands.push(g.input(&name, shape.iter().map(|&d| Dim::from(d)).collect(), graph.sig(src).dtype));
            let n: usize = shape.iter().product();
            let value = if ids {
                // Group ids: spread over the groups (the weight's first axis for GroupMatMul).
                let groups = inputs.get(1).and_then(|w| w.first()).copied().unwrap_or(1).max(1) as u32;
                let groups = if let Op::GroupOuter { groups: g } = &node.op { g.eval(binding)? as u32 } else { groups };
                Value::Ids(Tensor { shape: shape.clone(), data: (0..n as u32).map(|i| i % groups.max(1)).collect() })
            } else {
                Value::Dense(Tensor {
                    shape: shape.clone(),
                    data: (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect(),
                })
            };
            feeds.insert(name, value);
        }
        let y = g.add(node.op.clone(), &operands, "bench").map_err(|e| e.0)?;
        g.outputs.insert("y".into(), y);
        let params = HashMap::new();
        let mode = Mode::eval();
        exec.run(&g, binding, &feeds, &params, &mode).map_err(|e| e.to_string())?;
        let (mut reps, t) = (0u32, Instant::now());
        while reps < 3 || (t.elapsed().as_secs_f64() < 0.05 && reps < 200) {
            exec.run(&g, binding, &feeds, &params, &mode).map_err(|e| e.to_string())?;
            reps += 1;
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        timed.insert(key, secs);
        bound.secs_per_step += secs;
    }
    Ok(bound)
}

/// The experiment's spec compiled into a session on its prepared data (`prepared`, else
/// read and prepared here): the session, the data, and the milliseconds from the spec to
/// the graphs with backward (reading and preparing the data untimed).
fn compiled_session(
    exp: &Experiment,
    prepared: Option<data::Prepared>,
) -> Result<(Session, data::Prepared, f64), String> {
    // The spec first: a bad one is reported before any data is read.
    let t = Instant::now();
    let early = compile_before_data(exp, &exp.spec)?;
    let spec_time = t.elapsed();
    let paths = exp.split_files()?;
    let schema = match &early {
        Some((compiled, _)) => crate::train::label_schema(&exp.data.schema, compiled),
        None => exp.data.schema.clone(),
    };
    let prep = match prepared {
        Some(prep) => prep,
        None => data::prepare(&schema, &paths, &exp.data.prepare_options()).map_err(|e| e.to_string())?,
    };
    let t = Instant::now();
    let compiled = match early {
        Some((compiled, _)) => compiled,
        None => {
            let (compiled, _) = compile_for_data(exp, &exp.spec, &prep.fitted)?;
            if crate::train::label_schema(&exp.data.schema, &compiled) != schema {
                return Err("a spec that needs sizes only the prepared data gives takes 0/1 labels only for now".into());
            }
            compiled
        }
    };
    let session = Session::with_compiled(compiled, &prep.fitted)?;
    let compile_ms = (t.elapsed() + spec_time).as_secs_f64() * 1e3;
    Ok((session, prep, compile_ms))
}

/// What `mdl bench --compile-only` measured: the compile and the runnable plans, each
/// time over (a fresh executor each time).
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub backend: Backend,
    pub model: String,
    /// Spec → graphs with backward, in ms, per repeat.
    pub compile_ms: Vec<f64>,
    /// Graphs → the backend's runnable plans, in ms, per repeat.
    pub plan_ms: Vec<f64>,
    /// The CPU time of the calling thread over the whole compile to runnable plans, in ms,
    /// per repeat (on Linux; the compile and the kernels' codegen run on it). On a busy
    /// machine it is the honest figure: the wall time also counts waiting for a core.
    pub cpu_ms: Vec<f64>,
}

/// Compiles the experiment's spec to runnable plans `repeats` times (at least once), timing
/// each part; no step runs.
pub fn bench_compile(exp: &Experiment, repeats: usize) -> Result<CompileReport, String> {
    let mut report = CompileReport {
        backend: exp.backend,
        model: String::new(),
        compile_ms: vec![],
        plan_ms: vec![],
        cpu_ms: vec![],
    };
    let mut prepared = Some(compiled_session(exp, None)?.1);
    for _ in 0..repeats.max(1) {
        let mut exec = exp.executor()?;
        let cpu = crate::cputime::this_thread();
        let (session, prep, compile_ms) = compiled_session(exp, prepared.take())?;
        let plan_ms = session.prepare(exec.as_mut(), exp.train.batch_size.min(prep.train.rows))?;
        if let (Some(start), Some(end)) = (cpu, crate::cputime::this_thread()) {
            report.cpu_ms.push((end - start).as_secs_f64() * 1e3);
        }
        report.model.clone_from(&session.compiled.model);
        report.compile_ms.push(compile_ms);
        report.plan_ms.push(plan_ms);
        prepared = Some(prep);
    }
    Ok(report)
}

impl std::fmt::Display for CompileReport {
    /// The compile's minimum and median over the repeats; the plans of the first repeat
    /// (every kernel compiled, as a run pays) and of the later ones (the process's kernel
    /// cache hit); in all, the compile's minimum plus the first plans; the thread's CPU time.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let first_plans = self.plan_ms.first().copied().unwrap_or(f64::NAN);
        writeln!(f, "model {} on {}, compiled {} times", self.model, self.backend, self.compile_ms.len())?;
        writeln!(
            f,
            "  compile (parse -> graphs with backward)   {:10.1} ms min, {:.1} ms median",
            min(&self.compile_ms),
            median(&self.compile_ms)
        )?;
        write!(f, "  runnable plans (fusion + kernels)         {first_plans:10.1} ms the first")?;
        match self.plan_ms.get(1..).filter(|later| !later.is_empty()) {
            Some(later) => writeln!(f, ", {:.1} ms min with the kernels cached", min(later))?,
            None => writeln!(f)?,
        }
        writeln!(f, "  compile to runnable plans, in all         {:10.1} ms", min(&self.compile_ms) + first_plans)?;
        if let Some(first) = self.cpu_ms.first() {
            write!(f, "  CPU time of the thread, in all            {first:10.1} ms the first")?;
            match self.cpu_ms.get(1..).filter(|later| !later.is_empty()) {
                Some(later) => writeln!(f, ", {:.1} ms min with the kernels cached", min(later))?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// Runs `steps` timed training steps (after one warm-up step) and a timed evaluation.
/// `nodes`: how many of the slowest nodes the report lists (0: none; timing by node adds
/// its bookkeeping to the step).
pub fn bench(exp: &Experiment, steps: usize, nodes: usize) -> Result<BenchReport, String> {
    // The backend first: a missing device is reported before any data is read.
    let mut exec = exp.executor()?;
    let (products, products_line) = exp.products()?;
    if let Some(line) = &products_line {
        crate::say!("{line}");
    }
    let (session, prep, compile_ms) = compiled_session(exp, None)?;
    let bs = exp.train.batch_size.min(prep.train.rows);
    crate::train::memory::check_run(&session, exp, bs)?;
    let plan_ms = session.prepare(exec.as_mut(), bs)?;
    let mut params = session.initial_tensors(exp.train.seed)?;
    let mut opt = Optimizer::<f32>::new(crate::train::optim_config(exp))?;
    let mut batches = data::MiniBatches::new(prep.train.rows, bs, exp.train.seed);
    let order: Vec<Vec<usize>> = batches.epoch(0).map(|c| c.to_vec()).filter(|c| c.len() == bs).collect();
    if order.is_empty() {
        return Err("the train split is smaller than one batch".into());
    }
    let mut batch = prep.train.new_batch();
    // One training step; returns the seconds its optimizer update took.
    let mut step = |i: usize,
                    exec: &mut dyn mdl_runtime::backend::Executor,
                    params: &mut HashMap<String, mdl_runtime::Tensor<f32>>|
     -> Result<f64, String> {
        prep.train.gather(&order[i % order.len()], &mut batch).map_err(|e| e.to_string())?;
        let feeds = session.inputs.feeds(&batch);
        let binding = session.inputs.with_batch(batch.rows);
        let step = TrainStep {
            graph: &session.train_graph,
            binding: &binding,
            feeds: &feeds,
            mode: &Mode::train(exp.train.seed, i as u64),
            info: session.params(),
            frozen: &|_| false,
            clip_norm: exp.train.clip_norm,
            lr_scale: &mdl_runtime::optim::LrScale::from(1.0),
        };
        Ok(train_step(exec, &step, params, &mut opt)?.update_secs)
    };
    let t = Instant::now();
    step(0, exec.as_mut(), &mut params)?;
    let first_step_ms = t.elapsed().as_secs_f64() * 1e3;
    exec.set_profiling(true);
    exec.set_profiling_by_node(nodes > 0);
    let moved_before = exec.transfers();
    let t = Instant::now();
    let mut update_secs = 0.0;
    for i in 1..=steps {
        update_secs += step(i, exec.as_mut(), &mut params)?;
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let update_ms = update_secs * 1e3 / steps.max(1) as f64;
    let per_step = |a: u64, b: u64| (b - a) as f64 / steps.max(1) as f64;
    let transfers_per_step = match (moved_before, exec.transfers()) {
        (Some((u0, d0)), Some((u1, d1))) => Some((per_step(u0, u1), per_step(d0, d1))),
        _ => None,
    };
    let profile = exec.profile();
    let mut node_times = exec.node_profile();
    node_times.truncate(nodes);
    exec.set_profiling(false);
    exec.set_profiling_by_node(false);
    // Evaluation: forward only over (up to) 8 batches of valid.
    let rows = prep.valid.rows.min(bs * 8);
    let sample: Vec<usize> = (0..rows).collect();
    let mut eval_ds_batch = prep.valid.new_batch();
    let t = Instant::now();
    for chunk in sample.chunks(bs) {
        prep.valid.gather(chunk, &mut eval_ds_batch).map_err(|e| e.to_string())?;
        let feeds = session.inputs.feeds(&eval_ds_batch);
        let binding = session.inputs.with_batch(eval_ds_batch.rows);
        exec.run(&session.eval_graph, &binding, &feeds, &params, &Mode::eval()).map_err(|e| e.to_string())?;
    }
    let eval_secs = t.elapsed().as_secs_f64();
    let product_kinds = ["matmul", "group_matmul", "group_outer"];
    let in_step: Vec<f64> =
        profile.iter().filter(|p| product_kinds.contains(&p.0.as_str())).map(|p| p.1.as_secs_f64()).collect();
    let binding = session.inputs.with_batch(bs);
    let mut gemm = gemm_bound(&session.train_graph, &binding, exec.as_mut(), in_step.is_empty())?;
    if !in_step.is_empty() {
        gemm.secs_per_step = in_step.iter().sum::<f64>() / steps.max(1) as f64;
        gemm.timed_in_step = true;
    }
    Ok(BenchReport {
        backend: exp.backend,
        // The jit's "device" is its thread count, which the step time depends on.
        device: exec.device_name().or_else(|| {
            (exp.backend == Backend::Jit).then(|| {
                let n = exp.train.threads.unwrap_or_else(mdl_runtime::backend::jit::default_threads);
                let products = match products {
                    mdl_runtime::backend::jit::Products::F32 => String::new(),
                    mdl_runtime::backend::jit::Products::Bf16(dot) => format!(", bf16 products ({})", dot.describe()),
                };
                format!("{n} thread{}{products}", if n == 1 { "" } else { "s" })
            })
        }),
        model: session.compiled.model.clone(),
        batch: bs,
        compile_ms,
        plan_ms,
        first_step_ms,
        step_ms,
        update_ms,
        transfers_per_step,
        train_samples_per_sec: bs as f64 / (step_ms / 1e3),
        eval_samples_per_sec: rows as f64 / eval_secs.max(1e-9),
        profile,
        nodes: node_times,
        timed_steps: steps,
        gemm,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device {
            Some(d) => writeln!(f, "model {} on {} ({d}) at batch {}", self.model, self.backend, self.batch)?,
            None => writeln!(f, "model {} on {} at batch {}", self.model, self.backend, self.batch)?,
        }
        writeln!(f, "  compile (parse -> graphs with backward)   {:10.1} ms", self.compile_ms)?;
        writeln!(f, "  runnable plans (fusion + kernels)         {:10.1} ms", self.plan_ms)?;
        writeln!(f, "  compile to runnable plans, in all         {:10.1} ms", self.compile_ms + self.plan_ms)?;
        writeln!(f, "  first train step                          {:10.1} ms", self.first_step_ms)?;
        writeln!(
            f,
            "  train step (forward + backward + update)  {:10.1} ms   {:10.0} samples/s",
            self.step_ms, self.train_samples_per_sec
        )?;
        writeln!(f, "    of which the optimizer update            {:10.1} ms", self.update_ms)?;
        if let Some((up, down)) = self.transfers_per_step {
            writeln!(f, "    host -> device {:.2} MB, device -> host {:.2} MB per step", up / 1e6, down / 1e6)?;
        }
        writeln!(
            f,
            "  eval (forward)                                            {:10.0} samples/s",
            self.eval_samples_per_sec
        )?;
        let g = &self.gemm;
        if g.products > 0 {
            let limit = self.batch as f64 / g.secs_per_step.max(1e-12);
            writeln!(
                f,
                "  GEMM-bound limit: {} products, {:.2} GFLOP/step ({:.0} kFLOP/sample) at {:.1} GFLOP/s ({}) -> {:.0} samples/s; this step reaches {:.1}%",
                g.products,
                g.flops_per_step / 1e9,
                g.flops_per_step / self.batch as f64 / 1e3,
                g.gflops(),
                if g.timed_in_step { "inside the step" } else { "each timed alone" },
                limit,
                100.0 * self.train_samples_per_sec / limit
            )?;
        }
        if self.profile.is_empty() {
            writeln!(f, "  (no per-op profile: the {} backend does not collect one)", self.backend)?;
        } else {
            let total: f64 = self.profile.iter().map(|p| p.1.as_secs_f64()).sum();
            let steps = self.timed_steps.max(1) as f64;
            writeln!(
                f,
                "  per op kind, averaged over the timed steps (ops total {:.1} ms/step):",
                total * 1e3 / steps
            )?;
            writeln!(f, "    {:<28} {:>10} {:>8} {:>10}", "op", "ms/step", "share", "calls/step")?;
            for (name, d, calls) in &self.profile {
                let ms = d.as_secs_f64() * 1e3 / steps;
                writeln!(
                    f,
                    "    {:<28} {:>10.2} {:>7.1}% {:>10.1}",
                    name,
                    ms,
                    100.0 * d.as_secs_f64() / total.max(1e-12),
                    *calls as f64 / steps
                )?;
            }
            if !self.nodes.is_empty() {
                writeln!(
                    f,
                    "  the {} slowest nodes (where in the spec: the node's scope, grad: for the backward; shapes as declared):",
                    self.nodes.len()
                )?;
                writeln!(f, "    {:>10} {:>8}  op", "ms/step", "share")?;
                for n in &self.nodes {
                    let ms = n.time.as_secs_f64() * 1e3 / steps;
                    let share = 100.0 * n.time.as_secs_f64() / total.max(1e-12);
                    writeln!(
                        f,
                        "    {ms:>10.2} {share:>7.1}%  {}  {} <- {}  # {}",
                        n.kind,
                        n.shape,
                        n.operands.join(", "),
                        n.scope
                    )?;
                }
            }
        }
        Ok(())
    }
}
