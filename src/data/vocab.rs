//! Vocabularies: raw string values → dense ids, fitted on the train split only.
//!
//! Id 0 is padding ([`PAD`]), id 1 is out-of-vocabulary ([`OOV`]); kept values follow from 2 in
//! descending train count, ties broken by the raw string's byte order, so the same train file
//! always gives the same ids. A value seen fewer than `min_count` times in train, or never,
//! maps to OOV. An empty cell of a categorical column is the value `""` and gets an id like any
//! other value (missingness can be informative); an empty sequence cell is simply a sequence of
//! length 0.
//!
//! For open id spaces ([`VocabLimits`]): `max_size` keeps only the most frequent values (by
//! the same order), and with `buckets` B every value not kept (rare, beyond `max_size`, or
//! never seen in train) gets one of B hashed ids after the kept ones instead of OOV: id
//! `2 + kept + hash(value) mod B`, where the hash is a fixed function of the value's bytes,
//! so the same value always lands in the same bucket.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Padding id (never a real value).
pub const PAD: u32 = 0;
/// Out-of-vocabulary id: unseen or rare values.
pub const OOV: u32 = 1;
/// The number of reserved ids before the first real value.
const RESERVED: u32 = 2;

/// A fast non-cryptographic string hasher (multiply-rotate over 8-byte words, then a
/// 64-bit finaliser so that every output bit depends on every input bit); the inputs are
/// local data files, so hash flooding is not a concern.
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher {
    hash: u64,
}

impl WordHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for WordHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u128(&mut self, value: u128) {
        self.add(value as u64);
        self.add((value >> 64) as u64);
    }

    #[inline]
    fn write_u8(&mut self, byte: u8) {
        self.add(byte as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.hash;
        h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// A map from raw values to ids, with two fast paths that keep lookups inside small, cache-
/// friendly memory: a value that is a canonical small integer (`0` or digits without a leading
/// zero, below [`DENSE_LIMIT`]) indexes a dense array; any other value of up to 15 bytes is
/// packed into a `u128` key stored inline in a hash table. Longer values use a map of boxed
/// strings. Each value has exactly one representation, so the three never disagree.
#[derive(Clone, Debug, Default)]
pub(crate) struct ValueIndex {
    dense: Vec<u32>,
    dense_len: usize,
    short: FastMap<u128, u32>,
    long: FastMap<Box<str>, u32>,
}

/// Integers below this use the dense array (at most 4 MiB per column).
const DENSE_LIMIT: usize = 1 << 20;
/// A free slot of the dense array.
const ABSENT: u32 = u32::MAX;

/// The value as a canonical integer below [`DENSE_LIMIT`].
#[inline]
fn small_integer(value: &str) -> Option<usize> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 7 || (bytes[0] == b'0' && bytes.len() > 1) {
        return None;
    }
    let mut number = 0usize;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        number = number * 10 + (b - b'0') as usize;
    }
    (number < DENSE_LIMIT).then_some(number)
}

/// The bytes of a short value followed by zeros, its length in the last byte.
#[inline]
fn pack(value: &str) -> Option<u128> {
    let bytes = value.as_bytes();
    if bytes.len() > 15 {
        return None;
    }
    let mut packed = [0u8; 16];
    packed[..bytes.len()].copy_from_slice(bytes);
    packed[15] = bytes.len() as u8;
    Some(u128::from_le_bytes(packed))
}

impl ValueIndex {
    #[inline]
    pub fn get(&self, value: &str) -> Option<u32> {
        if let Some(number) = small_integer(value) {
            return self.dense.get(number).copied().filter(|&id| id != ABSENT);
        }
        match pack(value) {
            Some(key) => self.short.get(&key).copied(),
            None => self.long.get(value).copied(),
        }
    }

    /// Adds `value` unless present; returns the id it has afterwards.
    pub fn get_or_insert(&mut self, value: &str, id: u32) -> u32 {
        if let Some(number) = small_integer(value) {
            if number >= self.dense.len() {
                let grown = (number + 1).next_power_of_two().min(DENSE_LIMIT);
                self.dense.resize(grown, ABSENT);
            }
            let slot = &mut self.dense[number];
            if *slot == ABSENT {
                *slot = id;
                self.dense_len += 1;
            }
            return *slot;
        }
        match pack(value) {
            Some(key) => *self.short.entry(key).or_insert(id),
            None => match self.long.get(value) {
                Some(&existing) => existing,
                None => {
                    self.long.insert(value.into(), id);
                    id
                }
            },
        }
    }

    pub fn len(&self) -> usize {
        self.dense_len + self.short.len() + self.long.len()
    }
}

/// Collects the distinct values of a column while the train split is read: provisional ids in
/// first-seen order plus a count per value. Values can also be registered without being
/// counted (sequence items looked up through a categorical column's vocabulary).
#[derive(Default)]
pub(crate) struct Interner {
    ids: ValueIndex,
    values: Vec<Box<str>>,
    counts: Vec<u64>,
}

