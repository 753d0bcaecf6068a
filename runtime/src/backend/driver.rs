//! The driver every backend shares (interp, jit, OpenCL): [`execute`] runs a graph node by
//! node, in creation order (which is topological), checks the fed inputs and parameters
//! against the graph's declared kinds and shapes and every result against its node's
//! signature, and drops a computed value after its last use unless it is kept for the
//! caller. It asks an [`Evaluator`] for each node's value: interp's reference rules
//! ([`super::interp`]) or a backend's own kernels.
//!
//! This module owns the driver's parts: the value lifetimes ([`Lifetimes`], computed once
//! per graph, which a backend may keep with its plan), the operands as an evaluator sees
//! them ([`Operands`]: read in place, or taken when the node is their last reader to reuse
//! their buffer) and the [`Evaluator`] contract (freed values handed back, values kept off
//! the host deferred).

use super::Values;
use crate::exec::{Arg, EvalCx, ExecError, Mode};
use crate::ir::dim::{eval_shape, shape_to_string, Binding};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::ops::{DType, Op, ValueKind};
use crate::tensor::{Float, Tensor, Value};
use std::collections::HashMap;

/// How the driver computes nodes: interp's reference rules (the eval rules of `ops`), or
/// a backend's own kernels.
pub(crate) trait Evaluator<T: Float> {
    /// The value of node `id` (= `op`) from its operands. The operands whose last reader
    /// this node is may be taken ([`Operands::take`]) and reused for the result.
    fn eval(
        &mut self,
        id: NodeId,
        op: &Op,
        operands: &mut Operands<'_, '_, T>,
        cx: &EvalCx,
    ) -> Result<Value<T>, ExecError>;

    /// A computed value the run no longer needs (after its last reader, or never read);
    /// a backend may keep its buffer for later results. Dropped by default.
    fn free(&mut self, _value: Value<T>) {}

    /// Whether node `id`'s value, just returned by [`Evaluator::eval`], lives outside the
    /// host (a device buffer the evaluator keeps for the node's device readers): the
    /// returned tensor is then an empty stand-in of the right shape, and only its kind and
    /// shape are checked. For a value the caller receives (`Lifetimes::keep`) only when the
    /// caller asked the evaluator to keep it on the device (the gradients of a device
    /// training step), since the stand-in is what the caller gets.
    fn deferred(&self, _id: NodeId) -> bool {
        false
    }
}

/// The lifetime of every value of a graph: which values go to the caller, and which
/// operands each node is the last reader of. It depends on the graph alone, so a backend
/// that runs the same graph every step computes it once ([`crate::backend::jit`] keeps it
/// with its plan); interp computes it per run (one pass over the edges).
///
/// A backend that computes a group of nodes with one kernel of its own says so with
/// [`Lifetimes::with_reads`]: the node that produces the group's value reads other
/// operands than its inputs (say, an embedding bag reading the table, the ids and the
/// mask instead of the gathered rows), and the nodes nobody reads any more (the gathered
/// rows) are skipped by the driver.
#[derive(Clone, Debug)]
pub struct Lifetimes {
    /// Node `i`'s value goes to the caller (a named output, or every node for `keep_all`).
    keep: Vec<bool>,
    /// The operands node `i` reads when they are not its inputs (see [`Lifetimes::with_reads`]).
    reads: Vec<Option<Vec<NodeId>>>,
    /// Node `i` is not computed: no node reads it and it is not kept.
    skip: Vec<bool>,
    /// `dying[i][k]`: node `i` is the last reader of its operand `k`, which is not kept;
    /// an operand read in several slots of its last reader is marked in the last one.
    dying: Vec<Box<[bool]>>,
    /// `owned[i][k]`: as `dying`, and operand `k` is read in no other slot of node `i`, so
    /// node `i` may take the value ([`Operands::take`]).
    owned: Vec<Box<[bool]>>,
    /// Node `i` has no reader and is not kept: its value is freed as soon as it exists.
    unread: Vec<bool>,
}

