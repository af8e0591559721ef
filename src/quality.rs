//! Quality rules applied to candidates before any LLM sees them, each optional and each
//! counted under its own drop reason: language, minimum words, symbol and non-alphabetic word
//! ratios, lines ending in punctuation, repeated lines and paragraphs; and boilerplate lines
//! (cookie notices, navigation menus, footers), stripped or only counted.
//!
//! Thresholds follow the usual web-text heuristics (Gopher's and C4's) but none is on unless
//! the job asks, so the paper pipelines stay as published.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// `[prepare.quality]`: each rule is off unless set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityRules {
    /// Languages kept (`en`, `de`, or ISO 639-3 `eng`): from the document's metadata
    /// (`lang`, `language`) when it has one, else detected (texts the detector is unsure of
    /// pass this rule). Drop: `wrong_language`.
    pub languages: Option<Vec<String>>,
    /// Fewest words a candidate may have. Drop: `too_few_words`.
    pub min_words: Option<usize>,
    /// Most `#` and ellipses per word (Gopher: 0.1). Drop: `symbols`.
    pub max_symbol_ratio: Option<f64>,
    /// Largest share of words without a letter (Gopher: 0.2). Drop: `non_alpha_words`.
    pub max_non_alpha_words: Option<f64>,
    /// Smallest share of lines ending in . ! ? " or ' (C4 keeps only such lines; 0.5 is a
    /// document-level version). Drop: `few_punctuated_lines`.
    pub min_punctuated_lines: Option<f64>,
    /// Largest share of lines that repeat an earlier line (Gopher: 0.3). Drop:
    /// `repeated_lines`.
    pub max_repeated_lines: Option<f64>,
    /// Largest share of paragraphs that repeat an earlier one (Gopher: 0.3). Drop:
    /// `repeated_paragraphs`.
    pub max_repeated_paragraphs: Option<f64>,
    /// Boilerplate lines: `strip` removes them before candidates are cut, `count` only
    /// counts them (`boilerplate_lines`); unset skips the scan.
    pub boilerplate: Option<Boilerplate>,
}

/// What to do with boilerplate lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boilerplate {
    /// Remove them, and count them.
    Strip,
    /// Count them only.
    Count,
}

static BOILERPLATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)
        \b(we|this\ (web)?site)\ uses?\ cookies\b | \baccept\ (all\ )?cookies\b | \bcookie\ (policy|settings|preferences)\b
        | \ball\ rights\ reserved\b | ^\s*(copyright|©|\(c\))\s | \bprivacy\ policy\b.*\bterms\b | \bterms\ of\ (use|service)\b.*\bprivacy\b
        | ^\s*skip\ to\ (main\ )?content\s*$ | ^\s*(share\ (this|on)|follow\ us\ on)\b | \bsubscribe\ to\ our\ newsletter\b
        | ^\s*(sign\ in|log\ in|register)\s*(\||/|$) | ^\s*(home|about(\ us)?|contact(\ us)?|blog|shop|faq)\s*(\||»|›|/|·)\s*\S
        ",
    )
    .expect("valid regex")
});

/// Whether a line is page furniture: a cookie notice, a copyright or legal footer, a
/// share/follow/subscribe prompt, or a navigation menu (`Home | About | Contact`).
pub fn is_boilerplate(line: &str) -> bool {
    BOILERPLATE.is_match(line)
}

/// The document without its boilerplate lines (when `strip`) and how many there were.
pub fn clean_document(text: &str, strip: bool) -> (String, usize) {
    if !strip {
        return (
            text.to_string(),
            text.lines().filter(|l| is_boilerplate(l)).count(),
        );
    }
    let mut count = 0;
    let mut kept = Vec::new();
    for line in text.lines() {
        if is_boilerplate(line) {
            count += 1;
            if strip {
                continue;
            }
        }
        kept.push(line);
    }
    if !strip || count == 0 {
        return (text.to_string(), count);
    }
    (kept.join("\n"), count)
}

