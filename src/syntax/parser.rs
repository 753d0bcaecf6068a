//! The parser proper: runs the pest grammar in `grammar/mdl.pest` over a file, turns pest's
//! failures into plain-worded [`Diagnostic`]s, and walks pest's pairs into the [`ast`].
//!
//! Three stages, each of which can stop with diagnostics and none of which can panic:
//!
//! 1. **Bracket scan** ([`scan_brackets`]): a small hand-written pass that skips strings and
//!    comments, reports an unterminated string at its opening quote, and refuses bracket
//!    nesting deeper than [`MAX_NESTING`] before pest (which recurses per bracket) sees it.
//! 2. **pest**: on failure, [`syntax_error`] names the expected tokens in words
//!    ("expected `,` or `)`, found `let`") and points at the innermost bracket still open.
//! 3. **Tree walk** ([`Walker`]): builds the AST with tight spans, desugars pipes and
//!    `else if`, and reports what the grammar deliberately lets through: chained
//!    comparisons, positional arguments after named ones, bad escapes, integer overflow,
//!    block expressions without a value. It tracks the depth of the tree it is building
//!    and stops at [`MAX_NESTING`], so that no later recursive pass (nor `Drop`) can
//!    overflow the stack on a pathological spec. An impossible pair shape becomes an
//!    "internal parser error" diagnostic rather than a panic.

use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser as _;
use pest_derive::Parser;

use super::ast::{Arg, BinOp, BlockDef, Expr, ExprKind, Ident, InputKind, Item, ModelDef, Module, Param, Stmt, UnOp};
use super::MAX_NESTING;
use crate::diag::{Diagnostic, SourceMap, Span};

#[derive(Parser)]
#[grammar = "../grammar/mdl.pest"]
struct MdlGrammar;

/// Stack for the parsing thread. pest recurses through every precedence level for each
/// bracket (about 16 KiB per bracket in an unoptimised build), so [`MAX_NESTING`]
/// brackets need a few MiB whatever the caller's own stack; only touched pages are used.
const PARSE_STACK: usize = 64 << 20;

/// Parses file `file` of `map` into a module, or returns the problems found.
///
/// The work runs on a scoped thread with a [`PARSE_STACK`]-sized stack, so what parses
/// does not depend on the caller's stack size; if no thread can be started it runs on
/// the caller's thread, where pest's own stack probe still turns exhaustion into an error.
pub fn parse(map: &SourceMap, file: u32) -> Result<Module, Vec<Diagnostic>> {
    let text = map.text(file);
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("mdl-parse".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, || parse_text(text, file));
        match worker {
            Ok(handle) => {
                handle.join().unwrap_or_else(|_| Err(vec![internal(Span::new(file, 0, 0), "the parser panicked")]))
            }
            Err(_) => parse_text(text, file),
        }
    })
}

fn parse_text(text: &str, file: u32) -> Result<Module, Vec<Diagnostic>> {
    if u32::try_from(text.len()).is_err() {
        let msg = "file is too large to compile (the limit is 4 GiB)";
        return Err(vec![Diagnostic::error(Span::new(file, 0, 0), msg)]);
    }
    if let Err(problem) = scan_brackets(text, text.len()) {
        return Err(vec![problem.diagnostic(file)]);
    }
    let pairs = match MdlGrammar::parse(Rule::module, text) {
        Ok(pairs) => pairs,
        Err(err) => return Err(vec![syntax_error(text, file, err)]),
    };
    let mut walker = Walker { file, errors: Vec::new() };
    let module = pairs
        .into_iter()
        .next()
        .ok_or_else(|| internal(Span::new(file, 0, 0), "pest returned no module"))
        .and_then(|pair| walker.module(pair));
    match module {
        Ok(module) if walker.errors.is_empty() => Ok(module),
        Ok(_) => Err(walker.errors),
        Err(fatal) => {
            walker.errors.push(fatal);
            walker.errors.sort_by_key(|d| d.span.start);
            Err(walker.errors)
        }
    }
}

// ------------------------------------------------------------------ bracket scan

/// A problem the bracket scan finds before pest runs.
enum ScanProblem {
    /// A string from `start` (its quote) to `end` (the end of its line) with no closing quote.
    UnterminatedString { start: usize, end: usize },
    /// The bracket at `at` is nested more than [`MAX_NESTING`] deep.
    TooDeep { at: usize },
}

impl ScanProblem {
    fn diagnostic(&self, file: u32) -> Diagnostic {
        match *self {
            ScanProblem::UnterminatedString { start, end } => {
                Diagnostic::error(Span::new(file, start as u32, end as u32), "unterminated string")
                    .label("this string has no closing `\"`")
                    .hint("a string ends with `\"` on the same line; write `\\n` for a line break")
            }
            ScanProblem::TooDeep { at } => too_deep(Span::new(file, at as u32, at as u32 + 1)),
        }
    }
}

fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(span, format!("expression nested too deeply (the limit is {MAX_NESTING} levels)"))
        .label("too deep")
        .hint("split it into several `let` bindings")
}

fn closer(open: u8) -> u8 {
    match open {
        b'(' => b')',
        b'[' => b']',
        _ => b'}',
    }
}

