//! Experiment cases: the fixture's two-file experiment (`fuzz.yaml` on `base.yaml`) mutated
//! at the key/value level (a key deleted, renamed or nested, a value replaced by another
//! type, an extreme or a deep nesting, two values swapped), sometimes byte-corrupted as
//! text, with random `--set` overrides (malformed ones too), through what `mdl run` does:
//! load, then train on the interp backend for at most 3 steps. Any result but a panic, an
//! abort or a hang is fine.

use super::{allow, corrupt_bytes, describe, Described, Draw, Fixture, Verdict};
use crate::backends::Backend;
use crate::train::RunOptions;
use mdl_runtime::rng::SplitMix64;
use serde_yaml::{Mapping, Value};
use std::path::Path;
use std::time::Duration;

/// Values a mutation writes (YAML text).
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "0.5",
    "1e-3",
    ".nan",
    ".inf",
    "-.inf",
    "\"\"",
    "x",
    "[]",
    "{}",
    "null",
    "~",
    "true",
    "[1, 2]",
    "{a: 1}",
    "auc",
    "gauc",
    "logloss",
    "epoch",
    "sgd",
    "adagrad",
    "skip",
    "fail",
    "interp",
    "jit",
    "[{epochs: 1}]",
    "[{epochs: 1, freeze: [nope]}]",
    "-0",
    "\"../x\"",
    "minmax",
    "standard",
    "categorical",
    "sequence",
    "numeric",
    "[label]",
    "{ name: click, column: label }",
    "[hist_click_seq]",
    "video_id",
    "domain",
    "3",
];

/// Values of the findings still being fixed: sizes that overflow or exhaust memory.
const KNOWN_VALUES: &[&str] =
    &["9223372036854775807", "18446744073709551615", "1000000000", "1e308", "65536", "[65536]", "4294967296", "1e300"];

/// Keys `--set` overrides.
const SET_KEYS: &[&str] = &[
    "train.lr",
    "train.clip_norm",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.seed",
    "train.eval_every",
    "train.optimizer",
    "train.l2",
    "train.embedding_lr",
    "train.embedding_l2",
    "train.stages",
    "train.early_stopping.metric",
    "train.early_stopping.patience",
    "hyper.dim",
    "hyper.hidden",
    "hyper.dropout",
    "data.bad_rows",
    "data.schema.user",
    "data.schema.features",
    "data.schema.labels",
    "data.schema.domain",
    "backend",
    "name",
    "model",
    "spec",
    "nope.x",
    "",
    "train..lr",
    "base",
];

/// A step of a path into a YAML value.
#[derive(Clone, Debug)]
enum Step {
    Key(Value),
    Index(usize),
}

