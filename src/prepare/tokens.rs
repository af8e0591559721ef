//! Token counting with the tokenizer a job names: a Hugging Face `tokenizer.json` for exact
//! counts against the served model, or a built-in OpenAI encoding (cl100k_base, o200k_base)
//! as a labelled stand-in. The built-in encodings count with `bpe-openai`, which gives
//! tiktoken's counts several times faster: counting is most of prepare's CPU.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

mod split;

pub use split::Pattern;

/// Counts tokens of text; cheap to clone and share between threads.
#[derive(Clone)]
pub struct TokenCounter {
    inner: Arc<Inner>,
    label: String,
}

enum Inner {
    Bpe(Pattern),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

impl TokenCounter {
    /// Loads `spec`: `cl100k_base` or `o200k_base` (built in), or a path to a
    /// `tokenizer.json`, resolved against `base_dir` when relative.
    pub fn load(spec: &str, base_dir: &Path) -> Result<Self> {
        let builtin = match spec {
            "cl100k_base" => Some(Pattern::Cl100k),
            "o200k_base" => Some(Pattern::O200k),
            _ => None,
        };
        if let Some(pattern) = builtin {
            return Ok(Self {
                inner: Arc::new(Inner::Bpe(pattern)),
                label: format!("{spec} (an approximation unless the model uses it)"),
            });
        }
        let path = base_dir.join(spec);
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            Error::Job(format!(
                "tokenizer {}: {e}; give a tokenizer.json path or one of cl100k_base, o200k_base",
                path.display()
            ))
        })?;
        // Files exported for training often carry truncation and padding, which would cap
        // every count at the training length.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Job(format!("tokenizer {}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        Ok(Self {
            inner: Arc::new(Inner::HuggingFace(Box::new(tokenizer))),
            label: format!("{} (tokenizer.json)", path.display()),
        })
    }

    /// Number of tokens in `text`, without special tokens.
    pub fn count(&self, text: &str) -> usize {
        match self.inner.as_ref() {
            Inner::Bpe(pattern) => count_with_piece_cache(*pattern, text),
            Inner::HuggingFace(tok) => tok
                .encode_fast(text, false)
                .map(|e| e.len())
                // A text the tokenizer rejects is counted by a 4-characters-a-token rule rather
                // than failing the whole batch.
                .unwrap_or_else(|_| text.chars().count().div_ceil(4)),
        }
    }

    /// Human-readable name of the tokenizer, saying when it is an approximation.
    pub fn label(&self) -> &str {
        &self.label
    }
}

fn encoding(pattern: Pattern) -> &'static bpe_openai::Tokenizer {
    match pattern {
        Pattern::Cl100k => bpe_openai::cl100k_base(),
        Pattern::O200k => bpe_openai::o200k_base(),
    }
}

/// The pieces a built-in encoding cuts `text` into before the byte-pair merge, exactly as its
/// regex does: ASCII stretches are scanned by hand, the rest asked of the regex piece by
/// piece. (Neither encoding normalises its input.)
pub fn pieces(pattern: Pattern, text: &str) -> impl Iterator<Item = &str> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at == text.len() {
            return None;
        }
        let (n, _) = piece_len(pattern, text, at);
        at += n;
        Some(&text[at - n..at])
    })
}

/// Length of the piece at `text[at..]` (not empty): common words from one window, other
/// ASCII by the hand scanner, and the regex when a non-ASCII character decides. With the
/// length comes the 16-byte window at `at`, unless the text ends within it.
#[inline]
fn piece_len(pattern: Pattern, text: &str, at: usize) -> (usize, Option<u128>) {
    let window = text
        .as_bytes()
        .get(at..at + split::WINDOW)
        .map(|w| u128::from_le_bytes(w.try_into().expect("a window's length")));
    if let Some(n) = window.and_then(|w| split::word_in_window(pattern, w)) {
        return (n, window);
    }
    let rest = &text[at..];
    let n = split::ascii_piece(pattern, rest.as_bytes()).unwrap_or_else(|| {
        encoding(pattern)
            .split(rest)
            .next()
            .map_or(rest.len(), str::len)
    });
    (n, window)
}

