//! The clean inputs every fuzz case mutates, made once per process in a work folder: a
//! tiny slice of the bundled KuaiRand data (60 train, 30 valid, 30 test rows), a two-file
//! experiment over it (DeepFM at dim 4 on the interp backend, a few steps), two finished
//! runs of it (seeds 7 and 8), one interrupted after 2 steps, and the clean results the
//! cases compare against: eval's report, predict's scores, report's table, checkpoints'
//! contents.

use super::{case_dir, Kind};
use crate::data::BadRows;
use crate::train::{self, LoadedRun, RunOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Rows of each split taken from the bundled train file.
const TRAIN_ROWS: usize = 60;
const HELD_OUT_ROWS: usize = 30;

/// The experiment's base file: the schema and the training settings.
const BASE_YAML: &str = "\
data:
  bad_rows: fail
  schema:
    features:
      - kind: categorical
        name: fields
        columns: [domain, user_id, video_id, author_id, hour, video_type, user_active_degree, onehot_feat0]
      - kind: sequence
        name: hist
        columns: [hist_click_seq, hist_longview_seq]
        max_len: 50
        vocab: video_id
      - kind: sequence
        name: tags
        columns: [tag]
        max_len: 3
      - kind: numeric
        name: dense
        columns: [duration_ms, video_duration, fans_user_num]
        normalize: minmax
    labels:
      - { name: click, column: label }
    user: user_id
    domain: { column: domain }
train:
  optimizer: adam
  lr: 0.01
  batch_size: 16
  epochs: 2
  max_steps: 4
  eval_every: 2
  clip_norm: 10
  early_stopping: { metric: auc, patience: 2 }
  seed: 7
";

/// The clean inputs and results (see the module doc).
pub struct Fixture {
    pub dir: PathBuf,
    /// `fuzz.yaml` (which names `base.yaml`) and their texts.
    pub experiment: PathBuf,
    pub experiment_text: String,
    pub base_text: String,
    /// The experiment as `mdl run` loads it.
    pub clean_experiment: crate::experiment::Experiment,
    /// The shipped specs, by file name, with their texts.
    pub specs: Vec<(String, String)>,
    /// train, valid and test CSV texts (header first) and files.
    pub splits: [(PathBuf, String); 3],
    /// Finished runs with seeds 7 (`run_a`) and 8 (`run_b`), and run A stopped after 2 steps.
    pub run_a: PathBuf,
    pub run_b: PathBuf,
    pub run_a_partial: PathBuf,
    /// Run A read back as `mdl eval` reads it.
    pub loaded: LoadedRun,
    /// predict's scores and eval's report (JSON) of run A on the test split.
    pub clean_scores: Vec<f32>,
    pub clean_eval: String,
    /// What `mdl predict` writes for run A on the test split.
    pub clean_predict_output: String,
    /// The three clean splits prepared as `mdl run` prepares them.
    pub clean_prepared: crate::data::Prepared,
    /// `mdl report` of run A.
    pub clean_report: String,
    /// The raw bytes of run A's and B's checkpoints, by name (`a/best.ckpt`, ...).
    pub checkpoints: Vec<(String, Vec<u8>)>,
}

fn read_gz_lines(path: &Path, lines: usize) -> Result<Vec<String>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.lines().take(lines).map(str::to_string).collect())
}

