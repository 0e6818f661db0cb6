//! The native erofs writer's layout: a walked [`Tree`] as inodes, directories and symlinks
//! around the file data [`data`] wrote, and the superblock.
//!
//! Image layout (4 KiB blocks, `meta_blkaddr` 0, so a nid is an inode's byte offset / 32):
//! block 0 holds the superblock (at 1024) and the root directory's inode right after it (nid
//! 36: the root's nid must fit 16 bits); file data follows from block 1, then (with fragments)
//! the packed inode's data, the fragments compressed as one more file; then the other inodes,
//! each followed by what it keeps inline (a compressed file's map header and logical cluster
//! indexes, then its tail; the last partial block of a flat file, directory or symlink), the
//! packed inode among them (in no directory; the superblock's `packed_nid`); then the directory
//! and symlink blocks that did not fit inline.
//!
//! A file with a fragment has the fragment flag and the low 32 bits of its offset in its map
//! header, and a compressed head for the fragment's extent whose block address holds the
//! offset's high 32 bits; a file whose every byte is in the packed inode has the short form
//! (the map header's top bit set, the offset in the other 63, no indexes), as mkfs.erofs
//! writes it.
//!
//! An inode never crosses a block; inline data never crosses a block, and a flat inode's inline
//! data sits in the inode's own block (the kernel reads it from there). [`place`] packs the
//! inodes into blocks best-fit, so the metadata wastes little of them. Hard-linked entries share one inode; a
//! directory's link count is 2 plus its subdirectories. Everything is root:root, time 0 (build
//! time 0), the modes [`Entry::mode`] gives, no xattrs; the label is [`super::LABEL`] and the
//! UUID [`super::closure_uuid`]'s.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::data::{self, Codec, DataLayout, SourceFile, Stored, Tail};
use super::format::{
    self, DataLayout as Layout, FileType, Inode, LclusterIndex, Superblock, BLOCK_SIZE,
    COMPACT_INODE_LEN, DIRENT_LEN, FEATURE_INCOMPAT_FRAGMENTS, FEATURE_INCOMPAT_ZERO_PADDING,
    FEATURE_INCOMPAT_ZTAILPACKING, INODE_SLOT, LCLUSTER_INDEX_LEN, MAP_HEADER_AREA, SUPERBLOCK_LEN,
    SUPERBLOCK_OFFSET,
};
use crate::tree::{Entry, EntryKind, Tree};
use crate::{BuildError, BuildOptions, Compression, ProgressSink};

/// lz4hc level when none is given: mkfs.erofs's (and liblz4's) default.
pub const DEFAULT_LZ4HC_LEVEL: u32 = 9;
/// Highest lz4hc level (liblz4's `LZ4HC_CLEVEL_MAX`).
const MAX_LZ4HC_LEVEL: u32 = 12;
/// Where the root directory's inode goes: right after the superblock.
const ROOT_ILOC: u64 = SUPERBLOCK_OFFSET + SUPERBLOCK_LEN as u64;
/// Most compression workers a build starts (one per core up to this).
const MAX_THREADS: usize = 16;

/// The codec for `options`, refusing what the native writer does not do.
pub(super) fn codec(options: &BuildOptions) -> Result<(Codec, Option<u32>), BuildError> {
    let compression = options.effective_compression();
    let bad_level = |level, reason: &str| BuildError::BadCompressionLevel {
        compression,
        level,
        reason: reason.to_owned(),
    };
    match (compression, options.compression_level) {
        (Compression::Lz4hc, level) => {
            let level = level.unwrap_or(DEFAULT_LZ4HC_LEVEL);
            if level > MAX_LZ4HC_LEVEL {
                return Err(bad_level(level, "lz4hc levels are 0 to 12"));
            }
            // At most 12: fits an i32.
            Ok((Codec::Lz4hc(level as i32), Some(level)))
        }
        (Compression::Lz4, Some(level)) => {
            Err(bad_level(level, "erofs lz4 has no levels (lz4hc has)"))
        }
        (Compression::Lz4, None) => Ok((Codec::Lz4, None)),
        (Compression::None, Some(level)) => {
            Err(bad_level(level, "an uncompressed image has no level"))
        }
        (Compression::None, None) => Ok((Codec::None, None)),
        (other, _) => Err(BuildError::UnsupportedOption {
            option: format!("--compression {other}"),
            reason: format!(
                "the native erofs writer compresses with lz4hc, lz4 or none; use --erofs-writer \
                 mkfs for {other}"
            ),
        }),
    }
}

