//! How often a call is tried: attempts that failed count against `max_attempts`, throttled
//! ones against `throttle_secs`, and each waits a backoff with jitter (or the server's
//! `Retry-After`, never less).

use std::time::{Duration, Instant};

use crate::job::ModelSpec;
use crate::llm::reply::Reply;

/// How many times a request was sent and why it is retried: failures count against
/// `max_attempts`, throttling against `throttle_secs` from the first 429.
pub(crate) struct Retries {
    pub(crate) sent: i32,
    /// What attempts that failed after the server billed them cost.
    pub(crate) billed_usd: f64,
    failures: u32,
    max_attempts: u32,
    throttles: i32,
    throttled_until: Option<Instant>,
    throttle_horizon: Duration,
}

impl Retries {
    pub(crate) fn new(spec: &ModelSpec) -> Self {
        Self {
            sent: 0,
            billed_usd: 0.0,
            failures: 0,
            max_attempts: spec.max_attempts.max(1),
            throttles: 0,
            throttled_until: None,
            throttle_horizon: Duration::from_secs(spec.throttle_secs),
        }
    }

    /// How long to wait before the next attempt, or `None` to give up.
    pub(crate) fn wait(&mut self, after: Option<Duration>, throttle: bool) -> Option<Duration> {
        if throttle {
            self.throttles += 1;
            let horizon = self.throttle_horizon;
            let deadline = *self
                .throttled_until
                .get_or_insert_with(|| Instant::now() + horizon);
            let left = deadline.checked_duration_since(Instant::now())?;
            return Some(at_least_backoff(after, self.throttles).min(left));
        }
        self.failures += 1;
        (self.failures < self.max_attempts).then(|| at_least_backoff(after, self.failures as i32))
    }

    /// The replies (one per choice asked, the attempts on the first) of a request stopped
    /// by `error` (a quota, a budget, a fatal answer).
    pub(crate) fn stopped(&self, error: Option<String>, choices: usize) -> Vec<Reply> {
        (0..choices)
            .map(|i| Reply {
                attempts: if i == 0 { self.sent } else { 0 },
                cost_usd: if i == 0 { self.billed_usd } else { 0.0 },
                error: error.clone(),
                ..Reply::default()
            })
            .collect()
    }

    /// The replies of a request that used up its retries, the last failure being `last`.
    pub(crate) fn gave_up(&self, last: &str, choices: usize) -> Vec<Reply> {
        let throttled = if self.failures < self.max_attempts {
            format!(", throttled for {} s", self.throttle_horizon.as_secs())
        } else {
            String::new()
        };
        self.stopped(
            Some(format!(
                "gave up after {} attempts{throttled}: {last}",
                self.sent
            )),
            choices,
        )
    }
}

/// The server's `Retry-After`, but never less than the backoff of `attempt`: a `0` or a date
/// already past would otherwise send every retry at once.
pub(crate) fn at_least_backoff(after: Option<Duration>, attempt: i32) -> Duration {
    let backoff = backoff(attempt);
    after.map_or(backoff, |after| after.max(backoff))
}

/// Exponential backoff with full jitter: up to 0.5 s × 2^(attempt-1), capped at 30 s.
fn backoff(attempt: i32) -> Duration {
    let cap = (0.5 * 2f64.powi(attempt - 1)).min(30.0);
    Duration::from_secs_f64(cap * (0.5 + 0.5 * fastrand::f64()))
}
