//! Optimizers (dense and row-sparse updates, L2, per-table learning rates, freezing,
//! clipping, state round trips) and parameter initialisation.

use mdl_runtime::init::{glorot_limit, init_params};
use mdl_runtime::optim::{clip_global_norm, global_norm, LrScale, OptimConfig, OptimKind, Optimizer};
use mdl_runtime::rng::SplitMix64;
use mdl_runtime::rows::combine_duplicate_rows;
use mdl_runtime::{Binding, Dim, Float, Init, NodeId, ParamInfo, Tensor, Value};
use std::collections::HashMap;

fn info(name: &str, shape: &[usize], embedding: bool) -> ParamInfo {
    ParamInfo {
        name: name.to_string(),
        shape: shape.iter().map(|&d| Dim::from(d)).collect(),
        init: Init::Zeros,
        group: None,
        embedding,
        node: NodeId::new(0),
    }
}

fn random_tensor<T: Float>(rng: &mut SplitMix64, shape: &[usize]) -> Tensor<T> {
    let n = shape.iter().product();
    Tensor { shape: shape.to_vec(), data: (0..n).map(|_| T::from_f64(2.0 * rng.next_f64() - 1.0)).collect() }
}

fn row_sparse<T: Float>(rng: &mut SplitMix64, table: &[usize], rows: &[u32]) -> Value<T> {
    let mut value_shape = vec![rows.len()];
    value_shape.extend_from_slice(&table[1..]);
    Value::RowSparse { shape: table.to_vec(), rows: rows.to_vec(), values: random_tensor(rng, &value_shape) }
}

fn not_frozen(_: &ParamInfo) -> bool {
    false
}

fn grads_of<T>(entries: Vec<(&str, Value<T>)>) -> HashMap<String, Value<T>> {
    entries.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
}

fn bits(data: &[f32]) -> Vec<u32> {
    data.iter().map(|v| v.to_bits()).collect()
}

fn state_tensor<T: Float>(opt: &Optimizer<T>, name: &str) -> Tensor<T> {
    opt.state().into_iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap_or_else(|| panic!("no state `{name}`"))
}

fn row(t: &Tensor<f32>, r: usize) -> Vec<u32> {
    let width = t.shape[1];
    bits(&t.data[r * width..(r + 1) * width])
}

#[test]
fn row_sparse_sgd_equals_dense_sgd_with_duplicate_rows() {
    let table = [6, 3];
    let infos = [info("emb", &table, true)];
    let mut rng = SplitMix64::new(1);
    let start: Tensor<f32> = random_tensor(&mut rng, &table);
    let mut sparse_params = HashMap::from([("emb".to_string(), start.clone())]);
    let mut dense_params = sparse_params.clone();
    let config = OptimConfig::new(OptimKind::Sgd, 0.3);
    let mut sparse_opt = Optimizer::<f32>::new(config.clone()).unwrap();
    let mut dense_opt = Optimizer::<f32>::new(config).unwrap();
    for rows in [&[4u32, 1, 4, 0, 4][..], &[5, 5], &[2, 0, 1, 0]] {
        let grad = row_sparse::<f32>(&mut rng, &table, rows);
        let dense = Value::Dense(grad.to_dense().unwrap());
        sparse_opt
            .step(&mut sparse_params, &grads_of(vec![("emb", grad)]), &infos, &not_frozen, &LrScale::from(1.0))
            .unwrap();
        dense_opt
            .step(&mut dense_params, &grads_of(vec![("emb", dense)]), &infos, &not_frozen, &LrScale::from(1.0))
            .unwrap();
        assert_eq!(bits(&sparse_params["emb"].data), bits(&dense_params["emb"].data));
    }
    assert_ne!(sparse_params["emb"], start);
}

