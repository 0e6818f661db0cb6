//! The file data of a squashfs image: data blocks and fragment blocks, compressed on every core,
//! written in one fixed order, every content stored once.
//!
//! A *reader* thread reads the regular files in image order, one open at a time. A file of at
//! least one block is cut into blocks: each is compressed by a pool of *workers*, except a block
//! of zeros, which becomes a hole (as mksquashfs does). A smaller file goes into the fragment
//! block being filled, which is compressed by the workers once the next small file would not
//! fit. Every step the writer must take is numbered in order (a block, a hole, a fragment block,
//! "this file is a copy"), and the *writer* (the calling thread) takes them in number order: the
//! image does not depend on the number of threads or on their timing.
//!
//! Identical content is stored once, as mksquashfs does. A small file with the length and
//! SHA-256 of an earlier one gets the earlier one's place in its fragment block. A file of at
//! least one block whose length another such file has is SHA-256'd while it is read; when it is a
//! copy, the writer moves back over the blocks it has just written for it, and the file points
//! at the first copy's blocks.
//!
//! Memory is bounded: at most [`MAX_IN_FLIGHT`] numbered steps (a block each at most) exist
//! between the reader and the writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use super::{Codec, BLOCK_SIZE};
use crate::tree::{EntryKind, Tree};
use crate::{BuildError, ProgressSink};

/// Most numbered steps between the reader and the writer (blocks of at most 128 KiB).
const MAX_IN_FLIGHT: u64 = 128;
/// A block size word's "stored uncompressed" bit.
const UNCOMPRESSED_BIT: u32 = 1 << 24;

/// Where one regular file's data lies in the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FileData {
    /// Image offset of its first stored block (0 when it has none).
    pub blocks_start: u64,
    /// One size word per block: stored bytes, [`UNCOMPRESSED_BIT`] when stored as read, 0 for
    /// a hole.
    pub block_sizes: Vec<u32>,
    /// (fragment block index, offset in it) of a file smaller than a block.
    pub fragment: Option<(u32, u32)>,
    /// Bytes of the file in holes.
    pub sparse: u64,
}

/// One entry of the fragment table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FragmentEntry {
    pub start: u64,
    /// Size word, as for blocks.
    pub size: u32,
}

/// The laid-out data of every regular file (by ordinal: their order in the tree).
#[derive(Debug, Default)]
pub(super) struct DataLayout {
    pub files: Vec<FileData>,
    pub fragments: Vec<FragmentEntry>,
    /// Image offset just past the data.
    pub end: u64,
    /// Files stored as references to an identical earlier one.
    pub copies: usize,
}

/// Writes the data of every regular file of `tree` to `out`, starting at image offset `start`
/// (where `out` is positioned), with `threads` compression workers.
pub(super) fn write_data(
    tree: &Tree,
    codec: &Codec,
    out: &mut BufWriter<&File>,
    start: u64,
    threads: usize,
    progress: &dyn ProgressSink,
) -> Result<DataLayout, BuildError> {
    let files = source_files(tree);
    let file_count = files.len();
    let sequence = Sequence::default();
    let bytes_read = AtomicU64::new(0);
    let (jobs, queue) = mpsc::sync_channel::<Job>(threads * 2);
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| scope.spawn(|| worker(&queue, &sequence, codec)))
            .collect();
        let reader = scope.spawn(|| {
            let mut reader = FileReader::new(&sequence, jobs, &bytes_read, &files);
            let _stopped = OnUnwind(|| sequence.abandon());
            reader.read_all(&files);
            sequence.finish(reader.next_seq);
            (reader.small, reader.copies)
        });

        let written = write_steps(&sequence, out, start, file_count, progress, &bytes_read);
        // Stops the reader and the workers if the writer stopped early (a no-op otherwise).
        sequence.abandon();
        let panicked = |who: &str| BuildError::Squashfs(format!("the {who} thread panicked"));
        let (small, copies) = reader.join().map_err(|_| panicked("file reader"))?;
        for worker in workers {
            worker.join().map_err(|_| panicked("compression"))?;
        }
        let mut layout = written?;
        for (ordinal, place) in small {
            layout.files[ordinal].fragment = Some(place);
        }
        layout.copies += copies;
        Ok(layout)
    })
}

/// A regular file the reader must read.
struct SourceFile {
    path: PathBuf,
    len: u64,
}

