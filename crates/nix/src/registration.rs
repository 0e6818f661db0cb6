//! Registration text, the format of closureInfo's `registration` file and of
//! `nix-store --load-db`: per path, lines `path`, `narHash`, `narSize`, `deriver` (may be empty),
//! the number of references, then the references. Also renders nixpkgs' closureInfo outputs.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::closure::{Closure, ClosureError, PathInfo};
use crate::store_path::StoreDir;

impl Closure {
    /// Parses registration text (closureInfo's `registration`, `nix-store --load-db` input).
    /// Defined here, beside the parser, so that the closure module does not depend on this one.
    pub fn from_registration(text: &str, store_dir: &StoreDir) -> Result<Self, ClosureError> {
        Closure::new(store_dir.clone(), parse(text, store_dir)?)
    }
}

/// Parses registration text into path infos (in file order).
pub fn parse(text: &str, store_dir: &StoreDir) -> Result<Vec<PathInfo>, ClosureError> {
    let mut lines = text.lines().enumerate().peekable();
    let mut infos = Vec::new();
    let err = |line: usize, reason: String| ClosureError::Registration {
        line: line + 1,
        reason,
    };
    while let Some((n, path_line)) = lines.next() {
        if path_line.is_empty() {
            // Blank lines may trail the text; anywhere else one is an error.
            if lines.clone().all(|(_, l)| l.is_empty()) {
                break;
            }
            return Err(err(
                n,
                "empty line where a store path was expected".to_owned(),
            ));
        }
        let path = store_dir
            .parse_path(path_line)
            .map_err(|e| err(n, e.to_string()))?;
        let mut next = |what: &str| {
            lines
                .next()
                .ok_or_else(|| err(n, format!("{path_line}: the text ends before its {what}")))
        };
        let (hn, hash_line) = next("NAR hash")?;
        let (sn, size_line) = next("NAR size")?;
        let (dn, deriver_line) = next("deriver")?;
        let (cn, count_line) = next("reference count")?;
        let nar_hash = if hash_line.is_empty() {
            None
        } else {
            Some(
                hash_line
                    .parse()
                    .map_err(|e: crate::NarHashError| err(hn, e.to_string()))?,
            )
        };
        let nar_size = if size_line.is_empty() {
            None
        } else {
            Some(
                size_line
                    .parse::<u64>()
                    .map_err(|_| err(sn, format!("NAR size {size_line:?} is not a number")))?,
            )
        };
        let deriver = if deriver_line.is_empty() {
            None
        } else {
            Some(
                store_dir
                    .parse_path(deriver_line)
                    .map_err(|e| err(dn, e.to_string()))?,
            )
        };
        let count: usize = count_line.parse().map_err(|_| {
            err(
                cn,
                format!("reference count {count_line:?} is not a number"),
            )
        })?;
        let mut references = BTreeSet::new();
        for _ in 0..count {
            let (rn, r) = next("references")?;
            references.insert(
                store_dir
                    .parse_path(r)
                    .map_err(|e| err(rn, e.to_string()))?,
            );
        }
        infos.push(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver,
        });
    }
    Ok(infos)
}

/// The three files nixpkgs' `closureInfo` writes, rendered from a closure in its source order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosureInfoFiles {
    pub registration: String,
    pub store_paths: String,
    pub total_nar_size: String,
}

/// Renders closureInfo's outputs. Every path needs a NAR hash and size (exportReferencesGraph
/// always gives them); references are listed in the order Nix sorts them (by base name).
pub fn closure_info(closure: &Closure) -> Result<ClosureInfoFiles, ClosureError> {
    let mut registration = String::new();
    let mut store_paths = String::new();
    let mut total: u64 = 0;
    for info in closure.iter_source_order() {
        let display = closure.display(&info.path);
        let missing = |what: &str| ClosureError::Entry {
            path: display.clone(),
            reason: format!(
                "has no {what}; closure-info needs exportReferencesGraph or path-info data"
            ),
        };
        let hash = info.nar_hash.ok_or_else(|| missing("narHash"))?;
        let size = info.nar_size.ok_or_else(|| missing("narSize"))?;
        total += size;
        let _ = writeln!(
            registration,
            "{display}\n{hash}\n{size}\n\n{}",
            info.references.len()
        );
        for r in &info.references {
            let _ = writeln!(registration, "{}", closure.display(r));
        }
        let _ = writeln!(store_paths, "{display}");
    }
    Ok(ClosureInfoFiles {
        registration,
        store_paths,
        total_nar_size: format!("{total}\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    #[test]
    fn renders_and_parses_back() {
        let a = format!("/nix/store/{}-a", "a".repeat(32));
        let b = format!("/nix/store/{}-b", "b".repeat(32));
        let json = serde_json::json!([
            {"path": a, "narHash": H, "narSize": 5, "references": [a, b]},
            {"path": b, "narHash": H, "narSize": 7, "references": []},
        ])
        .to_string();
        let closure = Closure::from_json(&json, None, &StoreDir::default()).unwrap();
        let files = closure_info(&closure).unwrap();
        assert_eq!(
            files.registration,
            format!("{a}\n{H}\n5\n\n2\n{a}\n{b}\n{b}\n{H}\n7\n\n0\n")
        );
        assert_eq!(files.store_paths, format!("{a}\n{b}\n"));
        assert_eq!(files.total_nar_size, "12\n");
        let back = Closure::from_registration(&files.registration, &StoreDir::default()).unwrap();
        assert_eq!(back, closure);
    }

    #[test]
    fn names_the_line_of_a_truncated_or_bad_file() {
        let a = format!("/nix/store/{}-a", "a".repeat(32));
        let err = parse(&format!("{a}\n{H}\n5\n\n2\n{a}\n"), &StoreDir::default()).unwrap_err();
        assert!(
            err.to_string().contains("ends before its references"),
            "{err}"
        );
        let err = parse(&format!("{a}\n{H}\nfive\n\n0\n"), &StoreDir::default()).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let trailing = parse(&format!("{a}\n{H}\n5\n\n0\n\n\n"), &StoreDir::default()).unwrap();
        assert_eq!(trailing.len(), 1);
        let leading = parse(&format!("\n{a}\n{H}\n5\n\n0\n"), &StoreDir::default());
        assert!(leading.is_err());
    }
}
