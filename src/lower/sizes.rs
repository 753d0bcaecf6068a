//! The data's sizes as compile-time numbers.
//!
//! A spec's sizes that only the data can tell, `count(x)` (the columns an experiment binds
//! to input `x`, or the domains of a domain input) and `rows(x)` (the rows of `x`'s
//! vocabulary), are symbols while a spec is checked on its own, so one check holds for
//! every dataset. Once an experiment binds its columns they are numbers: [`Sizes`] carries
//! the ones that are known (from the experiment's schema, or from its prepared data), and
//! the elaborator puts them into shapes and compile-time arithmetic from the start, so a
//! spec can loop over `0..count(fields)` or take `pairs(count(fields))`.
//!
//! What this module owns: [`Sizes`], the dimensions of `count(x)` and `rows(x)` under it,
//! and the one error a statement that needs a number gets when the size is not bound
//! (naming the statement, and how to bind it), with the record of which sizes were needed
//! ([`super::Failed::needs`]), so that a caller that can bind more of them compiles again.

use super::{count_sym, rows_sym, Elab};
use crate::diag::{Diagnostic, Reported, Span};
use mdl_runtime::Dim;
use std::collections::BTreeMap;

/// The data's sizes that are known when a spec is compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    /// `count(x)` and `rows(x)` of inputs other than the domain, by symbol
    /// ([`count_sym`], [`rows_sym`]).
    pub symbols: BTreeMap<String, i64>,
    /// The number of domains: `count(d)` of the spec's domain input, whatever its name.
    pub domains: Option<i64>,
}

impl Sizes {
    /// Whether no size is known (a spec checked on its own).
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty() && self.domains.is_none()
    }
}

impl Elab {
    /// `count(name)`: its number when bound, else the symbol. `domain`: whether `name` is
    /// a domain input (its count is the number of domains).
    pub(crate) fn count_dim(&self, name: &str, domain: bool) -> Dim {
        let sym = count_sym(name);
        let known = if domain { self.sizes.domains } else { self.sizes.symbols.get(&sym).copied() };
        known.map_or_else(|| Dim::sym(&sym), Dim::lit)
    }

    /// `rows(name)`: its number when bound, else the symbol.
    pub(crate) fn rows_dim(&self, name: &str) -> Dim {
        let sym = rows_sym(name);
        self.sizes.symbols.get(&sym).map_or_else(|| Dim::sym(&sym), |&n| Dim::lit(n))
    }

    /// The error where `what` (a statement or argument, for the message) needs a number
    /// and `size` is not one: a size of the data that is not bound (recorded in `needs`),
    /// or one that depends on the batch.
    pub(crate) fn number_needed(&mut self, what: &str, size: &Dim, span: Span) -> Reported {
        if size.has_batch() {
            let d = Diagnostic::error(span, format!("{what} needs a number, but {size} depends on the batch size"))
                .label("the batch size is known only when a batch runs");
            return self.report(d);
        }
        self.needs.extend(size.symbols().map(|s| s.to_string()));
        let d = Diagnostic::error(span, format!("{what} needs a number, but {size} is a size of the data"))
            .label("known once an experiment binds its columns")
            .hint(
                "check the spec with the data's sizes: `mdl check SPEC --bind EXPERIMENT.yaml` (`mdl run` binds them)",
            );
        self.report(d)
    }

    /// The value of an integer that must be a number here (`what` needs it).
    pub(crate) fn number(&mut self, what: &str, size: &Dim, span: Span) -> Result<i64, Reported> {
        match size.as_const() {
            Some(n) => Ok(n),
            None => Err(self.number_needed(what, size, span)),
        }
    }
}
