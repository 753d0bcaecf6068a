//! What a run shows while it works: a one-line progress bar (rows/s, loss, ETA) on a
//! terminal, plain lines when stderr is not a terminal or `CI` is set, and every line in
//! the run's `train.log` with a timestamp in seconds since the start. The ranks of a
//! data-parallel run other than rank 0 show nothing and write no log ([`Progress::silent`]).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

pub struct Progress {
    /// None: silent (a rank other than 0).
    log: Option<std::fs::File>,
    start: Instant,
    live: bool,
    last_draw: Option<Instant>,
    drawn: bool,
    /// For plain output: the last progress percentage printed (every 10 %).
    last_decile: u64,
}

impl Progress {
    pub fn new(log_path: &Path) -> Result<Progress, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let live = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        Ok(Progress { log: Some(log), start: Instant::now(), live, last_draw: None, drawn: false, last_decile: 0 })
    }

    /// A progress that shows and writes nothing, for a rank other than 0 of a data-parallel
    /// run (rank 0 shows the run's progress and writes its log).
    pub fn silent() -> Progress {
        Progress { log: None, start: Instant::now(), live: false, last_draw: None, drawn: false, last_decile: 0 }
    }

    /// Seconds since the log was opened (the run's launch in this process).
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A line for the terminal and the log.
    pub fn line(&mut self, msg: &str) {
        if self.log.is_none() {
            return;
        }
        self.clear_bar();
        crate::say!("{msg}");
        if let Some(log) = &mut self.log {
            let _ = writeln!(log, "[{:8.2}s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }

    /// Training progress after a step.
    pub fn progress(&mut self, step: u64, total: u64, epoch: usize, loss: f64, rows_per_sec: f64) {
        if self.log.is_none() {
            return;
        }
        let frac = if total > 0 { (step as f64 / total as f64).min(1.0) } else { 0.0 };
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if frac > 0.0 { elapsed * (1.0 - frac) / frac } else { 0.0 };
        let text = format!(
            "step {step}/{total} epoch {epoch} loss {loss:.5} {:.0} rows/s ETA {}",
            rows_per_sec,
            fmt_secs(eta)
        );
        if self.live {
            if self.last_draw.is_some_and(|t| t.elapsed().as_millis() < 100) && step < total {
                return;
            }
            let width = 24;
            let filled = (frac * width as f64).round() as usize;
            crate::say_partial!("\r[{}{}] {text}\x1b[K", "#".repeat(filled), "-".repeat(width - filled));
            let _ = std::io::stderr().flush();
            self.last_draw = Some(Instant::now());
            self.drawn = true;
        } else {
            let decile = (frac * 10.0).floor() as u64;
            if decile > self.last_decile || step == 1 {
                self.last_decile = decile;
                crate::say!("{text}");
            }
        }
        if let Some(log) = self.log.as_mut().filter(|_| step.is_multiple_of(50) || step == 1) {
            let _ = writeln!(log, "[{:8.2}s] {text}", elapsed);
        }
    }

    pub fn finish(&mut self) {
        self.clear_bar();
    }

    fn clear_bar(&mut self) {
        if self.drawn {
            crate::say_partial!("\r\x1b[K");
            self.drawn = false;
        }
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
