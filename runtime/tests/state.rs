//! Model state that is not trained (running statistics): a state is read like a parameter,
//! but autodiff gives it no gradient, no optimizer touches it (weight decay included), a
//! training step moves it by the graph's own update rule (`state/<name>`), and a graph run
//! in evaluation reads it without changing it. On interp and the jit (the OpenCL device
//! step is checked in `tests/opencl.rs` of the mdl crate, on shipped specs).

use mdl_runtime::backend::jit::Jit;
use mdl_runtime::backend::{Executor, Interp};
use mdl_runtime::ir::graph::state_output;
use mdl_runtime::optim::{OptimConfig, OptimKind, Optimizer};
use mdl_runtime::training::{self, TrainStep};
use mdl_runtime::{autodiff, passes, BinaryOp, Binding, DType, Dim, Graph, Init, Mode, Op, ReduceOp, Tensor, Value};
use std::collections::HashMap;

const MOMENTUM: f64 = 0.25;

/// `loss = sum(((x - TrainEval(mean_B(x), r)) * w)^2)` with the running mean `r` advanced to
/// `r + MOMENTUM * (mean_B(x) - r)`; returns the forward graph.
fn model() -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", vec![Dim::batch(), Dim::from(3usize)], DType::F);
    let w = g.param("w", vec![Dim::from(3usize)], Init::Ones, None, false);
    let r = g.state("r", vec![Dim::from(1usize), Dim::from(3usize)], 0.5);
    let stat = g.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: true }, &[x], "bn").unwrap();
    let m = g.add(Op::Scalar(MOMENTUM), &[], "bn").unwrap();
    let gap = g.add(Op::Binary(BinaryOp::Sub), &[stat, r], "bn").unwrap();
    let step = g.add(Op::Binary(BinaryOp::Mul), &[m, gap], "bn").unwrap();
    let next = g.add(Op::Binary(BinaryOp::Add), &[r, step], "bn").unwrap();
    g.outputs.insert(state_output("r"), next);
    let centre = g.add(Op::TrainEval, &[stat, r], "bn").unwrap();
    let c = g.add(Op::Binary(BinaryOp::Sub), &[x, centre], "bn").unwrap();
    let y = g.add(Op::Binary(BinaryOp::Mul), &[c, w], "bn").unwrap();
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[y, y], "bn").unwrap();
    let loss = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keep_dims: false }, &[sq], "bn").unwrap();
    g.outputs.insert("loss".into(), loss);
    g
}

/// The forward graph in training, differentiated for `w`, optimised.
fn training_graph(forward: &Graph) -> Graph {
    let phase = passes::for_phase(forward, true);
    passes::optimize(&autodiff::differentiate(&phase, phase.outputs["loss"], &["w".to_string()]).unwrap())
}

fn batch(k: f32) -> (Binding, HashMap<String, Value<f32>>) {
    let mut b = Binding::new();
    b.insert("B".into(), 4);
    let data = (0..12).map(|i| k * (i as f32 - 3.0) / 7.0 + 0.1 * (i % 3) as f32).collect();
    let feeds = HashMap::from([("x".to_string(), Value::Dense(Tensor::new(vec![4, 3], data).unwrap()))]);
    (b, feeds)
}

fn batch_mean(feeds: &HashMap<String, Value<f32>>) -> Vec<f32> {
    let Value::Dense(x) = &feeds["x"] else { unreachable!() };
    (0..3).map(|j| (0..4).map(|i| x.data[i * 3 + j]).sum::<f32>() / 4.0).collect()
}

