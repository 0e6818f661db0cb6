//! `Tree`: the format-neutral view of an image's directory tree that both readers build
//! (validated names, sorted children, bounded sizes), and its NAR serialization.
//!
//! The readers only answer two questions: "what is the tree" (built once, metadata only) and
//! "give me the bytes of file N" (streamed). Everything Nix-specific lives here.

use std::io::{self, Read, Write};

use storedisk_nix::{NarEncoder, NarError};

use crate::error::VerifyError;
use crate::limits::Limits;

/// Index of a node in a [`Tree`].
pub type NodeId = u32;

/// What a node is.
#[derive(Debug, Clone)]
pub enum NodeKind {
    Directory {
        children: Vec<NodeId>,
    },
    /// A regular file; `handle` is the reader's own reference to its data.
    Regular {
        executable: bool,
        size: u64,
        handle: u64,
    },
    Symlink {
        target: Box<[u8]>,
    },
    /// A device, FIFO or socket: cannot be part of a Nix store path.
    Special {
        kind: &'static str,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: Box<[u8]>,
    pub parent: NodeId,
    pub kind: NodeKind,
}

/// An image's directory tree. Node 0 is the image root, a directory.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    file_bytes: u64,
}

impl Tree {
    pub const ROOT: NodeId = 0;

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The root's entries, sorted by name bytes.
    pub fn root_children(&self) -> &[NodeId] {
        match &self.nodes[0].kind {
            NodeKind::Directory { children } => children,
            _ => &[],
        }
    }

    /// Sum of the sizes of all regular files (what hashing will read).
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `a/b/c` relative to the image root, for messages.
    pub fn path_of(&self, id: NodeId) -> String {
        path_in(&self.nodes, id)
    }

    /// Sum of file sizes under `id` (for progress).
    pub fn file_bytes_under(&self, id: NodeId) -> u64 {
        let mut total = 0u64;
        let mut stack = vec![id];
        while let Some(n) = stack.pop() {
            match &self.node(n).kind {
                NodeKind::Directory { children } => stack.extend(children.iter().copied()),
                NodeKind::Regular { size, .. } => total = total.saturating_add(*size),
                _ => {}
            }
        }
        total
    }

    /// The first node under `id` (depth first, sorted) that a NAR cannot hold, with its kind.
    pub fn first_special_under(&self, id: NodeId) -> Option<(NodeId, &'static str)> {
        match &self.node(id).kind {
            NodeKind::Special { kind } => Some((id, kind)),
            NodeKind::Directory { children } => {
                children.iter().find_map(|c| self.first_special_under(*c))
            }
            _ => None,
        }
    }
}

/// Builds a [`Tree`] while enforcing [`Limits`]; readers call [`TreeBuilder::add`] per entry.
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<Node>,
    file_bytes: u64,
    data_budget: u64,
    limits: Limits,
}

impl TreeBuilder {
    pub fn new(limits: &Limits, image_len: u64) -> Self {
        TreeBuilder {
            nodes: vec![Node {
                name: Box::new([]),
                parent: 0,
                kind: NodeKind::Directory {
                    children: Vec::new(),
                },
            }],
            file_bytes: 0,
            data_budget: limits.data_budget(image_len),
            limits: limits.clone(),
        }
    }

    fn path_of(&self, parent: NodeId, name: &[u8]) -> String {
        let name = String::from_utf8_lossy(name);
        if parent == Tree::ROOT {
            name.into_owned()
        } else {
            format!("{}/{name}", path_in(&self.nodes, parent))
        }
    }

