//! Benchmark decontamination: planted copies of benchmark items (verbatim, re-wrapped to
//! 8-word lines, re-cased with other punctuation) are dropped naming the benchmark and the
//! item; a near-miss sharing only common phrases is kept. Benchmarks come as JSONL, Parquet
//! and a Hugging Face dataset folder.

use std::path::Path;

use backforth::prepare::decontaminate::{
    Benchmark, BenchmarkIndex, Decontamination, Measure, gram_hashes,
};

use crate::support::util::{backforth, backforth_ok, copy_to_parquet, rows, session};

const Q1: &str = "A train leaves the station at nine in the morning travelling at sixty miles \
                  per hour towards a city two hundred and forty miles away; at what time \
                  does it arrive if it makes no stops on the way?";
const Q2: &str = "Explain why the sky appears blue during the day but red and orange near \
                  sunset, referring to the scattering of sunlight by molecules in the \
                  atmosphere and the length of the path the light travels.";
const Q3: &str = "Which enzyme, produced in the salivary glands of humans, begins the \
                  chemical digestion of starch into smaller sugars before food reaches the \
                  stomach, and at what pH does it work best?";

/// `text` re-wrapped to lines of eight words.
fn rewrapped(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .chunks(8)
        .map(|line| line.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` upper-cased, its commas and semicolons turned into dashes, its question mark gone.
fn recased(text: &str) -> String {
    text.to_uppercase()
        .replace([',', ';'], " -")
        .replace('?', ".")
}

fn settings(benchmarks: Vec<Benchmark>) -> Decontamination {
    Decontamination {
        n: 8,
        measure: Measure::Any,
        threshold: 1.0,
        max_items: 10,
        benchmarks,
        files: String::new(),
    }
}

#[test]
fn normalised_copies_have_the_same_ngrams() {
    let plain = gram_hashes(Q2, 8);
    assert_eq!(plain.len(), Q2.split_whitespace().count() - 7);
    assert_eq!(gram_hashes(&rewrapped(Q2), 8), plain);
    assert_eq!(
        gram_hashes(&recased(Q2), 8),
        gram_hashes(&Q2.replace([',', ';'], " "), 8)
    );
    assert!(gram_hashes("too short to make one", 8).is_empty());
}

const IDS: [&str; 20] = [
    "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s",
    "t",
];

#[test]
fn an_index_finds_items_and_leaves_boilerplate_out() {
    let boiler = "the following are multiple choice questions with answers about";
    let questions: Vec<String> = (0..20)
        .map(|i| format!("{boiler} topic {i}: what is the colour of object number {i} today"))
        .collect();
    let mut items: Vec<(usize, &str, Vec<&str>)> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| (0, IDS[i], vec![q.as_str()]))
        .collect();
    items.push((0, "q1", vec![Q1]));
    let bench = Benchmark {
        name: "quiz".into(),
        paths: vec![],
        fields: vec!["question".into()],
        id: None,
    };
    let index = BenchmarkIndex::of_items(&settings(vec![bench]), items);
    assert!(index.stats.boilerplate > 0, "{:?}", index.stats);
    // The shared preamble alone is no match; the item's own words are.
    assert_eq!(
        index.check(&[("text", &format!("{boiler} something else entirely here"))]),
        None
    );
    let found = index
        .check(&[
            ("instruction", "Hello."),
            ("response", &format!("As asked: {Q1}")),
        ])
        .unwrap();
    assert_eq!(
        (found.item.as_str(), found.column.as_str()),
        ("q1", "response")
    );
    assert!((found.overlap - 1.0).abs() < 1e-9, "{found:?}");
    let seven: Vec<&str> = Q1.split_whitespace().take(7).collect();
    assert_eq!(
        index.check(&[("text", &seven.join(" "))]),
        None,
        "fewer than 8 words shared"
    );
}

/// Benchmarks as JSONL (`quiz`), Parquet (`science`) and a Hugging Face folder (`sky`).
async fn write_benchmarks(dir: &Path) {
    let quiz = [
        serde_json::json!({"qid": "quiz-1", "question": Q1, "choices": ["10 am", "1 pm"], "answer": "1 pm"}),
        serde_json::json!({"qid": "quiz-2", "question": "What is two plus two?", "choices": ["4"], "answer": "4"}),
    ];
    let lines: String = quiz.iter().map(|q| q.to_string() + "\n").collect();
    std::fs::write(dir.join("quiz.jsonl"), lines).unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    copy_to_parquet(
        &ctx,
        &format!(
            "SELECT 'sci-7' AS id, '{}' AS problem, make_array('amylase', 'pepsin') AS options",
            Q3.replace('\'', "''")
        ),
        &dir.join("science.parquet"),
    )
    .await;
    std::fs::create_dir_all(dir.join("sky/data")).unwrap();
    copy_to_parquet(
        &ctx,
        &format!(
            "SELECT '{}' AS question, 'Rayleigh scattering' AS answer",
            Q2
        ),
        &dir.join("sky/data/test-00000-of-00001.parquet"),
    )
    .await;
}

const BENCHMARKS: &str = r#"
[decontaminate]
n = 8

[[decontaminate.benchmarks]]
name = "quiz"
paths = ["quiz.jsonl"]
fields = ["question", "choices", "answer"]
id = "qid"

[[decontaminate.benchmarks]]
name = "science"
paths = ["science.parquet"]
fields = ["problem", "options"]
id = "id"

[[decontaminate.benchmarks]]
name = "sky"
paths = ["sky/"]
fields = ["question", "answer"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn planted_copies_are_dropped_naming_benchmark_and_item_and_a_near_miss_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    write_benchmarks(dir.path()).await;
    let docs = [
        (
            "verbatim",
            format!("Homework help, question three. {Q1} Show your working."),
        ),
        (
            "rewrapped",
            format!("Notes from class\n{}\nEnd of notes.", rewrapped(Q2)),
        ),
        ("recased", format!("QUIZ TIME! {}", recased(Q3))),
        (
            "near-miss",
            "Which of the following is true about trains? A train leaves the station every \
             morning, and the enzyme in saliva is interesting; at what time does your bus arrive?"
                .to_string(),
        ),
        (
            "clean",
            "Bread rises because yeast ferments sugars and releases carbon dioxide gas."
                .to_string(),
        ),
    ];
    let lines: String = docs
        .iter()
        .map(|(id, text)| serde_json::json!({"id": id, "text": text}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), lines).unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n{BENCHMARKS}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"decontaminated\"\n"
        ),
    )
    .unwrap();
    backforth_ok(&["run", job.to_str().unwrap(), "--endpoint", "mock"]);
    let root = dir.path().join("out");
    let ctx = session(&root).await;
    let dropped = rows(
        &ctx,
        "SELECT doc_id, drop_reason, contamination['benchmark'], contamination['item'], \
         contamination['field'], contamination['column'], contamination['shared'] > 0 \
         FROM decontaminated_dropped ORDER BY doc_id",
    )
    .await;
    let expect = |doc: &str, benchmark: &str, item: &str, field: &str| {
        vec![
            doc.to_string(),
            format!("contaminated:{benchmark}"),
            benchmark.to_string(),
            item.to_string(),
            field.to_string(),
            "text".to_string(),
            "true".to_string(),
        ]
    };
    assert_eq!(
        dropped,
        vec![
            expect("recased", "science", "sci-7", "problem"),
            expect(
                "rewrapped",
                "sky",
                "test-00000-of-00001.parquet:1",
                "question"
            ),
            expect("verbatim", "quiz", "quiz-1", "question"),
        ]
    );
    let kept = rows(&ctx, "SELECT doc_id FROM decontaminated ORDER BY doc_id").await;
    assert_eq!(
        kept,
        vec![vec!["clean".to_string()], vec!["near-miss".to_string()]]
    );

    // stats: matches per benchmark and field.
    let out = backforth_ok(&["stats", root.to_str().unwrap(), "--format", "json"]);
    let tables: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let table = tables
        .iter()
        .find(|t| {
            t["title"]
                .as_str()
                .unwrap()
                .starts_with("Benchmark contamination")
        })
        .unwrap();
    assert_eq!(table["rows"].as_array().unwrap().len(), 3, "{table}");

    // A benchmark file that changes changes the stage: the run refuses to mix the two.
    let mut quiz = std::fs::read_to_string(dir.path().join("quiz.jsonl")).unwrap();
    quiz.push_str("{\"qid\": \"quiz-3\", \"question\": \"new\"}\n");
    std::fs::write(dir.path().join("quiz.jsonl"), quiz).unwrap();
    let run = backforth(&["run", job.to_str().unwrap(), "--endpoint", "mock"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("decontaminated"), "{stderr}");
}

#[test]
fn decontamination_settings_are_checked_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"a\", \"text\": \"x\"}\n",
    )
    .unwrap();
    for (settings, says) in [
        (
            "[decontaminate]\nn = 5\nbenchmarks = []\n",
            "[decontaminate] n = 5: give 8 to 64",
        ),
        (
            "[decontaminate]\nbenchmarks = []\n",
            "[decontaminate] names no benchmark",
        ),
        (
            "[decontaminate]\nmeasure = \"share\"\nthreshold = 2.0\nbenchmarks = []\n",
            "[decontaminate] threshold = 2",
        ),
    ] {
        let job = dir.path().join("job.toml");
        std::fs::write(
            &job,
            format!("output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n{settings}"),
        )
        .unwrap();
        let out = backforth(&["run", job.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

#[test]
fn a_benchmark_field_no_item_has_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"a\", \"text\": \"x\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("quiz.jsonl"),
        "{\"qid\": \"q1\", \"question\": \"What is two plus two?\"}\n",
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "output = \"out\"\n[input]\npaths = [\"docs.jsonl\"]\n\
         [decontaminate]\nn = 8\n[[decontaminate.benchmarks]]\nname = \"quiz\"\n\
         paths = [\"quiz.jsonl\"]\nfields = [\"questoin\"]\n\
         [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"decontaminated\"\n",
    )
    .unwrap();
    let out = backforth(&["run", job.to_str().unwrap(), "--endpoint", "mock"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("quiz.jsonl")
            && stderr.contains("benchmark 'quiz': no item has the field(s) questoin")
            && stderr.contains("its items have: qid, question"),
        "{stderr}"
    );
}
