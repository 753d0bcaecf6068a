//! CSE, DCE and wide products: what they merge and remove, and that results do not change.

mod common;

use common::*;
use mdl_runtime::backend::interp;
use mdl_runtime::passes::{cse, dce, optimize, wide_products, wide_products_toward};
use mdl_runtime::{differentiate, BinaryOp, NodeId, Op, ReduceOp, UnaryOp};

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

fn matmuls(g: &mdl_runtime::Graph) -> usize {
    g.ids().filter(|&i| matches!(g.node(i).op, Op::MatMul { .. })).count()
}

/// A concat with a part of zeros (a broadcast scalar 0).
fn concat_with_zeros(g: &mdl_runtime::Graph, id: NodeId) -> bool {
    let zeros =
        |p: NodeId| matches!(g.node(p).op, Op::Broadcast { .. }) && g.node(g.node(p).inputs[0]).op == Op::Scalar(0.0);
    matches!(g.node(id).op, Op::Concat { .. }) && g.node(id).inputs.iter().any(|&p| zeros(p))
}

/// Products of one input by weights (one of them transposed, so a family of its own; one
/// as wide as its inner size, left alone) and a product of two weights (left alone), with a loss that reads two of the
/// three (`unused` reaches only an output): `sent_to_loss` siblings send cotangents.
fn sibling_products(c: &mut Case) -> NodeId {
    use mdl_runtime::BinaryOp::*;
    c.bind("B", 4);
    let x_data = c.uniform(4 * 5, -1.0, 1.0);
    let x = c.input_values("x", batch_dims(&[4, 5]), x_data);
    let w1 = c.param("w1", dims(&[5, 3]));
    let w2 = c.param("w2", dims(&[5, 2]));
    let w_unused = c.param("w_unused", dims(&[5, 4]));
    let w_t = c.param("w_t", dims(&[6, 5]));
    let u = c.param("u", dims(&[5, 5]));
    let w_wide = c.param("w_wide", dims(&[5, 5]));
    let mm = |c: &mut Case, a, b, trans_b| c.add(Op::MatMul { trans_a: false, trans_b }, &[a, b]).unwrap();
    let y1 = mm(c, x, w1, false);
    let y1 = c.add(Op::Unary(UnaryOp::Tanh), &[y1]).unwrap();
    let y2 = mm(c, x, w2, false);
    let y2 = c.add(Op::Binary(Mul), &[y2, y2]).unwrap();
    let unused = mm(c, x, w_unused, false);
    let yt = mm(c, x, w_t, true);
    let yt = c.add(Op::Unary(UnaryOp::Sigmoid), &[yt]).unwrap();
    // A weight computed from weights (u·w1, batch-independent) is a sibling too; u·u is a
    // product of weights and stays as it is.
    let uw = mm(c, u, w1, false);
    let uu = mm(c, u, u, false);
    let y3 = mm(c, x, uw, false);
    // As wide as its inner size: no sibling.
    let y_wide = mm(c, x, w_wide, false);
    let sum =
        |c: &mut Case, v| c.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keep_dims: false }, &[v]).unwrap();
    let parts = [sum(c, y1), sum(c, y2), sum(c, yt), sum(c, y3), sum(c, uu), sum(c, y_wide)];
    let loss = parts[1..].iter().fold(parts[0], |t, &p| c.add(Op::Binary(Add), &[t, p]).unwrap());
    c.graph.outputs.insert("loss".into(), loss);
    c.graph.outputs.insert("unused".into(), unused);
    loss
}

