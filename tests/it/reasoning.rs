//! Reasoning models: the thinking is kept apart from the answer, whether the server sends it
//! as a field or as `<think>…</think>` in the content, so parsers read the answer only.

use std::path::Path;
use std::time::Duration;

use crate::support::fake_server::{FakeServer, FakeState, Thinking};
use crate::support::util::{backforth_ok, rows, session};

/// Backtranslates and scores a dozen documents, the backward role on `backward`, the scorer
/// on `scorer`; returns the output root.
fn run(dir: &Path, backward: &FakeServer, scorer: &FakeServer) -> std::path::PathBuf {
    let docs: String = (0..12)
        .map(|i| {
            serde_json::json!({"id": format!("d{i:02}"), "text": format!("Document {i} explains how a {} works, step by step.", ["lock", "pump", "kiln", "loom"][i % 4])}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs).unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\n\
             [models.scorer]\nendpoint = \"{}\"\nmodel = \"m\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
             [[stages]]\nname = \"scored\"\n",
            backward.url(),
            scorer.url()
        ),
    )
    .unwrap();
    backforth_ok(&["run", job.to_str().unwrap()]);
    dir.join("out")
}

fn server(thinking: Option<Thinking>) -> FakeServer {
    FakeServer::start_with(FakeState {
        latency: Duration::from_millis(1),
        thinking: std::sync::Mutex::new(thinking),
        ..FakeState::default()
    })
}

fn query(root: &Path, sql: &str) -> Vec<Vec<String>> {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { rows(&session(root).await, sql).await })
}

const SCORES: &str = "SELECT id, instruction, score, score_reason FROM scored ORDER BY id";

/// Thinking that names a score of its own before the answer names the real one.
const DISTRACTION: &str = "The user wants a rating. Score: 1 would be harsh; let me look again.";

#[test]
fn a_score_in_the_thinking_never_counts() {
    let plain = tempfile::tempdir().unwrap();
    let (b, s) = (server(None), server(None));
    let expected = query(&run(plain.path(), &b, &s), SCORES);
    assert!(
        expected.iter().any(|r| r[2] == "5"),
        "the plain run must give answers saying `Score: 5`: {expected:?}"
    );
    for thinking in [
        Thinking::InContent(DISTRACTION.into()),
        Thinking::Field(DISTRACTION.into()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (b, s) = (
            server(Some(thinking.clone())),
            server(Some(thinking.clone())),
        );
        let root = run(dir.path(), &b, &s);
        assert_eq!(query(&root, SCORES), expected, "{thinking:?}");
        let calls = query(
            &root,
            "SELECT judgement['text'], judgement['reasoning'], judgement['reasoning_tokens'], \
             judgement['cached_tokens'], judgement['completion_tokens'] FROM scored",
        );
        let thought: i64 = query(
            &root,
            "SELECT sum(judgement['reasoning_tokens']) FROM scored",
        )[0][0]
            .parse()
            .unwrap();
        let stats = backforth_ok(&["stats", root.to_str().unwrap(), "--format", "json"]);
        let tables: Vec<serde_json::Value> = serde_json::from_slice(&stats.stdout).unwrap();
        let funnel = tables
            .iter()
            .find(|t| t["title"].as_str().unwrap().starts_with("Funnel"))
            .unwrap();
        let columns = funnel["columns"].as_array().unwrap();
        let at = |name: &str| columns.iter().position(|c| c == name).unwrap();
        let scored = funnel["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[0] == "scored")
            .unwrap();
        assert_eq!(
            scored[at("reasoning tokens")],
            thought.to_string(),
            "{funnel}"
        );
        let cached = scored[at("prompt cached")].as_str().unwrap();
        let share: f64 = cached.trim_end_matches('%').parse().unwrap();
        assert!(share > 0.0 && share < 100.0, "{funnel}");
        for call in calls {
            assert!(
                !call[0].contains("think>") && !call[0].contains("harsh"),
                "{call:?}"
            );
            assert_eq!(call[1], DISTRACTION, "{thinking:?}");
            let reasoning: i64 = call[2].parse().unwrap();
            let completion: i64 = call[4].parse().unwrap();
            assert!(reasoning > 0 && reasoning < completion, "{call:?}");
            assert!(call[3].parse::<i64>().unwrap() > 0, "{call:?}");
        }
    }
}

#[test]
fn a_reply_cut_while_thinking_is_its_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let b = server(None);
    let s = server(Some(Thinking::CutInContent(DISTRACTION.into())));
    let root = run(dir.path(), &b, &s);
    let scored = query(
        &root,
        "SELECT score, score_reason, judgement['finish_reason'], judgement['text'] FROM scored",
    );
    assert_eq!(scored.len(), 12);
    for row in scored {
        assert_eq!(
            row,
            ["NULL", "truncated_in_reasoning", "length_in_reasoning", ""],
            "a cut thinking's `Score: 1` must not count"
        );
    }
}

/// A job backtranslating one document on `server`, with `keys` added to the backward role.
fn backtranslate_job(dir: &Path, server: &FakeServer, keys: &str) -> String {
    std::fs::write(
        dir.join("docs.jsonl"),
        "{\"id\": \"a\", \"text\": \"A lock keeps a door shut until the right key turns it.\"}\n",
    )
    .unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\n{keys}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    job.to_str().unwrap().to_string()
}

#[test]
fn reasoning_effort_and_thinking_reach_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start_with(FakeState {
        keep_bodies: true,
        ..FakeState::default()
    });
    backforth_ok(&[
        "run",
        &backtranslate_job(
            dir.path(),
            &server,
            "reasoning_effort = \"high\"\nthinking = true\nthinking_budget = 100\nmax_tokens = 300\n\
             extra = { chat_template_kwargs = { custom = 1 } }",
        ),
    ]);
    let bodies = server.state.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["reasoning_effort"], "high");
    assert!(bodies[0].get("max_tokens").is_none(), "{}", bodies[0]);
    assert!(bodies[0]["max_completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        bodies[0]["chat_template_kwargs"],
        serde_json::json!({"custom": 1, "enable_thinking": true, "thinking_budget": 100})
    );
    assert_eq!(bodies[0]["thinking_token_budget"], 100);
}