impl Interner {
    /// The provisional id of `value`, counting one occurrence when `count` is set.
    #[inline]
    pub fn intern(&mut self, value: &str, count: bool) -> u32 {
        let next = self.values.len() as u32;
        let id = self.ids.get_or_insert(value, next);
        if id == next {
            self.values.push(value.into());
            self.counts.push(0);
        }
        if count {
            self.counts[id as usize] += 1;
        }
        id
    }

    /// The final vocabulary and the map from provisional id to final id.
    pub fn into_vocab(self, limits: VocabLimits) -> (Vocab, Vec<u32>) {
        let min_count = limits.min_count.max(1);
        let mut kept: Vec<u32> =
            (0..self.values.len() as u32).filter(|&id| self.counts[id as usize] >= min_count).collect();
        kept.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            self.counts[b].cmp(&self.counts[a]).then_with(|| self.values[a].cmp(&self.values[b]))
        });
        if let Some(max_size) = limits.max_size {
            kept.truncate(max_size);
        }
        let mut remap = vec![OOV; self.values.len()];
        for (rank, &id) in kept.iter().enumerate() {
            remap[id as usize] = RESERVED + rank as u32;
        }
        let values: Vec<String> = kept.iter().map(|&id| self.values[id as usize].to_string()).collect();
        let counts = kept.iter().map(|&id| self.counts[id as usize]).collect();
        let vocab = Vocab::from_parts(values, counts, limits);
        if vocab.buckets > 0 {
            for (id, slot) in remap.iter_mut().enumerate() {
                if *slot == OOV {
                    *slot = vocab.bucket(&self.values[id]);
                }
            }
        }
        (vocab, remap)
    }
}

/// How many values a vocabulary keeps and what the others become (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabLimits {
    /// Values seen fewer times in train are not kept.
    pub min_count: u64,
    /// At most this many values are kept, the most frequent.
    pub max_size: Option<usize>,
    /// Hashed ids for the values not kept (0: they are OOV).
    pub buckets: u32,
}

impl VocabLimits {
    /// Every value seen `min_count` times, the others OOV.
    pub fn min_count(min_count: u64) -> VocabLimits {
        VocabLimits { min_count, max_size: None, buckets: 0 }
    }
}

/// A fitted vocabulary. Serialises as `{min_count, values, counts}` (values in id order from
/// 2), with `max_size` and `buckets` when they are set.
#[derive(Clone, Debug)]
pub struct Vocab {
    values: Vec<String>,
    counts: Vec<u64>,
    min_count: u64,
    max_size: Option<usize>,
    buckets: u32,
    index: ValueIndex,
}

impl PartialEq for Vocab {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
            && self.counts == other.counts
            && self.min_count == other.min_count
            && self.max_size == other.max_size
            && self.buckets == other.buckets
    }
}

impl Vocab {
    fn from_parts(values: Vec<String>, counts: Vec<u64>, limits: VocabLimits) -> Vocab {
        let mut index = ValueIndex::default();
        for (i, value) in values.iter().enumerate() {
            index.get_or_insert(value, RESERVED + i as u32);
        }
        let VocabLimits { min_count, max_size, buckets } = limits;
        Vocab { values, counts, min_count, max_size, buckets, index }
    }

    /// The hashed id of a value that is not kept (OOV without buckets).
    fn bucket(&self, value: &str) -> u32 {
        if self.buckets == 0 {
            return OOV;
        }
        let mut hasher = WordHasher::default();
        hasher.write(value.as_bytes());
        RESERVED + self.values.len() as u32 + (hasher.finish() % self.buckets as u64) as u32
    }

    /// The number of ids including PAD, OOV and the hashed ones: the rows of an embedding
    /// table for it.
    pub fn len(&self) -> usize {
        self.values.len() + RESERVED as usize + self.buckets as usize
    }

    /// Whether no value was kept (only PAD and OOV exist).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The id of a raw value; when it was not kept, its hashed id or [`OOV`].
    #[inline]
    pub fn id(&self, value: &str) -> u32 {
        self.index.get(value).unwrap_or_else(|| self.bucket(value))
    }

    /// The id of a raw value when it was kept.
    #[inline]
    pub fn get(&self, value: &str) -> Option<u32> {
        self.index.get(value)
    }

    /// The number of hashed ids (after the kept values).
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The raw value of a kept id (None for PAD, OOV, hashed ids and ids out of range).
    pub fn value(&self, id: u32) -> Option<&str> {
        id.checked_sub(RESERVED).and_then(|i| self.values.get(i as usize)).map(String::as_str)
    }

    /// The train count of a kept id.
    pub fn count(&self, id: u32) -> Option<u64> {
        id.checked_sub(RESERVED).and_then(|i| self.counts.get(i as usize)).copied()
    }

    pub fn min_count(&self) -> u64 {
        self.min_count
    }
}

