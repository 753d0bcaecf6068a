//! Slices read in place by the jit's fused kernels. A fused kernel, or a sum or mean (which
//! the jit runs as a fused kernel, [`crate::fuse::lone_reduction`]), whose operand is a
//! `Slice` of a dense real value (or a reshape of one that only drops or adds axes of one
//! element) reads the sliced tensor through strides instead: a *window* of it, with the
//! larger tensor's strides, from the slice's first element ([`super::codegen::Strided`]).
//! The slice is then never copied, and when no other node reads it the driver never
//! computes it ([`crate::backend::driver::Lifetimes::with_reads`]). Matrix products read
//! copies: gemm on rows a stride apart ran slower than the copy costs (docs/performance.md).
//! DIN's backward cuts the gradient of its activation unit's input `[q, k, q - k, q * k]`
//! into four such slices of 16 of its 64 columns, each read by one reduction or product.
//!
//! The converse holds for concat: each part of a concat of dense reals is written straight
//! into its slice of the output by a kernel ([`Part`]): a fused kernel that produces a part
//! and has no other reader runs there instead of into a buffer of its own, a broadcast is
//! read in place (stride 0), a matrix product (along the concat's last axis) writes its rows
//! the concat's row length apart, and any other part is copied by the identity kernel
//! (vector lanes, both threads). DIN's activation unit concatenates `[q, k, q - k, q * k]`
//! broadcast over 100 behaviours: none of the four is stored before the concat. The
//! backward of AutoInt's query, key and value projections (one wide product) concatenates
//! the six batched products that give their cotangents: each is written into its slice.
//!
//! A part that other kernels read too would have to be stored and copied; instead those
//! readers read it back from the concat through a window ([`parts_read_from_concats`]), so
//! the part is still written only into the concat. Sibling products made one wide product
//! ([`crate::passes::wide_products`]) have their backward's cotangents joined into such a
//! concat, and each piece is also read by its bias's gradient (a sum over the batch).
//!
//! This module owns finding the windows and the concat parts in a fused plan ([`find`],
//! [`find_concats`], [`parts_read_from_concats`]), running kernels through them ([`run`], [`concat`]) and the fallbacks
//! that compute the slices or parts by their eval rules ([`eval`], [`concat_eval`]), which
//! the kernels also agree with bit for bit: a window reads the elements the slice would
//! hold, and a part writes the elements the concat would copy.

use super::codegen::{self, Options, Strided};
use super::pool::Pool;
use super::{product, Products};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::Dim;
use crate::ir::dim::{eval_shape, Shape};
use crate::ir::graph::{Graph, NodeId};
use crate::ops::fused::FusedKernel;
use crate::ops::fused::Instr;
use crate::ops::{self, DType, Op, ReduceOp, ValueKind};
use crate::tensor::{strides, Tensor, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Operand `k` of a node is read as `x[.., start .. start + len, ..]` along `axis` of the
/// slice's operand `x`; with a `view`, as that slice reshaped to `view`, a shape that only
/// drops or adds axes of size 1 (no element moves, so the slice's strides serve).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub axis: usize,
    pub start: Dim,
    pub len: Dim,
    pub view: Option<Shape>,
}

