//! The [`Group`] of an `mpirun` launch, on MPI's world communicator (the `mpi` crate,
//! rsmpi, without its libffi-based user operations): MPI is started with
//! `MPI_THREAD_FUNNELED` (the jit's worker threads never call MPI; the main thread does)
//! and finished when the returned universe is dropped.
//!
//! An empty Rust slice's pointer is dangling, and an empty `u8` slice's is 1, which is Open
//! MPI's `MPI_IN_PLACE`: an empty buffer is handed to MPI as an empty slice of a real array
//! instead (the `placeholder`s below).

use super::{Gathered, Group};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

pub struct MpiGroup {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local: usize,
}

impl MpiGroup {
    /// Starts MPI; the universe finishes it when dropped (after the group).
    pub fn start() -> Result<(Universe, MpiGroup), String> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or("MPI could not be started: it was started before in this process")?;
        let world = universe.world();
        let local = world.split_shared(world.rank()).size() as usize;
        let group = MpiGroup { rank: world.rank() as usize, size: world.size() as usize, local, world };
        Ok((universe, group))
    }

    /// An all-gather of a different count on each rank: the counts first, then the values.
    fn gather_varcount<T: Equivalence + Copy + Default>(&self, mine: &[T]) -> Result<Gathered<T>, String> {
        let count = mpi_count(mine.len())?;
        let mut counts = vec![0 as Count; self.size];
        self.world.all_gather_into(&count, &mut counts[..]);
        let (starts, displs) = layout(&counts)?;
        let total = starts[self.size];
        let placeholder = [T::default()];
        let mine = if mine.is_empty() { &placeholder[..0] } else { mine };
        let mut values = vec![T::default(); total.max(1)];
        let mut received = PartitionMut::new(&mut values[..total], &counts[..], &displs[..]);
        self.world.all_gather_varcount_into(mine, &mut received);
        values.truncate(total);
        Ok(Gathered { values, starts })
    }
}

/// A length as MPI's count (a C `int`).
fn mpi_count(n: usize) -> Result<Count, String> {
    Count::try_from(n).map_err(|_| format!("{n} values are more than one MPI message can carry (2^31 - 1)"))
}

/// Where each rank's values begin, as indices (`size + 1` of them) and as MPI
/// displacements.
fn layout(counts: &[Count]) -> Result<(Vec<usize>, Vec<Count>), String> {
    let mut starts = vec![0usize];
    for &c in counts {
        starts.push(starts[starts.len() - 1] + c.max(0) as usize);
    }
    let displs = starts[..counts.len()].iter().map(|&s| mpi_count(s)).collect::<Result<_, _>>()?;
    Ok((starts, displs))
}

/// Broadcasts are sent in pieces of at most this many bytes (an MPI count is a C `int`).
const BROADCAST_PIECE: usize = 1 << 30;

impl Group for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn ranks_on_this_machine(&self) -> usize {
        self.local
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Gathered<u8>, String> {
        self.gather_varcount(mine)
    }

    fn all_gather_u32(&self, mine: &[u32]) -> Result<Gathered<u32>, String> {
        self.gather_varcount(mine)
    }

    fn all_gather_f32(&self, mine: &[f32]) -> Result<Gathered<f32>, String> {
        self.gather_varcount(mine)
    }

    fn all_to_all_f32(&self, send: &[f32], starts: &[usize]) -> Result<Gathered<f32>, String> {
        if starts.len() != self.size + 1 || starts[self.size] != send.len() {
            return Err(format!(
                "all-to-all: {} boundaries for {} ranks and {} values",
                starts.len(),
                self.size,
                send.len()
            ));
        }
        let send_counts: Vec<Count> = starts.windows(2).map(|w| mpi_count(w[1] - w[0])).collect::<Result<_, _>>()?;
        let send_displs: Vec<Count> = starts[..self.size].iter().map(|&s| mpi_count(s)).collect::<Result<_, _>>()?;
        let mut counts = vec![0 as Count; self.size];
        self.world.all_to_all_into(&send_counts[..], &mut counts[..]);
        let (recv_starts, displs) = layout(&counts)?;
        let total = recv_starts[self.size];
        let placeholder = [0f32];
        let send = if send.is_empty() { &placeholder[..0] } else { send };
        let mut values = vec![0f32; total.max(1)];
        let outgoing = Partition::new(send, &send_counts[..], &send_displs[..]);
        let mut received = PartitionMut::new(&mut values[..total], &counts[..], &displs[..]);
        self.world.all_to_all_varcount_into(&outgoing, &mut received);
        values.truncate(total);
        Ok(Gathered { values, starts: recv_starts })
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), String> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for piece in bytes.chunks_mut(BROADCAST_PIECE) {
            root.broadcast_into(piece);
        }
        // (No empty piece is sent: `chunks_mut` of nothing yields none.)
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
