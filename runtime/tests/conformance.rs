//! The conformance suite: every entry of the op catalogue runs on every executor and must
//! equal interp (the reference).
//!
//! The catalogue is built from `UnaryOp::ALL`, `BinaryOp::ALL` and `ReduceOp::ALL` (so a new
//! elementwise op or reduction is in it without an edit here) plus softmax, constant,
//! phase (run in training mode too), random (both modes), layout, index, select (top-k) and linalg cases.
//! Operands mix in the special values an op's semantics allow: every elementwise op and
//! every layout copy gets zeros of both signs, ±inf, NaN, huge and tiny magnitudes; reductions get those whose result does not
//! depend on the order (-inf, huge of one sign, tiny; no NaN); softmax gets -inf (a masked
//! position); top-k gets ties, signed zeros, ±inf and NaN.
//!
//! The executors, each a module of tests made by [`conformance!`] from the same test
//! bodies (one per catalogue group): `jit_exact` (1 and 2 threads, exact kernels: every
//! elementwise, softmax, layout and index result equal to interp's, NaN to NaN), `jit_fast`
//! (1 and 2 threads, the default kernels: polynomial transcendentals, fma, reassociated
//! sums) and, built with `--features opencl`, `opencl` on the default device. Without an
//! OpenCL platform the `opencl` tests say why they skip, unless `MDL_REQUIRE_OPENCL=1`,
//! which makes that a failure.
//!
//! Tolerance (all but `jit_exact`'s exact cases): |got - want| <= tol * (1 + |want|) per
//! element, with tol 1e-5 for elementwise ops and reductions (the device's and the jit's
//! polynomial exp/log/tanh differ from Rust's libm in the last bits) and 1e-5 * k for a
//! product summing k terms; NaN must meet NaN and an infinity the same infinity.
//!
//! A new op gets conformance by adding one [`Case`] to its group below (elementwise ops
//! and reductions: none, they come from `ALL`).

mod common;
use common::{dims, values};

