//! `mdl analyze RUN_DIR`: measures of a finished run that read its learned parameters and
//! its model's intermediate values, written to `analysis.json` in the run folder (atomically)
//! and printed as text. This module owns the measures and their computation:
//!
//! - **Embedding tables** (every parameter declared by `embedding`, so every set of a
//!   multi-embedding model): the singular spectrum σ_k/σ_1 and the information abundance
//!   IA = Σ_k σ_k / σ_1 (between 1 and the table's width; a table collapsed onto one
//!   direction has IA 1), of the rows that training changed (rows never seen keep their
//!   initial values and would inflate IA), against the same rows of the table as the run
//!   initialised it (its initialiser and seed). A table of a categorical input is also
//!   measured per column (field). Singular values come from nalgebra's SVD.
//! - **Probes** (`probe(x, "name")` in the spec, see docs/language.md): the values on the
//!   test split, averaged over the samples (and over the axes after the second) per entry of
//!   axis 1, overall and per domain. A probe whose values are distributions over axis 1 (a
//!   softmax gate: non-negative, summing to 1) is a gate: its mean weights sum to 1, and it
//!   reports the entropy of the mean weights (utilisation: ln K when every expert is used
//!   alike, 0 when one takes all) and the mean entropy of a sample's weights (how sharply a
//!   sample picks its experts).
//!
//! Measures with a module of their own:
//! - [`attention`]: the model's learned correlation (the mean of an attention probe per
//!   behaviour category and position, against the `--mi` map) and the retrieval NDCG of its
//!   order against the MI relevance (`--attention PROBE`), on the test split.
//! - [`clusters`]: the discriminability of a probed representation (`--clusters PROBE`):
//!   k-means clusters of its per-sample vectors on the test split against the label.
//! - [`correlation`]: the mutual information between behaviours of each category at each
//!   target-relative position and the label (`--mi SEQ`), from the train split.
//! - [`entanglement`]: the interest-entanglement distance test between two single-task
//!   runs and this one (`--against A --against B --pair USER:ITEM`).
//! - [`gradients`]: gradient norms per parameter group and the cosine between two named
//!   losses' gradients on a shared parameter, recorded while the run trains
//!   (`grad_norms.csv`, `grad_cosine.csv`) and summarised here.
//! - [`interaction`]: the sub-embedding IA matrix of a cross layer over a table's fields
//!   (`--interaction TABLE:PARAM`, DCNv2's first cross layer).

pub mod attention;
pub mod clusters;
pub mod correlation;
pub mod entanglement;
pub mod gradients;
pub mod interaction;

use crate::lower::{rows_sym, PROBE_PREFIX};
use crate::train::{build_probe_graph, open_run, LoadedRun};
use mdl_runtime::exec::Mode;
use mdl_runtime::tensor::Tensor;
use mdl_runtime::Dim;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// How far a gate's weights of one sample may sum from 1.
const GATE_TOLERANCE: f64 = 1e-3;

/// The singular values of the row-major `rows × cols` matrix `data`, largest first.
pub fn singular_values(rows: usize, cols: usize, data: &[f32]) -> Vec<f64> {
    assert_eq!(data.len(), rows * cols, "a {rows} x {cols} matrix");
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let m = nalgebra::DMatrix::<f64>::from_row_iterator(rows, cols, data.iter().map(|&x| x as f64));
    let mut sv: Vec<f64> = m.singular_values().iter().copied().collect();
    sv.sort_by(|a, b| b.total_cmp(a));
    sv
}

/// Information abundance Σσ/σ₁ of singular values sorted largest first; `None` for a zero
/// matrix.
pub fn information_abundance(sv: &[f64]) -> Option<f64> {
    let top = *sv.first()?;
    (top > 0.0).then(|| sv.iter().sum::<f64>() / top)
}

/// The spectrum and IA of one matrix.
#[derive(Clone, Debug, Serialize)]
pub struct Spectrum {
    /// Information abundance Σσ/σ₁ (none for a zero matrix).
    pub ia: Option<f64>,
    /// σ_k/σ_1, largest first.
    pub normalized: Vec<f64>,
}

impl Spectrum {
    pub fn of(rows: usize, cols: usize, data: &[f32]) -> Spectrum {
        let sv = singular_values(rows, cols, data);
        let top = sv.first().copied().unwrap_or(0.0);
        let normalized = if top > 0.0 { sv.iter().map(|s| s / top).collect() } else { vec![0.0; sv.len()] };
        Spectrum { ia: information_abundance(&sv), normalized }
    }
}

/// The IA of one column's rows of a table.
#[derive(Clone, Debug, Serialize)]
pub struct FieldIa {
    pub column: String,
    /// Rows of the column's vocabulary, and those training changed.
    pub rows: usize,
    pub trained_rows: usize,
    pub ia: Option<f64>,
    pub ia_init: Option<f64>,
}

/// The measures of one embedding table.
#[derive(Clone, Debug, Serialize)]
pub struct TableAnalysis {
    pub table: String,
    /// The categorical input whose ids index it, when there is one.
    pub input: Option<String>,
    pub rows: usize,
    pub dim: usize,
    /// Rows whose values training changed (the rows measured).
    pub trained_rows: usize,
    pub learned: Spectrum,
    /// The same rows as initialised.
    pub init: Spectrum,
    /// Per column of a categorical input's table.
    pub fields: Vec<FieldIa>,
}

/// Mean values of a probe over a set of samples.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStats {
    pub rows: u64,
    /// The mean of each entry of axis 1 (one value for a probe `[B]`).
    pub mean: Vec<f64>,
    /// For a gate: the entropy (nats) of the mean weights, and the mean entropy of one
    /// sample's weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_entropy: Option<f64>,
}

