//! Keeping the server full: a stage of N rows against a server of fixed latency L with C
//! slots takes about N·L/C; later stages fill the slots a slow reply leaves idle; identical
//! prompts in flight are sent once; every LLM stage's plan uses the row window.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::fake_server::{FakeServer, Fault};
use crate::support::util::{backforth_ok, marker};

/// `n` JSONL documents, no two alike.
fn distinct_docs(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"id": format!("d{i}"), "text": format!("Document number {i} says something distinct about topic {}.", i * 31)})
                .to_string()
                + "\n"
        })
        .collect()
}

/// `files` JSONL files of `docs` documents under `dir/in/`, document `d` of file `f` saying
/// `text(f, d)`.
fn write_files(
    dir: &std::path::Path,
    files: usize,
    docs: usize,
    text: impl Fn(usize, usize) -> String,
) {
    std::fs::create_dir(dir.join("in")).unwrap();
    for f in 0..files {
        let lines: String = (0..docs)
            .map(|d| {
                serde_json::json!({"id": format!("f{f}d{d}"), "text": text(f, d)}).to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(dir.join(format!("in/{f:02}.jsonl")), lines).unwrap();
    }
}

#[test]
fn llm_stage_keeps_every_slot_busy() {
    const N: usize = 150;
    const C: usize = 8;
    const L: Duration = Duration::from_millis(100);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("docs.jsonl"), distinct_docs(N)).unwrap();
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

/// One reply far slower than the rest, early in the job: run as one, the job's later stages
/// fill the slots the slow reply's stage leaves idle, so it ends close to what the server
/// needs (its service time over the slots, or the slow reply's chain). Run stage by stage —
/// a barrier between stages, as a batch or shard barrier would also be — the same job misses
/// that bound: the slots idle behind the slow reply.
#[test]
fn later_stages_fill_the_slots_behind_a_slow_reply() {
    const C: usize = 4;
    const L: Duration = Duration::from_millis(20);
    const SLOW: Duration = Duration::from_millis(2500);
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), 15, 10, |f, d| {
        // The bt prompt of the first document quotes it after "Text:".
        let lead = if (f, d) == (0, 0) { "SLOWDOC " } else { "" };
        format!(
            "{lead}Page {d} of file {f} describes topic {} in its own words.",
            f * 10 + d
        )
    });
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"in/\"]\n".to_string()
            + &crate::pipeline::STAGES
                .map(|s| format!("[[stages]]\nname = \"{s}\"\n"))
                .concat(),
    )
    .unwrap();
    let server = FakeServer::start(L);
    let c = C.to_string();
    let run = |root: &str, stages: &str| {
        let url = server.url();
        backforth_ok(&[
            "run",
            job.to_str().unwrap(),
            "--output",
            root,
            "--endpoint",
            &url,
            "--model",
            "m",
            "--concurrency",
            &c,
            "--stages",
            stages,
        ]);
    };
    let slow_once = || {
        *server.state.faults.lock().unwrap() =
            vec![("Text:\nSLOWDOC".to_string(), [Fault::Slow(SLOW)].into())];
        server.state.log.lock().unwrap().clear();
    };
    // How long the server was busy from its first request to its last reply, and the bound:
    // its service time over the slots (the slow reply included), or the slow reply and the
    // three stages after it, whichever is longer; a fifth and 0.4 s more for shard start-up.
    let measure = || {
        let log = server.log();
        let first = log.iter().map(|e| e.started).min().unwrap();
        let last = log.iter().map(|e| e.finished).max().unwrap();
        let service: Duration = log.iter().map(|e| e.finished - e.started).sum::<Duration>() + SLOW;
        let ideal = (service / C as u32).max(SLOW + 3 * L);
        (
            last - first,
            ideal.mul_f64(1.2) + Duration::from_millis(400),
        )
    };
    let llm_stages = "backtranslated,scored,curated,rewritten,distilled";

    let together = dir.path().join("together");
    run(together.to_str().unwrap(), "candidates");
    slow_once();
    run(together.to_str().unwrap(), llm_stages);
    let (span, bound) = measure();
    eprintln!("run as one: {span:?} (bound {bound:?})");

    let apart = dir.path().join("apart");
    run(apart.to_str().unwrap(), "candidates");
    slow_once();
    for stage in llm_stages.split(',') {
        run(apart.to_str().unwrap(), stage);
    }
    let (barrier, barrier_bound) = measure();
    eprintln!("stage by stage: {barrier:?} (bound {barrier_bound:?})");

    assert!(
        span <= bound,
        "{span:?} from first request to last reply; bound {bound:?}"
    );
    assert!(
        barrier > barrier_bound,
        "stage by stage took {barrier:?}, within {barrier_bound:?}: the test cannot tell a barrier"
    );
}