impl Lifetimes {
    /// Whether node `id`'s value goes to the caller.
    #[cfg_attr(not(feature = "opencl"), allow(dead_code))]
    pub(crate) fn keeps(&self, id: NodeId) -> bool {
        self.keep[id.index()]
    }

    /// Per operand of node `id`: whether `id` is its last reader (and it is not kept).
    #[cfg_attr(not(feature = "opencl"), allow(dead_code))]
    pub(crate) fn dying(&self, id: NodeId) -> &[bool] {
        &self.dying[id.index()]
    }

    pub fn new(graph: &Graph, keep_all: bool) -> Lifetimes {
        Lifetimes::with_reads(graph, keep_all, &HashMap::new())
    }

    /// The lifetimes when each node `id` of `reads` reads the operands `reads[id]` (nodes
    /// before it) instead of its inputs; the evaluator then gets those operands for it.
    /// Nodes that are no longer read by any computed node, are not kept and are no input
    /// or parameter are skipped (never computed).
    pub fn with_reads(graph: &Graph, keep_all: bool, reads: &HashMap<NodeId, Vec<NodeId>>) -> Lifetimes {
        let n = graph.len();
        let mut keep = vec![keep_all; n];
        for id in graph.outputs.values() {
            keep[id.index()] = true;
        }
        let read: Vec<Option<Vec<NodeId>>> = graph.ids().map(|id| reads.get(&id).cloned()).collect();
        let operands = |id: NodeId| read[id.index()].as_deref().unwrap_or(&graph.node(id).inputs);
        // Which nodes are computed: a reverse pass over the operands actually read.
        let mut needed = keep.clone();
        for id in graph.ids().collect::<Vec<_>>().into_iter().rev() {
            let source = matches!(graph.node(id).op, Op::Input { .. } | Op::Param { .. });
            if needed[id.index()] || source || read[id.index()].is_none() && graph.users(id).next().is_none() {
                needed[id.index()] = true;
                for &i in operands(id) {
                    needed[i.index()] = true;
                }
            }
        }
        let skip: Vec<bool> = needed.iter().map(|&k| !k).collect();
        let mut last_use = vec![usize::MAX; n];
        for id in graph.ids().filter(|id| !skip[id.index()]) {
            for &i in operands(id) {
                last_use[i.index()] = id.index();
            }
        }
        let mut dying = Vec::with_capacity(n);
        let mut owned = Vec::with_capacity(n);
        for id in graph.ids() {
            let inputs = operands(id);
            let last_slot = |k: usize| inputs[k + 1..].iter().all(|&j| j != inputs[k]);
            let d: Box<[bool]> = (0..inputs.len())
                .map(|k| {
                    let i = inputs[k].index();
                    last_use[i] == id.index() && !keep[i] && last_slot(k)
                })
                .collect();
            let o: Box<[bool]> =
                (0..inputs.len()).map(|k| d[k] && inputs[..k].iter().all(|&j| j != inputs[k])).collect();
            dying.push(d);
            owned.push(o);
        }
        let unread = (0..n).map(|i| last_use[i] == usize::MAX && !keep[i]).collect();
        Lifetimes { keep, reads: read, skip, dying, owned, unread }
    }
}

/// Where a node's value is during a run.
enum Slot<'a, T> {
    Empty,
    Computed(Value<T>),
    Fed(&'a Value<T>),
    Param(&'a Tensor<T>),
}

impl<'a, T: Float> Slot<'a, T> {
    fn arg(&self) -> Option<Arg<'_, T>> {
        match self {
            Slot::Empty => None,
            Slot::Computed(v) => Some(Arg::Value(v)),
            Slot::Fed(v) => Some(Arg::Value(v)),
            Slot::Param(t) => Some(Arg::Param(t)),
        }
    }

    fn into_value(self) -> Option<Value<T>> {
        match self {
            Slot::Empty => None,
            Slot::Computed(v) => Some(v),
            Slot::Fed(v) => Some(v.clone()),
            Slot::Param(t) => Some(Value::Dense(t.clone())),
        }
    }
}

