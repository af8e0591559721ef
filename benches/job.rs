//! The whole BaF job (backtranslate, score, curate, rewrite, distill) over many small input
//! files against simulated OpenAI-compatible servers: how busy the job keeps the server, what
//! one request costs the client, and how fast it can go at all.
//!
//! Busy = the server's total service time / (slots × the job's wall time), from process start
//! to exit: every tail between shards and stages, and the input stage, count against it.
//! Latency is a base plus a per-token time × a heavy-tailed (Pareto) output length, so the
//! server itself sleeps rather than computes. Client CPU and peak RSS come from
//! `/usr/bin/time`.
//!
//!     cargo bench --bench job
//!
//! `BACKFORTH_BIN` runs another build of the binary (an earlier commit's, to compare in one
//! sitting); `ONLY` (`schedule`, `busy`, `memory` or `ceiling`) runs one kind of row, `SLOTS` (256 or
//! 1024) one busy row; `CONCURRENT_SHARDS` sets `[execution] concurrent_shards`; `TIMELINE`
//! prints the requests in flight per second.
//!
//! Rows: `schedule`, the job at 256 slots run by one process, then by four workers run one
//! after another (`--worker I/4`, as a throttled array runs them), and the ratio of the wall
//! times; `busy` at 256 slots (200 ms + 2 ms/token) and 1,024 slots (1 s + 2 ms/token) over
//! `FILES` (20) × `DOCS` (1,000) documents; `memory`, `MEMORY_FILES` (20) files of
//! `MEMORY_DOCS` (1,000) documents and ten times as many against a quick server, so peak RSS
//! can be compared at 10× the documents (`MEMORY_RUNS` pairs, with the median ratio); `ceiling`, a server answering at once (one
//! endpoint, then four replicas): requests per second and CPU per request.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backforth_testkit::fake_server::{FakeServer, FakeState};

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const WORDS: [&str; 24] = [
    "river", "bridge", "orchard", "lantern", "harbour", "market", "garden", "compass", "stone",
    "winter", "signal", "copper", "meadow", "engine", "ledger", "thread", "valley", "quarry",
    "harvest", "beacon", "canal", "furnace", "spindle", "timber",
];

/// `files` JSONL files of `docs` documents each, every document different, ~120 words.
fn write_corpus(dir: &Path, files: usize, docs: usize) -> PathBuf {
    let input = dir.join(format!("in-{files}-{docs}"));
    std::fs::create_dir_all(&input).unwrap();
    let mut rng = backforth_testkit::rng::Rng(0x9e37_79b9 + files as u64);
    for f in 0..files {
        let mut out = String::new();
        for d in 0..docs {
            let words: Vec<&str> = (0..120)
                .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
                .collect();
            let text = format!(
                "Notes {f}-{d}. {}. The end of note {f}-{d}.",
                words.join(" ")
            );
            out += &serde_json::json!({"id": format!("f{f}-d{d}"), "text": text}).to_string();
            out.push('\n');
        }
        std::fs::write(input.join(format!("part-{f:03}.jsonl")), out).unwrap();
    }
    input
}

/// The BaF job with every role on `urls` (replicas), `slots` requests in flight per replica,
/// priced as a hosted model would be (so the spend record is kept, as for OpenAI users).
fn write_job(dir: &Path, input: &Path, urls: &[String], slots: usize) -> PathBuf {
    let endpoints = serde_json::to_string(urls).unwrap();
    let mut job = format!(
        "output = \"out\"\n[input]\npaths = [{:?}]\n",
        input.to_str().unwrap()
    );
    for (role, max_tokens) in [("backward", 256), ("scorer", 512), ("rewriter", 2048)] {
        job += &format!(
            "[models.{role}]\nendpoints = {endpoints}\nmodel = \"m\"\nmax_tokens = {max_tokens}\nconcurrency = {slots}\n\
             price_input_per_mtok = 0.5\nprice_output_per_mtok = 1.5\n"
        );
    }
    for stage in [
        "candidates",
        "backtranslated",
        "scored",
        "curated",
        "rewritten",
        "distilled",
    ] {
        job += &format!("[[stages]]\nname = \"{stage}\"\n");
    }
    if let Ok(shards) = std::env::var("CONCURRENT_SHARDS") {
        job += &format!("[execution]\nconcurrent_shards = {shards}\n");
    }
    let path = dir.join(format!("job-{slots}-{}.toml", urls.len()));
    std::fs::write(&path, job).unwrap();
    path
}

