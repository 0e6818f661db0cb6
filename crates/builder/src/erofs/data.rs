//! The file data of a native erofs image: every regular file read once, cut into segments,
//! compressed on every core into one-block physical clusters, and written in one fixed order,
//! identical contents stored once.
//!
//! A *reader* thread reads the files in image order and hands them on in batches of
//! [`SEGMENT`]-byte segments (at most [`BATCH_BYTES`] a batch, one batch being filled, one
//! waiting); the calling thread compresses a batch on `threads` workers and writes the results
//! in segment order, so the image does not depend on the number of threads.
//!
//! Compression fills exactly one block per physical cluster (LZ4's `destSize` mode): a
//! cluster holds as much of the file as compresses into 4096 bytes, at most [`MAX_EXTENT`],
//! stored right-aligned in its block (the `0padding` feature). A cluster that would not save a
//! block (it covers no more than a block of the file) is stored as it is, one block of the
//! file. The end of a file that is shorter than a block, or that compresses whole into less
//! than a block, is its *tail*: it is kept aside (in a spool file, so memory does not grow with
//! the closure) to be stored inline after the inode ([`super::native`] places it), when the
//! inode allows it. A file none of whose clusters compressed is stored flat (plain blocks and an
//! inline tail) instead, as mkfs.erofs does.
//!
//! With fragments (`-Efragments`) the end of a compressed file (what is shorter than a block or
//! compresses whole into less than one) is a *fragment* instead: its bytes, as they are, are
//! appended to the packed inode's content (another unnamed spool file, in file order), which
//! the caller then compresses as one more file. A file shorter than a block is a fragment whole.
//! With fragments, as with mkfs.erofs then, identical clusters (same block, by SHA-256) are
//! also stored once, whichever files they are in; a file of plain blocks that are then not
//! consecutive is stored compressed, of plain clusters.
//!
//! Identical files (same length, same SHA-256, hashed only when another file has the same
//! length) are stored once: the copy's blocks are written over and its extents point at the
//! first one's. Inline tails are not shared: each inode keeps its own inline copy; identical
//! fragments (same length, same SHA-256) are stored once in the packed inode.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::format::{self, BLOCK_SIZE};
use crate::{BuildError, ProgressSink};

/// Bytes of a file compressed as one unit: clusters never cross a segment's end, so segments
/// compress independently.
pub(super) const SEGMENT: usize = 2 << 20;
/// Most bytes of a file one physical cluster covers: bounds what a reader decompresses to
/// read one block.
pub(super) const MAX_EXTENT: usize = 1 << 20;
/// A batch is handed to the workers once it holds this many bytes or [`BATCH_SEGMENTS`].
const BATCH_BYTES: usize = 32 << 20;
const BATCH_SEGMENTS: usize = 512;
const BLOCK: usize = BLOCK_SIZE as usize;

/// How file data is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codec {
    None,
    Lz4,
    Lz4hc(i32),
}

impl Codec {
    /// Compresses as much of `src` as fits `dst`: `(read, written)`.
    fn fill(self, src: &[u8], dst: &mut [u8]) -> Result<(usize, usize), BuildError> {
        let result = match self {
            Codec::None => return Ok((0, 0)),
            Codec::Lz4 => lzzzz::lz4::compress_fill(src, dst),
            Codec::Lz4hc(level) => lzzzz::lz4_hc::compress_fill(src, dst, level),
        };
        result.map_err(|e| BuildError::Erofs(format!("LZ4 compression failed: {e}")))
    }
}

/// A regular file to store, with what its inode allows inline.
#[derive(Debug, Clone)]
pub(super) struct SourceFile {
    pub path: PathBuf,
    /// Read from this open file (from its start) instead of opening `path`: the packed
    /// inode's spool, which has no name.
    pub handle: Option<Arc<File>>,
    pub len: u64,
    /// Longest tail that can follow the inode of a flat file (0: none).
    pub flat_tail_max: usize,
    /// Longest tail that can follow the indexes of a compressed file (0: none, e.g. tail
    /// packing is off).
    pub packed_tail_max: usize,
}

