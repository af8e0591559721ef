//! Kill the binary at random moments, rerun to completion: the output equals an uninterrupted
//! run's, row for row, and no completed LLM call is paid for twice.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth, backforth_ok, rows, session};

const DOCS: usize = 300;
const CAP: usize = 8;

/// Writes `docs.jsonl` and `job.toml` (shards of 25 rows) into `dir`.
pub fn corpus(dir: &Path) {
    let topics = [
        "rivers",
        "bridges",
        "orchards",
        "lanterns",
        "harbours",
        "markets",
        "gardens",
        "compasses",
    ];
    let docs: String = (0..DOCS)
        .map(|i| {
            let text = format!(
                "Notes on {} number {i}. This page explains how {} are built and kept, with {} details that differ for every page in the set.",
                topics[i % topics.len()],
                topics[(i / 8) % topics.len()],
                i * 7 + 3
            );
            serde_json::json!({"id": format!("doc-{i:04}"), "text": text}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs).unwrap();
    std::fs::write(
        dir.join("job.toml"),
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[curate]\nthreshold = 4\n[execution]\nshard_rows = 25\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n[[stages]]\nname = \"scored\"\n\
         [[stages]]\nname = \"curated\"\n[[stages]]\nname = \"rewritten\"\n[[stages]]\nname = \"distilled\"\n",
    )
    .unwrap();
}

fn args<'a>(job: &'a str, output: &'a str, url: &'a str, cap: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        job,
        "--output",
        output,
        "--endpoint",
        url,
        "--model",
        "m",
        "--concurrency",
        cap,
    ]
}

/// Every stage's rows (deterministic columns only) and its drops, sorted by id.
pub fn snapshot(root: &Path) -> Vec<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = session(root).await;
        let mut all = Vec::new();
        for sql in [
            "SELECT 'candidates', id, text FROM candidates",
            "SELECT 'candidates x', id, drop_reason FROM candidates_dropped",
            "SELECT 'backtranslated', id, instruction FROM backtranslated",
            "SELECT 'scored', id, concat(CAST(score AS VARCHAR), '/', score_reason) FROM scored",
            "SELECT 'curated', id, CAST(score AS VARCHAR) FROM curated",
            "SELECT 'curated x', id, drop_reason FROM curated_dropped",
            "SELECT 'rewritten', id, response FROM rewritten",
            "SELECT 'rewritten x', id, drop_reason FROM rewritten_dropped",
            "SELECT 'distilled', id, response FROM distilled",
        ] {
            let mut got = rows(&ctx, &format!("{sql} ORDER BY 2")).await;
            all.append(&mut got);
        }
        all
    })
}

#[test]
fn sigkill_at_random_moments_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let job = dir.path().join("job.toml");
    let job = job.to_str().unwrap();
    let cap = CAP.to_string();

    // The reference: one uninterrupted run.
    let reference_server = FakeServer::start(Duration::from_millis(15));
    let reference_root = dir.path().join("reference");
    let started = Instant::now();
    backforth_ok(&args(
        job,
        reference_root.to_str().unwrap(),
        &reference_server.url(),
        &cap,
    ));
    let full = started.elapsed();
    let expected = snapshot(&reference_root);
    assert!(
        expected.len() > DOCS * 3,
        "a run of substance: {} rows",
        expected.len()
    );

    // The same job, killed again and again, then finished.
    let server = FakeServer::start(Duration::from_millis(15));
    let root = dir.path().join("killed");
    let url = server.url();
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    // Later runs have less left to do (the journal answers what earlier ones got), so kill
    // early in each run, and keep going until a few runs were really cut short.
    for _ in 0..12 {
        if kills == 5 {
            break;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(args(job, root.to_str().unwrap(), &url, &cap))
            .env("BACKFORTH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(0.05 + 0.3 * rng.f64());
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    backforth_ok(&args(job, root.to_str().unwrap(), &url, &cap));
    assert!(
        kills >= 3,
        "seed {seed}: the runs were killed ({kills} times)"
    );

    let got = snapshot(&root);
    assert_eq!(got.len(), expected.len(), "seed {seed}");
    assert_eq!(
        got, expected,
        "seed {seed}: output differs from the uninterrupted run"
    );

    // Prompts answered before a kill are not paid again: only those in flight at a kill.
    let repeats: u64 = server
        .state
        .per_prompt
        .lock()
        .unwrap()
        .values()
        .map(|n| n - 1)
        .sum();
    assert!(
        repeats <= (CAP * kills) as u64,
        "seed {seed}: {repeats} repeated requests after {kills} kills with {CAP} in flight"
    );
    eprintln!("seed {seed}: {kills} kills, {repeats} repeated requests (cap {CAP} per kill)");
}

#[test]
fn failed_rows_are_dead_lettered_counted_and_retried_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let job = dir.path().join("job.toml");
    let mut text = std::fs::read_to_string(&job).unwrap();
    for role in ["backward", "scorer", "rewriter"] {
        text.push_str(&format!(
            "[models.{role}]\nendpoint = \"mock\"\nmodel = \"m\"\nmax_attempts = 2\n"
        ));
    }
    std::fs::write(&job, text).unwrap();
    let job = job.to_str().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    // Two documents' backtranslation prompts always fail.
    *server.state.fail_if_contains.lock().unwrap() = Some(" number 17. ".into());
    let root = dir.path().join("out");
    let url = server.url();
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args(job, root.to_str().unwrap(), &url, "8"))
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 row(s) lost their LLM call"), "{stderr}");
    let m = crate::support::util::marker(&root, "backtranslated");
    assert_eq!(m["dropped"]["llm_error"], 1, "{m}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dead = rt.block_on(async {
        let ctx = session(&root).await;
        rows(&ctx, "SELECT doc_id, backtranslation['attempts'], backtranslation['error'] FROM backtranslated_dropped WHERE drop_reason = 'llm_error'").await
    });
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0][0], "doc-0017");
    assert_eq!(dead[0][1], "2");
    assert!(dead[0][2].contains("HTTP 500"), "{dead:?}");

    // The server recovers: a rerun asks again only for the failed row (and what follows it).
    *server.state.fail_if_contains.lock().unwrap() = None;
    let before = server.requests();
    backforth_ok(&args(job, root.to_str().unwrap(), &url, "8"));
    let m = crate::support::util::marker(&root, "backtranslated");
    assert!(m["dropped"].get("llm_error").is_none(), "{m}");
    assert_eq!(m["rows_out"], DOCS);
    let new_requests = server.requests() - before;
    // One backtranslation, its score, and at most its rewrite and answer.
    assert!(
        (2..=4).contains(&new_requests),
        "{new_requests} requests on rerun"
    );
}

