//! The paper's pipeline end to end: the binary on the sample corpus against the fake server.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use backforth::parse::{extract_tagged, tag_problem};
use serde_json::{Value, json};

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth, backforth_ok, count, dropped_total, marker, rows, session};

/// The stages of examples/bft.toml, in order.
pub const STAGES: [&str; 6] = [
    "candidates",
    "backtranslated",
    "scored",
    "curated",
    "rewritten",
    "distilled",
];

/// One full run shared by the tests that only read its output.
struct SampleRun {
    server: FakeServer,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn sample_run() -> &'static SampleRun {
    static RUN: OnceLock<SampleRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let server = FakeServer::start(Duration::from_millis(2));
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        backforth_ok(&[
            "run",
            "examples/bft.toml",
            "--output",
            root.to_str().unwrap(),
            "--endpoint",
            &server.url(),
            "--model",
            "fake",
            "--concurrency",
            "8",
        ]);
        SampleRun {
            server,
            _dir: dir,
            root,
        }
    })
}

/// Output root of the shared sample run.
pub fn sample_root() -> PathBuf {
    sample_run().root.clone()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn dropped(root: &Path, stage: &str) -> Value {
    marker(root, stage)["dropped"].clone()
}

#[test]
fn prepare_counts_every_rule() {
    let run = sample_run();
    let m = marker(&run.root, "candidates");
    assert_eq!(m["input"]["documents"], 25);
    assert_eq!(m["rows_in"], 25);
    assert_eq!(m["rows_out"], 22);
    assert_eq!(
        m["dropped"],
        json!({"duplicate": 1, "empty": 1, "too_many_tokens": 1})
    );
    block_on(async {
        let ctx = session(&run.root).await;
        let got = rows(
            &ctx,
            "SELECT doc_id, drop_reason FROM candidates_dropped ORDER BY doc_id",
        )
        .await;
        assert_eq!(
            got,
            vec![
                vec!["bf-0007".to_string(), "duplicate".to_string()],
                vec!["bf-0013".to_string(), "empty".to_string()],
                vec!["bf-0019".to_string(), "too_many_tokens".to_string()],
            ]
        );
        // The numeric id of the last document became a string id.
        assert_eq!(
            count(&ctx, "SELECT count(*) FROM candidates WHERE doc_id = '25'").await,
            1
        );
    });
}

#[test]
fn every_stage_adds_up() {
    let run = sample_run();
    for stage in STAGES {
        let m = marker(&run.root, stage);
        let drops = dropped_total(&m);
        assert_eq!(
            m["rows_in"].as_u64().unwrap(),
            m["rows_out"].as_u64().unwrap() + drops,
            "stage {stage}: {m}"
        );
    }
    // The counted drops are the rows in `_dropped/`, reason by reason.
    block_on(async {
        let ctx = session(&run.root).await;
        for stage in STAGES {
            let dropped = marker(&run.root, stage)["dropped"].clone();
            let total: u64 = dropped
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            if total == 0 {
                continue;
            }
            let counted = rows(
                &ctx,
                &format!("SELECT drop_reason, count(*) FROM {stage}_dropped GROUP BY 1 ORDER BY 1"),
            )
            .await;
            for row in counted {
                assert_eq!(
                    dropped[&row[0]].to_string(),
                    row[1],
                    "stage {stage}, reason {}",
                    row[0]
                );
            }
        }
    });
    // Each stage's input is the previous stage's output.
    let out = |s: &str| marker(&run.root, s)["rows_out"].as_u64().unwrap();
    let inp = |s: &str| marker(&run.root, s)["rows_in"].as_u64().unwrap();
    assert_eq!(inp("backtranslated"), out("candidates"));
    assert_eq!(inp("scored"), out("backtranslated"));
    assert_eq!(inp("curated"), out("scored"));
    assert_eq!(inp("rewritten"), out("curated"));
    assert_eq!(inp("distilled"), out("curated"));
}

#[test]
fn scores_are_all_kept_and_curated_is_exactly_the_threshold() {
    let run = sample_run();
    block_on(async {
        let ctx = session(&run.root).await;
        let scored = count(&ctx, "SELECT count(*) FROM scored").await;
        assert_eq!(scored, 22);
        // Every NULL score has a reason, and no valid score has one.
        assert_eq!(
            count(
                &ctx,
                "SELECT count(*) FROM scored WHERE (score IS NULL) <> (score_reason IS NOT NULL)"
            )
            .await,
            0
        );
        // The fake answers some pairs with `Score: 4.5` or no score at all.
        let reasons = rows(
            &ctx,
            "SELECT DISTINCT score_reason FROM scored WHERE score_reason IS NOT NULL ORDER BY 1",
        )
        .await;
        assert!(
            !reasons.is_empty(),
            "the fake gives some unparseable scores"
        );
        let curated = rows(&ctx, "SELECT id FROM curated ORDER BY id").await;
        let fives = rows(&ctx, "SELECT id FROM scored WHERE score = 5 ORDER BY id").await;
        assert!(!curated.is_empty(), "some pairs score 5");
        assert_eq!(curated, fives);
        // The reason column, end to end, for each kind of adversarial answer the fake gives.
        let by_kind = rows(
            &ctx,
            "SELECT CASE WHEN judgement['text'] LIKE '%Score: 4.5' THEN 'decimal' \
                         WHEN judgement['text'] LIKE 'I cannot rate%' THEN 'refusal' \
                         WHEN judgement['text'] LIKE 'Between 2 and 3%' THEN 'digits' ELSE 'plain' END AS kind, \
                    CAST(score AS VARCHAR), score_reason \
             FROM scored GROUP BY 1, 2, 3 ORDER BY 1, 2",
        )
        .await;
        for row in &by_kind {
            match row[0].as_str() {
                "decimal" => assert_eq!(row[1..], ["NULL", "not_integer"]),
                "refusal" => assert_eq!(row[1..], ["NULL", "no_score"]),
                "digits" => assert_eq!(row[1..], ["4", "NULL"]),
                _ => assert_eq!(row[2], "NULL"),
            }
        }
        let kinds: BTreeSet<&str> = by_kind.iter().map(|r| r[0].as_str()).collect();
        assert!(
            kinds.len() >= 3,
            "the sample run meets several kinds of answers: {by_kind:?}"
        );
        // The raw judgement is kept beside the parsed score.
        assert_eq!(
            count(
                &ctx,
                "SELECT count(*) FROM scored WHERE judgement['text'] IS NULL"
            )
            .await,
            0
        );
    });
}

#[test]
fn rewrites_are_the_res_contents_of_the_replies() {
    let run = sample_run();
    let log = run.server.log();
    let rewrite_answers: Vec<&str> = log
        .iter()
        .filter(|e| e.prompt.contains("[RES]"))
        .map(|e| e.answer.as_str())
        .collect();
    let expected: BTreeSet<String> = rewrite_answers
        .iter()
        .filter_map(|a| extract_tagged(a, "RES"))
        .collect();
    let untagged = rewrite_answers
        .iter()
        .filter(|a| tag_problem(Some(a), "RES", Some("stop")).is_some())
        .count();
    block_on(async {
        let ctx = session(&run.root).await;
        let got: BTreeSet<String> = rows(&ctx, "SELECT response FROM rewritten")
            .await
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        assert_eq!(got, expected);
        let curated = count(&ctx, "SELECT count(*) FROM curated").await as usize;
        assert_eq!(rewrite_answers.len(), curated);
        let missing = dropped(&run.root, "rewritten")["missing_tag"]
            .as_u64()
            .unwrap_or(0) as usize;
        assert_eq!(missing, untagged);
        // The draft stays beside the rewrite.
        assert_eq!(
            count(
                &ctx,
                "SELECT count(*) FROM rewritten r JOIN curated c ON r.id = c.id AND r.text = c.text"
            )
            .await as usize,
            got.len()
        );
    });
}

#[test]
fn requests_sent_equal_the_rows_that_needed_them() {
    let run = sample_run();
    let out = |s: &str| marker(&run.root, s)["rows_out"].as_u64().unwrap();
    let needed = out("candidates") + out("backtranslated") + 2 * out("curated");
    assert_eq!(run.server.requests(), needed);
    assert_eq!(run.server.repeated_prompts(), 0);
    let recorded: u64 = ["backtranslated", "scored", "rewritten", "distilled"]
        .iter()
        .map(|s| marker(&run.root, s)["llm"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(recorded, needed);
    assert!(
        run.server
            .state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 8
    );
}

#[test]
fn sql_shows_each_stages_dropped_rows_by_reason() {
    let run = sample_run();
    let root = run.root.to_str().unwrap();
    let printed_counts = |table: &str| {
        let query = format!(
            "SELECT drop_reason, count(*) AS n FROM {table} GROUP BY drop_reason ORDER BY drop_reason"
        );
        let out = backforth_ok(&["sql", "--root", root, &query]);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let counts: serde_json::Map<String, serde_json::Value> = stdout
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(1) // the header
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                (
                    cells[0].to_string(),
                    cells[1].parse::<u64>().unwrap().into(),
                )
            })
            .collect();
        counts
    };
    // The rows are the ones each stage's marker counts, reason by reason.
    for stage in ["candidates", "curated"] {
        let dropped = printed_counts(&format!("{stage}_dropped"));
        assert!(!dropped.is_empty(), "{stage}");
        assert_eq!(
            serde_json::Value::Object(dropped),
            marker(&run.root, stage)["dropped"],
            "{stage}"
        );
    }
    // `stats` shows the same counts, stage by stage in the job's order, each with an example.
    let out = backforth_ok(&["stats", root, "--format", "json"]);
    let tables: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let dropped = tables
        .iter()
        .find(|t| t["title"].as_str().unwrap().starts_with("Dropped rows"))
        .unwrap();
    let rows: Vec<Vec<String>> = serde_json::from_value(dropped["rows"].clone()).unwrap();
    let stages: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert!(
        stages.is_sorted_by_key(|s| *s != "candidates"),
        "{stages:?}"
    );
    for stage in ["candidates", "curated"] {
        let counts: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .filter(|r| r[0] == stage)
            .map(|r| (r[1].clone(), r[2].parse::<u64>().unwrap().into()))
            .collect();
        assert_eq!(
            serde_json::Value::Object(counts),
            marker(&run.root, stage)["dropped"],
            "{stage}"
        );
    }
    let too_long = rows.iter().find(|r| r[1] == "too_many_tokens").unwrap();
    assert!(!too_long[3].is_empty() && too_long[3].chars().count() <= 100);
    // A stage that dropped nothing has an empty one.
    assert_eq!(
        marker(&run.root, "backtranslated")["dropped"],
        serde_json::json!({})
    );
    assert!(printed_counts("backtranslated_dropped").is_empty());
    let out = backforth(&["sql", "--root", root, "SELECT count(*) FROM nosuch_dropped"]);
    assert!(!out.status.success());
}

#[test]
fn sql_answers_a_group_by_over_scored() {
    let run = sample_run();
    let out = backforth_ok(&[
        "sql",
        "--root",
        run.root.to_str().unwrap(),
        "SELECT score, count(*) AS n FROM scored GROUP BY score ORDER BY score",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1) // the header
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    block_on(async {
        let ctx = session(&run.root).await;
        let expected: Vec<Vec<String>> = rows(
            &ctx,
            "SELECT score, count(*) FROM scored GROUP BY score ORDER BY score",
        )
        .await
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| if v == "NULL" { String::new() } else { v })
                .collect()
        })
        .collect();
        assert_eq!(printed, expected, "{stdout}");
        assert_eq!(printed.len(), 6, "scores 1-5 and NULL: {stdout}");
    });
}

