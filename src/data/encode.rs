//! Turning rows into a [`Dataset`]: fitting vocabularies, normalisers and the domain count
//! on train (`fit_train`, `fit_inputs`) and applying them to any other file with the same
//! schema ([`Fitted::encode_file`], and block by block in [`super::stream`]).
//!
//! A split is one or more [`Input`]s ([`super::source`]): CSV text (with the configured
//! delimiter) or a Parquet file, whose rows are handed to the same row encoder as CSV
//! records ([`super::parquet_input`]), read one after the other as one table. Every part
//! must have the first part's columns.
//!
//! Each row is first validated (field count, labels, domain, numbers) and only then added, so
//! a skipped row leaves no trace, not even in the train vocabulary counts. A domain id train
//! never had is an error or, with [`UnknownDomain::Fallback`], encoded as a known domain.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::csv::{display_name, read_bytes, read_text, CsvReader, Record};
use super::dataset::{mask_of, Dataset, Shape, SkippedRows};
use super::numeric::{add_square, Normalizer, NumericStats};
use super::parquet_input::ParquetRows;
use super::schema::{CategoricalColumnRef, Normalize, Schema};
use super::source::{check_same_columns, Format};
use super::vocab::{Interner, ValueIndex, Vocab, VocabLimits, OOV, PAD};
use super::{BadRows, DataError, Delimiter, EncodeOptions, UnknownDomain};
use crate::tasks::LabelValues;

/// One file of a split, read into memory: CSV text (gunzipped) or a Parquet file's bytes.
pub(crate) struct Input {
    pub path: PathBuf,
    content: Content,
}

enum Content {
    Text(String),
    Parquet(bytes::Bytes),
}

impl Input {
    /// The file `path` whose bytes are `raw`, as its first bytes say ([`Format::of`]).
    pub fn new(path: &Path, raw: Vec<u8>) -> Result<Input, DataError> {
        let content = match Format::of(&raw) {
            Format::Parquet => Content::Parquet(bytes::Bytes::from(raw)),
            Format::Csv => Content::Text(read_text(path, raw)?),
        };
        Ok(Input { path: path.to_path_buf(), content })
    }

    /// CSV text, as if read from `path`.
    pub fn text(path: &Path, text: &str) -> Input {
        Input { path: path.to_path_buf(), content: Content::Text(text.to_string()) }
    }

    /// Every file `path` stands for ([`super::source::parts`]), read.
    pub fn read_all(path: &Path) -> Result<Vec<Input>, DataError> {
        super::source::parts(path)?.iter().map(|part| Input::new(part, read_bytes(part)?)).collect()
    }
}

/// Everything fitted on train: together with the schema it encodes any file the same way.
/// Serialisable, so a run folder can keep it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fitted {
    pub schema: Schema,
    pub vocabs: Vocabs,
    /// Per numeric group, per column.
    pub normalizers: Vec<Vec<Normalizer>>,
    /// The number of domains D (0 without a domain column).
    pub domains: usize,
}

/// The fitted vocabularies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vocabs {
    /// Per categorical group, per column.
    pub categorical: Vec<Vec<Vocab>>,
    /// Per sequence group: its own vocabulary, or None when it uses a categorical column's.
    pub sequence: Vec<Option<Vocab>>,
    /// The user column's vocabulary (every train user keeps an id; `min_count` does not apply).
    pub user: Option<Vocab>,
}

