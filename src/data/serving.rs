//! The fitted encoders as a serving system needs them: how a raw CSV value becomes the id or
//! number a model input takes (`mdl export` writes it beside the model as
//! `<model>.features.json`; docs/serving.md documents the format, `mdl-features/1`, or
//! `mdl-features/2` where a vocabulary hashes the values it does not keep).
//!
//! The rules are those of [`super::encode`], written out as data: a kept value's id is
//! `offset + 2 + its position in values`, any other value's is `offset + 1` (out of
//! vocabulary), or with `buckets` B (`hash_buckets`) `offset + 2 + len(values) + hash(value)
//! mod B` ([`super::vocab`]'s hash, which docs/serving.md spells out); sequence padding is
//! id 0 with mask 0; a numeric value is `(x - shift) * scale` in f64, rounded to f32, and an
//! empty cell is 0; a domain id is the cell's integer.

use super::encode::Fitted;
use super::schema::FeatureGroup;
use super::vocab::{Vocab, OOV};
use super::UnknownDomain;
use serde::Serialize;

/// The format tag of a file without hashed ids.
pub const FORMAT: &str = "mdl-features/1";
/// The format tag of a file where some vocabulary has `buckets` (a reader of
/// `mdl-features/1` would give the values they hash the out-of-vocabulary id instead).
pub const FORMAT_WITH_BUCKETS: &str = "mdl-features/2";

/// The format tag for these inputs: [`FORMAT_WITH_BUCKETS`] when a vocabulary has buckets.
pub fn format_of(inputs: &[GroupEncoding]) -> &'static str {
    let hashed = inputs.iter().any(|g| match g {
        GroupEncoding::Categorical { columns, .. } => columns.iter().any(|c| c.buckets > 0),
        GroupEncoding::Sequence { buckets, .. } => *buckets > 0,
        _ => false,
    });
    if hashed {
        FORMAT_WITH_BUCKETS
    } else {
        FORMAT
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One categorical column: its id offset in the group and its kept values in id order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColumnVocab {
    pub column: String,
    pub offset: u32,
    /// Kept values; the value at position `i` has id `offset + 2 + i`.
    pub values: Vec<String>,
    /// Hashed ids after the kept values, for the values not kept (0: they are out of
    /// vocabulary); written only when not 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub buckets: u32,
}

/// One numeric column's normalisation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColumnNormalizer {
    pub column: String,
    pub shift: f64,
    pub scale: f64,
}

/// How one feature group (or the domain) becomes model inputs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GroupEncoding {
    /// Input `[B, columns]` of int64 ids.
    Categorical { name: String, columns: Vec<ColumnVocab> },
    /// Input `[B, columns, max_len]` of int64 ids and `mask` of float32 0/1 (absent when the
    /// model reads no mask of the group); every column's items go through one vocabulary
    /// (`values`, offset `offset`).
    Sequence {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        mask: Option<String>,
        columns: Vec<String>,
        max_len: usize,
        offset: u32,
        values: Vec<String>,
        /// As a categorical column's `buckets`.
        #[serde(skip_serializing_if = "is_zero")]
        buckets: u32,
    },
    /// Input `[B, columns]` of float32.
    Numeric { name: String, columns: Vec<ColumnNormalizer> },
    /// Input `[B]` of int64 domain ids `0..domains`; another id is an error, or with
    /// `unknown_domain` set, that domain.
    Domain { name: String, column: String, domains: usize, unknown_domain: Option<u32> },
}

impl GroupEncoding {
    /// The model input the group feeds (its ids, or its numbers).
    pub fn input(&self) -> &str {
        match self {
            GroupEncoding::Categorical { name, .. }
            | GroupEncoding::Sequence { name, .. }
            | GroupEncoding::Numeric { name, .. }
            | GroupEncoding::Domain { name, .. } => name,
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FeatureEncoding {
    pub format: &'static str,
    /// The model file it belongs to.
    pub model: String,
    /// The model's outputs: one probability `[B]` per task, named after it.
    pub tasks: Vec<String>,
    /// Id of an unknown value relative to a column's offset, and of sequence padding.
    pub oov: u32,
    pub pad: u32,
    pub inputs: Vec<GroupEncoding>,
}

fn kept_values(vocab: &Vocab) -> Vec<String> {
    (OOV + 1..vocab.len() as u32).filter_map(|id| vocab.value(id).map(str::to_string)).collect()
}

impl Fitted {
    /// Every group's encoding, in schema order, then the domain (named `domain_input`,
    /// the model's name for it, when it has one).
    pub fn feature_encoding(&self, domain_input: Option<&str>, unknown_domain: UnknownDomain) -> Vec<GroupEncoding> {
        let layout = self.layout();
        let sequence_vocabs = self.sequence_vocabs();
        let (mut cat, mut seq, mut num) = (0, 0, 0);
        let mut out = Vec::new();
        for group in &self.schema.features {
            match group {
                FeatureGroup::Categorical { name, columns, .. } => {
                    let vocabs = &self.vocabs.categorical[cat];
                    let offsets = &layout.categorical[cat].offsets;
                    let columns = columns
                        .iter()
                        .zip(vocabs)
                        .zip(offsets)
                        .map(|((column, vocab), &offset)| ColumnVocab {
                            column: column.clone(),
                            offset,
                            values: kept_values(vocab),
                            buckets: vocab.buckets(),
                        })
                        .collect();
                    out.push(GroupEncoding::Categorical { name: crate::lower::ids_input(name), columns });
                    cat += 1;
                }
                FeatureGroup::Sequence { name, columns, max_len, .. } => {
                    let (offset, values, buckets) = sequence_vocabs
                        .get(seq)
                        .map_or((0, Vec::new(), 0), |&(vocab, offset)| (offset, kept_values(vocab), vocab.buckets()));
                    out.push(GroupEncoding::Sequence {
                        name: crate::lower::ids_input(name),
                        mask: Some(crate::lower::mask_input(name)),
                        columns: columns.clone(),
                        max_len: *max_len,
                        offset,
                        values,
                        buckets,
                    });
                    seq += 1;
                }
                FeatureGroup::Numeric { name, columns, .. } => {
                    let columns = columns
                        .iter()
                        .zip(&self.normalizers[num])
                        .map(|(column, n)| ColumnNormalizer { column: column.clone(), shift: n.shift, scale: n.scale })
                        .collect();
                    out.push(GroupEncoding::Numeric { name: crate::lower::ids_input(name), columns });
                    num += 1;
                }
            }
        }
        if let (Some(spec), Some(name)) = (&self.schema.domain, domain_input) {
            out.push(GroupEncoding::Domain {
                name: name.to_string(),
                column: spec.column.clone(),
                domains: self.domains,
                unknown_domain: match unknown_domain {
                    UnknownDomain::Error => None,
                    UnknownDomain::Fallback(d) => Some(d),
                },
            });
        }
        out
    }
}