use mdl_runtime::backend::jit::Jit;
use mdl_runtime::backend::{Executor, Interp};
use mdl_runtime::ir::dim::Binding;
use mdl_runtime::ops::fused::{FusedKernel, Instr};
use mdl_runtime::{BinaryOp, DType, Dim, Graph, Init, Mode, Op, ReduceOp, Tensor, UnaryOp, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// An operand of a catalogue entry: a real tensor (fed as a parameter) or ids (an input).
#[derive(Clone)]
enum Operand {
    Real(Tensor<f32>),
    Ids(Tensor<u32>),
}

/// One entry of the op catalogue: an op on concrete operands.
#[derive(Clone)]
struct Case {
    name: String,
    op: Op,
    operands: Vec<Operand>,
    /// The relative tolerance of the backends that may compute differently (see the module
    /// docs).
    tol: f32,
    /// `jit_exact` must give interp's values exactly.
    exact: bool,
    /// Run in training mode (`Mode::train`) rather than evaluation.
    training: bool,
}

impl Case {
    fn new(name: impl Into<String>, op: Op, operands: Vec<Operand>) -> Case {
        Case { name: name.into(), op, operands, tol: 1e-5, exact: true, training: false }
    }

    /// The case run in training mode.
    fn in_training(mut self) -> Case {
        self.training = true;
        self
    }

    /// A product or other sum whose terms the backend may add in another order.
    fn summing(mut self, terms: usize) -> Case {
        self.tol = 1e-5 * terms.max(1) as f32;
        self.exact = false;
        self
    }
}

fn real(shape: &[usize], data: Vec<f32>) -> Operand {
    Operand::Real(Tensor::new(shape.to_vec(), data).unwrap())
}

fn ids(shape: &[usize], data: Vec<u32>) -> Operand {
    Operand::Ids(Tensor::new(shape.to_vec(), data).unwrap())
}

/// Plain values in [-2, 2).
fn plain(shape: &[usize], seed: u64) -> Operand {
    real(shape, values(shape.iter().product(), seed, -2.0, 2.0))
}

/// Every third value special (from `specials`, cycling), the others plain.
fn with_specials(shape: &[usize], seed: u64, specials: &[f32]) -> Operand {
    let n = shape.iter().product();
    let plain = values(n, seed, -10.0, 10.0);
    let data = (0..n)
        .map(|i| if i % 3 == 0 { specials[(i / 3 + seed as usize) % specials.len()] } else { plain[i] })
        .collect();
    real(shape, data)
}

/// The special values of elementwise ops and copies: signed zeros, infinities, NaN, huge
/// (exp overflows, products overflow), tiny (denormal products) and ±1.
const SPECIALS: [f32; 14] =
    [0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30, -1e-30, 88.0, -88.0, 1e30, -1e30, 0.5];
/// Those whose sum or max does not depend on the order of the terms beyond rounding (no
/// huge values of both signs, which cancel in one order and not in another).
const ORDERLESS: [f32; 4] = [f32::NEG_INFINITY, 1e30, 1e-30, -1e-30];

// ------------------------------------------------------------------ the catalogue

/// A fused kernel (`Op::Fused`) of `body` over `inputs` operands, as the fusion pass makes
/// them: the code generators' rendering of each op (a lone op on equal shapes is not fused,
/// and runs on the jit's direct kernels or, on OpenCL, the host).
fn fused(inputs: usize, body: Vec<Instr>) -> Op {
    Op::Fused(Arc::new(FusedKernel { inputs, body, reduce: None }))
}

/// Every unary op: alone on rows, on a row too short for a vector and on an operand large
/// enough that the jit splits it over two threads; and as a fused kernel, alone and
/// reading one value per row (a splat) next to a full operand.
fn unary() -> Vec<Case> {
    let mut cases = Vec::new();
    for (s, &u) in UnaryOp::ALL.iter().enumerate() {
        let s = s as u64;
        for shape in [vec![3usize, 37], vec![3], vec![300, 512]] {
            let x = with_specials(&shape, s, &SPECIALS);
            cases.push(Case::new(format!("{u:?} {shape:?}"), Op::Unary(u), vec![x]));
        }
        let alone = fused(1, vec![Instr::Input(0), Instr::Unary(u, 0)]);
        cases.push(Case::new(format!("fused {u:?}"), alone, vec![with_specials(&[3, 37], s + 1, &SPECIALS)]));
        let splat =
            fused(2, vec![Instr::Input(0), Instr::Input(1), Instr::Unary(u, 0), Instr::Binary(BinaryOp::Add, 2, 1)]);
        let (col, full) = (with_specials(&[3, 1], s + 2, &SPECIALS), real(&[3, 37], vec![0.25; 3 * 37]));
        cases.push(Case::new(format!("fused {u:?} of a splat + 0.25"), splat, vec![col, full]));
    }
    cases
}

/// Every binary op on every broadcast pattern: equal shapes (with ties, for max, min and
/// eq), a scalar, a trailing bias, a per-row value, a middle axis, each on either side
/// (the jit's direct kernels know some patterns, fused kernels read the others); a large
/// pair the jit splits over two threads; and as a fused kernel on equal shapes.
fn binary() -> Vec<Case> {
    let mut cases = Vec::new();
    let big = [4usize, 3, 37];
    let patterns: [&[usize]; 6] = [&big, &[], &[37], &[4, 3, 1], &[3, 37], &[4, 1, 37]];
    for (s, &op) in BinaryOp::ALL.iter().enumerate() {
        let s = 10 * s as u64;
        for (p, small) in patterns.iter().enumerate() {
            let a = with_specials(&big, s + p as u64, &SPECIALS);
            let mut b = with_specials(small, s + 7 + p as u64, &SPECIALS);
            if let (Operand::Real(a), Operand::Real(b), true) = (&a, &mut b, *small == big) {
                for i in (0..b.data.len()).step_by(4) {
                    b.data[i] = a.data[i]; // ties
                }
            }
            let name = |first: &[usize], second: &[usize]| format!("{op:?} {first:?} {second:?}");
            cases.push(Case::new(name(&big, small), Op::Binary(op), vec![a.clone(), b.clone()]));
            if *small != big {
                cases.push(Case::new(name(small, &big), Op::Binary(op), vec![b, a]));
            }
        }
        let (x, y) = (with_specials(&[600, 256], s + 1, &SPECIALS), plain(&[600, 1], s + 2));
        cases.push(Case::new(format!("{op:?} [600, 256] [600, 1]"), Op::Binary(op), vec![x, y]));
        let (x, y) = (with_specials(&big, s + 3, &SPECIALS), with_specials(&big, s + 4, &SPECIALS));
        let alone = fused(2, vec![Instr::Input(0), Instr::Input(1), Instr::Binary(op, 0, 1)]);
        cases.push(Case::new(format!("fused {op:?}"), alone, vec![x, y]));
    }
    cases
}

/// Every reduction over each axis, a run of axes and all of them, kept or not (values
/// with the order-free specials); and softmax along each axis, with masked (-inf)
/// positions and a fully masked row.
fn reduce() -> Vec<Case> {
    let mut cases = Vec::new();
    let shape = [5usize, 6, 7];
    for (s, &op) in ReduceOp::ALL.iter().enumerate() {
        for (axes, keep_dims) in [
            (vec![0], false),
            (vec![1], true),
            (vec![2], false),
            (vec![0, 1], false),
            (vec![1, 2], true),
            (vec![0, 1, 2], false),
        ] {
            let x = with_specials(&shape, s as u64 + axes.len() as u64, &ORDERLESS);
            let terms = axes.iter().map(|&a| shape[a]).product();
            let name = format!("{op:?} axes {axes:?} keep {keep_dims}");
            let case = Case::new(name, Op::Reduce { op, axes, keep_dims }, vec![x]);
            cases.push(if op.adds() { case.summing(terms) } else { case });
        }
    }
    for axis in 0..3 {
        let Operand::Real(mut x) = plain(&shape, 40 + axis as u64) else { unreachable!("plain is real") };
        for i in (0..x.data.len()).step_by(5) {
            x.data[i] = f32::NEG_INFINITY;
        }
        if axis == 2 {
            x.data[..7].fill(f32::NEG_INFINITY); // a row of nothing but masked positions
        }
        cases.push(Case::new(format!("softmax axis {axis}"), Op::Softmax { axis }, vec![Operand::Real(x)]));
    }
    cases
}

/// Reshape, permute, broadcast, concat, slice and pad of real values (specials included:
/// a copy keeps every value) and the layout ops that move ids.
fn layout() -> Vec<Case> {
    let x = || with_specials(&[4, 3, 5], 50, &SPECIALS);
    let mut cases = vec![
        Case::new("reshape", Op::Reshape { shape: dims(&[12, 5]) }, vec![x()]),
        Case::new("broadcast [3, 1] -> [4, 3, 5]", Op::Broadcast { shape: dims(&[4, 3, 5]) }, vec![plain(&[3, 1], 51)]),
        Case::new("broadcast [] -> [2, 3]", Op::Broadcast { shape: dims(&[2, 3]) }, vec![plain(&[], 52)]),
    ];
    for perm in [vec![0, 2, 1], vec![2, 0, 1], vec![1, 0, 2]] {
        cases.push(Case::new(format!("permute {perm:?}"), Op::Permute { perm }, vec![x()]));
    }
    for axis in 0..3 {
        let mut other = vec![4, 3, 5];
        other[axis] = 2;
        cases.push(Case::new(
            format!("concat axis {axis}"),
            Op::Concat { axis },
            vec![x(), with_specials(&other, 53, &SPECIALS), x()],
        ));
        let (start, len) = (1, [4, 3, 5][axis] - 2);
        cases.push(Case::new(
            format!("slice axis {axis}"),
            Op::Slice { axis, start: Dim::lit(start), len: Dim::lit(len) },
            vec![x()],
        ));
        cases.push(Case::new(
            format!("pad axis {axis}"),
            Op::Pad { axis, before: Dim::lit(2), after: Dim::lit(1) },
            vec![x()],
        ));
    }
    let id_data = |n: usize| (0..n as u32).map(|i| (i * 7) % 11).collect::<Vec<u32>>();
    cases.push(Case::new("reshape ids", Op::Reshape { shape: dims(&[6]) }, vec![ids(&[2, 3], id_data(6))]));
    cases.push(Case::new("permute ids", Op::Permute { perm: vec![1, 0] }, vec![ids(&[2, 3], id_data(6))]));
    cases.push(Case::new(
        "slice ids",
        Op::Slice { axis: 1, start: Dim::lit(1), len: Dim::lit(2) },
        vec![ids(&[2, 3], id_data(6))],
    ));
    cases
}

/// The constant tensors made from sizes alone: positions, triangles on several diagonals,
/// the identity (no operands).
fn constant() -> Vec<Case> {
    let mut cases = vec![
        Case::new("arange 1", Op::Arange { n: Dim::lit(1) }, vec![]),
        Case::new("arange 50", Op::Arange { n: Dim::lit(50) }, vec![]),
        Case::new("eye 5", Op::Eye { n: Dim::lit(5) }, vec![]),
    ];
    for upper in [false, true] {
        for k in [-2, 0, 1, 7] {
            cases.push(Case::new(format!("triangle {upper} {k}"), Op::Triangle { n: Dim::lit(6), upper, k }, vec![]));
        }
    }
    cases
}

/// The phase choice TrainEval, in evaluation (its second operand) and in training (its
/// first), on special values.
fn phase() -> Vec<Case> {
    let operands = || vec![with_specials(&[3, 7], 64, &SPECIALS), with_specials(&[3, 7], 65, &SPECIALS)];
    vec![
        Case::new("train_eval in evaluation", Op::TrainEval, operands()),
        Case::new("train_eval in training", Op::TrainEval, operands()).in_training(),
    ]
}

/// The random ops and the loop counters, in evaluation and in training (seed 5, step 2,
/// epoch 1): every backend runs their eval rules, so each draws interp's values exactly.
fn random() -> Vec<Case> {
    let weights = || real(&[10], vec![0.0, 0.0, 5.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 1.0]);
    let starts = || ids(&[3], vec![0, 6, 10]);
    let sample = |power, exclude| Op::SampleIds { n: Dim::lit(7), power, exclude, seen: false, stream: 3 };
    let mut cases = Vec::new();
    for training in [false, true] {
        let phase = |c: Case| if training { c.in_training() } else { c };
        let at = |name: &str| format!("{name} ({})", if training { "training" } else { "evaluation" });
        cases.extend([
            phase(Case::new(at("bernoulli"), Op::Bernoulli { p: 0.3, stream: 1 }, vec![plain(&[6, 9], 70)])),
            phase(Case::new(at("permutation"), Op::Permutation { n: Dim::lit(33), stream: 2 }, vec![])),
            phase(Case::new(
                at("sample_ids by weight, excluding"),
                sample(1.0, true),
                vec![ids(&[2, 3], vec![2, 3, 5, 8, 9, 0]), weights(), starts()],
            )),
            phase(Case::new(
                at("sample_ids not in the row's seen ids"),
                Op::SampleIds { n: Dim::lit(7), power: 1.0, exclude: true, seen: true, stream: 4 },
                vec![ids(&[2, 3], vec![2, 3, 5, 8, 9, 0]), weights(), starts(), ids(&[2, 2], vec![3, 9, 0, 2])],
            )),
            phase(Case::new(
                at("sample_ids uniform"),
                sample(0.0, false),
                vec![ids(&[4], vec![2, 7, 5, 9]), weights(), starts()],
            )),
        ]);
    }
    cases.push(Case::new("counter step", Op::Counter(mdl_runtime::Counter::Step), vec![]).in_training());
    cases.push(Case::new("counter epoch", Op::Counter(mdl_runtime::Counter::Epoch), vec![]).in_training());
    cases.push(Case::new("counter stage", Op::Counter(mdl_runtime::Counter::Stage), vec![]).in_training());
    cases
}

/// Gather (ids of any rank, rows of any width), segment sums, one-hot, the ops that make
/// ids (bucketize, with specials and values on the boundaries; id div and mod; a constant
/// id list; ids moved into their group's block of a per-group table), and the selection along an axis (take_along, scatter_add).
fn index() -> Vec<Case> {
    let table = || with_specials(&[11, 4], 60, &SPECIALS);
    let id_data = |n: usize, limit: u32| (0..n as u32).map(|i| (i * 7 + 3) % limit).collect::<Vec<u32>>();
    vec![
        Case::new("gather [6]", Op::Gather, vec![table(), ids(&[6], id_data(6, 11))]),
        Case::new("gather [3, 4]", Op::Gather, vec![table(), ids(&[3, 4], id_data(12, 11))]),
        Case::new("gather rank-1 table", Op::Gather, vec![plain(&[11], 61), ids(&[5], id_data(5, 11))]),
        Case::new("gather 20000 rows", Op::Gather, vec![table(), ids(&[20_000], id_data(20_000, 11))]),
        Case::new(
            "segment_sum",
            Op::SegmentSum { segments: Dim::lit(4) },
            vec![plain(&[9, 3], 62), ids(&[9], id_data(9, 4))],
        )
        .summing(9),
        // Large enough for the jit's two-thread column split; rows added in order, exact.
        Case::new(
            "segment_sum 20000 rows",
            Op::SegmentSum { segments: Dim::lit(5) },
            vec![plain(&[20_000, 9], 66), ids(&[20_000], id_data(20_000, 5))],
        ),
        Case::new("one_hot", Op::OneHot { depth: Dim::lit(5) }, vec![ids(&[2, 3], id_data(6, 5))]),
        Case::new(
            "bucketize",
            Op::Bucketize { boundaries: vec![-10.0, -1.0, 0.0, 0.5, 88.0] },
            vec![with_specials(&[4, 37], 63, &SPECIALS)],
        ),
        Case::new("id_div", Op::IdDiv { by: 3 }, vec![ids(&[3, 4], id_data(12, 11))]),
        Case::new("id_mod", Op::IdMod { by: 4 }, vec![ids(&[3, 4], id_data(12, 11))]),
        Case::new("id_list", Op::IdList { ids: vec![0, 0, 1, 3, 2, 3] }, vec![]),
        // Per-domain tables: each sample's ids moved into its group's block of 11 rows.
        Case::new(
            "group_ids [3, 4]",
            Op::GroupIds { rows: Dim::lit(11) },
            vec![ids(&[3, 4], id_data(12, 11)), ids(&[3], vec![2, 0, 1])],
        ),
        Case::new(
            "group_ids [4, 2, 3]",
            Op::GroupIds { rows: Dim::lit(11) },
            vec![ids(&[4, 2, 3], id_data(24, 11)), ids(&[4], id_data(4, 5))],
        ),
        // Along the middle axis with ids per element, and the same pair list for every row
        // and column (ids [1, P, 1], runs of the last axis); along the last axis; one id
        // broadcast over the leading axis.
        Case::new(
            "take_along axis 1",
            Op::TakeAlong { axis: 1 },
            vec![with_specials(&[4, 5, 3], 64, &SPECIALS), ids(&[4, 7, 3], id_data(84, 5))],
        ),
        Case::new(
            "take_along pairs",
            Op::TakeAlong { axis: 1 },
            vec![with_specials(&[4, 5, 3], 65, &SPECIALS), ids(&[1, 10, 1], vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 3])],
        ),
        Case::new(
            "take_along axis 2",
            Op::TakeAlong { axis: 2 },
            vec![with_specials(&[4, 5, 6], 66, &SPECIALS), ids(&[4, 5, 2], id_data(40, 6))],
        ),
        Case::new(
            "take_along 20000 rows",
            Op::TakeAlong { axis: 1 },
            vec![with_specials(&[20_000, 6], 67, &SPECIALS), ids(&[1, 3], vec![5, 0, 5])],
        ),
        // Repeated ids add up (in order of position, on every backend).
        Case::new(
            "scatter_add axis 1",
            Op::ScatterAdd { axis: 1, size: Dim::lit(5) },
            vec![plain(&[4, 7, 3], 68), ids(&[4, 7, 3], id_data(84, 5))],
        )
        .summing(7),
        Case::new(
            "scatter_add pairs",
            Op::ScatterAdd { axis: 1, size: Dim::lit(5) },
            vec![plain(&[4, 10, 3], 69), ids(&[1, 10, 1], vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 3])],
        )
        .summing(10),
        Case::new(
            "scatter_add 20000 rows",
            Op::ScatterAdd { axis: 1, size: Dim::lit(6) },
            vec![plain(&[20_000, 3], 70), ids(&[1, 3], vec![5, 0, 5])],
        )
        .summing(3),
    ]
}

