//! What this module owns: the ground-truth feature–target correlation of the card's
//! measure B (Category-wise Target-aware Correlation, CTC), computed from a run's train
//! split: for a behaviour sequence whose ids share the vocabulary of a categorical column
//! (the target's category), the mutual information between the event "a behaviour of
//! category c_i at target-relative position p" and the label, over the samples whose target
//! has category c_t; a heat map per target category (behaviour category × position).
//!
//! Positions count from the most recent behaviour (p = 1): sequences are right-aligned, so
//! position p is slot `L - p`, which assumes the data lists each history oldest first (as
//! movielens_100k does). Counts come from train only (the card's TIN script counts every
//! split; train keeps the measure free of the test labels).

use crate::data::{Layout, SequenceTable};
use serde::Serialize;
use std::collections::HashMap;

/// A count the card's formula would take the logarithm of zero of is taken as this.
const EMPTY: f64 = 1e-5;

/// The mutual information (bits) between a binary event X and the label Y over `s = t_p +
/// t_n` samples (`t_p` positive): `x_p` positive and `x_n` negative samples have X. The
/// card's formula, an empty cell counted as 1e-5.
pub fn mutual_information(x_p: f64, x_n: f64, t_p: f64, t_n: f64) -> f64 {
    let s = t_p + t_n;
    let c = |v: f64| if v > 0.0 { v } else { EMPTY };
    let term = |joint: f64, x: f64, y: f64| {
        let (joint, x, y) = (c(joint), c(x), c(y));
        joint / s * (joint * s / (x * y)).log2()
    };
    term(x_p, x_p + x_n, t_p)
        + term(x_n, x_p + x_n, t_n)
        + term(t_p - x_p, s - x_p - x_n, t_p)
        + term(t_n - x_n, s - x_p - x_n, t_n)
}

/// What `--mi` measures: the sequence input (and which of its columns), how many positions,
/// behaviour categories and target categories.
#[derive(Clone, Debug)]
pub struct MiRequest {
    pub sequence: String,
    pub column: Option<String>,
    pub positions: usize,
    pub categories: usize,
    pub targets: usize,
}

impl MiRequest {
    /// `SEQ` or `SEQ:COLUMN` (of `--mi`), with the card's 10 positions and 10 categories,
    /// for the 3 most frequent target categories.
    pub fn parse(text: &str) -> MiRequest {
        let (sequence, column) = match text.split_once(':') {
            Some((s, c)) => (s.to_string(), Some(c.to_string())),
            None => (text.to_string(), None),
        };
        MiRequest { sequence, column, positions: 10, categories: 10, targets: 3 }
    }
}

/// Where the ids are in a batch: the sequence group and its column, and the categorical
/// group and column whose vocabulary they share.
#[derive(Clone, Debug, PartialEq)]
pub struct MiPlace {
    pub sequence_group: usize,
    pub sequence_column: usize,
    pub sequence_columns: usize,
    pub max_len: usize,
    pub target_group: usize,
    pub target_column: usize,
    pub target_columns: usize,
    /// The target column's first id (its padding id).
    pub offset: u32,
    /// For the report: the target's input and column.
    pub target: String,
}

/// Finds the request's sequence in `layout`; an error names the sequence inputs there are,
/// or says why a sequence has no target category (its ids are its own).
pub fn place(layout: &Layout, req: &MiRequest) -> Result<MiPlace, String> {
    let names: Vec<String> = layout.sequence.iter().map(|s| s.name.clone()).collect();
    let Some(sg) = layout.sequence.iter().position(|s| s.name == req.sequence) else {
        return Err(format!("--mi: {}", super::unknown("sequence input", &req.sequence, &names)));
    };
    let seq = &layout.sequence[sg];
    let sc = match &req.column {
        None => 0,
        Some(c) => seq.columns.iter().position(|x| x == c).ok_or_else(|| {
            format!("--mi: sequence `{}` has no column `{c}` (its columns: {})", seq.name, seq.columns.join(", "))
        })?,
    };
    let SequenceTable::Categorical { group, column } = &seq.table else {
        return Err(format!(
            "--mi: sequence `{}` has a vocabulary of its own, shared with no categorical column: its behaviours have no category a target has (name a sequence whose schema entry has `vocab: COLUMN`)",
            seq.name
        ));
    };
    let tg = layout.categorical.iter().position(|g| &g.name == group).ok_or("--mi: the layout lacks a group")?;
    let g = &layout.categorical[tg];
    let tc = g.columns.iter().position(|c| c == column).ok_or("--mi: the layout lacks a column")?;
    Ok(MiPlace {
        sequence_group: sg,
        sequence_column: sc,
        sequence_columns: seq.columns.len(),
        max_len: seq.max_len,
        target_group: tg,
        target_column: tc,
        target_columns: g.columns.len(),
        offset: g.offsets[tc],
        target: format!("{}.{}", g.name, column),
    })
}

