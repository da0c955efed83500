//! Reading an image directory, checking all of it first.

use super::frame::{check_file, corrupt, FrameKind, FILE_CORE, FILE_INVENTORY, FILE_PAGES};
use super::pages::{parse_chunk, PageChunk};
use super::{codec, ImageError, Result, KNOWN_FEATURES};
use crate::model::{
    InetSocketImage, Inventory, PipeImage, ProcessImage, PtyImage, ShmemObject, Snapshot,
    UnixSocketImage, ZombieImage,
};
use kext_shim::filemap::{map_readonly, Mmap};
use std::path::{Path, PathBuf};

/// A checked image: the snapshot decoded, the pages file mapped and every chunk indexed.
pub struct Image {
    pub dir: PathBuf,
    pub snapshot: Snapshot,
    pages: Mmap,
    /// (payload offset, payload length) of each page chunk, in file order.
    chunks: Vec<(usize, usize)>,
    /// Where each process's chunks lie, sorted and merged: asked for every layer of a
    /// chain in the blackout, found once.
    runs: Vec<(i32, Vec<(u64, u64)>)>,
    /// The images this one builds on, its parent first, once [`load_parents`]
    /// (Self::load_parents) ran.
    pub parents: Vec<Image>,
}

fn io(path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Image {
    /// Opens and checks the image in `dir`: magic, version, every frame's crc, every
    /// record, every chunk header. Nothing is trusted before all of it passed.
    pub fn open(dir: &Path) -> Result<Self> {
        let snapshot = Self::read_snapshot(dir)?;
        let (processes, shmem) = (&snapshot.processes, &snapshot.shmem);
        let pages_path = dir.join(FILE_PAGES.0);
        let file = std::fs::File::open(&pages_path).map_err(|e| io(&pages_path, e))?;
        let p = pages_path.display().to_string();
        let pages = map_readonly(&file, &p).map_err(|e| ImageError::Io {
            path: p.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut chunks = Vec::new();
        let mut runs: Vec<(i32, Vec<(u64, u64)>)> = Vec::new();
        for f in check_file(
            &p,
            &pages,
            FILE_PAGES,
            crate::par::workers_for(pages.len() as u64),
        )? {
            if f.kind != FrameKind::PageChunk {
                return Err(corrupt(
                    &p,
                    f.offset,
                    &format!("unexpected {:?} record", f.kind),
                ));
            }
            let c = parse_chunk(&p, f.offset, f.payload)?;
            let end = c.addr + c.len_bytes() as u64;
            if c.pid < 0 {
                let ok = shmem
                    .get((-1 - c.pid) as usize)
                    .is_some_and(|o| end <= (o.size + 4095) & !4095);
                if !ok {
                    return Err(corrupt(
                        &p,
                        f.offset,
                        &format!(
                            "pages {:#x}..{end:#x} of shared memory object {} lie outside it",
                            c.addr,
                            -1 - c.pid
                        ),
                    ));
                }
                chunks.push((f.offset as usize, f.payload.len()));
                continue;
            }
            let owner = processes.iter().find(|x| x.pid == c.pid).ok_or_else(|| {
                corrupt(
                    &p,
                    f.offset,
                    &format!("pages of pid {} that the image lacks", c.pid),
                )
            })?;
            if !owner
                .mm
                .vmas
                .iter()
                .any(|v| v.start <= c.addr && end <= v.end)
            {
                return Err(corrupt(
                    &p,
                    f.offset,
                    &format!(
                        "pages {:#x}..{end:#x} of pid {} lie outside its VMAs",
                        c.addr, c.pid
                    ),
                ));
            }
            chunks.push((f.offset as usize, f.payload.len()));
            match runs.iter_mut().find(|r| r.0 == c.pid) {
                Some(r) => r.1.push((c.addr, end)),
                None => runs.push((c.pid, vec![(c.addr, end)])),
            }
        }
        for r in &mut runs {
            r.1 = crate::ranges::merge(std::mem::take(&mut r.1));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            snapshot,
            pages,
            chunks,
            runs,
            parents: Vec::new(),
        })
    }

    /// The inventory and the core of the image in `dir`, checked, without its pages: for
    /// whoever needs only to know what an image is (which image, which processes).
    pub fn read_snapshot(dir: &Path) -> Result<Snapshot> {
        let inv_path = dir.join(FILE_INVENTORY.0);
        let inv_bytes = std::fs::read(&inv_path).map_err(|e| io(&inv_path, e))?;
        let p = inv_path.display().to_string();
        let frames = check_file(&p, &inv_bytes, FILE_INVENTORY, 1)?;
        let [f] = frames[..] else {
            return Err(corrupt(
                &p,
                0,
                &format!("{} records, expected 1", frames.len()),
            ));
        };
        if f.kind != FrameKind::Inventory {
            return Err(corrupt(&p, f.offset, "first record is not an inventory"));
        }
        let inventory: Inventory =
            codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?;
        if let Some(u) = inventory
            .features
            .iter()
            .find(|x| !KNOWN_FEATURES.contains(&x.as_str()))
        {
            return Err(ImageError::UnknownFeature(u.clone()));
        }

        let core_path = dir.join(FILE_CORE.0);
        let core_bytes = std::fs::read(&core_path).map_err(|e| io(&core_path, e))?;
        let p = core_path.display().to_string();
        let mut processes: Vec<ProcessImage> = Vec::new();
        let mut pipes: Vec<PipeImage> = Vec::new();
        let mut shmem: Vec<ShmemObject> = Vec::new();
        let mut zombies: Vec<ZombieImage> = Vec::new();
        let mut unix: Vec<UnixSocketImage> = Vec::new();
        let mut ptys: Vec<PtyImage> = Vec::new();
        let mut inet: Vec<InetSocketImage> = Vec::new();
        for f in check_file(&p, &core_bytes, FILE_CORE, 1)? {
            match f.kind {
                FrameKind::Process => {
                    processes.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::Pipe => {
                    pipes.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::Shmem => {
                    shmem.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::Zombie => {
                    zombies.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::UnixSocket => {
                    unix.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::Pty => {
                    ptys.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                FrameKind::InetSocket => {
                    inet.push(codec::decode(f.payload).map_err(|e| corrupt(&p, f.offset, &e))?)
                }
                k => return Err(corrupt(&p, f.offset, &format!("unexpected {k:?} record"))),
            }
        }
        for x in &processes {
            let Some(pp) = &x.mm.parent else { continue };
            if inventory.parent.is_none() {
                return Err(corrupt(
                    &p,
                    0,
                    &format!(
                        "pid {} has pages in a parent image the image does not name",
                        x.pid
                    ),
                ));
            }
            let mut last = 0;
            for &(s, e) in &pp.ranges {
                let inside = x.mm.vmas.iter().any(|v| v.start <= s && e <= v.end);
                if s < last || e <= s || !inside {
                    return Err(corrupt(
                        &p,
                        0,
                        &format!(
                            "pid {}: parent pages {s:#x}..{e:#x} are not within its VMAs, in order",
                            x.pid
                        ),
                    ));
                }
                last = e;
            }
        }
        if !processes.iter().any(|x| x.pid == inventory.root_pid) {
            return Err(corrupt(
                &p,
                0,
                &format!("no record for root pid {}", inventory.root_pid),
            ));
        }
        Ok(Snapshot {
            inventory,
            processes,
            pipes,
            shmem,
            zombies,
            unix,
            ptys,
            inet,
        })
    }

    /// Opens the images this one builds on into `parents`, its parent first, each
    /// checked whole and checked to be the very image the one below it names.
    pub fn load_parents(&mut self) -> Result<()> {
        self.load_parents_from(Vec::new())
    }

    /// Like [`load_parents`](Self::load_parents), taking from `opened` the images the
    /// chain names (by image id) instead of reading them again.
    pub fn load_parents_from(&mut self, opened: Vec<Image>) -> Result<()> {
        self.parents = self.open_parents(opened)?;
        Ok(())
    }

    fn open_parents(&self, mut opened: Vec<Image>) -> Result<Vec<Image>> {
        const MAX_DEPTH: usize = 64;
        let mut out: Vec<Image> = Vec::new();
        let mut child = self;
        while let Some(want) = &child.snapshot.inventory.parent {
            if out.len() == MAX_DEPTH {
                return Err(ImageError::Directory {
                    dir: self.dir.display().to_string(),
                    what: format!("has more than {MAX_DEPTH} parent images (a loop?)"),
                });
            }
            let dir = child.dir.join(&want.dir);
            if let Some(i) = opened
                .iter()
                .position(|o| o.snapshot.inventory.image_id == want.image_id)
            {
                out.push(opened.swap_remove(i));
                child = out.last().expect("just pushed");
                continue;
            }
            let parent = Image::open(&dir).map_err(|e| match e {
                ImageError::Io { path, source }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    ImageError::Directory {
                        dir: child.dir.display().to_string(),
                        what: format!(
                            "needs its parent image {} ({path} is missing)",
                            dir.display()
                        ),
                    }
                }
                e => e,
            })?;
            if parent.snapshot.inventory.image_id != want.image_id {
                return Err(ImageError::Directory {
                    dir: child.dir.display().to_string(),
                    what: format!(
                        "names parent image {:#x} in {}, which holds image {:#x} instead",
                        want.image_id,
                        dir.display(),
                        parent.snapshot.inventory.image_id
                    ),
                });
            }
            out.push(parent);
            child = out.last().expect("just pushed");
        }
        Ok(out)
    }

    /// Every page chunk, in file order.
    pub fn chunks(&self) -> impl Iterator<Item = PageChunk<'_>> + '_ {
        let p = self.dir.join(FILE_PAGES.0).display().to_string();
        self.chunks.iter().map(move |&(off, len)| {
            parse_chunk(&p, off as u64, &self.pages[off..off + len])
                .expect("chunks were checked when the image was opened")
        })
    }

    /// Where the pages of process `pid` lie in this image: sorted, merged ranges.
    pub fn runs_of(&self, pid: i32) -> &[(u64, u64)] {
        self.runs
            .iter()
            .find(|r| r.0 == pid)
            .map_or(&[][..], |r| &r.1)
    }

    /// Page chunks of one process.
    pub fn chunks_of(&self, pid: i32) -> impl Iterator<Item = PageChunk<'_>> + '_ {
        self.chunks().filter(move |c| c.pid == pid)
    }
}
