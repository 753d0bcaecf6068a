//! The real-data pipeline: CSV files → encoded, batchable arrays for CTR models.
//!
//! This module owns everything between a `.csv` / `.csv.gz` file and a mini-batch, and
//! depends on nothing else in `mdl` (but its one atomic file write, [`crate::files`]):
//!
//! * [`Schema`] says which columns form which feature group (categorical, sequence, numeric),
//!   which are the labels, the domain and the user ([`schema`]);
//! * vocabularies ([`Vocab`]), numeric normalisers ([`Normalizer`]) and the domain count are
//!   fitted on the train split only and kept in [`Fitted`], which encodes any other file the
//!   same way and is serialisable for a run folder ([`encode`]);
//! * [`prepare`](fn@prepare) reads train/valid/test into [`Dataset`]s through a binary cache
//!   keyed by the input files' content, the schema and the options ([`prepare`](mod@prepare);
//!   the file format is documented in `cache.rs`);
//! * [`Dataset::gather`] fills a reusable [`Batch`]; [`MiniBatches`] gives a seeded,
//!   reproducible order of row indices ([`batches`]);
//! * [`Fitted::stream`] encodes a file or stdin to score block by block, labels optional,
//!   with each record's fate and kept columns ([`stream`]).
//!
//! Conventions (details in each submodule):
//!
//! * ids: 0 = padding, 1 = out-of-vocabulary, then values by descending train count (ties by
//!   raw string). An empty categorical cell is the value `""` with an id of its own.
//!   Categorical ids are global over their group (each column offset by the vocabulary sizes
//!   before it), so one table of `Layout::categorical[g].rows` rows serves the group;
//! * sequences: space-separated ids, the last `max_len` kept, right-aligned (most recent item
//!   in the last slot), padding id 0 with mask 0;
//! * numbers: normalised with train statistics; a missing value is 0 after normalisation;
//! * labels must be 0 or 1; domains are integers in `0..D`; in a file encoded with the
//!   fitted state, a domain outside `0..D` is malformed unless [`UnknownDomain::Fallback`]
//!   names a domain to read it as;
//! * any malformed row is an error naming `file:line`, the column and the value, or with
//!   [`BadRows::Skip`] it is skipped and counted in [`Dataset::skipped`]. Nothing is dropped
//!   silently and no input makes this module panic.

pub mod batches;
mod cache;
mod csv;
pub mod dataset;
pub mod encode;
mod ingest;
pub mod numeric;
mod parquet_input;
pub mod prepare;
pub mod schema;
pub mod serving;
pub mod source;
pub mod stream;
pub mod vocab;
mod write_behind;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batches::{MiniBatches, SplitMix64};
pub use cache::StoredRows;
pub use csv::read_table;
pub use dataset::{Batch, Dataset, Shape, SkippedRows};
pub use encode::{
    CategoricalLayout, FieldEncoder, FieldError, Fitted, Layout, NumericLayout, SequenceLayout, SequenceTable, Vocabs,
};
pub use numeric::Normalizer;
pub use prepare::{prepare, CacheMode, PrepareOptions, PrepareStats, Prepared, SplitPaths, Splits};
pub use schema::{DomainSpec, FeatureGroup, Normalize, Schema, Task};
pub use source::{parts, Format};
pub use stream::{Block, RowStream, StreamOptions};
pub use vocab::{Vocab, VocabLimits, OOV, PAD};

/// What to do with a malformed row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRows {
    /// Stop with an error naming the file, line, column and value.
    #[default]
    Fail,
    /// Leave the row out and count it in [`Dataset::skipped`].
    Skip,
}

/// What to do with a domain id outside the domains of train (`0..D`) in a file encoded with
/// the fitted state (valid, test, `mdl eval`, `mdl predict`). Written `error` or a domain id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownDomain {
    /// Stop with an error naming the file, line and value (or skip the row with
    /// [`BadRows::Skip`]).
    #[default]
    Error,
    /// Encode the row as this domain of train (it must be in `0..D`), and count it.
    Fallback(u32),
}

impl UnknownDomain {
    pub fn is_error(&self) -> bool {
        *self == UnknownDomain::Error
    }
}

impl fmt::Display for UnknownDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownDomain::Error => f.write_str("error"),
            UnknownDomain::Fallback(domain) => write!(f, "{domain}"),
        }
    }
}

impl std::str::FromStr for UnknownDomain {
    type Err = String;

    fn from_str(text: &str) -> Result<UnknownDomain, String> {
        match text.trim() {
            "error" => Ok(UnknownDomain::Error),
            other => other.parse::<u32>().map(UnknownDomain::Fallback).map_err(|_| {
                format!("unknown_domain: expected `error` or a domain id (a non-negative integer), found `{text}`")
            }),
        }
    }
}

