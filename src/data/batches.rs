//! Seeded, bit-reproducible mini-batch order: a per-epoch Fisher–Yates shuffle drawn from
//! the runtime's one generator ([`mdl_runtime::rng::SplitMix64`]).

pub use mdl_runtime::rng::SplitMix64;

/// Shuffled mini-batches of row indices. Epoch `e`'s order depends only on `(seed, e)`, so an
/// interrupted run can resume at any epoch and get the same batches.
#[derive(Clone, Debug)]
pub struct MiniBatches {
    order: Vec<usize>,
    batch_size: usize,
    seed: u64,
}

impl MiniBatches {
    /// `batch_size` 0 is taken as 1.
    pub fn new(rows: usize, batch_size: usize, seed: u64) -> Self {
        MiniBatches { order: (0..rows).collect(), batch_size: batch_size.max(1), seed }
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The batches of epoch `epoch`, each a slice of row indices; every row appears once.
    pub fn epoch(&mut self, epoch: u64) -> std::slice::Chunks<'_, usize> {
        for (i, slot) in self.order.iter_mut().enumerate() {
            *slot = i;
        }
        let mut mixer = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let mut rng = SplitMix64::new(mixer.next_u64());
        rng.shuffle(&mut self.order);
        self.order.chunks(self.batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_reproducible() {
        let mut a = MiniBatches::new(103, 10, 7);
        let mut b = MiniBatches::new(103, 10, 7);
        assert_eq!(a.batches_per_epoch(), 11);
        let first: Vec<Vec<usize>> = a.epoch(0).map(<[usize]>::to_vec).collect();
        assert_eq!(first.len(), 11);
        let mut all: Vec<usize> = first.concat();
        all.sort_unstable();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        let second: Vec<Vec<usize>> = a.epoch(1).map(<[usize]>::to_vec).collect();
        assert_ne!(first, second);
        // Epoch order does not depend on which epochs came before.
        let again: Vec<Vec<usize>> = b.epoch(1).map(<[usize]>::to_vec).collect();
        assert_eq!(second, again);
    }
}
