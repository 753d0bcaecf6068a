//! Staged training (`train.stages`) end to end through the `mdl` binary, on the bundled
//! kuairand_pure_tail, with a small spec in the D-Train shape: a backbone, a pooled head
//! (`head0`) trained by the named loss `pre`, and a per-domain head (`heads`) trained by
//! `main`. Each construct has its test: the names a stage gives (groups, losses) checked
//! against the spec with the list there is; a stage's own objective; a copy of one group
//! into a per-domain group; a stage's own early stopping and the best parameters it hands
//! on; and a run stopped in the middle of stage 2 of 3 that, resumed, ends byte-identical.

mod common;
use mdl_runtime::tensor::Tensor;
use std::path::Path;

use common::scoring::{failed, mdl, ok};

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("stages", name)
}

/// The D-Train shape in small: `pre` trains the pooled head, `main` the per-domain heads.
const SPEC: &str = "model staged(dim = 8) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  input domain : domain
  label click
  group backbone {
    let E = embedding(fields, dim)
    let h = mlp(flatten(E[fields]), [16])
  }
  group head0 {
    let pooled = squeeze(linear(h, 1), 1)
  }
  group heads {
    task click = per domain { linear(h, 1) }
  }
  loss pre = mean(softplus(pooled) - label(click) * pooled)
  loss main = bce(click)
}
";

/// Writes the spec into `dir`; returns the `--set spec=...` for it.
fn spec(dir: &Path) -> String {
    let path = dir.join("staged.mdl");
    std::fs::write(&path, SPEC).unwrap();
    format!("spec={}", path.display())
}

/// A short staged run of the quickstart's data with the spec and `stages` (YAML flow).
fn run(dir: &Path, out: &str, stages: &str, extra: &[&str]) -> std::process::Output {
    let out = dir.join(out);
    let spec = spec(dir);
    let stages = format!("train.stages={stages}");
    let mut args = vec![
        "run",
        "experiments/quickstart.yaml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &spec,
        "--set",
        "train.batch_size=512",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.early_stopping.patience=10",
        "--set",
        &stages,
    ];
    args.extend_from_slice(extra);
    mdl(&args)
}

fn tensors(ckpt: &Path) -> Vec<(String, Tensor<f32>)> {
    mdl_runtime::checkpoint::load(ckpt).unwrap().0
}

fn get(tensors: &[(String, Tensor<f32>)], name: &str) -> Tensor<f32> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", tensors.iter().map(|t| &t.0).collect::<Vec<_>>()))
        .1
        .clone()
}

/// A run stopped and resumed (`resumed`) ended as the run never stopped (`straight`): the
/// same metrics.json, curve.csv and loss.csv byte for byte, and checkpoints holding the same
/// tensors (their metadata names each its own run).
fn assert_resumed_as_straight(straight: &Path, resumed: &Path) {
    for f in ["metrics.json", "curve.csv", "loss.csv"] {
        let same = std::fs::read(straight.join(f)).unwrap() == std::fs::read(resumed.join(f)).unwrap();
        assert!(same, "{f} of the resumed run differs from the straight run's");
    }
    for f in ["best.ckpt", "last.ckpt"] {
        let same = tensors(&straight.join(f)) == tensors(&resumed.join(f));
        assert!(same, "{f} of the resumed run holds other tensors than the straight run's");
    }
}

fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap()
}

