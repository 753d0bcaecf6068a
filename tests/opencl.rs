//! The OpenCL backend end to end (built with `--features opencl`): every shipped spec's
//! training graph gives interp's loss and gradients (the jit test of `tests/specs.rs` with
//! the opencl executor), `mdl devices` lists the platform's devices, and a machine without
//! an OpenCL platform gets a clear error at once, never `ocl`'s 10-second wait.
//!
//! Tolerances as for the jit: loss 1e-5 relative; each gradient 5e-4 relative to its
//! largest entry (tiled matmuls sum in another order; batch-statistics layers amplify it).
//! Without a platform the device tests print why they skip, unless `MDL_REQUIRE_OPENCL=1`.
#![cfg(feature = "opencl")]

mod common;
use common::*;
use mdl_runtime::backend::opencl::{self, OpenCl};
use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

/// Points PoCL's kernel cache under target/ (once, before any OpenCL call) and says
/// whether the tests can run on a platform (panicking when `MDL_REQUIRE_OPENCL=1` and none
/// is there).
fn platform(test: &str) -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("POCL_CACHE_DIR").is_none() {
            std::env::set_var("POCL_CACHE_DIR", concat!(env!("CARGO_TARGET_TMPDIR"), "/pocl-cache"));
        }
    });
    if opencl::probe() > 0 {
        return true;
    }
    assert!(
        std::env::var("MDL_REQUIRE_OPENCL").map_or(true, |v| v != "1"),
        "{test}: MDL_REQUIRE_OPENCL=1 but {}",
        opencl::NO_PLATFORM
    );
    eprintln!("skipping {test}: {}", opencl::NO_PLATFORM);
    false
}

/// An empty folder `name` under the tests' temporary folder, removed when the test passes.
fn fresh_dir(name: &str) -> common::scratch::Scratch {
    common::scratch::Scratch::new(name)
}

