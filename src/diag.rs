//! Diagnostics shared by the whole compiler: source spans, the map of loaded source
//! files, error values, and their rendering as `file:line:col` plus a caret under the
//! offending text.
//!
//! Every phase (parser, checker, lowering, experiment loading) reports problems as
//! [`Diagnostic`] values pointing at a [`Span`]; only the CLI turns them into text with
//! [`render`]. Checking and lowering record them in a [`Diagnostics`] list, whose
//! [`Reported`] token is their error value. Nothing here panics, whatever span or file id
//! it is handed: a span that does not fit its file is clamped, and an unknown file renders
//! as `<unknown>`.
//!
//! Messages reach stderr through [`say!`](crate::say) and [`say_partial!`](crate::say_partial),
//! never `eprintln!`: a stderr whose reader has gone (`mdl run ... 2>&1 | head -3`) loses
//! the message, not the command. A run goes on training and logging to train.log, and a
//! check still exits with its own status; `eprintln!` would panic there.

use std::fmt::Write as _;
use std::ops::Range;

/// Writes text to stderr, dropping it when stderr cannot take it (see the module doc).
pub fn write_stderr(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.flush());
}

/// `eprintln!` that never panics: a line to stderr, dropped when stderr has gone.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::diag::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` that never panics: text to stderr without a newline, dropped when stderr has gone.
#[macro_export]
macro_rules! say_partial {
    ($($arg:tt)*) => {
        $crate::diag::write_stderr(format_args!($($arg)*))
    };
}

/// A byte range `start..end` in file `file` of a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub file: u32,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: u32, start: u32, end: u32) -> Self {
        Span { file, start, end }
    }

    /// The smallest span covering both `self` and `other` (same file assumed).
    pub fn to(self, other: Span) -> Span {
        Span { file: self.file, start: self.start.min(other.start), end: self.end.max(other.end) }
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The byte range, for slicing the file's text: `&text[span.range()]`.
    pub fn range(&self) -> Range<usize> {
        self.start as usize..self.end.max(self.start) as usize
    }
}

struct SourceFile {
    name: String,
    text: String,
    /// Byte offset at which each line starts; the first entry is 0.
    line_starts: Vec<usize>,
}

/// The source files of one compilation, addressed by the id that [`SourceMap::add`] returns.
#[derive(Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn new() -> Self {
        SourceMap::default()
    }

    /// Registers a file and returns its id (for [`Span::file`]).
    pub fn add(&mut self, name: impl Into<String>, text: String) -> u32 {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        self.files.push(SourceFile { name: name.into(), text, line_starts });
        (self.files.len() - 1) as u32
    }

    /// The number of files registered.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The file's name as given to [`SourceMap::add`]; `<unknown>` for an unknown id.
    pub fn name(&self, file: u32) -> &str {
        self.files.get(file as usize).map_or("<unknown>", |f| f.name.as_str())
    }

    /// The file's text; empty for an unknown id.
    pub fn text(&self, file: u32) -> &str {
        self.files.get(file as usize).map_or("", |f| f.text.as_str())
    }

    /// The 1-based line and column of a byte offset; the column counts characters.
    /// Offsets past the end clamp to the end, offsets inside a character to its start.
    pub fn line_col(&self, file: u32, byte: u32) -> (u32, u32) {
        let Some(f) = self.files.get(file as usize) else {
            return (1, 1);
        };
        let byte = floor_char_boundary(&f.text, byte as usize);
        let line = f.line_starts.partition_point(|&s| s <= byte).max(1) - 1;
        let col = f.text[f.line_starts[line]..byte].chars().count();
        ((line + 1) as u32, (col + 1) as u32)
    }

    /// Where `span` starts, as `file:line:col`.
    pub fn place(&self, span: Span) -> String {
        let (line, col) = self.line_col(span.file, span.start);
        format!("{}:{line}:{col}", self.name(span.file))
    }

    /// The text of 1-based line `line`, without its line ending; empty if out of range.
    pub fn line(&self, file: u32, line: u32) -> &str {
        let Some(f) = self.files.get(file as usize) else {
            return "";
        };
        let Some(&start) = f.line_starts.get((line as usize).wrapping_sub(1)) else {
            return "";
        };
        let end = f.line_starts.get(line as usize).copied().unwrap_or(f.text.len());
        f.text[start..end].trim_end_matches(['\n', '\r'])
    }
}

fn floor_char_boundary(text: &str, mut byte: usize) -> usize {
    byte = byte.min(text.len());
    while !text.is_char_boundary(byte) {
        byte -= 1;
    }
    byte
}