/// TopK on every axis, largest and smallest, k from 1 to the whole axis (a sort), with
/// ties (values on a coarse grid), signed zeros, ±inf and NaN: the positions must be
/// interp's exactly.
fn select() -> Vec<Case> {
    let mut cases = Vec::new();
    let shape = [5usize, 6, 7];
    let Operand::Real(mut x) = with_specials(&shape, 80, &SPECIALS) else { unreachable!("real") };
    for (i, v) in x.data.iter_mut().enumerate() {
        if i % 3 == 1 {
            *v = (*v).round(); // ties
        }
    }
    for (axis, &size) in shape.iter().enumerate() {
        for k in [1, 3, size] {
            for largest in [true, false] {
                cases.push(Case::new(
                    format!("top_k axis {axis} k {k} largest {largest}"),
                    Op::TopK { axis, k: Dim::from(k), largest },
                    vec![Operand::Real(x.clone())],
                ));
            }
        }
    }
    cases
}

/// MatMul with every transpose flag, batched and with a shared right operand, at sizes
/// on both sides of the kernels' tiles, and the shapes the jit gives kernels of their own:
/// vector products (one output column or row), outer products (a reduction of one), and
/// long reductions into small outputs (split along the reduction, one part ending inside
/// the vector kernels' 16 lanes); the grouped products.
fn linalg() -> Vec<Case> {
    let mut cases = Vec::new();
    let shapes =
        [(1usize, 1usize, 1usize), (3, 5, 4), (17, 33, 9), (64, 64, 64), (130, 37, 1), (1, 37, 70), (40, 1, 24)];
    let long = [(6, 40_003, 5), (3, 70_001, 1), (1, 50_001, 2)];
    for (m, k, n) in shapes.into_iter().chain(long) {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let shape = |rows: usize, cols: usize, t: bool| if t { vec![cols, rows] } else { vec![rows, cols] };
            let op = Op::MatMul { trans_a: ta, trans_b: tb };
            let (a, b) = (shape(m, k, ta), shape(k, n, tb));
            let name = format!("matmul {a:?} {b:?} aT {ta} bT {tb}");
            cases.push(Case::new(name, op.clone(), vec![plain(&a, 70), plain(&b, 71)]).summing(k));
            let batched = |s: &[usize]| [&[3][..], s].concat();
            let name = format!("matmul batched {a:?} {b:?} aT {ta} bT {tb}");
            cases.push(Case::new(name, op.clone(), vec![plain(&batched(&a), 72), plain(&batched(&b), 73)]).summing(k));
            if !ta {
                let name = format!("matmul shared right {a:?} {b:?} bT {tb}");
                cases.push(Case::new(name, op.clone(), vec![plain(&batched(&a), 74), plain(&b, 75)]).summing(k));
            }
            // Broadcast leading axes: [2, 3, m, k] @ [3, k, n], [2, 1, m, k] @ [1, 3, k, n], and
            // a shared left operand [m, k] @ [2, k, n].
            let lead = |l: &[usize], s: &[usize]| [l, s].concat();
            for (la, lb) in [(&[2usize, 3][..], &[3usize][..]), (&[2, 1], &[1, 3]), (&[], &[2])] {
                let (sa, sb) = (lead(la, &a), lead(lb, &b));
                let name = format!("matmul broadcast {sa:?} {sb:?} aT {ta} bT {tb}");
                cases.push(Case::new(name, op.clone(), vec![plain(&sa, 76), plain(&sb, 77)]).summing(k));
            }
        }
    }
    let groups = [0u32, 2, 1, 0, 2, 2, 1];
    for trans_w in [false, true] {
        let w = if trans_w { [3, 5, 4] } else { [3, 4, 5] };
        cases.push(
            Case::new(
                format!("group_matmul wT {trans_w}"),
                Op::GroupMatMul { trans_w },
                vec![plain(&[7, 4], 76), plain(&w, 77), ids(&[7], groups.to_vec())],
            )
            .summing(4),
        );
    }
    cases.push(
        Case::new(
            "group_outer",
            Op::GroupOuter { groups: Dim::lit(3) },
            vec![plain(&[7, 4], 78), plain(&[7, 5], 79), ids(&[7], groups.to_vec())],
        )
        .summing(7),
    );
    cases
}

