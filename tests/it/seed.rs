//! `backforth seed` on a hand-made OASST fixture in the released schemas (flat messages and
//! nested trees): first turn only, English only, rank 0 only, top-N by quality, and malformed
//! trees reported with file, line and tree.

use serde_json::Value;

use crate::support::util::{backforth_ok, rows};

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn turns(line: &Value) -> Vec<(String, String)> {
    line["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_keeps_first_turn_english_rank_zero_by_quality_and_reports_bad_trees() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seed");
    let run = backforth_ok(&[
        "seed",
        "--input",
        "tests/fixtures/oasst/messages.jsonl",
        "--output",
        out.to_str().unwrap(),
        "--count",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("4 malformed trees left out"), "{stderr}");

    // Eligible: a1 (quality 0.9 + 0.8), a6 (0.7 + 0.9), a5 (0.5 + 0.5). Not: a2 (rank 1),
    // a3 (second turn), a4 (German), a9 (deleted), and the malformed trees t5-t7, t9.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("seed_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["eligible"], 3);
    assert_eq!(report["kept"], 2);
    assert_eq!(report["malformed_trees"], 4);
    let problems: Vec<(String, String, String)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["at"].as_str().unwrap().to_string(),
                p["tree"].as_str().unwrap().to_string(),
                p["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let find = |needle: &str| {
        problems
            .iter()
            .find(|p| p.2.contains(needle))
            .unwrap_or_else(|| panic!("no problem '{needle}' in {problems:?}"))
            .clone()
    };
    let file = "tests/fixtures/oasst/messages.jsonl";
    assert_eq!(find("not valid JSON").0, format!("{file}:13"));
    assert_eq!(
        find("names parent nope, which is not in the input"),
        (
            format!("{file}:12"),
            "t5".into(),
            "message a7 names parent nope, which is not in the input; tree left out".into()
        )
    );
    assert_eq!(find("form a cycle").1, "t6");
    assert_eq!(find("has role 'moderator'").1, "t7");
    assert_eq!(
        find("column 'text' is missing"),
        (
            format!("{file}:21"),
            "t9".into(),
            "column 'text' is missing or not a string; tree left out".into()
        )
    );

    // Best quality first; the forward file is instruction -> response, backward the reverse.
    let forward = lines(&out.join("forward.jsonl"));
    let backward = lines(&out.join("backward.jsonl"));
    let egg = (
        "How do I boil an egg?".to_string(),
        "Put the egg in boiling water for nine minutes, then cool it in cold water.".to_string(),
    );
    let paris = (
        "What is the capital of France?".to_string(),
        "Paris is the capital of France.".to_string(),
    );
    assert_eq!(
        forward.iter().map(turns).collect::<Vec<_>>(),
        vec![
            vec![
                ("user".into(), egg.0.clone()),
                ("assistant".into(), egg.1.clone())
            ],
            vec![
                ("user".into(), paris.0.clone()),
                ("assistant".into(), paris.1.clone())
            ],
        ]
    );
    assert_eq!(
        backward.iter().map(turns).collect::<Vec<_>>(),
        vec![
            vec![
                ("user".into(), egg.1.clone()),
                ("assistant".into(), egg.0.clone())
            ],
            vec![
                ("user".into(), paris.1.clone()),
                ("assistant".into(), paris.0.clone())
            ],
        ]
    );
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet(
        "seed",
        out.join("seed.parquet").to_str().unwrap(),
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT id, tree, instruction_quality, response_quality FROM seed"
        )
        .await,
        vec![
            vec!["a1".to_string(), "t1".into(), "0.9".into(), "0.8".into()],
            vec!["a6".to_string(), "t4".into(), "0.7".into(), "0.9".into()],
        ]
    );
}

#[test]
fn seed_reads_nested_trees_and_leaves_out_a_tree_whose_parents_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seed");
    backforth_ok(&[
        "seed",
        "--input",
        "tests/fixtures/oasst/trees.jsonl",
        "--output",
        out.to_str().unwrap(),
        "--format",
        "alpaca",
    ]);
    let forward = lines(&out.join("forward.jsonl"));
    let instructions: Vec<&str> = forward
        .iter()
        .map(|l| l["instruction"].as_str().unwrap())
        .collect();
    // t1's first turn and t4; t3's reply names another parent than the one it sits under.
    assert_eq!(
        instructions,
        ["How do I boil an egg?", "What is the capital of France?"]
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("seed_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["malformed_trees"], 1);
    assert_eq!(report["problems"][0]["tree"], "t3");
    assert_eq!(
        report["problems"][0]["at"],
        "tests/fixtures/oasst/trees.jsonl:3"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_reads_the_parquet_message_table_of_the_hugging_face_release() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train-00000-of-00001.parquet");
    // The release's columns, labels as parallel lists.
    let row = |id: &str, parent: &str, tree: &str, role: &str, rank: &str, text: &str, q: f64| {
        format!(
            "SELECT '{id}' AS message_id, {parent} AS parent_id, '{tree}' AS message_tree_id, \
             '{role}' AS role, 'en' AS lang, CAST({rank} AS INT) AS rank, '{text}' AS text, \
             false AS deleted, true AS review_result, \
             named_struct('name', make_array('spam', 'quality'), 'value', make_array(0.0, {q}), \
                          'count', make_array(3, 3)) AS labels"
        )
    };
    let sql = [
        row(
            "p1",
            "CAST(NULL AS VARCHAR)",
            "t1",
            "prompter",
            "NULL",
            "Why is the sky blue?",
            0.4,
        ),
        row(
            "a1",
            "'p1'",
            "t1",
            "assistant",
            "0",
            "Air scatters blue light most.",
            0.5,
        ),
        row(
            "p2",
            "CAST(NULL AS VARCHAR)",
            "t2",
            "prompter",
            "NULL",
            "What is two plus two?",
            0.9,
        ),
        row("a2", "'p2'", "t2", "assistant", "0", "Four.", 0.9),
        row("a3", "'p2'", "t2", "assistant", "1", "Five.", 0.1),
    ]
    .join(" UNION ALL ");
    let ctx = datafusion::prelude::SessionContext::new();
    crate::support::util::copy_to_parquet(&ctx, &sql, &file).await;
    let out = dir.path().join("seed");
    backforth_ok(&[
        "seed",
        "--input",
        file.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let forward: Vec<Vec<(String, String)>> = lines(&out.join("forward.jsonl"))
        .iter()
        .map(turns)
        .collect();
    assert_eq!(forward.len(), 2);
    // t2 first: its quality labels sum to 1.8 against t1's 0.9.
    assert_eq!(forward[0][1].1, "Four.");
    assert_eq!(forward[1][1].1, "Air scatters blue light most.");
}
