//! The squashfs writer: a walked [`Tree`] packed through backhand's `FilesystemWriter`, with
//! gensquashfs's geometry (128 KiB blocks, 4 KiB padding) and microvm.nix's default compression
//! (zstd, at gensquashfs's default level 15).
//!
//! File data is streamed and compressed on every core: a reader thread reads the files in image
//! order and workers compress their blocks ahead of backhand ([`block_pipeline`]), while
//! backhand lays out the image from the bytes the reader thread hands it. One file is open at a
//! time and at most [`block_pipeline::READ_AHEAD_BYTES`] of file data are in memory. The image
//! does not depend on the number of threads.
//!
//! Hard links: backhand gives every node its own inode, so a hard link becomes a second inode.
//! Its data is still stored once for files of at least one block, through backhand's duplicate
//! detection. That detection trusts a 64-bit xxh64 of the content; to make sure it never merges
//! two different files, the reader thread also SHA-256es every such file and, should two files of
//! the same length share an xxh64 but not their SHA-256, the image is written again without
//! duplicate detection.

mod block_pipeline;

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::tree::{EntryKind, Tree};
use crate::{BuildError, BuildOptions, Compression, ProgressSink};
use backhand::compression::{CompressionOptions, Compressor, Gzip, Lz4, Zstd};
use backhand::{CompressionExtra, ExtraXz, FilesystemCompressor, FilesystemWriter, NodeHeader};
use block_pipeline::{ActiveGuard, DataQueue, FileData, Pipeline, SourceFile};

/// Data block size, as gensquashfs and mksquashfs use by default.
pub const BLOCK_SIZE: u32 = 128 * 1024;
/// zstd level when none is given: gensquashfs's default, which microvm.nix gets.
pub const DEFAULT_ZSTD_LEVEL: u32 = 15;
/// xz preset when none is given (liblzma's default, as gensquashfs and mksquashfs use).
pub const DEFAULT_XZ_LEVEL: u32 = 6;
/// gzip level when none is given (mksquashfs's default).
pub const DEFAULT_GZIP_LEVEL: u32 = 9;
/// Modification time of every entry and of the superblock: the Nix store's canonical 1.
/// (The image root directory keeps 0: backhand has no setter for the root's time.)
pub const MTIME: u32 = 1;
/// Most compression workers a build starts (one per core up to this).
const MAX_THREADS: usize = 16;

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
    let (compressor, level) =
        filesystem_compressor(options.effective_compression(), options.compression_level)?;
    let total = tree.counts().file_bytes;

    progress.phase("packing", total);
    let digests = write_once(tree, compressor, true, out, progress, threads)?;
    if !duplicate_detection_was_exact(&digests) {
        // Astronomically unlikely, but then correctness wins over size.
        progress.phase("packing again without duplicate detection", total);
        write_once(tree, compressor, false, out, progress, threads)?;
    }
    Ok(level)
}

/// Writes the image once; returns the digests of every file of at least one block.
fn write_once(
    tree: &Tree,
    compressor: FilesystemCompressor,
    deduplicate: bool,
    out: &File,
    progress: &dyn ProgressSink,
    threads: usize,
) -> Result<Vec<ContentDigest>, BuildError> {
    let out_err = |e: io::Error| BuildError::Squashfs(format!("writing the image: {e}"));
    out.set_len(0).map_err(out_err)?;
    let mut out_ref = out;
    out_ref.seek(SeekFrom::Start(0)).map_err(out_err)?;

    let files: Vec<SourceFile> = tree
        .entries()
        .iter()
        .filter_map(|entry| match entry.kind {
            EntryKind::Regular { size, .. } => Some(SourceFile {
                path: tree.source(entry),
                expected_len: size,
            }),
            _ => None,
        })
        .collect();
    let pipeline = Pipeline::new();
    let context = ReadContext {
        progress,
        failure: RefCell::new(None),
        data: Arc::clone(&pipeline.data),
    };

    std::thread::scope(|scope| {
        let reader = pipeline.spawn(scope, files, compressor, BLOCK_SIZE, threads);
        let written = write_with_backhand(tree, compressor, deduplicate, out, &context, &pipeline);
        pipeline.hang_up();
        let digests = reader
            .join()
            .map_err(|_| BuildError::Squashfs("the file reader thread panicked".to_owned()))?;
        written?;
        debug_assert_eq!(pipeline.results.mispredicted(), 0);
        Ok(digests)
    })
}