// ------------------------------------------------------------------ running a group

/// Parameter values by name.
type Params = HashMap<String, Tensor<f32>>;
/// Fed values by name.
type Feeds = HashMap<String, Value<f32>>;

/// The cases as one graph, output `c{i}` for case `i`: real operands are parameters, ids
/// are inputs.
fn graph(cases: &[Case]) -> (Graph, Params, Feeds) {
    let (mut g, mut params, mut feeds) = (Graph::new(), HashMap::new(), HashMap::new());
    for (i, case) in cases.iter().enumerate() {
        let mut inputs = Vec::new();
        for (j, operand) in case.operands.iter().enumerate() {
            let name = format!("c{i}_{j}");
            inputs.push(match operand {
                Operand::Real(t) => {
                    params.insert(name.clone(), t.clone());
                    g.param(&name, dims(&t.shape), Init::Zeros, None, false)
                }
                Operand::Ids(t) => {
                    feeds.insert(name.clone(), Value::Ids(t.clone()));
                    g.input(&name, dims(&t.shape), DType::I)
                }
            });
        }
        let y = g.add(case.op.clone(), &inputs, "").unwrap_or_else(|e| panic!("{}: {e}", case.name));
        g.outputs.insert(format!("c{i}"), y);
    }
    (g, params, feeds)
}

