//! `mdl predict`: scoring rows with a trained run, for rows that have no label yet (the
//! scoring itself is [`Scorer`]'s, which `mdl serve` shares).
//!
//! The input (a `.csv` / `.csv.gz` file, or `-` for stdin; gzip is recognised by its magic
//! bytes) is read and scored block by block ([`crate::data::RowStream`]), so its size is not
//! bounded by memory. Only the model's inputs must be in it: label and user columns may be
//! missing, and so may the domain column when the model has no domain input. The output is CSV: the kept input columns (`--keep`, copied as text), then one
//! probability per task, and exactly one row per input record, in input order. A malformed
//! record is an error naming `file:line`, or, with the bad-row policy `skip`, a row whose
//! scores are empty (`""`), counted in [`Predicted::skipped`]. A domain id train never had is
//! an error naming `file:line` and the value, or, with `unknown_domain: ID`, scored as domain
//! ID and counted. Both policies come from the run's experiment (`data.bad_rows`,
//! `data.unknown_domain`) unless [`PredictOptions`] overrides them.
//!
//! A file output appears only once complete ([`AtomicFile`]); on stdout (`-`) the rows are
//! written as their blocks are scored, and a reader that has gone (`--out - | head`) ends
//! the scoring quietly ([`Predicted::reader_gone`]), as other Unix tools end on a closed pipe.

use crate::data::{BadRows, Block, SkippedRows, StreamOptions, UnknownDomain};
use crate::files::AtomicFile;
use crate::score::Scorer;
use crate::train::folder::Trust;
use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows scored per block (rounded down to whole batches, at least one batch).
const BLOCK_ROWS: usize = 16384;

/// What to score and where to write it, beyond the run folder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PredictOptions {
    /// The rows to score: a `.csv` / `.csv.gz` file, or `-` for stdin.
    pub data: PathBuf,
    /// Where the scores go: a file, or `-` for stdout.
    pub out: PathBuf,
    /// Input columns copied, in this order, before the score columns.
    pub keep: Vec<String>,
    /// Overrides the run's `data.bad_rows`.
    pub bad_rows: Option<BadRows>,
    /// Overrides the run's `data.unknown_domain`.
    pub unknown_domain: Option<UnknownDomain>,
    /// Read a run folder whose files do not match its manifest (saying so).
    pub force: bool,
    /// Threads of the jit (default: the machine's cores).
    pub threads: Option<usize>,
}

/// What a prediction wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Predicted {
    /// Output rows (= input records).
    pub rows: usize,
    /// The malformed records, whose scores were left empty.
    pub skipped: SkippedRows,
    /// Rows whose domain id train never had, scored as `unknown_domain`'s domain.
    pub domain_fallbacks: usize,
    pub unknown_domain: UnknownDomain,
    /// Stdout's reader went away before every row was written (`--out - | head`): scoring
    /// stopped there, and `rows` counts the rows written until then.
    pub reader_gone: bool,
}

/// Whether an output can take more rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Yes,
    ReaderGone,
}

/// Where the scores are written: stdout as they come, or a file that appears when complete.
enum Output {
    Stdout(BufWriter<std::io::Stdout>),
    File(AtomicFile),
}

impl Output {
    fn create(path: &Path) -> Result<Output, String> {
        Ok(if path == Path::new("-") {
            Output::Stdout(BufWriter::with_capacity(1 << 16, std::io::stdout()))
        } else {
            Output::File(AtomicFile::create(path)?)
        })
    }

    fn write(&mut self, text: &str) -> Result<Open, String> {
        match self {
            Output::Stdout(out) => stdout_open(out.write_all(text.as_bytes())),
            Output::File(file) => file.write_all(text.as_bytes()).map(|()| Open::Yes).map_err(|e| file.error(e)),
        }
    }

    fn finish(self) -> Result<Open, String> {
        match self {
            Output::Stdout(mut out) => stdout_open(out.flush()),
            Output::File(file) => file.commit().map(|()| Open::Yes),
        }
    }
}

