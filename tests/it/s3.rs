//! The pipeline with inputs and outputs on a real S3-compatible server (moto, started here on
//! a free port), including a kill and resume.
//!
//! `moto_server` is found through `$BACKFORTH_MOTO_SERVER`, `.ci/venv/bin/moto_server` (where
//! `.ci/run` installs it) or `$PATH`; without it these tests fail and say how to install it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::fake_server::FakeServer;
use crate::support::util::{free_port, tool};

/// A moto S3 server on 127.0.0.1, stopped on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> PathBuf {
    tool(
        "BACKFORTH_MOTO_SERVER",
        ".ci/venv/bin/moto_server",
        "moto_server",
    )
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}); install it with `python3 -m venv .ci/venv && .ci/venv/bin/pip install 'moto[server]'` (as .ci/run does)"
                )
            });
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(&moto.endpoint, "GET", "/moto-api/").is_none() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Creates a bucket.
    pub fn bucket(&self, name: &str) {
        let status = http(&self.endpoint, "PUT", &format!("/{name}")).expect("moto answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }

    /// The environment that points object_store's S3 client at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_as("testing", "testing")
    }

    /// The same environment with another user's keys.
    fn env_as(&self, key: &str, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", key.into()),
            ("AWS_SECRET_ACCESS_KEY", secret.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// One IAM call (moto routes it by the service in the credential scope); the answer's XML.
    fn iam(&self, params: &[(&str, &str)]) -> String {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .append_pair("Version", "2010-05-08")
            .finish();
        let scope = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, \
                     SignedHeaders=host, Signature=unused";
        let (status, body) = request(
            &self.endpoint,
            "POST",
            "/",
            &[
                ("Authorization", scope),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form,
        )
        .expect("moto answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
        body
    }

    /// A user allowed everything on S3 except reading `denied` (ARNs of objects); its keys.
    fn user_who_cannot_read(&self, denied: &[&str]) -> (String, String) {
        self.iam(&[("Action", "CreateUser"), ("UserName", "reader")]);
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": denied},
            ]
        });
        self.iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "reader"),
            ("PolicyName", "no-reads"),
            ("PolicyDocument", &policy.to_string()),
        ]);
        let keys = self.iam(&[("Action", "CreateAccessKey"), ("UserName", "reader")]);
        (
            xml_field(&keys, "AccessKeyId").to_string(),
            xml_field(&keys, "SecretAccessKey").to_string(),
        )
    }

    /// From now on every S3 request must be signed by a known user and allowed by its policy
    /// (`false`: anything goes again, moto's default).
    fn check_permissions(&self, on: bool) {
        let count = if on { "0" } else { "inf" };
        let (status, body) = request(
            &self.endpoint,
            "POST",
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            count,
        )
        .expect("moto answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
    }
}

/// A bare HTTP/1.1 request; returns the status line.
fn http(endpoint: &str, method: &str, path: &str) -> Option<String> {
    request(endpoint, method, path, &[], "").map(|(status, _)| status)
}

/// A bare HTTP/1.1 request with headers and a body; returns the status line and the body.
fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(String, String)> {
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    write!(
        stream,
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.lines().next()?.to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// The text of the first `<tag>...</tag>` in an XML answer.
fn xml_field<'a>(xml: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    &xml[start..start + xml[start..].find('<').unwrap()]
}

fn backforth_s3(moto: &Moto, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args)
        .envs(moto.env())
        .env("BACKFORTH_LOG", "warn")
        .output()
        .unwrap()
}

pub(crate) fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rows of the LLM stages, in a fixed order: what two runs must agree on.
pub(crate) const QUERY: &str = "SELECT 'b' AS s, id, instruction AS v FROM backtranslated \
    UNION ALL SELECT 's', id, CAST(score AS VARCHAR) FROM scored \
    UNION ALL SELECT 'r', id, response FROM rewritten ORDER BY s, id";

#[test]
fn pipeline_on_s3_with_a_kill_and_resume() {
    let moto = Moto::start();
    moto.bucket("corpus");
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    let job = dir.path().join("job.toml");
    let job = job.to_str().unwrap();
    let server = FakeServer::start(Duration::from_millis(10));
    let url = server.url();

    // The reference, on local disk.
    let local = dir.path().join("local");
    let common = [
        "--endpoint",
        url.as_str(),
        "--model",
        "m",
        "--concurrency",
        "8",
    ];
    let mut args = vec!["run", job, "--output", local.to_str().unwrap()];
    args.extend(common);
    let started = Instant::now();
    ok(backforth_s3(&moto, &args));
    let full = started.elapsed();
    let expected = ok(backforth_s3(
        &moto,
        &["sql", "--root", local.to_str().unwrap(), QUERY],
    ));
    assert!(expected.lines().count() > 600, "{expected}");

    // Inputs uploaded, outputs written to the bucket; killed once, then resumed.
    upload(
        &moto,
        &dir.path().join("docs.jsonl"),
        "corpus",
        "in/docs.jsonl",
    );
    let mut args = vec![
        "run",
        job,
        "--input",
        "s3://corpus/in/docs.jsonl",
        "--output",
        "s3://corpus/out",
    ];
    args.extend(common);
    let killed = killed_midway(&args, moto.env(), full);
    ok(backforth_s3(&moto, &args));
    let got = ok(backforth_s3(
        &moto,
        &["sql", "--root", "s3://corpus/out", QUERY],
    ));
    assert_eq!(got, expected);
    assert!(killed, "the run was still going when killed");
}

