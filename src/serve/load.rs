//! The load client behind the hidden `mdl serve-bench`: a bounded number of `/predict`
//! requests against a running `mdl serve`, for each request size (rows per request) and
//! each concurrency (clients sending at once, each waiting for its answer before the next
//! request). It reports per cell the median and 99th-percentile latency and the rows
//! scored per second. The rows come from a CSV file (the model's input columns, which the
//! server's `/health` lists, sent as JSON strings), cycling through the file.

use crate::data::read_table;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send, and how much.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// The server, `http://HOST:PORT`.
    pub url: String,
    /// A CSV / CSV.gz file holding the model's input columns.
    pub data: PathBuf,
    /// Rows per request, one cell each.
    pub rows: Vec<usize>,
    /// Clients sending at once, one cell each.
    pub concurrency: Vec<usize>,
    /// Timed requests per cell (after one untimed request per client).
    pub requests: usize,
    /// A cell stops sending after this long, whatever it has sent.
    pub seconds: f64,
}

/// The figures of one (rows per request, concurrency) cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub rows: usize,
    pub concurrency: usize,
    /// Requests answered with scores for every row.
    pub answered: usize,
    /// Requests answered otherwise (or not at all).
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Rows scored per second of the cell's wall time.
    pub rows_per_s: f64,
}

/// Seconds a request may take before it counts as failed.
const TIMEOUT_S: u64 = 60;

/// Runs every cell in turn (see the module doc).
pub fn run(options: &LoadOptions) -> Result<Vec<Cell>, String> {
    let url = options.url.trim_end_matches('/');
    let health = minreq::get(format!("{url}/health"))
        .with_timeout(TIMEOUT_S)
        .send()
        .map_err(|e| format!("{url}/health: {e}"))?;
    let health: Value = serde_json::from_slice(health.as_bytes()).map_err(|e| format!("{url}/health: {e}"))?;
    let columns: Vec<String> = health["columns"]
        .as_array()
        .ok_or_else(|| format!("{url}/health does not list the input columns: {health}"))?
        .iter()
        .filter_map(|c| c.as_str().map(String::from))
        .collect();
    let (header, records) = read_table(&options.data).map_err(|e| e.to_string())?;
    let positions = columns
        .iter()
        .map(|c| {
            header.iter().position(|h| h == c).ok_or_else(|| format!("{}: no column '{c}'", options.data.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if records.is_empty() {
        return Err(format!("{}: no rows", options.data.display()));
    }
    let row = |i: usize| -> Value {
        let record = &records[i % records.len()];
        let object: Map<String, Value> =
            columns.iter().zip(&positions).map(|(c, &p)| (c.clone(), Value::String(record[p].clone()))).collect();
        Value::Object(object)
    };
    let mut cells = Vec::new();
    for &rows in &options.rows {
        // A few different bodies per size, so that not every request scores the same rows.
        let bodies: Vec<String> = (0..8)
            .map(|b| {
                serde_json::json!({ "rows": (0..rows).map(|r| row(b * rows + r)).collect::<Vec<_>>() }).to_string()
            })
            .collect();
        for &concurrency in &options.concurrency {
            cells.push(measure(url, &bodies, rows, concurrency.max(1), options));
        }
    }
    Ok(cells)
}

/// Whether `response` holds scores for `rows` rows.
fn scored(response: &minreq::Response, rows: usize) -> bool {
    response.status_code == 200
        && serde_json::from_slice::<Value>(response.as_bytes())
            .is_ok_and(|v| v["scores"].as_array().is_some_and(|s| s.len() == rows))
}

/// One cell: `concurrency` clients share `options.requests` requests.
fn measure(url: &str, bodies: &[String], rows: usize, concurrency: usize, options: &LoadOptions) -> Cell {
    let send = |body: &str| {
        minreq::post(format!("{url}/predict"))
            .with_header("Content-Type", "application/json")
            .with_body(body)
            .with_timeout(TIMEOUT_S)
            .send()
            .is_ok_and(|r| scored(&r, rows))
    };
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(options.requests));
    let failed = AtomicUsize::new(0);
    let limit = Duration::from_secs_f64(options.seconds.max(0.0));
    // One untimed request per client first (connections, first-run costs).
    std::thread::scope(|scope| {
        for client in 0..concurrency {
            let send = &send;
            scope.spawn(move || send(&bodies[client % bodies.len()]));
        }
    });
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= options.requests || started.elapsed() > limit {
                    break;
                }
                let sent = Instant::now();
                if send(&bodies[i % bodies.len()]) {
                    let ms = sent.elapsed().as_secs_f64() * 1e3;
                    latencies.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let mut latencies = latencies.into_inner().unwrap_or_else(|e| e.into_inner());
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| match latencies.len() {
        0 => f64::NAN,
        n => latencies[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    };
    Cell {
        rows,
        concurrency,
        answered: latencies.len(),
        failed: failed.into_inner(),
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        rows_per_s: (latencies.len() * rows) as f64 / wall.max(1e-9),
    }
}

/// The cells as a Markdown table.
pub fn markdown(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| rows/request | clients | requests | failed | p50 ms | p99 ms | rows/s |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.0} |\n",
            c.rows, c.concurrency, c.answered, c.failed, c.p50_ms, c.p99_ms, c.rows_per_s
        ));
    }
    out
}
