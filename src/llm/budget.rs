//! The job's budget as a process spends it: what it has spent, has in flight and has
//! recorded as reserved, and whether a call may leave.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::llm::journal::JournalScope;

/// What a run has spent, has in flight and has recorded as reserved, in millionths of a
/// dollar: while a call is out, `reserved` covers `spent` and `in_flight`.
#[derive(Debug, Default)]
pub struct Spending {
    spent: AtomicU64,
    in_flight: AtomicU64,
    /// What the spend record says the calls may reach.
    written: tokio::sync::Mutex<u64>,
    /// Set once a call was refused for the budget.
    refused: std::sync::atomic::AtomicBool,
    /// Told when a call comes back.
    changed: tokio::sync::Notify,
}

/// Whether a call may leave under the budget.
pub(crate) enum Start {
    /// Held back; it may leave.
    Go,
    /// Only once calls in flight come back under their most.
    Wait,
    /// Not even then: the budget is spent.
    Refuse,
}

impl Spending {
    /// Adds `paid` (millionths of a dollar) to what was spent: a call answered without a
    /// request of its own budget (the offline mock).
    pub(crate) fn add(&self, paid: u64) {
        self.spent.fetch_add(paid, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits a little for calls in flight to come back.
    pub(crate) async fn settled(&self) {
        let _ = tokio::time::timeout(Duration::from_millis(200), self.changed.notified()).await;
    }

    /// Writes, before a call leaves, that the process's calls paid and in flight may reach
    /// `window` more than they do now (within the limit), when they have passed what was
    /// written. One call writes while the others wait, so none leaves unrecorded; a failed
    /// write is tried again by the next call.
    pub(crate) async fn record_ahead(&self, budget: Budget, window: u64, journal: &JournalScope) {
        let mut written = self.written.lock().await;
        let needed = self.spent.load(Ordering::SeqCst) + self.in_flight.load(Ordering::SeqCst);
        if needed <= *written {
            return;
        }
        let until = (needed + window).min(budget.limit_micro).max(needed);
        if journal.reserve(micro_to_usd(until)).await {
            *written = until;
        }
    }
}

/// A call's hold on the budget: released with what the call cost, or, if the call is
/// dropped before it ends, with all it held (the server may have billed it).
pub(crate) struct Held<'a> {
    spending: &'a Spending,
    amount: u64,
    done: bool,
}

impl<'a> Held<'a> {
    pub(crate) fn of(spending: &'a Spending, amount: u64) -> Self {
        Self {
            spending,
            amount,
            done: false,
        }
    }

    /// No hold (a run without a budget): only what the call costs is added.
    pub(crate) fn none(spending: &'a Spending) -> Self {
        Self::of(spending, 0)
    }

    pub(crate) fn finish(mut self, paid: u64) {
        self.release(paid);
    }

    pub(crate) fn release(&mut self, paid: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // Spent first, then released: for a moment both count, never neither.
        self.spending.spent.fetch_add(paid, Ordering::SeqCst);
        self.spending
            .in_flight
            .fetch_sub(self.amount, Ordering::SeqCst);
        self.spending.changed.notify_waiters();
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let held = self.amount;
        self.release(held);
    }
}

/// Dollars in millionths.
pub(crate) fn micro(usd: f64) -> u64 {
    (usd.max(0.0) * 1e6).round() as u64
}

pub(crate) fn micro_to_usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

/// What this process may spend: its share of what is left of the job's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// This process's limit, in millionths of a dollar.
    pub limit_micro: u64,
    /// The job's whole budget, in dollars, for messages.
    pub job_usd: f64,
}

impl Budget {
    /// A limit of `limit_usd` out of a job budget of `job_usd`.
    pub fn new(limit_usd: f64, job_usd: f64) -> Self {
        Self {
            limit_micro: (limit_usd.max(0.0) * 1e6).round() as u64,
            job_usd,
        }
    }

    /// True once the run has spent the limit, or refused a call that would pass it.
    pub fn spent(&self, spending: &Spending) -> bool {
        spending.refused.load(Ordering::SeqCst)
            || spending.spent.load(Ordering::SeqCst) >= self.limit_micro
    }

    /// Holds back `dearest` for a call about to leave, if what is spent and in flight leaves
    /// room for it. If only the calls in flight stand in the way, it is to wait; if what is
    /// spent alone does, the budget is spent.
    pub(crate) fn start(&self, spending: &Spending, dearest: u64) -> Start {
        let mut held = spending.in_flight.load(Ordering::SeqCst);
        loop {
            let spent = spending.spent.load(Ordering::SeqCst);
            if spent + dearest > self.limit_micro {
                spending.refused.store(true, Ordering::SeqCst);
                return Start::Refuse;
            }
            if spent + held + dearest > self.limit_micro {
                return Start::Wait;
            }
            match spending.in_flight.compare_exchange(
                held,
                held + dearest,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Start::Go,
                Err(now) => held = now,
            }
        }
    }

    /// Why calls stop once it is spent.
    pub fn message(&self) -> String {
        format!("the job's budget of ${:.2} is spent", self.job_usd)
    }
}
