//! The run folder holds together (issue 21's findings 1, 2, 3, 5 and 6, issue 19's
//! self-contained folder), through the `mdl` binary on the bundled kuairand_pure_tail: a
//! fresh run never reuses another run's files (an explicit `--out` is refused unless
//! `--force`, the experiment's folder is numbered); a second writer fails at once naming
//! the first; the final test never reads a `best.ckpt` the run did not write; a changed
//! `fitted.json` or `config.yaml` is refused; a resume refuses changed data; eval and
//! predict compile the folder's copy of the spec, also in a copied folder; a resume of a
//! finished run changes nothing.

mod common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("run_folder", name)
}

fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache")
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mdl"));
    c.args(args).current_dir(common::root()).env("MDL_CACHE_DIR", cache_dir()).env("CI", "1");
    c
}

fn mdl(args: &[&str]) -> std::process::Output {
    command(args).output().unwrap()
}

fn ok(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mdl failed:\n{err}");
    err
}

/// The error of a command that must fail with exit code 1.
fn refused(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected a refusal:\n{err}");
    err
}

/// A short DNN run: 4 steps of 512 rows, evaluated every 2 steps (the first checkpoint
/// is at step 2).
fn short_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "experiments/quickstart.yaml",
        "--set",
        "spec=specs/dnn.mdl",
        "--set",
        "train.batch_size=512",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.early_stopping.patience=10",
    ];
    if !out.is_empty() {
        args.extend(["--out", out]);
    }
    args.extend_from_slice(extra);
    args
}

fn short_run(out: &Path, extra: &[&str]) -> std::process::Output {
    mdl(&short_args(out.to_str().unwrap(), extra))
}

/// Every file under `dir` (recursively) with its bytes, by its path relative to `dir`.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn test_block(dir: &Path) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    m["test"].clone()
}

/// The first `n` rows of a bundled split (`keep` picks them by their line), as a CSV.
fn split_rows(name: &str, n: usize, keep: impl Fn(&str) -> bool, to: &Path) -> PathBuf {
    use std::io::Read;
    let mut text = String::new();
    let file = std::fs::File::open(common::root().join("data/kuairand_pure_tail").join(name)).unwrap();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap();
    let mut lines = text.lines();
    let mut out = vec![lines.next().unwrap()];
    out.extend(lines.filter(|l| keep(l)).take(n));
    std::fs::write(to, out.join("\n") + "\n").unwrap();
    to.to_path_buf()
}

/// Finding 1: a run into a folder that holds another run used to take the old run's
/// `last.ckpt` on `--resume` and report the old run's metrics. Now an explicit `--out`
/// holding a run is refused (the folder unchanged); `--force` clears it, so a resume of the
/// new run killed before its first checkpoint starts afresh and ends as a straight run
/// with its settings. The experiment's own folder is numbered instead, and a killed
/// writer's temporary files go at the next start.
#[test]
fn a_fresh_run_never_reuses_another_runs_files() {
    let d = tmp("reuse");
    let old = d.join("old");
    ok(&short_run(&old, &[]));
    let before = files(&old);

    let lr = ["--set", "train.lr=0.01"];
    let err = refused(&short_run(&old, &lr));
    assert!(err.contains(&format!("{} already holds files (best.ckpt, config.yaml, ", old.display())), "{err}");
    assert!(err.contains("--force clears the folder"), "{err}");
    assert_eq!(files(&old), before, "a refused run changed the folder");

    // --force clears it; killed after 1 step, before any checkpoint.
    let err = ok(&short_run(&old, &["--set", "train.lr=0.01", "--force", "--stop-after", "1"]));
    assert!(err.contains(&format!("cleared {} for a fresh run (--force)", old.display())), "{err}");
    assert!(!old.join("last.ckpt").exists() && !old.join("metrics.json").exists());
    // Temporaries of a killed writer: in the run folder, and in the data cache.
    std::fs::write(old.join("last.ckpt.tmp-12345"), b"torn").unwrap();
    std::fs::write(old.join(".metrics.json.12345.6789.tmp"), b"torn").unwrap();
    std::fs::create_dir_all(cache_dir()).unwrap();
    let cache_temporary = cache_dir().join(format!(".00ff.mdldata.{}.1.tmp", u32::MAX));
    std::fs::write(&cache_temporary, b"torn").unwrap();
    let err = ok(&mdl(&["run", "--resume", old.to_str().unwrap()]));
    assert!(err.contains("no checkpoint to resume from; starting fresh"), "{err}");
    assert!(!old.join("last.ckpt.tmp-12345").exists() && !old.join(".metrics.json.12345.6789.tmp").exists());
    assert!(!cache_temporary.exists(), "the data cache kept a dead writer's temporary");

    let straight = d.join("straight");
    ok(&short_run(&straight, &lr));
    assert_eq!(test_block(&old), test_block(&straight), "the resumed lr 0.01 run is not the lr 0.01 run");
    assert_ne!(
        test_block(&old),
        serde_json::from_slice::<serde_json::Value>(&before[Path::new("metrics.json")]).unwrap()["test"]
    );

    // --force clears only run folders.
    let user = d.join("user");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), b"mine").unwrap();
    let err = refused(&short_run(&user, &["--force"]));
    assert!(err.contains("holds files that are not a run folder's (notes.txt)"), "{err}");
    assert_eq!(files(&user).keys().collect::<Vec<_>>(), [Path::new("notes.txt")]);

    // The experiment's folder (here its `out:`) is numbered: the second run writes `-2`.
    let named = d.join("named");
    let set = format!("out={}", named.display());
    ok(&mdl(&short_args("", &["--set", &set])));
    let first = files(&named);
    let err = ok(&mdl(&short_args("", &["--set", &set])));
    let expected = format!("{} already holds a run", named.display());
    assert!(err.contains(&expected) && err.contains(&format!("this run writes {}-2", named.display())), "{err}");
    assert_eq!(files(&named), first);
    assert_eq!(test_block(&named), test_block(&d.join("named-2")));
}

