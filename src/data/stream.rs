//! Encoding rows to score, block by block: a [`RowStream`] reads its input in chunks,
//! encodes up to [`StreamOptions::block_rows`] rows at a time with the fitted state, and
//! hands out each [`Block`] with, for every input record in order, whether it was encoded and
//! the raw text of the columns to keep. So a caller can write exactly one output row per
//! input record (blank lines are not records), however large the input.
//!
//! The input is stdin (`-`, CSV) or what [`super::source::parts`] makes of a path: a file, a
//! folder of part files or a glob pattern, each part CSV / CSV.gz (read in chunks, with the
//! delimiter of [`EncodeOptions`]) or Parquet (read row group by row group), the parts one
//! after the other, each with the first part's columns.
//!
//! Only the model's inputs are read (the features, and the domain when the model has a
//! domain input): labels, the user column and an unused domain column may be absent (see
//! [`super::encode`]'s `Columns::Inputs`). Malformed rows and unseen domain ids
//! follow [`EncodeOptions`]; skipped rows and fallback domains are counted over the whole
//! input ([`RowStream::skipped`], [`RowStream::domain_fallbacks`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::csv::Record;
use super::csv::{display_name, CsvReader, TextStream};
use super::dataset::{Dataset, SkippedRows};
use super::encode::{read_header, ApplyIds, Columns, FitIds, Fitted, IdSource, Plan, RawSplit, Rows, Stop};
use super::parquet_input::ParquetRows;
use super::schema::Schema;
use super::source::{check_same_columns, Format};
use super::{DataError, EncodeOptions};

/// How a [`RowStream`] reads its input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub encode: EncodeOptions,
    /// Columns whose raw text is kept for every record (ids to join scores back on); each
    /// must be in the header.
    pub keep: Vec<String>,
    /// Encoded rows per block (at least 1); only the last block has fewer.
    pub block_rows: usize,
    /// Whether the schema's domain column is read (the model has a domain input); when not,
    /// it may be absent and every row has domain 0.
    pub domain_input: bool,
}

/// The next stretch of input records.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// The records that encoded, in input order.
    pub data: Dataset,
    /// Per input record, in order: whether it encoded (its row is the next one of `data`) or
    /// was skipped as malformed.
    pub encoded: Vec<bool>,
    /// Per input record, the text of each kept column (`keep.len()` cells per record; a
    /// malformed record too short to have the column gives "").
    pub kept: Vec<String>,
}

/// The part being read.
enum Part {
    Csv(TextStream),
    Parquet(ParquetRows),
}

impl Part {
    /// Opens a part (`-`: stdin, CSV), telling Parquet from CSV by its first bytes.
    fn open(path: &Path) -> Result<Part, DataError> {
        if path != Path::new("-") {
            let mut head = Vec::with_capacity(4);
            let file = std::fs::File::open(path).map_err(|e| DataError::io(path, &e.to_string()))?;
            file.take(4).read_to_end(&mut head).map_err(|e| DataError::io(path, &e.to_string()))?;
            if Format::of(&head) == Format::Parquet {
                let file = std::fs::File::open(path).map_err(|e| DataError::io(path, &e.to_string()))?;
                return ParquetRows::open(path, file).map(Part::Parquet);
            }
        }
        TextStream::open(path).map(Part::Csv)
    }
}

/// The records of a split (a file, or the parts of a folder or pattern, one after the
/// other), encoded block by block with whatever ids the caller gives: the fitted ones
/// ([`RowStream`]), or the provisional ones of train while it is fitted
/// ([`super::prepare`]). Every part after the first must have the first part's columns.
pub(super) struct SplitReader {
    /// The parts not yet opened, last first.
    pending: Vec<PathBuf>,
    /// The part being read and its name in messages.
    part: Option<(PathBuf, Part)>,
    /// The first part's name and columns, which every later part must have.
    first: Option<(PathBuf, Vec<String>)>,
    columns: Columns,
    encode: EncodeOptions,
    /// Columns whose text is handed to the caller with each record.
    keep: Vec<String>,
    /// The part's plan, once its header has been read.
    rows: Option<Rows>,
    keep_columns: Vec<usize>,
    done: bool,
}