/// The measures of one probe on the test split.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeAnalysis {
    pub name: String,
    /// The shape of one sample's value.
    pub shape: Vec<usize>,
    /// Whether every value is a distribution over axis 1 (a gate).
    pub gate: bool,
    /// ln K, the entropy of K experts used alike (for a gate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_entropy: Option<f64>,
    pub overall: ProbeStats,
    /// Per domain id (as in metrics.json), for a run with domains.
    pub per_domain: BTreeMap<u32, ProbeStats>,
}

/// `analysis.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub model: String,
    pub embeddings: Vec<TableAnalysis>,
    /// The split the probes were read on, and its rows.
    pub split: String,
    pub split_rows: usize,
    pub probes: Vec<ProbeAnalysis>,
    /// What the run recorded of its gradients (`train.record_grad_norms`,
    /// `train.grad_cosine`), in short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradients: Option<gradients::GradientSummary>,
    /// The feature–target correlation of a behaviour sequence (`--mi`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_information: Option<correlation::MiAnalysis>,
    /// The learned correlation and retrieval NDCG of an attention probe (`--attention`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<attention::AttentionAnalysis>,
    /// The discriminability of a probed representation (`--clusters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusters: Option<clusters::ClusterAnalysis>,
    /// The entanglement distance test against two single-task runs (`--against`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entanglement: Option<entanglement::Entanglement>,
    /// The sub-embedding IA matrix of a cross layer (`--interaction`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<interaction::InteractionAnalysis>,
}

/// What `mdl analyze` measures: its command-line options (their doc comments are its
/// `--help`), one declaration for the command and for callers of [`analyze`].
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Options {
    /// Only this embedding table (a parameter name; repeatable)
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// Only this probe (repeatable)
    #[arg(long = "probe")]
    pub probes: Vec<String>,
    /// Read a run folder whose files do not match its manifest, saying so
    #[arg(long)]
    pub force: bool,
    /// The jit's threads (default: every core)
    #[arg(long, value_parser = crate::experiment::parse_threads)]
    pub threads: Option<usize>,
    /// The mutual-information heat maps (category x target-relative position) of this
    /// sequence input, whose ids share a categorical column's vocabulary: `SEQ` or
    /// `SEQ:COLUMN`
    #[arg(long)]
    pub mi: Option<String>,
    /// With --mi SEQ: a probe of the model's attention over SEQ (one value per position):
    /// its mean per behaviour category and position against the MI maps, and the
    /// retrieval NDCG of its order
    #[arg(long)]
    pub attention: Option<String>,
    /// With --attention: a probe of the norm of the target-aware representation ‖r‖ at each
    /// position; the learned map is then the card's exp(z)·‖r‖ (the attention probe's cell
    /// means z-scored, softmaxed over the map, times the cell means of ‖r‖)
    #[arg(long, value_name = "PROBE")]
    pub attention_norm: Option<String>,
    /// The discriminability of a probed representation: k-means clusters of its
    /// per-sample vectors on the test split against the first task's label (MI, NMI)
    #[arg(long)]
    pub clusters: Option<String>,
    /// The entanglement distance test: two single-task runs A and B (give twice), tested
    /// on the same file as RUN
    #[arg(long)]
    pub against: Vec<std::path::PathBuf>,
    /// With --against: the user and item columns whose embedding distance it compares
    #[arg(long)]
    pub pair: Option<String>,
    /// The sub-embedding IA matrix `TABLE:PARAM`: the table's fields through a cross
    /// layer's weight PARAM [N·K, N·K] whose input starts with them (DCNv2's first layer)
    #[arg(long)]
    pub interaction: Option<String>,
}

