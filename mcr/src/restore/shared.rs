//! Shared anonymous memory: each object is made once, here, filled from the image, and
//! inherited by every stub (fork keeps MAP_SHARED mappings shared). Each process then
//! maps the parts it had with mremap, which for a shared mapping and an old size of 0
//! makes another mapping of the same pages.

use super::build::find_gap;
use super::{RestoreError, Result, StepContext};
use crate::image::Image;
use kext_shim::mem::SharedRegion;
use kext_shim::{procfs, Pid, PAGE_SIZE};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// One object, alive in this process (and so in the stubs forked from it).
pub struct SharedObject {
    pub ino: u64,
    backing: Owned,
}

enum Owned {
    /// Anonymous shared memory, mapped here.
    Region { region: SharedRegion, len: u64 },
    /// A memfd, open here.
    Memfd(OwnedFd),
}

/// Where an object is in the stubs.
#[derive(Debug, Clone, Copy)]
pub struct Placed {
    pub ino: u64,
    pub at: Backing,
}

#[derive(Debug, Clone, Copy)]
pub enum Backing {
    /// Mapped at `base` for `len` bytes; processes map their parts with mremap.
    Region { base: u64, len: u64 },
    /// Open as fd `fd`; processes map it and reopen it through /proc/self/fd.
    Memfd { fd: i32 },
}

pub type Placement = Vec<Placed>;

pub fn placement(objects: &[SharedObject]) -> Placement {
    objects
        .iter()
        .map(|o| Placed {
            ino: o.ino,
            at: match &o.backing {
                Owned::Region { region, len } => Backing::Region {
                    base: region.addr(),
                    len: *len,
                },
                Owned::Memfd(fd) => Backing::Memfd { fd: fd.as_raw_fd() },
            },
        })
        .collect()
}

/// The memfd of `ino`, as an fd number the stubs share.
pub fn memfd_fd(placement: &Placement, ino: u64) -> Option<i32> {
    placement.iter().find_map(|p| match p.at {
        Backing::Memfd { fd } if p.ino == ino => Some(fd),
        _ => None,
    })
}

/// Maps every object of the image at an address no process of the image uses, and
/// fills it.
pub fn prepare(image: &Image) -> Result<Vec<SharedObject>> {
    let snap = &image.snapshot;
    let root = snap.inventory.root_pid;
    if snap.shmem.is_empty() {
        return Ok(Vec::new());
    }
    let ours = procfs::read_layout(Pid::this()).step(root, || "reading our own maps".into())?;
    let mut used: Vec<(u64, u64)> = ours.iter().map(|m| (m.start, m.end)).collect();
    for p in &snap.processes {
        used.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
    }
    let mut objects = Vec::with_capacity(snap.shmem.len());
    for (i, o) in snap.shmem.iter().enumerate() {
        if o.sysv.is_some() {
            // Made in the tree's new ipc namespace instead (see `make_sysv`).
            continue;
        }
        let owner = -1 - i as i32;
        let mut buf = Vec::new();
        let chunk_err = |addr: u64, e: String| {
            RestoreError::Image(crate::image::ImageError::Corrupt {
                path: image.dir.join("pages").display().to_string(),
                offset: 0,
                what: format!("shared memory chunk at {addr:#x}: {e}"),
            })
        };
        if let Some(m) = &o.memfd {
            let fd = make_memfd(root, o.ino, &m.name, o.size)?;
            let file = std::fs::File::from(fd);
            for c in image.chunks().filter(|c| c.pid == owner) {
                let data = c.pages(&mut buf).map_err(|e| chunk_err(c.addr, e))?;
                // Pages run to a page boundary; the memfd ends where it ended.
                let n = (o.size.saturating_sub(c.addr) as usize).min(data.len());
                file.write_all_at(&data[..n], c.addr)
                    .step_io(root, || format!("filling memfd {}", m.name))?;
            }
            if m.seals != 0 {
                nix::fcntl::fcntl(
                    file.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(
                        m.seals as i32,
                    )),
                )
                .map_err(|e| {
                    kext_shim::SysError::new(format!("sealing memfd {}", m.name), e).into()
                })
                .step(root, || "sealing a memfd".into())?;
            }
            objects.push(SharedObject {
                ino: o.ino,
                backing: Owned::Memfd(file.into()),
            });
            continue;
        }
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
        for c in image.chunks().filter(|c| c.pid == owner) {
            let data = c.pages(&mut buf).map_err(|e| chunk_err(c.addr, e))?;
            mem[c.addr as usize..c.addr as usize + data.len()].copy_from_slice(data);
        }
        objects.push(SharedObject {
            ino: o.ino,
            backing: Owned::Region { region, len },
        });
    }
    Ok(objects)
}

