//! The binary cache of a prepared dataset, written as the splits are encoded and read back
//! row by row: training and evaluation gather their batches from it ([`StoredRows`]), so
//! the encoded features never need to be resident.
//!
//! File layout (little-endian): magic `MDLDATA\0`, format version (u32), the 32-byte key;
//! then the records of train, valid and test, one fixed-size record per row; then the JSON
//! text of the metadata (the [`Fitted`] state and per-split source, row count and skipped
//! rows), its length (u64), and a CRC-32 of everything before the CRC.
//!
//! A record holds a row's arrays in a fixed order (categorical groups, sequence ids, numeric
//! groups, domain, labels, user) as in a [`Dataset`]. An id is stored as its column's local
//! id (the global id less the column's offset in its table; a sequence's padding as 0) in
//! 1, 2 or 4 bytes, whichever holds every id of the column's vocabulary (the domains for the
//! domain); numbers and labels as f32, the user id as u32. Sequence masks are not stored: a
//! mask is `id != 0`.
//!
//! A file is used only if the magic, version, key, checksum, every length and every id
//! range check out (one sequential pass over the file, which also reads the labels, domains
//! and users that metrics need in memory); anything else is reported as a reason and the
//! caller rebuilds it. A [`Writer`] writes to a temporary name in the cache folder, renamed
//! into place once complete, or to an unnamed temporary file (no cache folder), on a thread
//! of its own ([`WriteBehind`]); a cache file is synced to disk as it is written.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::dataset::{Batch, Dataset, Shape, SkippedRows};
use super::encode::{Fitted, SequenceTable};
use super::write_behind::WriteBehind;
use super::DataError;
use crate::tasks::LabelValues;

const MAGIC: &[u8; 8] = b"MDLDATA\0";
/// Bump when the file layout or the meaning of any encoded value changes (2: a number that
/// is not finite once normalised makes its row bad, so a split may encode differently;
/// 3: row-major records, written as the splits are encoded).
pub(crate) const FORMAT_VERSION: u32 = 3;
/// Magic, version and key.
const HEADER: u64 = 8 + 4 + 32;
/// Bytes read at a time when a file is checked or a range of rows is loaded.
const READ_BYTES: usize = 8 << 20;

#[derive(Serialize, Deserialize)]
struct Meta {
    fitted: Fitted,
    splits: Vec<SplitMeta>,
}

/// [`Meta`] as it is written, borrowing what it holds (the same JSON): a copy of the
/// fitted vocabularies only to serialise them was the largest block of a 100× replica's
/// preparation (their values and id index, 0.4 GB).
#[derive(Serialize)]
struct MetaRef<'a> {
    fitted: &'a Fitted,
    splits: Vec<&'a SplitMeta>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SplitMeta {
    source: String,
    rows: usize,
    skipped: SkippedRows,
}

/// The bytes of an id below `limit`.
fn id_width(limit: u64) -> usize {
    if limit <= 1 << 8 {
        1
    } else if limit <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The ids of one column of a record, stored as local ids: `id - base`, in as few bytes
/// as hold every local id of its vocabulary (`limit` of them). With `padding`, id 0 is
/// stored as 0 and the others from `base + 1` up (a sequence's items, whose padding is
/// the table's id 0 wherever the vocabulary starts).
#[derive(Clone, Debug, PartialEq)]
struct Ids {
    /// Ids of this column per row.
    per_row: usize,
    width: usize,
    base: u32,
    limit: u64,
    padding: bool,
}

impl Ids {
    fn new(per_row: usize, (base, limit): (u32, u64), padding: bool) -> Ids {
        Ids { per_row, width: id_width(limit), base, limit, padding }
    }

    fn bytes(&self) -> usize {
        self.per_row * self.width
    }

    fn local(&self, id: u32) -> u32 {
        if self.padding && id == 0 {
            0
        } else {
            id.wrapping_sub(self.base)
        }
    }

    fn global(&self, local: u32) -> u32 {
        if self.padding && local == 0 {
            0
        } else {
            self.base + local
        }
    }

    fn put(&self, ids: &[u32], out: &mut Vec<u8>) {
        match self.width {
            1 => out.extend(ids.iter().map(|&id| self.local(id) as u8)),
            2 => ids.iter().for_each(|&id| out.extend_from_slice(&(self.local(id) as u16).to_le_bytes())),
            _ => ids.iter().for_each(|&id| out.extend_from_slice(&self.local(id).to_le_bytes())),
        }
    }

    /// The local ids of `bytes` (this column of one record).
    fn locals<'b>(&self, bytes: &'b [u8]) -> impl Iterator<Item = u32> + 'b {
        let width = self.width;
        bytes.chunks_exact(width).map(move |b| match width {
            1 => b[0] as u32,
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        })
    }

    /// Appends the ids of `bytes` (this column of one record) to `out`.
    fn get(&self, bytes: &[u8], out: &mut Vec<u32>) {
        out.extend(self.locals(bytes).map(|local| self.global(local)));
    }

    fn in_range(&self, bytes: &[u8]) -> bool {
        self.locals(bytes).all(|local| (local as u64) < self.limit)
    }
}

