//! Seeded, bit-reproducible mini-batch order: a small SplitMix64 generator of our own (no
//! platform- or crate-version-dependent randomness) and a per-epoch Fisher–Yates shuffle.

/// SplitMix64: a 64-bit generator with a single u64 of state; the same seed gives the same
/// stream on every machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..bound` (unbiased: multiply-shift with rejection). `bound` 0
    /// gives 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = self.next_u64() as u128 * bound as u128;
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// A uniform float in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

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
    fn splitmix_reference_values() {
        // Reference outputs of SplitMix64 seeded with 1234567.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

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

    #[test]
    fn below_is_in_range() {
        let mut rng = SplitMix64::new(0);
        for bound in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(rng.below(bound) < bound);
            }
        }
        assert_eq!(rng.below(0), 0);
    }
}
