//! Where a stream goes: `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.

use crate::{io, Result, TransportError};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// One end's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    /// `host:port`, resolved when used.
    Tcp(String),
    /// A file: written by the sender, read by the receiver (a stream kept for later).
    File(PathBuf),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            TransportError::BadAddress(format!(
                "{s:?}: {why} (expected unix:PATH, tcp:HOST:PORT or file:PATH)"
            ))
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(|| bad("no scheme"))?;
        if rest.is_empty() {
            return Err(bad("nothing after the scheme"));
        }
        match scheme {
            "unix" => Ok(Addr::Unix(rest.into())),
            "file" => Ok(Addr::File(rest.into())),
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad("bad host or port"));
                }
                Ok(Addr::Tcp(rest.into()))
            }
            _ => Err(bad("unknown scheme")),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    File(File),
}

impl Stream {
    /// Connects to `addr` (a file is created, 0600, and must not exist).
    pub fn connect(addr: &Addr) -> Result<Self> {
        let what = || format!("connecting to {addr}");
        Ok(match addr {
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(|e| io(what(), e))?),
            Addr::Tcp(a) => {
                let s = TcpStream::connect(resolve(a)?.as_slice()).map_err(|e| io(what(), e))?;
                // Frames are written whole; waiting to coalesce them only adds latency.
                s.set_nodelay(true).map_err(|e| io(what(), e))?;
                Stream::Tcp(s)
            }
            Addr::File(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                Stream::File(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(p)
                        .map_err(|e| io(what(), e))?,
                )
            }
        })
    }

    /// A second handle on the same stream, to read on one side and write on the other.
    pub fn try_clone(&self) -> Result<Self> {
        let e = |e| io("duplicating a stream", e);
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone().map_err(e)?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone().map_err(e)?),
            Stream::File(f) => Stream::File(f.try_clone().map_err(e)?),
        })
    }

    /// Stops sending: the other end reads EOF once it has what was sent.
    pub fn shutdown_write(&self) -> Result<()> {
        let e = |e| io("shutting down a stream", e);
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write).map_err(e),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write).map_err(e),
            Stream::File(f) => f.sync_all().map_err(e),
        }
    }
}

fn resolve(a: &str) -> Result<Vec<std::net::SocketAddr>> {
    let v: Vec<_> = a
        .to_socket_addrs()
        .map_err(|e| io(format!("resolving {a}"), e))?
        .collect();
    if v.is_empty() {
        return Err(TransportError::BadAddress(format!(
            "{a}: resolves to nothing"
        )));
    }
    Ok(v)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::File(f) => f.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::File(f) => f.flush(),
        }
    }
}

/// The receiving end, waiting for a sender.
#[derive(Debug)]
pub enum Listener {
    /// The socket file is removed when the listener goes.
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    File(PathBuf),
}

impl Listener {
    /// Listens on `addr`. A unix socket path must not exist yet.
    pub fn bind(addr: &Addr) -> Result<Self> {
        let what = || format!("listening on {addr}");
        Ok(match addr {
            Addr::Unix(p) => {
                Listener::Unix(UnixListener::bind(p).map_err(|e| io(what(), e))?, p.clone())
            }
            Addr::Tcp(a) => {
                Listener::Tcp(TcpListener::bind(resolve(a)?.as_slice()).map_err(|e| io(what(), e))?)
            }
            Addr::File(p) => Listener::File(p.clone()),
        })
    }

