//! Reverse-mode autodiff as a graph-to-graph transform: [`differentiate`] returns a new
//! graph holding the forward graph (same node ids) plus backward nodes of the same IR, so
//! every backend runs the backward pass with its ordinary kernels.
//!
//! The walk is the whole algorithm: nodes on a path from a wanted parameter to the loss are
//! visited in reverse creation order; each one's cotangent is the sum of what its users sent
//! it, and the op's `grad` rule (in its family file under `ops/`) turns that into cotangents
//! for its operands. Row-sparse cotangents of an embedding table (one SparseRows per Gather)
//! are joined into a single SparseRows instead of being added.

use crate::ir::dim::shape_to_string;
use crate::ir::graph::{Graph, NodeId};
use crate::ops::{self, DType, Op, ShapeError, ValueKind};
use crate::passes::retain;
use std::fmt;

/// Why a gradient graph could not be built.
#[derive(Clone, Debug, PartialEq)]
pub enum AutodiffError {
    /// The loss node is not in the graph.
    UnknownNode(usize),
    /// The loss must be a real scalar (shape `[]`).
    LossNotScalar { shape: String },
    /// A requested parameter is not declared in the graph.
    UnknownParam(String),
    /// A gradient rule could not build its nodes.
    Rule { node: usize, op: String, error: ShapeError },
    /// A gradient rule produced a cotangent of the wrong shape (a bug in that rule).
    BadCotangent { node: usize, op: String, operand: usize, expected: String, got: String },
    /// A parameter received both row-sparse and dense cotangents.
    MixedSparse { param: String },
}

impl fmt::Display for AutodiffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutodiffError::UnknownNode(n) => write!(f, "node %{n} is not in the graph"),
            AutodiffError::LossNotScalar { shape } => write!(f, "the loss must be a real scalar, got {shape}"),
            AutodiffError::UnknownParam(p) => write!(f, "no parameter named `{p}`"),
            AutodiffError::Rule { node, op, error } => write!(f, "gradient of node %{node} ({op}): {error}"),
            AutodiffError::BadCotangent { node, op, operand, expected, got } => {
                write!(f, "gradient of node %{node} ({op}): the cotangent of operand {operand} has shape {got}, expected {expected}")
            }
            AutodiffError::MixedSparse { param } => {
                write!(f, "parameter `{param}` gets both row-sparse and dense gradients")
            }
        }
    }
}

impl std::error::Error for AutodiffError {}

/// The graph of `loss` and its gradient with respect to the parameters named in `wrt`.
///
/// The result holds every node of `graph` with its id unchanged, the original outputs, and
/// an output `grad/<param>` for each requested parameter that influences the loss through
/// differentiable ops. A parameter that does not (unused, or only behind StopGrad and other
/// nondifferentiable ops) gets **no** output: its gradient is zero, and an optimizer skips it.
/// The gradient of an embedding parameter whose every use is a Gather is row-sparse (one
/// SparseRows node); any other gradient is dense with the parameter's shape. Backward nodes
/// that no gradient output needs are not kept.
pub fn differentiate(graph: &Graph, loss: NodeId, wrt: &[String]) -> Result<Graph, AutodiffError> {
    let n = graph.len();
    if loss.index() >= n {
        return Err(AutodiffError::UnknownNode(loss.index()));
    }
    let loss_sig = graph.sig(loss);
    if !loss_sig.shape.is_empty() || loss_sig.dtype != DType::F || loss_sig.kind != ValueKind::Dense {
        return Err(AutodiffError::LossNotScalar { shape: shape_to_string(&loss_sig.shape) });
    }
    let mut wanted = vec![false; n];
    for name in wrt {
        let p = graph.param_info(name).ok_or_else(|| AutodiffError::UnknownParam(name.clone()))?;
        wanted[p.node.index()] = true;
    }

    // Active nodes: they depend differentiably on a wanted parameter, and the loss depends on them.
    let mut depends = wanted.clone();
    for id in graph.ids() {
        let node = graph.node(id);
        depends[id.index()] |= node.sig.dtype == DType::F
            && !node.op.is_nondifferentiable()
            && node.inputs.iter().any(|i| depends[i.index()]);
    }
    let mut feeds_loss = vec![false; n];
    feeds_loss[loss.index()] = true;
    for id in (0..=loss.index()).rev() {
        if feeds_loss[id] {
            for i in &graph.node(NodeId::new(id)).inputs {
                feeds_loss[i.index()] = true;
            }
        }
    }
    let active = |i: NodeId| depends[i.index()] && feeds_loss[i.index()];

    let mut out = graph.clone();
    let mut sent: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    if active(loss) {
        let seed = out.add(Op::Scalar(1.0), &[], "grad:seed").map_err(|error| rule_error(graph, loss, error))?;
        sent[loss.index()].push(seed);
    }
    let mut grad_outputs = Vec::new();
    for index in (0..=loss.index()).rev() {
        let id = NodeId::new(index);
        if !active(id) || sent[index].is_empty() {
            continue;
        }
        let dy = sum_cotangents(&mut out, graph, id, &sent[index])?;
        let node = graph.node(id).clone();
        if let Op::Param { name } = &node.op {
            out.outputs.insert(format!("grad/{name}"), dy);
            grad_outputs.push(dy);
            continue;
        }
        let cts = ops::grad(&mut out, &node, id, dy).map_err(|error| rule_error(graph, id, error))?;
        if cts.len() != node.inputs.len() {
            let error =
                ShapeError(format!("the rule gave {} cotangents for {} operands", cts.len(), node.inputs.len()));
            return Err(rule_error(graph, id, error));
        }
        for (operand, (&x, ct)) in node.inputs.iter().zip(cts).enumerate() {
            let Some(ct) = ct else { continue };
            if !active(x) {
                continue;
            }
            if out.shape(ct) != graph.shape(x) {
                return Err(AutodiffError::BadCotangent {
                    node: index,
                    op: node.op.name(),
                    operand,
                    expected: shape_to_string(graph.shape(x)),
                    got: shape_to_string(out.shape(ct)),
                });
            }
            sent[x.index()].push(ct);
        }
    }

    let mut keep = vec![true; n];
    keep.resize(out.len(), false);
    for id in grad_outputs {
        keep[id.index()] = true;
    }
    Ok(retain(&out, &keep).0)
}

