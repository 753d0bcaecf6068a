//! The primitive operations of the IR: a small closed set.
//!
//! Where an op's pieces live (the rule for adding one, see `docs/adding-an-op.md`): every
//! op belongs to one family file below, and that file holds, for its ops, all three rules
//! side by side:
//! - `shape` — the operands' kinds (ids or reals, dense or row-sparse; `require_dense_real`
//!   for the families that read only dense reals), then the output shape, dtype and value
//!   kind from the operands' (symbolic) shapes, or a [`ShapeError`] in words a spec author
//!   understands;
//! - `grad`  — the vector-Jacobian product as new IR nodes (reverse-mode autodiff);
//! - `eval`  — the forward rule on concrete tensors (the `interp` reference backend).
//!
//! `mod.rs` only names the ops and places each in its family: [`Op::family`] is the one
//! match that [`Op::infer`] (after the operand count), [`grad`] and [`eval`] dispatch on.
//! `emit.rs` is the small node-building vocabulary the `grad` rules share. The elementwise ops (`UnaryOp`, `BinaryOp`) are
//! declared in `elementwise.rs`, with their scalar arithmetic, classes and `ALL` lists.
//!
//! | family        | ops |
//! |---------------|-----|
//! | `source`      | Input, Param, Scalar, the constant tensors Arange, Triangle and Eye (from compile-time sizes), IdList (constant ids), Counter (the training step, epoch or stage), DropMask, StopGrad, Path, TrainEval |
//! | `random`      | Bernoulli (0/1 masks), Permutation (in-batch shuffles), SampleIds (ids drawn from a vocabulary) |
//! | `elementwise` | Unary (neg exp log sqrt recip relu sigmoid tanh softplus abs step sign floor gelu), Binary (add sub mul div max min gt eq ge ne prelu keep) with broadcasting |
//! | `layout`      | Reshape, Permute, Broadcast, Concat, Slice, Pad (all but Pad also move ids) |
//! | `reduce`      | Reduce (sum mean max min over axes), Softmax |
//! | `linalg`      | MatMul, GroupMatMul, GroupOuter |
//! | `index`       | Gather, SparseRows, SegmentSum, OneHot, Bucketize (reals to ids), IdDiv, IdMod, GroupIds (ids into a per-group table), TakeAlong (gather along an axis), ScatterAdd (its adjoint), TopK (positions of the k largest or smallest) |
//! | `fused`       | Fused (Unary/Binary groups made one kernel by the fusion pass after autodiff, with an optional sum/mean epilogue) |

pub mod elementwise;
pub mod emit;
pub mod fused;
pub mod index;
pub mod layout;
pub mod linalg;
pub mod random;
pub mod reduce;
pub mod source;

pub use elementwise::{BinaryOp, UnaryOp};

use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::dim::{shape_to_string, Dim, Shape};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::tensor::{Float, Value};
use std::fmt;

/// Element type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// Real numbers (f32 or f64, chosen by the backend).
    F,
    /// Integer ids (vocabulary rows, domain ids).
    I,
}

/// The family files of [`Op`] (the table above): [`Op::family`] places each op in one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Source,
    Random,
    Elementwise,
    Layout,
    Reduce,
    Linalg,
    Index,
    Fused,
}

/// How a value is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Dense,
    /// A gradient of an embedding table that only holds the rows a batch touched:
    /// `(rows, values)`; its nominal shape is the table's shape. Only optimizers read it.
    RowSparse,
}

/// A counter of the training loop, as the graph reads it (`Op::Counter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// The steps trained before the current one ([`crate::exec::Mode::step`]).
    Step,
    /// The epoch of the current step, from 0 ([`crate::exec::Mode::epoch`]).
    Epoch,
    /// The stage of the schedule the current step belongs to, from 0
    /// ([`crate::exec::Mode::stage`]).
    Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

impl ReduceOp {
    /// Every reduction (tests iterate it).
    pub const ALL: &'static [ReduceOp] = &[ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];

    /// Adds its terms (sum, mean): a kernel may reassociate it and a fused kernel may end
    /// in it; max and min pick one of their terms instead.
    pub fn adds(self) -> bool {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => true,
            ReduceOp::Max | ReduceOp::Min => false,
        }
    }
}