fn mdl(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mdl"));
    c.args(args).current_dir(root());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn opencl_agrees_with_interp_on_every_spec() {
    if !platform("opencl_agrees_with_interp_on_every_spec") {
        return;
    }
    let mut exec = OpenCl::new(None).unwrap();
    assert_agrees_with_interp_on_every_spec("opencl", 1e-5, &mut [&mut exec]);
}

#[test]
fn devices_lists_the_platform_devices() {
    if !platform("devices_lists_the_platform_devices") {
        return;
    }
    let out = mdl(&["devices"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("0: "), "{text}");
    assert!(text.contains("[default]"), "{text}");
}

/// With the ICD loader pointed at an empty vendor folder there is no platform: `mdl
/// devices` and `--backend opencl` fail within a second with the install hint.
#[test]
fn no_platform_is_a_clear_error_at_once() {
    let empty = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-opencl-vendors");
    std::fs::create_dir_all(&empty).unwrap();
    let env = [("OCL_ICD_VENDORS", empty.to_str().unwrap())];
    for args in [&["devices"][..], &["bench", "experiments/quickstart.yaml", "--backend", "opencl", "--steps", "1"][..]]
    {
        let t = Instant::now();
        let out = mdl(args, &env);
        let secs = t.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(opencl::NO_PLATFORM), "{args:?}: {err}");
        assert!(secs < 5.0, "{args:?} took {secs:.1} s");
    }
}

/// Device training steps (`training::train_step` on OpenCL: gradients, optimizer state
/// and parameters kept on the device) against the host path on a second OpenCL executor
/// (the same kernels for the graph; gradients read back, clipped and applied by the host
/// optimizer): after three steps and `training::sync`, every parameter and every state
/// tensor agrees within 1e-5 × (1 + |host|) (the device's `sqrt` and division and the
/// norm's summation order differ in the last bits). Before the sync the host's tensors
/// are untouched, and no step after the first uploads a parameter. A fresh executor
/// continuing from the synced state (the host optimizer's state uploaded) and a reset
/// optimizer agree too.
fn device_steps_match_host_steps(
    path: &std::path::Path,
    config: &mdl_runtime::optim::OptimConfig,
    clip: Option<f64>,
    device_combine: bool,
) {
    use mdl_runtime::exec::Mode;
    use mdl_runtime::optim::Optimizer;
    use mdl_runtime::training::{host_train_step, sync, train_step, TrainStep};
    let label = format!("{} {:?} clip {clip:?} device combine {device_combine}", path.display(), config.kind);
    let c = compile(path);
    let g = mdl::train::build_training_graph(&c).unwrap();
    let binding = small_binding(&g, 128);
    let mut rng = Lcg(11);
    let batches: Vec<_> = (0..5).map(|_| random_feeds::<f32>(&c, &binding, &mut rng)).collect();
    let start = random_params::<f32>(&g, &binding, 0.3, &mut rng);
    let info = g.params.clone();
    let new_exec = || OpenCl::new(None).unwrap().with_sparse_rows_on_device(device_combine);
    let (mut device, mut host) = (new_exec(), new_exec());
    let (mut dp, mut hp) = (start.clone(), start.clone());
    let (mut dopt, mut hopt) =
        (Optimizer::<f32>::new(config.clone()).unwrap(), Optimizer::<f32>::new(config.clone()).unwrap());
    let modes: Vec<Mode> = (0..5).map(|i| Mode::train(3, i)).collect();
    let unscaled = mdl_runtime::optim::LrScale::from(1.0);
    let step = |i: usize| TrainStep {
        graph: &g,
        binding: &binding,
        feeds: &batches[i],
        mode: &modes[i],
        info: &info,
        frozen: &|_| false,
        clip_norm: clip,
        lr_scale: &unscaled,
    };
    let compare = |what: &str,
                   dp: &HashMap<String, mdl_runtime::Tensor<f32>>,
                   dopt: &Optimizer<f32>,
                   hp: &HashMap<String, mdl_runtime::Tensor<f32>>,
                   hopt: &Optimizer<f32>| {
        for (name, want) in hp {
            for (k, (a, b)) in dp[name].data.iter().zip(&want.data).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{label} {what}: {name}[{k}] device {a} host {b}");
            }
        }
        let (ds, hs) = (dopt.state(), hopt.state());
        assert_eq!(
            ds.iter().map(|s| &s.0).collect::<Vec<_>>(),
            hs.iter().map(|s| &s.0).collect::<Vec<_>>(),
            "{label} {what}: state names"
        );
        for ((name, a), (_, b)) in ds.iter().zip(&hs) {
            for (k, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{label} {what}: {name}[{k}] device {x} host {y}");
            }
        }
    };
    let mut uploaded_after_first = 0;
    for i in 0..3 {
        let d = train_step(&mut device, &step(i), &mut dp, &mut dopt).unwrap();
        let h = host_train_step(&mut host, &step(i), &mut hp, &mut hopt).unwrap();
        assert!(
            (d.loss - h.loss).abs() <= 1e-5 * (1.0 + h.loss.abs()),
            "{label} step {i}: loss device {} host {}",
            d.loss,
            h.loss
        );
        if i == 0 {
            uploaded_after_first = device.param_bytes_uploaded();
        }
    }
    assert_eq!(
        device.param_bytes_uploaded(),
        uploaded_after_first,
        "{label}: steps after the first upload no parameter"
    );
    let ahead = device.params_ahead();
    assert!(!ahead.is_empty(), "{label}: the device keeps the updated parameters");
    assert!(ahead.iter().all(|n| dp[n].data == start[n].data), "{label}: the host's tensors lag until the sync");
    sync(&mut device, &mut dp, &mut dopt).unwrap();
    assert!(device.params_ahead().is_empty(), "{label}: nothing is ahead after the sync");
    sync(&mut host, &mut hp, &mut hopt).unwrap();
    assert!(dp.iter().any(|(n, t)| t.data != start[n].data), "{label}: the sync brings the updates back");
    compare("after 3 steps", &dp, &dopt, &hp, &hopt);

    // A fresh executor continues from the host's state (uploaded on first use). Each
    // phase starts both sides from the same values, so that differences do not carry
    // over: the first step of a fresh Adam or Adagrad is close to `lr · sign(g)`, which
    // turns last-bit differences of a near-zero gradient into large ones.
    let mut resumed = new_exec();
    let mut ropt = Optimizer::<f32>::new(config.clone()).unwrap();
    ropt.load_state(dopt.state()).unwrap();
    hopt.load_state(dopt.state()).unwrap();
    let mut rp = dp.clone();
    hp = dp.clone();
    train_step(&mut resumed, &step(3), &mut rp, &mut ropt).unwrap();
    host_train_step(&mut host, &step(3), &mut hp, &mut hopt).unwrap();
    sync(&mut resumed, &mut rp, &mut ropt).unwrap();
    compare("resumed", &rp, &ropt, &hp, &hopt);

    // A reset optimizer starts afresh on the device too.
    ropt.reset();
    hopt.reset();
    hp = rp.clone();
    train_step(&mut resumed, &step(4), &mut rp, &mut ropt).unwrap();
    host_train_step(&mut host, &step(4), &mut hp, &mut hopt).unwrap();
    sync(&mut resumed, &mut rp, &mut ropt).unwrap();
    compare("after a reset", &rp, &ropt, &hp, &hopt);
}

#[test]
fn device_training_steps_match_host_steps_for_every_rule() {
    use mdl_runtime::optim::{OptimConfig, OptimKind};
    if !platform("device_training_steps_match_host_steps_for_every_rule") {
        return;
    }
    let deepfm = root().join("specs/deepfm.mdl");
    let mut with_l2 = OptimConfig::new(OptimKind::adam(), 0.01);
    with_l2.l2 = 1e-3;
    with_l2.embedding_l2 = Some(1e-2);
    with_l2.embedding_lr = Some(0.05);
    let configs = [
        OptimConfig::new(OptimKind::Sgd, 0.1),
        OptimConfig::new(OptimKind::adagrad(), 0.05),
        OptimConfig::new(OptimKind::Adagrad { eps: 1e-10, initial_accumulator: 0.1 }, 0.05),
        with_l2,
    ];
    for config in &configs {
        for device_combine in [false, true] {
            for clip in [None, Some(0.05)] {
                device_steps_match_host_steps(&deepfm, config, clip, device_combine);
            }
        }
    }
}

