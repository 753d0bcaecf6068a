//! The fuzz suite: mutated inputs of every kind `mdl` reads, run through the library as the
//! commands run them, with a verdict per case.
//!
//! Five input kinds ([`Kind`]): specs (`.mdl` text, token-level mutations), experiment YAML
//! (key/value-level mutations of a two-file experiment, and `--set` overrides), CSV rows
//! (cell-level mutations of the files `run`, `eval` and `predict` read), checkpoints (byte
//! flips, truncations, splices) and run folders (their files corrupted, truncated, deleted
//! or swapped, then `eval`, `predict`, `report` or `--resume` on the folder). Every case is
//! drawn from the project's one generator, [`SplitMix64`], keyed by `(seed, case, kind)`,
//! so a case number reproduces its input exactly.
//!
//! A case ends in one of: accepted (the result is valid: identical to the clean input's
//! result where the mutation does not change the meaning), rejected (an error; for a
//! corruption that is the right answer), a *silent wrong result* (accepted, but different
//! from the clean result or not valid: a NaN score, a span outside the text), a panic
//! (caught with `catch_unwind` on a worker thread), or a hang (watched from the calling
//! thread: the case used more CPU time than its budget, or has waited [`WALL_FACTOR`] times
//! its budget without using it; see [`wait_for`]). An abort (an allocation failure, a stack
//! overflow) takes the process down: `mdl fuzz` (the hidden subcommand, [`supervise`])
//! runs the cases in a child process and counts a child that died as an abort at the case
//! it was running, then goes on after it.
//!
//! `known` says whether a case may use the inputs of findings still being fixed (issue 21's
//! huge sizes and numbers, deep nesting, values that overflow `f32`); a test suite leaves
//! them out until their fixes land (they have: `tests/fuzz.rs` puts them in), the bench
//! (`--known`) counts what they do. Run folders are corrupted in every way in both (their
//! files are checked against the folder's manifest).

mod checkpoints;
mod csv;
mod fixture;
mod runs;
mod specs;
pub mod supervise;
mod yaml;

pub use fixture::Fixture;
use mdl_runtime::rng::SplitMix64;
use serde::{Deserialize, Serialize};
pub use specs::SPEC_TOKENS;
use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// The input kinds the suite mutates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Spec,
    Yaml,
    Csv,
    Checkpoint,
    RunFolder,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Spec, Kind::Yaml, Kind::Csv, Kind::Checkpoint, Kind::RunFolder];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Spec => "spec",
            Kind::Yaml => "yaml",
            Kind::Csv => "csv",
            Kind::Checkpoint => "checkpoint",
            Kind::RunFolder => "run-folder",
        }
    }

    pub fn parse(name: &str) -> Result<Kind, String> {
        Kind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown fuzz kind `{name}` (kinds: {})", names.join(", "))
        })
    }
}

/// How one case ended (what the case itself reports; panics and hangs are the runner's).
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// A valid result (identical to the clean one where the meaning did not change).
    Accepted,
    /// An error.
    Rejected,
    /// A wrong result given as if right: different from the clean result, not a valid
    /// result, or an input that means the same as the clean one refused.
    Silent(String),
}

/// A finding: a case that panicked, hung, aborted or gave a silent wrong result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: Kind,
    pub case: u64,
    /// `panic`, `hang`, `abort` or `silent`.
    pub class: String,
    /// What the case fed in.
    pub input: String,
    /// The panic message, the time, or what differed.
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} case {}: {}: {} (input: {})", self.kind.name(), self.case, self.class, self.detail, self.input)
    }
}

/// The counts of a run of cases of one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub cases: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub panics: u64,
    pub hangs: u64,
    pub aborts: u64,
    pub silent: u64,
    /// The longest case that finished, in seconds.
    pub slowest_secs: f64,
    pub seconds: f64,
    pub findings: Vec<Finding>,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.cases += other.cases;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.panics += other.panics;
        self.hangs += other.hangs;
        self.aborts += other.aborts;
        self.silent += other.silent;
        self.slowest_secs = self.slowest_secs.max(other.slowest_secs);
        self.seconds += other.seconds;
        self.findings.extend(other.findings.iter().cloned());
    }

    fn record(&mut self, finding: Finding) {
        match finding.class.as_str() {
            "panic" => self.panics += 1,
            "hang" => self.hangs += 1,
            "abort" => self.aborts += 1,
            _ => self.silent += 1,
        }
        self.findings.push(finding);
    }

    /// Panics, hangs, aborts and silent wrong results together.
    pub fn failures(&self) -> u64 {
        self.panics + self.hangs + self.aborts + self.silent
    }
}

