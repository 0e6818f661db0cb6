//! The metadata of a squashfs 4.0 image, laid out after its file data: the inode table, the
//! directory table, the fragment table, the id table and the superblock that points at them.
//!
//! Inodes are written children first (post-order), the way mksquashfs does, so that when a
//! directory's listing is written every entry's inode position is known; inode numbers are
//! handed out in that same order (the root is the last, `inode_count`). Every inode is owned by
//! id index 0 (uid and gid 0) and has time [`super::MTIME`].
//!
//! The format is the kernel's (`fs/squashfs/squashfs_fs.h`); field names follow it.

use std::path::Path;

use super::data::{DataLayout, FileData};
use super::{Codec, BLOCK_SIZE, MTIME};
use crate::tree::{EntryKind, Tree};
use crate::BuildError;

/// Uncompressed bytes of one metadata block.
const METADATA_SIZE: usize = 8192;
/// A metadata block header's "stored uncompressed" bit.
const METADATA_UNCOMPRESSED: u16 = 0x8000;
/// "No such table" / "no fragment".
const NONE_U64: u64 = u64::MAX;
const NO_FRAGMENT: u32 = u32::MAX;
const NO_XATTR: u32 = u32::MAX;
/// Most entries one directory header may introduce.
const MAX_ENTRIES_PER_HEADER: usize = 256;

/// Inode types (`SQUASHFS_*_TYPE`); directory entries always use the basic ones.
const DIR_TYPE: u16 = 1;
const REG_TYPE: u16 = 2;
const SYMLINK_TYPE: u16 = 3;
const LDIR_TYPE: u16 = 8;
const LREG_TYPE: u16 = 9;

/// Superblock flags.
const FLAG_DUPLICATES: u16 = 0x0040;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMPRESSOR_OPTIONS: u16 = 0x0400;

pub(super) const SUPERBLOCK_LEN: u64 = 96;
const MAGIC: u32 = 0x7371_7368;

/// Where something starts inside a metadata table: the table offset of its (compressed)
/// metadata block and the offset inside that block's uncompressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaRef {
    block: u64,
    offset: u16,
}

impl MetaRef {
    /// The 48-bit inode reference the superblock and directory code use.
    fn inode_ref(self) -> u64 {
        (self.block << 16) | u64::from(self.offset)
    }
}

/// A metadata table being written: 8 KiB blocks, each compressed when that makes it smaller,
/// behind a 2-byte header.
struct MetadataWriter<'c> {
    codec: &'c Codec,
    pending: Vec<u8>,
    out: Vec<u8>,
    /// Table offsets of the blocks written so far.
    block_starts: Vec<u64>,
}

impl<'c> MetadataWriter<'c> {
    fn new(codec: &'c Codec) -> Self {
        MetadataWriter {
            codec,
            pending: Vec::with_capacity(2 * METADATA_SIZE),
            out: Vec::new(),
            block_starts: Vec::new(),
        }
    }

