//! squashfs (v4) images, read with the backhand crate over a byte slice.
//!
//! backhand's `FilesystemReader` builds its node list by recursion and keeps every node's full
//! path, and it trusts offsets in a few places. So before handing the image to it we check what
//! a hostile image could abuse: the superblock's table offsets, the chain of metadata blocks
//! (which bounds the memory backhand will decompress), and the whole directory tree (depth,
//! cycles, names, entry and path totals, file sizes), walked here from backhand's parsed inode
//! table and raw directory table. Our [`Tree`] comes from that walk; backhand is then used only
//! to stream file data.

use std::collections::HashSet;
use std::io::{Cursor, Read};

use backhand::v4::inode::{Inode, InodeInner};
use backhand::{FilesystemReader, Squashfs, SquashfsFileReader};

use super::ImageReader;
use crate::error::VerifyError;
use crate::image::ImageFormat;
use crate::limits::Limits;
use crate::tree::{FileSource, NodeId, NodeKind, Tree, TreeBuilder};

const SUPERBLOCK_LEN: usize = 96;
const NOT_SET: u64 = u64::MAX;
const METADATA_BLOCK_MAX: u64 = 8192;
const FLAG_NFS_EXPORT: u16 = 0x0080;

/// An opened squashfs image.
pub struct SquashfsImage<'a> {
    fs: FilesystemReader<'a>,
    /// Regular files; a file node's handle indexes this.
    files: Vec<SquashfsFileReader>,
    tree: Tree,
}

impl std::fmt::Debug for SquashfsImage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SquashfsImage({} nodes)", self.tree.node_count())
    }
}

fn lib_err(doing: &str) -> impl Fn(backhand::BackhandError) -> VerifyError + '_ {
    move |e| {
        // Some backhand errors (deku assertions) display as an empty string.
        let shown = e.to_string();
        let shown = if shown.trim().is_empty() {
            format!("{e:?}")
        } else {
            shown
        };
        let shown = if shown.trim().is_empty() {
            "backhand 0.25 gave no reason (its reader also rejects valid images, e.g. ones with a \
             symlink target longer than 255 bytes)"
                .to_owned()
        } else {
            shown
        };
        VerifyError::corrupt(format!("squashfs: {doing}: {shown}"))
    }
}

impl<'a> SquashfsImage<'a> {
    pub fn open(bytes: &'a [u8], limits: &Limits) -> Result<Self, VerifyError> {
        check_superblock_and_metadata(bytes, limits)?;
        let squashfs = Squashfs::from_reader_with_offset(Cursor::new(bytes), 0)
            .map_err(lib_err("reading the inode table"))?;
        let (tree, files) = build_tree(&squashfs, bytes.len() as u64, limits)?;
        let fs = squashfs
            .into_filesystem_reader()
            .map_err(lib_err("reading the directory tree"))?;
        Ok(SquashfsImage { fs, files, tree })
    }
}

impl FileSource for SquashfsImage<'_> {
    fn open_file(&self, handle: u64) -> Result<Box<dyn Read + '_>, VerifyError> {
        let file = self
            .files
            .get(handle as usize)
            .ok_or_else(|| VerifyError::corrupt("squashfs: no such file handle"))?;
        let reader = self
            .fs
            .file(file)
            .reader_checked()
            .map_err(lib_err("opening a file"))?;
        Ok(Box::new(reader))
    }
}

