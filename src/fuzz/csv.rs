//! CSV cases: the fixture's test (or train) split mutated at the cell level (huge, NaN,
//! infinite, empty, overlong, quoted or non-ASCII values), rewritten in ways that keep its
//! meaning (CRLF, blank lines, quoted cells, columns reordered, an extra column), or broken
//! structurally (rows and cells deleted or duplicated, header names changed, bytes
//! corrupted, the file truncated).
//!
//! Two targets, as the commands read data: `eval` / `predict` (encode with run A's fitted
//! encoders, score on interp) and `run` (prepare the three splits with the mutated train
//! file). The verdict: an error; or scores that are all finite probabilities, identical
//! to the clean scores for every row a cell mutation did not touch, and identical
//! everywhere (with the same eval report) after a rewrite that keeps the meaning; for
//! `run`, finite encoded values everywhere and, after such a rewrite, the clean
//! encoding.

use super::{corrupt_bytes, describe, Described, Draw, Fixture, Verdict};
use crate::data::{self, BadRows, CacheMode, Dataset, PrepareOptions, SplitPaths};
use mdl_runtime::rng::SplitMix64;
use std::path::Path;

/// Cell values a mutation writes.
const CELLS: &[&str] = &[
    "",
    " ",
    "0",
    "1",
    "-1",
    "2",
    "0.5",
    "abc",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e15",
    "-1e15",
    "0x10",
    "\"",
    "é",
    "\u{0}",
    "  7 ",
    "1 2 3",
    "-0",
    "1e-300",
    "99999999999999",
    "+1",
    "1.",
    ".5",
    "1e",
    "--1",
    "true",
    "\u{202e}x",
];

/// Finite numbers that overflow `f32` after normalisation (issue 21, finding 4).
const KNOWN_CELLS: &[&str] = &["1e30", "1e300", "1.7e308", "-1.7e308", "3.4e38", "1e39"];

/// What a mutation did to the file's meaning.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Change {
    /// Same rows, same values: the result must be the clean one.
    Same,
    /// Values of these rows (0-based data rows) changed; the rows are still the same rows.
    Cells,
    /// Rows, columns or bytes changed: only validity can be checked.
    Structure,
}

struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Splits lines into cells at commas outside quotes; cells keep their quotes, so
    /// rendering gives the text back. (The fixture's rows hold no quoted newlines.)
    fn parse(text: &str) -> Table {
        let split = |line: &str| {
            let mut cells = vec![String::new()];
            let mut quoted = false;
            for c in line.chars() {
                match c {
                    '"' => quoted = !quoted,
                    ',' if !quoted => {
                        cells.push(String::new());
                        continue;
                    }
                    _ => {}
                }
                cells.last_mut().expect("one cell at least").push(c);
            }
            cells
        };
        let mut lines = text.lines().map(split);
        let header = lines.next().unwrap_or_default();
        Table { header, rows: lines.collect() }
    }

    fn render(&self, ending: &str) -> String {
        let mut out = self.header.join(",");
        out.push_str(ending);
        for r in &self.rows {
            out.push_str(&r.join(","));
            out.push_str(ending);
        }
        out
    }
}

fn overlong(rng: &mut SplitMix64) -> String {
    match rng.below(3) {
        0 => "a".repeat(100_000),
        1 => "9 ".repeat(20_000),
        _ => "1".repeat(5_000),
    }
}

