//! Input formats on the bundled kuairand_pure_tail: the splits written as TSV
//! (`data.delimiter`), as folders and glob patterns of gzipped part files, and as Parquet
//! (written here with the same `parquet` crate, typed columns, lists for the sequences,
//! several row groups) prepare to exactly the dataset the CSV gives, train to the same
//! metrics.json, and score the same with `mdl eval` / `mdl predict`. Parts that disagree,
//! patterns that match nothing and Parquet columns that are missing or of a wrong type are
//! errors naming the file and the column.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use mdl::data::{prepare, CacheMode, Delimiter, PrepareOptions, Prepared, SplitPaths};
use parquet::basic::{Compression, Type as Physical};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

fn tmp(name: &str) -> common::scratch::Scratch {
    common::scoring::tmp("formats", name)
}

fn mdl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mdl"))
        .args(args)
        .current_dir(common::root())
        .env("MDL_CACHE_DIR", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("formats-cache"))
        .env("CI", "1")
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "mdl failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn split_file(split: &str) -> PathBuf {
    common::root().join("data/kuairand_pure_tail").join(format!("{split}.csv.gz"))
}

/// The lines of a bundled split (header first).
fn lines(split: &str) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(split_file(split)).unwrap()).read_to_string(&mut text).unwrap();
    text.lines().map(str::to_string).collect()
}

/// The fields of one line of the bundled data: commas separate them, and a field in quotes
/// (`"(150,250]"`) holds commas; the data has no quote inside a field.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

fn write_gz(path: &Path, lines: &[String]) {
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    for line in lines {
        writeln!(gz, "{line}").unwrap();
    }
    gz.finish().unwrap();
}

/// How a column is written to Parquet: the narrowest type that reads back as the same text.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Int,
    Double,
    IntList,
    Text,
}

fn kind_of(name: &str, values: &[&str]) -> Kind {
    let present = || values.iter().filter(|v| !v.is_empty());
    let int = |v: &str| v.parse::<i64>().is_ok_and(|x| x.to_string() == v);
    if name == "label" && present().all(|v| *v == "0" || *v == "1") {
        Kind::Bool
    } else if present().all(|v| int(v)) {
        Kind::Int
    } else if present().all(|v| v.parse::<f64>().is_ok_and(|x| x.to_string() == *v)) {
        Kind::Double
    } else if present().any(|v| v.contains(' '))
        && present().all(|v| v.split(' ').all(int) && v.split(' ').collect::<Vec<_>>().join(" ") == *v)
    {
        Kind::IntList
    } else {
        Kind::Text
    }
}