/// Writes `tree` as an erofs image to `image`; returns the compression level used.
pub(super) fn write(
    tree: &Tree,
    options: &BuildOptions,
    image: &File,
    work_dir: &Path,
    progress: &dyn ProgressSink,
) -> Result<Option<u32>, BuildError> {
    let (codec, level) = codec(options)?;
    let threads = options
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, MAX_THREADS);
    let tail_packing = options.erofs_ztailpacking && codec != Codec::None;
    let fragments = options.erofs_fragments && codec != Codec::None;
    let mut nodes = Nodes::new(tree);
    nodes.full_indexes = fragments;

    progress.phase("packing", tree.counts().file_bytes);
    let write_err = |cause| BuildError::Write {
        path: work_dir.to_owned(),
        cause,
    };
    let mut out = BufWriter::with_capacity(1 << 20, image);
    out.seek(SeekFrom::Start(BLOCK_SIZE)).map_err(write_err)?;
    let files = nodes.source_files(tree, tail_packing);
    let data = data::write_data(
        &files, codec, fragments, &mut out, 1, threads, work_dir, progress,
    )?;
    // The fragments, compressed as one more file (whose own tail may go inline), after the
    // other files' data.
    let packed = match &data.packed {
        Some((handle, len)) => {
            out.seek(SeekFrom::Start(u64::from(data.end_block) * BLOCK_SIZE))
                .map_err(write_err)?;
            let source = packed_source(handle, *len, tail_packing);
            let layout = data::write_data(
                &[source],
                codec,
                false,
                &mut out,
                data.end_block,
                threads,
                work_dir,
                &crate::NoProgress,
            )?;
            nodes.add_packed(*len);
            Some(layout)
        }
        None => None,
    };
    let data_end = packed.as_ref().map_or(data.end_block, |p| p.end_block);

    let shapes = nodes.shapes(&data, packed.as_ref());
    let placed = place(&shapes, data_end)?;
    let meta_end = placed.meta_end.div_ceil(BLOCK_SIZE);
    let mut next_block = u32::try_from(meta_end).map_err(|_| too_big())?;
    let mut plain_start = vec![0u32; shapes.len()];
    for (i, shape) in shapes.iter().enumerate() {
        if shape.plain_blocks > 0 {
            plain_start[i] = next_block;
            next_block = next_block
                .checked_add(shape.plain_blocks)
                .ok_or_else(too_big)?;
        }
    }
    let total_blocks = next_block;

    // The inodes (those in block 0 aside), in the order of their places, then the directory and
    // symlink blocks.
    out.seek(SeekFrom::Start(u64::from(data_end) * BLOCK_SIZE))
        .map_err(write_err)?;
    let mut at = u64::from(data_end) * BLOCK_SIZE;
    let mut block0 = vec![0u8; BLOCK_SIZE as usize];
    let nids: Vec<u64> = placed.iloc.iter().map(|l| l / INODE_SLOT).collect();
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    order.sort_by_key(|&i| placed.iloc[i]);
    for i in order {
        let bytes =
            nodes.inode_bytes(i, &shapes[i], &nids, &plain_start, &data, packed.as_ref())?;
        if let Some(blocks) = bytes.plain {
            // After the metadata, apart from what `out` writes.
            image
                .write_all_at(&blocks, u64::from(plain_start[i]) * BLOCK_SIZE)
                .map_err(write_err)?;
        }
        let iloc = placed.iloc[i];
        if iloc < BLOCK_SIZE {
            let at = iloc as usize;
            block0[at..at + bytes.meta.len()].copy_from_slice(&bytes.meta);
        } else {
            write_zeros(&mut out, iloc - at).map_err(write_err)?;
            out.write_all(&bytes.meta).map_err(write_err)?;
            at = iloc + bytes.meta.len() as u64;
        }
    }
    let end = u64::from(total_blocks) * BLOCK_SIZE;

    // Block 0: the superblock, the root inode and the inodes that fitted after it.
    let mut features = 0;
    if codec != Codec::None {
        features |= FEATURE_INCOMPAT_ZERO_PADDING;
    }
    if tail_packing {
        features |= FEATURE_INCOMPAT_ZTAILPACKING;
    }
    let packed_nid = match nodes.kinds.last() {
        Some(NodeKind::Packed(_)) => nids[nodes.kinds.len() - 1],
        _ => 0,
    };
    if packed_nid != 0 {
        features |= FEATURE_INCOMPAT_FRAGMENTS;
    }
    let superblock = Superblock {
        feature_incompat: features,
        root_nid: (ROOT_ILOC / INODE_SLOT) as u16,
        inodes: shapes.len() as u64,
        blocks: total_blocks,
        meta_blkaddr: 0,
        uuid: uuid_bytes(&super::closure_uuid(tree)),
        volume_name: volume_name(),
        packed_nid,
    };
    let sb_at = SUPERBLOCK_OFFSET as usize;
    block0[sb_at..sb_at + SUPERBLOCK_LEN].copy_from_slice(&superblock.to_bytes());
    out.seek(SeekFrom::Start(0)).map_err(write_err)?;
    out.write_all(&block0).map_err(write_err)?;
    out.flush().map_err(write_err)?;
    drop(out);
    image.set_len(end).map_err(write_err)?;
    Ok(level)
}

