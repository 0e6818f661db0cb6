//! `SyntheticStore`: a physical store directory in a temp dir, filled by a small builder, with
//! references computed the way Nix computes them (scanning each path's NAR for the hash parts of
//! the others) and NAR hashes and sizes from the core crate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use storedisk_nix::nar::{dump_path, hash_path};
use storedisk_nix::{base32, Closure, PathInfo, ReferenceScanner, StoreDir, StorePath};

use crate::rng::XorShift64;

/// What a store path is at its top: a directory tree, one regular file, or one symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorePathSpec {
    Directory,
    File,
    Symlink,
}

/// A synthetic Nix store on disk plus the closure of its roots.
#[derive(Debug)]
pub struct SyntheticStore {
    temp: tempfile::TempDir,
    store_dir: PathBuf,
    all_paths: BTreeSet<StorePath>,
    roots: Vec<StorePath>,
    closure: Closure,
    closure_json: PathBuf,
}

/// Fills a synthetic store path by path; [`SyntheticStoreBuilder::finish`] computes the graph.
#[derive(Debug)]
pub struct SyntheticStoreBuilder {
    temp: tempfile::TempDir,
    store_dir: PathBuf,
    paths: BTreeSet<StorePath>,
}

/// The deterministic store path for `name`, as the testkit names it.
pub fn store_path_for(name: &str) -> StorePath {
    let digest = Sha256::digest(format!("storedisk-testkit:{name}").as_bytes());
    StorePath::from_base_name(&format!("{}-{name}", base32::encode(&digest[..20])))
        .unwrap_or_else(|e| panic!("bad synthetic store path name {name:?}: {e}"))
}

/// `len` deterministic bytes: a xorshift stream interleaved with text runs, so compressors see
/// both incompressible and compressible data.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift64::from_seed(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let state = rng.next_u64();
        if state.is_multiple_of(5) {
            out.extend_from_slice(b"the quick brown fox jumps over the lazy dog\n");
        } else {
            out.extend_from_slice(&state.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

impl SyntheticStoreBuilder {
    pub fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let store_dir = temp.path().join("store");
        fs::create_dir(&store_dir).unwrap();
        SyntheticStoreBuilder {
            temp,
            store_dir,
            paths: BTreeSet::new(),
        }
    }

    /// The physical store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Declares the store path `name` (a directory unless `spec` says otherwise) and returns it.
    pub fn path(&mut self, name: &str, spec: StorePathSpec) -> StorePath {
        let p = store_path_for(name);
        assert!(
            self.paths.insert(p.clone()),
            "store path {name} declared twice"
        );
        if spec == StorePathSpec::Directory {
            fs::create_dir(self.store_dir.join(p.base_name())).unwrap();
        }
        p
    }

    /// `/nix/store/<hash>-<name>`, for writing references into contents.
    pub fn logical(&self, p: &StorePath) -> String {
        StoreDir::default().display(p)
    }

    fn physical(&self, p: &StorePath, rel: &str) -> PathBuf {
        let top = self.store_dir.join(p.base_name());
        let full = if rel.is_empty() { top } else { top.join(rel) };
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        full
    }

    /// A regular file at `rel` inside `p` (`rel` empty for a single-file store path).
    pub fn file(&mut self, p: &StorePath, rel: &str, contents: &[u8], executable: bool) {
        let full = self.physical(p, rel);
        fs::write(&full, contents).unwrap();
        let mode = if executable { 0o555 } else { 0o444 };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A symlink at `rel` inside `p` (`rel` empty for a symlink-only store path).
    pub fn symlink(&mut self, p: &StorePath, rel: &str, target: &str) {
        symlink(target, self.physical(p, rel)).unwrap();
    }

    /// An empty directory at `rel` inside `p`.
    pub fn dir(&mut self, p: &StorePath, rel: &str) {
        fs::create_dir_all(self.physical(p, rel)).unwrap();
    }

    /// A hard link at `rel` inside `p` to the existing file `from_rel` inside `from`.
    pub fn hard_link(&mut self, p: &StorePath, rel: &str, from: &StorePath, from_rel: &str) {
        let source = self.store_dir.join(from.base_name()).join(from_rel);
        fs::hard_link(source, self.physical(p, rel)).unwrap();
    }

    /// Computes NAR hashes, sizes and references (by scanning, as Nix does) and writes the
    /// closure of `roots` as exportReferencesGraph JSON.
    pub fn finish(self, roots: &[StorePath]) -> SyntheticStore {
        let mut store = SyntheticStore {
            all_paths: self.paths,
            roots: roots.to_vec(),
            closure: Closure::default(),
            closure_json: self.temp.path().join("closure.json"),
            store_dir: self.store_dir,
            temp: self.temp,
        };
        for p in &store.all_paths {
            make_read_only(&store.store_dir.join(p.base_name()));
        }
        store.closure = store.closure_of(roots);
        store.write_closure_json(roots, &store.closure_json.clone());
        store
    }
}

impl Default for SyntheticStoreBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn make_read_only(path: &Path) {
    let meta = fs::symlink_metadata(path).unwrap();
    if meta.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            make_read_only(&entry.unwrap().path());
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555)).unwrap();
    }
}

