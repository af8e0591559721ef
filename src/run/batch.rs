//! Offline batches: a stage's requests written down for `vllm run-batch` or the OpenAI Batch
//! API, and their results recorded in the journal so the next run uses them.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::error::{Context, Error, Result};
use crate::job::Job;
use crate::job::catalog::DOCUMENTS;
use crate::job_error;
use crate::llm::capture::Capture;
use crate::llm::journal::{Journal, JournalScope};
use crate::llm::pool::LlmPool;
use crate::llm::reply::Reply;
use crate::llm::wire::parse_any_completion;
use crate::prepare::ingest::{CappedLine, MAX_LINE_BYTES};
use crate::root::tables::register_stage_table;
use crate::run::claim::Claims;
use crate::run::runner::Runner;
use crate::run::worker::Worker;
use crate::storage::Location;

/// The requests `stage` would send, in the OpenAI batch format (`custom_id` = request key),
/// for `vllm run-batch` or the OpenAI Batch API; requests already answered in the journal are
/// left out. The stage's inputs must be complete; nothing is sent and nothing is written.
pub async fn capture_stage_requests(job: &Job, stage: &str) -> Result<Vec<serde_json::Value>> {
    let root = Location::parse(&job.output)?;
    let journal = Arc::new(Journal::open(&root).await?);
    let capture = Arc::new(Capture::default());
    let pool = Arc::new(LlmPool::capturing(
        job.models.values(),
        Arc::clone(&capture),
    ));
    // Nothing is run, so nothing is claimed.
    let claims = Claims::new(&root, &job.name, false);
    let runner = Runner::new(job, root, pool, journal, Worker::default(), claims)?;
    let name = job.canonical_stage_name(stage);
    if !job.stages.iter().any(|s| s.name == name) {
        let known: Vec<&str> = job.stages.iter().map(|s| s.name.as_str()).collect();
        return job_error!(
            "--stage {stage}: the job has no such stage (stages: {})",
            known.join(", ")
        );
    }
    let plan = runner.plan(name)?;
    let ctx = runner.session_for(&runner.journal.stage_scope(&plan.name).await?)?;
    for table in &plan.tables {
        if table == DOCUMENTS {
            return job_error!(
                "stage '{}' reads the input and calls no LLM; there is nothing to batch",
                plan.name
            );
        }
        runner.require_complete(&plan.name, table).await?;
        register_stage_table(&ctx, &runner.root, table).await?;
    }
    let mut stream = ctx
        .sql_with_options(&plan.sql, crate::run::parts::query_only())
        .await?
        .execute_stream()
        .await?;
    while let Some(batch) = stream.next().await {
        batch?;
    }
    // In key order, not the order calls came: the same requests make the same files (and
    // digests) on every run.
    let mut lines = capture.lines();
    lines.sort_by(|a, b| a["custom_id"].as_str().cmp(&b["custom_id"].as_str()));
    Ok(lines)
}

/// A file's bytes as they arrive, read line by line.
pub type ResultLines = tokio::io::BufReader<
    tokio_util::io::StreamReader<BoxStream<'static, std::io::Result<Bytes>>, Bytes>,
>;

/// `stream` (an object being read, a download) as lines to read.
pub fn result_lines<E: std::fmt::Display>(
    stream: impl futures::Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
) -> ResultLines {
    let stream = stream
        .map(|chunk| chunk.map_err(|e| std::io::Error::other(e.to_string())))
        .boxed();
    tokio::io::BufReader::with_capacity(1 << 20, tokio_util::io::StreamReader::new(stream))
}

/// Results recorded in the journal at a time.
const IMPORT_CHUNK: usize = 4096;

/// Records the results of an offline batch (`vllm run-batch` output, or an OpenAI Batch
/// output file), read as they stream, in the journal of `job`'s output root, keyed by
/// `custom_id`, so the next run answers those requests without sending them. A line longer
/// than the input's line cap counts as failed. Returns (recorded, failed) line counts.
pub async fn import_batch_results(
    job: &Job,
    file: &str,
    mut lines: ResultLines,
) -> Result<(u64, u64)> {
    let root = Location::parse(&job.output)?;
    let journal = Journal::open(&root).await?;
    let imported = journal.import_scope();
    let (mut recorded, mut failed) = (0u64, 0u64);
    let mut replies = Vec::new();
    let mut line = Vec::new();
    for i in 0u64.. {
        line.clear();
        let fits = read_capped_line_async(&mut lines, &mut line, MAX_LINE_BYTES)
            .await
            .with_context(|| format!("{file}:{}", i + 1))?;
        if line.is_empty() && fits {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if !fits {
            failed += 1;
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        match batch_result(&text, file, i + 1)? {
            // Imported before (a command that died before it could say so): not again, nor
            // counted again.
            Some((key, _, _)) if imported.get(&key).is_some() => recorded += 1,
            Some((key, model, mut reply)) => {
                reply.cost_usd = price_of(job, &model, &reply);
                replies.push((key, reply));
            }
            None => failed += 1,
        }
        if replies.len() >= IMPORT_CHUNK {
            recorded += record_all(&imported, &mut replies).await;
        }
    }
    recorded += record_all(&imported, &mut replies).await;
    journal.flush_spend().await?;
    journal.check()?;
    Ok((recorded, failed))
}

/// Records `replies` and empties it; how many there were.
async fn record_all(scope: &JournalScope, replies: &mut Vec<(String, Reply)>) -> u64 {
    futures::future::join_all(replies.iter().map(|(k, r)| scope.record(k, r))).await;
    let n = replies.len() as u64;
    replies.clear();
    n
}

/// What a batch's reply cost at the prices of the job's model it names (OpenAI names
/// `gpt-4o-mini-2024-07-18` what was asked as `gpt-4o-mini`): the API's batch discount is not
/// taken off, so a budget errs on the safe side. Nothing for a model the job does not name.
fn price_of(job: &Job, model: &str, reply: &Reply) -> f64 {
    job.models
        .values()
        .filter(|m| !m.model.is_empty() && model.starts_with(m.model.as_str()))
        .max_by_key(|m| m.model.len())
        .map_or(0.0, |m| {
            m.cost_usd(
                reply.prompt_tokens,
                reply.cached_tokens,
                reply.completion_tokens,
            )
        })
}

/// One result line: the request's key, the model that answered and its reply, or `None`
/// for a failed request.
fn batch_result(line: &str, file: &str, line_no: u64) -> Result<Option<(String, String, Reply)>> {
    let bad = |message: String| Error::Input {
        file: file.to_string(),
        line: line_no,
        message,
    };
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| bad(format!("not valid JSON: {e}; is this a batch output file?")))?;
    let key = v["custom_id"]
        .as_str()
        .ok_or_else(|| bad("no custom_id; is this a batch output file?".into()))?
        .to_string();
    let response = &v["response"];
    let ok = response["status_code"].as_u64() == Some(200) && v["error"].is_null();
    let model = response["body"]["model"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(ok
        .then(|| parse_any_completion(&response["body"]))
        .and_then(|r| r.ok())
        .map(|reply| (key, model, reply)))
}

/// [`read_capped_line`](crate::prepare::ingest::read_capped_line) for an async reader.
async fn read_capped_line_async(
    reader: &mut ResultLines,
    out: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<bool> {
    use tokio::io::AsyncBufReadExt;
    let mut line = CappedLine::new(cap);
    loop {
        let chunk = reader.fill_buf().await?;
        let (taken, done) = line.take(chunk, out);
        reader.consume(taken);
        if done {
            return Ok(line.fits);
        }
    }
}