/// A primitive operation. Operands are the node's `inputs`, in the order given per variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    // ---- source ----
    /// A batch input fed by the data pipeline (ids, masks, values, labels). No operands.
    Input { name: String, dtype: DType },
    /// A named model tensor: a trainable parameter (its init and group live in the graph's
    /// parameter table) or untrained state such as a running statistic (the graph's state
    /// table). No operands.
    Param { name: String },
    /// A constant scalar, shape `[]`. No operands.
    Scalar(f64),
    /// `[n]`: the positions `0, 1, ..., n-1` as reals. No operands.
    Arange { n: Dim },
    /// `[n, n]`: `1` where `col <= row + k` (the lower triangle; `upper`: where
    /// `col >= row + k`, the upper one), else `0`. With `k = 0` the diagonal is in. No
    /// operands.
    Triangle { n: Dim, upper: bool, k: i64 },
    /// `[n, n]`: the identity matrix. No operands.
    Eye { n: Dim },
    /// `[len(ids)]`: the constant ids `ids`, in order (positions chosen at compile time,
    /// such as the pairs `i < j` of fields). No operands, no gradient.
    IdList { ids: Vec<u32> },
    /// `[]`: the training loop's counter as a real scalar, from the run's
    /// [`crate::exec::Mode`] (`step`, `epoch`; exact below 2^24 in f32). No operands, no
    /// gradient. `step()` in a spec reads it in training and, in evaluation, the state the
    /// last training step left.
    Counter(Counter),
    /// `[x]` → a mask with `x`'s shape: each element `1/(1-p)` with probability `1-p`, else `0`;
    /// all ones when not training. `stream` keeps masks of different nodes independent.
    DropMask { p: f64, stream: u64 },
    /// `[x]` → `x`; no gradient flows back through it.
    StopGrad,
    /// `[x]` → `x`, the gradient passes through: a use of `x` the spec names as one of the
    /// model's gradient paths (`path(x, "name")`). Graphs that run have it resolved
    /// ([`crate::passes::through_path`]): into `x`, or, to measure one path's share of a
    /// gradient, into `StopGrad(x)` on every other path.
    Path { name: String },
    /// `[in_training, in_evaluation]` (equal shapes) → the first when the graph runs in
    /// training mode (`Mode::training`), else the second: batch statistics in training,
    /// running ones in evaluation. The gradient flows to the operand the run chooses;
    /// `passes::for_phase` resolves it before the trainer differentiates or runs a graph.
    TrainEval,

    // ---- random ----
    /// `[x]` → a 0/1 mask with `x`'s shape, each element `1` with probability `p`
    /// (independently; keyed by the run's seed, the step and `stream`); in evaluation every
    /// element is `p`, its expectation. No gradient.
    Bernoulli { p: f64, stream: u64 },
    /// `[]` → ids `[n]`: a uniformly random permutation of `0..n` (Fisher–Yates), a new one
    /// each training step; in evaluation the stream's fixed one. No operands, no gradient.
    Permutation { n: Dim, stream: u64 },
    /// `[pos: ids [s...], weights: real [V], starts: ids [C + 1]]` → ids `[s..., n]`: for
    /// each id `p` of `pos`, `n` ids drawn independently (with replacement) from the column
    /// `c` of the vocabulary holding `p` (`starts[c] <= p < starts[c + 1]`; `starts` rises
    /// from 0 to `V`), id `i` with probability proportional to `weights[i]^power` (`power`
    /// 0: uniform); an id of weight 0 never, and with `exclude` never `p` itself. With
    /// `seen`, a fourth operand `seen: ids [B, t...]` (`B` = `pos`'s first axis): never an id
    /// that row `b` of `seen` holds, for the ids of row `b` of `pos`. A new draw each
    /// training step; in evaluation the stream's fixed one. No gradient.
    SampleIds { n: Dim, power: f64, exclude: bool, seen: bool, stream: u64 },

    // ---- elementwise ----
    /// `[x]`
    Unary(UnaryOp),
    /// `[a, b]`, broadcast numpy-style (axes aligned from the right; size 1 stretches).
    Binary(BinaryOp),

    // ---- layout ----
    /// `[x]` → same elements in row-major order, new shape (equal element count).
    Reshape { shape: Shape },
    /// `[x]` → axes permuted: output axis `i` is input axis `perm[i]`.
    Permute { perm: Vec<usize> },
    /// `[x]` → stretched to `shape` (numpy rules; new axes on the left).
    Broadcast { shape: Shape },
    /// `[x0, x1, ...]` → joined along `axis` (all other axes equal).
    Concat { axis: usize },
    /// `[x]` → `x[.., start .. start+len, ..]` along `axis`.
    Slice { axis: usize, start: Dim, len: Dim },
    /// `[x]` → zeros added before and after along `axis` (the adjoint of Slice).
    Pad { axis: usize, before: Dim, after: Dim },

    // ---- reduce ----
    /// `[x]` → reduced over `axes` (sorted, distinct); kept as size 1 when `keep_dims`.
    Reduce { op: ReduceOp, axes: Vec<usize>, keep_dims: bool },
    /// `[x]` → softmax along `axis`.
    Softmax { axis: usize },

    // ---- linalg ----
    /// `[a, b]`: `a: [..., m, k]`, `b: [..., k, n]` (both of rank ≥ 2) → `[..., m, n]`, one
    /// product per leading index; the leading axes broadcast numpy-style (`[B, h, n, k] @
    /// [h, k, m]`, and `b: [k, n]` is shared by every leading index of `a`).
    /// `trans_a`/`trans_b` transpose the last two axes of that operand first.
    MatMul { trans_a: bool, trans_b: bool },
    /// `[x: [N, k], w: [G, k, n], idx: [N] (ids)]` → `[N, n]`, row `i` = `x[i] @ w[idx[i]]`
    /// (`trans_w`: use `w[g]ᵀ`, so `w: [G, n, k]`). Per-domain / per-task weights without
    /// materialising a weight per sample.
    GroupMatMul { trans_w: bool },
    /// `[x: [N, k], dy: [N, n], idx: [N]]` → `[groups, k, n]`, `out[g] = Σ_{i: idx[i]=g} x[i]ᵀ dy[i]`
    /// (the weight gradient of GroupMatMul).
    GroupOuter { groups: Dim },

    // ---- index ----
    /// `[table: [V, r...], ids: [i...] (ids)]` → `[i..., r...]`: rows of `table`.
    Gather,
    /// `[ids: [i...] (ids), dy: [i..., r...]]` → a RowSparse value of shape `[rows, r...]`
    /// holding `(ids, dy)` pairs (duplicates are combined by the consumer). The gradient of
    /// Gather into a parameter table.
    SparseRows { rows: Dim },
    /// `[x: [N, r...], idx: [N] (ids)]` → `[segments, r...]`, `out[g] = Σ_{i: idx[i]=g} x[i]`.
    SegmentSum { segments: Dim },
    /// `[idx: [i...] (ids)]` → `[i..., depth]` of 0/1 (zero gradient).
    OneHot { depth: Dim },
    /// `[x: real]` → ids of `x`'s shape: how many of `boundaries` (finite, strictly
    /// increasing, rounded to the backend's precision) are `<= x`. Bucket `i` holds
    /// `boundaries[i-1] <= x < boundaries[i]`; `-inf` and NaN fall in bucket 0, `+inf` in
    /// the last. No gradient.
    Bucketize { boundaries: Vec<f64> },
    /// `[ids]` → ids `id / by`, rounded down (`by > 0`). No gradient.
    IdDiv { by: u32 },
    /// `[ids]` → ids `id % by` (`by > 0`). No gradient.
    IdMod { by: u32 },
    /// `[ids: [N, i...] (ids), group: [N] (ids)]` → ids `ids[n, ..] + group[n] * rows`: the
    /// ids of sample `n` moved into its group's block of `rows` rows, so one Gather from a
    /// `[G * rows, ...]` table looks each sample up in its group's table only (per-domain
    /// embedding tables, with Gather's row-sparse gradient). Each id must be below `rows`.
    /// No gradient.
    GroupIds { rows: Dim },
    /// `[x: real [a..., n, c...], idx: ids [a'..., m, c'...]]` → `[a..., m, c...]`:
    /// `out[a, p, c] = x[a, idx[a, p, c], c]` along `axis` (numpy's `take_along_axis`). `idx`
    /// has `x`'s rank; on every other axis its size is `x`'s or 1 (it is then the same for
    /// every index of that axis). Each id must be below `n`. The gradient reaches `x`
    /// through ScatterAdd.
    TakeAlong { axis: usize },
    /// `[src: real [a..., m, c...], idx: ids as TakeAlong's]` → `[a..., size, c...]` of zeros
    /// with `src[a, p, c]` added at `[a, idx[a, p, c], c]` (in order of `p`): the adjoint of
    /// TakeAlong. Each id must be below `size`.
    ScatterAdd { axis: usize, size: Dim },
    /// `[x: real [a..., n, c...]]` → ids `[a..., k, c...]`: along `axis`, the positions of the
    /// `k` largest values (`largest`, in decreasing order) or the `k` smallest (increasing);
    /// equal values in order of position (the lowest first), NaN above every number (first
    /// among the largest, last among the smallest), `-0.0` equal to `0.0`. `k <= n`. No
    /// gradient: the values are `TakeAlong(x, positions)`.
    TopK { axis: usize, k: Dim, largest: bool },

    // ---- fused ----
    /// `[x0, x1, ...]` (the kernel's inputs, real and dense) → the kernel's body evaluated
    /// elementwise, every operand broadcast (numpy rules) to the broadcast of all operand
    /// shapes; then, when the kernel has a reduction epilogue, summed (or averaged) over its
    /// axes as `Reduce` does. Made by `fuse::fuse_elementwise` after autodiff; it has no
    /// gradient rule.
    Fused(std::sync::Arc<fused::FusedKernel>),
}

