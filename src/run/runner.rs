//! What every stage of a run shares: the job, the output root, the model clients and
//! journal, the stage plans; and how a stage's SQL is executed into parts.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::prelude::SessionContext;

use crate::engine::prepare_functions::PrepareRules;
use crate::engine::session::{new_session, register_functions, register_store};
use crate::engine::window::Window;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::job_error;
use crate::llm::journal::{Journal, JournalScope};
use crate::llm::pool::LlmPool;
use crate::prepare::decontaminate::BenchmarkIndex;
use crate::prepare::tokens::TokenCounter;
use crate::root::marker::{StageStats, read_stage_stats};
use crate::root::names::PartNames;
use crate::run::claim::Claims;
use crate::run::exact_dedup::FirstCopies;
use crate::run::manifest;
use crate::run::parts::execute_to_parts;
use crate::run::plan::{StagePlan, plan_stages};
use crate::run::progress::Progress;
use crate::run::worker::Worker;
use crate::storage::Location;

/// What every stage of a run shares.
pub(super) struct Runner<'a> {
    pub(super) job: &'a Job,
    pub(super) root: Location,
    pub(super) pool: Arc<LlmPool>,
    pub(super) journal: Arc<Journal>,
    pub(super) tokens: TokenCounter,
    pub(super) window: Window,
    pub(super) worker: Worker,
    /// This process's claims on units of work.
    pub(super) claims: Arc<Claims>,
    /// Unix milliseconds when this run started: outputs with failed rows written since stand
    /// (see [`StageStats::stands`]).
    pub(super) started_at: u64,
    pub(super) plans: Vec<StagePlan>,
    pub(super) fingerprints: BTreeMap<String, manifest::Fingerprint>,
    pub(super) progress: Arc<Progress>,
    /// The benchmark n-gram index, built when a stage to run checks rows against it.
    pub(super) benchmarks: Option<Arc<BenchmarkIndex>>,
}

impl<'a> Runner<'a> {
    /// Binds `job` to its output root, clients and journal, and plans every stage.
    pub(super) fn new(
        job: &'a Job,
        root: Location,
        pool: Arc<LlmPool>,
        journal: Arc<Journal>,
        worker: Worker,
        claims: Arc<Claims>,
    ) -> Result<Self> {
        let mut runner = Runner {
            job,
            window: Window::for_cap(pool.configured_concurrency()),
            tokens: TokenCounter::load(&job.prepare.tokenizer, &job.base_dir)?,
            root,
            pool,
            journal,
            worker,
            claims,
            started_at: crate::run::claim::unix_millis(),
            plans: Vec::new(),
            fingerprints: BTreeMap::new(),
            progress: Arc::new(Progress::default()),
            benchmarks: None,
        };
        let (plans, fingerprints) = plan_stages(job, &runner.session()?)?;
        runner.plans = plans;
        runner.fingerprints = fingerprints;
        Ok(runner)
    }
}

