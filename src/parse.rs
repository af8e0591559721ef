//! Parsers of LLM output (scores, tagged answers, verdicts, instructions) and the phrase lists
//! the post-filters look for. No I/O and no Arrow, so each parser is testable alone.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;

use crate::prepare::segment::words;

/// A score parsed from a judge's output, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedScore {
    /// The score, 1 to 5, when one was found.
    pub score: Option<i64>,
    /// Why there is no score: `no_output`, `no_score`, `not_integer`, `out_of_range`,
    /// `truncated`, `truncated_in_reasoning`.
    pub reason: Option<&'static str>,
}

static SCORE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\bscore\**\s*[:=]\s*\**\s*(-?[0-9]+(?:[.,][0-9]+)?)").expect("valid regex")
});

/// The `finish_reason` of a reply cut by its token limit before the answer began: the
/// thinking used every token. Parsers report it as `truncated_in_reasoning`.
pub const LENGTH_IN_REASONING: &str = "length_in_reasoning";

/// Why a reply that ended as `finish_reason` may lack what was asked: `truncated` when the
/// token limit cut the answer, `truncated_in_reasoning` when it cut the thinking before any
/// answer; `None` when the reply was not cut.
pub(crate) fn cut_by_limit(finish_reason: Option<&str>) -> Option<&'static str> {
    match finish_reason {
        Some("length") => Some("truncated"),
        Some(LENGTH_IN_REASONING) => Some("truncated_in_reasoning"),
        _ => None,
    }
}

/// Parses `Score: N` from a judge's output. The last `Score:` wins, so reasoning that quotes
/// other numbers first does not count; `finish_reason = length` without a score is `truncated`.
pub fn parse_score(raw: Option<&str>, finish_reason: Option<&str>) -> ParsedScore {
    let none = |reason| ParsedScore {
        score: None,
        reason: Some(reason),
    };
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return none(cut_by_limit(finish_reason).unwrap_or("no_output"));
    };
    let Some(caps) = SCORE.captures_iter(raw).last() else {
        return none(cut_by_limit(finish_reason).unwrap_or("no_score"));
    };
    let number = &caps[1];
    if number.contains(['.', ',']) {
        return none("not_integer");
    }
    number.parse::<i64>().map_or(none("out_of_range"), rated)
}

/// A whole-number score: itself when it is on the 1-5 scale, else `out_of_range`.
fn rated(n: i64) -> ParsedScore {
    if (1..=5).contains(&n) {
        ParsedScore {
            score: Some(n),
            reason: None,
        }
    } else {
        ParsedScore {
            score: None,
            reason: Some("out_of_range"),
        }
    }
}

/// The text between the first `[TAG]` and the following `[/TAG]`, trimmed; `None` when the
/// tags are missing, unclosed or enclose nothing.
pub fn extract_tagged(raw: &str, tag: &str) -> Option<String> {
    let (open, close) = (format!("[{tag}]"), format!("[/{tag}]"));
    let start = find_ci(raw, &open)? + open.len();
    let end = start + find_ci(&raw[start..], &close)?;
    let inner = raw[start..end].trim();
    (!inner.is_empty()).then(|| inner.to_string())
}

/// Why [`extract_tagged`] found nothing: `no_output`, `missing_tag`, `unclosed_tag`,
/// `truncated` (unclosed because generation hit its length limit), `truncated_in_reasoning`
/// (the limit was spent thinking) or `empty`.
pub fn tag_problem(
    raw: Option<&str>,
    tag: &str,
    finish_reason: Option<&str>,
) -> Option<&'static str> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        // A reply cut at its limit still shows the opened tag; only a cut in the thinking
        // leaves no output at all.
        return Some(if finish_reason == Some(LENGTH_IN_REASONING) {
            "truncated_in_reasoning"
        } else {
            "no_output"
        });
    };
    let (open, close) = (format!("[{tag}]"), format!("[/{tag}]"));
    let Some(pos) = find_ci(raw, &open) else {
        return Some("missing_tag");
    };
    let start = pos + open.len();
    match find_ci(&raw[start..], &close) {
        None if finish_reason == Some("length") => Some("truncated"),
        None => Some("unclosed_tag"),
        Some(end) if raw[start..start + end].trim().is_empty() => Some("empty"),
        Some(_) => None,
    }
}