    /// Adds `name` under directory `parent`; returns the new node's id.
    pub fn add(
        &mut self,
        parent: NodeId,
        name: &[u8],
        kind: NodeKind,
    ) -> Result<NodeId, VerifyError> {
        if self.nodes.len() as u64 > self.limits.max_entries {
            return Err(VerifyError::limit(format!(
                "more than {} directory entries",
                self.limits.max_entries
            )));
        }
        if !storedisk_nix::nar::is_valid_entry_name(name) {
            let shown = String::from_utf8_lossy(name);
            let dir = if parent == Tree::ROOT {
                "the image root".to_owned()
            } else {
                path_in(&self.nodes, parent)
            };
            return Err(VerifyError::corrupt(format!(
                "directory {dir} has an entry named {shown:?} (empty, '.', '..', or containing '/' or NUL)"
            )));
        }
        match &kind {
            NodeKind::Regular { size, .. } => {
                self.file_bytes = self.file_bytes.saturating_add(*size);
                if self.file_bytes > self.data_budget {
                    return Err(VerifyError::limit(format!(
                        "{} makes the file data exceed {} bytes ({}x the image size); a compressed image this small cannot hold that much",
                        self.path_of(parent, name),
                        self.data_budget,
                        self.limits.max_expansion
                    )));
                }
            }
            NodeKind::Symlink { target }
                if target.is_empty()
                    || target.contains(&0)
                    || target.len() as u64 > self.limits.max_symlink_target =>
            {
                return Err(VerifyError::corrupt(format!(
                    "symlink {} has an invalid target ({} bytes; must be 1 to {} bytes without NUL)",
                    self.path_of(parent, name),
                    target.len(),
                    self.limits.max_symlink_target
                )));
            }
            _ => {}
        }
        let id = self.nodes.len() as NodeId;
        match &mut self.nodes[parent as usize].kind {
            NodeKind::Directory { children } => children.push(id),
            _ => {
                return Err(VerifyError::corrupt(
                    "an entry inside something that is not a directory",
                ))
            }
        }
        self.nodes.push(Node {
            name: name.into(),
            parent,
            kind,
        });
        Ok(id)
    }

    /// Sorts every directory's children by name and rejects duplicate names.
    pub fn finish(mut self) -> Result<Tree, VerifyError> {
        let Self {
            nodes, file_bytes, ..
        } = &mut self;
        for i in 0..nodes.len() {
            let NodeKind::Directory { children } = &nodes[i].kind else {
                continue;
            };
            let mut sorted = children.clone();
            sorted.sort_by(|a, b| nodes[*a as usize].name.cmp(&nodes[*b as usize].name));
            if let Some(w) = sorted
                .windows(2)
                .find(|w| nodes[w[0] as usize].name == nodes[w[1] as usize].name)
            {
                let name = String::from_utf8_lossy(&nodes[w[0] as usize].name).into_owned();
                let dir = path_in(nodes, i as NodeId);
                return Err(VerifyError::corrupt(format!(
                    "directory {dir} lists {name:?} twice"
                )));
            }
            nodes[i].kind = NodeKind::Directory { children: sorted };
        }
        Ok(Tree {
            nodes: std::mem::take(nodes),
            file_bytes: *file_bytes,
        })
    }
}

/// `a/b/c` relative to the image root (`/` for the root itself).
fn path_in(nodes: &[Node], id: NodeId) -> String {
    let mut parts = Vec::new();
    let mut at = id;
    // Parent links always point to an earlier node, so this ends; the bound is belt and braces.
    while at != Tree::ROOT && parts.len() <= nodes.len() {
        let node = &nodes[at as usize];
        parts.push(String::from_utf8_lossy(&node.name).into_owned());
        at = node.parent;
    }
    parts.reverse();
    if parts.is_empty() {
        "/".to_owned()
    } else {
        parts.join("/")
    }
}

/// Where file bytes come from: the format reader.
pub trait FileSource {
    /// A reader over the contents of the regular file with this handle.
    fn open_file(&self, handle: u64) -> Result<Box<dyn Read + '_>, VerifyError>;
}

