//! What this module owns: staged training, as the experiment's `train.stages` declares it,
//! resolved against the compiled spec and the data. [`check`] runs before any data is
//! read: every group a stage names (`freeze`, `train_only`, `copy`) is one of the spec's
//! groups, every loss it names is one of the spec's named losses, and every copy's two
//! sides have shapes that fit (and `train.grad_cosine`'s losses and parameter are the
//! spec's). [`Schedule`] is what the loop ([`super::run`]) asks of the
//! stage it is in: the training graph of its objective, its learning-rate factor, its
//! early stopping, the train rows it reads, which parameters it freezes, the copies made
//! at its start, and the words the log and `curve.csv` use for it. A warm start
//! (`train.init_from`: groups of a fresh run copied from another run's best parameters)
//! is checked and made here too ([`check_init_from`], [`warm_start`]).
//!
//! An experiment without `stages:` is one stage of `train.epochs` that trains everything on
//! the whole objective: the loop then runs exactly as it did before stages had settings
//! (the same graph, the same rows, the same log and `curve.csv` columns).

use super::Session;
use crate::data::Dataset;
use crate::experiment::{EarlyStopping, Experiment, GroupCopy, Stage};
use crate::lower::{loss_names, loss_output, Compiled};
use mdl_runtime::ir::dim::shape_to_string;
use mdl_runtime::ops::{BinaryOp, Op};
use mdl_runtime::optim::LrScale;
use mdl_runtime::tensor::Tensor;
use mdl_runtime::{autodiff, passes, Graph, ParamInfo};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The spec's parameter groups, in name order.
fn groups(compiled: &Compiled) -> BTreeSet<&str> {
    compiled.graph.params.iter().filter_map(|p| p.group.as_deref()).collect()
}

/// What an experiment key names in the spec, for [`known_name`]'s message.
#[derive(Clone, Copy)]
enum Named {
    Group,
    Loss,
    Path,
    Param,
}

impl Named {
    /// The message's claim about `name`, after "`{key}`: ".
    fn missing(self, model: &str, name: &str) -> String {
        match self {
            Named::Group => format!("no parameter of model `{model}` is in group `{name}`"),
            Named::Loss => format!("model `{model}` has no named loss `{name}`"),
            Named::Path => format!("model `{model}` has no gradient path `{name}`"),
            Named::Param => format!("model `{model}` has no parameter `{name}`"),
        }
    }

    /// The list of the known names, or what to say when there are none.
    fn list(self, known: &[&str]) -> String {
        let plural = match self {
            Named::Group => "groups",
            Named::Loss => "losses",
            Named::Path => "paths",
            Named::Param => "parameters",
        };
        match (known.is_empty(), self) {
            (true, Named::Path) => "the model marks no path: `path(x, \"name\")`".to_string(),
            (true, _) => format!("the model declares no {plural}"),
            (false, _) => format!("its {plural}: {}", known.join(", ")),
        }
    }
}

/// `name`, given at `key`, must be one of the spec's `known` names of its kind: the error
/// names the key, the nearest known name and all of them.
fn known_name<'a>(
    key: &str,
    name: &str,
    known: impl IntoIterator<Item = &'a str>,
    what: Named,
    model: &str,
) -> Result<(), String> {
    let known: Vec<&str> = known.into_iter().collect();
    if known.contains(&name) {
        return Ok(());
    }
    let hint = match crate::diag::suggest(name, known.iter().copied()) {
        Some(near) => format!("; did you mean `{near}`?"),
        None => String::new(),
    };
    Err(format!("{key}: {}{hint} ({})", what.missing(model, name), what.list(&known)))
}

