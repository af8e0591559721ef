//! Any schedule, same result: workers started one at a time, in reverse, two by two, all at
//! once with some killed and restarted, an extra `--worker 0/1` among them, or in separate PID
//! namespaces give the output of one uninterrupted run, and pay for each call once (plus at
//! most what was in flight when a process was killed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::crash::{corpus, snapshot};
use crate::support::fake_server::FakeServer;

/// The corpus in four input files, a reference run over it, and a server that counts.
struct Fixture {
    dir: tempfile::TempDir,
    server: FakeServer,
    job: PathBuf,
    expected: Vec<Vec<String>>,
    /// Requests one uninterrupted run sends.
    requests: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        corpus(dir.path());
        let docs = std::fs::read_to_string(dir.path().join("docs.jsonl")).unwrap();
        let lines: Vec<&str> = docs.lines().collect();
        std::fs::create_dir(dir.path().join("docs")).unwrap();
        for (k, chunk) in lines.chunks(lines.len().div_ceil(4)).enumerate() {
            let file = dir.path().join(format!("docs/part-{k}.jsonl"));
            std::fs::write(file, chunk.join("\n") + "\n").unwrap();
        }
        let job = dir.path().join("job.toml");
        let text = std::fs::read_to_string(&job)
            .unwrap()
            .replace("paths = [\"docs.jsonl\"]", "paths = [\"docs\"]");
        std::fs::write(&job, text).unwrap();
        let server = FakeServer::start(Duration::from_millis(2));
        let mut fixture = Fixture {
            dir,
            server,
            job,
            expected: Vec::new(),
            requests: 0,
        };
        let reference = fixture.root("reference");
        succeeded(&fixture.worker(&reference, "0/1").output().unwrap());
        fixture.expected = snapshot(&reference);
        fixture.requests = fixture.server.requests();
        fixture
    }

    fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A run of worker `spec` (`I/N`) on `root`.
    fn worker(&self, root: &Path, spec: &str) -> Command {
        self.worker_in(root, spec, &[])
    }

    /// [`Fixture::worker`], started by the program `wrapper` (with its arguments) when given.
    fn worker_in(&self, root: &Path, spec: &str, wrapper: &[&str]) -> Command {
        let bin = env!("CARGO_BIN_EXE_backforth");
        let mut cmd = match wrapper {
            [] => Command::new(bin),
            [program, args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin);
                cmd
            }
        };
        cmd.args(["run", self.job.to_str().unwrap(), "--output"])
            .arg(root)
            .args(["--endpoint", &self.server.url(), "--model", "m"])
            .args(["--concurrency", "8", "--worker", spec])
            .env("BACKFORTH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Checks `root` against the reference run's output.
    fn same_output(&self, root: &Path) {
        assert_eq!(snapshot(root), self.expected, "{}", root.display());
    }

    /// Four workers started together on `root`, once they have sent a `1/part` of the job's
    /// requests (counted from `before`).
    fn four_under_way(&self, root: &Path, before: u64, part: u64) -> Vec<Child> {
        let children = (0..4)
            .map(|i| self.worker(root, &format!("{i}/4")).spawn().unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sent_since(before) < self.requests / part && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        children
    }

    /// Requests sent since `before`.
    fn sent_since(&self, before: u64) -> u64 {
        self.server.requests() - before
    }
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait(child: Child) {
    succeeded(&child.wait_with_output().unwrap());
}

/// Workers run one after another, the way a throttled array runs them: the first does the
/// whole job, the later ones find nothing left and send nothing; in reverse order the same.
#[test]
fn four_workers_one_at_a_time_in_order_and_in_reverse() {
    let f = Fixture::new();
    for (name, order) in [("in-order", [0, 1, 2, 3]), ("reverse", [3, 2, 1, 0])] {
        let root = f.root(name);
        let before = f.server.requests();
        for (n, i) in order.into_iter().enumerate() {
            let started = Instant::now();
            let out = f.worker(&root, &format!("{i}/4")).output().unwrap();
            succeeded(&out);
            if n == 0 {
                assert_eq!(
                    f.sent_since(before),
                    f.requests,
                    "{name}: worker {i} did it all"
                );
            } else {
                assert_eq!(
                    f.sent_since(before),
                    f.requests,
                    "{name}: worker {i} sent nothing"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{name}: worker {i} found nothing left and stopped"
                );
            }
        }
        f.same_output(&root);
    }
}

/// Two workers at a time, then the other two.
#[test]
fn four_workers_two_at_a_time() {
    let f = Fixture::new();
    let root = f.root("pairs");
    let before = f.server.requests();
    for pair in [["0/4", "1/4"], ["2/4", "3/4"]] {
        let children: Vec<Child> = pair
            .iter()
            .map(|w| f.worker(&root, w).spawn().unwrap())
            .collect();
        children.into_iter().for_each(wait);
    }
    assert_eq!(f.sent_since(before), f.requests);
    f.same_output(&root);
}

/// Four workers at once; two are killed mid-run and started again. Only what the killed
/// processes had in flight is asked again (each holds at most 2 of the 8 slots).
#[test]
fn four_workers_at_once_with_two_killed_and_restarted() {
    let f = Fixture::new();
    let root = f.root("killed");
    let before = f.server.requests();
    let mut children = f.four_under_way(&root, before, 3);
    for i in [1, 2] {
        children[i].kill().unwrap();
        children[i].wait().unwrap();
    }
    for i in [1, 2] {
        children[i] = f.worker(&root, &format!("{i}/4")).spawn().unwrap();
    }
    children.into_iter().for_each(wait);
    let sent = f.sent_since(before);
    assert!(
        sent >= f.requests && sent <= f.requests + 4,
        "{sent} requests for a job of {}",
        f.requests
    );
    f.same_output(&root);
}

/// A `--worker 0/1` run started while four workers run takes what is left beside them.
#[test]
fn a_lone_run_started_while_four_workers_run() {
    let f = Fixture::new();
    let root = f.root("joined");
    let before = f.server.requests();
    let mut children = f.four_under_way(&root, before, 4);
    children.push(f.worker(&root, "0/1").spawn().unwrap());
    children.into_iter().for_each(wait);
    assert_eq!(f.sent_since(before), f.requests);
    f.same_output(&root);
}

/// Two processes on one host name, each PID 1 of its own PID namespace, run side by side:
/// neither takes the other's claims for a dead process's.
#[test]
fn two_processes_in_separate_pid_namespaces() {
    let f = Fixture::new();
    let root = f.root("namespaces");
    let before = f.server.requests();
    let unshare = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        "echo pid $$; exec \"$0\" \"$@\"",
    ];
    let children: Vec<Child> = ["0/2", "1/2"]
        .iter()
        .map(|w| f.worker_in(&root, w, &unshare).spawn().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        succeeded(&out);
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("pid 1\n"));
    }
    assert_eq!(f.sent_since(before), f.requests);
    f.same_output(&root);
}

/// A row whose call keeps failing is tried by the process that runs its shard, once, not
/// again by every process running beside it: four workers at once send exactly what one
/// process sends, all four exit 1, and the next run retries the row.
#[test]
fn failed_rows_are_retried_by_the_next_run_not_by_every_worker() {
    let f = Fixture::new();
    *f.server.state.fail_if_contains.lock().unwrap() = Some(" number 17. ".into());
    let alone = f.root("alone");
    let before = f.server.requests();
    let out = f.worker(&alone, "0/1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let one_process = f.sent_since(before);

    let root = f.root("failing");
    let before = f.server.requests();
    let children: Vec<Child> = (0..4)
        .map(|i| f.worker(&root, &format!("{i}/4")).spawn().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(f.sent_since(before), one_process);

    *f.server.state.fail_if_contains.lock().unwrap() = None;
    succeeded(&f.worker(&root, "2/4").output().unwrap());
    f.same_output(&root);
}
