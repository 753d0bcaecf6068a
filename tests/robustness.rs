//! Regression tests for issue 21's findings 4, 7, 8, 9, 10 and 11, each through the `mdl`
//! binary as a user runs it: numbers that are not finite once normalised are bad rows and
//! scores that are not finite stop eval and predict (4); nonsense settings are refused
//! naming their key (7); no input panics, and a closed output pipe ends a command quietly
//! (8); a model too big for the machine is an error, not an abort (9); hostile inputs end
//! quickly with an error (10); diagnostics never show another kind of file, run names stay
//! under runs/, the log says why the data cache was not written, a loss that stops being
//! finite names its op and parameter, divergence stops the run, and one cause gives one
//! error (11).
//!
//! Most use a tiny dataset written here (two numeric columns, a label), so that a run takes
//! a fraction of a second; the memory and loss tests use the bundled quickstart data as the
//! issue's commands do.

mod common;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A hostile input must end with an error; one still running after this long hangs.
const HANG: Duration = Duration::from_secs(120);

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("robustness", name)
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mdl"));
    c.args(args)
        .current_dir(common::root())
        .env("MDL_CACHE_DIR", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache"))
        .env("CI", "1");
    c
}

struct Ran {
    ok: bool,
    code: Option<i32>,
    stderr: String,
}

/// Runs `c` to its end, failing the test if it runs longer than [`HANG`].
fn finish(mut c: Command) -> Ran {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > HANG {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("mdl {:?} still ran after {HANG:?}: it hangs", c.get_args().collect::<Vec<_>>());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // stdout is read (so that a full pipe never blocks mdl), and not needed.
    out_reader.join().unwrap();
    Ran { ok: status.success(), code: status.code(), stderr: err_reader.join().unwrap() }
}

fn mdl(args: &[&str]) -> Ran {
    finish(command(args))
}

/// The run failed with a message (exit 1, not a crash) containing every one of `needles`.
fn fails_with(r: &Ran, needles: &[&str]) {
    assert_eq!(r.code, Some(1), "expected exit 1, got {:?}:\n{}", r.code, r.stderr);
    assert!(!r.stderr.contains("internal error"), "mdl crashed:\n{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}:\n{}", r.stderr);
    }
}

fn succeeds(r: &Ran) {
    assert!(r.ok, "mdl failed ({:?}):\n{}", r.code, r.stderr);
}

const TINY_SPEC: &str = "model tiny(width = 4) {
  input x : numeric
  label click
  task click = linear(exp(x), 1) + linear(mlp(x, [width]), 1)
  loss bce(click)
}
";

/// One CSV row of the tiny data: two numbers and a label.
fn row(i: usize, a: &str, y: usize) -> String {
    format!("{a},{},{y}\n", (i % 5) as f64 / 5.0)
}

/// A split of `rows` rows whose labels alternate (both classes) unless `one_class`.
fn split(rows: usize, one_class: bool) -> String {
    let mut s = String::from("a,b,y\n");
    for i in 0..rows {
        let y = if one_class { 0 } else { usize::from(i % 3 == 0) };
        s.push_str(&row(i, &format!("{}", (i % 7) as f64 / 7.0), y));
    }
    s
}

