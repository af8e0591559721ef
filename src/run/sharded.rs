//! Stages run shard by shard: each shard of the upstream stage gives one shard of output,
//! published by its marker; the stage is complete once every shard is.

use datafusion::prelude::ParquetReadOptions;
use futures::{StreamExt, TryStreamExt};

use crate::error::Result;
use crate::job::catalog::NEAR_DUPLICATES;
use crate::job_error;
use crate::root::marker::{
    StageStats, read_shard_stats, read_stage_stats, write_shard_stats, write_stage_stats,
};
use crate::root::names::{PartNames, input_shard_of_part, part_file};
use crate::root::objects::{object_url, remove_shards_except};
use crate::run::near_dup::NearDuplicates;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;

impl Runner<'_> {
    /// Runs a stage shard by shard: each shard's output is written, then published by its
    /// marker; shards already published under the same fingerprint (and without failed
    /// rows) are skipped; this worker takes the shards it owns.
    pub(super) async fn run_sharded(&self, plan: &StagePlan, upstream: &str) -> Result<StageStats> {
        let ids = self.shard_ids(plan).await?;
        // Pass 2 of near-dedup: every worker computes the same clusters from all signatures.
        let near = if plan.reads_near_duplicates() {
            Some(self.near_duplicates(plan, upstream).await?)
        } else {
            None
        };
        let near = near.as_ref();
        let mine: Vec<&String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| self.worker.owns(*i))
            .map(|(_, id)| id)
            .collect();
        let up_plan = self.plan(upstream)?;
        self.progress
            .shards_total
            .store(mine.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Enough shards at once that twice the server's slots always have rows waiting, so
        // no shard's tail (or the next shard's start) leaves slots idle.
        let needed = (2 * self.pool.max_concurrency()).div_ceil(self.shard_rows()) + 1;
        let concurrent = self
            .job
            .execution
            .concurrent_shards
            .unwrap_or(needed.max(2))
            .max(1);
        let results: Vec<Result<StageStats>> = futures::stream::iter(mine)
            .map(|id| async move {
                let stats = self.run_shard(plan, up_plan, id, near).await;
                self.progress
                    .shards_done
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats
            })
            .buffer_unordered(concurrent)
            .collect()
            .await;
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            ..StageStats::default()
        };
        for r in results {
            total.absorb(&r?);
        }
        self.publish_if_all_shards(plan, &ids).await?;
        Ok(total)
    }

    /// The shard ids of a sharded stage: those of the stage that read the whole input
    /// upstream of it.
    pub(super) async fn shard_ids(&self, plan: &StagePlan) -> Result<Vec<String>> {
        let mut current = plan;
        while let Some(upstream) = current.sharded_on(self.job) {
            current = self.plan(upstream)?;
        }
        match self.complete(current).await? {
            Some(stats) => Ok(stats.shards),
            None => job_error!(
                "stage '{}' works on the shards of '{}', which has no complete output under {}; run it first (--stages {})",
                plan.name,
                current.name,
                self.root.describe(),
                current.name
            ),
        }
    }

    /// Shard `id` of `plan`, whose input is shard `id` of `up`: its marker when current, else
    /// the shard run and published now.
    pub(super) async fn run_shard(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        id: &str,
        near: Option<&NearDuplicates>,
    ) -> Result<StageStats> {
        let out = self.root.child(&plan.name);
        let up_file = self.root.child(&up.name).path(&part_file(id));
        // The marker this shard's input was published by: the upstream shard's own, or for
        // parts of the input stage the marker of the input file they came from.
        let up_stats = if up.sharded_on(self.job).is_some() {
            read_shard_stats(&self.root, &up.name, id).await?
        } else if let Some(input_shard) = input_shard_of_part(id)
            && up.reads_documents()
        {
            read_shard_stats(&self.root, &up.name, input_shard).await?
        } else {
            read_stage_stats(&self.root, &up.name).await?
        };
        if up_stats
            .as_ref()
            .is_none_or(|s| s.fingerprint != up.fingerprint)
        {
            return job_error!(
                "stage '{}' reads '{}', which has no complete output for shard {id} under {}; run it first (--stages {})",
                plan.name,
                up.name,
                self.root.describe(),
                up.name
            );
        }
        let mut upstream = up_stats.as_ref().map(|s| s.version()).unwrap_or_default();
        if let Some(near) = near {
            // Clusters span shards: a shard is stale when any part of its input changed.
            upstream = format!("{upstream}+{}", near.version);
        }
        if let Some(done) = read_shard_stats(&self.root, &plan.name, id).await?
            && done.is_current(&plan.fingerprint, &upstream)
        {
            return Ok(done);
        }
        // Named by the input file the shard comes from, not by its number (see StageStats).
        let journal_name = match up_stats.as_ref().and_then(|s| s.journal.clone()) {
            Some(name) if up.reads_documents() => match id.split_once('-') {
                Some((_, part)) => format!("{name}-{part}"),
                None => name,
            },
            Some(name) => name,
            None => id.to_string(),
        };
        let journal = self.journal_of(&plan.name, &journal_name).await?;
        let ctx = self.session_for(&journal)?;
        ctx.register_parquet(
            &up.name,
            object_url(&self.root, &up_file),
            ParquetReadOptions::default(),
        )
        .await?;
        if let Some(near) = near {
            ctx.register_table(NEAR_DUPLICATES, near.table.clone())?;
        }
        let mut stats = self
            .execute(&ctx, plan, &out, PartNames::Shard(id.to_string()))
            .await?;
        stats.upstream = upstream;
        stats.journal = Some(journal_name);
        write_shard_stats(&self.root, &plan.name, id, &stats).await?;
        self.compact(&journal).await;
        Ok(stats)
    }

    /// Writes the stage's `_SUCCESS` (totals over all shards) once every shard is published.
    /// Another worker may publish at the same time from markers read a moment earlier, so
    /// after writing, the markers are read again and the totals rewritten until they agree:
    /// the last publication always matches the shards as they are.
    pub(super) async fn publish_if_all_shards(
        &self,
        plan: &StagePlan,
        ids: &[String],
    ) -> Result<()> {
        let Some(mut total) = self.shard_totals(plan, ids).await? else {
            return Ok(());
        };
        let current = ids.iter().cloned().collect();
        remove_shards_except(&self.root.child(&plan.name), &current, |part| part).await?;
        for _ in 0..5 {
            write_stage_stats(&self.root, &plan.name, &total).await?;
            match self.shard_totals(plan, ids).await? {
                Some(again) if again.version() == total.version() => return Ok(()),
                Some(again) => total = again,
                // A shard is being redone: its worker publishes when it is done.
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// The totals over the markers of shards `ids`, read side by side; `None` while any is
    /// missing or of another definition.
    async fn shard_totals(&self, plan: &StagePlan, ids: &[String]) -> Result<Option<StageStats>> {
        let markers: Vec<Option<StageStats>> = futures::stream::iter(ids)
            .map(|id| read_shard_stats(&self.root, &plan.name, id))
            .buffered(32)
            .try_collect()
            .await?;
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards: ids.to_vec(),
            ..StageStats::default()
        };
        for marker in markers {
            match marker {
                Some(s) if s.fingerprint == plan.fingerprint => total.absorb(&s),
                _ => return Ok(None),
            }
        }
        Ok(Some(total))
    }
}
