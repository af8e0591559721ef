//! Stages run over all their input at once (the input stage, whose shards every worker shares;
//! stages reading several tables, run by worker 0), and how a worker waits for the others.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::execution_error;
use crate::root::marker::{StageStats, read_stage_stats, write_stage_stats};
use crate::root::names::{PartNames, SUCCESS_MARKER};
use crate::root::tables::register_stage_table;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;
use crate::storage::delete_if_exists;

impl Runner<'_> {
    /// Runs a stage over all its input at once: the stage reading `documents`, or one reading
    /// several tables (worker 0 runs it; the other workers wait for its `_SUCCESS`).
    pub(super) async fn run_global(&self, plan: &StagePlan) -> Result<StageStats> {
        if plan.reads_documents() {
            return self.run_input_stage(plan).await;
        }
        let mut upstream = Vec::new();
        for table in &plan.tables {
            self.require_complete(&plan.name, table).await?;
            let stats = read_stage_stats(&self.root, table).await?;
            upstream.push(stats.map(|s| s.version()).unwrap_or_default());
        }
        let upstream = upstream.join("+");
        if let Some(done) = self.complete(plan).await?
            && done.is_current(&plan.fingerprint, &upstream)
        {
            tracing::info!(stage = %plan.name, "Already complete; skipped.");
            return Ok(done);
        }
        if self.worker.index != 0 {
            return self.wait_for(plan).await;
        }
        let journal = self.journal_of(&plan.name, "all").await?;
        let ctx = self.session_for(&journal)?;
        for table in &plan.tables {
            register_stage_table(&ctx, &self.root, table).await?;
        }
        let out = self.root.child(&plan.name);
        // A rerun replaces the stage: the marker goes first, so a crash leaves it incomplete.
        delete_if_exists(&self.root, &out.path(SUCCESS_MARKER)).await?;
        out.delete_all().await?;
        let mut stats = self
            .execute(
                &ctx,
                plan,
                &out,
                PartNames::Numbered {
                    shard: None,
                    rows: self.shard_rows(),
                },
            )
            .await?;
        stats.upstream = upstream;
        write_stage_stats(&self.root, &plan.name, &stats).await?;
        self.compact(&journal).await;
        Ok(stats)
    }

    /// Waits for worker 0 to complete `plan`.
    async fn wait_for(&self, plan: &StagePlan) -> Result<StageStats> {
        let what = format!(
            "worker 0 to complete '{}' (it reads several tables, so one worker runs it)",
            plan.name
        );
        self.wait_until(&what, || self.complete(plan)).await
    }

    /// Polls `check` until it gives a value, saying every minute what it waits for; stops
    /// after `[execution] wait_secs` (default an hour) with a message naming it.
    pub(super) async fn wait_until<T, F, Fut>(&self, what: &str, check: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let limit = Duration::from_secs(self.job.execution.wait_secs.unwrap_or(3600));
        let started = Instant::now();
        let mut said = None::<Instant>;
        loop {
            if let Some(done) = check().await? {
                return Ok(done);
            }
            if started.elapsed() >= limit {
                return execution_error!(
                    "this process is worker {} of {} and waited {} s for {what}; run the other workers with the same job and output (--worker I/N), or this one with --worker 0/1 to run alone. [execution] wait_secs sets how long to wait",
                    self.worker.index,
                    self.worker.count,
                    limit.as_secs()
                );
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::info!(
                    worker = format!("{}/{}", self.worker.index, self.worker.count),
                    "Waiting for {what}."
                );
                said = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}
