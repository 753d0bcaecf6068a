//! The jit backend's kernels agree with interp (the oracle) on random shapes: every MatMul
//! case and transpose flag, and the layout ops, with one and two threads; taken operands
//! and pooled buffers; errors equal to interp's. (Every op on fixed cases with special
//! values, on every executor, is `conformance.rs`.) Tolerance: |jit - interp| <= tol *
//! (1 + |interp|) elementwise; for MatMul tol = 1e-5 * k (GEMM sums in another order).
//! bf16 products (`train.precision: bf16`) against an f64 product, within a bound derived
//! from bf16's 8 significant bits and the reduction length ([`check_bf16_product`]).

mod common;
use common::{dims, values};
use mdl_runtime::backend::jit::bf16::{from_bf16, to_bf16, Dot};
use mdl_runtime::backend::jit::Products;
use mdl_runtime::backend::{jit::Jit, Executor, Interp};
use mdl_runtime::ir::dim::Binding;
use mdl_runtime::{BinaryOp, DType, Dim, Graph, Init, Mode, Op, Tensor, UnaryOp, Value};
use proptest::prelude::*;
use std::collections::HashMap;

/// A graph with a parameter `p{i}` of each shape (random values, seeds from `seed`), its
/// node ids and the values.
fn with_params(shapes: &[Vec<usize>], seed: u64) -> (Graph, Vec<mdl_runtime::NodeId>, HashMap<String, Tensor<f32>>) {
    let mut g = Graph::new();
    let mut ids = Vec::new();
    let mut params = HashMap::new();
    for (i, s) in shapes.iter().enumerate() {
        let name = format!("p{i}");
        ids.push(g.param(&name, dims(s), Init::Zeros, None, false));
        params.insert(name, Tensor::new(s.clone(), values(s.iter().product(), i as u64 + seed, -1.0, 1.0)).unwrap());
    }
    (g, ids, params)
}

/// Builds `op(params...)`, runs it on interp and on jit (1 and 2 threads), compares.
fn agree(op: Op, shapes: &[Vec<usize>], tol: f32) {
    agree_with(op, shapes, tol, false)
}