/// What a node produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    pub shape: Shape,
    pub dtype: DType,
    pub kind: ValueKind,
}

impl Signature {
    pub fn dense(shape: Shape) -> Signature {
        Signature { shape, dtype: DType::F, kind: ValueKind::Dense }
    }
}

/// A shape or type rule violated by an op's operands, in words for the spec author.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Shorthand for a failed shape rule.
pub(crate) fn shape_err<T>(msg: impl Into<String>) -> Result<T, ShapeError> {
    Err(ShapeError(msg.into()))
}

/// An operand as the shape rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub shape: &'a [Dim],
    pub dtype: DType,
    pub kind: ValueKind,
}

impl Operand<'_> {
    pub fn describe(&self) -> String {
        shape_to_string(self.shape)
    }
}

impl Op {
    /// Number of operands the op takes (`None`: any number ≥ 1).
    pub fn arity(&self) -> Option<usize> {
        use Op::*;
        Some(match self {
            Input { .. }
            | Param { .. }
            | Scalar(_)
            | Arange { .. }
            | Triangle { .. }
            | Eye { .. }
            | IdList { .. }
            | Counter(_)
            | Permutation { .. } => 0,
            DropMask { .. } | StopGrad | Path { .. } | Unary(_) | Bernoulli { .. } => 1,
            SampleIds { seen, .. } => 3 + usize::from(*seen),
            Binary(_) | TrainEval => 2,
            Reshape { .. } | Permute { .. } | Broadcast { .. } | Slice { .. } | Pad { .. } => 1,
            Concat { .. } => return None,
            Reduce { .. } | Softmax { .. } => 1,
            MatMul { .. } => 2,
            GroupMatMul { .. } | GroupOuter { .. } => 3,
            Gather | SparseRows { .. } | SegmentSum { .. } | TakeAlong { .. } | ScatterAdd { .. } => 2,
            OneHot { .. } | Bucketize { .. } | IdDiv { .. } | IdMod { .. } | TopK { .. } => 1,
            GroupIds { .. } => 2,
            Fused(kernel) => kernel.inputs,
        })
    }

