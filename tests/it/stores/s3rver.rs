//! A store that does not refuse a second create of one object: s3rver (an S3-compatible
//! server from the npm registry) answers `If-None-Match: *` by overwriting, as some
//! S3-compatible servers do. The tool must stop rather than run unguarded, and run when told
//! it is the only writer. Also moto with object_store's conditional puts switched off.
//!
//! `s3rver` is found through `$BACKFORTH_S3RVER`, `.ci/node/node_modules/.bin/s3rver` (where
//! `.ci/run` installs it) or the `PATH`.

use std::time::Duration;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::moto::{Moto, s3_env, s3_store};
use super::{Emulator, Process, block_on, fixture, ok, run};

/// A running s3rver, stopped when dropped.
struct S3rver {
    process: Process,
}

impl S3rver {
    fn start(bucket: &str) -> S3rver {
        let process = Process::start(
            (
                "BACKFORTH_S3RVER",
                ".ci/node/node_modules/.bin/s3rver",
                "s3rver",
            ),
            |port, data| {
                ["-d", data, "-a", "127.0.0.1", "-p", port, "--silent"]
                    .into_iter()
                    .chain(["--configure-bucket", bucket])
                    .map(String::from)
                    .collect()
            },
            "mkdir -p .ci/node && cp .ci/pins/package*.json .ci/node/ && npm ci --prefix .ci/node",
        );
        S3rver { process }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        s3_env(&self.process.endpoint, "S3RVER", "S3RVER")
    }
}

/// The store overwrites on a second create: the run stops before any request, says why and
/// what to do, and leaves no lease behind; told it is the only writer, the job runs.
#[test]
fn a_store_that_overwrites_on_create_is_refused() {
    let s3rver = S3rver::start("runs");
    let objects = s3_store(&s3rver.process.endpoint, "runs", "S3RVER");
    let path = object_store::path::Path::from("probe");
    let create = PutOptions::from(PutMode::Create);
    block_on(objects.put_opts(&path, PutPayload::from_static(b"a"), create.clone())).unwrap();
    let second = block_on(objects.put_opts(&path, PutPayload::from_static(b"b"), create));
    assert!(second.is_ok(), "s3rver now refuses: {second:?}");

    let (_dir, job, server) = fixture(Duration::ZERO);
    let url = server.url();
    let args = [
        "run",
        &job,
        "--output",
        "s3://runs/out",
        "--endpoint",
        &url,
        "--model",
        "m",
    ];
    refused(
        &s3rver.env(),
        &args,
        &[
            "s3://runs/out cannot hold claims",
            "succeeded instead of being refused",
            "--trust-single-writer",
        ],
    );
    assert_eq!(server.requests(), 0);
    let lease = block_on(objects.head(&"out/_leases/worker-0-of-1.json".into()));
    assert!(
        matches!(lease, Err(object_store::Error::NotFound { .. })),
        "{lease:?}"
    );

    trusted(&s3rver.env(), &args);
    let rows = ok(run(
        &s3rver.env(),
        &[
            "sql",
            "--root",
            "s3://runs/out",
            "SELECT count(*) AS n FROM rewritten",
        ],
    ));
    assert!(!rows.contains("| 0 "), "{rows}");
}

/// With object_store's conditional puts switched off (`AWS_CONDITIONAL_PUT=disabled`) a create
/// cannot be refused either: the same stop, and the same way out, under which the journal is
/// written too: a stage redone later is answered from it.
#[test]
fn conditional_puts_switched_off_are_refused() {
    let moto = Moto::start(&["runs"]);
    let mut env = moto.env();
    env.push(("AWS_CONDITIONAL_PUT", "disabled".into()));
    let (_dir, job, server) = fixture(Duration::ZERO);
    let url = server.url();
    let args = [
        "run",
        &job,
        "--output",
        "s3://runs/out",
        "--endpoint",
        &url,
        "--model",
        "m",
    ];
    refused(&env, &args, &["cannot hold claims", "AWS_CONDITIONAL_PUT"]);
    assert_eq!(server.requests(), 0);
    trusted(&env, &args);
    let paid = server.requests();
    assert!(paid > 0);

    let objects = moto.store("runs");
    block_on(async {
        let rewritten: Vec<_> = objects
            .list(Some(&"out/rewritten".into()))
            .try_collect()
            .await
            .unwrap();
        for meta in rewritten {
            objects.delete(&meta.location).await.unwrap();
        }
    });
    trusted(&env, &args);
    assert_eq!(server.requests(), paid);
}

/// Runs `args`: the run must stop as a job error whose message says each of `says`.
fn refused(env: &[(&'static str, String)], args: &[&str], says: &[&str]) {
    let out = run(env, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(says.iter().all(|s| stderr.contains(s)), "{stderr}");
}

/// Runs `args` with `--trust-single-writer`: the run must succeed.
fn trusted(env: &[(&'static str, String)], args: &[&str]) {
    let mut trusted = args.to_vec();
    trusted.push("--trust-single-writer");
    ok(run(env, &trusted));
}
