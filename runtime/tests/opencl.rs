//! The OpenCL backend agrees with interp (the oracle), on whatever OpenCL platform the
//! machine has (PoCL in CI): reduction epilogues, random fused kernels, every MatMul case (transposes,
//! batches, a shared right operand, sizes around the tile edge; every candidate tiling),
//! and parameters refreshed between steps.
//!
//! Tolerances (f32): fused kernels |opencl - interp| <= 1e-5 * (1 + |interp|) per element
//! for single ops and 1e-4 * (1 + |interp|) for random bodies of up to 12 ops (the device's
//! exp/log/tanh may differ from Rust's in the last bit, and chains amplify that; the
//! arithmetic and the summation order of reductions are the same as interp's, with
//! `FP_CONTRACT` off); MatMul 1e-5 * k (operands in [-1, 1]; tiles sum in another order).
//! NaN equals NaN and infinities must match.
//!
//! Without a platform every test prints why it skips, unless `MDL_REQUIRE_OPENCL=1`, which
//! makes that a failure (CI sets it after installing PoCL).
#![cfg(feature = "opencl")]

mod common;
use common::{dims, values};

use mdl_runtime::backend::opencl::{self, OpenCl};
use mdl_runtime::backend::{Executor, Interp, Values};
use mdl_runtime::ir::dim::Binding;
use mdl_runtime::ops::fused::{FusedKernel, Instr, Reduction};
use mdl_runtime::{BinaryOp, Dim, Graph, Init, Mode, Op, ReduceOp, Tensor, UnaryOp, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// The executor on the default device, or `None` (after printing why) when the machine has
/// no OpenCL platform and `MDL_REQUIRE_OPENCL` is not `1`. PoCL's kernel cache goes under
/// target/.
fn executor(test: &str) -> Option<OpenCl> {
    setup();
    let required = std::env::var("MDL_REQUIRE_OPENCL").is_ok_and(|v| v == "1");
    if opencl::probe() == 0 {
        assert!(!required, "{test}: MDL_REQUIRE_OPENCL=1 but {}", opencl::NO_PLATFORM);
        eprintln!("skipping {test}: {}", opencl::NO_PLATFORM);
        return None;
    }
    match OpenCl::new(None) {
        Ok(e) => Some(e),
        Err(e) => {
            assert!(!required, "{test}: MDL_REQUIRE_OPENCL=1 but the OpenCL executor could not start: {e}");
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

/// Points PoCL's kernel cache under target/, once, before any test thread makes an OpenCL
/// call (setting the environment while another thread reads it is undefined behaviour).
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("POCL_CACHE_DIR").is_none() {
            std::env::set_var("POCL_CACHE_DIR", concat!(env!("CARGO_TARGET_TMPDIR"), "/pocl-cache"));
        }
    });
}

fn close(got: f32, want: f32, tol: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got == want || (got - want).abs() <= tol * (1.0 + want.abs())
}

/// A graph under construction with its parameter values.
#[derive(Default)]
struct Case {
    g: Graph,
    params: HashMap<String, Tensor<f32>>,
    outputs: Vec<String>,
}

impl Case {
    fn param(&mut self, t: Tensor<f32>) -> mdl_runtime::ir::graph::NodeId {
        let name = format!("p{}", self.params.len());
        let id = self.g.param(&name, dims(&t.shape), Init::Zeros, None, false);
        self.params.insert(name, t);
        id
    }

    fn output(&mut self, op: Op, operands: &[Tensor<f32>]) {
        let ids: Vec<_> = operands.iter().map(|t| self.param(t.clone())).collect();
        let y = self.g.add(op, &ids, "").unwrap();
        let name = format!("o{}", self.outputs.len());
        self.g.outputs.insert(name.clone(), y);
        self.outputs.push(name);
    }

    fn fused(&mut self, kernel: FusedKernel, operands: &[Tensor<f32>]) {
        self.output(Op::Fused(Arc::new(kernel)), operands)
    }

    fn run(&self, exec: &mut dyn Executor) -> Values<f32> {
        let feeds: HashMap<String, Value<f32>> = HashMap::new();
        exec.run(&self.g, &Binding::new(), &feeds, &self.params, &Mode::eval()).unwrap()
    }

    /// Runs on interp and on `exec`; every output within `tol(name)`; returns how many ops
    /// ran on the device (from the profile).
    fn check(&self, exec: &mut OpenCl, tol: impl Fn(&str) -> f32) -> usize {
        let want = self.run(&mut Interp);
        exec.set_profiling(true);
        let got = self.run(exec);
        for name in &self.outputs {
            let (w, o) = (want.dense(name).unwrap(), got.dense(name).unwrap());
            assert_eq!(w.shape, o.shape, "{name}");
            let t = tol(name);
            for (i, (&x, &y)) in o.data.iter().zip(&w.data).enumerate() {
                assert!(close(x, y, t), "{name} ({}): [{i}] opencl {x} interp {y}", self.describe(name));
            }
        }
        let profile = exec.profile();
        profile.iter().filter(|(k, _, _)| !k.contains("(eval)")).map(|(_, _, n)| n).sum()
    }

    fn describe(&self, output: &str) -> String {
        self.g.node(self.g.outputs[output]).op.name()
    }
}

fn kernel(inputs: usize, body: Vec<Instr>, reduce: Option<Reduction>) -> FusedKernel {
    FusedKernel { inputs, body, reduce }
}

/// A fused kernel with a constant, alone and with reduction epilogues (sum and mean, over
/// rows, columns, all, kept). (Every op, broadcast pattern and special value is
/// `conformance.rs`.)
#[test]
fn constants_and_reduction_epilogues_equal_interp() {
    let Some(mut exec) = executor("constants_and_reduction_epilogues_equal_interp") else { return };
    let mut c = Case::default();
    // A constant, and reduction epilogues (sum and mean, over rows, columns, all, kept).
    let x = Tensor::new(vec![4, 5, 6], values(120, 3, -2.0, 2.0)).unwrap();
    let y = Tensor::new(vec![5, 1], values(5, 4, -2.0, 2.0)).unwrap();
    let body = vec![
        Instr::Input(0),
        Instr::Const(0.1),
        Instr::Input(1),
        Instr::Binary(BinaryOp::Mul, 0, 1),
        Instr::Binary(BinaryOp::Add, 3, 2),
        Instr::Unary(UnaryOp::Tanh, 4),
    ];
    c.fused(kernel(2, body.clone(), None), &[x.clone(), y.clone()]);
    for (op, axes, keep_dims) in [
        (ReduceOp::Sum, vec![2], false),
        (ReduceOp::Sum, vec![0], true),
        (ReduceOp::Mean, vec![1], false),
        (ReduceOp::Mean, vec![0, 2], true),
        (ReduceOp::Sum, vec![0, 1, 2], false),
    ] {
        c.fused(kernel(2, body.clone(), Some(Reduction { op, axes, keep_dims })), &[x.clone(), y.clone()]);
    }
    let device = c.check(&mut exec, |_| 1e-5);
    assert_eq!(device, c.outputs.len(), "every fused kernel runs on the device");
}

/// A random kernel body over `inputs` operands: 1 to 12 unary/binary ops and constants.
fn random_kernel(seed: u64, inputs: usize, reduce: Option<Reduction>) -> FusedKernel {
    let r = values(64, seed, 0.0, 1.0);
    let pick = |i: usize, n: usize| ((r[i % r.len()] * n as f32) as usize).min(n - 1);
    let mut body: Vec<Instr> = (0..inputs).map(Instr::Input).collect();
    let ops = 1 + pick(0, 12);
    for j in 0..ops {
        let at = body.len();
        let instr = match pick(3 * j + 1, 5) {
            0 => Instr::Unary(UnaryOp::Sigmoid, pick(3 * j + 2, at)),
            1 => Instr::Unary(
                [UnaryOp::Tanh, UnaryOp::Relu, UnaryOp::Abs, UnaryOp::Softplus, UnaryOp::Neg][pick(3 * j + 3, 5)],
                pick(3 * j + 2, at),
            ),
            2 => {
                body.push(Instr::Const((r[j] * 4.0 - 2.0) as f64));
                Instr::Binary(BinaryOp::Mul, at, pick(3 * j + 2, at))
            }
            _ => Instr::Binary(BinaryOp::ALL[pick(3 * j + 3, 6)], pick(3 * j + 2, at), pick(3 * j + 4, at)),
        };
        body.push(instr);
    }
    kernel(inputs, body, reduce)
}

#[test]
fn random_fused_kernels_equal_interp() {
    let Some(mut exec) = executor("random_fused_kernels_equal_interp") else { return };
    let mut c = Case::default();
    for seed in 0..60u64 {
        let r = values(8, 1000 + seed, 0.0, 1.0);
        let full = [1 + (r[0] * 9.0) as usize, 1 + (r[1] * 4.0) as usize, 1 + (r[2] * 40.0) as usize];
        let inputs = 1 + (r[3] * 3.0) as usize;
        // Each operand: the full shape, a broadcast pattern, or a lower rank.
        let shapes: Vec<Vec<usize>> = (0..inputs)
            .map(|k| match ((r[4] * 7.0) as usize + k) % 5 {
                0 | 1 => full.to_vec(),
                2 => vec![full[0], 1, full[2]],
                3 => vec![full[2]],
                _ => vec![full[0], full[1], 1],
            })
            .collect();
        let reduce = match (r[5] * 4.0) as usize {
            0 => Some(Reduction { op: ReduceOp::Sum, axes: vec![2], keep_dims: false }),
            1 => Some(Reduction { op: ReduceOp::Mean, axes: vec![0, 1], keep_dims: r[6] > 0.5 }),
            _ => None,
        };
        // The domain must be the full shape: make operand 0 full.
        let mut shapes = shapes;
        shapes[0] = full.to_vec();
        let operands: Vec<Tensor<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| Tensor::new(s.clone(), values(s.iter().product(), seed * 7 + k as u64, -2.0, 2.0)).unwrap())
            .collect();
        c.fused(random_kernel(seed, inputs, reduce), &operands);
    }
    let device = c.check(&mut exec, |_| 1e-4);
    assert_eq!(device, c.outputs.len());
}

