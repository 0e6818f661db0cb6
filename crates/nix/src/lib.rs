//! The Nix store model shared by every storedisk crate: store paths, nix-base32, NAR
//! serialization and hashing, closure graphs and Nix's reference scanner.
//!
//! Invariant: this crate knows nothing about image formats, processes or the terminal. It is
//! pure functions over bytes, readers and graphs, plus reading a local directory as a NAR.

pub mod base32;
pub mod closure;
pub mod hash;
pub mod nar;
pub mod registration;
pub mod scan;
pub mod store_path;

pub use closure::{Closure, ClosureError, PathInfo};
pub use hash::{NarHash, NarHashError};
pub use nar::{NarEncoder, NarError, NarHasher};
pub use scan::ReferenceScanner;
pub use store_path::{StoreDir, StorePath, StorePathError};
