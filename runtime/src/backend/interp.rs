//! The reference backend: evaluates a graph node by node, in creation order (which is
//! topological), with the eval rules of `ops/*`, generic over f32 and f64. Fed inputs and
//! parameters are read in place and checked against the graph's declared shapes; a computed
//! value is dropped after its last use unless it is kept for the caller.

use super::Values;
use crate::exec::{Arg, EvalCx, ExecError, Mode};
use crate::ir::dim::{eval_shape, shape_to_string, Binding};
use crate::ir::graph::{Graph, Node};
use crate::ops::{self, DType, Op, ValueKind};
use crate::tensor::{Float, Tensor, Value};
use std::collections::HashMap;

/// Runs `graph` and keeps the values of its named outputs.
pub fn run<T: Float>(
    graph: &Graph,
    binding: &Binding,
    feeds: &HashMap<String, Value<T>>,
    params: &HashMap<String, Tensor<T>>,
    mode: &Mode,
) -> Result<Values<T>, ExecError> {
    execute(graph, binding, feeds, params, mode, false, &mut |op, args, cx| ops::eval(op, args, cx))
}

/// The signature of a per-op evaluator: the eval rules of `ops` for interp; a backend's
/// own kernels (falling back to the eval rules) for others.
pub type OpEval<'e, T> = dyn FnMut(&Op, &[Arg<T>], &EvalCx) -> Result<Value<T>, ExecError> + 'e;

/// Runs `graph` and keeps the value of every node (for tests and debugging; parameters and
/// fed inputs are copied into the result).
pub fn run_keep_all<T: Float>(
    graph: &Graph,
    binding: &Binding,
    feeds: &HashMap<String, Value<T>>,
    params: &HashMap<String, Tensor<T>>,
    mode: &Mode,
) -> Result<Values<T>, ExecError> {
    execute(graph, binding, feeds, params, mode, true, &mut |op, args, cx| ops::eval(op, args, cx))
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

/// Evaluates the graph node by node with `eval` computing each op; checks feeds,
/// parameters and every result's shape; frees values after their last use.
pub(crate) fn execute<'a, T: Float>(
    graph: &Graph,
    binding: &Binding,
    feeds: &'a HashMap<String, Value<T>>,
    params: &'a HashMap<String, Tensor<T>>,
    mode: &Mode,
    keep_all: bool,
    eval: &mut OpEval<'_, T>,
) -> Result<Values<T>, ExecError> {
    let n = graph.len();
    let mut keep = vec![keep_all; n];
    for id in graph.outputs.values() {
        keep[id.index()] = true;
    }
    let mut last_use = vec![0usize; n];
    for id in graph.ids() {
        for &i in &graph.node(id).inputs {
            last_use[i.index()] = last_use[i.index()].max(id.index());
        }
    }

    let mut slots: Vec<Slot<'a, T>> = (0..n).map(|_| Slot::Empty).collect();
    for id in graph.ids() {
        let node = graph.node(id);
        let at_node = |error: ExecError| ExecError::AtNode {
            node: id.index(),
            op: node.op.name(),
            scope: node.scope.clone(),
            error: Box::new(error),
        };
        let out_shape = eval_shape(&node.sig.shape, binding).map_err(|message| at_node(ExecError::Size { message }))?;
        slots[id.index()] = match &node.op {
            Op::Input { name, dtype } => Slot::Fed(fed_input(node, name, *dtype, &out_shape, feeds)?),
            Op::Param { name } => {
                let t = params.get(name).ok_or_else(|| ExecError::MissingParam { name: name.clone() })?;
                if t.data.len() != t.shape.iter().product::<usize>() {
                    return Err(ExecError::Malformed { what: "parameter", name: name.clone(), shape: t.shape.clone(), len: t.data.len() });
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
                let args =
                    node.inputs.iter().map(|i| slots[i.index()].arg()).collect::<Option<Vec<_>>>().ok_or_else(|| {
                        at_node(ExecError::BadOperand { op: op.name(), message: "an operand was freed too early".into() })
                    })?;
                let cx = EvalCx { binding, mode, out_shape: &out_shape };
                let value = eval(op, &args, &cx).map_err(at_node)?;
                check_result(node, &value, &out_shape).map_err(at_node)?;
                Slot::Computed(value)
            }
        };
        for &i in &node.inputs {
            if last_use[i.index()] == id.index() && !keep[i.index()] {
                slots[i.index()] = Slot::Empty;
            }
        }
        if !keep[id.index()] && graph.users(id).next().is_none() {
            slots[id.index()] = Slot::Empty;
        }
    }
    let values = slots.into_iter().zip(&keep).map(|(s, &k)| if k { s.into_value() } else { None }).collect();
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
fn check_result<T: Float>(node: &Node, value: &Value<T>, shape: &[usize]) -> Result<(), ExecError> {
    let kind_ok = matches!(
        (node.sig.dtype, node.sig.kind, value),
        (DType::F, ValueKind::Dense, Value::Dense(_))
            | (DType::I, ValueKind::Dense, Value::Ids(_))
            | (DType::F, ValueKind::RowSparse, Value::RowSparse { .. })
    );
    let data_ok = match value {
        Value::Dense(t) => t.data.len() == t.shape.iter().product::<usize>(),
        Value::Ids(t) => t.data.len() == t.shape.iter().product::<usize>(),
        Value::RowSparse { rows, values, .. } => values.shape.first() == Some(&rows.len()),
    };
    if !kind_ok || !data_ok || value.shape() != shape {
        return Err(ExecError::BadOperand {
            op: node.op.name(),
            message: format!("the eval rule produced {} of shape {:?}, expected {shape:?}", value.kind_name(), value.shape()),
        });
    }
    Ok(())
}