/// Analyses the run in `run`, writes `analysis.json` there and returns the analysis.
pub fn analyze(run: &Path, opts: &Options) -> Result<Analysis, String> {
    if !run.join("metrics.json").exists() {
        return Err(format!("{}: not a finished run folder (no metrics.json)", run.display()));
    }
    let loaded = open_run(run, crate::train::folder::Trust { force: opts.force })?;
    // Every name is checked before anything is computed.
    let graph = build_probe_graph(&loaded.session.compiled);
    let names: Vec<String> =
        graph.outputs.keys().filter_map(|n| n.strip_prefix(PROBE_PREFIX)).map(str::to_string).collect();
    for name in &opts.probes {
        if !names.contains(name) {
            return Err(unknown("probe", name, &names));
        }
    }
    let chosen: Vec<String> =
        names.iter().filter(|n| opts.probes.is_empty() || opts.probes.contains(n)).cloned().collect();
    if let Some(name) = &opts.attention {
        if opts.mi.is_none() {
            return Err(format!(
                "--attention {name}: needs --mi SEQ, the sequence whose behaviours the probe weights (their categories and positions)"
            ));
        }
        if !names.contains(name) {
            return Err(format!("--attention: {}", unknown("probe", name, &names)));
        }
    }
    if let Some(name) = &opts.attention_norm {
        if opts.attention.is_none() {
            return Err(format!(
                "--attention-norm {name}: needs --attention PROBE (and --mi SEQ), the attention whose learned map it weights"
            ));
        }
        if !names.contains(name) {
            return Err(format!("--attention-norm: {}", unknown("probe", name, &names)));
        }
    }
    if let Some(name) = &opts.clusters {
        if !names.contains(name) {
            return Err(format!("--clusters: {}", unknown("probe", name, &names)));
        }
    }
    let pair = match (opts.against.len(), &opts.pair) {
        (0, None) => None,
        (2, Some(p)) => Some(entanglement::parse_pair(p)?),
        (0, Some(_)) => return Err("--pair: needs --against A --against B (two single-task runs)".into()),
        (2, None) => return Err("--against: needs --pair USER:ITEM (the columns whose distances to compare)".into()),
        (n, _) => return Err(format!("--against: needs two single-task runs (--against A --against B), found {n}")),
    };
    let mi_request = opts.mi.as_deref().map(correlation::MiRequest::parse);
    if let Some(req) = &mi_request {
        correlation::place(&loaded.fitted.layout(), req)?;
    }
    let interaction = match &opts.interaction {
        Some(spec) => Some(interaction_matrix(&loaded, spec)?),
        None => None,
    };
    let entanglement = match &pair {
        Some((user, item)) => Some(entangle(run, &loaded, &opts.against, user, item, opts.force)?),
        None => None,
    };
    let embeddings = embedding_tables(&loaded, &opts.tables)?;
    let norms = read_recorded(run, "grad_norms.csv")?;
    let cosine = read_recorded(run, "grad_cosine.csv")?;
    let gradients =
        gradients::summarize(norms.as_deref(), cosine.as_deref()).map_err(|e| format!("{}/{e}", run.display()))?;
    let measured = match &mi_request {
        Some(req) => Some(correlation::measure(&loaded, req)?),
        None => None,
    };
    let positions = measured.as_ref().map_or(0, |m| m.analysis.positions);
    let mut attention_sums = opts.attention.as_ref().map(|_| attention::AttentionSums::new(positions));
    let follow = match (&opts.attention, &measured, attention_sums.as_mut()) {
        (Some(name), Some(m), Some(sums)) => {
            Some(Follow { probe: name, norm: opts.attention_norm.as_deref(), truth: m, sums })
        }
        _ => None,
    };
    let mut collected = opts.clusters.as_deref().map(|name| Collect { probe: name, ..Collect::default() });
    let (split_rows, probes) = probes(&loaded, &graph, &chosen, follow, collected.as_mut(), opts.threads)?;
    let task = loaded.fitted.layout().tasks.first().cloned().unwrap_or_default();
    let clusters = collected.map(|c| {
        let dim = c.values.len() / c.labels.len().max(1);
        clusters::measure(c.probe, &task, &c.values, dim, &c.labels, loaded.experiment.train.seed)
    });
    let attention = match (&opts.attention, &measured, &attention_sums) {
        (Some(name), Some(m), Some(sums)) => {
            let mut a =
                attention::finish(name, split_rows, sums, m, |id| correlation::category_name(&loaded, &m.place, id));
            a.norm_probe = opts.attention_norm.clone();
            Some(a)
        }
        _ => None,
    };
    let mutual_information = measured.map(|m| m.analysis);
    let model = loaded.session.compiled.model.clone();
    let analysis = Analysis {
        model,
        embeddings,
        split: "test".into(),
        split_rows,
        probes,
        gradients,
        mutual_information,
        attention,
        clusters,
        entanglement,
        interaction,
    };
    let json = serde_json::to_string_pretty(&analysis).map_err(|e| e.to_string())?;
    crate::files::write_atomic(&run.join("analysis.json"), json.as_bytes())?;
    Ok(analysis)
}

/// The entanglement test of `loaded` (the run in `run`) against the single-task runs
/// `against` (A, B): the pairs far under A's first table and near under B's, placed in every
/// table of the three runs that holds both columns.
fn entangle(
    run: &Path,
    loaded: &LoadedRun,
    against: &[std::path::PathBuf],
    user: &str,
    item: &str,
    force: bool,
) -> Result<entanglement::Entanglement, String> {
    let own_test = entanglement::test_file(loaded)?;
    let mut runs = Vec::new();
    for folder in against {
        if !folder.join("metrics.json").exists() {
            return Err(format!("--against: {}: not a finished run folder (no metrics.json)", folder.display()));
        }
        let other = open_run(folder, crate::train::folder::Trust { force })?;
        let test = entanglement::test_file(&other)?;
        if test != own_test {
            return Err(format!(
                "--against: {} was tested on {}, {} on {}: the test compares the same rows",
                folder.display(),
                test.display(),
                run.display(),
                own_test.display()
            ));
        }
        runs.push((folder.clone(), entanglement::distances(&other, folder, user, item)?));
    }
    runs.push((run.to_path_buf(), entanglement::distances(loaded, run, user, item)?));
    let (a, b) = (&runs[0].1[0], &runs[1].1[0]);
    let rows = a.1.len();
    if runs.iter().any(|(_, tables)| tables.iter().any(|(_, d)| d.len() != rows)) {
        return Err("--against: the runs read different numbers of test rows".into());
    }
    let selected = entanglement::contradictory(&a.1, &b.1);
    let mut tables = Vec::new();
    for (folder, list) in &runs {
        for (table, d) in list {
            tables.push(entanglement::place(&folder.display().to_string(), table, d, &selected, &a.1, &b.1));
        }
    }
    Ok(entanglement::Entanglement {
        user: user.to_string(),
        item: item.to_string(),
        a: format!("{} {}", runs[0].0.display(), a.0),
        b: format!("{} {}", runs[1].0.display(), b.0),
        split: "test".into(),
        rows,
        selected: selected.len(),
        tables,
    })
}

