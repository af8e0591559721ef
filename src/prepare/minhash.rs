//! Near-duplicate removal: MinHash signatures over word n-grams, LSH banding to find
//! candidate pairs, a check of each pair's estimated Jaccard similarity, and clusters by
//! union-find keeping the smallest id of each.
//!
//! Two passes, so any number of workers agree: signatures are computed per shard in the
//! input stage (a `minhash` column), then every worker reads all signatures and computes the
//! same clusters, since nothing depends on shard order (documents are taken in id order).

use serde::Serialize;

use crate::prepare::bytes::ByteKinds;

/// Near-dedup settings (`[prepare.near_dedup]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NearDedup {
    /// LSH bands; a signature holds `bands * rows` values.
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
    /// A plan error naming the setting that cannot work: no bands, rows or words per
    /// shingle, or a threshold outside (0, 1].
    pub fn check(&self) -> crate::error::Result<()> {
        for (name, value) in [
            ("bands", self.bands),
            ("rows", self.rows),
            ("ngram", self.ngram),
        ] {
            if value == 0 {
                return crate::job_error!("[prepare.near_dedup] {name} = 0: it must be at least 1");
            }
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return crate::job_error!(
                "[prepare.near_dedup] threshold = {} is not an estimated Jaccard similarity in (0, 1]",
                self.threshold
            );
        }
        Ok(())
    }

    /// Values per signature (the bins of one-permutation hashing).
    pub fn num_perm(&self) -> usize {
        self.bands * self.rows
    }
}

/// The FNV-1a offset basis, used to seed band keys.
const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Murmur3's 64-bit finaliser: every input bit reaches every output bit, so the bin and the
/// value taken from one shingle hash are independent.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^ (h >> 33)
}

const MIX: u64 = 0x9e3779b97f4a7c15;

/// The hash of one word already cut and lower-cased, as [`word_hashes`] hashes it.
pub fn word_hash(word: &str) -> u64 {
    let mut hash = WordHash::default();
    word.bytes().for_each(|b| hash.push(b));
    hash.finish()
}

/// Hashes one word from its bytes, eight at a time, without a lower-cased copy.
#[derive(Default)]
struct WordHash {
    state: u64,
    pending: u64,
    filled: u32,
    len: u64,
}

impl WordHash {
    fn push(&mut self, byte: u8) {
        self.pending |= (byte as u64) << (8 * self.filled);
        self.filled += 1;
        self.len += 1;
        if self.filled == 8 {
            self.state = (self.state ^ self.pending)
                .wrapping_mul(MIX)
                .rotate_left(31);
            self.pending = 0;
            self.filled = 0;
        }
    }

    /// The first `run` bytes of `bytes`, ASCII letters and digits, lower-cased (`| 0x20`
    /// leaves digits as they are): eight bytes to one mixing step once the pending bytes are
    /// aligned, and the last few taken in one load when `bytes` goes on past them.
    fn push_ascii_alphanumeric(&mut self, bytes: &[u8], run: usize) {
        const LOWER: u64 = 0x2020_2020_2020_2020;
        let mut at = 0;
        while self.filled != 0 && at < run {
            self.push(bytes[at] | 0x20);
            at += 1;
        }
        while run - at >= 8 {
            let eight = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
            self.state = (self.state ^ (eight | LOWER))
                .wrapping_mul(MIX)
                .rotate_left(31);
            self.len += 8;
            at += 8;
        }
        let left = run - at;
        match bytes.get(at..at + 8) {
            Some(eight) if left > 0 => {
                // `filled` is 0 here: the loop above emptied it or the run is done.
                let keep = u64::MAX >> (64 - 8 * left);
                let eight = u64::from_le_bytes(eight.try_into().expect("eight bytes"));
                self.pending = (eight | LOWER) & keep;
                self.filled = left as u32;
                self.len += left as u64;
            }
            _ => bytes[at..run].iter().for_each(|&b| self.push(b | 0x20)),
        }
    }

    fn push_apostrophes(&mut self, count: usize) {
        (0..count).for_each(|_| self.push(b'\''));
    }

    fn push_char(&mut self, c: char) {
        let mut utf8 = [0; 4];
        for &b in c.encode_utf8(&mut utf8).as_bytes() {
            self.push(b);
        }
    }

    fn started(&self) -> bool {
        self.len > 0
    }

    /// The word's hash; the hasher is ready for the next word.
    fn finish(&mut self) -> u64 {
        let h = fmix64(self.state ^ self.pending ^ self.len.rotate_right(8));
        *self = Self::default();
        h
    }
}