/// Runs Adam or Adagrad on a `[5, 2]` table with row-sparse gradients, checking that
/// untouched rows (parameters and state) keep their bits, and that row 0, touched on every
/// step, follows a dense optimizer run on that row alone.
fn check_sparse_rows_are_lazy(kind: OptimKind, state_names: &[&str]) {
    let table = [5, 2];
    let infos = [info("emb", &table, true), info("row0", &[1, 2], false)];
    let mut rng = SplitMix64::new(2);
    let start: Tensor<f32> = random_tensor(&mut rng, &table);
    let row0 = Tensor { shape: vec![1, 2], data: start.data[0..2].to_vec() };
    let mut params = HashMap::from([("emb".to_string(), start.clone()), ("row0".to_string(), row0)]);
    let mut opt = Optimizer::<f32>::new(OptimConfig::new(kind, 0.05)).unwrap();

    // Step 1 touches rows 0 and 2 (2 twice); step 2 touches rows 0 and 3.
    let mut after_step1: Option<(Tensor<f32>, Vec<Tensor<f32>>)> = None;
    for rows in [&[0u32, 2, 2][..], &[3, 0]] {
        let grad = row_sparse::<f32>(&mut rng, &table, rows);
        let row0_grad = Tensor { shape: vec![1, 2], data: grad.to_dense().unwrap().data[0..2].to_vec() };
        let grads = grads_of(vec![("emb", grad), ("row0", Value::Dense(row0_grad))]);
        opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
        let states: Vec<Tensor<f32>> = state_names.iter().map(|s| state_tensor(&opt, &format!("{s}/emb"))).collect();
        let emb = &params["emb"];
        // Rows 1 and 4 were never touched: initial values, state as created.
        for r in [1, 4] {
            assert_eq!(row(emb, r), row(&start, r), "row {r}");
        }
        if let Some((emb1, states1)) = &after_step1 {
            // Row 2 is not touched on step 2: parameters and state keep their step-1 bits.
            assert_eq!(row(emb, 2), row(emb1, 2));
            for (s, s1) in states.iter().zip(states1) {
                assert_eq!(row(s, 2), row(s1, 2));
                assert_eq!(row(s, 1), row(s1, 1));
            }
        }
        // Row 0 is touched on every step, so it matches the dense run bit for bit.
        assert_eq!(row(emb, 0), bits(&params["row0"].data));
        for (s, name) in states.iter().zip(state_names) {
            assert_eq!(row(s, 0), bits(&state_tensor(&opt, &format!("{name}/row0")).data));
        }
        after_step1 = Some((emb.clone(), states));
    }
}

#[test]
fn row_sparse_adam_touches_only_its_rows() {
    check_sparse_rows_are_lazy(OptimKind::adam(), &["adam.m", "adam.v"]);
}

#[test]
fn row_sparse_adagrad_touches_only_its_rows() {
    check_sparse_rows_are_lazy(OptimKind::Adagrad { eps: 1e-10, initial_accumulator: 0.1 }, &["adagrad.accum"]);
}