/// The counts of CTC: per target category, its positive and negative samples; per
/// (target category, behaviour category, position), the positive and negative samples
/// with such a behaviour there.
#[derive(Clone, Debug, Default)]
pub struct MiCounts {
    pub positions: usize,
    pub targets: HashMap<u32, (u64, u64)>,
    pub cells: HashMap<(u32, u32, usize), (u64, u64)>,
}

impl MiCounts {
    pub fn new(positions: usize) -> MiCounts {
        MiCounts { positions, ..MiCounts::default() }
    }

    /// Adds one sample: its target category, its label and its behaviours' categories
    /// (right-aligned, padding 0).
    pub fn add(&mut self, target: u32, positive: bool, behaviours: &[u32]) {
        let bump = |c: &mut (u64, u64)| if positive { c.0 += 1 } else { c.1 += 1 };
        bump(self.targets.entry(target).or_default());
        for p in 1..=self.positions.min(behaviours.len()) {
            let id = behaviours[behaviours.len() - p];
            if id != 0 {
                bump(self.cells.entry((target, id, p)).or_default());
            }
        }
    }

    /// The MI (bits) of the cell (target category, behaviour category, position): 0 for a
    /// target category no sample has.
    pub fn cell_mi(&self, target: u32, category: u32, position: usize) -> f64 {
        let Some(&(t_p, t_n)) = self.targets.get(&target) else { return 0.0 };
        let (x_p, x_n) = self.cells.get(&(target, category, position)).copied().unwrap_or((0, 0));
        mutual_information(x_p as f64, x_n as f64, t_p as f64, t_n as f64)
    }

    /// The heat map of target category `target` over positions 1..=`positions`: the
    /// `categories` behaviour categories most often seen there among its samples (the
    /// target's own among them when it is seen at all), most frequent first, each with its MI
    /// per position.
    pub fn heat_map(&self, target: u32, categories: usize, positions: usize) -> Option<(Vec<u32>, Vec<Vec<f64>>)> {
        self.targets.get(&target)?;
        let mut seen: HashMap<u32, u64> = HashMap::new();
        for (&(t, c, p), &(x_p, x_n)) in &self.cells {
            if t == target && p <= positions {
                *seen.entry(c).or_default() += x_p + x_n;
            }
        }
        let mut order: Vec<(u32, u64)> = seen.into_iter().collect();
        order.sort_by_key(|&(c, n)| (std::cmp::Reverse(n), c));
        let mut rows: Vec<u32> = order.iter().take(categories).map(|&(c, _)| c).collect();
        if !rows.contains(&target) && order.iter().any(|&(c, _)| c == target) && !rows.is_empty() {
            rows.pop();
            rows.insert(0, target);
        }
        let mi = rows.iter().map(|&c| (1..=positions).map(|p| self.cell_mi(target, c, p)).collect()).collect();
        Some((rows, mi))
    }
}

/// Min–max normalisation of a grid (all zeros for a flat one).
pub fn min_max(grid: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let all = grid.iter().flatten().copied();
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    grid.iter().map(|row| row.iter().map(|v| if hi > lo { (v - lo) / (hi - lo) } else { 0.0 }).collect()).collect()
}

