//! What a call is asked and what it gives back, and the counters of calls.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::job::catalog::MockAnswer;
use crate::job::schema::JsonSchema;

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
    /// A reasoning model's thinking, kept apart from `text`: the server's `reasoning_content`
    /// or `reasoning` field, or a `<think>…</think>` block opening the content.
    pub reasoning: Option<String>,
    /// Tokens spent thinking (`usage.completion_tokens_details.reasoning_tokens`); they are
    /// part of `completion_tokens`.
    pub reasoning_tokens: Option<i64>,
    /// Prompt tokens the server read from its prompt cache
    /// (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<i64>,
}

impl Reply {
    /// This reply followed by `next`, asked because this one would not do (no digit among
    /// the logprobs, a reply off the schema): `next`'s answer, with the attempts, tokens,
    /// cost and time of both.
    pub fn followed_by(self, next: Reply) -> Reply {
        let sum = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        Reply {
            attempts: self.attempts + next.attempts,
            prompt_tokens: sum(self.prompt_tokens, next.prompt_tokens),
            completion_tokens: sum(self.completion_tokens, next.completion_tokens),
            reasoning_tokens: sum(self.reasoning_tokens, next.reasoning_tokens),
            cached_tokens: sum(self.cached_tokens, next.cached_tokens),
            cost_usd: self.cost_usd + next.cost_usd,
            latency_ms: self.latency_ms + next.latency_ms,
            cached: self.cached && next.cached,
            ..next
        }
    }
}

/// One request, fully rendered.
#[derive(Debug, Clone)]
pub struct Request {
    /// How the offline mock answers it (the asking function's).
    pub mock: MockAnswer,
    /// The rendered prompt.
    pub prompt: String,
    /// Optional system message (chat API).
    pub system: Option<String>,
    /// Maximum generated tokens.
    pub max_tokens: u32,
    /// Ask for this many most likely first tokens with their log-probabilities.
    pub top_logprobs: Option<u32>,
    /// The JSON Schema the reply must follow, sent as `response_format`.
    pub schema: Option<Arc<JsonSchema>>,
    /// Earlier replies that failed the schema, each with what was wrong, sent back as the
    /// conversation so far.
    pub turns: Vec<Turn>,
    /// Which of several samples of one prompt this is: sent as the request's `seed` (added to
    /// the job's own), so samples differ and each can be asked again alike.
    pub sample: Option<u32>,
    /// Choices asked of one request (the API's `n`); 1 for one.
    pub choices: u32,
}

impl Request {
    /// Sample `i` of this request, asked alone.
    pub fn sample(&self, i: u32) -> Request {
        Request {
            sample: Some(i),
            choices: 1,
            ..self.clone()
        }
    }
}

/// A reply that failed the function's schema, and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The reply's text.
    pub reply: String,
    /// The message sent back: what is wrong and what to do.
    pub feedback: String,
}

/// Counters of one endpoint, for run summaries and tests.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// HTTP requests sent, retries included.
    pub requests: AtomicU64,
    /// HTTP requests that came back (answered, refused or failed): what a stall lacks.
    pub returned: AtomicU64,
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
    /// Completion tokens spent thinking (part of `completion_tokens`).
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Prompt tokens read from the server's prompt cache (part of `prompt_tokens`).
    #[serde(default)]
    pub cached_tokens: u64,
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
            reasoning_tokens: self.reasoning_tokens - earlier.reasoning_tokens,
            cached_tokens: self.cached_tokens - earlier.cached_tokens,
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
            reasoning_tokens: self.reasoning_tokens + other.reasoning_tokens,
            cached_tokens: self.cached_tokens + other.cached_tokens,
        }
    }
}
