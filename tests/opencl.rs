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
use mdl_runtime::backend::{Executor, Interp};
use mdl_runtime::exec::Mode;
use mdl_runtime::{autodiff, passes};
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
    assert!(std::env::var("MDL_REQUIRE_OPENCL").map_or(true, |v| v != "1"), "{test}: MDL_REQUIRE_OPENCL=1 but {}", opencl::NO_PLATFORM);
    eprintln!("skipping {test}: {}", opencl::NO_PLATFORM);
    false
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
    for path in shipped_specs() {
        let c = compile(&path);
        let loss = c.graph.outputs["loss"];
        let wrt: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
        let g = passes::optimize(&autodiff::differentiate(&c.graph, loss, &wrt).unwrap());
        let binding = small_binding(&g, 128);
        let mut rng = Lcg(5);
        let feeds = random_feeds::<f32>(&c, &binding, &mut rng);
        let params = random_params::<f32>(&g, &binding, 0.3, &mut rng);
        let mode = Mode::train(3, 1);
        let a = Interp.run(&g, &binding, &feeds, &params, &mode).unwrap();
        let b = exec.run(&g, &binding, &feeds, &params, &mode).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (la, lb) = (a.scalar("loss").unwrap(), b.scalar("loss").unwrap());
        assert!((la - lb).abs() <= 1e-5 * la.abs().max(1.0), "{}: loss interp {la} opencl {lb}", path.display());
        for p in &c.graph.params {
            let name = format!("grad/{}", p.name);
            let ga = a.output(&name).unwrap().to_dense().unwrap();
            let gb = b.output(&name).unwrap().to_dense().unwrap();
            let scale = ga.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (x, y) in ga.data.iter().zip(&gb.data) {
                assert!((x - y).abs() <= 5e-4 * scale, "{}: {name}: interp {x} opencl {y} (scale {scale})", path.display());
            }
        }
    }
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
    for args in [&["devices"][..], &["bench", "experiments/quickstart.yaml", "--backend", "opencl", "--steps", "1"][..]] {
        let t = Instant::now();
        let out = mdl(args, &env);
        let secs = t.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(opencl::NO_PLATFORM), "{args:?}: {err}");
        assert!(secs < 5.0, "{args:?} took {secs:.1} s");
    }
}
