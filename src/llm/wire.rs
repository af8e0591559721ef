//! The OpenAI-compatible wire format: request bodies, completion bodies, and error texts safe
//! to show (no URL, which may carry credentials).

use std::time::{Duration, SystemTime};

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Value, json};

use crate::job::{Api, ModelSpec};
use crate::llm::reply::{Reply, Request};
use crate::parse::{LENGTH_IN_REASONING, is_refusal};

/// A 429 that no amount of waiting fixes: OpenAI's `insufficient_quota` and its kin, as
/// opposed to a throttle.
pub(crate) fn is_quota_exhausted(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    lower.contains("insufficient_quota")
        || lower.contains("quota exceeded")
        || lower.contains("exceeded your current quota")
}

pub(crate) fn describe_reqwest_error(e: &reqwest::Error) -> String {
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

/// The start of a server's body for a message: one line, control characters escaped (it
/// may end up in a terminal and in stored rows).
pub(crate) fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    crate::escape::escape_control(&t.replace('\n', " ")).into_owned()
}

/// Parses an OpenAI-compatible chat or completions response body (its first choice).
pub fn parse_completion(body: &str, api: Api) -> Result<Reply, String> {
    let mut choices = parse_choices(body, api, 1)?;
    Ok(choices.swap_remove(0))
}

/// Parses the first `n` choices of a response body. The body's usage is shared out: prompt
/// tokens (and cached ones) go to the first choice, completion tokens to each choice in
/// proportion to its length, so per-choice figures add up to the server's.
pub fn parse_choices(body: &str, api: Api, n: usize) -> Result<Vec<Reply>, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("malformed response body: {e}"))?;
    let list = v
        .get("choices")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("response has no choices: {}", snippet(body)))?;
    // Fewer choices than asked: a server that ignores `n`; the caller asks for the rest.
    let mut replies = list[..n.min(list.len())]
        .iter()
        .map(|choice| parse_choice(choice, api, body))
        .collect::<Result<Vec<Reply>, String>>()?;
    let usage = v.get("usage");
    let count = |name: &str| usage.and_then(|u| u.get(name)).and_then(Value::as_i64);
    let detail = |at: &str| usage.and_then(|u| u.pointer(at)).and_then(Value::as_i64);
    let first = &mut replies[0];
    first.prompt_tokens = count("prompt_tokens");
    first.cached_tokens = detail("/prompt_tokens_details/cached_tokens");
    let reasoning = detail("/completion_tokens_details/reasoning_tokens");
    let lengths: Vec<usize> = replies
        .iter()
        .map(|r| {
            r.text.as_ref().map_or(0, String::len) + r.reasoning.as_ref().map_or(0, String::len)
        })
        .collect();
    let completion = plausible_completion(count("completion_tokens"), &replies);
    let completions = completion.map(|total| shared_out(total, &lengths));
    let reasonings = reasoning.map(|total| shared_out(total, &lengths));
    for (i, reply) in replies.iter_mut().enumerate() {
        reply.completion_tokens = completions.as_ref().map(|c| c[i]);
        reply.reasoning_tokens = reasonings.as_ref().map(|r| r[i]);
    }
    let cached_reported = replies[0].cached_tokens.is_some();
    for reply in &mut replies[1..] {
        reply.prompt_tokens = Some(0);
        reply.cached_tokens = cached_reported.then_some(0);
    }
    Ok(replies)
}

/// The completion tokens a response with several choices reports, unless they are fewer than
/// half of what the texts of `replies` hold (characters / 4 each): llama.cpp's server counts
/// the first choice only, which would make tokens and cost several times low; the texts'
/// estimate stands in.
fn plausible_completion(reported: Option<i64>, replies: &[Reply]) -> Option<i64> {
    if replies.len() < 2 {
        return reported;
    }
    let chars = |t: &Option<String>| t.as_ref().map_or(0, |t| t.chars().count());
    let by_text: i64 = replies
        .iter()
        .map(|r| (chars(&r.text) + chars(&r.reasoning)).div_ceil(4) as i64)
        .sum();
    match reported {
        Some(n) if 2 * n < by_text => Some(by_text),
        other => other,
    }
}

/// The `usage` (prompt, completion tokens) of a response body that could not be read as
/// choices, when it has one: what the server billed for it.
pub fn billed_usage(body: &str) -> Option<(i64, i64)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let usage = v.get("usage")?;
    let count = |name: &str| usage.get(name).and_then(Value::as_i64);
    let (prompt, completion) = (count("prompt_tokens"), count("completion_tokens"));
    (prompt.is_some() || completion.is_some())
        .then(|| (prompt.unwrap_or(0), completion.unwrap_or(0)))
}