fn put_floats(values: &[f32], out: &mut Vec<u8>) {
    values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
}

fn get_floats(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
}

/// Where each array of a row sits in its record (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RecordLayout {
    /// Per categorical group, per column.
    cat: Vec<Vec<Ids>>,
    /// Per sequence group: all its columns' slots.
    seq: Vec<Ids>,
    /// Numbers per row of each numeric group.
    num: Vec<usize>,
    domain: Ids,
    labels: usize,
    user: Ids,
    /// Bytes per record.
    bytes: usize,
}

impl RecordLayout {
    pub(crate) fn of(fitted: &Fitted) -> RecordLayout {
        let layout = fitted.layout();
        let shape = Shape::of(&fitted.schema);
        let cat: Vec<Vec<Ids>> = layout
            .categorical
            .iter()
            .map(|group| {
                group.offsets.iter().zip(&group.vocab_sizes).map(|(&o, &n)| Ids::new(1, (o, n as u64), false)).collect()
            })
            .collect();
        let seq: Vec<Ids> = shape
            .seq
            .iter()
            .zip(&layout.sequence)
            .map(|((columns, len), group)| {
                let space = match &group.table {
                    SequenceTable::Categorical { group: g, column } => layout
                        .categorical
                        .iter()
                        .find(|t| &t.name == g)
                        .and_then(|t| {
                            t.columns.iter().position(|c| c == column).map(|c| (t.offsets[c], t.vocab_sizes[c]))
                        })
                        .map_or((0, group.rows as u64), |(o, n)| (o, n as u64)),
                    SequenceTable::Own => (0, group.rows as u64),
                };
                Ids::new(columns * len, space, true)
            })
            .collect();
        let domain = Ids::new(shape.has_domain as usize, (0, fitted.domains as u64), false);
        let user = Ids { per_row: shape.has_user as usize, width: 4, base: 0, limit: u64::MAX, padding: false };
        let bytes = cat.iter().flatten().chain(&seq).map(Ids::bytes).sum::<usize>()
            + shape.num.iter().sum::<usize>() * 4
            + domain.bytes()
            + shape.tasks * 4
            + user.bytes();
        RecordLayout { cat, seq, num: shape.num, domain, labels: shape.tasks, user, bytes }
    }

    /// Appends every row of `data` as a record.
    pub(crate) fn put_rows(&self, data: &Dataset, out: &mut Vec<u8>) {
        out.reserve(data.rows * self.bytes);
        for row in 0..data.rows {
            self.put(data, row, out);
        }
    }

    /// Appends row `row` of `data` (a dataset in memory) as a record.
    fn put(&self, data: &Dataset, row: usize, out: &mut Vec<u8>) {
        for (columns, values) in self.cat.iter().zip(&data.cat) {
            let width = columns.len();
            for (ids, &id) in columns.iter().zip(&values[row * width..(row + 1) * width]) {
                ids.put(&[id], out);
            }
        }
        for (ids, values) in self.seq.iter().zip(&data.seq_ids) {
            ids.put(&values[row * ids.per_row..(row + 1) * ids.per_row], out);
        }
        for (&width, values) in self.num.iter().zip(&data.num) {
            put_floats(&values[row * width..(row + 1) * width], out);
        }
        self.domain.put(&data.domain[row * self.domain.per_row..(row + 1) * self.domain.per_row], out);
        put_floats(&data.labels[row * self.labels..(row + 1) * self.labels], out);
        self.user.put(&data.user[row * self.user.per_row..(row + 1) * self.user.per_row], out);
    }

