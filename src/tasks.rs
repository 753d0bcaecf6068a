//! Task kinds: what this module owns is the meaning of a `label` statement's `: kind`
//! everywhere past the parser — the kinds themselves ([`TaskKind`]), the values a label
//! column may hold and how a cell is read ([`LabelValues`], which the data schema carries
//! so that the data layer reads cells without knowing the spec), what one row's model
//! output becomes for `mdl predict`, `mdl serve` and evaluation ([`TaskKind::score`]), and
//! which validation metrics a kind defines and in which direction they improve
//! ([`metric_direction`]).
//!
//! | kind | label cells | logit | loss | scored as | metrics |
//! |---|---|---|---|---|---|
//! | `binary` (default) | `0` / `1` | `[B]` | `bce` | probability | AUC, gAUC, LogLoss |
//! | `regression(log = false)` | finite reals (`> -1` with `log`) | `[B]` | `mse` | the value (`exp(z) - 1` with `log`) | RMSE, MAE (and RMSLE with `log`) |
//! | `classes(n, top = [])` | integers `0 .. n-1` | `[B, n]` | `softmax_ce` | the arg-max class | accuracy, LogLoss, HR@k, NDCG@k |
//! | `candidates(top = [10])` | none (no column) | `[B, N]`, the positive first | `softmax_ce` (or the spec's own) | the arg-max position | accuracy, LogLoss, HR@k, NDCG@k |

use serde::{Deserialize, Serialize};

/// What a task predicts, as its `label` statement declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// A 0/1 label; the logit `[B]` is scored as a probability.
    Binary,
    /// A real label; the output `[B]` predicts it (with `log`, it predicts `log(1 + y)`,
    /// and the prediction is `exp(z) - 1`).
    Regression { log: bool },
    /// An integer label below `n`; the logits `[B, n]` are a softmax over the classes.
    /// `top` lists the cut-offs `k` of HR@k / NDCG@k (the rank of the true class).
    Classes { n: usize, top: Vec<usize> },
    /// No label column: the output `[B, N]` scores `N` candidates of which the first is the
    /// positive (the held-out item against sampled negatives), ranked for HR@k / NDCG@k.
    Candidates { top: Vec<usize> },
}

impl TaskKind {
    /// How the spec writes the kind (for messages).
    pub fn describe(&self) -> String {
        match self {
            TaskKind::Binary => "binary".into(),
            TaskKind::Regression { log: false } => "regression".into(),
            TaskKind::Regression { log: true } => "regression(log = true)".into(),
            TaskKind::Classes { n, .. } => format!("classes({n})"),
            TaskKind::Candidates { .. } => "candidates".into(),
        }
    }

    /// What the task's label column holds; `None` for a kind read from no column.
    pub fn label_values(&self) -> Option<LabelValues> {
        match self {
            TaskKind::Binary => Some(LabelValues::Binary),
            TaskKind::Regression { log } => Some(LabelValues::Real { log: *log }),
            TaskKind::Classes { n, .. } => Some(LabelValues::Classes { n: *n }),
            TaskKind::Candidates { .. } => None,
        }
    }

    /// Whether the logit is one value per row (`[B]`) rather than a row of scores.
    pub fn scalar_output(&self) -> bool {
        matches!(self, TaskKind::Binary | TaskKind::Regression { .. })
    }

    /// What one row's output (`logits`: one value, or the row of class / candidate scores)
    /// is scored as: a probability, the predicted value, or the arg-max position (the
    /// lowest of equal ones; NaN ranks above every number, as `top_k` ranks it).
    pub fn score(&self, logits: &[f32]) -> f32 {
        match self {
            TaskKind::Binary => sigmoid(logits[0]),
            TaskKind::Regression { log: false } => logits[0],
            TaskKind::Regression { log: true } => logits[0].exp_m1(),
            TaskKind::Classes { .. } | TaskKind::Candidates { .. } => {
                let mut best = 0;
                for (i, &z) in logits.iter().enumerate() {
                    if z.total_cmp(&logits[best]) == std::cmp::Ordering::Greater {
                        best = i;
                    }
                }
                best as f32
            }
        }
    }

    /// The cut-offs of HR@k / NDCG@k.
    pub fn top(&self) -> &[usize] {
        match self {
            TaskKind::Classes { top, .. } | TaskKind::Candidates { top } => top,
            _ => &[],
        }
    }
}

/// The logistic function, computed without overflow.
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// What a label column holds, as the spec declares its task (the data schema carries it:
/// `mdl run` fills it from the spec, so an experiment need not write it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LabelValues {
    /// `0` or `1`.
    #[default]
    Binary,
    /// A finite real number (with `log`, greater than -1, so that `log(1 + y)` is finite).
    Real { log: bool },
    /// An integer class in `0 .. n`.
    Classes { n: usize },
}

impl LabelValues {
    pub fn is_binary(&self) -> bool {
        *self == LabelValues::Binary
    }

