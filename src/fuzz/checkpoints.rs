//! Checkpoint cases: run A's and run B's `best.ckpt` and `last.ckpt` corrupted byte by byte
//! (flips, overwrites, truncations, insertions, deletions, appended junk) or spliced
//! (one file's header on another's body), then read back as `--resume` and `eval` read
//! them: the file, then the loop state in its metadata. The verdict: an error, or exactly
//! the clean file's tensors and metadata.

use super::{corrupt_bytes, describe, Described, Draw, Fixture, Verdict};
use crate::train::LoopState;
use mdl_runtime::checkpoint;
use mdl_runtime::rng::SplitMix64;
use std::path::Path;

/// Whether two checkpoints' contents are the same, bit for bit.
pub(super) fn same_contents(a: &checkpoint::Contents, b: &checkpoint::Contents) -> bool {
    a.1 == b.1
        && a.0.len() == b.0.len()
        && a.0.iter().zip(&b.0).all(|((na, ta), (nb, tb))| {
            na == nb
                && ta.shape == tb.shape
                && ta.data.iter().map(|x| x.to_bits()).eq(tb.data.iter().map(|x| x.to_bits()))
        })
}

pub(super) fn case(fx: &Fixture, rng: &mut SplitMix64, _known: bool, dir: &Path, input: &Described) -> Verdict {
    let (name, clean) = rng.pick(&fx.checkpoints);
    let mut bytes = clean.clone();
    let mut did = Vec::new();
    if rng.chance(0.1) {
        let (other, donor) = rng.pick(&fx.checkpoints);
        let cut = rng.upto(bytes.len().min(donor.len()));
        bytes.truncate(cut);
        bytes.extend_from_slice(&donor[cut..]);
        did.push(format!("bytes from {cut} on taken from {other}"));
    }
    for _ in 0..1 + rng.upto(2) {
        did.push(corrupt_bytes(rng, &mut bytes));
    }
    describe(input, format!("{name}: {}", did.join("; ")));
    let path = dir.join("case.ckpt");
    if std::fs::write(&path, &bytes).is_err() {
        return Verdict::Rejected;
    }
    let Ok(loaded) = checkpoint::load(&path) else {
        return Verdict::Rejected;
    };
    if serde_json::from_str::<LoopState>(&loaded.1).is_err() {
        return Verdict::Rejected;
    }
    // A file that reads back must be one of the clean files, unchanged.
    if bytes == *clean {
        return Verdict::Accepted;
    }
    let identical = fx.checkpoints.iter().any(|(_, c)| {
        let p = dir.join("clean.ckpt");
        std::fs::write(&p, c).is_ok() && checkpoint::load(&p).is_ok_and(|cc| same_contents(&cc, &loaded))
    });
    if identical {
        Verdict::Accepted
    } else {
        Verdict::Silent("a corrupted checkpoint loaded with contents no clean checkpoint has".into())
    }
}