/// The packed inode's content as a file to compress: read through `handle`, its tail inline
/// when tail packing is on (and its inode compact).
fn packed_source(handle: &std::sync::Arc<File>, len: u64, tail_packing: bool) -> SourceFile {
    let (flat_tail_max, packed_tail_max) = tail_room(len, 1, tail_packing, true);
    SourceFile {
        path: "(the packed inode)".into(),
        handle: Some(handle.clone()),
        len,
        flat_tail_max,
        packed_tail_max,
    }
}

/// What a regular file of `size` bytes with `nlink` links can keep inline after its inode: a
/// flat file's last block, and a compressed file's compressed tail (0 when that is off, or when
/// the inode is extended). Placed at the first slot of a block its tail starts in, a compressed
/// tail starts `meta % 32` bytes into a block at worst.
fn tail_room(size: u64, nlink: u32, tail_packing: bool, full_indexes: bool) -> (usize, usize) {
    if Inode::needs_extended(size, nlink) {
        return (0, 0);
    }
    let meta = COMPACT_INODE_LEN + compressed_meta(size, full_indexes);
    let packed = if tail_packing {
        (BLOCK_SIZE - meta % INODE_SLOT) as usize
    } else {
        0
    };
    ((BLOCK_SIZE - COMPACT_INODE_LEN) as usize, packed)
}

fn write_zeros(out: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let step = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..step])?;
        n -= step as u64;
    }
    Ok(())
}

fn too_big() -> BuildError {
    BuildError::Erofs("the image would exceed 2^32 blocks".to_owned())
}

fn volume_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    name[..super::LABEL.len()].copy_from_slice(super::LABEL.as_bytes());
    name
}

/// The 16 bytes of a UUID written `8-4-4-4-12` in hex.
fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    let mut bytes = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        bytes[i] = digit(pair[0]) << 4 | digit(pair.get(1).copied().unwrap_or(b'0'));
    }
    bytes
}

/// What an inode is.
#[derive(Debug, Clone, Copy)]
enum NodeKind {
    Root,
    Directory(usize),
    Symlink(usize),
    /// Entry index, and ordinal among the stored files.
    File(usize, usize),
    /// The packed inode (in no directory), of this many bytes.
    Packed(u64),
}

/// The image's inodes in order: the root, then one per tree entry but later hard links.
struct Nodes<'t> {
    kinds: Vec<NodeKind>,
    nlink: Vec<u32>,
    /// Inode of each tree entry.
    inode_of: Vec<usize>,
    /// Entries (tree indices) in each directory inode, by name.
    children: Vec<Vec<usize>>,
    /// The directory inode holding each inode's first entry.
    parent: Vec<usize>,
    entries: &'t [Entry],
    /// Compressed inodes get full 8-byte indexes (images with fragments: a fragment's offset
    /// needs their high bits) instead of compact 4-byte ones.
    full_indexes: bool,
}

