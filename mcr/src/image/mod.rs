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
pub use pages::{Codec, Compression, PageChunk};
pub use read::Image;
pub use write::{ImageWriter, WriteStats, CHUNK_PREFIX};

/// The format this build writes and the newest it reads.
/// 2: images can be chained (a parent image, tracked writes) and be pre-dumps.
/// 3: a TCP listener carries the connections waiting in its queue.
/// 4: a migration's round may leave its pages in the source's memory.
pub const FORMAT_VERSION: u16 = 4;

/// Image features this build understands (see `Inventory::features`).
pub const KNOWN_FEATURES: &[&str] = &[
    "single-process",
    "process-tree",
    "zstd-pages",
    PRE_DUMP,
    PARENT_IMAGES,
    PAGES_IN_SOURCE,
];

/// The image holds memory only, as a base for a later one: it cannot be restored.
pub const PRE_DUMP: &str = "pre-dump";
/// Some of the image's pages are in its parent image (and maybe further up).
pub const PARENT_IMAGES: &str = "parent-images";
/// Some of the image's pages are not in it but in the memory of the processes it was
/// made of, which run on ([`crate::model::PagesInSource`]).
pub const PAGES_IN_SOURCE: &str = "pages-in-source";

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
    #[error("{path}: image format version {found} is older than this mcr reads ({FORMAT_VERSION}); restore it with the mcr that made it")]
    OlderVersion { path: String, found: u16 },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn process(pid: i32) -> ProcessImage {
        let file = FileRef {
            path: "/bin/true".into(),
            identity: FileIdentity::default(),
        };
        ProcessImage {
            pid,
            ppid: 1,
            pgid: pid,
            sid: pid,
            comm: "t".into(),
            creds: Creds::default(),
            threads: vec![],
            mm: MmImage {
                vmas: vec![Vma {
                    start: 0x10000,
                    end: 0x20000,
                    prot: 3,
                    shared: false,
                    kind: VmaKind::Anonymous,
                    offset: 0,
                    advice: VmaAdvice::default(),
                }],
                fields: MmFields::default(),
                auxv: vec![0, 0],
                exe: file.clone(),
                files: vec![],
                parent: Some(ParentPages {
                    pid,
                    ranges: vec![(0x10000, 0x20000)],
                }),
            },
            fds: vec![],
            cwd: file,
            root: "/".into(),
            umask: 0o22,
            personality: 0,
            dumpable: 1,
            child_subreaper: true,
            pdeathsig: 9,
            itimers: [(0, 0); 3],
            posix_timers: vec![],
            namespaces: Namespaces::default(),
            rlimits: vec![],
            sigactions: vec![],
            shared_pending: vec![],
        }
    }

    fn snapshot(pid: i32) -> Snapshot {
        Snapshot {
            inventory: Inventory {
                format_version: FORMAT_VERSION as u32,
                tool_version: "test".into(),
                kernel_release: "x".into(),
                arch: "x86_64".into(),
                root_pid: pid,
                page_size: 4096,
                features: vec!["single-process".into()],
                frozen_at_ms: 0,
                shell_job: false,
                net_lock: Some(crate::model::NetLockImage {
                    table: "mcr_1_2".into(),
                    holder_pid: Some(3),
                    netns: 4,
                }),
                image_id: 77,
                parent: Some(ParentImage {
                    dir: "../pre".into(),
                    image_id: 76,
                }),
                tracker: Some(TrackerImage {
                    holder_pid: 5,
                    holder_start: 6,
                    pids: vec![pid],
                }),
                pages_in_source: Some(crate::model::PagesInSource {
                    boot_id: "b".into(),
                    procs: vec![crate::model::SourceProcess {
                        pid,
                        host_pid: 8,
                        start: 9,
                    }],
                }),
            },
            processes: vec![process(pid)],
            pipes: vec![PipeImage {
                ino: 9,
                fifo: None,
                capacity: 65536,
                data: b"in flight".to_vec(),
            }],
            shmem: vec![ShmemObject {
                ino: 3,
                size: 8192,
                sysv: None,
                memfd: Some(Memfd {
                    name: "m".into(),
                    seals: 1,
                }),
            }],
            zombies: vec![ZombieImage {
                pid: 8,
                ppid: 7,
                pgid: 7,
                sid: 7,
                status: 42 << 8,
            }],
            unix: vec![UnixSocketImage {
                ino: 10,
                kind: libc::SOCK_DGRAM,
                name: Some("@mcr-test".into()),
                link: SocketLink::Pair { peer: 11 },
                queue: vec![b"one".to_vec(), vec![]],
            }],
            ptys: vec![PtyImage {
                index: 3,
                ptmx: "/dev/ptmx".into(),
                termios: vec![1; 44],
                master_termios: vec![2; 44],
                winsize: [24, 80, 0, 0],
                locked: false,
                packet: true,
                session: Some((7, 8)),
            }],
            inet: vec![InetSocketImage {
                ino: 12,
                family: libc::AF_INET6,
                protocol: libc::IPPROTO_TCP,
                local: Some("[::1]:8080".parse().unwrap()),
                peer: None,
                listen: Some(128),
                options: vec![(libc::SOL_SOCKET, libc::SO_REUSEADDR, vec![1, 0, 0, 0])],
                tcp: None,
                datagrams: vec![("[::1]:53".parse().unwrap(), b"query".to_vec())],
                waiting: Vec::new(),
            }],
        }
    }

    fn write(dir: &std::path::Path, c: Compression, pages: &[u8]) {
        let w = ImageWriter::create(dir, c).unwrap();
        for (i, p) in pages.chunks(4096 * 4).enumerate() {
            let mut buf = vec![0u8; CHUNK_PREFIX];
            buf.extend_from_slice(p);
            w.write_chunk(7, 0x10000 + (i * 4096 * 4) as u64, &mut buf)
                .unwrap();
        }
        w.finish(&snapshot(7)).unwrap();
    }

    #[test]
    fn round_trips_snapshot_and_pages_raw_and_compressed() {
        let pages: Vec<u8> = (0..16 * 4096)
            .map(|i| (i / 4096) as u8 ^ (i as u8 & 3))
            .collect();
        for c in [Compression::None, Compression::FAST] {
            let t = tempfile::tempdir().unwrap();
            let dir = t.path().join("img");
            write(&dir, c, &pages);
            let img = Image::open(&dir).unwrap();
            assert_eq!(img.snapshot, snapshot(7));
            let mut out = vec![0u8; pages.len()];
            let mut buf = Vec::new();
            for ch in img.chunks_of(7) {
                let off = (ch.addr - 0x10000) as usize;
                out[off..off + ch.len_bytes()].copy_from_slice(ch.pages(&mut buf).unwrap());
            }
            assert_eq!(out, pages);
        }
    }

    #[test]
    fn pages_left_in_the_source_are_listed_but_not_held() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        let w = ImageWriter::create(&dir, Compression::None).unwrap();
        w.write_in_source(7, 0x10000, 3).unwrap();
        w.write_in_source(7, 0x1c000, 1).unwrap();
        let stats = w.finish(&snapshot(7)).unwrap();
        assert_eq!((stats.pages, stats.stored_bytes), (4, 0));
        let img = Image::open(&dir).unwrap();
        let got: Vec<_> = img
            .chunks_of(7)
            .map(|c| (c.addr, c.n_pages, c.codec, c.data.len()))
            .collect();
        assert_eq!(
            got,
            [
                (0x10000, 3, Codec::InSource, 0),
                (0x1c000, 1, Codec::InSource, 0)
            ]
        );
        let c = img.chunks_of(7).next().unwrap();
        assert!(c.pages(&mut Vec::new()).is_err());
    }

    #[test]
    fn image_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        write(&dir, Compression::None, &[1u8; 4096]);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in ["inventory", "core", "pages"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        write(&dir, Compression::None, &[9u8; 8192]);
        for f in ["inventory", "core", "pages"] {
            let orig = std::fs::read(dir.join(f)).unwrap();
            for i in 0..orig.len() {
                let mut b = orig.clone();
                b[i] ^= 1;
                std::fs::write(dir.join(f), &b).unwrap();
                assert!(
                    Image::open(&dir).is_err(),
                    "{f} byte {i} flipped went unnoticed"
                );
            }
            std::fs::write(dir.join(f), &orig).unwrap();
        }
        assert!(Image::open(&dir).is_ok());
    }

    #[test]
    fn unknown_feature_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        let w = ImageWriter::create(&dir, Compression::None).unwrap();
        let mut s = snapshot(7);
        s.inventory.features.push("teleport".into());
        w.finish(&s).unwrap();
        assert!(matches!(Image::open(&dir), Err(ImageError::UnknownFeature(f)) if f == "teleport"));
    }
}
