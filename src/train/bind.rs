//! Binding a compiled model to data: which arrays of a data [`Batch`] feed which graph
//! input, and the sizes (`count(x)`, `rows(x)`, the number of domains) the data gives the
//! spec's symbolic shapes. The experiment's schema names its groups after the spec's
//! inputs; every mismatch between the two is an error naming both sides. The
//! vocabularies `sample_ids` draws from are fed beside the batch, the same every step.
//!
//! The same sizes, as numbers the spec computes with ([`Sizes`]): [`schema_sizes`] are those
//! the experiment's schema gives without reading data (`count(x)` of every group, and the
//! number of domains where the schema declares it), [`fitted_sizes`] all of them, from the
//! prepared data (the vocabularies' rows, the domains seen in train).

use crate::data::{Batch, FeatureGroup, Fitted, Schema, SequenceTable};
use crate::lower::{
    count_sym, frequency_bins_input, ids_input, label_input, mask_input, rows_sym, vocab_input, vocab_starts_input,
    Compiled, FeatureKind, Sizes,
};
use mdl_runtime::ir::dim::BATCH;
use mdl_runtime::tensor::{Tensor, Value};
use mdl_runtime::Binding;
use std::collections::HashMap;

/// The sizes the experiment's schema gives without reading any data: `count(x)` of every
/// feature group (its columns), and the number of domains where the schema declares it
/// (`domain: { column: ..., count: D }`).
pub fn schema_sizes(schema: &Schema) -> Sizes {
    let mut sizes = Sizes::default();
    for g in &schema.features {
        let columns = match g {
            FeatureGroup::Categorical { columns, .. }
            | FeatureGroup::Sequence { columns, .. }
            | FeatureGroup::Numeric { columns, .. } => columns.len(),
        };
        sizes.symbols.insert(count_sym(g.name()), columns as i64);
    }
    sizes.domains = schema.domain.as_ref().and_then(|d| d.count).map(|d| d as i64);
    sizes
}

/// Every size of the prepared data: the schema's ([`schema_sizes`]), the rows of each
/// vocabulary (`rows(x)`), and the number of domains (declared, or seen in train).
pub fn fitted_sizes(fitted: &Fitted) -> Sizes {
    let layout = fitted.layout();
    let mut sizes = schema_sizes(&fitted.schema);
    for l in &layout.categorical {
        sizes.symbols.insert(rows_sym(&l.name), l.rows as i64);
    }
    for l in layout.sequence.iter().filter(|l| l.table == SequenceTable::Own) {
        sizes.symbols.insert(rows_sym(&l.name), l.rows as i64);
    }
    if fitted.schema.domain.is_some() {
        sizes.domains = Some(layout.domains as i64);
    }
    sizes
}

/// Where one graph input comes from in a batch.
#[derive(Clone, Debug)]
enum Source {
    Categorical(usize),
    SequenceIds(usize),
    SequenceMask(usize),
    Numeric(usize),
    Domain,
    Label(usize),
    /// The same value every batch (a vocabulary's counts or column starts).
    Constant(Value<f32>),
}

/// How batches become graph feeds for one model and schema.
#[derive(Clone, Debug)]
pub struct InputBinding {
    /// Sizes that do not depend on the batch.
    pub sizes: Binding,
    /// `(graph input name, source, per-row shape)`.
    feeds: Vec<(String, Source, Vec<usize>)>,
    /// Position of each model task in the data's label columns (`None` for a task that
    /// reads no column: `candidates`).
    pub task_columns: Vec<Option<usize>>,
    pub tasks_in_data: usize,
}

