//! Gradient check of a composed model: every parameter of a small multi-domain CTR model
//! (embedding Gather with a row-sparse gradient, dropout, Softmax-gated experts,
//! GroupMatMul towers, BCE as softplus) against central finite differences.

mod common;

use common::*;
use mdl_runtime::Op;

#[test]
fn composed_model_gradients_match_finite_differences() {
    for seed in [1u64, 2, 3] {
        let mut c = Case::new(seed);
        let loss = model(&mut c);
        c.check_loss(loss).unwrap();
        let names: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
        let g = mdl_runtime::differentiate(&c.graph, loss, &names).unwrap();
        for name in &names {
            assert!(g.outputs.contains_key(&format!("grad/{name}")), "no gradient for {name}");
        }
        assert!(matches!(g.node(g.outputs["grad/emb"]).op, Op::SparseRows { .. }));
    }
}