    /// Where the next byte written will be.
    fn position(&self) -> MetaRef {
        MetaRef {
            block: self.out.len() as u64,
            // Always under METADATA_SIZE: full blocks leave `pending` as soon as they fill.
            offset: self.pending.len() as u16,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BuildError> {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= METADATA_SIZE {
            let rest = self.pending.split_off(METADATA_SIZE);
            let block = std::mem::replace(&mut self.pending, rest);
            self.emit(&block)?;
        }
        Ok(())
    }

    fn emit(&mut self, block: &[u8]) -> Result<(), BuildError> {
        self.block_starts.push(self.out.len() as u64);
        let compressed = self.codec.compress(block)?;
        if compressed.len() < block.len() {
            self.out
                .extend_from_slice(&(compressed.len() as u16).to_le_bytes());
            self.out.extend_from_slice(&compressed);
        } else {
            let header = block.len() as u16 | METADATA_UNCOMPRESSED;
            self.out.extend_from_slice(&header.to_le_bytes());
            self.out.extend_from_slice(block);
        }
        Ok(())
    }

    /// The table's bytes and the offsets of its blocks.
    fn finish(mut self) -> Result<(Vec<u8>, Vec<u64>), BuildError> {
        if !self.pending.is_empty() {
            let block = std::mem::take(&mut self.pending);
            self.emit(&block)?;
        }
        Ok((self.out, self.block_starts))
    }
}

/// The image's directory tree as nodes: node 0 is the root, every other node one tree entry.
struct Nodes {
    /// `entry[n]`: the tree entry of node `n` (none for the root).
    entry: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    /// `parent[n]`: the directory node holding node `n` (the root's is itself).
    parent: Vec<usize>,
    /// Nodes children first, the root last: the order inodes are written and numbered in.
    post_order: Vec<usize>,
}

impl Nodes {
    fn new(tree: &Tree) -> Result<Nodes, BuildError> {
        let entries = tree.entries();
        let mut entry = Vec::with_capacity(entries.len() + 1);
        let mut children: Vec<Vec<usize>> = Vec::with_capacity(entries.len() + 1);
        let mut parent = Vec::with_capacity(entries.len() + 1);
        entry.push(None);
        children.push(Vec::new());
        parent.push(0);
        // open[d]: the node of the directory whose entries have depth d + 1.
        let mut open = vec![0usize];
        for (index, e) in entries.iter().enumerate() {
            let depth = e.path.components().count();
            if depth == 0 || depth > open.len() {
                return Err(BuildError::Squashfs(format!(
                    "internal error: {} comes before its directory",
                    e.path.display()
                )));
            }
            open.truncate(depth);
            let node = entry.len();
            entry.push(Some(index));
            children.push(Vec::new());
            parent.push(open[depth - 1]);
            children[open[depth - 1]].push(node);
            if matches!(e.kind, EntryKind::Directory) {
                open.push(node);
            }
        }
        // Iterative post-order: a node is finished after all of its children.
        let mut post_order = Vec::with_capacity(entry.len());
        let mut stack = vec![(0usize, 0usize)];
        while let Some((node, next_child)) = stack.pop() {
            if let Some(&child) = children[node].get(next_child) {
                stack.push((node, next_child + 1));
                stack.push((child, 0));
            } else {
                post_order.push(node);
            }
        }
        Ok(Nodes {
            entry,
            children,
            parent,
            post_order,
        })
    }
}

/// The tables, serialized, with what the superblock needs to point at them.
pub(super) struct Tables {
    inode_table: Vec<u8>,
    directory_table: Vec<u8>,
    fragment_blocks: Vec<u8>,
    fragment_block_starts: Vec<u64>,
    id_blocks: Vec<u8>,
    id_block_starts: Vec<u64>,
    root_inode: u64,
    inode_count: u32,
    fragment_count: u32,
}

impl Tables {
    /// Builds every table for `tree`, whose file data was laid out as `data`.
    pub(super) fn build(
        tree: &Tree,
        data: &DataLayout,
        codec: &Codec,
    ) -> Result<Tables, BuildError> {
        let nodes = Nodes::new(tree)?;
        let node_count = nodes.entry.len();
        let inode_count = u32::try_from(node_count).map_err(|_| too_many("inodes"))?;
        let mut number = vec![0u32; node_count];
        for (position, &node) in nodes.post_order.iter().enumerate() {
            number[node] = position as u32 + 1;
        }
        // Regular files' ordinals, as the data layout numbers them (tree order).
        let mut ordinal = vec![usize::MAX; node_count];
        let mut next_ordinal = 0;
        for (node, entry) in nodes.entry.iter().enumerate() {
            if let Some(index) = entry {
                if matches!(tree.entries()[*index].kind, EntryKind::Regular { .. }) {
                    ordinal[node] = next_ordinal;
                    next_ordinal += 1;
                }
            }
        }

        let mut inodes = MetadataWriter::new(codec);
        let mut directories = MetadataWriter::new(codec);
        let mut position = vec![
            MetaRef {
                block: 0,
                offset: 0,
            };
            node_count
        ];
        let mut kind = vec![0u16; node_count];
        let mut record = Vec::with_capacity(256);
        for &node in &nodes.post_order {
            record.clear();
            let entry = nodes.entry[node].map(|i| &tree.entries()[i]);
            let mode = entry.map_or(0o555, |e| e.mode()) & 0o7777;
            match entry.map(|e| &e.kind) {
                None | Some(EntryKind::Directory) => {
                    let listing = directories.position();
                    let listing_len = write_listing(
                        &mut directories,
                        tree,
                        &nodes,
                        node,
                        &number,
                        &position,
                        &kind,
                    )?;
                    let subdirectories = nodes.children[node]
                        .iter()
                        .filter(|&&c| kind[c] == DIR_TYPE)
                        .count();
                    let link_count = u32::try_from(2 + subdirectories)
                        .map_err(|_| too_many("subdirectories"))?;
                    let parent = match nodes.entry[node] {
                        // mksquashfs's convention for the root: one past the last inode.
                        None => inode_count + 1,
                        Some(_) => number[nodes.parent[node]],
                    };
                    // The listing's size plus 3 (the kernel counts "." and ".." as 3 bytes).
                    let file_size = listing_len
                        .checked_add(3)
                        .ok_or_else(|| too_many("bytes in one directory listing"))?;
                    let block_index = u32::try_from(listing.block)
                        .map_err(|_| too_many("bytes of directory table"))?;
                    if let Ok(small) = u16::try_from(file_size) {
                        header(&mut record, DIR_TYPE, mode, number[node]);
                        put32(&mut record, block_index);
                        put32(&mut record, link_count);
                        put16(&mut record, small);
                        put16(&mut record, listing.offset);
                        put32(&mut record, parent);
                    } else {
                        header(&mut record, LDIR_TYPE, mode, number[node]);
                        put32(&mut record, link_count);
                        put32(&mut record, file_size);
                        put32(&mut record, block_index);
                        put32(&mut record, parent);
                        put16(&mut record, 0); // no directory index: lookups scan from the start
                        put16(&mut record, listing.offset);
                        put32(&mut record, NO_XATTR);
                    }
                    kind[node] = DIR_TYPE;
                }
                Some(EntryKind::Symlink { target }) => {
                    use std::os::unix::ffi::OsStrExt;
                    let target = target.as_bytes();
                    header(&mut record, SYMLINK_TYPE, mode, number[node]);
                    put32(&mut record, 1);
                    put32(&mut record, target.len() as u32);
                    record.extend_from_slice(target);
                    kind[node] = SYMLINK_TYPE;
                }
                Some(EntryKind::Regular { size, .. }) => {
                    let file = data.files.get(ordinal[node]).ok_or_else(|| {
                        BuildError::Squashfs(format!(
                            "internal error: no data was laid out for {}",
                            entry.map_or(Path::new("/"), |e| e.path.as_path()).display()
                        ))
                    })?;
                    file_inode(&mut record, mode, number[node], *size, file);
                    kind[node] = REG_TYPE;
                }
            }
            position[node] = inodes.position();
            inodes.write(&record)?;
        }

        let mut fragments = MetadataWriter::new(codec);
        for fragment in &data.fragments {
            let mut entry = [0u8; 16];
            entry[..8].copy_from_slice(&fragment.start.to_le_bytes());
            entry[8..12].copy_from_slice(&fragment.size.to_le_bytes());
            fragments.write(&entry)?;
        }
        let mut ids = MetadataWriter::new(codec);
        ids.write(&0u32.to_le_bytes())?;

        let (inode_table, _) = inodes.finish()?;
        let (directory_table, _) = directories.finish()?;
        let (fragment_blocks, fragment_block_starts) = fragments.finish()?;
        let (id_blocks, id_block_starts) = ids.finish()?;
        Ok(Tables {
            inode_table,
            directory_table,
            fragment_blocks,
            fragment_block_starts,
            id_blocks,
            id_block_starts,
            root_inode: position[0].inode_ref(),
            inode_count,
            fragment_count: u32::try_from(data.fragments.len())
                .map_err(|_| too_many("fragment blocks"))?,
        })
    }

    /// The tables as they follow the data at image offset `start`, and the superblock that
    /// points at them (its `bytes_used` is `start` plus the tables' length).
    pub(super) fn serialize(&self, start: u64, codec: &Codec) -> (Vec<u8>, [u8; 96]) {
        let mut bytes = Vec::new();
        let at = |bytes: &Vec<u8>| start + bytes.len() as u64;
        let inode_table_start = at(&bytes);
        bytes.extend_from_slice(&self.inode_table);
        let directory_table_start = at(&bytes);
        bytes.extend_from_slice(&self.directory_table);
        // Each lookup table follows its metadata blocks: the images's offsets of those blocks.
        let fragment_blocks_start = at(&bytes);
        bytes.extend_from_slice(&self.fragment_blocks);
        let fragment_table_start = at(&bytes);
        for block in &self.fragment_block_starts {
            bytes.extend_from_slice(&(fragment_blocks_start + block).to_le_bytes());
        }
        let id_blocks_start = at(&bytes);
        bytes.extend_from_slice(&self.id_blocks);
        let id_table_start = at(&bytes);
        for block in &self.id_block_starts {
            bytes.extend_from_slice(&(id_blocks_start + block).to_le_bytes());
        }
        let bytes_used = at(&bytes);

        let mut flags = FLAG_DUPLICATES | FLAG_NO_XATTRS;
        if codec.options().is_some() {
            flags |= FLAG_COMPRESSOR_OPTIONS;
        }
        let mut sb = Vec::with_capacity(SUPERBLOCK_LEN as usize);
        put32(&mut sb, MAGIC);
        put32(&mut sb, self.inode_count);
        put32(&mut sb, MTIME);
        put32(&mut sb, BLOCK_SIZE);
        put32(&mut sb, self.fragment_count);
        put16(&mut sb, codec.id());
        put16(&mut sb, BLOCK_SIZE.trailing_zeros() as u16);
        put16(&mut sb, flags);
        put16(&mut sb, 1); // one id: 0
        put16(&mut sb, 4);
        put16(&mut sb, 0);
        for value in [
            self.root_inode,
            bytes_used,
            id_table_start,
            NONE_U64, // xattr id table
            inode_table_start,
            directory_table_start,
            fragment_table_start,
            NONE_U64, // export table
        ] {
            sb.extend_from_slice(&value.to_le_bytes());
        }
        let mut superblock = [0u8; 96];
        superblock.copy_from_slice(&sb);
        (bytes, superblock)
    }
}

fn too_many(what: &str) -> BuildError {
    BuildError::Squashfs(format!("too many {what} for a squashfs image"))
}

/// Writes the listing of directory `dir` (its children were written already); returns its
/// length in bytes.
fn write_listing(
    table: &mut MetadataWriter<'_>,
    tree: &Tree,
    nodes: &Nodes,
    dir: usize,
    number: &[u32],
    position: &[MetaRef],
    kind: &[u16],
) -> Result<u32, BuildError> {
    use std::os::unix::ffi::OsStrExt;
    let children = &nodes.children[dir];
    let mut bytes = Vec::new();
    let mut i = 0;
    while i < children.len() {
        let first = children[i];
        let block = position[first].block;
        let base = number[first];
        let fits = |c: usize| {
            position[c].block == block
                && i16::try_from(i64::from(number[c]) - i64::from(base)).is_ok()
        };
        let mut end = i + 1;
        while end < children.len() && end - i < MAX_ENTRIES_PER_HEADER && fits(children[end]) {
            end += 1;
        }
        put32(&mut bytes, (end - i - 1) as u32);
        put32(
            &mut bytes,
            u32::try_from(block).map_err(|_| too_many("bytes of inode table"))?,
        );
        put32(&mut bytes, base);
        for &child in &children[i..end] {
            let name = nodes.entry[child]
                .map(|e| tree.entries()[e].path.file_name().unwrap_or_default())
                .unwrap_or_default()
                .as_bytes();
            if name.is_empty() || name.len() > 256 {
                return Err(BuildError::Squashfs(format!(
                    "a name of {} bytes cannot be a squashfs directory entry",
                    name.len()
                )));
            }
            put16(&mut bytes, position[child].offset);
            // In range: checked by `fits`.
            put16(&mut bytes, (number[child].wrapping_sub(base)) as u16);
            put16(&mut bytes, kind[child]);
            put16(&mut bytes, (name.len() - 1) as u16);
            bytes.extend_from_slice(name);
        }
        i = end;
    }
    table.write(&bytes)?;
    u32::try_from(bytes.len()).map_err(|_| too_many("bytes in one directory listing"))
}

/// A regular file's inode: the basic form when it fits (as mksquashfs: offsets and size under
/// 4 GiB, no holes), the extended one otherwise.
fn file_inode(record: &mut Vec<u8>, mode: u16, number: u32, size: u64, file: &FileData) {
    let (fragment, offset) = file.fragment.unwrap_or((NO_FRAGMENT, 0));
    let basic = (
        u32::try_from(file.blocks_start),
        u32::try_from(size),
        file.sparse,
    );
    match basic {
        (Ok(start), Ok(size), 0) => {
            header(record, REG_TYPE, mode, number);
            put32(record, start);
            put32(record, fragment);
            put32(record, offset);
            put32(record, size);
        }
        _ => {
            header(record, LREG_TYPE, mode, number);
            record.extend_from_slice(&file.blocks_start.to_le_bytes());
            record.extend_from_slice(&size.to_le_bytes());
            record.extend_from_slice(&file.sparse.to_le_bytes());
            put32(record, 1);
            put32(record, fragment);
            put32(record, offset);
            put32(record, NO_XATTR);
        }
    }
    for &word in &file.block_sizes {
        put32(record, word);
    }
}

/// The header every inode starts with: type, permissions, uid and gid indexes (both 0),
/// time, number.
fn header(record: &mut Vec<u8>, kind: u16, mode: u16, number: u32) {
    put16(record, kind);
    put16(record, mode);
    put16(record, 0);
    put16(record, 0);
    put32(record, MTIME);
    put32(record, number);
}

fn put16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}
