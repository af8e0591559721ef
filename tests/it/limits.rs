//! Requests-per-minute and tokens-per-minute limits hold over any window, as counted by the
//! fake server; the cap on requests in flight serves waiting calls by priority.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backforth::llm::limits::{Aimd, Slot};

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth_ok, run_workers};

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

/// Writes `docs` documents in four input files and a job calling `url` with `extra` model
/// settings and `execution` settings; returns the job's path.
fn workers_job(
    dir: &std::path::Path,
    url: &str,
    docs: usize,
    extra: &str,
    execution: &str,
) -> String {
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    for file in 0..4 {
        let lines: String = (file..docs)
            .step_by(4)
            .map(|i| serde_json::json!({"id": format!("d{i}"), "text": format!("Worker test {i} is about thing {}.", i * 7)}).to_string() + "\n")
            .collect();
        std::fs::write(dir.join(format!("docs/part-{file}.jsonl")), lines).unwrap();
    }
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs\"]\n\
             [models.backward]\nendpoint = \"{url}\"\nmodel = \"m\"\n{extra}\n\
             [execution]\nshard_rows = 10\n{execution}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// The cap on requests in flight is the job's, not each worker's: four workers started
/// together with `--concurrency 16` never have more than 16 requests on the wire.
#[test]
fn the_cap_holds_across_workers_started_together() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(50));
    let job = workers_job(dir.path(), &server.url(), 400, "", "");
    for out in run_workers(&job, 4, &["--concurrency", "16"]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(server.log().len(), 400);
    let peak = server.state.max_in_flight.load(Ordering::SeqCst);
    // More than one worker's share (4) shows the workers overlapped; never more than the job's.
    assert!(
        (5..=16).contains(&peak),
        "{peak} requests in flight at the peak"
    );
}

