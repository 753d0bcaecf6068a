//! The subcommands behind `mdl`: each takes parsed arguments and returns the exit code.

use crate::diag::{render_all, SourceMap};
use crate::experiment::yaml_to_hyper;
use crate::lower::{compile_file, compile_file_sized, Compiled, Hyper, Sizes};
use mdl_runtime::passes;
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
        out.insert(k.trim().to_string(), yaml_to_hyper(&y).map_err(|e| format!("`--set {s}`: {e}"))?);
    }
    Ok(out)
}

fn compile_reporting(map: &mut SourceMap, spec: &Path, overrides: &BTreeMap<String, Hyper>) -> Option<Compiled> {
    match compile_file(map, spec, None, overrides) {
        Ok(c) => Some(c),
        Err(diags) => {
            crate::say_partial!("{}", render_all(map, &diags));
            None
        }
    }
}

/// The sizes `mdl check --bind EXPERIMENT.yaml` checks with: the schema's at once, the
/// prepared data's once a spec needs a size the schema does not give.
struct BoundSizes {
    experiment: crate::experiment::Experiment,
    path: std::path::PathBuf,
    sizes: Sizes,
    prepared: bool,
}

impl BoundSizes {
    fn load(path: &Path) -> Result<BoundSizes, String> {
        let experiment = crate::experiment::load(path, &[])?;
        let sizes = crate::train::bind::schema_sizes(&experiment.data.schema);
        Ok(BoundSizes { experiment, path: path.to_path_buf(), sizes, prepared: false })
    }