/// One target category's heat map in `analysis.json`.
#[derive(Clone, Debug, Serialize)]
pub struct MiMap {
    /// The target category's value in the data, and its train samples (and positives).
    pub target: String,
    pub samples: u64,
    pub positives: u64,
    /// The behaviour categories (rows), most frequent first (the target's own first when it
    /// was moved in).
    pub categories: Vec<String>,
    /// MI in bits, `[category][position - 1]`, and min–max normalised over the grid.
    pub mi: Vec<Vec<f64>>,
    pub normalized: Vec<Vec<f64>>,
}

/// `analysis.json`'s `mutual_information`.
#[derive(Clone, Debug, Serialize)]
pub struct MiAnalysis {
    pub sequence: String,
    pub column: String,
    /// The categorical column whose categories the behaviours and the target share.
    pub target: String,
    pub task: String,
    pub split: String,
    pub rows: usize,
    pub positions: usize,
    pub maps: Vec<MiMap>,
}

/// Rows read per batch while counting.
const BATCH_ROWS: usize = 4096;

/// What [`measure`] counted, kept for the measures that compare a model with it
/// ([`super::attention`]): the counts over every position of the sequence, where its ids are,
/// the ids of each map's target and rows, and the names of ids.
pub struct MiMeasured {
    pub analysis: MiAnalysis,
    pub counts: MiCounts,
    pub place: MiPlace,
    /// Per map of `analysis.maps`: its target category's id and its rows' ids.
    pub map_ids: Vec<(u32, Vec<u32>)>,
}

/// CTC of the run's train split for the request: the heat maps of the `req.targets` most
/// frequent target categories (by train samples), for the first task's label. The counts
/// cover every position of the sequence (the maps show the first `req.positions`).
pub fn measure(run: &crate::train::LoadedRun, req: &MiRequest) -> Result<MiMeasured, String> {
    let exp = &run.experiment;
    let layout = run.fitted.layout();
    let at = place(&layout, req)?;
    let train = exp.split_files()?.train;
    let ds = run.fitted.encode_file(&train, exp.data.encode_options()).map_err(|e| e.to_string())?;
    let tasks = layout.tasks.len().max(1);
    let mut counts = MiCounts::new(at.max_len);
    let mut batch = ds.new_batch();
    let mut start = 0;
    while start < ds.rows {
        let end = (start + BATCH_ROWS).min(ds.rows);
        ds.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
        let (cat, seq) = (&batch.cat[at.target_group], &batch.seq_ids[at.sequence_group]);
        for r in 0..batch.rows {
            let target = cat[r * at.target_columns + at.target_column];
            let from = (r * at.sequence_columns + at.sequence_column) * at.max_len;
            counts.add(target, batch.labels[r * tasks] > 0.5, &seq[from..from + at.max_len]);
        }
        start = end;
    }
    let mut targets: Vec<(u32, u64)> = counts.targets.iter().map(|(&t, &(p, n))| (t, p + n)).collect();
    targets.sort_by_key(|&(t, n)| (std::cmp::Reverse(n), t));
    let mut maps = Vec::new();
    let mut map_ids = Vec::new();
    for &(t, samples) in targets.iter().take(req.targets) {
        let Some((rows, mi)) = counts.heat_map(t, req.categories, req.positions) else { continue };
        maps.push(MiMap {
            target: category_name(run, &at, t),
            samples,
            positives: counts.targets[&t].0,
            categories: rows.iter().map(|&c| category_name(run, &at, c)).collect(),
            normalized: min_max(&mi),
            mi,
        });
        map_ids.push((t, rows));
    }
    let seq = &layout.sequence[at.sequence_group];
    let analysis = MiAnalysis {
        sequence: seq.name.clone(),
        column: seq.columns[at.sequence_column].clone(),
        target: at.target.clone(),
        task: layout.tasks.first().cloned().unwrap_or_default(),
        split: "train".into(),
        rows: ds.rows,
        positions: req.positions,
        maps,
    };
    Ok(MiMeasured { analysis, counts, place: at, map_ids })
}