impl Runner<'_> {
    /// A fresh session for work that calls no LLM (planning, dedup passes).
    pub(super) fn session(&self) -> Result<SessionContext> {
        self.session_with(self.job.execution.target_partitions, &JournalScope::none())
    }

    /// A fresh session with every function registered, its LLM functions answering from and
    /// recording in `journal`; one per stage or shard, so shards can bind the same table name
    /// to different files at the same time.
    pub(super) fn session_for(&self, journal: &Arc<JournalScope>) -> Result<SessionContext> {
        self.session_with(self.job.execution.target_partitions, journal)
    }

    /// A fresh session of `target_partitions` partitions (the job's when `None`).
    pub(super) fn session_with(
        &self,
        target_partitions: Option<usize>,
        journal: &Arc<JournalScope>,
    ) -> Result<SessionContext> {
        let ctx = new_session(target_partitions, self.window)?;
        register_store(&ctx, &self.root);
        let functions: Vec<_> =
            self.job
                .functions
                .iter()
                .map(|f| {
                    let client =
                        self.pool.model(&f.role).cloned().ok_or_else(|| {
                            Error::Internal(format!("no client for role {}", f.role))
                        })?;
                    Ok((f.clone(), client))
                })
                .collect::<Result<_>>()?;
        register_functions(
            &ctx,
            &functions,
            journal,
            self.tokens.clone(),
            PrepareRules {
                quality: self.job.prepare.quality.clone(),
                near_dedup: self.job.prepare.near_dedup.unwrap_or_default(),
            },
            self.benchmarks.clone(),
        )?;
        Ok(ctx)
    }

    /// The stage's `_SUCCESS`, if it is complete under the current fingerprint.
    pub(super) async fn complete(&self, plan: &StagePlan) -> Result<Option<StageStats>> {
        Ok(read_stage_stats(&self.root, &plan.name)
            .await?
            .filter(|s| s.fingerprint == plan.fingerprint))
    }

    /// Whether the marker `done` of stage `plan` stands, read from `upstream`.
    pub(super) fn stands(&self, plan: &StagePlan, done: &StageStats, upstream: &str) -> bool {
        done.stands(&plan.fingerprint, upstream, self.started_at)
    }

    /// Fails, saying what to run first, when `table` (read by `stage`) is not complete.
    pub(super) async fn require_complete(&self, stage: &str, table: &str) -> Result<()> {
        let plan = self.plan(table)?;
        if self.complete(plan).await?.is_none() {
            return job_error!(
                "stage '{stage}' reads '{table}', which has no complete output under {}; run it first (--stages {table})",
                self.root.describe()
            );
        }
        Ok(())
    }

    /// The plan of `stage`.
    pub(super) fn plan(&self, stage: &str) -> Result<&StagePlan> {
        self.plans
            .iter()
            .find(|p| p.name == stage)
            .ok_or_else(|| Error::Internal(format!("no plan for stage {stage}")))
    }

    /// Runs `plan`'s SQL in `ctx` and writes it under `out`; the counts name the stage, its
    /// fingerprint and the parts written.
    pub(super) async fn execute(
        &self,
        ctx: &SessionContext,
        plan: &StagePlan,
        out: &Location,
        names: PartNames,
    ) -> Result<StageStats> {
        self.execute_with(ctx, plan, out, names, None).await
    }

    /// [`Runner::execute`], dropping repeated texts with `first_copies` (the input stage).
    pub(super) async fn execute_with(
        &self,
        ctx: &SessionContext,
        plan: &StagePlan,
        out: &Location,
        names: PartNames,
        first_copies: Option<FirstCopies>,
    ) -> Result<StageStats> {
        // A task of its own, so shards running side by side also encode their Parquet on
        // different threads; aborted if this future is dropped (its claim was taken over), so
        // it writes no part after the unit's new holder started.
        let mut task = AbortOnDrop(tokio::spawn(execute_to_parts(
            ctx.clone(),
            plan.sql.clone(),
            plan.tables.clone(),
            out.clone(),
            names,
            Arc::clone(&self.progress),
            first_copies,
            self.job.execution.fsync.unwrap_or(false),
        )));
        let (stats, shards) = (&mut task)
            .await
            .map_err(|e| Error::Internal(format!("a stage's writer task failed: {e}")))??;
        // Rows that met a spent budget were written as failed: such output is not published.
        self.budget_left(&plan.name)?;
        Ok(StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards,
            ..stats
        })
    }

    /// The journal of shard `shard` of `stage`.
    pub(super) async fn journal_of(&self, stage: &str, shard: &str) -> Result<Arc<JournalScope>> {
        self.journal.scope(stage, shard).await
    }

    /// Folds a published shard's journal into one object; a failure only leaves more
    /// objects to read next time.
    pub(super) async fn compact(&self, journal: &JournalScope) {
        if let Err(e) = journal.compact().await {
            tracing::warn!(error = %e, "Could not compact a shard's journal.");
        }
    }

    /// Rows per part of the stages that cut their output into shards.
    pub(super) fn shard_rows(&self) -> usize {
        self.job.execution.shard_rows.unwrap_or(10_000).max(1)
    }
}

/// A spawned task that is aborted when its handle is dropped: work under a claim that was
/// taken over stops with it.
pub(super) struct AbortOnDrop<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