#[test]
fn lazy_adam_uses_the_global_step_for_bias_correction() {
    // One element of a table, touched on steps 1 and 3 only; the expectation written out.
    let (beta1, beta2, eps, lr) = (0.9f64, 0.999f64, 1e-8f64, 0.1f64);
    let infos = [info("emb", &[3, 1], true)];
    let mut params = HashMap::from([("emb".to_string(), Tensor::new(vec![3, 1], vec![1.0f64, 2.0, 3.0]).unwrap())]);
    let mut opt = Optimizer::<f64>::new(OptimConfig::new(OptimKind::Adam { beta1, beta2, eps }, lr)).unwrap();
    let sparse = |row: u32, g: f64| Value::RowSparse {
        shape: vec![3, 1],
        rows: vec![row],
        values: Tensor::new(vec![1, 1], vec![g]).unwrap(),
    };
    opt.step(&mut params, &grads_of(vec![("emb", sparse(1, 0.5))]), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    opt.step(&mut params, &grads_of(vec![("emb", sparse(2, 7.0))]), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    opt.step(&mut params, &grads_of(vec![("emb", sparse(1, -0.25))]), &infos, &not_frozen, &LrScale::from(1.0))
        .unwrap();

    let (mut w, mut m, mut v) = (2.0f64, 0.0f64, 0.0f64);
    for (t, g) in [(1.0, 0.5), (3.0, -0.25)] {
        m = beta1 * m + (1.0 - beta1) * g;
        v = beta2 * v + (1.0 - beta2) * g * g;
        let m_hat = m / (1.0 - beta1.powf(t));
        let v_hat = v / (1.0 - beta2.powf(t));
        w -= lr * m_hat / (v_hat.sqrt() + eps);
    }
    let got = params["emb"].data[1];
    assert!((got - w).abs() < 1e-12, "got {got}, expected {w}");
    assert!((state_tensor(&opt, "adam.m/emb").data[1] - m).abs() < 1e-15);
    assert!((state_tensor(&opt, "adam.v/emb").data[1] - v).abs() < 1e-15);
    assert_eq!(params["emb"].data[0], 1.0);
    assert_eq!(opt.step_count(), 3);
}

/// Adam and Adagrad with L2, dense, over three steps, against their formulas (module docs
/// of `optim`) written out here: the rules' one description computes what the docs say.
#[test]
fn adam_and_adagrad_with_l2_follow_their_written_formulas() {
    let (lr, l2, eps) = (0.1f64, 0.03f64, 1e-8f64);
    let grads_by_step = [0.5f64, -1.25, 0.75];
    let infos = [info("w", &[1], false)];
    let (beta1, beta2) = (0.9f64, 0.999f64);
    let adagrad = OptimKind::Adagrad { eps, initial_accumulator: 0.1 };
    for kind in [OptimKind::Adam { beta1, beta2, eps }, adagrad] {
        let mut config = OptimConfig::new(kind, lr);
        config.l2 = l2;
        let mut opt = Optimizer::<f64>::new(config).unwrap();
        let mut params = HashMap::from([("w".to_string(), Tensor::new(vec![1], vec![1.5f64]).unwrap())]);
        let (mut w, mut s1, mut s2) = (1.5f64, if kind == adagrad { 0.1 } else { 0.0 }, 0.0f64);
        for (t, &g) in grads_by_step.iter().enumerate() {
            let grads = grads_of(vec![("w", Value::Dense(Tensor::new(vec![1], vec![g]).unwrap()))]);
            opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
            let g = g + l2 * w;
            if kind == adagrad {
                s1 += g * g;
                w -= lr * g / (s1.sqrt() + eps);
            } else {
                let t = (t + 1) as f64;
                s1 = beta1 * s1 + (1.0 - beta1) * g;
                s2 = beta2 * s2 + (1.0 - beta2) * g * g;
                w -= lr / (1.0 - beta1.powf(t)) * s1 / (s2.sqrt() / (1.0 - beta2.powf(t)).sqrt() + eps);
            }
            let got = params["w"].data[0];
            assert!((got - w).abs() < 1e-12, "{kind:?} step {t}: got {got}, expected {w}");
        }
        let slot = if kind == adagrad { "adagrad.accum/w" } else { "adam.m/w" };
        assert!((state_tensor(&opt, slot).data[0] - s1).abs() < 1e-14, "{kind:?}: the state differs");
    }
}

#[test]
fn adam_converges_on_a_quadratic() {
    // f(w) = ½ Σ aᵢ (wᵢ − cᵢ)², an ill-conditioned bowl.
    let mut rng = SplitMix64::new(3);
    let n = 20;
    let curvature: Vec<f64> = (0..n).map(|i| 0.1 * 10f64.powf(2.0 * i as f64 / n as f64)).collect();
    let centre: Vec<f64> = (0..n).map(|_| 4.0 * rng.next_f64() - 2.0).collect();
    let loss = |w: &[f64]| -> f64 { (0..n).map(|i| 0.5 * curvature[i] * (w[i] - centre[i]).powi(2)).sum() };
    let infos = [info("w", &[n], false)];
    let mut params = HashMap::from([("w".to_string(), Tensor::<f64>::zeros(vec![n]))]);
    let mut opt = Optimizer::<f64>::new(OptimConfig::new(OptimKind::adam(), 0.05)).unwrap();
    let initial = loss(&params["w"].data);
    for _ in 0..3000 {
        let w = &params["w"].data;
        let g: Vec<f64> = (0..n).map(|i| curvature[i] * (w[i] - centre[i])).collect();
        let grads = grads_of(vec![("w", Value::Dense(Tensor::new(vec![n], g).unwrap()))]);
        opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }
    let last = loss(&params["w"].data);
    assert!(last < initial * 1e-4, "loss {initial} -> {last}");
}

#[test]
fn l2_and_embedding_lr_take_effect() {
    let infos = [info("w", &[1], false), info("emb", &[1, 1], true), info("plain_emb", &[1, 1], true)];
    let one = |shape: Vec<usize>, v: f64| Tensor::new(shape, vec![v]).unwrap();
    let mut params = HashMap::from([
        ("w".to_string(), one(vec![1], 2.0)),
        ("emb".to_string(), one(vec![1, 1], 3.0)),
        ("plain_emb".to_string(), one(vec![1, 1], 3.0)),
    ]);
    let sparse = |g: f64| Value::RowSparse { shape: vec![1, 1], rows: vec![0], values: one(vec![1, 1], g) };
    let grads = grads_of(vec![("w", Value::Dense(one(vec![1], 0.5))), ("emb", sparse(0.25))]);

    let mut config = OptimConfig::new(OptimKind::Sgd, 0.1);
    config.l2 = 0.01;
    config.embedding_lr = Some(0.5);
    config.embedding_l2 = Some(0.2);
    let mut opt = Optimizer::<f64>::new(config.clone()).unwrap();
    opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    assert_eq!(params["w"].data[0], 2.0 - 0.1 * (0.5 + 0.01 * 2.0));
    assert!((params["w"].data[0] - 1.948).abs() < 1e-15);
    assert_eq!(params["emb"].data[0], 3.0 - 0.5 * (0.25 + 0.2 * 3.0));
    assert!((params["emb"].data[0] - 2.575).abs() < 1e-15);

    // The step's lr_scale multiplies both learning rates.
    let mut params_half =
        HashMap::from([("w".to_string(), one(vec![1], 2.0)), ("emb".to_string(), one(vec![1, 1], 3.0))]);
    let mut opt = Optimizer::<f64>::new(config.clone()).unwrap();
    opt.step(&mut params_half, &grads, &infos, &not_frozen, &LrScale::from(0.5)).unwrap();
    assert_eq!(params_half["w"].data[0], 2.0 - 0.05 * (0.5 + 0.01 * 2.0));
    assert_eq!(params_half["emb"].data[0], 3.0 - 0.25 * (0.25 + 0.2 * 3.0));

    // A per-parameter factor multiplies that parameter's rate only, on top of the one for
    // all; a bad factor changes nothing and names the parameter.
    let mut params_group =
        HashMap::from([("w".to_string(), one(vec![1], 2.0)), ("emb".to_string(), one(vec![1, 1], 3.0))]);
    let mut opt = Optimizer::<f64>::new(config.clone()).unwrap();
    let scale = LrScale { all: 0.5, per_param: HashMap::from([("emb".to_string(), 0.1)]) };
    opt.step(&mut params_group, &grads, &infos, &not_frozen, &scale).unwrap();
    assert_eq!(params_group["w"].data[0], 2.0 - 0.05 * (0.5 + 0.01 * 2.0));
    assert_eq!(params_group["emb"].data[0], 3.0 - 0.5 * 0.5 * 0.1 * (0.25 + 0.2 * 3.0));
    let bad = LrScale { all: 1.0, per_param: HashMap::from([("emb".to_string(), f64::NAN)]) };
    let err = opt.step(&mut params_group, &grads, &infos, &not_frozen, &bad).unwrap_err();
    assert!(err.contains("the lr factor of `emb`"), "{err}");
    assert_eq!(opt.step_count(), 1, "a refused step does not count");

    // Without the table overrides, tables use lr and l2.
    let mut config = OptimConfig::new(OptimKind::Sgd, 0.1);
    config.l2 = 0.01;
    let mut opt = Optimizer::<f64>::new(config).unwrap();
    let grads = grads_of(vec![("plain_emb", sparse(0.25))]);
    opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    assert_eq!(params["plain_emb"].data[0], 3.0 - 0.1 * (0.25 + 0.01 * 3.0));
}

#[test]
fn frozen_parameters_and_their_state_are_untouched() {
    let mut tower = info("tower/w", &[2, 2], false);
    tower.group = Some("tower".to_string());
    let infos = [tower, info("emb", &[4, 2], true)];
    let mut rng = SplitMix64::new(4);
    let tower_start: Tensor<f32> = random_tensor(&mut rng, &[2, 2]);
    let mut params = HashMap::from([
        ("tower/w".to_string(), tower_start.clone()),
        ("emb".to_string(), random_tensor(&mut rng, &[4, 2])),
    ]);
    let mut opt = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adam(), 0.1)).unwrap();
    let frozen = |p: &ParamInfo| p.group.as_deref() == Some("tower");
    for _ in 0..3 {
        let grads = grads_of(vec![
            ("tower/w", Value::Dense(random_tensor(&mut rng, &[2, 2]))),
            ("emb", row_sparse(&mut rng, &[4, 2], &[1, 3])),
        ]);
        opt.step(&mut params, &grads, &infos, &frozen, &LrScale::from(1.0)).unwrap();
    }
    assert_eq!(bits(&params["tower/w"].data), bits(&tower_start.data));
    let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["adam.m/emb", "adam.v/emb", "optim.step"]);
}