/// Makes the SysV objects of the tree's ipc namespace again, with their ids, in the new
/// ipc namespace of `pid`, segments filled from the image. Returns them, for the
/// segments marked for removal to be removed once attached again.
pub fn make_sysv(image: &Image, pid: Pid) -> Result<Option<kext_shim::sysv::Objects>> {
    let snap = &image.snapshot;
    let root = snap.inventory.root_pid;
    let Some(ns) = snap
        .processes
        .first()
        .and_then(|p| p.namespaces.ipc.as_ref())
    else {
        return Ok(None);
    };
    let perm = |p: &crate::model::SysvPerm| kext_shim::sysv::Perm {
        key: p.key,
        id: p.id,
        uid: p.uid,
        gid: p.gid,
        mode: p.mode,
    };
    let segments: Vec<usize> = (0..snap.shmem.len())
        .filter(|&i| snap.shmem[i].sysv.is_some())
        .collect();
    let objects = kext_shim::sysv::Objects {
        shm: segments
            .iter()
            .map(|&i| {
                let o = &snap.shmem[i];
                kext_shim::sysv::Shm {
                    perm: perm(o.sysv.as_ref().expect("filtered")),
                    size: o.size,
                }
            })
            .collect(),
        sem: ns
            .sem
            .iter()
            .map(|s| kext_shim::sysv::Sem {
                perm: perm(&s.perm),
                values: s.values.clone(),
            })
            .collect(),
        msg: ns
            .msg
            .iter()
            .map(|q| kext_shim::sysv::Msg {
                perm: perm(&q.perm),
                qbytes: q.qbytes,
                messages: q.messages.clone(),
            })
            .collect(),
        limits: ns.limits.clone(),
    };
    let mut buf = Vec::new();
    kext_shim::sysv::create(pid, &objects, |i, mem| {
        let owner = -1 - segments[i] as i32;
        for c in image.chunks().filter(|c| c.pid == owner) {
            let data = c
                .pages(&mut buf)
                .map_err(|e| kext_shim::Error::Unexpected {
                    pid: root,
                    what: format!("SysV segment chunk at {:#x}: {e}", c.addr),
                })?;
            let at = c.addr as usize;
            let n = mem.len().saturating_sub(at).min(data.len());
            mem[at..at + n].copy_from_slice(&data[..n]);
        }
        Ok(())
    })
    .step(root, || "making its SysV IPC objects again".into())?;
    Ok(Some(objects))
}

fn make_memfd(pid: i32, ino: u64, name: &str, size: u64) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    let fd =
        nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(|e| {
                kext_shim::SysError::new(format!("memfd_create({name:?}) for inode {ino}"), e)
                    .into()
            })
            .step(pid, || "recreating a memfd".into())?;
    nix::unistd::ftruncate(&fd, size as i64)
        .map_err(|e| kext_shim::SysError::new(format!("ftruncate memfd {name:?}"), e).into())
        .step(pid, || "sizing a memfd".into())?;
    Ok(fd)
}

trait StepIo<T> {
    fn step_io(self, pid: i32, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> StepIo<T> for std::io::Result<T> {
    fn step_io(self, pid: i32, what: impl FnOnce() -> String) -> Result<T> {
        let w = what();
        self.map_err(|e| kext_shim::Error::io(w.clone(), e))
            .step(pid, || w)
    }
}
