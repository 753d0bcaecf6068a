//! `mdl fuzz` (hidden): the bench of the fuzz suite. The parent runs each kind's cases in
//! child processes of itself (`mdl fuzz --worker`), so that an abort or a hang cannot end
//! the count: a child prints `case N` before each case and its tally at the end; a child
//! that dies is an abort at the case it was on, and the parent goes on after that case
//! (running again the cases before it, whose counts died with the child). A hang is
//! caught in the child by the watchdog ([`super::run_range`]); the child then reports and
//! exits, so the stuck thread dies with it.

use super::{run_range, Finding, Fixture, Kind, Settings, Tally};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `mdl fuzz` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    pub kinds: Vec<Kind>,
    /// Cases `from..cases` of each kind.
    pub from: u64,
    pub cases: u64,
    pub seed: u64,
    pub budget: Duration,
    pub known: bool,
    /// Kinds run at once (one child each).
    pub jobs: usize,
    /// Seconds a kind may take: after them it starts no further case (its row says how
    /// many ran).
    pub secs_per_kind: Option<f64>,
    /// The repository (specs/ and data/).
    pub root: PathBuf,
    /// Scratch space: one folder per child.
    pub work: PathBuf,
}

/// The end of a worker's run: its tally and the first case it did not run.
#[derive(Serialize, Deserialize)]
struct Done {
    tally: Tally,
    next: u64,
}

/// The child's side: cases `from..to` of `kind`, reported on stdout; with
/// `opts.secs_per_kind`, no case starts after that many seconds.
pub fn worker(kind: Kind, from: u64, to: u64, opts: &Options) -> Result<(), String> {
    let fx = Arc::new(Fixture::new(&opts.root, &opts.work)?);
    let until = opts.secs_per_kind.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let settings = Settings { seed: opts.seed, budget: opts.budget, known: opts.known, until };
    let mut next = from;
    let stdout = std::io::stdout();
    let tally = run_range(kind, &fx, &settings, from..to, true, |case| {
        next = case + 1;
        let mut out = stdout.lock();
        let _ = writeln!(out, "case {case}");
        let _ = out.flush();
    });
    let done = serde_json::to_string(&Done { tally, next }).map_err(|e| e.to_string())?;
    println!("done {done}");
    let _ = std::fs::remove_dir_all(&opts.work);
    Ok(())
}

