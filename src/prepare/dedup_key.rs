//! The exact-dedup key: a hash of the text lower-cased with its whitespace collapsed.

use sha2::{Digest, Sha256};

use crate::prepare::bytes::{ByteKinds, HIGH_BITS, ascii_bytes_in};

/// The text as compared by exact dedup: lower case, whitespace collapsed, trimmed.
pub fn normalize_for_dedup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            // The common case, without per-character Unicode case tables.
            out.extend(word.bytes().map(|b| b.to_ascii_lowercase() as char));
        } else {
            out.extend(word.chars().flat_map(char::to_lowercase));
        }
    }
    out
}

/// The first 16 bytes of SHA-256 over [`normalize_for_dedup`]`(text)`: the exact-dedup key.
/// The text is normalised straight into the hash through a small buffer, sixteen bytes at a
/// time where they are ASCII and hold no whitespace but single spaces (most of prose), a
/// character at a time around the rest: building the normalised copy of every candidate cost
/// more than hashing it, and most web pages hold some non-ASCII (curly quotes, dashes, ©).
pub fn dedup_digest(text: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    let mut out = Collapsed::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let mut ascii = bytes.len() - at;
        if let Some(chunk) = bytes.get(at..at + 16) {
            let window = u128::from_le_bytes(chunk.try_into().expect("16 bytes"));
            ascii = ((window & HIGH_BITS).trailing_zeros() / 8) as usize;
            if ascii == 16 {
                if !out.push_plain(window) {
                    chunk.iter().for_each(|&b| out.push(b, &mut hasher));
                }
                out.flush_if_full(&mut hasher);
                at += 16;
                continue;
            }
        }
        // The ASCII bytes before the first other character, then that character.
        let plain = bytes[at..]
            .iter()
            .take(ascii)
            .take_while(|b| b.is_ascii())
            .count();
        for &b in &bytes[at..at + plain] {
            out.push(b, &mut hasher);
        }
        at += plain;
        if let Some(c) = text[at..].chars().next().filter(|c| !c.is_ascii()) {
            out.push_char(c, &mut hasher);
            at += c.len_utf8();
        }
    }
    out.finish(&mut hasher);
    let mut key = [0u8; 16];
    key.copy_from_slice(&hasher.finalize()[..16]);
    key
}

/// ASCII being lower-cased and its whitespace collapsed on the way into a hash.
struct Collapsed {
    buf: [u8; 8192],
    len: usize,
    /// Leading whitespace is dropped as if a space had come before it.
    after_space: bool,
}

impl Collapsed {
    fn new() -> Self {
        Self {
            buf: [0; 8192],
            len: 0,
            after_space: true,
        }
    }

    fn push(&mut self, b: u8, hasher: &mut Sha256) {
        let mapped = ASCII_DEDUP[b as usize];
        let space = mapped == b' ';
        self.buf[self.len] = mapped;
        self.len += usize::from(!(space && self.after_space));
        self.after_space = space;
        self.flush_if_full(hasher);
    }

    /// Appends a character that is not ASCII: a space for whitespace, else lower-cased.
    fn push_char(&mut self, c: char, hasher: &mut Sha256) {
        if c.is_whitespace() {
            return self.push(b' ', hasher);
        }
        for lower in c.to_lowercase() {
            // At most three characters of four bytes: they fit the sixteen kept free.
            let len = lower.encode_utf8(&mut self.buf[self.len..]).len();
            self.len += len;
        }
        self.after_space = false;
        self.flush_if_full(hasher);
    }

    /// Appends sixteen bytes lower-cased when their only whitespace is single spaces, none
    /// right after a space; otherwise appends nothing and returns false.
    fn push_plain(&mut self, window: u128) -> bool {
        let kinds = ByteKinds::of(window);
        let previous = (kinds.whitespace << 1) | u32::from(self.after_space);
        if kinds.whitespace != kinds.space || kinds.whitespace & previous != 0 {
            return false;
        }
        // An upper-case letter's high bit moved to 0x20 makes it lower case.
        let lower = window | (ascii_bytes_in(window, b'A', b'Z') >> 2);
        self.buf[self.len..self.len + 16].copy_from_slice(&lower.to_le_bytes());
        self.len += 16;
        self.after_space = kinds.space >> 15 != 0;
        true
    }

    /// Hashes all but the last byte when another sixteen might not fit: the last may be a
    /// trailing space.
    fn flush_if_full(&mut self, hasher: &mut Sha256) {
        if self.len + 16 > self.buf.len() {
            hasher.update(&self.buf[..self.len - 1]);
            self.buf[0] = self.buf[self.len - 1];
            self.len = 1;
        }
    }

    fn finish(mut self, hasher: &mut Sha256) {
        if self.after_space && self.len > 0 {
            self.len -= 1;
        }
        hasher.update(&self.buf[..self.len]);
    }
}

/// What each byte of a 16-byte window is, one bit per byte (bit `i` for byte `i`): the tests
/// ASCII as exact dedup compares it: lower case, and every whitespace character a space.
const ASCII_DEDUP: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        table[b] = match b as u8 {
            b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r' => b' ',
            c => c.to_ascii_lowercase(),
        };
        b += 1;
    }
    table
};