/// Where a tail's bytes are, in the spool, and what they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tail {
    pub spool_offset: u64,
    pub len: usize,
    /// LZ4 data (else the file's bytes as they are).
    pub compressed: bool,
    /// Offset in the file where the tail starts.
    pub start: u64,
}

/// A compressed file's last extent kept in the packed inode (`-Efragments`): the file from
/// `start` on, at `offset` in the packed inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fragment {
    pub start: u64,
    pub offset: u64,
}

/// One physical cluster of a compressed file: the file from `start` on (up to the next
/// extent's start) in block `blkaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    pub start: u64,
    pub blkaddr: u32,
    /// Stored as is (else LZ4, right-aligned in the block).
    pub plain: bool,
}

/// How one regular file's data is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Stored {
    #[default]
    Empty,
    /// `blocks` blocks of the file from `start_block`, then the tail inline.
    Flat {
        start_block: u32,
        blocks: u32,
        tail: Option<Tail>,
    },
    /// Physical clusters, then the tail inline or the last extent in the packed inode (never
    /// both; no extents and a fragment from 0: the whole file is in the packed inode).
    Compressed {
        extents: Vec<Extent>,
        tail: Option<Tail>,
        fragment: Option<Fragment>,
    },
}

/// The stored data of every file (by ordinal in the `files` given), and where it ends.
#[derive(Debug)]
pub(super) struct DataLayout {
    pub files: Vec<Stored>,
    /// The first block after the data.
    pub end_block: u32,
    /// The tails, at [`Tail::spool_offset`].
    pub spool: File,
    /// The packed inode's content (the fragments) and its length, when fragments are on.
    pub packed: Option<(Arc<File>, u64)>,
}

impl DataLayout {
    /// The bytes of `tail`.
    pub fn tail_bytes(&self, tail: &Tail) -> Result<Vec<u8>, BuildError> {
        let mut bytes = vec![0u8; tail.len];
        self.spool
            .read_exact_at(&mut bytes, tail.spool_offset)
            .map_err(|e| BuildError::Erofs(format!("reading back a spooled tail: {e}")))?;
        Ok(bytes)
    }
}

/// What the reader hands on.
enum Item {
    Segment {
        file: usize,
        bytes: Vec<u8>,
        last: bool,
    },
    /// File `file`, whose segments were the last ones handed on (or are dropped), has the
    /// content of file `of`.
    Copy { file: usize, of: usize },
}

/// One segment, compressed.
#[derive(Debug, Default)]
struct SegmentOut {
    pieces: Vec<Piece>,
    tail: Option<TailOut>,
}

#[derive(Debug)]
enum Piece {
    /// Bytes `at..at + len` of the segment, stored as they are in one block.
    Plain { at: usize, len: usize },
    /// `len` bytes of the file compressed into one block (already right-aligned).
    Compressed { len: usize, block: Vec<u8> },
}

#[derive(Debug)]
enum TailOut {
    /// Bytes `at..` of the segment.
    Raw {
        at: usize,
    },
    Compressed(Vec<u8>),
    /// Bytes `at..` of the segment, for the packed inode (fragments on).
    Fragment {
        at: usize,
    },
}

