//! The tidy test: keeps ARCHITECTURE.md true ("Kept true by the tidy test" lists what it checks),
//! in the spirit of rust-analyzer's `tidy.rs`. It reads the repository as text, starts no
//! process, and fails naming each file and line that leaves the map: where processes start,
//! where `unsafe` is, printing in the libraries, testkit and Nix's settings, links that leave
//! the repository, and every file's header comment.
//!
//! Test code (`tests/` directories, `tests.rs`, modules declared under `#[cfg(test)]`, the part
//! of a file after its `#[cfg(test)]` line, and the testkit) may start processes and print.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// One text file of the repository.
#[derive(Debug)]
struct Source {
    /// Relative to the repository root, `/`-separated.
    path: String,
    text: String,
    /// The whole file is test code.
    test_only: bool,
}

impl Source {
    fn is_rust(&self) -> bool {
        self.path.ends_with(".rs")
    }

    /// The lines of code that ship, numbered from 1: none in test code, and in a file with a
    /// `#[cfg(test)]` line only those before it; comment lines left out.
    fn shipped_lines(&self) -> impl Iterator<Item = (usize, &str)> {
        let lines = if self.test_only { "" } else { &self.text };
        lines
            .lines()
            .take_while(|l| l.trim() != "#[cfg(test)]")
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| !l.trim_start().starts_with("//"))
    }

    /// Every line, numbered from 1, comment lines left out.
    fn code_lines(&self) -> impl Iterator<Item = (usize, &str)> {
        self.text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| !l.trim_start().starts_with("//"))
    }
}

/// This file: it names what the rules look for, so the rules other than its header's skip it.
const THIS_FILE: &str = "xtask/tests/tidy.rs";

/// The files the rules about code and links read: every one but this.
fn checked() -> impl Iterator<Item = &'static Source> {
    sources().iter().filter(|s| s.path != THIS_FILE)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lies in the repository")
        .to_owned()
}

/// The files the rules read: Rust, Markdown, Nix, shell, awk, Cargo manifests and `.ci/run`,
/// outside build output, VCS data, the fuzz corpus and the snapshots.
fn sources() -> &'static [Source] {
    static SOURCES: OnceLock<Vec<Source>> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let root = repo_root();
        let mut paths = Vec::new();
        walk(&root, &root, &mut paths);
        paths.sort();
        let mut sources: Vec<Source> = paths
            .into_iter()
            .map(|path| {
                let text = fs::read_to_string(root.join(&path))
                    .unwrap_or_else(|e| panic!("reading {path}: {e}"));
                let test_only = path.split('/').any(|c| c == "tests")
                    || path.ends_with("/tests.rs")
                    || path.starts_with("crates/testkit/");
                Source {
                    path,
                    text,
                    test_only,
                }
            })
            .collect();
        mark_test_modules(&mut sources);
        sources
    })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let relative = path
            .strip_prefix(root)
            .expect("below the root")
            .to_string_lossy()
            .replace('\\', "/");
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let hidden = name.starts_with('.') && name != ".ci" && name != ".cargo";
        if hidden || ["target", "golden", "fuzz/corpus", "fuzz/target"].contains(&relative.as_str())
        {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, out);
        } else if ["rs", "md", "nix", "sh", "awk", "toml"]
            .iter()
            .any(|ext| name.ends_with(&format!(".{ext}")))
            || relative == ".ci/run"
        {
            out.push(relative);
        }
    }
}

