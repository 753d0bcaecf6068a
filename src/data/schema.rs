//! The data schema: which CSV columns feed which feature group, which columns are labels,
//! the domain and the user column. It is plain serde data so that it can be embedded in an
//! experiment YAML file:
//!
//! ```yaml
//! features:
//!   - { kind: categorical, name: ids, columns: [user_id, video_id] }
//!   - { kind: sequence, name: history, columns: [hist_click_seq], max_len: 50, vocab: video_id }
//!   - { kind: sequence, name: tags, columns: [tag], max_len: 8 }
//!   - { kind: numeric, name: counts, columns: [fans_user_num], normalize: standard }
//! domain: { column: domain, count: 15 }
//! labels: [ { name: click, column: label } ]
//! user: user_id
//! min_count: 1
//! ```
//!
//! For open id spaces (many distinct ids, most rare), `max_vocab: N` keeps at most the N most
//! frequent values of each column, and `hash_buckets: B` gives the values not kept B hashed
//! ids per column instead of the one OOV id (see [`super::vocab`]); both may be set for the
//! whole schema or per categorical or sequence group (a group's own setting wins), e.g.
//! `{ kind: categorical, name: ids, columns: [user_id, video_id], max_vocab: 100000,
//! hash_buckets: 1000 }`.
//!
//! Every column not named here is ignored. [`Schema::validate`] checks the schema on its own;
//! whether the named columns exist is checked against each file's header when it is read.

use crate::tasks::LabelValues;
use serde::{Deserialize, Serialize};

use super::vocab::VocabLimits;
use super::DataError;

/// The most hashed ids a column may have (a table's rows must stay within 32-bit ids).
pub const MAX_HASH_BUCKETS: u32 = 1 << 30;

/// Checks `max_vocab` and `hash_buckets` at `place` (a key path such as
/// `data.schema.features[2]`).
fn check_limits(place: &str, max_vocab: Option<usize>, hash_buckets: Option<u32>) -> Result<(), DataError> {
    if max_vocab == Some(0) {
        return Err(DataError::Schema(format!(
            "{place}.max_vocab: must be at least 1, found 0 (leave the key out to keep every value)"
        )));
    }
    match hash_buckets {
        Some(0) => Err(DataError::Schema(format!(
            "{place}.hash_buckets: must be at least 1, found 0 (leave the key out for one OOV id)"
        ))),
        Some(b) if b > MAX_HASH_BUCKETS => {
            Err(DataError::Schema(format!("{place}.hash_buckets: must be at most {MAX_HASH_BUCKETS}, found {b}")))
        }
        _ => Ok(()),
    }
}

/// The full description of how a CSV file becomes model inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Feature groups, in the order their arrays appear in a [`Dataset`](super::Dataset)
    /// (categorical, sequence and numeric groups are numbered separately, each in this order).
    pub features: Vec<FeatureGroup>,
    /// The tasks that read a label column, in order (a spec's first task is its main one).
    /// Empty (or left out) when every task of the spec reads none (`candidates`).
    #[serde(default)]
    pub labels: Vec<Task>,
    /// The integer domain (scenario) column, if the data is multi-domain.
    #[serde(default)]
    pub domain: Option<DomainSpec>,
    /// A column identifying the user, used only to group rows for gAUC.
    #[serde(default)]
    pub user: Option<String>,
    /// Values seen fewer than this many times in train are mapped to OOV (default 1).
    /// A group's own `min_count` overrides it.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
    /// At most this many values are kept per column, the most frequent (default: all).
    /// A group's own `max_vocab` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vocab: Option<usize>,
    /// Hashed ids per column for the values not kept, instead of OOV (default: none).
    /// A group's own `hash_buckets` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_buckets: Option<u32>,
}

fn default_min_count() -> u64 {
    1
}

/// One named group of input columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureGroup {
    /// One id per column per row, each column with its own vocabulary; ids are global over
    /// the group (column c is offset by the vocabulary sizes of the columns before it), so a
    /// single embedding table serves the whole group. Per row: `[columns]` ids.
    Categorical {
        name: String,
        columns: Vec<String>,
        #[serde(default)]
        min_count: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_vocab: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash_buckets: Option<u32>,
    },
    /// Space-separated ids per cell, truncated to the last `max_len` (most recent last) and
    /// right-aligned (the most recent item is always at position `max_len - 1`, padding id 0
    /// fills the front). With `vocab` naming a column of a categorical group the ids share that
    /// column's vocabulary and table offset; without it all the group's columns share one own
    /// vocabulary (this is also how a multi-hot cell such as a tag list is read).
    /// Per row: `[columns, max_len]` ids and a mask (1 = real item, 0 = padding).
    Sequence {
        name: String,
        columns: Vec<String>,
        max_len: usize,
        #[serde(default)]
        vocab: Option<String>,
        #[serde(default)]
        min_count: Option<u64>,
        /// Only without `vocab` (a shared vocabulary has its column's limits).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_vocab: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash_buckets: Option<u32>,
    },
    /// Real-valued columns, normalised with statistics fitted on train. Per row: `[columns]`.
    Numeric { name: String, columns: Vec<String>, normalize: Normalize },
}

