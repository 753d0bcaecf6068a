//! Tasks beyond 0/1 (`label t : regression(..)`, `classes(..)`, `candidates(..)`), end to
//! end through the `mdl` binary on small generated files: a regression task's loss falls,
//! its RMSE and MAE in metrics.json (overall and per domain) equal those computed here from
//! `mdl predict`'s values and the file's labels, early stopping on RMSE keeps the lowest
//! valid RMSE, curve.csv and train.log carry the metrics, `mdl eval` reproduces them; a bad
//! label cell is an error naming its file, line and column; a classes task reports accuracy,
//! log-loss and HR@k / NDCG@k; a `candidates` task (next-item ranking against sampled
//! items) runs with no label column and reports HR@10 / NDCG@10, while a task that reads a
//! label is refused by such a schema; the kinds' loss and shape errors point into the spec;
//! ONNX export refuses a classes task by name.

mod common;
use common::scoring::{failed, mdl, ok, tmp};
use std::path::{Path, PathBuf};

/// A deterministic generator for the files (tests only).
struct Lcg(u64);
impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A split of `n` rows: `y` a real target of `item` and `x` (positive, so `log = true`
/// holds), `cls` a class of the item, `click` a 0/1 label, `domain` 0 or 1.
fn split(path: &Path, n: usize, seed: u64) {
    let mut rng = Lcg(seed);
    let mut text = String::from("click,y,cls,item,x,domain\n");
    for i in 0..n {
        let item = (rng.uniform() * 10.0) as usize;
        let x = rng.uniform();
        let y = 1.0 + 2.0 * x + 0.3 * item as f64 + 0.2 * (rng.uniform() - 0.5);
        let click = u8::from(rng.uniform() < x);
        text.push_str(&format!("{click},{y:.4},{},i{item},{x:.4},{}\n", item % 3, i % 2));
    }
    std::fs::write(path, text).unwrap();
}

const SPEC: &str = "model m(dim = 4, log = false) {
  input fields : categorical
  input dense : numeric
  label y : regression(log = log)
  label click
  label cls : classes(3, top = [1, 2])
  let E = embedding(fields, dim)
  let h = concat([flatten(E[fields]), dense], axis = 1)
  task y = linear(h, 1)
  task click = linear(h, 1)
  task cls = linear(h, 3)
  loss mse(y) + bce(click) + softmax_ce(cls)
}
";

/// Writes the spec, the three splits and an experiment (early stopping on valid RMSE,
/// evaluated every 4 steps) into `dir`; returns the experiment's path.
fn setup(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("m.mdl"), SPEC).unwrap();
    split(&dir.join("train.csv"), 400, 1);
    split(&dir.join("valid.csv"), 100, 2);
    split(&dir.join("test.csv"), 120, 3);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: tasks
spec: m.mdl
data:
  train: train.csv
  valid: valid.csv
  test: test.csv
  schema:
    features:
      - { kind: categorical, name: fields, columns: [item] }
      - { kind: numeric, name: dense, columns: [x], normalize: minmax }
    labels:
      - { name: y, column: y }
      - { name: click, column: click }
      - { name: cls, column: cls }
    domain: { column: domain }
train:
  lr: 0.05
  batch_size: 50
  epochs: 5
  eval_every: 4
  early_stopping: { metric: rmse, patience: 100 }
",
    )
    .unwrap();
    exp
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The RMSE and MAE of `predicted` against `labels`, in f64 as written here.
fn by_hand(predicted: &[f64], labels: &[f64]) -> (f64, f64) {
    let n = predicted.len() as f64;
    let sq: f64 = predicted.iter().zip(labels).map(|(p, y)| (p - y) * (p - y)).sum();
    let abs: f64 = predicted.iter().zip(labels).map(|(p, y)| (p - y).abs()).sum();
    ((sq / n).sqrt(), abs / n)
}

/// Column `name` of a CSV text with a header, as numbers.
fn column(text: &str, name: &str) -> Vec<f64> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    lines.map(|l| l.split(',').nth(i).unwrap().parse().unwrap()).collect()
}

