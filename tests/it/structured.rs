//! Structured output and several samples per prompt, end to end through HTTP: JSON Schema
//! replies read as struct columns, replies off the schema asked again with what was wrong,
//! and `n` samples as a list journaled per sample.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use crate::support::fake_server::{FakeServer, FakeState, Fault};
use crate::support::util::{backforth, backforth_ok, rows, session};

fn server() -> FakeServer {
    FakeServer::start_with(FakeState {
        latency: Duration::from_millis(1),
        keep_bodies: true,
        ..FakeState::default()
    })
}

fn query(root: &Path, sql: &str) -> Vec<Vec<String>> {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { rows(&session(root).await, sql).await })
}

const TOPICS: [&str; 4] = ["lock", "pump", "kiln", "loom"];

/// Writes `count` documents and a job over them, every role on `server`, with `rest` (more
/// tables and stages) after `[models]`; returns the job's path.
fn job(dir: &Path, server: &FakeServer, count: usize, rest: &str) -> String {
    let docs: String = (0..count)
        .map(|i| {
            serde_json::json!({"id": format!("d{i:02}"), "text": format!("Document {i} explains how a {} works, step by step.", TOPICS[i % 4])}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs).unwrap();
    let mut models = String::new();
    for role in ["backward", "scorer", "rewriter"] {
        models += &format!(
            "[models.{role}]\nendpoint = \"{}\"\nmodel = \"m\"\n",
            server.url()
        );
    }
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!("output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n{models}{rest}"),
    )
    .unwrap();
    job.to_str().unwrap().to_string()
}

const SCORING: &str = "[[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
                       [[stages]]\nname = \"scored\"\n";

#[test]
fn json_scoring_reads_the_score_from_the_reply_value() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = format!("[functions.score_pair]\nmode = \"json\"\n{SCORING}");
    backforth_ok(&["run", &job(dir.path(), &server, 12, &rest)]);
    let scored = query(
        &dir.path().join("out"),
        "SELECT score, score_source, judgement['json']['score'], judgement['json']['reason'] \
         FROM scored",
    );
    assert_eq!(scored.len(), 12);
    for row in &scored {
        assert_eq!(row[0], row[2], "{row:?}");
        assert_eq!(row[1], "json");
        assert!(row[3].starts_with("fake text"), "{row:?}");
    }
    let distinct: std::collections::BTreeSet<&String> = scored.iter().map(|r| &r[0]).collect();
    assert!(distinct.len() > 1, "{scored:?}");
    let bodies = server.state.bodies.lock().unwrap();
    let judged: Vec<&serde_json::Value> = bodies
        .iter()
        .filter(|b| b.get("response_format").is_some())
        .collect();
    assert_eq!(judged.len(), 12);
    let format = &judged[0]["response_format"];
    assert_eq!(format["type"], "json_schema");
    assert_eq!(format["json_schema"]["name"], "score_pair");
    assert_eq!(format["json_schema"]["strict"], true);
    assert_eq!(
        format["json_schema"]["schema"]["required"],
        serde_json::json!(["reason", "score"])
    );
}