/// Starts `backforth` with `args` and `env`, and kills it after half of `full` (how long the
/// same run took on local disk, which is faster than any store): whether it was still going.
pub(crate) fn killed_midway(
    args: &[&str],
    env: Vec<(&'static str, String)>,
    full: Duration,
) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args)
        .envs(env)
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

/// object_store's client of `bucket` on the server, with moto's default keys.
fn store(moto: &Moto, bucket: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap()
}

fn upload(moto: &Moto, file: &std::path::Path, bucket: &str, key: &str) {
    use object_store::{ObjectStoreExt, PutPayload};
    let store = store(moto, bucket);
    let bytes = std::fs::read(file).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(store.put(
            &object_store::path::Path::from(key),
            PutPayload::from(bytes),
        ))
        .unwrap();
}

/// Four workers started at the same time on the S3-compatible server, each killed at random
/// moments and restarted until it finishes: the output equals a single uninterrupted run's,
/// requests re-sent for prompts already answered stay within the in-flight window per kill,
/// and the endpoint never sees more than the job's cap in flight across all workers.
#[test]
fn four_workers_on_s3_killed_and_restarted_equal_one_run() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CAP: usize = 8;
    let moto = Moto::start();
    moto.bucket("corpus");
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    // The corpus as eight input files, so every worker prepares a share.
    let docs = std::fs::read_to_string(dir.path().join("docs.jsonl")).unwrap();
    let lines: Vec<&str> = docs.lines().collect();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    for (k, chunk) in lines.chunks(lines.len().div_ceil(8)).enumerate() {
        let file = dir.path().join(format!("in/part-{k}.jsonl"));
        std::fs::write(&file, chunk.join("\n") + "\n").unwrap();
        upload(&moto, &file, "corpus", &format!("in/part-{k}.jsonl"));
    }
    let job = dir.path().join("job.toml");
    let job = job.to_str().unwrap();
    let server = FakeServer::start(Duration::from_millis(10));
    let url = server.url();
    let cap = CAP.to_string();
    let common = [
        "--endpoint",
        url.as_str(),
        "--model",
        "m",
        "--concurrency",
        cap.as_str(),
    ];

    let local = dir.path().join("local");
    let local_in = dir.path().join("in");
    let mut args = vec![
        "run",
        job,
        "--input",
        local_in.to_str().unwrap(),
        "--output",
        local.to_str().unwrap(),
    ];
    args.extend(common);
    let started = Instant::now();
    ok(backforth_s3(&moto, &args));
    let full = started.elapsed();
    let expected = ok(backforth_s3(
        &moto,
        &["sql", "--root", local.to_str().unwrap(), QUERY],
    ));
    let answered = server.requests();
    server.state.max_in_flight.store(0, Ordering::SeqCst);

    let kills = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (moto, kills, common) = (&moto, &kills, &common);
            s.spawn(move || {
                let spec = format!("{worker}/4");
                let mut args = vec![
                    "run",
                    job,
                    "--input",
                    "s3://corpus/in/",
                    "--output",
                    "s3://corpus/out",
                    "--worker",
                    spec.as_str(),
                ];
                args.extend(common.iter().copied());
                let mut rng = fastrand::Rng::with_seed(worker as u64 * 7919 + fastrand::u64(..));
                for _ in 0..2 {
                    let mut child = Command::new(env!("CARGO_BIN_EXE_backforth"))
                        .args(&args)
                        .envs(moto.env())
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
                ok(backforth_s3(moto, &args));
            });
        }
    });
    let got = ok(backforth_s3(
        &moto,
        &["sql", "--root", "s3://corpus/out", QUERY],
    ));
    assert_eq!(got, expected);
    let kills = kills.load(Ordering::SeqCst);
    assert!(kills >= 2, "the workers were killed ({kills} times)");
    let peak = server.state.max_in_flight.load(Ordering::SeqCst);
    assert!(
        peak as usize <= CAP,
        "{peak} requests in flight across the workers"
    );
    // The local reference asked every prompt once; the S3 run asked them again (its own
    // journal), and repeats beyond that come only from requests in flight at a kill.
    let repeats = server.requests() - 2 * answered;
    assert!(
        repeats <= (CAP * kills) as u64,
        "{repeats} repeated requests after {kills} kills with a cap of {CAP}"
    );
    eprintln!("{kills} kills, {repeats} repeated requests, peak {peak} in flight");
}

