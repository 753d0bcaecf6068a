//! Integration tests of the surface syntax: the parser accepts the language's example,
//! builds the expected tree shapes with tight spans, reports syntax errors at exact
//! positions in plain words, and never panics or overflows the stack, whatever the input.

use mdl::diag::{render, Diagnostic, SourceMap, Span};
use mdl::syntax::ast::*;
use mdl::syntax::{parse, MAX_NESTING};
use proptest::prelude::*;

const EXAMPLE: &str = r#"# comments run to end of line
use "other.mdl"                       # optional imports

block expert(x, widths, act = "relu") = mlp(x, widths, act = act)     # short form: body is `return expr`

block linear(x, n, bias = true) {
  param W : [dim(x, -1), n] ~ glorot()
  let y = x @ W
  if bias {
    param b : [n] ~ zeros()
    y = y + b
  }
  return y
}

block mlp(x, widths, act = "relu", dropout = 0.0) {
  let h = x
  for w in widths {
    h = linear(h, w) |> activation(act) |> drop(dropout)
  }
  return h
}

model crocodile(tables = 4, dim = 16, widths = [256, 128], cov_weight = 1e-4) {
  input fields : categorical
  input hist   : sequence(50) of fields
  input dense  : numeric
  input domain : domain
  label click, long_view

  let E = [embedding(fields, dim) for k in 0..tables]
  let X = [expert(flatten(E[k][fields]), widths) for k in 0..tables]
  let h = per domain {
    let g = softmax(reshape(linear(flatten(stack(X, axis = 1)), tables * dim), [tables, dim]), axis = 1)
    sum(g * stack(X, axis = 1), axis = 1)
  }
  group towers {
    task click = per domain { mlp(h, [64]) |> linear(1) }
  }
  task long_view = -h[0] + 2 * (h @ W) / 3 ++ [1, 2]
  loss bce(click) + cov_weight * covariance(X)
  loss 0.5 * bce(long_view)
  let ok = not (a == b) and c <= d or e != f
  let z = { let t = x + 1
            t * 2 }
}
"#;

// ------------------------------------------------------------------ helpers

fn parse_text(text: &str) -> (SourceMap, Result<Module, Vec<Diagnostic>>) {
    let mut map = SourceMap::new();
    let file = map.add("file.mdl", text.to_string());
    let result = parse(&map, file);
    (map, result)
}

fn parse_ok(text: &str) -> Module {
    let (map, result) = parse_text(text);
    match result {
        Ok(module) => module,
        Err(diags) => {
            let shown: Vec<String> = diags.iter().map(|d| render(&map, d)).collect();
            panic!("expected {text:?} to parse, got:\n{}", shown.join("\n"))
        }
    }
}

/// The rendered diagnostics for a text that must not parse.
fn parse_err(text: &str) -> String {
    let (map, result) = parse_text(text);
    match result {
        Ok(module) => panic!("expected {text:?} to fail, got {module:#?}"),
        Err(diags) => {
            assert!(!diags.is_empty());
            diags.iter().map(|d| render(&map, d)).collect::<Vec<_>>().join("\n")
        }
    }
}

fn model_body(module: &Module) -> &[Stmt] {
    module
        .items
        .iter()
        .find_map(|item| match item {
            Item::Model(m) => Some(m.body.as_slice()),
            _ => None,
        })
        .expect("a model")
}

