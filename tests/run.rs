//! The main job end to end through the `mdl` binary, on the bundled kuairand_pure_tail:
//! a run writes its folder; the same seed gives a byte-identical metrics.json; a run
//! killed mid-way and resumed ends with the same metrics as a straight one; `mdl eval`
//! reproduces the test metrics; bad rows are reported or skipped and counted; bad
//! experiment files are reported with the key and the line.

mod common;
use std::path::{Path, PathBuf};

use common::scoring::{mdl, ok};

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("run", name)
}

/// A short DNN run: few steps, small batches, evaluated every 2 steps.
const SHORT: &[&str] = &[
    "--set",
    "spec=specs/dnn.mdl",
    "--set",
    "train.batch_size=512",
    "--set",
    "train.max_steps=6",
    "--set",
    "train.eval_every=2",
    "--set",
    "train.early_stopping.patience=10",
];

fn short_run(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap()];
    args.extend_from_slice(SHORT);
    args.extend_from_slice(extra);
    mdl(&args)
}

#[test]
fn same_seed_gives_identical_metrics_and_resume_matches_a_straight_run() {
    let a = tmp("seed_a");
    let b = tmp("seed_b");
    ok(&short_run(&a, &[]));
    ok(&short_run(&b, &[]));
    let ma = std::fs::read(a.join("metrics.json")).unwrap();
    assert_eq!(ma, std::fs::read(b.join("metrics.json")).unwrap(), "same seed, different metrics.json");
    for f in ["config.yaml", "fitted.json", "curve.csv", "best.ckpt", "last.ckpt", "train.log"] {
        assert!(a.join(f).exists(), "run folder lacks {f}");
    }
    let m: serde_json::Value = serde_json::from_slice(&ma).unwrap();
    for key in ["auc", "gauc", "logloss"] {
        assert!(m["test"][key].as_f64().is_some(), "test.{key} missing: {m}");
        assert!(m["valid"][key].as_f64().is_some(), "valid.{key} missing");
    }
    assert!(m["test"]["per_domain"]["1"]["count"].as_u64().unwrap() > 20000, "per-domain counts: {m}");
    assert!(m["test"]["per_task"]["click"]["auc"].as_f64().is_some());
    assert_eq!(m["steps"].as_u64(), Some(6));
    let curve = std::fs::read_to_string(a.join("curve.csv")).unwrap();
    assert_eq!(curve.lines().count(), 4, "header + evaluations at steps 2, 4, 6:\n{curve}");

    // Kill after 3 steps (the last checkpoint is at step 2), then resume.
    let c = tmp("resumed");
    let first = ok(&short_run(&c, &["--stop-after", "3"]));
    assert!(first.contains("stopping after 3 steps"), "{first}");
    assert!(!c.join("metrics.json").exists());
    // Resumed with another batch size, it is refused, naming the change; forced, with a
    // batch size whose epoch has fewer batches than the run had done, it stops with the
    // reason (it used to loop for ever).
    let changed = mdl(&["run", "--resume", c.to_str().unwrap(), "--set", "train.batch_size=100000"]);
    assert_eq!(changed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(err.contains("started with: train.batch_size: 512 -> 100000; --force goes on regardless"), "{err}");
    let wrong = mdl(&["run", "--resume", c.to_str().unwrap(), "--set", "train.batch_size=100000", "--force"]);
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("last.ckpt: the run stopped 2 batches into an epoch, which has 2"), "{err}");
    assert!(err.contains("resume with the batch size it trained with"), "{err}");
    let resumed = ok(&mdl(&["run", "--resume", c.to_str().unwrap()]));
    assert!(resumed.contains("resumed from"), "{resumed}");
    assert_eq!(ma, std::fs::read(c.join("metrics.json")).unwrap(), "resumed run differs from the straight run");
    for f in ["curve.csv", "curve_tasks.csv", "loss.csv"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(c.join(f)).unwrap(), "resumed {f} differs");
    }
    let losses = std::fs::read_to_string(a.join("loss.csv")).unwrap();
    let steps: Vec<&str> = losses.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6"], "one loss per step:\n{losses}");

    // `mdl eval` on the test split reproduces metrics.json's test block.
    let ev = mdl(&["eval", a.to_str().unwrap(), "--data", "data/kuairand_pure_tail/test.csv.gz"]);
    ok(&ev);
    let e: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    assert_eq!(e["auc"], m["test"]["auc"]);
    assert_eq!(e["gauc"], m["test"]["gauc"]);

    // `mdl predict` writes one score per row.
    let scores = a.join("scores.csv");
    ok(&mdl(&[
        "predict",
        a.to_str().unwrap(),
        "--data",
        "data/kuairand_pure_tail/valid.csv.gz",
        "--out",
        scores.to_str().unwrap(),
    ]));
    let text = std::fs::read_to_string(&scores).unwrap();
    assert_eq!(text.lines().count(), 18943 + 1);
    assert!(text.starts_with("click\n"));

    // `mdl report` prints a Markdown row with metrics.json's figures and timing.json's rate.
    let timing: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("timing.json")).unwrap()).unwrap();
    assert!(timing["train_rows_per_s"].as_f64().unwrap() > 0.0, "{timing}");
    assert_eq!(timing["train_rows"].as_u64(), Some(6 * 512));
    let rep = mdl(&["report", a.to_str().unwrap()]);
    ok(&rep);
    let table = String::from_utf8(rep.stdout).unwrap();
    let row = table.lines().nth(2).unwrap_or_else(|| panic!("no row:\n{table}"));
    let auc = format!("| {:.4} |", m["test"]["auc"].as_f64().unwrap());
    assert!(row.starts_with("| dnn (seed_a) | ") && row.contains(&auc), "{table}");
    assert!(row.contains(&format!("1: {:.4}", m["test"]["per_domain"]["1"]["auc"].as_f64().unwrap())), "{table}");
    let missing = mdl(&["report", c.join("nothing").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no metrics.json"));
}

#[test]
fn loss_falls_over_an_epoch_of_training() {
    let d = tmp("falls");
    let err = ok(&mdl(&[
        "run",
        "experiments/quickstart.yaml",
        "--out",
        d.to_str().unwrap(),
        "--set",
        "spec=specs/dnn.mdl",
        "--set",
        "train.batch_size=2048",
        "--set",
        "train.max_steps=30",
        "--set",
        "train.eval_every=15",
    ]));
    let curve = std::fs::read_to_string(d.join("curve.csv")).unwrap();
    let rows: Vec<Vec<f64>> =
        curve.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect()).collect();
    assert_eq!(rows.len(), 2, "{curve}\n{err}");
    assert!(rows[1][2] < rows[0][2], "train loss did not fall: {curve}");
    assert!(rows[1][3] > 0.65, "valid AUC after 30 steps should be well above chance: {curve}");
}

