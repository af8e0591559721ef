//! The resolved parts of a job: model roles, LLM functions, stages and prepare settings, as a
//! run uses them, and the checks of their numbers.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use crate::job::catalog::{ExpectedOutput, MockAnswer};
use crate::job::file::Api;
use crate::job::schema::JsonSchema;
use crate::job_error;
use crate::prepare::segment::CandidateMode;

/// A resolved model role.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSpec {
    /// Role name.
    pub role: String,
    /// Base URLs (one or more replicas), or `mock`.
    pub endpoints: Vec<String>,
    /// Model name.
    pub model: String,
    /// Chat or completions.
    pub api: Api,
    /// Name of the environment variable with the API key (the key itself is never stored).
    pub api_key_env: String,
    /// Whether the job named `api_key_env` for this role (rather than the default).
    pub api_key_named: bool,
    /// Whether the key may go over plain HTTP to a host that is not this machine.
    pub key_over_http: bool,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Cap on requests in flight to the endpoint.
    pub concurrency: usize,
    /// Per-request timeout in seconds.
    pub timeout_secs: u64,
    /// Attempts per request that failed (not counting throttled ones).
    pub max_attempts: u32,
    /// Seconds a request may keep being throttled, from its first 429.
    pub throttle_secs: u64,
    /// Longest reply body read, in bytes.
    pub max_reply_bytes: usize,
    /// Extra request-body fields.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Requests per minute.
    pub requests_per_minute: Option<f64>,
    /// Prompt tokens per minute.
    pub input_tokens_per_minute: Option<f64>,
    /// Completion tokens per minute.
    pub output_tokens_per_minute: Option<f64>,
    /// Dollars per million prompt tokens.
    pub price_input_per_mtok: f64,
    /// Dollars per million completion tokens.
    pub price_output_per_mtok: f64,
    /// Dollars per million prompt tokens served from the prompt cache.
    pub price_cached_input_per_mtok: f64,
    /// Whether the server answers several samples in one request (the API's `n`).
    pub supports_n: bool,
    /// The base of every request's seed (see [`crate::job::file`]'s `seed`).
    pub seed: Option<u64>,
    /// Whether the job (or `--endpoint`) set this role. A job without `[models]` runs every
    /// role on the offline mock; one with `[models]` must name every role its stages call,
    /// so no stage reaches the mock by accident.
    pub declared: bool,
}

impl ModelSpec {
    /// Whether this role's API key may be sent to `endpoint`. The default variable
    /// (`OPENAI_API_KEY`) goes only to OpenAI; a variable the job names goes to the role's own
    /// endpoints. Never over plain HTTP, except to this machine or when the job says
    /// `key_over_http = true`.
    pub fn sends_key_to(&self, endpoint: &str) -> bool {
        let Ok(url) = url::Url::parse(endpoint) else {
            return false;
        };
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let plain = url.scheme() != "https";
        if plain && !loopback && !self.key_over_http {
            return false;
        }
        self.api_key_named || host == "api.openai.com"
    }

    /// What a call with these token counts costs at the model's prices; `cached` prompt
    /// tokens (part of `prompt`) at the cached-input price.
    pub fn cost_usd(
        &self,
        prompt: Option<i64>,
        cached: Option<i64>,
        completion: Option<i64>,
    ) -> f64 {
        let prompt = prompt.unwrap_or(0).max(0);
        let cached = cached.unwrap_or(0).clamp(0, prompt);
        ((prompt - cached) as f64 * self.price_input_per_mtok
            + cached as f64 * self.price_cached_input_per_mtok
            + completion.unwrap_or(0).max(0) as f64 * self.price_output_per_mtok)
            / 1e6
    }
}

/// A resolved LLM function.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FunctionSpec {
    /// SQL name of the function.
    pub name: String,
    /// Argument names, which are also the template's variables.
    pub args: Vec<String>,
    /// The built-in function it is or copies (`like`); `None` for a function written out.
    pub builtin: Option<String>,
    /// The model role it calls.
    pub role: String,
    /// Prompt template text (minijinja).
    pub template: String,
    /// Optional system message.
    pub system: Option<String>,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Ask for the first token's 20 most likely alternatives (logprob scoring).
    pub logprobs: bool,
    /// The text-mode template and output length, asked when a logprob reply names no digit.
    pub fallback: Option<(String, u32)>,
    /// The JSON Schema replies must follow (`json_schema`, or `mode = "json"` scoring).
    #[serde(skip)]
    pub schema: Option<Arc<JsonSchema>>,
    /// Replies off the schema asked again, each with what was wrong, before an error value.
    pub schema_retries: u32,
    /// Samples per row (`n`); more than one makes the reply a list.
    pub samples: u32,
    /// Output tokens `estimate` expects per call (the built-in's; `None` for a function
    /// written out in the job).
    #[serde(skip)]
    pub expected_output: Option<ExpectedOutput>,
    /// How the offline mock answers it.
    #[serde(skip)]
    pub mock: MockAnswer,
}

