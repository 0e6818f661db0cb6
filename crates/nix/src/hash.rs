//! `NarHash`: the sha256 digest of a NAR, in the three spellings Nix prints
//! (`sha256:<nix32>`, `sha256:<hex>`, SRI `sha256-<base64>`).

use std::fmt;
use std::str::FromStr;

use crate::base32;

/// A sha256 NAR hash. Displays as Nix's registration format, `sha256:<nix32>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NarHash(pub [u8; 32]);

/// Why a NAR hash string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NAR hash {text:?}: {reason}")]
pub struct NarHashError {
    pub text: String,
    pub reason: String,
}

impl NarHash {
    /// `sha256:<nix32>`, as in closureInfo's `registration` and exportReferencesGraph.
    pub fn to_nix32(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// `sha256-<base64>`, the SRI form `nix path-info --json` prints.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", data_encoding::BASE64.encode(&self.0))
    }

    /// Lower-case hex digest.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({})", self.to_nix32())
    }
}

impl FromStr for NarHash {
    type Err = NarHashError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| NarHashError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let bytes = if let Some(digest) = text.strip_prefix("sha256:") {
            match digest.len() {
                52 => base32::decode(digest, 32).map_err(|e| fail(&e.to_string()))?,
                64 => data_encoding::HEXLOWER_PERMISSIVE
                    .decode(digest.as_bytes())
                    .map_err(|e| fail(&e.to_string()))?,
                n => {
                    return Err(fail(&format!(
                        "a sha256 digest is 52 nix32 or 64 hex characters, not {n}"
                    )))
                }
            }
        } else if let Some(digest) = text.strip_prefix("sha256-") {
            data_encoding::BASE64
                .decode(digest.as_bytes())
                .map_err(|e| fail(&e.to_string()))?
        } else {
            return Err(fail(
                "expected sha256:<nix32>, sha256:<hex> or sha256-<base64>",
            ));
        };
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| fail("a sha256 digest is 32 bytes"))?;
        Ok(NarHash(array))
    }
}

impl serde::Serialize for NarHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_nix32())
    }
}

impl<'de> serde::Deserialize<'de> for NarHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256 of the empty string, in the three spellings (checked with `nix-hash --to-base32`).
    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn parses_all_three_spellings_to_one_value() {
        let from_hex: NarHash = format!("sha256:{HEX}").parse().unwrap();
        let from_nix32: NarHash = format!("sha256:{NIX32}").parse().unwrap();
        let from_sri: NarHash = SRI.parse().unwrap();
        assert_eq!(from_hex, from_nix32);
        assert_eq!(from_hex, from_sri);
        assert_eq!(from_hex.to_hex(), HEX);
        assert_eq!(from_hex.to_nix32(), format!("sha256:{NIX32}"));
        assert_eq!(from_hex.to_sri(), SRI);
    }

    #[test]
    fn rejects_malformed_hashes() {
        for bad in [
            "",
            "md5:abc",
            "sha256:xyz",
            "sha256-AAAA",
            &format!("sha1:{HEX}"),
        ] {
            assert!(bad.parse::<NarHash>().is_err(), "{bad} should not parse");
        }
    }
}
