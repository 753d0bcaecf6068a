//! The run folder as one unit that cannot lie about what is in it: its identity, its
//! lock, its copy of the spec and the checksums of the files the run wrote.
//!
//! - **Identity.** Every run gets a run id when its folder is claimed. `manifest.json`
//!   records it with the SHA-256 of the resolved experiment (`config.yaml`), the spec and
//!   every file it `use`s, the data's cache key (the content of the three splits and the
//!   schema), the mdl version and the git commit it was built from. Checkpoints carry the
//!   run id (`checkpoint.rs`), so a checkpoint of another run is never taken for this one's.
//! - **Exclusive.** A fresh run never reuses files it did not write ([`RunFolder::claim`]):
//!   the experiment's folder (`runs/<name>` or its `out:`), when it already holds a run,
//!   gives way to the next free `<folder>-2`, `-3`, ...; an explicit `--out` that holds
//!   anything is refused unless `--force`, which clears it (only when it is a run folder).
//!   The writer holds an advisory lock (`flock`, on `.lock`, which holds its pid) for the
//!   whole run, so a second writer fails at once naming the holder.
//! - **Self-contained.** The spec and the files it `use`s are copied under `spec/` at the
//!   start (their relative layout kept, so `use` paths resolve among the copies);
//!   `--resume`, `mdl eval` and `mdl predict` compile the copy and say so when the original
//!   has changed since, and a folder moved to another machine scores the same.
//! - **Checked.** `manifest.json` holds the SHA-256 of every file the run wrote through
//!   [`RunFolder::write`] (`config.yaml`, `fitted.json`, `metrics.json`, `curve.csv`,
//!   `timing.json`) and of itself; readers check them ([`ReadFolder::read`]) and refuse a
//!   file that changed after the run wrote it, naming the file, unless `--force`, which
//!   goes on and says so. All writes are atomic and synced ([`write_atomic`]).

use crate::files::{remove_stale_temporaries, sha256_hex, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

/// The manifest's file name in a run folder.
pub const MANIFEST: &str = "manifest.json";
/// The lock file (it holds the writer's pid).
const LOCK: &str = ".lock";
/// The folder of the spec's copy.
const SPEC_COPY: &str = "spec";
/// Files that mark a folder as a run folder (what `--force` may clear).
const RUN_FILES: &[&str] = &[MANIFEST, "config.yaml", "last.ckpt", "best.ckpt", "train.log"];

/// One file of the spec: where it was read from, its copy in the run folder (relative,
/// `/`-separated) and the SHA-256 of its text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    pub original: PathBuf,
    pub copy: String,
    pub sha256: String,
}

/// What `manifest.json` records (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub run_id: String,
    pub mdl_version: String,
    /// The commit mdl was built from, when the build was given it (`MDL_GIT_COMMIT`).
    pub git_commit: Option<String>,
    /// SHA-256 of the resolved experiment as `config.yaml` holds it.
    pub config_sha256: String,
    /// The data cache key: the three split files' contents, the schema and the bad-row policy.
    pub data_key: Option<String>,
    /// The spec (first) and every file it `use`s.
    pub spec: Vec<SpecFile>,
    /// SHA-256 of each file the run wrote, by name.
    pub files: BTreeMap<String, String>,
    /// Whether the run finished (its metrics.json is written).
    pub finished: bool,
}

/// `manifest.json` on disk: the manifest and the SHA-256 of its compact JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    sha256: String,
    manifest: serde_json::Value,
}

impl Manifest {
    fn new(dir: &Path, config_sha256: String) -> Manifest {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seed = format!("{nanos} {} {} {config_sha256}", std::process::id(), dir.display());
        Manifest {
            run_id: sha256_hex(seed.as_bytes())[..16].to_string(),
            mdl_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: option_env!("MDL_GIT_COMMIT").filter(|c| !c.is_empty()).map(str::to_string),
            config_sha256,
            data_key: None,
            spec: Vec::new(),
            files: BTreeMap::new(),
            finished: false,
        }
    }

    fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let manifest = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let compact = serde_json::to_string(&manifest).map_err(|e| e.to_string())?;
        let stored = Stored { sha256: sha256_hex(compact.as_bytes()), manifest };
        let mut text = serde_json::to_string_pretty(&stored).map_err(|e| e.to_string())?;
        text.push('\n');
        Ok(text.into_bytes())
    }

    /// Reads `dir/manifest.json`: `None` when there is none, an error when it is damaged.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, String> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let damaged = |why: String| format!("{} is damaged ({why}): the run folder cannot be trusted", path.display());
        let stored: Stored = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
        let compact = serde_json::to_string(&stored.manifest).map_err(|e| e.to_string())?;
        if sha256_hex(compact.as_bytes()) != stored.sha256 {
            return Err(damaged("its checksum does not match its contents".into()));
        }
        serde_json::from_value(stored.manifest).map(Some).map_err(|e| damaged(e.to_string()))
    }

    /// The copy of the root spec, relative to the run folder.
    fn spec_root(&self) -> Option<&str> {
        self.spec.first().map(|f| f.copy.as_str())
    }
}

/// What a reader does when the run folder does not hold together: refuse with the
/// reason, or (with `--force`) say so and go on.
#[derive(Clone, Copy, Debug)]
pub struct Trust {
    pub force: bool,
}

impl Trust {
    /// `problem` is an error, or with `--force` a warning on stderr.
    pub fn problem(self, problem: String) -> Result<(), String> {
        if self.force {
            crate::say!("warning: {problem}; going on because of --force");
            Ok(())
        } else {
            Err(format!("{problem}; --force goes on regardless"))
        }
    }

    /// Checks that a checkpoint carries the run's id.
    pub fn checkpoint_id(self, path: &Path, found: Option<&str>, run_id: &str) -> Result<(), String> {
        match found {
            Some(id) if id == run_id => Ok(()),
            Some(id) => {
                self.problem(format!("{} belongs to run {id}, not to this folder's run {run_id}", path.display()))
            }
            None => self.problem(format!("{} carries no run id (written by an older mdl)", path.display())),
        }
    }
}

/// A run folder being written: the lock held, and its manifest.
pub struct RunFolder {
    dir: PathBuf,
    /// Held (locked) for as long as the run lives.
    _lock: File,
    pub manifest: Manifest,
    /// Whether this is a fresh run's folder, and whether this process made it (a fresh run
    /// that cannot start removes it, or empties it again).
    fresh: bool,
    created: bool,
    /// Whether the manifest exists on disk yet (a fresh run writes it once it started).
    recorded: bool,
}

/// How [`RunFolder::resume`] found a run folder.
pub enum Resumed {
    /// The run has finished: nothing to do (the message says so); nothing was written.
    Finished(String),
    Open(RunFolder),
}

/// The outcome of trying one folder for a fresh run.
enum Claim {
    /// The lock, whether the folder was made here, whether it was cleared (`--force`).
    Ours(File, bool, bool),
    /// Another run is there (or holds the lock): the next name, for a numbered folder.
    Taken(String),
}

impl RunFolder {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn run_id(&self) -> &str {
        &self.manifest.run_id
    }

    /// Claims the folder of a fresh run (see the module doc): `dir` itself when it is free
    /// (missing or empty), else with `explicit` (`--out`) an error or with `force` `dir`
    /// cleared, else without `explicit` the next free `dir-2`, `dir-3`, ... Returns the
    /// folder, locked, and a note for the log when it is not `dir` or was cleared.
    pub fn claim(
        dir: &Path,
        explicit: bool,
        force: bool,
        config_sha256: &str,
    ) -> Result<(RunFolder, Option<String>), String> {
        let mut candidate = dir.to_path_buf();
        let mut why_not_dir = None;
        let mut n = 1;
        loop {
            match try_claim(&candidate, explicit || force, force)? {
                Claim::Ours(mut lock, created, cleared) => {
                    announce(&mut lock, &candidate)?;
                    let note = match why_not_dir {
                        Some(why) => Some(format!("{} {why}; this run writes {}", dir.display(), candidate.display())),
                        None if cleared => Some(format!("cleared {} for a fresh run (--force)", dir.display())),
                        None => None,
                    };
                    remove_stale_temporaries(&candidate, false);
                    let manifest = Manifest::new(&candidate, config_sha256.to_string());
                    let folder =
                        RunFolder { dir: candidate, _lock: lock, manifest, fresh: true, created, recorded: false };
                    return Ok((folder, note));
                }
                Claim::Taken(why) => {
                    why_not_dir.get_or_insert(why);
                    n += 1;
                    let mut name = dir.file_name().unwrap_or_default().to_os_string();
                    name.push(format!("-{n}"));
                    candidate = dir.with_file_name(name);
                }
            }
        }
    }