/// Writes rows (a header, then text rows) as a Parquet file of typed, optional columns, in
/// row groups of `group_rows`, Snappy-compressed; an empty cell is a null (an empty list
/// for a list column).
fn write_parquet(path: &Path, header: &[String], rows: &[Vec<String>], group_rows: usize) {
    let columns: Vec<Vec<&str>> = (0..header.len()).map(|c| rows.iter().map(|r| r[c].as_str()).collect()).collect();
    let kinds: Vec<Kind> = header.iter().zip(&columns).map(|(name, values)| kind_of(name, values)).collect();
    let fields = header
        .iter()
        .zip(&kinds)
        .map(|(name, kind)| {
            let primitive = |name: &str, physical| {
                Type::primitive_type_builder(name, physical)
                    .with_repetition(parquet::basic::Repetition::OPTIONAL)
                    .with_converted_type(if physical == Physical::BYTE_ARRAY {
                        parquet::basic::ConvertedType::UTF8
                    } else {
                        parquet::basic::ConvertedType::NONE
                    })
                    .build()
                    .unwrap()
            };
            Arc::new(match kind {
                Kind::Bool => primitive(name, Physical::BOOLEAN),
                Kind::Int => primitive(name, Physical::INT64),
                Kind::Double => primitive(name, Physical::DOUBLE),
                Kind::Text => primitive(name, Physical::BYTE_ARRAY),
                Kind::IntList => {
                    let element = Arc::new(primitive("element", Physical::INT64));
                    let list = Type::group_type_builder("list")
                        .with_repetition(parquet::basic::Repetition::REPEATED)
                        .with_fields(vec![element])
                        .build()
                        .unwrap();
                    Type::group_type_builder(name)
                        .with_repetition(parquet::basic::Repetition::OPTIONAL)
                        .with_converted_type(parquet::basic::ConvertedType::LIST)
                        .with_fields(vec![Arc::new(list)])
                        .build()
                        .unwrap()
                }
            })
        })
        .collect();
    let schema = Arc::new(Type::group_type_builder("schema").with_fields(fields).build().unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for start in (0..rows.len()).step_by(group_rows.max(1)) {
        let end = (start + group_rows).min(rows.len());
        let mut group = writer.next_row_group().unwrap();
        for (kind, values) in kinds.iter().zip(&columns) {
            let values = &values[start..end];
            let def: Vec<i16> = values.iter().map(|v| i16::from(!v.is_empty())).collect();
            let present = values.iter().filter(|v| !v.is_empty());
            let mut column = group.next_column().unwrap().unwrap();
            match kind {
                Kind::Bool => {
                    let data: Vec<bool> = present.map(|v| *v == "1").collect();
                    column.typed::<BoolType>().write_batch(&data, Some(&def), None).unwrap();
                }
                Kind::Int => {
                    let data: Vec<i64> = present.map(|v| v.parse().unwrap()).collect();
                    column.typed::<Int64Type>().write_batch(&data, Some(&def), None).unwrap();
                }
                Kind::Double => {
                    let data: Vec<f64> = present.map(|v| v.parse().unwrap()).collect();
                    column.typed::<DoubleType>().write_batch(&data, Some(&def), None).unwrap();
                }
                Kind::Text => {
                    let data: Vec<ByteArray> = present.map(|v| ByteArray::from(*v)).collect();
                    column.typed::<ByteArrayType>().write_batch(&data, Some(&def), None).unwrap();
                }
                Kind::IntList => {
                    // Levels: 1 = an empty list, 3 = an item; repetition 1 continues a list.
                    let (mut data, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                    for v in values {
                        if v.is_empty() {
                            def.push(1);
                            rep.push(0);
                        }
                        for (i, item) in v.split(' ').filter(|s| !s.is_empty()).enumerate() {
                            data.push(item.parse::<i64>().unwrap());
                            def.push(3);
                            rep.push(i16::from(i > 0));
                        }
                    }
                    column.typed::<Int64Type>().write_batch(&data, Some(&def), Some(&rep)).unwrap();
                }
            }
            column.close().unwrap();
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

/// The bundled split written as Parquet (row groups of 40,000 rows).
fn parquet_split(dir: &Path, split: &str) -> PathBuf {
    let lines = lines(split);
    let header = fields(&lines[0]);
    let rows: Vec<Vec<String>> = lines[1..].iter().map(|l| fields(l)).collect();
    let path = dir.join(format!("{split}.parquet"));
    write_parquet(&path, &header, &rows, 40_000);
    path
}

fn quickstart() -> mdl::experiment::Experiment {
    mdl::experiment::load(&common::root().join("experiments/quickstart.yaml"), &[]).unwrap()
}

fn prepared(paths: &SplitPaths, delimiter: Delimiter) -> Prepared {
    let options = PrepareOptions { cache: CacheMode::Off, delimiter, ..PrepareOptions::default() };
    prepare(&quickstart().data.schema, paths, &options).unwrap_or_else(|e| panic!("{e}"))
}

/// Two preparations give the same fitted state and the same encoded splits (the sources
/// aside).
fn assert_same(a: &Prepared, b: &Prepared, what: &str) {
    assert!(a.fitted == b.fitted, "{what}: the fitted state differs");
    for (x, y, split) in [(&a.train, &b.train, "train"), (&a.valid, &b.valid, "valid"), (&a.test, &b.test, "test")] {
        let mut y = y.clone();
        y.source = x.source.clone();
        assert!(*x == y, "{what}: the {split} split encodes differently");
    }
}

fn bundled() -> SplitPaths {
    SplitPaths { train: split_file("train"), valid: split_file("valid"), test: split_file("test") }
}

/// A short DNN run on the given splits (`data.train=...` and so on).
fn short_run(out: &Path, data: &[String]) -> Vec<u8> {
    let mut args: Vec<String> =
        ["run", "experiments/quickstart.yaml", "--out", out.to_str().unwrap()].iter().map(|s| s.to_string()).collect();
    for set in [
        "spec=specs/dnn.mdl",
        "train.batch_size=512",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.early_stopping.patience=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(data.iter().cloned())
    {
        args.push("--set".into());
        args.push(set);
    }
    ok(&mdl(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    std::fs::read(out.join("metrics.json")).unwrap()
}

fn splits_set(paths: &SplitPaths) -> Vec<String> {
    vec![
        format!("data.train={}", paths.train.display()),
        format!("data.valid={}", paths.valid.display()),
        format!("data.test={}", paths.test.display()),
    ]
}

#[test]
fn parquet_splits_prepare_train_and_score_as_the_csv_does() {
    let dir = tmp("parquet");
    let paths = SplitPaths {
        train: parquet_split(&dir, "train"),
        valid: parquet_split(&dir, "valid"),
        test: parquet_split(&dir, "test"),
    };
    assert_same(&prepared(&bundled(), Delimiter::COMMA), &prepared(&paths, Delimiter::COMMA), "parquet");

    let csv_run = dir.join("csv_run");
    let parquet_run = dir.join("parquet_run");
    let csv_metrics = short_run(&csv_run, &[]);
    assert_eq!(short_run(&parquet_run, &splits_set(&paths)), csv_metrics, "metrics.json of Parquet against CSV");

    // `mdl eval` on the Parquet test split reproduces metrics.json's test block.
    let test = paths.test.to_str().unwrap();
    let eval = mdl(&["eval", parquet_run.to_str().unwrap(), "--data", test]);
    ok(&eval);
    let m: serde_json::Value = serde_json::from_slice(&csv_metrics).unwrap();
    let e: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(e["auc"], m["test"]["auc"]);

    // `mdl predict` on Parquet writes what it writes for the CSV, ids kept.
    let scores = |data: &str, name: &str| {
        let out = dir.join(name);
        let args = ["predict", csv_run.to_str().unwrap(), "--data", data, "--out", out.to_str().unwrap()];
        ok(&mdl(&[&args[..], &["--keep", "user_id,video_id"]].concat()));
        std::fs::read_to_string(out).unwrap()
    };
    let from_csv = scores(split_file("valid").to_str().unwrap(), "csv.csv");
    assert_eq!(from_csv.lines().count(), 18943 + 1);
    assert_eq!(scores(paths.valid.to_str().unwrap(), "parquet.csv"), from_csv);
}

#[test]
fn part_files_and_tsv_prepare_as_the_single_csv_does() {
    let dir = tmp("parts");
    let train = lines("train");
    // Train as a folder of three gzipped parts, as Spark writes them (with a _SUCCESS
    // marker and a .crc file, which are passed over); valid as a glob of two parts.
    let folder = dir.join("train");
    std::fs::create_dir_all(&folder).unwrap();
    let rows = &train[1..];
    let third = rows.len() / 3;
    for (i, chunk) in [&rows[..third], &rows[third..2 * third], &rows[2 * third..]].iter().enumerate() {
        let part: Vec<String> = std::iter::once(train[0].clone()).chain(chunk.iter().cloned()).collect();
        write_gz(&folder.join(format!("part-0000{i}-abc.csv.gz")), &part);
    }
    std::fs::write(folder.join("_SUCCESS"), "").unwrap();
    std::fs::write(folder.join(".part-00000-abc.csv.gz.crc"), "x").unwrap();
    let valid = lines("valid");
    let half = valid.len() / 2;
    write_gz(&dir.join("valid-part-1.csv.gz"), &valid[..half]);
    write_gz(&dir.join("valid-part-2.csv.gz"), &[&valid[..1], &valid[half..]].concat());
    let paths = SplitPaths { train: folder.clone(), valid: dir.join("valid-part-*.csv.gz"), test: split_file("test") };
    let whole = prepared(&bundled(), Delimiter::COMMA);
    assert_same(&whole, &prepared(&paths, Delimiter::COMMA), "parts");

    // The same data as TSV: `data.delimiter: "\t"`.
    let tsv = |split: &str| {
        let path = dir.join(format!("{split}.tsv"));
        let text: Vec<String> = lines(split).iter().map(|l| fields(l).join("\t")).collect();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        path
    };
    let tsv_paths = SplitPaths { train: tsv("train"), valid: tsv("valid"), test: tsv("test") };
    assert_same(&whole, &prepared(&tsv_paths, "\\t".parse().unwrap()), "tsv");
    // Read as CSV, the TSV header is one column, so the first feature column is missing.
    let wrong = prepare(
        &quickstart().data.schema,
        &tsv_paths,
        &PrepareOptions { cache: CacheMode::Off, ..PrepareOptions::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(wrong.starts_with(&format!("{}: no column 'domain' in the header", tsv_paths.train.display())), "{wrong}");

    // A part whose columns differ is named, with the first part (here a column the schema
    // does not read; one it reads would be missing from the part, an error naming both).
    let mut other = train[..100].to_vec();
    other[0] = other[0].replacen("label_like", "like", 1);
    write_gz(&folder.join("part-00003-abc.csv.gz"), &other);
    let err =
        prepare(&quickstart().data.schema, &paths, &PrepareOptions { cache: CacheMode::Off, ..Default::default() })
            .unwrap_err()
            .to_string();
    assert_eq!(
        err,
        format!(
            "{}: its columns differ from those of the split's first part {} (column 3 is 'label_like' there and \
             'like' here); every part of a split must have the same columns in the same order",
            folder.join("part-00003-abc.csv.gz").display(),
            folder.join("part-00000-abc.csv.gz").display()
        )
    );

    // Through the experiment: a pattern that matches nothing names the key; the delimiter
    // key takes one character.
    let none = dir.join("nothing-*.csv.gz");
    let run = mdl(&["run", "experiments/quickstart.yaml", "--set", &format!("data.valid={}", none.display())]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(&format!("data.valid: the valid split {}: the pattern matches no file", none.display())),
        "{err}"
    );
    let run = mdl(&["run", "experiments/quickstart.yaml", "--set", "data.delimiter=ab"]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("data.delimiter") && err.contains("expected one ASCII character"), "{err}");
}

/// A small Parquet file: a label, an item id and a date column, all required.
fn small_parquet(path: &Path, label: (Physical, &[&str])) {
    const REQUIRED: parquet::basic::Repetition = parquet::basic::Repetition::REQUIRED;
    let fields = vec![
        Arc::new(Type::primitive_type_builder("label", label.0).with_repetition(REQUIRED).build().unwrap()),
        Arc::new(Type::primitive_type_builder("video_id", Physical::INT64).with_repetition(REQUIRED).build().unwrap()),
        Arc::new(
            Type::primitive_type_builder("day", Physical::INT32)
                .with_repetition(REQUIRED)
                .with_converted_type(parquet::basic::ConvertedType::DATE)
                .build()
                .unwrap(),
        ),
    ];
    let schema = Arc::new(Type::group_type_builder("schema").with_fields(fields).build().unwrap());
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, Default::default()).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    match label.0 {
        Physical::BYTE_ARRAY => {
            let data: Vec<ByteArray> = label.1.iter().map(|v| ByteArray::from(*v)).collect();
            column.typed::<ByteArrayType>().write_batch(&data, None, None).unwrap();
        }
        _ => {
            let data: Vec<i64> = label.1.iter().map(|v| v.parse().unwrap()).collect();
            column.typed::<Int64Type>().write_batch(&data, None, None).unwrap();
        }
    }
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<Int64Type>().write_batch(&[7, 8], None, None).unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<Int32Type>().write_batch(&[19000, 19001], None, None).unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn bad_parquet_columns_are_errors_naming_the_file_row_and_column() {
    let dir = tmp("bad_parquet");
    let schema = |categorical: &[&str]| -> mdl::data::Schema {
        let columns = categorical.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        serde_yaml::from_str(&format!(
            "{{features: [{{kind: categorical, name: ids, columns: [{columns}]}}], labels: [{{name: click, column: label}}]}}"
        ))
        .unwrap()
    };
    let prep = |path: &Path, categorical: &[&str]| {
        let paths = SplitPaths { train: path.to_path_buf(), valid: path.to_path_buf(), test: path.to_path_buf() };
        prepare(&schema(categorical), &paths, &PrepareOptions { cache: CacheMode::Off, ..Default::default() })
    };
    let good = dir.join("good.parquet");
    small_parquet(&good, (Physical::INT64, &["0", "1"]));
    let p = prep(&good, &["video_id"]).unwrap();
    assert_eq!((p.train.rows, p.train.labels.clone()), (2, vec![0.0, 1.0]));

    let missing = prep(&good, &["video_idx"]).unwrap_err().to_string();
    assert_eq!(missing, format!("{}: no column 'video_idx' in the header (close names: video_id)", good.display()));
    let date = prep(&good, &["day"]).unwrap_err().to_string();
    assert_eq!(
        date,
        format!(
            "{}: row 1: column 'day' holds a date value, which mdl cannot read (expected a string, an integer, a \
             float, a boolean, or a list of them)",
            good.display()
        )
    );
    let text_labels = dir.join("text_labels.parquet");
    small_parquet(&text_labels, (Physical::BYTE_ARRAY, &["0", "yes"]));
    let label = prep(&text_labels, &["video_id"]).unwrap_err().to_string();
    assert_eq!(
        label,
        format!("{}: row 2: column 'label': a label must be 0 or 1 (value \"yes\")", text_labels.display())
    );
    let truncated = dir.join("truncated.parquet");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = prep(&truncated, &["video_id"]).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: cannot read the Parquet file: ", truncated.display())), "{err}");
}
