//! What this module owns: the gradient measures a run records while it trains, for
//! `mdl analyze` and the report to read back (the card's gradient domination and conflict):
//!
//! - **Gradient norms per parameter group** (`train.record_grad_norms: true`): at every
//!   step, the L2 norm of the training gradient (before `train.clip_norm` clips it) of each
//!   parameter group, and of all parameters together (`all`, the global norm that clipping
//!   compares with its limit). A parameter's group is the spec's `group` it is declared in;
//!   a parameter of no group is grouped by the first part of its name (its top-level
//!   scope: `E` for `E/table`, `click` for `click/mixture/...`).
//! - **The cosine between two paths' gradients on a shared parameter**
//!   (`train.grad_cosine: {losses: [a, b], param: P}`): the two paths are two named losses
//!   of the spec (`loss a = ...`, `loss b = ...`); every `every` steps, before the update,
//!   the gradient of each loss alone with respect to `P` (typically the embedding table both
//!   paths read), their norms and the cosine between them.
//!
//! [`GradientRecord`] is kept in the loop state of the checkpoints, so a resumed run writes
//! `grad_norms.csv` and `grad_cosine.csv` byte for byte as an uninterrupted one.

use mdl_runtime::tensor::Value;
use mdl_runtime::ParamInfo;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The group that sums the norms of every parameter.
pub const ALL: &str = "all";

/// The group a parameter's gradient norm is counted in: its spec `group`, else the first
/// part of its name.
pub fn parameter_group(p: &ParamInfo) -> &str {
    match &p.group {
        Some(g) => g,
        None => p.name.split('/').next().unwrap_or(&p.name),
    }
}

/// The groups of `params` in name order, then [`ALL`]: the columns of one step's norms.
pub fn group_names(params: &[ParamInfo]) -> Vec<String> {
    let groups: BTreeSet<&str> = params.iter().map(parameter_group).collect();
    groups.into_iter().map(str::to_string).chain(std::iter::once(ALL.to_string())).collect()
}

/// A gradient as rows of values: a dense tensor is one row (index 0) of all its values; a
/// row-sparse one has a row per table row it touches, its repeated entries added up.
fn rows(g: &Value<f32>) -> BTreeMap<u32, Vec<f64>> {
    let mut out = BTreeMap::new();
    match g {
        Value::Dense(t) => {
            out.insert(0, t.data.iter().map(|&x| x as f64).collect());
        }
        Value::RowSparse { rows, values, .. } => {
            let width = if rows.is_empty() { 0 } else { values.data.len() / rows.len() };
            for (j, &r) in rows.iter().enumerate() {
                let row: &mut Vec<f64> = out.entry(r).or_insert_with(|| vec![0.0; width]);
                for (acc, &x) in row.iter_mut().zip(&values.data[j * width..(j + 1) * width]) {
                    *acc += x as f64;
                }
            }
        }
        Value::Ids(_) => {}
    }
    out
}

/// The squared L2 norm of a gradient (a row-sparse one's repeated rows added first).
pub fn squared_norm(g: &Value<f32>) -> f64 {
    rows(g).values().flatten().map(|x| x * x).sum()
}

/// The L2 norm of the gradients of each group of `params` (as [`group_names`] orders them,
/// [`ALL`] last); a parameter without a gradient adds nothing.
pub fn group_norms(params: &[ParamInfo], grads: &HashMap<String, Value<f32>>) -> Vec<f32> {
    let names = group_names(params);
    let mut squares = vec![0.0f64; names.len()];
    for p in params {
        let Some(g) = grads.get(p.name.as_str()) else { continue };
        let sq = squared_norm(g);
        let at = names.iter().position(|n| n == parameter_group(p)).expect("every group is named");
        squares[at] += sq;
        *squares.last_mut().expect("`all` is last") += sq;
    }
    squares.into_iter().map(|s| s.sqrt() as f32).collect()
}

/// The norms of two gradients of one parameter and the cosine between them (none when
/// either is zero).
pub fn cosine(a: &Value<f32>, b: &Value<f32>) -> (f64, f64, Option<f64>) {
    let (ra, rb) = (rows(a), rows(b));
    let dot: f64 =
        ra.iter().filter_map(|(r, x)| rb.get(r).map(|y| x.iter().zip(y).map(|(x, y)| x * y).sum::<f64>())).sum();
    let na = ra.values().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let nb = rb.values().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let cos = (na > 0.0 && nb > 0.0).then(|| (dot / (na * nb)).clamp(-1.0, 1.0));
    (na, nb, cos)
}

