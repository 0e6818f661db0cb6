//! erofs images, read with the erofs-rs crate through its positioned-read backend
//! ([`AsyncImage`]). Our backend answers every read at once (a `pread` or a copy), so each of
//! its futures is complete on its first poll and [`block_on`] needs no runtime; memory stays at
//! the pclusters being decoded whatever the image size.

use std::collections::HashSet;
use std::future::Future;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use erofs_rs::backend::AsyncImage;
use erofs_rs::r#async::{EroFS, File};
use erofs_rs::types::Inode;

use super::ImageReader;
use crate::error::VerifyError;
use crate::image::{ImageFormat, ImageSource};
use crate::limits::Limits;
use crate::tree::{FileSource, NodeId, NodeKind, Tree, TreeBuilder};

/// erofs-rs's view of an [`ImageSource`].
#[derive(Debug, Clone, Copy)]
struct Backend<'a>(ImageSource<'a>);

impl AsyncImage for Backend<'_> {
    fn read_exact_at(
        &self,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = erofs_rs::Result<()>> + Send {
        let done = self
            .0
            .read_exact_at(buf, offset)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => erofs_rs::Error::OutOfBounds(e.to_string()),
                _ => erofs_rs::Error::Io(e),
            });
        std::future::ready(done)
    }
}

/// Runs a future of erofs-rs over [`Backend`] to completion. Every read of the backend is ready
/// at once, so the future completes on its first poll; one that does not is an error rather
/// than a spin.
fn block_on<T>(future: impl Future<Output = T>) -> Result<T, VerifyError> {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(value) => Ok(value),
        Poll::Pending => Err(VerifyError::corrupt(
            "erofs: the reader waited on a read that should have completed",
        )),
    }
}

/// An opened erofs image.
pub struct ErofsImage<'a> {
    fs: EroFS<Backend<'a>>,
    /// Regular files' inodes; a file node's handle indexes this.
    files: Vec<Inode>,
    tree: Tree,
}

impl std::fmt::Debug for ErofsImage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ErofsImage({} nodes)", self.tree.node_count())
    }
}

fn lib_err(doing: &str) -> impl Fn(erofs_rs::Error) -> VerifyError + '_ {
    move |e| VerifyError::corrupt(format!("erofs: {doing}: {e}"))
}

impl<'a> ErofsImage<'a> {
    pub fn open(source: ImageSource<'a>, limits: &Limits) -> Result<Self, VerifyError> {
        let fs =
            block_on(EroFS::new(Backend(source)))?.map_err(lib_err("reading the superblock"))?;
        let mut builder = TreeBuilder::new(limits, source.len());
        let mut files = Vec::new();
        // stack[d - 1] is the tree node of the directory whose entries have depth d.
        let mut stack: Vec<NodeId> = vec![Tree::ROOT];
        let mut seen_dirs: HashSet<u64> = HashSet::new();
        let mut walk =
            block_on(fs.walk_dir("/"))?.map_err(lib_err("opening the root directory"))?;
        while let Some(entry) = block_on(walk.next_entry())? {
            let entry = entry.map_err(lib_err("walking the directory tree"))?;
            let depth = entry.depth;
            if depth > limits.max_depth {
                return Err(VerifyError::limit(format!(
                    "directories nested deeper than {} levels",
                    limits.max_depth
                )));
            }
            if depth == 0 || depth > stack.len() {
                return Err(VerifyError::corrupt("erofs: directory walk out of order"));
            }
            stack.truncate(depth);
            let parent = stack[depth - 1];
            let inode = entry.inode;
            let name = entry.dir_entry.file_name();
            let kind = if inode.is_dir() {
                if !seen_dirs.insert(inode.id()) {
                    return Err(VerifyError::corrupt(format!(
                        "erofs: directory inode {} is reached twice (a directory cycle or hard-linked directory)",
                        inode.id()
                    )));
                }
                NodeKind::Directory {
                    children: Vec::new(),
                }
            } else if inode.is_file() {
                files.push(inode);
                NodeKind::Regular {
                    executable: inode.permissions().mode() & 0o100 != 0,
                    size: inode.data_size(),
                    handle: (files.len() - 1) as u64,
                }
            } else if inode.is_symlink() {
                if inode.data_size() > limits.max_symlink_target {
                    return Err(VerifyError::corrupt(format!(
                        "erofs: symlink inode {} claims a {}-byte target",
                        inode.id(),
                        inode.data_size()
                    )));
                }
                let target =
                    block_on(fs.read_link_inode(inode))?.map_err(lib_err("reading a symlink"))?;
                NodeKind::Symlink {
                    target: target.as_bytes().into(),
                }
            } else if inode.device().is_some() {
                NodeKind::Special {
                    kind: "a device node",
                }
            } else {
                NodeKind::Special {
                    kind: "a FIFO, socket or file of unknown type",
                }
            };
            let is_dir = matches!(kind, NodeKind::Directory { .. });
            let id = builder.add(parent, name, kind)?;
            if is_dir {
                stack.push(id);
            }
        }
        drop(walk);
        Ok(ErofsImage {
            fs,
            files,
            tree: builder.finish()?,
        })
    }
}

impl FileSource for ErofsImage<'_> {
    fn open_file(&self, handle: u64) -> Result<Box<dyn Read + '_>, VerifyError> {
        let inode = *self
            .files
            .get(handle as usize)
            .ok_or_else(|| VerifyError::corrupt("erofs: no such file handle"))?;
        let file = self
            .fs
            .open_inode_file(inode)
            .map_err(lib_err("opening a file"))?;
        Ok(Box::new(FileReader { file }))
    }
}

/// A file of the image as [`Read`]: one decoded pcluster at a time.
struct FileReader<'f, 'a> {
    file: File<'f, Backend<'a>>,
}

impl Read for FileReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        block_on(self.file.read(buf))
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }
}

impl ImageReader for ErofsImage<'_> {
    fn format(&self) -> ImageFormat {
        ImageFormat::Erofs
    }

    fn tree(&self) -> &Tree {
        &self.tree
    }
}