#[test]
fn matmul_cases_equal_interp() {
    let Some(mut exec) = executor("matmul_cases_equal_interp") else { return };
    let mut c = Case::default();
    let mut ks = HashMap::new();
    let sizes = [1usize, 7, 16, 17, 33];
    let mut seed = 0u64;
    for &m in &sizes {
        for &k in &[1usize, 15, 16, 40] {
            for &n in &sizes {
                seed += 1;
                let (ta, tb) = (seed.is_multiple_of(2), seed.is_multiple_of(3));
                let batch = 1 + (seed % 3) as usize;
                let shared = seed.is_multiple_of(4);
                let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
                let b2 = if tb { vec![n, k] } else { vec![k, n] };
                let b_shape = if shared { b2 } else { [vec![batch], b2].concat() };
                let a = Tensor::new(a_shape.clone(), values(a_shape.iter().product(), seed, -1.0, 1.0)).unwrap();
                let b = Tensor::new(b_shape.clone(), values(b_shape.iter().product(), seed + 500, -1.0, 1.0)).unwrap();
                ks.insert(format!("o{}", c.outputs.len()), k);
                c.output(Op::MatMul { trans_a: ta, trans_b: tb }, &[a, b]);
            }
        }
    }
    // A rank-2 product.
    ks.insert(format!("o{}", c.outputs.len()), 50);
    c.output(
        Op::MatMul { trans_a: false, trans_b: false },
        &[
            Tensor::new(vec![70, 50], values(3500, 9, -1.0, 1.0)).unwrap(),
            Tensor::new(vec![50, 20], values(1000, 10, -1.0, 1.0)).unwrap(),
        ],
    );
    // Every tiling the device runs, each within tolerance of interp and all bit-identical
    // (each sums over k in order).
    let mut first: Option<Values<f32>> = None;
    for i in 0..opencl::render::MATMUL_TILES.len() {
        if exec.force_matmul_tiles(Some(i)).is_err() {
            continue;
        }
        let device = c.check(&mut exec, |name| 1e-5 * ks[name] as f32);
        assert_eq!(device, c.outputs.len(), "every matmul runs on the device");
        let got = c.run(&mut exec);
        match &first {
            None => first = Some(got),
            Some(f) => {
                for name in &c.outputs {
                    let same = f
                        .dense(name)
                        .unwrap()
                        .data
                        .iter()
                        .zip(&got.dense(name).unwrap().data)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "tiling {i} gives other bits than the first for {name}");
                }
            }
        }
    }
    assert!(first.is_some(), "the device runs at least one tiling");
}

