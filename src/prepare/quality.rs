//! Quality rules applied to candidates before any LLM sees them, each optional and each
//! counted under its own drop reason: language, minimum words, symbol and non-alphabetic word
//! ratios, lines ending in punctuation, repeated lines and paragraphs; and boilerplate lines
//! (cookie notices, navigation menus, footers), stripped or only counted.
//!
//! Thresholds follow the usual web-text heuristics (Gopher's and C4's) but none is on unless
//! the job asks, so the paper pipelines stay as published.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::prepare::bytes::ByteKinds;

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

/// Page furniture, one alternative per kind; `^` and `$` are a line's ends.
const BOILERPLATE_PATTERN: &str = r"
    \b(we|this\ (web)?site)\ uses?\ cookies\b | \baccept\ (all\ )?cookies\b | \bcookie\ (policy|settings|preferences)\b
    | \ball\ rights\ reserved\b | ^\s*(copyright|©|\(c\))\s | \bprivacy\ policy\b.*\bterms\b | \bterms\ of\ (use|service)\b.*\bprivacy\b
    | ^\s*skip\ to\ (main\ )?content\s*$ | ^\s*(share\ (this|on)|follow\ us\ on)\b | \bsubscribe\ to\ our\ newsletter\b
    | ^\s*(sign\ in|log\ in|register)\s*(\||/|$) | ^\s*(home|about(\ us)?|contact(\ us)?|blog|shop|faq)\s*(\||»|›|/|·)\s*\S
";

/// The pattern compiled with `flags`. Word boundaries are ASCII ones: a Unicode `\b` sends any
/// text with a non-ASCII character (a `©`, a curly quote) to the regex crate's slowest engine,
/// which took a third of a prepare run's time.
fn boilerplate_regex(flags: &str) -> Regex {
    let pattern = BOILERPLATE_PATTERN.replace(r"\b", r"(?-u:\b)");
    Regex::new(&format!("(?{flags}){pattern}")).expect("valid regex")
}

static BOILERPLATE_LINE: LazyLock<Regex> = LazyLock::new(|| boilerplate_regex("ix"));

/// The same pattern over a whole document, `^`/`$` at every line: whatever a line matches,
/// the document matches too, so one scan clears the documents without boilerplate (most).
static BOILERPLATE_ANYWHERE: LazyLock<Regex> = LazyLock::new(|| boilerplate_regex("imx"));

/// Whether a line is page furniture: a cookie notice, a copyright or legal footer, a
/// share/follow/subscribe prompt, or a navigation menu (`Home | About | Contact`).
pub fn is_boilerplate(line: &str) -> bool {
    BOILERPLATE_LINE.is_match(line)
}

/// The document without its boilerplate lines (when `strip`) and how many there were; the
/// document itself, not a copy, when nothing is removed.
pub fn clean_document(text: &str, strip: bool) -> (Cow<'_, str>, usize) {
    if !BOILERPLATE_ANYWHERE.is_match(text) {
        return (Cow::Borrowed(text), 0);
    }
    if !strip {
        return (
            Cow::Borrowed(text),
            text.lines().filter(|l| is_boilerplate(l)).count(),
        );
    }
    let mut count = 0;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let boilerplate = is_boilerplate(l);
            count += usize::from(boilerplate);
            !boilerplate
        })
        .collect();
    match count {
        0 => (Cow::Borrowed(text), 0),
        _ => (Cow::Owned(kept.join("\n")), count),
    }
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
    iso3_any_case(code).to_ascii_lowercase()
}

/// [`iso3`] without lower-casing, so without a copy: the per-document language checks compare
/// it ignoring case.
fn iso3_any_case(code: &str) -> &str {
    let base = code.trim().split(['-', '_']).next().unwrap_or_default();
    ISO_639_1
        .iter()
        .find(|(two, _)| two.eq_ignore_ascii_case(base))
        .map_or(base, |(_, three)| three)
}

/// Detections less sure than this are not used: whatlang's own "reliable" mark (0.9) leaves
/// most paragraph-long English texts unjudged, 0.5 still keeps short mixed texts out.
const DETECTION_CONFIDENCE: f64 = 0.5;

