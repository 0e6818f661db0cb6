//! NAR (Nix ARchive) serialization and hashing.
//!
//! [`NarEncoder`] is a streaming, event-driven writer: a caller walks any tree (a local
//! directory, the inside of a squashfs or erofs image) and reports nodes in order; the encoder
//! checks the order and the names as Nix would and writes the canonical byte stream. Feeding it
//! into a [`NarHasher`] gives the `narHash`/`narSize` pair Nix records, without materializing
//! the NAR anywhere.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::hash::NarHash;

const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Why a tree could not be serialized. Causes are shown in the message, not chained as a
/// `source`, so each is printed once however the error is formatted (the workspace's
/// convention).
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("I/O error on {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{path}: {kind} cannot be stored in a Nix store path (only regular files, directories and symlinks)")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("NAR events out of order: {0}")]
    Order(&'static str),
    #[error("NAR output: {0}")]
    Output(io::Error),
}

/// Writes the NAR encoding of a tree reported node by node.
///
/// Order of calls: one root node; a directory is `begin_directory`, then for each child in
/// strictly increasing byte order of names `entry(name)` followed by exactly one node, then
/// `end_directory`. Call [`NarEncoder::finish`] after the root node.
#[derive(Debug)]
pub struct NarEncoder<W: Write> {
    out: W,
    /// One frame per open directory.
    stack: Vec<DirectoryFrame>,
    root_done: bool,
    /// Copy buffer for file contents, allocated once per NAR (a closure has many small files).
    buffer: Vec<u8>,
}

#[derive(Debug)]
struct DirectoryFrame {
    last_name: Option<Vec<u8>>,
    /// `entry` was called and its node has not been completed yet.
    in_entry: bool,
    /// The node of the open entry has started (it is a directory being written).
    entry_node_started: bool,
}

impl<W: Write> NarEncoder<W> {
    /// Starts a NAR, writing the magic string.
    pub fn new(mut out: W) -> Result<Self, NarError> {
        write_str(&mut out, NAR_MAGIC).map_err(NarError::Output)?;
        Ok(NarEncoder {
            out,
            stack: Vec::new(),
            root_done: false,
            buffer: Vec::new(),
        })
    }

    /// A regular file of `size` bytes read from `contents`; fails if `contents` yields more or
    /// fewer bytes (a file changed while being read, or a lying size field).
    pub fn regular(
        &mut self,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        self.start_node()?;
        let out = &mut self.out;
        write_str(out, b"(").map_err(NarError::Output)?;
        write_str(out, b"type").map_err(NarError::Output)?;
        write_str(out, b"regular").map_err(NarError::Output)?;
        if executable {
            write_str(out, b"executable").map_err(NarError::Output)?;
            write_str(out, b"").map_err(NarError::Output)?;
        }
        write_str(out, b"contents").map_err(NarError::Output)?;
        out.write_all(&size.to_le_bytes())
            .map_err(NarError::Output)?;
        let copied = copy_exact(contents, out, size, &mut self.buffer)?;
        if copied != size {
            return Err(NarError::Invalid {
                path: PathBuf::new(),
                reason: format!("file contents ended after {copied} of {size} bytes"),
            });
        }
        write_padding(out, size).map_err(NarError::Output)?;
        write_str(out, b")").map_err(NarError::Output)?;
        self.end_node()
    }