impl ImageReader for SquashfsImage<'_> {
    fn format(&self) -> ImageFormat {
        ImageFormat::Squashfs
    }

    fn tree(&self) -> &Tree {
        &self.tree
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Validates the superblock's offsets and walks the headers of the metadata blocks backhand
/// will decompress (inode table, directory table), bounding their total.
fn check_superblock_and_metadata(bytes: &[u8], limits: &Limits) -> Result<(), VerifyError> {
    let len = bytes.len() as u64;
    if bytes.len() < SUPERBLOCK_LEN {
        return Err(VerifyError::corrupt(format!(
            "squashfs: the image is {len} bytes, shorter than the {SUPERBLOCK_LEN}-byte superblock"
        )));
    }
    let sb = &bytes[..SUPERBLOCK_LEN];
    let (major, minor) = (u16_at(sb, 28), u16_at(sb, 30));
    if (major, minor) != (4, 0) {
        return Err(VerifyError::corrupt(format!(
            "squashfs: version {major}.{minor} (only 4.0 is supported)"
        )));
    }
    let block_size = u32_at(sb, 12);
    let block_log = u16_at(sb, 22);
    if !(4096..=1 << 20).contains(&block_size)
        || !block_size.is_power_of_two()
        || 1u32 << block_log.min(31) != block_size
    {
        return Err(VerifyError::corrupt(format!(
            "squashfs: block size {block_size} with log {block_log} (must be a power of two from 4 KiB to 1 MiB)"
        )));
    }
    let bytes_used = u64_at(sb, 40);
    let id_table = u64_at(sb, 48);
    let inode_table = u64_at(sb, 64);
    let dir_table = u64_at(sb, 72);
    let frag_table = u64_at(sb, 80);
    let export_table = u64_at(sb, 88);
    let frag_count = u32_at(sb, 16);
    let flags = u16_at(sb, 24);
    if bytes_used > len {
        return Err(VerifyError::corrupt(format!(
            "squashfs: the superblock says {bytes_used} bytes are used but the image has {len} (truncated?)"
        )));
    }
    for (name, offset) in [
        ("inode table", inode_table),
        ("directory table", dir_table),
        ("id table", id_table),
    ] {
        if offset >= bytes_used {
            return Err(VerifyError::corrupt(format!(
                "squashfs: the {name} offset {offset} is past the end of the used bytes ({bytes_used})"
            )));
        }
    }
    if inode_table >= dir_table {
        return Err(VerifyError::corrupt(
            "squashfs: the inode table does not come before the directory table",
        ));
    }
    // Where backhand stops reading directory blocks: the first pointer of the next table.
    let table_ptr = |table: u64, what: &str| -> Result<u64, VerifyError> {
        let at = usize::try_from(table)
            .ok()
            .filter(|a| a.saturating_add(8) <= bytes.len());
        match at {
            Some(at) => Ok(u64_at(bytes, at)),
            None => Err(VerifyError::corrupt(format!(
                "squashfs: the {what} lookup table at {table} is outside the image"
            ))),
        }
    };
    let dir_end = if frag_count != 0 && frag_table != NOT_SET {
        table_ptr(frag_table, "fragment")?
    } else if flags & FLAG_NFS_EXPORT != 0 && export_table != NOT_SET {
        table_ptr(export_table, "export")?
    } else {
        table_ptr(id_table, "id")?
    };
    if dir_end < dir_table || dir_end > bytes_used {
        return Err(VerifyError::corrupt(format!(
            "squashfs: the directory table would end at {dir_end}, outside {dir_table}..{bytes_used}"
        )));
    }
    if u64::from(frag_count) * 16 > limits.max_metadata_bytes {
        return Err(VerifyError::limit(format!(
            "squashfs: {frag_count} fragments declared"
        )));
    }
    let inode_blocks = count_metadata_blocks(bytes, inode_table, dir_table, "inode table")?;
    let dir_blocks = count_metadata_blocks(bytes, dir_table, dir_end, "directory table")?;
    let metadata = (inode_blocks + dir_blocks).saturating_mul(METADATA_BLOCK_MAX);
    if metadata > limits.max_metadata_bytes {
        return Err(VerifyError::limit(format!(
            "squashfs: {} metadata blocks (up to {metadata} bytes decompressed, more than {})",
            inode_blocks + dir_blocks,
            limits.max_metadata_bytes
        )));
    }
    Ok(())
}

/// Follows the chain of metadata block headers from `start`; it must land exactly on `end`.
fn count_metadata_blocks(
    bytes: &[u8],
    start: u64,
    end: u64,
    what: &str,
) -> Result<u64, VerifyError> {
    let mut at = start;
    let mut blocks = 0u64;
    while at < end {
        let header = usize::try_from(at)
            .ok()
            .filter(|a| a.saturating_add(2) <= bytes.len())
            .map(|a| u16_at(bytes, a))
            .ok_or_else(|| {
                VerifyError::corrupt(format!(
                    "squashfs: the {what} runs past the end of the image"
                ))
            })?;
        let size = u64::from(header & 0x7fff);
        if size == 0 || size > METADATA_BLOCK_MAX {
            return Err(VerifyError::corrupt(format!(
                "squashfs: a {what} metadata block at offset {at} has size {size} (must be 1 to 8192)"
            )));
        }
        at += 2 + size;
        blocks += 1;
    }
    if at != end {
        return Err(VerifyError::corrupt(format!(
            "squashfs: the {what} metadata blocks end at {at}, not at {end} where the next table starts"
        )));
    }
    Ok(blocks)
}

/// One entry of a directory listing, as stored in the directory table.
struct RawEntry<'b> {
    name: &'b [u8],
    inode_number: u32,
    base_type: u16,
}

