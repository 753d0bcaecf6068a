//! The zoo trains: every model spec in specs/ has its experiment `experiments/<name>.yaml`,
//! and 20 steps of it on the real data (batch 1024, default backend) lower the training
//! loss — the mean of steps 11–20 is below the mean of steps 1–10 — and leave a finite
//! valid AUC above chance (a model whose first task ranks sampled candidates, which has no
//! AUC: a valid HR@10 above 0.2, twice the chance of 10 among SASRec's 101). An experiment
//! with stages trains 20 steps in each, evaluated every 10: each stage's loss falls (the mean
//! of its steps 11–20 below that of its steps 1–10), and the last evaluation's valid AUC is
//! above chance.

mod common;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_spec_trains_twenty_steps_with_a_falling_loss() {
    let out_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("zoo");
    let mut failures = Vec::new();
    for spec in common::shipped_specs() {
        let name = spec.file_stem().unwrap().to_string_lossy().into_owned();
        let experiment = common::root().join("experiments").join(format!("{name}.yaml"));
        assert!(experiment.exists(), "specs/{name}.mdl has no experiments/{name}.yaml");
        let out = out_root.join(&name);
        let _ = std::fs::remove_dir_all(&out);
        let staged = common::every_stage_steps(&experiment, 20);
        let length: Vec<String> = match &staged {
            Some((stages, _)) => vec![stages.clone(), "train.eval_every=10".into()],
            None => vec!["train.max_steps=20".into(), "train.eval_every=10".into()],
        };
        let run = Command::new(env!("CARGO_BIN_EXE_mdl"))
            .args(["run", experiment.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--set", "train.batch_size=1024"])
            .args(length.iter().flat_map(|s| ["--set", s.as_str()]))
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
        let ok = match &staged {
            // Two evaluations per stage, the second of each with the lower train loss.
            Some((_, stages)) => {
                let at_last = at.is_some_and(|i| rows.last().is_some_and(|r| r[i] > chance));
                rows.len() == 2 * stages && rows.chunks(2).all(|pair| pair[1][2] < pair[0][2]) && at_last
            }
            None => rows.len() == 2 && rows[1][2] < rows[0][2] && at.is_some_and(|i| rows[1][i] > chance),
        };
        eprintln!("{name}: {}", curve.lines().skip(1).collect::<Vec<_>>().join(" | "));
        if !ok {
            failures.push(format!("{name}: loss did not fall or {metric} near chance:\n{curve}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
