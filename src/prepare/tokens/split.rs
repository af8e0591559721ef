//! The OpenAI encodings' pre-tokenization, scanned by hand where the text is ASCII.
//!
//! cl100k_base and o200k_base cut text into pieces with a regex before the byte-pair merge;
//! running that regex was most of prepare's CPU. For ASCII every character class in the
//! patterns is a byte test, so [`ascii_piece`] decides the next piece with a few comparisons
//! and gives up (`None`) the moment a decision would need a non-ASCII character's Unicode
//! class; the caller then asks the regex for that one piece. The pieces are the regex's
//! exactly: `tests/it/prepare.rs` compares both on real and adversarial text.

/// Which encoding's pattern to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `'s|'t|...`, `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}{1,3}`, punctuation, whitespace.
    Cl100k,
    /// Case-aware words with contraction suffixes, `\p{N}{1,3}`, punctuation with `[\r\n/]*`.
    O200k,
}

use crate::prepare::bytes::ByteKinds;

/// Bytes [`word_in_window`] looks at: one unaligned load.
pub const WINDOW: usize = 16;

/// The piece starting a window of text when it is the common word shape, from sixteen bytes
/// in one go: an optional space, then letters (cl100k), or then `Upper? Lower+` (o200k),
/// ended inside the window by an ASCII byte that cannot continue it. `None` hands the piece
/// to [`ascii_piece`], which decides every shape; `tests/it/prepare.rs` holds both to the
/// regex.
#[inline]
pub fn word_in_window(pattern: Pattern, w: u128) -> Option<usize> {
    let ByteKinds {
        lower,
        upper,
        non_ascii,
        ..
    } = ByteKinds::of(w);
    let letters = lower | upper;
    // The space joins the word only if a letter follows it.
    let start = u32::from(w as u8 == b' ');
    if (letters >> start) & 1 == 0 {
        return None;
    }
    let from = |bits: u32, at: u32| (bits >> at) << at;
    let end = match pattern {
        Pattern::Cl100k => from(!letters, start).trailing_zeros(),
        Pattern::O200k => {
            // One capital at most: a run of capitals is the pattern's other word shape.
            let first = start + ((upper >> start) & 1);
            if (lower >> first) & 1 == 0 {
                return None;
            }
            let end = from(!lower, first).trailing_zeros();
            // A contraction may follow.
            if end < 16 && (w >> (8 * end)) as u8 == b'\'' {
                return None;
            }
            end
        }
    };
    // Past the window, or at a non-ASCII byte that may be a letter: the slow path decides.
    (end < 16 && (non_ascii >> end) & 1 == 0).then_some(end as usize)
}

/// A byte's class in the patterns; `None` for non-ASCII (the regex must decide).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Upper,
    Lower,
    Digit,
    /// `\r` or `\n`.
    Newline,
    /// Other ASCII whitespace: space, `\t`, `\x0B`, `\x0C`.
    Space,
    /// Anything else ASCII: neither whitespace, letter nor digit.
    Other,
    /// Past the end of the text.
    End,
}

use Class::*;

fn class(text: &[u8], i: usize) -> Option<Class> {
    let Some(&b) = text.get(i) else {
        return Some(End);
    };
    Some(match b {
        b'A'..=b'Z' => Upper,
        b'a'..=b'z' => Lower,
        b'0'..=b'9' => Digit,
        b'\r' | b'\n' => Newline,
        b' ' | b'\t' | 0x0B | 0x0C => Space,
        0x80.. => return None,
        _ => Other,
    })
}

fn is_letter(c: Class) -> bool {
    matches!(c, Upper | Lower)
}

fn is_whitespace(c: Class) -> bool {
    matches!(c, Newline | Space)
}

/// End of the run of bytes from `i` whose class passes `keep`; `None` if the run stops at a
/// non-ASCII byte, which might have continued it.
fn run(text: &[u8], mut i: usize, keep: impl Fn(Class) -> bool) -> Option<usize> {
    while keep(class(text, i)?) {
        i += 1;
    }
    Some(i)
}

