//! Running statistics end to end through the `mdl` binary, on a spec with all three
//! constructs built on `running`: `mlp(..., norm = "batch")`, `dice` and STAR's
//! per-domain `partitioned_norm`. A row scores the same alone as inside a batch of 4096
//! (evaluation uses the running statistics, not the batch's); a run stopped and resumed
//! ends with byte-identical metrics and running statistics; evaluating more often changes
//! no tensor of the model (evaluation never moves a running statistic); the checkpoints
//! hold the running statistics, moved away from their initial values by training.

mod common;
use common::scoring::{mdl, ok};
use common::scratch::Scratch;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mdl_runtime::Tensor;

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("running_stats", name)
}

const SPEC: &str = "model normed(dim = 8) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let z = partitioned_norm(flatten(E[fields]), domain)
  let h = dice(linear(z, 16))
  task click = mlp(h, [16], norm = \"batch\") |> linear(1)
  loss bce(click)
}
";

/// Trains the spec at batch 4096 for 6 steps, evaluating every `eval_every`, into a new
/// folder `name`; `extra` are more arguments (`--stop-after`). Returns the folder (removed
/// when dropped on a passing test) and the run folder in it.
fn train(name: &str, eval_every: u32, extra: &[&str]) -> (Scratch, PathBuf) {
    let dir = tmp(name);
    let spec = dir.join("normed.mdl");
    std::fs::write(&spec, SPEC).unwrap();
    let out = dir.join("run");
    let spec_set = format!("spec={}", spec.display());
    let every = format!("train.eval_every={eval_every}");
    let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap(), "--set", &spec_set];
    for set in ["train.batch_size=4096", "train.max_steps=6", &every, "train.early_stopping.patience=10"] {
        args.extend(["--set", set]);
    }
    args.extend_from_slice(extra);
    ok(&mdl(&args));
    (dir, out)
}

/// The straight run every test compares with.
fn straight() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let (dir, run) = train("straight", 2, &[]);
        dir.keep();
        run
    })
}

/// A checkpoint's tensors by name.
fn tensors(ckpt: &Path) -> HashMap<String, Tensor<f32>> {
    mdl_runtime::checkpoint::load(ckpt).unwrap().0.into_iter().collect()
}

fn running(t: &HashMap<String, Tensor<f32>>) -> Vec<(&String, &Tensor<f32>)> {
    let mut r: Vec<_> = t.iter().filter(|(n, _)| n.rsplit('/').next().unwrap().starts_with("running")).collect();
    r.sort_by(|a, b| a.0.cmp(b.0));
    r
}

/// The scores `mdl predict` writes for the rows of `data` (header line dropped).
fn scores(run: &Path, data: &Path) -> Vec<f64> {
    let out = mdl(&["predict", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", "-"]);
    ok(&out);
    String::from_utf8(out.stdout).unwrap().lines().skip(1).map(|l| l.parse().unwrap()).collect()
}

#[test]
fn a_row_scores_the_same_alone_and_inside_a_batch_of_4096() {
    use std::io::Read;
    let run = straight();
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(common::root().join("data/kuairand_pure_tail/test.csv.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let lines: Vec<&str> = text.lines().take(4097).collect();
    let dir = tmp("alone");
    let all = dir.join("batch.csv");
    std::fs::write(&all, lines.join("\n") + "\n").unwrap();
    let in_batch = scores(run, &all);
    assert_eq!(in_batch.len(), 4096);
    for row in [0usize, 1, 2047, 4095] {
        let one = dir.join(format!("row{row}.csv"));
        std::fs::write(&one, format!("{}\n{}\n", lines[0], lines[row + 1])).unwrap();
        let alone = scores(run, &one);
        assert_eq!(alone.len(), 1);
        // predict writes 6 decimals, and the jit may sum a product's terms in another
        // order for one row than for 4096 (the last bits of the logit, not the statistics
        // the row is normalised with): one unit of the last decimal at most. Normalised
        // with the batch's statistics instead, row 0 scores 0.4948 alone and 0.4175 inside.
        assert!(
            (alone[0] - in_batch[row]).abs() <= 1.5e-6,
            "row {row}: {} alone, {} inside the batch of 4096",
            alone[0],
            in_batch[row]
        );
    }
}

#[test]
fn a_resumed_run_ends_byte_identical_with_its_running_statistics() {
    let run = straight();
    let (_dir, resumed) = train("resumed", 2, &["--stop-after", "3"]);
    assert!(!resumed.join("metrics.json").exists());
    ok(&mdl(&["run", "--resume", resumed.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(run.join("metrics.json")).unwrap(),
        std::fs::read(resumed.join("metrics.json")).unwrap(),
        "the resumed run's metrics differ from the straight run's"
    );
    for ckpt in ["last.ckpt", "best.ckpt"] {
        let (a, b) = (tensors(&run.join(ckpt)), tensors(&resumed.join(ckpt)));
        assert_eq!(running(&a), running(&b), "{ckpt}: running statistics differ after the resume");
    }
}

#[test]
fn training_moves_the_running_statistics_and_evaluation_never_does() {
    let run = straight();
    let last = tensors(&run.join("last.ckpt"));
    let stats = running(&last);
    // batch_norm, dice and partitioned_norm each keep a mean and a variance.
    assert_eq!(stats.len(), 6, "{:?}", stats.iter().map(|s| s.0).collect::<Vec<_>>());
    for (name, t) in &stats {
        let start = if name.ends_with("running1") { 1.0 } else { 0.0 };
        assert!(t.data.iter().any(|&v| v != start), "{name} never moved from {start}");
    }
    // Per domain: one row per domain of the partitioned norm.
    let per_domain = stats.iter().filter(|(n, _)| n.contains("per_domain")).count();
    assert_eq!(per_domain, 2, "{:?}", stats.iter().map(|s| s.0).collect::<Vec<_>>());

    // Evaluated after every step instead of every other one, the same steps give the same
    // model: evaluation moved nothing.
    let (_dir, often) = train("often", 1, &[]);
    let a = tensors(&run.join("last.ckpt"));
    let b = tensors(&often.join("last.ckpt"));
    assert_eq!(running(&a), running(&b), "evaluating more often changed the running statistics");
    for (name, t) in a.iter().filter(|(n, _)| !n.starts_with("optimizer/")) {
        assert_eq!(Some(t), b.get(name), "{name} differs when the run evaluates more often");
    }
    let best = std::fs::read(run.join("best.ckpt")).unwrap();
    ok(&mdl(&["eval", run.to_str().unwrap(), "--data", "data/kuairand_pure_tail/valid.csv.gz"]));
    assert_eq!(best, std::fs::read(run.join("best.ckpt")).unwrap());
}
