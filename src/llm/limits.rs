//! Per-endpoint admission: an adaptive cap on requests in flight ([`Aimd`]), and rate limits:
//! requests, input tokens and output tokens per minute, as token
//! buckets refilled continuously (a minute's budget spread over the minute, at most one
//! second's worth saved up), shared by every stage and partition of the process. Token costs
//! are estimated before sending and corrected from the server's `usage` afterwards.

use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// One budget per minute, spent as requests go out.
#[derive(Debug)]
pub struct Bucket {
    per_minute: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    at: Instant,
    /// This process's share of the budget, per second.
    per_second: f64,
    /// At most one second's worth saved up (and at least one unit).
    capacity: f64,
}

impl Bucket {
    /// A bucket allowing `per_minute` units a minute.
    pub fn per_minute(per_minute: f64) -> Self {
        let per_second = per_minute / 60.0;
        Self {
            per_minute,
            state: Mutex::new(BucketState {
                tokens: per_second.max(1.0),
                at: Instant::now(),
                per_second,
                capacity: per_second.max(1.0),
            }),
        }
    }

    /// Spends `fraction` of the configured budget from now on: this process's share when
    /// several run on one job.
    pub fn share(&self, fraction: f64) {
        let mut state = self.state.lock().expect("lock poisoned");
        self.refill(&mut state);
        state.per_second = self.per_minute / 60.0 * fraction;
        state.capacity = state.per_second.max(1.0);
        state.tokens = state.tokens.min(state.capacity);
    }

    fn refill(&self, state: &mut BucketState) {
        let now = Instant::now();
        state.tokens =
            (state.tokens + (now - state.at).as_secs_f64() * state.per_second).min(state.capacity);
        state.at = now;
    }

    /// Waits until `amount` can be spent, then spends it. An amount larger than a full bucket
    /// waits for a full bucket and goes into debt, so one huge request is slowed, not stuck.
    pub async fn take(&self, amount: f64) {
        loop {
            let wait = {
                let mut state = self.state.lock().expect("lock poisoned");
                self.refill(&mut state);
                let needed = amount.min(state.capacity);
                if state.tokens >= needed {
                    state.tokens -= amount;
                    return;
                }
                // Never longer than a minute a look (and never a panic on a rate near zero).
                Duration::try_from_secs_f64((needed - state.tokens) / state.per_second)
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(60))
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// Gives back what an estimate overcharged (or takes what it undercharged).
    pub fn correct(&self, estimated: f64, actual: f64) {
        let mut state = self.state.lock().expect("lock poisoned");
        self.refill(&mut state);
        state.tokens = (state.tokens + estimated - actual).min(state.capacity);
    }
}

/// The limits of one endpoint; absent limits cost nothing.
#[derive(Debug, Default)]
pub struct Limits {
    /// Requests per minute.
    pub requests: Option<Bucket>,
    /// Prompt tokens per minute.
    pub input_tokens: Option<Bucket>,
    /// Completion tokens per minute.
    pub output_tokens: Option<Bucket>,
}

impl Limits {
    /// Limits from per-minute budgets.
    pub fn new(rpm: Option<f64>, input_tpm: Option<f64>, output_tpm: Option<f64>) -> Self {
        Self {
            requests: rpm.map(Bucket::per_minute),
            input_tokens: input_tpm.map(Bucket::per_minute),
            output_tokens: output_tpm.map(Bucket::per_minute),
        }
    }

    /// Waits until a request estimated at `input` prompt and `output` completion tokens may go.
    pub async fn admit(&self, input: f64, output: f64) {
        if let Some(b) = &self.requests {
            b.take(1.0).await;
        }
        if let Some(b) = &self.input_tokens {
            b.take(input).await;
        }
        if let Some(b) = &self.output_tokens {
            b.take(output).await;
        }
    }

    /// Spends `fraction` of each configured rate from now on.
    pub fn share(&self, fraction: f64) {
        for bucket in [&self.requests, &self.input_tokens, &self.output_tokens]
            .into_iter()
            .flatten()
        {
            bucket.share(fraction);
        }
    }

    /// Corrects the token estimates of a request from the server's reported usage.
    pub fn settle(&self, estimated: (f64, f64), actual: (Option<i64>, Option<i64>)) {
        if let (Some(b), Some(used)) = (&self.input_tokens, actual.0) {
            b.correct(estimated.0, used as f64);
        }
        if let (Some(b), Some(used)) = (&self.output_tokens, actual.1) {
            b.correct(estimated.1, used as f64);
        }
    }
}

/// The cap on requests in flight to one endpoint, adapted to the server: cut by a quarter when
/// it throttles (HTTP 429; at most once per window's worth of replies, so the 429s of one burst
/// count once), raised by one slot after each window's worth of successes, never above the
/// configured cap. A freed slot goes to the waiting call of highest priority, first come first
/// within a priority.
#[derive(Debug)]
pub struct Aimd {
    state: Mutex<AimdState>,
}

#[derive(Debug)]
struct AimdState {
    /// The most slots the window may grow to: the configured cap, or this process's share.
    cap: usize,
    limit: usize,
    successes: usize,
    /// Replies since the last cut; the next cut waits for a window's worth.
    since_cut: usize,
    /// Slots nobody holds; never above zero while calls wait.
    free: usize,
    /// Slots to take away as they come back, when a cut found them in use.
    debt: usize,
    waiting: BinaryHeap<Waiter>,
    arrivals: u64,
}

/// A call waiting for a slot; the slot is handed over through `wake`.
#[derive(Debug)]
struct Waiter {
    priority: u32,
    arrival: u64,
    wake: oneshot::Sender<()>,
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The heap pops its greatest: highest priority, then earliest arrival.
        (self.priority, std::cmp::Reverse(self.arrival))
            .cmp(&(other.priority, std::cmp::Reverse(other.arrival)))
    }
}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Waiter {}

impl AimdState {
    /// A slot comes back: repays a cut, or goes to the first waiter still waiting, or is free.
    fn give_back(&mut self) {
        if self.debt > 0 {
            self.debt -= 1;
            return;
        }
        while let Some(waiter) = self.waiting.pop() {
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        self.free += 1;
    }
}

/// A slot on the wire; returned to the endpoint when dropped.
#[derive(Debug)]
pub struct Slot {
    aimd: Arc<Aimd>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.aimd.lock().give_back();
    }
}

/// A call's place in the queue; a slot handed to it after it stopped waiting goes back.
struct Queued {
    wake: Option<oneshot::Receiver<()>>,
    aimd: Arc<Aimd>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(mut wake) = self.wake.take() {
            wake.close();
            if wake.try_recv().is_ok() {
                self.aimd.lock().give_back();
            }
        }
    }
}

