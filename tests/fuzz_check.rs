//! The checker never panics: random text and mutations of real specs go through parsing
//! and the whole elaboration, and come back as diagnostics with spans inside the text.

use mdl::diag::SourceMap;
use mdl::lower::compile;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn seeds() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut v: Vec<String> = ["deepfm.mdl", "crocodile.mdl", "mmoe.mdl", "dnn.mdl"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    v.push(mdl::lower::STD_SOURCE.to_string());
    v
}

/// Compiles text; any diagnostics must point inside the text of some loaded file.
fn check_text(text: &str) {
    let mut map = SourceMap::new();
    let file = map.add("fuzz.mdl", text.to_string());
    if let Err(diags) = compile(&mut map, file, None, None, &BTreeMap::new()) {
        assert!(!diags.is_empty());
        for d in &diags {
            let len = map.text(d.span.file).len() as u32;
            assert!(d.span.start <= d.span.end && d.span.end <= len, "span {:?} outside the text", d.span);
            let _ = mdl::diag::render(&map, d);
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    Swap(usize, usize),
    Duplicate(usize, usize),
}

fn apply(text: &str, m: &Mutation) -> String {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len().max(1);
    let mut c = chars.clone();
    match m {
        Mutation::Delete(at, len) => {
            let a = at % n;
            let b = (a + len).min(c.len());
            c.drain(a..b);
        }
        Mutation::Insert(at, s) => {
            let a = at % n;
            for (i, ch) in s.chars().enumerate() {
                c.insert((a + i).min(c.len()), ch);
            }
        }
        Mutation::Swap(i, j) => {
            if !c.is_empty() {
                let (i, j) = (i % c.len(), j % c.len());
                c.swap(i, j);
            }
        }
        Mutation::Duplicate(at, len) => {
            let a = at % n;
            let b = (a + len).min(chars.len());
            let piece: Vec<char> = chars[a..b].to_vec();
            for (i, ch) in piece.into_iter().enumerate() {
                c.insert((b + i).min(c.len()), ch);
            }
        }
    }
    c.into_iter().collect()
}

fn token() -> impl Strategy<Value = String> {
    prop::sample::select(mdl::fuzz::SPEC_TOKENS).prop_map(|s| s.to_string())
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(a, l)| Mutation::Delete(a, l)),
        (any::<usize>(), prop::collection::vec(token(), 1..4)).prop_map(|(a, t)| Mutation::Insert(a, t.join(" "))),
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
        (any::<usize>(), 1usize..40).prop_map(|(a, l)| Mutation::Duplicate(a, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_specs_never_panic(seed in 0usize..5, muts in prop::collection::vec(mutation(), 1..6)) {
        let mut text = seeds()[seed].clone();
        for m in &muts {
            text = apply(&text, m);
        }
        check_text(&text);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(token(), 0..60)) {
        check_text(&tokens.join(" "));
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        check_text(&text);
    }
}

#[test]
fn pathological_inputs_do_not_crash() {
    check_text(&"(".repeat(20_000));
    check_text(&format!("model m() {{ let x = {} }}", "[".repeat(5_000)));
    check_text("block a(x) = a(x)\nmodel m() { input f : categorical\n label y\n task y = a(1)\n loss bce(y) }");
    check_text("model m() { for k in 0..100000000 { } }");
    check_text("model m(n = 3) { input f : sequence(0 - n) of g }");
}