#[test]
fn the_three_scoring_modes_compare_on_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    std::fs::write(
        dir.path().join("modes.sql"),
        "WITH called AS (\n\
           SELECT id, score_pair(instruction, text) AS t, score_json(instruction, text) AS j,\n\
                  score_lp(instruction, text) AS l\n\
           FROM backtranslated)\n\
         SELECT id,\n\
           judge_score(t['text'], t['finish_reason'], t['error'], t['top_logprobs'])['source'] AS t_source,\n\
           judge_score(j['text'], j['finish_reason'], j['error'], j['top_logprobs'])['source'] AS j_source,\n\
           judge_score(j['text'], j['finish_reason'], j['error'], j['top_logprobs'])['score'] AS j_score,\n\
           j['json']['score'] AS j_value,\n\
           judge_score(l['text'], l['finish_reason'], l['error'], l['top_logprobs'])['source'] AS l_source\n\
         FROM called\n",
    )
    .unwrap();
    let rest = "[functions.score_json]\nlike = \"score_pair\"\nmode = \"json\"\n\
                [functions.score_lp]\nlike = \"score_pair\"\nmode = \"logprobs\"\n\
                [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
                [[stages]]\nname = \"modes\"\nsql = \"modes.sql\"\n";
    backforth_ok(&["run", &job(dir.path(), &server, 12, rest)]);
    let modes = query(
        &dir.path().join("out"),
        "SELECT t_source, j_source, j_score, j_value, l_source FROM modes",
    );
    assert_eq!(modes.len(), 12);
    for row in modes {
        assert_eq!(row[0], "text");
        assert_eq!(row[1], "json");
        assert_eq!(row[2], row[3]);
        assert!(row[4] == "logprobs" || row[4] == "text", "{row:?}");
    }
}

#[test]
fn replies_off_the_schema_are_asked_again_with_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = format!("[functions.score_pair]\nmode = \"json\"\n{SCORING}");
    let job = job(dir.path(), &server, 1, &rest);
    // The backtranslation quotes the document too: answer it before the faults are queued.
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server.state.faults.lock().unwrap().push((
        "Document 0 explains".to_string(),
        VecDeque::from([
            Fault::Content("Sure! The score is four.".into()),
            Fault::Content(r#"{"reason": "fine", "score": 9}"#.into()),
        ]),
    ));
    let before = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(
        server.requests() - before,
        3,
        "two replies off the schema, then one on it"
    );
    let root = dir.path().join("out");
    let scored = query(
        &root,
        "SELECT count(*), min(judgement['attempts']), min(score_source), \
         min(CAST(judgement['json']['score'] AS VARCHAR)), min(judgement['error']) FROM scored",
    );
    assert_eq!(scored[0][0], "1", "one row");
    assert_eq!(scored[0][1], "3", "the retries are counted in attempts");
    assert_eq!(scored[0][2], "json");
    assert_eq!(scored[0][4], "NULL");
    let score: i64 = scored[0][3].parse().unwrap();
    assert!((1..=5).contains(&score));
    let bodies = server.state.bodies.lock().unwrap();
    let last = bodies.last().unwrap();
    let messages = last["messages"].as_array().unwrap();
    assert_eq!(
        messages.len(),
        5,
        "prompt, then two replies each with its feedback"
    );
    assert_eq!(messages[1]["content"], "Sure! The score is four.");
    assert!(
        messages[2]["content"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        messages[2]
    );
    assert!(
        messages[4]["content"]
            .as_str()
            .unwrap()
            .contains("/score must be at most 5, not 9"),
        "{}",
        messages[4]
    );
    drop(bodies);
    // Every reply of the chain is journaled: the stage run again pays nothing.
    std::fs::remove_dir_all(root.join("scored")).unwrap();
    let again = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(
        server.requests(),
        again,
        "the chain is answered from the journal"
    );
    assert_eq!(
        query(&root, "SELECT judgement['cached'], score FROM scored")[0],
        ["true".to_string(), score.to_string()]
    );
}

#[test]
fn a_reply_that_never_follows_the_schema_is_an_error_value() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = format!("[functions.score_pair]\nmode = \"json\"\nschema_retries = 1\n{SCORING}");
    let job = job(dir.path(), &server, 4, &rest);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server.state.faults.lock().unwrap().push((
        "Document 1 explains".to_string(),
        VecDeque::from([Fault::Content("{}".into()), Fault::Content("[1]".into())]),
    ));
    // The row's call is lost: the run says so and exits 1 (a rerun asks again).
    let out = crate::support::util::backforth(&["run", &job]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scored = query(
        &dir.path().join("out"),
        "SELECT id, score_reason, judgement['error'], judgement['attempts'] FROM scored ORDER BY id",
    );
    assert_eq!(scored.len(), 4, "one bad row never kills a job: {scored:?}");
    let bad = scored
        .iter()
        .find(|r| r[0].starts_with("d01"))
        .unwrap_or_else(|| panic!("{scored:?}"));
    assert_eq!(bad[1], "llm_error");
    assert!(
        bad[2].contains("no reply followed the JSON schema in 2 tries")
            && bad[2].contains("the reply must be object"),
        "{bad:?}"
    );
    assert_eq!(bad[3], "2");
    assert!(
        scored
            .iter()
            .filter(|r| !r[0].starts_with("d01"))
            .all(|r| r[2] == "NULL"),
        "{scored:?}"
    );
}

#[test]
fn a_schema_of_the_job_becomes_a_struct_column() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    std::fs::write(
        dir.path().join("facts.json"),
        r#"{"type": "object", "additionalProperties": false, "required": ["topic", "difficulty", "steps", "safe"],
            "properties": {
              "topic": {"type": "string", "title": "Topic"},
              "difficulty": {"enum": ["easy", "hard"]},
              "steps": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}},
              "safe": {"type": "boolean"}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("facts.txt"),
        "Describe this text.\n\n{{ text }}",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("facts.sql"),
        "SELECT id, facts(text) AS f FROM candidates",
    )
    .unwrap();
    let rest = "[functions.facts]\nargs = [\"text\"]\nmodel = \"scorer\"\ntemplate = \"facts.txt\"\n\
                json_schema = \"facts.json\"\n\
                [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"facts\"\nsql = \"facts.sql\"\n";
    backforth_ok(&["run", &job(dir.path(), &server, 6, rest)]);
    let facts = query(
        &dir.path().join("out"),
        "SELECT f['json']['topic'], f['json']['difficulty'], f['json']['steps'][1], \
         f['json']['safe'], arrow_typeof(f['json']['steps']) FROM facts",
    );
    assert_eq!(facts.len(), 6);
    for row in facts {
        assert!(row[0].starts_with("fake text"), "{row:?}");
        assert!(row[1] == "easy" || row[1] == "hard", "{row:?}");
        let step: i64 = row[2].parse().unwrap();
        assert!((1..=9).contains(&step), "{row:?}");
        assert!(row[3] == "true" || row[3] == "false", "{row:?}");
        assert!(row[4].starts_with("List(Int64"), "{row:?}");
    }
    let format = &server.state.bodies.lock().unwrap()[0]["response_format"];
    assert_eq!(format["json_schema"]["strict"], true);
}

