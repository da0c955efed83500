//! Page chunks: a run of consecutive pages of one process, raw or zstd-compressed.
//!
//! ```text
//! chunk := pid i32 | codec u16 | reserved u16 | addr u64 | n_pages u32 | reserved u32 | data
//! ```
//! `data` is `n_pages * 4096` bytes when raw, a zstd frame otherwise, and nothing when
//! the pages are left in the source's memory (a same-host migration's round, see
//! [`crate::model::PagesInSource`]). Zero and absent pages are never stored: restore
//! leaves them to the kernel's zero fill or to the file.

use super::frame::corrupt;
use super::Result;
use kext_shim::PAGE_SIZE;

pub const CHUNK_HEADER_LEN: usize = 24;
/// Pages per chunk: large enough to amortise framing, small enough to compress in cache
/// and to skip compression chunk by chunk when it does not pay.
pub const CHUNK_PAGES: usize = 256;

const CODEC_RAW: u16 = 0;
const CODEC_ZSTD: u16 = 1;
const CODEC_IN_SOURCE: u16 = 2;

/// How a chunk holds its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
    /// Not at all: they are in the source's memory.
    InSource,
}

/// How page data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd(i32),
}

impl Compression {
    /// The level `--compress fast` means: zstd's fastest standard level.
    pub const FAST: Compression = Compression::Zstd(1);

    /// Parses `none`, `fast` or a zstd level (1..=19).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "fast" => Ok(Compression::FAST),
            n => match n.parse::<i32>() {
                Ok(l) if (1..=19).contains(&l) => Ok(Compression::Zstd(l)),
                _ => Err(format!("{s:?}: expected none, fast or a zstd level 1..19")),
            },
        }
    }
}

/// One decoded chunk header with its (possibly compressed) data.
#[derive(Debug, Clone, Copy)]
pub struct PageChunk<'a> {
    pub pid: i32,
    pub addr: u64,
    pub n_pages: u32,
    pub codec: Codec,
    pub data: &'a [u8],
}

impl PageChunk<'_> {
    pub fn len_bytes(&self) -> usize {
        self.n_pages as usize * PAGE_SIZE as usize
    }

    /// The raw page bytes: borrowed when stored raw, decompressed into `buf` otherwise.
    pub fn pages<'b>(&'b self, buf: &'b mut Vec<u8>) -> std::result::Result<&'b [u8], String> {
        match self.codec {
            Codec::Raw => return Ok(self.data),
            Codec::Zstd => {}
            Codec::InSource => {
                return Err("its pages are not in the image but in the source's memory".into())
            }
        }
        thread_local! {
            // As for compression: a context per chunk cost more than small chunks.
            static CTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        buf.clear();
        buf.resize(self.len_bytes(), 0);
        let n = CTX.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
            }
            let z = c.as_mut().expect("made above");
            z.decompress_to_buffer(self.data, &mut buf[..])
                .map_err(|e| e.to_string())
        })?;
        buf.truncate(n);
        if buf.len() != self.len_bytes() {
            return Err(format!(
                "decompressed to {} bytes, expected {}",
                buf.len(),
                self.len_bytes()
            ));
        }
        Ok(&buf[..])
    }
}

/// Encodes a chunk header.
pub fn chunk_header(pid: i32, addr: u64, n_pages: u32, codec: Codec) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&pid.to_le_bytes());
    let codec = match codec {
        Codec::Raw => CODEC_RAW,
        Codec::Zstd => CODEC_ZSTD,
        Codec::InSource => CODEC_IN_SOURCE,
    };
    h[4..6].copy_from_slice(&codec.to_le_bytes());
    h[8..16].copy_from_slice(&addr.to_le_bytes());
    h[16..20].copy_from_slice(&n_pages.to_le_bytes());
    h
}

/// Bytes compressed first to judge whether a chunk is worth compressing at all.
const SAMPLE: usize = 16 << 10;

/// Compresses `raw` if that saves at least an eighth; None when raw storage is better.
/// Incompressible memory (most of a real heap) costs only a sample's worth of work.
pub fn compress(raw: &[u8], c: Compression) -> Option<Vec<u8>> {
    let Compression::Zstd(level) = c else {
        return None;
    };
    thread_local! {
        // A context per call cost more than compressing a small image (its tables are
        // allocated and cleared each time): one per thread and level, kept.
        static CTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    CTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, z) = c.as_mut()?;
        if raw.len() > 4 * SAMPLE {
            let s = z.compress(&raw[..SAMPLE]).ok()?;
            if s.len() >= SAMPLE - SAMPLE / 8 {
                return None;
            }
        }
        let out = z.compress(raw).ok()?;
        (out.len() < raw.len() - raw.len() / 8).then_some(out)
    })
}

/// Decodes and checks a chunk payload (the frame crc was already checked).
pub fn parse_chunk<'a>(path: &str, offset: u64, payload: &'a [u8]) -> Result<PageChunk<'a>> {
    if payload.len() < CHUNK_HEADER_LEN {
        return Err(corrupt(path, offset, "page chunk shorter than its header"));
    }
    let h = &payload[..CHUNK_HEADER_LEN];
    let pid = i32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let codec = u16::from_le_bytes([h[4], h[5]]);
    let addr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let n_pages = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let data = &payload[CHUNK_HEADER_LEN..];
    let codec = match codec {
        CODEC_RAW => Codec::Raw,
        CODEC_ZSTD => Codec::Zstd,
        CODEC_IN_SOURCE => Codec::InSource,
        _ => {
            return Err(corrupt(
                path,
                offset,
                &format!("unknown page codec {codec}"),
            ))
        }
    };
    let chunk = PageChunk {
        pid,
        addr,
        n_pages,
        codec,
        data,
    };
    if addr % PAGE_SIZE != 0
        || n_pages == 0
        || addr.checked_add(n_pages as u64 * PAGE_SIZE).is_none()
    {
        return Err(corrupt(
            path,
            offset,
            &format!("bad page run {addr:#x} x {n_pages}"),
        ));
    }
    let holds = match codec {
        Codec::Raw => chunk.len_bytes(),
        Codec::InSource => 0,
        Codec::Zstd => data.len(),
    };
    if data.len() != holds {
        return Err(corrupt(
            path,
            offset,
            &format!(
                "{codec:?} chunk holds {} bytes for {n_pages} pages",
                data.len()
            ),
        ));
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_only_when_it_pays() {
        let zeros = vec![0u8; 65536];
        assert!(compress(&zeros, Compression::FAST).is_some());
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&noise, Compression::FAST).is_none());
        assert!(compress(&zeros, Compression::None).is_none());
    }

    #[test]
    fn parses_levels() {
        assert_eq!(Compression::parse("none").unwrap(), Compression::None);
        assert_eq!(Compression::parse("fast").unwrap(), Compression::Zstd(1));
        assert_eq!(Compression::parse("9").unwrap(), Compression::Zstd(9));
        assert!(Compression::parse("0").is_err());
        assert!(Compression::parse("fastest").is_err());
    }
}
