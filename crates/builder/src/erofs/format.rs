//! The erofs on-disk structures the native writer emits, as byte layouts: the superblock, compact
//! (32-byte) and extended (64-byte) inodes, directory entries, the map header of a compressed
//! inode (inline tail, fragment or whole-file fragment) and its logical cluster indexes: compact
//! 4-byte ones (`COMPRESSED_COMPACT` without the 2-byte packs, two logical clusters per 8 bytes)
//! in images without fragments, full 8-byte ones (`COMPRESSED_FULL`, which carry the high bits
//! of a fragment's offset) in images with them. Everything is little-endian; offsets and values
//! are those of the Linux kernel's `erofs_fs.h`.

/// Block size of every image the native writer makes (`blkszbits` 12).
pub const BLOCK_SIZE: u64 = 4096;
pub const BLOCK_BITS: u8 = 12;
/// The superblock starts this far into block 0.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_LEN: usize = 128;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Inodes sit on 32-byte slots; a nid is a slot number counted from `meta_blkaddr`.
pub const INODE_SLOT: u64 = 32;
pub const COMPACT_INODE_LEN: u64 = 32;
pub const EXTENDED_INODE_LEN: u64 = 64;
pub const DIRENT_LEN: usize = 12;
/// The map header after a compressed inode (8-aligned, which an inode without xattrs is).
pub const MAP_HEADER_LEN: u64 = 8;
/// Bytes from a full-index inode's map header to its first index (the header and 8 reserved).
pub const MAP_HEADER_AREA: u64 = 16;
/// One full logical cluster index.
pub const LCLUSTER_INDEX_LEN: u64 = 8;
/// A pack of compact indexes: two logical clusters (16 bits each: 12 of offset or distance,
/// 2 of type) and the block address they count from.
pub const INDEX_PACK_LEN: u64 = 8;
pub const INDEXES_PER_PACK: u64 = 2;

/// `feature_incompat` bits.
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x0000_0001;
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x0000_0010;
/// Some file keeps data in the packed inode (superblock `packed_nid`).
pub const FEATURE_INCOMPAT_FRAGMENTS: u32 = 0x0000_0020;

/// `h_advise` bit: the last pcluster is stored inline after the indexes (ztailpacking).
pub const ADVISE_INLINE_PCLUSTER: u16 = 0x0008;
/// `h_advise` bit: the last extent is in the packed inode, at `h_fragmentoff` (its low 32
/// bits; with full indexes the high ones are the extent head's `blkaddr`).
pub const ADVISE_FRAGMENT_PCLUSTER: u16 = 0x0020;
/// `h_algorithmtype` of LZ4 (lz4 and lz4hc write the same stream).
pub const ALGORITHM_LZ4: u8 = 0;

/// `i_format`'s data layouts (bits 1-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Data in consecutive blocks from `raw_blkaddr`.
    FlatPlain = 0,
    /// Compressed, a full 8-byte index per logical cluster.
    CompressedFull = 1,
    /// As `FlatPlain`, but the last (partial) block right after the inode.
    FlatInline = 2,
    /// Compressed, compact indexes for the blocks of file data.
    CompressedCompact = 3,
}

/// `erofs_dirent.file_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular = 1,
    Directory = 2,
    Symlink = 7,
}

impl FileType {
    /// The `S_IFMT` bits of an inode's `i_mode`.
    pub fn mode_bits(self) -> u16 {
        match self {
            FileType::Regular => 0o100_000,
            FileType::Directory => 0o040_000,
            FileType::Symlink => 0o120_000,
        }
    }
}

/// The superblock fields the writer sets; everything else is zero (no xattrs, no extra
/// devices, no compression configurations, build time 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub feature_incompat: u32,
    pub root_nid: u16,
    pub inodes: u64,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    /// The packed inode's nid (0: none).
    pub packed_nid: u64,
}