fn block<'m>(module: &'m Module, name: &str) -> &'m BlockDef {
    module
        .items
        .iter()
        .find_map(|item| match item {
            Item::Block(b) if b.name.name == name => Some(b),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no block {name}"))
}

/// The value of `let v = <src>` parsed inside a model.
fn expr_of(src: &str) -> Expr {
    let module = parse_ok(&format!("model m {{ let v = {src} }}"));
    match &model_body(&module)[0] {
        Stmt::Let { value, .. } => value.clone(),
        other => panic!("expected a let, got {other:?}"),
    }
}

fn let_value<'a>(body: &'a [Stmt], name: &str) -> &'a Expr {
    body.iter()
        .find_map(|s| match s {
            Stmt::Let { name: n, value, .. } if n.name == name => Some(value),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no let {name}"))
}

fn var(e: &Expr) -> &str {
    match &e.kind {
        ExprKind::Var(name) => name,
        other => panic!("expected a variable, got {other:?}"),
    }
}

fn binary(e: &Expr) -> (BinOp, &Expr, &Expr) {
    match &e.kind {
        ExprKind::Binary { op, lhs, rhs } => (*op, lhs, rhs),
        other => panic!("expected a binary expression, got {other:?}"),
    }
}

fn call(e: &Expr) -> (&str, &[Arg]) {
    match &e.kind {
        ExprKind::Call { callee, args } => (callee.name.as_str(), args.as_slice()),
        other => panic!("expected a call, got {other:?}"),
    }
}

fn text_of(text: &str, span: Span) -> &str {
    &text[span.range()]
}

// ------------------------------------------------------------------ the example

#[test]
fn example_parses_into_items() {
    let module = parse_ok(EXAMPLE);
    assert_eq!(module.items.len(), 5);
    assert!(matches!(&module.items[0], Item::Use { path, .. } if path == "other.mdl"));
    let Item::Model(model) = &module.items[4] else { panic!("last item is the model") };
    assert_eq!(model.name.name, "crocodile");
    let names: Vec<_> = model.params.iter().map(|p| p.name.name.as_str()).collect();
    assert_eq!(names, ["tables", "dim", "widths", "cov_weight"]);
    assert!(matches!(model.params[3].default.as_ref().map(|e| &e.kind), Some(ExprKind::Float(f)) if *f == 1e-4));
    assert_eq!(model.body.len(), 14);
}

#[test]
fn short_block_is_a_return() {
    let module = parse_ok(EXAMPLE);
    let expert = block(&module, "expert");
    assert_eq!(expert.params.len(), 3);
    assert!(matches!(&expert.params[2].default, Some(Expr { kind: ExprKind::Str(s), .. }) if s == "relu"));
    let [Stmt::Return { value, .. }] = expert.body.as_slice() else { panic!("one return") };
    let (callee, args) = call(value);
    assert_eq!(callee, "mlp");
    assert_eq!(args.len(), 3);
    assert_eq!(args[2].name.as_ref().map(|n| n.name.as_str()), Some("act"));
}

#[test]
fn inputs_and_labels() {
    let module = parse_ok(EXAMPLE);
    let body = model_body(&module);
    let kinds: Vec<_> = body
        .iter()
        .filter_map(|s| match s {
            Stmt::Input { name, kind, .. } => Some((name.name.as_str(), kind)),
            _ => None,
        })
        .collect();
    assert_eq!(kinds[0], ("fields", &InputKind::Categorical));
    let ("hist", InputKind::Sequence { len, of: Some(of) }) = kinds[1] else { panic!("{:?}", kinds[1]) };
    assert_eq!(len.kind, ExprKind::Int(50));
    assert_eq!(of.name, "fields");
    assert_eq!(kinds[2], ("dense", &InputKind::Numeric));
    assert_eq!(kinds[3], ("domain", &InputKind::Domain));
    assert!(body.iter().any(|s| matches!(s, Stmt::Label { names, .. }
        if names.iter().map(|n| n.name.as_str()).eq(["click", "long_view"]))));
}

#[test]
fn domain_is_a_name_outside_input_kinds() {
    let module = parse_ok("model m { let domain = 3 let categorical = domain + 1 }");
    let body = model_body(&module);
    let (_, lhs, _) = binary(let_value(body, "categorical"));
    assert_eq!(var(lhs), "domain");
}

#[test]
fn pipe_desugars_to_calls() {
    let module = parse_ok(EXAMPLE);
    let mlp = block(&module, "mlp");
    let Stmt::For { var: w, body, .. } = &mlp.body[1] else { panic!("for") };
    assert_eq!(w.name, "w");
    let Stmt::Assign { name, value, .. } = &body[0] else { panic!("assign") };
    assert_eq!(name.name, "h");
    // drop(activation(linear(h, w), act), dropout)
    let (f, args) = call(value);
    assert_eq!((f, args.len()), ("drop", 2));
    assert_eq!(var(&args[1].value), "dropout");
    let (g, args) = call(&args[0].value);
    assert_eq!((g, args.len()), ("activation", 2));
    let (h, args) = call(&args[0].value);
    assert_eq!((h, args.len()), ("linear", 2));

    // Pipe binds loosest: `a + b |> f(c)` is `f(a + b, c)`; a bare name is a call.
    let e = expr_of("a + b |> f(c) |> g");
    let (g, args) = call(&e);
    assert_eq!((g, args.len()), ("g", 1));
    let (f, args) = call(&args[0].value);
    assert_eq!(f, "f");
    assert_eq!(binary(&args[0].value).0, BinOp::Add);
    assert_eq!(var(&args[1].value), "c");
}

#[test]
fn precedence_and_associativity() {
    let e = expr_of("a + b * c");
    let (op, lhs, rhs) = binary(&e);
    assert_eq!((op, var(lhs)), (BinOp::Add, "a"));
    assert_eq!(binary(rhs).0, BinOp::Mul);

    let e = expr_of("a - b - c");
    let (op, lhs, rhs) = binary(&e);
    assert_eq!((op, var(rhs)), (BinOp::Sub, "c"));
    assert_eq!(binary(lhs).0, BinOp::Sub);

    // -h[0] + 2 * (h @ W) / 3 ++ [1, 2]
    let e = expr_of("-h[0] + 2 * (h @ W) / 3 ++ [1, 2]");
    let (op, lhs, rhs) = binary(&e);
    assert_eq!(op, BinOp::Concat);
    assert!(matches!(&rhs.kind, ExprKind::List(items) if items.len() == 2));
    let (op, neg, div) = binary(lhs);
    assert_eq!(op, BinOp::Add);
    assert!(matches!(&neg.kind, ExprKind::Unary { op: UnOp::Neg, operand }
        if matches!(operand.kind, ExprKind::Index { .. })));
    let (op, mul, three) = binary(div);
    assert_eq!((op, &three.kind), (BinOp::Div, &ExprKind::Int(3)));
    assert_eq!(binary(binary(mul).2).0, BinOp::MatMul);

    // not (a == b) and c <= d or e != f  ==  ((not (a == b)) and (c <= d)) or (e != f)
    let e = expr_of("not (a == b) and c <= d or e != f");
    let (op, and, ne) = binary(&e);
    assert_eq!((op, binary(ne).0), (BinOp::Or, BinOp::Ne));
    let (op, not, le) = binary(and);
    assert_eq!((op, binary(le).0), (BinOp::And, BinOp::Le));
    assert!(matches!(&not.kind, ExprKind::Unary { op: UnOp::Not, .. }));

    // `not` binds looser than comparisons.
    let e = expr_of("not a == b");
    let ExprKind::Unary { op: UnOp::Not, operand } = &e.kind else { panic!("{e:?}") };
    assert_eq!(binary(operand).0, BinOp::Eq);

    // Ranges sit between `++` and `+`.
    let e = expr_of("0..n + 1");
    let ExprKind::Range { lo, hi } = &e.kind else { panic!("{e:?}") };
    assert_eq!((&lo.kind, binary(hi).0), (&ExprKind::Int(0), BinOp::Add));
}

#[test]
fn chained_indexing_and_comprehensions() {
    let module = parse_ok(EXAMPLE);
    let body = model_body(&module);
    let ExprKind::Comprehension { elem, var: k, iter } = &let_value(body, "X").kind else { panic!() };
    assert_eq!(k.name, "k");
    assert!(matches!(&iter.kind, ExprKind::Range { .. }));
    let (_, args) = call(elem);
    let (flatten, args) = call(&args[0].value);
    assert_eq!(flatten, "flatten");
    // E[k][fields] == Index(Index(E, k), fields)
    let ExprKind::Index { base, index } = &args[0].value.kind else { panic!() };
    assert_eq!(var(index), "fields");
    let ExprKind::Index { base, index } = &base.kind else { panic!() };
    assert_eq!((var(base), var(index)), ("E", "k"));
}

#[test]
fn per_and_block_expressions() {
    let module = parse_ok(EXAMPLE);
    let body = model_body(&module);
    let ExprKind::Per { group, body: per_body, value } = &let_value(body, "h").kind else { panic!() };
    assert_eq!(group.name, "domain");
    assert_eq!(per_body.len(), 1);
    assert_eq!(call(value).0, "sum");

    let ExprKind::Block { body: stmts, value } = &let_value(body, "z").kind else { panic!() };
    assert!(matches!(&stmts[..], [Stmt::Let { name, .. }] if name.name == "t"));
    assert_eq!(binary(value).0, BinOp::Mul);

    let Some(Stmt::Group { name, body: group_body, .. }) = body.iter().find(|s| matches!(s, Stmt::Group { .. })) else {
        panic!("group")
    };
    assert_eq!(name.name, "towers");
    let [Stmt::Task { name, value, .. }] = group_body.as_slice() else { panic!() };
    assert_eq!(name.name, "click");
    let ExprKind::Per { value, .. } = &value.kind else { panic!() };
    let (linear, args) = call(value);
    assert_eq!((linear, call(&args[0].value).0), ("linear", "mlp"));
}

#[test]
fn statements_params_and_if_chains() {
    let module = parse_ok(EXAMPLE);
    let linear = block(&module, "linear");
    let Stmt::ParamDecl { name, shape, init: Some(init), .. } = &linear.body[0] else { panic!() };
    assert_eq!((name.name.as_str(), shape.len(), call(init).0), ("W", 2, "glorot"));
    let Stmt::If { then, otherwise: None, .. } = &linear.body[2] else { panic!() };
    assert_eq!(then.len(), 2);

    let text = "model m { if a { x = 1 } else if b { x = 2 } else { x = 3 }; loss x; }";
    let module = parse_ok(text);
    let body = model_body(&module);
    assert_eq!(body.len(), 2);
    let Stmt::If { otherwise: Some(otherwise), span, .. } = &body[0] else { panic!() };
    assert_eq!(text_of(text, *span), "if a { x = 1 } else if b { x = 2 } else { x = 3 }");
    let [Stmt::If { cond, otherwise: Some(last), span, .. }] = otherwise.as_slice() else { panic!() };
    assert_eq!(var(cond), "b");
    assert_eq!(text_of(text, *span), "if b { x = 2 } else { x = 3 }");
    assert!(matches!(&last[..], [Stmt::Assign { .. }]));
}

#[test]
fn literals() {
    assert_eq!(expr_of("0.5").kind, ExprKind::Float(0.5));
    assert_eq!(expr_of("1e-4").kind, ExprKind::Float(1e-4));
    assert_eq!(expr_of("2.5E3").kind, ExprKind::Float(2500.0));
    assert_eq!(expr_of("9223372036854775807").kind, ExprKind::Int(i64::MAX));
    assert_eq!(expr_of("false").kind, ExprKind::Bool(false));
    assert_eq!(expr_of(r#""a\"b\\c\nd""#).kind, ExprKind::Str("a\"b\\c\nd".into()));
    assert_eq!(expr_of("[]").kind, ExprKind::List(vec![]));
    assert!(matches!(expr_of("[1, 2,]").kind, ExprKind::List(v) if v.len() == 2));
}

#[test]
fn spans_are_tight() {
    let text = "model m { let v = (a + b) * f(c, k = 2)[0] }";
    let module = parse_ok(text);
    let Stmt::Let { value, span, .. } = &model_body(&module)[0] else { panic!() };
    assert_eq!(text_of(text, *span), "let v = (a + b) * f(c, k = 2)[0]");
    assert_eq!(text_of(text, value.span), "(a + b) * f(c, k = 2)[0]");
    let (_, lhs, rhs) = binary(value);
    assert_eq!(text_of(text, lhs.span), "(a + b)");
    assert_eq!(text_of(text, rhs.span), "f(c, k = 2)[0]");
    let ExprKind::Index { base, .. } = &rhs.kind else { panic!() };
    assert_eq!(text_of(text, base.span), "f(c, k = 2)");
    let (_, args) = call(base);
    assert_eq!(text_of(text, args[1].name.as_ref().unwrap().span), "k");

    let text = "model m { let v = x |> f(1) }";
    let module = parse_ok(text);
    assert_eq!(text_of(text, let_value(model_body(&module), "v").span), "x |> f(1)");
}

/// `text` without the parentheses (and the blanks inside them) around it.
fn unparenthesized(text: &str) -> &str {
    let mut text = text;
    while let Some(inner) = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        text = inner.trim();
    }
    text
}

/// Every identifier in the tree covers exactly its name, and every variable its name in
/// the parentheses written around it.
fn check_names(text: &str, module: &Module) {
    struct Check<'t>(&'t str, usize);
    impl Check<'_> {
        fn ident(&mut self, id: &Ident) {
            assert_eq!(&self.0[id.span.range()], id.name, "span {:?}", id.span);
            self.1 += 1;
        }
        fn stmts(&mut self, stmts: &[Stmt]) {
            stmts.iter().for_each(|s| self.stmt(s));
        }
        fn stmt(&mut self, s: &Stmt) {
            assert!(self.0.get(s.span().range()).is_some());
            match s {
                Stmt::Input { name, kind, .. } => {
                    self.ident(name);
                    if let InputKind::Sequence { len, of } = kind {
                        self.expr(len);
                        of.iter().for_each(|o| self.ident(o));
                    }
                }
                Stmt::Label { names, .. } => names.iter().for_each(|n| self.ident(n)),
                Stmt::Let { name, value, .. } | Stmt::Assign { name, value, .. } | Stmt::Task { name, value, .. } => {
                    self.ident(name);
                    self.expr(value);
                }
                Stmt::ParamDecl { name, shape, init, .. } => {
                    self.ident(name);
                    shape.iter().for_each(|e| self.expr(e));
                    init.iter().for_each(|e| self.expr(e));
                }
                Stmt::For { var, iter, body, .. } => {
                    self.ident(var);
                    self.expr(iter);
                    self.stmts(body);
                }
                Stmt::If { cond, then, otherwise, .. } => {
                    self.expr(cond);
                    self.stmts(then);
                    otherwise.iter().for_each(|o| self.stmts(o));
                }
                Stmt::Group { name, body, .. } => {
                    self.ident(name);
                    self.stmts(body);
                }
                Stmt::Return { value, .. } | Stmt::Loss { value, .. } | Stmt::Expr { value } => self.expr(value),
            }
        }
        fn expr(&mut self, e: &Expr) {
            assert!(self.0.get(e.span.range()).is_some());
            match &e.kind {
                // Parentheses widen an expression's span (`bce * (y)`'s caret covers `(y)`).
                ExprKind::Var(name) => assert_eq!(unparenthesized(&self.0[e.span.range()]), name),
                ExprKind::List(items) => items.iter().for_each(|i| self.expr(i)),
                ExprKind::Comprehension { elem, var, iter } => {
                    self.expr(elem);
                    self.ident(var);
                    self.expr(iter);
                }
                ExprKind::Range { lo: a, hi: b }
                | ExprKind::Index { base: a, index: b }
                | ExprKind::Binary { lhs: a, rhs: b, .. } => {
                    self.expr(a);
                    self.expr(b);
                }
                ExprKind::Call { callee, args } => {
                    self.ident(callee);
                    for arg in args {
                        arg.name.iter().for_each(|n| self.ident(n));
                        self.expr(&arg.value);
                    }
                }
                ExprKind::Unary { operand, .. } => self.expr(operand),
                ExprKind::Per { group, body, value } => {
                    self.ident(group);
                    self.stmts(body);
                    self.expr(value);
                }
                ExprKind::Block { body, value } => {
                    self.stmts(body);
                    self.expr(value);
                }
                ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Str(_) | ExprKind::Bool(_) => {}
            }
        }
    }
    let mut check = Check(text, 0);
    for item in &module.items {
        match item {
            Item::Use { span, .. } => assert!(text.get(span.range()).is_some()),
            Item::Block(BlockDef { name, params, body, .. }) | Item::Model(ModelDef { name, params, body, .. }) => {
                check.ident(name);
                for p in params {
                    check.ident(&p.name);
                    p.default.iter().for_each(|d| check.expr(d));
                }
                check.stmts(body);
            }
        }
    }
}

