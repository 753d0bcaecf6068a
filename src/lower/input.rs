//! Inputs: `input name : kind` declarations become graph inputs (ids, mask or values with
//! their symbolic shapes), and an input used as a tensor is checked to hold values.

use super::value::{Env, Tv, Val};
use super::{ids_input, mask_input, Elab, Feature, FeatureKind, R};
use crate::diag::{suggest, Diagnostic, Span};
use crate::syntax::ast::{self, InputKind};
use mdl_runtime::{DType, Dim, NodeId};

/// The graph inputs of a declared input.
pub(super) struct FeatureNodes {
    pub(super) kind: FeatureKind,
    /// Ids (categorical, sequence, domain) or values (numeric).
    main: NodeId,
    mask: Option<NodeId>,
}

impl Elab {
    /// `input name : kind`: adds the input's graph inputs and binds `name` to it.
    pub(super) fn declare_input(&mut self, env: &mut Env, name: &ast::Ident, kind: &InputKind, span: Span) -> R<()> {
        if self.features.contains_key(&name.name) {
            return self.error(name.span, format!("input `{}` is declared twice", name.name));
        }
        let count = self.count_dim(&name.name, matches!(kind, InputKind::Domain));
        let b = Dim::batch();
        let (fk, main, mask) = match kind {
            InputKind::Categorical => {
                let id = self.graph.input(&ids_input(&name.name), vec![b, count], DType::I);
                (FeatureKind::Categorical, id, None)
            }
            InputKind::Numeric => {
                let id = self.graph.input(&ids_input(&name.name), vec![b, count], DType::F);
                (FeatureKind::Numeric, id, None)
            }
            InputKind::Domain => {
                let id = self.graph.input(&ids_input(&name.name), vec![b], DType::I);
                (FeatureKind::Domain, id, None)
            }
            InputKind::Sequence { len, of } => {
                let lv = self.expr(env, len)?;
                let n = match lv {
                    Val::Int(d) => match d.as_const() {
                        Some(n) if n > 0 => n as usize,
                        None => return Err(self.number_needed("a sequence length", &d, len.span)),
                        _ => {
                            return self
                                .error(len.span, format!("a sequence length must be a positive constant, found {d}"))
                        }
                    },
                    other => {
                        return self
                            .error(len.span, format!("a sequence length must be an integer, found {}", other.kind()))
                    }
                };
                if let Some(o) = of {
                    match self.features.get(&o.name) {
                        Some(f) if f.kind == FeatureKind::Categorical => {}
                        Some(_) => return self.error(o.span, format!("`{}` is not a categorical input", o.name)),
                        None => {
                            let names: Vec<String> = self.features.keys().cloned().collect();
                            let mut d = Diagnostic::error(o.span, format!("unknown input `{}`", o.name))
                                .label("must be a categorical input declared above");
                            if let Some(s) = suggest(&o.name, names.iter().map(|s| s.as_str())) {
                                d = d.hint(format!("did you mean `{s}`?"));
                            }
                            return Err(self.report(d));
                        }
                    }
                }
                let shape = vec![b, count, Dim::lit(n as i64)];
                let id = self.graph.input(&ids_input(&name.name), shape.clone(), DType::I);
                let m = self.graph.input(&mask_input(&name.name), shape, DType::F);
                (FeatureKind::Sequence { len: n, of: of.as_ref().map(|o| o.name.clone()) }, id, Some(m))
            }
        };
        self.features.insert(name.name.clone(), FeatureNodes { kind: fk.clone(), main, mask });
        self.feature_decls.push(Feature { name: name.name.clone(), kind: fk, span });
        env.define(&name.name, Val::Feature(name.name.clone()));
        Ok(())
    }

    /// An input used as a tensor: numeric values, or a hint for ids.
    pub(super) fn feature_tensor(&mut self, name: &str, span: Span) -> R<Tv> {
        let Some(f) = self.features.get(name) else {
            return self.error(span, format!("unknown input `{name}`"));
        };
        match f.kind {
            FeatureKind::Numeric => Ok(Tv { node: f.main, grouped: false }),
            FeatureKind::Categorical | FeatureKind::Sequence { .. } => {
                let d = Diagnostic::error(span, format!("`{name}` holds ids, not values"))
                    .label("used as a tensor here")
                    .hint(format!("look its ids up in a table: `E[{name}]` with `let E = embedding({name}, dim)`"));
                Err(self.report(d))
            }
            FeatureKind::Domain => {
                let d = Diagnostic::error(span, format!("`{name}` holds domain ids, not values"))
                    .label("used as a tensor here")
                    .hint(format!("use `one_hot({name})`, `per {name} {{ ... }}`, or an embedding"));
                Err(self.report(d))
            }
        }
    }

    /// A declared input's kind, its ids or values, and its mask (sequences).
    pub(crate) fn feature_nodes(&self, name: &str) -> Option<(FeatureKind, NodeId, Option<NodeId>)> {
        self.features.get(name).map(|f| (f.kind.clone(), f.main, f.mask))
    }
}
