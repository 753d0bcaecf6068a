//! The analysis side of a run folder through the `mdl` binary, on one short MMoE run (two
//! tasks, per-domain metrics) on the bundled kuairand_pure_tail: `curve_tasks.csv` keeps
//! every task's valid metrics (long_view's too) per evaluation and domain, `loss.csv` one
//! loss per step.

mod common;
use common::scoring::{mdl, ok, tmp};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A 4-step MMoE run evaluated every 2 steps, trained once for the tests of this file.
fn mmoe_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tmp("analysis", "mmoe").join("run");
        ok(&mdl(&[
            "run",
            "experiments/mmoe.yaml",
            "--out",
            dir.to_str().unwrap(),
            "--set",
            "train.batch_size=512",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.eval_every=2",
        ]));
        dir
    })
}

/// The rows of a CSV file as maps from its header's names.
fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines.map(|l| header.iter().map(|h| h.to_string()).zip(l.split(',').map(str::to_string)).collect()).collect()
}

#[test]
fn curve_tasks_keeps_every_task_per_evaluation_and_domain() {
    let run = mmoe_run();
    let rows = csv_rows(&run.join("curve_tasks.csv"));
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("metrics.json")).unwrap()).unwrap();
    for task in ["click", "long_view"] {
        let per_domain = metrics["valid"]["per_task"][task]["per_domain"].as_object().unwrap();
        assert!(per_domain.len() > 1, "{metrics}");
        // A domain with one class in valid has no AUC (and no row for it); LogLoss it has.
        let domains: Vec<&String> = per_domain.iter().filter(|(_, m)| m["auc"].is_f64()).map(|(d, _)| d).collect();
        assert!(!domains.is_empty());
        for step in ["2", "4"] {
            let overall: Vec<_> =
                rows.iter().filter(|r| r["task"] == task && r["step"] == step && r["domain"].is_empty()).collect();
            let names: Vec<&str> = overall.iter().map(|r| r["metric"].as_str()).collect();
            assert_eq!(names, ["auc", "gauc", "logloss"], "{task} at step {step}");
            assert!(overall.iter().all(|r| r["split"] == "valid"));
            for d in &domains {
                assert!(
                    rows.iter()
                        .any(|r| r["task"] == task && r["step"] == step && &&r["domain"] == d && r["metric"] == "auc"),
                    "no AUC of {task} in domain {d} at step {step}"
                );
            }
            for d in per_domain.keys() {
                assert!(
                    rows.iter().any(|r| r["task"] == task
                        && r["step"] == step
                        && &r["domain"] == d
                        && r["metric"] == "logloss"),
                    "no LogLoss of {task} in domain {d} at step {step}"
                );
            }
        }
    }
    // The last evaluation is the best one's (4 steps of a young model keep improving or
    // not; either way curve.csv's first-task AUC is the click row of the same step).
    let curve = std::fs::read_to_string(run.join("curve.csv")).unwrap();
    let last: Vec<&str> = curve.lines().last().unwrap().split(',').collect();
    let click_auc: f64 = rows
        .iter()
        .find(|r| r["task"] == "click" && r["step"] == "4" && r["domain"].is_empty() && r["metric"] == "auc")
        .unwrap()["value"]
        .parse()
        .unwrap();
    assert_eq!(format!("{click_auc:.6}"), last[3], "curve.csv and curve_tasks.csv disagree:\n{curve}");

    let losses = csv_rows(&run.join("loss.csv"));
    assert_eq!(losses.len(), 4);
    for (i, r) in losses.iter().enumerate() {
        assert_eq!(r["step"], (i + 1).to_string());
        assert_eq!(r["epoch"], "1");
        let loss: f64 = r["loss"].parse().unwrap();
        // Two BCE terms near ln 2 each at the start.
        assert!(loss.is_finite() && loss > 0.0 && loss < 3.0, "{r:?}");
    }
}

/// `probe(x, "name")` keeps `x`'s value as an output named by its scope (a repeated name
/// numbered); the training and evaluation graphs leave it out, and the value is `x`'s.
#[test]
fn probes_are_named_outputs_that_training_leaves_out() {
    let mmoe = common::compile(&common::root().join("specs/mmoe.mdl"));
    let probes: Vec<&String> = mmoe.graph.outputs.keys().filter(|n| n.starts_with("probe/")).collect();
    assert_eq!(probes, ["probe/click/mixture/w/gate", "probe/long_view/mixture/w/gate"]);
    let gate = mmoe.graph.outputs["probe/click/mixture/w/gate"];
    assert_eq!(format!("{:?}", mmoe.graph.node(gate).op), "Softmax { axis: 1 }");
    let train = mdl::train::build_training_graph(&mmoe).unwrap();
    assert!(train.outputs.keys().all(|n| !n.starts_with("probe/")), "{:?}", train.outputs.keys());
    let eval = mdl::train::build_eval_graph(&mmoe);
    assert!(eval.outputs.keys().all(|n| n.starts_with("logit/")));
    let probe = mdl::train::build_probe_graph(&mmoe);
    assert_eq!(probe.outputs.keys().filter(|n| n.starts_with("probe/")).count(), 2);

    let spec = "model m {\n  input fields : categorical\n  label click\n  let E = embedding(fields, 4)\n  let x = probe(flatten(E[fields]), \"x\")\n  let y = probe(x, \"x\")\n  task click = linear(y, 1)\n  loss bce(click)\n}\n";
    let dir = tmp("analysis", "probe_spec");
    std::fs::write(dir.join("p.mdl"), spec).unwrap();
    let c = common::compile(&dir.join("p.mdl"));
    let names: Vec<&String> = c.graph.outputs.keys().filter(|n| n.starts_with("probe/")).collect();
    assert_eq!(names, ["probe/x/x", "probe/y/x"]);
    assert_eq!(c.graph.outputs["probe/x/x"], c.graph.outputs["probe/y/x"], "a probe is its operand");
}

/// A probe with a bad name or a value without the batch axis is an error at its place.
#[test]
fn bad_probes_are_errors_at_their_place() {
    let dir = tmp("analysis", "bad_probe");
    for (name, line, want) in [
        (
            "name.mdl",
            "  let x = probe(flatten(E[fields]), \"a b\")\n",
            "a probe name is letters, digits and `_`, found \"a b\"",
        ),
        (
            "batch.mdl",
            "  let x = probe(sum(flatten(E[fields]), axis = 0), \"s\")\n",
            "`probe` needs a per-sample tensor [B, ...]",
        ),
    ] {
        let spec = format!(
            "model m {{\n  input fields : categorical\n  label click\n  let E = embedding(fields, 4)\n{line}  task click = linear(flatten(E[fields]), 1)\n  loss bce(click)\n}}\n"
        );
        std::fs::write(dir.join(name), spec).unwrap();
        let out = mdl(&["check", dir.join(name).to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want) && err.contains(&format!("{name}:5:")), "{err}");
    }
}