impl Superblock {
    pub fn to_bytes(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        put32(&mut b, 0, MAGIC);
        b[12] = BLOCK_BITS;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inodes);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        put64(&mut b, 96, self.packed_nid);
        b
    }
}

/// One inode, compact when its size, link count and times fit (they always do here but for
/// files of 4 GiB and more or 65536 links and more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub file_type: FileType,
    pub layout: DataLayout,
    /// Permission bits.
    pub permissions: u16,
    pub nlink: u32,
    pub size: u64,
    /// `i_u`: the first block (flat layouts) or the count of compressed blocks.
    pub i_u: u32,
    pub ino: u32,
}

impl Inode {
    pub fn is_extended(&self) -> bool {
        Self::needs_extended(self.size, self.nlink)
    }

    /// Whether a file of `size` bytes with `nlink` links needs the extended inode.
    pub fn needs_extended(size: u64, nlink: u32) -> bool {
        size > u64::from(u32::MAX) || nlink > u32::from(u16::MAX)
    }

    /// The on-disk inode; uid, gid, xattrs and times are 0.
    pub fn to_bytes(&self) -> Vec<u8> {
        let extended = self.is_extended();
        let format = ((self.layout as u16) << 1) | u16::from(extended);
        let mode = self.file_type.mode_bits() | self.permissions;
        if extended {
            let mut b = vec![0u8; EXTENDED_INODE_LEN as usize];
            put16(&mut b, 0, format);
            put16(&mut b, 4, mode);
            put64(&mut b, 8, self.size);
            put32(&mut b, 16, self.i_u);
            put32(&mut b, 20, self.ino);
            put32(&mut b, 44, self.nlink);
            b
        } else {
            let mut b = vec![0u8; COMPACT_INODE_LEN as usize];
            put16(&mut b, 0, format);
            put16(&mut b, 4, mode);
            // Fits: `needs_extended` is false.
            put16(&mut b, 6, self.nlink as u16);
            put32(&mut b, 8, self.size as u32);
            put32(&mut b, 16, self.i_u);
            put32(&mut b, 20, self.ino);
            b
        }
    }
}

/// Bytes after a compressed inode of `size` bytes before its inline tail: the map header and
/// the index packs (the tail starts after the last whole pack).
pub fn compressed_meta_len(size: u64) -> u64 {
    MAP_HEADER_LEN + size.div_ceil(BLOCK_SIZE).div_ceil(INDEXES_PER_PACK) * INDEX_PACK_LEN
}

/// `z_erofs_map_header` of a compressed inode, 4 KiB logical clusters.
pub fn map_header(inline_size: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    put16(&mut b, 2, inline_size);
    let advise = if inline_size > 0 {
        ADVISE_INLINE_PCLUSTER
    } else {
        0
    };
    put16(&mut b, 4, advise);
    b[6] = ALGORITHM_LZ4;
    // h_clusterbits 0: a logical cluster is one block.
    b
}

/// `z_erofs_map_header` of a compressed inode whose last extent is at `offset` in the packed
/// inode (full indexes, 4 KiB logical clusters).
pub fn map_header_fragment(offset: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    put32(&mut b, 0, offset as u32);
    put16(&mut b, 4, ADVISE_FRAGMENT_PCLUSTER);
    b[6] = ALGORITHM_LZ4;
    b
}

/// The map header of a file kept whole in the packed inode at `offset` (< 2^63): the top bit
/// of the 8 bytes says so, the others are the offset; no indexes follow.
pub fn map_header_whole_fragment(offset: u64) -> [u8; 8] {
    (offset | 1 << 63).to_le_bytes()
}

/// One full logical cluster index (`z_erofs_lcluster_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LclusterIndex {
    /// An extent starts `cluster_offset` bytes into this logical cluster; its data is one block
    /// at `blkaddr`, stored as is (`plain`) or LZ4-compressed (HEAD1).
    Head {
        plain: bool,
        cluster_offset: u16,
        blkaddr: u32,
    },
    /// The logical cluster lies inside the extent that started `back` clusters earlier; the
    /// next one starts `ahead` clusters later.
    NonHead { back: u16, ahead: u16 },
}

