//! Folders for one test's outputs under Cargo's temporary folder for integration tests.
//!
//! A folder is emptied when made and removed when its owner is dropped on a passing test;
//! when the test fails (the thread is panicking), it is kept and named on stderr so that its
//! run log, curves and checkpoints can be read. Removing them matters: the suite trains a
//! few hundred short runs, and their folders (checkpoints with optimizer moments, exported
//! models, predictions) came to about 4.5 GB per CI run, enough to fill a CI machine's disk.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// An empty folder for a test's outputs, removed when dropped unless the test failed.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// The empty folder `relative` under Cargo's temporary folder for this package's
    /// integration tests (emptied if it holds files).
    pub fn new(relative: impl AsRef<Path>) -> Scratch {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(relative);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot make {}: {e}", path.display()));
        Scratch(path)
    }

    /// The folder, kept after this value is gone: for a folder shared by several tests of one
    /// binary (a run trained once and read by each), which no single test may remove.
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the failed test's outputs are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}