impl Serialize for UnknownDomain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            UnknownDomain::Error => serializer.serialize_str("error"),
            UnknownDomain::Fallback(domain) => serializer.serialize_u32(*domain),
        }
    }
}

impl<'de> Deserialize<'de> for UnknownDomain {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UnknownDomain, D::Error> {
        struct Policy;
        impl serde::de::Visitor<'_> for Policy {
            type Value = UnknownDomain;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`error` or a domain id (a non-negative integer)")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<UnknownDomain, E> {
                match text {
                    "error" => Ok(UnknownDomain::Error),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<UnknownDomain, E> {
                u32::try_from(value)
                    .map(UnknownDomain::Fallback)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<UnknownDomain, E> {
                u64::try_from(value)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        deserializer.deserialize_any(Policy)
    }
}

/// The byte between the fields of a CSV file: `,` (the default), or another ASCII
/// character such as a tab (TSV), `;` or `|`. Written as the character itself; a tab also
/// as `\t` (backslash, t) or `tab`, since a YAML value in single quotes or plain keeps the
/// backslash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delimiter(u8);

impl Delimiter {
    pub const COMMA: Delimiter = Delimiter(b',');
    pub const TAB: Delimiter = Delimiter(b'\t');

    pub fn byte(self) -> u8 {
        self.0
    }

    pub fn is_comma(&self) -> bool {
        *self == Delimiter::COMMA
    }
}

impl Default for Delimiter {
    fn default() -> Delimiter {
        Delimiter::COMMA
    }
}

impl fmt::Display for Delimiter {
    /// The text [`Delimiter::from_str`] reads back (`\t` for a tab).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b'\t' => f.write_str("\\t"),
            byte => write!(f, "{}", byte as char),
        }
    }
}

impl std::str::FromStr for Delimiter {
    type Err = String;

    fn from_str(text: &str) -> Result<Delimiter, String> {
        match text {
            "\\t" | "tab" => return Ok(Delimiter::TAB),
            _ => {}
        }
        match text.as_bytes() {
            [byte] if byte.is_ascii() && !matches!(byte, b'"' | b'\r' | b'\n') => Ok(Delimiter(*byte)),
            _ => Err(format!(
                "expected one ASCII character other than a quote or a line break, such as `,`, `;`, `|` \
                 or `\\t` (a tab), found {text:?}"
            )),
        }
    }
}

impl Serialize for Delimiter {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Delimiter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Delimiter, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How a file is encoded with the fitted state: the policies for malformed rows and for
/// domain ids train never had, and the delimiter of its CSV text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    pub bad_rows: BadRows,
    pub unknown_domain: UnknownDomain,
    /// The byte between CSV fields (Parquet files have none).
    pub delimiter: Delimiter,
}

impl From<BadRows> for EncodeOptions {
    fn from(bad_rows: BadRows) -> EncodeOptions {
        EncodeOptions { bad_rows, ..EncodeOptions::default() }
    }
}

/// Everything that can go wrong while reading data.
#[derive(Debug, Clone, PartialEq)]
pub enum DataError {
    /// A file could not be read.
    Io { path: PathBuf, message: String },
    /// The schema (or fitted state) is inconsistent.
    Schema(String),
    /// A column the schema names is not in a file's header.
    MissingColumn { file: PathBuf, column: String, close: Vec<String> },
    /// A row (or the header) is malformed; `line` is 1-based, the header is line 1.
    BadRow { file: PathBuf, line: u64, message: String },
    /// A row of a Parquet file is malformed; `row` is 1-based.
    BadParquetRow { file: PathBuf, row: u64, message: String },
    /// The parts of a split (a folder or a pattern of files) do not agree.
    Parts { file: PathBuf, message: String },
    /// A batch asked for a row the dataset does not have.
    RowIndex { index: usize, rows: usize },
}

impl DataError {
    pub(crate) fn io(path: &Path, message: &str) -> DataError {
        DataError::Io { path: path.to_path_buf(), message: message.to_string() }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io { path, message } => write!(f, "{}: {message}", path.display()),
            DataError::Schema(message) => write!(f, "data schema: {message}"),
            DataError::MissingColumn { file, column, close } => {
                write!(f, "{}: no column '{column}' in the header", file.display())?;
                if !close.is_empty() {
                    write!(f, " (close names: {})", close.join(", "))?;
                }
                Ok(())
            }
            DataError::BadRow { file, line, message } => write!(f, "{}:{line}: {message}", file.display()),
            DataError::BadParquetRow { file, row, message } => write!(f, "{}: row {row}: {message}", file.display()),
            DataError::Parts { file, message } => write!(f, "{}: {message}", file.display()),
            DataError::RowIndex { index, rows } => {
                write!(f, "row index {index} is out of range for a dataset of {rows} rows")
            }
        }
    }
}

impl std::error::Error for DataError {}