/// Finding 2: two runs on one `--out` at once both exited 0, the second reporting the
/// first's test metrics. The second writer (fresh, forced or resuming) now fails at once,
/// naming the first's pid.
#[test]
fn a_second_writer_fails_at_once_naming_the_first() {
    let d = tmp("two_writers");
    let out = d.join("run");
    let args =
        short_args(out.to_str().unwrap(), &["--set", "train.max_steps=100000", "--set", "train.eval_every=1000"]);
    let mut first = command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let pid = first.id().to_string();
    let started = std::time::Instant::now();
    // Locked from the start; the manifest is written once the run has started.
    let holds = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    while holds(".lock").trim() != pid || holds("manifest.json").is_empty() {
        assert!(started.elapsed().as_secs() < 60, "the first run never locked its folder");
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let outcomes = [
        mdl(&short_args(out.to_str().unwrap(), &[])),
        mdl(&short_args(out.to_str().unwrap(), &["--force"])),
        mdl(&["run", "--resume", out.to_str().unwrap()]),
    ];
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(still_running, "the first run ended before the second writers were tried");
    for second in &outcomes {
        let err = refused(second);
        assert!(err.contains(&format!("{} is in use by another mdl run (pid {pid})", out.display())), "{err}");
    }
}

/// Finding 3: a run whose validation metric was undefined (one class in valid) never
/// wrote `best.ckpt`, and its final test used whatever `best.ckpt` the folder already
/// held. Now such a run is refused before it trains past its first evaluation (issue 21's
/// item 3), so every finished run tests a `best.ckpt` it wrote itself: the same test
/// metrics in a folder that held another run's checkpoints (cleared by --force), and after
/// a resume in a folder where another run's `best.ckpt` was put.
#[test]
fn the_final_test_never_reads_a_best_checkpoint_the_run_did_not_write() {
    let d = tmp("stale_best");
    let one_class = split_rows("valid.csv.gz", 3000, |l| l.starts_with("0,"), &d.join("valid0.csv"));
    let set_valid = format!("data.valid={}", one_class.display());
    let undefined = d.join("undefined");
    let err = refused(&short_run(&undefined, &["--set", set_valid.as_str()]));
    assert!(err.contains("train.early_stopping.metric: valid auc is undefined on"), "{err}");
    assert!(!undefined.join("metrics.json").exists() && !undefined.join("best.ckpt").exists());

    let clean = d.join("clean");
    ok(&short_run(&clean, &[]));
    let other = d.join("other");
    ok(&short_run(&other, &["--set", "train.lr=0.01"]));
    let reused = d.join("reused");
    std::fs::create_dir_all(&reused).unwrap();
    for f in ["best.ckpt", "last.ckpt", "config.yaml", "metrics.json"] {
        std::fs::copy(other.join(f), reused.join(f)).unwrap();
    }
    ok(&short_run(&reused, &["--force"]));
    assert_eq!(test_block(&reused), test_block(&clean));

    // Another run's best.ckpt put into an interrupted run's folder.
    let resumed = d.join("resumed");
    ok(&short_run(&resumed, &["--stop-after", "3"]));
    std::fs::copy(other.join("best.ckpt"), resumed.join("best.ckpt")).unwrap();
    ok(&mdl(&["run", "--resume", resumed.to_str().unwrap()]));
    assert_eq!(test_block(&resumed), test_block(&clean));
    // A checkpoint of another run is refused where it is read: eval, and resume.
    std::fs::copy(other.join("best.ckpt"), resumed.join("best.ckpt")).unwrap();
    std::fs::copy(other.join("last.ckpt"), resumed.join("last.ckpt")).unwrap();
    let run_id = |dir: &Path| -> String {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        m["manifest"]["run_id"].as_str().unwrap().to_string()
    };
    let err = refused(&mdl(&["eval", resumed.to_str().unwrap(), "--data", one_class.to_str().unwrap()]));
    let expected = format!(
        "{} belongs to run {}, not to this folder's run {}",
        resumed.join("best.ckpt").display(),
        run_id(&other),
        run_id(&resumed)
    );
    assert!(err.contains(&expected), "{err}");
}

/// Finding 5: a one-byte change in fitted.json moved eval's AUC without a word. Now a
/// changed fitted.json or config.yaml is refused by eval, predict and resume, and a
/// changed metrics.json by `mdl report`, naming the file; `--force` reads it anyway and
/// says so.
#[test]
fn changed_run_files_are_refused() {
    let d = tmp("changed");
    let run = d.join("run");
    ok(&short_run(&run, &["--stop-after", "3"]));
    ok(&mdl(&["run", "--resume", run.to_str().unwrap()]));
    let data = "data/kuairand_pure_tail/test.csv.gz";
    let scores = d.join("scores.csv");
    let eval = |force: bool| {
        let mut args = vec!["eval", run.to_str().unwrap(), "--data", data];
        if force {
            args.push("--force");
        }
        mdl(&args)
    };
    let clean: serde_json::Value = serde_json::from_slice(&eval(false).stdout).unwrap();

    // One digit of a normaliser's scale in fitted.json.
    let fitted = std::fs::read_to_string(run.join("fitted.json")).unwrap();
    let at = fitted.find("\"scale\":").expect("fitted.json has a scale") + "\"scale\":".len();
    let at = at + fitted[at..].find(|c: char| c.is_ascii_digit() && c != '0').unwrap();
    let mut changed = fitted.clone().into_bytes();
    changed[at] = if changed[at] == b'9' { b'8' } else { changed[at] + 1 };
    std::fs::write(run.join("fitted.json"), &changed).unwrap();
    let what = format!("{} has changed since the run wrote it", run.join("fitted.json").display());
    let err = refused(&eval(false));
    assert!(err.contains(&what) && err.contains("--force goes on regardless"), "{err}");
    let predict = ["predict", run.to_str().unwrap(), "--data", data, "--out", scores.to_str().unwrap()];
    assert!(refused(&mdl(&predict)).contains(&what));
    assert!(!scores.exists());
    let forced = eval(true);
    let err = ok(&forced);
    assert!(err.contains(&format!("warning: {what}")) && err.contains("; going on because of --force"), "{err}");
    let forced: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_ne!(forced["logloss"], clean["logloss"], "the change should move the metrics");
    std::fs::write(run.join("fitted.json"), &fitted).unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&eval(false).stdout).unwrap(), clean);

    // The learning rate in config.yaml.
    let config = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    std::fs::write(run.join("config.yaml"), config.replace("lr: 0.001", "lr: 0.002")).unwrap();
    let what = format!("{} has changed since the run wrote it", run.join("config.yaml").display());
    assert!(refused(&eval(false)).contains(&what));
    assert!(refused(&mdl(&["run", "--resume", run.to_str().unwrap()])).contains(&what));

    // metrics.json, as `mdl report` reads it.
    let metrics = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    std::fs::write(run.join("metrics.json"), metrics.replacen("\"auc\": 0.", "\"auc\": 0.9", 1)).unwrap();
    let err = refused(&mdl(&["report", run.to_str().unwrap()]));
    assert!(
        err.contains(&format!("{} has changed since the run wrote it", run.join("metrics.json").display())),
        "{err}"
    );
    std::fs::write(run.join("metrics.json"), &metrics).unwrap();
    ok(&mdl(&["report", run.to_str().unwrap()]));

    // The manifest itself.
    std::fs::write(run.join("config.yaml"), &config).unwrap();
    let manifest = std::fs::read_to_string(run.join("manifest.json")).unwrap();
    std::fs::write(run.join("manifest.json"), manifest.replace("\"finished\": true", "\"finished\": false")).unwrap();
    let err = refused(&eval(false));
    assert!(err.contains("manifest.json is damaged (its checksum does not match its contents)"), "{err}");
}

