//! [`prepare`]: train/valid/test files → fitted vocabularies and encoded splits, through the
//! binary cache.
//!
//! A split is a file, a folder of part files or a glob pattern ([`super::source::parts`]);
//! each part is CSV, CSV.gz or Parquet.
//!
//! The cache key is a SHA-256 over the cache format version, the schema (as JSON), the options
//! that change the result (bad-row policy, the unknown-domain policy where it is not
//! `error`, the delimiter where it is not `,`) and each part's length and content hash (with
//! the number of parts where a split has more than one), so a changed file or schema never
//! reuses a stale cache. Cache files live in
//! [`CacheMode::Default`]'s folder `$MDL_CACHE_DIR` or `./.mdl-cache/`, or in an explicit one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::cache;
use super::csv::read_bytes;
use super::dataset::Dataset;
use super::encode::{fit_inputs, Fitted, Input};
use super::schema::Schema;
use super::{BadRows, DataError, Delimiter, EncodeOptions, UnknownDomain};

/// The three files of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPaths {
    pub train: PathBuf,
    pub valid: PathBuf,
    pub test: PathBuf,
}

impl SplitPaths {
    /// `train.csv.gz`, `valid.csv.gz` and `test.csv.gz` in `folder`.
    pub fn in_folder(folder: &Path) -> SplitPaths {
        SplitPaths {
            train: folder.join("train.csv.gz"),
            valid: folder.join("valid.csv.gz"),
            test: folder.join("test.csv.gz"),
        }
    }
}

/// Where (and whether) the binary cache is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `$MDL_CACHE_DIR` if set, else `.mdl-cache/` in the current directory.
    #[default]
    Default,
    /// This folder.
    Folder(PathBuf),
    /// No cache: always parse, never write.
    Off,
}