    /// A symlink; the target is stored verbatim (it may dangle).
    pub fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
        if target.is_empty() || target.contains(&0) {
            return Err(NarError::Invalid {
                path: PathBuf::new(),
                reason: "a symlink target must be non-empty and contain no NUL byte".to_owned(),
            });
        }
        self.start_node()?;
        for s in [&b"("[..], b"type", b"symlink", b"target", target, b")"] {
            write_str(&mut self.out, s).map_err(NarError::Output)?;
        }
        self.end_node()
    }

    /// Opens a directory node; its entries follow.
    pub fn begin_directory(&mut self) -> Result<(), NarError> {
        self.start_node()?;
        if let Some(parent) = self.stack.last_mut() {
            parent.entry_node_started = true;
        }
        for s in [&b"("[..], b"type", b"directory"] {
            write_str(&mut self.out, s).map_err(NarError::Output)?;
        }
        self.stack.push(DirectoryFrame {
            last_name: None,
            in_entry: false,
            entry_node_started: false,
        });
        Ok(())
    }

    /// Starts the entry `name` in the open directory; exactly one node must follow.
    pub fn entry(&mut self, name: &[u8]) -> Result<(), NarError> {
        check_entry_name(name)?;
        let frame = self
            .stack
            .last_mut()
            .ok_or(NarError::Order("entry outside a directory"))?;
        if frame.in_entry {
            return Err(NarError::Order("entry before the previous entry's node"));
        }
        if let Some(last) = &frame.last_name {
            if last.as_slice() >= name {
                return Err(NarError::Invalid {
                    path: PathBuf::from(String::from_utf8_lossy(name).into_owned()),
                    reason: format!(
                        "directory entries must be unique and sorted, but this follows {:?}",
                        String::from_utf8_lossy(last)
                    ),
                });
            }
        }
        frame.last_name = Some(name.to_vec());
        frame.in_entry = true;
        frame.entry_node_started = false;
        for s in [&b"entry"[..], b"(", b"name", name, b"node"] {
            write_str(&mut self.out, s).map_err(NarError::Output)?;
        }
        Ok(())
    }

    /// Closes the innermost open directory.
    pub fn end_directory(&mut self) -> Result<(), NarError> {
        let frame = self
            .stack
            .pop()
            .ok_or(NarError::Order("end_directory without begin_directory"))?;
        if frame.in_entry {
            return Err(NarError::Order(
                "end_directory inside an entry without a node",
            ));
        }
        write_str(&mut self.out, b")").map_err(NarError::Output)?;
        self.end_node()
    }

    /// Ends the NAR and gives the output back.
    pub fn finish(self) -> Result<W, NarError> {
        if !self.root_done || !self.stack.is_empty() {
            return Err(NarError::Order("finish before the root node was complete"));
        }
        Ok(self.out)
    }

    fn start_node(&mut self) -> Result<(), NarError> {
        match self.stack.last() {
            None if self.root_done => Err(NarError::Order("a second root node")),
            None => Ok(()),
            Some(frame) if frame.in_entry && !frame.entry_node_started => Ok(()),
            Some(_) => Err(NarError::Order(
                "a node inside a directory without an entry",
            )),
        }
    }

    fn end_node(&mut self) -> Result<(), NarError> {
        match self.stack.last_mut() {
            None => {
                self.root_done = true;
                Ok(())
            }
            Some(frame) => {
                frame.in_entry = false;
                frame.entry_node_started = false;
                write_str(&mut self.out, b")").map_err(NarError::Output)
            }
        }
    }
}

/// Whether `name` can be a directory entry in a NAR (and so in a store path): not empty, not
/// `.` or `..`, no `/` and no NUL.
pub fn is_valid_entry_name(name: &[u8]) -> bool {
    !(name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0))
}

fn check_entry_name(name: &[u8]) -> Result<(), NarError> {
    if !is_valid_entry_name(name) {
        return Err(NarError::Invalid {
            path: PathBuf::from(String::from_utf8_lossy(name).into_owned()),
            reason: "not a valid directory entry name (empty, '.', '..', or containing '/' or NUL)"
                .to_owned(),
        });
    }
    Ok(())
}

fn write_str(out: &mut dyn Write, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)?;
    write_padding(out, s.len() as u64)
}

fn write_padding(out: &mut dyn Write, len: u64) -> io::Result<()> {
    let pad = (8 - len % 8) % 8;
    out.write_all(&[0u8; 8][..pad as usize])
}

fn copy_exact(
    from: &mut dyn Read,
    to: &mut dyn Write,
    size: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, NarError> {
    const BUFFER_SIZE: usize = 256 * 1024;
    if size > 0 && buf.len() < BUFFER_SIZE {
        buf.resize(BUFFER_SIZE, 0);
    }
    let mut copied = 0u64;
    while copied < size {
        let want = (size - copied).min(buf.len() as u64) as usize;
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(NarError::Io {
                    path: PathBuf::new(),
                    cause: e,
                })
            }
        };
        to.write_all(&buf[..n]).map_err(NarError::Output)?;
        copied += n as u64;
    }
    if copied == size {
        // A longer source means the size we were given was wrong.
        let mut probe = [0u8; 1];
        if matches!(from.read(&mut probe), Ok(1)) {
            return Err(NarError::Invalid {
                path: PathBuf::new(),
                reason: format!("file contents are longer than the stated {size} bytes"),
            });
        }
    }
    Ok(copied)
}

/// A `Write` sink that computes a NAR's sha256 and length.
#[derive(Debug, Default, Clone)]
pub struct NarHasher {
    sha256: Sha256,
    len: u64,
}

