//! Experiment files: the YAML that says which spec to train on which data, how.
//!
//! An experiment names the spec and overrides of its hyperparameters, the data (split
//! files and the schema that binds CSV columns to the spec's inputs), the optimizer and
//! training schedule (batch size, epochs, clipping, early stopping, evaluation cadence,
//! staged training with frozen parameter groups), the seed, the backend and the output
//! folder. A file may inherit from another with `base: other.yaml` (mappings merge, the
//! child wins; lists are replaced), and `--set key.path=value` overrides any key.
//!
//! Relative paths are resolved against the directory of the file that wrote them, so a
//! base file and its children can live in different folders.

use crate::backends::Backend;
use crate::data::{BadRows, Delimiter, Schema, UnknownDomain};
use crate::lower::Hyper;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod keys;
mod stage;
use keys::Keys;
pub use stage::{GroupCopy, InitFrom};

/// A fully resolved experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// The run's name (default: the file name without extension).
    #[serde(default)]
    pub name: String,
    /// The file this experiment inherits from (already merged in).
    #[serde(default, skip_serializing)]
    pub base: Option<String>,
    /// The `.mdl` spec.
    pub spec: PathBuf,
    /// Which model of the spec file (when it has several).
    #[serde(default)]
    pub model: Option<String>,
    /// Overrides of the spec's hyperparameters.
    #[serde(default)]
    pub hyper: BTreeMap<String, serde_yaml::Value>,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// `jit` (the fast CPU backend, default), `interp` (the reference backend), or, in a
    /// build with the `opencl` feature, `opencl` / `opencl:N` (OpenCL device N).
    #[serde(default)]
    pub backend: Backend,
    /// The run folder (default `runs/<name>`).
    #[serde(default)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A folder holding `train.csv.gz`, `valid.csv.gz`, `test.csv.gz`.
    #[serde(default)]
    pub folder: Option<PathBuf>,
    /// Each split is a file (CSV, CSV.gz or Parquet), a folder of part files, or a glob
    /// pattern of them (`data/train/part-*.csv.gz`), read in sorted order as one table.
    #[serde(default)]
    pub train: Option<PathBuf>,
    #[serde(default)]
    pub valid: Option<PathBuf>,
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// `fail` (default): a malformed row stops with file:line; `skip`: it is skipped and counted.
    #[serde(default)]
    pub bad_rows: BadRowsConfig,
    /// A domain id train never had, in valid, test, `mdl eval` or `mdl predict`: `error`
    /// (default) stops with file:line and the value; a domain id of train encodes the row
    /// as that domain (counted; `mdl predict` reports how many).
    #[serde(default, skip_serializing_if = "UnknownDomain::is_error")]
    pub unknown_domain: UnknownDomain,
    /// The byte between CSV fields: `,` (default), `"\t"` (TSV), `;`, `|`, ...
    #[serde(default, skip_serializing_if = "Delimiter::is_comma")]
    pub delimiter: Delimiter,
    /// Binds columns to the spec's inputs (feature group names = the spec's input names).
    pub schema: Schema,
}

impl DataConfig {
    /// How `mdl run` and `mdl bench` prepare the splits (the cache in its default place).
    pub fn prepare_options(&self) -> crate::data::PrepareOptions {
        crate::data::PrepareOptions {
            bad_rows: self.bad_rows.into(),
            unknown_domain: self.unknown_domain,
            delimiter: self.delimiter,
            ..Default::default()
        }
    }

