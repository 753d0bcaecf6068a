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

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `mdl analyze` on the MMoE run, then `mdl report --html` on it (one test: the page plots
/// what analysis.json holds): the tables' IA against their initial values, both tasks'
/// gates with mean weights summing to 1 overall and in every domain, and a page with one
/// `<svg>` per plot that names every task.
#[test]
fn analyze_measures_tables_and_gates_and_the_report_plots_them() {
    let run = mmoe_run();
    let out = mdl(&["analyze", run.to_str().unwrap()]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let a = json(&run.join("analysis.json"));
    let tables: Vec<&str> = a["embeddings"].as_array().unwrap().iter().map(|t| t["table"].as_str().unwrap()).collect();
    assert_eq!(tables, ["E/table", "T/table"], "{a}");
    for t in a["embeddings"].as_array().unwrap() {
        let (learned, init) = (t["learned"]["ia"].as_f64().unwrap(), t["init"]["ia"].as_f64().unwrap());
        assert!(t["trained_rows"].as_u64().unwrap() > 0 && t["dim"] == 16, "{t}");
        assert!((1.0..=16.0).contains(&learned), "{t}");
        assert!((1.0..=16.0).contains(&init), "{t}");
        // Random normal rows, thousands of them, are close to balanced in 16 directions.
        if t["trained_rows"].as_u64().unwrap() > 1000 {
            assert!(init > 12.0, "{t}");
        }
        assert_eq!(t["learned"]["normalized"][0], 1.0);
        assert!(text.contains(t["table"].as_str().unwrap()), "{text}");
    }
    let fields = a["embeddings"][0]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 37, "one entry per column of `fields`");
    assert!(fields.iter().any(|f| f["column"] == "user_id" && f["ia"].is_f64()));
    let metrics = json(&run.join("metrics.json"));
    let test_rows = metrics["test"]["count"].as_u64().unwrap();
    assert_eq!(a["split_rows"], test_rows);
    let probes = a["probes"].as_array().unwrap();
    let names: Vec<&str> = probes.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["click/mixture/w/gate", "long_view/mixture/w/gate"]);
    for p in probes {
        assert_eq!(p["gate"], true, "{p}");
        assert_eq!(p["shape"], serde_json::json!([4]));
        let ln4 = 4f64.ln();
        assert!((p["max_entropy"].as_f64().unwrap() - ln4).abs() < 1e-12);
        let mut domain_rows = 0;
        for stats in std::iter::once(&p["overall"]).chain(p["per_domain"].as_object().unwrap().values()) {
            let mean: f64 = stats["mean"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).sum();
            assert!((mean - 1.0).abs() < 1e-6, "mean weights sum to {mean}: {stats}");
            let e = stats["entropy"].as_f64().unwrap();
            assert!(e > 0.0 && e <= ln4 + 1e-12 && stats["sample_entropy"].as_f64().unwrap() <= e + 1e-9, "{stats}");
            domain_rows += stats["rows"].as_u64().unwrap();
        }
        assert_eq!(p["overall"]["rows"], test_rows);
        assert_eq!(domain_rows, 2 * test_rows, "the domains partition the split");
        assert!(text.contains(p["name"].as_str().unwrap()), "{text}");
    }

    let page = run.parent().unwrap().join("report.html");
    let out = mdl(&["report", run.to_str().unwrap(), "--html", page.to_str().unwrap()]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("| model |"), "the Markdown table still goes to stdout");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert!(!html.contains("<script") && !html.contains("<link") && !html.contains("src="), "self-contained");
    // Valid AUC of 2 tasks, the loss, test AUC per domain of 2 tasks, the tables' spectra
    // and 2 gates.
    assert_eq!(html.matches("<svg").count(), 8, "one <svg> per plot");
    assert_eq!(html.matches("</svg>").count(), 8);
    for task in ["click", "long_view"] {
        assert!(html.contains(&format!("Valid AUC: {task}")), "no learning curve of {task}");
        assert!(html.contains(&format!("Test AUC per domain: {task}")), "no domain bars of {task}");
    }
    assert!(html.contains("Training loss per step") && html.contains("click/mixture/w/gate"));
}

/// Bad input to `mdl analyze` and `mdl report --html` is one error naming it.
#[test]
fn analyze_errors_name_the_folder_table_and_probe() {
    let dir = tmp("analysis", "errors");
    let err = common::scoring::failed(&mdl(&["analyze", dir.to_str().unwrap()]));
    assert!(err.contains(&format!("{}: not a finished run folder (no metrics.json)", dir.display())), "{err}");
    let run = mmoe_run().to_str().unwrap();
    let err = common::scoring::failed(&mdl(&["analyze", run, "--probe", "click/mixture/w/gat"]));
    assert!(
        err.contains("the model has no probe `click/mixture/w/gat`; did you mean `click/mixture/w/gate`?"),
        "{err}"
    );
    let err = common::scoring::failed(&mdl(&["analyze", run, "--table", "nope"]));
    assert!(err.contains("the model has no embedding table `nope`") && err.contains("E/table, T/table"), "{err}");
    let err = common::scoring::failed(&mdl(&["report", dir.to_str().unwrap(), "--html", "x.html"]));
    assert!(err.contains("no metrics.json"), "{err}");
    assert!(!common::root().join("x.html").exists());
}
