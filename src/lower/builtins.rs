//! The built-in functions of the language: the ones that map directly onto primitive
//! IR ops or need the compiler's knowledge of inputs and tasks. Everything that can be
//! written in `.mdl` itself (linear, mlp, fm, pooling, ...) lives in `specs/std.mdl`.
//!
//! Axis arguments count the leading (batch) axis, as in numpy: for `x: [B, F, d]`,
//! `sum(x, axis = 1)` sums over the fields. Negative axes count from the end.
//! `reshape` takes the shape of one sample: the leading axis is kept.

use super::value::{Tv, Val};
use super::{count_sym, label_input, Elab, FeatureKind, R};
use crate::diag::{suggest, Diagnostic, Span};
use mdl_runtime::ir::dim::{numel, shape_to_string};
use mdl_runtime::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use mdl_runtime::{Dim, Init};

/// `(name, parameters)`; a parameter `"axis=-1"` has a default, `"axis?"` is optional.
const TABLE: &[(&str, &[&str])] = &[
    ("relu", &["x"]),
    ("sigmoid", &["x"]),
    ("tanh", &["x"]),
    ("exp", &["x"]),
    ("log", &["x"]),
    ("sqrt", &["x"]),
    ("abs", &["x"]),
    ("softplus", &["x"]),
    ("activation", &["x", "act=relu"]),
    ("maximum", &["a", "b"]),
    ("minimum", &["a", "b"]),
    ("sum", &["x", "axis?", "keep=false"]),
    ("mean", &["x", "axis?", "keep=false"]),
    ("max", &["x", "axis?", "keep=false"]),
    ("softmax", &["x", "axis=-1"]),
    ("concat", &["xs", "axis=-1"]),
    ("stack", &["xs", "axis=1"]),
    ("flatten", &["x"]),
    ("reshape", &["x", "shape"]),
    ("unsqueeze", &["x", "axis"]),
    ("squeeze", &["x", "axis"]),
    ("transpose", &["x", "a=-2", "b=-1"]),
    ("slice", &["x", "axis", "start", "len"]),
    ("dropout", &["x", "p=0"]),
    ("stopgrad", &["x"]),
    ("one_hot", &["ids"]),
    ("embedding", &["ids", "dim", "std=0.0001"]),
    ("mask", &["seq"]),
    ("count", &["input"]),
    ("len", &["list"]),
    ("dim", &["x", "axis"]),
    ("bce", &["task", "by?"]),
    ("label", &["task"]),
    ("broadcast_to", &["x", "like"]),
    ("group_mean", &["x", "by"]),
];

pub fn names() -> Vec<&'static str> {
    TABLE.iter().map(|(n, _)| *n).collect()
}

pub fn is_builtin(name: &str) -> bool {
    TABLE.iter().any(|(n, _)| *n == name)
}

