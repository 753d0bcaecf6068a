//! Expressions and operators: literals, names, lists, comprehensions and ranges, unary
//! and binary operators (compile-time arithmetic on sizes and numbers first, tensor ops
//! otherwise), comparisons, indexing of lists and of embedding tables by an input's ids,
//! and `{ ... }` expression blocks.

use super::stmt::Flow;
use super::value::{Env, IdSpace, Tv, Val};
use super::{Elab, FeatureKind, R};
use crate::diag::{Diagnostic, Span};
use crate::syntax::ast::{BinOp, Expr, ExprKind, UnOp};
use mdl_runtime::ops::{BinaryOp, Op, UnaryOp};
use mdl_runtime::{Dim, NodeId};

/// The most items a range may have: loops over it are unrolled into the graph.
const MAX_UNROLL: usize = 100_000;

impl Elab {
    /// The items a `for` loop or a comprehension runs over: a list (a range is one).
    pub(super) fn iterable(&mut self, env: &mut Env, e: &Expr) -> R<Vec<Val>> {
        match self.expr(env, e)? {
            Val::List(items) => Ok(items.to_vec()),
            Val::Poison(reported) => Err(reported),
            other => self.error(e.span, format!("expected a list or a range to iterate over, found {}", other.kind())),
        }
    }