/// Embedding-table sizes and id spaces, for whoever builds the model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layout {
    pub categorical: Vec<CategoricalLayout>,
    pub sequence: Vec<SequenceLayout>,
    pub numeric: Vec<NumericLayout>,
    /// The number of domains D (0 without a domain column).
    pub domains: usize,
    pub tasks: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoricalLayout {
    pub name: String,
    pub columns: Vec<String>,
    /// The first global id of each column (its PAD id).
    pub offsets: Vec<u32>,
    /// Ids per column, PAD and OOV included.
    pub vocab_sizes: Vec<usize>,
    /// Rows of the group's embedding table (the sum of `vocab_sizes`).
    pub rows: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SequenceLayout {
    pub name: String,
    pub columns: Vec<String>,
    pub max_len: usize,
    pub table: SequenceTable,
    /// Rows of the embedding table the ids index.
    pub rows: usize,
}

/// Which embedding table a sequence group's ids index.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum SequenceTable {
    /// Its own table, from its own vocabulary.
    Own,
    /// The table of a categorical group (ids offset like that group's `column`).
    Categorical { group: String, column: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NumericLayout {
    pub name: String,
    pub columns: Vec<String>,
}

/// Which of the schema's columns a file must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Columns {
    /// Features, the domain, labels and the user: a file to train or evaluate on.
    All,
    /// The model's inputs only: the features, and the domain column when `domain` (the
    /// model has a domain input). Rows to score have no label yet, and the user column (and
    /// a domain the model does not read) only group rows for metrics. Labels are encoded as
    /// 0, users as the padding id and unread domains as 0; those columns are not read even
    /// when present.
    Inputs { domain: bool },
}

/// The header positions of every column the schema reads.
#[derive(Clone)]
pub(super) struct Plan {
    fields: usize,
    pub(super) header: Vec<String>,
    /// Labels per row (read from `labels`, or 0 when they are not read).
    tasks: usize,
    /// Whether rows carry a user id that is not read (the padding id is stored).
    pad_user: bool,
    /// Whether rows carry a domain id that is not read (0 is stored).
    pad_domain: bool,
    cat: Vec<Vec<usize>>,
    seq: Vec<Vec<usize>>,
    seq_len: Vec<usize>,
    num: Vec<Vec<usize>>,
    domain: Option<usize>,
    labels: Vec<usize>,
    /// What each label column holds (the schema's `values`), in the order of `labels`.
    label_values: Vec<LabelValues>,
    user: Option<usize>,
}

impl Plan {
    pub(super) fn resolve(
        schema: &Schema,
        file: &Path,
        header: Vec<String>,
        columns: Columns,
    ) -> Result<Plan, DataError> {
        let (all, read_domain) = match columns {
            Columns::All => (true, true),
            Columns::Inputs { domain } => (false, domain),
        };
        let reads = |column: &str| {
            schema.features.iter().any(|g| g.columns().iter().any(|c| c == column))
                || (read_domain && schema.domain.as_ref().is_some_and(|d| d.column == column))
                || (all && (schema.labels.iter().any(|t| t.column == column) || schema.user.as_deref() == Some(column)))
        };
        for column in schema.named_columns() {
            if reads(column) && header.iter().filter(|h| *h == column).count() > 1 {
                return Err(DataError::BadRow {
                    file: file.to_path_buf(),
                    line: 1,
                    message: format!("column '{column}' appears more than once in the header"),
                });
            }
        }
        let find = |column: &str| -> Result<usize, DataError> {
            header.iter().position(|h| h == column).ok_or_else(|| DataError::MissingColumn {
                file: file.to_path_buf(),
                column: column.to_string(),
                close: close_names(column, &header),
            })
        };
        let find_all = |columns: &[String]| columns.iter().map(|c| find(c)).collect::<Result<Vec<_>, _>>();
        Ok(Plan {
            fields: header.len(),
            cat: schema.categorical_groups().map(|(_, c, _)| find_all(c)).collect::<Result<_, _>>()?,
            seq: schema.sequence_groups().map(|(_, c, ..)| find_all(c)).collect::<Result<_, _>>()?,
            seq_len: schema.sequence_groups().map(|(_, _, len, ..)| len).collect(),
            num: schema.numeric_groups().map(|(_, c, _)| find_all(c)).collect::<Result<_, _>>()?,
            domain: schema.domain.as_ref().filter(|_| read_domain).map(|d| find(&d.column)).transpose()?,
            labels: if all {
                schema.labels.iter().map(|t| find(&t.column)).collect::<Result<_, _>>()?
            } else {
                Vec::new()
            },
            label_values: schema.labels.iter().map(|t| t.values).collect(),
            user: schema.user.as_deref().filter(|_| all).map(find).transpose()?,
            tasks: schema.labels.len(),
            pad_user: !all && schema.user.is_some(),
            pad_domain: !read_domain && schema.domain.is_some(),
            header,
        })
    }
}

impl Plan {
    /// The header positions of every column the plan reads, ascending.
    pub(super) fn reads(&self) -> Vec<usize> {
        let groups = self.cat.iter().chain(&self.seq).chain(&self.num).flatten();
        let mut reads: Vec<usize> = groups.chain(&self.labels).chain(&self.domain).chain(&self.user).copied().collect();
        reads.sort_unstable();
        reads.dedup();
        reads
    }
}

/// Up to three header names close to a missing one (edit distance or containment).
fn close_names(missing: &str, header: &[String]) -> Vec<String> {
    let wanted = missing.to_lowercase();
    let mut scored: Vec<(usize, &String)> = header
        .iter()
        .filter_map(|name| {
            let lower = name.to_lowercase();
            let distance = edit_distance(&wanted, &lower);
            let contains = !wanted.is_empty() && (lower.contains(&wanted) || wanted.contains(&lower));
            (distance <= 2.max(wanted.len() / 3) || contains).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, name)| name.clone()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// How raw values become ids: provisional (while fitting train) or final (afterwards);
/// and which numbers can be normalised.
pub(super) trait IdSource {
    /// What a padding slot of a sequence holds before ids are final.
    const SEQUENCE_PAD: u32;
    /// Whether the number `x` of numeric group `group`'s column `column` stays finite
    /// once normalised (the error says why not): a row with one that does not is bad.
    fn normalisable(&self, group: usize, column: usize, x: f64) -> Result<(), String>;
    fn categorical(&mut self, group: usize, column: usize, value: &str) -> u32;
    fn sequence_item(&mut self, group: usize, value: &str) -> u32;
    fn user(&mut self, value: &str) -> u32;
    /// The domain id of a raw domain value, and whether the unknown-domain policy chose it.
    fn domain(&mut self, value: u32) -> Result<(u32, bool), String>;
}

/// Collects train values; ids are provisional until [`FitIds::fit`] finalises them. Encoding
/// a row registers its values; [`FitIds::count`] then counts the rows of a block that are
/// kept (so a reader may encode rows speculatively and drop them, see [`super::ingest`]).
pub(super) struct FitIds {
    cat: Vec<Vec<Interner>>,
    seq_own: Vec<Option<Interner>>,
    seq_shared: Vec<Option<CategoricalColumnRef>>,
    user: Interner,
    domain_count: Option<usize>,
    domain_max: Option<u32>,
}

impl IdSource for FitIds {
    const SEQUENCE_PAD: u32 = u32::MAX;

    /// Before the normalisers are fitted: a number within f32's range, so that the train
    /// statistics (in f64) and every normalised train value (in f32) are finite.
    fn normalisable(&self, _: usize, _: usize, x: f64) -> Result<(), String> {
        if x.abs() <= f32::MAX as f64 {
            Ok(())
        } else {
            Err(format!("{x:e} is beyond the range of a 32-bit float (±3.4e38), so not finite once normalised"))
        }
    }

    fn categorical(&mut self, group: usize, column: usize, value: &str) -> u32 {
        self.cat[group][column].intern(value)
    }

    fn sequence_item(&mut self, group: usize, value: &str) -> u32 {
        match (self.seq_shared[group], &mut self.seq_own[group]) {
            (Some((g, c)), _) => self.cat[g][c].intern(value),
            (None, Some(own)) => own.intern(value),
            (None, None) => OOV,
        }
    }

    fn user(&mut self, value: &str) -> u32 {
        self.user.intern(value)
    }

    fn domain(&mut self, value: u32) -> Result<(u32, bool), String> {
        if let Some(count) = self.domain_count {
            if value as usize >= count {
                return Err(format!("domain id {value} is outside 0..{count}"));
            }
        }
        Ok((value, false))
    }
}

/// Applies fitted vocabularies; users unseen in train get fresh ids in order of appearance.
pub(super) struct ApplyIds<'f> {
    cat: Vec<Vec<(&'f Vocab, u32)>>,
    seq: Vec<(&'f Vocab, u32)>,
    user: Option<&'f Vocab>,
    new_users: ValueIndex,
    domains: usize,
    unknown_domain: UnknownDomain,
    normalizers: &'f [Vec<Normalizer>],
}

impl IdSource for ApplyIds<'_> {
    const SEQUENCE_PAD: u32 = PAD;

    fn normalisable(&self, group: usize, column: usize, x: f64) -> Result<(), String> {
        let Some(n) = self.normalizers.get(group).and_then(|g| g.get(column)) else { return Ok(()) };
        let y = n.apply(x);
        if y.is_finite() {
            Ok(())
        } else {
            Err(format!(
                "{x:e} is not finite once normalised ({y} with the train split's {} shift {:e} and scale {:e})",
                format!("{:?}", n.method).to_lowercase(),
                n.shift,
                n.scale
            ))
        }
    }

    fn categorical(&mut self, group: usize, column: usize, value: &str) -> u32 {
        let (vocab, offset) = self.cat[group][column];
        offset + vocab.id(value)
    }

    fn sequence_item(&mut self, group: usize, value: &str) -> u32 {
        let (vocab, offset) = self.seq[group];
        offset + vocab.id(value)
    }

    fn user(&mut self, value: &str) -> u32 {
        let Some(vocab) = self.user else { return OOV };
        if let Some(id) = vocab.get(value) {
            return id;
        }
        let next = (vocab.len() + self.new_users.len()) as u32;
        self.new_users.get_or_insert(value, next)
    }

    fn domain(&mut self, value: u32) -> Result<(u32, bool), String> {
        if (value as usize) < self.domains {
            return Ok((value, false));
        }
        match self.unknown_domain {
            UnknownDomain::Fallback(fallback) => Ok((fallback, true)),
            UnknownDomain::Error => Err(format!(
                "domain id {value} is outside 0..{}, the domains of train (the policy \
                 `unknown_domain: ID` scores such rows as domain ID)",
                self.domains
            )),
        }
    }
}

/// A split as read, before numeric normalisation (raw f64, NaN = missing) and masks.
pub(super) struct RawSplit {
    pub(super) rows: usize,
    pub(super) cat: Vec<Vec<u32>>,
    pub(super) seq_ids: Vec<Vec<u32>>,
    pub(super) num: Vec<Vec<f64>>,
    pub(super) domain: Vec<u32>,
    pub(super) labels: Vec<f32>,
    pub(super) user: Vec<u32>,
    pub(super) skipped: SkippedRows,
    /// Rows whose domain id train never had, encoded by [`UnknownDomain::Fallback`].
    pub(super) domain_fallbacks: usize,
}

impl RawSplit {
    /// An empty split of `schema`'s shape with room for about `rows` rows.
    pub(super) fn with_capacity(schema: &Schema, rows: usize) -> RawSplit {
        let shape = Shape::of(schema);
        RawSplit {
            rows: 0,
            cat: shape.cat.iter().map(|w| Vec::with_capacity(w * rows)).collect(),
            seq_ids: shape.seq.iter().map(|(c, l)| Vec::with_capacity(c * l * rows)).collect(),
            num: shape.num.iter().map(|w| Vec::with_capacity(w * rows)).collect(),
            domain: Vec::new(),
            labels: Vec::new(),
            user: Vec::new(),
            skipped: SkippedRows::default(),
            domain_fallbacks: 0,
        }
    }
}

/// Per-row scratch for the values that are validated before anything is added.
#[derive(Clone, Default)]
struct RowScratch {
    labels: Vec<f32>,
    num: Vec<f64>,
}

fn shown(value: &str) -> String {
    const LIMIT: usize = 40;
    if value.chars().count() <= LIMIT {
        format!("\"{value}\"")
    } else {
        format!("\"{}…\"", value.chars().take(LIMIT).collect::<String>())
    }
}

/// One row's fields by header position: a CSV [`Record`], or values that came otherwise
/// (rows served as JSON, [`FieldEncoder`]).
trait Fields {
    fn len(&self) -> usize;
    /// The field at `index` ("" out of range).
    fn get(&self, index: usize) -> &str;
}

impl Fields for Record<'_> {
    fn len(&self) -> usize {
        Record::len(self)
    }

    fn get(&self, index: usize) -> &str {
        Record::get(self, index)
    }
}

impl<S: AsRef<str>> Fields for [S] {
    fn len(&self) -> usize {
        <[S]>::len(self)
    }

    fn get(&self, index: usize) -> &str {
        <[S]>::get(self, index).map_or("", AsRef::as_ref)
    }
}

/// Why a row is malformed: the message (naming the column and the value when one is at
/// fault) and that column's header position.
struct BadValue {
    column: Option<usize>,
    message: String,
}

impl From<String> for BadValue {
    fn from(message: String) -> BadValue {
        BadValue { column: None, message }
    }
}

/// Validates one record and, if it is good, appends it to `out`.
fn encode_row<I: IdSource, F: Fields + ?Sized>(
    record: &F,
    plan: &Plan,
    ids: &mut I,
    scratch: &mut RowScratch,
    out: &mut RawSplit,
) -> Result<(), BadValue> {
    if record.len() != plan.fields {
        return Err(format!("expected {} fields as in the header, found {}", plan.fields, record.len()).into());
    }
    let column_error = |index: usize, problem: &str, value: &str| BadValue {
        column: Some(index),
        message: format!("column '{}': {problem} (value {})", plan.header[index], shown(value)),
    };
    scratch.labels.clear();
    for (&index, values) in plan.labels.iter().zip(&plan.label_values) {
        let value = record.get(index);
        let label = values.parse(value).map_err(|problem| column_error(index, &problem, value))?;
        scratch.labels.push(label);
    }
    scratch.labels.resize(plan.tasks, 0.0);
    let domain = match plan.domain {
        Some(index) => {
            let value = record.get(index);
            let raw = value
                .trim()
                .parse::<u32>()
                .map_err(|_| column_error(index, "a domain must be a non-negative integer", value))?;
            Some(ids.domain(raw).map_err(|problem| column_error(index, &problem, value))?)
        }
        None => None,
    };
    scratch.num.clear();
    for (g, group) in plan.num.iter().enumerate() {
        for (c, &index) in group.iter().enumerate() {
            let value = record.get(index).trim();
            let number = if value.is_empty() {
                f64::NAN
            } else {
                match value.parse::<f64>() {
                    Ok(x) if x.is_finite() => {
                        ids.normalisable(g, c, x).map_err(|problem| column_error(index, &problem, value))?;
                        x
                    }
                    _ => return Err(column_error(index, "not a finite number", value)),
                }
            };
            scratch.num.push(number);
        }
    }

    // The row is valid: add it.
    out.labels.extend_from_slice(&scratch.labels);
    if let Some((domain, fallback)) = domain {
        out.domain.push(domain);
        out.domain_fallbacks += usize::from(fallback);
    } else if plan.pad_domain {
        out.domain.push(0);
    }
    let mut numbers = scratch.num.iter();
    for (g, group) in plan.num.iter().enumerate() {
        out.num[g].extend(numbers.by_ref().take(group.len()));
    }
    for (g, group) in plan.cat.iter().enumerate() {
        for (c, &index) in group.iter().enumerate() {
            let id = ids.categorical(g, c, record.get(index));
            out.cat[g].push(id);
        }
    }
    for (g, group) in plan.seq.iter().enumerate() {
        let max_len = plan.seq_len[g];
        for &index in group {
            let ids_out = &mut out.seq_ids[g];
            let start = ids_out.len();
            ids_out.resize(start + max_len, I::SEQUENCE_PAD);
            // Right-aligned: the most recent (last) item goes to the last slot.
            for (back, item) in record.get(index).split_ascii_whitespace().rev().take(max_len).enumerate() {
                let id = ids.sequence_item(g, item);
                out.seq_ids[g][start + max_len - 1 - back] = id;
            }
        }
    }
    if let Some(index) = plan.user {
        out.user.push(ids.user(record.get(index)));
    } else if plan.pad_user {
        out.user.push(PAD);
    }
    out.rows += 1;
    Ok(())
}

fn syntax_error(file: &Path, error: super::csv::SyntaxError) -> DataError {
    DataError::BadRow { file: file.to_path_buf(), line: error.line, message: error.message }
}

/// Reads the header record and finds the schema's columns in it. `None` when the text is
/// not the end of the file (`more`) and ends inside a quoted field of the header.
pub(super) fn read_header(
    schema: &Schema,
    file: &Path,
    reader: &mut CsvReader,
    columns: Columns,
    more: bool,
) -> Result<Option<Plan>, DataError> {
    let header = match reader.next_record() {
        Ok(Some(header)) => header,
        Ok(None) if more => return Ok(None),
        Ok(None) => {
            return Err(DataError::BadRow {
                file: file.to_path_buf(),
                line: 1,
                message: "the file is empty (no header)".into(),
            })
        }
        Err(e) if e.unclosed && more => return Ok(None),
        Err(e) => return Err(syntax_error(file, e)),
    };
    let names = (0..header.len()).map(|i| header.get(i).to_string()).collect();
    Plan::resolve(schema, file, names, columns).map(Some)
}

/// Why [`Rows::encode`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// The text has no more records.
    End,
    /// The split holds the rows asked for.
    Full,
    /// The text ends inside a quoted field: the record's start is where to read on from
    /// once more text has come.
    Incomplete,
}

/// The records of one file, encoded with one [`Plan`] and a bad-row policy.
#[derive(Clone)]
pub(super) struct Rows {
    file: PathBuf,
    pub(super) plan: Plan,
    bad_rows: BadRows,
    scratch: RowScratch,
    /// Records are numbered by their CSV line, or (Parquet) by their row.
    parquet: bool,
}

impl Rows {
    pub(super) fn new(file: &Path, plan: Plan, bad_rows: BadRows) -> Rows {
        Rows { file: file.to_path_buf(), plan, bad_rows, scratch: RowScratch::default(), parquet: false }
    }

    /// Rows of a Parquet file: a record's `line` is its 1-based row number.
    pub(super) fn of_parquet(file: &Path, plan: Plan, bad_rows: BadRows) -> Rows {
        Rows { parquet: true, ..Rows::new(file, plan, bad_rows) }
    }

    /// The error of a malformed record at `line` (a Parquet row's number).
    fn bad(&self, line: u64, message: String) -> DataError {
        let file = self.file.clone();
        match self.parquet {
            true => DataError::BadParquetRow { file, row: line, message },
            false => DataError::BadRow { file, line, message },
        }
    }

    /// Validates one record and adds it to `out`; a malformed one is an error, or with
    /// [`BadRows::Skip`] it is counted. Returns whether it was added.
    pub(super) fn take<I: IdSource>(
        &mut self,
        record: &Record,
        ids: &mut I,
        out: &mut RawSplit,
    ) -> Result<bool, DataError> {
        let Err(BadValue { message, .. }) = encode_row(record, &self.plan, ids, &mut self.scratch, out) else {
            return Ok(true);
        };
        let error = self.bad(record.line, message);
        match self.bad_rows {
            BadRows::Fail => Err(error),
            BadRows::Skip => {
                out.skipped.record(error.to_string());
                Ok(false)
            }
        }
    }

    /// Encodes the records `reader` has left into `out` until the text ends or `out` holds
    /// `max_rows` rows, and returns why it stopped and the position (byte offset, line) after
    /// the last record it took. A malformed row is an error naming `file:line`, or with
    /// [`BadRows::Skip`] it is counted in `out.skipped`; `each` sees every record taken and
    /// whether it was added. When the text is not the end of the file (`more`), a quoted
    /// field it ends inside is [`Stop::Incomplete`], not an error.
    pub(super) fn encode<I: IdSource>(
        &mut self,
        reader: &mut CsvReader,
        ids: &mut I,
        out: &mut RawSplit,
        (max_rows, more): (usize, bool),
        mut each: impl FnMut(&Record, bool),
    ) -> Result<(Stop, (usize, u64)), DataError> {
        loop {
            let position = reader.position();
            if out.rows >= max_rows {
                return Ok((Stop::Full, position));
            }
            let record = match reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => return Ok((Stop::End, reader.position())),
                Err(e) if e.unclosed && more => return Ok((Stop::Incomplete, position)),
                Err(e) => return Err(syntax_error(&self.file, e)),
            };
            let added = self.take(&record, ids, out)?;
            each(&record, added);
        }
    }
}

