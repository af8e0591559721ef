//! Running a job: stages as SQL over named tables, each stage's result streamed to Parquet
//! under `<output>/<stage>/` and published by its marker last (the layout is `root`'s).
//!
//! A stage's SQL may return a `_drop` column: rows where it is NULL are the stage's output,
//! the others go to `<stage>/_dropped/` with the reason in `drop_reason`, and every reason is
//! counted in the stage's `_SUCCESS` marker. So every row that entered a stage is either in
//! its output or in a counted drop.

pub mod batch;
mod exact_dedup;
mod global;
mod input;
pub mod manifest;
mod near_dup;
mod parts;
pub mod plan;
pub mod progress;
mod runner;
mod sharded;
pub mod worker;

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::job::Job;
use crate::llm::journal::Journal;
use crate::llm::pool::LlmPool;
use crate::root::marker::StageStats;
use crate::run::progress::{Progress, Reporter};
use crate::run::runner::Runner;
use crate::run::worker::Worker;
use crate::storage::Location;

/// Summary of a run, one entry per stage run.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Stats of the stages that ran, in order.
    pub stages: Vec<StageStats>,
}

impl RunSummary {
    /// Rows whose LLM call failed after every retry, over all stages.
    pub fn llm_failures(&self) -> u64 {
        self.stages.iter().map(StageStats::failed).sum()
    }
}

/// Options of one `backforth run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages to run (all when empty); verbs such as `prepare` are accepted.
    pub stages: Vec<String>,
    /// This process's share of the shards.
    pub worker: Worker,
    /// Continue although the job changed since the output root was written: stages whose
    /// fingerprint changed are recomputed (the journal still answers unchanged requests).
    pub allow_changes: bool,
}

/// Runs the stages of `job` that `opts` selects, in job order.
pub async fn run(job: &Job, opts: &RunOptions) -> Result<RunSummary> {
    let to_run = job.select_stages(&opts.stages)?;
    let root = Location::parse(&job.output)?;
    let journal = Arc::new(Journal::open(&root).await?);
    if journal.loaded() > 0 {
        tracing::info!(responses = journal.loaded(), "Response journal loaded.");
    }
    let pool = Arc::new(LlmPool::new(
        job.models.values(),
        Arc::clone(&journal),
        job.execution.budget_usd,
    ));
    let mut runner = Runner::new(job, root, pool, journal, opts.worker)?;
    manifest::reconcile(&runner.root, job, &runner.fingerprints, opts.allow_changes).await?;
    let mut summary = RunSummary::default();
    for plan in runner.plans.clone() {
        if !to_run.contains(&plan.name) {
            continue;
        }
        let started = Instant::now();
        tracing::info!(stage = %plan.name, "Stage started.");
        runner.progress = Arc::new(Progress::default());
        let _reporter = Reporter::start(
            &plan.name,
            Arc::clone(&runner.progress),
            Arc::clone(&runner.pool),
        );
        let mut stats = match plan.sharded_on(job) {
            Some(upstream) => runner.run_sharded(&plan, upstream).await?,
            None => runner.run_global(&plan).await?,
        };
        runner.journal.check()?;
        if let Some(quota) = runner
            .pool
            .quota_exhausted()
            .or_else(|| runner.pool.budget_spent())
        {
            return Err(Error::Execution(format!(
                "stage '{}' stopped: {quota}. Completed work is kept ({} rows of this stage are in `{}/_dropped/` with reason llm_error); rerun when the quota is restored",
                plan.name,
                stats.failed(),
                plan.name
            )));
        }
        stats.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            stage = %plan.name,
            rows_in = stats.rows_in,
            rows_out = stats.rows_out,
            requests = stats.llm.requests,
            journaled = stats.llm.journaled,
            seconds = format!("{:.1}", stats.seconds),
            "Stage done."
        );
        summary.stages.push(stats);
    }
    Ok(summary)
}
