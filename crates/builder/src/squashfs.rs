//! The squashfs writer: a walked [`Tree`] laid out as a squashfs 4.0 image the way mksquashfs
//! lays it out (superblock, compression options, file data, inode table, directory table,
//! fragment table, id table, 4 KiB padding), with gensquashfs's geometry (128 KiB blocks) and
//! microvm.nix's default compression (zstd, at gensquashfs's default level 15).
//!
//! File data is read once, compressed on every core and stored once per distinct content
//! ([`data`]); the tables are then built in memory ([`tables`]) and the superblock written
//! last. Every entry is root:root with time [`MTIME`]; the image does not depend on the
//! number of threads. Hard links become separate inodes sharing their data.
//!
//! Compression goes through backhand's `DefaultCompressor`, block by block, so each block's
//! bytes are what backhand (and the verifier's reader) expect of the algorithm and level.

mod data;
mod tables;

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use crate::tree::Tree;
use crate::{BuildError, BuildOptions, Compression, ProgressSink};
use backhand::compression::{
    CompressionAction, CompressionOptions, Compressor, DefaultCompressor, Gzip, Lz4, Zstd,
};
use backhand::{CompressionExtra, ExtraXz, FilesystemCompressor};
use tables::{Tables, SUPERBLOCK_LEN};

/// Data block size, as gensquashfs and mksquashfs use by default.
pub const BLOCK_SIZE: u32 = 128 * 1024;
/// zstd level when none is given: gensquashfs's default, which microvm.nix gets.
pub const DEFAULT_ZSTD_LEVEL: u32 = 15;
/// xz preset when none is given (liblzma's default, as gensquashfs and mksquashfs use).
pub const DEFAULT_XZ_LEVEL: u32 = 6;
/// gzip level when none is given (mksquashfs's default).
pub const DEFAULT_GZIP_LEVEL: u32 = 9;
/// Modification time of every entry and of the superblock: the Nix store's canonical 1.
pub const MTIME: u32 = 1;
/// Most compression workers a build starts (one per core up to this).
const MAX_THREADS: usize = 16;
/// Images are padded to a multiple of this (mksquashfs's and gensquashfs's default).
const PADDING: u64 = 4096;

/// Writes `tree` as a squashfs image to `out` (positioned anywhere: it is rewound); returns the
/// compression level used, if the algorithm has levels.
pub(crate) fn write(
    tree: &Tree,
    options: &BuildOptions,
    out: &File,
    progress: &dyn ProgressSink,
) -> Result<Option<u32>, BuildError> {
    let threads = options.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    });
    write_with_threads(tree, options, out, progress, threads.max(1))
}

/// [`write`] with `threads` compression workers (the image does not depend on it).
fn write_with_threads(
    tree: &Tree,
    options: &BuildOptions,
    out: &File,
    progress: &dyn ProgressSink,
    threads: usize,
) -> Result<Option<u32>, BuildError> {
    let codec = Codec::new(options.effective_compression(), options.compression_level)?;
    let out_err = |e: io::Error| BuildError::Squashfs(format!("writing the image: {e}"));
    out.set_len(0).map_err(out_err)?;
    let mut writer = BufWriter::with_capacity(1 << 20, out);
    let options_block = codec.options_block();
    let data_start = SUPERBLOCK_LEN + options_block.len() as u64;
    writer.seek(SeekFrom::Start(data_start)).map_err(out_err)?;

    progress.phase("packing", tree.counts().file_bytes);
    let layout = data::write_data(tree, &codec, &mut writer, data_start, threads, progress)?;
    let tables = Tables::build(tree, &layout, &codec)?;
    let (table_bytes, superblock) = tables.serialize(layout.end, &codec);
    let bytes_used = layout.end + table_bytes.len() as u64;
    let image_len = bytes_used.div_ceil(PADDING) * PADDING;

    writer.seek(SeekFrom::Start(layout.end)).map_err(out_err)?;
    writer.write_all(&table_bytes).map_err(out_err)?;
    writer
        .write_all(&vec![0; (image_len - bytes_used) as usize])
        .map_err(out_err)?;
    writer.seek(SeekFrom::Start(0)).map_err(out_err)?;
    writer.write_all(&superblock).map_err(out_err)?;
    writer.write_all(&options_block).map_err(out_err)?;
    writer
        .into_inner()
        .map_err(|e| out_err(e.into_error()))?
        .flush()
        .map_err(out_err)?;
    // A copy's blocks, written and then taken back, may have reached past the image's end.
    out.set_len(image_len).map_err(out_err)?;
    Ok(codec.level)
}

