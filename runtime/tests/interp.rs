//! The interp backend: forward semantics of the ops on hand-computed examples, MatMul
//! against a naive reference, numerical stability, dropout masks, and errors (never panics).

mod common;

use common::*;
use mdl_runtime::backend::interp;
use mdl_runtime::{BinaryOp, DType, Dim, ExecError, Graph, Ids, Mode, Op, ReduceOp, Tensor, UnaryOp, Value};
use proptest::prelude::*;
use std::collections::HashMap;

fn t(shape: &[usize], data: &[f64]) -> Tensor<f64> {
    Tensor::new(shape.to_vec(), data.to_vec()).unwrap()
}

/// Runs `op` on dense inputs `xs` (fed as inputs `x0`, `x1`, ...) and returns the result.
fn apply(op: Op, xs: &[&Tensor<f64>]) -> Result<Value<f64>, ExecError> {
    let mut c = Case::new(0);
    let ids: Vec<_> =
        xs.iter().enumerate().map(|(i, x)| c.input_values(&format!("x{i}"), dims(&x.shape), x.data.clone())).collect();
    let y = c.add(op, &ids).expect("valid op");
    c.graph.outputs.insert("y".into(), y);
    let values = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode)?;
    Ok(values.output("y").expect("kept").clone())
}

fn dense(v: Value<f64>) -> Tensor<f64> {
    v.as_dense().expect("dense").clone()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + y.abs()))
}

#[test]
fn binary_broadcasts_numpy_style() {
    let y = dense(apply(Op::Binary(BinaryOp::Sub), &[&t(&[2, 1], &[10.0, 20.0]), &t(&[3], &[1.0, 2.0, 3.0])]).unwrap());
    assert_eq!(y.shape, vec![2, 3]);
    assert_eq!(y.data, vec![9.0, 8.0, 7.0, 19.0, 18.0, 17.0]);
    let y = dense(apply(Op::Binary(BinaryOp::Gt), &[&t(&[3], &[1.0, 5.0, 3.0]), &t(&[], &[3.0])]).unwrap());
    assert_eq!(y.data, vec![0.0, 1.0, 0.0]);
}

#[test]
fn unary_ops_are_stable_at_extremes() {
    let x = t(&[4], &[-1000.0, -1.0, 0.0, 1000.0]);
    let s = dense(apply(Op::Unary(UnaryOp::Sigmoid), &[&x]).unwrap());
    assert!(close(&s.data, &[0.0, 1.0 / (1.0 + 1f64.exp()), 0.5, 1.0]));
    let sp = dense(apply(Op::Unary(UnaryOp::Softplus), &[&x]).unwrap());
    assert!(close(&sp.data, &[0.0, (1.0 + (-1f64).exp()).ln(), 2f64.ln(), 1000.0]));
    let step = dense(apply(Op::Unary(UnaryOp::Step), &[&x]).unwrap());
    assert_eq!(step.data, vec![0.0, 0.0, 0.0, 1.0]);
    let sign = dense(apply(Op::Unary(UnaryOp::Sign), &[&x]).unwrap());
    assert_eq!(sign.data, vec![-1.0, -1.0, 0.0, 1.0]);
}

#[test]
fn softmax_subtracts_the_max() {
    let y = dense(apply(Op::Softmax { axis: 1 }, &[&t(&[2, 2], &[1000.0, 1001.0, -5.0, -5.0])]).unwrap());
    let e = 1f64.exp();
    assert!(close(&y.data, &[1.0 / (1.0 + e), e / (1.0 + e), 0.5, 0.5]));
    let y = dense(apply(Op::Softmax { axis: 0 }, &[&t(&[2, 2], &[0.0, 3.0, 0.0, 3.0])]).unwrap());
    assert!(close(&y.data, &[0.5, 0.5, 0.5, 0.5]));
}

