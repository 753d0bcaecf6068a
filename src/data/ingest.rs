//! Streaming preparation: the splits are read block by block ([`SplitReader`]), never whole,
//! and written to the cache file as they are encoded ([`cache::Writer`]), so memory does not
//! grow with the rows beyond the per-row columns metrics keep (domain, labels, user).
//!
//! Train is read once (the unknown-domain policy does not apply to it), on every thread:
//! each worker encodes stretches of the text with provisional ids of its own (in first-seen
//! order, [`FitIds`]) and counts the values of the rows it kept, while the numeric statistics
//! are gathered in input order; the blocks are spilled to an unnamed temporary file with the
//! worker that encoded them (written by a thread of its own, [`WriteBehind`], as the cache
//! file is). The workers' values and counts are then merged, the vocabularies and normalisers fitted from them (a `standard` column's squares from a
//! second pass over the spill), the spilled blocks rewritten with the final ids and
//! normalised numbers into the cache (laid out on every thread, written in order), and
//! valid and test encoded with the fitted state. The result is the same, value for value,
//! as encoding each split whole, and the cache file the same byte for byte whatever the
//! number of threads.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use super::cache::{self, unnamed_file};
use super::dataset::{Dataset, Shape, SkippedRows};
use super::encode::{Columns, FitIds, Fitted, IdSource, NumericColumns, RawSplit};
use super::prepare::SplitPaths;
use super::schema::Schema;
use super::stream::SplitReader;
use super::write_behind::WriteBehind;
use super::{DataError, EncodeOptions};

/// Rows encoded at a time where a block is read by one thread (valid, test, Parquet parts).
pub(super) const BLOCK_ROWS: usize = 1 << 15;
/// Bytes of CSV text each thread encodes at a time in train's first pass.
pub(super) const STRETCH_BYTES: usize = 4 << 20;

/// Provisionally encoded train blocks in an unnamed temporary file (written on a thread of
/// its own), read back in order.
struct Spill {
    /// The file while blocks are written to it.
    writing: Option<WriteBehind<File>>,
    /// The file once every block is written.
    written: Option<File>,
    folder: PathBuf,
    shape: Shape,
}

fn put_u32s(values: &[u32], out: &mut Vec<u8>) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

fn get_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// A spilled block as read back: the worker whose ids it holds, its rows, its arrays.
struct SpilledBlock {
    worker: usize,
    rows: usize,
    body: Vec<u8>,
}

/// Bytes before a spilled block's arrays: its worker, rows and the arrays' length (u64 each).
const SPILL_HEADER: usize = 24;

impl Spill {
    fn new(schema: &Schema) -> Result<Spill, DataError> {
        let (file, folder) = unnamed_file()?;
        Ok(Spill { writing: Some(WriteBehind::new(file)), written: None, folder, shape: Shape::of(schema) })
    }

    fn error(&self, e: std::io::Error) -> DataError {
        DataError::io(&self.folder, &format!("cannot spill the encoded train rows to a temporary file: {e}"))
    }

