//! Document ingest: formats, and bad lines named by file and line (or counted and skipped).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::support::util::{backforth, backforth_ok, marker};

const GOOD: &str = r#"{"id": "a", "text": "A perfectly good document about rivers and bridges.", "source": "t", "metadata": {"k": 1}}"#;

fn job(dir: &Path, input: &str, policy: &str) -> String {
    let path = dir.join(format!("job-{policy}.toml"));
    std::fs::write(
        &path,
        format!(
            "output = \"out-{policy}\"\n[input]\npaths = [\"{input}\"]\non_bad_line = \"{policy}\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn bad_lines_are_named_or_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        GOOD,
        "{not json",
        r#"{"id": "b"}"#,
        r#"{"id": "c", "text": 7}"#,
        "",
    ];
    std::fs::write(dir.path().join("bad.jsonl"), lines.join("\n")).unwrap();

    let out = backforth(&[
        "run",
        &job(dir.path(), "bad.jsonl", "error"),
        "--stages",
        "prepare",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.jsonl:2: not valid JSON"), "{stderr}");
    assert!(stderr.contains("on_bad_line = \"skip\""), "{stderr}");
    assert!(!dir.path().join("out-error/candidates/_SUCCESS").exists());

    backforth_ok(&[
        "run",
        &job(dir.path(), "bad.jsonl", "skip"),
        "--stages",
        "prepare",
    ]);
    let m = marker(&dir.path().join("out-skip"), "candidates");
    assert_eq!(m["input"]["documents"], 1);
    assert_eq!(
        m["input"]["skipped"],
        json!({"invalid_json": 1, "missing_text": 1, "text_not_string": 1})
    );
    assert_eq!(m["rows_out"], 1);
}

#[test]
fn missing_text_names_the_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.jsonl"),
        format!("{GOOD}\n{{\"id\": \"b\", \"text\": null}}\n"),
    )
    .unwrap();
    let out = backforth(&[
        "run",
        &job(dir.path(), "d.jsonl", "error"),
        "--stages",
        "prepare",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("d.jsonl:2: column 'text' is missing or null"),
        "{stderr}"
    );
}

#[test]
fn gzip_zstd_plain_and_parquet_inputs_from_a_directory_or_glob() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let doc = |id: &str| {
        json!({"id": id, "text": format!("Document {id} explains one thing clearly.")}).to_string()
            + "\n"
    };
    std::fs::write(data.join("a.jsonl"), doc("plain")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(doc("gzip").as_bytes()).unwrap();
    std::fs::write(data.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        data.join("c.jsonl.zst"),
        zstd::encode_all(doc("zstd").as_bytes(), 3).unwrap(),
    )
    .unwrap();
    write_parquet(&data.join("d.parquet"));
    std::fs::write(data.join("notes.txt"), "not a document file").unwrap();

    backforth_ok(&[
        "run",
        &job(dir.path(), "data/", "error"),
        "--stages",
        "prepare",
    ]);
    let m = marker(&dir.path().join("out-error"), "candidates");
    assert_eq!(m["input"]["documents"], 5);
    assert_eq!(m["rows_out"], 5);

    let glob = format!("{}/*.jsonl*", data.display());
    let job_path = job(dir.path(), "unused", "skip");
    backforth_ok(&["run", &job_path, "--input", &glob, "--stages", "prepare"]);
    assert_eq!(
        marker(&dir.path().join("out-skip"), "candidates")["input"]["documents"],
        3
    );
}

fn write_parquet(path: &Path) {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2])),
            Arc::new(StringArray::from(vec![
                Some("First parquet document."),
                Some("Second parquet document."),
            ])),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Writes `(id, text)` documents to the JSONL file `path`.