    /// The items of `[elem for var in items]`, each counted as a loop iteration.
    fn comprehension(&mut self, env: &mut Env, elem: &Expr, var: &str, items: Vec<Val>) -> R<Vec<Val>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            self.loop_iteration()?;
            env.push();
            env.define(var, item);
            let v = self.expr(env, elem);
            env.pop();
            out.push(v?);
        }
        Ok(out)
    }

    /// Evaluates an expression: a compile-time value, or a tensor whose nodes it adds.
    pub(crate) fn expr(&mut self, env: &mut Env, e: &Expr) -> R<Val> {
        match &e.kind {
            ExprKind::Int(n) => Ok(Val::int(*n)),
            ExprKind::Float(f) => Ok(Val::Float(*f)),
            ExprKind::Str(s) => Ok(Val::Str(s.clone())),
            ExprKind::Bool(b) => Ok(Val::Bool(*b)),
            ExprKind::Var(name) => match env.get(name) {
                Some(Val::Poison(reported)) => Err(*reported),
                Some(v) => Ok(v.clone()),
                None => self.unknown_name(env, name, e.span),
            },
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut failed = None;
                for it in items {
                    match self.expr(env, it) {
                        Ok(v) => out.push(v),
                        Err(reported) => failed = Some(reported),
                    }
                }
                match failed {
                    Some(reported) => Err(reported),
                    None => Ok(Val::List(out.into())),
                }
            }
            ExprKind::Comprehension { elem, var, iter } => {
                let items = self.iterable(env, iter)?;
                self.enter_loop(e.span)?;
                let out = self.comprehension(env, elem, &var.name, items);
                self.leave_loop();
                Ok(Val::List(out?.into()))
            }
            ExprKind::Range { lo, hi } => {
                let a = self.const_int(env, lo, "a range")?;
                let b = self.const_int(env, hi, "a range")?;
                // In i128, so that no pair of i64 bounds overflows.
                let len = (i128::from(b) - i128::from(a)).max(0);
                if len > MAX_UNROLL as i128 {
                    return self
                        .error(e.span, format!("range of {len} items is too long to unroll (at most {MAX_UNROLL})"));
                }
                Ok(Val::List((a..b.max(a)).map(Val::int).collect()))
            }
            ExprKind::Call { callee, args } => self.call(env, callee, args, e.span),
            ExprKind::Index { base, index } => self.index(env, base, index, e.span),
            ExprKind::Unary { op, operand } => {
                let v = self.expr(env, operand)?;
                match (op, v) {
                    (UnOp::Not, Val::Bool(b)) => Ok(Val::Bool(!b)),
                    (UnOp::Neg, Val::Int(d)) => Ok(Val::Int(&Dim::lit(0) - &d)),
                    (UnOp::Neg, Val::Float(f)) => Ok(Val::Float(-f)),
                    (UnOp::Neg, v @ (Val::Tensor(_) | Val::Feature(_))) => {
                        let t = self.expect_tensor(v, operand.span)?;
                        Ok(Val::Tensor(self.unary(UnaryOp::Neg, t, e.span)?))
                    }
                    (_, Val::Poison(reported)) => Err(reported),
                    (op, v) => self.error(
                        e.span,
                        format!("`{}` cannot be applied to {}", if *op == UnOp::Not { "not" } else { "-" }, v.kind()),
                    ),
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.expr(env, lhs);
                let b = self.expr(env, rhs);
                let (a, b) = (a?, b?);
                self.binop(*op, a, b, lhs.span, rhs.span, e.span)
            }
            ExprKind::Per { group, body, value } => self.per_block(env, group, body, value, e.span),
            ExprKind::Block { body, value } => {
                env.push();
                let flow = self.stmts(env, body);
                let v = match flow {
                    Ok(Flow::Return(_)) => self.error(e.span, "`return` cannot leave a `{ ... }` expression"),
                    _ => self.expr(env, value),
                };
                env.pop();
                v
            }
        }
    }

    /// An expression that must be a constant integer (a range bound, a list index); `what`
    /// needs it, for the message.
    pub(crate) fn const_int(&mut self, env: &mut Env, e: &Expr, what: &str) -> R<i64> {
        match self.expr(env, e)? {
            Val::Int(d) => self.number(what, &d, e.span),
            other => self.error(e.span, format!("expected an integer, found {}", other.kind())),
        }
    }

    /// A binary operator on two evaluated operands (`sa`, `sb`: their spans).
    fn binop(&mut self, op: BinOp, a: Val, b: Val, sa: Span, sb: Span, span: Span) -> R<Val> {
        use BinOp::*;
        if let Val::Poison(reported) = a {
            return Err(reported);
        }
        if let Val::Poison(reported) = b {
            return Err(reported);
        }
        match op {
            And | Or => match (a, b) {
                (Val::Bool(x), Val::Bool(y)) => Ok(Val::Bool(if op == And { x && y } else { x || y })),
                (x, y) => self.error(span, format!("`and`/`or` need booleans, found {} and {}", x.kind(), y.kind())),
            },
            Concat => match (a, b) {
                (Val::List(x), Val::List(y)) => Ok(Val::List(x.iter().chain(y.iter()).cloned().collect())),
                (Val::Str(x), Val::Str(y)) => Ok(Val::Str(x + &y)),
                (x, y) => self
                    .error(span, format!("`++` joins two lists or two strings, found {} and {}", x.kind(), y.kind())),
            },
            Eq | Ne | Lt | Le | Gt | Ge => self.compare(op, a, b, sa, sb, span),
            Add | Sub | Mul | Div | MatMul => {
                // Compile-time arithmetic first.
                match (&a, &b, op) {
                    (Val::Int(x), Val::Int(y), Add) => return Ok(Val::Int(x + y)),
                    (Val::Int(x), Val::Int(y), Sub) => return Ok(Val::Int(x - y)),
                    (Val::Int(x), Val::Int(y), Mul) => return Ok(Val::Int(x * y)),
                    (Val::Int(x), Val::Int(y), Div) => {
                        if let (Some(p), Some(q)) = (x.as_const(), y.as_const()) {
                            if q == 0 {
                                return self.error(sb, "division by zero");
                            }
                            return Ok(if p % q == 0 { Val::int(p / q) } else { Val::Float(p as f64 / q as f64) });
                        }
                        if let Some(q) = y.as_const() {
                            if let Some(d) = x.div_exact(q) {
                                return Ok(Val::Int(d));
                            }
                        }
                        let (size, at) = if y.as_const().is_none() { (y, sb) } else { (x, sa) };
                        return Err(self.number_needed("this division", size, at));
                    }
                    _ => {}
                }
                let num = |v: &Val| match v {
                    Val::Float(f) => Some(*f),
                    Val::Int(d) => d.as_const().map(|c| c as f64),
                    _ => None,
                };
                // A size of the data meets a number: the arithmetic needs the size's value.
                match (&a, &b) {
                    (Val::Int(d), Val::Float(_)) if d.as_const().is_none() => {
                        return Err(self.number_needed("this arithmetic", d, sa))
                    }
                    (Val::Float(_), Val::Int(d)) if d.as_const().is_none() => {
                        return Err(self.number_needed("this arithmetic", d, sb))
                    }
                    _ => {}
                }
                if let (Some(x), Some(y)) = (num(&a), num(&b)) {
                    if op != MatMul {
                        return Ok(Val::Float(match op {
                            Add => x + y,
                            Sub => x - y,
                            Mul => x * y,
                            _ => {
                                if y == 0.0 {
                                    return self.error(sb, "division by zero");
                                }
                                x / y
                            }
                        }));
                    }
                }
                let is_tensorish = |v: &Val| matches!(v, Val::Tensor(_) | Val::Feature(_));
                if !(is_tensorish(&a) || is_tensorish(&b))
                    || !matches!(a, Val::Tensor(_) | Val::Feature(_) | Val::Int(_) | Val::Float(_))
                    || !matches!(b, Val::Tensor(_) | Val::Feature(_) | Val::Int(_) | Val::Float(_))
                {
                    let sym = match op {
                        Add => "+",
                        Sub => "-",
                        Mul => "*",
                        Div => "/",
                        _ => "@",
                    };
                    return self.error(span, format!("`{sym}` cannot combine {} and {}", a.kind(), b.kind()));
                }
                let ta = self.expect_tensor(a, sa)?;
                let tb = self.expect_tensor(b, sb)?;
                let t = match op {
                    Add => self.binary(BinaryOp::Add, ta, tb, span)?,
                    Sub => self.binary(BinaryOp::Sub, ta, tb, span)?,
                    Mul => self.binary(BinaryOp::Mul, ta, tb, span)?,
                    Div => self.binary(BinaryOp::Div, ta, tb, span)?,
                    _ => self.matmul(ta, tb, span)?,
                };
                Ok(Val::Tensor(t))
            }
        }
    }

    /// `==`, `!=`, `<`, ... on numbers, sizes, strings and booleans: a boolean. With a
    /// tensor on either side (the other a tensor or a number), a 0/1 tensor of the
    /// broadcast shape, through which no gradient flows.
    fn compare(&mut self, op: BinOp, a: Val, b: Val, sa: Span, sb: Span, span: Span) -> R<Val> {
        use std::cmp::Ordering;
        if matches!(a, Val::Tensor(_) | Val::Feature(_)) || matches!(b, Val::Tensor(_) | Val::Feature(_)) {
            let is_operand = |v: &Val| matches!(v, Val::Tensor(_) | Val::Feature(_) | Val::Int(_) | Val::Float(_));
            if !is_operand(&a) || !is_operand(&b) {
                return self.error(span, format!("cannot compare {} with {}", a.kind(), b.kind()));
            }
            let ta = self.expect_tensor(a, sa)?;
            let tb = self.expect_tensor(b, sb)?;
            // `a < b` is `b > a`, `a <= b` is `b >= a`: the IR has gt, ge, eq and ne.
            let (cmp, x, y) = match op {
                BinOp::Eq => (BinaryOp::Eq, ta, tb),
                BinOp::Ne => (BinaryOp::Ne, ta, tb),
                BinOp::Gt => (BinaryOp::Gt, ta, tb),
                BinOp::Ge => (BinaryOp::Ge, ta, tb),
                BinOp::Lt => (BinaryOp::Gt, tb, ta),
                _ => (BinaryOp::Ge, tb, ta),
            };
            return Ok(Val::Tensor(self.binary(cmp, x, y, span)?));
        }
        let ord: Option<Ordering> = match (&a, &b) {
            (Val::Int(x), Val::Int(y)) => {
                if x == y {
                    Some(Ordering::Equal)
                } else {
                    match (x.as_const(), y.as_const()) {
                        (Some(p), Some(q)) => Some(p.cmp(&q)),
                        _ => {
                            let (size, at) = if x.as_const().is_none() { (x, sa) } else { (y, sb) };
                            return Err(self.number_needed("this comparison", size, at));
                        }
                    }
                }
            }
            (Val::Int(d), Val::Float(_)) if d.as_const().is_none() => {
                return Err(self.number_needed("this comparison", d, sa));
            }
            (Val::Float(_), Val::Int(d)) if d.as_const().is_none() => {
                return Err(self.number_needed("this comparison", d, sb));
            }
            (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
                let f = |v: &Val| match v {
                    Val::Float(f) => *f,
                    Val::Int(d) => d.as_const().unwrap_or(0) as f64,
                    _ => 0.0,
                };
                f(&a).partial_cmp(&f(&b))
            }
            (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
            (Val::Bool(x), Val::Bool(y)) if matches!(op, BinOp::Eq | BinOp::Ne) => Some(x.cmp(y)),
            _ => return self.error(span, format!("cannot compare {} with {}", a.kind(), b.kind())),
        };
        let Some(o) = ord else { return Ok(Val::Bool(false)) };
        Ok(Val::Bool(match op {
            BinOp::Eq => o == Ordering::Equal,
            BinOp::Ne => o != Ordering::Equal,
            BinOp::Lt => o == Ordering::Less,
            BinOp::Le => o != Ordering::Greater,
            BinOp::Gt => o == Ordering::Greater,
            _ => o != Ordering::Less,
        }))
    }

    /// `list[i]` (negative `i` counts from the end) or `table[input]`, a lookup of the
    /// input's ids in an embedding table of the same id space.
    fn index(&mut self, env: &mut Env, base: &Expr, index: &Expr, span: Span) -> R<Val> {
        let b = self.expr(env, base)?;
        match b {
            Val::List(items) => {
                let i = self.const_int(env, index, "a list index")?;
                let n = items.len() as i64;
                let k = if i < 0 { i + n } else { i };
                if k < 0 || k >= n {
                    return self.error(index.span, format!("index {i} is out of range for a list of {n}"));
                }
                Ok(items[k as usize].clone())
            }
            Val::Table { node, ids_of, per_domain } => {
                let iv = self.expr(env, index)?;
                if let Val::Ids { node: ids, rows, space } = iv {
                    // Made ids index a table made for made ids with at least as many rows.
                    let message = match &ids_of {
                        IdSpace::Made { .. } if space.is_some() => Some(format!(
                            "this table holds rows for ids made in the spec, but these are ids of input `{}`",
                            space.as_deref().unwrap_or_default()
                        )),
                        IdSpace::Made { rows: table_rows } if ids_fit(&rows, table_rows) => None,
                        // Ids of an input's space (sampled, or its ids rearranged).
                        IdSpace::Input(name) if space.as_deref() == Some(name.as_str()) => None,
                        IdSpace::Input(name) if space.is_some() => Some(format!(
                            "this table holds rows for the ids of `{name}`, but these are ids of input `{}`",
                            space.as_deref().unwrap_or_default()
                        )),
                        IdSpace::Made { rows: table_rows } => Some(format!(
                            "this table has {table_rows} rows, but these ids go up to {}",
                            &rows - &Dim::lit(1)
                        )),
                        // Ids below `rows(x)` are ids of `x`'s space: ids drawn by
                        // `sample_ids`, or positions along an axis of all its ids.
                        IdSpace::Input(name) if rows == self.rows_dim(name) => None,
                        IdSpace::Input(name) => {
                            Some(format!("this table holds rows for the ids of `{name}`, not for ids made in the spec"))
                        }
                    };
                    if let Some(message) = message {
                        let d =
                            Diagnostic::error(index.span, message).hint("make a table for them: `embedding(ids, dim)`");
                        return Err(self.report(d));
                    }
                    let out = self.lookup(node, ids, &per_domain, span)?;
                    return Ok(Val::Tensor(Tv { node: out, grouped: false }));
                }
                let Val::Feature(fname) = iv else {
                    return self
                        .error(index.span, format!("a table is indexed by an input's ids, found {}", iv.kind()));
                };
                let IdSpace::Input(ids_of) = ids_of else {
                    return self.error(
                        index.span,
                        format!("this table holds rows for ids made in the spec, but `{fname}` has its own ids"),
                    );
                };
                let Some((kind, ids, _)) = self.feature_nodes(&fname) else {
                    return self.error(index.span, format!("unknown input `{fname}`"));
                };
                let space = match &kind {
                    FeatureKind::Categorical | FeatureKind::Domain => fname.clone(),
                    FeatureKind::Sequence { of: Some(o), .. } => o.clone(),
                    FeatureKind::Sequence { of: None, .. } => fname.clone(),
                    FeatureKind::Numeric => {
                        return self
                            .error(index.span, format!("`{fname}` holds values, not ids; it cannot index a table"))
                    }
                };
                if space != ids_of {
                    let d = Diagnostic::error(
                        index.span,
                        format!("this table holds rows for the ids of `{ids_of}`, but `{fname}` has its own ids"),
                    )
                    .hint(if matches!(kind, FeatureKind::Sequence { .. }) {
                        format!("declare the sequence as `input {fname} : sequence(len) of {ids_of}` to share the ids")
                    } else {
                        format!("make a table for it: `embedding({fname}, dim)`")
                    });
                    return Err(self.report(d));
                }
                let out = self.lookup(node, ids, &per_domain, span)?;
                Ok(Val::Tensor(Tv { node: out, grouped: false }))
            }
            Val::Poison(reported) => Err(reported),
            other => self.error(base.span, format!("{} cannot be indexed", other.kind())),
        }
    }
}

impl Elab {
    /// The rows of `table` for `ids`; a per-domain table's ([`Val::Table`]) in each sample's
    /// own domain's block: one GroupIds and one Gather, whose gradient is row-sparse.
    fn lookup(&mut self, table: NodeId, ids: NodeId, per_domain: &Option<(NodeId, Dim)>, span: Span) -> R<NodeId> {
        let ids = match per_domain {
            Some((domains, rows)) => self.add(Op::GroupIds { rows: rows.clone() }, &[ids, *domains], span)?,
            None => ids,
        };
        self.add(Op::Gather, &[table, ids], span)
    }
}

/// Whether ids below `rows` are all below `limit`: the same size, or constants in order.
pub(super) fn ids_fit(rows: &Dim, limit: &Dim) -> bool {
    rows == limit || matches!((rows.as_const(), limit.as_const()), (Some(r), Some(l)) if r <= l)
}