/// Checks the stages against the compiled spec, before any data is read: the names of
/// groups and losses, and the shapes of copies (each error names the key path).
pub fn check(exp: &Experiment, compiled: &Compiled) -> Result<(), String> {
    let groups = groups(compiled);
    let losses: Vec<String> = loss_names(&compiled.graph);
    let losses: BTreeSet<&str> = losses.iter().map(String::as_str).collect();
    let model = &compiled.model;
    for g in exp.train.group_lr.keys() {
        known_name("train.group_lr", g, groups.iter().copied(), Named::Group, model)?;
    }
    for (i, stage) in exp.train.stages.iter().enumerate() {
        let at = format!("train.stages[{i}]");
        for g in stage.group_lr.keys() {
            known_name(&format!("{at}.group_lr"), g, groups.iter().copied(), Named::Group, model)?;
        }
        for g in &stage.freeze {
            known_name(&format!("{at}.freeze"), g, groups.iter().copied(), Named::Group, model)?;
        }
        for g in stage.train_only.iter().flatten() {
            known_name(&format!("{at}.train_only"), g, groups.iter().copied(), Named::Group, model)?;
        }
        for (j, c) in stage.copy.iter().enumerate() {
            known_name(&format!("{at}.copy[{j}].from"), &c.from, groups.iter().copied(), Named::Group, model)?;
            known_name(&format!("{at}.copy[{j}].to"), &c.to, groups.iter().copied(), Named::Group, model)?;
            copy_pairs(compiled, c).map_err(|e| format!("{at}.copy[{j}]: {e}"))?;
        }
        for l in stage.losses.iter().flatten() {
            known_name(&format!("{at}.losses"), l, losses.iter().copied(), Named::Loss, model)?;
        }
    }
    if let Some(c) = &exp.train.grad_cosine {
        for l in &c.losses {
            known_name("train.grad_cosine.losses", l, losses.iter().copied(), Named::Loss, model)?;
        }
        let paths = passes::path_names(&compiled.graph);
        for p in &c.paths {
            known_name("train.grad_cosine.paths", p, paths.iter().map(String::as_str), Named::Path, model)?;
        }
        let params = compiled.graph.params.iter().map(|p| p.name.as_str());
        known_name("train.grad_cosine.param", &c.param, params, Named::Param, model)?;
    }
    Ok(())
}

/// The parameters of `group`, in declaration order.
fn members<'c>(compiled: &'c Compiled, group: &str) -> Vec<&'c ParamInfo> {
    compiled.graph.params.iter().filter(|p| p.group.as_deref() == Some(group)).collect()
}

/// The parameter pairs of a copy, `(from, to)`, position by position, within one model;
/// see [`pairs_between`].
fn copy_pairs(compiled: &Compiled, c: &GroupCopy) -> Result<Vec<(String, String)>, String> {
    pairs_between((compiled, ""), (compiled, ""), c)
}

/// The parameter pairs of a copy from group `c.from` of model `from` into group `c.to` of
/// model `to`, position by position; each `to` has the shape of its `from`, or that shape
/// with one more leading axis (per domain): a one-to-many copy. Each model comes with the
/// words that say where it is (empty for the run's own). An error names both parameters,
/// their shapes and groups, and where each spec defines them (`file:line:col`).
fn pairs_between(
    (from_model, from_at): (&Compiled, &str),
    (to_model, to_at): (&Compiled, &str),
    c: &GroupCopy,
) -> Result<Vec<(String, String)>, String> {
    let (from, to) = (members(from_model, &c.from), members(to_model, &c.to));
    let names = |ps: &[&ParamInfo]| {
        ps.iter().map(|p| format!("{} {}", p.name, shape_to_string(&p.shape))).collect::<Vec<_>>().join(", ")
    };
    if from.len() != to.len() {
        return Err(format!(
            "group `{}`{from_at} has {} parameters ({}), group `{}`{to_at} has {} ({}): a copy pairs them in order",
            c.from,
            from.len(),
            names(&from),
            c.to,
            to.len(),
            names(&to)
        ));
    }
    from.iter()
        .zip(&to)
        .map(|(f, t)| {
            let fits = t.shape == f.shape || t.shape.len() == f.shape.len() + 1 && t.shape[1..] == f.shape[..];
            if fits {
                Ok((f.name.clone(), t.name.clone()))
            } else {
                let defined = |model: &Compiled, name: &str| match model.param_places.get(name) {
                    Some(place) => format!(", defined at {place}"),
                    None => String::new(),
                };
                Err(format!(
                    "`{}` {} (group `{}`{}) cannot be copied into `{}` {} (group `{}`{}): the shapes differ",
                    f.name,
                    shape_to_string(&f.shape),
                    c.from,
                    defined(from_model, &f.name),
                    t.name,
                    shape_to_string(&t.shape),
                    c.to,
                    defined(to_model, &t.name)
                ))
            }
        })
        .collect()
}

