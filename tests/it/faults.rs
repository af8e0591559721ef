//! Injected server faults: every row ends with a value or an explicit error, the fake server's
//! request counts match the retry policy, and an exhausted quota stops the stage with completed
//! work kept.

use std::collections::VecDeque;
use std::process::Command;
use std::time::Duration;

use crate::support::fake_server::{FakeServer, FakeState, Fault};
use crate::support::util::{backforth, backforth_with, marker, rows, session};

const CASES: &[&str] = &[
    "ra429", "plain429", "err500", "err503", "dropped", "slow", "garbled", "dead", "fine",
];

fn job(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let docs: String = CASES
        .iter()
        .map(|case| {
            serde_json::json!({"id": case, "text": format!("Case {case} tells a short story.")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs).unwrap();
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{url}\"\nmodel = \"m\"\nmax_attempts = 4\ntimeout_secs = 1\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n"
        ),
    )
    .unwrap();
    path
}

fn script(server: &FakeServer, case: &str, faults: Vec<Fault>) {
    server
        .state
        .faults
        .lock()
        .unwrap()
        .push((format!("Case {case} "), VecDeque::from(faults)));
}

fn requests_for(server: &FakeServer, case: &str) -> u64 {
    let needle = format!("Case {case} ");
    let per_prompt = server.state.per_prompt.lock().unwrap();
    per_prompt
        .iter()
        .filter(|(p, _)| p.contains(&needle))
        .map(|(_, n)| *n)
        .sum()
}

#[test]
fn retries_follow_the_policy_and_every_row_ends_with_a_value_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start_with(FakeState {
        latency: Duration::from_millis(5),
        ..FakeState::default()
    });
    script(&server, "ra429", vec![Fault::TooMany(Some(1))]);
    script(
        &server,
        "plain429",
        vec![Fault::TooMany(None), Fault::TooMany(None)],
    );
    script(&server, "err500", vec![Fault::Status(500)]);
    script(
        &server,
        "err503",
        vec![Fault::Status(503), Fault::Status(503)],
    );
    script(&server, "dropped", vec![Fault::Drop]);
    script(&server, "slow", vec![Fault::Slow(Duration::from_secs(3))]);
    script(&server, "garbled", vec![Fault::Malformed]);
    script(&server, "dead", vec![Fault::Status(500); 6]);
    let job = job(dir.path(), &server.url());
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", job.to_str().unwrap()])
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One row lost its call after every retry: the run says so and exits 1.
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    let expected_requests = [
        ("ra429", 2),
        ("plain429", 3),
        ("err500", 2),
        ("err503", 3),
        ("dropped", 2),
        ("slow", 2),
        ("garbled", 2),
        ("dead", 4),
        ("fine", 1),
    ];
    for (case, n) in expected_requests {
        assert_eq!(requests_for(&server, case), n, "requests for {case}");
    }
    let root = dir.path().join("out");
    assert_eq!(marker(&root, "backtranslated")["dropped"]["llm_error"], 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = session(&root).await;
        let kept = rows(
            &ctx,
            "SELECT doc_id, backtranslation['attempts'], backtranslation['latency_ms'] >= 1000, instruction IS NOT NULL \
             FROM backtranslated ORDER BY doc_id",
        )
        .await;
        for row in &kept {
            let attempts = expected_requests.iter().find(|(c, _)| *c == row[0]).unwrap().1;
            assert_eq!(row[1], attempts.to_string(), "attempts recorded for {row:?}");
            assert_eq!(row[3], "true", "{row:?}");
        }
        assert_eq!(kept.len(), CASES.len() - 1);
        // Retry-After: 1 was honoured.
        assert_eq!(kept.iter().find(|r| r[0] == "ra429").unwrap()[2], "true");
        let dead = rows(
            &ctx,
            "SELECT doc_id, backtranslation['attempts'], backtranslation['error'] FROM backtranslated_dropped",
        )
        .await;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0][0], "dead");
        assert_eq!(dead[0][1], "4");
        assert!(dead[0][2].contains("gave up after 4 attempts") && dead[0][2].contains("500"), "{dead:?}");
    });
}

