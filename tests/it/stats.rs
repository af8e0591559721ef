//! `backforth stats` on a small hand-made output root, every number checked by hand.

use serde_json::Value;

use crate::support::util::backforth_ok;

fn marker(stage: &str, rows: u64) -> String {
    serde_json::json!({
        "stage": stage, "rows_in": rows, "rows_out": rows, "dropped": {},
        "llm": {"requests": 0, "shared": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0},
        "seconds": 0.0,
    })
    .to_string()
}

/// Three candidates `a`, `b`, `c`; `a` scores 5, `b` 3, `c` has no score (model m0); a second
/// iteration (model m1) gives them 4, 3 and 5; `a` is kept and rewritten with one word added.
pub fn hand_made_root(root: &std::path::Path) {
    let tables = [
        (
            "candidates",
            3,
            "SELECT * FROM (VALUES ('a', 'the cat sat on the mat'), ('b', 'a dog ran in the park'), ('c', 'the cat sat on the mat again')) AS t(id, text)",
        ),
        (
            "backtranslated",
            3,
            "SELECT id, named_struct('prompt_tokens', CAST(100 AS BIGINT), 'completion_tokens', CAST(10 AS BIGINT)) AS backtranslation FROM (VALUES ('a'), ('b'), ('c')) AS t(id)",
        ),
        (
            "scored",
            3,
            "SELECT id, instruction, text, CAST(score AS BIGINT) AS score, reason AS score_reason, 'm0' AS score_model, 'x' AS source, \
            named_struct('prompt_tokens', CAST(200 AS BIGINT), 'completion_tokens', CAST(20 AS BIGINT)) AS judgement \
            FROM (VALUES ('a', 'what did the cat do', 'the cat sat on the mat', 5, NULL), \
                         ('b', 'where did the dog run', 'a dog ran in the park', 3, NULL), \
                         ('c', 'what happened <script>alert(1)</script>', 'the cat sat on the mat again', NULL, 'no_score')) AS t(id, instruction, text, score, reason)",
        ),
        (
            "rescored",
            3,
            "SELECT id, instruction, text, CAST(score AS BIGINT) AS score, CAST(score_1 AS BIGINT) AS score_1, \
            CAST(NULL AS VARCHAR) AS score_reason_1, 'm1' AS score_model_1, \
            named_struct('prompt_tokens', CAST(200 AS BIGINT), 'completion_tokens', CAST(20 AS BIGINT)) AS judgement, \
            named_struct('prompt_tokens', CAST(300 AS BIGINT), 'completion_tokens', CAST(30 AS BIGINT)) AS judgement_1 \
            FROM (VALUES ('a', 'what did the cat do', 'the cat sat on the mat', 5, 4), \
                         ('b', 'where did the dog run', 'a dog ran in the park', 3, 3), \
                         ('c', 'what happened', 'the cat sat on the mat again', NULL, 5)) AS t(id, instruction, text, score, score_1)",
        ),
        (
            "curated",
            1,
            "SELECT 'a' AS id, 'what did the cat do' AS instruction, 'the cat sat on the mat' AS text, CAST(5 AS BIGINT) AS score",
        ),
        (
            "rewritten",
            1,
            "SELECT 'a' AS id, 'what did the cat do' AS instruction, 'the cat sat on the mat' AS text, 'the cat sat on the mat today' AS response",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        for (stage, rows, sql) in tables {
            let dir = root.join(stage);
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("part-00000.parquet");
            crate::support::util::copy_to_parquet(&ctx, &sql, &file).await;
            std::fs::write(dir.join("_SUCCESS"), marker(stage, rows)).unwrap();
        }
    });
}