#[derive(Serialize)]
struct VocabView<'a> {
    min_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_size: Option<usize>,
    #[serde(skip_serializing_if = "is_zero")]
    buckets: u32,
    values: &'a [String],
    counts: &'a [u64],
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VocabData {
    min_count: u64,
    #[serde(default)]
    max_size: Option<usize>,
    #[serde(default)]
    buckets: u32,
    values: Vec<String>,
    counts: Vec<u64>,
}

impl Serialize for Vocab {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        VocabView {
            min_count: self.min_count,
            max_size: self.max_size,
            buckets: self.buckets,
            values: &self.values,
            counts: &self.counts,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let data = VocabData::deserialize(deserializer)?;
        if data.values.len() != data.counts.len() {
            return Err(serde::de::Error::custom("vocab values and counts differ in length"));
        }
        if data.max_size.is_some_and(|max| data.values.len() > max) {
            return Err(serde::de::Error::custom("vocab holds more values than its max_size"));
        }
        let limits = VocabLimits { min_count: data.min_count, max_size: data.max_size, buckets: data.buckets };
        let vocab = Vocab::from_parts(data.values, data.counts, limits);
        if vocab.index.len() != vocab.values.len() {
            return Err(serde::de::Error::custom("vocab lists a value twice"));
        }
        Ok(vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_by_count_then_string_with_min_count() {
        let mut interner = Interner::default();
        for value in ["b", "a", "c", "b", "a", "d", "d", "d", "rare"] {
            interner.intern(value, true);
        }
        interner.intern("uncounted", false);
        for value in ["7", "07", "1048576", "10485760000000000000", "a long value of many bytes"] {
            interner.intern(value, true);
            interner.intern(value, true);
        }
        let (vocab, remap) = interner.into_vocab(VocabLimits::min_count(2));
        // d (3), then the values seen twice in byte order, c/rare/uncounted below min_count.
        assert_eq!(vocab.id("d"), 2);
        let twice = ["07", "1048576", "10485760000000000000", "7", "a", "a long value of many bytes", "b"];
        for (rank, value) in twice.iter().enumerate() {
            assert_eq!(vocab.id(value), 3 + rank as u32, "{value}");
        }
        assert_eq!(vocab.id("007"), OOV);
        assert_eq!(vocab.id("c"), OOV);
        assert_eq!(vocab.id("rare"), OOV);
        assert_eq!(vocab.id("uncounted"), OOV);
        assert_eq!(vocab.len(), 10);
        assert_eq!(&remap[..6], &[9, 7, OOV, 2, OOV, OOV]);
        assert_eq!(vocab.value(7), Some("a"));
        assert_eq!(vocab.value(PAD), None);
        let json = serde_json::to_string(&vocab).expect("serialise");
        let back: Vocab = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, vocab);
        assert_eq!(back.id("b"), 9);
        assert_eq!(back.id("7"), 6);
    }

    #[test]
    fn max_size_keeps_the_most_frequent_and_buckets_hash_the_rest() {
        let mut interner = Interner::default();
        for value in ["a", "a", "a", "b", "b", "c", "c", "d", "e"] {
            interner.intern(value, true);
        }
        interner.intern("seen-in-a-sequence", false);
        let limits = VocabLimits { min_count: 1, max_size: Some(2), buckets: 0 };
        let (capped, remap) = Interner::into_vocab(clone_of(&interner), limits);
        assert_eq!((capped.id("a"), capped.id("b"), capped.id("c")), (2, 3, OOV), "b and c tie: b first");
        assert_eq!(capped.len(), 4);
        assert_eq!(&remap[..4], &[2, 3, OOV, OOV]);

        let limits = VocabLimits { min_count: 2, max_size: Some(2), buckets: 5 };
        let (hashed, remap) = interner.into_vocab(limits);
        assert_eq!(hashed.len(), 2 + 2 + 5);
        for value in ["c", "d", "e", "never seen", "seen-in-a-sequence"] {
            let id = hashed.id(value);
            assert!((4..9).contains(&id), "{value}: {id}");
            assert_eq!(hashed.id(value), id, "the same value, the same bucket");
            assert_eq!(hashed.value(id), None);
        }
        // A value the train split had gets through the remap the id the vocabulary gives it.
        assert_eq!(remap, [2, 3, hashed.id("c"), hashed.id("d"), hashed.id("e"), hashed.id("seen-in-a-sequence")]);
        let json = serde_json::to_string(&hashed).expect("serialise");
        assert!(json.contains("\"max_size\":2") && json.contains("\"buckets\":5"), "{json}");
        let back: Vocab = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, hashed);
        assert_eq!(back.id("never seen"), hashed.id("never seen"));
        // Without limits nothing new is written.
        let (plain, _) = {
            let mut i = Interner::default();
            i.intern("x", true);
            i.into_vocab(VocabLimits::min_count(1))
        };
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"min_count":1,"values":["x"],"counts":[1]}"#);
    }

    fn clone_of(interner: &Interner) -> Interner {
        let mut copy = Interner::default();
        for (value, &count) in interner.values.iter().zip(&interner.counts) {
            let id = copy.intern(value, false);
            copy.counts[id as usize] = count;
        }
        copy
    }
}