#[test]
fn reductions() {
    let x = t(&[2, 3], &[1.0, 5.0, 3.0, -4.0, 0.0, 2.0]);
    let sum =
        |axes: Vec<usize>, keep_dims| dense(apply(Op::Reduce { op: ReduceOp::Sum, axes, keep_dims }, &[&x]).unwrap());
    assert_eq!(sum(vec![0], false).data, vec![-3.0, 5.0, 5.0]);
    assert_eq!(sum(vec![1], true).shape, vec![2, 1]);
    assert_eq!(sum(vec![0, 1], false).shape, Vec::<usize>::new());
    assert_eq!(sum(vec![], false).data, x.data);
    let mean = dense(apply(Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keep_dims: false }, &[&x]).unwrap());
    assert!(close(&mean.data, &[3.0, -2.0 / 3.0]));
    let max = dense(apply(Op::Reduce { op: ReduceOp::Max, axes: vec![0, 1], keep_dims: true }, &[&x]).unwrap());
    assert_eq!((max.shape, max.data), (vec![1, 1], vec![5.0]));
    let min = dense(apply(Op::Reduce { op: ReduceOp::Min, axes: vec![1], keep_dims: false }, &[&x]).unwrap());
    assert_eq!(min.data, vec![1.0, -4.0]);
    let with_nan = t(&[3], &[1.0, f64::NAN, -2.0]);
    let min = dense(apply(Op::Reduce { op: ReduceOp::Min, axes: vec![0], keep_dims: false }, &[&with_nan]).unwrap());
    assert!(min.data[0].is_nan(), "a NaN term makes the minimum NaN");
}

/// The new elementwise ops on the values where their definitions choose: comparisons with
/// NaN, prelu's sign switch, keep's `-0`, floor of negatives and specials, gelu's limits.
#[test]
fn comparisons_prelu_keep_floor_and_gelu() {
    let (nan, inf) = (f64::NAN, f64::INFINITY);
    let a = t(&[5], &[1.0, 2.0, nan, -3.0, 0.0]);
    let b = t(&[5], &[2.0, 2.0, nan, -4.0, -0.0]);
    let binary = |op| dense(apply(Op::Binary(op), &[&a, &b]).unwrap()).data;
    assert_eq!(binary(BinaryOp::Ge), vec![0.0, 1.0, 0.0, 1.0, 1.0]);
    assert_eq!(binary(BinaryOp::Ne), vec![1.0, 0.0, 1.0, 1.0, 0.0]);
    assert_eq!(binary(BinaryOp::Prelu)[..2], [1.0, 2.0]);
    assert_eq!(binary(BinaryOp::Prelu)[3..], [12.0, 0.0]);
    let keep = binary(BinaryOp::Keep);
    assert_eq!(keep[..2], [2.0, 2.0]);
    assert!(keep[2].is_nan() && keep[3] == -4.0);
    assert!(keep[4] == 0.0 && keep[4].is_sign_negative(), "keep gives -0 where the condition is 0");
    let x = t(&[6], &[-1.5, -0.0, 2.7, -inf, nan, 3.0]);
    let floor = dense(apply(Op::Unary(UnaryOp::Floor), &[&x]).unwrap()).data;
    assert_eq!(floor[..4], [-2.0, -0.0, 2.0, -inf]);
    assert!(floor[1].is_sign_negative() && floor[4].is_nan() && floor[5] == 3.0);
    let gelu = dense(apply(Op::Unary(UnaryOp::Gelu), &[&t(&[4], &[-inf, inf, 1.0, -1.0])]).unwrap()).data;
    let tanh_form =
        |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    assert_eq!(gelu[..2], [0.0, inf]);
    assert!(close(&gelu[2..], &[tanh_form(1.0), tanh_form(-1.0)]), "{gelu:?}");
}

/// Bucket ids: a value on a boundary opens the next bucket; -inf and NaN fall in the
/// first, +inf in the last; ids divide and take remainders as integers.
#[test]
fn bucketize_and_integer_division_of_ids() {
    let x = t(&[7], &[-5.0, 0.0, 0.999, 1.0, f64::NEG_INFINITY, f64::NAN, f64::INFINITY]);
    let op = Op::Bucketize { boundaries: vec![0.0, 1.0, 2.5] };
    let Value::Ids(b) = apply(op, &[&x]).unwrap() else { panic!("bucketize gives ids") };
    assert_eq!(b.data, vec![0, 1, 1, 2, 0, 0, 3]);
    let mut c = Case::new(0);
    let ids = c.ids_values("ids", dims(&[5]), vec![0, 3, 4, 7, 11]);
    let div = c.add(Op::IdDiv { by: 4 }, &[ids]).unwrap();
    let rem = c.add(Op::IdMod { by: 4 }, &[ids]).unwrap();
    c.graph.outputs.insert("div".into(), div);
    c.graph.outputs.insert("rem".into(), rem);
    let v = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(v.output("div").unwrap().as_ids().unwrap().data, vec![0, 0, 1, 1, 2]);
    assert_eq!(v.output("rem").unwrap().as_ids().unwrap().data, vec![0, 3, 0, 3, 3]);
}