/// Pieces up to this many bytes are cached: a slot is the piece's bytes packed in a `u128`,
/// the length in the low nibble of the top byte and the token count (at most the length) in
/// its high nibble. Longer pieces are rare in prose and merged every time.
const CACHED_PIECE_BYTES: usize = 15;

/// Slots of a thread's piece cache, as a power of two: 1 MiB per encoding.
const CACHE_BITS: u32 = 16;

/// Slots that share one cache line and one hash: a word that collides with a more frequent
/// one no longer evicts it at every use.
const WAYS: usize = 4;

/// One cache line of slots, most recently used first.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Set([u128; WAYS]);

/// A set-associative cache of piece counts: one cache line per piece, least recently used
/// piece of the line replaced. A hash map cost several times more per piece, and a
/// direct-mapped table merged a conflicting piece again at nearly every use.
struct PieceCache(Vec<Set>);

const COUNT_SHIFT: u32 = 124;

const SET_BITS: u32 = CACHE_BITS - WAYS.trailing_zeros();

impl PieceCache {
    fn new() -> Self {
        // 0 would be the empty piece, which is never looked up.
        Self(vec![Set::default(); 1 << SET_BITS])
    }

    /// Tokens in the piece `text[at..at + len]` (1 to 15 bytes), merged by `merge` on a miss;
    /// `window` is the text's 16 bytes from `at`, if it has that many.
    #[inline]
    fn count(
        &mut self,
        text: &[u8],
        at: usize,
        len: usize,
        window: Option<u128>,
        merge: impl FnOnce(&[u8]) -> usize,
    ) -> usize {
        let bytes = window.unwrap_or_else(|| {
            let mut bytes = [0u8; 16];
            bytes[..len].copy_from_slice(&text[at..at + len]);
            u128::from_le_bytes(bytes)
        });
        let key = (bytes & ((1u128 << (8 * len)) - 1)) | ((len as u128) << 120);
        let mixed = ((key as u64) ^ ((key >> 64) as u64).rotate_left(29))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let set = &mut self.0[(mixed >> (64 - SET_BITS)) as usize].0;
        let without_count = !(0xF << COUNT_SHIFT);
        let (way, slot) = match set.iter().position(|&slot| slot & without_count == key) {
            Some(way) => (way, set[way]),
            None => {
                let n = merge(&text[at..at + len]) as u128;
                debug_assert!(n <= 15, "a piece of at most 15 bytes has at most 15 tokens");
                (WAYS - 1, key | (n << COUNT_SHIFT))
            }
        };
        // Most recently used first: the hit (or the new piece, over the last) moves to the front.
        for j in (1..=way).rev() {
            set[j] = set[j - 1];
        }
        set[0] = slot;
        (slot >> COUNT_SHIFT) as usize
    }
}

thread_local! {
    /// Per thread, one cache per built-in encoding, made on first use.
    static PIECE_TOKENS: std::cell::RefCell<[Option<PieceCache>; 2]> = Default::default();
}

/// The encoding's count, piece by piece, with each thread remembering the short pieces it has
/// seen: prose repeats its words, so most pieces skip the byte-pair merge.
fn count_with_piece_cache(pattern: Pattern, text: &str) -> usize {
    let bpe = &encoding(pattern).bpe;
    PIECE_TOKENS.with(|caches| {
        let mut caches = caches.borrow_mut();
        let cache = caches[pattern as usize].get_or_insert_with(PieceCache::new);
        let bytes = text.as_bytes();
        let mut total = 0;
        let mut at = 0;
        while at < bytes.len() {
            let (len, window) = piece_len(pattern, text, at);
            total += if len > CACHED_PIECE_BYTES {
                bpe.count(&bytes[at..at + len])
            } else {
                cache.count(bytes, at, len, window, |p| bpe.count(p))
            };
            at += len;
        }
        total
    })
}
