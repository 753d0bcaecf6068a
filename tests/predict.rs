//! `mdl predict` as a user scoring real traffic runs it, on the bundled kuairand_pure_tail
//! (data/, always present): rows without labels, id columns kept beside the scores, one
//! output row per input row (a malformed row is an error naming file:line, or an empty
//! score with `skip`), stdin and stdout, and unseen domain ids (an error naming the row, or
//! the declared fallback, which `mdl eval`, valid, test and the data cache follow too). The
//! model is small and uses the domain input, so the domain a row is scored as changes its
//! score.

mod common;
use common::scoring::{self, failed, fields, mdl, mdl_with, ok, test_split};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

fn tmp(name: &str) -> common::scratch::Scratch {
    scoring::tmp("predict", name)
}

/// Trains the small model for a few steps into `name` with extra `--set`s; returns the run
/// folder, shared by the tests of this file (kept).
fn train(name: &str, extra: &[&str]) -> PathBuf {
    scoring::train(&tmp(name).keep(), extra)
}

/// A run with the default policies (`bad_rows: fail`, `unknown_domain: error`).
fn run_failing() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| train("run_fail", &[]))
}

/// The same training, with `bad_rows: skip` and `unknown_domain: 1` declared.
fn run_lenient() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| train("run_lenient", &["data.bad_rows=skip", "data.unknown_domain=1"]))
}

