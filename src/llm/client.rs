//! The LLM client of one model role: answers from the journal, shares identical calls in
//! flight, and otherwise asks its [`Backend`]: the OpenAI-compatible HTTP API, the offline
//! `mock`, or an offline batch being written down.
//!
//! Over HTTP, each [`Endpoint`] holds the cap on requests in flight, shared by every stage and
//! partition of the process; retries with backoff and jitter happen inside a call, so a row
//! only fails after its last attempt. Failures become values ([`Reply::error`]) rather than
//! errors: one bad row never stops a stage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::escape::redact_url;
use crate::job::{Api, ModelSpec};
use crate::llm::budget::{Budget, Held, Spending, Start, micro, micro_to_usd};
use crate::llm::endpoint::Endpoint;
use crate::llm::journal::JournalScope;
use crate::llm::limits::Slot;
use crate::llm::reply::{Reply, Request};
use crate::llm::retry::Retries;
use crate::llm::wire::{
    RequestBody, billed_usage, describe_reqwest_error, is_quota_exhausted, parse_choices,
    request_path, retry_after, snippet,
};

type InFlight = Shared<BoxFuture<'static, Reply>>;

/// Where a role's requests go when neither the journal nor an identical call in flight
/// answers them.
#[async_trait::async_trait]
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// Answers `req` (whose journal key is `key`) for `client`, recording what it paid for
    /// in `journal`.
    async fn send(
        &self,
        client: &ModelClient,
        req: &Request,
        key: &str,
        journal: &JournalScope,
    ) -> Reply;

    /// Whether it can answer several choices with one request (the API's `n`); the others
    /// are asked one sample at a time.
    fn asks_choices(&self) -> bool {
        false
    }
}

/// The OpenAI-compatible HTTP API of the role's endpoints.
#[derive(Debug)]
pub struct Http;

#[async_trait::async_trait]
impl Backend for Http {
    async fn send(
        &self,
        client: &ModelClient,
        req: &Request,
        key: &str,
        journal: &JournalScope,
    ) -> Reply {
        let mut replies = client
            .call_http(req, std::slice::from_ref(&key.to_string()), journal)
            .await;
        replies.swap_remove(0)
    }

    fn asks_choices(&self) -> bool {
        true
    }
}

/// One call counted in the run's outstanding calls while it lives (a cancelled row too).
struct Outstanding<'a>(&'a AtomicUsize);

