//! The prepare rules on small hand-made documents.

use backforth::prepare::dedup_key::{dedup_digest, normalize_for_dedup};
use backforth::prepare::segment::{CandidateMode, UnitRules, cut_units, header_problem, segments};

fn segment_rules() -> UnitRules {
    UnitRules {
        mode: CandidateMode::Segments,
        min_chars: 40,
        max_chars: 400,
        repeat_jaccard: 0.7,
    }
}

const PARAGRAPH: &str =
    "Water expands when it freezes, which is why ice floats and why pipes can burst in winter.";

#[test]
fn document_mode_keeps_whole_documents_and_names_drops() {
    let rules = UnitRules {
        mode: CandidateMode::Document,
        min_chars: 10,
        max_chars: 0,
        repeat_jaccard: 0.7,
    };
    let units = cut_units(&format!("Title\n\n{PARAGRAPH}\n"), &rules);
    assert_eq!(units.len(), 1);
    assert_eq!(units[0].drop, None);
    assert_eq!(units[0].text, format!("Title\n\n{PARAGRAPH}"));
    assert_eq!(cut_units("   \n", &rules)[0].drop, Some("empty"));
    assert_eq!(cut_units("tiny", &rules)[0].drop, Some("too_short"));
}

#[test]
fn segments_follow_plain_and_markdown_headers() {
    let doc = format!(
        "Intro line without a header that is long enough to matter here.\n\nFreezing Water\n\n{PARAGRAPH}\n\n# Markdown Title\n\n{PARAGRAPH}\n\n## Sub-section\n\n{PARAGRAPH}\n\n# Next Title\n\n{PARAGRAPH}"
    );
    let segs = segments(&doc);
    let headers: Vec<Option<&str>> = segs.iter().map(|(h, _)| h.as_deref()).collect();
    assert_eq!(
        headers,
        vec![
            None,
            Some("Freezing Water"),
            Some("Markdown Title"),
            Some("Sub-section"),
            Some("Next Title")
        ]
    );
    // A level-1 section holds its level-2 sub-section, as Humpback's segments do.
    assert!(segs[2].1.contains("Sub-section"));
    assert_eq!(segs[4].1, PARAGRAPH);
    // A short line followed by another short line is not a header.
    assert_eq!(segments("Home\nAbout\nContact\n").len(), 1);
}

#[test]
fn segment_drop_reasons() {
    let doc = format!(
        "Preamble that sits before any header and is long enough.\n\nCOOKIE POLICY\n\n{PARAGRAPH}\n\nRelated Posts\n\n{PARAGRAPH}\n\nNote\n\nTiny body text.\n\nGood Header\n\n{PARAGRAPH}"
    );
    let drops: Vec<(Option<String>, Option<&str>)> = cut_units(&doc, &segment_rules())
        .into_iter()
        .map(|u| (u.header, u.drop))
        .collect();
    assert_eq!(
        drops,
        vec![
            (None, Some("empty_header")),
            (Some("COOKIE POLICY".into()), Some("uppercase_header")),
            (Some("Related Posts".into()), Some("navigation_header")),
            (Some("Note".into()), Some("too_short")),
            (Some("Good Header".into()), None),
        ]
    );
    let long = format!(
        "Long Section\n\n{}",
        [PARAGRAPH; 6].join(" ").replace(".", ";")
    );
    let long = long + ".";
    assert_eq!(cut_units(&long, &segment_rules())[0].drop, Some("too_long"));
}

#[test]
fn navigation_words_match_whole_words_only() {
    assert_eq!(header_problem(Some("Forums")), Some("navigation_header"));
    assert_eq!(
        header_problem(Some("Comments (12)")),
        Some("navigation_header")
    );
    assert_eq!(header_problem(Some("Menu")), Some("navigation_header"));
    assert_eq!(header_problem(Some("Menus of medieval feasts")), None);
    assert_eq!(header_problem(Some("How tides work")), None);
    assert_eq!(header_problem(Some("FAQ")), Some("uppercase_header"));
    assert_eq!(header_problem(Some("")), Some("empty_header"));
}

