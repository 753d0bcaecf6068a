//! Evaluation metrics for every kind of task ([`crate::tasks`]), and the per-task /
//! per-domain [`Report`].
//!
//! Binary tasks (a label counts as positive when it is > 0.5):
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
//! Regression tasks, on the label's own scale (a task declared with `log = true` is
//! scored by its back-transformed prediction `exp(z) - 1`):
//!
//! * **rmse** — `sqrt(mean((prediction - label)²))`; **mae** — `mean(|prediction - label|)`;
//! * **rmsle**, for a task declared with `log = true` — the RMSE on the scale it trains on,
//!   `sqrt(mean((log(1 + prediction) - log(1 + label))²))`.
//!
//! Classes and candidates tasks, from each row's logits `z` and the position `y` of its
//! true class (the label; for candidates the first, `0`):
//!
//! * **logloss** — the mean softmax cross-entropy `logsumexp(z) - z_y` (natural log);
//! * **accuracy** — the share of rows whose arg-max (the lowest of equal maxima, what
//!   `mdl predict` writes) is `y`;
//! * **hr@k** — the share of rows where `y` ranks in the top `k`; **ndcg@k** — the mean of
//!   `1 / log2(rank + 2)` over those rows (0 elsewhere). The rank of `y` is the number of
//!   other positions scoring above it *or equal to it* (ties count against the true item,
//!   so a model that scores everything alike earns no hits); a NaN score ranks above
//!   every number, as `top_k` ranks it.
//!
//! These extra figures sit beside `count` in a task's object (`"rmse": ...`, `"hr@10":
//! ...`); a binary task has none, so its object is what it always was. Every function
//! returns `None` rather than panicking when its inputs differ in length.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::tasks::TaskKind;

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
    /// The metrics of a kind other than binary: `rmse`, `mae`; `accuracy`, `hr@k`, `ndcg@k`.
    #[serde(flatten)]
    pub more: BTreeMap<String, f64>,
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
    #[serde(flatten)]
    pub more: BTreeMap<String, f64>,
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
    /// The first task's metrics of a kind other than binary (see [`TaskMetrics::more`]).
    #[serde(flatten)]
    pub more: BTreeMap<String, f64>,
    pub per_task: BTreeMap<String, TaskMetrics>,
    pub per_domain: BTreeMap<u32, DomainMetrics>,
}

impl Report {
    /// The first task's validation metric `name` (`auc`, `rmse`, `hr@10`, ...), if defined.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "auc" => self.auc,
            "gauc" => self.gauc,
            "logloss" => self.logloss,
            other => self.more.get(other).copied(),
        }
    }
}

/// One task's evaluation outputs, for [`Report::of_tasks`].
pub struct TaskRows<'a> {
    pub name: &'a str,
    pub kind: &'a TaskKind,
    /// `rows × width` values, row-major: the probability (binary) or the prediction
    /// (regression; width 1), or each row's logits (classes, candidates).
    pub outputs: &'a [f32],
    pub width: usize,
    /// One label per row (empty for candidates, whose positive is the first).
    pub labels: &'a [f32],
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
        more: BTreeMap::new(),
    }
}

/// Root mean squared error and mean absolute error; `None` for no rows or unequal lengths.
pub fn rmse_mae(predictions: &[f32], labels: &[f32]) -> Option<(f64, f64)> {
    if predictions.len() != labels.len() || predictions.is_empty() {
        return None;
    }
    let (mut sq, mut abs) = (0.0f64, 0.0f64);
    for (&p, &y) in predictions.iter().zip(labels) {
        let d = p as f64 - y as f64;
        sq += d * d;
        abs += d.abs();
    }
    let n = predictions.len() as f64;
    Some(((sq / n).sqrt(), abs / n))
}

/// One row of logits against its true position `y`: (softmax cross-entropy, whether the
/// arg-max is `y`, the rank of `y`; see the module documentation).
pub fn ranked(logits: &[f32], y: usize) -> (f64, bool, usize) {
    let zy = logits[y];
    let max = logits.iter().map(|&z| z as f64).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    let ce = total.ln() + max - zy as f64;
    let mut rank = 0;
    let mut first_max = 0;
    for (j, &z) in logits.iter().enumerate() {
        if z.total_cmp(&logits[first_max]) == Ordering::Greater {
            first_max = j;
        }
        if j != y && z.total_cmp(&zy) != Ordering::Less {
            rank += 1;
        }
    }
    (ce, first_max == y, rank)
}