/// A product large enough to tune gets a tiling chosen on its first run (the fastest of
/// the candidates, all timed), kept for later runs of the same shape, with interp's result.
#[test]
fn large_products_are_tuned_on_first_use() {
    let Some(mut exec) = executor("large_products_are_tuned_on_first_use") else { return };
    let (m, k, n) = (256usize, 128usize, 160usize);
    let mut c = Case::default();
    c.output(
        Op::MatMul { trans_a: false, trans_b: true },
        &[
            Tensor::new(vec![m, k], values(m * k, 1, -1.0, 1.0)).unwrap(),
            Tensor::new(vec![n, k], values(n * k, 2, -1.0, 1.0)).unwrap(),
        ],
    );
    c.check(&mut exec, |_| 1e-5 * k as f32);
    let chosen = exec.matmul_tilings();
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    assert_eq!((chosen[0].0, chosen[0].1, chosen[0].2), (m, n, k));
    assert!(opencl::render::MATMUL_TILES.contains(&chosen[0].3));
    c.check(&mut exec, |_| 1e-5 * k as f32);
    assert_eq!(exec.matmul_tilings(), chosen, "the choice is kept");
}

#[test]
fn graphs_through_the_fusion_pass_and_host_ops_equal_interp() {
    let Some(mut exec) = executor("graphs_through_the_fusion_pass_and_host_ops_equal_interp") else { return };
    // exp(max(relu(x @ w + b) * 2 - 1)) summed per row: matmul, a fused chain, a host op
    // (a max over an axis) and a fused reduction.
    let mut c = Case::default();
    let x = c.param(Tensor::new(vec![9, 13], values(117, 1, -1.0, 1.0)).unwrap());
    let w = c.param(Tensor::new(vec![13, 6], values(78, 2, -1.0, 1.0)).unwrap());
    let b = c.param(Tensor::new(vec![6], values(6, 3, -1.0, 1.0)).unwrap());
    let g = &mut c.g;
    let h = g.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w], "").unwrap();
    let h = g.add(Op::Binary(BinaryOp::Add), &[h, b], "").unwrap();
    let h = g.add(Op::Unary(UnaryOp::Relu), &[h], "").unwrap();
    let two = g.add(Op::Scalar(2.0), &[], "").unwrap();
    let one = g.add(Op::Scalar(1.0), &[], "").unwrap();
    let h = g.add(Op::Binary(BinaryOp::Mul), &[h, two], "").unwrap();
    let h = g.add(Op::Binary(BinaryOp::Sub), &[h, one], "").unwrap();
    let s = g.add(Op::Reduce { op: ReduceOp::Max, axes: vec![1], keep_dims: true }, &[h], "").unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[s], "").unwrap();
    let r = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, &[e], "").unwrap();
    g.outputs.insert("o0".into(), r);
    c.outputs.push("o0".into());
    assert!(c.check(&mut exec, |_| 1e-5) >= 2, "the matmul and the fused kernels run on the device");
    assert!(
        exec.profile().iter().any(|(k, _, _)| k == "reduce_max(eval)"),
        "the max runs on the host: {:?}",
        exec.profile()
    );
}

