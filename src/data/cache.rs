//! The binary cache of a prepared dataset.
//!
//! File layout (little-endian): magic `MDLDATA\0`, format version (u32), the 32-byte key,
//! the length (u64) and JSON text of the metadata (the [`Fitted`] state and per-split source,
//! row count and skipped rows), then for each split (train, valid, test) its arrays in a fixed
//! order (categorical groups, sequence ids, numeric groups, domain, labels, user), each as a
//! length (u64), an element width and the elements; ids are stored in 1, 2 or 4 bytes,
//! whichever holds the largest. Sequence masks are not stored: a mask is `id != 0`. A CRC-32
//! of everything before it ends the file.
//!
//! A file is used only if the magic, version, key, checksum, every length and every id range
//! check out; anything else is reported as a reason and the caller rebuilds it. Files are
//! written to a temporary name in the same folder and renamed into place.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dataset::{mask_of, Dataset, Shape, SkippedRows};
use super::encode::Fitted;

const MAGIC: &[u8; 8] = b"MDLDATA\0";
/// Bump when the file layout or the meaning of any encoded value changes (2: a number that
/// is not finite once normalised makes its row bad, so a split may encode differently).
pub(crate) const FORMAT_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Meta {
    fitted: Fitted,
    splits: Vec<SplitMeta>,
}

#[derive(Serialize, Deserialize)]
struct SplitMeta {
    source: String,
    rows: usize,
    skipped: SkippedRows,
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_ids(out: &mut Vec<u8>, ids: &[u32]) {
    let max = ids.iter().copied().max().unwrap_or(0);
    let width: u8 = if max <= u8::MAX as u32 {
        1
    } else if max <= u16::MAX as u32 {
        2
    } else {
        4
    };
    put_u64(out, ids.len() as u64);
    out.push(width);
    out.reserve(ids.len() * width as usize);
    match width {
        1 => out.extend(ids.iter().map(|&id| id as u8)),
        2 => ids.iter().for_each(|&id| out.extend_from_slice(&(id as u16).to_le_bytes())),
        _ => ids.iter().for_each(|&id| out.extend_from_slice(&id.to_le_bytes())),
    }
}

fn put_floats(out: &mut Vec<u8>, values: &[f32]) {
    put_u64(out, values.len() as u64);
    out.push(4);
    out.reserve(values.len() * 4);
    values.iter().for_each(|&x| out.extend_from_slice(&x.to_le_bytes()));
}

/// Serialises a prepared dataset under `key`.
pub(crate) fn encode(key: &[u8; 32], fitted: &Fitted, splits: [&Dataset; 3]) -> Result<Vec<u8>, String> {
    let meta = Meta {
        fitted: fitted.clone(),
        splits: splits
            .iter()
            .map(|d| SplitMeta { source: d.source.clone(), rows: d.rows, skipped: d.skipped.clone() })
            .collect(),
    };
    let meta = serde_json::to_vec(&meta).map_err(|e| format!("cannot serialise metadata: {e}"))?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(key);
    put_u64(&mut out, meta.len() as u64);
    out.extend_from_slice(&meta);
    for dataset in splits {
        dataset.cat.iter().for_each(|ids| put_ids(&mut out, ids));
        dataset.seq_ids.iter().for_each(|ids| put_ids(&mut out, ids));
        dataset.num.iter().for_each(|values| put_floats(&mut out, values));
        put_ids(&mut out, &dataset.domain);
        put_floats(&mut out, &dataset.labels);
        put_ids(&mut out, &dataset.user);
    }
    let checksum = crc32fast::hash(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    Ok(out)
}

/// Reads fields from the cache bytes, failing (with a reason) instead of reading past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or("the file is truncated")?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn header(&mut self, expected_len: usize) -> Result<(usize, u8), String> {
        let len = self.u64()?;
        if len != expected_len as u64 {
            return Err(format!("an array has {len} elements, expected {expected_len}"));
        }
        let width = self.take(1)?[0];
        Ok((expected_len, width))
    }

    /// Reads an id array of `len` elements, each below `limit`.
    fn ids(&mut self, len: usize, limit: u64) -> Result<Vec<u32>, String> {
        let (len, width) = self.header(len)?;
        let bytes = self.take(len.checked_mul(width as usize).ok_or("an array is too long")?)?;
        let ids: Vec<u32> = match width {
            1 => bytes.iter().map(|&b| b as u32).collect(),
            2 => bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect(),
            4 => bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => return Err(format!("an id array has element width {other}")),
        };
        if ids.iter().any(|&id| id as u64 >= limit) {
            return Err("an id is out of its table's range".into());
        }
        Ok(ids)
    }

