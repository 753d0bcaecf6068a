//! The random ops of the graph: Bernoulli masks, in-batch permutations and ids sampled
//! from a vocabulary, with their three rules (dropout's mask, DropMask, is a source op and
//! draws the same way: [`SplitMix64::chance`]).
//!
//! Every draw comes from [`SplitMix64::keyed`]`(seed, step, stream)`: the run's seed and
//! step from [`crate::exec::Mode`], the stream from the op (one per call in the spec). So a
//! run draws the same values on every backend, run after run, and a resumed run draws at
//! step `s` what an uninterrupted one drew there. In evaluation ([`Mode::eval`]: seed 0,
//! step 0) a Bernoulli mask is its expectation `p`, and the other two draw the stream's
//! fixed evaluation values: evaluation is deterministic. None of them passes a gradient.
//! The jit draws training's Bernoulli and dropout masks with a kernel of its own (both
//! threads, each from its offset of the stream: the same values); otherwise they run on
//! these eval rules (on the host for OpenCL), drawing `O(elements)` values.
//!
//! [`Mode::eval`]: crate::exec::Mode::eval

use super::index::{need_dense_float, need_ids};
use super::{shape_err, DType, Op, Operand, ShapeError, Signature, ValueKind};
use crate::exec::{Arg, EvalCx, ExecError};
use crate::ir::graph::{Graph, Node, NodeId};
use crate::rng::SplitMix64;
use crate::tensor::{Float, Ids, Tensor, Value};

pub fn shape(op: &Op, x: &[Operand]) -> Result<Signature, ShapeError> {
    match op {
        Op::Bernoulli { p, .. } => {
            super::require_dense_real(op, x)?;
            if !(0.0..=1.0).contains(p) {
                return shape_err(format!("a Bernoulli probability must be in [0, 1], got {p}"));
            }
            Ok(Signature::dense(x[0].shape.to_vec()))
        }
        Op::Permutation { n, .. } => Ok(Signature { shape: vec![n.clone()], dtype: DType::I, kind: ValueKind::Dense }),
        Op::SampleIds { n, power, seen, .. } => {
            need_ids(&x[0], op)?;
            if *seen {
                need_ids(&x[3], op)?;
                if x[0].shape.is_empty() || x[3].shape.is_empty() || x[0].shape[0] != x[3].shape[0] {
                    return shape_err(format!(
                        "{} needs the seen ids with the rows of the positives (the same first axis), got {} and {}",
                        op.name(),
                        x[0].describe(),
                        x[3].describe()
                    ));
                }
            }
            need_dense_float(&x[1], op)?;
            need_ids(&x[2], op)?;
            if x[1].shape.len() != 1 || x[2].shape.len() != 1 {
                return shape_err(format!(
                    "{} needs a vocabulary's weights [V] and column starts [C + 1], got {} and {}",
                    op.name(),
                    x[1].describe(),
                    x[2].describe()
                ));
            }
            if !(power.is_finite() && *power >= 0.0) {
                return shape_err(format!("a sampling power must be finite and >= 0, got {power}"));
            }
            let mut shape = x[0].shape.to_vec();
            shape.push(n.clone());
            Ok(Signature { shape, dtype: DType::I, kind: ValueKind::Dense })
        }
        _ => shape_err(format!("{} is not a random op", op.name())),
    }
}

/// No gradient: a mask, a permutation or sampled ids are constants to autodiff (the values
/// they select carry it, through `Mul` or `TakeAlong`).
pub fn grad(_graph: &mut Graph, node: &Node, _id: NodeId, _dy: NodeId) -> Result<Vec<Option<NodeId>>, ShapeError> {
    Ok(vec![None; node.inputs.len()])
}

pub fn eval<T: Float>(op: &Op, args: &[Arg<T>], cx: &EvalCx) -> Result<Value<T>, ExecError> {
    let mode = cx.mode;
    match op {
        Op::Bernoulli { p, stream } => {
            let shape = args[0].dense("bernoulli")?.shape.clone();
            if !mode.training {
                return Ok(Value::Dense(Tensor::full(shape, T::from_f64(*p))));
            }
            let mut rng = SplitMix64::keyed(mode.seed, mode.step, *stream);
            let n = shape.iter().product();
            let data = (0..n).map(|_| if rng.chance(*p) { T::ONE } else { T::ZERO }).collect();
            Ok(Value::Dense(Tensor { shape, data }))
        }
        Op::Permutation { stream, .. } => {
            let n = cx.out_shape[0];
            let mut data: Vec<u32> = (0..n as u32).collect();
            SplitMix64::keyed(mode.seed, mode.step, *stream).shuffle(&mut data);
            Ok(Value::Ids(Ids { shape: vec![n], data }))
        }
        Op::SampleIds { power, exclude, seen, stream, .. } => {
            let pos = args[0].ids("sample_ids")?;
            let weights = args[1].dense("sample_ids")?;
            let starts = args[2].ids("sample_ids")?;
            let table = Vocabulary::new(&weights.data, &starts.data, *power)?;
            let n = *cx.out_shape.last().unwrap_or(&0);
            let mut rng = SplitMix64::keyed(mode.seed, mode.step, *stream);
            let mut data = Vec::with_capacity(pos.data.len() * n);
            // The ids each row of `pos` never draws: the row's seen ids (sorted, once per
            // row), with the positive itself merged in for each draw under `exclude`.
            let seen_ids = if *seen { Some(args[3].ids("sample_ids")?) } else { None };
            let rows = pos.shape.first().copied().unwrap_or(1).max(1);
            let per_row = pos.data.len() / rows;
            let mut row_seen: Vec<u32> = Vec::new();
            let mut excluded: Vec<u32> = Vec::new();
            for (k, &p) in pos.data.iter().enumerate() {
                if k % per_row.max(1) == 0 {
                    if let Some(s) = seen_ids {
                        let width = s.data.len() / s.shape[0].max(1);
                        let b = k / per_row.max(1);
                        row_seen.clear();
                        row_seen.extend_from_slice(&s.data[b * width..(b + 1) * width]);
                        row_seen.sort_unstable();
                        row_seen.dedup();
                    }
                }
                excluded.clear();
                excluded.extend_from_slice(&row_seen);
                if *exclude {
                    if let Err(at) = excluded.binary_search(&p) {
                        excluded.insert(at, p);
                    }
                }
                // A row whose seen ids cover its column draws as without them (a draw
                // that finds no mass takes nothing from the stream).
                if !table.draw(&mut rng, p, &excluded, n, &mut data)? {
                    let own = if *exclude { std::slice::from_ref(&p) } else { &[] };
                    if !table.draw(&mut rng, p, own, n, &mut data)? {
                        let (lo, hi) = table.column(p);
                        return Err(sample_error(format!(
                            "no id to draw for id {p}: its column (ids {lo}..{hi}) has no {}id of positive weight",
                            if *exclude { "other " } else { "" }
                        )));
                    }
                }
            }
            Ok(Value::Ids(Ids { shape: cx.out_shape.to_vec(), data }))
        }
        _ => Err(ExecError::BadOperand { op: op.name(), message: "not evaluated by the random rules".into() }),
    }
}