/// Writes the data of `files` to `out` from block `first_block` on (where `out` is
/// positioned), with `threads` compression workers. `spool_dir` holds the unnamed spool files.
/// `fragments`: the last extent of a compressed file goes to the packed inode's content.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_data(
    files: &[SourceFile],
    codec: Codec,
    fragments: bool,
    out: &mut BufWriter<&File>,
    first_block: u32,
    threads: usize,
    spool_dir: &std::path::Path,
    progress: &dyn ProgressSink,
) -> Result<DataLayout, BuildError> {
    let spool_file = || {
        tempfile::tempfile_in(spool_dir).map_err(|e| BuildError::Write {
            path: spool_dir.to_owned(),
            cause: e,
        })
    };
    let spool = spool_file()?;
    let packed_file = if fragments && codec != Codec::None {
        Some(spool_file()?)
    } else {
        None
    };
    let fragments = packed_file.is_some();
    let (batches, received) = mpsc::sync_channel::<Result<Vec<Item>, BuildError>>(1);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_files(files, &batches));
        let mut writer = Writer::new(files, out, first_block, &spool, packed_file.as_ref());
        let mut result = Ok(());
        for batch in received.iter() {
            let step = batch.and_then(|items| {
                let outs = compress_batch(&items, codec, fragments, files, threads)?;
                for (item, compressed) in items.iter().zip(outs) {
                    writer.take(item, compressed, progress)?;
                }
                Ok(())
            });
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        // Dropping the receiver stops the reader at its next batch.
        drop(received);
        reader
            .join()
            .map_err(|_| BuildError::Erofs("the file reader thread panicked".to_owned()))?;
        result?;
        writer.finish()
    })
    .map(|(stored, end_block, packed_len)| DataLayout {
        files: stored,
        end_block,
        spool,
        packed: packed_file
            .filter(|_| packed_len > 0)
            .map(|f| (Arc::new(f), packed_len)),
    })
}

/// The reader thread: reads every file in order into batches of segments.
fn read_files(files: &[SourceFile], batches: &mpsc::SyncSender<Result<Vec<Item>, BuildError>>) {
    let mut lengths: HashMap<u64, usize> = HashMap::new();
    for file in files.iter().filter(|f| f.len > 0) {
        *lengths.entry(file.len).or_default() += 1;
    }
    let shared: HashSet<u64> = lengths
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(len, _)| len)
        .collect();
    let mut seen: HashMap<(u64, [u8; 32]), usize> = HashMap::new();
    let mut batch: Vec<Item> = Vec::new();
    let mut batch_bytes = 0usize;
    for (ordinal, file) in files.iter().enumerate() {
        if file.len == 0 {
            continue;
        }
        let mut hasher = shared.contains(&file.len).then(Sha256::new);
        let first_in_batch = batch.len();
        // Whether some of its segments went out in an earlier batch.
        let mut split = false;
        let read = read_file(file, |bytes, last| {
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(&bytes);
            }
            batch_bytes += bytes.len();
            batch.push(Item::Segment {
                file: ordinal,
                bytes,
                last,
            });
            if !last && (batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_SEGMENTS) {
                batch_bytes = 0;
                split = true;
                batches.send(Ok(std::mem::take(&mut batch))).is_ok()
            } else {
                true
            }
        });
        match read {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = batches.send(Err(e));
                return;
            }
        }
        if let Some(hasher) = hasher {
            let key = (file.len, hasher.finalize().into());
            match seen.get(&key) {
                Some(&of) => {
                    // A copy read whole into this batch is not compressed at all.
                    if !split {
                        for item in batch.drain(first_in_batch..) {
                            if let Item::Segment { bytes, .. } = item {
                                batch_bytes -= bytes.len();
                            }
                        }
                    }
                    batch.push(Item::Copy { file: ordinal, of });
                }
                None => {
                    seen.insert(key, ordinal);
                }
            }
        }
        if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_SEGMENTS {
            batch_bytes = 0;
            if batches.send(Ok(std::mem::take(&mut batch))).is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = batches.send(Ok(batch));
    }
}

