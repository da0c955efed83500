//! Write tracking from one image to the next (`mcr pre-dump`, `--prev-images-dir`).
//!
//! A pre-dump registers every private VMA of each process with a userfaultfd in async
//! write-protect mode (see `kext_shim::dirty`) and hands the userfaultfds to a small
//! process of mcr's, `mcr hold-tracker`, because the registrations live exactly as long
//! as someone holds them. The next image asks the kernel which pages were written since,
//! and only trusts the answer while that very holder (pid and start time) still lives:
//! any doubt means a full copy of the VMA, never a missing page.
//!
//! The holder ends when every tracked process has exited, when the next pre-dump
//! replaces it, when a checkpoint that used it succeeds, or when it is killed; its end
//! removes the write-protection from the workload.

use super::mm::WrittenSince;
use super::{DumpError, Result, StepContext};
use crate::image::Image;
use crate::model::{ParentImage, Snapshot, TrackerImage, Vma};
use crate::ranges::{intersect, union};
use kext_shim::dirty::{self, WriteTracker};
use kext_shim::mem::Pagemap;
use kext_shim::procfs::MapEntry;
use kext_shim::Pid;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// The image a new one builds on, and whether its tracking still holds.
pub struct Previous {
    /// Its inventory and processes (its pages are not read: the restore checks them).
    pub snapshot: Snapshot,
    /// Its directory as the new image will name it.
    pub dir: String,
    /// The holder keeping the tracking, or None when the caller keeps it (the
    /// rounds of a migration).
    holder: Option<TrackerImage>,
    /// The pids tracked.
    pids: Vec<i32>,
    live: bool,
}

impl Previous {
    /// Opens (and checks) the image in `prev`, which the image in `new_dir` will build on.
    pub fn open(pid: i32, prev: &Path, new_dir: &Path) -> Result<Self> {
        let snapshot =
            Image::read_snapshot(prev).map_err(|source| DumpError::Image { pid, source })?;
        let Some(tracker) = snapshot.inventory.tracker.clone() else {
            return Err(DumpError::Refused {
                pid,
                what: format!(
                    "on top of {}: that image was not taken with write tracking (make it with mcr pre-dump)",
                    prev.display()
                ),
            });
        };
        if !tracker.pids.contains(&pid) {
            return Err(DumpError::Refused {
                pid,
                what: format!(
                    "on top of {}: that image tracks pids {:?}, not this tree",
                    prev.display(),
                    tracker.pids
                ),
            });
        }
        let live = holder_alive(&tracker);
        if !live {
            tracing::warn!(
                "the write tracking of {} ended (its holder, pid {}, is gone): every page is copied",
                prev.display(),
                tracker.holder_pid
            );
        }
        let dir = parent_dir(pid, prev, new_dir)?;
        Ok(Self {
            snapshot,
            dir,
            pids: tracker.pids.clone(),
            holder: Some(tracker),
            live,
        })
    }

    /// Opens the image in `prev` whose tracking the caller holds (its userfaultfds, for
    /// `pids`): live as long as the caller keeps them.
    pub fn open_held(pid: i32, prev: &Path, new_dir: &Path, pids: Vec<i32>) -> Result<Self> {
        let snapshot =
            Image::read_snapshot(prev).map_err(|source| DumpError::Image { pid, source })?;
        let dir = parent_dir(pid, prev, new_dir)?;
        Ok(Self {
            snapshot,
            dir,
            holder: None,
            pids,
            live: true,
        })
    }

    /// Whether the kernel still tracks the tree's writes for this image.
    pub fn live(&self) -> bool {
        self.live
    }

    pub fn parent_ref(&self) -> ParentImage {
        ParentImage {
            dir: self.dir.clone(),
            image_id: self.snapshot.inventory.image_id,
        }
    }