/// Reads every record of the inputs, in order, into one [`RawSplit`]; each input after the
/// first must have the first one's columns.
fn read_split<I: IdSource>(
    schema: &Schema,
    inputs: &[Input],
    ids: &mut I,
    (bad_rows, delimiter): (BadRows, Delimiter),
) -> Result<RawSplit, DataError> {
    let capacity = inputs
        .iter()
        .map(|input| match &input.content {
            Content::Text(text) => text.len() / 256,
            Content::Parquet(_) => 0,
        })
        .sum();
    let mut out = RawSplit::with_capacity(schema, capacity);
    let mut first: Option<(&Path, Vec<String>)> = None;
    for input in inputs {
        let file = input.path.as_path();
        let header = match &input.content {
            Content::Text(text) => {
                let mut reader = CsvReader::new(text).with_delimiter(delimiter.byte());
                let plan =
                    read_header(schema, file, &mut reader, Columns::All, false)?.expect("the whole text is read");
                let header = plan.header.clone();
                Rows::new(file, plan, bad_rows).encode(&mut reader, ids, &mut out, (usize::MAX, false), |_, _| {})?;
                header
            }
            Content::Parquet(bytes) => {
                let mut rows = ParquetRows::open(file, bytes.clone())?;
                let plan = Plan::resolve(schema, file, rows.header().to_vec(), Columns::All)?;
                let header = plan.header.clone();
                let mut encoder = Rows::of_parquet(file, plan, bad_rows);
                rows.read(&encoder.plan.reads(), |record| encoder.take(record, ids, &mut out).map(|_| ()))?;
                header
            }
        };
        match &first {
            None => first = Some((file, header)),
            Some((first_file, first_header)) => check_same_columns((first_file, first_header), (file, &header))?,
        }
    }
    Ok(out)
}

