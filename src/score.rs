//! A trained run ready to score encoded rows: the one scoring path that `mdl predict`
//! (rows streamed from a file, [`crate::predict`]) and `mdl serve` (rows posted as JSON,
//! [`crate::serve`]) share. It opens the run folder (checked against its manifest), compiles
//! the folder's copy of the spec, loads the best parameters and the experiment's backend,
//! and turns encoded rows into one score per task per row: a binary task's probability, a
//! regression task's prediction, a classes task's arg-max class ([`crate::tasks`]).

use crate::data::{BadRows, Dataset, EncodeOptions, Fitted, UnknownDomain};
use crate::experiment::Experiment;
use crate::lower::FeatureKind;
use crate::train::folder::{Manifest, Trust};
use crate::train::{open_run, LoadedRun, Session};
use mdl_runtime::backend::Executor;
use mdl_runtime::tensor::Tensor;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A run's model, parameters and executor (see the module doc).
pub struct Scorer {
    pub experiment: Experiment,
    /// The data encoders fitted on the run's train split (shared with whoever encodes rows
    /// for this scorer).
    pub fitted: Arc<Fitted>,
    /// The run's id from its manifest (none for a folder without one, read with `--force`).
    pub run_id: Option<String>,
    session: Session,
    params: HashMap<String, Tensor<f32>>,
    exec: Box<dyn Executor>,
}

impl Scorer {
    /// Opens the run folder `run` (see [`open_run`]) and the executor of its backend.
    pub fn open(run: &Path, trust: Trust) -> Result<Scorer, String> {
        Scorer::open_on(run, trust, None)
    }

    /// [`Scorer::open`], the jit on `threads` threads (default: the machine's cores).
    pub fn open_on(run: &Path, trust: Trust, threads: Option<usize>) -> Result<Scorer, String> {
        let LoadedRun { experiment, fitted, session, params } = open_run(run, trust)?;
        let run_id = Manifest::read(run)?.map(|m| m.run_id);
        let exec = experiment.backend.executor_on(threads)?;
        Ok(Scorer { experiment, fitted: Arc::new(fitted), run_id, session, params, exec })
    }

    /// The tasks, in the order of each row's scores.
    pub fn tasks(&self) -> &[String] {
        &self.session.compiled.tasks
    }

    /// The kind of each task, in the order of [`Scorer::tasks`].
    pub fn task_kinds(&self) -> &[crate::tasks::TaskKind] {
        &self.session.compiled.task_kinds
    }

    /// The model's name in its spec.
    pub fn model(&self) -> &str {
        &self.session.compiled.model
    }

    /// Whether the model reads the domain column (otherwise rows need not have it).
    pub fn domain_input(&self) -> bool {
        self.session.compiled.features.iter().any(|f| f.kind == FeatureKind::Domain)
    }

    /// Rows per executor run: the run's training batch size.
    pub fn batch_rows(&self) -> usize {
        self.experiment.train.batch_size.max(1)
    }

    /// The run's policies for malformed rows and unseen domain ids (`data.bad_rows`,
    /// `data.unknown_domain`), each replaced by an override that is given, and its CSV
    /// delimiter (`data.delimiter`).
    pub fn encode_options(&self, bad_rows: Option<BadRows>, unknown_domain: Option<UnknownDomain>) -> EncodeOptions {
        let data = &self.experiment.data;
        EncodeOptions {
            bad_rows: bad_rows.unwrap_or(data.bad_rows.into()),
            unknown_domain: unknown_domain.unwrap_or(data.unknown_domain),
            delimiter: data.delimiter,
        }
    }

    /// The score of every task for every row of `data` (see the module doc): `rows × tasks` values,
    /// row-major (a row's scores do not depend on the other rows scored with it).
    pub fn score(&mut self, data: &Dataset) -> Result<Vec<f32>, String> {
        let batch = self.batch_rows();
        self.session.predict(self.exec.as_mut(), &self.params, data, batch)
    }
}
