//! What the two ends of a migration say to each other, as transport frames.
//!
//! Source to destination: [`HELLO`], then each image (a pre-copy round, then the
//! final one) as its files, each a [`FILE`] header and [`DATA`] frames, closed by
//! [`IMAGE`]. Destination to source, on the same connection: [`APPLIED`] once a round
//! is in the tree it builds ahead (warm restore; the source goes on with the next
//! round meanwhile, and waits for every one before the blackout);
//! [`READY`] once the
//! workload is whole there, held before it runs, or [`FAILED`] with why. The source then
//! stops the original for good (a SIGSTOP queued behind its ptrace stop, so that not
//! even the source's death lets it run again) and answers [`COMMIT`]; the destination
//! releases the workload and says [`RESTORED`]; the source kills the original.
//! Control messages are JSON.

use serde::{Deserialize, Serialize};
use std::path::Path;
use transport::{FrameReader, FrameWriter, Stream};

pub const HELLO: u16 = 1;
/// The destination's answer to HELLO: whether it can take the files by link.
pub const WELCOME: u16 = 13;
pub const FILE: u16 = 2;
pub const DATA: u16 = 3;
pub const IMAGE: u16 = 4;
/// The source has stopped the original for good: release the workload.
pub const COMMIT: u16 = 5;
pub const RESTORED: u16 = 10;
pub const FAILED: u16 = 11;
/// The workload is whole at the destination, held just before it runs.
pub const READY: u16 = 12;
/// A pre-copy round is in place at the destination.
pub const APPLIED: u16 = 14;
/// Post-copy, before the last image: the pages left out of it, which the destination
/// leaves missing ([`Lazy`]).
pub const LAZY: u16 = 15;
/// Post-copy, source to destination: pages (`pid i32, runs u32`, each run `addr u64,
/// pages u32`, then the bytes of every run in order).
pub const PAGES: u16 = 16;
/// Post-copy, destination to source: a page it waits for (`pid i32, addr u64`).
pub const PAGE_WANTED: u16 = 17;
/// Post-copy: every page left out has been sent.
pub const PAGES_DONE: u16 = 18;
/// Post-copy: every page is in place at the destination; the original may go.
pub const ALL_IN: u16 = 19;

/// Bytes of file data per frame.
pub const DATA_CHUNK: usize = 1 << 20;

/// The version of this conversation; both ends must speak the same.
pub const PROTOCOL: u32 = 6;

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub tool_version: String,
    pub root_pid: i32,
    /// Field 22 of the root's /proc/PID/stat: with the staging's boot id, what tells
    /// a destination that it sees the very process at `root_pid`.
    pub root_start: u64,
    /// Where the source makes its images, should the destination see the same files.
    pub staging: Staging,
    /// The last image will leave pages to post-copy: the destination readies what that
    /// needs (its watchdog process) before the blackout, not in it.
    #[serde(default)]
    pub post_copy: bool,
}

/// A directory, and what proves another process sees the very same one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Staging {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    /// /proc/sys/kernel/random/boot_id: the same machine, this boot.
    pub boot_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// The destination sees the source's staging directory, on its own work
    /// directory's filesystem: files come as hard links, not bytes.
    pub link: bool,
    /// The destination sees the source's processes, and may read their memory: the
    /// pre-copy rounds leave their pages there (see `PagesInSource`).
    #[serde(default)]
    pub read_source: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileHeader {
    /// The image's directory name ("round-0", "final").
    pub image: String,
    /// One of the image's files.
    pub name: String,
    pub size: u64,
    /// Sent as a link: the file is at `staging/image/name`, with this (dev, inode), and
    /// no data follows.
    pub linked: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ImageDone {
    pub image: String,
    /// The last one: restore it.
    pub last: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    /// The round's memory is in the destination's tree; false: the destination
    /// restores cold, for `cold_because`.
    pub warm: bool,
    /// How long it took, ms.
    pub apply_ms: f64,
    pub cold_because: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Restored {
    /// The root's pid as the destination's host sees it.
    pub pid: i32,
    /// Milliseconds the restore took (the destination's share of the blackout).
    pub restore_ms: f64,
    /// It finished the tree built from the rounds (rather than making it anew).
    pub warm: bool,
    pub cold_because: Option<String>,
    /// Runs of pages left in the source that were unmapped there by the time they
    /// were read (the next round said what is there).
    #[serde(default)]
    pub gone_from_source: u64,
    /// Its restore's steps, (name, ms), as `mcr restore` reports them.
    pub steps: Vec<(String, f64)>,
}

/// The pages a post-copy leaves out of its last image, by process (the image's pid):
/// `(address, pages)` runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lazy {
    pub processes: Vec<(i32, Vec<(u64, u64)>)>,
}

/// The head of a PAGES frame holding `runs` of `pid`.
pub fn pages_header(pid: i32, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + runs.len() * 12);
    h.extend_from_slice(&pid.to_le_bytes());
    h.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for &(a, n) in runs {
        h.extend_from_slice(&a.to_le_bytes());
        h.extend_from_slice(&(n as u32).to_le_bytes());
    }
    h
}