#[test]
fn an_exhausted_quota_stops_the_stage_and_keeps_completed_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start_with(FakeState {
        latency: Duration::from_millis(5),
        ..FakeState::default()
    });
    let job = job(dir.path(), &server.url());
    // Half of the rows go through first (one at a time), then the quota runs out.
    let run = |concurrency: &str| {
        Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(["run", job.to_str().unwrap(), "--concurrency", concurrency])
            .env("BACKFORTH_LOG", "warn")
            .output()
            .unwrap()
    };
    script(&server, "garbled", vec![Fault::Quota]);
    let out = run("1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("quota is exhausted") && stderr.contains("Completed work is kept"),
        "{stderr}"
    );
    let answered = server.log().len();
    assert!(
        answered >= 1,
        "some rows were answered before the quota ran out"
    );
    // After the quota stop, no more requests were sent.
    assert_eq!(server.requests() as usize, answered + 1);

    // Quota restored: the rerun pays only for what was not answered.
    let out = run("1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.log().len(), CASES.len());
    assert_eq!(
        marker(&dir.path().join("out"), "backtranslated")["rows_out"],
        CASES.len()
    );
}

#[test]
fn a_budget_stops_the_run_cleanly_and_a_larger_one_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(2));
    let job = job(dir.path(), &server.url());
    // $1,000 per million prompt tokens: each prompt (~130 tokens) costs about 13 cents.
    let priced = |budget: &str| {
        let text = std::fs::read_to_string(&job).unwrap().replace(
            "timeout_secs = 1\n",
            "timeout_secs = 1\nprice_input_per_mtok = 1000.0\nconcurrency = 1\n",
        );
        let text = text.replacen(
            "[[stages]]",
            &format!("[execution]\nbudget_usd = {budget}\n[[stages]]"),
            1,
        );
        let path = dir.path().join(format!("job-{budget}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args([
            "run",
            priced("0.5").to_str().unwrap(),
            "--output",
            dir.path().join("out").to_str().unwrap(),
        ])
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("budget of $0.50 is spent"), "{stderr}");
    let paid = server.requests();

    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args([
            "run",
            priced("10").to_str().unwrap(),
            "--output",
            dir.path().join("out").to_str().unwrap(),
            "--allow-changes",
        ])
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the first run paid for is not paid again.
    assert_eq!(server.requests() as usize, CASES.len());
    let cost = marker(&dir.path().join("out"), "backtranslated")["llm"]["cost_usd"]
        .as_f64()
        .unwrap();
    // The second run paid only for the calls the first did not make.
    let per_call = cost / (CASES.len() as u64 - paid) as f64;
    assert!(per_call > 0.01, "priced calls cost something: {cost}");
    // The first run stopped before a call could pass $0.50 (one call at a time): it spent
    // at most that, and within a call of it.
    let spent = paid as f64 * per_call;
    assert!(
        spent <= 0.5 + 1e-9 && spent > 0.5 - 2.0 * per_call,
        "{paid} paid calls, {per_call:.3} each"
    );
}

