//! Candidate preparation against the floor of its I/O: a generated Dolma-like corpus
//! (gzip JSONL, deterministic, `PREPARE_MB` megabytes of text, default 1,024) is prepared by
//! `backforth run --stages candidates` twice — with the default job's rules, then with every
//! quality rule, boilerplate stripping and MinHash signatures — followed by the `deduped`
//! near-dedup pass; as the floor, the same files are only decoded and re-encoded: gunzip,
//! JSON parsing, and the text written as zstd Parquet, on every core, before the runs and
//! again after them. Printed for each run: MB/s of input text, CPU, peak RSS (through
//! `/usr/bin/time`), rows kept and dropped; then the ratios to the mean of the two floors.
//! Last, the `decontaminated` stage checks the candidates against a generated benchmark set
//! of `BENCH_NGRAMS` (10 million) 13-grams: index build time, MB/s of the whole stage, peak
//! RSS. `ONLY=decontaminate` runs only that (and the candidates it reads).
//!
//!     cargo bench --bench prepare                # release: DataFusion optimised
//!
//! The corpus is generated once under `target/bench-corpus/` and reused.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use backforth_testkit::rng::Rng;

const FILES: usize = 16;

/// A vocabulary of pronounceable content words with a Zipf-like draw, so token counts and
/// dedup keys behave like prose rather than noise.
fn vocabulary() -> Vec<String> {
    let syllables = [
        "ta", "ri", "mon", "sel", "ka", "vo", "den", "lu", "pra", "est", "ing", "or", "ba", "tes",
        "qui", "nal",
    ];
    let mut rng = Rng(7);
    (0..8000)
        .map(|_| {
            let n = 1 + rng.below(3) as usize;
            (0..n)
                .map(|_| syllables[rng.below(syllables.len() as u64) as usize])
                .collect()
        })
        .collect()
}

/// Function words in order of frequency: they are about half of what people write, and what
/// a language detector reads.
const ENGLISH: [&str; 30] = [
    "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as", "was", "on",
    "be", "by", "this", "are", "or", "from", "at", "which", "not", "but", "have", "they", "you",
    "an", "has", "their",
];
const GERMAN: [&str; 30] = [
    "der", "die", "und", "in", "den", "von", "zu", "das", "mit", "sich", "des", "auf", "für",
    "ist", "im", "dem", "nicht", "ein", "eine", "als", "auch", "es", "an", "werden", "aus", "er",
    "hat", "dass", "sie", "nach",
];

fn document(rng: &mut Rng, vocab: &[String], function_words: &[&str]) -> String {
    // Square of a uniform draw: common words much more often than rare ones.
    let zipf = |rng: &mut Rng, n: usize| {
        let r = rng.below(1 << 16) as f64 / 65536.0;
        (r * r * n as f64) as usize
    };
    let mut text = String::new();
    let paragraphs = 2 + rng.below(8);
    for p in 0..paragraphs {
        if p > 0 && rng.below(3) == 0 {
            text.push_str("## ");
            text.push_str(&vocab[rng.below(500) as usize]);
            text.push_str("\n\n");
        }
        for _ in 0..2 + rng.below(6) {
            let words = 6 + rng.below(18);
            for w in 0..words {
                let word = if rng.below(100) < 45 {
                    function_words[zipf(rng, function_words.len())]
                } else {
                    &vocab[zipf(rng, vocab.len())]
                };
                if w == 0 {
                    let mut c = word.chars();
                    text.extend(c.next().map(|f| f.to_ascii_uppercase()));
                    text.push_str(c.as_str());
                } else {
                    text.push(' ');
                    text.push_str(word);
                }
            }
            text.push_str(". ");
        }
        text.push_str("\n\n");
    }
    text
}

