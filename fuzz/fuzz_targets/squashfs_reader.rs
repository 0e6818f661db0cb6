//! Fuzz target: the squashfs reader (backhand behind our bounds checks) plus NAR hashing of
//! every root entry, on arbitrary bytes. Any panic or abort is a bug: hostile images must give
//! an error value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storedisk_verifier::{detect_format, judge_untrusted, ImageFormat, Limits};

fuzz_target!(|data: &[u8]| {
    // Inputs without the magic stop at format detection; keep the fuzzer on the squashfs path.
    if detect_format(data).ok() == Some(ImageFormat::Squashfs) {
        if let Err(bug) = judge_untrusted(data, &Limits::for_fuzzing()) {
            panic!("{bug}");
        }
    }
});
