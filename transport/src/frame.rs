//! Writing and reading frames over any byte stream.

use crate::compress::{self, Compression, Rates};
use crate::{io, Result, TransportError, FLAG_ZSTD, HEADER_LEN, KIND_END, MAX_PAYLOAD};
use std::io::{Read, Write};
use std::time::Instant;

fn header(len: usize, kind: u16, flags: u16, seq: u32, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..12]);
    crc.update(payload);
    h[12..].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// What a writer sent so far.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SendStats {
    pub frames: u32,
    /// Payload bytes before compression, and on the wire (headers included).
    pub payload_bytes: u64,
    pub wire_bytes: u64,
    pub compressed_frames: u32,
}

/// Sends frames on `W`, numbering them, compressing per [`Compression`].
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u32,
    compression: Compression,
    rates: Rates,
    stats: SendStats,
    /// Names the stream in errors ("to unix:/run/x", say).
    name: String,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, compression: Compression, name: impl Into<String>) -> Self {
        Self {
            inner,
            seq: 0,
            compression,
            rates: Rates::default(),
            stats: SendStats::default(),
            name: name.into(),
        }
    }

    /// Sends one frame of `kind` (anything but [`KIND_END`]).
    pub fn send(&mut self, kind: u16, payload: &[u8]) -> Result<()> {
        assert_ne!(kind, KIND_END, "the end frame is sent by finish");
        self.send_frame(kind, payload)
    }

    fn send_frame(&mut self, kind: u16, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(TransportError::TooLarge { len: payload.len() });
        }
        let packed = compress::compress(payload, self.compression, &mut self.rates);
        let (body, flags) = match &packed {
            Some(c) => (&c[..], FLAG_ZSTD),
            None => (payload, 0),
        };
        let h = header(body.len(), kind, flags, self.seq, body);
        let t = Instant::now();
        self.inner
            .write_all(&h)
            .and_then(|_| self.inner.write_all(body))
            .map_err(|e| io(format!("sending frame {} {}", self.seq, self.name), e))?;
        self.rates.link_took(HEADER_LEN + body.len(), t.elapsed());
        self.seq += 1;
        self.stats.frames += 1;
        self.stats.payload_bytes += payload.len() as u64;
        self.stats.wire_bytes += (HEADER_LEN + body.len()) as u64;
        self.stats.compressed_frames += packed.is_some() as u32;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.inner
            .flush()
            .map_err(|e| io(format!("flushing {}", self.name), e))
    }

    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Ends the stream with its end frame and returns the stream.
    pub fn finish(mut self) -> Result<(W, SendStats)> {
        let count = (self.seq as u64).to_le_bytes();
        let c = std::mem::replace(&mut self.compression, Compression::Off);
        self.send_frame(KIND_END, &count)?;
        self.compression = c;
        self.flush()?;
        Ok((self.inner, self.stats))
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// One frame received: its kind and payload (decompressed).
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Receives frames from `R`, checking each one's number, length and crc.
pub struct FrameReader<R: Read> {
    inner: R,
    seq: u32,
    buf: Vec<u8>,
    plain: Vec<u8>,
    ended: bool,
    name: String,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, name: impl Into<String>) -> Self {
        Self {
            inner,
            seq: 0,
            buf: Vec::new(),
            plain: Vec::new(),
            ended: false,
            name: name.into(),
        }
    }

    /// Frames received so far (the end frame not counted).
    pub fn frames(&self) -> u32 {
        self.seq
    }

    /// The next frame, or None once the end frame came (and on every call after).
    pub fn recv(&mut self) -> Result<Option<Frame<'_>>> {
        if self.ended {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        match read_full(&mut self.inner, &mut h) {
            Ok(0) => {
                return Err(TransportError::Truncated {
                    frames: self.seq,
                    partial: false,
                })
            }
            Ok(n) if n < HEADER_LEN => {
                return Err(TransportError::Truncated {
                    frames: self.seq,
                    partial: true,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(io(format!("receiving frame {} {}", self.seq, self.name), e)),
        }
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let len = word(0) as usize;
        let kind = u16::from_le_bytes([h[4], h[5]]);
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let seq = word(8);
        let crc = word(12);
        if len > MAX_PAYLOAD {
            return Err(TransportError::TooLarge { len });
        }
        self.buf.resize(len, 0);
        match read_full(&mut self.inner, &mut self.buf) {
            Ok(n) if n < len => {
                return Err(TransportError::Truncated {
                    frames: self.seq,
                    partial: true,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(io(format!("receiving frame {} {}", self.seq, self.name), e)),
        }
        let mut c = crc32fast::Hasher::new();
        c.update(&h[..12]);
        c.update(&self.buf);
        if c.finalize() != crc {
            // The header itself may be what was damaged: name the frame we expected.
            return Err(TransportError::Corrupt {
                seq: self.seq,
                what: "crc mismatch".into(),
            });
        }
        if seq != self.seq {
            return Err(TransportError::OutOfOrder {
                expected: self.seq,
                found: seq,
            });
        }
        if flags & !FLAG_ZSTD != 0 {
            return Err(TransportError::Corrupt {
                seq,
                what: format!("unknown flags {flags:#x}"),
            });
        }
        if kind == KIND_END {
            let count = <[u8; 8]>::try_from(&self.buf[..])
                .map(u64::from_le_bytes)
                .map_err(|_| TransportError::Corrupt {
                    seq,
                    what: "bad end frame".into(),
                })?;
            if count != seq as u64 {
                return Err(TransportError::Corrupt {
                    seq,
                    what: format!("end frame counts {count} frames, {seq} came"),
                });
            }
            self.ended = true;
            return Ok(None);
        }
        self.seq += 1;
        let payload = if flags & FLAG_ZSTD != 0 {
            self.plain = compress::decompress(&self.buf, MAX_PAYLOAD)
                .map_err(|what| TransportError::Corrupt { seq, what })?;
            &self.plain[..]
        } else {
            &self.buf[..]
        };
        Ok(Some(Frame { kind, seq, payload }))
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns how much came.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frames: &[(u16, Vec<u8>)], c: Compression) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), c, "test");
        for (k, p) in frames {
            w.send(*k, p).unwrap();
        }
        w.finish().unwrap().0
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u16, Vec<u8>)>> {
        let mut r = FrameReader::new(bytes, "test");
        let mut out = Vec::new();
        while let Some(f) = r.recv()? {
            out.push((f.kind, f.payload.to_vec()));
        }
        Ok(out)
    }

    fn sample() -> Vec<(u16, Vec<u8>)> {
        vec![
            (1, b"hello".to_vec()),
            (2, vec![]),
            (3, vec![7u8; 300_000]),
            (
                4,
                (0..100_000u32)
                    .flat_map(|i| (i * 2654435761).to_le_bytes())
                    .collect(),
            ),
        ]
    }

    #[test]
    fn round_trips_raw_and_compressed() {
        for c in [
            Compression::Off,
            Compression::Always(1),
            Compression::Auto(3),
        ] {
            let bytes = stream(&sample(), c);
            assert_eq!(read_all(&bytes).unwrap(), sample(), "{c:?}");
        }
        let mut w = FrameWriter::new(Vec::new(), Compression::Always(1), "t");
        w.send(3, &[0u8; 1 << 20]).unwrap();
        let s = w.stats();
        assert_eq!(s.compressed_frames, 1);
        assert!(s.wire_bytes < 1 << 16, "{s:?}");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = stream(&sample()[..2], Compression::Off);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(read_all(&b).is_err(), "byte {i} flipped went unnoticed");
        }
        let bytes = stream(&sample()[2..3], Compression::Always(1));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                read_all(&b).is_err(),
                "compressed byte {i} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let small = vec![(1, b"hello".to_vec()), (2, vec![]), (3, vec![7u8; 3000])];
        let bytes = stream(&small, Compression::Off);
        for cut in 0..bytes.len() {
            match read_all(&bytes[..cut]) {
                Err(TransportError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn reordered_repeated_and_lost_frames_are_refused_by_number() {
        let bytes = stream(&sample()[..2], Compression::Off);
        let first = HEADER_LEN + 5;
        let (a, rest) = bytes.split_at(first);
        let (b, end) = rest.split_at(HEADER_LEN);
        let swapped = [b, a, end].concat();
        match read_all(&swapped) {
            Err(TransportError::OutOfOrder {
                expected: 0,
                found: 1,
            }) => {}
            other => panic!("{other:?}"),
        }
        let repeated = [a, a, b, end].concat();
        assert!(matches!(
            read_all(&repeated),
            Err(TransportError::OutOfOrder {
                expected: 1,
                found: 0
            })
        ));
        let lost = [b, end].concat();
        assert!(matches!(
            read_all(&lost),
            Err(TransportError::OutOfOrder { .. })
        ));
        // The end frame counts what came before it.
        let dropped_last = [a, end].concat();
        assert!(read_all(&dropped_last).is_err());
    }

    #[test]
    fn lengths_past_the_limit_are_refused_without_allocating() {
        let mut h = header(0, 1, 0, 0, &[]);
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&h), Err(TransportError::TooLarge { .. })));
    }
}