/// Every name a stage gives is checked against the spec before any data is read or any
/// run folder made; the error names the key path, the nearest name and the list there is.
#[test]
fn names_a_stage_gives_are_checked_against_the_spec() {
    let dir = tmp("names");
    let cases = [
        (
            "[{steps: 2, losses: [mian]}]",
            "train.stages[0].losses: model `staged` has no named loss `mian`; did you mean `main`? (its losses: main, pre)",
        ),
        (
            "[{steps: 2}, {steps: 2, copy: [{from: head0, to: haeds}]}]",
            "train.stages[1].copy[0].to: no parameter of model `staged` is in group `haeds`; did you mean `heads`? (its groups: backbone, head0, heads)",
        ),
        (
            "[{steps: 2, train_only: [backbone, head]}]",
            "train.stages[0].train_only: no parameter of model `staged` is in group `head`; did you mean `head0`? (its groups: backbone, head0, heads)",
        ),
        (
            "[{steps: 2, freeze: [tower]}]",
            "train.stages[0].freeze: no parameter of model `staged` is in group `tower` (its groups: backbone, head0, heads)",
        ),
        // A copy between groups whose parameters do not pair up names both sides.
        (
            "[{steps: 2, copy: [{from: backbone, to: heads}]}]",
            "train.stages[0].copy[0]: group `backbone` has 3 parameters (E/table [rows(fields), 8]",
        ),
        (
            "[{steps: 2, epochs: 1}]",
            "train.stages[0]: give `epochs` or `steps`, not both (a stage has one length)",
        ),
        ("[{name: a}]", "train.stages[0]: give its length, `epochs: N` or `steps: N`"),
        ("[{steps: 2, lr: 0}]", "train.stages[0].lr: must be a positive number, found 0"),
        (
            "[{steps: 2, group_lr: {head0: 0.01, hed: 0.1}}]",
            "train.stages[0].group_lr: no parameter of model `staged` is in group `hed`; did you mean `head0`? (its groups: backbone, head0, heads)",
        ),
        ("[{steps: 2, group_lr: {heads: -1}}]", "train.stages[0].group_lr.heads: must be a positive number, found -1"),
        (
            "[{steps: 2, early_stopping: {metric: acc}}]",
            "train.stages[0].early_stopping.metric: expected auc, gauc, logloss, rmse, mae, rmsle, accuracy, hr@k, ndcg@k or loss, found `acc`",
        ),
    ];
    for (i, (stages, expected)) in cases.iter().enumerate() {
        let name = format!("case{i}");
        let err = failed(&run(&dir, &name, stages, &[]));
        assert!(err.contains(expected), "{stages}:\n{err}");
        assert!(!err.contains("data: train"), "the data was read before the error:\n{err}");
        assert!(!dir.join(&name).exists(), "a run folder was made for a run that cannot start");
    }
    // A copy whose parameters differ in shape names both parameters, their shapes, groups
    // and where the spec defines each (the calls of `linear` that made them).
    let err = failed(&run(&dir, "shapes", "[{steps: 2, copy: [{from: heads, to: head0}]}]", &[]));
    let spec = dir.join("staged.mdl");
    let expected = format!(
        "train.stages[0].copy[0]: `click/per_domain/linear/W` [count(domain), 16, 1] (group `heads`, defined at {0}:16:31) cannot be copied into `pooled/linear/W` [16, 1] (group `head0`, defined at {0}:13:26): the shapes differ",
        spec.display()
    );
    assert!(err.contains(&expected), "{err}");
    // A domain the train split does not have.
    let err = failed(&run(&dir, "domain", "[{steps: 2, domains: [0, 99]}]", &[]));
    assert!(err.contains("train.stages[0].domains: domain 99 has no rows in train (its domains: 0, 1, 2,"), "{err}");
    // A loss named twice is a spec error at the second name.
    let twice = dir.join("twice.mdl");
    std::fs::write(&twice, SPEC.replace("loss main = bce(click)", "loss pre = bce(click)")).unwrap();
    let err = failed(&mdl(&["check", twice.to_str().unwrap()]));
    assert!(err.contains("loss `pre` is declared twice"), "{err}");
    assert!(err.contains("twice.mdl:19:8"), "{err}");
}