/// The windows of a fused plan: per node that reads a slice through one, its window per
/// operand (`None`: read as it is). Each such node's operands in `reads` become the sliced
/// tensors. Nodes already in `reads` (the embedding bags) are left alone, and so are slices
/// that are graph outputs (they are computed anyway). A slice read through a reshape that
/// only drops or adds axes of size 1 is a window too: the gradient of a mixture's experts
/// `[B, E, d]` cuts it into `[B, 1, d]` slices, each reshaped to `[B, d]` for the expert's
/// backward (MMoE, PLE), and both the slice and the reshape were copies.
pub fn find(graph: &Graph, reads: &mut HashMap<NodeId, Vec<NodeId>>) -> HashMap<NodeId, Vec<Option<Window>>> {
    let outputs: HashSet<NodeId> = graph.outputs.values().copied().collect();
    let mut windows = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        let kernel = matches!(node.op, Op::Fused(_) | Op::Reduce { op: ReduceOp::Sum | ReduceOp::Mean, .. });
        if !kernel || reads.contains_key(&id) {
            continue;
        }
        let mut read = Vec::with_capacity(node.inputs.len());
        let mut through = Vec::with_capacity(node.inputs.len());
        for &x in &node.inputs {
            match sliced(graph, x, &outputs) {
                Some((sliced, window)) => {
                    read.push(sliced);
                    through.push(Some(window));
                }
                None => {
                    read.push(x);
                    through.push(None);
                }
            }
        }
        if through.iter().any(Option::is_some) {
            reads.insert(id, read);
            windows.insert(id, through);
        }
    }
    windows
}

/// When `x` is a slice of a dense real value (or a reshape of one that only drops or adds
/// axes of size 1), neither a graph output: the sliced value and the window that reads `x`
/// from it.
fn sliced(graph: &Graph, x: NodeId, outputs: &HashSet<NodeId>) -> Option<(NodeId, Window)> {
    let real = |n: NodeId| {
        let sig = graph.sig(n);
        sig.dtype == DType::F && sig.kind == ValueKind::Dense && !outputs.contains(&n)
    };
    let (slice, view) = match &graph.node(x).op {
        Op::Reshape { shape } if real(x) => {
            let slice = graph.node(x).inputs[0];
            let unit_axes_only = |a: &[Dim]| a.iter().filter(|d| !d.is_one()).cloned().collect::<Vec<_>>();
            if unit_axes_only(&graph.sig(slice).shape) != unit_axes_only(shape) {
                return None;
            }
            (slice, Some(shape.clone()))
        }
        _ => (x, None),
    };
    let Op::Slice { axis, start, len } = &graph.node(slice).op else { return None };
    real(slice).then(|| {
        let window = Window { axis: *axis, start: start.clone(), len: len.clone(), view };
        (graph.node(slice).inputs[0], window)
    })
}

/// The fused graph with the other readers of a concat's part made to read it from the
/// concat (a slice of it, read through a window), so that the part has the concat as its
/// only reader and is written straight into it ([`find_concats`]); `None` when no part
/// qualifies. A part qualifies when a fused kernel without reduction produces it, it is no
/// output, and every other reader is a kernel that reads windows ([`find`]: a fused kernel,
/// a sum or a mean) on which the concat does not depend. The readers are moved after the
/// concat (the concat and what it needs come first); the values do not change.
pub fn parts_read_from_concats(graph: &Graph) -> Option<Graph> {
    let outputs: HashSet<NodeId> = graph.outputs.values().copied().collect();
    let window_reader =
        |n: NodeId| matches!(graph.node(n).op, Op::Fused(_) | Op::Reduce { op: ReduceOp::Sum | ReduceOp::Mean, .. });
    // (reader, operand slot) → (concat, part's slice along the concat's axis).
    let mut rewired: HashMap<(NodeId, usize), (NodeId, Op)> = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        let Op::Concat { axis } = node.op else { continue };
        if node.sig.dtype != DType::F || node.sig.kind != ValueKind::Dense {
            continue;
        }
        let mut ancestors: Option<HashSet<NodeId>> = None;
        let mut start = Dim::lit(0);
        for &part in &node.inputs {
            let len = graph.dim(part, axis);
            let slice = Op::Slice { axis, start: start.clone(), len: len.clone() };
            start = &start + &len;
            let producer = graph.node(part);
            let fused_part = matches!(&producer.op, Op::Fused(kernel) if kernel.reduce.is_none());
            if !fused_part || outputs.contains(&part) || node.inputs.iter().filter(|&&p| p == part).count() > 1 {
                continue;
            }
            let others: Vec<(NodeId, u32)> = graph.users(part).filter(|&(u, _)| u != id).collect();
            if others.is_empty() || others.iter().any(|&(u, _)| !window_reader(u)) {
                continue;
            }
            let ancestors = ancestors.get_or_insert_with(|| ancestors_of(graph, id));
            if others.iter().any(|(u, _)| ancestors.contains(u)) {
                continue;
            }
            for (u, slot) in others {
                rewired.insert((u, slot as usize), (id, slice.clone()));
            }
        }
    }
    if rewired.is_empty() {
        return None;
    }
    rebuild_rewired(graph, &rewired)
}

