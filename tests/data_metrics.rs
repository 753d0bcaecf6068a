//! Tests of the data pipeline (`mdl::data`) and the evaluation metrics (`mdl::metrics`):
//! metric definitions against brute force and hand-computed values, vocabulary fitting,
//! malformed-row handling, the binary cache, and the real `kuairand_pure_tail` data (skipped
//! with a message when `../shared/data` is absent, failed instead with `MDL_REQUIRE_DATA=1`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use mdl::data::{
    prepare, BadRows, CacheMode, DataError, Dataset, DomainSpec, FeatureGroup, Fitted, MiniBatches, Normalize,
    PrepareOptions, Schema, SequenceTable, SplitPaths, Task, OOV, PAD,
};
use mdl::metrics::{auc, gauc, logloss, Report};
use proptest::prelude::*;

// ---------------------------------------------------------------- helpers

/// A fresh, empty folder under cargo's per-target temporary directory, removed on drop.
struct TempFolder(PathBuf);

impl TempFolder {
    fn new(name: &str) -> TempFolder {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "data_metrics-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder).expect("create temp folder");
        TempFolder(folder)
    }
}

impl std::ops::Deref for TempFolder {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_plain(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write csv");
}

fn write_gz(path: &Path, text: &str) {
    let file = std::fs::File::create(path).expect("create csv.gz");
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).expect("write csv.gz");
    encoder.finish().expect("finish gzip");
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const HEADER: &str = "label,like,domain,user,item,color,hist,tags,price\n";

/// Train rows. Counts: item i1×3, i2, i3; color red×3, "", blue; user u1×2, u2×2, u3;
/// tags t1×3, t2, t3.
const TRAIN: &str = "1,0,0,u1,i1,red,,t1 t2,1.0
0,0,1,u1,i2,blue,i1,t1,2.0
1,1,0,u2,i1,red,i1 i2,,3.0
0,0,2,u3,i3,,i2 i9 i1,t3,
1,0,1,u2,i1,\"red\",i3,t1,4.0
";

/// Valid rows: i7, green and u9 never occur in train.
const VALID: &str = "0,0,0,u9,i7,green,i7 i1,t9 t1,10.0
1,0,2,u1,i2,red,,,0.0
";

fn small_schema(item_min_count: Option<u64>) -> Schema {
    Schema {
        features: vec![
            FeatureGroup::Categorical {
                name: "ids".into(),
                columns: strings(&["item", "color"]),
                min_count: item_min_count,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Sequence {
                name: "history".into(),
                columns: strings(&["hist"]),
                max_len: 2,
                vocab: Some("item".into()),
                min_count: None,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Sequence {
                name: "tags".into(),
                columns: strings(&["tags"]),
                max_len: 3,
                vocab: None,
                min_count: None,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Numeric { name: "dense".into(), columns: strings(&["price"]), normalize: Normalize::Minmax },
        ],
        labels: vec![
            Task { name: "click".into(), column: "label".into(), values: Default::default() },
            Task { name: "like".into(), column: "like".into(), values: Default::default() },
        ],
        domain: Some(DomainSpec { column: "domain".into(), count: None }),
        user: Some("user".into()),
        min_count: 1,
        max_vocab: None,
        hash_buckets: None,
    }
}

/// Writes train.csv, valid.csv.gz and test.csv (= valid) into `folder`.
fn small_files(folder: &Path, train_rows: &str) -> SplitPaths {
    let paths = SplitPaths {
        train: folder.join("train.csv"),
        valid: folder.join("valid.csv.gz"),
        test: folder.join("test.csv"),
    };
    write_plain(&paths.train, &format!("{HEADER}{train_rows}"));
    write_gz(&paths.valid, &format!("{HEADER}{VALID}"));
    write_plain(&paths.test, &format!("{HEADER}{VALID}"));
    paths
}

fn no_cache() -> PrepareOptions {
    PrepareOptions { bad_rows: BadRows::Fail, cache: CacheMode::Off, ..Default::default() }
}

// ---------------------------------------------------------------- metrics

fn brute_force_auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    let (mut pairs, mut correct) = (0u64, 0.0f64);
    for (i, &yi) in labels.iter().enumerate() {
        for (j, &yj) in labels.iter().enumerate() {
            if yi == 1.0 && yj == 0.0 {
                pairs += 1;
                if scores[i] > scores[j] {
                    correct += 1.0;
                } else if scores[i] == scores[j] {
                    correct += 0.5;
                }
            }
        }
    }
    (pairs > 0).then(|| correct / pairs as f64)
}

proptest! {
    #[test]
    fn auc_equals_pairwise_count(rows in prop::collection::vec((0u8..6, any::<bool>()), 0..120)) {
        // Only six distinct scores, so ties are frequent.
        let scores: Vec<f32> = rows.iter().map(|(s, _)| *s as f32 / 5.0).collect();
        let labels: Vec<f32> = rows.iter().map(|(_, y)| if *y { 1.0 } else { 0.0 }).collect();
        let fast = auc(&scores, &labels);
        let slow = brute_force_auc(&scores, &labels);
        prop_assert_eq!(fast.is_some(), slow.is_some());
        if let (Some(fast), Some(slow)) = (fast, slow) {
            prop_assert!((fast - slow).abs() < 1e-12, "fast {} slow {}", fast, slow);
        }
    }

    #[test]
    fn gauc_equals_weighted_per_user_brute_force(
        rows in prop::collection::vec((0u8..4, any::<bool>(), 0u32..5), 0..100)
    ) {
        let scores: Vec<f32> = rows.iter().map(|(s, _, _)| *s as f32).collect();
        let labels: Vec<f32> = rows.iter().map(|(_, y, _)| if *y { 1.0 } else { 0.0 }).collect();
        let users: Vec<u32> = rows.iter().map(|(_, _, u)| *u).collect();
        let (mut weighted, mut weight) = (0.0, 0.0);
        for user in 0..5 {
            let rows: Vec<usize> = (0..users.len()).filter(|&i| users[i] == user).collect();
            let s: Vec<f32> = rows.iter().map(|&i| scores[i]).collect();
            let y: Vec<f32> = rows.iter().map(|&i| labels[i]).collect();
            if let Some(a) = brute_force_auc(&s, &y) {
                weighted += rows.len() as f64 * a;
                weight += rows.len() as f64;
            }
        }
        let expected = (weight > 0.0).then(|| weighted / weight);
        let got = gauc(&scores, &labels, &users);
        prop_assert_eq!(got.is_some(), expected.is_some());
        if let (Some(got), Some(expected)) = (got, expected) {
            prop_assert!((got - expected).abs() < 1e-12);
        }
    }
}

#[test]
fn gauc_hand_example() {
    // user 0: positives 0.9, 0.6; negative 0.4 → 2 of 2 pairs right: AUC 1.0, 3 rows.
    // user 1: positives 0.3, 0.8; negatives 0.5, 0.3 → pairs (0.3,0.5)=0, (0.3,0.3)=1/2,
    //         (0.8,0.5)=1, (0.8,0.3)=1 → 2.5 / 4 = 0.625, 4 rows.
    // user 2: negatives only → left out.
    // gAUC = (3·1.0 + 4·0.625) / (3 + 4) = 5.5 / 7.
    let scores = [0.9, 0.4, 0.6, 0.3, 0.5, 0.3, 0.8, 0.7, 0.2];
    let labels = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let users = [0, 0, 0, 1, 1, 1, 1, 2, 2];
    let value = gauc(&scores, &labels, &users).expect("defined");
    assert!((value - 5.5 / 7.0).abs() < 1e-12, "{value}");
    assert_eq!(gauc(&[0.1, 0.2], &[1.0, 1.0], &[0, 1]), None);
}

#[test]
fn logloss_hand_example() {
    // -(ln 0.8 + ln(1 - 0.3) + ln(1 - clip(1.0))) / 3 with clip(1.0) = 1 - 1e-7:
    // (0.2231436 + 0.3566749 + 16.1180957) / 3 = 5.5659714.
    let value = logloss(&[0.8, 0.3, 1.0], &[1.0, 0.0, 0.0]).expect("rows");
    assert!((value - 5.5659714).abs() < 1e-6, "{value}");
}

#[test]
fn report_per_task_and_domain() {
    let tasks = strings(&["click", "like"]);
    // rows: (click score, like score) / (click label, like label), domain, user
    let scores = [0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.4, 0.6];
    let labels = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0];
    let domain = [0, 0, 1, 1];
    let user = [5, 5, 5, 6];
    let report = Report::compute(&tasks, &scores, &labels, Some(&domain), Some(&user)).expect("report");
    assert_eq!(report.count, 4);
    assert_eq!(report.auc, Some(1.0));
    assert_eq!(report.per_task["click"].positives, 2);
    assert_eq!(report.per_task["like"].auc, Some(1.0));
    assert_eq!(report.per_domain[&0].count, 2);
    assert_eq!(report.per_domain[&0].auc, Some(1.0));
    assert_eq!(report.per_domain[&1].positives, 1);
    assert_eq!(report.per_task["like"].per_domain[&1].auc, None, "no like in domain 1");
    // user 5 has both classes (3 rows, AUC 1); user 6 has one row.
    assert_eq!(report.gauc, Some(1.0));
    let json = serde_json::to_string(&report).expect("serialise");
    assert!(json.contains("\"per_domain\""));
}

// ---------------------------------------------------------------- vocabularies and encoding

#[test]
fn schema_from_yaml() {
    let yaml = "
features:
  - { kind: categorical, name: ids, columns: [item, color] }
  - { kind: sequence, name: history, columns: [hist], max_len: 2, vocab: item }
  - { kind: sequence, name: tags, columns: [tags], max_len: 3 }
  - { kind: numeric, name: dense, columns: [price], normalize: minmax }
labels: [ { name: click, column: label }, { name: like, column: like } ]
domain: { column: domain }
user: user
";
    let schema: Schema = serde_yaml::from_str(yaml).expect("parse schema");
    assert_eq!(schema, small_schema(None));
    let typo = yaml.replace("max_len: 3", "max_len: 3, vocabb: x");
    assert!(serde_yaml::from_str::<Schema>(&typo).is_err());
    let mut bad = small_schema(None);
    bad.features[1] = FeatureGroup::Sequence {
        name: "history".into(),
        columns: strings(&["hist"]),
        max_len: 2,
        vocab: Some("nope".into()),
        min_count: None,
        max_vocab: None,
        hash_buckets: None,
    };
    assert!(matches!(bad.validate(), Err(DataError::Schema(m)) if m.contains("nope")));
}

#[test]
fn vocab_from_train_only_and_encoding() {
    let folder = TempFolder::new("vocab");
    let paths = small_files(&folder, TRAIN);
    let prepared = prepare(&small_schema(None), &paths, &no_cache()).expect("prepare");
    let fitted = &prepared.fitted;
    let layout = fitted.layout();
    let items = &fitted.vocabs.categorical[0][0];
    let colors = &fitted.vocabs.categorical[0][1];
    // item: i1 (3) then i2, i3 (1 each, by string); color: red (3), then "" and blue.
    assert_eq!((items.id("i1"), items.id("i2"), items.id("i3"), items.id("i7")), (2, 3, 4, OOV));
    assert_eq!((colors.id("red"), colors.id(""), colors.id("blue"), colors.id("green")), (2, 3, 4, OOV));
    assert_eq!(layout.categorical[0].offsets, vec![0, 5]);
    assert_eq!(layout.categorical[0].rows, 10);
    assert_eq!(layout.domains, 3);

    let train = &prepared.train;
    assert_eq!(train.rows, 5);
    assert_eq!(&train.cat[0][..4], &[2, 5 + 2, 3, 5 + 4]);
    assert_eq!(train.cat[0][7], 5 + 3, "an empty categorical cell is its own value");
    // history shares the item vocabulary and offset, right-aligned, last 2 kept.
    assert_eq!(layout.sequence[0].table, SequenceTable::Categorical { group: "ids".into(), column: "item".into() });
    assert_eq!(&train.seq_ids[0][..2], &[PAD, PAD]);
    assert_eq!(&train.seq_ids[0][2..4], &[PAD, 2]);
    assert_eq!(&train.seq_ids[0][6..8], &[OOV, 2], "\"i2 i9 i1\" keeps i9 (never an item), i1");
    assert_eq!(&train.seq_mask[0][..8], &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    // tags: own vocabulary t1, t2, t3.
    assert_eq!(&train.seq_ids[1][..3], &[PAD, 2, 3]);
    assert_eq!(&train.seq_mask[1][..3], &[0.0, 1.0, 1.0]);
    // price: minmax over 1..4, missing → 0.
    assert_eq!(train.num[0], vec![0.0, 1.0 / 3.0, 2.0 / 3.0, 0.0, 1.0]);
    assert_eq!(train.domain, vec![0, 1, 0, 2, 1]);
    assert_eq!(train.labels, vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
    assert_eq!(train.user, vec![2, 2, 3, 4, 3], "u1, u2 (2 rows each), u3");

    // Valid: unseen values → OOV, through the train vocabularies; unseen user gets a fresh id.
    let valid = &prepared.valid;
    assert_eq!(&valid.cat[0][..2], &[OOV, 5 + OOV]);
    assert_eq!(&valid.seq_ids[0][..2], &[OOV, 2]);
    assert_eq!(&valid.seq_ids[1][..3], &[PAD, OOV, 2]);
    assert_eq!(valid.num[0][0], 3.0);
    assert_eq!(valid.user, vec![5, 2]);
    assert_eq!(prepared.test, Dataset { source: prepared.test.source.clone(), ..valid.clone() });

    // min_count 2 on the ids group: only i1 and red survive.
    let strict = prepare(&small_schema(Some(2)), &paths, &no_cache()).expect("prepare");
    let items = &strict.fitted.vocabs.categorical[0][0];
    assert_eq!((items.id("i1"), items.id("i2"), items.id("i3")), (2, OOV, OOV));
    assert_eq!(strict.fitted.layout().categorical[0].offsets, vec![0, 3]);
    assert_eq!(strict.fitted.vocabs.sequence[1].as_ref().map(|v| v.len()), Some(5), "group min_count only");
}

#[test]
fn max_vocab_and_hash_buckets_bound_a_column_and_hash_the_rest() {
    let folder = TempFolder::new("vocab-limits");
    let paths = small_files(&folder, TRAIN);
    let mut schema = small_schema(None);
    let FeatureGroup::Categorical { max_vocab, hash_buckets, .. } = &mut schema.features[0] else { unreachable!() };
    (*max_vocab, *hash_buckets) = (Some(1), Some(3));
    let prepared = prepare(&schema, &paths, &no_cache()).expect("prepare");
    let (fitted, layout) = (&prepared.fitted, prepared.fitted.layout());
    // Each column keeps its most frequent value (i1, red) and has 3 hashed ids after it.
    assert_eq!(layout.categorical[0].vocab_sizes, vec![2 + 1 + 3, 2 + 1 + 3]);
    let (items, colors) = (&fitted.vocabs.categorical[0][0], &fitted.vocabs.categorical[0][1]);
    assert_eq!((items.id("i1"), colors.id("red")), (2, 2));
    for value in ["i2", "i3", "i7", "i9"] {
        assert!((3..6).contains(&items.id(value)), "{value}: {}", items.id(value));
    }
    let train = &prepared.train;
    // The second row is i2/blue: hashed ids, the ones the vocabulary gives them.
    assert_eq!(&train.cat[0][2..4], &[items.id("i2"), 6 + colors.id("blue")]);
    // The history shares item's vocabulary: "i2 i9 i1" keeps i9 (hashed) and i1.
    assert_eq!(&train.seq_ids[0][6..8], &[items.id("i9"), 2]);
    let valid = &prepared.valid;
    assert_eq!(&valid.cat[0][..2], &[items.id("i7"), 6 + colors.id("green")]);
    assert_eq!(&valid.seq_ids[0][..2], &[items.id("i7"), 2]);
    // The tags keep every value: no limits there.
    assert_eq!(layout.sequence[1].rows, 2 + 3);
    // The fitted state (with its limits) round-trips through JSON.
    let json = serde_json::to_string(fitted).expect("serialise");
    assert_eq!(&serde_json::from_str::<Fitted>(&json).expect("deserialise"), fitted);

    // A schema-wide max_vocab applies to every column without its own.
    let mut capped = small_schema(None);
    capped.max_vocab = Some(2);
    let prepared = prepare(&capped, &paths, &no_cache()).expect("prepare");
    assert_eq!(prepared.fitted.layout().categorical[0].vocab_sizes, vec![4, 4]);
    assert_eq!(prepared.fitted.layout().sequence[1].rows, 4, "t1 and one of t2, t3");
}

#[test]
fn vocab_limits_are_checked_with_their_keys() {
    let message = |schema: &Schema| schema.validate().expect_err("invalid").to_string();
    let mut schema = small_schema(None);
    schema.max_vocab = Some(0);
    assert_eq!(
        message(&schema),
        "data schema: data.schema.max_vocab: must be at least 1, found 0 (leave the key out to keep every value)"
    );
    let mut schema = small_schema(None);
    let FeatureGroup::Sequence { hash_buckets, .. } = &mut schema.features[2] else { unreachable!() };
    *hash_buckets = Some(0);
    assert_eq!(
        message(&schema),
        "data schema: data.schema.features[2].hash_buckets: must be at least 1, found 0 (leave the key out for one \
         OOV id)"
    );
    let mut schema = small_schema(None);
    let FeatureGroup::Sequence { max_vocab, .. } = &mut schema.features[1] else { unreachable!() };
    *max_vocab = Some(10);
    assert_eq!(
        message(&schema),
        "data schema: data.schema.features[1].max_vocab: sequence group 'history' shares the vocabulary of column \
         'item', whose group's limits it follows; set max_vocab there"
    );
    let mut schema = small_schema(None);
    schema.hash_buckets = Some(u32::MAX);
    assert!(message(&schema).starts_with("data schema: data.schema.hash_buckets: must be at most 1073741824"));
}

#[test]
fn fitted_state_round_trips_and_encodes_other_files() {
    let folder = TempFolder::new("fitted");
    let paths = small_files(&folder, TRAIN);
    let prepared = prepare(&small_schema(None), &paths, &no_cache()).expect("prepare");
    let json = serde_json::to_string(&prepared.fitted).expect("serialise");
    let fitted: Fitted = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(fitted, prepared.fitted);
    let again = fitted.encode_file(&paths.valid, BadRows::Fail).expect("encode");
    assert_eq!(again, prepared.valid);
}

#[test]
fn batches_gather_rows() {
    let folder = TempFolder::new("gather");
    let paths = small_files(&folder, TRAIN);
    let train = prepare(&small_schema(None), &paths, &no_cache()).expect("prepare").train;
    let mut batch = train.new_batch();
    train.gather(&[4, 0], &mut batch).expect("gather");
    assert_eq!(batch.rows, 2);
    assert_eq!(batch.cat[0], vec![train.cat[0][8], train.cat[0][9], train.cat[0][0], train.cat[0][1]]);
    assert_eq!(batch.labels, vec![1.0, 0.0, 1.0, 0.0]);
    assert_eq!(batch.seq_ids[1].len(), 6);
    assert_eq!(batch.domain, vec![1, 0]);
    assert!(matches!(train.gather(&[5], &mut batch), Err(DataError::RowIndex { index: 5, rows: 5 })));
    train.gather_range(1..3, &mut batch).expect("range");
    assert_eq!(batch.user, vec![2, 3]);

    let mut order = MiniBatches::new(train.rows, 2, 42);
    let mut seen: Vec<usize> = order.epoch(0).flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
}

// ---------------------------------------------------------------- malformed input

fn prepare_error(train_rows: &str) -> (PathBuf, String) {
    let folder = TempFolder::new("bad");
    let paths = small_files(&folder, train_rows);
    let error = prepare(&small_schema(None), &paths, &no_cache()).expect_err("malformed row");
    (paths.train, error.to_string())
}

#[test]
fn malformed_rows_name_file_line_and_column() {
    let good = "1,0,0,u1,i1,red,,t1,1.0\n";
    let (file, message) = prepare_error(&format!("{good}1,0,0,u1,i1,red,,t1\n"));
    assert!(message.starts_with(&format!("{}:3:", file.display())), "{message}");
    assert!(message.contains("expected 9 fields") && message.contains("found 8"), "{message}");

    let (file, message) = prepare_error(&format!("{good}{good}1,0,0,u1,i1,red,,t1,cheap\n"));
    assert!(message.starts_with(&format!("{}:4:", file.display())), "{message}");
    assert!(message.contains("'price'") && message.contains("\"cheap\""), "{message}");

    let (file, message) = prepare_error(&format!("2,0,0,u1,i1,red,,t1,1.0\n{good}"));
    assert!(message.starts_with(&format!("{}:2:", file.display())), "{message}");
    assert!(message.contains("'label'") && message.contains("\"2\""), "{message}");

    // A quoted field with a newline moves the line numbers of the rows after it.
    let (_, message) = prepare_error(&format!("1,0,0,u1,i1,\"two\nlines\",,t1,1.0\n{good}1,0,x,u1,i1,red,,t1,1.0\n"));
    assert!(message.contains(":5:") && message.contains("'domain'"), "{message}");
}

#[test]
fn skipped_rows_are_counted_and_leave_no_trace() {
    let folder = TempFolder::new("skip");
    let bad = "1,0,0,u1,i1,red,,t1\n1,0,0,u1,zzz,red,,t1,cheap\n2,0,0,u1,i1,red,,t1,1.0\n";
    let paths = small_files(&folder, &format!("{TRAIN}{bad}"));
    let options = PrepareOptions { bad_rows: BadRows::Skip, cache: CacheMode::Off, ..Default::default() };
    let prepared = prepare(&small_schema(None), &paths, &options).expect("prepare with skip");
    assert_eq!(prepared.train.rows, 5);
    assert_eq!(prepared.train.skipped.count, 3);
    assert!(prepared.train.skipped.examples[0].contains("train.csv:7:"), "{:?}", prepared.train.skipped);
    assert_eq!(prepared.fitted.vocabs.categorical[0][0].id("zzz"), OOV, "a skipped row adds no value");
    assert_eq!(prepared.valid.skipped.count, 0);
}

#[test]
fn missing_columns_and_domains() {
    let folder = TempFolder::new("missing");
    let paths = small_files(&folder, TRAIN);
    let mut schema = small_schema(None);
    schema.features[3] =
        FeatureGroup::Numeric { name: "dense".into(), columns: strings(&["prices"]), normalize: Normalize::None };
    let error = prepare(&schema, &paths, &no_cache()).expect_err("missing column");
    match &error {
        DataError::MissingColumn { file, column, close } => {
            assert_eq!(file, &paths.train);
            assert_eq!(column, "prices");
            assert_eq!(close.first().map(String::as_str), Some("price"));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(error.to_string().contains("close names: price"), "{error}");

    // A fixed domain count rejects larger ids.
    let mut schema = small_schema(None);
    schema.domain = Some(DomainSpec { column: "domain".into(), count: Some(2) });
    let message = prepare(&schema, &paths, &no_cache()).expect_err("domain 2 of 2").to_string();
    assert!(message.contains("train.csv:5:") && message.contains("outside 0..2"), "{message}");

    // A fitted domain count rejects ids beyond train's in other files.
    let extra = TempFolder::new("domain");
    let paths = small_files(&extra, "1,0,0,u1,i1,red,,t1,1.0\n");
    let message = prepare(&small_schema(None), &paths, &no_cache()).expect_err("domain 2 unseen").to_string();
    assert!(message.contains("valid.csv.gz:3:") && message.contains("'domain'"), "{message}");
}

// ---------------------------------------------------------------- cache

#[test]
fn cache_hits_and_rebuilds_corrupt_files() {
    let folder = TempFolder::new("cache");
    let paths = small_files(&folder, TRAIN);
    let cache = folder.join("cache");
    let options =
        PrepareOptions { bad_rows: BadRows::Fail, cache: CacheMode::Folder(cache.clone()), ..Default::default() };
    let schema = small_schema(None);
    let first = prepare(&schema, &paths, &options).expect("first");
    assert!(!first.stats.cache_hit);
    let file = first.stats.cache_file.clone().expect("cache file");
    assert!(file.starts_with(&cache) && file.exists());

    let second = prepare(&schema, &paths, &options).expect("second");
    assert!(second.stats.cache_hit, "{:?}", second.stats);
    // The cached splits read their rows from the file, and they are the rows prepared in
    // memory; so are batches drawn from them.
    assert!(first.train.stored.is_some() && second.train.stored.is_some());
    let in_memory = prepare(&schema, &paths, &no_cache()).expect("in memory");
    assert!(in_memory.train.stored.is_none());
    assert_eq!((&second.train, &second.test), (&in_memory.train, &in_memory.test));
    let (mut from_file, mut from_memory) = (second.train.new_batch(), in_memory.train.new_batch());
    second.train.gather(&[4, 0, 2, 2], &mut from_file).expect("gather from the file");
    in_memory.train.gather(&[4, 0, 2, 2], &mut from_memory).expect("gather in memory");
    assert_eq!(from_file, from_memory);
    assert_eq!(
        second.train.gather(&[5], &mut from_file).expect_err("out of range").to_string(),
        "row index 5 is out of range for a dataset of 5 rows"
    );
    assert_eq!(second.fitted, first.fitted);
    assert_eq!((&second.train, &second.valid, &second.test), (&first.train, &first.valid, &first.test));

    // Flip one byte in the middle: detected and rebuilt.
    let mut bytes = std::fs::read(&file).expect("read cache");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&file, &bytes).expect("corrupt");
    let rebuilt = prepare(&schema, &paths, &options).expect("rebuilt");
    assert!(!rebuilt.stats.cache_hit);
    assert!(rebuilt.stats.cache_note.as_deref().is_some_and(|n| n.contains("rebuilt")), "{:?}", rebuilt.stats);
    assert_eq!(rebuilt.train, first.train);
    assert!(prepare(&schema, &paths, &options).expect("after rebuild").stats.cache_hit);

    // Truncated: rebuilt as well.
    let bytes = std::fs::read(&file).expect("read cache");
    std::fs::write(&file, &bytes[..bytes.len() - 9]).expect("truncate");
    let rebuilt = prepare(&schema, &paths, &options).expect("rebuilt");
    assert!(!rebuilt.stats.cache_hit && rebuilt.valid == first.valid);

    // A different schema or different content uses a different key.
    let other = prepare(&small_schema(Some(2)), &paths, &options).expect("other schema");
    assert!(!other.stats.cache_hit);
    assert_ne!(other.stats.cache_file, first.stats.cache_file);
    write_plain(&paths.train, &format!("{HEADER}{TRAIN}0,0,0,u1,i1,red,,t1,1.0\n"));
    let changed = prepare(&schema, &paths, &options).expect("changed file");
    assert!(!changed.stats.cache_hit);
    assert_eq!(changed.train.rows, 6);
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .expect("list cache")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

// ---------------------------------------------------------------- real data

/// The folder of a dataset in `../shared/data`, or `None` (the test prints why it skips)
/// when it is absent and `MDL_REQUIRE_DATA` is not `1`. CI sets it, so there a missing
/// dataset fails the test instead of letting it pass by skipping.
fn shared_data(name: &str) -> Option<PathBuf> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name);
    if folder.join("train.csv.gz").exists() {
        return Some(folder);
    }
    let required = std::env::var("MDL_REQUIRE_DATA").is_ok_and(|v| v == "1");
    assert!(!required, "MDL_REQUIRE_DATA=1 but {} is not present", folder.display());
    println!("skipping: {} is not present", folder.display());
    None
}

fn kuairand_schema() -> Schema {
    let mut categorical = strings(&[
        "user_id",
        "video_id",
        "author_id",
        "music_id",
        "hour",
        "video_type",
        "upload_type",
        "music_type",
        "first_tag",
        "video_age_days",
        "user_active_degree",
        "is_lowactive_period",
        "is_live_streamer",
        "is_video_author",
        "follow_user_num_range",
        "fans_user_num_range",
        "friend_user_num_range",
        "register_days_range",
    ]);
    categorical.extend((0..18).map(|i| format!("onehot_feat{i}")));
    Schema {
        features: vec![
            FeatureGroup::Categorical {
                name: "sparse".into(),
                columns: categorical,
                min_count: None,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Sequence {
                name: "history".into(),
                columns: strings(&["hist_click_seq", "hist_longview_seq"]),
                max_len: 50,
                vocab: Some("video_id".into()),
                min_count: None,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Sequence {
                name: "tags".into(),
                columns: strings(&["tag"]),
                max_len: 8,
                vocab: None,
                min_count: None,
                max_vocab: None,
                hash_buckets: None,
            },
            FeatureGroup::Numeric {
                name: "dense".into(),
                columns: strings(&[
                    "follow_user_num",
                    "fans_user_num",
                    "friend_user_num",
                    "register_days",
                    "duration_ms",
                    "video_duration",
                    "server_width",
                    "server_height",
                ]),
                normalize: Normalize::Standard,
            },
        ],
        labels: vec![
            Task { name: "click".into(), column: "label".into(), values: Default::default() },
            Task { name: "long_view".into(), column: "label_long_view".into(), values: Default::default() },
        ],
        domain: Some(DomainSpec { column: "domain".into(), count: None }),
        user: Some("user_id".into()),
        min_count: 1,
        max_vocab: None,
        hash_buckets: None,
    }
}

#[test]
fn kuairand_pure_tail_prepares_and_caches() {
    let Some(folder) = shared_data("kuairand_pure_tail") else {
        return;
    };
    let cache = TempFolder::new("kuairand-cache");
    let options =
        PrepareOptions { bad_rows: BadRows::Fail, cache: CacheMode::Folder(cache.to_path_buf()), ..Default::default() };
    let schema = kuairand_schema();
    let paths = SplitPaths::in_folder(&folder);
    let parsed = prepare(&schema, &paths, &options).expect("prepare kuairand");
    let cached = prepare(&schema, &paths, &options).expect("prepare kuairand from cache");
    println!(
        "kuairand_pure_tail: parse {:.3} s (hash {:.3} s, cache write {:.3} s, total {:.3} s); \
         cached load {:.3} s (hash {:.3} s, cache read {:.3} s)",
        parsed.stats.parse_seconds,
        parsed.stats.hash_seconds,
        parsed.stats.cache_seconds,
        parsed.stats.total_seconds,
        cached.stats.total_seconds,
        cached.stats.hash_seconds,
        cached.stats.cache_seconds,
    );
    assert!(!parsed.stats.cache_hit && cached.stats.cache_hit, "{:?}", cached.stats);
    assert_eq!(parsed.stats.cache_note, None);
    assert_eq!((parsed.train.rows, parsed.valid.rows, parsed.test.rows), (135128, 18943, 30990));
    // (assert! rather than assert_eq!: the Debug output of these is megabytes)
    assert!(cached.fitted == parsed.fitted, "the cached fitted state differs");
    assert!(cached.train == parsed.train, "the cached train split differs");
    assert!(cached.valid == parsed.valid && cached.test == parsed.test, "a cached split differs");

    let layout = parsed.fitted.layout();
    assert_eq!(layout.domains, 15);
    let sparse = &layout.categorical[0];
    let videos = sparse.columns.iter().position(|c| c == "video_id").expect("video_id");
    assert_eq!(sparse.vocab_sizes[videos], 5876 + 2, "train has 5,876 videos");
    assert_eq!(layout.sequence[0].rows, sparse.rows, "history shares the sparse table");
    let train = &parsed.train.resident().expect("read the train rows");
    assert!(train.cat[0].iter().all(|&id| (id as usize) < sparse.rows));
    assert!(train.seq_ids[0].iter().all(|&id| (id as usize) < sparse.rows));
    let first_video = sparse.offsets[videos] + 2;
    assert!(train.seq_ids[0].contains(&first_video), "history items map into the video_id range");
    // About 29% of rows have an empty click history (README): its last slot is padding.
    let empty_clicks = (0..train.rows).filter(|r| train.seq_mask[0][r * 100 + 49] == 0.0).count();
    assert!((0.2..0.4).contains(&(empty_clicks as f64 / train.rows as f64)), "{empty_clicks}");
    assert_eq!(train.domain.iter().filter(|&&d| d == 1).count(), 101196);
    let click_rate = train.task_labels(0).map(f64::from).sum::<f64>() / train.rows as f64;
    assert!((click_rate - 0.4425).abs() < 5e-5, "README: train click rate 0.4425, got {click_rate}");
    let dense_mean: f64 = train.num[0].iter().map(|&x| x as f64).sum::<f64>() / train.num[0].len() as f64;
    assert!(dense_mean.abs() < 0.05, "standardised train features have mean ≈ 0: {dense_mean}");

    // End to end with the metrics: score test rows by their domain's train click rate.
    let mut rate = [(0.0f64, 0.0f64); 15];
    for (row, &d) in train.domain.iter().enumerate() {
        rate[d as usize].0 += train.labels[row * 2] as f64;
        rate[d as usize].1 += 1.0;
    }
    let test = &parsed.test;
    let scores: Vec<f32> = test
        .domain
        .iter()
        .flat_map(|&d| {
            let (clicks, rows) = rate[d as usize];
            let p = (clicks / rows.max(1.0)) as f32;
            [p, p]
        })
        .collect();
    let report =
        Report::compute(&layout.tasks, &scores, &test.labels, Some(&test.domain), Some(&test.user)).expect("report");
    let overall = report.auc.expect("auc");
    println!("domain-prior baseline on test: auc {overall:.4} gauc {:?} logloss {:?}", report.gauc, report.logloss);
    assert!(overall > 0.55, "the domain prior alone separates clicks: {overall}");
    assert_eq!(report.per_domain.values().map(|d| d.count).sum::<usize>(), test.rows);

    // Train is read on every thread, and the cache file does not depend on how many.
    let written = std::fs::read(parsed.stats.cache_file.as_ref().expect("a cache file")).expect("read the cache");
    for threads in [1, 3] {
        let cache = TempFolder::new(&format!("kuairand-cache-{threads}"));
        let options = PrepareOptions { threads, cache: CacheMode::Folder(cache.to_path_buf()), ..options.clone() };
        let again = prepare(&schema, &paths, &options).expect("prepare kuairand");
        let bytes = std::fs::read(again.stats.cache_file.as_ref().expect("a cache file")).expect("read the cache");
        assert!(bytes == written, "the cache file differs with {threads} threads");
    }
}
