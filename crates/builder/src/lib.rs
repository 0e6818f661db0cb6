//! Packs a Nix closure into one store disk image, squashfs or erofs, laid out like microvm.nix's:
//! the image root holds every store path of the closure under its base name (`<hash>-<name>`).
//!
//! [`build_image`] walks the closure once into a [`tree::Tree`] (sorted, validated, canonical
//! metadata, no file data) and hands it to the format writer: [`squashfs`] writes the image
//! itself (backhand's compressors for the blocks), [`erofs`] writes erofs itself (LZ4 through
//! lzzzz) or runs `mkfs.erofs` ([`ErofsWriter`]). File data is streamed from the store, never
//! held in memory. Ownership is root:root, timestamps fixed and permissions canonical (0444 /
//! 0555, directories 0555, symlinks 0777), so the same closure gives the same bytes whatever the
//! order of the roots, the working directory, the thread count or the directory order on disk.
//!
//! Invariants: this crate never calls Nix (the closure is an input), never prints (progress goes
//! through [`ProgressSink`]), and never leaves a partial output behind: the image is written to an
//! unnamed file beside `output` and named only when complete ([`output`]), so an existing output
//! survives errors, ENOSPC and SIGKILL, and on Linux nothing is left beside it.

pub mod erofs;
pub mod layers;
mod output;
pub mod squashfs;
pub mod tree;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use storedisk_nix::Closure;

pub use storedisk_format::ImageFormat;
pub use tree::{Entry, EntryKind, Tree};

/// A compression algorithm for file data (and, for squashfs, metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Zstd,
    Xz,
    Gzip,
    Lz4,
    Lz4hc,
    Lzma,
    Deflate,
    /// No compression (erofs only).
    None,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Lz4hc => "lz4hc",
            Compression::Lzma => "lzma",
            Compression::Deflate => "deflate",
            Compression::None => "none",
        }
    }

    /// The compression used when none is asked for: zstd for squashfs (microvm.nix's
    /// gensquashfs flags), lz4hc for erofs (microvm.nix's mkfs.erofs flags).
    pub fn default_for(format: ImageFormat) -> Compression {
        match format {
            ImageFormat::Squashfs => Compression::Zstd,
            ImageFormat::Erofs => Compression::Lz4hc,
        }
    }

    /// The compressions `format` can be asked for (erofs: subject to the installed
    /// mkfs.erofs, checked when building).
    pub fn choices_for(format: ImageFormat) -> &'static [Compression] {
        use Compression::*;
        match format {
            ImageFormat::Squashfs => &[Zstd, Xz, Gzip, Lz4],
            ImageFormat::Erofs => &[Lz4hc, Lz4, Zstd, Lzma, Deflate, None],
        }
    }

    const ALL: [Compression; 8] = [
        Compression::Zstd,
        Compression::Xz,
        Compression::Gzip,
        Compression::Lz4,
        Compression::Lz4hc,
        Compression::Lzma,
        Compression::Deflate,
        Compression::None,
    ];
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Compression::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown compression {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Which program writes an erofs image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ErofsWriter {
    /// storedisk's own writer ([`erofs::write_native`]): lz4hc, lz4 or none, tail packing,
    /// fragments, identical files stored once.
    #[default]
    Native,
    /// erofs-utils' `mkfs.erofs` ([`BuildOptions::mkfs_erofs`]), for the algorithms the
    /// native writer does not do (zstd, lzma, deflate).
    Mkfs,
}

impl ErofsWriter {
    pub fn name(self) -> &'static str {
        match self {
            ErofsWriter::Native => "native",
            ErofsWriter::Mkfs => "mkfs",
        }
    }
}

/// What to build and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    pub format: ImageFormat,
    /// `None`: the format's default ([`Compression::default_for`]).
    pub compression: Option<Compression>,
    /// `None`: the default level (zstd 15 for squashfs, the tool's default for erofs).
    pub compression_level: Option<u32>,
    /// Where the closure's store paths physically are (`/nix/store` unless testing or building
    /// from a chroot store). Names in the image never include it.
    pub store_dir: PathBuf,
    /// Which writer makes erofs images.
    pub erofs_writer: ErofsWriter,
    /// The `mkfs.erofs` to run for erofs images with [`ErofsWriter::Mkfs`] (a bare name is
    /// looked up on `PATH`).
    pub mkfs_erofs: PathBuf,
    /// Pass `-Eztailpacking` to mkfs.erofs (when it has it), as microvm.nix does for guest
    /// kernels 5.16 and newer; off for older guest kernels, which cannot mount such images.
    pub erofs_ztailpacking: bool,
    /// Pack the ends of compressed files into the packed inode (`-Efragments`, as microvm.nix
    /// does for guest kernels 6.1 and newer): the native writer does it itself; with
    /// [`ErofsWriter::Mkfs`] it is passed to mkfs.erofs. Off by default: together with
    /// `-Eztailpacking` it corrupts file data with erofs-utils 1.8.6 and 1.9.4 on some inputs.
    pub erofs_fragments: bool,
    /// Compression workers for squashfs (`None`: one per core). The image does not depend on it.
    pub threads: Option<usize>,
}