fn write_docs(path: &Path, docs: &[(&str, &str)]) {
    let body: String = docs
        .iter()
        .map(|(id, text)| json!({"id": id, "text": text}).to_string() + "\n")
        .collect();
    std::fs::write(path, body).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn each_input_file_is_a_shard_deduplicated_against_the_files_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_docs(
        &data.join("a.jsonl"),
        &[
            ("a1", "Rivers carry silt to the sea."),
            ("a2", "Bridges need inspection."),
        ],
    );
    write_docs(
        &data.join("b.jsonl"),
        &[
            ("b1", "rivers  carry silt to the SEA."),
            ("b2", "Orchards need pruning."),
        ],
    );
    let job = job(dir.path(), "data/", "error");
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    let root = dir.path().join("out-error");
    let m = marker(&root, "candidates");
    assert_eq!(m["rows_out"], 3);
    assert_eq!(m["dropped"], json!({"duplicate_across_files": 1}));
    assert_eq!(m["input"]["documents"], 4);
    let b: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("candidates/_shards/00001.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        b["dropped"],
        json!({"duplicate_across_files": 1}),
        "the copy in the later file is the one dropped"
    );
    // The files named in the other order: shards run in another order, the same copy goes.
    let other = dir.path().join("other-order");
    backforth_ok(&[
        "run",
        &job,
        "--stages",
        "prepare",
        "--output",
        other.to_str().unwrap(),
        "--input",
        data.join("b.jsonl").to_str().unwrap(),
        "--input",
        data.join("a.jsonl").to_str().unwrap(),
    ]);
    let ctx = crate::support::util::session(&other).await;
    assert_eq!(
        crate::support::util::rows(&ctx, "SELECT doc_id, drop_reason FROM candidates_dropped")
            .await,
        vec![vec!["b1".to_string(), "duplicate_across_files".to_string()]]
    );

    // A rerun redoes only the input shard whose marker is gone.
    let part_a = root.join("candidates/part-00000-0000.parquet");
    let before = std::fs::metadata(&part_a).unwrap().modified().unwrap();
    std::fs::remove_file(root.join("candidates/_shards/00001.json")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    assert_eq!(
        std::fs::metadata(&part_a).unwrap().modified().unwrap(),
        before
    );
    assert!(root.join("candidates/_shards/00001.json").exists());
    assert_eq!(marker(&root, "candidates")["rows_out"], 3);

    // A new file sorting last becomes a new shard; the others are kept.
    write_docs(
        &data.join("c.jsonl"),
        &[
            ("c1", "Orchards need pruning."),
            ("c2", "Lanterns light the harbour."),
        ],
    );
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    assert_eq!(
        std::fs::metadata(&part_a).unwrap().modified().unwrap(),
        before
    );
    let m = marker(&root, "candidates");
    assert_eq!(m["rows_out"], 4);
    assert_eq!(m["dropped"], json!({"duplicate_across_files": 2}));
}

/// Six files drawing their documents from twenty texts, so most texts repeat within and
/// across files. Returns the inputs in path order and, per doc_id, the drop reason exact dedup
/// must give: `duplicate` after an earlier copy in the same file, `duplicate_across_files`
/// after one in a file earlier by path, none for the first copy.
fn repeating_corpus(dir: &Path) -> (Vec<String>, BTreeMap<String, Option<&'static str>>) {
    let mut rng = crate::support::rng::Rng(0xd0c5);
    let texts: Vec<String> = (0..20)
        .map(|t| format!("Text number {t} is about the harbour, its {t} cranes and tides."))
        .collect();
    let (mut inputs, mut expected) = (Vec::new(), BTreeMap::new());
    let mut seen_in_earlier_files = std::collections::BTreeSet::new();
    for f in 0..6 {
        let mut body = String::new();
        let mut seen_here = std::collections::BTreeSet::new();
        for line in 0..25 {
            let t = rng.below(texts.len() as u64) as usize;
            let id = format!("f{f}-{line}");
            body += &(json!({"id": id, "text": texts[t]}).to_string() + "\n");
            let reason = if !seen_here.insert(t) {
                Some("duplicate")
            } else if seen_in_earlier_files.contains(&t) {
                Some("duplicate_across_files")
            } else {
                None
            };
            expected.insert(id, reason);
        }
        seen_in_earlier_files.extend(seen_here);
        let path = dir.join(format!("f{f}.jsonl"));
        std::fs::write(&path, body).unwrap();
        inputs.push(path.to_str().unwrap().to_string());
    }
    (inputs, expected)
}

/// Per doc_id of the candidates under `root`, its drop reason (none when kept).
async fn reasons(root: &Path) -> BTreeMap<String, Option<&'static str>> {
    let ctx = crate::support::util::session(root).await;
    let mut out = BTreeMap::new();
    for row in crate::support::util::rows(&ctx, "SELECT doc_id FROM candidates").await {
        out.insert(row[0].clone(), None);
    }
    let dropped = "SELECT doc_id, drop_reason FROM candidates_dropped";
    for row in crate::support::util::rows(&ctx, dropped).await {
        let reason = match row[1].as_str() {
            "duplicate" => "duplicate",
            "duplicate_across_files" => "duplicate_across_files",
            other => panic!("unexpected drop reason {other}"),
        };
        assert!(
            out.insert(row[0].clone(), Some(reason)).is_none(),
            "{row:?} twice"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn exact_copies_keep_the_first_by_path_whatever_order_the_shards_ran_in() {
    let dir = tempfile::tempdir().unwrap();
    let (inputs, expected) = repeating_corpus(dir.path());
    let reversed: Vec<String> = inputs.iter().rev().cloned().collect();
    // One shard at a time in path order drops nearly every copy while its shard runs; in
    // reverse order none can be, and the pass after moves them all; two at a time, some of
    // each.
    for (name, files, parallel) in [
        ("forward-1", &inputs, 1),
        ("reverse-1", &reversed, 1),
        ("forward-2", &inputs, 2),
        ("reverse-2", &reversed, 2),
    ] {
        let job = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &job,
            format!("output = \"{name}\"\n[input]\npaths = []\n[execution]\ntarget_partitions = {parallel}\n"),
        )
        .unwrap();
        let mut args = vec!["run", job.to_str().unwrap(), "--stages", "prepare"];
        for input in files {
            args.extend(["--input", input.as_str()]);
        }
        backforth_ok(&args);
        let root = dir.path().join(name);
        assert_eq!(reasons(&root).await, expected, "{name}");
        let m = marker(&root, "candidates");
        let count = |reason| expected.values().filter(|r| **r == Some(reason)).count();
        assert_eq!(
            m["dropped"],
            json!({"duplicate": count("duplicate"), "duplicate_across_files": count("duplicate_across_files")}),
            "{name}"
        );
        // Both ways of dropping a copy across files were taken where they must be.
        let while_running: u64 = std::fs::read_dir(root.join("candidates/_shards"))
            .unwrap()
            .map(|e| {
                let m: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap())
                        .unwrap();
                m["dropped_while_running"].as_u64().unwrap()
            })
            .sum();
        match name {
            "forward-1" => assert_eq!(while_running as usize, count("duplicate_across_files")),
            "reverse-1" => assert_eq!(while_running, 0),
            _ => {}
        }
    }
}

#[test]
fn a_shard_that_dropped_copies_kept_by_a_changed_file_is_redone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_docs(
        &data.join("a.jsonl"),
        &[
            ("a1", "Tides turn twice a day."),
            ("a2", "Gulls nest on cliffs."),
        ],
    );
    write_docs(
        &data.join("b.jsonl"),
        &[
            ("b1", "Tides turn twice a day."),
            ("b2", "Ferries run hourly."),
        ],
    );
    let job = dir.path().join("job.toml");
    // One shard at a time: b.jsonl runs after a.jsonl and drops b1 while it runs.
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"data/\"]\n[execution]\ntarget_partitions = 1\n",
    )
    .unwrap();
    let job = job.to_str().unwrap();
    backforth_ok(&["run", job, "--stages", "prepare"]);
    let root = dir.path().join("out");
    let b: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("candidates/_shards/00001.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(b["dropped_while_running"], 1);
    assert_eq!(b["outranked_by"].as_object().unwrap().len(), 1);
    assert!(
        !root
            .join("candidates/_dropped/part-00001-0000-across.parquet")
            .exists()
    );

    // a.jsonl changes: a1 is gone, so b1 is the first copy now and must be kept, though
    // b.jsonl itself did not change.
    write_docs(
        &data.join("a.jsonl"),
        &[
            ("a1", "Tides turned, once."),
            ("a2", "Gulls nest on cliffs."),
        ],
    );
    backforth_ok(&["run", job, "--stages", "prepare"]);
    let m = marker(&root, "candidates");
    assert_eq!(m["rows_out"], 4, "{m}");
    assert_eq!(m["dropped"], json!({}));
}