#[test]
fn a_regression_task_trains_and_reports_rmse_and_mae_as_computed_by_hand() {
    for log in [false, true] {
        let dir = tmp("tasks", if log { "regression_log" } else { "regression" });
        let exp = setup(&dir);
        let run = dir.join("run");
        let log_arg = format!("hyper.log={log}");
        let out = mdl(&["run", exp.to_str().unwrap(), "--out", run.to_str().unwrap(), "--set", &log_arg]);
        let stderr = ok(&out);
        let metrics = json(&run.join("metrics.json"));

        // The loss falls, and curve.csv and train.log carry the regression metrics.
        let curve = std::fs::read_to_string(run.join("curve.csv")).unwrap();
        let more = if log { ",valid_mae,valid_rmse,valid_rmsle\n" } else { ",valid_mae,valid_rmse\n" };
        assert!(
            curve.starts_with(&format!("step,epoch,train_loss,valid_auc,valid_gauc,valid_logloss{more}")),
            "{curve}"
        );
        let losses = column(&curve, "train_loss");
        assert!(losses.last().unwrap() < &(0.5 * losses[0]), "the loss does not fall: {losses:?}");
        let log_text = std::fs::read_to_string(run.join("train.log")).unwrap();
        assert!(log_text.contains(" mae ") && log_text.contains(" rmse "), "{log_text}");
        assert!(stderr.contains("test: auc - gauc - logloss - mae "), "{stderr}");

        // Early stopping minimises RMSE: the best step is the one of the lowest valid RMSE.
        let steps = column(&curve, "step");
        let rmse = column(&curve, "valid_rmse");
        let lowest = (0..rmse.len()).min_by(|&a, &b| rmse[a].total_cmp(&rmse[b])).unwrap();
        assert_eq!(metrics["best_step"].as_f64(), Some(steps[lowest]), "{curve}");

        // Test RMSE / MAE, overall and per domain, against `mdl predict`'s values (the
        // back-transformed prediction with `log`) and the file's labels.
        let test = std::fs::read_to_string(dir.join("test.csv")).unwrap();
        let labels = column(&test, "y");
        let domains = column(&test, "domain");
        let predicted =
            mdl(&["predict", run.to_str().unwrap(), "--data", dir.join("test.csv").to_str().unwrap(), "--out", "-"]);
        ok(&predicted);
        let scores = String::from_utf8(predicted.stdout).unwrap();
        let values = column(&scores, "y");
        assert_eq!(values.len(), labels.len());
        let classes = column(&scores, "cls");
        assert!(classes.iter().all(|c| [0.0, 1.0, 2.0].contains(c)), "classes are written as ids: {classes:?}");
        let (rmse, mae) = by_hand(&values, &labels);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        let task = &metrics["test"]["per_task"]["y"];
        assert!(close(task["rmse"].as_f64().unwrap(), rmse), "rmse {} by hand {rmse}", task["rmse"]);
        assert!(close(task["mae"].as_f64().unwrap(), mae), "mae {} by hand {mae}", task["mae"]);
        assert_eq!(metrics["test"]["rmse"], task["rmse"], "the first task's figures sit at the top");
        assert!(task["auc"].is_null() && task.get("hr@1").is_none(), "{task}");
        for d in [0.0, 1.0] {
            let rows: Vec<usize> = (0..labels.len()).filter(|&r| domains[r] == d).collect();
            let (p, y): (Vec<f64>, Vec<f64>) = rows.iter().map(|&r| (values[r], labels[r])).unzip();
            let (rmse, mae) = by_hand(&p, &y);
            let dm = &task["per_domain"][format!("{d}")];
            assert!(close(dm["rmse"].as_f64().unwrap(), rmse) && close(dm["mae"].as_f64().unwrap(), mae), "{dm}");
        }
        if log {
            let logs: Vec<f64> = values.iter().map(|p| p.ln_1p()).collect();
            let ys: Vec<f64> = labels.iter().map(|y| y.ln_1p()).collect();
            let rmsle = by_hand(&logs, &ys).0;
            assert!(close(task["rmsle"].as_f64().unwrap(), rmsle), "rmsle {} by hand {rmsle}", task["rmsle"]);
        } else {
            assert!(rmse < 0.5, "the regression learns the target (its spread is about 1.2): rmse {rmse}");
            assert!(task.get("rmsle").is_none());
        }

        // The classes task: accuracy, log-loss and HR / NDCG at 1 and 2, HR@1 below HR@2.
        let cls = &metrics["test"]["per_task"]["cls"];
        for key in ["accuracy", "logloss", "hr@1", "hr@2", "ndcg@1", "ndcg@2"] {
            assert!(cls[key].as_f64().is_some(), "cls.{key}: {cls}");
        }
        assert!(cls["hr@1"].as_f64() <= cls["hr@2"].as_f64());
        let accuracy = column(&scores, "cls").iter().zip(column(&test, "cls")).filter(|(p, y)| *p == y).count() as f64
            / labels.len() as f64;
        assert!(close(cls["accuracy"].as_f64().unwrap(), accuracy), "accuracy {} by hand {accuracy}", cls["accuracy"]);

        // `mdl eval` on the test file gives the test report.
        let eval = mdl(&["eval", run.to_str().unwrap(), "--data", dir.join("test.csv").to_str().unwrap()]);
        ok(&eval);
        let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
        assert_eq!(eval, metrics["test"]);
    }
}

