//! `backforth export` for training: seed and synthetic pairs mixed with their tags, sampled
//! to a size reproducibly, and the dataset card beside them; checked line by line. The
//! synthetic side is the sample run's `backtranslated` table (22 pairs, the web text as the
//! response) so there is something to sample from.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::pipeline::sample_root;
use crate::support::util::{backforth, backforth_ok, rows, session};

const SEED_TAG: &str = "Answer in the style of an AI Assistant.";
const WEB_TAG: &str = "Answer with knowledge from web search.";

fn export(out: &Path, seed: &Path, extra: &[&str]) -> Vec<Value> {
    let root = sample_root();
    let mut args = vec![
        "export",
        "--root",
        root.to_str().unwrap(),
        "--table",
        "backtranslated",
        "--seed",
        seed.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    backforth_ok(&args);
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn make_seed(dir: &Path) -> std::path::PathBuf {
    let seed = dir.join("seed");
    backforth_ok(&[
        "seed",
        "--input",
        "tests/fixtures/oasst/messages.jsonl",
        "--output",
        seed.to_str().unwrap(),
    ]);
    seed
}

/// (system, user, assistant) of an OpenAI-chat line; system is "" when absent.
fn chat(line: &Value) -> (String, String, String) {
    let mut out = (String::new(), String::new(), String::new());
    for m in line["messages"].as_array().unwrap() {
        let content = m["content"].as_str().unwrap().to_string();
        match m["role"].as_str().unwrap() {
            "system" => out.0 = content,
            "user" => out.1 = content,
            _ => out.2 = content,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn export_mixes_tagged_seed_and_a_reproducible_sample_with_a_card() {
    let dir = tempfile::tempdir().unwrap();
    let seed = make_seed(dir.path());
    let ctx = session(&sample_root()).await;
    let rewritten: HashMap<String, String> =
        rows(&ctx, "SELECT instruction, text FROM backtranslated")
            .await
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect();
    let seeds: HashMap<&str, &str> = [
        (
            "How do I boil an egg?",
            "Put the egg in boiling water for nine minutes, then cool it in cold water.",
        ),
        (
            "What is the capital of France?",
            "Paris is the capital of France.",
        ),
        ("Name a prime number.", "Seven is a prime number."),
    ]
    .into();

    let a = dir.path().join("a/train.jsonl");
    std::fs::create_dir_all(a.parent().unwrap()).unwrap();
    let lines = export(
        &a,
        &seed,
        &["--tag", "system", "--size", "5", "--sample-seed", "7"],
    );
    assert_eq!(lines.len(), 5 + 3);
    let (mut n_seed, mut n_web) = (0, 0);
    for line in &lines {
        let (system, user, assistant) = chat(line);
        if system == SEED_TAG {
            assert_eq!(seeds[user.as_str()], assistant);
            n_seed += 1;
        } else {
            assert_eq!(system, WEB_TAG);
            assert_eq!(
                rewritten[&user], assistant,
                "a synthetic pair: the web text answers"
            );
            n_web += 1;
        }
    }
    assert_eq!((n_seed, n_web), (3, 5));

    // The same seed gives the same file; another seed another sample.
    let again = dir.path().join("again/train.jsonl");
    std::fs::create_dir_all(again.parent().unwrap()).unwrap();
    export(
        &again,
        &seed,
        &["--tag", "system", "--size", "5", "--sample-seed", "7"],
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&again).unwrap());
    let other = dir.path().join("other/train.jsonl");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let other_lines = export(
        &other,
        &seed,
        &["--tag", "system", "--size", "5", "--sample-seed", "8"],
    );
    let users = |ls: &[Value]| -> std::collections::BTreeSet<String> {
        ls.iter().map(|l| chat(l).1).collect()
    };
    assert_ne!(users(&lines), users(&other_lines));

    // Appended tags: no system message, the sentence after a blank line.
    let appended = dir.path().join("appended/train.jsonl");
    std::fs::create_dir_all(appended.parent().unwrap()).unwrap();
    for line in export(&appended, &seed, &["--tag", "append"]) {
        let (system, user, assistant) = chat(&line);
        assert_eq!(system, "");
        if let Some(instruction) = user.strip_suffix(&format!("\n\n{SEED_TAG}")) {
            assert_eq!(seeds[instruction], assistant);
        } else {
            let instruction = user.strip_suffix(&format!("\n\n{WEB_TAG}")).unwrap();
            assert_eq!(rewritten[instruction], assistant);
        }
    }

    // The card: counts, tags, the job's settings and the run's statistics.
    let card = std::fs::read_to_string(dir.path().join("a/train.card.md")).unwrap();
    assert!(card.starts_with("<!-- written by backforth export -->"));
    assert!(
        card.contains(&format!(
            "| synthetic pairs | 5 (of {} in `backtranslated`, sampled with seed 7) |",
            rewritten.len()
        )),
        "{card}"
    );
    assert!(card.contains("| seed pairs | 3 |"));
    assert!(card.contains(&format!("| seed tag | {SEED_TAG} |")));
    assert!(card.contains("\"threshold\": 5"), "{card}");
    assert!(card.contains("### Funnel"));
    assert!(
        card.contains("| seed | 3 |"),
        "the seed is a subset of the lengths table"
    );
}

#[test]
fn export_refuses_a_size_beyond_the_table_and_a_foreign_readme() {
    let dir = tempfile::tempdir().unwrap();
    let seed = make_seed(dir.path());
    let root = sample_root();
    let out = dir.path().join("big.jsonl");
    let run = backforth(&[
        "export",
        "--root",
        root.to_str().unwrap(),
        "--seed",
        seed.to_str().unwrap(),
        "--size",
        "100000",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--size 100000: 'rewritten' holds only"));

    // The folder's README.md is the project's, whatever it says: the card goes beside the
    // file under the file's own name.
    let mine = dir.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("README.md"), "# my project\n").unwrap();
    let train = mine.join("train.jsonl");
    let args = [
        "export",
        "--root",
        root.to_str().unwrap(),
        "--output",
        train.to_str().unwrap(),
    ];
    backforth_ok(&args);
    assert_eq!(
        std::fs::read_to_string(mine.join("README.md")).unwrap(),
        "# my project\n"
    );
    assert!(
        std::fs::read_to_string(mine.join("train.card.md"))
            .unwrap()
            .starts_with("<!-- written by backforth export -->")
    );
    // A card of ours is replaced; a file of that name someone else wrote is not.
    backforth_ok(&args);
    std::fs::remove_file(&train).unwrap();
    std::fs::write(mine.join("train.card.md"), "# notes\n").unwrap();
    let run = backforth(&args);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("was not written by backforth"));
    assert_eq!(
        std::fs::read_to_string(mine.join("train.card.md")).unwrap(),
        "# notes\n"
    );
    // Refused before anything is written: no data file without its card.
    assert!(!train.exists());
}