    fn floats(&mut self, len: usize) -> Result<Vec<f32>, String> {
        let (len, width) = self.header(len)?;
        if width != 4 {
            return Err(format!("a float array has element width {width}"));
        }
        let bytes = self.take(len.checked_mul(4).ok_or("an array is too long")?)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

/// `rows` times the widths, failing on overflow (the row count comes from the file).
fn elements(rows: usize, widths: &[usize]) -> Result<usize, String> {
    widths.iter().try_fold(rows, |n, &w| n.checked_mul(w)).ok_or_else(|| "an array is too long".to_string())
}

/// Decodes a cache file written by [`encode`] for `key`, or says why it cannot be used.
pub(crate) fn decode(key: &[u8; 32], bytes: &[u8]) -> Result<(Fitted, [Dataset; 3]), String> {
    let body_len = bytes.len().checked_sub(4).ok_or("the file is truncated")?;
    let (body, stored) = bytes.split_at(body_len);
    if crc32fast::hash(body).to_le_bytes() != stored {
        return Err("the checksum does not match (corrupt or truncated file)".into());
    }
    let mut cursor = Cursor { bytes: body, pos: 0 };
    if cursor.take(8)? != MAGIC {
        return Err("not an mdl data cache file".into());
    }
    if cursor.take(4)? != FORMAT_VERSION.to_le_bytes() {
        return Err("written by another cache format version".into());
    }
    if cursor.take(32)? != key {
        return Err("the key inside the file does not match".into());
    }
    let meta_len = usize::try_from(cursor.u64()?).map_err(|_| "bad metadata length")?;
    let meta: Meta = serde_json::from_slice(cursor.take(meta_len)?).map_err(|e| format!("bad metadata: {e}"))?;
    let fitted = meta.fitted;
    fitted.check().map_err(|e| e.to_string())?;
    if meta.splits.len() != 3 {
        return Err("the metadata does not describe three splits".into());
    }
    let layout = fitted.layout();
    let shape = Shape::of(&fitted.schema);
    let mut datasets = Vec::with_capacity(3);
    for split in meta.splits {
        let rows = split.rows;
        let cat = shape
            .cat
            .iter()
            .zip(&layout.categorical)
            .map(|(width, group)| cursor.ids(elements(rows, &[*width])?, group.rows as u64))
            .collect::<Result<Vec<_>, _>>()?;
        let seq_ids = shape
            .seq
            .iter()
            .zip(&layout.sequence)
            .map(|((columns, len), group)| cursor.ids(elements(rows, &[*columns, *len])?, group.rows as u64))
            .collect::<Result<Vec<_>, _>>()?;
        let num =
            shape.num.iter().map(|width| cursor.floats(elements(rows, &[*width])?)).collect::<Result<Vec<_>, _>>()?;
        let domain = cursor.ids(elements(rows, &[shape.has_domain as usize])?, fitted.domains as u64)?;
        let labels = cursor.floats(elements(rows, &[shape.tasks])?)?;
        let tasks = fitted.schema.labels.iter().map(|t| t.values).collect::<Vec<_>>();
        if labels.iter().enumerate().any(|(i, &y)| !tasks.get(i % tasks.len().max(1)).is_some_and(|v| v.accepts(y))) {
            return Err("a label is not one its column can hold".into());
        }
        let user = cursor.ids(elements(rows, &[shape.has_user as usize])?, u64::MAX)?;
        let dataset = Dataset {
            source: split.source,
            rows,
            shape: shape.clone(),
            cat,
            seq_mask: seq_ids.iter().map(|ids| mask_of(ids)).collect(),
            seq_ids,
            num,
            domain,
            labels,
            user,
            skipped: split.skipped,
        };
        if !dataset.lengths_match() {
            return Err("array lengths do not match the schema".into());
        }
        datasets.push(dataset);
    }
    if cursor.pos != body.len() {
        return Err("the file has trailing bytes".into());
    }
    let [train, valid, test]: [Dataset; 3] =
        datasets.try_into().map_err(|_| "the file does not hold three splits".to_string())?;
    Ok((fitted, [train, valid, test]))
}

/// Writes the cache file atomically, creating its folder first.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let folder = path.parent().ok_or("the cache path has no folder")?;
    std::fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    crate::files::write_atomic(path, bytes)
}
