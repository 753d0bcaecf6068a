//! Graph-to-graph passes: named gradient paths resolved ([`through_paths`], [`through_path`]),
//! common-subexpression elimination ([`cse`]), sibling products made one wider product
//! ([`wide_products`]), dead-code elimination ([`dce`]) and [`optimize`], which runs the pass
//! list [`PASSES`] in order. A pass takes a graph and builds a new one (graphs are
//! append-only); node ids change, and the parameter, input and output tables are remapped.
//!
//! [`wide_products`] is also worth running on a forward graph *before* it is differentiated
//! (the trainer does, with [`wide_products_toward`] its loss): the backward of one wide
//! product is two wide products (`dx = dY·Wᵀ`, `dW = xᵀ·dY`), where the siblings' backward is
//! two products each and a sum of their `dx`.
//!
//! [`for_phase`] is not in the list either: it resolves each `TrainEval` node to the value
//! of one phase (training or evaluation), which the trainer does once per graph it derives.
//!
//! Elementwise fusion ([`crate::fuse`]) is not in this list: it makes backend kernels
//! (`Op::Fused`, which have no gradient rule), so the backends that compile them run it on
//! the optimised forward + backward graph.

use crate::ir::dim::Dim;
use crate::ir::graph::{Graph, NodeId};
use crate::ops::{self, Op};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// A graph pass.
pub type Pass = fn(&Graph) -> Graph;

/// The passes [`optimize`] runs, in order. To add one, write `fn(&Graph) -> Graph` and
/// list it here.
pub const PASSES: &[(&str, Pass)] =
    &[("paths", through_paths), ("cse", cse), ("wide_products", wide_products), ("dce", dce)];

/// Runs every pass of [`PASSES`] in order.
pub fn optimize(graph: &Graph) -> Graph {
    PASSES.iter().fold(graph.clone(), |g, (_, pass)| pass(&g))
}

/// The graph as it runs in one phase: every `TrainEval` node is replaced by its first
/// operand (`training`) or its second (evaluation), and what only the other phase reads
/// is dropped ([`dce`]). The values are those the graph gives in a run of that phase
/// ([`crate::exec::Mode::training`]); the training phase's graph is the one to
/// differentiate (the gradient flows through the batch statistics).
/// A graph without `TrainEval` comes back as it is.
pub fn for_phase(graph: &Graph, training: bool) -> Graph {
    match replace_nodes(graph, &|node, inputs, _| {
        (node.op == Op::TrainEval).then(|| inputs[if training { 0 } else { 1 }])
    }) {
        Some(out) => dce(&out),
        None => graph.clone(),
    }
}

/// What [`replace_nodes`] asks of each node: its replacement, if any.
type Replace<'a> = dyn Fn(&crate::ir::graph::Node, &[NodeId], &mut Graph) -> Option<NodeId> + 'a;

/// `graph` rebuilt with each node for which `replace` gives a value (from the node, its
/// operands' ids in the new graph, and the new graph to add nodes to) standing for it;
/// every other node copied. `None` when `replace` gives no value for any node.
fn replace_nodes(graph: &Graph, replace: &Replace) -> Option<Graph> {
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(graph.len());
    let mut replaced = false;
    for id in graph.ids() {
        let node = graph.node(id);
        let inputs: Vec<NodeId> = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
        let new_id = match replace(node, &inputs, &mut out) {
            Some(v) => {
                replaced = true;
                v
            }
            None => out.push_copy(node, inputs),
        };
        map.push(Some(new_id));
    }
    if !replaced {
        return None;
    }
    out.copy_tables(graph, &map);
    Some(out)
}

/// The graph with every named gradient path ([`Op::Path`]) resolved into its operand: the
/// values and the gradient of the spec as it trains. First in [`PASSES`].
pub fn through_paths(graph: &Graph) -> Graph {
    resolve_paths(graph, None)
}

/// The graph with only the named gradient path `path` open: its `Path` nodes resolved into
/// their operands, every other path's into `StopGrad` of its operand. The values are
/// unchanged; a gradient of this graph is the share of the gradient that flows through
/// `path` (and through no named path at all).
pub fn through_path(graph: &Graph, path: &str) -> Graph {
    resolve_paths(graph, Some(path))
}

