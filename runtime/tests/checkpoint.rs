//! Checkpoint files: bit-identical round trips, atomic writes, and clear errors for
//! damaged files; plus an optimizer resumed from a checkpoint file.

use mdl_runtime::checkpoint::{decode, load, save, CheckpointProblem};
use mdl_runtime::optim::{LrScale, OptimConfig, OptimKind, Optimizer};
use mdl_runtime::rng::SplitMix64;
use mdl_runtime::{Dim, Init, NodeId, ParamInfo, Tensor, Value};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A fresh, empty folder under the target's temporary directory for one test.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mdl-checkpoint-{}-{}", test, std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample_tensors() -> Vec<(String, Tensor<f32>)> {
    let mut rng = SplitMix64::new(12);
    let mut random = |shape: Vec<usize>| {
        let n = shape.iter().product();
        Tensor { shape, data: (0..n).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect::<Vec<f32>>() }
    };
    vec![
        ("tower/w".to_string(), random(vec![3, 4, 5])),
        ("emb".to_string(), random(vec![10, 8])),
        ("scalar".to_string(), Tensor::scalar(-0.0f32)),
        ("empty".to_string(), Tensor::zeros(vec![0, 4])),
        (
            "specials".to_string(),
            Tensor::new(vec![4], vec![f32::NAN, f32::INFINITY, f32::MIN_POSITIVE / 2.0, -1.5]).unwrap(),
        ),
        ("ünïcode/名前".to_string(), random(vec![2])),
    ]
}

fn bits(t: &Tensor<f32>) -> Vec<u32> {
    t.data.iter().map(|v| v.to_bits()).collect()
}