/// Reads `file` in segments, handing each to `take` (`last` on the final one); stops early
/// (returning false) when `take` does. Checks the file still has its walked length.
fn read_file(
    file: &SourceFile,
    mut take: impl FnMut(Vec<u8>, bool) -> bool,
) -> Result<bool, BuildError> {
    let read_err = |cause| BuildError::Read {
        path: file.path.clone(),
        cause,
    };
    let mut handle = match &file.handle {
        Some(handle) => {
            let mut handle = handle.try_clone().map_err(read_err)?;
            handle.seek(SeekFrom::Start(0)).map_err(read_err)?;
            handle
        }
        None => File::open(&file.path).map_err(read_err)?,
    };
    let mut done = 0u64;
    loop {
        let want = (file.len - done).min(SEGMENT as u64) as usize;
        // One byte more at the end notices a file that grew.
        let ask = if want < SEGMENT { want + 1 } else { want };
        let mut bytes = vec![0u8; ask];
        let got = fill(&mut handle, &mut bytes).map_err(read_err)?;
        if got != want {
            return Err(BuildError::length_changed(
                &file.path,
                file.len,
                done + got as u64,
            ));
        }
        bytes.truncate(want);
        done += want as u64;
        let last = done == file.len;
        if last && want == SEGMENT {
            // A file of whole segments: make sure it ends here.
            let mut probe = [0u8; 1];
            if fill(&mut handle, &mut probe).map_err(read_err)? != 0 {
                return Err(BuildError::length_changed(&file.path, file.len, done + 1));
            }
        }
        if !take(bytes, last) {
            return Ok(false);
        }
        if last {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn fill(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Compresses every segment of `items` on `threads` workers; results in item order.
fn compress_batch(
    items: &[Item],
    codec: Codec,
    fragments: bool,
    files: &[SourceFile],
    threads: usize,
) -> Result<Vec<SegmentOut>, BuildError> {
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                return done;
            };
            let out = match item {
                Item::Segment { file, bytes, last } => compress_segment(
                    codec,
                    bytes,
                    *last,
                    if *last {
                        files[*file].packed_tail_max
                    } else {
                        0
                    },
                    fragments,
                    files[*file].len == bytes.len() as u64,
                ),
                Item::Copy { .. } => Ok(SegmentOut::default()),
            };
            done.push((i, out));
        }
    };
    let mut results: Vec<(usize, Result<SegmentOut, BuildError>)> = if threads <= 1 {
        work()
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            let mut all = Vec::new();
            for worker in workers {
                match worker.join() {
                    Ok(done) => all.extend(done),
                    Err(_) => {
                        return Err(BuildError::Erofs(
                            "a compression thread panicked".to_owned(),
                        ))
                    }
                }
            }
            Ok(all)
        })?
    };
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, out)| out).collect()
}

/// Cuts one segment into physical clusters. `packed_tail_max`: the longest compressed tail
/// that may be kept for inline storage (0 when the segment is not a file's last, or tail
/// packing is off). `fragments`: the end of a file's last segment that is shorter than a
/// block, or that compresses whole into less than one, is a fragment.
/// `whole_file`: the segment is the whole file, so a compressed tail that saves less than the
/// compressed layout's indexes cost is kept raw (the file stays flat).
fn compress_segment(
    codec: Codec,
    bytes: &[u8],
    last: bool,
    packed_tail_max: usize,
    fragments: bool,
    whole_file: bool,
) -> Result<SegmentOut, BuildError> {
    let mut out = SegmentOut::default();
    let mut block = vec![0u8; BLOCK];
    let end = bytes.len();
    let mut at = 0;
    while at < end {
        let rest = end - at;
        let (read, written) = codec.fill(&bytes[at..end.min(at + MAX_EXTENT)], &mut block)?;
        if fragments && last && (rest < BLOCK || (read == rest && written < BLOCK)) {
            out.tail = Some(TailOut::Fragment { at });
            return Ok(out);
        }
        if last && read == rest && read > 0 && written <= packed_tail_max {
            // The whole rest compresses into an inline tail; raw when that is no smaller, with
            // the indexes a flat file would not need.
            let all_plain = out.pieces.iter().all(|p| matches!(p, Piece::Plain { .. }));
            let indexes = if whole_file && all_plain {
                format::compressed_meta_len(end as u64) as usize
            } else {
                0
            };
            out.tail = Some(if rest < BLOCK && written + indexes >= rest {
                TailOut::Raw { at }
            } else {
                TailOut::Compressed(block[..written].to_vec())
            });
            return Ok(out);
        }
        if read > BLOCK {
            let mut stored = vec![0u8; BLOCK];
            stored[BLOCK - written..].copy_from_slice(&block[..written]);
            out.pieces.push(Piece::Compressed {
                len: read,
                block: stored,
            });
            at += read;
            continue;
        }
        if last && rest < BLOCK {
            out.tail = Some(TailOut::Raw { at });
            return Ok(out);
        }
        let len = rest.min(BLOCK);
        out.pieces.push(Piece::Plain { at, len });
        at += len;
    }
    Ok(out)
}

