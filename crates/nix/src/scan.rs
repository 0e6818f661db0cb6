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
        if self.found_all() {
            // Found (or none to look for): nothing more can be found. The verifier hashes
            // every NAR through a scanner, most often with no candidates at all.
            return;
        }
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

    /// Whether every candidate has been seen: scanning more cannot change [`Self::found`].
    pub fn found_all(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The candidates seen so far.
    pub fn found(&self) -> &BTreeSet<StorePath> {
        &self.found
    }

    pub fn into_found(self) -> BTreeSet<StorePath> {
        self.found
    }

    fn search(&mut self, s: &[u8]) {
        if self.candidates.is_empty() || s.len() < HASH_PART_LEN {
            return;
        }
        // Every window of 32 nix-base32 characters is looked up, as in Nix. The bytes are
        // classified 64 at a time into a bit mask (a loop the compiler vectorizes); shifting
        // and ANDing the mask with the previous block's then marks, in one word, the last byte
        // of every window of 32 base32 characters, so only those windows are looked at.
        let mut prev = 0u64;
        let mut blocks = s.chunks_exact(BLOCK);
        let mut base = 0;
        for block in &mut blocks {
            // Every window ending in this block contains the previous block's last byte, this
            // block's 32nd or its last: when none is base32 (most blocks of compressed data),
            // no window ends here, and none that starts here can end in the next block.
            let sampled = (prev >> (BLOCK - 1)) as u8
                | BASE32[usize::from(block[HASH_PART_LEN - 1])]
                | BASE32[usize::from(block[BLOCK - 1])];
            if sampled == 0 {
                prev = 0;
                base += BLOCK;
                continue;
            }
            let mut whole = [0u8; BLOCK];
            whole.copy_from_slice(block);
            let mask = base32_mask(&whole);
            // A window needs 32 base32 bytes: none ends here unless some are in this block.
            if mask != 0 {
                self.look_up_windows(s, base, window_ends(prev, mask));
            }
            prev = mask;
            base += BLOCK;
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            // Zero padding is not base32: no window reaches past the end of `s`.
            let mut block = [0u8; BLOCK];
            block[..rest.len()].copy_from_slice(rest);
            let mask = base32_mask(&block);
            if mask != 0 {
                self.look_up_windows(s, base, window_ends(prev, mask));
            }
        }
    }

    /// Looks up the windows of `s` whose last byte is at `base` plus a bit set in `ends`.
    fn look_up_windows(&mut self, s: &[u8], base: usize, mut ends: u64) {
        while ends != 0 {
            let end = base + ends.trailing_zeros() as usize + 1;
            ends &= ends - 1;
            // `window_ends` sets no bit for a window starting before `s` or ending after it.
            let Some(window) = end
                .checked_sub(HASH_PART_LEN)
                .and_then(|start| s.get(start..end))
            else {
                continue;
            };
            if self.prefilter.may_contain(window) {
                let mut key = [0u8; HASH_PART_LEN];
                key.copy_from_slice(window);
                if let Some(path) = self.candidates.remove(&key) {
                    self.found.insert(path);
                    if self.candidates.is_empty() {
                        return;
                    }
                }
            }
        }
    }
}

/// 1 for the nix-base32 characters, 0 for the other bytes.
static BASE32: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = is_base32_char(c as u8) as u8;
        c += 1;
    }
    table
};

/// Bytes classified at a time: one bit each in a `u64`.
const BLOCK: usize = 64;

/// Bit `j` set iff `block[j]` is a nix-base32 character.
fn base32_mask(block: &[u8; BLOCK]) -> u64 {
    // Classify every byte into 0 or 1 (an element-wise loop the compiler vectorizes), then
    // gather each group of 8 into 8 bits with a multiplication: for a word of 0/1 bytes `x`,
    // `x * 0x0102_0408_1020_4080` adds byte `i`'s bit into bit `56 + i` and nothing else there.
    let mut is_base32 = [0u8; BLOCK];
    for (out, &c) in is_base32.iter_mut().zip(block) {
        *out = u8::from(is_base32_branch_free(c));
    }
    let mut mask = 0u64;
    for (k, group) in is_base32.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(group);
        let bits = u64::from_le_bytes(word).wrapping_mul(0x0102_0408_1020_4080) >> 56;
        mask |= bits << (8 * k);
    }
    mask
}

/// [`is_base32_char`] without branches, for [`base32_mask`] to vectorize: `0-9`, or `a-z`
/// except `e o t u`.
fn is_base32_branch_free(c: u8) -> bool {
    let digit = c.wrapping_sub(b'0') < 10;
    let letter = c.wrapping_sub(b'a') < 26;
    digit | (letter & (c != b'e') & (c != b'o') & (c != b't') & (c != b'u'))
}