fn find_ci(haystack: &str, needle: &str) -> Option<usize> {
    // Tags are ASCII, so lower-casing ASCII keeps byte offsets aligned.
    haystack
        .to_ascii_lowercase()
        .find(&needle.to_ascii_lowercase())
}

static INSTRUCTION_PREFIX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^\s*(?:\*\*)?(?:instruction|question|user|prompt|query)\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
    )
    .expect("valid regex")
});

/// The instruction in a backtranslation output: label prefixes (`Instruction:`), wrapping
/// quotes and surrounding whitespace removed; `None` when nothing is left.
pub fn clean_instruction(raw: &str) -> Option<String> {
    let text = raw.trim();
    let text = INSTRUCTION_PREFIX.replace(text, "");
    let mut text = text.trim();
    for (open, close) in [("\"", "\""), ("'", "'"), ("\u{201c}", "\u{201d}")] {
        if text.len() >= open.len() + close.len() && text.starts_with(open) && text.ends_with(close)
        {
            text = text[open.len()..text.len() - close.len()].trim();
        }
    }
    (!text.is_empty()).then(|| text.to_string())
}

/// The least probability the digits 1-5 must hold among a first token's alternatives for
/// them to be a score: below it the model was mostly about to write something else, and the
/// text judgement is asked instead.
pub const MIN_DIGIT_MASS: f64 = 0.5;

/// [`logprob_score`], when the digits hold at least [`MIN_DIGIT_MASS`].
pub fn weighed_score(top_logprobs: &str) -> Option<(f64, f64)> {
    logprob_score(top_logprobs).filter(|(_, mass)| *mass >= MIN_DIGIT_MASS)
}

/// The expected score over the digits 1-5 among a first token's most likely alternatives
/// (`[[token, logprob], ...]` as JSON), and the probability mass those digits hold; `None`
/// when no digit is among them (or the JSON is not such a list).
pub fn logprob_score(top_logprobs: &str) -> Option<(f64, f64)> {
    let list: Vec<(String, f64)> = serde_json::from_str(top_logprobs).ok()?;
    let mut mass = [0.0f64; 5];
    for (token, logprob) in list {
        if let Ok(d) = token.trim().parse::<usize>()
            && (1..=5).contains(&d)
        {
            // Tokenizers may offer " 4" and "4" separately: both are the digit 4.
            mass[d - 1] += logprob.exp();
        }
    }
    let total: f64 = mass.iter().sum();
    (total > 0.0).then(|| {
        let expected = mass
            .iter()
            .enumerate()
            .map(|(i, p)| (i + 1) as f64 * p)
            .sum::<f64>()
            / total;
        (expected, total)
    })
}

/// The word n-grams of a text, each joined by single spaces (lower-cased words).
pub fn word_ngrams(text: &str, n: usize) -> Vec<String> {
    let w = words(text);
    if n == 0 || w.len() < n {
        return Vec::new();
    }
    w.windows(n).map(|g| g.join(" ")).collect()
}

/// The share of `text`'s word n-grams that also occur in `reference`: how much of a rewrite
/// is copied from its draft. `None` when the text has no n-gram.
pub fn ngram_overlap(text: &str, reference: &str, n: usize) -> Option<f64> {
    let grams = word_ngrams(text, n);
    if grams.is_empty() {
        return None;
    }
    let reference: HashSet<String> = word_ngrams(reference, n).into_iter().collect();
    let found = grams.iter().filter(|g| reference.contains(*g)).count();
    Some(found as f64 / grams.len() as f64)
}

/// A 1-5 judgement of a pair from either scoring mode: the logprob expectation when the
/// reply carries one, else the parsed `Score: N`.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The score, 1 to 5 (the rounded expectation in logprob mode).
    pub score: Option<i64>,
    /// Why there is no score (the [`parse_score`] reasons, `refused` or `llm_error`).
    pub reason: Option<&'static str>,
    /// Expected score over the digits 1-5 of the first token.
    pub expected: Option<f64>,
    /// Probability the digits 1-5 hold among the first token's alternatives.
    pub mass: Option<f64>,
    /// `logprobs`, `text` or `json`: which judgement was used (none after an error).
    pub source: Option<&'static str>,
}