/// `line` with its fields at `drop` removed.
fn without(line: &str, drop: &[usize]) -> String {
    let cells: Vec<String> = fields(line)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(_, f)| if f.contains(',') || f.contains('"') { format!("\"{}\"", f.replace('"', "\"\"")) } else { f })
        .collect();
    cells.join(",")
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn predict(run: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["predict", run.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", "-"];
    args.extend_from_slice(extra);
    mdl(&args)
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn rows_without_labels_are_scored_with_their_id_columns_kept() {
    let dir = tmp("no_label");
    let split = test_split();
    let header = fields(&split[0]);
    let position = |name: &str| header.iter().position(|h| h == name).unwrap();
    // Every label column gone (and the target), as in traffic not yet labelled.
    let labels: Vec<usize> =
        (0..header.len()).filter(|&i| header[i].starts_with("label") || header[i] == "target_play_time_ms").collect();
    assert_eq!(labels.len(), 10);
    let unlabelled: Vec<String> = split.iter().map(|l| without(l, &labels)).collect();
    let with_labels = write(&dir, "test.csv", &split);
    let without_labels = write(&dir, "unlabelled.csv", &unlabelled);
    let run = run_failing();

    let keep = ["--keep", "user_id,video_id,fans_user_num_range"];
    let scored = predict(run, &without_labels, &keep);
    let err = ok(&scored);
    assert!(err.contains(&format!("wrote {} rows of scores to stdout", split.len() - 1)), "{err}");
    let lines = stdout_lines(&scored);
    assert_eq!(lines.len(), split.len(), "one output row per input row, and the header");
    assert_eq!(lines[0], "user_id,video_id,fans_user_num_range,click");
    for (input, output) in split.iter().zip(&lines).skip(1) {
        let (input, output) = (fields(input), fields(output));
        assert_eq!(output.len(), 4, "{output:?}");
        let kept: Vec<&String> =
            ["user_id", "video_id", "fans_user_num_range"].iter().map(|c| &input[position(c)]).collect();
        assert_eq!(output[..3].iter().collect::<Vec<_>>(), kept, "the kept columns are the input's, in its order");
        let score: f64 = output[3].parse().unwrap();
        assert!(score > 0.0 && score < 1.0, "{output:?}");
    }
    // The labels, present or not, change nothing.
    let labelled = predict(run, &with_labels, &keep);
    ok(&labelled);
    assert_eq!(stdout_lines(&labelled), lines);
    // Streamed in blocks (of 16384 rows at batch 512), a row scores as it does in a file of
    // its own first 700 rows, or of the 1000 rows around the first block's end.
    let head = write(&dir, "head.csv", &unlabelled[..701]);
    let alone = predict(run, &head, &keep);
    ok(&alone);
    assert_eq!(stdout_lines(&alone), lines[..701]);
    let middle: Vec<String> = unlabelled[..1].iter().chain(&unlabelled[15885..16885]).cloned().collect();
    let middle = predict(run, &write(&dir, "middle.csv", &middle), &keep);
    ok(&middle);
    assert_eq!(stdout_lines(&middle)[1..], lines[15885..16885]);
    // A file output is the same text.
    let out = dir.join("scores.csv");
    ok(&mdl(&[
        "predict",
        run.to_str().unwrap(),
        "--data",
        without_labels.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--keep",
        "user_id,video_id,fans_user_num_range",
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), scored.stdout);
}

#[test]
fn a_kept_column_must_be_in_the_header_and_not_a_task() {
    let dir = tmp("keep");
    let rows = write(&dir, "rows.csv", &test_split()[..4]);
    let run = run_failing();
    let err = failed(&predict(run, &rows, &["--keep", "user_id,session"]));
    assert!(
        err.contains(&format!(
            "{}:1: no column 'session' to keep in the header; its columns are: label, label_click,",
            rows.display()
        )),
        "{err}"
    );
    assert!(err.contains(", hist_click_seq, hist_longview_seq\n"), "the whole header is listed: {err}");
    let err = failed(&predict(run, &rows, &["--keep", "click"]));
    assert!(err.contains("--keep click: the output already has a score column 'click'"), "{err}");
}

#[test]
fn a_malformed_row_is_an_error_naming_its_line_or_keeps_its_place_with_an_empty_score() {
    let dir = tmp("bad_row");
    let split = test_split();
    let mut rows: Vec<String> = split[..201].to_vec();
    let clean = write(&dir, "clean.csv", &rows);
    // Line 5 loses its last field.
    let line = rows[4].clone();
    rows[4] = line[..line.rfind(',').unwrap()].to_string();
    let bad = write(&dir, "bad.csv", &rows);
    let strict = run_failing();
    let err = failed(&predict(strict, &bad, &[]));
    assert!(err.contains(&format!("{}:5: expected 61 fields as in the header, found 60", bad.display())), "{err}");

    let reference = predict(strict, &clean, &["--keep", "video_id"]);
    ok(&reference);
    let reference = stdout_lines(&reference);
    let skipped = predict(strict, &bad, &["--keep", "video_id", "--bad-rows", "skip"]);
    let err = ok(&skipped);
    let skipped = stdout_lines(&skipped);
    assert_eq!(skipped.len(), 201, "one output row per input row");
    for (i, (a, b)) in reference.iter().zip(&skipped).enumerate() {
        if i == 4 {
            assert_eq!(b, &format!("{},\"\"", fields(&rows[4])[12]), "the skipped row keeps its place");
        } else {
            assert_eq!(a, b, "row {i} moved or changed");
        }
    }
    assert!(err.contains("wrote 200 rows of scores to stdout"), "{err}");
    assert!(
        err.contains(&format!(
            "skipped 1 malformed row (bad_rows: skip): its scores are empty; first: {}:5: expected 61 fields",
            bad.display()
        )),
        "{err}"
    );

    // The run's own `bad_rows: skip` does the same, and the flag overrides it.
    let lenient = run_lenient();
    let declared = predict(lenient, &bad, &["--keep", "video_id"]);
    ok(&declared);
    assert_eq!(stdout_lines(&declared), skipped);
    let err = failed(&predict(lenient, &bad, &["--bad-rows", "fail"]));
    assert!(err.contains(&format!("{}:5: expected 61 fields", bad.display())), "{err}");
}

#[test]
fn dash_reads_stdin_plain_or_gzipped_and_writes_stdout() {
    let dir = tmp("stdio");
    let split = test_split();
    let file = write(&dir, "rows.csv", &split[..301]);
    let run = run_failing().to_str().unwrap();
    let from_file = mdl(&["predict", run, "--data", file.to_str().unwrap(), "--out", "-"]);
    ok(&from_file);
    assert_eq!(stdout_lines(&from_file).len(), 301);
    let text = std::fs::read(&file).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&text).unwrap();
    let gzipped = gz.finish().unwrap();
    for input in [&text, &gzipped] {
        let piped = mdl_with(&["predict", run, "--data", "-", "--out", "-"], Some(input));
        let err = ok(&piped);
        assert_eq!(piped.stdout, from_file.stdout);
        assert!(err.contains("wrote 300 rows of scores to stdout"), "{err}");
    }
    assert!(!common::root().join("-").exists(), "`--out -` wrote a file named -");
    // A file to stdout, stdin to a file.
    let out = dir.join("scores.csv");
    ok(&mdl_with(&["predict", run, "--data", "-", "--out", out.to_str().unwrap()], Some(&gzipped)));
    assert_eq!(std::fs::read(&out).unwrap(), from_file.stdout);
    // Errors in stdin name it.
    let mut broken = split[..4].to_vec();
    broken[3] = broken[3][..broken[3].rfind(',').unwrap()].to_string();
    let err =
        failed(&mdl_with(&["predict", run, "--data", "-", "--out", "-"], Some((broken.join("\n") + "\n").as_bytes())));
    assert!(err.contains("error: stdin:4: expected 61 fields as in the header, found 60"), "{err}");
}

#[test]
fn eval_reads_stdin_plain_or_gzipped_for_dash() {
    let dir = tmp("eval_stdin");
    let split = test_split();
    let file = write(&dir, "rows.csv", &split[..401]);
    let run = run_failing().to_str().unwrap();
    let from_file = mdl(&["eval", run, "--data", file.to_str().unwrap()]);
    ok(&from_file);
    assert!(String::from_utf8_lossy(&from_file.stdout).contains("\"count\": 400"));
    let text = std::fs::read(&file).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&text).unwrap();
    for input in [text, gz.finish().unwrap()] {
        let piped = mdl_with(&["eval", run, "--data", "-"], Some(&input));
        ok(&piped);
        assert_eq!(piped.stdout, from_file.stdout, "the same metrics from stdin as from the file");
    }
    assert!(!common::root().join("-").exists());
    // Errors in stdin name it.
    let mut broken = split[..3].to_vec();
    broken[2] = broken[2][..broken[2].rfind(',').unwrap()].to_string();
    let err = failed(&mdl_with(&["eval", run, "--data", "-"], Some((broken.join("\n") + "\n").as_bytes())));
    assert!(err.contains("error: stdin:3: expected 61 fields as in the header, found 60"), "{err}");
}

#[test]
fn an_unseen_domain_is_an_error_naming_the_row_or_scored_as_the_declared_fallback() {
    let dir = tmp("domain");
    let split = test_split();
    let header = fields(&split[0]);
    let domain = header.iter().position(|h| h == "domain").unwrap();
    let with_domain = |value: &str| -> Vec<String> {
        let mut rows = split[..101].to_vec();
        let mut cells = fields(&rows[3]);
        cells[domain] = value.to_string();
        let cells: Vec<String> =
            cells.into_iter().map(|f| if f.contains(',') { format!("\"{f}\"") } else { f }).collect();
        rows[3] = cells.join(",");
        rows
    };
    let clean = write(&dir, "clean.csv", &split[..101]);
    let unseen = write(&dir, "unseen.csv", &with_domain("99"));
    let other_unseen = write(&dir, "other.csv", &with_domain("98"));
    let strict = run_failing();
    let err = failed(&predict(strict, &unseen, &[]));
    assert!(
        err.contains(&format!(
            "error: {}:4: column 'domain': domain id 99 is outside 0..15, the domains of train (the policy \
             `unknown_domain: ID` scores such rows as domain ID) (value \"99\")",
            unseen.display()
        )),
        "{err}"
    );

    let score = |run: &Path, data: &Path, extra: &[&str]| -> (Vec<String>, String) {
        let out = predict(run, data, extra);
        let err = ok(&out);
        (stdout_lines(&out), err)
    };
    let (reference, _) = score(strict, &clean, &[]);
    let (as_one, err) = score(strict, &unseen, &["--unknown-domain", "1"]);
    assert!(err.contains("scored 1 row with a domain id train never had as domain 1 (unknown_domain: 1)"), "{err}");
    assert_eq!(as_one.len(), 101);
    for (i, (a, b)) in reference.iter().zip(&as_one).enumerate() {
        assert!(i == 3 || a == b, "row {i} changed: {a} vs {b}");
    }
    // Any unseen id is scored the same way (its categorical id is out-of-vocabulary too),
    // and the fallback chosen matters.
    assert_eq!(score(strict, &other_unseen, &["--unknown-domain", "1"]).0, as_one);
    let (as_two, _) = score(strict, &unseen, &["--unknown-domain", "2"]);
    assert_ne!(as_two[3], as_one[3], "the fallback domain is not what the row is scored as");
    assert_eq!(as_two[4..], as_one[4..]);

    // A run that declares `unknown_domain: 1` scores it so without the flag (the same
    // training otherwise); `--unknown-domain error` overrides it, and then the run's
    // `bad_rows: skip` leaves the row's score empty.
    let lenient = run_lenient();
    let config = std::fs::read_to_string(lenient.join("config.yaml")).unwrap();
    assert!(config.contains("unknown_domain: 1"), "{config}");
    assert_eq!(score(lenient, &unseen, &[]).0, as_one);
    let (skipped, err) = score(lenient, &unseen, &["--unknown-domain", "error"]);
    assert_eq!(skipped[3], "\"\"");
    assert!(err.contains("skipped 1 malformed row (bad_rows: skip)"), "{err}");
    let err = failed(&predict(lenient, &unseen, &["--unknown-domain", "error", "--bad-rows", "fail"]));
    assert!(err.contains(&format!("{}:4: column 'domain': domain id 99 is outside 0..15", unseen.display())), "{err}");
    // `mdl eval` follows the same policy.
    let err = failed(&mdl(&["eval", strict.to_str().unwrap(), "--data", unseen.to_str().unwrap()]));
    assert!(err.contains(&format!("{}:4: column 'domain': domain id 99 is outside 0..15", unseen.display())), "{err}");
    ok(&mdl(&["eval", lenient.to_str().unwrap(), "--data", unseen.to_str().unwrap()]));
    // A fallback must be a domain of train.
    let err = failed(&predict(strict, &unseen, &["--unknown-domain", "15"]));
    assert!(err.contains("unknown_domain: 15 is not a domain of train (0..15)"), "{err}");
}

/// Valid and test are encoded with the same policy at training, and the data cache keeps
/// apart what different fallbacks encode.
#[test]
fn the_unknown_domain_policy_encodes_valid_and_test_and_is_part_of_the_cache_key() {
    use mdl::data::{prepare, CacheMode, PrepareOptions, SplitPaths, UnknownDomain};
    let dir = tmp("domain_cache");
    let split = test_split();
    let header = fields(&split[0]);
    let domain = header.iter().position(|h| h == "domain").unwrap();
    let mut valid = split[..51].to_vec();
    let mut cells = fields(&valid[7]);
    cells[domain] = "99".into();
    valid[7] =
        cells.into_iter().map(|f| if f.contains(',') { format!("\"{f}\"") } else { f }).collect::<Vec<_>>().join(",");
    let paths = SplitPaths {
        train: write(&dir, "train.csv", &split[..3001]),
        valid: write(&dir, "valid.csv", &valid),
        test: write(&dir, "test.csv", &split[..51]),
    };
    let exp = mdl::experiment::load(&common::root().join("experiments/quickstart.yaml"), &[]).unwrap();
    let options = |unknown_domain| PrepareOptions {
        cache: CacheMode::Folder(dir.join("cache")),
        unknown_domain,
        ..PrepareOptions::default()
    };
    let err = prepare(&exp.data.schema, &paths, &options(UnknownDomain::Error)).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:8: column 'domain': domain id 99 is outside 0..", paths.valid.display())),
        "{err}"
    );
    for (fallback, hit) in [(1, false), (2, false), (1, true)] {
        let prep = prepare(&exp.data.schema, &paths, &options(UnknownDomain::Fallback(fallback))).unwrap();
        assert_eq!(prep.stats.cache_hit, hit, "fallback {fallback}");
        assert_eq!(prep.valid.domain[6], fallback, "the row of line 8 is scored as the fallback");
        assert_eq!(prep.valid.rows, 50);
    }
}

#[test]
fn a_bad_unknown_domain_value_names_its_key_path() {
    let dir = tmp("domain_key");
    let base = common::root().join("experiments/quickstart.yaml");
    let file = dir.join("exp.yaml");
    std::fs::write(&file, format!("base: {}\ndata:\n  unknown_domain: sometimes\n", base.display())).unwrap();
    let err = mdl::experiment::load(&file, &[]).unwrap_err();
    assert_eq!(
        err,
        format!(
            "{}: data.unknown_domain: invalid value: string \"sometimes\", expected `error` or a domain id \
             (a non-negative integer)",
            file.display()
        )
    );
    let err = mdl::experiment::load(&base, &["data.unknown_domain=-3".into()]).unwrap_err();
    assert!(err.ends_with("with --set data.unknown_domain=-3: data.unknown_domain: invalid value: integer `-3`, expected `error` or a domain id (a non-negative integer)"), "{err}");
}
