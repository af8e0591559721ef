//! Near-duplicate removal: planted copies at known Jaccard similarity are found, unrelated
//! and half-similar documents are not merged, and the clusters are the same whatever the
//! order of the input, the shard size or the worker split.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use backforth::prepare::minhash::{
    BASE, NearDedup, Shingles, Signatures, duplicates, signature, word_hash, word_hashes,
};

use crate::support::rng::Rng;
use crate::support::util::{backforth_ok, rows, session};

fn document(rng: &mut Rng, words: usize) -> Vec<String> {
    (0..words)
        .map(|_| format!("w{}", rng.below(5000)))
        .collect()
}

/// `base` with `k` words replaced by words no document uses.
fn edited(rng: &mut Rng, base: &[String], k: usize) -> Vec<String> {
    let mut out = base.to_vec();
    for i in 0..k {
        let at = rng.below(out.len() as u64) as usize;
        out[at] = format!("fresh{i}x{}", rng.below(1_000_000));
    }
    out
}

/// Exact Jaccard similarity of the word 5-gram sets.
fn jaccard(a: &[String], b: &[String]) -> f64 {
    let grams = |w: &[String]| -> HashSet<String> { w.windows(5).map(|g| g.join(" ")).collect() };
    let (a, b) = (grams(a), grams(b));
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

struct Planted {
    docs: Vec<(String, Vec<String>)>,
    /// duplicate id -> the id its cluster keeps
    expected: BTreeMap<String, String>,
}

/// Six unrelated documents; near copies of the first two at about 0.9 and 0.85, a copy of
/// the first copy (a chain), and a copy of the third at about 0.5 that must stay.
fn planted() -> Planted {
    let mut rng = Rng(0x5eed);
    let base: Vec<Vec<String>> = (0..6).map(|_| document(&mut rng, 300)).collect();
    let near_a = edited(&mut rng, &base[0], 3);
    let near_b = edited(&mut rng, &base[1], 5);
    let chain = edited(&mut rng, &near_a, 3);
    let half = edited(&mut rng, &base[2], 28);
    let (ja, jb, jc, jh) = (
        jaccard(&base[0], &near_a),
        jaccard(&base[1], &near_b),
        jaccard(&near_a, &chain),
        jaccard(&base[2], &half),
    );
    assert!((0.88..0.95).contains(&ja), "planted at {ja}");
    assert!((0.8..0.9).contains(&jb), "planted at {jb}");
    assert!((0.88..0.95).contains(&jc), "planted at {jc}");
    assert!((0.4..0.6).contains(&jh), "planted at {jh}");
    let mut docs: Vec<(String, Vec<String>)> = base
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("doc-0{i}"), d))
        .collect();
    docs.push(("doc-50".into(), near_a));
    docs.push(("doc-51".into(), near_b));
    docs.push(("doc-52".into(), chain));
    docs.push(("doc-53".into(), half));
    let expected = [
        ("doc-50", "doc-00"),
        ("doc-51", "doc-01"),
        ("doc-52", "doc-00"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    Planted { docs, expected }
}

fn found(
    docs: &[(String, Vec<String>)],
    order: impl Fn(usize) -> usize,
) -> BTreeMap<String, String> {
    let params = NearDedup::default();
    let mut input: Vec<(String, Vec<u32>)> = docs
        .iter()
        .map(|(id, words)| (id.clone(), signature(&words.join(" "), &params)))
        .collect();
    input.sort_by_key(|(id, _)| order(id.bytes().map(|b| b as usize).sum()));
    let mut sigs = Signatures::new(params.num_perm());
    for (id, sig) in &input {
        assert!(sigs.push(id, sig));
    }
    duplicates(&sigs, &params)
        .into_iter()
        .map(|d| (d.id, d.kept_id))
        .collect()
}

#[test]
fn planted_near_duplicates_are_found_and_unrelated_documents_are_not_merged() {
    let planted = planted();
    assert_eq!(found(&planted.docs, |k| k), planted.expected);
    // Any input order gives the same clusters.
    assert_eq!(found(&planted.docs, |k| usize::MAX - k), planted.expected);
    assert_eq!(found(&planted.docs, |k| k * 7919 % 101), planted.expected);
    // The same text with other spacing and case is the same signature.
    let params = NearDedup::default();
    assert_eq!(
        signature("The cat sat  on the MAT today", &params),
        signature("the cat sat on the mat\ntoday", &params)
    );
}

fn write_corpus(dir: &Path, docs: &[(String, Vec<String>)], files: usize) -> Vec<String> {
    let mut paths = Vec::new();
    for f in 0..files {
        let path = dir.join(format!("part-{f}.jsonl"));
        let mut body = String::new();
        for (i, (id, words)) in docs.iter().enumerate() {
            if i % files == f {
                body.push_str(&serde_json::json!({"id": id, "text": words.join(" ")}).to_string());
                body.push('\n');
            }
        }
        std::fs::write(&path, body).unwrap();
        paths.push(path.to_str().unwrap().to_string());
    }
    paths
}

fn write_job(dir: &Path, shard_rows: usize) -> String {
    let job = dir.join(format!("dedup-{shard_rows}.toml"));
    std::fs::write(
        &job,
        format!(
            "output = \"out\"\n[input]\npaths = []\n[prepare.near_dedup]\n\
             [execution]\nshard_rows = {shard_rows}\n\
             [[stages]]\nname = \"candidates\"\n[[stages]]\nname = \"deduped\"\n"
        ),
    )
    .unwrap();
    job.to_str().unwrap().to_string()
}

async fn dropped(root: &Path) -> BTreeMap<String, String> {
    let ctx = session(root).await;
    let kept: BTreeSet<String> = rows(&ctx, "SELECT doc_id FROM deduped")
        .await
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let out: BTreeMap<String, String> = rows(
        &ctx,
        "SELECT doc_id, near_duplicate_of, drop_reason FROM deduped_dropped",
    )
    .await
    .into_iter()
    .map(|r| {
        assert_eq!(r[2], "near_duplicate");
        (r[0].clone(), r[1].trim_end_matches("#0").to_string())
    })
    .collect();
    assert_eq!(
        kept.len() + out.len(),
        10,
        "every candidate kept or dropped once"
    );
    out
}

/// Signatures are random numbers: written without a dictionary and without compression; the
/// dedup key, text and ids, unique per row, without a dictionary.
fn signatures_are_stored_plain(stage: &Path) {
    use datafusion::parquet::basic::{Compression, Encoding};
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let parts: Vec<_> = std::fs::read_dir(stage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!parts.is_empty());
    for part in parts {
        let reader = SerializedFileReader::new(std::fs::File::open(&part).unwrap()).unwrap();
        for group in reader.metadata().row_groups() {
            let column = |path: &str| {
                group
                    .columns()
                    .iter()
                    .find(|c| c.column_path().string() == path)
                    .unwrap_or_else(|| panic!("a {path} column in {part:?}"))
            };
            assert_eq!(
                column("minhash.list.item").compression(),
                Compression::UNCOMPRESSED
            );
            for path in ["minhash.list.item", "dedup_key", "text", "id", "doc_id"] {
                assert!(
                    !column(path)
                        .encodings()
                        .any(|e| e == Encoding::RLE_DICTIONARY),
                    "{path} in {part:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_are_the_same_whatever_the_shard_order_or_worker_split() {
    let planted = planted();
    let dir = tempfile::tempdir().unwrap();
    let inputs = write_corpus(dir.path(), &planted.docs, 3);
    let run = |job: &str, root: &Path, inputs: &[String], extra: &[&str]| {
        let mut args = vec!["run", job, "--output", root.to_str().unwrap()];
        for input in inputs {
            args.extend(["--input", input.as_str()]);
        }
        args.extend_from_slice(extra);
        backforth_ok(&args);
    };

    let one = dir.path().join("one");
    run(&write_job(dir.path(), 4), &one, &inputs, &[]);
    assert_eq!(dropped(&one).await, planted.expected);
    signatures_are_stored_plain(&one.join("candidates"));

    // The files in the opposite order and smaller shards.
    let reversed: Vec<String> = inputs.iter().rev().cloned().collect();
    let other = dir.path().join("reversed");
    run(&write_job(dir.path(), 2), &other, &reversed, &[]);
    assert_eq!(dropped(&other).await, planted.expected);

    // Two workers sharing one root, each computing the clusters from every signature.
    let split = dir.path().join("split");
    let job = write_job(dir.path(), 2);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(&job, &split, &inputs, &["--worker", "0/2"]));
        let b = s.spawn(|| run(&job, &split, &inputs, &["--worker", "1/2"]));
        (a.join(), b.join())
    });
    a.unwrap();
    b.unwrap();
    assert_eq!(dropped(&split).await, planted.expected);
}

/// Detection rate and estimate error over many pairs whose exact Jaccard similarity falls in
/// `band` (edits drawn from `edits`).
fn rates(seed: u64, edits: std::ops::Range<u64>, band: std::ops::Range<f64>) -> (f64, f64, usize) {
    let params = NearDedup::default();
    let mut rng = Rng(seed);
    let (mut pairs, mut merged, mut error) = (0, 0, 0.0);
    while pairs < 300 {
        let base = document(&mut rng, 300);
        let k = edits.start + rng.below(edits.end - edits.start);
        let near = edited(&mut rng, &base, k as usize);
        let exact = jaccard(&base, &near);
        if !band.contains(&exact) {
            continue;
        }
        let (a, b) = (
            signature(&base.join(" "), &params),
            signature(&near.join(" "), &params),
        );
        error += (backforth::prepare::minhash::estimated_jaccard(&a, &b) - exact).abs();
        let mut sigs = Signatures::new(params.num_perm());
        assert!(sigs.push("a", &a) && sigs.push("b", &b));
        let found = duplicates(&sigs, &params);
        merged += usize::from(!found.is_empty());
        pairs += 1;
    }
    (merged as f64 / pairs as f64, error / pairs as f64, pairs)
}

/// The figures the README quotes for the default 32 x 4 bins and threshold 0.75.
#[test]
fn detection_rates_at_known_similarity_match_the_documented_ones() {
    let (high, high_err, _) = rates(1, 2..4, 0.85..1.0);
    let (at_08, err_08, _) = rates(2, 5..9, 0.78..0.82);
    let (at_06, err_06, _) = rates(3, 12..20, 0.57..0.63);
    eprintln!(
        "merged: J>=0.85 {high:.3}, J~0.8 {at_08:.3}, J~0.6 {at_06:.3}; \
         mean |estimate - J|: {high_err:.3}, {err_08:.3}, {err_06:.3}"
    );
    assert!(high >= 0.99, "pairs above 0.85 merged {high}");
    assert!((0.8..=0.99).contains(&at_08), "pairs at 0.8 merged {at_08}");
    assert!(at_06 <= 0.01, "pairs at 0.6 merged {at_06}");
    // 128 bins: the estimate's standard error is sqrt(J(1-J)/128), about 0.035 at 0.8.
    for err in [high_err, err_08, err_06] {
        assert!(err < 0.04, "mean estimate error {err}");
    }
}

/// Forty near copies of one document (each two edits from it) and twenty exact copies of
/// another: more members than a bucket compares, still one cluster each, kept at the
/// smallest id; a signature of the wrong width is refused.
#[test]
fn families_larger_than_a_bucket_are_one_cluster_each() {
    let params = NearDedup::default();
    let mut rng = Rng(0xfa4);
    let (first, second) = (document(&mut rng, 300), document(&mut rng, 300));
    let mut sigs = Signatures::new(params.num_perm());
    // Added out of id order: the result is by id.
    for copy in (0..40).rev() {
        let text = edited(&mut rng, &first, 2).join(" ");
        assert!(sigs.push(&format!("a{copy:02}"), &signature(&text, &params)));
    }
    for copy in 0..20 {
        assert!(sigs.push(
            &format!("b{copy:02}"),
            &signature(&second.join(" "), &params)
        ));
    }
    assert!(!sigs.push("short", &[1, 2, 3]));
    let found = duplicates(&sigs, &params);
    assert_eq!(found.len(), 39 + 19);
    for d in &found {
        let kept = if d.id.starts_with('a') { "a00" } else { "b00" };
        assert_eq!(d.kept_id, kept, "{}", d.id);
        assert!(d.similarity >= params.threshold);
    }
}

#[test]
fn words_are_hashed_as_text_words_cuts_them() {
    let texts = [
        "The cat's  toys -- 'quoted' words'' and ''leading, 42nd x'y'z '''",
        "Ünïcode ÉCOLE straße 東京 tower, naïve café; ÅNGSTRÖM İstanbul",
        "tabs\tand\nnewlines\r\nmixed\u{a0}nbsp 1,000.5 e-mail a@b.c",
        "",
        "'''",
        "a",
        "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGH abcdefg",
        // Runs of ASCII that start after other bytes of their word, off the 8-byte grid.
        "x'ABCDEFGHIJKLMNOPQRS éabcdefghijklmnopq Don'tStopBelievingNow",
    ];
    // Words of every length around the 16-byte windows the scan reads, inside and at the end.
    let lengths: Vec<String> = (1..=49)
        .map(|n| {
            let word: String = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            format!("{word}.{word}9 {word}")
        })
        .collect();
    for text in texts
        .iter()
        .copied()
        .chain(lengths.iter().map(String::as_str))
    {
        let mut streamed = Vec::new();
        word_hashes(text, |h| streamed.push(h));
        let expected: Vec<u64> = backforth::prepare::segment::words(text)
            .iter()
            .map(|w| word_hash(w))
            .collect();
        assert_eq!(streamed, expected, "{text:?}");
    }
}

#[test]
fn rolling_shingle_hashes_equal_hashes_of_each_window() {
    let words: Vec<u64> = (1..=40u64).map(|i| word_hash(&format!("w{i}"))).collect();
    for n in 1..=7 {
        let mut shingles = Shingles::new(n);
        for (at, &w) in words.iter().enumerate() {
            let direct = (at + 1 >= n).then(|| {
                words[at + 1 - n..=at]
                    .iter()
                    .fold(0u64, |h, &w| h.wrapping_mul(BASE).wrapping_add(w))
            });
            assert_eq!(shingles.push(w), direct, "n {n}, word {at}");
        }
        assert_eq!(shingles.short_text(), None);
    }
    let mut short = Shingles::new(5);
    short.push(words[0]);
    short.push(words[1]);
    assert!(short.short_text().is_some());
}

#[test]
fn every_bin_is_filled_and_equal_texts_agree() {
    let params = NearDedup::default();
    for text in ["", "one", "two words", "a b c d e f g h i j k l m n o p"] {
        let sig = signature(text, &params);
        assert_eq!(sig.len(), params.num_perm());
        assert_eq!(sig, signature(&text.to_uppercase(), &params), "{text:?}");
    }
    // A long text fills nearly every bin itself: its values are not a few copied ones.
    let long: String = (0..2000)
        .map(|i| format!("w{} ", i * 7919 % 10007))
        .collect();
    let distinct: std::collections::HashSet<u32> = signature(&long, &params).into_iter().collect();
    assert!(distinct.len() > 120, "{} distinct values", distinct.len());
}
