//! Stages run over all their input at once: the input stage (by worker 0) and stages reading
//! several tables.

use crate::error::Result;
use crate::root::marker::{StageStats, read_stage_stats, write_stage_stats};
use crate::root::names::{PartNames, SUCCESS_MARKER};
use crate::root::objects::delete_if_exists;
use crate::root::tables::register_stage_table;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;

impl Runner<'_> {
    /// Runs a stage over all its input at once (stages reading `documents` or several
    /// tables). Worker 0 runs it; other workers wait for its `_SUCCESS`.
    pub(super) async fn run_global(&self, plan: &StagePlan) -> Result<StageStats> {
        if plan.reads_documents() {
            if self.worker.index != 0 {
                return self.wait_for(plan).await;
            }
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
        let ctx = self.session()?;
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
        Ok(stats)
    }

    async fn wait_for(&self, plan: &StagePlan) -> Result<StageStats> {
        tracing::info!(
            stage = %plan.name,
            "Waiting for worker 0 to complete this stage (it reads the whole input)."
        );
        loop {
            if let Some(done) = self.complete(plan).await? {
                return Ok(done);
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    }
}