#[test]
fn repeated_sentences_are_caught_and_distinct_ones_are_not() {
    let spam = "Repeated Deals\n\nBuy cheap watches online today with free shipping. We sell many things. Buy cheap watches online today with free shipping and returns.";
    assert_eq!(
        cut_units(spam, &segment_rules())[0].drop,
        Some("repeated_sentences")
    );
    let fine = format!(
        "Freezing Water\n\n{PARAGRAPH} Salt lowers the freezing point of water, so roads are salted in winter."
    );
    assert_eq!(cut_units(&fine, &segment_rules())[0].drop, None);
}

#[test]
fn dedup_normalisation_ignores_case_and_whitespace() {
    assert_eq!(
        normalize_for_dedup("How  Tides\n\nWork "),
        normalize_for_dedup("how tides work")
    );
    assert_ne!(
        normalize_for_dedup("how tides work"),
        normalize_for_dedup("how tide works")
    );
}

#[test]
fn dedup_digest_hashes_the_normalised_text() {
    use sha2::{Digest, Sha256};
    let mut rng = crate::support::rng::Rng(11);
    let mut texts = vec![
        String::new(),
        " \t\x0b\x0c\r\n".to_string(),
        "x".repeat(20_000),
    ];
    // Long texts cross the digest's internal buffer with whitespace at its edge.
    for edge in [8190, 8191, 8192] {
        texts.push(format!("{}  {}", "a".repeat(edge), "B".repeat(9000)));
        texts.push(format!("{} ", "a".repeat(edge)));
        texts.push(format!(" \n{}\t", "a".repeat(edge)));
    }
    texts.extend((0..2_000).map(|_| fuzzed(&mut rng, 60)));
    // Long enough for whole windows of ASCII between the other characters.
    texts.extend((0..400).map(|_| fuzzed(&mut rng, 600)));
    for text in &texts {
        let expected = Sha256::digest(normalize_for_dedup(text).as_bytes());
        assert_eq!(dedup_digest(text), expected[..16], "{text:?}");
    }
    assert_eq!(
        dedup_digest("How  Tides\n\nWork "),
        dedup_digest("how tides work")
    );
}

