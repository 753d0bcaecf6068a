//! Gradient checks: for every primitive op, a property (proptest, f64, random small shapes
//! and values) that the autodiff gradient of `loss = sum(op(inputs) * R)` (R fixed and
//! random) equals the central finite difference (h = 1e-6) for every input, taken as a
//! parameter: `|autodiff - numeric| <= 1e-6 + 1e-5 * |numeric|`.
//!
//! Kinks (relu, abs, prelu, max/min, reduce-max/min, step, sign, floor): as in Caffe's gradient checker, no
//! finite difference may straddle a kink; here the values are *drawn* away from it rather
//! than skipped: |x| >= 0.1 for relu/abs/step/sign, operands of max/min on disjoint
//! half-integer and integer grids (|a - b| >= 0.3), prelu's input on the half-integer grid
//! (|x| >= 0.3), floor's on it too (0.3 from an integer), keep's condition 0 or on that
//! grid, reduce-max and -min inputs at least 0.08 apart.
//! Poles and domain edges likewise: log/sqrt inputs in [0.5, 2), divisors and recip
//! inputs with |x| in [0.5, 2).

mod common;

use common::*;
use mdl_runtime::ops::{self, index::has_row_sparse_grad};
use mdl_runtime::{BinaryOp, Dim, Mode, NodeId, Op, ReduceOp, Shape, UnaryOp};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() }
}

fn sizes(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, 1..=max_rank)
}

fn fail(what: impl std::fmt::Display) -> impl FnOnce(String) -> TestCaseError {
    let what = what.to_string();
    move |e| TestCaseError::fail(format!("{what}: {e}"))
}

/// `sizes` with the axes where `ones` is set shrunk to 1 and the first `drop` axes removed:
/// an operand that broadcasts to `sizes`.
fn broadcastable(sizes: &[usize], ones: &[bool], drop: usize) -> Vec<usize> {
    sizes.iter().zip(ones).skip(drop).map(|(&s, &one)| if one { 1 } else { s }).collect()
}

fn broadcast_case() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, u64)> {
    sizes(3, 3).prop_flat_map(|s| {
        let r = s.len();
        (
            Just(s),
            prop::collection::vec(any::<bool>(), r),
            0..=r,
            prop::collection::vec(any::<bool>(), r),
            0..=r,
            any::<u64>(),
        )
            .prop_map(|(s, oa, da, ob, db, seed)| (broadcastable(&s, &oa, da), broadcastable(&s, &ob, db), seed))
    })
}