    /// A block as spilled: its worker, row count and byte length, then each array's elements.
    fn encode(shape: &Shape, worker: usize, raw: &RawSplit) -> Vec<u8> {
        // At most every slot of every sequence: reserved once, so the block is never copied
        // to a larger buffer (pages never written are never touched).
        let per_row = 4 * shape.cat.iter().sum::<usize>()
            + shape.seq.iter().map(|(columns, len)| 4 * columns * (1 + len)).sum::<usize>()
            + 8 * shape.num.iter().sum::<usize>()
            + 4 * (shape.has_domain as usize + shape.tasks + shape.has_user as usize);
        let mut out = Vec::with_capacity(SPILL_HEADER + raw.rows * per_row);
        out.extend_from_slice(&(worker as u64).to_le_bytes());
        out.extend_from_slice(&(raw.rows as u64).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        raw.cat.iter().for_each(|ids| put_u32s(ids, &mut out));
        // A sequence as its item count and items: they fill the last slots (right-aligned).
        for (ids, (_, len)) in raw.seq_ids.iter().zip(&shape.seq) {
            for slots in ids.chunks_exact((*len).max(1)) {
                let items = slots.iter().position(|&id| id != FitIds::SEQUENCE_PAD).map_or(0, |first| len - first);
                out.extend_from_slice(&(items as u32).to_le_bytes());
                put_u32s(&slots[len - items..], &mut out);
            }
        }
        raw.num.iter().flatten().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        put_u32s(&raw.domain, &mut out);
        raw.labels.iter().for_each(|y| out.extend_from_slice(&y.to_le_bytes()));
        put_u32s(&raw.user, &mut out);
        let body = (out.len() - SPILL_HEADER) as u64;
        out[16..SPILL_HEADER].copy_from_slice(&body.to_le_bytes());
        out
    }

    fn write(&mut self, block: Vec<u8>) -> Result<(), DataError> {
        let written = match &mut self.writing {
            Some(writing) => writing.write(block),
            None => Err(std::io::Error::other("the spill was already read back")),
        };
        written.map_err(|e| self.error(e))
    }

    /// The arrays of a spilled block.
    fn decode(&self, schema: &Schema, block: &SpilledBlock) -> RawSplit {
        let (shape, rows, body) = (&self.shape, block.rows, &block.body);
        let mut at = 0;
        let mut next = |n: usize| {
            let bytes = &body[at..at + n];
            at += n;
            bytes
        };
        let mut raw = RawSplit::with_capacity(schema, 0);
        raw.rows = rows;
        for (ids, width) in raw.cat.iter_mut().zip(&shape.cat) {
            *ids = get_u32s(next(rows * width * 4));
        }
        for (ids, (columns, len)) in raw.seq_ids.iter_mut().zip(&shape.seq) {
            ids.reserve(rows * columns * len);
            for _ in 0..rows * columns {
                let count = next(4);
                let items = (u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize).min(*len);
                ids.resize(ids.len() + len - items, FitIds::SEQUENCE_PAD);
                ids.extend(get_u32s(next(items * 4)));
            }
        }
        for (values, width) in raw.num.iter_mut().zip(&shape.num) {
            let bytes = next(rows * width * 8);
            *values = bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        }
        raw.domain = get_u32s(next(rows * shape.has_domain as usize * 4));
        let labels = next(rows * shape.tasks * 4);
        raw.labels = labels.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        raw.user = get_u32s(next(rows * shape.has_user as usize * 4));
        raw
    }

    /// Hands the blocks written to `each`, in order, up to `batch` at a time.
    fn each(
        &mut self,
        batch: usize,
        mut each: impl FnMut(&Spill, Vec<SpilledBlock>) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        if let Some(writing) = self.writing.take() {
            self.written = Some(writing.finish().map_err(|e| self.error(e))?);
        }
        let folder = self.folder.clone();
        let failed =
            |e: std::io::Error| DataError::io(&folder, &format!("cannot read back the spilled train rows: {e}"));
        let mut file = self.written.as_ref().expect("the spill is written").try_clone().map_err(failed)?;
        file.rewind().map_err(failed)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut header = [0u8; SPILL_HEADER];
        let mut ended = false;
        while !ended {
            let mut blocks = Vec::with_capacity(batch);
            while blocks.len() < batch.max(1) {
                match reader.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        ended = true;
                        break;
                    }
                    Err(e) => return Err(failed(e)),
                }
                let word =
                    |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize;
                let mut body = Vec::with_capacity(word(2));
                (&mut reader).take(word(2) as u64).read_to_end(&mut body).map_err(failed)?;
                if body.len() < word(2) {
                    return Err(failed(std::io::ErrorKind::UnexpectedEof.into()));
                }
                blocks.push(SpilledBlock { worker: word(0), rows: word(1), body });
            }
            if !blocks.is_empty() {
                each(&*self, blocks)?;
            }
        }
        Ok(())
    }
}

/// Encodes the split `path` block by block with `ids` and hands each block to `each`;
/// returns the rows it skipped.
fn read_blocks<I: IdSource>(
    schema: &Schema,
    (path, block_rows): (&Path, usize),
    encode: EncodeOptions,
    ids: &mut I,
    mut each: impl FnMut(RawSplit) -> Result<(), DataError>,
) -> Result<SkippedRows, DataError> {
    let mut reader = SplitReader::open(path, Columns::All, encode, Vec::new())?;
    let mut skipped = SkippedRows::default();
    loop {
        let mut raw = RawSplit::with_capacity(schema, block_rows);
        let more = reader.next_block(schema, ids, &mut raw, block_rows, |_, _, _| {})?;
        skipped.absorb(&raw.skipped);
        if raw.rows > 0 {
            each(raw)?;
        }
        if !more {
            return Ok(skipped);
        }
    }
}