/// [`agree`], on the jit with exact kernels (`Jit::with_exact_kernels`) or fast ones.
fn agree_with(op: Op, shapes: &[Vec<usize>], tol: f32, exact: bool) {
    let (mut g, ids, params) = with_params(shapes, 7);
    let out = g.add(op.clone(), &ids, "").unwrap();
    g.outputs.insert("out".into(), out);
    let feeds: HashMap<String, Value<f32>> = HashMap::new();
    let b = Binding::new();
    let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
    let want = want.dense("out").unwrap();
    for threads in [1, 2] {
        let got =
            Jit::with_threads(threads).with_exact_kernels(exact).run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
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

/// A concat along an inner axis large enough to be written block by block of its first axis
/// (blocks ending inside the split between the two threads): parts made by fused kernels
/// (with operands broadcast along the first axis, of a lower rank, or along the middle
/// one), a broadcast and a plain operand equal interp's concat bit for bit, on one and two
/// threads, exact kernels or not, and the concat ran on its kernel (no eval fallback).
#[test]
fn a_large_concat_of_parts_written_block_by_block_agrees_with_interp() {
    let (b, l, d) = (301usize, 50usize, 16usize);
    let (mut g, ids, params) = with_params(&[vec![b, 1, d], vec![b, l, d], vec![d], vec![1, l, d]], 11);
    let (q, k, w, c) = (ids[0], ids[1], ids[2], ids[3]);
    let bin = |g: &mut Graph, op: BinaryOp, x, y| g.add(Op::Binary(op), &[x, y], "").unwrap();
    let wide = g.add(Op::Broadcast { shape: dims(&[b, l, d]) }, &[q], "").unwrap();
    let parts = [
        wide,
        k,
        bin(&mut g, BinaryOp::Sub, q, k),
        bin(&mut g, BinaryOp::Mul, q, k),
        bin(&mut g, BinaryOp::Mul, k, w),
        bin(&mut g, BinaryOp::Add, c, k),
    ];
    let cat = g.add(Op::Concat { axis: 2 }, &parts, "").unwrap();
    g.outputs.insert("out".into(), cat);
    let (feeds, binding) = (HashMap::new(), Binding::new());
    let want = Interp.run(&g, &binding, &feeds, &params, &Mode::eval()).unwrap();
    for threads in [1, 2] {
        for exact in [true, false] {
            let mut jit = Jit::with_threads(threads).with_exact_kernels(exact);
            jit.set_profiling(true);
            let got = jit.run(&g, &binding, &feeds, &params, &Mode::eval()).unwrap();
            assert_eq!(got.dense("out").unwrap(), want.dense("out").unwrap(), "threads {threads} exact {exact}");
            let kinds: Vec<String> = jit.profile().into_iter().map(|p| p.0).collect();
            assert!(kinds.contains(&"concat".to_string()), "{kinds:?}");
        }
    }
}

/// Products whose only reader is a concat along its last axis write their rows into its
/// slices: batched (each operand transposed or not, a shared right operand, one output
/// column, which goes through a buffer), and 2-D products, large enough to be written by
/// blocks (and, with a transposed 2-D left operand, whole): the concat equals interp's
/// within the products' rounding, on one and two threads, and ran on its kernel.
#[test]
fn products_written_into_a_concat_agree_with_interp() {
    let (b, l, d, k) = (300usize, 48usize, 16usize, 40usize);
    for trans_2d in [false, true] {
        let a2 = if trans_2d { vec![k, b * l] } else { vec![b * l, k] };
        let shapes = [vec![b, l, l], vec![b, l, d], vec![b, d, l], vec![d, d], vec![b, l, 1], a2, vec![k, d]];
        let (mut g, ids, params) = with_params(&shapes, 5);
        let mm = |g: &mut Graph, ta: bool, tb: bool, x, y| {
            g.add(Op::MatMul { trans_a: ta, trans_b: tb }, &[x, y], "").unwrap()
        };
        let flat = g.add(Op::Reshape { shape: dims(&[b * l, d]) }, &[ids[1]], "").unwrap();
        let parts = [
            mm(&mut g, false, false, ids[0], ids[1]),
            mm(&mut g, true, false, ids[0], ids[1]),
            mm(&mut g, false, true, ids[0], ids[2]),
            mm(&mut g, false, false, ids[1], ids[3]),
            mm(&mut g, false, false, ids[0], ids[4]),
        ];
        let cat = g.add(Op::Concat { axis: 2 }, &parts, "").unwrap();
        let flat_cat = g.add(Op::Reshape { shape: dims(&[b * l, 4 * d + 1]) }, &[cat], "").unwrap();
        let second = mm(&mut g, trans_2d, false, ids[5], ids[6]);
        let wide = g.add(Op::Concat { axis: 1 }, &[flat_cat, second, flat], "").unwrap();
        g.outputs.insert("out".into(), wide);
        let (feeds, binding) = (HashMap::new(), Binding::new());
        let want = Interp.run(&g, &binding, &feeds, &params, &Mode::eval()).unwrap();
        let want = want.dense("out").unwrap();
        for threads in [1, 2] {
            let mut jit = Jit::with_threads(threads);
            jit.set_profiling(true);
            let got = jit.run(&g, &binding, &feeds, &params, &Mode::eval()).unwrap();
            let got = got.dense("out").unwrap();
            assert_eq!(got.shape, want.shape);
            for (i, (x, y)) in got.data.iter().zip(&want.data).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * k as f32 * (1.0 + y.abs()),
                    "element {i}: jit {x} interp {y} (threads {threads}, 2-D transposed {trans_2d})"
                );
            }
            let kinds: Vec<String> = jit.profile().into_iter().map(|p| p.0).collect();
            assert!(kinds.contains(&"concat".to_string()) && !kinds.iter().any(|k| k.contains("(eval)")), "{kinds:?}");
            assert!(!kinds.contains(&"matmul".to_string()), "every product runs inside its concat: {kinds:?}");
        }
    }
}

#[test]
fn large_inputs_use_both_threads_and_agree() {
    agree(Op::MatMul { trans_a: true, trans_b: false }, &[vec![512, 300], vec![512, 200]], 1e-5 * 512.0);
    let _ = DType::F;
}

