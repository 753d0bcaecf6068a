//! Randomness and schedules in the graph, end to end on the bundled kuairand_pure_tail:
//! ids drawn by `sample_ids` from the real vocabulary are never padding or
//! out-of-vocabulary, come from their positive's column and are never the positive (nor,
//! with `not_in`, an id of the row's history); the
//! same seed and step draw the same ids and another seed others; a schedule on `step()`
//! follows the training step and, in evaluation, the state the last step left; through
//! the `mdl` binary, a spec with sampled negatives, shuffled rows, Bernoulli masks,
//! dropout and an annealed weight gives a byte-identical metrics.json twice and across a
//! resume, its checkpoints holding the counters.

mod common;
use common::scoring::{mdl, ok};
use common::scratch::Scratch;
use mdl::data::{prepare, CacheMode, Prepared};
use mdl::experiment::Experiment;
use mdl::train::Session;
use mdl_runtime::backend::interp;
use mdl_runtime::{passes, Mode, Op, Value};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("sampling", name)
}

const SPEC: &str = "model sampled(dim = 4) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let h = E[hist]                                            # [B, 2, 50, dim]
  let uniform = E[sample_ids(hist, 3)]                       # [B, 2, 50, 3, dim]
  let frequent = E[sample_ids(hist, 2, by = \"frequency\", power = 0.75, not_in = hist)]
  let alpha = 0.1 + 4.9 * minimum(step() / 4, 1)            # 0.1 -> 5 over 4 steps
  let x = flatten(E[fields]) * bernoulli(flatten(E[fields]), 0.9)
  let shuffled = shuffle_rows(x)
  task click = linear(dropout(x, p = 0.1), 1) + alpha * linear(dense, 1)
  loss bce(click)
  loss 0.1 * mean(softplus(sum(unsqueeze(h, 3) * uniform, axis = -1)))
  loss 0.1 * mean(softplus(sum(unsqueeze(h, 3) * frequent, axis = -1)))
  loss 0.01 * mean(sum(x * shuffled, axis = 1)) + 0.0 * epoch()
}
";

fn spec_in(dir: &Path) -> PathBuf {
    let spec = dir.join("sampled.mdl");
    std::fs::write(&spec, SPEC).unwrap();
    spec
}

/// The quickstart experiment with the spec, and its data prepared (through the tests'
/// cache).
fn experiment(dir: &Path) -> (Experiment, Prepared) {
    experiment_with(spec_in(dir))
}

/// The quickstart experiment with the spec at `spec`, its data prepared.
fn experiment_with(spec: PathBuf) -> (Experiment, Prepared) {
    let exp = mdl::experiment::load(
        &common::root().join("experiments/quickstart.yaml"),
        &[format!("spec={}", spec.display())],
    )
    .unwrap();
    let mut options = exp.data.prepare_options();
    options.cache = CacheMode::Folder(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdl-cache"));
    let prep = prepare(&exp.data.schema, &exp.split_files().unwrap(), &options).unwrap();
    (exp, prep)
}

#[test]
fn sampled_ids_follow_the_vocabulary_and_the_seed() {
    let dir = tmp("library");
    let (exp, prep) = experiment(&dir);
    let session = Session::new(&exp, &prep.fitted).unwrap();
    let (counts, starts) = prep.fitted.id_counts("fields").unwrap();
    // The forward graph of training, with each draw an output.
    let mut g = passes::for_phase(&session.compiled.graph, true);
    let draws: Vec<_> = g.ids().filter(|&id| matches!(g.node(id).op, Op::SampleIds { .. })).collect();
    assert_eq!(draws.len(), 2);
    for (i, &id) in draws.iter().enumerate() {
        g.outputs.insert(format!("draw{i}"), id);
    }
    let mut batch = prep.train.new_batch();
    prep.train.gather(&(0..256).collect::<Vec<_>>(), &mut batch).unwrap();
    let feeds = session.inputs.feeds(&batch);
    let binding = session.inputs.with_batch(batch.rows);
    let batch_rows = batch.rows;
    let params = session.initial_tensors(1).unwrap();
    let run = |mode: Mode| {
        let out = interp::run(&g, &binding, &feeds, &params, &mode).unwrap();
        (0..draws.len())
            .map(|i| match out.output(&format!("draw{i}")) {
                Some(Value::Ids(t)) => t.data.clone(),
                other => panic!("draw{i}: {other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let a = run(Mode::train(2023, 7));
    let Some(Value::Ids(hist)) = feeds.get("hist") else { panic!("hist is not fed as ids") };
    let column = |id: u32| starts.partition_point(|&s| s <= id) - 1;
    for (draw, n) in a.iter().zip([3, 2]) {
        assert_eq!(draw.len(), hist.data.len() * n);
        for (k, &id) in draw.iter().enumerate() {
            let p = hist.data[k / n];
            assert!(counts[id as usize] > 0.0, "drew id {id} of count 0 (padding or OOV) for {p}");
            assert_eq!(column(id), column(p), "drew id {id} from another column than {p}");
            assert_ne!(id, p, "drew the positive");
        }
    }
    // The second draw (`not_in = hist`) never draws an id of its row's history.
    let per_row = hist.data.len() / batch_rows;
    for (k, &id) in a[1].iter().enumerate() {
        let b = k / (per_row * 2);
        assert!(!hist.data[b * per_row..(b + 1) * per_row].contains(&id), "row {b}: drew {id} of its history");
    }
    assert_eq!(a, run(Mode::train(2023, 7)), "the same seed and step drew other ids");
    let other_seed = run(Mode::train(2024, 7));
    let other_step = run(Mode::train(2023, 8));
    for i in 0..2 {
        assert_ne!(a[i], other_seed[i], "another seed drew the same ids");
        assert_ne!(a[i], other_step[i], "another step drew the same ids");
    }
}

/// Each behaviour's next item: the sequence shifted by one, the row's item (`fields`'
/// video_id, column 2) last, ids of `fields`' space; negatives are drawn for them, never an item
/// of the row's first sequence or the row's video.
const SHIFTED: &str = "model shifted(dim = 4) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let seq = squeeze(slice(hist, 1, 0, 1), 1)                                  # ids [B, 50]
  let next = concat([slice(seq, 1, 1, 49), slice(fields, 1, 2, 1)], axis = 1)  # ids [B, 50]
  let neg = sample_ids(next, 2, not_in = concat([seq, slice(fields, 1, 2, 1)], axis = 1))  # ids [B, 50, 2]
  let h = E[seq]
  task click = linear(flatten(E[fields]), 1)
  loss bce(click) + mean(softplus(sum(unsqueeze(h, 2) * E[neg], axis = -1) - sum(h * E[next], axis = -1, keep = true)))
}
";

#[test]
fn negatives_drawn_for_a_shifted_sequence_are_never_its_next_item_nor_in_its_history() {
    let dir = tmp("shifted");
    let spec = dir.join("shifted.mdl");
    std::fs::write(&spec, SHIFTED).unwrap();
    let (exp, prep) = experiment_with(spec);
    let session = Session::new(&exp, &prep.fitted).unwrap();
    let (counts, starts) = prep.fitted.id_counts("fields").unwrap();
    let mut g = passes::for_phase(&session.compiled.graph, true);
    let draw = g.ids().find(|&id| matches!(g.node(id).op, Op::SampleIds { .. })).unwrap();
    g.outputs.insert("draw".into(), draw);
    let mut batch = prep.train.new_batch();
    prep.train.gather(&(0..256).collect::<Vec<_>>(), &mut batch).unwrap();
    let feeds = session.inputs.feeds(&batch);
    let binding = session.inputs.with_batch(batch.rows);
    let params = session.initial_tensors(1).unwrap();
    let out = interp::run(&g, &binding, &feeds, &params, &Mode::train(2023, 3)).unwrap();
    let Some(Value::Ids(drawn)) = out.output("draw") else { panic!("no draw") };
    let (Some(Value::Ids(hist)), Some(Value::Ids(fields))) = (feeds.get("hist"), feeds.get("fields")) else {
        panic!("hist and fields are not fed as ids")
    };
    let (columns, sequences) = (fields.shape[1], hist.shape[1]);
    assert_eq!(drawn.shape, [batch.rows, 50, 2]);
    let column = |id: u32| starts.partition_point(|&s| s <= id) - 1;
    let mut padding_positives = 0;
    for b in 0..batch.rows {
        for t in 0..50 {
            // The next item of position t: the first sequence's t + 1, the row's video last.
            let next = if t < 49 { hist.data[(b * sequences) * 50 + t + 1] } else { fields.data[b * columns + 2] };
            padding_positives += usize::from(counts[next as usize] == 0.0);
            for k in 0..2 {
                let id = drawn.data[(b * 50 + t) * 2 + k];
                assert_ne!(id, next, "row {b}, position {t}: drew the next item");
                let history = &hist.data[b * sequences * 50..b * sequences * 50 + 50];
                assert!(!history.contains(&id), "row {b}, position {t}: drew {id} of the row's history");
                assert_ne!(id, fields.data[b * columns + 2], "row {b}, position {t}: drew the row's item");
                assert_eq!(column(id), column(next), "row {b}, position {t}: drew from another column");
                assert!(counts[id as usize] > 0.0, "row {b}, position {t}: drew id {id} of count 0");
            }
        }
    }
    assert!(padding_positives < batch.rows * 50, "every next item is padding: the test sees no sequence");
}

#[test]
fn a_schedule_on_step_follows_training_and_evaluates_at_the_last_step() {
    let dir = tmp("schedule");
    let (exp, prep) = experiment(&dir);
    let session = Session::new(&exp, &prep.fitted).unwrap();
    // alpha is the weight of linear(dense, 1): the logits' difference between dense and
    // zero dense, scaled by alpha, tells alpha's value. Here: the graph's `alpha` node,
    // found as the output of `0.1 + 4.9 * ...` (the only Add of a scalar 0.1).
    let mut batch = prep.train.new_batch();
    prep.train.gather(&(0..64).collect::<Vec<_>>(), &mut batch).unwrap();
    let feeds = session.inputs.feeds(&batch);
    let binding = session.inputs.with_batch(batch.rows);
    let mut params = session.initial_tensors(1).unwrap();
    let alpha_of = |g: &mdl_runtime::Graph| {
        g.ids()
            .find(|&id| {
                let n = g.node(id);
                n.op == Op::Binary(mdl_runtime::BinaryOp::Add)
                    && n.inputs.iter().any(|&i| g.node(i).op == Op::Scalar(0.1))
            })
            .expect("the schedule's node")
    };
    let mut train = passes::for_phase(&session.compiled.graph, true);
    let a = alpha_of(&train);
    train.outputs.insert("alpha".into(), a);
    let at = |step: u64| {
        let out = interp::run(&train, &binding, &feeds, &params, &Mode::train(1, step)).unwrap();
        out.scalar("alpha").unwrap()
    };
    assert!((at(0) - 0.1).abs() < 1e-6);
    assert!((at(2) - 2.55).abs() < 1e-6);
    assert!((at(40) - 5.0).abs() < 1e-6);
    // In evaluation, the value of the state the last training step left.
    let mut eval = passes::for_phase(&session.compiled.graph, false);
    let a = alpha_of(&eval);
    eval.outputs.insert("alpha".into(), a);
    let eval_alpha = |params: &std::collections::HashMap<String, mdl_runtime::Tensor<f32>>| {
        interp::run(&eval, &binding, &feeds, params, &Mode::eval()).unwrap().scalar("alpha").unwrap()
    };
    assert!((eval_alpha(&params) - 0.1).abs() < 1e-6, "before any training");
    params.get_mut("step()").unwrap().data[0] = 1.0;
    assert!((eval_alpha(&params) - 1.325).abs() < 1e-6);
}

/// Trains the spec for 6 steps of 512 rows into `name`, evaluating every 2 steps. Returns the
/// folder (removed when dropped on a passing test) and the run folder in it.
fn short_run(name: &str, extra: &[&str]) -> (Scratch, PathBuf) {
    let dir = tmp(name);
    let spec = spec_in(&dir);
    let out = dir.join("run");
    let spec_set = format!("spec={}", spec.display());
    let mut args = vec!["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap(), "--set", &spec_set];
    for set in ["train.batch_size=512", "train.max_steps=6", "train.eval_every=2", "train.early_stopping.patience=10"] {
        args.extend(["--set", set]);
    }
    args.extend_from_slice(extra);
    ok(&mdl(&args));
    (dir, out)
}

#[test]
fn the_same_seed_gives_identical_metrics_twice_and_across_a_resume() {
    let (_a_dir, a) = short_run("a", &[]);
    let (_b_dir, b) = short_run("b", &[]);
    let metrics = std::fs::read(a.join("metrics.json")).unwrap();
    assert_eq!(metrics, std::fs::read(b.join("metrics.json")).unwrap(), "same seed, different metrics.json");
    let (_other_dir, other) = short_run("other_seed", &["--set", "train.seed=7"]);
    assert_ne!(metrics, std::fs::read(other.join("metrics.json")).unwrap(), "another seed, the same metrics.json");
    // Stopped after 3 steps (its last checkpoint at step 2), then resumed.
    let (_c_dir, c) = short_run("resumed", &["--stop-after", "3"]);
    assert!(!c.join("metrics.json").exists());
    ok(&mdl(&["run", "--resume", c.to_str().unwrap()]));
    assert_eq!(
        metrics,
        std::fs::read(c.join("metrics.json")).unwrap(),
        "the resumed run differs from the straight one"
    );
    // The checkpoints hold the counters of their last training step: step 6 is index 5.
    let last: std::collections::HashMap<String, mdl_runtime::Tensor<f32>> =
        mdl_runtime::checkpoint::load(&a.join("last.ckpt")).unwrap().0.into_iter().collect();
    assert_eq!(last["step()"].data, vec![5.0]);
    assert_eq!(last["epoch()"].data, vec![0.0]);
    let resumed: std::collections::HashMap<String, mdl_runtime::Tensor<f32>> =
        mdl_runtime::checkpoint::load(&c.join("last.ckpt")).unwrap().0.into_iter().collect();
    assert_eq!(resumed, last, "the resumed run's last checkpoint differs");
}

/// `frequency_bin(hist, 4)` on the real vocabulary: each history id gets the bin of its
/// train count (equal train mass per bin within its column, the most frequent first; 0 for
/// padding), as `mdl::train::bind::frequency_bins` computes it from the fitted counts, the
/// same in training (another seed and step) and in evaluation; the bins of the batch's ids
/// hold the most frequent id in bin 1 and every padding id in bin 0.
#[test]
fn frequency_bins_follow_the_train_counts() {
    let dir = tmp("frequency_bins");
    let spec = dir.join("bins.mdl");
    let text = SPEC.replace(
        "  loss bce(click)\n",
        "  let binned = embedding(frequency_bin(hist, 4), 1)\n  loss bce(click) + 0.001 * mean(binned[frequency_bin(hist, 4)])\n",
    );
    std::fs::write(&spec, text).unwrap();
    let (exp, prep) = experiment_with(spec);
    let session = Session::new(&exp, &prep.fitted).unwrap();
    let (counts, starts) = prep.fitted.id_counts("fields").unwrap();
    let expected = mdl::train::bind::frequency_bins(&counts, &starts, 4);
    let mut batch = prep.train.new_batch();
    prep.train.gather(&(0..256).collect::<Vec<_>>(), &mut batch).unwrap();
    let feeds = session.inputs.feeds(&batch);
    let binding = session.inputs.with_batch(batch.rows);
    let params = session.initial_tensors(1).unwrap();
    let Some(Value::Ids(hist)) = feeds.get("hist") else { panic!("hist is not fed as ids") };
    for (training, mode) in [(false, Mode::eval()), (true, Mode::train(9, 5))] {
        let mut g = passes::for_phase(&session.compiled.graph, training);
        let bins = g
            .ids()
            .find(|&id| matches!(&g.node(id).op, Op::Bucketize { boundaries } if boundaries == &[1.0, 2.0, 3.0, 4.0]))
            .expect("the bins' node");
        g.outputs.insert("bins".into(), bins);
        let out = interp::run(&g, &binding, &feeds, &params, &mode).unwrap();
        let Some(Value::Ids(got)) = out.output("bins") else { panic!("the bins are not ids") };
        assert_eq!(got.shape, hist.shape);
        for (&id, &bin) in hist.data.iter().zip(&got.data) {
            let count = counts[id as usize];
            assert_eq!(bin as f32, expected[id as usize], "training {training}: id {id} (count {count})");
            assert_eq!(bin == 0, count == 0.0, "training {training}: id {id}: bin {bin}, count {count}");
        }
        assert!(got.data.contains(&4), "no id of the batch in the rarest bin");
        assert!(got.data.contains(&0), "the batch has no padding");
    }
    let top = hist.data.iter().copied().max_by(|&a, &b| counts[a as usize].total_cmp(&counts[b as usize])).unwrap();
    assert_eq!(expected[top as usize], 1.0, "the batch's most frequent id {top} is not in bin 1");
}
