//! Running a job: stages as SQL over named tables, each stage's result streamed to Parquet
//! under `<output>/<stage>/` and published by its marker last (the layout is `root`'s).
//!
//! A stage's SQL may return a `_drop` column: rows where it is NULL are the stage's output,
//! the others go to `<stage>/_dropped/` with the reason in `drop_reason`, and every reason is
//! counted in the stage's `_SUCCESS` marker. So every row that entered a stage is either in
//! its output or in a counted drop.

pub mod batch;
pub mod claim;
mod exact_dedup;
mod global;
mod input;
pub mod lease;
pub mod manifest;
mod near_dup;
mod parts;
pub mod plan;
pub mod progress;
mod runner;
mod sharded;
mod units;
pub mod worker;

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::job::{Job, ModelSpec};
use crate::llm::budget::Budget;
use crate::llm::journal::Journal;
use crate::llm::pool::LlmPool;
use crate::prepare::decontaminate;
use crate::root::marker::StageStats;
use crate::run::claim::Claims;
use crate::run::lease::{Lease, Processes};
use crate::run::plan::Step;
use crate::run::progress::{Progress, Reporter};
use crate::run::runner::{AbortOnDrop, Runner};
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
    /// Take the worker's lease even on a store that does not refuse a second create.
    pub trust_single_writer: bool,
}

/// Runs the stages of `job` that `opts` selects, in job order.
pub async fn run(job: &Job, opts: &RunOptions) -> Result<RunSummary> {
    let root = Location::parse(&job.output)?;
    let claims = Claims::new(&root, &job.name, opts.trust_single_writer);
    let lease = Lease::acquire(&claims, opts.worker, opts.trust_single_writer).await?;
    let result = run_stages(job, opts, root, &claims, &lease).await;
    let released = lease.release().await;
    // The run's own error comes first; a lease left behind lapses.
    match (result, released) {
        (Err(e), Err(lease)) => {
            tracing::warn!(error = %lease, "Could not give the worker's lease back.");
            Err(e)
        }
        (result, released) => {
            released?;
            result
        }
    }
}

/// [`run`], with this worker's lease on the root held.
async fn run_stages(
    job: &Job,
    opts: &RunOptions,
    root: Location,
    claims: &Arc<Claims>,
    lease: &Lease,
) -> Result<RunSummary> {
    let to_run = job.select_stages(&opts.stages)?;
    // The benchmark files as they are now enter the fingerprints, whatever stages run.
    let (with_benchmarks, benchmark_files) = match &job.decontamination {
        Some(d) => {
            let files = decontaminate::BenchmarkFiles::list(d).await?;
            let mut listed = job.clone();
            listed.decontamination = Some(decontaminate::Decontamination {
                files: files.digest(),
                ..d.clone()
            });
            (Some(listed), Some(files))
        }
        None => (None, None),
    };
    let job = with_benchmarks.as_ref().unwrap_or(job);
    let mut journal = Journal::open(&root).await?;
    journal
        .sync_local_writes(job.execution.fsync.unwrap_or(false))
        .await;
    let journal = Arc::new(journal);
    if journal.loaded() > 0 {
        tracing::info!(
            responses = journal.loaded(),
            "Shared journal responses loaded."
        );
    }
    let models: Vec<&ModelSpec> = job.models.values().collect();
    // What earlier runs and the other workers have spent is in the journal; what is left is
    // split between the worker slots, each slot's earlier processes counted against it.
    let budget = match job.execution.budget_usd {
        Some(b) => {
            let share = journal
                .budget_share(b, opts.worker.index, opts.worker.count)
                .await;
            Some(Budget::new(share, b))
        }
        None => None,
    };
    let pool = Arc::new(LlmPool::new(models, budget));
    // Until the other processes are seen, the slots are shared as if every worker ran.
    let processes = lease.processes();
    let (running, rank) = processes.count().await?;
    pool.share(running.max(opts.worker.count), rank.max(opts.worker.index));
    let _sharing = AbortOnDrop(tokio::spawn(keep_sharing(processes, Arc::clone(&pool))));
    let mut runner = Runner::new(job, root, pool, journal, opts.worker, Arc::clone(claims))?;
    manifest::reconcile(&runner.root, job, &runner.fingerprints, opts.allow_changes).await?;
    if let Some(files) = &benchmark_files {
        runner.benchmarks = benchmark_index(job, &runner.plans, &to_run, files).await?;
    }
    let result = run_steps(job, &to_run, &mut runner).await;
    // However the run ended, what it spent is recorded for the budget of the next.
    let flushed = runner.journal.flush_spend().await;
    let summary = result?;
    flushed?;
    Ok(summary)
}