impl<'a> Outstanding<'a> {
    fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An API key read from the environment; never printed.
#[derive(Clone)]
pub(crate) struct ApiKey(pub(crate) String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A model role bound to its endpoints: what an LLM function calls.
#[derive(Debug, Clone)]
pub struct ModelClient {
    pub(crate) spec: ModelSpec,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    pub(crate) key: Option<ApiKey>,
    /// For each endpoint, whether the key goes with requests to it.
    pub(crate) key_to: Vec<bool>,
    pub(crate) in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
    /// What the whole run has spent and has in flight (shared by all roles).
    pub(crate) spending: Arc<Spending>,
    /// Calls of the whole run waiting for or holding a slot (shared by all roles).
    pub(crate) outstanding: Arc<AtomicUsize>,
    /// Rows of this role started and not yet answered, over every stage, shard and
    /// partition of the process (see [`ModelClient::rows_at_once`]).
    pub(crate) rows: Arc<Semaphore>,
    /// The run's budget in millionths of a dollar, if it has one.
    pub(crate) budget: Option<Budget>,
    pub(crate) backend: Arc<dyn Backend>,
    /// Set once the role's server answered a request for `n` choices with fewer: from then
    /// on each sample is its own request.
    pub(crate) ignores_n: Arc<std::sync::atomic::AtomicBool>,
}

/// Rows of a role started at once per slot: one on the wire, one rendered and waiting to take
/// the next slot that frees.
const ROWS_PER_SLOT: usize = 2;

impl ModelClient {
    /// How many of the role's rows may be started at once: [`ROWS_PER_SLOT`] per slot of
    /// its replicas, however many shards and partitions have rows ready.
    pub fn rows_at_once(spec: &ModelSpec) -> usize {
        ROWS_PER_SLOT * spec.concurrency.max(1) * spec.endpoints.len().max(1)
    }

    /// Waits until `n` more of the role's rows may start (at most all of them). A row waiting
    /// here holds nothing rendered: shards started together share the role's slots' worth of
    /// rows instead of each holding a window of prompts.
    pub async fn start_rows(&self, n: usize) -> OwnedSemaphorePermit {
        let n = n.clamp(1, Self::rows_at_once(&self.spec)) as u32;
        Arc::clone(&self.rows)
            .acquire_many_owned(n)
            .await
            .expect("the row budget is never closed")
    }

    /// Whether `self` and `other` draw on the same budget of rows.
    pub fn same_rows(&self, other: &ModelClient) -> bool {
        Arc::ptr_eq(&self.rows, &other.rows)
    }

    /// The role's resolved settings.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Whether the role's key goes with requests to `endpoint`.
    fn key_allowed(&self, endpoint: &Endpoint) -> bool {
        self.endpoints
            .iter()
            .zip(&self.key_to)
            .any(|(e, allowed)| *allowed && std::ptr::eq(e.as_ref(), endpoint))
    }

    /// The endpoint that counts calls answered without a request of their own.
    pub(crate) fn home(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    /// A slot for the next attempt, on the endpoint that frees one first among those not
    /// resting and with quota left (all with quota left, when every one is resting): so each
    /// request goes to the least-loaded replica at the moment it can be sent; waiting calls of
    /// higher `priority` go first. `None` when no endpoint has quota left.
    async fn acquire_slot(&self, priority: u32) -> Option<(&Arc<Endpoint>, Slot)> {
        loop {
            let usable: Vec<&Arc<Endpoint>> = self
                .endpoints
                .iter()
                .filter(|e| e.quota().is_none())
                .collect();
            let awake: Vec<&Arc<Endpoint>> =
                usable.iter().copied().filter(|e| !e.resting()).collect();
            let all_resting = awake.is_empty();
            let candidates = if all_resting { usable } else { awake };
            if candidates.is_empty() {
                return None;
            }
            // Free slots now: take the replica with the most. Otherwise wait for the first.
            if let Some(best) = candidates.iter().max_by_key(|e| e.slots.available())
                && let Some(slot) = best.slots.try_acquire()
            {
                return Some((best, slot));
            }
            let waits = candidates
                .iter()
                .map(|e| Box::pin(e.slots.acquire(priority)));
            let (slot, index, _) = futures::future::select_all(waits).await;
            let endpoint = candidates[index];
            // A replica that failed while this row waited has started resting: its fast
            // failures free slots quickly, which must not draw the waiting rows to it.
            if all_resting || !endpoint.resting() {
                return Some((endpoint, slot));
            }
        }
    }

    /// A stable hash of everything that determines the answer: model, API, sampling and the
    /// rendered request. Equal keys mean an answer can be reused.
    pub fn request_key(&self, req: &Request) -> String {
        let s = &self.spec;
        let mut h = Sha256::new();
        for part in [
            s.model.as_str(),
            if s.api == Api::Chat {
                "chat"
            } else {
                "completions"
            },
            &s.temperature.to_string(),
            &s.top_p.to_string(),
            &req.max_tokens.to_string(),
            &req.top_logprobs
                .map_or(String::new(), |n| format!("top_logprobs={n}")),
            &serde_json::to_string(&s.extra).unwrap_or_default(),
            req.system.as_deref().unwrap_or(""),
            &req.prompt,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        // Parts added since the first journals: hashed only when present, so the keys of
        // plain requests, and the journals that hold them, stay valid.
        let mut extra = |name: &str, part: &str| {
            for p in [name, part] {
                h.update((p.len() as u64).to_le_bytes());
                h.update(p.as_bytes());
            }
        };
        if let Some(schema) = &req.schema {
            extra("response_format", &schema.response_format().to_string());
        }
        for turn in &req.turns {
            extra("turn", &turn.reply);
            extra("feedback", &turn.feedback);
        }
        if let Some(sample) = req.sample {
            extra("sample", &sample.to_string());
        }
        if let Some(seed) = s.seed {
            extra("seed", &seed.to_string());
        }
        hex::encode(h.finalize())
    }

    /// Answers `req` from `journal`, or by joining an identical request already in flight,
    /// or by sending it (recording the reply in `journal`).
    pub async fn call(&self, req: Request, journal: &Arc<JournalScope>) -> Reply {
        let key = self.request_key(&req);
        match journal.lookup(&key).await {
            Ok(Some(reply)) => {
                self.home().stats.journaled.fetch_add(1, Ordering::Relaxed);
                return reply;
            }
            Ok(None) => {}
            Err(error) => {
                return self.account(Reply {
                    error: Some(error),
                    ..Reply::default()
                });
            }
        }
        let _outstanding = Outstanding::count(&self.outstanding);
        let (future, leader) = {
            let mut map = self.in_flight.lock().expect("lock poisoned");
            match map.get(&key) {
                Some(existing) => (existing.clone(), false),
                None => {
                    let this = self.clone();
                    let done_key = key.clone();
                    let journal = Arc::clone(journal);
                    // A task of its own: a call that left is finished and journaled even if
                    // every row waiting for it is cancelled, and its entry goes when it ends.
                    let call = tokio::spawn(async move {
                        let reply = this.call_uncached(&req, &done_key, &journal).await;
                        this.in_flight
                            .lock()
                            .expect("lock poisoned")
                            .remove(&done_key);
                        reply
                    });
                    let fut = async move {
                        call.await.unwrap_or_else(|e| Reply {
                            error: Some(format!("the call's task ended: {e}")),
                            ..Reply::default()
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key.clone(), fut.clone());
                    (fut, true)
                }
            }
        };
        let mut reply = future.await;
        if !leader {
            self.home().stats.shared.fetch_add(1, Ordering::Relaxed);
            reply.cached = true;
            // The leader's row may be in another shard, or another stage, than this one.
            journal.record_shared(&key, &reply).await;
        }
        reply
    }

    /// Answers the `req.choices` samples of `req`, each journaled under its own key (that of
    /// the sample asked alone): from the journal, else with one request asking for all the
    /// choices (the API's `n`) where the backend and the role's server can (`supports_n`),
    /// else one seeded request per sample.
    /// The request's counts and usage are on the first sample's reply.
    pub async fn call_choices(&self, req: Request, journal: &Arc<JournalScope>) -> Vec<Reply> {
        let samples: Vec<Request> = (0..req.choices.max(1)).map(|i| req.sample(i)).collect();
        let keys: Vec<String> = samples.iter().map(|r| self.request_key(r)).collect();
        let mut journaled: Vec<Option<Reply>> = Vec::with_capacity(keys.len());
        for key in &keys {
            match journal.lookup(key).await {
                Ok(done) => journaled.push(done),
                Err(error) => {
                    let failed = Reply {
                        error: Some(error),
                        ..Reply::default()
                    };
                    return vec![self.account(failed); keys.len()];
                }
            }
        }
        let missing = journaled.iter().filter(|r| r.is_none()).count();
        if missing < samples.len()
            || !self.backend.asks_choices()
            || !self.spec.supports_n
            || self.ignores_n.load(Ordering::Relaxed)
            || self.lacks("n")
        {
            // Some samples are paid for already: ask only the others.
            let asked = samples
                .into_iter()
                .zip(journaled)
                .map(|(sample, done)| async move {
                    match done {
                        Some(reply) => {
                            self.home().stats.journaled.fetch_add(1, Ordering::Relaxed);
                            reply
                        }
                        None => self.call(sample, journal).await,
                    }
                });
            return futures::future::join_all(asked).await;
        }
        let outstanding = Outstanding::count(&self.outstanding);
        let started = Instant::now();
        let replies = self.call_http(&req, &keys, journal).await;
        drop(outstanding);
        let latency_ms = started.elapsed().as_millis() as i64;
        let mut replies: Vec<Reply> = replies
            .into_iter()
            .map(|mut reply| {
                reply.latency_ms = latency_ms;
                self.account(reply)
            })
            .collect();
        if replies.len() < samples.len() {
            self.found_ignoring_n(samples.len(), replies.len());
            let rest = samples[replies.len()..]
                .iter()
                .map(|sample| self.call(sample.clone(), journal));
            replies.extend(futures::future::join_all(rest).await);
        }
        replies
    }

    /// Whether every endpoint of the role was found to lack `feature` (see
    /// [`Endpoint::lacking`]).
    pub fn lacks(&self, feature: &'static str) -> bool {
        self.endpoints
            .iter()
            .all(|e| e.lacking(&self.spec.model, &[feature]).is_some())
    }

    /// Notes, and says once, that the role's server sent `got` choices when asked for `asked`.
    fn found_ignoring_n(&self, asked: usize, got: usize) {
        if !self.ignores_n.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                endpoint = %self.home().shown,
                "The server ignores `n` (asked for {asked} choices, it sent {got}): each sample is asked as a request of its own from now on. Set supports_n = false on the role to skip the first try."
            );
        }
    }

    async fn call_uncached(&self, req: &Request, key: &str, journal: &JournalScope) -> Reply {
        let started = Instant::now();
        let mut reply = self.backend.send(self, req, key, journal).await;
        reply.latency_ms = started.elapsed().as_millis() as i64;
        self.account(reply)
    }

    /// Adds `reply` (priced by its attempts) to the counters and the run's spending.
    fn account(&self, reply: Reply) -> Reply {
        let stats = &self.home().stats;
        stats
            .cost_micro_usd
            .fetch_add((reply.cost_usd * 1e6).round() as u64, Ordering::Relaxed);
        if reply.error.is_some() {
            stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        stats.prompt_tokens.fetch_add(
            reply.prompt_tokens.unwrap_or(0).max(0) as u64,
            Ordering::Relaxed,
        );
        stats.completion_tokens.fetch_add(
            reply.completion_tokens.unwrap_or(0).max(0) as u64,
            Ordering::Relaxed,
        );
        reply
    }

    /// Sends `req` over HTTP until it is answered, fails `max_attempts` times, or has been
    /// throttled for `throttle_secs`; one reply per key in `keys` (the request's choices,
    /// each journaled under its key). A slot is held only while a request is on the wire:
    /// a row waiting out a backoff or a `Retry-After` leaves its slot to the others.
    pub(crate) async fn call_http(
        &self,
        req: &Request,
        keys: &[String],
        journal: &JournalScope,
    ) -> Vec<Reply> {
        let path = request_path(&self.spec);
        let mut retries = Retries::new(&self.spec);
        // The most the request can cost: what a budget holds back while it is out.
        let dearest = micro(self.spec.cost_usd(
            Some(prompt_estimate(req) as i64),
            None,
            Some(i64::from(req.max_tokens) * i64::from(req.choices.max(1))),
        ));
        loop {
            // Shortest answers first. In a job the short calls (instructions, scores) start a
            // row's chain and the long ones (rewrites) end it: serving the starts first keeps
            // every row's chain moving, so the job ends on few long calls rather than on whole
            // chains begun late. Measured on the BaF bench at 1,024 slots: 91% busy, against
            // 84-92% serving the longest first.
            let Some((endpoint, slot)) = self.acquire_slot(u32::MAX - req.max_tokens).await else {
                return retries.stopped(self.home().quota(), keys.len());
            };
            if let Err(error) = journal.writable().await {
                return retries.stopped(Some(error), keys.len());
            }
            // Taken with the slot in hand, so rows queued for a slot cannot all slip through;
            // recorded (a window ahead) before the request leaves, so a kill counts it.
            let held = match self.budget {
                None => Held::none(&self.spending),
                Some(budget) => match budget.start(&self.spending, dearest) {
                    Start::Go => {
                        let held = Held::of(&self.spending, dearest);
                        // A record a window (or a hundredth of the budget) ahead, not one a
                        // call.
                        let window = dearest
                            .saturating_mul(self.spec.concurrency.max(1) as u64)
                            .max(budget.limit_micro / 100);
                        self.spending.record_ahead(budget, window, journal).await;
                        held
                    }
                    Start::Wait => {
                        // Room only once calls in flight come back under their most.
                        drop(slot);
                        self.spending.settled().await;
                        continue;
                    }
                    Start::Refuse => return retries.stopped(Some(budget.message()), keys.len()),
                },
            };
            retries.sent += 1;
            let outcome = self
                .attempt(endpoint, path, req, keys, journal, micro_to_usd(dearest))
                .await;
            drop(slot);
            let paid = match &outcome {
                Ok(replies) => replies.iter().map(|r| r.cost_usd).sum(),
                Err(Failure::Retry { billed_usd, .. }) => *billed_usd,
                Err(Failure::Fatal(_)) => 0.0,
            };
            held.finish(micro(paid));
            let (message, after, throttle) = match outcome {
                Ok(mut replies) => {
                    replies[0].attempts = retries.sent;
                    replies[0].cost_usd += retries.billed_usd;
                    return replies;
                }
                Err(Failure::Fatal(message)) => {
                    return retries.stopped(Some(message), keys.len());
                }
                Err(Failure::Retry {
                    message,
                    after,
                    throttle,
                    billed_usd,
                    ..
                }) => {
                    retries.billed_usd += billed_usd;
                    (message, after, throttle)
                }
            };
            match retries.wait(after, throttle) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return retries.gave_up(&message, keys.len()),
            }
        }
    }

    /// One request on `endpoint` under its rate limits, counted, its health and the slots'
    /// size updated, and its replies journaled (one per key) before the slot is given back
    /// (so a kill loses at most the requests in flight).
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        path: &str,
        req: &Request,
        keys: &[String],
        journal: &JournalScope,
        dearest_usd: f64,
    ) -> Result<Vec<Reply>, Failure> {
        let features = features_of(req);
        if let Some(lacking) = endpoint.lacking(&self.spec.model, &features) {
            return Err(Failure::Fatal(lacking));
        }
        let url = format!("{}/{path}", endpoint.base_url);
        let estimate = (
            prompt_estimate(req),
            f64::from(req.max_tokens) * f64::from(req.choices.max(1)),
        );
        endpoint.limits.admit(estimate.0, estimate.1).await;
        endpoint.stats.requests.fetch_add(1, Ordering::Relaxed);
        // Serialised here, with the slot in hand: rows waiting for a slot hold only their
        // prompt, not a second copy of it as a body (26 MB of the job bench's heap was bodies
        // of rows still waiting).
        let body = RequestBody {
            spec: &self.spec,
            req,
        }
        .to_vec();
        let outcome = self
            .send_once(endpoint, &url, body, keys.len(), dearest_usd)
            .await;
        endpoint.stats.returned.fetch_add(1, Ordering::Relaxed);
        let usage = match &outcome {
            Ok(replies) => (
                replies.iter().map(|r| r.prompt_tokens).sum(),
                replies.iter().map(|r| r.completion_tokens).sum(),
            ),
            // A failed request generated nothing; its prompt still counts.
            Err(_) => (Some(estimate.0 as i64), Some(0)),
        };
        endpoint.limits.settle(estimate, usage);
        let outcome = outcome.map(|replies| {
            replies
                .into_iter()
                .enumerate()
                .map(|(i, reply)| {
                    // A server that reports no usage still bills: charge what the text
                    // suggests (a prompt's characters over four; the reply's likewise).
                    let prompt = reply
                        .prompt_tokens
                        .or((i == 0).then_some(estimate.0.round() as i64));
                    let completion = reply.completion_tokens.or_else(|| {
                        let chars = reply.text.as_ref().map_or(0, String::len)
                            + reply.reasoning.as_ref().map_or(0, String::len);
                        Some(chars.div_ceil(4) as i64)
                    });
                    Reply {
                        cost_usd: self.spec.cost_usd(prompt, reply.cached_tokens, completion),
                        ..reply
                    }
                })
                .collect::<Vec<Reply>>()
        });
        match &outcome {
            Ok(replies) => {
                endpoint.slots.on_success();
                endpoint.record_health(true);
                for (key, reply) in keys.iter().zip(replies) {
                    journal.record(key, reply).await;
                }
            }
            Err(Failure::Retry { throttle: true, .. }) => endpoint.slots.on_throttle(),
            // The server answered: the request (or its key) was wrong, not the server.
            Err(Failure::Fatal(_)) => endpoint.record_health(true),
            Err(_) => endpoint.record_health(false),
        }
        let server_error = match &outcome {
            Err(Failure::Retry { server_error, .. }) => *server_error,
            _ => None,
        };
        endpoint.note_features(&self.spec.model, &features, outcome.is_ok(), server_error);
        if let Err(Failure::Retry { billed_usd, .. }) = &outcome
            && *billed_usd > 0.0
        {
            journal.charge(*billed_usd).await;
        }
        outcome
    }

    /// One HTTP attempt on `endpoint`: its `choices` replies, or whether and when to retry.
    async fn send_once(
        &self,
        endpoint: &Endpoint,
        url: &str,
        body: Vec<u8>,
        choices: usize,
        dearest_usd: f64,
    ) -> Result<Vec<Reply>, Failure> {
        let mut request = endpoint
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let key_allowed = self.key_allowed(endpoint);
        if let Some(key) = &self.key
            && key_allowed
        {
            request = request.bearer_auth(&key.0);
        }
        let response = request.send().await.map_err(|e| Failure::Retry {
            message: describe_reqwest_error(&e),
            after: None,
            throttle: false,
            server_error: None,
            billed_usd: 0.0,
        })?;
        let status = response.status();
        if status.is_redirection() {
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "nowhere named".to_string(), redact_url);
            return Err(Failure::Fatal(format!(
                "HTTP {status}: {} redirected the request to {to}, another origin; not followed (a prompt and its key go only to the endpoint the job names). Point the job at the final address",
                endpoint.shown
            )));
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        // A reply the server sent but that cannot be read was billed: at its `usage` when
        // that can be read, else at the most the request could cost.
        let text = match read_capped(response, self.spec.max_reply_bytes).await {
            Ok(text) => text,
            Err(Failure::Retry {
                message,
                after,
                throttle,
                ..
            }) if status.is_success() => {
                return Err(Failure::Retry {
                    message,
                    after,
                    throttle,
                    server_error: None,
                    billed_usd: dearest_usd,
                });
            }
            Err(failure) => return Err(failure),
        };
        if status.as_u16() == 429 && is_quota_exhausted(&text) {
            let message = format!(
                "HTTP 429 from {}: the account's quota is exhausted ({})",
                endpoint.shown,
                snippet(&text)
            );
            *endpoint.quota.lock().expect("lock poisoned") = Some(message.clone());
            return Err(Failure::Fatal(message));
        }
        if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
            return Err(Failure::Retry {
                message: format!("HTTP {status}: {}", snippet(&text)),
                after: retry_after,
                throttle: status.as_u16() == 429,
                server_error: status.is_server_error().then_some(status.as_u16()),
                billed_usd: 0.0,
            });
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            let env = &self.spec.api_key_env;
            let why = if self.key.is_some() && !key_allowed {
                format!(
                    "${env} is set but not sent to {}: a key goes to OpenAI, or to the endpoints of a role that names it (api_key_env), and over plain http only to this machine unless key_over_http = true",
                    endpoint.shown
                )
            } else {
                format!("check ${env}")
            };
            return Err(Failure::Fatal(format!(
                "HTTP {status}: the server refused the credentials; {why}"
            )));
        }
        if !status.is_success() {
            return Err(Failure::Fatal(format!("HTTP {status}: {}", snippet(&text))));
        }
        parse_choices(&text, self.spec.api, choices).map_err(|message| Failure::Retry {
            message,
            after: None,
            throttle: false,
            server_error: None,
            billed_usd: billed_usage(&text).map_or(dearest_usd, |(p, c)| {
                self.spec.cost_usd(Some(p), None, Some(c))
            }),
        })
    }
}

/// A request's prompt tokens before the server counts them: four characters a token, over
/// the prompt, the system message and the turns of a conversation asked again.
fn prompt_estimate(req: &Request) -> f64 {
    let turns: usize = req
        .turns
        .iter()
        .map(|t| t.reply.len() + t.feedback.len())
        .sum();
    (req.prompt.len() + req.system.as_ref().map_or(0, String::len) + turns) as f64 / 4.0
}

/// The optional API features `req` uses, by name: a server may lack any of them.
fn features_of(req: &Request) -> Vec<&'static str> {
    let mut features = Vec::new();
    if req.schema.is_some() {
        features.push("response_format");
    }
    if req.top_logprobs.is_some() {
        features.push("logprobs");
    }
    if req.choices > 1 {
        features.push("n");
    }
    features
}

enum Failure {
    Retry {
        message: String,
        after: Option<Duration>,
        /// The server said to slow down (HTTP 429), as opposed to failing.
        throttle: bool,
        /// The 5xx status the server answered with, if it did.
        server_error: Option<u16>,
        /// What the server billed for the attempt (a reply it sent that could not be read).
        billed_usd: f64,
    },
    Fatal(String),
}

/// The body of `response`, read chunk by chunk and given up once it passes `cap` bytes: a
/// server streaming an endless body, times the requests in flight, must not exhaust memory.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<String, Failure> {
    let failed = |message: String| Failure::Retry {
        message,
        after: None,
        throttle: false,
        server_error: None,
        billed_usd: 0.0,
    };
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| failed(format!("reading the body: {}", describe_reqwest_error(&e))))?
    {
        if body.len() + chunk.len() > cap {
            return Err(failed(format!(
                "the reply is longer than {cap} bytes (max_reply_bytes); not read further"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
