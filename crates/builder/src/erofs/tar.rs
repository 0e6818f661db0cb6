//! The canonical tree as a tar stream, for `mkfs.erofs --tar=f` (erofs-utils 1.7+): what the
//! staging directory used to say through the file system, said in headers instead, so the
//! closure's data is read once, straight from the store, and never copied by us (mkfs.erofs
//! 1.8.6 itself stages each file's raw bytes in the image file before compressing them into
//! place, which is the rest of the gap to it reading a directory: README, "Benchmarks").
//!
//! Every header carries the store's metadata: modes 0444/0555 (directories 0555, symlinks
//! 0777), uid and gid 0 with empty user and group names, mtime 0. Hard links within the
//! closure are tar hard links to the first entry. Names, link targets or sizes that do not fit
//! a ustar header go into a PAX extended header (`path`, `linkpath`, `size`), which erofs-utils
//! reads. The stream depends on the tree only, so the image does too.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ChildStdin;

use crate::tree::{EntryKind, Tree};
use crate::{BuildError, ProgressSink};

const BLOCK: usize = 512;
/// Largest size a ustar header's 11 octal digits hold.
const USTAR_MAX_SIZE: u64 = 0o77777777777;

/// Where the tar stream goes: headers are written, file data appended from the open file.
pub(crate) trait TarSink: Write {
    /// Appends up to `len` bytes of `file`; returns how many there were.
    fn append_file(&mut self, file: &mut fs::File, len: u64) -> io::Result<u64> {
        io::copy(&mut Read::take(file, len), self)
    }
}

impl TarSink for Vec<u8> {}

/// Into a pipe, file data goes by `splice` (std's `io::copy` from a file to a pipe), never
/// through a buffer of ours.
impl TarSink for BufWriter<ChildStdin> {
    fn append_file(&mut self, file: &mut fs::File, len: u64) -> io::Result<u64> {
        self.flush()?;
        io::copy(&mut Read::take(file, len), self.get_mut())
    }
}

/// Writes `tree` as a tar stream to `out`, file data read from the store.
pub(crate) fn write_tar(
    tree: &Tree,
    out: &mut impl TarSink,
    progress: &dyn ProgressSink,
) -> Result<(), BuildError> {
    let write_err = |source: io::Error| BuildError::Write {
        path: "the mkfs.erofs input stream".into(),
        cause: source,
    };
    // The image root: read-only like every store directory.
    header(out, b"./", 0o555, b'5', 0, b"").map_err(write_err)?;
    let entries = tree.entries();
    for entry in entries {
        let name = entry.path.as_os_str().as_bytes();
        match &entry.kind {
            EntryKind::Directory => {
                let mut dir = name.to_vec();
                dir.push(b'/');
                header(out, &dir, entry.mode(), b'5', 0, b"").map_err(write_err)?;
            }
            EntryKind::Symlink { target } => {
                header(out, name, entry.mode(), b'2', 0, target.as_bytes()).map_err(write_err)?;
            }
            EntryKind::Regular {
                hard_link_of: Some(first),
                ..
            } => {
                let first = entries[*first].path.as_os_str().as_bytes();
                header(out, name, entry.mode(), b'1', 0, first).map_err(write_err)?;
            }
            EntryKind::Regular {
                size,
                hard_link_of: None,
                ..
            } => {
                header(out, name, entry.mode(), b'0', *size, b"").map_err(write_err)?;
                copy_file(&tree.source(entry), *size, out, progress)?;
                pad(out, *size).map_err(write_err)?;
            }
        }
    }
    out.write_all(&[0u8; 2 * BLOCK]).map_err(write_err)?;
    out.flush().map_err(write_err)
}

/// Streams `size` bytes of `source` into `out`; the file must still have exactly that length.
fn copy_file(
    source: &Path,
    size: u64,
    out: &mut impl TarSink,
    progress: &dyn ProgressSink,
) -> Result<(), BuildError> {
    let read_err = |e| BuildError::Read {
        path: source.to_owned(),
        cause: e,
    };
    let mut file = fs::File::open(source).map_err(read_err)?;
    let copied = out.append_file(&mut file, size).map_err(|e| {
        if e.kind() == io::ErrorKind::BrokenPipe {
            BuildError::Write {
                path: "the mkfs.erofs input stream".into(),
                cause: e,
            }
        } else {
            read_err(e)
        }
    })?;
    progress.advance(copied);
    if copied != size {
        return Err(BuildError::length_changed(source, size, copied));
    }
    // One more byte would mean the file grew since the walk.
    if file.read(&mut [0u8; 1]).map_err(read_err)? != 0 {
        return Err(BuildError::length_changed(source, size, size + 1));
    }
    Ok(())
}

