//! The run manifest, and workers sharing one output root.

use std::process::Command;
use std::time::Duration;

use crate::crash::{corpus, snapshot};
use crate::support::fake_server::FakeServer;
use crate::support::util::{backforth, backforth_ok, marker, run_workers};
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

/// `--allow-changes` with three workers started together: each changed shard is recomputed
/// once, by its owner, and no worker deletes what another has already redone.
#[test]
fn allow_changes_with_three_workers_started_together_recomputes_once() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(2));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let job_s = job.to_str().unwrap();
    let root = dir.path().join("shared");
    backforth_ok(&run_args(job_s, root.to_str().unwrap(), &url));
    let rewrites = marker(&root, "curated")["rows_out"].as_u64().unwrap();

    std::fs::write(
        dir.path().join("rewrite.txt"),
        "Improve the draft into an answer to the question, between [RES] and [/RES].\nQuestion:\n{{ instruction }}\n\nDraft response:\n{{ draft }}\n",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str("[functions.rewrite]\ntemplate = \"rewrite.txt\"\n");
    std::fs::write(&job, text).unwrap();
    let reference = dir.path().join("reference");
    backforth_ok(&run_args(job_s, reference.to_str().unwrap(), &url));
    let before = server.requests();

    let mut args = run_args(job_s, root.to_str().unwrap(), &url);
    args.push("--allow-changes");
    let outs = run_workers(job_s, 3, &args[2..]);
    for out in &outs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(snapshot(&root), snapshot(&reference));
    // The reference run asked the new rewrites already; the shared root's are answered from
    // its own journal only for unchanged requests, so each new rewrite is sent once more.
    assert_eq!(server.requests(), before + rewrites);
}

/// A second run (not a worker of the same job) on a root in use is refused, told who holds it
/// and since when; once the first is done, or when its holder is a process that is gone, the
/// root can be used again.
#[test]
fn a_second_run_on_a_root_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(5));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let job_s = job.to_str().unwrap();
    let root = dir.path().join("out");
    let args = |concurrency: &'static str| {
        let mut args = run_args(job_s, root.to_str().unwrap(), &url);
        *args.last_mut().unwrap() = concurrency;
        args
    };
    let first = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args("1"))
        .env("BACKFORTH_LOG", "warn")
        .spawn()
        .unwrap();
    let lease = root.join("_leases/worker-0-of-1.json");
    while !lease.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = backforth(&args("8"));
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("is in use: worker 0/1 of job 'job' has run there since")
            && stderr.contains(&format!("(pid {})", first.id())),
        "{stderr}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    assert!(!lease.exists(), "released at the end");

    // A lease left by a process that is gone (same host, no such pid) is taken over.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    std::fs::write(
        &lease,
        serde_json::json!({"host": host.trim(), "pid": 4_000_000, "job": "job", "since": 1, "renewed": 1}).to_string(),
    )
    .unwrap();
    backforth_ok(&args("8"));
}

/// The journal follows the shards: a published shard's responses are one compacted object
/// under `_journal/<stage>/`, and a rerun that redoes one shard reads that shard's journal,
/// not the root's whole history, and pays for nothing again (also when a kill tore the last
/// line of a segment being appended to).
#[test]
fn the_journal_is_kept_per_shard_and_a_rerun_reads_only_what_it_redoes() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(1));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let root = dir.path().join("out");
    let args = run_args(job.to_str().unwrap(), root.to_str().unwrap(), &url);
    backforth_ok(&args);
    let sent = server.requests();
    let shards = marker(&root, "scored")["shards"].as_array().unwrap().len();
    let compacted = |stage: &str| -> (usize, usize) {
        let (mut files, mut segments) = (0, 0);
        for entry in std::fs::read_dir(root.join("_journal").join(stage)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                segments += std::fs::read_dir(&path).unwrap().count();
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                files += 1;
            }
        }
        (files, segments)
    };
    assert_eq!(compacted("backtranslated"), (shards, 0));
    assert_eq!(compacted("scored"), (shards, 0));

    // One shard of `scored` is redone (its marker gone): one compacted object is read.
    let victim = std::fs::read_dir(root.join("scored/_shards"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let shard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&victim).unwrap()).unwrap();
    let shard = shard["journal"].as_str().unwrap();
    std::fs::remove_file(&victim).unwrap();
    // Its responses as a segment a kill left with a torn last line: the whole lines answer.
    let journal = root.join("_journal/scored");
    let mut lines = std::fs::read(journal.join(format!("{shard}.jsonl"))).unwrap();
    std::fs::remove_file(journal.join(format!("{shard}.jsonl"))).unwrap();
    lines.extend_from_slice(br#"{"key":"0123","text":"torn"#);
    std::fs::create_dir_all(journal.join(shard)).unwrap();
    std::fs::write(journal.join(shard).join("killed-writer.jsonl"), lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(&args)
        .env("BACKFORTH_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let read: u64 = stderr
        .lines()
        .find(|l| l.contains("Journal objects read."))
        .and_then(|l| l.split("objects=").nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        read <= 3,
        "{read} journal objects read to redo one shard of {shards}"
    );
    assert_eq!(server.requests(), sent);
}

/// Liveness is the machine's boot and PID namespace, not the host name: the lease of another
/// container with this host name, renewed just now, is refused although its pid is no
/// process here; one of this machine and namespace whose pid now belongs to a process started
/// later is taken over at once; and of two processes taking over one lapsed lease at once,
/// one wins and the other is refused.
#[test]
fn leases_know_containers_and_one_process_takes_a_lapsed_one_over() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let server = FakeServer::start(Duration::from_millis(5));
    let url = server.url();
    let job = dir.path().join("job.toml");
    let root = dir.path().join("out");
    let args = || {
        let mut args = run_args(job.to_str().unwrap(), root.to_str().unwrap(), &url);
        *args.last_mut().unwrap() = "1";
        args
    };
    let lease = root.join("_leases/worker-0-of-1.json");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let write = |pid: u32, boot: &str, ns: &str, started: u64, renewed: u64| {
        let holder = serde_json::json!({
            "host": host.trim(), "pid": pid, "job": "job", "since": renewed, "renewed": renewed,
            "boot_id": boot.trim(), "pid_ns": ns, "started": started,
        });
        std::fs::write(&lease, holder.to_string()).unwrap();
    };

    // Another container on this machine, its process not one of this namespace's.
    write(4_000_000, &boot, "pid:[1]", 5, now);
    let refused = backforth(&args());
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is in use"));
    assert_eq!(server.requests(), 0);

    // This namespace, a pid that is now another process (this test's, started earlier).
    write(std::process::id(), &boot, &ns.to_string_lossy(), 1, now);
    let out = backforth(&args());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A lease from elsewhere that lapsed long ago, taken over by two processes at once (on
    // a new root, so the winner has a whole run to do while the other tries).
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    write(7, "another-machine", "pid:[9]", 3, 1);
    let takers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_backforth"))
                .args(args())
                .env("BACKFORTH_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = takers
        .into_iter()
        .map(|t| t.wait_with_output().unwrap())
        .collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    let in_use = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("is in use"))
        .count();
    assert_eq!((won, in_use), (1, 1), "{outs:?}");
}