/// The parameter list of a built-in, with default values.
pub fn params(name: &str) -> Vec<(String, Option<Val>)> {
    let Some((_, ps)) = TABLE.iter().find(|(n, _)| *n == name) else { return Vec::new() };
    ps.iter()
        .map(|p| {
            if let Some(n) = p.strip_suffix('?') {
                (n.to_string(), Some(Val::None))
            } else if let Some((n, d)) = p.split_once('=') {
                let v = if let Ok(i) = d.parse::<i64>() {
                    Val::int(i)
                } else if let Ok(f) = d.parse::<f64>() {
                    Val::Float(f)
                } else if d == "true" || d == "false" {
                    Val::Bool(d == "true")
                } else {
                    Val::Str(d.to_string())
                };
                (n.to_string(), Some(v))
            } else {
                (p.to_string(), None)
            }
        })
        .collect()
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

pub(crate) fn call(el: &mut Elab, name: &str, bound: Vec<(String, Val, Span)>, span: Span) -> R<Val> {
    let a = Args { items: bound };
    let unary = |op: UnaryOp, el: &mut Elab| -> R<Val> {
        let x = tensor(el, &a, "x")?;
        Ok(Val::Tensor(el.unary(op, x, span)?))
    };
    match name {
        "relu" => unary(UnaryOp::Relu, el),
        "sigmoid" => unary(UnaryOp::Sigmoid, el),
        "tanh" => unary(UnaryOp::Tanh, el),
        "exp" => unary(UnaryOp::Exp, el),
        "log" => unary(UnaryOp::Log, el),
        "sqrt" => unary(UnaryOp::Sqrt, el),
        "abs" => unary(UnaryOp::Abs, el),
        "softplus" => unary(UnaryOp::Softplus, el),
        "activation" => {
            let x = tensor(el, &a, "x")?;
            let (act, s) = string(el, &a, "act")?;
            let op = match act.as_str() {
                "relu" => UnaryOp::Relu,
                "sigmoid" => UnaryOp::Sigmoid,
                "tanh" => UnaryOp::Tanh,
                "softplus" => UnaryOp::Softplus,
                "none" | "linear" | "identity" => return Ok(Val::Tensor(x)),
                other => {
                    let known = ["relu", "sigmoid", "tanh", "softplus", "none"];
                    let mut d = Diagnostic::error(s, format!("unknown activation \"{other}\""))
                        .label(format!("expected one of: {}", known.join(", ")));
                    if let Some(k) = suggest(other, known) {
                        d = d.hint(format!("did you mean \"{k}\"?"));
                    }
                    el.report(d);
                    return Err(());
                }
            };
            Ok(Val::Tensor(el.unary(op, x, span)?))
        }
        "maximum" | "minimum" => {
            let x = tensor(el, &a, "a")?;
            let y = tensor(el, &a, "b")?;
            let op = if name == "maximum" { BinaryOp::Max } else { BinaryOp::Min };
            Ok(Val::Tensor(el.binary(op, x, y, span)?))
        }
        "sum" | "mean" | "max" => reduce(el, &a, name, span),
        "softmax" => {
            let x = tensor(el, &a, "x")?;
            let axis = axis_arg(el, &a, "axis", x, 0)?;
            let node = el.add(Op::Softmax { axis }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "concat" | "stack" => {
            let (xs, s) = tensor_list(el, &a, "xs")?;
            if xs.is_empty() {
                return el.error(s, format!("`{name}` needs at least one tensor"));
            }
            let xs = align_list(el, xs, span)?;
            let grouped = xs[0].grouped;
            let extra = usize::from(name == "stack");
            let axis = axis_arg(el, &a, "axis", xs[0], extra)?;
            let mut nodes = Vec::with_capacity(xs.len());
            for x in &xs {
                nodes.push(if name == "stack" { insert_axis(el, x.node, axis, span)? } else { x.node });
            }
            let node = el.add(Op::Concat { axis }, &nodes, span)?;
            Ok(Val::Tensor(Tv { node, grouped }))
        }
        "flatten" => {
            let x = tensor(el, &a, "x")?;
            let shape = el.shape(x.node).to_vec();
            let new = if el.has_lead(x) && !shape.is_empty() {
                vec![shape[0].clone(), numel(&shape[1..])]
            } else {
                vec![numel(&shape)]
            };
            let node = el.add(Op::Reshape { shape: new }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "reshape" => {
            let x = tensor(el, &a, "x")?;
            let (dims, s) = dims_arg(el, &a, "shape")?;
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
        "unsqueeze" => {
            let x = tensor(el, &a, "x")?;
            let axis = axis_arg(el, &a, "axis", x, 1)?;
            let node = insert_axis(el, x.node, axis, span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "squeeze" => {
            let x = tensor(el, &a, "x")?;
            let axis = axis_arg(el, &a, "axis", x, 0)?;
            let mut shape = el.shape(x.node).to_vec();
            if !shape[axis].is_one() {
                let s = a.get("axis").1;
                return el.error(s, format!("axis {axis} of {} has size {}, not 1", el.shape_str(x.node), shape[axis]));
            }
            shape.remove(axis);
            let node = el.add(Op::Reshape { shape }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "transpose" => {
            let x = tensor(el, &a, "x")?;
            let i = axis_arg(el, &a, "a", x, 0)?;
            let j = axis_arg(el, &a, "b", x, 0)?;
            if x.grouped && (i == 0 || j == 0) {
                return el.error(span, "`transpose` cannot move the domain axis of a per-domain value");
            }
            let mut perm: Vec<usize> = (0..el.shape(x.node).len()).collect();
            perm.swap(i, j);
            let node = el.add(Op::Permute { perm }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "slice" => {
            let x = tensor(el, &a, "x")?;
            let axis = axis_arg(el, &a, "axis", x, 0)?;
            let start = int(el, &a, "start")?;
            let len = int(el, &a, "len")?;
            let node = el.add(Op::Slice { axis, start, len }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "dropout" => {
            let x = tensor(el, &a, "x")?;
            let (p, s) = number(el, &a, "p")?;
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
        "stopgrad" => {
            let x = tensor(el, &a, "x")?;
            let node = el.add(Op::StopGrad, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: x.grouped }))
        }
        "one_hot" => {
            let (f, s) = feature(el, &a, "ids")?;
            match el.feature_nodes(&f) {
                Some((FeatureKind::Domain, ids, _)) => {
                    let node = el.add(Op::OneHot { depth: Dim::sym(&count_sym(&f)) }, &[ids], span)?;
                    Ok(Val::Tensor(Tv { node, grouped: false }))
                }
                _ => el.error(s, format!("`one_hot` takes a domain input; `{f}` is not one")),
            }
        }
        "embedding" => embedding(el, &a, span),
        "mask" => {
            let (f, s) = feature(el, &a, "seq")?;
            match el.feature_nodes(&f) {
                Some((FeatureKind::Sequence { .. }, _, Some(m))) => Ok(Val::Tensor(Tv { node: m, grouped: false })),
                _ => el.error(s, format!("`mask` takes a sequence input; `{f}` is not one")),
            }
        }
        "count" => {
            let (f, _) = feature(el, &a, "input")?;
            Ok(Val::Int(Dim::sym(&count_sym(&f))))
        }
        "len" => match a.get("list") {
            (Val::List(items), _) => Ok(Val::int(items.len() as i64)),
            (other, s) => el.error(s, format!("`len` takes a list, found {}", other.kind())),
        },
        "dim" => {
            let x = tensor(el, &a, "x")?;
            let axis = axis_arg(el, &a, "axis", x, 0)?;
            Ok(Val::Int(el.shape(x.node)[axis].clone()))
        }
        "bce" => bce(el, &a, span),
        "label" => {
            let (t, ts) = a.get("task");
            let Val::Task(task) = t else {
                return el.error(ts, format!("`label` takes a task declared with `task`, found {}", t.kind()));
            };
            match el.graph.input_info(&label_input(&task)) {
                Some(i) => Ok(Val::Tensor(Tv { node: i.node, grouped: false })),
                None => el.error(ts, format!("task `{task}` has no label")),
            }
        }
        "broadcast_to" => {
            let x = tensor(el, &a, "x")?;
            let like = tensor(el, &a, "like")?;
            let (x, like) = (el.materialise(x, span)?, el.materialise(like, span)?);
            let shape = el.shape(like.node).to_vec();
            let node = el.add(Op::Broadcast { shape }, &[x.node], span)?;
            Ok(Val::Tensor(Tv { node, grouped: false }))
        }
        "group_mean" => group_mean(el, &a, span),
        other => el.error(span, format!("internal error: built-in `{other}` has no rule")),
    }
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
    for it in items {
        out.push(el.expect_tensor(it, s)?);
    }
    Ok((out, s))
}

fn int(el: &mut Elab, a: &Args, name: &str) -> R<Dim> {
    match a.get(name) {
        (Val::Int(d), _) => Ok(d),
        (Val::Poison, _) => Err(()),
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
    for it in items {
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

fn reduce(el: &mut Elab, a: &Args, name: &str, span: Span) -> R<Val> {
    let op = match name {
        "sum" => ReduceOp::Sum,
        "mean" => ReduceOp::Mean,
        _ => ReduceOp::Max,
    };
    // `sum([a, b, c])`: elementwise over a list.
    if let (Val::List(items), s) = a.get("x") {
        if !matches!(a.get("axis").0, Val::None) {
            return el.error(s, format!("`{name}` of a list adds the tensors elementwise; it takes no axis"));
        }
        if items.is_empty() {
            return el.error(s, format!("`{name}` of an empty list"));
        }
        let mut ts = Vec::with_capacity(items.len());
        for it in items {
            ts.push(el.expect_tensor(it, s)?);
        }
        let bop = match op {
            ReduceOp::Max => BinaryOp::Max,
            _ => BinaryOp::Add,
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
            for it in items {
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

fn embedding(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (f, fs) = feature(el, a, "ids")?;
    if el.per_ctx().is_some() {
        return el.error(span, "embedding tables cannot be created per domain");
    }
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
    let dim = int(el, a, "dim")?;
    if dim.as_const().is_some_and(|c| c <= 0) {
        return el.error(a.get("dim").1, format!("an embedding dimension must be positive, found {dim}"));
    }
    let (std, _) = number(el, a, "std")?;
    let rows = match el.feature_nodes(&space) {
        Some((FeatureKind::Domain, _, _)) => Dim::sym(&count_sym(&space)),
        _ => Dim::sym(&super::rows_sym(&space)),
    };
    let name = el.param_name("table");
    let group = el.group_name();
    let node = el.graph.param(&name, vec![rows, dim], Init::Normal(std), group, true);
    Ok(Val::Table { node, ids_of: space })
}

fn bce(el: &mut Elab, a: &Args, span: Span) -> R<Val> {
    let (t, ts) = a.get("task");
    let Val::Task(task) = t else {
        return el.error(ts, format!("`bce` takes a task declared with `task`, found {}", t.kind()));
    };
    let Some(z) = el.task_logit(&task) else {
        return el.error(ts, format!("task `{task}` has no logit"));
    };
    let Some(y) = el.graph.input_info(&label_input(&task)).map(|i| i.node) else {
        return el.error(ts, format!("task `{task}` has no label"));
    };
    // Per-sample loss, fused with the sigmoid for stability: softplus(z) - y*z.
    let sp = el.add(Op::Unary(UnaryOp::Softplus), &[z], span)?;
    let yz = el.add(Op::Binary(BinaryOp::Mul), &[y, z], span)?;
    let l = el.add(Op::Binary(BinaryOp::Sub), &[sp, yz], span)?;
    let out = match a.get("by") {
        (Val::None, _) => el.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: false }, &[l], span)?,
        (Val::Feature(f), fs) => {
            let Some((FeatureKind::Domain, dom, _)) = el.feature_nodes(&f) else {
                return el.error(fs, format!("`by` must be a domain input; `{f}` is not one"));
            };
            // Σ_d mean over the samples of domain d = Σ_i l_i / n_{d(i)}.
            let one = el.scalar(1.0, span)?;
            let ones = el.add(Op::Broadcast { shape: vec![Dim::batch()] }, &[one], span)?;
            let counts = el.add(Op::SegmentSum { segments: Dim::sym(&count_sym(&f)) }, &[ones, dom], span)?;
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
    if !el.shape(x.node).first().is_some_and(|d| *d == Dim::batch()) {
        return el.error(
            a.get("x").1,
            format!("`group_mean` needs a per-sample tensor [B, ...], found {}", el.shape_str(x.node)),
        );
    }
    let groups = Dim::sym(&count_sym(&f));
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
