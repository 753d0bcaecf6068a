//! The autodiff transform itself: errors, which parameters get outputs, what is kept.

mod common;

use common::*;
use mdl_runtime::backend::interp;
use mdl_runtime::{differentiate, AutodiffError, BinaryOp, Op, ReduceOp, UnaryOp, ValueKind};

fn sum_all(c: &mut Case, x: mdl_runtime::NodeId) -> mdl_runtime::NodeId {
    let rank = c.graph.shape(x).len();
    c.add(Op::Reduce { op: ReduceOp::Sum, axes: (0..rank).collect(), keep_dims: false }, &[x]).unwrap()
}

#[test]
fn rejects_bad_requests() {
    let mut c = Case::new(1);
    let w = c.param("w", dims(&[2]));
    assert!(matches!(differentiate(&c.graph, w, &["w".into()]), Err(AutodiffError::LossNotScalar { .. })));
    let loss = sum_all(&mut c, w);
    assert_eq!(
        differentiate(&c.graph, loss, &["nope".into()]).unwrap_err(),
        AutodiffError::UnknownParam("nope".into())
    );
    assert!(matches!(differentiate(&c.graph, mdl_runtime::NodeId::new(99), &[]), Err(AutodiffError::UnknownNode(99))));
    let ids = c.ids("ids", dims(&[]), 2);
    assert!(differentiate(&c.graph, ids, &[]).is_err(), "ids are not a loss");
}

