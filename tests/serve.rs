//! `mdl serve` as a client uses it, on a small run trained on the bundled kuairand_pure_tail
//! (the model of `common::scoring`, which has a domain input): the server listens on a free
//! port, answers the same scores as `mdl predict` for the same rows, alone or batched with
//! concurrent requests, refuses a bad row naming its index and column, reports its health,
//! and stops on SIGTERM after answering the request in flight, exiting 0.
//!
//! Scores are compared within 1e-6: `mdl predict` writes six decimals (rounding by at most
//! 5e-7), and the server's rows are scored in batches of other sizes and company than
//! predict's blocks, which may change the last bit of an f32 score.

mod common;
use common::scoring::{self, fields, mdl, mdl_command, ok, test_split};
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> common::scratch::Scratch {
    scoring::tmp("serve", name)
}

/// A run with the default policies (`unknown_domain: error`).
fn run_strict() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| scoring::train(&tmp("run_strict").keep(), &[]))
}

/// The same training with `unknown_domain: 1` declared.
fn run_fallback() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| scoring::train(&tmp("run_fallback").keep(), &["data.unknown_domain=1"]))
}

/// A running `mdl serve` and its stderr so far.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    /// The thread that reads stderr into `log`; it ends when the process does.
    collector: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `mdl serve RUN --addr 127.0.0.1:0 EXTRA...` and waits until it listens.
    fn start(run: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["serve", run.to_str().unwrap(), "--addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut child =
            mdl_command(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    let at = line.split(" on http://").nth(1).and_then(|rest| rest.split(": ").next());
                    if let (true, Some(at)) = (line.starts_with("serving "), at) {
                        break format!("http://{at}");
                    }
                    seen.push(line);
                }
                _ => panic!("mdl serve ended before listening:\n{}", seen.join("\n")),
            }
        };
        let log = Arc::new(Mutex::new(seen));
        let collected = Arc::clone(&log);
        let collector = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                collected.lock().unwrap().push(line);
            }
        });
        Server { child, url, log, collector: Some(collector) }
    }

    fn post(&self, body: &str) -> (u16, Value) {
        let response = minreq::post(format!("{}/predict", self.url)).with_body(body).with_timeout(60).send().unwrap();
        (response.status_code, serde_json::from_slice(response.as_bytes()).unwrap())
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let response = minreq::get(format!("{}{path}", self.url)).with_timeout(60).send().unwrap();
        (response.status_code, serde_json::from_slice(response.as_bytes()).unwrap())
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let status = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits (up to a minute) for the process to end; its exit status and stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "mdl serve did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        // The collecting thread reads to the end of stderr, then ends.
        self.collector.take().expect("wait is called once").join().unwrap();
        (status, self.log())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Asserts that stderr comes to hold every one of `needles` within 10 s. The server logs a
    /// request after answering it, so its line can come a moment after the client has the
    /// answer: reading the log at once raced with that (a CI run saw it empty).
    fn assert_logged(&self, needles: &[&str]) {
        let started = Instant::now();
        loop {
            let log = self.log();
            if needles.iter().all(|needle| log.contains(needle)) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the log never held all of {needles:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bundled test split's first `n` rows as JSON objects of every column the schema
/// names (label and user too: present, not read), raw text as in the CSV; numbers in the
/// numeric columns are sent as JSON numbers.
fn json_rows(n: usize) -> Vec<Map<String, Value>> {
    let split = test_split();
    let header = fields(&split[0]);
    let exp = mdl::experiment::load(&common::root().join("experiments/quickstart.yaml"), &[]).unwrap();
    let schema = &exp.data.schema;
    let numeric: Vec<&String> = schema
        .features
        .iter()
        .filter(|g| matches!(g, mdl::data::FeatureGroup::Numeric { .. }))
        .flat_map(|g| g.columns())
        .collect();
    let named: Vec<&String> = schema
        .features
        .iter()
        .flat_map(|g| g.columns())
        .chain(schema.labels.iter().map(|t| &t.column))
        .chain(schema.domain.iter().map(|d| &d.column))
        .collect();
    split[1..=n]
        .iter()
        .map(|line| {
            let cells = fields(line);
            header
                .iter()
                .zip(cells)
                .filter(|(h, _)| named.contains(h))
                .map(|(h, cell)| {
                    let value = match cell.parse::<f64>() {
                        Ok(x) if numeric.contains(&h) => json!(x),
                        _ => Value::String(cell),
                    };
                    (h.clone(), value)
                })
                .collect()
        })
        .collect()
}

/// `mdl predict`'s scores of the test split's first `n` rows.
fn predicted(run: &Path, n: usize, name: &str) -> Vec<f64> {
    let dir = tmp(name);
    let data = dir.join("rows.csv");
    std::fs::write(&data, test_split()[..=n].join("\n") + "\n").unwrap();
    let out = mdl(&["predict", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", "-"]);
    ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "click");
    lines[1..].iter().map(|l| l.parse().unwrap()).collect()
}

/// The one score of each row of an answer.
fn scores(answer: &Value) -> Vec<f64> {
    assert_eq!(answer["tasks"], json!(["click"]), "{answer}");
    answer["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let row = row.as_array().unwrap();
            assert_eq!(row.len(), 1);
            row[0].as_f64().unwrap()
        })
        .collect()
}

fn assert_close(served: &[f64], predicted: &[f64], at: &str) {
    assert_eq!(served.len(), predicted.len(), "{at}");
    for (row, (s, p)) in served.iter().zip(predicted).enumerate() {
        assert!((s - p).abs() <= 1e-6, "{at}: row {row} served {s}, predicted {p}");
    }
}

fn body(rows: &[Map<String, Value>]) -> String {
    json!({ "rows": rows }).to_string()
}

#[test]
fn served_scores_equal_predicts_for_the_same_rows() {
    let run = run_strict();
    let n = 300;
    let expected = predicted(run, n, "same_rows");
    let rows = json_rows(n);
    let server = Server::start(run, &[]);
    let (status, answer) = server.post(&body(&rows));
    assert_eq!(status, 200, "{answer}");
    assert_close(&scores(&answer), &expected, "300 rows in {\"rows\": [...]}");
    assert_eq!(answer["domain_fallbacks"], 0);
    // A bare array, one row, and every value as the CSV's text.
    let (status, answer) = server.post(&Value::from(rows[5..70].to_vec()).to_string());
    assert_eq!(status, 200, "{answer}");
    assert_close(&scores(&answer), &expected[5..70], "a bare array");
    let text: Vec<Map<String, Value>> = rows[7..8]
        .iter()
        .map(|row| {
            row.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.as_str().map_or(v.to_string(), String::from))))
                .collect()
        })
        .collect();
    let (status, answer) = server.post(&body(&text));
    assert_eq!(status, 200, "{answer}");
    assert_close(&scores(&answer), &expected[7..8], "one row of text values");
    // A sequence column as an array of items scores as the space-separated text.
    let items = |row: &Map<String, Value>| -> Vec<Value> {
        row["hist_click_seq"].as_str().unwrap().split_whitespace().map(|i| Value::String(i.into())).collect()
    };
    let at = rows.iter().position(|row| items(row).len() > 1).unwrap();
    let mut listed = rows[at].clone();
    listed.insert("hist_click_seq".into(), Value::Array(items(&rows[at])));
    let (status, answer) = server.post(&body(&[listed]));
    assert_eq!(status, 200, "{answer}");
    assert_close(&scores(&answer), &expected[at..at + 1], "a sequence as an array");
    let (status, answer) = server.post(&body(&[]));
    assert_eq!((status, scores(&answer)), (200, vec![]));
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_rows_scores() {
    let run = run_strict();
    let n = 400;
    let expected = predicted(run, n, "concurrent");
    let rows = json_rows(n);
    // A long window, so that requests sent together are scored together.
    let server = Server::start(run, &["--batch-window-ms", "300", "--threads", "16"]);
    let sizes = [1, 17, 64, 3, 100, 5, 40, 2, 90, 8, 30, 11, 6, 9, 4, 10];
    assert_eq!(sizes.iter().sum::<usize>(), n);
    let starts: Vec<usize> = sizes.iter().scan(0, |at, &size| Some(std::mem::replace(at, *at + size))).collect();
    let barrier = std::sync::Barrier::new(sizes.len());
    std::thread::scope(|scope| {
        for (&start, &size) in starts.iter().zip(&sizes) {
            let (server, rows, expected, barrier) = (&server, &rows, &expected, &barrier);
            scope.spawn(move || {
                barrier.wait();
                let (status, answer) = server.post(&body(&rows[start..start + size]));
                assert_eq!(status, 200, "{answer}");
                assert_close(&scores(&answer), &expected[start..start + size], &format!("rows {start}..+{size}"));
            });
        }
    });
    // Some request was batched with another.
    server.assert_logged(&["scored in one batch with"]);
}

#[test]
fn a_bad_row_is_refused_naming_its_index_and_column() {
    let run = run_strict();
    let rows = json_rows(3);
    let server = Server::start(run, &["--max-body-bytes", "20000"]);
    let refused = |rows: Vec<Map<String, Value>>, row: usize, field: &str, message: &str| {
        let (status, answer) = server.post(&body(&rows));
        assert_eq!(status, 400, "{answer}");
        assert_eq!((answer["row"].as_u64(), answer["field"].as_str()), (Some(row as u64), Some(field)), "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("row {row}: {message}")), "{error}");
    };
    let with = |row: usize, column: &str, value: Option<Value>| {
        let mut rows = rows.clone();
        match value {
            Some(value) => rows[row].insert(column.into(), value),
            None => rows[row].remove(column),
        };
        rows
    };
    refused(
        with(1, "itme_id", Some(json!("5"))),
        1,
        "itme_id",
        "unknown column 'itme_id'; the model's input columns are: domain, user_id",
    );
    refused(with(2, "duration_ms", None), 2, "duration_ms", "no value for the input column 'duration_ms'");
    refused(
        with(0, "duration_ms", Some(json!("abc"))),
        0,
        "duration_ms",
        "column 'duration_ms': not a finite number (value \"abc\")",
    );
    refused(with(2, "domain", Some(json!(99))), 2, "domain", "column 'domain': domain id 99 is outside 0..");
    refused(
        with(1, "video_id", Some(json!(true))),
        1,
        "video_id",
        "column 'video_id': expected a string, a number or null, found true",
    );
    refused(
        with(0, "video_id", Some(json!(["1"]))),
        0,
        "video_id",
        "column 'video_id': expected a string, a number or null",
    );
    // Requests that are not rows at all.
    for (text, message) in [
        ("{\"rows\": [1", "the body is not JSON"),
        ("{\"row\": []}", "expected {\"rows\": [...]} or an array of rows"),
        ("[1]", "row 0: expected an object of column: value"),
    ] {
        let (status, answer) = server.post(text);
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().unwrap().starts_with(message), "{answer}");
    }
    let (status, answer) = server.post(&body(&json_rows(40)));
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"], "the body is over the limit of 20000 bytes (--max-body-bytes)");
    assert_eq!(server.get("/predict").0, 405);
    assert_eq!(server.get("/scores").0, 404);
    // The good rows still score after all that, and the refusals were logged.
    assert_eq!(server.post(&body(&rows)).0, 200);
    server
        .assert_logged(&["POST /predict 400: row 2: no value for the input column 'duration_ms'", "POST /predict 413"]);
}

#[test]
fn an_unseen_domain_follows_the_runs_policy() {
    // Row 1's domain is one train never had: the run declares `unknown_domain: 1`, so it is
    // scored as predict scores it.
    let run = run_fallback();
    let dir = tmp("fallback");
    let split = test_split();
    let header = fields(&split[0]);
    let domain = header.iter().position(|h| h == "domain").unwrap();
    let mut cells = fields(&split[2]);
    cells[domain] = "99".into();
    let changed: Vec<String> =
        cells.iter().map(|f| if f.contains(',') { format!("\"{f}\"") } else { f.clone() }).collect();
    let data = dir.join("rows.csv");
    std::fs::write(&data, [split[0].clone(), split[1].clone(), changed.join(",")].join("\n") + "\n").unwrap();
    let out = mdl(&["predict", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", "-"]);
    let err = ok(&out);
    assert!(err.contains("scored 1 row with a domain id train never had as domain 1"), "{err}");
    let expected: Vec<f64> =
        String::from_utf8(out.stdout).unwrap().lines().skip(1).map(|l| l.parse().unwrap()).collect();
    let mut rows = json_rows(2);
    rows[1].insert("domain".into(), json!("99"));
    let server = Server::start(run, &[]);
    let (status, answer) = server.post(&body(&rows));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["domain_fallbacks"], 1);
    assert_close(&scores(&answer), &expected, "a row of an unseen domain");
}

#[test]
fn health_names_the_run_and_model() {
    let run = run_strict();
    let server = Server::start(run, &[]);
    let (status, health) = server.get("/health");
    assert_eq!(status, 200);
    let manifest: Value = serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["run_id"], manifest["manifest"]["run_id"]);
    assert_eq!(health["model"], "scored");
    assert_eq!(health["tasks"], json!(["click"]));
    let columns = health["columns"].as_array().unwrap();
    assert_eq!(columns.len(), 48, "37 categorical, 3 sequence and 8 numeric columns; the domain is one of them");
    assert_eq!(server.post("[]").0, 200);
    server.assert_logged(&["GET /health 200"]);
}

#[test]
fn sigterm_answers_a_request_read_before_it_that_waited_for_a_handler() {
    let run = run_strict();
    let rows = json_rows(3);
    let expected = predicted(run, 3, "sigterm-queued");
    // One handler, held by the first request's long batch window: the second request is
    // read by the server but waits for the handler, and the signal comes in between.
    let server = Server::start(run, &["--threads", "1", "--batch-window-ms", "1500"]);
    let answers = std::thread::scope(|scope| {
        let first = scope.spawn(|| server.post(&body(&rows)));
        std::thread::sleep(Duration::from_millis(300));
        let second = scope.spawn(|| server.post(&body(&rows)));
        std::thread::sleep(Duration::from_millis(300));
        server.terminate();
        [first.join().unwrap(), second.join().unwrap()]
    });
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_close(&scores(answer), &expected, "a request answered after the signal");
    }
    let (exit, log) = server.wait();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("stopped after answering 2 requests"), "{log}");
}

