//! The built-in functions of the language: the ones that map directly onto primitive
//! IR ops or need the compiler's knowledge of inputs and tasks. Everything that can be
//! written in `.mdl` itself (linear, mlp, fm, pooling, ...) lives in `specs/std.mdl`.
//!
//! [`BUILTINS`] is their one list: each entry holds a built-in's name, its parameters
//! with their defaults, and the function that lowers a call, so a built-in without a
//! lowering, or a lowering without its entry, does not compile.
//!
//! Axis arguments count the leading (batch) axis, as in numpy: for `x: [B, F, d]`,
//! `sum(x, axis = 1)` sums over the fields. Negative axes count from the end.
//! `reshape` takes the shape of one sample: the leading axis is kept.

use super::expr::ids_fit;
use super::value::{IdSpace, Tv, Val};
use super::{frequency_bins_input, label_input, vocab_input, vocab_starts_input, Elab, FeatureKind, R};
use crate::diag::{suggest, Diagnostic, Span};
use crate::tasks::TaskKind;
use mdl_runtime::ir::dim::{numel, shape_to_string};
use mdl_runtime::ops::{BinaryOp, Counter, Op, ReduceOp, UnaryOp};
use mdl_runtime::{Dim, Init, NodeId};
use Param::{Bool, Float, Int, Optional, Required, Str};

/// A parameter of a built-in and its default.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Param {
    /// Must be given.
    Required(&'static str),
    /// May be left out: it is then absent (`Val::None`).
    Optional(&'static str),
    Int(&'static str, i64),
    Float(&'static str, f64),
    Bool(&'static str, bool),
    Str(&'static str, &'static str),
}

impl Param {
    pub fn name(self) -> &'static str {
        match self {
            Required(n) | Optional(n) | Int(n, _) | Float(n, _) | Bool(n, _) | Str(n, _) => n,
        }
    }

    /// The value the parameter takes when a call leaves it out; `None` if it must be given.
    pub fn default(self) -> Option<Val> {
        match self {
            Required(_) => None,
            Optional(_) => Some(Val::None),
            Int(_, i) => Some(Val::int(i)),
            Float(_, f) => Some(Val::Float(f)),
            Bool(_, b) => Some(Val::Bool(b)),
            Str(_, s) => Some(Val::Str(s.to_string())),
        }
    }
}

/// How a call of a built-in becomes graph nodes (or a compile-time value), given its
/// bound arguments and the span of the call.
type Lower = fn(&mut Elab, &Args, Span) -> R<Val>;

/// A built-in function: its name, its parameters, and its lowering.
pub struct Builtin {
    pub name: &'static str,
    pub params: &'static [Param],
    lower: Lower,
}

impl Builtin {
    /// The parameters as argument binding takes them: names with their defaults.
    pub(crate) fn param_list(&self) -> Vec<(String, Option<Val>)> {
        self.params.iter().map(|p| (p.name().to_string(), p.default())).collect()
    }

    /// Lowers a call whose arguments are bound to [`Builtin::params`], in their order.
    pub(crate) fn lower(&self, el: &mut Elab, bound: Vec<(String, Val, Span)>, span: Span) -> R<Val> {
        (self.lower)(el, &Args { items: bound }, span)
    }
}

/// Every built-in function.
pub static BUILTINS: &[Builtin] = &[
    Builtin { name: "relu", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Relu, span) },
    Builtin { name: "sigmoid", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Sigmoid, span) },
    Builtin { name: "tanh", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Tanh, span) },
    Builtin { name: "exp", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Exp, span) },
    Builtin { name: "log", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Log, span) },
    Builtin { name: "sqrt", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Sqrt, span) },
    Builtin { name: "abs", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Abs, span) },
    Builtin { name: "softplus", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Softplus, span) },
    Builtin { name: "gelu", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Gelu, span) },
    Builtin { name: "floor", params: &[Required("x")], lower: |el, a, span| unary(el, a, UnaryOp::Floor, span) },
    Builtin { name: "prelu", params: &[Required("x"), Required("slope")], lower: prelu },
    Builtin { name: "leaky_relu", params: &[Required("x"), Float("slope", 0.01)], lower: leaky_relu },
    Builtin { name: "where", params: &[Required("c"), Required("a"), Required("b")], lower: where_ },
    Builtin { name: "activation", params: &[Required("x"), Str("act", "relu")], lower: activation },
    Builtin {
        name: "maximum",
        params: &[Required("a"), Required("b")],
        lower: |el, a, span| elementwise(el, a, BinaryOp::Max, span),
    },
    Builtin {
        name: "minimum",
        params: &[Required("a"), Required("b")],
        lower: |el, a, span| elementwise(el, a, BinaryOp::Min, span),
    },
    Builtin {
        name: "sum",
        params: &[Required("x"), Optional("axis"), Bool("keep", false)],
        lower: |el, a, span| reduce(el, a, "sum", ReduceOp::Sum, span),
    },
    Builtin {
        name: "mean",
        params: &[Required("x"), Optional("axis"), Bool("keep", false)],
        lower: |el, a, span| reduce(el, a, "mean", ReduceOp::Mean, span),
    },
    Builtin {
        name: "max",
        params: &[Required("x"), Optional("axis"), Bool("keep", false)],
        lower: |el, a, span| reduce(el, a, "max", ReduceOp::Max, span),
    },
    Builtin {
        name: "min",
        params: &[Required("x"), Optional("axis"), Bool("keep", false)],
        lower: |el, a, span| reduce(el, a, "min", ReduceOp::Min, span),
    },
    Builtin { name: "softmax", params: &[Required("x"), Int("axis", -1)], lower: softmax },
    Builtin {
        name: "concat",
        params: &[Required("xs"), Int("axis", -1)],
        lower: |el, a, span| join(el, a, "concat", false, span),
    },
    Builtin {
        name: "stack",
        params: &[Required("xs"), Int("axis", 1)],
        lower: |el, a, span| join(el, a, "stack", true, span),
    },
    Builtin { name: "flatten", params: &[Required("x")], lower: flatten },
    Builtin { name: "reshape", params: &[Required("x"), Required("shape")], lower: reshape },
    Builtin { name: "unsqueeze", params: &[Required("x"), Required("axis")], lower: unsqueeze },
    Builtin { name: "squeeze", params: &[Required("x"), Required("axis")], lower: squeeze },
    Builtin { name: "transpose", params: &[Required("x"), Int("a", -2), Int("b", -1)], lower: transpose },
    Builtin {
        name: "slice",
        params: &[Required("x"), Required("axis"), Required("start"), Required("len")],
        lower: slice,
    },
    Builtin { name: "bucketize", params: &[Required("x"), Required("boundaries")], lower: bucketize },
    Builtin {
        name: "floordiv",
        params: &[Required("a"), Required("b")],
        lower: |el, a, span| div_mod(el, a, "floordiv", span),
    },
    Builtin { name: "mod", params: &[Required("a"), Required("b")], lower: |el, a, span| div_mod(el, a, "mod", span) },
    Builtin { name: "arange", params: &[Required("n")], lower: arange },
    Builtin { name: "tril", params: &[Required("n"), Int("k", 0)], lower: |el, a, span| triangle(el, a, false, span) },
    Builtin { name: "triu", params: &[Required("n"), Int("k", 0)], lower: |el, a, span| triangle(el, a, true, span) },
    Builtin { name: "eye", params: &[Required("n")], lower: eye },
    Builtin { name: "take_along", params: &[Required("x"), Required("idx"), Int("axis", -1)], lower: take_along },
    Builtin { name: "take", params: &[Required("x"), Required("idx"), Required("axis")], lower: take },
    Builtin { name: "pairs", params: &[Required("n")], lower: pairs },
    Builtin { name: "top_k", params: &[Required("x"), Required("k"), Int("axis", -1)], lower: top_k },
    Builtin {
        name: "argmax",
        params: &[Required("x"), Int("axis", -1), Bool("keep", false)],
        lower: |el, a, span| arg_extreme(el, a, true, span),
    },
    Builtin {
        name: "argmin",
        params: &[Required("x"), Int("axis", -1), Bool("keep", false)],
        lower: |el, a, span| arg_extreme(el, a, false, span),
    },
    Builtin { name: "sort", params: &[Required("x"), Int("axis", -1), Bool("descending", false)], lower: sort },
    Builtin { name: "dropout", params: &[Required("x"), Int("p", 0)], lower: dropout },
    Builtin { name: "bernoulli", params: &[Required("like"), Required("p")], lower: bernoulli },
    Builtin { name: "permutation", params: &[Required("n")], lower: permutation },
    Builtin {
        name: "sample_ids",
        params: &[
            Required("pos"),
            Required("n"),
            Str("by", "uniform"),
            Float("power", 1.0),
            Bool("exclude", true),
            Optional("not_in"),
        ],
        lower: sample_ids,
    },
    Builtin { name: "frequency_bin", params: &[Required("ids"), Int("bins", 10)], lower: frequency_bin },
    Builtin { name: "if_training", params: &[Required("a"), Required("b")], lower: if_training },
    Builtin { name: "step", params: &[], lower: |el, _, span| counter(el, Counter::Step, span) },
    Builtin { name: "epoch", params: &[], lower: |el, _, span| counter(el, Counter::Epoch, span) },
    Builtin { name: "stage", params: &[], lower: |el, _, span| counter(el, Counter::Stage, span) },
    Builtin { name: "stopgrad", params: &[Required("x")], lower: stopgrad },
    Builtin { name: "path", params: &[Required("x"), Required("name")], lower: path },
    Builtin { name: "one_hot", params: &[Required("ids")], lower: one_hot },
    Builtin { name: "embedding", params: &[Required("ids"), Required("dim"), Float("std", 0.0001)], lower: embedding },
    Builtin { name: "mask", params: &[Required("seq")], lower: mask },
    Builtin { name: "count", params: &[Required("input")], lower: count },
    Builtin { name: "rows", params: &[Required("input")], lower: rows },
    Builtin { name: "len", params: &[Required("list")], lower: len },
    Builtin { name: "dim", params: &[Required("x"), Required("axis")], lower: dim },
    Builtin { name: "bce", params: &[Required("task"), Optional("by")], lower: bce },
    Builtin { name: "mse", params: &[Required("task"), Optional("by")], lower: mse },
    Builtin { name: "softmax_ce", params: &[Required("task"), Optional("by")], lower: softmax_ce },
    Builtin { name: "label", params: &[Required("task")], lower: label },
    Builtin { name: "broadcast_to", params: &[Required("x"), Required("like")], lower: broadcast_to },
    Builtin { name: "group_mean", params: &[Required("x"), Required("by")], lower: group_mean },
    Builtin {
        name: "running",
        params: &[Required("stat"), Float("momentum", 0.1), Float("initial", 0.0)],
        lower: running,
    },
    Builtin { name: "probe", params: &[Required("x"), Required("name")], lower: probe },
];

pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

pub fn is_builtin(name: &str) -> bool {
    find(name).is_some()
}

/// The built-in called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// Bound arguments of one call, read by name.
struct Args {
    items: Vec<(String, Val, Span)>,
}

impl Args {
    fn get(&self, name: &str) -> (Val, Span) {
        self.items
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, s)| (v.clone(), *s))
            .unwrap_or((Val::None, Span::default()))
    }
}

// ------------------------------------------------------------------ lowerings

fn unary(el: &mut Elab, a: &Args, op: UnaryOp, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    Ok(Val::Tensor(el.unary(op, x, span)?))
}

fn activation(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (act, s) = string(el, a, "act")?;
    let op = match act.as_str() {
        "relu" => UnaryOp::Relu,
        "sigmoid" => UnaryOp::Sigmoid,
        "tanh" => UnaryOp::Tanh,
        "softplus" => UnaryOp::Softplus,
        "gelu" => UnaryOp::Gelu,
        "leaky_relu" => {
            let slope = Tv { node: el.scalar(LEAKY_RELU_SLOPE, span)?, grouped: false };
            return Ok(Val::Tensor(el.binary(BinaryOp::Prelu, x, slope, span)?));
        }
        "none" | "linear" | "identity" => return Ok(Val::Tensor(x)),
        other => {
            let known = ["relu", "sigmoid", "tanh", "softplus", "gelu", "leaky_relu", "none"];
            let mut d = Diagnostic::error(s, format!("unknown activation \"{other}\""))
                .label(format!("expected one of: {}", known.join(", ")));
            if let Some(k) = suggest(other, known) {
                d = d.hint(format!("did you mean \"{k}\"?"));
            }
            return Err(el.report(d));
        }
    };
    Ok(Val::Tensor(el.unary(op, x, span)?))
}

/// `leaky_relu`'s default slope (also the slope of `activation(x, "leaky_relu")`).
const LEAKY_RELU_SLOPE: f64 = 0.01;

/// `prelu(x, slope)`: the slope is a tensor that broadcasts against `x` (a learned
/// parameter, e.g. one per channel `[d]`).
fn prelu(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let slope = tensor(el, a, "slope")?;
    Ok(Val::Tensor(el.binary(BinaryOp::Prelu, x, slope, span)?))
}

/// `leaky_relu(x, slope = 0.01)`: PReLU with a constant slope.
fn leaky_relu(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (slope, _) = number(el, a, "slope")?;
    let slope = Tv { node: el.scalar(slope, span)?, grouped: false };
    Ok(Val::Tensor(el.binary(BinaryOp::Prelu, x, slope, span)?))
}

/// `where(c, a, b)`: `a` where `c != 0`, else `b` (all three broadcast), as
/// `keep(c, a) + keep(c == 0, b)`, which is exact for every value (see `BinaryOp::Keep`).
/// The gradient reaches `a` and `b`, never `c`.
fn where_(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let c = tensor(el, a, "c")?;
    let x = tensor(el, a, "a")?;
    let y = tensor(el, a, "b")?;
    let zero = Tv { node: el.scalar(0.0, span)?, grouped: false };
    let not_c = el.binary(BinaryOp::Eq, c, zero, span)?;
    let from_x = el.binary(BinaryOp::Keep, c, x, span)?;
    let from_y = el.binary(BinaryOp::Keep, not_c, y, span)?;
    Ok(Val::Tensor(el.binary(BinaryOp::Add, from_x, from_y, span)?))
}

fn elementwise(el: &mut Elab, a: &Args, op: BinaryOp, span: Span) -> R<Val> {
    let x = tensor(el, a, "a")?;
    let y = tensor(el, a, "b")?;
    Ok(Val::Tensor(el.binary(op, x, y, span)?))
}

