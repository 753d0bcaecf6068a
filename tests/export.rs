//! `mdl export`: every shipped spec with an experiment, trained a few steps on a small
//! subset of the bundled data, exports to ONNX, and onnxruntime's scores of the test rows,
//! fed from the raw CSV through the exported `.features.json` (scripts/onnx_score.py), equal
//! `mdl predict`'s within 1e-5 (the specs on MovieLens train on a subset of it). A spec whose
//! export is refused is listed in `NOT_EXPORTED` with the reason, which the refusal must
//! name (SASRec: its task ranks candidates). That test needs Python with numpy and onnxruntime; without
//! them it says so and passes, unless `MDL_REQUIRE_ONNXRUNTIME=1` (CI sets it), when it
//! fails. The safetensors export holds every parameter of the checkpoint by name, exactly.

mod common;
use common::scoring::mdl;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("export", name)
}

fn ok(out: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{err}{}", String::from_utf8_lossy(&out.stdout));
    err
}

/// The first `rows` records of the gzip CSV split `gz`, as a plain CSV file `dir/<split>.csv`
/// (only the header and those records are decompressed).
fn subset_of(gz: &Path, dir: &Path, split: &str, rows: usize) -> PathBuf {
    let reader = BufReader::new(flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()));
    let lines: Vec<String> = reader.lines().take(rows + 1).map(Result::unwrap).collect();
    let path = dir.join(format!("{split}.csv"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The first `rows` records of a bundled split, as a plain CSV file in `dir`.
fn subset(dir: &Path, split: &str, rows: usize) -> PathBuf {
    subset_of(&common::root().join("data/kuairand_pure_tail").join(format!("{split}.csv.gz")), dir, split, rows)
}

/// Small splits of the data `experiment` (a path under the project root) reads, in
/// `dir/<its data folder's name>` (the bundled kuairand_pure_tail, or MovieLens).
fn small_splits_of(dir: &Path, experiment: &str) -> [PathBuf; 3] {
    let exp = mdl::experiment::load(&common::root().join(experiment), &[]).unwrap();
    let paths = exp.split_files().unwrap();
    let name = paths.train.parent().and_then(|p| p.file_name()).unwrap().to_string_lossy().into_owned();
    let at = dir.join(name);
    std::fs::create_dir_all(&at).unwrap();
    [
        subset_of(&paths.train, &at, "train", 3000),
        subset_of(&paths.valid, &at, "valid", 400),
        subset_of(&paths.test, &at, "test", 600),
    ]
}

/// Shipped specs ONNX export cannot take, with the reason its refusal names.
const NOT_EXPORTED: &[(&str, &str)] = &[
    // Next-item ranking: a row's scores are its 101 candidates', not one score.
    ("sasrec", "task `next` is a candidates task: ONNX export writes one score per task and row"),
    // Its gates read the items' popularity bins, which are not among the exported features
    // (and its task ranks candidates too).
    ("pad", "the model reads the frequency bins of `item`'s ids (`frequency_bin(.., 10)`), which the exported features do not carry"),
];

/// A short run named `name` of `experiment` (with `extra` as `--set`s) on small splits;
/// returns its folder.
fn short_run(dir: &Path, name: &str, experiment: &str, extra: &[&str], splits: &[PathBuf; 3], batch: usize) -> PathBuf {
    let out = dir.join(name);
    let mut sets = vec![
        format!("data.train={}", splits[0].display()),
        format!("data.valid={}", splits[1].display()),
        format!("data.test={}", splits[2].display()),
        format!("train.batch_size={batch}"),
        "train.max_steps=3".to_string(),
        // Large steps, so that 3 of them make every input matter to the scores.
        "train.lr=0.01".to_string(),
        "train.embedding_lr=0.01".to_string(),
        "train.eval_every=3".to_string(),
        // A small train split has not seen every domain.
        "data.unknown_domain=0".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    // A staged experiment: 3 steps in each stage, so that every stage's parameters move.
    if let Some((stages, count)) = common::every_stage_steps(&common::root().join(experiment), 3, false) {
        sets.push(stages);
        sets.push(format!("train.max_steps={}", 3 * count));
    }
    let mut args = vec!["run", experiment, "--out", out.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    ok(mdl(&args), &format!("mdl run {name}"));
    out
}

fn small_splits(dir: &Path) -> [PathBuf; 3] {
    [subset(dir, "train", 3000), subset(dir, "valid", 400), subset(dir, "test", 600)]
}

/// A model using every op an evaluation graph can hold that the shipped specs do not:
/// bucketize and id arithmetic, comparisons, where, gelu, prelu, floor, the constant
/// tensors, dropout, one_hot, per-domain batch means, max and min reductions, top_k,
/// sort, argmax, take_along and take.
const EVERY_OP: &str = r#"model ops(dim = 8) {
  input fields : categorical
  input hist   : sequence(50) of fields
  input tags   : sequence(3)
  input dense  : numeric
  input domain : domain
  label click

  let E = embedding(fields, dim)
  let T = embedding(tags, dim)
  let b = bucketize(dense, [0.01, 0.1, 0.3, 0.6])
  let hi = floordiv(b, 2)
  let lo = mod(b, 2)
  let H = embedding(hi, dim)
  let L = embedding(lo, dim)
  let x = concat([E[fields], H[hi] + L[lo], pool(E[hist], hist), pool(T[tags], tags, mode = "sum"), numeric_embed(dense, dim)], axis = 1)
  let x = x + unsqueeze(arange(dim(x, 1)), 1) * 0.01
  let a = self_attention(x, 2, 4)
  let f = flatten(a)
  param s : [1] ~ constant(0.25)
  let g = gelu(f) + leaky_relu(f, 0.1) + prelu(f, s) + floor(f * 3) / 3 + softplus(f) - tanh(f) + abs(f) * sigmoid(f)
  let g = g + sqrt(abs(f) + 1) - log(exp(minimum(f, 2)) + 1) + maximum(-f, 0.2)
  let c = where(g > 0.1, g, 0.5 * g) + (g >= 0) * 0.25 - (g < -0.1) * 0.5 + (g <= 0.3) + (g == 0) + (g != 0.5) * 0.1
  let h = layer_norm(dropout(c, 0.1))
  let m = concat([h, stopgrad(h) * 0.5, one_hot(domain), group_mean(h, by = domain)], axis = -1)
  let r = concat([unsqueeze(max(m, -1), 1), unsqueeze(min(m, -1), 1), unsqueeze(mean(m, -1), 1)], axis = -1)
  let t = slice(transpose(reshape(slice(m, 1, 0, 64), [8, 8])), 1, 2, 4)
  let tri = sum(tril(8) * eye(8) + triu(8, 1), 0)
  let best = top_k(m, 4)
  let ordered = sort(m, descending = true)
  let picked = concat([best[0], take_along(m, argmax(m, keep = true)), take(m, [0, 2, 5], 1), slice(ordered[0], 1, 0, 2)], axis = -1)
  task click = linear(concat([mlp(m, [16]), r, flatten(t), picked], axis = -1), 1) + mean(tri) * 0.0
  loss bce(click)
}
"#;

fn onnxruntime_present() -> bool {
    let found =
        Command::new("python3").args(["-c", "import numpy, onnxruntime"]).output().is_ok_and(|o| o.status.success());
    if !found {
        let required = std::env::var("MDL_REQUIRE_ONNXRUNTIME").is_ok_and(|v| v == "1");
        assert!(!required, "MDL_REQUIRE_ONNXRUNTIME=1 but `python3 -c 'import numpy, onnxruntime'` fails");
        eprintln!("skipped: python3 with numpy and onnxruntime is not installed (pip install onnxruntime numpy)");
    }
    found
}

#[test]
fn onnxruntime_scores_equal_predict_for_every_shipped_spec() {
    if !onnxruntime_present() {
        return;
    }
    let d = tmp("agreement");
    let splits = small_splits(&d);
    let batch = 256;
    let every_op = d.join("every_op.mdl");
    std::fs::write(&every_op, EVERY_OP).unwrap();
    let mut failures = Vec::new();
    let models = common::shipped_specs().into_iter().map(|spec| {
        let name = spec.file_stem().unwrap().to_string_lossy().into_owned();
        (name.clone(), format!("experiments/{name}.yaml"), Vec::new())
    });
    let every_op_spec = format!("spec={}", every_op.display());
    // PLE with its regression task (log-transformed watch time) beside the shipped specs,
    // and DeepFM with bounded vocabularies whose other values hash to buckets (most test
    // users and videos among them), which the client must map as training did.
    let hashed = vec!["data.schema.max_vocab=40", "data.schema.hash_buckets=7"];
    let extra = [
        ("ple_watch".to_string(), "experiments/ple_watch.yaml".into(), Vec::new()),
        ("every_op".to_string(), "experiments/dnn.yaml".into(), vec![every_op_spec.as_str()]),
        ("deepfm_hashed".to_string(), "experiments/deepfm.yaml".into(), hashed),
    ];
    for (name, experiment, sets) in models.chain(extra) {
        let splits = if name == "every_op" { splits.clone() } else { small_splits_of(&d, &experiment) };
        let run = short_run(&d, &name, &experiment, &sets, &splits, batch);
        let model = d.join(format!("{name}.onnx"));
        if let Some((_, reason)) = NOT_EXPORTED.iter().find(|(n, _)| *n == name) {
            let out = mdl(&["export", run.to_str().unwrap(), "--format", "onnx", "-o", model.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains(reason), "{name}: export should be refused: {err}");
            assert!(!model.exists(), "{name}: a refused export wrote {}", model.display());
            continue;
        }
        let err = ok(
            mdl(&["export", run.to_str().unwrap(), "--format", "onnx", "-o", model.to_str().unwrap()]),
            &format!("mdl export {name}"),
        );
        assert!(err.contains(&format!("{name}.features.json")), "{err}");
        let features = std::fs::read_to_string(d.join(format!("{name}.features.json"))).unwrap();
        let hashes = features.contains("\"buckets\": 7");
        assert_eq!(hashes, name == "deepfm_hashed", "{name}: buckets in its features file");
        assert_eq!(features.contains("\"mdl-features/2\""), hashes, "{name}: the format names the buckets");
        let predicted = d.join(format!("{name}.predicted.csv"));
        let data = splits[2].to_str().unwrap();
        ok(
            mdl(&["predict", run.to_str().unwrap(), "--data", data, "--out", predicted.to_str().unwrap()]),
            &format!("mdl predict {name}"),
        );
        // Scores that hardly differ between rows would hide a wrong encoding of the inputs.
        let text = std::fs::read_to_string(&predicted).unwrap();
        let first: Vec<f64> = text.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
        let spread = first.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - first.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(spread > 1e-3, "{name}: the first task's scores span only {spread:e}");
        let script = common::root().join("scripts/onnx_score.py");
        let compared = Command::new("python3")
            .args([script.to_str().unwrap(), model.to_str().unwrap(), data])
            .args(["--batch", &batch.to_string(), "--compare", predicted.to_str().unwrap(), "--tolerance", "1e-5"])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&compared.stdout).into_owned();
        eprintln!("{name}: {}", report.trim().replace('\n', "; "));
        if !compared.status.success() || !report.contains("max |diff|") {
            failures.push(format!("{name}:\n{report}{}", String::from_utf8_lossy(&compared.stderr)));
        } else {
            // The run's checkpoints and the model are the bulk of the test's disk use: a
            // passing model's go at once (a failing one's stay to be read).
            let _ = std::fs::remove_dir_all(&run);
            let _ = std::fs::remove_file(&model);
        }
    }
    assert!(failures.is_empty(), "onnxruntime disagrees with mdl predict:\n{}", failures.join("\n"));
}

#[test]
fn safetensors_holds_every_parameter_by_name() {
    let d = tmp("safetensors");
    let splits = small_splits(&d);
    let run = short_run(&d, "dnn", "experiments/dnn.yaml", &[], &splits, 256);
    let file = d.join("dnn.safetensors");
    let err = ok(
        mdl(&["export", run.to_str().unwrap(), "--format", "safetensors", "-o", file.to_str().unwrap()]),
        "mdl export --format safetensors",
    );
    assert!(err.contains("parameters"), "{err}");
    let loaded = mdl::train::load_run(&run).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut want: Vec<String> = loaded.params.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want);
    for (name, value) in &loaded.params {
        let view = tensors.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(view.shape(), value.shape.as_slice(), "{name}");
        let data: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(data, value.data, "{name}");
    }
}

#[test]
fn export_errors_name_the_problem() {
    let d = tmp("errors");
    let out = mdl(&["export", d.join("nope").to_str().unwrap(), "--format", "onnx", "-o", "x.onnx"]);
    assert!(!out.status.success());
    let bad = mdl(&["export", d.to_str().unwrap(), "--format", "tflite", "-o", "x.onnx"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected `onnx` or `safetensors`, found `tflite`"), "{err}");
}
