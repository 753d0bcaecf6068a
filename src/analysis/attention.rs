//! What this module owns: the model side of the card's measures B and C for a model that
//! attends over a behaviour sequence (`mdl analyze --mi SEQ --attention PROBE`). The probe
//! holds one value per slot of the sequence (the weight, or the score, the model gives each
//! behaviour), read on the test split; the sequence's categories and the ground truth come from
//! [`super::correlation`] (`--mi`):
//!
//! - **Learned correlation**: the mean value of the probe at a behaviour of category c_i at
//!   target-relative position p, over the test samples whose target has category c_t: a map per
//!   target category over the same categories and positions as the MI map, min–max normalised,
//!   and Spearman's rank correlation between the two maps (how far the model's attention follows
//!   the data's correlation). With a second probe of ‖r‖, the norm of the target-aware
//!   representation at each slot (`--attention-norm`), the map is the card's
//!   Cor = exp(z)·‖r‖ instead ([`weighted_map`]): the attention probe's cell means (the logits
//!   z) z-scored over the map's cells, softmaxed over them, times the cell means of ‖r‖.
//! - **Retrieval NDCG** (DARE's retrieval quality): a behaviour's relevance is the MI (from
//!   train) of its cell (the sample's target category, its category, its position); the
//!   behaviours of a sample ranked by the probe's value (ties: the more recent first) give
//!   NDCG@k = DCG@k / ideal DCG@k with DCG@k = Σ_{i ≤ k} rel_(i) / log2(i + 1), averaged over the
//!   test samples with a behaviour of non-zero relevance; the same for the recency order (most
//!   recent first) is the baseline a model's attention has to beat.
//!
//! Slots are right-aligned like the sequence (slot j of L is position L − j, see
//! [`super::correlation`]); padding slots (id 0) are left out.

use super::correlation::{min_max, MiCounts, MiMeasured};
use serde::Serialize;
use std::collections::HashMap;

/// The k of NDCG@k (the card reports k up to 20).
pub const NDCG_KS: [usize; 4] = [1, 5, 10, 20];

/// NDCG@k of relevances in a ranked order: DCG@k of `ranked` over DCG@k of the same values
/// sorted largest first; `None` when that ideal DCG is 0 (nothing relevant).
pub fn ndcg(ranked: &[f64], k: usize) -> Option<f64> {
    let dcg = |rels: &[f64]| -> f64 { rels.iter().take(k).enumerate().map(|(i, r)| r / (i as f64 + 2.0).log2()).sum() };
    let mut ideal = ranked.to_vec();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let best = dcg(&ideal);
    (best > 0.0).then(|| dcg(ranked) / best)
}

/// Ranks from 1, ties given the mean of the ranks they span.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            out[o] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation of paired values (Pearson's correlation of their ranks);
/// `None` for fewer than two pairs or a constant side.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "paired values");
    if x.len() < 2 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// The sums of a probe's values while the test split is read.
#[derive(Clone, Debug, Default)]
pub struct AttentionSums {
    /// Positions of the maps (1..=positions).
    positions: usize,
    /// Per (target category, behaviour category, position): the sum of values and the count.
    cells: HashMap<(u32, u32, usize), (f64, u64)>,
    /// The same for the ‖r‖ probe, when one is followed.
    norm_cells: HashMap<(u32, u32, usize), (f64, u64)>,
    /// Test samples per target category.
    targets: HashMap<u32, u64>,
    /// Relevance (MI) of each cell met, computed once.
    relevance: HashMap<(u32, u32, usize), f64>,
    /// Sums of NDCG@k per k of [`NDCG_KS`], by the probe's order and by recency, and the
    /// samples they average over and those left out (no behaviour of non-zero relevance).
    ndcg_model: [f64; NDCG_KS.len()],
    ndcg_recency: [f64; NDCG_KS.len()],
    ranked: u64,
    unranked: u64,
}

