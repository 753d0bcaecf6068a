//! Where a split's rows come from: one file, a folder of part files, or a glob pattern of
//! them (as Spark and Hive write a table: `part-00000-….csv.gz`, `part-00001-…`, …), and the
//! format of each part.
//!
//! * [`parts`] lists the files of a path: a folder gives every regular file in it whose name
//!   does not start with `.` or `_` (Spark's `_SUCCESS` and `.crc` files), a path that does
//!   not exist but holds `*`, `?` or `[` is a glob pattern (the `glob` crate) giving every
//!   regular file it matches; either way sorted by path, and finding none is an error naming
//!   the folder or pattern. Any other path is the one file itself.
//! * [`Format::of`] tells a Parquet file (`PAR1` at its start) from CSV text (plain or
//!   gzipped); the name's extension does not matter.
//!
//! The parts of one split are read in that order as one table; each must have the columns
//! of the first part, in the same order (the error names the part that differs).

use std::path::{Path, PathBuf};

use super::DataError;

/// A file's format, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// CSV text (or another delimiter), plain or gzip-compressed.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format of a file that starts with `head`.
    pub fn of(head: &[u8]) -> Format {
        if head.starts_with(b"PAR1") {
            Format::Parquet
        } else {
            Format::Csv
        }
    }
}

/// Whether `path` is written as a glob pattern.
pub fn is_pattern(path: &Path) -> bool {
    path.to_string_lossy().contains(['*', '?', '['])
}

/// The files `path` stands for, in the order they are read (see the module doc). `-`
/// (stdin) is itself.
pub fn parts(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    if path.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| DataError::io(path, &format!("cannot list the folder: {e}")))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(path, &format!("cannot list the folder: {e}")))?;
            let name = entry.file_name();
            let hidden = name.to_string_lossy().starts_with(['.', '_']);
            if !hidden && entry.path().is_file() {
                files.push(entry.path());
            }
        }
        if files.is_empty() {
            return Err(DataError::io(
                path,
                "the folder holds no data files (names starting with `.` or `_` are passed over)",
            ));
        }
        files.sort();
        return Ok(files);
    }
    if path.exists() || !is_pattern(path) {
        return Ok(vec![path.to_path_buf()]);
    }
    let pattern = path.to_string_lossy();
    let matches = glob::glob(&pattern).map_err(|e| DataError::io(path, &format!("not a valid glob pattern: {e}")))?;
    let mut files = Vec::new();
    for found in matches {
        let found = found.map_err(|e| DataError::io(e.path(), &format!("cannot read: {}", e.error())))?;
        if found.is_file() {
            files.push(found);
        }
    }
    if files.is_empty() {
        return Err(DataError::io(path, "the pattern matches no file"));
    }
    files.sort();
    Ok(files)
}

/// Checks that a later part of a split has the first part's columns: the error names the
/// part, the first part and the first difference.
pub(crate) fn check_same_columns(first: (&Path, &[String]), part: (&Path, &[String])) -> Result<(), DataError> {
    let ((first_path, expected), (path, found)) = (first, part);
    if expected == found {
        return Ok(());
    }
    let difference = match expected.iter().zip(found).position(|(a, b)| a != b) {
        Some(i) => format!("column {} is '{}' there and '{}' here", i + 1, expected[i], found[i]),
        None => format!("{} columns there, {} here", expected.len(), found.len()),
    };
    Err(DataError::Parts {
        file: path.to_path_buf(),
        message: format!(
            "its columns differ from those of the split's first part {} ({difference}); every part of a \
             split must have the same columns in the same order",
            first_path.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_patterns_list_their_files_sorted_and_finding_none_is_an_error() {
        let folder = std::env::temp_dir().join(format!("mdl-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        for name in ["part-00001.csv", "part-00000.csv", "_SUCCESS", ".part-00000.csv.crc", "other.csv"] {
            std::fs::write(folder.join(name), "a\n1\n").unwrap();
        }
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names(parts(&folder).unwrap()), ["other.csv", "part-00000.csv", "part-00001.csv"]);
        assert_eq!(names(parts(&folder.join("part-*.csv")).unwrap()), ["part-00000.csv", "part-00001.csv"]);
        assert_eq!(parts(&folder.join("other.csv")).unwrap(), [folder.join("other.csv")]);
        let none = folder.join("part-*.parquet");
        assert_eq!(parts(&none).unwrap_err().to_string(), format!("{}: the pattern matches no file", none.display()));
        assert_eq!(
            parts(&folder.join("sub")).unwrap_err().to_string(),
            format!(
                "{}: the folder holds no data files (names starting with `.` or `_` are passed over)",
                folder.join("sub").display()
            )
        );
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn parts_with_other_columns_are_named() {
        let (a, b) = (Path::new("p0.csv"), Path::new("p1.csv"));
        let cols = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(check_same_columns((a, &cols(&["x", "y"])), (b, &cols(&["x", "y"]))).is_ok());
        assert_eq!(
            check_same_columns((a, &cols(&["x", "y"])), (b, &cols(&["x", "z"]))).unwrap_err().to_string(),
            "p1.csv: its columns differ from those of the split's first part p0.csv (column 2 is 'y' there and \
             'z' here); every part of a split must have the same columns in the same order"
        );
        assert!(check_same_columns((a, &cols(&["x"])), (b, &cols(&["x", "y"])))
            .unwrap_err()
            .to_string()
            .contains("(1 columns there, 2 here)"));
    }
}