/// The file being written.
struct Current {
    file: usize,
    start_block: u32,
    /// Offset in the file of the next piece.
    logical: u64,
    extents: Vec<Extent>,
    compressed: bool,
}

/// The packed inode's content being written: fragments appended in file order, identical
/// ones stored once.
struct Packer<'a> {
    out: BufWriter<&'a File>,
    len: u64,
    /// Offset of each fragment content written, by length and SHA-256.
    seen: HashMap<(usize, [u8; 32]), u64>,
}

impl Packer<'_> {
    /// Where `data` is in the packed inode, appending it if it is not there yet.
    fn add(&mut self, data: &[u8]) -> Result<u64, BuildError> {
        let key = (data.len(), Sha256::digest(data).into());
        if let Some(&offset) = self.seen.get(&key) {
            return Ok(offset);
        }
        let offset = self.len;
        self.out
            .write_all(data)
            .map_err(|e| BuildError::Erofs(format!("spooling a fragment: {e}")))?;
        self.len += data.len() as u64;
        self.seen.insert(key, offset);
        Ok(offset)
    }
}

/// Takes compressed segments in order and writes them.
struct Writer<'a, 'o> {
    files: &'a [SourceFile],
    out: &'a mut BufWriter<&'o File>,
    spool: BufWriter<&'a File>,
    spool_len: u64,
    packer: Option<Packer<'a>>,
    /// With fragments (as mkfs.erofs does then): the block of each cluster written, by the first
    /// 128 bits of its SHA-256 (half the memory of all 256, and no less safe against chance
    /// collisions at any image size), so that an identical one is stored once.
    clusters: Option<HashMap<[u8; 16], u32>>,
    /// The clusters the current (or last ended) file added to `clusters`.
    file_clusters: Vec<[u8; 16]>,
    next_block: u32,
    stored: Vec<Stored>,
    current: Option<Current>,
    /// The file written last, and its first block.
    last_ended: Option<(usize, u32)>,
}

impl<'a, 'o> Writer<'a, 'o> {
    fn new(
        files: &'a [SourceFile],
        out: &'a mut BufWriter<&'o File>,
        first_block: u32,
        spool: &'a File,
        packed: Option<&'a File>,
    ) -> Self {
        Writer {
            files,
            out,
            spool: BufWriter::with_capacity(1 << 20, spool),
            spool_len: 0,
            packer: packed.map(|file| Packer {
                out: BufWriter::with_capacity(1 << 20, file),
                len: 0,
                seen: HashMap::new(),
            }),
            clusters: packed.map(|_| HashMap::new()),
            file_clusters: Vec::new(),
            next_block: first_block,
            stored: vec![Stored::Empty; files.len()],
            current: None,
            last_ended: None,
        }
    }