/// The runs of a PAGES frame: `(addr, bytes)`.
pub type PageRuns<'a> = Vec<(u64, &'a [u8])>;

/// A PAGES frame as `(pid, runs)`.
pub fn parse_pages(payload: &[u8]) -> Result<(i32, PageRuns<'_>), String> {
    let short = || "a pages frame shorter than it says".to_string();
    let word = |at: usize, n: usize| payload.get(at..at + n).ok_or_else(short);
    let pid = i32::from_le_bytes(word(0, 4)?.try_into().expect("4 bytes"));
    let k = u32::from_le_bytes(word(4, 4)?.try_into().expect("4 bytes")) as usize;
    let mut data = 8 + k.checked_mul(12).ok_or_else(short)?;
    let mut runs = Vec::with_capacity(k.min(1 << 16));
    for i in 0..k {
        let at = 8 + i * 12;
        let addr = u64::from_le_bytes(word(at, 8)?.try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(word(at + 8, 4)?.try_into().expect("4 bytes")) as usize;
        let len = n
            .checked_mul(kext_shim::PAGE_SIZE as usize)
            .ok_or_else(short)?;
        runs.push((addr, word(data, len)?));
        data += len;
    }
    if data != payload.len() {
        return Err("a pages frame longer than it says".into());
    }
    Ok((pid, runs))
}

/// Where a PAGE_WANTED frame's page is: its 12 bytes.
pub fn page_header(pid: i32, addr: u64) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&pid.to_le_bytes());
    h[4..].copy_from_slice(&addr.to_le_bytes());
    h
}

/// The `(pid, addr)` of a PAGE_WANTED frame, and what follows.
pub fn parse_page_header(payload: &[u8]) -> Result<(i32, u64, &[u8]), String> {
    if payload.len() < 12 {
        return Err("a page frame shorter than its header".into());
    }
    let pid = i32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    let addr = u64::from_le_bytes(payload[4..12].try_into().expect("8 bytes"));
    Ok((pid, addr, &payload[12..]))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Failed {
    pub error: String,
}

/// The files of an image directory, in the order they are sent: the inventory last,
/// so an image is whole on arrival only once it is there.
pub const IMAGE_FILES: [&str; 3] = ["pages", "core", "inventory"];

pub type Writer = FrameWriter<Stream>;
pub type Reader = FrameReader<Stream>;

pub fn send_json<T: Serialize>(w: &mut Writer, kind: u16, v: &T) -> transport::Result<()> {
    let b = serde_json::to_vec(v).expect("plain data serializes");
    w.send(kind, &b)?;
    w.flush()
}

pub fn parse<T: for<'a> Deserialize<'a>>(kind: u16, payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("bad message of kind {kind}: {e}"))
}

/// Sends image directory `dir` as `name` (as links when `link`); returns the bytes of
/// its files.
pub fn send_image(
    w: &mut Writer,
    dir: &Path,
    name: &str,
    last: bool,
    link: bool,
) -> Result<u64, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut buf = vec![0u8; DATA_CHUNK];
    for f in IMAGE_FILES {
        let path = dir.join(f);
        let mut file =
            std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let size = meta.len();
        let h = FileHeader {
            image: name.into(),
            name: f.into(),
            size,
            linked: link.then(|| (meta.dev(), meta.ino())),
        };
        send_json(w, FILE, &h).map_err(|e| e.to_string())?;
        total += size;
        if link {
            continue;
        }
        let mut left = size;
        while left > 0 {
            let n = (left as usize).min(DATA_CHUNK);
            file.read_exact(&mut buf[..n])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            w.send(DATA, &buf[..n]).map_err(|e| e.to_string())?;
            left -= n as u64;
        }
    }
    send_json(
        w,
        IMAGE,
        &ImageDone {
            image: name.into(),
            last,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pages_frame_reads_back_and_a_short_or_long_one_is_refused() {
        let runs = [(0x1000u64, 1u64), (0x9000, 2)];
        let mut f = pages_header(7, &runs);
        f.extend((0..3 * 4096).map(|i| (i / 4096) as u8 + 1));
        let (pid, got) = parse_pages(&f).unwrap();
        assert_eq!(pid, 7);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].1.len(), got[0].1[0]), (0x1000, 4096, 1));
        assert_eq!(
            (got[1].0, got[1].1.len(), got[1].1[4096]),
            (0x9000, 8192, 3)
        );
        assert!(parse_pages(&f[..f.len() - 1]).is_err());
        let mut long = f.clone();
        long.push(0);
        assert!(parse_pages(&long).is_err());
        // A run count that would not fit the frame.
        let mut lying = pages_header(7, &runs);
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pages(&lying).is_err());
    }
}