#[test]
fn byte_kinds_of_a_window_match_byte_by_byte_tests() {
    use backforth::prepare::bytes::ByteKinds;
    let mut rng = crate::support::rng::Rng(5);
    // Each byte from a draw weighted to the class edges ('@', '[', '`', '{', tab to CR, space,
    // 0x7F, 0x80, 0xFF), then anything.
    let edges = b"@AZ[`az{/09:#.\x08\t\n\x0b\x0c\r\x0e \x1f!\x7f\x80\xc3\xff";
    for _ in 0..100_000 {
        let bytes: [u8; 16] = std::array::from_fn(|_| match rng.below(3) {
            0 => edges[rng.below(edges.len() as u64) as usize],
            _ => rng.below(256) as u8,
        });
        let mask = |test: &dyn Fn(u8) -> bool| {
            (0..16).fold(0u32, |m, i| m | u32::from(test(bytes[i])) << i)
        };
        let expected = ByteKinds {
            lower: mask(&|b| b.is_ascii_lowercase()),
            upper: mask(&|b| b.is_ascii_uppercase()),
            digit: mask(&|b| b.is_ascii_digit()),
            space: mask(&|b| b == b' '),
            whitespace: mask(&|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')),
            non_ascii: mask(&|b| b >= 0x80),
        };
        let window = u128::from_le_bytes(bytes);
        assert_eq!(ByteKinds::of(window), expected, "{bytes:?}");
        assert_eq!(ByteKinds::portable(window), expected, "{bytes:?}");
        for byte in [b'#', b'.', b'\'', b' '] {
            let equal = mask(&|b| b == byte);
            assert_eq!(ByteKinds::equal(window, byte), equal, "{bytes:?}");
            assert_eq!(ByteKinds::portable_equal(window, byte), equal, "{bytes:?}");
        }
    }
}

#[test]
fn built_in_encodings_count_as_tiktoken_does() {
    use backforth::prepare::tokens::TokenCounter;
    let here = std::path::Path::new(".");
    let cl100k = TokenCounter::load("cl100k_base", here).unwrap();
    let o200k = TokenCounter::load("o200k_base", here).unwrap();
    // Counts published for tiktoken's cl100k_base and o200k_base.
    assert_eq!(cl100k.count("Hello, world!"), 4);
    assert_eq!(cl100k.count("tiktoken is great!"), 6);
    assert_eq!(o200k.count("Hello, world!"), 4);
    assert_eq!(cl100k.count(""), 0);
    // Long runs of spaces and non-Latin scripts go through the same pre-tokenizer rules.
    assert_eq!(cl100k.count("a          b"), 3);
    assert!(cl100k.count("東京は日本の首都です。") > 5);
    // A second count of the same text is served by the piece cache and agrees.
    let prose = "The kettle boils water quickly. Pour it over the tea leaves and wait.";
    assert_eq!(cl100k.count(prose), 15);
    assert_eq!(cl100k.count(prose), 15);
}

/// Fragments that exercise every branch of the pre-tokenizer patterns: contractions in both
/// cases, letter case changes, digit runs, punctuation before newlines and `/`, each kind of
/// ASCII whitespace, and non-ASCII characters whose Unicode class decides the piece (a
/// folding `ſ` and Kelvin sign, no-break and line separators, NEL, a title-case and a
/// modifier letter, a combining mark, non-Latin digits and letters, an emoji).
const FRAGMENTS: &[&str] = &[
    "a",
    "b",
    "Z",
    "Q",
    "s",
    "S",
    "t",
    "re",
    "RE",
    "ve",
    "m",
    "ll",
    "LL",
    "d",
    "D",
    "word",
    "Word",
    "WORD",
    "camelCase",
    "internationalisation",
    "Unbelievably",
    "'",
    "''",
    "0",
    "12",
    "3456",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\x0b",
    "\x0c",
    ".",
    ",",
    "/",
    "//",
    "_",
    "-",
    "!?",
    "(",
    ")",
    "\"",
    "\0",
    "\x7f",
    "é",
    "ſ",
    "\u{212a}",
    "\u{a0}",
    "\u{2028}",
    "\u{85}",
    "—",
    "中文",
    "١٢٣",
    "Ⅻ",
    "ǅ",
    "ʰ",
    "\u{301}",
    "🙂",
    "ß",
    "İ",
    "’",
];

/// Up to `max - 1` random fragments joined.
fn fuzzed(rng: &mut crate::support::rng::Rng, max: u64) -> String {
    let n = rng.below(max);
    (0..n)
        .map(|_| FRAGMENTS[rng.below(FRAGMENTS.len() as u64) as usize])
        .collect()
}

#[test]
fn hand_scanned_pieces_are_the_regex_pieces() {
    use crate::support::rng::Rng;
    use backforth::prepare::tokens::{Pattern, pieces};
    let mut texts: Vec<String> = Vec::new();
    for file in ["examples/data/sample-0001.jsonl"] {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            let doc: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(doc["text"].as_str().unwrap().to_string());
        }
    }
    let mut rng = Rng(42);
    texts.extend((0..20_000).map(|_| fuzzed(&mut rng, 24)));
    for (pattern, bpe) in [
        (Pattern::Cl100k, bpe_openai::cl100k_base()),
        (Pattern::O200k, bpe_openai::o200k_base()),
    ] {
        for text in &texts {
            let ours: Vec<&str> = pieces(pattern, text).collect();
            let regex: Vec<&str> = bpe.split(text).collect();
            assert_eq!(ours, regex, "{pattern:?} on {text:?}");
        }
    }
}

#[test]
fn cached_counts_equal_the_encodings_own() {
    use backforth::prepare::tokens::TokenCounter;
    let here = std::path::Path::new(".");
    let mut rng = crate::support::rng::Rng(7);
    for (name, bpe) in [
        ("cl100k_base", bpe_openai::cl100k_base()),
        ("o200k_base", bpe_openai::o200k_base()),
    ] {
        let counter = TokenCounter::load(name, here).unwrap();
        // Twice over, so the second round is answered from the piece cache.
        for round in 0..2 {
            let mut draw = crate::support::rng::Rng(rng.0 ^ round);
            for _ in 0..3_000 {
                let text = fuzzed(&mut draw, 40);
                assert_eq!(counter.count(&text), bpe.count(&text), "{name} on {text:?}");
            }
        }
        rng.next();
    }
}
