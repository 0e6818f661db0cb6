//! The erofs writers: a walked [`Tree`] written by storedisk itself ([`write_native`]: the
//! structures in [`format`], the file data and fragments in `data`, the layout in `native`), or packed by
//! `mkfs.erofs` (erofs-utils) with microvm.nix's flags ([`write`], the rest of this file).
//!
//! With erofs-utils 1.7 or newer the tree is streamed to `mkfs.erofs --tar=f` on its standard
//! input ([`tar`]): headers carry the canonical metadata and file data is read once, straight
//! from the store. Older versions (Debian 12's 1.5) have no tar input, so the tree is staged
//! into a directory beside the output with canonical modes (`.storedisk-staging-*.tmp`, marked so
//! that the next build removes one a killed build left): staging copies file data
//! (`io::copy`, which uses `copy_file_range` and reflinks where the filesystem can) and
//! recreates hard links that occur within the closure as hard links. Either way mkfs.erofs
//! stores a hard-linked file's data once and link counts depend on the closure only.
//!
//! Which mkfs.erofs: a path is used as given; a bare name (the default, `mkfs.erofs`) is looked
//! up in every `PATH` directory, the prefix `cargo xtask setup` fills (`target/tools/bin` beside
//! the running binary) and the system's sbin directories, and the newest version found is
//! used ([`MkfsErofs::find`]); the build report names it and the others it passed over.
//!
//! Reproducibility: mkfs.erofs would pick a random UUID and take times and xattrs from the
//! staging tree, so it is given a UUID derived from the closure (`-U`), one timestamp for all
//! files (`-T 0`, as microvm.nix), root ownership (`--all-root`) and no xattrs (`-x -1`: a host
//! with SELinux labels new files). Directory entries are sorted by mkfs.erofs itself.
//!
//! Flags that depend on the installed version are chosen from its version and `--help`:
//! `-Eztailpacking` (1.5+), `-Efragments` and `-L nix-store` (1.6+), `--mount-point=/nix/store`
//! (when listed), `--tar=f` (when listed). mkfs.erofs 1.5 ignores unknown `-E` options silently,
//! hence the version check.

mod data;
pub mod format;
mod native;
mod tar;

use std::fs;
use std::io::{self, BufWriter};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

use crate::output::{self, StagingDir};
use crate::tree::{EntryKind, Tree};
use crate::{BuildError, BuildOptions, Compression, ImageFormat, ProgressSink};

/// Label microvm.nix gives its erofs store disks.
pub const LABEL: &str = "nix-store";
/// Timestamp of every inode and of the build (`-T`), as microvm.nix passes it.
pub const TIMESTAMP: u32 = 0;
/// Where the guest's store lives (`--mount-point`).
pub const MOUNT_POINT: &str = "/nix/store";

/// An installed `mkfs.erofs` and what it supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsErofs {
    pub path: PathBuf,
    /// As printed, e.g. `1.8.6`.
    pub version: String,
    version_parts: (u32, u32, u32),
    /// Compressors it lists (empty if it lists none; then the tool itself judges `-z`).
    pub compressors: Vec<String>,
    pub has_label: bool,
    pub has_mount_point: bool,
    /// `--tar=f`: reads the tree as a tar stream (erofs-utils 1.7+).
    pub has_tar: bool,
}

/// What [`write`] used, for the build report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErofsUsed {
    pub level: Option<u32>,
    pub tool: String,
}

impl MkfsErofs {
    /// Runs `path -V` and `path --help` (and, for versions without `-V`, a build of an empty
    /// directory) to learn the version and the options.
    pub fn probe(path: &Path) -> Result<MkfsErofs, BuildError> {
        let version_out = run_tool(path, Command::new(path).arg("-V"))?;
        let help_out = run_tool(path, Command::new(path).arg("--help"))?;
        let help = format!("{}{}", text(&help_out.stdout), text(&help_out.stderr));
        let version_text = text(&version_out.stdout);
        let version = if version_out.status.success() {
            parse_version(&version_text)
        } else {
            None
        };
        let version = match version {
            Some(v) => v,
            None => probe_version_by_building(path)?,
        };
        let version_parts = version_parts(&version);
        let compressors = parse_compressors(&version_text)
            .or_else(|| parse_compressors(&help))
            .unwrap_or_default();
        Ok(MkfsErofs {
            path: path.to_owned(),
            version,
            version_parts,
            compressors,
            has_label: help.contains("-L "),
            has_mount_point: help.contains("--mount-point"),
            has_tar: help.contains("--tar="),
        })
    }

