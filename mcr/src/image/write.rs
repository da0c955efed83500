//! Writing an image directory.

use super::frame::{
    file_header, frame_header, FrameKind, FILE_CORE, FILE_HEADER_LEN, FILE_INVENTORY, FILE_PAGES,
    FRAME_HEADER_LEN,
};
use super::pages::{chunk_header, compress, Codec, Compression, CHUNK_HEADER_LEN, CHUNK_PAGES};
use super::{codec, ImageError, Result};
use crate::model::Snapshot;
use kext_shim::PAGE_SIZE;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a finished image holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub pages: u64,
    pub chunks: u64,
    pub compressed_chunks: u64,
    /// Bytes of page data before and after compression.
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// Streams pages into a new image directory, then seals it with the core and inventory.
/// Dropped without [`finish`](Self::finish), it removes what it wrote.
pub struct ImageWriter {
    dir: PathBuf,
    created_dir: bool,
    pages: Option<File>,
    /// Where the next chunk goes in the pages file; chunks are self-describing, so
    /// writers running in parallel just reserve their room here.
    pages_end: AtomicU64,
    pages_frames: AtomicU64,
    compression: Compression,
    stats: Mutex<WriteStats>,
    written: Vec<PathBuf>,
    finished: bool,
}

/// Room a page buffer keeps in front of its data for the frame and chunk headers, so a
/// raw chunk goes to the file in one write without being copied.
pub const CHUNK_PREFIX: usize = FRAME_HEADER_LEN + CHUNK_HEADER_LEN;

fn io(path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn dir_err(dir: &Path, what: impl Into<String>) -> ImageError {
    ImageError::Directory {
        dir: dir.display().to_string(),
        what: what.into(),
    }
}

/// Makes sure `dir` can take a new image: created 0700 if missing; otherwise it must be
/// an empty, writable directory. Returns whether it was created.
pub fn prepare_dir(dir: &Path) -> Result<bool> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| io(dir, e))?;
            Ok(true)
        }
        Err(e) => Err(io(dir, e)),
        Ok(m) if !m.is_dir() => Err(dir_err(dir, "is not a directory")),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
            if entries.next().is_some() {
                return Err(dir_err(dir, "is not empty; refusing to mix two images"));
            }
            if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
                return Err(dir_err(dir, "is not writable"));
            }
            // Images hold process memory: keep them to their owner.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io(dir, e))?;
            Ok(false)
        }
    }
}

impl ImageWriter {
    /// Prepares `dir` (see [`prepare_dir`]) and opens the pages file.
    pub fn create(dir: &Path, compression: Compression) -> Result<Self> {
        let created_dir = prepare_dir(dir)?;
        let mut w = Self {
            dir: dir.to_path_buf(),
            created_dir,
            pages: None,
            pages_end: AtomicU64::new(FILE_HEADER_LEN as u64),
            pages_frames: AtomicU64::new(0),
            compression,
            stats: Mutex::new(WriteStats::default()),
            written: Vec::new(),
            finished: false,
        };
        let mut f = w.new_file(FILE_PAGES.0)?;
        let p = w.dir.join(FILE_PAGES.0);
        f.write_all(&file_header(FILE_PAGES.1))
            .map_err(|e| io(&p, e))?;
        w.pages = Some(f);
        Ok(w)
    }

    fn new_file(&mut self, name: &str) -> Result<File> {
        let path = self.dir.join(name);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        self.written.push(path);
        Ok(f)
    }

    /// Writes one chunk: `buf` holds [`CHUNK_PREFIX`] spare bytes, then at most
    /// [`CHUNK_PAGES`] pages read from `addr` of `pid`. Safe to call from several threads.
    pub fn write_chunk(&self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
        let raw_len = buf.len() - CHUNK_PREFIX;
        debug_assert_eq!(raw_len as u64 % PAGE_SIZE, 0);
        debug_assert!(raw_len <= CHUNK_PAGES * PAGE_SIZE as usize);
        let n = (raw_len as u64 / PAGE_SIZE) as u32;
        let packed = compress(&buf[CHUNK_PREFIX..], self.compression);
        let path = self.dir.join(FILE_PAGES.0);
        let f = self.pages.as_ref().expect("pages file open until finish");
        let codec = if packed.is_some() {
            Codec::Zstd
        } else {
            Codec::Raw
        };
        let ch = chunk_header(pid, addr, n, codec);
        let stored = match &packed {
            Some(body) => {
                let fh = frame_header(FrameKind::PageChunk, 0, &[&ch, body]);
                let at = self.reserve(FRAME_HEADER_LEN + CHUNK_HEADER_LEN + body.len());
                let mut head = [0u8; CHUNK_PREFIX];
                head[..FRAME_HEADER_LEN].copy_from_slice(&fh);
                head[FRAME_HEADER_LEN..].copy_from_slice(&ch);
                f.write_all_at(&head, at)
                    .and_then(|_| f.write_all_at(body, at + CHUNK_PREFIX as u64))
                    .map_err(|e| io(&path, e))?;
                body.len()
            }
            None => {
                let fh = frame_header(FrameKind::PageChunk, 0, &[&ch, &buf[CHUNK_PREFIX..]]);
                buf[..FRAME_HEADER_LEN].copy_from_slice(&fh);
                buf[FRAME_HEADER_LEN..CHUNK_PREFIX].copy_from_slice(&ch);
                let at = self.reserve(buf.len());
                f.write_all_at(buf, at).map_err(|e| io(&path, e))?;
                raw_len
            }
        };
        self.pages_frames.fetch_add(1, Ordering::Relaxed);
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.chunks += 1;
        st.pages += n as u64;
        st.raw_bytes += raw_len as u64;
        st.stored_bytes += stored as u64;
        st.compressed_chunks += packed.is_some() as u64;
        Ok(())
    }