/// The next document and its metadata language, with what web text has for the rules to
/// find: about 1% exact and 1% near copies (one word in 60 replaced, Jaccard about 0.85) of
/// the previous document, 20% with a cookie notice or a copyright footer, 2% too short (and
/// distinct), 2% German left to the detector, 1% marked German in metadata. The rest states no
/// language, as Dolma's documents do not.
fn next_document(rng: &mut Rng, vocab: &[String], last: &str) -> (String, Option<&'static str>) {
    let (function_words, lang): (&[&str], _) = match rng.below(100) {
        0 => (&ENGLISH, Some("de")),
        1 | 2 => (&GERMAN, None),
        _ => (&ENGLISH, None),
    };
    let mut text = match rng.below(100) {
        0 if !last.is_empty() => last.to_string(),
        1 if !last.is_empty() => last
            .split(' ')
            .map(|w| {
                if rng.below(60) == 0 {
                    vocab[rng.below(vocab.len() as u64) as usize].as_str()
                } else {
                    w
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        2 | 3 => {
            let mut word = || vocab[rng.below(vocab.len() as u64) as usize].as_str();
            format!("The {} {} is {}.\n", word(), word(), word())
        }
        _ => document(rng, vocab, function_words),
    };
    match rng.below(10) {
        0 => text.insert_str(
            0,
            "We use cookies to improve your experience. Accept all cookies\n",
        ),
        1 => text.push_str("\n© 2024 Example Ltd. All rights reserved."),
        _ => {}
    }
    (text, lang)
}

/// Writes the corpus unless it is there; returns the files and the bytes of text in them.
fn corpus(megabytes: u64) -> (Vec<PathBuf>, u64) {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-corpus/{megabytes}mb-v3"));
    let done = dir.join("DONE");
    if let Ok(text) = std::fs::read_to_string(&done) {
        let files = (0..FILES)
            .map(|f| dir.join(format!("shard-{f:02}.jsonl.gz")))
            .collect();
        return (files, text.trim().parse().unwrap());
    }
    std::fs::create_dir_all(&dir).unwrap();
    let vocab = vocabulary();
    let per_file = megabytes * 1_000_000 / FILES as u64;
    let started = Instant::now();
    let totals: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..FILES)
            .map(|f| {
                let (dir, vocab) = (&dir, &vocab);
                s.spawn(move || {
                    let mut rng = Rng(0x9e3779b97f4a7c15 ^ (f as u64 + 1));
                    let file =
                        std::fs::File::create(dir.join(format!("shard-{f:02}.jsonl.gz"))).unwrap();
                    let mut gz = flate2::write::GzEncoder::new(
                        std::io::BufWriter::new(file),
                        flate2::Compression::fast(),
                    );
                    let (mut bytes, mut n, mut last) = (0u64, 0u64, String::new());
                    while bytes < per_file {
                        let (text, lang) = next_document(&mut rng, vocab, &last);
                        bytes += text.len() as u64;
                        let metadata = match lang {
                            Some(lang) => serde_json::json!({"lang": lang}),
                            None => serde_json::json!({}),
                        };
                        let line = serde_json::json!({
                            "id": format!("f{f:02}-{n:08}"), "text": text, "source": "bench",
                            "added": "2024-01-01", "created": "2023-06-01", "metadata": metadata,
                        });
                        writeln!(gz, "{line}").unwrap();
                        last = text;
                        n += 1;
                    }
                    gz.finish().unwrap().flush().unwrap();
                    bytes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: u64 = totals.iter().sum();
    std::fs::write(&done, total.to_string()).unwrap();
    eprintln!(
        "generated {:.0} MB of text in {:.0}s",
        total as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    (corpus(megabytes).0, total)
}

/// Decode and re-encode only: the floor prepare cannot beat with the same formats.
fn floor(files: &[PathBuf], threads: usize) -> f64 {
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(path) = files.get(i) else { break };
                    let reader = BufReader::with_capacity(
                        1 << 20,
                        flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap()),
                    );
                    let schema = Arc::new(Schema::new(vec![
                        Field::new("id", DataType::Utf8, true),
                        Field::new("text", DataType::Utf8, true),
                    ]));
                    let props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(
                            ZstdLevel::try_new(backforth::root::objects::PART_ZSTD_LEVEL).unwrap(),
                        ))
                        .build();
                    let mut writer =
                        ArrowWriter::try_new(std::io::sink(), schema.clone(), Some(props)).unwrap();
                    let (mut ids, mut texts) = (Vec::new(), Vec::new());
                    for line in reader.lines() {
                        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                        ids.push(v["id"].as_str().unwrap().to_string());
                        texts.push(v["text"].as_str().unwrap().to_string());
                        if ids.len() == 8192 {
                            write(&mut writer, &schema, &mut ids, &mut texts);
                        }
                    }
                    write(&mut writer, &schema, &mut ids, &mut texts);
                    writer.close().unwrap();
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn write(
    writer: &mut ArrowWriter<std::io::Sink>,
    schema: &Arc<Schema>,
    ids: &mut Vec<String>,
    texts: &mut Vec<String>,
) {
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(std::mem::take(ids))),
            Arc::new(StringArray::from(std::mem::take(texts))),
        ],
    )
    .unwrap();
    writer.write(&batch).unwrap();
}

fn main() {
    let megabytes: u64 = std::env::var("PREPARE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (files, text_bytes) = corpus(megabytes);
    let mb = text_bytes as f64 / 1e6;
    println!("corpus: {mb:.0} MB of text in {FILES} gzip JSONL files; {threads} cores");

    let only_decontaminate = std::env::var("ONLY").is_ok_and(|o| o == "decontaminate");
    if only_decontaminate {
        let dir = tempfile::tempdir().unwrap();
        decontamination(dir.path(), &files, mb);
        return;
    }
    let floor_before = floor(&files, threads);
    println!(
        "floor (gunzip + JSON + zstd Parquet, {threads} threads): {floor_before:.1}s, {:.0} MB/s",
        mb / floor_before
    );

    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<String> = files
        .iter()
        .map(|f| format!("\"{}\"", f.display()))
        .collect();
    let job = |name: &str, prepare: &str, stages: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        let body = format!(
            "output = \"{name}\"\n[input]\npaths = [{}]\n{prepare}{stages}",
            inputs.join(", ")
        );
        std::fs::write(&path, body).unwrap();
        path
    };
    let candidates = "[[stages]]\nname = \"candidates\"\n";

    let default = job("default", "", candidates);
    let run = step("prepare, default rules", &default, "candidates", mb);

    // Every quality rule, boilerplate stripped, MinHash signatures, then the near-dedup pass.
    let all = job(
        "all",
        ALL_RULES,
        &format!("{candidates}[[stages]]\nname = \"deduped\"\n"),
    );
    let rules = step("prepare, every rule + MinHash", &all, "candidates", mb);
    let dedup = step("near-dedup pass", &all, "deduped", mb);
    let total = rules.seconds + dedup.seconds;
    println!(
        "every rule + near-dedup: {total:.1}s, {:.0} MB/s",
        mb / total
    );

    // The machine's speed drifts within minutes: the ratios are to the floor timed before and
    // after the runs.
    let floor_after = floor(&files, threads);
    let floor_s = (floor_before + floor_after) / 2.0;
    println!(
        "floor again: {floor_after:.1}s; ratios to their mean, {floor_s:.1}s: default {:.2}x, \
         every rule {:.2}x, every rule + near-dedup {:.2}x",
        run.seconds / floor_s,
        rules.seconds / floor_s,
        total / floor_s
    );
    decontamination(dir.path(), &files, mb);
}

/// Items of 112 words from the corpus's vocabulary, 100 13-grams each, until `grams`; written
/// once beside the corpus.
fn benchmark_set(grams: u64) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/bench-corpus/benchmark-{grams}.jsonl"));
    if path.exists() {
        return path;
    }
    let vocab = vocabulary();
    let mut rng = Rng(0xbe4c);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..grams.div_ceil(100) {
        let words: Vec<&str> = (0..112)
            .map(|_| vocab[rng.below(vocab.len() as u64) as usize].as_str())
            .collect();
        let line = serde_json::json!({"id": format!("item-{i}"), "question": words.join(" ")});
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
    path
}

/// The `decontaminated` stage over the corpus's candidates, against a generated benchmark
/// set: index build time (from the run's log), the stage's MB/s of candidate text, peak RSS.
fn decontamination(dir: &Path, files: &[PathBuf], mb: f64) {
    let grams: u64 = std::env::var("BENCH_NGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let set = benchmark_set(grams);
    let inputs: Vec<String> = files
        .iter()
        .map(|f| format!("\"{}\"", f.display()))
        .collect();
    let job = dir.join("decontaminate.toml");
    std::fs::write(
        &job,
        format!(
            "output = \"decontaminate\"\n[input]\npaths = [{}]\n\
             [decontaminate]\n[[decontaminate.benchmarks]]\nname = \"generated\"\n\
             paths = [\"{}\"]\nfields = [\"question\"]\nid = \"id\"\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"decontaminated\"\n",
            inputs.join(", "),
            set.display()
        ),
    )
    .unwrap();
    timed(dir, &job, "candidates");
    let log = dir.join("decontaminate.log");
    let run = timed_logged(dir, &job, "decontaminated", &log);
    let index_line = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find(|l| l.contains("Benchmark index built"))
        .map(str::to_string)
        .unwrap_or_default();
    let field = |name: &str| {
        index_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .trim_matches('"')
            .to_string()
    };
    let marker = success(&dir.join("decontaminate"), "decontaminated");
    println!(
        "decontamination, {} benchmark 13-grams from {} items: index built in {}s; stage {:.1}s, \
         {:.0} MB/s of the corpus, CPU {:.0}s, peak RSS {:.0} MiB; {} rows in, {} kept",
        field("ngrams"),
        field("items"),
        field("seconds"),
        run.seconds,
        mb / run.seconds,
        run.cpu,
        run.rss_mib,
        marker["rows_in"],
        marker["rows_out"]
    );
}

/// The `[prepare]` tables of the every-rule run: the thresholds the README suggests.
const ALL_RULES: &str = "[prepare.quality]\nlanguages = [\"en\"]\nmin_words = 50\n\
    max_symbol_ratio = 0.1\nmax_non_alpha_words = 0.2\nmin_punctuated_lines = 0.5\n\
    max_repeated_lines = 0.3\nmax_repeated_paragraphs = 0.3\nboilerplate = \"strip\"\n\
    [prepare.near_dedup]\n";

/// Runs one stage of `job` and prints its time, MB/s of the input's text, CPU, peak RSS and
/// what it kept and dropped.
fn step(label: &str, job: &Path, stage: &str, mb: f64) -> Timed {
    let dir = job.parent().unwrap();
    let run = timed(dir, job, stage);
    let output = dir.join(job.file_stem().unwrap());
    let marker = success(&output, stage);
    println!(
        "{label} ({stage}): {:.1}s, {:.0} MB/s, CPU {:.0}s, peak RSS {:.0} MiB; {} rows in, {} kept, dropped {}",
        run.seconds,
        mb / run.seconds,
        run.cpu,
        run.rss_mib,
        marker["rows_in"],
        marker["rows_out"],
        marker["dropped"]
    );
    run
}

/// Wall time, CPU and peak RSS of one `backforth run`.
struct Timed {
    seconds: f64,
    cpu: f64,
    rss_mib: f64,
}

fn timed(dir: &Path, job: &Path, stages: &str) -> Timed {
    run_timed(dir, job, stages, None)
}

/// [`timed`], with the run's info log written to `log`.
fn timed_logged(dir: &Path, job: &Path, stages: &str, log: &Path) -> Timed {
    run_timed(dir, job, stages, Some(log))
}

fn run_timed(dir: &Path, job: &Path, stages: &str, log: Option<&Path>) -> Timed {
    let report = dir.join("time.txt");
    let started = Instant::now();
    let mut command = Command::new("/usr/bin/time");
    command
        .args(["-f", "%U %S %M", "-o", report.to_str().unwrap()])
        .arg(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", job.to_str().unwrap(), "--stages", stages])
        .env("BACKFORTH_LOG", if log.is_some() { "info" } else { "warn" });
    if let Some(log) = log {
        command.stderr(std::fs::File::create(log).unwrap());
    }
    let status = command.status().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success());
    let t: Vec<f64> = std::fs::read_to_string(&report)
        .unwrap()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Timed {
        seconds,
        cpu: t[0] + t[1],
        rss_mib: t[2] / 1024.0,
    }
}

/// A finished stage's `_SUCCESS` marker.
fn success(output: &Path, stage: &str) -> serde_json::Value {
    let marker = std::fs::read_to_string(output.join(stage).join("_SUCCESS")).unwrap();
    serde_json::from_str(&marker).unwrap()
}