impl<'t> Nodes<'t> {
    fn new(tree: &'t Tree) -> Self {
        let entries = tree.entries();
        let mut kinds = vec![NodeKind::Root];
        let mut nlink = vec![2u32];
        let mut inode_of = vec![0usize; entries.len()];
        let mut children: Vec<Vec<usize>> = vec![Vec::new()];
        let mut parents = vec![0usize];
        let mut dirs: HashMap<&Path, usize> = HashMap::new();
        let mut files = 0;
        for (i, entry) in entries.iter().enumerate() {
            let parent = match entry.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => dirs.get(p).copied().unwrap_or(0),
                _ => 0,
            };
            let node = match entry.kind {
                EntryKind::Regular {
                    hard_link_of: Some(first),
                    ..
                } => {
                    let node = inode_of[first];
                    nlink[node] += 1;
                    node
                }
                _ => {
                    let node = kinds.len();
                    kinds.push(match entry.kind {
                        EntryKind::Directory => NodeKind::Directory(i),
                        EntryKind::Symlink { .. } => NodeKind::Symlink(i),
                        EntryKind::Regular { .. } => {
                            files += 1;
                            NodeKind::File(i, files - 1)
                        }
                    });
                    nlink.push(if entry.kind == EntryKind::Directory {
                        2
                    } else {
                        1
                    });
                    children.push(Vec::new());
                    parents.push(parent);
                    node
                }
            };
            inode_of[i] = node;
            if entry.kind == EntryKind::Directory {
                dirs.insert(entry.path.as_path(), node);
                nlink[parent] += 1;
            }
            children[parent].push(i);
        }
        Nodes {
            kinds,
            nlink,
            inode_of,
            children,
            parent: parents,
            entries,
            full_indexes: false,
        }
    }

    /// Adds the packed inode, the last one.
    fn add_packed(&mut self, len: u64) {
        self.kinds.push(NodeKind::Packed(len));
        self.nlink.push(1);
        self.children.push(Vec::new());
        self.parent.push(0);
    }

    /// The regular files to store, in image order, with what their inodes can take inline.
    fn source_files(&self, tree: &Tree, tail_packing: bool) -> Vec<SourceFile> {
        let mut files = Vec::new();
        for (node, kind) in self.kinds.iter().enumerate() {
            let NodeKind::File(entry, _) = *kind else {
                continue;
            };
            let entry = &self.entries[entry];
            let EntryKind::Regular { size, .. } = entry.kind else {
                continue;
            };
            let (flat_tail_max, packed_tail_max) =
                tail_room(size, self.nlink[node], tail_packing, self.full_indexes);
            files.push(SourceFile {
                path: tree.source(entry),
                handle: None,
                len: size,
                flat_tail_max,
                packed_tail_max,
            });
        }
        files
    }

    /// Each inode's shape: sizes, layout and what goes inline.
    fn shapes(&self, data: &DataLayout, packed: Option<&DataLayout>) -> Vec<Shape> {
        let mut shapes = Vec::with_capacity(self.kinds.len());
        for (node, kind) in self.kinds.iter().enumerate() {
            let flat = |size: u64, inline_max: u64| {
                let tail = size % BLOCK_SIZE;
                if tail != 0 && tail <= inline_max {
                    (Layout::FlatInline, tail, (size / BLOCK_SIZE) as u32)
                } else {
                    (Layout::FlatPlain, 0, size.div_ceil(BLOCK_SIZE) as u32)
                }
            };
            let shape = match *kind {
                NodeKind::Root | NodeKind::Directory(_) => {
                    let size = self.dir_data(node, &[]).len() as u64;
                    let inline_max = if node == 0 {
                        BLOCK_SIZE - ROOT_ILOC - COMPACT_INODE_LEN
                    } else {
                        BLOCK_SIZE - COMPACT_INODE_LEN
                    };
                    let (layout, inline, plain_blocks) = flat(size, inline_max);
                    Shape::flat(FileType::Directory, size, layout, inline, plain_blocks)
                }
                NodeKind::Symlink(entry) => {
                    let EntryKind::Symlink { target } = &self.entries[entry].kind else {
                        continue;
                    };
                    let size = target.len() as u64;
                    let (layout, inline, plain_blocks) = flat(size, BLOCK_SIZE - COMPACT_INODE_LEN);
                    Shape::flat(FileType::Symlink, size, layout, inline, plain_blocks)
                }
                NodeKind::File(entry, ordinal) => {
                    let EntryKind::Regular { size, .. } = self.entries[entry].kind else {
                        continue;
                    };
                    file_shape(size, &data.files[ordinal], self.full_indexes)
                }
                NodeKind::Packed(len) => match packed.and_then(|p| p.files.first()) {
                    Some(stored) => file_shape(len, stored, self.full_indexes),
                    None => continue,
                },
            };
            shapes.push(Shape {
                inode_len: if Inode::needs_extended(shape.size, self.nlink[node]) {
                    format::EXTENDED_INODE_LEN
                } else {
                    COMPACT_INODE_LEN
                },
                ..shape
            });
        }
        shapes
    }

    /// The directory data of inode `node` (full blocks zero-filled, the last one not), the
    /// entries pointing at `nids` (zeros when `nids` is empty: for the size alone).
    fn dir_data(&self, node: usize, nids: &[u64]) -> Vec<u8> {
        let nid = |n: usize| nids.get(n).copied().unwrap_or(0);
        let parent = self.parent[node];
        let mut list: Vec<(&[u8], u64, FileType)> = vec![
            (b".", nid(node), FileType::Directory),
            (b"..", nid(parent), FileType::Directory),
        ];
        for &child in &self.children[node] {
            let entry = &self.entries[child];
            let name = entry
                .path
                .file_name()
                .map_or(&[][..], |n| n.as_encoded_bytes());
            let file_type = match entry.kind {
                EntryKind::Directory => FileType::Directory,
                EntryKind::Symlink { .. } => FileType::Symlink,
                EntryKind::Regular { .. } => FileType::Regular,
            };
            list.push((name, nid(self.inode_of[child]), file_type));
        }
        list.sort_by(|a, b| a.0.cmp(b.0));
        dir_blocks(&list)
    }
}

