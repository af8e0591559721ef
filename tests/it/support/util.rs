//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A server program the tests start: `$env` when set, else `installed` under the repository
/// (where `.ci/run` puts it), else `name` on the `PATH`.
pub fn tool(env: &str, installed: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let local = repo().join(installed);
    if local.exists() {
        return local;
    }
    PathBuf::from(name)
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the built `backforth` binary with `args`, from the repository root.
pub fn backforth<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    backforth_with(args, &[])
}

/// Like [`backforth`], with the variables `env` set (a key, another log level).
pub fn backforth_with<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &[(&str, &str)],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backforth"))
        .args(args)
        .current_dir(repo())
        .env("BACKFORTH_LOG", "warn")
        .env_remove("OPENAI_API_KEY")
        .envs(env.iter().copied())
        .output()
        .expect("the backforth binary runs")
}

/// The rows a stage's marker counts as dropped, over every reason.
pub fn dropped_total(marker: &serde_json::Value) -> u64 {
    marker["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// Like [`backforth`], failing the test with the output when the exit code is not 0.
pub fn backforth_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = backforth(args);
    assert!(
        out.status.success(),
        "backforth {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The standard output of a program that must have succeeded; otherwise the test fails with
/// both outputs.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A session with every stage directory under `root` that has a `_SUCCESS` registered.
pub async fn session(root: &Path) -> SessionContext {
    let ctx = SessionContext::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("_SUCCESS").exists() {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            ctx.register_parquet(&name, dir.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            let dropped = dir.join("_dropped");
            if dropped.exists() {
                ctx.register_parquet(
                    format!("{name}_dropped"),
                    dropped.to_str().unwrap(),
                    ParquetReadOptions::default(),
                )
                .await
                .unwrap();
            }
        }
    }
    ctx
}

/// Runs `sql` and returns every value as a string (NULL as "NULL"), row by row.
pub async fn rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    let batches: Vec<RecordBatch> = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for batch in &batches {
        for r in 0..batch.num_rows() {
            out.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            "NULL".to_string()
                        } else {
                            datafusion::arrow::util::display::array_value_to_string(c, r).unwrap()
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

/// A single integer from a one-row, one-column query.
pub async fn count(ctx: &SessionContext, sql: &str) -> i64 {
    rows(ctx, sql).await[0][0].parse().unwrap()
}

/// The `_SUCCESS` marker of a stage, parsed.
pub fn marker(root: &Path, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join(stage).join("_SUCCESS")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Writes the rows of `sql` to the Parquet file `path`.
pub async fn copy_to_parquet(ctx: &SessionContext, sql: &str, path: &Path) {
    ctx.sql(&format!(
        "COPY ({sql}) TO '{}' STORED AS PARQUET",
        path.display()
    ))
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
}

/// Runs `workers` workers of `job` at the same time with `args`; returns their outputs.
pub fn run_workers(job: &str, workers: usize, args: &[&str]) -> Vec<std::process::Output> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                s.spawn(move || {
                    std::process::Command::new(env!("CARGO_BIN_EXE_backforth"))
                        .args(["run", job])
                        .args(args)
                        .args(["--worker", &format!("{i}/{workers}")])
                        .env("BACKFORTH_LOG", "warn")
                        .output()
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