/// Rows asking the very same thing at the same time cost one request: the others wait for
/// it in flight (and later rows find its answer in the journal).
#[test]
fn identical_prompts_in_flight_are_sent_once() {
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("docs.jsonl"), distinct_docs(N)).unwrap();
    // Every row's prompt is the same text, built from the row so nothing folds it away.
    std::fs::write(
        dir.path().join("same.sql"),
        "SELECT id, backtranslate(substr(text, 1, 0) || 'One text that every row asks about.') AS call FROM candidates",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n[[stages]]\nname = \"candidates\"\n\
         [[stages]]\nname = \"same\"\nsql = \"same.sql\"\n",
    )
    .unwrap();
    let server = FakeServer::start(Duration::from_millis(300));
    backforth_ok(&[
        "run",
        job.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--model",
        "m",
        "--concurrency",
        "8",
    ]);
    assert_eq!(
        server.requests(),
        1,
        "{} requests for one prompt",
        server.requests()
    );
    let done = marker(&dir.path().join("out"), "same");
    assert_eq!(done["rows_out"], N);
    let shared = done["llm"]["shared"].as_u64().unwrap();
    assert!(
        shared >= 8,
        "{shared} rows joined the request in flight (the others read the journal)"
    );
}

/// Every LLM stage runs its calls through the row window: the physical plans the run logs
/// (at debug level) call each built-in LLM function under `LlmWindowExec`, and none under
/// DataFusion's batch-at-a-time `AsyncFuncExec`, and no round-robin repartition, whose
/// coalescing would hold every answered row of a shard until its last reply.
#[test]
fn every_llm_stage_plans_its_calls_in_the_row_window() {
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(1));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args([
            "run",
            dir.path().join("job.toml").to_str().unwrap(),
            "--endpoint",
            &server.url(),
            "--model",
            "m",
        ])
        .env("BACKFORTH_LOG", "backforth=debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let plans: Vec<&str> = log.split("Physical plan.").skip(1).collect();
    assert!(!plans.is_empty(), "no plan logged:\n{log}");
    for plan in &plans {
        assert!(!plan.contains("AsyncFuncExec"), "{plan}");
        assert!(!plan.contains("RoundRobinBatch"), "{plan}");
    }
    for function in ["backtranslate(", "score_pair(", "rewrite(", "answer("] {
        assert!(
            plans
                .iter()
                .any(|p| p.contains(function) && p.contains("LlmWindowExec")),
            "no plan calls {function}..) in LlmWindowExec"
        );
    }
}

/// Shards started together share each role's rows: however many are under way, no more calls
/// are open (rendered, waiting for a slot or on the wire) than twice the role's slots, so the
/// memory of a job's prompts follows the slots, not the shards. Eight shards of one window
/// each would open four times that.
#[test]
fn shards_started_together_share_the_roles_rows() {
    const C: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), 8, 20, |f, d| {
        format!(
            "Page {d} of file {f} tells its own story number {}.",
            f * 20 + d
        )
    });
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"in/\"]\n[execution]\nconcurrent_shards = 8\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n",
    )
    .unwrap();
    let server = FakeServer::start(Duration::from_millis(30));
    let url = server.url();
    let c = C.to_string();
    let args = [
        "run",
        job.to_str().unwrap(),
        "--endpoint",
        &url,
        "--model",
        "m",
        "--concurrency",
        &c,
    ];
    backforth_ok(&[&args[..], &["--stages", "prepare"]].concat());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args([&args[..], &["--stages", "backtranslate"]].concat())
        .env("BACKFORTH_LOG", "info")
        .env("BACKFORTH_PROGRESS_SECS", "0.1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let open: Vec<usize> = stderr
        .lines()
        .filter(|l| l.contains("backtranslated: shards "))
        .filter_map(|l| {
            let before = &l[..l.find(" calls open")?];
            before.rsplit(' ').next()?.parse().ok()
        })
        .collect();
    let most = open.iter().copied().max().unwrap_or(0);
    eprintln!("calls open per progress line: {open:?}");
    assert!(
        open.len() >= 5,
        "too few progress lines to judge: {open:?}\n{stderr}"
    );
    assert!(
        most <= 2 * C,
        "{most} calls open at once with {C} slots: the shards did not share the role's rows"
    );
    assert!(
        most > C,
        "never more calls open ({most}) than slots ({C}): no row was ready for a freed slot"
    );
    assert_eq!(
        marker(&dir.path().join("out"), "backtranslated")["rows_out"],
        160
    );
}