/// Every node `id` depends on.
fn ancestors_of(graph: &Graph, id: NodeId) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack = graph.node(id).inputs.clone();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(graph.node(n).inputs.iter().copied());
        }
    }
    seen
}

/// `graph` with the operands in `rewired` read as a slice of another node, each node
/// emitted after what it reads (depth first, otherwise in the graph's order); `None` if the
/// rewiring made a cycle.
fn rebuild_rewired(graph: &Graph, rewired: &HashMap<(NodeId, usize), (NodeId, Op)>) -> Option<Graph> {
    let operands = |n: NodeId| -> Vec<NodeId> {
        let inputs = &graph.node(n).inputs;
        (0..inputs.len()).map(|slot| rewired.get(&(n, slot)).map_or(inputs[slot], |(source, _)| *source)).collect()
    };
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; graph.len()];
    let mut slices: HashMap<(NodeId, usize), NodeId> = HashMap::new();
    let mut visiting = vec![false; graph.len()];
    for root in graph.ids() {
        let mut stack = vec![root];
        while let Some(&top) = stack.last() {
            if map[top.index()].is_some() {
                stack.pop();
                continue;
            }
            let missing: Vec<NodeId> = operands(top).into_iter().filter(|i| map[i.index()].is_none()).collect();
            if missing.is_empty() {
                let node = graph.node(top);
                let mut inputs = Vec::with_capacity(node.inputs.len());
                for (slot, &x) in node.inputs.iter().enumerate() {
                    inputs.push(match rewired.get(&(top, slot)) {
                        Some((source, slice)) => {
                            let key = (*source, slot_of(graph, *source, x));
                            *slices.entry(key).or_insert_with(|| {
                                let sig = graph.node(x).sig.clone();
                                let from = map[source.index()].expect("emitted first");
                                out.push_copy(
                                    &crate::ir::graph::Node {
                                        op: slice.clone(),
                                        inputs: vec![],
                                        sig,
                                        scope: node.scope.clone(),
                                    },
                                    vec![from],
                                )
                            })
                        }
                        None => map[x.index()].expect("emitted first"),
                    });
                }
                map[top.index()] = Some(out.push_copy(node, inputs));
                stack.pop();
            } else {
                if visiting[top.index()] {
                    return None;
                }
                visiting[top.index()] = true;
                stack.extend(missing);
            }
        }
    }
    out.copy_tables(graph, &map);
    Some(out)
}

/// The operand slot of `part` in the concat `concat`.
fn slot_of(graph: &Graph, concat: NodeId, part: NodeId) -> usize {
    graph.node(concat).inputs.iter().position(|&p| p == part).expect("a part of the concat")
}