impl AttentionSums {
    pub fn new(positions: usize) -> AttentionSums {
        AttentionSums { positions, ..AttentionSums::default() }
    }

    /// Adds one sample: its target category, its behaviours' categories (right-aligned,
    /// padding 0), the probe's value at each slot and, when followed, the ‖r‖ probe's;
    /// `truth` gives the relevances.
    pub fn add(&mut self, truth: &MiCounts, target: u32, behaviours: &[u32], values: &[f32], norms: Option<&[f32]>) {
        assert_eq!(behaviours.len(), values.len(), "a value per slot");
        assert!(norms.is_none_or(|n| n.len() == values.len()), "a norm per slot");
        *self.targets.entry(target).or_default() += 1;
        let len = behaviours.len();
        // (value, position, relevance) of each behaviour.
        let mut seen: Vec<(f64, usize, f64)> = Vec::new();
        for (slot, (&id, &v)) in behaviours.iter().zip(values).enumerate() {
            if id == 0 {
                continue;
            }
            let p = len - slot;
            if p <= self.positions {
                let cell = self.cells.entry((target, id, p)).or_default();
                cell.0 += v as f64;
                cell.1 += 1;
                if let Some(norms) = norms {
                    let cell = self.norm_cells.entry((target, id, p)).or_default();
                    cell.0 += norms[slot] as f64;
                    cell.1 += 1;
                }
            }
            let rel = *self.relevance.entry((target, id, p)).or_insert_with(|| truth.cell_mi(target, id, p));
            seen.push((v as f64, p, rel));
        }
        // Recency: position 1 first.
        seen.sort_by_key(|&(_, p, _)| p);
        let recency: Vec<f64> = seen.iter().map(|s| s.2).collect();
        // The probe's order, largest first; the sort is stable, so ties keep recency's order.
        seen.sort_by(|a, b| b.0.total_cmp(&a.0));
        let model: Vec<f64> = seen.iter().map(|s| s.2).collect();
        if ndcg(&model, 1).is_none() {
            self.unranked += 1;
            return;
        }
        self.ranked += 1;
        for (i, &k) in NDCG_KS.iter().enumerate() {
            self.ndcg_model[i] += ndcg(&model, k).unwrap_or(0.0);
            self.ndcg_recency[i] += ndcg(&recency, k).unwrap_or(0.0);
        }
    }

    /// The mean value at (target, category, position), when a sample had such a behaviour.
    pub fn mean(&self, target: u32, category: u32, position: usize) -> Option<f64> {
        self.cells.get(&(target, category, position)).map(|&(sum, n)| sum / n as f64)
    }

    /// The mean ‖r‖ at (target, category, position), when a ‖r‖ probe is followed and a
    /// sample had such a behaviour.
    pub fn mean_norm(&self, target: u32, category: u32, position: usize) -> Option<f64> {
        self.norm_cells.get(&(target, category, position)).map(|&(sum, n)| sum / n as f64)
    }

    /// The retrieval measures so far.
    pub fn retrieval(&self) -> Retrieval {
        let mean = |sums: &[f64]| sums.iter().map(|s| s / self.ranked.max(1) as f64).collect();
        Retrieval {
            ks: NDCG_KS.to_vec(),
            model: mean(&self.ndcg_model),
            recency: mean(&self.ndcg_recency),
            samples: self.ranked,
            left_out: self.unranked,
        }
    }
}

/// One target category's learned map in `analysis.json`, over the rows and positions of the
/// MI map of the same target.
#[derive(Clone, Debug, Serialize)]
pub struct LearnedMap {
    pub target: String,
    /// Test samples whose target has this category.
    pub samples: u64,
    pub categories: Vec<String>,
    /// The probe's mean value, `[category][position - 1]` (none where no test sample had such
    /// a behaviour).
    pub mean: Vec<Vec<Option<f64>>>,
    /// With a ‖r‖ probe: its mean value per cell, and the card's exp(z)·‖r‖ per cell
    /// ([`weighted_map`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_norm: Option<Vec<Vec<Option<f64>>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weighted: Option<Vec<Vec<Option<f64>>>>,
    /// The learned map (`weighted` where there is one, else `mean`), min–max normalised
    /// over the cells with a value (0 elsewhere).
    pub normalized: Vec<Vec<f64>>,
    /// Spearman's rank correlation of the learned map with the MI map over the cells with a
    /// value.
    pub rank_correlation: Option<f64>,
}