#[test]
fn a_schema_servers_cannot_check_is_refused_when_the_job_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = "[functions.facts]\nargs = [\"text\"]\nmodel = \"scorer\"\ntemplate = \"facts.txt\"\n\
                json_schema = { type = \"object\", properties = { a = { \"$ref\" = \"#/defs/a\" } } }\n\
                [[stages]]\nname = \"candidates\"\n";
    std::fs::write(dir.path().join("facts.txt"), "{{ text }}").unwrap();
    let out = backforth(&["run", &job(dir.path(), &server, 1, rest)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "[functions.facts] json_schema: /properties/a: keyword `$ref` is not supported"
        ),
        "{stderr}"
    );
}

/// Three answers per instruction from `answer_k`, a copy of `answer` with `n = 3`.
fn samples_job(dir: &Path, server: &FakeServer, supports_n: bool) -> String {
    std::fs::write(
        dir.join("answers.sql"),
        "SELECT id, instruction, answer_k(instruction) AS answers FROM backtranslated",
    )
    .unwrap();
    let rest = format!(
        "[functions.answer_k]\nlike = \"answer\"\nn = 3\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
         [[stages]]\nname = \"answers\"\nsql = \"answers.sql\"\n"
    );
    let job = job(dir, server, 5, &rest);
    if !supports_n {
        let text = std::fs::read_to_string(&job).unwrap().replace(
            "[models.rewriter]\n",
            "[models.rewriter]\nsupports_n = false\n",
        );
        std::fs::write(&job, text).unwrap();
    }
    job
}