#[test]
fn bad_gradients_are_errors_and_change_nothing() {
    let infos = [info("w", &[2], false), info("emb", &[3, 2], true)];
    let start = HashMap::from([
        ("w".to_string(), Tensor::new(vec![2], vec![1.0f32, 2.0]).unwrap()),
        ("emb".to_string(), Tensor::<f32>::zeros(vec![3, 2])),
    ]);
    let mut opt = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adam(), 0.1)).unwrap();
    let good_w = || ("w", Value::Dense(Tensor::new(vec![2], vec![1.0f32, 1.0]).unwrap()));
    let cases: Vec<(HashMap<String, Value<f32>>, &str)> = vec![
        (grads_of(vec![good_w(), ("nope", Value::Dense(Tensor::zeros(vec![2])))]), "`nope`"),
        (grads_of(vec![good_w(), ("emb", Value::Dense(Tensor::zeros(vec![2, 3])))]), "shape"),
        (
            grads_of(vec![
                good_w(),
                ("emb", Value::RowSparse { shape: vec![3, 2], rows: vec![3], values: Tensor::zeros(vec![1, 2]) }),
            ]),
            "row 3",
        ),
        (
            grads_of(vec![
                good_w(),
                ("emb", Value::RowSparse { shape: vec![3, 2], rows: vec![0, 1], values: Tensor::zeros(vec![1, 2]) }),
            ]),
            "values",
        ),
        (grads_of(vec![good_w(), ("emb", Value::Ids(Tensor::new(vec![1], vec![0u32]).unwrap()))]), "ids"),
    ];
    for (grads, expected) in cases {
        let mut params = start.clone();
        let err = opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap_err();
        assert!(err.contains(expected), "{err:?} should mention {expected}");
        assert_eq!(params, start);
        assert_eq!(opt.step_count(), 0);
        assert_eq!(opt.state().len(), 1);
    }
    let mut params = start.clone();
    let err =
        opt.step(&mut params, &grads_of(vec![good_w()]), &infos, &not_frozen, &LrScale::from(f64::NAN)).unwrap_err();
    assert!(err.contains("lr_scale"), "{err}");
    assert!(
        Optimizer::<f32>::new(OptimConfig::new(OptimKind::Adam { beta1: 1.0, beta2: 0.9, eps: 1e-8 }, 0.1)).is_err()
    );
    assert!(Optimizer::<f32>::new(OptimConfig::new(OptimKind::Sgd, -1.0)).is_err());
}