/// The shape a window of `x` reads (its view's, when it has one), the strides it reads it
/// with and the element it starts at, or why it cannot (the slice's own error then comes
/// from the eval rule).
fn bounds(x: &Tensor<f32>, w: &Window, cx: &EvalCx) -> Result<(Vec<usize>, Vec<usize>, usize), String> {
    let size = |d: &Dim| cx.size(d).map_err(|e| e.to_string());
    let (start, len) = (size(&w.start)?, size(&w.len)?);
    if w.axis >= x.shape.len() || start + len > x.shape[w.axis] {
        return Err(format!("a slice {start}..{} along axis {} of {:?}", start + len, w.axis, x.shape));
    }
    let mut shape = x.shape.clone();
    shape[w.axis] = len;
    let steps = strides(&x.shape);
    let first = start * steps[w.axis];
    let Some(view) = &w.view else { return Ok((shape, steps, first)) };
    // The view's axes of size 1 take stride 0; the others are the slice's, in order.
    let view = eval_shape(view, cx.binding)?;
    let mut kept = shape.iter().zip(&steps).filter(|(&n, _)| n != 1);
    let mut view_steps = Vec::with_capacity(view.len());
    for &n in &view {
        view_steps.push(match n {
            1 => 0,
            _ => match kept.next() {
                Some((&m, &step)) if m == n => step,
                _ => return Err(format!("a slice of shape {shape:?} read as {view:?}")),
            },
        });
    }
    if kept.next().is_some() {
        return Err(format!("a slice of shape {shape:?} read as {view:?}"));
    }
    Ok((view, view_steps, first))
}

/// Runs `kernel` on `operands` (the sliced tensors where `windows` has a window), read
/// through their windows. `Err` says why it could not (the caller then uses [`eval`]).
pub fn run(
    kernel: &FusedKernel,
    operands: &[&Tensor<f32>],
    windows: &[Option<Window>],
    cx: &EvalCx,
    threads: usize,
    opts: Options,
    pool: &mut Pool,
) -> Result<Tensor<f32>, String> {
    let mut views: Vec<(Vec<usize>, Vec<usize>, usize)> = Vec::with_capacity(operands.len());
    for (x, w) in operands.iter().zip(windows) {
        views.push(match w {
            Some(w) => bounds(x, w, cx)?,
            None => (x.shape.clone(), strides(&x.shape), 0),
        });
    }
    let strided: Vec<Strided> = operands
        .iter()
        .zip(&views)
        .map(|(x, (shape, steps, first))| Strided { data: &x.data[*first..], shape, strides: steps.clone() })
        .collect();
    codegen::run_strided(kernel, &strided, cx.out_shape, threads, opts, &mut |n, z| pool.alloc(n, z))
}

/// What window `w` reads of `arg`, copied out by the eval rules of the slice (and of the
/// reshape of its view).
fn copied(arg: &Arg<f32>, w: &Window, cx: &EvalCx, reader: &str) -> Result<Value<f32>, ExecError> {
    let x = arg.dense(reader)?;
    let (start, len) = (cx.size(&w.start)?, cx.size(&w.len)?);
    let mut shape = x.shape.clone();
    if let Some(d) = shape.get_mut(w.axis) {
        *d = len;
    }
    let slice = Op::Slice { axis: w.axis, start: Dim::from(start), len: Dim::from(len) };
    let slice_cx = EvalCx { binding: cx.binding, mode: cx.mode, out_shape: &shape };
    let slice = ops::eval(&slice, std::slice::from_ref(arg), &slice_cx)?;
    let Some(view) = &w.view else { return Ok(slice) };
    let reshape = Op::Reshape { shape: view.clone() };
    let shape = eval_shape(view, cx.binding).map_err(|message| ExecError::Size { message })?;
    let reshape_cx = EvalCx { binding: cx.binding, mode: cx.mode, out_shape: &shape };
    ops::eval(&reshape, &[Arg::Value(&slice)], &reshape_cx)
}

/// The eval rule of `op` on `args` with each windowed operand copied out by the slice's
/// eval rule first: the values [`run`] computes, for the kernels it cannot run.
pub fn eval(op: &Op, args: &[Arg<f32>], windows: &[Option<Window>], cx: &EvalCx) -> Result<Value<f32>, ExecError> {
    let mut sliced: Vec<Option<Value<f32>>> = Vec::with_capacity(args.len());
    for (arg, w) in args.iter().zip(windows) {
        sliced.push(match w {
            Some(w) => Some(copied(arg, w, cx, &op.name())?),
            None => None,
        });
    }
    let args: Vec<Arg<f32>> = args
        .iter()
        .zip(&sliced)
        .map(|(arg, s)| match s {
            Some(v) => Arg::Value(v),
            None => *arg,
        })
        .collect();
    ops::eval(op, &args, cx)
}