/// A text file of the run folder `run`, checked against its manifest; `None` when absent.
pub fn read_recorded(run: &Path, name: &str) -> Result<Option<String>, String> {
    let path = run.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::train::folder::check_recorded(run, name, &bytes)?;
    String::from_utf8(bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

/// An error for a name not among `known` (`what`: "embedding table", "probe").
pub(crate) fn unknown(what: &str, name: &str, known: &[String]) -> String {
    let hint = match crate::diag::suggest(name, known.iter().map(|s| s.as_str())) {
        Some(near) => format!("; did you mean `{near}`?"),
        None => String::new(),
    };
    let list = if known.is_empty() { "it has none".to_string() } else { format!("it has: {}", known.join(", ")) };
    format!("the model has no {what} `{name}`{hint} ({list})")
}

/// `--interaction TABLE:PARAM`: the table's fields through the cross layer weight.
fn interaction_matrix(run: &LoadedRun, spec: &str) -> Result<interaction::InteractionAnalysis, String> {
    let Some((table, param)) = spec.split_once(':') else {
        return Err(format!(
            "--interaction: expected TABLE:PARAM (an embedding table and a cross layer's weight), found `{spec}`"
        ));
    };
    let session = &run.session;
    let tables: Vec<String> = session.params().iter().filter(|p| p.embedding).map(|p| p.name.clone()).collect();
    if !tables.iter().any(|t| t == table) {
        return Err(format!("--interaction: {}", unknown("embedding table", table, &tables)));
    }
    let all: Vec<String> = session.params().iter().map(|p| p.name.clone()).collect();
    if !all.iter().any(|t| t == param) {
        return Err(format!("--interaction: {}", unknown("parameter", param, &all)));
    }
    let learned = run.params.get(table).ok_or_else(|| format!("the checkpoint lacks table {table}"))?;
    let w = run.params.get(param).ok_or_else(|| format!("the checkpoint lacks parameter {param}"))?;
    let init = session.initial_tensors(run.experiment.train.seed)?;
    let init = init.get(table).ok_or_else(|| format!("no initial value of table {table}"))?;
    let dim = *learned.shape.last().unwrap_or(&1);
    let trained = trained_rows(learned, init, dim);
    let info = session.params().iter().find(|p| p.name == table).expect("a listed table");
    let layout = run.fitted.layout();
    let Some(g) = layout.categorical.iter().find(|g| info.shape.first() == Some(&Dim::sym(&rows_sym(&g.name)))) else {
        return Err(format!(
            "--interaction: table `{table}` is not indexed by a categorical input, so it has no fields"
        ));
    };
    let fields: Vec<(String, Vec<usize>)> =
        g.columns.iter().enumerate().map(|(c, column)| (column.clone(), field_rows(g, c, &trained))).collect();
    interaction::measure(table, param, learned, w, &fields)
}

/// The rows of a `[rows, dim]` table whose values differ from its initial ones.
fn trained_rows(learned: &Tensor<f32>, init: &Tensor<f32>, dim: usize) -> Vec<usize> {
    let rows = learned.data.len() / dim.max(1);
    (0..rows).filter(|&r| learned.data[r * dim..(r + 1) * dim] != init.data[r * dim..(r + 1) * dim]).collect()
}

/// The rows among `trained` of column `c` of a categorical input.
fn field_rows(g: &crate::data::CategoricalLayout, c: usize, trained: &[usize]) -> Vec<usize> {
    let start = g.offsets[c] as usize;
    let end = start + g.vocab_sizes[c];
    trained.iter().copied().filter(|&r| r >= start && r < end).collect()
}

fn embedding_tables(run: &LoadedRun, only: &[String]) -> Result<Vec<TableAnalysis>, String> {
    let session = &run.session;
    let tables: Vec<&mdl_runtime::ParamInfo> = session.params().iter().filter(|p| p.embedding).collect();
    let names: Vec<String> = tables.iter().map(|p| p.name.clone()).collect();
    for name in only {
        if !names.contains(name) {
            return Err(unknown("embedding table", name, &names));
        }
    }
    let initial = session.initial_tensors(run.experiment.train.seed)?;
    let layout = run.fitted.layout();
    let mut out = Vec::new();
    for p in tables {
        if !only.is_empty() && !only.contains(&p.name) {
            continue;
        }
        let learned = run.params.get(&p.name).ok_or_else(|| format!("the checkpoint lacks table {}", p.name))?;
        let init = initial.get(&p.name).ok_or_else(|| format!("no initial value of table {}", p.name))?;
        let dim = *learned.shape.last().unwrap_or(&1);
        let rows = learned.data.len() / dim.max(1);
        let trained = trained_rows(learned, init, dim);
        let group = layout.categorical.iter().find(|g| p.shape.first() == Some(&Dim::sym(&rows_sym(&g.name))));
        let mut fields = Vec::new();
        if let Some(g) = group {
            for (c, column) in g.columns.iter().enumerate() {
                let in_field = field_rows(g, c, &trained);
                fields.push(FieldIa {
                    column: column.clone(),
                    rows: g.vocab_sizes[c],
                    trained_rows: in_field.len(),
                    ia: rows_spectrum(learned, &in_field, dim).ia,
                    ia_init: rows_spectrum(init, &in_field, dim).ia,
                });
            }
        }
        out.push(TableAnalysis {
            table: p.name.clone(),
            input: group.map(|g| g.name.clone()),
            rows,
            dim,
            trained_rows: trained.len(),
            learned: rows_spectrum(learned, &trained, dim),
            init: rows_spectrum(init, &trained, dim),
            fields,
        });
    }
    Ok(out)
}

/// The rows `rows` of a table `[.., dim]`, row-major.
fn rows_of(t: &Tensor<f32>, rows: &[usize], dim: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(rows.len() * dim);
    for &r in rows {
        data.extend_from_slice(&t.data[r * dim..(r + 1) * dim]);
    }
    data
}

/// The spectrum of the rows `rows` of a table `[.., dim]`.
fn rows_spectrum(t: &Tensor<f32>, rows: &[usize], dim: usize) -> Spectrum {
    Spectrum::of(rows.len(), dim, &rows_of(t, rows, dim))
}

/// Running sums of a probe over a set of samples.
#[derive(Clone, Debug, Default)]
struct Sums {
    rows: u64,
    /// Cells averaged per entry of axis 1 (samples × the product of the axes after it).
    cells: u64,
    sum: Vec<f64>,
    entropy: f64,
}

impl Sums {
    fn stats(&self, gate: bool) -> ProbeStats {
        let mean: Vec<f64> = self.sum.iter().map(|s| s / self.cells.max(1) as f64).collect();
        let (entropy, sample_entropy) =
            if gate { (Some(entropy(&mean)), Some(self.entropy / self.cells.max(1) as f64)) } else { (None, None) };
        ProbeStats { rows: self.rows, mean, entropy, sample_entropy }
    }
}

/// Entropy (nats) of a distribution; zero weights add nothing.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>()
}

/// A probe's sums while the split is read.
struct ProbeSums {
    name: String,
    shape: Vec<usize>,
    gate: bool,
    overall: Sums,
    per_domain: BTreeMap<u32, Sums>,
}

impl ProbeSums {
    /// Adds a batch's values `[rows, k, rest...]` (rows of domains `domain`, or none).
    fn add(&mut self, value: &Tensor<f32>, domain: Option<&[u32]>) {
        let rows = value.shape.first().copied().unwrap_or(0);
        let k = value.shape.get(1).copied().unwrap_or(1);
        let rest: usize = value.shape.iter().skip(2).product();
        if self.shape.is_empty() {
            self.shape = value.shape[1..].to_vec();
        }
        for r in 0..rows {
            let sample = &value.data[r * k * rest..(r + 1) * k * rest];
            let mut sum = vec![0.0f64; k];
            let mut ent = 0.0;
            for j in 0..rest {
                let mut total = 0.0;
                for (i, s) in sum.iter_mut().enumerate() {
                    let v = sample[i * rest + j] as f64;
                    *s += v;
                    total += v;
                    if v < 0.0 {
                        self.gate = false;
                    } else if v > 0.0 {
                        ent -= v * v.ln();
                    }
                }
                if k < 2 || (total - 1.0).abs() > GATE_TOLERANCE {
                    self.gate = false;
                }
            }
            let targets = std::iter::once(&mut self.overall);
            let by_domain = domain.map(|d| self.per_domain.entry(d[r]).or_default());
            for acc in targets.chain(by_domain) {
                if acc.sum.is_empty() {
                    acc.sum = vec![0.0; k];
                }
                acc.rows += 1;
                acc.cells += rest as u64;
                for (a, s) in acc.sum.iter_mut().zip(&sum) {
                    *a += s;
                }
                acc.entropy += ent;
            }
        }
    }

    fn finish(self) -> ProbeAnalysis {
        let gate = self.gate;
        let k = self.shape.first().copied().unwrap_or(1);
        ProbeAnalysis {
            name: self.name,
            shape: self.shape,
            gate,
            max_entropy: gate.then(|| (k as f64).ln()),
            overall: self.overall.stats(gate),
            per_domain: self.per_domain.iter().map(|(&d, s)| (d, s.stats(gate))).collect(),
        }
    }
}

/// An attention probe followed on the split, with the ground truth it is measured against.
struct Follow<'a> {
    probe: &'a str,
    /// `--attention-norm`: the probe of ‖r‖ at each slot, followed beside it.
    norm: Option<&'a str>,
    truth: &'a correlation::MiMeasured,
    sums: &'a mut attention::AttentionSums,
}

