//! Shared by the tests that score rows with a trained run (`mdl predict`, `mdl serve`): the
//! `mdl` binary run in the repository root, a small model with a domain input trained for a
//! few steps on the bundled kuairand_pure_tail, and that data's test split.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::scratch::Scratch;

/// An empty scratch folder `group/name` under the tests' temporary folder, removed when the
/// test passes.
pub fn tmp(group: &str, name: &str) -> Scratch {
    Scratch::new(Path::new(group).join(name))
}

/// `mdl` with `args`, to be run in the repository root with the tests' data cache.
pub fn mdl_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mdl"));
    command
        .args(args)
        .current_dir(super::root())
        .env("MDL_CACHE_DIR", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache"))
        .env("CI", "1");
    command
}

/// Runs `mdl` in the repository root, with `stdin` piped in when given.
pub fn mdl_with(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = mdl_command(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || pipe.write_all(&bytes));
    }
    child.wait_with_output().unwrap()
}

pub fn mdl(args: &[&str]) -> Output {
    mdl_with(args, None)
}

/// Stderr of a run that must have succeeded.
pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mdl failed:\n{err}");
    err
}

/// Stderr of a run that must have failed with exit code 1.
pub fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "mdl should have failed:\n{err}");
    err
}

/// A small model with a domain embedding (so the domain a row is scored as changes its
/// score).
pub const SPEC: &str = "model scored(dim = 8) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let D = embedding(domain, dim)
  task click = mlp(concat([flatten(E[fields]), D[domain]], axis = 1), [16]) |> linear(1)
  loss bce(click)
}
";

/// Trains [`SPEC`] on the quickstart's data for a few steps into `dir/run`, with extra
/// `--set`s; returns the run folder.
pub fn train(dir: &Path, extra: &[&str]) -> PathBuf {
    let spec = dir.join("scored.mdl");
    std::fs::write(&spec, SPEC).unwrap();
    let spec_set = format!("spec={}", spec.display());
    let out = dir.join("run");
    let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap(), "--set", &spec_set];
    for set in ["train.batch_size=512", "train.max_steps=4", "train.eval_every=4"].iter().chain(extra) {
        args.extend(["--set", set]);
    }
    ok(&mdl(&args));
    out
}

/// The lines of the bundled test split (header first).
pub fn test_split() -> Vec<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(super::root().join("data/kuairand_pure_tail/test.csv.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    text.lines().map(str::to_string).collect()
}

/// The fields of one CSV line of the bundled data (quoted fields hold no line breaks).
pub fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}