/// A folder with the tiny spec, three splits and `tiny.yaml` (batch 8, 2 epochs).
fn tiny(name: &str) -> common::scratch::Scratch {
    let d = tmp(name);
    std::fs::write(d.join("tiny.mdl"), TINY_SPEC).unwrap();
    std::fs::write(d.join("train.csv"), split(64, false)).unwrap();
    std::fs::write(d.join("valid.csv"), split(24, false)).unwrap();
    std::fs::write(d.join("test.csv"), split(24, false)).unwrap();
    std::fs::write(
        d.join("tiny.yaml"),
        "spec: tiny.mdl
data:
  train: train.csv
  valid: valid.csv
  test: test.csv
  schema:
    features:
      - { kind: numeric, name: x, columns: [a, b], normalize: none }
    labels:
      - { name: click, column: y }
train:
  batch_size: 8
  epochs: 2
  lr: 0.01
",
    )
    .unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Finding 4: 1e300 or ±1.7e308 in a numeric cell gave NaN scores, and eval and predict
/// exited 0 (eval averaging the NaN rows into its AUC).
#[test]
fn a_number_not_finite_once_normalised_is_a_bad_row_and_a_score_not_finite_stops_eval() {
    let d = tiny("finding4");
    // At training: a train number beyond f32 is a bad row, with its file and line.
    let mut train = split(64, false);
    train.push_str(&row(64, "1.7e308", 1));
    std::fs::write(d.join("bad_train.csv"), &train).unwrap();
    let yaml = d.join("tiny.yaml");
    let out = d.join("run");
    let r = mdl(&["run", s(&yaml), "--out", s(&out), "--set", &format!("data.train={}", s(&d.join("bad_train.csv")))]);
    fails_with(&r, &["bad_train.csv:66: column 'a': 1.7e308 is beyond the range of a 32-bit float"]);

    succeeds(&mdl(&["run", s(&yaml), "--out", s(&out)]));
    // At eval and predict: a number that the train split's normaliser takes past f32.
    let mut data = split(10, false);
    data.push_str(&row(10, "1e300", 1));
    std::fs::write(d.join("huge.csv"), &data).unwrap();
    let huge = d.join("huge.csv");
    let scores = d.join("scores.csv");
    let r = mdl(&["eval", s(&out), "--data", s(&huge)]);
    fails_with(&r, &["huge.csv:12: column 'a': 1e300 is not finite once normalised"]);
    let r = mdl(&["predict", s(&out), "--data", s(&huge), "--out", s(&scores)]);
    fails_with(&r, &["huge.csv:12: column 'a': 1e300 is not finite once normalised"]);
    assert!(!scores.exists(), "predict wrote scores for a bad row");
    // A finite number whose score is not (exp(100) overflows f32): no metric averages it.
    let mut data = split(10, false);
    data.push_str(&row(10, "100", 1));
    std::fs::write(d.join("overflow.csv"), &data).unwrap();
    let overflow = d.join("overflow.csv");
    let r = mdl(&["eval", s(&out), "--data", s(&overflow)]);
    fails_with(&r, &["the model's logit for task `click` is", "on data row 11 of", "overflow.csv"]);
    let r = mdl(&["predict", s(&out), "--data", s(&overflow), "--out", s(&scores)]);
    fails_with(&r, &["the model's logit for task `click` is", "on data row 11 of"]);
    assert!(!scores.exists(), "predict wrote scores that are not finite");
}

/// Finding 7: `clip_norm: 0`, `-1`, `.nan`, `epochs: 0` and `max_steps: 0` trained nothing
/// with exit 0, and a validation split of one class stopped early with best step 0.
#[test]
fn nonsense_settings_are_refused_naming_the_key_and_the_file() {
    let d = tiny("finding7");
    let yaml = d.join("tiny.yaml");
    let out = d.join("run");
    for (set, key) in [
        ("train.clip_norm=0", "train.clip_norm: must be a positive number, found 0"),
        ("train.clip_norm=-1", "train.clip_norm: must be a positive number, found -1"),
        ("train.clip_norm=.nan", "train.clip_norm: must be a positive number, found NaN"),
        ("train.lr=.inf", "train.lr: must be a positive number, found inf"),
        ("train.epochs=0", "train.epochs: must be at least 1, found 0"),
        ("train.epochs=2000000", "train.epochs: must be at most 1000000, found 2000000"),
        ("train.max_steps=0", "train.max_steps: must be at least 1, found 0"),
        ("train.threads=0", "train.threads: must be at least 1, found 0"),
        ("train.threads=100000", "train.threads: must be at most 4096, found 100000"),
        ("hyper.width=.nan", "hyper.width: must be a finite number"),
        ("data.schema.max_vocab=0", "data schema: data.schema.max_vocab: must be at least 1, found 0"),
        ("data.schema.hash_buckets=0", "data schema: data.schema.hash_buckets: must be at least 1, found 0"),
    ] {
        let r = mdl(&["run", s(&yaml), "--out", s(&out), "--set", set]);
        fails_with(&r, &[&format!("tiny.yaml with --set {set}: {key}")]);
        assert!(!out.join("metrics.json").exists(), "{set}: a run was written");
    }
    // `clip_norm: null` says "no clipping" explicitly.
    succeeds(&mdl(&["run", s(&yaml), "--out", s(&out), "--set", "train.clip_norm=null"]));

    std::fs::write(d.join("one_class.csv"), split(24, true)).unwrap();
    let one_class = d.join("one_class.csv");
    let out = d.join("one_class_run");
    let r = mdl(&["run", s(&yaml), "--out", s(&out), "--set", &format!("data.valid={}", s(&one_class))]);
    fails_with(
        &r,
        &[
            "train.early_stopping.metric: valid auc is undefined on",
            "one_class.csv (all its rows have the same label); use `logloss`",
        ],
    );
    assert!(!out.join("metrics.json").exists(), "a run with an undefined metric wrote metrics");
}

/// Finding 8: panics on a range of i64 bounds, a sequence `max_len` of i64::MAX, and on a
/// closed stdout pipe (`mdl graph … | head -1`, `mdl eval … | grep -m1`).
#[test]
fn no_input_panics_and_a_closed_pipe_ends_quietly() {
    let d = tiny("finding8");
    let spec = d.join("range.mdl");
    std::fs::write(
        &spec,
        "model m() {\n  input v : numeric\n  label click\n  let h = v\n  for k in -9223372036854775807..9223372036854775807 {\n    h = h\n  }\n  task click = sum(h, axis = 1)\n  loss bce(click)\n}\n",
    )
    .unwrap();
    fails_with(&mdl(&["check", s(&spec)]), &["range of 18446744073709551614 items is too long to unroll"]);

    let seq = d.join("seq.yaml");
    std::fs::write(
        &seq,
        format!(
            "base: {}\ndata:\n  schema:\n    features:\n      - {{ kind: sequence, name: x, columns: [a], max_len: 9223372036854775807 }}\n",
            s(&d.join("tiny.yaml"))
        ),
    )
    .unwrap();
    let r = mdl(&["run", s(&seq), "--out", s(&d.join("seq_run"))]);
    fails_with(&r, &["sequence group 'x': max_len must be at most 65536, found 9223372036854775807"]);
    // A split file that is not there is named with the key it came from.
    let r = mdl(&["run", s(&d.join("tiny.yaml")), "--set", "data.train=nope.csv", "--out", s(&d.join("nope_run"))]);
    fails_with(&r, &["data.train: the train split ", "nope.csv does not exist"]);

    // The reader is gone before mdl writes: its first write fails with EPIPE.
    let closed = |args: &[&str]| {
        let mut child = command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "mdl {args:?} on a closed pipe: {:?}\n{stderr}", out.status);
        assert!(stderr.is_empty(), "mdl {args:?} on a closed pipe said:\n{stderr}");
    };
    closed(&["graph", "specs/ple.mdl", "--backward"]);
    // With the diagnostics' pipe (stderr) closed, a command loses its messages, not its
    // exit status: a failing check still fails, a clean one succeeds.
    let closed_stderr = |args: &[&str]| {
        let mut child = command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stderr.take());
        child.wait().unwrap()
    };
    assert_eq!(closed_stderr(&["check", s(&spec)]).code(), Some(1), "a failing check on a closed stderr");
    assert!(closed_stderr(&["check", "specs/deepfm.mdl"]).success(), "a clean check on a closed stderr");
    closed(&["check", "specs/deepfm.mdl"]);
    let out = d.join("run");
    succeeds(&mdl(&["run", s(&d.join("tiny.yaml")), "--out", s(&out)]));
    closed(&["eval", s(&out), "--data", s(&d.join("test.csv"))]);
    closed(&["predict", s(&out), "--data", s(&d.join("test.csv")), "--out", "-"]);
    // A run whose terminal has gone (`mdl run ... 2>&1 | head -3`) trains to the end: its
    // log and metrics are complete, as without the pipe.
    let quiet = d.join("run_closed_stderr");
    let status = closed_stderr(&["run", s(&d.join("tiny.yaml")), "--out", s(&quiet)]);
    assert!(status.success(), "mdl run on a closed stderr: {status:?}");
    let metrics = |dir: &Path| std::fs::read_to_string(dir.join("metrics.json")).unwrap();
    assert_eq!(metrics(&quiet), metrics(&out), "a run on a closed stderr differs from one on a terminal");
    let log = std::fs::read_to_string(quiet.join("train.log")).unwrap();
    assert!(log.contains("test"), "train.log of the run on a closed stderr is incomplete:\n{log}");
}