/// A row waiting out `Retry-After: 30` gives its slot back: with one slot, every other row is
/// answered meanwhile. Throttling does not use up the attempts meant for failures: with
/// `max_attempts = 1`, a row throttled twice is still answered.
#[test]
fn a_throttled_row_waits_without_holding_its_slot_or_using_its_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(100));
    script(
        &server,
        "ra429",
        vec![Fault::TooMany(Some(30)), Fault::TooMany(Some(1))],
    );
    let job = job(dir.path(), &server.url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_attempts = 4", "max_attempts = 1\nconcurrency = 1");
    std::fs::write(&job, text).unwrap();
    let started = std::time::Instant::now();
    let out = backforth(&["run", job.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(requests_for(&server, "ra429"), 3);
    assert_eq!(
        server
            .state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let log = server.log();
    let first = log.iter().map(|e| e.started).min().unwrap();
    let throttled = log
        .iter()
        .find(|e| e.prompt.contains("Case ra429 "))
        .unwrap();
    assert!(
        throttled.started - first >= Duration::from_secs(31),
        "{:?}",
        throttled.started - first
    );
    // The slot the throttled row left was used: every other row is answered long before.
    let others: Vec<_> = log
        .iter()
        .filter(|e| !e.prompt.contains("Case ra429 "))
        .collect();
    assert_eq!(others.len(), CASES.len() - 1);
    for e in others {
        assert!(e.finished - first < Duration::from_secs(10), "{}", e.prompt);
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let root = dir.path().join("out");
    assert_eq!(
        marker(&root, "backtranslated")["rows_out"],
        CASES.len() as u64
    );
}

/// Errors that are the request's own (400, 401, 404, 422) are sent once, not retried as
/// transient, and do not count against the endpoint: a run of them does not rest a server
/// that answers every other request. (llama.cpp's server answers a prompt over its context
/// with 400; three in a row rested it for 30 s.)
#[test]
fn a_request_rejected_by_the_server_is_not_retried_and_does_not_rest_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(5));
    let job = job(dir.path(), &server.url());
    for (case, status) in [
        ("ra429", 400),
        ("plain429", 401),
        ("err500", 404),
        ("err503", 422),
    ] {
        script(&server, case, vec![Fault::Status(status); 4]);
    }
    let started = std::time::Instant::now();
    let out = backforth(&["run", job.to_str().unwrap(), "--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("resting it"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    for case in ["ra429", "plain429", "err500", "err503"] {
        assert_eq!(requests_for(&server, case), 1, "{case}");
    }
    let m = marker(&dir.path().join("out"), "backtranslated");
    assert_eq!(m["dropped"]["llm_error"], 4, "{m}");
}

/// A server that stops answering (restarted, its requests dropped) is reported as a stall
/// once nothing has come back for a while, with the timeout the calls wait for, instead of
/// the run sitting at 0 req/s in silence.
#[test]
fn a_stalled_server_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(5));
    let job = job(dir.path(), &server.url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("timeout_secs = 1", "timeout_secs = 30");
    std::fs::write(&job, text).unwrap();
    for case in CASES {
        script(&server, case, vec![Fault::Slow(Duration::from_secs(3))]);
    }
    let out = backforth_with(
        &["run", job.to_str().unwrap()],
        &[("BACKFORTH_STALL_SECS", "1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("No reply for 1 s with calls open"),
        "{stderr}"
    );
    assert!(stderr.contains("timeout_secs = 30 s"), "{stderr}");
}

/// A redirect to another origin (here another port on the same host) is not followed: the
/// prompt never reaches the other server, and the row's error names where it pointed.
#[test]
fn a_redirect_to_another_origin_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(5));
    let elsewhere = FakeServer::start(Duration::from_millis(5));
    let job = job(dir.path(), &server.url());
    let target = format!("{}/chat/completions", elsewhere.url());
    script(&server, "fine", vec![Fault::Redirect(target.clone())]);
    let out = backforth(&["run", job.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(elsewhere.requests(), 0, "the other server got the prompt");
    assert_eq!(requests_for(&server, "fine"), 1, "not retried");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let errors = rt.block_on(async {
        let ctx = session(&dir.path().join("out")).await;
        rows(
            &ctx,
            "SELECT backtranslation['error'] FROM backtranslated_dropped WHERE doc_id = 'fine'",
        )
        .await
    });
    assert!(
        errors[0][0].contains("redirected the request to") && errors[0][0].contains(&target),
        "{errors:?}"
    );
}

/// When a run fails and giving its lease back fails too, the run's own error is the one
/// shown (here the budget's), the lease's only logged.
#[test]
fn the_runs_own_error_comes_first_when_the_lease_cannot_be_given_back() {
    let dir = tempfile::tempdir().unwrap();
    // Every reply takes two seconds: the first call is surely out when the folder goes.
    let server = FakeServer::start(Duration::from_secs(2));
    let docs: String = (0..20)
        .map(|i| format!("{{\"id\": \"d{i}\", \"text\": \"Document {i} tells a long story.\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\nconcurrency = 1\nprice_input_per_mtok = 10.0\n\
             [execution]\nbudget_usd = 0.006\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", job.to_str().unwrap()])
        .env("BACKFORTH_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the first (slow) call is out, the leases' folder becomes a file: giving the
    // lease back at the end cannot succeed.
    let leases = dir.path().join("out/_leases");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.requests() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(&leases).unwrap();
    std::fs::write(&leases, "not a folder").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("");
    assert!(error.contains("budget"), "the run's error first: {stderr}");
    assert!(
        stderr.contains("Could not give the worker's lease back"),
        "{stderr}"
    );
}