    /// Appends the features of one record to the batch's arrays (its masks from its ids).
    fn get_features(&self, record: &[u8], batch: &mut Batch) {
        let mut at = 0;
        let mut next = |n: usize| {
            let bytes = &record[at..at + n];
            at += n;
            bytes
        };
        for (columns, out) in self.cat.iter().zip(batch.cat.iter_mut()) {
            for ids in columns {
                ids.get(next(ids.bytes()), out);
            }
        }
        for ((ids, out), mask) in self.seq.iter().zip(batch.seq_ids.iter_mut()).zip(batch.seq_mask.iter_mut()) {
            let start = out.len();
            ids.get(next(ids.bytes()), out);
            mask.extend(out[start..].iter().map(|&id| if id == 0 { 0.0 } else { 1.0 }));
        }
        for (&width, out) in self.num.iter().zip(batch.num.iter_mut()) {
            get_floats(next(width * 4), out);
        }
    }

    /// Checks one record (ids in range, labels ones their columns can hold) and appends its
    /// domain, labels and user to `columns`.
    fn check(&self, record: &[u8], tasks: &[LabelValues], columns: &mut Columns) -> Result<(), String> {
        let mut at = 0;
        let mut next = |n: usize| {
            let bytes = &record[at..at + n];
            at += n;
            bytes
        };
        for ids in self.cat.iter().flatten().chain(&self.seq) {
            if !ids.in_range(next(ids.bytes())) {
                return Err("an id is out of its table's range".into());
            }
        }
        next(self.num.iter().sum::<usize>() * 4);
        let domain = next(self.domain.bytes());
        if !self.domain.in_range(domain) {
            return Err("an id is out of its table's range".into());
        }
        self.domain.get(domain, &mut columns.domain);
        let start = columns.labels.len();
        get_floats(next(self.labels * 4), &mut columns.labels);
        if columns.labels[start..].iter().zip(tasks).any(|(&y, values)| !values.accepts(y)) {
            return Err("a label is not one its column can hold".into());
        }
        self.user.get(next(self.user.bytes()), &mut columns.user);
        Ok(())
    }
}

/// The per-row columns of a split kept in memory (metrics read them whole).
#[derive(Default)]
struct Columns {
    domain: Vec<u32>,
    labels: Vec<f32>,
    user: Vec<u32>,
}

/// The encoded rows of one split in a file, read a batch at a time.
pub struct StoredRows {
    file: Arc<File>,
    /// The file's name in messages.
    path: PathBuf,
    /// Where the split's first record starts.
    start: u64,
    rows: usize,
    layout: RecordLayout,
}

impl std::fmt::Debug for StoredRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredRows({} rows of {} bytes in {})", self.rows, self.layout.bytes, self.path.display())
    }
}

impl StoredRows {
    fn read_error(&self, e: std::io::Error) -> DataError {
        DataError::io(&self.path, &format!("cannot read the encoded rows: {e}"))
    }

    /// Appends the features of `rows` (each below the row count) to the batch's arrays.
    pub(crate) fn gather(&self, rows: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let bytes = self.layout.bytes;
        let mut records = vec![0u8; rows.len() * bytes];
        for (&row, record) in rows.iter().zip(records.chunks_exact_mut(bytes.max(1))) {
            self.file.read_exact_at(record, self.start + (row * bytes) as u64).map_err(|e| self.read_error(e))?;
        }
        if bytes > 0 {
            records.chunks_exact(bytes).for_each(|record| self.layout.get_features(record, batch));
        }
        Ok(())
    }

    /// Appends the features of a range of rows to the batch's arrays.
    pub(crate) fn gather_range(&self, rows: Range<usize>, batch: &mut Batch) -> Result<(), DataError> {
        let bytes = self.layout.bytes;
        if bytes == 0 {
            return Ok(());
        }
        let per_read = (READ_BYTES / bytes).max(1);
        let mut records = Vec::new();
        let mut row = rows.start;
        while row < rows.end {
            let n = per_read.min(rows.end - row);
            records.resize(n * bytes, 0);
            self.file.read_exact_at(&mut records, self.start + (row * bytes) as u64).map_err(|e| self.read_error(e))?;
            records.chunks_exact(bytes).for_each(|record| self.layout.get_features(record, batch));
            row += n;
        }
        Ok(())
    }
}

/// Where a [`Writer`] writes.
enum Output {
    /// The cache file, under a temporary name until it is complete, and the bytes written
    /// since it was last synced to disk.
    Cache(crate::files::AtomicFile, u64),
    /// An unnamed temporary file.
    Unnamed(File),
}