/// Every path to a node below the root.
fn paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                prefix.push(Step::Key(k.clone()));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter().enumerate() {
                prefix.push(Step::Index(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn show(path: &[Step]) -> String {
    path.iter()
        .map(|s| match s {
            Step::Key(k) => serde_yaml::to_string(k).unwrap_or_default().trim().to_string(),
            Step::Index(i) => format!("[{i}]"),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Step::Key(k) => cur.as_mapping_mut()?.get_mut(k)?,
            Step::Index(i) => cur.as_sequence_mut()?.get_mut(*i)?,
        };
    }
    Some(cur)
}

fn parse(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or(Value::Null)
}

/// Numbers a mutation writes in place of a number.
const NUMBERS: &[&str] = &["0", "1", "-1", "2", "3", "0.5", "1e-9", "-0.5", "100", ".nan", ".inf"];

fn value(rng: &mut SplitMix64, known: bool) -> (Value, String) {
    let text = if known && rng.chance(0.2) { rng.pick(KNOWN_VALUES) } else { rng.pick(VALUES) };
    (parse(text), text.to_string())
}

/// A value of the same type as `old` most of the time (so that more cases get past the
/// types to the settings' meaning), else any value.
fn neighbour(rng: &mut SplitMix64, old: &Value, known: bool) -> (Value, String) {
    if rng.chance(0.3) {
        return value(rng, known);
    }
    let text = match old {
        Value::Number(_) if known && rng.chance(0.3) => rng.pick(KNOWN_VALUES).to_string(),
        Value::Number(_) => rng.pick(NUMBERS).to_string(),
        Value::Bool(b) => (!b).to_string(),
        Value::String(s) => match rng.below(3) {
            0 => String::from("\"\""),
            1 => format!("{s}x"),
            _ => rng
                .pick(&[
                    "auc", "gauc", "logloss", "epoch", "sgd", "adam", "skip", "interp", "standard", "video_id", "label",
                ])
                .to_string(),
        },
        Value::Sequence(items) if !items.is_empty() && rng.chance(0.5) => {
            let mut items = items.clone();
            let i = rng.upto(items.len());
            let what = if rng.chance(0.5) {
                items.remove(i);
                "an item removed"
            } else {
                items.push(items[i].clone());
                "an item repeated"
            };
            return (Value::Sequence(items), what.into());
        }
        Value::Sequence(_) => "[]".into(),
        Value::Mapping(_) => "{}".into(),
        _ => rng.pick(NUMBERS).to_string(),
    };
    (parse(&text), text)
}

/// One key/value-level mutation of `doc`; returns what it did.
fn mutate(rng: &mut SplitMix64, doc: &mut Value, known: bool) -> String {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all);
    if all.is_empty() {
        return "nothing to mutate".into();
    }
    let path = rng.pick(&all).clone();
    let (last, parent) = path.split_last().expect("a path below the root");
    let where_ = show(&path);
    match rng.below(12) {
        0 | 1 => {
            if let Some(p) = node_mut(doc, parent) {
                match (p, last) {
                    (Value::Mapping(m), Step::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Sequence(s), Step::Index(i)) if *i < s.len() => {
                        s.remove(*i);
                    }
                    _ => {}
                }
            }
            format!("deleted {where_}")
        }
        6..=11 => {
            let Some(n) = node_mut(doc, &path) else {
                return format!("kept {where_}");
            };
            let (new, text) = neighbour(rng, n, known);
            *n = new;
            format!("{where_} = {text}")
        }
        2 => {
            // A misspelt or mis-cased key.
            if let (Some(Value::Mapping(m)), Step::Key(k)) = (node_mut(doc, parent), last) {
                if let Some(v) = m.remove(k) {
                    let name = k.as_str().unwrap_or("k");
                    let renamed = if rng.chance(0.5) { format!("{name}s") } else { name.to_uppercase() };
                    m.insert(Value::String(renamed.clone()), v);
                    return format!("renamed {where_} to {renamed}");
                }
            }
            format!("kept {where_}")
        }
        3 => {
            let depth = 1 + rng.upto(if known { 2000 } else { 64 });
            if let Some(n) = node_mut(doc, &path) {
                let mut nested = std::mem::take(n);
                for _ in 0..depth {
                    nested = if rng.chance(0.5) {
                        Value::Sequence(vec![nested])
                    } else {
                        let mut m = Mapping::new();
                        m.insert(Value::String("k".into()), nested);
                        Value::Mapping(m)
                    };
                }
                *n = nested;
            }
            format!("{where_} nested {depth} deep")
        }
        4 => {
            let other = rng.pick(&all).clone();
            let a = node_mut(doc, &path).map(|n| n.clone());
            let b = node_mut(doc, &other).map(|n| n.clone());
            if let (Some(a), Some(b)) = (a, b) {
                if let Some(n) = node_mut(doc, &path) {
                    *n = b;
                }
                if let Some(n) = node_mut(doc, &other) {
                    *n = a;
                }
            }
            format!("swapped {where_} and {}", show(&other))
        }
        _ => {
            // A value copied into a sibling key it does not belong to.
            let (new, text) = value(rng, known);
            if let Some(Value::Mapping(m)) = node_mut(doc, parent) {
                let key = *rng.pick(&["train", "data", "hyper", "schema", "epochs", "lr", "columns", "max_len", "x"]);
                m.insert(Value::String(key.into()), new);
                return format!("{} added {key}: {text}", show(parent));
            }
            format!("kept {where_}")
        }
    }
}

/// `--set` overrides, malformed ones included.
fn overrides(rng: &mut SplitMix64, known: bool) -> Vec<String> {
    let count = if rng.chance(0.6) { 0 } else { 1 + rng.upto(2) };
    (0..count)
        .map(|_| {
            let key = rng.pick(SET_KEYS);
            let text = if known && rng.chance(0.2) {
                rng.pick(KNOWN_VALUES)
            } else if rng.chance(0.6) {
                rng.pick(NUMBERS)
            } else {
                rng.pick(VALUES)
            };
            match rng.below(20) {
                0 => key.to_string(),
                1 => format!("{key}={text}: ["),
                _ => format!("{key}={text}"),
            }
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).is_ok()
}

/// `--set` overrides that repeat a value the fixture's experiment already has.
const SAME_SETS: &[&str] = &[
    "train.lr=0.01",
    "train.batch_size=16",
    "hyper.dim=4",
    "hyper.hidden=[8]",
    "train.seed=7",
    "backend=interp",
    "train.early_stopping.metric=auc",
    "train.optimizer=adam",
    "data.bad_rows=fail",
    "train.clip_norm=10.0",
];

/// Shuffles the keys of every mapping in `v`.
fn shuffle_keys(rng: &mut SplitMix64, v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(Value, Value)> = std::mem::take(m).into_iter().collect();
            rng.shuffle(&mut entries);
            for (k, mut child) in entries {
                shuffle_keys(rng, &mut child);
                m.insert(k, child);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|c| shuffle_keys(rng, c)),
        _ => {}
    }
}

/// A rewrite that keeps the experiment's meaning (keys reordered, JSON instead of YAML, a
/// comment, `--set` of a value it already has): it must load as the clean experiment.
fn rewrite(fx: &Fixture, rng: &mut SplitMix64, dir: &Path, input: &Described) -> Verdict {
    let mut files = [("fuzz.yaml", fx.experiment_text.clone()), ("base.yaml", fx.base_text.clone())];
    let which = rng.upto(2);
    let mut doc = parse(&files[which].1);
    let mut did = Vec::new();
    if rng.chance(0.5) {
        shuffle_keys(rng, &mut doc);
        did.push("keys reordered");
    }
    files[which].1 = if rng.chance(0.3) {
        did.push("written as JSON");
        serde_json::to_string(&doc).unwrap_or_default()
    } else {
        serde_yaml::to_string(&doc).unwrap_or_default()
    };
    if rng.chance(0.3) {
        files[which].1.push_str("\n# a comment\n");
        did.push("a comment");
    }
    let set: Vec<String> = (0..rng.upto(3)).map(|_| rng.pick(SAME_SETS).to_string()).collect();
    describe(input, format!("{} rewritten: {}; --set {}", files[which].0, did.join(", "), set.join(" --set ")));
    for (name, text) in &files {
        if !write(&dir.join(name), text.as_bytes()) {
            return Verdict::Rejected;
        }
    }
    match crate::experiment::load(&dir.join("fuzz.yaml"), &set) {
        Ok(exp) if exp == fx.clean_experiment => Verdict::Accepted,
        Ok(exp) => {
            Verdict::Silent(format!("a rewrite that keeps the meaning loaded as a different experiment: {exp:?}"))
        }
        // A valid experiment refused is a wrong result too.
        Err(e) => Verdict::Silent(format!("a rewrite that keeps the meaning was refused: {e}")),
    }
}

pub(super) fn case(fx: &Fixture, rng: &mut SplitMix64, known: bool, dir: &Path, input: &Described) -> Verdict {
    if rng.chance(0.15) {
        return rewrite(fx, rng, dir, input);
    }
    let mut files = [("fuzz.yaml", fx.experiment_text.clone()), ("base.yaml", fx.base_text.clone())];
    let which = rng.upto(2);
    let mut doc = parse(&files[which].1);
    let mutations = *rng.pick(&[1, 1, 1, 1, 1, 1, 1, 2, 2, 3]);
    let mut did: Vec<String> = (0..mutations).map(|_| mutate(rng, &mut doc, known)).collect();
    let mut bytes = serde_yaml::to_string(&doc).unwrap_or_default().into_bytes();
    if rng.chance(0.05) {
        did.push(corrupt_bytes(rng, &mut bytes));
    }
    files[which].1 = String::from_utf8_lossy(&bytes).into_owned();
    let set = overrides(rng, known);
    if !set.is_empty() {
        did.push(format!("--set {}", set.join(" --set ")));
    }
    describe(input, format!("{}: {}", files[which].0, did.join("; ")));
    for (name, text) in &files {
        if !write(&dir.join(name), text.as_bytes()) {
            return Verdict::Rejected;
        }
    }
    let mut exp = match crate::experiment::load(&dir.join("fuzz.yaml"), &set) {
        Ok(e) => e,
        Err(_) => return Verdict::Rejected,
    };
    // A few steps on the reference backend, whatever the file asks: the settings are under
    // test, not the patience of the suite.
    exp.backend = Backend::Interp;
    exp.train.max_steps = Some(exp.train.max_steps.unwrap_or(3).min(3));
    allow(input, declared_work(fx, &exp));
    let out = dir.join("run");
    match crate::train::train(
        &exp,
        &RunOptions { out: Some(out.clone()), resume: false, force: false, stop_after: None },
    ) {
        Ok(_) => match std::fs::read_to_string(out.join("metrics.json")) {
            Ok(text) if serde_json::from_str::<serde_json::Value>(&text).is_ok() => Verdict::Accepted,
            Ok(_) => Verdict::Silent("metrics.json is not JSON".into()),
            Err(_) => Verdict::Silent("the run succeeded without writing metrics.json".into()),
        },
        Err(_) => Verdict::Rejected,
    }
}

/// Microseconds of CPU time a mutated experiment's run is allowed per parameter and step
/// beyond the per-case budget (the budget is CPU time: see `super::wait_for`). A step on
/// interp touches each parameter, its gradient and Adam's two moments, and writes (and
/// fsyncs) a checkpoint of 12 bytes per parameter. The 21,954,800-parameter model of
/// `hyper.dim: 65536` took, for its 3 steps, 33.5 s alone on the 2-core machine and 82 s
/// at a load average of 15, of which 23.5 s on the CPU (0.36 µs per parameter and step):
/// 2 µs is five times that, and only a stuck case outlasts it.
const MICROS_PER_PARAMETER_STEP: u128 = 2;

/// The most a case's declared work adds to the budget, so that a stuck run of a model too
/// large to train (the memory check refuses it, in far less time) is still caught.
const MOST_ALLOWED: Duration = Duration::from_secs(300);

/// The time the work `exp` asks for may take beyond the budget: its model's parameters
/// (bound to the fixture's clean data, as the run will bind them) times its steps, at most
/// [`MOST_ALLOWED`]. Nothing where the spec does not compile or bind: the run then fails
/// quickly on its own.
fn declared_work(fx: &Fixture, exp: &crate::experiment::Experiment) -> Duration {
    let Ok(compiled) = crate::train::compile_spec(exp) else { return Duration::ZERO };
    let Ok(session) = crate::train::Session::with_compiled(compiled, &fx.clean_prepared.fitted) else {
        return Duration::ZERO;
    };
    let sizes = session.inputs.with_batch(exp.train.batch_size);
    let bytes = crate::train::memory::Estimate::of(&session.compiled.graph, &sizes, 1, 0).parameters;
    let steps = exp.train.max_steps.unwrap_or(3) as u128;
    let micros = (bytes / 4).saturating_mul(steps).saturating_mul(MICROS_PER_PARAMETER_STEP);
    Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX)).min(MOST_ALLOWED)
}
