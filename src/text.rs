//! Pure text functions behind the prepare stage and the parsers: segmentation, normalisation,
//! score and tag parsing. No I/O and no Arrow here, so each rule is testable alone.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;
use sha2::{Digest, Sha256};

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

/// The text as compared by exact dedup: lower case, whitespace collapsed, trimmed.
pub fn normalize_for_dedup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            // The common case, without per-character Unicode case tables.
            out.extend(word.bytes().map(|b| b.to_ascii_lowercase() as char));
        } else {
            out.extend(word.chars().flat_map(char::to_lowercase));
        }
    }
    out
}

/// The first 16 bytes of SHA-256 over [`normalize_for_dedup`]`(text)`: the exact-dedup key.
/// The text is normalised straight into the hash through a small buffer, sixteen bytes at a
/// time where they are ASCII and hold no whitespace but single spaces (most of prose), a
/// character at a time around the rest: building the normalised copy of every candidate cost
/// more than hashing it, and most web pages hold some non-ASCII (curly quotes, dashes, ©).
pub fn dedup_digest(text: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    let mut out = Collapsed::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let mut ascii = bytes.len() - at;
        if let Some(chunk) = bytes.get(at..at + 16) {
            let window = u128::from_le_bytes(chunk.try_into().expect("16 bytes"));
            ascii = ((window & HIGH_BITS).trailing_zeros() / 8) as usize;
            if ascii == 16 {
                if !out.push_plain(window) {
                    chunk.iter().for_each(|&b| out.push(b, &mut hasher));
                }
                out.flush_if_full(&mut hasher);
                at += 16;
                continue;
            }
        }
        // The ASCII bytes before the first other character, then that character.
        let plain = bytes[at..]
            .iter()
            .take(ascii)
            .take_while(|b| b.is_ascii())
            .count();
        for &b in &bytes[at..at + plain] {
            out.push(b, &mut hasher);
        }
        at += plain;
        if let Some(c) = text[at..].chars().next().filter(|c| !c.is_ascii()) {
            out.push_char(c, &mut hasher);
            at += c.len_utf8();
        }
    }
    out.finish(&mut hasher);
    let mut key = [0u8; 16];
    key.copy_from_slice(&hasher.finalize()[..16]);
    key
}

/// ASCII being lower-cased and its whitespace collapsed on the way into a hash.
struct Collapsed {
    buf: [u8; 8192],
    len: usize,
    /// Leading whitespace is dropped as if a space had come before it.
    after_space: bool,
}

impl Collapsed {
    fn new() -> Self {
        Self {
            buf: [0; 8192],
            len: 0,
            after_space: true,
        }
    }

    fn push(&mut self, b: u8, hasher: &mut Sha256) {
        let mapped = ASCII_DEDUP[b as usize];
        let space = mapped == b' ';
        self.buf[self.len] = mapped;
        self.len += usize::from(!(space && self.after_space));
        self.after_space = space;
        self.flush_if_full(hasher);
    }

    /// Appends a character that is not ASCII: a space for whitespace, else lower-cased.
    fn push_char(&mut self, c: char, hasher: &mut Sha256) {
        if c.is_whitespace() {
            return self.push(b' ', hasher);
        }
        for lower in c.to_lowercase() {
            // At most three characters of four bytes: they fit the sixteen kept free.
            let len = lower.encode_utf8(&mut self.buf[self.len..]).len();
            self.len += len;
        }
        self.after_space = false;
        self.flush_if_full(hasher);
    }

    /// Appends sixteen bytes lower-cased when their only whitespace is single spaces, none
    /// right after a space; otherwise appends nothing and returns false.
    fn push_plain(&mut self, window: u128) -> bool {
        let kinds = ByteKinds::of(window);
        let previous = (kinds.whitespace << 1) | u32::from(self.after_space);
        if kinds.whitespace != kinds.space || kinds.whitespace & previous != 0 {
            return false;
        }
        // An upper-case letter's high bit moved to 0x20 makes it lower case.
        let lower = window | (ascii_bytes_in(window, b'A', b'Z') >> 2);
        self.buf[self.len..self.len + 16].copy_from_slice(&lower.to_le_bytes());
        self.len += 16;
        self.after_space = kinds.space >> 15 != 0;
        true
    }

