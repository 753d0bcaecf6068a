//! The jit's buffer pool: the memory plan of a training step.
//!
//! A plan runs the same ops on the same shapes every step, so the buffers a step frees are
//! exactly the buffers the next step needs. The driver hands every value it frees (after
//! its last reader, see `driver::Lifetimes`) to the executor, which puts its buffer here,
//! keyed by its exact length; kernels take their output buffers from here first. In the
//! steady state a step therefore allocates nothing large: no fresh pages are mapped and
//! faulted in, and the buffers it writes are warm.
//!
//! This module owns the policy:
//! - only buffers of at least [`MIN_POOLED`] elements are kept (small ones are cheap to
//!   allocate and would only fill the table);
//! - a taken buffer keeps the values of its last use ([`Pool::take`]: for kernels that
//!   write every element) unless zeros are asked for ([`Pool::zeroed`]);
//! - at the end of each run ([`Pool::end_run`]) the buffers freed before the previous run
//!   and not taken since are dropped, so sizes that stop occurring (the last, smaller batch
//!   of an epoch, a graph no longer run) do not pin memory, while the train and eval plans,
//!   run alternately, each find their buffers again.
//!
//! Values that leave the executor (the named outputs) are not returned to the pool.

use std::collections::HashMap;

/// Buffers shorter than this many elements are not pooled.
pub const MIN_POOLED: usize = 1 << 12;

/// Free buffers by length, each with the run it was freed in.
#[derive(Debug, Default)]
pub struct Pool {
    free: HashMap<usize, Vec<(u64, Vec<f32>)>>,
    run: u64,
    /// Buffers handed out from the pool and freshly allocated, since creation.
    hits: u64,
    misses: u64,
}

impl Pool {
    /// A buffer of exactly `len` elements holding arbitrary (finite or not) values.
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        if len >= MIN_POOLED {
            if let Some((_, buf)) = self.free.get_mut(&len).and_then(|v| v.pop()) {
                self.hits += 1;
                return buf;
            }
            self.misses += 1;
        }
        vec![0.0; len]
    }

    /// A buffer of exactly `len` zeros.
    pub fn zeroed(&mut self, len: usize) -> Vec<f32> {
        let mut buf = self.take(len);
        buf.fill(0.0);
        buf
    }

    /// `take` or `zeroed`, as `zeroed` says (the allocator signature of
    /// [`super::codegen::run_with`]).
    pub fn alloc(&mut self, len: usize, zeroed: bool) -> Vec<f32> {
        if zeroed {
            self.zeroed(len)
        } else {
            self.take(len)
        }
    }

    /// Keeps `buf` for a later [`Pool::take`] of its length.
    pub fn put(&mut self, buf: Vec<f32>) {
        if buf.len() >= MIN_POOLED {
            self.free.entry(buf.len()).or_default().push((self.run, buf));
        }
    }

    /// Ends a run: drops the buffers freed before the previous run that nobody took.
    pub fn end_run(&mut self) {
        let run = self.run;
        self.free.retain(|_, bufs| {
            bufs.retain(|(freed, _)| freed + 1 >= run);
            !bufs.is_empty()
        });
        self.run += 1;
    }

    /// `(taken from the pool, freshly allocated)` buffers of pooled sizes so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Elements held in free buffers.
    pub fn held(&self) -> usize {
        self.free.values().flat_map(|v| v.iter()).map(|(_, b)| b.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_length_and_age_out() {
        let mut pool = Pool::default();
        let n = MIN_POOLED * 2;
        let buf = pool.take(n);
        assert_eq!(pool.counts(), (0, 1));
        pool.put(buf);
        assert_eq!(pool.take(n + 1).len(), n + 1);
        let again = pool.zeroed(n);
        assert!(again.len() == n && again.iter().all(|&v| v == 0.0));
        assert_eq!(pool.counts(), (1, 2));
        pool.put(again);
        pool.put(vec![1.0; 3]);
        assert_eq!(pool.held(), n);
        pool.end_run();
        assert_eq!(pool.held(), n, "kept at the end of its run");
        pool.end_run();
        assert_eq!(pool.held(), n, "kept through the next run");
        pool.end_run();
        assert_eq!(pool.held(), 0, "dropped when two runs went by without a taker");
    }
}