#[test]
fn ident_spans_round_trip() {
    // A proptest case found this: a parenthesized variable's span covers its parentheses.
    let text = "model m { loss 0.5 * bce*( long_view ) }";
    check_names(text, &parse_ok(text));
    check_names(EXAMPLE, &parse_ok(EXAMPLE));
}

// ------------------------------------------------------------------ syntax errors

#[test]
fn missing_close_paren_in_call() {
    let out = parse_err("model m {\n  let y = f(a, b\n  let z = 1\n}\n");
    assert!(out.contains("error: expected `,` or `)`, found keyword `let`"), "{out}");
    assert!(out.contains("file.mdl:3:3"), "{out}");
    assert!(out.contains("3 |   let z = 1\n  |   ^^^ "), "{out}");
    // The note points at the `(` still open.
    assert!(out.contains("file.mdl:2:12"), "{out}");
    assert!(out.contains("2 |   let y = f(a, b\n  |            ^ the `(` opened here"), "{out}");
}

#[test]
fn keyword_as_name() {
    let out = parse_err("model m {\n  let for = 1\n}");
    assert!(out.contains("expected a name, found keyword `for`"), "{out}");
    assert!(out.contains("file.mdl:2:7"), "{out}");
    assert!(out.contains("  |       ^^^ expected a name"), "{out}");
    assert!(out.contains("hint: `for` is a keyword"), "{out}");
}

