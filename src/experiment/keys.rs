//! The keys an experiment may hold, read from the serde derive of the structs that parse
//! it, so that there is no second list of keys to keep in step with them; and the check of
//! one file's keys, which reports the first unknown key at its line with the nearest known
//! one ("did you mean").
//!
//! [`Keys::of`] traces a type's `Deserialize` impl with a probing deserializer: a derived
//! struct names its fields when it asks for a struct, and a struct with
//! `deny_unknown_fields` refuses a key that is none of them. Following each field the
//! same way finds the structs inside (through `Option`, lists and newtypes). Maps, enums
//! and structs that take unknown keys accept any key; their values are checked when the
//! whole experiment is parsed.

use crate::diag::suggest;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::cell::RefCell;
use std::fmt;

/// The keys of one mapping: the fields of a struct that refuses unknown keys, and the keys
/// of what a field holds where that is such a struct too (or a list of them).
#[derive(Clone, Debug, PartialEq)]
pub struct Keys {
    fields: &'static [&'static str],
    nested: Vec<(&'static str, Keys)>,
}

/// Structs inside structs deeper than this are not followed (a type that contains itself).
const MAX_DEPTH: usize = 8;

impl Keys {
    /// The keys `T`'s `Deserialize` accepts; `None` when it takes any (not a struct, or one
    /// without `deny_unknown_fields`).
    pub fn of<T: DeserializeOwned>() -> Option<Keys> {
        Keys::at::<T>(&mut Vec::new())
    }

    /// The keys of the value at `path` (field names from `T` down).
    fn at<T: DeserializeOwned>(path: &mut Vec<&'static str>) -> Option<Keys> {
        let found = RefCell::new(None);
        let _ = T::deserialize(Probe { path, depth: 0, found: &found });
        let Some(Traced { fields, denies_unknown: true }) = found.into_inner() else { return None };
        let mut nested = Vec::new();
        if path.len() < MAX_DEPTH {
            for &field in fields {
                path.push(field);
                if let Some(keys) = Keys::at::<T>(path) {
                    nested.push((field, keys));
                }
                path.pop();
            }
        }
        Some(Keys { fields, nested })
    }

    /// The keys under `field`, where it holds a struct of its own.
    pub fn nested(&self, field: &str) -> Option<&Keys> {
        self.nested.iter().find(|(f, _)| *f == field).map(|(_, k)| k)
    }

    /// Checks the keys of a file being read against these: the error names the first
    /// unknown key with the nearest known one (serde_yaml adds its line and path).
    pub fn check<'de, D: de::Deserializer<'de>>(&self, file: D) -> Result<(), D::Error> {
        Check { keys: self, path: None }.deserialize(file)
    }

    /// [`Keys::check`] for a value without positions (a merged experiment): the error
    /// names the key's path, e.g. `train.stages[0]`.
    pub fn check_value(&self, value: &serde_yaml::Value) -> Result<(), String> {
        Check { keys: self, path: Some(String::new()) }.deserialize(value).map_err(|e| e.to_string())
    }
}

/// A struct's fields as the probe saw them.
struct Traced {
    fields: &'static [&'static str],
    denies_unknown: bool,
}

/// Deserializes nothing: it follows `path` down through the structs that ask for it and,
/// at its end, records the struct asked for ([`Traced`]); then it stops with an error.
struct Probe<'p> {
    path: &'p [&'static str],
    depth: usize,
    found: &'p RefCell<Option<Traced>>,
}

/// How a probe ends: always an error, to stop the derived code; `UnknownField` tells that
/// the struct refused a key.
#[derive(Debug)]
enum ProbeEnd {
    Stop,
    UnknownField,
}

impl fmt::Display for ProbeEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for ProbeEnd {}

impl de::Error for ProbeEnd {
    fn custom<T: fmt::Display>(_: T) -> ProbeEnd {
        ProbeEnd::Stop
    }
    fn unknown_field(_: &str, _: &'static [&'static str]) -> ProbeEnd {
        ProbeEnd::UnknownField
    }
}