/// A graph whose reshapes, first-axis slice and sparse rows read values that die there
/// (the jit takes their buffers), next to a reshape of a value read again later and of a
/// named output (both must be copied), run three times on one executor with new values each
/// time (buffers come back from the pool holding the previous run's values): every output
/// equals interp's exactly, and the later runs take their buffers from the pool.
#[test]
fn taken_operands_and_pooled_buffers_agree_with_interp() {
    let mut g = Graph::new();
    let p0 = g.param("p0", dims(&[64, 128]), Init::Zeros, None, false);
    let p1 = g.param("p1", dims(&[64, 2, 32]), Init::Zeros, None, false);
    let table = g.param("table", dims(&[300, 32]), Init::Zeros, None, true);
    let ids = g.input("ids", dims(&[64, 2]), DType::I);
    let a = g.add(Op::Unary(UnaryOp::Exp), &[p0], "").unwrap();
    let r = g.add(Op::Reshape { shape: dims(&[128, 64]) }, &[a], "").unwrap();
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[r, r], "").unwrap();
    let s = g.add(Op::Slice { axis: 0, start: Dim::lit(10), len: Dim::lit(100) }, &[sq], "").unwrap();
    let x = g.add(Op::Unary(UnaryOp::Neg), &[p0], "").unwrap();
    let y = g.add(Op::Reshape { shape: dims(&[8192]) }, &[x], "").unwrap();
    let z = g.add(Op::Binary(BinaryOp::Add), &[x, x], "").unwrap();
    let z2 = g.add(Op::Reshape { shape: dims(&[128, 64]) }, &[z], "").unwrap();
    let flat = g.add(Op::Reshape { shape: dims(&[128]) }, &[ids], "").unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[p1], "").unwrap();
    let vals = g.add(Op::Reshape { shape: dims(&[128, 32]) }, &[e], "").unwrap();
    let sr = g.add(Op::SparseRows { rows: Dim::lit(300) }, &[flat, vals], "").unwrap();
    let gathered = g.add(Op::Gather, &[table, flat], "").unwrap();
    for (name, id) in [("s", s), ("y", y), ("z", z), ("z2", z2), ("sr", sr), ("gathered", gathered)] {
        g.outputs.insert(name.into(), id);
    }
    let b = Binding::new();
    let mut jit = Jit::with_threads(2).with_exact_kernels(true);
    for run in 0..3u64 {
        let mut params = HashMap::new();
        params.insert("p0".to_string(), Tensor::new(vec![64, 128], values(64 * 128, run + 1, -1.0, 1.0)).unwrap());
        params.insert("p1".to_string(), Tensor::new(vec![64, 2, 32], values(64 * 64, run + 11, -1.0, 1.0)).unwrap());
        params.insert("table".to_string(), Tensor::new(vec![300, 32], values(300 * 32, run + 21, -1.0, 1.0)).unwrap());
        let id_data: Vec<u32> = (0..128u32).map(|i| (i * 7 + run as u32 * 13) % 300).collect();
        let feeds: HashMap<String, Value<f32>> =
            [("ids".to_string(), Value::Ids(Tensor::new(vec![64, 2], id_data).unwrap()))].into_iter().collect();
        let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
        let got = jit.run(&g, &b, &feeds, &params, &Mode::eval()).unwrap();
        for name in ["s", "y", "z", "z2", "sr", "gathered"] {
            assert_eq!(got.output(name), want.output(name), "run {run}: output {name}");
        }
    }
    let (taken, fresh) = jit.pool_counts();
    assert!(taken > 0, "later runs reuse freed buffers ({taken} taken, {fresh} fresh)");
}

#[test]
fn a_freed_id_out_of_range_in_sparse_rows_is_an_error() {
    let mut g = Graph::new();
    let ids = g.input("ids", dims(&[4]), DType::I);
    let v = g.param("v", dims(&[4, 2]), Init::Zeros, None, false);
    let e = g.add(Op::Unary(UnaryOp::Exp), &[v], "").unwrap();
    let sr = g.add(Op::SparseRows { rows: Dim::lit(3) }, &[ids, e], "").unwrap();
    g.outputs.insert("sr".into(), sr);
    let params: HashMap<String, Tensor<f32>> = [("v".to_string(), Tensor::zeros(vec![4, 2]))].into_iter().collect();
    let feeds: HashMap<String, Value<f32>> =
        [("ids".to_string(), Value::Ids(Tensor::new(vec![4], vec![0, 1, 5, 2]).unwrap()))].into_iter().collect();
    let b = Binding::new();
    let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval()).unwrap_err();
    let got = Jit::with_threads(1).run(&g, &b, &feeds, &params, &Mode::eval()).unwrap_err();
    assert_eq!(got.to_string(), want.to_string());
}

