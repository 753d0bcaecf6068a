//! What this module owns: the card's interest-entanglement distance test (measure D,
//! `mdl analyze RUN --against A --against B --pair USER:ITEM`). Runs A and B are single-task
//! models of two tasks; RUN is a multi-task model (or any run). On the test split, each row's
//! (user, item) pair has, under every embedding table that holds both columns, the Euclidean
//! distance between the user's row and the item's row. The contradictory pairs are those in
//! the top 40 % of distances under A and in the bottom 40 % under B. For each table of every
//! run (A's and B's included), the test reports where those pairs fall in that table's own
//! distribution: their mean percentile (0 = the nearest pair of the split, 1 = the farthest)
//! and a histogram by tenths, with Spearman's rank correlation of the table's distances with
//! A's and with B's over all pairs.
//!
//! Reading it (the card): a shared, entangled table cannot put a pair far for A and near for
//! B at once, so the contradictory pairs land in the middle (mean percentile near 0.5); a
//! task-specific, disentangled table reproduces its task's single-task pattern (high for A's
//! task, low for B's). Distances are Euclidean (the card leaves the metric open and
//! recommends it); the user and item columns are those named by `--pair`, read as the run
//! encodes them, row by row of the same test file.

use super::attention::spearman;
use crate::train::LoadedRun;
use serde::Serialize;
use std::path::Path;

/// The share of pairs at each end of the distances that selects contradictory pairs.
pub const END_SHARE: f64 = 0.4;

/// Each value's percentile among `values`: its rank (ties: their mean rank) from 0 for the
/// smallest to 1 for the largest.
pub fn percentiles(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    if n < 2 {
        return vec![0.5; n];
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let p = (i + j) as f64 / 2.0 / (n - 1) as f64;
        for &o in &order[i..=j] {
            out[o] = p;
        }
        i = j + 1;
    }
    out
}

/// The pairs (indices) in the top [`END_SHARE`] of `a`'s percentiles and the bottom
/// [`END_SHARE`] of `b`'s.
pub fn contradictory(a: &[f64], b: &[f64]) -> Vec<usize> {
    let (pa, pb) = (percentiles(a), percentiles(b));
    (0..a.len()).filter(|&i| pa[i] >= 1.0 - END_SHARE && pb[i] <= END_SHARE).collect()
}

/// Where the pairs `selected` fall among one table's distances.
#[derive(Clone, Debug, Serialize)]
pub struct TableDistances {
    /// The run folder (as given) and its table.
    pub run: String,
    pub table: String,
    /// The selected pairs' mean percentile, and how many fall in each tenth (0–0.1, ...).
    pub mean_percentile: Option<f64>,
    pub tenths: Vec<u64>,
    /// Spearman's rank correlation of the table's distances with A's and with B's.
    pub rank_correlation_a: Option<f64>,
    pub rank_correlation_b: Option<f64>,
}

/// The placement of `selected` among `distances`, against A's and B's distances.
pub fn place(run: &str, table: &str, distances: &[f64], selected: &[usize], a: &[f64], b: &[f64]) -> TableDistances {
    let p = percentiles(distances);
    let mut tenths = vec![0u64; 10];
    for &i in selected {
        tenths[((p[i] * 10.0) as usize).min(9)] += 1;
    }
    let mean = (!selected.is_empty()).then(|| selected.iter().map(|&i| p[i]).sum::<f64>() / selected.len() as f64);
    TableDistances {
        run: run.to_string(),
        table: table.to_string(),
        mean_percentile: mean,
        tenths,
        rank_correlation_a: spearman(distances, a),
        rank_correlation_b: spearman(distances, b),
    }
}

/// `analysis.json`'s `entanglement`.
#[derive(Clone, Debug, Serialize)]
pub struct Entanglement {
    pub user: String,
    pub item: String,
    /// The single-task runs and the tables whose distances select the pairs.
    pub a: String,
    pub b: String,
    pub split: String,
    pub rows: usize,
    /// Contradictory pairs: far under A, near under B.
    pub selected: usize,
    /// Every table holding both columns, of A, B and the analysed run.
    pub tables: Vec<TableDistances>,
}

/// `USER:ITEM` of `--pair`.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((u, i)) if !u.is_empty() && !i.is_empty() => Ok((u.to_string(), i.to_string())),
        _ => Err(format!("--pair: expected USER:ITEM (two categorical columns), found `{text}`")),
    }
}