/// `n` values of `k + 0.5 ± 0.1` (`half`) or `k ± 0.1`, with `k` an integer in [-2, 1]:
/// a value from one grid is at least 0.3 from any value of the other.
fn grid(c: &mut Case, n: usize, half: bool) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let k = (c.rng.next_u64() % 4) as f64 - 2.0;
            k + if half { 0.5 } else { 0.0 } + 0.2 * (c.rng.next_f64() - 0.5)
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary(s in sizes(3, 3), seed in any::<u64>()) {
        use UnaryOp::*;
        for &u in UnaryOp::ALL.iter().filter(|u| u.is_differentiable()) {
            let mut c = Case::new(seed);
            c.bind("B", s[0]);
            let shape = batch_dims(&s);
            let n = c.numel(&shape);
            let data = match u {
                Log | Sqrt => c.uniform(n, 0.5, 2.0),
                Recip => c.away_from_zero(n, 0.5, 2.0),
                Relu | Abs => c.away_from_zero(n, 0.1, 2.0),
                _ => c.uniform(n, -2.0, 2.0),
            };
            let x = c.param_values("x", shape, false, data);
            let y = c.add(Op::Unary(u), &[x]).unwrap();
            c.check(y).map_err(fail(format!("{u:?}")))?;
        }
    }

    #[test]
    fn binary_with_broadcasting((sa, sb, seed) in broadcast_case()) {
        use BinaryOp::*;
        for &b in BinaryOp::ALL.iter().filter(|b| b.is_differentiable()) {
            let mut c = Case::new(seed);
            let (na, nb) = (sa.iter().product(), sb.iter().product());
            let (da, db) = match b {
                Div => (c.uniform(na, -2.0, 2.0), c.away_from_zero(nb, 0.5, 2.0)),
                Max | Min => (grid(&mut c, na, true), grid(&mut c, nb, false)),
                // The kink of prelu away from zero; keep's condition exactly zero (the
                // gradient to `b` stops) or away from zero.
                Prelu => (grid(&mut c, na, true), c.uniform(nb, -2.0, 2.0)),
                Keep => {
                    let cond = grid(&mut c, na, true).iter().enumerate().map(|(i, &v)| if i % 2 == 0 { 0.0 } else { v }).collect();
                    (cond, c.uniform(nb, -2.0, 2.0))
                }
                _ => (c.uniform(na, -2.0, 2.0), c.uniform(nb, -2.0, 2.0)),
            };
            let x = c.param_values("a", dims(&sa), false, da);
            let w = c.param_values("b", dims(&sb), false, db);
            let y = c.add(Op::Binary(b), &[x, w]).unwrap();
            c.check(y).map_err(fail(format!("{b:?} {sa:?} {sb:?}")))?;
        }
    }

    /// The ops that are not differentiable (step, sign, floor, the comparisons) next to a
    /// smooth path: their
    /// finite difference is zero away from the kink, and autodiff must add nothing for them.
    #[test]
    fn zero_gradient_ops_add_nothing(s in sizes(3, 3), seed in any::<u64>()) {
        let unary = UnaryOp::ALL.iter().filter(|u| !u.is_differentiable()).map(|&u| (Op::Unary(u), 1));
        let binary = BinaryOp::ALL.iter().filter(|b| !b.is_differentiable()).map(|&b| (Op::Binary(b), 2));
        for (op, arity) in unary.chain(binary) {
            let name = op.name();
            let mut c = Case::new(seed);
            let n = s.iter().product();
            let (dx, dw) = (grid(&mut c, n, true), grid(&mut c, n, false));
            let x = c.param_values("x", dims(&s), false, dx);
            let w = c.param_values("w", dims(&s), false, dw);
            let z = c.add(op, &[x, w][..arity]).unwrap();
            let y = c.add(Op::Binary(BinaryOp::Add), &[x, z]).unwrap();
            c.check(y).map_err(fail(name))?;
        }
    }

    #[test]
    fn reshape(s in sizes(3, 3), variant in 0..3usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&s));
        let target: Vec<usize> = match variant {
            0 => vec![s.iter().product()],
            1 => s.iter().rev().copied().collect(),
            _ => [1].iter().chain(&s).chain(&[1]).copied().collect(),
        };
        let y = c.add(Op::Reshape { shape: dims(&target) }, &[x]).unwrap();
        c.check(y).map_err(fail("reshape"))?;
    }

    #[test]
    fn permute((s, perm) in sizes(4, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), Just((0..r).collect::<Vec<_>>()).prop_shuffle()) }),
               seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&s));
        let y = c.add(Op::Permute { perm }, &[x]).unwrap();
        c.check(y).map_err(fail("permute"))?;
    }

    #[test]
    fn broadcast((target, src) in sizes(3, 3).prop_flat_map(|s| { let r = s.len();
        (Just(s), prop::collection::vec(any::<bool>(), r), 0..=r).prop_map(|(s, ones, drop)| { let b = broadcastable(&s, &ones, drop); (s, b) }) }),
        seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&src));
        let y = c.add(Op::Broadcast { shape: dims(&target) }, &[x]).unwrap();
        c.check(y).map_err(fail(format!("broadcast {src:?} to {target:?}")))?;
    }

    #[test]
    fn concat((s, axis) in sizes(3, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
              lens in prop::collection::vec(1..=3usize, 1..=3), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let parts: Vec<_> = lens.iter().enumerate().map(|(i, &len)| {
            let mut si = s.clone();
            si[axis] = len;
            c.param(&format!("x{i}"), dims(&si))
        }).collect();
        let y = c.add(Op::Concat { axis }, &parts).unwrap();
        c.check(y).map_err(fail("concat"))?;
    }

    #[test]
    fn slice((s, axis, start, len) in sizes(3, 4).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) })
                 .prop_flat_map(|(s, axis)| { let size = s[axis]; (Just(s), Just(axis), 0..size) })
                 .prop_flat_map(|(s, axis, start)| { let rest = s[axis] - start; (Just(s), Just(axis), Just(start), 1..=rest) }),
             seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&s));
        let y = c.add(Op::Slice { axis, start: Dim::from(start), len: Dim::from(len) }, &[x]).unwrap();
        c.check(y).map_err(fail("slice"))?;
    }

    #[test]
    fn pad((s, axis) in sizes(3, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
           before in 0..=2usize, after in 0..=2usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&s));
        let y = c.add(Op::Pad { axis, before: Dim::from(before), after: Dim::from(after) }, &[x]).unwrap();
        c.check(y).map_err(fail("pad"))?;
    }

    /// Sum, mean, max and min over any subset of axes; the first axis is the batch symbol, so a
    /// mean over it divides by a count known only at run time.
    #[test]
    fn reduce((s, which) in sizes(3, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), prop::collection::vec(any::<bool>(), r)) }),
              keep_dims in any::<bool>(), seed in any::<u64>()) {
        let axes: Vec<usize> = which.iter().enumerate().filter(|(_, &w)| w).map(|(i, _)| i).collect();
        for &op in ReduceOp::ALL {
            let mut c = Case::new(seed);
            c.bind("B", s[0]);
            let shape = batch_dims(&s);
            let n = c.numel(&shape);
            let data = if op.adds() { c.uniform(n, -2.0, 2.0) } else { c.distinct(n) };
            let x = c.param_values("x", shape, false, data);
            let y = c.add(Op::Reduce { op, axes: axes.clone(), keep_dims }, &[x]).unwrap();
            c.check(y).map_err(fail(format!("{op:?} over {axes:?}")))?;
        }
    }

    #[test]
    fn softmax((s, axis) in sizes(3, 4).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.bind("B", s[0]);
        let x = c.param("x", batch_dims(&s));
        let y = c.add(Op::Softmax { axis }, &[x]).unwrap();
        c.check(y).map_err(fail("softmax"))?;
    }

    /// Rank 2, batched (equal leading axes) and shared right operand, with every
    /// combination of the trans flags.
    #[test]
    fn matmul(m in 1..=3usize, k in 1..=3usize, n in 1..=3usize, batch in prop::collection::vec(1..=3usize, 0..=2),
              shared in any::<bool>(), seed in any::<u64>()) {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = Case::new(seed);
            let mat = |rows: usize, cols: usize, t: bool| if t { vec![cols, rows] } else { vec![rows, cols] };
            let a_shape: Vec<usize> = batch.iter().copied().chain(mat(m, k, trans_a)).collect();
            let b_lead: &[usize] = if shared { &[] } else { &batch };
            let b_shape: Vec<usize> = b_lead.iter().copied().chain(mat(k, n, trans_b)).collect();
            let a = c.param("a", dims(&a_shape));
            let b = c.param("b", dims(&b_shape));
            let y = c.add(Op::MatMul { trans_a, trans_b }, &[a, b]).unwrap();
            c.check(y).map_err(fail(format!("matmul {a_shape:?}{} @ {b_shape:?}{}", if trans_a { "ᵀ" } else { "" }, if trans_b { "ᵀ" } else { "" })))?;
        }
    }

    /// Leading axes that broadcast numpy-style (each operand's drawn from one shape, some
    /// axes shrunk to 1 and some leading ones dropped: `[B, h, n, k] @ [h, k, m]`), with
    /// every combination of the trans flags: the gradient is summed over the axes an
    /// operand was repeated along.
    #[test]
    fn matmul_broadcast((la, lb, seed) in broadcast_case(), m in 1..=3usize, k in 1..=3usize, n in 1..=2usize) {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = Case::new(seed);
            let mat = |rows: usize, cols: usize, t: bool| if t { vec![cols, rows] } else { vec![rows, cols] };
            let a_shape: Vec<usize> = la.iter().copied().chain(mat(m, k, trans_a)).collect();
            let b_shape: Vec<usize> = lb.iter().copied().chain(mat(k, n, trans_b)).collect();
            let a = c.param("a", dims(&a_shape));
            let b = c.param("b", dims(&b_shape));
            let y = c.add(Op::MatMul { trans_a, trans_b }, &[a, b]).unwrap();
            c.check(y).map_err(fail(format!("matmul {a_shape:?} aT={trans_a} @ {b_shape:?} bT={trans_b}")))?;
        }
    }

    /// TakeAlong from a parameter along any axis, ids with repeats (their cotangents add up
    /// at one position) and of size 1 on some other axes (one id for every index there).
    #[test]
    fn take_along((s, axis, ones) in sizes(3, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r, prop::collection::vec(any::<bool>(), r)) }),
                  m in 1..=4usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&s));
        let mut id_shape = broadcastable(&s, &ones, 0);
        id_shape[axis] = m;
        let ids = c.ids("idx", dims(&id_shape), s[axis] as u32);
        let y = c.add(Op::TakeAlong { axis }, &[x, ids]).unwrap();
        c.check(y).map_err(fail(format!("take_along {s:?} axis {axis} ids {id_shape:?}")))?;
    }

    /// ScatterAdd of a parameter (the adjoint's own gradient is a TakeAlong).
    #[test]
    fn scatter_add((s, axis, ones) in sizes(3, 3).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r, prop::collection::vec(any::<bool>(), r)) }),
                   size in 1..=4usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let src = c.param("src", dims(&s));
        let mut id_shape = broadcastable(&s, &ones, 0);
        id_shape[axis] = s[axis];
        let ids = c.ids("idx", dims(&id_shape), size as u32);
        let y = c.add(Op::ScatterAdd { axis, size: Dim::from(size) }, &[src, ids]).unwrap();
        c.check(y).map_err(fail(format!("scatter_add {s:?} axis {axis} ids {id_shape:?} size {size}")))?;
    }

    /// The values of TopK (`TakeAlong(x, TopK(x))`, as `top_k`, `sort`, `argmax` build them):
    /// the gradient reaches exactly the selected positions. Values at least 0.08 apart, so
    /// no finite difference reorders them.
    #[test]
    fn top_k_values((s, axis) in sizes(3, 4).prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
                    k_frac in 0.0..1.0f64, largest in any::<bool>(), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let k = 1 + ((s[axis] as f64 * k_frac) as usize).min(s[axis] - 1);
        let data = c.distinct(s.iter().product());
        let x = c.param_values("x", dims(&s), false, data);
        let top = c.add(Op::TopK { axis, k: Dim::from(k), largest }, &[x]).unwrap();
        prop_assert!(c.graph.node(top).op.is_nondifferentiable());
        let y = c.add(Op::TakeAlong { axis }, &[x, top]).unwrap();
        c.check(y).map_err(fail(format!("top_k {s:?} axis {axis} k {k} largest {largest}")))?;
    }

    #[test]
    fn group_matmul(rows in 1..=5usize, k in 1..=3usize, n in 1..=3usize, groups in 1..=3usize, seed in any::<u64>()) {
        for trans_w in [false, true] {
            let mut c = Case::new(seed);
            let x = c.param("x", dims(&[rows, k]));
            let w = c.param("w", dims(&if trans_w { [groups, n, k] } else { [groups, k, n] }));
            let idx = c.ids("idx", dims(&[rows]), groups as u32);
            let y = c.add(Op::GroupMatMul { trans_w }, &[x, w, idx]).unwrap();
            c.check(y).map_err(fail(format!("group_matmul trans_w={trans_w}")))?;
        }
    }

    #[test]
    fn group_outer(rows in 1..=5usize, k in 1..=3usize, n in 1..=3usize, groups in 1..=3usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let x = c.param("x", dims(&[rows, k]));
        let dy = c.param("dy", dims(&[rows, n]));
        let idx = c.ids("idx", dims(&[rows]), groups as u32);
        let y = c.add(Op::GroupOuter { groups: Dim::from(groups) }, &[x, dy, idx]).unwrap();
        c.check(y).map_err(fail("group_outer"))?;
    }

    #[test]
    fn segment_sum(s in sizes(3, 3), segments in 1..=3usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.bind("B", s[0]);
        let x = c.param("x", batch_dims(&s));
        let idx = c.ids("idx", vec![Dim::batch()], segments as u32);
        let y = c.add(Op::SegmentSum { segments: Dim::from(segments) }, &[x, idx]).unwrap();
        c.check(y).map_err(fail("segment_sum"))?;
    }

    /// Gather from a parameter table (dense SegmentSum gradient) and from an activation
    /// (`tanh(table)`); ids of rank 1 or 2 with the batch symbol first.
    #[test]
    fn gather_dense(vocab in 1..=4usize, row in prop::collection::vec(1..=3usize, 0..=2),
                    id_shape in sizes(2, 3), activation in any::<bool>(), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.bind("B", id_shape[0]);
        let table_shape: Vec<usize> = [vocab].iter().chain(&row).copied().collect();
        let p = c.param("table", dims(&table_shape));
        let table = if activation { c.add(Op::Unary(UnaryOp::Tanh), &[p]).unwrap() } else { p };
        let ids = c.ids("ids", batch_dims(&id_shape), vocab as u32);
        let y = c.add(Op::Gather, &[table, ids]).unwrap();
        prop_assert!(!has_row_sparse_grad(&c.graph, p));
        c.check(y).map_err(fail("gather into a dense table"))?;
    }

    /// Gather from an embedding parameter, used once or twice: the gradient is one
    /// SparseRows (densified here to compare), and no dense table-sized node is built.
    #[test]
    fn gather_embedding(vocab in 1..=4usize, row in prop::collection::vec(1..=3usize, 0..=2),
                        id_shape in sizes(2, 3), twice in any::<bool>(), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let table_shape: Vec<usize> = [vocab].iter().chain(&row).copied().collect();
        let data = c.uniform(table_shape.iter().product(), -2.0, 2.0);
        let table = c.param_values("emb", dims(&table_shape), true, data);
        let ids = c.ids("ids", dims(&id_shape), vocab as u32);
        let mut y = c.add(Op::Gather, &[table, ids]).unwrap();
        if twice {
            let ids2 = c.ids("ids2", dims(&[3]), vocab as u32);
            let y2 = c.add(Op::Gather, &[table, ids2]).unwrap();
            let flat = |c: &mut Case, v| { let n = mdl_runtime::ir::dim::numel(c.graph.shape(v)); c.add(Op::Reshape { shape: vec![n] }, &[v]).unwrap() };
            let (f1, f2) = (flat(&mut c, y), flat(&mut c, y2));
            y = c.add(Op::Concat { axis: 0 }, &[f1, f2]).unwrap();
        }
        prop_assert!(has_row_sparse_grad(&c.graph, table));
        let loss = c.attach_loss(y);
        let g = mdl_runtime::differentiate(&c.graph, loss, &["emb".to_string()]).unwrap();
        let grad_is_sparse_rows = matches!(g.node(g.outputs["grad/emb"]).op, Op::SparseRows { .. });
        prop_assert!(grad_is_sparse_rows);
        let scatters = g.ids().filter(|&i| matches!(g.node(i).op, Op::SparseRows { .. } | Op::SegmentSum { .. })).count();
        prop_assert_eq!(scatters, 1);
        c.check_loss(loss).map_err(fail("gather from an embedding"))?;
    }

    /// An embedding parameter also read by another op gets a dense gradient.
    #[test]
    fn gather_embedding_shared_with_dense_use(vocab in 1..=4usize, width in 1..=3usize, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        let data = c.uniform(vocab * width, -2.0, 2.0);
        let table = c.param_values("emb", dims(&[vocab, width]), true, data);
        let ids = c.ids("ids", dims(&[4]), vocab as u32);
        let rows = c.add(Op::Gather, &[table, ids]).unwrap();
        let squared = c.add(Op::Binary(BinaryOp::Mul), &[table, table]).unwrap();
        let total = c.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: true }, &[squared]).unwrap();
        let y = c.add(Op::Binary(BinaryOp::Add), &[rows, total]).unwrap();
        prop_assert!(!has_row_sparse_grad(&c.graph, table));
        c.check(y).map_err(fail("gather from an embedding with a dense use"))?;
    }

    /// A dropout mask in training mode is a constant of the step: the gradient is `mask * R`.
    #[test]
    fn dropout_in_training(s in sizes(3, 3), p in 0.0..0.9f64, seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.mode = Mode::train(seed, 3);
        let x = c.param("x", dims(&s));
        let mask = c.add(Op::DropMask { p, stream: 7 }, &[x]).unwrap();
        let y = c.add(Op::Binary(BinaryOp::Mul), &[x, mask]).unwrap();
        c.check(y).map_err(fail("dropout"))?;
    }

    /// Rows shuffled by a permutation in training (`shuffle_rows`): the permutation is a
    /// constant of the step, the gradient reaches each row at the place it was taken to.
    #[test]
    fn shuffled_rows_in_training(s in sizes(2, 3), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.mode = Mode::train(seed, 5);
        let x = c.param("x", dims(&s));
        let perm = c.add(Op::Permutation { n: Dim::from(s[0]), stream: 3 }, &[]).unwrap();
        let mut along = vec![Dim::from(1usize); s.len()];
        along[0] = Dim::from(s[0]);
        let idx = c.add(Op::Reshape { shape: along }, &[perm]).unwrap();
        let y = c.add(Op::TakeAlong { axis: 0 }, &[x, idx]).unwrap();
        c.check(y).map_err(fail("shuffled rows"))?;
    }
}

