//! Stages run shard by shard: each shard of the upstream stage gives one shard of output,
//! published by its marker; the stage is complete once every shard is. Consecutive sharded
//! stages run together, a shard entering the next stage as soon as it leaves the last.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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

/// How often shard admission looks at the calls outstanding.
const ADMISSION_LOOK: Duration = Duration::from_millis(50);
/// How many times the shards the first stage needs may be under way, for stages that send
/// fewer calls.
const MORE_SHARDS: usize = 4;

impl Runner<'_> {
    /// Runs sharded stages together, shard by shard: each shard goes through the stages in
    /// turn (stages reading the same table side by side), each stage's shard published by its
    /// marker as soon as it is written, so a shard's next stage starts while other shards are
    /// still in earlier ones and no stage's tail leaves the servers idle. Shards already
    /// published under the same fingerprint (and without failed rows) are skipped; this
    /// worker takes the shards it owns. Returns each stage's totals, in the order given.
    pub(super) async fn run_pipelined(&self, plans: &[&StagePlan]) -> Result<Vec<StageStats>> {
        let root = self.shard_root(plans[0]).await?;
        let ids = root.shards.clone();
        let mut ups = Vec::new();
        let mut nears = Vec::new();
        let mut depth: Vec<usize> = Vec::new();
        for plan in plans {
            let upstream = plan.sharded_on(self.job).expect("a sharded stage");
            ups.push(self.plan(upstream)?);
            // Pass 2 of near-dedup: every worker computes the same clusters from all
            // signatures (the upstream is complete: `steps` puts it in an earlier step).
            nears.push(if plan.reads_near_duplicates() {
                Some(self.near_duplicates(plan, upstream).await?)
            } else {
                None
            });
            let level = plans
                .iter()
                .position(|p| p.name == upstream)
                .map_or(0, |j| depth[j] + 1);
            depth.push(level);
        }
        let levels = depth.iter().max().map_or(0, |d| d + 1);
        let mine: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| self.worker.owns(*i))
            .map(|(_, id)| id.clone())
            .collect();
        self.progress
            .shards_total
            .store((mine.len() * plans.len()) as u64, Ordering::Relaxed);
        let (ups, nears, depth) = (&ups, &nears, &depth);
        // One shard through every stage; a failed stage stops the shard's later levels.
        let chain = |id: String| async move {
            let mut done: Vec<Option<(Result<StageStats>, Instant)>> =
                (0..plans.len()).map(|_| None).collect();
            let id = &id;
            for level in 0..levels {
                let runs = (0..plans.len())
                    .filter(|i| depth[*i] == level)
                    .map(|i| async move {
                        let stats = self
                            .run_shard(plans[i], ups[i], id, nears[i].as_ref())
                            .await;
                        self.progress.shards_done.fetch_add(1, Ordering::Relaxed);
                        (i, stats)
                    });
                let mut failed = false;
                for (i, stats) in futures::future::join_all(runs).await {
                    failed |= stats.is_err();
                    done[i] = Some((stats, Instant::now()));
                }
                if failed {
                    break;
                }
            }
            done
        };
        let started = Instant::now();
        let mut totals: Vec<StageStats> = plans
            .iter()
            .map(|plan| StageStats {
                stage: plan.name.clone(),
                fingerprint: plan.fingerprint.clone(),
                ..StageStats::default()
            })
            .collect();
        let mut last = vec![started; plans.len()];
        let mut first_error = None;
        // Folded in as each chain ends: a shard's counts are not kept past its chain, so
        // what the run holds does not grow with the number of shards.
        let fold = |done: Vec<Option<(Result<StageStats>, Instant)>>| {
            for (i, outcome) in done.into_iter().enumerate() {
                match outcome {
                    Some((Ok(stats), at)) => {
                        totals[i].absorb(&stats);
                        last[i] = last[i].max(at);
                    }
                    Some((Err(e), _)) => {
                        first_error.get_or_insert(e);
                    }
                    None => {}
                }
            }
        };
        self.admit_shards(mine, chain, self.shards_at_once(&root), fold)
            .await;
        if let Some(e) = first_error {
            return Err(e);
        }
        for (total, at) in totals.iter_mut().zip(last) {
            total.seconds = (at - started).as_secs_f64();
        }
        for plan in plans {
            self.publish_if_all_shards(plan, &ids).await?;
        }
        Ok(totals)
    }

    /// Runs `chain` for every shard of `mine`, keeping `at_once.0` shards under way and
    /// starting more (up to `at_once.1`) while the servers have fewer than twice their slots'
    /// worth of calls outstanding: a stage that sends few calls (or none) then leaves room
    /// for other shards, and memory follows the slots, not the corpus. Each chain's result
    /// goes to `done` as it ends.
    async fn admit_shards<F, Fut, T>(
        &self,
        mine: Vec<String>,
        chain: F,
        at_once: (usize, usize),
        mut done: impl FnMut(T),
    ) where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (least, most) = at_once;
        let wanted = 2 * self.pool.max_concurrency();
        let mut queue = mine.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            // Beyond the least, one more shard per look: its calls must show in the count
            // before the next is judged. The last shards go in together once `most` holds
            // them: their chains are the job's tail, and started late they would run at the
            // end with the servers idle.
            let mut extra = false;
            while running.len() < least
                || queue.len() + running.len() <= most
                || (!extra && running.len() < most && self.pool.outstanding() < wanted)
            {
                let Some(id) = queue.next() else { break };
                extra |= running.len() >= least;
                running.push(chain(id));
            }
            if running.is_empty() {
                return;
            }
            tokio::select! {
                Some(chain) = running.next() => done(chain),
                () = tokio::time::sleep(ADMISSION_LOOK) => {}
            }
        }
    }

    /// How many shards to keep under way (least, most): enough that twice the servers' slots
    /// have rows waiting at the first stage, and up to [`MORE_SHARDS`] times that when later
    /// stages send fewer calls, so memory follows the slots and not the corpus;
    /// `[execution] concurrent_shards` fixes both.
    fn shards_at_once(&self, root: &StageStats) -> (usize, usize) {
        if let Some(fixed) = self.job.execution.concurrent_shards {
            return (fixed.max(1), fixed.max(1));
        }
        let rows_per_shard = (root.rows_out as usize / root.shards.len().max(1)).max(1);
        let least = ((2 * self.pool.max_concurrency()).div_ceil(rows_per_shard) + 1).max(2);
        (least, MORE_SHARDS * least)
    }

    /// The marker of the stage that read the whole input upstream of a sharded stage: its
    /// shards are the sharded stage's.
    pub(super) async fn shard_root(&self, plan: &StagePlan) -> Result<StageStats> {
        let mut current = plan;
        while let Some(upstream) = current.sharded_on(self.job) {
            current = self.plan(upstream)?;
        }
        match self.complete(current).await? {
            Some(stats) => Ok(stats),
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
        // A journal that cannot be written stops new work at once, not at the end of the
        // stages running together: nothing more is paid for that a crash would lose.
        self.journal.check()?;
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

    /// The totals over the markers of shards `ids`, read side by side and added up as they
    /// come; `None` while any is missing or of another definition.
    async fn shard_totals(&self, plan: &StagePlan, ids: &[String]) -> Result<Option<StageStats>> {
        let mut markers = futures::stream::iter(ids)
            .map(|id| read_shard_stats(&self.root, &plan.name, id))
            .buffered(32);
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards: ids.to_vec(),
            ..StageStats::default()
        };
        while let Some(marker) = markers.try_next().await? {
            match marker {
                Some(s) if s.fingerprint == plan.fingerprint => total.absorb(&s),
                _ => return Ok(None),
            }
        }
        Ok(Some(total))
    }
}