    fn take(
        &mut self,
        item: &Item,
        compressed: SegmentOut,
        progress: &dyn ProgressSink,
    ) -> Result<(), BuildError> {
        match item {
            Item::Copy { file, of } => {
                match self.last_ended {
                    Some((written, start_block)) if written == *file => {
                        // Its blocks were the last written: the next data goes over them.
                        self.next_block = start_block;
                        if let Some(clusters) = self.clusters.as_mut() {
                            for hash in self.file_clusters.drain(..) {
                                if clusters.get(&hash).is_some_and(|&b| b >= start_block) {
                                    clusters.remove(&hash);
                                }
                            }
                        }
                        self.out
                            .seek(SeekFrom::Start(u64::from(start_block) * BLOCK_SIZE))
                            .map_err(out_err)?;
                    }
                    // Its segments were dropped unread by the workers.
                    _ => progress.advance(self.files[*file].len),
                }
                self.stored[*file] = self.stored[*of].clone();
                Ok(())
            }
            Item::Segment { file, bytes, last } => {
                progress.advance(bytes.len() as u64);
                if self.current.as_ref().map(|c| c.file) != Some(*file) {
                    self.file_clusters.clear();
                    self.current = Some(Current {
                        file: *file,
                        start_block: self.next_block,
                        logical: 0,
                        extents: Vec::new(),
                        compressed: false,
                    });
                }
                for piece in &compressed.pieces {
                    let (len, plain, blkaddr) = match piece {
                        Piece::Plain { at, len } => {
                            (*len, true, self.write_cluster(&bytes[*at..*at + *len])?)
                        }
                        Piece::Compressed { len, block } => {
                            (*len, false, self.write_cluster(block)?)
                        }
                    };
                    let current = self.current.as_mut().ok_or_else(no_current)?;
                    current.extents.push(Extent {
                        start: current.logical,
                        blkaddr,
                        plain,
                    });
                    current.logical += len as u64;
                    current.compressed |= !plain;
                }
                if *last {
                    self.end_file(bytes, compressed.tail)?;
                }
                Ok(())
            }
        }
    }

    /// The file's last segment was written: decide its layout and keep its tail.
    fn end_file(&mut self, bytes: &[u8], tail: Option<TailOut>) -> Result<(), BuildError> {
        let mut current = self.current.take().ok_or_else(no_current)?;
        let limits = &self.files[current.file];
        let tail = match tail {
            Some(TailOut::Fragment { at }) => {
                let raw = &bytes[at..];
                // Even the end of a file of plain blocks, or a small file that LZ4 does not
                // shrink on its own: in the packed inode it shares blocks with the others and
                // compresses with its neighbours (cheaper than inline, measured).
                match self.packer.as_mut() {
                    Some(packer) => {
                        let offset = packer.add(raw)?;
                        let stored = Stored::Compressed {
                            extents: current.extents,
                            tail: None,
                            fragment: Some(Fragment {
                                start: current.logical,
                                offset,
                            }),
                        };
                        self.stored[current.file] = stored;
                        self.last_ended = Some((current.file, current.start_block));
                        return Ok(());
                    }
                    _ => Some(TailOut::Raw { at }),
                }
            }
            other => other,
        };
        let stored = match tail {
            None if current.compressed => Stored::Compressed {
                extents: current.extents,
                tail: None,
                fragment: None,
            },
            None => flat(&current, None)?,
            Some(TailOut::Compressed(data)) => {
                let tail = self.spool_tail(&data, true, current.logical)?;
                Stored::Compressed {
                    extents: current.extents,
                    tail: Some(tail),
                    fragment: None,
                }
            }
            Some(TailOut::Fragment { .. }) => {
                return Err(BuildError::Erofs(
                    "a fragment with no packed inode to hold it".to_owned(),
                ))
            }
            Some(TailOut::Raw { at }) => {
                let raw = &bytes[at..];
                let inline_max = if current.compressed {
                    limits.packed_tail_max
                } else {
                    limits.flat_tail_max
                };
                if raw.len() <= inline_max {
                    let tail = self.spool_tail(raw, false, current.logical)?;
                    if current.compressed {
                        Stored::Compressed {
                            extents: current.extents,
                            tail: Some(tail),
                            fragment: None,
                        }
                    } else {
                        flat(&current, Some(tail))?
                    }
                } else {
                    // No room inline: the tail takes a block of its own.
                    self.write_block(raw)?;
                    current.extents.push(Extent {
                        start: current.logical,
                        blkaddr: self.next_block - 1,
                        plain: true,
                    });
                    if current.compressed {
                        Stored::Compressed {
                            extents: current.extents,
                            tail: None,
                            fragment: None,
                        }
                    } else {
                        flat(&current, None)?
                    }
                }
            }
        };
        self.stored[current.file] = stored;
        self.last_ended = Some((current.file, current.start_block));
        Ok(())
    }