/// Whether `got` passes for `want`: equal (NaN meets NaN), or within `tol` unless `exact`
/// (an infinity only meets the same infinity).
fn agrees(got: f32, want: f32, tol: f32, exact: bool) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    got == want || !exact && want.is_finite() && (got - want).abs() <= tol * (1.0 + want.abs())
}

/// Runs `cases` on interp and on `exec` (called `backend`); every output must agree.
/// `exact`: the executor promises interp's values for the cases marked exact.
/// Cases in training mode run as a graph of their own, in `Mode::train` (seed 5, step 2,
/// epoch 1, stage 3).
fn check(cases: &[Case], backend: &str, exec: &mut dyn Executor, exact: bool) {
    for training in [false, true] {
        let part: Vec<Case> = cases.iter().filter(|c| c.training == training).cloned().collect();
        if !part.is_empty() {
            let mode = if training { Mode::train(5, 2).in_epoch(1).in_stage(3) } else { Mode::eval() };
            check_in_mode(&part, backend, exec, exact, mode);
        }
    }
}

fn check_in_mode(cases: &[Case], backend: &str, exec: &mut dyn Executor, exact: bool, mode: Mode) {
    let (g, params, feeds) = graph(cases);
    let b = Binding::new();
    let want = Interp.run(&g, &b, &feeds, &params, &mode).unwrap();
    let got = exec.run(&g, &b, &feeds, &params, &mode).unwrap_or_else(|e| panic!("{backend}: {e}"));
    for (i, case) in cases.iter().enumerate() {
        let out = format!("c{i}");
        let (w, o) = (want.output(&out).unwrap(), got.output(&out).unwrap());
        match (w, o) {
            (Value::Ids(w), Value::Ids(o)) => assert_eq!(o, w, "{backend}: {}", case.name),
            (Value::Dense(w), Value::Dense(o)) => {
                assert_eq!(o.shape, w.shape, "{backend}: {}", case.name);
                let exact = exact && case.exact;
                for (k, (&x, &y)) in o.data.iter().zip(&w.data).enumerate() {
                    assert!(agrees(x, y, case.tol, exact), "{backend}: {} [{k}]: got {x}, interp {y}", case.name);
                }
            }
            _ => panic!("{backend}: {}: got {o:?}, interp {w:?}", case.name),
        }
    }
}