/// Bytes after a compressed inode of `size` bytes before its inline tail: the map header and
/// the full or the compact indexes.
fn compressed_meta(size: u64, full_indexes: bool) -> u64 {
    if full_indexes {
        MAP_HEADER_AREA + size.div_ceil(BLOCK_SIZE) * LCLUSTER_INDEX_LEN
    } else {
        format::compressed_meta_len(size)
    }
}

/// The shape of a regular file of `size` bytes stored as `stored`.
fn file_shape(size: u64, stored: &Stored, full_indexes: bool) -> Shape {
    match stored {
        Stored::Empty => Shape::flat(FileType::Regular, 0, Layout::FlatPlain, 0, 0),
        Stored::Flat { tail, .. } => {
            let layout = if tail.is_some() {
                Layout::FlatInline
            } else {
                Layout::FlatPlain
            };
            let inline = tail.map_or(0, |t| t.len as u64);
            Shape::flat(FileType::Regular, size, layout, inline, 0)
        }
        Stored::Compressed {
            extents,
            tail,
            fragment,
        } => Shape {
            file_type: FileType::Regular,
            inode_len: COMPACT_INODE_LEN,
            size,
            layout: if full_indexes {
                Layout::CompressedFull
            } else {
                Layout::CompressedCompact
            },
            meta_extra: if extents.is_empty() && fragment.is_some() {
                // Whole in the packed inode: the map header alone.
                MAP_HEADER_AREA
            } else {
                compressed_meta(size, full_indexes)
            },
            inline: tail.map_or(0, |t| t.len as u64),
            plain_blocks: 0,
        },
    }
}

/// Directory entries packed into blocks: each block's `erofs_dirent`s, then their names; full
/// blocks zero-filled to the block size.
fn dir_blocks(list: &[(&[u8], u64, FileType)]) -> Vec<u8> {
    let block = BLOCK_SIZE as usize;
    let mut out = Vec::new();
    let mut start = 0;
    while start < list.len() {
        let mut end = start;
        let mut used = 0;
        while end < list.len() && used + DIRENT_LEN + list[end].0.len() <= block {
            used += DIRENT_LEN + list[end].0.len();
            end += 1;
        }
        if !out.is_empty() {
            out.resize(out.len().div_ceil(block) * block, 0);
        }
        let mut name_offset = (end - start) * DIRENT_LEN;
        for &(name, nid, file_type) in &list[start..end] {
            // Within a block: fits u16.
            format::push_dirent(&mut out, nid, name_offset as u16, file_type);
            name_offset += name.len();
        }
        for &(name, _, _) in &list[start..end] {
            out.extend_from_slice(name);
        }
        start = end;
    }
    out
}

/// An inode's size, layout and what it keeps inline, before it is placed.
#[derive(Debug, Clone, Copy)]
struct Shape {
    file_type: FileType,
    inode_len: u64,
    size: u64,
    layout: Layout,
    /// Bytes between the inode and its inline data (a compressed file's map header and
    /// indexes).
    meta_extra: u64,
    /// Inline data after that.
    inline: u64,
    /// Blocks of a directory or symlink stored after the metadata.
    plain_blocks: u32,
}

