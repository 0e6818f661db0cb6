//! The pseudo-random generators of the tests and fixtures, each written once: tiny, without a
//! dependency, and the same on every machine, so generated data and mutation positions are
//! reproducible.
//!
//! - [`XorShift64`] (Marsaglia's 13/7/17): test data, mutants, corruptions.
//! - [`SplitMix64`]: [`crate::closure_gen`]'s closures only. Its stream *is* the benchmark's
//!   closure and the harness's `realistic` scenario, pinned by `golden/realistic-*.snap` and
//!   the tables of docs/benchmarks.md: moving it to the other generator would change them all.

/// xorshift64 with Marsaglia's shifts 13, 7, 17.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator whose first step starts from `state` (never 0: xorshift stays at 0).
    pub fn new(state: u64) -> Self {
        XorShift64(state.max(1))
    }

    /// A generator for `seed`: the seed spread by the golden ratio, made odd.
    pub fn from_seed(seed: u64) -> Self {
        XorShift64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index into `n` items: in `0..n` (0 when `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// splitmix64.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(state: u64) -> Self {
        SplitMix64(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The first outputs, pinned (computed apart, in Python; splitmix64(0)'s is the reference
    // implementation's): every fixture made from them changes if these do.
    #[test]
    fn streams_are_fixed() {
        let mut x = XorShift64::new(0x2545_F491_4F6C_DD1D);
        let firsts: Vec<u64> = (0..3).map(|_| x.next_u64()).collect();
        assert_eq!(
            firsts,
            [
                0x7f6c_280b_eaa8_e3e7,
                0xe471_1987_1cf9_abe0,
                0x3517_4a41_58b8_a0b7
            ]
        );
        let mut s = SplitMix64::new(0);
        assert_eq!(s.next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}
