//! Row-sparse tensor operations: the rows of a [`Value::RowSparse`] value (an embedding
//! table's gradient) grouped by row, duplicate rows summed, in ascending row order.
//!
//! Every consumer of a row-sparse gradient combines its rows here, so the optimizer's
//! update, the gradients' norm, the jit's bag kernels and the OpenCL device's row sums all
//! add the entries of one row in the same order as [`Value::to_dense`]: from zero, in their
//! original order. A combined row therefore equals the dense form's row bit for bit.

use crate::tensor::{Float, Tensor, Value};
use std::borrow::Cow;
use std::collections::HashMap;

/// A row-sparse gradient with duplicate rows summed: `rows` strictly ascending, `values`
/// holding `rows.len()` rows of `width` elements in the same order.
#[derive(Clone, Debug)]
pub struct CombinedRows<'a, T: Clone> {
    pub rows: Cow<'a, [u32]>,
    pub values: Cow<'a, [T]>,
}

/// Sums the duplicate rows of a row-sparse gradient (`values` holds `rows.len()` rows of
/// `width` elements), as [`for_each_combined_row`] does, into one compact gradient.
/// Strictly ascending rows are returned as they are, without copying.
pub fn combine_duplicate_rows<'a, T: Float>(rows: &'a [u32], values: &'a [T], width: usize) -> CombinedRows<'a, T> {
    if rows.windows(2).all(|p| p[0] < p[1]) {
        return CombinedRows { rows: Cow::Borrowed(rows), values: Cow::Borrowed(values) };
    }
    let mut unique_rows = Vec::with_capacity(rows.len());
    let mut summed = Vec::with_capacity(values.len());
    for_each_combined_row(rows, values, width, |row, g| {
        unique_rows.push(row);
        summed.extend_from_slice(g);
    });
    CombinedRows { rows: Cow::Owned(unique_rows), values: Cow::Owned(summed) }
}

/// Calls `visit(row, gradient)` once for every distinct row of a row-sparse gradient, in
/// ascending row order, with the entries of that row summed. The entries of one row are
/// added in their original order starting from zero, as [`Value::to_dense`] does, so each
/// combined row equals the dense form's row bit for bit. Callers check that `values` has
/// `rows.len() * width` elements; entries beyond the values given are left out.
///
/// Ascending order is what makes sparse updates fast: neighbouring rows of a large table
/// share pages and the hardware prefetcher can follow, where a scattered walk stalls on
/// every row. The entries are put in row order by [`RowGroups::of`], the entries of a row
/// staying in their original order, and the rows are summed on the fly into a single
/// scratch row, so nothing of the gradient's size is copied. Strictly ascending input is
/// visited in place.
pub fn for_each_combined_row<T: Float>(rows: &[u32], values: &[T], width: usize, mut visit: impl FnMut(u32, &[T])) {
    let entry = |j: usize| values.get(j * width..(j + 1) * width);
    if rows.windows(2).all(|p| p[0] < p[1]) {
        for (j, &row) in rows.iter().enumerate() {
            if let Some(g) = entry(j) {
                visit(row, g);
            }
        }
        return;
    }
    let groups = RowGroups::of(rows);
    let mut scratch = vec![T::ZERO; width];
    for (k, &row) in groups.rows.iter().enumerate() {
        let mut any = false;
        scratch.fill(T::ZERO);
        for &j in groups.entries(k) {
            let Some(g) = entry(j as usize) else { continue };
            any = true;
            for (s, &v) in scratch.iter_mut().zip(g) {
                *s += v;
            }
        }
        if any {
            visit(row, &scratch);
        }
    }
}

/// The entries of a row-sparse gradient grouped by row: the distinct `rows` ascending, and
/// for the `k`-th of them the positions `order[starts[k]..starts[k + 1]]` of its entries,
/// ascending (their original order). What [`for_each_combined_row`] sums, and what the
/// OpenCL backend uploads to sum rows on the device in the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroups {
    pub rows: Vec<u32>,
    pub starts: Vec<u32>,
    pub order: Vec<u32>,
}

impl RowGroups {
    /// Groups `rows` (fewer than 2³² entries) by a stable counting sort when the largest
    /// row id is within a few times the entry count (the usual case: a batch touches a
    /// good share of a table's rows), else by one sort of packed `(row, position)` keys.
    pub fn of(rows: &[u32]) -> RowGroups {
        let largest = rows.iter().copied().max().unwrap_or(0) as usize;
        let order: Vec<u32> = if largest <= 4 * rows.len() + (1 << 16) {
            counting_order(rows, largest)
        } else {
            let mut keys: Vec<u64> = rows.iter().zip(0u64..).map(|(&row, j)| ((row as u64) << 32) | j).collect();
            keys.sort_unstable();
            keys.iter().map(|&k| (k & 0xffff_ffff) as u32).collect()
        };
        let mut unique = Vec::new();
        let mut starts = Vec::new();
        for (at, &j) in order.iter().enumerate() {
            let row = rows[j as usize];
            if unique.last() != Some(&row) {
                unique.push(row);
                starts.push(at as u32);
            }
        }
        starts.push(order.len() as u32);
        RowGroups { rows: unique, starts, order }
    }

    /// The positions of the entries of the `k`-th row, ascending.
    pub fn entries(&self, k: usize) -> &[u32] {
        &self.order[self.starts[k] as usize..self.starts[k + 1] as usize]
    }
}

/// The positions of `rows` ordered by row, positions of one row ascending (a stable
/// counting sort over row ids `0..=largest`; fewer than 2^32 entries).
fn counting_order(rows: &[u32], largest: usize) -> Vec<u32> {
    let mut start = vec![0u32; largest + 2];
    for &row in rows {
        start[row as usize + 1] += 1;
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut order = vec![0u32; rows.len()];
    for (j, &row) in rows.iter().enumerate() {
        let slot = &mut start[row as usize];
        order[*slot as usize] = j as u32;
        *slot += 1;
    }
    order
}

/// Replaces every row-sparse gradient whose rows are not strictly ascending by its
/// combined form ([`combine_duplicate_rows`]: unique ascending rows, duplicates summed), so
/// later passes over the gradients (the norm, the update) walk rows in order without
/// sorting again. Malformed gradients (values not `rows × width`) are left as they are,
/// for the optimizer to report.
pub fn combine_rows_in_place<T: Float>(grads: &mut HashMap<String, Value<T>>) {
    for grad in grads.values_mut() {
        let Value::RowSparse { shape, rows, values } = grad else { continue };
        let width = row_width(shape);
        if values.data.len() != rows.len() * width || rows.windows(2).all(|p| p[0] < p[1]) {
            continue;
        }
        let combined = combine_duplicate_rows(rows, &values.data, width);
        let (unique, summed) = (combined.rows.into_owned(), combined.values.into_owned());
        let mut values_shape = values.shape.clone();
        if let Some(first) = values_shape.first_mut() {
            *first = unique.len();
        }
        *grad = Value::RowSparse {
            shape: shape.clone(),
            rows: unique,
            values: Tensor { shape: values_shape, data: summed },
        };
    }
}

/// The elements per row of a table of `shape` (the product of all axes but the first).
pub fn row_width(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}
