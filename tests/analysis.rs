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
        let dir = tmp("analysis", "mmoe").keep().join("run");
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

/// A two-task spec whose losses are named, both reading one table `E` (group `shared`),
/// each through its own head (group `heads`); `same` makes the second loss the first one
/// again (their gradients are then the same).
fn two_loss_spec(dir: &Path, same: bool) -> String {
    let second = if same { "bce(click)" } else { "bce(long_view)" };
    let spec = format!(
        "model twoloss(dim = 8) {{\n  input fields : categorical\n  input hist   : sequence(50) of fields\n  input tags   : sequence(3)\n  input dense  : numeric\n  label click, long_view\n  group shared {{\n    let E = embedding(fields, dim)\n  }}\n  let x = flatten(E[fields])\n  group heads {{\n    task click     = mlp(x, [16]) |> linear(1)\n    task long_view = mlp(x, [16]) |> linear(1)\n  }}\n  loss c = bce(click)\n  loss l = {second}\n}}\n"
    );
    let path = dir.join(if same { "same.mdl" } else { "twoloss.mdl" });
    std::fs::write(&path, spec).unwrap();
    format!("spec={}", path.display())
}

/// [`two_loss_spec`] with the table's rows read through two named gradient paths, `left`
/// by the click head alone and `right` by the long_view head alone: the objective's
/// gradient on `E` through `left` is then loss `c`'s, through `right` loss `l`'s.
fn two_path_spec(dir: &Path) -> String {
    let spec = "model twoloss(dim = 8) {\n  input fields : categorical\n  input hist   : sequence(50) of fields\n  input tags   : sequence(3)\n  input dense  : numeric\n  label click, long_view\n  group shared {\n    let E = embedding(fields, dim)\n  }\n  let e = E[fields]\n  group heads {\n    task click     = mlp(flatten(path(e, \"left\")), [16]) |> linear(1)\n    task long_view = mlp(flatten(path(e, \"right\")), [16]) |> linear(1)\n  }\n  loss c = bce(click)\n  loss l = bce(long_view)\n}\n";
    let path = dir.join("twopath.mdl");
    std::fs::write(&path, spec).unwrap();
    format!("spec={}", path.display())
}

/// `train.grad_cosine` over two named paths: where each path is read by one loss alone,
/// the objective's gradient through each equals that loss's gradient, so the file holds
/// the numbers the same run records for the two losses; `mdl analyze` says paths.
#[test]
fn the_gradient_through_a_path_is_the_loss_that_reads_it_alone() {
    let dir = tmp("analysis", "gradient_paths");
    let spec = two_path_spec(&dir);
    let (by_loss, by_path) = (dir.join("losses"), dir.join("paths"));
    ok(&short_run(&by_loss, &spec, &["--set", "train.grad_cosine={losses: [c, l], param: E/table}"]));
    ok(&short_run(&by_path, &spec, &["--set", "train.grad_cosine={paths: [left, right], param: E/table}"]));
    let metrics = |d: &Path| std::fs::read(d.join("metrics.json")).unwrap();
    assert_eq!(metrics(&by_loss), metrics(&by_path));
    let (losses, paths) = (csv_rows(&by_loss.join("grad_cosine.csv")), csv_rows(&by_path.join("grad_cosine.csv")));
    assert_eq!((losses.len(), paths.len()), (6, 6));
    for (l, p) in losses.iter().zip(&paths) {
        assert_eq!((l["of"].as_str(), l["a"].as_str(), l["b"].as_str()), ("losses", "c", "l"));
        assert_eq!((p["of"].as_str(), p["a"].as_str(), p["b"].as_str()), ("paths", "left", "right"));
        for key in ["norm_a", "norm_b", "cosine"] {
            let (x, y): (f64, f64) = (l[key].parse().unwrap(), p[key].parse().unwrap());
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{key}: losses {x}, paths {y}");
        }
    }
    let out = mdl(&["analyze", by_path.to_str().unwrap()]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gradients of the objective through paths `left` and `right` on E/table"), "{text}");
    for (setting, want) in [
        (
            "train.grad_cosine={paths: [left, rigth], param: E/table}",
            "train.grad_cosine.paths: model `twoloss` has no gradient path `rigth`; did you mean `right`? (its paths: left, right)",
        ),
        (
            "train.grad_cosine={paths: [left, right], losses: [c, l], param: E/table}",
            "train.grad_cosine: give either `losses` (two named losses) or `paths` (two named gradient paths), not both",
        ),
        (
            "train.grad_cosine={paths: [left, left], param: E/table}",
            "train.grad_cosine.paths: name two different gradient paths of the spec",
        ),
    ] {
        let out = dir.join("bad");
        let err = common::scoring::failed(&short_run(&out, &spec, &["--set", setting]));
        assert!(err.contains(want), "{setting}: {err}");
        assert!(!out.join("train.log").exists(), "{setting}: the run started");
    }
    let plain = two_loss_spec(&dir, false);
    let err = common::scoring::failed(&short_run(
        &dir.join("bad"),
        &plain,
        &["--set", "train.grad_cosine={paths: [left, right], param: E/table}"],
    ));
    assert!(err.contains("has no gradient path `left` (the model marks no path: `path(x, \"name\")`)"), "{err}");
}

/// A short run of the MMoE experiment's data with a spec and settings.
fn short_run(out: &Path, spec: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "experiments/mmoe.yaml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        spec,
        "--set",
        "train.batch_size=512",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.early_stopping.patience=10",
    ];
    args.extend_from_slice(extra);
    mdl(&args)
}

