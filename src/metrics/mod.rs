//! Evaluation metrics for binary (CTR-style) tasks, and the per-task / per-domain [`Report`].
//!
//! Definitions (a label counts as positive when it is > 0.5):
//!
//! * **AUC** — the probability that a random positive scores above a random negative, ties
//!   counted as 1/2: `(#{(p, n): s_p > s_n} + #{(p, n): s_p = s_n} / 2) / (P · N)`. Computed
//!   exactly in O(n log n) by sorting by score and walking groups of equal scores. Scores are
//!   ordered by `f32::total_cmp` (a NaN score sorts above every number). Undefined (`None`)
//!   when only one class is present.
//! * **gAUC** — group AUC over users: `Σ_u n_u · AUC_u / Σ_u n_u`, where `n_u` is the number of
//!   rows (impressions) of user `u`, over the users that have both a positive and a negative
//!   row; users with one class only are left out of both sums (FuxiCTR's definition). `None`
//!   when no user has both classes.
//! * **logloss** — mean binary cross-entropy with the probability clipped to
//!   `[1e-7, 1 - 1e-7]`. `None` for no rows.
//!
//! Every function returns `None` rather than panicking when its inputs differ in length.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Probabilities are clipped to `[CLIP, 1 - CLIP]` for logloss.
pub const CLIP: f64 = 1e-7;

#[inline]
fn is_positive(label: f32) -> bool {
    label > 0.5
}

/// AUC of the rows `order`, which must be sorted by ascending score.
fn auc_sorted(order: &[usize], scores: &[f32], labels: &[f32]) -> Option<f64> {
    // Twice the number of correctly ordered pairs (ties count 1), to stay in integers.
    let mut doubled_pairs: u128 = 0;
    let (mut negatives_below, mut positives_total) = (0u64, 0u64);
    let mut start = 0;
    while start < order.len() {
        let score = scores[order[start]];
        let mut end = start;
        let (mut positives, mut negatives) = (0u64, 0u64);
        while end < order.len() && scores[order[end]].total_cmp(&score) == Ordering::Equal {
            if is_positive(labels[order[end]]) {
                positives += 1;
            } else {
                negatives += 1;
            }
            end += 1;
        }
        doubled_pairs += 2 * negatives_below as u128 * positives as u128 + positives as u128 * negatives as u128;
        negatives_below += negatives;
        positives_total += positives;
        start = end;
    }
    let pairs = positives_total as u128 * negatives_below as u128;
    (pairs > 0).then(|| doubled_pairs as f64 / (2 * pairs) as f64)
}

/// Exact ROC AUC with ties as 1/2; `None` when only one class is present.
pub fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    auc_sorted(&order, scores, labels)
}

/// User-grouped AUC weighted by each user's row count (see the module documentation).
pub fn gauc(scores: &[f32], labels: &[f32], users: &[u32]) -> Option<f64> {
    if scores.len() != labels.len() || scores.len() != users.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| users[a].cmp(&users[b]).then_with(|| scores[a].total_cmp(&scores[b])));
    let (mut weighted, mut weight) = (0.0f64, 0u64);
    let mut start = 0;
    while start < order.len() {
        let user = users[order[start]];
        let end = start + order[start..].iter().take_while(|&&row| users[row] == user).count();
        if let Some(user_auc) = auc_sorted(&order[start..end], scores, labels) {
            let rows = (end - start) as u64;
            weighted += rows as f64 * user_auc;
            weight += rows;
        }
        start = end;
    }
    (weight > 0).then(|| weighted / weight as f64)
}

/// Mean binary cross-entropy with clipped probabilities; `None` for no rows.
pub fn logloss(scores: &[f32], labels: &[f32]) -> Option<f64> {
    if scores.len() != labels.len() || scores.is_empty() {
        return None;
    }
    let total: f64 = scores
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = (p as f64).clamp(CLIP, 1.0 - CLIP);
            let y = y as f64;
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    Some(total / scores.len() as f64)
}

/// Metrics of one task.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskMetrics {
    pub count: usize,
    pub positives: usize,
    pub auc: Option<f64>,
    /// None without user ids or when no user has both classes.
    pub gauc: Option<f64>,
    pub logloss: Option<f64>,
    /// The same task's metrics within each domain (empty without domain ids).
    pub per_domain: BTreeMap<u32, DomainMetrics>,
}

/// Metrics of one task within one domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DomainMetrics {
    pub count: usize,
    pub positives: usize,
    pub auc: Option<f64>,
    pub logloss: Option<f64>,
}

/// An evaluation report. The top-level `auc`, `gauc`, `logloss` and `per_domain` are those
/// of the first (main) task; `per_task` has every task, each with its own per-domain
/// breakdown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub count: usize,
    pub auc: Option<f64>,
    pub gauc: Option<f64>,
    pub logloss: Option<f64>,
    pub per_task: BTreeMap<String, TaskMetrics>,
    pub per_domain: BTreeMap<u32, DomainMetrics>,
}

