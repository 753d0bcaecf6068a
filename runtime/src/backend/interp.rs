//! The reference backend: evaluates a graph node by node with the eval rules of `ops/*`,
//! generic over f32 and f64 — the oracle for every other backend and for the gradient
//! checks. This module owns the reference evaluator ([`Rules`]: every op on its eval rule,
//! operands read in place, freed values dropped), the entry points [`run`] and
//! [`run_keep_all`], and the [`Interp`] executor. The node order, the checks of feeds,
//! parameters and results, and the value lifetimes are the shared driver's
//! ([`super::driver`]).

use super::driver::{execute, Evaluator, Lifetimes, Operands};
use super::{Executor, Values};
use crate::exec::{EvalCx, ExecError, Mode};
use crate::ir::dim::Binding;
use crate::ir::graph::{Graph, NodeId};
use crate::ops::{self, Op};
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
    execute(graph, &Lifetimes::new(graph, false), binding, feeds, params, mode, &mut Rules)
}

/// Runs `graph` and keeps the value of every node (for tests and debugging; parameters and
/// fed inputs are copied into the result).
pub fn run_keep_all<T: Float>(
    graph: &Graph,
    binding: &Binding,
    feeds: &HashMap<String, Value<T>>,
    params: &HashMap<String, Tensor<T>>,
    mode: &Mode,
) -> Result<Values<T>, ExecError> {
    execute(graph, &Lifetimes::new(graph, true), binding, feeds, params, mode, &mut Rules)
}

/// The reference evaluator: every op on its eval rule, operands read in place.
pub(crate) struct Rules;

impl<T: Float> Evaluator<T> for Rules {
    fn eval(
        &mut self,
        _id: NodeId,
        op: &Op,
        operands: &mut Operands<'_, '_, T>,
        cx: &EvalCx,
    ) -> Result<Value<T>, ExecError> {
        ops::eval(op, &operands.args(op)?, cx)
    }
}

/// The reference backend as an [`Executor`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Interp;

impl Executor for Interp {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn run(
        &mut self,
        graph: &Graph,
        binding: &Binding,
        feeds: &HashMap<String, Value<f32>>,
        params: &HashMap<String, Tensor<f32>>,
        mode: &Mode,
    ) -> Result<Values<f32>, ExecError> {
        run(graph, binding, feeds, params, mode)
    }
}