impl SplitReader {
    /// Opens the first part of `path` (`-` for stdin); nothing is read yet.
    pub(super) fn open(
        path: &Path,
        columns: Columns,
        encode: EncodeOptions,
        keep: Vec<String>,
    ) -> Result<SplitReader, DataError> {
        let mut pending = super::source::parts(path)?;
        pending.reverse();
        let first = pending.pop().expect("a path stands for at least one part");
        let part = Some((display_name(&first), Part::open(&first)?));
        Ok(SplitReader {
            pending,
            part,
            first: None,
            columns,
            encode,
            keep,
            rows: None,
            keep_columns: Vec::new(),
            done: false,
        })
    }

    /// Checks a part's columns against the first part's, and plans its records: which
    /// columns it keeps.
    fn plan(&mut self, file: &Path, columns: &[String]) -> Result<(), DataError> {
        match &self.first {
            None => self.first = Some((file.to_path_buf(), columns.to_vec())),
            Some((first, header)) => check_same_columns((first, header), (file, columns))?,
        }
        self.keep_columns = keep_positions(file, columns, &self.keep)?;
        Ok(())
    }

    /// Encodes the next records into `raw` until it holds `block_rows` rows or the input
    /// ends; `each` sees every record taken, whether it was added, and the header positions
    /// of the columns to keep. Returns false once every record has been taken. The first
    /// call reads the header (a missing column is an error naming it), and so does the
    /// first call that reaches each later part.
    pub(super) fn next_block<I: IdSource>(
        &mut self,
        schema: &Schema,
        ids: &mut I,
        raw: &mut RawSplit,
        block_rows: usize,
        mut each: impl FnMut(&Record, bool, &[usize]),
    ) -> Result<bool, DataError> {
        if self.done {
            return Ok(false);
        }
        let columns = self.columns;
        while raw.rows < block_rows {
            let Some((name, part)) = self.part.as_mut() else {
                match self.pending.pop() {
                    Some(next) => {
                        let part = Part::open(&next)?;
                        self.part = Some((display_name(&next), part));
                        self.rows = None;
                        continue;
                    }
                    None => {
                        self.done = true;
                        break;
                    }
                }
            };
            let name = name.clone();
            let finished = match part {
                Part::Csv(input) => {
                    let more = !input.ended();
                    let text = input.text()?;
                    let mut reader =
                        CsvReader::at_line(text, input.line()).with_delimiter(self.encode.delimiter.byte());
                    if self.rows.is_none() {
                        let Some(plan) = read_header(schema, &name, &mut reader, columns, more)? else {
                            input.read_more()?;
                            continue;
                        };
                        let bad_rows = self.encode.bad_rows;
                        // The header is consumed on its own, and the part looked up again after
                        // `self.plan`.
                        let header_end = reader.position();
                        self.plan(&name, &plan.header)?;
                        self.rows = Some(Rows::new(&name, plan, bad_rows));
                        let Some((_, Part::Csv(input))) = self.part.as_mut() else { unreachable!() };
                        input.consume(header_end.0, header_end.1);
                        continue;
                    }
                    let Some(rows) = self.rows.as_mut() else { continue };
                    let keep_columns = &self.keep_columns;
                    let (stop, (bytes, line)) =
                        rows.encode(&mut reader, ids, raw, (block_rows, more), |record, ok| {
                            each(record, ok, keep_columns)
                        })?;
                    input.consume(bytes, line);
                    match stop {
                        Stop::Full => false,
                        Stop::End if !more => true,
                        Stop::End | Stop::Incomplete => {
                            input.read_more()?;
                            false
                        }
                    }
                }
                Part::Parquet(input) => {
                    if self.rows.is_none() {
                        let plan = Plan::resolve(schema, &name, input.header().to_vec(), columns)?;
                        let bad_rows = self.encode.bad_rows;
                        self.plan(&name, &plan.header)?;
                        let mut reads = plan.reads();
                        reads.extend(&self.keep_columns);
                        reads.sort_unstable();
                        reads.dedup();
                        let Some((_, Part::Parquet(input))) = self.part.as_mut() else { unreachable!() };
                        input.start(&reads)?;
                        self.rows = Some(Rows::of_parquet(&name, plan, bad_rows));
                        continue;
                    }
                    let (Some(rows), keep_columns) = (self.rows.as_mut(), &self.keep_columns) else { continue };
                    let mut finished = false;
                    while raw.rows < block_rows {
                        let Some(record) = input.next_record()? else {
                            finished = true;
                            break;
                        };
                        let ok = rows.take(&record, ids, raw)?;
                        each(&record, ok, keep_columns);
                    }
                    finished
                }
            };
            if finished {
                self.part = None;
            }
        }
        Ok(true)
    }
}