/// What a run of cases needs: the seed, the time budget per case, whether inputs of
/// findings still being fixed are drawn, and when to stop starting cases (if ever).
pub struct Settings {
    pub seed: u64,
    pub budget: Duration,
    pub known: bool,
    pub until: Option<Instant>,
}

/// What a case tells its watcher while it runs, kept where a panic cannot lose it: the
/// input it fed in, and the time it is allowed beyond the budget for the work its input
/// asks for (see [`allow`]).
#[derive(Default)]
pub struct CaseNotes {
    input: Mutex<String>,
    allowance_ms: AtomicU64,
    /// The Linux thread id of the case's thread (0 until it has started, or where there is
    /// none), for its CPU time.
    thread_id: AtomicU64,
}

type Described = Arc<CaseNotes>;

fn describe(slot: &Described, text: impl Into<String>) {
    let mut s = text.into();
    if s.len() > 300 {
        let cut = (0..=300).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    *slot.input.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

/// Grants the running case `extra` time beyond the per-case budget. A case calls it, before
/// the work starts, when its input legitimately asks for work that grows with the input (a
/// mutated experiment that trains a 22-million-parameter model): a hang is then a case past
/// the budget plus the allowance of the work it declared, not a large model run slowly.
fn allow(slot: &Described, extra: Duration) {
    slot.allow(extra);
}

impl CaseNotes {
    /// See [`allow`].
    pub fn allow(&self, extra: Duration) {
        let ms = u64::try_from(extra.as_millis()).unwrap_or(u64::MAX);
        self.allowance_ms.store(ms, Ordering::SeqCst);
    }
}

/// How many times its budget a case may take in wall time while it has used less CPU time
/// than the budget. A case that waits — for a core, on a machine other work keeps busy, or
/// for the disk — is slow, and its CPU time is what the budget measures; a case that has
/// waited this long without computing is blocked (a read that never returns), and a hang.
pub const WALL_FACTOR: u32 = 20;

/// How a watched case ended.
enum Watched<T> {
    Done(T),
    /// It used more CPU time than its budget (the time measured; wall time where the
    /// platform cannot tell a thread's CPU time).
    OverBudget(Duration),
    /// It was still running after [`WALL_FACTOR`] times its budget, with this CPU time.
    Blocked {
        wall: Duration,
        cpu: Option<Duration>,
    },
    /// Its thread ended without a verdict.
    Vanished,
}

/// Waits for a case's outcome. Its budget is `budget` plus whatever allowance the case has
/// declared by then (re-read at each look), spent in CPU time of the case's thread: a hang
/// is a case past it, or one still running after [`WALL_FACTOR`] times it in wall time.
/// Measuring CPU time keeps the verdict the same on an idle machine and on one where the
/// case gets a twentieth of a core.
fn wait_for<T>(receive: &mpsc::Receiver<T>, notes: &CaseNotes, started: Instant, budget: Duration) -> Watched<T> {
    loop {
        let allowance = Duration::from_millis(notes.allowance_ms.load(Ordering::SeqCst));
        let limit = budget.saturating_add(allowance);
        let look = (limit / 20).clamp(Duration::from_millis(5), Duration::from_millis(250));
        match receive.recv_timeout(look) {
            Ok(outcome) => return Watched::Done(outcome),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Watched::Vanished,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let wall = started.elapsed();
        let cpu = crate::cputime::of_thread(notes.thread_id.load(Ordering::SeqCst));
        let over = match cpu {
            Some(used) if used >= limit => Some(Watched::OverBudget(used)),
            None if wall >= limit => Some(Watched::OverBudget(wall)),
            _ if wall >= limit.saturating_mul(WALL_FACTOR) => Some(Watched::Blocked { wall, cpu }),
            _ => None,
        };
        if let Some(over) = over {
            // The verdict may have come while the clocks were read.
            return match receive.try_recv() {
                Ok(outcome) => Watched::Done(outcome),
                Err(_) => over,
            };
        }
    }
}

thread_local! {
    /// Set on a case's worker thread: its panics are recorded here, not printed.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps the message of a panic on a case's thread
/// and hands every other panic to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let caught = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let message = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                        *slot = Some(format!("{message}{at}"));
                        true
                    }
                    None => false,
                }
            });
            if !caught {
                previous(info);
            }
        }));
    });
}