/// Finding 6 and issue 19's self-contained run folder: a resume refuses train data that
/// changed since the run started (the vocabularies would be refitted without a word);
/// eval compiles the folder's copy of the spec and the files it `use`s, with a note when
/// an original has changed, so its metrics stay the same; a copied folder predicts the
/// same when the spec is gone.
#[test]
fn a_run_folder_keeps_its_spec_and_refuses_changed_data() {
    let d = tmp("self_contained");
    let spec_dir = d.join("spec_src");
    std::fs::create_dir_all(spec_dir.join("lib")).unwrap();
    let dnn = std::fs::read_to_string(common::root().join("specs/dnn.mdl")).unwrap();
    let spec = spec_dir.join("dnn.mdl");
    std::fs::write(&spec, format!("use \"lib/head.mdl\"\n{}", dnn.replace("linear(h, 1)", "head(h)"))).unwrap();
    let head = spec_dir.join("lib/head.mdl");
    std::fs::write(&head, "block head(h) {\n  return linear(activation(h, \"relu\"), 1)\n}\n").unwrap();
    // Small splits; valid and test rows from train's, so that every domain is known.
    let train = split_rows("train.csv.gz", 3000, |_| true, &d.join("train.csv"));
    let valid = split_rows("train.csv.gz", 800, |_| true, &d.join("valid.csv"));
    let sets = [
        format!("spec={}", spec.display()),
        format!("data.train={}", train.display()),
        format!("data.valid={}", valid.display()),
        format!("data.test={}", valid.display()),
    ];
    let mut extra = Vec::new();
    for s in &sets {
        extra.extend(["--set", s.as_str()]);
    }

    let run = d.join("run");
    let mut args = extra.to_vec();
    args.extend(["--set", "train.batch_size=256", "--stop-after", "3"]);
    ok(&short_run(&run, &args));
    assert!(run.join("spec/dnn.mdl").exists() && run.join("spec/lib/head.mdl").exists());
    // Train rows changed between the interruption and the resume: the same rows in
    // another order, so the vocabularies keep their sizes but not their ids.
    let text = std::fs::read_to_string(&train).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1..].reverse();
    std::fs::write(&train, lines.join("\n") + "\n").unwrap();
    let err = refused(&mdl(&["run", "--resume", run.to_str().unwrap()]));
    assert!(err.contains("the data differs from the data the run started with"), "{err}");
    let err = ok(&mdl(&["run", "--resume", run.to_str().unwrap(), "--force"]));
    assert!(err.contains("warning: the data differs") && err.contains("going on because of --force"), "{err}");

    let data = valid.to_str().unwrap();
    let eval = |dir: &Path| mdl(&["eval", dir.to_str().unwrap(), "--data", data]);
    let before = eval(&run);
    ok(&before);
    std::fs::write(&head, "block head(h) {\n  return linear(activation(h, \"tanh\"), 1)\n}\n").unwrap();
    let after = eval(&run);
    let err = ok(&after);
    let note = format!(
        "note: {} has changed since the run started; using the run folder's copy {}",
        head.display(),
        run.join("spec/lib/head.mdl").display()
    );
    assert!(err.contains(&note), "{err}");
    assert_eq!(after.stdout, before.stdout, "eval ran the edited spec on the run's weights");

    // The folder copied elsewhere, the spec gone: the same scores.
    let copy = d.join("elsewhere/run");
    std::fs::create_dir_all(&copy).unwrap();
    for (name, bytes) in files(&run) {
        std::fs::create_dir_all(copy.join(&name).parent().unwrap()).unwrap();
        std::fs::write(copy.join(&name), bytes).unwrap();
    }
    std::fs::remove_dir_all(&spec_dir).unwrap();
    let scores = |dir: &Path, name: &str| {
        let out = d.join(name);
        ok(&mdl(&["predict", dir.to_str().unwrap(), "--data", data, "--out", out.to_str().unwrap()]));
        std::fs::read(out).unwrap()
    };
    assert_eq!(scores(&copy, "copy.csv"), scores(&run, "original.csv"));
    assert_eq!(eval(&copy).stdout, before.stdout);
}

/// Issue 19: `--resume` of a finished run says so and changes nothing (it used to
/// evaluate again, append to the log and rewrite timing.json).
#[test]
fn resuming_a_finished_run_changes_nothing() {
    let dir = tmp("finished");
    let run = dir.join("run");
    ok(&short_run(&run, &[]));
    // As a folder copied without its hidden lock file: not even that is made again.
    std::fs::remove_file(run.join(".lock")).unwrap();
    let before = files(&run);
    let err = ok(&mdl(&["run", "--resume", run.to_str().unwrap()]));
    assert!(err.contains(&format!("{} holds a finished run (test auc 0.", run.display())), "{err}");
    assert!(err.contains("nothing to resume; its files are left as they are"), "{err}");
    assert_eq!(files(&run), before, "a resume of a finished run changed its folder");
}