impl SplitReader {
    /// Train's first pass on several threads: like [`next_block`](Self::next_block) with
    /// provisional ids, but the text of a CSV part is cut at line ends into one stretch per
    /// worker (about `stretch_bytes` each), each worker encodes its stretch into ids of its
    /// own, and the blocks come back in input order with the index of the worker whose
    /// ids they hold. The workers register the values they read but count none
    /// ([`FitIds::count`] counts a block once it is kept): a line end inside a quoted
    /// field makes the stretch before it end inside that field, so the stretches after it
    /// are dropped (their values stay registered, uncounted, which changes nothing) and
    /// read again from that record on. A part's header (with its first row), Parquet parts,
    /// a record longer than the stretches and a single worker go through `next_block` on the
    /// first worker (`block_rows` rows). No blocks once every record has been taken. Which
    /// rows a block holds depends on the workers' number; the rows, in order, do not.
    pub(super) fn next_blocks_parallel(
        &mut self,
        schema: &Schema,
        workers: &mut [FitIds],
        (stretch_bytes, block_rows): (usize, usize),
    ) -> Result<Vec<(usize, RawSplit)>, DataError> {
        let one_by_one = |reader: &mut SplitReader, workers: &mut [FitIds]| {
            // A part's header with its first row only, so that the rows after it are read
            // on every thread.
            let rows = if reader.rows.is_none() { 1 } else { block_rows };
            let mut raw = RawSplit::with_capacity(schema, rows);
            reader.next_block(schema, &mut workers[0], &mut raw, rows, |_, _, _| {})?;
            Ok(if raw.rows > 0 || raw.skipped.count > 0 { vec![(0, raw)] } else { Vec::new() })
        };
        if self.done {
            return Ok(Vec::new());
        }
        let (Some(rows), Some((_, Part::Csv(input))), true) = (&self.rows, &mut self.part, workers.len() > 1) else {
            return one_by_one(self, workers);
        };
        while input.pending_len() < stretch_bytes * workers.len() && !input.ended() {
            input.read_more()?;
        }
        let more = !input.ended();
        let text = input.text()?;
        let (first_line, text_length) = (input.line(), text.len());
        // Stretches of about equal length, each but the last ending after a line end.
        let bytes = text.as_bytes();
        let length = text.len().div_ceil(workers.len()).max(1);
        let mut bounds = vec![0];
        while bounds.len() < workers.len() {
            let from = bounds[bounds.len() - 1] + length;
            match bytes.get(from..).and_then(|rest| memchr::memchr(b'\n', rest)) {
                Some(at) if from + at + 1 < bytes.len() => bounds.push(from + at + 1),
                _ => break,
            }
        }
        bounds.push(bytes.len());
        let mut lines = vec![first_line];
        for window in bounds.windows(2).take(bounds.len() - 2) {
            let newlines = memchr::memchr_iter(b'\n', &bytes[window[0]..window[1]]).count() as u64;
            lines.push(lines[lines.len() - 1] + newlines);
        }
        let delimiter = self.encode.delimiter.byte();
        let stretches = bounds.len() - 1;
        let results: Vec<_> = std::thread::scope(|scope| {
            let running: Vec<_> = workers
                .iter_mut()
                .take(stretches)
                .enumerate()
                .map(|(i, ids)| {
                    let (stretch, line, mut rows) = (&text[bounds[i]..bounds[i + 1]], lines[i], rows.clone());
                    // Only the last stretch may end the input.
                    let more = more || i + 1 < stretches;
                    scope.spawn(move || {
                        let mut reader = CsvReader::at_line(stretch, line).with_delimiter(delimiter);
                        let mut raw = RawSplit::with_capacity(schema, stretch.len() / 512);
                        let result = rows.encode(&mut reader, ids, &mut raw, (usize::MAX, more), |_, _| {});
                        (result, raw)
                    })
                })
                .collect();
            running.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        });
        let mut blocks = Vec::new();
        let mut consumed = (0, first_line);
        for (i, (result, raw)) in results.into_iter().enumerate() {
            // This stretch starts where a record starts: its errors are the input's.
            let (_, (read, line)) = result?;
            consumed = (bounds[i] + read, line);
            blocks.push((i, raw));
            if consumed.0 < bounds[i + 1] {
                break;
            }
        }
        if consumed.0 == 0 {
            return one_by_one(self, workers);
        }
        let finished = !more && consumed.0 == text_length;
        input.consume(consumed.0, consumed.1);
        if finished {
            self.part = None;
        }
        Ok(blocks)
    }
}