    /// The family file that holds this op's shape, gradient and eval rules: the one place
    /// that sorts ops into families, so that [`Op::infer`], [`grad`] and [`eval`] dispatch
    /// alike and a new op is placed once.
    pub fn family(&self) -> Family {
        use Op::*;
        match self {
            Input { .. }
            | Param { .. }
            | Scalar(_)
            | Arange { .. }
            | Triangle { .. }
            | Eye { .. }
            | IdList { .. }
            | Counter(_)
            | DropMask { .. }
            | StopGrad
            | Path { .. }
            | TrainEval => Family::Source,
            Bernoulli { .. } | Permutation { .. } | SampleIds { .. } => Family::Random,
            Unary(_) | Binary(_) => Family::Elementwise,
            Reshape { .. } | Permute { .. } | Broadcast { .. } | Concat { .. } | Slice { .. } | Pad { .. } => {
                Family::Layout
            }
            Reduce { .. } | Softmax { .. } => Family::Reduce,
            MatMul { .. } | GroupMatMul { .. } | GroupOuter { .. } => Family::Linalg,
            Gather
            | SparseRows { .. }
            | SegmentSum { .. }
            | OneHot { .. }
            | Bucketize { .. }
            | IdDiv { .. }
            | IdMod { .. }
            | GroupIds { .. }
            | TakeAlong { .. }
            | ScatterAdd { .. }
            | TopK { .. } => Family::Index,
            Fused(_) => Family::Fused,
        }
    }

