//! Parameter initialisation: turns the [`ParamInfo`] table of a graph into concrete
//! tensors, filled according to each parameter's [`Init`].
//!
//! Values are reproducible from `(seed, parameter name)` alone: every parameter draws
//! from its own random stream, keyed by a hash of its name, so adding, removing or
//! reordering parameters never changes the values of the others.
//!
//! - `Zeros`, `Ones`, `Const(c)`: constant fills.
//! - `Normal(std)`: mean 0, standard deviation `std`, by the Box–Muller transform.
//! - `Uniform(limit)`: uniform in `[-limit, limit]`.
//! - `Glorot`: uniform in `±sqrt(6 / (fan_in + fan_out))`, where `fan_in` and `fan_out` are
//!   the last two axes (for per-domain weights `[G, k, n]` that is `k` and `n`); a rank-1
//!   parameter `[n]` uses `fan_in = fan_out = n`, a scalar uses 1 for both.

use crate::ir::dim::{eval_shape, Binding};
use crate::ir::graph::{Graph, Init, ParamInfo};
use crate::rng::SplitMix64;
use crate::tensor::{Float, Tensor};
use std::collections::HashMap;

/// Creates every parameter of `params` with its shape evaluated under `binding`.
///
/// Errors name the parameter: an unbound symbol in its shape, an invalid distribution
/// argument (a negative or non-finite standard deviation or limit), or a duplicate name.
pub fn init_params<T: Float>(
    params: &[ParamInfo],
    binding: &Binding,
    seed: u64,
) -> Result<HashMap<String, Tensor<T>>, String> {
    let mut out = HashMap::with_capacity(params.len());
    for p in params {
        let shape = eval_shape(&p.shape, binding).map_err(|e| format!("parameter `{}`: {}", p.name, e))?;
        let tensor = init_tensor::<T>(&p.name, shape, &p.init, seed)?;
        if out.insert(p.name.clone(), tensor).is_some() {
            return Err(format!("parameter `{}` is declared twice", p.name));
        }
    }
    Ok(out)
}

/// Every tensor of the model of `graph`: its parameters ([`init_params`]) and its
/// untrained state (running statistics), each state filled with its initial value.
pub fn init_model<T: Float>(graph: &Graph, binding: &Binding, seed: u64) -> Result<HashMap<String, Tensor<T>>, String> {
    let mut out = init_params(&graph.params, binding, seed)?;
    for st in &graph.states {
        let shape = eval_shape(&st.shape, binding).map_err(|e| format!("state `{}`: {}", st.name, e))?;
        let tensor = init_tensor::<T>(&st.name, shape, &Init::Const(st.initial), seed)?;
        if out.insert(st.name.clone(), tensor).is_some() {
            return Err(format!("state `{}` is declared twice", st.name));
        }
    }
    Ok(out)
}

/// One parameter's tensor of concrete `shape`, filled by `init` from the stream of
/// `(seed, name)`.
pub fn init_tensor<T: Float>(name: &str, shape: Vec<usize>, init: &Init, seed: u64) -> Result<Tensor<T>, String> {
    let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(count) = count else {
        return Err(format!("parameter `{}`: shape {:?} is too large", name, shape));
    };
    let mut rng = param_stream(seed, name);
    let data: Vec<T> = match *init {
        Init::Zeros => vec![T::ZERO; count],
        Init::Ones => vec![T::ONE; count],
        Init::Const(c) => vec![T::from_f64(c); count],
        Init::Normal(std) => {
            check_spread(name, "standard deviation", std)?;
            normal_samples(&mut rng, count, std).into_iter().map(T::from_f64).collect()
        }
        Init::Uniform(limit) => {
            check_spread(name, "uniform limit", limit)?;
            uniform_samples(&mut rng, count, limit)
        }
        Init::Glorot => uniform_samples(&mut rng, count, glorot_limit(&shape)),
    };
    Ok(Tensor { shape, data })
}

/// The Glorot-uniform limit `sqrt(6 / (fan_in + fan_out))` of a shape (fans as in the
/// module doc).
pub fn glorot_limit(shape: &[usize]) -> f64 {
    let (fan_in, fan_out) = match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [.., k, n] => (*k, *n),
    };
    let fans = (fan_in + fan_out).max(1) as f64;
    (6.0 / fans).sqrt()
}

fn check_spread(name: &str, what: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("parameter `{}`: the {} must be a finite number >= 0, not {}", name, what, v))
    }
}

/// The random stream of one parameter: the run's seed mixed with a 64-bit FNV-1a hash of
/// the parameter's name.
fn param_stream(seed: u64, name: &str) -> SplitMix64 {
    let mut name_hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        name_hash ^= b as u64;
        name_hash = name_hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mixed_seed = SplitMix64::new(seed).next_u64() ^ name_hash;
    SplitMix64::new(SplitMix64::new(mixed_seed).next_u64())
}

fn uniform_samples<T: Float>(rng: &mut SplitMix64, count: usize, limit: f64) -> Vec<T> {
    (0..count).map(|_| T::from_f64(limit * (2.0 * rng.next_f64() - 1.0))).collect()
}

/// `count` normal samples by Box–Muller, both values of each pair used.
fn normal_samples(rng: &mut SplitMix64, count: usize, std: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - rng.next_f64()).ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * rng.next_f64();
        out.push(radius * angle.cos());
        if out.len() < count {
            out.push(radius * angle.sin());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glorot_fans_use_the_last_two_axes() {
        assert_eq!(glorot_limit(&[3, 4, 8]), (6.0f64 / 12.0).sqrt());
        assert_eq!(glorot_limit(&[4, 8]), (6.0f64 / 12.0).sqrt());
        assert_eq!(glorot_limit(&[5]), (6.0f64 / 10.0).sqrt());
        assert_eq!(glorot_limit(&[]), (3.0f64).sqrt());
    }

    #[test]
    fn normal_samples_have_the_requested_spread() {
        let mut rng = param_stream(7, "w");
        let xs = normal_samples(&mut rng, 20_001, 2.0);
        assert_eq!(xs.len(), 20_001);
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
