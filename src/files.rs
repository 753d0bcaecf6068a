//! The one atomic file write of the front end ([`write_atomic`]): the data cache, the run
//! folder's JSON and YAML files and `mdl predict`'s output all go through it, so no reader
//! (a resumed run, `mdl report`, a user's script) ever sees half a file. Checkpoints are
//! written by the runtime (`mdl_runtime::checkpoint`), which also syncs them to disk.

use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder (unique per
/// process and moment, hidden, ending in `.tmp`), then a rename over the final name. On
/// failure the temporary file is removed and the error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = folder.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
