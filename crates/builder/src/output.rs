//! How outputs survive a failed or killed build: an image is written to an unnamed file in its
//! output's directory and gets a name only when complete; a staging directory (which cannot be
//! unnamed) carries a locked marker, so a later build recognizes, and removes, what a killed
//! one left.
//!
//! What survives what:
//! - an error (ours, mkfs.erofs's, ENOSPC): the temp file or directory is removed on the way out
//!   and an existing output is untouched;
//! - SIGKILL, OOM kill or power loss: an existing output is untouched (it is only ever replaced
//!   by `rename`). On Linux an image in progress is an `O_TMPFILE` file, which the kernel frees
//!   with its last descriptor, so nothing is left beside the output. Where the file system has
//!   no `O_TMPFILE` (or `/proc` is not mounted) a named `.NAME.*.tmp` file is used instead and a
//!   SIGKILL leaves it. A staging directory is always named; the next build into the same
//!   parent removes those whose marker nobody holds locked any more ([`sweep_stale`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The file inside a staging directory that says storedisk made it. An exclusive `flock` on it
/// is held as long as the build that made it lives; the kernel drops the lock when the process
/// dies however it dies, so a marker that can be locked belongs to a dead build.
pub(crate) const STAGING_MARKER: &str = ".storedisk-staging";

/// The image being written, in its output's directory (so the final rename stays on one file
/// system).
#[derive(Debug)]
pub(crate) struct ImageFile {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// An `O_TMPFILE` file: it has no name until [`ImageFile::persist`].
    Unnamed {
        file: File,
        dir: PathBuf,
        prefix: String,
    },
    /// The fallback where `O_TMPFILE` is not available: removed on drop, but left by SIGKILL.
    Named(tempfile::NamedTempFile),
}

impl ImageFile {
    /// A new empty image file in `dir` for the output named `output_name`.
    pub(crate) fn create(dir: &Path, output_name: &str) -> io::Result<ImageFile> {
        let prefix = format!(".{output_name}.");
        #[cfg(target_os = "linux")]
        if Path::new("/proc/self/fd").is_dir() {
            use rustix::fs::{Mode, OFlags, CWD};
            let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
            match rustix::fs::openat(CWD, dir, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => {
                    return Ok(ImageFile {
                        inner: Inner::Unnamed {
                            file: File::from(fd),
                            dir: dir.to_owned(),
                            prefix,
                        },
                    })
                }
                // The file system (or an old kernel) has no O_TMPFILE: see `Inner::Named`.
                Err(e)
                    if e == rustix::io::Errno::OPNOTSUPP
                        || e == rustix::io::Errno::ISDIR
                        || e == rustix::io::Errno::INVAL => {}
                Err(e) => return Err(e.into()),
            }
        }
        let named = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)?;
        Ok(ImageFile {
            inner: Inner::Named(named),
        })
    }

    pub(crate) fn file(&self) -> &File {
        match &self.inner {
            Inner::Unnamed { file, .. } => file,
            Inner::Named(named) => named.as_file(),
        }
    }

    /// A path any process can open the image by while this one lives: for an unnamed file
    /// `/proc/<our pid>/fd/<fd>` (mkfs.erofs 1.5 to 1.9 open, truncate and seek it like a file).
    pub(crate) fn path(&self) -> PathBuf {
        match &self.inner {
            Inner::Unnamed { file, .. } => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                file.as_raw_fd()
            )),
            Inner::Named(named) => named.path().to_owned(),
        }
    }

    /// Gives the finished image the name `output`, atomically replacing what is there.
    pub(crate) fn persist(self, output: &Path) -> io::Result<()> {
        match self.inner {
            Inner::Named(named) => named.persist(output).map(drop).map_err(|e| e.error),
            Inner::Unnamed { file, dir, prefix } => {
                // `linkat` cannot replace an existing name, so the file is linked to a fresh temp
                // name and renamed over the output: two system calls, the only moment a SIGKILL
                // would leave a `.NAME.*.tmp` behind. The temp name is removed on error.
                let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                let named = tempfile::Builder::new()
                    .prefix(&prefix)
                    .suffix(".tmp")
                    .make_in(&dir, |path| {
                        use rustix::fs::{AtFlags, CWD};
                        rustix::fs::linkat(
                            CWD,
                            fd_path.as_str(),
                            CWD,
                            path,
                            AtFlags::SYMLINK_FOLLOW,
                        )
                        .map_err(io::Error::from)
                    })?;
                named.persist(output).map_err(|e| e.error)
            }
        }
    }
}

