//! Run-folder cases: a copy of run A (finished, or stopped after 2 steps for `--resume`)
//! with one of its files corrupted (bytes or one digit changed, truncated, emptied,
//! deleted, replaced by a folder, or swapped with run B's file or its other checkpoint),
//! then `eval`, `predict`, `report` or `--resume` on it. The verdict: an error, or exactly
//! the clean result (eval's report, predict's scores, report's table; after a resume,
//! run A's `metrics.json` and `curve.csv` byte for byte and its checkpoints' tensors: their
//! metadata names another run).
//!
//! The copy keeps the folder's `manifest.json` and `spec/`, so every file the run wrote is
//! checked: the corruptions of the findings 3 and 5 (a swapped checkpoint, a changed
//! `fitted.json`) are in every case.

use super::fixture::copy_folder;
use super::{corrupt_bytes, describe, Described, Draw, Fixture, Verdict};
use crate::data::BadRows;
use crate::train::{self, RunOptions};
use mdl_runtime::rng::SplitMix64;
use std::path::Path;

/// The files of a run folder.
const FILES: &[&str] =
    &["config.yaml", "fitted.json", "metrics.json", "curve.csv", "best.ckpt", "last.ckpt", "timing.json", "train.log"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eval,
    Predict,
    Report,
    Resume,
}

/// Corrupts `file` in the run folder `run`; returns what it did.
fn corrupt(rng: &mut SplitMix64, fx: &Fixture, run: &Path, file: &str) -> String {
    let path = run.join(file);
    let choices: &[u64] = if file.ends_with(".ckpt") { &[0, 1, 2, 3, 4, 5, 6, 7] } else { &[0, 1, 2, 3, 4, 5] };
    match *rng.pick(choices) {
        0 => {
            let _ = std::fs::remove_file(&path);
            "deleted".into()
        }
        1 => {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::create_dir_all(&path);
            "replaced by a folder".into()
        }
        2 => {
            // One digit changed: the corruption a checksum exists for.
            let mut bytes = std::fs::read(&path).unwrap_or_default();
            let digits: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i].is_ascii_digit()).collect();
            if digits.is_empty() {
                return "no digit to change".into();
            }
            let i = *rng.pick(&digits);
            let new = b'0' + ((bytes[i] - b'0' + 1 + rng.below(9) as u8) % 10);
            bytes[i] = new;
            let _ = std::fs::write(&path, &bytes);
            format!("digit at byte {i} set to {}", new as char)
        }
        6 => {
            let _ = std::fs::copy(fx.run_b.join(file), &path);
            "replaced by run B's".into()
        }
        7 => {
            let other = if file == "best.ckpt" { "last.ckpt" } else { "best.ckpt" };
            let _ = std::fs::copy(fx.run_a.join(other), &path);
            format!("replaced by run A's {other}")
        }
        _ => {
            let mut bytes = std::fs::read(&path).unwrap_or_default();
            let what = corrupt_bytes(rng, &mut bytes);
            let _ = std::fs::write(&path, &bytes);
            what
        }
    }
}

pub(super) fn case(fx: &Fixture, rng: &mut SplitMix64, _known: bool, dir: &Path, input: &Described) -> Verdict {
    let op = match rng.below(20) {
        0..=7 => Op::Eval,
        8..=13 => Op::Predict,
        14..=17 => Op::Report,
        _ => Op::Resume,
    };
    let file = *rng.pick(FILES);
    let run = dir.join("runA");
    let source = if op == Op::Resume { &fx.run_a_partial } else { &fx.run_a };
    if copy_folder(source, &run).is_err() {
        return Verdict::Rejected;
    }
    let what = corrupt(rng, fx, &run, file);
    describe(input, format!("{op:?} with {file} {what}"));
    let silent = |what: &str| Verdict::Silent(format!("{op:?} succeeded with {what} different from the clean run's"));
    match op {
        Op::Eval | Op::Predict => {
            let result = (|| -> Result<(String, Vec<f32>), String> {
                let loaded = train::load_run(&run)?;
                let (path, text) = &fx.splits[2];
                let ds = loaded.fitted.encode_text(path, text, BadRows::Fail).map_err(|e| e.to_string())?;
                let mut exec = loaded.experiment.backend.executor()?;
                let batch = loaded.experiment.train.batch_size;
                if op == Op::Eval {
                    let report = loaded.session.evaluate(exec.as_mut(), &loaded.params, &ds, batch)?;
                    Ok((serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?, Vec::new()))
                } else {
                    Ok((String::new(), loaded.session.predict(exec.as_mut(), &loaded.params, &ds, batch)?))
                }
            })();
            match result {
                Err(_) => Verdict::Rejected,
                Ok((report, _)) if op == Op::Eval => {
                    if report == fx.clean_eval {
                        Verdict::Accepted
                    } else {
                        silent("a report")
                    }
                }
                Ok((_, scores)) => {
                    if scores.iter().map(|s| s.to_bits()).eq(fx.clean_scores.iter().map(|s| s.to_bits())) {
                        Verdict::Accepted
                    } else {
                        silent("scores")
                    }
                }
            }
        }
        Op::Report => match crate::report::summarize(&run) {
            Err(_) => Verdict::Rejected,
            Ok(summary) => {
                if crate::report::markdown(&[summary]) == fx.clean_report {
                    Verdict::Accepted
                } else {
                    silent("a table")
                }
            }
        },
        Op::Resume => {
            let resumed = crate::cli::resumed_experiment(&run, &[], false).and_then(|exp| {
                train::train(&exp, &RunOptions { out: Some(run.clone()), resume: true, force: false, stop_after: None })
            });
            if resumed.is_err() {
                return Verdict::Rejected;
            }
            for f in ["metrics.json", "curve.csv"] {
                if std::fs::read(run.join(f)).ok() != std::fs::read(fx.run_a.join(f)).ok() {
                    return silent(f);
                }
            }
            for f in ["best.ckpt", "last.ckpt"] {
                let tensors = |dir: &Path| mdl_runtime::checkpoint::load(&dir.join(f)).ok().map(|(t, _)| t);
                if tensors(&run) != tensors(&fx.run_a) {
                    return silent(f);
                }
            }
            Verdict::Accepted
        }
    }
}
