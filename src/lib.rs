//! `mdl`: the compiler for recommendation-model specs and the pieces around it: syntax →
//! lower (check and lower in one walk) → the runtime's graph, and the experiments, data,
//! training, metrics and command line that use it. docs/architecture.md draws the pipeline.

pub mod analysis;
pub mod backends;
pub mod bench;
pub mod cli;
pub mod cputime;
pub mod data;
pub mod diag;
pub mod dist;
pub mod experiment;
pub mod export;
pub mod files;
pub mod fuzz;
pub mod lower;
pub mod metrics;
pub mod predict;
pub mod report;
pub mod score;
pub mod serve;
pub mod syntax;
pub mod tasks;
pub mod train;