#[test]
fn stray_equals() {
    let out = parse_err("model m { let x = = 1 }");
    assert!(out.contains("expected an expression, found `=`"), "{out}");
    assert!(out.contains("file.mdl:1:19"), "{out}");
    assert!(out.contains("  |                   ^ expected an expression"), "{out}");

    let out = parse_err("model m { if a = b { } }");
    assert!(out.contains("file.mdl:1:16"), "{out}");
    assert!(out.contains("write `==`"), "{out}");
}

#[test]
fn unterminated_string() {
    let out = parse_err("use \"a.mdl\"\nblock f(x) = g(x, \"relu)\nmodel m { }\n");
    assert!(out.contains("error: unterminated string"), "{out}");
    assert!(out.contains("file.mdl:2:19"), "{out}");
    assert!(out.contains("2 | block f(x) = g(x, \"relu)\n  |                   ^^^^^^ "), "{out}");
}

#[test]
fn positional_after_named() {
    let out = parse_err("block f(x) = g(x, act = 1, 2)");
    assert!(out.contains("error: positional argument after a named argument"), "{out}");
    assert!(out.contains("file.mdl:1:28"), "{out}");
    assert!(out.contains("  |                            ^ positional argument"), "{out}");
    assert!(out.contains("file.mdl:1:19"), "{out}");
}

