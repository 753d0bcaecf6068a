//! Embedding bags in the jit: masked pooling of embedding rows, and its row-sparse
//! gradient, without materialising the gathered rows.
//!
//! The language lowers `pool(E[hist], hist)` and `sum(E[ids] * mask, axis)` to
//! `Gather → Mul(mask) → Reduce sum` (or mean) over the sequence axis, which the fusion
//! pass turns into `Fused[mul; sum](Gather(table, ids), mask)`; autodiff gives the table
//! `SparseRows(ids…, Fused[mul](dy, mask) …)`, through reshapes and, when a table has
//! several uses, concats along the first axis. For DeepFM at batch 4096 the gathered
//! `[B, 2, 50, 16]` rows and their gradient are 26 MB each, written and read once.
//!
//! This module recognises those patterns on the jit's plan ([`find`]) and computes them
//! with kernels of its own ([`run`]), through the driver's read rewrites
//! (`driver::Lifetimes::with_reads`): the pooled node reads `[table, ids, mask]` and the
//! gather is never computed; the `SparseRows` node reads the id parts and the value parts
//! (for a masked product, its two factors) and the concats, reshapes and products are
//! never computed.
//!
//! A gradient part whose product kernel does more than `dy * mask` (a mean pooled by
//! `Reduce mean` folds the division by the length into it) is copied as a plain part: its
//! entries are all kept.
//!
//! The gradient comes out **combined**: each entry is added to its row of a pooled,
//! table-sized accumulator (two threads, each owning half the rows; or, when sums may
//! reassociate, each taking half the entries into its own accumulator, the two partial
//! rows added at read-out) and the named rows are read out in ascending order; for a table
//! with more than twice as many rows as the batch has entries, the entries go to a pooled
//! scratch buffer and `rows::combine_duplicate_rows` sums them. The bound is one of memory
//! as much as of time: the accumulators stay pooled from step to step, and on the 100×
//! replica's 4.2M-row table two of them held 0.54 GB (and were zeroed every step) for a
//! gradient of at most the batch's 573k entries. Either way each
//! row's entries are added in their order, from zero, as `Value::to_dense` and the
//! optimizer add them, so its rows are distinct and ascending and the sums the same. That is the same row-sparse value, and the optimizer and the clipping then
//! walk it in place instead of sorting and copying it again.
//!
//! **Why a jit-side pattern and not an IR op.** The composition is what the language,
//! autodiff and every backend already agree on, and interp (the oracle) evaluates it as
//! written; a bag op would need its own shape, gradient and eval rules, gradient checks
//! and lowering for the same semantics. The pattern is small and exact, so the jit
//! recovers it after fusion, and any graph that does not match runs as before.
//!
//! **Exactness.** The pooled sum adds `table[id] * mask` in sequence order starting from
//! zero, as `Reduce` does (a mean then divides by the length), so it equals interp bit for
//! bit. In the gradient, an entry whose mask is 0 and whose `dy` row is finite is exactly
//! zero; such entries are dropped, and one zero entry is appended for each distinct row
//! dropped that way. That is exactly equivalent for every reader of a row-sparse value:
//! adding an exact zero never changes a sum that starts from zero, so every combined row
//! (`rows::for_each_combined_row`, `Value::to_dense`) is the same, and every row that
//! had an entry still has one, so lazy Adam decays the same moments (a row named only by
//! padding still gets its zero-gradient update). Entries with a non-finite `dy` are kept,
//! so NaNs propagate as in interp. For KuaiRand's histories (about 22 of 100 positions
//! filled) this cuts the table gradient's entries by more than half. With exact kernels a
//! combined row is its entries summed in order, as interp sums them; with fast ones (the
//! default) a large gradient's row may be the sum of two such partial sums.

use super::kernels::split_if;
use super::pool::Pool;
use crate::backend::driver::Operands;
use crate::exec::{EvalCx, ExecError};
use crate::ir::dim::Dim;
use crate::ir::graph::{Graph, NodeId};
use crate::ops::fused::{FusedKernel, Instr};
use crate::ops::{BinaryOp, DType, Op, ReduceOp, ValueKind};
use crate::rows::combine_duplicate_rows;
use crate::tensor::{broadcast_strides, walk2, Tensor, Value};
use std::collections::HashMap;

