//! Streaming preparation: the splits are read block by block ([`SplitReader`]), never whole,
//! and written to the cache file as they are encoded ([`cache::Writer`]), so memory does not
//! grow with the rows beyond the per-row columns metrics keep (domain, labels, user).
//!
//! Train is read once (the unknown-domain policy does not apply to it): each block is encoded with provisional ids (in first-seen order,
//! [`FitIds`]) while the vocabulary counts and the numeric statistics are gathered, and
//! spilled to an unnamed temporary file. The vocabularies and normalisers are then fitted
//! from those counts (a `standard` column's squares from a second pass over the spill), the
//! spilled blocks are rewritten with the final ids and normalised numbers into the cache,
//! and valid and test are encoded with the fitted state. The result is the same, value for
//! value, as encoding each split whole.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::cache::{self, unnamed_file};
use super::dataset::{Dataset, Shape, SkippedRows};
use super::encode::{Columns, FitIds, Fitted, IdSource, NumericColumns, RawSplit};
use super::prepare::SplitPaths;
use super::schema::Schema;
use super::stream::SplitReader;
use super::{DataError, EncodeOptions};

/// Rows encoded at a time.
pub(super) const BLOCK_ROWS: usize = 1 << 15;

/// Provisionally encoded train blocks in an unnamed temporary file, read back in order.
struct Spill {
    writer: BufWriter<File>,
    folder: PathBuf,
    shape: Shape,
    buffer: Vec<u8>,
}

fn put_u32s(values: &[u32], out: &mut Vec<u8>) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

fn get_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

impl Spill {
    fn new(schema: &Schema) -> Result<Spill, DataError> {
        let (file, folder) = unnamed_file()?;
        Ok(Spill {
            writer: BufWriter::with_capacity(1 << 20, file),
            folder,
            shape: Shape::of(schema),
            buffer: Vec::new(),
        })
    }

    fn error(&self, e: std::io::Error) -> DataError {
        DataError::io(&self.folder, &format!("cannot spill the encoded train rows to a temporary file: {e}"))
    }