/// The run a warm start (`train.init_from`) reads, with the words that say where its spec is.
fn init_source(exp: &Experiment) -> Result<Option<(super::LoadedRun, String)>, String> {
    let Some(init) = &exp.train.init_from else { return Ok(None) };
    let source = super::load_run(&init.run).map_err(|e| format!("train.init_from.run: {e}"))?;
    let at =
        format!(" of {}", init.run.join("spec").join(source.experiment.spec.file_name().unwrap_or_default()).display());
    Ok(Some((source, at)))
}

/// Checks a warm start before any data is read: the run it names loads, and each copy's
/// groups and shapes fit (the errors name both specs).
pub fn check_init_from(exp: &Experiment, compiled: &Compiled) -> Result<(), String> {
    let (Some(init), Some((source, at))) = (&exp.train.init_from, init_source(exp)?) else { return Ok(()) };
    let here = format!(" of {}", exp.spec.display());
    let from = &source.session.compiled;
    for (j, c) in init.copy.iter().enumerate() {
        let key = format!("train.init_from.copy[{j}]");
        known_name(&format!("{key}.from"), &c.from, groups(from).iter().copied(), Named::Group, &from.model)?;
        known_name(&format!("{key}.to"), &c.to, groups(compiled).iter().copied(), Named::Group, &compiled.model)?;
        pairs_between((from, &at), (compiled, &here), c).map_err(|e| format!("{key}: {e}"))?;
    }
    Ok(())
}

/// A warm start: the copies of `train.init_from` from that run's best parameters into
/// `params` (a fresh run's); returns a log line per copy.
pub fn warm_start(
    exp: &Experiment,
    compiled: &Compiled,
    params: &mut HashMap<String, Tensor<f32>>,
) -> Result<Vec<String>, String> {
    let (Some(init), Some((source, at))) = (&exp.train.init_from, init_source(exp)?) else { return Ok(Vec::new()) };
    let here = format!(" of {}", exp.spec.display());
    let mut lines = Vec::new();
    for (j, c) in init.copy.iter().enumerate() {
        let pairs = pairs_between((&source.session.compiled, &at), (compiled, &here), c)
            .map_err(|e| format!("train.init_from.copy[{j}]: {e}"))?;
        for (from, to) in pairs {
            let source = source.params.get(&from).ok_or_else(|| format!("train.init_from: no value for `{from}`"))?;
            let line =
                copy_tensor(source, &from, params, &to).map_err(|e| format!("train.init_from.copy[{j}]: {e}"))?;
            lines.push(format!("{line} from {}", init.run.display()));
        }
    }
    Ok(lines)
}

