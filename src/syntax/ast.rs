//! The abstract syntax tree of a `.mdl` file, with a source span on every node.
//!
//! The tree is what the parser produces and what the elaborator (`crate::lower`) walks.
//! It carries no meaning beyond the text: names are unresolved strings and shapes are
//! unchecked expressions.

use crate::diag::Span;

/// One parsed source file.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `use "other.mdl"` — brings that file's blocks into scope (path relative to this file).
    Use {
        path: String,
        span: Span,
    },
    Block(BlockDef),
    Model(ModelDef),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A formal parameter of a block or model: `name` or `name = default`.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub default: Option<Expr>,
}

/// `block name(params) { stmts }`, or the short form `block name(params) = expr`,
/// which the parser turns into a body of one `return expr`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDef {
    pub name: Ident,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// `model name(hyperparameters) { stmts }`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InputKind {
    /// One id per column of the group: `[B, count(g)]`.
    Categorical,
    /// Id sequences of a fixed maximum length: `[B, count(g), len]` plus a mask.
    /// `of` names the categorical group whose vocabulary (and table rows) the ids share.
    Sequence { len: Expr, of: Option<Ident> },
    /// Real values: `[B, count(g)]`.
    Numeric,
    /// The domain (scenario) id of each sample: `[B]`, with `count(g)` domains.
    Domain,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// `input name : kind`
    Input { name: Ident, kind: InputKind, span: Span },
    /// `label a, b` — the tasks, each a column bound by the experiment; `label a : kind`
    /// declares what they hold (`binary`, the default; `regression(..)`, `classes(..)`,
    /// `candidates(..)`: see `crate::tasks`).
    Label { names: Vec<Ident>, kind: Option<Expr>, span: Span },
    /// `let name = value`
    Let { name: Ident, value: Expr, span: Span },
    /// `name = value` — rebinds an existing `let` (used inside `for`).
    Assign { name: Ident, value: Expr, span: Span },
    /// `param name : [d0, d1, ...] ~ init` — a trainable parameter; `init` is optional.
    ParamDecl { name: Ident, shape: Vec<Expr>, init: Option<Expr>, span: Span },
    /// `for var in iter { body }` — unrolled at compile time.
    For { var: Ident, iter: Expr, body: Vec<Stmt>, span: Span },
    /// `if cond { then } else { otherwise }` — decided at compile time.
    If { cond: Expr, then: Vec<Stmt>, otherwise: Option<Vec<Stmt>>, span: Span },
    /// `group name { body }` — parameters created inside belong to the named group
    /// (for freezing); bindings made inside stay visible after it.
    Group { name: Ident, body: Vec<Stmt>, span: Span },
    /// `return value`
    Return { value: Expr, span: Span },
    /// `task name = logit` — the logit of the label `name`.
    Task { name: Ident, value: Expr, span: Span },
    /// `loss value` or `loss name = value` — added to the training objective; a named
    /// loss can be picked by an experiment's stage (`losses: [name]`).
    Loss { name: Option<Ident>, value: Expr, span: Span },
    /// A bare expression (its value is discarded).
    Expr { value: Expr },
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::Input { span, .. }
            | Stmt::Label { span, .. }
            | Stmt::Let { span, .. }
            | Stmt::Assign { span, .. }
            | Stmt::ParamDecl { span, .. }
            | Stmt::For { span, .. }
            | Stmt::If { span, .. }
            | Stmt::Group { span, .. }
            | Stmt::Return { span, .. }
            | Stmt::Task { span, .. }
            | Stmt::Loss { span, .. } => *span,
            Stmt::Expr { value } => value.span,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `@`
    MatMul,
    /// `++` (list concatenation)
    Concat,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

/// A call argument: positional (`name == None`) or named (`name = value`).
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Var(String),
    /// `[a, b, c]`
    List(Vec<Expr>),
    /// `[elem for var in iter]`
    Comprehension {
        elem: Box<Expr>,
        var: Ident,
        iter: Box<Expr>,
    },
    /// `lo..hi` (half-open)
    Range {
        lo: Box<Expr>,
        hi: Box<Expr>,
    },
    /// `f(args)`; `x |> f(args)` is parsed as `f(x, args)`.
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    /// `base[index]`
    Index {
        base: Box<Expr>,
        index: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Unary {
        op: UnOp,
        operand: Box<Expr>,
    },
    /// `per g { stmts; value }` — the body's parameters get one copy per value of the
    /// domain input `g`, and each sample uses its own copy.
    Per {
        group: Ident,
        body: Vec<Stmt>,
        value: Box<Expr>,
    },
    /// `{ stmts; value }`
    Block {
        body: Vec<Stmt>,
        value: Box<Expr>,
    },
}
