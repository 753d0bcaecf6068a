//! Data-parallel training's process group: the processes of one `mpirun -n N mdl run`,
//! and the few collective operations training needs from them.
//!
//! This module owns the [`Group`] abstraction (a rank, a size, all-gather, all-to-all and
//! broadcast), its one-process form [`Solo`] (every run without `mpirun`, and every build
//! without the `mpi` feature), the process start-up that picks one ([`World`]), and the
//! operations built on the primitives that every caller shares:
//!
//! - [`all_reduce_sum`]: a sum of `f32` vectors in **rank order** (rank 0's values, plus rank
//!   1's, plus ...), split into one chunk per rank so that each rank sums one chunk (an
//!   all-to-all) and then shares it (an all-gather). Every rank gets the same bits, and a
//!   rerun gets the same bits again: the order never depends on the MPI library's reduction
//!   algorithm or the network's timing.
//! - [`agree`]: every rank learns whether any rank failed a step, and with what message,
//!   so that all of them stop together instead of waiting on a collective that will not come.
//! - [`from_leader`] / [`bytes_from_leader`]: what rank 0 alone reads or decides (the run
//!   folder, a checkpoint), handed to every rank, errors included.
//!
//! What is exchanged during a training step (gradients, row-sparse embedding gradients)
//! is `exchange.rs`'s; the MPI binding is `mpi.rs` (the `mpi` cargo feature).

pub mod exchange;
#[cfg(feature = "mpi")]
mod mpi;

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::ops::Range;

/// Every rank's contribution to an all-gather, concatenated in rank order: rank `r`'s
/// values are `values[starts[r]..starts[r + 1]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gathered<T> {
    pub values: Vec<T>,
    pub starts: Vec<usize>,
}

impl<T> Gathered<T> {
    /// Rank `r`'s part.
    pub fn part(&self, r: usize) -> &[T] {
        &self.values[self.starts[r]..self.starts[r + 1]]
    }

    /// One process's own values, as its all-gather returns them.
    fn solo(values: Vec<T>) -> Gathered<T> {
        let starts = vec![0, values.len()];
        Gathered { values, starts }
    }
}

/// The processes of a data-parallel run. Every method is collective: each rank of the
/// group calls it, in the same order, or the group waits.
pub trait Group {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// The number of the group's processes on this machine (they share its cores).
    fn ranks_on_this_machine(&self) -> usize;
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Gathered<u8>, String>;
    fn all_gather_u32(&self, mine: &[u32]) -> Result<Gathered<u32>, String>;
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Gathered<f32>, String>;
    /// Sends `send[starts[r]..starts[r + 1]]` to rank `r` (`starts` has `size + 1` entries);
    /// returns what every rank sent to this one, in rank order.
    fn all_to_all_f32(&self, send: &[f32], starts: &[usize]) -> Result<Gathered<f32>, String>;
    /// Rank 0's `bytes` on every rank (the others' are replaced).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), String>;
    /// Ends every process of the group at once with exit code `code` (after this process
    /// reported its error): the way out when only some ranks failed and the others may be
    /// waiting in a collective.
    fn abort(&self, code: i32) -> !;
}

/// A group of one: this process alone, as every run without `mpirun` is.
pub struct Solo;