/// Puts `source` (parameter `from`) into `params[to]` as a new tensor (a device backend then
/// uploads it whole), repeated along `to`'s leading axis when `to` has one more; returns
/// the log line.
fn copy_tensor(
    source: &Tensor<f32>,
    from: &str,
    params: &mut HashMap<String, Tensor<f32>>,
    to: &str,
) -> Result<String, String> {
    let target = params.get(to).ok_or_else(|| format!("no value for parameter `{to}`"))?;
    let n = source.data.len();
    let rank = source.shape.len();
    let fits = n > 0
        && target.shape.len() >= rank
        && target.shape[target.shape.len() - rank..] == source.shape[..]
        && target.data.len() % n == 0;
    if !fits {
        return Err(format!(
            "`{from}` {:?} does not fit `{to}` {:?} at the data's sizes (the vocabularies or domains differ)",
            source.shape, target.shape
        ));
    }
    let copies = target.data.len() / n;
    let data: Vec<f32> = source.data.iter().copied().cycle().take(n * copies).collect();
    let new = Tensor::new(target.shape.clone(), data)
        .ok_or_else(|| format!("`{to}` {:?} does not hold {} values", target.shape, n * copies))?;
    params.insert(to.to_string(), new);
    let times = if copies > 1 { format!(" ({copies} copies)") } else { String::new() };
    Ok(format!("copied {from} into {to}{times}"))
}

/// One stage as the loop runs it.
pub struct Planned {
    pub stage: Stage,
    /// The training graph of its objective, when it trains on some of the losses.
    graph: Option<Graph>,
    /// Its learning rates over `train.lr`: the stage's `lr`, and per parameter its group's
    /// (`group_lr`, the stage's over `train.group_lr`'s).
    pub lr_scale: LrScale,
    /// The learning rates of the groups it gives one, for the log.
    group_lr: BTreeMap<String, f64>,
    pub early_stopping: EarlyStopping,
    /// Its objective as evaluation computes it, when its early stopping watches `loss`.
    pub valid_objective: Option<Graph>,
    /// The train rows it reads (all of them when `None`).
    pub rows: Option<Vec<usize>>,
    /// Parameter pairs copied at its start.
    copies: Vec<(String, String)>,
    /// The groups it trains and those it freezes, for the log and `curve.csv`.
    pub trains: Vec<String>,
    pub frozen: Vec<String>,
}

/// The experiment's stages resolved against the spec and the train split.
pub struct Schedule {
    pub stages: Vec<Planned>,
    /// Whether the experiment declared stages (else the log and curve say nothing of them).
    pub declared: bool,
}

impl Schedule {
    /// Resolves the stages (checked by [`check`]) against the session and the train split.
    pub fn new(exp: &Experiment, session: &Session, train: &Dataset) -> Result<Schedule, String> {
        let compiled = &session.compiled;
        let mut stages = Vec::new();
        for (i, stage) in exp.stages().into_iter().enumerate() {
            let graph = match &stage.losses {
                Some(losses) => Some(objective_graph(compiled, losses)?),
                None => None,
            };
            let rows = match &stage.domains {
                Some(domains) => {
                    Some(domain_rows(train, domains).map_err(|e| format!("train.stages[{i}].domains: {e}"))?)
                }
                None => None,
            };
            let copies = stage.copy.iter().map(|c| copy_pairs(compiled, c)).collect::<Result<Vec<_>, _>>()?;
            let (trains, frozen) = trains_and_frozen(compiled, &stage);
            let lr = stage.lr.unwrap_or(exp.train.lr);
            let mut group_lr = exp.train.group_lr.clone();
            group_lr.extend(stage.group_lr.iter().map(|(g, &lr)| (g.clone(), lr)));
            let per_param = compiled
                .graph
                .params
                .iter()
                .filter_map(|p| Some((p.name.clone(), group_lr.get(p.group.as_deref()?)? / lr)))
                .collect();
            let early_stopping = stage.early_stopping.clone().unwrap_or_else(|| exp.train.early_stopping.clone());
            let valid_objective = match early_stopping.metric == crate::tasks::OBJECTIVE_METRIC {
                true => Some(valid_objective_graph(compiled, stage.losses.as_deref())?),
                false => None,
            };
            stages.push(Planned {
                lr_scale: LrScale { all: lr / exp.train.lr, per_param },
                group_lr,
                early_stopping,
                valid_objective,
                graph,
                rows,
                copies: copies.into_iter().flatten().collect(),
                trains,
                frozen,
                stage,
            });
        }
        Ok(Schedule { stages, declared: !exp.train.stages.is_empty() })
    }

