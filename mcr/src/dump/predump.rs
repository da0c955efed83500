//! `mcr pre-dump`: copy a running tree's memory and start tracking its writes, so the
//! next image (another pre-dump, or the checkpoint) holds only what was written since.
//!
//! The tree is frozen only to read its maps, swap the write tracking and register its
//! VMAs; its pages are copied after it runs again. That is safe because every page is
//! write-protected before it is copied: a write during the copy marks it for the next
//! image, whichever version this one caught.

use super::mm::{self, Job, PagePlan};
use super::track::{self, Previous};
use super::{freeze_tree, parasite, AfterDump, DumpError, Result, StepContext};
use crate::image::{Compression, ImageWriter, WriteStats, PRE_DUMP};
use crate::model::{
    Creds, FileRef, Inventory, MmImage, Namespaces, PagesInSource, ParentPages, ProcessImage,
    Snapshot, SourceProcess,
};
use kext_shim::dirty::WriteTracker;
use kext_shim::procfs::{self, Stat};
use kext_shim::Pid;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PreDumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    /// The previous pre-dump: this one then holds only the pages written since it.
    pub prev: Option<PathBuf>,
    pub compression: Compression,
    pub freeze_cgroup: Option<PathBuf>,
    /// Copy no page: the image says which are to be read from the tree's memory, by a
    /// migration's destination on this host while the tree runs on (one copy of each
    /// page instead of two, and no staging memory for it).
    pub pages_in_source: bool,
    /// Per process (its host pid): runs found written since `prev` by scans made while
    /// it ran, which protected them again (see [`track::scan_running`]).
    pub seen: Vec<(i32, Vec<(u64, u64)>)>,
}