impl InputBinding {
    /// Matches the spec's inputs and tasks against the schema and the fitted layout.
    pub fn new(model: &Compiled, fitted: &Fitted) -> Result<InputBinding, String> {
        let (schema, layout) = (&fitted.schema, &fitted.layout());
        let mut sizes = Binding::new();
        let mut feeds = Vec::new();
        let mut errors = Vec::new();
        let group_index = |name: &str, want: &str| -> Option<usize> {
            schema
                .features
                .iter()
                .filter(|g| match g {
                    FeatureGroup::Categorical { .. } => want == "categorical",
                    FeatureGroup::Sequence { .. } => want == "sequence",
                    FeatureGroup::Numeric { .. } => want == "numeric",
                })
                .position(|g| g.name() == name)
        };
        for f in &model.features {
            let name = &f.name;
            let kind_of_schema = schema.features.iter().find(|g| g.name() == name).map(|g| match g {
                FeatureGroup::Categorical { .. } => "categorical",
                FeatureGroup::Sequence { .. } => "sequence",
                FeatureGroup::Numeric { .. } => "numeric",
            });
            match &f.kind {
                FeatureKind::Categorical => match group_index(name, "categorical") {
                    Some(i) => {
                        let l = &layout.categorical[i];
                        sizes.insert(count_sym(name), l.columns.len());
                        sizes.insert(rows_sym(name), l.rows);
                        feeds.push((ids_input(name), Source::Categorical(i), vec![l.columns.len()]));
                    }
                    None => errors.push(missing(name, "categorical", kind_of_schema)),
                },
                FeatureKind::Sequence { len, of } => match group_index(name, "sequence") {
                    Some(i) => {
                        let l = &layout.sequence[i];
                        if l.max_len != *len {
                            errors.push(format!(
                                "input `{name}`: the spec declares sequence({len}) but the schema has max_len {}",
                                l.max_len
                            ));
                        }
                        match (of, &l.table) {
                            (Some(o), SequenceTable::Categorical { group, .. }) if o == group => {}
                            (Some(o), SequenceTable::Categorical { group, column }) => errors.push(format!(
                                "input `{name}`: the spec shares the ids of `{o}`, but the schema maps it through column `{column}` of group `{group}`"
                            )),
                            (Some(o), SequenceTable::Own) => errors.push(format!(
                                "input `{name}`: the spec shares the ids of `{o}`; give the schema group `vocab: <a column of {o}>`"
                            )),
                            (None, SequenceTable::Categorical { group, .. }) => errors.push(format!(
                                "input `{name}`: the schema shares the vocabulary of group `{group}`; declare it `sequence({len}) of {group}` in the spec"
                            )),
                            (None, SequenceTable::Own) => {
                                sizes.insert(rows_sym(name), l.rows);
                            }
                        }
                        sizes.insert(count_sym(name), l.columns.len());
                        feeds.push((ids_input(name), Source::SequenceIds(i), vec![l.columns.len(), l.max_len]));
                        feeds.push((mask_input(name), Source::SequenceMask(i), vec![l.columns.len(), l.max_len]));
                    }
                    None => errors.push(missing(name, "sequence", kind_of_schema)),
                },
                FeatureKind::Numeric => match group_index(name, "numeric") {
                    Some(i) => {
                        let l = &layout.numeric[i];
                        sizes.insert(count_sym(name), l.columns.len());
                        feeds.push((ids_input(name), Source::Numeric(i), vec![l.columns.len()]));
                    }
                    None => errors.push(missing(name, "numeric", kind_of_schema)),
                },
                FeatureKind::Domain => {
                    if schema.domain.is_none() {
                        errors
                            .push(format!("input `{name}` is a domain: the schema needs `domain: {{ column: ... }}`"));
                    }
                    sizes.insert(count_sym(name), layout.domains);
                    feeds.push((ids_input(name), Source::Domain, vec![]));
                }
            }
        }
        let domains = model.features.iter().filter(|f| f.kind == FeatureKind::Domain).count();
        if domains > 1 {
            errors.push("the spec declares more than one domain input; the data has one domain column".into());
        }
        for g in &schema.features {
            if !model.features.iter().any(|f| f.name == g.name()) {
                let names: Vec<&str> = model.features.iter().map(|f| f.name.as_str()).collect();
                errors.push(format!(
                    "schema group `{}` is not an input of the spec (its inputs: {}); drop the group from the experiment's \
                     `data.schema.features` (a list replaces its base's whole), or declare it as an input of the spec",
                    g.name(),
                    names.join(", ")
                ));
            }
        }
        for space in &model.vocabularies {
            match fitted.id_counts(space) {
                Some((counts, starts)) => {
                    let (v, c) = (counts.len(), starts.len());
                    feeds.push((
                        vocab_input(space),
                        Source::Constant(Value::Dense(Tensor { shape: vec![v], data: counts })),
                        vec![],
                    ));
                    feeds.push((
                        vocab_starts_input(space),
                        Source::Constant(Value::Ids(Tensor { shape: vec![c], data: starts })),
                        vec![],
                    ));
                }
                None => errors.push(format!(
                    "input `{space}`: `sample_ids` draws from its vocabulary, but the schema gives it none"
                )),
            }
        }
        for (space, bins) in &model.frequency_bins {
            match fitted.id_counts(space) {
                Some((counts, starts)) => feeds.push((
                    frequency_bins_input(space, *bins),
                    Source::Constant(Value::Dense(Tensor {
                        shape: vec![counts.len()],
                        data: frequency_bins(&counts, &starts, *bins),
                    })),
                    vec![],
                )),
                None => errors.push(format!(
                    "input `{space}`: `frequency_bin` reads the train counts of its vocabulary, but the schema gives it none"
                )),
            }
        }
        let mut task_columns = Vec::new();
        for (t, (task, kind)) in model.tasks.iter().zip(&model.task_kinds).enumerate() {
            let entry = schema.labels.iter().position(|l| &l.name == task);
            let Some(values) = kind.label_values() else {
                if entry.is_some() {
                    errors.push(format!(
                        "task `{task}` is a {} task, which reads no label column: drop it from the schema's labels",
                        kind.describe()
                    ));
                }
                task_columns.push(None);
                continue;
            };
            match entry {
                Some(i) => {
                    if schema.labels[i].values != values {
                        errors.push(format!(
                            "task `{task}` is {} in the spec, but its column `{}` was read as {:?} labels",
                            kind.describe(),
                            schema.labels[i].column,
                            schema.labels[i].values
                        ));
                    }
                    task_columns.push(Some(i));
                    feeds.push((label_input(task), Source::Label(i), vec![]));
                }
                None => {
                    let names: Vec<&str> = schema.labels.iter().map(|l| l.name.as_str()).collect();
                    errors.push(format!(
                        "task `{task}` (label {t} of the spec) has no entry in the schema's labels ({})",
                        names.join(", ")
                    ));
                }
            }
        }
        for l in &schema.labels {
            if !model.tasks.contains(&l.name) {
                errors.push(format!("schema label `{}` is not a task of the spec", l.name));
            }
        }
        if !errors.is_empty() {
            return Err(format!("the experiment's data schema does not fit the spec:\n  - {}", errors.join("\n  - ")));
        }
        Ok(InputBinding { sizes, feeds, task_columns, tasks_in_data: schema.labels.len() })
    }

