//! The memory a model needs, estimated before anything big is allocated, so that a model
//! that cannot fit is an error naming the estimate and the machine's memory instead of an
//! abort ("memory allocation of 64560000000000 bytes failed"). What this module owns: the
//! estimate ([`Estimate`]: parameters, optimizer state, gradients, activations), the
//! machine's memory ([`machine_bytes`]), handing freed memory back ([`return_freed`]), and
//! the two checks: [`check_run`] when a run's
//! plans are built (every size known) and [`check_spec`] for `mdl check` (data sizes
//! unknown: each counted as 1, so the estimate is a lower bound).
//!
//! Sizes are multiplied in u128 (saturating), so no shape of 2^31 × 2^31 overflows. The
//! activations are the dense values of the forward graph at the batch size, all held at
//! once (the backward pass reads most of them); the gradients those of the dense
//! parameters (an embedding table's gradient holds only the rows a batch touched).

use super::Session;
use crate::experiment::{Experiment, OptimizerName};
use crate::lower::Compiled;
use mdl_runtime::{Binding, Graph, ValueKind};

const F32: u128 = 4;

/// Estimated bytes of a training run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    pub parameters: u128,
    pub optimizer: u128,
    pub gradients: u128,
    pub activations: u128,
}

impl Estimate {
    /// The estimate for `graph` (a model's forward graph) under `sizes`, a symbol without
    /// a value counting as `unbound`, with `slots` optimizer values per parameter value.
    pub fn of(graph: &Graph, sizes: &Binding, unbound: u128, slots: u128) -> Estimate {
        let numel = |shape: &[mdl_runtime::Dim]| -> u128 {
            shape.iter().fold(1u128, |n, d| n.saturating_mul(dim_value(d, sizes, unbound)))
        };
        let mut e = Estimate::default();
        for p in &graph.params {
            let bytes = numel(&p.shape).saturating_mul(F32);
            e.parameters = e.parameters.saturating_add(bytes);
            if !p.embedding {
                e.gradients = e.gradients.saturating_add(bytes);
            }
        }
        e.optimizer = e.parameters.saturating_mul(slots);
        let params: std::collections::HashSet<_> = graph.params.iter().map(|p| p.node).collect();
        for id in graph.ids() {
            let sig = &graph.node(id).sig;
            if params.contains(&id) || sig.kind != ValueKind::Dense {
                continue;
            }
            e.activations = e.activations.saturating_add(numel(&sig.shape).saturating_mul(F32));
        }
        e
    }

    pub fn total(&self) -> u128 {
        self.parameters.saturating_add(self.optimizer).saturating_add(self.gradients).saturating_add(self.activations)
    }

    fn describe(&self) -> String {
        format!(
            "parameters {}, optimizer state {}, gradients {}, activations {}",
            bytes(self.parameters),
            bytes(self.optimizer),
            bytes(self.gradients),
            bytes(self.activations)
        )
    }
}

/// A dimension's value: its polynomial in the symbols' values (`unbound` for a symbol
/// without one), saturating, never below 0.
fn dim_value(d: &mdl_runtime::Dim, sizes: &Binding, unbound: u128) -> u128 {
    match d.eval(sizes) {
        Ok(n) => n as u128,
        // An unbound symbol, or an i64 overflow: bound every symbol and redo it in u128.
        Err(_) => {
            let mut all = sizes.clone();
            for s in d.symbols() {
                all.entry(s.to_string()).or_insert(unbound.min(usize::MAX as u128) as usize);
            }
            match d.eval(&all) {
                Ok(n) => n as u128,
                Err(_) => u128::MAX,
            }
        }
    }
}

/// Optimizer values kept per parameter value.
fn optimizer_slots(exp: &Experiment) -> u128 {
    match exp.train.optimizer {
        OptimizerName::Sgd => 0,
        OptimizerName::Adagrad => 1,
        OptimizerName::Adam => 2,
    }
}

/// Hands the free pages of the allocator's heaps back to the system. glibc's `free` keeps
/// small blocks in its heaps, so after preparation the millions of small allocations of
/// the vocabularies (each value a string of its own; 4.2M of them on the 100× replica),
/// freed once `fitted.json` holds them, stayed resident through training: about 0.45 GB
/// there. `malloc_trim` returns whole free pages wherever they lie in the heaps. Elsewhere
/// (another C library) this does nothing.
pub fn return_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases pages the allocator holds free; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The machine's memory in bytes: the smaller of the physical memory and the control
/// group's limit; `None` where it cannot be read (then nothing is refused).
pub fn machine_bytes() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: u128 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let mut total = total_kib * 1024;
    if let Ok(limit) = std::fs::read_to_string("/sys/fs/cgroup/memory.max") {
        if let Ok(limit) = limit.trim().parse::<u128>() {
            total = total.min(limit);
        }
    }
    Some(total)
}

/// Refuses a run whose estimate at `batch` rows exceeds the machine's memory.
pub fn check_run(session: &Session, exp: &Experiment, batch: usize) -> Result<(), String> {
    let sizes = session.inputs.with_batch(batch);
    let e = Estimate::of(&session.compiled.graph, &sizes, 1, optimizer_slots(exp));
    let Some(machine) = machine_bytes() else { return Ok(()) };
    if e.total() <= machine {
        return Ok(());
    }
    Err(format!(
        "model {} needs about {} of memory to train at batch {batch} ({}), more than this machine's {}: make it smaller (its hyperparameters: {}) or lower train.batch_size",
        session.compiled.model,
        bytes(e.total()),
        e.describe(),
        bytes(machine),
        hyper_list(&session.compiled),
    ))
}

/// For `mdl check`: refuses a spec whose parameters alone, with every data size (vocabulary
/// rows, columns, batch) counted as 1, exceed the machine's memory.
pub fn check_spec(compiled: &Compiled) -> Result<(), String> {
    let e = Estimate::of(&compiled.graph, &Binding::new(), 1, 0);
    let Some(machine) = machine_bytes() else { return Ok(()) };
    if e.parameters <= machine {
        return Ok(());
    }
    Err(format!(
        "model {}'s parameters alone need at least {} of memory (every data size counted as 1), more than this machine's {}: make it smaller (its hyperparameters: {})",
        compiled.model,
        bytes(e.parameters),
        bytes(machine),
        hyper_list(compiled),
    ))
}

fn hyper_list(c: &Compiled) -> String {
    c.hyper.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
}

/// Bytes in binary units, three significant digits.
fn bytes(n: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_multiply_without_overflow_and_print_in_binary_units() {
        let big = mdl_runtime::Dim::lit(1 << 31);
        let mut g = Graph::new();
        let shape = vec![big.clone(), big.clone(), big];
        g.param("W", shape, mdl_runtime::Init::Zeros, None, false);
        let e = Estimate::of(&g, &Binding::new(), 1, 2);
        assert_eq!(e.parameters, (1u128 << 93) * 4);
        assert_eq!(e.optimizer, e.parameters * 2);
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(512), "512 B");
    }
}
