//! `mdl-runtime`: the IR (symbolic shapes, primitive ops, the dataflow graph), reverse-mode
//! autodiff over it, graph passes, and the backends that execute it.
//!
//! The compiler (`mdl`) depends on this crate; this crate never depends on the compiler,
//! so the IR and its backends can be built and tested on hand-written graphs.

pub mod autodiff;
pub mod backend;
pub mod checkpoint;
pub mod exec;
pub mod fuse;
pub mod init;
pub mod ir;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod passes;
pub mod rng;
pub mod rows;
pub mod tensor;
pub mod training;

pub use autodiff::{differentiate, AutodiffError};
pub use backend::Values;
pub use exec::{ExecError, Mode};
pub use ir::dim::{Binding, Dim, Shape};
pub use ir::graph::{Graph, Init, NodeId, ParamInfo};
pub use ops::{BinaryOp, Counter, DType, Op, ReduceOp, UnaryOp, ValueKind};
pub use tensor::{Float, Ids, Tensor, Value};
