//! `mdl export`: a trained run's model out of mdl, as a standard ONNX model or its
//! parameters as safetensors.
//!
//! - `--format onnx`: the evaluation graph of the run's spec copy with its best parameters
//!   inside, rendered by the runtime's ONNX renderer (`mdl_runtime::onnx`). Its inputs are
//!   the encoded features as `mdl` feeds them (ids as int64, normalised numbers and
//!   sequence masks as float32, the domain id); its outputs are one probability `[B]` per
//!   task, named after the task. Beside it, `<name>.features.json` holds the run's
//!   vocabularies and normalisers (`mdl-features/1`, or `/2` with hashed ids,
//!   [`crate::data::serving`]), so that a
//!   serving system can turn raw CSV values into those inputs; docs/serving.md documents
//!   both.
//! - `--format safetensors`: every parameter and running statistic (model state) by its
//!   name, float32, with the tasks in the header's metadata.
//!
//! Both files appear only once complete ([`crate::files::write_atomic`]).

use crate::data::serving::{format_of, FeatureEncoding, GroupEncoding};
use crate::files::write_atomic;
use crate::lower::{logit_output, FeatureKind};
use crate::tasks::TaskKind;
use crate::train::folder::Trust;
use crate::train::{open_run, LoadedRun};
use mdl_runtime::onnx::ModelInfo;
use mdl_runtime::{BinaryOp, Op, UnaryOp};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The formats `mdl export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Onnx,
    Safetensors,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(text: &str) -> Result<Format, String> {
        match text {
            "onnx" => Ok(Format::Onnx),
            "safetensors" => Ok(Format::Safetensors),
            _ => Err(format!("expected `onnx` or `safetensors`, found `{text}`")),
        }
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    /// The files, the model first.
    pub files: Vec<PathBuf>,
    /// The model's inputs (ONNX) or its parameters (safetensors).
    pub names: Vec<String>,
}

/// The file beside an ONNX model that holds its feature encoding: `model.onnx` →
/// `model.features.json`.
pub fn features_path(model: &Path) -> PathBuf {
    model.with_extension("features.json")
}

/// Exports the run in `run` (see the module doc); `force` reads a run folder whose files do
/// not match its manifest, saying so.
pub fn export(run: &Path, format: Format, out: &Path, force: bool) -> Result<Exported, String> {
    let loaded = open_run(run, Trust { force })?;
    match format {
        Format::Onnx => onnx(&loaded, out),
        Format::Safetensors => safetensors(&loaded, out),
    }
}

fn onnx(run: &LoadedRun, out: &Path) -> Result<Exported, String> {
    let session = &run.session;
    let tasks = &session.compiled.tasks;
    // The evaluation graph, its outputs the tasks' scores: a binary task's probability, a
    // regression task's prediction (`exp(z) - 1` for one declared with `log = true`).
    if let Some((space, bins)) = session.compiled.frequency_bins.first() {
        return Err(format!(
            "the model reads the frequency bins of `{space}`'s ids (`frequency_bin(.., {bins})`), which the \
             exported features do not carry: ONNX export writes models whose inputs are the encoded features only"
        ));
    }
    let mut graph = session.eval_graph.clone();
    let mut outputs = std::collections::BTreeMap::new();
    for (task, kind) in tasks.iter().zip(&session.compiled.task_kinds) {
        let logit =
            *graph.outputs.get(&logit_output(task)).ok_or_else(|| format!("no logit output for task {task}"))?;
        let add = |graph: &mut mdl_runtime::Graph, op: Op, inputs: &[mdl_runtime::NodeId]| {
            graph.add(op, inputs, task).map_err(|e| e.to_string())
        };
        let score = match kind {
            TaskKind::Binary => add(&mut graph, Op::Unary(UnaryOp::Sigmoid), &[logit])?,
            TaskKind::Regression { log: false } => logit,
            TaskKind::Regression { log: true } => {
                let e = add(&mut graph, Op::Unary(UnaryOp::Exp), &[logit])?;
                let one = add(&mut graph, Op::Scalar(1.0), &[])?;
                add(&mut graph, Op::Binary(BinaryOp::Sub), &[e, one])?
            }
            TaskKind::Classes { .. } | TaskKind::Candidates { .. } => {
                return Err(format!(
                    "task `{task}` is a {} task: ONNX export writes one score per task and row, and the arg-max \
                     class of a row of logits is not rendered; export a run whose tasks are binary or regression",
                    kind.describe()
                ))
            }
        };
        outputs.insert(task.clone(), score);
    }
    graph.outputs = outputs;
    let info = ModelInfo {
        producer: ("mdl".into(), env!("CARGO_PKG_VERSION").into()),
        doc: format!(
            "{} (spec {}): one score per task (a probability, or a regression's prediction); the inputs are encoded as {} describes",
            run.experiment.name,
            run.experiment.spec.display(),
            file_name(&features_path(out))
        ),
        metadata: vec![("tasks".into(), tasks.join(","))],
    };
    let model = mdl_runtime::onnx::render(&graph, &session.inputs.sizes, &run.params, &info)
        .map_err(|e| format!("{}: {e}", run.experiment.spec.display()))?;
    let inputs = model.input_names();
    let domain_input =
        session.compiled.features.iter().find(|f| f.kind == FeatureKind::Domain).map(|f| f.name.as_str());
    let encoded_inputs: Vec<GroupEncoding> = run
        .fitted
        .feature_encoding(domain_input, run.experiment.data.unknown_domain)
        .into_iter()
        .filter(|g| inputs.iter().any(|i| i == g.input()))
        .map(|mut g| {
            // A model that reads a sequence's ids but not its mask takes no mask input.
            if let GroupEncoding::Sequence { mask, .. } = &mut g {
                mask.take_if(|m| !inputs.contains(m));
            }
            g
        })
        .collect();
    let encoding = FeatureEncoding {
        format: format_of(&encoded_inputs),
        model: file_name(out),
        tasks: tasks.clone(),
        oov: crate::data::OOV,
        pad: crate::data::PAD,
        inputs: encoded_inputs,
    };
    let json = serde_json::to_vec_pretty(&encoding).map_err(|e| e.to_string())?;
    let features = features_path(out);
    write_atomic(out, &model.to_bytes())?;
    write_atomic(&features, &json)?;
    Ok(Exported { files: vec![out.to_path_buf(), features], names: inputs })
}

fn safetensors(run: &LoadedRun, out: &Path) -> Result<Exported, String> {
    // The parameters and the running statistics (model state) by name.
    let states = run.session.compiled.graph.states.iter().map(|s| s.name.clone());
    let mut names: Vec<String> = run.session.params().iter().map(|p| p.name.clone()).chain(states).collect();
    names.sort();
    let bytes: HashMap<&str, Vec<u8>> = names
        .iter()
        .map(|name| {
            let t = &run.params[name];
            (name.as_str(), t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let mut views = Vec::with_capacity(names.len());
    for name in &names {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            run.params[name].shape.clone(),
            &bytes[name.as_str()],
        )
        .map_err(|e| format!("parameter `{name}`: {e}"))?;
        views.push((name.as_str(), view));
    }
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("tasks".to_string(), run.session.compiled.tasks.join(",")),
    ]);
    let data = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
    write_atomic(out, &data)?;
    Ok(Exported { files: vec![out.to_path_buf()], names })
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