    /// Hashes all but the last byte when another sixteen might not fit: the last may be a
    /// trailing space.
    fn flush_if_full(&mut self, hasher: &mut Sha256) {
        if self.len + 16 > self.buf.len() {
            hasher.update(&self.buf[..self.len - 1]);
            self.buf[0] = self.buf[self.len - 1];
            self.len = 1;
        }
    }

    fn finish(mut self, hasher: &mut Sha256) {
        if self.after_space && self.len > 0 {
            self.len -= 1;
        }
        hasher.update(&self.buf[..self.len]);
    }
}

/// What each byte of a 16-byte window is, one bit per byte (bit `i` for byte `i`): the tests
/// the tokenizer's word scan and exact dedup make, for sixteen bytes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteKinds {
    /// `a` to `z`.
    pub lower: u32,
    /// `A` to `Z`.
    pub upper: u32,
    /// `0` to `9`.
    pub digit: u32,
    /// The space character.
    pub space: u32,
    /// ASCII whitespace: space, `\t`, `\n`, `\x0B`, `\x0C`, `\r`.
    pub whitespace: u32,
    /// Bytes of multi-byte UTF-8 characters.
    pub non_ascii: u32,
}

impl ByteKinds {
    /// The kinds of the bytes of `window` (little-endian: byte 0 is the first), with SSE2.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn of(window: u128) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of every x86_64 CPU; the intrinsics read only this vector.
        unsafe {
            let v = _mm_loadu_si128((&window as *const u128).cast());
            // Signed byte compares: non-ASCII bytes are negative and fall in no range.
            let within = |lo: u8, hi: u8| {
                let above = _mm_cmpgt_epi8(v, _mm_set1_epi8(lo as i8 - 1));
                let below = _mm_cmplt_epi8(v, _mm_set1_epi8(hi as i8 + 1));
                _mm_movemask_epi8(_mm_and_si128(above, below)) as u32
            };
            let space = within(b' ', b' ');
            Self {
                lower: within(b'a', b'z'),
                upper: within(b'A', b'Z'),
                digit: within(b'0', b'9'),
                space,
                whitespace: space | within(b'\t', b'\r'),
                non_ascii: _mm_movemask_epi8(v) as u32,
            }
        }
    }

    /// The kinds of the bytes of `window`.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub fn of(window: u128) -> Self {
        Self::portable(window)
    }

    /// The same answer as [`ByteKinds::of`] from plain integer operations, for CPUs without
    /// SSE2 (public so tests can hold the two to one answer).
    pub fn portable(window: u128) -> Self {
        let space = high_bits(ascii_bytes_in(window, b' ', b' '));
        Self {
            lower: high_bits(ascii_bytes_in(window, b'a', b'z')),
            upper: high_bits(ascii_bytes_in(window, b'A', b'Z')),
            digit: high_bits(ascii_bytes_in(window, b'0', b'9')),
            space,
            whitespace: space | high_bits(ascii_bytes_in(window, b'\t', b'\r')),
            non_ascii: high_bits(window & HIGH_BITS),
        }
    }

    /// The bytes of `window` equal to the ASCII byte `byte`, with SSE2.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn equal(window: u128, byte: u8) -> u32 {
        use std::arch::x86_64::*;
        debug_assert!(byte.is_ascii());
        // SAFETY: SSE2 is part of every x86_64 CPU; the intrinsics read only this vector.
        unsafe {
            let v = _mm_loadu_si128((&window as *const u128).cast());
            _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(byte as i8))) as u32
        }
    }

    /// The bytes of `window` equal to the ASCII byte `byte`.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub fn equal(window: u128, byte: u8) -> u32 {
        Self::portable_equal(window, byte)
    }

    /// The same answer as [`ByteKinds::equal`] from plain integer operations.
    pub fn portable_equal(window: u128, byte: u8) -> u32 {
        high_bits(ascii_bytes_in(window, byte, byte))
    }
}

const HIGH_BITS: u128 = 0x8080_8080_8080_8080_8080_8080_8080_8080;

/// High bit of each byte of `w` set where the byte is ASCII in `lo..=hi`, all other bits
/// clear. Each byte's high bit is set before the subtractions so no byte borrows from its
/// neighbour.
fn ascii_bytes_in(w: u128, lo: u8, hi: u8) -> u128 {
    let splat = |b: u8| b as u128 * (u128::MAX / 255);
    let ascii = !w & HIGH_BITS;
    ((w | HIGH_BITS) - splat(lo)) & !((w | HIGH_BITS) - splat(hi + 1)) & ascii
}