/// The operands of the node being computed, as an [`Evaluator`] sees them: read in place
/// ([`Operands::args`]), or taken when this node is their last reader ([`Operands::take`]).
pub(crate) struct Operands<'s, 'a, T> {
    slots: &'s mut [Slot<'a, T>],
    inputs: &'s [NodeId],
    owned: &'s [bool],
}

impl<T: Float> Operands<'_, '_, T> {
    /// Operand `k` read in place (`None` once taken).
    pub fn arg(&self, k: usize) -> Option<Arg<'_, T>> {
        self.slots[self.inputs[k].index()].arg()
    }

    /// Every operand read in place, or an error naming `op` when one was taken.
    pub fn args(&self, op: &Op) -> Result<Vec<Arg<'_, T>>, ExecError> {
        self.inputs
            .iter()
            .map(|i| self.slots[i.index()].arg())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ExecError::BadOperand { op: op.name(), message: "an operand was freed too early".into() })
    }

    /// Operand `k`'s value, moved out, when this node is its last reader, it is read in no
    /// other slot and it was computed during the run (fed inputs and parameters belong to
    /// the caller); `None` otherwise, and the operand stays readable.
    pub fn take(&mut self, k: usize) -> Option<Value<T>> {
        if !self.owned[k] {
            return None;
        }
        let slot = &mut self.slots[self.inputs[k].index()];
        match std::mem::replace(slot, Slot::Empty) {
            Slot::Computed(v) => Some(v),
            other => {
                *slot = other;
                None
            }
        }
    }
}

/// Evaluates the graph node by node with `evaluator` computing each op; checks feeds,
/// parameters and every result's shape; frees values after their last use (`lifetimes`,
/// which must be those of `graph`), handing computed ones to [`Evaluator::free`].
pub(crate) fn execute<'a, T: Float>(
    graph: &Graph,
    lifetimes: &Lifetimes,
    binding: &Binding,
    feeds: &'a HashMap<String, Value<T>>,
    params: &'a HashMap<String, Tensor<T>>,
    mode: &Mode,
    evaluator: &mut dyn Evaluator<T>,
) -> Result<Values<T>, ExecError> {
    let n = graph.len();
    let Lifetimes { keep, reads, skip, dying, owned, unread } = lifetimes;
    if keep.len() != n {
        return Err(ExecError::BadOperand {
            op: "run".into(),
            message: "the lifetimes are those of another graph".into(),
        });
    }
    let mut slots: Vec<Slot<'a, T>> = (0..n).map(|_| Slot::Empty).collect();
    for id in graph.ids() {
        if skip[id.index()] {
            continue;
        }
        let node = graph.node(id);
        let inputs = reads[id.index()].as_deref().unwrap_or(&node.inputs);
        let at_node = |error: ExecError| ExecError::AtNode {
            node: id.index(),
            op: node.op.name(),
            scope: node.scope.clone(),
            error: Box::new(error),
        };
        let out_shape = eval_shape(&node.sig.shape, binding).map_err(|message| at_node(ExecError::Size { message }))?;
        let slot = match &node.op {
            Op::Input { name, dtype } => Slot::Fed(fed_input(node, name, *dtype, &out_shape, feeds)?),
            Op::Param { name } => {
                let t = params.get(name).ok_or_else(|| ExecError::MissingParam { name: name.clone() })?;
                if t.data.len() != t.shape.iter().product::<usize>() {
                    return Err(ExecError::Malformed {
                        what: "parameter",
                        name: name.clone(),
                        shape: t.shape.clone(),
                        len: t.data.len(),
                    });
                }
                if t.shape != out_shape {
                    return Err(ExecError::ShapeMismatch {
                        what: "parameter",
                        name: name.clone(),
                        declared: shape_to_string(&node.sig.shape),
                        expected: out_shape,
                        got: t.shape.clone(),
                    });
                }
                Slot::Param(t)
            }
            op => {
                let cx = EvalCx { binding, mode, out_shape: &out_shape };
                let mut operands = Operands { slots: &mut slots, inputs, owned: &owned[id.index()] };
                let value = evaluator.eval(id, op, &mut operands, &cx).map_err(at_node)?;
                let deferred = evaluator.deferred(id);
                check_result(node, &value, &out_shape, deferred).map_err(at_node)?;
                Slot::Computed(value)
            }
        };
        slots[id.index()] = slot;
        for (&i, &d) in inputs.iter().zip(dying[id.index()].iter()) {
            if d {
                if let Slot::Computed(v) = std::mem::replace(&mut slots[i.index()], Slot::Empty) {
                    evaluator.free(v);
                }
            }
        }
        if unread[id.index()] {
            if let Slot::Computed(v) = std::mem::replace(&mut slots[id.index()], Slot::Empty) {
                evaluator.free(v);
            }
        }
    }
    let values = slots.into_iter().zip(keep).map(|(s, &k)| if k { s.into_value() } else { None }).collect();
    Ok(Values::new(values, graph.outputs.clone()))
}

