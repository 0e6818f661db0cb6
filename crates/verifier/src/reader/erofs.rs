//! erofs images, read with the erofs-rs crate over a byte slice.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use erofs_rs::backend::SliceImage;
use erofs_rs::types::Inode;
use erofs_rs::EroFS;

use super::ImageReader;
use crate::error::VerifyError;
use crate::image::ImageFormat;
use crate::limits::Limits;
use crate::tree::{FileSource, NodeId, NodeKind, Tree, TreeBuilder};

/// An opened erofs image.
pub struct ErofsImage<'a> {
    fs: EroFS<SliceImage<'a>>,
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
    pub fn open(bytes: &'a [u8], limits: &Limits) -> Result<Self, VerifyError> {
        let fs = EroFS::new(SliceImage::new(bytes)).map_err(lib_err("reading the superblock"))?;
        let mut builder = TreeBuilder::new(limits, bytes.len() as u64);
        let mut files = Vec::new();
        // stack[d - 1] is the tree node of the directory whose entries have depth d.
        let mut stack: Vec<NodeId> = vec![Tree::ROOT];
        let mut seen_dirs: HashSet<u64> = HashSet::new();
        let walk = fs
            .walk_dir("/")
            .map_err(lib_err("opening the root directory"))?;
        for entry in walk {
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
                let target = fs
                    .read_link_inode(inode)
                    .map_err(lib_err("reading a symlink"))?;
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
        Ok(Box::new(file))
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