/// The rows of one domain (or all of them) of a task of a kind other than binary.
fn kind_metrics(task: &TaskRows, rows: &[usize]) -> (Option<f64>, BTreeMap<String, f64>) {
    let mut more = BTreeMap::new();
    if rows.is_empty() {
        return (None, more);
    }
    let n = rows.len() as f64;
    match task.kind {
        TaskKind::Binary => (None, more),
        TaskKind::Regression { .. } => {
            let p: Vec<f32> = rows.iter().map(|&r| task.outputs[r]).collect();
            let y: Vec<f32> = rows.iter().map(|&r| task.labels[r]).collect();
            if let Some((rmse, mae)) = rmse_mae(&p, &y) {
                more.insert("rmse".into(), rmse);
                more.insert("mae".into(), mae);
            }
            if *task.kind == (TaskKind::Regression { log: true }) {
                let sq: f64 =
                    p.iter().zip(&y).map(|(&p, &y)| (p as f64).ln_1p() - (y as f64).ln_1p()).map(|d| d * d).sum();
                more.insert("rmsle".into(), (sq / n).sqrt());
            }
            (None, more)
        }
        TaskKind::Classes { top, .. } | TaskKind::Candidates { top } => {
            let (mut ce, mut correct) = (0.0f64, 0usize);
            let mut hits = vec![0usize; top.len()];
            let mut gains = vec![0.0f64; top.len()];
            for &r in rows {
                let y = task.labels.get(r).map_or(0, |&y| y as usize);
                let (c, ok, rank) = ranked(&task.outputs[r * task.width..(r + 1) * task.width], y);
                ce += c;
                correct += usize::from(ok);
                for (i, &k) in top.iter().enumerate() {
                    if rank < k {
                        hits[i] += 1;
                        gains[i] += 1.0 / ((rank + 2) as f64).log2();
                    }
                }
            }
            more.insert("accuracy".into(), correct as f64 / n);
            for (i, k) in top.iter().enumerate() {
                more.insert(format!("hr@{k}"), hits[i] as f64 / n);
                more.insert(format!("ndcg@{k}"), gains[i] / n);
            }
            (Some(ce / n), more)
        }
    }
}