#[test]
fn unexpected_end_of_file() {
    let out = parse_err("model m {\n  let x = 1\n");
    assert!(out.contains("error: unexpected end of file; expected a statement or `}`"), "{out}");
    assert!(out.contains("file.mdl:3:1"), "{out}");
    assert!(out.contains("this `{` is never closed"), "{out}");
    assert!(out.contains("file.mdl:1:9"), "{out}");
}

#[test]
fn errors_never_name_grammar_rules() {
    let cases = [
        "model m { let x = ) }",
        "model m { input x : foo }",
        "model m { x |> 3 }",
        "block",
        "model m { let x = [1, 2 }",
        "block f(x) { return x } }",
        "model m { param W : 3 }",
        "model m { for k 0..3 { } }",
        "model m { let x = 1e }",
    ];
    for case in cases {
        let out = parse_err(case);
        for rule in ["stmt", "EOI", "primary", "kw_", "op_", "_expr", "rparen", "lbrace", "Rule"] {
            assert!(!out.contains(rule), "{case:?} mentions {rule}:\n{out}");
        }
    }
}

#[test]
fn walker_errors() {
    let out = parse_err("model m { let x = a < b < c }");
    assert!(out.contains("comparison operators cannot be chained") && out.contains("file.mdl:1:25"), "{out}");
    let out = parse_err("model m { let x = \"a\\qb\" }");
    assert!(out.contains("unknown escape `\\q`") && out.contains("file.mdl:1:21"), "{out}");
    let out = parse_err("model m { let x = 99999999999999999999 }");
    assert!(out.contains("integer literal is too large"), "{out}");
    let out = parse_err("model m { let x = { let y = 1 } }");
    assert!(out.contains("must end with the expression that gives its value"), "{out}");
    let out = parse_err("model m { let x = per d { } }");
    assert!(out.contains("has no value"), "{out}");
    let out = parse_err("model m { let x = 1..2..3 }");
    assert!(out.contains("exactly one `..`"), "{out}");
}