#[test]
fn clip_global_norm_counts_combined_rows_and_clips_to_max_norm() {
    let mut rng = SplitMix64::new(5);
    let sparse = row_sparse::<f64>(&mut rng, &[5, 3], &[2, 0, 2, 2]);
    let dense: Tensor<f64> = random_tensor(&mut rng, &[4]);
    let squares = |d: &[f64]| d.iter().map(|v| v * v).sum::<f64>();
    let expected = (squares(&dense.data) + squares(&sparse.to_dense().unwrap().data)).sqrt();
    // Squaring the entries one by one would give a different (wrong) norm.
    let Value::RowSparse { values, .. } = &sparse else { unreachable!() };
    assert!((squares(&values.data) + squares(&dense.data)).sqrt() != expected);

    let mut grads = grads_of(vec![("emb", sparse.clone()), ("w", Value::Dense(dense.clone()))]);
    let untouched = grads.clone();
    assert_eq!(clip_global_norm(&mut grads, expected * 2.0), expected);
    // Within bounds nothing is scaled; the row-sparse gradient is combined (unique ascending
    // rows, duplicates summed), which leaves its dense form bit for bit as it was.
    assert_eq!(grads["w"], untouched["w"]);
    let Value::RowSparse { rows, .. } = &grads["emb"] else { panic!("still row-sparse") };
    assert_eq!(rows, &vec![0, 2]);
    assert_eq!(grads["emb"].to_dense().unwrap(), untouched["emb"].to_dense().unwrap());

    let norm = clip_global_norm(&mut grads, expected / 4.0);
    assert!((norm - expected).abs() < 1e-12);
    assert!((global_norm(&grads) - expected / 4.0).abs() < 1e-12);
    let clipped_dense = grads["w"].as_dense().unwrap();
    for (c, d) in clipped_dense.data.iter().zip(&dense.data) {
        assert!((c - d / 4.0).abs() < 1e-15);
    }
}