fn make_writable(path: &Path) {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.is_dir() {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
            if let Ok(entries) = fs::read_dir(path) {
                for entry in entries.flatten() {
                    make_writable(&entry.path());
                }
            }
        }
    }
}

impl Drop for SyntheticStore {
    fn drop(&mut self) {
        // Read-only directories would stop the temp dir's removal for a non-root user.
        make_writable(&self.store_dir);
    }
}

impl SyntheticStore {
    /// The names of the paths in the tricky store's closure (`toplevel` and everything it needs).
    pub const TRICKY_CLOSURE: [&'static str; 6] = [
        "glibc-2.40",
        "busybox-1.36.1",
        "hello-2.12.1",
        "config.json",
        "current-hello",
        "nixos-system-guest",
    ];

    /// A store with every case a store disk must get right. Roots: the `toplevel` path. The
    /// path named `outside-1.0` is on disk but in no closure.
    pub fn tricky() -> Self {
        let (builder, toplevel) = Self::tricky_builder();
        builder.finish(&[toplevel])
    }

    /// The tricky store, not yet finished, so a test can add paths (a runner, say) and choose
    /// its roots. Returns the builder and the guest's `toplevel` path.
    pub fn tricky_builder() -> (SyntheticStoreBuilder, StorePath) {
        use StorePathSpec::*;
        let mut b = SyntheticStoreBuilder::new();

        let glibc = b.path("glibc-2.40", Directory);
        b.file(
            &glibc,
            "lib/libc.so.6",
            &pseudo_random_bytes(1, 1_500_000),
            true,
        );
        b.symlink(&glibc, "lib/ld-linux-x86-64.so.2", "libc.so.6");
        b.file(&glibc, "share/empty-file", b"", false);
        b.dir(&glibc, "share/locale/empty-dir");
        b.file(
            &glibc,
            "a/b/c/d/e/f/g/h/deep.txt",
            b"deeply nested\n",
            false,
        );

        let busybox = b.path("busybox-1.36.1", Directory);
        let bb_bin = format!(
            "\x7fELF fake busybox linked against {}/lib/libc.so.6\n",
            b.logical(&glibc)
        );
        b.file(&busybox, "bin/busybox", bb_bin.as_bytes(), true);
        b.symlink(&busybox, "bin/sh", "busybox");
        b.file(
            &busybox,
            "share/doc/LICENSE",
            b"GPL-2.0 text, shared by hard link\n",
            false,
        );

        let hello = b.path("hello-2.12.1", Directory);
        let script = format!(
            "#!{}/bin/sh\nexec {}/lib/ld-linux-x86-64.so.2 \"$0\"\n",
            b.logical(&busybox),
            b.logical(&glibc)
        );
        b.file(&hello, "bin/hello", script.as_bytes(), true);
        b.file(&hello, "share/doc/hello/COPYING", b"hello license\n", false);
        b.hard_link(
            &hello,
            "share/doc/hello/LICENSE",
            &hello,
            "share/doc/hello/COPYING",
        );
        b.hard_link(
            &hello,
            "share/doc/busybox-LICENSE",
            &busybox,
            "share/doc/LICENSE",
        );
        b.file(
            &hello,
            &format!("share/doc/hello/{}", "n".repeat(255)),
            b"long name\n",
            false,
        );
        b.file(
            &hello,
            "share/doc/hello/\u{fc}n\u{ef}c\u{f6}d\u{e9}.txt",
            b"utf-8 name\n",
            false,
        );
        b.symlink(
            &hello,
            "share/dangling",
            &format!("{}/does-not-exist", b.logical(&glibc)),
        );
        b.symlink(
            &hello,
            "share/libc",
            &format!("{}/lib/libc.so.6", b.logical(&glibc)),
        );
        b.file(
            &hello,
            "share/blocks.bin",
            &pseudo_random_bytes(2, 3 * 131_072 + 17),
            false,
        );

        let config = b.path("config.json", File);
        b.file(&config, "", b"{\"answer\": 42}\n", false);

        let current = b.path("current-hello", Symlink);
        b.symlink(&current, "", &b.logical(&hello));

        let outside = b.path("outside-1.0", Directory);
        b.file(&outside, "README", b"on disk, in no closure\n", false);

        let toplevel = b.path("nixos-system-guest", Directory);
        let init = format!(
            "#!{}/bin/sh\n# config: {}\nexec {}/bin/hello\n",
            b.logical(&busybox),
            b.logical(&config),
            b.logical(&hello)
        );
        b.file(&toplevel, "init", init.as_bytes(), true);
        b.symlink(&toplevel, "sw", &b.logical(&hello));
        b.symlink(&toplevel, "current", &b.logical(&current));
        (b, toplevel)
    }

