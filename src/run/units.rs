//! Units of work any process may do: an input shard, the cross-file pass, a shard of a
//! sharded stage, a stage reading several tables. A process claims a unit under
//! `<root>/_claims/<stage>/<unit>.json` before doing it and gives the claim back after; it
//! skips units a live process holds and comes back to them, so it waits only for work a live
//! process is doing, never for a worker that is not running. `--worker I/N` only orders the
//! units a process prefers, so co-scheduled workers start on different ones.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::execution_error;
use crate::root::names::{CLAIMS_DIR, SUCCESS_MARKER, shard_marker_path};
use crate::run::claim::{Holder, Taken};
use crate::run::lease::unguarded;
use crate::run::plan::StagePlan;
use crate::run::runner::Runner;
use crate::run::worker::Worker;
use crate::storage::delete_if_exists;

/// How long a process sleeps before looking again at units live processes hold.
const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// What became of a unit this process tried.
#[derive(Debug)]
pub(super) enum Unit<T> {
    /// Done (by this process, or found done once claimed).
    Done(T),
    /// A live process holds it.
    HeldBy(Holder),
}

impl Runner<'_> {
    /// Runs `work` under the claim of unit `unit` of `stage`, unless a live process holds it.
    /// `work` stops, and the unit counts as held, if the claim is taken over meanwhile (this
    /// process was judged gone): what it did is journaled, and its taker redoes the rest.
    pub(super) async fn claimed<T>(
        &self,
        stage: &str,
        unit: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<Unit<T>> {
        self.budget_left(stage)?;
        let path = self.claim_path(stage, unit);
        let held = match self.claims.take(&path).await? {
            (Taken::Mine, Some(held)) => held,
            (Taken::HeldBy(holder), _) => return Ok(Unit::HeldBy(holder)),
            (Taken::Unguarded(what), _) => return Err(unguarded(&self.root, &what)),
            (Taken::Mine, None) => {
                return Err(Error::Internal("a claim taken but not held".into()));
            }
        };
        let outcome = tokio::select! {
            done = work => Some(done),
            () = held.lost() => None,
        };
        let released = self.claims.release(&path).await;
        match outcome {
            Some(done) => {
                let done = done?;
                released?;
                Ok(Unit::Done(done))
            }
            None => {
                tracing::warn!(
                    stage,
                    unit,
                    "Another process took this unit over (this one was thought gone); left to it."
                );
                Ok(Unit::HeldBy(self.claims.me().clone()))
            }
        }
    }
}

impl Runner<'_> {
    /// The live holder of unit `unit` of `stage`, if another process.
    pub(super) async fn holder_of(&self, stage: &str, unit: &str) -> Result<Option<Holder>> {
        self.claims.holder_of(&self.claim_path(stage, unit)).await
    }

    /// Where the claim of unit `unit` of `stage` is.
    fn claim_path(&self, stage: &str, unit: &str) -> object_store::path::Path {
        self.root
            .child(CLAIMS_DIR)
            .child(stage)
            .path(&format!("{unit}.json"))
    }

    /// Fails once this process's share of the budget is spent: it takes no new unit and
    /// publishes none it was doing (their rows would be published as failed), so they are
    /// left to processes that can pay; what it paid for is journaled and reused.
    pub(super) fn budget_left(&self, stage: &str) -> Result<()> {
        match self.pool.budget_spent() {
            Some(spent) => execution_error!(
                "stage '{stage}' stopped: {spent}. Units this process did not finish are left to other workers or the next run; completed work and every paid answer are kept"
            ),
            None => Ok(()),
        }
    }

    /// Takes shard `id` of `plan` out of the published output before it is redone: its
    /// marker, then the stage's `_SUCCESS`, so no reader or publisher counts the stage
    /// complete while the shard's data is rewritten.
    pub(super) async fn withdraw_shard(&self, plan: &StagePlan, id: &str) -> Result<()> {
        let out = self.root.child(&plan.name);
        delete_if_exists(&self.root, &shard_marker_path(&out, id)).await?;
        self.withdraw_stage(plan).await
    }

    /// Deletes the stage's `_SUCCESS` before its data is rewritten.
    pub(super) async fn withdraw_stage(&self, plan: &StagePlan) -> Result<()> {
        let out = self.root.child(&plan.name);
        delete_if_exists(&self.root, &out.path(SUCCESS_MARKER)).await
    }
}

/// The order in which `worker` prefers units `0..count`: its own (`k mod N = I`) first, in
/// order, then the others from the last one back, so a process that has finished its own
/// meets the others' owners late, and a lone process still does everything.
pub(super) fn preference(worker: Worker, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).filter(|k| worker.owns(*k)).collect();
    order.extend((0..count).rev().filter(|k| !worker.owns(*k)));
    order
}

/// Waiting for units live processes hold: says every minute who holds what; with
/// `[execution] wait_secs`, gives up after that long without any of them finished.
pub(super) struct Waiting {
    limit: Option<Duration>,
    progress_at: Instant,
    left: usize,
    said: Option<Instant>,
}

impl Waiting {
    /// A wait that gives up after `wait_secs` without progress (never, while the holders
    /// live, when `None`).
    pub(super) fn new(wait_secs: Option<u64>) -> Self {
        Waiting {
            limit: wait_secs.map(Duration::from_secs),
            progress_at: Instant::now(),
            left: usize::MAX,
            said: None,
        }
    }

    /// Sleeps a moment while the units `held` (what, and by whom) are done by others; fails
    /// once none has finished for the limit.
    pub(super) async fn wait(&mut self, stage: &str, held: &[(String, Holder)]) -> Result<()> {
        if held.len() < self.left {
            self.left = held.len();
            self.progress_at = Instant::now();
        }
        let shown = held
            .iter()
            .take(3)
            .map(|(unit, holder)| format!("{unit} ({})", holder.describe()))
            .collect::<Vec<_>>()
            .join(", ");
        let more = held.len().saturating_sub(3);
        let shown = if more > 0 {
            format!("{shown} and {more} more")
        } else {
            shown
        };
        if let Some(limit) = self.limit
            && self.progress_at.elapsed() >= limit
        {
            return execution_error!(
                "waited {} s for other processes to finish units of '{stage}' they hold: {shown}; none finished meanwhile. \
                 They are alive (renewing their claims); if one is stuck, stop it and its units are taken over. \
                 [execution] wait_secs sets how long to wait",
                limit.as_secs()
            );
        }
        if self
            .said
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::info!(
                stage,
                units = held.len(),
                "Waiting for units other processes hold: {shown}."
            );
            self.said = Some(Instant::now());
        }
        tokio::time::sleep(LOOK_AGAIN).await;
        Ok(())
    }
}