#[test]
fn every_statistic_on_a_hand_checked_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    hand_made_root(&root);
    let labels = dir.path().join("labels.csv");
    std::fs::write(&labels, "id,label\na,good\nb,good\nc,bad\n").unwrap();
    let out = backforth_ok(&[
        "stats",
        root.to_str().unwrap(),
        "--format",
        "json",
        "--labels",
        labels.to_str().unwrap(),
    ]);
    let tables: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |prefix: &str| -> Vec<Vec<String>> {
        let t = tables
            .iter()
            .find(|t| t["title"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no table {prefix}: {tables:?}"));
        serde_json::from_value(t["rows"].clone()).unwrap()
    };
    let v = |cells: &[&str]| cells.iter().map(|c| c.to_string()).collect::<Vec<_>>();

    assert_eq!(
        rows("Score histogram"),
        vec![
            v(&["0", "m0", "3", "1", "33.3"]),
            v(&["0", "m0", "5", "1", "33.3"]),
            v(&["0", "m0", "none (no_score)", "1", "33.3"]),
            v(&["1", "m1", "3", "1", "33.3"]),
            v(&["1", "m1", "4", "1", "33.3"]),
            v(&["1", "m1", "5", "1", "33.3"]),
        ]
    );
    // b stays at 3, a goes from 5 to 4, c from no score to 5.
    assert_eq!(
        rows("Score transitions"),
        vec![
            v(&["3", "0", "0", "1", "0", "0", "0", "1"]),
            v(&["5", "0", "0", "0", "1", "0", "0", "1"]),
            v(&["none", "0", "0", "0", "0", "1", "0", "1"]),
        ]
    );
    // 3 x (100 + 10) + 3 x (200 + 20) = 990 tokens spent before curation at iteration 0,
    // and 3 x (300 + 30) = 990 more for iteration 1.
    assert_eq!(
        rows("Yield per threshold"),
        vec![
            v(&["score >= 3", "0", "2", "66.7", "495"]),
            v(&["score >= 4", "0", "1", "33.3", "990"]),
            v(&["score >= 5", "0", "1", "33.3", "990"]),
            v(&["score >= 3", "1", "3", "100.0", "660"]),
            v(&["score >= 4", "1", "2", "66.7", "990"]),
            v(&["score >= 5", "1", "1", "33.3", "1980"]),
        ]
    );
    // No job recorded a tokenizer here: the counts say they are an approximation.
    let lengths_title = tables
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .find(|t| t.starts_with("Lengths per subset"))
        .unwrap();
    assert!(
        lengths_title
            .ends_with("[tokens: cl100k_base, an approximation: no tokenizer named (--tokenizer)]"),
        "{lengths_title}"
    );
    // Response characters of the candidates: 22, 21 and 28.
    let lengths = rows("Lengths per subset");
    let subsets: Vec<&str> = lengths.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        subsets,
        ["candidates", "scored", "rescored", "curated", "rewritten"]
    );
    assert_eq!(lengths[0][0..2], v(&["candidates", "3"]));
    assert_eq!(lengths[0][6], "23.7");
    assert_eq!(lengths[4][0..2], v(&["rewritten", "1"]));
    assert_eq!(lengths[4][6], "28.0");
    // Equal sample size = the smallest subset (1 row): "the cat sat on the mat" has 4
    // trigrams, "what did the cat do" 3, the rewrite 5.
    assert_eq!(
        rows("Diversity"),
        vec![
            v(&["candidates", "1", "0", "4"]),
            v(&["scored", "1", "3", "4"]),
            v(&["rescored", "1", "3", "4"]),
            v(&["curated", "1", "3", "4"]),
            v(&["rewritten", "1", "3", "5"]),
        ]
    );
    // 4 of the rewrite's 5 trigrams are in the draft; " today" is one more token.
    assert_eq!(
        rows("Rewrite overlap"),
        vec![v(&["rewritten", "1", "0.8", "0.8", "0.8", "0.8", "1.0"])]
    );
    // a: kept and good; b: dropped but good; c: dropped and bad.
    assert_eq!(
        rows("Judge agreement"),
        vec![v(&["3", "1", "0", "1", "1.0", "0.5"])]
    );
    // No stage here kept the rows it dropped.
    assert!(rows("Dropped rows").is_empty());
}