/// One problem found in the user's input, with the place it concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub message: String,
    pub span: Span,
    /// Short text printed after the carets; may be empty.
    pub label: String,
    pub hint: Option<String>,
    /// Further places worth showing (e.g. where a bracket was opened), each with a message.
    pub notes: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn error(span: Span, message: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), span, label: String::new(), hint: None, notes: Vec::new() }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn note(mut self, span: Span, message: impl Into<String>) -> Self {
        self.notes.push((span, message.into()));
        self
    }
}

/// Proof that a diagnostic was recorded: the error of every fallible step of checking and
/// lowering. Its field is private to this module, so only [`Diagnostics::report`] (and
/// [`Diagnostics::check`], on a list that is not empty) make one: an `Err(Reported)`
/// always has its message in the list, and a step cannot fail without saying why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reported(());

/// The diagnostics of one compilation, in the order they were found.
#[derive(Debug, Default)]
pub struct Diagnostics {
    list: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new() -> Self {
        Diagnostics::default()
    }

    /// Records a diagnostic; the token it returns is the caller's error value.
    pub fn report(&mut self, d: Diagnostic) -> Reported {
        self.list.push(d);
        Reported(())
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// `Err` once anything was reported.
    pub fn check(&self) -> Result<(), Reported> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(Reported(()))
        }
    }

    /// How many diagnostics were recorded so far.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Adds a note to the diagnostic recorded `index`-th (none if there is no such one):
    /// where the code it points into was reached from, for example.
    pub fn note_at(&mut self, index: usize, span: Span, message: impl Into<String>) {
        if let Some(d) = self.list.get_mut(index) {
            d.notes.push((span, message.into()));
        }
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.list
    }
}

const TAB_WIDTH: usize = 4;

/// Renders a diagnostic in the compiler's one format:
///
/// ```text
/// error: unknown name `fild`
///   --> specs/x.mdl:12:13
///    |
/// 12 |   let e = E[fild]
///    |             ^^^^ not defined
///    = hint: did you mean `fields`?
/// ```
///
/// Each note adds a further `-->` block with its own caret line; the hint comes last.
/// The result ends with a newline.
pub fn render(map: &SourceMap, d: &Diagnostic) -> String {
    let places: Vec<(Span, &str)> =
        std::iter::once((d.span, d.label.as_str())).chain(d.notes.iter().map(|(s, m)| (*s, m.as_str()))).collect();
    let gutter = places.iter().map(|(s, _)| map.line_col(s.file, s.start).0.to_string().len()).max().unwrap_or(1);
    let pad = " ".repeat(gutter);

    let mut out = String::new();
    let _ = writeln!(out, "error: {}", d.message);
    for (span, label) in places {
        // A diagnostic about no source text (a spec file that cannot be read) has no place
        // to point at: its message says it all.
        if (span.file as usize) >= map.len() && label.is_empty() {
            continue;
        }
        let (line, col) = map.line_col(span.file, span.start);
        let _ = writeln!(out, "{pad}--> {}:{line}:{col}", map.name(span.file));
        if (span.file as usize) >= map.len() {
            if !label.is_empty() {
                let _ = writeln!(out, "{pad} = note: {label}");
            }
            continue;
        }
        let source = map.line(span.file, line);
        let (shown, caret_start, caret_len) = caret_geometry(map, span, line, source);
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{line:>gutter$} | {shown}");
        let carets = "^".repeat(caret_len);
        let indent = " ".repeat(caret_start);
        if label.is_empty() {
            let _ = writeln!(out, "{pad} | {indent}{carets}");
        } else {
            let _ = writeln!(out, "{pad} | {indent}{carets} {label}");
        }
    }
    if let Some(hint) = &d.hint {
        let _ = writeln!(out, "{pad} = hint: {hint}");
    }
    out
}

/// Renders several diagnostics, separated by blank lines.
pub fn render_all(map: &SourceMap, diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| render(map, d)).collect::<Vec<_>>().join("\n")
}

/// The displayed source line (tabs expanded, control characters shown as spaces) and
/// the display column and width of the carets for `span` on it.
fn caret_geometry(map: &SourceMap, span: Span, line: u32, source: &str) -> (String, usize, usize) {
    let text = map.text(span.file);
    let line_start = line_start_of(map, span.file, line).unwrap_or(0);
    let start = floor_char_boundary(text, span.start as usize).saturating_sub(line_start);
    let end = floor_char_boundary(text, span.end.max(span.start) as usize).saturating_sub(line_start).min(source.len());

    let mut shown = String::new();
    let mut caret_start = None;
    let mut caret_end = None;
    for (i, ch) in source.char_indices() {
        if i == start {
            caret_start = Some(display_width(&shown));
        }
        if i == end && caret_end.is_none() && i > start {
            caret_end = Some(display_width(&shown));
        }
        match ch {
            '\t' => {
                let w = TAB_WIDTH - display_width(&shown) % TAB_WIDTH;
                shown.extend(std::iter::repeat_n(' ', w));
            }
            c if c.is_control() => shown.push(' '),
            c => shown.push(c),
        }
    }
    let width = display_width(&shown);
    let caret_start = caret_start.unwrap_or(width);
    let caret_end = caret_end.unwrap_or(width);
    let caret_len = caret_end.saturating_sub(caret_start).max(1);
    (shown, caret_start, caret_len)
}