/// A stage trains on its own losses only: with `losses: [pre]` the per-domain heads, which
/// only `main` reaches, keep their initial values while the pooled head trains; the next
/// stage's copy puts the pooled head into every domain's head (a one-to-many copy).
#[test]
fn a_stage_trains_its_own_objective_and_a_copy_fills_every_domains_head() {
    let dir = tmp("objective_copy");
    let stages = "[{name: pre, steps: 4, losses: [pre]}, {name: post, steps: 1, copy: [{from: head0, to: heads}], train_only: []}]";
    // Stopped at the end of stage 1 (max_steps), and the whole schedule.
    ok(&run(&dir, "first", stages, &["--set", "train.max_steps=4"]));
    let log = ok(&run(&dir, "both", stages, &[]));
    let first = tensors(&dir.join("first/last.ckpt"));
    let init = |name: &str, init: mdl_runtime::Init| {
        mdl_runtime::init::init_tensor::<f32>(name, get(&first, name).shape, &init, 2023).unwrap()
    };
    assert_eq!(
        get(&first, "click/per_domain/linear/W"),
        init("click/per_domain/linear/W", mdl_runtime::Init::Glorot),
        "`main` trained in stage `pre`"
    );
    assert_eq!(get(&first, "click/per_domain/linear/b"), init("click/per_domain/linear/b", mdl_runtime::Init::Zeros));
    assert_ne!(
        get(&first, "pooled/linear/W"),
        init("pooled/linear/W", mdl_runtime::Init::Glorot),
        "`pre` did not train"
    );
    // After the copy (and no training: `train_only: []`), each of the 15 domains' heads is
    // the pooled head of stage 1's best step.
    let both = tensors(&dir.join("both/last.ckpt"));
    let (w0, b0) = (get(&both, "pooled/linear/W"), get(&both, "pooled/linear/b"));
    let (w, b) = (get(&both, "click/per_domain/linear/W"), get(&both, "click/per_domain/linear/b"));
    assert_eq!(w.shape, vec![15, 16, 1]);
    assert_eq!(b.shape, vec![15, 1]);
    for d in 0..15 {
        assert_eq!(&w.data[d * 16..(d + 1) * 16], &w0.data[..], "domain {d}'s head");
        assert_eq!(&b.data[d..d + 1], &b0.data[..], "domain {d}'s bias");
    }
    assert!(log.contains("stage `post`: copied pooled/linear/W into click/per_domain/linear/W (15 copies)"), "{log}");
    assert!(
        log.contains("stage 1/2 `pre` (4 steps): trains backbone, head0, heads; frozen nothing; losses pre; lr 0.001"),
        "{log}"
    );
    assert!(
        log.contains("stage 2/2 `post` (1 steps): trains nothing; frozen backbone, head0, heads; losses all"),
        "{log}"
    );
    let curve = std::fs::read_to_string(dir.join("both/curve.csv")).unwrap();
    let lines: Vec<&str> = curve.lines().collect();
    assert_eq!(lines[0], "step,epoch,train_loss,valid_auc,valid_gauc,valid_logloss,stage,trains,frozen", "{curve}");
    assert!(lines[1].starts_with("2,0,") && lines[1].ends_with(",pre,backbone;head0;heads,"), "{curve}");
    assert!(
        lines.last().unwrap().starts_with("5,2,") && lines.last().unwrap().ends_with(",post,,backbone;head0;heads"),
        "{curve}"
    );
}