#[test]
fn a_large_parquet_file_is_cut_into_row_group_shards() {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::parquet::file::properties::WriterProperties;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let ids: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
    let texts: Vec<Option<String>> = (0..40)
        .map(|i| {
            if i == 33 {
                None
            } else {
                Some(format!("Parquet document {i} on topic {}.", i * 11))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(texts)),
        ],
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(10))
        .build();
    let file = std::fs::File::create(dir.path().join("big.parquet")).unwrap();
    let mut w =
        datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let job_path = dir.path().join("job.toml");
    std::fs::write(
        &job_path,
        "output = \"out\"\n[input]\npaths = [\"big.parquet\"]\non_bad_line = \"skip\"\n[execution]\ninput_shard_bytes = 1\n",
    )
    .unwrap();
    backforth_ok(&["run", job_path.to_str().unwrap(), "--stages", "prepare"]);
    let root = dir.path().join("out");
    let shards = std::fs::read_dir(root.join("candidates/_shards"))
        .unwrap()
        .count();
    assert_eq!(shards, 4, "one shard per row group of 10 rows");
    let m = marker(&root, "candidates");
    assert_eq!(m["rows_out"], 39);
    assert_eq!(m["input"]["skipped"], json!({"missing_text": 1}));

    // With on_bad_line = "error", the null text is named by its row in the whole file.
    std::fs::write(
        &job_path,
        "output = \"out2\"\n[input]\npaths = [\"big.parquet\"]\n[execution]\ninput_shard_bytes = 1\n",
    )
    .unwrap();
    let out = backforth(&["run", job_path.to_str().unwrap(), "--stages", "prepare"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("big.parquet:34: column 'text' is null"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn within_a_file_the_first_copy_survives_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // 10,000 lines (three reader batches) with ids counting down, so the file's first copy
    // is never the one with the smallest id; every 7th line repeats a text from 5,000 lines
    // earlier, in other case and spacing.
    let mut lines = String::new();
    let mut expected_drops = 0;
    for i in 0..10_000u32 {
        let text = if i >= 5_000 && i % 7 == 0 {
            expected_drops += 1;
            format!(
                "NOTE   {} on the tides of bay {}.",
                i - 5_000,
                (i - 5_000) % 97
            )
        } else {
            format!("Note {i} on the tides of bay {}.", i % 97)
        };
        lines += &(json!({"id": format!("d{:05}", 99_999 - i), "text": text}).to_string() + "\n");
    }
    std::fs::write(data.join("a.jsonl"), lines).unwrap();
    let job = job(dir.path(), "data/", "error");
    for round in 0..2 {
        let root = dir.path().join(format!("out-{round}"));
        backforth_ok(&[
            "run",
            &job,
            "--stages",
            "prepare",
            "--output",
            root.to_str().unwrap(),
        ]);
        assert_eq!(
            marker(&root, "candidates")["dropped"],
            json!({"duplicate": expected_drops})
        );
        let ctx = crate::support::util::session(&root).await;
        let wrong = crate::support::util::rows(
            &ctx,
            "SELECT count(*) FROM candidates_dropped WHERE line <= 5000 OR text NOT LIKE 'NOTE%'",
        )
        .await;
        assert_eq!(
            wrong,
            vec![vec!["0".to_string()]],
            "only the later copies are dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_across_and_beyond_the_read_buffer_keep_their_text_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    // Lines are parsed inside the reader's 1 MiB buffer when they fit: here many lines cross
    // its edge, one is three times its size, one ends in CRLF, and the last has no newline.
    let long = "River banks erode slowly. ".repeat(120_000);
    let mut lines = Vec::new();
    for i in 0..3_000 {
        let text = if i == 1_500 {
            long.clone()
        } else {
            format!(
                "Line {i} says something about the delta {}.",
                "and more ".repeat(i % 50)
            )
        };
        lines.push(json!({"id": format!("d{i}"), "text": text}).to_string());
    }
    lines[10].push('\r');
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(lines.join("\n").as_bytes()).unwrap();
    std::fs::write(dir.path().join("d.jsonl.gz"), gz.finish().unwrap()).unwrap();
    let job_path = job(dir.path(), "d.jsonl.gz", "error");
    std::fs::write(
        &job_path,
        std::fs::read_to_string(&job_path).unwrap()
            + "[prepare]\nmax_chars = 0\nmax_tokens = 10000000\n",
    )
    .unwrap();
    backforth_ok(&["run", &job_path, "--stages", "prepare"]);
    let root = dir.path().join("out-error");
    assert_eq!(marker(&root, "candidates")["input"]["documents"], 3_000);
    let ctx = crate::support::util::session(&root).await;
    let rows = crate::support::util::rows(
        &ctx,
        "SELECT count(*), sum(CASE WHEN line = CAST(substr(doc_id, 2) AS BIGINT) + 1 THEN 1 END), \
         max(n_chars), sum(CASE WHEN text LIKE concat('Line ', substr(doc_id, 2), ' says%') THEN 1 END) \
         FROM candidates",
    )
    .await;
    assert_eq!(
        rows,
        vec![vec![
            "3000".to_string(),
            "3000".to_string(),
            long.trim().chars().count().to_string(),
            "2999".to_string()
        ]]
    );
}

/// Ids derived from file and line use the path under the input root, so two files of one
/// name in different folders give distinct ids (with one input, or one input per folder).
#[tokio::test(flavor = "multi_thread")]
async fn files_of_one_name_in_different_folders_get_distinct_ids() {
    let dir = tempfile::tempdir().unwrap();
    for folder in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(format!("docs/{folder}"))).unwrap();
        let lines: String = (0..3)
            .map(|i| {
                json!({"text": format!("Folder {folder} holds document {i}, unlike any other.")})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(dir.path().join(format!("docs/{folder}/x.jsonl")), lines).unwrap();
    }
    let docs = dir.path().join("docs");
    let expected: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|f| (1..=3).map(move |line| format!("{f}/x.jsonl:{line}")))
        .collect();
    for (name, inputs) in [
        ("one-input", vec![docs.clone()]),
        ("two-inputs", vec![docs.join("a"), docs.join("b")]),
    ] {
        let job = dir.path().join(format!("{name}.toml"));
        std::fs::write(&job, "output = \"out\"\n[input]\npaths = []\n").unwrap();
        let job = job.to_str().unwrap().to_string();
        let mut args = vec!["run".to_string(), job, "--stages".into(), "prepare".into()];
        for input in &inputs {
            args.extend(["--input".to_string(), input.to_str().unwrap().to_string()]);
        }
        args.extend([
            "--output".to_string(),
            dir.path().join(name).to_str().unwrap().to_string(),
        ]);
        backforth_ok(&args);
        let ctx = crate::support::util::session(&dir.path().join(name)).await;
        let ids: Vec<String> =
            crate::support::util::rows(&ctx, "SELECT doc_id FROM candidates ORDER BY doc_id")
                .await
                .into_iter()
                .map(|r| r[0].clone())
                .collect();
        assert_eq!(ids, expected, "{name}");
    }
}

/// Two documents given one id are an error naming both places; nothing is published.
#[test]
fn duplicate_explicit_ids_are_an_error_naming_both_places() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    std::fs::write(
        dir.path().join("docs/a.jsonl"),
        [
            json!({"id": "first", "text": "The first document speaks of rivers."}).to_string(),
            json!({"id": "same", "text": "The second document speaks of bridges."}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("docs/b.jsonl"),
        json!({"id": "same", "text": "Another document, about orchards, reuses the id."})
            .to_string(),
    )
    .unwrap();
    let out = backforth(&[
        "run",
        &job(dir.path(), "docs", "error"),
        "--stages",
        "prepare",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("b.jsonl:1: document id 'same' was already given to the document at")
            && stderr.contains("a.jsonl:2"),
        "{stderr}"
    );
    assert!(!dir.path().join("out-error/candidates/_SUCCESS").exists());
}

/// Every file under `dir` with its modification time.
fn written(dir: &Path) -> BTreeMap<String, std::time::SystemTime> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files.extend(written(&entry.path()));
        } else {
            let modified = entry.metadata().unwrap().modified().unwrap();
            files.insert(entry.path().to_string_lossy().into_owned(), modified);
        }
    }
    files
}

/// A rerun over the inputs the input stage was published from writes nothing: the passes over
/// the whole table (copies across files, repeated ids) are not run again.
#[test]
fn a_rerun_of_a_published_input_stage_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    for (name, texts) in [
        (
            "a",
            ["Rivers carry silt to the sea.", "Bridges span the river."],
        ),
        (
            "b",
            ["Bridges span the river.", "Orchards bloom in spring."],
        ),
    ] {
        let docs: Vec<(String, &str)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("{name}{i}"), *t))
            .collect();
        let docs: Vec<(&str, &str)> = docs.iter().map(|(id, t)| (id.as_str(), *t)).collect();
        write_docs(&dir.path().join(format!("docs/{name}.jsonl")), &docs);
    }
    let job = job(dir.path(), "docs", "error");
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    let out = dir.path().join("out-error/candidates");
    let m = marker(&dir.path().join("out-error"), "candidates");
    assert_eq!(m["dropped"], json!({"duplicate_across_files": 1}));
    let before = written(&out);
    std::thread::sleep(std::time::Duration::from_millis(20));
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    assert_eq!(written(&out), before);
}