/// A file being encoded block by block (see the module doc).
pub struct RowStream<'f> {
    fitted: &'f Fitted,
    /// The input as given (`stdin` for `-`), which names the blocks' data.
    name: PathBuf,
    split: SplitReader,
    ids: ApplyIds<'f>,
    block_rows: usize,
    skipped: SkippedRows,
    domain_fallbacks: usize,
}

impl Fitted {
    /// Opens `path` (`-` for stdin; a folder or pattern of parts) to encode it block by block;
    /// the first part is opened, nothing is read yet.
    pub fn stream(&self, path: &Path, options: StreamOptions) -> Result<RowStream<'_>, DataError> {
        let ids = self.apply_ids(options.encode.unknown_domain)?;
        let columns = Columns::Inputs { domain: options.domain_input };
        let split = SplitReader::open(path, columns, options.encode, options.keep)?;
        Ok(RowStream {
            fitted: self,
            name: display_name(path),
            split,
            ids,
            block_rows: options.block_rows.max(1),
            skipped: SkippedRows::default(),
            domain_fallbacks: 0,
        })
    }
}

impl RowStream<'_> {
    /// The input's name in messages (`stdin` for `-`).
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The malformed records skipped so far (with [`super::BadRows::Skip`]).
    pub fn skipped(&self) -> &SkippedRows {
        &self.skipped
    }

    /// The rows encoded so far whose domain id train never had, as the fallback domain.
    pub fn domain_fallbacks(&self) -> usize {
        self.domain_fallbacks
    }

    /// The next block, `None` once every record has been handed out. The first call reads
    /// the header (a missing feature or kept column is an error naming it), and so does the
    /// first call that reaches each later part.
    pub fn next_block(&mut self) -> Result<Option<Block>, DataError> {
        let schema = &self.fitted.schema;
        let mut raw = RawSplit::with_capacity(schema, self.block_rows.min(1 << 16));
        let (mut encoded, mut kept) = (Vec::new(), Vec::new());
        let more = self.split.next_block(schema, &mut self.ids, &mut raw, self.block_rows, |record, ok, keep| {
            encoded.push(ok);
            kept.extend(keep.iter().map(|&c| record.get(c).to_string()));
        })?;
        if !more || encoded.is_empty() {
            return Ok(None);
        }
        self.domain_fallbacks += raw.domain_fallbacks;
        self.skipped.absorb(&raw.skipped);
        let data = self.fitted.finish(raw, &self.name);
        Ok(Some(Block { data, encoded, kept }))
    }
}