/// Reads a scoring reply: `error` wins, then the logprob expectation, then the text.
pub fn judge(
    text: Option<&str>,
    finish_reason: Option<&str>,
    error: Option<&str>,
    top_logprobs: Option<&str>,
) -> Judgement {
    let failed = if error.is_some() {
        Some("llm_error")
    } else if is_refusal(finish_reason) {
        Some("refused")
    } else {
        None
    };
    if failed.is_some() {
        return Judgement {
            score: None,
            reason: failed,
            expected: None,
            mass: None,
            source: None,
        };
    }
    let weighed = top_logprobs.and_then(weighed_score);
    if let Some((expected, mass)) = weighed {
        return Judgement {
            score: Some(expected.round() as i64),
            reason: None,
            expected: Some(expected),
            mass: Some(mass),
            source: Some("logprobs"),
        };
    }
    let (parsed, source) = match text.and_then(json_object) {
        Some(object) => (json_score(&object), "json"),
        None => (parse_score(text, finish_reason), "text"),
    };
    Judgement {
        score: parsed.score,
        reason: parsed.reason,
        expected: None,
        mass: None,
        source: Some(source),
    }
}

/// True for the finish reasons of a reply the server refused to give: `content_filter` (its
/// filter stopped it) or `refusal` (the model refused, its words in the reply's text).
pub fn is_refusal(finish_reason: Option<&str>) -> bool {
    matches!(finish_reason, Some("content_filter" | "refusal"))
}

/// The JSON object a reply consists of (`mode = "json"`), if it is one.
fn json_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let body = unfenced(text);
    if !body.starts_with('{') {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// A reply's text without a Markdown code fence around it (whose first line may name the
/// language), trimmed: where models that were asked for JSON often put it.
pub fn unfenced(text: &str) -> &str {
    let trimmed = text.trim();
    let Some(rest) = trimmed.strip_prefix("```") else {
        return trimmed;
    };
    let Some(inner) = rest.strip_suffix("```") else {
        return trimmed;
    };
    match inner.split_once('\n') {
        Some((lang, body)) if !lang.trim_start().starts_with(['{', '[']) => body.trim(),
        _ => inner.trim(),
    }
}

/// The `score` field of a JSON judgement, held to the same rules as `Score: N`.
fn json_score(object: &serde_json::Map<String, serde_json::Value>) -> ParsedScore {
    let none = |reason| ParsedScore {
        score: None,
        reason: Some(reason),
    };
    match object.get("score") {
        None | Some(serde_json::Value::Null) => none("no_score"),
        Some(v) => match (v.as_i64(), v.as_f64()) {
            (Some(n), _) => rated(n),
            (None, Some(_)) => none("not_integer"),
            (None, None) => none("no_score"),
        },
    }
}

/// A good/bad verdict on an instruction (Kun's instruction-only judgement), or why there is
/// none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `good` or `bad`.
    pub verdict: Option<&'static str>,
    /// Why there is no verdict: `no_output`, `no_verdict`, `truncated`,
    /// `truncated_in_reasoning`, `both`.
    pub reason: Option<&'static str>,
}

static VERDICT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\bverdict\**\s*[:=]\s*\**\s*\[?\s*(good|bad)\b|【(好|差)】")
        .expect("valid regex")
});

/// Parses `Verdict: good|bad` (or Kun's 【好】/【差】). The last verdict wins, as with scores;
/// a reply naming both kinds in Kun's brackets has none (Kun keeps only good without bad).
pub fn parse_verdict(raw: Option<&str>, finish_reason: Option<&str>) -> Verdict {
    let none = |reason| Verdict {
        verdict: None,
        reason: Some(reason),
    };
    let cut = cut_by_limit(finish_reason);
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return none(cut.unwrap_or("no_output"));
    };
    if raw.contains("【好】") && raw.contains("【差】") {
        return none("both");
    }
    let Some(caps) = VERDICT.captures_iter(raw).last() else {
        return none(cut.unwrap_or("no_verdict"));
    };
    let word = caps.get(1).or(caps.get(2)).map_or("", |m| m.as_str());
    let good = word.eq_ignore_ascii_case("good") || word == "好";
    Verdict {
        verdict: Some(if good { "good" } else { "bad" }),
        reason: None,
    }
}