/// `total` shared out in proportion to `lengths`, the rounding left to the last share, so
/// the shares add up to `total`.
fn shared_out(total: i64, lengths: &[usize]) -> Vec<i64> {
    let all = lengths.iter().sum::<usize>().max(1) as f64;
    let mut left = total;
    let mut shares: Vec<i64> = lengths[..lengths.len() - 1]
        .iter()
        .map(|&len| {
            let share = ((total as f64 * len as f64 / all).round() as i64).min(left);
            left -= share;
            share
        })
        .collect();
    shares.push(left);
    shares
}

/// One choice of a response: its text, thinking, finish reason and first-token alternatives.
fn parse_choice(choice: &Value, api: Api, body: &str) -> Result<Reply, String> {
    let content = match api {
        Api::Chat => choice.pointer("/message/content"),
        Api::Completions => choice.get("text"),
    }
    .and_then(Value::as_str);
    let field_reasoning = ["/message/reasoning_content", "/message/reasoning"]
        .iter()
        .find_map(|at| choice.pointer(at).and_then(Value::as_str))
        .filter(|r| !r.is_empty());
    let mut finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    // A refusal is an answer, paid for like any other: journaled, never asked again, and
    // dropped by the stage as `refused`. Its words, when the server gives them, are the text.
    let refusal = choice
        .pointer("/message/refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    if content.is_none() && (refusal.is_some() || is_refusal(finish_reason.as_deref())) {
        if refusal.is_some() && !is_refusal(finish_reason.as_deref()) {
            finish_reason = Some("refusal".to_string());
        }
        return Ok(Reply {
            text: Some(refusal.unwrap_or_default().to_string()),
            finish_reason,
            ..Reply::default()
        });
    }
    // A server parsing the thinking out may send no content at all when the limit cut it.
    let content = match (content, field_reasoning) {
        (Some(content), _) => content,
        (None, Some(_)) => "",
        (None, None) => {
            return Err(format!("response choice has no text: {}", snippet(body)));
        }
    };
    let (reasoning, text) = match field_reasoning {
        Some(r) => (Some(r.to_string()), content.to_string()),
        None => split_thinking(content),
    };
    if finish_reason.as_deref() == Some("length") && reasoning.is_some() && text.trim().is_empty() {
        finish_reason = Some(LENGTH_IN_REASONING.to_string());
    }
    let top = first_token_top_logprobs(choice, api);
    Ok(Reply {
        top_logprobs: top.map(|t| json!(t).to_string()),
        text: Some(text),
        finish_reason,
        reasoning,
        ..Reply::default()
    })
}

/// The first token's alternatives in `choice`, in either shape servers send whatever the API:
/// chat's `logprobs.content[0].top_logprobs = [{token, logprob}]` (llama.cpp's server uses it
/// on `/completions` too) and the legacy completions `logprobs.top_logprobs[0] = {token:
/// logprob}`. The API's own shape is tried first.
fn first_token_top_logprobs(choice: &Value, api: Api) -> Option<Vec<(String, f64)>> {
    let chat = || {
        choice
            .pointer("/logprobs/content/0/top_logprobs")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|t| {
                        Some((t["token"].as_str()?.to_string(), t["logprob"].as_f64()?))
                    })
                    .collect()
            })
    };
    let legacy = || {
        choice
            .pointer("/logprobs/top_logprobs/0")
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .filter_map(|(t, p)| Some((t.clone(), p.as_f64()?)))
                    .collect()
            })
    };
    match api {
        Api::Chat => chat().or_else(legacy),
        Api::Completions => legacy().or_else(chat),
    }
}

/// Splits a `<think>…</think>` block opening `content` from the answer after it: (thinking,
/// answer). An unclosed block is all thinking (the limit cut it); content without one is
/// all answer.
fn split_thinking(content: &str) -> (Option<String>, String) {
    let Some(inside) = content.trim_start().strip_prefix("<think>") else {
        return (None, content.to_string());
    };
    match inside.split_once("</think>") {
        Some((thinking, answer)) => (
            Some(thinking.trim().to_string()),
            answer.trim_start().to_string(),
        ),
        None => (Some(inside.trim().to_string()), String::new()),
    }
}

/// Parses a completion body of either API (a batch result does not say which it answers).
pub fn parse_any_completion(body: &Value) -> Result<Reply, String> {
    let text = body.to_string();
    let is_chat = body.pointer("/choices/0/message").is_some();
    parse_completion(&text, if is_chat { Api::Chat } else { Api::Completions })
}

