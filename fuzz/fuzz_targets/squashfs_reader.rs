//! Fuzz target: the squashfs reader (backhand behind our bounds checks) plus NAR hashing of
//! every root entry, on arbitrary bytes. Any panic or abort is a bug: hostile images must give
//! an error value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storedisk_verifier::{inventory_of, ImageFormat, Limits};

fuzz_target!(|data: &[u8]| {
    // Inputs without the magic stop at format detection; keep the fuzzer on the squashfs path.
    if storedisk_verifier::detect_format(data).ok() != Some(ImageFormat::Squashfs) {
        return;
    }
    if let Err(e) = inventory_of(data, &Limits::for_fuzzing()) {
        assert!(e.is_image_error(), "unexpected error kind: {e}");
        assert!(
            !e.to_string().contains("library panic"),
            "a reader library panicked: {e}"
        );
    }
});