impl Aimd {
    /// A window starting at (and never above) `cap` slots.
    pub fn new(cap: usize) -> Arc<Self> {
        let cap = cap.max(1);
        Arc::new(Self {
            state: Mutex::new(AimdState {
                cap,
                limit: cap,
                successes: 0,
                since_cut: cap,
                free: cap,
                debt: 0,
                waiting: BinaryHeap::new(),
                arrivals: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AimdState> {
        self.state.lock().expect("lock poisoned")
    }

    /// Waits for a free slot; calls of higher `priority` are served first.
    pub async fn acquire(self: &Arc<Self>, priority: u32) -> Slot {
        let wake = {
            let mut state = self.lock();
            if state.free > 0 {
                state.free -= 1;
                return Slot {
                    aimd: Arc::clone(self),
                };
            }
            let (wake, woken) = oneshot::channel();
            state.arrivals += 1;
            let arrival = state.arrivals;
            state.waiting.push(Waiter {
                priority,
                arrival,
                wake,
            });
            woken
        };
        let mut queued = Queued {
            wake: Some(wake),
            aimd: Arc::clone(self),
        };
        let woken = queued.wake.as_mut().expect("set above").await;
        queued.wake = None;
        woken.expect("waiters are woken, never dropped, while the window lives");
        Slot {
            aimd: Arc::clone(self),
        }
    }

    /// A free slot now, if there is one.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut state = self.lock();
        if state.free == 0 {
            return None;
        }
        state.free -= 1;
        Some(Slot {
            aimd: Arc::clone(self),
        })
    }

    /// The most slots the window may grow to now.
    pub fn cap(&self) -> usize {
        self.lock().cap
    }

    /// Slots currently allowed.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Free slots now (for least-loaded dispatch).
    pub fn available(&self) -> usize {
        self.lock().free
    }

    /// A request succeeded: after `limit` successes the window grows by one.
    pub fn on_success(&self) {
        let mut state = self.lock();
        state.since_cut += 1;
        state.successes += 1;
        if state.successes >= state.limit && state.limit < state.cap {
            state.successes = 0;
            state.limit += 1;
            state.give_back();
        }
    }

    /// Sets the most slots the window may hold (this process's share of the configured cap):
    /// a smaller cap takes slots away as they come back, a larger one adds them at once.
    pub fn set_cap(&self, cap: usize) {
        let cap = cap.max(1);
        let mut state = self.lock();
        if cap < state.limit {
            let cut = state.limit - cap;
            state.limit = cap;
            let taken = cut.min(state.free);
            state.free -= taken;
            state.debt += cut - taken;
        } else if cap > state.cap {
            let grown = (state.limit + cap - state.cap).min(cap);
            for _ in state.limit..grown {
                state.give_back();
            }
            state.limit = grown;
        }
        state.cap = cap;
    }

    /// The server throttled: the window shrinks by a quarter, once per window of replies.
    pub fn on_throttle(&self) {
        let mut state = self.lock();
        state.since_cut += 1;
        if state.since_cut < state.limit {
            return;
        }
        state.since_cut = 0;
        state.successes = 0;
        let new_limit = (state.limit * 3 / 4).max(1);
        let cut = state.limit - new_limit;
        state.limit = new_limit;
        let taken = cut.min(state.free);
        state.free -= taken;
        state.debt += cut - taken;
        drop(state);
        tracing::warn!(
            slots = new_limit,
            "Server throttles (HTTP 429): fewer requests in flight."
        );
    }
}
