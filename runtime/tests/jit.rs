//! The jit backend's kernels agree with interp (the oracle) on random shapes: every MatMul
//! case and transpose flag, the broadcast patterns of binary ops, unary ops, and
//! reductions, with one and two threads. Tolerance: |jit - interp| <= 1e-5 * (1 + |interp|)
//! elementwise for elementwise ops; for MatMul 1e-5 * k * max|a| * max|b| (GEMM sums in
//! another order).

use mdl_runtime::backend::{jit::Jit, Executor, Interp};
use mdl_runtime::ir::dim::Binding;
use mdl_runtime::{BinaryOp, DType, Dim, Graph, Init, Mode, Op, ReduceOp, Tensor, UnaryOp, Value};
use proptest::prelude::*;
use std::collections::HashMap;

fn dims(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::lit(d as i64)).collect()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Builds `op(params...)`, runs it on interp and on jit (1 and 2 threads), compares.
fn agree(op: Op, shapes: &[Vec<usize>], tol: f32) {
    let mut g = Graph::new();
    let mut ids = Vec::new();
    let mut params = HashMap::new();
    for (i, s) in shapes.iter().enumerate() {
        let name = format!("p{i}");
        ids.push(g.param(&name, dims(s), Init::Zeros, None, false));
        params.insert(name, Tensor::new(s.clone(), values(s.iter().product(), i as u64 + 7)).unwrap());
    }
    let out = g.add(op.clone(), &ids, "").unwrap();
    g.outputs.insert("out".into(), out);
    let feeds: HashMap<String, Value<f32>> = HashMap::new();
    let b = Binding::new();
    let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
    let want = want.dense("out").unwrap();
    for threads in [1, 2] {
        let got = Jit::with_threads(threads).run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
        let got = got.dense("out").unwrap();
        assert_eq!(got.shape, want.shape, "{op:?}");
        for (x, y) in got.data.iter().zip(&want.data) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{op:?} {shapes:?}: jit {x} interp {y}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn matmul_cases(m in 1usize..40, k in 1usize..40, n in 1usize..40, batch in 1usize..4, ta: bool, tb: bool, case in 0usize..3) {
        let a2 = |r: usize, c: usize, t: bool| if t { vec![c, r] } else { vec![r, c] };
        let (sa, sb) = match case {
            0 => (a2(m, k, ta), a2(k, n, tb)),
            1 => { let mut a = vec![batch]; a.extend(a2(m, k, ta)); let mut b = vec![batch]; b.extend(a2(k, n, tb)); (a, b) }
            _ => { let mut a = vec![batch]; a.extend(a2(m, k, ta)); (a, a2(k, n, tb)) }
        };
        agree(Op::MatMul { trans_a: ta, trans_b: tb }, &[sa, sb], 1e-5 * k as f32);
    }

    #[test]
    fn binary_broadcast_patterns(b in 1usize..300, f in 1usize..5, d in 1usize..20, pat in 0usize..5, op in 0usize..8, swap: bool) {
        let ops = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Gt, BinaryOp::Eq];
        let big = vec![b, f, d];
        let small = match pat { 0 => big.clone(), 1 => vec![], 2 => vec![d], 3 => vec![b, f, 1], _ => vec![f, d] };
        let shapes = if swap { vec![small, big] } else { vec![big, small] };
        // Division by values near 0 is ill-conditioned in both; keep the comparison fair.
        let tol = if ops[op] == BinaryOp::Div { 1e-3 } else { 1e-6 };
        agree(Op::Binary(ops[op]), &shapes, tol);
    }

    #[test]
    fn unary_and_reduce(b in 1usize..600, d in 1usize..40, u in 0usize..10, axis in 0usize..2, mean: bool) {
        let us = [UnaryOp::Neg, UnaryOp::Exp, UnaryOp::Relu, UnaryOp::Sigmoid, UnaryOp::Tanh, UnaryOp::Softplus, UnaryOp::Abs, UnaryOp::Step, UnaryOp::Sign, UnaryOp::Recip];
        agree(Op::Unary(us[u]), &[vec![b, d]], 1e-5);
        let op = if mean { ReduceOp::Mean } else { ReduceOp::Sum };
        agree(Op::Reduce { op, axes: vec![axis], keep_dims: false }, &[vec![b, d, 3]], 1e-5);
        agree(Op::Reduce { op, axes: vec![1, 2], keep_dims: true }, &[vec![b, d, 3]], 1e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn layout_broadcast_concat_reshape(b in 1usize..30, f in 1usize..5, d in 1usize..9, pat in 0usize..5, axis in 0usize..3) {
        let out = vec![b, f, d];
        let from = match pat { 0 => vec![b, 1, d], 1 => vec![1, f, 1], 2 => vec![d], 3 => vec![b, f, 1], _ => vec![] };
        agree(Op::Broadcast { shape: dims(&out) }, &[from], 0.0);
        let mut other = out.clone();
        other[axis] += 2;
        agree(Op::Concat { axis }, &[out.clone(), other, out.clone()], 0.0);
        agree(Op::Reshape { shape: dims(&[b * f, d]) }, &[out], 0.0);
    }
}

#[test]
fn large_inputs_use_both_threads_and_agree() {
    agree(Op::Binary(BinaryOp::Mul), &[vec![4096, 2, 50, 16], vec![4096, 2, 50, 1]], 1e-6);
    agree(Op::MatMul { trans_a: true, trans_b: false }, &[vec![512, 300], vec![512, 200]], 1e-5 * 512.0);
    let _ = DType::F;
}
