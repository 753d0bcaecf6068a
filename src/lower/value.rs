//! Values of the compile-time language the elaborator interprets.
//!
//! A spec runs once, at compile time: numbers, strings, lists and sizes are computed
//! then and there; a `Tensor` stands for a node of the dataflow graph being built.

use crate::diag::Reported;
use mdl_runtime::{Dim, NodeId};
use std::collections::BTreeMap;
use std::rc::Rc;

/// A tensor being built: a graph node, and whether it is *grouped*: a per-domain value
/// (inside `per g { ... }`) whose leading axis has one entry per domain instead of one
/// per sample; sample `i` uses entry `g[i]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tv {
    pub node: NodeId,
    pub grouped: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// Integers are sizes: they may be symbolic (`count(fields)`), exact and canonical.
    Int(Dim),
    Float(f64),
    Str(String),
    Bool(bool),
    /// A list, shared: reading a list variable (`p[0][t]` in a comprehension) copies a
    /// pointer, not its items.
    List(Rc<[Val]>),
    Tensor(Tv),
    /// Ids made in the spec (by `bucketize`, `floordiv`, `mod`; positions by `top_k`,
    /// `argmax`, `argmin`, `sort`), each below `rows` (a size: the positions along an axis
    /// of `count(x)` are below `count(x)`): they index tables made for them
    /// (`embedding(ids, dim)` has `rows` rows) and select along an axis (`take_along`).
    /// Ids of a declared input's id space (`space`: drawn by `sample_ids`, or an input's ids
    /// rearranged by `slice`, `concat`, `squeeze`, `unsqueeze`) index that input's tables
    /// instead, and `sample_ids` draws negatives for them.
    Ids {
        node: NodeId,
        rows: Dim,
        space: Option<String>,
    },
    /// An embedding table, holding rows for an id space.
    Table {
        node: NodeId,
        ids_of: IdSpace,
        /// A table made inside `per d { }`: one table per domain, stacked (`[D * rows, dim]`);
        /// the domain ids `[B]` and the rows of one domain's table. A sample's ids are
        /// looked up in its own domain's table only.
        per_domain: Option<(NodeId, Dim)>,
    },
    /// A declared input (feature group, domain), by name.
    Feature(String),
    /// A task declared with `task name = ...`.
    Task(String),
    /// An absent optional argument of a built-in function.
    None,
    /// The value of an expression whose error was already reported (it holds the
    /// token): it absorbs further uses silently, so one mistake gives one diagnostic.
    Poison(Reported),
}

impl Val {
    /// What the value is, for messages: "a tensor [B, 16]" is built by the caller; this
    /// gives the kind word.
    pub fn kind(&self) -> &'static str {
        match self {
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Str(_) => "a string",
            Val::Bool(_) => "a boolean",
            Val::List(_) => "a list",
            Val::Tensor(_) => "a tensor",
            Val::Ids { .. } => "ids",
            Val::Table { .. } => "an embedding table",
            Val::Feature(_) => "an input",
            Val::Task(_) => "a task",
            Val::None => "nothing",
            Val::Poison(_) => "an erroneous value",
        }
    }

    pub fn int(n: i64) -> Val {
        Val::Int(Dim::lit(n))
    }
}

/// The ids an embedding table has rows for.
#[derive(Clone, Debug, PartialEq)]
pub enum IdSpace {
    /// The ids of a declared input (and of the sequences declared `of` it).
    Input(String),
    /// Ids made in the spec, every one below `rows`: any made ids with the same `rows`.
    Made { rows: Dim },
}

/// Lexical scopes of `let` bindings (ordered maps, so that [`Env::names`], which "did you
/// mean" hints choose from, lists them in the same order on every run).
#[derive(Default)]
pub struct Env {
    frames: Vec<BTreeMap<String, Val>>,
}

impl Env {
    pub fn new() -> Env {
        Env { frames: vec![BTreeMap::new()] }
    }

    pub fn push(&mut self) {
        self.frames.push(BTreeMap::new());
    }

    pub fn pop(&mut self) {
        self.frames.pop();
    }

    pub fn get(&self, name: &str) -> Option<&Val> {
        self.frames.iter().rev().find_map(|f| f.get(name))
    }

    pub fn define(&mut self, name: &str, v: Val) {
        if let Some(f) = self.frames.last_mut() {
            f.insert(name.to_string(), v);
        }
    }

    /// Rebinds an existing name in the innermost scope that has it; false if none does.
    pub fn assign(&mut self, name: &str, v: Val) -> bool {
        for f in self.frames.iter_mut().rev() {
            if let Some(slot) = f.get_mut(name) {
                *slot = v;
                return true;
            }
        }
        false
    }

    pub fn names(&self) -> Vec<String> {
        self.frames.iter().flat_map(|f| f.keys().cloned()).collect()
    }
}
