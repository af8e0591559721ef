//! Token counting with the tokenizer a job names: a Hugging Face `tokenizer.json` for exact
//! counts against the served model, or a built-in OpenAI encoding (cl100k_base, o200k_base)
//! as a labelled stand-in. The built-in encodings count with `bpe-openai`, which gives
//! tiktoken's counts several times faster: counting is most of prepare's CPU.

use std::collections::HashMap;
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
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = split::ascii_piece(pattern, rest.as_bytes()).unwrap_or_else(|| {
            encoding(pattern)
                .split(rest)
                .next()
                .map_or(rest.len(), str::len)
        });
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        Some(piece)
    })
}

/// Pieces up to this many bytes are cached, keyed by their bytes packed in a `u128` with the
/// length in the top byte; longer ones are rare in prose and merged every time.
const CACHED_PIECE_BYTES: usize = 15;

/// Entries a thread keeps per encoding before starting over.
const CACHE_ENTRIES: usize = 1 << 18;

type PieceCache = HashMap<u128, u32, foldhash::fast::FixedState>;

thread_local! {
    /// Tokens per short piece, one map per built-in encoding.
    static PIECE_TOKENS: std::cell::RefCell<[PieceCache; 2]> = Default::default();
}

fn piece_key(piece: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    bytes[..piece.len()].copy_from_slice(piece);
    bytes[15] = piece.len() as u8;
    u128::from_le_bytes(bytes)
}

/// The encoding's count, piece by piece, with each thread remembering the short pieces it has
/// seen: prose repeats its words, so most pieces skip the byte-pair merge.
fn count_with_piece_cache(pattern: Pattern, text: &str) -> usize {
    let bpe = &encoding(pattern).bpe;
    PIECE_TOKENS.with(|caches| {
        let mut caches = caches.borrow_mut();
        let cache = &mut caches[pattern as usize];
        if cache.len() > CACHE_ENTRIES {
            cache.clear();
        }
        pieces(pattern, text)
            .map(|piece| {
                let piece = piece.as_bytes();
                if piece.len() > CACHED_PIECE_BYTES {
                    return bpe.count(piece);
                }
                *cache
                    .entry(piece_key(piece))
                    .or_insert_with(|| bpe.count(piece) as u32) as usize
            })
            .sum()
    })
}
