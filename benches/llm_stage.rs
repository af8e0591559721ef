//! Utilisation of an LLM stage against a simulated server: ideal time (rows × latency / slots)
//! over the measured time from first request to last reply, with the response journal on
//! (every reply durable before its slot is freed) and, for comparison, off.
//!
//!     cargo bench --bench llm_stage            # ROWS, LATENCY_MS, SLOTS override the defaults

#[path = "../tests/it/fake_server.rs"]
#[allow(dead_code)]
mod fake_server;

use std::process::Command;
use std::time::Duration;

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rows = var("ROWS", 2000) as usize;
    let latency = Duration::from_millis(var("LATENCY_MS", 100));
    let dir = tempfile::tempdir().unwrap();
    let docs: String = (0..rows)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "text": format!("Document {i} about item {}.", i * 13)}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs).unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[execution]\nshard_rows = 500\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    for (slots, journal) in [
        (16u64, "on"),
        (64, "on"),
        (64, "off"),
        (256, "on"),
        (256, "off"),
    ] {
        let server = fake_server::FakeServer::start(latency);
        let out = dir.path().join(format!("out-{slots}-{journal}"));
        let status = Command::new(env!("CARGO_BIN_EXE_backforth"))
            .env("BACKFORTH_JOURNAL", journal)
            .args([
                "run",
                job.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args([
                "--endpoint",
                &server.url(),
                "--model",
                "m",
                "--concurrency",
                &slots.to_string(),
            ])
            .env("BACKFORTH_LOG", "error")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let log = server.log();
        let first = log.iter().map(|e| e.started).min().unwrap();
        let last = log.iter().map(|e| e.finished).max().unwrap();
        let actual = (last - first).as_secs_f64();
        let ideal = latency.as_secs_f64() * (rows as f64 / slots as f64).ceil();
        println!(
            "rows {rows}, latency {latency:?}, slots {slots}, journal {journal}: {actual:.2}s, ideal {ideal:.2}s, utilisation {:.1}%",
            100.0 * ideal / actual
        );
    }
}
