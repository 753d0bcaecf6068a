//! The one atomic file write of the front end ([`write_atomic`], and [`AtomicFile`] for a
//! file written piece by piece): the data cache, the run folder's JSON and YAML files and
//! `mdl predict`'s output all go through it, so no reader
//! (a resumed run, `mdl report`, a user's script) ever sees half a file, and a file it
//! wrote is on disk before it returns. Checkpoints are written by the runtime
//! (`mdl_runtime::checkpoint`), the same way. [`remove_stale_temporaries`] removes what a
//! killed writer of either kind left behind, and [`sha256_hex`] is the digest the run
//! folder's manifest records. And the bounded read of the text files mdl is given (specs, the files they `use`,
//! experiments: [`read_text`]), so that no path makes a read block or grow without end.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder (unique per
/// process and moment, hidden, ending in `.tmp`), synced to disk, then a rename over the
/// final name and a sync of the folder, so a crash leaves the old file or the new one. On
/// failure the temporary file is removed and the error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(|e| file.error(e))?;
    file.commit()
}

/// A file written piece by piece that appears under its name only once complete
/// ([`commit`](Self::commit)), as [`write_atomic`] writes one: until then it is a temporary
/// file in the same folder, removed if the writer is dropped uncommitted.
pub struct AtomicFile {
    path: PathBuf,
    folder: PathBuf,
    temporary: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile, String> {
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temporary = folder.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
        let file = File::create(&temporary).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            folder: folder.to_path_buf(),
            temporary,
            writer: Some(BufWriter::with_capacity(1 << 16, file)),
        })
    }

    /// The error of a failed write, naming the final path.
    pub fn error(&self, e: std::io::Error) -> String {
        format!("cannot write {}: {e}", self.path.display())
    }

    /// Writes what is buffered and waits until the file's data is on disk (a long file synced
    /// as it is written leaves little for [`commit`](Self::commit)'s sync).
    pub fn sync_data(&mut self) -> std::io::Result<()> {
        match &mut self.writer {
            Some(writer) => writer.flush().and_then(|()| writer.get_ref().sync_data()),
            None => Ok(()),
        }
    }

    /// Syncs the file to disk, renames it over the final name and syncs the folder, so a
    /// crash leaves the old file or the new one.
    pub fn commit(mut self) -> Result<(), String> {
        let synced = match self.writer.take() {
            Some(writer) => writer.into_inner().map_err(|e| e.into_error()).and_then(|file| file.sync_all()),
            None => Ok(()),
        };
        synced.and_then(|()| std::fs::rename(&self.temporary, &self.path)).map_err(|e| self.error(e))?;
        // The rename itself is durable once the folder is synced (not every platform can).
        if let Ok(dir) = File::open(&self.folder) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.writer {
            Some(writer) => writer.write(bytes),
            None => Err(std::io::Error::other("the file is already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.as_mut().map_or(Ok(()), |w| w.flush())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Nothing is left under the temporary name, committed (renamed) or not.
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// The process id in the name of a temporary file a writer of this crate or the runtime
/// leaves while it writes: `.<name>.<pid>.<nanos>.tmp` ([`write_atomic`]) or
/// `<name>.tmp-<pid>` (checkpoints).
fn temporary_owner(name: &str) -> Option<u32> {
    if let Some((_, pid)) = name.rsplit_once(".tmp-") {
        return pid.parse().ok();
    }
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '.');
    let _nanos: u32 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|rest| !rest.is_empty()).map(|_| pid)
}

/// Whether process `pid` may still be running (on Linux, whether `/proc/<pid>` exists;
/// elsewhere a process is assumed alive, so nothing of another process is removed).
fn may_be_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the temporary files that writers killed before their rename left in `folder`
/// (see [`temporary_owner`]); with `only_dead`, only those of processes no longer running
/// (a shared folder such as the data cache), else all (a folder this process holds the
/// lock of). Returns the names removed; a folder that cannot be read has none.
pub fn remove_stale_temporaries(folder: &Path, only_dead: bool) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_owner(&name) else { continue };
        if (only_dead && may_be_alive(pid)) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// The SHA-256 of `bytes` as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The most bytes a spec, a file it `use`s, or an experiment file may have.
pub const MAX_TEXT_BYTES: u64 = 4 << 20;

/// Reads a text file of at most [`MAX_TEXT_BYTES`]: a regular file only, since a device
/// (`/dev/zero`) never ends and a FIFO may block forever. The error does not name the
/// path (the caller does: "cannot read PATH: ERROR").
pub fn read_text(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let too_big = || format!("larger than {} MiB, the most a spec or experiment file may have", MAX_TEXT_BYTES >> 20);
    if meta.len() > MAX_TEXT_BYTES {
        return Err(too_big());
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_TEXT_BYTES {
        return Err(too_big());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_text_takes_regular_files_only() {
        assert_eq!(read_text(Path::new("/dev/zero")).unwrap_err(), "not a regular file");
        assert_eq!(read_text(Path::new("/")).unwrap_err(), "not a regular file");
        assert!(read_text(Path::new("Cargo.toml")).unwrap().contains("[package]"));
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let folder = std::env::temp_dir().join(format!("mdl-files-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join("metrics.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["metrics.json"]);
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join("mdl-no-such-folder").join("x").join("out.csv");
        let err = write_atomic(&path, b"1").unwrap_err();
        assert!(err.starts_with(&format!("cannot write {}", path.display())), "{err}");
    }

    #[test]
    fn temporaries_are_recognised_by_their_writers_names() {
        assert_eq!(temporary_owner("last.ckpt.tmp-4242"), Some(4242));
        assert_eq!(temporary_owner(".0a1b.mdldata.4242.123456789.tmp"), Some(4242));
        assert_eq!(temporary_owner(".metrics.json.17.5.tmp"), Some(17));
        for other in ["last.ckpt", "metrics.json", ".lock", "x.tmp", ".4242.5.tmp", "a.tmp-x"] {
            assert_eq!(temporary_owner(other), None, "{other}");
        }
    }

    /// A killed writer's temporaries go (all of them in a folder this process holds; only
    /// those of dead processes in a shared one), and nothing else does.
    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let folder = std::env::temp_dir().join(format!("mdl-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder).unwrap();
        // u32::MAX is above any Linux pid limit: a process that is not running.
        let dead = u32::MAX;
        let mine = std::process::id();
        let names = [
            format!("last.ckpt.tmp-{dead}"),
            format!(".0a1b.mdldata.{dead}.99.tmp"),
            format!(".metrics.json.{mine}.1.tmp"),
            "metrics.json".to_string(),
            "best.ckpt".to_string(),
        ];
        for n in &names {
            std::fs::write(folder.join(n), b"x").unwrap();
        }
        let removed = remove_stale_temporaries(&folder, true);
        if Path::new("/proc/self").exists() {
            assert_eq!(removed, [names[1].clone(), names[0].clone()]);
        }
        let removed = remove_stale_temporaries(&folder, false);
        assert!(removed.contains(&names[2]), "{removed:?}");
        let mut left: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["best.ckpt", "metrics.json"]);
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
