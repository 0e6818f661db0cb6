//! Parallel block compression ahead of backhand's single-threaded `FilesystemWriter`.
//!
//! backhand reads each file and compresses its 128 KiB blocks one after the other on the thread
//! that calls `write`, which leaves every other core idle (zstd level 15 is nearly all of a
//! build's CPU time). So a *reader* thread reads the files first, in the order backhand will ask
//! for them, and predicts every `compress` call backhand will make for file data, following
//! backhand's `DataWriter` rules exactly: a file whose first block is full is stored as blocks
//! (each one compressed, except all-zero blocks, which become holes), a shorter file goes into the
//! fragment buffer, which is compressed when the next file's tail would overflow it, and once
//! more at the end. Each predicted block is compressed by a pool of *worker* threads.
//!
//! backhand is then given (1) file readers that serve the bytes the reader thread already read
//! (each file is read from disk once) and (2) a compressor, [`PrecompressedOrInline`], that
//! answers each `compress` call with the next precompressed block when its input is byte for byte
//! the predicted one, and compresses inline otherwise (metadata blocks, or a misprediction, which
//! would only cost speed). Workers call the same `DefaultCompressor` backhand would call inline,
//! and a block's compressed form depends only on its bytes, so the image is byte-identical
//! whatever the thread count or the timing.
//!
//! Memory is bounded: the reader stays at most [`READ_AHEAD_BYTES`] of file data ahead of
//! backhand, so results waiting to be consumed are bounded by the same window.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};
use backhand::kind::Kind;
use backhand::{BackhandError, FilesystemCompressor, SuperBlock};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh64::Xxh64;

use super::ContentDigest;
use crate::BuildError;

/// How far (bytes of file data) the reader thread may run ahead of backhand.
pub(super) const READ_AHEAD_BYTES: usize = 16 << 20;

/// One message of the file data stream; every regular file gets its chunks, then `End` (or
/// `Failed`), tagged with the file's ordinal among the regular files.
pub(super) enum FileData {
    Chunk(Arc<Vec<u8>>),
    End,
    Failed(BuildError),
}

/// A regular file the reader thread must read.
pub(super) struct SourceFile {
    pub path: PathBuf,
    pub expected_len: u64,
}

/// A FIFO with a byte budget between one producer and one consumer; either side can hang up.
pub(super) struct DataQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    items: VecDeque<(usize, FileData, usize)>,
    bytes: usize,
    producer_done: bool,
    consumer_gone: bool,
}