    /// The mkfs.erofs to use for `requested`, and the other versions found (for the report).
    /// A path with a directory part is probed as it is. A bare name is looked up in every
    /// `PATH` directory, then in `target/tools/bin` beside the running binary (where `cargo
    /// xtask setup` puts erofs-utils 1.8) and the system's sbin directories; every distinct
    /// file found is probed and the newest version wins (the first found among equals).
    pub fn find(requested: &Path) -> Result<(MkfsErofs, Vec<MkfsErofs>), BuildError> {
        if requested.components().count() != 1 || requested.is_absolute() {
            return Ok((MkfsErofs::probe(requested)?, Vec::new()));
        }
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| {
            e.parent()
                .and_then(Path::parent)
                .map(|target| target.join("tools/bin"))
        }) {
            dirs.push(exe_dir);
        }
        dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
        let mut seen = std::collections::HashSet::new();
        let mut found: Vec<MkfsErofs> = Vec::new();
        for dir in dirs {
            let candidate = dir.join(requested);
            let Ok(real) = fs::canonicalize(&candidate) else {
                continue;
            };
            if !real.is_file() || !seen.insert(real) {
                continue;
            }
            // One that cannot be run or tells no version is passed over.
            if let Ok(tool) = MkfsErofs::probe(&candidate) {
                found.push(tool);
            }
        }
        let newest = (0..found.len())
            .rev()
            .max_by_key(|&i| found[i].version_parts);
        match newest {
            Some(i) => {
                let tool = found.remove(i);
                Ok((tool, found))
            }
            // Nothing found: probing the bare name gives the usual "cannot run it" hint.
            None => Ok((MkfsErofs::probe(requested)?, Vec::new())),
        }
    }

    /// `(major, minor, patch)` of [`MkfsErofs::version`].
    pub fn version_parts(&self) -> (u32, u32, u32) {
        self.version_parts
    }

    pub fn supports_ztailpacking(&self) -> bool {
        self.version_parts >= (1, 5, 0)
    }

    pub fn supports_fragments(&self) -> bool {
        self.version_parts >= (1, 6, 0)
    }

    /// mkfs.erofs 1.5 copies names into a 255-byte buffer with room for 254 characters, then
    /// fails to find the truncated file; say so plainly instead.
    pub fn check_names(&self, tree: &Tree) -> Result<(), BuildError> {
        if self.version_parts >= (1, 6, 0) {
            return Ok(());
        }
        let too_long = tree.entries().iter().find(|e| {
            e.path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().len() > 254)
        });
        match too_long {
            None => Ok(()),
            Some(entry) => Err(BuildError::Tool {
                tool: self.path.display().to_string(),
                message: format!(
                    "mkfs.erofs {} cuts file names to 254 bytes, so it cannot pack {} (a 255-byte \
                     name); use a newer erofs-utils (1.8 works: `cargo xtask setup` installs it)",
                    self.version,
                    tree.source(entry).display()
                ),
            }),
        }
    }

    /// The command-line options (before `IMAGE SOURCE`) for an image of `compression`.
    /// `ztailpacking` asks for `-Eztailpacking` (when the version has it; microvm.nix passes it
    /// for guest kernels 5.16 and newer, which can read it). `fragments` asks for `-Efragments` (when the version has it): microvm.nix passes it, but
    /// with `-Eztailpacking` it makes erofs-utils 1.8.6 and 1.9.4 write wrong file data for some
    /// inputs (the test `erofs_fragments_corruption_is_caught_by_the_read_back` in
    /// crates/cli/tests/build.rs reproduces it), so it is opt-in here.
    pub fn arguments(
        &self,
        compression: Compression,
        level: Option<u32>,
        ztailpacking: bool,
        fragments: bool,
        uuid: &str,
    ) -> Result<Vec<String>, BuildError> {
        let mut args = Vec::new();
        if compression == Compression::None {
            if let Some(level) = level {
                return Err(BuildError::BadCompressionLevel {
                    compression,
                    level,
                    reason: "an uncompressed image has no level".to_owned(),
                });
            }
        } else {
            if !self.compressors.is_empty()
                && !self.compressors.iter().any(|c| c == compression.name())
            {
                return Err(BuildError::UnsupportedCompression {
                    format: ImageFormat::Erofs,
                    compression,
                    choices: format!(
                        "{}, none (mkfs.erofs {} at {})",
                        self.compressors.join(", "),
                        self.version,
                        self.path.display()
                    ),
                });
            }
            if compression == Compression::Lz4 {
                if let Some(level) = level {
                    return Err(BuildError::BadCompressionLevel {
                        compression,
                        level,
                        reason: "erofs lz4 has no levels (lz4hc has)".to_owned(),
                    });
                }
            }
            args.push(match level {
                Some(level) => format!("-z{},{level}", compression.name()),
                None => format!("-z{}", compression.name()),
            });
            if ztailpacking && self.supports_ztailpacking() {
                args.push("-Eztailpacking".to_owned());
            }
            if fragments && self.supports_fragments() {
                args.push("-Efragments".to_owned());
            }
        }
        args.extend([
            "-T".to_owned(),
            TIMESTAMP.to_string(),
            "--all-root".to_owned(),
            "-U".to_owned(),
            uuid.to_owned(),
            "-x".to_owned(),
            "-1".to_owned(),
        ]);
        if self.has_label {
            args.extend(["-L".to_owned(), LABEL.to_owned()]);
        }
        if self.has_mount_point {
            args.push(format!("--mount-point={MOUNT_POINT}"));
        }
        Ok(args)
    }
}

