//! Shared helpers for integration tests: compile a shipped spec, bind its symbolic sizes
//! to small numbers, and make random feeds and parameters for the interp backend.
#![allow(dead_code)]

pub mod scoring;
pub mod scratch;

use mdl::diag::{render_all, SourceMap};
use mdl::lower::{compile_file_sized, Compiled, Sizes};
use mdl_runtime::ir::dim::eval_shape;
use mdl_runtime::tensor::{Float, Tensor, Value};
use mdl_runtime::{Binding, DType, Graph};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every model spec shipped in specs/ (the standard library excluded).
pub fn shipped_specs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("specs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mdl") && p.file_name().unwrap() != "std.mdl")
        .collect();
    v.sort();
    v
}

/// Compiles a spec with its sizes symbolic; a spec that needs some of them as numbers
/// (`pairs(count(fields))`) is compiled again with those bound to the small numbers
/// [`small_binding`] gives them.
pub fn compile(path: &Path) -> Compiled {
    let mut map = SourceMap::new();
    let mut sizes = Sizes::default();
    loop {
        match compile_file_sized(&mut map, path, None, &BTreeMap::new(), &sizes) {
            Ok(c) => return c,
            Err(f)
                if !f.needs.is_empty()
                    && (sizes.domains.is_none() || f.needs.iter().any(|s| !sizes.symbols.contains_key(s))) =>
            {
                for sym in f.needs {
                    let v = small_size(&sym, 0) as i64;
                    if sizes.symbols.insert(sym, v).is_some() {
                        // Bound as a column count and still needed: the number of domains
                        // (SDEM's loop over them).
                        sizes.domains = Some(v);
                    }
                }
            }
            Err(f) => panic!("{} does not compile:\n{}", path.display(), render_all(&map, &f.diagnostics)),
        }
    }
}

/// The small number a symbolic size gets in tests: `batch` for `B`, 11 rows per table,
/// 2 to 4 columns per input.
fn small_size(name: &str, batch: usize) -> usize {
    if name == "B" {
        batch
    } else if name.starts_with("rows(") {
        11
    } else {
        2 + name.len() % 3
    }
}

/// Small deterministic sizes for every symbol a graph mentions (in a parameter's, an input's
/// or any node's shape: `one_hot(domain)` is the only mention of `count(domain)` in a spec
/// that has no per-domain parameter).
pub fn small_binding(g: &Graph, batch: usize) -> Binding {
    let mut b = Binding::new();
    let nodes = g.ids().map(|id| &g.node(id).sig.shape);
    let shapes = g.params.iter().map(|p| &p.shape).chain(g.inputs.iter().map(|i| &i.shape)).chain(nodes);
    for s in shapes {
        for d in s {
            for sym in d.symbols() {
                let name = sym.to_string();
                let v = small_size(&name, batch);
                b.entry(name).or_insert(v);
            }
        }
    }
    b
}

/// A tiny deterministic generator (tests only).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn uniform(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Random feeds for every input: ids within their table's rows (or domain count),
/// masks with a random prefix of ones, 0/1 labels, normal values.
pub fn random_feeds<T: Float>(c: &Compiled, binding: &Binding, rng: &mut Lcg) -> HashMap<String, Value<T>> {
    let g = &c.graph;
    let mut feeds = HashMap::new();
    for inp in &g.inputs {
        let shape = eval_shape(&inp.shape, binding).unwrap();
        let n: usize = shape.iter().product();
        let v = match inp.dtype {
            // A vocabulary `sample_ids` draws from: its columns split the ids evenly, and
            // every id has a positive count (1 to 4).
            DType::I if inp.name.starts_with("vocab/") => {
                let (columns, ids) = (n - 1, binding[&format!("rows({})", vocab_space(&inp.name))]);
                Value::Ids(Tensor::new(shape, (0..n).map(|c| (c * ids / columns) as u32).collect()).unwrap())
            }
            // The frequency bins `frequency_bin(x, n)` reads (`vocab/<space>/bins<n>`): every
            // bin from 0 (padding) to `n` (the rarest).
            DType::F if inp.name.starts_with("vocab/") && frequency_bins_of(&inp.name).is_some() => {
                let bins = frequency_bins_of(&inp.name).unwrap() as u64;
                Value::Dense(
                    Tensor::new(shape, (0..n).map(|_| T::from_f64((rng.next() % (bins + 1)) as f64)).collect())
                        .unwrap(),
                )
            }
            DType::F if inp.name.starts_with("vocab/") => Value::Dense(
                Tensor::new(shape, (0..n).map(|_| T::from_f64((1 + rng.next() % 4) as f64)).collect()).unwrap(),
            ),
            DType::I => {
                // The id space: rows(x) of the feature or of the one it shares ids with.
                let f = c.features.iter().find(|f| f.name == inp.name).expect("feature");
                let limit = match &f.kind {
                    // A spec compiled with the number of domains has it in its shapes, not
                    // the symbol: the number `compile` bound.
                    mdl::lower::FeatureKind::Domain => {
                        let sym = format!("count({})", f.name);
                        binding.get(&sym).copied().unwrap_or_else(|| small_size(&sym, 0))
                    }
                    mdl::lower::FeatureKind::Sequence { of: Some(o), .. } => binding[&format!("rows({o})")],
                    _ => binding.get(&format!("rows({})", f.name)).copied().unwrap_or(11),
                };
                Value::Ids(Tensor::new(shape, (0..n).map(|_| (rng.next() % limit as u64) as u32).collect()).unwrap())
            }
            DType::F if inp.name.ends_with("/mask") => {
                let len = *shape.last().unwrap();
                let mut data = Vec::with_capacity(n);
                for _ in 0..n / len {
                    let k = (rng.next() % (len as u64 + 1)) as usize;
                    data.extend((0..len).map(|j| if j < k { T::from_f64(1.0) } else { T::from_f64(0.0) }));
                }
                Value::Dense(Tensor::new(shape, data).unwrap())
            }
            DType::F if inp.name.starts_with("label/") => Value::Dense(
                Tensor::new(shape, (0..n).map(|_| T::from_f64((rng.next() % 2) as f64)).collect()).unwrap(),
            ),
            DType::F => Value::Dense(Tensor::new(shape, (0..n).map(|_| T::from_f64(rng.normal())).collect()).unwrap()),
        };
        feeds.insert(inp.name.clone(), v);
    }
    feeds
}

