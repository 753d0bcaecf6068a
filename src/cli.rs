//! The subcommands behind `mdl`: each takes parsed arguments and returns the exit code.

use crate::diag::{render_all, SourceMap};
use crate::lower::{compile_file, Compiled, Hyper};
use mdl_runtime::{autodiff, passes};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

/// Parses `key=value` overrides; values are YAML scalars or lists (`16`, `0.1`, `"relu"`, `[64, 32]`).
pub fn parse_overrides(set: &[String]) -> Result<BTreeMap<String, Hyper>, String> {
    let mut out = BTreeMap::new();
    for s in set {
        let Some((k, v)) = s.split_once('=') else {
            return Err(format!("`--set {s}`: expected KEY=VALUE"));
        };
        let y: serde_yaml::Value = serde_yaml::from_str(v).map_err(|e| format!("`--set {s}`: {e}"))?;
        out.insert(k.trim().to_string(), yaml_to_hyper(&y).ok_or_else(|| format!("`--set {s}`: not a number, string, boolean or list"))?);
    }
    Ok(out)
}

/// A YAML value as a hyperparameter.
pub fn yaml_to_hyper(v: &serde_yaml::Value) -> Option<Hyper> {
    use serde_yaml::Value as Y;
    Some(match v {
        Y::Bool(b) => Hyper::Bool(*b),
        Y::Number(n) => match n.as_i64() {
            Some(i) => Hyper::Int(i),
            None => Hyper::Float(n.as_f64()?),
        },
        Y::String(s) => Hyper::Str(s.clone()),
        Y::Sequence(items) => Hyper::List(items.iter().map(yaml_to_hyper).collect::<Option<Vec<_>>>()?),
        _ => return None,
    })
}

fn compile_reporting(map: &mut SourceMap, spec: &Path, overrides: &BTreeMap<String, Hyper>) -> Option<Compiled> {
    match compile_file(map, spec, None, overrides) {
        Ok(c) => Some(c),
        Err(diags) => {
            eprint!("{}", render_all(map, &diags));
            None
        }
    }
}

/// `mdl check SPEC...`
pub fn check(specs: &[std::path::PathBuf], set: &[String]) -> ExitCode {
    let overrides = match parse_overrides(set) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = 0;
    for spec in specs {
        let mut map = SourceMap::new();
        let t = Instant::now();
        if let Some(blocks) = library_blocks(spec) {
            println!("ok: {} (a library of {blocks} blocks, no model; its blocks are checked where a model uses them)", spec.display());
            continue;
        }
        match compile_reporting(&mut map, spec, &overrides) {
            Some(c) => {
                let params = c.graph.params.len();
                println!(
                    "ok: {} (model {}, {} tasks, {} parameter tensors, {} ops) in {:.1} ms",
                    spec.display(),
                    c.model,
                    c.tasks.len(),
                    params,
                    c.graph.len(),
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            None => failed += 1,
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} spec(s) failed the check", specs.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The number of blocks when `spec` parses and defines blocks but no model.
fn library_blocks(spec: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(spec).ok()?;
    let mut map = SourceMap::new();
    let file = map.add(spec.display().to_string(), text);
    let m = crate::syntax::parse(&map, file).ok()?;
    let models = m.items.iter().filter(|i| matches!(i, crate::syntax::ast::Item::Model(_))).count();
    let blocks = m.items.iter().filter(|i| matches!(i, crate::syntax::ast::Item::Block(_))).count();
    (models == 0 && blocks > 0).then_some(blocks)
}

/// `mdl graph SPEC [--backward] [--dot]`
pub fn graph(spec: &Path, backward: bool, dot: bool, set: &[String]) -> ExitCode {
    let overrides = match parse_overrides(set) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut map = SourceMap::new();
    let Some(c) = compile_reporting(&mut map, spec, &overrides) else {
        return ExitCode::from(1);
    };
    let g = if backward {
        match build_training_graph(&c) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        passes::optimize(&c.graph)
    };
    if dot {
        print!("{}", g.to_dot());
    } else {
        println!("# model {} — shapes are symbolic: B = batch, count(x) = columns of input x, rows(x) = its vocabulary", c.model);
        print!("{}", g.listing());
    }
    ExitCode::SUCCESS
}

/// The forward graph with the gradient of the loss for every parameter, optimised.
pub fn build_training_graph(c: &Compiled) -> Result<mdl_runtime::Graph, String> {
    let loss = *c.graph.outputs.get("loss").ok_or("the model has no loss output")?;
    let wrt: Vec<String> = c.graph.params.iter().map(|p| p.name.clone()).collect();
    let g = autodiff::differentiate(&c.graph, loss, &wrt).map_err(|e| e.to_string())?;
    Ok(passes::optimize(&g))
}
