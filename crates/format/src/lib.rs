//! storedisk-format: the two store disk image formats, by name. The builder writes them, the
//! verifier detects and reads them, the CLI and the harness name them in flags, reports and
//! snapshots: one type for all of them, so a format is never a string compared in many places
//! and the writer's and the reader's idea of it cannot drift apart.
//!
//! Invariants: names only (what each format *is* lives with the code that writes or reads it);
//! no dependency besides serde.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The on-disk format of a store disk image. In JSON and on the command line: `squashfs`,
/// `erofs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Squashfs,
    Erofs,
}

impl ImageFormat {
    /// Every format, in the order reports list them.
    pub const ALL: [ImageFormat; 2] = [ImageFormat::Squashfs, ImageFormat::Erofs];

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Squashfs => "squashfs",
            ImageFormat::Erofs => "erofs",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown image format {s:?} (expected squashfs or erofs)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_print_and_serialize_alike() {
        for format in ImageFormat::ALL {
            assert_eq!(format.name().parse::<ImageFormat>(), Ok(format));
            assert_eq!(format.to_string(), format.name());
            let json = serde_json::to_string(&format).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", format.name()));
        }
        assert!("ext4".parse::<ImageFormat>().is_err());
    }
}