/// Bytes of the cache file written between syncs to disk: the file is synced as it is
/// written (by the writing thread), so that the sync before it is renamed into place, which
/// the preparation waits for, finds little left to write.
const SYNC_BYTES: u64 = 64 << 20;

/// Writes the encoded splits as they come (train, then valid, then test, block by block),
/// keeping in memory only the per-row columns metrics need; [`Writer::finish`] hands back
/// the three datasets reading their features from the file.
pub(crate) struct Writer {
    /// The output, written on a thread of its own.
    output: WriteBehind<Output>,
    /// The file's name (the cache file, or the temporary folder for an unnamed one).
    path: PathBuf,
    crc: crc32fast::Hasher,
    layout: RecordLayout,
    splits: Vec<(SplitMeta, Columns)>,
}

impl Write for Output {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Cache(file, unsynced) => {
                let written = file.write(bytes)?;
                *unsynced += written as u64;
                if *unsynced >= SYNC_BYTES {
                    file.sync_data()?;
                    *unsynced = 0;
                }
                Ok(written)
            }
            Output::Unnamed(file) => file.write(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Cache(file, _) => file.flush(),
            Output::Unnamed(file) => file.flush(),
        }
    }
}

/// An unnamed file in the temporary folder (removed from the folder at once: it lives as
/// long as its handle).
pub(crate) fn unnamed_file() -> Result<(File, PathBuf), DataError> {
    let folder = std::env::temp_dir();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let path = folder.join(format!(".mdl-rows.{}.{nanos}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| DataError::io(&path, &format!("cannot create a temporary file: {e}")))?;
    let _ = std::fs::remove_file(&path);
    Ok((file, folder))
}

impl Writer {
    /// A writer of the cache file `path` for `key`; with no path (or when the file cannot be
    /// created: the reason comes back) an unnamed temporary file.
    pub(crate) fn create(
        path: Option<&Path>,
        key: &[u8; 32],
        fitted: &Fitted,
    ) -> Result<(Writer, Option<String>), DataError> {
        let mut note = None;
        let mut output = None;
        if let Some(path) = path {
            let folder = path.parent().unwrap_or(Path::new("."));
            let created = std::fs::create_dir_all(folder)
                .map_err(|e| format!("cannot create {}: {e}", folder.display()))
                .and_then(|()| crate::files::AtomicFile::create(path));
            match created {
                Ok(file) => output = Some((Output::Cache(file, 0), path.to_path_buf())),
                Err(reason) => note = Some(reason),
            }
        }
        let (output, path) = match output {
            Some(output) => output,
            None => {
                let (file, folder) = unnamed_file()?;
                (Output::Unnamed(file), folder)
            }
        };
        let mut writer = Writer {
            output: WriteBehind::new(output),
            path,
            crc: crc32fast::Hasher::new(),
            layout: RecordLayout::of(fitted),
            splits: Vec::new(),
        };
        let mut header = Vec::with_capacity(HEADER as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(key);
        writer.write(header)?;
        Ok((writer, note))
    }

    fn write(&mut self, bytes: Vec<u8>) -> Result<(), DataError> {
        self.crc.update(&bytes);
        let written = self.output.write(bytes);
        written.map_err(|e| DataError::io(&self.path, &format!("cannot write the encoded rows: {e}")))
    }

    /// Starts the next split (train, valid, test in turn), named `source`.
    pub(crate) fn begin_split(&mut self, source: &str) {
        let meta = SplitMeta { source: source.to_string(), rows: 0, skipped: SkippedRows::default() };
        self.splits.push((meta, Columns::default()));
    }

    /// Appends the rows of `block` (encoded, in memory) to the split under way.
    pub(crate) fn write_block(&mut self, block: &Dataset) -> Result<(), DataError> {
        let mut records = Vec::new();
        self.layout.put_rows(block, &mut records);
        self.append(records, block)
    }

    /// How the rows are laid out in the file (to lay out blocks elsewhere for [`append`](Self::append)).
    pub(crate) fn layout(&self) -> &RecordLayout {
        &self.layout
    }

    /// Appends `block` to the split under way as `records`, its rows laid out by
    /// [`RecordLayout::put_rows`].
    pub(crate) fn append(&mut self, records: Vec<u8>, block: &Dataset) -> Result<(), DataError> {
        self.write(records)?;
        let (meta, columns) = self.splits.last_mut().expect("a split was begun");
        meta.rows += block.rows;
        columns.domain.extend_from_slice(&block.domain);
        columns.labels.extend_from_slice(&block.labels);
        columns.user.extend_from_slice(&block.user);
        Ok(())
    }

    /// Ends the split under way with the rows it skipped.
    pub(crate) fn end_split(&mut self, skipped: SkippedRows) {
        if let Some((meta, _)) = self.splits.last_mut() {
            meta.skipped = skipped;
        }
    }

    /// Writes the metadata and the checksum, renames a cache file into place, and returns
    /// the three splits reading their features from the file.
    pub(crate) fn finish(self, fitted: &Fitted) -> Result<[Dataset; 3], DataError> {
        let path = self.path.clone();
        let splits = self.finish_splits(fitted)?;
        splits.try_into().map_err(|_| DataError::io(&path, "three splits were not written"))
    }

    /// [`finish`](Self::finish) for any number of splits (one file encoded on its own).
    pub(crate) fn finish_splits(mut self, fitted: &Fitted) -> Result<Vec<Dataset>, DataError> {
        let splits = std::mem::take(&mut self.splits);
        let meta = MetaRef { fitted, splits: splits.iter().map(|(m, _)| m).collect() };
        // Serialised straight into the file in 1 MiB pieces (its length follows it), never
        // whole in memory: 0.13 GB of JSON for the 100× replica's vocabularies.
        let mut pieces = Pieces { writer: &mut self, piece: Vec::with_capacity(PIECE), length: 0, failed: None };
        let serialised = serde_json::to_writer(&mut pieces, &meta);
        let finished = std::io::Write::flush(&mut pieces);
        let (length, failed) = (pieces.length, pieces.failed.take());
        if let Some(e) = failed {
            return Err(e);
        }
        serialised
            .map_err(|e| e.to_string())
            .and(finished.map_err(|e| e.to_string()))
            .map_err(|e| DataError::io(&self.path, &format!("cannot serialise the metadata: {e}")))?;
        drop(meta);
        self.splits = splits;
        self.write(length.to_le_bytes().to_vec())?;
        let checksum = self.crc.clone().finalize().to_le_bytes();
        let output = self.output.finish();
        let output = output.map_err(|e| DataError::io(&self.path, &format!("cannot write the encoded rows: {e}")))?;
        let (file, path) = match output {
            Output::Cache(mut file, _) => {
                file.write_all(&checksum).map_err(|e| DataError::io(&self.path, &file.error(e)))?;
                file.commit().map_err(|e| DataError::io(&self.path, &e))?;
                let reopened = File::open(&self.path).map_err(|e| DataError::io(&self.path, &e.to_string()))?;
                (reopened, self.path)
            }
            Output::Unnamed(mut file) => {
                file.write_all(&checksum).map_err(|e| DataError::io(&self.path, &e.to_string()))?;
                (file, self.path)
            }
        };
        let file = Arc::new(file);
        let shape = Shape::of(&fitted.schema);
        let mut start = HEADER;
        let splits = self.splits.into_iter().map(|(meta, columns)| {
            let stored = StoredRows {
                file: file.clone(),
                path: path.clone(),
                start,
                rows: meta.rows,
                layout: self.layout.clone(),
            };
            start += (meta.rows * self.layout.bytes) as u64;
            stored_dataset(meta, columns, stored, &shape)
        });
        Ok(splits.collect())
    }
}

/// The size of the pieces [`Pieces`] hands to the writer.
const PIECE: usize = 1 << 20;

/// An `io::Write` that hands what is written to a cache [`Writer`] in pieces of [`PIECE`]
/// bytes, counting them; the writer's own error is kept (`failed`) to be returned as it is.
struct Pieces<'w> {
    writer: &'w mut Writer,
    piece: Vec<u8>,
    length: u64,
    failed: Option<DataError>,
}

impl std::io::Write for Pieces<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.piece.extend_from_slice(bytes);
        self.length += bytes.len() as u64;
        if self.piece.len() >= PIECE {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(PIECE));
        self.writer.write(piece).map_err(|e| {
            let message = e.to_string();
            self.failed = Some(e);
            std::io::Error::other(message)
        })
    }
}