impl BuildOptions {
    pub fn new(format: ImageFormat) -> Self {
        BuildOptions {
            format,
            compression: None,
            compression_level: None,
            store_dir: PathBuf::from(storedisk_nix::store_path::DEFAULT_STORE_DIR),
            erofs_writer: ErofsWriter::default(),
            mkfs_erofs: PathBuf::from("mkfs.erofs"),
            erofs_ztailpacking: true,
            erofs_fragments: false,
            threads: None,
        }
    }

    /// The compression actually used.
    pub fn effective_compression(&self) -> Compression {
        self.compression
            .unwrap_or_else(|| Compression::default_for(self.format))
    }
}

/// What a build packed, for the one-line summary and `--json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    pub format: ImageFormat,
    pub compression: Compression,
    /// The level passed to the compressor, when one was chosen (by the user or by default).
    pub compression_level: Option<u32>,
    pub store_paths: usize,
    pub directories: usize,
    pub regular_files: usize,
    pub symlinks: usize,
    /// Regular file entries that are hard links to an earlier entry of the closure.
    pub hard_links: usize,
    /// Bytes of file data in the closure (every regular file entry counted).
    pub file_bytes: u64,
    /// Size of the finished image file.
    pub image_bytes: u64,
    /// The external tool that wrote the image, with its version (erofs), e.g.
    /// `mkfs.erofs 1.8.6 (/usr/bin/mkfs.erofs)`.
    pub tool: Option<String>,
}

/// Why an image could not be built. Every variant names the path or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "{compression} compression is not available for {format} images (choose one of {choices})"
    )]
    UnsupportedCompression {
        format: ImageFormat,
        compression: Compression,
        choices: String,
    },
    #[error("compression level {level} is not valid for {compression}: {reason}")]
    BadCompressionLevel {
        compression: Compression,
        level: u32,
        reason: String,
    },
    #[error("store path {path} is in the closure but missing on disk ({physical} does not exist)")]
    MissingStorePath { path: String, physical: PathBuf },
    #[error("{path} is {kind}, which a Nix store cannot hold")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("{path} changed while the image was being built: {reason}")]
    Changed { path: PathBuf, reason: String },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("{path} cannot be written to a {format} image: {reason}")]
    Unrepresentable {
        path: PathBuf,
        format: ImageFormat,
        reason: String,
    },
    #[error(
        "the image written to {output} failed its read-back check, so it was not kept: {reason}"
    )]
    ReadBack { output: PathBuf, reason: String },
    #[error("no space left on the file system of {output}: {cause}")]
    NoSpace {
        output: PathBuf,
        cause: Box<BuildError>,
    },
    /// An option the chosen writer does not support; the message names what does.
    #[error("{option} is not supported: {reason}")]
    UnsupportedOption { option: String, reason: String },
    #[error("squashfs writer failed: {0}")]
    Squashfs(String),
    #[error("erofs writer failed: {0}")]
    Erofs(String),
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
}

impl BuildError {
    /// A store file whose length is no longer the one the walk saw: `read` bytes were read from
    /// it. When it grew, reading stopped early, so its length now is asked of the file system.
    pub(crate) fn length_changed(path: &Path, walked: u64, read: u64) -> BuildError {
        let now = if read > walked {
            fs::metadata(path).map_or(read, |m| m.len().max(read))
        } else {
            read
        };
        BuildError::Changed {
            path: path.to_owned(),
            reason: format!("it is {now} bytes long now, {walked} when the closure was walked"),
        }
    }
}

/// Receives progress from a build: bytes of file data processed out of a known total. The CLI
/// shows it as a bar; libraries and tests pass [`NoProgress`].
pub trait ProgressSink {
    /// A new phase begins (`"packing"`, `"staging"`, `"mkfs.erofs"`); `total_bytes` 0 means
    /// the phase has no byte count.
    fn phase(&self, name: &str, total_bytes: u64);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
    /// The build is over (successfully or not).
    fn finish(&self) {}
}

/// A [`ProgressSink`] that discards everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn phase(&self, _name: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// Longest symlink target backhand 0.25 can read (the verifier reads squashfs through it): its
/// inode parser asserts `target_size < 256` (squashfs itself allows up to `PATH_MAX`).
const BACKHAND_MAX_SYMLINK_TARGET: usize = 255;