/// Dense and row-sparse gradients for a few steps, the same for any run.
fn scripted_grads(step: u64) -> HashMap<String, Value<f32>> {
    let mut rng = SplitMix64::keyed(9, step, 0);
    let rows: Vec<u32> = (0..4).map(|_| (rng.next_u64() % 6) as u32).collect();
    grads_of(vec![("w", Value::Dense(random_tensor(&mut rng, &[3, 2]))), ("emb", row_sparse(&mut rng, &[6, 2], &rows))])
}

fn check_state_round_trip(kind: OptimKind) {
    let infos = [info("w", &[3, 2], false), info("emb", &[6, 2], true)];
    let mut rng = SplitMix64::new(6);
    let start: HashMap<String, Tensor<f32>> = HashMap::from([
        ("w".to_string(), random_tensor(&mut rng, &[3, 2])),
        ("emb".to_string(), random_tensor(&mut rng, &[6, 2])),
    ]);
    let config = OptimConfig::new(kind, 0.05);

    let mut straight_params = start.clone();
    let mut straight = Optimizer::<f32>::new(config.clone()).unwrap();
    for step in 0..5 {
        straight.step(&mut straight_params, &scripted_grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }

    let mut resumed_params = start.clone();
    let mut first = Optimizer::<f32>::new(config.clone()).unwrap();
    for step in 0..3 {
        first.step(&mut resumed_params, &scripted_grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }
    let saved = first.state();
    drop(first);
    let mut resumed = Optimizer::<f32>::new(config).unwrap();
    resumed.load_state(saved).unwrap();
    assert_eq!(resumed.step_count(), 3);
    for step in 3..5 {
        resumed.step(&mut resumed_params, &scripted_grads(step), &infos, &not_frozen, &LrScale::from(1.0)).unwrap();
    }

    for name in ["w", "emb"] {
        assert_eq!(bits(&resumed_params[name].data), bits(&straight_params[name].data), "{name}");
    }
    let (a, b) = (resumed.state(), straight.state());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(ta.shape, tb.shape);
        assert_eq!(bits(&ta.data), bits(&tb.data), "{na}");
    }
}

#[test]
fn resumed_adam_continues_bit_identically() {
    check_state_round_trip(OptimKind::adam());
}

#[test]
fn resumed_adagrad_continues_bit_identically() {
    check_state_round_trip(OptimKind::adagrad());
}

#[test]
fn resumed_sgd_keeps_its_step_count() {
    check_state_round_trip(OptimKind::Sgd);
}

#[test]
fn step_count_survives_f32_beyond_its_integer_range() {
    let mut opt = Optimizer::<f32>::new(OptimConfig::default()).unwrap();
    let big = (1u64 << 40) + 12_345;
    let digits: Vec<f32> = (0..4).map(|i| ((big >> (16 * i)) & 0xffff) as f32).collect();
    opt.load_state(vec![("optim.step".to_string(), Tensor::new(vec![4], digits).unwrap())]).unwrap();
    assert_eq!(opt.step_count(), big);
    assert_eq!(opt.state()[0].1.data.len(), 4);
}

#[test]
fn load_state_rejects_foreign_or_incomplete_state() {
    let step = || ("optim.step".to_string(), Tensor::new(vec![4], vec![3.0f32, 0.0, 0.0, 0.0]).unwrap());
    let moment = |name: &str| (name.to_string(), Tensor::<f32>::zeros(vec![2]));
    let mut adam = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adam(), 0.1)).unwrap();
    assert!(adam.load_state(vec![moment("adam.m/w")]).unwrap_err().contains("optim.step"));
    assert!(adam.load_state(vec![step(), moment("adam.m/w")]).unwrap_err().contains("adam.v/w"));
    assert!(adam.load_state(vec![step(), moment("adam.v/w")]).unwrap_err().contains("adam.m/w"));
    assert!(adam.load_state(vec![step(), moment("adagrad.accum/w")]).unwrap_err().contains("adam optimizer"));
    assert!(adam.load_state(vec![step(), step()]).unwrap_err().contains("twice"));
    let bad_digit = ("optim.step".to_string(), Tensor::new(vec![4], vec![0.5f32, 0.0, 0.0, 0.0]).unwrap());
    assert!(adam.load_state(vec![bad_digit]).is_err());
    assert_eq!(adam.step_count(), 0);
    adam.load_state(vec![step(), moment("adam.m/w"), moment("adam.v/w")]).unwrap();
    assert_eq!(adam.step_count(), 3);
    adam.reset();
    assert_eq!(adam.step_count(), 0);
    assert_eq!(adam.state().len(), 1);
}