/// The constant tensors: positions, the triangles on and off the diagonal, the identity.
#[test]
fn constant_tensors_from_sizes() {
    let constant = |op| dense(apply(op, &[]).unwrap());
    let arange = constant(Op::Arange { n: Dim::lit(4) });
    assert_eq!((arange.shape, arange.data), (vec![4], vec![0.0, 1.0, 2.0, 3.0]));
    let tril = constant(Op::Triangle { n: Dim::lit(3), upper: false, k: 0 });
    assert_eq!((tril.shape, tril.data), (vec![3, 3], vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]));
    let strictly_lower = constant(Op::Triangle { n: Dim::lit(3), upper: false, k: -1 });
    assert_eq!(strictly_lower.data, vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    let triu = constant(Op::Triangle { n: Dim::lit(3), upper: true, k: 1 });
    assert_eq!(triu.data, vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    let eye = constant(Op::Eye { n: Dim::lit(2) });
    assert_eq!(eye.data, vec![1.0, 0.0, 0.0, 1.0]);
}

#[test]
fn layout_ops() {
    let x = t(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let p = dense(apply(Op::Permute { perm: vec![1, 0] }, &[&x]).unwrap());
    assert_eq!((p.shape, p.data), (vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]));
    let s = dense(apply(Op::Slice { axis: 1, start: Dim::from(1usize), len: Dim::from(2usize) }, &[&x]).unwrap());
    assert_eq!(s.data, vec![1.0, 2.0, 4.0, 5.0]);
    let pad = dense(apply(Op::Pad { axis: 0, before: Dim::from(1usize), after: Dim::from(0usize) }, &[&x]).unwrap());
    assert_eq!(pad.data, vec![0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let c = dense(apply(Op::Concat { axis: 1 }, &[&x, &t(&[2, 1], &[9.0, 8.0])]).unwrap());
    assert_eq!(c.data, vec![0.0, 1.0, 2.0, 9.0, 3.0, 4.0, 5.0, 8.0]);
    let b = dense(
        apply(
            Op::Broadcast { shape: vec![Dim::from(2usize), Dim::from(2usize), Dim::from(3usize)] },
            &[&t(&[1, 3], &[7.0, 8.0, 9.0])],
        )
        .unwrap(),
    );
    assert_eq!(b.data, [7.0, 8.0, 9.0].repeat(4));
    let r = dense(apply(Op::Reshape { shape: dims(&[3, 2]) }, &[&x]).unwrap());
    assert_eq!(r.shape, vec![3, 2]);
}

/// `[..., m, k] @ [..., k, n]` written out index by index.
fn naive_matmul(a: &Tensor<f64>, b: &Tensor<f64>, ta: bool, tb: bool) -> Vec<f64> {
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = if ta { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
    let batches: usize = a.shape[..ra - 2].iter().product();
    let mut out = Vec::new();
    for p in 0..batches {
        let bp = if rb == 2 { 0 } else { p };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    let av = if ta { a.data[p * m * k + l * m + i] } else { a.data[p * m * k + i * k + l] };
                    let bv = if tb { b.data[bp * k * n + j * k + l] } else { b.data[bp * k * n + l * n + j] };
                    s += av * bv;
                }
                out.push(s);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn matmul_matches_the_naive_product(m in 1..=4usize, k in 1..=4usize, n in 1..=4usize,
                                        batch in prop::collection::vec(1..=3usize, 0..=2), shared in any::<bool>(),
                                        ta in any::<bool>(), tb in any::<bool>(), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let mat = |r: usize, cc: usize, tr: bool| if tr { vec![cc, r] } else { vec![r, cc] };
        let a_shape: Vec<usize> = batch.iter().copied().chain(mat(m, k, ta)).collect();
        let b_lead: &[usize] = if shared { &[] } else { &batch };
        let b_shape: Vec<usize> = b_lead.iter().copied().chain(mat(k, n, tb)).collect();
        let a = t(&a_shape, &c.uniform(a_shape.iter().product(), -1.0, 1.0));
        let b = t(&b_shape, &c.uniform(b_shape.iter().product(), -1.0, 1.0));
        let y = dense(apply(Op::MatMul { trans_a: ta, trans_b: tb }, &[&a, &b]).unwrap());
        prop_assert!(close(&y.data, &naive_matmul(&a, &b, ta, tb)));
    }
}

#[test]
fn matmul_rank_two() {
    let y = dense(
        apply(
            Op::MatMul { trans_a: false, trans_b: false },
            &[&t(&[2, 2], &[1.0, 2.0, 3.0, 4.0]), &t(&[2, 2], &[5.0, 6.0, 7.0, 8.0])],
        )
        .unwrap(),
    );
    assert_eq!(y.data, vec![19.0, 22.0, 43.0, 50.0]);
}

/// Runs a graph with one id input `ids` and the node `build` adds, returning that node's value.
fn run_with_ids(
    ids: Ids,
    build: impl FnOnce(&mut Graph, mdl_runtime::NodeId) -> mdl_runtime::NodeId,
) -> Result<Value<f64>, ExecError> {
    let mut g = Graph::new();
    let i = g.input("ids", dims(&ids.shape), DType::I);
    let y = build(&mut g, i);
    g.outputs.insert("y".into(), y);
    let feeds = HashMap::from([("ids".to_string(), Value::Ids(ids))]);
    let v = interp::run(&g, &Default::default(), &feeds, &HashMap::new(), &Mode::eval())?;
    Ok(v.output("y").unwrap().clone())
}

#[test]
fn index_ops() {
    let ids = Ids::new(vec![2, 2], vec![2, 0, 0, 1]).unwrap();
    let feeds = |ids: &Ids| {
        HashMap::from([
            ("ids".to_string(), Value::Ids(ids.clone())),
            ("table".to_string(), Value::Dense(t(&[3, 2], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))),
        ])
    };
    let mut g = Graph::new();
    let i = g.input("ids", dims(&[2, 2]), DType::I);
    let tab = g.input("table", dims(&[3, 2]), DType::F);
    let gathered = g.add(Op::Gather, &[tab, i], "").unwrap();
    let flat_ids = g.add(Op::Reshape { shape: dims(&[4]) }, &[i], "").unwrap();
    let flat_rows = g.add(Op::Reshape { shape: dims(&[4, 2]) }, &[gathered], "").unwrap();
    let seg = g.add(Op::SegmentSum { segments: Dim::from(3usize) }, &[flat_rows, flat_ids], "").unwrap();
    let sparse = g.add(Op::SparseRows { rows: Dim::from(3usize) }, &[i, gathered], "").unwrap();
    let hot = g.add(Op::OneHot { depth: Dim::from(3usize) }, &[flat_ids], "").unwrap();
    let both = g.add(Op::Concat { axis: 0 }, &[flat_ids, flat_ids], "").unwrap();
    for (name, id) in [("gathered", gathered), ("seg", seg), ("sparse", sparse), ("hot", hot), ("both", both)] {
        g.outputs.insert(name.into(), id);
    }
    let v = interp::run(&g, &Default::default(), &feeds(&ids), &HashMap::new(), &Mode::eval()).unwrap();
    assert_eq!(v.dense("gathered").unwrap().data, vec![3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
    assert_eq!(v.dense("seg").unwrap().data, vec![2.0, 2.0, 2.0, 2.0, 3.0, 3.0]);
    let Value::RowSparse { shape, rows, values } = v.output("sparse").unwrap() else { panic!("not row-sparse") };
    assert_eq!((shape.clone(), rows.clone(), values.shape.clone()), (vec![3, 2], vec![2, 0, 0, 1], vec![4, 2]));
    assert_eq!(v.output("sparse").unwrap().to_dense().unwrap().data, vec![2.0, 2.0, 2.0, 2.0, 3.0, 3.0]);
    assert_eq!(v.dense("hot").unwrap().data, vec![0., 0., 1., 1., 0., 0., 1., 0., 0., 0., 1., 0.]);
    assert_eq!(v.output("both").unwrap().as_ids().unwrap().data, vec![2, 0, 0, 1, 2, 0, 0, 1]);

    // Out of range: an error naming the op and the id.
    let bad = Ids::new(vec![2, 2], vec![2, 0, 7, 1]).unwrap();
    let err = interp::run(&g, &Default::default(), &feeds(&bad), &HashMap::new(), &Mode::eval()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("gather") && msg.contains("id 7"), "{msg}");
    let err = run_with_ids(Ids::new(vec![2], vec![0, 3]).unwrap(), |g, i| {
        g.add(Op::OneHot { depth: Dim::from(3usize) }, &[i], "").unwrap()
    })
    .unwrap_err();
    assert!(err.to_string().contains("one_hot") && err.to_string().contains("id 3"), "{err}");
}

#[test]
fn grouped_products() {
    // x [3, 2], w [2 groups, 2, 1]: group 0 sums the row, group 1 takes 10 × the first column.
    let mut c = Case::new(0);
    let x = c.input_values("x", dims(&[3, 2]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let w = c.param_values("w", dims(&[2, 2, 1]), false, vec![1.0, 1.0, 10.0, 0.0]);
    let idx = c.ids_values("idx", dims(&[3]), vec![0, 1, 0]);
    let y = c.add(Op::GroupMatMul { trans_w: false }, &[x, w, idx]).unwrap();
    let wt = c.add(Op::Permute { perm: vec![0, 2, 1] }, &[w]).unwrap();
    let yt = c.add(Op::GroupMatMul { trans_w: true }, &[x, wt, idx]).unwrap();
    let dy = c.input_values("dy", dims(&[3, 1]), vec![1.0, 1.0, 2.0]);
    let outer = c.add(Op::GroupOuter { groups: Dim::from(2usize) }, &[x, dy, idx]).unwrap();
    for (n, id) in [("y", y), ("yt", yt), ("outer", outer)] {
        c.graph.outputs.insert(n.into(), id);
    }
    let v = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(v.dense("y").unwrap().data, vec![3.0, 30.0, 11.0]);
    assert_eq!(v.dense("yt").unwrap().data, vec![3.0, 30.0, 11.0]);
    // group 0: rows 0 and 2 (dy 1 and 2) → [1+10, 2+12]; group 1: row 1 → [3, 4]
    assert_eq!(v.dense("outer").unwrap().data, vec![11.0, 14.0, 3.0, 4.0]);

    c.feeds.insert("idx".into(), Value::Ids(Ids::new(vec![3], vec![0, 2, 0]).unwrap()));
    let err = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap_err().to_string();
    assert!(err.contains("group_matmul") && err.contains("id 2"), "{err}");
}

#[test]
fn dropout_masks_are_seeded_and_scaled() {
    let mut c = Case::new(0);
    let x = c.input_values("x", dims(&[100, 100]), vec![0.0; 10_000]);
    let m1 = c.add(Op::DropMask { p: 0.3, stream: 1 }, &[x]).unwrap();
    let m2 = c.add(Op::DropMask { p: 0.3, stream: 2 }, &[x]).unwrap();
    c.graph.outputs.insert("m1".into(), m1);
    c.graph.outputs.insert("m2".into(), m2);
    let run = |mode: Mode| interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &mode).unwrap();
    let eval = run(Mode::eval());
    assert!(eval.dense("m1").unwrap().data.iter().all(|&v| v == 1.0));
    let a = run(Mode::train(42, 7));
    let b = run(Mode::train(42, 7));
    let next_step = run(Mode::train(42, 8));
    let m = &a.dense("m1").unwrap().data;
    assert_eq!(m, &b.dense("m1").unwrap().data);
    assert_ne!(m, &next_step.dense("m1").unwrap().data);
    assert_ne!(m, &a.dense("m2").unwrap().data);
    let keep = 1.0 / 0.7;
    assert!(m.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-12));
    let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
    assert!((dropped - 0.3).abs() < 0.03, "dropped fraction {dropped}");
}

#[test]
fn feeds_and_params_are_checked() {
    let mut g = Graph::new();
    let x = g.input("x", vec![Dim::batch(), Dim::from(3usize)], DType::F);
    let w = g.param("w", dims(&[3, 2]), mdl_runtime::Init::Zeros, None, false);
    let y = g.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w], "").unwrap();
    g.outputs.insert("y".into(), y);
    let binding = mdl_runtime::Binding::from([("B".to_string(), 4)]);
    let params = HashMap::from([("w".to_string(), Tensor::<f32>::zeros(vec![3, 2]))]);
    let run = |feeds: &HashMap<String, Value<f32>>,
               params: &HashMap<String, Tensor<f32>>,
               binding: &mdl_runtime::Binding| { interp::run(&g, binding, feeds, params, &Mode::eval()) };

    let good = HashMap::from([("x".to_string(), Value::Dense(Tensor::<f32>::zeros(vec![4, 3])))]);
    assert_eq!(run(&good, &params, &binding).unwrap().dense("y").unwrap().shape, vec![4, 2]);

    let err = run(&HashMap::new(), &params, &binding).unwrap_err();
    assert_eq!(err, ExecError::MissingFeed { name: "x".into() });
    let wrong = HashMap::from([("x".to_string(), Value::Dense(Tensor::<f32>::zeros(vec![5, 3])))]);
    let msg = run(&wrong, &params, &binding).unwrap_err().to_string();
    assert!(msg.contains("`x`") && msg.contains("[5, 3]") && msg.contains("[B, 3]") && msg.contains("[4, 3]"), "{msg}");
    let short = HashMap::from([("x".to_string(), Value::Dense(Tensor { shape: vec![4, 3], data: vec![0.0f32; 11] }))]);
    assert!(matches!(run(&short, &params, &binding).unwrap_err(), ExecError::Malformed { len: 11, .. }));
    let ids = HashMap::from([("x".to_string(), Value::Ids(Ids::new(vec![4, 3], vec![0; 12]).unwrap()))]);
    assert!(matches!(run(&ids, &params, &binding).unwrap_err(), ExecError::KindMismatch { .. }));
    assert_eq!(run(&good, &HashMap::new(), &binding).unwrap_err(), ExecError::MissingParam { name: "w".into() });
    let bad_w = HashMap::from([("w".to_string(), Tensor::<f32>::zeros(vec![2, 3]))]);
    assert!(run(&good, &bad_w, &binding).unwrap_err().to_string().contains("parameter `w`"));
    let msg = run(&good, &params, &Default::default()).unwrap_err().to_string();
    assert!(msg.contains("no value for size `B`"), "{msg}");
}

#[test]
fn run_keeps_outputs_and_run_keep_all_keeps_everything() {
    let mut c = Case::new(3);
    let x = c.input_values("x", dims(&[2]), vec![1.0, 2.0]);
    let e = c.add(Op::Unary(UnaryOp::Exp), &[x]).unwrap();
    let y = c.add(Op::Unary(UnaryOp::Neg), &[e]).unwrap();
    c.graph.outputs.insert("y".into(), y);
    let v = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert!(v.node(e).is_none() && v.node(y).is_some());
    let all = interp::run_keep_all(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert!(all.node(e).is_some() && all.node(x).is_some());
    assert_eq!(all.output_names().collect::<Vec<_>>(), vec!["y"]);
}

/// The operand kinds are checked by each family's shape rule (not by `Op::infer` before
/// it): the ops that read only dense reals refuse ids and row-sparse gradients with these
/// messages, while layout and index ops take ids where they move or read them.
#[test]
fn shape_rules_check_operand_kinds() {
    use mdl_runtime::ops::{Operand, ValueKind};
    let shape = [Dim::lit(2), Dim::lit(3)];
    let ids = Operand { shape: &shape, dtype: DType::I, kind: ValueKind::Dense };
    let sparse = Operand { shape: &shape, dtype: DType::F, kind: ValueKind::RowSparse };
    let real = Operand { shape: &shape, dtype: DType::F, kind: ValueKind::Dense };
    let kernel = mdl_runtime::ops::fused::FusedKernel {
        inputs: 1,
        body: vec![mdl_runtime::ops::fused::Instr::Input(0)],
        reduce: None,
    };
    let dense_real_only = [
        Op::StopGrad,
        Op::Unary(UnaryOp::Exp),
        Op::Binary(BinaryOp::Add),
        Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: false },
        Op::Softmax { axis: 1 },
        Op::MatMul { trans_a: false, trans_b: true },
        Op::Fused(std::sync::Arc::new(kernel)),
    ];
    for op in dense_real_only {
        let n = op.arity().unwrap_or(1);
        let name = op.name();
        assert_eq!(op.infer(&vec![ids; n]).unwrap_err().0, format!("{name} needs real-valued operands, got ids"));
        assert_eq!(op.infer(&vec![sparse; n]).unwrap_err().0, format!("{name} cannot read a row-sparse gradient"));
        assert!(op.infer(&vec![real; n]).is_ok(), "{name}");
    }
    assert!(Op::Reshape { shape: vec![Dim::lit(6)] }.infer(&[ids]).is_ok());
    assert!(Op::OneHot { depth: Dim::lit(4) }.infer(&[ids]).is_ok());
    assert!(Op::Gather.infer(&[real, ids]).is_ok());
}