    /// The sizes with the batch bound.
    pub fn with_batch(&self, rows: usize) -> Binding {
        let mut b = self.sizes.clone();
        b.insert(BATCH.to_string(), rows);
        b
    }

    /// The graph feeds for a batch.
    pub fn feeds(&self, batch: &Batch) -> HashMap<String, Value<f32>> {
        let rows = batch.rows;
        let mut out = HashMap::with_capacity(self.feeds.len());
        for (name, src, per_row) in &self.feeds {
            if let Source::Constant(v) = src {
                out.insert(name.clone(), v.clone());
                continue;
            }
            let mut shape = vec![rows];
            shape.extend_from_slice(per_row);
            let v = match src {
                Source::Categorical(i) => Value::Ids(Tensor { shape, data: batch.cat[*i].clone() }),
                Source::SequenceIds(i) => Value::Ids(Tensor { shape, data: batch.seq_ids[*i].clone() }),
                Source::SequenceMask(i) => Value::Dense(Tensor { shape, data: batch.seq_mask[*i].clone() }),
                Source::Numeric(i) => Value::Dense(Tensor { shape, data: batch.num[*i].clone() }),
                Source::Domain => Value::Ids(Tensor { shape, data: batch.domain.clone() }),
                Source::Constant(v) => v.clone(),
                Source::Label(j) => {
                    let t = self.tasks_in_data;
                    Value::Dense(Tensor { shape, data: (0..rows).map(|r| batch.labels[r * t + j]).collect() })
                }
            };
            out.insert(name.clone(), v);
        }
        out
    }
}

/// The frequency bin of every id of a vocabulary (`counts`: each id's train count; `starts`:
/// the first id of each column, then the number of ids), as `frequency_bin` reads it: within
/// each column, the ids of positive count, most frequent first (equal counts by id), are cut
/// into `bins` bins of equal train mass: an id whose more frequent ids hold the share `s` of
/// the column's count is in bin `1 + floor(bins · s)`. Ids of count 0 (padding, out of
/// vocabulary) are in bin 0.
pub fn frequency_bins(counts: &[f32], starts: &[u32], bins: usize) -> Vec<f32> {
    let mut out = vec![0.0; counts.len()];
    for column in starts.windows(2) {
        let (lo, hi) = (column[0] as usize, (column[1] as usize).min(counts.len()));
        let mut ids: Vec<usize> = (lo..hi).filter(|&i| counts[i] > 0.0).collect();
        ids.sort_by(|&a, &b| counts[b].total_cmp(&counts[a]).then(a.cmp(&b)));
        let total: f64 = ids.iter().map(|&i| counts[i] as f64).sum();
        let mut before = 0.0;
        for i in ids {
            out[i] = (1 + ((bins as f64 * before / total) as usize).min(bins - 1)) as f32;
            before += counts[i] as f64;
        }
    }
    out
}

fn missing(name: &str, kind: &str, found: Option<&str>) -> String {
    match found {
        Some(k) => format!("input `{name}` is {kind} in the spec but a {k} group in the schema"),
        None => format!("input `{name}` ({kind}) has no group in the schema: add `{{ kind: {kind}, name: {name}, columns: [...] }}` to data.schema.features"),
    }
}

#[cfg(test)]
mod tests {
    use super::frequency_bins;

    #[test]
    fn frequency_bins_cut_each_column_into_equal_train_mass() {
        // Column 1: ids 0..5 (0: padding), counts 0, 1, 6, 2, 1; total 10, most frequent
        // first: id 2 (share before 0), id 3 (0.6), id 1 (0.8), id 4 (0.9).
        // Column 2: ids 5..8, counts 0, 3, 3: id 6 (0), id 7 (0.5).
        let counts = [0.0, 1.0, 6.0, 2.0, 1.0, 0.0, 3.0, 3.0];
        let bins = frequency_bins(&counts, &[0, 5, 8], 2);
        assert_eq!(bins, vec![0.0, 2.0, 1.0, 2.0, 2.0, 0.0, 1.0, 2.0]);
        let bins = frequency_bins(&counts, &[0, 5, 8], 10);
        assert_eq!(bins, vec![0.0, 9.0, 1.0, 7.0, 10.0, 0.0, 1.0, 6.0]);
    }
}