    /// The training graph of stage `i`.
    pub fn graph<'s>(&'s self, i: usize, session: &'s Session) -> &'s Graph {
        self.stages.get(i).and_then(|s| s.graph.as_ref()).unwrap_or(&session.train_graph)
    }

    /// How stage `i` is described in the log: its number and name, what trains and what is
    /// frozen, its losses, learning rate and rows.
    pub fn describe(&self, i: usize, exp: &Experiment, train_rows: usize) -> String {
        let s = &self.stages[i];
        let list = |l: &[String]| if l.is_empty() { "nothing".to_string() } else { l.join(", ") };
        let length = match (s.stage.epochs, s.stage.steps) {
            (_, Some(n)) => format!("{n} steps"),
            (Some(n), _) => format!("{n} epochs"),
            _ => String::new(),
        };
        // Rates below 1e-4 in exponent form (Rust's `{}` writes 1e-30 with 30 zeros).
        let rate = |lr: f64| if lr >= 1e-4 { format!("{lr}") } else { format!("{lr:e}") };
        let groups: String = s.group_lr.iter().map(|(g, &lr)| format!(", {g} {}", rate(lr))).collect();
        format!(
            "stage {}/{} `{}` ({length}): trains {}; frozen {}; losses {}; lr {}{groups}; {} train rows{}",
            i + 1,
            self.stages.len(),
            s.stage.name,
            list(&s.trains),
            list(&s.frozen),
            s.stage.losses.as_ref().map_or("all".to_string(), |l| l.join(" + ")),
            rate(exp.train.lr * s.lr_scale.all),
            s.rows.as_ref().map_or(train_rows, Vec::len),
            if s.stage.reset_optimizer { "; optimizer reset" } else { "" },
        )
    }

    /// Makes stage `i`'s copies in `params`, each target a new tensor (a device backend then
    /// uploads it whole); returns a log line per copy.
    pub fn copy_into(&self, i: usize, params: &mut HashMap<String, Tensor<f32>>) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        for (from, to) in &self.stages[i].copies {
            let source = params.get(from).ok_or_else(|| format!("copy: no value for parameter `{from}`"))?.clone();
            lines.push(copy_tensor(&source, from, params, to).map_err(|e| format!("copy: {e}"))?);
        }
        Ok(lines)
    }
}

/// The groups `stage` trains and those it freezes (`(ungrouped)` for the parameters of no
/// group), for the log and `curve.csv`.
fn trains_and_frozen(compiled: &Compiled, stage: &Stage) -> (Vec<String>, Vec<String>) {
    let frozen_by = frozen_by(stage);
    let (mut trains, mut frozen) = (Vec::new(), Vec::new());
    for g in groups(compiled) {
        let list = if frozen_by(members(compiled, g)[0]) { &mut frozen } else { &mut trains };
        list.push(g.to_string());
    }
    if let Some(p) = compiled.graph.params.iter().find(|p| p.group.is_none()) {
        let list = if frozen_by(p) { &mut frozen } else { &mut trains };
        list.push("(ungrouped)".into());
    }
    (trains, frozen)
}

/// The training graph of an objective made of some of the spec's named losses: the forward
/// graph with `loss` their sum, differentiated and optimised as [`super::build_training_graph`]
/// does for the whole objective.
fn objective_graph(compiled: &Compiled, losses: &[String]) -> Result<Graph, String> {
    let wrt: Vec<String> = compiled.graph.params.iter().map(|p| p.name.clone()).collect();
    objective_gradients(compiled, losses, &wrt)
}

