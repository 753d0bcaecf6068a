//! `mdl-runtime`: the IR (symbolic shapes, primitive ops, the dataflow graph), reverse-mode
//! autodiff over it, graph passes, and the backends that execute it.
//!
//! The compiler (`mdl`) depends on this crate; this crate never depends on the compiler,
//! so the IR and its backends can be built and tested on hand-written graphs.

pub mod ir;
pub mod ops;

pub use ir::dim::{Binding, Dim, Shape};
pub use ir::graph::{Graph, Init, NodeId, ParamInfo};
pub use ops::{BinaryOp, DType, Op, ReduceOp, UnaryOp, ValueKind};