/// What one run of the job cost.
struct Measured {
    wall: f64,
    /// From process start to the first request (the input stage and start-up).
    lead: f64,
    /// From the last reply to the process's exit (publishing, statistics).
    trail: f64,
    requests: usize,
    service: f64,
    cpu: Option<f64>,
    rss_mib: Option<f64>,
}

fn run_job(dir: &Path, input: &Path, servers: &[FakeServer], slots: usize) -> Measured {
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    run_on(dir, input, servers, slots, &out, &[])
}

/// One process of the job on the output root `out` (kept as it is), with `extra` arguments.
fn run_on(
    dir: &Path,
    input: &Path,
    servers: &[FakeServer],
    slots: usize,
    out: &Path,
    extra: &[&str],
) -> Measured {
    let urls: Vec<String> = servers.iter().map(FakeServer::url).collect();
    let job = write_job(dir, input, &urls, slots);
    let report = dir.join("time.txt");
    let time = Path::new("/usr/bin/time").exists();
    let binary = std::env::var("BACKFORTH_BIN").unwrap_or(env!("CARGO_BIN_EXE_backforth").into());
    let mut cmd = if time {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%U %S %M", "-o", report.to_str().unwrap()])
            .arg(binary);
        c
    } else {
        Command::new(binary)
    };
    let started = Instant::now();
    let status = cmd
        .args(["run", job.to_str().unwrap(), "--output"])
        .arg(out)
        .args(extra)
        .env("BACKFORTH_LOG", "error")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(status.success());
    let mut requests = 0;
    let mut service = 0.0;
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut spans = Vec::new();
    for server in servers {
        for e in server.state.log.lock().unwrap().drain(..) {
            spans.push((e.started - started, e.finished - started));
            requests += 1;
            service += (e.finished - e.started).as_secs_f64();
            first = Some(first.map_or(e.started, |f| f.min(e.started)));
            last = Some(last.map_or(e.finished, |l| l.max(e.finished)));
        }
    }
    if std::env::var("TIMELINE").is_ok() {
        print_timeline(&spans, wall);
    }
    let lead = first.map_or(wall, |f| (f - started).as_secs_f64());
    let trail = last.map_or(0.0, |l| wall - (l - started).as_secs_f64());
    let (cpu, rss_mib) = if time {
        let t = std::fs::read_to_string(&report).unwrap();
        let v: Vec<f64> = t
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        (Some(v[0] + v[1]), Some(v[2] / 1024.0))
    } else {
        (None, None)
    };
    Measured {
        wall,
        lead,
        trail,
        requests,
        service,
        cpu,
        rss_mib,
    }
}

/// Requests in flight on average over each second of the job (`TIMELINE=1`).
fn print_timeline(spans: &[(Duration, Duration)], wall: f64) {
    let seconds = wall.ceil() as usize;
    let mut busy = vec![0.0f64; seconds + 1];
    for (from, to) in spans {
        let (mut t, end) = (from.as_secs_f64(), to.as_secs_f64());
        while t < end {
            let second = t.floor();
            let upto = end.min(second + 1.0);
            busy[second as usize] += upto - t;
            t = upto;
        }
    }
    let line: Vec<String> = busy.iter().map(|b| format!("{b:.0}")).collect();
    println!("in flight per second: {}", line.join(" "));
}

fn servers(n: usize, base: Duration, per_token: Duration) -> Vec<FakeServer> {
    (0..n)
        .map(|_| {
            FakeServer::start_with(FakeState {
                latency: base,
                per_token,
                ..FakeState::default()
            })
        })
        .collect()
}

fn resources(m: &Measured) -> String {
    match (m.cpu, m.rss_mib) {
        (Some(cpu), Some(rss)) => format!(
            "client CPU {:.0} us/request, peak RSS {rss:.0} MiB",
            1e6 * cpu / m.requests as f64
        ),
        _ => "client CPU and RSS: /usr/bin/time not found".to_string(),
    }
}

