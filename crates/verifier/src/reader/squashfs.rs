//! squashfs (v4) images: metadata parsed by the backhand crate, file data read here.
//!
//! backhand's `Squashfs` parses the superblock, the inode table and the directory table; it
//! trusts offsets in a few places. So before handing the image to it we check what a hostile
//! image could abuse: the superblock's table offsets, the chain of metadata blocks (which
//! bounds the memory backhand will decompress), and the whole directory tree (depth, cycles,
//! names, entry and path totals, file sizes), walked here from backhand's parsed inode table and
//! raw directory table. Our [`Tree`] comes from that walk.
//!
//! File data is read here rather than through backhand's `FilesystemReader`, which keeps every
//! decompressed fragment block for the life of the reader (memory growing with the image) and
//! serialises all reads behind one lock: each file's blocks are read with positioned reads into
//! a buffer the file's reader reuses and decompressed (zstd with one context per thread, reused
//! from file to file; other compressors through backhand's decompressor), and fragment blocks
//! are shared through a small bounded cache, so several threads read files at once in bounded
//! memory. Every size is checked against the block size
//! and the file's declared length; a block that decompresses to the wrong length is an error.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};
use backhand::v4::inode::{Inode, InodeInner};
use backhand::{DataSize, Fragment, Squashfs, SquashfsFileReader};

use super::ImageReader;
use crate::error::VerifyError;
use crate::image::{ImageFormat, ImageSource};
use crate::limits::Limits;
use crate::tree::{FileSource, NodeId, NodeKind, Tree, TreeBuilder};

const SUPERBLOCK_LEN: usize = 96;
const NOT_SET: u64 = u64::MAX;
const METADATA_BLOCK_MAX: u64 = 8192;
const FLAG_NFS_EXPORT: u16 = 0x0080;
const NO_FRAGMENT: u32 = 0xffff_ffff;
/// Decompressed fragment blocks kept for the files that share them (a few per reading thread).
const FRAGMENT_CACHE: usize = 8;

thread_local! {
    /// This thread's zstd context: creating one per file cost more than decompressing a small
    /// file. Each frame is decompressed from a reset context, so nothing carries over between
    /// blocks, files or images (nor out of a block that failed to decompress).
    static ZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// An opened squashfs image.
pub struct SquashfsImage<'a> {
    source: ImageSource<'a>,
    compressor: Compressor,
    block_size: u32,
    fragments: Vec<Fragment>,
    /// Regular files; a file node's handle indexes this.
    files: Vec<SquashfsFileReader>,
    /// Recently decompressed fragment blocks by index, most recent last.
    fragment_cache: Mutex<Vec<(u32, Arc<Vec<u8>>)>>,
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

/// [`ImageSource`] as the `Read + Seek` backhand parses metadata from (behind a `BufReader`).
struct SourceReader<'a> {
    source: ImageSource<'a>,
    pos: u64,
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.source.len().saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.source.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SourceReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.source.len().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before the image start")
        })?;
        Ok(self.pos)
    }
}

impl<'a> SquashfsImage<'a> {
    pub fn open(source: ImageSource<'a>, limits: &Limits) -> Result<Self, VerifyError> {
        check_superblock_and_metadata(&source, limits)?;
        let reader = BufReader::with_capacity(64 << 10, SourceReader { source, pos: 0 });
        let squashfs = Squashfs::from_reader_with_offset(reader, 0)
            .map_err(lib_err("reading the inode table"))?;
        let (tree, files) = build_tree(&squashfs, source.len(), limits)?;
        let superblock = &squashfs.superblock;
        Ok(SquashfsImage {
            source,
            compressor: superblock.compressor,
            block_size: superblock.block_size,
            fragments: squashfs.fragments.clone().unwrap_or_default(),
            files,
            fragment_cache: Mutex::new(Vec::with_capacity(FRAGMENT_CACHE)),
            tree,
        })
    }

