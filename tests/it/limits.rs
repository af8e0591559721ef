//! Requests-per-minute and tokens-per-minute limits hold over any window, as counted by the
//! fake server.

use std::time::{Duration, Instant};

use crate::support::fake_server::FakeServer;
use crate::support::util::backforth_ok;

fn run(limit: &str, docs: usize) -> Vec<(Instant, usize)> {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..docs)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "text": format!("Document {i} describes a distinct object, number {}.", i * 17)}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), lines).unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\nconcurrency = 64\n{limit}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    backforth_ok(&["run", dir.path().join("job.toml").to_str().unwrap()]);
    let mut sent: Vec<(Instant, usize)> = server
        .log()
        .iter()
        .map(|e| (e.started, e.prompt.len() / 4))
        .collect();
    sent.sort();
    assert_eq!(sent.len(), docs);
    sent
}

/// The most any window of `span` holds, summing `amount` of the requests starting in it.
fn busiest(sent: &[(Instant, usize)], span: Duration, amount: impl Fn(usize) -> f64) -> f64 {
    let mut best = 0.0f64;
    for (i, (start, _)) in sent.iter().enumerate() {
        let total: f64 = sent[i..]
            .iter()
            .take_while(|(t, _)| *t < *start + span)
            .map(|(_, n)| amount(*n))
            .sum();
        best = best.max(total);
    }
    best
}

#[test]
fn requests_per_minute_hold() {
    // 1,200 a minute: 20 a second, with at most one second's worth saved up.
    let sent = run("requests_per_minute = 1200", 90);
    let span = sent.last().unwrap().0 - sent[0].0;
    assert!(
        span >= Duration::from_millis(3300),
        "90 requests at 20/s took {span:?}"
    );
    for secs in [1u64, 2, 3] {
        let most = busiest(&sent, Duration::from_secs(secs), |_| 1.0);
        assert!(
            most <= 20.0 + 20.0 * secs as f64,
            "{most} requests in {secs}s"
        );
    }
}

#[test]
fn input_tokens_per_minute_hold() {
    // 48,000 prompt tokens a minute: 800 a second. Each prompt is about 120 tokens.
    let sent = run("input_tokens_per_minute = 48000", 60);
    let per_second = 800.0;
    let total: f64 = sent.iter().map(|(_, n)| *n as f64).sum();
    let span = (sent.last().unwrap().0 - sent[0].0).as_secs_f64();
    assert!(
        span >= (total - 2.0 * per_second) / per_second,
        "{total} tokens in {span:.2}s"
    );
    for secs in [1u64, 2] {
        let most = busiest(&sent, Duration::from_secs(secs), |n| n as f64);
        // One second saved up, plus the rate, plus one prompt of slack for the estimate.
        assert!(
            most <= per_second * (1.0 + secs as f64) + 150.0,
            "{most} tokens in {secs}s"
        );
    }
}

#[test]
fn a_throttling_server_shrinks_the_window() {
    use crate::support::fake_server::FakeState;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let docs = 240;
    let lines: String = (0..docs)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "text": format!("Item {i} is unlike item {}.", i + 1000)}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), lines).unwrap();
    // The server takes 6 at a time; the client may send 48.
    let server = FakeServer::start_with(FakeState {
        latency: Duration::from_millis(20),
        capacity: Some(6),
        ..FakeState::default()
    });
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoint = \"{}\"\nmodel = \"m\"\nconcurrency = 48\nmax_attempts = 20\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            server.url()
        ),
    )
    .unwrap();
    backforth_ok(&["run", dir.path().join("job.toml").to_str().unwrap()]);
    assert_eq!(server.log().len(), docs, "every row answered");
    let throttled = server.state.throttled.load(Ordering::SeqCst);
    // Without adapting, 42 of 48 slots would meet a 429 on every round (over 1,000 in all);
    // AIMD converges on the server's capacity after a few cuts.
    assert!(
        throttled < (docs * 3 / 4) as u64,
        "{throttled} requests throttled for {docs} rows"
    );
    eprintln!("{throttled} throttled requests for {docs} rows");
}

#[test]
fn replicas_share_the_load_and_a_failing_one_is_rested() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let docs = 120;
    let lines: String = (0..docs)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "text": format!("Replica test {i}, entry {}.", i * 3)}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), lines).unwrap();
    let a = FakeServer::start(Duration::from_millis(20));
    let b = FakeServer::start(Duration::from_millis(20));
    let dead = FakeServer::start(Duration::from_millis(1));
    *dead.state.fail_if_contains.lock().unwrap() = Some(String::new());
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [models.backward]\nendpoints = [\"{}\", \"{}\", \"{}\"]\nmodel = \"m\"\nconcurrency = 4\nmax_attempts = 6\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
            a.url(),
            b.url(),
            dead.url()
        ),
    )
    .unwrap();
    backforth_ok(&["run", dir.path().join("job.toml").to_str().unwrap()]);
    let (na, nb) = (a.log().len(), b.log().len());
    assert_eq!(na + nb, docs, "every row answered by a healthy replica");
    assert!(
        na * 3 >= docs && nb * 3 >= docs,
        "least-loaded dispatch spreads the rows: {na} / {nb}"
    );
    // The dead replica gets a few requests, then rests for the rest of the run: the 3 failures
    // that send it to rest, and at most its cap (4) of requests already on their way to it.
    let wasted = dead.state.requests.load(Ordering::SeqCst);
    assert!(
        (3..=7).contains(&wasted),
        "{wasted} requests to the dead replica"
    );
}