/// The jit with exact kernels on one and on two threads.
fn jit_exact(cases: Vec<Case>) {
    for threads in [1, 2] {
        let mut jit = Jit::with_threads(threads).with_exact_kernels(true);
        check(&cases, &format!("jit exact, {threads} thread(s)"), &mut jit, true);
    }
}

/// The jit with its default (fast) kernels on one and on two threads.
fn jit_fast(cases: Vec<Case>) {
    for threads in [1, 2] {
        check(&cases, &format!("jit fast, {threads} thread(s)"), &mut Jit::with_threads(threads), false);
    }
}

/// OpenCL on the default device; without a platform, a skip that says why, or a failure
/// with `MDL_REQUIRE_OPENCL=1`.
#[cfg(feature = "opencl")]
fn opencl(cases: Vec<Case>) {
    use mdl_runtime::backend::opencl::{self, OpenCl};
    static ONCE: std::sync::Once = std::sync::Once::new();
    // PoCL's kernel cache under target/, set before any thread makes an OpenCL call.
    ONCE.call_once(|| {
        if std::env::var_os("POCL_CACHE_DIR").is_none() {
            std::env::set_var("POCL_CACHE_DIR", concat!(env!("CARGO_TARGET_TMPDIR"), "/pocl-cache"));
        }
    });
    let required = std::env::var("MDL_REQUIRE_OPENCL").is_ok_and(|v| v == "1");
    let why = if opencl::probe() == 0 {
        opencl::NO_PLATFORM.to_string()
    } else {
        match OpenCl::new(None) {
            Ok(mut exec) => return check(&cases, "opencl", &mut exec, false),
            Err(e) => format!("the OpenCL executor could not start: {e}"),
        }
    };
    assert!(!required, "MDL_REQUIRE_OPENCL=1 but {why}");
    eprintln!("skipping the OpenCL conformance cases: {why}");
}

