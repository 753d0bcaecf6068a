//! Graph-to-graph passes: named gradient paths resolved ([`through_paths`], [`through_path`]),
//! common-subexpression elimination ([`cse`]), dead-code elimination ([`dce`]) and
//! [`optimize`], which runs the pass list [`PASSES`] in order. A pass takes a
//! graph and builds a new one (graphs are append-only); node ids change, and the
//! parameter, input and output tables are remapped.
//!
//! [`for_phase`] is not in the list either: it resolves each `TrainEval` node to the value
//! of one phase (training or evaluation), which the trainer does once per graph it derives.
//!
//! Elementwise fusion ([`crate::fuse`]) is not in this list: it makes backend kernels
//! (`Op::Fused`, which have no gradient rule), so the backends that compile them run it on
//! the optimised forward + backward graph.

use crate::ir::graph::{Graph, NodeId};
use crate::ops::Op;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// A graph pass.
pub type Pass = fn(&Graph) -> Graph;

/// The passes [`optimize`] runs, in order. To add one, write `fn(&Graph) -> Graph` and
/// list it here.
pub const PASSES: &[(&str, Pass)] = &[("paths", through_paths), ("cse", cse), ("dce", dce)];

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
    if graph.ids().all(|id| graph.node(id).op != Op::TrainEval) {
        return graph.clone();
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(graph.len());
    for id in graph.ids() {
        let node = graph.node(id);
        let inputs: Vec<NodeId> = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
        let new_id = match node.op {
            Op::TrainEval => inputs[if training { 0 } else { 1 }],
            _ => out.push_copy(node, inputs),
        };
        map.push(Some(new_id));
    }
    out.copy_tables(graph, &map);
    dce(&out)
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
    if graph.ids().all(|id| !matches!(graph.node(id).op, Op::Path { .. })) {
        return graph.clone();
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(graph.len());
    for id in graph.ids() {
        let node = graph.node(id);
        let inputs: Vec<NodeId> = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
        let new_id = match &node.op {
            Op::Path { name } if open.is_none_or(|p| p == name) => inputs[0],
            Op::Path { .. } => {
                out.add(Op::StopGrad, &inputs, &node.scope).expect("a stop-gradient takes any real value")
            }
            _ => out.push_copy(node, inputs),
        };
        map.push(Some(new_id));
    }
    out.copy_tables(graph, &map);
    out
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
