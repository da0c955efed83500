//! Writing an image directory.

use super::frame::{file_header, frame_header, FrameKind, FILE_CORE, FILE_INVENTORY, FILE_PAGES};
use super::pages::{chunk_header, compress, Compression, CHUNK_PAGES};
use super::{codec, ImageError, Result};
use crate::model::Snapshot;
use kext_shim::PAGE_SIZE;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    pages_frames: u64,
    compression: Compression,
    stats: WriteStats,
    written: Vec<PathBuf>,
    finished: bool,
}

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
            pages_frames: 0,
            compression,
            stats: WriteStats::default(),
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

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Appends the pages at `addr` of `pid`; `data` is a whole number of pages.
    pub fn write_pages(&mut self, pid: i32, addr: u64, data: &[u8]) -> Result<()> {
        debug_assert_eq!(data.len() as u64 % PAGE_SIZE, 0);
        let chunk_bytes = CHUNK_PAGES * PAGE_SIZE as usize;
        for (i, raw) in data.chunks(chunk_bytes).enumerate() {
            let a = addr + (i * chunk_bytes) as u64;
            let n = (raw.len() as u64 / PAGE_SIZE) as u32;
            let packed = compress(raw, self.compression);
            let body: &[u8] = packed.as_deref().unwrap_or(raw);
            let ch = chunk_header(pid, a, n, packed.is_some());
            let fh = frame_header(FrameKind::PageChunk, 0, &[&ch, body]);
            self.write_pages_vectored(&[&fh, &ch, body])?;
            self.pages_frames += 1;
            self.stats.chunks += 1;
            self.stats.pages += n as u64;
            self.stats.raw_bytes += raw.len() as u64;
            self.stats.stored_bytes += body.len() as u64;
            self.stats.compressed_chunks += packed.is_some() as u64;
        }
        Ok(())
    }

    fn write_pages_vectored(&mut self, parts: &[&[u8]]) -> Result<()> {
        let path = self.dir.join(FILE_PAGES.0);
        let f = self.pages.as_mut().expect("pages file open until finish");
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match f.write_vectored(bufs) {
                Ok(0) => return Err(io(&path, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&path, e)),
            }
        }
        Ok(())
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
        let mut pages = self.pages.take().expect("pages file open until finish");
        pages
            .write_all(&end(self.pages_frames))
            .and_then(|_| pages.sync_all())
            .map_err(|e| io(&pages_path, e))?;
        drop(pages);

        let mut core = file_header(FILE_CORE.1).to_vec();
        for p in &snap.processes {
            push_record(&mut core, FrameKind::Process, &codec::encode(p));
        }
        core.extend_from_slice(&end(snap.processes.len() as u64));
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
        Ok(self.stats)
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