/// A probe's values kept sample by sample, with the first task's label of each sample.
#[derive(Default)]
struct Collect<'a> {
    probe: &'a str,
    values: Vec<f32>,
    labels: Vec<usize>,
}

/// The values of the probes `chosen` of `graph` (the run's [`build_probe_graph`]) on the
/// test split: its rows and each probe's measures. `follow`'s probe, when given, is added
/// to its sums sample by sample with the sample's target category and behaviours;
/// `collect`'s probe is kept whole.
fn probes(
    run: &LoadedRun,
    graph: &mdl_runtime::Graph,
    chosen: &[String],
    mut follow: Option<Follow>,
    mut collect: Option<&mut Collect>,
    threads: Option<usize>,
) -> Result<(usize, Vec<ProbeAnalysis>), String> {
    let session = &run.session;
    if chosen.is_empty() && follow.is_none() && collect.is_none() {
        return Ok((0, Vec::new()));
    }
    let exp = &run.experiment;
    let test = exp.split_files()?.test;
    let ds = run.fitted.encode_file_stored(&test, exp.data.encode_options()).map_err(|e| e.to_string())?;
    let mut exec = exp.backend.executor_on(threads)?;
    let mut sums: Vec<ProbeSums> = chosen
        .iter()
        .map(|n| ProbeSums {
            name: n.to_string(),
            shape: Vec::new(),
            gate: true,
            overall: Sums::default(),
            per_domain: BTreeMap::new(),
        })
        .collect();
    let mut batch = ds.new_batch();
    let mut start = 0;
    while start < ds.rows {
        let end = (start + exp.train.batch_size).min(ds.rows);
        ds.gather_range(start..end, &mut batch).map_err(|e| e.to_string())?;
        let feeds = session.inputs.feeds(&batch);
        let binding = session.inputs.with_batch(batch.rows);
        let out = exec.run(graph, &binding, &feeds, &run.params, &Mode::eval()).map_err(|e| e.to_string())?;
        let value = |name: &str| {
            out.dense(&format!("{PROBE_PREFIX}{name}")).ok_or_else(|| format!("probe {name} gave no dense value"))
        };
        let domain = (!ds.domain.is_empty()).then(|| &ds.domain[start..end]);
        for s in &mut sums {
            s.add(value(&s.name)?, domain);
        }
        if let Some(f) = follow.as_mut() {
            let norm = f.norm.map(value).transpose()?;
            follow_batch(f, value(f.probe)?, norm, &batch)?;
        }
        if let Some(c) = collect.as_mut() {
            c.values.extend_from_slice(&value(c.probe)?.data);
            let tasks = (batch.labels.len() / batch.rows.max(1)).max(1);
            c.labels.extend((0..batch.rows).map(|r| usize::from(batch.labels[r * tasks] > 0.5)));
        }
        start = end;
    }
    Ok((ds.rows, sums.into_iter().map(ProbeSums::finish).collect()))
}

