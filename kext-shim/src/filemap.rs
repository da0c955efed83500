//! Read-only file mappings, so an image's pages go from the page cache to the target
//! without a copy through our heap.

use crate::{Error, Result};
use std::fs::File;

pub use memmap2::Mmap;

/// Maps `file` read-only.
///
/// The mapping stays valid only while nobody truncates the file; image files live in a
/// 0700 directory that restore owns for the duration, which is the contract here.
pub fn map_readonly(file: &File, path: &str) -> Result<Mmap> {
    // SAFETY: the mapping is read-only and private to us; the caller's contract is that
    // the image file is not truncated while mapped (a truncation would raise SIGBUS, not
    // corrupt memory).
    unsafe { memmap2::MmapOptions::new().map(file) }.map_err(|e| Error::io(path, e))
}
