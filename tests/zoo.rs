//! The zoo trains: every model spec in specs/ has its experiment `experiments/<name>.yaml`,
//! and 20 steps of it on the real data (batch 1024, default backend) lower the training
//! loss — the mean of steps 11–20 is below the mean of steps 1–10 (`loss.csv`) — and leave
//! a finite valid AUC above chance (a model whose first task ranks sampled candidates, which
//! has no AUC: a valid HR@10 above 0.2, twice the chance of 10 among SASRec's 101).
//!
//! An experiment with stages trains 20 steps in each, evaluated every 10, and each stage
//! watches its own objective (`early_stopping: {metric: loss}`): the stage's objective on
//! the valid split is lower at its 20th step than at its 10th, and the last evaluation's
//! valid AUC (HR@10) is above chance. Why not the train loss, as for one stage: the train
//! loss of a stage's second half and that of its first are means over different batches,
//! and a stage that moves few parameters from a trained start (D-Train's fine-tune of the
//! heads over a frozen backbone) changes its loss by less than that batch-to-batch spread:
//! its train loss went 0.5901 → 0.6015 over 20 steps while it trained, and 0.5905 → 0.6027
//! with nothing trained (`train_only: []`). More steps would shrink the spread only as one
//! over the square root of the steps, at CI's cost. The valid objective is computed on the
//! same rows at both points with evaluation's fixed draws (dropout off, `sample_ids`' fixed
//! negatives), so it is deterministic: any difference is the stage's training, and a stage
//! that trains nothing (`train_only: []`, or a rate of 1e-12) leaves it equal and fails
//! (D-Train's fine-tune so: 0.617443 at both evaluations). The stages keep 20 steps: the
//! last one must bring the model above chance (MoC's CTR stage is at 0.547 after 10).
//!
//! What the runs spend beyond that: a one-stage run is evaluated once, at step 20 (its
//! train-loss halves come from `loss.csv`), and every run scores a 2,000-row sample of its
//! test split at its end, which this test does not read.

mod common;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// Rows of the test split each run scores at its end (a sample: the test reads no test
/// metric).
const TEST_ROWS: usize = 2000;

#[test]
fn every_spec_trains_twenty_steps_with_a_falling_loss() {
    let out_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("zoo");
    let samples = out_root.join("test-samples");
    std::fs::create_dir_all(&samples).unwrap();
    let mut test_samples: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut failures = Vec::new();
    for spec in common::shipped_specs() {
        let name = spec.file_stem().unwrap().to_string_lossy().into_owned();
        let experiment = common::root().join("experiments").join(format!("{name}.yaml"));
        assert!(experiment.exists(), "specs/{name}.mdl has no experiments/{name}.yaml");
        let out = out_root.join(&name);
        let _ = std::fs::remove_dir_all(&out);
        let test = mdl::experiment::load(&experiment, &[]).unwrap().split_files().unwrap().test;
        let at = samples.join(format!("{}.csv", test_samples.len()));
        let sample = test_samples.entry(test.clone()).or_insert_with(|| common::sample_rows(&test, &at, TEST_ROWS));
        let staged = common::every_stage_steps(&experiment, 20, true);
        let mut sets: Vec<String> = match &staged {
            Some((stages, _)) => vec![stages.clone(), "train.eval_every=10".into()],
            None => vec!["train.max_steps=20".into(), "train.eval_every=20".into()],
        };
        sets.push("train.batch_size=1024".into());
        sets.push(format!("data.test={}", sample.display()));
        let run = Command::new(env!("CARGO_BIN_EXE_mdl"))
            .args(["run", experiment.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
            .current_dir(common::root())
            .env("MDL_CACHE_DIR", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache"))
            .env("CI", "1")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&run.stderr).into_owned();
        if !run.status.success() {
            failures.push(format!("{name}: mdl run failed\n{log}"));
            continue;
        }
        let curve = std::fs::read_to_string(out.join("curve.csv")).unwrap();
        let header: Vec<&str> = curve.lines().next().unwrap_or_default().split(',').collect();
        let rows: Vec<Vec<f64>> =
            curve.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect()).collect();
        // A model ranking sampled candidates (no AUC) is judged by its HR@10 instead.
        let (metric, chance) =
            if rows.iter().all(|r| r[3].is_nan()) { ("valid_hr@10", 0.2) } else { ("valid_auc", 0.55) };
        let at = header.iter().position(|h| *h == metric);
        let above_chance = at.is_some_and(|i| rows.last().is_some_and(|r| r[i] > chance));
        let ok = match &staged {
            // Two evaluations per stage, the second with the lower valid objective.
            Some((_, stages)) => {
                let objective = header.iter().position(|h| *h == "valid_loss");
                let falls = |pair: &[Vec<f64>]| objective.is_some_and(|i| pair[1][i] < pair[0][i]);
                rows.len() == 2 * stages && rows.chunks(2).all(falls) && above_chance
            }
            None => {
                let losses = step_losses(&out);
                let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
                rows.len() == 1 && losses.len() == 20 && mean(&losses[10..]) < mean(&losses[..10]) && above_chance
            }
        };
        eprintln!("{name}: {}", curve.lines().skip(1).collect::<Vec<_>>().join(" | "));
        if !ok {
            let losses = std::fs::read_to_string(out.join("loss.csv")).unwrap_or_default();
            failures.push(format!("{name}: a loss did not fall or {metric} near chance:\n{curve}{losses}"));
        } else {
            // Run folders with checkpoints came to 1.5 GB for the zoo: a passing spec's goes
            // at once, a failing one's stays to be read.
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The training loss of every step of the run in `out`, from its `loss.csv`.
fn step_losses(out: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("loss.csv")).unwrap_or_default();
    text.lines().skip(1).filter_map(|l| l.rsplit(',').next()?.parse().ok()).collect()
}