/// The index of the benchmark `files`, when one of the stages `to_run` checks rows against it.
async fn benchmark_index(
    job: &Job,
    plans: &[plan::StagePlan],
    to_run: &[String],
    files: &decontaminate::BenchmarkFiles,
) -> Result<Option<Arc<decontaminate::BenchmarkIndex>>> {
    let Some(settings) = &job.decontamination else {
        return Ok(None);
    };
    let checks = plans
        .iter()
        .any(|p| to_run.contains(&p.name) && decontaminate::checks_benchmarks(&p.sql));
    if !checks {
        return Ok(None);
    }
    let started = Instant::now();
    let index = decontaminate::BenchmarkIndex::build(settings, files).await?;
    tracing::info!(
        files = index.stats.files,
        items = index.stats.items,
        ngrams = index.stats.grams,
        boilerplate = index.stats.boilerplate,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "Benchmark index built."
    );
    Ok(Some(Arc::new(index)))
}

/// Runs the selected stages, step by step (see [`plan::steps`]).
async fn run_steps(job: &Job, to_run: &[String], runner: &mut Runner<'_>) -> Result<RunSummary> {
    let mut summary = RunSummary::default();
    let plans = runner.plans.clone();
    for step in plan::steps(&plans, job, to_run) {
        let names: Vec<&str> = match &step {
            Step::Global(plan) => vec![plan.name.as_str()],
            Step::Sharded(group) => group.iter().map(|p| p.name.as_str()).collect(),
        };
        let started = Instant::now();
        tracing::info!(stages = names.join(", "), "Started.");
        runner.progress = Arc::new(Progress::default());
        let _reporter = Reporter::start(
            &names.join(", "),
            Arc::clone(&runner.progress),
            Arc::clone(&runner.pool),
        );
        let done = match &step {
            Step::Global(plan) => {
                let mut stats = runner.run_global(plan).await?;
                stats.seconds = started.elapsed().as_secs_f64();
                vec![stats]
            }
            Step::Sharded(group) => runner.run_pipelined(group).await?,
        };
        runner.journal.check()?;
        if let Some(quota) = runner
            .pool
            .quota_exhausted()
            .or_else(|| runner.pool.budget_spent())
        {
            let failed: u64 = done.iter().map(StageStats::failed).sum();
            return Err(Error::Execution(format!(
                "stage '{}' stopped: {quota}. Completed work is kept ({failed} rows are in `{}/_dropped/` with reason llm_error); rerun when the quota is restored",
                names.join("', '"),
                names.join("/_dropped/`, `")
            )));
        }
        for stats in done {
            tracing::info!(
                stage = %stats.stage,
                rows_in = stats.rows_in,
                rows_out = stats.rows_out,
                requests = stats.llm.requests,
                journaled = stats.llm.journaled,
                seconds = format!("{:.1}", stats.seconds),
                "Stage done."
            );
            summary.stages.push(stats);
        }
    }
    tracing::info!(
        objects = runner.journal.objects_read(),
        found_in_other_shards = runner.journal.found_elsewhere(),
        lines_skipped = runner.journal.skipped_lines(),
        "Journal objects read."
    );
    Ok(summary)
}

/// How often a process looks at how many run on the job, to take its share of the caps.
const SHARE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
/// The first look, soon after start, when the workers of an array start together.
const FIRST_SHARE: std::time::Duration = std::time::Duration::from_secs(2);

/// Divides the job's caps and rates between the processes running on it, as they come and
/// go: a worker alone takes them whole, four at once a quarter each.
async fn keep_sharing(processes: Processes, pool: Arc<LlmPool>) {
    let mut shared = None;
    let mut wait = FIRST_SHARE;
    loop {
        tokio::time::sleep(wait).await;
        wait = SHARE_EVERY;
        match processes.count().await {
            Ok(now) if shared != Some(now) => {
                tracing::debug!(processes = now.0, "Sharing the job's caps and rates.");
                pool.share(now.0, now.1);
                shared = Some(now);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Could not count the processes on the root."),
        }
    }
}
