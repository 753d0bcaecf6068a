//! Shared helpers for the runtime's integration tests: building small graphs with random
//! values, the finite-difference gradient check, every elementwise op, and deterministic
//! values for backend agreement tests.
#![allow(dead_code)]

use mdl_runtime::backend::interp;
use mdl_runtime::ir::dim::eval_shape;
use mdl_runtime::ops::ShapeError;
use mdl_runtime::rng::SplitMix64;
use mdl_runtime::{
    differentiate, Binding, DType, Dim, Graph, Ids, Init, Mode, NodeId, Op, ReduceOp, Shape, Tensor, Value,
};
use std::collections::HashMap;

/// Central-difference step.
pub const H: f64 = 1e-6;
/// Gradients agree when `|analytic - numeric| <= ABS_TOL + REL_TOL * |numeric|`.
pub const ABS_TOL: f64 = 1e-6;
pub const REL_TOL: f64 = 1e-5;

/// A static shape.
pub fn dims(sizes: &[usize]) -> Shape {
    sizes.iter().map(|&s| Dim::from(s)).collect()
}

/// A parameter's description for the optimizer: `name` of a static `shape`, an embedding
/// table (row-sparse updates, `embedding_lr`) or not.
pub fn param_info(name: &str, shape: &[usize], embedding: bool) -> mdl_runtime::ParamInfo {
    mdl_runtime::ParamInfo {
        name: name.into(),
        shape: dims(shape),
        init: Init::Zeros,
        group: None,
        embedding,
        node: NodeId::new(0),
    }
}

/// A shape whose first axis is the batch symbol `B` (the rest static).
pub fn batch_dims(sizes: &[usize]) -> Shape {
    let mut s = vec![Dim::batch()];
    s.extend(sizes[1..].iter().map(|&d| Dim::from(d)));
    s
}

/// A graph under construction with the values of its parameters and feeds.
pub struct Case {
    pub graph: Graph,
    pub binding: Binding,
    pub params: HashMap<String, Tensor<f64>>,
    pub feeds: HashMap<String, Value<f64>>,
    pub mode: Mode,
    pub rng: SplitMix64,
}

impl Case {
    pub fn new(seed: u64) -> Case {
        Case {
            graph: Graph::new(),
            binding: Binding::new(),
            params: HashMap::new(),
            feeds: HashMap::new(),
            mode: Mode::eval(),
            rng: SplitMix64::new(seed),
        }
    }

    pub fn bind(&mut self, sym: &str, value: usize) {
        self.binding.insert(sym.to_string(), value);
    }