    /// Decompresses one block of `stored` bytes into `out` (cleared first); it must come out at
    /// `expected` bytes.
    fn decode(
        &self,
        stored: &[u8],
        uncompressed: bool,
        expected: Option<usize>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        out.clear();
        if uncompressed {
            out.extend_from_slice(stored);
        } else if self.compressor == Compressor::Zstd {
            out.reserve(self.block_size as usize);
            ZSTD.with(|zstd| {
                let mut zstd = zstd.borrow_mut();
                let decoder = match &mut *zstd {
                    Some(d) => d,
                    None => zstd.insert(zstd::bulk::Decompressor::new()?),
                };
                decoder.decompress_to_buffer(stored, out)
            })?;
        } else {
            out.reserve(self.block_size as usize);
            DefaultCompressor
                .decompress(stored, out, self.compressor)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
        let fits = match expected {
            Some(expected) => out.len() == expected,
            // A fragment block: tails of several files, of any length up to a block.
            None => !out.is_empty() && out.len() <= self.block_size as usize,
        };
        if !fits {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a data block decompresses to {} bytes, not {}",
                    out.len(),
                    expected.map_or_else(|| format!("1 to {}", self.block_size), |e| e.to_string())
                ),
            ));
        }
        Ok(())
    }

    /// The decompressed fragment block `index`, from the cache or the image.
    fn fragment_block(&self, index: u32, stored: &mut Vec<u8>) -> io::Result<Arc<Vec<u8>>> {
        let cached = |cache: &mut Vec<(u32, Arc<Vec<u8>>)>| {
            let at = cache.iter().position(|(i, _)| *i == index)?;
            let entry = cache.remove(at);
            let block = Arc::clone(&entry.1);
            cache.push(entry);
            Some(block)
        };
        if let Some(block) = self.lock_cache(cached) {
            return Ok(block);
        }
        let fragment = self.fragments.get(index as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "fragment {index} does not exist ({} fragments)",
                    self.fragments.len()
                ),
            )
        })?;
        let stored = self.stored_block(fragment.start, fragment.size, stored)?;
        let mut out = Vec::new();
        self.decode(stored, fragment.size.uncompressed(), None, &mut out)?;
        let block = Arc::new(out);
        self.lock_cache(|cache| {
            if cache.len() >= FRAGMENT_CACHE {
                cache.remove(0);
            }
            cache.push((index, Arc::clone(&block)));
        });
        Ok(block)
    }

    fn lock_cache<T>(&self, f: impl FnOnce(&mut Vec<(u32, Arc<Vec<u8>>)>) -> T) -> T {
        // A panic while holding the lock leaves a valid cache (entries are whole): go on.
        let mut cache = self
            .fragment_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut cache)
    }

    /// The stored bytes of a block of `size` at `start`, at most one block long, read into
    /// `buf` (grown as needed, never shrunk: a reader reuses it for every block).
    fn stored_block<'b>(
        &self,
        start: u64,
        size: DataSize,
        buf: &'b mut Vec<u8>,
    ) -> io::Result<&'b [u8]> {
        let len = size.size();
        if len > self.block_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a data block claims {len} stored bytes, more than the block size {}",
                    self.block_size
                ),
            ));
        }
        // At most a block (checked above): growing the buffer before `read_exact_at` checks the
        // range against the image costs at most that.
        let len = len as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let stored = &mut buf[..len];
        self.source.read_exact_at(stored, start)?;
        Ok(stored)
    }
}

impl FileSource for SquashfsImage<'_> {
    fn open_file(&self, handle: u64) -> Result<Box<dyn Read + '_>, VerifyError> {
        let file = self
            .files
            .get(handle as usize)
            .ok_or_else(|| VerifyError::corrupt("squashfs: no such file handle"))?;
        let (blocks_start, file_size, frag_index, block_offset, block_sizes) = match file {
            SquashfsFileReader::Basic(f) => (
                u64::from(f.blocks_start),
                u64::from(f.file_size),
                f.frag_index,
                f.block_offset,
                &f.block_sizes[..],
            ),
            SquashfsFileReader::Extended(f) => (
                f.blocks_start,
                f.file_size,
                f.frag_index,
                f.block_offset,
                &f.block_sizes[..],
            ),
        };
        let block_size = u64::from(self.block_size);
        let in_blocks = if frag_index == NO_FRAGMENT {
            file_size
        } else {
            (block_sizes.len() as u64).saturating_mul(block_size)
        };
        let consistent = if frag_index == NO_FRAGMENT {
            (block_sizes.len() as u64) == file_size.div_ceil(block_size)
        } else {
            in_blocks <= file_size && file_size - in_blocks < block_size
        };
        if !consistent {
            return Err(VerifyError::corrupt(format!(
                "squashfs: a file of {file_size} bytes lists {} data blocks of {block_size} bytes",
                block_sizes.len()
            )));
        }
        Ok(Box::new(FileReader {
            image: self,
            blocks: block_sizes,
            next_block: 0,
            pos: blocks_start,
            in_blocks,
            tail: (frag_index != NO_FRAGMENT).then_some((frag_index, block_offset)),
            file_size,
            produced: 0,
            buf: Vec::new(),
            at: 0,
            stored: Vec::new(),
        }))
    }
}

