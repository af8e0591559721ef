//! The LLM client: OpenAI-compatible chat and completions over HTTP, or the offline `mock`.
//!
//! One [`Endpoint`] per base URL holds the cap on requests in flight, shared by every stage and
//! partition of the process; retries with backoff and jitter happen inside a call, so a row
//! only fails after its last attempt. Identical requests in flight at the same time are sent
//! once. Failures become values ([`Reply::error`]) rather than errors: one bad row never stops
//! a stage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::job::{Api, ModelSpec};
use crate::journal::Journal;
use crate::limits::{Aimd, Limits, Slot};

/// What one LLM call produced, success or not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Generated text (`None` when the call failed).
    pub text: Option<String>,
    /// `stop`, `length`, ... as the server reported it.
    pub finish_reason: Option<String>,
    /// Prompt tokens from the server's `usage`.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens from the server's `usage`.
    pub completion_tokens: Option<i64>,
    /// Wall time of the call including retries, in milliseconds.
    pub latency_ms: i64,
    /// HTTP attempts made (0 when no request was sent).
    pub attempts: i32,
    /// Why the call failed after its last attempt.
    pub error: Option<String>,
    /// True when the answer came without a request of this row's own (shared with an
    /// identical request in flight, or from the journal).
    pub cached: bool,
    /// What the call cost at the model's prices (0 when none are set or it was cached).
    pub cost_usd: f64,
    /// The most likely first tokens and their log-probabilities, as a JSON array of
    /// `[token, logprob]`, when the request asked for them.
    pub top_logprobs: Option<String>,
}

/// One request, fully rendered.
#[derive(Debug, Clone)]
pub struct Request {
    /// The built-in function that asks (`backtranslate`, ..., or the one a job's function
    /// copies), else the function's name; the mock answers according to it.
    pub task: String,
    /// The rendered prompt.
    pub prompt: String,
    /// Optional system message (chat API).
    pub system: Option<String>,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Ask for this many most likely first tokens with their log-probabilities.
    pub top_logprobs: Option<u32>,
}

/// Counters of one endpoint, for run summaries and tests.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// HTTP requests sent, retries included.
    pub requests: AtomicU64,
    /// Calls answered by sharing an identical call in flight.
    pub shared: AtomicU64,
    /// Calls that failed after their last attempt.
    pub failures: AtomicU64,
    /// Calls answered from the response journal of an earlier run.
    pub journaled: AtomicU64,
    /// Prompt tokens reported by the server.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens reported by the server.
    pub completion_tokens: AtomicU64,
    /// Cost at the model's prices, in millionths of a dollar.
    pub cost_micro_usd: AtomicU64,
}

/// A snapshot of [`EndpointStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Calls answered by sharing an identical call in flight.
    pub shared: u64,
    /// Calls that failed after their last attempt.
    pub failures: u64,
    /// Calls answered from the response journal.
    #[serde(default)]
    pub journaled: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost at the models' prices, in US dollars.
    #[serde(default)]
    pub cost_usd: f64,
}

impl Usage {
    /// Counts accrued since `earlier`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            requests: self.requests - earlier.requests,
            shared: self.shared - earlier.shared,
            failures: self.failures - earlier.failures,
            journaled: self.journaled - earlier.journaled,
            prompt_tokens: self.prompt_tokens - earlier.prompt_tokens,
            completion_tokens: self.completion_tokens - earlier.completion_tokens,
            cost_usd: self.cost_usd - earlier.cost_usd,
        }
    }

    /// Sum of two snapshots.
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            requests: self.requests + other.requests,
            shared: self.shared + other.shared,
            failures: self.failures + other.failures,
            journaled: self.journaled + other.journaled,
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cost_usd: self.cost_usd + other.cost_usd,
        }
    }
}

/// An API key read from the environment; never printed.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

type InFlight = Shared<BoxFuture<'static, Reply>>;

/// One server (base URL) and everything shared by the calls to it.
#[derive(Debug)]
pub struct Endpoint {
    base_url: String,
    http: reqwest::Client,
    slots: Arc<Aimd>,
    stats: EndpointStats,
    health: Mutex<Health>,
    /// Set when the server said the quota is exhausted; later calls fail without a request.
    quota: Mutex<Option<String>>,
    limits: Limits,
}

