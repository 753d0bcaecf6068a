//! Whether training is still sound, checked on every step: what this module owns is the
//! divergence guard ([`Health::check_loss`]: a train loss that grows by orders of magnitude
//! over its first value stops the run) and the report of where a loss that stopped being
//! finite came from ([`first_non_finite`]); and the errors for numbers no result may be
//! computed from: a score that is not finite ([`non_finite_score`]) and an early-stopping
//! metric that the validation split leaves undefined ([`undefined_metric`]).
//!
//! Locating the first non-finite value re-runs the failed step's forward graph on the
//! reference backend (`interp`, the oracle every backend is checked against) keeping every
//! node's value, and walks the nodes in order. That costs nothing on healthy steps (no
//! backend checks its kernels' outputs op by op) and names the node in the spec's terms
//! (its op and scope) whatever backend trained; the parameters are those of the failed
//! step, since a step whose loss is not finite updates nothing.

use super::Session;
use mdl_runtime::backend::{interp, op_kind};
use mdl_runtime::exec::Mode;
use mdl_runtime::tensor::{Tensor, Value};
use mdl_runtime::Binding;
use std::collections::HashMap;

/// How many times its first value the train loss may grow before the run is stopped as
/// diverged (a first loss under 1 counts as 1).
pub const DIVERGENCE_FACTOR: f64 = 1e4;

/// The guard's memory: the first train loss of this process's part of the run.
#[derive(Debug, Default)]
pub struct Health {
    first_loss: Option<f64>,
}

impl Health {
    /// An error when `loss` (finite, of step `step`) is more than [`DIVERGENCE_FACTOR`]
    /// times the first loss: the run diverged; `lr` is named in the advice.
    pub fn check_loss(&mut self, loss: f64, step: u64, lr: f64) -> Result<(), String> {
        let first = *self.first_loss.get_or_insert(loss);
        if loss > DIVERGENCE_FACTOR * first.max(1.0) {
            return Err(format!(
                "training diverged: the train loss reached {loss:.4e} at step {step}, more than {DIVERGENCE_FACTOR:e} times its first value {first:.5}; lower train.lr (now {lr}) or set train.clip_norm"
            ));
        }
        Ok(())
    }
}

/// Where the forward pass of a step first produced a value that is not finite: the op,
/// its scope in the spec and the parameters it reads (with their largest magnitude), or
/// the parameter that already held one. `None` when the reference backend computes the
/// step without one (the training backend's rounding then differs from the reference).
pub fn first_non_finite(
    session: &Session,
    binding: &Binding,
    feeds: &HashMap<String, Value<f32>>,
    params: &HashMap<String, Tensor<f32>>,
    mode: &Mode,
) -> Option<String> {
    let graph = &session.compiled.graph;
    for p in &graph.params {
        if let Some(bad) = params.get(&p.name).and_then(|t| t.data.iter().find(|x| !x.is_finite())) {
            return Some(format!("parameter `{}` holds {bad}", p.name));
        }
    }
    let values = match interp::run_keep_all(graph, binding, feeds, params, mode) {
        Ok(v) => v,
        Err(e) => return Some(format!("the reference backend could not re-run the step: {e}")),
    };
    let param_of: HashMap<_, _> = graph.params.iter().map(|p| (p.node, p.name.as_str())).collect();
    for id in graph.ids() {
        let Some(Value::Dense(t)) = values.node(id) else { continue };
        let Some(bad) = t.data.iter().find(|x| !x.is_finite()) else { continue };
        let node = graph.node(id);
        let reads: Vec<String> = node
            .inputs
            .iter()
            .filter_map(|i| {
                let name = param_of.get(i)?;
                let largest = params.get(*name)?.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                Some(format!("`{name}` (largest |value| {largest:.3e})"))
            })
            .collect();
        let reads = if reads.is_empty() { String::new() } else { format!(", reading parameter {}", reads.join(", ")) };
        if let mdl_runtime::Op::Input { name, .. } = &node.op {
            return Some(format!("the first value that is not finite is {bad} in the batch's input `{name}`"));
        }
        let scope = if node.scope.is_empty() { String::new() } else { format!(" in `{}`", node.scope) };
        return Some(format!(
            "the first value that is not finite is {bad} from op `{}`{scope}{reads}",
            op_kind(&node.op)
        ));
    }
    None
}

/// The error for a logit that is not finite (`z`, of task `task` on row `row` of `ds`):
/// evaluation and prediction stop instead of averaging it into a metric or writing it out.
pub fn non_finite_score(task: &str, z: f32, row: usize, ds: &crate::data::Dataset) -> String {
    format!(
        "the model's logit for task `{task}` is {z} on data row {} of {}: the parameters give scores that are not finite, so no metric or prediction can be computed",
        row + 1,
        ds.source
    )
}

/// The error for an early-stopping metric (`metric`) that `report`, of the validation
/// split `source`, leaves undefined: it names why and the metrics that are defined there.
pub fn undefined_metric(metric: &str, report: &crate::metrics::Report, source: &str) -> String {
    let why = match metric {
        "gauc" => "no user has rows of both classes",
        "logloss" | "rmse" | "mae" | "accuracy" => "it has no rows",
        m if m.contains('@') => "it has no rows",
        _ => "all its rows have the same label",
    };
    let defined: Vec<String> = [("auc", report.auc), ("gauc", report.gauc), ("logloss", report.logloss)]
        .into_iter()
        .chain(report.more.iter().map(|(m, v)| (m.as_str(), Some(*v))))
        .filter(|(_, v)| v.is_some())
        .map(|(m, _)| format!("`{m}`"))
        .collect();
    let advice = match defined.len() {
        0 => "no metric is defined there: give a validation split with rows of both classes".to_string(),
        _ => format!("use {}, defined there, or a validation split with rows of both classes", defined.join(" or ")),
    };
    format!("train.early_stopping.metric: valid {metric} is undefined on {source} ({why}); {advice}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_ten_thousand_times_its_first_stops_the_run() {
        let mut h = Health::default();
        h.check_loss(0.69, 1, 0.1).unwrap();
        h.check_loss(5000.0, 2, 0.1).unwrap();
        let err = h.check_loss(3.9e23, 3, 1e6).unwrap_err();
        assert!(err.starts_with("training diverged: the train loss reached 3.9000e23 at step 3"), "{err}");
        assert!(err.contains("its first value 0.69000; lower train.lr (now 1000000)"), "{err}");
        // A small first loss counts as 1.
        let mut h = Health::default();
        h.check_loss(1e-6, 1, 0.1).unwrap();
        h.check_loss(9000.0, 2, 0.1).unwrap();
    }
}