/// Each stage has its own early stopping on its own metric: stage `still` (a learning rate
/// too small to move a weight) stops after one evaluation without improvement, yet the run
/// goes on to stage `go`, whose best is its own (on logloss), not compared with `still`'s.
/// A stage that ends hands on its best parameters: stage `flat` trains nothing, so its one
/// evaluation scores the parameters `noisy` handed on, which are those of `noisy`'s best
/// evaluation, not its last.
#[test]
fn each_stage_stops_on_its_own_metric_and_hands_on_its_best() {
    let dir = tmp("early");
    let stages = "[{name: still, steps: 20, lr: 1e-12, early_stopping: {metric: auc, patience: 1}}, {name: go, steps: 4, early_stopping: {metric: logloss, patience: 5}}]";
    let log = ok(&run(&dir, "early", stages, &[]));
    let m = metrics(&dir.join("early"));
    assert_eq!(m["steps"].as_u64(), Some(8), "stage `go` did not run after `still` stopped early:\n{log}");
    let s = &m["stages"];
    assert_eq!(s[0]["name"], "still");
    assert_eq!(s[0]["steps"].as_u64(), Some(4));
    assert_eq!(s[0]["stopped_early"], true);
    assert_eq!(s[0]["best_step"].as_u64(), Some(2));
    assert_eq!(s[1]["name"], "go");
    assert_eq!(s[1]["metric"], "logloss");
    assert_eq!(s[1]["steps"].as_u64(), Some(4));
    assert!(s[1]["best_step"].as_u64().unwrap() > 4, "stage `go`'s best is from stage `still`: {m}");
    assert_eq!(m["best_step"], s[1]["best_step"]);
    assert!(log.contains("stage `still` ends at step 4: its best parameters (step 2, valid auc"), "{log}");

    // Stage `noisy` (a large learning rate, evaluated every 2 steps) ends on an evaluation
    // worse than its best (by logloss); stage `flat` scores what it was handed.
    let stages = "[{name: noisy, steps: 8, lr: 0.05, early_stopping: {metric: logloss, patience: 10}}, {name: flat, steps: 2, train_only: []}]";
    ok(&run(&dir, "handed", stages, &[]));
    let curve = std::fs::read_to_string(dir.join("handed/curve.csv")).unwrap();
    let logloss = |line: &str| line.split(',').nth(5).unwrap().to_string();
    let noisy: Vec<&str> = curve.lines().filter(|l| l.contains(",noisy,")).collect();
    let flat = curve.lines().find(|l| l.contains(",flat,")).unwrap();
    let m = metrics(&dir.join("handed"));
    let best = format!("{:.6}", m["stages"][0]["best"].as_f64().unwrap());
    assert_ne!(logloss(noisy.last().unwrap()), best, "the test needs `noisy` to end off its best:\n{curve}");
    assert_eq!(logloss(flat), best, "stage `flat` did not start from `noisy`'s best:\n{curve}");
}

/// `early_stopping: {metric: loss}` watches the stage's own objective on the valid split: for
/// stage `post`, whose objective is the BCE of the task, it is the task's valid logloss; for
/// stage `pre` (the pooled head's loss, which no task reports) its best value and step are
/// the smallest of the stage's `valid_loss` column and where it was taken.
#[test]
fn a_stage_stops_early_on_its_own_objective() {
    let dir = tmp("objective");
    let stages = "[{name: pre, steps: 8, losses: [pre], early_stopping: {metric: loss, patience: 10}}, {name: post, steps: 4, losses: [main], early_stopping: {metric: loss, patience: 10}}]";
    let log = ok(&run(&dir, "objective", stages, &[]));
    let curve = std::fs::read_to_string(dir.join("objective/curve.csv")).unwrap();
    let header: Vec<&str> = curve.lines().next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name}:\n{curve}"));
    let (step, logloss, loss, stage) = (column("step"), column("valid_logloss"), column("valid_loss"), column("stage"));
    let rows: Vec<Vec<&str>> = curve.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let value = |r: &Vec<&str>, i: usize| r[i].parse::<f64>().unwrap();
    let post: Vec<&Vec<&str>> = rows.iter().filter(|r| r[stage] == "post").collect();
    assert_eq!(post.len(), 2, "{curve}");
    for r in &post {
        assert!((value(r, loss) - value(r, logloss)).abs() < 2e-5, "the BCE objective is not the logloss:\n{curve}");
    }
    let pre: Vec<&Vec<&str>> = rows.iter().filter(|r| r[stage] == "pre").collect();
    assert_eq!(pre.len(), 4, "{curve}");
    let best = pre.iter().min_by(|a, b| value(a, loss).total_cmp(&value(b, loss))).unwrap();
    let m = metrics(&dir.join("objective"));
    let s = &m["stages"][0];
    assert_eq!(s["metric"], "loss");
    assert_eq!(format!("{:.6}", s["best"].as_f64().unwrap()), best[loss], "{m}\n{curve}");
    assert_eq!(s["best_step"].as_u64().unwrap().to_string(), best[step], "{m}\n{curve}");
    assert!(pre.iter().any(|r| (value(r, loss) - value(r, logloss)).abs() > 1e-3), "`pre` scored the task:\n{curve}");
    assert!(log.contains(" loss "), "{log}");
}

