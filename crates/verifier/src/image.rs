//! Where an image's bytes come from (a file read with positioned reads, or an in-memory buffer)
//! and format detection by magic number.
//!
//! Files are never mapped or read whole: readers ask for byte ranges with
//! [`ImageSource::read_exact_at`], which checks the range against the image length first (a
//! corrupt offset is an error, never a panic or a huge allocation). Small reads (metadata, erofs
//! pclusters) are served from a few per-thread windows of [`WINDOW_LEN`] bytes, so walking
//! metadata costs a syscall per window rather than per field (a read of a few bytes, an erofs
//! inode or index lying among file data, fills only a 4 KiB window); large reads go straight
//! to `pread`. Memory is bounded by the windows whatever the image size, and the page cache is
//! the kernel's, not counted in our resident set.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use storedisk_format::ImageFormat;

use crate::error::VerifyError;

/// squashfs: `hsqs` at offset 0 (little-endian v4; the only kind mksquashfs/gensquashfs write).
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
/// erofs: 0xE0F5E1E2 little-endian at offset 1024.
const EROFS_MAGIC_OFFSET: usize = 1024;
const EROFS_MAGIC: [u8; 4] = 0xE0F5_E1E2u32.to_le_bytes();

/// Bytes of one read window (reads of at least [`DIRECT_READ`] bytes bypass the windows).
pub const WINDOW_LEN: usize = 64 << 10;
/// Bytes of a window filled for a read shorter than [`SMALL_READ`]: an erofs inode or
/// compression index lies among file data, far from the next one a walk asks for, so the rest
/// of a full window would be copied for nothing. On a 150 MB `--tar=f` image, verify read 1.9x
/// the image through full windows only, 1.3x with these (174 against 118 MiB, in 2,720 against
/// 6,867 `pread`s), ~3% less wall time.
const SMALL_WINDOW_LEN: usize = 4 << 10;
/// Reads shorter than this fill a [`SMALL_WINDOW_LEN`] window.
const SMALL_READ: usize = 512;
/// Reads this large or larger go straight to `pread`.
const DIRECT_READ: usize = 32 << 10;
/// Windows kept per thread: erofs metadata (inodes, compression indexes, directories) lies
/// between file data, so a walk or a file read touches several places at once. Smaller, more
/// numerous windows read less of what is not used (measured on a 150 MB `--tar=f` image before
/// [`SMALL_WINDOW_LEN`]: 8 of 64 KiB copy 1.9x the image, 4 of 128 KiB 2.9x).
const WINDOWS_PER_THREAD: usize = 8;

/// Detects the format from the magic numbers of the image's first bytes.
pub fn detect_format(bytes: &[u8]) -> Result<ImageFormat, VerifyError> {
    detect(bytes, bytes.len() as u64)
}

/// `head` is the start of an image of `len` bytes (at least its first 1028 bytes, if it has them).
fn detect(head: &[u8], len: u64) -> Result<ImageFormat, VerifyError> {
    if len == 0 {
        return Err(VerifyError::UnknownFormat {
            why: "the file is empty".to_owned(),
        });
    }
    if head.starts_with(SQUASHFS_MAGIC) {
        return Ok(ImageFormat::Squashfs);
    }
    if head.get(EROFS_MAGIC_OFFSET..EROFS_MAGIC_OFFSET + 4) == Some(&EROFS_MAGIC[..]) {
        return Ok(ImageFormat::Erofs);
    }
    Err(VerifyError::UnknownFormat {
        why: format!(
            "{len} bytes without the squashfs magic \"hsqs\" at offset 0 or the erofs magic 0xE0F5E1E2 at offset 1024"
        ),
    })
}

/// An image file opened for positioned reads. Its length is taken once, at open: an image that
/// shrinks while it is read gives read errors, not a crash.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    len: u64,
    path: PathBuf,
    /// Distinguishes this open image in the per-thread read windows.
    id: u64,
}

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

impl ImageFile {
    pub fn open(path: &Path) -> Result<Self, VerifyError> {
        let io_err = |cause| VerifyError::Io {
            path: path.to_owned(),
            cause,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(VerifyError::Io {
                path: path.to_owned(),
                cause: io::Error::other("not a regular file"),
            });
        }
        Ok(ImageFile {
            file,
            len: meta.len(),
            path: path.to_owned(),
            id: NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn source(&self) -> ImageSource<'_> {
        ImageSource::File(self)
    }
}

/// The bytes of an image, read by range: a file or a buffer (tests, fuzzing).
#[derive(Debug, Clone, Copy)]
pub enum ImageSource<'a> {
    File(&'a ImageFile),
    Bytes(&'a [u8]),
}

impl<'a> From<&'a [u8]> for ImageSource<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        ImageSource::Bytes(bytes)
    }
}

impl<'a> From<&'a Vec<u8>> for ImageSource<'a> {
    fn from(bytes: &'a Vec<u8>) -> Self {
        ImageSource::Bytes(bytes)
    }
}

impl<'a> From<&'a ImageFile> for ImageSource<'a> {
    fn from(file: &'a ImageFile) -> Self {
        ImageSource::File(file)
    }
}

/// A read outside the image: what a corrupt offset or size gives.
fn out_of_image(offset: u64, len: usize, image_len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("bytes {offset}..+{len} are outside the {image_len}-byte image"),
    )
}