/// Length in bytes of the piece the encoding's regex cuts at the start of `text` (non-empty),
/// or `None` when that depends on a non-ASCII character.
pub fn ascii_piece(pattern: Pattern, text: &[u8]) -> Option<usize> {
    let first = class(text, 0)?;
    if let Some(n) = word(pattern, text, first)? {
        return Some(n);
    }
    if first == Digit {
        // \p{N}{1,3}: a fourth byte is never looked at.
        let mut n = 1;
        while n < 3 && class(text, n)? == Digit {
            n += 1;
        }
        return Some(n);
    }
    if let Some(n) = punctuation(pattern, text, first)? {
        return Some(n);
    }
    whitespace(text)
}

/// The contraction `'s|'t|'re|'ve|'m|'ll|'d` (case-insensitive) at `i`: its length, 0 if
/// there is none.
fn contraction(text: &[u8], i: usize) -> Option<usize> {
    if text.get(i) != Some(&b'\'') {
        return Some(0);
    }
    // Unicode case folding makes `ſ` an `s` (and `K` sign a `k`): non-ASCII is the regex's call.
    let letter = |k: usize| -> Option<u8> {
        match class(text, k)? {
            End => Some(0),
            _ => Some(text[k].to_ascii_lowercase()),
        }
    };
    Some(match letter(i + 1)? {
        b's' | b't' | b'm' | b'd' => 2,
        b'r' | b'v' if letter(i + 2)? == b'e' => 3,
        b'l' if letter(i + 2)? == b'l' => 3,
        _ => 0,
    })
}

/// The word alternatives (and cl100k's leading contraction): `Some(Some(n))` a piece of `n`
/// bytes, `Some(None)` no word starts here.
fn word(pattern: Pattern, text: &[u8], first: Class) -> Option<Option<usize>> {
    let may_prefix = !matches!(first, Upper | Lower | Digit | Newline | End);
    match pattern {
        Pattern::Cl100k => {
            if first == Other {
                let n = contraction(text, 0)?;
                if n > 0 {
                    return Some(Some(n));
                }
            }
            let start = if may_prefix && is_letter(class(text, 1)?) {
                1
            } else if is_letter(first) {
                0
            } else {
                return Some(None);
            };
            Some(Some(run(text, start, is_letter)?))
        }
        Pattern::O200k => {
            if may_prefix {
                if let Some(n) = cased_word(text, 1)? {
                    return Some(Some(n));
                }
            }
            cased_word(text, 0)
        }
    }
}

/// o200k's two word shapes from `i`, in the pattern's order: `Upper* Lower+ contraction?`,
/// then `Upper+ Lower* contraction?`. Returns the end of the piece.
fn cased_word(text: &[u8], i: usize) -> Option<Option<usize>> {
    let upper_end = run(text, i, |c| c == Upper)?;
    let lower_end = run(text, upper_end, |c| c == Lower)?;
    if lower_end == upper_end && upper_end == i {
        return Some(None);
    }
    Some(Some(lower_end + contraction(text, lower_end)?))
}

/// ` ?[^\s\p{L}\p{N}]+` then `[\r\n]*` (cl100k) or `[\r\n/]*` (o200k).
fn punctuation(pattern: Pattern, text: &[u8], first: Class) -> Option<Option<usize>> {
    let start = if first == Other {
        0
    } else if text[0] == b' ' && class(text, 1)? == Other {
        1
    } else {
        return Some(None);
    };
    let end = run(text, start, |c| c == Other)?;
    let tail = text[end..]
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n' || (b == b'/' && pattern == Pattern::O200k))
        .count();
    Some(Some(end + tail))
}

/// `\s*[\r\n]+`, `\s+$`, `\s+(?!\S)`, `\s+`: through the last newline of the whitespace run,
/// else the whole run at the end of the text, else all of it but the last character.
fn whitespace(text: &[u8]) -> Option<usize> {
    let end = run(text, 0, is_whitespace)?;
    debug_assert!(end > 0, "every ASCII class is handled before whitespace");
    if let Some(last) = text[..end].iter().rposition(|&b| b == b'\r' || b == b'\n') {
        return Some(last + 1);
    }
    if end == text.len() || end == 1 {
        return Some(end);
    }
    Some(end - 1)
}
