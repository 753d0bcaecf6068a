//! `mdl check` on bad specs: each error is reported at its exact file:line:col with the
//! source line and a caret, several independent errors at once, and exit code 1.

use std::path::PathBuf;
use std::process::Command;

fn write_spec(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("diagnostics");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `mdl check` and returns (exit code, stderr).
fn check(name: &str, text: &str) -> (i32, String) {
    let p = write_spec(name, text);
    let out = Command::new(env!("CARGO_BIN_EXE_mdl")).arg("check").arg(&p).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts a diagnostic at `line:col` whose caret line has `carets` carets starting
/// under column `col`.
fn assert_at(stderr: &str, file: &str, line: usize, col: usize, carets: usize, message: &str) {
    let loc = format!("{file}:{line}:{col}");
    let lines: Vec<&str> = stderr.lines().collect();
    let i = lines.iter().position(|l| l.ends_with(&loc)).unwrap_or_else(|| panic!("no `{loc}` in:\n{stderr}"));
    assert!(lines[..i].iter().any(|l| l.contains(message)), "message `{message}` missing before {loc} in:\n{stderr}");
    // Layout: `--> loc`, ` |`, `N | source`, ` | ^^^ label`.
    let src = lines[i + 2];
    let caret = lines[i + 3];
    let bar = src.find('|').unwrap();
    assert_eq!(src[..bar].trim(), line.to_string(), "source line number in:\n{stderr}");
    let caret_start = caret.find('^').unwrap();
    assert_eq!(caret_start - (bar + 2), col - 1, "caret column in:\n{stderr}");
    let n = caret[caret_start..].chars().take_while(|&c| c == '^').count();
    assert_eq!(n, carets, "caret width in:\n{stderr}");
}

#[test]
fn unknown_name_with_suggestion() {
    let (code, err) = check(
        "unknown.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let x = flatten(E[fileds])\n  task click = linear(x, 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "unknown.mdl", 5, 21, 6, "error: unknown name `fileds`");
    assert!(err.contains("did you mean `fields`?"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "one mistake, one error:\n{err}");
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let (code, err) = check(
        "shape.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let x = flatten(E[fields])\n  param W : [dim, 4]\n  task click = linear(x @ W, 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "shape.mdl", 7, 23, 5, "[B, 8*count(fields)] and [8, 4]: inner sizes 8*count(fields) and 8 differ");
}

#[test]
fn wrong_arity_of_a_block() {
    let (code, err) = check(
        "arity.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let h = flatten(E[fields])\n  task click = linear(h, 1, true, 5)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "arity.mdl", 6, 35, 1, "`linear` takes 3 argument(s), but 4 were given");
    assert!(err.contains("`linear` is defined here"), "{err}");
}

#[test]
fn missing_argument_points_at_the_call() {
    let (code, err) = check(
        "missing.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let h = mlp(flatten(E[fields]))\n  task click = linear(h, 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "missing.mdl", 5, 11, 23, "`mlp` is missing its argument `widths`");
}

#[test]
fn syntax_error_points_at_the_token() {
    let (code, err) = check(
        "syntax.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim\n  task click = linear(flatten(E[fields]), 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "syntax.mdl", 5, 3, 4, "expected `,` or `)`, found keyword `task`");
    assert!(err.contains("syntax.mdl:4:20"), "note at the open parenthesis:\n{err}");
}

#[test]
fn several_independent_errors_at_once() {
    let (code, err) = check(
        "several.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let a = relu(E[fields], 2)\n  let b = softmax(zzz)\n  task click = linear(flatten(E[fields]), 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "several.mdl", 5, 27, 1, "`relu` takes 1 argument(s), but 2 were given");
    assert_at(&err, "several.mdl", 6, 19, 3, "unknown name `zzz`");
    assert_eq!(err.matches("error:").count(), 2, "{err}");
}

#[test]
fn batch_cross_broadcast_is_an_error() {
    let (code, err) = check(
        "broadcast.mdl",
        "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let s = sum(E[fields], axis = [1, 2])\n  task click = s + linear(flatten(E[fields]), 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "broadcast.mdl", 6, 16, 33, "[B] and [B, 1] broadcast to [B, B]");
}

#[test]
fn hyperparameter_override_of_unknown_name() {
    let p = write_spec("ok.mdl", "model m(dim = 8) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  task click = linear(flatten(E[fields]), 1)\n  loss bce(click)\n}\n");
    let out = Command::new(env!("CARGO_BIN_EXE_mdl")).args(["check", "--set", "dimm=4"]).arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("model `m` has no hyperparameter `dimm`") && err.contains("did you mean `dim`?"), "{err}");
    let ok = Command::new(env!("CARGO_BIN_EXE_mdl")).args(["check", "--set", "dim=4"]).arg(&p).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));
}

/// Bad uses of the elementwise built-ins and comparisons of issue 14, each reported at its
/// place, all at once.
#[test]
fn bad_uses_of_comparisons_where_and_the_new_activations() {
    let (code, err) = check(
        "elementwise14.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input dense : numeric
  label click
  let E = embedding(fields, dim)
  let x = flatten(E[fields])
  param a : [3] ~ constant(0.25)
  let p = prelu(x, a)
  let l = leaky_relu(x, slope = \"steep\")
  let g = gelu(fields)
  let f = floor(\"1.5\")
  let w = where(dense > 0, x, dense)
  let m = min(x, axis = 2)
  let c = x < [1, 2]
  let h = activation(x, \"gelus\")
  task click = linear(x, 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "elementwise14.mdl";
    assert_at(
        &err,
        f,
        8,
        11,
        11,
        "shapes [B, 8*count(fields)] and [3] do not broadcast: axis -1 is 8*count(fields) vs 3",
    );
    assert_at(&err, f, 9, 33, 7, "`slope` must be a number, found a string");
    assert_at(&err, f, 10, 16, 6, "`fields` holds ids, not values");
    assert_at(&err, f, 11, 17, 5, "expected a tensor, found a string");
    assert_at(
        &err,
        f,
        12,
        11,
        26,
        "shapes [B, count(dense)] and [B, 8*count(fields)] do not broadcast: axis -1 is count(dense) vs 8*count(fields)",
    );
    assert_at(&err, f, 13, 25, 1, "axis 2 is out of range for [B, 8*count(fields)] (rank 2)");
    assert_at(&err, f, 14, 11, 10, "cannot compare a tensor with a list");
    assert_at(&err, f, 15, 25, 7, "unknown activation \"gelus\"");
    assert!(err.contains("did you mean \"gelu\"?"), "{err}");
    assert_eq!(err.matches("error:").count(), 8, "one error per bad use:\n{err}");
}

/// Bad uses of bucket ids and of `floordiv` / `mod`: each at its place, all at once.
#[test]
fn bad_uses_of_bucket_ids_and_integer_division() {
    let (code, err) = check(
        "ids14.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input dense : numeric
  label click
  let b = bucketize(dense, [1, 3, 2])
  let c = bucketize(dense, 5)
  let d = mod(bucketize(dense, [0, 1]), 0)
  let e = floordiv(fields, 2)
  let ids = bucketize(dense, [0, 1, 2])
  let E = embedding(fields, dim)
  let g = E[ids]
  let h = relu(ids)
  let G = embedding(mod(ids, 2), dim)
  let k = G[ids]
  task click = linear(flatten(E[fields]), 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "ids14.mdl";
    assert_at(&err, f, 5, 28, 9, "`boundaries` must increase strictly, but 2 follows 3");
    assert_at(&err, f, 6, 28, 1, "`boundaries` must be a list of numbers, found an integer");
    assert_at(&err, f, 7, 41, 1, "`mod` of ids takes a positive constant integer, found 0");
    assert_at(&err, f, 8, 20, 6, "`floordiv` cannot divide the ids of input `fields`");
    assert_at(&err, f, 11, 13, 3, "this table holds rows for the ids of `fields`, not for ids made in the spec");
    assert_at(&err, f, 12, 16, 3, "expected a tensor, found ids");
    assert_at(&err, f, 14, 13, 3, "this table has 2 rows, but these ids go up to 3");
    assert_eq!(err.matches("error:").count(), 7, "one error per bad use:\n{err}");
}

/// Bad uses of the selection built-ins (`take_along`, `take`, `pairs`, `top_k`, `argmax`)
/// and of a broadcast `@`: each at its place, all at once.
#[test]
fn bad_uses_of_selection_and_broadcast_products() {
    let (code, err) = check(
        "select.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input dense : numeric
  label click
  let E = embedding(fields, dim)
  let e = E[fields]
  let a = take_along(e, dense, axis = 1)
  let t = top_k(dense, 0)
  let s = top_k(e, 9, axis = 2)
  let u = take(e, [0, 9], axis = 2)
  let v = pairs(count(fields))
  let w = relu(argmax(e, axis = 2))
  param W : [3, 8, 4]
  let m = e @ W
  let q = take_along(dense, argmax(e, axis = 1), axis = 1)
  task click = linear(flatten(e), 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "select.mdl";
    assert_at(
        &err,
        f,
        7,
        25,
        5,
        "`idx` must be positions (from `top_k`, `argmax`, `argmin` or `sort`), found an input",
    );
    assert_at(&err, f, 8, 24, 1, "`k` must be between 1 and count(dense) (axis 1 of [B, count(dense)]), found 0");
    assert_at(&err, f, 9, 20, 1, "`k` must be between 1 and 8 (axis 2 of [B, count(fields), 8]), found 9");
    assert_at(&err, f, 10, 19, 6, "position 9 is outside axis 2 of [B, count(fields), 8]");
    assert_at(&err, f, 11, 17, 13, "`pairs` needs a number, but count(fields) is a size of the data");
    assert_at(&err, f, 12, 16, 19, "expected a tensor, found ids");
    assert_at(
        &err,
        f,
        14,
        11,
        5,
        "matmul of [B, count(fields), 8] and [3, 8, 4]: leading axes [B] and [3] do not broadcast",
    );
    assert_at(&err, f, 15, 29, 19, "these positions go up to count(fields) - 1, but axis 1 of [B, count(dense)] has");
    assert_eq!(err.matches("error:").count(), 8, "one error per bad use:\n{err}");
}

/// Bad uses of `running`: a statistic with the batch axis outside `per`, one without it
/// inside `per`, a momentum out of range; each at its place, all at once.
#[test]
fn bad_uses_of_running_statistics() {
    let (code, err) = check(
        "running.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let x = flatten(E[fields])
  let a = running(x)
  let b = running(mean(x, axis = 0, keep = true), momentum = 1.5)
  let c = per domain { running(mean(x, axis = 0, keep = true)) }
  task click = linear(x, 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "running.mdl";
    assert_at(&err, f, 7, 19, 1, "`running` keeps a statistic of the whole batch: `stat` cannot have the batch size in its shape, found [B, 8*count(fields)]");
    assert_at(&err, f, 8, 62, 3, "`momentum` must be in (0, 1], found 1.5");
    assert_at(&err, f, 9, 32, 30, "inside `per`, `running` keeps one statistic per domain: `stat` must be per sample [B, ...] (as group_mean gives), found [1, 8*count(fields)]");
    assert_eq!(err.matches("error:").count(), 3, "one error per bad use:\n{err}");
}

/// Bad uses of the random built-ins and the phase choice: each at its place, all at once.
#[test]
fn bad_uses_of_random_draws() {
    let (code, err) = check(
        "random.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input dense : numeric
  input tags : sequence(3)
  label click
  let a = bernoulli(dense, 1.5)
  let b = sample_ids(dense, 4)
  let c = sample_ids(fields, 0)
  let d = sample_ids(fields, 2, by = \"often\")
  let e = sample_ids(fields, 2, by = \"frequency\", power = 0)
  let f = permutation(0)
  let g = if_training(dense, step())
  let h = relu(sample_ids(fields, 2))
  let i = sample_ids(fields, 2, not_in = tags)
  let j = sample_ids(fields, 2, not_in = dense)
  task click = linear(dense, 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "random.mdl";
    assert_at(&err, f, 6, 28, 3, "a probability must be in [0, 1], found 1.5");
    assert_at(
        &err,
        f,
        7,
        22,
        5,
        "`sample_ids` draws for the ids of a categorical or sequence input (or ids rearranged from them); `dense` is not one",
    );
    assert_at(&err, f, 8, 30, 1, "`n` must be a positive constant, found 0");
    assert_at(&err, f, 9, 38, 7, "`by` must be \"uniform\" or \"frequency\", found \"often\"");
    assert_at(&err, f, 10, 59, 1, "`power` must be a positive number, found 0");
    assert_at(&err, f, 11, 23, 1, "`n` must be a positive size, found 0");
    assert_at(
        &err,
        f,
        12,
        11,
        26,
        "the training value [B, count(dense)] and the evaluation value [] must have one shape",
    );
    assert_at(&err, f, 13, 16, 21, "expected a tensor, found ids");
    assert_at(&err, f, 14, 42, 4, "`not_in` must hold ids of `fields`'s space, as `pos` does; found ids of `tags`");
    assert_at(
        &err,
        f,
        15,
        42,
        5,
        "`not_in` takes the ids of a categorical or sequence input (or ids rearranged from them); `dense` is not one",
    );
    assert_eq!(err.matches("error:").count(), 10, "one error per bad use:\n{err}");
}

/// Bad uses of `frequency_bin`: ids that are not an input's, a bin count that is not a
/// positive constant, and its bins used as values.
#[test]
fn bad_uses_of_frequency_bins() {
    let (code, err) = check(
        "bins.mdl",
        "model m(dim = 8) {
  input fields : categorical
  input dense : numeric
  label click
  let a = frequency_bin(dense)
  let b = frequency_bin(fields, 0)
  let c = relu(frequency_bin(fields, 4))
  task click = linear(dense, 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "bins.mdl";
    assert_at(
        &err,
        f,
        5,
        25,
        5,
        "`frequency_bin` takes the ids of a categorical or sequence input (or ids rearranged from them); `dense` is not one",
    );
    assert_at(&err, f, 6, 33, 1, "`bins` must be a constant from 1 to 1048576, found 0");
    assert_at(&err, f, 7, 16, 24, "expected a tensor, found ids");
    assert_eq!(err.matches("error:").count(), 3, "one error per bad use:\n{err}");
}

/// Issue 20 item 2: checked on its own, a spec keeps the data's sizes symbolic; each
/// statement that needs one as a number (a range, `pairs`, a comparison, arithmetic with a
/// number) is reported at its place, with the hint to bind an experiment's sizes.
#[test]
fn a_statement_that_needs_a_size_of_the_data_says_where_and_how_to_bind_it() {
    let (code, err) = check(
        "needs.mdl",
        "model m(dim = 4) {
  input fields : categorical
  input domain : domain
  label click
  let E = embedding(fields, dim)
  let e = E[fields]
  let cols = [slice(e, 1, i, 1) for i in 0..count(fields)]
  let p = pairs(count(fields))
  if count(domain) > 4 {
    let w = 1
  }
  let s = 0.5 * rows(fields)
  task click = linear(flatten(e), 1)
  loss bce(click)
}
",
    );
    assert_eq!(code, 1);
    let f = "needs.mdl";
    assert_at(&err, f, 7, 45, 13, "error: a range needs a number, but count(fields) is a size of the data");
    assert_at(&err, f, 8, 17, 13, "error: `pairs` needs a number, but count(fields) is a size of the data");
    assert_at(&err, f, 9, 6, 13, "error: this comparison needs a number, but count(domain) is a size of the data");
    assert_at(&err, f, 12, 17, 12, "error: this arithmetic needs a number, but rows(fields) is a size of the data");
    assert_eq!(err.matches("error:").count(), 4, "one error per statement:\n{err}");
    let hint =
        "= hint: check the spec with the data's sizes: `mdl check SPEC --bind EXPERIMENT.yaml` (`mdl run` binds them)";
    assert_eq!(err.matches(hint).count(), 4, "{err}");
    assert!(err.contains("known once an experiment binds its columns"), "{err}");
}

/// The batch size is never a number at compile time: no `--bind` hint for it.
#[test]
fn the_batch_size_is_not_a_number_to_loop_over() {
    let (code, err) = check(
        "batchloop.mdl",
        "model m(dim = 4) {\n  input fields : categorical\n  label click\n  let E = embedding(fields, dim)\n  let e = E[fields]\n  let xs = [i for i in 0..dim(e, 0)]\n  task click = linear(flatten(e), 1)\n  loss bce(click)\n}\n",
    );
    assert_eq!(code, 1);
    assert_at(&err, "batchloop.mdl", 6, 27, 9, "error: a range needs a number, but B depends on the batch size");
    assert!(!err.contains("--bind"), "{err}");
}

/// `mdl check SPEC --bind EXPERIMENT.yaml` checks with the sizes of the experiment's data:
/// the pairs of `count(fields)` (37 columns: 666 pairs) and a loop over the columns
/// compile, from the schema alone (no data is read: nothing is prepared).
#[test]
fn check_with_bind_takes_the_sizes_from_the_experiments_schema() {
    let p = write_spec(
        "bound.mdl",
        "model m(dim = 4) {
  input fields : categorical
  input hist : sequence(50) of fields
  input tags : sequence(3)
  input dense : numeric
  label click
  let E = embedding(fields, dim)
  let e = E[fields]
  let inner = pairwise_inner(e)
  let cols = [slice(e, 1, i, 1) for i in 0..count(fields)]
  param W : [count(fields) * (count(fields) - 1) / 2, 1]
  task click = inner @ W + linear(flatten(concat(cols, axis = 1)), 1)
  loss bce(click)
}
",
    );
    let exp = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_mdl")).arg("check").arg(&p).arg("--bind").arg(&exp).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("with the sizes of") && stdout.contains("quickstart.yaml"), "{stdout}");
    assert!(!stderr.contains("preparing"), "the schema gives count(fields): nothing to prepare:\n{stderr}");
    // The same spec on its own needs the number at `pairs` (inside the std block) and the range.
    let plain = Command::new(env!("CARGO_BIN_EXE_mdl")).arg("check").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(1));
    assert!(err.contains("error: `pairs` needs a number, but count(fields) is a size of the data"), "{err}");
    assert_at(&err, "bound.mdl", 10, 45, 13, "error: a range needs a number, but count(fields) is a size of the data");
}

/// `--bind` checks the experiment's own spec as `mdl run` compiles it, with the experiment's
/// `hyper:` (ple_watch's `with_watch: true` adds the watch-time task), and `--set` wins over
/// it; `--bind` alone checks the experiment's spec. Before, the hyperparameters were ignored
/// and PLE was checked with two tasks.
#[test]
fn check_with_bind_takes_the_experiments_hyperparameters_for_its_own_spec() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let check = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mdl")).current_dir(&root).arg("check").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let watch = check(&["specs/ple.mdl", "--bind", "experiments/ple_watch.yaml"]);
    assert!(watch.contains("3 tasks") && watch.contains("with the sizes and hyperparameters of"), "{watch}");
    assert!(check(&["--bind", "experiments/ple_watch.yaml"]).contains("specs/ple.mdl (model ple, 3 tasks"));
    let set = check(&["specs/ple.mdl", "--bind", "experiments/ple_watch.yaml", "--set", "with_watch=false"]);
    assert!(set.contains("2 tasks"), "{set}");
    // Another spec gets the experiment's sizes only (its hyperparameters may not exist there).
    let other = check(&["specs/dnn.mdl", "--bind", "experiments/ple_watch.yaml"]);
    assert!(other.contains("with the sizes of") && !other.contains("hyperparameters"), "{other}");
}