fn leftover_temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn round_trip_is_bit_identical_and_leaves_no_temp_file() {
    let dir = scratch_dir("round-trip");
    let path = dir.join("model.ckpt");
    let tensors = sample_tensors();
    let meta = r#"{"epoch": 3, "spec": "dnn"}"#;
    save(&path, &tensors, meta).unwrap();
    let (loaded, loaded_meta) = load(&path).unwrap();
    assert_eq!(loaded_meta, meta);
    assert_eq!(loaded.len(), tensors.len());
    for ((name, t), (loaded_name, l)) in tensors.iter().zip(&loaded) {
        assert_eq!(name, loaded_name);
        assert_eq!(t.shape, l.shape);
        assert_eq!(bits(t), bits(l), "{name}");
    }
    assert_eq!(leftover_temp_files(&dir), Vec::<String>::new());
    // The file read in blocks and its bytes read whole give the same contents.
    let (decoded, decoded_meta) = decode(&path, &fs::read(&path).unwrap()).unwrap();
    assert_eq!(decoded_meta, meta);
    for ((name, l), (decoded_name, d)) in loaded.iter().zip(&decoded) {
        assert_eq!((name, &l.shape, bits(l)), (decoded_name, &d.shape, bits(d)));
    }
    // Tensors are saved borrowed as well as owned, to the same bytes.
    let borrowed: Vec<(String, &Tensor<f32>)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let copy = dir.join("borrowed.ckpt");
    save(&copy, &borrowed, meta).unwrap();
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&path).unwrap());

    // Saving again replaces the file atomically.
    save(&path, &tensors[..1], "{}").unwrap();
    let (loaded, meta) = load(&path).unwrap();
    assert_eq!((loaded.len(), meta.as_str()), (1, "{}"));
    assert_eq!(leftover_temp_files(&dir), Vec::<String>::new());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let dir = scratch_dir("truncated");
    let path = dir.join("model.ckpt");
    save(&path, &sample_tensors(), "{}").unwrap();
    let full = fs::read(&path).unwrap();
    for keep in [0, 5, 8, 20, 24, full.len() / 2, full.len() - 1] {
        fs::write(&path, &full[..keep]).unwrap();
        let err = load(&path).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("model.ckpt"), "{message}");
        assert!(matches!(err.problem, CheckpointProblem::Truncated { .. }), "{keep} bytes: {message}");
    }
    let mut longer = full.clone();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    assert!(matches!(load(&path).unwrap_err().problem, CheckpointProblem::TrailingBytes { .. }));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn any_flipped_byte_is_an_error() {
    let dir = scratch_dir("flipped");
    let path = dir.join("model.ckpt");
    save(&path, &sample_tensors(), r#"{"a": 1}"#).unwrap();
    let full = fs::read(&path).unwrap();
    for position in 0..full.len() {
        let mut damaged = full.clone();
        damaged[position] ^= 0x10;
        fs::write(&path, &damaged).unwrap();
        let err = load(&path).expect_err("a damaged checkpoint must not load");
        assert!(err.to_string().contains("model.ckpt"), "{err}");
        // Read in blocks or whole, the same problem.
        assert_eq!(err.to_string(), decode(&path, &damaged).unwrap_err().to_string());
    }
    // A flip in the data is reported as corruption.
    let mut damaged = full.clone();
    damaged[full.len() / 2] ^= 0x01;
    fs::write(&path, &damaged).unwrap();
    let err = load(&path).unwrap_err();
    assert!(matches!(err.problem, CheckpointProblem::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("corrupted"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_files_and_bad_input_are_errors() {
    let dir = scratch_dir("other");
    let missing = load(&dir.join("absent.ckpt")).unwrap_err();
    assert!(matches!(missing.problem, CheckpointProblem::Io(_)));
    assert!(missing.to_string().contains("absent.ckpt"));

    let text = dir.join("notes.txt");
    fs::write(&text, "hello, this is not a checkpoint at all").unwrap();
    assert!(matches!(load(&text).unwrap_err().problem, CheckpointProblem::NotACheckpoint));

    let path = dir.join("model.ckpt");
    let t = Tensor::<f32>::zeros(vec![2]);
    let duplicate = save(&path, &[("a".to_string(), t.clone()), ("a".to_string(), t)], "{}").unwrap_err();
    assert_eq!(duplicate.kind(), std::io::ErrorKind::InvalidInput);
    let inconsistent = Tensor { shape: vec![3], data: vec![1.0f32] };
    assert!(save(&path, &[("b".to_string(), inconsistent)], "{}").is_err());
    assert!(!path.exists());

    let unwritable = dir.join("no-such-folder").join("model.ckpt");
    let err = save(&unwritable, &sample_tensors(), "{}").unwrap_err();
    assert!(err.to_string().contains("model.ckpt"), "{err}");
    assert_eq!(leftover_temp_files(&dir), Vec::<String>::new());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_resumed_from_a_checkpoint_file_continues_bit_identically() {
    let dir = scratch_dir("resume");
    let path = dir.join("train.ckpt");
    let infos: Vec<ParamInfo> = [("w", vec![4usize, 3], false), ("emb", vec![7, 2], true)]
        .into_iter()
        .map(|(name, shape, embedding)| ParamInfo {
            name: name.to_string(),
            shape: shape.into_iter().map(Dim::from).collect(),
            init: Init::Glorot,
            group: None,
            embedding,
            node: NodeId::new(0),
        })
        .collect();
    let grads = |step: u64| -> HashMap<String, Value<f32>> {
        let mut rng = SplitMix64::keyed(5, step, 1);
        let mut random = |n: usize| (0..n).map(|_| (rng.next_f64() - 0.5) as f32).collect::<Vec<f32>>();
        let w = Tensor::new(vec![4, 3], random(12)).unwrap();
        let values = Tensor::new(vec![3, 2], random(6)).unwrap();
        let rows = vec![(step % 7) as u32, 2, (step % 7) as u32];
        HashMap::from([
            ("w".to_string(), Value::Dense(w)),
            ("emb".to_string(), Value::RowSparse { shape: vec![7, 2], rows, values }),
        ])
    };
    let not_frozen = |_: &ParamInfo| false;
    let start = mdl_runtime::init::init_params::<f32>(&infos, &Default::default(), 3).unwrap();
    let config = OptimConfig::new(OptimKind::adam(), 0.01);

    let mut straight_params = start.clone();
    let mut straight = Optimizer::<f32>::new(config.clone()).unwrap();
    for step in 0..5 {
        straight.step(&mut straight_params, &grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }

    let mut params = start;
    let mut opt = Optimizer::<f32>::new(config.clone()).unwrap();
    for step in 0..3 {
        opt.step(&mut params, &grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }
    let mut named: Vec<(String, Tensor<f32>)> = params.iter().map(|(n, t)| (format!("param/{n}"), t.clone())).collect();
    named.extend(opt.state().into_iter().map(|(n, t)| (format!("optim/{n}"), t)));
    save(&path, &named, r#"{"step": 3}"#).unwrap();
    drop((params, opt));

    let (loaded, _) = load(&path).unwrap();
    let mut params = HashMap::new();
    let mut state = Vec::new();
    for (name, t) in loaded {
        if let Some(p) = name.strip_prefix("param/") {
            params.insert(p.to_string(), t);
        } else if let Some(s) = name.strip_prefix("optim/") {
            state.push((s.to_string(), t));
        }
    }
    let mut opt = Optimizer::<f32>::new(config).unwrap();
    opt.load_state(state).unwrap();
    for step in 3..5 {
        opt.step(&mut params, &grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }
    for name in ["w", "emb"] {
        assert_eq!(bits(&params[name]), bits(&straight_params[name]), "{name}");
    }
    fs::remove_dir_all(&dir).unwrap();
}