/// The bin count of a frequency-bins input (`vocab/<space>/bins<n>`).
fn frequency_bins_of(name: &str) -> Option<usize> {
    name.rsplit_once("/bins").and_then(|(_, n)| n.parse().ok())
}

/// The input whose id space a vocabulary input (`vocab/<space>`, `vocab/<space>/starts`) holds.
fn vocab_space(name: &str) -> &str {
    let rest = name.trim_start_matches("vocab/");
    rest.strip_suffix("/starts").unwrap_or(rest)
}

/// Random parameters with a given scale (not the spec's init: large enough that finite
/// differences see every path), and random states: each its initial value plus `scale`
/// times a half-normal draw (a running variance stays positive).
pub fn random_params<T: Float>(g: &Graph, binding: &Binding, scale: f64, rng: &mut Lcg) -> HashMap<String, Tensor<T>> {
    let mut out: HashMap<String, Tensor<T>> = g
        .params
        .iter()
        .map(|p| {
            let shape = eval_shape(&p.shape, binding).unwrap();
            let n: usize = shape.iter().product();
            (p.name.clone(), Tensor::new(shape, (0..n).map(|_| T::from_f64(scale * rng.normal())).collect()).unwrap())
        })
        .collect();
    for st in &g.states {
        let shape = eval_shape(&st.shape, binding).unwrap();
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| T::from_f64(st.initial + scale * rng.normal().abs())).collect();
        out.insert(st.name.clone(), Tensor::new(shape, data).unwrap());
    }
    out
}

/// Every shipped spec's training graph on each of `execs` against interp, at batch 128
/// with random feeds and parameters (scale 0.3): the loss within `loss_tol` relative, and
/// every parameter gradient and every state's next value (running statistics) within
/// 5e-4 relative to its largest entry. `label` names the
/// backend in messages.
pub fn assert_agrees_with_interp_on_every_spec(
    label: &str,
    loss_tol: f32,
    execs: &mut [&mut dyn mdl_runtime::backend::Executor],
) {
    use mdl_runtime::backend::{Executor, Interp};
    use mdl_runtime::exec::Mode;
    for path in shipped_specs() {
        let c = compile(&path);
        let g = mdl::train::build_training_graph(&c).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let binding = small_binding(&g, 128);
        let mut rng = Lcg(5);
        let feeds = random_feeds::<f32>(&c, &binding, &mut rng);
        let params = random_params::<f32>(&g, &binding, 0.3, &mut rng);
        let mode = Mode::train(3, 1);
        let a = Interp.run(&g, &binding, &feeds, &params, &mode).unwrap();
        for other in execs.iter_mut() {
            let b =
                other.run(&g, &binding, &feeds, &params, &mode).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let (la, lb) = (a.scalar("loss").unwrap(), b.scalar("loss").unwrap());
            assert!(
                (la - lb).abs() <= loss_tol * la.abs().max(1.0),
                "{}: loss interp {la} {label} {lb}",
                path.display()
            );
            let grads = c.graph.params.iter().map(|p| format!("grad/{}", p.name));
            let states = g.states.iter().map(|s| mdl_runtime::ir::graph::state_output(&s.name));
            for name in grads.chain(states) {
                let ga = a.output(&name).unwrap().to_dense().unwrap();
                let gb = b.output(&name).unwrap().to_dense().unwrap();
                let scale = ga.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                for (x, y) in ga.data.iter().zip(&gb.data) {
                    assert!(
                        (x - y).abs() <= 5e-4 * scale,
                        "{}: {name}: interp {x} {label} {y} (scale {scale})",
                        path.display()
                    );
                }
            }
        }
    }
}