impl Group for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn ranks_on_this_machine(&self) -> usize {
        1
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Gathered<u8>, String> {
        Ok(Gathered::solo(mine.to_vec()))
    }
    fn all_gather_u32(&self, mine: &[u32]) -> Result<Gathered<u32>, String> {
        Ok(Gathered::solo(mine.to_vec()))
    }
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Gathered<f32>, String> {
        Ok(Gathered::solo(mine.to_vec()))
    }
    fn all_to_all_f32(&self, send: &[f32], _starts: &[usize]) -> Result<Gathered<f32>, String> {
        Ok(Gathered::solo(send.to_vec()))
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>) -> Result<(), String> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The environment variables an MPI launcher sets in every process it starts (Open MPI,
/// MPICH's Hydra, PMIx): a process that has one was started by `mpirun`.
const LAUNCHER_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// The group this process belongs to, for as long as it lives: MPI is started when the
/// process was launched by `mpirun` (and finished when the `World` is dropped); otherwise
/// it is [`Solo`].
pub struct World {
    group: Box<dyn Group>,
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

impl World {
    /// Starts the group: MPI under `mpirun` in a build with the `mpi` feature, [`Solo`]
    /// otherwise. Under a launcher that started several processes, a build without the
    /// feature is an error (each process would train the whole run on its own and write
    /// the same folder).
    pub fn init() -> Result<World, String> {
        let launched = LAUNCHER_VARIABLES.iter().any(|v| std::env::var_os(v).is_some());
        #[cfg(feature = "mpi")]
        if launched {
            let (universe, group) = mpi::MpiGroup::start()?;
            return Ok(World { group: Box::new(group), _universe: Some(universe) });
        }
        #[cfg(not(feature = "mpi"))]
        if launched && launched_size().is_some_and(|n| n > 1) {
            return Err(format!(
                "this process was started by mpirun with {} processes, but this mdl was built without the `mpi` feature: build it with `cargo build --release --features mpi` (it needs Open MPI and libclang)",
                launched_size().unwrap_or(0)
            ));
        }
        Ok(World {
            group: Box::new(Solo),
            #[cfg(feature = "mpi")]
            _universe: None,
        })
    }

    pub fn group(&self) -> &dyn Group {
        self.group.as_ref()
    }

    /// Reports `message` as this rank's error and ends the run: with several ranks, every
    /// process of the group (some may be waiting in a collective); alone, nothing more
    /// (the caller returns its exit code).
    pub fn fail(&self, message: &str) -> std::process::ExitCode {
        let group = self.group();
        if group.size() == 1 {
            return crate::cli::fail(message);
        }
        crate::cli::fail(&format!("rank {} of {}: {message}", group.rank(), group.size()));
        group.abort(1)
    }
}

/// The number of processes the launcher says it started, when it says.
#[cfg(not(feature = "mpi"))]
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The `i`-th of `parts` contiguous, balanced shares of `0..n` (the first `n % parts`
/// shares one longer): how a global batch's rows, and an evaluation's batches, are split
/// among ranks.
pub fn share(n: usize, parts: usize, i: usize) -> Range<usize> {
    let parts = parts.max(1);
    let start = |k: usize| k * (n / parts) + k.min(n % parts);
    start(i)..start(i + 1)
}

/// `result` on every rank if every rank succeeded; otherwise an error on every rank: a
/// failed rank's own, the others the message of the first rank that failed (naming it).
pub fn agree<T>(group: &dyn Group, result: Result<T, String>) -> Result<T, String> {
    if group.size() == 1 {
        return result;
    }
    // A message is sent with a leading byte, so that an empty one still says "failed".
    let mine = match &result {
        Ok(_) => Vec::new(),
        Err(e) => std::iter::once(b'!').chain(e.bytes()).collect(),
    };
    let all = group.all_gather_bytes(&mine)?;
    match result {
        Err(e) => Err(e),
        Ok(value) => match (0..group.size()).find(|&r| !all.part(r).is_empty()) {
            None => Ok(value),
            Some(r) => Err(format!("rank {r} failed: {}", String::from_utf8_lossy(&all.part(r)[1..]))),
        },
    }
}

/// What rank 0 computes with `lead` (called on rank 0 only), on every rank; an error of
/// rank 0 becomes every rank's error. For small values (they travel as JSON).
pub fn from_leader<T: Serialize + DeserializeOwned>(
    group: &dyn Group,
    lead: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    if group.size() == 1 {
        return lead();
    }
    let mut bytes = Vec::new();
    if group.rank() == 0 {
        let result = lead();
        bytes = serde_json::to_vec(&result).map_err(|e| e.to_string())?;
        group.broadcast_bytes(&mut bytes)?;
        return result;
    }
    group.broadcast_bytes(&mut bytes)?;
    let result: Result<T, String> = serde_json::from_slice(&bytes).map_err(|e| format!("from rank 0: {e}"))?;
    result.map_err(|e| format!("rank 0 failed: {e}"))
}

/// The bytes rank 0 reads with `lead` (called on rank 0 only; `None`: there is nothing to
/// read), on every rank; an error of rank 0 becomes every rank's error. For large values
/// (a checkpoint file).
pub fn bytes_from_leader(
    group: &dyn Group,
    lead: impl FnOnce() -> Result<Option<Vec<u8>>, String>,
) -> Result<Option<Vec<u8>>, String> {
    if group.size() == 1 {
        return lead();
    }
    // One leading byte: 0 nothing, 1 the bytes follow, 2 an error message follows.
    let mut bytes = Vec::new();
    if group.rank() == 0 {
        let result = lead();
        bytes = match &result {
            Ok(None) => vec![0],
            Ok(Some(b)) => std::iter::once(1).chain(b.iter().copied()).collect(),
            Err(e) => std::iter::once(2).chain(e.bytes()).collect(),
        };
        group.broadcast_bytes(&mut bytes)?;
        return result;
    }
    group.broadcast_bytes(&mut bytes)?;
    match bytes.first() {
        Some(0) => Ok(None),
        Some(1) => {
            bytes.remove(0);
            Ok(Some(bytes))
        }
        _ => Err(format!("rank 0 failed: {}", String::from_utf8_lossy(bytes.get(1..).unwrap_or_default()))),
    }
}

/// Sums `data` over the ranks in place, in rank order: afterwards every rank holds
/// `((x₀ + x₁) + x₂) + …`, element by element, with `xᵣ` rank `r`'s values, bit for bit the
/// same on every rank and on every run. Each rank sums one contiguous chunk ([`share`]) of
/// the others' values (an all-to-all), then the chunks are shared (an all-gather): as much
/// traffic as a ring all-reduce, `2 (N − 1) / N` times the data per rank.
pub fn all_reduce_sum(group: &dyn Group, data: &mut [f32]) -> Result<(), String> {
    let n = group.size();
    if n == 1 {
        return Ok(());
    }
    let starts: Vec<usize> = (0..=n).map(|r| share(data.len(), n, r).start.min(data.len())).collect();
    let received = group.all_to_all_f32(data, &starts)?;
    let mut chunk = received.part(0).to_vec();
    for r in 1..n {
        for (sum, &x) in chunk.iter_mut().zip(received.part(r)) {
            *sum += x;
        }
    }
    let summed = group.all_gather_f32(&chunk)?;
    if summed.values.len() != data.len() {
        return Err(format!("all-reduce: {} values came back for {}", summed.values.len(), data.len()));
    }
    data.copy_from_slice(&summed.values);
    Ok(())
}

/// Every rank's `values` (the same number on each), gathered in rank order.
pub fn all_gather_f64(group: &dyn Group, values: &[f64]) -> Result<Vec<Vec<f64>>, String> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = group.all_gather_bytes(&bytes)?;
    Ok((0..group.size())
        .map(|r| all.part(r).chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_range_in_order_and_differ_by_at_most_one() {
        for (n, parts) in [(10, 3), (3, 4), (0, 2), (4096, 2), (7, 1)] {
            let shares: Vec<Range<usize>> = (0..parts).map(|i| share(n, parts, i)).collect();
            assert_eq!(shares.first().unwrap().start, 0);
            assert_eq!(shares.last().unwrap().end, n);
            for w in shares.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let lens: Vec<usize> = shares.iter().map(|s| s.len()).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
        }
        assert_eq!(share(10, 3, 0), 0..4);
        assert_eq!(share(10, 3, 2), 7..10);
    }

    #[test]
    fn a_group_of_one_leaves_everything_as_it_is() {
        let mut data = vec![1.5f32, -2.0, 3.25];
        all_reduce_sum(&Solo, &mut data).unwrap();
        assert_eq!(data, vec![1.5, -2.0, 3.25]);
        assert_eq!(agree(&Solo, Err::<(), _>("bad".into())), Err("bad".into()));
        assert_eq!(from_leader(&Solo, || Ok(7u32)), Ok(7));
        assert_eq!(bytes_from_leader(&Solo, || Ok(Some(vec![1, 2]))), Ok(Some(vec![1, 2])));
        assert_eq!(all_gather_f64(&Solo, &[0.5, 2.0]).unwrap(), vec![vec![0.5, 2.0]]);
    }
}
