//! Parsers over adversarial LLM outputs, with the reason checked.

use backforth::parse::{clean_instruction, extract_tagged, parse_score, tag_problem};

fn score(raw: &str) -> (Option<i64>, Option<&'static str>) {
    let p = parse_score(Some(raw), Some("stop"));
    (p.score, p.reason)
}

#[test]
fn plain_score_line() {
    assert_eq!(score("Looks fine.\nScore: 4"), (Some(4), None));
    assert_eq!(score("score:5"), (Some(5), None));
    assert_eq!(score("**Score:** 3"), (Some(3), None));
}

#[test]
fn reasoning_with_other_digits_uses_the_last_score() {
    let raw = "The answer has 3 steps and cites 2 sources; I first thought Score: 2.\nOn reflection it is complete.\nScore: 5";
    assert_eq!(score(raw), (Some(5), None));
    // Digits in the reasoning without a `Score:` label never count.
    assert_eq!(
        score("It covers 4 of 5 points, rated 4/5."),
        (None, Some("no_score"))
    );
}

#[test]
fn non_integer_and_out_of_range() {
    assert_eq!(score("Score: 4.5"), (None, Some("not_integer")));
    assert_eq!(score("Score: 4,5"), (None, Some("not_integer")));
    assert_eq!(score("Score: 10"), (None, Some("out_of_range")));
    assert_eq!(score("Score: 0"), (None, Some("out_of_range")));
    assert_eq!(score("Score: -1"), (None, Some("out_of_range")));
}

#[test]
fn missing_empty_and_truncated() {
    assert_eq!(score("I would rather not say."), (None, Some("no_score")));
    assert_eq!(parse_score(None, None).reason, Some("no_output"));
    assert_eq!(
        parse_score(Some("  "), Some("stop")).reason,
        Some("no_output")
    );
    let cut = parse_score(Some("The answer is detailed and"), Some("length"));
    assert_eq!((cut.score, cut.reason), (None, Some("truncated")));
    // A score that made it out before the cut still counts.
    let cut = parse_score(Some("Score: 3\nMore reasoning follo"), Some("length"));
    assert_eq!((cut.score, cut.reason), (Some(3), None));
}

#[test]
fn tagged_text_is_extracted_and_problems_are_named() {
    let raw = "Sure, here it is.\n[RES]\nThe rewritten answer.\n[/RES]\nAnything else?";
    assert_eq!(
        extract_tagged(raw, "RES").as_deref(),
        Some("The rewritten answer.")
    );
    assert_eq!(tag_problem(Some(raw), "RES", Some("stop")), None);
    assert_eq!(
        extract_tagged("[res]lower case[/res]", "RES").as_deref(),
        Some("lower case")
    );

    assert_eq!(extract_tagged("no tags at all", "RES"), None);
    assert_eq!(
        tag_problem(Some("no tags at all"), "RES", Some("stop")),
        Some("missing_tag")
    );

    let open = "[RES] an answer that never clo";
    assert_eq!(extract_tagged(open, "RES"), None);
    assert_eq!(
        tag_problem(Some(open), "RES", Some("stop")),
        Some("unclosed_tag")
    );
    assert_eq!(
        tag_problem(Some(open), "RES", Some("length")),
        Some("truncated")
    );

    assert_eq!(extract_tagged("[RES]   [/RES]", "RES"), None);
    assert_eq!(
        tag_problem(Some("[RES]  [/RES]"), "RES", None),
        Some("empty")
    );
    assert_eq!(tag_problem(None, "RES", None), Some("no_output"));
    // Only the first block is taken.
    assert_eq!(
        extract_tagged("[RES]a[/RES][RES]b[/RES]", "RES").as_deref(),
        Some("a")
    );
}

#[test]
fn instructions_lose_labels_and_quotes() {
    assert_eq!(
        clean_instruction("Instruction: How do tides work?").as_deref(),
        Some("How do tides work?")
    );
    assert_eq!(
        clean_instruction("  \"What is RuBisCO?\" ").as_deref(),
        Some("What is RuBisCO?")
    );
    assert_eq!(
        clean_instruction("**Question:** Why is the sky blue?").as_deref(),
        Some("Why is the sky blue?")
    );
    assert_eq!(
        clean_instruction("Explain the rule of 72.").as_deref(),
        Some("Explain the rule of 72.")
    );
    assert_eq!(clean_instruction("Instruction:   "), None);
    assert_eq!(clean_instruction(""), None);
}

#[test]
fn logprob_scores_weigh_the_digits() {
    use backforth::parse::logprob_score;
    let ln = |p: f64| p.ln();
    // 0.5 on "4", 0.25 on " 4" (the same digit), 0.25 on "5": expected 4.25, mass 1.
    let top = serde_json::json!([["4", ln(0.5)], [" 4", ln(0.25)], ["5", ln(0.25)]]).to_string();
    let (expected, mass) = logprob_score(&top).unwrap();
    assert!(
        (expected - 4.25).abs() < 1e-9 && (mass - 1.0).abs() < 1e-9,
        "{expected} {mass}"
    );
    // Words and out-of-range digits carry no score; the mass says how much was found.
    let top = serde_json::json!([["The", ln(0.6)], ["2", ln(0.3)], ["7", ln(0.1)]]).to_string();
    let (expected, mass) = logprob_score(&top).unwrap();
    assert!((expected - 2.0).abs() < 1e-9 && (mass - 0.3).abs() < 1e-9);
    assert_eq!(
        logprob_score(&serde_json::json!([["The", -0.1]]).to_string()),
        None
    );
    assert_eq!(logprob_score("not json"), None);
}

#[test]
fn trigrams_and_overlap_on_hand_checked_text() {
    use backforth::parse::{ngram_overlap, word_ngrams};
    assert_eq!(
        word_ngrams("The cat sat on the mat.", 3),
        vec!["the cat sat", "cat sat on", "sat on the", "on the mat"]
    );
    assert!(word_ngrams("two words", 3).is_empty());
    // Of the rewrite's trigrams "a b c" and "b c d", only the first is in the draft.
    assert_eq!(ngram_overlap("a b c d", "x a b c y", 3), Some(0.5));
    assert_eq!(ngram_overlap("a b c", "a b c", 3), Some(1.0));
    assert_eq!(ngram_overlap("p q r", "a b c", 3), Some(0.0));
    assert_eq!(ngram_overlap("too short", "anything at all", 3), None);
}
