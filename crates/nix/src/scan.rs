//! Nix's reference scanner: which of a set of candidate store-path hash parts occur in a byte
//! stream. Same algorithm as Nix's `RefScanSink` (refs.cc), including matches that straddle two
//! writes, so it predicts exactly what Nix records as an output's references.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Write};

use crate::base32::is_base32_char;
use crate::store_path::{StorePath, HASH_PART_LEN};

/// A `Write` sink that records which candidate store paths' hash parts appear in what is
/// written to it.
#[derive(Debug, Clone)]
pub struct ReferenceScanner {
    candidates: HashMap<[u8; HASH_PART_LEN], StorePath, BuildHasherDefault<WindowHasher>>,
    prefilter: Prefilter,
    found: BTreeSet<StorePath>,
    /// The last bytes of the previous write (fewer than `HASH_PART_LEN`).
    tail: Vec<u8>,
}

impl ReferenceScanner {
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> Self {
        let candidates: HashMap<_, _, _> = candidates
            .into_iter()
            .map(|p| {
                let mut key = [0u8; HASH_PART_LEN];
                key.copy_from_slice(p.hash_part().as_bytes());
                (key, p)
            })
            .collect();
        ReferenceScanner {
            prefilter: Prefilter::new(candidates.keys()),
            candidates,
            found: BTreeSet::new(),
            tail: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    /// Feeds bytes; matches may span calls.
    pub fn scan(&mut self, data: &[u8]) {
        // A hash may straddle the previous write and this one: search the join first.
        let head_len = data.len().min(HASH_PART_LEN);
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(&data[..head_len]);
        self.search(&joined);
        self.search(data);
        // Keep the last HASH_PART_LEN bytes of (old tail + data) as the new tail.
        if data.len() >= HASH_PART_LEN {
            joined.clear();
            joined.extend_from_slice(&data[data.len() - HASH_PART_LEN..]);
        } else {
            let excess = joined.len().saturating_sub(HASH_PART_LEN);
            joined.drain(..excess);
        }
        self.tail = joined;
    }

    /// The candidates seen so far.
    pub fn found(&self) -> &BTreeSet<StorePath> {
        &self.found
    }

    pub fn into_found(self) -> BTreeSet<StorePath> {
        self.found
    }

    fn search(&mut self, s: &[u8]) {
        if self.candidates.is_empty() {
            return;
        }
        // Every window of 32 nix-base32 characters is looked up, as in Nix. `good` remembers
        // how far the characters are known to be base32, so a long run is checked once rather
        // than 32 times; the rest of a window is checked from its end, as Nix does, so a
        // non-base32 byte skips every window that contains it at once (in compressed data,
        // where most bytes are not base32, that is a stride of about 32 bytes, not 1).
        let mut i = 0;
        let mut good = 0;
        'outer: while i + HASH_PART_LEN <= s.len() {
            good = good.max(i);
            let end = i + HASH_PART_LEN;
            if let Some(bad) = s[good..end].iter().rposition(|&c| !is_base32_char(c)) {
                i = good + bad + 1;
                continue 'outer;
            }
            good = end;
            let window = &s[i..i + HASH_PART_LEN];
            if self.prefilter.may_contain(window) {
                let mut key = [0u8; HASH_PART_LEN];
                key.copy_from_slice(window);
                if let Some(path) = self.candidates.remove(&key) {
                    self.found.insert(path);
                }
            }
            i += 1;
        }
    }
}

/// A 65,536-bit set of the candidates' first 8 bytes, hashed: almost every window that is not a
/// candidate is rejected without touching the hash map.
#[derive(Debug, Clone)]
struct Prefilter(Vec<u64>);

impl Prefilter {
    const BITS: u32 = 16;

    fn new<'a>(keys: impl Iterator<Item = &'a [u8; HASH_PART_LEN]>) -> Self {
        let mut bits = vec![0u64; (1 << Self::BITS) / 64];
        for key in keys {
            let bit = Self::bit(key);
            bits[bit / 64] |= 1 << (bit % 64);
        }
        Prefilter(bits)
    }