#[test]
fn keeps_the_forward_graph_and_adds_gradient_outputs() {
    let mut c = Case::new(2);
    let w = c.param("w", dims(&[3]));
    let unused = c.param("unused", dims(&[3]));
    let blocked = c.param("blocked", dims(&[3]));
    let stopped = c.add(Op::StopGrad, &[blocked]).unwrap();
    let y = c.add(Op::Binary(BinaryOp::Mul), &[w, stopped]).unwrap();
    let loss = sum_all(&mut c, y);
    c.graph.outputs.insert("loss".into(), loss);
    let names = vec!["w".to_string(), "unused".to_string(), "blocked".to_string()];
    let g = differentiate(&c.graph, loss, &names).unwrap();
    for id in c.graph.ids() {
        assert_eq!(g.node(id), c.graph.node(id));
    }
    assert_eq!(g.outputs["loss"], loss);
    assert!(g.outputs.contains_key("grad/w"));
    assert!(!g.outputs.contains_key("grad/unused"));
    assert!(!g.outputs.contains_key("grad/blocked"));
    let _ = unused;
    let v = interp::run(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(v.dense("grad/w").unwrap().data, c.params["blocked"].data);
}

#[test]
fn a_scalar_parameter_as_the_loss_has_gradient_one() {
    let mut c = Case::new(3);
    let w = c.param("w", dims(&[]));
    let g = differentiate(&c.graph, w, &["w".into()]).unwrap();
    let v = interp::run(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(v.scalar("grad/w"), Some(1.0));
}

/// Only nodes between a wanted parameter and the loss are differentiated: a branch of the
/// loss that depends on inputs alone gets no backward nodes.
#[test]
fn differentiates_only_paths_from_wanted_parameters() {
    let mut c = Case::new(4);
    let x = c.input_values("x", dims(&[4]), vec![0.1, 0.2, 0.3, 0.4]);
    let w = c.param("w", dims(&[4]));
    let other = c.param("other", dims(&[4]));
    let e = c.add(Op::Unary(UnaryOp::Exp), &[x]).unwrap();
    let e = c.add(Op::Binary(BinaryOp::Mul), &[e, other]).unwrap();
    let t = c.add(Op::Unary(UnaryOp::Tanh), &[w]).unwrap();
    let s = c.add(Op::Binary(BinaryOp::Add), &[e, t]).unwrap();
    let loss = sum_all(&mut c, s);
    let g = differentiate(&c.graph, loss, &["w".into()]).unwrap();
    let forward = c.graph.len();
    let reads = |n: mdl_runtime::NodeId| g.ids().skip(forward).any(|i| g.node(i).inputs.contains(&n));
    assert!(!reads(e) && !reads(other), "{}", g.listing());
    assert!(reads(t), "the tanh gradient reuses its output");
    assert!(!g.outputs.contains_key("grad/other"));
}

/// Two Gathers from one embedding table: one SparseRows over both id sets; no dense
/// table-sized node in the backward graph.
#[test]
fn embedding_gradient_is_one_row_sparse_value() {
    let mut c = Case::new(5);
    let data = c.uniform(1000 * 4, -1.0, 1.0);
    let table = c.param_values("emb", dims(&[1000, 4]), true, data);
    let a = c.ids_values("a", dims(&[2, 3]), vec![1, 2, 3, 1, 1, 999]);
    let b = c.ids_values("b", dims(&[2]), vec![3, 7]);
    let ga = c.add(Op::Gather, &[table, a]).unwrap();
    let gb = c.add(Op::Gather, &[table, b]).unwrap();
    let sa = sum_all(&mut c, ga);
    let sb = sum_all(&mut c, gb);
    let loss = c.add(Op::Binary(BinaryOp::Add), &[sa, sb]).unwrap();
    let g = differentiate(&c.graph, loss, &["emb".into()]).unwrap();
    let grad = g.outputs["grad/emb"];
    assert_eq!(g.sig(grad).kind, ValueKind::RowSparse);
    let table_shape = dims(&[1000, 4]);
    assert!(g.ids().skip(c.graph.len()).all(|i| g.sig(i).kind == ValueKind::RowSparse || g.shape(i) != &table_shape));
    let v = interp::run(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    let mdl_runtime::Value::RowSparse { rows, values, .. } = v.output("grad/emb").unwrap() else { panic!("dense") };
    assert_eq!(rows, &vec![1, 2, 3, 1, 1, 999, 3, 7]);
    assert!(values.data.iter().all(|&x| x == 1.0));
    let dense = v.output("grad/emb").unwrap().to_dense().unwrap();
    assert_eq!(&dense.data[4..8], &[3.0; 4]);
}

/// Bucketize, floor and the comparisons pass no gradient: a parameter reaching the loss
/// only through them gets no gradient output, while the table the bucket ids index does.
#[test]
fn bucket_ids_floor_and_comparisons_carry_no_gradient() {
    let mut c = Case::new(4);
    let x = c.param("x", dims(&[5]));
    let table = c.param("table", dims(&[4, 2]));
    let ids = c.add(Op::Bucketize { boundaries: vec![-0.5, 0.0, 0.5] }, &[x]).unwrap();
    let rows = c.add(Op::Gather, &[table, ids]).unwrap();
    let floor = c.add(Op::Unary(UnaryOp::Floor), &[x]).unwrap();
    let zero = c.add(Op::Scalar(0.0), &[]).unwrap();
    let positive = c.add(Op::Binary(BinaryOp::Ge), &[x, zero]).unwrap();
    let unequal = c.add(Op::Binary(BinaryOp::Ne), &[x, zero]).unwrap();
    let flags = c.add(Op::Binary(BinaryOp::Add), &[floor, positive]).unwrap();
    let flags = c.add(Op::Binary(BinaryOp::Add), &[flags, unequal]).unwrap();
    let (sum_rows, sum_flags) = (sum_all(&mut c, rows), sum_all(&mut c, flags));
    let loss = c.add(Op::Binary(BinaryOp::Add), &[sum_rows, sum_flags]).unwrap();
    let g = differentiate(&c.graph, loss, &["x".into(), "table".into()]).unwrap();
    assert!(!g.outputs.contains_key("grad/x"), "no gradient flows back through bucketize, floor or a comparison");
    assert!(g.outputs.contains_key("grad/table"));
}
