//! The random ops (`ops/random.rs`) and the loop counters on interp, the reference: each
//! draw is fixed by (seed, step, stream) and changes with any of them; evaluation is
//! deterministic (a Bernoulli mask is its expectation); a Bernoulli mask and a dropout
//! mask of the same stream draw the same elements; a permutation is one; sampled ids come
//! from the positive's column, never an id of weight 0 (padding, out-of-vocabulary) and,
//! when excluded, never the positive, in proportion to their weights; the counters read
//! the run's step and epoch.

mod common;
use common::{dims, Case};
use mdl_runtime::backend::interp;
use mdl_runtime::ops::Counter;
use mdl_runtime::{Dim, Mode, Op, Value};

fn ids_of(v: &mdl_runtime::Values<f64>, name: &str) -> Vec<u32> {
    match v.output(name) {
        Some(Value::Ids(t)) => t.data.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn bernoulli_masks_are_keyed_and_their_expectation_in_evaluation() {
    let mut c = Case::new(0);
    let x = c.input_values("x", dims(&[100, 100]), vec![0.0; 10_000]);
    let b = c.add(Op::Bernoulli { p: 0.3, stream: 4 }, &[x]).unwrap();
    let other = c.add(Op::Bernoulli { p: 0.3, stream: 5 }, &[x]).unwrap();
    let drop = c.add(Op::DropMask { p: 0.3, stream: 4 }, &[x]).unwrap();
    for (name, id) in [("b", b), ("other", other), ("drop", drop)] {
        c.graph.outputs.insert(name.into(), id);
    }
    let run = |mode: Mode| interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &mode).unwrap();
    assert!(run(Mode::eval()).dense("b").unwrap().data.iter().all(|&v| v == 0.3));
    let a = run(Mode::train(42, 7));
    let m = &a.dense("b").unwrap().data;
    assert_eq!(m, &run(Mode::train(42, 7)).dense("b").unwrap().data);
    assert_ne!(m, &run(Mode::train(42, 8)).dense("b").unwrap().data);
    assert_ne!(m, &run(Mode::train(43, 7)).dense("b").unwrap().data);
    assert_ne!(m, &a.dense("other").unwrap().data);
    assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
    let ones = m.iter().filter(|&&v| v == 1.0).count() as f64 / m.len() as f64;
    assert!((ones - 0.3).abs() < 0.03, "fraction of ones {ones}");
    // Dropout drops exactly the elements the Bernoulli mask of its stream and rate sets.
    let dropped: Vec<bool> = a.dense("drop").unwrap().data.iter().map(|&v| v == 0.0).collect();
    assert_eq!(dropped, m.iter().map(|&v| v == 1.0).collect::<Vec<_>>());
}

#[test]
fn permutations_are_keyed_permutations() {
    let mut c = Case::new(0);
    c.bind("B", 200);
    let p = c.add(Op::Permutation { n: Dim::batch(), stream: 1 }, &[]).unwrap();
    c.graph.outputs.insert("p".into(), p);
    let run = |mode: Mode| ids_of(&interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &mode).unwrap(), "p");
    let a = run(Mode::train(1, 3));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<u32>>());
    assert_ne!(a, sorted);
    assert_eq!(a, run(Mode::train(1, 3)));
    assert_ne!(a, run(Mode::train(1, 4)));
    assert_ne!(a, run(Mode::train(2, 3)));
    assert_eq!(run(Mode::eval()), run(Mode::eval()));
}

/// A vocabulary of two columns: ids 0..6 (padding 0 and out-of-vocabulary 1 of weight 0,
/// then weights 5, 1, 0, 2) and 6..10 (padding, OOV, weights 3 and 1).
const WEIGHTS: [f64; 10] = [0.0, 0.0, 5.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 1.0];
const STARTS: [u32; 3] = [0, 6, 10];

fn sampler(positives: Vec<u32>, n: usize, power: f64, exclude: bool) -> Case {
    let mut c = Case::new(0);
    let k = positives.len();
    let pos = c.ids_values("pos", dims(&[k]), positives);
    let w = c.input_values("w", dims(&[10]), WEIGHTS.to_vec());
    let s = c.ids_values("s", dims(&[3]), STARTS.to_vec());
    let y = c.add(Op::SampleIds { n: Dim::from(n), power, exclude, seen: false, stream: 9 }, &[pos, w, s]).unwrap();
    c.graph.outputs.insert("y".into(), y);
    c
}

