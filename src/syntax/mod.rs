//! Surface syntax: the `.mdl` text → [`ast::Module`], with a [`Span`](crate::diag::Span)
//! on every node, or diagnostics saying in plain words what was expected where.
//!
//! The grammar itself lives in `grammar/mdl.pest`; [`parser`] runs it and walks the
//! result into the AST. Grammar decisions worth knowing when reading specs:
//!
//! - Statements need no separator (newlines are whitespace); `;` may end any statement.
//! - `|>` binds loosest and associates left: `a + b |> f(c)` is `f(a + b, c)`. Its right
//!   side is a call or a bare name (`x |> relu` is `relu(x)`).
//! - `categorical`, `numeric`, `domain` and `sequence` are keywords only after
//!   `input name :`, so `input domain : domain` and `per domain { ... }` read naturally.
//! - `else if` becomes an `If` alone in the `otherwise` of the `If` before it.
//! - Comparisons and ranges do not chain; positional arguments come before named ones.
//! - Nothing nests deeper than [`MAX_NESTING`] (brackets, or levels of the tree built),
//!   so that later recursive passes are safe on any input.

pub mod ast;
mod parser;

pub use parser::parse;

/// The deepest nesting the parser accepts, both of brackets in the text and of nodes in
/// the tree it builds; deeper input gets a diagnostic instead of a stack overflow.
pub const MAX_NESTING: usize = 256;
