//! Reading what a command under test printed and left: its output as text, an assertion that
//! it succeeded that shows both streams when it did not, and a directory's entries.

use std::path::Path;
use std::process::Output;

/// Bytes a command printed, as text (invalid UTF-8 replaced).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with the exit status, stdout and stderr unless the command succeeded.
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "the command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// The names in `dir`, sorted: for checking that nothing (an output, a temp file) was left
/// behind, or that two builds wrote the same files.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