const SAMPLES: &str = "SELECT id, array_length(answers), answers[1]['text'], answers[2]['text'], \
                       answers[3]['text'] FROM answers ORDER BY id";

#[test]
fn n_samples_come_as_a_list_from_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let job = samples_job(dir.path(), &server, true);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    let before = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(server.requests() - before, 5, "one request per row");
    let bodies = server.state.bodies.lock().unwrap();
    assert!(bodies[bodies.len() - 5..].iter().all(|b| b["n"] == 3));
    drop(bodies);
    let root = dir.path().join("out");
    let samples = query(&root, SAMPLES);
    assert_eq!(samples.len(), 5);
    for row in &samples {
        assert_eq!(row[1], "3");
        let texts: std::collections::BTreeSet<&String> = row[2..].iter().collect();
        assert_eq!(texts.len(), 3, "samples differ: {row:?}");
    }
    // Per-sample usage adds up to what the server reported for the row's one request.
    let usage = query(
        &root,
        "SELECT sum(u['completion_tokens']), sum(u['attempts']), sum(u['prompt_tokens']) \
         FROM (SELECT unnest(answers) AS u FROM answers)",
    );
    assert_eq!(
        usage[0][1], "5",
        "the request is counted once, on the first sample"
    );
    let marker = crate::support::util::marker(&root, "answers");
    assert_eq!(marker["llm"]["requests"], 5, "{marker}");
    assert_eq!(
        marker["llm"]["completion_tokens"].to_string(),
        usage[0][0],
        "{marker}"
    );
    // The fake counts a choice's tokens as its length / 4, and reports their sum.
    let reported: usize = samples
        .iter()
        .flat_map(|r| r[2..].iter().map(|t| t.len() / 4))
        .sum();
    assert_eq!(usage[0][0], reported.to_string());
    // Each sample is journaled under its own key, the key it has when asked alone: a server
    // without `n` is never asked again for what is paid.
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "[models.rewriter]\n",
        "[models.rewriter]\nsupports_n = false\n",
    );
    std::fs::write(&job, text).unwrap();
    std::fs::remove_dir_all(root.join("answers")).unwrap();
    let paid = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(server.requests(), paid);
    assert_eq!(query(&root, SAMPLES), samples);
}

#[test]
fn without_n_each_sample_is_its_own_seeded_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let job = samples_job(dir.path(), &server, false);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    let before = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(server.requests() - before, 15, "three requests per row");
    let bodies = server.state.bodies.lock().unwrap();
    let mut seeds: Vec<u64> = bodies[bodies.len() - 15..]
        .iter()
        .map(|b| {
            assert!(b.get("n").is_none(), "{b}");
            b["seed"].as_u64().unwrap()
        })
        .collect();
    drop(bodies);
    seeds.sort();
    assert_eq!(seeds, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    let samples = query(&dir.path().join("out"), SAMPLES);
    for row in &samples {
        assert_eq!(row[1], "3");
        let texts: std::collections::BTreeSet<&String> = row[2..].iter().collect();
        assert_eq!(texts.len(), 3, "samples differ: {row:?}");
    }
    let usage = query(
        &dir.path().join("out"),
        "SELECT sum(u['attempts']) FROM (SELECT unnest(answers) AS u FROM answers)",
    );
    assert_eq!(usage[0][0], "15");
}

mod schema {
    use backforth::job::schema::JsonSchema;
    use datafusion::arrow::datatypes::DataType;
    use serde_json::json;

    fn schema(value: serde_json::Value) -> JsonSchema {
        JsonSchema::new("f", value).unwrap()
    }