/// One part of a concat written in place: `writer` computes it from the next `operands`
/// operands of the concat's reads into its slice of the output.
#[derive(Clone, Debug)]
pub struct Part {
    writer: Writer,
    operands: usize,
    /// The part's shape (the concat's binding sizes it).
    shape: Shape,
    /// The op that produced the part, run by its eval rule in the fallback; `None` when the
    /// part is the concat's own operand.
    producer: Option<Op>,
}

/// What writes a concat's part into its slice.
#[derive(Clone, Debug)]
enum Writer {
    /// A fused kernel (the identity for a part copied or broadcast).
    Kernel(Arc<FusedKernel>),
    /// A matrix product (`MatMul` of two operands), for a concat along its last axis: the
    /// product's rows are written the concat's row length apart
    /// ([`super::product::matmul_into`]).
    Product { trans_a: bool, trans_b: bool },
}

/// The concats of a fused plan that write their parts in place (every concat of dense
/// reals that no other rewrite reads for), each with its parts. A part made by a fused
/// kernel without reduction, or by a broadcast, whose only reader is the concat (and which
/// is no output) is computed there: the concat reads the producer's operands instead, in
/// order, recorded in `reads`.
pub fn find_concats(graph: &Graph, reads: &mut HashMap<NodeId, Vec<NodeId>>) -> HashMap<NodeId, Vec<Part>> {
    let outputs: HashSet<NodeId> = graph.outputs.values().copied().collect();
    let identity = Writer::Kernel(Arc::new(FusedKernel { inputs: 1, body: vec![Instr::Input(0)], reduce: None }));
    let real = |n: NodeId| graph.sig(n).dtype == DType::F && graph.sig(n).kind == ValueKind::Dense;
    let mut concats = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        let Op::Concat { axis } = node.op else { continue };
        if !real(id) || reads.contains_key(&id) {
            continue;
        }
        let last_axis = axis + 1 == node.sig.shape.len();
        let mut read = Vec::new();
        let mut parts = Vec::with_capacity(node.inputs.len());
        for &x in &node.inputs {
            let producer = graph.node(x);
            let alone = !outputs.contains(&x) && graph.users(x).count() == 1 && !reads.contains_key(&x);
            let shape = producer.sig.shape.clone();
            let part = match &producer.op {
                Op::Fused(k) if alone && k.reduce.is_none() => {
                    read.extend_from_slice(&producer.inputs);
                    Part {
                        writer: Writer::Kernel(k.clone()),
                        operands: producer.inputs.len(),
                        shape,
                        producer: Some(producer.op.clone()),
                    }
                }
                Op::Broadcast { .. } if alone && real(producer.inputs[0]) => {
                    read.push(producer.inputs[0]);
                    Part { writer: identity.clone(), operands: 1, shape, producer: Some(producer.op.clone()) }
                }
                Op::MatMul { trans_a, trans_b } if alone && last_axis => {
                    read.extend_from_slice(&producer.inputs);
                    let writer = Writer::Product { trans_a: *trans_a, trans_b: *trans_b };
                    Part { writer, operands: 2, shape, producer: Some(producer.op.clone()) }
                }
                _ => {
                    read.push(x);
                    Part { writer: identity.clone(), operands: 1, shape, producer: None }
                }
            };
            parts.push(part);
        }
        reads.insert(id, read);
        concats.insert(id, parts);
    }
    concats
}

/// Elements of output per block when a concat along an inner axis is written block by
/// block of its first axis ([`concat`]): 1 MB, which stays in a core's L2 cache (2 MB on
/// the machines measured) with the block's operands.
const CONCAT_BLOCK: usize = 1 << 18;