/// The generator of one case: independent of every other case's.
pub fn case_rng(seed: u64, kind: Kind, case: u64) -> SplitMix64 {
    SplitMix64::keyed(seed, case, kind as u64 + 1)
}

/// Runs one case of `kind` in `dir` (emptied after): generate the input from `rng`, feed
/// it in, judge the result.
fn run_one(kind: Kind, fx: &Fixture, rng: &mut SplitMix64, known: bool, dir: &Path, input: &Described) -> Verdict {
    match kind {
        Kind::Spec => specs::case(fx, rng, known, input),
        Kind::Yaml => yaml::case(fx, rng, known, dir, input),
        Kind::Csv => csv::case(fx, rng, known, dir, input),
        Kind::Checkpoint => checkpoints::case(fx, rng, known, dir, input),
        Kind::RunFolder => runs::case(fx, rng, known, dir, input),
    }
}

/// Runs cases `range` of `kind` (see [`run_cases`]).
pub fn run_range(
    kind: Kind,
    fx: &Arc<Fixture>,
    settings: &Settings,
    range: std::ops::Range<u64>,
    stop_on_hang: bool,
    on_case: impl FnMut(u64),
) -> Tally {
    let (fx, seed, known) = (fx.clone(), settings.seed, settings.known);
    let body = move |case: u64, input: &Described| {
        if case.is_multiple_of(500) {
            // Runs of mutated experiments fill the fixture's data cache: start it afresh.
            let _ = std::fs::remove_dir_all(fx.dir.join("cache"));
        }
        let dir = fx.scratch(kind, case);
        let mut rng = case_rng(seed, kind, case);
        let verdict = run_one(kind, &fx, &mut rng, known, &dir, input);
        let _ = std::fs::remove_dir_all(&dir);
        verdict
    };
    run_cases(kind, settings, range, stop_on_hang, on_case, Arc::new(body))
}

/// Runs `body` on a given number (a test's stand-in for a kind's cases; see [`run_cases`]);
/// the body may declare work beyond the budget with [`CaseNotes::allow`].
pub fn run_cases_with(
    settings: &Settings,
    range: std::ops::Range<u64>,
    body: impl Fn(u64, &CaseNotes) -> Verdict + Send + Sync + 'static,
) -> Tally {
    run_cases(Kind::Spec, settings, range, false, |_| {}, Arc::new(move |case, notes: &Described| body(case, notes)))
}

/// What runs one case: its number and where to leave the description of its input.
type CaseBody = Arc<dyn Fn(u64, &Described) -> Verdict + Send + Sync>;

