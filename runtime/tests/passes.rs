//! CSE and DCE: what they merge and remove, and that results do not change.

mod common;

use common::*;
use mdl_runtime::backend::interp;
use mdl_runtime::passes::{cse, dce, optimize};
use mdl_runtime::{differentiate, BinaryOp, Op, UnaryOp};

#[test]
fn cse_merges_a_duplicated_subexpression() {
    let mut c = Case::new(5);
    let x = c.input_values("x", dims(&[2, 3]), vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
    let w = c.param("w", dims(&[3]));
    let branch = |c: &mut Case| {
        let m = c.add(Op::Binary(BinaryOp::Mul), &[x, w]).unwrap();
        c.add(Op::Unary(UnaryOp::Tanh), &[m]).unwrap()
    };
    let (a, b) = (branch(&mut c), branch(&mut c));
    let y = c.add(Op::Binary(BinaryOp::Add), &[a, b]).unwrap();
    c.graph.outputs.insert("y".into(), y);
    let merged = cse(&c.graph);
    assert_eq!(merged.len(), c.graph.len() - 2);
    let add = merged.node(merged.outputs["y"]);
    assert_eq!(add.inputs[0], add.inputs[1]);
    let before = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    let after = interp::run(&merged, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(before.dense("y"), after.dense("y"));
    assert_eq!(merged.param_info("w").map(|p| merged.node(p.node).op.clone()), Some(Op::Param { name: "w".into() }));
}

#[test]
fn cse_keeps_distinct_constants_masks_and_declarations_apart() {
    let mut c = Case::new(5);
    let x = c.input_values("x", dims(&[2]), vec![1.0, 2.0]);
    let x2 = c.input_values("x2", dims(&[2]), vec![1.0, 2.0]);
    let zero = c.add(Op::Scalar(0.0), &[]).unwrap();
    let neg_zero = c.add(Op::Scalar(-0.0), &[]).unwrap();
    let zero_again = c.add(Op::Scalar(0.0), &[]).unwrap();
    let m1 = c.add(Op::DropMask { p: 0.5, stream: 1 }, &[x]).unwrap();
    let m2 = c.add(Op::DropMask { p: 0.5, stream: 2 }, &[x]).unwrap();
    let m1_again = c.add(Op::DropMask { p: 0.5, stream: 1 }, &[x]).unwrap();
    for (i, id) in [x2, zero, neg_zero, zero_again, m1, m2, m1_again].into_iter().enumerate() {
        c.graph.outputs.insert(format!("o{i}"), id);
    }
    let g = cse(&c.graph);
    let o = |i: usize| g.outputs[&format!("o{i}")];
    assert_ne!(o(1), o(2), "0.0 and -0.0 merged");
    assert_eq!(o(1), o(3));
    assert_ne!(o(4), o(5), "masks of different streams merged");
    assert_eq!(o(4), o(6));
    assert_eq!(g.inputs.len(), 2);
    assert_ne!(g.inputs[0].node, g.inputs[1].node);
}

#[test]
fn dce_removes_an_unused_branch() {
    let mut c = Case::new(6);
    let x = c.input_values("x", dims(&[3]), vec![1.0, 2.0, 3.0]);
    let unused_param = c.param("unused", dims(&[3]));
    let dead = c.add(Op::Unary(UnaryOp::Exp), &[x]).unwrap();
    let _dead2 = c.add(Op::Binary(BinaryOp::Mul), &[dead, unused_param]).unwrap();
    let y = c.add(Op::Unary(UnaryOp::Neg), &[x]).unwrap();
    c.graph.outputs.insert("y".into(), y);
    let g = dce(&c.graph);
    assert_eq!(g.len(), 3, "{}", g.listing());
    assert!(g.ids().all(|i| g.node(i).op != Op::Unary(UnaryOp::Exp)));
    let p = g.param_info("unused").unwrap();
    assert_eq!(g.node(p.node).op, Op::Param { name: "unused".into() });
    assert_eq!(g.node(g.input_info("x").unwrap().node).op.name(), "input x");
    let v = interp::run(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    assert_eq!(v.dense("y").unwrap().data, vec![-1.0, -2.0, -3.0]);
}

/// Every use of a parameter marked as one of two named paths: the gradient through each
/// path alone (the other cut, [`through_path`]) adds up to the whole gradient, and
/// [`through_paths`] leaves the values and the gradient as they are without the marks.
#[test]
fn gradients_through_two_paths_add_up_to_the_whole() {
    use mdl_runtime::passes::{path_names, through_path, through_paths};
    let mut c = Case::new(13);
    c.bind("B", 3);
    let x_data = c.uniform(3 * 4, -1.0, 1.0);
    let x = c.input_values("x", batch_dims(&[3, 4]), x_data);
    let w = c.param("w", dims(&[4, 4]));
    let h = c.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w]).unwrap();
    let a = c.add(Op::Path { name: "a".into() }, &[h]).unwrap();
    let b = c.add(Op::Path { name: "b".into() }, &[h]).unwrap();
    let ta = c.add(Op::Unary(UnaryOp::Tanh), &[a]).unwrap();
    let y = c.add(Op::Binary(BinaryOp::Mul), &[ta, b]).unwrap();
    let loss = c.attach_loss(y);
    assert_eq!(path_names(&c.graph), ["a", "b"]);
    let names = vec!["w".to_string()];
    let grad = |g: &mdl_runtime::Graph| {
        let d = differentiate(g, g.outputs["loss"], &names).unwrap();
        let v = interp::run(&d, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
        (v.dense("loss").unwrap().data.clone(), v.dense("grad/w").unwrap().data.clone())
    };
    let (whole_loss, whole) = grad(&c.graph);
    let (plain_loss, plain) = grad(&through_paths(&c.graph));
    assert_eq!((whole_loss.clone(), whole.clone()), (plain_loss, plain));
    assert!(through_paths(&c.graph).ids().all(|i| !matches!(through_paths(&c.graph).node(i).op, Op::Path { .. })));
    let (loss_a, via_a) = grad(&through_path(&c.graph, "a"));
    let (loss_b, via_b) = grad(&through_path(&c.graph, "b"));
    assert_eq!((loss_a, loss_b), (whole_loss.clone(), whole_loss));
    for ((g, ga), gb) in whole.iter().zip(&via_a).zip(&via_b) {
        assert!((g - (ga + gb)).abs() <= 1e-12 * (1.0 + g.abs()), "{g} vs {ga} + {gb}");
    }
    assert!(via_a.iter().zip(&via_b).any(|(p, q)| (p - q).abs() > 1e-6), "the two paths differ");
    let _ = loss;
    c.check_loss(c.graph.outputs["loss"]).unwrap();
}

/// The optimized gradient graph of the composed model computes the same loss and gradients
/// with fewer nodes.
#[test]
fn optimize_preserves_model_gradients() {
    let mut c = Case::new(8);
    let loss = model(&mut c);
    let names: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
    let g = differentiate(&c.graph, loss, &names).unwrap();
    let opt = optimize(&g);
    assert!(opt.len() < g.len(), "{} vs {}", opt.len(), g.len());
    let before = interp::run(&g, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    let after = interp::run(&opt, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    for name in before.output_names() {
        assert_eq!(before.output(name).unwrap().to_dense(), after.output(name).unwrap().to_dense(), "{name}");
    }
}
