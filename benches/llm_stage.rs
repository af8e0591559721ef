//! An LLM stage against a simulated OpenAI-compatible server whose latency is a base plus a
//! per-token time × a heavy-tailed (Pareto) output length.
//!
//! Utilisation = ideal time / actual time. The ideal is the simulated server's own: the same
//! requests, in the order the client sent them, each started the moment a slot is free
//! (greedy list scheduling; no client can do better without knowing reply lengths in
//! advance). Actual time runs from the first request to the last reply. Also printed: client CPU per request and peak RSS
//! (through `/usr/bin/time` when present).
//!
//!     cargo bench --profile dev --bench llm_stage
//!
//! `ROWS_PER_SLOT` (30), `BASE_MS` (200) and `PER_TOKEN_US` (1000) change the load.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backforth_testkit::fake_server::{FakeServer, FakeState, latency_for};

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_job(dir: &Path, rows: usize) -> std::path::PathBuf {
    let docs: String = (0..rows)
        .map(|i| {
            serde_json::json!({"id": format!("d{i}"), "text": format!("Document {i} about item {}.", i * 13)})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join(format!("docs-{rows}.jsonl")), docs).unwrap();
    let job = dir.join(format!("job-{rows}.toml"));
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs-{rows}.jsonl\"]\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n"
        ),
    )
    .unwrap();
    job
}

/// Makespan of running `latencies` in order on `slots` slots, each as soon as one is free.
fn list_schedule(latencies: impl Iterator<Item = f64>, slots: usize) -> f64 {
    let mut free_at = std::collections::BinaryHeap::new();
    for _ in 0..slots {
        free_at.push(std::cmp::Reverse(0u64));
    }
    let mut end = 0u64;
    for latency in latencies {
        let std::cmp::Reverse(start) = free_at.pop().expect("slots > 0");
        let done = start + (latency * 1e6) as u64;
        end = end.max(done);
        free_at.push(std::cmp::Reverse(done));
    }
    end as f64 / 1e6
}

fn main() {
    let base = Duration::from_millis(var("BASE_MS", 200));
    let per_token = Duration::from_micros(var("PER_TOKEN_US", 1000));
    let rows_per_slot = var("ROWS_PER_SLOT", 30) as usize;
    let dir = tempfile::tempdir().unwrap();
    let time = Path::new("/usr/bin/time").exists();
    println!(
        "latency {base:?} + {per_token:?} x Pareto(1.5, 20..2000) tokens; {rows_per_slot} rows per slot"
    );
    // The last row repeats 64 slots on a corpus ten times larger: memory follows the window,
    // not the corpus.
    for (slots, scale) in [(64usize, 1), (256, 1), (1024, 1), (64, 10)] {
        let rows = slots * rows_per_slot * scale;
        let job = write_job(dir.path(), rows);
        let server = FakeServer::start_with(FakeState {
            latency: base,
            per_token,
            ..FakeState::default()
        });
        let out = dir.path().join(format!("out-{slots}-{scale}"));
        let report = dir.path().join("time.txt");
        let mut cmd = if time {
            let mut c = Command::new("/usr/bin/time");
            c.args(["-f", "%U %S %M", "-o", report.to_str().unwrap()])
                .arg(env!("CARGO_BIN_EXE_backforth"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_backforth"))
        };
        let status = cmd
            .args([
                "run",
                job.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args(["--endpoint", &server.url(), "--model", "m"])
            .args(["--concurrency", &slots.to_string()])
            .env("BACKFORTH_LOG", "error")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let log = server.log();
        let first = log.iter().map(|e| e.started).min().unwrap();
        let last = log.iter().map(|e| e.finished).max().unwrap();
        let actual = (last - first).as_secs_f64();
        let mut sent: Vec<_> = log.iter().collect();
        sent.sort_by_key(|e| e.started);
        let ideal = list_schedule(
            sent.iter()
                .map(|e| latency_for(&server.state, &e.prompt).as_secs_f64()),
            slots,
        );
        let resources = if time {
            let t = std::fs::read_to_string(&report).unwrap();
            let v: Vec<f64> = t
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            format!(
                "client CPU {:.0} us/request, peak RSS {:.0} MiB",
                1e6 * (v[0] + v[1]) / log.len() as f64,
                v[2] / 1024.0
            )
        } else {
            "client CPU and RSS: /usr/bin/time not found".to_string()
        };
        println!(
            "slots {slots:>5}, rows {rows:>6}: {actual:.2}s, ideal {ideal:.2}s, utilisation {:.1}%, {resources}",
            100.0 * ideal / actual
        );
    }
}