/// Reads the CSV text of a train file, fits vocabularies, normalisers and the domain count
/// on it, and returns them with the encoded train split.
#[cfg(test)]
pub(crate) fn fit_train(
    schema: &Schema,
    file: &Path,
    text: &str,
    bad_rows: BadRows,
) -> Result<(Fitted, Dataset), DataError> {
    fit_inputs(schema, file, &[Input::text(file, text)], (bad_rows, Delimiter::COMMA))
}

/// Reads the train split's inputs (`source` is the split as given, a file, folder or
/// pattern), fits vocabularies, normalisers and the domain count on them, and returns them
/// with the encoded train split, all in memory (what [`super::prepare`] does block by block).
#[cfg(test)]
pub(crate) fn fit_inputs(
    schema: &Schema,
    source: &Path,
    inputs: &[Input],
    options: (BadRows, Delimiter),
) -> Result<(Fitted, Dataset), DataError> {
    let mut ids = FitIds::new(schema);
    let mut raw = read_split(schema, inputs, &mut ids, options)?;
    ids.count(&raw);
    let mut stats = NumericColumns::new(schema);
    stats.add(&raw);
    let (fitted, remap) = ids.fit(
        schema,
        |squares| {
            squares.add_squares(&raw);
            Ok(())
        },
        stats,
    )?;
    remap.apply(&mut raw);
    let train = fitted.finish(raw, source);
    Ok((fitted, train))
}