const RECORD: &[&str] =
    &["--set", "train.record_grad_norms=true", "--set", "train.grad_cosine={losses: [c, l], param: E/table}"];

/// `train.record_grad_norms` and `train.grad_cosine` record per step without changing what
/// the run computes; a resumed run writes both files byte for byte; `mdl analyze`
/// summarises them and the report plots them.
#[test]
fn gradient_norms_and_cosines_are_recorded_per_step_and_resume_byte_for_byte() {
    let dir = tmp("analysis", "gradients");
    let spec = two_loss_spec(&dir, false);
    let (plain, recorded, resumed) = (dir.join("plain"), dir.join("recorded"), dir.join("resumed"));
    ok(&short_run(&plain, &spec, &[]));
    ok(&short_run(&recorded, &spec, RECORD));
    let metrics = |d: &Path| std::fs::read(d.join("metrics.json")).unwrap();
    assert_eq!(metrics(&plain), metrics(&recorded), "recording changed the run");
    assert!(!plain.join("grad_norms.csv").exists() && !plain.join("grad_cosine.csv").exists());

    let norms = csv_rows(&recorded.join("grad_norms.csv"));
    let groups = ["heads", "shared", "all"];
    assert_eq!(norms.len(), 6 * groups.len());
    for (i, step) in norms.chunks(groups.len()).enumerate() {
        let names: Vec<&str> = step.iter().map(|r| r["group"].as_str()).collect();
        assert_eq!(names, groups);
        assert!(step.iter().all(|r| r["step"] == (i + 1).to_string() && r["epoch"] == "1"));
        let n: Vec<f64> = step.iter().map(|r| r["norm"].parse().unwrap()).collect();
        assert!(n.iter().all(|&x| x > 0.0 && x.is_finite()), "{step:?}");
        // The global norm is the root of the groups' squares.
        let all = (n[0] * n[0] + n[1] * n[1]).sqrt();
        assert!((all - n[2]).abs() <= 1e-5 * n[2], "{step:?}");
    }
    let cosines = csv_rows(&recorded.join("grad_cosine.csv"));
    assert_eq!(cosines.len(), 6);
    for r in &cosines {
        assert_eq!(
            (r["param"].as_str(), r["of"].as_str(), r["a"].as_str(), r["b"].as_str()),
            ("E/table", "losses", "c", "l")
        );
        let c: f64 = r["cosine"].parse().unwrap();
        assert!((-1.0..=1.0).contains(&c) && c.abs() < 0.999, "two tasks' gradients differ: {r:?}");
        // The whole objective's gradient on E is the sum of the two: its norm is at most
        // the sum of theirs (the `shared` group is E alone).
    }
    let shared: Vec<f64> =
        norms.iter().filter(|r| r["group"] == "shared").map(|r| r["norm"].parse().unwrap()).collect();
    for (r, total) in cosines.iter().zip(&shared) {
        let (a, b, c): (f64, f64, f64) =
            (r["norm_a"].parse().unwrap(), r["norm_b"].parse().unwrap(), r["cosine"].parse().unwrap());
        // |g_a + g_b|² = a² + b² + 2ab·cos.
        let sum = (a * a + b * b + 2.0 * a * b * c).sqrt();
        assert!((sum - total).abs() <= 1e-3 * total, "{r:?}: |g_a + g_b| = {sum}, the step's norm on E {total}");
    }

    // Stopped after 3 steps (the checkpoint is at step 2) and resumed: the same files.
    ok(&short_run(&resumed, &spec, &[RECORD, &["--stop-after", "3"][..]].concat()));
    ok(&mdl(&["run", "--resume", resumed.to_str().unwrap()]));
    for f in ["grad_norms.csv", "grad_cosine.csv", "loss.csv", "metrics.json"] {
        assert_eq!(std::fs::read(recorded.join(f)).unwrap(), std::fs::read(resumed.join(f)).unwrap(), "resumed {f}");
    }

    let out = mdl(&["analyze", recorded.to_str().unwrap()]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gradient norms per parameter group over 6 steps"), "{text}");
    assert!(text.contains("gradients of losses `c` and `l` on E/table over 6 steps"), "{text}");
    let a = json(&recorded.join("analysis.json"));
    let g = &a["gradients"];
    let names: Vec<&str> = g["groups"].as_array().unwrap().iter().map(|x| x["group"].as_str().unwrap()).collect();
    assert_eq!(names, groups);
    assert_eq!(g["cosine"]["steps"], 6);
    let page = dir.join("report.html");
    ok(&mdl(&["report", recorded.to_str().unwrap(), "--html", page.to_str().unwrap()]));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("Gradient norm per parameter group") && html.contains("shared"), "no norm plot");
    assert!(html.contains("Gradient cosine, `c` vs `l` on E/table"), "no cosine plot");
}

