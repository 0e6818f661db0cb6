//! Nix's reference scanner: which of a set of candidate store-path hash parts occur in a byte
//! stream. Same algorithm as Nix's `RefScanSink` (refs.cc), including matches that straddle two
//! writes, so it predicts exactly what Nix records as an output's references.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use crate::base32::is_base32_char;
use crate::store_path::{StorePath, HASH_PART_LEN};

/// A `Write` sink that records which candidate store paths' hash parts appear in what is
/// written to it.
#[derive(Debug, Clone)]
pub struct ReferenceScanner {
    candidates: HashMap<[u8; HASH_PART_LEN], StorePath>,
    found: BTreeSet<StorePath>,
    /// The last bytes of the previous write (fewer than `HASH_PART_LEN`).
    tail: Vec<u8>,
}

impl ReferenceScanner {
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> Self {
        let candidates = candidates
            .into_iter()
            .map(|p| {
                let mut key = [0u8; HASH_PART_LEN];
                key.copy_from_slice(p.hash_part().as_bytes());
                (key, p)
            })
            .collect();
        ReferenceScanner {
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
        let mut i = 0;
        'outer: while i + HASH_PART_LEN <= s.len() {
            // Check from the end of the window so a bad byte skips the whole window behind it.
            for j in (0..HASH_PART_LEN).rev() {
                if !is_base32_char(s[i + j]) {
                    i += j + 1;
                    continue 'outer;
                }
            }
            let mut key = [0u8; HASH_PART_LEN];
            key.copy_from_slice(&s[i..i + HASH_PART_LEN]);
            if let Some(path) = self.candidates.remove(&key) {
                self.found.insert(path);
            }
            i += 1;
        }
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
}
