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
    per_second: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A bucket allowing `per_minute` units a minute.
    pub fn per_minute(per_minute: f64) -> Self {
        let per_second = per_minute / 60.0;
        Self {
            per_second,
            capacity: per_second.max(1.0),
            state: Mutex::new((per_second.max(1.0), Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        state.0 = (state.0 + (now - state.1).as_secs_f64() * self.per_second).min(self.capacity);
        state.1 = now;
    }

    /// Waits until `amount` can be spent, then spends it. An amount larger than a full bucket
    /// waits for a full bucket and goes into debt, so one huge request is slowed, not stuck.
    pub async fn take(&self, amount: f64) {
        loop {
            let wait = {
                let mut state = self.state.lock().expect("lock poisoned");
                self.refill(&mut state);
                let needed = amount.min(self.capacity);
                if state.0 >= needed {
                    state.0 -= amount;
                    return;
                }
                Duration::from_secs_f64((needed - state.0) / self.per_second)
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// Gives back what an estimate overcharged (or takes what it undercharged).
    pub fn correct(&self, estimated: f64, actual: f64) {
        let mut state = self.state.lock().expect("lock poisoned");
        self.refill(&mut state);
        state.0 = (state.0 + estimated - actual).min(self.capacity);
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
    cap: usize,
    state: Mutex<AimdState>,
}

#[derive(Debug)]
struct AimdState {
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
            cap,
            state: Mutex::new(AimdState {
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
        if state.successes >= state.limit && state.limit < self.cap {
            state.successes = 0;
            state.limit += 1;
            state.give_back();
        }
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