impl CacheMode {
    fn folder(&self) -> Option<PathBuf> {
        match self {
            CacheMode::Default => Some(
                std::env::var_os("MDL_CACHE_DIR")
                    .filter(|v| !v.is_empty())
                    .map_or_else(|| PathBuf::from(".mdl-cache"), PathBuf::from),
            ),
            CacheMode::Folder(folder) => Some(folder.clone()),
            CacheMode::Off => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareOptions {
    pub bad_rows: BadRows,
    pub cache: CacheMode,
    /// How valid and test encode a domain id train never had.
    pub unknown_domain: UnknownDomain,
    /// The byte between CSV fields.
    pub delimiter: Delimiter,
}

impl PrepareOptions {
    fn encode(&self) -> EncodeOptions {
        EncodeOptions { bad_rows: self.bad_rows, unknown_domain: self.unknown_domain, delimiter: self.delimiter }
    }
}

/// The files of one split, read: each part's path and bytes.
type RawSplit = Vec<(PathBuf, Vec<u8>)>;

fn read_split(path: &Path) -> Result<RawSplit, DataError> {
    super::source::parts(path)?.into_iter().map(|part| read_bytes(&part).map(|bytes| (part, bytes))).collect()
}

/// The split's parts parsed ([`Input::new`]).
fn inputs(raw: RawSplit) -> Result<Vec<Input>, DataError> {
    raw.into_iter().map(|(path, bytes)| Input::new(&path, bytes)).collect()
}

impl PrepareStats {
    /// How the splits were obtained, for a log: `cache hit`, or `parsed` with why a cache
    /// file was rebuilt or not written, and whether it was written.
    pub fn cache_summary(&self) -> String {
        if self.cache_hit {
            return "cache hit".into();
        }
        let mut parts = vec!["parsed".to_string()];
        parts.extend(self.cache_note.clone());
        if self.cache_written {
            parts.push("cache written".into());
        } else if self.cache_file.is_none() {
            parts.push("no cache".into());
        }
        parts.join("; ")
    }
}

/// How a [`prepare`] call went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrepareStats {
    /// Whether the splits were loaded from the cache instead of parsed.
    pub cache_hit: bool,
    /// The cache file used or written (None with [`CacheMode::Off`]).
    pub cache_file: Option<PathBuf>,
    /// The cache key (hex), which names the data's content: a run folder's manifest
    /// records it, and `--resume` checks it (None with [`CacheMode::Off`]).
    pub cache_key: Option<String>,
    /// Why a cache file was not used or not written, if that happened.
    pub cache_note: Option<String>,
    /// Whether this call wrote the cache file.
    pub cache_written: bool,
    /// Reading the input files and hashing them for the key.
    pub hash_seconds: f64,
    /// Decompressing, parsing and encoding (0 on a cache hit).
    pub parse_seconds: f64,
    /// Reading and checking (hit) or writing (miss) the cache file.
    pub cache_seconds: f64,
    /// The whole call.
    pub total_seconds: f64,
}

/// The prepared dataset: the fitted state (schema, vocabularies, normalisers, domain count)
/// and the three encoded splits.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub fitted: Fitted,
    pub train: Dataset,
    pub valid: Dataset,
    pub test: Dataset,
    pub stats: PrepareStats,
}

fn cache_key(schema: &Schema, options: &PrepareOptions, splits: &[RawSplit; 3]) -> Result<[u8; 32], DataError> {
    let schema_json =
        serde_json::to_vec(schema).map_err(|e| DataError::Schema(format!("the schema cannot be serialised: {e}")))?;
    let mut hasher = Sha256::new();
    hasher.update(b"mdl data cache\0");
    hasher.update(cache::FORMAT_VERSION.to_le_bytes());
    hasher.update((schema_json.len() as u64).to_le_bytes());
    hasher.update(&schema_json);
    hasher.update([options.bad_rows as u8]);
    if let UnknownDomain::Fallback(domain) = options.unknown_domain {
        hasher.update(b"unknown_domain\0");
        hasher.update(domain.to_le_bytes());
    }
    if !options.delimiter.is_comma() {
        hasher.update(b"delimiter\0");
        hasher.update([options.delimiter.byte()]);
    }
    for parts in splits {
        // A split of one file is hashed as it always was (so caches made before parts were
        // read stay valid); one of several parts says how many first.
        if parts.len() != 1 {
            hasher.update(b"parts\0");
            hasher.update((parts.len() as u64).to_le_bytes());
        }
        for (_, bytes) in parts {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(Sha256::digest(bytes));
        }
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&hasher.finalize());
    Ok(key)
}

fn thread_failed(what: &str) -> DataError {
    DataError::Schema(format!("{what} stopped unexpectedly (a worker thread panicked)"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads, fits and encodes train, valid and test with `schema`, or loads the same result from
/// the cache. Vocabularies, normalisers and the domain count come from train only.
pub fn prepare(schema: &Schema, paths: &SplitPaths, options: &PrepareOptions) -> Result<Prepared, DataError> {
    let start = Instant::now();
    schema.validate()?;
    let raw = [read_split(&paths.train)?, read_split(&paths.valid)?, read_split(&paths.test)?];
    let cache_folder = options.cache.folder();
    let mut stats = PrepareStats {
        cache_hit: false,
        cache_file: None,
        cache_key: None,
        cache_note: None,
        cache_written: false,
        hash_seconds: 0.0,
        parse_seconds: 0.0,
        cache_seconds: 0.0,
        total_seconds: 0.0,
    };
    let mut key = None;
    if let Some(folder) = &cache_folder {
        let k = cache_key(schema, options, &raw)?;
        let file = folder.join(format!("{}.mdldata", hex(&k[..16])));
        stats.cache_key = Some(hex(&k));
        // What writers killed before their rename left behind.
        crate::files::remove_stale_temporaries(folder, true);
        stats.hash_seconds = start.elapsed().as_secs_f64();
        if file.exists() {
            let cache_start = Instant::now();
            let loaded = std::fs::read(&file).map_err(|e| e.to_string()).and_then(|bytes| cache::decode(&k, &bytes));
            stats.cache_seconds = cache_start.elapsed().as_secs_f64();
            match loaded {
                Ok((fitted, [mut train, mut valid, mut test])) => {
                    // Same content, possibly under other names: report the names used now.
                    train.source = paths.train.display().to_string();
                    valid.source = paths.valid.display().to_string();
                    test.source = paths.test.display().to_string();
                    stats.cache_hit = true;
                    stats.cache_file = Some(file);
                    stats.total_seconds = start.elapsed().as_secs_f64();
                    return Ok(Prepared { fitted, train, valid, test, stats });
                }
                Err(reason) => stats.cache_note = Some(format!("cache file rebuilt: {reason}")),
            }
        }
        stats.cache_file = Some(file);
        key = Some(k);
    }

    let parse_start = Instant::now();
    let [train_raw, valid_raw, test_raw] = raw;
    // Decompress valid and test while train is read and fitted...
    let (fitted_train, valid_inputs, test_inputs) = std::thread::scope(|scope| {
        let other_inputs = scope.spawn(|| (inputs(valid_raw), inputs(test_raw)));
        let fitted_train = inputs(train_raw)
            .and_then(|train| fit_inputs(schema, &paths.train, &train, (options.bad_rows, options.delimiter)));
        let (valid_inputs, test_inputs) = other_inputs.join().map_err(|_| thread_failed("reading valid and test"))?;
        Ok::<_, DataError>((fitted_train, valid_inputs, test_inputs))
    })?;
    let (fitted, train) = fitted_train?;
    let (valid_inputs, test_inputs) = (valid_inputs?, test_inputs?);
    // ...then encode them side by side (they only read the fitted state).
    let (valid, test) = std::thread::scope(|scope| {
        let valid = scope.spawn(|| fitted.encode_inputs(&paths.valid, &valid_inputs, options.encode()));
        let test = fitted.encode_inputs(&paths.test, &test_inputs, options.encode());
        let valid = valid.join().map_err(|_| thread_failed("encoding valid"))?;
        Ok::<_, DataError>((valid?, test?))
    })?;
    drop((valid_inputs, test_inputs));
    stats.parse_seconds = parse_start.elapsed().as_secs_f64();

    if let (Some(key), Some(file)) = (key, &stats.cache_file) {
        let cache_start = Instant::now();
        let written = cache::encode(&key, &fitted, [&train, &valid, &test])
            .and_then(|bytes| cache::write_atomically(file, &bytes));
        stats.cache_written = written.is_ok();
        if let Err(reason) = written {
            let note = format!("cache file not written: {reason}");
            stats.cache_note = Some(match stats.cache_note.take() {
                Some(previous) => format!("{previous}; {note}"),
                None => note,
            });
        }
        stats.cache_seconds = cache_start.elapsed().as_secs_f64();
    }
    stats.total_seconds = start.elapsed().as_secs_f64();
    Ok(Prepared { fitted, train, valid, test, stats })
}
