//! Candidate preparation against the floor of its I/O: a generated Dolma-like corpus
//! (gzip JSONL, deterministic, `PREPARE_MB` megabytes of text, default 1,024) is prepared by
//! `backforth run --stages candidates` (document mode, the default job's rules and token
//! limit), and, as the floor, only decoded and re-encoded: gunzip, JSON parsing, and the text
//! written as zstd Parquet, on every core. Printed: MB/s of input text for both, the ratio,
//! and the peak RSS of the prepare run (through `/usr/bin/time`).
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

#[path = "../tests/it/rng.rs"]
mod rng;

use rng::Rng;

const FILES: usize = 16;

/// A vocabulary of pronounceable words with a Zipf-like draw, so token counts and dedup keys
/// behave like prose rather than noise.
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

fn document(rng: &mut Rng, vocab: &[String]) -> String {
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
                // Square of a uniform draw: common words much more often than rare ones.
                let r = rng.below(1 << 16) as f64 / 65536.0;
                let word = &vocab[(r * r * vocab.len() as f64) as usize];
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

/// Writes the corpus unless it is there; returns the files and the bytes of text in them.
fn corpus(megabytes: u64) -> (Vec<PathBuf>, u64) {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-corpus/{megabytes}mb"));
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
                    let file = std::fs::File::create(dir.join(format!("shard-{f:02}.jsonl.gz"))).unwrap();
                    let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
                    let (mut bytes, mut n, mut last) = (0u64, 0u64, String::new());
                    while bytes < per_file {
                        // About 1% exact copies of the previous document.
                        let text = if !last.is_empty() && rng.below(100) == 0 { last.clone() } else { document(&mut rng, vocab) };
                        bytes += text.len() as u64;
                        let line = serde_json::json!({
                            "id": format!("f{f:02}-{n:08}"), "text": text, "source": "bench",
                            "added": "2024-01-01", "created": "2023-06-01", "metadata": {"lang": "en"},
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
                            ZstdLevel::try_new(backforth::pipeline::PART_ZSTD_LEVEL).unwrap(),
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

    let floor_s = floor(&files, threads);
    println!(
        "floor (gunzip + JSON + zstd Parquet, {threads} threads): {floor_s:.1}s, {:.0} MB/s",
        mb / floor_s
    );

    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("prepare.toml");
    let inputs: Vec<String> = files
        .iter()
        .map(|f| format!("\"{}\"", f.display()))
        .collect();
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = [{}]\n[[stages]]\nname = \"candidates\"\n",
            inputs.join(", ")
        ),
    )
    .unwrap();
    let report = dir.path().join("time.txt");
    let started = Instant::now();
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%U %S %M", "-o", report.to_str().unwrap()])
        .arg(env!("CARGO_BIN_EXE_backforth"))
        .args(["run", job.to_str().unwrap()])
        .env("BACKFORTH_LOG", "warn")
        .status()
        .unwrap();
    let prepare_s = started.elapsed().as_secs_f64();
    assert!(status.success());
    let t: Vec<f64> = std::fs::read_to_string(&report)
        .unwrap()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let marker: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/candidates/_SUCCESS")).unwrap(),
    )
    .unwrap();
    println!(
        "prepare (backforth run --stages candidates): {prepare_s:.1}s, {:.0} MB/s, CPU {:.0}s, peak RSS {:.0} MiB; {} documents, {} kept, dropped {}",
        mb / prepare_s,
        t[0] + t[1],
        t[2] / 1024.0,
        marker["input"]["documents"],
        marker["rows_out"],
        marker["dropped"]
    );
    println!(
        "prepare / floor: {:.2}x the floor's time",
        prepare_s / floor_s
    );
}