/// A key no struct has: a struct with `deny_unknown_fields` refuses it.
const NOT_A_FIELD: &str = "\u{0}not a field";

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = ProbeEnd;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeEnd> {
        Err(ProbeEnd::Stop)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeEnd> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, ProbeEnd> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeEnd> {
        visitor.visit_seq(OneElement(Some(self)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeEnd> {
        match self.path.get(self.depth) {
            Some(&field) => {
                let inner = Probe { depth: self.depth + 1, ..self };
                visitor.visit_map(OneKey { key: Some(field), value: Some(inner) })
            }
            None => {
                let found = self.found;
                *found.borrow_mut() = Some(Traced { fields, denies_unknown: false });
                let result = visitor.visit_map(OneKey::<Probe> { key: Some(NOT_A_FIELD), value: None });
                if let Err(ProbeEnd::UnknownField) = result {
                    if let Some(t) = found.borrow_mut().as_mut() {
                        t.denies_unknown = true;
                    }
                }
                Err(ProbeEnd::Stop)
            }
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A list of one element, the probe.
struct OneElement<'p>(Option<Probe<'p>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = ProbeEnd;
    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, ProbeEnd> {
        self.0.take().map(|probe| seed.deserialize(probe)).transpose()
    }
}

/// A mapping of one key whose value is the probe (none: a unit value).
struct OneKey<P> {
    key: Option<&'static str>,
    value: Option<P>,
}

impl<'de, 'p> MapAccess<'de> for OneKey<Probe<'p>> {
    type Error = ProbeEnd;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ProbeEnd> {
        self.key.take().map(|k| seed.deserialize(de::value::BorrowedStrDeserializer::new(k))).transpose()
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, ProbeEnd> {
        match self.value.take() {
            Some(probe) => seed.deserialize(probe),
            None => seed.deserialize(de::value::UnitDeserializer::new()),
        }
    }
}

/// Checks the keys of a value against [`Keys`]; accepts any value that is not a mapping
/// (its type is checked when the experiment is parsed), and checks each element of a list.
/// With a `path`, it names where an unknown key is.
struct Check<'k> {
    keys: &'k Keys,
    path: Option<String>,
}

impl<'k> Check<'k> {
    fn inner(&self, keys: &'k Keys, step: std::fmt::Arguments<'_>) -> Check<'k> {
        Check { keys, path: self.path.as_ref().map(|p| format!("{p}{step}")) }
    }
}

impl<'de> DeserializeSeed<'de> for Check<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // The key is checked as it is read, so that a file's error points at its line.
        while let Some(name) = map.next_key_seed(KeyName(self.keys.fields, self.path.as_deref()))? {
            match self.keys.nested(&name) {
                Some(keys) => {
                    let dot = if self.path.as_deref().unwrap_or_default().is_empty() { "" } else { "." };
                    map.next_value_seed(self.inner(keys, format_args!("{dot}{name}")))?
                }
                None => map.next_value::<IgnoredAny>().map(|_| ())?,
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(self.inner(self.keys, format_args!("[{i}]")))?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use de::VariantAccess;
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>().map(|_| ())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Reads a key of a mapping, refusing one that is not among the fields (`.1`: the path to
/// name in the error, for values without positions).
struct KeyName<'a>(&'static [&'static str], Option<&'a str>);

impl<'de> DeserializeSeed<'de> for KeyName<'_> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyName<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if self.0.contains(&key) {
            return Ok(key.to_string());
        }
        let err: E = unknown_key(key, self.0);
        Err(match self.1 {
            Some("") | None => err,
            Some(path) => E::custom(format_args!("{path}: {err}")),
        })
    }
    fn visit_bool<E: de::Error>(self, key: bool) -> Result<String, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_i64<E: de::Error>(self, key: i64) -> Result<String, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_u64<E: de::Error>(self, key: u64) -> Result<String, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_f64<E: de::Error>(self, key: f64) -> Result<String, E> {
        self.visit_str(&key.to_string())
    }
}

/// serde's "unknown field" error, with the nearest known key first when one is close.
fn unknown_key<E: de::Error>(key: &str, fields: &'static [&'static str]) -> E {
    match suggest(key, fields.iter().copied()) {
        Some(near) => {
            let all: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
            E::custom(format_args!(
                "unknown field `{key}`: did you mean `{near}`? (expected one of {})",
                all.join(", ")
            ))
        }
        None => E::unknown_field(key, fields),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{DataConfig, EarlyStopping, Experiment, Stage, TrainConfig};

    #[test]
    fn the_keys_are_the_structs_fields_and_their_structs_nest() {
        let keys = Keys::of::<Experiment>().unwrap();
        assert!(keys.fields.contains(&"spec") && keys.fields.contains(&"backend"));
        let train = keys.nested("train").unwrap();
        assert_eq!(train, &Keys::of::<TrainConfig>().unwrap());
        assert!(train.fields.contains(&"batch_size"));
        assert_eq!(train.nested("early_stopping"), Keys::of::<EarlyStopping>().as_ref());
        // A list of stages: the keys of one stage.
        assert_eq!(train.nested("stages"), Keys::of::<Stage>().as_ref());
        assert_eq!(keys.nested("data"), Keys::of::<DataConfig>().as_ref());
        // The schema refuses unknown keys too; `hyper` is a map of any names.
        assert!(keys.nested("data").unwrap().nested("schema").unwrap().fields.contains(&"features"));
        assert!(keys.nested("hyper").is_none() && keys.nested("backend").is_none());
        // Not structs, or structs that take any key.
        assert!(Keys::of::<std::collections::BTreeMap<String, u32>>().is_none());
        assert!(Keys::of::<u32>().is_none());
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Open {
            a: u32,
        }
        assert!(Keys::of::<Open>().is_none());
    }

    fn check(text: &str) -> Result<(), String> {
        let keys = Keys::of::<Experiment>().unwrap();
        keys.check(serde_yaml::Deserializer::from_str(text)).map_err(|e| e.to_string())
    }

    #[test]
    fn an_unknown_key_is_named_at_its_line_with_the_nearest_known_one() {
        check("spec: a.mdl\ntrain:\n  lr: 0.1\n  stages:\n    - {epochs: 1, freeze: [x]}\n").unwrap();
        // A partial file (its base gives the rest) has only keys to check.
        check("data:\n  schema:\n    domain: {column: d}\n").unwrap();
        let err = check("spec: a.mdl\ntrain:\n  lr: 0.1\n  batch_sise: 12\n").unwrap_err();
        assert!(err.contains("unknown field `batch_sise`: did you mean `batch_size`?"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        let err = check("train:\n  stages:\n    - epochs: 1\n      freze: [x]\n").unwrap_err();
        assert!(err.contains("unknown field `freze`: did you mean `freeze`?") && err.contains("line 4"), "{err}");
        let err = check("data:\n  schema:\n    labls: []\n").unwrap_err();
        assert!(err.contains("did you mean `labels`?") && err.contains("line 3"), "{err}");
        let err = check("wibble_wobble: red\n").unwrap_err();
        assert!(err.contains("unknown field `wibble_wobble`, expected one of `name`"), "{err}");
        // Values are not checked here: the typed parse of the whole experiment does that.
        check("train: 5\nhyper: {anything: 1}\n").unwrap();
    }

    #[test]
    fn in_a_value_without_lines_the_error_names_the_path() {
        let keys = Keys::of::<Experiment>().unwrap();
        let value: serde_yaml::Value =
            serde_yaml::from_str("train:\n  stages:\n    - {epochs: 1}\n    - {frezee: [a]}\n").unwrap();
        let err = keys.check_value(&value).unwrap_err();
        assert!(err.starts_with("train.stages[1]: unknown field `frezee`: did you mean `freeze`?"), "{err}");
        let value: serde_yaml::Value = serde_yaml::from_str("colour: red\n").unwrap();
        assert!(keys.check_value(&value).unwrap_err().starts_with("unknown field `colour`"));
    }
}