/// Writes `tree` as an erofs image into `image` (positioned anywhere) with storedisk's own
/// writer; returns the compression level used. `work_dir` holds an unnamed spool of file tails
/// while it runs.
pub(crate) fn write_native(
    tree: &Tree,
    options: &BuildOptions,
    image: &fs::File,
    work_dir: &Path,
    progress: &dyn ProgressSink,
) -> Result<Option<u32>, BuildError> {
    native::write(tree, options, image, work_dir, progress)
}

pub use native::DEFAULT_LZ4HC_LEVEL;

/// Packs `tree` into `image` with mkfs.erofs: streamed as tar when the tool reads tar, else
/// staged in a directory inside `work_dir`. `image` is any path mkfs.erofs can open and
/// truncate; for an unnamed image file, `/proc/<our pid>/fd/<n>` (erofs-utils 1.5 and 1.8
/// both take it).
pub(crate) fn write(
    tree: &Tree,
    options: &BuildOptions,
    image: &Path,
    work_dir: &Path,
    progress: &dyn ProgressSink,
) -> Result<ErofsUsed, BuildError> {
    let (tool, others) = MkfsErofs::find(&options.mkfs_erofs)?;
    let compression = options.effective_compression();
    let args = tool.arguments(
        compression,
        options.compression_level,
        options.erofs_ztailpacking,
        options.erofs_fragments,
        &closure_uuid(tree),
    )?;
    tool.check_names(tree)?;

    let (output, how) = if tool.has_tar {
        (stream(&tool, &args, tree, image, progress)?, "tar stream")
    } else {
        let staging = Staging::new(work_dir)?;
        progress.phase("staging", tree.counts().file_bytes);
        staging.fill(tree, progress)?;
        progress.phase("mkfs.erofs", 0);
        let mut command = Command::new(&tool.path);
        command.args(&args).arg(image).arg(staging.root());
        die_with_us(&mut command);
        (
            run_tool(&tool.path, &mut command)?,
            "staged copy: this version has no --tar",
        )
    };
    if !output.status.success() {
        return Err(tool_failed(&tool, &args, &output));
    }
    let passed_over = if others.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = others
            .iter()
            .map(|t| format!("{} at {}", t.version, t.path.display()))
            .collect();
        format!("; newest found, over {}", list.join(", "))
    };
    Ok(ErofsUsed {
        level: options.compression_level,
        tool: format!(
            "mkfs.erofs {} ({}; {how}{passed_over})",
            tool.version,
            tool.path.display()
        ),
    })
}