/// Trains a two-stage model (the first stage freezes the `tower` group, the second resets
/// the optimizer and trains everything) through `run` (which runs `mdl`
/// with the arguments given and checks it succeeded), and checks the checkpoints: after
/// 3 steps (of the first stage's 33, at batch 4096) the frozen tower has exactly its
/// initial values and the rest has moved; 7 steps into the second stage the tower has
/// moved too.
pub fn assert_a_frozen_group_keeps_its_initial_values(dir: &Path, run: impl Fn(&[&str])) {
    let spec = dir.join("staged.mdl");
    std::fs::write(
        &spec,
        "model staged(dim = 8) {\n  input fields : categorical\n  input hist : sequence(50) of fields\n  input tags : sequence(3)\n  input dense : numeric\n  label click\n  let E = embedding(fields, dim)\n  let h = mlp(flatten(E[fields]), [16])\n  group tower {\n    task click = linear(h, 1)\n  }\n  loss bce(click)\n}\n",
    )
    .unwrap();
    let spec_set = format!("spec={}", spec.display());
    let checkpoint = |max_steps: usize| {
        let out = dir.join(format!("out{max_steps}"));
        let steps = format!("train.max_steps={max_steps}");
        run(&[
            "run",
            "experiments/quickstart.yaml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            &spec_set,
            "--set",
            "train.batch_size=4096",
            "--set",
            &steps,
            "--set",
            "train.eval_every=1000",
            "--set",
            "train.stages=[{epochs: 1, freeze: [tower]}, {epochs: 1, reset_optimizer: true}]",
        ]);
        mdl_runtime::checkpoint::load(&out.join("last.ckpt")).unwrap().0
    };
    use mdl_runtime::Init;
    let (first, both) = (checkpoint(3), checkpoint(40));
    let get = |tensors: &[(String, Tensor<f32>)], n: &str| {
        tensors
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("no {n} in {:?}", tensors.iter().map(|t| &t.0).collect::<Vec<_>>()))
            .1
            .clone()
    };
    let init =
        |n: &str, init: Init| mdl_runtime::init::init_tensor::<f32>(n, get(&first, n).shape, &init, 2023).unwrap();
    assert_eq!(get(&first, "click/linear/W"), init("click/linear/W", Init::Glorot), "frozen weight changed");
    assert_eq!(get(&first, "click/linear/b"), init("click/linear/b", Init::Zeros), "frozen bias changed");
    assert_ne!(get(&first, "h/mlp/linear/W"), init("h/mlp/linear/W", Init::Glorot), "a trained weight did not change");
    assert_ne!(
        get(&both, "click/linear/W"),
        init("click/linear/W", Init::Glorot),
        "the second stage did not train the tower"
    );
}

/// For an experiment that declares `train.stages`: the `--set` that gives each of its
/// stages `steps` steps (its other keys kept), so that a short test run trains through
/// every stage, and the number of stages; `None` for an experiment without stages. With
/// `watch_objective`, each stage's early stopping watches its own objective on the valid
/// split (`early_stopping: {metric: loss}`), so that every evaluation writes it to
/// `curve.csv`'s `valid_loss`.
pub fn every_stage_steps(experiment: &Path, steps: u64, watch_objective: bool) -> Option<(String, usize)> {
    let exp = mdl::experiment::load(experiment, &[]).unwrap_or_else(|e| panic!("{}: {e}", experiment.display()));
    if exp.train.stages.is_empty() {
        return None;
    }
    let early_stopping = |s: &mdl::experiment::Stage| match watch_objective {
        true => Some(mdl::experiment::EarlyStopping { metric: "loss".into(), patience: 2 }),
        false => s.early_stopping.clone(),
    };
    let stages: Vec<mdl::experiment::Stage> = exp
        .train
        .stages
        .iter()
        .map(|s| mdl::experiment::Stage {
            steps: Some(steps),
            epochs: None,
            early_stopping: early_stopping(s),
            ..s.clone()
        })
        .collect();
    // JSON is YAML's flow style: `--set` reads it as the list it is.
    Some((format!("train.stages={}", serde_json::to_string(&stages).unwrap()), stages.len()))
}

/// An evenly spaced sample of about `rows` records of the CSV split `split` (gzip when its
/// name ends in `.gz`): its header and every k-th record, written to `out` as plain CSV.
pub fn sample_rows(split: &Path, out: &Path, rows: usize) -> PathBuf {
    use std::io::{BufRead, BufReader, Read};
    let file = std::fs::File::open(split).unwrap_or_else(|e| panic!("{}: {e}", split.display()));
    let reader: Box<dyn Read> = match split.extension().is_some_and(|e| e == "gz") {
        true => Box::new(flate2::read::GzDecoder::new(file)),
        false => Box::new(file),
    };
    let lines: Vec<String> = BufReader::new(reader).lines().map(Result::unwrap).collect();
    let every = (lines.len().saturating_sub(1)).div_ceil(rows.max(1)).max(1);
    let kept: Vec<&str> = lines[..1].iter().chain(lines[1..].iter().step_by(every)).map(String::as_str).collect();
    std::fs::write(out, kept.join("\n") + "\n").unwrap();
    out.to_path_buf()
}
