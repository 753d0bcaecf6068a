//! `mdl report`: one Markdown table comparing finished runs, read from their run folders
//! (`metrics.json`, and `timing.json` where present); `html.rs` draws the same runs on an
//! HTML page with plots (`--html`).
//!
//! A row per run: model, parameters, test AUC / gAUC / LogLoss, the test AUC of every task
//! when there are several, the test AUC of the largest domains (by test rows) when the run
//! has per-domain metrics, training throughput and epochs. Metrics files are read as plain
//! JSON so that reports of older runs keep working when fields are added, and checked
//! against the run folder's manifest where it has one.

pub mod html;

use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How many domains a row lists (the largest by test rows).
pub const TOP_DOMAINS: usize = 5;

/// One finished run, as far as the report needs it.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub folder: PathBuf,
    pub model: String,
    pub parameters: Option<u64>,
    pub auc: Option<f64>,
    pub gauc: Option<f64>,
    pub logloss: Option<f64>,
    /// Test AUC per task, in the run's task order (only for runs with several tasks).
    pub tasks: Vec<(String, Option<f64>)>,
    /// Test AUC of the largest domains: (domain id, test rows, AUC).
    pub domains: Vec<(String, u64, Option<f64>)>,
    pub rows_per_s: Option<f64>,
    pub epochs: Option<u64>,
    pub best_step: Option<u64>,
    pub steps: Option<u64>,
}

/// A JSON file of a run folder, as the run wrote it (the checksum its manifest records).
fn read_checked(folder: &Path, name: &str) -> Result<Value, String> {
    let path = folder.join(name);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::train::folder::check_recorded(folder, name, &bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

/// Reads a run folder; the folder must hold the `metrics.json` of a finished run.
pub fn summarize(folder: &Path) -> Result<RunSummary, String> {
    let metrics_path = folder.join("metrics.json");
    if !metrics_path.exists() {
        return Err(format!("{}: no metrics.json (not a finished `mdl run` folder)", folder.display()));
    }
    let m = read_checked(folder, "metrics.json")?;
    let test = &m["test"];
    let f = |v: &Value| v.as_f64();
    let tasks_obj = test["per_task"].as_object();
    let tasks = match tasks_obj {
        Some(t) if t.len() > 1 => t.iter().map(|(name, v)| (name.clone(), f(&v["auc"]))).collect(),
        _ => Vec::new(),
    };
    let mut domains: Vec<(String, u64, Option<f64>)> = test["per_domain"]
        .as_object()
        .map(|d| d.iter().map(|(id, v)| (id.clone(), v["count"].as_u64().unwrap_or(0), f(&v["auc"]))).collect())
        .unwrap_or_default();
    domains.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    domains.truncate(TOP_DOMAINS);
    let timing_path = folder.join("timing.json");
    // Optional for runs of an older mdl; one that the manifest lists must be there.
    let rows_per_s = if timing_path.exists() || crate::train::folder::recorded(folder, "timing.json")? {
        read_checked(folder, "timing.json")?["train_rows_per_s"].as_f64()
    } else {
        None
    };
    // A run folder named otherwise than its model shows both: `din (din_movielens)`.
    let model = m["model"].as_str().unwrap_or("?").to_string();
    let model = match folder.file_name().map(|f| f.to_string_lossy().into_owned()) {
        Some(f) if f != model => format!("{model} ({f})"),
        _ => model,
    };
    Ok(RunSummary {
        folder: folder.to_path_buf(),
        model,
        parameters: m["parameters"].as_u64(),
        auc: f(&test["auc"]),
        gauc: f(&test["gauc"]),
        logloss: f(&test["logloss"]),
        tasks,
        domains,
        rows_per_s,
        epochs: m["epochs"].as_u64(),
        best_step: m["best_step"].as_u64(),
        steps: m["steps"].as_u64(),
    })
}

fn metric(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.4}"))
}

/// Groups digits by thousands: 2676993 → 2,676,993.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The Markdown table of the runs, in the order given.
pub fn markdown(runs: &[RunSummary]) -> String {
    let mut out = String::from(
        "| model | params | test AUC | gAUC | LogLoss | per-task AUC | AUC of the 5 largest domains (domain: AUC) | train rows/s | epochs (best step) |\n\
         |---|---:|---:|---:|---:|---|---|---:|---|\n",
    );
    for r in runs {
        let tasks = if r.tasks.is_empty() {
            "–".to_string()
        } else {
            r.tasks.iter().map(|(t, a)| format!("{t} {}", metric(*a))).collect::<Vec<_>>().join(", ")
        };
        let domains = if r.domains.is_empty() {
            "–".to_string()
        } else {
            r.domains.iter().map(|(d, _, a)| format!("{d}: {}", metric(*a))).collect::<Vec<_>>().join(", ")
        };
        let epochs = match (r.epochs, r.best_step, r.steps) {
            (Some(e), Some(b), Some(s)) => format!("{e} ({b} of {s})"),
            _ => "–".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.model,
            r.parameters.map_or("–".to_string(), thousands),
            metric(r.auc),
            metric(r.gauc),
            metric(r.logloss),
            tasks,
            domains,
            r.rows_per_s.map_or("–".to_string(), |x| thousands(x.round() as u64)),
            epochs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2676993), "2,676,993");
    }
}
