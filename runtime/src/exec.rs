//! What evaluating a node needs, shared by the eval rules (`ops/*`) and the backends:
//! the run [`Mode`], the [`ExecError`] type, the per-node context [`EvalCx`] and the
//! operand view [`Arg`], plus the deterministic random stream used by dropout.

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
    /// The training step (a new mask every step).
    pub step: u64,
}

impl Mode {
    /// Evaluation mode (no randomness).
    pub fn eval() -> Mode {
        Mode { training: false, seed: 0, step: 0 }
    }

    pub fn train(seed: u64, step: u64) -> Mode {
        Mode { training: true, seed, step }
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

/// SplitMix64: a tiny, well-mixed 64-bit generator (Steele, Lea & Flood 2014). Used to
/// derive independent, reproducible streams from `(seed, step, stream)`.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The generator for one node's draws in one step of one run.
    pub fn keyed(seed: u64, step: u64, stream: u64) -> SplitMix64 {
        let mut g = SplitMix64(seed);
        let a = g.next_u64() ^ step;
        let mut g = SplitMix64(a);
        let b = g.next_u64() ^ stream.rotate_left(32);
        SplitMix64(SplitMix64(b).next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let u = g.next_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn keyed_streams_differ() {
        let first = |seed, step, stream| SplitMix64::keyed(seed, step, stream).next_u64();
        assert_eq!(first(1, 2, 3), first(1, 2, 3));
        assert_ne!(first(1, 2, 3), first(1, 2, 4));
        assert_ne!(first(1, 2, 3), first(1, 3, 3));
        assert_ne!(first(1, 2, 3), first(2, 2, 3));
    }
}