/// Scans `text[..stop]` for brackets, skipping strings and comments exactly as the grammar
/// reads them, and returns the brackets still open at `stop` (kind and offset, innermost
/// last). A closing bracket that does not match the innermost open one is left for pest
/// to report.
fn scan_brackets(text: &str, stop: usize) -> Result<Vec<(u8, usize)>, ScanProblem> {
    let bytes = text.as_bytes();
    let stop = stop.min(bytes.len());
    let mut open = Vec::new();
    let mut i = 0;
    while i < stop {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                let start = i;
                i += 1;
                loop {
                    match bytes.get(i) {
                        None | Some(b'\n') => return Err(ScanProblem::UnterminatedString { start, end: i }),
                        Some(b'"') => break,
                        Some(b'\\') if matches!(bytes.get(i + 1), None | Some(b'\n')) => {
                            return Err(ScanProblem::UnterminatedString { start, end: i + 1 });
                        }
                        Some(b'\\') => i += 2,
                        Some(_) => i += 1,
                    }
                }
            }
            b @ (b'(' | b'[' | b'{') => {
                open.push((b, i));
                if open.len() > MAX_NESTING {
                    return Err(ScanProblem::TooDeep { at: i });
                }
            }
            b @ (b')' | b']' | b'}') if open.last().is_some_and(|&(o, _)| closer(o) == b) => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    Ok(open)
}

// ------------------------------------------------------------------ syntax errors

/// How a grammar rule reads in an "expected ..." message.
enum Expect {
    /// A phrase such as "`)`" or "an expression".
    Words(&'static str),
    /// Something that may optionally continue what came before (an operator, `[`, `else`);
    /// named only when nothing else was possible.
    Continuation,
}

fn describe(rule: Rule) -> Expect {
    use Expect::{Continuation, Words};
    match rule {
        Rule::EOI => Words("end of file"),
        Rule::module | Rule::item | Rule::use_item | Rule::block_item | Rule::model_item => {
            Words("an item (`use`, `block` or `model`)")
        }
        Rule::kw_use => Words("`use`"),
        Rule::kw_block => Words("`block`"),
        Rule::kw_model => Words("`model`"),
        Rule::short_body | Rule::op_assign => Words("`=`"),
        Rule::params | Rule::lparen => Words("`(`"),
        Rule::param | Rule::name | Rule::keyword | Rule::ident_char => Words("a name"),
        Rule::body | Rule::block_expr | Rule::lbrace => Words("`{`"),
        Rule::stmt
        | Rule::input_stmt
        | Rule::label_stmt
        | Rule::let_stmt
        | Rule::param_stmt
        | Rule::for_stmt
        | Rule::if_stmt
        | Rule::group_stmt
        | Rule::return_stmt
        | Rule::task_stmt
        | Rule::loss_stmt
        | Rule::assign_stmt
        | Rule::expr_stmt => Words("a statement"),
        Rule::input_kind
        | Rule::sequence_kind
        | Rule::kind_categorical
        | Rule::kind_numeric
        | Rule::kind_domain
        | Rule::kind_sequence => Words("an input kind (`categorical`, `numeric`, `domain` or `sequence(n)`)"),
        Rule::shape => Words("a shape such as `[n, m]`"),
        Rule::expr
        | Rule::or_expr
        | Rule::and_expr
        | Rule::not_expr
        | Rule::cmp_expr
        | Rule::concat_expr
        | Rule::range_expr
        | Rule::add_expr
        | Rule::mul_expr
        | Rule::neg_expr
        | Rule::postfix_expr
        | Rule::primary
        | Rule::exponent
        | Rule::call
        | Rule::arg
        | Rule::list
        | Rule::paren
        | Rule::per_expr
        | Rule::bool_lit
        | Rule::int
        | Rule::float
        | Rule::kw_per
        | Rule::kw_true
        | Rule::kw_false
        | Rule::kw_not
        | Rule::op_neg => Words("an expression"),
        Rule::string | Rule::string_body => Words("a string"),
        Rule::pipe_target => Words("a block to pipe into (`f` or `f(args)`)"),
        Rule::kw_input => Words("`input`"),
        Rule::kw_label => Words("`label`"),
        Rule::kw_let => Words("`let`"),
        Rule::kw_param => Words("`param`"),
        Rule::kw_for => Words("`for`"),
        Rule::kw_in => Words("`in`"),
        Rule::kw_if => Words("`if`"),
        Rule::kw_group => Words("`group`"),
        Rule::kw_return => Words("`return`"),
        Rule::kw_task => Words("`task`"),
        Rule::kw_loss => Words("`loss`"),
        Rule::rparen => Words("`)`"),
        Rule::lbracket => Words("`[`"),
        Rule::rbracket => Words("`]`"),
        Rule::rbrace => Words("`}`"),
        Rule::comma => Words("`,`"),
        Rule::colon => Words("`:`"),
        Rule::tilde => Words("`~`"),
        Rule::WHITESPACE
        | Rule::COMMENT
        | Rule::else_if
        | Rule::else_clause
        | Rule::kw_else
        | Rule::kw_of
        | Rule::comp_tail
        | Rule::index
        | Rule::index_open
        | Rule::call_open
        | Rule::named_eq
        | Rule::kw_and
        | Rule::kw_or
        | Rule::op_pipe
        | Rule::op_eq
        | Rule::op_ne
        | Rule::op_le
        | Rule::op_ge
        | Rule::op_lt
        | Rule::op_gt
        | Rule::op_concat
        | Rule::op_range
        | Rule::op_add
        | Rule::op_sub
        | Rule::op_mul
        | Rule::op_div
        | Rule::op_matmul => Continuation,
    }
}

/// The reserved words of the grammar's `keyword` rule, to say "keyword `for`" in messages.
/// (`label` is not one: it starts a label statement, and is otherwise the built-in `label(task)`.)
const KEYWORDS: &[&str] = &[
    "use", "block", "model", "input", "let", "param", "for", "in", "if", "else", "group", "return", "task", "loss",
    "per", "of", "true", "false", "and", "or", "not",
];

/// The token that starts at or after `pos` (skipping whitespace and comments), as a byte
/// range; empty at the end of the file.
fn token_at(text: &str, mut pos: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    pos = pos.min(bytes.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    loop {
        match bytes.get(pos) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => pos += 1,
            Some(b'#') => {
                while pos < bytes.len() && bytes[pos] != b'\n' {
                    pos += 1;
                }
            }
            _ => break,
        }
    }
    let word = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let Some(&first) = bytes.get(pos) else {
        return (pos, pos);
    };
    let mut end = pos;
    if first.is_ascii_alphanumeric() || first == b'_' {
        while word(end) {
            end += 1;
            // Keep a decimal point inside a number: `0.5`.
            if first.is_ascii_digit()
                && bytes.get(end) == Some(&b'.')
                && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)
            {
                end += 1;
            }
        }
    } else if first == b'"' {
        end += 1;
        while end < bytes.len() && bytes[end] != b'"' && bytes[end] != b'\n' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        end = (end + 1).min(bytes.len());
    } else {
        let two = text.get(pos..pos + 2).unwrap_or("");
        end = if ["==", "!=", "<=", ">=", "|>", "++", ".."].contains(&two) {
            pos + 2
        } else {
            pos + text[pos..].chars().next().map_or(1, char::len_utf8)
        };
    }
    while !text.is_char_boundary(end.min(bytes.len())) {
        end += 1;
    }
    (pos, end.min(bytes.len()))
}

