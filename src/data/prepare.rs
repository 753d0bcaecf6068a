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
use super::dataset::Dataset;
use super::encode::Fitted;
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
    /// Threads that read train (0: the machine's cores); the result does not depend on it.
    pub threads: usize,
}

impl PrepareOptions {
    fn encode(&self) -> EncodeOptions {
        EncodeOptions { bad_rows: self.bad_rows, unknown_domain: self.unknown_domain, delimiter: self.delimiter }
    }
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

/// The three encoded splits of a [`Prepared`], as a run reads them: without the fitted
/// encoders, which a run writes to its `fitted.json` and then lets go (the 100× replica's
/// vocabularies of 4.2M values held about 0.4 GB through training otherwise).
#[derive(Clone, Copy, Debug)]
pub struct Splits<'a> {
    pub train: &'a Dataset,
    pub valid: &'a Dataset,
    pub test: &'a Dataset,
}

impl Prepared {
    pub fn splits(&self) -> Splits<'_> {
        Splits { train: &self.train, valid: &self.valid, test: &self.test }
    }
}

/// The SHA-256 of a file's content and its length, read in chunks.
fn file_digest(path: &Path) -> Result<([u8; 32], u64), DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, &e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut length = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buffer).map_err(|e| DataError::io(path, &e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        length += n as u64;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&hasher.finalize());
    Ok((digest, length))
}

fn cache_key(schema: &Schema, options: &PrepareOptions, splits: &[Vec<PathBuf>; 3]) -> Result<[u8; 32], DataError> {
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
        for part in parts {
            let (digest, length) = file_digest(part)?;
            hasher.update(length.to_le_bytes());
            hasher.update(digest);
        }
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&hasher.finalize());
    Ok(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads, fits and encodes train, valid and test with `schema`, or loads the same result from
/// the cache. Vocabularies, normalisers and the domain count come from train only.
///
/// The splits are read block by block and written to the cache file as they are encoded
/// ([`super::ingest`]); the datasets returned read their features from it. Without a cache
/// ([`CacheMode::Off`]) they are written to an unnamed temporary file and then read into
/// memory.
pub fn prepare(schema: &Schema, paths: &SplitPaths, options: &PrepareOptions) -> Result<Prepared, DataError> {
    let start = Instant::now();
    schema.validate()?;
    let parts =
        [super::source::parts(&paths.train)?, super::source::parts(&paths.valid)?, super::source::parts(&paths.test)?];
    for part in parts.iter().flatten() {
        std::fs::metadata(part).map_err(|e| DataError::io(part, &e.to_string()))?;
    }
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
    let mut key = [0u8; 32];
    if let Some(folder) = &cache_folder {
        key = cache_key(schema, options, &parts)?;
        let file = folder.join(format!("{}.mdldata", hex(&key[..16])));
        stats.cache_key = Some(hex(&key));
        // What writers killed before their rename left behind.
        crate::files::remove_stale_temporaries(folder, true);
        stats.hash_seconds = start.elapsed().as_secs_f64();
        if file.exists() {
            let cache_start = Instant::now();
            let loaded = cache::open(&file, &key);
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
    }

    let parse_start = Instant::now();
    let (fitted, [train, valid, test], not_written) = super::ingest::prepare_streaming(
        schema,
        paths,
        options.encode(),
        stats.cache_file.as_deref(),
        &key,
        super::ingest::Reading {
            threads: match options.threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            stretch_bytes: super::ingest::STRETCH_BYTES,
            block_rows: super::ingest::BLOCK_ROWS,
        },
    )?;
    stats.parse_seconds = parse_start.elapsed().as_secs_f64();
    stats.cache_written = stats.cache_file.is_some() && not_written.is_none();
    if let Some(reason) = not_written {
        let note = format!("cache file not written: {reason}");
        stats.cache_note = Some(match stats.cache_note.take() {
            Some(previous) => format!("{previous}; {note}"),
            None => note,
        });
    }
    let (train, valid, test) = match options.cache {
        CacheMode::Off => (train.resident()?, valid.resident()?, test.resident()?),
        _ => (train, valid, test),
    };
    stats.total_seconds = start.elapsed().as_secs_f64();
    Ok(Prepared { fitted, train, valid, test, stats })
}