impl Fixture {
    /// Builds the fixture under `dir` (emptied first) from the repository at `root`. Sets
    /// `MDL_CACHE_DIR` to a folder of its own, so runs never write the user's cache.
    pub fn new(root: &Path, dir: &Path) -> Result<Fixture, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::env::set_var("MDL_CACHE_DIR", dir.join("cache"));
        let write =
            |path: &Path, text: &str| std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()));

        // The data: header + rows; held-out rows only from domains train has.
        let lines =
            read_gz_lines(&root.join("data/kuairand_pure_tail/train.csv.gz"), 1 + TRAIN_ROWS + 4 * HELD_OUT_ROWS)?;
        let header = lines.first().ok_or("the bundled train split is empty")?.clone();
        let domain_col = header.split(',').position(|c| c == "domain").ok_or("no domain column")?;
        let domain =
            |line: &str| line.split(',').nth(domain_col).and_then(|d| d.parse::<u32>().ok()).unwrap_or(u32::MAX);
        let train_rows: Vec<&String> = lines[1..].iter().take(TRAIN_ROWS).collect();
        let max_domain = train_rows.iter().map(|l| domain(l)).max().unwrap_or(0);
        let rest: Vec<&String> = lines[1 + TRAIN_ROWS..].iter().filter(|l| domain(l) <= max_domain).collect();
        if rest.len() < 2 * HELD_OUT_ROWS {
            return Err("too few held-out rows in the bundled data".into());
        }
        let csv = |rows: &[&String]| {
            let mut t = header.clone();
            t.push('\n');
            for r in rows {
                t.push_str(r);
                t.push('\n');
            }
            t
        };
        let texts = [csv(&train_rows), csv(&rest[..HELD_OUT_ROWS]), csv(&rest[HELD_OUT_ROWS..2 * HELD_OUT_ROWS])];
        let names = ["train.csv", "valid.csv", "test.csv"];
        let mut splits: Vec<(PathBuf, String)> = Vec::new();
        for (name, text) in names.iter().zip(texts) {
            let path = dir.join("data").join(name);
            write(&path, &text)?;
            splits.push((path, text));
        }

        // The experiment: fuzz.yaml names the spec, the data and the backend; base.yaml the rest.
        let base = dir.join("base.yaml");
        write(&base, BASE_YAML)?;
        let experiment = dir.join("fuzz.yaml");
        let experiment_text = format!(
            "base: base.yaml\nname: fuzz\nspec: {}\nhyper: {{ dim: 4, hidden: [8] }}\ndata:\n  train: {}\n  valid: {}\n  test: {}\nbackend: interp\n",
            root.join("specs/deepfm.mdl").display(),
            splits[0].0.display(),
            splits[1].0.display(),
            splits[2].0.display()
        );
        write(&experiment, &experiment_text)?;

        let run = |name: &str, set: &[&str], stop_after: Option<u64>| -> Result<PathBuf, String> {
            let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            let exp = crate::experiment::load(&experiment, &set)?;
            let out = dir.join(name);
            train::train(&exp, &RunOptions { out: Some(out.clone()), resume: false, force: false, stop_after })
        };
        let clean_experiment = crate::experiment::load(&experiment, &[])?;
        let run_a = run("runA", &[], None)?;
        let run_b = run("runB", &["train.seed=8"], None)?;
        let run_a_partial = run("runA-partial", &[], Some(2))?;

        let loaded = train::load_run(&run_a)?;
        let test = &splits[2];
        let ds = loaded.fitted.encode_text(&test.0, &test.1, BadRows::Fail).map_err(|e| e.to_string())?;
        let mut exec = loaded.experiment.backend.executor()?;
        let batch = loaded.experiment.train.batch_size;
        let clean_scores = loaded.session.predict(exec.as_mut(), &loaded.params, &ds, batch)?;
        let report = loaded.session.evaluate(exec.as_mut(), &loaded.params, &ds, batch)?;
        let clean_eval = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        let scores_file = dir.join("clean-scores.csv");
        let options =
            crate::predict::PredictOptions { data: test.0.clone(), out: scores_file.clone(), ..Default::default() };
        crate::predict::predict(&run_a, &options)?;
        let clean_predict_output =
            std::fs::read_to_string(&scores_file).map_err(|e| format!("{}: {e}", scores_file.display()))?;
        let paths = crate::data::SplitPaths {
            train: splits[0].0.clone(),
            valid: splits[1].0.clone(),
            test: splits[2].0.clone(),
        };
        let options = crate::data::PrepareOptions { cache: crate::data::CacheMode::Off, ..Default::default() };
        let clean_prepared =
            crate::data::prepare(&loaded.fitted.schema, &paths, &options).map_err(|e| e.to_string())?;
        let clean_report = crate::report::markdown(&[crate::report::summarize(&run_a)?]);

        let mut checkpoints = Vec::new();
        for (tag, folder) in [("a", &run_a), ("b", &run_b)] {
            for file in ["best.ckpt", "last.ckpt"] {
                let bytes = std::fs::read(folder.join(file)).map_err(|e| format!("{file}: {e}"))?;
                checkpoints.push((format!("{tag}/{file}"), bytes));
            }
        }

        let spec_dir = root.join("specs");
        let mut specs = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&spec_dir)
            .map_err(|e| format!("{}: {e}", spec_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "mdl"))
            .collect();
        entries.sort();
        for p in entries {
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            specs.push((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), text));
        }

        Ok(Fixture {
            dir: dir.to_path_buf(),
            experiment,
            experiment_text,
            base_text: BASE_YAML.to_string(),
            clean_experiment,
            specs,
            splits: [splits[0].clone(), splits[1].clone(), splits[2].clone()],
            run_a,
            run_b,
            run_a_partial,
            loaded,
            clean_scores,
            clean_eval,
            clean_predict_output,
            clean_prepared,
            clean_report,
            checkpoints,
        })
    }

    /// An empty scratch folder for one case.
    pub(super) fn scratch(&self, kind: Kind, case: u64) -> PathBuf {
        case_dir(&self.dir.join("cases"), kind, case)
    }
}

/// Copies the files of `from` (and its folders: a run folder's `spec/`) into a new folder `to`.
pub(super) fn copy_folder(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let kind = entry.file_type().map_err(|e| e.to_string())?;
        if kind.is_dir() {
            copy_folder(&entry.path(), &to.join(entry.file_name()))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
