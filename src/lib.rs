//! `mdl`: the compiler for recommendation-model specs and the pieces around it
//! (see DESIGN.md for the pipeline: syntax → lower (check + lower) → runtime graph).

pub mod bench;
pub mod cli;
pub mod data;
pub mod diag;
pub mod experiment;
pub mod lower;
pub mod metrics;
pub mod report;
pub mod syntax;
pub mod train;