/// The names of the graph's gradient paths, sorted, each once.
pub fn path_names(graph: &Graph) -> Vec<String> {
    let mut names: Vec<String> = graph
        .ids()
        .filter_map(|id| match &graph.node(id).op {
            Op::Path { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn resolve_paths(graph: &Graph, open: Option<&str>) -> Graph {
    let resolved = replace_nodes(graph, &|node, inputs, out| match &node.op {
        Op::Path { name } if open.is_none_or(|p| p == name) => Some(inputs[0]),
        Op::Path { .. } => {
            Some(out.add(Op::StopGrad, inputs, &node.scope).expect("a stop-gradient takes any real value"))
        }
        _ => None,
    });
    resolved.unwrap_or_else(|| graph.clone())
}

/// A node's identity for CSE: its op and its (already merged) operands. Float fields are
/// compared by their bits (so `0.0` and `-0.0` stay apart and a NaN equals itself).
struct CseKey {
    op: Op,
    inputs: Vec<NodeId>,
}

impl PartialEq for CseKey {
    fn eq(&self, other: &CseKey) -> bool {
        let same_op = match (&self.op, &other.op) {
            (Op::Scalar(a), Op::Scalar(b)) => a.to_bits() == b.to_bits(),
            (Op::DropMask { p: pa, stream: sa }, Op::DropMask { p: pb, stream: sb }) => {
                pa.to_bits() == pb.to_bits() && sa == sb
            }
            (a, b) => a == b,
        };
        same_op && self.inputs == other.inputs
    }
}

impl Eq for CseKey {}

impl Hash for CseKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Equal keys have equal names (the name is a function of the op's fields).
        self.op.name().hash(h);
        self.inputs.hash(h);
    }
}

/// Common-subexpression elimination: a node with the same op and the same operands as an
/// earlier one is replaced by it. Inputs and parameters are never merged (each is its own
/// declaration); DropMasks merge only with the same rate and stream (they draw the same mask).
pub fn cse(graph: &Graph) -> Graph {
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(graph.len());
    let mut seen: HashMap<CseKey, NodeId> = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        let inputs: Vec<NodeId> = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            map.push(Some(out.push_copy(node, inputs)));
            continue;
        }
        let key = CseKey { op: node.op.clone(), inputs };
        let new_id = match seen.get(&key) {
            Some(&existing) => existing,
            None => {
                let new_id = out.push_copy(node, key.inputs.clone());
                seen.insert(key, new_id);
                new_id
            }
        };
        map.push(Some(new_id));
    }
    out.copy_tables(graph, &map);
    out
}

/// Dead-code elimination: keeps the nodes the named outputs need, and every declared
/// parameter and input (so the graph's tables stay complete).
pub fn dce(graph: &Graph) -> Graph {
    let mut keep = vec![false; graph.len()];
    for id in graph.outputs.values() {
        keep[id.index()] = true;
    }
    for id in graph.declared_nodes() {
        keep[id.index()] = true;
    }
    retain(graph, &keep).0
}

/// A copy of `graph` with the nodes marked in `keep` and everything they read, in the same
/// order; returns it with the map from old node index to new id. Nodes before the first
/// dropped one keep their ids.
pub fn retain(graph: &Graph, keep: &[bool]) -> (Graph, Vec<Option<NodeId>>) {
    let mut needed: Vec<bool> = (0..graph.len()).map(|i| keep.get(i).copied().unwrap_or(false)).collect();
    for id in graph.ids().collect::<Vec<_>>().into_iter().rev() {
        if needed[id.index()] {
            for i in &graph.node(id).inputs {
                needed[i.index()] = true;
            }
        }
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; graph.len()];
    for id in graph.ids() {
        if needed[id.index()] {
            let node = graph.node(id);
            let inputs = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
            map[id.index()] = Some(out.push_copy(node, inputs));
        }
    }
    out.copy_tables(graph, &map);
    (out, map)
}

/// Sibling products made one wider product: products `a·w₁, a·w₂, …` that read the same
/// left operand `a` (same transposes) and right operands `wᵢ` of rank 2 that do not depend
/// on the batch (weights, or values computed from weights only) and are narrower than their
/// inner size (fewer output columns than `a` has inner columns) become one product
/// `a·[w₁ | w₂ | …]` whose output columns are sliced back into the siblings' values. MMoE's
/// experts and gates all read the same input, a DCNv2 cross layer and the first DNN layer
/// read the same `x₀`, attention's query, key and value projections read the same tokens:
/// one product per family instead of one per sibling, which runs nearer the machine's
/// peak (a wider output), reads `a` once, and whose backward is one `dY·Wᵀ` instead of a
/// product per sibling and their sum (see the module doc; the cotangents of the slices are
/// joined into one concat by autodiff). The weights' concat is a copy of the weights per
/// step, small beside the product; the slices are read in place by the jit's kernels.
///
/// The values are those of the siblings up to the order of additions inside the products
/// (the same dot products, computed by a wider kernel). A left operand that does not
/// depend on the batch (a product of two weights) is left alone.
pub fn wide_products(graph: &Graph) -> Graph {
    merge_siblings(graph, &vec![true; graph.len()])
}

/// [`wide_products`] for a forward graph about to be differentiated for `loss`: only
/// products whose value reaches `loss` through differentiable ops are merged. A weight of
/// another sibling would get a gradient of zeros from the wide product's gradient, where
/// autodiff gives it none (and an optimizer leaves it alone).
pub fn wide_products_toward(graph: &Graph, loss: NodeId) -> Graph {
    let mut reaches = vec![false; graph.len()];
    if loss.index() < graph.len() {
        reaches[loss.index()] = true;
    }
    for id in graph.ids().collect::<Vec<_>>().into_iter().rev() {
        let node = graph.node(id);
        if reaches[id.index()] && !node.op.is_nondifferentiable() {
            for i in &node.inputs {
                reaches[i.index()] = true;
            }
        }
    }
    merge_siblings(graph, &reaches)
}

/// Merges the sibling products among the products marked in `candidates`.
fn merge_siblings(graph: &Graph, candidates: &[bool]) -> Graph {
    // Values that do not depend on any batch input: params, states, constants and what is
    // computed from them alone.
    let mut fixed = vec![false; graph.len()];
    for id in graph.ids() {
        let node = graph.node(id);
        fixed[id.index()] = !matches!(node.op, Op::Input { .. }) && node.inputs.iter().all(|i| fixed[i.index()]);
    }
    // Sibling families: (left operand, transposes) → the products, in node order.
    let mut families: HashMap<(NodeId, bool, bool), Vec<NodeId>> = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        let Op::MatMul { trans_a, trans_b } = node.op else { continue };
        if !candidates[id.index()] {
            continue;
        }
        let (a, w) = (node.inputs[0], node.inputs[1]);
        let w_sig = graph.sig(w);
        if fixed[a.index()] || !fixed[w.index()] || w_sig.shape.len() != 2 || w_sig.kind != ops::ValueKind::Dense {
            continue;
        }
        // Only narrow products gain: one whose output is at least as wide as its inner size
        // already runs near the product kernel's peak, and merging it costs copies of its
        // weight and cotangent (DCNv2's 768-wide cross layer beside its first DNN layer ran
        // 3 % slower merged, docs/performance.md).
        let (k, n) = if trans_b { (&w_sig.shape[1], &w_sig.shape[0]) } else { (&w_sig.shape[0], &w_sig.shape[1]) };
        if !matches!((k.as_const(), n.as_const()), (Some(k), Some(n)) if n < k) {
            continue;
        }
        families.entry((a, trans_a, trans_b)).or_default().push(id);
    }
    families.retain(|_, products| products.len() > 1);
    if families.is_empty() {
        return graph.clone();
    }
    let mut family_of: HashMap<NodeId, (NodeId, bool, bool)> = HashMap::new();
    for (key, products) in &families {
        for &p in products {
            family_of.insert(p, *key);
        }
    }

    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; graph.len()];
    for id in graph.ids() {
        if map[id.index()].is_some() {
            continue;
        }
        let Some(key) = family_of.get(&id) else {
            copy_with_operands(graph, id, &mut out, &mut map);
            continue;
        };
        // The family's first product: every weight of the family (and what it is computed
        // from, which reads no batch input and so no product of the family) is emitted
        // here, then the wide product and one slice per sibling.
        let products = &families[key];
        let (a, _, trans_b) = *key;
        let weights: Vec<NodeId> =
            products.iter().map(|&p| copy_with_operands(graph, graph.node(p).inputs[1], &mut out, &mut map)).collect();
        let scope = &graph.node(id).scope;
        let weight_axis = if trans_b { 0 } else { 1 };
        let wide_weight = out
            .add(Op::Concat { axis: weight_axis }, &weights, scope)
            .expect("sibling weights agree on their shared axis (their products read the same operand)");
        let a_new = map[a.index()].expect("the left operand comes before its products");
        let wide = out
            .add(graph.node(id).op.clone(), &[a_new, wide_weight], scope)
            .expect("the wide product's operands have the siblings' inner size");
        let axis = out.shape(wide).len() - 1;
        let mut start = Dim::lit(0);
        for &p in products {
            let len = graph.shape(p)[axis].clone();
            let slice = out
                .add(Op::Slice { axis, start: start.clone(), len: len.clone() }, &[wide], &graph.node(p).scope)
                .expect("a sibling's columns lie inside the wide product");
            start = &start + &len;
            map[p.index()] = Some(slice);
        }
    }
    out.copy_tables(graph, &map);
    out
}

/// Copies node `id` of `graph` into `out` after the operands it reads that are not there
/// yet (a depth-first walk), and returns its id in `out`.
fn copy_with_operands(graph: &Graph, id: NodeId, out: &mut Graph, map: &mut [Option<NodeId>]) -> NodeId {
    let mut stack = vec![id];
    while let Some(&top) = stack.last() {
        if map[top.index()].is_some() {
            stack.pop();
            continue;
        }
        let node = graph.node(top);
        let missing: Vec<NodeId> = node.inputs.iter().copied().filter(|i| map[i.index()].is_none()).collect();
        if missing.is_empty() {
            let inputs = node.inputs.iter().map(|i| map[i.index()].expect("emitted above")).collect();
            map[top.index()] = Some(out.push_copy(node, inputs));
            stack.pop();
        } else {
            stack.extend(missing);
        }
    }
    map[id.index()].expect("emitted above")
}