/// The image's compression: backhand's compressor for the data and metadata blocks, and what
/// the superblock says of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Codec {
    compression: Compression,
    level: Option<u32>,
    backhand: FilesystemCompressor,
}

impl Codec {
    fn new(compression: Compression, level: Option<u32>) -> Result<Codec, BuildError> {
        let (backhand, level) = filesystem_compressor(compression, level)?;
        Ok(Codec {
            compression,
            level,
            backhand,
        })
    }

    /// `bytes` compressed (a block of at most [`BLOCK_SIZE`]).
    fn compress(&self, bytes: &[u8]) -> Result<Vec<u8>, BuildError> {
        DefaultCompressor
            .compress(bytes, self.backhand, BLOCK_SIZE)
            .map_err(|e| {
                BuildError::Squashfs(format!("{} compression failed: {e}", self.compression))
            })
    }

    /// The superblock's compressor id.
    fn id(&self) -> u16 {
        match self.compression {
            Compression::Gzip => 1,
            Compression::Xz => 4,
            Compression::Lz4 => 5,
            // Codec::new accepts nothing else.
            _ => 6,
        }
    }

    /// The compressor options the superblock is followed by (`squashfs_fs.h`), if any: zstd's
    /// level, gzip's level, window and strategies, lz4's version and flags. xz has none: the
    /// kernel then takes the block size as its dictionary size.
    fn options(&self) -> Option<Vec<u8>> {
        let mut options = Vec::new();
        match self.compression {
            Compression::Zstd => {
                options.extend_from_slice(&self.level.unwrap_or(DEFAULT_ZSTD_LEVEL).to_le_bytes())
            }
            Compression::Gzip => {
                options.extend_from_slice(&self.level.unwrap_or(DEFAULT_GZIP_LEVEL).to_le_bytes());
                options.extend_from_slice(&15u16.to_le_bytes());
                options.extend_from_slice(&0u16.to_le_bytes());
            }
            Compression::Lz4 => {
                options.extend_from_slice(&1u32.to_le_bytes());
                options.extend_from_slice(&0u32.to_le_bytes());
            }
            _ => return None,
        }
        Some(options)
    }

    /// [`Codec::options`] as the uncompressed metadata block stored after the superblock.
    fn options_block(&self) -> Vec<u8> {
        let Some(options) = self.options() else {
            return Vec::new();
        };
        let mut block = (options.len() as u16 | 0x8000).to_le_bytes().to_vec();
        block.extend_from_slice(&options);
        block
    }
}

