//! Token counting with the tokenizer a job names: a Hugging Face `tokenizer.json` for exact
//! counts against the served model, or a built-in OpenAI encoding (cl100k_base, o200k_base)
//! as a labelled stand-in. The built-in encodings count with `bpe-openai`, which gives
//! tiktoken's counts several times faster: counting is most of prepare's CPU.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Counts tokens of text; cheap to clone and share between threads.
#[derive(Clone)]
pub struct TokenCounter {
    inner: Arc<Inner>,
    label: String,
}

enum Inner {
    Bpe(&'static bpe_openai::Tokenizer),
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
            "cl100k_base" => Some(bpe_openai::cl100k_base()),
            "o200k_base" => Some(bpe_openai::o200k_base()),
            _ => None,
        };
        if let Some(bpe) = builtin {
            return Ok(Self {
                inner: Arc::new(Inner::Bpe(bpe)),
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
            Inner::Bpe(bpe) => count_with_piece_cache(bpe, text),
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

/// Pieces longer than this (in bytes) are rare and counted directly.
const CACHED_PIECE_BYTES: usize = 24;

/// Entries a thread keeps per encoding before starting over.
const CACHE_ENTRIES: usize = 1 << 18;

thread_local! {
    /// Tokens per pre-token piece, one map per built-in encoding (by its address).
    static PIECE_TOKENS: std::cell::RefCell<std::collections::HashMap<usize, std::collections::HashMap<Box<str>, u32>>> =
        Default::default();
}

/// The encoding's count, pre-token piece by piece, with each thread remembering the pieces it
/// has seen: prose repeats its words, so most pieces skip the byte-pair merge.
fn count_with_piece_cache(bpe: &'static bpe_openai::Tokenizer, text: &str) -> usize {
    let normal = bpe.normalize(text);
    PIECE_TOKENS.with(|maps| {
        let mut maps = maps.borrow_mut();
        let cache = maps.entry(bpe as *const _ as usize).or_default();
        if cache.len() > CACHE_ENTRIES {
            cache.clear();
        }
        bpe.split(normal.as_str())
            .map(|piece| {
                if piece.len() > CACHED_PIECE_BYTES {
                    return bpe.bpe.count(piece.as_bytes());
                }
                if let Some(n) = cache.get(piece) {
                    return *n as usize;
                }
                let n = bpe.bpe.count(piece.as_bytes());
                cache.insert(piece.into(), n as u32);
                n
            })
            .sum()
    })
}
