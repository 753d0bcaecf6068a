//! `mdl serve`: a trained run scoring rows posted over HTTP (tiny_http, one thread per
//! connection handler, no async runtime).
//!
//! - `POST /predict` takes JSON rows holding raw feature values as the CSV has them: an
//!   array of objects (`column: value`), or `{"rows": [...]}`. A value is a string, a number
//!   (read as its JSON text, as a CSV cell would be), `null` (an empty cell: a missing
//!   number), or for a sequence column an array of items. Every row names each of the
//!   model's input columns; a column the run's schema does not have is an error, while its
//!   label and user columns may be present and are not read. The answer is
//!   `{"tasks": [...], "scores": [[...], ...], "domain_fallbacks": N}`: per row, in order, one
//!   score per task: a binary task's probability, a regression task's prediction (on the
//!   label's scale), a classes task's arg-max class (as [`Scorer::score`] gives them).
//! - A bad row is answered 400 with `{"error", "row", "field"}` naming the row's index and
//!   the column (an unknown column, a missing input, a number that is not one, a domain id
//!   train never had under the run's `data.unknown_domain`); the rows are encoded by the
//!   same code as a CSV file's ([`crate::data::FieldEncoder`]). A body over the limit is
//!   413. A run's `data.bad_rows: skip` does not apply: a request's rows are all scored or
//!   it is refused.
//! - Micro-batching: handler threads encode their request's rows and hand them to one
//!   scoring thread ([`Scorer`], the path `mdl predict` uses), which takes every request
//!   waiting when it is free (those that arrived while it scored the previous batch), and
//!   those arriving within a window after the first (`--batch-window-ms`, default 0), up to
//!   a row limit (a request is never split); it scores them as one batch and hands each its
//!   own rows' scores.
//! - `GET /health` answers `{"status": "ok", "run_id", "model", "tasks", "columns"}`
//!   (`columns`: the input columns every row gives).
//! - SIGTERM or SIGINT stops the server: the requests being handled are answered, and so
//!   are those read before the signal that waited for a free handler (for up to 2 s);
//!   then the listener closes and `mdl serve` exits 0 (a second signal ends it at once).
//!   A connection opened after the signal may still be accepted by the listener and then
//!   closed unanswered: put a proxy or load balancer in front to retry elsewhere.
//!
//! Each request is logged on stderr through [`crate::say!`].

use crate::data::{FieldEncoder, FieldError, Fitted, UnknownDomain};
use crate::score::Scorer;
use crate::train::folder::Trust;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response, Server};

pub mod load;

/// How often a handler thread waiting for a request looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(50);

/// How long after a stop the handlers go on answering requests that were read before it.
const DRAIN: Duration = Duration::from_secs(2);

/// How `mdl serve` listens and batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// `HOST:PORT` to listen on (port 0: any free port, said on stderr).
    pub addr: String,
    /// Handler threads: requests read, encoded and answered at once.
    pub threads: usize,
    /// How long the scoring thread waits for more requests to score with the first one
    /// (zero: only those that arrived while the previous batch was scored; measured best on
    /// a small machine, docs/serving.md).
    pub batch_window: Duration,
    /// Rows past which no more requests join a batch.
    pub max_batch_rows: usize,
    /// The largest request body taken (larger is answered 413).
    pub max_body_bytes: usize,
    /// Read a run folder whose files do not match its manifest (saying so).
    pub force: bool,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            addr: "127.0.0.1:8080".into(),
            threads: 8,
            batch_window: Duration::ZERO,
            max_batch_rows: 4096,
            max_body_bytes: 16 << 20,
            force: false,
        }
    }
}

/// What the handler threads know of the run the scoring thread opened.
struct Model {
    fitted: Arc<Fitted>,
    tasks: Vec<String>,
    name: String,
    run_id: Option<String>,
    unknown_domain: UnknownDomain,
    domain_input: bool,
}

/// One request's encoded rows, and where their scores go.
struct Job {
    data: crate::data::Dataset,
    reply: mpsc::Sender<Result<Scored, String>>,
}

/// A job's scores (`rows × tasks`), and how many requests' rows were scored with them.
struct Scored {
    scores: Vec<f32>,
    batch: usize,
}

/// An answer other than scores: its status and JSON message, with the row and column at
/// fault when there are.
struct Refusal {
    status: u16,
    message: String,
    row: Option<usize>,
    field: Option<String>,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal { status, message: message.into(), row: None, field: None }
    }

    fn row(row: usize, field: Option<&str>, message: String) -> Refusal {
        Refusal {
            status: 400,
            message: format!("row {row}: {message}"),
            row: Some(row),
            field: field.map(String::from),
        }
    }

    fn body(&self) -> Value {
        json!({ "error": self.message, "row": self.row, "field": self.field })
    }
}