/// The first `n` rows of the real train split (header included), with edits.
fn small_split(dir: &Path, name: &str, n: usize, corrupt_line: Option<usize>) -> PathBuf {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(common::root().join("data/kuairand_pure_tail/train.csv.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let mut lines: Vec<String> = text.lines().take(n + 1).map(|s| s.to_string()).collect();
    if let Some(l) = corrupt_line {
        // Drop the last column: a row with the wrong number of fields.
        let s = lines[l - 1].clone();
        lines[l - 1] = s[..s.rfind(',').unwrap()].to_string();
    }
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn malformed_rows_stop_with_file_and_line_or_are_skipped_and_counted() {
    let d = tmp("bad_rows");
    let train = small_split(&d, "train.csv", 400, Some(7));
    let valid = small_split(&d, "valid.csv", 200, None);
    let test = small_split(&d, "test.csv", 200, None);
    let base = ["--set", "spec=specs/dnn.mdl", "--set", "train.batch_size=128", "--set", "train.max_steps=2"];
    let sets = [
        format!("data.train={}", train.display()),
        format!("data.valid={}", valid.display()),
        format!("data.test={}", test.display()),
    ];
    let mut args = vec!["run", "experiments/quickstart.yaml", "--out"];
    let out_dir = d.join("out");
    args.push(out_dir.to_str().unwrap());
    args.extend_from_slice(&base);
    for s in &sets {
        args.push("--set");
        args.push(s);
    }
    let fail = mdl(&args);
    assert!(!fail.status.success());
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(err.contains("train.csv:7"), "the error names file:line:\n{err}");

    args.push("--set");
    args.push("data.bad_rows=skip");
    let err = ok(&mdl(&args));
    assert!(err.contains("skipped 1 malformed rows in train"), "{err}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["skipped_rows"]["train"].as_u64(), Some(1));
}

#[test]
fn experiment_errors_name_the_key() {
    let d = tmp("bad_yaml");
    let p = d.join("bad.yaml");
    let root = common::root();
    let base = root.join("experiments/kuairand_base.yaml");
    std::fs::write(
        &p,
        format!("base: {}\nspec: {}\ntrain:\n  batch_sise: 12\n", base.display(), root.join("specs/dnn.mdl").display()),
    )
    .unwrap();
    let out = mdl(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("unknown field `batch_sise`") && err.contains("line 4"), "{err}");

    std::fs::write(&p, format!("base: {}\nspec: {}\n", base.display(), root.join("specs/crocodile.mdl").display()))
        .unwrap();
    let out = mdl(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input `priors` (categorical) has no group in the schema"), "{err}");
    assert!(err.contains("input `domain` is a domain"), "{err}");
}

#[test]
fn a_frozen_group_keeps_its_initial_values() {
    common::assert_a_frozen_group_keeps_its_initial_values(&tmp("stages"), |args| {
        ok(&mdl(args));
    });
}

/// A stage that names a group no parameter has is an error before any data is read or any
/// run folder made: a misspelt `freeze` used to freeze nothing, and a misspelt `train_only`
/// everything (the loss stayed at 0.69315).
#[test]
fn a_stage_naming_an_unknown_group_is_an_error() {
    let dir = tmp("unknown_group");
    let spec = dir.join("grouped.mdl");
    std::fs::write(
        &spec,
        "model grouped {\n  input fields : categorical\n  input hist : sequence(50) of fields\n  input tags : sequence(3)\n  input dense : numeric\n  label click\n  let h = mlp(flatten(embedding(fields, 8)[fields]), [16])\n  group tower {\n    task click = linear(h, 1)\n  }\n  loss bce(click)\n}\n",
    )
    .unwrap();
    let spec_set = format!("spec={}", spec.display());
    for key in ["freeze", "train_only"] {
        let stages = format!("train.stages=[{{epochs: 1, {key}: [towr]}}]");
        let out_dir = dir.join(key);
        let out = short_run(&out_dir, &["--set", &spec_set, "--set", &stages]);
        assert!(!out.status.success(), "a stage naming group `towr` ran");
        let err = String::from_utf8_lossy(&out.stderr);
        let expected = format!(
            "train.stages[0].{key}: no parameter of model `grouped` is in group `towr`; did you mean `tower`? (its groups: tower)"
        );
        assert!(err.contains(&expected), "{err}");
        assert!(!out_dir.exists(), "a run folder was made for a run that cannot start");
    }
    // The DNN spec has no groups at all.
    let out = short_run(&dir.join("none"), &["--set", "train.stages=[{epochs: 1, freeze: [tower]}]"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in group `tower` (the model declares no groups)"), "{err}");
    // A correct name still trains.
    ok(&short_run(&dir.join("right"), &["--set", &spec_set, "--set", "train.stages=[{epochs: 1, freeze: [tower]}]"]));
}

/// `mdl bench` prints the step rate and the GEMM-bound line; the DNN's products are the
/// three layers forward (768·256 + 256·128 + 128·1 multiply-adds per sample) and their two
/// gradients each: 2 · 3 · 229,504 = 1,377,024 flops per sample.
/// `mdl run --backend B` trains on B (what the run's config records), and an unknown
/// backend is one clear error naming the choices.
#[test]
fn run_takes_the_backend_from_the_command_line() {
    let out_dir = tmp("backend_flag");
    let out = short_run(&out_dir, &["--backend", "interp", "--set", "train.max_steps=1"]);
    ok(&out);
    let config = std::fs::read_to_string(out_dir.join("config.yaml")).unwrap();
    assert!(config.lines().any(|l| l.trim() == "backend: interp"), "{config}");
    let out = short_run(&tmp("backend_flag_bad"), &["--backend", "tpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpu") && err.contains("jit"), "{err}");
    // The message says the value came from the command line, not from the file.
    assert!(err.contains("experiments/quickstart.yaml with --set"), "{err}");
}

/// The jit's thread count changes no bit of a run: where the fast kernels form partial sums
/// (reductions, embedding-bag gradients) the split is fixed by the work. A run folder does
/// not record the threads, so a resume on another count is the same experiment.
#[test]
fn metrics_do_not_depend_on_the_thread_count() {
    let one = tmp("threads_1");
    let two = tmp("threads_2");
    ok(&short_run(&one, &["--threads", "1"]));
    ok(&short_run(&two, &["--threads", "2"]));
    let metrics = std::fs::read(two.join("metrics.json")).unwrap();
    assert_eq!(std::fs::read(one.join("metrics.json")).unwrap(), metrics, "1 thread against 2");
    assert_eq!(std::fs::read(one.join("curve.csv")).unwrap(), std::fs::read(two.join("curve.csv")).unwrap());
    let log = std::fs::read_to_string(one.join("train.log")).unwrap();
    assert!(log.contains("jit threads: 1"), "{log}");
    let config = std::fs::read_to_string(one.join("config.yaml")).unwrap();
    assert!(!config.contains("threads"), "{config}");
    assert_eq!(config, std::fs::read_to_string(two.join("config.yaml")).unwrap());

    // Stopped on 1 thread, resumed on 2: the same experiment, the same metrics.
    let resumed = tmp("threads_resumed");
    ok(&short_run(&resumed, &["--threads", "1", "--stop-after", "3"]));
    ok(&mdl(&["run", "--resume", resumed.to_str().unwrap(), "--threads", "2"]));
    assert_eq!(std::fs::read(resumed.join("metrics.json")).unwrap(), metrics);

    let zero = mdl(&["eval", two.to_str().unwrap(), "--data", "data/kuairand_pure_tail/test.csv.gz", "--threads", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(err.contains("--threads: must be at least 1, found 0"), "{err}");
}

#[test]
fn bench_prints_rates_and_the_gemm_bound() {
    let out = mdl(&[
        "bench",
        "experiments/quickstart.yaml",
        "--steps",
        "1",
        "--set",
        "spec=specs/dnn.mdl",
        "--set",
        "train.batch_size=256",
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("model dnn on jit (1 thread) at batch 256"), "{text}");
    assert!(text.contains("samples/s"), "{text}");
    assert!(text.contains("(1377 kFLOP/sample)"), "{text}");
}

/// `mdl bench --nodes N` lists the step's N slowest nodes, each with its shapes as the spec
/// declares them and its scope (the backward's marked `grad:`); without it, none.
#[test]
fn bench_lists_the_slowest_nodes_with_their_scopes_and_shapes() {
    let args =
        ["bench", "experiments/quickstart.yaml", "--steps", "1", "--set", "spec=specs/dnn.mdl", "--threads", "1"];
    let out = mdl(&[&args[..], &["--nodes", "5"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, listing) = text.split_once("the 5 slowest nodes").unwrap_or_else(|| panic!("{text}"));
    let rows: Vec<&str> = listing.lines().skip(2).take_while(|l| l.contains(" <- ")).collect();
    assert_eq!(rows.len(), 5, "{text}");
    // The first layer's weight gradient, [fields·dim, 256] from two [B, ·] operands, is a
    // product of the step; every row names its scope.
    assert!(text.contains("matmul  [768, 256] <- [B, 768], [B, 256]  # grad:h/mlp/linear/y"), "{text}");
    assert!(rows.iter().all(|r| r.contains("  # ")), "{text}");
    let plain = mdl(&args);
    assert!(!String::from_utf8(plain.stdout).unwrap().contains("slowest nodes"));
}

/// `mdl bench --compile-only` compiles the spec to runnable plans `--steps` times and
/// prints the compile figures only: no step runs. PNN's pairs need the data's sizes, so its
/// spec compiles after the data (the path `mdl check` alone cannot take).
#[test]
fn bench_compile_only_prints_the_compile_figures_and_runs_no_step() {
    let out = mdl(&["bench", "experiments/pnn.yaml", "--compile-only", "--steps", "2", "--threads", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("model pnn on jit, compiled 2 times"), "{text}");
    assert!(text.contains("ms the first, ") && text.contains("ms min with the kernels cached"), "{text}");
    for line in [
        "compile (parse -> graphs with backward)",
        "runnable plans (fusion + kernels)",
        "compile to runnable plans, in all",
    ] {
        assert!(text.contains(line), "no `{line}` in {text}");
    }
    assert!(!text.contains("samples/s") && !text.contains("train step"), "a step ran: {text}");
}

/// A spec file that cannot be read is one plain error line: no doubled heading, no
/// made-up source position.
#[test]
fn a_missing_spec_file_is_one_clear_error() {
    let out = mdl(&[
        "run",
        "experiments/quickstart.yaml",
        "--set",
        "spec=specs/nope.mdl",
        "--out",
        tmp("nospec").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: cannot read") && err.contains("nope.mdl"), "{err}");
    assert!(!err.contains("error: error:") && !err.contains("<unknown>"), "{err}");
    let check = mdl(&["check", "specs/nope.mdl"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&check.stderr).contains("<unknown>"));
}

/// A bad spec is reported before any data is read: with a spec error and a data file that
/// does not exist, `mdl run` and `mdl bench` name the spec's line, not the data, and `run`
/// creates no run folder.
#[test]
fn a_bad_spec_is_reported_before_the_data() {
    let dir = tmp("badspec_first");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("bad.mdl");
    std::fs::write(&spec, "model m() {\n  input x : categorical\n  label y\n  task y = nope(x)\n  loss bce(y)\n}\n")
        .unwrap();
    let out_dir = dir.join("run");
    let spec_arg = format!("spec={}", spec.display());
    let missing = format!("data.train={}", dir.join("missing.csv").display());
    let run = mdl(&[
        "run",
        "experiments/quickstart.yaml",
        "--set",
        &spec_arg,
        "--set",
        &missing,
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let bench = mdl(&["bench", "experiments/quickstart.yaml", "--set", &spec_arg, "--set", &missing, "--steps", "1"]);
    for (what, out) in [("run", run), ("bench", bench)] {
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad.mdl:4:"), "{what}: {err}");
        assert!(!err.contains("missing.csv"), "{what}: {err}");
    }
    assert!(!out_dir.exists(), "a run folder was created for a bad spec");
}

/// `train.precision: bf16`. On a CPU with AMX-BF16 or AVX512-BF16 the run says which
/// kernel its bf16 products run on, and bf16 rounding changes the numbers; on one with
/// neither it falls back to f32 with a notice on stderr and in train.log, and computes
/// exactly what an f32 run computes. `MDL_BF16_KERNEL=emulated` runs the bf16 kernel's
/// AVX-512F emulation on any AVX-512 CPU: bf16 rounding changes the numbers. The run folder records the precision (it changes what is computed); an
/// unknown value is an error naming the key and the choices.
#[test]
fn bf16_precision_runs_bf16_or_falls_back_to_f32_with_a_notice() {
    use mdl_runtime::backend::jit::bf16::Dot;
    let (f32_run, bf16_run, emulated_run) = (tmp("precision_f32"), tmp("precision_bf16"), tmp("precision_emulated"));
    ok(&short_run(&f32_run, &[]));
    let err = ok(&short_run(&bf16_run, &["--set", "train.precision=bf16"]));
    let log = std::fs::read_to_string(bf16_run.join("train.log")).unwrap();
    let metrics = |dir: &Path| std::fs::read_to_string(dir.join("metrics.json")).unwrap();
    let said = match Dot::detect() {
        Some(Dot::Amx) => "matrix products: bf16 operands, f32 sums (AMX-BF16 tiles, tdpbf16ps)".to_string(),
        Some(Dot::Avx512Bf16) => "matrix products: bf16 operands, f32 sums (AVX512-BF16 vdpbf16ps)".to_string(),
        _ => {
            assert_eq!(metrics(&bf16_run), metrics(&f32_run), "the f32 fallback computed something else than f32");
            "notice: train.precision: bf16 needs a CPU with AMX-BF16 or AVX512-BF16, which this one lacks: the matrix products run in f32".to_string()
        }
    };
    if said.starts_with("matrix products") {
        assert_ne!(metrics(&bf16_run), metrics(&f32_run), "bf16 products computed the f32 numbers");
    }
    assert!(err.contains(&said) && log.contains(&said), "stderr:\n{err}\ntrain.log:\n{log}");
    assert!(std::fs::read_to_string(bf16_run.join("config.yaml")).unwrap().contains("precision: bf16"));
    assert!(!std::fs::read_to_string(f32_run.join("config.yaml")).unwrap().contains("precision"));

    if Dot::Emulated.available() {
        let mut args = vec!["run", "experiments/quickstart.yaml", "--out", emulated_run.to_str().unwrap()];
        args.extend_from_slice(SHORT);
        args.extend_from_slice(&["--set", "train.precision=bf16"]);
        let out = common::scoring::mdl_command(&args).env("MDL_BF16_KERNEL", "emulated").output().unwrap();
        let err = ok(&out);
        assert!(err.contains("matrix products: bf16 operands, f32 sums, emulated on AVX-512F"), "{err}");
        assert_ne!(metrics(&emulated_run), metrics(&f32_run), "bf16 products computed the f32 numbers");
    }

    let out = short_run(&tmp("precision_bad"), &["--set", "train.precision=fp16"]);
    let err = common::scoring::failed(&out);
    assert!(err.contains("train.precision: unknown variant `fp16`, expected `f32` or `bf16`"), "{err}");
    let bad_var = tmp("precision_bad_var");
    let args =
        ["run", "experiments/quickstart.yaml", "--out", bad_var.to_str().unwrap(), "--set", "train.precision=bf16"];
    let out = common::scoring::mdl_command(&args).env("MDL_BF16_KERNEL", "hardware").output().unwrap();
    let err = common::scoring::failed(&out);
    assert!(
        err.contains("MDL_BF16_KERNEL=hardware: expected one of amx, avx512bf16, emulated (or leave it unset)"),
        "{err}"
    );
}