/// A write to stdout: a closed pipe is the reader having gone, not an error.
fn stdout_open(written: std::io::Result<()>) -> Result<Open, String> {
    match written {
        Ok(()) => Ok(Open::Yes),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Open::ReaderGone),
        Err(e) => Err(format!("cannot write to stdout: {e}")),
    }
}

/// A CSV cell: quoted (with `""` for a quote) when the text holds a separator, a quote or a
/// line break, or is empty (so that a row of empty cells is not a blank line).
fn cell(text: &str) -> Cow<'_, str> {
    if text.is_empty() {
        Cow::Borrowed("\"\"")
    } else if text.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", text.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(text)
    }
}

/// The output lines of one block: per record, its kept cells, then its scores (or `""` for
/// each task where the record was skipped); `whole[t]` says task `t`'s score is a class or
/// position (written as an integer).
fn block_lines(block: &Block, scores: &[f32], whole: &[bool], keep: usize) -> String {
    let tasks = whole.len();
    let mut text = String::with_capacity(block.encoded.len() * (8 * tasks + 16 * keep));
    let mut scored = scores.chunks(tasks.max(1));
    for (record, &encoded) in block.encoded.iter().enumerate() {
        let mut cells: Vec<Cow<str>> = block.kept[record * keep..(record + 1) * keep].iter().map(|c| cell(c)).collect();
        match if encoded { scored.next() } else { None } {
            Some(row) => cells.extend(
                row.iter().zip(whole).map(|(s, &w)| Cow::Owned(if w { format!("{s:.0}") } else { format!("{s:.6}") })),
            ),
            None => cells.extend((0..tasks).map(|_| cell(""))),
        }
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    text
}

/// Scores every record of `options.data` with the run in `run` (see the module doc).
pub fn predict(run: &Path, options: &PredictOptions) -> Result<Predicted, String> {
    let mut scorer = Scorer::open_on(run, Trust { force: options.force }, options.threads)?;
    let tasks = scorer.tasks().to_vec();
    let whole: Vec<bool> = scorer.task_kinds().iter().map(|k| !k.scalar_output()).collect();
    if let Some(clash) = options.keep.iter().find(|k| tasks.contains(k)) {
        return Err(format!(
            "--keep {clash}: the output already has a score column '{clash}' (the tasks: {})",
            tasks.join(", ")
        ));
    }
    let encode = scorer.encode_options(options.bad_rows, options.unknown_domain);
    let batch = scorer.batch_rows();
    let stream_options = StreamOptions {
        encode,
        keep: options.keep.clone(),
        block_rows: batch * (BLOCK_ROWS / batch).max(1),
        domain_input: scorer.domain_input(),
    };
    let fitted = Arc::clone(&scorer.fitted);
    let mut stream = fitted.stream(&options.data, stream_options).map_err(|e| e.to_string())?;
    // The input's header is checked before anything is written.
    let mut block = stream.next_block().map_err(|e| e.to_string())?;
    let mut out = Output::create(&options.out)?;
    let header: Vec<Cow<str>> = options.keep.iter().chain(&tasks).map(|name| cell(name)).collect();
    let mut open = out.write(&(header.join(",") + "\n"))?;
    let mut rows = 0;
    while let (Some(current), Open::Yes) = (&block, open) {
        // Skipped records have no row in the block's data, so a row's scores follow the
        // records that encoded.
        let scores = scorer.score(&current.data)?;
        open = out.write(&block_lines(current, &scores, &whole, options.keep.len()))?;
        if open == Open::Yes {
            rows += current.encoded.len();
            block = stream.next_block().map_err(|e| e.to_string())?;
        }
    }
    if open == Open::Yes {
        open = out.finish()?;
    }
    Ok(Predicted {
        rows,
        skipped: stream.skipped().clone(),
        domain_fallbacks: stream.domain_fallbacks(),
        unknown_domain: encode.unknown_domain,
        reader_gone: open == Open::ReaderGone,
    })
}