    /// Inputs and parameters: values the backend reads from its feeds and parameters, with
    /// shapes from their declarations, never computed by a rule.
    fn is_declared(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. })
    }

    /// The output signature from the operands: checks the operand count, then dispatches to
    /// the op's family, whose shape rule checks the operands' kinds (ids or reals, dense or
    /// row-sparse) and shapes. Source ops whose shape is not derivable from operands (Input,
    /// Param) get it from the graph builder.
    pub fn infer(&self, operands: &[Operand]) -> Result<Signature, ShapeError> {
        match self.arity() {
            Some(n) if n != operands.len() => {
                return shape_err(format!("{} takes {n} operand(s), got {}", self.name(), operands.len()))
            }
            None if operands.is_empty() => return shape_err(format!("{} needs operands", self.name())),
            _ => {}
        }
        if self.is_declared() {
            return shape_err("the shape of an input or parameter comes from its declaration");
        }
        match self.family() {
            Family::Source => source::shape(self, operands),
            Family::Random => random::shape(self, operands),
            Family::Elementwise => elementwise::shape(self, operands),
            Family::Layout => layout::shape(self, operands),
            Family::Reduce => reduce::shape(self, operands),
            Family::Linalg => linalg::shape(self, operands),
            Family::Index => index::shape(self, operands),
            Family::Fused => fused::shape(self, operands),
        }
    }

    /// A short name for listings and errors.
    pub fn name(&self) -> String {
        use Op::*;
        match self {
            Input { name, .. } => format!("input {name}"),
            Param { name } => format!("param {name}"),
            Scalar(v) => format!("scalar {v}"),
            Arange { n } => format!("arange n={n}"),
            Triangle { n, upper, k } => format!("{} n={n} k={k}", if *upper { "triu" } else { "tril" }),
            Eye { n } => format!("eye n={n}"),
            IdList { ids } => format!("id_list {ids:?}"),
            Counter(c) => format!("counter {}", format!("{c:?}").to_lowercase()),
            DropMask { p, .. } => format!("dropmask p={p}"),
            Bernoulli { p, .. } => format!("bernoulli p={p}"),
            Permutation { n, .. } => format!("permutation n={n}"),
            SampleIds { n, power, exclude, seen, .. } => format!(
                "sample_ids n={n} power={power}{}{}",
                if *exclude { " excluding" } else { "" },
                if *seen { " not seen" } else { "" }
            ),
            StopGrad => "stopgrad".into(),
            Path { name } => format!("path {name}"),
            TrainEval => "train_eval".into(),
            Unary(u) => format!("{u:?}").to_lowercase(),
            Binary(b) => format!("{b:?}").to_lowercase(),
            Reshape { shape } => format!("reshape {}", shape_to_string(shape)),
            Permute { perm } => format!("permute {perm:?}"),
            Broadcast { shape } => format!("broadcast {}", shape_to_string(shape)),
            Concat { axis } => format!("concat axis={axis}"),
            Slice { axis, start, len } => format!("slice axis={axis} start={start} len={len}"),
            Pad { axis, before, after } => format!("pad axis={axis} before={before} after={after}"),
            Reduce { op, axes, keep_dims } => {
                format!(
                    "reduce_{} axes={axes:?}{}",
                    format!("{op:?}").to_lowercase(),
                    if *keep_dims { " keep" } else { "" }
                )
            }
            Softmax { axis } => format!("softmax axis={axis}"),
            MatMul { trans_a, trans_b } => {
                format!("matmul{}{}", if *trans_a { " aT" } else { "" }, if *trans_b { " bT" } else { "" })
            }
            GroupMatMul { trans_w } => format!("group_matmul{}", if *trans_w { " wT" } else { "" }),
            GroupOuter { groups } => format!("group_outer groups={groups}"),
            Gather => "gather".into(),
            SparseRows { rows } => format!("sparse_rows rows={rows}"),
            SegmentSum { segments } => format!("segment_sum segments={segments}"),
            OneHot { depth } => format!("one_hot depth={depth}"),
            Bucketize { boundaries } => format!("bucketize {boundaries:?}"),
            IdDiv { by } => format!("id_div by={by}"),
            IdMod { by } => format!("id_mod by={by}"),
            GroupIds { rows } => format!("group_ids rows={rows}"),
            TakeAlong { axis } => format!("take_along axis={axis}"),
            ScatterAdd { axis, size } => format!("scatter_add axis={axis} size={size}"),
            TopK { axis, k, largest } => {
                format!("{} axis={axis} k={k}", if *largest { "top_k" } else { "bottom_k" })
            }
            Fused(kernel) => format!("fused {}", kernel.summary()),
        }
    }

    /// Ops whose output carries no gradient to their operands.
    pub fn is_nondifferentiable(&self) -> bool {
        match self {
            Op::StopGrad
            | Op::DropMask { .. }
            | Op::OneHot { .. }
            | Op::Bucketize { .. }
            | Op::IdDiv { .. }
            | Op::IdMod { .. }
            | Op::GroupIds { .. }
            | Op::IdList { .. }
            | Op::Counter(_)
            | Op::Bernoulli { .. }
            | Op::Permutation { .. }
            | Op::SampleIds { .. }
            | Op::TopK { .. } => true,
            Op::Unary(u) => !u.is_differentiable(),
            Op::Binary(b) => !b.is_differentiable(),
            _ => false,
        }
    }
}

