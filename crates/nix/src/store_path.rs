//! `StorePath` and `StoreDir`: `/nix/store/<32 nix-base32 chars>-<name>`, validated with Nix's
//! own name rules (allowed characters, no `.`/`..` component, at most 211 characters).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::base32::is_base32_char;

/// Length of the hash part of a store path's base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts after `<hash>-` (Nix's `MaxPathLen` minus the hash and dash).
pub const MAX_NAME_LEN: usize = 211;
/// The store directory every store path in this project is named under unless told otherwise.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a valid store path: {reason}")]
pub struct StorePathError {
    pub text: String,
    pub reason: String,
}

/// The logical directory store paths are named under (`/nix/store` unless configured).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir(DEFAULT_STORE_DIR.to_owned())
    }
}

impl StoreDir {
    /// A store directory: absolute, without a trailing slash.
    pub fn new(dir: &str) -> Result<Self, StorePathError> {
        let trimmed = dir.trim_end_matches('/');
        if !trimmed.starts_with('/') || trimmed.is_empty() {
            return Err(StorePathError {
                text: dir.to_owned(),
                reason: "a store directory must be an absolute path".to_owned(),
            });
        }
        Ok(StoreDir(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a full path such as `/nix/store/<hash>-<name>` (a trailing `/...` inside the store
    /// path is rejected: that is a file in a store path, not a store path).
    pub fn parse_path(&self, text: &str) -> Result<StorePath, StorePathError> {
        let base = text
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError {
                text: text.to_owned(),
                reason: format!("it is not directly under {}", self.0),
            })?;
        StorePath::from_base_name(base).map_err(|e| StorePathError {
            text: text.to_owned(),
            reason: e.reason,
        })
    }

    /// Parses either a full path under this store directory or a bare base name.
    pub fn parse_path_or_base_name(&self, text: &str) -> Result<StorePath, StorePathError> {
        if text.starts_with('/') {
            self.parse_path(text)
        } else {
            StorePath::from_base_name(text)
        }
    }

    /// The full logical path of `path` in this store, e.g. `/nix/store/<hash>-<name>`.
    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.base_name())
    }

    /// Where `path` is physically, when this store directory's contents sit at `physical_dir`.
    pub fn physical(&self, physical_dir: &Path, path: &StorePath) -> PathBuf {
        physical_dir.join(path.base_name())
    }
}

/// A store path, kept as its base name `<hash>-<name>`; the store directory is separate
/// ([`StoreDir`]) so that paths compare and sort by base name, as Nix does.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    base_name: String,
}

impl StorePath {
    /// Parses `<32 nix-base32 chars>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let fail = |reason: String| StorePathError {
            text: base.to_owned(),
            reason,
        };
        if base.len() < HASH_PART_LEN + 2 {
            return Err(fail(format!(
                "a store path's base name is {HASH_PART_LEN} hash characters, a dash and a name"
            )));
        }
        let (hash, rest) = base.split_at(HASH_PART_LEN);
        if let Some(bad) = hash.bytes().find(|&c| !is_base32_char(c)) {
            return Err(fail(format!(
                "hash part {hash:?} has {:?}, which is not a nix-base32 character",
                char::from(bad)
            )));
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| fail("the hash part must be followed by '-'".to_owned()))?;
        check_name(name).map_err(fail)?;
        Ok(StorePath {
            base_name: base.to_owned(),
        })
    }

    /// `<hash>-<name>`: the entry name at an image's root.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// The 32-character hash part: what Nix's reference scanner looks for.
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_PART_LEN]
    }

    /// The name after `<hash>-`.
    pub fn name(&self) -> &str {
        &self.base_name[HASH_PART_LEN + 1..]
    }

    /// The name without its version, as Nix's `builtins.parseDrvName` splits it: the version
    /// starts after the first `-` that is followed by something other than a letter
    /// (`hello-2.12.1` -> `hello`, `perl5.38-XML-Parser-2.46` -> `perl5.38-XML-Parser`,
    /// `unit-foo.service` -> itself).
    pub fn pname(&self) -> &str {
        let name = self.name();
        let bytes = name.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'-'
                && bytes
                    .get(i + 1)
                    .is_some_and(|next| !next.is_ascii_alphabetic())
            {
                return &name[..i];
            }
        }
        name
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base_name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base_name)
    }
}

/// Nix's store path name rules (`checkName` in Nix 2.26).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} characters; Nix allows at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let first_component = name.split('-').next().unwrap_or(name);
    if first_component == "." || first_component == ".." {
        return Err(format!(
            "the first dash-separated component of the name must not be {first_component:?}"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(format!("the name has {bad:?}, which Nix does not allow"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    #[test]
    fn parses_full_paths_and_base_names() {
        let store = StoreDir::default();
        let p = store
            .parse_path(&format!("/nix/store/{HASH}-hello-2.12"))
            .unwrap();
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "hello-2.12");
        assert_eq!(store.display(&p), format!("/nix/store/{HASH}-hello-2.12"));
        assert_eq!(
            store
                .parse_path_or_base_name(&format!("{HASH}-hello-2.12"))
                .unwrap(),
            p
        );
    }

    #[test]
    fn splits_names_like_parse_drv_name() {
        let store = StoreDir::default();
        for (name, pname) in [
            ("hello-2.12.1", "hello"),
            ("perl5.38.2-XML-Parser-2.46", "perl5.38.2-XML-Parser"),
            ("unit-foo.service", "unit-foo.service"),
            ("glibc-2.39-52-bin", "glibc"),
            ("payload-007", "payload"),
            ("hello-v1", "hello-v1"),
            ("source", "source"),
            ("trailing-", "trailing-"),
        ] {
            let p = store
                .parse_path(&format!("/nix/store/{HASH}-{name}"))
                .unwrap();
            assert_eq!(p.pname(), pname, "{name}");
        }
    }

    #[test]
    fn honours_a_custom_store_dir() {
        let store = StoreDir::new("/gnu/store/").unwrap();
        assert!(store.parse_path(&format!("/gnu/store/{HASH}-x")).is_ok());
        assert!(store.parse_path(&format!("/nix/store/{HASH}-x")).is_err());
        assert!(StoreDir::new("relative").is_err());
    }

    #[test]
    fn accepts_every_allowed_character_and_the_longest_name() {
        for name in [
            "a+b-c.d_e?f=g",
            ".dotfile",
            "..a",
            ".a-b",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(
                StorePath::from_base_name(&format!("{HASH}-{name}")).is_ok(),
                "{name}"
            );
        }
    }

    #[test]
    fn rejects_what_nix_rejects() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in [
            format!("{HASH}-"),
            format!("{HASH}-{long}"),
            format!("{HASH}-."),
            format!("{HASH}-.."),
            format!("{HASH}-.-foo"),
            format!("{HASH}-..-foo"),
            format!("{HASH}-a/b"),
            format!("{HASH}-a b"),
            format!("{HASH}-ä"),
            format!("{HASH}_name"),
            format!("{}-name", HASH.replace('0', "e")),
            "short".to_owned(),
        ] {
            assert!(
                StorePath::from_base_name(&bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let store = StoreDir::default();
        assert!(store
            .parse_path(&format!("/nix/store/{HASH}-x/bin"))
            .is_err());
        assert!(store.parse_path(&format!("/nix/storeX/{HASH}-x")).is_err());
    }
}