/// Finding 9: `--set hyper.dim=1000000000` aborted (SIGABRT, "memory allocation of
/// 64560000000000 bytes failed"), and `mdl check` accepted hidden widths of 2^31.
#[test]
fn a_model_too_big_for_the_machine_is_an_error_not_an_abort() {
    let d = tmp("finding9");
    let r = mdl(&["run", "experiments/quickstart.yaml", "--set", "hyper.dim=1000000000", "--out", s(&d.join("run"))]);
    fails_with(
        &r,
        &["model deepfm needs about", "of memory to train at batch 4096 (parameters", "more than this machine's"],
    );
    let r = mdl(&["check", "specs/deepfm.mdl", "--set", "hidden=[2147483648, 2147483648]"]);
    fails_with(&r, &["model deepfm's parameters alone need at least", "more than this machine's"]);
}

/// Finding 10: `use "/dev/zero"` grew without end, `use` of a FIFO blocked forever, PLE at
/// 3000 levels took a minute and 4 GB, loops of 10,000 × 10,000 hung, and YAML nested
/// 100,000 deep took 50 s. Each now ends with an error (a run past [`HANG`] fails).
#[test]
fn hostile_inputs_end_with_an_error() {
    let d = tmp("finding10");
    let model =
        "model m() {\n  input v : numeric\n  label click\n  task click = sum(v, axis = 1)\n  loss bce(click)\n}\n";
    let zero = d.join("zero.mdl");
    std::fs::write(&zero, format!("use \"/dev/zero\"\n{model}")).unwrap();
    fails_with(&mdl(&["check", s(&zero)]), &["`use` takes a spec file (ending in `.mdl`), found `/dev/zero`"]);
    std::os::unix::fs::symlink("/dev/zero", d.join("dev_zero.mdl")).unwrap();
    std::fs::write(&zero, format!("use \"dev_zero.mdl\"\n{model}")).unwrap();
    fails_with(&mdl(&["check", s(&zero)]), &["cannot read `dev_zero.mdl`: not a regular file"]);
    let fifo = d.join("fifo.mdl");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let uses_fifo = d.join("uses_fifo.mdl");
    std::fs::write(&uses_fifo, format!("use \"fifo.mdl\"\n{model}")).unwrap();
    fails_with(&mdl(&["check", s(&uses_fifo)]), &["cannot read `fifo.mdl`: not a regular file"]);
    fails_with(&mdl(&["check", s(&fifo)]), &["not a regular file"]);

    let r = mdl(&["check", "specs/ple.mdl", "--set", "levels=3000"]);
    // The caret is on the loop over the levels, wherever the spec has it.
    let ple = std::fs::read_to_string(common::root().join("specs/ple.mdl")).unwrap();
    let line = 1 + ple.lines().position(|l| l.trim_start().starts_with("for j in 0..levels")).unwrap();
    let at = format!("specs/ple.mdl:{line}:3");
    fails_with(&r, &["the model's graph passes 50000 ops while unrolling this loop", &at]);
    let nested = d.join("nested.mdl");
    std::fs::write(
        &nested,
        "model m() {\n  input v : numeric\n  label click\n  let h = v\n  for i in 0..10000 {\n    for j in 0..10000 {\n      h = h\n    }\n  }\n  task click = sum(h, axis = 1)\n  loss bce(click)\n}\n",
    )
    .unwrap();
    let r = mdl(&["check", s(&nested)]);
    fails_with(&r, &["loops run more than 1000000 iterations in all", "nested.mdl:5:3"]);

    let deep = d.join("deep.yaml");
    std::fs::write(&deep, format!("spec: x.mdl\nhyper:\n  a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)))
        .unwrap();
    let r = mdl(&["run", s(&deep)]);
    fails_with(&r, &["deep.yaml: line 3: collections nest more than 32 deep"]);
}

/// Finding 11: `use "/etc/passwd"` showed the file's first line; `name: ../../x` wrote
/// outside runs/; the log said "cache written" when the write failed; the NaN-loss error
/// named no op or parameter and a finite divergence exited 0; `hidden=[0]` and
/// `dropout=1.0` cascaded into later errors.
#[test]
fn diagnostics_run_names_the_log_and_loss_errors_say_what_happened() {
    let d = tiny("finding11");
    let passwd = d.join("passwd.mdl");
    std::fs::write(&passwd, "use \"/etc/passwd\"\nmodel m() {\n  input v : numeric\n  label click\n  task click = sum(v, axis = 1)\n  loss bce(click)\n}\n").unwrap();
    let r = mdl(&["check", s(&passwd)]);
    fails_with(&r, &["`use` takes a spec file (ending in `.mdl`), found `/etc/passwd`"]);
    assert!(!r.stderr.contains("root:"), "a line of /etc/passwd was shown:\n{}", r.stderr);
    let yaml = d.join("tiny.yaml");
    for r in [mdl(&["check", "/etc/passwd"]), mdl(&["run", s(&yaml), "--set", "spec=/etc/passwd"])] {
        fails_with(&r, &["cannot read /etc/passwd: a spec file's name ends in `.mdl`"]);
        assert!(!r.stderr.contains("root:"), "a line of /etc/passwd was shown:\n{}", r.stderr);
    }

    for name in ["../../x", "/tmp/x", ".."] {
        let r = mdl(&["run", s(&yaml), "--set", &format!("name={name}")]);
        fails_with(&r, &[&format!("name: must be a single folder name (no `/`, not `.` or `..`), found `{name}`")]);
    }

    // A cache folder that cannot be made (it is a file): the log says so, and why.
    let not_a_folder = d.join("cache_is_a_file");
    std::fs::write(&not_a_folder, "").unwrap();
    let out = d.join("run");
    let r = finish({
        let mut c = command(&["run", s(&yaml), "--out", s(&out)]);
        c.env("MDL_CACHE_DIR", &not_a_folder);
        c
    });
    succeeds(&r);
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    assert!(log.contains("parsed; cache file not written: "), "{log}");
    assert!(!log.contains("cache written"), "{log}");

    let quick = |lr: &str, clip: &str, out: &str| {
        mdl(&[
            "run",
            "experiments/quickstart.yaml",
            "--set",
            "spec=specs/dnn.mdl",
            "--set",
            &format!("train.lr={lr}"),
            "--set",
            &format!("train.clip_norm={clip}"),
            "--set",
            "train.max_steps=5",
            "--out",
            s(&d.join(out)),
        ])
    };
    let r = quick("1e20", "null", "nan");
    fails_with(
        &r,
        &[
            "the loss became NaN at step 2 (epoch 1): the first value that is not finite is NaN from op `matmul` in `h/mlp/linear/y`, reading parameter `h/mlp/linear/W` (largest |value|",
        ],
    );
    let r = quick("1000000", "10", "diverged");
    fails_with(&r, &["training diverged: the train loss reached", "lower train.lr (now 1000000)"]);

    for (set, message) in [
        ("hidden=[0]", "a parameter size must be positive, found 0"),
        ("dropout=1.0", "a dropout rate must be in [0, 1)"),
    ] {
        let r = mdl(&["check", "specs/deepfm.mdl", "--set", set]);
        fails_with(&r, &[message]);
        assert_eq!(r.stderr.matches("error:").count(), 1, "--set {set}: one cause, one error:\n{}", r.stderr);
        // The error inside the standard library says which of the spec's calls reached it.
        assert!(r.stderr.contains("in block `mlp`, called here"), "{}", r.stderr);
        assert!(r.stderr.contains("--> specs/deepfm.mdl:21:15"), "{}", r.stderr);
    }
}
