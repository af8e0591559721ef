//! Sixteen bytes classified at once: the word scans of the tokenizer, the quality rules,
//! MinHash and exact dedup rest on it. The crate's only `unsafe` (SSE2 intrinsics) is here.
#![allow(unsafe_code)]

/// the tokenizer's word scan and exact dedup make, for sixteen bytes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteKinds {
    /// `a` to `z`.
    pub lower: u32,
    /// `A` to `Z`.
    pub upper: u32,
    /// `0` to `9`.
    pub digit: u32,
    /// The space character.
    pub space: u32,
    /// ASCII whitespace: space, `\t`, `\n`, `\x0B`, `\x0C`, `\r`.
    pub whitespace: u32,
    /// Bytes of multi-byte UTF-8 characters.
    pub non_ascii: u32,
}

impl ByteKinds {
    /// The kinds of the bytes of `window` (little-endian: byte 0 is the first), with SSE2.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn of(window: u128) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of every x86_64 CPU; the intrinsics read only this vector.
        unsafe {
            let v = _mm_loadu_si128((&window as *const u128).cast());
            // Signed byte compares: non-ASCII bytes are negative and fall in no range.
            let within = |lo: u8, hi: u8| {
                let above = _mm_cmpgt_epi8(v, _mm_set1_epi8(lo as i8 - 1));
                let below = _mm_cmplt_epi8(v, _mm_set1_epi8(hi as i8 + 1));
                _mm_movemask_epi8(_mm_and_si128(above, below)) as u32
            };
            let space = within(b' ', b' ');
            Self {
                lower: within(b'a', b'z'),
                upper: within(b'A', b'Z'),
                digit: within(b'0', b'9'),
                space,
                whitespace: space | within(b'\t', b'\r'),
                non_ascii: _mm_movemask_epi8(v) as u32,
            }
        }
    }

    /// The kinds of the bytes of `window`.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub fn of(window: u128) -> Self {
        Self::portable(window)
    }

    /// The same answer as [`ByteKinds::of`] from plain integer operations, for CPUs without
    /// SSE2 (public so tests can hold the two to one answer).
    pub fn portable(window: u128) -> Self {
        let space = high_bits(ascii_bytes_in(window, b' ', b' '));
        Self {
            lower: high_bits(ascii_bytes_in(window, b'a', b'z')),
            upper: high_bits(ascii_bytes_in(window, b'A', b'Z')),
            digit: high_bits(ascii_bytes_in(window, b'0', b'9')),
            space,
            whitespace: space | high_bits(ascii_bytes_in(window, b'\t', b'\r')),
            non_ascii: high_bits(window & HIGH_BITS),
        }
    }

    /// The bytes of `window` equal to the ASCII byte `byte`, with SSE2.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn equal(window: u128, byte: u8) -> u32 {
        use std::arch::x86_64::*;
        debug_assert!(byte.is_ascii());
        // SAFETY: SSE2 is part of every x86_64 CPU; the intrinsics read only this vector.
        unsafe {
            let v = _mm_loadu_si128((&window as *const u128).cast());
            _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(byte as i8))) as u32
        }
    }

    /// The bytes of `window` equal to the ASCII byte `byte`.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub fn equal(window: u128, byte: u8) -> u32 {
        Self::portable_equal(window, byte)
    }

    /// The same answer as [`ByteKinds::equal`] from plain integer operations.
    pub fn portable_equal(window: u128, byte: u8) -> u32 {
        high_bits(ascii_bytes_in(window, byte, byte))
    }
}

pub(crate) const HIGH_BITS: u128 = 0x8080_8080_8080_8080_8080_8080_8080_8080;

/// High bit of each byte of `w` set where the byte is ASCII in `lo..=hi`, all other bits
/// clear. Each byte's high bit is set before the subtractions so no byte borrows from its
/// neighbour.
pub(crate) fn ascii_bytes_in(w: u128, lo: u8, hi: u8) -> u128 {
    let splat = |b: u8| b as u128 * (u128::MAX / 255);
    let ascii = !w & HIGH_BITS;
    ((w | HIGH_BITS) - splat(lo)) & !((w | HIGH_BITS) - splat(hi + 1)) & ascii
}

/// The high bit of each byte of `w` (no other bit set) gathered into bit `i` for byte `i`:
/// one multiplication per eight bytes lands each byte's bit in the top byte, without carries.
fn high_bits(w: u128) -> u32 {
    let gather = |x: u64| (x.wrapping_mul(0x0002_0408_1020_4081) >> 56) as u32;
    gather(w as u64) | gather((w >> 64) as u64) << 8
}