/// The high bit of each byte of `w` (no other bit set) gathered into bit `i` for byte `i`:
/// one multiplication per eight bytes lands each byte's bit in the top byte, without carries.
fn high_bits(w: u128) -> u32 {
    let gather = |x: u64| (x.wrapping_mul(0x0002_0408_1020_4081) >> 56) as u32;
    gather(w as u64) | gather((w >> 64) as u64) << 8
}

/// ASCII as exact dedup compares it: lower case, and every whitespace character a space.
const ASCII_DEDUP: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        table[b] = match b as u8 {
            b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r' => b' ',
            c => c.to_ascii_lowercase(),
        };
        b += 1;
    }
    table
};

/// A score parsed from a judge's output, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedScore {
    /// The score, 1 to 5, when one was found.
    pub score: Option<i64>,
    /// Why there is no score: `no_output`, `no_score`, `not_integer`, `out_of_range`,
    /// `truncated`.
    pub reason: Option<&'static str>,
}

static SCORE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\bscore\**\s*[:=]\s*\**\s*(-?[0-9]+(?:[.,][0-9]+)?)").expect("valid regex")
});

/// Parses `Score: N` from a judge's output. The last `Score:` wins, so reasoning that quotes
/// other numbers first does not count; `finish_reason = length` without a score is `truncated`.
pub fn parse_score(raw: Option<&str>, finish_reason: Option<&str>) -> ParsedScore {
    let none = |reason| ParsedScore {
        score: None,
        reason: Some(reason),
    };
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return none(if finish_reason == Some("length") {
            "truncated"
        } else {
            "no_output"
        });
    };
    let Some(caps) = SCORE.captures_iter(raw).last() else {
        return none(if finish_reason == Some("length") {
            "truncated"
        } else {
            "no_score"
        });
    };
    let number = &caps[1];
    if number.contains(['.', ',']) {
        return none("not_integer");
    }
    match number.parse::<i64>() {
        Ok(n) if (1..=5).contains(&n) => ParsedScore {
            score: Some(n),
            reason: None,
        },
        _ => none("out_of_range"),
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
/// `truncated` (unclosed because generation hit its length limit) or `empty`.
pub fn tag_problem(
    raw: Option<&str>,
    tag: &str,
    finish_reason: Option<&str>,
) -> Option<&'static str> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Some("no_output");
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
    /// Why there is no score (the [`parse_score`] reasons, or `llm_error`).
    pub reason: Option<&'static str>,
    /// Expected score over the digits 1-5 of the first token.
    pub expected: Option<f64>,
    /// Probability the digits 1-5 hold among the first token's alternatives.
    pub mass: Option<f64>,
    /// `logprobs` or `text`: which judgement was used (none after an error).
    pub source: Option<&'static str>,
}

/// Reads a scoring reply: `error` wins, then the logprob expectation, then the text.
pub fn judge(
    text: Option<&str>,
    finish_reason: Option<&str>,
    error: Option<&str>,
    top_logprobs: Option<&str>,
) -> Judgement {
    if error.is_some() {
        return Judgement {
            score: None,
            reason: Some("llm_error"),
            expected: None,
            mass: None,
            source: None,
        };
    }
    let weighed = top_logprobs.and_then(logprob_score);
    if let Some((expected, mass)) = weighed {
        return Judgement {
            score: Some(expected.round() as i64),
            reason: None,
            expected: Some(expected),
            mass: Some(mass),
            source: Some("logprobs"),
        };
    }
    let parsed = parse_score(text, finish_reason);
    Judgement {
        score: parsed.score,
        reason: parsed.reason,
        expected: None,
        mass: None,
        source: Some("text"),
    }
}

/// A good/bad verdict on an instruction (Kun's instruction-only judgement), or why there is
/// none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `good` or `bad`.
    pub verdict: Option<&'static str>,
    /// Why there is no verdict: `no_output`, `no_verdict`, `truncated`, `both`.
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
    let truncated = finish_reason == Some("length");
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return none(if truncated { "truncated" } else { "no_output" });
    };
    if raw.contains("【好】") && raw.contains("【差】") {
        return none("both");
    }
    let Some(caps) = VERDICT.captures_iter(raw).last() else {
        return none(if truncated { "truncated" } else { "no_verdict" });
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