fn pad(out: &mut dyn Write, size: u64) -> io::Result<()> {
    let rest = (size % BLOCK as u64) as usize;
    if rest != 0 {
        out.write_all(&[0u8; BLOCK][..BLOCK - rest])?;
    }
    Ok(())
}

/// One entry's header: a PAX extended header first when the name, the link target or the size
/// does not fit ustar's fields.
fn header(
    out: &mut dyn Write,
    name: &[u8],
    mode: u16,
    typeflag: u8,
    size: u64,
    link: &[u8],
) -> io::Result<()> {
    let mut pax = Vec::new();
    if name.len() > 100 {
        pax_record(&mut pax, b"path", name);
    }
    if link.len() > 100 {
        pax_record(&mut pax, b"linkpath", link);
    }
    if size > USTAR_MAX_SIZE {
        pax_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    if !pax.is_empty() {
        out.write_all(&ustar(b"pax", 0o644, b'x', pax.len() as u64, b""))?;
        out.write_all(&pax)?;
        pad(out, pax.len() as u64)?;
    }
    let short = |b: &[u8]| -> Vec<u8> { b[..b.len().min(100)].to_vec() };
    out.write_all(&ustar(
        &short(name),
        mode,
        typeflag,
        size.min(USTAR_MAX_SIZE),
        &short(link),
    ))
}

/// A PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A ustar header block; `name` and `link` are at most 100 bytes.
fn ustar(name: &[u8], mode: u16, typeflag: u8, size: u64, link: &[u8]) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0); // mtime
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    h
}

/// `value` as zero-padded octal digits filling `field` but its last byte, which is NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    use storedisk_nix::{Closure, PathInfo, StoreDir, StorePath};

    use super::*;
    use crate::NoProgress;

    #[test]
    fn gnu_tar_reads_the_stream_with_canonical_metadata_links_and_long_names() {
        let store = tempfile::tempdir().unwrap();
        let base = format!("{}-t", "a".repeat(32));
        let top = store.path().join(&base);
        let long = "l".repeat(150);
        fs::create_dir_all(top.join("d")).unwrap();
        fs::write(top.join("d/f"), b"data").unwrap();
        fs::set_permissions(top.join("d/f"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::hard_link(top.join("d/f"), top.join("d/g")).unwrap();
        fs::write(top.join(&long), vec![7u8; 1000]).unwrap();
        symlink(format!("/nix/store/{}", "x".repeat(120)), top.join("s")).unwrap();
        let path = StorePath::from_base_name(&base).unwrap();
        let closure = Closure::new(StoreDir::default(), vec![PathInfo::new(path)]).unwrap();
        let tree = Tree::walk(&closure, store.path()).unwrap();
        let mut stream = Vec::new();
        write_tar(&tree, &mut stream, &NoProgress).unwrap();
        assert_eq!(stream.len() % BLOCK, 0);
        let tar_file = store.path().join("t.tar");
        fs::write(&tar_file, &stream).unwrap();
        let out = Command::new("tar")
            .args(["-tv", "--numeric-owner", "--full-time", "-f"])
            .arg(&tar_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let has = |mode: &str, name: &str| {
            listing.lines().any(|l| {
                l.starts_with(mode)
                    && l.contains(" 0/0 ")
                    && l.contains("1970-01-01")
                    && l.contains(name)
            })
        };
        assert!(has("dr-xr-xr-x", "./"), "{listing}");
        assert!(has("dr-xr-xr-x", &format!("{base}/d/")), "{listing}");
        assert!(has("-r-xr-xr-x", &format!("{base}/d/f")), "{listing}");
        assert!(
            has("hr-xr-xr-x", &format!("{base}/d/g link to {base}/d/f")),
            "{listing}"
        );
        assert!(has("-r--r--r--", &format!("{base}/{long}")), "{listing}");
        assert!(has("lrwxrwxrwx", &"x".repeat(120)), "{listing}");
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for value_len in [1usize, 5, 90, 95, 96, 97, 990, 995, 996, 5000] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; value_len]);
            let text = String::from_utf8(out.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{value_len}");
        }
    }

    #[test]
    fn ustar_headers_have_valid_checksums_and_octal_fields() {
        let h = ustar(b"a/b", 0o555, b'0', 1234, b"");
        let stored = std::str::from_utf8(&h[148..154]).unwrap();
        let mut blank = h;
        blank[148..156].copy_from_slice(b"        ");
        let sum: u32 = blank.iter().map(|b| u32::from(*b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&h[124..136], b"00000002322\0");
        assert_eq!(&h[100..108], b"0000555\0");
        assert_eq!(&h[257..263], b"ustar\0");
    }
}