/// A vocabulary to draw ids from: the cumulative weights `weight^power` of every id (`0`
/// for an id of weight 0, whatever the power), and its columns' id ranges.
struct Vocabulary<'a> {
    /// `cum[i]`: the sum of the weights of ids `0..=i` of the id's column (each column
    /// starts again from 0).
    cum: Vec<f64>,
    starts: &'a [u32],
}

fn sample_error(message: String) -> ExecError {
    ExecError::BadOperand { op: "sample_ids".into(), message }
}

impl<'a> Vocabulary<'a> {
    fn new<T: Float>(weights: &[T], starts: &'a [u32], power: f64) -> Result<Vocabulary<'a>, ExecError> {
        let v = weights.len();
        let ordered = starts.windows(2).all(|w| w[0] <= w[1]);
        if starts.len() < 2 || starts[0] != 0 || starts[starts.len() - 1] as usize != v || !ordered {
            return Err(sample_error(format!(
                "the column starts {starts:?} must rise from 0 to the vocabulary's size {v}"
            )));
        }
        let mut cum = Vec::with_capacity(v);
        for c in 0..starts.len() - 1 {
            let mut total = 0.0f64;
            for (i, w) in weights.iter().enumerate().take(starts[c + 1] as usize).skip(starts[c] as usize) {
                let w = w.to_f64();
                if !(w.is_finite() && w >= 0.0) {
                    return Err(sample_error(format!("id {i} has weight {w}; weights must be finite and >= 0")));
                }
                if w > 0.0 {
                    total += if power == 0.0 { 1.0 } else { w.powf(power) };
                }
                cum.push(total);
            }
        }
        Ok(Vocabulary { cum, starts })
    }

    /// The id range `lo..hi` of the column holding id `p` (a valid id).
    fn column(&self, p: u32) -> (usize, usize) {
        let c = self.starts.partition_point(|&s| s <= p) - 1;
        (self.starts[c] as usize, self.starts[c + 1] as usize)
    }

    /// Appends `n` ids drawn for the positive id `p` (with replacement, from `p`'s column),
    /// never one of `excluded` (sorted ascending; ids of other columns are ignored). The
    /// draw takes the remaining mass directly (no rejection): a point `u` of it is moved
    /// over the share of each excluded id at or before it, in ascending order. False (and
    /// nothing drawn, nothing taken from `rng`) when the exclusions leave no mass.
    fn draw(
        &self,
        rng: &mut SplitMix64,
        p: u32,
        excluded: &[u32],
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<bool, ExecError> {
        let v = self.cum.len();
        if p as usize >= v {
            return Err(ExecError::IdOutOfRange { op: "sample_ids".into(), id: p, limit: v });
        }
        let (lo, hi) = self.column(p);
        let before = |i: usize| if i == lo { 0.0 } else { self.cum[i - 1] };
        let total = self.cum[hi - 1];
        // The excluded ids of p's column that have a share of the mass, ascending.
        let first = excluded.partition_point(|&e| (e as usize) < lo);
        let last_ex = excluded.partition_point(|&e| (e as usize) < hi);
        let shares: Vec<(f64, f64)> = excluded[first..last_ex]
            .iter()
            .map(|&e| (before(e as usize), self.cum[e as usize] - before(e as usize)))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        let mass = total - shares.iter().map(|&(_, w)| w).sum::<f64>();
        let is_excluded = |i: usize| excluded[first..last_ex].binary_search(&(i as u32)).is_ok();
        // The last id of positive weight that is not excluded: where a point lands when
        // rounding carries it to the column's total.
        let last = (lo..hi).rev().find(|&i| before(i) < self.cum[i] && !is_excluded(i));
        let Some(last) = last.filter(|_| mass > 0.0) else {
            return Ok(false);
        };
        for _ in 0..n {
            let mut u = rng.next_f64() * mass;
            for &(start, share) in &shares {
                if u < start {
                    break;
                }
                u += share;
            }
            // The first id whose cumulative weight passes u has a positive weight.
            let i = lo + self.cum[lo..hi].partition_point(|&c| c <= u);
            let i = if i >= hi || is_excluded(i) { last } else { i };
            out.push(i as u32);
        }
        Ok(true)
    }
}