/// One step's norms per group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepNorms {
    pub step: u64,
    /// Counted from 1, as `loss.csv`'s.
    pub epoch: usize,
    /// A norm per group of [`GradientRecord::groups`].
    pub norms: Vec<f32>,
}

/// One step's cosine between the two losses' gradients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCosine {
    pub step: u64,
    pub epoch: usize,
    pub norm_a: f32,
    pub norm_b: f32,
    /// None when either gradient is zero.
    pub cosine: Option<f32>,
}

/// What a run recorded of its gradients (kept in the checkpoints' loop state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GradientRecord {
    /// The columns of [`StepNorms::norms`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub norms: Vec<StepNorms>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cosine: Vec<StepCosine>,
}

impl GradientRecord {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.norms.is_empty() && self.cosine.is_empty()
    }
}

/// `grad_norms.csv`, long format: `step,epoch,group,norm`, a row per step and group
/// ([`ALL`] last). Norms are written in full (the shortest text that reads back the same
/// `f32`).
pub fn norms_csv(record: &GradientRecord) -> String {
    let mut s = String::from("step,epoch,group,norm\n");
    for row in &record.norms {
        for (group, norm) in record.groups.iter().zip(&row.norms) {
            s.push_str(&format!("{},{},{group},{norm}\n", row.step, row.epoch));
        }
    }
    s
}

/// `grad_cosine.csv`: `step,epoch,param,of,a,b,norm_a,norm_b,cosine`, a row per measured
/// step (an empty cosine where a gradient was zero); `of` is `losses` (the gradients of
/// named losses `a` and `b`) or `paths` (the objective's through named paths `a` and `b`).
/// Runs recorded before paths wrote `loss_a,loss_b` for `of,a,b`: [`summarize`] reads both.
pub fn cosine_csv(record: &GradientRecord, of: &str, names: &[String], param: &str) -> String {
    let mut s = String::from("step,epoch,param,of,a,b,norm_a,norm_b,cosine\n");
    let (a, b) = (names.first().map_or("", String::as_str), names.get(1).map_or("", String::as_str));
    for r in &record.cosine {
        let cos = r.cosine.map(|c| c.to_string()).unwrap_or_default();
        s.push_str(&format!("{},{},{param},{of},{a},{b},{},{},{cos}\n", r.step, r.epoch, r.norm_a, r.norm_b));
    }
    s
}

/// The norms of one group over the recorded steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupNormSummary {
    pub group: String,
    pub steps: usize,
    pub mean: f64,
    pub first: f64,
    pub last: f64,
    pub max: f64,
}

/// The cosines between two losses' gradients, or the objective's through two paths, over
/// the measured steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CosineSummary {
    pub param: String,
    /// `losses` or `paths`.
    pub of: String,
    pub a: String,
    pub b: String,
    /// Steps measured, and those with a cosine (both gradients non-zero).
    pub steps: usize,
    pub with_cosine: usize,
    pub mean_cosine: Option<f64>,
    /// The share of the cosines below 0 (the two losses pull the parameter apart).
    pub negative_share: Option<f64>,
    pub mean_norm_a: f64,
    pub mean_norm_b: f64,
}

/// `analysis.json`'s `gradients`: what `grad_norms.csv` and `grad_cosine.csv` hold, in
/// short.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GradientSummary {
    pub groups: Vec<GroupNormSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine: Option<CosineSummary>,
}

/// The rows of a CSV text the run wrote (`name` for errors), as cells by the header's names.
fn csv_rows<'t>(name: &str, text: &'t str) -> Result<Vec<BTreeMap<&'t str, &'t str>>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    lines
        .enumerate()
        .map(|(i, line)| {
            let cells: Vec<&str> = line.split(',').collect();
            if cells.len() != header.len() {
                return Err(format!("{name}:{}: {} cells, the header has {}", i + 2, cells.len(), header.len()));
            }
            Ok(header.iter().copied().zip(cells).collect())
        })
        .collect()
}