/// Adds a batch's values of an attention probe (and of its ‖r‖ probe), one per slot of the
/// followed sequence.
fn follow_batch(
    f: &mut Follow,
    value: &Tensor<f32>,
    norm: Option<&Tensor<f32>>,
    batch: &crate::data::Batch,
) -> Result<(), String> {
    let at = &f.truth.place;
    let one_per_slot = |option: &str, probe: &str, t: &Tensor<f32>| {
        let per_sample = t.data.len() / batch.rows.max(1);
        if per_sample != at.max_len || t.shape.first() != Some(&batch.rows) {
            return Err(format!(
                "{option}: probe `{probe}` has {} values per sample (shape {:?} per sample), not one per position of sequence `{}` ({})",
                per_sample,
                t.shape.get(1..).unwrap_or(&[]),
                f.truth.analysis.sequence,
                at.max_len
            ));
        }
        Ok(())
    };
    one_per_slot("--attention", f.probe, value)?;
    if let (Some(t), Some(probe)) = (norm, f.norm) {
        one_per_slot("--attention-norm", probe, t)?;
    }
    let (cat, seq) = (&batch.cat[at.target_group], &batch.seq_ids[at.sequence_group]);
    let n = at.max_len;
    for r in 0..batch.rows {
        let target = cat[r * at.target_columns + at.target_column];
        let from = (r * at.sequence_columns + at.sequence_column) * n;
        let values = &value.data[r * n..(r + 1) * n];
        let norms = norm.map(|t| &t.data[r * n..(r + 1) * n]);
        f.sums.add(&f.truth.counts, target, &seq[from..from + n], values, norms);
    }
    Ok(())
}

fn num(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.2}"))
}

/// The analysis as text: a block per table, per probe.
pub fn render(a: &Analysis) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model {}", a.model);
    if !a.embeddings.is_empty() {
        let _ = writeln!(
            s,
            "\nembedding tables: information abundance IA = Σσ/σ₁ of the rows training changed (init: the same rows as initialised)"
        );
    }
    for t in &a.embeddings {
        let _ = writeln!(
            s,
            "  {} [{} x {}]: {} rows trained, IA {} (init {}), max {}",
            t.table,
            t.rows,
            t.dim,
            t.trained_rows,
            num(t.learned.ia),
            num(t.init.ia),
            t.dim
        );
        let spectrum: Vec<String> = t.learned.normalized.iter().map(|x| format!("{x:.3}")).collect();
        let _ = writeln!(s, "    σk/σ1: {}", spectrum.join(" "));
        let init: Vec<String> = t.init.normalized.iter().map(|x| format!("{x:.3}")).collect();
        let _ = writeln!(s, "    init:  {}", init.join(" "));
        if !t.fields.is_empty() {
            let fields: Vec<String> = t
                .fields
                .iter()
                .filter(|f| f.trained_rows > 0)
                .map(|f| format!("{} {} ({})", f.column, num(f.ia), num(f.ia_init)))
                .collect();
            let _ = writeln!(s, "    per field, IA (init): {}", fields.join(", "));
        }
    }
    if !a.probes.is_empty() {
        let _ = writeln!(s, "\nprobes on the {} split ({} rows): mean per entry of axis 1", a.split, a.split_rows);
    }
    for p in &a.probes {
        let kind = if p.gate { "gate" } else { "values" };
        let _ = writeln!(s, "  {} {:?} ({kind})", p.name, p.shape);
        let line = |label: &str, st: &ProbeStats| {
            let mean: Vec<String> = st.mean.iter().map(|x| format!("{x:.3}")).collect();
            let mut l = format!("    {label:<10} {:>7} rows: {}", st.rows, mean.join(" "));
            if let (Some(e), Some(se), Some(max)) = (st.entropy, st.sample_entropy, p.max_entropy) {
                let _ = write!(l, "; entropy {e:.3} of {max:.3} nats, per sample {se:.3}");
            }
            l
        };
        let _ = writeln!(s, "{}", line("all", &p.overall));
        for (d, st) in &p.per_domain {
            let _ = writeln!(s, "{}", line(&format!("domain {d}"), st));
        }
    }
    if let Some(g) = &a.gradients {
        render_gradients(&mut s, g);
    }
    if let Some(m) = &a.mutual_information {
        render_mi(&mut s, m);
    }
    if let Some(att) = &a.attention {
        render_attention(&mut s, att);
    }
    if let Some(e) = &a.entanglement {
        render_entanglement(&mut s, e);
    }
    if let Some(m) = &a.interaction {
        render_interaction(&mut s, m);
    }
    if let Some(c) = &a.clusters {
        let _ = writeln!(
            s,
            "\ndiscriminability of probe `{}` ({} values per sample, {} split, {} rows): k-means clusters Q against `{}` (H(Y) = {:.4} nats)",
            c.probe, c.dim, c.split, c.rows, c.task, c.label_entropy
        );
        let _ = writeln!(s, "  {:>6} {:>10} {:>8}", "k", "MI (nats)", "NMI");
        for q in &c.clusterings {
            let _ = writeln!(s, "  {:>6} {:>10.5} {:>8}", q.k, q.mi, q.nmi.map_or("–".into(), |x| format!("{x:.5}")));
        }
    }
    s
}