/// backhand's writer with the image's fixed settings: block size, times, root:root, the root
/// directory's mode, the compressor.
fn configured_writer<'a>(
    compressor: FilesystemCompressor,
    deduplicate: bool,
) -> FilesystemWriter<'a, 'a, 'a> {
    let mut fs = FilesystemWriter::default();
    fs.set_block_size(BLOCK_SIZE);
    fs.set_time(MTIME);
    fs.set_only_root_id();
    fs.set_root_mode(0o555);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_compressor(compressor);
    fs.set_no_duplicate_files(deduplicate);
    fs
}

/// Hands the tree to backhand's writer, with the pipeline's readers and compressor.
fn write_with_backhand(
    tree: &Tree,
    compressor: FilesystemCompressor,
    deduplicate: bool,
    out: &File,
    context: &ReadContext<'_>,
    pipeline: &Pipeline,
) -> Result<(), BuildError> {
    let out_err = |e: io::Error| BuildError::Squashfs(format!("writing the image: {e}"));
    let mut fs = configured_writer(compressor, deduplicate);
    fs.set_kind(block_pipeline::kind());

    let node_err = |path: &std::path::Path, e: backhand::BackhandError| {
        BuildError::Squashfs(format!("adding {}: {e}", path.display()))
    };
    let mut ordinal = 0;
    for entry in tree.entries() {
        let header = NodeHeader::new(entry.mode(), 0, 0, MTIME);
        match &entry.kind {
            EntryKind::Directory => fs.push_dir(&entry.path, header),
            EntryKind::Symlink { target } => fs.push_symlink(target, &entry.path, header),
            EntryKind::Regular { .. } => {
                ordinal += 1;
                fs.push_file(
                    StoreFileReader::new(ordinal - 1, context),
                    &entry.path,
                    header,
                )
            }
        }
        .map_err(|e| node_err(&entry.path, e))?;
    }

    let mut writer = BufWriter::with_capacity(1 << 20, out);
    let written = {
        let _active = ActiveGuard::install(Arc::clone(&pipeline.results));
        fs.write(&mut writer)
    };
    // A reader's own error (naming the file) explains a failed write better than backhand's.
    if let Some(failure) = context.failure.borrow_mut().take() {
        return Err(failure);
    }
    let (_, image_len) = written.map_err(|e| BuildError::Squashfs(e.to_string()))?;
    writer
        .into_inner()
        .map_err(|e| out_err(e.into_error()))?
        .flush()
        .map_err(out_err)?;
    // When the last files' data turned out to be duplicates, backhand seeked back over it and
    // wrote the tables there; the stale bytes past the image's end must go.
    out.set_len(image_len).map_err(out_err)?;
    Ok(())
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

/// What the file readers share while backhand pulls data through them.
struct ReadContext<'p> {
    progress: &'p dyn ProgressSink,
    /// The first error a reader met, with the file's path (backhand only keeps an io::Error).
    failure: RefCell<Option<BuildError>>,
    /// The file data the pipeline's reader thread read, in tree order.
    data: Arc<DataQueue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ContentDigest {
    len: u64,
    xxh64: u64,
    sha256: [u8; 32],
}

/// True when no two files that backhand considers duplicates (same length, same xxh64 of the
/// whole content, at least one block long) differ.
fn duplicate_detection_was_exact(digests: &[ContentDigest]) -> bool {
    let mut sorted = digests.to_vec();
    sorted.sort();
    sorted
        .windows(2)
        .all(|w| (w[0].len, w[0].xxh64) != (w[1].len, w[1].xxh64) || w[0].sha256 == w[1].sha256)
}

/// The data of one store file as backhand reads it: served from the pipeline's queue, which
/// holds what the reader thread read from disk (and checked against the walked size).
struct StoreFileReader<'c> {
    /// This file's position among the regular files, to check the queue is in step.
    ordinal: usize,
    chunk: Option<Arc<Vec<u8>>>,
    offset: usize,
    finished: bool,
    context: &'c ReadContext<'c>,
}

impl<'c> StoreFileReader<'c> {
    fn new(ordinal: usize, context: &'c ReadContext<'c>) -> Self {
        StoreFileReader {
            ordinal,
            chunk: None,
            offset: 0,
            finished: false,
            context,
        }
    }

    /// Records `error` for the build and gives backhand an io::Error that stops it.
    fn fail(&mut self, error: BuildError) -> io::Error {
        let message = error.to_string();
        self.chunk = None;
        self.finished = true;
        self.context.failure.borrow_mut().get_or_insert(error);
        io::Error::other(message)
    }
}