impl Endpoint {
    fn new(base_url: &str, concurrency: usize, timeout: Duration, limits: Limits) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(concurrency)
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            base_url: base_url.to_string(),
            http,
            slots: Aimd::new(concurrency),
            stats: EndpointStats::default(),
            health: Mutex::new(Health::default()),
            quota: Mutex::new(None),
            limits,
        }
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
        }
    }
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
    fn resting(&self) -> bool {
        let health = self.health.lock().expect("lock poisoned");
        health.resting_until.is_some_and(|t| Instant::now() < t)
    }

    fn record_health(&self, ok: bool) {
        let mut health = self.health.lock().expect("lock poisoned");
        if ok {
            *health = Health::default();
            return;
        }
        health.failures += 1;
        if health.failures >= FAILURES_BEFORE_REST {
            health.failures = 0;
            health.resting_until = Some(Instant::now() + REST);
            tracing::warn!(endpoint = %self.base_url, "Endpoint keeps failing; resting it for 30 s.");
        }
    }

    fn quota(&self) -> Option<String> {
        self.quota.lock().expect("lock poisoned").clone()
    }
}

/// A model role bound to its endpoints: what an LLM function calls.
#[derive(Debug, Clone)]
pub struct ModelClient {
    spec: ModelSpec,
    endpoints: Vec<Arc<Endpoint>>,
    key: Option<ApiKey>,
    journal: Arc<Journal>,
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
    /// Spent by the whole run so far, in millionths of a dollar (shared by all roles).
    spent: Arc<AtomicU64>,
    /// The run's budget in millionths of a dollar, if it has one.
    budget: Option<u64>,
    /// When set, requests are written down for an offline batch instead of being sent.
    capture: Option<Arc<Capture>>,
}

/// Requests written down for an offline batch (`vllm run-batch`, the OpenAI Batch API), one
/// line each in the OpenAI batch format, keyed by the request key.
#[derive(Debug, Default)]
pub struct Capture {
    lines: Mutex<Vec<Value>>,
    seen: Mutex<std::collections::HashSet<String>>,
}

impl Capture {
    /// The lines captured so far, each request once.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lock poisoned").clone()
    }
}