/// The sub-embedding IA matrix as text: a row per field, with its own IA and row sum.
fn render_interaction(s: &mut String, m: &interaction::InteractionAnalysis) {
    let _ = writeln!(
        s,
        "\nsub-embedding IA of `{}` through `{}` ({} fields of width {}, {} output blocks): IA(E_i W_i→j) per output block j; IA(E_i), Σ_j",
        m.table,
        m.param,
        m.fields.len(),
        m.dim,
        m.blocks
    );
    for (i, field) in m.fields.iter().enumerate() {
        let cells: Vec<String> = m.ia[i].iter().map(|v| num(*v)).collect();
        let _ = writeln!(s, "  {field:<24} IA {} Σ {:.1}: {}", num(m.field_ia[i]), m.row_sums[i], cells.join(" "));
    }
    let sums: Vec<String> = m.column_sums.iter().map(|v| format!("{v:.1}")).collect();
    let _ = writeln!(s, "  Σ_i per output block: {}", sums.join(" "));
    let total: f64 = m.block_norms.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    let diagonal: f64 = m.block_norms.iter().enumerate().map(|(i, r)| r[i] * r[i]).sum::<f64>().sqrt();
    let _ = writeln!(
        s,
        "  ‖W_i→j‖_F of its {0} × {0} blocks (in analysis.json): ‖W‖_F {total:.3}, of it the diagonal blocks i = j {diagonal:.3}",
        m.blocks
    );
    for (i, field) in m.fields.iter().enumerate() {
        let cells: Vec<String> = m.block_norms[i].iter().map(|v| format!("{v:.2}")).collect();
        let _ = writeln!(s, "  {field:<24} ‖W‖_F: {}", cells.join(" "));
    }
}

/// The entanglement test as text: a line per table.
fn render_entanglement(s: &mut String, e: &entanglement::Entanglement) {
    let _ = writeln!(
        s,
        "\nentanglement: {} of {} {} pairs ({}, {}) are in the top 40 % of distances under A ({}) and the bottom 40 % under B ({})",
        e.selected, e.split, e.rows, e.user, e.item, e.a, e.b
    );
    let _ = writeln!(
        s,
        "  their mean percentile (0 nearest, 1 farthest) and count per tenth under each table; rank correlation of its distances with A's, B's"
    );
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.3}"));
    for t in &e.tables {
        let tenths: Vec<String> = t.tenths.iter().map(u64::to_string).collect();
        let _ = writeln!(
            s,
            "  {} {}: {} [{}]; {} {}",
            t.run,
            t.table,
            opt(t.mean_percentile),
            tenths.join(" "),
            opt(t.rank_correlation_a),
            opt(t.rank_correlation_b)
        );
    }
}

/// The learned maps and retrieval NDCG as text.
fn render_attention(s: &mut String, a: &attention::AttentionAnalysis) {
    let what = match &a.norm_probe {
        Some(norm) => {
            format!("exp(z)·‖r‖ (z: probe `{}` z-scored and softmaxed over the map, ‖r‖: probe `{norm}`)", a.probe)
        }
        None => format!("mean of probe `{}`", a.probe),
    };
    let _ = writeln!(
        s,
        "
learned correlation: {what} per behaviour category and position of `{}` ({} split, {} rows), per target category",
        a.sequence, a.split, a.rows
    );
    for map in &a.maps {
        let rho = map.rank_correlation.map_or("–".to_string(), |r| format!("{r:.3}"));
        let _ =
            writeln!(s, "  target {} ({} samples): rank correlation with the MI map {rho}", map.target, map.samples);
        let positions = map.mean.first().map_or(0, Vec::len);
        let header: String = (1..=positions).map(|p| format!(" {p:>7}")).collect();
        let _ = writeln!(s, "    {:<20}{header}", "category \\ position");
        for (c, row) in map.categories.iter().zip(map.weighted.as_ref().unwrap_or(&map.mean)) {
            let cells: String =
                row.iter().map(|v| v.map_or(format!(" {:>7}", "–"), |v| format!(" {v:>7.4}"))).collect();
            let _ = writeln!(s, "    {c:<20}{cells}");
        }
    }
    let r = &a.retrieval;
    let row = |v: &[f64]| v.iter().map(|x| format!(" {x:>6.4}")).collect::<String>();
    let ks: String = r.ks.iter().map(|k| format!(" {:>6}", format!("@{k}"))).collect();
    let _ = writeln!(
        s,
        "
retrieval NDCG of the behaviours ranked by `{}` against their MI relevance ({} samples; {} without a relevant behaviour left out)
  {:<8}{ks}
  {:<8}{}
  {:<8}{}",
        a.probe,
        r.samples,
        r.left_out,
        "k",
        "model",
        row(&r.model),
        "recency",
        row(&r.recency)
    );
}

/// The heat maps as text: a row per behaviour category, MI (bits) per position.
fn render_mi(s: &mut String, m: &correlation::MiAnalysis) {
    let _ = writeln!(
        s,
        "\nmutual information (bits) between a behaviour of a category at a position of `{}` ({}) and `{}`, per target category of {} ({} split, {} rows; position 1 = most recent)",
        m.sequence, m.column, m.task, m.target, m.split, m.rows
    );
    for map in &m.maps {
        let _ = writeln!(s, "  target {} ({} samples, {} positive)", map.target, map.samples, map.positives);
        let header: String = (1..=m.positions).map(|p| format!(" {p:>7}")).collect();
        let _ = writeln!(s, "    {:<20}{header}", "category \\ position");
        for (c, row) in map.categories.iter().zip(&map.mi) {
            let cells: String = row.iter().map(|v| format!(" {v:>7.5}")).collect();
            let _ = writeln!(s, "    {c:<20}{cells}");
        }
    }
}