    /// Opens a run folder to resume it: locked, its manifest read and its temporaries of a
    /// killed writer removed. A finished run is reported, not opened (nothing is written,
    /// not even the lock file); a folder without a manifest (written by an older mdl) is
    /// adopted with a new one only with `force`.
    pub fn resume(dir: &Path, trust: Trust, config_sha256: &str) -> Result<Resumed, String> {
        if let Some(manifest) = Manifest::read(dir)?.filter(|m| m.finished) {
            return finished(dir, manifest, trust).map(Resumed::Finished);
        }
        let mut lock = lock_folder(dir)?.map_err(|pid| busy(dir, &pid))?;
        let (manifest, recorded) = match Manifest::read(dir)? {
            Some(m) => (m, true),
            None => {
                trust.problem(format!(
                    "{} has no {MANIFEST} (a run folder of an older mdl): nothing says its files belong together",
                    dir.display()
                ))?;
                (Manifest::new(dir, config_sha256.to_string()), false)
            }
        };
        if manifest.finished {
            // It finished while this process waited for the lock.
            return finished(dir, manifest, trust).map(Resumed::Finished);
        }
        announce(&mut lock, dir)?;
        remove_stale_temporaries(dir, false);
        Ok(Resumed::Open(RunFolder {
            dir: dir.to_path_buf(),
            _lock: lock,
            manifest,
            fresh: false,
            created: false,
            recorded,
        }))
    }

    /// The folder's copy of the spec to compile ([`checked_spec_copy`]), when it has one.
    pub fn spec(&self, trust: Trust) -> Result<Option<(PathBuf, Vec<String>)>, String> {
        if self.manifest.spec.is_empty() {
            return Ok(None);
        }
        checked_spec_copy(&self.dir, &self.manifest, trust).map(Some)
    }

    /// Copies the spec's files (`(path, text)` as the compiler read them, the root first)
    /// under `spec/` and records them in the manifest.
    pub fn snapshot_spec(&mut self, files: &[(PathBuf, String)]) -> Result<(), String> {
        let normal: Vec<PathBuf> = files.iter().map(|(p, _)| normalize(p)).collect();
        let mut base = normal.first().and_then(|p| p.parent()).map(Path::to_path_buf).unwrap_or_default();
        for p in &normal {
            while !p.starts_with(&base) {
                if !base.pop() {
                    break;
                }
            }
        }
        let copy_root = self.dir.join(SPEC_COPY);
        if copy_root.exists() {
            std::fs::remove_dir_all(&copy_root).map_err(|e| format!("cannot clear {}: {e}", copy_root.display()))?;
        }
        let mut recorded = Vec::new();
        for (path, (_, text)) in normal.iter().zip(files) {
            let relative = path.strip_prefix(&base).unwrap_or(path);
            let mut copy = String::from(SPEC_COPY);
            for c in relative.components() {
                if let Component::Normal(part) = c {
                    copy.push('/');
                    copy.push_str(&part.to_string_lossy());
                }
            }
            let target = self.dir.join(&copy);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            write_atomic(&target, text.as_bytes())?;
            recorded.push(SpecFile { original: path.clone(), copy, sha256: sha256_hex(text.as_bytes()) });
        }
        self.manifest.spec = recorded;
        Ok(())
    }

    /// Writes a file of the run atomically and records its checksum (the manifest itself
    /// is written by [`RunFolder::save_manifest`]).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), String> {
        write_atomic(&self.dir.join(name), bytes)?;
        self.manifest.files.insert(name.to_string(), sha256_hex(bytes));
        Ok(())
    }

    /// Whether `name` holds exactly `bytes` as the run wrote it.
    pub fn holds(&self, name: &str, bytes: &[u8]) -> bool {
        self.manifest.files.get(name).is_some_and(|h| *h == sha256_hex(bytes)) && self.dir.join(name).exists()
    }

    pub fn save_manifest(&mut self) -> Result<(), String> {
        write_atomic(&self.dir.join(MANIFEST), &self.manifest.to_bytes()?)?;
        self.recorded = true;
        Ok(())
    }

    /// A fresh run that could not start leaves nothing behind: the folder goes (when this
    /// process made it) or is emptied again.
    pub fn discard(self) {
        if !self.fresh || self.recorded {
            return;
        }
        if self.created {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = clear(&self.dir, true);
        }
    }
}