impl DataQueue {
    fn new() -> Self {
        DataQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                bytes: 0,
                producer_done: false,
                consumer_gone: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panicking thread already fails the build; the queue's state stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `data` for file `ordinal`; false when the consumer has hung up.
    fn push(&self, ordinal: usize, data: FileData) -> bool {
        let bytes = match &data {
            FileData::Chunk(chunk) => chunk.len(),
            _ => 0,
        };
        let mut state = self.lock();
        while !state.consumer_gone
            && !state.items.is_empty()
            && state.bytes + bytes > READ_AHEAD_BYTES
        {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.consumer_gone {
            return false;
        }
        state.bytes += bytes;
        state.items.push_back((ordinal, data, bytes));
        self.changed.notify_all();
        true
    }

    /// The next message, or `None` once the producer has finished and everything was taken.
    pub(super) fn pop(&self) -> Option<(usize, FileData)> {
        let mut state = self.lock();
        loop {
            if let Some((ordinal, data, bytes)) = state.items.pop_front() {
                state.bytes -= bytes;
                self.changed.notify_all();
                return Some((ordinal, data));
            }
            if state.producer_done {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn producer_done(&self) {
        self.lock().producer_done = true;
        self.changed.notify_all();
    }

    fn consumer_gone(&self) {
        let mut state = self.lock();
        state.consumer_gone = true;
        state.items.clear();
        state.bytes = 0;
        self.changed.notify_all();
    }
}

/// A block as the reader predicted it, and its compressed form (None if compressing failed).
struct CompressedBlock {
    input: Arc<Vec<u8>>,
    output: Option<Vec<u8>>,
}

/// Compressed blocks in the order backhand will ask for them.
pub(super) struct Precompressed {
    state: Mutex<ResultsState>,
    arrived: Condvar,
}

struct ResultsState {
    /// By sequence number.
    ready: BTreeMap<u64, CompressedBlock>,
    next: u64,
    /// How many blocks the reader has predicted so far.
    submitted: u64,
    /// Known once the reader has predicted every block.
    total: Option<u64>,
    /// Set on a misprediction or when backhand is done: results are no longer wanted.
    abandoned: bool,
    /// How many `compress` calls were answered inline because the prediction did not match.
    mispredicted: u64,
}

impl Precompressed {
    fn new() -> Self {
        Precompressed {
            state: Mutex::new(ResultsState {
                ready: BTreeMap::new(),
                next: 0,
                submitted: 0,
                total: None,
                abandoned: false,
                mispredicted: 0,
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ResultsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, seq: u64, input: Arc<Vec<u8>>, output: Option<Vec<u8>>) {
        let mut state = self.lock();
        if !state.abandoned {
            state.ready.insert(seq, CompressedBlock { input, output });
            self.arrived.notify_all();
        }
    }

    fn predicted(&self, seq: u64) {
        self.lock().submitted = seq + 1;
    }

    fn set_total(&self, total: u64) {
        self.lock().total = Some(total);
        self.arrived.notify_all();
    }

    fn abandon(&self) {
        let mut state = self.lock();
        state.abandoned = true;
        state.ready.clear();
        self.arrived.notify_all();
    }

    /// The precompressed form of `bytes` if it is the next predicted block.
    fn take(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut state = self.lock();
        loop {
            if state.abandoned {
                return None;
            }
            let next = state.next;
            if next >= state.submitted {
                if state.total.is_none() {
                    // A block the reader did not predict (it predicts each one before backhand
                    // can ask for it): stop using predictions.
                    state.mispredicted += 1;
                    state.abandoned = true;
                    state.ready.clear();
                }
                // Past the file data, metadata blocks are compressed inline.
                return None;
            }
            if let Some(block) = state.ready.get(&next) {
                if block.input.as_slice() != bytes {
                    state.mispredicted += 1;
                    state.abandoned = true;
                    state.ready.clear();
                    return None;
                }
                let block = state.ready.remove(&next)?;
                state.next += 1;
                return block.output;
            }
            state = self.arrived.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn mispredicted(&self) -> u64 {
        self.lock().mispredicted
    }
}

thread_local! {
    /// The precompressed blocks for the `FilesystemWriter::write` running on this thread.
    static ACTIVE: RefCell<Option<Arc<Precompressed>>> = const { RefCell::new(None) };
}

/// Makes `results` answer this thread's `compress` calls until dropped.
pub(super) struct ActiveGuard;

impl ActiveGuard {
    pub(super) fn install(results: Arc<Precompressed>) -> ActiveGuard {
        ACTIVE.with(|active| *active.borrow_mut() = Some(results));
        ActiveGuard
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|active| *active.borrow_mut() = None);
    }
}

/// backhand's compressor, answering from the precompressed blocks of the write running on the
/// calling thread and compressing inline otherwise.
#[derive(Debug)]
pub(super) struct PrecompressedOrInline;

static PRECOMPRESSED_OR_INLINE: PrecompressedOrInline = PrecompressedOrInline;

/// The squashfs kind (little-endian v4.0, as backhand's default) using [`PrecompressedOrInline`].
pub(super) fn kind() -> Kind {
    Kind::new_v4(&PRECOMPRESSED_OR_INLINE)
}

impl CompressionAction for PrecompressedOrInline {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Compressor,
    ) -> Result<(), BackhandError> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, BackhandError> {
        let precompressed = ACTIVE.with(|active| {
            active
                .borrow()
                .as_ref()
                .and_then(|results| results.take(bytes))
        });
        match precompressed {
            Some(output) => Ok(output),
            None => DefaultCompressor.compress(bytes, fc, block_size),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut SuperBlock,
        kind: &Kind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

/// The running pipeline: what backhand's side consumes.
pub(super) struct Pipeline {
    pub data: Arc<DataQueue>,
    pub results: Arc<Precompressed>,
}

impl Pipeline {
    pub(super) fn new() -> Self {
        Pipeline {
            data: Arc::new(DataQueue::new()),
            results: Arc::new(Precompressed::new()),
        }
    }

    /// Called when backhand is done (or failed): stops the reader and the workers.
    pub(super) fn hang_up(&self) {
        self.data.consumer_gone();
        self.results.abandon();
    }

    /// Runs the reader and `threads` workers inside `scope`; the reader's handle returns the
    /// digests of every file of at least one block (for the duplicate detection check).
    pub(super) fn spawn<'scope>(
        &self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        files: Vec<SourceFile>,
        compressor: FilesystemCompressor,
        block_size: u32,
        threads: usize,
    ) -> std::thread::ScopedJoinHandle<'scope, Vec<ContentDigest>> {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(threads * 2);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        for _ in 0..threads {
            let jobs_rx = Arc::clone(&jobs_rx);
            let results = Arc::clone(&self.results);
            scope.spawn(move || {
                // A panicking worker would leave backhand waiting for its block forever.
                let _on_panic = OnUnwind(|| results.abandon());
                worker(&jobs_rx, &results, compressor, block_size)
            });
        }
        let data = Arc::clone(&self.data);
        let results = Arc::clone(&self.results);
        scope.spawn(move || {
            let mut reader = BlockReader {
                data: &data,
                results: &results,
                jobs: jobs_tx,
                block_size: block_size as usize,
                next_seq: 0,
                fragment: Vec::with_capacity(block_size as usize),
                digests: Vec::new(),
            };
            {
                // Even if reading panics, backhand's side must stop waiting.
                let _done = OnUnwind(|| {
                    results.abandon();
                    data.producer_done();
                });
                reader.read_all(files);
            }
            data.producer_done();
            reader.digests
        })
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

struct Job {
    seq: u64,
    input: Arc<Vec<u8>>,
}

fn worker(
    jobs: &Mutex<Receiver<Job>>,
    results: &Precompressed,
    compressor: FilesystemCompressor,
    block_size: u32,
) {
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.recv()
        };
        let Ok(job) = job else { return };
        // A failure is left for backhand's inline call to report.
        let output = DefaultCompressor
            .compress(&job.input, compressor, block_size)
            .ok();
        results.insert(job.seq, job.input, output);
    }
}

/// The reader thread: reads every file in order, feeds backhand's readers and predicts blocks.
struct BlockReader<'a> {
    data: &'a DataQueue,
    results: &'a Precompressed,
    jobs: SyncSender<Job>,
    block_size: usize,
    next_seq: u64,
    /// Mirror of backhand's `DataWriter::fragment_bytes`.
    fragment: Vec<u8>,
    digests: Vec<ContentDigest>,
}

/// Why the reader stopped early.
enum Stop {
    /// The consumer hung up; nothing more to do.
    HungUp,
    /// This file failed; the error went to the consumer.
    Failed,
}

impl BlockReader<'_> {
    fn read_all(&mut self, files: Vec<SourceFile>) {
        let count = files.len();
        if count == 0 {
            self.finish_predictions();
        }
        for (ordinal, file) in files.into_iter().enumerate() {
            if self.read_file(ordinal, &file).is_err() {
                return;
            }
            // Before the last file's end reaches backhand, so that every block is predicted
            // before backhand can ask for it.
            if ordinal + 1 == count {
                self.finish_predictions();
            }
            if self.send(ordinal, FileData::End).is_err() {
                return;
            }
        }
    }

    /// backhand compresses the fragment buffer once more at the end, even when empty.
    fn finish_predictions(&mut self) {
        let last = std::mem::take(&mut self.fragment);
        self.submit(Arc::new(last));
        self.results.set_total(self.next_seq);
    }

    fn submit(&mut self, input: Arc<Vec<u8>>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.results.predicted(seq);
        // Workers only stop when this sender is dropped, so sending cannot fail while we run.
        let _ = self.jobs.send(Job { seq, input });
    }

    fn send(&self, ordinal: usize, data: FileData) -> Result<(), Stop> {
        if self.data.push(ordinal, data) {
            Ok(())
        } else {
            Err(Stop::HungUp)
        }
    }

    fn fail(&self, ordinal: usize, error: BuildError) -> Result<(), Stop> {
        self.send(ordinal, FileData::Failed(error))?;
        Err(Stop::Failed)
    }

    fn read_file(&mut self, ordinal: usize, file: &SourceFile) -> Result<(), Stop> {
        let read_err = |source| BuildError::Read {
            path: file.path.clone(),
            cause: source,
        };
        let mut handle = match File::open(&file.path) {
            Ok(handle) => handle,
            Err(source) => return self.fail(ordinal, read_err(source)),
        };
        let mut hashes =
            (file.expected_len >= self.block_size as u64).then(|| (Xxh64::new(0), Sha256::new()));
        let mut read_len = 0u64;
        let mut stored_as_blocks = None;
        loop {
            let chunk = match read_chunk(&mut handle, self.block_size) {
                Ok(chunk) => chunk,
                Err(source) => return self.fail(ordinal, read_err(source)),
            };
            if chunk.is_empty() {
                break;
            }
            read_len += chunk.len() as u64;
            if read_len > file.expected_len {
                let reason = format!(
                    "it grew past the {} bytes it had when the closure was walked",
                    file.expected_len
                );
                return self.fail(ordinal, changed(file, reason));
            }
            if let Some((xxh, sha)) = hashes.as_mut() {
                xxh.update(&chunk);
                sha.update(&chunk);
            }
            let blocks = *stored_as_blocks.get_or_insert(chunk.len() == self.block_size);
            let chunk = Arc::new(chunk);
            if blocks {
                if !chunk.iter().all(|&b| b == 0) {
                    self.submit(Arc::clone(&chunk));
                }
            } else {
                if chunk.len() + self.fragment.len() > self.block_size {
                    let full =
                        std::mem::replace(&mut self.fragment, Vec::with_capacity(self.block_size));
                    self.submit(Arc::new(full));
                }
                self.fragment.extend_from_slice(&chunk);
            }
            self.send(ordinal, FileData::Chunk(chunk))?;
        }
        if read_len != file.expected_len {
            let reason = format!(
                "it is {read_len} bytes long now, {} when the closure was walked",
                file.expected_len
            );
            return self.fail(ordinal, changed(file, reason));
        }
        if let Some((xxh, sha)) = hashes {
            self.digests.push(ContentDigest {
                len: read_len,
                xxh64: xxh.digest(),
                sha256: sha.finalize().into(),
            });
        }
        Ok(())
    }
}

fn changed(file: &SourceFile, reason: String) -> BuildError {
    BuildError::Changed {
        path: file.path.clone(),
        reason,
    }
}

/// Up to `block_size` bytes: fewer only at end of file (as backhand's chunk reader).
fn read_chunk(file: &mut File, block_size: usize) -> io::Result<Vec<u8>> {
    let mut chunk = vec![0u8; block_size];
    let mut filled = 0;
    while filled < block_size {
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
