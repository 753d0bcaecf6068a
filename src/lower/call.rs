//! Calls and argument binding: a call evaluates all its arguments, then binds them
//! (positional, named, defaults) to the parameters of a block (whose body is inlined under
//! its own naming scope) or of a built-in (lowered by its entry in [`builtins`]).

use super::stmt::Flow;
use super::value::{Env, Val};
use super::{builtins, Elab, R};
use crate::diag::{suggest, Diagnostic, Span};
use crate::syntax::ast;

/// How deep blocks may call each other before the call is taken for endless recursion.
const MAX_CALL_DEPTH: usize = 64;

impl Elab {
    /// A call `callee(args)`: of a block, else of a built-in, else an unknown name.
    pub(super) fn call(&mut self, env: &mut Env, callee: &ast::Ident, args: &[ast::Arg], span: Span) -> R<Val> {
        // Evaluate arguments first (all of them, so errors in several are reported).
        let mut pos = Vec::new();
        let mut named: Vec<(ast::Ident, Val, Span)> = Vec::new();
        let mut failed = None;
        for a in args {
            match self.expr(env, &a.value) {
                Ok(v) => match &a.name {
                    Some(n) => named.push((n.clone(), v, a.value.span)),
                    None => pos.push((v, a.value.span)),
                },
                Err(reported) => failed = Some(reported),
            }
        }
        if let Some(reported) = failed {
            return Err(reported);
        }
        if let Some(block) = self.blocks.get(&callee.name).cloned() {
            return self.call_block(&block, pos, named, span);
        }
        if let Some(builtin) = builtins::find(&callee.name) {
            let bound = self.bind_args(builtin.name, builtin.param_list(), pos, named, span, None)?;
            return builtin.lower(self, bound, span);
        }
        self.unknown_name(env, &callee.name, callee.span)
    }

    /// Binds positional and named arguments to parameter names (with defaults).
    pub(crate) fn bind_args(
        &mut self,
        fname: &str,
        params: Vec<(String, Option<Val>)>,
        pos: Vec<(Val, Span)>,
        named: Vec<(ast::Ident, Val, Span)>,
        span: Span,
        def_span: Option<Span>,
    ) -> R<Vec<(String, Val, Span)>> {
        let mut slots: Vec<Option<(Val, Span)>> = vec![None; params.len()];
        if pos.len() > params.len() {
            let mut d = Diagnostic::error(
                pos[params.len()].1,
                format!("`{fname}` takes {} argument(s), but {} were given", params.len(), pos.len() + named.len()),
            )
            .label("unexpected argument");
            if let Some(ds) = def_span {
                d = d.note(ds, format!("`{fname}` is defined here"));
            }
            return Err(self.report(d));
        }
        for (i, p) in pos.into_iter().enumerate() {
            slots[i] = Some(p);
        }
        for (n, v, s) in named {
            match params.iter().position(|(p, _)| p == &n.name) {
                Some(i) => {
                    if slots[i].is_some() {
                        return self.error(n.span, format!("argument `{}` is given twice", n.name));
                    }
                    slots[i] = Some((v, s));
                }
                None => {
                    let mut d = Diagnostic::error(n.span, format!("`{fname}` has no parameter `{}`", n.name))
                        .label("unknown argument");
                    if let Some(sg) = suggest(&n.name, params.iter().map(|(p, _)| p.as_str())) {
                        d = d.hint(format!("did you mean `{sg}`?"));
                    } else {
                        let list: Vec<&str> = params.iter().map(|(p, _)| p.as_str()).collect();
                        d = d.hint(format!("its parameters are: {}", list.join(", ")));
                    }
                    if let Some(ds) = def_span {
                        d = d.note(ds, format!("`{fname}` is defined here"));
                    }
                    return Err(self.report(d));
                }
            }
        }
        let mut out = Vec::with_capacity(params.len());
        for ((name, default), slot) in params.into_iter().zip(slots) {
            match (slot, default) {
                (Some((v, s)), _) => out.push((name, v, s)),
                (None, Some(d)) => out.push((name, d, span)),
                (None, None) => {
                    let mut d = Diagnostic::error(span, format!("`{fname}` is missing its argument `{name}`"))
                        .label("in this call");
                    if let Some(ds) = def_span {
                        d = d.note(ds, format!("`{fname}` is defined here"));
                    }
                    return Err(self.report(d));
                }
            }
        }
        Ok(out)
    }

    /// Inlines a block: binds its parameters (defaults evaluated in an empty environment)
    /// and runs its body under a scope named after it, up to its `return`.
    fn call_block(
        &mut self,
        block: &ast::BlockDef,
        pos: Vec<(Val, Span)>,
        named: Vec<(ast::Ident, Val, Span)>,
        span: Span,
    ) -> R<Val> {
        if self.depth >= MAX_CALL_DEPTH {
            return self
                .error(span, format!("blocks call each other more than {MAX_CALL_DEPTH} deep (endless recursion?)"));
        }
        self.enter_call(span)?;
        // Defaults are evaluated in the block's own (empty) environment.
        let mut params = Vec::new();
        let mut denv = Env::new();
        for p in &block.params {
            let d = match &p.default {
                Some(e) => Some(self.expr(&mut denv, e)?),
                None => None,
            };
            params.push((p.name.name.clone(), d));
        }
        let bound = self.bind_args(&block.name.name, params, pos, named, span, Some(block.name.span))?;
        let mut benv = Env::new();
        for (n, v, _) in bound {
            benv.define(&n, v);
        }
        self.depth += 1;
        let outer_call = self.model_call;
        self.model_call = Some(outer_call.unwrap_or(span));
        self.enter_scope(&block.name.name);
        let reported_before = self.diags.len();
        let flow = self.stmts(&mut benv, &block.body);
        self.leave_scope();
        self.model_call = outer_call;
        self.depth -= 1;
        // An error inside the block's body points into the block: say which call reached
        // it (a block reached through others gets one note per call, innermost first).
        if flow.is_err() && self.diags.len() > reported_before {
            self.diags.note_at(reported_before, span, format!("in block `{}`, called here", block.name.name));
        }
        match flow {
            Ok(Flow::Return(v)) => Ok(v),
            Ok(Flow::Next) => self.error(span, format!("block `{}` ended without `return`", block.name.name)),
            Err(reported) => Err(reported),
        }
    }
}
