//! The quality rules of prepare, one hand-made document per rule, and in a run: each rule's
//! drops counted under its own reason.

use backforth::prepare::quality::{
    DETECTED_PREFIX_BYTES, ENGLISH, FRENCH, GERMAN, PLAIN_LANGUAGES, QualityRules, WordStats,
    clean_document, is_boilerplate, language, paragraphs,
};

use crate::support::util::{backforth_ok, marker};

const GOOD: &str = "The kettle boils water quickly.\nPour it over the tea leaves and wait three minutes.\nThen remove the leaves, add milk if you like, and enjoy the cup.";

#[test]
fn each_rule_drops_its_document_and_keeps_a_good_one() {
    let cases: Vec<(QualityRules, &str, Option<&str>, &str)> = vec![
        (
            (QualityRules {
                languages: Some(vec!["en".into()]),
                ..Default::default()
            }),
            "Der Wasserkocher bringt das Wasser schnell zum Kochen. Gießen Sie es über die Teeblätter und warten Sie drei Minuten.",
            None,
            "wrong_language",
        ),
        (
            (QualityRules {
                languages: Some(vec!["en".into()]),
                ..Default::default()
            }),
            GOOD,
            Some(r#"{"lang": "fr"}"#),
            "wrong_language",
        ),
        (
            (QualityRules {
                min_words: Some(20),
                ..Default::default()
            }),
            "Tea is nice, and cheap.",
            None,
            "too_few_words",
        ),
        (
            (QualityRules {
                max_symbol_ratio: Some(0.1),
                ..Default::default()
            }),
            "#tea #kettle #morning great cup... more soon... #blessed",
            None,
            "symbols",
        ),
        (
            (QualityRules {
                max_non_alpha_words: Some(0.2),
                ..Default::default()
            }),
            "Prices 12.50 14.00 9.99 | 3 x 4 = 12 -- 2024 100% tea",
            None,
            "non_alpha_words",
        ),
        (
            (QualityRules {
                min_punctuated_lines: Some(0.5),
                ..Default::default()
            }),
            "Home\nProducts\nKettles\nTea\nThe kettle boils water quickly.",
            None,
            "few_punctuated_lines",
        ),
        (
            (QualityRules {
                max_repeated_lines: Some(0.3),
                ..Default::default()
            }),
            "Buy now.\nBuy now.\nBuy now.\nThe kettle boils water quickly.",
            None,
            "repeated_lines",
        ),
        (
            (QualityRules {
                max_repeated_paragraphs: Some(0.3),
                ..Default::default()
            }),
            "Tea is good.\nReally.\n\nTea is good.\nReally.\n\nTea is good.\nReally.\n\nThe end.",
            None,
            "repeated_paragraphs",
        ),
    ];
    for (rules, text, metadata, reason) in cases {
        assert_eq!(rules.problem(text, metadata), Some(reason), "{text}");
        assert_eq!(
            rules.problem(GOOD, Some(r#"{"lang": "en"}"#)),
            None,
            "{reason} keeps a good text"
        );
    }
    // No rule set: nothing is dropped.
    assert_eq!(QualityRules::default().problem("# ... 1 2 3", None), None);
    // A stated language is checked before the other rules, a detected one after them (the
    // detector is the costliest rule).
    let strict = QualityRules {
        languages: Some(vec!["en".into()]),
        min_words: Some(30),
        ..Default::default()
    };
    let short_german = "Der Wasserkocher bringt das Wasser schnell zum Kochen. Gießen Sie es über die Teeblätter und warten Sie drei Minuten.";
    assert_eq!(strict.problem(short_german, None), Some("too_few_words"));
    assert_eq!(
        strict.problem(short_german, Some(r#"{"lang": "de"}"#)),
        Some("wrong_language")
    );
    // Metadata wins over detection; without it the detector decides.
    assert_eq!(
        language(GOOD, Some(r#"{"language": "en-US"}"#)).as_deref(),
        Some("eng")
    );
    assert_eq!(language(GOOD, None).as_deref(), Some("eng"));
    // Only the first DETECTED_PREFIX_BYTES are read, cut at a character boundary wherever
    // the limit falls inside an umlaut.
    let german = "Über die Brücke fährt täglich ein Zug, und die Fähre läuft stündlich. ";
    let english = "The harbour master keeps a log of every ship that comes and goes. ";
    let mut inside_a_character = 0;
    for pad in 0..german.len() {
        let mut text = " ".repeat(pad);
        while text.len() < DETECTED_PREFIX_BYTES {
            text.push_str(german);
        }
        inside_a_character += usize::from(!text.is_char_boundary(DETECTED_PREFIX_BYTES));
        text.push_str(&english.repeat(200));
        assert_eq!(language(&text, None).as_deref(), Some("deu"), "pad {pad}");
    }
    assert!(inside_a_character > 0);
}

/// Paragraphs written for the tests (`tests/fixtures/languages/`), each with the ISO 639-3
/// code of the language its file name starts with.
fn language_fixtures() -> Vec<(String, &'static str, String)> {
    let codes = [
        ("ca", "cat"),
        ("da", "dan"),
        ("de", "deu"),
        ("en", "eng"),
        ("es", "spa"),
        ("fr", "fra"),
        ("it", "ita"),
        ("nl", "nld"),
        ("pl", "pol"),
        ("pt", "por"),
        ("ro", "ron"),
        ("sv", "swe"),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/languages");
    let mut fixtures: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "txt"))
        .map(|path| {
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let code = codes
                .iter()
                .find(|(two, _)| name.starts_with(two))
                .unwrap()
                .1;
            (name, code, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    fixtures.sort();
    fixtures
}

#[test]
fn a_job_keeps_text_plainly_in_its_language_without_the_detector() {
    let fixtures = language_fixtures();
    assert_eq!(fixtures.len(), 18);
    let keeping = |language: &str| QualityRules {
        languages: Some(vec![language.into()]),
        ..Default::default()
    };
    let (english_job, german_job, french_job) = (keeping("en"), keeping("de"), keeping("fr"));
    for (name, code, text) in &fixtures {
        // English prose is plainly English by its function words, and so is a German page
        // with English paragraphs; a shop page in English with a German review is plainly
        // German, and an English report quoting a French mayor plainly French; menus,
        // product data and the other languages are neither. Nor is Catalan French, though the
        // two share many short words.
        let english =
            ["en-news", "en-howto", "de-en-mixed", "en-fr-quote"].contains(&name.as_str());
        let german = ["de", "en-de-shop"].contains(&name.as_str());
        let french = ["fr", "en-fr-quote"].contains(&name.as_str());
        assert_eq!(ENGLISH.plainly(text), english, "{name}: English");
        assert_eq!(GERMAN.plainly(text), german, "{name}: German");
        assert_eq!(FRENCH.plainly(text), french, "{name}: French");
        // whatlang names each file's language, except the shop page of menus and figures,
        // where it is unsure (and what it cannot judge passes the rule).
        let sure = name != "en-menu";
        let detected = whatlang::detect(text).unwrap();
        assert_eq!(detected.lang().code(), *code, "{name}: whatlang");
        assert_eq!(detected.confidence() >= 0.5, sure, "{name}: whatlang");
        assert_eq!(
            language(text, None).as_deref(),
            sure.then_some(*code),
            "{name}"
        );
        // A job keeps what is plainly in its language without asking whatlang, and asks
        // whatlang about the rest: the English job keeps the German page with English
        // paragraphs, the German job keeps it too (whatlang says German), and the English
        // shop page with a German review.
        let kept_by = |job: &QualityRules, language: &str, plainly: bool| {
            let kept = job.problem(text, None).is_none();
            assert_eq!(
                kept,
                !sure || *code == language || plainly,
                "{name} in a job keeping {language}"
            );
        };
        kept_by(&english_job, "eng", english);
        kept_by(&german_job, "deu", german);
        kept_by(&french_job, "fra", french);
    }
    // The share is of words, in any letter case, a multi-byte character inside its word; a
    // share of fewer than 40 words is not trusted.
    let text = |listed: &str, other: &str, n: usize| format!("{listed} {}", other.repeat(n));
    let four = "The AND which THAT";
    assert!(ENGLISH.plainly(&text(four, "Kaffee ", 36)));
    assert!(!ENGLISH.plainly(&text(four, "Kaffee ", 35)), "39 words");
    assert!(
        !ENGLISH.plainly(&text(four, "Kaffee ", 37)),
        "4 of 41 words"
    );
    let apostrophe = "it's THE which that";
    assert!(ENGLISH.plainly(&text(apostrophe, "Kaffee ", 35)), "it, s");
    assert!(!ENGLISH.plainly(&text(apostrophe, "Kaffee ", 36)), "it, s");
    assert!(ENGLISH.plainly(&text(four, "für ", 36)));
    let german = "UND nicht Sich auch";
    assert!(
        GERMAN.plainly(&text(german, "coffee ", 46)),
        "4 of 50 words"
    );
    assert!(
        !GERMAN.plainly(&text(german, "coffee ", 47)),
        "4 of 51 words"
    );
    // Words other languages share are not counted.
    assert!(!ENGLISH.plainly(&text(four, "a in is of to was will for ", 5)));
    assert!(!GERMAN.plainly(&text("und", "der die das den in zu von mit ein es ", 4)));
}

#[test]
fn function_words_are_counted_as_splitting_on_non_word_bytes_counts_them() {
    // Listed words in every case, words that only start or end like them, words running
    // into digits and multi-byte characters, at every offset of the 16-byte windows.
    let pieces = [
        "the",
        "The",
        "THE",
        "because",
        "Because",
        "becausE",
        "becauses",
        "them",
        "theme",
        "thee",
        "it",
        "It's",
        "its",
        "an",
        "and",
        "much",
        "muchness",
        "2the",
        "the2",
        "für",
        "théme",
        "ßthe",
        "東京",
        "a",
        " ",
        "  ",
        "\n",
        ".",
        "-",
        "'",
        "é",
        "\u{a0}",
        "0",
        "und",
        "Und",
        "UNDO",
        "wieder",
        "wiederum",
        "dass",
        "daß",
        "nicht",
        "nichts",
        "est",
        "EST",
        "toujours",
        "Toujours",
        "toujourse",
        "etre",
        "être",
        "dans",
        "dansé",
        "ici",
        "ICI",
    ];
    for language in PLAIN_LANGUAGES {
        let reference = |text: &str| {
            let words: Vec<String> = text
                .split(|c: char| !(c.is_ascii_alphanumeric() || !c.is_ascii()))
                .filter(|word| !word.is_empty())
                .map(str::to_ascii_lowercase)
                .collect();
            let found = words
                .iter()
                .filter(|word| language.words.contains(&word.as_str()))
                .count();
            (words.len(), found)
        };
        let mut rng = fastrand::Rng::with_seed(0xe2);
        let mut found = 0;
        for _ in 0..3000 {
            let text: String = (0..rng.usize(..60))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            assert_eq!(language.count(&text), reference(&text), "{text:?}");
            found += reference(&text).1;
        }
        let name = language.language;
        assert!(found > 100, "the fuzz finds {name} words: {found}");
    }
}

const BOILERPLATE: [&str; 10] = [
    "We use cookies to improve your experience. Accept all cookies",
    "© 2024 Example Ltd. All rights reserved.",
    "Copyright 2023 Example Inc",
    "Privacy Policy | Terms of Use",
    "Skip to content",
    "Home | About | Contact | Blog",
    "Share on Facebook",
    "Subscribe to our newsletter for weekly tips",
    "Sign in",
    "  Log in | Register",
];

#[test]
fn boilerplate_lines_are_found_and_stripped_or_counted() {
    for line in BOILERPLATE {
        assert!(is_boilerplate(line), "{line}");
    }
    for line in [
        "The cookies were baked at 180 degrees.",
        "Home brewing needs patience and clean equipment.",
        "Contact with water ruins the paper.",
    ] {
        assert!(!is_boilerplate(line), "{line}");
    }
    let page = "Skip to content\nHow to brew tea\nBoil the water.\n© 2024 Example Ltd. All rights reserved.";
    assert_eq!(
        clean_document(page, true),
        ("How to brew tea\nBoil the water.".into(), 2)
    );
    assert_eq!(clean_document(page, false), (page.into(), 2));
    // Each kind of line is found inside a document too, after CRLF lines and before others.
    for line in BOILERPLATE {
        let page = format!("How to brew tea\r\nBoil the water.\r\n{line}\r\nPour it.");
        assert_eq!(
            clean_document(&page, true),
            ("How to brew tea\nBoil the water.\nPour it.".into(), 1),
            "{line}"
        );
    }
    let clean = "The cookies were baked.\nHome brewing needs patience.";
    assert_eq!(clean_document(clean, true), (clean.into(), 0));
}

#[test]
fn a_run_counts_each_rule_under_its_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let docs = [
        ("good", GOOD),
        (
            "german",
            "Der Wasserkocher bringt das Wasser schnell zum Kochen. Gießen Sie es über die Teeblätter und warten Sie drei Minuten, dann genießen.",
        ),
        ("short", "Tea is nice."),
        (
            "menu",
            "Home\nProducts\nKettles\nTea\nCups\nSaucers\nThe kettle boils water quickly and you pour it.",
        ),
        (
            "loop",
            "Buy our tea today.\nBuy our tea today.\nBuy our tea today.\nThe kettle boils water quickly and you pour it over leaves.",
        ),
    ];
    let input = dir.path().join("docs.jsonl");
    let body: String = docs
        .iter()
        .map(|(id, text)| {
            // The German one is left to the detector; the others say their language.
            let meta = if *id == "german" {
                serde_json::json!({})
            } else {
                serde_json::json!({"lang": "en"})
            };
            format!(
                "{}\n",
                serde_json::json!({"id": id, "text": text, "metadata": meta})
            )
        })
        .collect();
    std::fs::write(&input, body).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"{}\"]\n\
             [prepare.quality]\nlanguages = [\"en\"]\nmin_words = 8\n\
             min_punctuated_lines = 0.5\nmax_repeated_lines = 0.3\nboilerplate = \"strip\"\n\
             [[stages]]\nname = \"candidates\"\n",
            input.display()
        ),
    )
    .unwrap();
    backforth_ok(&["run", job.to_str().unwrap()]);
    let m = marker(&dir.path().join("out"), "candidates");
    assert_eq!(m["rows_out"], 1);
    assert_eq!(
        m["dropped"],
        serde_json::json!({
            "wrong_language": 1, "too_few_words": 1, "few_punctuated_lines": 1, "repeated_lines": 1,
        })
    );
}

/// Texts built from the characters the counts turn on: whitespace of every kind, dots,
/// `#`, ellipses, letters and digits in and out of ASCII, blank lines.
fn fuzzed(seed: u64) -> Vec<String> {
    let pieces = [
        " ", "  ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\u{a0}", "\u{85}", "\u{2003}", ".",
        "..", "...", "#", "…", "a", "Tea", "42", "ß", "東京", "-", "'", "é", "½", "!",
    ];
    // Mostly ASCII words, so that whole 16-byte windows hold no dot and no multi-byte
    // character, and words cross the windows' edges at every offset.
    let ascii = [
        " ", " ", " ", "\n", "\t", "a", "Tea", "planks", "42", "#", "-", "'", "!", "x9", ".", ". ",
        "..",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..800)
        .map(|k| {
            let (from, len): (&[&str], usize) = match k % 2 {
                0 => (&pieces, rng.usize(..40)),
                _ => (&ascii, rng.usize(..120)),
            };
            (0..len)
                .map(|_| match rng.u8(..20) {
                    0 => pieces[rng.usize(..pieces.len())],
                    _ => from[rng.usize(..from.len())],
                })
                .collect()
        })
        .collect()
}

#[test]
fn word_stats_match_splitting_on_whitespace() {
    for text in fuzzed(0x9e37) {
        let words: Vec<&str> = text.split_whitespace().collect();
        let expected = WordStats {
            words: words.len(),
            without_letter: words
                .iter()
                .filter(|w| !w.chars().any(char::is_alphabetic))
                .count(),
            symbols: text.matches('#').count()
                + text.matches("...").count()
                + text.matches('…').count(),
        };
        assert_eq!(WordStats::of(&text), expected, "{text:?}");
    }
}

#[test]
fn paragraphs_are_cut_as_split_cuts_them() {
    for text in fuzzed(0x5eed)
        .into_iter()
        .chain(["\n\n\n".into(), "".into()])
    {
        let expected: Vec<&str> = text.split("\n\n").collect();
        assert_eq!(paragraphs(&text).collect::<Vec<_>>(), expected, "{text:?}");
    }
}