fn main() {
    let files = var("FILES", 20) as usize;
    let docs = var("DOCS", 1000) as usize;
    let dir = tempfile::tempdir().unwrap();
    let input = write_corpus(dir.path(), files, docs);
    let small_files = var("MEMORY_FILES", 20) as usize;
    let memory_docs = var("MEMORY_DOCS", 1000) as usize;
    let small = write_corpus(dir.path(), small_files, memory_docs);
    let large = write_corpus(dir.path(), 10 * small_files, memory_docs);
    let only = std::env::var("ONLY").unwrap_or_default();
    let runs = |kind: &str| only.is_empty() || only == kind;
    println!("BaF job over {files} files x {docs} documents");
    if runs("schedule") {
        schedule(dir.path(), &input);
    }
    for (slots, base_ms) in [(256usize, 200u64), (1024, 1000)] {
        if !runs("busy") {
            break;
        }
        if var("SLOTS", slots as u64) != slots as u64 {
            continue;
        }
        let servers = servers(1, Duration::from_millis(base_ms), Duration::from_millis(2));
        let m = run_job(dir.path(), &input, &servers, slots);
        println!(
            "busy     slots {slots:>5}, {base_ms} ms + 2 ms/token: {:.1}s (first call at {:.1}s, exit {:.1}s after the last reply), {} requests, server busy {:.1}%, {}",
            m.wall,
            m.lead,
            m.trail,
            m.requests,
            100.0 * m.service / (slots as f64 * m.wall),
            resources(&m)
        );
    }
    // Memory follows the slots, not the corpus: the same files, ten times as many, against a
    // quick server.
    // One pair's ratio moves by ten points from run to run (the peak is the highest of the
    // job's spikes): MEMORY_RUNS pairs give the median.
    let quick = servers(1, Duration::from_millis(20), Duration::from_micros(200));
    let mut ratios = Vec::new();
    for _ in 0..var("MEMORY_RUNS", 1) {
        let mut peaks = Vec::new();
        for (scale, input) in [(1, &small), (10, &large)] {
            if !runs("memory") {
                break;
            }
            let m = run_job(dir.path(), input, &quick, 256);
            println!(
                "memory   slots   256, 20 ms + 0.2 ms/token, {:>3} files x {memory_docs} documents ({scale:>2}x): {:.1}s, {} requests, {}",
                small_files * scale,
                m.wall,
                m.requests,
                resources(&m)
            );
            peaks.extend(m.rss_mib);
        }
        if let [one, ten] = peaks[..] {
            ratios.push(ten / one - 1.0);
        }
    }
    if ratios.len() > 1 {
        ratios.sort_by(f64::total_cmp);
        let shown: Vec<String> = ratios
            .iter()
            .map(|r| format!("{:+.1}%", 100.0 * r))
            .collect();
        println!(
            "memory   10x over 1x peak RSS, median of {}: {:+.1}% ({})",
            ratios.len(),
            100.0 * ratios[ratios.len() / 2],
            shown.join(", ")
        );
    }
    for replicas in [1usize, 4] {
        if !runs("ceiling") {
            break;
        }
        let servers = servers(replicas, Duration::ZERO, Duration::ZERO);
        let m = run_job(dir.path(), &input, &servers, 256);
        println!(
            "ceiling  {replicas} endpoint(s) x 256 slots, answering at once: {:.1}s, {} requests, {:.0} requests/s, {}",
            m.wall,
            m.requests,
            m.requests as f64 / m.wall,
            resources(&m)
        );
    }
}

/// One process doing the whole job against four workers run one after another on a fresh
/// root: the first finds everything to do, the later ones nothing left.
fn schedule(dir: &Path, input: &Path) {
    let servers = servers(1, Duration::from_millis(200), Duration::from_millis(2));
    let one = run_job(dir, input, &servers, 256);
    let out = dir.join("out-schedule");
    let _ = std::fs::remove_dir_all(&out);
    let walls: Vec<f64> = (0..4)
        .map(|i| {
            let worker = format!("{i}/4");
            run_on(dir, input, &servers, 256, &out, &["--worker", &worker]).wall
        })
        .collect();
    let total: f64 = walls.iter().sum();
    let shown: Vec<String> = walls.iter().map(|w| format!("{w:.1}")).collect();
    println!(
        "schedule slots   256, 200 ms + 2 ms/token: one process {:.1}s; four workers one after another {total:.1}s ({} s each), {:.2}x",
        one.wall,
        shown.join(" + "),
        total / one.wall
    );
}