/// Runs `mkfs.erofs --tar=f` and feeds it `tree` as tar on its standard input.
fn stream(
    tool: &MkfsErofs,
    args: &[String],
    tree: &Tree,
    image: &Path,
    progress: &dyn ProgressSink,
) -> Result<Output, BuildError> {
    let mut command = Command::new(&tool.path);
    command
        .args(args)
        .arg("--tar=f")
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_us(&mut command);
    let mut child = command.spawn().map_err(|e| cannot_run(&tool.path, &e))?;
    let Some(stdin) = child.stdin.take() else {
        return Err(BuildError::Tool {
            tool: tool.path.display().to_string(),
            message: "its standard input could not be opened".to_owned(),
        });
    };
    progress.phase("mkfs.erofs", tree.counts().file_bytes);
    let (fed, output) = std::thread::scope(|scope| {
        // mkfs.erofs's output is read while we write, so neither side waits on a full pipe.
        let waiter = scope.spawn(move || child.wait_with_output());
        let mut input = BufWriter::with_capacity(1 << 20, stdin);
        let fed = tar::write_tar(tree, &mut input, progress);
        // Closing the pipe is mkfs.erofs's end of input, even after an error of ours.
        drop(input);
        (fed, waiter.join())
    });
    let output = match output {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(cannot_run(&tool.path, &e)),
        Err(_) => {
            return Err(BuildError::Tool {
                tool: tool.path.display().to_string(),
                message: "the thread waiting for it panicked".to_owned(),
            })
        }
    };
    match fed {
        Ok(()) => Ok(output),
        // mkfs.erofs stopped reading: its own failure says why.
        Err(BuildError::Write { cause: source, .. })
            if source.kind() == io::ErrorKind::BrokenPipe && !output.status.success() =>
        {
            Ok(output)
        }
        Err(e) => Err(e),
    }
}

/// Makes the child started by `command` get SIGKILL when this thread (the one waiting for it)
/// dies, however it dies. Without it a SIGKILLed build leaves mkfs.erofs running: 1.8.6 given a
/// tar stream cut short loops forever on zero-length writes (seen in
/// `sigkill_in_the_middle_of_a_build_keeps_the_old_image_and_leaves_nothing`), holding a CPU
/// and the unnamed image's space; 1.5 would pack a staged copy that the next build removes.
fn die_with_us(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpid, getppid, set_parent_process_death_signal, Signal};
        use std::os::unix::process::CommandExt;
        let parent = getpid();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: it makes two system calls (prctl, getppid) and
        // allocates nothing (an errno converts to io::Error without allocating).
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                set_parent_process_death_signal(Some(Signal::KILL))?;
                // The parent died before the prctl: no signal will come.
                if getppid() != Some(parent) {
                    return Err(rustix::io::Errno::SRCH.into());
                }
                Ok(())
            });
        }
    }
}

/// mkfs.erofs exited with an error: its status, our arguments, and the end of what it printed.
fn tool_failed(tool: &MkfsErofs, args: &[String], output: &Output) -> BuildError {
    // 1.5 prints some errors on stdout, among its progress lines.
    let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
    let tail: Vec<&str> = printed
        .lines()
        .map(|l| l.trim_start_matches("\x1b[K"))
        .filter(|l| !l.starts_with("Processing "))
        .rev()
        .take(20)
        .collect();
    BuildError::Tool {
        tool: tool.path.display().to_string(),
        message: format!(
            "{} (arguments: {})\n{}",
            output.status,
            args.join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ),
    }
}