    fn bit(window: &[u8]) -> usize {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&window[..8]);
        let mixed = u64::from_le_bytes(prefix).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> (64 - Self::BITS)) as usize
    }

    fn may_contain(&self, window: &[u8]) -> bool {
        let bit = Self::bit(window);
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }
}

impl Write for ReferenceScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A multiply-rotate hasher for the 32-byte windows the scanner looks up: text with long runs of
/// base32 characters (hex digests, say) makes a lookup per byte, and SipHash there costs more
/// than all the rest of verifying. Keys are not attacker-chosen in a way that matters: a
/// collision only costs a comparison.
#[derive(Debug, Default, Clone, Copy)]
struct WindowHasher(u64);

impl Hasher for WindowHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_usize(&mut self, _len: usize) {
        // Every key is 32 bytes long: the length adds nothing.
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(hash: &str, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
    }

    const A: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    const B: &str = "1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r6s";

    fn scan_in_chunks(data: &[u8], chunk: usize) -> BTreeSet<StorePath> {
        let mut s = ReferenceScanner::new([path(A, "a"), path(B, "b")]);
        for piece in data.chunks(chunk.max(1)) {
            s.scan(piece);
        }
        s.into_found()
    }

    #[test]
    fn finds_hashes_across_every_chunk_boundary() {
        let data = format!("#!/nix/store/{A}-a/bin/sh\nexec /nix/store/{B}-b/bin/x\n");
        for chunk in 1..=data.len() {
            let found = scan_in_chunks(data.as_bytes(), chunk);
            assert_eq!(found.len(), 2, "chunk size {chunk}");
        }
    }

    #[test]
    fn finds_a_hash_inside_a_longer_base32_run_like_nix() {
        // Nix slides one byte at a time inside a run of base32 characters.
        let data = format!("zz{A}zz");
        assert_eq!(
            scan_in_chunks(data.as_bytes(), 3),
            BTreeSet::from([path(A, "a")])
        );
    }

    #[test]
    fn ignores_partial_or_broken_hashes() {
        let broken = format!("{}-{}", &A[..16], &A[16..]);
        assert!(scan_in_chunks(broken.as_bytes(), 5).is_empty());
        assert!(scan_in_chunks(&A.as_bytes()[..31], 7).is_empty());
        assert!(scan_in_chunks(A.to_uppercase().as_bytes(), 7).is_empty());
    }

    /// The definition the optimized search must agree with: every window of 32 base32
    /// characters, looked up.
    fn naive(data: &[u8], candidates: &[StorePath]) -> BTreeSet<StorePath> {
        let mut found = BTreeSet::new();
        for window in data.windows(HASH_PART_LEN) {
            if window.iter().all(|&c| is_base32_char(c)) {
                for c in candidates {
                    if c.hash_part().as_bytes() == window {
                        found.insert(c.clone());
                    }
                }
            }
        }
        found
    }

    #[test]
    fn agrees_with_the_naive_definition_on_base32_heavy_data() {
        let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz-";
        let candidates: Vec<StorePath> = (0..40u64)
            .map(|n| {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(n.to_le_bytes());
                path(&crate::base32::encode(&digest[..20]), &format!("p{n}"))
            })
            .collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..200 {
            let mut data = Vec::new();
            while data.len() < 4096 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state.is_multiple_of(50) {
                    let c = &candidates[(state % 40) as usize];
                    data.extend_from_slice(c.hash_part().as_bytes());
                } else {
                    data.push(alphabet[(state % alphabet.len() as u64) as usize]);
                }
            }
            let chunk = 1 + round * 37 % 300;
            let mut scanner = ReferenceScanner::new(candidates.iter().cloned());
            for piece in data.chunks(chunk) {
                scanner.scan(piece);
            }
            assert_eq!(
                scanner.into_found(),
                naive(&data, &candidates),
                "round {round}"
            );
        }
    }
}