/// Joins phrases as "a", "a or b", "a, b or c".
fn one_of(items: &[&str]) -> String {
    match items {
        [] => "something else".to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Turns a pest failure into a diagnostic in plain words.
fn syntax_error(text: &str, file: u32, err: pest::error::Error<Rule>) -> Diagnostic {
    let pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((start, _)) => start,
    };
    let (start, end) = token_at(text, pos);
    let span = Span::new(file, start as u32, end as u32);
    let found_text = &text[start..end];
    let at_eof = start >= text.len();

    let positives = match err.variant {
        ErrorVariant::ParsingError { positives, .. } => positives,
        ErrorVariant::CustomError { message } => {
            return if message.contains("limit") {
                too_deep(span)
            } else {
                Diagnostic::error(span, format!("syntax error: {message}"))
            };
        }
    };

    let mut words: Vec<&str> = Vec::new();
    let mut continuation = false;
    for rule in positives {
        match describe(rule) {
            Expect::Words(w) if !words.contains(&w) => words.push(w),
            Expect::Words(_) => {}
            Expect::Continuation => continuation = true,
        }
    }
    if words.contains(&"a statement") {
        words.retain(|w| *w != "an expression");
    }
    // Closing brackets read best after what could have continued, end of file last.
    words.sort_by_key(|w| match *w {
        "`)`" | "`]`" | "`}`" => 1,
        "end of file" => 2,
        _ => 0,
    });
    if words.is_empty() && continuation {
        words.push("an operator");
    }
    let expected = one_of(&words);

    let found = if at_eof {
        "end of file".to_string()
    } else if KEYWORDS.contains(&found_text) {
        format!("keyword `{found_text}`")
    } else {
        let shown: String = found_text.chars().take(24).collect();
        let more = if shown.len() < found_text.len() { "…" } else { "" };
        format!("`{shown}{more}`")
    };

    let mut d = if words.is_empty() {
        Diagnostic::error(span, format!("unexpected {found}")).label("not expected here")
    } else if at_eof {
        Diagnostic::error(span, format!("unexpected end of file; expected {expected}")).label("the file ends here")
    } else {
        Diagnostic::error(span, format!("expected {expected}, found {found}")).label(format!("expected {expected}"))
    };

    if words.contains(&"a name") && KEYWORDS.contains(&found_text) {
        d = d.hint(format!("`{found_text}` is a keyword and cannot be used as a name"));
    } else if found_text == "=" && continuation && !words.contains(&"`=`") {
        d = d.hint("to compare two values, write `==`");
    }

    // Point at the innermost bracket still open when its closer would have been accepted.
    if let Ok(open) = scan_brackets(text, start) {
        if let Some(&(kind, at)) = open.last() {
            let close = format!("`{}`", closer(kind) as char);
            if words.iter().any(|w| *w == close) {
                let kind = kind as char;
                let msg = if at_eof {
                    format!("this `{kind}` is never closed")
                } else {
                    format!("the `{kind}` opened here is not closed yet")
                };
                d = d.note(Span::new(file, at as u32, at as u32 + 1), msg);
            }
        }
    }
    d
}

// ------------------------------------------------------------------ tree walk

type Walk<T> = Result<T, Diagnostic>;

/// Rules that carry no information once the shape of their parent is known.
fn is_punctuation(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::lparen
            | Rule::rparen
            | Rule::call_open
            | Rule::lbracket
            | Rule::rbracket
            | Rule::index_open
            | Rule::lbrace
            | Rule::rbrace
            | Rule::comma
            | Rule::colon
            | Rule::tilde
            | Rule::op_assign
            | Rule::named_eq
            | Rule::op_pipe
            | Rule::kw_use
            | Rule::kw_block
            | Rule::kw_model
            | Rule::kw_input
            | Rule::kw_label
            | Rule::kw_let
            | Rule::kw_param
            | Rule::kw_for
            | Rule::kw_in
            | Rule::kw_if
            | Rule::kw_else
            | Rule::kw_group
            | Rule::kw_return
            | Rule::kw_task
            | Rule::kw_loss
            | Rule::kw_per
            | Rule::kw_of
            | Rule::kind_sequence
            | Rule::EOI
    )
}