fn stored_dataset(meta: SplitMeta, columns: Columns, stored: StoredRows, shape: &Shape) -> Dataset {
    Dataset {
        source: meta.source,
        rows: meta.rows,
        shape: shape.clone(),
        cat: Vec::new(),
        seq_ids: Vec::new(),
        seq_mask: Vec::new(),
        num: Vec::new(),
        domain: columns.domain,
        labels: columns.labels,
        user: columns.user,
        skipped: meta.skipped,
        stored: Some(Arc::new(stored)),
    }
}

/// Reads `buffer.len()` bytes at `offset`, failing with a reason.
fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> Result<(), String> {
    file.read_exact_at(buffer, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the file is truncated".to_string(),
        _ => format!("cannot read it: {e}"),
    })
}

/// Opens the cache file `path` written for `key` and checks all of it (see the module
/// doc), or says why it cannot be used.
pub(crate) fn open(path: &Path, key: &[u8; 32]) -> Result<(Fitted, [Dataset; 3]), String> {
    let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read it: {e}"))?.len();
    if len < HEADER + 12 {
        return Err("the file is truncated".into());
    }
    let mut header = [0u8; HEADER as usize];
    read_at(&file, &mut header, 0)?;
    if &header[..8] != MAGIC {
        return Err("not an mdl data cache file".into());
    }
    if header[8..12] != FORMAT_VERSION.to_le_bytes() {
        return Err("written by another cache format version".into());
    }
    if &header[12..] != key {
        return Err("the key inside the file does not match".into());
    }
    let mut trailer = [0u8; 12];
    read_at(&file, &mut trailer, len - 12)?;
    let meta_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let stored_crc = &trailer[8..];
    let meta_start = (len - 12).checked_sub(meta_len).filter(|&s| s >= HEADER).ok_or("bad metadata length")?;
    let mut json = vec![0u8; usize::try_from(meta_len).map_err(|_| "bad metadata length")?];
    read_at(&file, &mut json, meta_start)?;
    let meta: Meta = serde_json::from_slice(&json).map_err(|e| format!("bad metadata: {e}"))?;
    let fitted = meta.fitted;
    fitted.check().map_err(|e| e.to_string())?;
    if meta.splits.len() != 3 {
        return Err("the metadata does not describe three splits".into());
    }
    let layout = RecordLayout::of(&fitted);
    let records = meta
        .splits
        .iter()
        .try_fold(0u64, |n, s| (s.rows as u64).checked_mul(layout.bytes as u64).and_then(|b| n.checked_add(b)))
        .ok_or("a split is too long")?;
    if HEADER.checked_add(records) != Some(meta_start) {
        return Err("the splits' lengths do not match the file's".into());
    }
    let tasks: Vec<LabelValues> = fitted.schema.labels.iter().map(|t| t.values).collect();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut columns = Vec::with_capacity(3);
    let mut offset = HEADER;
    let mut buffer = Vec::new();
    for split in &meta.splits {
        let mut split_columns = Columns::default();
        let per_read = (READ_BYTES / layout.bytes.max(1)).max(1);
        let mut row = 0;
        while row < split.rows && layout.bytes > 0 {
            let n = per_read.min(split.rows - row);
            buffer.resize(n * layout.bytes, 0);
            read_at(&file, &mut buffer, offset)?;
            crc.update(&buffer);
            for record in buffer.chunks_exact(layout.bytes) {
                layout.check(record, &tasks, &mut split_columns)?;
            }
            offset += buffer.len() as u64;
            row += n;
        }
        columns.push(split_columns);
    }
    crc.update(&json);
    crc.update(&trailer[..8]);
    if crc.finalize().to_le_bytes() != stored_crc {
        return Err("the checksum does not match (corrupt or truncated file)".into());
    }
    let file = Arc::new(file);
    let shape = Shape::of(&fitted.schema);
    let mut start = HEADER;
    let mut datasets = Vec::with_capacity(3);
    for (split, columns) in meta.splits.into_iter().zip(columns) {
        let stored = StoredRows {
            file: file.clone(),
            path: path.to_path_buf(),
            start,
            rows: split.rows,
            layout: layout.clone(),
        };
        start += (split.rows * layout.bytes) as u64;
        let dataset = stored_dataset(split, columns, stored, &shape);
        if !dataset.lengths_match() {
            return Err("array lengths do not match the schema".into());
        }
        datasets.push(dataset);
    }
    let [train, valid, test]: [Dataset; 3] =
        datasets.try_into().map_err(|_| "the file does not hold three splits".to_string())?;
    Ok((fitted, [train, valid, test]))
}