/// A fixed filesystem UUID for the closure: SHA-256 of its store path names, shaped as an
/// RFC 9562 version 8 (custom) UUID.
pub fn closure_uuid(tree: &Tree) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"storedisk erofs uuid\n");
    for entry in tree.entries() {
        if entry.path.components().count() == 1 {
            hasher.update(entry.path.as_os_str().as_encoded_bytes());
            hasher.update(b"\n");
        }
    }
    let mut bytes: [u8; 16] = [0; 16];
    bytes.copy_from_slice(&hasher.finalize()[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Names of staging directories: `.storedisk-staging-XXXXXX.tmp` beside the output.
const STAGING_PREFIX: &str = ".storedisk-staging-";
const STAGING_SUFFIX: &str = ".tmp";

/// Removes the staging directories that killed builds left in `dir` ([`output::sweep_stale`]).
pub(crate) fn sweep_stale_staging(dir: &Path) {
    output::sweep_stale(dir, STAGING_PREFIX, STAGING_SUFFIX);
}

/// The staging directory: a marked [`StagingDir`] (so a build killed while staging leaves
/// something the next one recognizes and removes) holding the image root, `root/`. Removed
/// (after making its directories writable again) when dropped.
struct Staging {
    dir: StagingDir,
    root: PathBuf,
}

impl Staging {
    fn new(work_dir: &Path) -> Result<Staging, BuildError> {
        let dir =
            StagingDir::create(work_dir, STAGING_PREFIX, STAGING_SUFFIX).map_err(|source| {
                BuildError::Write {
                    path: work_dir.to_owned(),
                    cause: source,
                }
            })?;
        let root = dir.path().join("root");
        fs::create_dir(&root).map_err(|source| BuildError::Write {
            path: root.clone(),
            cause: source,
        })?;
        Ok(Staging { dir, root })
    }

    /// The directory mkfs.erofs packs: the image root.
    fn root(&self) -> &Path {
        &self.root
    }

    fn fill(&self, tree: &Tree, progress: &dyn ProgressSink) -> Result<(), BuildError> {
        let root = self.root();
        let write_err = |path: &Path, source| BuildError::Write {
            path: path.to_owned(),
            cause: source,
        };
        let entries = tree.entries();
        for entry in entries {
            let dest = root.join(&entry.path);
            match &entry.kind {
                EntryKind::Directory => fs::create_dir(&dest).map_err(|e| write_err(&dest, e))?,
                EntryKind::Symlink { target } => {
                    symlink(target, &dest).map_err(|e| write_err(&dest, e))?
                }
                EntryKind::Regular {
                    hard_link_of: Some(first),
                    ..
                } => {
                    let first = root.join(&entries[*first].path);
                    fs::hard_link(&first, &dest).map_err(|e| write_err(&dest, e))?;
                }
                EntryKind::Regular {
                    size,
                    hard_link_of: None,
                    ..
                } => {
                    copy_file(&tree.source(entry), &dest, *size)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode().into()))
                        .map_err(|e| write_err(&dest, e))?;
                    progress.advance(*size);
                }
            }
        }
        // Directories become read-only last, deepest first, once nothing more goes into them.
        for entry in entries.iter().rev() {
            if entry.kind == EntryKind::Directory {
                let dest = root.join(&entry.path);
                fs::set_permissions(&dest, fs::Permissions::from_mode(0o555))
                    .map_err(|e| write_err(&dest, e))?;
            }
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o555))
            .map_err(|e| write_err(root, e))?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Without write permission a non-root user could not empty the read-only directories.
        output::remove_tree(self.dir.path());
    }
}

/// Copies `source` to the new file `dest`, checking it still has the walked length.
fn copy_file(source: &Path, dest: &Path, expected_len: u64) -> Result<(), BuildError> {
    let read_err = |source_err| BuildError::Read {
        path: source.to_owned(),
        cause: source_err,
    };
    let mut from = fs::File::open(source).map_err(read_err)?;
    let mut to = fs::File::create(dest).map_err(|e| BuildError::Write {
        path: dest.to_owned(),
        cause: e,
    })?;
    let copied = io::copy(&mut from, &mut to).map_err(|e| BuildError::Read {
        path: source.to_owned(),
        cause: io::Error::new(e.kind(), format!("copying it to {}: {e}", dest.display())),
    })?;
    if copied != expected_len {
        return Err(BuildError::length_changed(source, expected_len, copied));
    }
    Ok(())
}

fn run_tool(path: &Path, command: &mut Command) -> Result<Output, BuildError> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| cannot_run(path, &e))
}

fn cannot_run(path: &Path, e: &io::Error) -> BuildError {
    let hint = if e.kind() == io::ErrorKind::NotFound {
        " (install erofs-utils, e.g. `apt install erofs-utils` or `cargo xtask setup`, or \
         point --mkfs-erofs / $STOREDISK_MKFS_EROFS at mkfs.erofs)"
    } else {
        ""
    };
    BuildError::Tool {
        tool: path.display().to_string(),
        message: format!("cannot run it: {e}{hint}"),
    }
}

