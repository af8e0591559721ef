//! Cutting documents into candidate responses: whole documents or the text under each
//! header, with the length, header and repetition rules. Pure functions, testable alone.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;

/// How documents become candidate responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateMode {
    /// BaF: every document is one candidate.
    Document,
    /// Humpback: the text under each header is one candidate.
    Segments,
}

impl CandidateMode {
    /// Parses the name used in jobs and SQL (`document` or `segments`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "document" => Some(Self::Document),
            "segments" => Some(Self::Segments),
            _ => None,
        }
    }
}

/// Limits applied while cutting candidates out of a document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitRules {
    /// Which kind of unit to cut.
    pub mode: CandidateMode,
    /// Units shorter than this (characters) are dropped as `too_short`.
    pub min_chars: usize,
    /// Units longer than this (characters) are dropped as `too_long`; 0 means no limit.
    pub max_chars: usize,
    /// Two sentences whose word-trigram Jaccard similarity reaches this are "repeated".
    pub repeat_jaccard: f64,
}

/// One candidate cut from a document, with the reason it is dropped (if it is).
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Position of the unit within its document, from 0.
    pub ordinal: i64,
    /// The header the text sits under (segments mode), if any.
    pub header: Option<String>,
    /// The candidate text.
    pub text: String,
    /// Why the unit is dropped, or `None` when it is kept.
    pub drop: Option<&'static str>,
}

/// Words in headers that mark navigation or page furniture rather than content.
const NAVIGATION_WORDS: &[&str] = &[
    "advertisement",
    "forum",
    "quick link",
    "quick links",
    "free newsletter",
    "newsletter",
    "navigation",
    "menu",
    "related posts",
    "related articles",
    "share this",
    "comments",
    "leave a reply",
    "subscribe",
    "cookie",
    "cookies",
    "sign up",
    "log in",
    "follow us",
    "contact us",
    "sponsored",
    "recent posts",
    "popular posts",
    "tags",
    "categories",
    "archives",
];

/// Cuts a document into candidate units under `rules`, marking each with its drop reason.
pub fn cut_units(text: &str, rules: &UnitRules) -> Vec<Unit> {
    match rules.mode {
        CandidateMode::Document => vec![Unit {
            ordinal: 0,
            header: None,
            text: text.trim().to_string(),
            drop: document_problem(text, rules),
        }],
        CandidateMode::Segments => segments(text)
            .into_iter()
            .enumerate()
            .map(|(i, (header, body))| {
                let drop = header_problem(header.as_deref())
                    .or(body.is_empty().then_some("empty"))
                    .or_else(|| length_problem(&body, rules))
                    .or_else(|| {
                        has_repeated_sentences(&body, rules.repeat_jaccard)
                            .then_some("repeated_sentences")
                    });
                Unit {
                    ordinal: i as i64,
                    header,
                    text: body,
                    drop,
                }
            })
            .collect(),
    }
}

/// Why a whole document (document mode) is not a candidate: `empty`, `too_short`, `too_long`.
pub fn document_problem(text: &str, rules: &UnitRules) -> Option<&'static str> {
    let text = text.trim();
    if text.is_empty() {
        Some("empty")
    } else {
        length_problem(text, rules)
    }
}

fn length_problem(text: &str, rules: &UnitRules) -> Option<&'static str> {
    let chars = text.chars().count();
    if chars < rules.min_chars {
        Some("too_short")
    } else if rules.max_chars > 0 && chars > rules.max_chars {
        Some("too_long")
    } else {
        None
    }
}

/// Why a header disqualifies its segment: missing, all upper case, or page navigation.
pub fn header_problem(header: Option<&str>) -> Option<&'static str> {
    let header = header.map(str::trim).unwrap_or("");
    if header.is_empty() {
        return Some("empty_header");
    }
    let letters: Vec<char> = header.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()) {
        return Some("uppercase_header");
    }
    let lower = header.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let joined = words.join(" ");
    let is_nav = NAVIGATION_WORDS.iter().any(|nav| {
        // Whole-word match, so "forums" and "menu" match but "comment on tariffs" does not
        // hit "tags".
        joined == *nav
            || joined.starts_with(&format!("{nav} "))
            || joined.ends_with(&format!(" {nav}"))
            || joined.contains(&format!(" {nav} "))
            || joined == format!("{nav}s")
    });
    is_nav.then_some("navigation_header")
}