/// A run stopped in the middle of stage 2 of 3 and resumed ends with the same metrics.json
/// and curve.csv (byte for byte) and checkpoint tensors as the run that was never stopped; the third stage reads the
/// rows of four domains only, at its own learning rate, with a fresh optimizer.
#[test]
fn a_run_stopped_in_stage_two_of_three_resumes_to_the_same_result() {
    let dir = tmp("resume");
    let stages = "[{name: pre, steps: 4, losses: [pre], train_only: [backbone, head0]}, {name: post, steps: 4, copy: [{from: head0, to: heads}], losses: [main]}, {name: tune, steps: 4, train_only: [heads], lr: 0.01, reset_optimizer: true, domains: [0, 2, 4, 6]}]";
    let log = ok(&run(&dir, "straight", stages, &[]));
    assert!(log.contains("stage 3/3 `tune` (4 steps): trains heads; frozen backbone, head0; losses all; lr 0.01; 31935 train rows; optimizer reset"), "{log}");
    let first = ok(&run(&dir, "stopped", stages, &["--stop-after", "7"]));
    assert!(first.contains("stopping after 7 steps"), "{first}");
    let stopped = dir.join("stopped");
    let resumed = ok(&mdl(&["run", "--resume", stopped.to_str().unwrap()]));
    assert!(resumed.contains("resumed from") && resumed.contains("at step 6"), "{resumed}");
    let straight = dir.join("straight");
    assert_resumed_as_straight(&straight, &stopped);
    let m = metrics(&straight);
    let names: Vec<&str> = m["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pre", "post", "tune"]);
    assert_eq!(m["steps"].as_u64(), Some(12));
    // A stage ends its epoch: loss.csv's steps 1-4, 5-8 and 9-12 are epochs 1, 2 and 3 (the
    // epoch is not the step over the batches of a whole epoch of train).
    let losses = std::fs::read_to_string(straight.join("loss.csv")).unwrap();
    let epochs: Vec<&str> = losses.lines().skip(1).map(|l| l.split(',').nth(1).unwrap()).collect();
    assert_eq!(epochs, ["1", "1", "1", "1", "2", "2", "2", "2", "3", "3", "3", "3"], "{losses}");
}