fn export(format: &str, tag: &str) -> Vec<Value> {
    let run = sample_run();
    let file = run.root.join(format!("export-{format}-{tag}.jsonl"));
    backforth_ok(&[
        "export",
        "--root",
        run.root.to_str().unwrap(),
        "--format",
        format,
        "--tag",
        tag,
        "--output",
        file.to_str().unwrap(),
    ]);
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn rewritten_pairs() -> Vec<(String, String)> {
    let run = sample_run();
    block_on(async {
        let ctx = session(&run.root).await;
        rows(
            &ctx,
            "SELECT instruction, response FROM rewritten ORDER BY id",
        )
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
    })
}

const WEB: &str = "Answer with knowledge from web search.";

#[test]
fn export_formats_line_by_line() {
    let pairs = rewritten_pairs();
    assert!(!pairs.is_empty());
    let chat = export("openai-chat", "system");
    let sharegpt = export("sharegpt", "none");
    let alpaca = export("alpaca", "append");
    assert_eq!(
        (chat.len(), sharegpt.len(), alpaca.len()),
        (pairs.len(), pairs.len(), pairs.len())
    );
    for (i, (instruction, response)) in pairs.iter().enumerate() {
        assert_eq!(
            chat[i],
            json!({"messages": [
                {"role": "system", "content": WEB},
                {"role": "user", "content": instruction},
                {"role": "assistant", "content": response},
            ]})
        );
        assert_eq!(
            sharegpt[i],
            json!({"conversations": [
                {"from": "human", "value": instruction},
                {"from": "gpt", "value": response},
            ]})
        );
        assert_eq!(
            alpaca[i],
            json!({"instruction": format!("{instruction}\n\n{WEB}"), "input": "", "output": response})
        );
    }
}

#[test]
fn export_parquet_has_a_messages_column() {
    let run = sample_run();
    let pairs = rewritten_pairs();
    let file = run.root.join("export.parquet");
    backforth_ok(&[
        "export",
        "--root",
        run.root.to_str().unwrap(),
        "--format",
        "parquet",
        "--output",
        file.to_str().unwrap(),
    ]);
    block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_parquet("sft", file.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let got = rows(
            &ctx,
            "SELECT messages[1]['role'], messages[1]['content'], messages[2]['role'], messages[2]['content'], array_length(messages) FROM sft ORDER BY id",
        )
        .await;
        assert_eq!(got.len(), pairs.len());
        for (row, (instruction, response)) in got.iter().zip(&pairs) {
            assert_eq!(
                row,
                &vec![
                    "user".to_string(),
                    instruction.clone(),
                    "assistant".to_string(),
                    response.clone(),
                    "2".to_string()
                ]
            );
        }
    });
}

