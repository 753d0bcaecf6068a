//! Statements and control flow: the statement list (which reports an error and goes on
//! with the next statement), `let` and rebinding, `for` loops (unrolled), `if` on
//! compile-time values, parameter groups, `return` out of a block, and the declarations
//! only a model may make.

use super::value::{Env, Val};
use super::{Elab, R};
use crate::diag::Span;
use crate::syntax::ast::Stmt;

/// Control flow out of a statement list.
pub(super) enum Flow {
    Next,
    Return(Val),
}

impl Elab {
    /// Runs a statement list up to its end or a `return`. A statement that fails is
    /// reported and, in a model's own body, the next one runs, so that independent errors
    /// are all found; the list's result is then the first error. Inside a block (inlined
    /// at a call) the list stops at its first error: the later ones would come from the
    /// same arguments (`hidden = [0]` makes every layer's size 0), so the first is the cause.
    pub(super) fn stmts(&mut self, env: &mut Env, stmts: &[Stmt]) -> R<Flow> {
        let mut failed = None;
        for s in stmts {
            match self.stmt(env, s) {
                Ok(Flow::Next) => {}
                Ok(Flow::Return(v)) => return Ok(Flow::Return(v)),
                Err(reported) if self.depth > 0 => return Err(reported),
                Err(reported) => {
                    failed.get_or_insert(reported);
                }
            }
        }
        match failed {
            Some(reported) => Err(reported),
            None => Ok(Flow::Next),
        }
    }

    /// Rejects a declaration that only a model's own body may make.
    fn model_only(&mut self, what: &str, span: Span) -> R<()> {
        if !self.in_model || self.depth > 0 {
            return self.error(span, format!("`{what}` belongs in a model, not inside a block"));
        }
        Ok(())
    }

    /// Runs one statement.
    fn stmt(&mut self, env: &mut Env, s: &Stmt) -> R<Flow> {
        match s {
            Stmt::Input { name, kind, span } => {
                self.model_only("input", *span)?;
                self.declare_input(env, name, kind, *span)?;
            }
            Stmt::Label { names, kind, span } => {
                self.model_only("label", *span)?;
                self.declare_labels(env, names, kind.as_ref())?;
            }
            Stmt::Let { name, value, .. } => {
                self.enter_scope(&name.name);
                let v = self.expr(env, value);
                self.leave_scope();
                env.define(&name.name, v.clone().unwrap_or_else(Val::Poison));
                v?;
            }
            Stmt::Assign { name, value, .. } => {
                if env.get(&name.name).is_none() {
                    return self.unknown_name(env, &name.name, name.span);
                }
                // No naming scope here: a rebinding in a loop (`h = linear(h, w)`) names
                // its parameters after the block (`mlp/linear1/W`), not the variable.
                let v = self.expr(env, value);
                env.assign(&name.name, v.clone().unwrap_or_else(Val::Poison));
                v?;
            }
            Stmt::ParamDecl { name, shape, init, .. } => {
                // A declaration that fails still defines its name (as the failure), so that
                // its uses stay quiet instead of reporting an unknown name.
                let t = self.param_decl(env, name, shape, init.as_ref());
                env.define(&name.name, t.map(Val::Tensor).unwrap_or_else(Val::Poison));
                t?;
            }
            Stmt::For { var, iter, body, span } => {
                let items = self.iterable(env, iter)?;
                self.enter_loop(span.to(iter.span))?;
                let mut result = Ok(Flow::Next);
                for item in items {
                    if let Err(reported) = self.loop_iteration() {
                        result = Err(reported);
                        break;
                    }
                    env.push();
                    env.define(&var.name, item);
                    let flow = self.stmts(env, body);
                    env.pop();
                    // A `return` ends the loop; so does an error (the next iterations would
                    // repeat it, or fail because of it).
                    if !matches!(flow, Ok(Flow::Next)) {
                        result = flow;
                        break;
                    }
                }
                self.leave_loop();
                return result;
            }
            Stmt::If { cond, then, otherwise, .. } => {
                let c = self.expr(env, cond)?;
                let b = match c {
                    Val::Bool(b) => b,
                    Val::Poison(reported) => return Err(reported),
                    other => {
                        return self
                            .error(cond.span, format!("an `if` condition must be a boolean, found {}", other.kind()))
                    }
                };
                let branch = if b { Some(then) } else { otherwise.as_ref() };
                if let Some(body) = branch {
                    env.push();
                    let flow = self.stmts(env, body);
                    env.pop();
                    return flow;
                }
            }
            Stmt::Group { name, body, .. } => {
                let saved = self.group.replace(name.name.clone());
                let flow = self.stmts(env, body);
                self.group = saved;
                return flow;
            }
            Stmt::Return { value, span } => {
                if self.depth == 0 {
                    return self.error(*span, "`return` is only allowed inside a block");
                }
                let v = self.expr(env, value)?;
                return Ok(Flow::Return(v));
            }
            Stmt::Task { name, value, span } => {
                self.model_only("task", *span)?;
                self.task(env, name, value, *span)?;
            }
            Stmt::Loss { name, value, span } => {
                self.model_only("loss", *span)?;
                self.loss(env, name.as_ref(), value)?;
            }
            Stmt::Expr { value } => {
                self.expr(env, value)?;
            }
        }
        Ok(Flow::Next)
    }
}