#[test]
fn gather_rows_agree_and_an_id_out_of_range_is_the_same_error() {
    for (rows, width, n) in [(50usize, 16usize, 20_000usize), (7, 1, 9), (3, 0, 4)] {
        let mut g = Graph::new();
        let table = g.param("t", dims(&[rows, width]), Init::Zeros, None, true);
        let ids = g.input("ids", dims(&[n]), DType::I);
        let out = g.add(Op::Gather, &[table, ids], "").unwrap();
        g.outputs.insert("out".into(), out);
        let params: HashMap<String, Tensor<f32>> =
            [("t".to_string(), Tensor::new(vec![rows, width], values(rows * width, 3, -1.0, 1.0)).unwrap())]
                .into_iter()
                .collect();
        let b = Binding::new();
        for bad in [false, true] {
            let id_data: Vec<u32> = (0..n as u32)
                .map(|i| if bad && i == n as u32 - 1 { rows as u32 } else { (i * 31) % rows as u32 })
                .collect();
            let feeds: HashMap<String, Value<f32>> =
                [("ids".to_string(), Value::Ids(Tensor::new(vec![n], id_data).unwrap()))].into_iter().collect();
            let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval());
            let got = Jit::with_threads(2).run(&g, &b, &feeds, &params, &Mode::eval());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got.dense("out"), want.dense("out")),
                (Err(got), Err(want)) => assert_eq!(got.to_string(), want.to_string()),
                (got, want) => panic!("jit {got:?} vs interp {want:?}"),
            }
        }
    }
}

/// Softmax over any axis runs the jit kernel (rows for the last axis, columns side by side
/// for the others), which with exact kernels must equal interp bit for bit (same
/// operations in the same order per position), and with fast ones (polynomial exp, lane
/// sums) within 2e-6, with one and two threads and blocks enough to split.
#[test]
fn softmax_equals_interp_exactly_or_within_rounding() {
    let cases = [
        (vec![3000, 2, 40], 2),
        (vec![5, 7], 1),
        (vec![1, 1], 1),
        (vec![4, 6, 3], 1),
        (vec![9, 4], 0),
        (vec![600, 7, 50], 1),
        (vec![3, 2, 5, 4], 0),
    ];
    for (shape, axis) in cases {
        agree_with(Op::Softmax { axis }, std::slice::from_ref(&shape), 0.0, true);
        agree_with(Op::Softmax { axis }, &[shape], 2e-6, false);
    }
}