/// Inputs to [`Report::compute`] whose sizes do not fit together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsError(pub String);

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metrics: {}", self.0)
    }
}

impl std::error::Error for MetricsError {}

fn domain_metrics(scores: &[f32], labels: &[f32]) -> DomainMetrics {
    DomainMetrics {
        count: scores.len(),
        positives: labels.iter().filter(|&&y| is_positive(y)).count(),
        auc: auc(scores, labels),
        logloss: logloss(scores, labels),
    }
}

impl Report {
    /// Computes the report from row-major `scores` and `labels` (`[rows, tasks]`, one
    /// probability / 0-1 label per task) and optional per-row domain and user ids.
    pub fn compute(
        tasks: &[String],
        scores: &[f32],
        labels: &[f32],
        domain: Option<&[u32]>,
        user: Option<&[u32]>,
    ) -> Result<Report, MetricsError> {
        let width = tasks.len();
        if width == 0 {
            return Err(MetricsError("no tasks".into()));
        }
        if scores.len() != labels.len() || !scores.len().is_multiple_of(width) {
            return Err(MetricsError(format!(
                "{} scores and {} labels do not form rows of {width} tasks",
                scores.len(),
                labels.len()
            )));
        }
        let rows = scores.len() / width;
        for (name, ids) in [("domain", domain), ("user", user)] {
            if let Some(ids) = ids {
                if ids.len() != rows {
                    return Err(MetricsError(format!("{} {name} ids for {rows} rows", ids.len())));
                }
            }
        }
        let mut per_task = BTreeMap::new();
        let mut main = None;
        for (t, name) in tasks.iter().enumerate() {
            let task_scores: Vec<f32> = scores.iter().skip(t).step_by(width).copied().collect();
            let task_labels: Vec<f32> = labels.iter().skip(t).step_by(width).copied().collect();
            let mut per_domain = BTreeMap::new();
            if let Some(domain) = domain {
                let mut by_domain: BTreeMap<u32, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
                for ((&d, &s), &y) in domain.iter().zip(&task_scores).zip(&task_labels) {
                    let entry = by_domain.entry(d).or_default();
                    entry.0.push(s);
                    entry.1.push(y);
                }
                per_domain = by_domain.into_iter().map(|(d, (s, y))| (d, domain_metrics(&s, &y))).collect();
            }
            let overall = domain_metrics(&task_scores, &task_labels);
            let metrics = TaskMetrics {
                count: rows,
                positives: overall.positives,
                auc: overall.auc,
                gauc: user.and_then(|user| gauc(&task_scores, &task_labels, user)),
                logloss: overall.logloss,
                per_domain,
            };
            if per_task.insert(name.clone(), metrics.clone()).is_some() {
                return Err(MetricsError(format!("task name '{name}' appears twice")));
            }
            if t == 0 {
                main = Some(metrics);
            }
        }
        let main = main.ok_or_else(|| MetricsError("no tasks".into()))?;
        Ok(Report {
            count: rows,
            auc: main.auc,
            gauc: main.gauc,
            logloss: main.logloss,
            per_task,
            per_domain: main.per_domain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_small_cases() {
        assert_eq!(auc(&[0.1, 0.9], &[0.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.1], &[0.0, 1.0]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), Some(0.5));
        assert_eq!(auc(&[0.5, 0.7], &[1.0, 1.0]), None);
        assert_eq!(auc(&[], &[]), None);
        assert_eq!(auc(&[0.5], &[1.0, 0.0]), None);
        // Pairs: (0.8 vs 0.2) 1, (0.8 vs 0.4) 1, (0.4 vs 0.2) 1, (0.4 vs 0.4) 1/2 → 3.5 / 4.
        assert_eq!(auc(&[0.8, 0.4, 0.2, 0.4], &[1.0, 1.0, 0.0, 0.0]), Some(0.875));
    }

    #[test]
    fn logloss_clips() {
        let perfect = logloss(&[1.0, 0.0], &[1.0, 0.0]).expect("rows");
        assert!((perfect - (-(1.0 - CLIP).ln())).abs() < 1e-12);
        assert_eq!(logloss(&[], &[]), None);
    }

    #[test]
    fn report_shapes_are_checked() {
        let tasks = vec!["a".to_string(), "b".to_string()];
        assert!(Report::compute(&tasks, &[0.5; 3], &[1.0; 3], None, None).is_err());
        assert!(Report::compute(&tasks, &[0.5; 4], &[1.0; 4], Some(&[0]), None).is_err());
        assert!(Report::compute(&[], &[], &[], None, None).is_err());
    }
}