/// The one-pass statistics of every numeric column of train, and (a second pass, for
/// `standard`) the squares around their means.
pub(super) struct NumericColumns {
    methods: Vec<Normalize>,
    stats: Vec<Vec<NumericStats>>,
    /// Per group, per column: the mean and the sum of squares around it.
    squares: Vec<Vec<(f64, f64)>>,
}

impl NumericColumns {
    pub(super) fn new(schema: &Schema) -> NumericColumns {
        let groups: Vec<_> = schema.numeric_groups().collect();
        NumericColumns {
            methods: groups.iter().map(|(_, _, method)| *method).collect(),
            stats: groups.iter().map(|(_, columns, _)| vec![NumericStats::default(); columns.len()]).collect(),
            squares: Vec::new(),
        }
    }

    /// Adds the numbers of a block of rows (provisional or final: the numbers are raw).
    pub(super) fn add(&mut self, raw: &RawSplit) {
        for (stats, values) in self.stats.iter_mut().zip(&raw.num) {
            let width = stats.len().max(1);
            for row in values.chunks_exact(width) {
                stats.iter_mut().zip(row).for_each(|(s, &x)| s.add(x));
            }
        }
    }

    /// Whether some column needs the second pass.
    pub(super) fn needs_squares(&self) -> bool {
        self.methods.iter().any(|&m| Normalizer::needs_squares(m))
    }

    /// Adds the squares of a block of rows, in the order of the first pass.
    pub(super) fn add_squares(&mut self, raw: &RawSplit) {
        if self.squares.is_empty() {
            self.squares = self.stats.iter().map(|group| group.iter().map(|s| (s.mean(), 0.0)).collect()).collect();
        }
        for (squares, values) in self.squares.iter_mut().zip(&raw.num) {
            let width = squares.len().max(1);
            for row in values.chunks_exact(width) {
                squares.iter_mut().zip(row).for_each(|((mean, sum), &x)| add_square(sum, x, *mean));
            }
        }
    }

    fn normalizers(&self) -> Vec<Vec<Normalizer>> {
        self.stats
            .iter()
            .zip(&self.methods)
            .enumerate()
            .map(|(g, (stats, &method))| {
                stats
                    .iter()
                    .enumerate()
                    .map(|(c, s)| {
                        let squares = self.squares.get(g).and_then(|group| group.get(c)).map_or(0.0, |(_, sum)| *sum);
                        Normalizer::from_stats(method, s, |_| squares)
                    })
                    .collect()
            })
            .collect()
    }
}

/// From provisional ids (in first-seen order, as [`FitIds`] gave them) to the final ones.
pub(super) struct Remap {
    /// Per categorical group, per column: the final id of each provisional one, and the
    /// column's offset in the group.
    cat: Vec<Vec<(Vec<u32>, u32)>>,
    /// Per sequence group: the final id of each provisional item, and the offset.
    seq: Vec<(Vec<u32>, u32)>,
    user: Option<Vec<u32>>,
}

/// Where one part's provisional ids went when its [`FitIds`] was absorbed: per categorical
/// group, per column; per sequence group (its own vocabulary's or the column's it shares);
/// the users.
struct PartIds {
    cat: Vec<Vec<Vec<u32>>>,
    seq: Vec<Vec<u32>>,
    user: Vec<u32>,
}

impl Remap {
    /// This remap of the merged ids, applied to a part's ids ([`FitIds::fit_parts`]).
    fn through(&self, part: &PartIds) -> Remap {
        let compose = |remap: &[u32], moved: &[u32]| -> Vec<u32> {
            moved.iter().map(|&id| remap.get(id as usize).copied().unwrap_or(OOV)).collect()
        };
        Remap {
            cat: self
                .cat
                .iter()
                .zip(&part.cat)
                .map(|(columns, moved)| {
                    columns.iter().zip(moved).map(|((remap, offset), moved)| (compose(remap, moved), *offset)).collect()
                })
                .collect(),
            seq: self
                .seq
                .iter()
                .zip(&part.seq)
                .map(|((remap, offset), moved)| (compose(remap, moved), *offset))
                .collect(),
            user: self.user.as_ref().map(|remap| compose(remap, &part.user)),
        }
    }