    /// Whether `spec` is the experiment's own spec (the same file): then it is checked as
    /// `mdl run` compiles it, with the experiment's `model:` and `hyper:` too.
    fn is_own_spec(&self, spec: &Path) -> bool {
        match (std::fs::canonicalize(spec), std::fs::canonicalize(&self.experiment.spec)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// Compiles `spec` with the schema's sizes, and, when a statement needs one that only
    /// the data gives, prepares the data (saying so) and compiles with all of them. The
    /// experiment's own spec gets its `model:` and `hyper:` under the `--set` overrides,
    /// so that `--bind` checks the model the experiment runs (`with_watch: true` adds a
    /// task); another spec gets the sizes only.
    fn compile(&mut self, map: &mut SourceMap, spec: &Path, set: &BTreeMap<String, Hyper>) -> Option<Compiled> {
        let own = self.is_own_spec(spec);
        let mut overrides = BTreeMap::new();
        if own {
            match self.experiment.hyper_overrides() {
                Ok(h) => overrides = h,
                Err(e) => {
                    crate::say!("error: {}: {e}", self.path.display());
                    return None;
                }
            }
        }
        overrides.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        let overrides = &overrides;
        let model = if own { self.experiment.model.clone() } else { None };
        let model = model.as_deref();
        let mut result = compile_file_sized(map, spec, model, overrides, &self.sizes);
        if let Err(failed) = &result {
            if !failed.needs.is_empty() && !self.prepared {
                let needs: Vec<&str> = failed.needs.iter().map(String::as_str).collect();
                crate::say!(
                    "{}: needs {} from the data, which the schema of {} does not give: preparing its data (the cache when it has one)",
                    spec.display(),
                    needs.join(", "),
                    self.path.display()
                );
                let prepared = self.experiment.split_files().and_then(|paths| {
                    crate::data::prepare(&self.experiment.data.schema, &paths, &self.experiment.data.prepare_options())
                        .map_err(|e| e.to_string())
                });
                match prepared {
                    Ok(prep) => {
                        crate::say!("data prepared ({})", prep.stats.cache_summary());
                        self.sizes = crate::train::bind::fitted_sizes(&prep.fitted);
                        self.prepared = true;
                        *map = SourceMap::new();
                        result = compile_file_sized(map, spec, model, overrides, &self.sizes);
                    }
                    Err(e) => {
                        crate::say!("error: {}: {e}", self.path.display());
                        return None;
                    }
                }
            }
        }
        match result {
            Ok(c) => Some(c),
            Err(failed) => {
                crate::say_partial!("{}", render_all(map, &failed.diagnostics));
                None
            }
        }
    }
}

/// `mdl check SPEC... [--bind EXPERIMENT.yaml]`
pub fn check(specs: &[std::path::PathBuf], set: &[String], bind: Option<&Path>) -> ExitCode {
    let overrides = match parse_overrides(set) {
        Ok(o) => o,
        Err(e) => {
            crate::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut bound = match bind.map(BoundSizes::load).transpose() {
        Ok(b) => b,
        Err(e) => {
            crate::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `mdl check --bind EXPERIMENT.yaml` alone checks the experiment's own spec.
    let own_spec;
    let specs = match (specs, bound.as_ref()) {
        ([], Some(b)) => {
            own_spec = [b.experiment.spec.clone()];
            &own_spec[..]
        }
        ([], None) => {
            crate::say!("error: give the spec files to check, or `--bind EXPERIMENT.yaml` to check its spec");
            return ExitCode::from(2);
        }
        (given, _) => given,
    };
    let mut failed = 0;
    for spec in specs {
        let mut map = SourceMap::new();
        let t = Instant::now();
        if let Some(blocks) = library_blocks(spec) {
            if let Err(code) = emit(format_args!(
                "ok: {} (a library of {blocks} blocks, no model; its blocks are checked where a model uses them)\n",
                spec.display()
            )) {
                return code;
            }
            continue;
        }
        let compiled = match bound.as_mut() {
            Some(b) => b.compile(&mut map, spec, &overrides),
            None => compile_reporting(&mut map, spec, &overrides),
        };
        let with = bound
            .as_ref()
            .map(|b| {
                let what = if b.is_own_spec(spec) { "sizes and hyperparameters" } else { "sizes" };
                format!(", with the {what} of {}", b.path.display())
            })
            .unwrap_or_default();
        match compiled {
            Some(c) => match crate::train::memory::check_spec(&c).and_then(|()| {
                crate::train::build_training_graph(&c).map_err(|e| format!("the backward graph could not be built: {e}"))
            }) {
                Ok(g) => {
                    if let Err(code) = emit(format_args!(
                        "ok: {} (model {}, {} tasks, {} parameter tensors, {} forward ops, {} ops with backward{with}) in {:.1} ms\n",
                        spec.display(),
                        c.model,
                        c.tasks.len(),
                        c.graph.params.len(),
                        c.graph.len(),
                        g.len(),
                        t.elapsed().as_secs_f64() * 1e3
                    )) {
                        return code;
                    }
                }
                Err(e) => {
                    crate::say!("error: {}: {e}", spec.display());
                    failed += 1;
                }
            },
            None => failed += 1,
        }
    }
    if failed > 0 {
        crate::say!("{failed} of {} spec(s) failed the check", specs.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The number of blocks when `spec` parses and defines blocks but no model.
fn library_blocks(spec: &Path) -> Option<usize> {
    let text = crate::files::read_text(spec).ok()?;
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
            crate::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut map = SourceMap::new();
    let Some(c) = compile_reporting(&mut map, spec, &overrides) else {
        return ExitCode::from(1);
    };
    let g = if backward {
        match crate::train::build_training_graph(&c) {
            Ok(g) => g,
            Err(e) => {
                crate::say!("error: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        passes::optimize(&c.graph)
    };
    let written = if dot {
        emit(format_args!("{}", g.to_dot()))
    } else {
        emit(format_args!(
            "# model {} — shapes are symbolic: B = batch, count(x) = columns of input x, rows(x) = its vocabulary\n{}",
            c.model,
            g.listing()
        ))
    };
    written.err().unwrap_or(ExitCode::SUCCESS)
}

/// Writes a command's output to stdout. A reader that has gone (`mdl graph ... | head -1`)
/// ends the command quietly with success, as other Unix tools end on a closed pipe: the
/// error is the exit code to return (success then; 1 after reporting any other failure).
fn emit(text: std::fmt::Arguments<'_>) -> Result<(), ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ExitCode::SUCCESS),
        Err(e) => Err(fail(&format!("cannot write the output: {e}"))),
    }
}

pub(crate) fn fail(msg: &str) -> ExitCode {
    // Rendered spec diagnostics come with their own `error:` heading.
    if msg.starts_with("error: ") {
        crate::say_partial!("{msg}");
    } else {
        crate::say!("error: {msg}");
    }
    ExitCode::from(1)
}

/// The experiment `mdl run --resume DIR` continues: the run's config.yaml, checked against
/// the folder's manifest (unless `force`), with `set` applied.
pub fn resumed_experiment(dir: &Path, set: &[String], force: bool) -> Result<crate::experiment::Experiment, String> {
    let trust = crate::train::folder::Trust { force };
    crate::train::folder::ReadFolder::open(dir, trust).and_then(|f| f.read("config.yaml"))?;
    crate::experiment::load(&dir.join("config.yaml"), set)
}

/// `mdl run EXPERIMENT [--set k=v] [--out DIR] [--force]` or `mdl run --resume RUN_DIR`
pub fn run(
    experiment: Option<&Path>,
    set: &[String],
    out: Option<std::path::PathBuf>,
    resume: Option<std::path::PathBuf>,
    stop_after: Option<u64>,
    force: bool,
) -> ExitCode {
    // Under `mpirun`, one rank of a data-parallel run (MPI is finished when `world` drops).
    let world = match crate::dist::World::init() {
        Ok(world) => world,
        Err(e) => return fail(&e),
    };
    let (mut exp, out) = match (&resume, experiment) {
        (Some(dir), _) => match resumed_experiment(dir, set, force) {
            Ok(e) => (e, Some(dir.clone())),
            Err(e) => return world.fail(&e),
        },
        (None, Some(path)) => match crate::experiment::load(path, set) {
            Ok(e) => (e, out),
            Err(e) => return world.fail(&e),
        },
        (None, None) => return world.fail("give an experiment file or --resume RUN_DIR"),
    };
    let group = world.group();
    // Ranks on one machine share its cores.
    if group.size() > 1 && exp.train.threads.is_none() {
        let cores = mdl_runtime::backend::jit::default_threads();
        exp.train.threads = Some((cores / group.ranks_on_this_machine()).max(1));
    }
    let opts = crate::train::RunOptions { out, resume: resume.is_some(), force, stop_after };
    match crate::train::train_in(&exp, &opts, group) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => world.fail(&e),
    }
}

/// `mdl eval RUN_DIR --data FILE|- [--force] [--threads N]`
pub fn eval(run: &Path, data: &Path, force: bool, threads: Option<usize>) -> ExitCode {
    let result = (|| -> Result<String, String> {
        let trust = crate::train::folder::Trust { force };
        let crate::train::LoadedRun { experiment: exp, fitted, session, params } = crate::train::open_run(run, trust)?;
        // Encoded block by block into a temporary file: memory holds only what metrics need.
        let ds = fitted.encode_file_stored(data, exp.data.encode_options()).map_err(|e| e.to_string())?;
        let mut exec = exp.backend.executor_on(threads)?;
        let report = session.evaluate(exec.as_mut(), &params, &ds, exp.train.batch_size)?;
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
    })();
    match result {
        Ok(json) => emit(format_args!("{json}\n")).err().unwrap_or(ExitCode::SUCCESS),
        Err(e) => fail(&e),
    }
}

/// `mdl predict RUN_DIR --data FILE|- --out FILE|- [--keep COL,...] [--bad-rows P]
/// [--unknown-domain P] [--force]`: the scores on `--out`, what was done on stderr.
pub fn predict(run: &Path, options: &crate::predict::PredictOptions) -> ExitCode {
    match crate::predict::predict(run, options) {
        Ok(done) if done.reader_gone => ExitCode::SUCCESS,
        Ok(done) => {
            let to =
                if options.out == Path::new("-") { "stdout".to_string() } else { options.out.display().to_string() };
            crate::say!("wrote {} rows of scores to {to}", done.rows);
            let skipped = &done.skipped;
            if skipped.count > 0 {
                crate::say!(
                    "skipped {} malformed row{} (bad_rows: skip): {} scores are empty; first: {}",
                    skipped.count,
                    if skipped.count == 1 { "" } else { "s" },
                    if skipped.count == 1 { "its" } else { "their" },
                    skipped.examples.first().map_or("", String::as_str)
                );
            }
            if done.domain_fallbacks > 0 {
                crate::say!(
                    "scored {} row{} with a domain id train never had as domain {} (unknown_domain: {})",
                    done.domain_fallbacks,
                    if done.domain_fallbacks == 1 { "" } else { "s" },
                    done.unknown_domain,
                    done.unknown_domain
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `mdl serve RUN_DIR [--addr HOST:PORT] [--threads N] [--batch-window-ms MS]
/// [--max-batch-rows N] [--max-body-bytes N] [--force]`: until SIGTERM / SIGINT.
pub fn serve(
    run: &Path,
    addr: String,
    threads: usize,
    batch_window_ms: f64,
    (max_batch_rows, max_body_bytes): (usize, usize),
    force: bool,
) -> ExitCode {
    let Ok(batch_window) = std::time::Duration::try_from_secs_f64(batch_window_ms / 1e3) else {
        return fail(&format!("--batch-window-ms {batch_window_ms}: expected a non-negative number of milliseconds"));
    };
    let options = crate::serve::ServeOptions { addr, threads, batch_window, max_batch_rows, max_body_bytes, force };
    match crate::serve::serve(run, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `mdl serve-bench URL --data FILE [--rows 1,64,512] [--concurrency 1,4,16]` (hidden).
pub fn serve_bench(options: &crate::serve::load::LoadOptions) -> ExitCode {
    match crate::serve::load::run(options) {
        Ok(cells) => emit(format_args!("{}", crate::serve::load::markdown(&cells))).err().unwrap_or(ExitCode::SUCCESS),
        Err(e) => fail(&e),
    }
}

/// `mdl products-bench [--threads N] [--reps N]` (hidden).
pub fn products_bench(threads: Option<usize>, reps: usize) -> ExitCode {
    use mdl_runtime::backend::jit::{default_threads, speed};
    let threads = threads.unwrap_or_else(default_threads);
    if let Err(e) = crate::experiment::check_threads("--threads", threads) {
        return fail(&e);
    }
    let report = speed::measure(&speed::ctr_shapes(), threads, reps);
    emit(format_args!("{report}")).err().unwrap_or(ExitCode::SUCCESS)
}

/// `mdl export RUN --format onnx|safetensors -o FILE`
pub fn export(run: &Path, format: crate::export::Format, out: &Path, force: bool) -> ExitCode {
    match crate::export::export(run, format, out, force) {
        Ok(done) => {
            let files: Vec<String> = done.files.iter().map(|f| f.display().to_string()).collect();
            let what = match format {
                crate::export::Format::Onnx => "inputs",
                crate::export::Format::Safetensors => "parameters",
            };
            crate::say!("wrote {} ({} {what}: {})", files.join(" and "), done.names.len(), done.names.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `mdl bench EXPERIMENT [--backend B] [--steps N] [--nodes N]`
pub fn bench(
    experiment: &Path,
    backend: Option<String>,
    steps: usize,
    compile_only: bool,
    nodes: usize,
    set: &[String],
) -> ExitCode {
    let mut set = set.to_vec();
    if let Some(b) = backend {
        set.push(format!("backend={b}"));
    }
    let exp = match crate::experiment::load(experiment, &set) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let report = if compile_only {
        crate::bench::bench_compile(&exp, steps).map(|r| r.to_string())
    } else {
        crate::bench::bench(&exp, steps, nodes).map(|r| r.to_string())
    };
    match report {
        Ok(r) => emit(format_args!("{r}")).err().unwrap_or(ExitCode::SUCCESS),
        Err(e) => fail(&e),
    }
}

/// `mdl devices`: the OpenCL platforms and devices, numbered as `--device N` takes them.
pub fn devices() -> ExitCode {
    #[cfg(feature = "opencl")]
    {
        use mdl_runtime::backend::opencl;
        match opencl::devices() {
            Ok(list) if list.is_empty() => {
                emit(format_args!("OpenCL platforms are installed, but they list no devices\n"))
                    .err()
                    .unwrap_or(ExitCode::FAILURE)
            }
            Ok(list) => {
                let default = list.iter().find(|d| d.kind == "GPU").map_or(0, |d| d.index);
                for d in &list {
                    let line = emit(format_args!(
                        "{}: {} ({}, {} compute units, {:.1} GiB) on {}{}\n",
                        d.index,
                        d.name,
                        d.kind,
                        d.compute_units,
                        d.global_mem_bytes as f64 / (1u64 << 30) as f64,
                        d.platform,
                        if d.index == default { "  [default]" } else { "" }
                    ));
                    if let Err(code) = line {
                        return code;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        }
    }
    #[cfg(not(feature = "opencl"))]
    {
        fail(crate::backends::NO_OPENCL_FEATURE)
    }
}

/// `mdl report RUN_DIR... [--html OUT.html]`: a Markdown table of finished runs on stdout,
/// and with `html` the HTML page with plots, written atomically.
pub fn report(runs: &[std::path::PathBuf], html: Option<&Path>) -> ExitCode {
    let summaries: Result<Vec<_>, String> = runs.iter().map(|r| crate::report::summarize(r)).collect();
    let summaries = match summaries {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Some(out) = html {
        let written = crate::report::html::page(runs).and_then(|page| crate::files::write_atomic(out, page.as_bytes()));
        if let Err(e) = written {
            return fail(&e);
        }
        crate::say!("wrote {}", out.display());
    }
    emit(format_args!("{}", crate::report::markdown(&summaries))).err().unwrap_or(ExitCode::SUCCESS)
}

/// `mdl analyze RUN_DIR [--table T]... [--probe P]... [--force] [--threads N]`: the
/// analysis as text on stdout, analysis.json in the run folder.
pub fn analyze(run: &Path, opts: &crate::analysis::Options) -> ExitCode {
    match crate::analysis::analyze(run, opts) {
        Ok(a) => {
            crate::say!("wrote {}", run.join("analysis.json").display());
            emit(format_args!("{}", crate::analysis::render(&a))).err().unwrap_or(ExitCode::SUCCESS)
        }
        Err(e) => fail(&e),
    }
}

/// The arguments of `mdl fuzz` (hidden; see [`crate::fuzz`]).
pub struct FuzzArgs {
    pub kinds: Vec<String>,
    pub cases: u64,
    pub from: u64,
    pub seed: u64,
    pub budget_secs: f64,
    pub known: bool,
    pub jobs: usize,
    pub secs_per_kind: Option<f64>,
    pub root: Option<std::path::PathBuf>,
    pub work: Option<std::path::PathBuf>,
    pub worker: bool,
}

/// `mdl fuzz [--kind K]... [--cases N] [--seed S] [--budget-secs T] [--known] [--jobs J]`:
/// prints the table of cases, panics, aborts, hangs and silent wrong results per kind;
/// exits 1 when there is any.
pub fn fuzz(args: FuzzArgs) -> ExitCode {
    use crate::fuzz::{supervise, Kind};
    let kinds: Result<Vec<Kind>, String> = if args.kinds.is_empty() {
        Ok(Kind::ALL.to_vec())
    } else {
        args.kinds.iter().map(|k| Kind::parse(k)).collect()
    };
    let kinds = match kinds {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    if !(args.budget_secs.is_finite() && args.budget_secs > 0.0) {
        return fail("--budget-secs: must be a positive number of seconds");
    }
    let work = args.work.unwrap_or_else(|| std::env::temp_dir().join(format!("mdl-fuzz-{}", std::process::id())));
    let opts = supervise::Options {
        kinds: kinds.clone(),
        from: args.from,
        cases: args.cases,
        seed: args.seed,
        budget: std::time::Duration::from_secs_f64(args.budget_secs),
        known: args.known,
        jobs: args.jobs,
        secs_per_kind: args.secs_per_kind,
        root: args.root.unwrap_or_else(supervise::default_root),
        work,
    };
    if args.worker {
        let [kind] = kinds.as_slice() else {
            return fail("--worker runs one --kind");
        };
        return match supervise::worker(*kind, opts.from, opts.cases, &opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    match supervise::supervise(&opts) {
        Ok(results) => {
            print!("{}", supervise::render(&results, &opts));
            let _ = std::fs::remove_dir_all(&opts.work);
            if results.iter().any(|(_, t)| t.failures() > 0) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(&e),
    }
}