/// Calls `word` with the hash of each word of `text` as [`words`](crate::prepare::segment::words) cuts
/// them: runs of letters, digits and inner apostrophes, lower-cased.
pub fn word_hashes(text: &str, mut word: impl FnMut(u64)) {
    let mut hash = WordHash::default();
    // Apostrophes are held back until a letter follows, so a word's edges never keep one.
    let mut apostrophes = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let in_word = if b.is_ascii_alphanumeric() {
            let run = alphanumeric_run(&bytes[i..]);
            hash.push_apostrophes(std::mem::take(&mut apostrophes));
            hash.push_ascii_alphanumeric(&bytes[i..], run);
            i += run;
            true
        } else if b == b'\'' {
            i += 1;
            apostrophes += usize::from(hash.started());
            true
        } else if b.is_ascii() {
            i += 1;
            false
        } else {
            let c = text[i..].chars().next().expect("a char boundary");
            i += c.len_utf8();
            let alphanumeric = c.is_alphanumeric();
            if alphanumeric {
                hash.push_apostrophes(std::mem::take(&mut apostrophes));
                c.to_lowercase().for_each(|l| hash.push_char(l));
            }
            alphanumeric
        };
        if !in_word && hash.started() {
            word(hash.finish());
            apostrophes = 0;
        }
    }
    if hash.started() {
        word(hash.finish());
    }
}

/// Length of the run of ASCII letters and digits `bytes` starts with: sixteen bytes at a time
/// (a byte loop mispredicted at nearly every word's end).
fn alphanumeric_run(bytes: &[u8]) -> usize {
    let mut run = 0;
    while let Some(window) = bytes.get(run..run + 16) {
        let kinds = ByteKinds::of(u128::from_le_bytes(window.try_into().expect("16 bytes")));
        let more = (!(kinds.lower | kinds.upper | kinds.digit)).trailing_zeros() as usize;
        run += more;
        if more < 16 {
            return run;
        }
    }
    run + bytes[run..]
        .iter()
        .position(|b| !b.is_ascii_alphanumeric())
        .unwrap_or(bytes.len() - run)
}

/// The hash of the last `n` words, updated word by word: the polynomial
/// `w[0]·B^(n-1) + … + w[n-1]` (wrapping), so a word enters and the oldest leaves in O(1).
pub struct Shingles {
    /// The last `n` word hashes; `next` is the oldest once `seen >= n`.
    window: Vec<u64>,
    next: usize,
    seen: usize,
    hash: u64,
    /// `B^n`, what the oldest word's term is multiplied by when it leaves.
    leaving: u64,
}

/// The polynomial's base (odd, so multiplying by it loses no bits).
pub const BASE: u64 = 0xd6e8feb86659fd93;

impl Shingles {
    /// Shingles of `n` words.
    pub fn new(n: usize) -> Self {
        Self {
            window: vec![0; n],
            next: 0,
            seen: 0,
            hash: 0,
            leaving: (0..n).fold(1, |p: u64, _| p.wrapping_mul(BASE)),
        }
    }

    /// Adds a word; the hash of the `n`-gram it completes, if it completes one.
    pub fn push(&mut self, word: u64) -> Option<u64> {
        let n = self.window.len();
        let oldest = std::mem::replace(&mut self.window[self.next], word);
        self.next = if self.next + 1 == n { 0 } else { self.next + 1 };
        self.seen += 1;
        self.hash = self.hash.wrapping_mul(BASE).wrapping_add(word);
        if self.seen > n {
            self.hash = self.hash.wrapping_sub(oldest.wrapping_mul(self.leaving));
        }
        (self.seen >= n).then_some(self.hash)
    }

    /// The one shingle of a text shorter than `n` words: all of them.
    pub fn short_text(&self) -> Option<u64> {
        (self.seen < self.window.len()).then_some(self.hash ^ self.seen as u64)
    }
}

/// Bins never filled by a shingle hold this (values are 32-bit).
const EMPTY: u64 = u64::MAX;

/// The MinHash signature of `text`, one value per bin (`bands * rows` bins), over its
/// lower-cased word n-grams (the whole text is one shingle when it is shorter).
///
/// One-permutation hashing with optimal densification (Shrivastava, ICML 2017): each shingle
/// is hashed once, its hash picks a bin and the bin keeps the smallest value, so a document
/// costs one hash per word instead of one per word and bin; two signatures still agree in a
/// bin with probability equal to the Jaccard similarity of the shingle sets. An empty bin
/// copies the value of the first filled bin on its own fixed probe sequence, the same for
/// every document, so equal shingle sets still give equal signatures.
pub fn signature(text: &str, params: &NearDedup) -> Vec<u32> {
    let bins = params.num_perm().max(1);
    let n = params.ngram.max(1);
    let mut mins = vec![EMPTY; bins];
    let mut keep = |shingle: u64| {
        let h = fmix64(shingle);
        let bin = (((h >> 32) * bins as u64) >> 32) as usize;
        mins[bin] = mins[bin].min(h & u64::from(u32::MAX));
    };
    let mut shingles = Shingles::new(n);
    word_hashes(text, |w| {
        if let Some(shingle) = shingles.push(w) {
            keep(shingle);
        }
    });
    if let Some(all) = shingles.short_text() {
        keep(all);
    }
    densified(&mins)
}