impl Shape {
    fn flat(
        file_type: FileType,
        size: u64,
        layout: Layout,
        inline: u64,
        plain_blocks: u32,
    ) -> Shape {
        Shape {
            file_type,
            inode_len: COMPACT_INODE_LEN,
            size,
            layout,
            meta_extra: 0,
            inline,
            plain_blocks,
        }
    }
}

/// Where each inode went.
struct Placement {
    iloc: Vec<u64>,
    /// Just past the last inode's inline data.
    meta_end: u64,
}

/// Places the root in block 0 right after the superblock, and the other inodes in the rest of
/// block 0 and in blocks from `first_block` on. An inode that fits a block with what it keeps
/// inline goes whole into the fullest block that still has room for it (best fit: the
/// metadata wastes little of its blocks); a larger one (a compressed file with many indexes)
/// starts a run of new blocks, placed so that its inline tail does not cross a block, and the
/// room left in its last block is offered to the next ones.
fn place(shapes: &[Shape], first_block: u32) -> Result<Placement, BuildError> {
    use std::collections::BTreeSet;
    // Room (bytes, a multiple of a slot) at the end of a block that is not full, and the block.
    let mut open: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut next_fresh = u64::from(first_block);
    let mut iloc = vec![0u64; shapes.len()];
    let footprint =
        |s: &Shape| (s.inode_len + s.meta_extra + s.inline).next_multiple_of(INODE_SLOT);
    // The root first, then the largest first: best fit then leaves little room unused.
    let mut order: Vec<usize> = (1..shapes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(footprint(&shapes[i])));
    for i in std::iter::once(0).chain(order) {
        let shape = &shapes[i];
        let meta = shape.inode_len + shape.meta_extra;
        let footprint = footprint(shape);
        if i == 0 {
            iloc[0] = ROOT_ILOC;
            let used = ROOT_ILOC + footprint;
            if used > BLOCK_SIZE {
                return Err(BuildError::Erofs(
                    "the root directory's inode does not fit block 0".to_owned(),
                ));
            }
            open.insert((BLOCK_SIZE - used, 0));
            continue;
        }
        if footprint <= BLOCK_SIZE {
            let loc = match open.range((footprint, 0)..).next().copied() {
                Some((room, block)) => {
                    open.remove(&(room, block));
                    if room > footprint {
                        open.insert((room - footprint, block));
                    }
                    block * BLOCK_SIZE + (BLOCK_SIZE - room)
                }
                None => {
                    let block = next_fresh;
                    next_fresh += 1;
                    if footprint < BLOCK_SIZE {
                        open.insert((BLOCK_SIZE - footprint, block));
                    }
                    block * BLOCK_SIZE
                }
            };
            iloc[i] = loc;
            continue;
        }
        // Across blocks: only the inline tail must not cross one (the inode itself is at a
        // block's start, so it does not).
        let start = next_fresh * BLOCK_SIZE;
        let tail_start = (start + meta) % BLOCK_SIZE;
        let loc = if shape.inline == 0 || tail_start + shape.inline <= BLOCK_SIZE {
            start
        } else if matches!(
            shape.layout,
            Layout::CompressedCompact | Layout::CompressedFull
        ) {
            // The tail moves to the next block, at the first offset a slot allows.
            start + (BLOCK_SIZE - tail_start) + tail_start % INODE_SLOT
        } else {
            return Err(BuildError::Erofs(format!(
                "cannot place inode {i} ({} bytes inline)",
                shape.inline
            )));
        };
        let end = (loc + meta + shape.inline).next_multiple_of(INODE_SLOT);
        next_fresh = end.div_ceil(BLOCK_SIZE);
        if !end.is_multiple_of(BLOCK_SIZE) {
            open.insert((BLOCK_SIZE - end % BLOCK_SIZE, end / BLOCK_SIZE));
        }
        iloc[i] = loc;
    }
    Ok(Placement {
        iloc,
        meta_end: (next_fresh * BLOCK_SIZE).max(u64::from(first_block) * BLOCK_SIZE),
    })
}

/// An inode's bytes: the inode and what follows it inline, and its blocks stored elsewhere.
struct InodeBytes {
    meta: Vec<u8>,
    plain: Option<Vec<u8>>,
}