/// Values between device kernels stay on the device: in `relu(relu(x @ w1 + b1) @ w2 + b2)`
/// only the output is read back (one value per run), and equals interp; when a host op
/// (a max over an axis) also reads the first layer, that value is read back once more,
/// for it.
#[test]
fn values_between_device_kernels_stay_on_the_device() {
    let Some(mut exec) = executor("values_between_device_kernels_stay_on_the_device") else { return };
    for host_reader in [false, true] {
        let mut c = Case::default();
        let x = c.param(Tensor::new(vec![33, 20], values(660, 1, -1.0, 1.0)).unwrap());
        let w1 = c.param(Tensor::new(vec![20, 24], values(480, 2, -1.0, 1.0)).unwrap());
        let b1 = c.param(Tensor::new(vec![24], values(24, 3, -1.0, 1.0)).unwrap());
        let w2 = c.param(Tensor::new(vec![24, 7], values(168, 4, -1.0, 1.0)).unwrap());
        let b2 = c.param(Tensor::new(vec![7], values(7, 5, -1.0, 1.0)).unwrap());
        let g = &mut c.g;
        let layer = |g: &mut Graph, x, w, b| {
            let h = g.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w], "").unwrap();
            let h = g.add(Op::Binary(BinaryOp::Add), &[h, b], "").unwrap();
            g.add(Op::Unary(UnaryOp::Relu), &[h], "").unwrap()
        };
        let h1 = layer(g, x, w1, b1);
        let h2 = layer(g, h1, w2, b2);
        g.outputs.insert("o0".into(), h2);
        c.outputs.push("o0".into());
        if host_reader {
            let s = g.add(Op::Reduce { op: ReduceOp::Max, axes: vec![1], keep_dims: false }, &[h1], "").unwrap();
            g.outputs.insert("o1".into(), s);
            c.outputs.push("o1".into());
        }
        let before = exec.values_read_back();
        assert_eq!(c.check(&mut exec, |_| 1e-5), 4, "two matmuls and two fused kernels on the device");
        assert_eq!(exec.values_read_back() - before, 1 + host_reader as u64, "host reader: {host_reader}");
    }
}