/// Runs cases `from..to` of `kind` in children until all are counted.
fn supervise_kind(kind: Kind, opts: &Options) -> Result<Tally, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the mdl binary: {e}"))?;
    let mut total = Tally::default();
    let mut pending = vec![(opts.from, opts.cases)];
    let started = Instant::now();
    let deadline = opts.secs_per_kind.map(|s| started + Duration::from_secs_f64(s));
    while let Some((from, to)) = pending.pop() {
        if from >= to {
            continue;
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        if left.is_some_and(|l| l <= 0.0) {
            break;
        }
        let work = opts.work.join(format!("{}-{from}", kind.name()));
        std::fs::create_dir_all(&opts.work).map_err(|e| format!("{}: {e}", opts.work.display()))?;
        let stderr_path = opts.work.join(format!("{}-stderr.txt", kind.name()));
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["fuzz", "--worker", "--kind", kind.name()])
            .args(["--from", &from.to_string(), "--cases", &to.to_string(), "--seed", &opts.seed.to_string()])
            .args(["--budget-secs", &opts.budget.as_secs_f64().to_string()])
            .arg("--root")
            .arg(&opts.root)
            .arg("--work")
            .arg(&work)
            .stdout(Stdio::piped())
            .stderr(stderr);
        if opts.known {
            cmd.arg("--known");
        }
        if let Some(l) = left {
            cmd.args(["--secs-per-kind", &l.to_string()]);
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let mut last = None;
        let mut done = None;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("case ") {
                    last = n.parse::<u64>().ok();
                } else if let Some(json) = line.strip_prefix("done ") {
                    done = serde_json::from_str::<Done>(json).ok();
                }
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        match (done, last) {
            (Some(d), _) => {
                total.add(&d.tally);
                pending.push((d.next, to));
            }
            (None, Some(case)) => {
                let tail = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let tail: String = tail.lines().last().unwrap_or("").chars().take(200).collect();
                total.cases += 1;
                total.aborts += 1;
                total.findings.push(Finding {
                    kind,
                    case,
                    class: "abort".into(),
                    input: format!("mdl fuzz --kind {} --from {case} --cases {}", kind.name(), case + 1),
                    detail: format!("the worker died ({status}): {tail}"),
                });
                pending.push((case + 1, to));
                pending.push((from, case));
            }
            (None, None) => {
                let tail = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!("the {} worker failed before its first case ({status}): {tail}", kind.name()));
            }
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// Runs every kind asked for, `opts.jobs` at a time (each job takes the next kind when
/// its last is done), and returns their tallies in the order asked.
pub fn supervise(opts: &Options) -> Result<Vec<(Kind, Tally)>, String> {
    let queue = Arc::new(Mutex::new(opts.kinds.iter().rev().copied().collect::<Vec<Kind>>()));
    let handles: Vec<_> = (0..opts.jobs.max(1))
        .map(|_| {
            let (queue, opts) = (queue.clone(), opts.clone());
            std::thread::spawn(move || -> Result<Vec<(Kind, Tally)>, String> {
                let mut done = Vec::new();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(kind) = next else { return Ok(done) };
                    done.push((kind, supervise_kind(kind, &opts)?));
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.extend(h.join().map_err(|_| "a supervisor thread panicked".to_string())??);
    }
    results.sort_by_key(|(k, _)| opts.kinds.iter().position(|x| x == k));
    Ok(results)
}

/// The table `mdl fuzz` prints: one row per kind, then the findings grouped by what
/// happened (class and message), with a count and the first case of each.
pub fn render(results: &[(Kind, Tally)], opts: &Options) -> String {
    let mut out = format!(
        "fuzz: seed {}, time budget {:.0} s per case, {}, up to {} cases{} per kind\n\n| input kind | cases | accepted | rejected (error) | panics | aborts | hangs > {:.0} s | silent wrong results | slowest case | seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        opts.seed,
        opts.budget.as_secs_f64(),
        if opts.known { "inputs of open findings included" } else { "inputs of open findings left out" },
        opts.cases,
        opts.secs_per_kind.map(|s| format!(" or {s:.0} s")).unwrap_or_default(),
        opts.budget.as_secs_f64(),
    );
    for (kind, t) in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s | {:.0} |\n",
            kind.name(),
            t.cases,
            t.accepted,
            t.rejected,
            t.panics,
            t.aborts,
            t.hangs,
            t.silent,
            t.slowest_secs,
            t.seconds
        ));
    }
    let mut groups: Vec<(String, u64, &Finding)> = Vec::new();
    for f in results.iter().flat_map(|(_, t)| &t.findings) {
        // Messages differ in numbers (bytes, rows, values): group by the words.
        let words: String = f.detail.chars().filter(|c| !c.is_ascii_digit()).take(120).collect();
        let key = format!("{} {}: {words}", f.kind.name(), f.class);
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some(g) => g.1 += 1,
            None => groups.push((key, 1, f)),
        }
    }
    if !groups.is_empty() {
        out.push_str("\nfindings (grouped; first case of each):\n");
        for (_, count, f) in &groups {
            out.push_str(&format!("- {count} × {f}\n"));
        }
    }
    out
}

/// The repository root: the folder holding specs/ and data/ (the current folder, else
/// where this binary was built from).
pub fn default_root() -> PathBuf {
    let here = std::env::current_dir().unwrap_or_default();
    if here.join("specs").is_dir() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
    }
}