impl NarHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// The NAR hash and NAR size of everything written.
    pub fn finish(self) -> (NarHash, u64) {
        (NarHash(self.sha256.finalize().into()), self.len)
    }
}

impl Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sha256.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serializes the local file, symlink or directory at `path` as Nix's `dumpPath` does.
/// Regular files are executable when the owner's execute bit is set.
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<W, NarError> {
    let mut encoder = NarEncoder::new(out)?;
    dump_node(path, &mut encoder)?;
    encoder.finish()
}

/// NAR hash and NAR size of the local path, as `nix-hash --type sha256 --base32` computes.
pub fn hash_path(path: &Path) -> Result<(NarHash, u64), NarError> {
    Ok(dump_path(path, NarHasher::new())?.finish())
}

fn dump_node<W: Write>(path: &Path, encoder: &mut NarEncoder<W>) -> Result<(), NarError> {
    let io_err = |cause| NarError::Io {
        path: path.to_owned(),
        cause,
    };
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    let file_type = meta.file_type();
    let with_path = |e: NarError| match e {
        NarError::Io { path: p, cause } if p.as_os_str().is_empty() => NarError::Io {
            path: path.to_owned(),
            cause,
        },
        NarError::Invalid { path: p, reason } if p.as_os_str().is_empty() => NarError::Invalid {
            path: path.to_owned(),
            reason,
        },
        other => other,
    };
    if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(io_err)?;
        encoder
            .symlink(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()))
            .map_err(with_path)
    } else if file_type.is_file() {
        let mut file = fs::File::open(path).map_err(io_err)?;
        let executable = meta.permissions().mode() & 0o100 != 0;
        encoder
            .regular(executable, meta.len(), &mut file)
            .map_err(with_path)
    } else if file_type.is_dir() {
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err)? {
            names.push(entry.map_err(io_err)?.file_name());
        }
        names.sort_by(|a, b| {
            use std::os::unix::ffi::OsStrExt;
            a.as_bytes().cmp(b.as_bytes())
        });
        encoder.begin_directory()?;
        for name in names {
            encoder.entry(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()))?;
            dump_node(&path.join(&name), encoder)?;
        }
        encoder.end_directory()
    } else {
        Err(NarError::UnsupportedFileType {
            path: path.to_owned(),
            kind: file_kind_name(&file_type),
        })
    }
}

/// A human name for a file type Nix cannot store.
pub fn file_kind_name(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a named pipe (FIFO)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "a file of unknown type"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar_of(
        build: impl FnOnce(&mut NarEncoder<Vec<u8>>) -> Result<(), NarError>,
    ) -> Result<Vec<u8>, NarError> {
        let mut enc = NarEncoder::new(Vec::new())?;
        build(&mut enc)?;
        enc.finish()
    }

    fn s(bytes: &[u8]) -> Vec<u8> {
        let mut v = (bytes.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(bytes);
        v.resize(v.len() + (8 - bytes.len() % 8) % 8, 0);
        v
    }

    #[test]
    fn encodes_a_regular_file_byte_for_byte() {
        let nar = nar_of(|e| e.regular(true, 3, &mut &b"abc"[..])).unwrap();
        let mut want = Vec::new();
        for part in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"abc",
            b")",
        ] {
            want.extend(s(part));
        }
        assert_eq!(nar, want);
    }

    #[test]
    fn rejects_unsorted_or_bad_entries() {
        let unsorted = nar_of(|e| {
            e.begin_directory()?;
            e.entry(b"b")?;
            e.symlink(b"x")?;
            e.entry(b"a")
        });
        assert!(matches!(unsorted, Err(NarError::Invalid { .. })));
        for bad in [&b""[..], b".", b"..", b"a/b"] {
            let r = nar_of(|e| {
                e.begin_directory()?;
                e.entry(bad)
            });
            assert!(r.is_err(), "{bad:?}");
        }
        assert!(nar_of(|e| e.symlink(b"")).is_err());
    }

    #[test]
    fn rejects_contents_that_disagree_with_the_size() {
        assert!(nar_of(|e| e.regular(false, 4, &mut &b"abc"[..])).is_err());
        assert!(nar_of(|e| e.regular(false, 2, &mut &b"abc"[..])).is_err());
    }

    #[test]
    fn rejects_misordered_events() {
        assert!(nar_of(|e| {
            e.begin_directory()?;
            e.symlink(b"x")
        })
        .is_err());
        assert!(nar_of(|e| {
            e.symlink(b"x")?;
            e.symlink(b"y")
        })
        .is_err());
        assert!(nar_of(|e| e.begin_directory()).is_err());
    }
}
