//! One server (base URL): its cap on requests in flight, its rate limits, its health, its
//! quota, and the counters of what was sent to it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::escape::redact_url;
use crate::llm::limits::{Aimd, Limits};
use crate::llm::reply::{EndpointStats, Usage};

/// One server (base URL) and everything shared by the calls to it.
#[derive(Debug)]
pub struct Endpoint {
    pub(crate) base_url: String,
    /// The base URL as messages show it: without credentials.
    pub(crate) shown: String,
    pub(crate) http: reqwest::Client,
    pub(crate) slots: Arc<Aimd>,
    /// The configured cap on requests in flight, before it is shared between processes.
    cap: usize,
    pub(crate) stats: EndpointStats,
    health: Mutex<Health>,
    /// Set when the server said the quota is exhausted; later calls fail without a request.
    pub(crate) quota: Mutex<Option<String>>,
    pub(crate) limits: Limits,
    /// How the server took each optional feature requests of a model used (see
    /// [`Endpoint::lacking`]).
    features: Mutex<std::collections::HashMap<(String, &'static str), Feature>>,
}

/// How a server took requests using one optional feature (`response_format`, `logprobs`, `n`).
#[derive(Debug, Default)]
struct Feature {
    accepted: bool,
    server_errors_in_a_row: u32,
    lacking: bool,
}

/// Server errors in a row, on requests using a feature the server never accepted, after
/// which it is taken to lack the feature.
const LACKING_AFTER: u32 = 3;

impl Endpoint {
    pub(crate) fn new(
        base_url: &str,
        concurrency: usize,
        timeout: Duration,
        limits: Limits,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(concurrency)
            .redirect(same_origin_redirects())
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            shown: redact_url(base_url),
            base_url: base_url.to_string(),
            http,
            slots: Aimd::new(concurrency),
            cap: concurrency.max(1),
            stats: EndpointStats::default(),
            health: Mutex::new(Health::default()),
            quota: Mutex::new(None),
            limits,
            features: Mutex::default(),
        }
    }

    /// Takes this process's share of the endpoint when `processes` run on the job and this
    /// one is `rank` among them: the cap divided (the first processes take the remainder,
    /// each keeps one slot), and so are the rates.
    pub(crate) fn share(&self, processes: usize, rank: usize) {
        let n = processes.max(1);
        self.slots
            .set_cap(self.cap / n + usize::from(rank % n < self.cap % n));
        self.limits.share(1.0 / n as f64);
    }

    /// The configured cap on requests in flight, before it is shared.
    pub(crate) fn configured_cap(&self) -> usize {
        self.cap
    }

    /// Snapshot of this endpoint's counters.
    pub fn usage(&self) -> Usage {
        let s = &self.stats;
        Usage {
            requests: s.requests.load(Ordering::Relaxed),
            shared: s.shared.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            journaled: s.journaled.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: s.completion_tokens.load(Ordering::Relaxed),
            cost_usd: s.cost_micro_usd.load(Ordering::Relaxed) as f64 / 1e6,
            // Counted per stage from the call structs, not per endpoint.
            ..Usage::default()
        }
    }
}

/// Redirects are followed only within the endpoint's origin (scheme, host and port), at
/// most five: a prompt, and the key with it, goes nowhere the job did not name, and never
/// from https to http. A redirect elsewhere comes back as the reply (see `send_once`).
pub(crate) fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .last()
            .is_some_and(|from| from.origin() == attempt.url().origin());
        if same && attempt.previous().len() <= 5 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Consecutive failures of an endpoint, and until when it rests after too many.
#[derive(Debug, Default)]
struct Health {
    failures: u32,
    resting_until: Option<Instant>,
}

/// Failures in a row after which an endpoint rests.
const FAILURES_BEFORE_REST: u32 = 3;
/// How long a failing endpoint rests before it is tried again.
const REST: Duration = Duration::from_secs(30);

impl Endpoint {
    pub(crate) fn resting(&self) -> bool {
        let health = self.health.lock().expect("lock poisoned");
        health.resting_until.is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn record_health(&self, ok: bool) {
        let mut health = self.health.lock().expect("lock poisoned");
        if ok {
            *health = Health::default();
            return;
        }
        health.failures += 1;
        if health.failures >= FAILURES_BEFORE_REST {
            health.failures = 0;
            health.resting_until = Some(Instant::now() + REST);
            tracing::warn!(endpoint = %self.shown, "Endpoint keeps failing; resting it for 30 s.");
        }
    }

    /// Why a request of `model` using `features` is not sent, when the server was found to
    /// lack one: it answered [`LACKING_AFTER`] requests using only that feature in a row with
    /// HTTP 500 or 501 and never accepted one (some
    /// servers answer an unsupported `response_format` so, which would otherwise be retried
    /// as a transient failure, five times a row). A server starting or behind a restarting
    /// proxy (502-504) is not taken to lack anything.
    pub(crate) fn lacking(&self, model: &str, features: &[&'static str]) -> Option<String> {
        let known = self.features.lock().expect("lock poisoned");
        let feature = features.iter().find(|f| {
            known
                .get(&(model.to_string(), **f))
                .is_some_and(|k| k.lacking)
        })?;
        let advice = match *feature {
            "response_format" => {
                "use mode = \"text\" for this function, or a server that enforces JSON schemas"
            }
            "logprobs" => "use mode = \"text\" for this function",
            _ => "set supports_n = false on the role",
        };
        Some(format!(
            "the server at {} answered {LACKING_AFTER} requests using `{feature}` in a row with a server error and never accepted one: it does not support it; {advice}",
            self.shown
        ))
    }

    /// Records how a request of `model` using `features` went (`server_error`: its 5xx).
    pub(crate) fn note_features(
        &self,
        model: &str,
        features: &[&'static str],
        ok: bool,
        server_error: Option<u16>,
    ) {
        if features.is_empty() {
            return;
        }
        let mut known = self.features.lock().expect("lock poisoned");
        if ok {
            for name in features {
                let feature = known.entry((model.to_string(), name)).or_default();
                *feature = Feature {
                    accepted: true,
                    ..Feature::default()
                };
            }
            return;
        }
        // Blamed only when it is the request's one feature.
        let [name] = features else { return };
        if !matches!(server_error, Some(500 | 501)) {
            return;
        }
        let feature = known.entry((model.to_string(), name)).or_default();
        if feature.accepted {
            return;
        }
        feature.server_errors_in_a_row += 1;
        if feature.server_errors_in_a_row >= LACKING_AFTER && !feature.lacking {
            feature.lacking = true;
            tracing::warn!(endpoint = %self.shown, model, feature = name, "The server fails every request using this feature: it is not sent again; those rows fail with a message saying what to change.");
        }
    }

    pub(crate) fn quota(&self) -> Option<String> {
        self.quota.lock().expect("lock poisoned").clone()
    }
}