/// Marks the files of modules declared under `#[cfg(test)]` (`#[cfg(test)] mod world;`) as
/// test code, and their own child modules with them.
fn mark_test_modules(sources: &mut [Source]) {
    loop {
        let mut found = BTreeSet::new();
        for source in sources.iter().filter(|s| s.is_rust()) {
            let lines: Vec<&str> = source.text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let declared = line
                    .trim()
                    .strip_prefix("mod ")
                    .and_then(|rest| rest.strip_suffix(';'));
                let Some(name) = declared else {
                    continue;
                };
                let under_cfg_test = i > 0 && lines[i - 1].trim() == "#[cfg(test)]";
                if under_cfg_test || source.test_only {
                    let dir = module_dir(&source.path);
                    found.insert(format!("{dir}{name}.rs"));
                    found.insert(format!("{dir}{name}/mod.rs"));
                }
            }
        }
        let mut changed = false;
        for source in sources.iter_mut() {
            if !source.test_only && found.contains(&source.path) {
                source.test_only = true;
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// Where the child modules of the module in `path` live, with a trailing `/`.
fn module_dir(path: &str) -> String {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let dir = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    match file {
        "lib.rs" | "main.rs" | "mod.rs" => dir,
        _ => format!("{dir}{}/", file.trim_end_matches(".rs")),
    }
}

/// Fails listing `violations` under the rule they break.
fn check(rule: &str, violations: Vec<String>) {
    assert!(
        violations.is_empty(),
        "{rule} (ARCHITECTURE.md, \"Kept true by the tidy test\"):\n  {}",
        violations.join("\n  ")
    );
}

/// True when `word` stands in `line` as a whole identifier.
fn has_word(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// The builder's mkfs.erofs runner: the one process the builder starts and the one `unsafe`
/// block (`die_with_us`, `pre_exec`).
const MKFS_EROFS_RUNNER: &str = "crates/builder/src/erofs.rs";

/// Where a process may start, and why there: ARCHITECTURE.md says the same. Moving one (the
/// mkfs.erofs runner into a module of its own, say) changes this list and the map in the same
/// commit.
const PROCESS_STARTERS: [(&str, &str); 3] = [
    ("xtask/src/cmd.rs", "xtask's one runner"),
    ("crates/cli/src/nix_db.rs", "the storedisk binary asks Nix"),
    (MKFS_EROFS_RUNNER, "the builder runs mkfs.erofs"),
];

#[test]
fn processes_start_only_where_the_map_says() {
    let allowed: Vec<&str> = PROCESS_STARTERS.iter().map(|(path, _)| *path).collect();
    let mut violations = Vec::new();
    for source in checked().filter(|s| s.is_rust() && !allowed.contains(&s.path.as_str())) {
        for (n, line) in source.shipped_lines() {
            if ["process::Command", "Command::new(", ".spawn()"]
                .iter()
                .any(|p| line.contains(p))
            {
                violations.push(format!("{}:{n}: {}", source.path, line.trim()));
            }
        }
    }
    check(
        &format!("a process may start only in {}", allowed.join(", ")),
        violations,
    );
}

#[test]
fn unsafe_appears_only_in_the_builders_mkfs_erofs_hook() {
    let mut violations = Vec::new();
    for source in checked().filter(|s| s.is_rust() && s.path != MKFS_EROFS_RUNNER) {
        for (n, line) in source.code_lines() {
            if has_word(line, "unsafe") || line.contains("allow(unsafe_code)") {
                violations.push(format!("{}:{n}: {}", source.path, line.trim()));
            }
        }
    }
    check(
        &format!("`unsafe` only in {MKFS_EROFS_RUNNER} (die_with_us)"),
        violations,
    );
}

#[test]
fn the_libraries_do_not_print() {
    // Their code, not their examples (a bench program prints by design).
    let libraries = [
        "crates/nix/src/",
        "crates/format/src/",
        "crates/builder/src/",
        "crates/verifier/src/",
    ];
    let mut violations = Vec::new();
    for source in
        checked().filter(|s| s.is_rust() && libraries.iter().any(|l| s.path.starts_with(l)))
    {
        for (n, line) in source.shipped_lines() {
            let prints = ["print!(", "println!(", "dbg!(", "io::stdout", "io::stderr"]
                .iter()
                .any(|p| line.contains(p));
            if prints {
                violations.push(format!("{}:{n}: {}", source.path, line.trim()));
            }
        }
    }
    check(
        "the libraries do not print: the CLI and xtask do (progress goes through ProgressSink)",
        violations,
    );
}

#[test]
fn testkit_stays_out_of_the_shipped_crates_and_nix_settings_are_written_once() {
    let mut violations = Vec::new();
    for krate in ["nix", "format", "builder", "verifier", "cli"] {
        let manifest = format!("crates/{krate}/Cargo.toml");
        let source = sources()
            .iter()
            .find(|s| s.path == manifest)
            .unwrap_or_else(|| panic!("{manifest} is missing"));
        let mut section = "";
        for (n, line) in source.text.lines().enumerate() {
            if line.starts_with('[') {
                section = line.trim();
            } else if section == "[dependencies]" && line.starts_with("storedisk-testkit") {
                violations.push(format!("{manifest}:{}: {line}", n + 1));
            }
        }
    }
    for source in checked().filter(|s| s.is_rust()) {
        for (n, line) in source.code_lines() {
            // A settings string of its own (`"experimental-features = ...`); adding to the one
            // (`format!("{}\nextra-...", NIX_CONFIG)`) is not writing it again.
            if line.contains("\"experimental-features =")
                && source.path != "crates/testkit/src/tools.rs"
            {
                violations.push(format!("{}:{n}: {}", source.path, line.trim()));
            }
        }
    }
    check(
        "storedisk-testkit is no [dependencies] entry of a shipped crate, and Nix's settings are \
         testkit's NIX_CONFIG only",
        violations,
    );
}

/// `path` joined to `base` (a directory relative to the root), `..` resolved; `None` when it
/// climbs out of the repository.
fn resolve(base: &str, path: &str) -> Option<String> {
    let mut parts: Vec<String> = base
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// The targets of `[text](target)` and `[label]: target` links in Markdown.
fn markdown_links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices("](") {
            let rest = &line[at + 2..];
            if let Some(end) = rest.find(')') {
                links.push((i + 1, rest[..end].to_owned()));
            }
        }
        if let Some(rest) = line.strip_prefix('[') {
            if let Some((_, target)) = rest.split_once("]: ") {
                links.push((i + 1, target.trim().to_owned()));
            }
        }
    }
    links
}

/// `NAME.md` and `dir/name.md` mentioned in `line`.
fn markdown_mentions(line: &str) -> Vec<&str> {
    let path_char = |c: char| c.is_ascii_alphanumeric() || "_-./".contains(c);
    line.match_indices(".md")
        .filter(|(at, _)| {
            !line[at + 3..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
        })
        .map(|(at, _)| {
            let start = line[..at]
                .char_indices()
                .rev()
                .take_while(|(_, c)| path_char(*c))
                .last()
                .map_or(at, |(i, _)| i);
            &line[start..at + 3]
        })
        .collect()
}

#[test]
fn nothing_points_out_of_the_repository() {
    let files: BTreeSet<&str> = sources().iter().map(|s| s.path.as_str()).collect();
    let names: BTreeSet<&str> = files
        .iter()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .collect();
    let mut violations = Vec::new();
    for source in checked() {
        let dir = source.path.rsplit_once('/').map_or("", |(d, _)| d);
        if source.path.ends_with(".md") {
            for (n, link) in markdown_links(&source.text) {
                let target = link.split('#').next().unwrap_or_default();
                if target.is_empty() || link.contains("://") || link.starts_with("mailto:") {
                    continue;
                }
                let inside = resolve(dir, target)
                    .filter(|t| files.contains(t.as_str()) || repo_root().join(t).is_dir());
                if inside.is_none() {
                    violations.push(format!("{}:{n}: link to {link}", source.path));
                }
            }
        }
        for (n, line) in source.text.lines().enumerate() {
            // The checkout this project was written in: a path no clone has.
            if line.contains("/work/") {
                violations.push(format!("{}:{}: {}", source.path, n + 1, line.trim()));
            }
            for mention in markdown_mentions(line) {
                let mention = mention.trim_start_matches("./");
                let named = if mention.contains('/') {
                    mention.starts_with("target/")
                        || resolve(dir, mention).is_some_and(|m| files.contains(m.as_str()))
                        || files.contains(mention)
                } else {
                    // Generated reports (summary.md, bench.md) are lower case; documents are
                    // upper case and must be in the repository.
                    !mention.starts_with(|c: char| c.is_ascii_uppercase())
                        || names.contains(mention)
                };
                if !named {
                    violations.push(format!("{}:{}: {mention}", source.path, n + 1));
                }
            }
        }
    }
    check(
        "links and document names resolve inside the repository (a clone has nothing beside it)",
        violations,
    );
}

#[test]
fn every_file_says_what_it_is_for() {
    let mut violations = Vec::new();
    for source in sources() {
        let first = source
            .text
            .lines()
            .find(|l| !l.starts_with("#!") && !l.trim().is_empty())
            .unwrap_or_default();
        let header = if source.is_rust() {
            Some("//!")
        } else if [".nix", ".sh", ".awk"]
            .iter()
            .any(|ext| source.path.ends_with(ext))
            || source.path == ".ci/run"
        {
            Some("#")
        } else {
            None
        };
        if let Some(header) = header {
            if !first.starts_with(header) {
                violations.push(format!("{}: starts with {first:?}", source.path));
            }
        }
    }
    check(
        "every Rust file starts with a `//!` comment, every Nix, shell and awk file with a `#` one",
        violations,
    );
}

#[test]
fn the_rules_see_what_they_are_about() {
    // A rule over no files passes whatever the code does: the walk must find the ones the
    // rules name, and tell test code from shipped code.
    let find = |path: &str| {
        sources()
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("{path} not among the files read"))
    };
    for (path, _) in PROCESS_STARTERS {
        assert!(!find(path).test_only, "{path}");
    }
    for path in [
        "crates/verifier/src/checks/world.rs",
        "crates/verifier/src/checks/tests.rs",
        "crates/cli/src/verify_text/tests.rs",
        "crates/cli/tests/verify.rs",
        "xtask/tests/tidy.rs",
    ] {
        assert!(find(path).test_only, "{path} is test code");
    }
    for path in [
        "crates/verifier/src/checks/ways_in.rs",
        "xtask/src/vm_test/host.rs",
        "README.md",
        "vm-tests/lib.nix",
        ".ci/run",
        "fuzz/fuzz_targets/erofs_reader.rs",
    ] {
        assert!(!find(path).test_only, "{path} is shipped");
    }
    let erofs = find(MKFS_EROFS_RUNNER);
    assert!(erofs
        .shipped_lines()
        .any(|(_, l)| l.contains("Command::new(")));
}