#[derive(Debug, Clone)]
pub struct PreDumpReport {
    pub pid: i32,
    pub stats: WriteStats,
    /// From the freeze to the moment the tree ran again.
    pub frozen_for: Duration,
    pub steps: Vec<(&'static str, Duration)>,
    /// VMAs whose writes are tracked from now on, and those that could not be.
    pub tracked_vmas: usize,
    pub untracked_vmas: usize,
    /// The process keeping the tracking, unless the caller does.
    pub holder_pid: Option<i32>,
    /// The pages it copied, per process as the image names it, as sorted runs: what a
    /// migration's post-copy takes for hot when written again (see `take_lazy`).
    pub copied: Vec<(i32, Vec<(u64, u64)>)>,
}

/// One process between the freeze and the copy.
struct Proc {
    pid: Pid,
    start: u64,
    ppid: i32,
    pgid: i32,
    sid: i32,
    comm: String,
    mm: MmImage,
    plan: PagePlan,
    tracker: WriteTracker,
    /// VMAs to track once the tree runs again (see below).
    later: Vec<(u64, u64)>,
}

/// A pre-dump whose tracking a holder process keeps (`mcr pre-dump`).
pub fn pre_dump(opts: &PreDumpOptions) -> Result<PreDumpReport> {
    run(opts, Vec::new(), Keep::Holder).map(|(r, _)| r)
}

/// A pre-dump whose tracking the caller keeps: the userfaultfds are returned, and
/// `carried` are those of the round before (whose image is `opts.prev`), scanned and
/// protected again in one walk, so tracking never stops between rounds.
pub fn pre_dump_round(
    opts: &PreDumpOptions,
    carried: Vec<WriteTracker>,
) -> Result<(PreDumpReport, Vec<WriteTracker>)> {
    run(opts, carried, Keep::Caller)
}

enum Keep {
    Holder,
    Caller,
}

fn run(
    opts: &PreDumpOptions,
    mut carried: Vec<WriteTracker>,
    keep: Keep,
) -> Result<(PreDumpReport, Vec<WriteTracker>)> {
    let pid = Pid::from_raw(opts.pid);
    let raw = opts.pid;
    let t0 = Instant::now();
    let mut steps = Vec::new();
    super::task::precheck(pid)?;
    kext_shim::dirty::supported().map_err(|why| DumpError::Unsupported {
        pid: raw,
        what: format!("write tracking (userfaultfd write-protect and PAGEMAP_SCAN): {why}"),
    })?;
    let reprotect = !carried.is_empty();
    let prev = match (&opts.prev, reprotect) {
        (Some(p), false) => Some(Previous::open(raw, p, &opts.dir)?),
        (Some(p), true) => Some(Previous::open_held(
            raw,
            p,
            &opts.dir,
            carried.iter().map(|t| t.pid().as_raw()).collect(),
        )?),
        (None, _) => None,
    };
    let writer = ImageWriter::create(&opts.dir, opts.compression)
        .map_err(|source| DumpError::Image { pid: raw, source })?;

    let t_freeze = Instant::now();
    let (tree, _) = freeze_tree(pid, opts.freeze_cgroup.as_deref())?;
    steps.push(("freeze", t_freeze.elapsed()));
    let t = Instant::now();
    let (mut procs, mut tracked_vmas, mut untracked_vmas) = (|| {
        let mut found = Vec::with_capacity(tree.procs.len());
        for f in &tree.procs {
            let p = f.pid;
            // The layout alone: a pre-dump's VMAs only place its pages (the checkpoint
            // records their flags), and smaps would walk every page table while frozen.
            let maps = procfs::read_layout(p).step(p, || "reading maps".into())?;
            let stat = Stat::read(p).step(p, || "reading stat".into())?;
            let mm = mm::collect(p, &maps, &stat, 0)?;
            // What the previous image's tracking saw, read before it ends (or, when it
            // goes on, protected again in the same walk).
            let plan = match &prev {
                Some(prev) => {
                    let seen = opts.seen.iter().find(|s| s.0 == p.as_raw());
                    let seen = seen.map_or(&[][..], |s| &s.1[..]);
                    mm::plan_written(&mm, &prev.written_fn(p, reprotect, seen)?)?
                }
                None => mm::plan_written(&mm, &|_| Ok(None))?,
            };
            found.push((f, maps, stat, mm, plan));
        }
        // A VMA takes one userfaultfd at a time: the old tracking goes first.
        if let Some(prev) = &prev {
            prev.end()?;
        }
        let (mut tracked, mut untracked) = (0, 0);
        let mut procs = Vec::with_capacity(found.len());
        for (f, maps, stat, mm, plan) in found {
            let (tracker, carried_on) = match carried.iter().position(|t| t.pid() == f.pid) {
                Some(i) => (carried.swap_remove(i), true),
                None => (parasite::write_tracker(f, &maps)?, false),
            };
            let mut later = Vec::new();
            for v in mm.vmas.iter().filter(|v| v.private_anonymous()) {
                let inherited = plan.inherited.contains(&(v.start, v.end));
                // Tracked by this very userfaultfd since the round before, and protected
                // again just now.
                if carried_on && inherited {
                    tracked += 1;
                    continue;
                }
                // Copied whole below: protected once the tree runs again, before its
                // copy, so a write before the protection is in the copy and one after
                // is tracked. At 1 GiB that is most of a first round's freeze.
                if !inherited {
                    later.push((v.start, v.end));
                    continue;
                }
                // Left to the parent for what was not written up to the scan: protected
                // before anything can write it again.
                match tracker.track(v.start, v.end) {
                    Ok(()) => tracked += 1,
                    Err(e) => {
                        tracing::debug!(pid = f.pid.as_raw(), "not tracked: {e}");
                        untracked += 1;
                    }
                }
            }
            procs.push(Proc {
                pid: f.pid,
                start: stat.field(22),
                ppid: stat.field(4) as i32,
                pgid: stat.field(5) as i32,
                sid: stat.field(6) as i32,
                comm: stat.comm.clone(),
                mm,
                plan,
                tracker,
                later,
            });
        }
        Ok::<_, DumpError>((procs, tracked, untracked))
    })()?;
    // On failure above, the trackers and the tree were dropped: nothing is tracked and
    // every process resumes untouched.
    steps.push(("track writes", t.elapsed()));
    tree.release(AfterDump::LeaveRunning)?;
    let frozen_for = t_freeze.elapsed();

    let t = Instant::now();
    for p in &procs {
        for &(start, end) in &p.later {
            match p.tracker.track(start, end) {
                Ok(()) => tracked_vmas += 1,
                // Copied whole next time: unmapped or changed since the freeze, or
                // EBUSY, the process tracks it itself.
                Err(e) => {
                    tracing::debug!(pid = p.pid.as_raw(), "not tracked: {e}");
                    untracked_vmas += 1;
                }
            }
        }
    }
    steps.push(("track the rest", t.elapsed()));
    let t = Instant::now();
    for p in procs.iter_mut() {
        // Chosen now that the next round's tracking holds: the tree may run.
        p.plan.choose_rest(p.pid, &p.mm)?;
    }
    // A tree in a pid namespace of its own is written as it sees itself, as the
    // checkpoint writes it (see pidns): a destination builds the tree early from this
    // (restore::warm), and pages are found by those pids along a chain.
    let bare: Vec<ProcessImage> = procs
        .iter()
        .map(|p| memory_only(p.pid.as_raw(), p.ppid, &p.comm, p.mm.clone()))
        .collect();
    let namespaces = super::task::namespaces(&bare)?;
    let view = namespaces
        .pid
        .then(|| super::pidns::PidView::read(&bare, &[]))
        .transpose()?;
    drop(bare);
    let owner = |pid: Pid| view.as_ref().map_or(pid.as_raw(), |v| v.pid(pid.as_raw()));
    for p in &procs {
        // A run the process unmapped or protected meanwhile is skipped; the next image
        // must then not count on this one for it.
        let skip = |j: &Job| {
            let end = j.addr + j.pages as u64 * kext_shim::PAGE_SIZE;
            p.tracker
                .untrack(j.addr, end)
                .step(p.pid, || "giving up tracking a run that went away".into())
        };
        if opts.pages_in_source {
            mm::list_pages(p.pid, owner(p.pid), &p.plan, &writer)?;
        } else {
            mm::copy_pages(p.pid, owner(p.pid), &p.plan, &writer, Some(&skip))?;
        }
    }
    steps.push(("copy pages", t.elapsed()));
    let pages_in_source = opts.pages_in_source.then(|| PagesInSource {
        boot_id: kext_shim::procfs::boot_id(),
        procs: procs
            .iter()
            .map(|p| SourceProcess {
                pid: owner(p.pid),
                host_pid: p.pid.as_raw(),
                start: p.start,
            })
            .collect(),
    });
    let copied = procs
        .iter()
        .map(|p| (owner(p.pid), p.plan.runs()))
        .collect();

    let mut inherits = false;
    for p in procs.iter_mut() {
        if !p.plan.inherited.is_empty() {
            inherits = true;
            p.mm.parent = Some(ParentPages {
                pid: owner(p.pid),
                ranges: std::mem::take(&mut p.plan.inherited),
            });
        }
    }
    let mut processes: Vec<ProcessImage> = procs
        .iter()
        .map(|p| {
            Ok(ProcessImage {
                pgid: p.pgid,
                sid: p.sid,
                root: procfs::read_link(&format!("/proc/{}/root", p.pid))
                    .step(p.pid, || "reading root".into())?,
                ..memory_only(p.pid.as_raw(), p.ppid, &p.comm, p.mm.clone())
            })
        })
        .collect::<Result<_>>()?;
    // With the sessions and roots: what a destination needs to make the tree early
    // (see restore::warm), which the checkpoint must then match.
    processes[0].namespaces = namespaces;
    if let Some(v) = &view {
        v.translate(&mut processes, &mut [], &mut []);
    }
    let trackers: Vec<WriteTracker> = procs.into_iter().map(|p| p.tracker).collect();
    let (holder, trackers) = match keep {
        Keep::Holder => (Some(track::spawn_holder(trackers)?), Vec::new()),
        Keep::Caller => (None, trackers),
    };
    let t = Instant::now();
    let snapshot = Snapshot {
        inventory: Inventory {
            parent: prev.as_ref().filter(|_| inherits).map(|p| p.parent_ref()),
            tracker: holder.clone(),
            pages_in_source,
            ..super::new_inventory(processes[0].pid, {
                let mut f = vec![PRE_DUMP.to_string()];
                if inherits {
                    f.push(crate::image::PARENT_IMAGES.into());
                }
                if opts.compression != Compression::None {
                    f.push("zstd-pages".into());
                }
                if opts.pages_in_source {
                    f.push(crate::image::PAGES_IN_SOURCE.into());
                }
                f
            })
        },
        processes,
        pipes: vec![],
        shmem: vec![],
        zombies: vec![],
        unix: vec![],
        ptys: vec![],
        inet: vec![],
    };
    let stats = match writer.finish(&snapshot) {
        Ok(s) => s,
        Err(source) => {
            // No image names this tracking: it would only cost the workload.
            if let Some(h) = &holder {
                let _ = track::end_holder(h);
            }
            return Err(DumpError::Image { pid: raw, source });
        }
    };
    steps.push(("write image", t.elapsed()));
    steps.push(("total", t0.elapsed()));
    Ok((
        PreDumpReport {
            pid: raw,
            stats,
            frozen_for,
            steps,
            tracked_vmas,
            untracked_vmas,
            holder_pid: holder.map(|h| h.holder_pid),
            copied,
        },
        trackers,
    ))
}

/// A process record that holds only its address space and its place in the tree: a
/// pre-dump is no workload.
fn memory_only(pid: i32, ppid: i32, comm: &str, mm: MmImage) -> ProcessImage {
    ProcessImage {
        pid,
        ppid,
        pgid: 0,
        sid: 0,
        comm: comm.into(),
        creds: Creds::default(),
        threads: vec![],
        mm,
        fds: vec![],
        cwd: FileRef {
            path: "/".into(),
            identity: Default::default(),
        },
        root: "/".into(),
        umask: 0,
        personality: 0,
        dumpable: 0,
        child_subreaper: false,
        pdeathsig: 0,
        itimers: [(0, 0); 3],
        posix_timers: vec![],
        namespaces: Namespaces::default(),
        rlimits: vec![],
        sigactions: vec![],
        shared_pending: vec![],
    }
}