/// The concat along `axis` of `parts`, each written by its kernel from its operands
/// (`args`, in order) into its slice of the output. `Err` says why it could not (the
/// caller then uses [`concat_eval`]).
///
/// Along an inner axis every part writes a piece of each output row, and written part by
/// part over the whole output each piece is a separate pass over memory, in which each
/// cache line the part shares with its neighbours (a row of 16 floats is one 64-byte line
/// only where the buffer is so aligned) is read and written back once per part. So a large
/// output is written block by block of its first axis, every part of a block before the
/// next (the block's lines stay in cache until complete, and an operand several parts read
/// comes from cache the second time); the blocks are split over two threads, each running
/// its kernels on one. The values are the same either way: each element is one part's.
#[allow(clippy::too_many_arguments)]
pub fn concat(
    parts: &[Part],
    axis: usize,
    args: &[Arg<f32>],
    cx: &EvalCx,
    threads: usize,
    opts: Options,
    products: Products,
    pool: &mut Pool,
) -> Result<Tensor<f32>, String> {
    let out_shape = cx.out_shape;
    if axis >= out_shape.len() || args.len() != parts.iter().map(|p| p.operands).sum::<usize>() {
        return Err("the concat's operands do not match its parts".into());
    }
    let out_strides = strides(out_shape);
    /// A part to write: its kernel, operands, shape and first element in the output.
    struct Run<'a> {
        writer: &'a Writer,
        tensors: Vec<&'a Tensor<f32>>,
        shape: Vec<usize>,
        offset: usize,
    }
    let mut runs: Vec<Run> = Vec::with_capacity(parts.len());
    let (mut at, mut next) = (0usize, 0usize);
    for part in parts {
        let shape = eval_shape(&part.shape, cx.binding)?;
        let tensors: Vec<&Tensor<f32>> = args[next..next + part.operands]
            .iter()
            .map(|a| a.dense("concat").map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        if shape.len() != out_shape.len() {
            return Err(format!("a part of shape {shape:?} does not fit the output {out_shape:?}"));
        }
        runs.push(Run { writer: &part.writer, tensors, shape: shape.clone(), offset: at * out_strides[axis] });
        at += shape[axis];
        next += part.operands;
    }
    if at != out_shape[axis] {
        return Err(format!("the parts fill {at} of the output's {} places along axis {axis}", out_shape[axis]));
    }
    let total: usize = out_shape.iter().product();
    let mut out = pool.take(total);
    if total == 0 {
        return Ok(Tensor { shape: out_shape.to_vec(), data: out });
    }
    // Rows: indices along the first axis, written in blocks (one block: the whole output).
    let (rows, row_len) = (out_shape[0], out_strides[0]);
    // A product's operands are cut into blocks along a batch axis, or along the rows of a
    // plain (not transposed) left operand of a 2-D product; other products run whole.
    let blockable = |run: &Run| match run.writer {
        Writer::Product { trans_a, .. } => run.shape.len() >= 3 || !trans_a,
        Writer::Kernel(_) => true,
    };
    let blocked = axis > 0 && rows >= 2 && total > 2 * CONCAT_BLOCK && runs.iter().all(blockable);
    let block = if blocked { (CONCAT_BLOCK / row_len).clamp(1, rows) } else { rows };
    // Rows `from..to` of every part into `out`, which starts at row `from`.
    let write = |from: usize, to: usize, out: &mut [f32], threads: usize, pool: &mut Pool| -> Result<(), String> {
        let mut first = from;
        while first < to {
            let last = (first + block).min(to);
            for Run { writer, tensors, shape, offset } in &runs {
                let mut part_shape = shape.clone();
                part_shape[0] = last - first;
                // An operand with the part's rank and its rows is read from the block's
                // first row; one broadcast along the first axis (or of lower rank) whole.
                // (A 2-D product's right operand is never cut: its rows are the reduction.)
                let cut = |j: usize, x: &Tensor<f32>| {
                    let right_of_matrix = matches!(writer, Writer::Product { .. }) && shape.len() == 2 && j == 1;
                    x.shape.len() == shape.len() && x.shape[0] == shape[0] && !right_of_matrix
                };
                let shapes: Vec<Vec<usize>> = tensors
                    .iter()
                    .enumerate()
                    .map(|(j, x)| {
                        let mut s = x.shape.clone();
                        if cut(j, x) {
                            s[0] = last - first;
                        }
                        s
                    })
                    .collect();
                let operands: Vec<Strided> = tensors
                    .iter()
                    .zip(&shapes)
                    .enumerate()
                    .map(|(j, (x, s))| {
                        let own = strides(&x.shape);
                        let skip = if cut(j, x) { first * own[0] } else { 0 };
                        Strided { data: &x.data[skip.min(x.data.len())..], shape: s, strides: own }
                    })
                    .collect();
                let start = (first - from) * row_len + offset;
                if start > out.len() {
                    return Err(format!("a part of shape {shape:?} does not fit the output {out_shape:?}"));
                }
                let out = &mut out[start..];
                match writer {
                    Writer::Kernel(kernel) => {
                        codegen::run_into(kernel, &operands, &part_shape, out, &out_strides, threads, opts)?
                    }
                    Writer::Product { trans_a, trans_b } => {
                        let [a, b] = &operands[..] else { return Err("a product part takes two operands".into()) };
                        let ld = out_strides[axis - 1];
                        let rows: usize = part_shape[..part_shape.len() - 1].iter().product();
                        let n = part_shape[part_shape.len() - 1];
                        let reach = |x: &Strided| x.shape.iter().product::<usize>() <= x.data.len();
                        if rows > 0 && ((rows - 1) * ld + n > out.len() || !reach(a) || !reach(b)) {
                            return Err(format!("a product part of shape {part_shape:?} does not fit its operands"));
                        }
                        let (a, b) = ((a.data, a.shape), (b.data, b.shape));
                        product::matmul_into(a, b, *trans_a, *trans_b, &part_shape, out, ld, threads, products, pool);
                    }
                }
            }
            first = last;
        }
        Ok(())
    };
    if blocked && threads >= 2 && rows >= 2 * block {
        let half = rows.div_ceil(block) / 2 * block;
        let (lo, hi) = out.split_at_mut(half * row_len);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| write(0, half, lo, 1, &mut Pool::default()));
            let mine = write(half, rows, hi, 1, pool);
            (other.join(), mine)
        });
        a.map_err(|_| "a concat thread panicked".to_string())??;
        b?;
    } else {
        write(0, rows, &mut out, threads, pool)?;
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: out })
}