/// Writes the NAR serialization of node `id` (and everything below it) into `encoder`.
/// `progress` is told the number of file bytes read as they stream.
pub fn dump_node<W: Write>(
    tree: &Tree,
    id: NodeId,
    files: &dyn FileSource,
    encoder: &mut NarEncoder<W>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), VerifyError> {
    let node = tree.node(id);
    let nar_err = |e: NarError| {
        VerifyError::corrupt(format!("{}: {}", tree.path_of(id), describe_nar_error(e)))
    };
    match &node.kind {
        NodeKind::Regular {
            executable,
            size,
            handle,
        } => {
            let reader = files.open_file(*handle)?;
            let mut counted = CountingReader {
                inner: reader,
                progress,
                pending: 0,
            };
            encoder
                .regular(*executable, *size, &mut counted)
                .map_err(nar_err)
        }
        NodeKind::Symlink { target } => encoder.symlink(target).map_err(nar_err),
        NodeKind::Directory { children } => {
            encoder.begin_directory().map_err(nar_err)?;
            for child in children {
                encoder.entry(&tree.node(*child).name).map_err(nar_err)?;
                dump_node(tree, *child, files, encoder, progress)?;
            }
            encoder.end_directory().map_err(nar_err)
        }
        NodeKind::Special { kind } => Err(VerifyError::corrupt(format!(
            "{} is {kind}, which a Nix store path cannot contain",
            tree.path_of(id)
        ))),
    }
}

fn describe_nar_error(e: NarError) -> String {
    match e {
        NarError::Io { cause, .. } => format!("reading file data failed: {cause}"),
        NarError::Invalid { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Reports what is read to `progress` in steps of [`PROGRESS_STEP`] (and the rest when dropped):
/// a progress bar's update reads the clock, which per 128 KiB block cost 1-2% of a verify.
struct CountingReader<'a, R> {
    inner: R,
    progress: &'a mut dyn FnMut(u64),
    pending: u64,
}

const PROGRESS_STEP: u64 = 1 << 20;

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pending += n as u64;
        if self.pending >= PROGRESS_STEP {
            (self.progress)(std::mem::take(&mut self.pending));
        }
        Ok(n)
    }
}

impl<R> Drop for CountingReader<'_, R> {
    fn drop(&mut self) {
        if self.pending > 0 {
            (self.progress)(self.pending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regular(size: u64) -> NodeKind {
        NodeKind::Regular {
            executable: false,
            size,
            handle: 0,
        }
    }

    #[test]
    fn rejects_names_a_nar_cannot_hold() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"nul\0"] {
            let mut b = TreeBuilder::new(&Limits::default(), 1000);
            let err = b.add(Tree::ROOT, bad, regular(1)).unwrap_err();
            assert!(
                matches!(err, VerifyError::CorruptImage { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn sorts_children_and_rejects_duplicates() {
        let mut b = TreeBuilder::new(&Limits::default(), 1000);
        let dir = b
            .add(
                Tree::ROOT,
                b"d",
                NodeKind::Directory {
                    children: Vec::new(),
                },
            )
            .unwrap();
        b.add(dir, b"b", regular(1)).unwrap();
        b.add(dir, b"a", regular(2)).unwrap();
        let tree = b.finish().unwrap();
        let NodeKind::Directory { children } = &tree.node(1).kind else {
            panic!("not a directory")
        };
        let names: Vec<&[u8]> = children.iter().map(|c| &*tree.node(*c).name).collect();
        assert_eq!(names, [&b"a"[..], b"b"]);
        assert_eq!(tree.file_bytes(), 3);
        assert_eq!(tree.path_of(children[0]), "d/a");

        let mut b = TreeBuilder::new(&Limits::default(), 1000);
        b.add(Tree::ROOT, b"x", regular(1)).unwrap();
        b.add(Tree::ROOT, b"x", regular(1)).unwrap();
        assert!(matches!(b.finish(), Err(VerifyError::CorruptImage { .. })));
    }

    #[test]
    fn bounds_declared_file_data_and_entries() {
        let limits = Limits {
            max_expansion: 10,
            min_data_budget: 100,
            max_entries: 3,
            ..Limits::default()
        };
        let mut b = TreeBuilder::new(&limits, 50);
        b.add(Tree::ROOT, b"a", regular(500)).unwrap();
        let err = b.add(Tree::ROOT, b"b", regular(1)).unwrap_err();
        assert!(matches!(err, VerifyError::LimitExceeded { .. }), "{err}");
        let mut b = TreeBuilder::new(&limits, 50);
        for name in [b"a", b"b", b"c"] {
            b.add(Tree::ROOT, name, regular(0)).unwrap();
        }
        assert!(matches!(
            b.add(Tree::ROOT, b"d", regular(0)),
            Err(VerifyError::LimitExceeded { .. })
        ));
    }
}