/// Bytes of a document the detector reads: whatlang counts every trigram it is given, on top
/// of a fixed cost per document, and a page's first two kilobytes of prose (boilerplate is
/// stripped before) name its language as surely as the whole page.
pub const DETECTED_PREFIX_BYTES: usize = 2048;

/// The language of a document: `lang`/`language` in its JSON metadata, else detected from its
/// first [`DETECTED_PREFIX_BYTES`] when the detector is sure (short or mixed texts are not
/// judged: `None`).
pub fn language(text: &str, metadata: Option<&str>) -> Option<String> {
    metadata_language(metadata).or_else(|| detected_language(text))
}

/// The language a document's JSON metadata states (`lang`, `language`), as ISO 639-3.
fn metadata_language(metadata: Option<&str>) -> Option<String> {
    /// Only the two keys are read; the rest of the metadata (URLs, line ids) is skipped
    /// without building a tree.
    #[derive(Deserialize)]
    struct Keys {
        lang: Option<serde_json::Value>,
        language: Option<serde_json::Value>,
    }
    let keys = serde_json::from_str::<Keys>(metadata?).ok()?;
    [keys.lang, keys.language]
        .into_iter()
        .find_map(|v| v.as_ref().and_then(|v| v.as_str()).map(iso3))
}

/// The language whatlang finds in the text's first [`DETECTED_PREFIX_BYTES`], when it is sure.
fn detected_language(text: &str) -> Option<String> {
    whatlang::detect(prefix(text, DETECTED_PREFIX_BYTES))
        .filter(|info| info.confidence() >= DETECTION_CONFIDENCE)
        .map(|info| info.lang().code().to_string())
}

/// Function words only one language spells so, by which a job keeping that language keeps a
/// text without asking whatlang (which scores some 40 trigram profiles per document, however
/// short; a list costs one pass over the bytes). Only keeping: a page with whole
/// paragraphs in a language is enough of it for a job that keeps it, but whatlang may rightly
/// name the page's other language, which another job must still see.
pub struct FunctionWords {
    /// ISO 639-3 code of the language.
    pub language: &'static str,
    /// The words, lowercase ASCII; they match in any letter case.
    pub words: &'static [&'static str],
    /// Share of a text's words they must make up.
    pub share: f64,
    table: PackedWords<512>,
}

/// Texts with fewer words are left to whatlang: in a few dozen words of another language, a
/// name or a title ("The Beatles") can make up a tenth.
pub const FUNCTION_WORDS_MIN_WORDS: usize = 40;

/// English: not `a`, `in`, `is`, `of`, `to`, `on`, `was`, `will`, `for`, `my`, `we`, `her`,
/// `have`, `also`, `are`, which German, Dutch, the Scandinavian, Romance or West Slavic
/// languages spell too, so prose in those languages scores near 0% (the fixtures under
/// `tests/fixtures/languages/` hold each list to that).
pub static ENGLISH: FunctionWords = FunctionWords::new(
    "eng",
    &[
        "the", "and", "that", "with", "this", "which", "from", "they", "their", "them", "been",
        "would", "there", "were", "what", "when", "your", "you", "it", "its", "not", "but", "has",
        "had", "can", "about", "into", "our", "these", "those", "who", "she", "his", "him",
        "should", "could", "than", "then", "such", "other", "some", "only", "because", "after",
        "how", "where", "why", "does", "did", "being", "very", "any", "each", "many", "much",
    ],
    0.10,
);

/// German: not `der`, `die`, `das`, `den`, `in`, `zu`, `von`, `mit`, `ein`, `es`, `hier`, which
/// Dutch, Danish, Swedish, Portuguese or English spell too.
pub static GERMAN: FunctionWords = FunctionWords::new(
    "deu",
    &[
        "und", "nicht", "sich", "auch", "ist", "wird", "werden", "wurde", "sind", "oder", "durch",
        "dass", "nach", "bei", "eine", "einen", "einem", "einer", "noch", "mehr", "zum", "zur",
        "vom", "diese", "dieser", "dieses", "haben", "aber", "kann", "nur", "schon", "sehr",
        "wieder",
    ],
    0.08,
);