/// The example of docs/stages.md (its spec and its experiment, read from the page) trains
/// through its three stages.
#[test]
fn the_documented_example_trains_through_its_stages() {
    let dir = tmp("docs");
    let page = std::fs::read_to_string(common::root().join("docs/stages.md")).unwrap();
    let block = |opening: &str| {
        let start = page.find(opening).unwrap_or_else(|| panic!("no {opening} block")) + opening.len();
        page[start..start + page[start..].find("```").unwrap()].to_string()
    };
    let spec = dir.join("dtrain_small.mdl");
    std::fs::write(&spec, block("```\nmodel dtrain_small")).unwrap();
    std::fs::write(&spec, format!("model dtrain_small{}", std::fs::read_to_string(&spec).unwrap())).unwrap();
    let experiment = block("```yaml\n")
        .replace(
            "base: quickstart.yaml",
            &format!("base: {}", common::root().join("experiments/quickstart.yaml").display()),
        )
        .replace("spec: ../specs/dtrain_small.mdl", &format!("spec: {}", spec.display()));
    let path = dir.join("dtrain_small.yaml");
    std::fs::write(&path, experiment).unwrap();
    let out = dir.join("out");
    let log = ok(&mdl(&["run", path.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    let m = metrics(&out);
    let names: Vec<&str> = m["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pretrain", "posttrain", "finetune"], "{log}");
    assert!(
        log.contains("stage `posttrain`: copied pooled/linear/W into click/per_domain/linear/W (15 copies)"),
        "{log}"
    );
}

/// A warm start: a fresh run whose `train.init_from` names another run starts with that
/// run's best parameters in the groups it copies (its pooled head into every domain's head),
/// every other parameter from its initialiser. A group or shape that does not fit is an
/// error before any data is read, naming where each spec (the source run's copy, and the new
/// run's) defines the two parameters.
#[test]
fn a_warm_start_takes_another_runs_best_parameters() {
    let dir = tmp("warm");
    ok(&run(&dir, "source", "[{name: pre, steps: 4, losses: [pre]}]", &[]));
    let source = dir.join("source");
    let init = format!(
        "train.init_from={{run: {}, copy: [{{from: backbone, to: backbone}}, {{from: head0, to: heads}}]}}",
        source.display()
    );
    // One step that trains nothing: the parameters are those the warm start gave.
    let log = ok(&run(&dir, "warm", "[{steps: 1, train_only: []}]", &["--set", &init]));
    assert!(
        log.contains(&format!(
            "copied pooled/linear/W into click/per_domain/linear/W (15 copies) from {}",
            source.display()
        )),
        "{log}"
    );
    let best = tensors(&source.join("best.ckpt"));
    let warm = tensors(&dir.join("warm/last.ckpt"));
    for name in ["E/table", "h/mlp/linear/W", "h/mlp/linear/b"] {
        assert_eq!(get(&warm, name), get(&best, name), "{name} is not the source run's best");
    }
    let (w0, w) = (get(&best, "pooled/linear/W"), get(&warm, "click/per_domain/linear/W"));
    for d in 0..15 {
        assert_eq!(&w.data[d * 16..(d + 1) * 16], &w0.data[..], "domain {d}'s head");
    }
    // head0 was not copied: it starts from its initialiser, not from the source's.
    let init_w =
        mdl_runtime::init::init_tensor::<f32>("pooled/linear/W", vec![16, 1], &mdl_runtime::Init::Glorot, 2023)
            .unwrap();
    assert_eq!(get(&warm, "pooled/linear/W"), init_w);

    let bad = format!("train.init_from={{run: {}, copy: [{{from: heads, to: head0}}]}}", source.display());
    let err = failed(&run(&dir, "bad", "[{steps: 1}]", &["--set", &bad]));
    let expected = format!(
        "train.init_from.copy[0]: `click/per_domain/linear/W` [count(domain), 16, 1] (group `heads`, defined at {}:16:31) cannot be copied into `pooled/linear/W` [16, 1] (group `head0`, defined at {}:13:26): the shapes differ",
        source.join("spec/staged.mdl").display(),
        dir.join("staged.mdl").display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!err.contains("data: train") && !dir.join("bad").exists(), "{err}");
    let unknown = format!("train.init_from={{run: {}, copy: [{{from: head, to: head0}}]}}", source.display());
    let err = failed(&run(&dir, "unknown", "[{steps: 1}]", &["--set", &unknown]));
    assert!(err.contains("train.init_from.copy[0].from: no parameter of model `staged` is in group `head`; did you mean `head0`? (its groups: backbone, head0, heads)"), "{err}");
    let missing =
        format!("train.init_from={{run: {}, copy: [{{from: head0, to: head0}}]}}", dir.join("nothing").display());
    let err = failed(&run(&dir, "missing", "[{steps: 1}]", &["--set", &missing]));
    assert!(err.contains("train.init_from.run: "), "{err}");
}

/// Per-group learning rates: `train.group_lr` gives the backbone a rate too small to move a
/// weight in f32 (its parameters keep their initial values) while the heads train at
/// `train.lr`; a stage's `group_lr` overrides it for its own steps (the backbone then
/// trains), and the log shows each stage's rates. A `group_lr` equal to `train.lr` changes
/// nothing: metrics.json is byte-identical to the run without it.
#[test]
fn group_learning_rates_apply_per_group_and_per_stage() {
    let dir = tmp("group_lr");
    let init = |t: &[(String, Tensor<f32>)], name: &str| {
        mdl_runtime::init::init_tensor::<f32>(name, get(t, name).shape, &mdl_runtime::Init::Glorot, 2023).unwrap()
    };
    let still = "train.group_lr={backbone: 1.0e-30}";
    let log = ok(&run(&dir, "still", "[{name: a, steps: 3}]", &["--set", still]));
    let t = tensors(&dir.join("still/last.ckpt"));
    assert_eq!(get(&t, "h/mlp/linear/W"), init(&t, "h/mlp/linear/W"), "the backbone moved at lr 1e-30");
    assert_ne!(get(&t, "pooled/linear/W"), init(&t, "pooled/linear/W"), "head0 did not train");
    assert!(log.contains("stage 1/1 `a` (3 steps): trains backbone, head0, heads; frozen nothing; losses all; lr 0.001, backbone 1e-30;"), "{log}");
    // The second stage gives the backbone its own rate back.
    ok(&run(
        &dir,
        "moves",
        "[{name: a, steps: 2}, {name: b, steps: 1, group_lr: {backbone: 0.001}}]",
        &["--set", still],
    ));
    let t = tensors(&dir.join("moves/last.ckpt"));
    assert_ne!(get(&t, "h/mlp/linear/W"), init(&t, "h/mlp/linear/W"), "stage b's group_lr did not apply");
    // A group's rate equal to train.lr is the same run.
    ok(&run(&dir, "plain", "[{name: a, steps: 3}]", &[]));
    ok(&run(&dir, "same", "[{name: a, steps: 3}]", &["--set", "train.group_lr={heads: 0.001}"]));
    assert_eq!(metrics(&dir.join("plain")), metrics(&dir.join("same")));
}

/// `stage()` in the graph: the spec's two objectives are switched by the stage under way
/// (`pre` in stage 0, `main` after it). In stage 0 the per-domain heads, which only `main`
/// reaches, keep their initial values; in stage 1 they train. The checkpoints hold the
/// stage of their last training step, and a run stopped in the middle of stage 2 of 3
/// resumes to the same metrics, curve and tensors as the run that was never stopped.
#[test]
fn a_loss_weighted_by_the_stage_changes_with_it_and_resumes_exactly() {
    let dir = tmp("stage_counter");
    let by_stage = SPEC
        .replace("  loss pre = ", "  let first = maximum(1 - stage(), 0)\n  loss pre = first * ")
        .replace("loss main = bce(click)", "loss main = (1 - first) * bce(click)");
    let spec = dir.join("staged.mdl");
    std::fs::write(&spec, &by_stage).unwrap();
    let set_spec = format!("spec={}", spec.display());
    let stages = "[{name: a, steps: 4}, {name: b, steps: 4}, {name: c, steps: 4, train_only: [heads]}]";
    let run_by_stage = |out: &str, extra: &[&str]| {
        let out = dir.join(out);
        let stages = format!("train.stages={stages}");
        let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap()];
        for set in [set_spec.as_str(), "train.batch_size=512", "train.eval_every=2", &stages] {
            args.extend(["--set", set]);
        }
        args.extend_from_slice(extra);
        ok(&mdl(&args));
        out
    };
    let counter = |t: &[(String, Tensor<f32>)]| get(t, "stage()").data;
    let first = tensors(&run_by_stage("first", &["--set", "train.max_steps=4"]).join("last.ckpt"));
    let init = mdl_runtime::init::init_tensor::<f32>(
        "click/per_domain/linear/W",
        vec![15, 16, 1],
        &mdl_runtime::Init::Glorot,
        2023,
    )
    .unwrap();
    assert_eq!(get(&first, "click/per_domain/linear/W"), init, "`main` trained in stage 0");
    assert_eq!(counter(&first), vec![0.0]);
    let second = tensors(&run_by_stage("second", &["--set", "train.max_steps=8"]).join("last.ckpt"));
    assert_ne!(get(&second, "click/per_domain/linear/W"), init, "`main` did not train in stage 1");
    assert_eq!(counter(&second), vec![1.0]);

    let straight = run_by_stage("straight", &[]);
    assert_eq!(counter(&tensors(&straight.join("last.ckpt"))), vec![2.0]);
    let stopped = run_by_stage("stopped", &["--stop-after", "7"]);
    assert_eq!(counter(&tensors(&stopped.join("last.ckpt"))), vec![1.0], "the checkpoint of step 6");
    ok(&mdl(&["run", "--resume", stopped.to_str().unwrap()]));
    assert_resumed_as_straight(&straight, &stopped);
}