/// backhand's compressor settings for `compression` at `level` (or the default level).
fn filesystem_compressor(
    compression: Compression,
    level: Option<u32>,
) -> Result<(FilesystemCompressor, Option<u32>), BuildError> {
    let bad_level = |level: u32, reason: &str| BuildError::BadCompressionLevel {
        compression,
        level,
        reason: reason.to_owned(),
    };
    let invalid = |e: backhand::BackhandError| BuildError::Squashfs(e.to_string());
    match compression {
        Compression::Zstd => {
            let level = level.unwrap_or(DEFAULT_ZSTD_LEVEL);
            if !(1..=22).contains(&level) {
                return Err(bad_level(level, "zstd levels are 1 to 22"));
            }
            let options = CompressionOptions::Zstd(Zstd {
                compression_level: level,
            });
            let compressor =
                FilesystemCompressor::new(Compressor::Zstd, Some(options)).map_err(invalid)?;
            Ok((compressor, Some(level)))
        }
        Compression::Xz => {
            let level = level.unwrap_or(DEFAULT_XZ_LEVEL);
            if level > 9 {
                return Err(bad_level(level, "xz presets are 0 to 9"));
            }
            let mut extra = ExtraXz::default();
            extra.level(level).map_err(invalid)?;
            let mut compressor =
                FilesystemCompressor::new(Compressor::Xz, None).map_err(invalid)?;
            compressor
                .extra(CompressionExtra::Xz(extra))
                .map_err(invalid)?;
            Ok((compressor, Some(level)))
        }
        Compression::Gzip => {
            let level = level.unwrap_or(DEFAULT_GZIP_LEVEL);
            if !(1..=9).contains(&level) {
                return Err(bad_level(level, "gzip levels are 1 to 9"));
            }
            let options = CompressionOptions::Gzip(Gzip {
                compression_level: level,
                window_size: 15,
                strategies: 0,
            });
            let compressor =
                FilesystemCompressor::new(Compressor::Gzip, Some(options)).map_err(invalid)?;
            Ok((compressor, Some(level)))
        }
        Compression::Lz4 => {
            if let Some(level) = level {
                return Err(bad_level(level, "squashfs lz4 has no levels"));
            }
            // Version 1 is the only lz4 format squashfs knows; flags 0: not lz4hc.
            let options = CompressionOptions::Lz4(Lz4 {
                version: 1,
                flags: 0,
            });
            let compressor =
                FilesystemCompressor::new(Compressor::Lz4, Some(options)).map_err(invalid)?;
            Ok((compressor, None))
        }
        other => Err(BuildError::UnsupportedCompression {
            format: crate::ImageFormat::Squashfs,
            compression: other,
            choices: "zstd, xz, gzip, lz4".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_levels_the_compressor_does_not_have() {
        assert!(filesystem_compressor(Compression::Zstd, Some(23)).is_err());
        assert!(filesystem_compressor(Compression::Xz, Some(10)).is_err());
        assert!(filesystem_compressor(Compression::Gzip, Some(0)).is_err());
        assert!(filesystem_compressor(Compression::Lz4, Some(1)).is_err());
        assert!(filesystem_compressor(Compression::Lz4hc, None).is_err());
        let (_, level) =
            filesystem_compressor(Compression::Zstd, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(level, Some(DEFAULT_ZSTD_LEVEL));
    }

    #[test]
    fn compressor_options_are_the_kernels_layout() {
        let codec = |c, l| Codec::new(c, l).unwrap_or_else(|e| panic!("{e}"));
        // Header 0x8000 | length (stored uncompressed), then the fields, little-endian.
        assert_eq!(
            codec(Compression::Zstd, Some(19)).options_block(),
            [0x04, 0x80, 19, 0, 0, 0]
        );
        assert_eq!(
            codec(Compression::Gzip, Some(6)).options_block(),
            [0x08, 0x80, 6, 0, 0, 0, 15, 0, 0, 0]
        );
        assert_eq!(
            codec(Compression::Lz4, None).options_block(),
            [0x08, 0x80, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert!(codec(Compression::Xz, None).options_block().is_empty());
        assert_eq!(codec(Compression::Zstd, None).id(), 6);
        assert_eq!(codec(Compression::Xz, None).id(), 4);
    }

    /// A store with every case the data layout must handle: empty files, files just under, at
    /// and over one block, all-zero blocks (holes), a zero tail, copies of small and large
    /// files (a large copy followed by other data, which must go over the copy's blocks), and
    /// enough small files to fill several fragment blocks.
    fn layout_store() -> (tempfile::TempDir, storedisk_nix::Closure) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let top = format!("{}-layout", "b".repeat(32));
        let root = dir.path().join(&top);
        std::fs::create_dir_all(root.join("small")).unwrap_or_else(|e| panic!("{e}"));
        let block = BLOCK_SIZE as usize;
        let mut rng = storedisk_testkit::XorShift64::new(0x2545_f491_4f6c_dd1d);
        let mut bytes = |len: usize, text: bool| -> Vec<u8> {
            (0..len)
                .map(|i| {
                    let state = rng.next_u64();
                    if text {
                        b"abcdefgh /nix/store\n"[(state % 20) as usize]
                    } else if i % 3 == 0 {
                        0
                    } else {
                        state as u8
                    }
                })
                .collect()
        };
        let mut zero_tail = bytes(block, false);
        zero_tail.extend(vec![0; 1000]);
        let mut zero_middle = bytes(block, true);
        zero_middle.extend(vec![0; block]);
        zero_middle.extend(bytes(5000, true));
        let big = bytes(2 * block + 77, false);
        let mut big_twin = big.clone();
        big_twin[block + 5] ^= 1;
        let license = bytes(3000, true);
        let files: Vec<(String, Vec<u8>)> = vec![
            ("empty".into(), Vec::new()),
            ("one-byte".into(), b"x".to_vec()),
            ("just-under".into(), bytes(block - 1, true)),
            ("exact".into(), bytes(block, false)),
            ("just-over".into(), bytes(block + 1, true)),
            ("big".into(), big.clone()),
            ("big-copy".into(), big),
            ("big-twin".into(), big_twin),
            ("zeros".into(), vec![0; 2 * block]),
            ("zero-tail".into(), zero_tail),
            ("zero-middle".into(), zero_middle),
            ("license-a".into(), license.clone()),
            ("small/license-b".into(), license),
        ];
        for (name, data) in &files {
            std::fs::write(root.join(name), data).unwrap_or_else(|e| panic!("{e}"));
        }
        for i in 0..120 {
            let len = (i * 7919) % 9000;
            std::fs::write(root.join(format!("small/{i:03}")), bytes(len, i % 2 == 0))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::set_permissions(root.join("exact"), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        let path = storedisk_nix::StorePath::from_base_name(&top).unwrap_or_else(|e| panic!("{e}"));
        let closure = storedisk_nix::Closure::new(
            storedisk_nix::StoreDir::default(),
            vec![storedisk_nix::PathInfo::new(path)],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (dir, closure)
    }

    fn image_with_threads(tree: &Tree, store: &std::path::Path, threads: usize) -> Vec<u8> {
        use std::io::Read;
        let mut options = BuildOptions::new(crate::ImageFormat::Squashfs);
        options.store_dir = store.to_owned();
        let out = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        write_with_threads(tree, &options, &out, &crate::NoProgress, threads)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut image = Vec::new();
        let mut reader = &out;
        reader
            .seek(SeekFrom::Start(0))
            .unwrap_or_else(|e| panic!("{e}"));
        reader
            .read_to_end(&mut image)
            .unwrap_or_else(|e| panic!("{e}"));
        image
    }

    #[test]
    fn the_image_does_not_depend_on_the_thread_count() {
        let (store, closure) = layout_store();
        let tree = Tree::walk(&closure, store.path()).unwrap_or_else(|e| panic!("{e}"));
        let reference = image_with_threads(&tree, store.path(), 1);
        assert_eq!(reference.len() % PADDING as usize, 0);
        assert_eq!(&reference[..4], b"hsqs");
        for threads in [2, 5] {
            let image = image_with_threads(&tree, store.path(), threads);
            assert!(
                image == reference,
                "with {threads} threads the image ({} bytes) differs from the one-thread image ({} bytes)",
                image.len(),
                reference.len()
            );
        }
    }

    #[test]
    fn identical_contents_are_stored_once_and_others_apart() {
        let (store, closure) = layout_store();
        let tree = Tree::walk(&closure, store.path()).unwrap_or_else(|e| panic!("{e}"));
        let codec = Codec::new(Compression::Zstd, Some(3)).unwrap_or_else(|e| panic!("{e}"));
        let out = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        let mut writer = BufWriter::new(&out);
        let layout = data::write_data(&tree, &codec, &mut writer, 100, 2, &crate::NoProgress)
            .unwrap_or_else(|e| panic!("{e}"));
        let files: Vec<String> = tree
            .entries()
            .iter()
            .filter(|e| matches!(e.kind, crate::tree::EntryKind::Regular { .. }))
            .map(|e| {
                e.path
                    .to_string_lossy()
                    .split_once('/')
                    .map_or(String::new(), |(_, rest)| rest.to_owned())
            })
            .collect();
        let data = |name: &str| {
            let at = files
                .iter()
                .position(|f| f == name)
                .unwrap_or_else(|| panic!("no file {name} in {files:?}"));
            &layout.files[at]
        };
        // A copy of a large file points at the first one's blocks; a near-twin has its own.
        assert_eq!(data("big-copy"), data("big"));
        assert_ne!(data("big-twin").blocks_start, data("big").blocks_start);
        assert_eq!(data("big").block_sizes.len(), 3);
        // The data written after the copy went over its blocks: everything is contiguous.
        assert!(data("exact").blocks_start > data("big-twin").blocks_start);
        // A copy of a small file shares its place in a fragment block.
        assert!(data("license-a").fragment.is_some());
        assert_eq!(data("small/license-b"), data("license-a"));
        assert_ne!(data("small/000").fragment, data("small/002").fragment);
        // Holes: whole blocks of zeros store nothing.
        assert_eq!(data("zeros").block_sizes, [0, 0]);
        assert_eq!(data("zeros").sparse, 2 * u64::from(BLOCK_SIZE));
        assert_eq!(data("zero-middle").block_sizes[1], 0);
        assert_eq!(data("empty"), &data::FileData::default());
        assert_eq!(layout.copies, 2);
        assert!(layout.fragments.len() > 3, "{}", layout.fragments.len());
        // Blocks are laid out back to back from the start, in file order.
        let mut stored: Vec<(u64, u64)> = layout
            .files
            .iter()
            .filter(|f| !f.block_sizes.is_empty())
            .map(|f| {
                let len = f
                    .block_sizes
                    .iter()
                    .map(|w| u64::from(w & 0x00ff_ffff))
                    .sum();
                (f.blocks_start, len)
            })
            .chain(
                layout
                    .fragments
                    .iter()
                    .map(|f| (f.start, u64::from(f.size & 0x00ff_ffff))),
            )
            .collect();
        stored.sort();
        stored.dedup();
        let mut at = 100;
        for (start, len) in stored {
            assert_eq!(start, at, "data is not contiguous at {start}");
            at += len;
        }
        assert_eq!(at, layout.end);
    }

    #[test]
    fn a_file_that_changed_since_the_walk_fails_naming_it_and_its_lengths() {
        let codec = Codec::new(Compression::Zstd, Some(3)).unwrap_or_else(|e| panic!("{e}"));
        // A small file that grew, and a large one that shrank.
        for (name, len, walked) in [
            ("one-byte", 5_000u64, 1u64),
            ("big", 1_000, 2 * 131_072 + 77),
        ] {
            let (store, closure) = layout_store();
            let tree = Tree::walk(&closure, store.path()).unwrap_or_else(|e| panic!("{e}"));
            let root = store.path().join(format!("{}-layout", "b".repeat(32)));
            let file = root.join(name);
            std::fs::write(&file, vec![7u8; len as usize]).unwrap_or_else(|e| panic!("{e}"));
            let out = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
            let mut writer = BufWriter::new(&out);
            match data::write_data(&tree, &codec, &mut writer, 100, 2, &crate::NoProgress) {
                Err(BuildError::Changed { path, reason }) => {
                    assert_eq!(path, file);
                    assert_eq!(
                        reason,
                        format!("it is {len} bytes long now, {walked} when the closure was walked")
                    );
                }
                other => panic!("{name}: expected a Changed error, got {other:?}"),
            }
        }
    }
}