/// Work (gathered elements) above which a bag is split over two threads.
const PARALLEL_WORK: usize = 1 << 16;

/// A kernel of this module for one node of the plan; its operands are the node's reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// Reads `[table, ids, mask]`: `out[p] = Σ_l table[ids[p, l]] * mask[p, l]` over the
    /// last ids axis (divided by its length for a mean).
    Pool { mean: bool },
    /// Reads the id parts, then each value part's operands: a row-sparse gradient whose
    /// entries are the id parts' ids (in order) with the value parts' rows.
    Rows { ids: usize, parts: Vec<Part> },
}

/// A block of consecutive entries of a row-sparse gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Part {
    /// Operand `values`, rows of the table's row width, copied.
    Dense { values: usize },
    /// Operands `dy` and `mask` multiplied with broadcasting: each entry's row is `dy`'s
    /// row times one mask value.
    Masked { dy: usize, mask: usize },
}

/// The read rewrites and kernels of the embedding bags in `graph` (a fused plan).
pub fn find(graph: &Graph) -> (HashMap<NodeId, Vec<NodeId>>, HashMap<NodeId, Kernel>) {
    let mut reads = HashMap::new();
    let mut kernels = HashMap::new();
    let outputs: Vec<NodeId> = graph.outputs.values().copied().collect();
    for id in graph.ids() {
        let node = graph.node(id);
        match &node.op {
            Op::Fused(k) => {
                if let Some((mean, read)) = pooled(graph, k, &node.inputs, &outputs) {
                    reads.insert(id, read);
                    kernels.insert(id, Kernel::Pool { mean });
                }
            }
            Op::SparseRows { .. } => {
                if let Some((read, kernel)) = rows(graph, id) {
                    reads.insert(id, read);
                    kernels.insert(id, kernel);
                }
            }
            _ => {}
        }
    }
    (reads, kernels)
}

/// The operands `(a, b)` of a kernel that is exactly `a * b` of its two distinct inputs.
fn product(k: &FusedKernel) -> Option<(usize, usize)> {
    if k.inputs != 2 || k.body.len() != 3 {
        return None;
    }
    let input = |r: usize| match k.body[r] {
        Instr::Input(i) => Some(i),
        _ => None,
    };
    match k.body[2] {
        Instr::Binary(BinaryOp::Mul, x, y) if x < 2 && y < 2 && x != y => Some((input(x)?, input(y)?)),
        _ => None,
    }
}

/// `Fused[mul; sum|mean over the last ids axis](Gather(table, ids), mask)` with `mask` of
/// the ids' shape followed by ones: `(mean, [table, ids, mask])`.
fn pooled(graph: &Graph, k: &FusedKernel, inputs: &[NodeId], outputs: &[NodeId]) -> Option<(bool, Vec<NodeId>)> {
    let r = k.reduce.as_ref()?;
    let mean = match r.op {
        ReduceOp::Sum => false,
        ReduceOp::Mean => true,
        ReduceOp::Max | ReduceOp::Min => return None,
    };
    let (a, b) = product(k)?;
    let (x, y) = (inputs[a], inputs[b]);
    let (gather, mask) = if graph.node(x).op == Op::Gather { (x, y) } else { (y, x) };
    if graph.node(gather).op != Op::Gather || outputs.contains(&gather) {
        return None;
    }
    let (table, ids) = (graph.node(gather).inputs[0], graph.node(gather).inputs[1]);
    let (ts, is, ms) = (graph.shape(table), graph.shape(ids), graph.shape(mask));
    let real = |n: NodeId| graph.sig(n).dtype == DType::F && graph.sig(n).kind == ValueKind::Dense;
    if !real(table) || !real(mask) || is.is_empty() || ts.is_empty() || r.axes != [is.len() - 1] {
        return None;
    }
    let mut want: Vec<Dim> = is.to_vec();
    want.extend(std::iter::repeat_n(Dim::lit(1), ts.len() - 1));
    (ms == &want).then(|| (mean, vec![table, ids, mask]))
}

/// The node whose value `x` is, through reshapes (the same elements in the same order).
fn through_reshapes(graph: &Graph, mut x: NodeId) -> NodeId {
    while let Op::Reshape { .. } = graph.node(x).op {
        x = graph.node(x).inputs[0];
    }
    x
}