/// `mins` with each empty bin given the value of a filled one (at least one is filled).
fn densified(mins: &[u64]) -> Vec<u32> {
    let bins = mins.len() as u64;
    mins.iter()
        .enumerate()
        .map(|(bin, &value)| {
            let mut probe = bin as u64;
            let mut value = value;
            while value == EMPTY {
                probe = fmix64(probe.wrapping_add(MIX) ^ ((bin as u64) << 32));
                value = mins[(((probe >> 32) * bins) >> 32) as usize];
            }
            value as u32
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

/// The signatures of many documents, stored flat: two allocations, not two per document.
#[derive(Debug, Default)]
pub struct Signatures {
    width: usize,
    ids: String,
    id_ends: Vec<usize>,
    values: Vec<u32>,
}

impl Signatures {
    /// An empty set for signatures of `width` values (`bands * rows`).
    pub fn new(width: usize) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// Adds a document; false (and nothing added) when its signature is not `width` long,
    /// as when it was computed with other near-dedup settings.
    pub fn push(&mut self, id: &str, signature: &[u32]) -> bool {
        if signature.len() != self.width {
            return false;
        }
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
        self.values.extend_from_slice(signature);
        true
    }

    /// Documents added.
    pub fn len(&self) -> usize {
        self.id_ends.len()
    }

    /// Whether none were added.
    pub fn is_empty(&self) -> bool {
        self.id_ends.is_empty()
    }

    fn id(&self, doc: usize) -> &str {
        let start = if doc == 0 { 0 } else { self.id_ends[doc - 1] };
        &self.ids[start..self.id_ends[doc]]
    }

    fn signature(&self, doc: usize) -> &[u32] {
        &self.values[doc * self.width..(doc + 1) * self.width]
    }
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

/// A matched pair (ranks in id order) and its estimated similarity.
type Edge = (usize, usize, f64);

/// The pairs band `band` finds: documents (`docs`, in id order) whose values in the band
/// are equal form a bucket, and each member is compared with the first few before it until
/// one reaches the threshold.
fn band_edges(sigs: &Signatures, docs: &[usize], band: usize, params: &NearDedup) -> Vec<Edge> {
    let rows = params.rows.max(1);
    let values = band * rows..(band + 1) * rows;
    let seed = fnv1a(&band.to_le_bytes());
    let mut keys: Vec<(u64, usize)> = docs
        .iter()
        .enumerate()
        .map(|(rank, &doc)| {
            let key = sigs.signature(doc)[values.clone()]
                .iter()
                .fold(seed, |h, v| (h ^ *v as u64).wrapping_mul(0x100000001b3));
            (key, rank)
        })
        .collect();
    // Sorted by key, then rank: each bucket's members in id order, as if inserted in turn.
    keys.sort_unstable();
    let mut edges = Vec::new();
    for bucket in keys.chunk_by(|a, b| a.0 == b.0) {
        for (at, &(_, i)) in bucket.iter().enumerate().skip(1) {
            let sig = sigs.signature(docs[i]);
            for &(_, j) in &bucket[..at.min(BUCKET_PROBES)] {
                let sim = estimated_jaccard(sig, sigs.signature(docs[j]));
                if sim >= params.threshold {
                    edges.push((i, j, sim));
                    break;
                }
            }
        }
    }
    edges
}

/// Clusters of near-duplicates among `sigs`; every document but the smallest id of its
/// cluster is returned. The result does not depend on the order documents were added (of
/// equal ids the first added is used). Bands are searched on all cores.
pub fn duplicates(sigs: &Signatures, params: &NearDedup) -> Vec<Duplicate> {
    let mut docs: Vec<usize> = (0..sigs.len()).collect();
    docs.sort_by(|&a, &b| sigs.id(a).cmp(sigs.id(b)));
    docs.dedup_by(|a, b| sigs.id(*a) == sigs.id(*b));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, params.bands.max(1));
    let edges: Vec<Edge> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let docs = &docs;
                scope.spawn(move || {
                    (t..params.bands)
                        .step_by(threads)
                        .flat_map(|band| band_edges(sigs, docs, band, params))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a band worker does not panic"))
            .collect()
    });
    // Components do not depend on the order edges are joined in; the smaller rank (the
    // smaller id) becomes the root, so it is the one kept.
    let mut parent: Vec<usize> = (0..docs.len()).collect();
    let mut matched = vec![0.0f64; docs.len()];
    for (i, j, sim) in edges {
        let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
        if ri != rj {
            parent[ri.max(rj)] = ri.min(rj);
        }
        matched[i] = matched[i].max(sim);
        matched[j] = matched[j].max(sim);
    }
    (0..docs.len())
        .filter_map(|i| {
            let root = find(&mut parent, i);
            (root != i).then(|| Duplicate {
                id: sigs.id(docs[i]).to_string(),
                kept_id: sigs.id(docs[root]).to_string(),
                similarity: matched[i],
            })
        })
        .collect()
}