    /// How `mdl eval` and `mdl predict` encode a file with the run's settings.
    pub fn encode_options(&self) -> crate::data::EncodeOptions {
        crate::data::EncodeOptions {
            bad_rows: self.bad_rows.into(),
            unknown_domain: self.unknown_domain,
            delimiter: self.delimiter,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRowsConfig {
    #[default]
    Fail,
    Skip,
}

impl From<BadRowsConfig> for BadRows {
    fn from(b: BadRowsConfig) -> BadRows {
        match b {
            BadRowsConfig::Fail => BadRows::Fail,
            BadRowsConfig::Skip => BadRows::Skip,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    Adam,
    Adagrad,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerName,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate of embedding tables (default: `lr`).
    #[serde(default)]
    pub embedding_lr: Option<f64>,
    /// L2 penalty on non-embedding parameters.
    #[serde(default)]
    pub l2: f64,
    /// L2 penalty on embedding tables (applied to the rows a batch touched).
    #[serde(default)]
    pub embedding_l2: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Clip the global gradient norm to this value (none by default).
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Evaluate on valid every N steps, or `epoch` (default) at the end of each epoch.
    #[serde(default)]
    pub eval_every: EvalEvery,
    #[serde(default)]
    pub early_stopping: EarlyStopping,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Training stages, in order; without any, one stage trains everything for `epochs`.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Learning rates of some parameter groups (`{backbone: 0.0001}`), in every stage
    /// (a stage's own `group_lr` overrides a group's); every other group trains at `lr`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_lr: BTreeMap<String, f64>,
    /// Start from another run's best parameters, group by group (a warm start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
    /// Stop after this many steps in total (for smoke tests and benchmarks).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Record the gradient norm of every parameter group at every step (`grad_norms.csv`;
    /// see [`crate::analysis::gradients`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_grad_norms: bool,
    /// Record the cosine between two named losses' gradients on one parameter
    /// (`grad_cosine.csv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_cosine: Option<GradCosine>,
    /// Threads of the jit backend (default: the machine's cores). It changes how fast a
    /// run goes, never what it computes, so a run folder's `config.yaml` does not record
    /// it (see [`Experiment::recorded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Arithmetic of the matrix products on the jit while training: `f32` (default) or
    /// `bf16` (operands rounded to bf16, sums in f32, on AMX-BF16's tiles or AVX512-BF16's
    /// dot-product instruction; parameters, optimizer state and every other op stay f32;
    /// scoring a run computes in f32). See [`Experiment::products`].
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// `train.precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

/// The environment variable that names the kernel of `train.precision: bf16`'s products
/// ([`Dot::name`](mdl_runtime::backend::jit::bf16::Dot::name): `amx`, `avx512bf16` or
/// `emulated`) instead of the fastest this CPU has. `emulated` runs them on a CPU with
/// AVX-512F but neither AMX-BF16 nor AVX512-BF16 by the kernel's AVX-512F emulation (the
/// same sums, slower than f32: for checking bf16's accuracy on such a CPU) instead of
/// falling back to f32; the others compare the kernels.
pub const BF16_KERNEL_VAR: &str = "MDL_BF16_KERNEL";

/// The products `precision` gets on `backend`, given the bf16 kernels this CPU can run
/// (`available`, fastest first) and the value of [`BF16_KERNEL_VAR`]; with the line the
/// run shows about them (none for f32). bf16 without AMX-BF16 or AVX512-BF16 falls back
/// to f32 with a notice; a kernel named in the variable that this CPU cannot run is an
/// error.
pub fn choose_products(
    precision: Precision,
    backend: Backend,
    available: &[mdl_runtime::backend::jit::bf16::Dot],
    kernel_var: Option<&str>,
) -> Result<(mdl_runtime::backend::jit::Products, Option<String>), String> {
    use mdl_runtime::backend::jit::{bf16::Dot, Products};
    let named = match kernel_var {
        None => None,
        Some(name) => match Dot::ALL.into_iter().find(|d| d.name() == name) {
            Some(dot) => Some(dot),
            None => {
                let names: Vec<&str> = Dot::ALL.iter().map(|d| d.name()).collect();
                return Err(format!(
                    "{BF16_KERNEL_VAR}={name}: expected one of {} (or leave it unset)",
                    names.join(", ")
                ));
            }
        },
    };
    if precision == Precision::F32 {
        return Ok((Products::F32, None));
    }
    if backend != Backend::Jit {
        let note =
            format!("notice: train.precision: bf16 applies to the jit backend; {backend} computes the products in f32");
        return Ok((Products::F32, Some(note)));
    }
    let dot = match named {
        Some(dot) if available.contains(&dot) => dot,
        Some(dot) => {
            let runs: Vec<&str> = available.iter().map(|d| d.name()).collect();
            return Err(format!(
                "{BF16_KERNEL_VAR}={}: this CPU cannot run the bf16 kernel on {} (it runs: {})",
                dot.name(),
                dot.describe(),
                if runs.is_empty() { "none".to_string() } else { runs.join(", ") }
            ));
        }
        None => match available.iter().find(|&&d| d != Dot::Emulated) {
            Some(&dot) => dot,
            None => {
                let note = "notice: train.precision: bf16 needs a CPU with AMX-BF16 or AVX512-BF16, which this one lacks: the matrix products run in f32";
                return Ok((Products::F32, Some(note.into())));
            }
        },
    };
    let line = match dot {
        Dot::Emulated => format!(
            "matrix products: bf16 operands, f32 sums, emulated on AVX-512F ({BF16_KERNEL_VAR}=emulated; slower than f32)"
        ),
        _ => format!("matrix products: bf16 operands, f32 sums ({})", dot.describe()),
    };
    Ok((Products::Bf16(dot), Some(line)))
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

/// `train.grad_cosine: {losses: [a, b], param: P, every: N}`: every `N` steps (default
/// 1), before the update, the gradient of named loss `a` alone and of `b` alone with
/// respect to parameter `P`, their norms and their cosine (`grad_cosine.csv`). With
/// `paths: [a, b]` instead of `losses`, the two gradients are the whole objective's through
/// the spec's named gradient path `a` alone (`path(x, "a")`; every other named path cut)
/// and through `b` alone. The names are checked against the spec when it is compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradCosine {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub losses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    pub param: String,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub every: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl GradCosine {
    /// What the two gradients are of: `"losses"` or `"paths"`, and the two names.
    pub fn compared(&self) -> (&'static str, &[String]) {
        if self.paths.is_empty() {
            ("losses", &self.losses)
        } else {
            ("paths", &self.paths)
        }
    }

    fn validate(&self) -> Result<(), String> {
        if !self.losses.is_empty() && !self.paths.is_empty() {
            return Err("train.grad_cosine: give either `losses` (two named losses) or `paths` (two named gradient paths), not both".into());
        }
        if self.paths.is_empty() && (self.losses.len() != 2 || self.losses[0] == self.losses[1]) {
            return Err(format!(
                "train.grad_cosine.losses: name two different named losses of the spec (`loss a = ...`), found [{}]",
                self.losses.join(", ")
            ));
        }
        if !self.paths.is_empty() && (self.paths.len() != 2 || self.paths[0] == self.paths[1]) {
            return Err(format!(
                "train.grad_cosine.paths: name two different gradient paths of the spec (`path(x, \"a\")`), found [{}]",
                self.paths.join(", ")
            ));
        }
        if self.every == 0 {
            return Err("train.grad_cosine.every: must be at least 1 step".into());
        }
        Ok(())
    }
}

/// `eval_every`: a number of steps, or `epoch`. Left out it is [`EvalEvery::Epoch`], which
/// the run's config.yaml writes (and reads back) as `null`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalEvery {
    #[default]
    Epoch,
    Steps(u64),
    Word(String),
}

impl EvalEvery {
    /// Steps between evaluations (`None`: at the end of each epoch).
    pub fn steps(&self) -> Result<Option<u64>, String> {
        match self {
            EvalEvery::Epoch => Ok(None),
            EvalEvery::Steps(0) => Err("train.eval_every: must be at least 1 step".into()),
            EvalEvery::Steps(n) => Ok(Some(*n)),
            EvalEvery::Word(w) if w == "epoch" => Ok(None),
            EvalEvery::Word(w) => Err(format!("train.eval_every: expected a number of steps or `epoch`, found `{w}`")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// `auc` (default), `gauc` or `logloss` of the first task on valid; `rmse`, `mae` (or
    /// `rmsle`, with `log = true`) for a regression task; `accuracy`, `logloss`, `hr@k` or `ndcg@k` for a classes or
    /// candidates task (see [`crate::tasks::metric_direction`]); or `loss`, the objective of
    /// the stage under way on valid (for a stage that trains no task, e.g. a pre-training one).
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Evaluations without improvement before stopping (default 2).
    #[serde(default = "default_patience")]
    pub patience: usize,
}

impl Default for EarlyStopping {
    fn default() -> EarlyStopping {
        EarlyStopping { metric: default_metric(), patience: default_patience() }
    }
}

impl EarlyStopping {
    /// Whether larger is better for the metric.
    pub fn maximize(&self) -> Result<bool, String> {
        crate::tasks::metric_direction(&self.metric).ok_or_else(|| {
            format!(
                "train.early_stopping.metric: expected auc, gauc, logloss, rmse, mae, rmsle, accuracy, hr@k, ndcg@k or loss, found `{}`",
                self.metric
            )
        })
    }
}

/// One training stage: its length, which parameter groups it trains or freezes, which
/// named losses it trains on, its learning rate, the data it reads, its early stopping
/// and the parameters copied at its start. `stage.rs` checks it; `train/stages.rs` runs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    #[serde(default)]
    pub name: String,
    /// Its length in epochs (of the rows it reads) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// ... or in steps (a stage that ends mid-epoch ends that epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Parameter groups frozen in this stage (`group name { ... }` in the spec).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// If given, only these groups train (everything else is frozen).
    #[serde(default)]
    pub train_only: Option<Vec<String>>,
    /// Start the stage with fresh optimizer state.
    #[serde(default)]
    pub reset_optimizer: bool,
    /// The named losses (`loss name = e`) the stage trains on; all of the spec's losses
    /// when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub losses: Option<Vec<String>>,
    /// The stage's learning rate (`train.lr` when left out); `train.embedding_lr` is scaled
    /// by the same factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Learning rates of some parameter groups in this stage (`{backbone: 0.0001}`), over
    /// `train.group_lr`'s; every other group trains at the stage's `lr`. A group's tables
    /// get `train.embedding_lr` scaled by the same factor.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_lr: BTreeMap<String, f64>,
    /// The stage's own early stopping (`train.early_stopping` when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    /// Train only on the rows of these domain ids (all rows when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<u32>>,
    /// Parameter copies made when the stage starts, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy: Vec<GroupCopy>,
}

fn default_optimizer() -> OptimizerName {
    OptimizerName::Adam
}
fn default_lr() -> f64 {
    1e-3
}
fn default_batch() -> usize {
    4096
}
fn default_epochs() -> usize {
    1
}
fn default_seed() -> u64 {
    2023
}
fn default_metric() -> String {
    "auc".into()
}
fn default_patience() -> usize {
    2
}

/// Keys whose values are paths, resolved against the writing file's directory.
const PATH_KEYS: &[&[&str]] = &[
    &["spec"],
    &["out"],
    &["data", "folder"],
    &["data", "train"],
    &["data", "valid"],
    &["data", "test"],
    &["train", "init_from", "run"],
];

/// Reads an experiment, merging its bases and applying `--set` overrides.
pub fn load(path: &Path, set: &[String]) -> Result<Experiment, String> {
    let mut merged = load_merged(path, 0)?;
    for s in set {
        let Some((key, value)) = s.split_once('=') else {
            return Err(format!("--set {s}: expected KEY=VALUE (e.g. train.lr=0.01)"));
        };
        let v: Value = serde_yaml::from_str(value).map_err(|e| format!("--set {s}: {e}"))?;
        let keys: Vec<&str> = key.trim().split('.').collect();
        let v = if PATH_KEYS.contains(&keys.as_slice()) {
            match v {
                Value::String(p) => Value::String(absolutize(&std::env::current_dir().unwrap_or_default(), &p)),
                other => other,
            }
        } else {
            v
        };
        set_path(&mut merged, &keys, v).map_err(|e| format!("--set {s}: {e}"))?;
    }
    // Errors found after merging name the overrides too: the value at fault may have come
    // from the command line (`--set`, or `--backend`, which is `--set backend=...`).
    let source = if set.is_empty() {
        path.display().to_string()
    } else {
        format!("{} with --set {}", path.display(), set.join(" --set "))
    };
    // The keys again after merging: `--set` may have added some.
    experiment_keys().check_value(&merged).map_err(|e| format!("{source}: {e}"))?;
    // A value of the wrong kind is named by its key path (`data.unknown_domain: invalid
    // value ...`): the merged value has no line numbers to point at.
    let mut exp: Experiment = serde_path_to_error::deserialize(merged).map_err(|e| format!("{source}: {e}"))?;
    if exp.name.is_empty() {
        exp.name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    }
    exp.validate().map_err(|e| format!("{source}: {e}"))?;
    Ok(exp)
}

fn load_merged(path: &Path, depth: usize) -> Result<Value, String> {
    if depth > 16 {
        return Err(format!("{}: `base` chain is longer than 16 files (a cycle?)", path.display()));
    }
    let text = crate::files::read_text(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_nesting(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut v: Value = serde_yaml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), yaml_error(&e)))?;
    if !v.is_mapping() {
        return Err(format!("{}: an experiment must be a mapping of keys (spec:, data:, train:, ...)", path.display()));
    }
    // A typed pass over this file alone finds misspelt keys with their line numbers
    // before merging blurs which file said what.
    check_keys(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = std::path::absolute(path).ok().and_then(|p| p.parent().map(|d| d.to_path_buf())).unwrap_or_default();
    for keys in PATH_KEYS {
        if let Some(Value::String(p)) = get_path(&v, keys) {
            let abs = absolutize(&dir, p);
            set_path(&mut v, keys, Value::String(abs)).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let base = match get_path(&v, &["base"]) {
        Some(Value::String(b)) => Some(dir.join(b)),
        Some(_) => return Err(format!("{}: `base` must be a file name", path.display())),
        None => None,
    };
    match base {
        Some(b) => {
            let mut merged = load_merged(&b, depth + 1)?;
            merge(&mut merged, v);
            Ok(merged)
        }
        None => Ok(v),
    }
}

/// The keys an experiment may hold, from its structs ([`Keys::of`]).
fn experiment_keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::of::<Experiment>().expect("an experiment is a struct that refuses unknown keys"))
}

/// Checks that every key of a single file is known, reporting the line of the first bad one.
fn check_keys(text: &str) -> Result<(), String> {
    experiment_keys().check(serde_yaml::Deserializer::from_str(text)).map_err(|e| yaml_error(&e))
}

/// The deepest nesting of YAML collections an experiment may have (its own keys nest 4 deep).
const MAX_NESTING: usize = 32;

/// Refuses a file whose flow collections (`[...]`, `{...}`) or indented blocks nest deeper
/// than [`MAX_NESTING`], before the YAML parser (whose time grows with the square of the
/// depth) sees it. Quoted strings and comments are skipped; the count may only err high
/// on exotic YAML (a `[` inside a plain scalar), which no experiment needs.
fn check_nesting(text: &str) -> Result<(), String> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (number, line) in text.lines().enumerate() {
        let body = line.trim_start_matches([' ', '-']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if flow == 0 {
            let indent = line.len() - body.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut quote = None;
        for c in body.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            if indents.len() + flow > MAX_NESTING {
                return Err(format!(
                    "line {}: collections nest more than {MAX_NESTING} deep (an experiment needs a few levels)",
                    number + 1
                ));
            }
        }
    }
    Ok(())
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => {
            let msg = e.to_string();
            // serde_yaml ends its messages with "at line L column C"; say it once, first.
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            format!("line {} column {}: {msg}", l.line(), l.column())
        }
        None => e.to_string(),
    }
}

fn absolutize(dir: &Path, p: &str) -> String {
    let path = Path::new(p);
    if path.is_absolute() {
        p.to_string()
    } else {
        dir.join(path).display().to_string()
    }
}

fn get_path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for k in keys {
        cur = cur.as_mapping()?.get(Value::String(k.to_string()))?;
    }
    Some(cur)
}

fn set_path(v: &mut Value, keys: &[&str], new: Value) -> Result<(), String> {
    let Some((last, parents)) = keys.split_last() else {
        return Err("empty key".into());
    };
    let mut cur = v;
    for k in parents {
        let m = cur.as_mapping_mut().ok_or_else(|| format!("`{k}` is not inside a mapping"))?;
        cur = m.entry(Value::String(k.to_string())).or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    let m = cur.as_mapping_mut().ok_or_else(|| format!("cannot set `{last}`: its parent is not a mapping"))?;
    m.insert(Value::String(last.to_string()), new);
    Ok(())
}

/// Deep merge: mappings merge recursively, anything else in `over` replaces `base`.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

impl Experiment {
    /// The settings' values: each error names its key (the caller adds the file).
    fn validate(&self) -> Result<(), String> {
        check_run_name(&self.name)?;
        let t = &self.train;
        if t.batch_size == 0 {
            return Err("train.batch_size: must be at least 1".into());
        }
        positive("train.lr", t.lr)?;
        if let Some(lr) = t.embedding_lr {
            positive("train.embedding_lr", lr)?;
        }
        not_negative("train.l2", t.l2)?;
        not_negative("train.embedding_l2", t.embedding_l2)?;
        if let Some(c) = t.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!(
                    "train.clip_norm: must be a positive number, found {c} (to clip nothing, leave the key out or set it to null)"
                ));
            }
        }
        if t.epochs == 0 {
            return Err("train.epochs: must be at least 1, found 0 (a run of no epochs trains nothing)".into());
        }
        if t.epochs > MAX_EPOCHS {
            return Err(format!("train.epochs: must be at most {MAX_EPOCHS}, found {}", t.epochs));
        }
        if t.max_steps == Some(0) {
            return Err("train.max_steps: must be at least 1, found 0 (leave the key out to train every epoch)".into());
        }
        for (group, &lr) in &t.group_lr {
            positive(&format!("train.group_lr.{group}"), lr)?;
        }
        for (i, stage) in t.stages.iter().enumerate() {
            stage.validate(&format!("train.stages[{i}]"))?;
        }
        if let Some(init) = &t.init_from {
            init.validate()?;
        }
        if let Some(n) = t.threads {
            check_threads("train.threads", n)?;
        }
        if let Some(c) = &t.grad_cosine {
            c.validate()?;
        }
        t.eval_every.steps()?;
        t.early_stopping.maximize()?;
        self.hyper_overrides()?;
        self.data.schema.validate().map_err(|e| e.to_string())?;
        self.split_paths()?;
        Ok(())
    }

    /// The three split files.
    pub fn split_paths(&self) -> Result<crate::data::SplitPaths, String> {
        let d = &self.data;
        if let Some(folder) = &d.folder {
            let mut p = crate::data::SplitPaths::in_folder(folder);
            if let Some(t) = &d.train {
                p.train = t.clone();
            }
            if let Some(v) = &d.valid {
                p.valid = v.clone();
            }
            if let Some(t) = &d.test {
                p.test = t.clone();
            }
            return Ok(p);
        }
        match (&d.train, &d.valid, &d.test) {
            (Some(train), Some(valid), Some(test)) => {
                Ok(crate::data::SplitPaths { train: train.clone(), valid: valid.clone(), test: test.clone() })
            }
            _ => Err("data: give `folder` (with train/valid/test.csv.gz) or all of `train`, `valid` and `test`".into()),
        }
    }

    /// The three splits, each checked to be a file, a folder of part files or a pattern
    /// matching some: a missing one is an error naming the key it came from (`data.train`,
    /// or `data.folder` for a file the folder implies), before any data is read. [`Self::split_paths`] alone checks nothing on disk, so
    /// that `mdl eval` and `mdl predict` read a run's config without its data.
    pub fn split_files(&self) -> Result<crate::data::SplitPaths, String> {
        let paths = self.split_paths()?;
        let d = &self.data;
        for (split, given, path) in
            [("train", &d.train, &paths.train), ("valid", &d.valid, &paths.valid), ("test", &d.test, &paths.test)]
        {
            let key = if given.is_some() { format!("data.{split}") } else { "data.folder".to_string() };
            if path.is_dir() || !path.exists() && crate::data::source::is_pattern(path) {
                crate::data::parts(path).map_err(|e| format!("{key}: the {split} split {e}"))?;
            } else if !path.is_file() {
                let why = if path.exists() { "is not a file" } else { "does not exist" };
                return Err(format!("{key}: the {split} split {} {why}", path.display()));
            }
        }
        Ok(paths)
    }

    /// The stages (one stage of `train.epochs` training everything when none are given).
    pub fn stages(&self) -> Vec<Stage> {
        if self.train.stages.is_empty() {
            vec![Stage { name: "train".into(), epochs: Some(self.train.epochs), ..Stage::default() }]
        } else {
            self.train.stages.clone()
        }
    }

    /// Hyperparameter overrides as compiler values.
    pub fn hyper_overrides(&self) -> Result<BTreeMap<String, Hyper>, String> {
        self.hyper
            .iter()
            .map(|(k, v)| yaml_to_hyper(v).map(|h| (k.clone(), h)).map_err(|e| format!("hyper.{k}: {e}")))
            .collect()
    }

    /// The executor of this experiment's backend, on `train.threads` threads, its products
    /// as [`Experiment::products`] chooses.
    pub fn executor(&self) -> Result<Box<dyn mdl_runtime::backend::Executor>, String> {
        self.backend.executor_with(self.train.threads, self.products()?.0)
    }

    /// The products `train.precision` gets on this CPU and backend ([`choose_products`]),
    /// with the line a run shows about them.
    pub fn products(&self) -> Result<(mdl_runtime::backend::jit::Products, Option<String>), String> {
        use mdl_runtime::backend::jit::bf16::Dot;
        let var = std::env::var(BF16_KERNEL_VAR).ok();
        let available: Vec<Dot> = Dot::ALL.into_iter().filter(|d| d.available()).collect();
        choose_products(self.train.precision, self.backend, &available, var.as_deref())
    }

    /// The experiment as a run folder records it (`config.yaml`, whose hash `--resume`
    /// compares): without the settings that change only the speed (`train.threads`).
    pub fn recorded(&self) -> Experiment {
        let mut exp = self.clone();
        exp.train.threads = None;
        exp
    }

    /// The run folder.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }
}

/// The most epochs a run (or a stage) may have: more would never end.
pub(crate) const MAX_EPOCHS: usize = 1_000_000;

/// The most threads a run may ask for: more is a typo, not a machine.
pub const MAX_THREADS: usize = 4096;

/// `--threads N` on the command line: 1 to [`MAX_THREADS`].
pub fn parse_threads(text: &str) -> Result<usize, String> {
    let n = text.trim().parse::<usize>().map_err(|_| format!("expected a number of threads, found `{text}`"))?;
    check_threads("--threads", n)?;
    Ok(n)
}

/// A thread count (of `key`: `train.threads`, `--threads`): 1 to [`MAX_THREADS`].
pub fn check_threads(key: &str, n: usize) -> Result<(), String> {
    if n == 0 {
        return Err(format!(
            "{key}: must be at least 1, found 0 (leave it out to use the machine's {} cores)",
            mdl_runtime::backend::jit::default_threads()
        ));
    }
    if n > MAX_THREADS {
        return Err(format!("{key}: must be at most {MAX_THREADS}, found {n}"));
    }
    Ok(())
}

/// A number a setting takes that must be finite and above 0.
pub(crate) fn positive(key: &str, x: f64) -> Result<(), String> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(format!("{key}: must be a positive number, found {x}"))
    }
}

/// A number a setting takes that must be finite and at least 0.
fn not_negative(key: &str, x: f64) -> Result<(), String> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(format!("{key}: must be a number of at least 0, found {x}"))
    }
}

