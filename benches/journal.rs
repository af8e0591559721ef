//! The response journal at bucket scale: a journal of `JOURNAL_RESPONSES` (default 1,000,000)
//! responses is written through the journal's own API under a local root and under an
//! S3-compatible server (moto, when `.ci/venv/bin/moto_server` or `$BACKFORTH_MOTO_SERVER` is
//! there), then opened again in a fresh process, as every `run` of every worker does: time to
//! open, objects read, peak RSS.
//!
//!     cargo bench --bench journal
//!
//! `JOURNAL_TEXT_BYTES` (default 600) sets each response's length.

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

/// Records `n` responses of `bytes` characters under `root`, 4,096 at a time as a stage would.
async fn write_journal(root: &str, n: u64, bytes: usize) {
    let journal = Arc::new(
        Journal::open(&Location::parse(root).unwrap())
            .await
            .unwrap(),
    );
    let text: String = "word ".repeat(bytes / 5);
    let mut i = 0;
    while i < n {
        let end = (i + 4096).min(n);
        let calls = (i..end).map(|k| {
            let journal = Arc::clone(&journal);
            let reply = Reply {
                text: Some(format!("{k} {text}")),
                finish_reason: Some("stop".into()),
                prompt_tokens: Some(500),
                completion_tokens: Some(bytes as i64 / 4),
                ..Reply::default()
            };
            async move { journal.record(&format!("{k:064x}"), &reply).await }
        });
        futures::future::join_all(calls).await;
        i = end;
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

fn child_write(root: &str, n: u64, bytes: usize) {
    let rt = runtime();
    let started = Instant::now();
    rt.block_on(write_journal(root, n, bytes));
    let written = started.elapsed().as_secs_f64();
    println!("{written} {}", rt.block_on(objects(root)));
}

fn child_open(root: &str) {
    let rt = runtime();
    let started = Instant::now();
    let journal = rt
        .block_on(Journal::open(&Location::parse(root).unwrap()))
        .unwrap();
    println!("{} {}", started.elapsed().as_secs_f64(), journal.loaded());
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BACKFORTH_MOTO_SERVER") {
        return Some(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/bin/moto_server");
    venv.exists().then_some(venv)
}

/// Writes then opens a journal of `n` responses under `root`, each in a fresh process.
fn measure(place: &str, root: &str, n: u64, bytes: usize, env: &[(&str, String)]) {
    let (out, _) = child(&["--write", root, &n.to_string(), &bytes.to_string()], env);
    let mut words = out.split_whitespace();
    let written: f64 = words.next().unwrap().parse().unwrap();
    let objects: usize = words.next().unwrap().parse().unwrap();
    let (out, rss) = child(&["--open", root], env);
    let mut words = out.split_whitespace();
    let seconds: f64 = words.next().unwrap().parse().unwrap();
    let loaded: u64 = words.next().unwrap().parse().unwrap();
    assert_eq!(loaded, n, "every response is found again");
    println!(
        "{place:<6} {n:>9} responses: written in {written:.1}s as {objects} objects; opened in {seconds:.2}s reading {objects} objects, peak RSS {rss:.0} MiB"
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
    if let Some(i) = args.iter().position(|a| a == "--open") {
        return child_open(&args[i + 1]);
    }
    if let Some(i) = args.iter().position(|a| a == "--write") {
        return child_write(
            &args[i + 1],
            args[i + 2].parse().unwrap(),
            args[i + 3].parse().unwrap(),
        );
    }
    let n = var("JOURNAL_RESPONSES", 1_000_000);
    let bytes = var("JOURNAL_TEXT_BYTES", 600) as usize;

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("root");
    measure("local", local.to_str().unwrap(), n, bytes, &[]);

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
    measure("s3", "s3://journal/root", n, bytes, &env);
    let _ = server.kill();
    let _ = server.wait();
}
