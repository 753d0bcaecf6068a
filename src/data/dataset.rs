//! Encoded splits and mini-batches.
//!
//! A [`Dataset`] holds one array per feature group (categorical, sequence and numeric groups
//! each numbered in schema order), row-major inside the group, plus the domain, label and
//! user arrays. [`Dataset::gather`] copies chosen rows into a reusable [`Batch`] with the same
//! layout; it allocates nothing once the batch buffers have grown to the batch size.
//!
//! A dataset [`prepare`](super::prepare) made with a cache keeps its features in the cache
//! file ([`Dataset::stored`]): its feature arrays are empty and batches are read from the
//! file; the domain, label and user arrays (which metrics read whole) are in memory either
//! way. [`Dataset::resident`] reads such a dataset's features into memory.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cache::StoredRows;
use super::schema::Schema;
use super::DataError;

/// Per-row widths of a dataset's arrays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Columns per categorical group.
    pub cat: Vec<usize>,
    /// `(columns, max_len)` per sequence group.
    pub seq: Vec<(usize, usize)>,
    /// Columns per numeric group.
    pub num: Vec<usize>,
    /// Number of tasks (labels per row).
    pub tasks: usize,
    pub has_domain: bool,
    pub has_user: bool,
}

impl Shape {
    pub fn of(schema: &Schema) -> Shape {
        Shape {
            cat: schema.categorical_groups().map(|(_, columns, _)| columns.len()).collect(),
            seq: schema.sequence_groups().map(|(_, columns, len, _, _)| (columns.len(), len)).collect(),
            num: schema.numeric_groups().map(|(_, columns, _)| columns.len()).collect(),
            tasks: schema.labels.len(),
            has_domain: schema.domain.is_some(),
            has_user: schema.user.is_some(),
        }
    }
}

/// Rows dropped under [`BadRows::Skip`](super::BadRows::Skip): how many, and the first few
/// reasons (`file:line: what was wrong`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRows {
    pub count: usize,
    pub examples: Vec<String>,
}

impl SkippedRows {
    /// How many reasons are kept as examples.
    pub const EXAMPLES: usize = 10;

    pub(crate) fn record(&mut self, message: String) {
        self.count += 1;
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push(message);
        }
    }

    /// Adds another count of skipped rows (of a later part of the same file) to this one.
    pub(crate) fn absorb(&mut self, later: &SkippedRows) {
        self.count += later.count;
        let room = Self::EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(later.examples.iter().take(room).cloned());
    }
}

/// One encoded split (or any other encoded file).
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The file the rows came from.
    pub source: String,
    pub rows: usize,
    pub shape: Shape,
    /// Per categorical group: `[rows, columns]` global ids.
    pub cat: Vec<Vec<u32>>,
    /// Per sequence group: `[rows, columns, max_len]` ids, right-aligned, padding 0.
    pub seq_ids: Vec<Vec<u32>>,
    /// Per sequence group: `[rows, columns, max_len]`, 1.0 for a real item, 0.0 for padding.
    pub seq_mask: Vec<Vec<f32>>,
    /// Per numeric group: `[rows, columns]` normalised values.
    pub num: Vec<Vec<f32>>,
    /// `[rows]` domain ids (empty without a domain column).
    pub domain: Vec<u32>,
    /// `[rows, tasks]` 0/1 labels.
    pub labels: Vec<f32>,
    /// `[rows]` user ids for gAUC (empty without a user column).
    pub user: Vec<u32>,
    pub skipped: SkippedRows,
    /// Where the features are when they are not in memory (then `cat`, `seq_ids`,
    /// `seq_mask` and `num` are empty): the rows of a cache file.
    pub stored: Option<Arc<StoredRows>>,
}

impl PartialEq for Dataset {
    /// The same rows with the same values, wherever the features are kept (a stored dataset
    /// is read to compare; a read that fails compares unequal).
    fn eq(&self, other: &Dataset) -> bool {
        let same_rows = self.source == other.source
            && self.rows == other.rows
            && self.shape == other.shape
            && self.domain == other.domain
            && self.labels == other.labels
            && self.user == other.user
            && self.skipped == other.skipped;
        if !same_rows {
            return false;
        }
        let features = |d: &Dataset| (d.cat.clone(), d.seq_ids.clone(), d.seq_mask.clone(), d.num.clone());
        match (self.stored.is_some(), other.stored.is_some()) {
            (false, false) => features(self) == features(other),
            _ => match (self.resident(), other.resident()) {
                (Ok(a), Ok(b)) => features(&a) == features(&b),
                _ => false,
            },
        }
    }
}