/// A resolved stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageSpec {
    /// Stage and table name.
    pub name: String,
    /// The SQL template text.
    pub sql: String,
    /// The table it reads, for `{{ stage.from }}`.
    pub from: Option<String>,
    /// Values for `{{ stage.NAME }}`.
    pub vars: toml::Table,
    /// Verbs `--stages` accepts for it (a built-in's).
    #[serde(skip)]
    pub aliases: Vec<String>,
}

/// Resolved candidate preparation settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrepareSpec {
    /// Document or segments.
    pub mode: CandidateMode,
    /// Minimum characters.
    pub min_chars: usize,
    /// Maximum characters (0: none).
    pub max_chars: usize,
    /// Maximum tokens.
    pub max_tokens: usize,
    /// Tokenizer spec.
    pub tokenizer: String,
    /// Sentence-repeat similarity threshold.
    pub repeat_jaccard: f64,
    /// Quality rules.
    pub quality: crate::prepare::quality::QualityRules,
    /// Near-dedup settings, when signatures are computed.
    pub near_dedup: Option<crate::prepare::minhash::NearDedup>,
}

/// Numbers a model role's requests depend on, checked where they are given rather than
/// where they would make the run misbehave (a rate of 0 or NaN, a cap no semaphore holds).
pub fn check_model(spec: &ModelSpec) -> Result<()> {
    let role = &spec.role;
    if !(1..=MAX_CONCURRENCY).contains(&spec.concurrency) {
        return job_error!(
            "[models.{role}] concurrency = {}: give 1 to {MAX_CONCURRENCY} requests in flight (or --concurrency)",
            spec.concurrency
        );
    }
    for (name, secs, most) in [
        ("timeout_secs", spec.timeout_secs, 7 * 86_400),
        ("throttle_secs", spec.throttle_secs, 30 * 86_400),
    ] {
        if secs > most {
            return job_error!("[models.{role}] {name} = {secs}: give at most {most} seconds");
        }
    }
    for (name, rate) in [
        ("requests_per_minute", spec.requests_per_minute),
        ("input_tokens_per_minute", spec.input_tokens_per_minute),
        ("output_tokens_per_minute", spec.output_tokens_per_minute),
    ] {
        if let Some(rate) = rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return job_error!(
                "[models.{role}] {name} = {rate}: give a positive number, or leave it out for no limit"
            );
        }
    }
    for (name, value) in [
        ("price_input_per_mtok", spec.price_input_per_mtok),
        ("price_output_per_mtok", spec.price_output_per_mtok),
        (
            "price_cached_input_per_mtok",
            spec.price_cached_input_per_mtok,
        ),
        ("temperature", spec.temperature),
        ("top_p", spec.top_p),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return job_error!("[models.{role}] {name} = {value}: give a number of at least 0");
        }
    }
    Ok(())
}

/// The most requests in flight one endpoint may be given.
pub const MAX_CONCURRENCY: usize = 100_000;

/// A budget needs a positive amount and prices to count against it.
pub fn check_budget(budget: Option<f64>, models: &BTreeMap<String, ModelSpec>) -> Result<()> {
    let Some(budget) = budget else {
        return Ok(());
    };
    if !(budget > 0.0 && budget.is_finite()) {
        return job_error!("[execution] budget_usd = {budget}: it must be a positive amount");
    }
    let priced = models
        .values()
        .any(|m| m.price_input_per_mtok > 0.0 || m.price_output_per_mtok > 0.0);
    if !priced {
        return job_error!(
            "[execution] budget_usd is set, but no model has prices, so nothing would count against it: \
             set price_input_per_mtok and price_output_per_mtok in [models.ROLE]"
        );
    }
    Ok(())
}
