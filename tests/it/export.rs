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
    make_seed_as(dir, &[])
}

/// The seed pairs of the OASST fixture under `dir/seed`, written with `args` as well.
fn make_seed_as(dir: &Path, args: &[&str]) -> std::path::PathBuf {
    let seed = dir.join("seed");
    let mut all = vec![
        "seed",
        "--input",
        "tests/fixtures/oasst/messages.jsonl",
        "--output",
        seed.to_str().unwrap(),
    ];
    all.extend(args);
    backforth_ok(&all);
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

/// What `script` (Python printing JSON, `datasets` importable) prints for `folder`, offline,
/// with a Hugging Face cache of its own.
pub fn with_datasets(script: &str, folder: &Path) -> Value {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python_with_datasets())
        .args(["-c", script, folder.to_str().unwrap()])
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    serde_json::from_str(&crate::support::util::ok(out)).unwrap()
}

/// The Python of `.ci/venv` with Hugging Face `datasets` (`.ci/run` installs it).
fn python_with_datasets() -> std::path::PathBuf {
    let python = crate::support::util::repo().join(".ci/venv/bin/python");
    let found = std::process::Command::new(&python)
        .args(["-c", "import datasets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{} cannot import datasets: run .ci/run, or {}/pip install datasets",
        python.display(),
        python.parent().unwrap().display()
    );
    python
}

/// What `datasets` makes of the folder: splits and rows, features, the card's YAML, and every
/// row's id, origin and messages.
const LOAD: &str = r#"
import json, sys, datasets, yaml
folder = sys.argv[1]
ds = datasets.load_dataset(folder)
card = open(folder + "/README.md").read()
front = yaml.safe_load(card.split("---\n")[1])
print(json.dumps({
    "splits": {name: split.num_rows for name, split in ds.items()},
    "features": {name: str(f) for name, f in ds["train"].features.items()},
    "front": front,
    "rows": {name: [{"id": r["id"], "origin": r["origin"], "messages": r["messages"]} for r in split]
             for name, split in ds.items()},
}))
"#;

#[test]
fn an_hf_folder_loads_in_datasets_with_its_card() {
    let dir = tempfile::tempdir().unwrap();
    let seed = make_seed(dir.path());
    let folder = dir.path().join("hub");
    backforth_ok(&[
        "export",
        "--root",
        sample_root().to_str().unwrap(),
        "--table",
        "backtranslated",
        "--format",
        "hf",
        "--seed",
        seed.to_str().unwrap(),
        "--tag",
        "system",
        "--test-fraction",
        "0.25",
        "--sample-seed",
        "5",
        "--license",
        "odc-by",
        "--output",
        folder.to_str().unwrap(),
    ]);
    let loaded = with_datasets(LOAD, &folder);
    let rows = tokio::runtime::Runtime::new().unwrap().block_on(async {
        rows(
            &session(&sample_root()).await,
            "SELECT count(*) FROM backtranslated WHERE instruction IS NOT NULL",
        )
        .await
    });
    let synthetic: u64 = rows[0][0].parse().unwrap();
    let (train, test) = (
        loaded["splits"]["train"].as_u64().unwrap(),
        loaded["splits"]["test"].as_u64().unwrap(),
    );
    assert_eq!(train + test, synthetic + 3, "{loaded}");
    assert!(test > 0 && test < train, "{loaded}");
    assert_eq!(
        loaded["features"]["messages"],
        "List({'role': Value('string'), 'content': Value('string')})"
    );
    for name in ["id", "origin", "tag", "doc_id"] {
        assert_eq!(loaded["features"][name], "Value('string')", "{name}");
    }
    assert_eq!(loaded["features"]["score"], "Value('float64')");
    // Every row: system tag by origin, then the pair.
    let mut seeds = 0;
    for split in ["train", "test"] {
        for row in loaded["rows"][split].as_array().unwrap() {
            let messages = row["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 3, "{row}");
            let tag = match row["origin"].as_str().unwrap() {
                "seed" => {
                    seeds += 1;
                    SEED_TAG
                }
                "web" => WEB_TAG,
                other => panic!("origin {other}"),
            };
            assert_eq!(
                messages[0],
                serde_json::json!({"role": "system", "content": tag})
            );
            assert_eq!(messages[1]["role"], "user");
            assert_eq!(messages[2]["role"], "assistant");
        }
    }
    assert_eq!(seeds, 3);
    // The card's YAML: what the Hub reads.
    let front = &loaded["front"];
    assert_eq!(front["license"], "odc-by");
    assert_eq!(
        front["task_categories"],
        serde_json::json!(["text-generation"])
    );
    assert_eq!(front["size_categories"], serde_json::json!(["n<1K"]));
    assert_eq!(
        front["configs"][0]["data_files"],
        serde_json::json!([
            {"split": "train", "path": "data/train-*"},
            {"split": "test", "path": "data/test-*"}
        ])
    );
    assert_eq!(front["dataset_info"]["splits"][0]["num_examples"], train);
    assert_eq!(front["dataset_info"]["splits"][1]["num_examples"], test);
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(card.contains("<!-- written by backforth export -->"));
    assert!(card.contains("### Funnel"));
}

#[test]
fn seed_pairs_as_hf_folders_load_in_datasets_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let seed = make_seed_as(dir.path(), &["--format", "hf"]);
    let load = "import json, sys, datasets\n\
                rows = {d: [dict(r) for r in datasets.load_dataset(sys.argv[1] + '/' + d)['train']]\n\
                        for d in ('forward', 'backward')}\n\
                print(json.dumps(rows))";
    let loaded = with_datasets(load, &seed);
    let (forward, backward) = (
        loaded["forward"].as_array().unwrap(),
        loaded["backward"].as_array().unwrap(),
    );
    assert_eq!(forward.len(), 3);
    assert_eq!(backward.len(), 3);
    for (f, b) in forward.iter().zip(backward) {
        assert_eq!(f["id"], b["id"]);
        assert_eq!(f["origin"], "seed");
        // The backward model's pair is the forward pair reversed.
        assert_eq!(f["messages"][0]["content"], b["messages"][1]["content"]);
        assert_eq!(f["messages"][1]["content"], b["messages"][0]["content"]);
        assert_eq!(f["messages"][0]["role"], "user");
    }
    let card = std::fs::read_to_string(seed.join("forward/README.md")).unwrap();
    assert!(card.starts_with("---\nlicense: \"apache-2.0\""), "{card}");
}

/// An hf export owns its `data/`: exported again into a folder it wrote, it removes the data
/// files of the earlier export that it does not write again, so `datasets` loads only the new
/// rows; a folder whose `data/` holds someone else's files is refused, untouched.
#[test]
fn an_hf_export_replaces_its_own_files_and_refuses_a_foreign_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("hub");
    let export = |size: &str| {
        crate::support::util::backforth(&[
            "export",
            "--root",
            sample_root().to_str().unwrap(),
            "--table",
            "backtranslated",
            "--format",
            "hf",
            "--size",
            size,
            "--output",
            folder.to_str().unwrap(),
        ])
    };
    crate::support::util::ok(export("6"));
    // As an earlier export with more rows would have left it: a second file of its own.
    let data = folder.join("data");
    std::fs::copy(
        data.join("train-00000-of-00001.parquet"),
        data.join("train-00001-of-00002.parquet"),
    )
    .unwrap();
    std::fs::write(
        folder.join(".backforth-export.json"),
        r#"["data/train-00000-of-00001.parquet", "data/train-00001-of-00002.parquet"]"#,
    )
    .unwrap();
    crate::support::util::ok(export("4"));
    assert!(!data.join("train-00001-of-00002.parquet").exists());
    let loaded = with_datasets(LOAD_TRAIN_ROWS, &folder);
    assert_eq!(loaded["train"], 4, "{loaded}");

    // A record naming anything but its data files is not ours: refused, nothing deleted.
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    std::fs::write(
        folder.join(".backforth-export.json"),
        r#"["../keep.txt", "README.md"]"#,
    )
    .unwrap();
    let out = export("4");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("keep.txt").exists() && folder.join("README.md").exists());

    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(foreign.join("data")).unwrap();
    std::fs::write(foreign.join("data/train-mine.parquet"), "not ours").unwrap();
    let out = crate::support::util::backforth(&[
        "export",
        "--root",
        sample_root().to_str().unwrap(),
        "--table",
        "backtranslated",
        "--format",
        "hf",
        "--output",
        foreign.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("did not write"), "{stderr}");
    assert_eq!(std::fs::read_dir(foreign.join("data")).unwrap().count(), 1);
    assert!(!foreign.join("README.md").exists());
}

/// The rows of the train split `datasets` loads from a folder.
const LOAD_TRAIN_ROWS: &str = r#"
import json, sys, datasets
ds = datasets.load_dataset(sys.argv[1])
print(json.dumps({"train": ds["train"].num_rows}))
"#;

/// Two exports whose file names differ after the first dot get a card each.
#[test]
fn card_names_keep_the_whole_stem() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["run.a.jsonl", "run.b.jsonl"] {
        crate::support::util::ok(crate::support::util::backforth(&[
            "export",
            "--root",
            sample_root().to_str().unwrap(),
            "--table",
            "backtranslated",
            "--output",
            dir.path().join(name).to_str().unwrap(),
        ]));
    }
    for card in ["run.a.card.md", "run.b.card.md"] {
        assert!(dir.path().join(card).exists(), "{card}");
    }
}