/// The header position of each column to keep; an unknown one is an error naming it and
/// listing the header.
fn keep_positions(file: &Path, header: &[String], keep: &[String]) -> Result<Vec<usize>, DataError> {
    let error = |message: String| DataError::BadRow { file: file.to_path_buf(), line: 1, message };
    keep.iter()
        .map(|column| {
            match header.iter().enumerate().filter(|(_, h)| *h == column).map(|(i, _)| i).collect::<Vec<_>>()[..] {
                [position] => Ok(position),
                [] => Err(error(format!(
                    "no column '{column}' to keep in the header; its columns are: {}",
                    header.join(", ")
                ))),
                _ => Err(error(format!("column '{column}' to keep appears more than once in the header"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode::fit_train;
    use crate::data::{BadRows, Schema, UnknownDomain};

    const SCHEMA: &str = "
features:
  - { kind: categorical, name: ids, columns: [item] }
  - { kind: sequence, name: tags, columns: [tags], max_len: 2 }
  - { kind: numeric, name: x, columns: [x], normalize: standard }
domain: { column: domain }
labels: [ { name: click, column: label } ]
user: user
";

    const TRAIN: &str = "label,user,item,tags,x,domain\n1,u1,a,t1 t2,0.5,0\n0,u2,\"b,1\",t2,1.5,1\n1,u1,c,,2.5,1\n";

    /// Quoted fields with separators, quotes and line breaks, CRLF, blank lines, a row with
    /// too few fields (line 9), an unseen domain (line 10) and an item train never had.
    const SCORE: &str = "\u{feff}label,user,item,tags,x,domain\r\n0,u2,\"b,1\",t1,1,1\r\n\n1,u9,\"say \"\"hi\"\"\",\"t2\nt1 t3\",,0\n0,u1,a,t2 t2,3,1\n\n\n0,u1,c\n1,u2,a,,0.25,7\n0,u3,zz,t1,-1,0";

    fn column<T: Clone>(data: &[Dataset], pick: impl Fn(&Dataset) -> &Vec<T>) -> Vec<T> {
        data.iter().flat_map(|d| pick(d).iter().cloned()).collect()
    }

    #[test]
    fn blocks_of_any_size_from_chunks_of_any_size_encode_as_the_whole_text_does() {
        let schema: Schema = serde_yaml::from_str(SCHEMA).unwrap();
        let (fitted, _) = fit_train(&schema, Path::new("train.csv"), TRAIN, BadRows::Fail).unwrap();
        let encode = EncodeOptions {
            bad_rows: BadRows::Skip,
            unknown_domain: UnknownDomain::Fallback(1),
            ..EncodeOptions::default()
        };
        let whole = fitted.encode_text(Path::new("score.csv"), SCORE, encode).unwrap();
        assert_eq!((whole.rows, whole.skipped.count), (5, 1));
        let folder = std::env::temp_dir().join(format!("mdl-stream-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join("score.csv");
        std::fs::write(&path, SCORE).unwrap();
        for chunk in [1, 2, 3, 5, 8, 13, 40, 1 << 20] {
            for block_rows in [1, 2, 3, 100] {
                let keep = vec!["item".into(), "x".into()];
                let options = StreamOptions { encode, keep, block_rows, domain_input: true };
                let mut stream = fitted.stream(&path, options).unwrap();
                let Some((_, Part::Csv(input))) = stream.split.part.as_mut() else { panic!("a CSV input") };
                input.set_chunk(chunk);
                let mut blocks = Vec::new();
                while let Some(block) = stream.next_block().unwrap() {
                    assert_eq!(block.data.rows, block.encoded.iter().filter(|&&ok| ok).count());
                    assert!(block.data.rows <= block_rows);
                    blocks.push(block);
                }
                let at = format!("chunk {chunk}, blocks of {block_rows}");
                let data: Vec<Dataset> = blocks.iter().map(|b| b.data.clone()).collect();
                assert_eq!(column(&data, |d| &d.cat[0]), whole.cat[0], "{at}");
                assert_eq!(column(&data, |d| &d.seq_ids[0]), whole.seq_ids[0], "{at}");
                assert_eq!(column(&data, |d| &d.seq_mask[0]), whole.seq_mask[0], "{at}");
                assert_eq!(column(&data, |d| &d.num[0]), whole.num[0], "{at}");
                assert_eq!(column(&data, |d| &d.domain), [1, 0, 1, 1, 0], "{at}");
                // Labels and users are not read: 0 and the padding id.
                assert_eq!(column(&data, |d| &d.labels), [0.0; 5], "{at}");
                assert_eq!(column(&data, |d| &d.user), [0; 5], "{at}");
                let encoded: Vec<bool> = blocks.iter().flat_map(|b| b.encoded.clone()).collect();
                assert_eq!(encoded, [true, true, true, false, true, true], "{at}");
                let kept: Vec<String> = blocks.iter().flat_map(|b| b.kept.clone()).collect();
                let expected = ["b,1", "1", "say \"hi\"", "", "a", "3", "c", "", "a", "0.25", "zz", "-1"];
                assert_eq!(kept, expected, "{at}");
                assert_eq!(stream.skipped().count, 1, "{at}");
                assert!(
                    stream.skipped().examples[0].ends_with("score.csv:9: expected 6 fields as in the header, found 3"),
                    "{at}"
                );
                assert_eq!(stream.domain_fallbacks(), 1, "{at}");
            }
        }
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn files_without_labels_are_read_and_bad_input_names_its_place() {
        let schema: Schema = serde_yaml::from_str(SCHEMA).unwrap();
        let (fitted, _) = fit_train(&schema, Path::new("train.csv"), TRAIN, BadRows::Fail).unwrap();
        let folder = std::env::temp_dir().join(format!("mdl-stream-bad-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let first_error = |text: &str, options: StreamOptions| -> String {
            let path = folder.join("rows.csv");
            std::fs::write(&path, text).unwrap();
            let mut stream = match fitted.stream(&path, options) {
                Ok(stream) => stream,
                Err(e) => return e.to_string(),
            };
            loop {
                match stream.next_block() {
                    Ok(Some(_)) => continue,
                    Ok(None) => return String::new(),
                    Err(e) => return e.to_string().replace(&folder.display().to_string(), ""),
                }
            }
        };
        let options = StreamOptions { block_rows: 2, domain_input: true, ..StreamOptions::default() };
        // No label and no user column: fine; nor a domain column where the model has no
        // domain input (nor an unseen domain there, as it is not read).
        assert_eq!(first_error("item,tags,x,domain\na,t1,1,0\n", options.clone()), "");
        let no_domain = StreamOptions { domain_input: false, ..options.clone() };
        assert_eq!(first_error("item,tags,x\na,t1,1\n", no_domain.clone()), "");
        assert_eq!(first_error("item,tags,x,domain\na,t1,1,7\n", no_domain), "");
        assert_eq!(
            first_error("item,tags,x\na,t1,1\n", options.clone()),
            "/rows.csv: no column 'domain' in the header"
        );
        assert_eq!(
            first_error("item,tags,x,domain\na,t1,1,0\nb,t2,2,5\n", options.clone()),
            "/rows.csv:3: column 'domain': domain id 5 is outside 0..2, the domains of train (the policy \
             `unknown_domain: ID` scores such rows as domain ID) (value \"5\")"
        );
        assert_eq!(
            first_error("item,tags,x,domain\na,t1,1\n", options.clone()),
            "/rows.csv:2: expected 4 fields as in the header, found 3"
        );
        assert_eq!(
            first_error("item,tags,x,domain\n\"a,t1,1,0\n", options.clone()),
            "/rows.csv:2: a quoted field is never closed"
        );
        assert_eq!(first_error("item,tags,domain\n", options.clone()), "/rows.csv: no column 'x' in the header");
        let keep = StreamOptions { keep: vec!["id".into()], ..options.clone() };
        assert_eq!(
            first_error("item,tags,x,domain\n", keep.clone()),
            "/rows.csv:1: no column 'id' to keep in the header; its columns are: item, tags, x, domain"
        );
        assert_eq!(
            first_error("id,item,tags,x,domain,id\n", keep),
            "/rows.csv:1: column 'id' to keep appears more than once in the header"
        );
        let fallback = StreamOptions {
            encode: EncodeOptions { unknown_domain: UnknownDomain::Fallback(2), ..EncodeOptions::default() },
            ..options
        };
        assert_eq!(
            first_error("item,tags,x,domain\n", fallback),
            "data schema: unknown_domain: 2 is not a domain of train (0..2)"
        );
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
