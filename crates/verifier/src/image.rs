//! The bytes of an image (memory-mapped file or an in-memory buffer) and format detection by
//! magic number.

use std::fmt;
use std::path::Path;

use erofs_rs::backend::{Image, MmapImage};

use crate::error::VerifyError;

/// squashfs: `hsqs` at offset 0 (little-endian v4; the only kind mksquashfs/gensquashfs write).
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
/// erofs: 0xE0F5E1E2 little-endian at offset 1024.
const EROFS_MAGIC_OFFSET: usize = 1024;
const EROFS_MAGIC: [u8; 4] = 0xE0F5_E1E2u32.to_le_bytes();

/// The on-disk format of a store disk image.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Squashfs,
    Erofs,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Squashfs => "squashfs",
            ImageFormat::Erofs => "erofs",
        })
    }
}

/// Detects the format from the magic numbers.
pub fn detect_format(bytes: &[u8]) -> Result<ImageFormat, VerifyError> {
    if bytes.is_empty() {
        return Err(VerifyError::UnknownFormat {
            why: "the file is empty".to_owned(),
        });
    }
    if bytes.starts_with(SQUASHFS_MAGIC) {
        return Ok(ImageFormat::Squashfs);
    }
    if bytes.get(EROFS_MAGIC_OFFSET..EROFS_MAGIC_OFFSET + 4) == Some(&EROFS_MAGIC[..]) {
        return Ok(ImageFormat::Erofs);
    }
    Err(VerifyError::UnknownFormat {
        why: format!(
            "{} bytes without the squashfs magic \"hsqs\" at offset 0 or the erofs magic 0xE0F5E1E2 at offset 1024",
            bytes.len()
        ),
    })
}

/// The whole image as one byte slice: the readers and the reference scanner work on slices.
pub enum ImageBytes {
    /// A file mapped read-only into memory (nothing is read until touched).
    Mapped(MmapImage),
    Owned(Vec<u8>),
}

impl fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageBytes::Mapped(_) => write!(f, "ImageBytes::Mapped({} bytes)", self.len()),
            ImageBytes::Owned(v) => write!(f, "ImageBytes::Owned({} bytes)", v.len()),
        }
    }
}

impl ImageBytes {
    /// Maps the image file. An empty file is read as an empty buffer (mmap rejects length 0).
    pub fn open(path: &Path) -> Result<Self, VerifyError> {
        let io_err = |cause| VerifyError::Io {
            path: path.to_owned(),
            cause,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(VerifyError::Io {
                path: path.to_owned(),
                cause: std::io::Error::other("not a regular file"),
            });
        }
        if meta.len() == 0 {
            return Ok(ImageBytes::Owned(Vec::new()));
        }
        // SAFETY: the mapping is read-only and private to this process. Another process
        // truncating the file while we read it would raise SIGBUS; a verifier cannot defend
        // against its input being rewritten underneath it, and a copy into memory would cost
        // the image's size in RAM. Images are build outputs (immutable store paths) in practice.
        #[allow(unsafe_code)]
        let mapped = unsafe { MmapImage::new_from_file(&file) }.map_err(io_err)?;
        Ok(ImageBytes::Mapped(mapped))
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            ImageBytes::Mapped(m) => m.get(..).unwrap_or(&[]),
            ImageBytes::Owned(v) => v,
        }
    }

    pub fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