    /// For process `pid` (as the host sees it): the runs of each VMA written since this
    /// image, or None for a VMA to copy whole. `reprotect` starts a new round at once.
    /// `seen` are runs that scans of the running process found written since this
    /// image (see [`scan_running`]): protected again by those scans, they are part of
    /// the answer.
    pub fn written_fn<'a>(
        &'a self,
        pid: Pid,
        reprotect: bool,
        seen: &'a [(u64, u64)],
    ) -> Result<Box<WrittenSince<'a>>> {
        // The image names the process as it sees itself (in its own pid namespace,
        // its number there).
        let seen_as = kext_shim::procfs::Status::read(pid)
            .ok()
            .and_then(|st| st.numbers("NSpid").ok()?.last().copied())
            .map_or(pid.as_raw(), |n| n as i32);
        let tracked = self.live
            && self.pids.contains(&pid.as_raw())
            && self.snapshot.processes.iter().any(|p| p.pid == seen_as);
        let pagemap = Pagemap::open(pid).step(pid, || "opening pagemap".into())?;
        Ok(Box::new(move |v: &Vma| {
            if !tracked || !v.private_anonymous() {
                return Ok(None);
            }
            let found = written_on_every_core(pid, &pagemap, v.start, v.end, reprotect)
                .step(pid, || {
                    format!("reading the writes to {:#x}-{:#x}", v.start, v.end)
                })?;
            Ok(found.map(|runs| match seen {
                [] => runs,
                seen => union(&runs, &intersect(seen, &[(v.start, v.end)])),
            }))
        }))
    }

    /// Ends the tracking this image relies on, if a holder keeps it (the caller's
    /// own ends when it drops it).
    pub fn end(&self) -> Result<()> {
        self.holder.as_ref().map_or(Ok(()), end_holder)
    }
}

/// What [`dirty::written`] says of a range.
type Written = Option<Vec<(u64, u64)>>;

/// From how big a range [`written_on_every_core`] splits its scan.
const SPLIT_SCAN_AT: u64 = 128 << 20;

/// [`dirty::written`], in one piece per core for a big range: the page-table walk costs
/// 0.7-0.9 ms a GiB here whatever was written, and the tree is frozen meanwhile (in
/// the blackout, for the last one); on two cores 0.4-0.7 ms. Each piece is a walk of
/// its own under the mmap lock, which walks only read.
fn written_on_every_core(
    pid: Pid,
    pm: &Pagemap,
    start: u64,
    end: u64,
    reprotect: bool,
) -> kext_shim::Result<Written> {
    let workers = crate::par::workers_for(end - start) as u64;
    if end - start < SPLIT_SCAN_AT || workers < 2 {
        return dirty::written(pm, start, end, reprotect);
    }
    let piece = ((end - start) / workers).next_multiple_of(kext_shim::PAGE_SIZE);
    let pieces: Vec<(u64, u64)> = (0..workers)
        .map(|i| (start + i * piece, (start + (i + 1) * piece).min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    let found: Vec<kext_shim::Result<Written>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pieces[1..]
            .iter()
            .map(|&(s, e)| scope.spawn(move || dirty::written(pm, s, e, reprotect)))
            .collect();
        let first = dirty::written(pm, pieces[0].0, pieces[0].1, reprotect);
        std::iter::once(first)
            .chain(handles.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(kext_shim::Error::Unexpected {
                        pid: pid.as_raw(),
                        what: "a scan of written pages panicked".into(),
                    })
                })
            }))
            .collect()
    });
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for f in found {
        // Untracked anywhere: the whole range is copied, as one scan would say.
        let Some(more) = f? else { return Ok(None) };
        // A run across a boundary between pieces is one again.
        runs = union(&runs, &more);
    }
    Ok(Some(runs))
}

/// How an image in `new_dir` names its parent in `prev`.
fn parent_dir(pid: i32, prev: &Path, new_dir: &Path) -> Result<String> {
    relative_to(prev, new_dir).map_err(|what| DumpError::Image {
        pid,
        source: crate::image::ImageError::Directory {
            dir: prev.display().to_string(),
            what,
        },
    })
}

/// Whether the holder is alive and still the process that was started.
fn holder_alive(t: &TrackerImage) -> bool {
    let pid = Pid::from_raw(t.holder_pid);
    match kext_shim::procfs::Stat::read(pid) {
        Ok(st) => st.state() != 'Z' && st.field(22) == t.holder_start,
        Err(_) => false,
    }
}

/// Stops the holder (if it still is that process) and waits until it is gone, and with
/// it every registration it held.
pub fn end_holder(t: &TrackerImage) -> Result<()> {
    let pid = Pid::from_raw(t.holder_pid);
    let Ok(pidfd) = kext_shim::pidfd::pidfd_open(pid) else {
        return Ok(());
    };
    // Checked after the pidfd is taken: the pid cannot change hands in between.
    if !holder_alive(t) {
        return Ok(());
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| kext_shim::SysError::new(format!("kill(SIGTERM) holder {pid}"), e).into())
        .step(pid, || "ending the write tracker".into())?;
    // A pidfd reads ready once its process exited, after its files were closed.
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(5000u16)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) => {
                return Err(DumpError::Kernel {
                    pid: t.holder_pid,
                    step: "ending the write tracker".into(),
                    source: kext_shim::Error::Unexpected {
                        pid: t.holder_pid,
                        what: "still alive 5 s after SIGTERM".into(),
                    },
                })
            }
            _ => return Ok(()),
        }
    }
}

