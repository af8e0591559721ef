//! Hostile servers, settings and text: each value below once made the tool panic, hang or
//! print raw control characters; now each is a clear error, a sane clamp, or escaped.

use std::time::{Duration, SystemTime};

use backforth::llm::wire::{MAX_RETRY_AFTER, retry_after};

use crate::support::fake_server::{FakeServer, Fault};
use crate::support::util::{backforth, repo};

#[test]
fn retry_after_takes_seconds_or_a_date_and_nothing_else() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
    for (value, expected) in [
        ("2", Some(Duration::from_secs(2))),
        ("0.5", Some(Duration::from_millis(500))),
        (" 7 ", Some(Duration::from_secs(7))),
        ("1e300", Some(MAX_RETRY_AFTER)),
        ("nan", None),
        ("NaN", None),
        ("inf", None),
        ("-inf", None),
        ("-5", None),
        ("soon", None),
        ("", None),
        ("Sun, 06 Nov 1994 08:49:37 GMT", Some(Duration::ZERO)),
        (
            "Sun, 06 Nov 1994 08:50:07 GMT",
            Some(Duration::from_secs(30)),
        ),
        ("Sun, 06 Nov 1994 08:49:07 GMT", Some(Duration::ZERO)),
        ("Mon, 07 Nov 1994 08:49:37 GMT", Some(MAX_RETRY_AFTER)),
        ("Sun, 06 Nov 1994 25:49:37 GMT", None),
        ("Sun, 06 Foo 1994 08:49:37 GMT", None),
    ] {
        assert_eq!(retry_after(value, now), expected, "{value:?}");
    }
}

/// A job backtranslating `dir/docs.jsonl` with `server`; its path.
pub(crate) fn backtranslation_job(dir: &std::path::Path, server: &FakeServer) -> String {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    job.to_str().unwrap().to_string()
}

/// A server answering 429 with `Retry-After: nan` (and other nonsense) once made the run
/// panic; now the usual backoff applies and every row is answered.
#[test]
fn nonsense_retry_after_headers_fall_back_to_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let values = ["nan", "inf", "-3", "1e999", "Tue, 99 Foo 2026 99:99:99 GMT"];
    let docs: String = values
        .iter()
        .enumerate()
        .map(|(i, _)| serde_json::json!({"id": format!("d{i}"), "text": format!("Header case {i} tells a story.")}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    for (i, value) in values.iter().enumerate() {
        server.state.faults.lock().unwrap().push((
            format!("Header case {i} "),
            [Fault::RetryAfter(value.to_string())].into(),
        ));
    }
    let job = backtranslation_job(dir.path(), &server);
    let out = backforth(&["run", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.log().len(), values.len());
}

/// `Retry-After: 0`, or a date already past, waits at least the usual backoff: a server
/// saying "now" to every retry would otherwise get them all at once.
#[test]
fn a_zero_or_past_retry_after_still_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"d0\", \"text\": \"Header case zero tells a story.\"}\n",
    )
    .unwrap();
    server.state.faults.lock().unwrap().push((
        "Header case zero".into(),
        [
            Fault::RetryAfter("0".into()),
            Fault::RetryAfter("Sun, 06 Nov 1994 08:49:37 GMT".into()),
        ]
        .into(),
    ));
    let job = backtranslation_job(dir.path(), &server);
    let started = std::time::Instant::now();
    let out = backforth(&["run", &job]);
    assert!(out.status.success());
    assert_eq!(server.requests(), 3);
    // The backoffs of the first and second throttle: at least 0.25 s and 0.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
}

