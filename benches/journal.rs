//! The response journal at bucket scale: a journal of `JOURNAL_RESPONSES` (default 1,000,000)
//! responses, in shards of `JOURNAL_SHARD` (10,000) as a stage writes them, is written through
//! the journal's own API under a local root and under an S3-compatible server (moto, when
//! `.ci/venv/bin/moto_server` or `$BACKFORTH_MOTO_SERVER` is there), each shard compacted once
//! published. Then, in a fresh process as a worker resuming one shard's worth of work does, the
//! journal is opened and one shard's responses looked up: time, objects read, peak RSS. And in
//! another, a shard whose rows all moved (a reshard: half of one old shard, half of the next)
//! is answered through the stage's index: time, objects read, peak RSS.
//!
//!     cargo bench --bench journal
//!
//! `JOURNAL_TEXT_BYTES` (default 600) sets each response's length; `JOURNAL_FSYNC=1` flushes
//! every local write to the device (`[execution] fsync`), to measure what that costs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backforth::llm::journal::Journal;
use backforth::llm::reply::Reply;
use backforth::storage::Location;
use futures::TryStreamExt;

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Records `n` responses of `bytes` characters under `root`, shard by shard (4,096 at a
/// time, as a stage's calls arrive), compacting each shard as the runner does once it is
/// published.
async fn write_journal(root: &str, n: u64, bytes: usize, shard: u64) {
    let mut journal = Journal::open(&Location::parse(root).unwrap())
        .await
        .unwrap();
    journal
        .sync_local_writes(std::env::var("JOURNAL_FSYNC").is_ok_and(|v| v == "1"))
        .await;
    let text: String = "word ".repeat(bytes / 5);
    for first in (0..n).step_by(shard as usize) {
        let scope = journal
            .scope("backtranslated", &format!("{:05}", first / shard))
            .await
            .unwrap();
        let end = (first + shard).min(n);
        let mut i = first;
        while i < end {
            let to = (i + 4096).min(end);
            let calls = (i..to).map(|k| {
                let scope = Arc::clone(&scope);
                let reply = Reply {
                    text: Some(format!("{k} {text}")),
                    finish_reason: Some("stop".into()),
                    prompt_tokens: Some(500),
                    completion_tokens: Some(bytes as i64 / 4),
                    ..Reply::default()
                };
                async move { scope.record(&format!("{k:064x}"), &reply).await }
            });
            futures::future::join_all(calls).await;
            i = to;
        }
        scope.compact().await.unwrap();
    }
    journal.check().unwrap();
}

/// Objects under the journal of `root`.
async fn objects(root: &str) -> usize {
    let dir = Location::parse(root).unwrap().child("_journal");
    let listed: Vec<_> = dir
        .store
        .list(Some(&dir.prefix))
        .try_collect()
        .await
        .unwrap();
    listed.len()
}

/// Runs this benchmark's own binary as `args`, with `env`, under `/usr/bin/time` when there;
/// returns its standard output and its peak RSS in MiB.
fn child(args: &[&str], env: &[(&str, String)]) -> (String, f64) {
    let report = std::env::temp_dir().join(format!("journal-bench-{}.txt", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let time = Path::new("/usr/bin/time").exists();
    let mut cmd = if time {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o", report.to_str().unwrap()])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}");
    let rss = if time {
        std::fs::read_to_string(&report)
            .unwrap()
            .trim()
            .parse::<f64>()
            .unwrap()
            / 1024.0
    } else {
        f64::NAN
    };
    (String::from_utf8_lossy(&out.stdout).into_owned(), rss)
}

fn child_write(root: &str, n: u64, bytes: usize, shard: u64) {
    let rt = runtime();
    let started = Instant::now();
    rt.block_on(write_journal(root, n, bytes, shard));
    let written = started.elapsed().as_secs_f64();
    println!("{written} {}", rt.block_on(objects(root)));
}

/// Opens the journal and the scope of one shard in the middle, and finds a response of it.
fn child_open(root: &str, n: u64, shard: u64) {
    let rt = runtime();
    let started = Instant::now();
    let (loaded, read) = rt.block_on(async {
        let journal = Journal::open(&Location::parse(root).unwrap())
            .await
            .unwrap();
        let middle = n / shard / 2;
        let scope = journal
            .scope("backtranslated", &format!("{middle:05}"))
            .await
            .unwrap();
        let key = format!("{:064x}", middle * shard + 1);
        assert!(
            scope.get(&key).is_some(),
            "a response of the shard is found"
        );
        (scope.len(), journal.objects_read())
    });
    println!("{} {loaded} {read}", started.elapsed().as_secs_f64());
}

/// Opens the scope of a shard no run wrote, whose rows are the second half of the middle
/// shard and the first half of the next, and answers every one of them from the journal.
fn child_moved(root: &str, n: u64, shard: u64) {
    let rt = runtime();
    let started = Instant::now();
    let (found, read) = rt.block_on(async {
        let journal = Journal::open(&Location::parse(root).unwrap())
            .await
            .unwrap();
        let scope = journal
            .scope("backtranslated", "moved-00000")
            .await
            .unwrap();
        let first = (n / shard / 2) * shard + shard / 2;
        let keys = (first..(first + shard).min(n)).map(|k| format!("{k:064x}"));
        let lookups = keys.map(|key| {
            let scope = Arc::clone(&scope);
            async move { scope.lookup(&key).await.unwrap().is_some() }
        });
        let found = futures::future::join_all(lookups)
            .await
            .into_iter()
            .filter(|&f| f)
            .count();
        (found, journal.objects_read())
    });
    println!("{} {found} {read}", started.elapsed().as_secs_f64());
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BACKFORTH_MOTO_SERVER") {
        return Some(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/bin/moto_server");
    venv.exists().then_some(venv)
}

/// Writes then opens a journal of `n` responses under `root`, each in a fresh process.
fn measure(place: &str, root: &str, n: u64, bytes: usize, shard: u64, env: &[(&str, String)]) {
    let (out, _) = child(
        &[
            "--write",
            root,
            &n.to_string(),
            &bytes.to_string(),
            &shard.to_string(),
        ],
        env,
    );
    let mut words = out.split_whitespace();
    let written: f64 = words.next().unwrap().parse().unwrap();
    let objects: usize = words.next().unwrap().parse().unwrap();
    let (out, rss) = child(&["--open", root, &n.to_string(), &shard.to_string()], env);
    let mut words = out.split_whitespace();
    let seconds: f64 = words.next().unwrap().parse().unwrap();
    let loaded: u64 = words.next().unwrap().parse().unwrap();
    let read: u64 = words.next().unwrap().parse().unwrap();
    assert_eq!(loaded, shard.min(n), "the shard's responses are found");
    println!(
        "{place:<6} {n:>9} responses in {objects} objects (written in {written:.1}s): journal and one shard opened in {seconds:.3}s, {read} objects read, peak RSS {rss:.0} MiB"
    );
    let (out, rss) = child(&["--moved", root, &n.to_string(), &shard.to_string()], env);
    let mut words = out.split_whitespace();
    let seconds: f64 = words.next().unwrap().parse().unwrap();
    let found: u64 = words.next().unwrap().parse().unwrap();
    let read: u64 = words.next().unwrap().parse().unwrap();
    assert_eq!(found, shard.min(n), "every moved row is answered");
    println!(
        "{place:<6} a moved shard of {found} rows answered in {seconds:.3}s through the stage's index, {read} objects read, peak RSS {rss:.0} MiB"
    );
}

/// Creates `bucket` on the S3-compatible server at `addr` with a bare HTTP request.
fn create_bucket(addr: &str, bucket: &str) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args[i].parse::<u64>().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--open") {
        return child_open(&args[i + 1], num(i + 2), num(i + 3));
    }
    if let Some(i) = args.iter().position(|a| a == "--moved") {
        return child_moved(&args[i + 1], num(i + 2), num(i + 3));
    }
    if let Some(i) = args.iter().position(|a| a == "--write") {
        return child_write(&args[i + 1], num(i + 2), num(i + 3) as usize, num(i + 4));
    }
    let n = var("JOURNAL_RESPONSES", 1_000_000);
    let shard = var("JOURNAL_SHARD", 10_000).max(1);
    let bytes = var("JOURNAL_TEXT_BYTES", 600) as usize;

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("root");
    measure("local", local.to_str().unwrap(), n, bytes, shard, &[]);

    let Some(moto) = moto_binary() else {
        println!("s3: moto_server not found (see docs/testing.md); skipped");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    create_bucket(&addr, "journal");
    let env = vec![
        ("AWS_ENDPOINT", format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    measure("s3", "s3://journal/root", n, bytes, shard, &env);
    let _ = server.kill();
    let _ = server.wait();
}