fn source_files(tree: &Tree) -> Vec<SourceFile> {
    tree.entries()
        .iter()
        .filter_map(|entry| match entry.kind {
            EntryKind::Regular { size, .. } => Some(SourceFile {
                path: tree.source(entry),
                len: size,
            }),
            _ => None,
        })
        .collect()
}

/// One step of the writer, numbered by the reader.
enum Step {
    /// A block of file `ordinal`: compressed, or as read when `compressed` is false.
    Block {
        ordinal: usize,
        bytes: Vec<u8>,
        compressed: bool,
    },
    /// A block of zeros of file `ordinal`, stored as nothing.
    Hole {
        ordinal: usize,
        len: u64,
    },
    /// A fragment block.
    Fragment {
        bytes: Vec<u8>,
        compressed: bool,
    },
    /// File `ordinal`, whose blocks were the last ones written, has file `of`'s content.
    Copy {
        ordinal: usize,
        of: usize,
    },
    Failed(BuildError),
}

/// What a worker compresses: a data block of file `ordinal`, or a fragment block.
struct Job {
    seq: u64,
    input: Vec<u8>,
    ordinal: Option<usize>,
}

/// The numbered steps that are ready, handed to the writer in number order.
#[derive(Default)]
struct Sequence {
    state: Mutex<SequenceState>,
    changed: Condvar,
    abandoned: AtomicBool,
}

#[derive(Default)]
struct SequenceState {
    ready: BTreeMap<u64, Step>,
    /// The step the writer takes next.
    next: u64,
    /// How many steps there are, once the reader has numbered them all.
    total: Option<u64>,
}