/// The gradient summary as text.
fn render_gradients(s: &mut String, g: &gradients::GradientSummary) {
    if !g.groups.is_empty() {
        let steps = g.groups[0].steps;
        let _ = writeln!(
            s,
            "\ngradient norms per parameter group over {steps} steps (grad_norms.csv): mean, first, last, max"
        );
        for n in &g.groups {
            let _ = writeln!(s, "  {:<24} {:.4e} {:.4e} {:.4e} {:.4e}", n.group, n.mean, n.first, n.last, n.max);
        }
    }
    if let Some(c) = &g.cosine {
        let _ = writeln!(
            s,
            "\ngradients {} `{}` and `{}` on {} over {} steps (grad_cosine.csv): mean norms {:.4e} and {:.4e} (ratio {}), mean cosine {}, negative in {} of {} steps",
            if c.of == "paths" { "of the objective through paths" } else { "of losses" },
            c.a,
            c.b,
            c.param,
            c.steps,
            c.mean_norm_a,
            c.mean_norm_b,
            if c.mean_norm_b > 0.0 { format!("{:.2}", c.mean_norm_a / c.mean_norm_b) } else { "–".into() },
            c.mean_cosine.map_or("–".into(), |x| format!("{x:.3}")),
            c.negative_share.map_or("–".into(), |x| format!("{:.0} %", 100.0 * x)),
            c.with_cosine
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_values_of_a_built_matrix() {
        // diag(3, 2, 1) rotated by a permutation and a sign: the same singular values.
        let m = [0.0, -2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let sv = singular_values(4, 3, &m);
        for (s, want) in sv.iter().zip([3.0, 2.0, 1.0]) {
            assert!((s - want).abs() < 1e-9, "{sv:?}");
        }
        assert!((information_abundance(&sv).unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn ia_of_rank_one_orthogonal_and_zero_tables() {
        // Rank 1: every row a multiple of one vector.
        let v = [0.5f32, -1.0, 2.0, 0.25];
        let rank1: Vec<f32> = (1..=6).flat_map(|r| v.iter().map(move |x| x * r as f32)).collect();
        let ia = information_abundance(&singular_values(6, 4, &rank1)).unwrap();
        assert!((ia - 1.0).abs() < 1e-6, "{ia}");
        // Orthogonal columns of equal norm (an identity stacked twice): IA = the width.
        let mut eye = vec![0.0f32; 8 * 4];
        for r in 0..8 {
            eye[r * 4 + r % 4] = 1.0;
        }
        let ia = information_abundance(&singular_values(8, 4, &eye)).unwrap();
        assert!((ia - 4.0).abs() < 1e-9, "{ia}");
        assert_eq!(information_abundance(&singular_values(3, 2, &[0.0; 6])), None);
        assert_eq!(information_abundance(&[]), None);
    }

    #[test]
    fn gate_sums_average_per_expert_and_domain() {
        let mut p = ProbeSums {
            name: "g".into(),
            shape: vec![],
            gate: true,
            overall: Sums::default(),
            per_domain: BTreeMap::new(),
        };
        // Three samples, two experts: domain 0 picks expert 0, domain 1 splits evenly.
        let t = Tensor::new(vec![3, 2], vec![1.0, 0.0, 1.0, 0.0, 0.5, 0.5]).unwrap();
        p.add(&t, Some(&[0, 0, 1]));
        let a = p.finish();
        assert!(a.gate);
        assert_eq!(a.shape, vec![2]);
        let m = &a.overall.mean;
        assert!((m[0] - 2.5 / 3.0).abs() < 1e-12 && (m.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{m:?}");
        let ln2 = 2f64.ln();
        assert!((a.max_entropy.unwrap() - ln2).abs() < 1e-12);
        assert!((a.overall.sample_entropy.unwrap() - ln2 / 3.0).abs() < 1e-12);
        assert_eq!(a.per_domain[&0].mean, vec![1.0, 0.0]);
        assert_eq!(a.per_domain[&0].entropy, Some(0.0));
        assert!((a.per_domain[&1].entropy.unwrap() - ln2).abs() < 1e-12);
        // Values that are not distributions are averaged, with no entropy.
        let mut v = ProbeSums {
            name: "v".into(),
            shape: vec![],
            gate: true,
            overall: Sums::default(),
            per_domain: BTreeMap::new(),
        };
        v.add(&Tensor::new(vec![2, 2], vec![2.0, 0.0, 0.0, 1.0]).unwrap(), None);
        let a = v.finish();
        assert!(!a.gate && a.overall.entropy.is_none());
        assert_eq!(a.overall.mean, vec![1.0, 0.5]);
    }

    #[test]
    fn a_gate_over_axis_one_with_trailing_axes() {
        // [B = 1, K = 2, d = 2]: each of the d columns is a distribution over K.
        let mut p = ProbeSums {
            name: "g".into(),
            shape: vec![],
            gate: true,
            overall: Sums::default(),
            per_domain: BTreeMap::new(),
        };
        p.add(&Tensor::new(vec![1, 2, 2], vec![0.25, 1.0, 0.75, 0.0]).unwrap(), None);
        let a = p.finish();
        assert!(a.gate);
        assert_eq!(a.overall.mean, vec![0.625, 0.375]);
    }
}
