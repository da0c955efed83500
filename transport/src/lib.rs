#![forbid(unsafe_code)]
//! Moving a migration's bytes between two ends as typed, checked frames.
//!
//! ```text
//! frame := len u32 | kind u16 | flags u16 | seq u32 | crc32 u32 | payload[len]
//! ```
//! Little-endian. `seq` counts frames from 0, so a frame lost, repeated or reordered is
//! refused by number; the crc covers the header (without itself) and the payload as
//! sent; flag [`FLAG_ZSTD`] marks a payload compressed with zstd (see [`compress`]).
//! A stream ends with an [`KIND_END`] frame counting the frames before it: a stream cut
//! at a frame boundary is told from one that ended.
//!
//! This crate knows frames, not processes: what a kind means is the caller's.
//! [`endpoint`] makes the byte streams (unix and TCP sockets, files); pipes and
//! anything else that reads or writes serve as they are.

pub mod compress;
pub mod endpoint;
mod frame;

pub use compress::Compression;
pub use endpoint::{Addr, Listener, Stream};
pub use frame::{Frame, FrameReader, FrameWriter, SendStats};

/// Bytes before each payload.
pub const HEADER_LEN: usize = 16;
/// The payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1;
/// The kind of the frame that ends a stream; its payload is the count of frames before.
pub const KIND_END: u16 = 0xffff;
/// The largest payload either end accepts, before and after decompression: a length
/// past it is corruption, not a reason to allocate.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What went wrong on a stream, naming the frame.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("frame {seq}: {what}")]
    Corrupt { seq: u32, what: String },
    #[error("frame {found} arrived where frame {expected} was due (lost, repeated or reordered)")]
    OutOfOrder { expected: u32, found: u32 },
    #[error("the stream ended without its end frame, after {frames} frames{}", if *.partial { " and part of another" } else { "" })]
    Truncated { frames: u32, partial: bool },
    #[error("a frame of {len} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge { len: usize },
    #[error("{0}")]
    BadAddress(String),
}

pub type Result<T> = std::result::Result<T, TransportError>;

pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> TransportError {
    TransportError::Io {
        what: what.into(),
        source,
    }
}