/// The feed of an input, checked against its declared kind and shape.
fn fed_input<'a, T: Float>(
    node: &Node,
    name: &str,
    dtype: DType,
    shape: &[usize],
    feeds: &'a HashMap<String, Value<T>>,
) -> Result<&'a Value<T>, ExecError> {
    let v = feeds.get(name).ok_or_else(|| ExecError::MissingFeed { name: name.to_string() })?;
    let expected = match dtype {
        DType::F => "a dense tensor",
        DType::I => "ids",
    };
    let kind_ok = matches!((dtype, v), (DType::F, Value::Dense(_)) | (DType::I, Value::Ids(_)));
    if !kind_ok {
        return Err(ExecError::KindMismatch { name: name.to_string(), expected, got: v.kind_name() });
    }
    let len = match v {
        Value::Dense(t) => t.data.len(),
        Value::Ids(t) => t.data.len(),
        Value::RowSparse { .. } => 0,
    };
    if len != v.shape().iter().product::<usize>() {
        return Err(ExecError::Malformed { what: "input", name: name.to_string(), shape: v.shape().to_vec(), len });
    }
    if v.shape() != shape {
        return Err(ExecError::ShapeMismatch {
            what: "input",
            name: name.to_string(),
            declared: shape_to_string(&node.sig.shape),
            expected: shape.to_vec(),
            got: v.shape().to_vec(),
        });
    }
    Ok(v)
}

/// An eval rule's result must match the node's signature (catches rule bugs at once).
fn check_result<T: Float>(node: &Node, value: &Value<T>, shape: &[usize], deferred: bool) -> Result<(), ExecError> {
    let kind_ok = matches!(
        (node.sig.dtype, node.sig.kind, value),
        (DType::F, ValueKind::Dense, Value::Dense(_))
            | (DType::I, ValueKind::Dense, Value::Ids(_))
            | (DType::F, ValueKind::RowSparse, Value::RowSparse { .. })
    );
    let data_ok = match value {
        Value::Dense(t) if deferred => t.data.is_empty(),
        Value::Dense(t) => t.data.len() == t.shape.iter().product::<usize>(),
        Value::Ids(t) => t.data.len() == t.shape.iter().product::<usize>(),
        Value::RowSparse { rows, values, .. } => values.shape.first() == Some(&rows.len()),
    };
    if !kind_ok || !data_ok || value.shape() != shape {
        return Err(ExecError::BadOperand {
            op: node.op.name(),
            message: format!(
                "the eval rule produced {} of shape {:?}, expected {shape:?}",
                value.kind_name(),
                value.shape()
            ),
        });
    }
    Ok(())
}
