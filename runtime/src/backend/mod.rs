//! Backends: what executes a graph on concrete values. `interp` is the plain-Rust reference
//! (the oracle for every other backend and for the gradient checks). This module holds what
//! all backends share: the [`Executor`] contract, the result of a run ([`Values`]), the
//! plans kept per graph ([`PlanCache`]), the per-op-kind and per-node times of a profiling backend
//! ([`OpProfile`], keyed by [`profile_key`]) and the re-exported run [`Mode`] and
//! [`ExecError`]. The driver that runs a graph node by node for every backend is
//! [`driver`]'s.

pub(crate) mod driver;
pub mod interp;
pub mod jit;
#[cfg(feature = "opencl")]
pub mod opencl;

pub use crate::exec::{ExecError, Mode};
pub use interp::Interp;

use crate::ir::dim::shape_to_string;
use crate::ir::graph::{Graph, NodeId};
use crate::ops::Op;
use crate::tensor::{Float, Tensor, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Time and calls per op kind, collected by a backend while profiling is on (what
/// [`Executor::profile`] returns, largest first), and per node when asked
/// ([`OpProfile::set_by_node`], what [`Executor::node_profile`] returns).
#[derive(Clone, Debug, Default)]
pub struct OpProfile {
    on: bool,
    by_node: bool,
    times: HashMap<String, (Duration, usize)>,
    /// By the node's index in the graph run and its key (one graph is profiled at a time).
    nodes: HashMap<(usize, String), NodeTime>,
}

/// The time of one node of the graph a backend ran (its plan's graph: fused kernels are
/// nodes), with what locates it in the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeTime {
    /// The [`profile_key`] of its op.
    pub kind: String,
    /// Where in the spec it comes from (`click/mlp/linear/y`; `grad:` marks the backward).
    pub scope: String,
    /// Its shape and its operands', symbolic (`[B, 256]`).
    pub shape: String,
    pub operands: Vec<String>,
    pub time: Duration,
    pub calls: usize,
}

impl OpProfile {
    /// Turns recording on (starting afresh) or off.
    pub fn set_on(&mut self, on: bool) {
        self.on = on;
        if on {
            self.times.clear();
            self.nodes.clear();
        }
    }

    /// Also records each node's time ([`OpProfile::record_node`]); off by default, since
    /// the bookkeeping takes a little of the time it measures.
    pub fn set_by_node(&mut self, by_node: bool) {
        self.by_node = by_node;
    }

    /// The profile to record into while it is on, else `None`.
    pub fn recording(&mut self) -> Option<&mut OpProfile> {
        self.on.then_some(self)
    }

    pub fn record(&mut self, key: String, time: Duration) {
        let entry = self.times.entry(key).or_insert((Duration::ZERO, 0));
        entry.0 += time;
        entry.1 += 1;
    }

    /// [`OpProfile::record`] of node `id` of `graph` (the graph being run), and the
    /// node's own time when recording by node.
    pub fn record_node(&mut self, key: String, graph: &Graph, id: NodeId, time: Duration) {
        if self.by_node {
            let node = self.nodes.entry((id.index(), key.clone())).or_insert_with(|| {
                let n = graph.node(id);
                NodeTime {
                    kind: key.clone(),
                    scope: n.scope.clone(),
                    shape: shape_to_string(&n.sig.shape),
                    operands: n.inputs.iter().map(|&i| shape_to_string(graph.shape(i))).collect(),
                    time: Duration::ZERO,
                    calls: 0,
                }
            });
            node.time += time;
            node.calls += 1;
        }
        self.record(key, time);
    }

    /// Every node's time (when recorded by node), largest first.
    pub fn nodes_sorted(&self) -> Vec<NodeTime> {
        let mut v: Vec<NodeTime> = self.nodes.values().cloned().collect();
        v.sort_by_key(|n| std::cmp::Reverse(n.time));
        v
    }

    /// `(kind, total time, calls)`, largest time first.
    pub fn sorted(&self) -> Vec<(String, Duration, usize)> {
        let mut v: Vec<(String, Duration, usize)> = self.times.iter().map(|(k, (d, n))| (k.clone(), *d, *n)).collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.1));
        v
    }
}

/// The profile key of an op: its kind without sizes (`matmul`), a fused kernel by its ops
/// (`fused add,relu`, cut to 40 characters).
pub fn op_kind(op: &Op) -> String {
    if let Op::Fused(k) = op {
        let mut ops = k.summary();
        if ops.len() > 40 {
            let cut = (0..=37).rev().find(|&i| ops.is_char_boundary(i)).unwrap_or(0);
            ops.truncate(cut);
            ops.push_str("...");
        }
        return format!("fused {ops}");
    }
    op.name().split_whitespace().next().unwrap_or("").to_string()
}

