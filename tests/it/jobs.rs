//! Job-file features: segments mode, the completions API, template overrides, API keys.

use std::time::Duration;

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth, backforth_ok, marker, repo};

fn write_job(dir: &std::path::Path, body: &str) -> String {
    let sample = repo().join("examples/data");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "output = \"out\"\n[input]\npaths = [\"{}\"]\n{body}",
            sample.display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn segments_mode_cuts_under_headers_and_counts_each_rule() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "[prepare]\nmode = \"segments\"\nmin_chars = 300\n",
    );
    backforth_ok(&["run", &job, "--stages", "prepare"]);
    let m = marker(&dir.path().join("out"), "candidates");
    let dropped = m["dropped"].as_object().unwrap();
    for reason in [
        "empty_header",
        "uppercase_header",
        "navigation_header",
        "repeated_sentences",
        "too_short",
        "duplicate",
    ] {
        assert!(dropped.contains_key(reason), "no '{reason}' drop in {m}");
    }
    let kept = m["rows_out"].as_u64().unwrap();
    assert!(
        kept >= 20,
        "most sections of the sample are good segments: {m}"
    );
    let total: u64 = dropped.values().map(|v| v.as_u64().unwrap()).sum::<u64>() + kept;
    assert_eq!(m["rows_in"].as_u64().unwrap(), total);
}

#[test]
fn completions_api_template_override_and_api_key_from_env() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bt.txt"),
        "CUSTOM TEMPLATE. Write the most likely instruction.\nText:\n{{ text }}",
    )
    .unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let job = write_job(
        dir.path(),
        &format!(
            "[models.backward]\nendpoint = \"{}\"\nmodel = \"bw\"\napi = \"completions\"\napi_key_env = \"BACKFORTH_TEST_API_KEY\"\n\
             [functions.backtranslate]\ntemplate = \"bt.txt\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", &job])
        .env("BACKFORTH_TEST_API_KEY", "sk-test-QzXvKjWq")
        .env("BACKFORTH_LOG", "debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = server.state.headers.lock().unwrap().clone();
    assert!(!headers.is_empty());
    for (path, auth) in &headers {
        assert_eq!(path, "/v1/completions");
        assert_eq!(auth.as_deref(), Some("Bearer sk-test-QzXvKjWq"));
    }
    assert!(
        server
            .log()
            .iter()
            .all(|e| e.prompt.starts_with("CUSTOM TEMPLATE."))
    );
    // The key never reaches logs or outputs.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("QzXvKjWq"), "{stderr}");
    for entry in walk(&dir.path().join("out")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"QzXvKjWq"),
            "key in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn job_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "[prepare]\nmode = \"paragraphs\"\n",
            "unknown variant `paragraphs`",
        ),
        (
            "[curate]\nthreshold = 7\n",
            "threshold = 7 is outside the 1-5 score scale",
        ),
        (
            "[prepare.near_dedup]\nrows = 0\n",
            "[prepare.near_dedup] rows = 0: it must be at least 1",
        ),
        (
            "[prepare.near_dedup]\nthreshold = 75\n",
            "[prepare.near_dedup] threshold = 75 is not an estimated Jaccard similarity in (0, 1]",
        ),
        (
            "[models.scorer]\nendpoint = \"localhost:8000\"\nmodel = \"m\"\n",
            "neither an http(s) URL nor 'mock'",
        ),
        (
            "[functions.summarise]\nmodel = \"scorer\"\n",
            "[functions.summarise] is not built in: give `like = \"<built-in>\"`, or `args`, `template` and `model`",
        ),
        (
            "[functions.rescore_2]\nlike = \"score\"\n",
            "like = \"score\" is not a built-in function",
        ),
        (
            "[functions.summarise]\nargs = [\"text\"]\nmodel = \"scorer\"\n",
            "[functions.summarise] needs `template` (a path)",
        ),
        (
            "[functions.rewrite]\nmode = \"logprobs\"\n",
            "only scoring functions have modes",
        ),
        (
            "[curate]\niteration = 2\n",
            "there are two scoring iterations",
        ),
        (
            "[[stages]]\nname = \"summaries\"\n",
            "stage 'summaries' is not built in",
        ),
        (
            "[models.scorer]\nendpoint = \"mock\"\nmodel = \"m0\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
             [[stages]]\nname = \"scored\"\n[[stages]]\nname = \"rescored\"\n",
            "stage 'backtranslated' calls backtranslate, whose model role 'backward' is not in the job",
        ),
        ("colour = \"blue\"\n", "unknown field `colour`"),
    ];
    for (body, expected) in cases {
        let job = write_job(dir.path(), body);
        let out = backforth(&["run", &job]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("job error") && stderr.contains(expected),
            "{body}: {stderr}"
        );
    }
}