proptest! {
    #![proptest_config(config())]

    /// Batch normalisation as the language builds it (`batch_norm`, `running`): in training
    /// `(x - TrainEval(mean_B(x), r)) / sqrt(TrainEval(var_B, v) + eps)`, the gradient flows
    /// through the batch statistics to every element of `x` and nothing reaches the running
    /// values `r`, `v` (taken as parameters here, so the finite difference sees that they do
    /// not matter); in evaluation the same graph normalises with `r` and `v`, and both get
    /// their gradients.
    #[test]
    fn batch_norm_through_batch_or_running_statistics(s in sizes(3, 3), seed in any::<u64>(), training in any::<bool>()) {
        let mut c = Case::new(seed);
        if training {
            c.mode = Mode::train(seed, 1);
        }
        c.bind("B", s[0] + 1);
        let mut shape = vec![Dim::batch()];
        shape.extend(s[1..].iter().map(|&d| Dim::from(d)));
        let mut stat_shape: Shape = vec![Dim::from(1usize)];
        stat_shape.extend(s[1..].iter().map(|&d| Dim::from(d)));
        let x = c.param("x", shape);
        let r = c.param("r", stat_shape.clone());
        let n = c.numel(&stat_shape);
        let var_values = c.uniform(n, 0.5, 2.0);
        let v = c.param_values("v", stat_shape, false, var_values);
        let mean = |c: &mut Case, t| c.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: true }, &[t]).unwrap();
        let m = mean(&mut c, x);
        let m = c.add(Op::TrainEval, &[m, r]).unwrap();
        let centred = c.add(Op::Binary(BinaryOp::Sub), &[x, m]).unwrap();
        let sq = c.add(Op::Binary(BinaryOp::Mul), &[centred, centred]).unwrap();
        let var = mean(&mut c, sq);
        let var = c.add(Op::TrainEval, &[var, v]).unwrap();
        let eps = c.add(Op::Scalar(1e-3), &[]).unwrap();
        let var = c.add(Op::Binary(BinaryOp::Add), &[var, eps]).unwrap();
        let sd = c.add(Op::Unary(UnaryOp::Sqrt), &[var]).unwrap();
        let y = c.add(Op::Binary(BinaryOp::Div), &[centred, sd]).unwrap();
        c.check(y).map_err(fail(format!("batch norm {s:?} training {training}")))?;
    }
}