impl Nodes<'_> {
    fn inode_bytes(
        &self,
        node: usize,
        shape: &Shape,
        nids: &[u64],
        plain_start: &[u32],
        data: &DataLayout,
        packed: Option<&DataLayout>,
    ) -> Result<InodeBytes, BuildError> {
        let permissions = match self.kinds[node] {
            NodeKind::Root => 0o555,
            NodeKind::Packed(_) => 0o600,
            NodeKind::Directory(e) | NodeKind::Symlink(e) | NodeKind::File(e, _) => {
                self.entries[e].mode()
            }
        };
        let mut inode = Inode {
            file_type: shape.file_type,
            layout: shape.layout,
            permissions,
            nlink: self.nlink[node],
            size: shape.size,
            i_u: plain_start[node],
            ino: u32::try_from(node + 1).unwrap_or(u32::MAX),
        };
        let mut after = Vec::new();
        let mut plain = None;
        match self.kinds[node] {
            NodeKind::Root | NodeKind::Directory(_) | NodeKind::Symlink(_) => {
                let bytes = match self.kinds[node] {
                    NodeKind::Symlink(e) => match &self.entries[e].kind {
                        EntryKind::Symlink { target } => target.as_encoded_bytes().to_vec(),
                        _ => Vec::new(),
                    },
                    _ => self.dir_data(node, nids),
                };
                let split = (shape.plain_blocks as usize * BLOCK_SIZE as usize).min(bytes.len());
                if shape.plain_blocks > 0 {
                    plain = Some(bytes[..split].to_vec());
                }
                after.extend_from_slice(&bytes[split..]);
                debug_assert_eq!(after.len() as u64, shape.inline);
            }
            NodeKind::File(_, ordinal) => {
                after =
                    file_after_inode(&mut inode, &data.files[ordinal], data, self.full_indexes)?;
            }
            NodeKind::Packed(_) => {
                let packed = packed
                    .ok_or_else(|| BuildError::Erofs("the packed inode has no data".to_owned()))?;
                let stored = packed
                    .files
                    .first()
                    .ok_or_else(|| BuildError::Erofs("the packed inode has no data".to_owned()))?;
                after = file_after_inode(&mut inode, stored, packed, self.full_indexes)?;
            }
        }
        let mut meta = inode.to_bytes();
        meta.extend(after);
        Ok(InodeBytes { meta, plain })
    }
}

/// What follows a regular file's inode (`stored` in `data`), setting the inode's `i_u`.
fn file_after_inode(
    inode: &mut Inode,
    stored: &Stored,
    data: &DataLayout,
    full_indexes: bool,
) -> Result<Vec<u8>, BuildError> {
    let mut after = Vec::new();
    match stored {
        Stored::Empty => inode.i_u = 0,
        Stored::Flat {
            start_block, tail, ..
        } => {
            inode.i_u = *start_block;
            if let Some(tail) = tail {
                after = data.tail_bytes(tail)?;
            }
        }
        Stored::Compressed {
            extents,
            tail,
            fragment: Some(fragment),
        } if extents.is_empty() => {
            if tail.is_some() || fragment.start != 0 || fragment.offset >> 63 != 0 {
                return Err(BuildError::Erofs(
                    "a whole-file fragment must start at 0 and have no tail".to_owned(),
                ));
            }
            inode.i_u = 0;
            after.extend_from_slice(&format::map_header_whole_fragment(fragment.offset));
            after.extend_from_slice(&[0u8; 8]);
        }
        Stored::Compressed {
            extents,
            tail,
            fragment,
        } => {
            inode.i_u = extents.len() as u32;
            let header = match fragment {
                Some(fragment) => format::map_header_fragment(fragment.offset),
                None => format::map_header(tail.map_or(0, |t| t.len as u16)),
            };
            after.extend_from_slice(&header);
            let indexes = lcluster_indexes(inode.size, extents, tail.as_ref(), fragment.as_ref())?;
            if full_indexes {
                after.extend_from_slice(&[0u8; 8]);
                for index in indexes {
                    after.extend_from_slice(&index.to_bytes());
                }
            } else {
                after.extend(format::compact_indexes(&indexes).map_err(BuildError::Erofs)?);
            }
            if let Some(tail) = tail {
                after.extend(data.tail_bytes(tail)?);
            }
        }
    }
    Ok(after)
}