impl Report {
    /// Computes the report of binary tasks from row-major `scores` and `labels`
    /// (`[rows, tasks]`, one probability / 0-1 label per task) and optional per-row domain
    /// and user ids.
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
        let columns: Vec<(Vec<f32>, Vec<f32>)> = (0..width)
            .map(|t| {
                let s = scores.iter().skip(t).step_by(width).copied().collect();
                let y = labels.iter().skip(t).step_by(width).copied().collect();
                (s, y)
            })
            .collect();
        let rows: Vec<TaskRows> = tasks
            .iter()
            .zip(&columns)
            .map(|(name, (s, y))| TaskRows { name, kind: &TaskKind::Binary, outputs: s, width: 1, labels: y })
            .collect();
        Report::of_tasks(&rows, domain, user)
    }

    /// Computes the report of tasks of any kind, each with its outputs and labels (see
    /// [`TaskRows`]), with optional per-row domain and user ids.
    pub fn of_tasks(tasks: &[TaskRows], domain: Option<&[u32]>, user: Option<&[u32]>) -> Result<Report, MetricsError> {
        let Some(first) = tasks.first() else {
            return Err(MetricsError("no tasks".into()));
        };
        let rows = first.outputs.len() / first.width.max(1);
        for t in tasks {
            let labelled = !matches!(t.kind, TaskKind::Candidates { .. });
            if t.width == 0
                || t.outputs.len() != rows * t.width
                || (labelled && t.labels.len() != rows)
                || (t.kind.scalar_output() && t.width != 1)
            {
                return Err(MetricsError(format!(
                    "task '{}': {} outputs of width {} and {} labels do not form {rows} rows",
                    t.name,
                    t.outputs.len(),
                    t.width,
                    t.labels.len()
                )));
            }
        }
        for (name, ids) in [("domain", domain), ("user", user)] {
            if let Some(ids) = ids {
                if ids.len() != rows {
                    return Err(MetricsError(format!("{} {name} ids for {rows} rows", ids.len())));
                }
            }
        }
        let mut per_task = BTreeMap::new();
        let mut main = None;
        for (t, task) in tasks.iter().enumerate() {
            let mut by_domain: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            if let Some(domain) = domain {
                for (r, &d) in domain.iter().enumerate() {
                    by_domain.entry(d).or_default().push(r);
                }
            }
            let metrics = if *task.kind == TaskKind::Binary {
                let (scores, labels) = (task.outputs, task.labels);
                let mut per_domain = BTreeMap::new();
                for (d, rows) in by_domain {
                    let s: Vec<f32> = rows.iter().map(|&r| scores[r]).collect();
                    let y: Vec<f32> = rows.iter().map(|&r| labels[r]).collect();
                    per_domain.insert(d, domain_metrics(&s, &y));
                }
                let overall = domain_metrics(scores, labels);
                TaskMetrics {
                    count: rows,
                    positives: overall.positives,
                    auc: overall.auc,
                    gauc: user.and_then(|user| gauc(scores, labels, user)),
                    logloss: overall.logloss,
                    more: BTreeMap::new(),
                    per_domain,
                }
            } else {
                let positives = 0;
                let per_domain = by_domain
                    .into_iter()
                    .map(|(d, rows)| {
                        let (logloss, more) = kind_metrics(task, &rows);
                        (d, DomainMetrics { count: rows.len(), positives, auc: None, logloss, more })
                    })
                    .collect();
                let all: Vec<usize> = (0..rows).collect();
                let (logloss, more) = kind_metrics(task, &all);
                TaskMetrics { count: rows, positives, auc: None, gauc: None, logloss, more, per_domain }
            };
            if per_task.insert(task.name.to_string(), metrics.clone()).is_some() {
                return Err(MetricsError(format!("task name '{}' appears twice", task.name)));
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
            more: main.more,
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
    fn rmse_and_mae_on_a_hand_made_case() {
        // Errors 1, -2, 0.5: squares 1 + 4 + 0.25 = 5.25; absolutes 3.5.
        let (rmse, mae) = rmse_mae(&[2.0, 0.0, 1.5], &[1.0, 2.0, 1.0]).expect("rows");
        assert!((rmse - (5.25f64 / 3.0).sqrt()).abs() < 1e-12 && (mae - 3.5 / 3.0).abs() < 1e-12);
        assert_eq!(rmse_mae(&[], &[]), None);
    }

    #[test]
    fn hit_rate_and_ndcg_on_a_hand_made_case() {
        // Row 0: the true class 0 scores highest (rank 0). Row 1: class 2 (0.6) has 0.8
        // above it and an equal 0.6 beside it, which counts against it (rank 2). Row 2:
        // class 3 scores lowest (rank 3).
        let logits = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.6, 0.6, 0.4, 0.3, 0.2, 0.1];
        let kind = TaskKind::Classes { n: 4, top: vec![1, 3] };
        let task = TaskRows { name: "c", kind: &kind, outputs: &logits, width: 4, labels: &[0.0, 2.0, 3.0] };
        let r = Report::of_tasks(&[task], Some(&[0, 1, 1]), None).expect("report");
        let m = &r.per_task["c"].more;
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(near(m["hr@1"], 1.0 / 3.0) && near(m["hr@3"], 2.0 / 3.0), "{m:?}");
        // NDCG@3: (1/log2(2) + 1/log2(4) + 0) / 3 = 1.5 / 3.
        assert!(near(m["ndcg@1"], 1.0 / 3.0) && near(m["ndcg@3"], 0.5), "{m:?}");
        assert!(near(m["accuracy"], 1.0 / 3.0), "{m:?}");
        let ce = |row: &[f64], y: usize| row.iter().map(|z| z.exp()).sum::<f64>().ln() - row[y];
        let f = |i: usize| logits[i] as f64;
        let rows: Vec<Vec<f64>> = (0..3).map(|r| (0..4).map(|j| f(r * 4 + j)).collect()).collect();
        let want = (ce(&rows[0], 0) + ce(&rows[1], 2) + ce(&rows[2], 3)) / 3.0;
        assert!((r.per_task["c"].logloss.unwrap() - want).abs() < 1e-6, "{:?} vs {want}", r.per_task["c"].logloss);
        // Per domain: domain 1 holds rows 1 and 2 (ranks 2 and 3).
        let d1 = &r.per_task["c"].per_domain[&1].more;
        assert!(near(d1["hr@3"], 0.5) && near(d1["hr@1"], 0.0) && near(d1["ndcg@3"], 0.25), "{d1:?}");
        assert_eq!(r.metric("hr@3"), Some(m["hr@3"]));
        // Candidates: the positive is the first, with no labels.
        let kind = TaskKind::Candidates { top: vec![1] };
        let task = TaskRows { name: "n", kind: &kind, outputs: &logits, width: 4, labels: &[] };
        let r = Report::of_tasks(&[task], None, None).expect("report");
        assert!(near(r.more["hr@1"], 2.0 / 3.0), "rows 0 and 2 score their first candidate highest: {:?}", r.more);
    }

    #[test]
    fn report_shapes_are_checked() {
        let tasks = vec!["a".to_string(), "b".to_string()];
        assert!(Report::compute(&tasks, &[0.5; 3], &[1.0; 3], None, None).is_err());
        assert!(Report::compute(&tasks, &[0.5; 4], &[1.0; 4], Some(&[0]), None).is_err());
        assert!(Report::compute(&[], &[], &[], None, None).is_err());
    }
}