/// A budget holds for the job: two workers together spend it once, not once each; a
/// restart counts what was spent (from the journal) and spends at most what is left; a larger budget
/// finishes the job without paying for any call twice. A budget without prices is refused.
#[test]
fn a_budget_holds_across_workers_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(2));
    let docs = 40;
    // $1,000 per million prompt tokens: each call costs a few cents.
    let priced = "price_input_per_mtok = 1000.0\nconcurrency = 1";
    let job = workers_job(dir.path(), &server.url(), docs, priced, "budget_usd = 0.5");
    let first = run_workers(&job, 2, &[]);
    for out in &first {
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("budget of $0.50 is spent"));
    }
    let paid = server.requests();
    assert!(paid >= 2 && paid < docs as u64, "{paid} calls paid");
    // Each worker stops before its half would be passed: the job spends at most its budget,
    // not twice it.
    let spent = || -> f64 {
        server
            .log()
            .iter()
            .map(|e| (e.prompt.len() / 4) as f64 * 1000.0 / 1e6)
            .sum()
    };
    let per_call = spent() / paid as f64;
    assert!(
        spent() <= 0.5 + 1e-9,
        "spent ${:.3} ({per_call:.3} per call)",
        spent()
    );

    // Restarted with the same budget: what was spent is counted; what is left is all it may
    // spend.
    let again = run_workers(&job, 1, &[]);
    assert_eq!(again[0].status.code(), Some(2));
    assert!(
        spent() <= 0.5 + 1e-9,
        "spent ${:.3} after the restart",
        spent()
    );

    // A larger budget finishes the job; no call is paid twice.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("budget_usd = 0.5", "budget_usd = 100");
    std::fs::write(&job, text).unwrap();
    for out in run_workers(&job, 2, &["--allow-changes"]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(server.requests(), docs as u64);

    // Without prices nothing would count against a budget: refused.
    let unpriced = std::fs::read_to_string(&job)
        .unwrap()
        .replace("price_input_per_mtok = 1000.0\n", "");
    std::fs::write(&job, unpriced).unwrap();
    let out = crate::support::util::backforth(&["run", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no model has prices"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A budget holds for the job while a worker is killed and restarted twice as three others
/// run: each process records what its calls paid and have in flight before they leave, and a
/// restarted worker takes up what is left of its own slot's share, so the job spends at most
/// its budget.
#[test]
fn a_budget_holds_while_a_worker_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(40));
    let budget = 1.0;
    let priced = "price_input_per_mtok = 100.0\nconcurrency = 4";
    let job = workers_job(
        dir.path(),
        &server.url(),
        400,
        priced,
        &format!("budget_usd = {budget}"),
    );
    let worker = |i: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(["run", &job, "--worker", &format!("{i}/4")])
            .env("BACKFORTH_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut others: Vec<_> = (1..4).map(worker).collect();
    let mut first = worker(0);
    for when in [15, 40] {
        while server.requests() < when {
            std::thread::sleep(Duration::from_millis(2));
        }
        first.kill().unwrap();
        first.wait().unwrap();
        first = worker(0);
    }
    first.wait().unwrap();
    for other in &mut others {
        other.wait().unwrap();
    }
    let cost = |prompt: &str| prompt.len() as f64 / 4.0 * 100.0 / 1e6;
    let log = server.log();
    let spent: f64 = log.iter().map(|e| cost(&e.prompt)).sum();
    let dearest = log.iter().map(|e| cost(&e.prompt)).fold(0.0, f64::max);
    // A call leaves only if what is spent and in flight leaves room for its most, and that
    // is recorded before it leaves: the calls a kill cut off count against their worker's
    // share when it is restarted. Slack for one call's rounding.
    assert!(
        spent <= budget + dearest,
        "spent ${spent:.3} of ${budget} in {} calls of at most ${dearest:.4}",
        log.len()
    );
    assert!(spent > budget * 0.8, "spent only ${spent:.3}");
}

/// A process's spend record on a local disk grows a line per costly journal write and is
/// replaced by one line every 1,024: after 1,100 paid calls it is short, and says what the
/// calls cost.
#[test]
fn the_spend_record_stays_short_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::ZERO);
    let priced = "price_input_per_mtok = 100.0\nconcurrency = 1";
    let job = workers_job(dir.path(), &server.url(), 1100, priced, "budget_usd = 1000");
    let out = crate::support::util::backforth(&["run", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = spend_records(&dir.path().join("out"));
    assert_eq!(records.len(), 1);
    let (lines, recorded) = records[0];
    assert!(lines <= 1024 + 1, "{lines} lines");
    let paid: f64 = server
        .log()
        .iter()
        .map(|e| (e.prompt.len() as f64 / 4.0).round() * 100.0 / 1e6)
        .sum();
    assert!(
        (recorded - paid).abs() < paid * 0.05,
        "recorded {recorded}, paid {paid}"
    );
}

/// A call is held back at the most it can cost (`max_tokens` of reply), but one that costs
/// less gives the rest back: with room for three calls at their most and eight slots, the
/// run waits for calls in flight and goes on, rather than stopping at the fourth, and spends
/// at most its budget.
#[test]
fn a_budget_waits_for_calls_in_flight_instead_of_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(20));
    // A reply may be 256 tokens at $100 per million; the fake's are a dozen or so.
    let priced = "price_input_per_mtok = 1.0\nprice_output_per_mtok = 100.0\nmax_tokens = 256\nconcurrency = 8";
    let dearest = 256.0 * 100.0 / 1e6;
    let budget = 3.0 * dearest + 0.0001;
    let job = workers_job(
        dir.path(),
        &server.url(),
        60,
        priced,
        &format!("budget_usd = {budget}"),
    );
    let out = crate::support::util::backforth(&["run", &job]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        server.requests() > 10,
        "{} calls: {stderr}",
        server.requests()
    );
    let spent: f64 = spend_records(&dir.path().join("out"))
        .iter()
        .map(|r| r.1)
        .sum();
    assert!(spent <= budget + 1e-9, "spent ${spent} of ${budget}");
}

/// The spend records under `root`: each one's lines and what its last says was spent.
fn spend_records(root: &std::path::Path) -> Vec<(usize, f64)> {
    std::fs::read_dir(root.join("_journal/_spend"))
        .unwrap()
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
            (lines.len(), last["spent_usd"].as_f64().unwrap())
        })
        .collect()
}