fn softmax(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let node = el.add(Op::Softmax { axis }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
}

/// `concat` and `stack` (which gives each tensor a new axis first).
fn join(el: &mut Elab, a: &Args, name: &str, stack: bool, span: Span) -> R<Val> {
    if let (Val::List(items), s) = a.get("xs") {
        if items.iter().any(|it| value_ids(el, it.clone()).is_some()) {
            return join_ids(el, items.to_vec(), s, stack, a, span);
        }
    }
    let (xs, s) = tensor_list(el, a, "xs")?;
    if xs.is_empty() {
        return el.error(s, format!("`{name}` needs at least one tensor"));
    }
    let xs = align_list(el, xs, span)?;
    let grouped = xs[0].grouped;
    let extra = usize::from(stack);
    let axis = axis_arg(el, a, "axis", xs[0], extra)?;
    let mut nodes = Vec::with_capacity(xs.len());
    for x in &xs {
        nodes.push(if stack { insert_axis(el, x.node, axis, span)? } else { x.node });
    }
    let node = el.add(Op::Concat { axis }, &nodes, span)?;
    Ok(Val::Tensor(Tv { node, grouped }))
}

fn flatten(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let shape = el.shape(x.node).to_vec();
    let new = if el.has_lead(x) && !shape.is_empty() {
        vec![shape[0].clone(), numel(&shape[1..])]
    } else {
        vec![numel(&shape)]
    };
    let node = el.add(Op::Reshape { shape: new }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
}

fn reshape(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (dims, s) = dims_arg(el, a, "shape")?;
    let shape = el.shape(x.node).to_vec();
    let mut new = Vec::new();
    if el.has_lead(x) && !shape.is_empty() {
        new.push(shape[0].clone());
    }
    new.extend(dims);
    let scope = el.scope_path();
    match el.graph.add(Op::Reshape { shape: new.clone() }, &[x.node], &scope) {
        Ok(node) => Ok(Val::Tensor(Tv { node, grouped: x.grouped })),
        Err(_) => el.error(
            s,
            format!(
                "cannot reshape {} ({} values per sample) to {}",
                el.shape_str(x.node),
                if el.has_lead(x) { numel(&shape[1..]) } else { numel(&shape) },
                shape_to_string(&new)
            ),
        ),
    }
}

fn unsqueeze(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let ids = layout_ids(el, a, "x");
    let x = match &ids {
        Some((node, ..)) => Tv { node: *node, grouped: false },
        None => tensor(el, a, "x")?,
    };
    let axis = axis_arg(el, a, "axis", x, 1)?;
    let node = insert_axis(el, x.node, axis, span)?;
    Ok(laid_out(node, x, ids))
}

/// The result of a layout builtin on `x`: ids again (with the same bound and space) when
/// `x` held ids, else a tensor.
fn laid_out(node: mdl_runtime::NodeId, x: Tv, ids: Option<(mdl_runtime::NodeId, Dim, Option<String>)>) -> Val {
    match ids {
        Some((_, rows, space)) => Val::Ids { node, rows, space },
        None => Val::Tensor(Tv { node, grouped: x.grouped }),
    }
}

fn squeeze(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let ids = layout_ids(el, a, "x");
    let x = match &ids {
        Some((node, ..)) => Tv { node: *node, grouped: false },
        None => tensor(el, a, "x")?,
    };
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let mut shape = el.shape(x.node).to_vec();
    if !shape[axis].is_one() {
        let s = a.get("axis").1;
        return el.error(s, format!("axis {axis} of {} has size {}, not 1", el.shape_str(x.node), shape[axis]));
    }
    shape.remove(axis);
    let node = el.add(Op::Reshape { shape }, &[x.node], span)?;
    Ok(laid_out(node, x, ids))
}

fn transpose(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let i = axis_arg(el, a, "a", x, 0)?;
    let j = axis_arg(el, a, "b", x, 0)?;
    if x.grouped && (i == 0 || j == 0) {
        return el.error(span, "`transpose` cannot move the domain axis of a per-domain value");
    }
    let mut perm: Vec<usize> = (0..el.shape(x.node).len()).collect();
    perm.swap(i, j);
    let node = el.add(Op::Permute { perm }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
}

fn slice(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let ids = layout_ids(el, a, "x");
    let x = match &ids {
        Some((node, ..)) => Tv { node: *node, grouped: false },
        None => tensor(el, a, "x")?,
    };
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let start = int(el, a, "start")?;
    let len = int(el, a, "len")?;
    let node = el.add(Op::Slice { axis, start, len }, &[x.node], span)?;
    Ok(laid_out(node, x, ids))
}

/// `bucketize(x, boundaries)`: the ids of the buckets the values of `x` fall in, bucket `i`
/// holding `boundaries[i-1] <= x < boundaries[i]` (ids below `len(boundaries) + 1`).
fn bucketize(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let (list, s) = a.get("boundaries");
    let Val::List(items) = list else {
        return el.error(s, format!("`boundaries` must be a list of numbers, found {}", list.kind()));
    };
    let mut boundaries = Vec::with_capacity(items.len());
    for it in items.iter().cloned() {
        let v = match it {
            Val::Float(f) => f,
            Val::Int(d) if d.as_const().is_some() => d.as_const().unwrap_or_default() as f64,
            other => {
                return el.error(s, format!("`boundaries` must be a list of numbers, found {} in it", other.kind()))
            }
        };
        if let Some(&last) = boundaries.last() {
            if v <= last {
                return el.error(s, format!("`boundaries` must increase strictly, but {v} follows {last}"));
            }
        }
        boundaries.push(v);
    }
    if boundaries.is_empty() {
        return el.error(s, "`boundaries` needs at least one value");
    }
    let rows = Dim::from(boundaries.len() + 1);
    let node = el.add(Op::Bucketize { boundaries }, &[x.node], span)?;
    Ok(Val::Ids { node, rows, space: None })
}

/// `floordiv(a, b)` and `mod(a, b)` (called `name`). On ids made in the spec, with `b` a
/// positive constant integer: ids again (`floordiv` of ids below `r` is below `ceil(r / b)`,
/// `mod` below `min(r, b)`). On real tensors and numbers: `floor(a / b)` and
/// `a - b * floor(a / b)` (the sign of `b`, as Python's `//` and `%`).
fn div_mod(el: &mut Elab, a: &Args, name: &str, span: Span) -> R<Val> {
    if let (Val::Ids { node, rows, space }, s) = a.get("a") {
        if let Some(input) = space {
            let d = Diagnostic::error(s, format!("`{name}` cannot divide ids of input `{input}`"))
                .label("their numbering is the data's")
                .hint("divide ids made with `bucketize`, or values");
            return Err(el.report(d));
        }
        let (b, bs) = a.get("b");
        let by = match &b {
            Val::Int(d) => d.as_const().filter(|&c| c > 0 && c <= u32::MAX as i64),
            _ => None,
        };
        let Some(by) = by else {
            let found = match &b {
                Val::Int(d) => d.to_string(),
                other => other.kind().to_string(),
            };
            return el.error(bs, format!("`{name}` of ids takes a positive constant integer, found {found}"));
        };
        // Positions along an axis of a size known only with data: `mod` is below `b`, and
        // `floordiv` below the size still.
        let (op, rows) = match (name, rows.as_const()) {
            ("mod", Some(r)) => (Op::IdMod { by: by as u32 }, Dim::lit(r.min(by))),
            ("mod", None) => (Op::IdMod { by: by as u32 }, Dim::lit(by)),
            (_, Some(r)) => (Op::IdDiv { by: by as u32 }, Dim::lit((r + by - 1) / by)),
            (_, None) => (Op::IdDiv { by: by as u32 }, rows),
        };
        let node = el.add(op, &[node], span)?;
        return Ok(Val::Ids { node, rows, space: None });
    }
    if let (Val::Feature(f), s) = a.get("a") {
        if !matches!(el.feature_nodes(&f), Some((FeatureKind::Numeric, _, _))) {
            let d = Diagnostic::error(s, format!("`{name}` cannot divide the ids of input `{f}`"))
                .label("their numbering is the data's")
                .hint("divide ids made with `bucketize`, or values");
            return Err(el.report(d));
        }
    }
    let x = tensor(el, a, "a")?;
    let y = tensor(el, a, "b")?;
    let ratio = el.binary(BinaryOp::Div, x, y, span)?;
    let quotient = el.unary(UnaryOp::Floor, ratio, span)?;
    if name == "floordiv" {
        return Ok(Val::Tensor(quotient));
    }
    let whole = el.binary(BinaryOp::Mul, y, quotient, span)?;
    Ok(Val::Tensor(el.binary(BinaryOp::Sub, x, whole, span)?))
}

/// The size argument `n` of a constant tensor: an integer, positive when it is known.
fn size_arg(el: &mut Elab, a: &Args) -> R<Dim> {
    let n = int(el, a, "n")?;
    if n.as_const().is_some_and(|c| c <= 0) {
        return el.error(a.get("n").1, format!("`n` must be a positive size, found {n}"));
    }
    Ok(n)
}

/// `arange(n)`: the positions `[0, 1, ..., n-1]` as one constant op.
fn arange(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let n = size_arg(el, a)?;
    let node = el.add(Op::Arange { n }, &[], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `tril(n, k)` / `triu(n, k)`: the `[n, n]` 0/1 triangle on and below (above) diagonal `k`,
/// as one constant op (a causal attention mask is `tril(L)`).
fn triangle(el: &mut Elab, a: &Args, upper: bool, span: Span) -> R<Val> {
    let n = size_arg(el, a)?;
    let k = int(el, a, "k")?;
    let Some(k) = k.as_const() else {
        return el.error(a.get("k").1, format!("`k` must be a constant integer, found the size {k}"));
    };
    let node = el.add(Op::Triangle { n, upper, k }, &[], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `eye(n)`: the `[n, n]` identity as one constant op.
fn eye(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let n = size_arg(el, a)?;
    let node = el.add(Op::Eye { n }, &[], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// The positions argument `name` of a selection: ids and the bound they are below.
fn ids_arg(el: &mut Elab, a: &Args, name: &str) -> R<(mdl_runtime::NodeId, Dim, Span)> {
    match a.get(name) {
        (Val::Ids { node, rows, space: None }, s) => Ok((node, rows, s)),
        (Val::Poison(reported), _) => Err(reported),
        (other, s) => el.error(
            s,
            format!("`{name}` must be positions (from `top_k`, `argmax`, `argmin` or `sort`), found {}", other.kind()),
        ),
    }
}

/// Ids below `rows` select along `axis` of `x` only when they are below its size there.
fn check_positions(el: &mut Elab, x: Tv, axis: usize, rows: &Dim, s: Span) -> R<()> {
    let n = el.shape(x.node)[axis].clone();
    if ids_fit(rows, &n) {
        return Ok(());
    }
    el.error(
        s,
        format!(
            "these positions go up to {}, but axis {axis} of {} has {n}",
            rows - &Dim::lit(1),
            el.shape_str(x.node)
        ),
    )
}

/// `take_along(x, idx, axis = -1)`: `out[.., p, ..] = x[.., idx[.., p, ..], ..]` along `axis`
/// (numpy's `take_along_axis`). `idx` may leave out trailing axes, and have size 1 on any
/// axis but `axis`: it is then the same for every index there.
fn take_along(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let (idx, rows, s) = ids_arg(el, a, "idx")?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let (rank, mut id_shape) = (el.shape(x.node).len(), el.shape(idx).to_vec());
    if id_shape.len() > rank {
        return el.error(
            s,
            format!(
                "positions {} have more axes than the tensor {} they select from",
                shape_to_string(&id_shape),
                el.shape_str(x.node)
            ),
        );
    }
    check_positions(el, x, axis, &rows, s)?;
    let idx = if id_shape.len() < rank {
        id_shape.resize(rank, Dim::lit(1));
        el.add(Op::Reshape { shape: id_shape }, &[idx], span)?
    } else {
        idx
    };
    let node = el.add(Op::TakeAlong { axis }, &[x.node, idx], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `take(x, idx, axis)`: the same positions `idx` (a list of constant integers, or ids of
/// any shape) for every index of the other axes: `x`'s shape with `axis` replaced by
/// `idx`'s (numpy's `take`). One op whatever the number of positions.
fn take(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let shape = el.shape(x.node).to_vec();
    let (ids, id_shape) = match a.get("idx") {
        (Val::List(items), s) => {
            let n = shape[axis].as_const();
            let mut list = Vec::with_capacity(items.len());
            for it in items.iter() {
                let c = match it {
                    Val::Int(d) => d.as_const(),
                    _ => None,
                };
                match c {
                    Some(c) if c >= 0 && n.is_none_or(|n| c < n) && c <= u32::MAX as i64 => list.push(c as u32),
                    Some(c) => {
                        return el
                            .error(s, format!("position {c} is outside axis {axis} of {}", shape_to_string(&shape)))
                    }
                    None => {
                        if let Val::Int(d) = it {
                            return Err(el.number_needed("a position in `idx`", d, s));
                        }
                        return el.error(
                            s,
                            format!("`idx` must be a list of constant positions, found {} in it", it.kind()),
                        );
                    }
                }
            }
            if list.is_empty() {
                return el.error(s, "`idx` needs at least one position");
            }
            let len = list.len();
            (el.add(Op::IdList { ids: list }, &[], span)?, vec![Dim::from(len)])
        }
        (Val::Ids { node, rows, space: None }, s) => {
            check_positions(el, x, axis, &rows, s)?;
            (node, el.shape(node).to_vec())
        }
        (Val::Poison(reported), _) => return Err(reported),
        (other, s) => {
            return el.error(
                s,
                format!("`idx` must be a list of positions or positions from `top_k`, found {}", other.kind()),
            )
        }
    };
    let count = numel(&id_shape);
    let mut along = vec![Dim::lit(1); shape.len()];
    along[axis] = count;
    let ids = el.add(Op::Reshape { shape: along }, &[ids], span)?;
    let mut node = el.add(Op::TakeAlong { axis }, &[x.node, ids], span)?;
    if id_shape.len() != 1 {
        let out: Vec<Dim> = [&shape[..axis], &id_shape[..], &shape[axis + 1..]].concat();
        node = el.add(Op::Reshape { shape: out }, &[node], span)?;
    }
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// The most pairs `pairs(n)` makes (as many as a range may have items).
const MAX_PAIRS: i64 = 100_000;

/// `pairs(n)`: the pairs `i < j` below `n` in order, as two lists of positions
/// `[[0, 0, .., 1, ..], [1, 2, .., 2, ..]]` (for `take`).
fn pairs(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let n = int(el, a, "n")?;
    let s = a.get("n").1;
    let n = el.number("`pairs`", &n, s)?;
    if n < 2 {
        return el.error(s, format!("`pairs` needs a number of at least 2, found {n}"));
    }
    if n * (n - 1) / 2 > MAX_PAIRS {
        return el.error(s, format!("`pairs({n})` makes {} pairs (at most {MAX_PAIRS})", n * (n - 1) / 2));
    }
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for i in 0..n {
        for j in i + 1..n {
            first.push(Val::int(i));
            second.push(Val::int(j));
        }
    }
    Ok(Val::List([Val::List(first.into()), Val::List(second.into())].into()))
}

/// The positions of the `k` largest (`largest`) or smallest values of `x` along `axis`, as
/// ids below the axis's size, and the size.
fn positions(el: &mut Elab, x: Tv, axis: usize, k: Dim, largest: bool, span: Span) -> R<(mdl_runtime::NodeId, Dim)> {
    let n = el.shape(x.node)[axis].clone();
    let node = el.add(Op::TopK { axis, k, largest }, &[x.node], span)?;
    Ok((node, n))
}

/// `top_k(x, k, axis = -1)`: `[values, positions]` of the `k` largest values along `axis`,
/// largest first (equal values: the lowest position first). The gradient reaches the
/// selected elements through the values.
fn top_k(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let k = int(el, a, "k")?;
    let n = el.shape(x.node)[axis].clone();
    // A constant `k` against a size known only with data is checked when the model runs.
    let within = k == n
        || match (k.as_const(), n.as_const()) {
            (Some(k), Some(n)) => k <= n,
            (Some(_), None) => true,
            (None, _) => false,
        };
    if k.as_const().is_some_and(|c| c < 1) || !within {
        return el.error(
            a.get("k").1,
            format!("`k` must be between 1 and {n} (axis {axis} of {}), found {k}", el.shape_str(x.node)),
        );
    }
    let (pos, rows) = positions(el, x, axis, k, true, span)?;
    let values = el.add(Op::TakeAlong { axis }, &[x.node, pos], span)?;
    Ok(Val::List([Val::Tensor(Tv { node: values, grouped: false }), Val::Ids { node: pos, rows, space: None }].into()))
}

/// `argmax` / `argmin(x, axis = -1, keep = false)`: the position of the largest (smallest)
/// value along `axis` (the lowest of equal ones), the axis removed unless `keep`.
fn arg_extreme(el: &mut Elab, a: &Args, largest: bool, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let (mut pos, rows) = positions(el, x, axis, Dim::lit(1), largest, span)?;
    match a.get("keep") {
        (Val::Bool(true), _) => {}
        (Val::Bool(false), _) => {
            let mut shape = el.shape(pos).to_vec();
            shape.remove(axis);
            pos = el.add(Op::Reshape { shape }, &[pos], span)?;
        }
        (other, s) => return el.error(s, format!("`keep` must be true or false, found {}", other.kind())),
    }
    Ok(Val::Ids { node: pos, rows, space: None })
}

/// `sort(x, axis = -1, descending = false)`: `[values, positions]` along `axis`, equal
/// values in order of position (a stable sort).
fn sort(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    let descending = match a.get("descending") {
        (Val::Bool(b), _) => b,
        (other, s) => return el.error(s, format!("`descending` must be true or false, found {}", other.kind())),
    };
    let n = el.shape(x.node)[axis].clone();
    let (pos, rows) = positions(el, x, axis, n, descending, span)?;
    let values = el.add(Op::TakeAlong { axis }, &[x.node, pos], span)?;
    Ok(Val::List([Val::Tensor(Tv { node: values, grouped: false }), Val::Ids { node: pos, rows, space: None }].into()))
}

fn dropout(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (p, s) = number(el, a, "p")?;
    if !(0.0..1.0).contains(&p) {
        return el.error(s, format!("a dropout rate must be in [0, 1), found {p}"));
    }
    if p == 0.0 {
        return Ok(Val::Tensor(x));
    }
    let x = el.materialise(x, span)?;
    let stream = el.next_dropout_stream();
    let m = el.add(Op::DropMask { p, stream }, &[x.node], span)?;
    let node = el.add(Op::Binary(BinaryOp::Mul), &[x.node, m], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `bernoulli(like, p)`: a 0/1 mask shaped like `like`, each element `1` with probability
/// `p`, drawn anew each training step; `p` everywhere in evaluation (its expectation, as
/// dropout's mask is 1 there).
fn bernoulli(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let like = tensor(el, a, "like")?;
    let (p, s) = number(el, a, "p")?;
    if !(0.0..=1.0).contains(&p) {
        return el.error(s, format!("a probability must be in [0, 1], found {p}"));
    }
    let like = el.materialise(like, span)?;
    let stream = el.next_dropout_stream();
    let node = el.add(Op::Bernoulli { p, stream }, &[like.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `permutation(n)`: the positions `0..n` in a random order, a new one each training step
/// (`permutation(dim(x, 0))` shuffles the batch's rows with `take`).
fn permutation(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let n = size_arg(el, a)?;
    let stream = el.next_dropout_stream();
    let node = el.add(Op::Permutation { n: n.clone(), stream }, &[], span)?;
    Ok(Val::Ids { node, rows: n, space: None })
}

/// `sample_ids(pos, n, by = "uniform", power = 1.0, exclude = true, not_in?)`: for each id
/// of the categorical or sequence input `pos`, `n` ids drawn from the vocabulary of its
/// column (never padding or out-of-vocabulary; never the id itself with `exclude`; never an
/// id of the same row of `not_in`, ids of `pos`'s space such as the row's history), uniformly
/// or by train count (`by = "frequency"`, each count raised to `power`). The ids index the
/// input's tables. The vocabulary reaches the graph as two inputs the data binds
/// (`vocab_input`, `vocab_starts_input`).
fn sample_ids(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (ids, space) = space_ids(el, a, "pos", "`sample_ids` draws for")?;
    let n = int(el, a, "n")?;
    if n.as_const().is_none_or(|c| c <= 0) {
        return el.error(a.get("n").1, format!("`n` must be a positive constant, found {n}"));
    }
    let (by, bs) = string(el, a, "by")?;
    let (power, ps) = number(el, a, "power")?;
    let power = match by.as_str() {
        "uniform" => 0.0,
        "frequency" if power.is_finite() && power > 0.0 => power,
        "frequency" => return el.error(ps, format!("`power` must be a positive number, found {power}")),
        _ => return el.error(bs, format!("`by` must be \"uniform\" or \"frequency\", found {by:?}")),
    };
    let exclude = match a.get("exclude") {
        (Val::Bool(b), _) => b,
        (other, s) => return el.error(s, format!("`exclude` must be true or false, found {}", other.kind())),
    };
    // A sequence with ids of its own has one column of ids; a categorical input one per column.
    let own_sequence = matches!(el.feature_nodes(&space), Some((FeatureKind::Sequence { .. }, ..)));
    let weights = match el.graph.input_info(&vocab_input(&space)) {
        Some(i) => i.node,
        None => el.graph.input(&vocab_input(&space), vec![el.rows_dim(&space)], mdl_runtime::DType::F),
    };
    let starts = match el.graph.input_info(&vocab_starts_input(&space)) {
        Some(i) => i.node,
        None => {
            let columns = if own_sequence { Dim::lit(1) } else { el.count_dim(&space, false) };
            el.graph.input(&vocab_starts_input(&space), vec![&columns + &Dim::lit(1)], mdl_runtime::DType::I)
        }
    };
    let mut operands = vec![ids, weights, starts];
    match a.get("not_in") {
        (Val::None, _) => {}
        (Val::Poison(reported), _) => return Err(reported),
        (found, fs) => match input_ids(el, found.clone()) {
            Some((seen, _, seen_space)) if seen_space == space => operands.push(seen),
            Some((_, _, seen_space)) => {
                return el.error(
                    fs,
                    format!("`not_in` must hold ids of `{space}`'s space, as `pos` does; found ids of `{seen_space}`"),
                )
            }
            None => {
                let what = match &found {
                    Val::Feature(f) => format!("`{f}` is not one"),
                    other => format!("found {}", other.kind()),
                };
                return el.error(
                    fs,
                    format!("`not_in` takes the ids of a categorical or sequence input (or ids rearranged from them); {what}"),
                );
            }
        },
    }
    el.vocabularies.insert(space.clone());
    let stream = el.next_dropout_stream();
    let seen = operands.len() == 4;
    let node = el.add(Op::SampleIds { n, power, exclude, seen, stream }, &operands, span)?;
    Ok(Val::Ids { node, rows: el.rows_dim(&space), space: Some(space) })
}

/// `frequency_bin(ids, bins = 10)`: for each id of a categorical or sequence input (or ids
/// of such a space), its bin by train count within its column: the column's ids, most
/// frequent first, cut into `bins` bins of equal train mass (bin 1 the most frequent, `bins`
/// the rarest; 0 for padding and out-of-vocabulary ids). Ids below `bins + 1`, made in the
/// spec. The bins reach the graph as an input the data binds ([`frequency_bins_input`]):
/// each id's bin as a number, gathered and turned back into ids by `bucketize`.
fn frequency_bin(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (ids, space) = space_ids(el, a, "ids", "`frequency_bin` takes")?;
    let (bins, bs) = (int(el, a, "bins")?, a.get("bins").1);
    let bins = match bins.as_const() {
        Some(b) if (1..=1 << 20).contains(&b) => b as usize,
        _ => return el.error(bs, format!("`bins` must be a constant from 1 to 1048576, found {bins}")),
    };
    let name = frequency_bins_input(&space, bins);
    let table = match el.graph.input_info(&name) {
        Some(i) => i.node,
        None => el.graph.input(&name, vec![el.rows_dim(&space)], mdl_runtime::DType::F),
    };
    el.frequency_bins.insert((space, bins));
    let values = el.add(Op::Gather, &[table, ids], span)?;
    let boundaries = (1..=bins).map(|b| b as f64).collect();
    let node = el.add(Op::Bucketize { boundaries }, &[values], span)?;
    Ok(Val::Ids { node, rows: Dim::from(bins + 1), space: None })
}

/// Argument `name` of a built-in that reads an input's id space (`sample_ids`,
/// `frequency_bin`), as `(ids node, space)`: ids of a categorical or sequence input, or ids
/// rearranged from them ([`input_ids`]). Anything else is an error at the argument that
/// starts with `says` (what the built-in does with the ids).
fn space_ids(el: &mut Elab, a: &Args, name: &str, says: &str) -> R<(mdl_runtime::NodeId, String)> {
    if let Some((ids, _, space)) = input_ids(el, a.get(name).0) {
        return Ok((ids, space));
    }
    let (found, fs) = a.get(name);
    if let Val::Poison(reported) = found {
        return Err(reported);
    }
    let what = match &found {
        Val::Feature(f) => format!("`{f}` is not one"),
        other => format!("found {}", other.kind()),
    };
    el.error(fs, format!("{says} the ids of a categorical or sequence input (or ids rearranged from them); {what}"))
}

/// The ids of a declared input's id space that `v` holds: a categorical or sequence input's
/// own ids, or ids of such a space made by `sample_ids` or rearranged by a layout builtin, as
/// `(node, rows, space)`; `None` for anything else.
fn input_ids(el: &Elab, v: Val) -> Option<(mdl_runtime::NodeId, Dim, String)> {
    match v {
        Val::Ids { node, rows, space: Some(space) } => Some((node, rows, space)),
        Val::Feature(f) => {
            let space = match el.feature_nodes(&f)? {
                (FeatureKind::Categorical, ..) | (FeatureKind::Sequence { of: None, .. }, ..) => f.clone(),
                (FeatureKind::Sequence { of: Some(o), .. }, ..) => o,
                _ => return None,
            };
            let (_, ids, _) = el.feature_nodes(&f)?;
            Some((ids, el.rows_dim(&space), space))
        }
        _ => None,
    }
}

/// The ids argument `name` of a layout builtin (`slice`, `squeeze`, `unsqueeze`), when it
/// holds ids: made ids, or an input's ids (see [`input_ids`]), as `(node, rows, space)`.
fn layout_ids(el: &Elab, a: &Args, name: &str) -> Option<(mdl_runtime::NodeId, Dim, Option<String>)> {
    value_ids(el, a.get(name).0)
}

fn value_ids(el: &Elab, v: Val) -> Option<(mdl_runtime::NodeId, Dim, Option<String>)> {
    match v {
        Val::Ids { node, rows, space: None } => Some((node, rows, None)),
        v => input_ids(el, v).map(|(node, rows, space)| (node, rows, Some(space))),
    }
}

/// `concat` / `stack` of ids: every item ids of one kind (the same bound and the same
/// input's id space, or made ids of the same bound), joined into ids of that kind.
fn join_ids(el: &mut Elab, items: Vec<Val>, s: Span, stack: bool, a: &Args, span: Span) -> R<Val> {
    let mut parts = Vec::with_capacity(items.len());
    for it in items {
        let kind = it.kind();
        match value_ids(el, it) {
            Some(p) => parts.push(p),
            None => return el.error(s, format!("`concat` and `stack` join ids with ids only, found {kind} among ids")),
        }
    }
    let (_, rows, space) = parts[0].clone();
    for (_, r, sp) in &parts[1..] {
        if *sp != space || *r != rows {
            let describe = |r: &Dim, sp: &Option<String>| match sp {
                Some(input) => format!("ids of input `{input}`"),
                None => format!("ids below {r}"),
            };
            return el
                .error(s, format!("ids of one kind are joined: {} and {}", describe(&rows, &space), describe(r, sp)));
        }
    }
    let first = Tv { node: parts[0].0, grouped: false };
    let axis = axis_arg(el, a, "axis", first, usize::from(stack))?;
    let mut nodes = Vec::with_capacity(parts.len());
    for (node, ..) in &parts {
        nodes.push(if stack { insert_axis(el, *node, axis, span)? } else { *node });
    }
    let node = el.add(Op::Concat { axis }, &nodes, span)?;
    Ok(Val::Ids { node, rows, space })
}

/// `if_training(a, b)`: `a` in training, `b` in evaluation (equal shapes), the gradient
/// reaching the one the phase uses (`TrainEval`).
fn if_training(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "a")?;
    let y = tensor(el, a, "b")?;
    let (x, y) = (el.materialise(x, span)?, el.materialise(y, span)?);
    let node = el.add(Op::TrainEval, &[x.node, y.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `step()`, `epoch()`, `stage()`: the training loop's counter as a scalar: in training the
/// run's (`Op::Counter`: the steps trained before this one, the epoch from 0, the stage of
/// the schedule from 0); in evaluation the value of the last training step, which each
/// step stores in a state (`step()`, `epoch()`, `stage()`: saved in checkpoints, so a
/// resumed run and `mdl predict` read it back).
fn counter(el: &mut Elab, c: Counter, span: Span) -> R<Val> {
    let name = match c {
        Counter::Step => "step()",
        Counter::Epoch => "epoch()",
        Counter::Stage => "stage()",
    };
    let state = match el.graph.state_info(name) {
        Some(st) => st.node,
        None => el.graph.state(name, vec![], 0.0),
    };
    let now = el.add(Op::Counter(c), &[], span)?;
    el.graph.outputs.insert(mdl_runtime::ir::graph::state_output(name), now);
    let node = el.add(Op::TrainEval, &[now, state], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

fn stopgrad(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let node = el.add(Op::StopGrad, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
}

/// `path(x, "name")`: `x`, this use of it one of the model's named gradient paths
/// ([`Op::Path`]); `train.grad_cosine: {paths: [a, b], ...}` measures the gradient through
/// each. Names are not scoped: every use marked with one name is one path.
fn path(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (name, ns) = string(el, a, "name")?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return el.error(ns, format!("a path name is letters, digits and `_`, found \"{name}\""));
    }
    let node = el.add(Op::Path { name }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
}

fn one_hot(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (f, s) = feature(el, a, "ids")?;
    match el.feature_nodes(&f) {
        Some((FeatureKind::Domain, ids, _)) => {
            let node = el.add(Op::OneHot { depth: el.count_dim(&f, true) }, &[ids], span)?;
            Ok(Val::Tensor(Tv { node, grouped: false }))
        }
        _ => el.error(s, format!("`one_hot` takes a domain input; `{f}` is not one")),
    }
}

fn mask(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let (f, s) = feature(el, a, "seq")?;
    match el.feature_nodes(&f) {
        Some((FeatureKind::Sequence { .. }, _, Some(m))) => Ok(Val::Tensor(Tv { node: m, grouped: false })),
        _ => el.error(s, format!("`mask` takes a sequence input; `{f}` is not one")),
    }
}

fn count(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let (f, _) = feature(el, a, "input")?;
    let domain = matches!(el.feature_nodes(&f), Some((FeatureKind::Domain, _, _)));
    Ok(Val::Int(el.count_dim(&f, domain)))
}

/// `rows(x)`: the rows of the table for the ids of input `x` (its vocabulary; a sequence
/// declared `of y` shares `y`'s; the domains of a domain input).
fn rows(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let (f, s) = feature(el, a, "input")?;
    match el.feature_nodes(&f) {
        Some((FeatureKind::Domain, _, _)) => Ok(Val::Int(el.count_dim(&f, true))),
        Some((FeatureKind::Sequence { of: Some(o), .. }, _, _)) => Ok(Val::Int(el.rows_dim(&o))),
        Some((FeatureKind::Categorical | FeatureKind::Sequence { of: None, .. }, _, _)) => {
            Ok(Val::Int(el.rows_dim(&f)))
        }
        _ => el.error(s, format!("`rows` takes an input of ids; `{f}` holds values")),
    }
}

fn len(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    match a.get("list") {
        (Val::List(items), _) => Ok(Val::int(items.len() as i64)),
        (other, s) => el.error(s, format!("`len` takes a list, found {}", other.kind())),
    }
}

fn dim(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let axis = axis_arg(el, a, "axis", x, 0)?;
    Ok(Val::Int(el.shape(x.node)[axis].clone()))
}

fn label(el: &mut Elab, a: &Args, _span: Span) -> R<Val> {
    let (t, ts) = a.get("task");
    let Val::Task(task) = t else {
        return el.error(ts, format!("`label` takes a task declared with `task`, found {}", t.kind()));
    };
    match el.graph.input_info(&label_input(&task)) {
        Some(i) => Ok(Val::Tensor(Tv { node: i.node, grouped: false })),
        None => el.error(ts, format!("task `{task}` has no label")),
    }
}

fn broadcast_to(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let like = tensor(el, a, "like")?;
    let (x, like) = (el.materialise(x, span)?, el.materialise(like, span)?);
    let shape = el.shape(like.node).to_vec();
    let node = el.add(Op::Broadcast { shape }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

// ------------------------------------------------------------------ argument readers

fn tensor(el: &mut Elab, a: &Args, name: &str) -> R<Tv> {
    let (v, s) = a.get(name);
    el.expect_tensor(v, s)
}

fn tensor_list(el: &mut Elab, a: &Args, name: &str) -> R<(Vec<Tv>, Span)> {
    let (v, s) = a.get(name);
    let Val::List(items) = v else {
        return el.error(s, format!("expected a list of tensors, found {}", v.kind()));
    };
    let mut out = Vec::with_capacity(items.len());
    for it in items.iter().cloned() {
        out.push(el.expect_tensor(it, s)?);
    }
    Ok((out, s))
}

fn int(el: &mut Elab, a: &Args, name: &str) -> R<Dim> {
    match a.get(name) {
        (Val::Int(d), _) => Ok(d),
        (Val::Poison(reported), _) => Err(reported),
        (other, s) => el.error(s, format!("`{name}` must be an integer, found {}", other.kind())),
    }
}

fn number(el: &mut Elab, a: &Args, name: &str) -> R<(f64, Span)> {
    match a.get(name) {
        (Val::Float(f), s) => Ok((f, s)),
        (Val::Int(d), s) => match d.as_const() {
            Some(c) => Ok((c as f64, s)),
            None => el.error(s, format!("`{name}` must be a constant number, found the size {d}")),
        },
        (other, s) => el.error(s, format!("`{name}` must be a number, found {}", other.kind())),
    }
}

fn string(el: &mut Elab, a: &Args, name: &str) -> R<(String, Span)> {
    match a.get(name) {
        (Val::Str(x), s) => Ok((x, s)),
        (other, s) => el.error(s, format!("`{name}` must be a string, found {}", other.kind())),
    }
}

fn feature(el: &mut Elab, a: &Args, name: &str) -> R<(String, Span)> {
    match a.get(name) {
        (Val::Feature(f), s) => Ok((f, s)),
        (other, s) => el.error(s, format!("`{name}` must be an input declared with `input`, found {}", other.kind())),
    }
}

fn dims_arg(el: &mut Elab, a: &Args, name: &str) -> R<(Vec<Dim>, Span)> {
    let (v, s) = a.get(name);
    let Val::List(items) = v else {
        return el.error(s, format!("`{name}` must be a list of sizes, found {}", v.kind()));
    };
    let mut out = Vec::new();
    for it in items.iter().cloned() {
        match it {
            Val::Int(d) => out.push(d),
            other => return el.error(s, format!("`{name}` must be a list of sizes, found {} in it", other.kind())),
        }
    }
    Ok((out, s))
}

/// Reads an axis argument and normalises a negative one; `extra` widens the range (for
/// ops that insert an axis).
fn axis_arg(el: &mut Elab, a: &Args, name: &str, x: Tv, extra: usize) -> R<usize> {
    let rank = el.shape(x.node).len() + extra;
    let (v, s) = a.get(name);
    let Val::Int(d) = v else {
        return el.error(s, format!("`{name}` must be an axis number, found {}", v.kind()));
    };
    let Some(i) = d.as_const() else {
        return el.error(s, format!("`{name}` must be a constant axis, found {d}"));
    };
    let k = if i < 0 { i + rank as i64 } else { i };
    if k < 0 || k >= rank as i64 {
        return el.error(s, format!("axis {i} is out of range for {} (rank {})", el.shape_str(x.node), rank - extra));
    }
    Ok(k as usize)
}

// ------------------------------------------------------------------ helpers

/// Mixed lists of per-domain and per-sample tensors become per-sample.
fn align_list(el: &mut Elab, xs: Vec<Tv>, span: Span) -> R<Vec<Tv>> {
    let any_grouped = xs.iter().any(|x| x.grouped);
    let all_grouped = xs.iter().all(|x| x.grouped);
    if any_grouped && !all_grouped {
        let mut out = Vec::with_capacity(xs.len());
        for x in xs {
            out.push(el.materialise(x, span)?);
        }
        return Ok(out);
    }
    Ok(xs)
}

fn insert_axis(el: &mut Elab, node: mdl_runtime::NodeId, axis: usize, span: Span) -> R<mdl_runtime::NodeId> {
    let mut shape = el.shape(node).to_vec();
    shape.insert(axis, Dim::lit(1));
    el.add(Op::Reshape { shape }, &[node], span)
}

/// `sum`, `mean`, `max` and `min` (called `name`): over axes of a tensor, or elementwise over a
/// list of tensors.
fn reduce(el: &mut Elab, a: &Args, name: &str, op: ReduceOp, span: Span) -> R<Val> {
    // `sum([a, b, c])`: elementwise over a list.
    if let (Val::List(items), s) = a.get("x") {
        if !matches!(a.get("axis").0, Val::None) {
            return el.error(s, format!("`{name}` of a list adds the tensors elementwise; it takes no axis"));
        }
        if items.is_empty() {
            return el.error(s, format!("`{name}` of an empty list"));
        }
        let mut ts = Vec::with_capacity(items.len());
        for it in items.iter().cloned() {
            ts.push(el.expect_tensor(it, s)?);
        }
        let bop = match op {
            ReduceOp::Max => BinaryOp::Max,
            ReduceOp::Min => BinaryOp::Min,
            ReduceOp::Sum | ReduceOp::Mean => BinaryOp::Add,
        };
        let mut acc = ts[0];
        for t in &ts[1..] {
            acc = el.binary(bop, acc, *t, span)?;
        }
        if op == ReduceOp::Mean {
            let n = el.scalar(ts.len() as f64, span)?;
            acc = el.binary(BinaryOp::Div, acc, Tv { node: n, grouped: false }, span)?;
        }
        return Ok(Val::Tensor(acc));
    }
    let x = tensor(el, a, "x")?;
    let rank = el.shape(x.node).len();
    let mut axes = match a.get("axis") {
        (Val::None, _) => (0..rank).collect::<Vec<_>>(),
        (Val::List(items), _) => {
            let mut v = Vec::new();
            for it in items.iter().cloned() {
                let args = Args { items: vec![("axis".into(), it, a.get("axis").1)] };
                v.push(axis_arg(el, &args, "axis", x, 0)?);
            }
            v
        }
        _ => vec![axis_arg(el, a, "axis", x, 0)?],
    };
    axes.sort_unstable();
    axes.dedup();
    let keep = match a.get("keep") {
        (Val::Bool(b), _) => b,
        (other, s) => return el.error(s, format!("`keep` must be true or false, found {}", other.kind())),
    };
    // Reducing over the leading axis of a per-domain value would mix domains.
    let x = if x.grouped && axes.contains(&0) { el.materialise(x, span)? } else { x };
    let node = el.add(Op::Reduce { op, axes: axes.clone(), keep_dims: keep }, &[x.node], span)?;
    Ok(Val::Tensor(Tv { node, grouped: x.grouped && !axes.contains(&0) }))
}

/// `embedding(ids, dim, std)`: a table with a row per id. Inside `per d { }`, one table
/// per domain, stacked into one `[D * rows, dim]` parameter (row-sparse like any table),
/// whose lookups move each sample's ids into its domain's block (GroupIds, then Gather).
fn embedding(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let per = el.per_domains();
    let stacked = |rows: &Dim| match &per {
        Some((_, groups)) => groups * rows,
        None => rows.clone(),
    };
    let per_domain = |rows: Dim| per.as_ref().map(|(idx, _)| (*idx, rows));
    // A table for ids made in the spec: one row per id below their bound.
    let (made, input_ids) = match a.get("ids") {
        (Val::Ids { rows, space: None, .. }, _) => (Some(rows), None),
        (Val::Ids { space: Some(space), .. }, s) => (None, Some((space, s))),
        _ => (None, None),
    };
    let (dim, std) = (int(el, a, "dim")?, number(el, a, "std")?.0);
    if dim.as_const().is_some_and(|c| c <= 0) {
        return el.error(a.get("dim").1, format!("an embedding dimension must be positive, found {dim}"));
    }
    if let Some(rows) = made {
        let name = el.param_name("table");
        let node = el.new_param(&name, vec![stacked(&rows), dim], Init::Normal(std), true, span);
        return Ok(Val::Table { node, per_domain: per_domain(rows.clone()), ids_of: IdSpace::Made { rows } });
    }
    // Ids of an input's space (sampled, or rearranged): a table for that input's ids.
    let (f, fs) = match input_ids {
        Some(found) => found,
        None => feature(el, a, "ids")?,
    };
    let space = match el.feature_nodes(&f) {
        Some((FeatureKind::Categorical | FeatureKind::Domain, _, _)) => f.clone(),
        Some((FeatureKind::Sequence { of: Some(o), .. }, _, _)) => o,
        Some((FeatureKind::Sequence { of: None, .. }, _, _)) => f.clone(),
        _ => {
            return el.error(
                fs,
                format!("`{f}` holds values, not ids; an embedding needs a categorical, sequence or domain input"),
            )
        }
    };
    let rows = match el.feature_nodes(&space) {
        Some((FeatureKind::Domain, _, _)) => el.count_dim(&space, true),
        _ => el.rows_dim(&space),
    };
    let name = el.param_name("table");
    let node = el.new_param(&name, vec![stacked(&rows), dim], Init::Normal(std), true, span);
    Ok(Val::Table { node, ids_of: IdSpace::Input(space), per_domain: per_domain(rows) })
}

/// The task a loss takes (`bce(click)`), with its logit and its kind, which must be one
/// `loss` accepts (`wants` names them for the message).
fn loss_task(
    el: &mut Elab,
    a: &Args,
    loss: &str,
    accepts: fn(&TaskKind) -> bool,
    wants: &str,
) -> R<(String, NodeId, TaskKind)> {
    let (t, ts) = a.get("task");
    let Val::Task(task) = t else {
        return el.error(ts, format!("`{loss}` takes a task declared with `task`, found {}", t.kind()));
    };
    let Some(z) = el.task_logit(&task) else {
        return el.error(ts, format!("task `{task}` has no logit"));
    };
    let kind = el.task_kind_of(&task).unwrap_or(TaskKind::Binary);
    if !accepts(&kind) {
        let d = Diagnostic::error(ts, format!("`{loss}` takes {wants} task; `{task}` is {}", kind.describe()))
            .hint(format!("declare its kind with `label {task} : ...`, or use the loss of its kind (bce: binary, mse: regression, softmax_ce: classes or candidates)"));
        return Err(el.report(d));
    }
    Ok((task, z, kind))
}

/// The label input of a task that reads one.
fn label_node(el: &mut Elab, task: &str, ts: Span) -> R<NodeId> {
    match el.graph.input_info(&label_input(task)).map(|i| i.node) {
        Some(y) => Ok(y),
        None => el.error(ts, format!("task `{task}` has no label")),
    }
}

fn bce(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (task, z, _) = loss_task(el, a, "bce", |k| *k == TaskKind::Binary, "a binary")?;
    let y = label_node(el, &task, a.get("task").1)?;
    // Per-sample loss, fused with the sigmoid for stability: softplus(z) - y*z.
    let sp = el.add(Op::Unary(UnaryOp::Softplus), &[z], span)?;
    let yz = el.add(Op::Binary(BinaryOp::Mul), &[y, z], span)?;
    let l = el.add(Op::Binary(BinaryOp::Sub), &[sp, yz], span)?;
    per_sample_mean(el, a, l, span)
}

/// `mse(task, by?)`: the mean squared error of a regression task's output against its
/// label, or against `log(1 + label)` when the task is declared with `log = true`.
fn mse(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (task, z, kind) = loss_task(el, a, "mse", |k| matches!(k, TaskKind::Regression { .. }), "a regression")?;
    let mut y = label_node(el, &task, a.get("task").1)?;
    if kind == (TaskKind::Regression { log: true }) {
        let one = el.scalar(1.0, span)?;
        let one = el.add(Op::Broadcast { shape: vec![Dim::batch()] }, &[one], span)?;
        let shifted = el.add(Op::Binary(BinaryOp::Add), &[y, one], span)?;
        y = el.add(Op::Unary(UnaryOp::Log), &[shifted], span)?;
    }
    let d = el.add(Op::Binary(BinaryOp::Sub), &[z, y], span)?;
    let l = el.add(Op::Binary(BinaryOp::Mul), &[d, d], span)?;
    per_sample_mean(el, a, l, span)
}

/// `softmax_ce(task, by?)`: the mean softmax cross-entropy of a classes task's logits
/// `[B, n]` against its class label, or of a candidates task's scores `[B, N]` against the
/// first candidate: `logsumexp(z) - z[label]`, the log-sum-exp shifted by the row's
/// maximum (held constant: the shift cancels in the value and the gradient).
fn softmax_ce(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let accepts = |k: &TaskKind| matches!(k, TaskKind::Classes { .. } | TaskKind::Candidates { .. });
    let (task, z, kind) = loss_task(el, a, "softmax_ce", accepts, "a classes or candidates")?;
    let width = el.shape(z)[1].clone();
    // The one-hot of the target: `arange(n) == label` (classes), or position 0 (candidates).
    let target = match kind {
        TaskKind::Candidates { .. } => {
            let zero = el.scalar(0.0, span)?;
            el.add(Op::Broadcast { shape: vec![Dim::batch(), Dim::lit(1)] }, &[zero], span)?
        }
        _ => {
            let y = label_node(el, &task, a.get("task").1)?;
            el.add(Op::Reshape { shape: vec![Dim::batch(), Dim::lit(1)] }, &[y], span)?
        }
    };
    let positions = el.add(Op::Arange { n: width }, &[], span)?;
    let hot =
        el.binary(BinaryOp::Eq, Tv { node: target, grouped: false }, Tv { node: positions, grouped: false }, span)?;
    let picked = el.binary(BinaryOp::Mul, hot, Tv { node: z, grouped: false }, span)?;
    let picked = el.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, &[picked.node], span)?;
    let max = el.add(Op::Reduce { op: ReduceOp::Max, axes: vec![1], keep_dims: true }, &[z], span)?;
    let max = el.add(Op::StopGrad, &[max], span)?;
    let shifted = el.binary(BinaryOp::Sub, Tv { node: z, grouped: false }, Tv { node: max, grouped: false }, span)?;
    let e = el.add(Op::Unary(UnaryOp::Exp), &[shifted.node], span)?;
    let total = el.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, &[e], span)?;
    let log_total = el.add(Op::Unary(UnaryOp::Log), &[total], span)?;
    let max = el.add(Op::Reshape { shape: vec![Dim::batch()] }, &[max], span)?;
    let lse = el.add(Op::Binary(BinaryOp::Add), &[log_total, max], span)?;
    let l = el.add(Op::Binary(BinaryOp::Sub), &[lse, picked], span)?;
    per_sample_mean(el, a, l, span)
}

/// A per-sample loss `[B]` averaged over the batch, or with `by = d` averaged within each
/// domain and summed over the domains.
fn per_sample_mean(el: &mut Elab, a: &Args, l: NodeId, span: Span) -> R<Val> {
    let out = match a.get("by") {
        (Val::None, _) => el.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: false }, &[l], span)?,
        (Val::Feature(f), fs) => {
            let Some((FeatureKind::Domain, dom, _)) = el.feature_nodes(&f) else {
                return el.error(fs, format!("`by` must be a domain input; `{f}` is not one"));
            };
            // Σ_d mean over the samples of domain d = Σ_i l_i / n_{d(i)}.
            let one = el.scalar(1.0, span)?;
            let ones = el.add(Op::Broadcast { shape: vec![Dim::batch()] }, &[one], span)?;
            let counts = el.add(Op::SegmentSum { segments: el.count_dim(&f, true) }, &[ones, dom], span)?;
            let per_row = el.add(Op::Gather, &[counts, dom], span)?;
            let w = el.add(Op::Binary(BinaryOp::Div), &[l, per_row], span)?;
            el.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: false }, &[w], span)?
        }
        (other, s) => return el.error(s, format!("`by` must be a domain input, found {}", other.kind())),
    };
    Ok(Val::Tensor(Tv { node: out, grouped: false }))
}

/// `group_mean(x, by = d)`: for each sample, the mean of `x` over the samples of the batch
/// that share its domain (`[B, ...]` -> `[B, ...]`) — per-domain batch statistics.
fn group_mean(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let x = el.materialise(x, span)?;
    let (f, fs) = feature(el, a, "by")?;
    let Some((FeatureKind::Domain, dom, _)) = el.feature_nodes(&f) else {
        return el.error(fs, format!("`by` must be a domain input; `{f}` is not one"));
    };
    if el.shape(x.node).first().is_none_or(|d| *d != Dim::batch()) {
        return el.error(
            a.get("x").1,
            format!("`group_mean` needs a per-sample tensor [B, ...], found {}", el.shape_str(x.node)),
        );
    }
    let groups = el.count_dim(&f, true);
    let sums = el.add(Op::SegmentSum { segments: groups.clone() }, &[x.node, dom], span)?;
    let one = el.scalar(1.0, span)?;
    let ones = el.add(Op::Broadcast { shape: vec![Dim::batch()] }, &[one], span)?;
    let counts = el.add(Op::SegmentSum { segments: groups }, &[ones, dom], span)?;
    let own_sum = el.add(Op::Gather, &[sums, dom], span)?;
    let own_count = el.add(Op::Gather, &[counts, dom], span)?;
    // Counts [B] against sums [B, ...]: give the counts trailing axes of size 1.
    let rank = el.shape(own_sum).len();
    let mut cshape = vec![Dim::batch()];
    cshape.extend((1..rank).map(|_| Dim::lit(1)));
    let own_count = el.add(Op::Reshape { shape: cshape }, &[own_count], span)?;
    let node = el.add(Op::Binary(BinaryOp::Div), &[own_sum, own_count], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `running(stat, momentum = 0.1, initial = 0.0)`: a batch statistic in training, its
/// running average in evaluation. The average is model state (`Graph::state`, every
/// element `initial` at the start), advanced by each training step to
/// `r + momentum · (stat − r)`. Outside `per`, `stat` is a statistic of the whole batch
/// (no batch axis) and the state has its shape. Inside `per d { }`, `stat` is per sample
/// (`[B, ...]`, equal for the samples of a domain, as `group_mean` gives) and the state
/// holds one row per domain: a step advances the rows of the domains in its batch (with
/// their samples' mean of `stat`), and evaluation reads each sample's domain's row.
fn running(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let stat_span = a.get("stat").1;
    let stat = tensor(el, a, "stat")?;
    if stat.grouped {
        return el.error(stat_span, "`running` needs a statistic of the batch's samples, found a per-domain parameter");
    }
    let (momentum, ms) = number(el, a, "momentum")?;
    if !(momentum > 0.0 && momentum <= 1.0) {
        return el.error(ms, format!("`momentum` must be in (0, 1], found {momentum}"));
    }
    let (initial, is) = number(el, a, "initial")?;
    if !initial.is_finite() {
        return el.error(is, format!("`initial` must be finite, found {initial}"));
    }
    let shape = el.shape(stat.node).to_vec();
    let per = el.per.clone();
    let state_shape = match &per {
        None => {
            if shape.iter().any(|d| d.has_batch()) {
                return el.error(
                    stat_span,
                    format!(
                        "`running` keeps a statistic of the whole batch: `stat` cannot have the batch size in its shape, found {} (reduce it over the batch, e.g. mean(x, axis = 0, keep = true), or use it inside `per` with group_mean)",
                        shape_to_string(&shape)
                    ),
                );
            }
            shape.clone()
        }
        Some(per) => {
            if shape.first() != Some(&Dim::batch()) || shape[1..].iter().any(|d| d.has_batch()) {
                return el.error(
                    stat_span,
                    format!(
                        "inside `per`, `running` keeps one statistic per domain: `stat` must be per sample [B, ...] (as group_mean gives), found {}",
                        shape_to_string(&shape)
                    ),
                );
            }
            let mut s = vec![per.groups.clone()];
            s.extend(shape[1..].iter().cloned());
            s
        }
    };
    let name = el.param_name("running");
    let state = el.graph.state(&name, state_shape, initial);
    let m = el.scalar(momentum, span)?;
    let (in_eval, next) = match &per {
        None => {
            let gap = el.add(Op::Binary(BinaryOp::Sub), &[stat.node, state], span)?;
            let step = el.add(Op::Binary(BinaryOp::Mul), &[m, gap], span)?;
            (state, el.add(Op::Binary(BinaryOp::Add), &[state, step], span)?)
        }
        Some(per) => {
            // Each domain's mean of `stat` over its samples in the batch (its statistic);
            // a domain without samples keeps its row (present = 0).
            let in_eval = el.add(Op::Gather, &[state, per.idx], span)?;
            let sums = el.add(Op::SegmentSum { segments: per.groups.clone() }, &[stat.node, per.idx], span)?;
            let one = el.scalar(1.0, span)?;
            let ones = el.add(Op::Broadcast { shape: vec![Dim::batch()] }, &[one], span)?;
            let counts = el.add(Op::SegmentSum { segments: per.groups.clone() }, &[ones, per.idx], span)?;
            let mut cshape = vec![per.groups.clone()];
            cshape.extend((1..shape.len()).map(|_| Dim::lit(1)));
            let counts = el.add(Op::Reshape { shape: cshape }, &[counts], span)?;
            let present = el.add(Op::Binary(BinaryOp::Min), &[counts, one], span)?;
            let divisor = el.add(Op::Binary(BinaryOp::Max), &[counts, one], span)?;
            let of_domain = el.add(Op::Binary(BinaryOp::Div), &[sums, divisor], span)?;
            let gap = el.add(Op::Binary(BinaryOp::Sub), &[of_domain, state], span)?;
            let rate = el.add(Op::Binary(BinaryOp::Mul), &[m, present], span)?;
            let step = el.add(Op::Binary(BinaryOp::Mul), &[rate, gap], span)?;
            (in_eval, el.add(Op::Binary(BinaryOp::Add), &[state, step], span)?)
        }
    };
    el.graph.outputs.insert(mdl_runtime::ir::graph::state_output(&name), next);
    let node = el.add(Op::TrainEval, &[stat.node, in_eval], span)?;
    Ok(Val::Tensor(Tv { node, grouped: false }))
}

/// `probe(x, "name")`: `x` itself, its value also kept as the graph output
/// `probe/<scope>/<name>` (see [`crate::lower::probe_output`]) for `mdl analyze` to collect
/// on a split. Training and exported graphs drop the output, so a probe changes no number
/// of a run; `x` must be per sample (`[B, ...]`).
fn probe(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let x = tensor(el, a, "x")?;
    let (name, ns) = string(el, a, "name")?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return el.error(ns, format!("a probe name is letters, digits and `_`, found \"{name}\""));
    }
    let value = el.materialise(x, span)?;
    if el.shape(value.node).first() != Some(&Dim::batch()) {
        return el.error(
            a.get("x").1,
            format!("`probe` needs a per-sample tensor [B, ...], found {}", el.shape_str(value.node)),
        );
    }
    let scope = el.scope_path();
    let base = if scope.is_empty() { name } else { format!("{scope}/{name}") };
    let mut full = base.clone();
    let mut k = 1;
    while el.graph.outputs.contains_key(&super::probe_output(&full)) {
        full = format!("{base}{k}");
        k += 1;
    }
    el.graph.outputs.insert(super::probe_output(&full), value.node);
    Ok(Val::Tensor(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_builtin_is_listed_once_with_distinct_parameters_required_first() {
        for (i, b) in BUILTINS.iter().enumerate() {
            assert!(BUILTINS[..i].iter().all(|o| o.name != b.name), "`{}` is listed twice", b.name);
            for (j, p) in b.params.iter().enumerate() {
                assert!(
                    b.params[..j].iter().all(|q| q.name() != p.name()),
                    "`{}` has two parameters `{}`",
                    b.name,
                    p.name()
                );
            }
            // Positional arguments fill parameters in order, so a required one after a
            // defaulted one could only be given by name.
            let first_default = b.params.iter().position(|p| p.default().is_some()).unwrap_or(b.params.len());
            assert!(
                b.params[first_default..].iter().all(|p| p.default().is_some()),
                "`{}` has a required parameter after one with a default",
                b.name
            );
        }
    }

    #[test]
    fn defaults_are_the_values_calls_get() {
        let sum = find("sum").unwrap();
        assert_eq!(
            sum.param_list(),
            vec![
                ("x".to_string(), None),
                ("axis".to_string(), Some(Val::None)),
                ("keep".to_string(), Some(Val::Bool(false)))
            ]
        );
        let act = find("activation").unwrap().param_list();
        assert_eq!(act[1], ("act".to_string(), Some(Val::Str("relu".into()))));
        let emb = find("embedding").unwrap().param_list();
        assert_eq!(emb[2], ("std".to_string(), Some(Val::Float(0.0001))));
        assert_eq!(find("softmax").unwrap().param_list()[1].1, Some(Val::int(-1)));
        assert!(find("linear").is_none(), "std.mdl blocks are not built-ins");
    }
}