/// The logical cluster indexes of a compressed file of `size` bytes, one per 4 KiB of it: a
/// head for each extent, the inline tail's and the fragment's (a compressed head whose
/// `blkaddr` is the high 32 bits of its offset in the packed inode).
fn lcluster_indexes(
    size: u64,
    extents: &[data::Extent],
    tail: Option<&Tail>,
    fragment: Option<&data::Fragment>,
) -> Result<Vec<LclusterIndex>, BuildError> {
    let clusters = size.div_ceil(BLOCK_SIZE);
    let mut heads: Vec<(u64, bool, u32)> = extents
        .iter()
        .map(|e| (e.start, e.plain, e.blkaddr))
        .collect();
    if let Some(tail) = tail {
        heads.push((tail.start, !tail.compressed, 0));
    }
    if let Some(fragment) = fragment {
        heads.push((fragment.start, false, (fragment.offset >> 32) as u32));
    }
    let distance = |n: u64| {
        u16::try_from(n)
            .map_err(|_| BuildError::Erofs(format!("an extent spans {n} logical clusters")))
    };
    let mut out = Vec::with_capacity(clusters as usize);
    let mut next = 0;
    let mut head_cluster = 0;
    for cluster in 0..clusters {
        let index = match heads.get(next) {
            Some(&(start, plain, blkaddr)) if start / BLOCK_SIZE == cluster => {
                next += 1;
                if heads.get(next).is_some_and(|h| h.0 / BLOCK_SIZE == cluster) {
                    return Err(BuildError::Erofs(format!(
                        "two extents start in logical cluster {cluster}"
                    )));
                }
                head_cluster = cluster;
                LclusterIndex::Head {
                    plain,
                    cluster_offset: (start % BLOCK_SIZE) as u16,
                    blkaddr,
                }
            }
            // The last logical cluster, partly past the end of the file, where no extent starts:
            // a plain head at the file's end (as mkfs.erofs writes it), so that an extent ending
            // in it ends at the file's end, not at the cluster's (which a plain extent could not
            // fill).
            _ if cluster + 1 == clusters && !size.is_multiple_of(BLOCK_SIZE) => {
                LclusterIndex::Head {
                    plain: true,
                    cluster_offset: (size % BLOCK_SIZE) as u16,
                    blkaddr: 0,
                }
            }
            _ => {
                let next_head = heads.get(next).map_or(clusters, |h| h.0 / BLOCK_SIZE);
                LclusterIndex::NonHead {
                    back: distance(cluster - head_cluster)?,
                    ahead: distance(next_head - cluster)?,
                }
            }
        };
        out.push(index);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extent_ending_in_the_last_cluster_ends_at_the_files_end() {
        use LclusterIndex::{Head, NonHead};
        let extent = |start, blkaddr, plain| data::Extent {
            start,
            blkaddr,
            plain,
        };
        // Compressed [0, 5000), plain [5000, 9096): the last cluster gets a plain head at the
        // file's end, as mkfs.erofs writes it.
        let indexes = lcluster_indexes(
            9096,
            &[extent(0, 7, false), extent(5000, 8, true)],
            None,
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            indexes,
            [
                Head {
                    plain: false,
                    cluster_offset: 0,
                    blkaddr: 7
                },
                Head {
                    plain: true,
                    cluster_offset: 904,
                    blkaddr: 8
                },
                Head {
                    plain: true,
                    cluster_offset: 904,
                    blkaddr: 0
                },
            ]
        );
        // An inline tail starting in the last cluster needs no end mark; clusters inside an
        // extent point back at its head and ahead at the next.
        let tail = Tail {
            spool_offset: 0,
            len: 100,
            compressed: true,
            start: 20_000,
        };
        let indexes = lcluster_indexes(20_100, &[extent(0, 3, false)], Some(&tail), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            indexes,
            [
                Head {
                    plain: false,
                    cluster_offset: 0,
                    blkaddr: 3
                },
                NonHead { back: 1, ahead: 3 },
                NonHead { back: 2, ahead: 2 },
                NonHead { back: 3, ahead: 1 },
                Head {
                    plain: false,
                    cluster_offset: 20_000 - 16_384,
                    blkaddr: 0
                },
            ]
        );
        // Two extents may not start in one cluster.
        assert!(lcluster_indexes(
            9000,
            &[extent(0, 1, true), extent(100, 2, true)],
            None,
            None
        )
        .is_err());
    }
}