// ------------------------------------------------------------------ depth limits

/// Runs `f` on a thread with a small stack (512 KiB, a quarter of a test thread's), so
/// that a depth limit too generous for ordinary threads shows up as a failure here.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(512 * 1024).spawn(f).unwrap().join().unwrap()
}

#[test]
fn deep_nesting_is_a_diagnostic() {
    let deep = [
        format!("model m {{ let x = {}1{} }}", "(".repeat(10_000), ")".repeat(10_000)),
        format!("model m {{ let x = {}1 }}", "(".repeat(10_000)),
        format!("model m {{ let x = {}1 }}", "- ".repeat(2_000)),
        format!("model m {{ let x = {}1 }}", "not ".repeat(2_000)),
        format!("model m {{ let x = 1{} }}", " + 1".repeat(2_000)),
        format!("model m {{ let x = 1{} }}", " |> f".repeat(2_000)),
        format!("model m {{ let x = a{} }}", "[0]".repeat(2_000)),
        format!("model m {{ if a {{ }}{} }}", " else if a { }".repeat(2_000)),
        format!("model m {}{}", "{ ".repeat(10_000), "}".repeat(10_000)),
        // Moderate nesting of brackets, each holding a chain whose first operand nests.
        format!("model m {{ let x = {}1{} }}", "(".repeat(200), " + 1 + 1 + 1)".repeat(200)),
    ];
    for text in deep {
        let out = on_small_stack(move || parse_err(&text));
        assert!(out.contains("nested too deeply"), "{}", &out[..out.len().min(400)]);
    }
}

