//! Image format v1: an image directory is three files, each a magic header then frames.
//!
//! ```text
//! file   := magic "MCRi" | version u16 | file kind u16 | frame* | end frame
//! frame  := len u32 | kind u16 | flags u16 | crc32 u32 | payload[len]
//! ```
//! All integers are little-endian; the crc covers len, kind, flags and the payload. The
//! end frame counts the frames before it, so a file cut at a frame boundary is caught too.
//!
//! - `inventory`: one [`Inventory`](crate::model::Inventory) record.
//! - `core`: one [`ProcessImage`](crate::model::ProcessImage) record per process.
//! - `pages`: page chunks, see [`pages`].
//!
//! A reader checks every byte of all three (magic, version, lengths, crcs, records)
//! before it returns anything, so restore never acts on a damaged image.

mod codec;
mod frame;
pub mod pages;
mod read;
mod write;

pub use frame::{FrameKind, FILE_CORE, FILE_INVENTORY, FILE_PAGES};
pub use pages::{Compression, PageChunk};
pub use read::Image;
pub use write::{ImageWriter, WriteStats, CHUNK_PREFIX};

/// The format this build writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Image features this build understands (see `Inventory::features`).
pub const KNOWN_FEATURES: &[&str] = &["single-process", "zstd-pages"];

/// What went wrong with an image, naming the file and where.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an mcr image file (bad magic)")]
    BadMagic { path: String },
    #[error("{path}: image format version {found} is newer than this mcr reads ({FORMAT_VERSION}); use a newer mcr")]
    NewerVersion { path: String, found: u16 },
    #[error("{path}: expected a {expected} file, found kind {found}")]
    WrongFile {
        path: String,
        expected: &'static str,
        found: u16,
    },
    #[error("{path}: corrupt at byte {offset}: {what}")]
    Corrupt {
        path: String,
        offset: u64,
        what: String,
    },
    #[error("image uses feature {0:?}, which this mcr does not know")]
    UnknownFeature(String),
    #[error("{dir}: images directory {what}")]
    Directory { dir: String, what: String },
}

pub type Result<T> = std::result::Result<T, ImageError>;