/// Parses a directory's listing: headers `{count - 1, start block, base inode number}` each
/// followed by `count` entries `{offset, inode delta, type, name length - 1, name}`.
fn parse_listing(data: &[u8]) -> Result<Vec<RawEntry<'_>>, VerifyError> {
    let bad = |why: &str| VerifyError::corrupt(format!("squashfs: directory listing: {why}"));
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let header = data
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated header"))?;
        let count = u32_at(header, 0);
        let base = u32_at(header, 8);
        if count > 255 {
            return Err(bad("more than 256 entries under one header"));
        }
        at += 12;
        for _ in 0..=count {
            let e = data.get(at..at + 8).ok_or_else(|| bad("truncated entry"))?;
            let delta = u16_at(e, 2) as i16;
            let entry_type = u16_at(e, 4);
            let name_len = usize::from(u16_at(e, 6)) + 1;
            let name = data
                .get(at + 8..at + 8 + name_len)
                .ok_or_else(|| bad("truncated name"))?;
            at += 8 + name_len;
            // backhand adds these as i32; anything that does not fit is corrupt.
            let inode_number = (base as i32)
                .checked_add(i32::from(delta))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("inode number out of range"))?;
            if !(1..=14).contains(&entry_type) {
                return Err(bad(&format!("unknown entry type {entry_type}")));
            }
            entries.push(RawEntry {
                name,
                inode_number,
                base_type: (entry_type - 1) % 7 + 1,
            });
        }
    }
    Ok(entries)
}

/// The base type (1 dir, 2 file, 3 symlink, 4 block dev, 5 char dev, 6 fifo, 7 socket).
fn base_type(inode: &Inode) -> u16 {
    match &inode.inner {
        InodeInner::BasicDirectory(_) | InodeInner::ExtendedDirectory(_) => 1,
        InodeInner::BasicFile(_) | InodeInner::ExtendedFile(_) => 2,
        InodeInner::BasicSymlink(_) | InodeInner::ExtendedSymlink(_) => 3,
        InodeInner::BasicBlockDevice(_) | InodeInner::ExtendedBlockDevice(_) => 4,
        InodeInner::BasicCharacterDevice(_) | InodeInner::ExtendedCharacterDevice(_) => 5,
        InodeInner::BasicNamedPipe(_) | InodeInner::ExtendedNamedPipe(_) => 6,
        InodeInner::BasicSocket(_) | InodeInner::ExtendedSocket(_) => 7,
    }
}

/// The listing bytes of a directory inode, located exactly as backhand will locate them.
fn listing_of<'s>(squashfs: &'s Squashfs<'_>, dir: &Inode) -> Result<&'s [u8], VerifyError> {
    let (block_index, file_size, block_offset) = match &dir.inner {
        InodeInner::BasicDirectory(d) => (
            u64::from(d.block_index),
            u64::from(d.file_size),
            u64::from(d.block_offset),
        ),
        InodeInner::ExtendedDirectory(d) => (
            u64::from(d.block_index),
            u64::from(d.file_size),
            u64::from(d.block_offset),
        ),
        _ => return Err(VerifyError::corrupt("squashfs: expected a directory inode")),
    };
    // An empty directory's size is 3 (the "." and ".." that are not stored).
    if file_size < 4 {
        return Ok(&[]);
    }
    let (offsets, data) = &squashfs.dir_blocks;
    let start = offsets.get(&block_index).copied().ok_or_else(|| {
        VerifyError::corrupt(format!("squashfs: no directory block at {block_index}"))
    })?;
    let from = start
        .checked_add(block_offset)
        .ok_or_else(|| VerifyError::corrupt("squashfs: directory offset overflow"))?;
    let to = from + (file_size - 3);
    usize::try_from(from)
        .ok()
        .zip(usize::try_from(to).ok())
        .and_then(|(f, t)| data.get(f..t))
        .ok_or_else(|| {
            VerifyError::corrupt("squashfs: a directory listing runs past the directory table")
        })
}