#[test]
fn stages_flag_runs_only_what_is_named_and_needs_earlier_outputs() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    let root_s = root.to_str().unwrap();
    let url = server.url();
    let base = [
        "run",
        "examples/bft.toml",
        "--input",
        "examples/data/sample-0000.jsonl.gz",
        "--output",
        root_s,
        "--endpoint",
        url.as_str(),
        "--model",
        "m",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    backforth_ok(&with(&["--stages", "prepare"]));
    assert!(root.join("candidates/_SUCCESS").exists());
    assert!(!root.join("backtranslated").exists());
    assert_eq!(server.requests(), 0);
    assert_eq!(marker(&root, "candidates")["input"]["documents"], 12);

    let out = backforth(&with(&["--stages", "scored"]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reads 'backtranslated'") && stderr.contains("--stages backtranslated"),
        "{stderr}"
    );
    assert_eq!(server.requests(), 0);

    backforth_ok(&with(&["--stages", "backtranslate,score"]));
    let rows_out = marker(&root, "candidates")["rows_out"].as_u64().unwrap();
    assert_eq!(server.requests(), 2 * rows_out);
    assert!(!root.join("curated").exists());
}

#[test]
fn stats_reports_the_funnel_histogram_yield_and_lengths() {
    let run = sample_run();
    let extra = tempfile::tempdir().unwrap();
    std::fs::write(
        extra.path().join("my_query.sql"),
        "-- Instructions per source\nSELECT source, count(*) AS n FROM scored GROUP BY source ORDER BY source\n",
    )
    .unwrap();
    std::fs::write(
        extra.path().join("needs_seed.sql"),
        "-- Seed pairs\n-- requires: seed\nSELECT count(*) FROM seed\n",
    )
    .unwrap();
    let out = backforth_ok(&[
        "stats",
        run.root.to_str().unwrap(),
        "--format",
        "json",
        "--analytics",
        extra.path().to_str().unwrap(),
    ]);
    let tables: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let table = |prefix: &str| {
        tables
            .iter()
            .find(|t| t["title"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no table '{prefix}'"))
            .clone()
    };
    let cell =
        |t: &Value, row: usize, col: usize| t["rows"][row][col].as_str().unwrap().to_string();

    let funnel = table("Funnel");
    assert_eq!(funnel["rows"].as_array().unwrap().len(), STAGES.len());
    for (i, stage) in STAGES.iter().enumerate() {
        let m = marker(&run.root, stage);
        assert_eq!(cell(&funnel, i, 0), *stage);
        assert_eq!(cell(&funnel, i, 1), m["rows_in"].to_string());
        assert_eq!(cell(&funnel, i, 2), m["rows_out"].to_string());
    }
    let histogram = table("Score histogram");
    let total: u64 = histogram["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[3].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        total,
        marker(&run.root, "scored")["rows_out"].as_u64().unwrap()
    );
    let yields = table("Yield per threshold");
    assert_eq!(cell(&yields, 2, 0), "score >= 5");
    assert_eq!(
        cell(&yields, 2, 2),
        marker(&run.root, "curated")["rows_out"].to_string()
    );
    let lengths = table("Lengths per subset");
    assert!(
        lengths["title"]
            .as_str()
            .unwrap()
            .ends_with("[tokens: cl100k_base, the job's tokenizer]"),
        "{lengths}"
    );
    assert_eq!(cell(&lengths, 0, 0), "candidates");
    assert_eq!(
        cell(&lengths, 0, 1),
        marker(&run.root, "candidates")["rows_out"].to_string()
    );
    assert_eq!(
        table("Instructions per source")["rows"][0][0],
        "backforth-sample"
    );
    assert!(
        table("Seed pairs")["skipped"]
            .as_str()
            .unwrap()
            .contains("seed")
    );
}