/// `hash64` is the first eight bytes of the text's SHA-256, big-endian: the same on every
/// machine and version, so samples drawn with it repeat.
#[test]
fn hash64_is_the_first_eight_bytes_of_sha256() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    write_docs(
        &dir.path().join("docs/a.jsonl"),
        &[("a", "Rivers carry silt.")],
    );
    backforth_ok(&[
        "run",
        &job(dir.path(), "docs", "error"),
        "--stages",
        "prepare",
    ]);
    let out = backforth_ok(&[
        "sql",
        "--root",
        dir.path().join("out-error").to_str().unwrap(),
        "SELECT hash64('abc') AS abc, hash64('') AS empty, hash64(NULL) AS null_text, \
         hash64(doc_id) = hash64('a') AS same FROM candidates",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let cells: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .nth(1)
        .unwrap()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect();
    // python3 -c "import hashlib; print(int.from_bytes(hashlib.sha256(b'abc').digest()[:8], 'big'))"
    assert_eq!(
        cells,
        ["13436514500253700074", "16406829232824261652", "", "true"],
        "{stdout}"
    );
}

/// A part whose rows outgrow what a part writer keeps (8 MB of Arrow) is written a row group
/// at a time, each encoded and closed as its rows came, rather than through one Parquet writer
/// held open to the end; every row is kept.
#[test]
fn a_large_part_is_written_a_row_group_at_a_time() {
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    const WORDS: [&str; 12] = [
        "river", "bridge", "orchard", "lantern", "harbour", "market", "garden", "compass", "stone",
        "winter", "signal", "meadow",
    ];
    const DOCS: usize = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9e37_79b9_u64;
    let mut lines = String::new();
    for i in 0..DOCS {
        let words: Vec<&str> = (0..150)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                WORDS[(seed >> 33) as usize % WORDS.len()]
            })
            .collect();
        let text = format!("Note {i}. {}. The end of note {i}.", words.join(" "));
        lines += &(json!({"id": format!("d{i}"), "text": text}).to_string() + "\n");
    }
    std::fs::write(dir.path().join("docs.jsonl"), lines).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[execution]\n\
         input_shard_bytes = 1000000000\nshard_rows = 100000\n[[stages]]\nname = \"candidates\"\n",
    )
    .unwrap();
    backforth_ok(&["run", job.to_str().unwrap(), "--stages", "prepare"]);
    let stage = dir.path().join("out/candidates");
    let parts: Vec<_> = std::fs::read_dir(&stage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert_eq!(parts.len(), 1, "{parts:?}");
    let reader = SerializedFileReader::new(std::fs::File::open(&parts[0]).unwrap()).unwrap();
    let groups = reader.metadata().row_groups();
    let rows: i64 = groups.iter().map(|g| g.num_rows()).sum();
    assert_eq!(rows, DOCS as i64);
    assert!(
        groups.len() >= 2,
        "{} row group(s) of {:?} rows: the part was not written as its rows came",
        groups.len(),
        groups.iter().map(|g| g.num_rows()).collect::<Vec<_>>()
    );
    assert_eq!(
        marker(&dir.path().join("out"), "candidates")["rows_out"],
        DOCS
    );
}
