//! Stages run over all their input at once: the input stage (see `input`), and stages reading
//! several tables, which are one unit of work: whichever process claims it first runs it, and
//! the others wait only while that process is alive.

use crate::error::Result;
use crate::root::marker::{StageStats, read_stage_stats, write_stage_stats};
use crate::root::names::{PartNames, SUCCESS_MARKER};
use crate::root::tables::register_stage_table;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;
use crate::run::units::{Unit, Waiting};
use crate::storage::delete_if_exists;

/// The unit name of a stage run whole.
const WHOLE_STAGE: &str = "all";

impl Runner<'_> {
    /// Runs a stage over all its input at once: the stage reading `documents`, or one reading
    /// several tables (one unit, run by the process that claims it).
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
        let mut waiting = Waiting::new(self.job.execution.wait_secs);
        loop {
            if let Some(done) = self.current_stage(plan, &upstream).await? {
                tracing::info!(stage = %plan.name, "Already complete; skipped.");
                return Ok(done);
            }
            let run = async {
                // Done by another process between the look above and the claim.
                if let Some(done) = self.current_stage(plan, &upstream).await? {
                    return Ok(done);
                }
                self.run_whole_stage(plan, &upstream).await
            };
            match self.claimed(&plan.name, WHOLE_STAGE, run).await? {
                Unit::Done(stats) => return Ok(stats),
                Unit::HeldBy(holder) => {
                    waiting
                        .wait(&plan.name, &[(plan.name.clone(), holder)])
                        .await?;
                }
            }
        }
    }

    /// The stage's `_SUCCESS`, when it was written under the current definition from
    /// `upstream`.
    async fn current_stage(&self, plan: &StagePlan, upstream: &str) -> Result<Option<StageStats>> {
        Ok(self
            .complete(plan)
            .await?
            .filter(|done| self.stands(plan, done, upstream)))
    }

    /// Runs a stage reading several tables, under its claim.
    async fn run_whole_stage(&self, plan: &StagePlan, upstream: &str) -> Result<StageStats> {
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
        stats.upstream = upstream.to_string();
        write_stage_stats(&self.root, &plan.name, &stats).await?;
        self.compact(&journal).await;
        Ok(stats)
    }
}