fn build_tree(
    squashfs: &Squashfs<'_>,
    image_len: u64,
    limits: &Limits,
) -> Result<(Tree, Vec<SquashfsFileReader>), VerifyError> {
    let mut builder = TreeBuilder::new(limits, image_len);
    let mut files = Vec::new();
    let mut seen_dirs: HashSet<u32> = HashSet::new();
    // backhand keeps each node's full path; bound their sum.
    let mut path_bytes: u64 = 0;
    let root = &squashfs.root_inode;
    if base_type(root) != 1 {
        return Err(VerifyError::corrupt(
            "squashfs: the root inode is not a directory",
        ));
    }
    seen_dirs.insert(root.header.inode_number);
    // (directory inode, its tree node, depth of its entries, length of its full path)
    let mut todo: Vec<(&Inode, NodeId, usize, u64)> = vec![(root, Tree::ROOT, 1, 1)];
    while let Some((dir, dir_node, depth, dir_path_len)) = todo.pop() {
        if depth > limits.max_depth {
            return Err(VerifyError::limit(format!(
                "directories nested deeper than {} levels",
                limits.max_depth
            )));
        }
        for entry in parse_listing(listing_of(squashfs, dir)?)? {
            let inode = squashfs.inodes.get(&entry.inode_number).ok_or_else(|| {
                VerifyError::corrupt(format!(
                    "squashfs: a directory entry points to inode {}, which does not exist",
                    entry.inode_number
                ))
            })?;
            if base_type(inode) != entry.base_type {
                return Err(VerifyError::corrupt(format!(
                    "squashfs: entry {:?} says type {} but its inode is type {}",
                    String::from_utf8_lossy(entry.name),
                    entry.base_type,
                    base_type(inode)
                )));
            }
            let path_len = dir_path_len + 1 + entry.name.len() as u64;
            path_bytes = path_bytes.saturating_add(path_len);
            if path_bytes > limits.max_metadata_bytes {
                return Err(VerifyError::limit(format!(
                    "squashfs: the full paths of all entries add up to more than {} bytes",
                    limits.max_metadata_bytes
                )));
            }
            let exec = inode.header.permissions & 0o100 != 0;
            let kind = match &inode.inner {
                InodeInner::BasicDirectory(_) | InodeInner::ExtendedDirectory(_) => {
                    if !seen_dirs.insert(inode.header.inode_number) {
                        return Err(VerifyError::corrupt(format!(
                            "squashfs: directory inode {} is reached twice (a directory cycle or hard-linked directory)",
                            inode.header.inode_number
                        )));
                    }
                    NodeKind::Directory {
                        children: Vec::new(),
                    }
                }
                InodeInner::BasicFile(f) => {
                    files.push(SquashfsFileReader::Basic(f.clone()));
                    NodeKind::Regular {
                        executable: exec,
                        size: u64::from(f.file_size),
                        handle: (files.len() - 1) as u64,
                    }
                }
                InodeInner::ExtendedFile(f) => {
                    files.push(SquashfsFileReader::Extended(f.clone()));
                    NodeKind::Regular {
                        executable: exec,
                        size: f.file_size,
                        handle: (files.len() - 1) as u64,
                    }
                }
                InodeInner::BasicSymlink(s) => NodeKind::Symlink {
                    target: s.target_path.clone().into(),
                },
                InodeInner::ExtendedSymlink(s) => NodeKind::Symlink {
                    target: s.target_path.clone().into(),
                },
                InodeInner::BasicBlockDevice(_)
                | InodeInner::ExtendedBlockDevice(_)
                | InodeInner::BasicCharacterDevice(_)
                | InodeInner::ExtendedCharacterDevice(_) => NodeKind::Special {
                    kind: "a device node",
                },
                InodeInner::BasicNamedPipe(_) | InodeInner::ExtendedNamedPipe(_) => {
                    NodeKind::Special {
                        kind: "a named pipe (FIFO)",
                    }
                }
                InodeInner::BasicSocket(_) | InodeInner::ExtendedSocket(_) => {
                    NodeKind::Special { kind: "a socket" }
                }
            };
            let is_dir = matches!(kind, NodeKind::Directory { .. });
            let id = builder.add(dir_node, entry.name, kind)?;
            if is_dir {
                todo.push((inode, id, depth + 1, path_len));
            }
        }
    }
    Ok((builder.finish()?, files))
}