    /// Reads one label cell; the error says what the cell should have held.
    pub fn parse(self, cell: &str) -> Result<f32, String> {
        match self {
            LabelValues::Binary => match cell {
                "0" => Ok(0.0),
                "1" => Ok(1.0),
                other => match other.trim().parse::<f64>() {
                    Ok(x) if x == 0.0 || x == 1.0 => Ok(x as f32),
                    _ => Err("a label must be 0 or 1".into()),
                },
            },
            LabelValues::Real { log } => {
                let x = cell.trim().parse::<f64>().ok().filter(|x| x.is_finite() && (*x as f32).is_finite());
                match x {
                    None => Err("a regression label must be a finite number".into()),
                    Some(x) if log && x <= -1.0 => {
                        Err("a regression label with `log = true` must be greater than -1".into())
                    }
                    Some(x) => Ok(x as f32),
                }
            }
            LabelValues::Classes { n } => match cell.trim().parse::<u64>() {
                Ok(c) if (c as u128) < n as u128 => Ok(c as f32),
                _ => Err(format!("a class label must be an integer from 0 to {}", n.saturating_sub(1))),
            },
        }
    }

    /// Whether an encoded label is one this column can hold (a cache file is checked).
    pub fn accepts(self, y: f32) -> bool {
        match self {
            LabelValues::Binary => y == 0.0 || y == 1.0,
            LabelValues::Real { log } => y.is_finite() && (!log || y > -1.0),
            LabelValues::Classes { n } => y >= 0.0 && y.fract() == 0.0 && (y as f64) < n as f64,
        }
    }
}

/// Whether a larger value of a validation metric is better (`Some(true)`), a smaller one
/// (`Some(false)`), or the name is no metric (`None`): `auc`, `gauc`, `accuracy`, `hr@k`,
/// `ndcg@k` grow; `logloss`, `rmse`, `mae`, `rmsle` shrink, and so does `loss`, the
/// objective of the stage under way on the valid split (a metric of no task).
pub fn metric_direction(metric: &str) -> Option<bool> {
    match metric {
        "auc" | "gauc" | "accuracy" => Some(true),
        "logloss" | "rmse" | "mae" | "rmsle" | OBJECTIVE_METRIC => Some(false),
        m => {
            let k = m.strip_prefix("hr@").or_else(|| m.strip_prefix("ndcg@"))?;
            (k.parse::<usize>().ok()? > 0 && !k.starts_with('0')).then_some(true)
        }
    }
}

/// The early-stopping metric that is no task's: the objective of the stage under way (the
/// sum of its losses, every loss of the spec without `losses`) on the valid split.
pub const OBJECTIVE_METRIC: &str = "loss";

/// The validation metrics a kind of task defines (those early stopping can watch).
pub fn metrics_of(kind: &TaskKind) -> Vec<String> {
    match kind {
        TaskKind::Binary => vec!["auc".into(), "gauc".into(), "logloss".into()],
        TaskKind::Regression { log: false } => vec!["rmse".into(), "mae".into()],
        TaskKind::Regression { log: true } => vec!["rmse".into(), "mae".into(), "rmsle".into()],
        TaskKind::Classes { top, .. } | TaskKind::Candidates { top } => {
            let mut m = vec!["accuracy".to_string(), "logloss".to_string()];
            for k in top {
                m.push(format!("hr@{k}"));
                m.push(format!("ndcg@{k}"));
            }
            m
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cells_are_read_by_kind() {
        assert_eq!(LabelValues::Binary.parse("1"), Ok(1.0));
        assert!(LabelValues::Binary.parse("0.5").is_err());
        assert_eq!(LabelValues::Real { log: false }.parse(" -2.5 "), Ok(-2.5));
        assert!(LabelValues::Real { log: false }.parse("12ms").unwrap_err().contains("finite number"));
        assert!(LabelValues::Real { log: false }.parse("nan").is_err());
        assert!(LabelValues::Real { log: false }.parse("1e39").is_err());
        assert!(LabelValues::Real { log: true }.parse("-1").unwrap_err().contains("greater than -1"));
        assert_eq!(LabelValues::Classes { n: 3 }.parse("2"), Ok(2.0));
        assert!(LabelValues::Classes { n: 3 }.parse("3").unwrap_err().contains("from 0 to 2"));
        assert!(LabelValues::Classes { n: 3 }.parse("1.5").is_err());
        assert!(LabelValues::Classes { n: 3 }.accepts(2.0) && !LabelValues::Classes { n: 3 }.accepts(2.5));
    }

    #[test]
    fn scores_by_kind() {
        assert_eq!(TaskKind::Binary.score(&[0.0]), 0.5);
        assert_eq!(TaskKind::Regression { log: false }.score(&[3.0]), 3.0);
        assert!((TaskKind::Regression { log: true }.score(&[2.0f32.ln_1p()]) - 2.0).abs() < 1e-6);
        let classes = TaskKind::Classes { n: 4, top: vec![] };
        assert_eq!(classes.score(&[0.1, 0.7, 0.7, -1.0]), 1.0);
    }

    #[test]
    fn metric_directions() {
        assert_eq!(metric_direction("rmse"), Some(false));
        assert_eq!(metric_direction("hr@10"), Some(true));
        assert_eq!(metric_direction("ndcg@5"), Some(true));
        assert_eq!(metric_direction("hr@0"), None);
        assert_eq!(metric_direction("hr@"), None);
        assert_eq!(metric_direction("mse"), None);
    }
}