/// The concat of `parts` by the eval rules: each part computed by its producer's rule (or
/// read as it is), then the concat's rule.
pub fn concat_eval(op: &Op, parts: &[Part], args: &[Arg<f32>], cx: &EvalCx) -> Result<Value<f32>, ExecError> {
    let mut values: Vec<Option<Value<f32>>> = Vec::with_capacity(parts.len());
    let mut next = 0usize;
    for part in parts {
        let operands = args.get(next..next + part.operands).ok_or_else(|| ExecError::BadOperand {
            op: op.name(),
            message: "the concat's operands do not match its parts".into(),
        })?;
        values.push(match &part.producer {
            Some(producer) => {
                let shape = eval_shape(&part.shape, cx.binding).map_err(|message| ExecError::Size { message })?;
                let part_cx = EvalCx { binding: cx.binding, mode: cx.mode, out_shape: &shape };
                Some(ops::eval(producer, operands, &part_cx)?)
            }
            None => None,
        });
        next += part.operands;
    }
    let mut next = 0usize;
    let mut inputs: Vec<Arg<f32>> = Vec::with_capacity(parts.len());
    for (part, value) in parts.iter().zip(&values) {
        inputs.push(match value {
            Some(v) => Arg::Value(v),
            None => args[next],
        });
        next += part.operands;
    }
    ops::eval(op, &inputs, cx)
}