/// The value in the data of a category id of the target's column.
pub fn category_name(run: &crate::train::LoadedRun, at: &MiPlace, id: u32) -> String {
    let vocab = &run.fitted.vocabs.categorical[at.target_group][at.target_column];
    match id.checked_sub(at.offset).and_then(|local| vocab.value(local)) {
        Some(v) => v.to_string(),
        None if id == at.offset => "(padding)".to_string(),
        None => "(out of vocabulary)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MI of a 2 × 2 table straight from its definition, Σ p(x, y) log2 p(x, y) / (p(x) p(y)).
    fn by_definition(table: [[f64; 2]; 2]) -> f64 {
        let s: f64 = table.iter().flatten().sum();
        let px = [table[0][0] + table[0][1], table[1][0] + table[1][1]];
        let py = [table[0][0] + table[1][0], table[0][1] + table[1][1]];
        let mut mi = 0.0;
        for (row, x) in table.iter().zip(px) {
            for (&joint, y) in row.iter().zip(py) {
                if joint > 0.0 {
                    mi += joint / s * (joint * s / (x * y)).log2();
                }
            }
        }
        mi
    }

    #[test]
    fn mi_against_a_hand_count() {
        // 10 samples, 4 positive: 3 positives and 1 negative have the behaviour.
        // Table [X][Y] (Y = 1 first): X: [3, 1], not X: [1, 5].
        let mi = mutual_information(3.0, 1.0, 4.0, 6.0);
        assert!((mi - by_definition([[3.0, 1.0], [1.0, 5.0]])).abs() < 1e-12, "{mi}");
        // By hand: 0.3·log2(3·10/(4·4)) + 0.1·log2(10/(4·6)) + 0.1·log2(10/(6·4)) + 0.5·log2(5·10/(6·6)).
        let hand = 0.3 * (30.0f64 / 16.0).log2()
            + 0.1 * (10.0f64 / 24.0).log2()
            + 0.1 * (10.0f64 / 24.0).log2()
            + 0.5 * (50.0f64 / 36.0).log2();
        assert!((mi - hand).abs() < 1e-12);
        // Independent: X in half of each class.
        assert!(mutual_information(2.0, 3.0, 4.0, 6.0).abs() < 1e-12);
        // X = Y: MI is the label's entropy.
        let h = -(0.4f64 * 0.4f64.log2() + 0.6 * 0.6f64.log2());
        assert!((mutual_information(4.0, 0.0, 4.0, 6.0) - h).abs() < 1e-3, "an empty cell counts 1e-5");
    }

    #[test]
    fn counts_by_target_category_and_position() {
        let mut c = MiCounts::new(2);
        // Target 7; sequences right-aligned (the most recent last), 0 is padding.
        c.add(7, true, &[0, 5, 7]);
        c.add(7, true, &[5, 7, 7]);
        c.add(7, false, &[0, 0, 5]);
        c.add(9, false, &[7, 7, 7]);
        assert_eq!(c.targets[&7], (2, 1));
        assert_eq!(c.cells[&(7, 7, 1)], (2, 0));
        assert_eq!(c.cells[&(7, 5, 1)], (0, 1));
        assert_eq!(c.cells[&(7, 5, 2)], (1, 0));
        assert_eq!(c.cells[&(7, 7, 2)], (1, 0));
        assert!(!c.cells.contains_key(&(7, 5, 3)), "position 3 is beyond the 2 counted");
        let (rows, mi) = c.heat_map(7, 2, 2).unwrap();
        // 7 is seen 3 times at positions 1..2, 5 twice.
        assert_eq!(rows, [7, 5]);
        assert!((mi[0][0] - mutual_information(2.0, 0.0, 2.0, 1.0)).abs() < 1e-12);
        assert!((mi[1][1] - mutual_information(1.0, 0.0, 2.0, 1.0)).abs() < 1e-12);
        assert_eq!(c.heat_map(8, 2, 2), None);
        assert_eq!(c.cell_mi(8, 7, 1), 0.0, "no sample has target 8");
        // Over position 1 alone, 5 and 7 are seen once and twice.
        assert_eq!(c.heat_map(7, 2, 1).unwrap().0, [7, 5]);
        assert_eq!(c.heat_map(7, 2, 1).unwrap().1[1], [mutual_information(0.0, 1.0, 2.0, 1.0)]);
        let n = min_max(&[vec![1.0, 3.0], vec![2.0, 5.0]]);
        assert_eq!(n, [vec![0.0, 0.5], vec![0.25, 1.0]]);
    }
}