impl ModelClient {
    /// The role's resolved settings.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The endpoint that counts calls answered without a request of their own.
    fn home(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    /// A slot for the next attempt, on the endpoint that frees one first among those not
    /// resting and with quota left (all with quota left, when every one is resting): so each
    /// request goes to the least-loaded replica at the moment it can be sent. `None` when no
    /// endpoint has quota left.
    async fn acquire_slot(&self) -> Option<(&Arc<Endpoint>, Slot)> {
        let usable: Vec<&Arc<Endpoint>> = self
            .endpoints
            .iter()
            .filter(|e| e.quota().is_none())
            .collect();
        let awake: Vec<&Arc<Endpoint>> = usable.iter().copied().filter(|e| !e.resting()).collect();
        let candidates = if awake.is_empty() { usable } else { awake };
        if candidates.is_empty() {
            return None;
        }
        // Free slots now: take the replica with the most. Otherwise wait for the first.
        if let Some(best) = candidates.iter().max_by_key(|e| e.slots.available())
            && let Some(slot) = best.slots.try_acquire()
        {
            return Some((best, slot));
        }
        let waits = candidates.iter().map(|e| Box::pin(e.slots.acquire()));
        let (slot, index, _) = futures::future::select_all(waits).await;
        Some((candidates[index], slot))
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
        hex::encode(h.finalize())
    }

    /// Sends `req` (or joins an identical request already in flight) and returns its reply.
    pub async fn call(&self, req: Request) -> Reply {
        let key = self.request_key(&req);
        if let Some(reply) = self.journal.get(&key) {
            self.home().stats.journaled.fetch_add(1, Ordering::Relaxed);
            return reply;
        }
        if let Some(capture) = &self.capture {
            if capture
                .seen
                .lock()
                .expect("lock poisoned")
                .insert(key.clone())
            {
                let (path, body) = self.request_body(&req);
                capture.lines.lock().expect("lock poisoned").push(json!({
                    "custom_id": key, "method": "POST", "url": format!("/v1/{path}"), "body": body,
                }));
            }
            return Reply {
                error: Some("written to an offline batch, not sent".to_string()),
                ..Reply::default()
            };
        }
        let (future, leader) = {
            let mut map = self.in_flight.lock().expect("lock poisoned");
            match map.get(&key) {
                Some(existing) => (existing.clone(), false),
                None => {
                    let this = self.clone();
                    let done_key = key.clone();
                    // The entry goes when the call ends, even if the row that started it was
                    // cancelled meanwhile and a follower finished the work.
                    let fut = async move {
                        let reply = this.call_uncached(&req, &done_key).await;
                        this.in_flight
                            .lock()
                            .expect("lock poisoned")
                            .remove(&done_key);
                        reply
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
        }
        reply
    }

    async fn call_uncached(&self, req: &Request, key: &str) -> Reply {
        let started = Instant::now();
        let mut reply = if self.home().base_url == "mock" {
            self.home().stats.requests.fetch_add(1, Ordering::Relaxed);
            let reply = mock_reply(req);
            self.journal.record(key, &reply).await;
            reply
        } else {
            self.call_http(req, key).await
        };
        reply.latency_ms = started.elapsed().as_millis() as i64;
        reply.cost_usd = self
            .spec
            .cost_usd(reply.prompt_tokens, reply.completion_tokens);
        let stats = &self.home().stats;
        stats
            .cost_micro_usd
            .fetch_add((reply.cost_usd * 1e6).round() as u64, Ordering::Relaxed);
        self.spent
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

    async fn call_http(&self, req: &Request, key: &str) -> Reply {
        let (path, body) = self.request_body(req);
        let max_attempts = self.spec.max_attempts as i32;
        let mut last_error = String::new();
        for attempt in 1..=max_attempts {
            // Hold a slot only while the request is on the wire, not while backing off.
            let Some((endpoint, _slot)) = self.acquire_slot().await else {
                return Reply {
                    attempts: attempt - 1,
                    error: self.home().quota(),
                    ..Reply::default()
                };
            };
            // Checked with the slot in hand, so rows queued for a slot cannot all slip through.
            if let Some(budget) = self.budget
                && self.spent.load(Ordering::Relaxed) >= budget
            {
                return Reply {
                    attempts: attempt - 1,
                    error: Some(budget_message(budget)),
                    ..Reply::default()
                };
            }
            let url = format!("{}/{path}", endpoint.base_url);
            let estimate = (
                (req.prompt.len() + req.system.as_ref().map_or(0, String::len)) as f64 / 4.0,
                req.max_tokens as f64,
            );
            endpoint.limits.admit(estimate.0, estimate.1).await;
            let outcome = {
                endpoint.stats.requests.fetch_add(1, Ordering::Relaxed);
                let outcome = self.send_once(endpoint, &url, &body).await;
                let usage = match &outcome {
                    Ok(r) => (r.prompt_tokens, r.completion_tokens),
                    // A failed request generated nothing; its prompt still counts.
                    Err(_) => (Some(estimate.0 as i64), Some(0)),
                };
                endpoint.limits.settle(estimate, usage);
                match &outcome {
                    Ok(_) => {
                        endpoint.slots.on_success();
                        endpoint.record_health(true);
                    }
                    Err(Failure::Retry { throttle: true, .. }) => endpoint.slots.on_throttle(),
                    Err(_) => endpoint.record_health(false),
                }
                if let Ok(reply) = &outcome {
                    // The slot is held until the response is durable, so a kill loses at
                    // most the requests in flight.
                    self.journal.record(key, reply).await;
                }
                outcome
            };
            match outcome {
                Ok(mut reply) => {
                    reply.attempts = attempt;
                    return reply;
                }
                Err(Failure::Fatal(msg)) => {
                    return Reply {
                        attempts: attempt,
                        error: Some(msg),
                        ..Reply::default()
                    };
                }
                Err(Failure::Retry { message, after, .. }) => {
                    last_error = message;
                    if attempt < max_attempts {
                        tokio::time::sleep(after.unwrap_or_else(|| backoff(attempt))).await;
                    }
                }
            }
        }
        Reply {
            attempts: max_attempts,
            error: Some(format!(
                "gave up after {max_attempts} attempts: {last_error}"
            )),
            ..Reply::default()
        }
    }

    /// The API path (after the base URL) and the JSON body of a request.
    fn request_body(&self, req: &Request) -> (&'static str, Value) {
        let s = &self.spec;
        let mut body = match s.api {
            Api::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &req.system {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": req.prompt}));
                json!({"model": s.model, "messages": messages})
            }
            Api::Completions => json!({"model": s.model, "prompt": req.prompt}),
        };
        let obj = body.as_object_mut().expect("built as an object");
        obj.insert("temperature".into(), json!(s.temperature));
        obj.insert("top_p".into(), json!(s.top_p));
        obj.insert("max_tokens".into(), json!(req.max_tokens));
        if let Some(n) = req.top_logprobs {
            match s.api {
                Api::Chat => {
                    obj.insert("logprobs".into(), json!(true));
                    obj.insert("top_logprobs".into(), json!(n));
                }
                Api::Completions => {
                    obj.insert("logprobs".into(), json!(n));
                }
            }
        }
        for (k, v) in &s.extra {
            obj.insert(k.clone(), v.clone());
        }
        let path = match s.api {
            Api::Chat => "chat/completions",
            Api::Completions => "completions",
        };
        (path, body)
    }

    async fn send_once(
        &self,
        endpoint: &Endpoint,
        url: &str,
        body: &Value,
    ) -> Result<Reply, Failure> {
        let mut request = endpoint.http.post(url).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(&key.0);
        }
        let response = request.send().await.map_err(|e| Failure::Retry {
            message: describe_reqwest_error(&e),
            after: None,
            throttle: false,
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 600.0)));
        let text = response.text().await.map_err(|e| Failure::Retry {
            message: format!("reading the body: {}", describe_reqwest_error(&e)),
            after: None,
            throttle: false,
        })?;
        if status.as_u16() == 429 && is_quota_exhausted(&text) {
            let message = format!(
                "HTTP 429 from {}: the account's quota is exhausted ({})",
                endpoint.base_url,
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
            });
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(Failure::Fatal(format!(
                "HTTP {status}: the server refused the credentials; check ${}",
                self.spec.api_key_env
            )));
        }
        if !status.is_success() {
            return Err(Failure::Fatal(format!("HTTP {status}: {}", snippet(&text))));
        }
        parse_completion(&text, self.spec.api).map_err(|message| Failure::Retry {
            message,
            after: None,
            throttle: false,
        })
    }
}

fn budget_message(budget: u64) -> String {
    format!("the job's budget of ${:.2} is spent", budget as f64 / 1e6)
}

/// A 429 that no amount of waiting fixes: OpenAI's `insufficient_quota` and its kin, as
/// opposed to a throttle.
fn is_quota_exhausted(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    lower.contains("insufficient_quota")
        || lower.contains("quota exceeded")
        || lower.contains("exceeded your current quota")
}

enum Failure {
    Retry {
        message: String,
        after: Option<Duration>,
        /// The server said to slow down (HTTP 429), as opposed to failing.
        throttle: bool,
    },
    Fatal(String),
}

/// Exponential backoff with full jitter: up to 0.5 s × 2^(attempt-1), capped at 30 s.
fn backoff(attempt: i32) -> Duration {
    let cap = (0.5 * 2f64.powi(attempt - 1)).min(30.0);
    Duration::from_secs_f64(cap * (0.5 + 0.5 * fastrand::f64()))
}

fn describe_reqwest_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        // Without the URL: it is known to the caller and may carry credentials.
        e.without_url_ref().to_string()
    }
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut msg = self.to_string();
        if let Some(url) = self.url() {
            msg = msg.replace(url.as_str(), "<url>");
        }
        msg
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

/// Parses an OpenAI-compatible chat or completions response body.
pub fn parse_completion(body: &str, api: Api) -> Result<Reply, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("malformed response body: {e}"))?;
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| format!("response has no choices: {}", snippet(body)))?;
    let text = match api {
        Api::Chat => choice.pointer("/message/content"),
        Api::Completions => choice.get("text"),
    }
    .and_then(Value::as_str)
    .ok_or_else(|| format!("response choice has no text: {}", snippet(body)))?;
    let usage = v.get("usage");
    let count = |name: &str| usage.and_then(|u| u.get(name)).and_then(Value::as_i64);
    // Chat: logprobs.content[0].top_logprobs = [{token, logprob}]; completions:
    // logprobs.top_logprobs[0] = {token: logprob}.
    let top: Option<Vec<(String, f64)>> = match api {
        Api::Chat => choice
            .pointer("/logprobs/content/0/top_logprobs")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|t| {
                        Some((t["token"].as_str()?.to_string(), t["logprob"].as_f64()?))
                    })
                    .collect()
            }),
        Api::Completions => choice
            .pointer("/logprobs/top_logprobs/0")
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .filter_map(|(t, p)| Some((t.clone(), p.as_f64()?)))
                    .collect()
            }),
    };
    Ok(Reply {
        top_logprobs: top.map(|t| json!(t).to_string()),
        text: Some(text.to_string()),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        ..Reply::default()
    })
}

