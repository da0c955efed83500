//! Framing: file headers and `len | kind | flags | crc32 | payload` frames.

use super::{ImageError, Result, FORMAT_VERSION};

pub const MAGIC: &[u8; 4] = b"MCRi";
pub const FILE_HEADER_LEN: usize = 8;
pub const FRAME_HEADER_LEN: usize = 12;

pub const FILE_INVENTORY: (&str, u16) = ("inventory", 1);
pub const FILE_CORE: (&str, u16) = ("core", 2);
pub const FILE_PAGES: (&str, u16) = ("pages", 3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    Inventory = 1,
    Process = 2,
    PageChunk = 3,
    Pipe = 4,
    Shmem = 5,
    Zombie = 6,
    UnixSocket = 7,
    Pty = 8,
    InetSocket = 9,
    End = 0xffff,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Inventory,
            2 => Self::Process,
            3 => Self::PageChunk,
            4 => Self::Pipe,
            5 => Self::Shmem,
            6 => Self::Zombie,
            7 => Self::UnixSocket,
            8 => Self::Pty,
            9 => Self::InetSocket,
            0xffff => Self::End,
            _ => return None,
        })
    }
}

pub fn file_header(kind: u16) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&kind.to_le_bytes());
    h
}

/// Frame header for a payload made of `parts` (concatenated).
pub fn frame_header(kind: FrameKind, flags: u16, parts: &[&[u8]]) -> [u8; FRAME_HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..8]);
    for p in parts {
        crc.update(p);
    }
    h[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// One checked frame, borrowed from the file's bytes.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub kind: FrameKind,
    pub payload: &'a [u8],
    /// Where the payload starts in the file.
    pub offset: u64,
}

/// A frame as found, before its crc was checked.
struct RawFrame<'a> {
    at: usize,
    kind: u16,
    flags: u16,
    crc: u32,
    header: &'a [u8],
    payload: &'a [u8],
}

/// Checks a whole file: header, every frame's length and crc (on `workers` threads: a
/// pages file is mostly crc work), and the end frame. Returns the frames before the end.
pub fn check_file<'a>(
    path: &str,
    bytes: &'a [u8],
    expect: (&'static str, u16),
    workers: usize,
) -> Result<Vec<Frame<'a>>> {
    if bytes.len() < FILE_HEADER_LEN || &bytes[..4] != MAGIC {
        return Err(ImageError::BadMagic { path: path.into() });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version > FORMAT_VERSION {
        return Err(ImageError::NewerVersion {
            path: path.into(),
            found: version,
        });
    }
    if version == 0 {
        return Err(corrupt(path, 4, "format version 0"));
    }
    if version < FORMAT_VERSION {
        return Err(ImageError::OlderVersion {
            path: path.into(),
            found: version,
        });
    }
    let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
    if kind != expect.1 {
        return Err(ImageError::WrongFile {
            path: path.into(),
            expected: expect.0,
            found: kind,
        });
    }
    let mut raw = Vec::new();
    let mut off = FILE_HEADER_LEN;
    loop {
        if bytes.len() - off < FRAME_HEADER_LEN {
            return Err(corrupt(path, off as u64, "truncated: no end frame"));
        }
        let h = &bytes[off..off + FRAME_HEADER_LEN];
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
        let start = off + FRAME_HEADER_LEN;
        if bytes.len() - start < len {
            return Err(corrupt(
                path,
                off as u64,
                &format!("frame of {len} bytes runs past the end"),
            ));
        }
        let f = RawFrame {
            at: off,
            kind: u16::from_le_bytes([h[4], h[5]]),
            flags: u16::from_le_bytes([h[6], h[7]]),
            crc: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")),
            header: &h[..8],
            payload: &bytes[start..start + len],
        };
        off = start + len;
        let end = f.kind == FrameKind::End as u16;
        raw.push(f);
        if end {
            break;
        }
    }
    crate::par::for_each(
        &raw,
        workers,
        || (),
        |_, f| {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(f.header);
            hasher.update(f.payload);
            if hasher.finalize() == f.crc {
                Ok(())
            } else {
                Err(f.at)
            }
        },
    )
    .map_err(|at| corrupt(path, at as u64, "crc mismatch"))?;
    let end = raw.pop().expect("the loop ends on an end frame");
    let count = <[u8; 8]>::try_from(end.payload)
        .map(u64::from_le_bytes)
        .map_err(|_| corrupt(path, end.at as u64, "bad end frame"))?;
    if count != raw.len() as u64 {
        return Err(corrupt(
            path,
            end.at as u64,
            &format!("end frame counts {count} frames, found {}", raw.len()),
        ));
    }
    if off != bytes.len() {
        return Err(corrupt(path, off as u64, "bytes after the end frame"));
    }
    raw.into_iter()
        .map(|f| {
            let kind = FrameKind::from_u16(f.kind).ok_or_else(|| {
                corrupt(path, f.at as u64, &format!("unknown frame kind {}", f.kind))
            })?;
            if f.flags != 0 {
                return Err(corrupt(
                    path,
                    f.at as u64,
                    &format!("unknown frame flags {:#x}", f.flags),
                ));
            }
            Ok(Frame {
                kind,
                payload: f.payload,
                offset: (f.at + FRAME_HEADER_LEN) as u64,
            })
        })
        .collect()
}

pub fn corrupt(path: &str, offset: u64, what: &str) -> ImageError {
    ImageError::Corrupt {
        path: path.into(),
        offset,
        what: what.into(),
    }
}
