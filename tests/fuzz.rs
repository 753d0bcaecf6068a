//! The fuzz suite at a small size (issue 21): for each input kind — specs, experiment YAML
//! with `--set`, CSV rows, checkpoints, run folders — a few hundred mutated inputs
//! (seed 21, the same cases every run) through the library as the commands use it. Each
//! case must end in a valid result or an error: no panic, no case over the 10 s budget,
//! and a corrupted input never gives a result different from the clean one. The bench
//! (`mdl fuzz --cases 100000`) runs the same cases at scale; docs/reliability.md has its
//! figures. The inputs of issue 21's findings (huge sizes and numbers, deep nesting) are in
//! (`known: true`): their fixes have landed.

use mdl::fuzz::{run_range, Fixture, Kind, Settings, Tally};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One fixture for the whole binary (its runs take a second).
fn fixture() -> Arc<Fixture> {
    static FIXTURE: OnceLock<Arc<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            // Cargo's scratch folder for tests: emptied by the fixture, never left in /tmp.
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
            Arc::new(Fixture::new(&root(), &dir).unwrap_or_else(|e| panic!("the fuzz fixture: {e}")))
        })
        .clone()
}

fn settings() -> Settings {
    Settings { seed: 21, budget: Duration::from_secs(10), known: true, until: None }
}

/// Runs `cases` cases of `kind` and fails with every finding.
fn assert_clean(kind: Kind, cases: u64) -> Tally {
    let tally = run_range(kind, &fixture(), &settings(), 0..cases, false, |_| {});
    let findings: Vec<String> = tally.findings.iter().map(|f| f.to_string()).collect();
    assert!(
        findings.is_empty(),
        "{} findings in {} {} cases:\n{}",
        findings.len(),
        cases,
        kind.name(),
        findings.join("\n")
    );
    assert_eq!(tally.cases, cases);
    assert_eq!(tally.accepted + tally.rejected, cases);
    tally
}

#[test]
fn mutated_specs_compile_or_are_reported() {
    let t = assert_clean(Kind::Spec, 400);
    assert!(t.rejected > 0, "no mutated spec was rejected: the mutations do nothing");
}

#[test]
fn mutated_experiments_load_and_train_or_are_reported() {
    let t = assert_clean(Kind::Yaml, 200);
    assert!(t.accepted > 0 && t.rejected > 0, "{t:?}");
}

#[test]
fn mutated_csv_rows_score_like_the_clean_rows_or_are_reported() {
    let t = assert_clean(Kind::Csv, 400);
    assert!(t.accepted > 0 && t.rejected > 0, "{t:?}");
}

#[test]
fn corrupted_checkpoints_are_rejected_or_read_back_unchanged() {
    let t = assert_clean(Kind::Checkpoint, 400);
    assert!(t.rejected > 0, "{t:?}");
}

#[test]
fn corrupted_run_folders_give_the_clean_results_or_an_error() {
    let t = assert_clean(Kind::RunFolder, 150);
    assert!(t.accepted > 0 && t.rejected > 0, "{t:?}");
}

/// The suite can fail: a panic, a hang and a wrong result are each counted and named.
#[test]
fn the_runner_counts_panics_hangs_and_silent_results() {
    use mdl::fuzz::Verdict;
    let s = Settings { seed: 1, budget: Duration::from_millis(300), known: false, until: None };
    let t = mdl::fuzz::run_cases_with(&s, 0..3, |case, _| match case {
        0 => panic!("boom"),
        1 => {
            spend_cpu(Duration::from_secs(2));
            Verdict::Accepted
        }
        _ => Verdict::Silent("different".into()),
    });
    assert_eq!((t.cases, t.panics, t.hangs, t.silent), (3, 1, 1, 1), "{t:?}");
    assert!(t.findings[0].detail.contains("boom"), "{:?}", t.findings[0]);
    assert!(t.findings[1].detail.contains("s of CPU time (its 0.3 s budget)"), "{:?}", t.findings[1]);
}

/// Busy work on the calling thread until it has used `cpu` of CPU time, however long a
/// loaded machine makes that take.
fn spend_cpu(cpu: Duration) {
    let mut x = 0u64;
    while mdl::cputime::this_thread().expect("a Linux thread's CPU time") < cpu {
        for i in 0..100_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}

/// The budget is CPU time: a case that waits longer than its budget while computing little
/// (for a core on a busy machine, for the disk) is not a hang; one that waits
/// `WALL_FACTOR` times its budget is blocked, and counted.
#[test]
fn a_waiting_case_is_slow_and_a_blocked_one_hangs() {
    use mdl::fuzz::Verdict;
    let s = Settings { seed: 1, budget: Duration::from_millis(100), known: false, until: None };
    let t = mdl::fuzz::run_cases_with(&s, 0..2, |case, _| {
        let wait = match case {
            0 => Duration::from_millis(600),
            _ => Duration::from_millis(100 * u64::from(mdl::fuzz::WALL_FACTOR) + 1500),
        };
        std::thread::sleep(wait);
        Verdict::Accepted
    });
    assert_eq!((t.cases, t.accepted, t.hangs), (2, 1, 1), "{t:?}");
    let hang = &t.findings[0];
    assert_eq!(hang.case, 1, "{hang:?}");
    assert!(hang.detail.contains("20 times its 0.1 s budget") && hang.detail.ends_with("blocked"), "{hang:?}");
}

/// A case that declares the work its input asks for gets that much time beyond the budget,
/// and no more: slow work within its allowance is not a hang, a case past it is.
#[test]
fn declared_work_extends_a_case_budget_and_no_further() {
    use mdl::fuzz::Verdict;
    let s = Settings { seed: 1, budget: Duration::from_millis(300), known: false, until: None };
    let t = mdl::fuzz::run_cases_with(&s, 0..2, |case, notes| {
        match case {
            0 => notes.allow(Duration::from_secs(3)),
            _ => notes.allow(Duration::from_millis(200)),
        }
        spend_cpu(Duration::from_millis(1200));
        Verdict::Accepted
    });
    assert_eq!((t.cases, t.accepted, t.hangs), (2, 1, 1), "{t:?}");
    let hang = &t.findings[0];
    assert_eq!(hang.case, 1, "{hang:?}");
    assert!(hang.detail.contains("0.3 s budget + 0.2 s for its declared work"), "{hang:?}");
}

#[test]
fn the_bench_subcommand_prints_the_table_per_kind() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mdl"))
        .args(["fuzz", "--kind", "checkpoint", "--kind", "spec", "--cases", "20"])
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| checkpoint | 20 |") && stdout.contains("| spec | 20 |"), "{stdout}");
}