#[test]
fn nesting_below_the_limit_parses() {
    let n = MAX_NESTING - 8;
    let texts = [
        format!("model m {{ let x = {}1{} }}", "(".repeat(n), ")".repeat(n)),
        format!("model m {{ let x = {}1{} }}", "f(".repeat(n / 2), ")".repeat(n / 2)),
        format!("model m {{ let x = {}1{} }}", "[".repeat(n), "]".repeat(n)),
        format!("model m {{ let x = {}1{} }}", "{ ".repeat(n / 2), " }".repeat(n / 2)),
        format!("model m {{ let x = 1{} }}", " + 1".repeat(n)),
    ];
    for text in texts {
        on_small_stack(move || {
            parse_ok(&text);
        });
    }
}

// ------------------------------------------------------------------ fuzzing

/// Parses `text` and checks the contract that holds for every input: no panic, every
/// diagnostic (and note) inside the text and renderable, and on success every name's
/// span covering exactly that name.
fn check_contract(text: &str) {
    let (map, result) = parse_text(text);
    match result {
        Ok(module) => check_names(text, &module),
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in &diags {
                for span in std::iter::once(d.span).chain(d.notes.iter().map(|n| n.0)) {
                    assert_eq!(span.file, 0);
                    assert!(span.start <= span.end && span.end as usize <= text.len(), "{span:?} in {text:?}");
                    assert!(text.is_char_boundary(span.start as usize) && text.is_char_boundary(span.end as usize));
                }
                let out = render(&map, d);
                assert!(out.starts_with("error: ") && out.contains("file.mdl:"), "{out}");
            }
        }
    }
}