/// Layout ops and gathers run on the device as copies between views and equal interp
/// exactly: permutes, broadcasts, slices along every axis, pads, concats along every
/// axis and reshapes (of computed values too, through a fused kernel), and row gathers;
/// so do lone sums and means (within rounding).
/// A gather with an id outside the table runs on the host and fails as interp does.
#[test]
fn layout_ops_and_gathers_equal_interp_on_the_device() {
    let Some(mut exec) = executor("layout_ops_and_gathers_equal_interp_on_the_device") else { return };
    let x = Tensor::new(vec![3, 4, 5], values(60, 1, -1.0, 1.0)).unwrap();
    let mut c = Case::default();
    for perm in [vec![0, 2, 1], vec![2, 0, 1], vec![1, 2, 0]] {
        c.output(Op::Permute { perm }, std::slice::from_ref(&x));
    }
    c.output(Op::Broadcast { shape: dims(&[2, 3, 4, 5]) }, std::slice::from_ref(&x));
    c.output(Op::Broadcast { shape: dims(&[3, 4, 5]) }, &[Tensor::new(vec![4, 1], values(4, 2, -1.0, 1.0)).unwrap()]);
    for axis in 0..3 {
        let size = x.shape[axis];
        c.output(Op::Slice { axis, start: Dim::lit(1), len: Dim::lit(size as i64 - 1) }, std::slice::from_ref(&x));
        c.output(Op::Pad { axis, before: Dim::lit(2), after: Dim::lit(1) }, std::slice::from_ref(&x));
        let mut other = x.shape.clone();
        other[axis] = 2;
        let y = Tensor::new(other.clone(), values(other.iter().product(), 3 + axis as u64, -1.0, 1.0)).unwrap();
        c.output(Op::Concat { axis }, &[x.clone(), y, x.clone()]);
    }
    c.output(Op::Reshape { shape: dims(&[12, 5]) }, std::slice::from_ref(&x));
    // Lone sums and means run as fused kernels with an empty body.
    c.output(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, std::slice::from_ref(&x));
    c.output(Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 2], keep_dims: true }, std::slice::from_ref(&x));
    let table = Tensor::new(vec![7, 3], values(21, 4, -1.0, 1.0)).unwrap();
    let t = c.param(table.clone());
    let ids = c.g.input("ids", dims(&[6]), mdl_runtime::DType::I);
    let rows = c.g.add(Op::Gather, &[t, ids], "").unwrap();
    // A computed value through device layout ops: exp(gathered rows), reshaped, permuted.
    let e = c.g.add(Op::Unary(UnaryOp::Exp), &[rows], "").unwrap();
    let r = c.g.add(Op::Reshape { shape: dims(&[2, 3, 3]) }, &[e], "").unwrap();
    let p = c.g.add(Op::Permute { perm: vec![2, 0, 1] }, &[r], "").unwrap();
    for (name, id) in [("rows", rows), ("perm", p)] {
        c.g.outputs.insert(name.into(), id);
        c.outputs.push(name.into());
    }
    let feed = |data: Vec<u32>| -> HashMap<String, Value<f32>> {
        [("ids".to_string(), Value::Ids(Tensor::new(vec![6], data).unwrap()))].into_iter().collect()
    };
    let good = feed(vec![0, 6, 3, 3, 1, 5]);
    let want = Interp.run(&c.g, &Binding::new(), &good, &c.params, &Mode::eval()).unwrap();
    exec.set_profiling(true);
    let got = exec.run(&c.g, &Binding::new(), &good, &c.params, &Mode::eval()).unwrap();
    for name in &c.outputs {
        let (w, o) = (want.dense(name).unwrap(), got.dense(name).unwrap());
        assert_eq!(w.shape, o.shape, "{name}");
        let tol = if name == "perm" || c.describe(name).starts_with("reduce") { 1e-6 } else { 0.0 };
        for (i, (&a, &b)) in o.data.iter().zip(&w.data).enumerate() {
            assert!(close(a, b, tol), "{name} ({}): [{i}] opencl {a} interp {b}", c.describe(name));
        }
    }
    let profile = exec.profile();
    assert!(!profile.iter().any(|(k, _, _)| k.contains("(eval)")), "every op ran on the device: {profile:?}");
    let bad = feed(vec![0, 7, 3, 3, 1, 5]);
    let want = Interp.run(&c.g, &Binding::new(), &bad, &c.params, &Mode::eval()).unwrap_err();
    let got = exec.run(&c.g, &Binding::new(), &bad, &c.params, &Mode::eval()).unwrap_err();
    assert_eq!(got.to_string(), want.to_string());
}

#[test]
fn parameters_are_refreshed_every_run() {
    let Some(mut exec) = executor("parameters_are_refreshed_every_run") else { return };
    let mut c = Case::default();
    c.output(
        Op::MatMul { trans_a: false, trans_b: false },
        &[
            Tensor::new(vec![5, 4], values(20, 1, -1.0, 1.0)).unwrap(),
            Tensor::new(vec![4, 3], values(12, 2, -1.0, 1.0)).unwrap(),
        ],
    );
    c.fused(
        kernel(1, vec![Instr::Input(0), Instr::Unary(UnaryOp::Tanh, 0)], None),
        &[Tensor::new(vec![6], values(6, 3, -1.0, 1.0)).unwrap()],
    );
    for step in 0..3u64 {
        for (i, t) in c.params.values_mut().enumerate() {
            let n = t.data.len();
            t.data = values(n, 100 * step + i as u64, -1.0, 1.0);
        }
        c.check(&mut exec, |_| 1e-5);
    }
    assert_eq!(exec.programs_built(), 1, "one program per plan, built once");
}

