//! Stages run shard by shard: each shard of the upstream stage gives one shard of output,
//! published by its marker; the stage is complete once every shard is. Consecutive sharded
//! stages run together, a shard entering the next stage as soon as it leaves the last.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::prelude::ParquetReadOptions;
use futures::{StreamExt, TryStreamExt};

use crate::error::Result;
use crate::job::catalog::NEAR_DUPLICATES;
use crate::root::marker::{
    StageStats, read_shard_stats, read_stage_stats, write_shard_stats, write_stage_stats,
};
use crate::root::names::{PartNames, input_shard_of_part, part_file};
use crate::root::objects::{object_url, remove_shards_except};
use crate::run::claim::Holder;
use crate::run::near_dup::NearDuplicates;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;
use crate::run::units::{Unit, Waiting, preference};
use crate::{execution_error, job_error};

/// How many times a step looks at every shard again when its stages could not be published.
const MOST_PUBLISH_TRIES: usize = 10;
/// How often shard admission looks at the calls outstanding.
const ADMISSION_LOOK: Duration = Duration::from_millis(50);
/// How many times the shards the first stage needs may be under way, for stages that send
/// fewer calls.
const MORE_SHARDS: usize = 4;

impl Runner<'_> {
    /// Runs sharded stages together, shard by shard: each shard goes through the stages in
    /// turn (stages reading the same table side by side), each stage's shard a unit of work
    /// published by its marker as soon as it is written, so a shard's next stage starts while
    /// other shards are still in earlier ones and no stage's tail leaves the servers idle.
    /// Shards already published under the same fingerprint from the same input are skipped;
    /// shards live processes hold are come back to. Returns each stage's totals over the
    /// shards this process did or found done, in the order given.
    pub(super) async fn run_pipelined(&self, plans: &[&StagePlan]) -> Result<Vec<StageStats>> {
        let root = self.shard_root(plans[0]).await?;
        let ids = root.shards.clone();
        let mut ups = Vec::new();
        let mut nears = Vec::new();
        let mut depth: Vec<usize> = Vec::new();
        for plan in plans {
            let upstream = plan.sharded_on(self.job).expect("a sharded stage");
            ups.push(self.plan(upstream)?);
            // Pass 2 of near-dedup: every process computes the same clusters from all
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
        self.progress
            .shards_total
            .store((ids.len() * plans.len()) as u64, Ordering::Relaxed);
        let (ups, nears, depth) = (&ups, &nears, &depth);
        // One shard through every stage; a failed or held stage stops the shard's later levels.
        let chain = |id: String| async move {
            let mut done: Vec<Option<(Result<Unit<StageStats>>, Instant)>> =
                (0..plans.len()).map(|_| None).collect();
            for level in 0..levels {
                let id = &id;
                let runs = (0..plans.len())
                    .filter(|i| depth[*i] == level)
                    .map(|i| async move {
                        let stats = self
                            .run_shard(plans[i], ups[i], id, nears[i].as_ref())
                            .await;
                        (i, stats)
                    });
                let mut stop = false;
                for (i, stats) in futures::future::join_all(runs).await {
                    stop |= !matches!(stats, Ok(Unit::Done(_)));
                    done[i] = Some((stats, Instant::now()));
                }
                if stop {
                    break;
                }
            }
            (id, done)
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
        let mut counted: HashSet<(usize, String)> = HashSet::new();
        let mut waiting = Waiting::new(self.job.execution.wait_secs);
        let mut unpublished = 0;
        let mut pending: Vec<String> = preference(self.worker, ids.len())
            .into_iter()
            .map(|k| ids[k].clone())
            .collect();
        loop {
            let mut first_error = None;
            let mut held: Vec<(String, Holder)> = Vec::new();
            // Folded in as each chain ends: a shard's counts are not kept past its chain, so
            // what the run holds does not grow with the number of shards.
            let fold = |(id, done): (String, Vec<Option<(Result<Unit<StageStats>>, Instant)>>)| {
                for (i, outcome) in done.into_iter().enumerate() {
                    match outcome {
                        Some((Ok(Unit::Done(stats)), at)) => {
                            if counted.insert((i, id.clone())) {
                                self.progress.shards_done.fetch_add(1, Ordering::Relaxed);
                                totals[i].absorb(&stats);
                                last[i] = last[i].max(at);
                            }
                        }
                        Some((Ok(Unit::HeldBy(holder)), _)) => {
                            held.push((format!("{}/{id}", plans[i].name), holder));
                        }
                        Some((Err(e), _)) => {
                            first_error.get_or_insert(e);
                        }
                        None => {}
                    }
                }
            };
            self.admit_shards(pending, &chain, self.shards_at_once(&root), fold)
                .await;
            if let Some(e) = first_error {
                return Err(e);
            }
            if held.is_empty() {
                let mut complete = true;
                for (i, plan) in plans.iter().enumerate() {
                    complete &= self
                        .publish_if_all_shards(plan, ups[i], nears[i].as_ref(), &ids)
                        .await?;
                }
                if complete {
                    break;
                }
                // A shard was redone or withdrawn meanwhile (another process changed it):
                // look at every shard again, a few times at most.
                unpublished += 1;
                if unpublished > MOST_PUBLISH_TRIES {
                    return execution_error!(
                        "stage '{}' could not be published: its shards kept changing while every one was done. Another process may run this output with another job or other inputs; run again once it is done",
                        plans[0].name
                    );
                }
                pending = ids.clone();
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            pending = held
                .iter()
                .filter_map(|(unit, _)| unit.rsplit_once('/').map(|(_, id)| id.to_string()))
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect();
            let stage = plans
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            waiting.wait(&stage, &held).await?;
        }
        for (total, at) in totals.iter_mut().zip(last) {
            total.seconds = (at - started).as_secs_f64();
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

    /// The marker shard `id` of `plan` reads (that of shard `id` of `up`, or for parts of
    /// the input stage that of the input file they came from) and the version of its input
    /// the shard's marker must name; `None` while the input is not published.
    async fn shard_input(
        &self,
        up: &StagePlan,
        id: &str,
        near: Option<&NearDuplicates>,
    ) -> Result<Option<(StageStats, String)>> {
        let up_stats = if up.sharded_on(self.job).is_some() {
            read_shard_stats(&self.root, &up.name, id).await?
        } else if let Some(input_shard) = input_shard_of_part(id)
            && up.reads_documents()
        {
            read_shard_stats(&self.root, &up.name, input_shard).await?
        } else {
            read_stage_stats(&self.root, &up.name).await?
        };
        let Some(up_stats) = up_stats.filter(|s| s.fingerprint == up.fingerprint) else {
            return Ok(None);
        };
        let mut upstream = up_stats.version();
        if let Some(near) = near {
            // Clusters span shards: a shard is stale when any part of its input changed.
            upstream = format!("{upstream}+{}", near.version);
        }
        Ok(Some((up_stats, upstream)))
    }

    /// Shard `id` of `plan`, whose input is shard `id` of `up`: its marker when current, else
    /// the shard run and published now under its claim (or who holds it).
    pub(super) async fn run_shard(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        id: &str,
        near: Option<&NearDuplicates>,
    ) -> Result<Unit<StageStats>> {
        // A journal that cannot be written stops new work at once, not at the end of the
        // stages running together: nothing more is paid for that a crash would lose.
        self.journal.check()?;
        let Some((up_stats, upstream)) = self.shard_input(up, id, near).await? else {
            return job_error!(
                "stage '{}' reads '{}', which has no complete output for shard {id} under {}; run it first (--stages {})",
                plan.name,
                up.name,
                self.root.describe(),
                up.name
            );
        };
        let current = || async {
            Ok::<_, crate::error::Error>(
                read_shard_stats(&self.root, &plan.name, id)
                    .await?
                    .filter(|done| self.stands(plan, done, &upstream)),
            )
        };
        if let Some(done) = current().await? {
            return Ok(Unit::Done(done));
        }
        let run = async {
            if let Some(done) = current().await? {
                return Ok(done);
            }
            self.withdraw_shard(plan, id).await?;
            self.redo_shard(plan, up, id, near, &up_stats, &upstream)
                .await
        };
        self.claimed(&plan.name, id, run).await
    }

    /// Runs shard `id` of `plan` from its input (published by `up_stats`, at version
    /// `upstream`) and publishes it.
    async fn redo_shard(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        id: &str,
        near: Option<&NearDuplicates>,
        up_stats: &StageStats,
        upstream: &str,
    ) -> Result<StageStats> {
        let out = self.root.child(&plan.name);
        let up_file = self.root.child(&up.name).path(&part_file(id));
        // Named by the input file the shard comes from, not by its number (see StageStats).
        let journal_name = match up_stats.journal.clone() {
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
        stats.upstream = upstream.to_string();
        stats.journal = Some(journal_name);
        write_shard_stats(&self.root, &plan.name, id, &stats).await?;
        self.compact(&journal).await;
        Ok(stats)
    }

    /// Writes the stage's `_SUCCESS` (totals over all shards) when every shard is published
    /// and current against its input; true when it did. Another process may publish at the
    /// same time from markers read a moment earlier, or withdraw a shard to redo it, so after
    /// writing, the markers are read again: totals that changed are rewritten, and a shard
    /// found missing or stale withdraws the `_SUCCESS` just written.
    pub(super) async fn publish_if_all_shards(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        near: Option<&NearDuplicates>,
        ids: &[String],
    ) -> Result<bool> {
        let Some(mut total) = self.shard_totals(plan, up, near, ids).await? else {
            return Ok(false);
        };
        let current = ids.iter().cloned().collect();
        remove_shards_except(&self.root.child(&plan.name), &current, |part| part).await?;
        for _ in 0..5 {
            write_stage_stats(&self.root, &plan.name, &total).await?;
            match self.shard_totals(plan, up, near, ids).await? {
                Some(again) if again.version() == total.version() => return Ok(true),
                Some(again) => total = again,
                None => {
                    self.withdraw_stage(plan).await?;
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    /// The totals over the markers of shards `ids`, read side by side and added up as they
    /// come; `None` while any is missing, of another definition, or stale against its input.
    async fn shard_totals(
        &self,
        plan: &StagePlan,
        up: &StagePlan,
        near: Option<&NearDuplicates>,
        ids: &[String],
    ) -> Result<Option<StageStats>> {
        let mut markers = futures::stream::iter(ids)
            .map(|id| async move {
                let marker = read_shard_stats(&self.root, &plan.name, id).await?;
                let input = self.shard_input(up, id, near).await?;
                Ok::<_, crate::error::Error>(marker.zip(input.map(|(_, version)| version)))
            })
            .buffered(32);
        let mut total = StageStats {
            stage: plan.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            shards: ids.to_vec(),
            ..StageStats::default()
        };
        while let Some(marker) = markers.try_next().await? {
            match marker {
                // Rows that failed are counted, and retried by the next run.
                Some((s, upstream))
                    if s.fingerprint == plan.fingerprint && s.upstream == upstream =>
                {
                    total.absorb(&s)
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(total))
    }
}