#[test]
fn state_of_another_shape_is_an_error_at_step_time() {
    let infos = [info("w", &[3], false)];
    let mut params = HashMap::from([("w".to_string(), Tensor::<f32>::zeros(vec![3]))]);
    let mut opt = Optimizer::<f32>::new(OptimConfig::new(OptimKind::adagrad(), 0.1)).unwrap();
    let step = ("optim.step".to_string(), Tensor::new(vec![4], vec![1.0f32, 0.0, 0.0, 0.0]).unwrap());
    opt.load_state(vec![step, ("adagrad.accum/w".to_string(), Tensor::zeros(vec![2]))]).unwrap();
    let grads = grads_of(vec![("w", Value::Dense(Tensor::zeros(vec![3])))]);
    assert!(opt.step(&mut params, &grads, &infos, &not_frozen, &LrScale::from(1.0)).unwrap_err().contains("state"));
}

// Parameter initialisation.

fn init_info(name: &str, shape: Vec<Dim>, init: Init) -> ParamInfo {
    ParamInfo { name: name.to_string(), shape, init, group: None, embedding: false, node: NodeId::new(0) }
}

fn sample_params() -> Vec<ParamInfo> {
    let dims = |s: &[usize]| s.iter().map(|&d| Dim::from(d)).collect::<Vec<_>>();
    vec![
        init_info("emb", vec![Dim::sym("rows(user)"), Dim::from(8usize)], Init::Normal(0.01)),
        init_info("tower/w", dims(&[3, 40, 60]), Init::Glorot),
        init_info("tower/b", dims(&[60]), Init::Zeros),
        init_info("gate", dims(&[5]), Init::Uniform(0.5)),
        init_info("scale", dims(&[2]), Init::Const(1.5)),
        init_info("ones", dims(&[2]), Init::Ones),
    ]
}

fn user_binding() -> Binding {
    Binding::from([("rows(user)".to_string(), 100)])
}

