//! The one random generator of mdl: SplitMix64 (Steele, Lea & Flood 2014), written here
//! once and used everywhere randomness must be reproducible: parameter initialisation
//! (`init`), dropout masks (`ops/source.rs`) and the random ops of the graph (Bernoulli
//! masks, in-batch permutations, sampled ids: `ops/random.rs`), each keyed by seed, step and
//! node ([`SplitMix64::keyed`]), and the data pipeline's mini-batch shuffle (the `mdl`
//! crate's `data::batches`).
//!
//! It is written by hand on purpose: one `u64` of state, no platform- or
//! crate-version-dependent behaviour, so the same seed gives the same stream on every
//! machine and a resumed run can recreate any stream from its key alone.

/// The increment of SplitMix64's state per draw.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a 64-bit generator with a single `u64` of state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The generator for one node's draws in one step of one run: independent streams
    /// derived from `(seed, step, stream)`.
    pub fn keyed(seed: u64, step: u64, stream: u64) -> SplitMix64 {
        let mut g = SplitMix64(seed);
        let a = g.next_u64() ^ step;
        let mut g = SplitMix64(a);
        let b = g.next_u64() ^ stream.rotate_left(32);
        SplitMix64(SplitMix64(b).next_u64())
    }

    /// Skips the next `n` draws: the state moves by `n` increments at once (the generator
    /// is counter-based), so a stream can be split between threads.
    pub fn advance(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(GOLDEN_GAMMA));
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
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

    /// `true` with probability `p` (`u < p` for a uniform `u` of [`SplitMix64::next_f64`]):
    /// the one Bernoulli draw of the graph's masks. A dropout mask keeps an element unless
    /// `chance(p)`; a Bernoulli mask is `1` where `chance(p)`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Shuffles in place (Fisher–Yates, drawing with [`SplitMix64::below`]).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut g = SplitMix64::new(1234567);
        assert_eq!(g.next_u64(), 6457827717110365317);
        assert_eq!(g.next_u64(), 3203168211198807973);
    }

    #[test]
    fn uniforms_are_in_the_unit_interval() {
        let mut g = SplitMix64::new(3);
        for _ in 0..1000 {
            assert!((0.0..1.0).contains(&g.next_f64()));
            assert!((0.0..1.0).contains(&g.next_f32()));
        }
    }

    #[test]
    fn advancing_skips_exactly_that_many_draws() {
        let mut stepped = SplitMix64::keyed(7, 3, 11);
        for _ in 0..1000 {
            stepped.next_u64();
        }
        let mut skipped = SplitMix64::keyed(7, 3, 11);
        skipped.advance(1000);
        assert_eq!(stepped, skipped);
        assert_eq!(stepped.next_u64(), skipped.next_u64());
    }

    #[test]
    fn keyed_streams_differ() {
        let first = |seed, step, stream| SplitMix64::keyed(seed, step, stream).next_u64();
        assert_eq!(first(1, 2, 3), first(1, 2, 3));
        assert_ne!(first(1, 2, 3), first(1, 2, 4));
        assert_ne!(first(1, 2, 3), first(1, 3, 3));
        assert_ne!(first(1, 2, 3), first(2, 2, 3));
    }

    #[test]
    fn below_is_in_range() {
        let mut g = SplitMix64::new(0);
        for bound in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(g.below(bound) < bound);
            }
        }
        assert_eq!(g.below(0), 0);
    }

    #[test]
    fn shuffle_is_a_reproducible_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        SplitMix64::new(9).shuffle(&mut a);
        SplitMix64::new(9).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        a.sort_unstable();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }
}