/// The training graph of the objective made of the named losses `losses` with the
/// gradients (`grad/<name>`) of the parameters `wrt` only.
pub fn objective_gradients(compiled: &Compiled, losses: &[String], wrt: &[String]) -> Result<Graph, String> {
    let mut forward = super::training_forward(compiled);
    let total = sum_of_losses(&mut forward, losses)?;
    forward.outputs.insert("loss".into(), total);
    let forward = passes::wide_products_toward(&forward, total);
    let total = forward.outputs["loss"];
    let g = autodiff::differentiate(&forward, total, wrt).map_err(|e| e.to_string())?;
    Ok(passes::optimize(&g))
}

/// The node of the sum of the named losses in `forward` (their outputs `loss/<name>`).
fn sum_of_losses(forward: &mut Graph, losses: &[String]) -> Result<mdl_runtime::NodeId, String> {
    let mut total = None;
    for name in losses {
        let node = *forward.outputs.get(&loss_output(name)).ok_or_else(|| format!("no loss `{name}`"))?;
        total = Some(match total {
            None => node,
            Some(t) => forward.add(Op::Binary(BinaryOp::Add), &[t, node], "stage_loss").map_err(|e| e.to_string())?,
        });
    }
    total.ok_or_else(|| "a stage's objective needs at least one loss".to_string())
}

/// The training graph of the whole objective with the gradient (`grad/<name>`) of the
/// parameters `wrt` through the named gradient path `path` alone
/// ([`passes::through_path`]: every other named path cut).
pub fn path_gradients(compiled: &Compiled, path: &str, wrt: &[String]) -> Result<Graph, String> {
    let forward = passes::through_path(&super::training_forward(compiled), path);
    let loss = *forward.outputs.get("loss").ok_or("the model has no loss output")?;
    let g = autodiff::differentiate(&forward, loss, wrt).map_err(|e| e.to_string())?;
    Ok(passes::optimize(&g))
}

/// The objective of a stage (its `losses`, or the whole objective) as evaluation computes
/// it: the forward graph of evaluation (running statistics, fixed draws) with the one
/// output `loss`, for the early-stopping metric `loss` ([`crate::tasks::OBJECTIVE_METRIC`]).
fn valid_objective_graph(compiled: &Compiled, losses: Option<&[String]>) -> Result<Graph, String> {
    let mut forward = passes::for_phase(&compiled.graph, false);
    let total = match losses {
        Some(losses) => sum_of_losses(&mut forward, losses)?,
        None => *forward.outputs.get("loss").ok_or("the model has no loss output")?,
    };
    forward.outputs.clear();
    forward.outputs.insert("loss".into(), total);
    Ok(passes::optimize(&forward))
}

/// The rows of `train` whose domain id is one of `domains`; a domain with no rows is an
/// error naming the domains train has.
fn domain_rows(train: &Dataset, domains: &[u32]) -> Result<Vec<usize>, String> {
    if train.domain.is_empty() {
        return Err("the data has no domain column (the schema binds none)".into());
    }
    let present: BTreeSet<u32> = train.domain.iter().copied().collect();
    for d in domains {
        if !present.contains(d) {
            let list: Vec<String> = present.iter().map(u32::to_string).collect();
            return Err(format!("domain {d} has no rows in train (its domains: {})", list.join(", ")));
        }
    }
    let wanted: BTreeSet<u32> = domains.iter().copied().collect();
    Ok((0..train.rows).filter(|&r| wanted.contains(&train.domain[r])).collect())
}

/// Whether a stage leaves a parameter untouched: its group is frozen, or the stage trains
/// only other groups.
pub fn frozen_by(stage: &Stage) -> impl Fn(&ParamInfo) -> bool + '_ {
    move |p: &ParamInfo| {
        let g = p.group.as_deref();
        let frozen = g.is_some_and(|g| stage.freeze.iter().any(|f| f == g));
        let not_trained = stage.train_only.as_ref().is_some_and(|only| !g.is_some_and(|g| only.iter().any(|o| o == g)));
        frozen || not_trained
    }
}