/// After an optimizer step through `training::update`, the next run uploads no parameter
/// bytes at all: the update wrote a dense parameter whole and only the touched rows of a
/// table (rows × (width + 1 id) values), and the device copies then give the results interp
/// gives with the updated host parameters. Tensors the executor has not seen (a copy of
/// the map) are uploaded whole again.
#[test]
fn a_step_uploads_only_the_updated_rows_and_dense_parameters() {
    use mdl_runtime::optim::{OptimConfig, OptimKind, Optimizer};
    let Some(mut exec) = executor("a_step_uploads_only_the_updated_rows_and_dense_parameters") else { return };
    let (rows, width, out) = (1000usize, 8usize, 4usize);
    let mut c = Case::default();
    let table = c.param(Tensor::new(vec![rows, width], values(rows * width, 1, -1.0, 1.0)).unwrap());
    let w = c.param(Tensor::new(vec![width, out], values(width * out, 2, -1.0, 1.0)).unwrap());
    let ids = c.g.input("ids", dims(&[6]), mdl_runtime::DType::I);
    let gathered = c.g.add(Op::Gather, &[table, ids], "").unwrap();
    let y = c.g.add(Op::MatMul { trans_a: false, trans_b: false }, &[gathered, w], "").unwrap();
    c.g.outputs.insert("y".into(), y);
    let feeds: HashMap<String, Value<f32>> =
        [("ids".to_string(), Value::Ids(Tensor::new(vec![6], vec![3, 999, 3, 0, 500, 7]).unwrap()))]
            .into_iter()
            .collect();
    let run = |exec: &mut dyn Executor, params: &HashMap<String, Tensor<f32>>| {
        exec.run(&c.g, &Binding::new(), &feeds, params, &Mode::eval()).unwrap().dense("y").unwrap().clone()
    };
    let check = |got: &Tensor<f32>, params: &HashMap<String, Tensor<f32>>| {
        let want = run(&mut Interp, params);
        for (i, (&a, &b)) in got.data.iter().zip(&want.data).enumerate() {
            assert!(close(a, b, 1e-5 * width as f32), "[{i}] opencl {a} interp {b}");
        }
    };
    let mut params = c.params.clone();
    let first = run(&mut exec, &params);
    check(&first, &params);
    let whole = 4 * (rows * width + width * out) as u64;
    assert_eq!(exec.param_bytes_uploaded(), whole, "the first run uploads both parameters whole");

    let info = common::param_info;
    let infos = vec![info("p0", &[rows, width], true), info("p1", &[width, out], false)];
    let mut opt = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adam(), 0.01)).unwrap();
    let touched = vec![500u32, 3, 3, 42];
    for step in 0..2u64 {
        let before = exec.param_bytes_uploaded();
        let grads: HashMap<String, Value<f32>> = [
            (
                "p0".to_string(),
                Value::RowSparse {
                    shape: vec![rows, width],
                    rows: touched.clone(),
                    values: Tensor::new(vec![4, width], values(4 * width, 10 + step, -1.0, 1.0)).unwrap(),
                },
            ),
            (
                "p1".to_string(),
                Value::Dense(Tensor::new(vec![width, out], values(width * out, 20 + step, -1.0, 1.0)).unwrap()),
            ),
        ]
        .into_iter()
        .collect();
        mdl_runtime::training::update(&mut exec, &mut opt, &mut params, &grads, &infos, &|_| false, &1.0.into())
            .unwrap();
        let distinct = 3; // rows 3, 42 and 500
        let written = 4 * (distinct * (width + 1) + width * out) as u64;
        assert_eq!(
            exec.param_bytes_uploaded() - before,
            written,
            "step {step}: the touched rows and the dense parameter"
        );
        let got = run(&mut exec, &params);
        assert_eq!(
            exec.param_bytes_uploaded() - before,
            written,
            "step {step}: the run after the update uploads nothing"
        );
        check(&got, &params);
    }
    let before = exec.param_bytes_uploaded();
    let copy = params.clone();
    let got = run(&mut exec, &copy);
    check(&got, &copy);
    assert_eq!(exec.param_bytes_uploaded() - before, whole, "tensors the executor has not seen are uploaded whole");
}