/// Parses a completion body of either API (a batch result does not say which it answers).
pub fn parse_any_completion(body: &Value) -> Result<Reply, String> {
    let text = body.to_string();
    let is_chat = body.pointer("/choices/0/message").is_some();
    parse_completion(&text, if is_chat { Api::Chat } else { Api::Completions })
}

/// The offline stand-in for a server: deterministic answers made from a hash of the prompt,
/// shaped like what each task expects. It is for trying the pipeline, not for real data.
pub fn mock_reply(req: &Request) -> Reply {
    let digest = Sha256::digest(req.prompt.as_bytes());
    let h = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let tail = prompt_tail(&req.prompt);
    let text = match req.task.as_str() {
        "backtranslate" => {
            let topic: Vec<&str> = tail.split_whitespace().take(6).collect();
            format!(
                "Can you explain {}?",
                topic.join(" ").trim_end_matches(['.', ',', ':'])
            )
        }
        // Roughly the shape of real judges: mostly 3-4, a fifth 5, some unparseable.
        // A second-iteration judge that does not simply echo the first.
        "score_pair" | "rescore" => match (if req.task == "rescore" { h >> 20 } else { h }) % 20 {
            0 => "I am not able to judge this pair.".to_string(),
            r => {
                let score = match r {
                    1..=4 => 5,
                    5..=9 => 4,
                    10..=14 => 3,
                    15..=17 => 2,
                    _ => 1,
                };
                format!("The answer addresses the instruction.\nScore: {score}")
            }
        },
        "rewrite" => format!("[RES]\n{}\n[/RES]", tail.trim()),
        "judge_instruction" => match h % 6 {
            0 => "The instruction depends on details it does not give.\nVerdict: bad".to_string(),
            _ => "The instruction is clear and can be answered.\nVerdict: good".to_string(),
        },
        // Now and then the failures Kun's post-filters are there for.
        "polish" => {
            let reference = req.prompt.split("\n\n").nth(1).unwrap_or(tail).trim();
            match h % 10 {
                0 => "I'm sorry, but I cannot help with that.".to_string(),
                1 => format!("According to the text, {reference}"),
                _ => reference.to_string(),
            }
        }
        _ => format!("Here is a short answer.\n\n{}", tail.trim()),
    };
    // Usage as a cl100k tokenizer counts it, so the mock's token figures read like a server's.
    let tokens = |s: &str| bpe_openai::cl100k_base().count(s) as i64;
    if req.top_logprobs.is_some() {
        // A judge sure of one digit, with a little mass on its neighbours.
        let best = 1 + (h % 5) as i64;
        let top: Vec<(String, f64)> = (1..=5)
            .map(|d: i64| {
                let p: f64 = if d == best {
                    0.7
                } else if (d - best).abs() == 1 {
                    0.1
                } else {
                    0.02
                };
                (d.to_string(), p.ln())
            })
            .collect();
        return Reply {
            prompt_tokens: Some(tokens(&req.prompt)),
            completion_tokens: Some(1),
            text: Some(best.to_string()),
            finish_reason: Some("length".to_string()),
            attempts: 1,
            top_logprobs: Some(json!(top).to_string()),
            ..Reply::default()
        };
    }
    Reply {
        prompt_tokens: Some(tokens(&req.prompt)),
        completion_tokens: Some(tokens(&text)),
        text: Some(text),
        finish_reason: Some("stop".to_string()),
        attempts: 1,
        ..Reply::default()
    }
}