    /// Rewrites a block of provisionally encoded train rows with the final ids.
    pub(super) fn apply(&self, raw: &mut RawSplit) {
        for (columns, values) in self.cat.iter().zip(raw.cat.iter_mut()) {
            let width = columns.len().max(1);
            for row in values.chunks_exact_mut(width) {
                for ((remap, offset), id) in columns.iter().zip(row) {
                    *id = offset + remap[*id as usize];
                }
            }
        }
        for ((remap, offset), values) in self.seq.iter().zip(raw.seq_ids.iter_mut()) {
            for id in values.iter_mut() {
                *id = if *id == FitIds::SEQUENCE_PAD {
                    PAD
                } else {
                    offset + remap.get(*id as usize).copied().unwrap_or(OOV)
                };
            }
        }
        if let Some(remap) = &self.user {
            raw.user.iter_mut().for_each(|id| *id = remap[*id as usize]);
        }
    }
}

impl FitIds {
    pub(super) fn new(schema: &Schema) -> FitIds {
        let seq_shared: Vec<Option<CategoricalColumnRef>> = schema
            .sequence_groups()
            .map(|(_, _, _, vocab, _)| vocab.and_then(|column| schema.find_categorical_column(column)))
            .collect();
        FitIds {
            cat: schema.categorical_groups().map(|(_, c, _)| c.iter().map(|_| Interner::default()).collect()).collect(),
            seq_own: seq_shared.iter().map(|shared| shared.is_none().then(Interner::default)).collect(),
            seq_shared,
            user: Interner::default(),
            domain_count: schema.domain.as_ref().and_then(|d| d.count),
            domain_max: None,
        }
    }

    /// Counts the values of a block of rows these ids encoded, and its domains.
    pub(super) fn count(&mut self, raw: &RawSplit) {
        for (interners, ids) in self.cat.iter_mut().zip(&raw.cat) {
            let width = interners.len().max(1);
            for row in ids.chunks_exact(width) {
                interners.iter_mut().zip(row).for_each(|(interner, &id)| interner.count(id));
            }
        }
        for (own, ids) in self.seq_own.iter_mut().zip(&raw.seq_ids) {
            if let Some(own) = own {
                ids.iter().filter(|&&id| id != Self::SEQUENCE_PAD).for_each(|&id| own.count(id));
            }
        }
        raw.user.iter().for_each(|&id| self.user.count(id));
        if let Some(&max) = raw.domain.iter().max() {
            self.domain_max = Some(self.domain_max.map_or(max, |m| m.max(max)));
        }
    }

    /// Adds the values, counts and domains `other` collected; returns where its
    /// provisional ids went.
    fn absorb(&mut self, other: &FitIds) -> PartIds {
        let cat: Vec<Vec<Vec<u32>>> = self
            .cat
            .iter_mut()
            .zip(&other.cat)
            .map(|(mine, theirs)| mine.iter_mut().zip(theirs).map(|(m, t)| m.absorb(t)).collect())
            .collect();
        let seq = self
            .seq_own
            .iter_mut()
            .zip(&other.seq_own)
            .zip(&self.seq_shared)
            .map(|((mine, theirs), shared)| match (mine, theirs, shared) {
                (Some(mine), Some(theirs), _) => mine.absorb(theirs),
                (_, _, Some((g, c))) => cat[*g][*c].clone(),
                _ => Vec::new(),
            })
            .collect();
        let user = self.user.absorb(&other.user);
        self.domain_max = match (self.domain_max, other.domain_max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        PartIds { cat, seq, user }
    }

    /// [`fit`](Self::fit) over the values several [`FitIds`] collected from parts of train
    /// (each counting the rows it encoded): one remap per part, from its provisional ids to
    /// the final ones. The result does not depend on how the rows were divided.
    pub(super) fn fit_parts(
        parts: Vec<FitIds>,
        schema: &Schema,
        squares: impl FnOnce(&mut NumericColumns) -> Result<(), DataError>,
        numbers: NumericColumns,
    ) -> Result<(Fitted, Vec<Remap>), DataError> {
        let mut parts = parts.into_iter();
        let mut merged = parts.next().unwrap_or_else(|| FitIds::new(schema));
        let moved: Vec<PartIds> = parts.map(|part| merged.absorb(&part)).collect();
        let (fitted, remap) = merged.fit(schema, squares, numbers)?;
        let mut remaps = vec![];
        remaps.extend(moved.iter().map(|part| remap.through(part)));
        remaps.insert(0, remap);
        Ok((fitted, remaps))
    }

    /// The fitted state from the values collected and the numeric statistics (`squares`
    /// runs the second pass over the numbers when a column needs it), and the map from
    /// provisional to final ids.
    pub(super) fn fit(
        self,
        schema: &Schema,
        squares: impl FnOnce(&mut NumericColumns) -> Result<(), DataError>,
        mut numbers: NumericColumns,
    ) -> Result<(Fitted, Remap), DataError> {
        // Final categorical vocabularies and their offsets.
        let cat_limits = schema.categorical_limits();
        let mut cat_vocabs = Vec::new();
        let mut cat_remaps = Vec::new();
        for (interners, &limits) in self.cat.into_iter().zip(&cat_limits) {
            let (vocabs, remaps): (Vec<Vocab>, Vec<Vec<u32>>) =
                interners.into_iter().map(|i| i.into_vocab(limits)).unzip();
            cat_vocabs.push(vocabs);
            cat_remaps.push(remaps);
        }
        let offsets: Vec<Vec<u32>> = cat_vocabs.iter().map(|vocabs| column_offsets(vocabs)).collect();

        // Sequence items: through a categorical column's vocabulary, or the group's own.
        let seq_limits = schema.sequence_limits();
        let mut seq_vocabs = Vec::new();
        let mut seq_remaps = Vec::new();
        for (g, own) in self.seq_own.into_iter().enumerate() {
            let (vocab, remap, offset) = match (own, self.seq_shared[g]) {
                (Some(interner), _) => {
                    let (vocab, remap) = interner.into_vocab(seq_limits[g]);
                    (Some(vocab), remap, 0)
                }
                (None, Some((cg, cc))) => (None, cat_remaps[cg][cc].clone(), offsets[cg][cc]),
                (None, None) => (None, Vec::new(), 0),
            };
            seq_vocabs.push(vocab);
            seq_remaps.push((remap, offset));
        }

        let (user, user_remap) = match schema.user {
            Some(_) => {
                let (vocab, remap) = self.user.into_vocab(VocabLimits::min_count(1));
                (Some(vocab), Some(remap))
            }
            None => (None, None),
        };

        let domains = match &schema.domain {
            None => 0,
            Some(spec) => spec.count.unwrap_or_else(|| self.domain_max.map_or(0, |m| m as usize + 1)),
        };
        if numbers.needs_squares() {
            squares(&mut numbers)?;
        }
        let fitted = Fitted {
            schema: schema.clone(),
            vocabs: Vocabs { categorical: cat_vocabs, sequence: seq_vocabs, user },
            normalizers: numbers.normalizers(),
            domains,
        };
        let cat = cat_remaps
            .into_iter()
            .zip(offsets)
            .map(|(remaps, offsets)| remaps.into_iter().zip(offsets).collect())
            .collect();
        Ok((fitted, Remap { cat, seq: seq_remaps, user: user_remap }))
    }
}

fn column_offsets(vocabs: &[Vocab]) -> Vec<u32> {
    let mut next = 0u32;
    vocabs
        .iter()
        .map(|vocab| {
            let offset = next;
            next += vocab.len() as u32;
            offset
        })
        .collect()
}

impl Fitted {
    /// Reads and encodes with the fitted vocabularies any file the schema fits, or a folder
    /// or glob pattern of part files ([`super::source::parts`]): CSV, CSV.gz or Parquet; or
    /// stdin for `-` (CSV, called `stdin` in messages).
    pub fn encode_file(&self, file: &Path, options: impl Into<EncodeOptions>) -> Result<Dataset, DataError> {
        if file != Path::new("-") {
            return self.encode_inputs(file, &Input::read_all(file)?, options);
        }
        let name = display_name(file);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
            .map_err(|e| DataError::io(&name, &format!("cannot read: {e}")))?;
        self.encode_inputs(&name, &[Input::new(&name, bytes)?], options)
    }

