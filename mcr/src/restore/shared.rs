//! Shared anonymous memory: each object is made once, here, filled from the image, and
//! inherited by every stub (fork keeps MAP_SHARED mappings shared). Each process then
//! maps the parts it had with mremap, which for a shared mapping and an old size of 0
//! makes another mapping of the same pages.

use super::build::find_gap;
use super::{RestoreError, Result, StepContext};
use crate::image::Image;
use kext_shim::mem::SharedRegion;
use kext_shim::{procfs, Pid, PAGE_SIZE};

/// One object, mapped in this process (and so in the stubs forked from it).
pub struct SharedObject {
    pub ino: u64,
    pub len: u64,
    region: SharedRegion,
}

impl SharedObject {
    pub fn base(&self) -> u64 {
        self.region.addr()
    }
}

/// Where each object lives in the stubs: (inode, base, length).
pub type Placement = Vec<(u64, u64, u64)>;

pub fn placement(objects: &[SharedObject]) -> Placement {
    objects.iter().map(|o| (o.ino, o.base(), o.len)).collect()
}

/// Maps every object of the image at an address no process of the image uses, and
/// fills it.
pub fn prepare(image: &Image) -> Result<Vec<SharedObject>> {
    let snap = &image.snapshot;
    let root = snap.inventory.root_pid;
    if snap.shmem.is_empty() {
        return Ok(Vec::new());
    }
    let ours = procfs::read_maps(Pid::this()).step(root, || "reading our own maps".into())?;
    let mut used: Vec<(u64, u64)> = ours.iter().map(|m| (m.start, m.end)).collect();
    for p in &snap.processes {
        used.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
    }
    let mut objects = Vec::with_capacity(snap.shmem.len());
    for (i, o) in snap.shmem.iter().enumerate() {
        let len = (o.size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let base = find_gap(&used, len.max(PAGE_SIZE), 1 << 32).ok_or_else(|| {
            RestoreError::Incompatible {
                pid: root,
                what: format!("no room for shared memory object {} ({len} bytes)", o.ino),
            }
        })?;
        used.push((base, base + len));
        let mut region = SharedRegion::map_at(base, len.max(PAGE_SIZE) as usize)
            .step(root, || format!("creating shared memory object {}", o.ino))?;
        let mem = region.as_mut_slice();
        let owner = -1 - i as i32;
        let mut buf = Vec::new();
        for c in image.chunks().filter(|c| c.pid == owner) {
            let data = c.pages(&mut buf).map_err(|e| {
                RestoreError::Image(crate::image::ImageError::Corrupt {
                    path: image.dir.join("pages").display().to_string(),
                    offset: 0,
                    what: format!("shared memory chunk at {:#x}: {e}", c.addr),
                })
            })?;
            mem[c.addr as usize..c.addr as usize + data.len()].copy_from_slice(data);
        }
        objects.push(SharedObject {
            ino: o.ino,
            len,
            region,
        });
    }
    Ok(objects)
}
