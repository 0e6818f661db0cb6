//! The one walk of a closure's files that every image writer consumes: each store path's tree
//! read from disk into a sorted list of entries with canonical metadata (no file data), with
//! everything a Nix store cannot hold rejected up front, naming the file.
//!
//! Order: store paths by base name, then depth first with the entries of each directory sorted
//! by the bytes of their names. That is also the order of `Path`'s component-wise comparison,
//! so writers that keep entries sorted by path (backhand) receive them already in place.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use storedisk_nix::nar::file_kind_name;
use storedisk_nix::Closure;

use crate::BuildError;

/// One file, directory or symlink of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the image, relative to its root: `<hash>-<name>[/...]`.
    pub path: PathBuf,
    pub kind: EntryKind,
}

/// What an entry is, with the metadata the image keeps for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    Regular {
        executable: bool,
        size: u64,
        /// Index (in [`Tree::entries`]) of the first entry of the closure that is the same
        /// file on disk (same device and inode), when this one is a later hard link to it.
        hard_link_of: Option<usize>,
    },
    Symlink {
        target: OsString,
    },
}

impl Entry {
    /// Permission bits as Nix leaves them in the store: files 0444, or 0555 when executable;
    /// directories 0555; symlinks 0777.
    pub fn mode(&self) -> u16 {
        match self.kind {
            EntryKind::Directory => 0o555,
            EntryKind::Regular {
                executable: true, ..
            } => 0o555,
            EntryKind::Regular {
                executable: false, ..
            } => 0o444,
            EntryKind::Symlink { .. } => 0o777,
        }
    }
}

/// Entry counts and the total of file data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCounts {
    pub directories: usize,
    pub regular_files: usize,
    pub symlinks: usize,
    pub hard_links: usize,
    pub file_bytes: u64,
}

/// A closure's files, walked and validated; see the module documentation for the order.
#[derive(Debug, Clone)]
pub struct Tree {
    store_dir: PathBuf,
    store_paths: usize,
    entries: Vec<Entry>,
}

impl Tree {
    /// Walks every store path of `closure` under the physical directory `store_dir`.
    pub fn walk(closure: &Closure, store_dir: &Path) -> Result<Tree, BuildError> {
        let mut walker = Walker {
            store_dir,
            entries: Vec::new(),
            inodes: HashMap::new(),
        };
        for info in closure.iter() {
            let physical = store_dir.join(info.path.base_name());
            let meta = match fs::symlink_metadata(&physical) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(BuildError::MissingStorePath {
                        path: closure.display(&info.path),
                        physical,
                    })
                }
                Err(source) => {
                    return Err(BuildError::Read {
                        path: physical,
                        cause: source,
                    })
                }
            };
            walker.visit(PathBuf::from(info.path.base_name()), &meta)?;
        }
        Ok(Tree {
            store_dir: store_dir.to_owned(),
            store_paths: closure.len(),
            entries: walker.entries,
        })
    }

    /// Entries in image order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// How many store paths the tree holds (entries at the image root).
    pub fn store_paths(&self) -> usize {
        self.store_paths
    }

    /// Where `entry`'s contents are on disk.
    pub fn source(&self, entry: &Entry) -> PathBuf {
        self.store_dir.join(&entry.path)
    }

    pub fn counts(&self) -> TreeCounts {
        let mut counts = TreeCounts::default();
        for entry in &self.entries {
            match entry.kind {
                EntryKind::Directory => counts.directories += 1,
                EntryKind::Symlink { .. } => counts.symlinks += 1,
                EntryKind::Regular {
                    size, hard_link_of, ..
                } => {
                    counts.regular_files += 1;
                    counts.file_bytes += size;
                    counts.hard_links += usize::from(hard_link_of.is_some());
                }
            }
        }
        counts
    }
}

struct Walker<'a> {
    store_dir: &'a Path,
    entries: Vec<Entry>,
    /// (device, inode) of every regular file with more than one link, to its first entry.
    inodes: HashMap<(u64, u64), usize>,
}

