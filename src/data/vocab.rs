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
    fn write_u64(&mut self, value: u64) {
        self.add(value);
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

/// A map from raw values to ids, with three fast paths that keep lookups inside small,
/// cache-friendly memory: a value that is a canonical integer (`0` or digits without a
/// leading zero) indexes a dense array below [`DENSE_LIMIT`] and is a `u64` key of a hash
/// table up to 19 digits; any other value of up to 15 bytes is packed into a `u128` key
/// stored inline in a hash table. Longer values use a map of boxed strings. Each value has
/// exactly one representation, so the four never disagree.
#[derive(Clone, Debug, Default)]
pub(crate) struct ValueIndex {
    dense: Vec<u32>,
    dense_len: usize,
    integers: IntegerIndex,
    short: FastMap<u128, u32>,
    long: FastMap<Box<str>, u32>,
}

/// Canonical integers of [`DENSE_LIMIT`] and above → ids: open addressing with linear
/// probing over one array of `(key, id)` slots, at most half full, so that a lookup usually
/// reads one cache line (an id table of many distinct ids is larger than the caches, and
/// the lookups of train's ids are most of its reading time). A free slot holds [`NO_KEY`].
#[derive(Clone, Debug, Default)]
struct IntegerIndex {
    slots: Vec<(u64, u32)>,
    len: usize,
    /// 64 less log2 of the slots: a key's first slot is the top bits of its hash.
    shift: u32,
}

/// Never a key (keys have at most 19 digits, so they are below 10^19 < u64::MAX).
const NO_KEY: u64 = u64::MAX;

impl IntegerIndex {
    #[inline]
    fn first_slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut at = self.first_slot(key);
        loop {
            let (k, id) = self.slots[at];
            if k == key {
                return Some(id);
            }
            if k == NO_KEY {
                return None;
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds `key` with `id` unless present; returns its id.
    #[inline]
    fn get_or_insert(&mut self, key: u64, id: u32) -> u32 {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut at = self.first_slot(key);
        loop {
            let (k, existing) = self.slots[at];
            if k == key {
                return existing;
            }
            if k == NO_KEY {
                self.slots[at] = (key, id);
                self.len += 1;
                return id;
            }
            at = (at + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let slots = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![(NO_KEY, 0); slots]);
        self.shift = 64 - slots.trailing_zeros();
        self.len = 0;
        for (key, id) in old.into_iter().filter(|&(key, _)| key != NO_KEY) {
            self.get_or_insert(key, id);
        }
    }
}

/// Integers below this use the dense array (at most 4 MiB per column).
const DENSE_LIMIT: u64 = 1 << 20;
/// A free slot of the dense array.
const ABSENT: u32 = u32::MAX;

/// The value as a canonical integer of at most 19 digits (so below 10^19 < 2^64). Eight
/// digits and more are read eight at a time ([`eight_digits`]): a vocabulary of large ids
/// (13-digit ids are common) parses every one of them, on every row.
#[inline]
fn canonical_integer(value: &str) -> Option<u64> {
    let bytes = value.as_bytes();
    let length = bytes.len();
    if length == 0 || length > 19 || (bytes[0] == b'0' && length > 1) {
        return None;
    }
    if length < 8 {
        return digit_by_digit(bytes);
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let last = eight_digits(word(length - 8))?;
    if length == 8 {
        return Some(last);
    }
    if length <= 16 {
        // The first `length - 8` digits, moved to the end of a word filled with zeros before them.
        let leading = length - 8;
        let word = (word(0) << (8 * (8 - leading))) | ZERO_DIGITS.checked_shr(8 * leading as u32).unwrap_or(0);
        return Some(eight_digits(word)? * 100_000_000 + last);
    }
    let middle = eight_digits(word(length - 16))?;
    let first = digit_by_digit(&bytes[..length - 16])?;
    Some((first * 100_000_000 + middle) * 100_000_000 + last)
}

/// At most 19 ASCII digits as their number (None if a byte is not a digit).
#[inline]
fn digit_by_digit(bytes: &[u8]) -> Option<u64> {
    let mut number = 0u64;
    for &b in bytes {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        number = number * 10 + digit as u64;
    }
    Some(number)
}

/// Eight `b'0'` bytes.
const ZERO_DIGITS: u64 = 0x3030_3030_3030_3030;

/// The number that eight ASCII digits spell (the first digit in the lowest byte of `word`,
/// as `u64::from_le_bytes` reads text), None if a byte is not a digit: each step joins
/// neighbouring lanes (digits into pairs, pairs into fours, fours into the eight).
#[inline]
fn eight_digits(word: u64) -> Option<u64> {
    const HIGH_NIBBLES: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    // A digit is 0x30..=0x39: its high nibble is 3, and still is after adding 6.
    if word & HIGH_NIBBLES != ZERO_DIGITS || word.wrapping_add(0x0606_0606_0606_0606) & HIGH_NIBBLES != ZERO_DIGITS {
        return None;
    }
    let digits = word - ZERO_DIGITS;
    let pairs = (digits.wrapping_mul(10) + (digits >> 8)) & 0x00ff_00ff_00ff_00ff;
    let fours = (pairs.wrapping_mul(100) + (pairs >> 16)) & 0x0000_ffff_0000_ffff;
    Some((fours.wrapping_mul(10_000) + (fours >> 32)) & 0xffff_ffff)
}

/// The bytes of a short value followed by zeros, its length in the last byte. The bytes are
/// read as whole words (two overlapping ones for the lengths between), so the key is built
/// in registers, not through a copy to memory.
#[inline]
fn pack(value: &str) -> Option<u128> {
    let bytes = value.as_bytes();
    let length = bytes.len();
    if length > 15 {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as u128;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as u128;
    // Where two reads overlap they read the same bytes, so OR-ing them is exact.
    let text = match length {
        0 => 0,
        1..=3 => {
            let middle = length / 2;
            bytes[0] as u128
                | (bytes[middle] as u128) << (8 * middle)
                | (bytes[length - 1] as u128) << (8 * (length - 1))
        }
        4..=7 => u32_at(0) | u32_at(length - 4) << (8 * (length - 4)),
        _ => u64_at(0) | u64_at(length - 8) << (8 * (length - 8)),
    };
    Some(text | (length as u128) << 120)
}

impl ValueIndex {
    #[inline]
    pub fn get(&self, value: &str) -> Option<u32> {
        if let Some(number) = canonical_integer(value) {
            if number < DENSE_LIMIT {
                return self.dense.get(number as usize).copied().filter(|&id| id != ABSENT);
            }
            return self.integers.get(number);
        }
        match pack(value) {
            Some(key) => self.short.get(&key).copied(),
            None => self.long.get(value).copied(),
        }
    }

    /// Adds `value` unless present; returns the id it has afterwards.
    #[inline]
    pub fn get_or_insert(&mut self, value: &str, id: u32) -> u32 {
        if let Some(number) = canonical_integer(value) {
            if number >= DENSE_LIMIT {
                return self.integers.get_or_insert(number, id);
            }
            let number = number as usize;
            if number >= self.dense.len() {
                let grown = (number + 1).next_power_of_two().min(DENSE_LIMIT as usize);
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
        self.dense_len + self.integers.len + self.short.len() + self.long.len()
    }
}

/// Collects the distinct values of a column while the train split is read: provisional ids in
/// first-seen order plus a count per value. Values are registered by [`intern`](Self::intern)
/// and counted separately ([`count`](Self::count)), so that a reader can register the values
/// of rows it may still discard and count only the rows it keeps; values registered and never
/// counted are never kept (sequence items looked up through a categorical column's
/// vocabulary are such values). The values' bytes live in one buffer.
#[derive(Default)]
pub(crate) struct Interner {
    ids: ValueIndex,
    text: String,
    /// Where each value's bytes end in `text` (its start is the previous value's end).
    ends: Vec<usize>,
    counts: Vec<u64>,
}

impl Interner {
    /// The provisional id of `value` (registered if new, not counted).
    #[inline]
    pub fn intern(&mut self, value: &str) -> u32 {
        let next = self.ends.len() as u32;
        let id = self.ids.get_or_insert(value, next);
        if id == next {
            self.text.push_str(value);
            self.ends.push(self.text.len());
            self.counts.push(0);
        }
        id
    }

    /// Counts one occurrence of the value with provisional id `id`.
    #[inline]
    pub fn count(&mut self, id: u32) {
        self.counts[id as usize] += 1;
    }

    /// The value of provisional id `id`.
    fn value(&self, id: usize) -> &str {
        let start = if id == 0 { 0 } else { self.ends[id - 1] };
        &self.text[start..self.ends[id]]
    }

    /// Adds the values and counts of `other` (in its id order, so the values new here get
    /// ids in the order `other` first saw them); returns the id here of each id of `other`.
    pub fn absorb(&mut self, other: &Interner) -> Vec<u32> {
        (0..other.ends.len())
            .map(|id| {
                let here = self.intern(other.value(id));
                self.counts[here as usize] += other.counts[id];
                here
            })
            .collect()
    }

    /// The final vocabulary and the map from provisional id to final id.
    pub fn into_vocab(mut self, limits: VocabLimits) -> (Vocab, Vec<u32>) {
        // The vocabulary builds an index of its own: this one goes first, so that the two
        // are never held at once (each is about 0.2 GB for the 100× replica's 4.2M ids).
        self.ids = ValueIndex::default();
        let min_count = limits.min_count.max(1);
        let mut kept: Vec<u32> =
            (0..self.ends.len() as u32).filter(|&id| self.counts[id as usize] >= min_count).collect();
        kept.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            self.counts[b].cmp(&self.counts[a]).then_with(|| self.value(a).cmp(self.value(b)))
        });
        if let Some(max_size) = limits.max_size {
            kept.truncate(max_size);
        }
        let mut remap = vec![OOV; self.ends.len()];
        for (rank, &id) in kept.iter().enumerate() {
            remap[id as usize] = RESERVED + rank as u32;
        }
        let values: Vec<String> = kept.iter().map(|&id| self.value(id as usize).to_string()).collect();
        let counts = kept.iter().map(|&id| self.counts[id as usize]).collect();
        let vocab = Vocab::from_parts(values, counts, limits);
        if vocab.buckets > 0 {
            for (id, slot) in remap.iter_mut().enumerate() {
                if *slot == OOV {
                    *slot = vocab.bucket(self.value(id));
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
            add(&mut interner, value);
        }
        interner.intern("uncounted");
        for value in ["7", "07", "1048576", "10485760000000000000", "a long value of many bytes"] {
            add(&mut interner, value);
            add(&mut interner, value);
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
            add(&mut interner, value);
        }
        interner.intern("seen-in-a-sequence");
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
            add(&mut i, "x");
            i.into_vocab(VocabLimits::min_count(1))
        };
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"min_count":1,"values":["x"],"counts":[1]}"#);
    }

    #[test]
    fn the_index_finds_every_value_it_was_given_and_no_other() {
        let value = |i: u64| match i % 4 {
            0 => (i * 7919).to_string(),
            1 => (1_000_000_000_000 * (i % 13) + i).to_string(),
            2 => format!("v{i}"),
            _ => format!("{i:0>20}"),
        };
        let mut index = ValueIndex::default();
        for i in 0..5000 {
            assert_eq!(index.get_or_insert(&value(i), i as u32), i as u32);
        }
        for i in 0..5000 {
            assert_eq!(index.get(&value(i)), Some(i as u32));
            assert_eq!(index.get_or_insert(&value(i), 9999), i as u32);
        }
        assert_eq!(index.len(), 5000);
        for absent in ["1", "99999999999999999", "18446744073709551615", "v5001", "007", ""] {
            assert_eq!(index.get(absent), None, "{absent}");
        }
    }

    #[test]
    fn keys_read_a_word_at_a_time_are_those_read_byte_by_byte() {
        let reference = |value: &str| -> Option<u64> {
            let bytes = value.as_bytes();
            let canonical = !bytes.is_empty() && bytes.len() <= 19 && (bytes[0] != b'0' || bytes.len() == 1);
            (canonical && bytes.iter().all(u8::is_ascii_digit)).then(|| value.parse().expect("digits"))
        };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut values: Vec<String> =
            ["", "0", "00", "7", "1048576", "12345678", "9999999999999999999", "18446744073709551615"]
                .iter()
                .map(|v| v.to_string())
                .collect();
        for length in 1..=21 {
            for _ in 0..200 {
                let mut digits: Vec<u8> = (0..length).map(|_| b'0' + (next() % 10) as u8).collect();
                values.push(String::from_utf8(digits.clone()).unwrap());
                // One byte that is not a digit (or a leading zero), at a random place.
                let at = (next() % length as u64) as usize;
                digits[at] = [b'/', b':', b'a', b' ', b'-', b'0', 0x7f][(next() % 7) as usize];
                values.push(String::from_utf8(digits).unwrap());
            }
            values.push(format!("{}\u{e9}", "1".repeat(length)));
        }
        for value in &values {
            assert_eq!(canonical_integer(value), reference(value), "{value:?}");
        }
        // Short values are packed as their bytes, zeros, and the length in the last byte.
        for length in 0..=16 {
            let value: String = (0..length).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
            let expected = (length <= 15).then(|| {
                let mut packed = [0u8; 16];
                packed[..length].copy_from_slice(value.as_bytes());
                packed[15] = length as u8;
                u128::from_le_bytes(packed)
            });
            assert_eq!(pack(&value), expected, "{value:?}");
        }
    }

    #[test]
    fn the_bucket_hash_is_the_function_docs_serving_spells_out() {
        // From scripts/onnx_score.py's `bucket_hash`, written from that description.
        let expected = [
            ("", 0),
            ("abc", 11666850765916551101),
            ("abcdefgh", 16645297733576556862),
            ("12345678901", 3601799087326043346),
            ("ünïcode value 1", 16521854292252075933u64),
        ];
        for (value, hash) in expected {
            let mut hasher = WordHasher::default();
            hasher.write(value.as_bytes());
            assert_eq!(hasher.finish(), hash, "{value}");
        }
    }

    fn add(interner: &mut Interner, value: &str) {
        let id = interner.intern(value);
        interner.count(id);
    }

    fn clone_of(interner: &Interner) -> Interner {
        let mut copy = Interner::default();
        copy.absorb(interner);
        copy
    }

    #[test]
    fn absorbing_interners_counts_as_one_interner_over_all_their_values() {
        let values = ["b", "7", "1048576", "99999999999999", "a", "b", "a long value of many bytes", "7", "c"];
        let mut whole = Interner::default();
        values.iter().for_each(|v| add(&mut whole, v));
        let (mut first, mut second) = (Interner::default(), Interner::default());
        values[..4].iter().for_each(|v| add(&mut first, v));
        values[4..].iter().for_each(|v| add(&mut second, v));
        second.intern("only registered");
        let map = first.absorb(&second);
        // The ids `second` gave its values, as `first` knows them now.
        assert_eq!(map, [4, 0, 5, 1, 6, 7]);
        for limits in [VocabLimits::min_count(1), VocabLimits { min_count: 1, max_size: Some(3), buckets: 4 }] {
            let (merged, _) = clone_of(&first).into_vocab(limits);
            let (expected, _) = clone_of(&whole).into_vocab(limits);
            assert_eq!(merged, expected);
            assert_eq!(merged.id("only registered"), expected.id("only registered"));
        }
    }
}