/// The meaningful children of one pair, consumed in order.
struct Parts<'i> {
    items: std::iter::Peekable<std::vec::IntoIter<Pair<'i, Rule>>>,
    parent: Span,
}

impl<'i> Parts<'i> {
    fn next(&mut self) -> Option<Pair<'i, Rule>> {
        self.items.next()
    }

    /// The next child if it is a `rule`.
    fn eat(&mut self, rule: Rule) -> Option<Pair<'i, Rule>> {
        self.items.next_if(|p| p.as_rule() == rule)
    }

    /// The next child, which the grammar guarantees to be a `rule`.
    fn expect(&mut self, rule: Rule) -> Walk<Pair<'i, Rule>> {
        match self.items.next() {
            Some(p) if p.as_rule() == rule => Ok(p),
            other => Err(internal(self.parent, &format!("expected {rule:?}, found {:?}", other.map(|p| p.as_rule())))),
        }
    }
}

fn internal(span: Span, what: &str) -> Diagnostic {
    Diagnostic::error(span, format!("internal parser error: {what}"))
        .hint("this is a bug in mdl; please report it together with this file")
}

fn binop(rule: Rule) -> Option<BinOp> {
    Some(match rule {
        Rule::kw_or => BinOp::Or,
        Rule::kw_and => BinOp::And,
        Rule::op_eq => BinOp::Eq,
        Rule::op_ne => BinOp::Ne,
        Rule::op_lt => BinOp::Lt,
        Rule::op_le => BinOp::Le,
        Rule::op_gt => BinOp::Gt,
        Rule::op_ge => BinOp::Ge,
        Rule::op_concat => BinOp::Concat,
        Rule::op_add => BinOp::Add,
        Rule::op_sub => BinOp::Sub,
        Rule::op_mul => BinOp::Mul,
        Rule::op_div => BinOp::Div,
        Rule::op_matmul => BinOp::MatMul,
        _ => return None,
    })
}

/// Builds the AST from pest's pairs.
///
/// Every function that builds a node takes `depth`, the depth that node will have in
/// the finished tree (items are at 0). Chains that the grammar reads as repetitions
/// (`a + b + c`, `- - x`, `e[i][j]`, `x |> f |> g`, `else if`) become nested nodes, so
/// their operands sit deeper than the chain; the depth is checked before descending.
struct Walker {
    file: u32,
    /// Problems that do not stop the walk (it goes on with a stand-in value).
    errors: Vec<Diagnostic>,
}