/// Retrieval NDCG in `analysis.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Retrieval {
    pub ks: Vec<usize>,
    /// Mean NDCG@k of the probe's order and of the recency order, per k.
    pub model: Vec<f64>,
    pub recency: Vec<f64>,
    /// Test samples averaged over, and those left out (no behaviour of non-zero relevance).
    pub samples: u64,
    pub left_out: u64,
}

/// `analysis.json`'s `attention`.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionAnalysis {
    pub probe: String,
    /// The ‖r‖ probe of `--attention-norm`, when the maps are exp(z)·‖r‖.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_probe: Option<String>,
    pub sequence: String,
    pub split: String,
    pub rows: usize,
    pub maps: Vec<LearnedMap>,
    pub retrieval: Retrieval,
}

/// The card's learned correlation Cor = exp(z)·‖r‖ of a map: the cell means `z` (the
/// attention logits) z-scored over the cells with a value, softmaxed over those cells, times
/// the cell's mean ‖r‖ (`norms`); `None` where a cell has no value. The card's TIN script
/// computes it so (its min–max normalisation is [`LearnedMap::normalized`]'s). With z
/// constant over the cells (no spread to standardise) the softmax is uniform.
pub fn weighted_map(z: &[Vec<Option<f64>>], norms: &[Vec<Option<f64>>]) -> Vec<Vec<Option<f64>>> {
    let values: Vec<f64> = z.iter().flatten().flatten().copied().collect();
    if values.is_empty() {
        return z.to_vec();
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    let standard = |v: f64| if sd > 0.0 { (v - mean) / sd } else { 0.0 };
    let top = values.iter().map(|&v| standard(v)).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = values.iter().map(|&v| (standard(v) - top).exp()).sum();
    z.iter()
        .zip(norms)
        .map(|(zr, nr)| {
            zr.iter()
                .zip(nr)
                .map(|(v, r)| match (v, r) {
                    (Some(v), Some(r)) => Some((standard(*v) - top).exp() / total * r),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The analysis of the sums of `probe` over `rows` test rows against the ground truth `mi`;
/// `name` gives a category id's value.
pub fn finish(
    probe: &str,
    rows: usize,
    sums: &AttentionSums,
    mi: &MiMeasured,
    name: impl Fn(u32) -> String,
) -> AttentionAnalysis {
    let positions = mi.analysis.positions;
    let maps = mi
        .map_ids
        .iter()
        .zip(&mi.analysis.maps)
        .map(|((target, categories), truth)| {
            let grid = |f: &dyn Fn(u32, usize) -> Option<f64>| -> Vec<Vec<Option<f64>>> {
                categories.iter().map(|&c| (1..=positions).map(|p| f(c, p)).collect()).collect()
            };
            let mean = grid(&|c, p| sums.mean(*target, c, p));
            let mean_norm = (!sums.norm_cells.is_empty()).then(|| grid(&|c, p| sums.mean_norm(*target, c, p)));
            let weighted = mean_norm.as_ref().map(|norms| weighted_map(&mean, norms));
            let map = weighted.as_ref().unwrap_or(&mean);
            let (mut learned, mut ground) = (Vec::new(), Vec::new());
            for (row, mi_row) in map.iter().zip(&truth.mi) {
                for (v, m) in row.iter().zip(mi_row) {
                    if let Some(v) = v {
                        learned.push(*v);
                        ground.push(*m);
                    }
                }
            }
            // Cells with no value take the lowest value before normalising, so they show as 0.
            let low = learned.iter().copied().fold(f64::INFINITY, f64::min);
            let filled: Vec<Vec<f64>> = map.iter().map(|row| row.iter().map(|v| v.unwrap_or(low)).collect()).collect();
            LearnedMap {
                target: name(*target),
                samples: sums.targets.get(target).copied().unwrap_or(0),
                categories: categories.iter().map(|&c| name(c)).collect(),
                normalized: if learned.is_empty() {
                    filled.iter().map(|r| vec![0.0; r.len()]).collect()
                } else {
                    min_max(&filled)
                },
                mean,
                mean_norm,
                weighted,
                rank_correlation: spearman(&learned, &ground),
            }
        })
        .collect();
    AttentionAnalysis {
        probe: probe.to_string(),
        norm_probe: None,
        sequence: mi.analysis.sequence.clone(),
        split: "test".into(),
        rows,
        maps,
        retrieval: sums.retrieval(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_of_a_hand_ranking() {
        // Relevances in ranked order 1, 3, 0, 2; ideal 3, 2, 1, 0.
        let ranked = [1.0, 3.0, 0.0, 2.0];
        let dcg = 1.0 + 3.0 / 3f64.log2() + 0.0 + 2.0 / 5f64.log2();
        let ideal = 3.0 + 2.0 / 3f64.log2() + 1.0 / 2.0 + 0.0;
        assert!((ndcg(&ranked, 4).unwrap() - dcg / ideal).abs() < 1e-12);
        // @1: 1 against 3; @10 past the end is @4.
        assert!((ndcg(&ranked, 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(ndcg(&ranked, 10), ndcg(&ranked, 4));
        assert_eq!(ndcg(&[3.0, 2.0, 1.0], 2), Some(1.0));
        assert_eq!(ndcg(&[0.0, 0.0], 2), None);
        assert_eq!(ndcg(&[], 5), None);
    }

    #[test]
    fn spearman_of_hand_pairs() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 40.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // Ties share their mean rank: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4.
        let rx = [1.0, 2.5, 2.5, 4.0];
        let (m, ry) = (2.5, [1.0, 2.0, 3.0, 4.0]);
        let sxy: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - m) * (b - m)).sum();
        let sxx: f64 = rx.iter().map(|a| (a - m) * (a - m)).sum();
        let syy: f64 = ry.iter().map(|b| (b - m) * (b - m)).sum();
        let want = sxy / (sxx * syy).sqrt();
        assert!((spearman(&[0.1, 0.5, 0.5, 0.9], &[1.0, 2.0, 3.0, 4.0]).unwrap() - want).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
    }

    /// Train counts of target 7 (2 positive, 2 negative samples): the category at position 1
    /// decides the label (5: positive, 6: negative); category 6 at position 3 is in one
    /// sample of each class (no information).
    fn truth() -> MiCounts {
        let mut c = MiCounts::new(3);
        c.add(7, true, &[0, 6, 5]);
        c.add(7, true, &[6, 6, 5]);
        c.add(7, false, &[6, 5, 6]);
        c.add(7, false, &[5, 6, 6]);
        c
    }

    fn flat_norms() -> Option<f64> {
        let mut s = AttentionSums::new(2);
        s.add(&truth(), 7, &[6, 6, 5], &[1.0, 1.0, 1.0], None);
        s.mean_norm(7, 5, 1)
    }

    /// exp(z)·‖r‖ of a hand map: z = (0, 2, none, 4) has mean 2 and standard deviation
    /// √(8/3); the softmax of the z-scores times the norms, by hand.
    #[test]
    fn weighted_map_of_hand_cells() {
        let z = vec![vec![Some(0.0), Some(2.0)], vec![None, Some(4.0)]];
        let r = vec![vec![Some(1.0), Some(2.0)], vec![Some(7.0), Some(0.5)]];
        let w = weighted_map(&z, &r);
        let sd = (8.0f64 / 3.0).sqrt();
        let e: Vec<f64> = [0.0, 2.0, 4.0].iter().map(|v: &f64| ((v - 2.0) / sd).exp()).collect();
        let total: f64 = e.iter().sum();
        let want = [e[0] / total * 1.0, e[1] / total * 2.0, e[2] / total * 0.5];
        let got = [w[0][0].unwrap(), w[0][1].unwrap(), w[1][1].unwrap()];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        assert_eq!(w[1][0], None, "no z, no value");
        // A constant z: a uniform softmax, so the map is the norms over the cell count.
        let flat = weighted_map(&[vec![Some(3.0), Some(3.0)]], &[vec![Some(2.0), Some(4.0)]]);
        assert_eq!(flat, vec![vec![Some(1.0), Some(2.0)]]);
        // The norms change the ranking: a lower z with a larger ‖r‖ can come first.
        let turned = weighted_map(&[vec![Some(0.0), Some(1.0)]], &[vec![Some(10.0), Some(1.0)]]);
        assert!(turned[0][0] > turned[0][1]);
    }

    #[test]
    fn mean_attention_per_cell_and_ndcg_against_recency() {
        let truth = truth();
        assert!((truth.cell_mi(7, 5, 1) - 1.0).abs() < 1e-3 && (truth.cell_mi(7, 6, 1) - 1.0).abs() < 1e-3);
        assert!(truth.cell_mi(7, 6, 3).abs() < 1e-12);
        let mut s = AttentionSums::new(2);
        // Two test samples of target 7: slots oldest first.
        s.add(&truth, 7, &[6, 6, 5], &[0.5, 0.25, 0.125], Some(&[2.0, 1.0, 3.0]));
        s.add(&truth, 7, &[0, 5, 6], &[0.0, 0.75, 0.0625], Some(&[9.0, 4.0, 5.0]));
        assert_eq!(s.mean(7, 5, 1), Some(0.125));
        assert_eq!(s.mean(7, 6, 1), Some(0.0625));
        assert_eq!(s.mean(7, 6, 2), Some(0.25));
        assert_eq!(s.mean(7, 5, 2), Some(0.75));
        assert_eq!(s.mean(7, 6, 3), None, "position 3 is past the map's 2");
        // The norms of the same cells (a padding slot adds none).
        assert_eq!(
            (s.mean_norm(7, 5, 1), s.mean_norm(7, 6, 1), s.mean_norm(7, 5, 2)),
            (Some(3.0), Some(5.0), Some(4.0))
        );
        assert_eq!(flat_norms(), None);
        let r = s.retrieval();
        assert_eq!((r.samples, r.left_out), (2, 0));
        // By hand, NDCG@1: sample 1 ranks position 3 (cat 6) first, sample 2 position 2 (cat 5).
        let rel = |c, p| truth.cell_mi(7, c, p);
        let at1 = |first: f64, all: &[f64]| first / all.iter().copied().fold(0.0, f64::max);
        let one = at1(rel(6, 3), &[rel(6, 3), rel(6, 2), rel(5, 1)]);
        let two = at1(rel(5, 2), &[rel(5, 2), rel(6, 1)]);
        assert!((r.model[0] - (one + two) / 2.0).abs() < 1e-12, "{r:?}");
        let recency =
            (at1(rel(5, 1), &[rel(6, 3), rel(6, 2), rel(5, 1)]) + at1(rel(6, 1), &[rel(5, 2), rel(6, 1)])) / 2.0;
        assert!((r.recency[0] - recency).abs() < 1e-12, "{r:?}");
        // A constant probe ranks by recency.
        let mut flat = AttentionSums::new(2);
        flat.add(&truth, 7, &[6, 6, 5], &[1.0, 1.0, 1.0], None);
        let f = flat.retrieval();
        assert_eq!(f.model, f.recency);
        // A target no train sample has gives no relevance: left out.
        flat.add(&truth, 9, &[6, 6, 5], &[1.0, 1.0, 1.0], None);
        assert_eq!((flat.retrieval().samples, flat.retrieval().left_out), (1, 1));
    }
}
