//! The run manifest, and workers sharing one output root.

use std::process::Command;
use std::time::Duration;

use crate::crash::{corpus, snapshot};
use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth, backforth_ok, marker};
use backforth::run::worker::Worker;

fn run_args<'a>(job: &'a str, root: &'a str, url: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        job,
        "--output",
        root,
        "--endpoint",
        url,
        "--model",
        "m",
        "--concurrency",
        "8",
    ]
}

#[test]
fn a_changed_prompt_is_refused_then_recomputed_reusing_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(1));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let root = dir.path().join("out");
    let (job_s, root_s) = (job.to_str().unwrap(), root.to_str().unwrap());
    backforth_ok(&run_args(job_s, root_s, &url));
    let first = server.requests();
    let rewrites = marker(&root, "curated")["rows_out"].as_u64().unwrap();

    // Same job again: everything is complete, nothing is sent.
    backforth_ok(&run_args(job_s, root_s, &url));
    assert_eq!(server.requests(), first);

    // A new rewrite prompt changes `rewritten` (and nothing before it).
    std::fs::write(
        dir.path().join("rewrite.txt"),
        "Improve the draft into an answer to the question, between [RES] and [/RES].\nQuestion:\n{{ instruction }}\n\nDraft response:\n{{ draft }}\n",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str("[functions.rewrite]\ntemplate = \"rewrite.txt\"\n");
    std::fs::write(&job, text).unwrap();
    let out = backforth(&run_args(job_s, root_s, &url));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rewritten (prompt of rewrite)"), "{stderr}");
    assert!(!stderr.contains("scored ("), "{stderr}");
    assert!(stderr.contains("--allow-changes"), "{stderr}");
    assert_eq!(server.requests(), first);

    let mut args = run_args(job_s, root_s, &url);
    args.push("--allow-changes");
    backforth_ok(&args);
    // Only the rewrites were asked again; every other answer came from the journal or was kept.
    assert_eq!(server.requests(), first + rewrites);
    assert!(
        server
            .log()
            .iter()
            .rev()
            .take(rewrites as usize)
            .all(|e| e.prompt.starts_with("Improve the draft"))
    );
}

#[test]
fn two_workers_share_the_shards_and_produce_one_output() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(2));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let job_s = job.to_str().unwrap();

    let reference = dir.path().join("reference");
    backforth_ok(&run_args(job_s, reference.to_str().unwrap(), &url));
    let expected = snapshot(&reference);

    let root = dir.path().join("shared");
    let spawn = |worker: &str, env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(run_args(job_s, root.to_str().unwrap(), &url))
            .args(["--worker", worker])
            .envs(env.iter().copied())
            .env("BACKFORTH_LOG", "warn")
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("0/2", &[]));
        let b = s.spawn(|| spawn("1/2", &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(snapshot(&root), expected);
    let shards = marker(&root, "scored")["shards"].as_array().unwrap().len();
    assert_eq!(shards, 12);
}

#[test]
fn workers_come_from_flags_and_schedulers() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let w = |index, count| Worker { index, count };
    assert_eq!(
        Worker::detect(Some("2/5"), None, env(&[])).unwrap(),
        w(2, 5)
    );
    assert!(Worker::detect(Some("5/5"), None, env(&[])).is_err());
    assert_eq!(Worker::detect(None, None, env(&[])).unwrap(), w(0, 1));
    assert_eq!(
        Worker::detect(
            None,
            None,
            env(&[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_COUNT", "8")
            ])
        )
        .unwrap(),
        w(3, 8)
    );
    // Arrays numbered 1..=4 give workers 0..4.
    assert_eq!(
        Worker::detect(
            None,
            None,
            env(&[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "4")
            ])
        )
        .unwrap(),
        w(0, 4)
    );
    assert_eq!(
        Worker::detect(None, Some(4), env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap(),
        w(2, 4)
    );
    assert_eq!(
        Worker::detect(
            None,
            None,
            env(&[("JOB_COMPLETION_INDEX", "1"), ("BACKFORTH_WORKERS", "3")])
        )
        .unwrap(),
        w(1, 3)
    );
    let err = Worker::detect(None, None, env(&[("JOB_COMPLETION_INDEX", "1")])).unwrap_err();
    assert!(err.to_string().contains("--workers"), "{err}");
    assert_eq!(
        Worker::detect(None, Some(2), env(&[("AWS_BATCH_JOB_ARRAY_INDEX", "1")])).unwrap(),
        w(1, 2)
    );
    assert!(Worker::detect(None, Some(2), env(&[("AWS_BATCH_JOB_ARRAY_INDEX", "2")])).is_err());
}