/// StopGrad, DropMask, Bernoulli, the elementwise ops that are not differentiable (step, sign, gt, eq)
/// and OneHot pass no gradient: a loss that reaches a parameter only through them gives it
/// no gradient output, and their rules return `None`.
#[test]
fn nondifferentiable_ops_give_no_gradient() {
    let unary = UnaryOp::ALL.iter().filter(|u| !u.is_differentiable()).map(|&u| Op::Unary(u));
    let binary = BinaryOp::ALL.iter().filter(|b| !b.is_differentiable()).map(|&b| Op::Binary(b));
    let cases = [Op::StopGrad, Op::DropMask { p: 0.5, stream: 1 }, Op::Bernoulli { p: 0.5, stream: 1 }]
        .into_iter()
        .chain(unary)
        .chain(binary);
    for op in cases {
        let name = op.name();
        let mut c = Case::new(1);
        c.mode = Mode::train(1, 1);
        let x = c.param("x", dims(&[2, 3]));
        let inputs: Vec<NodeId> = vec![x; op.arity().unwrap_or(1)];
        let y = c.add(op, &inputs).unwrap();
        let node = c.graph.node(y).clone();
        assert!(node.op.is_nondifferentiable(), "{name}");
        let loss = c.attach_loss(y);
        let (g, grads) = c.autodiff_grads(loss).unwrap();
        assert!(!g.outputs.contains_key("grad/x"), "{name}: a gradient output was made");
        assert!(grads["x"].data.iter().all(|&v| v == 0.0), "{name}");
        let mut scratch = c.graph.clone();
        let dy = scratch.add(Op::Scalar(1.0), &[], "t").unwrap();
        let dy = scratch.add(Op::Broadcast { shape: c.graph.shape(y).clone() }, &[dy], "t").unwrap();
        let cts = ops::grad(&mut scratch, &node, y, dy).unwrap();
        assert!(cts.iter().all(|ct| ct.is_none()), "{name}: the rule returned a cotangent");
    }

    // OneHot: ids in, reals out, no gradient to the ids; the weight it multiplies gets one.
    let mut c = Case::new(2);
    let ids = c.ids("ids", dims(&[4]), 3);
    let hot = c.add(Op::OneHot { depth: Dim::from(3usize) }, &[ids]).unwrap();
    assert!(c.graph.node(hot).op.is_nondifferentiable());
    let mut scratch = c.graph.clone();
    let node = scratch.node(hot).clone();
    let dy = scratch.add(Op::Scalar(1.0), &[], "t").unwrap();
    let dy = scratch.add(Op::Broadcast { shape: dims(&[4, 3]) }, &[dy], "t").unwrap();
    assert_eq!(ops::grad(&mut scratch, &node, hot, dy).unwrap(), vec![None]);
    let w = c.param("w", dims(&[4, 3]));
    let y = c.add(Op::Binary(BinaryOp::Mul), &[hot, w]).unwrap();
    c.check(y).unwrap();
}

/// A shape with the batch symbol, checked at two batch sizes through the same graph.
#[test]
fn mean_over_batch_divides_by_the_bound_size() {
    for b in [1usize, 5] {
        let mut c = Case::new(9);
        c.bind("B", b);
        let shape: Shape = vec![Dim::batch(), Dim::from(2usize)];
        let x = c.param("x", shape);
        let y = c.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 1], keep_dims: false }, &[x]).unwrap();
        c.check(y).unwrap();
    }
}