/// A row-sparse gradient (`SparseRows`) of a device-computed value is combined on the
/// device: bit for bit the dense gradient interp gives (each row's entries added in their
/// order), its rows distinct and ascending, every named row present even when its entries
/// are all zero; an id outside the table fails as interp does.
#[test]
fn row_sparse_gradients_are_combined_on_the_device() {
    let Some(exec) = executor("row_sparse_gradients_are_combined_on_the_device") else { return };
    let mut exec = exec.with_sparse_rows_on_device(true);
    let (rows, width, n) = (50usize, 5usize, 12usize);
    let mut c = Case::default();
    let dy = c.param(Tensor::new(vec![n, width], values(n * width, 1, -1.0, 1.0)).unwrap());
    let mask = c.param(Tensor::new(vec![n, 1], (0..n).map(|i| if i % 4 == 3 { 0.0 } else { 1.0 }).collect()).unwrap());
    let product = c.g.add(Op::Binary(BinaryOp::Mul), &[dy, mask], "").unwrap();
    let ids = c.g.input("ids", dims(&[n]), mdl_runtime::DType::I);
    let grad = c.g.add(Op::SparseRows { rows: Dim::lit(rows as i64) }, &[ids, product], "").unwrap();
    c.g.outputs.insert("grad".into(), grad);
    let feed = |data: Vec<u32>| -> HashMap<String, Value<f32>> {
        [("ids".to_string(), Value::Ids(Tensor::new(vec![n], data).unwrap()))].into_iter().collect()
    };
    // Row 7 four times, row 49 (the last) twice; row 3 only where the mask is 0.
    let good = feed(vec![7, 0, 7, 3, 49, 7, 2, 3, 49, 7, 11, 3]);
    let want = Interp.run(&c.g, &Binding::new(), &good, &c.params, &Mode::eval()).unwrap();
    exec.set_profiling(true);
    let got = exec.run(&c.g, &Binding::new(), &good, &c.params, &Mode::eval()).unwrap();
    let Value::RowSparse { rows: named, .. } = got.output("grad").unwrap() else { panic!("a row-sparse gradient") };
    assert_eq!(named, &vec![0, 2, 3, 7, 11, 49], "distinct ascending rows, row 3 named by zero entries");
    let (w, o) = (want.output("grad").unwrap().to_dense().unwrap(), got.output("grad").unwrap().to_dense().unwrap());
    assert_eq!(w.shape, o.shape);
    for (i, (&a, &b)) in o.data.iter().zip(&w.data).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "[{i}] opencl {a} interp {b}");
    }
    let profile = exec.profile();
    assert!(profile.iter().any(|(k, _, _)| k == "sparse_rows"), "sparse_rows ran on the device: {profile:?}");
    let bad = feed(vec![7, 0, 7, 3, 50, 7, 2, 3, 49, 7, 11, 3]);
    let want = Interp.run(&c.g, &Binding::new(), &bad, &c.params, &Mode::eval()).unwrap_err();
    let got = exec.run(&c.g, &Binding::new(), &bad, &c.params, &Mode::eval()).unwrap_err();
    assert_eq!(got.to_string(), want.to_string());
}

/// A fed value that several device kernels read is uploaded once per run (ids too), and
/// `transfers` counts it: a 1M-element feed read by two kernels, and ids read by two
/// gathers, cost one upload each (plus kernel metadata under 1 %).
#[test]
fn a_feed_read_by_several_device_kernels_is_uploaded_once() {
    let Some(mut exec) = executor("a_feed_read_by_several_device_kernels_is_uploaded_once") else { return };
    let n = 1 << 20;
    let mut c = Case::default();
    let x = c.g.input("x", dims(&[n]), mdl_runtime::DType::F);
    for u in [UnaryOp::Exp, UnaryOp::Tanh] {
        let y = c.g.add(Op::Unary(u), &[x], "").unwrap();
        let name = format!("o{}", c.outputs.len());
        c.g.outputs.insert(name.clone(), y);
        c.outputs.push(name);
    }
    let table = c.param(Tensor::new(vec![10, 4], values(40, 1, -1.0, 1.0)).unwrap());
    let table2 = c.param(Tensor::new(vec![10, 4], values(40, 2, -1.0, 1.0)).unwrap());
    let ids = c.g.input("ids", dims(&[n]), mdl_runtime::DType::I);
    for t in [table, table2] {
        let y = c.g.add(Op::Gather, &[t, ids], "").unwrap();
        let name = format!("o{}", c.outputs.len());
        c.g.outputs.insert(name.clone(), y);
        c.outputs.push(name);
    }
    let feeds: HashMap<String, Value<f32>> = [
        ("x".to_string(), Value::Dense(Tensor::new(vec![n], values(n, 3, -1.0, 1.0)).unwrap())),
        ("ids".to_string(), Value::Ids(Tensor::new(vec![n], (0..n as u32).map(|i| i % 10).collect()).unwrap())),
    ]
    .into_iter()
    .collect();
    exec.run(&c.g, &Binding::new(), &feeds, &c.params, &Mode::eval()).unwrap();
    let (up0, _) = exec.transfers().unwrap();
    exec.run(&c.g, &Binding::new(), &feeds, &c.params, &Mode::eval()).unwrap();
    let (up1, _) = exec.transfers().unwrap();
    let once = 2 * 4 * n as u64;
    assert!(
        up1 - up0 >= once && up1 - up0 < once + once / 100,
        "uploaded {} bytes, one copy of each feed is {once}",
        up1 - up0
    );
}

/// Softmax over every axis runs on the device and equals interp within 1e-6 relative (the
/// device's exp and division may differ in the last bit), special values included: -inf
/// entries, large magnitudes, and a NaN that spreads to its own vector only.
#[test]
fn softmax_over_every_axis_equals_interp_on_the_device() {
    let Some(mut exec) = executor("softmax_over_every_axis_equals_interp_on_the_device") else { return };
    let mut data = values(60, 5, -20.0, 20.0);
    data[3] = f32::NEG_INFINITY;
    data[17] = 80.0;
    data[41] = f32::NAN;
    let x = Tensor::new(vec![3, 4, 5], data).unwrap();
    let mut c = Case::default();
    for axis in 0..3 {
        c.output(Op::Softmax { axis }, std::slice::from_ref(&x));
    }
    let device = c.check(&mut exec, |_| 1e-6);
    assert_eq!(device, 3, "every softmax ran on the device");
}