/// The embedding tables of `run` that hold both columns (one categorical input has both),
/// each with every test row's user–item distance; an error names a column the run lacks.
pub fn distances(run: &LoadedRun, folder: &Path, user: &str, item: &str) -> Result<Vec<(String, Vec<f64>)>, String> {
    let layout = run.fitted.layout();
    let find = |column: &str| -> Result<(usize, usize), String> {
        for (g, group) in layout.categorical.iter().enumerate() {
            if let Some(c) = group.columns.iter().position(|x| x == column) {
                return Ok((g, c));
            }
        }
        let all: Vec<String> = layout.categorical.iter().flat_map(|g| g.columns.iter().cloned()).collect();
        Err(format!("--pair: run {}: {}", folder.display(), super::unknown("categorical column", column, &all)))
    };
    let ((gu, cu), (gi, ci)) = (find(user)?, find(item)?);
    if gu != gi {
        return Err(format!(
            "--pair: run {}: `{user}` (input `{}`) and `{item}` (input `{}`) are in different inputs, so no table holds both",
            folder.display(),
            layout.categorical[gu].name,
            layout.categorical[gi].name
        ));
    }
    let group = &layout.categorical[gu];
    let rows_name = crate::lower::rows_sym(&group.name);
    let tables: Vec<&mdl_runtime::ParamInfo> = run
        .session
        .params()
        .iter()
        .filter(|p| p.embedding && p.shape.first() == Some(&mdl_runtime::Dim::sym(&rows_name)))
        .collect();
    let exp = &run.experiment;
    let test = exp.split_files()?.test;
    let ds = run.fitted.encode_file_stored(&test, exp.data.encode_options()).map_err(|e| e.to_string())?;
    let mut ids = Vec::with_capacity(ds.rows);
    let mut batch = ds.new_batch();
    let mut start = 0;
    let columns = group.columns.len();
    while start < ds.rows {
        let end = (start + 4096).min(ds.rows);
        ds.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
        let cat = &batch.cat[gu];
        ids.extend((0..batch.rows).map(|r| (cat[r * columns + cu] as usize, cat[r * columns + ci] as usize)));
        start = end;
    }
    let mut out = Vec::new();
    for p in tables {
        let t = run.params.get(&p.name).ok_or_else(|| format!("the checkpoint lacks table {}", p.name))?;
        let dim = *t.shape.last().unwrap_or(&1);
        let row = |r: usize| &t.data[r * dim..(r + 1) * dim];
        let d = ids
            .iter()
            .map(|&(u, i)| row(u).iter().zip(row(i)).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt())
            .collect();
        out.push((p.name.clone(), d));
    }
    if out.is_empty() {
        return Err(format!("--pair: run {}: no embedding table of input `{}`", folder.display(), group.name));
    }
    Ok(out)
}

/// The test split's file of a run, for the check that runs share it.
pub fn test_file(run: &LoadedRun) -> Result<std::path::PathBuf, String> {
    let test = run.experiment.split_files()?.test;
    Ok(test.canonicalize().unwrap_or(test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_hand_values() {
        assert_eq!(percentiles(&[3.0, 1.0, 2.0]), [1.0, 0.0, 0.5]);
        // Ties share their mean rank: ranks 0, 1.5, 1.5, 3 of 3.
        assert_eq!(percentiles(&[0.0, 5.0, 5.0, 9.0]), [0.0, 0.5, 0.5, 1.0]);
        assert_eq!(percentiles(&[7.0]), [0.5]);
    }

    #[test]
    fn contradictory_pairs_and_where_a_table_puts_them() {
        // Ten pairs: A's distances rise with the index, B's fall, so A's top 40 % (6..9) are
        // B's bottom 40 %; pair 5 is at A's 0.56 percentile, short of the top.
        let a: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..10).map(|i| (10 - i) as f64).collect();
        assert_eq!(contradictory(&a, &b), [6, 7, 8, 9]);
        assert_eq!(contradictory(&a, &a), Vec::<usize>::new(), "no pair is far and near under one table");
        let sel = contradictory(&a, &b);
        // A's own table puts them at 6/9 .. 9/9, B's at 3/9 .. 0.
        let under_a = place("A", "t", &a, &sel, &a, &b);
        assert!((under_a.mean_percentile.unwrap() - 7.5 / 9.0).abs() < 1e-12);
        assert_eq!(under_a.tenths, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!((under_a.rank_correlation_a, under_a.rank_correlation_b), (Some(1.0), Some(-1.0)));
        let under_b = place("B", "t", &b, &sel, &a, &b);
        assert!((under_b.mean_percentile.unwrap() - 1.5 / 9.0).abs() < 1e-12);
        // A third table, with distances |i - 7.5|, puts them among its nearest pairs.
        let mid: Vec<f64> = (0..10).map(|i| (i as f64 - 7.5).abs()).collect();
        let p = percentiles(&mid);
        let want = sel.iter().map(|&i| p[i]).sum::<f64>() / 4.0;
        assert!((place("M", "t", &mid, &sel, &a, &b).mean_percentile.unwrap() - want).abs() < 1e-12);
        assert!(want < 0.3, "{want}");
        assert_eq!(place("M", "t", &mid, &[], &a, &b).mean_percentile, None);
        assert_eq!(parse_pair("user_id:video_id").unwrap(), ("user_id".to_string(), "video_id".to_string()));
        assert!(parse_pair("user_id").unwrap_err().contains("expected USER:ITEM"));
    }
}