    /// Records that `n_pages` pages at `addr` of `pid` are in the source's memory,
    /// not in the image (see [`crate::model::PagesInSource`]).
    pub fn write_in_source(&self, pid: i32, addr: u64, n_pages: u32) -> Result<()> {
        let path = self.dir.join(FILE_PAGES.0);
        let f = self.pages.as_ref().expect("pages file open until finish");
        let ch = chunk_header(pid, addr, n_pages, Codec::InSource);
        let fh = frame_header(FrameKind::PageChunk, 0, &[&ch]);
        let mut frame = [0u8; CHUNK_PREFIX];
        frame[..FRAME_HEADER_LEN].copy_from_slice(&fh);
        frame[FRAME_HEADER_LEN..].copy_from_slice(&ch);
        let at = self.reserve(frame.len());
        f.write_all_at(&frame, at).map_err(|e| io(&path, e))?;
        self.pages_frames.fetch_add(1, Ordering::Relaxed);
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.chunks += 1;
        st.pages += n_pages as u64;
        st.raw_bytes += n_pages as u64 * PAGE_SIZE;
        Ok(())
    }

    fn reserve(&self, len: usize) -> u64 {
        self.pages_end.fetch_add(len as u64, Ordering::Relaxed)
    }

    /// Writes the core and inventory, seals every file with its end frame and syncs them.
    pub fn finish(mut self, snap: &Snapshot) -> Result<WriteStats> {
        let end = |n: u64| {
            let c = n.to_le_bytes();
            let h = frame_header(FrameKind::End, 0, &[&c]);
            let mut v = h.to_vec();
            v.extend_from_slice(&c);
            v
        };
        let pages_path = self.dir.join(FILE_PAGES.0);
        let pages = self.pages.take().expect("pages file open until finish");
        let at = *self.pages_end.get_mut();
        pages
            .write_all_at(&end(*self.pages_frames.get_mut()), at)
            .and_then(|_| pages.sync_all())
            .map_err(|e| io(&pages_path, e))?;
        drop(pages);

        let mut core = file_header(FILE_CORE.1).to_vec();
        for p in &snap.processes {
            push_record(&mut core, FrameKind::Process, &codec::encode(p));
        }
        for p in &snap.pipes {
            push_record(&mut core, FrameKind::Pipe, &codec::encode(p));
        }
        for o in &snap.shmem {
            push_record(&mut core, FrameKind::Shmem, &codec::encode(o));
        }
        for z in &snap.zombies {
            push_record(&mut core, FrameKind::Zombie, &codec::encode(z));
        }
        for u in &snap.unix {
            push_record(&mut core, FrameKind::UnixSocket, &codec::encode(u));
        }
        for t in &snap.ptys {
            push_record(&mut core, FrameKind::Pty, &codec::encode(t));
        }
        for s in &snap.inet {
            push_record(&mut core, FrameKind::InetSocket, &codec::encode(s));
        }
        let records = snap.processes.len()
            + snap.pipes.len()
            + snap.shmem.len()
            + snap.zombies.len()
            + snap.unix.len()
            + snap.ptys.len()
            + snap.inet.len();
        core.extend_from_slice(&end(records as u64));
        self.write_small(FILE_CORE.0, &core)?;

        // The inventory goes last: an image without one was never finished.
        let mut inv = file_header(FILE_INVENTORY.1).to_vec();
        push_record(
            &mut inv,
            FrameKind::Inventory,
            &codec::encode(&snap.inventory),
        );
        inv.extend_from_slice(&end(1));
        self.write_small(FILE_INVENTORY.0, &inv)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        self.finished = true;
        Ok(*self.stats.get_mut().unwrap_or_else(|p| p.into_inner()))
    }

    fn write_small(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let mut f = self.new_file(name)?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| io(&path, e))
    }
}

fn push_record(out: &mut Vec<u8>, kind: FrameKind, payload: &[u8]) {
    out.extend_from_slice(&frame_header(kind, 0, &[payload]));
    out.extend_from_slice(payload);
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.pages.take();
        for p in &self.written {
            let _ = std::fs::remove_file(p);
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