#[test]
fn a_build_error_shows_the_log_and_the_source_line() {
    let Some(mut exec) = executor("a_build_error_shows_the_log_and_the_source_line") else { return };
    let source = "__kernel void broken(__global float* x) {\n    x[0] = undefined_name;\n}\n";
    let err = exec.build_program(source).unwrap_err().to_string();
    assert!(err.contains("did not build"), "{err}");
    assert!(err.contains("undefined_name"), "the log names the error: {err}");
    assert!(err.contains("source line 2:"), "the source line is shown: {err}");
    eprintln!("{err}");
}

#[test]
fn the_platform_probe_is_fast() {
    setup();
    let t = Instant::now();
    let n = opencl::probe();
    let second = Instant::now();
    opencl::probe();
    // The first call loads the ICD loader and the platforms; later ones are a count query.
    // Neither may wait like `ocl`'s platform list does (10 s) when there is none.
    assert!(t.elapsed().as_secs_f64() < 5.0, "probe took {:?}", t.elapsed());
    assert!(second.elapsed().as_secs_f64() < 0.1, "a repeated probe took {:?}", second.elapsed());
    eprintln!("{n} OpenCL platform(s)");
}

/// After a device training step the host's copy of a parameter is stale, yet a host op
/// that reads it (here a max over a weight matrix, which runs on the host) sees the
/// device's updated values: every step's loss equals interp's with the host optimizer
/// (SGD), and after the sync so do the parameters. The gradient (`tanh(W)`, a device
/// kernel) never leaves the device.
#[test]
fn a_host_op_reads_the_parameters_a_device_step_updated() {
    use mdl_runtime::optim::{OptimConfig, OptimKind, Optimizer};
    use mdl_runtime::training::{host_train_step, sync, train_step, TrainStep};
    let Some(mut exec) = executor("a_host_op_reads_the_parameters_a_device_step_updated") else { return };
    let (n, k, m) = (16usize, 64usize, 8usize);
    let mut c = Case::default();
    let w = c.param(Tensor::new(vec![k, m], values(k * m, 1, -1.0, 1.0)).unwrap());
    let x = c.g.input("x", dims(&[n, k]), mdl_runtime::DType::F);
    let y = c.g.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w], "").unwrap();
    let max = c.g.add(Op::Reduce { op: ReduceOp::Max, axes: vec![0], keep_dims: false }, &[w], "").unwrap();
    let sum_y = c.g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keep_dims: false }, &[y], "").unwrap();
    let sum_max = c.g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: false }, &[max], "").unwrap();
    let loss = c.g.add(Op::Binary(BinaryOp::Add), &[sum_y, sum_max], "").unwrap();
    let grad = c.g.add(Op::Unary(UnaryOp::Tanh), &[w], "").unwrap();
    c.g.outputs.insert("loss".into(), loss);
    c.g.outputs.insert("grad/p0".into(), grad);
    let feeds: HashMap<String, Value<f32>> =
        [("x".to_string(), Value::Dense(Tensor::new(vec![n, k], values(n * k, 2, -1.0, 1.0)).unwrap()))]
            .into_iter()
            .collect();
    let infos = vec![common::param_info("p0", &[k, m], false)];
    let mode = Mode::eval();
    let step = TrainStep {
        graph: &c.g,
        binding: &Binding::new(),
        feeds: &feeds,
        mode: &mode,
        info: &infos,
        frozen: &|_| false,
        clip_norm: None,
        lr_scale: &mdl_runtime::optim::LrScale::from(1.0),
    };
    let config = OptimConfig::new(OptimKind::Sgd, 0.5);
    let (mut dp, mut hp) = (c.params.clone(), c.params.clone());
    let (mut dopt, mut hopt) = (Optimizer::<f32>::new(config.clone()).unwrap(), Optimizer::<f32>::new(config).unwrap());
    for i in 0..3 {
        let d = train_step(&mut exec, &step, &mut dp, &mut dopt).unwrap();
        let h = host_train_step(&mut Interp, &step, &mut hp, &mut hopt).unwrap();
        assert!(close(d.loss, h.loss, 1e-5 * k as f32), "step {i}: loss opencl {} interp {}", d.loss, h.loss);
        assert_eq!(exec.params_ahead(), vec!["p0".to_string()], "step {i}");
    }
    assert_eq!(dp["p0"].data, c.params["p0"].data, "the host's tensor lags until the sync");
    sync(&mut exec, &mut dp, &mut dopt).unwrap();
    for (i, (&a, &b)) in dp["p0"].data.iter().zip(&hp["p0"].data).enumerate() {
        assert!(close(a, b, 1e-5), "[{i}] opencl {a} interp {b}");
    }
}
