//! The example jobs of examples/ (Humpback, Kun, BaF's ablations) end to end against the fake
//! server: each output has the columns and row counts its method implies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth_ok, count, marker, repo, rows, session};

/// Runs `job` (a path under the repository) on the sample corpus against `server`.
fn run(job: &str, server: &FakeServer, root: &Path) {
    backforth_ok(&[
        "run",
        job,
        "--input",
        "examples/data",
        "--output",
        root.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--concurrency",
        "8",
    ]);
}

/// Every drop reason of `stage`'s marker, checked against the rows in its `_dropped/`.
async fn drops(root: &Path, stage: &str) -> Vec<(String, u64)> {
    let m = marker(root, stage);
    let recorded: Vec<(String, u64)> = m["dropped"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    let stored = if root.join(stage).join("_dropped").exists() {
        let ctx = session(root).await;
        rows(
            &ctx,
            &format!("SELECT drop_reason, count(*) FROM {stage}_dropped GROUP BY drop_reason ORDER BY drop_reason"),
        )
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .collect()
    } else {
        Vec::new()
    };
    assert_eq!(recorded, stored, "{stage}: marker and _dropped disagree");
    assert_eq!(
        m["rows_in"].as_u64().unwrap(),
        m["rows_out"].as_u64().unwrap() + recorded.iter().map(|d| d.1).sum::<u64>(),
        "{stage}: the funnel adds up"
    );
    recorded
}

fn reasons(drops: &[(String, u64)]) -> Vec<&str> {
    drops.iter().map(|d| d.0.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn humpback_scores_twice_and_curates_on_the_second_iteration() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    // The sample's sections are shorter than Humpback's 600 characters; 200 gives a few.
    let job = dir.path().join("humpback_short.toml");
    std::fs::write(
        &job,
        format!(
            "extends = \"{}\"\n[prepare]\nmin_chars = 200\n",
            repo().join("examples/humpback.toml").display()
        ),
    )
    .unwrap();
    let root = dir.path().join("out");
    run(job.to_str().unwrap(), &server, &root);
    let ctx = session(&root).await;
    let candidates = count(&ctx, "SELECT count(*) FROM candidates").await;
    assert!(candidates >= 10, "{candidates} segments");
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM candidates WHERE header IS NULL").await,
        0,
        "segments mode: every candidate sits under a header"
    );
    for stage in [
        "candidates",
        "backtranslated",
        "scored",
        "rescored",
        "curated",
    ] {
        drops(&root, stage).await;
    }
    // Both iterations side by side, each naming its judge.
    let scored = count(&ctx, "SELECT count(*) FROM scored").await;
    assert_eq!(count(&ctx, "SELECT count(*) FROM rescored").await, scored);
    assert_eq!(
        rows(
            &ctx,
            "SELECT DISTINCT score_model, score_model_1 FROM rescored"
        )
        .await,
        vec![vec!["humpback-m0".to_string(), "humpback-m1".to_string()]]
    );
    let moved = count(
        &ctx,
        "SELECT count(*) FROM rescored WHERE score IS DISTINCT FROM score_1",
    )
    .await;
    assert!(moved > 0, "M1 judges differently from M0");
    // Curation reads iteration 1: exactly the pairs M1 scored 5.
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM curated").await,
        count(&ctx, "SELECT count(*) FROM rescored WHERE score_1 >= 5").await
    );
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM curated WHERE score_1 < 5").await,
        0
    );
    // Two scoring calls per pair, one per model.
    assert_eq!(
        marker(&root, "rescored")["llm"]["requests"]
            .as_u64()
            .unwrap() as i64,
        scored
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kun_judges_instructions_polishes_and_filters_with_counted_reasons() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    run("examples/kun.toml", &server, &root);
    let ctx = session(&root).await;
    let judged = drops(&root, "judged").await;
    assert!(
        reasons(&judged).contains(&"judged_bad"),
        "judged drops: {judged:?}"
    );
    assert!(
        reasons(&judged)
            .iter()
            .any(|r| r.starts_with("no_verdict:")),
        "judged drops: {judged:?}"
    );
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM judged WHERE verdict <> 'good'").await,
        0
    );
    drops(&root, "polished").await;
    let filtered = drops(&root, "filtered").await;
    for reason in ["refusal", "self_reference", "too_short", "repetition"] {
        assert!(
            reasons(&filtered).contains(&reason),
            "filtered drops: {filtered:?}"
        );
    }
    // What passed the filters has none of what they look for.
    for row in rows(&ctx, "SELECT response FROM filtered").await {
        let text = &row[0];
        assert!(backforth::parse::refusal_phrase(text).is_none(), "{text}");
        assert!(
            backforth::parse::self_reference_phrase(text).is_none(),
            "{text}"
        );
        assert!(text.chars().count() >= 20, "{text}");
        assert!(backforth::parse::max_repeats(text, 50) <= 5, "{text}");
    }
    // The stats funnel shows every reason.
    let out = backforth_ok(&["stats", root.to_str().unwrap()]);
    let stats = String::from_utf8_lossy(&out.stdout);
    for reason in [
        "judged_bad",
        "refusal=",
        "self_reference=",
        "too_short=",
        "repetition=",
    ] {
        assert!(stats.contains(reason), "{reason} missing from:\n{stats}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bft_ablations_rewrite_everything_or_only_filter() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();

    let rewrite_only: PathBuf = dir.path().join("rewrite-only");
    run("examples/bft_rewrite_only.toml", &server, &rewrite_only);
    assert!(!rewrite_only.join("scored").exists());
    let ctx = session(&rewrite_only).await;
    let backtranslated = count(&ctx, "SELECT count(*) FROM backtranslated").await as u64;
    let rewrite_drops: u64 = drops(&rewrite_only, "rewritten")
        .await
        .iter()
        .map(|d| d.1)
        .sum();
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM rewritten").await as u64 + rewrite_drops,
        backtranslated,
        "every pair is rewritten, none filtered"
    );

    let filter_only = dir.path().join("filter-only");
    run("examples/bft_filter_only.toml", &server, &filter_only);
    assert!(!filter_only.join("rewritten").exists());
    let ctx = session(&filter_only).await;
    let kept = count(&ctx, "SELECT count(*) FROM curated").await;
    assert!(kept > 0);
    assert_eq!(
        kept,
        count(&ctx, "SELECT count(*) FROM scored WHERE score = 5").await
    );
    // The kept web text is the response of the exported pairs.
    let out = dir.path().join("filter-only.jsonl");
    backforth_ok(&[
        "export",
        "--root",
        filter_only.to_str().unwrap(),
        "--table",
        "curated",
        "--output",
        out.to_str().unwrap(),
    ]);
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count() as i64, kept);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    let text = &rows(&ctx, "SELECT text FROM curated ORDER BY id LIMIT 1").await[0][0];
    assert_eq!(
        first["messages"].as_array().unwrap().last().unwrap()["content"],
        *text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn preference_keeps_the_best_and_worst_of_several_judged_rewrites() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    run("examples/preference.toml", &server, &root);
    let ctx = session(&root).await;
    for stage in ["curated", "sampled", "ranked", "preference"] {
        drops(&root, stage).await;
    }
    let curated = count(&ctx, "SELECT count(*) FROM curated").await;
    assert!(curated >= 5, "{curated} curated pairs");
    // Four rewrites per pair in one request each (the fake answers `n`).
    assert_eq!(
        count(
            &ctx,
            "SELECT count(*) FROM sampled WHERE cardinality(rewrites) = 4"
        )
        .await,
        curated
    );
    assert_eq!(
        marker(&root, "sampled")["llm"]["requests"]
            .as_u64()
            .unwrap() as i64,
        curated
    );
    let preferences = count(&ctx, "SELECT count(*) FROM preference").await;
    assert!(preferences > 0);
    // `estimate` knows a pair becomes four judged rows, asked in one request.
    let estimated = backforth_ok(&[
        "estimate",
        "examples/preference.toml",
        "--output",
        root.to_str().unwrap(),
        "--json",
    ]);
    let estimated: serde_json::Value = serde_json::from_slice(&estimated.stdout).unwrap();
    let requests = |stage: &str| {
        estimated
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap()["requests"]
            .as_f64()
            .unwrap()
    };
    assert!((requests("ranked") - 4.0 * requests("sampled")).abs() < 1e-9);
    let export = |format: &str, output: &Path| {
        backforth_ok(&[
            "export",
            "--root",
            root.to_str().unwrap(),
            "--table",
            "preference",
            "--format",
            format,
            "--output",
            output.to_str().unwrap(),
        ])
    };
    let output = dir.path().join("dpo.jsonl");
    export("preference", &output);
    // Every line against the judged samples of its pair: chosen is a best-scored sample,
    // rejected a worst-scored one, and the gap is at least the stage's `min_gap`.
    let samples = rows(
        &ctx,
        "SELECT pair_id, instruction, response, score FROM ranked ORDER BY pair_id, sample",
    )
    .await;
    let text = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as i64, preferences);
    for line in &lines {
        let id = line["id"].as_str().unwrap();
        let judged: Vec<&Vec<String>> = samples.iter().filter(|s| s[0] == id).collect();
        assert!(judged.len() >= 2, "{id}: {judged:?}");
        let score_of = |s: &Vec<String>| s[3].parse::<f64>().unwrap();
        let best = judged.iter().map(|s| score_of(s)).fold(f64::MIN, f64::max);
        let worst = judged.iter().map(|s| score_of(s)).fold(f64::MAX, f64::min);
        assert_eq!(line["score_chosen"].as_f64().unwrap(), best, "{line}");
        assert_eq!(line["score_rejected"].as_f64().unwrap(), worst, "{line}");
        assert!(best - worst >= 1.0, "{line}");
        let chosen = line["chosen"][0]["content"].as_str().unwrap();
        let rejected = line["rejected"][0]["content"].as_str().unwrap();
        assert!(
            judged.iter().any(|s| s[2] == chosen && score_of(s) == best),
            "{line}"
        );
        assert!(
            judged
                .iter()
                .any(|s| s[2] == rejected && score_of(s) == worst),
            "{line}"
        );
        assert_eq!(
            line["prompt"],
            serde_json::json!([{"role": "user", "content": judged[0][1]}])
        );
        assert_eq!(line["chosen"][0]["role"], "assistant");
        assert_eq!(line["rejected"].as_array().unwrap().len(), 1);
    }
    // The stats table of gaps counts the same pairs.
    let out = backforth_ok(&["stats", root.to_str().unwrap(), "--format", "json"]);
    let tables: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let gaps = tables
        .iter()
        .find(|t| t["title"].as_str().unwrap().starts_with("Preference pairs"))
        .unwrap();
    let counted: i64 = gaps["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_str().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(counted, preferences, "{gaps}");

    // The same preferences as a Hugging Face folder: `datasets` loads each line's content.
    let folder = dir.path().join("hub");
    export("hf", &folder);
    let load = "import json, sys, datasets\n\
                ds = datasets.load_dataset(sys.argv[1])['train']\n\
                print(json.dumps([dict(r) for r in ds]))";
    let mut loaded: Vec<serde_json::Value> =
        serde_json::from_value(crate::export::with_datasets(load, &folder)).unwrap();
    loaded.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    assert_eq!(
        loaded, lines,
        "the folder holds what the JSONL export holds"
    );
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(card.contains("  - name: chosen\n    list:"), "{card}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bft_decontaminated_drops_the_document_a_benchmark_quotes_before_any_call() {
    let server = FakeServer::start(Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    run("examples/bft_decontaminated.toml", &server, &root);
    let ctx = session(&root).await;
    let dropped = drops(&root, "decontaminated").await;
    assert_eq!(dropped, vec![("contaminated:sample_qa".to_string(), 1)]);
    assert_eq!(
        rows(
            &ctx,
            "SELECT doc_id, contamination['item'], contamination['field'] FROM decontaminated_dropped"
        )
        .await,
        vec![vec!["bf-0014".to_string(), "bio-17".to_string(), "question".to_string()]]
    );
    // The quoted document never reached the backward model.
    assert_eq!(
        count(
            &ctx,
            "SELECT count(*) FROM backtranslated WHERE doc_id = 'bf-0014'"
        )
        .await,
        0
    );
    assert!(
        server
            .log()
            .iter()
            .all(|e| !e.prompt.contains("Photosynthesis is the process"))
    );
    drops(&root, "decontaminated_pairs").await;
    assert_eq!(
        count(&ctx, "SELECT count(*) FROM decontaminated_pairs").await,
        count(&ctx, "SELECT count(*) FROM rewritten").await
    );
}