/// Access denied is an error that says so, never "absent": a denied input is not "no
/// documents", and a README we may not read is not a free place to write the card (and
/// nothing is exported beside it).
#[test]
fn denied_reads_are_errors_not_absence() {
    let moto = Moto::start();
    moto.bucket("corpus");
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    upload(
        &moto,
        &dir.path().join("docs.jsonl"),
        "corpus",
        "in/docs.jsonl",
    );
    let foreign = dir.path().join("train.card.md");
    std::fs::write(&foreign, "# somebody else's dataset\n").unwrap();
    upload(&moto, &foreign, "corpus", "pub/train.card.md");
    let (key, secret) = moto.user_who_cannot_read(&[
        "arn:aws:s3:::corpus/in/docs.jsonl",
        "arn:aws:s3:::corpus/pub/train.card.md",
    ]);
    moto.check_permissions(true);
    let as_reader = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(args)
            .envs(moto.env_as(&key, &secret))
            .env("BACKFORTH_LOG", "warn")
            .output()
            .unwrap()
    };

    let job = dir.path().join("job.toml");
    let run = as_reader(&[
        "run",
        job.to_str().unwrap(),
        "--input",
        "s3://corpus/in/docs.jsonl",
        "--output",
        "s3://corpus/out",
        "--endpoint",
        "mock",
        "--stages",
        "candidates",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("input 's3://corpus/in/docs.jsonl'"),
        "{stderr}"
    );
    assert!(stderr.contains("privileges"), "{stderr}");
    assert!(!stderr.contains("matches no"), "{stderr}");

    let root = crate::pipeline::sample_root();
    let export = as_reader(&[
        "export",
        "--root",
        root.to_str().unwrap(),
        "--table",
        "backtranslated",
        "--output",
        "s3://corpus/pub/train.jsonl",
    ]);
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert_eq!(export.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("checking s3://corpus/pub/train.card.md before writing the card"),
        "{stderr}"
    );

    moto.check_permissions(false);
    let store = store(&moto, "corpus");
    let (readme, data) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use object_store::ObjectStoreExt;
            let readme = store.get(&"pub/train.card.md".into()).await.unwrap();
            let data = store.head(&"pub/train.jsonl".into()).await;
            (readme.bytes().await.unwrap(), data)
        });
    assert_eq!(&readme[..], b"# somebody else's dataset\n");
    assert!(
        matches!(data, Err(object_store::Error::NotFound { .. })),
        "{data:?}"
    );
}

/// A benchmark on the object store, read through the same URLs as the inputs.
#[test]
fn decontamination_reads_a_benchmark_folder_from_s3() {
    let moto = Moto::start();
    moto.bucket("evals");
    let dir = tempfile::tempdir().unwrap();
    let question = "Which river flows through the city of Vienna and continues east to \
                    Bratislava and Budapest before it reaches the Black Sea?";
    let item = dir.path().join("test.jsonl");
    std::fs::write(
        &item,
        serde_json::json!({"id": "geo-1", "question": question}).to_string() + "\n",
    )
    .unwrap();
    upload(&moto, &item, "evals", "geo/data/test.jsonl");
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
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
         [decontaminate]\nn = 8\n[[decontaminate.benchmarks]]\nname = \"geo\"\n\
         paths = [\"s3://evals/geo/\"]\nfields = [\"question\"]\nid = \"id\"\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"decontaminated\"\n",
    )
    .unwrap();
    ok(backforth_s3(
        &moto,
        &["run", job.to_str().unwrap(), "--endpoint", "mock"],
    ));
    let marker = crate::support::util::marker(&dir.path().join("out"), "decontaminated");
    assert_eq!(marker["dropped"]["contaminated:geo"], 1, "{marker}");
    assert_eq!(marker["rows_out"], 1, "{marker}");
}

/// Markers and journal segments are created only if absent: moto, like S3, must refuse a
/// second create of the same object (`If-None-Match: *`), as the commit protocol expects.
#[test]
fn s3_refuses_a_second_create_of_one_object() {
    use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let moto = Moto::start();
    moto.bucket("runs");
    let store = store(&moto, "runs");
    let path = object_store::path::Path::from("out/candidates/_SUCCESS");
    let create = PutOptions::from(PutMode::Create);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.put_opts(&path, PutPayload::from_static(b"first"), create.clone()))
        .unwrap();
    let second = rt.block_on(store.put_opts(&path, PutPayload::from_static(b"second"), create));
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = rt.block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() });
    assert_eq!(&kept[..], b"first");
}