/// Runs `work` on each item on a thread of its own (inline for one) and returns the
/// results in order.
fn each_on_a_thread<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.into_iter().map(work).collect();
    }
    let work = &work;
    std::thread::scope(|scope| {
        let running: Vec<_> = items.into_iter().map(|item| scope.spawn(move || work(item))).collect();
        running.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// How train is read in its first pass: threads, and (tests) how much each reads at a time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reading {
    /// Threads that encode train (at least 1).
    pub threads: usize,
    /// CSV text per thread at a time.
    pub stretch_bytes: usize,
    /// Rows of a block read by one thread.
    pub block_rows: usize,
}

/// Reads, fits and encodes the three splits into the cache file `cache_file` (or an unnamed
/// temporary file without one, or when it cannot be created: the reason comes back) and
/// returns the fitted state and the splits reading their features from that file.
pub(super) fn prepare_streaming(
    schema: &Schema,
    paths: &SplitPaths,
    encode: EncodeOptions,
    cache_file: Option<&Path>,
    key: &[u8; 32],
    reading: Reading,
) -> Result<(Fitted, [Dataset; 3], Option<String>), DataError> {
    let threads = reading.threads.max(1);
    // Train, once: provisional ids per worker, counts and numeric statistics, the blocks
    // spilled.
    let mut workers: Vec<FitIds> = (0..threads).map(|_| FitIds::new(schema)).collect();
    let mut numbers = NumericColumns::new(schema);
    let mut spill = Spill::new(schema)?;
    let mut reader = SplitReader::open(&paths.train, Columns::All, encode, Vec::new())?;
    let mut train_skipped = SkippedRows::default();
    loop {
        let blocks = reader.next_blocks_parallel(schema, &mut workers, (reading.stretch_bytes, reading.block_rows))?;
        if blocks.is_empty() {
            break;
        }
        // Each block is counted by its worker (one block per worker) and laid out for the spill.
        let mut free: Vec<Option<&mut FitIds>> = workers.iter_mut().map(Some).collect();
        let jobs: Vec<_> = blocks
            .into_iter()
            .map(|(worker, raw)| (worker, free[worker].take().expect("one block per worker"), raw))
            .collect();
        let shape = &spill.shape;
        let spilled = each_on_a_thread(jobs, |(worker, ids, raw)| {
            ids.count(&raw);
            let bytes = Spill::encode(shape, worker, &raw);
            (raw, bytes)
        });
        for (raw, bytes) in spilled {
            train_skipped.absorb(&raw.skipped);
            if raw.rows > 0 {
                numbers.add(&raw);
                spill.write(bytes)?;
            }
        }
    }
    let squares = |numbers: &mut NumericColumns| {
        spill.each(1, |spill, blocks| {
            blocks.iter().for_each(|block| numbers.add_squares(&spill.decode(schema, block)));
            Ok(())
        })
    };
    let (fitted, remaps) = FitIds::fit_parts(workers, schema, squares, numbers)?;

    let (mut writer, note) = cache::Writer::create(cache_file, key, &fitted)?;
    writer.begin_split(&paths.train.display().to_string());
    spill.each(threads, |spill, blocks| {
        let layout = writer.layout();
        let laid_out = each_on_a_thread(blocks, |block| {
            let mut raw = spill.decode(schema, &block);
            remaps[block.worker].apply(&mut raw);
            let data = fitted.finish_unmasked(raw, &paths.train);
            let mut records = Vec::new();
            layout.put_rows(&data, &mut records);
            (records, data)
        });
        laid_out.into_iter().try_for_each(|(records, data)| writer.append(records, &data))
    })?;
    drop(spill);
    writer.end_split(train_skipped);

    for path in [&paths.valid, &paths.test] {
        writer.begin_split(&path.display().to_string());
        let mut ids = fitted.apply_ids(encode.unknown_domain)?;
        let skipped = read_blocks(schema, (path, reading.block_rows), encode, &mut ids, |raw| {
            writer.write_block(&fitted.finish_unmasked(raw, path))
        })?;
        writer.end_split(skipped);
    }
    let splits = writer.finish(&fitted)?;
    Ok((fitted, splits, note))
}

impl Fitted {
    /// Reads and encodes a file as [`encode_file`](Self::encode_file) does (a folder or
    /// pattern of parts, CSV, CSV.gz or Parquet, or stdin for `-`), but block by block into
    /// an unnamed temporary file: the dataset reads its features from that file, so memory
    /// holds only the per-row columns metrics need (domain, labels, user), whatever the
    /// file's size.
    pub fn encode_file_stored(&self, file: &Path, options: impl Into<EncodeOptions>) -> Result<Dataset, DataError> {
        encode_stored(self, file, options.into(), BLOCK_ROWS)
    }
}

/// [`Fitted::encode_file_stored`] with `block_rows` rows at a time.
fn encode_stored(
    fitted: &Fitted,
    file: &Path,
    options: EncodeOptions,
    block_rows: usize,
) -> Result<Dataset, DataError> {
    let name = super::csv::display_name(file);
    let (mut writer, _) = cache::Writer::create(None, &[0; 32], fitted)?;
    writer.begin_split(&name.display().to_string());
    let mut ids = fitted.apply_ids(options.unknown_domain)?;
    let skipped = read_blocks(&fitted.schema, (file, block_rows), options, &mut ids, |raw| {
        writer.write_block(&fitted.finish_unmasked(raw, &name))
    })?;
    writer.end_split(skipped);
    let mut splits = writer.finish_splits(fitted)?;
    Ok(splits.pop().expect("one split was written"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode::{fit_inputs, Input};
    use crate::data::{BadRows, Delimiter, UnknownDomain};

    const SCHEMA: &str = "
features:
  - { kind: categorical, name: ids, columns: [item, color] }
  - { kind: sequence, name: hist, columns: [hist], max_len: 2, vocab: item }
  - { kind: sequence, name: tags, columns: [tags], max_len: 3, min_count: 2 }
  - { kind: numeric, name: x, columns: [x, y], normalize: standard }
  - { kind: numeric, name: z, columns: [z], normalize: minmax }
domain: { column: domain }
labels: [ { name: click, column: label } ]
user: user
";

    const HEADER: &str = "label,user,item,color,hist,tags,x,y,z,domain\n";
    /// Quoted fields (one over three lines, so that stretches cut at line ends start inside
    /// it), a missing number, an empty cell, a malformed row (line 6), repeats.
    const TRAIN: &str =
        "1,u1,a,red,,t1 t2,0.5,1,3,0\n0,u2,\"b,1\",blue,a,t2,1.5,,4,1\n1,u1,c,,a \"\"x\"\",t1,2.5,2,5,1\n\
        0,u3,a,red,c b,t3 t1,-1,7,,0\n1,u2,b,x\n1,u4,d,red,a a a,t2 t2,4,0.25,1,2\n0,u1,a,blue,d,,3,3,3,0\n\
        1,u5,\"e\n1,u6,f\n\",red,a,t1,1,1,1,1\n0,u1,a,red,b,t2,2,2,2,0\n";
    const VALID: &str = "0,u9,a,red,b zz,t1,1,1,1,1\n1,u1,q,green,,t2 t9,0,0,0,0\n";

    #[test]
    fn block_by_block_encodes_as_the_whole_split_does() {
        let schema: Schema = serde_yaml::from_str(SCHEMA).unwrap();
        let folder = std::env::temp_dir().join(format!("mdl-ingest-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let paths = SplitPaths {
            train: folder.join("train.csv"),
            valid: folder.join("valid.csv"),
            test: folder.join("test.csv"),
        };
        std::fs::write(&paths.train, format!("{HEADER}{TRAIN}")).unwrap();
        std::fs::write(&paths.valid, format!("{HEADER}{VALID}")).unwrap();
        std::fs::write(&paths.test, format!("{HEADER}{VALID}{VALID}")).unwrap();
        let encode = EncodeOptions {
            bad_rows: BadRows::Skip,
            unknown_domain: UnknownDomain::Error,
            delimiter: Delimiter::COMMA,
        };
        let (fitted, train) = fit_inputs(
            &schema,
            &paths.train,
            &Input::read_all(&paths.train).unwrap(),
            (BadRows::Skip, Delimiter::COMMA),
        )
        .unwrap();
        let valid = fitted.encode_file(&paths.valid, encode).unwrap();
        let test = fitted.encode_file(&paths.test, encode).unwrap();
        assert_eq!((train.rows, train.skipped.count), (8, 1));
        let readings = [(1, 1 << 20, 1), (1, 1 << 20, 2), (1, 1 << 20, 4), (1, 1 << 20, 100), (2, 1 << 20, 100)];
        let readings = readings.into_iter().chain([(2, 7, 3), (3, 20, 2), (4, 1, 1), (3, 64, 100)]);
        for (threads, stretch_bytes, block_rows) in readings {
            let reading = Reading { threads, stretch_bytes, block_rows };
            let (streamed, [s_train, s_valid, s_test], note) =
                prepare_streaming(&schema, &paths, encode, None, &[0; 32], reading).unwrap();
            assert_eq!(note, None);
            assert!(streamed == fitted, "{reading:?}: the fitted state differs");
            assert_eq!(s_train.resident().unwrap(), train, "{reading:?}");
            assert_eq!(s_valid.resident().unwrap(), valid, "{reading:?}");
            assert_eq!(s_test.resident().unwrap(), test, "{reading:?}");
            // Batches read from the file are the rows of the split in memory.
            let rows = [5, 0, 3, 3, 1];
            let (mut from_file, mut from_memory) = (s_train.new_batch(), train.new_batch());
            s_train.gather(&rows, &mut from_file).unwrap();
            train.gather(&rows, &mut from_memory).unwrap();
            assert_eq!(from_file, from_memory, "{reading:?}");
            s_test.gather_range(1..4, &mut from_file).unwrap();
            test.gather_range(1..4, &mut from_memory).unwrap();
            assert_eq!(from_file, from_memory, "{reading:?}");
            // A file encoded on its own into a temporary file, as `mdl eval` reads one.
            let stored = encode_stored(&fitted, &paths.test, encode, block_rows).unwrap();
            assert!(stored.stored.is_some());
            assert_eq!(stored.resident().unwrap(), test, "{reading:?}");
        }
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