/// Many small products (attention scores per sample) are split over the threads by
/// leading index; each must still equal interp.
#[test]
fn many_small_products_split_over_threads_equal_interp() {
    for (a, b, ta, tb) in [
        (vec![3000, 6, 8], vec![3000, 8, 6], false, false),
        (vec![2049, 5, 7], vec![2049, 5, 7], false, true),
        (vec![1500, 9, 4], vec![9, 3], true, false),
    ] {
        let k = if ta { a[1] } else { a[2] };
        agree(Op::MatMul { trans_a: ta, trans_b: tb }, &[a, b], 1e-5 * k as f32);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Slices along any axis, pads and permutes move the same elements as interp, exactly.
    #[test]
    fn slice_pad_permute_equal_interp(b in 1usize..40, f in 1usize..6, d in 1usize..9, axis in 0usize..3, lo in 0usize..3, perm in 0usize..6) {
        let shape = vec![b, f, d];
        let len = shape[axis] - lo.min(shape[axis] - 1);
        let start = shape[axis] - len;
        agree(Op::Slice { axis, start: Dim::lit(start as i64), len: Dim::lit(len as i64) }, std::slice::from_ref(&shape), 0.0);
        agree(Op::Pad { axis, before: Dim::lit(lo as i64), after: Dim::lit(2) }, std::slice::from_ref(&shape), 0.0);
        let perms = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        agree(Op::Permute { perm: perms[perm].to_vec() }, &[shape], 0.0);
    }
}

/// Layout kernels on inputs large enough to be split over the threads (and a rank-4 head
/// permute as attention models make), and a stop-gradient (a copy), exactly equal to
/// interp.
#[test]
fn large_layout_ops_split_over_threads_equal_interp() {
    agree(Op::Permute { perm: vec![0, 2, 1, 3] }, &[vec![2048, 10, 2, 8]], 0.0);
    agree(Op::Permute { perm: vec![0, 2, 1] }, &[vec![4096, 10, 16]], 0.0);
    agree(Op::Permute { perm: vec![0] }, &[vec![300_000]], 0.0);
    agree(Op::Slice { axis: 1, start: Dim::lit(3), len: Dim::lit(20) }, &[vec![4096, 50, 3]], 0.0);
    agree(Op::Pad { axis: 1, before: Dim::lit(4), after: Dim::lit(1) }, &[vec![4096, 30, 2]], 0.0);
    agree(Op::StopGrad, &[vec![300, 70]], 0.0);
}

/// `op(x, w_or_dy, idx)` with a group index fed as ids, on interp and on the jit (1 and 2
/// threads): equal within the GEMM tolerance, or the same error.
fn group_agree(op: Op, shapes: [Vec<usize>; 2], idx: Vec<u32>, k: usize) {
    let (mut g, mut ids, params) = with_params(&shapes, 11);
    ids.push(g.input("idx", dims(&[idx.len()]), DType::I));
    let out = g.add(op.clone(), &ids, "").unwrap();
    g.outputs.insert("out".into(), out);
    let n = idx.len();
    let feeds: HashMap<String, Value<f32>> =
        [("idx".to_string(), Value::Ids(Tensor::new(vec![n], idx).unwrap()))].into_iter().collect();
    let b = Binding::new();
    let want = Interp.run(&g, &b, &feeds, &params, &Mode::eval());
    for threads in [1, 2] {
        let got = Jit::with_threads(threads).run(&g, &b, &feeds, &params, &Mode::eval());
        match (&got, &want) {
            (Ok(got), Ok(want)) => {
                let (got, want) = (got.dense("out").unwrap(), want.dense("out").unwrap());
                assert_eq!(got.shape, want.shape);
                for (x, y) in got.data.iter().zip(&want.data) {
                    assert!((x - y).abs() <= 1e-5 * k as f32 * (1.0 + y.abs()), "{op:?}: jit {x} interp {y}");
                }
            }
            (Err(got), Err(want)) => assert_eq!(got.to_string(), want.to_string()),
            (got, want) => panic!("{op:?}: jit {got:?} vs interp {want:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Group products (rows in any order, sorted, with empty groups, transposed weights)
    /// agree with interp.
    #[test]
    fn group_products_equal_interp(rows in 1usize..300, k in 1usize..24, n in 1usize..24, groups in 1usize..6, trans_w: bool, sorted: bool, seed in 0u64..1000) {
        let mut idx: Vec<u32> = values(rows, seed, -1.0, 1.0).iter().map(|v| ((v + 1.0) * 0.5 * groups as f32) as u32 % groups as u32).collect();
        if sorted {
            idx.sort();
        }
        let w = if trans_w { vec![groups, n, k] } else { vec![groups, k, n] };
        group_agree(Op::GroupMatMul { trans_w }, [vec![rows, k], w], idx.clone(), k);
        group_agree(Op::GroupOuter { groups: Dim::lit(groups as i64) }, [vec![rows, k], vec![rows, n]], idx, rows);
    }
}

/// A group id outside the weights is the same error on the jit as on interp, and a large
/// batch (split GEMMs) still agrees.
#[test]
fn group_products_out_of_range_and_large() {
    group_agree(Op::GroupMatMul { trans_w: false }, [vec![5, 3], vec![2, 3, 4]], vec![0, 1, 2, 0, 1], 3);
    group_agree(Op::GroupOuter { groups: Dim::lit(2) }, [vec![3, 3], vec![3, 4]], vec![0, 3, 1], 3);
    let idx: Vec<u32> = (0..4096u32).map(|i| (i * 7 + i / 3) % 5).collect();
    group_agree(Op::GroupMatMul { trans_w: true }, [vec![4096, 256], vec![5, 128, 256]], idx.clone(), 256);
    group_agree(Op::GroupOuter { groups: Dim::lit(5) }, [vec![4096, 256], vec![4096, 128]], idx, 4096);
}

/// The jit's compiled optimizer updates (`training::update` through the jit's
/// `Executor::update_kernels`) leave parameters and state
/// bit-identical to the reference optimizer (`Optimizer::step`), for every rule, with and
/// without L2, on dense gradients (lengths with vector tails, large enough to split over
/// threads) and row-sparse ones (ascending rows, and rows repeated out of order), over
/// several steps, with one and two threads; a frozen parameter stays as it was.
#[test]
fn compiled_updates_equal_the_reference_optimizer() {
    use mdl_runtime::optim::{LrScale, OptimConfig, OptimKind, Optimizer};
    use mdl_runtime::ParamInfo;
    let info = common::param_info;
    let shapes: [(&str, Vec<usize>, bool); 4] = [
        ("w", vec![3, 7], false),
        ("big", vec![300, 301], false),
        ("table", vec![5000, 19], true),
        ("frozen", vec![4], false),
    ];
    let infos: Vec<ParamInfo> = shapes.iter().map(|(n, s, e)| info(n, s, *e)).collect();
    Jit::compile_update_kernels().expect("the update kernels compile");
    let rows_sets: [Vec<u32>; 2] = [(0..5000).step_by(3).collect(), vec![7, 2, 7, 4999, 0, 2, 2, 300]];
    for kind in [OptimKind::Sgd, OptimKind::adam(), OptimKind::adagrad()] {
        for l2 in [0.0, 1e-3] {
            for threads in [1, 2] {
                let mut config = OptimConfig::new(kind, 0.05);
                config.l2 = l2;
                config.embedding_lr = Some(0.1);
                let mut reference = Optimizer::<f32>::new(config.clone()).unwrap();
                let mut compiled = Optimizer::<f32>::new(config).unwrap();
                let mut params: HashMap<String, Tensor<f32>> = HashMap::new();
                for (k, (name, shape, _)) in shapes.iter().enumerate() {
                    params.insert(
                        name.to_string(),
                        Tensor::new(shape.clone(), values(shape.iter().product(), k as u64, -1.0, 1.0)).unwrap(),
                    );
                }
                let mut ours = params.clone();
                let mut jit = Jit::with_threads(threads);
                for step in 0..3u64 {
                    let mut grads: HashMap<String, Value<f32>> = HashMap::new();
                    for (k, p) in infos.iter().enumerate() {
                        let t = &params[&p.name];
                        let seed = 100 + 10 * step + k as u64;
                        let grad = if p.embedding {
                            let rows = rows_sets[step as usize % 2].clone();
                            let width = t.shape[1];
                            let vals =
                                Tensor::new(vec![rows.len(), width], values(rows.len() * width, seed, -2.0, 2.0))
                                    .unwrap();
                            Value::RowSparse { shape: t.shape.clone(), rows, values: vals }
                        } else {
                            Value::Dense(Tensor::new(t.shape.clone(), values(t.data.len(), seed, -2.0, 2.0)).unwrap())
                        };
                        grads.insert(p.name.clone(), grad);
                    }
                    let frozen = |p: &ParamInfo| p.name == "frozen";
                    reference.step(&mut params, &grads, &infos, &frozen, &LrScale::from(0.5)).unwrap();
                    mdl_runtime::training::update(
                        &mut jit,
                        &mut compiled,
                        &mut ours,
                        &grads,
                        &infos,
                        &frozen,
                        &0.5.into(),
                    )
                    .unwrap();
                    for p in &infos {
                        let (a, b) = (&params[&p.name].data, &ours[&p.name].data);
                        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{kind:?} l2 {l2} threads {threads} step {step}: `{}` differs", p.name);
                    }
                    let bits = |o: &Optimizer<f32>| -> std::collections::BTreeMap<String, Vec<u32>> {
                        o.state().into_iter().map(|(n, t)| (n, t.data.iter().map(|v| v.to_bits()).collect())).collect()
                    };
                    assert!(
                        bits(&reference) == bits(&compiled),
                        "{kind:?} l2 {l2} threads {threads} step {step}: the state differs"
                    );
                }
                assert_eq!(ours["frozen"].data, values(4, 3, -1.0, 1.0), "a frozen parameter moved");
            }
        }
    }
}

/// A large sum over rows that add into the same outputs (the fast kernels split it into two
/// partial sums) and a long row sum give the same bits on 1, 2 and 3 threads: the split
/// depends on the work, never on the thread count.
#[test]
fn fast_reductions_do_not_depend_on_the_thread_count() {
    for (shape, axes) in [(vec![8192, 8], vec![0]), (vec![1 << 20], vec![0]), (vec![64, 4096, 4], vec![0, 1])] {
        let (mut g, ids, params) = with_params(std::slice::from_ref(&shape), 11);
        let op = Op::Reduce { op: mdl_runtime::ReduceOp::Sum, axes, keep_dims: false };
        let out = g.add(op, &ids, "").unwrap();
        g.outputs.insert("out".into(), out);
        let run = |threads: usize| {
            let got =
                Jit::with_threads(threads).run(&g, &Binding::new(), &HashMap::new(), &params, &Mode::eval()).unwrap();
            got.dense("out").unwrap().data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let two = run(2);
        assert_eq!(run(1), two, "{shape:?}: 1 thread against 2");
        assert_eq!(run(3), two, "{shape:?}: 3 threads against 2");
    }
}

// ------------------------------------------------------------------ bf16 products

/// The bf16 kernels this CPU runs: the AVX-512F emulation of `vdpbf16ps` (on every
/// AVX-512 CPU), the instruction itself where the CPU has AVX512-BF16, the AMX tiles where
/// it has AMX-BF16 (all three share one packing, which the emulation tests anywhere).
fn bf16_kernels() -> Vec<Dot> {
    Dot::ALL.into_iter().filter(|d| d.available()).collect()
}

/// Checks `got` (the jit's `op(a)·op(b)` over the leading axes of `a`, `b` shared or
/// batched) against an f64 product of the same f32 operands, element by element within
/// what bf16 operands and f32 sums allow:
///
///   |got − c| ≤ ((2u + u²)(1 + γ) + γ) · Σ_l |a_il·b_lj|,   u = 2⁻⁸, γ = k·2⁻²⁴ / (1 − k·2⁻²⁴)
///
/// Each operand rounded to bf16 (8 significant bits, round to nearest) is off by at most
/// a relative u, so a product of two by at most 2u + u²; the product of two bf16 is exact
/// in f32; the k f32 additions add at most γ of the sum of magnitudes. Returns whether some
/// element is off by more than γ·Σ|a·b| alone (what f32 operands would allow): the
/// operands were rounded.
fn check_bf16_product(a: &Tensor<f32>, b: &Tensor<f32>, ta: bool, tb: bool, got: &Tensor<f32>) -> bool {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = if ta { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
    let batch = got.data.len() / (m * n).max(1);
    let (u, f32_eps) = (2f64.powi(-8), 2f64.powi(-24));
    let gamma = k as f64 * f32_eps / (1.0 - k as f64 * f32_eps);
    let bf16_factor = (2.0 * u + u * u) * (1.0 + gamma) + gamma;
    let mut rounded = false;
    for p in 0..batch {
        let a_at = |i: usize, l: usize| {
            let base = if ra > 2 { p * m * k } else { 0 };
            a.data[base + if ta { l * m + i } else { i * k + l }] as f64
        };
        let b_at = |l: usize, j: usize| {
            let base = if rb > 2 { p * k * n } else { 0 };
            b.data[base + if tb { j * k + l } else { l * n + j }] as f64
        };
        for i in 0..m {
            for j in 0..n {
                let (mut c, mut magnitude) = (0f64, 0f64);
                for l in 0..k {
                    c += a_at(i, l) * b_at(l, j);
                    magnitude += (a_at(i, l) * b_at(l, j)).abs();
                }
                let err = (got.data[p * m * n + i * n + j] as f64 - c).abs();
                assert!(
                    err <= bf16_factor * magnitude,
                    "[{m}x{k}]·[{k}x{n}] ta {ta} tb {tb}: element ({p}, {i}, {j}) is {} against {c}, off by {err:e} > {:e}",
                    got.data[p * m * n + i * n + j],
                    bf16_factor * magnitude
                );
                rounded |= err > gamma * magnitude;
            }
        }
    }
    rounded
}

/// Runs `MatMul` on the jit with bf16 products (each kernel, 1 to 3 threads) and checks
/// each result with [`check_bf16_product`]; returns whether the operands were seen rounded.
fn bf16_matmul_agrees(shapes: &[Vec<usize>; 2], ta: bool, tb: bool) -> bool {
    let (mut g, ids, params) = with_params(shapes, 13);
    let out = g.add(Op::MatMul { trans_a: ta, trans_b: tb }, &ids, "").unwrap();
    g.outputs.insert("out".into(), out);
    let mut rounded = true;
    for dot in bf16_kernels() {
        for threads in [1, 2, 3] {
            let mut jit = Jit::with_threads(threads).with_products(Products::Bf16(dot));
            let got = jit.run(&g, &Binding::new(), &HashMap::new(), &params, &Mode::eval()).unwrap();
            rounded &= check_bf16_product(&params["p0"], &params["p1"], ta, tb, got.dense("out").unwrap());
        }
    }
    rounded
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every transpose flag, odd reduction lengths, rows and columns that fill no whole
    /// micro-tile, shared and batched right operands.
    #[test]
    fn bf16_products_are_within_bf16_rounding_of_f64(m in 1usize..40, k in 1usize..70, n in 1usize..70, batch in 1usize..3, ta: bool, tb: bool, shared: bool) {
        let a2 = |r: usize, c: usize, t: bool| if t { vec![c, r] } else { vec![r, c] };
        let mut sa = vec![batch];
        sa.extend(a2(m, k, ta));
        let sb = if shared { a2(k, n, tb) } else { let mut b = vec![batch]; b.extend(a2(k, n, tb)); b };
        bf16_matmul_agrees(&[sa, sb], ta, tb);
    }
}

/// Products large enough to split over the threads (into parts that end inside a block of
/// rows, and past AMX's cache block of 256 rows), with each operand transposed, are within
/// bf16's bound, and bf16 rounding shows (errors beyond what f32 operands allow).
#[test]
fn large_bf16_products_split_over_threads_and_round_their_operands() {
    assert!(!bf16_kernels().is_empty(), "the bf16 kernel needs AVX-512F, which this CPU lacks");
    for (sa, sb, ta, tb) in [
        (vec![300, 200], vec![200, 70], false, false),
        (vec![256, 300], vec![256, 72], true, false),
        (vec![301, 129], vec![40, 129], false, true),
        (vec![600, 97], vec![97, 33], false, false),
    ] {
        assert!(bf16_matmul_agrees(&[sa.clone(), sb.clone()], ta, tb), "{sa:?}·{sb:?}: no element shows bf16 rounding");
    }
}

/// A long reduction into a small output (split along the reduction into parts, each on one
/// thread) is within bf16's bound. (Over 40 000 terms the f32 worst case exceeds what bf16's
/// rounding adds on average, so whether rounding shows is not asked.)
#[test]
fn bf16_long_reductions_split_into_parts() {
    assert!(!bf16_kernels().is_empty(), "the bf16 kernel needs AVX-512F, which this CPU lacks");
    bf16_matmul_agrees(&[vec![40_001, 24], vec![40_001, 20]], true, false);
    bf16_matmul_agrees(&[vec![24, 40_001], vec![20, 40_001]], false, true);
}

/// Vector products (one output column or row) and outer products are bound by memory, so
/// they stay f32 at bf16 precision: within bf16's bound, and no element shows rounding.
#[test]
fn bf16_vector_and_outer_products_stay_f32() {
    assert!(!bf16_kernels().is_empty(), "the bf16 kernel needs AVX-512F, which this CPU lacks");
    for (sa, sb, ta, tb) in [
        (vec![300, 200], vec![200, 1], false, false),
        (vec![200, 300], vec![1, 200], true, true),
        (vec![1, 200], vec![200, 70], false, false),
        (vec![300, 1], vec![1, 70], false, false),
    ] {
        assert!(!bf16_matmul_agrees(&[sa.clone(), sb.clone()], ta, tb), "{sa:?}·{sb:?}: bf16 rounding shows");
    }
}

/// bf16 rounding: to nearest, ties to even; infinities and NaN kept.
#[test]
fn bf16_rounds_to_nearest_even() {
    let cases = [
        (1.0f32, 1.0f32),
        (1.0 + 2f32.powi(-8), 1.0),                       // a tie: down to the even 1.0
        (1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)), // a tie: up to the even neighbour
        (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 1.0 + 2f32.powi(-7)),
        (-2.5, -2.5),
        (f32::MAX, f32::INFINITY),
        (f32::NEG_INFINITY, f32::NEG_INFINITY),
    ];
    for (x, want) in cases {
        assert_eq!(from_bf16(to_bf16(x)), want, "bf16({x})");
    }
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
}