/// Sibling products become one product per family (the plain family of four, the
/// transposed one of one stays); values are unchanged, and the gradients of the merged
/// graph equal those of the siblings' and finite differences, with one `dY·Wᵀ` and one
/// `xᵀ·dY` for the family and the slices' cotangents joined into one concat (zeros where the
/// unused sibling's columns are).
#[test]
fn wide_products_merge_siblings_and_keep_values_and_gradients() {
    let mut c = Case::new(21);
    let loss = sibling_products(&mut c);
    let wide = wide_products(&c.graph);
    // x·w1, x·w2, x·w_unused, x·(u·w1) are one family; x·w_tᵀ is alone; x·w_wide is not
    // narrower than its inner size; u·w1, u·u stay.
    assert_eq!(matmuls(&c.graph), 8);
    assert_eq!(matmuls(&wide), 5, "{}", wide.listing());
    let before = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    let after = interp::run(&wide, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    for name in ["loss", "unused"] {
        let (b, a) = (before.dense(name).unwrap(), after.dense(name).unwrap());
        assert_eq!(b.shape, a.shape);
        for (x, y) in b.data.iter().zip(&a.data) {
            assert!((x - y).abs() <= 1e-12 * (1.0 + x.abs()), "{name}: {x} vs {y}");
        }
    }
    let names: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
    let plain = differentiate(&c.graph, loss, &names).unwrap();
    let merged = differentiate(&wide, wide.outputs["loss"], &names).unwrap();
    // Forward 5 products; backward: the family's dW (x is an input: no dx), u·w1's two,
    // u·u's two, x·w_tᵀ's dW and x·w_wide's dW.
    assert_eq!(matmuls(&merged), 5 + 1 + 2 + 2 + 1 + 1, "{}", merged.listing());
    let concats_of_zeros = merged.ids().filter(|&i| concat_with_zeros(&merged, i));
    assert_eq!(concats_of_zeros.count(), 1, "the cotangent of the wide product is one concat with zeros");
    // Toward the loss, the unused sibling is left out of the family: its weight gets no
    // gradient, as without the pass; the concat of the cotangents has no zeros.
    let toward = wide_products_toward(&c.graph, loss);
    assert_eq!(matmuls(&toward), 6, "{}", toward.listing());
    let merged_toward = differentiate(&toward, toward.outputs["loss"], &names).unwrap();
    assert!(!merged_toward.outputs.contains_key("grad/w_unused"));
    assert!(merged_toward
        .ids()
        .all(|i| !matches!(merged_toward.node(i).op, Op::Pad { .. }) && !concat_with_zeros(&merged_toward, i)));
    assert!(merged.ids().all(|i| !matches!(merged.node(i).op, Op::Pad { .. })), "no pad is left: {}", merged.listing());
    let g_plain = interp::run(&plain, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    let g_merged = interp::run(&merged, &c.binding, &c.feeds, &c.params, &c.mode).unwrap();
    for name in &names {
        let key = format!("grad/{name}");
        let Some(b) = g_plain.dense(&key) else {
            assert_eq!(name, "w_unused", "only the unused sibling's weight has no gradient");
            // The pass without the loss merged it: a gradient of zeros.
            assert!(g_merged.dense(&key).unwrap().data.iter().all(|&v| v == 0.0));
            continue;
        };
        let a = g_merged.dense(&key).unwrap();
        assert_eq!(b.shape, a.shape, "{key}");
        for (x, y) in b.data.iter().zip(&a.data) {
            assert!((x - y).abs() <= 1e-12 * (1.0 + x.abs()), "{key}: {x} vs {y}");
        }
    }
    // The merged graph's gradients against finite differences.
    let mut fd = Case::new(21);
    sibling_products(&mut fd);
    fd.graph = wide_products(&fd.graph);
    let loss = fd.graph.outputs["loss"];
    fd.check_loss(loss).unwrap();
}

/// A graph without siblings comes back as it is; a second pass over a merged graph
/// changes nothing more (the wide weight is a concat, one product per family).
#[test]
fn wide_products_leave_lone_products_and_are_idempotent() {
    let mut c = Case::new(3);
    let x = c.input_values("x", dims(&[2, 3]), vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
    let w = c.param("w", dims(&[3, 2]));
    let y = c.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w]).unwrap();
    let z = c.add(Op::MatMul { trans_a: false, trans_b: false }, &[y, c.graph.param_info("w").unwrap().node]);
    assert!(z.is_err(), "the shapes do not chain");
    c.graph.outputs.insert("y".into(), y);
    assert_eq!(wide_products(&c.graph).listing(), c.graph.listing());
    let mut c = Case::new(4);
    sibling_products(&mut c);
    let once = wide_products(&c.graph);
    assert_eq!(wide_products(&once).listing(), once.listing());
}
