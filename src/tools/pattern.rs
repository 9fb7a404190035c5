//! The deterministic byte pattern the test backend serves and the client uploads, so any
//! transfer can be checked byte-for-byte by hash without keeping it in memory.
//!
//! The pattern repeats every [`PERIOD`] bytes, a prime, so it never lines up with buffer or
//! frame sizes: a dropped, duplicated or reordered chunk changes the hash.

use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// Pattern period in bytes (the largest prime below 64 KiB).
pub const PERIOD: usize = 65_521;

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // Twice the period, so any window of up to PERIOD bytes is one contiguous slice.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let one: Vec<u8> = (0..PERIOD)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        [one.as_slice(), one.as_slice()].concat()
    })
}

/// Fills `buf` with the pattern bytes starting at stream offset `offset`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let t = table();
    let mut pos = (offset % PERIOD as u64) as usize;
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(PERIOD);
        buf[done..done + n].copy_from_slice(&t[pos..pos + n]);
        done += n;
        pos = (pos + n) % PERIOD;
    }
}

/// SHA-256 (hex) of the first `len` pattern bytes.
pub fn sha256_hex(len: u64) -> String {
    let mut h = Sha256::new();
    let t = table();
    let mut left = len;
    while left > 0 {
        let n = left.min(PERIOD as u64) as usize;
        h.update(&t[..n]);
        left -= n as u64;
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_offset_consistent_and_hash_matches() {
        let mut whole = vec![0; 200_000];
        fill(0, &mut whole);
        let mut part = vec![0; 70_000];
        fill(100_000, &mut part);
        assert_eq!(&whole[100_000..170_000], &part[..]);
        assert_eq!(sha256_hex(200_000), hex::encode(Sha256::digest(&whole)));
    }
}