/// French: not `le`, `la`, `les`, `des`, `du`, `de`, `et`, `en`, `que`, `qui`, `il`, `pas`,
/// `par`, `sur`, `mais`, `plus`, `entre`, `sera`, `pendant`, which Catalan, Spanish, Italian,
/// Portuguese, German or English spell too, nor words with accents (the table holds ASCII):
/// `etre` is the unaccented spelling.
pub static FRENCH: FunctionWords = FunctionWords::new(
    "fra",
    &[
        "est", "une", "pour", "dans", "avec", "sont", "cette", "ces", "aux", "leur", "leurs",
        "nous", "vous", "ils", "elles", "aussi", "ainsi", "donc", "alors", "sans", "sous",
        "chaque", "lorsque", "avoir", "ont", "dont", "autre", "autres", "fait", "peut", "tout",
        "toutes", "tous", "comme", "selon", "depuis", "notre", "votre", "ceux", "celui", "celle",
        "quand", "toujours", "fois", "deux", "trois", "peuvent", "doit", "faire", "moins", "cela",
        "ici", "sinon", "afin", "etre",
    ],
    0.08,
);

/// The languages a job can keep without whatlang.
pub static PLAIN_LANGUAGES: [&FunctionWords; 3] = [&ENGLISH, &GERMAN, &FRENCH];

impl FunctionWords {
    const fn new(language: &'static str, words: &'static [&'static str], share: f64) -> Self {
        Self {
            language,
            words,
            share,
            table: PackedWords::of(words),
        }
    }

    /// Whether at least [`FunctionWords::share`] of `text`'s words (of at least
    /// [`FUNCTION_WORDS_MIN_WORDS`]) are these.
    pub fn plainly(&self, text: &str) -> bool {
        let (words, found) = self.count(text);
        words >= FUNCTION_WORDS_MIN_WORDS && found as f64 >= self.share * words as f64
    }

    /// `text`'s words (runs of ASCII letters, digits and multi-byte characters, so "für" is
    /// one word) and how many of them are these: word bytes found sixteen at a time, then each
    /// word looked up without a branch on what it is (a byte loop, then a loop over each word,
    /// cost three times as much: both mispredicted at nearly every word).
    pub fn count(&self, text: &str) -> (usize, usize) {
        let bytes = text.as_bytes();
        let word_bits = word_bits(bytes);
        let (mut words, mut found) = (0, 0);
        let mut before = 0; // whether the byte before this block is a word byte
        for (block, &bits) in word_bits.iter().enumerate() {
            let after = word_bits.get(block + 1).copied().unwrap_or(0);
            let mut starts = bits & !(bits << 1 | before);
            before = bits >> 63;
            words += starts.count_ones() as usize;
            while starts != 0 {
                let start = starts.trailing_zeros();
                starts &= starts - 1;
                // The word's bits from its start on, the next block's after this one's.
                let ahead = ((u128::from(after) << 64 | u128::from(bits)) >> start) as u64;
                let len = (!ahead).trailing_zeros();
                let at = block * 64 + start as usize;
                let word = packed_lowercase(bytes, at, len);
                found += usize::from(word != 0 && self.table.slot(word) == word);
            }
        }
        (words, found)
    }
}

/// One bit per byte of `bytes` (bit `i % 64` of block `i / 64`), set for word bytes: ASCII
/// letters and digits, and bytes of multi-byte characters.
fn word_bits(bytes: &[u8]) -> Vec<u64> {
    let mut bits = vec![0u64; bytes.len().div_ceil(64)];
    let mut windows = bytes.chunks_exact(16);
    for (i, window) in windows.by_ref().enumerate() {
        let kinds = ByteKinds::of(u128::from_le_bytes(window.try_into().expect("16 bytes")));
        let word = kinds.lower | kinds.upper | kinds.digit | kinds.non_ascii;
        bits[i / 4] |= u64::from(word) << (16 * (i % 4));
    }
    let done = bytes.len() - windows.remainder().len();
    for (i, &b) in windows.remainder().iter().enumerate() {
        let at = done + i;
        bits[at / 64] |= u64::from(b.is_ascii_alphanumeric() || !b.is_ascii()) << (at % 64);
    }
    bits
}

/// The `len` bytes at `at`, lowercased (OR 0x20 lowercases ASCII letters and keeps digits; a
/// multi-byte character stays non-ASCII, so matches no listed word) and packed first byte
/// lowest; 0 for words longer than a `u64` holds.
fn packed_lowercase(bytes: &[u8], at: usize, len: u32) -> u64 {
    const LONGEST: u32 = 8;
    let word = match bytes.get(at..at + 8) {
        Some(eight) => u64::from_le_bytes(eight.try_into().expect("8 bytes")),
        None => bytes[at..]
            .iter()
            .rev()
            .fold(0, |word, &b| word << 8 | u64::from(b)),
    };
    let keep =
        (u64::MAX >> (64 - 8 * len.clamp(1, LONGEST))) & u64::from(len <= LONGEST).wrapping_neg();
    (word | 0x2020_2020_2020_2020) & keep
}

/// A set of words of at most eight bytes, each packed into a `u64` (first byte lowest), found
/// in one probe: the hash's multiplier is searched at compile time until no two words share a
/// slot.
struct PackedWords<const SLOTS: usize> {
    slots: [u64; SLOTS],
    multiplier: u64,
}

impl<const SLOTS: usize> PackedWords<SLOTS> {
    const fn of(words: &[&str]) -> Self {
        assert!(SLOTS.is_power_of_two() && words.len() * 8 <= SLOTS);
        let mut multiplier = 0x9e37_79b9_7f4a_7c15u64;
        loop {
            if let Some(slots) = Self::place(words, multiplier) {
                return Self { slots, multiplier };
            }
            multiplier = multiplier.wrapping_add(0x2545_f491_4f6c_dd1e);
        }
    }