/// Refuses, naming the entry, what the verifier's squashfs reader could not read back.
fn check_backhand_limits(tree: &Tree) -> Result<(), BuildError> {
    for entry in tree.entries() {
        if let EntryKind::Symlink { target } = &entry.kind {
            if target.len() > BACKHAND_MAX_SYMLINK_TARGET {
                return Err(BuildError::Unrepresentable {
                    path: tree.source(entry),
                    format: ImageFormat::Squashfs,
                    reason: format!(
                        "its symlink target is {} bytes; storedisk's squashfs reader (backhand 0.25) reads at most {BACKHAND_MAX_SYMLINK_TARGET} (use --format erofs)",
                        target.len()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Packs every store path of `closure` (found under `options.store_dir`) into an image at
/// `output`. On error nothing is left at `output` or beside it.
pub fn build_image(
    closure: &Closure,
    options: &BuildOptions,
    output: &Path,
    progress: &dyn ProgressSink,
) -> Result<BuildReport, BuildError> {
    build_image_checked(closure, options, output, progress, &|_| Ok(()))
}

/// [`build_image`], with `read_back` run on the finished image before it is moved to `output`:
/// an `Err(reason)` discards the image and fails the build. The CLI passes the verifier's
/// integrity check here, so a writer bug (ours or mkfs.erofs's) never reaches a user as a
/// silently corrupt store disk.
pub fn build_image_checked(
    closure: &Closure,
    options: &BuildOptions,
    output: &Path,
    progress: &dyn ProgressSink,
    read_back: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<BuildReport, BuildError> {
    let result = build_image_inner(closure, options, output, progress, read_back);
    progress.finish();
    result
}

fn build_image_inner(
    closure: &Closure,
    options: &BuildOptions,
    output: &Path,
    progress: &dyn ProgressSink,
    read_back: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<BuildReport, BuildError> {
    let compression = options.effective_compression();
    let choices = Compression::choices_for(options.format);
    if !choices.contains(&compression) {
        return Err(BuildError::UnsupportedCompression {
            format: options.format,
            compression,
            choices: choices
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let output_dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let write_err = |source| BuildError::Write {
        path: output.to_owned(),
        cause: source,
    };
    // Checked before the (possibly long) walk so a typo in --output fails at once.
    if output.is_dir() {
        return Err(write_err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "it is a directory; give the image file's path",
        )));
    }
    if !output_dir.is_dir() {
        return Err(write_err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("its directory {} does not exist", output_dir.display()),
        )));
    }

    // What a killed erofs build (1.5, staged) left beside the output; see `output`.
    erofs::sweep_stale_staging(&output_dir);
    let tree = Tree::walk(closure, &options.store_dir)?;
    let file_name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let image = output::ImageFile::create(&output_dir, &file_name).map_err(write_err)?;
    let written = write_image(&tree, options, &image, &output_dir, progress);
    let (compression_level, tool) = written.map_err(|e| no_space_or(e, &image, output))?;

    let file = image.file();
    file.sync_all().map_err(write_err)?;
    let image_bytes = file.metadata().map_err(write_err)?.len();
    read_back(&image.path()).map_err(|reason| BuildError::ReadBack {
        output: output.to_owned(),
        reason,
    })?;
    // A temp file is made 0600; an image is meant to be read by others (a hypervisor running as
    // another user), like any build output.
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(write_err)?;
    image.persist(output).map_err(write_err)?;

    let counts = tree.counts();
    Ok(BuildReport {
        format: options.format,
        compression,
        compression_level,
        store_paths: tree.store_paths(),
        directories: counts.directories,
        regular_files: counts.regular_files,
        symlinks: counts.symlinks,
        hard_links: counts.hard_links,
        file_bytes: counts.file_bytes,
        image_bytes,
        tool,
    })
}

/// Runs the format's writer into `image`; returns the compression level and tool used.
fn write_image(
    tree: &Tree,
    options: &BuildOptions,
    image: &output::ImageFile,
    output_dir: &Path,
    progress: &dyn ProgressSink,
) -> Result<(Option<u32>, Option<String>), BuildError> {
    match options.format {
        ImageFormat::Squashfs => {
            check_backhand_limits(tree)?;
            let level = squashfs::write(tree, options, image.file(), progress)?;
            Ok((level, None))
        }
        ImageFormat::Erofs if options.erofs_writer == ErofsWriter::Native => {
            let level = erofs::write_native(tree, options, image.file(), output_dir, progress)?;
            Ok((level, None))
        }
        ImageFormat::Erofs => {
            let used = erofs::write(tree, options, &image.path(), output_dir, progress)?;
            Ok((used.level, Some(used.tool)))
        }
    }
}

/// Less free space than this after a failed write means the write failed for want of space.
const NEARLY_FULL_BYTES: u64 = 1 << 20;

/// `error` from a writer, as [`BuildError::NoSpace`] naming `output` when the file system is
/// (nearly) full: the squashfs writer and mkfs.erofs report ENOSPC in their own words (or only as an exit
/// status), and the partial image still holds its space when this is asked.
fn no_space_or(error: BuildError, image: &output::ImageFile, output: &Path) -> BuildError {
    let enospc = match &error {
        BuildError::Write { cause: source, .. } => source.kind() == io::ErrorKind::StorageFull,
        // Staging a copy for mkfs.erofs 1.5 fails as a read of the store file.
        BuildError::Read { cause: source, .. } if source.kind() == io::ErrorKind::StorageFull => {
            true
        }
        BuildError::Squashfs(_) | BuildError::Erofs(_) | BuildError::Tool { .. } => false,
        // Not a failure to write.
        _ => return error,
    };
    let nearly_full = output::free_bytes(image.file()).is_some_and(|f| f < NEARLY_FULL_BYTES);
    if enospc || nearly_full {
        BuildError::NoSpace {
            output: output.to_owned(),
            cause: Box::new(error),
        }
    } else {
        error
    }
}
