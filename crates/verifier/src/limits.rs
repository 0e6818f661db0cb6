//! `Limits`: the bounds the readers enforce on everything an image declares about itself, so a
//! hostile image costs bounded memory and time.

/// Safety limits for reading an image. The defaults are far above any real Nix store.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deepest directory nesting accepted (Linux paths are at most 4096 bytes).
    pub max_depth: usize,
    /// Most directory entries accepted in the whole image.
    pub max_entries: u64,
    /// Longest symlink target accepted (Linux: PATH_MAX).
    pub max_symlink_target: u64,
    /// Most decompressed metadata (squashfs inode + directory tables) accepted, in bytes.
    pub max_metadata_bytes: u64,
    /// File data (the sum of every regular file's size, hard links counted each time) may be at
    /// most this many times the image size...
    pub max_expansion: u64,
    /// ...or this many bytes, whichever is larger.
    pub min_data_budget: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 1024,
            max_entries: 20_000_000,
            max_symlink_target: 4096,
            max_metadata_bytes: 1 << 30,
            max_expansion: 4096,
            min_data_budget: 1 << 30,
        }
    }
}

impl Limits {
    /// Small budgets for fuzzing, where each input must be judged in milliseconds.
    pub fn for_fuzzing() -> Self {
        Limits {
            max_depth: 256,
            max_entries: 100_000,
            max_symlink_target: 4096,
            max_metadata_bytes: 16 << 20,
            max_expansion: 64,
            min_data_budget: 16 << 20,
        }
    }

    /// How many bytes of file data an image of `image_len` bytes may declare.
    pub fn data_budget(&self, image_len: u64) -> u64 {
        image_len
            .saturating_mul(self.max_expansion)
            .max(self.min_data_budget)
    }
}
