//! `mdl bench`: how fast an experiment's model compiles, trains and evaluates on a
//! backend, on the experiment's real data. Prints figures; asserts nothing.

use crate::data::{self, PrepareOptions};
use crate::experiment::Experiment;
use crate::train::{make_executor, Session};
use mdl_runtime::exec::Mode;
use mdl_runtime::optim::Optimizer;
use mdl_runtime::tensor::Value;
use std::collections::HashMap;
use std::time::Instant;

/// What one benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub backend: String,
    pub model: String,
    pub batch: usize,
    pub compile_ms: f64,
    pub first_step_ms: f64,
    pub step_ms: f64,
    pub train_samples_per_sec: f64,
    pub eval_samples_per_sec: f64,
    pub profile: Vec<(String, std::time::Duration, usize)>,
    pub timed_steps: usize,
}

/// Runs `steps` timed training steps (after one warm-up step) and a timed evaluation.
pub fn bench(exp: &Experiment, steps: usize) -> Result<BenchReport, String> {
    let paths = exp.split_paths()?;
    let prep = data::prepare(&exp.data.schema, &paths, &PrepareOptions { bad_rows: exp.data.bad_rows.into(), ..Default::default() })
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let session = Session::new(exp, &prep.fitted)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut exec = make_executor(&exp.backend)?;
    let mut params = mdl_runtime::init::init_params::<f32>(session.params(), &session.inputs.sizes, exp.train.seed)?;
    let mut opt = Optimizer::<f32>::new(crate::train::optim_config(exp))?;
    let bs = exp.train.batch_size.min(prep.train.rows);
    let mut batches = data::MiniBatches::new(prep.train.rows, bs, exp.train.seed);
    let order: Vec<Vec<usize>> = batches.epoch(0).map(|c| c.to_vec()).filter(|c| c.len() == bs).collect();
    if order.is_empty() {
        return Err("the train split is smaller than one batch".into());
    }
    let mut batch = prep.train.new_batch();
    let mut step = |i: usize, exec: &mut dyn mdl_runtime::backend::Executor, params: &mut HashMap<String, mdl_runtime::Tensor<f32>>| -> Result<(), String> {
        prep.train.gather(&order[i % order.len()], &mut batch).map_err(|e| e.to_string())?;
        let feeds = session.inputs.feeds(&batch);
        let binding = session.inputs.with_batch(batch.rows);
        let mut out = exec
            .run(&session.train_graph, &binding, &feeds, params, &Mode::train(exp.train.seed, i as u64))
            .map_err(|e| e.to_string())?;
        let mut grads: HashMap<String, Value<f32>> = HashMap::new();
        for p in session.params() {
            if let Some(g) = out.take_output(&format!("grad/{}", p.name)) {
                grads.insert(p.name.clone(), g);
            }
        }
        if let Some(c) = exp.train.clip_norm {
            mdl_runtime::optim::clip_global_norm(&mut grads, c);
        }
        opt.step(params, &grads, session.params(), &|_| false, 1.0)
    };
    let t = Instant::now();
    step(0, exec.as_mut(), &mut params)?;
    let first_step_ms = t.elapsed().as_secs_f64() * 1e3;
    exec.set_profiling(true);
    let t = Instant::now();
    for i in 1..=steps {
        step(i, exec.as_mut(), &mut params)?;
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let profile = exec.profile();
    exec.set_profiling(false);
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
    Ok(BenchReport {
        backend: exp.backend.clone(),
        model: session.compiled.model.clone(),
        batch: bs,
        compile_ms,
        first_step_ms,
        step_ms,
        train_samples_per_sec: bs as f64 / (step_ms / 1e3),
        eval_samples_per_sec: rows as f64 / eval_secs.max(1e-9),
        profile,
        timed_steps: steps,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model {} on {} at batch {}", self.model, self.backend, self.batch)?;
        writeln!(f, "  compile (parse -> graphs with backward)   {:10.1} ms", self.compile_ms)?;
        writeln!(f, "  first train step (incl. plan/kernels)     {:10.1} ms", self.first_step_ms)?;
        writeln!(f, "  train step (forward + backward + update)  {:10.1} ms   {:10.0} samples/s", self.step_ms, self.train_samples_per_sec)?;
        writeln!(f, "  eval (forward)                                            {:10.0} samples/s", self.eval_samples_per_sec)?;
        if self.profile.is_empty() {
            writeln!(f, "  (no per-op profile: the {} backend does not collect one)", self.backend)?;
        } else {
            let total: f64 = self.profile.iter().map(|p| p.1.as_secs_f64()).sum();
            let steps = self.timed_steps.max(1) as f64;
            writeln!(f, "  per op kind, averaged over the timed steps (ops total {:.1} ms/step):", total * 1e3 / steps)?;
            writeln!(f, "    {:<28} {:>10} {:>8} {:>10}", "op", "ms/step", "share", "calls/step")?;
            for (name, d, calls) in &self.profile {
                let ms = d.as_secs_f64() * 1e3 / steps;
                writeln!(f, "    {:<28} {:>10.2} {:>7.1}% {:>10.1}", name, ms, 100.0 * d.as_secs_f64() / total.max(1e-12), *calls as f64 / steps)?;
            }
        }
        Ok(())
    }
}