/// A scoring call that fails after every retry is kept with `score_reason = 'llm_error'` (and
/// dropped by `curated` as `no_score:llm_error`): the run still exits 1 and counts it, and a
/// rerun asks for that score again. (Found against llama.cpp's server, whose 400s for prompts
/// over the context ended the run with exit 0 and were never retried.)
#[test]
fn a_failed_score_counts_and_is_retried_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let job = dir.path().join("job.toml");
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str("[models.scorer]\nendpoint = \"mock\"\nmodel = \"m\"\nmax_attempts = 2\n");
    std::fs::write(&job, text).unwrap();
    let job = job.to_str().unwrap();
    let server = FakeServer::start(Duration::from_millis(1));
    let root = dir.path().join("out");
    let url = server.url();
    backforth_ok(&{
        let mut run = args(job, root.to_str().unwrap(), &url, "8");
        run.extend(["--stages", "prepare,backtranslate"]);
        run
    });
    // Every scoring prompt of one document fails: its instruction names it.
    *server.state.fail_if_contains.lock().unwrap() = Some(" number 17. ".into());
    let out = backforth(&args(job, root.to_str().unwrap(), &url, "8"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 row(s) lost their LLM call"), "{stderr}");
    let curated = crate::support::util::marker(&root, "curated");
    assert_eq!(curated["dropped"]["no_score:llm_error"], 1, "{curated}");

    *server.state.fail_if_contains.lock().unwrap() = None;
    let before = server.requests();
    backforth_ok(&args(job, root.to_str().unwrap(), &url, "8"));
    let curated = crate::support::util::marker(&root, "curated");
    assert!(
        curated["dropped"].get("no_score:llm_error").is_none(),
        "{curated}"
    );
    let again = server.requests() - before;
    // The score again, and at most its rewrite and answer.
    assert!((1..=3).contains(&again), "{again} requests on rerun");
}

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let job = dir.path().join("job.toml");
    let server = FakeServer::start(Duration::from_millis(40));
    let url = server.url();
    let root = dir.path().join("out");
    let mut run = args(job.to_str().unwrap(), root.to_str().unwrap(), &url, "8");
    run.extend(["--stages", "prepare,backtranslate"]);
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(run)
        .env("BACKFORTH_LOG", "info")
        .env("BACKFORTH_PROGRESS_SECS", "0.3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("backtranslated: shards "))
        .unwrap_or_else(|| panic!("no progress line in\n{stderr}"));
    for part in [
        "rows ",
        " calls open",
        " req/s",
        " tokens",
        " errors",
        " elapsed",
    ] {
        assert!(line.contains(part), "{line}");
    }
    assert!(!stderr.contains('\r'), "no terminal redraws in a log");
}
