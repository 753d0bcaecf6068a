//! The files of one compilation: the standard library, the root spec and the files it
//! `use`s (each parsed once, relative to the file that uses it), then the blocks they
//! define (no built-in redefined, none twice) and the model to compile (the root file's
//! only model, or the one named). A `use`d file must be a regular `.mdl` file of bounded
//! size ([`crate::files::read_text`]).

use super::{builtins, Blocks};
use crate::diag::{suggest, Diagnostic, SourceMap, Span};
use crate::syntax::ast;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A parsed file and the folder its `use` paths are relative to.
pub(super) type Loaded = (ast::Module, Option<PathBuf>);

/// Parses the standard library (unless `file` is it), the root file and everything it
/// `use`s, with every syntax error and unreadable `use` of all of them.
pub(super) fn parse_all(map: &mut SourceMap, file: u32, dir: Option<&Path>) -> Result<Vec<Loaded>, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut roots = vec![(file, dir)];
    if map.text(file) != super::STD_SOURCE {
        roots.insert(0, (map.add("std.mdl", super::STD_SOURCE.to_string()), None));
    }
    let mut modules = Vec::new();
    for (f, d) in roots {
        match crate::syntax::parse(map, f) {
            Ok(m) => modules.push((m, d.map(|p: &Path| p.to_path_buf()))),
            Err(mut e) => diags.append(&mut e),
        }
    }
    // `use "x.mdl"`: load once each, relative to the using file.
    let mut i = modules.len().saturating_sub(1);
    let mut loaded: Vec<PathBuf> = Vec::new();
    while i < modules.len() {
        let uses: Vec<(String, Span)> = modules[i]
            .0
            .items
            .iter()
            .filter_map(|it| match it {
                ast::Item::Use { path, span } => Some((path.clone(), *span)),
                _ => None,
            })
            .collect();
        let base = modules[i].1.clone().unwrap_or_default();
        for (p, span) in uses {
            let full = base.join(&p);
            if loaded.contains(&full) {
                continue;
            }
            loaded.push(full.clone());
            // Only spec files: a diagnostic shows lines of the file it points into, and
            // must never show those of another kind of file (`use "/etc/passwd"`).
            if full.extension().is_none_or(|e| e != "mdl") {
                diags.push(
                    Diagnostic::error(span, format!("`use` takes a spec file (ending in `.mdl`), found `{p}`"))
                        .label("imported here"),
                );
                continue;
            }
            match crate::files::read_text(&full) {
                Ok(text) => {
                    let f = map.add(full.display().to_string(), text);
                    match crate::syntax::parse(map, f) {
                        Ok(m) => modules.push((m, full.parent().map(|d| d.to_path_buf()))),
                        Err(mut e) => diags.append(&mut e),
                    }
                }
                Err(e) => diags.push(Diagnostic::error(span, format!("cannot read `{p}`: {e}")).label("imported here")),
            }
        }
        i += 1;
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(modules)
}

/// The blocks of all loaded files, by name, and the model of the root file `file` to
/// compile: the one named `model`, or its only one.
pub(super) fn definitions(
    modules: &[Loaded],
    file: u32,
    model: Option<&str>,
) -> Result<(Blocks, ast::ModelDef), Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut blocks = Blocks::new();
    let mut models: Vec<ast::ModelDef> = Vec::new();
    for (m, _) in modules {
        for it in &m.items {
            match it {
                ast::Item::Block(b) => {
                    if builtins::is_builtin(&b.name.name) {
                        diags.push(
                            Diagnostic::error(b.name.span, format!("`{}` is a built-in function", b.name.name))
                                .label("cannot be redefined")
                                .hint("choose another name for the block"),
                        );
                    } else if let Some(prev) = blocks.get(&b.name.name) {
                        diags.push(
                            Diagnostic::error(b.name.span, format!("block `{}` is defined twice", b.name.name))
                                .label("second definition")
                                .note(prev.name.span, "first defined here"),
                        );
                    } else {
                        blocks.insert(b.name.name.clone(), Rc::new(b.clone()));
                    }
                }
                ast::Item::Model(md) => models.push(md.clone()),
                ast::Item::Use { .. } => {}
            }
        }
    }
    // Only models of the root file count.
    models.retain(|m| m.span.file == file);
    let chosen = match model {
        Some(name) => models.iter().find(|m| m.name.name == name).cloned().ok_or_else(|| {
            let names: Vec<&str> = models.iter().map(|m| m.name.name.as_str()).collect();
            let mut d = Diagnostic::error(Span { file, start: 0, end: 0 }, format!("no model `{name}` in this file"));
            if let Some(s) = suggest(name, names.iter().copied()) {
                d = d.hint(format!("did you mean `{s}`?"));
            }
            d
        }),
        None => match models.len() {
            1 => Ok(models[0].clone()),
            0 => Err(Diagnostic::error(Span { file, start: 0, end: 0 }, "this file defines no model")
                .hint("a spec needs `model name(...) { ... }`")),
            _ => Err(Diagnostic::error(models[1].name.span, "this file defines more than one model")
                .label("second model")
                .hint("name the model to compile")),
        },
    };
    match chosen {
        Ok(m) if diags.is_empty() => Ok((blocks, m)),
        Ok(_) => Err(diags),
        Err(d) => {
            diags.push(d);
            Err(diags)
        }
    }
}