fn draw(c: &Case, mode: Mode) -> Vec<u32> {
    ids_of(&interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &mode).unwrap(), "y")
}

#[test]
fn sampled_ids_come_from_the_positives_column_in_proportion_never_weight_zero_nor_the_positive() {
    let n = 20_000;
    // Positives: a real id of each column, padding of the first, OOV of the second.
    let c = sampler(vec![2, 8, 0, 7], n, 1.0, true);
    let ids = draw(&c, Mode::train(5, 0));
    assert_eq!(ids.len(), 4 * n);
    let count =
        |row: usize, id: u32| ids[row * n..(row + 1) * n].iter().filter(|&&i| i == id).count() as f64 / n as f64;
    // Row 0 (positive 2, excluded): ids 3 and 5 in proportion 1 : 2.
    assert!(ids[..n].iter().all(|&i| i == 3 || i == 5), "{:?}", &ids[..20]);
    assert!((count(0, 5) - 2.0 / 3.0).abs() < 0.02);
    // Row 1 (positive 8, excluded): only id 9 is left.
    assert!(ids[n..2 * n].iter().all(|&i| i == 9));
    // Row 2 (padding of column 0): ids 2, 3, 5 in proportion 5 : 1 : 2.
    assert!(ids[2 * n..3 * n].iter().all(|&i| [2, 3, 5].contains(&i)));
    assert!((count(2, 2) - 5.0 / 8.0).abs() < 0.02 && (count(2, 3) - 1.0 / 8.0).abs() < 0.02);
    // Row 3 (OOV of column 1): ids 8 and 9, 3 : 1.
    assert!(ids[3 * n..].iter().all(|&i| i == 8 || i == 9));
    assert!((count(3, 8) - 0.75).abs() < 0.02);

    // Uniform (power 0) over the ids of positive weight, the positive kept.
    let c = sampler(vec![2], n, 0.0, false);
    let ids = draw(&c, Mode::train(5, 0));
    for id in [2, 3, 5] {
        let f = ids.iter().filter(|&&i| i == id).count() as f64 / n as f64;
        assert!((f - 1.0 / 3.0).abs() < 0.02, "id {id}: {f}");
    }
    assert!(ids.iter().all(|&i| [2, 3, 5].contains(&i)));
}

#[test]
fn sampled_ids_are_keyed_by_seed_step_and_stream_and_fixed_in_evaluation() {
    let c = sampler(vec![2, 3, 5, 8], 50, 1.0, true);
    let a = draw(&c, Mode::train(5, 0));
    assert_eq!(a, draw(&c, Mode::train(5, 0)));
    assert_ne!(a, draw(&c, Mode::train(6, 0)));
    assert_ne!(a, draw(&c, Mode::train(5, 1)));
    assert_eq!(draw(&c, Mode::eval()), draw(&c, Mode::eval()));
}

#[test]
fn a_column_with_nothing_to_draw_and_a_bad_vocabulary_are_errors() {
    // Positive 9 excluded from column 1, whose only other id of weight > 0 is 8: fine; a
    // column whose only id of weight > 0 is the excluded positive has nothing to draw.
    let mut c = sampler(vec![9], 3, 1.0, true);
    assert!(draw(&c, Mode::train(1, 1)).iter().all(|&i| i == 8));
    let mut w = WEIGHTS.to_vec();
    w[8] = 0.0;
    c.feeds.insert("w".into(), Value::Dense(mdl_runtime::Tensor::new(vec![10], w).unwrap()));
    let err = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &Mode::train(1, 1)).unwrap_err().to_string();
    assert!(err.contains("no id to draw for id 9: its column (ids 6..10) has no other id of positive weight"), "{err}");
    c.feeds.insert("s".into(), Value::Ids(mdl_runtime::Ids::new(vec![3], vec![0, 6, 9]).unwrap()));
    let err = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &Mode::train(1, 1)).unwrap_err().to_string();
    assert!(err.contains("the column starts [0, 6, 9] must rise from 0 to the vocabulary's size 10"), "{err}");
}

