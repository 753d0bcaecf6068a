//! The documentation is checked against the code it describes:
//! - every model in a fenced block of README.md and docs/*.md passes `mdl check` (a block is
//!   a model when its first line that is not blank or a comment starts with `model `); a
//!   block whose first line is `# mdl check --bind EXPERIMENT.yaml` (a path from the
//!   repository root) is checked with that experiment's sizes;
//! - the standard-library list of docs/language.md names every block of specs/std.mdl,
//!   and its built-in table every built-in function;
//! - docs (README.md, docs/*.md and every module's `//!` doc) cite only files that exist in
//!   the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/, sorted.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root().join("README.md"));
    docs
}

/// A fenced code block: the line its text starts on (1-based) and the text.
struct Fenced {
    line: usize,
    text: String,
}

fn fenced_blocks(markdown: &str) -> Vec<Fenced> {
    let mut blocks = Vec::new();
    let mut open: Option<Fenced> = None;
    for (i, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            match open.take() {
                Some(block) => blocks.push(block),
                None => open = Some(Fenced { line: i + 2, text: String::new() }),
            }
        } else if let Some(block) = open.as_mut() {
            block.text.push_str(line);
            block.text.push('\n');
        }
    }
    assert!(open.is_none(), "an unclosed code fence");
    blocks
}

fn is_model(block: &Fenced) -> bool {
    block
        .text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("model "))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

#[test]
fn every_model_in_the_docs_passes_mdl_check() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("doc-models");
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for block in fenced_blocks(&text).iter().filter(|b| is_model(b)) {
            let place = format!("{}:{}", relative(&doc), block.line);
            let spec = dir.join(format!("{}-{}.mdl", doc.file_stem().unwrap().to_string_lossy(), block.line));
            std::fs::write(&spec, &block.text).unwrap();
            let mut check = Command::new(env!("CARGO_BIN_EXE_mdl"));
            check.arg("check").arg(&spec);
            if let Some(exp) = block.text.lines().next().and_then(|l| l.trim().strip_prefix("# mdl check --bind ")) {
                check.arg("--bind").arg(root().join(exp.trim()));
            }
            let out = check.output().unwrap();
            if !out.status.success() {
                failures.push(format!("{place}:\n{}", String::from_utf8_lossy(&out.stderr)));
            }
            checked.push(place);
        }
    }
    assert!(failures.is_empty(), "models in the docs that fail `mdl check`:\n{}", failures.join("\n"));
    // The README's tour and the language reference's whole spec at least: a test that
    // found no model would pass by checking nothing.
    for doc in ["README.md", "docs/language.md"] {
        assert!(checked.iter().any(|p| p.starts_with(doc)), "no model block found in {doc}; checked {checked:?}");
    }
}

/// The names of the blocks `specs/std.mdl` declares.
fn std_blocks() -> Vec<String> {
    let std = std::fs::read_to_string(root().join("specs/std.mdl")).unwrap();
    std.lines()
        .filter_map(|l| l.strip_prefix("block "))
        .map(|rest| rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap().to_string())
        .collect()
}

#[test]
fn the_language_reference_lists_every_standard_block() {
    let language = std::fs::read_to_string(root().join("docs/language.md")).unwrap();
    let section = language
        .split("## Standard library")
        .nth(1)
        .expect("docs/language.md has a `## Standard library` section")
        .split("\n## ")
        .next()
        .unwrap();
    let blocks = std_blocks();
    assert!(blocks.len() >= 10, "std.mdl parsed into too few blocks: {blocks:?}");
    let missing: Vec<&String> = blocks.iter().filter(|b| !section.contains(&format!("`{b}("))).collect();
    assert!(missing.is_empty(), "blocks of specs/std.mdl missing from docs/language.md's list: {missing:?}");
}

/// Every built-in function (`src/lower/builtins.rs`'s `BUILTINS`) is named in the first
/// column of the "Built-in functions" table of docs/language.md.
#[test]
fn the_language_reference_lists_every_builtin() {
    let language = std::fs::read_to_string(root().join("docs/language.md")).unwrap();
    let section = language
        .split("## Built-in functions")
        .nth(1)
        .expect("docs/language.md has a `## Built-in functions` section")
        .split("\n## ")
        .next()
        .unwrap();
    let listed: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix('|')?.split('|').next())
        .flat_map(|first| first.split(|c: char| !(c.is_alphanumeric() || c == '_')))
        .collect();
    let names = mdl::lower::builtins::names();
    assert!(names.len() >= 30, "too few built-ins found: {names:?}");
    let missing: Vec<&&str> = names.iter().filter(|n| !listed.contains(n)).collect();
    assert!(missing.is_empty(), "built-ins missing from docs/language.md's table: {missing:?}");
}

/// Paths a document cites: link targets and code spans that look like repository paths
/// (`src/...`, `runtime/...`, `docs/...`, `specs/...`, `experiments/...`, `tests/...`,
/// `scripts/...`, or a top-level `*.md`).
fn cited_paths(markdown: &str) -> Vec<String> {
    const ROOTS: &[&str] = &["src/", "runtime/", "docs/", "specs/", "experiments/", "tests/", "scripts/", "grammar/"];
    let mut cited = Vec::new();
    for piece in markdown.split(['`', '(', ')', ' ', '\n', '[', ']']) {
        let piece = piece.trim_end_matches([',', '.', ':', ';']);
        let path = piece.split(['#', ':']).next().unwrap_or("");
        let looks_like_file = path.rsplit('/').next().is_some_and(|name| name.contains('.'));
        let rooted = ROOTS.iter().any(|r| path.starts_with(r));
        let top_level_doc = !path.contains('/') && path.ends_with(".md") && path.len() > 3;
        if (rooted && looks_like_file) || top_level_doc {
            cited.push(path.to_string());
        }
    }
    cited
}

/// Every `.rs` file under src/ and runtime/src/.
fn rust_sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("src"), &mut out);
    walk(&root().join("runtime/src"), &mut out);
    out.sort();
    out
}

#[test]
fn docs_and_module_docs_cite_only_files_in_the_repository() {
    let mut texts: Vec<(PathBuf, String)> =
        documents().into_iter().map(|d| (d.clone(), std::fs::read_to_string(&d).unwrap())).collect();
    for path in rust_sources() {
        let doc: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        texts.push((path, doc));
    }
    let mut missing = Vec::new();
    for (doc, text) in &texts {
        let base = doc.parent().unwrap();
        for cited in cited_paths(text) {
            // Links in docs/*.md are relative to docs/; plain mentions are from the root; a
            // bare document name (a link's label) may also name one of docs/.
            let exists = root().join(&cited).exists()
                || base.join(&cited).exists()
                || (!cited.contains('/') && root().join("docs").join(&cited).exists());
            if !exists {
                missing.push(format!("{} cites {cited}", relative(doc)));
            }
        }
    }
    assert!(missing.is_empty(), "citations of files that are not in the repository:\n{}", missing.join("\n"));
}

#[test]
fn citation_scanner_finds_paths() {
    let found = cited_paths("see [`specs/std.mdl`](specs/std.mdl), `runtime/src/ops/mod.rs:12` and DESIGN.md.");
    assert_eq!(found, ["specs/std.mdl", "specs/std.mdl", "runtime/src/ops/mod.rs", "DESIGN.md"]);
}
