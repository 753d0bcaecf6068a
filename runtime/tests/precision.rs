//! f32 and f64 interp agree on random composed graphs, forward and backward: for every
//! node, `max|a32 - a64| <= 1e-4 * S`, with `S` the largest magnitude of any value of the
//! f64 run (at least 1): the error relative to the run's scale. (Per-element relative error
//! is not a fair measure: a value that is the small difference of large ones, like the loss
//! `sum(y * R)` or a centred activation, is only as exact as the terms it cancels.)

mod common;

use common::*;
use mdl_runtime::backend::interp;
use mdl_runtime::{differentiate, BinaryOp, Dim, Op, ReduceOp, Tensor, UnaryOp, Value};
use proptest::prelude::*;
use std::collections::HashMap;

const WIDTH: usize = 4;

/// Appends op number `choice` (of 14) to the chain ending at `x: [B, WIDTH]`. Only smooth
/// ops: at a kink (relu, max) f32 and f64 may land on different sides, which is not an error.
fn step(c: &mut Case, x: mdl_runtime::NodeId, choice: usize, k: usize) -> mdl_runtime::NodeId {
    use BinaryOp::*;
    use UnaryOp::*;
    let mut add = |c: &mut Case, op: Op, inputs: &[mdl_runtime::NodeId]| c.add(op, inputs).expect("chain shapes");
    let row = |c: &mut Case, name: String| {
        let data = c.uniform(WIDTH, -1.0, 1.0);
        c.param_values(&name, dims(&[WIDTH]), false, data)
    };
    // 1 + x² (a safe operand for log, sqrt, recip and division)
    let positive = |c: &mut Case, add: &mut dyn FnMut(&mut Case, Op, &[mdl_runtime::NodeId]) -> mdl_runtime::NodeId| {
        let one = add(c, Op::Scalar(1.0), &[]);
        let sq = add(c, Op::Binary(Mul), &[x, x]);
        add(c, Op::Binary(Add), &[one, sq])
    };
    match choice {
        0 => add(c, Op::Unary(Tanh), &[x]),
        1 => add(c, Op::Unary(Sigmoid), &[x]),
        2 => add(c, Op::Unary(Softplus), &[x]),
        3 => {
            let p = positive(c, &mut add);
            add(c, Op::Unary(Log), &[p])
        }
        4 => {
            let p = positive(c, &mut add);
            let s = add(c, Op::Unary(Sqrt), &[p]);
            add(c, Op::Binary(Div), &[x, s])
        }
        5 => {
            let p = positive(c, &mut add);
            add(c, Op::Unary(Recip), &[p])
        }
        6 => {
            let w = row(c, format!("w{k}"));
            add(c, Op::Binary(Mul), &[x, w])
        }
        7 => {
            let w = row(c, format!("w{k}"));
            add(c, Op::Binary(Sub), &[w, x])
        }
        8 => {
            let data = c.uniform(WIDTH * WIDTH, -0.7, 0.7);
            let w = c.param_values(&format!("m{k}"), dims(&[WIDTH, WIDTH]), false, data);
            add(c, Op::MatMul { trans_a: false, trans_b: k % 2 == 1 }, &[x, w])
        }
        9 => add(c, Op::Softmax { axis: 1 }, &[x]),
        10 => {
            let m = add(c, Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keep_dims: true }, &[x]);
            add(c, Op::Binary(Sub), &[x, m])
        }
        11 => {
            let (a, b) = (Dim::from(1usize), Dim::from(WIDTH - 1));
            let tail = add(c, Op::Slice { axis: 1, start: a, len: b }, &[x]);
            let head = add(c, Op::Slice { axis: 1, start: Dim::from(0usize), len: Dim::from(1usize) }, &[x]);
            add(c, Op::Concat { axis: 1 }, &[tail, head])
        }
        12 => {
            let sq = add(c, Op::Binary(Mul), &[x, x]);
            let n = add(c, Op::Unary(Neg), &[sq]);
            add(c, Op::Unary(Exp), &[n])
        }
        _ => {
            let groups = 2;
            let data = c.uniform(groups * WIDTH * WIDTH, -0.7, 0.7);
            let w = c.param_values(&format!("g{k}"), dims(&[groups, WIDTH, WIDTH]), false, data);
            let idx = c.ids(&format!("idx{k}"), vec![Dim::batch()], groups as u32);
            add(c, Op::GroupMatMul { trans_w: k.is_multiple_of(2) }, &[x, w, idx])
        }
    }
}

fn to_f32(v: &Value<f64>) -> Value<f32> {
    match v {
        Value::Dense(t) => Value::Dense(t.cast()),
        Value::Ids(t) => Value::Ids(t.clone()),
        Value::RowSparse { shape, rows, values } => {
            Value::RowSparse { shape: shape.clone(), rows: rows.clone(), values: values.cast() }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn f32_and_f64_agree(choices in prop::collection::vec(0..14usize, 2..8), seed in any::<u64>()) {
        let mut c = Case::new(seed);
        c.bind("B", 3);
        let data = c.uniform(3 * WIDTH, -1.5, 1.5);
        let mut x = c.input_values("x", vec![Dim::batch(), Dim::from(WIDTH)], data);
        let first = c.param("w_in", dims(&[WIDTH]));
        x = c.add(Op::Binary(BinaryOp::Add), &[x, first]).unwrap();
        for (k, &choice) in choices.iter().enumerate() {
            x = step(&mut c, x, choice, k);
        }
        let loss = c.attach_loss(x);
        let names: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
        let g = differentiate(&c.graph, loss, &names).unwrap();

        let params32: HashMap<String, Tensor<f32>> = c.params.iter().map(|(k, v)| (k.clone(), v.cast())).collect();
        let feeds32: HashMap<String, Value<f32>> = c.feeds.iter().map(|(k, v)| (k.clone(), to_f32(v))).collect();
        let v64 = interp::run_keep_all(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
        let v32 = interp::run_keep_all(&g, &c.binding, &feeds32, &params32, &c.mode).unwrap();
        let max_abs = |id: mdl_runtime::NodeId| {
            v64.node(id).and_then(|v| v.to_dense()).map_or(0.0, |t| t.data.iter().fold(0.0f64, |m, v| m.max(v.abs())))
        };
        let scale = g.ids().map(max_abs).fold(1.0, f64::max);
        for id in g.ids() {
            let (Some(a), Some(b)) = (v32.node(id).and_then(|v| v.to_dense()), v64.node(id).and_then(|v| v.to_dense())) else { continue };
            let err = a.data.iter().zip(&b.data).fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
            prop_assert!(err <= 1e-4 * scale, "node %{} ({}): error {err} at scale {scale}", id.index(), g.node(id).op.name());
        }
    }
}