#[test]
fn logprob_scoring_gives_expected_scores_and_falls_back_to_text() {
    use crate::support::util::{rows, session};
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let job = write_job(
        dir.path(),
        "[functions.score_pair]\nmode = \"logprobs\"\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n[[stages]]\nname = \"scored\"\n",
    );
    backforth_ok(&["run", &job, "--endpoint", &server.url(), "--model", "m"]);
    let (fallbacks, text_requests) = logprob_fallbacks(&server);
    assert!(fallbacks > 0, "some replies name no digit");
    // Each of those got exactly one text judgement afterwards.
    assert_eq!(text_requests, fallbacks);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = session(&dir.path().join("out")).await;
        let by_source = rows(&ctx, "SELECT score_source, count(*) FROM scored GROUP BY 1 ORDER BY 1").await;
        assert_eq!(
            by_source,
            vec![
                vec!["logprobs".to_string(), (22 - fallbacks).to_string()],
                vec!["text".to_string(), fallbacks.to_string()],
            ]
        );
        // Logprob rows: score is the rounded expectation, mass is what the digits hold.
        let bad = rows(
            &ctx,
            "SELECT count(*) FROM scored WHERE score_source = 'logprobs' AND \
             (score <> CAST(round(score_expected) AS BIGINT) OR score_expected < 1 OR score_expected > 5 \
              OR score_mass <= 0 OR score_mass > 1.0001 OR score_reason IS NOT NULL)",
        )
        .await;
        assert_eq!(bad[0][0], "0");
        let text_rows = rows(&ctx, "SELECT count(*) FROM scored WHERE score_source = 'text' AND score_expected IS NULL").await;
        assert_eq!(text_rows[0][0], fallbacks.to_string());
    });
}

#[test]
fn estimate_predicts_requests_and_prompt_tokens_of_the_sample_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    let out = backforth_ok(&[
        "estimate",
        "examples/bft.toml",
        "--output",
        root.to_str().unwrap(),
        "--json",
    ]);
    let estimate: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Nothing was sent: only the input stage ran.
    assert!(root.join("candidates/_SUCCESS").exists());
    assert!(!root.join("backtranslated").exists());
    backforth_ok(&[
        "run",
        "examples/bft.toml",
        "--output",
        root.to_str().unwrap(),
    ]);
    let mut estimated_prompt = 0.0;
    let mut reported_prompt = 0.0;
    for stage in estimate.as_array().unwrap() {
        let name = stage["stage"].as_str().unwrap();
        let llm = &marker(&root, name)["llm"];
        let requests = stage["requests"].as_f64().unwrap();
        assert_eq!(
            requests.round(),
            llm["requests"].as_f64().unwrap(),
            "requests of {name}"
        );
        estimated_prompt += stage["prompt_tokens"].as_f64().unwrap();
        reported_prompt += llm["prompt_tokens"].as_f64().unwrap();
    }
    let error = (estimated_prompt - reported_prompt).abs() / reported_prompt;
    eprintln!(
        "prompt tokens: estimated {estimated_prompt:.0}, reported {reported_prompt:.0} ({:.1}%)",
        100.0 * error
    );
    assert!(
        error < 0.10,
        "estimated {estimated_prompt:.0} prompt tokens, the run reported {reported_prompt:.0}"
    );
}

/// After a logprob-scored run of the 22 pairs (one logprob request each, checked): how many
/// pairs' first token held no digit, and how many text judgements were asked.
fn logprob_fallbacks(server: &FakeServer) -> (usize, usize) {
    use crate::support::fake_server::first_token_alternatives;
    let log = server.log();
    let asked: Vec<_> = log
        .iter()
        .filter(|e| e.prompt.ends_with("Score:"))
        .collect();
    assert_eq!(asked.len(), 22, "one logprob request per pair");
    let fallbacks = asked
        .iter()
        .filter(|e| {
            !first_token_alternatives(&e.prompt)[0]
                .0
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .count();
    let text_requests = log.iter().filter(|e| e.prompt.contains("Score: N")).count();
    (fallbacks, text_requests)
}

/// Logprob scoring over `api = "completions"` reads the first token's alternatives in either
/// shape servers send: OpenAI's legacy `top_logprobs: [{token: logprob}]` (vLLM) and the chat
/// shape `content[].top_logprobs` (llama.cpp's server). A pair falls back to a text judgement
/// only when its first token holds no digit, in both.
#[test]
fn completions_logprobs_are_read_in_both_shapes() {
    for chat_shape in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let server = FakeServer::start(Duration::from_millis(1));
        server
            .state
            .completions_logprobs_chat_shape
            .store(chat_shape, std::sync::atomic::Ordering::SeqCst);
        let job = write_job(
            dir.path(),
            &format!(
                "[models.scorer]\nendpoint = \"{}\"\nmodel = \"m\"\napi = \"completions\"\n\
                 [functions.score_pair]\nmode = \"logprobs\"\n\
                 [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n[[stages]]\nname = \"scored\"\n",
                server.url()
            ),
        );
        backforth_ok(&["run", &job, "--endpoint", &server.url(), "--model", "m"]);
        let (fallbacks, text_requests) = logprob_fallbacks(&server);
        assert_eq!(text_requests, fallbacks, "chat shape: {chat_shape}");
    }
}