/// What `--resume` says of a finished run: its test figures, from its checked metrics.json.
fn finished(dir: &Path, manifest: Manifest, trust: Trust) -> Result<String, String> {
    let reader = ReadFolder { dir: dir.to_path_buf(), manifest: Some(manifest), trust };
    let metrics: serde_json::Value = serde_json::from_slice(&reader.read("metrics.json")?)
        .map_err(|e| format!("{}: {e}", dir.join("metrics.json").display()))?;
    let test = |k: &str| metrics["test"][k].as_f64().map_or("-".to_string(), |v| format!("{v:.5}"));
    Ok(format!(
        "{} holds a finished run (test auc {} gauc {} logloss {}, best step {}): nothing to resume; its files are left as they are",
        dir.display(),
        test("auc"),
        test("gauc"),
        test("logloss"),
        metrics["best_step"]
    ))
}

/// Tries to take `dir` for a fresh run: made here, or existing and empty, or (`force`) a
/// run folder cleared; a folder that holds anything is `Taken` unless `strict`, when it is
/// an error.
fn try_claim(dir: &Path, strict: bool, force: bool) -> Result<Claim, String> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let created = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => false,
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    };
    let had_lock = dir.join(LOCK).exists();
    let lock = match lock_folder(dir)? {
        Ok(lock) => lock,
        Err(pid) if strict => return Err(busy(dir, &pid)),
        Err(pid) => return Ok(Claim::Taken(format!("is in use by another mdl run (pid {pid})"))),
    };
    let held = contents(dir)?;
    if held.is_empty() {
        return Ok(Claim::Ours(lock, created, false));
    }
    let refuse = |why: String| {
        if !had_lock {
            let _ = std::fs::remove_file(dir.join(LOCK));
        }
        Err(why)
    };
    if !strict {
        drop(lock);
        if !had_lock {
            let _ = std::fs::remove_file(dir.join(LOCK));
        }
        return Ok(Claim::Taken(format!(
            "already holds a run (`mdl run --resume {}` continues it if it was interrupted)",
            dir.display()
        )));
    }
    let listing = held.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
    if !force {
        return refuse(format!(
            "{} already holds files ({listing}{}): a fresh run never reuses another run's files; `mdl run --resume {}` continues an interrupted run, --force clears the folder, or choose another --out",
            dir.display(),
            if held.len() > 6 { ", ..." } else { "" },
            dir.display()
        ));
    }
    if !held.iter().any(|n| RUN_FILES.contains(&n.as_str())) {
        return refuse(format!(
            "{} holds files that are not a run folder's ({listing}): --force clears only run folders; choose another --out",
            dir.display()
        ));
    }
    clear(dir, false).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    Ok(Claim::Ours(lock, created, true))
}

/// The names in `dir` other than the lock file, sorted.
fn contents(dir: &Path) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK)
        .collect();
    names.sort();
    Ok(names)
}

/// Removes everything in `dir` but (unless `with_lock`) the lock file.
fn clear(dir: &Path, with_lock: bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name() == LOCK && !with_lock {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Takes the folder's lock; `Err(pid)` names the holder when another process has it.
fn lock_folder(dir: &Path) -> Result<Result<File, String>, String> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Ok(Err(if pid.is_empty() { "unknown".to_string() } else { pid.to_string() }));
        }
        Err(TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
    }
    Ok(Ok(file))
}

/// Writes this process's pid into the lock file it holds, for a second writer's message.
fn announce(lock: &mut File, dir: &Path) -> Result<(), String> {
    let written = lock.set_len(0).and_then(|()| lock.rewind()).and_then(|()| writeln!(lock, "{}", std::process::id()));
    written.map_err(|e| format!("cannot write {}: {e}", dir.join(LOCK).display()))
}