#[test]
fn an_unknown_reasoning_effort_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(None);
    let job = backtranslate_job(dir.path(), &server, "reasoning_effort = \"extreme\"");
    let out = crate::support::util::backforth(&["run", &job]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[models.backward] reasoning_effort = \"extreme\" is not one of none, minimal, low, medium, high"),
        "{stderr}"
    );
    let job = backtranslate_job(
        dir.path(),
        &server,
        "max_tokens = 256\nthinking_budget = 256",
    );
    let out = crate::support::util::backforth(&["run", &job]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "[models.backward] thinking_budget = 256: give a positive number below max_tokens (256)"
        ),
        "{stderr}"
    );
    assert_eq!(
        server
            .state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[test]
fn cached_prompt_tokens_are_priced_at_the_cached_rate() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(Some(Thinking::Field(DISTRACTION.into())));
    backforth_ok(&[
        "run",
        &backtranslate_job(
            dir.path(),
            &server,
            "price_input_per_mtok = 1.0\nprice_cached_input_per_mtok = 0.1\nprice_output_per_mtok = 2.0",
        ),
    ]);
    let call = &query(
        &dir.path().join("out"),
        "SELECT backtranslation['prompt_tokens'], backtranslation['cached_tokens'], \
         backtranslation['completion_tokens'], backtranslation['cost_usd'] FROM backtranslated",
    )[0];
    let [prompt, cached, completion]: [f64; 3] =
        std::array::from_fn(|i| call[i].parse::<f64>().unwrap());
    assert!(cached > 0.0 && cached < prompt, "{call:?}");
    let expected = ((prompt - cached) * 1.0 + cached * 0.1 + completion * 2.0) / 1e6;
    let cost: f64 = call[3].parse().unwrap();
    assert!(
        (cost - expected).abs() < 1e-12,
        "{cost} != {expected}: {call:?}"
    );
}

#[test]
fn estimate_counts_the_thinking_of_a_role_that_thinks() {
    let server = server(None);
    let estimate = |keys: &str| {
        let dir = tempfile::tempdir().unwrap();
        let job = backtranslate_job(dir.path(), &server, keys);
        let out = backforth_ok(&["estimate", &job, "--json"]);
        let stages: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stage = &stages[0];
        assert_eq!(stage["stage"], "backtranslated");
        (
            stage["completion_tokens"].as_f64().unwrap(),
            stage["reasoning_tokens"].as_f64().unwrap(),
        )
    };
    // One candidate; an instruction is 69 tokens (BaF).
    assert_eq!(estimate("thinking = false"), (69.0, 0.0));
    assert_eq!(
        estimate("thinking = true\nmax_tokens = 4000"),
        (1069.0, 1000.0)
    );
    assert_eq!(
        estimate(
            "reasoning_effort = \"low\"\nmax_tokens = 4000\n[params]\nestimate_reasoning_tokens = 300"
        ),
        (369.0, 300.0)
    );
    assert_eq!(
        estimate("thinking = true\nthinking_budget = 600\nmax_tokens = 4000"),
        (669.0, 600.0)
    );
    // Thinking fits in what is left of max_tokens after the answer.
    assert_eq!(
        estimate("thinking = true\nmax_tokens = 500"),
        (500.0, 431.0)
    );
    assert_eq!(server.requests(), 0, "estimate sends nothing");
}