    fn spool_tail(
        &mut self,
        data: &[u8],
        compressed: bool,
        start: u64,
    ) -> Result<Tail, BuildError> {
        let tail = Tail {
            spool_offset: self.spool_len,
            len: data.len(),
            compressed,
            start,
        };
        self.spool
            .write_all(data)
            .map_err(|e| BuildError::Erofs(format!("spooling a tail: {e}")))?;
        self.spool_len += data.len() as u64;
        Ok(tail)
    }

    /// Writes a cluster's block (`block`, zero-filled), or finds an identical one written before
    /// (with fragments); returns its address.
    fn write_cluster(&mut self, block: &[u8]) -> Result<u32, BuildError> {
        let Some(clusters) = self.clusters.as_mut() else {
            self.write_block(block)?;
            return Ok(self.next_block - 1);
        };
        let mut hasher = Sha256::new();
        hasher.update(block);
        hasher.update(&ZEROS[..BLOCK - block.len()]);
        let digest = hasher.finalize();
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&digest[..16]);
        if let Some(&blkaddr) = clusters.get(&hash) {
            return Ok(blkaddr);
        }
        clusters.insert(hash, self.next_block);
        self.file_clusters.push(hash);
        self.write_block(block)?;
        Ok(self.next_block - 1)
    }

    /// Writes `data` (at most a block) as one block, zero-filled.
    fn write_block(&mut self, data: &[u8]) -> Result<(), BuildError> {
        self.out.write_all(data).map_err(out_err)?;
        if data.len() < BLOCK {
            self.out
                .write_all(&ZEROS[..BLOCK - data.len()])
                .map_err(out_err)?;
        }
        self.next_block = self
            .next_block
            .checked_add(1)
            .ok_or_else(|| BuildError::Erofs("the image would exceed 2^32 blocks".to_owned()))?;
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<Stored>, u32, u64), BuildError> {
        self.spool
            .flush()
            .map_err(|e| BuildError::Erofs(format!("spooling a tail: {e}")))?;
        let mut packed_len = 0;
        if let Some(mut packer) = self.packer.take() {
            packer
                .out
                .flush()
                .map_err(|e| BuildError::Erofs(format!("spooling a fragment: {e}")))?;
            packed_len = packer.len;
        }
        Ok((self.stored, self.next_block, packed_len))
    }
}

static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// A file none of whose clusters compressed: its plain blocks are the file's blocks in order.
/// With fragments a plain block may be one written before for another file: when they are not
/// consecutive, the file is stored compressed, of plain clusters.
fn flat(current: &Current, tail: Option<Tail>) -> Result<Stored, BuildError> {
    debug_assert!(current
        .extents
        .iter()
        .enumerate()
        .all(|(i, e)| e.plain && e.start == i as u64 * BLOCK_SIZE));
    let start_block = current
        .extents
        .first()
        .map_or(current.start_block, |e| e.blkaddr);
    let consecutive = current
        .extents
        .iter()
        .enumerate()
        .all(|(i, e)| u64::from(e.blkaddr) == u64::from(start_block) + i as u64);
    if consecutive {
        return Ok(Stored::Flat {
            start_block,
            blocks: current.extents.len() as u32,
            tail,
        });
    }
    if tail.is_some() {
        return Err(BuildError::Erofs(
            "a flat file with shared blocks and an inline tail".to_owned(),
        ));
    }
    Ok(Stored::Compressed {
        extents: current.extents.clone(),
        tail: None,
        fragment: None,
    })
}

fn no_current() -> BuildError {
    BuildError::Erofs("a segment came before its file".to_owned())
}