#[test]
fn sigterm_answers_the_request_in_flight_and_exits_0() {
    let run = run_strict();
    let rows = json_rows(5);
    let expected = predicted(run, 5, "sigterm");
    // The request waits out a long batch window, so that it is in flight when the signal
    // comes.
    let server = Server::start(run, &["--batch-window-ms", "1500"]);
    let (status, answer) = std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| server.post(&body(&rows)));
        std::thread::sleep(Duration::from_millis(500));
        server.terminate();
        in_flight.join().unwrap()
    });
    assert_eq!(status, 200, "{answer}");
    assert_close(&scores(&answer), &expected, "the request in flight");
    let url = server.url.clone();
    let (exit, log) = server.wait();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("stopped after answering 1 requests"), "{log}");
    assert!(minreq::get(format!("{url}/health")).with_timeout(5).send().is_err(), "still listening after the stop");
}

#[test]
fn a_run_that_cannot_be_served_is_an_error() {
    let dir = tmp("not_a_run");
    let out = mdl(&["serve", dir.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    let err = scoring::failed(&out);
    assert!(err.starts_with("error: "), "{err}");
    let out = mdl(&["serve", run_strict().to_str().unwrap(), "--addr", "nowhere"]);
    let err = scoring::failed(&out);
    assert!(err.contains("error: cannot listen on nowhere"), "{err}");
    let out = mdl(&["serve", run_strict().to_str().unwrap(), "--batch-window-ms=-1"]);
    let err = scoring::failed(&out);
    assert!(err.contains("--batch-window-ms -1: expected a non-negative number of milliseconds"), "{err}");
}

#[test]
fn a_huge_declared_body_is_refused_and_the_server_lives_on() {
    use std::io::{Read, Write};
    let server = Server::start(run_strict(), &["--max-body-bytes", "20000"]);
    let at = server.url.trim_start_matches("http://").to_string();
    // Lengths over the limit that the client does not send: tiny_http would drain them
    // into a buffer of that size (1e15 bytes cannot be had: the process would abort).
    for (path, length) in [("/predict", 5_000_000u128), ("/predict", 10u128.pow(15)), ("/health", 1 << 63)] {
        let mut stream = std::net::TcpStream::connect(&at).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(stream, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n[1,2").unwrap();
        let mut head = [0u8; 32];
        let read = stream.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..read]).into_owned();
        assert!(head.starts_with("HTTP/1.1 413"), "{path} with {length}: {head}");
    }
    let (status, health) = server.get("/health");
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{}", server.log());
    server.assert_logged(&[
        "POST /predict 413: the body is over the limit of 20000 bytes",
        "(a declared body of over 1 GiB; its connection is left open)",
    ]);
}
