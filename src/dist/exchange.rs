//! What the ranks of a data-parallel run exchange in each training step, and the check
//! that they stay in step.
//!
//! Each rank runs the training graph on its share of the global batch; its loss and
//! gradients are the mean over its rows. [`combine`] weighs each rank's by its share of
//! the global batch's rows (so that the result is the mean over the whole batch, as one
//! process computes it, up to rounding) and sums them in rank order:
//!
//! 1. a header (all-gather): each rank's weighted loss, and for every parameter and state
//!    whether it has a gradient (next value) here, and of what kind;
//! 2. dense gradients and states' next values, as one vector, with [`all_reduce_sum`];
//! 3. row-sparse embedding gradients as `(ids, values)`: each rank's duplicate rows summed
//!    first, then three all-gather-v's (the counts per table, the ids, the values), put
//!    together in rank order. The optimizer sums a row's entries in that order, so every
//!    rank applies the same update.
//!
//! A parameter that no rank has a gradient for is left out (as one process leaves it out:
//! Adam does not decay its moments); one that some rank has dense is dense for all.
//! [`params_hash`] fingerprints every tensor, which the run compares across ranks once an
//! epoch.

use super::{all_gather_f64, all_reduce_sum, Group};
use mdl_runtime::rows::{combine_duplicate_rows, row_width};
use mdl_runtime::tensor::{Tensor, Value};
use mdl_runtime::training::StepGradients;
use std::collections::HashMap;
use std::time::Instant;

/// Seconds spent exchanging, summed over steps.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExchangeTimes {
    /// The header's all-gather: the first collective of a step, where a rank that finished
    /// its share early waits for the slowest.
    pub wait_secs: f64,
    /// The dense all-reduce.
    pub dense_secs: f64,
    /// The row-sparse all-gathers and putting them together.
    pub sparse_secs: f64,
}

/// How a rank holds a tensor of the exchange (the header's code).
const ABSENT: f64 = 0.0;
const DENSE: f64 = 1.0;
const SPARSE: f64 = 2.0;