/// Splits plain text into (header, body) pairs. Text before the first header comes with no
/// header. A segment holds everything up to the next header of the same or a higher level, so
/// lower-level sub-sections stay inside their parent (as Humpback's segments do).
pub fn segments(text: &str) -> Vec<(Option<String>, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<(usize, u8, String)> = (0..lines.len())
        .filter_map(|i| header_at(&lines, i).map(|(level, h)| (i, level, h)))
        .collect();
    let mut out = Vec::new();
    let first = headers.first().map_or(lines.len(), |h| h.0);
    let preamble = join_body(&lines[..first]);
    if !preamble.is_empty() {
        out.push((None, preamble));
    }
    for (k, (start, level, header)) in headers.iter().enumerate() {
        let end = headers[k + 1..]
            .iter()
            .find(|(_, l, _)| l <= level)
            .map_or(lines.len(), |h| h.0);
        out.push((Some(header.clone()), join_body(&lines[start + 1..end])));
    }
    out
}

fn join_body(lines: &[&str]) -> String {
    let joined = lines.join("\n");
    let trimmed = joined.trim();
    // Collapse runs of blank lines left by removed furniture; keep paragraph breaks.
    let mut out = String::with_capacity(trimmed.len());
    let mut blank_run = 0;
    for line in trimmed.lines() {
        if line.trim().is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line.trim_end());
    }
    out
}

static MARKDOWN_HEADER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$").expect("valid regex"));

/// Recognises a header line: a Markdown heading, or a short title-like line that starts a
/// block and is followed by a longer paragraph. Returns (level, header text).
fn header_at(lines: &[&str], i: usize) -> Option<(u8, String)> {
    let line = lines[i].trim();
    if let Some(caps) = MARKDOWN_HEADER.captures(lines[i]) {
        return Some((caps[1].len() as u8, caps[2].to_string()));
    }
    if line.is_empty() || line.chars().count() > 100 || line.split_whitespace().count() > 12 {
        return None;
    }
    let starts_block = i == 0 || lines[i - 1].trim().is_empty();
    if !starts_block || !line.chars().any(char::is_alphabetic) {
        return None;
    }
    if line.ends_with(['.', '!', '?', ',', ';', ':', '"', '\u{201d}']) {
        return None;
    }
    if line.starts_with(['-', '*', '\u{2022}']) {
        return None;
    }
    let next = lines[i + 1..]
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())?;
    let next_is_paragraph = next.chars().count() >= 120
        || (next.ends_with(['.', '!', '?']) && next.len() > 2 * line.len());
    // Plain-text headers are treated as one level below any Markdown heading.
    next_is_paragraph.then(|| (7, line.to_string()))
}

/// True when two sentences of the text are near repeats of each other (word-trigram Jaccard
/// similarity at or above `threshold`), the sign of spun or templated pages.
pub fn has_repeated_sentences(text: &str, threshold: f64) -> bool {
    let grams: Vec<HashSet<(String, String, String)>> = sentences(text)
        .iter()
        .map(|s| word_trigrams(s))
        .filter(|g| g.len() >= 2)
        .collect();
    for a in 0..grams.len() {
        for b in a + 1..grams.len() {
            if jaccard(&grams[a], &grams[b]) >= threshold {
                return true;
            }
        }
    }
    false
}

/// Splits text into sentences at `.`, `!`, `?` followed by whitespace, and at line breaks.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut current = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            current.push(c);
            if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace()) {
                push_sentence(&mut out, &mut current);
            }
        }
        push_sentence(&mut out, &mut current);
    }
    out
}

fn push_sentence(out: &mut Vec<String>, current: &mut String) {
    let s = current.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
    current.clear();
}

/// Lower-cased words: runs of alphanumeric characters (apostrophes kept inside words).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn word_trigrams(text: &str) -> HashSet<(String, String, String)> {
    let w = words(text);
    w.windows(3)
        .map(|t| (t[0].clone(), t[1].clone(), t[2].clone()))
        .collect()
}

fn jaccard<T: std::hash::Hash + Eq>(a: &HashSet<T>, b: &HashSet<T>) -> f64 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}