impl FeatureGroup {
    pub fn name(&self) -> &str {
        match self {
            FeatureGroup::Categorical { name, .. }
            | FeatureGroup::Sequence { name, .. }
            | FeatureGroup::Numeric { name, .. } => name,
        }
    }

    pub fn columns(&self) -> &[String] {
        match self {
            FeatureGroup::Categorical { columns, .. }
            | FeatureGroup::Sequence { columns, .. }
            | FeatureGroup::Numeric { columns, .. } => columns,
        }
    }
}

/// The longest a sequence group's `max_len` may be: every row holds that many ids per column.
pub const MAX_SEQUENCE_LEN: usize = 65_536;

/// How a numeric column is normalised (statistics from the non-missing train values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// `(x - min) / (max - min)`; 0 when max = min.
    Minmax,
    /// `(x - mean) / std` with the population standard deviation; `x - mean` when std = 0.
    Standard,
    /// The raw value.
    None,
}

/// The domain column: integer ids `0..count`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub column: String,
    /// The number of domains D. Values outside `0..D` are errors. Without it, D is the
    /// largest value seen in train plus one, and larger values in other files are errors.
    #[serde(default)]
    pub count: Option<usize>,
}

/// One prediction task: its name and its label column, and what the column holds
/// (`values`: 0/1 unless the spec declares the task otherwise; `mdl run` fills it from the
/// spec, see [`crate::tasks`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub name: String,
    pub column: String,
    #[serde(default, skip_serializing_if = "LabelValues::is_binary")]
    pub values: LabelValues,
}

/// Where a categorical column sits: `(categorical group index, column index in the group)`.
pub(crate) type CategoricalColumnRef = (usize, usize);

impl Schema {
    /// The categorical groups in schema order: `(name, columns, min_count)`.
    pub(crate) fn categorical_groups(&self) -> impl Iterator<Item = (&str, &[String], u64)> {
        self.features.iter().filter_map(move |g| match g {
            FeatureGroup::Categorical { name, columns, min_count, .. } => {
                Some((name.as_str(), columns.as_slice(), min_count.unwrap_or(self.min_count)))
            }
            _ => None,
        })
    }

    /// The sequence groups in schema order: `(name, columns, max_len, vocab, min_count)`.
    pub(crate) fn sequence_groups(&self) -> impl Iterator<Item = (&str, &[String], usize, Option<&str>, u64)> {
        self.features.iter().filter_map(move |g| match g {
            FeatureGroup::Sequence { name, columns, max_len, vocab, min_count, .. } => Some((
                name.as_str(),
                columns.as_slice(),
                *max_len,
                vocab.as_deref(),
                min_count.unwrap_or(self.min_count),
            )),
            _ => None,
        })
    }

    /// The numeric groups in schema order: `(name, columns, normalize)`.
    pub(crate) fn numeric_groups(&self) -> impl Iterator<Item = (&str, &[String], Normalize)> {
        self.features.iter().filter_map(|g| match g {
            FeatureGroup::Numeric { name, columns, normalize } => Some((name.as_str(), columns.as_slice(), *normalize)),
            _ => None,
        })
    }

    /// The vocabulary limits of each categorical group's columns, in schema order.
    pub(crate) fn categorical_limits(&self) -> Vec<VocabLimits> {
        self.features
            .iter()
            .filter_map(|g| match g {
                FeatureGroup::Categorical { min_count, max_vocab, hash_buckets, .. } => {
                    Some(self.limits(*min_count, *max_vocab, *hash_buckets))
                }
                _ => None,
            })
            .collect()
    }

    /// The vocabulary limits of each sequence group's own vocabulary, in schema order.
    pub(crate) fn sequence_limits(&self) -> Vec<VocabLimits> {
        self.features
            .iter()
            .filter_map(|g| match g {
                FeatureGroup::Sequence { min_count, max_vocab, hash_buckets, .. } => {
                    Some(self.limits(*min_count, *max_vocab, *hash_buckets))
                }
                _ => None,
            })
            .collect()
    }

