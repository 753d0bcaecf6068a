//! The dataflow graph: nodes are primitive ops ([`crate::ops::Op`]) with their inferred
//! signature; edges carry values from producer to consumer (edge weight = operand slot).
//!
//! Graphs are built append-only through [`Graph::add`], which runs the op's shape rule,
//! so every node in a graph has a checked signature. Passes build new graphs rather than
//! mutate old ones.

use crate::ir::dim::{shape_to_string, Dim, Shape};
use crate::ops::{DType, Op, Operand, ShapeError, Signature, ValueKind};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BTreeMap;

pub type NodeId = NodeIndex<u32>;

/// One operation and what it produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub sig: Signature,
    /// Where in the spec the node comes from (e.g. `deep/linear1`), for listings.
    pub scope: String,
}

/// How a parameter starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    /// Normal with this standard deviation.
    Normal(f64),
    /// Uniform in `[-limit, limit]`.
    Uniform(f64),
    /// Glorot (Xavier) uniform over the last two axes' fan-in and fan-out.
    Glorot,
}

/// A trainable parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Shape,
    pub init: Init,
    /// The named group it belongs to (for freezing in staged training), if any.
    pub group: Option<String>,
    /// An embedding table: its gradient is row-sparse and its update touches only those rows.
    pub embedding: bool,
    pub node: NodeId,
}

/// Model state that is not trained (batch norm's running mean and variance): read like a
/// parameter (an `Op::Param` node, a tensor of the model's tensors), but never
/// differentiated, never seen by an optimizer and not counted as a parameter. A training
/// step replaces it with the graph's output [`state_output`]`(name)`, its update rule
/// computed by the graph itself; checkpoints keep it beside the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct StateInfo {
    pub name: String,
    pub shape: Shape,
    /// Every element's value before the first training step.
    pub initial: f64,
    pub node: NodeId,
}

/// The output of a training graph that holds the next value of state `name`.
pub fn state_output(name: &str) -> String {
    format!("state/{name}")
}

/// A batch input the data pipeline feeds.
#[derive(Clone, Debug, PartialEq)]
pub struct InputInfo {
    pub name: String,
    pub shape: Shape,
    pub dtype: DType,
    pub node: NodeId,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: DiGraph<Node, u32>,
    pub params: Vec<ParamInfo>,
    /// Untrained model state (running statistics), read through `Op::Param` nodes too.
    pub states: Vec<StateInfo>,
    pub inputs: Vec<InputInfo>,
    /// Named results: `loss`, the logit of each task, parameter gradients (`grad/<param>`),
    /// the next value of each state (`state/<state>`, [`state_output`]).
    pub outputs: BTreeMap<String, NodeId>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn sig(&self, id: NodeId) -> &Signature {
        &self.g[id].sig
    }

    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.g[id].sig.shape
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Node ids in creation order, which is a topological order (operands always exist
    /// before their consumers).
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// The consumers of a node with the operand slot they read it in.
    pub fn users(&self, id: NodeId) -> impl Iterator<Item = (NodeId, u32)> + '_ {
        self.g.edges_directed(id, Direction::Outgoing).map(|e| (e.target(), *e.weight()))
    }

    fn push(&mut self, op: Op, inputs: Vec<NodeId>, sig: Signature, scope: &str) -> NodeId {
        let id = self.g.add_node(Node { op, inputs: inputs.clone(), sig, scope: scope.to_string() });
        for (slot, &i) in inputs.iter().enumerate() {
            self.g.add_edge(i, id, slot as u32);
        }
        id
    }

    /// Appends a copy of `node` (already checked in another graph) reading `inputs`, ids in
    /// this graph whose signatures match the originals. For passes that rebuild a graph.
    pub(crate) fn push_copy(&mut self, node: &Node, inputs: Vec<NodeId>) -> NodeId {
        self.push(node.op.clone(), inputs, node.sig.clone(), &node.scope)
    }

    /// Copies the parameter, state, input and output tables of `from` into this graph, with node
    /// ids mapped through `map` (old index → new id); entries whose node has no image are
    /// left out.
    pub(crate) fn copy_tables(&mut self, from: &Graph, map: &[Option<NodeId>]) {
        let image = |id: NodeId| map.get(id.index()).copied().flatten();
        for p in &from.params {
            if let Some(node) = image(p.node) {
                self.params.push(ParamInfo { node, ..p.clone() });
            }
        }
        for st in &from.states {
            if let Some(node) = image(st.node) {
                self.states.push(StateInfo { node, ..st.clone() });
            }
        }
        for i in &from.inputs {
            if let Some(node) = image(i.node) {
                self.inputs.push(InputInfo { node, ..i.clone() });
            }
        }
        for (name, &id) in &from.outputs {
            if let Some(node) = image(id) {
                self.outputs.insert(name.clone(), node);
            }
        }
    }

