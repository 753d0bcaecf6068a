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