fn busy(dir: &Path, pid: &str) -> String {
    format!("{} is in use by another mdl run (pid {pid}); wait for it to end, or choose another folder", dir.display())
}

/// `path` absolute, with `.` and `..` resolved by name.
fn normalize(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A finished (or interrupted) run folder opened for reading (`mdl eval`, `mdl predict`):
/// its manifest, against which every file read is checked.
pub struct ReadFolder {
    dir: PathBuf,
    /// None for a folder of an older mdl (read only with `--force`).
    manifest: Option<Manifest>,
    trust: Trust,
}

impl ReadFolder {
    pub fn open(dir: &Path, trust: Trust) -> Result<ReadFolder, String> {
        if !dir.join("config.yaml").exists() {
            return Err(format!("{} is not a run folder (no config.yaml)", dir.display()));
        }
        let manifest = Manifest::read(dir)?;
        if manifest.is_none() {
            trust.problem(format!(
                "{} has no {MANIFEST} (a run folder of an older mdl): nothing says its files belong together",
                dir.display()
            ))?;
        }
        Ok(ReadFolder { dir: dir.to_path_buf(), manifest, trust })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// A file of the run, checked against the checksum the manifest recorded for it.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        let path = self.dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some(m) = &self.manifest {
            match m.files.get(name) {
                Some(want) if *want == sha256_hex(&bytes) => {}
                Some(_) => self.trust.problem(format!(
                    "{} has changed since the run wrote it (its SHA-256 is not the one {MANIFEST} records)",
                    path.display()
                ))?,
                None => self
                    .trust
                    .problem(format!("{} is not a file the run wrote ({MANIFEST} does not list it)", path.display()))?,
            }
        }
        Ok(bytes)
    }

    /// The spec to compile: the run folder's copy ([`checked_spec_copy`]), or without one
    /// (an older run folder) the experiment's own spec.
    pub fn spec(&self, configured: &Path) -> Result<(PathBuf, Vec<String>), String> {
        match &self.manifest {
            Some(m) => checked_spec_copy(&self.dir, m, self.trust),
            None => Ok((configured.to_path_buf(), Vec::new())),
        }
    }
}

/// The run folder's copy of the root spec, every copied file checked against the
/// manifest, with a note for each original that has changed since the run started.
fn checked_spec_copy(dir: &Path, m: &Manifest, trust: Trust) -> Result<(PathBuf, Vec<String>), String> {
    for f in &m.spec {
        let copy = dir.join(&f.copy);
        let bytes = std::fs::read(&copy).map_err(|e| format!("cannot read {}: {e}", copy.display()))?;
        if sha256_hex(&bytes) != f.sha256 {
            trust.problem(format!(
                "{} has changed since the run copied it (its SHA-256 is not the one {MANIFEST} records)",
                copy.display()
            ))?;
        }
    }
    let root = m.spec_root().ok_or_else(|| format!("{}: {MANIFEST} names no spec", dir.display()))?;
    Ok((dir.join(root), spec_notes(dir, m)))
}

/// Checks a file of a run folder against the checksum its manifest records for it, for
/// readers that take a finished run's figures as they are (`mdl report`): a folder without
/// a manifest, or a file the manifest does not list, passes.
pub fn check_recorded(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    match Manifest::read(dir)?.and_then(|m| m.files.get(name).cloned()) {
        Some(want) if want != sha256_hex(bytes) => Err(format!(
            "{} has changed since the run wrote it (its SHA-256 is not the one {MANIFEST} records)",
            dir.join(name).display()
        )),
        _ => Ok(()),
    }
}

/// Whether the run folder's manifest lists `name` among the files the run wrote.
pub fn recorded(dir: &Path, name: &str) -> Result<bool, String> {
    Ok(Manifest::read(dir)?.is_some_and(|m| m.files.contains_key(name)))
}

/// A note for each spec file whose original has changed since the run copied it.
pub fn spec_notes(dir: &Path, manifest: &Manifest) -> Vec<String> {
    manifest
        .spec
        .iter()
        .filter(|f| std::fs::read(&f.original).is_ok_and(|b| sha256_hex(&b) != f.sha256))
        .map(|f| {
            format!(
                "note: {} has changed since the run started; using the run folder's copy {}",
                f.original.display(),
                dir.join(&f.copy).display()
            )
        })
        .collect()
}