    /// Appends a block: its row count and byte length, then each array's elements.
    fn write(&mut self, raw: &RawSplit) -> Result<(), DataError> {
        let out = &mut self.buffer;
        out.clear();
        out.extend_from_slice(&(raw.rows as u64).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        raw.cat.iter().for_each(|ids| put_u32s(ids, out));
        // A sequence as its item count and items: they fill the last slots (right-aligned).
        for (ids, (_, len)) in raw.seq_ids.iter().zip(&self.shape.seq) {
            for slots in ids.chunks_exact((*len).max(1)) {
                let items = slots.iter().position(|&id| id != FitIds::SEQUENCE_PAD).map_or(0, |first| len - first);
                out.extend_from_slice(&(items as u32).to_le_bytes());
                put_u32s(&slots[len - items..], out);
            }
        }
        raw.num.iter().flatten().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        put_u32s(&raw.domain, out);
        raw.labels.iter().for_each(|y| out.extend_from_slice(&y.to_le_bytes()));
        put_u32s(&raw.user, out);
        let body = (out.len() - 16) as u64;
        out[8..16].copy_from_slice(&body.to_le_bytes());
        let written = self.writer.write_all(&self.buffer);
        written.map_err(|e| self.error(e))
    }

    /// Hands every block written to `each`, in order.
    fn each(
        &mut self,
        schema: &Schema,
        mut each: impl FnMut(RawSplit) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        self.writer.flush().map_err(|e| self.error(e))?;
        let folder = self.folder.clone();
        let failed =
            |e: std::io::Error| DataError::io(&folder, &format!("cannot read back the spilled train rows: {e}"));
        let file = self.writer.get_mut();
        file.rewind().map_err(failed)?;
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let shape = &self.shape;
        let mut header = [0u8; 16];
        let mut body = Vec::new();
        loop {
            match reader.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(failed(e)),
            }
            let rows = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
            body.resize(u64::from_le_bytes(header[8..].try_into().expect("8 bytes")) as usize, 0);
            reader.read_exact(&mut body).map_err(failed)?;
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
            each(raw)?;
        }
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

/// Reads, fits and encodes the three splits into the cache file `cache_file` (or an unnamed
/// temporary file without one, or when it cannot be created: the reason comes back) and
/// returns the fitted state and the splits reading their features from that file.
pub(super) fn prepare_streaming(
    schema: &Schema,
    paths: &SplitPaths,
    encode: EncodeOptions,
    cache_file: Option<&Path>,
    key: &[u8; 32],
    block_rows: usize,
) -> Result<(Fitted, [Dataset; 3], Option<String>), DataError> {
    // Train, once: provisional ids, counts and numeric statistics, the blocks spilled.
    let mut ids = FitIds::new(schema);
    let mut numbers = NumericColumns::new(schema);
    let mut spill = Spill::new(schema)?;
    let train_skipped = read_blocks(schema, (&paths.train, block_rows), encode, &mut ids, |raw| {
        numbers.add(&raw);
        spill.write(&raw)
    })?;
    let squares = |numbers: &mut NumericColumns| {
        spill.each(schema, |raw| {
            numbers.add_squares(&raw);
            Ok(())
        })
    };
    let (fitted, remap) = ids.fit(schema, squares, numbers)?;

    let (mut writer, note) = cache::Writer::create(cache_file, key, &fitted)?;
    writer.begin_split(&paths.train.display().to_string());
    spill.each(schema, |mut raw| {
        remap.apply(&mut raw);
        writer.write_block(&fitted.finish(raw, &paths.train))
    })?;
    drop(spill);
    writer.end_split(train_skipped);

    for path in [&paths.valid, &paths.test] {
        writer.begin_split(&path.display().to_string());
        let mut ids = fitted.apply_ids(encode.unknown_domain)?;
        let skipped = read_blocks(schema, (path, block_rows), encode, &mut ids, |raw| {
            writer.write_block(&fitted.finish(raw, path))
        })?;
        writer.end_split(skipped);
    }
    let splits = writer.finish(&fitted)?;
    Ok((fitted, splits, note))
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
    /// Quoted fields, a missing number, an empty cell, a malformed row (line 6), repeats.
    const TRAIN: &str =
        "1,u1,a,red,,t1 t2,0.5,1,3,0\n0,u2,\"b,1\",blue,a,t2,1.5,,4,1\n1,u1,c,,a \"\"x\"\",t1,2.5,2,5,1\n\
        0,u3,a,red,c b,t3 t1,-1,7,,0\n1,u2,b,x\n1,u4,d,red,a a a,t2 t2,4,0.25,1,2\n0,u1,a,blue,d,,3,3,3,0\n";
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
        assert_eq!((train.rows, train.skipped.count), (6, 1));
        for block_rows in [1, 2, 4, 100] {
            let (streamed, [s_train, s_valid, s_test], note) =
                prepare_streaming(&schema, &paths, encode, None, &[0; 32], block_rows).unwrap();
            assert_eq!(note, None);
            assert!(streamed == fitted, "blocks of {block_rows}: the fitted state differs");
            assert_eq!(s_train.resident().unwrap(), train, "blocks of {block_rows}");
            assert_eq!(s_valid.resident().unwrap(), valid, "blocks of {block_rows}");
            assert_eq!(s_test.resident().unwrap(), test, "blocks of {block_rows}");
            // Batches read from the file are the rows of the split in memory.
            let rows = [5, 0, 3, 3, 1];
            let (mut from_file, mut from_memory) = (s_train.new_batch(), train.new_batch());
            s_train.gather(&rows, &mut from_file).unwrap();
            train.gather(&rows, &mut from_memory).unwrap();
            assert_eq!(from_file, from_memory, "blocks of {block_rows}");
            s_test.gather_range(1..4, &mut from_file).unwrap();
            test.gather_range(1..4, &mut from_memory).unwrap();
            assert_eq!(from_file, from_memory, "blocks of {block_rows}");
        }
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