/// Mutates `table` (or, for byte-level cases, returns bytes); records touched rows.
fn mutate(rng: &mut SplitMix64, t: &mut Table, known: bool, touched: &mut Vec<usize>) -> (Change, String) {
    let rows = t.rows.len();
    let cols = t.header.len();
    match rng.below(10) {
        0..=3 if rows > 0 => {
            let (r, c) = (rng.upto(rows), rng.upto(cols));
            let value = if rng.chance(0.05) {
                overlong(rng)
            } else if known && rng.chance(0.3) {
                rng.pick(KNOWN_CELLS).to_string()
            } else {
                rng.pick(CELLS).to_string()
            };
            let shown: String = value.chars().take(20).collect();
            let name = t.header.get(c).cloned().unwrap_or_default();
            if let Some(cell) = t.rows[r].get_mut(c) {
                *cell = value;
            }
            touched.push(r);
            // A value with a separator or an opening quote changes the rows' structure.
            let change = if shown.starts_with('"') || shown.contains(',') { Change::Structure } else { Change::Cells };
            (change, format!("row {r} column {name} = {shown:?}"))
        }
        4 if cols > 1 => {
            let (a, b) = (rng.upto(cols), rng.upto(cols));
            t.header.swap(a, b);
            for r in &mut t.rows {
                if a < r.len() && b < r.len() {
                    r.swap(a, b);
                }
            }
            (Change::Same, format!("columns {a} and {b} swapped"))
        }
        5 => {
            t.header.push("extra_column".into());
            for (i, r) in t.rows.iter_mut().enumerate() {
                r.push(format!("v{i}"));
            }
            (Change::Same, "an extra column".into())
        }
        6 if rows > 0 => {
            let (r, c) = (rng.upto(rows), rng.upto(cols));
            if let Some(cell) = t.rows[r].get_mut(c).filter(|cell| !cell.starts_with('"')) {
                *cell = format!("\"{}\"", cell.replace('"', "\"\""));
            }
            (Change::Same, format!("row {r} column {c} quoted"))
        }
        7 if rows > 0 => {
            let r = rng.upto(rows);
            let what = match rng.below(4) {
                0 => {
                    t.rows.remove(r);
                    "deleted"
                }
                1 => {
                    let copy = t.rows[r].clone();
                    t.rows.insert(r, copy);
                    "duplicated"
                }
                2 => {
                    if !t.rows[r].is_empty() {
                        let c = rng.upto(t.rows[r].len());
                        t.rows[r].remove(c);
                    }
                    "lost a cell"
                }
                _ => {
                    t.rows[r].push("1".into());
                    "gained a cell"
                }
            };
            (Change::Structure, format!("row {r} {what}"))
        }
        8 if cols > 0 => {
            let c = rng.upto(cols);
            let old = t.header[c].clone();
            let new = match rng.below(3) {
                0 => format!("{old}_"),
                1 => t.header[rng.upto(cols)].clone(),
                _ => String::new(),
            };
            t.header[c] = new.clone();
            (Change::Structure, format!("header {old} -> {new:?}"))
        }
        _ => (Change::Structure, "bytes".into()),
    }
}

fn same_encoding(a: &Dataset, b: &Dataset) -> bool {
    a.rows == b.rows
        && a.cat == b.cat
        && a.seq_ids == b.seq_ids
        && a.seq_mask == b.seq_mask
        && a.num.iter().flatten().map(|x| x.to_bits()).eq(b.num.iter().flatten().map(|x| x.to_bits()))
        && a.domain == b.domain
        && a.labels == b.labels
        && a.user == b.user
}

fn finite(ds: &Dataset) -> Option<String> {
    let bad = ds.num.iter().flatten().position(|x| !x.is_finite())?;
    Some(format!(
        "a numeric input is {} after encoding (value {bad} of {})",
        ds.num.iter().flatten().nth(bad)?,
        ds.source
    ))
}

