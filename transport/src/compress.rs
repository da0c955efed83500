//! zstd per frame, only where it pays: on a payload that compresses (judged on a
//! sample first, so incompressible memory costs a sample's worth of work) and on a link
//! slower than the compressor (judged from what each side measured so far).

use std::time::{Duration, Instant};

/// How a writer compresses its payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Off,
    /// Whenever the payload shrinks by an eighth.
    Always(i32),
    /// When it shrinks, and the time compressing costs is less than the time the
    /// smaller frame saves on this link.
    Auto(i32),
}

/// Bytes compressed first to judge a payload.
const SAMPLE: usize = 16 << 10;

/// What the writer has measured: how fast the link took bytes and how fast zstd made
/// them, both as moving averages.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rates {
    /// Bytes a second the link accepted (writes timed, backpressure included).
    pub link: Option<f64>,
    /// Input bytes a second the compressor took.
    pub compressor: Option<f64>,
}

impl Rates {
    fn mix(old: Option<f64>, sample: f64) -> Option<f64> {
        Some(match old {
            None => sample,
            Some(o) => o * 0.8 + sample * 0.2,
        })
    }

    pub(crate) fn link_took(&mut self, bytes: usize, t: Duration) {
        // Writes that only filled a socket buffer say little; count them anyway, the
        // buffer fills soon and then writes take what the link takes.
        let secs = t.as_secs_f64().max(1e-7);
        self.link = Self::mix(self.link, bytes as f64 / secs);
    }

    fn compressor_took(&mut self, bytes: usize, t: Duration) {
        let secs = t.as_secs_f64().max(1e-7);
        self.compressor = Self::mix(self.compressor, bytes as f64 / secs);
    }
}

/// The compressed payload if it is worth sending instead of `raw`.
pub fn compress(raw: &[u8], c: Compression, rates: &mut Rates) -> Option<Vec<u8>> {
    let (level, auto) = match c {
        Compression::Off => return None,
        Compression::Always(l) => (l, false),
        Compression::Auto(l) => (l, true),
    };
    let mut saved = 1.0;
    if raw.len() > 4 * SAMPLE {
        let t = Instant::now();
        let s = zstd::bulk::compress(&raw[..SAMPLE], level).ok()?;
        rates.compressor_took(SAMPLE, t.elapsed());
        saved = 1.0 - s.len() as f64 / SAMPLE as f64;
        if saved < 0.125 {
            return None;
        }
    }
    if auto {
        if let (Some(link), Some(comp)) = (rates.link, rates.compressor) {
            // Compressing n bytes costs n/comp; it saves saved*n/link on the wire.
            if saved * comp < link {
                return None;
            }
        }
    }
    let t = Instant::now();
    let out = zstd::bulk::compress(raw, level).ok()?;
    rates.compressor_took(raw.len(), t.elapsed());
    (out.len() < raw.len() - raw.len() / 8).then_some(out)
}

/// Decompresses a payload that must come to at most `max` bytes.
pub fn decompress(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let size = zstd::zstd_safe::get_frame_content_size(data)
        .map_err(|_| "not a zstd frame".to_string())?
        .ok_or("zstd frame without its size")?;
    if size > max as u64 {
        return Err(format!("decompresses to {size} bytes, more than {max}"));
    }
    let out = zstd::bulk::decompress(data, size as usize).map_err(|e| e.to_string())?;
    if out.len() as u64 != size {
        return Err(format!(
            "decompressed to {} bytes, its header says {size}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn skips_what_does_not_shrink_and_links_faster_than_zstd() {
        let mut r = Rates::default();
        assert!(compress(&noise(1 << 20), Compression::Always(1), &mut r).is_none());
        let zeros = vec![0u8; 1 << 20];
        assert!(compress(&zeros, Compression::Always(1), &mut r).is_some());
        assert!(compress(&zeros, Compression::Off, &mut r).is_none());
        // A link far faster than the compressor: not worth it.
        r.link = Some(1e15);
        assert!(compress(&zeros, Compression::Auto(1), &mut r).is_none());
        assert!(compress(&zeros, Compression::Always(1), &mut r).is_some());
        // A slow one: worth it.
        r.link = Some(1e6);
        assert!(compress(&zeros, Compression::Auto(1), &mut r).is_some());
    }

    #[test]
    fn decompression_is_bounded() {
        let mut r = Rates::default();
        let zeros = vec![0u8; 1 << 20];
        let c = compress(&zeros, Compression::Always(3), &mut r).unwrap();
        assert_eq!(decompress(&c, 1 << 20).unwrap(), zeros);
        assert!(decompress(&c, (1 << 20) - 1)
            .unwrap_err()
            .contains("more than"));
        assert!(decompress(b"not zstd", 100).is_err());
    }
}
