//! Names and scopes: the naming path that parameters and nodes are created under
//! (`deep/mlp/linear1/W`, a repeated block numbered), the current parameter group, and the
//! "unknown name" report with its suggestion.

use super::value::Env;
use super::{builtins, Elab, R};
use crate::diag::{suggest, Diagnostic, Span};

impl Elab {
    /// The current naming scope (`deep/mlp/linear1`), which nodes are added under.
    pub(crate) fn scope_path(&self) -> String {
        self.scope.join("/")
    }

    /// Enters a naming scope; a repeated segment under the same parent gets a number.
    pub(super) fn enter_scope(&mut self, seg: &str) {
        let base = if self.scope.is_empty() { seg.to_string() } else { format!("{}/{seg}", self.scope_path()) };
        let n = self.scope_uses.entry(base).or_insert(0);
        let name = if *n == 0 { seg.to_string() } else { format!("{seg}{n}") };
        *n += 1;
        self.scope.push(name);
    }

    /// Leaves the scope entered last.
    pub(super) fn leave_scope(&mut self) {
        self.scope.pop();
    }

    /// A unique parameter name under the current scope.
    pub(crate) fn param_name(&mut self, leaf: &str) -> String {
        let base = if self.scope.is_empty() { leaf.to_string() } else { format!("{}/{leaf}", self.scope_path()) };
        let mut name = base.clone();
        let mut k = 1;
        while self.graph.param_info(&name).is_some() || self.graph.state_info(&name).is_some() {
            name = format!("{base}{k}");
            k += 1;
        }
        name
    }

    /// Reports `name` as unknown, suggesting the closest name in scope, block or built-in.
    pub(super) fn unknown_name<T>(&mut self, env: &Env, name: &str, span: Span) -> R<T> {
        let mut cands = env.names();
        cands.extend(self.blocks.keys().cloned());
        cands.extend(builtins::names().iter().map(|s| s.to_string()));
        let mut d = Diagnostic::error(span, format!("unknown name `{name}`")).label("not defined");
        if let Some(s) = suggest(name, cands.iter().map(|s| s.as_str())) {
            d = d.hint(format!("did you mean `{s}`?"));
        }
        Err(self.report(d))
    }
}

#[cfg(test)]
mod tests {
    use crate::diag::SourceMap;
    use std::collections::BTreeMap;

    /// `caz` is one edit from both `cap` and `cat`: the hint must not depend on the
    /// iteration order of a hash map, which differs from one compilation to the next.
    #[test]
    fn tied_suggestions_are_the_same_on_every_compilation() {
        let text = "block cat(x) { return x }\nblock cap(x) { return x }\nmodel m() {\n  input v : numeric\n  label click\n  task click = sum(caz(v), axis = 1)\n  loss bce(click)\n}\n";
        for _ in 0..16 {
            let mut map = SourceMap::new();
            let file = map.add("tie.mdl", text.to_string());
            let diags = super::super::compile(&mut map, file, None, None, &BTreeMap::new()).unwrap_err();
            assert_eq!(diags.len(), 1, "{diags:?}");
            assert_eq!(diags[0].message, "unknown name `caz`");
            assert_eq!(diags[0].hint.as_deref(), Some("did you mean `cap`?"));
        }
    }
}