impl LclusterIndex {
    /// The full 8-byte encoding (`z_erofs_lcluster_index`).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match self {
            LclusterIndex::Head {
                plain,
                cluster_offset,
                blkaddr,
            } => {
                put16(
                    &mut b,
                    0,
                    if plain {
                        LCLUSTER_PLAIN
                    } else {
                        LCLUSTER_HEAD1
                    },
                );
                put16(&mut b, 2, cluster_offset);
                put32(&mut b, 4, blkaddr);
            }
            LclusterIndex::NonHead { back, ahead } => {
                put16(&mut b, 0, LCLUSTER_NONHEAD);
                put16(&mut b, 4, back);
                put16(&mut b, 6, ahead);
            }
        }
        b
    }
}

const LCLUSTER_PLAIN: u16 = 0;
const LCLUSTER_HEAD1: u16 = 1;
const LCLUSTER_NONHEAD: u16 = 2;
/// Bits of a compact index's offset or distance (`lobits` for 4 KiB clusters).
const COMPACT_LO_BITS: u16 = 12;

/// The compact 4-byte encoding of `indexes` (`COMPRESSED_COMPACT`, no 2-byte packs), packs of
/// two. A head's block is the pack's base plus one plus the heads before it in the pack, so the
/// heads of a pack that have blocks must have consecutive ones.
pub fn compact_indexes(indexes: &[LclusterIndex]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(indexes.len().div_ceil(2) * INDEX_PACK_LEN as usize);
    for pack in indexes.chunks(INDEXES_PER_PACK as usize) {
        let mut bytes = [0u8; INDEX_PACK_LEN as usize];
        let mut base: Option<u32> = None;
        for (slot, index) in pack.iter().enumerate() {
            let last = slot + 1 == INDEXES_PER_PACK as usize;
            let (kind, lo) = match *index {
                LclusterIndex::Head {
                    plain,
                    cluster_offset,
                    blkaddr,
                } => {
                    // Heads without a block (an inline tail, the end mark) have blkaddr 0.
                    if blkaddr != 0 {
                        let heads_before = pack[..slot]
                            .iter()
                            .filter(|i| matches!(i, LclusterIndex::Head { .. }))
                            .count() as u32;
                        let wanted = blkaddr.wrapping_sub(1 + heads_before);
                        match base {
                            Some(b) if b != wanted => {
                                return Err(format!(
                                    "the heads of one index pack are not in consecutive blocks ({b} + 1 + {heads_before} != {blkaddr})"
                                ))
                            }
                            _ => base = Some(wanted),
                        }
                    }
                    (
                        if plain {
                            LCLUSTER_PLAIN
                        } else {
                            LCLUSTER_HEAD1
                        },
                        cluster_offset,
                    )
                }
                // The last of a pack keeps the distance ahead, the others the one back.
                LclusterIndex::NonHead { back, ahead } => {
                    (LCLUSTER_NONHEAD, if last { ahead } else { back })
                }
            };
            // A distance of 2048 or more would read as a block count (`CBLKCNT`).
            let limit = if kind == LCLUSTER_NONHEAD {
                1 << (COMPACT_LO_BITS - 1)
            } else {
                1 << COMPACT_LO_BITS
            };
            if lo >= limit {
                return Err(format!(
                    "an index value of {lo} does not fit a compact index"
                ));
            }
            let field = lo | (kind << COMPACT_LO_BITS);
            bytes[slot * 2..slot * 2 + 2].copy_from_slice(&field.to_le_bytes());
        }
        bytes[4..8].copy_from_slice(&base.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Appends one directory entry's fixed part (`erofs_dirent`) to `out`.
pub fn push_dirent(out: &mut Vec<u8>, nid: u64, name_offset: u16, file_type: FileType) {
    out.extend_from_slice(&nid.to_le_bytes());
    out.extend_from_slice(&name_offset.to_le_bytes());
    out.push(file_type as u8);
    out.push(0);
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernels_offsets() {
        let sb = Superblock {
            feature_incompat: FEATURE_INCOMPAT_ZERO_PADDING,
            root_nid: 36,
            inodes: 7,
            blocks: 9,
            meta_blkaddr: 0,
            uuid: [0xaa; 16],
            volume_name: *b"nix-store\0\0\0\0\0\0\0",
            packed_nid: 0x0102,
        }
        .to_bytes();
        assert_eq!(&sb[0..4], &[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!(sb[12], 12);
        assert_eq!(&sb[14..16], &[36, 0]);
        assert_eq!(sb[36], 9);
        assert_eq!(&sb[64..73], b"nix-store");
        assert_eq!(sb[80], 1);
        assert_eq!(&sb[96..100], &[2, 1, 0, 0]);

        let inode = Inode {
            file_type: FileType::Regular,
            layout: DataLayout::FlatInline,
            permissions: 0o555,
            nlink: 2,
            size: 5000,
            i_u: 3,
            ino: 4,
        };
        let b = inode.to_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 4);
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), 0o100_555);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 2);
        assert_eq!(u32::from_le_bytes([b[8], b[9], b[10], b[11]]), 5000);
        let big = Inode {
            size: 1 << 32,
            ..inode
        }
        .to_bytes();
        assert_eq!(big.len(), 64);
        assert_eq!(u16::from_le_bytes([big[0], big[1]]), 5);
        assert_eq!(big[12], 1);
        assert_eq!(big[44], 2);

        assert_eq!(map_header(300), [0, 0, 44, 1, 8, 0, 0, 0]);
        assert_eq!(
            map_header_fragment(0x1_0000_0203),
            [3, 2, 0, 0, 0x20, 0, 0, 0]
        );
        assert_eq!(
            map_header_whole_fragment(0x0405),
            [5, 4, 0, 0, 0, 0, 0, 0x80]
        );
        assert_eq!(
            LclusterIndex::Head {
                plain: false,
                cluster_offset: 5,
                blkaddr: 0x0102
            }
            .to_bytes(),
            [1, 0, 5, 0, 2, 1, 0, 0]
        );
        assert_eq!(
            LclusterIndex::NonHead { back: 2, ahead: 3 }.to_bytes(),
            [2, 0, 0, 0, 2, 0, 3, 0]
        );
        // A compressed head at block 7, a plain one at 8 (base 6); then a back distance of 1
        // and, last in its pack, a distance ahead of 3.
        let packs = compact_indexes(&[
            LclusterIndex::Head {
                plain: false,
                cluster_offset: 0,
                blkaddr: 7,
            },
            LclusterIndex::Head {
                plain: true,
                cluster_offset: 904,
                blkaddr: 8,
            },
            LclusterIndex::NonHead { back: 1, ahead: 4 },
            LclusterIndex::NonHead { back: 2, ahead: 3 },
            LclusterIndex::Head {
                plain: false,
                cluster_offset: 5,
                blkaddr: 0,
            },
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            packs,
            [
                0x00, 0x10, 0x88, 0x03, 6, 0, 0, 0, //
                0x01, 0x20, 0x03, 0x20, 0, 0, 0, 0, //
                0x05, 0x10, 0, 0, 0, 0, 0, 0,
            ]
        );
        assert!(compact_indexes(&[
            LclusterIndex::Head {
                plain: false,
                cluster_offset: 0,
                blkaddr: 7,
            },
            LclusterIndex::Head {
                plain: false,
                cluster_offset: 9,
                blkaddr: 9,
            },
        ])
        .is_err());
    }
}