/// A file's data as [`Read`], one decompressed block at a time.
struct FileReader<'r, 'a> {
    image: &'r SquashfsImage<'a>,
    blocks: &'r [DataSize],
    next_block: usize,
    /// Where the next stored block starts in the image.
    pos: u64,
    /// Bytes of the file held in whole blocks (the rest is the fragment tail).
    in_blocks: u64,
    /// (fragment index, offset in it) of the tail.
    tail: Option<(u32, u32)>,
    file_size: u64,
    /// Bytes of the file decoded into `buf` so far (including the unread part of `buf`).
    produced: u64,
    buf: Vec<u8>,
    at: usize,
    /// The stored (compressed) bytes of the block being decoded.
    stored: Vec<u8>,
}

impl FileReader<'_, '_> {
    /// Decodes the next block (or the tail) into `buf`; false at the end of the file.
    fn next(&mut self) -> io::Result<bool> {
        self.at = 0;
        self.buf.clear();
        let block_size = u64::from(self.image.block_size);
        if let Some(size) = self.blocks.get(self.next_block).copied() {
            self.next_block += 1;
            let expected = (self.in_blocks - self.produced).min(block_size) as usize;
            if size.size() == 0 {
                // A hole (sparse file): zeros, nothing stored.
                self.buf.resize(expected, 0);
            } else {
                let stored = self.image.stored_block(self.pos, size, &mut self.stored)?;
                self.pos += stored.len() as u64;
                self.image
                    .decode(stored, size.uncompressed(), Some(expected), &mut self.buf)?;
            }
            self.produced += expected as u64;
            return Ok(true);
        }
        match self.tail.take() {
            Some((index, offset)) if self.produced < self.file_size => {
                let len = (self.file_size - self.produced) as usize;
                let block = self.image.fragment_block(index, &mut self.stored)?;
                let from = offset as usize;
                let piece = from
                    .checked_add(len)
                    .and_then(|to| block.get(from..to))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "a file tail of {len} bytes at {from} runs past its {}-byte fragment block",
                                block.len()
                            ),
                        )
                    })?;
                self.buf.extend_from_slice(piece);
                self.produced += len as u64;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl Read for FileReader<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() && !self.next()? {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
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

/// A failed read of the image's tables: outside the image is corruption, anything else I/O.
fn read_err(source: &ImageSource<'_>, e: io::Error) -> VerifyError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        VerifyError::corrupt(format!("squashfs: reading the image's tables: {e}"))
    } else {
        source.io_error(e, "reading the squashfs tables")
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
fn check_superblock_and_metadata(
    source: &ImageSource<'_>,
    limits: &Limits,
) -> Result<(), VerifyError> {
    let len = source.len();
    if len < SUPERBLOCK_LEN as u64 {
        return Err(VerifyError::corrupt(format!(
            "squashfs: the image is {len} bytes, shorter than the {SUPERBLOCK_LEN}-byte superblock"
        )));
    }
    let sb = &source
        .read_vec(0, SUPERBLOCK_LEN)
        .map_err(|e| read_err(source, e))?[..];
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
        if table.saturating_add(8) > len {
            return Err(VerifyError::corrupt(format!(
                "squashfs: the {what} lookup table at {table} is outside the image"
            )));
        }
        let ptr = source.read_vec(table, 8).map_err(|e| read_err(source, e))?;
        Ok(u64_at(&ptr, 0))
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
    let inode_blocks = count_metadata_blocks(source, inode_table, dir_table, "inode table")?;
    let dir_blocks = count_metadata_blocks(source, dir_table, dir_end, "directory table")?;
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
    source: &ImageSource<'_>,
    start: u64,
    end: u64,
    what: &str,
) -> Result<u64, VerifyError> {
    let mut at = start;
    let mut blocks = 0u64;
    let mut header = [0u8; 2];
    while at < end {
        if at.saturating_add(2) > source.len() {
            return Err(VerifyError::corrupt(format!(
                "squashfs: the {what} runs past the end of the image"
            )));
        }
        source
            .read_exact_at(&mut header, at)
            .map_err(|e| read_err(source, e))?;
        let header = u16::from_le_bytes(header);
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