fn phrase_regex(phrases: &[&str]) -> Regex {
    let alternatives: Vec<String> = phrases
        .iter()
        .map(|p| {
            p.split(' ')
                .map(regex::escape)
                .collect::<Vec<_>>()
                .join(r"\s+")
        })
        .collect();
    Regex::new(&format!(r"(?i)\b(?:{})\b", alternatives.join("|"))).expect("valid regex")
}

/// Phrases with which an answer refuses or apologises instead of answering.
pub const REFUSAL_PHRASES: &[&str] = &[
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I apologise",
    "my apologies",
    "I cannot help",
    "I can't help",
    "I cannot assist",
    "I can't assist",
    "I cannot provide",
    "I can't provide",
    "I'm unable to",
    "I am unable to",
    "I'm not able to",
    "I am not able to",
    "I do not have access",
    "I don't have access",
];

/// Phrases with which an answer talks about its source or itself rather than the question:
/// a reader of the final pair never saw "the text" or "the draft".
pub const SELF_REFERENCE_PHRASES: &[&str] = &[
    "the text",
    "the draft",
    "the passage",
    "the article",
    "the document",
    "the original response",
    "the original text",
    "the provided",
    "the given text",
    "this draft",
    "as an AI",
    "as a language model",
    "AI language model",
    "I am an AI",
    "I'm an AI",
];

/// Phrases with which an instruction points at a document the user of the final pair will
/// not have (Kun drops such instructions before judging them).
pub const SOURCE_REFERENCE_PHRASES: &[&str] = &[
    "the text",
    "the passage",
    "the article",
    "the document",
    "the excerpt",
    "the above",
    "the given",
    "the provided",
    "the author",
    "this article",
    "this text",
    "this passage",
    "this post",
    "this page",
    "according to",
    "the link",
    "the url",
    "the website",
    "the image",
    "the picture",
];

static REFUSAL: LazyLock<Regex> = LazyLock::new(|| phrase_regex(REFUSAL_PHRASES));
static SELF_REFERENCE: LazyLock<Regex> = LazyLock::new(|| phrase_regex(SELF_REFERENCE_PHRASES));
static SOURCE_REFERENCE: LazyLock<Regex> = LazyLock::new(|| phrase_regex(SOURCE_REFERENCE_PHRASES));

/// The first refusal or apology phrase in `text`, as written.
pub fn refusal_phrase(text: &str) -> Option<&str> {
    REFUSAL.find(text).map(|m| m.as_str())
}

/// The first phrase in which `text` refers to its source or calls itself an AI, as written.
pub fn self_reference_phrase(text: &str) -> Option<&str> {
    SELF_REFERENCE.find(text).map(|m| m.as_str())
}

/// The first phrase in which an instruction refers to a document, as written.
pub fn source_reference_phrase(text: &str) -> Option<&str> {
    SOURCE_REFERENCE.find(text).map(|m| m.as_str())
}

/// Longest run of the same word sequence repeated back to back, counted in copies (1 when
/// nothing repeats), over sequences of up to `max_period` words. "a b a b a b" is 3.
/// Catastrophic repetition (a model looping) shows as a large count; punctuation is ignored,
/// so Markdown tables and rules do not count as repetition.
pub fn max_repeats(text: &str, max_period: usize) -> usize {
    let w = words(text);
    let mut best = 1;
    for period in 1..=max_period.min(w.len() / 2) {
        let mut run = 0;
        for i in period..w.len() {
            if w[i] == w[i - period] {
                run += 1;
                best = best.max(run / period + 1);
            } else {
                run = 0;
            }
        }
    }
    best
}