    fn concrete(&self, shape: &[Dim]) -> Vec<usize> {
        eval_shape(shape, &self.binding).expect("test shapes are bound")
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.rng.next_f64()).collect()
    }

    /// `n` values with `lo <= |v| < hi`, random sign (away from a kink or pole at 0).
    pub fn away_from_zero(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let m = lo + (hi - lo) * self.rng.next_f64();
                if self.rng.next_u64() & 1 == 0 {
                    m
                } else {
                    -m
                }
            })
            .collect()
    }

    /// `n` values at least 0.08 apart from each other (a shuffled grid plus small noise), so
    /// maxima are unique with a margin.
    pub fn distinct(&mut self, n: usize) -> Vec<f64> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order.iter().map(|&k| (k as f64 - n as f64 / 2.0) * 0.1 + 0.01 * (self.rng.next_f64() - 0.5)).collect()
    }

    pub fn numel(&self, shape: &[Dim]) -> usize {
        self.concrete(shape).iter().product()
    }

    /// A parameter with the given values.
    pub fn param_values(&mut self, name: &str, shape: Shape, embedding: bool, data: Vec<f64>) -> NodeId {
        let concrete = self.concrete(&shape);
        self.params.insert(name.to_string(), Tensor::new(concrete, data).expect("values fit the shape"));
        self.graph.param(name, shape, Init::Zeros, None, embedding)
    }

    /// A parameter with values uniform in `[-2, 2)`.
    pub fn param(&mut self, name: &str, shape: Shape) -> NodeId {
        let data = self.uniform(self.numel(&shape), -2.0, 2.0);
        self.param_values(name, shape, false, data)
    }

    /// A real-valued input with the given values.
    pub fn input_values(&mut self, name: &str, shape: Shape, data: Vec<f64>) -> NodeId {
        let concrete = self.concrete(&shape);
        self.feeds.insert(name.to_string(), Value::Dense(Tensor::new(concrete, data).expect("values fit the shape")));
        self.graph.input(name, shape, DType::F)
    }

    /// An id input with the given ids.
    pub fn ids_values(&mut self, name: &str, shape: Shape, data: Vec<u32>) -> NodeId {
        let concrete = self.concrete(&shape);
        self.feeds.insert(name.to_string(), Value::Ids(Ids::new(concrete, data).expect("ids fit the shape")));
        self.graph.input(name, shape, DType::I)
    }

    /// An id input with random ids below `limit`.
    pub fn ids(&mut self, name: &str, shape: Shape, limit: u32) -> NodeId {
        let data = (0..self.numel(&shape)).map(|_| (self.rng.next_u64() % limit as u64) as u32).collect();
        self.ids_values(name, shape, data)
    }

    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, ShapeError> {
        self.graph.add(op, inputs, "test")
    }

    /// `loss = sum(y * R)` with a fixed random `R` (an input, so it is not differentiated);
    /// registered as the output `loss`.
    pub fn attach_loss(&mut self, y: NodeId) -> NodeId {
        let shape = self.graph.shape(y).clone();
        let r_data = self.uniform(self.numel(&shape), -1.0, 1.0);
        let r = self.input_values("R", shape.clone(), r_data);
        let prod = self.add(Op::Binary(mdl_runtime::BinaryOp::Mul), &[y, r]).expect("y * R");
        let loss = self
            .add(Op::Reduce { op: ReduceOp::Sum, axes: (0..shape.len()).collect(), keep_dims: false }, &[prod])
            .expect("sum");
        self.graph.outputs.insert("loss".into(), loss);
        loss
    }

    /// The loss with the current parameter values.
    pub fn loss_value(&self, params: &HashMap<String, Tensor<f64>>) -> Result<f64, String> {
        let v = interp::run(&self.graph, &self.binding, &self.feeds, params, &self.mode).map_err(|e| e.to_string())?;
        v.scalar("loss").ok_or_else(|| "no scalar loss".to_string())
    }

    /// The autodiff gradient of `loss` for every parameter (dense; zeros where autodiff
    /// gives no output), and the gradient graph.
    pub fn autodiff_grads(&self, loss: NodeId) -> Result<(Graph, HashMap<String, Tensor<f64>>), String> {
        let names: Vec<String> = self.graph.params.iter().map(|p| p.name.clone()).collect();
        let g = differentiate(&self.graph, loss, &names).map_err(|e| e.to_string())?;
        let values =
            interp::run(&g, &self.binding, &self.feeds, &self.params, &self.mode).map_err(|e| e.to_string())?;
        let mut grads = HashMap::new();
        for name in names {
            let shape = self.params[&name].shape.clone();
            let grad = match values.output(&format!("grad/{name}")) {
                Some(v) => v.to_dense().ok_or_else(|| format!("grad/{name} cannot be densified"))?,
                None => Tensor::zeros(shape.clone()),
            };
            if grad.shape != shape {
                return Err(format!("grad/{name} has shape {:?}, the parameter {:?}", grad.shape, shape));
            }
            grads.insert(name, grad);
        }
        Ok((g, grads))
    }

    /// The central-difference gradient of the loss for one parameter.
    pub fn numeric_grad(&self, name: &str) -> Result<Tensor<f64>, String> {
        let mut params = self.params.clone();
        let n = params[name].numel();
        let mut grad = Tensor::zeros(params[name].shape.clone());
        for j in 0..n {
            let orig = params[name].data[j];
            params.get_mut(name).expect("param").data[j] = orig + H;
            let up = self.loss_value(&params)?;
            params.get_mut(name).expect("param").data[j] = orig - H;
            let down = self.loss_value(&params)?;
            params.get_mut(name).expect("param").data[j] = orig;
            grad.data[j] = (up - down) / (2.0 * H);
        }
        Ok(grad)
    }

    /// Builds `loss = sum(y * R)`, differentiates it for every parameter and compares each
    /// gradient to central finite differences.
    pub fn check(mut self, y: NodeId) -> Result<(), String> {
        let loss = self.attach_loss(y);
        self.check_loss(loss)
    }

    /// Compares every parameter's autodiff gradient of `loss` (the graph's output `loss`)
    /// to central finite differences.
    pub fn check_loss(&self, loss: NodeId) -> Result<(), String> {
        let (_, grads) = self.autodiff_grads(loss)?;
        for (name, analytic) in &grads {
            let numeric = self.numeric_grad(name)?;
            for (j, (a, b)) in analytic.data.iter().zip(&numeric.data).enumerate() {
                if (a - b).abs() > ABS_TOL + REL_TOL * b.abs() || a.is_nan() {
                    return Err(format!(
                        "gradient of `{name}`[{j}] (shape {:?}): autodiff {a}, finite difference {b}\n{}",
                        analytic.shape,
                        self.graph.listing()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A small multi-domain CTR model on `c` (batch bound to 5): an embedding Gather, dropout
/// (training mode), two tanh experts mixed by a Softmax gate, per-domain GroupMatMul towers,
/// and BCE written with softplus: `mean(softplus(z) - label * z)`. Returns the loss node
/// (also the output `loss`).
pub fn model(c: &mut Case) -> NodeId {
    use mdl_runtime::{BinaryOp::*, UnaryOp::*};
    let (batch, fields, vocab, dim, experts, hidden, domains, tower) = (5, 3, 6, 2, 2, 3, 2, 4);
    c.bind("B", batch);
    c.mode = Mode::train(11, 2);
    let b = Dim::batch();
    let d = |n: usize| Dim::from(n);
    let ids = c.ids("ids", vec![b.clone(), d(fields)], vocab as u32);
    let domain = c.ids("domain", vec![b.clone()], domains as u32);
    let labels: Vec<f64> = (0..batch).map(|i| (i % 2) as f64).collect();
    let label = c.input_values("label", vec![b.clone(), d(1)], labels);

    let emb_data = c.uniform(vocab * dim, -1.0, 1.0);
    let emb = c.param_values("emb", dims(&[vocab, dim]), true, emb_data);
    let p = |c: &mut Case, name: &str, shape: &[usize]| {
        let data = c.uniform(shape.iter().product(), -0.8, 0.8);
        c.param_values(name, dims(shape), false, data)
    };
    let w_expert = p(c, "w_expert", &[fields * dim, experts * hidden]);
    let b_expert = p(c, "b_expert", &[experts * hidden]);
    let w_gate = p(c, "w_gate", &[fields * dim, experts]);
    let w_tower = p(c, "w_tower", &[domains, hidden, tower]);
    let w_out = p(c, "w_out", &[domains, 1, tower]);
    let b_out = p(c, "b_out", &[1]);

    let add = |c: &mut Case, op: Op, inputs: &[NodeId]| c.add(op, inputs).expect("model shapes");
    let rows = add(c, Op::Gather, &[emb, ids]);
    let x = add(c, Op::Reshape { shape: vec![b.clone(), d(fields * dim)] }, &[rows]);
    let mask = add(c, Op::DropMask { p: 0.2, stream: 1 }, &[x]);
    let x = add(c, Op::Binary(Mul), &[x, mask]);
    let h = add(c, Op::MatMul { trans_a: false, trans_b: false }, &[x, w_expert]);
    let h = add(c, Op::Binary(Add), &[h, b_expert]);
    let h = add(c, Op::Unary(Tanh), &[h]);
    let h = add(c, Op::Reshape { shape: vec![b.clone(), d(experts), d(hidden)] }, &[h]);
    let gate = add(c, Op::MatMul { trans_a: false, trans_b: false }, &[x, w_gate]);
    let gate = add(c, Op::Softmax { axis: 1 }, &[gate]);
    let gate = add(c, Op::Reshape { shape: vec![b.clone(), d(1), d(experts)] }, &[gate]);
    let mix = add(c, Op::MatMul { trans_a: false, trans_b: false }, &[gate, h]);
    let mix = add(c, Op::Reshape { shape: vec![b.clone(), d(hidden)] }, &[mix]);
    let t = add(c, Op::GroupMatMul { trans_w: false }, &[mix, w_tower, domain]);
    let t = add(c, Op::Unary(Sigmoid), &[t]);
    let z = add(c, Op::GroupMatMul { trans_w: true }, &[t, w_out, domain]);
    let z = add(c, Op::Binary(Add), &[z, b_out]);
    let sp = add(c, Op::Unary(Softplus), &[z]);
    let yz = add(c, Op::Binary(Mul), &[label, z]);
    let per_sample = add(c, Op::Binary(Sub), &[sp, yz]);
    let loss = add(c, Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 1], keep_dims: false }, &[per_sample]);
    c.graph.outputs.insert("loss".into(), loss);
    c.graph.outputs.insert("logit".into(), z);
    loss
}

/// Deterministic values in [lo, hi) (xorshift from `seed`).
pub fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}