/// The parts of a value joined along its first axis (one part when it is no concat).
fn first_axis_parts(graph: &Graph, x: NodeId) -> Vec<NodeId> {
    let x = through_reshapes(graph, x);
    match graph.node(x).op {
        Op::Concat { axis: 0 } => graph.node(x).inputs.iter().map(|&p| through_reshapes(graph, p)).collect(),
        _ => vec![x],
    }
}

/// `SparseRows(ids parts, value parts)` with a masked product among the value parts, or
/// several parts: the reads `[id parts…, value operands…]` and the kernel.
fn rows(graph: &Graph, id: NodeId) -> Option<(Vec<NodeId>, Kernel)> {
    let node = graph.node(id);
    let row_shape = &node.sig.shape[1..];
    let id_parts = first_axis_parts(graph, node.inputs[0]);
    let value_parts = first_axis_parts(graph, node.inputs[1]);
    let mut read = id_parts.clone();
    let mut parts = Vec::new();
    let mut masked = false;
    for &v in &value_parts {
        if graph.sig(v).dtype != DType::F || graph.sig(v).kind != ValueKind::Dense {
            return None;
        }
        let part = match &graph.node(v).op {
            Op::Fused(k) if k.reduce.is_none() => {
                match masked_product(graph, k, &graph.node(v).inputs, graph.shape(v), row_shape) {
                    Some((dy, mask)) => {
                        read.push(dy);
                        read.push(mask);
                        masked = true;
                        Part::Masked { dy: read.len() - 2, mask: read.len() - 1 }
                    }
                    None => {
                        read.push(v);
                        Part::Dense { values: read.len() - 1 }
                    }
                }
            }
            _ => {
                read.push(v);
                Part::Dense { values: read.len() - 1 }
            }
        };
        parts.push(part);
    }
    (masked || value_parts.len() > 1 || id_parts.len() > 1)
        .then_some((read, Kernel::Rows { ids: id_parts.len(), parts }))
}

/// `(dy, mask)` when kernel `k` over `inputs` is `dy * mask` with its shape ending in the
/// row shape, `dy` full along the row axes and `mask` of size 1 along them.
fn masked_product(
    graph: &Graph,
    k: &FusedKernel,
    inputs: &[NodeId],
    shape: &[Dim],
    row: &[Dim],
) -> Option<(NodeId, NodeId)> {
    let (a, b) = product(k)?;
    if shape.len() < row.len() || &shape[shape.len() - row.len()..] != row {
        return None;
    }
    let t = shape.len() - row.len();
    let ends_in = |x: NodeId, f: &dyn Fn(usize, &Dim) -> bool| {
        let s = graph.shape(x);
        let lead = shape.len().saturating_sub(s.len());
        s.len() <= shape.len() && (t..shape.len()).all(|ax| ax < lead || f(ax, &s[ax - lead]))
    };
    let is_mask = |x: NodeId| ends_in(x, &|_, d| *d == Dim::lit(1));
    let is_dy = |x: NodeId| graph.shape(x).len() >= row.len() && ends_in(x, &|ax, d| *d == shape[ax]);
    let (x, y) = (inputs[a], inputs[b]);
    if is_dy(x) && is_mask(y) {
        Some((x, y))
    } else if is_dy(y) && is_mask(x) {
        Some((y, x))
    } else {
        None
    }
}

/// Consecutive ids taken from a list of id tensors read as one sequence.
struct IdCursor<'a> {
    parts: &'a [&'a crate::tensor::Ids],
    part: usize,
    at: usize,
}

impl<'a> IdCursor<'a> {
    /// The next `n` ids (borrowed when they lie in one tensor); fewer at the end.
    fn next(&mut self, n: usize) -> std::borrow::Cow<'a, [u32]> {
        while self.part < self.parts.len() && self.at == self.parts[self.part].data.len() {
            self.part += 1;
            self.at = 0;
        }
        if let Some(t) = self.parts.get(self.part) {
            if self.at + n <= t.data.len() {
                self.at += n;
                return std::borrow::Cow::Borrowed(&t.data[self.at - n..self.at]);
            }
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n && self.part < self.parts.len() {
            let t = &self.parts[self.part].data;
            let k = (n - out.len()).min(t.len() - self.at);
            out.extend_from_slice(&t[self.at..self.at + k]);
            self.at += k;
            if self.at == t.len() {
                self.part += 1;
                self.at = 0;
            }
        }
        std::borrow::Cow::Owned(out)
    }
}