impl From<FieldError> for Refusal {
    fn from(e: FieldError) -> Refusal {
        Refusal::row(e.row, e.column.as_deref(), e.message)
    }
}

/// Serves the run in `run` until SIGTERM or SIGINT (see the module doc).
pub fn serve(run: &Path, options: &ServeOptions) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The second signal exits at once; the first asks for a clean stop.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    let (jobs, scoring) = start_scoring(run.to_path_buf(), options)?;
    let model = scoring.model;
    // Checks the unknown-domain policy against the run once, before anything listens.
    model.fitted.field_encoder(model.unknown_domain, model.domain_input).map_err(|e| e.to_string())?;
    let server = Server::http(&options.addr).map_err(|e| format!("cannot listen on {}: {e}", options.addr))?;
    let at = server.server_addr().to_ip().map_or_else(|| options.addr.clone(), |a| a.to_string());
    crate::say!(
        "serving {} (model {}, run {}) on http://{at}: POST /predict, GET /health",
        run.display(),
        model.name,
        model.run_id.as_deref().unwrap_or("without a manifest")
    );
    let answered = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            let jobs = jobs.clone();
            let (server, model, stop, answered) = (&server, &model, &stop, &answered);
            scope.spawn(move || handle_requests(server, model, &jobs, options, stop, answered));
        }
    });
    drop(jobs);
    // Every handler has answered; the scoring thread ends once the last job sender is gone.
    scoring.thread.join().map_err(|_| "the scoring thread failed".to_string())?;
    crate::say!("stopped after answering {} requests", answered.load(Ordering::Relaxed));
    Ok(())
}

/// The scoring thread, once it has opened the run.
struct Scoring {
    model: Model,
    thread: std::thread::JoinHandle<()>,
}