#[test]
fn init_is_deterministic_per_seed_and_name() {
    let params = sample_params();
    let a = init_params::<f32>(&params, &user_binding(), 42).unwrap();
    let b = init_params::<f32>(&params, &user_binding(), 42).unwrap();
    let c = init_params::<f32>(&params, &user_binding(), 43).unwrap();
    assert_eq!(a, b);
    assert_ne!(a["emb"], c["emb"]);
    assert_ne!(a["tower/w"], c["tower/w"]);
    assert_eq!(a["emb"].shape, vec![100, 8]);
    assert_eq!(a["tower/b"].data, vec![0.0; 60]);
    assert_eq!(a["scale"].data, vec![1.5, 1.5]);
    assert_eq!(a["ones"].data, vec![1.0, 1.0]);
    assert!(a["gate"].data.iter().all(|v| v.abs() <= 0.5));
    // Same distribution, different names: different values.
    let twins = vec![
        init_info("left", vec![Dim::from(16usize)], Init::Uniform(1.0)),
        init_info("right", vec![Dim::from(16usize)], Init::Uniform(1.0)),
    ];
    let t = init_params::<f64>(&twins, &Binding::new(), 42).unwrap();
    assert_ne!(t["left"], t["right"]);
}

#[test]
fn init_respects_glorot_limits_and_normal_spread() {
    let a = init_params::<f64>(&sample_params(), &user_binding(), 7).unwrap();
    let limit = (6.0f64 / (40.0 + 60.0)).sqrt();
    assert_eq!(glorot_limit(&[3, 40, 60]), limit);
    let w = &a["tower/w"].data;
    assert!(w.iter().all(|v| v.abs() <= limit));
    assert!(w.iter().any(|v| v.abs() > 0.95 * limit), "the whole range is used");
    let emb = &a["emb"].data;
    let std = (emb.iter().map(|v| v * v).sum::<f64>() / emb.len() as f64).sqrt();
    assert!((std - 0.01).abs() < 0.001, "std {std}");
}

#[test]
fn adding_a_parameter_does_not_change_the_others() {
    let params = sample_params();
    let before = init_params::<f32>(&params, &user_binding(), 11).unwrap();
    let mut more = vec![init_info("new/w", vec![Dim::from(7usize), Dim::from(3usize)], Init::Glorot)];
    more.extend(params);
    let after = init_params::<f32>(&more, &user_binding(), 11).unwrap();
    for (name, t) in &before {
        assert_eq!(&after[name], t, "{name}");
    }
    assert_eq!(after.len(), before.len() + 1);
}

#[test]
fn init_errors_name_the_parameter() {
    let err = init_params::<f32>(&sample_params(), &Binding::new(), 1).unwrap_err();
    assert!(err.contains("emb"), "{err}");
    let bad = vec![init_info("w", vec![Dim::from(2usize)], Init::Normal(-1.0))];
    assert!(init_params::<f32>(&bad, &Binding::new(), 1).unwrap_err().contains("`w`"));
    let twice = vec![init_info("w", vec![], Init::Zeros), init_info("w", vec![], Init::Ones)];
    assert!(init_params::<f32>(&twice, &Binding::new(), 1).unwrap_err().contains("twice"));
}

/// Combining a row-sparse gradient (counting-sort path for row ids near the entry count,
/// key-sort path for sparse ids in a huge table) gives unique ascending rows whose values
/// equal the dense form's rows bit for bit.
#[test]
fn combined_rows_equal_the_dense_form_bit_for_bit() {
    for (case, (table_rows, entries)) in
        [(6u32, 40usize), (1000, 300), (4_000_000_000, 50), (3, 1)].into_iter().enumerate()
    {
        let mut rng = SplitMix64::new(40 + case as u64);
        let width = 3;
        let rows: Vec<u32> = (0..entries).map(|_| (rng.next_u64() % table_rows as u64) as u32).collect();
        let values: Vec<f32> = (0..entries * width).map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0).collect();
        let combined = combine_duplicate_rows(&rows, &values, width);
        assert!(combined.rows.windows(2).all(|p| p[0] < p[1]), "case {case}: rows not unique ascending");
        let mut distinct = rows.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(&combined.rows[..], &distinct[..], "case {case}");
        for (i, &row) in combined.rows.iter().enumerate() {
            let mut expected = vec![0f32; width];
            for (j, _) in rows.iter().enumerate().filter(|(_, &r)| r == row) {
                for (e, v) in expected.iter_mut().zip(&values[j * width..(j + 1) * width]) {
                    *e += v;
                }
            }
            assert_eq!(&combined.values[i * width..(i + 1) * width], &expected[..], "case {case} row {row}");
        }
    }
}