/// mkfs.erofs before 1.6 has no `-V`, but prints `mkfs.erofs <version>` when it builds.
fn probe_version_by_building(path: &Path) -> Result<String, BuildError> {
    let tool_err = |message: String| BuildError::Tool {
        tool: path.display().to_string(),
        message,
    };
    let scratch =
        tempfile::tempdir().map_err(|e| tool_err(format!("cannot make a temp dir: {e}")))?;
    let empty = scratch.path().join("empty");
    fs::create_dir(&empty).map_err(|e| tool_err(format!("cannot make a temp dir: {e}")))?;
    let output = run_tool(
        path,
        Command::new(path)
            .arg(scratch.path().join("probe.img"))
            .arg(&empty),
    )?;
    parse_version(&text(&output.stdout)).ok_or_else(|| {
        tool_err(format!(
            "cannot tell its version: neither `-V` nor a probe build printed one ({})",
            text(&output.stderr).trim()
        ))
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The version from `mkfs.erofs (erofs-utils) 1.8.6` or `mkfs.erofs 1.5`.
fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .find(|l| l.trim_start().starts_with("mkfs.erofs"))?
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
}

fn version_parts(version: &str) -> (u32, u32, u32) {
    let mut parts = version.split(['.', '-', '+', '~']).map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    });
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The compressor list of `available compressors: a, b` (1.6+ `-V`) or `Available compressors
/// are: a, b` (1.5 `--help`).
fn parse_compressors(output: &str) -> Option<Vec<String>> {
    let line = output
        .lines()
        .find(|l| l.to_ascii_lowercase().contains("available compressors"))?;
    let list = line.split_once(':')?.1;
    let names: Vec<String> = list
        .split([',', ' '])
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    (!names.is_empty()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_and_compressors_of_old_and_new_releases() {
        let new = "mkfs.erofs (erofs-utils) 1.8.6\navailable compressors: lz4, lz4hc, lzma, deflate, libdeflate, zstd\n";
        assert_eq!(parse_version(new).as_deref(), Some("1.8.6"));
        assert_eq!(version_parts("1.8.6"), (1, 8, 6));
        assert_eq!(
            parse_compressors(new).unwrap_or_default(),
            ["lz4", "lz4hc", "lzma", "deflate", "libdeflate", "zstd"]
        );
        let old_build = "mkfs.erofs 1.5\n\x1b[KProcessing f ...\n";
        assert_eq!(parse_version(old_build).as_deref(), Some("1.5"));
        assert_eq!(version_parts("1.5"), (1, 5, 0));
        let old_help = "usage: [options] FILE DIRECTORY\n\nAvailable compressors are: lz4hc, lz4\n";
        assert_eq!(
            parse_compressors(old_help).unwrap_or_default(),
            ["lz4hc", "lz4"]
        );
        assert_eq!(parse_version("mkfs.erofs: invalid option -- 'V'"), None);
        assert_eq!(version_parts("1.8.6"), (1, 8, 6));
        assert_eq!(version_parts("1.9-rc1"), (1, 9, 0));
        assert_eq!(version_parts("1.5"), (1, 5, 0));
    }

    fn tool(version: &str) -> MkfsErofs {
        MkfsErofs {
            path: PathBuf::from("mkfs.erofs"),
            version: version.to_owned(),
            version_parts: version_parts(version),
            compressors: vec!["lz4".into(), "lz4hc".into()],
            has_label: version_parts(version) >= (1, 6, 0),
            has_mount_point: false,
            has_tar: version_parts(version) >= (1, 7, 0),
        }
    }

    #[test]
    fn picks_microvm_flags_the_version_supports() {
        let uuid = "00000000-0000-8000-8000-000000000000";
        let new = tool("1.8.6")
            .arguments(Compression::Lz4hc, None, true, true, uuid)
            .unwrap();
        assert_eq!(
            new.join(" "),
            format!(
                "-zlz4hc -Eztailpacking -Efragments -T 0 --all-root -U {uuid} -x -1 -L nix-store"
            )
        );
        let safe = tool("1.8.6")
            .arguments(Compression::Lz4hc, None, true, false, uuid)
            .unwrap();
        assert!(!safe.iter().any(|a| a == "-Efragments"), "{safe:?}");
        // A guest kernel older than 5.16 cannot read tail-packed files: microvm.nix leaves the
        // flag out for it, and so can we.
        let plain = tool("1.8.6")
            .arguments(Compression::Lz4hc, None, false, false, uuid)
            .unwrap();
        assert!(!plain.iter().any(|a| a.starts_with("-E")), "{plain:?}");
        let old = tool("1.5")
            .arguments(Compression::Lz4hc, Some(12), true, true, uuid)
            .unwrap();
        assert_eq!(
            old.join(" "),
            format!("-zlz4hc,12 -Eztailpacking -T 0 --all-root -U {uuid} -x -1")
        );
        let none = tool("1.8.6")
            .arguments(Compression::None, None, true, true, uuid)
            .unwrap();
        assert!(
            !none
                .iter()
                .any(|a| a.starts_with("-z") || a.starts_with("-E")),
            "{none:?}"
        );
        assert!(tool("1.5")
            .arguments(Compression::Zstd, None, true, false, uuid)
            .is_err());
        assert!(tool("1.5")
            .arguments(Compression::Lz4, Some(3), true, false, uuid)
            .is_err());
    }
}