/// The sum of cotangents that are each a `Pad` of a part into its own columns (the
/// cotangents of slices of one value that do not overlap, as [`crate::passes::wide_products`]
/// makes) as one concat of the parts, zeros where no part lies; `None` where the parts are
/// not such pads (different axes, overlapping or not known sizes), and they are added.
/// The sum and the concat hold the same numbers (each element is one part's or zero).
fn join_disjoint_pads(out: &mut Graph, parts: &[NodeId], scope: &str) -> Result<Option<NodeId>, ShapeError> {
    let mut pieces = Vec::with_capacity(parts.len());
    let mut axis_of_all = None;
    for &c in parts {
        let Op::Pad { axis, before, after } = &out.node(c).op else { return Ok(None) };
        let part = out.node(c).inputs[0];
        let (Some(before), Some(after), Some(len)) =
            (before.as_const(), after.as_const(), out.shape(part)[*axis].as_const())
        else {
            return Ok(None);
        };
        if *axis_of_all.get_or_insert(*axis) != *axis {
            return Ok(None);
        }
        pieces.push((before, len, after, part));
    }
    let Some(axis) = axis_of_all else { return Ok(None) };
    pieces.sort_by_key(|&(before, ..)| before);
    let total = pieces[0].0 + pieces[0].1 + pieces[0].2;
    let mut operands = Vec::with_capacity(2 * pieces.len() + 1);
    let mut at = 0;
    for &(before, len, after, part) in &pieces {
        if before < at || before + len + after != total {
            return Ok(None);
        }
        if before > at {
            operands.push(zeros_like_along(out, part, axis, before - at, scope)?);
        }
        operands.push(part);
        at = before + len;
    }
    if at < total {
        operands.push(zeros_like_along(out, pieces[0].3, axis, total - at, scope)?);
    }
    out.add(Op::Concat { axis }, &operands, scope).map(Some)
}

/// Zeros of `like`'s shape with `len` elements along `axis`.
fn zeros_like_along(out: &mut Graph, like: NodeId, axis: usize, len: i64, scope: &str) -> Result<NodeId, ShapeError> {
    let mut shape = out.shape(like).clone();
    shape[axis] = crate::ir::dim::Dim::lit(len);
    let zero = out.add(Op::Scalar(0.0), &[], scope)?;
    out.add(Op::Broadcast { shape }, &[zero], scope)
}

fn rule_error(graph: &Graph, id: NodeId, error: ShapeError) -> AutodiffError {
    AutodiffError::Rule { node: id.index(), op: graph.node(id).op.name(), error }
}

/// The total cotangent of `id` from what its users sent: dense ones are added; row-sparse
/// ones (SparseRows from each Gather of an embedding table) are joined into one SparseRows
/// over the concatenated ids and rows.
fn sum_cotangents(out: &mut Graph, graph: &Graph, id: NodeId, parts: &[NodeId]) -> Result<NodeId, AutodiffError> {
    if parts.len() == 1 {
        return Ok(parts[0]);
    }
    let sparse = parts.iter().filter(|&&c| matches!(out.node(c).op, Op::SparseRows { .. })).count();
    let scope = format!("grad:{}", graph.node(id).scope);
    let err = |error| rule_error(graph, id, error);
    if sparse == 0 {
        if let Some(joined) = join_disjoint_pads(out, parts, &scope).map_err(err)? {
            return Ok(joined);
        }
        let mut total = parts[0];
        for &c in &parts[1..] {
            total = out.add(Op::Binary(ops::BinaryOp::Add), &[total, c], &scope).map_err(err)?;
        }
        return Ok(total);
    }
    if sparse != parts.len() {
        return Err(AutodiffError::MixedSparse { param: graph.node(id).op.name() });
    }
    let Op::SparseRows { rows } = out.node(parts[0]).op.clone() else {
        return Err(AutodiffError::MixedSparse { param: graph.node(id).op.name() });
    };
    // Users sent their parts last-first; join them in the forward graph's order.
    let ids: Vec<NodeId> = parts.iter().rev().map(|&c| out.node(c).inputs[0]).collect();
    let values: Vec<NodeId> = parts.iter().rev().map(|&c| out.node(c).inputs[1]).collect();
    let ids = out.add(Op::Concat { axis: 0 }, &ids, &scope).map_err(err)?;
    let values = out.add(Op::Concat { axis: 0 }, &values, &scope).map_err(err)?;
    out.add(Op::SparseRows { rows }, &[ids, values], &scope).map_err(err)
}
