//! Image readers behind one trait. A reader parses an image from an [`ImageSource`] (a file read
//! by positioned reads, or an in-memory buffer for tests and fuzzers), builds the format-neutral
//! [`Tree`] once, and then streams file contents on request, from any thread: readers are `Sync`
//! so the inventory hashes store paths on every core. Nothing is extracted to disk and nothing
//! is held whole in memory.

mod erofs;
mod squashfs;

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::VerifyError;
use crate::image::{ImageFormat, ImageSource};
use crate::limits::Limits;
use crate::tree::{FileSource, Tree};

/// An opened image: its format, its tree, and a way to read file data.
pub trait ImageReader: FileSource + Sync {
    fn format(&self) -> ImageFormat;
    fn tree(&self) -> &Tree;
}

/// Detects the format of the image and opens it, enforcing `limits`.
pub fn open_image<'a>(
    image: impl Into<ImageSource<'a>>,
    limits: &Limits,
) -> Result<Box<dyn ImageReader + 'a>, VerifyError> {
    let source = image.into();
    let format = source.detect_format()?;
    guard(format, "reading the image's metadata", || match format {
        ImageFormat::Squashfs => squashfs::SquashfsImage::open(source, limits)
            .map(|r| Box::new(r) as Box<dyn ImageReader + 'a>),
        ImageFormat::Erofs => erofs::ErofsImage::open(source, limits)
            .map(|r| Box::new(r) as Box<dyn ImageReader + 'a>),
    })
}

/// Runs a call into a format library, turning a panic into [`VerifyError::ReaderPanic`].
///
/// Why: backhand and erofs-rs parse untrusted bytes and, although both check most bounds, a
/// corrupt image can still reach an `unwrap`, an index or an arithmetic overflow inside them.
/// We bound what we can before calling them (sizes, counts, depth, offsets), and this is the
/// last line: a hostile image must give exit code 2 with a message, never a crash. The state a
/// panic leaves behind is dropped with the reader, so unwind safety is not a concern here.
pub(crate) fn guard<T>(
    format: ImageFormat,
    doing: &str,
    call: impl FnOnce() -> Result<T, VerifyError>,
) -> Result<T, VerifyError> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(VerifyError::ReaderPanic {
                format,
                doing: doing.to_owned(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_panic_becomes_a_typed_corrupt_image_error() {
        let err = guard(
            ImageFormat::Erofs,
            "reading a directory",
            || -> Result<(), _> { panic!("index out of bounds") },
        )
        .unwrap_err();
        assert!(err.is_caught_panic() && err.is_image_error(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "corrupt image: the erofs reader failed while reading a directory (library panic: \
             index out of bounds)"
        );
        // Named by its layer, it is still a caught panic; an error of the image is not one.
        assert!(err.in_image("layer1.img").is_caught_panic());
        let refused = guard(ImageFormat::Erofs, "reading", || -> Result<(), _> {
            Err(VerifyError::corrupt("library panic in the name only"))
        })
        .unwrap_err();
        assert!(!refused.is_caught_panic());
    }
}