/// The same loss twice: its two gradients are one, so the cosine is 1 and the norms equal.
#[test]
fn the_cosine_of_a_loss_with_itself_is_one() {
    let dir = tmp("analysis", "gradients_same");
    let spec = two_loss_spec(&dir, true);
    let run = dir.join("run");
    ok(&short_run(
        &run,
        &spec,
        &["--set", "train.max_steps=2", "--set", RECORD[3], "--set", "train.grad_cosine.every=2"],
    ));
    let rows = csv_rows(&run.join("grad_cosine.csv"));
    assert_eq!(rows.len(), 1, "every 2 steps of 2: step 2 only");
    assert_eq!(rows[0]["step"], "2");
    assert_eq!(rows[0]["norm_a"], rows[0]["norm_b"]);
    let c: f64 = rows[0]["cosine"].parse().unwrap();
    assert!((c - 1.0).abs() < 1e-6, "{c}");
}

/// Bad gradient settings are errors naming the key, before any data is read.
#[test]
fn bad_gradient_settings_name_their_key() {
    let dir = tmp("analysis", "gradients_errors");
    let spec = two_loss_spec(&dir, false);
    let out = dir.join("run");
    for (setting, want) in [
        (
            "train.grad_cosine={losses: [c, x], param: E/table}",
            "train.grad_cosine.losses: model `twoloss` has no named loss `x`",
        ),
        (
            "train.grad_cosine={losses: [c, l], param: E/tabel}",
            "train.grad_cosine.param: model `twoloss` has no parameter `E/tabel`; did you mean `E/table`?",
        ),
        (
            "train.grad_cosine={losses: [c], param: E/table}",
            "train.grad_cosine.losses: name two different named losses of the spec (`loss a = ...`), found [c]",
        ),
        (
            "train.grad_cosine={losses: [c, l], param: E/table, every: 0}",
            "train.grad_cosine.every: must be at least 1 step",
        ),
        ("train.grad_cosine={losses: [c, l], parm: E/table}", "parm"),
        ("train.record_grad_norms=yes please", "record_grad_norms"),
    ] {
        let err = common::scoring::failed(&short_run(&out, &spec, &["--set", setting]));
        assert!(err.contains(want), "{setting}: {err}");
        assert!(!out.join("train.log").exists(), "{setting}: the run started");
    }
}

