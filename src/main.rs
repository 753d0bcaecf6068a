//! The `mdl` command line: check specs, show their graphs (and, with later subcommands,
//! train and evaluate them).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mdl", version, about = "Compiler and runtime for recommendation-model specs (.mdl)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check specs: syntax, names, arity, shapes and types, before any data is read.
    /// Exits 0 when every spec is clean, 1 with diagnostics.
    Check {
        /// Spec files (.mdl); with `--bind` alone, the experiment's spec
        #[arg(required_unless_present = "bind")]
        specs: Vec<PathBuf>,
        /// Override a hyperparameter, e.g. `--set dim=32` (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Check with the sizes of this experiment's data (`count(x)`, `rows(x)`, the
        /// domains) as numbers: from its schema, or, where the schema does not give a size
        /// a statement needs, from its prepared data (the cache, else reading it). The
        /// experiment's own spec is checked with its `model:` and `hyper:` as well
        #[arg(long, value_name = "EXPERIMENT.yaml")]
        bind: Option<PathBuf>,
    },
    /// Print the lowered dataflow graph of a spec, one op per line, or as Graphviz.
    Graph {
        /// Spec file (.mdl)
        spec: PathBuf,
        /// Include the backward graph (reverse-mode autodiff of the loss)
        #[arg(long)]
        backward: bool,
        /// Emit Graphviz `dot` text instead of the listing
        #[arg(long)]
        dot: bool,
        /// Override a hyperparameter, e.g. `--set dim=32` (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Train and evaluate an experiment; writes a run folder (metrics.json, curve.csv,
    /// checkpoints, log).
    Run {
        /// Experiment file (.yaml); not needed with --resume
        #[arg(required_unless_present = "resume")]
        experiment: Option<PathBuf>,
        /// Override any experiment key, e.g. `--set train.lr=0.01` (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The run folder (default: runs/<experiment name>, or -2, -3, ... when that holds a run)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the interrupted run in this folder from its last checkpoint
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Clear --out when it holds a run; with --resume, go on past a changed experiment,
        /// changed data or a checkpoint of another run (saying so)
        #[arg(long)]
        force: bool,
        /// Stop after this many steps, as if interrupted (for testing --resume)
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
        /// Train on this backend: jit, interp or opencl (default: the experiment's)
        #[arg(long)]
        backend: Option<String>,
        /// Train on OpenCL device N (as `mdl devices` numbers them; implies the opencl backend)
        #[arg(long, value_name = "N")]
        device: Option<usize>,
        /// Threads of the jit backend and of reading train (default: the machine's cores)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Measure compile time, training and evaluation throughput of an experiment's model
    /// on its real data (figures only).
    Bench {
        /// Experiment file (.yaml)
        experiment: PathBuf,
        /// Backend to measure (default: the experiment's)
        #[arg(long)]
        backend: Option<String>,
        /// Timed training steps (with `--compile-only`: how many times to compile)
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Only compile the spec to runnable plans, `--steps` times (the compile's minimum
        /// and median, the first plans and the cached ones); run no step
        #[arg(long)]
        compile_only: bool,
        /// Also list the N slowest nodes of the step, each with its shapes and where in the
        /// spec it comes from (timing each node adds a little to the step)
        #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "compile_only")]
        nodes: usize,
        /// Measure OpenCL device N (as `mdl devices` numbers them; implies the opencl backend)
        #[arg(long, value_name = "N")]
        device: Option<usize>,
        /// Override any experiment key (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Threads of the jit backend (default: the machine's cores)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Evaluate a run's best checkpoint on a file with the training schema; prints the
    /// metrics as JSON.
    Eval {
        /// Run folder written by `mdl run`
        run: PathBuf,
        /// CSV or CSV.gz file, `-` for stdin
        #[arg(long)]
        data: PathBuf,
        /// Read a run folder whose files do not match its manifest (saying so)
        #[arg(long)]
        force: bool,
        /// Threads of the jit backend (default: the machine's cores)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Score rows with a trained run: one output row per input row, with the kept columns
    /// and one probability per task. Labels (and the user column) may be absent.
    Predict {
        /// Run folder written by `mdl run`
        run: PathBuf,
        /// CSV or CSV.gz file of rows to score, `-` for stdin
        #[arg(long)]
        data: PathBuf,
        /// Output CSV (the kept columns, then one column per task), `-` for stdout
        #[arg(long)]
        out: PathBuf,
        /// Copy these input columns (e.g. ids) into the output before the scores
        #[arg(long, value_name = "COL,...", value_delimiter = ',')]
        keep: Vec<String>,
        /// A malformed row: `fail` (an error naming file:line) or `skip` (its scores are left
        /// empty and counted); default: the run's `data.bad_rows`
        #[arg(long, value_name = "fail|skip", value_parser = parse_bad_rows)]
        bad_rows: Option<mdl::data::BadRows>,
        /// A domain id train never had: `error` (naming file:line and the value) or a domain
        /// id of train to score the row as; default: the run's `data.unknown_domain`
        #[arg(long, value_name = "error|ID")]
        unknown_domain: Option<mdl::data::UnknownDomain>,
        /// Read a run folder whose files do not match its manifest (saying so)
        #[arg(long)]
        force: bool,
        /// Threads of the jit backend (default: the machine's cores)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
    },
    /// Serve a trained run over HTTP: POST /predict takes JSON rows of raw feature values
    /// and answers one probability per task per row; GET /health. Concurrent requests are
    /// scored together; SIGTERM / SIGINT stop it after answering the requests in flight.
    Serve {
        /// Run folder written by `mdl run`
        run: PathBuf,
        /// Address to listen on (port 0: any free port, said on stderr)
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
        addr: String,
        /// Request handler threads
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// How long to wait for more requests to score with the first one (0: only those
        /// that arrived while the previous batch was scored)
        #[arg(long, default_value_t = 0.0, value_name = "MS")]
        batch_window_ms: f64,
        /// Rows past which no more requests join a batch
        #[arg(long, default_value_t = 4096)]
        max_batch_rows: usize,
        /// The largest request body taken (larger is answered 413)
        #[arg(long, default_value_t = 16 << 20)]
        max_body_bytes: usize,
        /// Read a run folder whose files do not match its manifest (saying so)
        #[arg(long)]
        force: bool,
    },
    /// Load a running `mdl serve`: p50/p99 latency and rows/s per request size and
    /// concurrency, as a Markdown table (docs/serving.md).
    #[command(hide = true)]
    ServeBench {
        /// The server, e.g. http://127.0.0.1:8080
        url: String,
        /// CSV or CSV.gz file with the model's input columns
        #[arg(long)]
        data: PathBuf,
        /// Rows per request
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64, 512])]
        rows: Vec<usize>,
        /// Clients sending at once
        #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
        concurrency: Vec<usize>,
        /// Timed requests per cell
        #[arg(long, default_value_t = 400)]
        requests: usize,
        /// A cell stops sending after this many seconds
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// Export a trained run's model: `onnx` (the evaluation graph with its parameters, one
    /// probability per task, and beside it `<name>.features.json`, the vocabularies and
    /// normalisers that turn raw values into its inputs) or `safetensors` (the parameters
    /// by name). docs/serving.md describes both.
    Export {
        /// Run folder written by `mdl run`
        run: PathBuf,
        /// `onnx` or `safetensors`
        #[arg(long, value_name = "onnx|safetensors")]
        format: mdl::export::Format,
        /// The file to write (e.g. model.onnx)
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Read a run folder whose files do not match its manifest (saying so)
        #[arg(long)]
        force: bool,
    },
    /// List the OpenCL platforms and devices (`--backend opencl` takes the first GPU, else
    /// the first device; `--device N` picks another).
    Devices,
    /// GFLOP/s of the jit's f32 and bf16 matrix products on CTR models' shapes, and of a
    /// product with its bias-and-relu epilogue applied by row blocks (docs/performance.md).
    #[command(hide = true)]
    ProductsBench {
        /// Threads (default: the machine's cores)
        #[arg(long)]
        threads: Option<usize>,
        /// Timed repetitions per product (the best is reported)
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// The fuzz bench: mutated specs, experiments, CSV rows, checkpoints and run folders,
    /// counting panics, aborts, hangs and silent wrong results per input kind
    /// (docs/reliability.md).
    #[command(hide = true)]
    Fuzz {
        /// Input kinds (default: all): spec, yaml, csv, checkpoint, run-folder
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Cases per kind (with --from: the case to stop before)
        #[arg(long, default_value_t = 1000)]
        cases: u64,
        /// The first case
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 21)]
        seed: u64,
        /// A case running longer than this is a hang
        #[arg(long, default_value_t = 10.0)]
        budget_secs: f64,
        /// Include the inputs of findings still being fixed
        #[arg(long)]
        known: bool,
        /// Kinds run at once
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Stop starting cases of a kind after this many seconds
        #[arg(long)]
        secs_per_kind: Option<f64>,
        /// The repository (specs/, data/); default: the current folder
        #[arg(long)]
        root: Option<PathBuf>,
        /// Scratch folder (default: a folder in the system's temporary folder)
        #[arg(long)]
        work: Option<PathBuf>,
        /// Run the cases in this process, reporting each (what the bench's children do)
        #[arg(long)]
        worker: bool,
    },
    /// Print a Markdown table comparing finished runs: test AUC, gAUC, LogLoss, per-task
    /// and largest-domain AUC, parameters, train rows/s, epochs. With --html, also write
    /// one self-contained page with the table and SVG plots (learning curves of every
    /// task, training loss, per-domain AUC, the plots of `mdl analyze`).
    Report {
        /// Run folders written by `mdl run`
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Write the HTML page here
        #[arg(long, value_name = "OUT.html")]
        html: Option<PathBuf>,
    },
    /// Analyse a finished run: the singular spectrum and information abundance of every
    /// embedding table (against its initial values), and the mean values of the model's
    /// probes (gate utilisation) on the test split, overall and per domain. Prints them
    /// and writes analysis.json in the run folder.
    Analyze {
        /// A run folder written by `mdl run`
        run: PathBuf,
        #[command(flatten)]
        options: mdl::analysis::Options,
    },
}

use mdl::experiment::parse_threads;

fn parse_bad_rows(text: &str) -> Result<mdl::data::BadRows, String> {
    match text {
        "fail" => Ok(mdl::data::BadRows::Fail),
        "skip" => Ok(mdl::data::BadRows::Skip),
        _ => Err(format!("expected `fail` or `skip`, found `{text}`")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Output goes through writers that end a command quietly when its reader has gone
    // (`mdl graph ... | head -1`), and messages through `say!`, which drops what a closed
    // stderr cannot take. A closed-pipe panic from a stray `eprintln!` is the same case
    // (no report, success); it stays caught here as a backstop.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_pipe(info.payload()) {
            report_panic(info)
        }
    }));
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Check { specs, set, bind } => mdl::cli::check(&specs, &set, bind.as_deref()),
        Command::Graph { spec, backward, dot, set } => mdl::cli::graph(&spec, backward, dot, &set),
        Command::Run { experiment, mut set, out, resume, stop_after, backend, device, force, threads } => {
            if let Some(n) = threads {
                set.push(format!("train.threads={n}"));
            }
            if let Some(b) = backend {
                set.push(format!("backend={b}"));
            }
            if let Some(n) = device {
                set.push(format!("backend=opencl:{n}"));
            }
            mdl::cli::run(experiment.as_deref(), &set, out, resume, stop_after, force)
        }
        Command::Eval { run, data, force, threads } => mdl::cli::eval(&run, &data, force, threads),
        Command::Bench { experiment, backend, steps, compile_only, nodes, mut set, device, threads } => {
            if let Some(n) = threads {
                set.push(format!("train.threads={n}"));
            }
            let backend = match device {
                Some(n) => Some(format!("opencl:{n}")),
                None => backend,
            };
            mdl::cli::bench(&experiment, backend, steps, compile_only, nodes, &set)
        }
        Command::Devices => mdl::cli::devices(),
        Command::ProductsBench { threads, reps } => mdl::cli::products_bench(threads, reps),
        Command::Predict { run, data, out, keep, bad_rows, unknown_domain, force, threads } => {
            let options = mdl::predict::PredictOptions { data, out, keep, bad_rows, unknown_domain, force, threads };
            mdl::cli::predict(&run, &options)
        }
        Command::Serve { run, addr, threads, batch_window_ms, max_batch_rows, max_body_bytes, force } => {
            mdl::cli::serve(&run, addr, threads, batch_window_ms, (max_batch_rows, max_body_bytes), force)
        }
        Command::ServeBench { url, data, rows, concurrency, requests, seconds } => {
            let options = mdl::serve::load::LoadOptions { url, data, rows, concurrency, requests, seconds };
            mdl::cli::serve_bench(&options)
        }
        Command::Export { run, format, out, force } => mdl::cli::export(&run, format, &out, force),
        Command::Report { runs, html } => mdl::cli::report(&runs, html.as_deref()),
        Command::Analyze { run, options } => mdl::cli::analyze(&run, &options),
        Command::Fuzz { kinds, cases, from, seed, budget_secs, known, jobs, secs_per_kind, root, work, worker } => {
            let args = mdl::cli::FuzzArgs {
                kinds,
                cases,
                from,
                seed,
                budget_secs,
                known,
                jobs,
                secs_per_kind,
                root,
                work,
                worker,
            };
            mdl::cli::fuzz(args)
        }
    });
    match result {
        Ok(code) => code,
        Err(payload) if is_closed_pipe(payload.as_ref()) => ExitCode::SUCCESS,
        Err(_) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "internal error: mdl crashed; please report this with the input that caused it"
            );
            ExitCode::from(101)
        }
    }
}

/// Whether a panic is the standard library's on writing to a pipe whose reader has gone
/// ("failed printing to stderr: Broken pipe").
fn is_closed_pipe(payload: &(dyn std::any::Any + Send)) -> bool {
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    message.starts_with("failed printing to") && message.contains("Broken pipe")
}