    /// The words in their slots, or `None` when two of them share one.
    const fn place(words: &[&str], multiplier: u64) -> Option<[u64; SLOTS]> {
        let mut slots = [0u64; SLOTS];
        let mut w = 0;
        while w < words.len() {
            let word = words[w].as_bytes();
            assert!(!word.is_empty() && word.len() <= 8);
            let mut packed = 0u64;
            let mut i = 0;
            while i < word.len() {
                packed |= (word[i] as u64) << (8 * i);
                i += 1;
            }
            let slot = Self::index(packed, multiplier);
            if slots[slot] != 0 {
                return None;
            }
            slots[slot] = packed;
            w += 1;
        }
        Some(slots)
    }

    const fn index(packed: u64, multiplier: u64) -> usize {
        (packed.wrapping_mul(multiplier) >> (64 - SLOTS.trailing_zeros())) as usize
    }

    /// What the slot of `packed` holds: `packed` itself when it is one of the words.
    fn slot(&self, packed: u64) -> u64 {
        self.slots[Self::index(packed, self.multiplier)]
    }
}

/// At most `bytes` of `text`, ending at a character boundary.
fn prefix(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let mut end = bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Counts over a text's whitespace-separated words, taken in one pass without a list of them.
#[derive(Debug, Default, PartialEq)]
pub struct WordStats {
    /// Whitespace-separated words.
    pub words: usize,
    /// Words without a letter.
    pub without_letter: usize,
    /// `#` signs, `...` (each three dots of a run) and `…`.
    pub symbols: usize,
}

/// What [`WordStats`] needs to know of an ASCII byte, one bit each.
const SPACE: u8 = 1;
const LETTER: u8 = 2;
const HASH: u8 = 4;
const DOT: u8 = 8;
const NON_ASCII: u8 = 16;

/// The classes of every byte: `char::is_whitespace` and `is_alphabetic` restricted to ASCII,
/// and the bytes that need a look beyond themselves (dots come in runs, other bytes start
/// multi-byte characters).
static CLASS: [u8; 256] = {
    let mut class = [0; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        class[b] = if !byte.is_ascii() {
            NON_ASCII
        } else if matches!(byte, b' ' | b'\t'..=b'\r') {
            SPACE
        } else if byte.is_ascii_alphabetic() {
            LETTER
        } else if byte == b'#' {
            HASH
        } else if byte == b'.' {
            DOT
        } else {
            0
        };
        b += 1;
    }
    class
};

impl WordStats {
    /// The counts of `text`: sixteen bytes at a time where they hold no run of dots and no
    /// non-ASCII byte (most of prose), byte by byte around those.
    pub fn of(text: &str) -> Self {
        let bytes = text.as_bytes();
        let mut scan = WordScan::default();
        let mut i = 0;
        while i < bytes.len() {
            let Some(window) = bytes.get(i..i + 16) else {
                i = scan.step(text, i);
                continue;
            };
            let window = u128::from_le_bytes(window.try_into().expect("16 bytes"));
            let kinds = ByteKinds::of(window);
            // A lone dot counts for nothing; a run of them (which may go on past the
            // window's last byte) is counted byte by byte.
            let dots = ByteKinds::equal(window, b'.');
            let special = kinds.non_ascii | (dots & (dots >> 1)) | (dots & 0x8000);
            if special == 0 {
                scan.window(&kinds, ByteKinds::equal(window, b'#'));
                i += 16;
            } else {
                // Byte by byte past the first run of dots or multi-byte character.
                let past = i + special.trailing_zeros() as usize;
                while i <= past {
                    i = scan.step(text, i);
                }
            }
        }
        scan.finish()
    }
}

/// [`WordStats`] being counted, and whether the last byte seen was inside a word (and had a
/// letter by then).
#[derive(Default)]
struct WordScan {
    stats: WordStats,
    in_word: bool,
    has_letter: bool,
}

impl WordScan {
    /// Counts the byte, dot run or character at `text[i..]`; returns where the next starts.
    fn step(&mut self, text: &str, mut i: usize) -> usize {
        let bytes = text.as_bytes();
        let class = CLASS[bytes[i] as usize];
        let (space, letter) = if class & (SPACE | DOT | NON_ASCII) == 0 {
            i += 1;
            self.stats.symbols += usize::from(class == HASH);
            (false, class == LETTER)
        } else if class == SPACE {
            i += 1;
            (true, false)
        } else if class == DOT {
            let run = bytes[i..].iter().take_while(|&&b| b == b'.').count();
            i += run;
            self.stats.symbols += run / 3;
            (false, false)
        } else {
            let c = text[i..].chars().next().expect("a char boundary");
            i += c.len_utf8();
            self.stats.symbols += usize::from(c == '…');
            (c.is_whitespace(), c.is_alphabetic())
        };
        if space {
            self.stats.without_letter += usize::from(self.in_word && !self.has_letter);
            self.in_word = false;
        } else {
            if !self.in_word {
                self.stats.words += 1;
                self.has_letter = false;
            }
            self.in_word = true;
            self.has_letter |= letter;
        }
        i
    }

    /// Counts sixteen ASCII bytes without a run of dots, of the given kinds and `#` positions
    /// (bit `i` for byte `i`).
    fn window(&mut self, kinds: &ByteKinds, hashes: u32) {
        const ALL: u32 = 0xFFFF;
        let word = !kinds.whitespace & ALL;
        if self.in_word && word & 1 == 0 {
            // The word running into this window ended with the last one.
            self.stats.without_letter += usize::from(!self.has_letter);
            self.in_word = false;
        }
        let starts = word & !((word << 1) | u32::from(self.in_word));
        self.stats.words += starts.count_ones() as usize;
        self.stats.symbols += hashes.count_ones() as usize;
        // Letters spread forward through their word, doubling the reach each step: bit `i`
        // of `reach_k` is set when bytes `i - k ..= i` are all in one word.
        let mut lettered = (kinds.lower | kinds.upper) | u32::from(self.in_word && self.has_letter);
        let reach_1 = word & (word << 1);
        let reach_2 = reach_1 & (reach_1 << 1);
        let reach_4 = reach_2 & (reach_2 << 2);
        let reach_8 = reach_4 & (reach_4 << 4);
        lettered |= (lettered << 1) & reach_1;
        lettered |= (lettered << 2) & reach_2;
        lettered |= (lettered << 4) & reach_4;
        lettered |= (lettered << 8) & reach_8;
        // Words ending inside the window; one reaching its last byte may go on.
        let ends = word & !(word >> 1) & (ALL >> 1);
        self.stats.without_letter += (ends & !lettered).count_ones() as usize;
        self.in_word = word >> 15 != 0;
        self.has_letter = lettered >> 15 != 0;
    }

    fn finish(mut self) -> WordStats {
        self.stats.without_letter += usize::from(self.in_word && !self.has_letter);
        self.stats
    }
}

/// The share of non-empty trimmed `items` that repeat an earlier one.
fn repeated_share<'a>(items: impl Iterator<Item = &'a str>) -> f64 {
    // Sized for a page's usual lines at once: growing the table cost as much as filling it.
    let mut seen = rustc_hash::FxHashSet::with_capacity_and_hasher(64, rustc_hash::FxBuildHasher);
    let (mut total, mut repeated) = (0, 0);
    for item in items.map(str::trim).filter(|i| !i.is_empty()) {
        total += 1;
        repeated += usize::from(!seen.insert(item));
    }
    share(repeated, total)
}

/// The text cut at blank-line separators (`\n\n`), as `str::split("\n\n")` cuts it.
pub fn paragraphs(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match memchr::memmem::find(current.as_bytes(), b"\n\n") {
            Some(at) => {
                rest = Some(&current[at + 2..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// The share of non-empty trimmed lines that end in sentence punctuation or a closing quote.
fn punctuated_share(text: &str) -> f64 {
    let (mut lines, mut ended) = (0, 0);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        lines += 1;
        ended += usize::from(line.ends_with(['.', '!', '?', '"', '\'', '”', '’']));
    }
    share(ended, lines)
}

impl QualityRules {
    /// The first rule `text` fails, as its drop reason; `metadata` is the document's JSON
    /// metadata (for its language). A language the metadata states is checked first; a
    /// detected one last, so a document failing another rule too is counted under that rule.
    pub fn problem(&self, text: &str, metadata: Option<&str>) -> Option<&'static str> {
        let Some(wanted) = &self.languages else {
            return self.text_problem(text);
        };
        let wrong = |lang: &str| {
            !wanted
                .iter()
                .any(|w| iso3_any_case(w).eq_ignore_ascii_case(lang))
        };
        match metadata_language(metadata) {
            Some(stated) if wrong(&stated) => Some("wrong_language"),
            Some(_) => self.text_problem(text),
            // The detector costs more than every other rule together: it runs last, on what
            // they kept, and not at all on text plainly in a language the job keeps.
            None => self.text_problem(text).or_else(|| {
                let prefix = prefix(text, DETECTED_PREFIX_BYTES);
                if PLAIN_LANGUAGES
                    .iter()
                    .any(|l| !wrong(l.language) && l.plainly(prefix))
                {
                    return None;
                }
                detected_language(text)
                    .is_some_and(|lang| wrong(&lang))
                    .then_some("wrong_language")
            }),
        }
    }

    /// The first rule other than the language that `text` fails.
    fn text_problem(&self, text: &str) -> Option<&'static str> {
        // Most jobs set no word rule: no need to scan every candidate's words.
        if self.min_words.is_some()
            || self.max_symbol_ratio.is_some()
            || self.max_non_alpha_words.is_some()
        {
            let words = WordStats::of(text);
            if self.min_words.is_some_and(|min| words.words < min) {
                return Some("too_few_words");
            }
            if self
                .max_symbol_ratio
                .is_some_and(|max| share(words.symbols, words.words) > max)
            {
                return Some("symbols");
            }
            if self
                .max_non_alpha_words
                .is_some_and(|max| share(words.without_letter, words.words) > max)
            {
                return Some("non_alpha_words");
            }
        }
        if self
            .min_punctuated_lines
            .is_some_and(|min| punctuated_share(text) < min)
        {
            return Some("few_punctuated_lines");
        }
        if self
            .max_repeated_lines
            .is_some_and(|max| repeated_share(text.lines()) > max)
        {
            return Some("repeated_lines");
        }
        if self
            .max_repeated_paragraphs
            .is_some_and(|max| repeated_share(paragraphs(text)) > max)
        {
            return Some("repeated_paragraphs");
        }
        None
    }
}