/// Opens the run on a thread of its own (its executor stays there) and starts scoring the
/// jobs sent on the returned channel.
fn start_scoring(run: PathBuf, options: &ServeOptions) -> Result<(mpsc::Sender<Job>, Scoring), String> {
    let (ready, opened) = mpsc::channel();
    let (jobs, queue) = mpsc::channel::<Job>();
    let trust = Trust { force: options.force };
    let (window, max_rows) = (options.batch_window, options.max_batch_rows.max(1));
    let thread = std::thread::spawn(move || {
        let mut scorer = match Scorer::open(&run, trust) {
            Ok(scorer) => scorer,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let model = Model {
            fitted: Arc::clone(&scorer.fitted),
            tasks: scorer.tasks().to_vec(),
            name: scorer.model().to_string(),
            run_id: scorer.run_id.clone(),
            unknown_domain: scorer.encode_options(None, None).unknown_domain,
            domain_input: scorer.domain_input(),
        };
        if ready.send(Ok(model)).is_ok() {
            score_batches(&mut scorer, &queue, window, max_rows);
        }
    });
    match opened.recv() {
        Ok(Ok(model)) => Ok((jobs, Scoring { model, thread })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the scoring thread failed while opening the run".into()),
    }
}

/// Scores jobs until every sender has gone: the first waiting job, with those that arrive
/// within `window` after it (until `max_rows` rows), as one batch.
fn score_batches(scorer: &mut Scorer, queue: &mpsc::Receiver<Job>, window: Duration, max_rows: usize) {
    while let Ok(first) = queue.recv() {
        let deadline = Instant::now() + window;
        let mut rows = first.data.rows;
        let mut batch = vec![first];
        while rows < max_rows {
            match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    rows += job.data.rows;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        score_together(scorer, batch);
    }
}

/// Scores the jobs' rows as one batch and hands each job its own rows' scores. When the
/// batch fails (a score that is not finite), each job is scored alone, so that only the
/// job at fault gets the error, naming its own row.
fn score_together(scorer: &mut Scorer, batch: Vec<Job>) {
    let tasks = scorer.tasks().len();
    let merged = match batch.as_slice() {
        [_] => None,
        [first, rest @ ..] => {
            let mut merged = first.data.clone();
            rest.iter().try_for_each(|job| merged.append(&job.data)).ok().map(|()| merged)
        }
        [] => return,
    };
    let scores = match &merged {
        Some(merged) => scorer.score(merged),
        None => scorer.score(&batch[0].data),
    };
    let requests = batch.len();
    match scores {
        Ok(scores) => {
            let mut rest = scores.as_slice();
            for job in batch {
                let (mine, after) = rest.split_at(job.data.rows * tasks);
                rest = after;
                let _ = job.reply.send(Ok(Scored { scores: mine.to_vec(), batch: requests }));
            }
        }
        Err(e) if requests == 1 => {
            let _ = batch[0].reply.send(Err(e));
        }
        Err(_) => {
            for job in batch {
                let _ = job.reply.send(scorer.score(&job.data).map(|scores| Scored { scores, batch: 1 }));
            }
        }
    }
}

/// A handler thread: takes requests until the server stops.
fn handle_requests(
    server: &Server,
    model: &Model,
    jobs: &mpsc::Sender<Job>,
    options: &ServeOptions,
    stop: &AtomicBool,
    answered: &AtomicU64,
) {
    let mut encoder = match model.fitted.field_encoder(model.unknown_domain, model.domain_input) {
        Ok(encoder) => encoder,
        Err(e) => return crate::say!("error: {e}"),
    };
    while !stop.load(Ordering::SeqCst) {
        match server.recv_timeout(POLL) {
            Ok(Some(request)) => {
                handle(request, model, &mut encoder, jobs, options);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => crate::say!("error: cannot take a request: {e}"),
        }
    }
    // Requests the server had read before the stop but no handler had taken yet (every
    // handler was busy) are in flight for their clients too: they are answered, for at most
    // `DRAIN` after the stop, before the listener closes.
    let until = Instant::now() + DRAIN;
    while Instant::now() < until {
        match server.try_recv() {
            Ok(Some(request)) => {
                handle(request, model, &mut encoder, jobs, options);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => break,
            Err(e) => {
                crate::say!("error: cannot take a request: {e}");
                break;
            }
        }
    }
}

/// Answers one request and logs it.
fn handle(
    mut request: Request,
    model: &Model,
    encoder: &mut FieldEncoder,
    jobs: &mpsc::Sender<Job>,
    options: &ServeOptions,
) {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or_default().to_string();
    if request.body_length().is_some_and(|length| length > DRAIN_LIMIT.max(options.max_body_bytes)) {
        return refuse_declared_body(request, options.max_body_bytes, (&method, &path));
    }
    let answer = match (&method, path.as_str()) {
        (Method::Get, "/health") => Ok((
            json!({
                "status": "ok",
                "run_id": model.run_id,
                "model": model.name,
                "tasks": model.tasks,
                "columns": encoder.columns(),
            }),
            None,
        )),
        (Method::Post, "/predict") => predict(&mut request, model, encoder, jobs, options.max_body_bytes),
        (_, "/health") => Err(Refusal::new(405, "GET /health")),
        (_, "/predict") => Err(Refusal::new(405, "POST /predict with JSON rows")),
        _ => Err(Refusal::new(404, format!("no {path} here: POST /predict, GET /health"))),
    };
    let (status, body) = match &answer {
        Ok((body, _)) => (200, body.clone()),
        Err(refusal) => (refusal.status, refusal.body()),
    };
    let text = body.to_string();
    let json = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let response = Response::from_string(text).with_status_code(status).with_header(json);
    let sent = request.respond(response);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    match (&answer, sent) {
        (_, Err(e)) => crate::say!("{method} {path} {status}: the answer could not be sent: {e}"),
        (Ok((_, None)), Ok(())) => crate::say!("{method} {path} {status} ({ms:.1} ms)"),
        (Ok((_, Some((rows, 1)))), Ok(())) => crate::say!("{method} {path} {status} ({rows} rows, {ms:.1} ms)"),
        (Ok((_, Some((rows, batch)))), Ok(())) => crate::say!(
            "{method} {path} {status} ({rows} rows, scored in one batch with {} other requests, {ms:.1} ms)",
            batch - 1
        ),
        (Err(refusal), Ok(())) => crate::say!("{method} {path} {status}: {} ({ms:.1} ms)", refusal.message),
    }
}

/// The refusal of a body over `--max-body-bytes`.
fn too_large(max_body_bytes: usize) -> Refusal {
    Refusal::new(413, format!("the body is over the limit of {max_body_bytes} bytes (--max-body-bytes)"))
}

/// The largest declared body (`Content-Length`) that tiny_http may drain. tiny_http 0.12
/// drains a body left unread, when the request is dropped, into one buffer of the length
/// still to come (tiny-http/tiny-http pull request 290, unreleased): a zeroed allocation
/// that stays virtual but for what is read, and that a hostile length makes fail, which
/// aborts the process.
const DRAIN_LIMIT: usize = 1 << 30;

/// Refuses (413) a request whose declared body is over [`DRAIN_LIMIT`] (and the body
/// limit), which tiny_http must not drain: the status and headers are sent on the
/// connection taken over from tiny_http, which is then left open, never dropped. Such a
/// request costs a connection and a tiny_http thread waiting on it, instead of the server;
/// its client sees the status but no end of the answer.
fn refuse_declared_body(request: Request, max_body_bytes: usize, (method, path): (&Method, &str)) {
    let refusal = too_large(max_body_bytes);
    let connection = request.upgrade("mdl-refused", Response::empty(413));
    std::mem::forget(connection);
    crate::say!(
        "{method} {path} 413: {} (a declared body of over 1 GiB; its connection is left open)",
        refusal.message
    );
}

/// The answer to a request: its JSON, and for scores the number of rows and of requests
/// scored in their batch.
type Answer = (Value, Option<(usize, usize)>);

/// `POST /predict`: the scores of the posted rows (see [`Answer`]).
fn predict(
    request: &mut Request,
    model: &Model,
    encoder: &mut FieldEncoder,
    jobs: &mpsc::Sender<Job>,
    max_body_bytes: usize,
) -> Result<Answer, Refusal> {
    if request.body_length().is_some_and(|length| length > max_body_bytes) {
        return Err(too_large(max_body_bytes));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(max_body_bytes as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Refusal::new(400, format!("cannot read the body: {e}")))?;
    if body.len() > max_body_bytes {
        return Err(too_large(max_body_bytes));
    }
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| Refusal::new(400, format!("the body is not JSON: {e}")))?;
    let rows = request_rows(&body)?;
    let known = model.fitted.schema.named_columns();
    let sequences: Vec<&String> = model.fitted.schema.sequence_groups().flat_map(|(_, columns, ..)| columns).collect();
    let fields = rows
        .iter()
        .enumerate()
        .map(|(row, value)| row_fields(row, value, encoder.columns(), &known, &sequences))
        .collect::<Result<Vec<_>, _>>()?;
    let (data, fallbacks) = encoder.encode(&fields)?;
    let count = data.rows;
    let (reply, answer) = mpsc::channel();
    jobs.send(Job { data, reply }).map_err(|_| Refusal::new(503, "the server is stopping"))?;
    let Scored { scores, batch } = answer
        .recv()
        .map_err(|_| Refusal::new(503, "the server is stopping"))?
        .map_err(|e| Refusal::new(500, format!("cannot score: {e}")))?;
    let per_row: Vec<&[f32]> = scores.chunks(model.tasks.len().max(1)).collect();
    Ok((json!({ "tasks": model.tasks, "scores": per_row, "domain_fallbacks": fallbacks }), Some((count, batch))))
}

/// The rows of a `/predict` body: an array of row objects, or `{"rows": [...]}`.
fn request_rows(body: &Value) -> Result<&[Value], Refusal> {
    let rows = match body {
        Value::Array(rows) => rows,
        Value::Object(object) => match (object.get("rows"), object.len()) {
            (Some(Value::Array(rows)), 1) => rows,
            _ => return Err(Refusal::new(400, "expected {\"rows\": [...]} or an array of rows")),
        },
        _ => {
            return Err(Refusal::new(400, "expected an array of rows (objects of column: value) or {\"rows\": [...]}"))
        }
    };
    Ok(rows)
}

/// One JSON row as fields in the order of `columns` (the model's inputs). A key that is
/// none of the schema's columns (`known`), a missing input, or a value that is not a
/// string, a number, null, or (in a sequence column) an array of those, is an error naming
/// the row and the column.
fn row_fields(
    row: usize,
    value: &Value,
    columns: &[String],
    known: &[&str],
    sequences: &[&String],
) -> Result<Vec<String>, Refusal> {
    let Value::Object(object) = value else {
        return Err(Refusal::row(row, None, "expected an object of column: value".into()));
    };
    if let Some(unknown) = object.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(Refusal::row(
            row,
            Some(unknown),
            format!("unknown column '{unknown}'; the model's input columns are: {}", columns.join(", ")),
        ));
    }
    columns
        .iter()
        .map(|column| {
            let value = object
                .get(column)
                .ok_or_else(|| Refusal::row(row, Some(column), format!("no value for the input column '{column}'")))?;
            let scalar = |item: &Value| match item {
                Value::String(text) => Some(text.clone()),
                Value::Number(number) => Some(number.to_string()),
                _ => None,
            };
            let cell = match value {
                Value::Null => Some(String::new()),
                Value::Array(items) if sequences.contains(&column) => {
                    items.iter().map(scalar).collect::<Option<Vec<_>>>().map(|items| items.join(" "))
                }
                other => scalar(other),
            };
            cell.ok_or_else(|| {
                let expected = if sequences.contains(&column) {
                    "a string, a number, null or an array of items"
                } else {
                    "a string, a number or null"
                };
                Refusal::row(row, Some(column), format!("column '{column}': expected {expected}, found {value}"))
            })
        })
        .collect()
}