    #[test]
    fn replies_are_checked_against_each_keyword_with_the_place_named() {
        let s = schema(json!({
            "type": "object", "required": ["name", "tags"], "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 5},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "weight": {"type": ["number", "null"], "exclusiveMinimum": 0},
                "either": {"anyOf": [{"type": "integer"}, {"type": "string", "const": "none"}]},
            }
        }));
        assert!(
            s.check(r#"{"name": "ab", "tags": ["a"], "weight": null, "either": 3}"#)
                .is_ok()
        );
        assert!(
            s.check("```json\n{\"name\": \"ab\", \"tags\": []}\n```")
                .is_ok()
        );
        for (reply, says) in [
            ("{\"name\": \"ab\"", "not valid JSON"),
            (r#"{"tags": []}"#, "/name is required but missing"),
            (
                r#"{"name": "a", "tags": []}"#,
                "/name must have at least 2 characters, not 1",
            ),
            (
                r#"{"name": "abcdef", "tags": []}"#,
                "/name must have at most 5 characters",
            ),
            (
                r#"{"name": "ab", "tags": ["c"]}"#,
                "/tags/0 must be one of [\"a\",\"b\"]",
            ),
            (
                r#"{"name": "ab", "tags": ["a", "a", "b"]}"#,
                "/tags must have at most 2 items",
            ),
            (
                r#"{"name": "ab", "tags": [], "weight": 0}"#,
                "/weight must be above 0",
            ),
            (
                r#"{"name": "ab", "tags": [], "either": "x"}"#,
                "/either matches none",
            ),
            (
                r#"{"name": "ab", "tags": [], "extra": 1}"#,
                "/extra is not a property",
            ),
            (r#"[1]"#, "the reply must be object, not an array"),
        ] {
            let error = s.check(reply).unwrap_err();
            assert!(error.contains(says), "{reply}: {error}");
        }
    }

    #[test]
    fn a_schema_maps_to_arrow_types_and_says_when_it_is_strict() {
        let s = schema(json!({
            "type": "object", "required": ["n", "x", "list", "inner", "free", "mixed"],
            "additionalProperties": false,
            "properties": {
                "n": {"type": "integer"}, "x": {"type": ["number", "null"]},
                "list": {"type": "array", "items": {"type": "boolean"}},
                "inner": {"type": "object", "properties": {"a": {"type": "string"}},
                          "required": ["a"], "additionalProperties": false},
                "free": {"type": "object"},
                "mixed": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            }
        }));
        let DataType::Struct(fields) = s.arrow_type() else {
            panic!("{:?}", s.arrow_type())
        };
        let types: Vec<(String, String)> = fields
            .iter()
            .map(|f| (f.name().clone(), format!("{}", f.data_type())))
            .collect();
        assert_eq!(types[0], ("free".into(), "Utf8".into()));
        assert!(types[1].1.starts_with("Struct"), "{types:?}");
        assert!(types[2].1.starts_with("List(Boolean"), "{types:?}");
        assert_eq!(types[3], ("mixed".into(), "Utf8".into()));
        assert_eq!(types[4], ("n".into(), "Int64".into()));
        assert_eq!(types[5], ("x".into(), "Float64".into()));
        assert_eq!(s.response_format()["json_schema"]["strict"], true);
        let loose = schema(json!({"type": "object", "properties": {"a": {"type": "string"}}}));
        assert_eq!(loose.response_format()["json_schema"]["strict"], false);
        for bad in [
            json!({"type": "array"}),
            json!({"type": "object", "properties": {"a": {"oneOf": []}}}),
        ] {
            assert!(JsonSchema::new("f", bad).is_err());
        }
    }
}

/// A server that ignores `n` (one choice back, as llama-cpp-python's) is found out at once:
/// the choice it sent counts as the first sample, paid and journaled, the others are asked
/// one request each, and later rows go one request per sample, with a warning once. No row
/// fails and every token is counted.
#[test]
fn a_server_that_ignores_n_is_asked_one_request_per_sample() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let job = samples_job(dir.path(), &server, true);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server.state.ignores_n.store(true, Ordering::SeqCst);
    let before = server.requests();
    let out = backforth_ok(&["run", &job]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("ignores `n`").count(), 1, "{stderr}");
    // Three samples a row, each paid once (an n-request's one choice is a sample).
    assert_eq!(server.requests() - before, 15);
    let root = dir.path().join("out");
    let samples = query(&root, SAMPLES);
    for row in &samples {
        assert_eq!(row[1], "3", "{row:?}");
    }
    let marker = crate::support::util::marker(&root, "answers");
    assert!(marker["dropped"].get("llm_error").is_none(), "{marker}");
    let reported: usize = samples
        .iter()
        .flat_map(|r| r[2..].iter().map(|t| t.len() / 4))
        .sum();
    assert_eq!(marker["llm"]["completion_tokens"], reported, "{marker}");
}

/// A server whose `usage` with `n` counts the first choice only (llama.cpp's) would make
/// tokens and cost several times low: a count below half of what the texts hold is taken
/// as implausible, and the texts' estimate (characters / 4) is used.
#[test]
fn implausible_usage_with_n_is_checked_against_the_texts() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let job = samples_job(dir.path(), &server, true);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server
        .state
        .usage_first_choice_only
        .store(true, Ordering::SeqCst);
    backforth_ok(&["run", &job]);
    let root = dir.path().join("out");
    let samples = query(&root, SAMPLES);
    let by_text: usize = samples
        .iter()
        .flat_map(|r| r[2..].iter().map(|t| t.len().div_ceil(4)))
        .sum();
    let marker = crate::support::util::marker(&root, "answers");
    let counted = marker["llm"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        counted * 10 >= by_text * 9 && counted <= by_text + 15,
        "{counted} tokens counted, the texts hold about {by_text}"
    );
}