fn check_on(exec: &mut dyn Executor, label: &str) {
    let forward = model();
    let train = training_graph(&forward);
    assert!(train.outputs.contains_key("grad/w"), "{label}");
    assert!(!train.outputs.contains_key("grad/r"), "{label}: a state got a gradient");
    assert_eq!(train.states.len(), 1, "{label}: the training graph keeps the state table");
    assert!(train.params.iter().all(|p| p.name != "r"), "{label}: a state counted as a parameter");
    let mut eval = passes::for_phase(&forward, false);
    eval.outputs.retain(|n, _| n == "loss");
    let eval = passes::dce(&eval);
    assert!(eval.ids().all(|id| eval.node(id).op != Op::TrainEval), "{label}: for_phase left a TrainEval");
    assert!(!eval.outputs.contains_key(&state_output("r")), "{label}");

    let mut params = mdl_runtime::init::init_model::<f32>(&forward, &Binding::new(), 1).unwrap();
    assert_eq!(params["r"].data, vec![0.5; 3], "{label}: the state starts at its initial value");
    // Adam with weight decay on everything, a large rate: a state in its reach would move.
    let config = OptimConfig { l2: 0.5, ..OptimConfig::new(OptimKind::adam(), 0.3) };
    let mut optimizer = Optimizer::<f32>::new(config).unwrap();
    let mut expected = vec![0.5f32; 3];
    for (k, scale) in [1.0f32, -2.0, 0.5].into_iter().enumerate() {
        let (binding, feeds) = batch(scale);
        // Evaluation reads the running mean and leaves it alone.
        let before = params.clone();
        let out = exec.run(&eval, &binding, &feeds, &params, &Mode::eval()).unwrap();
        let mut want = 0.0f64;
        let Value::Dense(x) = &feeds["x"] else { unreachable!() };
        for i in 0..4 {
            for j in 0..3 {
                let y = (x.data[i * 3 + j] - params["r"].data[j]) * params["w"].data[j];
                want += (y * y) as f64;
            }
        }
        let got = out.scalar("loss").unwrap() as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.max(1.0),
            "{label}: evaluation uses the running mean: {got} vs {want}"
        );
        assert_eq!(params, before, "{label}: evaluation changed the model");

        let step = TrainStep {
            graph: &train,
            binding: &binding,
            feeds: &feeds,
            mode: &Mode::train(1, k as u64),
            info: &train.params,
            frozen: &|_| false,
            clip_norm: None,
            lr_scale: &mdl_runtime::optim::LrScale::from(1.0),
        };
        let w_before = params["w"].clone();
        training::train_step(exec, &step, &mut params, &mut optimizer).unwrap();
        training::sync(exec, &mut params, &mut optimizer).unwrap();
        assert_ne!(params["w"], w_before, "{label}: the parameter trains");
        for (e, m) in expected.iter_mut().zip(batch_mean(&feeds)) {
            *e += MOMENTUM as f32 * (m - *e);
        }
        for (j, (&got, &want)) in params["r"].data.iter().zip(&expected).enumerate() {
            assert!((got - want).abs() <= 1e-6, "{label}: step {k}: r[{j}] = {got}, the update rule gives {want}");
        }
    }
    // Adam keeps m and v of `w` (and its step count), nothing of `r`.
    let names: Vec<String> = optimizer.state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.iter().filter(|n| n.ends_with('w')).count(), 2, "{label}: {names:?}");
    assert!(
        names.iter().all(|n| !n.ends_with('r')),
        "{label}: the optimizer keeps state of a running statistic: {names:?}"
    );
}

#[test]
fn a_state_moves_by_its_rule_in_training_only_and_no_optimizer_touches_it() {
    check_on(&mut Interp, "interp");
    check_on(&mut Jit::with_threads(2), "jit");
}

/// A non-finite loss skips the step: the state stays where it was, as the parameters do.
#[test]
fn a_step_with_a_non_finite_loss_leaves_the_state() {
    let forward = model();
    let train = training_graph(&forward);
    let mut params = mdl_runtime::init::init_model::<f32>(&forward, &Binding::new(), 1).unwrap();
    let (binding, mut feeds) = batch(1.0);
    if let Some(Value::Dense(x)) = feeds.get_mut("x") {
        x.data[0] = f32::INFINITY;
    }
    let mut optimizer = Optimizer::<f32>::new(OptimConfig::new(OptimKind::Sgd, 0.1)).unwrap();
    let step = TrainStep {
        graph: &train,
        binding: &binding,
        feeds: &feeds,
        mode: &Mode::train(1, 0),
        info: &train.params,
        frozen: &|_| false,
        clip_norm: None,
        lr_scale: &mdl_runtime::optim::LrScale::from(1.0),
    };
    let before = params.clone();
    let outcome = training::train_step(&mut Interp, &step, &mut params, &mut optimizer).unwrap();
    assert!(!outcome.loss.is_finite());
    assert_eq!(params, before);
}