    /// The address a sender connects to (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> Result<Addr> {
        Ok(match self {
            Listener::Unix(_, p) => Addr::Unix(p.clone()),
            Listener::Tcp(l) => Addr::Tcp(
                l.local_addr()
                    .map_err(|e| io("reading the listening address", e))?
                    .to_string(),
            ),
            Listener::File(p) => Addr::File(p.clone()),
        })
    }

    /// Waits for the sender (a file is opened for reading, as it was written).
    pub fn accept(&self) -> Result<Stream> {
        let what = "accepting a connection";
        Ok(match self {
            Listener::Unix(l, _) => Stream::Unix(l.accept().map_err(|e| io(what, e))?.0),
            Listener::Tcp(l) => {
                let s = l.accept().map_err(|e| io(what, e))?.0;
                s.set_nodelay(true).map_err(|e| io(what, e))?;
                Stream::Tcp(s)
            }
            Listener::File(p) => {
                Stream::File(File::open(p).map_err(|e| io(format!("opening {}", p.display()), e))?)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compression, FrameReader, FrameWriter};

    #[test]
    fn parses_addresses() {
        assert_eq!(
            Addr::parse("unix:/run/x").unwrap(),
            Addr::Unix("/run/x".into())
        );
        assert_eq!(
            Addr::parse("tcp:10.0.0.1:7000").unwrap(),
            Addr::Tcp("10.0.0.1:7000".into())
        );
        assert_eq!(
            Addr::parse("tcp:[::1]:7000").unwrap(),
            Addr::Tcp("[::1]:7000".into())
        );
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "udp:h:1",
            "/path",
        ] {
            assert!(Addr::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Addr::parse("tcp:h:1").unwrap().to_string(), "tcp:h:1");
    }

    /// Sends 16 MiB in 1 MiB frames from a thread and checks every byte on arrival.
    fn carries(addr: Addr) {
        let l = Listener::bind(&addr).unwrap();
        let to = l.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let s = Stream::connect(&to).unwrap();
            let mut w = FrameWriter::new(s, Compression::Auto(1), to.to_string());
            for i in 0..16u32 {
                let p: Vec<u8> = (0..1 << 20).map(|j| (j as u32 ^ i) as u8).collect();
                w.send(1 + (i % 3) as u16, &p).unwrap();
            }
            w.finish().unwrap();
        });
        let s = if matches!(addr, Addr::File(_)) {
            sender.join().unwrap();
            l.accept().unwrap()
        } else {
            l.accept().unwrap()
        };
        let mut r = FrameReader::new(s, "test");
        let mut i = 0u32;
        while let Some(f) = r.recv().unwrap() {
            assert_eq!(f.kind, 1 + (i % 3) as u16);
            assert_eq!(f.payload.len(), 1 << 20);
            assert!(f
                .payload
                .iter()
                .enumerate()
                .all(|(j, &b)| b == (j as u32 ^ i) as u8));
            i += 1;
        }
        assert_eq!(i, 16);
    }

    #[test]
    fn carries_frames_over_unix_tcp_files_and_pipes() {
        let t = tempfile::tempdir().unwrap();
        carries(Addr::Unix(t.path().join("sock")));
        assert!(!t.path().join("sock").exists(), "socket file left behind");
        carries(Addr::Tcp("127.0.0.1:0".into()));
        carries(Addr::File(t.path().join("stream")));

        let (rx, tx) = std::io::pipe().unwrap();
        let sender = std::thread::spawn(move || {
            let mut w = FrameWriter::new(tx, Compression::Off, "pipe");
            for i in 0..100u8 {
                w.send(9, &[i; 100_000]).unwrap();
            }
            w.finish().unwrap();
        });
        let mut r = FrameReader::new(rx, "pipe");
        let mut n = 0u8;
        while let Some(f) = r.recv().unwrap() {
            assert!(f.payload.iter().all(|&b| b == n));
            n += 1;
        }
        assert_eq!(n, 100);
        sender.join().unwrap();
    }

    #[test]
    fn a_sender_that_dies_mid_stream_is_reported_as_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = FrameWriter::new(Stream::Unix(a), Compression::Off, "pair");
        w.send(1, b"complete").unwrap();
        w.get_mut().write_all(&[1, 2, 3]).unwrap();
        drop(w);
        let mut r = FrameReader::new(Stream::Unix(b), "pair");
        assert_eq!(r.recv().unwrap().unwrap().payload, b"complete");
        assert!(matches!(
            r.recv(),
            Err(TransportError::Truncated {
                frames: 1,
                partial: true
            })
        ));
    }
}
