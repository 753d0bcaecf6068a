//! What evaluating a node needs, shared by the eval rules (`ops/*`) and the backends:
//! the run [`Mode`], the [`ExecError`] type, the per-node context [`EvalCx`] and the
//! operand view [`Arg`]. The random ops' stream is [`crate::rng::SplitMix64`].

use crate::ir::dim::Binding;
use crate::tensor::{Float, Ids, Tensor, Value};
use std::fmt;

/// How a graph is run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mode {
    /// Training: dropout masks are drawn; otherwise they are all ones.
    pub training: bool,
    /// The run's seed; with `step` and each node's stream it fixes every random draw.
    pub seed: u64,
    /// The training step (a new mask every step): the number of steps trained before this
    /// one. `step()` in a spec reads it (`Op::Counter`).
    pub step: u64,
    /// The epoch the training step belongs to, from 0 (`epoch()` in a spec).
    pub epoch: u64,
    /// The stage of the experiment's schedule the training step belongs to, from 0
    /// (`stage()` in a spec).
    pub stage: u64,
}

impl Mode {
    /// Evaluation mode (no randomness).
    pub fn eval() -> Mode {
        Mode { training: false, seed: 0, step: 0, epoch: 0, stage: 0 }
    }

    /// Training at `step` of epoch 0 and stage 0 ([`Mode::in_epoch`] and [`Mode::in_stage`]
    /// set them).
    pub fn train(seed: u64, step: u64) -> Mode {
        Mode { training: true, seed, step, epoch: 0, stage: 0 }
    }

    /// The same mode in epoch `epoch`.
    pub fn in_epoch(self, epoch: u64) -> Mode {
        Mode { epoch, ..self }
    }

    /// The same mode in stage `stage` of the schedule.
    pub fn in_stage(self, stage: u64) -> Mode {
        Mode { stage, ..self }
    }
}

/// Why a graph could not be evaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecError {
    /// An input the graph declares was not fed.
    MissingFeed { name: String },
    /// A parameter the graph declares has no value.
    MissingParam { name: String },
    /// A fed input or parameter has the wrong concrete shape.
    ShapeMismatch { what: &'static str, name: String, declared: String, expected: Vec<usize>, got: Vec<usize> },
    /// A fed input or parameter holds a different number of values than its shape says.
    Malformed { what: &'static str, name: String, shape: Vec<usize>, len: usize },
    /// A fed input is the wrong kind of value (ids where reals are declared, or the reverse).
    KindMismatch { name: String, expected: &'static str, got: &'static str },
    /// A symbolic size could not be evaluated under the binding.
    Size { message: String },
    /// An id outside its range `[0, limit)`.
    IdOutOfRange { op: String, id: u32, limit: usize },
    /// An operand of the wrong kind or shape reached an eval rule (a graph built around
    /// the checked builder, or a backend bug).
    BadOperand { op: String, message: String },
    /// An error while evaluating a node, with the node named.
    AtNode { node: usize, op: String, scope: String, error: Box<ExecError> },
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::MissingFeed { name } => write!(f, "input `{name}` was not fed"),
            ExecError::MissingParam { name } => write!(f, "parameter `{name}` has no value"),
            ExecError::ShapeMismatch { what, name, declared, expected, got } => {
                write!(f, "{what} `{name}` has shape {got:?}, but the graph declares {declared} = {expected:?}")
            }
            ExecError::Malformed { what, name, shape, len } => {
                write!(
                    f,
                    "{what} `{name}` holds {len} values, but its shape {shape:?} needs {}",
                    shape.iter().product::<usize>()
                )
            }
            ExecError::KindMismatch { name, expected, got } => {
                write!(f, "input `{name}` must be {expected}, got {got}")
            }
            ExecError::Size { message } => write!(f, "{message}"),
            ExecError::IdOutOfRange { op, id, limit } => {
                write!(f, "{op}: id {id} is out of range (must be below {limit})")
            }
            ExecError::BadOperand { op, message } => write!(f, "{op}: {message}"),
            ExecError::AtNode { node, op, scope, error } => {
                write!(f, "node %{node} ({op}")?;
                if !scope.is_empty() {
                    write!(f, ", {scope}")?;
                }
                write!(f, "): {error}")
            }
        }
    }
}

impl std::error::Error for ExecError {}

/// What an eval rule knows about the node it evaluates.
#[derive(Clone, Copy, Debug)]
pub struct EvalCx<'a> {
    pub binding: &'a Binding,
    pub mode: &'a Mode,
    /// The node's output shape under the binding.
    pub out_shape: &'a [usize],
}

impl EvalCx<'_> {
    /// A size attribute of the op (a slice start, a pad width) under the binding.
    pub fn size(&self, d: &crate::ir::dim::Dim) -> Result<usize, ExecError> {
        d.eval(self.binding).map_err(|message| ExecError::Size { message })
    }
}

/// An operand as an eval rule reads it: a computed value, or a parameter read in place
/// (parameters are never copied to evaluate a graph).
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a, T> {
    Value(&'a Value<T>),
    Param(&'a Tensor<T>),
}

impl<'a, T: Float> Arg<'a, T> {
    /// The operand as a dense real tensor, or an error naming `op`.
    pub fn dense(self, op: &str) -> Result<&'a Tensor<T>, ExecError> {
        match self {
            Arg::Param(t) | Arg::Value(Value::Dense(t)) => Ok(t),
            Arg::Value(v) => Err(ExecError::BadOperand {
                op: op.into(),
                message: format!("expected a dense tensor, got {}", v.kind_name()),
            }),
        }
    }

    /// The operand as ids, or an error naming `op`.
    pub fn ids(self, op: &str) -> Result<&'a Ids, ExecError> {
        match self {
            Arg::Value(Value::Ids(t)) => Ok(t),
            Arg::Param(_) => {
                Err(ExecError::BadOperand { op: op.into(), message: "expected ids, got a parameter".into() })
            }
            Arg::Value(v) => {
                Err(ExecError::BadOperand { op: op.into(), message: format!("expected ids, got {}", v.kind_name()) })
            }
        }
    }
}