/// The profile key of an op ([`op_kind`]) as a backend ran it: plain when its own kernel
/// computed it, marked `(eval)` when it ran on its eval rule (the backend has no kernel
/// for the op or for its shapes, or none on its device): where a new kernel would pay.
/// `matmul`, `reduce_max(eval)`, `fused add,relu`, `fused(eval) add,relu`.
pub fn profile_key(op: &Op, on_eval_rule: bool) -> String {
    let key = op_kind(op);
    match op {
        Op::Fused(_) if on_eval_rule => key.replacen("fused", "fused(eval)", 1),
        _ if on_eval_rule => format!("{key}(eval)"),
        _ => key,
    }
}

/// The plans a backend made for the graphs it ran last, most recent first (training
/// alternates two: the train and the eval graph). A graph is recognised by value: the
/// same nodes (ops, operands, signatures) in the same order and the same parameter, input
/// and output tables, which is O(nodes) comparisons and no allocation per run; a graph
/// rebuilt or changed between runs gets a new plan, never a stale one.
#[derive(Debug)]
pub(crate) struct PlanCache<P> {
    entries: Vec<(crate::ir::graph::Graph, P)>,
}

impl<P> Default for PlanCache<P> {
    fn default() -> PlanCache<P> {
        PlanCache { entries: Vec::new() }
    }
}

impl<P> PlanCache<P> {
    /// How many plans are kept.
    const KEPT: usize = 4;

    /// Puts the plan of `graph` first; `false` when there is none (then [`insert`] one).
    ///
    /// [`insert`]: PlanCache::insert
    pub fn promote(&mut self, graph: &crate::ir::graph::Graph) -> bool {
        let same = |a: &crate::ir::graph::Graph| {
            a.len() == graph.len()
                && a.outputs == graph.outputs
                && a.params == graph.params
                && a.states == graph.states
                && a.inputs == graph.inputs
                && a.ids().all(|id| a.node(id) == graph.node(id))
        };
        match self.entries.iter().position(|(g, _)| same(g)) {
            Some(i) => {
                let entry = self.entries.remove(i);
                self.entries.insert(0, entry);
                true
            }
            None => false,
        }
    }

    /// Puts `plan`, made for `graph`, first (dropping the least recent beyond a few).
    pub fn insert(&mut self, graph: &crate::ir::graph::Graph, plan: P) {
        self.entries.insert(0, (graph.clone(), plan));
        self.entries.truncate(Self::KEPT);
    }

    /// The most recent plan (after [`promote`] or [`insert`]); `None` when empty.
    ///
    /// [`promote`]: PlanCache::promote
    /// [`insert`]: PlanCache::insert
    pub fn first(&self) -> Option<&P> {
        self.entries.first().map(|(_, p)| p)
    }

    /// How many plans are kept now (for the OpenCL executor's `Debug`).
    #[cfg_attr(not(feature = "opencl"), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// The values a run produced, by node and by output name. Which nodes are kept depends on
/// how the graph was run (`interp::run` keeps the named outputs, `interp::run_keep_all`
/// every node).
#[derive(Clone, Debug)]
pub struct Values<T> {
    values: Vec<Option<Value<T>>>,
    outputs: BTreeMap<String, NodeId>,
}

impl<T: Float> Values<T> {
    pub(crate) fn new(values: Vec<Option<Value<T>>>, outputs: BTreeMap<String, NodeId>) -> Values<T> {
        Values { values, outputs }
    }

    /// The value of a node, if it was kept.
    pub fn node(&self, id: NodeId) -> Option<&Value<T>> {
        self.values.get(id.index()).and_then(|v| v.as_ref())
    }

    /// The value of a named output (`loss`, `grad/<param>`, ...).
    pub fn output(&self, name: &str) -> Option<&Value<T>> {
        self.outputs.get(name).and_then(|&id| self.node(id))
    }

    /// A named output as a dense tensor (`None` if absent or not dense).
    pub fn dense(&self, name: &str) -> Option<&Tensor<T>> {
        self.output(name).and_then(|v| v.as_dense())
    }

    /// A scalar output's value.
    pub fn scalar(&self, name: &str) -> Option<T> {
        self.dense(name).filter(|t| t.numel() == 1).map(|t| t.data[0])
    }

