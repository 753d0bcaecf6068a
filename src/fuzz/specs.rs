//! Spec cases: a shipped spec mutated at the token level (tokens deleted, duplicated,
//! swapped, replaced or inserted from the language's own vocabulary), sometimes with
//! `--set` overrides, through what `mdl check` does: compile, then the backward graph.
//! Accepted or rejected are both fine; a diagnostic whose span leaves the text is wrong.

use super::{describe, Described, Draw, Fixture, Verdict};
use crate::diag::SourceMap;
use mdl_runtime::rng::SplitMix64;

/// Tokens a mutation inserts: keywords, punctuation, names and numbers of the language
/// (also the alphabet of tests/fuzz_check.rs's token soups).
pub const SPEC_TOKENS: &[&str] = &[
    "model",
    "block",
    "input",
    "label",
    "let",
    "param",
    "for",
    "in",
    "if",
    "else",
    "group",
    "return",
    "task",
    "loss",
    "per",
    "of",
    "categorical",
    "sequence",
    "numeric",
    "domain",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    ":",
    "~",
    "+",
    "-",
    "*",
    "/",
    "@",
    "++",
    "|>",
    "..",
    "==",
    "<",
    ">",
    "!",
    "x",
    "fields",
    "hist",
    "dense",
    "E",
    "dim",
    "hidden",
    "mlp",
    "linear",
    "sum",
    "mean",
    "softmax",
    "embedding",
    "concat",
    "pool",
    "flatten",
    "fm",
    "squeeze",
    "bce",
    "axis",
    "keep",
    "true",
    "false",
    "0",
    "1",
    "2",
    "3",
    "-1",
    "0.5",
    "1e-4",
    "16",
    "\"relu\"",
    "\"\"",
    "#",
    "\n",
    "\"",
];

/// Numbers of the findings still being fixed (range overflow, huge widths).
const KNOWN_NUMBERS: &[&str] =
    &["9223372036854775807", "-9223372036854775807", "65536", "2147483648", "1000000000", "4294967296", "1e308"];

/// Splits text into tokens: names and numbers, strings, comments, whitespace runs, and
/// single punctuation characters; joining them gives the text back.
fn tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let class = |c: char| {
            if c.is_alphanumeric() || c == '_' || c == '.' {
                0
            } else if c.is_whitespace() {
                1
            } else {
                2
            }
        };
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' && chars[i] != '\n' {
                i += 1;
            }
            i = (i + 1).min(chars.len());
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if class(c) == 2 {
            i += 1;
        } else {
            while i < chars.len() && class(chars[i]) == class(c) {
                i += 1;
            }
        }
        out.push(chars[start..i].iter().collect());
    }
    out
}

fn is_space(t: &str) -> bool {
    t.chars().all(char::is_whitespace)
}

/// One token-level mutation; returns what it did.
fn mutate(rng: &mut SplitMix64, toks: &mut Vec<String>, known: bool) -> String {
    let solid: Vec<usize> = (0..toks.len()).filter(|&i| !is_space(&toks[i])).collect();
    if solid.is_empty() {
        toks.push(rng.pick(SPEC_TOKENS).to_string());
        return "a token added".into();
    }
    let i = *rng.pick(&solid);
    let new_token = |rng: &mut SplitMix64, toks: &[String]| -> String {
        if known && rng.chance(0.2) {
            rng.pick(KNOWN_NUMBERS).to_string()
        } else if rng.chance(0.3) {
            toks[*rng.pick(&solid)].clone()
        } else {
            rng.pick(SPEC_TOKENS).to_string()
        }
    };
    match rng.below(5) {
        0 => format!("deleted `{}`", toks.remove(i)),
        1 => {
            let t = toks[i].clone();
            toks.insert(i, t.clone());
            format!("duplicated `{t}`")
        }
        2 => {
            let j = *rng.pick(&solid);
            toks.swap(i, j);
            format!("swapped `{}` and `{}`", toks[j], toks[i])
        }
        3 => {
            let t = new_token(rng, toks);
            let old = std::mem::replace(&mut toks[i], t.clone());
            format!("`{old}` -> `{t}`")
        }
        _ => {
            let t = new_token(rng, toks);
            toks.insert(i, format!(" {t} "));
            format!("inserted `{t}`")
        }
    }
}

/// Overrides a case may add (`--set`), small values only unless `known`.
fn overrides(rng: &mut SplitMix64, known: bool) -> Vec<String> {
    let keys = ["dim", "hidden", "dropout", "heads", "layers", "experts", "levels", "nope"];
    let small = ["0", "1", "2", "-1", "0.5", "[]", "[4, 2]", "[0]", "\"x\"", "true", "1.0"];
    let huge = ["1000000000", "[65536]", "[2147483648]", "9223372036854775807", "3000"];
    (0..1 + rng.upto(2))
        .map(|_| {
            let value = if known && rng.chance(0.3) { rng.pick(&huge) } else { rng.pick(&small) };
            format!("{}={value}", rng.pick(&keys))
        })
        .collect()
}

pub(super) fn case(fx: &Fixture, rng: &mut SplitMix64, known: bool, input: &Described) -> Verdict {
    let (name, text) = rng.pick(&fx.specs);
    let mut toks = tokens(text);
    // Mostly one mutation, so that many cases get past the parser into the checks.
    let mutations = *rng.pick(&[1, 1, 1, 1, 1, 1, 2, 2, 3, 4]);
    let mut did: Vec<String> = (0..mutations).map(|_| mutate(rng, &mut toks, known)).collect();
    let set = if rng.chance(0.15) { overrides(rng, known) } else { Vec::new() };
    if !set.is_empty() {
        did.push(format!("--set {}", set.join(" --set ")));
    }
    describe(input, format!("{name}: {}", did.join("; ")));
    let text: String = toks.concat();
    let Ok(overrides) = crate::cli::parse_overrides(&set) else {
        return Verdict::Rejected;
    };
    let mut map = SourceMap::new();
    let file = map.add(format!("fuzz/{name}"), text);
    match crate::lower::compile(&mut map, file, None, None, &overrides) {
        Ok(c) => match crate::train::build_training_graph(&c) {
            Ok(_) => Verdict::Accepted,
            Err(_) => Verdict::Rejected,
        },
        Err(diags) => {
            if diags.is_empty() {
                return Verdict::Silent("compilation failed without a diagnostic".into());
            }
            for d in &diags {
                let len = map.text(d.span.file).len() as u32;
                if d.span.start > d.span.end || d.span.end > len {
                    return Verdict::Silent(format!("span {:?} outside the text ({len} bytes): {}", d.span, d.message));
                }
                let _ = crate::diag::render(&map, d);
            }
            Verdict::Rejected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tokens;

    #[test]
    fn tokens_join_back_to_the_text() {
        let text = "model m(dim = 16) { # note\n  let x = mlp(E[fields], [64, 32]) |> linear(1)\n  \"relu\" }";
        let t = tokens(text);
        assert_eq!(t.concat(), text);
        assert!(
            t.contains(&"16".to_string()) && t.contains(&"# note".to_string()) && t.contains(&"\"relu\"".to_string())
        );
    }
}