/// Tokens that exercise the lexer's and parser's edges beyond the fuzz suite's vocabulary
/// (`mdl::fuzz::SPEC_TOKENS`, which the token tests below draw from too): an integer out of
/// range, a bad escape, an unterminated string, non-ASCII and control characters, and the
/// operators and names the fuzz vocabulary leaves out.
const EDGE_TOKENS: &[&str] = &[
    "use",
    "and",
    "or",
    "not",
    "h",
    "f",
    "99999999999999999999",
    "\"s\"",
    "\"a\\qb\"",
    "!=",
    "<=",
    ">=",
    ";",
    "#c\n",
    "é",
    "\t",
];

/// The fuzz suite's tokens and the edge tokens above.
fn tokens() -> Vec<&'static str> {
    mdl::fuzz::SPEC_TOKENS.iter().chain(EDGE_TOKENS).copied().collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize),
    Insert(usize, char),
    Swap(usize, usize),
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for edit in edits {
        let n = chars.len().max(1);
        match *edit {
            Edit::Delete(i) if !chars.is_empty() => {
                chars.remove(i % n);
            }
            Edit::Delete(_) => {}
            Edit::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
            Edit::Swap(i, j) if !chars.is_empty() => chars.swap(i % n, j % n),
            Edit::Swap(..) => {}
        }
    }
    chars.into_iter().collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    let interesting = prop::sample::select(vec![
        '(', ')', '{', '}', '[', ']', '"', '=', ',', '#', '\n', ' ', 'x', '1', '.', '-', '|', 'é',
    ]);
    prop_oneof![
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), interesting).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::Swap(i, j)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_contract(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn token_soup_never_panics(soup in prop::collection::vec(prop::sample::select(tokens()), 0..80),
                               spaces in prop::collection::vec(prop::bool::ANY, 80)) {
        let mut text = String::new();
        for (tok, space) in soup.iter().zip(&spaces) {
            text.push_str(tok);
            if *space { text.push(' ') }
        }
        check_contract(&text);
    }

    #[test]
    fn mutated_example_never_panics(edits in prop::collection::vec(edit(), 1..6)) {
        check_contract(&apply(EXAMPLE, &edits));
    }
}

#[test]
fn every_token_in_every_position() {
    // A deterministic sweep: each token where an item, a statement, an expression, an
    // argument and a parameter may start.
    for tok in tokens() {
        for text in [
            tok.to_string(),
            format!("model m {{ {tok} }}"),
            format!("model m {{ let v = {tok} }}"),
            format!("model m {{ let v = f(x, {tok}) }}"),
            format!("block f({tok}) = x"),
            format!("model m {{ let v = x {tok} y }}"),
        ] {
            check_contract(&text);
        }
    }
}
