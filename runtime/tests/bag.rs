//! Embedding bags on the jit (`backend/jit/bag.rs`) against the unfused graph on interp.
//!
//! The graph is what the language lowers `pool(E[hist], hist)` to — `Gather`, a mask
//! reshaped to `[.., L, 1]`, `Mul`, `Reduce` sum or mean over the sequence axis — with
//! the table also gathered by plain ids (so its gradient is a concat of a plain part and a
//! masked part), and a second, width-1 table used only through a bag. Masks have zeros at
//! random positions (whole sequences too), and the padded positions hold id 0, which no
//! real position uses, so row 0 is named only by padding.
//!
//! - Forward: the pooled values equal interp's exactly (same products, same summation
//!   order).
//! - Backward: the jit drops the exactly-zero entries of masked positions and combines
//!   duplicate rows, so its row-sparse gradients are shorter (and ascending), but they
//!   name exactly the same rows (row 0 included), densify to the same values (within
//!   1e-6 of the largest: with fast kernels a large gradient's entries are split between
//!   the threads and summed in two parts), and one lazy Adam step from either gives the
//!   same tables.

mod common;
use common::dims;
use mdl_runtime::backend::{jit::Jit, Executor, Interp};
use mdl_runtime::optim::{LrScale, OptimConfig, OptimKind, Optimizer};
use mdl_runtime::{differentiate, BinaryOp, Binding, DType, Graph, Init, Mode, Op, ReduceOp, Tensor, Value};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// `pool(table[ids], mask)` as the language lowers it: `[B, S, D]` (or `[B, S, 1, D]` kept).
fn pool(
    g: &mut Graph,
    table: mdl_runtime::NodeId,
    ids: mdl_runtime::NodeId,
    mask: mdl_runtime::NodeId,
    shape: [usize; 3],
    mean: bool,
    keep: bool,
) -> mdl_runtime::NodeId {
    let [b, s, l] = shape;
    let rows = g.add(Op::Gather, &[table, ids], "bag").unwrap();
    let m = g.add(Op::Reshape { shape: dims(&[b, s, l, 1]) }, &[mask], "bag").unwrap();
    let prod = g.add(Op::Binary(BinaryOp::Mul), &[rows, m], "bag").unwrap();
    let op = if mean { ReduceOp::Mean } else { ReduceOp::Sum };
    g.add(Op::Reduce { op, axes: vec![2], keep_dims: keep }, &[prod], "bag").unwrap()
}

/// `sum(x * R)` for a fixed random `R` fed as input `name`.
fn weigh(
    g: &mut Graph,
    x: mdl_runtime::NodeId,
    name: &str,
    feeds: &mut HashMap<String, Value<f32>>,
    rng: &mut Rng,
) -> mdl_runtime::NodeId {
    let shape: Vec<usize> = g.shape(x).iter().map(|d| d.as_const().unwrap() as usize).collect();
    let r = g.input(name, dims(&shape), DType::F);
    let data = (0..shape.iter().product::<usize>()).map(|_| rng.unit()).collect();
    feeds.insert(name.into(), Value::Dense(Tensor::new(shape.clone(), data).unwrap()));
    let prod = g.add(Op::Binary(BinaryOp::Mul), &[x, r], "loss").unwrap();
    g.add(Op::Reduce { op: ReduceOp::Sum, axes: (0..shape.len()).collect(), keep_dims: false }, &[prod], "loss")
        .unwrap()
}