/// Starts `mcr hold-tracker` with the trackers' userfaultfds, inherited across exec
/// under their numbers here.
pub fn spawn_holder(trackers: Vec<WriteTracker>) -> Result<TrackerImage> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let root = trackers.first().map_or(0, |t| t.pid().as_raw());
    let fail = |what: String, e: std::io::Error| DumpError::Kernel {
        pid: root,
        step: "starting the write tracker's holder".into(),
        source: kext_shim::Error::io(what, e),
    };
    let exe = crate::mcr_exe().map_err(|e| fail("the mcr executable".into(), e))?;
    let fds: Vec<String> = trackers.iter().map(|t| t.as_raw_fd().to_string()).collect();
    let pids: Vec<String> = trackers.iter().map(|t| t.pid().to_string()).collect();
    let flags = |f| -> std::io::Result<()> {
        for t in &trackers {
            fcntl(t.as_raw_fd(), FcntlArg::F_SETFD(f)).map_err(std::io::Error::from)?;
        }
        Ok(())
    };
    // Inherited by this one child: nothing else is spawned meanwhile.
    flags(FdFlag::empty()).map_err(|e| fail("clearing close-on-exec".into(), e))?;
    let child = Command::new(&exe)
        .args([
            "hold-tracker",
            "--fds",
            &fds.join(","),
            "--pids",
            &pids.join(","),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn();
    let restored = flags(FdFlag::FD_CLOEXEC);
    let child = child.map_err(|e| fail(exe.display().to_string(), e))?;
    restored.map_err(|e| fail("setting close-on-exec".into(), e))?;
    // spawn returns once the exec happened: the holder has its copies now.
    let holder = Pid::from_raw(child.id() as i32);
    let start = kext_shim::procfs::Stat::read(holder)
        .step(holder, || "reading the holder's start time".into())?
        .field(22);
    Ok(TrackerImage {
        holder_pid: holder.as_raw(),
        holder_start: start,
        pids: trackers.iter().map(|t| t.pid().as_raw()).collect(),
    })
}

/// `mcr hold-tracker`: keeps the inherited userfaultfds (one per pid, in order) open
/// until each process has exited, or until told to stop. Not for people.
pub fn hold_main(fds: &[i32], pids: &[i32]) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    // Out of the terminal's job control; a hangup or ^C is not for us (blocked for
    // good, they never arrive). SIGTERM ends us.
    let _ = nix::unistd::setsid();
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGHUP);
    let _ = mask.thread_block();
    if fds.len() != pids.len() {
        return ExitCode::from(2);
    }
    let mut held = Vec::new();
    for (&fd, &pid) in fds.iter().zip(pids) {
        let pid = Pid::from_raw(pid);
        let Ok(t) = WriteTracker::from_inherited(pid, fd) else {
            return ExitCode::from(1);
        };
        // A process already gone needs no tracking.
        if let Ok(pidfd) = kext_shim::pidfd::pidfd_open(pid) {
            held.push((pidfd, t));
        }
    }
    while !held.is_empty() {
        let mut polls: Vec<PollFd> = held
            .iter()
            .map(|(p, _)| PollFd::new(p.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut polls, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitCode::from(1),
            Ok(_) => {}
        }
        let gone: Vec<bool> = polls
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(polls);
        let mut i = 0;
        held.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
    }
    ExitCode::SUCCESS
}