    /// Adds an op after checking its shape rule against its operands.
    pub fn add(&mut self, op: Op, inputs: &[NodeId], scope: &str) -> Result<NodeId, ShapeError> {
        let operands: Vec<Operand> = inputs
            .iter()
            .map(|&i| {
                let s = &self.g[i].sig;
                Operand { shape: &s.shape, dtype: s.dtype, kind: s.kind }
            })
            .collect();
        let sig = op.infer(&operands)?;
        Ok(self.push(op, inputs.to_vec(), sig, scope))
    }

    /// Declares a batch input. Its first axis is normally the batch (`B`).
    pub fn input(&mut self, name: &str, shape: Shape, dtype: DType) -> NodeId {
        let sig = Signature { shape: shape.clone(), dtype, kind: ValueKind::Dense };
        let node = self.push(Op::Input { name: name.to_string(), dtype }, vec![], sig, "input");
        self.inputs.push(InputInfo { name: name.to_string(), shape, dtype, node });
        node
    }

    /// Declares a parameter (names are unique; the caller ensures it).
    pub fn param(&mut self, name: &str, shape: Shape, init: Init, group: Option<String>, embedding: bool) -> NodeId {
        let sig = Signature::dense(shape.clone());
        let node = self.push(Op::Param { name: name.to_string() }, vec![], sig, name);
        self.params.push(ParamInfo { name: name.to_string(), shape, init, group, embedding, node });
        node
    }

    /// Declares untrained model state of `shape`, every element `initial` at the start
    /// (names are unique among parameters and states; the caller ensures it). The caller
    /// names its next value with the output [`state_output`]`(name)`.
    pub fn state(&mut self, name: &str, shape: Shape, initial: f64) -> NodeId {
        let sig = Signature::dense(shape.clone());
        let node = self.push(Op::Param { name: name.to_string() }, vec![], sig, name);
        self.states.push(StateInfo { name: name.to_string(), shape, initial, node });
        node
    }

    pub fn state_info(&self, name: &str) -> Option<&StateInfo> {
        self.states.iter().find(|p| p.name == name)
    }

    /// The nodes that declare something (parameters, states and inputs): passes keep them
    /// all, so the graph's tables stay complete.
    pub fn declared_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.params
            .iter()
            .map(|p| p.node)
            .chain(self.states.iter().map(|s| s.node))
            .chain(self.inputs.iter().map(|i| i.node))
    }

    pub fn param_info(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn input_info(&self, name: &str) -> Option<&InputInfo> {
        self.inputs.iter().find(|p| p.name == name)
    }

    /// A human-readable listing, one node per line:
    /// `%12 = matmul(%3, %7) : [B, 256]   # deep/linear0`.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        for id in self.ids() {
            let n = &self.g[id];
            let args: Vec<String> = n.inputs.iter().map(|i| format!("%{}", i.index())).collect();
            let kind = match (n.sig.dtype, n.sig.kind) {
                (DType::I, _) => " ids",
                (_, ValueKind::RowSparse) => " row-sparse",
                _ => "",
            };
            let args = if args.is_empty() { String::new() } else { format!("({})", args.join(", ")) };
            out.push_str(&format!(
                "%{} = {}{} : {}{}",
                id.index(),
                n.op.name(),
                args,
                shape_to_string(&n.sig.shape),
                kind
            ));
            if !n.scope.is_empty() {
                out.push_str(&format!("   # {}", n.scope));
            }
            out.push('\n');
        }
        for (name, id) in &self.outputs {
            out.push_str(&format!("output {name} = %{}\n", id.index()));
        }
        out
    }

    /// Graphviz text of the graph (`dot -Tsvg` renders it).
    pub fn to_dot(&self) -> String {
        fn esc(s: &str) -> String {
            s.replace('\\', "\\\\").replace('"', "\\\"")
        }
        let mut out =
            String::from("digraph mdl {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
        for id in self.ids() {
            let n = &self.g[id];
            let color = match n.op {
                Op::Param { .. } => "lightblue",
                Op::Input { .. } => "lightgreen",
                _ => "white",
            };
            out.push_str(&format!(
                "  n{} [label=\"%{} {}\\n{}\\n{}\", style=filled, fillcolor={color}];\n",
                id.index(),
                id.index(),
                esc(&n.op.name()),
                esc(&shape_to_string(&n.sig.shape)),
                esc(&n.scope)
            ));
        }
        for e in self.g.edge_references() {
            out.push_str(&format!(
                "  n{} -> n{} [label=\"{}\"];\n",
                e.source().index(),
                e.target().index(),
                e.weight()
            ));
        }
        for (name, id) in &self.outputs {
            out.push_str(&format!(
                "  out_{0} [label=\"{1}\", shape=oval];\n  n{2} -> out_{0};\n",
                sanitize(name),
                esc(name),
                id.index()
            ));
        }
        out.push_str("}\n");
        out
    }

    /// A scalar dimension helper for rules: the size of `axis` of node `id`.
    pub fn dim(&self, id: NodeId, axis: usize) -> Dim {
        self.shape(id)[axis].clone()
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}