impl Walker<'_> {
    fn visit(&mut self, path: PathBuf, meta: &fs::Metadata) -> Result<(), BuildError> {
        let physical = self.store_dir.join(&path);
        let file_type = meta.file_type();
        let read_err = |source| BuildError::Read {
            path: physical.clone(),
            cause: source,
        };
        if file_type.is_symlink() {
            let target = fs::read_link(&physical).map_err(read_err)?.into_os_string();
            self.entries.push(Entry {
                path,
                kind: EntryKind::Symlink { target },
            });
        } else if file_type.is_file() {
            // Opening every file now costs little and turns an unreadable file into an error
            // before minutes of compression rather than after.
            drop(fs::File::open(&physical).map_err(read_err)?);
            let index = self.entries.len();
            let hard_link_of = if meta.nlink() > 1 {
                Some(*self.inodes.entry((meta.dev(), meta.ino())).or_insert(index))
                    .filter(|&first| first != index)
            } else {
                None
            };
            self.entries.push(Entry {
                path,
                kind: EntryKind::Regular {
                    executable: meta.mode() & 0o100 != 0,
                    size: meta.len(),
                    hard_link_of,
                },
            });
        } else if file_type.is_dir() {
            let mut children = Vec::new();
            for child in fs::read_dir(&physical).map_err(read_err)? {
                let child = child.map_err(read_err)?;
                let meta = child.metadata().map_err(|source| BuildError::Read {
                    path: child.path(),
                    cause: source,
                })?;
                children.push((child.file_name(), meta));
            }
            children.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            self.entries.push(Entry {
                path: path.clone(),
                kind: EntryKind::Directory,
            });
            for (name, meta) in children {
                self.visit(path.join(name), &meta)?;
            }
        } else {
            return Err(BuildError::UnsupportedFileType {
                path: physical,
                kind: file_kind_name(&file_type),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    use storedisk_nix::{PathInfo, StoreDir, StorePath};

    use super::*;

    fn store_path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", "a".repeat(32))).unwrap()
    }

    fn closure_of(paths: &[&StorePath]) -> Closure {
        Closure::new(
            StoreDir::default(),
            paths.iter().map(|p| PathInfo::new((*p).clone())).collect(),
        )
        .unwrap()
    }

    fn write(path: &Path, contents: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn sorts_by_name_bytes_depth_first_and_canonicalises_modes() {
        let store = tempfile::tempdir().unwrap();
        let a = store_path("a");
        let b = store_path("b-1.0");
        let top = store.path().join(a.base_name());
        // Created out of order, with modes the store would never have.
        write(&top.join("z"), b"z", 0o600);
        write(&top.join("B/x"), b"exec", 0o700);
        write(&top.join("a-b"), b"", 0o666);
        write(&top.join("a/c"), b"cc", 0o640);
        symlink("../dangling", top.join("l")).unwrap();
        fs::set_permissions(top.join("B"), fs::Permissions::from_mode(0o700)).unwrap();
        write(&store.path().join(b.base_name()), b"single file", 0o755);

        let tree = Tree::walk(&closure_of(&[&b, &a]), store.path()).unwrap();
        let listed: Vec<(String, u16)> = tree
            .entries()
            .iter()
            .map(|e| (e.path.to_string_lossy().into_owned(), e.mode()))
            .collect();
        let ab = a.base_name();
        let want = vec![
            (ab.to_owned(), 0o555),
            (format!("{ab}/B"), 0o555),
            (format!("{ab}/B/x"), 0o555),
            (format!("{ab}/a"), 0o555),
            (format!("{ab}/a/c"), 0o444),
            (format!("{ab}/a-b"), 0o444),
            (format!("{ab}/l"), 0o777),
            (format!("{ab}/z"), 0o444),
            (b.base_name().to_owned(), 0o555),
        ];
        assert_eq!(listed, want);
        // Byte order of names is also Path order, which backhand keeps its nodes in.
        let paths: Vec<&Path> = tree.entries().iter().map(|e| e.path.as_path()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert_eq!(
            tree.entries()[6].kind,
            EntryKind::Symlink {
                target: "../dangling".into()
            }
        );
        let counts = tree.counts();
        assert_eq!(
            (counts.directories, counts.regular_files, counts.symlinks),
            (3, 5, 1)
        );
        assert_eq!(counts.file_bytes, 1 + 4 + 2 + 11);
    }

    #[test]
    fn links_later_hard_links_to_the_first_entry() {
        let store = tempfile::tempdir().unwrap();
        let a = store_path("a");
        let top = store.path().join(a.base_name());
        write(&top.join("first"), b"shared", 0o444);
        fs::hard_link(top.join("first"), top.join("second")).unwrap();
        // A link outside the closure raises nlink but must not make an entry a link.
        fs::hard_link(top.join("first"), store.path().join("outside")).unwrap();
        write(&top.join("third"), b"alone", 0o444);

        let tree = Tree::walk(&closure_of(&[&a]), store.path()).unwrap();
        let kinds: Vec<&EntryKind> = tree.entries().iter().map(|e| &e.kind).collect();
        assert!(matches!(
            kinds[1],
            EntryKind::Regular {
                hard_link_of: None,
                ..
            }
        ));
        assert!(matches!(
            kinds[2],
            EntryKind::Regular {
                hard_link_of: Some(1),
                ..
            }
        ));
        assert!(matches!(
            kinds[3],
            EntryKind::Regular {
                hard_link_of: None,
                ..
            }
        ));
        assert_eq!(tree.counts().hard_links, 1);
    }

    #[test]
    fn rejects_a_fifo_naming_it() {
        let store = tempfile::tempdir().unwrap();
        let a = store_path("a");
        let top = store.path().join(a.base_name());
        fs::create_dir(&top).unwrap();
        let fifo = top.join("pipe");
        let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success(), "mkfifo (coreutils) failed");
        match Tree::walk(&closure_of(&[&a]), store.path()) {
            Err(err @ BuildError::UnsupportedFileType { .. }) => {
                let text = err.to_string();
                assert!(text.contains(&fifo.display().to_string()), "{text}");
                assert!(text.contains("FIFO"), "{text}");
            }
            other => panic!("expected an unsupported file type error, got {other:?}"),
        }
    }

    #[test]
    fn names_a_store_path_missing_on_disk() {
        let store = tempfile::tempdir().unwrap();
        let a = store_path("a");
        let err = Tree::walk(&closure_of(&[&a]), store.path()).unwrap_err();
        assert!(matches!(err, BuildError::MissingStorePath { .. }));
        assert!(
            err.to_string()
                .contains(&format!("/nix/store/{}", a.base_name())),
            "{err}"
        );
    }
}