/// Combines every rank's [`StepGradients`] (`local`, `None` for a rank whose share of the
/// batch was empty) into the global batch's, the same on every rank. `weight` is this
/// rank's share of the batch's rows; `names` and `states` name the parameters and the
/// states, in the same order on every rank; `params` gives the shapes of the tensors a
/// rank has no value for.
pub fn combine(
    group: &dyn Group,
    local: Option<StepGradients>,
    weight: f64,
    names: &[&str],
    states: &[&str],
    params: &HashMap<String, Tensor<f32>>,
    times: &mut ExchangeTimes,
) -> Result<StepGradients, String> {
    let started = Instant::now();
    let (local, weight) = match local {
        Some(local) => (local, weight),
        None => (StepGradients { loss: 0.0, grads: HashMap::new(), states: HashMap::new() }, 0.0),
    };
    let code = |v: Option<&Value<f32>>| match v {
        None => ABSENT,
        Some(Value::RowSparse { .. }) => SPARSE,
        Some(_) => DENSE,
    };
    let mut header = vec![weight * local.loss as f64];
    header.extend(names.iter().map(|p| code(local.grads.get(*p))));
    header.extend(states.iter().map(|s| if local.states.contains_key(*s) { DENSE } else { ABSENT }));
    let headers = all_gather_f64(group, &header)?;
    let dense_started = Instant::now();
    times.wait_secs += (dense_started - started).as_secs_f64();
    let loss = headers.iter().fold(0.0f64, |sum, h| sum + h[0]) as f32;
    if !loss.is_finite() {
        return Ok(StepGradients { loss, grads: HashMap::new(), states: HashMap::new() });
    }
    // A tensor's kind over all ranks: dense where any rank has it dense.
    let kind = |i: usize| {
        let codes = headers.iter().map(|h| h[1 + i]);
        codes.fold(ABSENT, |k, c| if k == DENSE || c == DENSE { DENSE } else { k.max(c) })
    };
    let kinds: Vec<f64> = (0..names.len() + states.len()).map(kind).collect();
    let shape_of = |name: &str| {
        params.get(name).map(|t| t.shape.clone()).ok_or_else(|| format!("`{name}` has no value to take a shape from"))
    };

    // Dense gradients, then the states' next values, as one vector.
    let w = weight as f32;
    let mut dense: Vec<f32> = Vec::new();
    let mut dense_names: Vec<(usize, String, Vec<usize>)> = Vec::new();
    let mut grads = local.grads;
    for (i, name) in names.iter().enumerate() {
        if kinds[i] != DENSE {
            continue;
        }
        let shape = shape_of(name)?;
        let at = dense.len();
        match grads.remove(*name).map(|g| g.to_dense()) {
            Some(Some(t)) => dense.extend(t.data.iter().map(|&x| x * w)),
            Some(None) => return Err(format!("the gradient of `{name}` cannot be made dense")),
            None => dense.resize(at + shape.iter().product::<usize>(), 0.0),
        }
        dense_names.push((i, name.to_string(), shape));
    }
    let mut next_states = local.states;
    for (j, name) in states.iter().enumerate() {
        if kinds[names.len() + j] != DENSE {
            continue;
        }
        let shape = shape_of(name)?;
        let at = dense.len();
        match next_states.remove(*name) {
            Some(t) => dense.extend(t.data.iter().map(|&x| x * w)),
            None => dense.resize(at + shape.iter().product::<usize>(), 0.0),
        }
        dense_names.push((names.len() + j, name.to_string(), shape));
    }
    all_reduce_sum(group, &mut dense)?;
    let mut combined = StepGradients { loss, grads: HashMap::new(), states: HashMap::new() };
    let mut at = 0;
    for (i, name, shape) in dense_names {
        let len: usize = shape.iter().product();
        let t = Tensor::new(shape, dense[at..at + len].to_vec()).ok_or("all-reduce: a tensor of the wrong length")?;
        at += len;
        if i < names.len() {
            combined.grads.insert(name, Value::Dense(t));
        } else {
            combined.states.insert(name, t);
        }
    }
    let sparse_started = Instant::now();
    times.dense_secs += (sparse_started - dense_started).as_secs_f64();

    // Row-sparse gradients: this rank's rows (duplicates summed), weighted.
    let tables: Vec<&str> = names.iter().enumerate().filter(|(i, _)| kinds[*i] == SPARSE).map(|(_, p)| *p).collect();
    if !tables.is_empty() {
        let mut counts = Vec::with_capacity(tables.len());
        let mut ids = Vec::new();
        let mut values = Vec::new();
        for p in &tables {
            match grads.remove(*p) {
                Some(Value::RowSparse { shape, rows, values: v }) => {
                    let rows_here = combine_duplicate_rows(&rows, &v.data, row_width(&shape));
                    counts.push(rows_here.rows.len() as u32);
                    ids.extend_from_slice(&rows_here.rows);
                    values.extend(rows_here.values.iter().map(|&x| x * w));
                }
                _ => counts.push(0),
            }
        }
        let all_counts = group.all_gather_u32(&counts)?;
        let all_ids = group.all_gather_u32(&ids)?;
        let all_values = group.all_gather_f32(&values)?;
        for (k, name) in tables.iter().enumerate() {
            let shape = shape_of(name)?;
            let width = row_width(&shape);
            let mut rows = Vec::new();
            let mut table_values = Vec::new();
            for r in 0..group.size() {
                let counts_r = all_counts.part(r);
                let before: usize = counts_r[..k].iter().map(|&c| c as usize).sum();
                let n = counts_r[k] as usize;
                rows.extend_from_slice(&all_ids.part(r)[before..before + n]);
                table_values.extend_from_slice(&all_values.part(r)[before * width..(before + n) * width]);
            }
            let mut values_shape = shape.clone();
            values_shape[0] = rows.len();
            let values =
                Tensor::new(values_shape, table_values).ok_or("sparse exchange: values of the wrong length")?;
            combined.grads.insert(name.to_string(), Value::RowSparse { shape, rows, values });
        }
    }
    times.sparse_secs += sparse_started.elapsed().as_secs_f64();
    Ok(combined)
}