/// The keys whose values differ between two resolved experiments (YAML), as
/// `key: old -> new`, in key order.
pub fn config_changes(old: &str, new: &str) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&serde_yaml::Value>, b: Option<&serde_yaml::Value>, out: &mut Vec<String>) {
        use serde_yaml::Value;
        if let (Some(Value::Mapping(x)), Some(Value::Mapping(y))) = (a, b) {
            let mut keys: Vec<String> = x
                .keys()
                .chain(y.keys())
                .map(|k| serde_yaml::to_string(k).unwrap_or_default().trim().to_string())
                .collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = Value::String(k.clone());
                let path = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                walk(&path, x.get(&key), y.get(&key), out);
            }
            return;
        }
        if a != b {
            let show = |v: Option<&Value>| {
                v.map_or("(none)".to_string(), |v| {
                    serde_yaml::to_string(v).unwrap_or_default().trim().replace('\n', " ")
                })
            };
            out.push(format!("{prefix}: {} -> {}", show(a), show(b)));
        }
    }
    let parse = |t: &str| serde_yaml::from_str::<serde_yaml::Value>(t).ok();
    let mut out = Vec::new();
    walk("", parse(old).as_ref(), parse(new).as_ref(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mdl-folder-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_damaged_manifest_is_refused() {
        let d = scratch("manifest");
        let (mut folder, note) = RunFolder::claim(&d, true, false, "abc").unwrap();
        assert_eq!(note, None);
        folder.write("config.yaml", b"x: 1\n").unwrap();
        folder.save_manifest().unwrap();
        let read = Manifest::read(&d).unwrap().unwrap();
        assert_eq!(read, folder.manifest);
        let text =
            std::fs::read_to_string(d.join(MANIFEST)).unwrap().replace("\"finished\": false", "\"finished\": true");
        std::fs::write(d.join(MANIFEST), text).unwrap();
        let err = Manifest::read(&d).unwrap_err();
        assert!(err.contains("its checksum does not match its contents"), "{err}");
        drop(folder);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The experiment's folder gives way to `-2` while another writer holds it (and to
    /// `-3` once `-2` holds a run); an explicit one is refused naming the holder's pid; a
    /// fresh run that could not start leaves nothing behind.
    #[test]
    fn a_held_folder_is_numbered_or_refused_and_a_failed_start_is_removed() {
        let d = scratch("claim");
        let (mut first, _) = RunFolder::claim(&d, false, false, "abc").unwrap();
        let (second, note) = RunFolder::claim(&d, false, false, "abc").unwrap();
        let pid = std::process::id();
        let numbered = d.with_file_name(format!("{}-2", d.file_name().unwrap().to_string_lossy()));
        assert_eq!(second.dir(), numbered);
        let expected =
            format!("{} is in use by another mdl run (pid {pid}); this run writes {}", d.display(), numbered.display());
        assert_eq!(note.as_deref(), Some(expected.as_str()));
        let err = RunFolder::claim(&d, true, true, "abc").err().unwrap();
        assert!(err.starts_with(&format!("{} is in use by another mdl run (pid {pid})", d.display())), "{err}");
        second.discard();
        assert!(!numbered.exists(), "a fresh run that could not start left its folder");
        first.write("config.yaml", b"x: 1\n").unwrap();
        first.save_manifest().unwrap();
        drop(first);
        let (third, note) = RunFolder::claim(&d, false, false, "abc").unwrap();
        assert_eq!(third.dir(), numbered);
        assert!(note.unwrap().contains("already holds a run"));
        third.discard();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_changed_keys_are_listed() {
        let old = "name: q\ntrain:\n  lr: 0.001\n  epochs: 3\n";
        let new = "name: q\ntrain:\n  lr: 0.01\n  epochs: 3\nbackend: interp\n";
        assert_eq!(config_changes(old, new), ["backend: (none) -> interp", "train.lr: 0.001 -> 0.01"]);
        assert!(config_changes(old, old).is_empty());
    }

    #[test]
    fn paths_are_normalized_by_name() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d.mdl")), PathBuf::from("/a/c/d.mdl"));
    }
}