/// Bytes free (for an unprivileged user) on the file system holding `file`, if it can be asked.
pub(crate) fn free_bytes(file: &File) -> Option<u64> {
    let stat = rustix::fs::fstatvfs(file).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A named temp directory with a locked [`STAGING_MARKER`]; removed (contents and all) on drop.
#[derive(Debug)]
pub(crate) struct StagingDir {
    dir: tempfile::TempDir,
    // Held for the life of the build; the kernel releases the lock when the process dies.
    _lock: File,
}

impl StagingDir {
    /// A new directory `<prefix><random><suffix>` in `parent`.
    pub(crate) fn create(parent: &Path, prefix: &str, suffix: &str) -> io::Result<StagingDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempdir_in(parent)?;
        // Locked under another name and then renamed, so a concurrent sweep never finds the
        // marker unlocked while this build lives.
        let pending = dir.path().join(".storedisk-staging.pending");
        let mut lock = File::create(&pending)?;
        lock.lock()?;
        lock.write_all(
            b"a staging directory of a storedisk build; a later build removes it once this lock is free\n",
        )?;
        fs::rename(&pending, dir.path().join(STAGING_MARKER))?;
        Ok(StagingDir { dir, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the directories `<prefix>*<suffix>` in `parent` that earlier storedisk builds staged
/// and left when they were killed: only those holding a [`STAGING_MARKER`] that can be locked
/// (its build is dead). Anything else, including a live concurrent build's staging directory,
/// is left alone. Best effort: a directory that cannot be read or removed is skipped.
pub(crate) fn sweep_stale(parent: &Path, prefix: &str, suffix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() < prefix.len() + suffix.len()
            || !name.starts_with(prefix)
            || !name.ends_with(suffix)
        {
            continue;
        }
        let path = entry.path();
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        let marker = path.join(STAGING_MARKER);
        if !is_dir || !fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(lock) = File::open(&marker) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            remove_tree(&path);
        }
    }
}

/// Removes `dir` and everything in it, making read-only directories (a staged store tree's)
/// writable first. Best effort.
pub(crate) fn remove_tree(dir: &Path) {
    fn make_writable(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    make_writable(&entry.path());
                }
            }
        }
    }
    make_writable(dir);
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::Read;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_image_file_has_no_name_until_persisted_and_replaces_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("store.img");
        fs::write(&output, b"old").unwrap();
        let image = ImageFile::create(dir.path(), "store.img").unwrap();
        assert!(matches!(image.inner, Inner::Unnamed { .. }), "{image:?}");
        image.file().write_all(b"new image").unwrap();
        assert_eq!(names(dir.path()), ["store.img"]);
        // Another process's way in (mkfs.erofs, the read-back) reads what was written.
        let mut read = String::new();
        File::open(image.path())
            .unwrap()
            .read_to_string(&mut read)
            .unwrap();
        assert_eq!(read, "new image");
        image.persist(&output).unwrap();
        assert_eq!(fs::read(&output).unwrap(), b"new image");
        assert_eq!(names(dir.path()), ["store.img"]);
    }

    #[test]
    fn a_dropped_image_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let image = ImageFile::create(dir.path(), "store.img").unwrap();
        image.file().write_all(b"partial").unwrap();
        drop(image);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn the_sweep_removes_only_dead_builds_staging() {
        let parent = tempfile::tempdir().unwrap();
        let dead = StagingDir::create(parent.path(), ".out.", ".tmp").unwrap();
        fs::create_dir(dead.path().join("out")).unwrap();
        fs::write(dead.path().join("out/layer-00.squashfs"), b"x").unwrap();
        // Its build dies: the lock goes, the directory stays.
        let dead_path = dead.path().to_owned();
        let StagingDir { dir, _lock } = dead;
        drop(_lock);
        let _ = dir.keep();
        let live = StagingDir::create(parent.path(), ".out.", ".tmp").unwrap();
        let unmarked = parent.path().join(".out.mine.tmp");
        fs::create_dir(&unmarked).unwrap();
        let other_name = parent.path().join(".other.x.tmp");
        fs::create_dir(&other_name).unwrap();
        File::create(other_name.join(STAGING_MARKER)).unwrap();

        sweep_stale(parent.path(), ".out.", ".tmp");
        assert!(!dead_path.exists());
        assert!(live.path().join(STAGING_MARKER).is_file());
        assert!(unmarked.is_dir());
        assert!(other_name.is_dir());
        drop(live);
        assert_eq!(names(parent.path()), [".other.x.tmp", ".out.mine.tmp"]);
    }
}
