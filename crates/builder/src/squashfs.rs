//! The squashfs writer: a walked [`Tree`] packed through backhand's `FilesystemWriter`, with
//! gensquashfs's geometry (128 KiB blocks, 4 KiB padding) and microvm.nix's default compression
//! (zstd, at gensquashfs's default level 15).
//!
//! File data is streamed: each file is handed to backhand as a [`StoreFileReader`] that opens
//! the file on its first read and closes it at end of file, so one file is open at a time and
//! nothing is read into memory beyond a block.
//!
//! Hard links: backhand gives every node its own inode, so a hard link becomes a second inode.
//! Its data is still stored once for files of at least one block, through backhand's duplicate
//! detection. That detection trusts a 64-bit xxh64 of the content; to make sure it never merges
//! two different files, the readers also SHA-256 every such file and, should two files of the
//! same length share an xxh64 but not their SHA-256, the image is written again without
//! duplicate detection.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use backhand::compression::{CompressionOptions, Compressor, Gzip, Lz4, Zstd};
use backhand::{CompressionExtra, ExtraXz, FilesystemCompressor, FilesystemWriter, NodeHeader};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh64::Xxh64;

use crate::tree::{EntryKind, Tree};
use crate::{BuildError, BuildOptions, Compression, ProgressSink};

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

/// Writes `tree` as a squashfs image to `out` (positioned anywhere: it is rewound); returns the
/// compression level used, if the algorithm has levels.
pub(crate) fn write(
    tree: &Tree,
    options: &BuildOptions,
    out: &File,
    progress: &dyn ProgressSink,
) -> Result<Option<u32>, BuildError> {
    let (compressor, level) =
        filesystem_compressor(options.effective_compression(), options.compression_level)?;
    let total = tree.counts().file_bytes;

    let context = ReadContext {
        progress,
        failure: RefCell::new(None),
        contents: RefCell::new(Vec::new()),
    };
    progress.phase("packing", total);
    write_once(tree, compressor, true, out, &context)?;
    if !duplicate_detection_was_exact(&context.contents.borrow()) {
        // Astronomically unlikely, but then correctness wins over size.
        progress.phase("packing again without duplicate detection", total);
        write_once(tree, compressor, false, out, &context)?;
    }
    Ok(level)
}

fn write_once(
    tree: &Tree,
    compressor: FilesystemCompressor,
    deduplicate: bool,
    out: &File,
    context: &ReadContext<'_>,
) -> Result<(), BuildError> {
    let out_err = |e: io::Error| BuildError::Squashfs(format!("writing the image: {e}"));
    context.contents.borrow_mut().clear();
    out.set_len(0).map_err(out_err)?;
    let mut out_ref = out;
    out_ref.seek(SeekFrom::Start(0)).map_err(out_err)?;

    let mut fs = FilesystemWriter::default();
    fs.set_block_size(BLOCK_SIZE);
    fs.set_time(MTIME);
    fs.set_only_root_id();
    fs.set_root_mode(0o555);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_compressor(compressor);
    fs.set_no_duplicate_files(deduplicate);

    let node_err = |path: &std::path::Path, e: backhand::BackhandError| {
        BuildError::Squashfs(format!("adding {}: {e}", path.display()))
    };
    for entry in tree.entries() {
        let header = NodeHeader::new(entry.mode(), 0, 0, MTIME);
        match &entry.kind {
            EntryKind::Directory => fs.push_dir(&entry.path, header),
            EntryKind::Symlink { target } => fs.push_symlink(target, &entry.path, header),
            EntryKind::Regular { size, .. } => fs.push_file(
                StoreFileReader::new(tree.source(entry), *size, context),
                &entry.path,
                header,
            ),
        }
        .map_err(|e| node_err(&entry.path, e))?;
    }

    let mut writer = BufWriter::with_capacity(1 << 20, out);
    let written = fs.write(&mut writer);
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
    /// (length, xxh64, SHA-256) of every file long enough for backhand's duplicate detection.
    contents: RefCell<Vec<ContentDigest>>,
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

/// A file of the store, opened at its first read and closed at end of file; checks that it
/// still has the size the walk saw.
struct StoreFileReader<'c> {
    path: PathBuf,
    expected_len: u64,
    read_len: u64,
    file: Option<File>,
    finished: bool,
    digests: Option<(Xxh64, Sha256)>,
    context: &'c ReadContext<'c>,
}

impl<'c> StoreFileReader<'c> {
    fn new(path: PathBuf, expected_len: u64, context: &'c ReadContext<'c>) -> Self {
        let digests =
            (expected_len >= u64::from(BLOCK_SIZE)).then(|| (Xxh64::new(0), Sha256::new()));
        StoreFileReader {
            path,
            expected_len,
            read_len: 0,
            file: None,
            finished: false,
            digests,
            context,
        }
    }

    /// Records `error` for the build and gives backhand an io::Error that stops it.
    fn fail(&mut self, error: BuildError) -> io::Error {
        let message = error.to_string();
        self.file = None;
        self.finished = true;
        self.context.failure.borrow_mut().get_or_insert(error);
        io::Error::other(message)
    }

    fn changed(&mut self, reason: String) -> io::Error {
        let path = self.path.clone();
        self.fail(BuildError::Changed { path, reason })
    }
}

impl Read for StoreFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(source) => {
                    let path = self.path.clone();
                    return Err(self.fail(BuildError::Read { path, source }));
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(0);
        };
        let n = match file.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(source) => {
                let path = self.path.clone();
                return Err(self.fail(BuildError::Read { path, source }));
            }
        };
        if n == 0 {
            if self.read_len != self.expected_len {
                let reason = format!(
                    "it is {} bytes long now, {} when the closure was walked",
                    self.read_len, self.expected_len
                );
                return Err(self.changed(reason));
            }
            self.file = None;
            self.finished = true;
            if let Some((xxh, sha)) = self.digests.take() {
                self.context.contents.borrow_mut().push(ContentDigest {
                    len: self.read_len,
                    xxh64: xxh.digest(),
                    sha256: sha.finalize().into(),
                });
            }
            return Ok(0);
        }
        self.read_len += n as u64;
        if self.read_len > self.expected_len {
            let reason = format!(
                "it grew past the {} bytes it had when the closure was walked",
                self.expected_len
            );
            return Err(self.changed(reason));
        }
        if let Some((xxh, sha)) = self.digests.as_mut() {
            xxh.update(&buf[..n]);
            sha.update(&buf[..n]);
        }
        self.context.progress.advance(n as u64);
        Ok(n)
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
}