/// Runs cases `range`, each on a worker thread (8 MiB of stack, as a main thread has)
/// watched for `settings.budget`; `on_case` is told each case number before it starts
/// (the supervisor's child prints it). A case that hangs is left running on its thread
/// and counted; `stop_on_hang` then ends the run (a child exits so that its parent kills
/// the thread with it).
fn run_cases(
    kind: Kind,
    settings: &Settings,
    range: std::ops::Range<u64>,
    stop_on_hang: bool,
    mut on_case: impl FnMut(u64),
    body: CaseBody,
) -> Tally {
    install_panic_hook();
    let started = Instant::now();
    let mut tally = Tally::default();
    for case in range {
        if settings.until.is_some_and(|until| Instant::now() >= until) {
            break;
        }
        on_case(case);
        let input: Described = Arc::default();
        let (send, receive) = mpsc::channel();
        let (input2, body2) = (input.clone(), body.clone());
        let case_started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name(format!("fuzz-{}-{case}", kind.name()))
            .stack_size(8 << 20)
            .spawn(move || {
                input2.thread_id.store(crate::cputime::this_thread_id(), Ordering::SeqCst);
                CAUGHT.with(|c| *c.borrow_mut() = Some(None));
                let result = catch_unwind(AssertUnwindSafe(|| body2(case, &input2)));
                let message = CAUGHT.with(|c| c.borrow_mut().take().flatten());
                let _ = send.send(result.map_err(|_| message.unwrap_or_else(|| "a panic".into())));
            });
        tally.cases += 1;
        if let Err(e) = spawned {
            let detail = format!("no thread: {e}");
            tally.record(Finding { kind, case, class: "abort".into(), input: String::new(), detail });
            continue;
        }
        let outcome = wait_for(&receive, &input, case_started, settings.budget);
        let input_text = || input.input.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let allowance = input.allowance_ms.load(Ordering::SeqCst) as f64 / 1e3;
        let budget_text = match allowance > 0.0 {
            true => format!("{:.1} s budget + {allowance:.1} s for its declared work", settings.budget.as_secs_f64()),
            false => format!("its {:.1} s budget", settings.budget.as_secs_f64()),
        };
        let hang = match outcome {
            Watched::Done(Ok(verdict)) => {
                tally.slowest_secs = tally.slowest_secs.max(case_started.elapsed().as_secs_f64());
                match verdict {
                    Verdict::Accepted => tally.accepted += 1,
                    Verdict::Rejected => tally.rejected += 1,
                    Verdict::Silent(detail) => {
                        tally.record(Finding { kind, case, class: "silent".into(), input: input_text(), detail })
                    }
                }
                None
            }
            Watched::Done(Err(message)) => {
                tally.record(Finding { kind, case, class: "panic".into(), input: input_text(), detail: message });
                None
            }
            Watched::OverBudget(used) => {
                Some(format!("still running after {:.1} s of CPU time ({budget_text})", used.as_secs_f64()))
            }
            Watched::Blocked { wall, cpu } => Some(format!(
                "still running after {:.1} s, {WALL_FACTOR} times {budget_text}, having used {} of CPU time: blocked",
                wall.as_secs_f64(),
                cpu.map_or("an unknown amount".to_string(), |c| format!("{:.1} s", c.as_secs_f64()))
            )),
            Watched::Vanished => Some("its thread ended without a verdict".to_string()),
        };
        if let Some(detail) = hang {
            tally.record(Finding { kind, case, class: "hang".into(), input: input_text(), detail });
            if stop_on_hang {
                break;
            }
        }
    }
    tally.seconds = started.elapsed().as_secs_f64();
    tally
}

/// Random choices over the project's generator (beside its own `chance(p)`).
pub(crate) trait Draw {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
    fn upto(&mut self, n: usize) -> usize;
}

impl Draw for SplitMix64 {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// Byte-level corruptions of a file's contents: flips, overwrites, truncations, insertions,
/// deletions, duplicated or swapped regions. Returns what it did.
pub(crate) fn corrupt_bytes(rng: &mut SplitMix64, bytes: &mut Vec<u8>) -> String {
    let n = bytes.len();
    let at = rng.upto(n.max(1)).min(n);
    match rng.below(8) {
        0 if n > 0 => {
            let bits = 1 + rng.upto(8);
            for _ in 0..bits {
                let i = rng.upto(n);
                bytes[i] ^= 1 << rng.below(8);
            }
            format!("{bits} bit flips")
        }
        1 => {
            bytes.truncate(at);
            format!("truncated to {at} of {n} bytes")
        }
        2 if n > 0 => {
            let len = 1 + rng.upto(16.min(n - at).max(1));
            let value = *rng.pick(&[0u8, 0xff, b'9', b'-', b'e']);
            for b in bytes.iter_mut().skip(at).take(len) {
                *b = value;
            }
            format!("{len} bytes at {at} set to {value:#x}")
        }
        3 => {
            let len = 1 + rng.upto(32);
            let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            bytes.splice(at..at, junk);
            format!("{len} random bytes inserted at {at}")
        }
        4 if n > 0 => {
            let len = (1 + rng.upto(64)).min(n - at);
            bytes.drain(at..at + len);
            format!("{len} bytes deleted at {at}")
        }
        5 if n > 0 => {
            let len = (1 + rng.upto(64)).min(n - at);
            let piece: Vec<u8> = bytes[at..at + len].to_vec();
            bytes.splice(at..at, piece);
            format!("{len} bytes at {at} duplicated")
        }
        6 => {
            bytes.clear();
            "emptied".into()
        }
        _ => {
            let len = 1 + rng.upto(256);
            bytes.extend((0..len).map(|_| rng.next_u64() as u8));
            format!("{len} random bytes appended")
        }
    }
}

/// The scratch folder of one case (created empty).
fn case_dir(root: &Path, kind: Kind, case: u64) -> PathBuf {
    let dir = root.join(format!("{}-{case}", kind.name()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
