//! Near-duplicate removal: MinHash signatures over word n-grams, LSH banding to find
//! candidate pairs, a check of each pair's estimated Jaccard similarity, and clusters by
//! union-find keeping the smallest id of each.
//!
//! Two passes, so any number of workers agree: signatures are computed per shard in the
//! input stage (a `minhash` column), then every worker reads all signatures and computes the
//! same clusters, since nothing depends on shard order (documents are taken in id order).

use std::collections::HashMap;

use serde::Serialize;

use crate::text;

/// Near-dedup settings (`[prepare.near_dedup]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NearDedup {
    /// LSH bands; `bands * rows` hash functions make a signature.
    pub bands: usize,
    /// Hash values per band.
    pub rows: usize,
    /// Words per shingle.
    pub ngram: usize,
    /// Estimated Jaccard similarity at which two documents are duplicates.
    pub threshold: f64,
}

impl Default for NearDedup {
    /// 32 bands of 4: a pair at Jaccard 0.8 shares a band with probability above 0.9999; the
    /// 128-value estimate then accepts it at 0.75 about 92% of the time, and above 0.85
    /// nearly always, while pairs at 0.6 are almost never merged.
    fn default() -> Self {
        Self {
            bands: 32,
            rows: 4,
            ngram: 5,
            threshold: 0.75,
        }
    }
}

impl NearDedup {
    /// Hash functions per signature.
    pub fn num_perm(&self) -> usize {
        self.bands * self.rows
    }
}

const MERSENNE_61: u64 = (1 << 61) - 1;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e3779b97f4a7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv1a_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV_OFFSET, bytes)
}

/// FNV-1a of the words joined by single spaces, without building the joined string.
fn shingle_hash(words: &[String]) -> u64 {
    words.iter().enumerate().fold(FNV_OFFSET, |h, (i, w)| {
        let h = if i == 0 { h } else { fnv1a_extend(h, b" ") };
        fnv1a_extend(h, w.as_bytes())
    })
}

/// The permutations `(a * x + b) mod (2^61 - 1)`, fixed for every run and machine.
fn permutations(n: usize) -> Vec<(u64, u64)> {
    let mut state = 0x6261636b666f7274; // "backfort"
    (0..n)
        .map(|_| {
            let a = splitmix64(&mut state) % (MERSENNE_61 - 1) + 1;
            let b = splitmix64(&mut state) % MERSENNE_61;
            (a, b)
        })
        .collect()
}

fn mod_mersenne(x: u128) -> u64 {
    let folded = (x & MERSENNE_61 as u128) + (x >> 61);
    let folded = (folded & MERSENNE_61 as u128) + (folded >> 61);
    (folded as u64) % MERSENNE_61
}

/// The MinHash signature of `text`: for each hash function, the smallest hash over the
/// text's lower-cased word n-grams (the whole text is one shingle when it is shorter).
pub fn signature(text: &str, params: &NearDedup) -> Vec<u32> {
    let words = text::words(text);
    let n = params.ngram.max(1);
    let shingles: Vec<u64> = if words.len() <= n {
        vec![shingle_hash(&words)]
    } else {
        words.windows(n).map(shingle_hash).collect()
    };
    permutations(params.num_perm())
        .into_iter()
        .map(|(a, b)| {
            shingles
                .iter()
                .map(|&x| mod_mersenne(a as u128 * x as u128 + b as u128) as u32)
                .min()
                .unwrap_or(u32::MAX)
        })
        .collect()
}

/// The share of positions where two signatures agree: an estimate of Jaccard similarity.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// A document found to duplicate another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Duplicate {
    /// The duplicate's id.
    pub id: String,
    /// The id kept for its cluster (the smallest).
    pub kept_id: String,
    /// Estimated similarity to the document it was matched with.
    pub similarity: f64,
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Members of an LSH bucket compared with a newcomer before it starts its own entry: enough
/// for chains of edits, bounded so a bucket of thousands of copies stays linear.
const BUCKET_PROBES: usize = 8;

/// Clusters of near-duplicates among `docs` (id, signature); every document but the
/// smallest id of its cluster is returned. The result does not depend on the input order.
pub fn duplicates(mut docs: Vec<(String, Vec<u32>)>, params: &NearDedup) -> Vec<Duplicate> {
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    docs.dedup_by(|a, b| a.0 == b.0);
    let mut parent: Vec<usize> = (0..docs.len()).collect();
    let mut matched: Vec<f64> = vec![0.0; docs.len()];
    let rows = params.rows.max(1);
    for band in 0..params.bands {
        let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, (_, sig)) in docs.iter().enumerate() {
            let Some(values) = sig.get(band * rows..(band + 1) * rows) else {
                continue;
            };
            let key = values.iter().fold(fnv1a(&band.to_le_bytes()), |h, v| {
                (h ^ *v as u64).wrapping_mul(0x100000001b3)
            });
            let bucket = buckets.entry(key).or_default();
            for &j in bucket.iter().take(BUCKET_PROBES) {
                let sim = estimated_jaccard(sig, &docs[j].1);
                if sim >= params.threshold {
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    if ri != rj {
                        // The smaller index (smaller id) is the root, so it is the one kept.
                        let (low, high) = (ri.min(rj), ri.max(rj));
                        parent[high] = low;
                    }
                    matched[i] = matched[i].max(sim);
                    matched[j] = matched[j].max(sim);
                    break;
                }
            }
            if bucket.len() < BUCKET_PROBES {
                bucket.push(i);
            }
        }
    }
    (0..docs.len())
        .filter_map(|i| {
            let root = find(&mut parent, i);
            (root != i).then(|| Duplicate {
                id: docs[i].0.clone(),
                kept_id: docs[root].0.clone(),
                similarity: matched[i],
            })
        })
        .collect()
}