/// A short run of the DARE experiment (MovieLens 100K) in batches of 512, with settings.
fn dare_run(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args =
        vec!["run", "experiments/dare.yaml", "--out", out.to_str().unwrap(), "--set", "train.batch_size=512"];
    args.extend_from_slice(extra);
    mdl(&args)
}

/// `mdl analyze --mi cate_hist` on a 2-step DARE run of MovieLens 100K (the genre sequence
/// shares the target genre's vocabulary): a heat map per frequent target genre, from the
/// train split; a sequence with no shared vocabulary, or a name the data lacks, is an error
/// naming it.
#[test]
fn mutual_information_heat_maps_of_a_category_sequence() {
    let dir = tmp("analysis", "mi");
    let run = dir.join("run");
    ok(&dare_run(&run, &["--set", "train.max_steps=2"]));
    let out = mdl(&["analyze", run.to_str().unwrap(), "--table", "F/table", "--mi", "cate_hist"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mutual information (bits) between a behaviour of a category at a position of `cate_hist`"));
    let a = json(&run.join("analysis.json"));
    let m = &a["mutual_information"];
    assert_eq!((m["sequence"].as_str(), m["column"].as_str()), (Some("cate_hist"), Some("hist_genre_seq")));
    assert_eq!(
        (m["target"].as_str(), m["task"].as_str(), m["split"].as_str()),
        (Some("cate.first_genre"), Some("click"), Some("train"))
    );
    assert_eq!(m["rows"], 80003, "every train row counted");
    let maps = m["maps"].as_array().unwrap();
    assert_eq!(maps.len(), 3);
    let mut last = u64::MAX;
    for map in maps {
        let samples = map["samples"].as_u64().unwrap();
        assert!(samples <= last && map["positives"].as_u64().unwrap() <= samples, "{map}");
        last = samples;
        let cats: Vec<&str> = map["categories"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert!(cats.len() == 10 && cats[0] == map["target"], "the target's own genre first: {map}");
        for (row, norm) in map["mi"].as_array().unwrap().iter().zip(map["normalized"].as_array().unwrap()) {
            assert_eq!(row.as_array().unwrap().len(), 10);
            for (v, n) in row.as_array().unwrap().iter().zip(norm.as_array().unwrap()) {
                assert!(v.as_f64().unwrap() > -1e-6, "MI is not negative: {v}");
                assert!((0.0..=1.0).contains(&n.as_f64().unwrap()));
            }
        }
    }
    for (mi, want) in [
        ("nope", "--mi: the model has no sequence input `nope`"),
        ("cate_hist:nope", "--mi: sequence `cate_hist` has no column `nope` (its columns: hist_genre_seq)"),
        ("tags", "--mi: sequence `tags` has a vocabulary of its own"),
    ] {
        let err = common::scoring::failed(&mdl(&["analyze", run.to_str().unwrap(), "--mi", mi]));
        assert!(err.contains(want), "{mi}: {err}");
    }

    // DARE's probed softmax over every behaviour: a learned map per MI map, over its
    // categories and positions, and the retrieval NDCG of its order.
    let out = mdl(&["analyze", run.to_str().unwrap(), "--mi", "cate_hist", "--attention", "a/attention"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("learned correlation: mean of probe `a/attention`") && text.contains("retrieval NDCG"));
    let a = json(&run.join("analysis.json"));
    let att = &a["attention"];
    assert_eq!((att["probe"].as_str(), att["split"].as_str()), (Some("a/attention"), Some("test")));
    assert_eq!(att["rows"], a["split_rows"]);
    for (learned, truth) in
        att["maps"].as_array().unwrap().iter().zip(a["mutual_information"]["maps"].as_array().unwrap())
    {
        assert_eq!((&learned["target"], &learned["categories"]), (&truth["target"], &truth["categories"]));
        for (row, norm) in learned["mean"].as_array().unwrap().iter().zip(learned["normalized"].as_array().unwrap()) {
            assert_eq!(row.as_array().unwrap().len(), 10);
            for (v, n) in row.as_array().unwrap().iter().zip(norm.as_array().unwrap()) {
                assert!(v.is_null() || (0.0..=1.0).contains(&v.as_f64().unwrap()), "a softmax weight: {v}");
                assert!((0.0..=1.0).contains(&n.as_f64().unwrap()));
            }
        }
        let rho = learned["rank_correlation"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&rho), "{learned}");
    }
    let r = &att["retrieval"];
    assert_eq!(r["ks"], serde_json::json!([1, 5, 10, 20]));
    assert_eq!(r["samples"].as_u64().unwrap() + r["left_out"].as_u64().unwrap(), a["split_rows"].as_u64().unwrap());
    for order in ["model", "recency"] {
        assert!(r[order].as_array().unwrap().iter().all(|v| (0.0..=1.0).contains(&v.as_f64().unwrap())), "{r}");
    }
    let html = dir.join("report.html");
    ok(&mdl(&["report", run.to_str().unwrap(), "--html", html.to_str().unwrap()]));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Learned: mean a/attention") && page.contains("Retrieval NDCG"));
}

/// A spec on DARE's data whose probe `ones` is 1 at every behaviour of `cate_hist` and 0 at
/// padding (`twos` 2), whose probe `count` has one value per sample, and whose probe `label`
/// is the label.
const MASK_PROBE_SPEC: &str = "model maskprobe(dim = 4, tags_len = 6) {
  input item      : categorical
  input hist      : sequence(50) of item
  input cate      : categorical
  input cate_hist : sequence(50) of cate
  input fields    : categorical
  input tags      : sequence(tags_len)
  input dense     : numeric
  label click
  let C = embedding(cate, dim)
  let w = probe(slice(mask(cate_hist), 1, 0, 1), \"ones\")
  let w2 = probe(w * 2, \"twos\")
  let n = probe(sum(w, axis = -1), \"count\")
  task click = linear(concat([flatten(C[cate]), n], axis = 1), 1)
  let y = probe(unsqueeze(label(click), 1), \"label\")
  loss bce(click)
}
";

/// `--attention` on a probe of known values: the mean of a probe that is 1 at every behaviour
/// is 1 in every cell with a behaviour, and its order (all ties) is the recency order, so
/// its NDCG is recency's at every k. A probe without one value per position, a name the
/// model lacks, or `--attention` without `--mi` is an error naming it.
#[test]
fn attention_probe_of_known_values() {
    let dir = tmp("analysis", "attention");
    std::fs::write(dir.join("maskprobe.mdl"), MASK_PROBE_SPEC).unwrap();
    let run = dir.join("run");
    let spec = format!("spec={}", dir.join("maskprobe.mdl").display());
    ok(&dare_run(&run, &["--set", &spec, "--set", "train.max_steps=1"]));
    let run = run.to_str().unwrap();
    let args =
        ["analyze", run, "--table", "C/table", "--mi", "cate_hist", "--attention", "w/ones", "--clusters", "y/label"];
    let out = mdl(&args);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("discriminability of probe `y/label`"));
    let a = json(&Path::new(run).join("analysis.json"));
    // Clusters of the label itself are the two classes, whatever k: MI = H(Y), NMI 1.
    let c = &a["clusters"];
    assert_eq!((c["rows"].as_u64(), c["dim"].as_u64()), (a["split_rows"].as_u64(), Some(1)));
    let ks: Vec<u64> = c["clusterings"].as_array().unwrap().iter().map(|q| q["k"].as_u64().unwrap()).collect();
    assert_eq!(ks, [2, 5, 10, 20, 30, 50, 100, 200], "k up to a fiftieth of the test rows");
    let h = c["label_entropy"].as_f64().unwrap();
    assert!(h > 0.5 && h < 2f64.ln(), "{c}");
    for q in c["clusterings"].as_array().unwrap() {
        assert!((q["mi"].as_f64().unwrap() - h).abs() < 1e-9 && (q["nmi"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{q}");
    }
    let att = &a["attention"];
    let maps = att["maps"].as_array().unwrap();
    assert_eq!(maps.len(), 3);
    let mut cells = 0;
    for map in maps {
        assert!(map["samples"].as_u64().unwrap() > 0);
        for row in map["mean"].as_array().unwrap() {
            for v in row.as_array().unwrap().iter().filter(|v| !v.is_null()) {
                assert_eq!(v.as_f64(), Some(1.0), "{map}");
                cells += 1;
            }
        }
        assert!(map["rank_correlation"].is_null(), "a constant map has no rank correlation: {map}");
    }
    assert!(cells > 100, "{cells} cells with a behaviour");
    let r = &att["retrieval"];
    assert_eq!(r["model"], r["recency"], "{r}");
    assert!(r["samples"].as_u64().unwrap() > 1000, "{r}");

    // exp(z)·‖r‖ with z = 1 and ‖r‖ = 2 at every behaviour: the softmax of a constant map is
    // uniform, so every cell of a map holds 2 / (its cells with a value).
    let out = mdl(&["analyze", run, "--mi", "cate_hist", "--attention", "w/ones", "--attention-norm", "w2/twos"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("learned correlation: exp(z)·‖r‖ (z: probe `w/ones`"));
    let a = json(&Path::new(run).join("analysis.json"));
    assert_eq!(a["attention"]["norm_probe"].as_str(), Some("w2/twos"));
    // The cells with a value of a map's grid `key`.
    let cells = |map: &serde_json::Value, key: &str| -> Vec<f64> {
        map[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().clone())
            .filter_map(|v| v.as_f64())
            .collect()
    };
    for map in a["attention"]["maps"].as_array().unwrap() {
        let norms = cells(map, "mean_norm");
        assert!(!norms.is_empty() && norms.iter().all(|&n| n == 2.0), "{map}");
        let weighted = cells(map, "weighted");
        assert_eq!(weighted.len(), norms.len());
        let want = 2.0 / norms.len() as f64;
        assert!(weighted.iter().all(|w| (w - want).abs() < 1e-12), "{map}");
    }

    for (args, want) in [
        (
            vec!["--mi", "cate_hist", "--attention", "n/count"],
            "--attention: probe `n/count` has 1 values per sample (shape [1] per sample), not one per position of sequence `cate_hist` (50)",
        ),
        (vec!["--mi", "cate_hist", "--attention", "w/one"], "--attention: the model has no probe `w/one`; did you mean `w/ones`?"),
        (vec!["--attention", "w/ones"], "--attention w/ones: needs --mi SEQ"),
        (vec!["--mi", "cate_hist", "--attention-norm", "w/ones"], "--attention-norm w/ones: needs --attention PROBE"),
        (
            vec!["--mi", "cate_hist", "--attention", "w/ones", "--attention-norm", "w/twos"],
            "--attention-norm: the model has no probe `w/twos`; did you mean `w2/twos`?",
        ),
        (
            vec!["--mi", "cate_hist", "--attention", "w/ones", "--attention-norm", "n/count"],
            "--attention-norm: probe `n/count` has 1 values per sample",
        ),
        (vec!["--clusters", "w/one"], "--clusters: the model has no probe `w/one`; did you mean `w/ones`?"),
    ] {
        let mut all = vec!["analyze", run];
        all.extend(args);
        let err = common::scoring::failed(&mdl(&all));
        assert!(err.contains(want), "{err}");
    }
}

/// The entanglement test on known cases, with two short runs of one spec (seeds 2023 and 7):
/// with A = B no pair is far and near at once; with A the analysed run itself, its table
/// ranks the pairs as A does (rank correlation 1, every selected pair in A's top 40 %) and
/// B's as B does (bottom 40 %). Bad settings are errors naming them.
#[test]
fn entanglement_distance_test_against_two_runs() {
    let dir = tmp("analysis", "entanglement");
    let spec = two_loss_spec(&dir, false);
    let (first, other) = (dir.join("a"), dir.join("b"));
    ok(&short_run(&first, &spec, &["--set", "train.max_steps=2"]));
    ok(&short_run(&other, &spec, &["--set", "train.max_steps=2", "--set", "train.seed=7"]));
    let (run, b) = (first.to_str().unwrap(), other.to_str().unwrap());
    let pair = ["--pair", "user_id:video_id"];

    let mut same = vec!["analyze", run, "--against", run, "--against", run];
    same.extend(pair);
    ok(&mdl(&same));
    let e = &json(&first.join("analysis.json"))["entanglement"];
    assert_eq!(e["selected"], 0, "{e}");
    assert!(e["tables"].as_array().unwrap().iter().all(|t| t["mean_percentile"].is_null()));

    let mut args = vec!["analyze", run, "--against", run, "--against", b];
    args.extend(pair);
    let out = mdl(&args);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("entanglement: "));
    let a = json(&first.join("analysis.json"));
    let e = &a["entanglement"];
    assert_eq!(
        (e["user"].as_str(), e["item"].as_str(), e["split"].as_str()),
        (Some("user_id"), Some("video_id"), Some("test"))
    );
    assert_eq!(e["rows"], 30990, "kuairand_pure_tail's test rows");
    let selected = e["selected"].as_u64().unwrap();
    assert!(selected > 100, "{e}");
    let tables = e["tables"].as_array().unwrap();
    // A's E/table, B's E/table, the analysed run's E/table (= A's).
    let names: Vec<(&str, &str)> =
        tables.iter().map(|t| (t["run"].as_str().unwrap(), t["table"].as_str().unwrap())).collect();
    assert_eq!(names, [(run, "E/table"), (b, "E/table"), (run, "E/table")]);
    for (t, own) in [(&tables[0], "a"), (&tables[1], "b"), (&tables[2], "a")] {
        let tenths: Vec<u64> = t["tenths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(tenths.iter().sum::<u64>(), selected);
        assert_eq!(t[format!("rank_correlation_{own}")].as_f64(), Some(1.0), "{t}");
        let mean = t["mean_percentile"].as_f64().unwrap();
        if own == "a" {
            assert!(mean >= 0.6 && tenths[..6].iter().all(|&c| c == 0), "{t}");
        } else {
            assert!(mean <= 0.4 && tenths[5..].iter().all(|&c| c == 0), "{t}");
        }
    }

    for (args, want) in [
        (vec!["--pair", "user_id:video_id"], "--pair: needs --against A --against B"),
        (
            vec!["--against", b, "--pair", "user_id:video_id"],
            "--against: needs two single-task runs (--against A --against B), found 1",
        ),
        (vec!["--against", b, "--against", b], "--against: needs --pair USER:ITEM"),
        (vec!["--against", b, "--against", b, "--pair", "user_id"], "--pair: expected USER:ITEM"),
        (
            vec!["--against", b, "--against", b, "--pair", "user_id:video"],
            "the model has no categorical column `video`; did you mean `video_id`?",
        ),
    ] {
        let mut all = vec!["analyze", run];
        all.extend(args);
        let err = common::scoring::failed(&mdl(&all));
        assert!(err.contains(want), "{err}");
    }
}

/// `--interaction TABLE:PARAM` on a 2-step DCNv2 run: the sub-embedding IA matrix of the
/// table's 37 columns over the cross layer's 48 blocks, and the Frobenius norm of every
/// block of the weight (N × N, whose squares add up to the weight's); a malformed option is
/// an error naming its form.
#[test]
fn interaction_matrix_and_block_norms_of_a_cross_layer() {
    let dir = tmp("analysis", "interaction");
    let run = dir.join("run");
    ok(&mdl(&[
        "run",
        "experiments/dcnv2.yaml",
        "--out",
        run.to_str().unwrap(),
        "--set",
        "train.batch_size=512",
        "--set",
        "train.max_steps=2",
    ]));
    let run = run.to_str().unwrap();
    let out = mdl(&["analyze", run, "--table", "E/table", "--interaction", "E/table:cross/cross_net/linear/W"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("‖W_i→j‖_F of its 48 × 48 blocks"));
    let a = json(&Path::new(run).join("analysis.json"));
    let m = &a["interaction"];
    assert_eq!((m["dim"].as_u64(), m["blocks"].as_u64()), (Some(16), Some(48)));
    assert_eq!(m["ia"].as_array().unwrap().len(), m["fields"].as_array().unwrap().len());
    let norms = m["block_norms"].as_array().unwrap();
    assert_eq!(norms.len(), 48);
    let squares: f64 = norms
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .inspect(|&v| assert!(v >= 0.0 && v.is_finite()))
        .map(|v| v * v)
        .sum();
    assert!(squares > 0.0);
    let err = common::scoring::failed(&mdl(&["analyze", run, "--interaction", "E/table"]));
    assert!(err.contains("--interaction: expected TABLE:PARAM"), "{err}");
}