/// A mini-batch: the same arrays as [`Dataset`] for `rows` rows. Reuse one across steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub cat: Vec<Vec<u32>>,
    pub seq_ids: Vec<Vec<u32>>,
    pub seq_mask: Vec<Vec<f32>>,
    pub num: Vec<Vec<f32>>,
    pub domain: Vec<u32>,
    pub labels: Vec<f32>,
    pub user: Vec<u32>,
}

/// The padding mask of right-aligned sequence ids: real ids are never 0.
pub(crate) fn mask_of(ids: &[u32]) -> Vec<f32> {
    ids.iter().map(|&id| if id == 0 { 0.0 } else { 1.0 }).collect()
}

fn copy_rows<T: Copy>(source: &[T], width: usize, rows: &[usize], out: &mut Vec<T>) {
    out.clear();
    out.reserve(rows.len() * width);
    for &row in rows {
        out.extend_from_slice(&source[row * width..(row + 1) * width]);
    }
}

fn copy_range<T: Copy>(source: &[T], width: usize, rows: &Range<usize>, out: &mut Vec<T>) {
    out.clear();
    out.extend_from_slice(&source[rows.start * width..rows.end * width]);
}

/// Appends each group's array of `from` to the same group's of `into`.
fn extend_groups<T: Copy>(into: &mut [Vec<T>], from: &[Vec<T>]) {
    for (a, b) in into.iter_mut().zip(from) {
        a.extend_from_slice(b);
    }
}

impl Dataset {
    /// A batch with one buffer per group, ready for [`gather`](Self::gather).
    pub fn new_batch(&self) -> Batch {
        Batch {
            rows: 0,
            cat: vec![Vec::new(); self.shape.cat.len()],
            seq_ids: vec![Vec::new(); self.shape.seq.len()],
            seq_mask: vec![Vec::new(); self.shape.seq.len()],
            num: vec![Vec::new(); self.shape.num.len()],
            ..Batch::default()
        }
    }

    fn check_batch(&self, batch: &mut Batch) {
        batch.cat.resize_with(self.shape.cat.len(), Vec::new);
        batch.seq_ids.resize_with(self.shape.seq.len(), Vec::new);
        batch.seq_mask.resize_with(self.shape.seq.len(), Vec::new);
        batch.num.resize_with(self.shape.num.len(), Vec::new);
    }

    /// Empties the batch's feature arrays, for a stored dataset to append rows to.
    fn clear_features(batch: &mut Batch) {
        batch.cat.iter_mut().chain(batch.seq_ids.iter_mut()).for_each(Vec::clear);
        batch.seq_mask.iter_mut().chain(batch.num.iter_mut()).for_each(Vec::clear);
    }

    /// The dataset with its features in memory (itself, cloned, when they already are).
    pub fn resident(&self) -> Result<Dataset, DataError> {
        if self.stored.is_none() {
            return Ok(self.clone());
        }
        let mut batch = self.new_batch();
        self.gather_range(0..self.rows, &mut batch)?;
        Ok(Dataset {
            cat: batch.cat,
            seq_ids: batch.seq_ids,
            seq_mask: batch.seq_mask,
            num: batch.num,
            stored: None,
            ..self.clone()
        })
    }

    /// Copies the given rows, in order, into `batch` (its buffers are reused).
    pub fn gather(&self, rows: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        if let Some(&bad) = rows.iter().find(|&&row| row >= self.rows) {
            return Err(DataError::RowIndex { index: bad, rows: self.rows });
        }
        self.check_batch(batch);
        let shape = &self.shape;
        if let Some(stored) = &self.stored {
            Dataset::clear_features(batch);
            stored.gather(rows, batch)?;
        } else {
            for (g, width) in shape.cat.iter().enumerate() {
                copy_rows(&self.cat[g], *width, rows, &mut batch.cat[g]);
            }
            for (g, (columns, len)) in shape.seq.iter().enumerate() {
                copy_rows(&self.seq_ids[g], columns * len, rows, &mut batch.seq_ids[g]);
                copy_rows(&self.seq_mask[g], columns * len, rows, &mut batch.seq_mask[g]);
            }
            for (g, width) in shape.num.iter().enumerate() {
                copy_rows(&self.num[g], *width, rows, &mut batch.num[g]);
            }
        }
        copy_rows(&self.domain, shape.has_domain as usize, rows, &mut batch.domain);
        copy_rows(&self.labels, shape.tasks, rows, &mut batch.labels);
        copy_rows(&self.user, shape.has_user as usize, rows, &mut batch.user);
        batch.rows = rows.len();
        Ok(())
    }

