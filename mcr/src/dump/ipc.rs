//! SysV IPC: the objects of a tree's own ipc namespace, whole. Segments go with the
//! other shared memory objects (their pages stored once); semaphores, queues and the
//! namespace's limits go with the namespace.

use super::{DumpError, Result, StepContext};
use crate::image::{ImageWriter, CHUNK_PREFIX};
use crate::model::{IpcNs, ProcessImage, ShmemObject, SysvMsg, SysvPerm, SysvSem, VmaKind};
use kext_shim::sysv::Perm;
use kext_shim::{Pid, PAGE_SIZE};

fn perm(p: &Perm) -> SysvPerm {
    SysvPerm {
        key: p.key,
        id: p.id,
        uid: p.uid,
        gid: p.gid,
        mode: p.mode,
    }
}

/// Segments of the host's ipc namespace belong to it, not to the tree: refused.
pub fn refuse_host_segments(procs: &[ProcessImage]) -> Result<()> {
    for p in procs {
        if let Some(v) =
            p.mm.vmas
                .iter()
                .find(|v| matches!(v.kind, VmaKind::SysvShm { .. }))
        {
            let VmaKind::SysvShm { id } = v.kind else {
                unreachable!()
            };
            return Err(DumpError::Unsupported {
                pid: p.pid,
                what: format!(
                    "SysV shared memory segment {id} at {:#x} belongs to the host's ipc namespace; \
                     run the workload in an ipc namespace of its own (unshare --ipc) to take it along",
                    v.start
                ),
            });
        }
    }
    Ok(())
}

/// Everything in the ipc namespace of `root`. Segment pages are written as chunks of
/// the shared memory objects they are appended to `shmem` as; all-zero chunks are left
/// out (they read back as zeros).
pub fn dump(root: Pid, shmem: &mut Vec<ShmemObject>, w: &ImageWriter) -> Result<IpcNs> {
    let first = shmem.len();
    let chunk = crate::image::pages::CHUNK_PAGES * PAGE_SIZE as usize;
    let mut buf = vec![0u8; CHUNK_PREFIX + chunk];
    let mut failed = None;
    let objects = kext_shim::sysv::read(root, |i, bytes| {
        let owner = -1 - (first + i) as i32;
        for (n, part) in bytes.chunks(chunk).enumerate() {
            if part.iter().all(|&b| b == 0) {
                continue;
            }
            let len = part.len().div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
            let b = &mut buf[..CHUNK_PREFIX + len];
            b[CHUNK_PREFIX..].fill(0);
            b[CHUNK_PREFIX..CHUNK_PREFIX + part.len()].copy_from_slice(part);
            if let Err(e) = w.write_chunk(owner, (n * chunk) as u64, b) {
                failed = Some(e);
                return Err(kext_shim::Error::Unexpected {
                    pid: root.as_raw(),
                    what: "writing a SysV segment's pages".into(),
                });
            }
        }
        Ok(())
    });
    if let Some(source) = failed {
        return Err(DumpError::Image {
            pid: root.as_raw(),
            source,
        });
    }
    let objects = objects.step(root, || "reading its SysV IPC objects".into())?;
    for s in &objects.shm {
        shmem.push(ShmemObject {
            ino: s.perm.id as u64,
            size: s.size,
            memfd: None,
            sysv: Some(perm(&s.perm)),
        });
    }
    Ok(IpcNs {
        limits: objects.limits,
        sem: objects
            .sem
            .iter()
            .map(|s| SysvSem {
                perm: perm(&s.perm),
                values: s.values.clone(),
            })
            .collect(),
        msg: objects
            .msg
            .into_iter()
            .map(|q| SysvMsg {
                perm: perm(&q.perm),
                qbytes: q.qbytes,
                messages: q.messages,
            })
            .collect(),
    })
}
