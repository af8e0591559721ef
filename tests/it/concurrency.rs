//! A stage of N rows against a server of fixed latency L with C slots takes about N·L/C:
//! no batch waits alone for its slowest reply while slots sit idle.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth_ok, marker};

#[test]
fn llm_stage_keeps_every_slot_busy() {
    const N: usize = 150;
    const C: usize = 8;
    const L: Duration = Duration::from_millis(100);
    let dir = tempfile::tempdir().unwrap();
    let docs: String = (0..N)
        .map(|i| {
            serde_json::json!({"id": format!("d{i}"), "text": format!("Document number {i} says something distinct about topic {}.", i * 31)})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    let server = FakeServer::start(L);
    let c = C.to_string();
    let args = [
        "run",
        job.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--model",
        "m",
        "--concurrency",
        &c,
    ];
    backforth_ok(&[&args[..], &["--stages", "prepare"]].concat());
    backforth_ok(&[&args[..], &["--stages", "backtranslate"]].concat());

    assert_eq!(
        marker(&dir.path().join("out"), "backtranslated")["rows_out"],
        N
    );
    let log = server.log();
    assert_eq!(log.len(), N);
    let first = log.iter().map(|e| e.started).min().unwrap();
    let last = log.iter().map(|e| e.finished).max().unwrap();
    let span = last - first;
    let ideal = L * N.div_ceil(C) as u32;
    eprintln!(
        "{N} rows, latency {L:?}, {C} slots: {span:?} from first request to last reply (N·L/C {ideal:?})"
    );
    assert_eq!(
        server.state.max_in_flight.load(Ordering::SeqCst),
        C as u64,
        "the cap is reached and never exceeded"
    );
    assert!(
        span.as_secs_f64() < ideal.as_secs_f64() * 1.15,
        "{N} rows at {L:?} with {C} slots took {span:?}; ideal {ideal:?}"
    );
}
