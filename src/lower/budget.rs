//! The elaborator's budgets: a spec runs once at compile time, and its loops unroll and
//! its blocks inline into the graph, so a small file can ask for unbounded work (`for k in
//! 0..n` nested in another, blocks calling two blocks 64 deep). What this module owns:
//! the limits on loop iterations in total, on the forward graph's size and on loop
//! nesting, and the one error that reports the first loop (outermost, so the one the
//! spec's author wrote) that passed them. Once a budget is spent, every loop and call
//! after it stops quietly with that same error, so it is reported once.

use super::{Elab, R};
use crate::diag::{Diagnostic, Span};

/// The most loop iterations (of `for` and of comprehensions) one compilation unrolls.
pub(super) const MAX_ITERATIONS: usize = 1_000_000;
/// The most ops the forward graph may have.
pub(super) const MAX_GRAPH_OPS: usize = 50_000;
/// The most loops nested inside each other (blocks' loops included).
pub(super) const MAX_LOOP_NESTING: usize = 16;

/// What the elaborator has spent.
#[derive(Debug, Default)]
pub(super) struct Budget {
    iterations: usize,
    /// The loops being unrolled, outermost first.
    loops: Vec<Span>,
    /// The outermost block call being inlined (where a budget spent outside loops is
    /// reported).
    outer_call: Span,
    /// The error of a spent budget.
    spent: Option<crate::diag::Reported>,
}

impl Elab {
    /// Enters a loop at `span`, refusing one nested deeper than [`MAX_LOOP_NESTING`].
    pub(super) fn enter_loop(&mut self, span: Span) -> R<()> {
        if let Some(r) = self.budget.spent {
            return Err(r);
        }
        if self.budget.loops.len() >= MAX_LOOP_NESTING {
            let outer = self.budget.loops[0];
            let d = Diagnostic::error(span, format!("loops are nested more than {MAX_LOOP_NESTING} deep"))
                .label("this loop")
                .note(outer, "inside this loop");
            return Err(self.spend(d));
        }
        self.budget.loops.push(span);
        Ok(())
    }

    pub(super) fn leave_loop(&mut self) {
        self.budget.loops.pop();
    }

    /// Counts one iteration of the innermost loop; an error once the iterations or the
    /// graph's ops pass their budget.
    pub(super) fn loop_iteration(&mut self) -> R<()> {
        self.budget.iterations += 1;
        if self.budget.iterations > MAX_ITERATIONS {
            return Err(self.over_budget(format!(
                "loops run more than {MAX_ITERATIONS} iterations in all when unrolled (nested loops multiply)"
            )));
        }
        self.check_graph_size()
    }

    /// An error once the forward graph has more than [`MAX_GRAPH_OPS`] ops (checked at
    /// every loop iteration and block call, so that neither loops nor blocks that call
    /// several blocks can grow it without end).
    pub(super) fn check_graph_size(&mut self) -> R<()> {
        if let Some(r) = self.budget.spent {
            return Err(r);
        }
        if self.graph.len() > MAX_GRAPH_OPS {
            return Err(self.over_budget(format!("the model's graph passes {MAX_GRAPH_OPS} ops")));
        }
        Ok(())
    }

    /// Notes the block call at `span` being inlined at the model's level (`depth` 0).
    pub(super) fn enter_call(&mut self, span: Span) -> R<()> {
        if self.depth == 0 {
            self.budget.outer_call = span;
        }
        self.check_graph_size()
    }

    /// Reports a spent budget at the outermost loop being unrolled (or, outside loops, at
    /// the outermost block call being inlined).
    fn over_budget(&mut self, what: String) -> crate::diag::Reported {
        let d = match self.budget.loops.first() {
            Some(&outer) => Diagnostic::error(outer, format!("{what} while unrolling this loop"))
                .label("unrolled here")
                .hint("use fewer iterations (a smaller range or hyperparameter)"),
            None => Diagnostic::error(self.budget.outer_call, format!("{what} while inlining this call"))
                .label("inlined here")
                .hint("blocks that call several blocks multiply: call fewer"),
        };
        self.spend(d)
    }

    fn spend(&mut self, d: Diagnostic) -> crate::diag::Reported {
        let r = self.report(d);
        self.budget.spent = Some(r);
        r
    }
}
