//! The object-store tests, written once and run on every emulator `.ci/run` installs: moto
//! (S3) and Azurite (Azure Blob). Each is a real server on loopback, reached through the same
//! object_store clients the tool uses. No GCS emulator reachable from this machine's registries
//! speaks the XML API that object_store's GCS client uses (see docs/testing.md).

mod azurite;
mod lossy;
mod moto;
mod s3rver;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::support::cutter::{Cut, Cutter};
use crate::support::fake_server::FakeServer;
use crate::support::util::{free_port, ok, tool};

/// An emulator's process on a free port of 127.0.0.1 with a data folder of its own, killed
/// when dropped.
struct Process {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    endpoint: String,
    _data: tempfile::TempDir,
}

impl Process {
    /// Starts the program `tool(env, installed, name)` with `args(port, data folder)` and
    /// waits until its port accepts connections; `install` says how to get it.
    fn start(
        (env, installed, name): (&str, &str, &str),
        args: impl FnOnce(&str, &str) -> Vec<String>,
        install: &str,
    ) -> Process {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(tool(env, installed, name))
            .args(args(&port.to_string(), data.path().to_str().unwrap()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name} ({e}); install it with `{install}` (as .ci/run does)")
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name} did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Process {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _data: data,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An object store emulator running on loopback.
pub trait Emulator: Sized {
    /// Starts the emulator with these buckets (containers) made.
    fn start(buckets: &[&str]) -> Self;
    /// The URL a user writes for `path` in `bucket`.
    fn url(&self, bucket: &str, path: &str) -> String;
    /// The environment that points the tool at this emulator with full rights.
    fn env(&self) -> Vec<(&'static str, String)>;
    /// An environment whose reads of the `denied` objects of `bucket` are refused (and
    /// anything else allowed, as far as the store's permissions can say).
    fn env_denied_reads(&self, bucket: &str, denied: &[&str]) -> Vec<(&'static str, String)>;
    /// Undoes whatever [`Emulator::env_denied_reads`] switched on server-side.
    fn allow_everything(&self);
    /// object_store's own client of `bucket`, with full rights.
    fn store(&self, bucket: &str) -> Arc<dyn ObjectStore>;
    /// `http://127.0.0.1:<port>`, where the emulator listens.
    fn endpoint(&self) -> &str;
}

/// Runs one test body on every emulator, as `stores::<emulator>::<test>`.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod s3 {
            $(#[test] fn $test() { super::$test::<super::moto::Moto>() })*
        }
        mod azure {
            $(#[test] fn $test() { super::$test::<super::azurite::Azurite>() })*
        }
    };
}

on_every_store!(
    pipeline_killed_and_resumed_equals_local,
    four_workers_killed_and_restarted_equal_one_run,
    two_workers_equal_one_run_and_pay_once,
    denied_reads_are_errors_not_absence,
    decontamination_reads_a_benchmark_folder,
    second_create_of_one_object_is_refused,
    a_store_that_drops_connections_loses_nothing,
    claims_and_leases_survive_lost_replies,
);

/// The rows of the LLM stages, in a fixed order: what two runs must agree on.
const QUERY: &str = "SELECT 'b' AS s, id, instruction AS v FROM backtranslated \
    UNION ALL SELECT 's', id, CAST(score AS VARCHAR) FROM scored \
    UNION ALL SELECT 'r', id, response FROM rewritten ORDER BY s, id";

fn run(env: &[(&'static str, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args)
        .envs(env.iter().cloned())
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn upload<E: Emulator>(emulator: &E, bucket: &str, key: &str, bytes: Vec<u8>) {
    block_on(
        emulator
            .store(bucket)
            .put(&key.into(), PutPayload::from(bytes)),
    )
    .unwrap();
}

/// The crash tests' corpus and job in a folder, and a fake server answering after `latency`.
fn fixture(latency: Duration) -> (tempfile::TempDir, String, FakeServer) {
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    let job = dir.path().join("job.toml").to_str().unwrap().to_string();
    (dir, job, FakeServer::start(latency))
}

/// Runs `args`, a run whose output is the folder `local`: the rows of [`QUERY`] there, which
/// a run on the store must equal, and how long the local run took.
fn local_reference(
    env: &[(&'static str, String)],
    args: &[&str],
    local: &std::path::Path,
) -> (String, Duration) {
    let started = Instant::now();
    ok(run(env, args));
    let full = started.elapsed();
    let rows = ok(run(env, &["sql", "--root", local.to_str().unwrap(), QUERY]));
    (rows, full)
}

/// Starts `backforth` with `args` and `env`, and kills it after half of `full` (how long the
/// same run took on local disk, which is faster than any store): whether it was still going.
fn killed_midway(args: &[&str], env: &[(&'static str, String)], full: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args)
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(full / 2);
    let killed = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    killed
}

/// Input and output on the store, killed midway and resumed: the same rows as a run on local
/// disk, and a rerun of the finished job sends nothing.
fn pipeline_killed_and_resumed_equals_local<E: Emulator>() {
    let store = E::start(&["corpus"]);
    let env = store.env();
    let (dir, job, server) = fixture(Duration::from_millis(10));
    let url = server.url();
    let common = ["--endpoint", &url, "--model", "m", "--concurrency", "8"];

    let local = dir.path().join("local");
    let mut args = vec!["run", &job, "--output", local.to_str().unwrap()];
    args.extend(common);
    let (expected, full) = local_reference(&env, &args, &local);
    assert!(expected.lines().count() > 600, "{expected}");

    let docs = std::fs::read(dir.path().join("docs.jsonl")).unwrap();
    upload(&store, "corpus", "in/docs.jsonl", docs);
    let (input, output) = (
        store.url("corpus", "in/docs.jsonl"),
        store.url("corpus", "out"),
    );
    let mut args = vec!["run", &job, "--input", &input, "--output", &output];
    args.extend(common);
    let killed = killed_midway(&args, &env, full);
    ok(run(&env, &args));
    let got = ok(run(&env, &["sql", "--root", &output, QUERY]));
    assert_eq!(got, expected);
    assert!(killed, "the run was still going when killed");
    let before = server.requests();
    ok(run(&env, &args));
    assert_eq!(
        server.requests(),
        before,
        "a rerun of a finished job sent requests"
    );
}

/// Input and output on a store behind a proxy that resets one request's connection in seven,
/// half of them after the store carried the request out: the run finishes with the rows of a
/// run on local disk, asks each prompt once, and the cuts were many and of both kinds.
fn a_store_that_drops_connections_loses_nothing<E: Emulator>() {
    let (cutter, log) = run_behind::<E>(Cut::OneIn(7));
    let (lost_requests, lost_replies) = (cutter.lost_requests(), cutter.lost_replies());
    assert!(
        lost_requests >= 5 && lost_replies >= 5,
        "{} requests: {lost_requests} lost before the store, {lost_replies} replies lost",
        cutter.requests()
    );
    assert!(log.contains("The store's connection failed"), "{log}");
}

/// Every other request for a lease or a claim loses its reply after the store carried it out:
/// creates, takeovers, renewals, give-backs and the check that the store refuses a second
/// create all come out as if nothing was lost.
fn claims_and_leases_survive_lost_replies<E: Emulator>() {
    let (cutter, log) = run_behind::<E>(Cut::RepliesTo(&["/_leases/", "/_claims/"]));
    assert!(
        cutter.lost_replies() >= 10,
        "{} replies lost",
        cutter.lost_replies()
    );
    assert!(log.contains("The store's connection failed"), "{log}");
}

/// Runs the pipeline with input and output on a store `E` behind a [`Cutter`] cutting `cut`:
/// it must finish with a local run's rows, asking each prompt once. The proxy, and the run's
/// warnings.
fn run_behind<E: Emulator>(cut: Cut) -> (Cutter, String) {
    let store = E::start(&["corpus"]);
    let (dir, job, server) = fixture(Duration::from_millis(5));
    let url = server.url();
    let common = ["--endpoint", &url, "--model", "m", "--concurrency", "8"];

    let local = dir.path().join("local");
    let mut args = vec!["run", &job, "--output", local.to_str().unwrap()];
    args.extend(common);
    let (expected, _) = local_reference(&store.env(), &args, &local);
    let asked = server.requests();

    let docs = std::fs::read(dir.path().join("docs.jsonl")).unwrap();
    upload(&store, "corpus", "in/docs.jsonl", docs);
    let cutter = Cutter::start(store.endpoint(), cut);
    let env: Vec<_> = store
        .env()
        .into_iter()
        .map(|(key, value)| (key, value.replace(store.endpoint(), &cutter.endpoint)))
        .collect();
    let (input, output) = (
        store.url("corpus", "in/docs.jsonl"),
        store.url("corpus", "out"),
    );
    let mut args = vec!["run", &job, "--input", &input, "--output", &output];
    args.extend(common);
    let out = run(&env, &args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    let got = ok(run(&env, &["sql", "--root", &output, QUERY]));
    assert_eq!(got, expected);
    assert_eq!(
        server.requests() - asked,
        asked,
        "the run through the proxy asked as many times as the local one"
    );
    (cutter, log)
}

/// Four workers started at the same time, each killed at random moments and restarted until
/// it finishes: the output equals a single uninterrupted run's, requests re-sent for prompts
/// already answered stay within the in-flight window per kill, and the endpoint never sees
/// more than the job's cap in flight across all workers.
fn four_workers_killed_and_restarted_equal_one_run<E: Emulator>() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CAP: usize = 8;
    let store = E::start(&["corpus"]);
    let env = store.env();
    let (dir, job, server) = fixture(Duration::from_millis(10));
    // The corpus as eight input files, so every worker prepares a share.
    let docs = std::fs::read_to_string(dir.path().join("docs.jsonl")).unwrap();
    let lines: Vec<&str> = docs.lines().collect();
    let local_in = dir.path().join("in");
    std::fs::create_dir(&local_in).unwrap();
    for (k, chunk) in lines.chunks(lines.len().div_ceil(8)).enumerate() {
        let text = chunk.join("\n") + "\n";
        std::fs::write(local_in.join(format!("part-{k}.jsonl")), &text).unwrap();
        upload(
            &store,
            "corpus",
            &format!("in/part-{k}.jsonl"),
            text.into_bytes(),
        );
    }
    let url = server.url();
    let cap = CAP.to_string();
    let common = ["--endpoint", &url, "--model", "m", "--concurrency", &cap];

    let local = dir.path().join("local");
    let mut args = vec![
        "run",
        &job,
        "--input",
        local_in.to_str().unwrap(),
        "--output",
        local.to_str().unwrap(),
    ];
    args.extend(common);
    let (expected, full) = local_reference(&env, &args, &local);
    let answered = server.requests();
    server.state.max_in_flight.store(0, Ordering::SeqCst);

    let (input, output) = (store.url("corpus", "in/"), store.url("corpus", "out"));
    let kills = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (env, kills, common, input, output, job) =
                (&env, &kills, &common, &input, &output, &job);
            s.spawn(move || {
                let spec = format!("{worker}/4");
                let mut args = vec![
                    "run", job, "--input", input, "--output", output, "--worker", &spec,
                ];
                args.extend(common.iter().copied());
                let mut rng = fastrand::Rng::with_seed(worker as u64 * 7919 + fastrand::u64(..));
                for _ in 0..2 {
                    let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
                        .args(&args)
                        .envs(env.iter().cloned())
                        .env("BACKFORTH_LOG", "warn")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    std::thread::sleep(full.mul_f64(0.3 + 1.2 * rng.f64()));
                    if child.try_wait().unwrap().is_none() {
                        child.kill().unwrap();
                        kills.fetch_add(1, Ordering::SeqCst);
                    }
                    child.wait().unwrap();
                }
                ok(run(env, &args));
            });
        }
    });
    let got = ok(run(&env, &["sql", "--root", &output, QUERY]));
    assert_eq!(got, expected);
    let kills = kills.load(Ordering::SeqCst);
    assert!(kills >= 2, "the workers were killed ({kills} times)");
    let peak = server.state.max_in_flight.load(Ordering::SeqCst);
    assert!(
        peak as usize <= CAP,
        "{peak} requests in flight across the workers"
    );
    // The local reference asked every prompt once; the store's run asked them again (its own
    // journal), and repeats beyond that come only from requests in flight at a kill.
    let repeats = server.requests() - 2 * answered;
    assert!(
        repeats <= (CAP * kills) as u64,
        "{repeats} repeated requests after {kills} kills with a cap of {CAP}"
    );
    eprintln!("{kills} kills, {repeats} repeated requests, peak {peak} in flight");
}

/// Two workers share one root: each runs its share of the shards, the output equals one
/// worker's run, and no request is paid twice.
fn two_workers_equal_one_run_and_pay_once<E: Emulator>() {
    let store = E::start(&["corpus"]);
    let env = store.env();
    let (_dir, job, server) = fixture(Duration::from_millis(5));
    let url = server.url();
    let common = ["--endpoint", url.as_str(), "--model", "m"];
    let one = store.url("corpus", "one");
    let mut args = vec!["run", &job, "--output", &one];
    args.extend(common);
    ok(run(&env, &args));
    let expected = ok(run(&env, &["sql", "--root", &one, QUERY]));
    let single = server.requests();

    let two = store.url("corpus", "two");
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (env, common, job, two) = (&env, &common, &job, &two);
                s.spawn(move || {
                    let worker = format!("{i}/2");
                    let mut args = vec!["run", job.as_str(), "--output", two, "--worker", &worker];
                    args.extend(common);
                    run(env, &args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in outputs {
        ok(out);
    }
    assert_eq!(ok(run(&env, &["sql", "--root", &two, QUERY])), expected);
    // Identical prompts within a run are asked once; none is asked by both workers.
    assert_eq!(server.requests() - single, single);
}

/// Access denied is an error that says so, never "absent": a denied input is not "no
/// documents", and a card we may not read is not a free place to write one (and nothing is
/// exported beside it).
fn denied_reads_are_errors_not_absence<E: Emulator>() {
    let store = E::start(&["corpus"]);
    let (dir, job, _server) = fixture(Duration::ZERO);
    let docs = std::fs::read(dir.path().join("docs.jsonl")).unwrap();
    upload(&store, "corpus", "in/docs.jsonl", docs);
    let foreign = b"# somebody else's dataset\n".to_vec();
    upload(&store, "corpus", "pub/train.card.md", foreign.clone());
    let reader = store.env_denied_reads("corpus", &["in/docs.jsonl", "pub/train.card.md"]);

    let input = store.url("corpus", "in/docs.jsonl");
    let output = dir.path().join("out");
    let out = run(
        &reader,
        &[
            "run",
            &job,
            "--input",
            &input,
            "--output",
            output.to_str().unwrap(),
            "--endpoint",
            "mock",
            "--stages",
            "candidates",
        ],
    );
    // Stores refuse at different steps (moto 5.2 lets HEAD through and denies the GET; other
    // versions deny the HEAD that resolves a single-file input): whichever it is, the message
    // names the input as the user gave it and says it was denied, and nothing is published.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("input '{input}'")), "{stderr}");
    assert!(stderr.contains("privileges"), "{stderr}");
    assert!(!stderr.contains("matches no"), "{stderr}");
    let written = files_under(&output);
    assert!(
        !written
            .iter()
            .any(|f| f.ends_with("_SUCCESS") || f.ends_with(".parquet")),
        "{written:?}"
    );

    let root = crate::pipeline::sample_root();
    let target = store.url("corpus", "pub/train.jsonl");
    let out = run(
        &reader,
        &[
            "export",
            "--root",
            root.to_str().unwrap(),
            "--table",
            "backtranslated",
            "--output",
            &target,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let card = store.url("corpus", "pub/train.card.md");
    assert!(
        stderr.contains(&format!("checking {card} before writing the card")),
        "{stderr}"
    );

    store.allow_everything();
    let objects = store.store("corpus");
    let (kept, data) = block_on(async {
        let kept = objects.get(&"pub/train.card.md".into()).await.unwrap();
        let data = objects.head(&"pub/train.jsonl".into()).await;
        (kept.bytes().await.unwrap(), data)
    });
    assert_eq!(&kept[..], &foreign[..]);
    assert!(
        matches!(data, Err(object_store::Error::NotFound { .. })),
        "{data:?}"
    );
}

/// Every file under `dir`, as paths relative to it (none if it does not exist).
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    files
}

/// A benchmark on the object store, read through the same URLs as the inputs.
fn decontamination_reads_a_benchmark_folder<E: Emulator>() {
    let store = E::start(&["evals"]);
    let dir = tempfile::tempdir().unwrap();
    let question = "Which river flows through the city of Vienna and continues east to \
                    Bratislava and Budapest before it reaches the Black Sea?";
    let item = serde_json::json!({"id": "geo-1", "question": question}).to_string() + "\n";
    upload(&store, "evals", "geo/data/test.jsonl", item.into_bytes());
    std::fs::write(
        dir.path().join("docs.jsonl"),
        [
            serde_json::json!({"id": "copy", "text": format!("Quiz: {question}")}),
            serde_json::json!({"id": "clean", "text": "Rivers carry sediment to the sea."}),
        ]
        .iter()
        .map(|d| d.to_string() + "\n")
        .collect::<String>(),
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
             [decontaminate]\nn = 8\n[[decontaminate.benchmarks]]\nname = \"geo\"\n\
             paths = [\"{}\"]\nfields = [\"question\"]\nid = \"id\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"decontaminated\"\n",
            store.url("evals", "geo/")
        ),
    )
    .unwrap();
    // A bucket is read with the user's credentials: the user allows it, not the job.
    let bucket = store.url("evals", "geo/");
    let refused = run(
        &store.env(),
        &["run", job.to_str().unwrap(), "--endpoint", "mock"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-path"));
    ok(run(
        &store.env(),
        &[
            "run",
            job.to_str().unwrap(),
            "--endpoint",
            "mock",
            "--allow-path",
            &bucket,
        ],
    ));
    let marker = crate::support::util::marker(&dir.path().join("out"), "decontaminated");
    assert_eq!(marker["dropped"]["contaminated:geo"], 1, "{marker}");
    assert_eq!(marker["rows_out"], 1, "{marker}");
}

/// Leases and journal segments are created only if absent: the store must refuse a second
/// create of the same object, and keep the first.
fn second_create_of_one_object_is_refused<E: Emulator>() {
    let store = E::start(&["runs"]);
    let objects = store.store("runs");
    let path = object_store::path::Path::from("out/_leases/worker-0-of-1.json");
    let create = PutOptions::from(PutMode::Create);
    block_on(objects.put_opts(&path, PutPayload::from_static(b"first"), create.clone())).unwrap();
    let second = block_on(objects.put_opts(&path, PutPayload::from_static(b"second"), create));
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = block_on(async { objects.get(&path).await.unwrap().bytes().await.unwrap() });
    assert_eq!(&kept[..], b"first");
}