fn distinct_rows(v: &Value<f32>) -> BTreeSet<u32> {
    match v {
        Value::RowSparse { rows, .. } => rows.iter().copied().collect(),
        other => panic!("expected a row-sparse gradient, got {}", other.kind_name()),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    b: usize,
    s: usize,
    l: usize,
    d: usize,
    fields: usize,
    vocab: u32,
    mean: bool,
    keep: bool,
    fill: u64,
    seed: u64,
    exact: bool,
) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut g = Graph::new();
    let mut feeds: HashMap<String, Value<f32>> = HashMap::new();
    let table = g.param("E", dims(&[vocab as usize, d]), Init::Zeros, None, true);
    let tags = g.param("W", dims(&[vocab as usize, 1]), Init::Zeros, None, true);
    let hist = g.input("hist", dims(&[b, s, l]), DType::I);
    let mask = g.input("mask", dims(&[b, s, l]), DType::F);
    let field_ids = g.input("fields", dims(&[b, fields]), DType::I);
    // Padded positions: mask 0 and id 0; real ones: mask 1 (or a weight) and ids >= 1.
    let mut hist_ids = Vec::new();
    let mut mask_data = Vec::new();
    for _ in 0..b * s {
        let full = rng.next().is_multiple_of(4);
        for _ in 0..l {
            let real = !full && rng.next() % 100 < fill;
            hist_ids.push(if real { 1 + (rng.next() % (vocab as u64 - 1)) as u32 } else { 0 });
            mask_data.push(if real {
                if rng.next().is_multiple_of(3) {
                    0.5
                } else {
                    1.0
                }
            } else {
                0.0
            });
        }
    }
    feeds.insert("hist".into(), Value::Ids(Tensor::new(vec![b, s, l], hist_ids).unwrap()));
    feeds.insert("mask".into(), Value::Dense(Tensor::new(vec![b, s, l], mask_data).unwrap()));
    let fid = (0..b * fields).map(|_| 1 + (rng.next() % (vocab as u64 - 1)) as u32).collect();
    feeds.insert("fields".into(), Value::Ids(Tensor::new(vec![b, fields], fid).unwrap()));

    let pooled = pool(&mut g, table, hist, mask, [b, s, l], mean, keep);
    let pooled_w = pool(&mut g, tags, hist, mask, [b, s, l], !mean, false);
    let plain = g.add(Op::Gather, &[table, field_ids], "plain").unwrap();
    let a = weigh(&mut g, pooled, "R1", &mut feeds, &mut rng);
    let c = weigh(&mut g, pooled_w, "R2", &mut feeds, &mut rng);
    let e = weigh(&mut g, plain, "R3", &mut feeds, &mut rng);
    let ac = g.add(Op::Binary(BinaryOp::Add), &[a, c], "loss").unwrap();
    let loss = g.add(Op::Binary(BinaryOp::Add), &[ac, e], "loss").unwrap();
    g.outputs.insert("loss".into(), loss);
    g.outputs.insert("pooled".into(), pooled);

    let mut params = HashMap::new();
    params.insert(
        "E".to_string(),
        Tensor::new(vec![vocab as usize, d], (0..vocab as usize * d).map(|_| rng.unit()).collect()).unwrap(),
    );
    params.insert(
        "W".to_string(),
        Tensor::new(vec![vocab as usize, 1], (0..vocab as usize).map(|_| rng.unit()).collect()).unwrap(),
    );
    let bind = Binding::new();
    let mode = Mode::train(1, 1);

    // Forward: the eval graph (pooled is an output, the gathers are not).
    let want = Interp.run(&g, &bind, &feeds, &params, &mode).unwrap();
    let got = Jit::with_threads(2).with_exact_kernels(true).run(&g, &bind, &feeds, &params, &mode).unwrap();
    assert_eq!(got.dense("pooled"), want.dense("pooled"), "pooled values");

    // Backward.
    let train = differentiate(&g, loss, &["E".into(), "W".into()]).unwrap();
    let want = Interp.run(&train, &bind, &feeds, &params, &mode).unwrap();
    let mut jit = Jit::with_threads(2).with_exact_kernels(exact);
    jit.set_profiling(true);
    let got = jit.run(&train, &bind, &feeds, &params, &mode).unwrap();
    // No bit of the result depends on the thread count: where the fast kernels form
    // partial sums, the split is fixed by the work, and one thread runs both halves.
    let one = Jit::with_threads(1).with_exact_kernels(exact).run(&train, &bind, &feeds, &params, &mode).unwrap();
    for key in ["loss", "grad/E", "grad/W"] {
        assert_eq!(one.output(key), got.output(key), "{key}: 1 thread against 2");
    }
    let calls: HashMap<String, usize> = jit.profile().into_iter().map(|p| (p.0, p.2)).collect();
    let count = |k: &str| calls.get(k).copied().unwrap_or(0);
    // Two bags; the one gather left is the plain lookup. E's gradient (a plain part and a
    // bag part) is always built directly; W's (one bag part) when fusion leaves its product
    // a plain `dy * mask` (a mean may fold its division into the product kernel).
    assert_eq!((count("embedding_bag"), count("gather"), count("concat")), (2, 1, 0), "{calls:?}");
    assert!(count("sparse_rows(bag)") >= 1, "{calls:?}");
    let (wl, gl) = (want.scalar("loss").unwrap(), got.scalar("loss").unwrap());
    // Fast kernels reassociate the loss's sums (up to 10⁶ terms). On the large case
    // interp's ordered f32 sum is 3e-4 (relative) from the f64 loss, the jit's 3e-5.
    let tol = if exact { 1e-5 } else { 1e-3 };
    assert!((wl - gl).abs() <= tol * (1.0 + wl.abs()), "loss {gl} vs {wl}");
    let mut grads = [HashMap::new(), HashMap::new()];
    for name in ["E", "W"] {
        let key = format!("grad/{name}");
        let (w, j) = (want.output(&key).unwrap(), got.output(&key).unwrap());
        assert_eq!(distinct_rows(j), distinct_rows(w), "{key}: the rows named");
        let entries = |v: &Value<f32>| if let Value::RowSparse { rows, .. } = v { rows.clone() } else { Vec::new() };
        assert!(entries(j).len() <= entries(w).len(), "{key}: the jit's gradient has no more entries than interp's");
        if count("sparse_rows(bag)") == 2 || name == "E" {
            assert!(
                entries(j).windows(2).all(|p| p[0] < p[1]),
                "{key}: a gradient built from a bag comes out combined"
            );
        }
        let (wd, jd) = (w.to_dense().unwrap(), j.to_dense().unwrap());
        let scale = wd.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (x, y) in jd.data.iter().zip(&wd.data) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + scale), "{key}: jit {x} interp {y}");
        }
        grads[0].insert(name.to_string(), w.clone());
        grads[1].insert(name.to_string(), j.clone());
    }
    // One lazy Adam step from each gradient moves the same rows the same way.
    let info = train.params.clone();
    let mut after = Vec::new();
    for g in &grads {
        let mut p = params.clone();
        let mut opt = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adam(), 1e-2)).unwrap();
        opt.step(&mut p, g, &info, &|_| false, &LrScale::from(1.0)).unwrap();
        after.push(p);
    }
    for name in ["E", "W"] {
        for (x, y) in after[1][name].data.iter().zip(&after[0][name].data) {
            assert!((x - y).abs() <= 1e-6, "{name} after one Adam step: jit {x} interp {y}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn bags_agree_with_the_unfused_graph(
        b in 1usize..40, s in 1usize..4, l in 1usize..12, d in 1usize..20, fields in 1usize..4,
        vocab in 3u32..60, mean: bool, keep: bool, fill in 0u64..100, seed: u64, exact: bool,
    ) {
        check(b, s, l, d, fields, vocab, mean, keep, fill, seed, exact);
    }
}

#[test]
fn a_large_bag_splits_over_threads_and_agrees() {
    // Exact kernels: the threads split the table's rows. Fast ones: they split the
    // entries, each into its own accumulator, and the partial sums are added.
    for exact in [true, false] {
        check(600, 2, 50, 16, 5, 5000, false, false, 30, 7, exact);
    }
}

#[test]
fn a_table_much_larger_than_the_batch_is_combined_from_a_scratch_buffer() {
    // 70 000 rows against at most 30 entries: the jit sorts the entries instead of
    // accumulating into a table-sized buffer.
    check(3, 2, 4, 5, 2, 70_000, false, true, 40, 3, true);
    check(3, 2, 4, 1, 2, 70_000, true, false, 60, 4, false);
}

#[test]
fn an_id_out_of_range_in_a_bag_is_an_error_as_in_interp() {
    let mut g = Graph::new();
    let table = g.param("E", dims(&[4, 2]), Init::Zeros, None, true);
    let ids = g.input("ids", dims(&[1, 1, 3]), DType::I);
    let mask = g.input("mask", dims(&[1, 1, 3]), DType::F);
    let pooled = pool(&mut g, table, ids, mask, [1, 1, 3], false, false);
    g.outputs.insert("pooled".into(), pooled);
    let feeds: HashMap<String, Value<f32>> = [
        ("ids".to_string(), Value::Ids(Tensor::new(vec![1, 1, 3], vec![0, 9, 1]).unwrap())),
        ("mask".to_string(), Value::Dense(Tensor::new(vec![1, 1, 3], vec![1.0, 0.0, 1.0]).unwrap())),
    ]
    .into_iter()
    .collect();
    let params: HashMap<String, Tensor<f32>> = [("E".to_string(), Tensor::zeros(vec![4, 2]))].into_iter().collect();
    let bind = Binding::new();
    let want = Interp.run(&g, &bind, &feeds, &params, &Mode::eval()).unwrap_err().to_string();
    let got = Jit::with_threads(1).run(&g, &bind, &feeds, &params, &Mode::eval()).unwrap_err().to_string();
    assert!(want.contains("id 9 is out of range") && got.contains("id 9 is out of range"), "{want} / {got}");
}