    /// Copies a contiguous range of rows into `batch` (for evaluation in file order).
    pub fn gather_range(&self, rows: Range<usize>, batch: &mut Batch) -> Result<(), DataError> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(DataError::RowIndex { index: rows.end.max(rows.start), rows: self.rows });
        }
        self.check_batch(batch);
        let shape = &self.shape;
        if let Some(stored) = &self.stored {
            Dataset::clear_features(batch);
            stored.gather_range(rows.clone(), batch)?;
        } else {
            for (g, width) in shape.cat.iter().enumerate() {
                copy_range(&self.cat[g], *width, &rows, &mut batch.cat[g]);
            }
            for (g, (columns, len)) in shape.seq.iter().enumerate() {
                copy_range(&self.seq_ids[g], columns * len, &rows, &mut batch.seq_ids[g]);
                copy_range(&self.seq_mask[g], columns * len, &rows, &mut batch.seq_mask[g]);
            }
            for (g, width) in shape.num.iter().enumerate() {
                copy_range(&self.num[g], *width, &rows, &mut batch.num[g]);
            }
        }
        copy_range(&self.domain, shape.has_domain as usize, &rows, &mut batch.domain);
        copy_range(&self.labels, shape.tasks, &rows, &mut batch.labels);
        copy_range(&self.user, shape.has_user as usize, &rows, &mut batch.user);
        batch.rows = rows.len();
        Ok(())
    }

    /// Appends the rows of `other` (a dataset of the same shape) after this one's: several
    /// requests' rows scored as one batch. A dataset of another shape is an error.
    pub fn append(&mut self, other: &Dataset) -> Result<(), DataError> {
        if self.stored.is_some() || other.stored.is_some() {
            return Err(DataError::Schema(format!(
                "rows of {} cannot join rows of {}: rows kept in a cache file are read, not joined",
                other.source, self.source
            )));
        }
        if other.shape != self.shape {
            return Err(DataError::Schema(format!(
                "rows of {} cannot join rows of {}: their shapes differ",
                other.source, self.source
            )));
        }
        extend_groups(&mut self.cat, &other.cat);
        extend_groups(&mut self.seq_ids, &other.seq_ids);
        extend_groups(&mut self.seq_mask, &other.seq_mask);
        extend_groups(&mut self.num, &other.num);
        self.domain.extend_from_slice(&other.domain);
        self.labels.extend_from_slice(&other.labels);
        self.user.extend_from_slice(&other.user);
        self.rows += other.rows;
        self.skipped.absorb(&other.skipped);
        Ok(())
    }

    /// The labels of task `task` as a strided view: `labels[row * tasks + task]`.
    pub fn task_labels(&self, task: usize) -> impl Iterator<Item = f32> + '_ {
        self.labels.iter().skip(task).step_by(self.shape.tasks.max(1)).copied()
    }

    /// Whether every array has the length its shape and row count demand.
    pub(crate) fn lengths_match(&self) -> bool {
        let rows = self.rows;
        let s = &self.shape;
        let columns = self.domain.len() == rows * s.has_domain as usize
            && self.labels.len() == rows * s.tasks
            && self.user.len() == rows * s.has_user as usize;
        if self.stored.is_some() {
            let no_features = self.cat.is_empty() && self.seq_ids.is_empty() && self.num.is_empty();
            return columns && no_features && self.seq_mask.is_empty();
        }
        columns
            && self.cat.len() == s.cat.len()
            && self.cat.iter().zip(&s.cat).all(|(a, w)| a.len() == rows * w)
            && self.seq_ids.len() == s.seq.len()
            && self.seq_mask.len() == s.seq.len()
            && self.seq_ids.iter().zip(&s.seq).all(|(a, (c, l))| a.len() == rows * c * l)
            && self.seq_mask.iter().zip(&s.seq).all(|(a, (c, l))| a.len() == rows * c * l)
            && self.num.len() == s.num.len()
            && self.num.iter().zip(&s.num).all(|(a, w)| a.len() == rows * w)
    }
}