/// A fingerprint of every tensor (name, shape and the bits of every value, in name order):
/// equal on two ranks exactly when their parameters and states are, up to a collision of
/// the first 64 bits of SHA-256.
pub fn params_hash(params: &HashMap<String, Tensor<f32>>) -> u64 {
    use sha2::{Digest, Sha256};
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        let t = &params[name];
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            hasher.update((d as u64).to_le_bytes());
        }
        for chunk in t.data.chunks(16 * 1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
            hasher.update(&bytes);
        }
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Checks that every rank's fingerprint ([`params_hash`]) is the same; the error names the
/// ranks that differ from rank 0.
pub fn check_identical(hashes: &[u64], step: u64, epoch: usize) -> Result<(), String> {
    let differ: Vec<String> = hashes
        .iter()
        .enumerate()
        .filter(|&(_, &h)| h != hashes[0])
        .map(|(r, h)| format!("rank {r} has {h:016x}"))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the ranks' parameters differ at step {step} (end of epoch {epoch}): rank 0 has {:016x}, {}; the ranks no longer train the same model (a rank-dependent op, or an MPI fault)",
        hashes[0],
        differ.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Solo;

    #[test]
    fn one_rank_gets_its_own_gradients_back_weighted_with_duplicate_rows_summed() {
        let info = ["w", "e", "unused"];
        let mut params = HashMap::new();
        params.insert("w".to_string(), Tensor::zeros(vec![2]));
        params.insert("e".to_string(), Tensor::zeros(vec![4, 2]));
        params.insert("unused".to_string(), Tensor::zeros(vec![1]));
        params.insert("mean".to_string(), Tensor::zeros(vec![1]));
        let mut grads = HashMap::new();
        grads.insert("w".to_string(), Value::Dense(Tensor::new(vec![2], vec![1.0, -2.0]).unwrap()));
        let values = Tensor::new(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        grads.insert("e".to_string(), Value::RowSparse { shape: vec![4, 2], rows: vec![3, 1, 3], values });
        let mut states = HashMap::new();
        states.insert("mean".to_string(), Tensor::new(vec![1], vec![0.75]).unwrap());
        let local = StepGradients { loss: 0.5, grads, states };
        let mut times = ExchangeTimes::default();
        let out = combine(&Solo, Some(local), 1.0, &info, &["mean"], &params, &mut times).unwrap();
        assert_eq!(out.loss, 0.5);
        assert_eq!(out.grads["w"], Value::Dense(Tensor::new(vec![2], vec![1.0, -2.0]).unwrap()));
        let Value::RowSparse { rows, values, shape } = &out.grads["e"] else { panic!("{:?}", out.grads["e"]) };
        assert_eq!((rows.clone(), shape.clone()), (vec![1, 3], vec![4, 2]));
        assert_eq!(values.data, vec![3.0, 4.0, 6.0, 8.0]);
        assert!(!out.grads.contains_key("unused"));
        assert_eq!(out.states["mean"].data, vec![0.75]);
    }

    #[test]
    fn a_loss_that_is_not_finite_exchanges_no_gradients() {
        let info = ["w"];
        let mut params = HashMap::new();
        params.insert("w".to_string(), Tensor::zeros(vec![1]));
        let local = StepGradients { loss: f32::NAN, grads: HashMap::new(), states: HashMap::new() };
        let out = combine(&Solo, Some(local), 1.0, &info, &[], &params, &mut ExchangeTimes::default()).unwrap();
        assert!(out.loss.is_nan() && out.grads.is_empty());
    }

    #[test]
    fn the_fingerprint_sees_one_changed_bit_and_the_check_names_the_rank() {
        let mut params = HashMap::new();
        params.insert("a".to_string(), Tensor::new(vec![2], vec![1.0f32, 2.0]).unwrap());
        let before = params_hash(&params);
        params.get_mut("a").unwrap().data[1] = f32::from_bits(2.0f32.to_bits() + 1);
        let after = params_hash(&params);
        assert_ne!(before, after);
        assert_eq!(check_identical(&[before, before], 10, 1), Ok(()));
        let err = check_identical(&[before, after], 10, 1).unwrap_err();
        assert!(err.contains("step 10") && err.contains(&format!("rank 1 has {after:016x}")), "{err}");
    }
}