    /// Moves a named output out (later lookups of it, by name or node, give `None`).
    pub fn take_output(&mut self, name: &str) -> Option<Value<T>> {
        let id = *self.outputs.get(name)?;
        self.values.get_mut(id.index()).and_then(|v| v.take())
    }

    /// The same named outputs keyed by the node ids of `graph`, a graph with the same
    /// output names (for backends that run a transformed copy of the caller's graph, such
    /// as the jit's fused plan): lookups by name or by `graph`'s node ids then work.
    pub(crate) fn rekey(mut self, graph: &crate::ir::graph::Graph) -> Values<T> {
        let mut values: Vec<Option<Value<T>>> = (0..graph.len()).map(|_| None).collect();
        let mut placed: BTreeMap<usize, usize> = BTreeMap::new();
        for (name, &id) in &graph.outputs {
            let Some(&from) = self.outputs.get(name) else { continue };
            if placed.get(&from.index()) == Some(&id.index()) {
                continue;
            }
            let taken = self.values.get_mut(from.index()).and_then(|v| v.take());
            let v = taken.or_else(|| placed.get(&from.index()).and_then(|&to| values[to].clone()));
            placed.insert(from.index(), id.index());
            if id.index() < values.len() {
                values[id.index()] = v;
            }
        }
        Values { values, outputs: graph.outputs.clone() }
    }

    /// The names of the outputs, sorted.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.keys().map(|s| s.as_str())
    }
}

/// A backend that runs graphs in f32 for training and evaluation. A backend may compile
/// and cache a plan per graph and concrete binding (the batch size changes only for the
/// last batch of an epoch); `run` gives the same results as `interp::run` up to rounding.
/// Training is not part of the contract: [`crate::training`] builds it on `run` and the
/// two optional capabilities below.
pub trait Executor {
    /// The backend's name (`interp`, `jit`, ...).
    fn name(&self) -> &'static str;

    /// Where the backend runs, for reports: the device's name and kind for a backend with
    /// a device, `None` for those that compute on the host's cores.
    fn device_name(&self) -> Option<String> {
        None
    }

    /// Turns per-op timing on or off (backends without profiling ignore it).
    fn set_profiling(&mut self, _on: bool) {}

    /// Time spent per op kind since profiling was turned on: `(kind, total time, calls)`,
    /// largest first; empty for backends without profiling.
    fn profile(&self) -> Vec<(String, std::time::Duration, usize)> {
        Vec::new()
    }

    /// Whether profiling also times each node on its own ([`OpProfile::set_by_node`]).
    fn set_profiling_by_node(&mut self, _on: bool) {}

    /// Time spent per node since profiling was turned on, when timed by node, largest
    /// first; empty otherwise and for backends without profiling.
    fn node_profile(&self) -> Vec<NodeTime> {
        Vec::new()
    }

    /// `(bytes written to, bytes read from)` the device since the executor was made, for
    /// backends with a device of their own; `None` for those that compute in host memory.
    fn transfers(&self) -> Option<(u64, u64)> {
        None
    }

    /// Makes `graph` runnable at the sizes of `binding` before its first run (the jit's
    /// fusion pass and kernel compilation), so that the first `run` pays only for running
    /// and the cost of a plan can be measured apart. Backends with nothing to prepare do
    /// nothing; `run` prepares whatever was not.
    fn prepare(
        &mut self,
        _graph: &crate::ir::graph::Graph,
        _binding: &crate::ir::dim::Binding,
    ) -> Result<(), ExecError> {
        Ok(())
    }

    /// Compiled kernels for the host's optimizer step ([`crate::training::update`]), for a
    /// backend that has them (the jit); `None` (the default): the optimizer's reference
    /// loops. Either way the results are the reference optimizer's, bit for bit.
    fn update_kernels(&self) -> Option<&dyn crate::optim::UpdateKernels<f32>> {
        None
    }

    /// Training on the backend's device, for a backend that keeps parameters there (the
    /// trainer asks for it: [`crate::training`]); `None` (the default) for backends that
    /// compute in host memory, whose training steps run on the host.
    fn device_training(&mut self) -> Option<&mut dyn crate::training::DeviceTraining> {
        None
    }

    /// Runs `graph` and keeps its named outputs.
    fn run(
        &mut self,
        graph: &crate::ir::graph::Graph,
        binding: &crate::ir::dim::Binding,
        feeds: &std::collections::HashMap<String, Value<f32>>,
        params: &std::collections::HashMap<String, Tensor<f32>>,
        mode: &Mode,
    ) -> Result<Values<f32>, ExecError>;
}