    /// The physical store directory (what `--store-dir` takes).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// A scratch directory beside the store that the test may use, removed with the store.
    pub fn scratch(&self) -> &Path {
        self.temp.path()
    }

    /// The closure of the roots given to `finish`, written as exportReferencesGraph JSON.
    pub fn closure_json(&self) -> &Path {
        &self.closure_json
    }

    pub fn closure(&self) -> &Closure {
        &self.closure
    }

    pub fn roots(&self) -> &[StorePath] {
        &self.roots
    }

    /// Every store path on disk, in a closure or not.
    pub fn all_paths(&self) -> &BTreeSet<StorePath> {
        &self.all_paths
    }

    /// The store path the testkit made for `name`.
    pub fn path(&self, name: &str) -> StorePath {
        let p = store_path_for(name);
        assert!(
            self.all_paths.contains(&p),
            "no synthetic store path named {name}"
        );
        p
    }

    /// `/nix/store/<hash>-<name>` of a path.
    pub fn logical(&self, p: &StorePath) -> String {
        StoreDir::default().display(p)
    }

    /// Where a path is on disk.
    pub fn physical(&self, p: &StorePath) -> PathBuf {
        self.store_dir.join(p.base_name())
    }

    /// The closure of `roots`, with references found by scanning like Nix.
    pub fn closure_of(&self, roots: &[StorePath]) -> Closure {
        let mut infos: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
        let mut todo: Vec<StorePath> = roots.to_vec();
        while let Some(p) = todo.pop() {
            if infos.contains_key(&p) {
                continue;
            }
            let physical = self.physical(&p);
            let (nar_hash, nar_size) = hash_path(&physical).unwrap();
            let scanner = dump_path(
                &physical,
                ReferenceScanner::new(self.all_paths.iter().cloned()),
            )
            .unwrap();
            let references = scanner.into_found();
            todo.extend(references.iter().cloned());
            let mut info = PathInfo::new(p.clone());
            info.nar_hash = Some(nar_hash);
            info.nar_size = Some(nar_size);
            info.references = references;
            infos.insert(p, info);
        }
        Closure::new(StoreDir::default(), infos.into_values().collect()).unwrap()
    }

    /// Writes the closure of `roots` to `file` as exportReferencesGraph JSON (sorted by path).
    pub fn write_closure_json(&self, roots: &[StorePath], file: &Path) {
        let closure = self.closure_of(roots);
        let entries: Vec<serde_json::Value> = closure
            .iter()
            .map(|i| {
                serde_json::json!({
                    "path": closure.display(&i.path),
                    "narHash": i.nar_hash.map(|h| h.to_nix32()),
                    "narSize": i.nar_size,
                    "references": i.references.iter().map(|r| closure.display(r)).collect::<Vec<_>>(),
                    "closureSize": closure.nar_size_of(&closure.requisites([i.path.clone()]).unwrap()),
                    "valid": true,
                })
            })
            .collect();
        fs::write(file, serde_json::to_string_pretty(&entries).unwrap()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tricky_store_has_the_expected_graph() {
        let s = SyntheticStore::tricky();
        let c = s.closure();
        let name = |n: &str| s.path(n);
        assert!(!c.contains(&name("outside-1.0")));
        assert_eq!(c.len(), 6);
        assert_eq!(c.roots(), BTreeSet::from([name("nixos-system-guest")]));
        let hello = c.get(&name("hello-2.12.1")).unwrap();
        assert_eq!(
            hello.references,
            BTreeSet::from([name("busybox-1.36.1"), name("glibc-2.40")])
        );
        let current = c.get(&name("current-hello")).unwrap();
        assert_eq!(current.references, BTreeSet::from([name("hello-2.12.1")]));
        let reread = Closure::from_json(
            &fs::read_to_string(s.closure_json()).unwrap(),
            None,
            &StoreDir::default(),
        )
        .unwrap();
        assert_eq!(
            reread.iter().collect::<Vec<_>>(),
            c.iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn is_the_same_on_every_run() {
        let a = SyntheticStore::tricky();
        let b = SyntheticStore::tricky();
        assert_eq!(
            fs::read(a.closure_json()).unwrap(),
            fs::read(b.closure_json()).unwrap()
        );
    }
}