#[test]
fn a_bad_label_cell_is_an_error_naming_its_file_line_and_column() {
    let dir = tmp("tasks", "bad_label");
    let exp = setup(&dir);
    let train = std::fs::read_to_string(dir.join("train.csv")).unwrap();
    let mut lines: Vec<String> = train.lines().map(String::from).collect();
    // Line 5 of the file (the header is line 1): a regression label that is not a number.
    let mut cells: Vec<String> = lines[4].split(',').map(String::from).collect();
    cells[1] = "12ms".into();
    lines[4] = cells.join(",");
    std::fs::write(dir.join("bad.csv"), lines.join("\n") + "\n").unwrap();
    let bad = dir.join("bad.csv");
    let train_arg = format!("data.train={}", bad.display());
    let out = dir.join("run");
    let err = failed(&mdl(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--set", &train_arg]));
    let want = format!("{}:5: column 'y': a regression label must be a finite number (value \"12ms\")", bad.display());
    assert!(err.contains(&want), "{err}");

    // A class label out of range, and a negative label of a log-transformed task.
    cells[1] = "2.5".into();
    cells[2] = "3".into();
    lines[4] = cells.join(",");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let err = failed(&mdl(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--set", &train_arg]));
    assert!(err.contains(":5: column 'cls': a class label must be an integer from 0 to 2 (value \"3\")"), "{err}");
    cells[1] = "-1".into();
    cells[2] = "0".into();
    lines[4] = cells.join(",");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let args =
        ["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--set", &train_arg, "--set", "hyper.log=true"];
    let err = failed(&mdl(&args));
    assert!(err.contains(":5: column 'y': a regression label with `log = true` must be greater than -1"), "{err}");
}

#[test]
fn an_early_stopping_metric_the_first_task_lacks_is_refused_before_the_data() {
    let dir = tmp("tasks", "metric");
    let exp = setup(&dir);
    let out = dir.join("run");
    let err = failed(&mdl(&[
        "run",
        exp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.early_stopping.metric=auc",
    ]));
    assert!(
        err.contains("train.early_stopping.metric: `auc` is not a metric of the first task `y`, which is regression (its metrics: rmse, mae)"),
        "{err}"
    );
    assert!(!err.contains("data:"), "refused before the data is read: {err}");
    let err = failed(&mdl(&["run", exp.to_str().unwrap(), "--set", "train.early_stopping.metric=hr@0"]));
    assert!(
        err.contains("expected auc, gauc, logloss, rmse, mae, rmsle, accuracy, hr@k, ndcg@k or loss, found `hr@0`"),
        "{err}"
    );
}

#[test]
fn onnx_export_refuses_a_classes_task_by_name() {
    let dir = tmp("tasks", "export");
    let exp = setup(&dir);
    let run = dir.join("run");
    ok(&mdl(&["run", exp.to_str().unwrap(), "--out", run.to_str().unwrap(), "--set", "train.max_steps=2"]));
    let model = dir.join("m.onnx");
    let err = failed(&mdl(&["export", run.to_str().unwrap(), "--format", "onnx", "-o", model.to_str().unwrap()]));
    assert!(err.contains("task `cls` is a classes(3) task: ONNX export writes one score per task and row"), "{err}");
    assert!(!model.exists());
}

/// Compiles `text` as a spec file and returns the rendered diagnostics.
fn check(dir: &Path, text: &str) -> String {
    let path = dir.join("s.mdl");
    std::fs::write(&path, text).unwrap();
    failed(&mdl(&["check", path.to_str().unwrap()]))
}

#[test]
fn kind_errors_point_into_the_spec() {
    let dir = tmp("tasks", "errors");
    let body = |label: &str, task: &str, loss: &str| {
        format!("model m() {{\n  input v : numeric\n  {label}\n  task t = {task}\n  loss {loss}\n}}\n")
    };
    let err = check(&dir, &body("label t : regression", "linear(v, 1)", "bce(t)"));
    assert!(err.contains("`bce` takes a binary task; `t` is regression") && err.contains(":5:"), "{err}");
    let err = check(&dir, &body("label t", "linear(v, 1)", "mse(t)"));
    assert!(err.contains("`mse` takes a regression task; `t` is binary"), "{err}");
    let err = check(&dir, &body("label t : classes(4)", "linear(v, 3)", "softmax_ce(t)"));
    assert!(
        err.contains("the logit of the classes(4) task `t` must be [B, 4] (one logit per class), found [B, 3]"),
        "{err}"
    );
    let err = check(&dir, &body("label t : regresion", "linear(v, 1)", "mse(t)"));
    assert!(err.contains("unknown task kind `regresion`") && err.contains("did you mean `regression`?"), "{err}");
    let err = check(&dir, &body("label t : classes(1)", "linear(v, 1)", "softmax_ce(t)"));
    assert!(err.contains("the number of classes must be a constant integer of at least 2"), "{err}");
    let err = check(&dir, &body("label t : candidates(top = [0])", "linear(v, 5)", "softmax_ce(t)"));
    assert!(err.contains("`top` must be a list of positive integers"), "{err}");
    let err = check(&dir, &body("label t : regression(logs = true)", "linear(v, 1)", "mse(t)"));
    assert!(err.contains("`regression` has no parameter `logs`") && err.contains("did you mean `log`?"), "{err}");
}

/// A split of `n` rows of runs through 30 items: `hist` holds 3 to 8 consecutive items
/// (mod 30), and the row's `item` is the one after the last.
fn sequence_split(path: &Path, n: usize, seed: u64) {
    let mut rng = Lcg(seed);
    let mut text = String::from("item,hist,domain\n");
    for i in 0..n {
        let start = (rng.uniform() * 30.0) as usize;
        let len = 3 + (rng.uniform() * 6.0) as usize;
        let hist: Vec<String> = (start..start + len).map(|k| format!("i{}", k % 30)).collect();
        text.push_str(&format!("i{},{},{}\n", (start + len) % 30, hist.join(" "), i % 2));
    }
    std::fs::write(path, text).unwrap();
}

/// Next-item ranking: the row's item against 20 items sampled for it, from the state of
/// the latest behaviour (a `candidates` task, the positive first).
const NEXT_ITEM: &str = "model next(dim = 8) {
  input item : categorical
  input hist : sequence(8) of item
  label next : candidates(top = [1, 10])
  let M = embedding(item, dim, std = 0.1)
  let latest = M[slice(squeeze(slice(hist, 1, 0, 1), 1), 1, 7, 1)]          # [B, 1, dim]
  let target = slice(item, 1, 0, 1)                                         # ids [B, 1]
  let candidates = concat([target, squeeze(sample_ids(target, 20), 1)], axis = 1)   # ids [B, 21]
  task next = sum(M[candidates] * linear(latest, dim), axis = -1)
  loss softmax_ce(next)
}
";

/// An experiment for [`NEXT_ITEM`] on generated runs, with no label column (the schema
/// leaves `labels` out), early stopping on valid NDCG@10.
fn next_item_setup(dir: &Path, spec: &str) -> PathBuf {
    std::fs::write(dir.join("next.mdl"), spec).unwrap();
    sequence_split(&dir.join("train.csv"), 600, 1);
    sequence_split(&dir.join("valid.csv"), 100, 2);
    sequence_split(&dir.join("test.csv"), 150, 3);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: next
spec: next.mdl
data:
  train: train.csv
  valid: valid.csv
  test: test.csv
  schema:
    features:
      - { kind: categorical, name: item, columns: [item] }
      - { kind: sequence, name: hist, columns: [hist], max_len: 8, vocab: item }
    domain: { column: domain }
train:
  lr: 0.05
  batch_size: 50
  epochs: 8
  eval_every: epoch
  early_stopping: { metric: ndcg@10, patience: 100 }
",
    )
    .unwrap();
    exp
}

#[test]
fn a_candidates_task_runs_without_a_label_column_and_reports_hr_and_ndcg_at_10() {
    let dir = tmp("tasks", "candidates");
    let exp = next_item_setup(&dir, NEXT_ITEM);
    let run = dir.join("run");
    ok(&mdl(&["run", exp.to_str().unwrap(), "--out", run.to_str().unwrap()]));
    let metrics = json(&run.join("metrics.json"));
    let curve = std::fs::read_to_string(run.join("curve.csv")).unwrap();
    assert!(
        curve.lines().next().unwrap().ends_with(",valid_accuracy,valid_hr@1,valid_hr@10,valid_ndcg@1,valid_ndcg@10"),
        "{curve}"
    );
    let losses = column(&curve, "train_loss");
    assert!(losses.last().unwrap() < &(0.5 * losses[0]), "the loss does not fall: {losses:?}");
    for split in ["valid", "test"] {
        let m = &metrics[split];
        let task = &m["per_task"]["next"];
        let (hr1, hr10, ndcg10) =
            (task["hr@1"].as_f64().unwrap(), task["hr@10"].as_f64().unwrap(), task["ndcg@10"].as_f64().unwrap());
        // The first task's metrics are the report's top level.
        assert_eq!(m["hr@10"].as_f64(), Some(hr10), "{split}");
        assert_eq!(m["ndcg@10"].as_f64(), Some(ndcg10), "{split}");
        assert_eq!(task["accuracy"].as_f64(), Some(hr1), "{split}: accuracy is the share ranked first");
        // The next item follows from the latest one: a trained model ranks it high,
        // where scoring all 21 candidates alike would rank it nowhere.
        assert!(hr10 > 0.9 && hr1 <= hr10, "{split}: hr@1 {hr1}, hr@10 {hr10}");
        assert!(ndcg10 <= hr10 && ndcg10 >= hr1, "{split}: ndcg@10 {ndcg10} between hr@1 {hr1} and hr@10 {hr10}");
        assert_eq!(task["count"].as_u64(), Some(if split == "valid" { 100 } else { 150 }), "{split}");
    }
}

#[test]
fn a_task_that_reads_a_label_is_refused_by_a_schema_without_labels() {
    let dir = tmp("tasks", "candidates_binary");
    let spec = NEXT_ITEM
        .replace("label next : candidates(top = [1, 10])", "label next : candidates(top = [1, 10])\n  label click")
        .replace(
            "loss softmax_ce(next)",
            "task click = sum(latest, axis = [1, 2])\n  loss softmax_ce(next) + bce(click)",
        );
    let exp = next_item_setup(&dir, &spec);
    let err = failed(&mdl(&["run", exp.to_str().unwrap(), "--out", dir.join("run").to_str().unwrap()]));
    assert!(err.contains("task `click` (label 1 of the spec) has no entry in the schema's labels ()"), "{err}");
}