/// The API path (after the base URL) of a request to `s`.
pub fn request_path(s: &ModelSpec) -> &'static str {
    match s.api {
        Api::Chat => "chat/completions",
        Api::Completions => "completions",
    }
}

/// The JSON body of a request, serialised straight from the request and the model's
/// settings: nothing is copied (the prompt least of all), and the bytes exist only while the
/// request is sent. A key of the model's `extra` table replaces the built-in one.
pub struct RequestBody<'a> {
    /// The model's settings.
    pub spec: &'a ModelSpec,
    /// What is asked.
    pub req: &'a Request,
}

impl RequestBody<'_> {
    /// The body as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request body serialises")
    }
}

impl Serialize for RequestBody<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (s, req) = (self.spec, self.req);
        let mut map = ser.serialize_map(None)?;
        // A built-in entry, unless the model's `extra` table has the key.
        macro_rules! put {
            ($key:expr, $value:expr) => {
                if !s.extra.contains_key($key) {
                    map.serialize_entry($key, $value)?;
                }
            };
        }
        put!("model", &s.model);
        match s.api {
            Api::Chat => put!("messages", &Messages(req)),
            Api::Completions => put!("prompt", &req.prompt),
        }
        put!("temperature", &s.temperature);
        put!("top_p", &s.top_p);
        // OpenAI's reasoning models refuse `max_tokens` (the limit covers thinking too, under
        // the newer name); vLLM and SGLang read either.
        if s.extra.contains_key("reasoning_effort") {
            put!("max_completion_tokens", &req.max_tokens);
        } else {
            put!("max_tokens", &req.max_tokens);
        }
        if let Some(n) = req.top_logprobs {
            match s.api {
                Api::Chat => {
                    put!("logprobs", &true);
                    put!("top_logprobs", &n);
                }
                Api::Completions => put!("logprobs", &n),
            }
        }
        if let Some(schema) = &req.schema {
            put!("response_format", &schema.response_format());
        }
        if req.choices > 1 {
            put!("n", &req.choices);
        }
        let seeded = req.sample.is_some() || s.seed.is_some();
        for (key, value) in &s.extra {
            // A seed of its own replaces the job's.
            if !(key == "seed" && seeded) {
                map.serialize_entry(key, value)?;
            }
        }
        if seeded {
            map.serialize_entry("seed", &request_seed(s, req))?;
        }
        map.end()
    }
}

/// The seed a request carries: the role's `seed` plus a hash of the prompt plus the sample's
/// number, kept under 2^31 (which every server takes); else the job's `extra.seed` plus the
/// sample's number.
pub fn request_seed(s: &ModelSpec, req: &Request) -> u64 {
    let sample = u64::from(req.sample.unwrap_or(0));
    let Some(seed) = s.seed else {
        let base = s.extra.get("seed").and_then(Value::as_u64).unwrap_or(0);
        return base.wrapping_add(sample);
    };
    // FNV-1a of the prompt: stable across runs, machines and versions.
    let prompt = req.system.iter().chain([&req.prompt]);
    let hash = prompt
        .flat_map(|p| p.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    seed.wrapping_add(hash).wrapping_add(sample) & 0x7fff_ffff
}

/// The chat messages of a request: the system message, the prompt, and the conversation of
/// replies sent back for being off the schema.
struct Messages<'a>(&'a Request);

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

impl Serialize for Messages<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let req = self.0;
        let mut seq = ser.serialize_seq(None)?;
        if let Some(system) = &req.system {
            seq.serialize_element(&Message {
                role: "system",
                content: system,
            })?;
        }
        seq.serialize_element(&Message {
            role: "user",
            content: &req.prompt,
        })?;
        for turn in &req.turns {
            seq.serialize_element(&Message {
                role: "assistant",
                content: &turn.reply,
            })?;
            seq.serialize_element(&Message {
                role: "user",
                content: &turn.feedback,
            })?;
        }
        seq.end()
    }
}

/// The longest wait a `Retry-After` is honoured for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The wait a `Retry-After` header asks for, seconds or an HTTP date (`Sun, 06 Nov 1994
/// 08:49:37 GMT`), at most [`MAX_RETRY_AFTER`]; `None` for anything else (`nan`, `inf`,
/// negative, garbage), so the usual backoff applies.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let at = http_date(value)?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP dates are sent in.
fn http_date(value: &str) -> Option<SystemTime> {
    let mut parts = value.split_whitespace();
    let _weekday = parts.next()?.strip_suffix(',')?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut clock = parts.next()?.split(':').map(|n| n.parse::<u64>().ok());
    let (h, m, s) = (clock.next()??, clock.next()??, clock.next()??);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * mo + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + s;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}