/// A sampler whose rows (`pos` `[2, 2]`) never draw the ids of the same row of `seen`
/// (`[2, 3]`).
fn sampler_not_in(positives: Vec<u32>, seen: Vec<u32>, n: usize, exclude: bool) -> Case {
    let mut c = Case::new(0);
    let pos = c.ids_values("pos", dims(&[2, 2]), positives);
    let w = c.input_values("w", dims(&[10]), WEIGHTS.to_vec());
    let s = c.ids_values("s", dims(&[3]), STARTS.to_vec());
    let seen = c.ids_values("seen", dims(&[2, 3]), seen);
    let op = Op::SampleIds { n: Dim::from(n), power: 1.0, exclude, seen: true, stream: 9 };
    let y = c.add(op, &[pos, w, s, seen]).unwrap();
    c.graph.outputs.insert("y".into(), y);
    c
}

#[test]
fn sampled_ids_are_never_in_the_rows_seen_ids_and_keep_the_rest_in_proportion() {
    let n = 20_000;
    // Row 0 saw 3 (and padding): positive 2 draws only 5, positive 9 only 8. Row 1 saw 5
    // and 9: positive 3 draws only 2, positive 7 (OOV of column 1) only 8.
    let seen = vec![3, 0, 0, 5, 9, 0];
    let c = sampler_not_in(vec![2, 9, 3, 7], seen.clone(), n, true);
    let ids = draw(&c, Mode::train(5, 0));
    for (k, only) in [5, 8, 2, 8].into_iter().enumerate() {
        assert!(ids[k * n..(k + 1) * n].iter().all(|&i| i == only), "positive {k}: {:?}", &ids[k * n..k * n + 10]);
    }
    // Without `exclude`, the positive may be drawn, the seen ids still not: row 0's
    // positive 2 draws 2 and 5 in proportion 5 : 2, row 1's positive 3 draws 2 and 3 as 5 : 1.
    let c = sampler_not_in(vec![2, 9, 3, 7], seen, n, false);
    let ids = draw(&c, Mode::train(5, 0));
    let share = |k: usize, id: u32| ids[k * n..(k + 1) * n].iter().filter(|&&i| i == id).count() as f64 / n as f64;
    assert!(ids[..n].iter().all(|&i| i == 2 || i == 5));
    assert!((share(0, 2) - 5.0 / 7.0).abs() < 0.02, "{}", share(0, 2));
    assert!(ids[2 * n..3 * n].iter().all(|&i| i == 2 || i == 3));
    assert!((share(2, 3) - 1.0 / 6.0).abs() < 0.02, "{}", share(2, 3));
    // The same seed and step draw the same ids, another seed others.
    let c = sampler_not_in(vec![0, 7, 0, 7], vec![3, 0, 0, 9, 0, 0], 40, true);
    let a = draw(&c, Mode::train(5, 0));
    assert_eq!(a, draw(&c, Mode::train(5, 0)));
    assert_ne!(a, draw(&c, Mode::train(6, 0)));
    // A row whose seen ids leave its column nothing of positive weight draws as without
    // them: row 0 saw 8 and 9, all of column 1, so positive 8 draws 8 and 9 (3 : 1).
    let c = sampler_not_in(vec![2, 8, 2, 8], vec![8, 9, 0, 0, 0, 0], n, false);
    let ids = draw(&c, Mode::train(1, 1));
    assert!(ids[n..2 * n].iter().all(|&i| i == 8 || i == 9));
    let eights = ids[n..2 * n].iter().filter(|&&i| i == 8).count() as f64 / n as f64;
    assert!((eights - 0.75).abs() < 0.02, "{eights}");
    // With `exclude` too, the positive stays excluded: only 9.
    let c = sampler_not_in(vec![2, 8, 2, 8], vec![8, 9, 0, 0, 0, 0], 50, true);
    assert!(draw(&c, Mode::train(1, 1))[50..100].iter().all(|&i| i == 9));
}

#[test]
fn counters_read_the_runs_step_epoch_and_stage() {
    let mut c = Case::new(0);
    let s = c.add(Op::Counter(Counter::Step), &[]).unwrap();
    let e = c.add(Op::Counter(Counter::Epoch), &[]).unwrap();
    let g = c.add(Op::Counter(Counter::Stage), &[]).unwrap();
    c.graph.outputs.insert("s".into(), s);
    c.graph.outputs.insert("e".into(), e);
    c.graph.outputs.insert("g".into(), g);
    let mode = Mode::train(1, 1234).in_epoch(3).in_stage(2);
    let v = interp::run(&c.graph, &c.binding, &c.feeds, &c.params, &mode).unwrap();
    assert_eq!((v.scalar("s"), v.scalar("e"), v.scalar("g")), (Some(1234.0), Some(3.0), Some(2.0)));
}
