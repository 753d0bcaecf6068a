//! Writing on a thread of its own: a [`WriteBehind`] takes whole buffers, in order, and writes
//! them to its output on a background thread, so that the thread that encodes rows does not
//! wait while the kernel copies them into the page cache (when preparation wrote its spill
//! and cache files itself, those copies were about a fifth of its time, all on one thread).
//! At most [`WriteBehind::QUEUED`] buffers wait at a time, so memory stays bounded; a write
//! that fails ends the thread, and the next [`write`](WriteBehind::write) or the
//! [`finish`](WriteBehind::finish) returns its error.

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

/// An output written by a background thread (see the module doc).
pub(crate) struct WriteBehind<W: Write + Send + 'static> {
    queue: Option<SyncSender<Vec<u8>>>,
    writer: Option<JoinHandle<(W, std::io::Result<()>)>>,
}

impl<W: Write + Send + 'static> WriteBehind<W> {
    /// Buffers queued at most (the caller waits while the queue is full).
    const QUEUED: usize = 4;

    /// Starts writing to `output`.
    pub(crate) fn new(mut output: W) -> WriteBehind<W> {
        let (queue, buffers) = sync_channel::<Vec<u8>>(Self::QUEUED);
        let writer = std::thread::spawn(move || {
            // Ends at the first error: dropping `buffers` makes the next send fail.
            let written = buffers.iter().try_for_each(|buffer| output.write_all(&buffer)).and_then(|()| output.flush());
            (output, written)
        });
        WriteBehind { queue: Some(queue), writer: Some(writer) }
    }

    /// Queues `bytes`, written after everything queued before.
    pub(crate) fn write(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        let Some(queue) = &self.queue else { return Err(std::io::Error::other("an earlier write failed")) };
        if queue.send(bytes).is_ok() {
            return Ok(());
        }
        // The writer has stopped at an error.
        self.queue = None;
        match self.join() {
            Some((_, Err(e))) => Err(e),
            _ => Err(std::io::Error::other("the writing thread stopped")),
        }
    }

    /// Waits until everything queued is written and returns the output, or the first error.
    pub(crate) fn finish(mut self) -> std::io::Result<W> {
        self.queue = None;
        match self.join() {
            Some((output, written)) => written.map(|()| output),
            None => Err(std::io::Error::other("an earlier write failed")),
        }
    }

    fn join(&mut self) -> Option<(W, std::io::Result<()>)> {
        let writer = self.writer.take()?;
        Some(writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    }
}

impl<W: Write + Send + 'static> Drop for WriteBehind<W> {
    /// Unfinished (an error elsewhere): waits for the thread, so that the output is closed
    /// (a cache file's temporary name removed) before the caller goes on.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that accepts `limit` bytes and then fails.
    struct Limited {
        written: Vec<u8>,
        limit: usize,
    }

    impl Write for Limited {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if self.written.len() + bytes.len() > self.limit {
                return Err(std::io::Error::other("the disk is full"));
            }
            self.written.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffers_are_written_in_order_and_an_error_comes_back() {
        let mut writing = WriteBehind::new(Limited { written: Vec::new(), limit: usize::MAX });
        for i in 0..100u8 {
            writing.write(vec![i; i as usize]).unwrap();
        }
        let expected: Vec<u8> = (0..100u8).flat_map(|i| vec![i; i as usize]).collect();
        assert_eq!(writing.finish().unwrap().written, expected);

        // A failed write is reported by a later write (once the writer has stopped) or by
        // the finish, never lost.
        let mut writing = WriteBehind::new(Limited { written: Vec::new(), limit: 10 });
        let mut failed = None;
        for _ in 0..100 {
            if let Err(e) = writing.write(vec![0; 4]) {
                failed = Some(e.to_string());
                break;
            }
        }
        let error = match failed {
            Some(error) => error,
            None => writing.finish().err().expect("the output is full").to_string(),
        };
        assert_eq!(error, "the disk is full");
    }
}