impl Sequence {
    fn lock(&self) -> MutexGuard<'_, SequenceState> {
        // A panicking thread abandons the sequence; the state itself stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Waits until step `seq` may be numbered (the writer is close enough behind); false once
    /// the sequence is abandoned.
    fn wait_for_room(&self, seq: u64) -> bool {
        let mut state = self.lock();
        while !self.is_abandoned() && seq >= state.next + MAX_IN_FLIGHT {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        !self.is_abandoned()
    }

    fn put(&self, seq: u64, step: Step) {
        if self.is_abandoned() {
            return;
        }
        self.lock().ready.insert(seq, step);
        self.changed.notify_all();
    }

    /// The reader numbered `total` steps in all.
    fn finish(&self, total: u64) {
        self.lock().total = Some(total);
        self.changed.notify_all();
    }

    /// Stops everyone: the reader numbers nothing more, workers skip their jobs, the writer
    /// gets an error if it still waits.
    fn abandon(&self) {
        let _state = self.lock();
        self.abandoned.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// The next step, or `None` after the last one.
    fn take(&self) -> Result<Option<Step>, BuildError> {
        let mut state = self.lock();
        loop {
            let next = state.next;
            if let Some(step) = state.ready.remove(&next) {
                state.next += 1;
                self.changed.notify_all();
                return Ok(Some(step));
            }
            if state.total == Some(next) {
                return Ok(None);
            }
            if self.is_abandoned() {
                return Err(BuildError::Squashfs(
                    "the file reader or a compression worker stopped unexpectedly".to_owned(),
                ));
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Runs its closure when dropped during a panic.
struct OnUnwind<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnUnwind<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

fn worker(queue: &Mutex<Receiver<Job>>, sequence: &Sequence, codec: &Codec) {
    // A panicking worker would leave the writer waiting for its step forever.
    let _stopped = OnUnwind(|| sequence.abandon());
    loop {
        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = job else { return };
        if sequence.is_abandoned() {
            continue;
        }
        let step = match codec.compress(&job.input) {
            Ok(output) => {
                let compressed = output.len() < job.input.len();
                let bytes = if compressed { output } else { job.input };
                match job.ordinal {
                    Some(ordinal) => Step::Block {
                        ordinal,
                        bytes,
                        compressed,
                    },
                    None => Step::Fragment { bytes, compressed },
                }
            }
            Err(error) => Step::Failed(error),
        };
        sequence.put(job.seq, step);
    }
}

/// The writer: takes the steps in order and writes the image's data section.
fn write_steps(
    sequence: &Sequence,
    out: &mut BufWriter<&File>,
    start: u64,
    file_count: usize,
    progress: &dyn ProgressSink,
    bytes_read: &AtomicU64,
) -> Result<DataLayout, BuildError> {
    let out_err = |e: io::Error| BuildError::Squashfs(format!("writing the image: {e}"));
    let mut layout = DataLayout {
        files: vec![FileData::default(); file_count],
        end: start,
        ..DataLayout::default()
    };
    // The file whose blocks are being written.
    let mut current = None;
    while let Some(step) = sequence.take()? {
        progress.advance(bytes_read.swap(0, Ordering::Relaxed));
        match step {
            Step::Block {
                ordinal,
                bytes,
                compressed,
            } => {
                begin_blocks(
                    &mut current,
                    &mut layout.files[ordinal],
                    ordinal,
                    layout.end,
                );
                out.write_all(&bytes).map_err(out_err)?;
                layout.files[ordinal]
                    .block_sizes
                    .push(size_word(bytes.len(), compressed));
                layout.end += bytes.len() as u64;
            }
            Step::Hole { ordinal, len } => {
                begin_blocks(
                    &mut current,
                    &mut layout.files[ordinal],
                    ordinal,
                    layout.end,
                );
                layout.files[ordinal].block_sizes.push(0);
                layout.files[ordinal].sparse += len;
            }
            Step::Fragment { bytes, compressed } => {
                layout.fragments.push(FragmentEntry {
                    start: layout.end,
                    size: size_word(bytes.len(), compressed),
                });
                out.write_all(&bytes).map_err(out_err)?;
                layout.end += bytes.len() as u64;
            }
            Step::Copy { ordinal, of } => {
                // Its blocks are the last ones written: the next data goes over them.
                let first = layout.files[ordinal].blocks_start;
                if current == Some(ordinal) {
                    out.seek(SeekFrom::Start(first)).map_err(out_err)?;
                    layout.end = first;
                }
                current = None;
                layout.files[ordinal] = layout.files[of].clone();
            }
            Step::Failed(error) => return Err(error),
        }
    }
    progress.advance(bytes_read.swap(0, Ordering::Relaxed));
    Ok(layout)
}

/// Notes where file `ordinal`'s blocks start when this step is its first.
fn begin_blocks(current: &mut Option<usize>, file: &mut FileData, ordinal: usize, at: u64) {
    if *current != Some(ordinal) {
        *current = Some(ordinal);
        file.blocks_start = at;
    }
}

fn size_word(len: usize, compressed: bool) -> u32 {
    // A block is at most BLOCK_SIZE (2^17) bytes: it fits under the flag bit.
    let len = len as u32;
    if compressed {
        len
    } else {
        len | UNCOMPRESSED_BIT
    }
}

/// The reader thread's state.
struct FileReader<'a> {
    sequence: &'a Sequence,
    jobs: SyncSender<Job>,
    bytes_read: &'a AtomicU64,
    next_seq: u64,
    /// The fragment block being filled, and its index.
    fragment: Vec<u8>,
    fragment_index: u32,
    /// Small files already placed, by (length, SHA-256).
    small_seen: HashMap<(u64, [u8; 32]), (u32, u32)>,
    /// Files of at least a block already written, by (length, SHA-256), when their length
    /// is shared.
    large_seen: HashMap<(u64, [u8; 32]), usize>,
    /// Lengths (of at least a block) that several files have.
    shared_lengths: HashSet<u64>,
    /// Where each small file went.
    small: Vec<(usize, (u32, u32))>,
    copies: usize,
}

/// Why the reader stopped early: the writer hung up, or a file failed (the writer was told).
struct Stop;

impl<'a> FileReader<'a> {
    fn new(
        sequence: &'a Sequence,
        jobs: SyncSender<Job>,
        bytes_read: &'a AtomicU64,
        files: &[SourceFile],
    ) -> Self {
        let mut lengths: HashMap<u64, usize> = HashMap::new();
        for file in files.iter().filter(|f| f.len >= u64::from(BLOCK_SIZE)) {
            *lengths.entry(file.len).or_default() += 1;
        }
        FileReader {
            sequence,
            jobs,
            bytes_read,
            next_seq: 0,
            fragment: Vec::with_capacity(BLOCK_SIZE as usize),
            fragment_index: 0,
            small_seen: HashMap::new(),
            large_seen: HashMap::new(),
            shared_lengths: lengths
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(len, _)| len)
                .collect(),
            small: Vec::new(),
            copies: 0,
        }
    }

    fn read_all(&mut self, files: &[SourceFile]) {
        for (ordinal, file) in files.iter().enumerate() {
            let read = if file.len == 0 {
                Ok(())
            } else if file.len < u64::from(BLOCK_SIZE) {
                self.read_small(ordinal, file)
            } else {
                self.read_large(ordinal, file)
            };
            if read.is_err() {
                return;
            }
        }
        if !self.fragment.is_empty() {
            let last = std::mem::take(&mut self.fragment);
            let _ = self.submit(last, None);
        }
    }

    /// Numbers the next step, once the writer is close enough behind.
    fn number(&mut self) -> Result<u64, Stop> {
        if !self.sequence.wait_for_room(self.next_seq) {
            return Err(Stop);
        }
        self.next_seq += 1;
        Ok(self.next_seq - 1)
    }

    fn submit(&mut self, input: Vec<u8>, ordinal: Option<usize>) -> Result<(), Stop> {
        let seq = self.number()?;
        self.jobs
            .send(Job {
                seq,
                input,
                ordinal,
            })
            .map_err(|_| Stop)
    }

    fn put(&mut self, step: Step) -> Result<(), Stop> {
        let seq = self.number()?;
        self.sequence.put(seq, step);
        Ok(())
    }

    fn fail(&mut self, error: BuildError) -> Result<(), Stop> {
        self.put(Step::Failed(error))?;
        Err(Stop)
    }

    fn read_small(&mut self, ordinal: usize, file: &SourceFile) -> Result<(), Stop> {
        let mut bytes = Vec::with_capacity(file.len as usize);
        let read = File::open(&file.path).and_then(|handle| {
            handle.take(file.len + 1).read_to_end(&mut bytes)?;
            Ok(())
        });
        if let Err(cause) = read {
            return self.fail(read_error(file, cause));
        }
        if bytes.len() as u64 != file.len {
            return self.fail(BuildError::length_changed(
                &file.path,
                file.len,
                bytes.len() as u64,
            ));
        }
        self.bytes_read.fetch_add(file.len, Ordering::Relaxed);
        let key = (file.len, sha256(&bytes));
        if let Some(&place) = self.small_seen.get(&key) {
            self.small.push((ordinal, place));
            self.copies += 1;
            return Ok(());
        }
        if self.fragment.len() + bytes.len() > BLOCK_SIZE as usize {
            let full =
                std::mem::replace(&mut self.fragment, Vec::with_capacity(BLOCK_SIZE as usize));
            self.submit(full, None)?;
            self.fragment_index += 1;
        }
        let place = (self.fragment_index, self.fragment.len() as u32);
        self.fragment.extend_from_slice(&bytes);
        self.small_seen.insert(key, place);
        self.small.push((ordinal, place));
        Ok(())
    }

    fn read_large(&mut self, ordinal: usize, file: &SourceFile) -> Result<(), Stop> {
        let mut handle = match File::open(&file.path) {
            Ok(handle) => handle,
            Err(cause) => return self.fail(read_error(file, cause)),
        };
        let mut hasher = self.shared_lengths.contains(&file.len).then(Sha256::new);
        let mut read_len = 0u64;
        loop {
            let chunk = match read_chunk(&mut handle) {
                Ok(chunk) => chunk,
                Err(cause) => return self.fail(read_error(file, cause)),
            };
            if chunk.is_empty() {
                break;
            }
            read_len += chunk.len() as u64;
            if read_len > file.len {
                return self.fail(BuildError::length_changed(&file.path, file.len, read_len));
            }
            self.bytes_read
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(&chunk);
            }
            if chunk.iter().all(|&b| b == 0) {
                let len = chunk.len() as u64;
                self.put(Step::Hole { ordinal, len })?;
            } else {
                self.submit(chunk, Some(ordinal))?;
            }
        }
        if read_len != file.len {
            return self.fail(BuildError::length_changed(&file.path, file.len, read_len));
        }
        if let Some(hasher) = hasher {
            let key = (file.len, hasher.finalize().into());
            match self.large_seen.get(&key) {
                Some(&of) => {
                    self.copies += 1;
                    self.put(Step::Copy { ordinal, of })?;
                }
                None => {
                    self.large_seen.insert(key, ordinal);
                }
            }
        }
        Ok(())
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn read_error(file: &SourceFile, cause: io::Error) -> BuildError {
    BuildError::Read {
        path: file.path.clone(),
        cause,
    }
}

/// Up to a block of bytes: fewer only at the end of the file.
fn read_chunk(file: &mut File) -> io::Result<Vec<u8>> {
    let block = BLOCK_SIZE as usize;
    let mut chunk = vec![0u8; block];
    let mut filled = 0;
    while filled < block {
        match file.read(&mut chunk[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    chunk.truncate(filled);
    Ok(chunk)
}