fn line_start_of(map: &SourceMap, file: u32, line: u32) -> Option<usize> {
    let f = map.files.get(file as usize)?;
    f.line_starts.get((line as usize).checked_sub(1)?).copied()
}

fn display_width(s: &str) -> usize {
    s.chars().count()
}

/// The candidate closest to `name` by edit distance (insertions, deletions,
/// substitutions and swaps of adjacent characters), for "did you mean" hints.
/// A candidate qualifies when its distance is at most half the name's length (at least 1)
/// and smaller than the name's length, so `fild` suggests `fields` but `x` suggests
/// nothing. Ties go to the earliest candidate; a case-only difference always qualifies.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = name.chars().count();
    let limit = len.div_ceil(2).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for cand in candidates {
        let d = if cand != name && cand.eq_ignore_ascii_case(name) {
            0
        } else {
            let d = edit_distance(name, cand);
            if d > limit || d >= len {
                continue;
            }
            d
        };
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, cand));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance between two strings, counted in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rolling rows: two back (for swaps), previous, current.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            cur[j] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(text: &str) -> (SourceMap, u32) {
        let mut map = SourceMap::new();
        let id = map.add("specs/x.mdl", text.to_string());
        (map, id)
    }

    #[test]
    fn line_col_counts_lines_and_chars() {
        let (map, f) = map_with("ab\ncé d\n");
        assert_eq!(map.line_col(f, 0), (1, 1));
        assert_eq!(map.line_col(f, 2), (1, 3));
        assert_eq!(map.line_col(f, 3), (2, 1));
        // `é` is two bytes; `d` is the fourth character of line 2.
        assert_eq!(map.line_col(f, 7), (2, 4));
        // Inside `é` clamps to its start; past the end clamps to the end.
        assert_eq!(map.line_col(f, 5), (2, 2));
        assert_eq!(map.line_col(f, 999), (3, 1));
        assert_eq!(map.line_col(42, 0), (1, 1));
    }

    #[test]
    fn renders_the_documented_shape() {
        let text = "model m {\n".repeat(11) + "  let e = E[fild]\n";
        let (map, f) = map_with(&text);
        let start = text.find("fild").unwrap() as u32;
        let d = Diagnostic::error(Span::new(f, start, start + 4), "unknown name `fild`")
            .label("not defined")
            .hint("did you mean `fields`?");
        let expected = "error: unknown name `fild`\n  --> specs/x.mdl:12:13\n   |\n12 |   let e = E[fild]\n   |             ^^^^ not defined\n   = hint: did you mean `fields`?\n";
        assert_eq!(render(&map, &d), expected);
    }

    #[test]
    fn renders_notes_tabs_and_end_of_file() {
        let text = "f(a,\n\tb";
        let (map, f) = map_with(text);
        let end = text.len() as u32;
        let d = Diagnostic::error(Span::new(f, end, end), "unexpected end of file")
            .label("expected `)`")
            .note(Span::new(f, 1, 2), "unclosed `(`");
        let out = render(&map, &d);
        assert_eq!(
            out,
            "error: unexpected end of file\n --> specs/x.mdl:2:3\n  |\n2 |     b\n  |      ^ expected `)`\n --> specs/x.mdl:1:2\n  |\n1 | f(a,\n  |  ^ unclosed `(`\n"
        );
    }

    #[test]
    fn render_survives_bad_spans() {
        let (map, f) = map_with("é");
        for span in [Span::new(f, 1, 0), Span::new(f, 7, 90), Span::new(9, 0, 1)] {
            let out = render(&map, &Diagnostic::error(span, "x").label("y"));
            assert!(out.starts_with("error: x\n"));
        }
    }

    #[test]
    fn a_reported_token_means_a_recorded_diagnostic() {
        let mut diags = Diagnostics::new();
        assert_eq!(diags.check(), Ok(()));
        let reported = diags.report(Diagnostic::error(Span::default(), "x"));
        assert_eq!(diags.check(), Err(reported));
        assert_eq!(diags.into_vec(), vec![Diagnostic::error(Span::default(), "x")]);
    }

    #[test]
    fn suggests_close_names() {
        let names = ["fields", "hist", "dense", "domain"];
        assert_eq!(suggest("fild", names), Some("fields"));
        assert_eq!(suggest("domian", names), Some("domain"));
        assert_eq!(suggest("Dense", names), Some("dense"));
        assert_eq!(suggest("x", names), None);
        assert_eq!(suggest("banana", names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }
}