/// What the server billed counts, whether or not it could be read: a reply with `usage` and
/// no choices (asked again) adds its usage, and a reply without `usage` is charged by its
/// characters (four a token), so a run's recorded spend is what a clean run's is plus the
/// billed failures.
#[test]
fn billed_failures_and_replies_without_usage_count() {
    use crate::support::fake_server::{FakeState, Fault};
    let priced = "price_input_per_mtok = 100.0\nprice_output_per_mtok = 100.0\nconcurrency = 2";
    let spent = |server: &FakeServer| {
        let dir = tempfile::tempdir().unwrap();
        let job = workers_job(dir.path(), &server.url(), 12, priced, "");
        let out = crate::support::util::backforth(&["run", &job]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        spend_records(&dir.path().join("out"))
            .iter()
            .map(|r| r.1)
            .sum::<f64>()
    };
    let clean = FakeServer::start(Duration::ZERO);
    let clean_usd = spent(&clean);
    let fault = |doc: usize, fault: Fault| (format!("Worker test {doc} is"), [fault].into());
    let faulty = FakeServer::start_with(FakeState {
        faults: Mutex::new(vec![
            fault(1, Fault::BilledEmpty),
            fault(2, Fault::BilledEmpty),
            fault(5, Fault::NoUsage),
            fault(6, Fault::NoUsage),
        ]),
        ..FakeState::default()
    });
    let faulty_usd = spent(&faulty);
    assert_eq!(faulty.requests(), clean.requests() + 2);
    let billed: f64 = clean
        .log()
        .iter()
        .filter(|e| {
            ["Worker test 1 is", "Worker test 2 is"]
                .iter()
                .any(|n| e.prompt.contains(n))
        })
        .map(|e| (e.prompt.len() / 4) as f64 * 100.0 / 1e6)
        .sum();
    // Rounding: a token either way for each prompt and reply charged by its characters.
    let token = 100.0 / 1e6;
    assert!(
        (faulty_usd - (clean_usd + billed)).abs() <= 4.0 * token,
        "faulty ${faulty_usd:.6}, clean ${clean_usd:.6} + billed ${billed:.6}"
    );
}

#[tokio::test]
async fn freed_slots_go_to_the_highest_priority_then_the_first_come() {
    let aimd = Aimd::new(1);
    let held = aimd.acquire(0).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waits = Vec::new();
    for (name, priority) in [("low", 1), ("high-1", 5), ("high-2", 5), ("mid", 3)] {
        let (aimd, order) = (Arc::clone(&aimd), Arc::clone(&order));
        waits.push(tokio::spawn(async move {
            let _slot = aimd.acquire(priority).await;
            order.lock().unwrap().push(name);
        }));
        tokio::task::yield_now().await;
    }
    drop(held);
    for wait in waits {
        wait.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["high-1", "high-2", "mid", "low"]);
    assert_eq!(aimd.available(), 1);
}

#[tokio::test]
async fn a_slot_handed_to_a_call_that_stopped_waiting_comes_back() {
    let aimd = Aimd::new(1);
    let held = aimd.acquire(0).await;
    let mut gone = Box::pin(aimd.acquire(0));
    assert!(futures::poll!(gone.as_mut()).is_pending());
    drop(held);
    drop(gone);
    assert_eq!(aimd.available(), 1);
    let _again = aimd.try_acquire().expect("the slot came back");
}

#[tokio::test]
async fn a_cut_takes_slots_back_as_they_come_free() {
    let aimd = Aimd::new(4);
    let held: Vec<Slot> = futures::future::join_all((0..4).map(|_| aimd.acquire(0))).await;
    aimd.on_throttle();
    assert_eq!(aimd.limit(), 3);
    drop(held);
    assert_eq!(aimd.available(), 3);
}

/// A process's share of the cap follows the processes on the job: a smaller share takes
/// slots back as they come free, a larger one hands slots to waiting calls at once, and the
/// window never grows past the share.
#[tokio::test]
async fn a_share_of_the_cap_shrinks_as_slots_free_and_grows_at_once() {
    let aimd = Aimd::new(8);
    aimd.set_cap(2);
    let held: Vec<Slot> = futures::future::join_all((0..2).map(|_| aimd.acquire(0))).await;
    assert!(aimd.try_acquire().is_none(), "two of eight slots");
    let mut waiting = Box::pin(aimd.acquire(0));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    aimd.set_cap(3);
    let third = waiting.await;
    aimd.set_cap(1);
    drop(held);
    assert_eq!(aimd.available(), 0, "the third slot is still held");
    drop(third);
    assert_eq!(aimd.available(), 1);
    for _ in 0..100 {
        aimd.on_success();
    }
    assert_eq!(
        aimd.limit(),
        1,
        "successes never grow the window past the share"
    );
}

/// A worker of a four-worker array run alone takes the job's whole cap once it sees it is
/// alone (a throttled array's first task does the job at full speed).
#[test]
fn a_lone_worker_of_an_array_takes_the_whole_cap() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(Duration::from_millis(100));
    let job = workers_job(dir.path(), &server.url(), 600, "", "");
    let out =
        crate::support::util::backforth(&["run", &job, "--concurrency", "16", "--worker", "2/4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.log().len(), 600);
    let peak = server.state.max_in_flight.load(Ordering::SeqCst);
    assert!(peak > 4, "{peak} requests in flight at the peak");
    assert!(peak <= 16, "{peak} requests in flight at the peak");
}