    /// Encodes CSV text as if read from `file` (which is used only in messages).
    pub fn encode_text(
        &self,
        file: &Path,
        text: &str,
        options: impl Into<EncodeOptions>,
    ) -> Result<Dataset, DataError> {
        self.encode_inputs(file, &[Input::text(file, text)], options)
    }

    /// Encodes the inputs of one split, in order (`source` names it in the dataset).
    pub(crate) fn encode_inputs(
        &self,
        source: &Path,
        inputs: &[Input],
        options: impl Into<EncodeOptions>,
    ) -> Result<Dataset, DataError> {
        let options = options.into();
        let mut ids = self.apply_ids(options.unknown_domain)?;
        let raw = read_split(&self.schema, inputs, &mut ids, (options.bad_rows, options.delimiter))?;
        Ok(self.finish(raw, source))
    }

    /// An encoder of rows given as fields rather than read from a file (`mdl serve`'s JSON
    /// rows): only the model's inputs, as [`Columns::Inputs`] reads them from a file to
    /// score, with the unknown-domain policy checked here once.
    pub fn field_encoder(
        &self,
        unknown_domain: UnknownDomain,
        domain_input: bool,
    ) -> Result<FieldEncoder<'_>, DataError> {
        let ids = self.apply_ids(unknown_domain)?;
        let columns = Columns::Inputs { domain: domain_input };
        let mut header: Vec<String> = Vec::new();
        let features = self.schema.features.iter().flat_map(|g| g.columns());
        let domain = self.schema.domain.iter().filter(|_| domain_input).map(|d| &d.column);
        for column in features.chain(domain) {
            if !header.contains(column) {
                header.push(column.clone());
            }
        }
        let plan = Plan::resolve(&self.schema, Path::new(FieldEncoder::SOURCE), header, columns)?;
        Ok(FieldEncoder { fitted: self, ids, plan, scratch: RowScratch::default() })
    }