/// A run's name becomes one folder under `runs/`: a single path component, so that no name
/// writes elsewhere (`../../x`, `/tmp/x`).
fn check_run_name(name: &str) -> Result<(), String> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(part)), None) if part == name && !name.contains(['/', '\\']) => Ok(()),
        _ => Err(format!("name: must be a single folder name (no `/`, not `.` or `..`), found `{name}`")),
    }
}

/// A YAML value as a hyperparameter (of `hyper:` here, of `--set` in `mdl check` and
/// `mdl graph`).
pub fn yaml_to_hyper(v: &Value) -> Result<Hyper, String> {
    Ok(match v {
        Value::Bool(b) => Hyper::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Hyper::Int(i),
            (None, Some(x)) if x.is_finite() => Hyper::Float(x),
            _ => return Err(format!("must be a finite number, found {n}")),
        },
        Value::String(s) => Hyper::Str(s.clone()),
        Value::Sequence(items) => Hyper::List(items.iter().map(yaml_to_hyper).collect::<Result<Vec<_>, _>>()?),
        _ => return Err("must be a number, string, boolean or list".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdl_runtime::backend::jit::{bf16::Dot, Products};

    /// Every case of `train.precision` against what the CPU has: bf16 on the fastest
    /// instruction there is, the emulation only when asked, a named kernel or an error, f32
    /// with a notice otherwise and off the jit.
    #[test]
    fn bf16_precision_gets_the_instruction_or_f32_with_a_notice() {
        let choose = |p, backend, dots: &[Dot], var| choose_products(p, backend, dots, var).unwrap();
        let (all, vector, emulated) = (&Dot::ALL[..], &[Dot::Avx512Bf16, Dot::Emulated][..], &[Dot::Emulated][..]);
        for dots in [&[][..], emulated, vector, all] {
            assert_eq!(choose(Precision::F32, Backend::Jit, dots, None), (Products::F32, None));
        }
        let (products, line) = choose(Precision::Bf16, Backend::Jit, all, None);
        assert_eq!(products, Products::Bf16(Dot::Amx));
        assert_eq!(line.unwrap(), "matrix products: bf16 operands, f32 sums (AMX-BF16 tiles, tdpbf16ps)");
        let (products, line) = choose(Precision::Bf16, Backend::Jit, vector, None);
        assert_eq!(products, Products::Bf16(Dot::Avx512Bf16));
        assert_eq!(line.unwrap(), "matrix products: bf16 operands, f32 sums (AVX512-BF16 vdpbf16ps)");
        assert_eq!(choose(Precision::Bf16, Backend::Jit, all, Some("avx512bf16")).0, Products::Bf16(Dot::Avx512Bf16));
        let lacks = "notice: train.precision: bf16 needs a CPU with AMX-BF16 or AVX512-BF16, which this one lacks: the matrix products run in f32";
        for dots in [&[][..], emulated] {
            assert_eq!(choose(Precision::Bf16, Backend::Jit, dots, None), (Products::F32, Some(lacks.into())));
        }
        let (products, line) = choose(Precision::Bf16, Backend::Jit, emulated, Some("emulated"));
        assert_eq!(products, Products::Bf16(Dot::Emulated));
        assert!(line.unwrap().contains("emulated on AVX-512F (MDL_BF16_KERNEL=emulated"));
        assert_eq!(
            choose_products(Precision::Bf16, Backend::Jit, vector, Some("amx")).unwrap_err(),
            "MDL_BF16_KERNEL=amx: this CPU cannot run the bf16 kernel on AMX-BF16 tiles, tdpbf16ps (it runs: avx512bf16, emulated)"
        );
        assert!(choose_products(Precision::Bf16, Backend::Jit, &[], Some("emulated"))
            .unwrap_err()
            .ends_with("(it runs: none)"));
        let (products, line) = choose(Precision::Bf16, Backend::Interp, all, None);
        assert_eq!(products, Products::F32);
        assert_eq!(
            line.unwrap(),
            "notice: train.precision: bf16 applies to the jit backend; interp computes the products in f32"
        );
        assert_eq!(
            choose_products(Precision::F32, Backend::Jit, &[], Some("on")).unwrap_err(),
            "MDL_BF16_KERNEL=on: expected one of amx, avx512bf16, emulated (or leave it unset)"
        );
    }
}
