//! `VerifyError`: why a verification could not run at all (as opposed to findings, which are
//! results). The CLI maps every one of these to exit code 2.

use std::io;
use std::path::PathBuf;

use storedisk_format::ImageFormat;
use storedisk_nix::ClosureError;

/// Why the verifier could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// (`cause` is shown in the message rather than chained as a `source`, so it is printed
    /// once whichever way the error is formatted.)
    #[error("cannot read {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    /// The bytes are neither squashfs nor erofs.
    #[error("not a squashfs or erofs image: {why}")]
    UnknownFormat { why: String },
    /// The image claims to be squashfs/erofs but its structures are inconsistent, truncated or
    /// hostile (bad offsets, cycles, impossible names).
    #[error("corrupt image: {what}")]
    CorruptImage { what: String },
    /// A format library (backhand, erofs-rs) panicked on the image: the reader caught it
    /// ([`crate::reader`]'s guard). Corrupt input to the user, a bug to a fuzzer: the library
    /// should have returned an error.
    #[error("corrupt image: the {format} reader failed while {doing} (library panic: {message})")]
    ReaderPanic {
        format: ImageFormat,
        doing: String,
        message: String,
    },
    /// The image is structurally plausible but exceeds a safety limit (depth, entry count,
    /// data expansion); see [`crate::Limits`].
    #[error("image exceeds a safety limit: {what}")]
    LimitExceeded { what: String },
    #[error(transparent)]
    Closure(#[from] ClosureError),
    /// Inputs that do not fit together (a runner not in its closure, a bad pattern...).
    #[error("{0}")]
    Input(String),
    /// One image of a store disk (a layer of a set) could not be read: which one, and why
    /// (shown in the message, like `Io`'s cause).
    #[error("{image}: {cause}")]
    InImage {
        image: String,
        cause: Box<VerifyError>,
    },
}

impl VerifyError {
    /// True for errors caused by the image bytes themselves (what a fuzzer may provoke).
    pub fn is_image_error(&self) -> bool {
        match self {
            VerifyError::InImage { cause, .. } => cause.is_image_error(),
            other => matches!(
                other,
                VerifyError::UnknownFormat { .. }
                    | VerifyError::CorruptImage { .. }
                    | VerifyError::ReaderPanic { .. }
                    | VerifyError::LimitExceeded { .. }
            ),
        }
    }

    /// True when a format library panicked and the reader caught it.
    pub fn is_caught_panic(&self) -> bool {
        match self {
            VerifyError::InImage { cause, .. } => cause.is_caught_panic(),
            other => matches!(other, VerifyError::ReaderPanic { .. }),
        }
    }

    /// This error, naming the image `label` it happened in; an I/O error already names the
    /// file and is left as it is.
    pub fn in_image(self, label: &str) -> Self {
        match self {
            VerifyError::Io { .. } | VerifyError::InImage { .. } => self,
            cause => VerifyError::InImage {
                image: label.to_owned(),
                cause: Box::new(cause),
            },
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        VerifyError::CorruptImage { what: what.into() }
    }

    pub(crate) fn limit(what: impl Into<String>) -> Self {
        VerifyError::LimitExceeded { what: what.into() }
    }
}