/// A server that answers every request with a `response_format` by HTTP 500 (it has no JSON
/// schemas) is found out after a few: the feature is not sent again, each such row fails at
/// once with a message saying what to change, and the run exits 1, instead of five attempts
/// a row.
#[test]
fn a_feature_the_server_lacks_is_stopped_after_a_few_failures() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = format!("[functions.score_pair]\nmode = \"json\"\n{SCORING}");
    let job = job(dir.path(), &server, 20, &rest);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server
        .state
        .rejects_response_format
        .store(true, Ordering::SeqCst);
    let before = server.requests();
    let out = crate::support::util::backforth(&["run", &job, "--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("fails every request using this feature"),
        "{stderr}"
    );
    // Three failures decide it; the backoffs between a row's retries are not waited out for
    // the twenty rows.
    let sent = server.requests() - before;
    assert!(sent <= 4, "{sent} requests with response_format");
    let scored = query(
        &dir.path().join("out"),
        "SELECT count(*) FROM scored WHERE judgement['error'] LIKE '%does not support it; use mode = \"text\"%'",
    );
    assert!(scored[0][0].parse::<u32>().unwrap() >= 19, "{scored:?}");
}

/// A JSON reply cut off by the token limit is not asked again with itself appended (each
/// retry longer, and cut again): it stands, read as `truncated`, after one request.
#[test]
fn a_reply_cut_off_by_the_token_limit_is_not_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let rest = format!("[functions.score_pair]\nmode = \"json\"\n{SCORING}");
    let job = job(dir.path(), &server, 4, &rest);
    backforth_ok(&["run", &job, "--stages", "candidates,backtranslated"]);
    server.state.faults.lock().unwrap().push((
        "Document 1 explains".to_string(),
        VecDeque::from(vec![
            Fault::Cut(
                "{\"reason\": \"The answer is complete and".into()
            );
            3
        ]),
    ));
    let before = server.requests();
    backforth_ok(&["run", &job]);
    assert_eq!(server.requests() - before, 4, "one request a row");
    let scored = query(
        &dir.path().join("out"),
        "SELECT id, score_reason, judgement['error'] FROM scored WHERE id LIKE 'd01%'",
    );
    assert_eq!(scored[0][1], "truncated", "{scored:?}");
    assert_eq!(scored[0][2], "NULL", "{scored:?}");
}