    /// The fitted ids to encode a file with, after checking the fitted state and that an
    /// unknown-domain fallback is one of train's domains.
    pub(super) fn apply_ids(&self, unknown_domain: UnknownDomain) -> Result<ApplyIds<'_>, DataError> {
        self.check()?;
        if let UnknownDomain::Fallback(fallback) = unknown_domain {
            if self.schema.domain.is_none() {
                return Err(DataError::Schema(format!(
                    "unknown_domain: {fallback} is set, but the schema has no domain column"
                )));
            }
            if fallback as usize >= self.domains {
                return Err(DataError::Schema(format!(
                    "unknown_domain: {fallback} is not a domain of train (0..{})",
                    self.domains
                )));
            }
        }
        let layout = self.layout();
        Ok(ApplyIds {
            cat: self
                .vocabs
                .categorical
                .iter()
                .zip(&layout.categorical)
                .map(|(vocabs, group)| vocabs.iter().zip(&group.offsets).map(|(v, &o)| (v, o)).collect())
                .collect(),
            seq: self.sequence_vocabs(),
            user: self.vocabs.user.as_ref(),
            new_users: ValueIndex::default(),
            domains: self.domains,
            unknown_domain,
            normalizers: &self.normalizers,
        })
    }

    /// The vocabulary and id offset each sequence group's items go through.
    pub(super) fn sequence_vocabs(&self) -> Vec<(&Vocab, u32)> {
        let offsets: Vec<Vec<u32>> = self.vocabs.categorical.iter().map(|vocabs| column_offsets(vocabs)).collect();
        self.schema
            .sequence_groups()
            .zip(&self.vocabs.sequence)
            .filter_map(|((_, _, _, shared, _), own)| match (own, shared) {
                (Some(vocab), _) => Some((vocab, 0)),
                (None, Some(column)) => self
                    .schema
                    .find_categorical_column(column)
                    .map(|(g, c)| (&self.vocabs.categorical[g][c], offsets[g][c])),
                (None, None) => None,
            })
            .collect()
    }

    /// Normalises numbers and builds masks.
    pub(super) fn finish(&self, raw: RawSplit, file: &Path) -> Dataset {
        let mut data = self.finish_unmasked(raw, file);
        data.seq_mask = data.seq_ids.iter().map(|ids| mask_of(ids)).collect();
        data
    }

    /// [`finish`](Self::finish) without the sequence masks (each left empty): for blocks
    /// written to the cache file, which stores none (a mask is `id != 0`).
    pub(super) fn finish_unmasked(&self, raw: RawSplit, file: &Path) -> Dataset {
        let num = raw
            .num
            .iter()
            .zip(&self.normalizers)
            .map(|(values, normalizers)| {
                let width = normalizers.len().max(1);
                values.iter().enumerate().map(|(i, &x)| normalizers[i % width].apply(x)).collect()
            })
            .collect();
        Dataset {
            source: file.display().to_string(),
            rows: raw.rows,
            shape: Shape::of(&self.schema),
            cat: raw.cat,
            seq_mask: vec![Vec::new(); raw.seq_ids.len()],
            seq_ids: raw.seq_ids,
            num,
            domain: raw.domain,
            labels: raw.labels,
            user: raw.user,
            skipped: raw.skipped,
            stored: None,
        }
    }

    /// The vocabulary of the id space of input `name` as `sample_ids` draws from it: the
    /// train count of every id (`0` for padding and out-of-vocabulary ids, which are never
    /// drawn), and the first id of each column followed by the number of ids. `None` when
    /// `name` is neither a categorical group nor a sequence group with its own vocabulary.
    pub fn id_counts(&self, name: &str) -> Option<(Vec<f32>, Vec<u32>)> {
        let of = |vocabs: &[&Vocab]| {
            let mut counts = Vec::new();
            let mut starts = Vec::with_capacity(vocabs.len() + 1);
            for v in vocabs {
                starts.push(counts.len() as u32);
                counts.extend((0..v.len() as u32).map(|id| v.count(id).unwrap_or(0) as f32));
            }
            starts.push(counts.len() as u32);
            (counts, starts)
        };
        if let Some(i) = self.schema.categorical_groups().position(|(n, ..)| n == name) {
            return Some(of(&self.vocabs.categorical[i].iter().collect::<Vec<_>>()));
        }
        let i = self.schema.sequence_groups().position(|(n, ..)| n == name)?;
        self.vocabs.sequence[i].as_ref().map(|v| of(&[v]))
    }

    /// Table sizes and id spaces of every group.
    pub fn layout(&self) -> Layout {
        let categorical: Vec<CategoricalLayout> = self
            .schema
            .categorical_groups()
            .zip(&self.vocabs.categorical)
            .map(|((name, columns, _), vocabs)| CategoricalLayout {
                name: name.to_string(),
                columns: columns.to_vec(),
                offsets: column_offsets(vocabs),
                vocab_sizes: vocabs.iter().map(Vocab::len).collect(),
                rows: vocabs.iter().map(Vocab::len).sum(),
            })
            .collect();
        let sequence = self
            .schema
            .sequence_groups()
            .zip(&self.vocabs.sequence)
            .map(|((name, columns, max_len, shared, _), own)| {
                let (table, rows) = match (own, shared.and_then(|c| self.schema.find_categorical_column(c))) {
                    (Some(vocab), _) => (SequenceTable::Own, vocab.len()),
                    (None, Some((g, c))) => (
                        SequenceTable::Categorical {
                            group: categorical[g].name.clone(),
                            column: categorical[g].columns[c].clone(),
                        },
                        categorical[g].rows,
                    ),
                    (None, None) => (SequenceTable::Own, 2),
                };
                SequenceLayout { name: name.to_string(), columns: columns.to_vec(), max_len, table, rows }
            })
            .collect();
        Layout {
            categorical,
            sequence,
            numeric: self
                .schema
                .numeric_groups()
                .map(|(name, columns, _)| NumericLayout { name: name.to_string(), columns: columns.to_vec() })
                .collect(),
            domains: self.domains,
            tasks: self.schema.labels.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// Checks that the fitted parts agree with the schema (they may come from a file).
    pub fn check(&self) -> Result<(), DataError> {
        self.schema.validate()?;
        let mismatch = |what: &str| Err(DataError::Schema(format!("fitted data does not match its schema: {what}")));
        let cat: Vec<usize> = self.schema.categorical_groups().map(|(_, c, _)| c.len()).collect();
        if self.vocabs.categorical.iter().map(Vec::len).collect::<Vec<_>>() != cat {
            return mismatch("categorical vocabularies");
        }
        let total: usize = self.vocabs.categorical.iter().flatten().map(Vocab::len).sum();
        if total >= u32::MAX as usize {
            return mismatch("categorical vocabularies are too large for u32 ids");
        }
        let seq: Vec<bool> = self.schema.sequence_groups().map(|(.., vocab, _)| vocab.is_none()).collect();
        if self.vocabs.sequence.iter().map(Option::is_some).collect::<Vec<_>>() != seq {
            return mismatch("sequence vocabularies");
        }
        let num: Vec<usize> = self.schema.numeric_groups().map(|(_, c, _)| c.len()).collect();
        if self.normalizers.iter().map(Vec::len).collect::<Vec<_>>() != num {
            return mismatch("numeric normalisers");
        }
        if self.vocabs.user.is_some() != self.schema.user.is_some() {
            return mismatch("user vocabulary");
        }
        if let Some(spec) = &self.schema.domain {
            if spec.count.is_some_and(|count| count != self.domains) {
                return mismatch("domain count");
            }
        } else if self.domains != 0 {
            return mismatch("domain count without a domain column");
        }
        Ok(())
    }
}

/// A malformed row of rows given as fields ([`FieldEncoder::encode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The row's 0-based position among the rows given.
    pub row: usize,
    /// The column at fault, when one is.
    pub column: Option<String>,
    /// What is wrong, as a CSV row's message says it (`column 'x': not a finite number
    /// (value "abc")`).
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "row {}: {}", self.row, self.message)
    }
}

/// Encodes rows given as fields in the order of [`columns`](Self::columns) with the
/// fitted state: each row is checked as a CSV record to score is (numbers, domain ids and
/// the unknown-domain policy), and the first malformed one is an error naming its index
/// and column. Made by [`Fitted::field_encoder`].
pub struct FieldEncoder<'f> {
    fitted: &'f Fitted,
    ids: ApplyIds<'f>,
    plan: Plan,
    scratch: RowScratch,
}

impl FieldEncoder<'_> {
    /// What the encoded rows' dataset says they came from.
    pub const SOURCE: &'static str = "request";

    /// The columns every row gives, in order: the features' columns, then the domain's
    /// when the model has a domain input; each once.
    pub fn columns(&self) -> &[String] {
        &self.plan.header
    }

    /// Encodes `rows` (each with one field per [`columns`](Self::columns) entry); returns
    /// them with the number whose domain id train never had, encoded as the policy's
    /// fallback domain.
    pub fn encode<S: AsRef<str>>(&mut self, rows: &[Vec<S>]) -> Result<(Dataset, usize), FieldError> {
        let mut raw = RawSplit::with_capacity(&self.fitted.schema, rows.len());
        for (row, fields) in rows.iter().enumerate() {
            encode_row(fields.as_slice(), &self.plan, &mut self.ids, &mut self.scratch, &mut raw).map_err(|bad| {
                FieldError { row, column: bad.column.map(|c| self.plan.header[c].clone()), message: bad.message }
            })?;
        }
        let fallbacks = raw.domain_fallbacks;
        Ok((self.fitted.finish(raw, Path::new(FieldEncoder::SOURCE)), fallbacks))
    }
}