impl ImageSource<'_> {
    pub fn len(&self) -> u64 {
        match self {
            ImageSource::File(f) => f.len,
            ImageSource::Bytes(b) => b.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Detects the image's format from its first bytes.
    pub fn detect_format(&self) -> Result<ImageFormat, VerifyError> {
        let head_len = self.len().min(EROFS_MAGIC_OFFSET as u64 + 4) as usize;
        let head = self
            .read_vec(0, head_len)
            .map_err(|e| self.io_error(e, "reading its first bytes"))?;
        detect(&head, self.len())
    }

    /// An I/O error while reading the image, as a [`VerifyError`] naming the file.
    pub fn io_error(&self, cause: io::Error, doing: &str) -> VerifyError {
        match self {
            ImageSource::File(f) => VerifyError::Io {
                path: f.path.clone(),
                cause: io::Error::new(cause.kind(), format!("{doing}: {cause}")),
            },
            ImageSource::Bytes(_) => VerifyError::corrupt(format!("{doing}: {cause}")),
        }
    }

    /// Fills `buf` from `offset`; the whole range must lie inside the image.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let image_len = self.len();
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > image_len) {
            return Err(out_of_image(offset, buf.len(), image_len));
        }
        match self {
            ImageSource::Bytes(bytes) => {
                // In bounds: checked above against the same length.
                let start = offset as usize;
                buf.copy_from_slice(&bytes[start..start + buf.len()]);
                Ok(())
            }
            ImageSource::File(file) if buf.len() >= DIRECT_READ => {
                file.file.read_exact_at(buf, offset)
            }
            ImageSource::File(file) => read_through_window(file, buf, offset),
        }
    }

    /// `len` bytes from `offset` in a new buffer (allocated only once the range is known to lie
    /// inside the image).
    pub fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.len())
        {
            return Err(out_of_image(offset, len, self.len()));
        }
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// One cached window of an image file.
struct Window {
    image: u64,
    start: u64,
    /// [`WINDOW_LEN`] bytes, of which the first `len` are the image's from `start`: kept at
    /// full length so that refilling never zeroes it first.
    data: Box<[u8]>,
    len: usize,
    last_used: u64,
}

thread_local! {
    static WINDOWS: RefCell<(u64, Vec<Window>)> = const { RefCell::new((0, Vec::new())) };
}

/// Serves a small read from this thread's windows, refilling the least recently used one.
fn read_through_window(file: &ImageFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    WINDOWS.with(|cell| {
        let (clock, windows) = &mut *cell.borrow_mut();
        *clock += 1;
        let end = offset + buf.len() as u64;
        let hit = windows
            .iter_mut()
            .find(|w| w.image == file.id && w.start <= offset && end <= w.start + w.len as u64);
        let window = match hit {
            Some(w) => w,
            None => {
                let window_len = if buf.len() < SMALL_READ {
                    SMALL_WINDOW_LEN
                } else {
                    WINDOW_LEN
                };
                // Aligned down so reads that step back a little (erofs indexes) still hit.
                let start = (offset & !4095).max(end.saturating_sub(window_len as u64));
                let len = (file.len - start).min(window_len as u64) as usize;
                let slot = if windows.len() < WINDOWS_PER_THREAD {
                    windows.push(Window {
                        image: file.id,
                        start,
                        data: vec![0; WINDOW_LEN].into_boxed_slice(),
                        len: 0,
                        last_used: 0,
                    });
                    windows.len() - 1
                } else {
                    windows
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, w)| w.last_used)
                        .map_or(0, |(i, _)| i)
                };
                let w = &mut windows[slot];
                w.image = 0; // invalid until the read succeeds
                file.file.read_exact_at(&mut w.data[..len], start)?;
                w.image = file.id;
                w.start = start;
                w.len = len;
                w
            }
        };
        window.last_used = *clock;
        let from = (offset - window.start) as usize;
        buf.copy_from_slice(&window.data[..window.len][from..from + buf.len()]);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn file_reads_match_the_bytes_and_refuse_ranges_outside() {
        let bytes: Vec<u8> = (0..400_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, &bytes).unwrap();
        let file = ImageFile::open(&path).unwrap();
        let sources = [file.source(), ImageSource::from(&bytes)];
        for source in sources {
            assert_eq!(source.len(), bytes.len() as u64);
            // Small reads forwards, backwards and across window edges (metadata-sized ones
            // across the edges of their 4 KiB windows too); large direct reads.
            for (offset, len) in [
                (0u64, 1usize),
                (131_000, 2_000),
                (4_097, 100),
                (12_285, 300),
                (20_000, 511),
                (24_570, 512),
                (300_000, 40_000),
                (399_990, 10),
                (262_140, 8),
                (0, 400_000),
            ] {
                let got = source.read_vec(offset, len).unwrap();
                assert_eq!(got, &bytes[offset as usize..offset as usize + len]);
            }
            for (offset, len) in [(399_995u64, 10usize), (u64::MAX - 2, 8), (500_000, 0)] {
                let err = source.read_vec(offset, len).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{offset} {len}");
            }
        }
    }

    #[test]
    fn detects_formats_from_a_file_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"hsqs and more").unwrap();
        let file = ImageFile::open(&path).unwrap();
        assert_eq!(
            file.source().detect_format().unwrap(),
            ImageFormat::Squashfs
        );
        std::fs::write(&path, b"").unwrap();
        let empty = ImageFile::open(&path).unwrap();
        assert!(empty.source().detect_format().is_err());
    }
}
