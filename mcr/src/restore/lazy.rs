//! A restore that leaves pages missing (a migration's post-copy): once a process's
//! memory is in place, the pages its source will hand out are dropped (they may hold
//! an older round's bytes), and its private anonymous VMAs that hold them are
//! registered with a userfaultfd made inside it, before anything else of it is
//! restored, so that even the kernel's own accesses to them wait for the server.

use super::build::Ctx;
use super::{Result, StepContext};
use crate::model::{ProcessImage, VmaKind};
use kext_shim::lazy::LazyFd;
use kext_shim::PAGE_SIZE;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// What is left missing, by process, and where each process's userfaultfd goes.
pub struct LazyRestore {
    /// `(address, pages)` runs by the image's pid.
    pub runs: BTreeMap<i32, Vec<(u64, u64)>>,
    /// Each process's userfaultfd as soon as it is made, with the ranges registered
    /// and the host pid: the server must answer its faults from then on.
    pub made: Mutex<std::sync::mpsc::Sender<Made>>,
    /// Written once one is sent, to wake the server.
    pub wake: std::sync::Arc<nix::sys::eventfd::EventFd>,
    /// What the restore would have let go at once but must not while pages are being
    /// placed (its images' mappings).
    pub held: Mutex<Vec<Box<dyn Send>>>,
}

impl LazyRestore {
    pub(super) fn keep(&self, what: Box<dyn Send>) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }
}

/// One process's missing pages, ready to be served.
pub struct Made {
    pub pid: i32,
    pub host: i32,
    pub fd: LazyFd,
    pub registered: Vec<(u64, u64)>,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pages: u64 = self.runs.values().flatten().map(|r| r.1).sum();
        write!(
            f,
            "LazyRestore({} processes, {pages} pages)",
            self.runs.len()
        )
    }
}

/// Drops `p`'s lazy pages and hands its missing memory over to a userfaultfd, if it has
/// any. Runs while the stub is still privileged (the userfaultfd must catch kernel
/// accesses too) and before the rest of the process is restored.
pub(super) fn leave_missing(cx: &mut Ctx, p: &ProcessImage, lazy: &LazyRestore) -> Result<()> {
    let Some(runs) = lazy.runs.get(&p.pid).filter(|r| !r.is_empty()) else {
        return Ok(());
    };
    let pid = cx.pid;
    drop_runs(cx, runs)?;
    let pidfd = kext_shim::pidfd::pidfd_open(kext_shim::Pid::from_raw(pid))
        .step(pid, || "opening a pidfd".into())?;
    let fd = LazyFd::inject(&mut cx.inj, &pidfd).step(pid, || {
        "making a userfaultfd for the pages left to post-copy".into()
    })?;
    // Whole VMAs, so that none is split; their other missing pages are zeros.
    let registered: Vec<(u64, u64)> =
        p.mm.vmas
            .iter()
            .filter(|v| v.kind == VmaKind::Anonymous && !v.shared)
            .filter(|v| {
                runs.iter()
                    .any(|&(a, n)| a < v.end && a + n * PAGE_SIZE > v.start)
            })
            .map(|v| (v.start, v.end))
            .collect();
    for &(start, end) in &registered {
        fd.register(start, end).step(pid, || {
            format!("registering {start:#x}-{end:#x} for post-copy")
        })?;
    }
    lazy.made
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Made {
            pid: p.pid,
            host: pid,
            fd,
            registered,
        })
        .map_err(|_| super::RestoreError::Incompatible {
            pid,
            what: "post-copy: the page server is gone".into(),
        })?;
    let _ = lazy.wake.write(1);
    Ok(())
}

/// Drops the pages of `runs` in the stub: 256 runs a process_madvise where the kernel
/// takes MADV_DONTNEED that way (measured here: 80k runs in 39 ms against 127 ms one
/// madvise each, the stops to inject them aside), else one madvise a run.
fn drop_runs(cx: &mut Ctx, runs: &[(u64, u64)]) -> Result<()> {
    let what = |at: u64| format!("dropping the pages left to post-copy at {at:#x}");
    if !kext_shim::mem::dontneed_many_at_once() {
        let calls: Vec<(i64, [u64; 6])> = runs
            .iter()
            .map(|&(addr, n)| {
                (
                    libc::SYS_madvise,
                    [addr, n * PAGE_SIZE, libc::MADV_DONTNEED as u64, 0, 0, 0],
                )
            })
            .collect();
        return cx.batch(&calls, |i| what(runs[i].0));
    }
    // An iovec is 16 bytes: a data page holds 256.
    const PER_CALL: usize = PAGE_SIZE as usize / 16;
    for part in runs.chunks(PER_CALL) {
        let iovecs: Vec<u8> = part
            .iter()
            .flat_map(|&(addr, n)| [addr, n * PAGE_SIZE])
            .flat_map(u64::to_ne_bytes)
            .collect();
        let at = cx.put(&iovecs)?;
        let call = (
            libc::SYS_process_madvise,
            [
                kext_shim::mem::PIDFD_SELF as i64 as u64,
                at,
                part.len() as u64,
                libc::MADV_DONTNEED as u64,
                0,
                0,
            ],
        );
        let done = cx.batch_results(&[call], |_| what(part[0].0))?;
        // It stops at the first run it cannot drop and says how much it dropped: each
        // page left behind would read its old round's bytes instead of waiting.
        let want: u64 = part.iter().map(|r| r.1 * PAGE_SIZE).sum();
        if done.first() != Some(&want) {
            return Err(super::RestoreError::Incompatible {
                pid: cx.pid,
                what: format!(
                    "{}: {} of {want} bytes dropped",
                    what(part[0].0),
                    done.first().copied().unwrap_or(0)
                ),
            });
        }
    }
    Ok(())
}
