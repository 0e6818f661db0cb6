//! The verifier hashes store paths on several threads: its inventory (and, on a corrupt image,
//! the error it reports) must not depend on the thread count or on timing. Images of the
//! tricky synthetic store in both formats, intact and with seeded corruption of their data,
//! are inventoried with 1 to 5 threads and the answers compared.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::path::Path;

use storedisk_builder::{build_image, BuildOptions, ImageFormat, NoProgress};
use storedisk_testkit::{SyntheticStore, XorShift64};
use storedisk_verifier::inventory::take_inventory_with;
use storedisk_verifier::{open_image, Limits};

/// The inventory as comparable text: every path with its hash and size, or the error.
fn inventory_text(image: &[u8], threads: usize) -> String {
    let reader = match open_image(image, &Limits::default()) {
        Ok(reader) => reader,
        Err(e) => return format!("open: {e}"),
    };
    match take_inventory_with(reader.as_ref(), true, threads, &|_| {}) {
        Ok(inventory) => inventory
            .paths
            .iter()
            .map(|p| {
                format!(
                    "{} {} {} {:?}\n",
                    p.path,
                    p.nar_hash.to_nix32(),
                    p.nar_size,
                    p.references
                )
            })
            .collect(),
        Err(e) => format!("error: {e}"),
    }
}

fn build(store: &SyntheticStore, format: ImageFormat, out: &Path) -> Vec<u8> {
    let mut options = BuildOptions::new(format);
    options.store_dir = store.store_dir().to_owned();
    if format == ImageFormat::Erofs {
        options.mkfs_erofs = storedisk_testkit::newest_erofs_utils().mkfs;
    }
    build_image(store.closure(), &options, out, &NoProgress).unwrap();
    std::fs::read(out).unwrap()
}

/// The tricky synthetic store, and its image in each format.
fn tricky_images() -> (SyntheticStore, Vec<(ImageFormat, Vec<u8>)>) {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let images = [ImageFormat::Squashfs, ImageFormat::Erofs]
        .into_iter()
        .map(|format| {
            let image = build(&store, format, &work.path().join(format.name()));
            (format, image)
        })
        .collect();
    (store, images)
}

#[test]
fn inventories_and_errors_do_not_depend_on_the_thread_count() {
    let (store, images) = tricky_images();
    for (format, image) in images {
        let one = inventory_text(&image, 1);
        assert!(
            !one.starts_with("error") && !one.starts_with("open"),
            "{one}"
        );
        assert_eq!(one.lines().count(), store.closure().len(), "{one}");
        for threads in 2..=5 {
            assert_eq!(inventory_text(&image, threads), one, "{format} {threads}");
        }
        // Corrupt several spots of the data area (past the first 4 KiB of metadata): whatever
        // comes out, hashes or an error, is the same on any number of threads.
        let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20 {
            let mut mutant = image.clone();
            let span = mutant.len().saturating_sub(4096).max(1);
            for _ in 0..4 {
                let at = 4096.min(mutant.len() - 1) + (rng.next_u64() as usize % span);
                if let Some(byte) = mutant.get_mut(at) {
                    *byte ^= 0x5a;
                }
            }
            let one = inventory_text(&mutant, 1);
            for threads in [2, 4] {
                assert_eq!(inventory_text(&mutant, threads), one, "{format} {threads}");
            }
        }
    }
}

#[test]
fn progress_reports_every_byte_of_file_data_once_whatever_the_thread_count() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (_, images) = tricky_images();
    for (format, image) in images {
        let reader = open_image(&image, &Limits::default()).unwrap();
        let file_bytes = reader.tree().file_bytes();
        assert!(file_bytes > 0, "{format}: the tricky store holds file data");
        for threads in 1..=3 {
            let reported = AtomicU64::new(0);
            take_inventory_with(reader.as_ref(), false, threads, &|n| {
                reported.fetch_add(n, Ordering::Relaxed);
            })
            .unwrap();
            assert_eq!(reported.into_inner(), file_bytes, "{format} {threads}");
        }
    }
}