pub(super) fn case(fx: &Fixture, rng: &mut SplitMix64, known: bool, dir: &Path, input: &Described) -> Verdict {
    let for_training = rng.chance(0.3);
    let split = if for_training { &fx.splits[0] } else { &fx.splits[2] };
    let mut table = Table::parse(&split.1);
    let mut touched = Vec::new();
    let mut change = Change::Same;
    let mut did = Vec::new();
    let mut byte_level = false;
    for _ in 0..1 + rng.upto(3) {
        let (c, what) = mutate(rng, &mut table, known, &mut touched);
        byte_level |= what == "bytes";
        change = match (change, c) {
            (Change::Structure, _) | (_, Change::Structure) => Change::Structure,
            (Change::Cells, _) | (_, Change::Cells) => Change::Cells,
            _ => Change::Same,
        };
        did.push(what);
    }
    let ending = if rng.chance(0.2) { "\r\n" } else { "\n" };
    let mut text = table.render(ending);
    if rng.chance(0.1) {
        text.push_str(ending);
        text.push_str(ending);
    }
    let mut bytes = text.into_bytes();
    if byte_level {
        did.push(corrupt_bytes(rng, &mut bytes));
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let bad_rows = if rng.chance(0.3) { BadRows::Skip } else { BadRows::Fail };
    describe(
        input,
        format!(
            "{} split, {bad_rows:?}, {}: {}",
            if for_training { "train" } else { "test" },
            if ending == "\n" { "LF" } else { "CRLF" },
            did.join("; ")
        ),
    );
    if for_training {
        training(fx, &text, bad_rows, change, dir)
    } else if rng.chance(0.25) {
        predict_command(fx, &text, bad_rows, change, &touched, dir)
    } else {
        scoring(fx, &text, bad_rows, change, &touched, dir)
    }
}

/// A file that means the same as the clean one, refused: a wrong result too.
fn refused(error: &str) -> Verdict {
    Verdict::Silent(format!("a rewrite that keeps the meaning was refused: {error}"))
}

/// `run`'s view: prepare the splits with the mutated train file.
fn training(fx: &Fixture, text: &str, bad_rows: BadRows, change: Change, dir: &Path) -> Verdict {
    let train = dir.join("train.csv");
    if std::fs::write(&train, text).is_err() {
        return Verdict::Rejected;
    }
    let paths = SplitPaths { train, valid: fx.splits[1].0.clone(), test: fx.splits[2].0.clone() };
    let options = PrepareOptions { bad_rows, cache: CacheMode::Off, ..Default::default() };
    let prep = match data::prepare(&fx.loaded.fitted.schema, &paths, &options) {
        Ok(p) => p,
        Err(e) if change == Change::Same => return refused(&e.to_string()),
        Err(_) => return Verdict::Rejected,
    };
    for ds in [&prep.train, &prep.valid, &prep.test] {
        if let Some(problem) = finite(ds) {
            return Verdict::Silent(problem);
        }
    }
    if change == Change::Same {
        let clean = &fx.clean_prepared;
        let same = same_encoding(&prep.train, &clean.train)
            && same_encoding(&prep.valid, &clean.valid)
            && same_encoding(&prep.test, &clean.test)
            && serde_json::to_string(&prep.fitted).ok() == serde_json::to_string(&clean.fitted).ok();
        if !same {
            return Verdict::Silent("a rewrite that keeps the meaning changed the encoded data".into());
        }
    }
    Verdict::Accepted
}

/// `mdl predict`'s path ([`crate::predict::predict`]): one output line per input record,
/// empty scores for a skipped record.
fn predict_command(
    fx: &Fixture,
    text: &str,
    bad_rows: BadRows,
    change: Change,
    touched: &[usize],
    dir: &Path,
) -> Verdict {
    let (data, out) = (dir.join("test.csv"), dir.join("scores.csv"));
    if std::fs::write(&data, text).is_err() {
        return Verdict::Rejected;
    }
    let options =
        crate::predict::PredictOptions { data, out: out.clone(), bad_rows: Some(bad_rows), ..Default::default() };
    let predicted = match crate::predict::predict(&fx.run_a, &options) {
        Ok(p) => p,
        Err(e) if change == Change::Same => return refused(&e),
        Err(_) => return Verdict::Rejected,
    };
    let Ok(written) = std::fs::read_to_string(&out) else {
        return Verdict::Silent("predict succeeded without writing its output".into());
    };
    let lines: Vec<&str> = written.lines().collect();
    if lines.len() != predicted.rows + 1 {
        return Verdict::Silent(format!("{} output lines for {} rows", lines.len(), predicted.rows));
    }
    for (i, line) in lines.iter().enumerate().skip(1) {
        let valid = *line == "\"\"" || line.parse::<f32>().is_ok_and(|s| (0.0..=1.0).contains(&s));
        if !valid {
            return Verdict::Silent(format!("output row {i} is `{line}` (exit 0)"));
        }
    }
    let clean: Vec<&str> = fx.clean_predict_output.lines().collect();
    match change {
        Change::Same if lines != clean => {
            Verdict::Silent("a rewrite that keeps the meaning changed predict's output".into())
        }
        Change::Cells if lines.len() == clean.len() => {
            match (1..lines.len()).find(|&i| !touched.contains(&(i - 1)) && lines[i] != clean[i]) {
                Some(i) => {
                    Verdict::Silent(format!("row {}, untouched, scored {} instead of {}", i - 1, lines[i], clean[i]))
                }
                None => Verdict::Accepted,
            }
        }
        Change::Cells => Verdict::Silent(format!("{} output rows for {} input rows", lines.len() - 1, clean.len() - 1)),
        _ => Verdict::Accepted,
    }
}

/// `eval` and `predict`'s view: encode with run A's encoders and score.
fn scoring(fx: &Fixture, text: &str, bad_rows: BadRows, change: Change, touched: &[usize], dir: &Path) -> Verdict {
    let run = &fx.loaded;
    let ds = match run.fitted.encode_text(&dir.join("test.csv"), text, bad_rows) {
        Ok(ds) => ds,
        Err(e) if change == Change::Same => return refused(&e.to_string()),
        Err(_) => return Verdict::Rejected,
    };
    let Ok(mut exec) = run.experiment.backend.executor() else {
        return Verdict::Rejected;
    };
    let batch = run.experiment.train.batch_size;
    let Ok(scores) = run.session.predict(exec.as_mut(), &run.params, &ds, batch) else {
        return Verdict::Rejected;
    };
    if let Some(i) = scores.iter().position(|s| !(0.0..=1.0).contains(s)) {
        return Verdict::Silent(format!("row {i} scored {} (exit 0)", scores[i]));
    }
    let clean = &fx.clean_scores;
    let clean_rows = clean.len();
    match change {
        Change::Same => {
            if scores.iter().map(|s| s.to_bits()).ne(clean.iter().map(|s| s.to_bits())) {
                return Verdict::Silent("a rewrite that keeps the meaning changed the scores".into());
            }
            match run.session.evaluate(exec.as_mut(), &run.params, &ds, batch) {
                Ok(report) if serde_json::to_string_pretty(&report).ok().as_deref() == Some(fx.clean_eval.as_str()) => {
                }
                Ok(_) => return Verdict::Silent("a rewrite that keeps the meaning changed eval's report".into()),
                Err(_) => return Verdict::Rejected,
            }
        }
        Change::Cells => {
            if ds.rows + ds.skipped.count != clean_rows {
                return Verdict::Silent(format!(
                    "{} rows scored and {} skipped of {clean_rows}",
                    ds.rows, ds.skipped.count
                ));
            }
            if ds.rows == clean_rows {
                let changed =
                    (0..clean_rows).find(|r| !touched.contains(r) && scores[*r].to_bits() != clean[*r].to_bits());
                if let Some(r) = changed {
                    return Verdict::Silent(format!(
                        "row {r}, untouched, scored {} instead of {}",
                        scores[r], clean[r]
                    ));
                }
            }
            if run.session.evaluate(exec.as_mut(), &run.params, &ds, batch).is_err() {
                return Verdict::Rejected;
            }
        }
        Change::Structure => {
            if run.session.evaluate(exec.as_mut(), &run.params, &ds, batch).is_err() {
                return Verdict::Rejected;
            }
        }
    }
    Verdict::Accepted
}