/// The entries of one value part of a row-sparse gradient, resolved for a run.
enum Block<'a> {
    /// `ids[j]` with row `j` of `x`.
    Dense { ids: std::borrow::Cow<'a, [u32]>, x: &'a [f32] },
    /// `ids[j]` with `dy`'s row times one mask value; `shape`, `ds` and `ms` walk the
    /// entries (the axes before the row) with `dy`'s and the mask's broadcast strides.
    Masked {
        ids: std::borrow::Cow<'a, [u32]>,
        dy: &'a [f32],
        mask: &'a [f32],
        shape: Vec<usize>,
        ds: Vec<usize>,
        ms: Vec<usize>,
    },
}

/// One entry of a gradient being built.
enum Entry<'a> {
    /// This row of values.
    Row(&'a [f32]),
    /// This row times a factor.
    Scaled(&'a [f32], f32),
    /// Exactly zero (a padded position with a finite `dy`): the row is named, nothing added.
    Zero,
}

/// Calls `f(id, entry)` for every entry of `blocks`, in order.
fn visit<F: FnMut(u32, Entry)>(blocks: &[Block], width: usize, f: &mut F) {
    for block in blocks {
        match block {
            Block::Dense { ids, x } => {
                for (&id, row) in ids.iter().zip(x.chunks_exact(width)) {
                    f(id, Entry::Row(row));
                }
            }
            Block::Masked { ids, dy, mask, shape, ds, ms } => {
                let mut e = 0usize;
                let (mut finite_at, mut finite) = (usize::MAX, true);
                // The last entry axis (the sequence) as a plain loop, the others walked.
                let k = shape.len().saturating_sub(1);
                let (len, dl, ml) = match shape.last() {
                    Some(&len) => (len, ds[k], ms[k]),
                    None => (1, 0, 0),
                };
                walk2(&shape[..k], &ds[..k], &ms[..k], |d_base, m_base| {
                    for j in 0..len {
                        let (d0, m0) = (d_base + j * dl, m_base + j * ml);
                        let id = ids[e];
                        e += 1;
                        let (m, row) = (mask[m0], &dy[d0..d0 + width]);
                        if m == 0.0 {
                            if finite_at != d0 {
                                finite = row.iter().all(|v| v.is_finite());
                                finite_at = d0;
                            }
                            if finite {
                                f(id, Entry::Zero);
                                continue;
                            }
                        }
                        f(id, Entry::Scaled(row, m));
                    }
                });
            }
        }
    }
}

/// The combined gradient through a table-sized accumulator: each entry is added to its
/// row in entry order from zero (the order `rows::for_each_combined_row` adds them in,
/// so the sums are the same), then the named rows are read out in ascending order. Two
/// threads split the rows in halves, each walking every entry and keeping its own.
fn accumulate(blocks: &[Block], limit: usize, width: usize, threads: usize, pool: &mut Pool) -> (Vec<u32>, Vec<f32>) {
    let mut acc = pool.zeroed(limit * width);
    let mut named = vec![false; limit];
    let fill = |lo: usize, acc: &mut [f32], named: &mut [bool]| {
        let hi = lo + named.len();
        visit(blocks, width, &mut |id, entry| {
            let r = id as usize;
            if r < lo || r >= hi {
                return;
            }
            named[r - lo] = true;
            let dst = &mut acc[(r - lo) * width..(r - lo + 1) * width];
            match entry {
                Entry::Row(row) => dst.iter_mut().zip(row).for_each(|(a, &v)| *a += v),
                Entry::Scaled(row, m) => dst.iter_mut().zip(row).for_each(|(a, &v)| *a += v * m),
                Entry::Zero => {}
            }
        });
    };
    let entries: usize = blocks
        .iter()
        .map(|b| match b {
            Block::Dense { ids, .. } | Block::Masked { ids, .. } => ids.len(),
        })
        .sum();
    if threads > 1 && limit >= 2 && entries * width >= PARALLEL_WORK {
        let half = limit / 2;
        let (acc_lo, acc_hi) = acc.split_at_mut(half * width);
        let (named_lo, named_hi) = named.split_at_mut(half);
        std::thread::scope(|s| {
            s.spawn(|| fill(0, acc_lo, named_lo));
            fill(half, acc_hi, named_hi);
        });
    } else {
        fill(0, &mut acc, &mut named);
    }
    let rows: Vec<u32> = (0..limit as u32).filter(|&r| named[r as usize]).collect();
    let mut data = Vec::with_capacity(rows.len() * width);
    for &r in &rows {
        data.extend_from_slice(&acc[r as usize * width..(r as usize + 1) * width]);
    }
    pool.put(acc);
    (rows, data)
}

/// The blocks' entries in two halves, in order: each block split at half its leading axis
/// (its batch rows). `None` when a block has no axis to split.
fn halves<'b, 'a: 'b>(blocks: &'b [Block<'a>], width: usize) -> Option<[Vec<Block<'b>>; 2]> {
    let mut out: [Vec<Block<'b>>; 2] = [Vec::new(), Vec::new()];
    for block in blocks {
        match block {
            Block::Dense { ids, x } => {
                let h = ids.len() / 2;
                out[0].push(Block::Dense { ids: std::borrow::Cow::Borrowed(&ids[..h]), x: &x[..h * width] });
                out[1].push(Block::Dense { ids: std::borrow::Cow::Borrowed(&ids[h..]), x: &x[h * width..] });
            }
            Block::Masked { ids, dy, mask, shape, ds, ms } => {
                let lead = *shape.first()?;
                let h = lead / 2;
                let per: usize = shape[1..].iter().product();
                let part = |from: usize, to: usize| {
                    let mut shape = shape.clone();
                    shape[0] = to - from;
                    Block::Masked {
                        ids: std::borrow::Cow::Borrowed(&ids[from * per..to * per]),
                        dy: &dy[from * ds[0]..],
                        mask: &mask[from * ms[0]..],
                        shape,
                        ds: ds.clone(),
                        ms: ms.clone(),
                    }
                };
                out[0].push(part(0, h));
                out[1].push(part(h, lead));
            }
        }
    }
    Some(out)
}

/// The combined gradient when sums may reassociate ([`super::codegen::Options::reassociate`]):
/// the entries split in two halves ([`halves`]), each adding its half, in order, into its
/// own table-sized accumulator (on two threads when there are, one after the other on
/// one: the same sums); a row's two partial sums are added at read-out.
/// Every entry is visited once (by [`accumulate`]'s row split, once per thread), and a
/// row that only one half names is read out exactly.
fn accumulate_halves(
    halves: &[Vec<Block>; 2],
    limit: usize,
    width: usize,
    threads: usize,
    pool: &mut Pool,
) -> (Vec<u32>, Vec<f32>) {
    let mut accs = [pool.zeroed(limit * width), pool.zeroed(limit * width)];
    let mut named = [vec![false; limit], vec![false; limit]];
    let fill = |blocks: &[Block], acc: &mut [f32], named: &mut [bool]| {
        visit(blocks, width, &mut |id, entry| {
            let r = id as usize;
            named[r] = true;
            let dst = &mut acc[r * width..(r + 1) * width];
            match entry {
                Entry::Row(row) => dst.iter_mut().zip(row).for_each(|(a, &v)| *a += v),
                Entry::Scaled(row, m) => dst.iter_mut().zip(row).for_each(|(a, &v)| *a += v * m),
                Entry::Zero => {}
            }
        });
    };
    {
        let ([acc0, acc1], [named0, named1]) = (&mut accs, &mut named);
        if threads > 1 {
            std::thread::scope(|s| {
                s.spawn(|| fill(&halves[0], acc0, named0));
                fill(&halves[1], acc1, named1);
            });
        } else {
            fill(&halves[0], acc0, named0);
            fill(&halves[1], acc1, named1);
        }
    }
    let rows: Vec<u32> = (0..limit).filter(|&r| named[0][r] || named[1][r]).map(|r| r as u32).collect();
    let mut data = Vec::with_capacity(rows.len() * width);
    for &r in &rows {
        let r = r as usize;
        let (a, b) = (&accs[0][r * width..(r + 1) * width], &accs[1][r * width..(r + 1) * width]);
        data.extend(a.iter().zip(b).map(|(x, y)| x + y));
    }
    for acc in accs {
        pool.put(acc);
    }
    (rows, data)
}

/// The combined gradient for a table too large for [`accumulate`]: the entries kept are
/// written to a pooled scratch buffer with one zero entry per row named only by dropped
/// ones, then combined by `rows::combine_duplicate_rows`.
fn scratch_and_combine(blocks: &[Block], total: usize, width: usize, pool: &mut Pool) -> (Vec<u32>, Vec<f32>) {
    let mut rows: Vec<u32> = vec![0; total];
    let mut values: Vec<f32> = pool.take(total * width);
    let mut kept = 0usize;
    let mut dropped: Vec<u32> = Vec::new();
    visit(blocks, width, &mut |id, entry| {
        let dst = &mut values[kept * width..(kept + 1) * width];
        match entry {
            Entry::Row(row) => dst.copy_from_slice(row),
            Entry::Scaled(row, m) => dst.iter_mut().zip(row).for_each(|(o, &v)| *o = v * m),
            Entry::Zero => {
                if dropped.last() != Some(&id) {
                    dropped.push(id);
                }
                return;
            }
        }
        rows[kept] = id;
        kept += 1;
    });
    dropped.sort_unstable();
    dropped.dedup();
    // One zero entry per dropped row, in the room the dropped entries left.
    for &id in &dropped {
        rows[kept] = id;
        values[kept * width..(kept + 1) * width].fill(0.0);
        kept += 1;
    }
    let combined = combine_duplicate_rows(&rows[..kept], &values[..kept * width], width);
    let (rows, data) = (combined.rows.into_owned(), combined.values.into_owned());
    pool.put(values);
    (rows, data)
}

/// Computes node `op` with `kernel` from its reads.
/// `exact`: row sums in entry order, bit for bit as interp; otherwise a gradient's entries
/// may be split between the threads ([`accumulate_halves`]).
pub fn run(
    kernel: &Kernel,
    op: &Op,
    operands: &mut Operands<f32>,
    cx: &EvalCx,
    threads: usize,
    exact: bool,
    pool: &mut Pool,
) -> Result<Value<f32>, ExecError> {
    let args = operands.args(op)?;
    let name = op.name();
    let bad = |message: String| ExecError::BadOperand { op: name.clone(), message };
    match kernel {
        Kernel::Pool { mean } => {
            let (table, ids, mask) = (args[0].dense(&name)?, args[1].ids("gather")?, args[2].dense(&name)?);
            let width: usize = table.shape[1..].iter().product();
            let len = ids.shape.last().copied().unwrap_or(1);
            let bags: usize = ids.shape[..ids.shape.len().saturating_sub(1)].iter().product();
            if mask.data.len() != ids.data.len() || bags * width != cx.out_shape.iter().product::<usize>() {
                return Err(bad(format!(
                    "an embedding bag of ids {:?} and mask {:?} cannot give {:?}",
                    ids.shape, mask.shape, cx.out_shape
                )));
            }
            if len == 0 && *mean {
                // An empty mean is 0/0: the eval rules have that edge case.
                return Err(bad("an empty mean pool".into()));
            }
            let limit = table.shape[0];
            if let Some(&id) = ids.data.iter().find(|&&id| id as usize >= limit) {
                return Err(ExecError::IdOutOfRange { op: "gather".into(), id, limit });
            }
            let mut out = pool.take(bags * width);
            let count = len as f32;
            let fill = |first_bag: usize, out: &mut [f32]| {
                for (b, acc) in out.chunks_exact_mut(width.max(1)).enumerate() {
                    let p = first_bag + b;
                    acc.fill(0.0);
                    for l in 0..len {
                        let (id, m) = (ids.data[p * len + l] as usize, mask.data[p * len + l]);
                        for (a, &e) in acc.iter_mut().zip(&table.data[id * width..(id + 1) * width]) {
                            *a += e * m;
                        }
                    }
                    if *mean {
                        acc.iter_mut().for_each(|a| *a /= count);
                    }
                }
            };
            if width > 0 && bags > 0 {
                let parallel = threads > 1 && bags >= 2 && bags * len * width >= PARALLEL_WORK;
                split_if(parallel, &mut out, width, |off, o| fill(off / width, o));
            }
            Ok(Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: out }))
        }
        Kernel::Rows { ids: id_count, parts } => {
            let limit = cx.out_shape[0];
            let width: usize = cx.out_shape[1..].iter().product();
            let id_parts = args[..*id_count].iter().map(|a| a.ids(&name)).collect::<Result<Vec<_>, _>>()?;
            let total: usize = id_parts.iter().map(|t| t.data.len()).sum();
            for t in &id_parts {
                if let Some(&id) = t.data.iter().find(|&&id| id as usize >= limit) {
                    return Err(ExecError::IdOutOfRange { op: name.clone(), id, limit });
                }
            }
            if width == 0 {
                // Rows without elements: every id, no values (as the eval rule).
                let rows: Vec<u32> = id_parts.iter().flat_map(|t| t.data.iter().copied()).collect();
                let mut value_shape = vec![rows.len()];
                value_shape.extend_from_slice(&cx.out_shape[1..]);
                return Ok(Value::RowSparse {
                    shape: cx.out_shape.to_vec(),
                    rows,
                    values: Tensor { shape: value_shape, data: Vec::new() },
                });
            }
            let mut ids = IdCursor { parts: &id_parts, part: 0, at: 0 };
            let mut blocks = Vec::with_capacity(parts.len());
            let mut entries = 0usize;
            for part in parts {
                let block = match *part {
                    Part::Dense { values: v } => {
                        let x = args[v].dense(&name)?;
                        let n = x.data.len() / width;
                        if n * width != x.data.len() || entries + n > total {
                            return Err(bad(format!("values of shape {:?} do not fit rows of width {width}", x.shape)));
                        }
                        entries += n;
                        Block::Dense { ids: ids.next(n), x: &x.data }
                    }
                    Part::Masked { dy, mask } => {
                        let (dy, mask) = (args[dy].dense(&name)?, args[mask].dense(&name)?);
                        let shape = crate::ops::fused::broadcast_all([dy.shape.as_slice(), mask.shape.as_slice()])
                            .ok_or_else(|| bad("the factors of the gradient do not broadcast".into()))?;
                        let numel: usize = shape.iter().product();
                        // The entry axes: those before the trailing axes that make one row.
                        let mut t = shape.len();
                        let mut tail = 1usize;
                        while t > 0 && tail < width {
                            t -= 1;
                            tail *= shape[t];
                        }
                        let n = numel / width;
                        if tail != width || entries + n > total {
                            return Err(bad(format!(
                                "a product of shape {shape:?} does not make rows of width {width}"
                            )));
                        }
                        let (ds, ms) = (broadcast_strides(&dy.shape, &shape), broadcast_strides(&mask.shape, &shape));
                        let mut step = 1usize;
                        for ax in (t..shape.len()).rev() {
                            if shape[ax] != 1 && (ms[ax] != 0 || ds[ax] != step) {
                                return Err(bad(
                                    "the mask varies along a row or the rows of dy are not contiguous".into()
                                ));
                            }
                            step *= shape[ax];
                        }
                        entries += n;
                        Block::Masked {
                            ids: ids.next(n),
                            dy: &dy.data,
                            mask: &mask.data,
                            shape: shape[..t].to_vec(),
                            ds: ds[..t].to_vec(),
                            ms: ms[..t].to_vec(),
                        }
                    }
                };
                blocks.push(block);
            }
            if entries != total {
                return Err(bad(format!("{total} ids but {entries} rows of values")));
            }
            // The split into two partial sums depends on the work only, never on the thread
            // count, so that a run's numbers are the same on any number of threads.
            let split = !exact && total * width >= PARALLEL_WORK;
            let (rows, data) = if limit <= 2 * total + (1 << 16) {
                match halves(&blocks, width).filter(|_| split) {
                    Some(h) => accumulate_halves(&h, limit, width, threads, pool),
                    None => accumulate(&blocks, limit, width, threads, pool),
                }
            } else {
                scratch_and_combine(&blocks, total, width, pool)
            };
            let mut value_shape = vec![rows.len()];
            value_shape.extend_from_slice(&cx.out_shape[1..]);
            Ok(Value::RowSparse { shape: cx.out_shape.to_vec(), rows, values: Tensor { shape: value_shape, data } })
        }
    }
}