    fn limits(&self, min_count: Option<u64>, max_vocab: Option<usize>, hash_buckets: Option<u32>) -> VocabLimits {
        VocabLimits {
            min_count: min_count.unwrap_or(self.min_count),
            max_size: max_vocab.or(self.max_vocab),
            buckets: hash_buckets.or(self.hash_buckets).unwrap_or(0),
        }
    }

    /// Finds the categorical column a sequence group's `vocab` names.
    pub(crate) fn find_categorical_column(&self, column: &str) -> Option<CategoricalColumnRef> {
        self.categorical_groups()
            .enumerate()
            .find_map(|(g, (_, columns, _))| columns.iter().position(|c| c == column).map(|c| (g, c)))
    }

    /// Checks the schema on its own (names, sizes, references), without looking at any file.
    pub fn validate(&self) -> Result<(), DataError> {
        let fail = |message: String| Err(DataError::Schema(message));
        check_limits("data.schema", self.max_vocab, self.hash_buckets)?;
        let mut group_names = std::collections::BTreeSet::new();
        for (i, group) in self.features.iter().enumerate() {
            let name = group.name();
            if name.is_empty() {
                return fail("a feature group has an empty name".into());
            }
            if !group_names.insert(name) {
                return fail(format!("feature group name '{name}' is used twice"));
            }
            if group.columns().is_empty() {
                return fail(format!("feature group '{name}' lists no columns"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for column in group.columns() {
                if !seen.insert(column) {
                    return fail(format!("feature group '{name}' lists column '{column}' twice"));
                }
            }
            match group {
                FeatureGroup::Categorical { min_count: Some(0), .. }
                | FeatureGroup::Sequence { min_count: Some(0), .. } => {
                    return fail(format!("feature group '{name}': min_count must be at least 1"));
                }
                FeatureGroup::Sequence { max_len: 0, .. } => {
                    return fail(format!("sequence group '{name}': max_len must be at least 1"));
                }
                FeatureGroup::Sequence { max_len, .. } if *max_len > MAX_SEQUENCE_LEN => {
                    return fail(format!(
                        "sequence group '{name}': max_len must be at most {MAX_SEQUENCE_LEN}, found {max_len} \
                         (every row stores max_len ids per column)"
                    ));
                }
                FeatureGroup::Sequence { vocab: Some(vocab), .. } if self.find_categorical_column(vocab).is_none() => {
                    return fail(format!(
                        "sequence group '{name}': vocab '{vocab}' is not a column of any \
                         categorical group"
                    ));
                }
                FeatureGroup::Sequence { vocab: Some(vocab), max_vocab, hash_buckets, .. }
                    if max_vocab.is_some() || hash_buckets.is_some() =>
                {
                    let key = if max_vocab.is_some() { "max_vocab" } else { "hash_buckets" };
                    return fail(format!(
                        "data.schema.features[{i}].{key}: sequence group '{name}' shares the vocabulary of \
                         column '{vocab}', whose group's limits it follows; set {key} there"
                    ));
                }
                FeatureGroup::Categorical { max_vocab, hash_buckets, .. }
                | FeatureGroup::Sequence { max_vocab, hash_buckets, .. } => {
                    check_limits(&format!("data.schema.features[{i}]"), *max_vocab, *hash_buckets)?;
                }
                _ => {}
            }
        }
        if self.min_count == 0 {
            return fail("min_count must be at least 1".into());
        }
        let mut task_names = std::collections::BTreeSet::new();
        for task in &self.labels {
            if task.name.is_empty() {
                return fail(format!("the task for column '{}' has an empty name", task.column));
            }
            if !task_names.insert(task.name.as_str()) {
                return fail(format!("task name '{}' is used twice", task.name));
            }
        }
        if let Some(DomainSpec { count: Some(0), .. }) = &self.domain {
            return fail("domain count must be at least 1".into());
        }
        Ok(())
    }

    /// Every column this schema reads, each once, in first-mention order.
    pub(crate) fn named_columns(&self) -> Vec<&str> {
        let features = self.features.iter().flat_map(|g| g.columns().iter().map(String::as_str));
        let labels = self.labels.iter().map(|t| t.column.as_str());
        let domain = self.domain.iter().map(|d| d.column.as_str());
        let mut out: Vec<&str> = Vec::new();
        for column in features.chain(labels).chain(domain).chain(self.user.as_deref()) {
            if !out.contains(&column) {
                out.push(column);
            }
        }
        out
    }
}