/// One test per catalogue group and executor: `$executor::$group` runs `$group()` through
/// the executor's runner, in the manner of candle's `test_device!`.
macro_rules! conformance {
    ($($(#[$attr:meta])* $executor:ident: [$($group:ident),+];)+) => {
        $(
            $(#[$attr])*
            mod $executor {
                $(
                    #[test]
                    fn $group() {
                        super::$executor(super::$group());
                    }
                )+
            }
        )+
    };
}

conformance! {
    jit_exact: [unary, binary, reduce, constant, phase, random, layout, index, select, linalg];
    jit_fast: [unary, binary, reduce, constant, phase, random, layout, index, select, linalg];
    #[cfg(feature = "opencl")]
    opencl: [unary, binary, reduce, constant, phase, random, layout, index, select, linalg];
}

/// The catalogue itself: the op lists come from `ALL`, and every case is well formed (its
/// shape rule accepts it), so no case drops out silently.
#[test]
fn the_catalogue_covers_every_elementwise_op_and_reduction() {
    let names: Vec<String> = [unary(), binary(), reduce()].into_iter().flatten().map(|c| c.op.name()).collect();
    for &u in UnaryOp::ALL {
        assert!(names.contains(&Op::Unary(u).name()), "{u:?} has no case");
    }
    for &b in BinaryOp::ALL {
        assert!(names.contains(&Op::Binary(b).name()), "{b:?} has no case");
    }
    for &r in ReduceOp::ALL {
        assert!(names.iter().any(|n| n.starts_with(&format!("reduce_{}", format!("{r:?}").to_lowercase()))));
    }
    for group in [unary(), binary(), reduce(), constant(), phase(), random(), layout(), index(), select(), linalg()] {
        graph(&group);
    }
}
