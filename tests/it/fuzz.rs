//! Random job files, header values, reply bodies and texts thrown at the parsers and the
//! client's readers: each must answer (a value or an error), never panic. Seeded, so a failure
//! names the case that made it.

use std::time::{Duration, SystemTime};

use backforth::job::file::JobFile;
use backforth::job::{Api, Job, Overrides};
use backforth::llm::wire::{MAX_RETRY_AFTER, parse_completion, retry_after};
use backforth::parse;

use crate::support::rng::Rng;
use crate::support::util::repo;

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

/// A string of `n` pieces drawn from `pieces`, with now and then a random character.
fn stitched(rng: &mut Rng, pieces: &[&str], n: u64) -> String {
    let mut out = String::new();
    for _ in 0..rng.below(n) + 1 {
        if rng.below(8) == 0 {
            out.push(char::from_u32(rng.below(0x3000) as u32).unwrap_or('\u{fffd}'));
        } else {
            out.push_str(pick(rng, pieces));
        }
    }
    out
}

#[test]
fn retry_after_never_panics_and_never_waits_beyond_its_cap() {
    let mut rng = Rng(11);
    let pieces = [
        "1", "0", "9", ".", "-", "e", "E", "+", "nan", "inf", "NaN", " ", ",", "Sun", "Mon", "Nov",
        "Feb", "GMT", ":", "00", "99", "1994", "2026", "31", "x", "\t", "\u{0}",
    ];
    for case in 0..5000 {
        let value = stitched(&mut rng, &pieces, 10);
        let wait = retry_after(&value, SystemTime::now());
        assert!(
            wait.is_none_or(|w| w <= MAX_RETRY_AFTER),
            "case {case}: {value:?} -> {wait:?}"
        );
    }
    assert_eq!(
        retry_after("5", SystemTime::now()),
        Some(Duration::from_secs(5))
    );
}

#[test]
fn reply_bodies_of_any_shape_are_a_reply_or_an_error() {
    let mut rng = Rng(12);
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"choices\"",
        "\"message\"",
        "\"content\"",
        "\"text\"",
        "\"usage\"",
        "\"prompt_tokens\"",
        "\"completion_tokens\"",
        "\"logprobs\"",
        "\"top_logprobs\"",
        "\"token\"",
        "\"logprob\"",
        "\"finish_reason\"",
        "\"stop\"",
        "null",
        "1e999",
        "-1",
        "9223372036854775808",
        "NaN",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "true",
        "0",
    ];
    let valid = r#"{"choices":[{"message":{"content":"Hi"},"text":"Hi","finish_reason":"stop","logprobs":{"content":[{"top_logprobs":[{"token":"5","logprob":-0.1}]}],"top_logprobs":[{"5":-0.1}]}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
    for case in 0..5000 {
        let body = match rng.below(3) {
            0 => stitched(&mut rng, &pieces, 40),
            // A valid body cut short, or with a piece spliced in.
            1 => valid[..rng.below(valid.len() as u64) as usize].to_string(),
            _ => {
                let at = rng.below(valid.len() as u64) as usize;
                let at = (0..=at).rev().find(|i| valid.is_char_boundary(*i)).unwrap();
                format!(
                    "{}{}{}",
                    &valid[..at],
                    pick(&mut rng, &pieces),
                    &valid[at..]
                )
            }
        };
        for api in [Api::Chat, Api::Completions] {
            let _ = std::panic::catch_unwind(|| parse_completion(&body, api))
                .unwrap_or_else(|_| panic!("case {case}: {body:?} panicked"));
        }
    }
}

#[test]
fn job_files_of_any_values_resolve_or_say_why() {
    let mut rng = Rng(13);
    let keys = [
        "concurrency",
        "requests_per_minute",
        "input_tokens_per_minute",
        "temperature",
        "top_p",
        "max_tokens",
        "timeout_secs",
        "max_attempts",
        "throttle_secs",
        "max_reply_bytes",
        "price_input_per_mtok",
        "price_output_per_mtok",
    ];
    let values = [
        "0",
        "1",
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e308",
        "18446744073709551615",
        "3.5",
        "\"x\"",
        "[]",
        "{}",
        "true",
    ];
    let top = [
        "[curate]\nthreshold = ",
        "[curate]\niteration = ",
        "[execution]\nbudget_usd = ",
        "[execution]\nshard_rows = ",
        "[execution]\nwait_secs = ",
        "[prepare]\nmax_chars = ",
        "[prepare.near_dedup]\nbands = ",
        "[prepare.near_dedup]\nthreshold = ",
        "[input]\nmax_line_bytes = ",
    ];
    for case in 0..2000 {
        let mut text = String::from("output = \"out\"\n");
        let section = pick(&mut rng, &top);
        if !section.starts_with("[input]") {
            text.push_str("[input]\npaths = [\"x.jsonl\"]\n");
            text.push_str(&format!("{section}{}\n", pick(&mut rng, &values)));
        } else {
            text.push_str(&format!(
                "[input]\npaths = [\"x.jsonl\"]\nmax_line_bytes = {}\n",
                pick(&mut rng, &values)
            ));
        }
        text.push_str("[models.backward]\nendpoint = \"mock\"\nmodel = \"m\"\n");
        for _ in 0..rng.below(3) + 1 {
            text.push_str(&format!(
                "{} = {}\n",
                pick(&mut rng, &keys),
                pick(&mut rng, &values)
            ));
        }
        text.push_str("[[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"backtranslated\"\n");
        let Ok(file) = toml::from_str::<JobFile>(&text) else {
            continue; // refused by the file's own types, with its message
        };
        let outcome = std::panic::catch_unwind(|| {
            Job::resolve(file, repo(), "fuzz".into(), &Overrides::default()).map(|_| ())
        });
        assert!(outcome.is_ok(), "case {case} panicked:\n{text}");
    }
}

#[test]
fn parsers_take_any_text() {
    let mut rng = Rng(14);
    let pieces = [
        "Score",
        ": ",
        "5",
        "-3",
        "1e9",
        "4.5",
        "**",
        "[RES]",
        "[/RES]",
        "[res]",
        "Verdict",
        "good",
        "bad",
        "【好】",
        "【差】",
        "Instruction:",
        "\"",
        "\n",
        " ",
        "the",
        "text",
        "as an AI",
        "[[\"4\", -0.2]]",
        "[[\"x\", NaN]]",
        "{",
        "]",
        "é",
        "\u{1b}",
        "𝔸",
    ];
    for case in 0..5000 {
        let text = stitched(&mut rng, &pieces, 30);
        let other = stitched(&mut rng, &pieces, 30);
        let outcome = std::panic::catch_unwind(|| {
            let _ = parse::parse_score(Some(&text), Some(&other));
            let _ = parse::extract_tagged(&text, "RES");
            let _ = parse::tag_problem(Some(&text), "RES", Some("length"));
            let _ = parse::clean_instruction(&text);
            let _ = parse::parse_verdict(Some(&text), None);
            let _ = parse::logprob_score(&text);
            let _ = parse::judge(Some(&text), Some("stop"), None, Some(&other));
            let _ = parse::max_repeats(&text, 1 + (text.len() % 60));
            let _ = parse::ngram_overlap(&text, &other, 3);
        });
        assert!(outcome.is_ok(), "case {case}: {text:?} / {other:?}");
    }
}