impl Read for StoreFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.finished || buf.is_empty() {
                return Ok(0);
            }
            if let Some(chunk) = &self.chunk {
                let rest = &chunk[self.offset..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.offset += n;
                    self.context.progress.advance(n as u64);
                    return Ok(n);
                }
                self.chunk = None;
            }
            match self.context.data.pop() {
                Some((ordinal, data)) if ordinal == self.ordinal => match data {
                    FileData::Chunk(chunk) => {
                        self.chunk = Some(chunk);
                        self.offset = 0;
                    }
                    FileData::End => {
                        self.finished = true;
                        return Ok(0);
                    }
                    FileData::Failed(error) => return Err(self.fail(error)),
                },
                other => {
                    let got = other.map(|(ordinal, _)| ordinal);
                    return Err(self.fail(BuildError::Squashfs(format!(
                        "internal error: backhand asked for file #{} but the reader thread sent \
                         {got:?}",
                        self.ordinal
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(len: u64, xxh64: u64, sha: u8) -> ContentDigest {
        ContentDigest {
            len,
            xxh64,
            sha256: [sha; 32],
        }
    }

    #[test]
    fn duplicate_detection_is_exact_unless_a_hash_collides() {
        assert!(duplicate_detection_was_exact(&[]));
        // True duplicates (hard links, copies) are fine.
        assert!(duplicate_detection_was_exact(&[
            digest(200_000, 7, 1),
            digest(300_000, 7, 2),
            digest(200_000, 7, 1),
        ]));
        // Same length and xxh64, different content: backhand would have merged them.
        assert!(!duplicate_detection_was_exact(&[
            digest(200_000, 7, 1),
            digest(300_000, 9, 3),
            digest(200_000, 7, 2),
        ]));
    }

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

    /// A store with every case the block predictions must follow: empty files, files just
    /// under, at and over one block, all-zero blocks (holes), a zero tail, duplicates (also of
    /// more than a block), and enough small files to fill the fragment buffer several times.
    fn prediction_store() -> (tempfile::TempDir, storedisk_nix::Closure) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let top = format!("{}-prediction", "b".repeat(32));
        let root = dir.path().join(&top);
        std::fs::create_dir_all(root.join("small")).unwrap_or_else(|e| panic!("{e}"));
        let block = BLOCK_SIZE as usize;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut bytes = |len: usize, text: bool| -> Vec<u8> {
            (0..len)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
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
        let files: Vec<(String, Vec<u8>)> = vec![
            ("empty".into(), Vec::new()),
            ("one-byte".into(), b"x".to_vec()),
            ("just-under".into(), bytes(block - 1, true)),
            ("exact".into(), bytes(block, false)),
            ("just-over".into(), bytes(block + 1, true)),
            ("big".into(), big.clone()),
            ("big-copy".into(), big),
            ("zeros".into(), vec![0; 2 * block]),
            ("zero-tail".into(), zero_tail),
            ("zero-middle".into(), zero_middle),
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

    /// The image plain backhand writes, compressing inline and reading the files itself.
    fn image_without_pipeline(tree: &Tree) -> Vec<u8> {
        let (compressor, _) =
            filesystem_compressor(Compression::Zstd, None).unwrap_or_else(|e| panic!("{e}"));
        let mut fs = configured_writer(compressor, true);
        for entry in tree.entries() {
            let header = NodeHeader::new(entry.mode(), 0, 0, MTIME);
            match &entry.kind {
                EntryKind::Directory => fs.push_dir(&entry.path, header),
                EntryKind::Symlink { target } => fs.push_symlink(target, &entry.path, header),
                EntryKind::Regular { .. } => fs.push_file(
                    File::open(tree.source(entry)).unwrap_or_else(|e| panic!("{e}")),
                    &entry.path,
                    header,
                ),
            }
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut image = io::Cursor::new(Vec::new());
        let (_, len) = fs.write(&mut image).unwrap_or_else(|e| panic!("{e}"));
        let mut image = image.into_inner();
        image.truncate(len as usize);
        image
    }

    #[test]
    fn parallel_compression_writes_what_backhand_alone_writes_whatever_the_thread_count() {
        let (store, closure) = prediction_store();
        let tree = Tree::walk(&closure, store.path()).unwrap_or_else(|e| panic!("{e}"));
        let reference = image_without_pipeline(&tree);
        for threads in [1, 2, 5] {
            // (write_once also asserts, in debug builds, that every block was predicted.)
            let image = image_with_threads(&tree, store.path(), threads);
            assert!(
                image == reference,
                "with {threads} threads the image ({} bytes) differs from backhand's own ({} bytes)",
                image.len(),
                reference.len()
            );
        }
    }
}