impl Walker {
    /// The span of a pair without the whitespace and comments pest leaves at the end of a
    /// rule that finishes with an optional or repeated part: it ends where its last token
    /// ends (tokens are atomic rules, whose spans are exact; a string is one token).
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let mut last = pair.clone();
        while last.as_rule() != Rule::string {
            match last.clone().into_inner().next_back() {
                Some(child) => last = child,
                None => break,
            }
        }
        Span::new(self.file, pair.as_span().start() as u32, last.as_span().end() as u32)
    }

    fn parts<'i>(&self, pair: Pair<'i, Rule>) -> Parts<'i> {
        let parent = self.span(&pair);
        let items: Vec<_> = pair.into_inner().filter(|p| !is_punctuation(p.as_rule())).collect();
        Parts { items: items.into_iter().peekable(), parent }
    }

    fn check_depth(&self, depth: usize, span: Span) -> Walk<()> {
        if depth > MAX_NESTING {
            Err(too_deep(span))
        } else {
            Ok(())
        }
    }

    fn ident(&self, pair: &Pair<Rule>) -> Ident {
        Ident { name: pair.as_str().to_string(), span: self.span(pair) }
    }

    // ---------------------------------------------------------------- items

    fn module(&mut self, pair: Pair<Rule>) -> Walk<Module> {
        let mut items = Vec::new();
        for item in self.parts(pair).items {
            let inner = self.parts(item).next();
            let Some(inner) = inner else { continue };
            items.push(self.item(inner)?);
        }
        Ok(Module { items })
    }

    fn item(&mut self, pair: Pair<Rule>) -> Walk<Item> {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut parts = self.parts(pair);
        match rule {
            Rule::use_item => {
                let path = self.string(parts.expect(Rule::string)?);
                Ok(Item::Use { path, span })
            }
            Rule::block_item => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let params = self.params(parts.expect(Rule::params)?)?;
                let body = match parts.next() {
                    Some(p) if p.as_rule() == Rule::body => self.body(p, 1)?,
                    Some(p) if p.as_rule() == Rule::short_body => {
                        let value = self.parts(p).expect(Rule::expr)?;
                        let value = self.expr(value, 2)?;
                        vec![Stmt::Return { span: value.span, value }]
                    }
                    _ => return Err(internal(span, "block without a body")),
                };
                Ok(Item::Block(BlockDef { name, params, body, span }))
            }
            Rule::model_item => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let params = match parts.eat(Rule::params) {
                    Some(p) => self.params(p)?,
                    None => Vec::new(),
                };
                let body = self.body(parts.expect(Rule::body)?, 1)?;
                Ok(Item::Model(ModelDef { name, params, body, span }))
            }
            other => Err(internal(span, &format!("unexpected item {other:?}"))),
        }
    }

    fn params(&mut self, pair: Pair<Rule>) -> Walk<Vec<Param>> {
        let mut params = Vec::new();
        for param in self.parts(pair).items {
            let mut parts = self.parts(param);
            let name = self.ident(&parts.expect(Rule::name)?);
            let default = match parts.eat(Rule::expr) {
                Some(e) => Some(self.expr(e, 2)?),
                None => None,
            };
            params.push(Param { name, default });
        }
        Ok(params)
    }

    // ---------------------------------------------------------------- statements

    /// The statements of a `{ ... }` body, each at `depth`.
    fn body(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Vec<Stmt>> {
        self.check_depth(depth, self.span(&pair))?;
        let stmts: Vec<_> = self.parts(pair).items.collect();
        stmts.into_iter().map(|s| self.stmt(s, depth)).collect()
    }

    /// A `{ stmts value }` body whose last statement is the value.
    fn valued_body(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<(Vec<Stmt>, Box<Expr>)> {
        let span = self.span(&pair);
        let mut stmts = self.body(pair, depth + 1)?;
        match stmts.pop() {
            Some(Stmt::Expr { value }) => Ok((stmts, Box::new(value))),
            Some(last) => Err(Diagnostic::error(
                last.span(),
                "a `{ ... }` expression must end with the expression that gives its value",
            )
            .label("this statement gives no value")
            .hint("add the value as the last line of the block")),
            None => Err(Diagnostic::error(span, "an empty `{ }` has no value")
                .label("empty block")
                .hint("end the block with the expression that gives its value")),
        }
    }

    fn stmt(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Stmt> {
        let outer = self.span(&pair);
        let Some(pair) = pair.into_inner().next() else {
            return Err(internal(outer, "empty statement"));
        };
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut parts = self.parts(pair);
        let inner = depth + 1;
        let stmt = match rule {
            Rule::input_stmt => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let kind = self.input_kind(parts.expect(Rule::input_kind)?, inner)?;
                Stmt::Input { name, kind, span }
            }
            Rule::label_stmt => {
                let mut names = Vec::new();
                while let Some(p) = parts.eat(Rule::name) {
                    names.push(self.ident(&p));
                }
                let kind = match parts.eat(Rule::expr) {
                    Some(e) => Some(self.expr(e, inner)?),
                    None => None,
                };
                Stmt::Label { names, kind, span }
            }
            Rule::let_stmt | Rule::assign_stmt | Rule::task_stmt => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let value = self.expr(parts.expect(Rule::expr)?, inner)?;
                match rule {
                    Rule::let_stmt => Stmt::Let { name, value, span },
                    Rule::assign_stmt => Stmt::Assign { name, value, span },
                    _ => Stmt::Task { name, value, span },
                }
            }
            Rule::param_stmt => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let dims: Vec<_> = self.parts(parts.expect(Rule::shape)?).items.collect();
                let shape = dims.into_iter().map(|d| self.expr(d, inner + 1)).collect::<Walk<_>>()?;
                let init = match parts.eat(Rule::expr) {
                    Some(e) => Some(self.expr(e, inner)?),
                    None => None,
                };
                Stmt::ParamDecl { name, shape, init, span }
            }
            Rule::for_stmt => {
                let var = self.ident(&parts.expect(Rule::name)?);
                let iter = self.expr(parts.expect(Rule::expr)?, inner)?;
                let body = self.body(parts.expect(Rule::body)?, inner)?;
                Stmt::For { var, iter, body, span }
            }
            Rule::if_stmt => return self.if_chain(parts, span, depth),
            Rule::group_stmt => {
                let name = self.ident(&parts.expect(Rule::name)?);
                let body = self.body(parts.expect(Rule::body)?, inner)?;
                Stmt::Group { name, body, span }
            }
            Rule::return_stmt => Stmt::Return { value: self.expr(parts.expect(Rule::expr)?, inner)?, span },
            Rule::loss_stmt => {
                let name = parts.eat(Rule::name).map(|p| self.ident(&p));
                Stmt::Loss { name, value: self.expr(parts.expect(Rule::expr)?, inner)?, span }
            }
            // A bare expression is a statement of the same depth as its value.
            Rule::expr_stmt => Stmt::Expr { value: self.expr(parts.expect(Rule::expr)?, depth)? },
            other => return Err(internal(span, &format!("unexpected statement {other:?}"))),
        };
        Ok(stmt)
    }

    fn input_kind(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<InputKind> {
        let span = self.span(&pair);
        let Some(kind) = pair.into_inner().next() else {
            return Err(internal(span, "empty input kind"));
        };
        Ok(match kind.as_rule() {
            Rule::kind_categorical => InputKind::Categorical,
            Rule::kind_numeric => InputKind::Numeric,
            Rule::kind_domain => InputKind::Domain,
            Rule::sequence_kind => {
                let mut parts = self.parts(kind);
                let len = self.expr(parts.expect(Rule::expr)?, depth)?;
                let of = parts.eat(Rule::name).map(|n| self.ident(&n));
                InputKind::Sequence { len, of }
            }
            other => return Err(internal(span, &format!("unexpected input kind {other:?}"))),
        })
    }

    /// `if c { } else if d { } else { }`: each `else if` becomes an `If` alone in the
    /// `otherwise` of the one before, spanning from its `if` to the end of the chain.
    fn if_chain(&mut self, mut parts: Parts, span: Span, depth: usize) -> Walk<Stmt> {
        let mut clauses = vec![(span.start, parts.expect(Rule::expr)?, parts.expect(Rule::body)?)];
        let mut final_else = None;
        while let Some(p) = parts.next() {
            match p.as_rule() {
                Rule::else_if => {
                    let start = p
                        .clone()
                        .into_inner()
                        .find(|c| c.as_rule() == Rule::kw_if)
                        .map_or(self.span(&p).start, |c| self.span(&c).start);
                    let mut inner = self.parts(p);
                    clauses.push((start, inner.expect(Rule::expr)?, inner.expect(Rule::body)?));
                }
                Rule::else_clause => final_else = Some(self.parts(p).expect(Rule::body)?),
                other => return Err(internal(span, &format!("unexpected {other:?} in if"))),
            }
        }
        // Clause j is an `If` at depth + j; its condition and bodies one deeper.
        let last = depth + clauses.len();
        self.check_depth(last, span)?;
        let mut built = Vec::with_capacity(clauses.len());
        for (j, (start, cond, then)) in clauses.into_iter().enumerate() {
            let cond = self.expr(cond, depth + j + 1)?;
            let then = self.body(then, depth + j + 1)?;
            built.push((start, cond, then));
        }
        let mut otherwise = match final_else {
            Some(body) => Some(self.body(body, last)?),
            None => None,
        };
        let mut stmt = None;
        while let Some((start, cond, then)) = built.pop() {
            let s = Stmt::If { cond, then, otherwise, span: Span::new(self.file, start, span.end) };
            if built.is_empty() {
                stmt = Some(s);
                break;
            }
            otherwise = Some(vec![s]);
        }
        stmt.ok_or_else(|| internal(span, "if without clauses"))
    }

    // ---------------------------------------------------------------- expressions

    /// Any expression-level pair, to become a node at `depth`.
    fn expr(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        // Levels holding a single operand add no node, and parentheses only widen the
        // span: descend through both without recursing.
        let mut pair = pair;
        let mut paren_span = None;
        loop {
            let rule = pair.as_rule();
            let single = matches!(
                rule,
                Rule::expr
                    | Rule::or_expr
                    | Rule::and_expr
                    | Rule::not_expr
                    | Rule::cmp_expr
                    | Rule::concat_expr
                    | Rule::range_expr
                    | Rule::add_expr
                    | Rule::mul_expr
                    | Rule::neg_expr
                    | Rule::postfix_expr
            );
            if rule == Rule::paren {
                let span = self.span(&pair);
                paren_span.get_or_insert(span);
                pair = self.parts(pair).expect(Rule::expr)?;
                continue;
            }
            if single {
                let mut inner = pair.clone().into_inner();
                if let (Some(only), None) = (inner.next(), inner.next()) {
                    pair = only;
                    continue;
                }
            }
            break;
        }
        let span = self.span(&pair);
        self.check_depth(depth, span)?;
        let mut expr = match pair.as_rule() {
            Rule::expr => self.pipe_chain(pair, depth)?,
            Rule::or_expr | Rule::and_expr | Rule::concat_expr | Rule::add_expr | Rule::mul_expr => {
                self.binary_chain(pair, depth)?
            }
            Rule::cmp_expr => self.binary_chain(pair, depth)?,
            Rule::range_expr => self.range(pair, depth)?,
            Rule::not_expr | Rule::neg_expr => self.prefix(pair, depth)?,
            Rule::postfix_expr => self.postfix(pair, depth)?,
            Rule::int => Expr { kind: ExprKind::Int(self.int(&pair)), span },
            Rule::float => Expr { kind: ExprKind::Float(self.float(&pair)), span },
            Rule::string => Expr { kind: ExprKind::Str(self.string(pair)), span },
            Rule::bool_lit => Expr { kind: ExprKind::Bool(pair.as_str() == "true"), span },
            Rule::name => Expr { kind: ExprKind::Var(pair.as_str().to_string()), span },
            Rule::call => {
                let (callee, args) = self.call(pair, depth + 1)?;
                Expr { kind: ExprKind::Call { callee, args }, span }
            }
            Rule::list => self.list(pair, depth)?,
            Rule::per_expr => {
                let mut parts = self.parts(pair);
                let group = self.ident(&parts.expect(Rule::name)?);
                let (body, value) = self.valued_body(parts.expect(Rule::body)?, depth)?;
                Expr { kind: ExprKind::Per { group, body, value }, span }
            }
            Rule::block_expr => {
                let (body, value) = self.valued_body(self.parts(pair).expect(Rule::body)?, depth)?;
                Expr { kind: ExprKind::Block { body, value }, span }
            }
            other => return Err(internal(span, &format!("unexpected expression {other:?}"))),
        };
        if let Some(span) = paren_span {
            expr.span = span;
        }
        Ok(expr)
    }

    /// `operand (op operand)*`, folded to the left. Comparisons may not chain.
    fn binary_chain(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let is_comparison = pair.as_rule() == Rule::cmp_expr;
        let items: Vec<_> = pair.into_inner().collect();
        let n = items.len().div_ceil(2);
        self.check_depth(depth + n - 1, span)?;
        let mut items = items.into_iter();
        let first = items.next().ok_or_else(|| internal(span, "empty operator chain"))?;
        let mut acc = self.expr(first, depth + n - 1)?;
        let mut i = 1;
        while let Some(op_pair) = items.next() {
            let op_span = self.span(&op_pair);
            let op = binop(op_pair.as_rule()).ok_or_else(|| internal(op_span, "unknown operator"))?;
            if is_comparison && i == 2 {
                self.errors.push(
                    Diagnostic::error(op_span, "comparison operators cannot be chained")
                        .label("second comparison")
                        .hint("combine the comparisons with `and`, as in `a < b and b < c`"),
                );
            }
            let rhs = items.next().ok_or_else(|| internal(op_span, "operator without operand"))?;
            let rhs = self.expr(rhs, depth + n - i)?;
            acc = Expr {
                span: acc.span.to(rhs.span),
                kind: ExprKind::Binary { op, lhs: Box::new(acc), rhs: Box::new(rhs) },
            };
            i += 1;
        }
        Ok(acc)
    }

    /// `lo..hi`; a second `..` is reported and folded to the left.
    fn range(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let items: Vec<_> = pair.into_inner().filter(|p| p.as_rule() != Rule::op_range).collect();
        let n = items.len();
        self.check_depth(depth + n - 1, span)?;
        let mut items = items.into_iter();
        let first = items.next().ok_or_else(|| internal(span, "empty range"))?;
        let mut acc = self.expr(first, depth + n - 1)?;
        for (i, hi) in items.enumerate() {
            let hi = self.expr(hi, depth + n - 1 - i)?;
            if i == 1 {
                self.errors.push(
                    Diagnostic::error(acc.span.to(hi.span), "a range has exactly one `..`")
                        .label("ranges cannot be chained")
                        .hint("write `lo..hi`"),
                );
            }
            acc = Expr { span: acc.span.to(hi.span), kind: ExprKind::Range { lo: Box::new(acc), hi: Box::new(hi) } };
        }
        Ok(acc)
    }

    /// `not`/`-` prefixes, applied innermost first.
    fn prefix(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let mut items: Vec<_> = pair.into_inner().collect();
        let operand = items.pop().ok_or_else(|| internal(span, "prefix without operand"))?;
        self.check_depth(depth + items.len(), span)?;
        let mut acc = self.expr(operand, depth + items.len())?;
        for op in items.into_iter().rev() {
            let op_span = self.span(&op);
            let op = if op.as_rule() == Rule::kw_not { UnOp::Not } else { UnOp::Neg };
            acc = Expr { span: op_span.to(acc.span), kind: ExprKind::Unary { op, operand: Box::new(acc) } };
        }
        Ok(acc)
    }

    /// `base[i][j]...`, folded to the left.
    fn postfix(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let mut items = pair.into_inner();
        let base = items.next().ok_or_else(|| internal(span, "postfix without base"))?;
        let indices: Vec<_> = items.collect();
        let k = indices.len();
        self.check_depth(depth + k, span)?;
        let mut acc = self.expr(base, depth + k)?;
        for (j, index) in indices.into_iter().enumerate() {
            let end = self.span(&index).end;
            let index = self.parts(index).expect(Rule::expr)?;
            let index = self.expr(index, depth + k - j)?;
            acc = Expr {
                span: Span::new(self.file, acc.span.start, end),
                kind: ExprKind::Index { base: Box::new(acc), index: Box::new(index) },
            };
        }
        Ok(acc)
    }

    /// `x |> f(a) |> g`: each stage becomes a call with the value so far as first argument.
    fn pipe_chain(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let mut parts = self.parts(pair);
        let lhs = parts.next().ok_or_else(|| internal(span, "pipe without input"))?;
        let stages: Vec<_> = parts.items.collect();
        let n = stages.len();
        self.check_depth(depth + n, span)?;
        let mut acc = self.expr(lhs, depth + n)?;
        for (j, stage) in stages.into_iter().enumerate() {
            let stage_span = self.span(&stage);
            let target = self.parts(stage).next().ok_or_else(|| internal(stage_span, "empty pipe stage"))?;
            let (callee, mut args) = match target.as_rule() {
                Rule::call => self.call(target, depth + n - j)?,
                Rule::name => (self.ident(&target), Vec::new()),
                other => return Err(internal(stage_span, &format!("unexpected pipe stage {other:?}"))),
            };
            let span = acc.span.to(stage_span);
            args.insert(0, Arg { name: None, value: acc });
            acc = Expr { kind: ExprKind::Call { callee, args }, span };
        }
        Ok(acc)
    }

    /// `f(args)`, with arguments at `arg_depth`. A positional argument after a named one
    /// is reported and kept.
    fn call(&mut self, pair: Pair<Rule>, arg_depth: usize) -> Walk<(Ident, Vec<Arg>)> {
        let mut parts = self.parts(pair);
        let callee = self.ident(&parts.expect(Rule::name)?);
        let mut args = Vec::new();
        let mut first_named: Option<Span> = None;
        for arg in parts.items {
            let mut arg_parts = self.parts(arg);
            let name = arg_parts.eat(Rule::name).map(|n| self.ident(&n));
            let value = self.expr(arg_parts.expect(Rule::expr)?, arg_depth)?;
            match (&name, first_named) {
                (Some(n), None) => first_named = Some(n.span),
                (None, Some(named)) => self.errors.push(
                    Diagnostic::error(value.span, "positional argument after a named argument")
                        .label("positional argument")
                        .note(named, "the first named argument is here")
                        .hint("put positional arguments first, or name this one too (`name = value`)"),
                ),
                _ => {}
            }
            args.push(Arg { name, value });
        }
        Ok((callee, args))
    }

    /// `[a, b]` or `[elem for var in iter]`.
    fn list(&mut self, pair: Pair<Rule>, depth: usize) -> Walk<Expr> {
        let span = self.span(&pair);
        let items: Vec<_> = self.parts(pair).items.collect();
        if let [_, tail] = items.as_slice() {
            if tail.as_rule() == Rule::comp_tail {
                let mut items = items.into_iter();
                let (Some(elem), Some(tail)) = (items.next(), items.next()) else {
                    return Err(internal(span, "comprehension without parts"));
                };
                let elem = self.expr(elem, depth + 1)?;
                let mut tail = self.parts(tail);
                let var = self.ident(&tail.expect(Rule::name)?);
                let iter = self.expr(tail.expect(Rule::expr)?, depth + 1)?;
                let kind = ExprKind::Comprehension { elem: Box::new(elem), var, iter: Box::new(iter) };
                return Ok(Expr { kind, span });
            }
        }
        let elems = items.into_iter().map(|e| self.expr(e, depth + 1)).collect::<Walk<_>>()?;
        Ok(Expr { kind: ExprKind::List(elems), span })
    }

    // ---------------------------------------------------------------- literals

    fn int(&mut self, pair: &Pair<Rule>) -> i64 {
        pair.as_str().parse().unwrap_or_else(|_| {
            self.errors.push(
                Diagnostic::error(self.span(pair), "integer literal is too large")
                    .label("does not fit in 64 bits")
                    .hint(format!("integers go up to {}; write a float such as `1e20` for a larger number", i64::MAX)),
            );
            0
        })
    }

    fn float(&mut self, pair: &Pair<Rule>) -> f64 {
        match pair.as_str().parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                self.errors.push(
                    Diagnostic::error(self.span(pair), "number is too large")
                        .label("out of range for a 64-bit float")
                        .hint(format!("floats go up to about {:e}", f64::MAX)),
                );
                0.0
            }
        }
    }

    /// The value of a string literal (quotes included in `pair`), with escapes resolved.
    fn string(&mut self, pair: Pair<Rule>) -> String {
        let span = self.span(&pair);
        let raw = pair.as_str();
        let body = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')).unwrap_or(raw);
        let body_start = span.start + 1;
        let mut value = String::with_capacity(body.len());
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some((_, '"')) => value.push('"'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                other => {
                    let len = 1 + other.map_or(0, |(_, e)| e.len_utf8());
                    let at = body_start + i as u32;
                    let shown: String = body[i..i + len].to_string();
                    self.errors.push(
                        Diagnostic::error(
                            Span::new(self.file, at, at + len as u32),
                            format!("unknown escape `{shown}` in string"),
                        )
                        .label("unknown escape")
                        .hint("the escapes are `\\\"`, `\\\\`, `\\n` and `\\t`"),
                    );
                }
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracket_scan_skips_strings_and_comments() {
        let text = "f(\"(\", # (\n [x";
        let open = scan_brackets(text, text.len()).ok().unwrap();
        assert_eq!(open, vec![(b'(', 1), (b'[', 12)]);
        assert!(matches!(
            scan_brackets("a \"b\\\" c\nd", 10),
            Err(ScanProblem::UnterminatedString { start: 2, end: 8 })
        ));
        let deep = "(".repeat(MAX_NESTING + 1);
        assert!(matches!(scan_brackets(&deep, deep.len()), Err(ScanProblem::TooDeep { at }) if at == MAX_NESTING));
    }

    #[test]
    fn tokens_for_error_messages() {
        let text = "  # c\n  foo_1 + 0.5e3 |> \"s\\\"t\" é";
        let tok = |pos| {
            let (s, e) = token_at(text, pos);
            &text[s..e]
        };
        assert_eq!(tok(0), "foo_1");
        assert_eq!(tok(14), "+");
        assert_eq!(tok(16), "0.5e3");
        assert_eq!(tok(22), "|>");
        assert_eq!(tok(25), "\"s\\\"t\"");
        assert_eq!(tok(32), "é");
        assert_eq!(tok(text.len()), "");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
    }
}