/// Bit `j` set iff the 32 bytes ending at byte `j` of this block are all base32, given the
/// base32 masks of this block and the previous one (0 before the first): a window may start in
/// the previous block.
fn window_ends(prev: u64, mask: u64) -> u64 {
    const _: () = assert!(HASH_PART_LEN == 32);
    let mut run = (u128::from(mask) << BLOCK) | u128::from(prev);
    // After the steps, bit `k` is set iff bits k-1..=k, then k-3..=k, k-7..=k, k-15..=k and
    // finally k-31..=k all are.
    run &= run << 1;
    run &= run << 2;
    run &= run << 4;
    run &= run << 8;
    run &= run << 16;
    (run >> BLOCK) as u64
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
    use storedisk_testkit::XorShift64;

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
    fn says_when_every_candidate_is_found() {
        let mut s = ReferenceScanner::new([path(A, "a"), path(B, "b")]);
        s.scan(format!("{A} and ").as_bytes());
        assert!(!s.found_all());
        s.scan(B.as_bytes());
        assert!(s.found_all());
        assert!(ReferenceScanner::new([]).found_all());
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
    fn the_block_mask_classifies_every_byte_at_every_position_like_is_base32_char() {
        for c in 0..=255u8 {
            assert_eq!(is_base32_branch_free(c), is_base32_char(c), "byte {c}");
            for at in 0..BLOCK {
                let mut block = [b'e'; BLOCK];
                block[at] = c;
                let expected = if is_base32_char(c) { 1u64 << at } else { 0 };
                assert_eq!(base32_mask(&block), expected, "byte {c} at {at}");
            }
        }
    }

    #[test]
    fn agrees_with_the_naive_definition_on_random_mixed_data_split_anywhere() {
        let alphabet = crate::base32::ALPHABET;
        let candidates: Vec<StorePath> = (0..24u64)
            .map(|n| {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(n.to_be_bytes());
                path(&crate::base32::encode(&digest[..20]), &format!("q{n}"))
            })
            .collect();
        let mut rng = XorShift64::new(0x9E37_79B9_7F4A_7C15);
        let mut planted_found = 0;
        for round in 0..3000 {
            let mut data = Vec::new();
            // A candidate at every offset modulo the 64-byte block, somewhere in the buffer.
            data.extend((0..round % 64).map(|_| b'-'));
            data.extend_from_slice(candidates[round % 24].hash_part().as_bytes());
            let target = 64 + rng.index(1500);
            while data.len() < target {
                match rng.index(6) {
                    // Random bytes, mostly not base32.
                    0 | 1 => data.extend((0..rng.index(70)).map(|_| rng.next_u64() as u8)),
                    // A base32 run of 0 to 99 characters.
                    2 => {
                        let len = rng.index(100);
                        data.extend((0..len).map(|_| alphabet[rng.index(32)]));
                    }
                    // A whole candidate, alone or inside a base32 run.
                    3 => data.extend_from_slice(candidates[rng.index(24)].hash_part().as_bytes()),
                    // Most of a candidate: a window one character short.
                    4 => {
                        let hash = candidates[rng.index(24)].hash_part().as_bytes();
                        let cut = 1 + rng.index(HASH_PART_LEN - 1);
                        data.extend_from_slice(&hash[..cut]);
                        data.push(b'e');
                        data.extend_from_slice(&hash[cut..]);
                    }
                    _ => data.push(b"-/ .e"[rng.index(5)]),
                }
            }
            if round % 7 == 0 {
                // One long base32 run over the whole buffer but its ends.
                let len = data.len();
                for b in &mut data[1..len - 1] {
                    if !is_base32_char(*b) {
                        *b = alphabet[usize::from(*b) % 32];
                    }
                }
            }
            let mut scanner = ReferenceScanner::new(candidates.iter().cloned());
            let mut at = 0;
            while at < data.len() {
                let len = match rng.index(4) {
                    0 => rng.index(3),
                    1 => rng.index(40),
                    _ => rng.index(300),
                };
                let end = (at + len).min(data.len());
                scanner.scan(&data[at..end]);
                at = end;
            }
            let expected = naive(&data, &candidates);
            if expected.contains(&candidates[round % 24]) {
                planted_found += 1;
            }
            assert_eq!(scanner.into_found(), expected, "round {round}");
        }
        // The test is not vacuous: every round's planted candidate is there to be found.
        assert_eq!(planted_found, 3000);
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
        let mut rng = XorShift64::new(0x2545_F491_4F6C_DD1D);
        for round in 0..200 {
            let mut data = Vec::new();
            while data.len() < 4096 {
                let state = rng.next_u64();
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
