//! The `vllm run-batch` round trip: export a stage's requests, answer them offline, import
//! the results, and run the stage without sending a request.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fake_server::{FakeServer, answer_for};
use crate::support::util::{backforth_ok, marker, rows, session};

/// What `vllm run-batch` does with a request line, answered by the fake's rules.
fn run_batch(line: &Value, fail: bool) -> Value {
    let body = &line["body"];
    let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
    if fail {
        return json!({"id": "x", "custom_id": line["custom_id"], "response": {"status_code": 500, "body": {}}, "error": "boom"});
    }
    json!({
        "id": "batch-1", "custom_id": line["custom_id"],
        "response": {"status_code": 200, "request_id": "r", "body": {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_for(prompt)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }},
        "error": null,
    })
}

#[test]
fn export_answer_offline_import_and_run_without_sending() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    let base = |extra: &[&str]| -> Vec<String> {
        [
            "run",
            "examples/bft.toml",
            "--output",
            root.to_str().unwrap(),
            "--endpoint",
            &server.url(),
            "--model",
            "m",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    backforth_ok(&base(&["--stages", "prepare"]));
    let requests = dir.path().join("requests.jsonl");
    backforth_ok(&[
        "batch",
        "export",
        "examples/bft.toml",
        "--stage",
        "backtranslate",
        "--to",
        requests.to_str().unwrap(),
        "--output",
        root.to_str().unwrap(),
        "--model",
        "m",
    ]);
    let lines: Vec<Value> = std::fs::read_to_string(&requests)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let candidates = marker(&root, "candidates")["rows_out"].as_u64().unwrap() as usize;
    assert_eq!(lines.len(), candidates);
    assert_eq!(lines[0]["url"], "/v1/chat/completions");
    assert_eq!(lines[0]["body"]["model"], "m");
    assert_eq!(server.requests(), 0, "export sends nothing");

    // One result fails offline: that request is sent by the run, the others are not.
    let results: String = lines
        .iter()
        .enumerate()
        .map(|(i, l)| run_batch(l, i == 0).to_string() + "\n")
        .collect();
    let results_path = dir.path().join("results.jsonl");
    std::fs::write(&results_path, results).unwrap();
    let out = backforth_ok(&[
        "batch",
        "import",
        "examples/bft.toml",
        results_path.to_str().unwrap(),
        "--output",
        root.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("recorded {} responses", candidates - 1))
            && stderr.contains("1 failed"),
        "{stderr}"
    );

    backforth_ok(&base(&["--stages", "backtranslate"]));
    assert_eq!(server.requests(), 1, "only the failed line is sent");
    let m = marker(&root, "backtranslated");
    assert_eq!(m["rows_out"].as_u64().unwrap() as usize, candidates);
    assert_eq!(
        m["llm"]["journaled"].as_u64().unwrap() as usize,
        candidates - 1
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let instructions = rt.block_on(async {
        let ctx = session(&root).await;
        rows(&ctx, "SELECT instruction FROM backtranslated").await
    });
    assert!(
        instructions
            .iter()
            .all(|r| r[0].starts_with("Tell me about")),
        "{instructions:?}"
    );
}

#[test]
fn openai_batch_api_partial_failures_expiry_resubmission_and_resume() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    let url = server.url();
    let common = |extra: &[&str]| -> Vec<String> {
        [
            "--output",
            root.to_str().unwrap(),
            "--endpoint",
            &url,
            "--model",
            "m",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    backforth_ok(
        &[
            &["run".to_string(), "examples/bft.toml".into()][..],
            &common(&["--stages", "prepare"]),
        ]
        .concat(),
    );
    let candidates = marker(&root, "candidates")["rows_out"].as_u64().unwrap() as usize;
    {
        let mut api = server.state.batch.lock().unwrap();
        api.fail_once = Some("Sourdough".into());
        api.expire_next = true;
    }
    // Interrupted while it waits for its first batch: the batch id is already recorded.
    let submit = |poll: &str| -> Vec<String> {
        [
            &[
                "batch".to_string(),
                "submit".into(),
                "examples/bft.toml".into(),
                "--stage".into(),
                "backtranslate".into(),
                "--poll-secs".into(),
                poll.into(),
            ][..],
            &common(&[]),
        ]
        .concat()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(submit("2"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = root.join("_batches/backtranslated.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !state.exists() {
        assert!(std::time::Instant::now() < deadline, "no batch recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        server.state.batch.lock().unwrap().batch_sizes,
        vec![candidates]
    );

    // The rerun polls that batch (it expires half done), then resubmits only what is missing,
    // and once more what failed.
    let out = backforth_ok(&submit("0.05"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0 requests unanswered"), "{stderr}");
    let sizes = server.state.batch.lock().unwrap().batch_sizes.clone();
    assert_eq!(sizes[0], candidates);
    let resubmitted: usize = sizes[1..].iter().sum();
    assert!(
        resubmitted >= candidates - candidates / 2,
        "the expired half came back: {sizes:?}"
    );
    assert!(
        resubmitted < candidates,
        "answered lines were not sent again: {sizes:?}"
    );
    // The line that failed inside the answered half went back with the expired half.
    let failed = server.state.batch.lock().unwrap().failed.len();
    assert_eq!(failed, 1);
    assert!(
        resubmitted == candidates - candidates / 2 + 1 || sizes.len() == 3,
        "{sizes:?}"
    );

    // Everything is in the journal: the run sends nothing.
    backforth_ok(
        &[
            &["run".to_string(), "examples/bft.toml".into()][..],
            &common(&["--stages", "backtranslate"]),
        ]
        .concat(),
    );
    assert_eq!(server.requests(), 0);
    assert_eq!(
        marker(&root, "backtranslated")["rows_out"]
            .as_u64()
            .unwrap() as usize,
        candidates
    );
}

#[test]
fn request_files_stay_within_the_batch_api_limits() {
    use backforth::outputs::batch_api::{MAX_LINES, split_files};
    let lines: Vec<Value> = (0..2 * MAX_LINES + 1)
        .map(|i| json!({"custom_id": i}))
        .collect();
    let files = split_files(&lines);
    let counts: Vec<usize> = files
        .iter()
        .map(|f| f.iter().filter(|b| **b == b'\n').count())
        .collect();
    assert_eq!(counts, vec![MAX_LINES, MAX_LINES, 1]);
}

/// The BaF example prepared against a fake server: its folder, the server and the root.
fn prepared_bft() -> (tempfile::TempDir, FakeServer, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    let mut args = vec![
        "run".to_string(),
        "examples/bft.toml".into(),
        "--stages".into(),
        "prepare".into(),
    ];
    args.extend(bft_args(&root, &server));
    backforth_ok(&args);
    (dir, server, root)
}

/// `batch submit` of the BaF example's backtranslation into `root` against `server`.
fn submit_bft(root: &std::path::Path, server: &FakeServer) -> Vec<String> {
    let mut args: Vec<String> = [
        "batch",
        "submit",
        "examples/bft.toml",
        "--stage",
        "backtranslate",
    ]
    .into_iter()
    .chain(["--poll-secs", "0.05"])
    .map(String::from)
    .collect();
    args.extend(bft_args(root, server));
    args
}

fn bft_args(root: &std::path::Path, server: &FakeServer) -> Vec<String> {
    let root = root.to_str().unwrap();
    [
        "--output",
        root,
        "--endpoint",
        &server.url(),
        "--model",
        "m",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// A Batch API status the client does not know stops `batch submit` with a message naming it
/// (and where the batch id is kept), instead of polling forever.
#[test]
fn an_unknown_batch_status_stops_polling_with_a_message() {
    let (_dir, server, root) = prepared_bft();
    server.state.batch.lock().unwrap().status_override = Some("paused\u{1b}[2J".into());
    let out = crate::support::util::backforth(&submit_bft(&root, &server));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown status 'paused\\u{1b}[2J'") && stderr.contains("_batches"),
        "{stderr}"
    );
}

/// A batch the API created while `batch submit` died before recording it (here the reply to
/// the create is lost) is found by the digest in its metadata on the next `batch submit` and
/// polled, not created and paid for a second time.
#[test]
fn a_batch_created_but_not_recorded_is_adopted_not_created_again() {
    let (_dir, server, root) = prepared_bft();
    let candidates = marker(&root, "candidates")["rows_out"].as_u64().unwrap() as usize;
    server.state.batch.lock().unwrap().lose_next_create_reply = true;
    let submit = submit_bft(&root, &server);
    let out = crate::support::util::backforth(&submit);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        server.state.batch.lock().unwrap().batch_sizes,
        vec![candidates]
    );

    let out = backforth_ok(&submit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0 requests unanswered"), "{stderr}");
    assert!(
        stderr.contains("polling it instead of creating another"),
        "{stderr}"
    );
    assert_eq!(
        server.state.batch.lock().unwrap().batch_sizes,
        vec![candidates]
    );
}

/// Results of the Batch API count toward the budget: priced at the prices of the job's model
/// that answered them (the model the API names starts with the job's), recorded in the
/// importing command's spend record, and counted once by the next run.
#[test]
fn imported_batch_results_are_priced_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let docs: String = (0..12)
        .map(|i| json!({"id": format!("d{i}"), "text": format!("Batch priced document {i} talks about canals.")}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    let job = dir.path().join("job.toml");
    let write_job = |budget: f64| {
        std::fs::write(
            &job,
            format!(
                "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
                 [models.backward]\nendpoint = \"{url}\"\nmodel = \"m\"\nprice_input_per_mtok = 1000.0\n\
                 [models.scorer]\nendpoint = \"{url}\"\nmodel = \"m\"\nprice_input_per_mtok = 1000.0\n\
                 [execution]\nbudget_usd = {budget}\n\
                 [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n\
                 [[stages]]\nname = \"scored\"\n",
                url = server.url()
            ),
        )
        .unwrap();
    };
    write_job(100.0);
    let job_s = job.to_str().unwrap();
    backforth_ok(&["run", job_s, "--stages", "candidates"]);
    let submit = [
        "batch",
        "submit",
        job_s,
        "--stage",
        "backtranslated",
        "--poll-secs",
        "0.05",
    ];
    backforth_ok(&submit);
    let spend_dir = dir.path().join("out/_journal/_spend");
    let recorded = spent(&spend_dir);
    let api = server.state.batch.lock().unwrap();
    let expected: f64 = api
        .created
        .iter()
        .flat_map(|(_, file, _)| {
            api.files[file]
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|line| {
            let body: Value = serde_json::from_str(&line).unwrap();
            let prompt = body["body"]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "user")
                .map(|m| m["content"].as_str().unwrap().len())
                .sum::<usize>();
            (prompt / 4) as f64 * 1000.0 / 1e6
        })
        .sum();
    let outputs: String = api
        .files
        .values()
        .filter(|f| f.contains("\"response\""))
        .cloned()
        .collect();
    drop(api);
    assert!(expected > 0.0);
    assert!(
        (recorded - expected).abs() < expected * 0.02,
        "recorded {recorded}, expected {expected}"
    );

    // The same results imported again (a command that died before saying it had): nothing
    // is recorded or counted twice.
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, outputs).unwrap();
    backforth_ok(&["batch", "import", job_s, results.to_str().unwrap()]);
    let again = spent(&spend_dir);
    assert!(
        (again - recorded).abs() < 1e-9,
        "{again} after importing again, {recorded} before"
    );

    // Half the batch's cost left: the run answers the instructions from the journal and
    // scores within what is left. Counted twice, nothing would be left to score with.
    write_job(recorded * 1.5);
    let out = crate::support::util::backforth(&["run", job_s, "--allow-changes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(server.requests() > 0, "{stderr}");
    let scored: f64 = server
        .log()
        .iter()
        .map(|e| (e.prompt.len() / 4) as f64 * 1000.0 / 1e6)
        .sum();
    assert!(scored <= recorded * 0.5 + 1e-9, "{scored} spent scoring");
}

/// What the spend records in `dir` say was spent, added up (each record's last line counts).
fn spent(dir: &std::path::Path) -> f64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            let last = text.lines().rfind(|l| !l.is_empty()).unwrap().to_string();
            serde_json::from_str::<Value>(&last).unwrap()["spent_usd"]
                .as_f64()
                .unwrap()
        })
        .sum()
}