/// Two-letter codes for the languages people name most; three-letter codes pass as they are.
const ISO_639_1: &[(&str, &str)] = &[
    ("en", "eng"),
    ("de", "deu"),
    ("fr", "fra"),
    ("es", "spa"),
    ("it", "ita"),
    ("pt", "por"),
    ("nl", "nld"),
    ("ru", "rus"),
    ("zh", "cmn"),
    ("ja", "jpn"),
    ("ko", "kor"),
    ("ar", "arb"),
    ("pl", "pol"),
    ("sv", "swe"),
    ("tr", "tur"),
    ("uk", "ukr"),
    ("hi", "hin"),
    ("vi", "vie"),
];

fn iso3(code: &str) -> String {
    let code = code.trim().to_ascii_lowercase();
    let base = code
        .split(['-', '_'])
        .next()
        .unwrap_or_default()
        .to_string();
    ISO_639_1
        .iter()
        .find(|(two, _)| *two == base)
        .map_or(base, |(_, three)| three.to_string())
}

/// Detections less sure than this are not used: whatlang's own "reliable" mark (0.9) leaves
/// most paragraph-long English texts unjudged, 0.5 still keeps short mixed texts out.
const DETECTION_CONFIDENCE: f64 = 0.5;

/// The language of a document: `lang`/`language` in its JSON metadata, else detected when
/// the detector is sure (short or mixed texts are not judged: `None`).
pub fn language(text: &str, metadata: Option<&str>) -> Option<String> {
    let from_metadata = metadata
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|m| {
            ["lang", "language"]
                .iter()
                .find_map(|k| m.get(k).and_then(|v| v.as_str()).map(str::to_string))
        });
    match from_metadata {
        Some(code) => Some(iso3(&code)),
        None => whatlang::detect(text)
            .filter(|info| info.confidence() >= DETECTION_CONFIDENCE)
            .map(|info| info.lang().code().to_string()),
    }
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn repeated_share<'a>(items: impl Iterator<Item = &'a str>) -> f64 {
    let mut seen = HashSet::new();
    let (mut total, mut repeated) = (0, 0);
    for item in items.map(str::trim).filter(|i| !i.is_empty()) {
        total += 1;
        if !seen.insert(item) {
            repeated += 1;
        }
    }
    share(repeated, total)
}

impl QualityRules {
    /// The first rule `text` fails, as its drop reason; `metadata` is the document's JSON
    /// metadata (for its language).
    pub fn problem(&self, text: &str, metadata: Option<&str>) -> Option<&'static str> {
        if let Some(wanted) = &self.languages
            && let Some(lang) = language(text, metadata)
            && !wanted.iter().any(|w| iso3(w) == lang)
        {
            return Some("wrong_language");
        }
        let word_rules = self.min_words.is_some()
            || self.max_symbol_ratio.is_some()
            || self.max_non_alpha_words.is_some();
        // Most jobs set no word rule: no need to split every candidate.
        let words: Vec<&str> = if word_rules {
            text.split_whitespace().collect()
        } else {
            Vec::new()
        };
        if self.min_words.is_some_and(|min| words.len() < min) {
            return Some("too_few_words");
        }
        if let Some(max) = self.max_symbol_ratio {
            let symbols =
                text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
            if share(symbols, words.len()) > max {
                return Some("symbols");
            }
        }
        if let Some(max) = self.max_non_alpha_words {
            let non_alpha = words
                .iter()
                .filter(|w| !w.chars().any(char::is_alphabetic))
                .count();
            if share(non_alpha, words.len()) > max {
                return Some("non_alpha_words");
            }
        }
        if let Some(min) = self.min_punctuated_lines {
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let ended = lines
                .iter()
                .filter(|l| l.ends_with(['.', '!', '?', '"', '\'', '”', '’']))
                .count();
            if share(ended, lines.len()) < min {
                return Some("few_punctuated_lines");
            }
        }
        if self
            .max_repeated_lines
            .is_some_and(|max| repeated_share(text.lines()) > max)
        {
            return Some("repeated_lines");
        }
        if self
            .max_repeated_paragraphs
            .is_some_and(|max| repeated_share(text.split("\n\n")) > max)
        {
            return Some("repeated_paragraphs");
        }
        None
    }
}
