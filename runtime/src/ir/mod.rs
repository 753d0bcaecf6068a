//! The intermediate representation: symbolic dimensions and the dataflow graph.

pub mod dim;
pub mod graph;
