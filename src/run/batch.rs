//! Offline batches: a stage's requests written down for `vllm run-batch` or the OpenAI Batch
//! API, and their results recorded in the journal so the next run uses them.

use std::sync::Arc;

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::job::Job;
use crate::job::catalog::DOCUMENTS;
use crate::job_error;
use crate::llm::capture::Capture;
use crate::llm::journal::Journal;
use crate::llm::pool::LlmPool;
use crate::llm::wire::parse_any_completion;
use crate::root::tables::register_stage_table;
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
    let runner = Runner::new(job, root, pool, journal, Worker::default())?;
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
    let mut stream = ctx.sql(&plan.sql).await?.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        batch?;
    }
    Ok(capture.lines())
}

/// Records the results of an offline batch (`vllm run-batch` output, or an OpenAI Batch
/// output file) in the journal of `job`'s output root, keyed by `custom_id`, so the next run
/// answers those requests without sending them. Returns (recorded, failed) line counts.
pub async fn import_batch_results(job: &Job, file: &str, text: &str) -> Result<(u64, u64)> {
    let root = Location::parse(&job.output)?;
    let journal = Journal::open(&root).await?;
    let imported = journal.import_scope();
    let mut replies = Vec::new();
    let mut failed = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: String| Error::Input {
            file: file.to_string(),
            line: i as u64 + 1,
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
        let parsed = ok
            .then(|| parse_any_completion(&response["body"]))
            .and_then(|r| r.ok());
        match parsed {
            Some(reply) => replies.push((key, reply)),
            None => failed += 1,
        }
    }
    let recorded = replies.len() as u64;
    futures::future::join_all(replies.iter().map(|(k, r)| imported.record(k, r))).await;
    journal.check()?;
    Ok((recorded, failed))
}