/// Settings that once panicked (or hung) are refused with a message naming them.
#[test]
fn impossible_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document.\"}\n",
    )
    .unwrap();
    let job = |extra: &str| {
        let path = dir.path().join("job.toml");
        std::fs::write(
            &path,
            format!(
                "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[models.backward]\nendpoint = \"mock\"\nmodel = \"m\"\n{extra}\n\
                 [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n"
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let refused = |args: &[&str], env: &[(&str, &str)], says: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(repo())
            .env("BACKFORTH_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    };
    refused(
        &["run", &job("requests_per_minute = 0")],
        &[],
        "requests_per_minute = 0",
    );
    refused(
        &["run", &job("requests_per_minute = nan")],
        &[],
        "requests_per_minute = NaN",
    );
    refused(
        &["run", &job("output_tokens_per_minute = -5.0")],
        &[],
        "output_tokens_per_minute = -5",
    );
    refused(
        &["run", &job("temperature = inf")],
        &[],
        "temperature = inf",
    );
    refused(
        &["run", &job("throttle_secs = 18446744073709551615")],
        &[],
        "throttle_secs = 18446744073709551615",
    );
    refused(
        &["run", &job(""), "--concurrency", "1000000000000"],
        &[],
        "concurrency = 1000000000000",
    );
    refused(
        &["run", &job("")],
        &[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ],
        "SLURM_ARRAY_TASK_MAX = 4 is below",
    );
    refused(
        &[
            "batch",
            "submit",
            &job(""),
            "--stage",
            "backtranslate",
            "--poll-secs",
            "inf",
        ],
        &[],
        "--poll-secs inf",
    );
    refused(
        &[
            "batch",
            "export",
            &job(""),
            "--stage",
            "backtranslatd",
            "--to",
            "/dev/null",
        ],
        &[],
        "--stage backtranslatd: the job has no such stage",
    );
    // A progress period of infinity is clamped, not a panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", &job("")])
        .env("BACKFORTH_PROGRESS_SECS", "inf")
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An escape sequence in a document is printed escaped by `sql` and in errors, never raw.
#[test]
fn control_characters_in_data_are_escaped_when_printed() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = "Clear \u{1b}[2J\u{1b}]0;owned\u{7} the screen.";
    std::fs::write(
        dir.path().join("docs.jsonl"),
        serde_json::json!({"id": "x", "text": hostile}).to_string() + "\n",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[[stages]]\nname = \"candidates\"\n",
    )
    .unwrap();
    let run = backforth(&["run", job.to_str().unwrap()]);
    assert!(run.status.success());
    let root = dir.path().join("out");
    let out = backforth(&[
        "sql",
        "--root",
        root.to_str().unwrap(),
        "SELECT text FROM candidates",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "{stdout:?}"
    );
    assert!(stdout.contains("\\u{1b}[2J"), "{stdout}");
    let out = backforth(&[
        "sql",
        "--root",
        root.to_str().unwrap(),
        &format!("SELECT nope FROM '{hostile}'"),
    ]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\u{1b}'));
}

/// A server streaming an endless body, and one sending a 1 GB body, cannot exhaust memory:
/// the reply is given up past `max_reply_bytes`, retried, then an error value on its row; the
/// run exits 1 with the other rows answered, and stays under 400 MiB.
#[test]
fn endless_and_huge_replies_end_as_errors_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    server.state.stream_if_contains.lock().unwrap().extend([
        ("Reply case endless ".to_string(), None),
        ("Reply case huge ".to_string(), Some(1 << 30)),
    ]);
    let cases = ["endless", "huge", "fine1", "fine2", "fine3"];
    let docs: String = cases
        .iter()
        .map(|c| {
            serde_json::json!({"id": c, "text": format!("Reply case {c} tells a story.")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\nmax_attempts = 2\nconcurrency = 4\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    let (out, rss) = run_measured(&["run", job.to_str().unwrap()], dir.path());
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.path().join("out");
    let m = crate::support::util::marker(&root, "backtranslated");
    assert_eq!(m["rows_out"], 3);
    assert_eq!(m["dropped"]["llm_error"], 2);
    if let Some(rss) = rss {
        assert!(rss < 400.0, "peak RSS {rss:.0} MiB");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = crate::support::util::session(&root).await;
        let errors = crate::support::util::rows(
            &ctx,
            "SELECT backtranslation['error'] FROM backtranslated_dropped",
        )
        .await;
        for e in &errors {
            assert!(
                e[0].contains("longer than") && e[0].contains("max_reply_bytes"),
                "{e:?}"
            );
        }
    });
}

/// Runs the binary with `args` under `/usr/bin/time` (when there); the output and the peak
/// RSS in MiB.
fn run_measured(args: &[&str], dir: &std::path::Path) -> (std::process::Output, Option<f64>) {
    let report = dir.join("rss.txt");
    let time = std::path::Path::new("/usr/bin/time").exists();
    let mut cmd = if time {
        let mut c = std::process::Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o", report.to_str().unwrap()])
            .arg(env!("CARGO_BIN_EXE_backforth"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
    };
    let out = cmd
        .args(args)
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    let rss = time.then(|| {
        let text = std::fs::read_to_string(&report).unwrap();
        text.trim().lines().last().unwrap().parse::<f64>().unwrap() / 1024.0
    });
    (out, rss)
}

/// A 1 GB line in the middle of a gzip JSONL file is never held: it is counted and skipped
/// (or, under the default policy, named by file and line), the lines around it are read, and
/// memory stays under 400 MiB.
#[test]
fn a_gigabyte_line_is_skipped_in_bounded_memory() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("docs.jsonl.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    writeln!(
        gz,
        "{}",
        serde_json::json!({"id": "before", "text": "The line before."})
    )
    .unwrap();
    gz.write_all(b"{\"id\": \"huge\", \"text\": \"").unwrap();
    let block = vec![b'a'; 1 << 20];
    for _ in 0..1024 {
        gz.write_all(&block).unwrap();
    }
    gz.write_all(b"\"}\n").unwrap();
    writeln!(
        gz,
        "{}",
        serde_json::json!({"id": "after", "text": "The line after."})
    )
    .unwrap();
    gz.finish().unwrap();
    let job = |policy: &str| {
        let path = dir.path().join(format!("job-{policy}.toml"));
        std::fs::write(
            &path,
            format!("output = \"out-{policy}\"\n[input]\npaths = [\"docs.jsonl.gz\"]\non_bad_line = \"{policy}\"\n[[stages]]\nname = \"candidates\"\n"),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let (out, rss) = run_measured(&["run", &job("skip")], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = crate::support::util::marker(&dir.path().join("out-skip"), "candidates");
    assert_eq!(m["rows_out"], 2);
    assert_eq!(m["input"]["skipped"]["line_too_long"], 1);
    if let Some(rss) = rss {
        assert!(rss < 400.0, "peak RSS {rss:.0} MiB");
    }
    let (out, _) = run_measured(&["run", &job("error")], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("docs.jsonl.gz:2: the line is longer than 67108864 bytes"),
        "{stderr}"
    );
}

/// A Parquet input with a large column beside `text` (raw HTML, as some Dolma releases carry)
/// is read without decoding that column: 400 MB of HTML in one row group, read in well under
/// that.
#[test]
fn parquet_inputs_are_read_without_the_columns_documents_do_not_have() {
    use std::sync::Arc;

    use datafusion::arrow::array::{RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;
    let dir = tempfile::tempdir().unwrap();
    let rows = 2000;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("html", DataType::Utf8, false),
    ]));
    let html = "<div>".repeat(40_000); // 200 KB a row
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("p{i}")),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("Page {i} has a short text of its own.")),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|_| html.as_str()),
            )),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(dir.path().join("pages.parquet")).unwrap();
    let mut writer = ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    drop(batch);
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"pages.parquet\"]\n[[stages]]\nname = \"candidates\"\n",
    )
    .unwrap();
    let (out, rss) = run_measured(&["run", job.to_str().unwrap()], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        crate::support::util::marker(&dir.path().join("out"), "candidates")["rows_out"],
        rows
    );
    if let Some(rss) = rss {
        assert!(rss < 250.0, "peak RSS {rss:.0} MiB");
    }
}

/// The dataset card publishes what a reader of the dataset needs: no models' `extra` fields,
/// no `params`, no path of this machine; and web text in its tables cannot break it (a
/// comment, a code fence, HTML).
#[test]
fn the_dataset_card_keeps_private_settings_out_and_escapes_web_text() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = "<!-- ``` <script>alert(1)</script> | *x* -->";
    let docs = [
        serde_json::json!({"id": "h", "text": hostile}).to_string(),
        serde_json::json!({"id": "g", "text": "A long enough document about rivers and the bridges over them, written plainly for the test."}).to_string(),
    ];
    std::fs::write(dir.path().join("docs.jsonl"), docs.join("\n") + "\n").unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[prepare]\nmin_chars = 60\n\
         [params]\ninternal = \"corp-secret-value\"\n\
         [models.backward]\nendpoint = \"mock\"\nmodel = \"m\"\nextra = { x_internal_header = \"internal-route-7\" }\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    let run = backforth(&["run", job.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let root = dir.path().join("out");
    let sft = dir.path().join("export/sft.jsonl");
    let out = backforth(&[
        "export",
        "--root",
        root.to_str().unwrap(),
        "--table",
        "backtranslated",
        "--output",
        sft.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let card = std::fs::read_to_string(dir.path().join("export/sft.card.md")).unwrap();
    assert!(
        card.contains("too\\_short"),
        "the dropped row's table is there: {card}"
    );
    assert_eq!(
        card.matches("<!--").count(),
        1,
        "only the card's own mark: {card}"
    );
    assert!(
        !card.contains("<script>") && !card.contains("-->\n| "),
        "{card}"
    );
    for private in [
        "corp-secret-value",
        "internal-route-7",
        dir.path().to_str().unwrap(),
    ] {
        assert!(!card.contains(private), "{private} in the card:\n{card}");
    }
}

/// `seed` reads OASST lines up to the same cap as the input: a 70 MB line is reported by file
/// and line and skipped; the rest of the file gives the same pairs as without it.
#[test]
fn seed_skips_a_line_longer_than_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        std::fs::read_to_string(repo().join("tests/fixtures/oasst/messages.jsonl")).unwrap();
    let mut lines: Vec<String> = fixture.lines().map(str::to_string).collect();
    lines.insert(2, format!("{{\"text\": \"{}\"}}", "z".repeat(70 << 20)));
    let input = dir.path().join("messages.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |input: &str, out: &std::path::Path| {
        let out_run = backforth(&[
            "seed",
            "--input",
            input,
            "--output",
            out.to_str().unwrap(),
            "--count",
            "2",
        ]);
        assert!(
            out_run.status.success(),
            "{}",
            String::from_utf8_lossy(&out_run.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("seed_report.json")).unwrap())
                .unwrap();
        report
    };
    let with = run(input.to_str().unwrap(), &dir.path().join("with"));
    let without = run(
        "tests/fixtures/oasst/messages.jsonl",
        &dir.path().join("without"),
    );
    assert_eq!(with["kept"], without["kept"]);
    assert_eq!(with["eligible"], without["eligible"]);
    let problems = with["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["at"].as_str().unwrap().ends_with("messages.jsonl:3")
                && p["message"].as_str().unwrap().contains("longer than")),
        "{problems:?}"
    );
}

/// A Parquet row group too large to decode at once is a clear error naming the file, the row
/// group and the limit, not an out-of-memory kill.
#[test]
fn a_row_group_beyond_the_limit_is_refused_by_name() {
    use std::sync::Arc;

    use datafusion::arrow::array::{RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
    let text = "word ".repeat(20_000); // 100 KB a row, 20 MB in the row group
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(StringArray::from_iter_values(
            (0..200).map(|i| format!("{i} {text}")),
        ))],
    )
    .unwrap();
    let file = std::fs::File::create(dir.path().join("big.parquet")).unwrap();
    let mut writer = ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"big.parquet\"]\nmax_row_group_bytes = 5000000\n[[stages]]\nname = \"candidates\"\n",
    )
    .unwrap();
    let out = backforth(&["run", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("big.parquet")
            && stderr.contains("row group 0 holds")
            && stderr.contains("max_row_group_bytes (4 MB)"),
        "{stderr}"
    );
}

/// An OASST Parquet row whose label lists differ in length (a damaged file) is read as a
/// missing quality label, not an index past the end of a list.
#[tokio::test(flavor = "multi_thread")]
async fn oasst_label_lists_of_different_lengths_are_a_missing_label() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.parquet");
    let row = |id: &str, parent: &str, role: &str, rank: &str, text: &str, values: &str| {
        format!(
            "SELECT '{id}' AS message_id, {parent} AS parent_id, 't1' AS message_tree_id, \
             '{role}' AS role, 'en' AS lang, CAST({rank} AS INT) AS rank, '{text}' AS text, \
             false AS deleted, true AS review_result, \
             named_struct('name', make_array('spam', 'quality'), 'value', {values}, \
                          'count', make_array(3, 3)) AS labels"
        )
    };
    let sql = [
        row(
            "p1",
            "CAST(NULL AS VARCHAR)",
            "prompter",
            "NULL",
            "Why is the sky blue?",
            "make_array(0.0, 0.4)",
        ),
        // One value for two names: the quality label is missing.
        row(
            "a1",
            "'p1'",
            "assistant",
            "0",
            "Air scatters blue light most.",
            "make_array(0.0)",
        ),
    ]
    .join(" UNION ALL ");
    let ctx = datafusion::prelude::SessionContext::new();
    crate::support::util::copy_to_parquet(&ctx, &sql, &file).await;
    let out = backforth(&[
        "seed",
        "--input",
        file.to_str().unwrap(),
        "--output",
        dir.path().join("seed").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A `minhash` column that is not a list of signature values (a stage of the user's own
/// writing text there) is a job error naming the stage and the column, not a panic.
#[test]
fn a_minhash_column_of_another_type_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"a\", \"text\": \"One document.\"}\n{\"id\": \"b\", \"text\": \"Another document.\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("candidates.sql"),
        "SELECT doc_id AS id, doc_id, text, 'not a signature' AS minhash, file, line, 0 AS ordinal, \
         dedup_key(text) AS dedup_key, CAST(NULL AS VARCHAR) AS _drop FROM documents",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[prepare.near_dedup]\n\
         [[stages]]\nname = \"candidates\"\nsql = \"candidates.sql\"\n[[stages]]\nname = \"deduped\"\n",
    )
    .unwrap();
    let out = backforth(&["run", job.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stage 'deduped': the `minhash` column of 'candidates' is not a list"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Importing a large batch results file streams it: 120 MB of results are recorded in the
/// journal with the process under 150 MiB.
#[test]
fn a_large_batch_results_file_is_imported_in_bounded_memory() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"A document.\"}\n",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[[stages]]\nname = \"candidates\"\n",
    )
    .unwrap();
    let results = dir.path().join("results.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&results).unwrap());
    let answer = "an answer of some length ".repeat(40);
    let n = 120_000;
    for i in 0..n {
        let line = serde_json::json!({
            "custom_id": format!("{i:064x}"),
            "response": {"status_code": 200, "body": {
                "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 200}
            }},
            "error": null
        });
        writeln!(file, "{line}").unwrap();
    }
    file.flush().unwrap();
    drop(file);
    assert!(std::fs::metadata(&results).unwrap().len() > 100 << 20);
    let (out, rss) = run_measured(
        &[
            "batch",
            "import",
            job.to_str().unwrap(),
            results.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("recorded {n} responses")),
        "{stderr}"
    );
    if let Some(rss) = rss {
        assert!(rss < 150.0, "peak RSS {rss:.0} MiB");
    }
}