/// The last labelled block of a built-in prompt (the document or draft), or the whole prompt.
fn prompt_tail(prompt: &str) -> &str {
    ["Draft response:\n", "Answer:\n", "Text:\n"]
        .iter()
        .find_map(|label| prompt.rfind(label).map(|i| &prompt[i + label.len()..]))
        .unwrap_or(prompt)
}

/// All endpoints of a run, one per base URL, and the model roles bound to them.
#[derive(Debug, Default)]
pub struct LlmPool {
    endpoints: HashMap<String, Arc<Endpoint>>,
    models: HashMap<String, ModelClient>,
    spent: Arc<AtomicU64>,
    budget: Option<u64>,
}

impl LlmPool {
    /// Builds one endpoint per distinct base URL. Roles sharing a server share its cap, which
    /// is the largest cap any of them asks for.
    pub fn new<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        journal: Arc<Journal>,
        budget_usd: Option<f64>,
    ) -> Self {
        Self::build(models, journal, budget_usd, None)
    }

    /// A pool whose calls are written to `capture` instead of being sent (answers already in
    /// the journal are still used).
    pub fn capturing<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        journal: Arc<Journal>,
        capture: Arc<Capture>,
    ) -> Self {
        Self::build(models, journal, None, Some(capture))
    }

    fn build<'a>(
        models: impl IntoIterator<Item = &'a ModelSpec>,
        journal: Arc<Journal>,
        budget_usd: Option<f64>,
        capture: Option<Arc<Capture>>,
    ) -> Self {
        let models: Vec<&ModelSpec> = models.into_iter().collect();
        let mut pool = LlmPool {
            budget: budget_usd.map(|b| (b * 1e6).round() as u64),
            ..LlmPool::default()
        };
        for spec in &models {
            let mut endpoints = Vec::new();
            for url in &spec.endpoints {
                let sharing = || models.iter().filter(|m| m.endpoints.contains(url));
                let endpoint = pool
                    .endpoints
                    .entry(url.clone())
                    .or_insert_with(|| {
                        // Roles sharing a server share its cap (the largest any asks for) and
                        // its limits (the strictest any sets).
                        let cap = sharing().map(|m| m.concurrency).max().unwrap_or(1);
                        let strictest = |f: fn(&ModelSpec) -> Option<f64>| {
                            sharing().filter_map(|m| f(m)).reduce(f64::min)
                        };
                        let limits = Limits::new(
                            strictest(|m| m.requests_per_minute),
                            strictest(|m| m.input_tokens_per_minute),
                            strictest(|m| m.output_tokens_per_minute),
                        );
                        let timeout = Duration::from_secs(spec.timeout_secs.max(1));
                        Arc::new(Endpoint::new(url, cap, timeout, limits))
                    })
                    .clone();
                endpoints.push(endpoint);
            }
            let key = std::env::var(&spec.api_key_env)
                .ok()
                .filter(|k| !k.is_empty())
                .map(ApiKey);
            pool.models.insert(
                spec.role.clone(),
                ModelClient {
                    spec: (*spec).clone(),
                    endpoints,
                    key,
                    journal: Arc::clone(&journal),
                    in_flight: Arc::default(),
                    spent: Arc::clone(&pool.spent),
                    budget: pool.budget,
                    capture: capture.clone(),
                },
            );
        }
        pool
    }

    /// The client for a model role.
    pub fn model(&self, role: &str) -> Option<&ModelClient> {
        self.models.get(role)
    }

    /// Counters summed over every endpoint.
    pub fn usage(&self) -> Usage {
        self.endpoints
            .values()
            .fold(Usage::default(), |acc, e| acc.plus(&e.usage()))
    }

    /// The budget's message once the run has spent it.
    pub fn budget_spent(&self) -> Option<String> {
        let budget = self.budget?;
        (self.spent.load(Ordering::Relaxed) >= budget).then(|| budget_message(budget))
    }

    /// Why a role can send no more requests (the quota of all its endpoints is exhausted).
    pub fn quota_exhausted(&self) -> Option<String> {
        // A role stops when every one of its endpoints is out of quota.
        self.models.values().find_map(|m| {
            let quotas: Option<Vec<String>> = m.endpoints.iter().map(|e| e.quota()).collect();
            quotas.map(|q| q.join("; "))
        })
    }

    /// The most requests one role may have in flight (its cap times its replicas).
    pub fn max_concurrency(&self) -> usize {
        self.models
            .values()
            .map(|m| m.spec.concurrency * m.endpoints.len())
            .max()
            .unwrap_or(1)
    }
}