fn cell<'t>(name: &str, row: &BTreeMap<&str, &'t str>, key: &str) -> Result<&'t str, String> {
    row.get(key).copied().ok_or_else(|| format!("{name}: no column `{key}`"))
}

fn number(name: &str, row: &BTreeMap<&str, &str>, key: &str) -> Result<f64, String> {
    let text = cell(name, row, key)?;
    text.parse().map_err(|_| format!("{name}: `{key}` is not a number: `{text}`"))
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The summary of the texts of `grad_norms.csv` and `grad_cosine.csv` (either may be
/// absent); `None` when both are.
pub fn summarize(norms: Option<&str>, cosine: Option<&str>) -> Result<Option<GradientSummary>, String> {
    if norms.is_none() && cosine.is_none() {
        return Ok(None);
    }
    let mut summary = GradientSummary::default();
    if let Some(text) = norms {
        let mut by_group: Vec<(String, Vec<f64>)> = Vec::new();
        for row in csv_rows("grad_norms.csv", text)? {
            let group = cell("grad_norms.csv", &row, "group")?;
            let norm = number("grad_norms.csv", &row, "norm")?;
            match by_group.iter_mut().find(|(g, _)| g == group) {
                Some((_, v)) => v.push(norm),
                None => by_group.push((group.to_string(), vec![norm])),
            }
        }
        for (group, v) in by_group {
            summary.groups.push(GroupNormSummary {
                group,
                steps: v.len(),
                mean: mean(&v).unwrap_or(0.0),
                first: v[0],
                last: v[v.len() - 1],
                max: v.iter().copied().fold(0.0, f64::max),
            });
        }
    }
    if let Some(text) = cosine {
        let name = "grad_cosine.csv";
        let rows = csv_rows(name, text)?;
        let (mut cosines, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            a.push(number(name, row, "norm_a")?);
            b.push(number(name, row, "norm_b")?);
            if !cell(name, row, "cosine")?.is_empty() {
                cosines.push(number(name, row, "cosine")?);
            }
        }
        let first = |key: &str| rows.first().map_or(Ok(String::new()), |r| cell(name, r, key).map(str::to_string));
        let negative = cosines.iter().filter(|&&c| c < 0.0).count();
        // Files written before paths: `loss_a,loss_b`, always losses.
        let old = rows.first().is_some_and(|r| cell(name, r, "a").is_err());
        summary.cosine = Some(CosineSummary {
            param: first("param")?,
            of: if old { "losses".into() } else { first("of")? },
            a: first(if old { "loss_a" } else { "a" })?,
            b: first(if old { "loss_b" } else { "b" })?,
            steps: rows.len(),
            with_cosine: cosines.len(),
            mean_cosine: mean(&cosines),
            negative_share: (!cosines.is_empty()).then(|| negative as f64 / cosines.len() as f64),
            mean_norm_a: mean(&a).unwrap_or(0.0),
            mean_norm_b: mean(&b).unwrap_or(0.0),
        });
    }
    Ok(Some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdl_runtime::tensor::Tensor;
    use mdl_runtime::Init;

    fn dense(shape: Vec<usize>, data: Vec<f32>) -> Value<f32> {
        Value::Dense(Tensor::new(shape, data).unwrap())
    }

    fn param(name: &str, group: Option<&str>) -> ParamInfo {
        ParamInfo {
            name: name.into(),
            shape: vec![],
            init: Init::Zeros,
            group: group.map(str::to_string),
            embedding: false,
            node: Default::default(),
        }
    }

    #[test]
    fn cosine_of_known_vectors() {
        let a = dense(vec![2], vec![3.0, 4.0]);
        let (na, nb, c) = cosine(&a, &dense(vec![2], vec![-4.0, 3.0]));
        assert_eq!((na, nb, c), (5.0, 5.0, Some(0.0)));
        assert_eq!(cosine(&a, &dense(vec![2], vec![6.0, 8.0])).2, Some(1.0));
        assert_eq!(cosine(&a, &dense(vec![2], vec![-3.0, -4.0])).2, Some(-1.0));
        assert_eq!(cosine(&a, &dense(vec![2], vec![0.0, 0.0])).2, None);
        // Row-sparse: row 2 appears twice in `x` ([1, 0] + [0, 1] = [1, 1]); `y` touches rows
        // 2 and 5. x = {2: [1, 1], 7: [1, 0]}, y = {2: [1, 1], 5: [3, 0]}: x·y = 2,
        // |x| = √3, |y| = √11.
        let x = Value::RowSparse {
            shape: vec![8, 2],
            rows: vec![2, 7, 2],
            values: Tensor::new(vec![3, 2], vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0]).unwrap(),
        };
        let y = Value::RowSparse {
            shape: vec![8, 2],
            rows: vec![5, 2],
            values: Tensor::new(vec![2, 2], vec![3.0, 0.0, 1.0, 1.0]).unwrap(),
        };
        let (nx, ny, c) = cosine(&x, &y);
        assert!((nx - 3f64.sqrt()).abs() < 1e-12 && (ny - 11f64.sqrt()).abs() < 1e-12);
        assert!((c.unwrap() - 2.0 / 33f64.sqrt()).abs() < 1e-12);
        assert!((squared_norm(&x) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn norms_per_group_and_overall() {
        let params = [param("E/table", None), param("head/w", Some("heads")), param("head/b", Some("heads"))];
        assert_eq!(group_names(&params), ["E", "heads", "all"]);
        let e = dense(vec![2], vec![3.0, 4.0]);
        let w = dense(vec![1], vec![12.0]);
        let grads: HashMap<String, Value<f32>> = [("E/table".to_string(), e), ("head/w".to_string(), w)].into();
        // heads: √(12²) with no gradient for head/b; all: √(25 + 144) = 13.
        assert_eq!(group_norms(&params, &grads), vec![5.0, 12.0, 13.0]);
        let record = GradientRecord {
            groups: group_names(&params),
            norms: vec![StepNorms { step: 1, epoch: 1, norms: vec![5.0, 12.0, 13.0] }],
            cosine: vec![StepCosine { step: 1, epoch: 1, norm_a: 0.5, norm_b: 0.25, cosine: None }],
        };
        assert_eq!(norms_csv(&record), "step,epoch,group,norm\n1,1,E,5\n1,1,heads,12\n1,1,all,13\n");
        assert_eq!(
            cosine_csv(&record, "paths", &["a".into(), "b".into()], "E/table"),
            "step,epoch,param,of,a,b,norm_a,norm_b,cosine\n1,1,E/table,paths,a,b,0.5,0.25,\n"
        );
    }

    #[test]
    fn summaries_of_the_recorded_files() {
        let norms = "step,epoch,group,norm\n1,1,E,4\n1,1,all,5\n2,1,E,2\n2,1,all,3\n";
        let cosine = "step,epoch,param,loss_a,loss_b,norm_a,norm_b,cosine\n\
                      1,1,E/table,a,b,1,3,-0.5\n2,1,E/table,a,b,3,5,\n3,1,E/table,a,b,2,4,0.25\n4,1,E/table,a,b,2,0,-0.25\n";
        let s = summarize(Some(norms), Some(cosine)).unwrap().unwrap();
        assert_eq!(s.groups.len(), 2);
        let e = &s.groups[0];
        assert_eq!((e.group.as_str(), e.steps, e.mean, e.first, e.last, e.max), ("E", 2, 3.0, 4.0, 2.0, 4.0));
        let c = s.cosine.unwrap();
        assert_eq!((c.param.as_str(), c.of.as_str(), c.a.as_str(), c.b.as_str()), ("E/table", "losses", "a", "b"));
        assert_eq!((c.steps, c.with_cosine), (4, 3));
        assert!((c.mean_cosine.unwrap() - (-0.5 + 0.25 - 0.25) / 3.0).abs() < 1e-12);
        assert!((c.negative_share.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!((c.mean_norm_a, c.mean_norm_b), (2.0, 3.0));
        // The file as runs write it now.
        let paths = "step,epoch,param,of,a,b,norm_a,norm_b,cosine\n1,1,E/table,paths,att,rep,1,5,-0.5\n";
        let c = summarize(None, Some(paths)).unwrap().unwrap().cosine.unwrap();
        assert_eq!((c.of.as_str(), c.a.as_str(), c.b.as_str(), c.with_cosine), ("paths", "att", "rep", 1));
        assert_eq!(summarize(None, None).unwrap(), None);
        let err = summarize(Some("step,epoch,group,norm\n1,1,E\n"), None).unwrap_err();
        assert_eq!(err, "grad_norms.csv:2: 3 cells, the header has 4");
    }
}