fn out_err(e: io::Error) -> BuildError {
    BuildError::Write {
        path: PathBuf::from("(the image)"),
        cause: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8], len: usize) -> Vec<u8> {
        let start = block.iter().position(|&b| b != 0).unwrap_or(block.len());
        let mut out = vec![0u8; len];
        let n = lzzzz::lz4::decompress(&block[start..], &mut out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, len);
        out
    }

    #[test]
    fn clusters_fill_a_block_and_cover_the_segment() {
        let mut rng = storedisk_testkit::XorShift64::new(7);
        let text: Vec<u8> = (0..300_000)
            .map(|_| b"abcdefgh /nix/store\n"[(rng.next_u64() % 20) as usize])
            .collect();
        let noise: Vec<u8> = (0..10_000).map(|_| rng.next_u64() as u8).collect();
        let mut bytes = text.clone();
        bytes.extend(&noise);
        bytes.extend(vec![0u8; 3 << 20]);
        bytes.truncate(SEGMENT);
        let out = compress_segment(Codec::Lz4hc(9), &bytes, false, 0, false, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.tail.is_none());
        let mut at = 0;
        for piece in &out.pieces {
            match piece {
                Piece::Plain { at: p, len } => {
                    assert_eq!(*p, at);
                    assert!(*len <= BLOCK);
                    at += len;
                }
                Piece::Compressed { len, block } => {
                    assert_eq!(block.len(), BLOCK);
                    assert!(*len > BLOCK && *len <= MAX_EXTENT);
                    assert_eq!(decode(block, *len), &bytes[at..at + len]);
                    at += len;
                }
            }
        }
        assert_eq!(at, bytes.len());
        // Noise is stored as it is.
        assert!(out.pieces.iter().any(|p| matches!(p, Piece::Plain { .. })));
    }

    #[test]
    fn a_last_segment_keeps_its_tail_aside() {
        let small = b"hello hello hello hello hello hello".to_vec();
        let out = compress_segment(Codec::Lz4hc(9), &small, true, 4072, false, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.pieces.is_empty());
        assert!(matches!(out.tail, Some(TailOut::Compressed(ref c)) if c.len() < small.len()));
        let out = compress_segment(Codec::Lz4hc(9), b"xy", true, 4072, false, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(out.tail, Some(TailOut::Raw { at: 0 })));
        // Tail packing off: a short end is still a raw tail (the writer decides where it goes).
        let out = compress_segment(Codec::Lz4hc(9), &small, true, 0, false, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(out.tail, Some(TailOut::Raw { at: 0 })));
        let out = compress_segment(Codec::None, &[1u8; 5000], true, 0, false, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            out.pieces[..],
            [Piece::Plain { at: 0, len: 4096 }]
        ));
        assert!(matches!(out.tail, Some(TailOut::Raw { at: 4096 })));
    }

    #[test]
    fn with_fragments_a_last_segment_ends_in_a_fragment() {
        // Shorter than a block: a fragment from the start, whether it compresses or not.
        let small = b"hello hello hello hello hello hello".to_vec();
        let out = compress_segment(Codec::Lz4hc(9), &small, true, 4072, true, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.pieces.is_empty());
        assert!(matches!(out.tail, Some(TailOut::Fragment { at: 0 })));
        let out = compress_segment(Codec::Lz4hc(9), b"xy", true, 4072, true, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(out.tail, Some(TailOut::Fragment { at: 0 })));
        // 100 KB of zeros compress whole into less than a block: all of it is the fragment.
        let out = compress_segment(Codec::Lz4hc(9), &[0u8; 100_000], true, 0, true, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.pieces.is_empty());
        assert!(matches!(out.tail, Some(TailOut::Fragment { at: 0, .. })));
        // Noise: plain blocks, then the short end.
        let mut rng = storedisk_testkit::XorShift64::new(3);
        let noise: Vec<u8> = (0..10_000).map(|_| rng.next_u64() as u8).collect();
        let out = compress_segment(Codec::Lz4hc(9), &noise, true, 0, true, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.pieces.len(), 2);
        assert!(matches!(out.tail, Some(TailOut::Fragment { at: 8192 })));
        // Not the last segment: no fragment.
        let out = compress_segment(Codec::Lz4hc(9), &noise, false, 0, true, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.tail.is_none());
    }
}