/// The operand-kind check of the ops that read only dense real values (every family but
/// `layout`, which moves ids too, and the ops of `index` and `linalg` that read ids): a
/// family's shape rule calls it first for those ops.
pub(crate) fn require_dense_real(op: &Op, operands: &[Operand]) -> Result<(), ShapeError> {
    for o in operands {
        if o.dtype != DType::F {
            return shape_err(format!("{} needs real-valued operands, got ids", op.name()));
        }
        if o.kind != ValueKind::Dense {
            return shape_err(format!("{} cannot read a row-sparse gradient", op.name()));
        }
    }
    Ok(())
}

/// The vector-Jacobian product of node `id` (= `node`) as new nodes in `graph`: given the
/// cotangent `dy` of its output, one cotangent per operand (`None`: no gradient flows to
/// that operand). Each family's `grad` holds the rules for its ops.
pub fn grad(graph: &mut Graph, node: &Node, id: NodeId, dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    match node.op.family() {
        Family::Source => source::grad(graph, node, id, dy),
        Family::Random => random::grad(graph, node, id, dy),
        Family::Elementwise => elementwise::grad(graph, node, id, dy),
        Family::Layout => layout::grad(graph, node, id, dy),
        Family::Reduce => reduce::grad(graph, node, id, dy),
        Family::Linalg => linalg::grad(graph, node, id, dy),
        Family::Index => index::grad(graph, node, id, dy),
        Family::Fused => fused::grad(graph, node, id, dy),
    }
}

/// The forward rule of `op` on concrete operands (the `interp` backend). Input and Param
/// are not computed: the backend reads them from its feeds and parameters.
pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    if op.arity().is_some_and(|n| n != args.len()) || args.is_empty() && op.arity().is_none() {
        return Err(ExecError::BadOperand { op: op.name(), message: format!("got {} operand(s)", args.len()) });
    }
    if op.is_declared() {
        return Err(ExecError::BadOperand {
            op: op.name(),
            message: "inputs and parameters are read by the backend".into(),
        });
    }
    match op.family() {
        Family::Source => source::eval(op, args, cx),
        Family::Random => random::eval(op, args, cx),
        Family::Elementwise => elementwise::eval(op, args, cx),
        Family::Layout => layout::eval(op, args, cx),
        Family::Reduce => reduce::eval(op, args, cx),
        Family::Linalg => linalg::eval(op, args, cx),
        Family::Index => index::eval(op, args, cx),
        Family::Fused => fused::eval(op, args, cx),
    }
}
