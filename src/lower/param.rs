//! Parameter declarations: `param W : [k, n] = init()` checks its sizes, picks the
//! initialiser (Glorot for matrices, zeros otherwise, unless one is given), and creates
//! the parameter under the current scope, with a leading domain axis inside `per`.

use super::value::{Env, Tv, Val};
use super::{Elab, R};
use crate::diag::Span;
use crate::diag::{suggest, Diagnostic};
use crate::syntax::ast::{self, Expr, ExprKind};
use mdl_runtime::ir::dim::Dim;
use mdl_runtime::{Init, NodeId};

impl Elab {
    /// `param name : [sizes] = init()`: a new trainable parameter.
    pub(super) fn param_decl(
        &mut self,
        env: &mut Env,
        name: &ast::Ident,
        shape: &[Expr],
        init: Option<&Expr>,
    ) -> R<Tv> {
        let mut dims = Vec::new();
        for d in shape {
            let v = self.expr(env, d)?;
            match v {
                Val::Int(x) => {
                    if x.as_const().is_some_and(|c| c <= 0) {
                        return self.error(d.span, format!("a parameter size must be positive, found {x}"));
                    }
                    if x.has_batch() {
                        return self.error(d.span, "a parameter size cannot depend on the batch size");
                    }
                    dims.push(x)
                }
                other => {
                    return self.error(d.span, format!("a parameter size must be an integer, found {}", other.kind()))
                }
            }
        }
        let init = match init {
            None => {
                if dims.len() >= 2 {
                    Init::Glorot
                } else {
                    Init::Zeros
                }
            }
            Some(e) => self.init_expr(env, e)?,
        };
        let grouped = self.per.is_some();
        if let Some(per) = &self.per {
            dims.insert(0, per.groups.clone());
        }
        let full = self.param_name(&name.name);
        let node = self.new_param(&full, dims, init, false, name.span);
        Ok(Tv { node, grouped })
    }

    /// Makes parameter `name` of the current group and records where the spec defines it:
    /// `span` (the `param` statement's name or the built-in's call) at the model's level,
    /// else the call in the model's body whose block made it.
    pub(crate) fn new_param(&mut self, name: &str, dims: Vec<Dim>, init: Init, embedding: bool, span: Span) -> NodeId {
        self.param_spans.insert(name.to_string(), self.model_call.unwrap_or(span));
        self.graph.param(name, dims, init, self.group.clone(), embedding)
    }

    /// An initialiser call: `glorot()`, `zeros()`, `ones()`, `constant(c)`, `normal(std)`
    /// or `uniform(limit)`.
    fn init_expr(&mut self, env: &mut Env, e: &Expr) -> R<Init> {
        let ExprKind::Call { callee, args } = &e.kind else {
            return self.error(e.span, "an initialiser is a call such as `glorot()`, `zeros()` or `normal(0.01)`");
        };
        let mut nums = Vec::new();
        for a in args {
            match self.expr(env, &a.value)? {
                Val::Float(f) => nums.push(f),
                Val::Int(d) => match d.as_const() {
                    Some(c) => nums.push(c as f64),
                    None => return Err(self.number_needed("an initialiser argument", &d, a.value.span)),
                },
                other => {
                    return self.error(
                        a.value.span,
                        format!("an initialiser argument must be a number, found {}", other.kind()),
                    )
                }
            }
        }
        let want = |n: usize, this: &mut Elab| -> R<()> {
            if nums.len() != n {
                return this.error(e.span, format!("`{}` takes {n} argument(s), found {}", callee.name, nums.len()));
            }
            Ok(())
        };
        Ok(match callee.name.as_str() {
            "glorot" => {
                want(0, self)?;
                Init::Glorot
            }
            "zeros" => {
                want(0, self)?;
                Init::Zeros
            }
            "ones" => {
                want(0, self)?;
                Init::Ones
            }
            "constant" => {
                want(1, self)?;
                Init::Const(nums[0])
            }
            "normal" => {
                want(1, self)?;
                Init::Normal(nums[0])
            }
            "uniform" => {
                want(1, self)?;
                Init::Uniform(nums[0])
            }
            other => {
                let known = ["glorot", "zeros", "ones", "constant", "normal", "uniform"];
                let mut d = Diagnostic::error(callee.span, format!("unknown initialiser `{other}`"))
                    .label(format!("expected one of: {}", known.join(", ")));
                if let Some(s) = suggest(other, known) {
                    d = d.hint(format!("did you mean `{s}`?"));
                }
                return Err(self.report(d));
            }
        })
    }
}
