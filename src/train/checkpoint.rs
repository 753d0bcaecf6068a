//! The run folder's checkpoints: parameters and the model's untrained state (running
//! statistics, under their own names) (and, in `last.ckpt`, the optimizer state)
//! with the loop's position and the run's id as metadata, written atomically and checked
//! against the model when read back (the run id is checked by the caller, against the run
//! folder's manifest).

use super::run::LoopState;
use super::Session;
use mdl_runtime::checkpoint;
use mdl_runtime::optim::Optimizer;
use mdl_runtime::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// A checkpoint's metadata: the run that wrote it and where its loop was.
#[derive(Serialize, Deserialize)]
struct Meta {
    /// Absent in checkpoints of an mdl before run ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_id: Option<String>,
    #[serde(flatten)]
    state: LoopState,
}

/// The name prefix of the optimizer's state tensors in a checkpoint.
const OPT_PREFIX: &str = "optimizer/";

/// Writes parameters (and optionally optimizer state) with loop metadata, atomically.
pub(super) fn save(
    path: &Path,
    params: &HashMap<String, Tensor<f32>>,
    opt: Option<&Optimizer<f32>>,
    state: &LoopState,
    run_id: &str,
) -> Result<(), String> {
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    // Borrowed, not copied: a copy of a large model's parameters and Adam's moments was
    // the run's peak memory whenever it wrote `last.ckpt`.
    let mut tensors: Vec<(String, Cow<'_, Tensor<f32>>)> =
        names.into_iter().map(|n| (n.clone(), Cow::Borrowed(&params[n]))).collect();
    if let Some(o) = opt {
        tensors.extend(o.state_views().into_iter().map(|(n, t)| (format!("{OPT_PREFIX}{n}"), t)));
    }
    let meta = Meta { run_id: Some(run_id.to_string()), state: state.clone() };
    let meta = serde_json::to_string(&meta).map_err(|e| e.to_string())?;
    checkpoint::save(path, &tensors, &meta).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// What a checkpoint holds.
pub(super) struct Loaded {
    pub params: HashMap<String, Tensor<f32>>,
    /// The optimizer's state tensors (none in `best.ckpt`).
    pub optimizer: Vec<(String, Tensor<f32>)>,
    pub state: LoopState,
    /// The run that wrote it (none from an mdl before run ids).
    pub run_id: Option<String>,
}

/// Reads a checkpoint and checks its parameters against the session's model (names and
/// shapes).
pub(super) fn load(path: &Path, session: &Session) -> Result<Loaded, String> {
    decode(path, checkpoint::load(path).map_err(|e| e.to_string())?, session)
}

/// [`load`] of the bytes of the checkpoint at `path`, read by rank 0 of a data-parallel run.
pub(super) fn load_bytes(path: &Path, bytes: &[u8], session: &Session) -> Result<Loaded, String> {
    decode(path, checkpoint::decode(path, bytes).map_err(|e| e.to_string())?, session)
}

/// A checkpoint's contents as the run reads them, checked against the session's model.
fn decode(path: &Path, (tensors, meta): checkpoint::Contents, session: &Session) -> Result<Loaded, String> {
    let Meta { run_id, state } =
        serde_json::from_str(&meta).map_err(|e| format!("{}: bad metadata: {e}", path.display()))?;
    let mut params = HashMap::new();
    let mut optimizer = Vec::new();
    for (n, t) in tensors {
        match n.strip_prefix(OPT_PREFIX) {
            Some(rest) => optimizer.push((rest.to_string(), t)),
            None => {
                params.insert(n, t);
            }
        }
    }
    check_params(session, &params, path)?;
    Ok(Loaded { params, optimizer, state, run_id })
}

/// Checks loaded parameters and states against the model (names and shapes).
fn check_params(session: &Session, params: &HashMap<String, Tensor<f32>>, from: &Path) -> Result<(), String> {
    for p in session.params() {
        let want = mdl_runtime::ir::dim::eval_shape(&p.shape, &session.inputs.sizes)?;
        match params.get(&p.name) {
            Some(t) if t.shape == want => {}
            Some(t) => {
                return Err(format!(
                    "{}: parameter {} has shape {:?}, the model needs {:?}",
                    from.display(),
                    p.name,
                    t.shape,
                    want
                ))
            }
            None => return Err(format!("{}: parameter {} is missing", from.display(), p.name)),
        }
    }
    for st in &session.compiled.graph.states {
        let want = mdl_runtime::ir::dim::eval_shape(&st.shape, &session.inputs.sizes)?;
        match params.get(&st.name) {
            Some(t) if t.shape == want => {}
            Some(t) => {
                return Err(format!(
                    "{}: running statistic {} has shape {:?}, the model needs {:?}",
                    from.display(),
                    st.name,
                    t.shape,
                    want
                ))
            }
            None => {
                return Err(format!(
                    "{}: running statistic {} is missing: the checkpoint was written by a model without it (an mdl before batch statistics were kept as model state); train the run again",
                    from.display(),
                    st.name
                ))
            }
        }
    }
    Ok(())
}