#[test]
fn device_training_steps_match_host_steps_on_every_spec() {
    use mdl_runtime::optim::{OptimConfig, OptimKind};
    if !platform("device_training_steps_match_host_steps_on_every_spec") {
        return;
    }
    for path in shipped_specs() {
        device_steps_match_host_steps(&path, &OptimConfig::new(OptimKind::adam(), 0.01), Some(1.0), true);
    }
}

/// Training through `mdl run --backend opencl` keeps parameters and optimizer state on the
/// device, so the trainer must bring them back before each checkpoint: a run stopped after
/// 3 steps (last checkpoint at step 2) and resumed ends with a metrics.json byte-identical
/// to a straight run's (every kernel is deterministic, the combine of embedding gradients
/// included), and its test AUC is interp's within 1e-3. The device is named in
/// timing.json, the log and the bench's header. A bad `MDL_OPENCL_COMBINE` is a clear
/// error.
#[test]
fn opencl_runs_resume_exactly_and_match_interp() {
    if !platform("opencl_runs_resume_exactly_and_match_interp") {
        return;
    }
    let dir = fresh_dir("opencl-runs");
    let cache = dir.join("mdl-cache");
    let cache = cache.to_str().unwrap();
    let run = |name: &str, backend: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap(), "--backend", backend];
        args.extend_from_slice(&[
            "--set",
            "train.batch_size=1024",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.eval_every=2",
            "--set",
            "train.early_stopping.patience=10",
        ]);
        args.extend_from_slice(extra);
        let o = mdl(&args, &[("MDL_CACHE_DIR", cache), ("CI", "1")]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        (out, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let metrics = |d: &std::path::Path| std::fs::read(d.join("metrics.json")).unwrap();
    let (straight, _) = run("straight", "opencl", &[]);
    let (stopped, log) = run("resumed", "opencl", &["--stop-after", "3"]);
    assert!(log.contains("stopping after 3 steps"), "{log}");
    let o = mdl(&["run", "--resume", stopped.to_str().unwrap()], &[("MDL_CACHE_DIR", cache), ("CI", "1")]);
    assert!(o.status.success(), "resume: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&straight), metrics(&stopped), "the resumed opencl run differs from the straight one");
    let (reference, _) = run("interp", "interp", &[]);
    let auc = |d: &std::path::Path| {
        serde_json::from_slice::<serde_json::Value>(&metrics(d)).unwrap()["test"]["auc"].as_f64().unwrap()
    };
    let (a, b) = (auc(&straight), auc(&reference));
    assert!((a - b).abs() < 1e-3, "test auc: opencl {a} interp {b}");

    // The device is named in the run's timing.json and log, and in the bench's header.
    let timing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(straight.join("timing.json")).unwrap()).unwrap();
    let device =
        timing["device"].as_str().unwrap_or_else(|| panic!("timing.json names no device: {timing}")).to_string();
    let devices = opencl::devices().unwrap();
    assert!(devices.iter().any(|d| device.starts_with(&d.name)), "{device} is not among {devices:?}");
    let log = std::fs::read_to_string(straight.join("train.log")).unwrap();
    assert!(log.contains(&format!("device: {device}")), "{log}");
    let o = mdl(
        &[
            "bench",
            "experiments/quickstart.yaml",
            "--backend",
            "opencl",
            "--steps",
            "1",
            "--set",
            "spec=specs/dnn.mdl",
            "--set",
            "train.batch_size=256",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with(&format!("model dnn on opencl ({device}) at batch 256")),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let o = mdl(
        &["bench", "experiments/quickstart.yaml", "--backend", "opencl", "--steps", "1"],
        &[("MDL_OPENCL_COMBINE", "sideways")],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("MDL_OPENCL_COMBINE=sideways: expected `device` or `host`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Staged training on OpenCL: a frozen group's gradients are neither kept on the device
/// nor applied, and the second stage's optimizer reset drops the device's state.
#[test]
fn opencl_stages_freeze_and_reset_as_the_jit_does() {
    if !platform("opencl_stages_freeze_and_reset_as_the_jit_does") {
        return;
    }
    let dir = fresh_dir("opencl-stages");
    let cache = dir.join("mdl-cache");
    assert_a_frozen_group_keeps_its_initial_values(&dir, |args| {
        let mut args = args.to_vec();
        args.extend_from_slice(&["--backend", "opencl"]);
        let o = mdl(&args, &[("MDL_CACHE_DIR", cache.to_str().unwrap()), ("CI", "1")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    });
}