/// `to` as a path relative to directory `from` (both made absolute first), so that
/// sibling image directories keep finding each other when moved together.
fn relative_to(to: &Path, from: &Path) -> std::result::Result<String, String> {
    let abs = |p: &Path| -> std::result::Result<PathBuf, String> {
        match p.canonicalize() {
            Ok(c) => Ok(c),
            // The new directory may not exist yet: its parent does.
            Err(_) => {
                let name = p.file_name().ok_or("has no name")?;
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                Ok(parent.canonicalize().map_err(|e| e.to_string())?.join(name))
            }
        }
    };
    let (to, from) = (abs(to)?, abs(from)?);
    let a: Vec<Component> = to.components().collect();
    let b: Vec<Component> = from.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &a[common..] {
        rel.push(c);
    }
    if rel.as_os_str().is_empty() {
        return Err("is the new image's own directory".into());
    }
    Ok(rel.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_paths_are_relative_to_the_child() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("a/pre1")).unwrap();
        std::fs::create_dir_all(base.join("b")).unwrap();
        let rel = |x: &str, y: &str| relative_to(&base.join(x), &base.join(y)).unwrap();
        assert_eq!(rel("a/pre1", "a/final"), "../pre1");
        assert_eq!(rel("a/pre1", "b/final"), "../../a/pre1");
        assert_eq!(rel("a/pre1", "a/pre1/inner"), "..");
        assert!(relative_to(&base.join("a/pre1"), &base.join("a/pre1")).is_err());
    }
}

/// What a tree wrote since its tracking began, read while it runs.
#[derive(Debug, Clone, Default)]
pub struct WrittenNow {
    /// Bytes of tracked memory written since.
    pub written: u64,
    /// Bytes of memory tracked (private anonymous, protected by a tracker).
    pub tracked: u64,
    /// Bytes of private anonymous memory not tracked (new since, or given up).
    pub untracked: u64,
    /// How long the walks of the page tables took: what a checkpoint's reading of the
    /// same writes costs it while frozen.
    pub scan: std::time::Duration,
}

/// The maps a pre-dump tracks: private, writable, anonymous.
fn tracked_maps(maps: &[MapEntry]) -> impl Iterator<Item = &MapEntry> {
    maps.iter().filter(|m| {
        !m.shared && m.write && (m.path.is_empty() || m.path == "[heap]" || m.path == "[stack]")
    })
}

/// What process `p` wrote since the last scan of its tracking (a round's, or one of
/// these), read while it runs and protected again in the same walk. A write racing
/// with the walk is reported now or marks its page for the next scan: the kernel
/// reports and protects each page under its page table lock. A migration scans this
/// way while it waits for its destination, so that the next round's scan, made
/// frozen, finds only what was written since the last of these however long the wait
/// was (a 4 GiB round after the first one's 8 s fill froze the workload for 21 ms).
///
/// The layout may change under the walk. A walk that fails part way may have
/// protected pages it could not report (a VMA unmapped and mapped again untracked in
/// its range makes it EPERM): such a map is returned whole, as written.
pub fn scan_running(p: Pid) -> Result<Vec<(u64, u64)>> {
    let maps = kext_shim::procfs::read_layout(p).step(p, || "reading its maps".into())?;
    let pagemap = Pagemap::open(p).step(p, || "opening pagemap".into())?;
    let mut found = Vec::new();
    for m in tracked_maps(&maps) {
        match dirty::written(&pagemap, m.start, m.end, true) {
            Ok(Some(runs)) => found.extend(runs),
            Ok(None) => found.push((m.start, m.end)),
            Err(e) if e.errno() == Some(kext_shim::Errno::ESRCH) => {
                return Err(e).step(p, || "reading its writes while it runs".into())
            }
            Err(e) => {
                tracing::debug!(
                    pid = p.as_raw(),
                    "{:#x}-{:#x} taken whole: {e}",
                    m.start,
                    m.end
                );
                found.push((m.start, m.end));
            }
        }
    }
    Ok(crate::ranges::merge(found))
}

/// Reads, without freezing anything, how much of the tree at `pid` was written since
/// a pre-dump started tracking it (whose holder must still hold it): the written bits
/// alone, nothing protected again. What a preview samples a dirty rate with, with no
/// pause of the workload for it.
pub fn written_now(pid: Pid) -> Result<WrittenNow> {
    let mut out = WrittenNow::default();
    for p in super::freeze::descendants(pid) {
        let maps = kext_shim::procfs::read_layout(p).step(p, || "reading its maps".into())?;
        let pagemap = Pagemap::open(p).step(p, || "opening pagemap".into())?;
        for m in tracked_maps(&maps) {
            let len = m.end - m.start;
            let t = std::time::Instant::now();
            let found = dirty::written(&pagemap, m.start, m.end, false);
            out.scan += t.elapsed();
            match found {
                Ok(Some(runs)) => {
                    out.tracked += len;
                    out.written += runs.iter().map(|(s, e)| e - s).sum::<u64>();
                }
                // Not tracked (or gone since the maps were read).
                Ok(None) | Err(_) => out.untracked += len,
            }
        }
    }
    Ok(out)
}
