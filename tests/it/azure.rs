//! The S3 tests' core on Azure Blob Storage, against Azurite (Microsoft's emulator, from the
//! npm registry) started on a free port: the pipeline with input and output in a container,
//! killed and resumed, equal row for row to a local run; create-if-absent honoured.
//!
//! `azurite-blob` is found through `$BACKFORTH_AZURITE`, `.ci/node/node_modules/.bin/`
//! (where `.ci/run` installs it) or the `PATH`.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::s3::{QUERY, killed_midway, ok};
use crate::support::fake_server::FakeServer;
use crate::support::util::{free_port, tool};

/// A running Azurite blob service, stopped when dropped.
struct Azurite {
    child: Child,
    endpoint: String,
    _data: tempfile::TempDir,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's well-known development account and key.
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite_binary() -> PathBuf {
    tool(
        "BACKFORTH_AZURITE",
        ".ci/node/node_modules/.bin/azurite-blob",
        "azurite-blob",
    )
}

impl Azurite {
    fn start() -> Azurite {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(azurite_binary())
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--location", data.path().to_str().unwrap(), "--silent"])
            .arg("--skipApiVersionCheck")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start azurite-blob ({e}); install it with `npm install --prefix .ci/node azurite@3` (as .ci/run does)"
                )
            });
        let azurite = Azurite {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "azurite did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        azurite
    }

    /// Creates a container, with a request signed by the development key (object_store
    /// creates none).
    fn container(&self, name: &str) {
        let script = r#"
import base64, hmac, hashlib, sys, urllib.request
from email.utils import formatdate
endpoint, account, key, container = sys.argv[1:5]
date, version = formatdate(usegmt=True), "2021-08-06"
to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           + f"/{account}/{account}/{container}\nrestype:container")
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest())
req = urllib.request.Request(f"{endpoint}/{account}/{container}?restype=container", method="PUT",
    headers={"x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
             "Authorization": f"SharedKey {account}:{sig.decode()}"})
print(urllib.request.urlopen(req).status)
"#;
        let out = Command::new("python3")
            .args(["-c", script, &self.endpoint, ACCOUNT, KEY, name])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.starts_with(b"201"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The environment that points object_store's Azure client at this emulator.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint.clone()),
        ]
    }

    /// object_store's client of `container`, as an account at the emulator's address.
    fn store(&self, container: &str) -> object_store::azure::MicrosoftAzure {
        object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(KEY)
            .with_endpoint(format!("{}/{ACCOUNT}", self.endpoint))
            .with_allow_http(true)
            .with_container_name(container)
            .build()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_backforth"))
            .args(args)
            .envs(self.env())
            .env("BACKFORTH_LOG", "warn")
            .output()
            .unwrap()
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Azurite with a `corpus` container; the crash tests' corpus and job in a folder; a fake
/// server answering after `latency_ms`; and the job's path.
fn fixture(latency_ms: u64) -> (Azurite, tempfile::TempDir, FakeServer, String) {
    let azurite = Azurite::start();
    azurite.container("corpus");
    let dir = tempfile::tempdir().unwrap();
    crate::crash::corpus(dir.path());
    let job = dir.path().join("job.toml").to_str().unwrap().to_string();
    let server = FakeServer::start(Duration::from_millis(latency_ms));
    (azurite, dir, server, job)
}

#[test]
fn pipeline_on_azurite_with_a_kill_and_resume() {
    let (azurite, dir, server, job) = fixture(10);
    let job = job.as_str();
    let url = server.url();
    let common = [
        "--endpoint",
        url.as_str(),
        "--model",
        "m",
        "--concurrency",
        "8",
    ];

    let local = dir.path().join("local");
    let mut args = vec!["run", job, "--output", local.to_str().unwrap()];
    args.extend(common);
    let started = Instant::now();
    ok(azurite.run(&args));
    let full = started.elapsed();
    let expected = ok(azurite.run(&["sql", "--root", local.to_str().unwrap(), QUERY]));
    assert!(expected.lines().count() > 600, "{expected}");

    let store = azurite.store("corpus");
    let docs = std::fs::read(dir.path().join("docs.jsonl")).unwrap();
    block_on(store.put(&"in/docs.jsonl".into(), PutPayload::from(docs))).unwrap();
    let mut args = vec![
        "run",
        job,
        "--input",
        "az://corpus/in/docs.jsonl",
        "--output",
        "az://corpus/out",
    ];
    args.extend(common);
    let killed = killed_midway(&args, azurite.env(), full);
    ok(azurite.run(&args));
    let got = ok(azurite.run(&["sql", "--root", "az://corpus/out", QUERY]));
    assert_eq!(got, expected);
    assert!(killed, "the run was still going when killed");
    // Resumed to the end, a rerun sends nothing.
    let before = server.requests();
    ok(azurite.run(&args));
    assert_eq!(server.requests(), before);
}

/// Markers and journal segments are created only if absent: the store must refuse a second
/// create of the same object, as the commit protocol expects.
#[test]
fn azurite_refuses_a_second_create_of_one_object() {
    let azurite = Azurite::start();
    azurite.container("runs");
    let store = azurite.store("runs");
    let path = object_store::path::Path::from("out/candidates/_SUCCESS");
    let create = PutOptions::from(PutMode::Create);
    block_on(store.put_opts(&path, PutPayload::from_static(b"first"), create.clone())).unwrap();
    let second = block_on(store.put_opts(&path, PutPayload::from_static(b"second"), create));
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() });
    assert_eq!(&kept[..], b"first");
}

/// Two workers share one root in a container: each runs its share of the shards, the
/// output equals one worker's run, and no request is paid twice.
#[test]
fn two_workers_on_azurite_equal_one_run() {
    let (azurite, _dir, server, job) = fixture(5);
    let job = job.as_str();
    let url = server.url();
    let common = ["--endpoint", url.as_str(), "--model", "m"];
    let mut one = vec!["run", job, "--output", "az://corpus/one"];
    one.extend(common);
    ok(azurite.run(&one));
    let expected = ok(azurite.run(&["sql", "--root", "az://corpus/one", QUERY]));
    let single = server.requests();

    let outputs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (azurite, common) = (&azurite, &common);
                s.spawn(move || {
                    let worker = format!("{i}/2");
                    let mut args = vec!["run", job, "--output", "az://corpus/two"];
                    args.extend(common);
                    args.extend(["--worker", worker.as_str()]);
                    azurite.run(&args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in outputs {
        ok(out);
    }
    let got = ok(azurite.run(&["sql", "--root", "az://corpus/two", QUERY]));
    assert_eq!(got, expected);
    // The two workers together sent what the single run sent (identical prompts within a
    // run are asked once; none is asked by both workers).
    assert_eq!(server.requests() - single, single);
}
