//! Checkpoint: freeze a process, describe it as a [`Snapshot`], write the image, then
//! kill it, leave it running or leave it stopped.
//!
//! The workload is sacred: until the image is complete and synced, every failure puts its
//! registers back and detaches, so it resumes exactly where it was.

mod cgroup;
mod fds;
mod freeze;
mod inet;
mod ipc;
mod mm;
mod mntns;
mod parasite;
mod pidns;
pub mod predump;
mod pty;
mod sockets;
mod task;
pub mod track;
pub mod vmflags;

use crate::image::{Compression, ImageError, ImageWriter, WriteStats, FORMAT_VERSION};
use crate::model::{Inventory, Snapshot};
use freeze::FrozenTree;
use kext_shim::Pid;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What happens to the workload once its image is safely written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterDump {
    /// Killed, as CRIU does by default: the image is now the workload.
    #[default]
    Kill,
    LeaveRunning,
    LeaveStopped,
}

#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub pid: i32,
    pub dir: PathBuf,
    pub after: AfterDump,
    /// The workload's stdio (a terminal or pipes of the caller) is outside the image and
    /// will be rebound to the restorer's own.
    pub shell_job: bool,
    pub compression: Compression,
    /// Freeze through this cgroup v2 directory or v1 freezer cgroup (which must hold the
    /// tree and nothing else). Without it, the tree's own cgroup is used when it holds
    /// nothing else.
    pub freeze_cgroup: Option<PathBuf>,
    /// Take established TCP connections (TCP_REPAIR), their packets dropped on the
    /// wire (nftables) from the freeze until they are restored or let go.
    pub tcp_established: bool,
    /// An image taken with write tracking (a pre-dump): pages not written since are
    /// left to it.
    pub prev: Option<PathBuf>,
    /// The pids whose tracking since `prev` the caller holds (a migration's rounds);
    /// empty when a holder process keeps it (`mcr pre-dump`).
    pub prev_held_pids: Vec<i32>,
    /// Per process (its host pid): runs found written since `prev` by scans made while
    /// the tree ran, which protected them again (see [`track::scan_running`]).
    pub seen: Vec<(i32, Vec<(u64, u64)>)>,
    /// VMA flags read before the freeze, to spare the blackout smaps (see `vmflags`).
    pub vm_flags: Option<std::sync::Arc<vmflags::VmFlagsAhead>>,
    /// Post-copy: the pages of private anonymous memory are left out of the image and
    /// listed instead ([`HeldCheckpoint::lazy`]), for whoever holds the frozen tree to
    /// hand out on demand.
    pub lazy: bool,
    /// For `lazy`: pages the last pre-copy round found written, per process (as the
    /// image names it), sorted: written again since, a page is hot and goes in the
    /// blackout rather than on first touch (see `mm::PagePlan::take_lazy`).
    pub hot: Vec<(i32, Vec<(u64, u64)>)>,
    /// Look at everything a checkpoint would take and refuse what it would refuse,
    /// then resume: no page is copied, no image written, no connection stopped.
    pub dry_run: bool,
    /// Copy no page of the processes' own memory: the image lists them, for a
    /// migration's destination on this host to read from the tree while whoever holds
    /// it keeps it frozen (see `PagesInSource`). Shared memory is stored as ever.
    pub pages_in_source: bool,
}

/// What a dry run found: the tree a checkpoint would take.
#[derive(Debug, Clone, Default)]
pub struct DryRunReport {
    pub pid: i32,
    pub processes: usize,
    pub threads: usize,
    pub fds: usize,
    /// Established TCP connections (which need --tcp-established).
    pub tcp_connections: usize,
    /// Bytes of the private and shared VMAs a checkpoint would look at.
    pub mapped_bytes: u64,
    /// From the freeze to the resume.
    pub frozen_for: Duration,
    pub steps: Vec<(&'static str, Duration)>,
}

/// The pages a post-copy checkpoint left out of its image for one process.
#[derive(Debug, Clone)]
pub struct LazyPages {
    /// The process as the image names it.
    pub pid: i32,
    /// The process here, where the pages are read from.
    pub host: i32,
    /// `(address, pages)` runs, in address order.
    pub runs: Vec<(u64, u64)>,
}

/// What a checkpoint did and how long each step took.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub pid: i32,
    pub stats: WriteStats,
    /// From the freeze to the moment the workload was released (killed or resumed).
    pub frozen_for: Duration,
    pub steps: Vec<(&'static str, Duration)>,
    /// How the tree was stopped: "cgroup" or "ptrace".
    pub freezer: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("pid {0}: no such process")]
    NoProcess(i32),
    #[error("pid {pid}: cannot checkpoint {what}")]
    Refused { pid: i32, what: String },
    #[error("pid {pid}: cannot trace it: {source}")]
    Trace {
        pid: i32,
        #[source]
        source: kext_shim::Error,
    },
    #[error("pid {pid}: {step}: {source}")]
    Kernel {
        pid: i32,
        step: String,
        #[source]
        source: kext_shim::Error,
    },
    #[error("pid {pid}: unsupported: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("pid {pid}: fault injected at {point} (MCR_FAULT)")]
    FaultInjected { pid: i32, point: &'static str },
    /// Not a failure: a dry run ends here, the tree resumed ([`dry_run`]).
    #[error("pid {}: dry run: nothing written", .0.pid)]
    DryRun(Box<DryRunReport>),
    #[error("pid {pid}: writing the image: {source}")]
    Image {
        pid: i32,
        #[source]
        source: ImageError,
    },
}

impl DumpError {
    /// The process exit code `mcr checkpoint` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            DumpError::NoProcess(_) => 3,
            DumpError::Trace { .. } | DumpError::Refused { .. } => 4,
            DumpError::Unsupported { .. } => 5,
            DumpError::Image { .. } => 6,
            DumpError::Kernel { .. } | DumpError::FaultInjected { .. } => 1,
            DumpError::DryRun(_) => 0,
        }
    }
}

pub type Result<T> = std::result::Result<T, DumpError>;

/// Adds the pid and step to a kext-shim error.
pub(crate) trait StepContext<T> {
    fn step(self, pid: Pid, step: impl FnOnce() -> String) -> Result<T>;
}

impl<T> StepContext<T> for kext_shim::Result<T> {
    fn step(self, pid: Pid, step: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| DumpError::Kernel {
            pid: pid.as_raw(),
            step: step(),
            source,
        })
    }
}

/// Checkpoints process `opts.pid` into `opts.dir` and keeps it frozen.
pub fn checkpoint_held(opts: &CheckpointOptions) -> Result<HeldCheckpoint> {
    let pid = Pid::from_raw(opts.pid);
    let raw = opts.pid;
    let mut steps = Vec::new();
    let t0 = Instant::now();
    task::precheck(pid)?;
    let prev = match &opts.prev {
        Some(p) if opts.prev_held_pids.is_empty() => {
            Some(track::Previous::open(raw, p, &opts.dir)?)
        }
        Some(p) => Some(track::Previous::open_held(
            raw,
            p,
            &opts.dir,
            opts.prev_held_pids.clone(),
        )?),
        None => None,
    };
    let writer = ImageWriter::create(&opts.dir, opts.compression)
        .map_err(|source| DumpError::Image { pid: raw, source })?;

    // The wire lock's holder is started before the freeze: an exec the frozen tree
    // need not wait for.
    let ready = (opts.tcp_established && !opts.dry_run).then(|| {
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        crate::netlock::Ready::new(tag)
    });
    // Loaded before the freeze, not in it.
    vmflags::fast();
    let t_freeze = Instant::now();
    let (mut tree, freezer) = freeze_tree(pid, opts.freeze_cgroup.as_deref())?;
    steps.push(("freeze", t_freeze.elapsed()));
    crate::fault::wait(crate::fault::DUMP_WAIT_AFTER_FREEZE);

    // Declared after the tree: dropped first on failure, which lets the connections go
    // on before the processes resume.
    let mut tcp = inet::TcpCapture::default();
    let result = (|| {
        let t = Instant::now();
        let mut processes = Vec::with_capacity(tree.procs.len());
        for f in tree.procs.iter_mut() {
            processes.push(task::collect(f, opts.shell_job, opts.vm_flags.as_deref())?);
        }
        processes[0].namespaces = task::namespaces(&processes)?;
        if processes[0].namespaces.ipc.is_none() {
            ipc::refuse_host_segments(&processes)?;
        }
        let pipes = fds::resolve_pipes(&mut processes, opts.shell_job)?;
        let mut inet;
        let unix_table = sockets::unix_table(&processes)?;
        (inet, tcp) = inet::resolve(
            &mut processes,
            opts.shell_job,
            opts.tcp_established,
            &unix_table,
        )?;
        if !opts.dry_run {
            tcp.lock(pid, ready)?;
        }
        crate::fault::stall(crate::fault::DUMP_STALL_AFTER_LOCK);
        let unix = sockets::resolve(&mut processes, opts.shell_job, &unix_table)?;
        let mut ptys = pty::resolve(&mut processes, opts.shell_job)?;
        fds::number_file_descriptions(&mut processes)?;
        if opts.dry_run {
            steps.push(("collect state", t.elapsed()));
            return Ok(Err(DryRunReport {
                pid: raw,
                processes: processes.len(),
                threads: processes.iter().map(|p| p.threads.len()).sum(),
                fds: processes.iter().map(|p| p.fds.len()).sum(),
                tcp_connections: tcp.connections(),
                mapped_bytes: processes
                    .iter()
                    .flat_map(|p| &p.mm.vmas)
                    .map(|v| v.end - v.start)
                    .sum(),
                frozen_for: Duration::ZERO,
                steps: Vec::new(),
            }));
        }
        let mut zombies = tree.zombies.clone();
        let view = processes[0]
            .namespaces
            .pid
            .then(|| pidns::PidView::read(&processes, &zombies))
            .transpose()?;
        steps.push(("collect state", t.elapsed()));
        if let Some(a) = &opts.vm_flags {
            // The parasite is gone: the confirmation no longer holds it up.
            a.start_confirming();
        }
        let t = Instant::now();
        let mut inherits = false;
        let mut lazy = Vec::new();
        let mut in_source = Vec::new();
        for p in processes.iter_mut() {
            let host = Pid::from_raw(p.pid);
            let owner = view.as_ref().map_or(p.pid, |v| v.pid(p.pid));
            let mut plan = match &prev {
                // Read only: should this checkpoint fail, the next one needs the same
                // answer.
                Some(prev) => {
                    let seen = opts.seen.iter().find(|s| s.0 == host.as_raw());
                    let seen = seen.map_or(&[][..], |s| &s.1[..]);
                    mm::plan_pages(host, &p.mm, &prev.written_fn(host, false, seen)?)?
                }
                None => mm::plan_pages(host, &p.mm, &|_| Ok(None))?,
            };
            if opts.lazy {
                lazy.push(LazyPages {
                    pid: owner,
                    host: p.pid,
                    runs: plan.take_lazy(
                        &p.mm,
                        &p.threads
                            .iter()
                            .filter_map(|t| t.regs.get(kext_shim::ptrace::RSP_WORD).copied())
                            .collect::<Vec<_>>(),
                        opts.hot
                            .iter()
                            .find(|h| h.0 == owner)
                            .map_or(&[][..], |h| h.1.as_slice()),
                    ),
                });
            }
            if opts.pages_in_source {
                mm::list_pages(host, owner, &plan, &writer)?;
                in_source.push(crate::model::SourceProcess {
                    pid: owner,
                    host_pid: p.pid,
                    start: kext_shim::procfs::Stat::read(host)
                        .step(host, || "reading stat".into())?
                        .field(22),
                });
            } else {
                mm::copy_pages(host, owner, &plan, &writer, None)?;
            }
            if !plan.inherited.is_empty() {
                inherits = true;
                p.mm.parent = Some(crate::model::ParentPages {
                    pid: owner,
                    ranges: plan.inherited,
                });
            }
        }
        let mut shmem = mm::dump_shared_memory(&processes, &writer)?;
        if let Some(ns) = &mut processes[0].namespaces.ipc {
            *ns = ipc::dump(pid, &mut shmem, &writer)?;
        }
        if let Some(v) = &view {
            v.translate(&mut processes, &mut zombies, &mut ptys);
        }
        tcp.read(&mut inet)?;
        steps.push(("dump pages", t.elapsed()));
        if crate::fault::armed(crate::fault::DUMP_AFTER_PAGES) {
            return Err(DumpError::FaultInjected {
                pid: raw,
                point: crate::fault::DUMP_AFTER_PAGES,
            });
        }
        let t = Instant::now();
        let mut inventory = inventory(processes[0].pid, opts, processes.len(), &tcp);
        if let Some(prev) = prev.as_ref().filter(|_| inherits) {
            inventory.parent = Some(prev.parent_ref());
            inventory.features.push(crate::image::PARENT_IMAGES.into());
        }
        if opts.pages_in_source {
            inventory.pages_in_source = Some(crate::model::PagesInSource {
                boot_id: kext_shim::procfs::boot_id(),
                procs: in_source,
            });
            inventory
                .features
                .push(crate::image::PAGES_IN_SOURCE.into());
        }
        let snapshot = Snapshot {
            inventory,
            processes,
            pipes,
            shmem,
            zombies,
            unix,
            ptys,
            inet,
        };
        let stats = writer
            .finish(&snapshot)
            .map_err(|source| DumpError::Image { pid: raw, source })?;
        steps.push(("write image", t.elapsed()));
        Ok(Ok((stats, snapshot.inventory.net_lock, lazy)))
    })();
    // On failure `tree` is dropped here, which resumes every process untouched.
    let (stats, net_lock, lazy) = match result? {
        Ok(done) => done,
        Err(mut dry) => {
            drop(tcp);
            drop(tree);
            dry.frozen_for = t_freeze.elapsed();
            dry.steps = steps;
            return Err(DumpError::DryRun(Box::new(dry)));
        }
    };
    Ok(HeldCheckpoint {
        lazy,
        tcp,
        tree: Some(tree),
        prev,
        hands_over: net_lock.is_some(),
        net_lock,
        lock_handed: false,
        report: CheckpointReport {
            pid: raw,
            stats,
            frozen_for: Duration::ZERO,
            steps,
            freezer,
        },
        t_freeze,
        t0,
    })
}

/// A checkpoint whose image is complete while the tree is still frozen: whoever holds
/// it decides whether the tree dies (its image lives on elsewhere), resumes, or stops.
/// Dropped, it resumes the tree untouched.
pub struct HeldCheckpoint {
    /// With `lazy`: the pages left out of the image, still in the frozen tree.
    pub lazy: Vec<LazyPages>,
    // Before the tree: dropped first, it lets the connections go on before the
    // processes resume.
    tcp: inet::TcpCapture,
    tree: Option<FrozenTree>,
    prev: Option<track::Previous>,
    /// The image owns the connections and their lock once the tree is gone.
    hands_over: bool,
    net_lock: Option<crate::model::NetLockImage>,
    /// The lock went to the destination at the commit point.
    lock_handed: bool,
    pub report: CheckpointReport,
    t_freeze: Instant,
    t0: Instant,
}

impl HeldCheckpoint {
    /// Lets the tree go as `after` says. The write tracking the image built on ends
    /// with it when `end_tracking` (it has served); otherwise it stays for another try.
    pub fn release(self, after: AfterDump, end_tracking: bool) -> Result<CheckpointReport> {
        let HeldCheckpoint {
            lazy: _,
            tcp,
            tree,
            prev,
            hands_over,
            net_lock: _,
            lock_handed,
            mut report,
            t_freeze,
            t0,
        } = self;
        let t = Instant::now();
        let tree = tree.expect("held until released");
        // Killed, or stopped with a destination that may have the connections now: in
        // repair mode they stay silent.
        let silent = after == AfterDump::Kill || (lock_handed && after == AfterDump::LeaveStopped);
        if hands_over && silent {
            // Killed in repair mode, the connections close without a word on the
            // wire; the rules stay until the restore.
            tree.release(after)?;
            tcp.hand_over()?;
        } else {
            // Out of repair mode and unblocked before the processes run again.
            drop(tcp);
            tree.release(after)?;
        }
        report.steps.push(("release", t.elapsed()));
        if end_tracking {
            if let Some(Err(e)) = prev.as_ref().map(|p| p.end()) {
                tracing::warn!("{e}");
            }
        }
        report.frozen_for = t_freeze.elapsed();
        report.steps.push(("total", t0.elapsed()));
        Ok(report)
    }

    /// Queues a SIGSTOP behind every process's ptrace stop: from now on, whatever
    /// happens to us, the tree does not run again unless sent SIGCONT (a migration's
    /// commit: the destination may take over any moment).
    /// The connections' lock goes to the image with it: the destination lifts it.
    pub fn stop_for_good(&mut self) -> Result<()> {
        for f in &self.tree.as_ref().expect("held until released").procs {
            kext_shim::clone::kill(f.pid, libc::SIGSTOP)
                .step(f.pid, || "queueing SIGSTOP for the commit".into())?;
        }
        if self.hands_over {
            self.tcp.hand_lock_over()?;
            self.lock_handed = true;
        }
        Ok(())
    }

    /// Undoes [`stop_for_good`](Self::stop_for_good): lets the tree go and continues it.
    pub fn resume_stopped(self) -> Result<CheckpointReport> {
        let pids: Vec<Pid> = self
            .tree
            .as_ref()
            .expect("held until released")
            .procs
            .iter()
            .map(|f| f.pid)
            .collect();
        let lock = self.lock_handed.then(|| self.net_lock.clone()).flatten();
        // Out of repair mode as it goes...
        let r = self.release(AfterDump::LeaveRunning, true)?;
        // ...then the lock the destination did not lift, with what the peers sent.
        if let Some(l) = lock {
            let mut back = crate::netlock::Release::new(Some(l), None);
            back.open();
            back.done();
        }
        for p in pids {
            kext_shim::clone::kill(p, libc::SIGCONT).step(p, || "continuing it".into())?;
        }
        Ok(r)
    }

    /// How long the tree has been frozen so far.
    pub fn frozen_for(&self) -> Duration {
        self.t_freeze.elapsed()
    }
}

/// Checkpoints process `opts.pid` into `opts.dir`, then lets it go as `opts.after` says.
pub fn checkpoint(opts: &CheckpointOptions) -> Result<CheckpointReport> {
    checkpoint_held(opts)?.release(opts.after, true)
}

/// Freezes the tree at `opts.pid`, looks at everything a checkpoint would take,
/// refuses what it would refuse, and resumes it: nothing is written and no connection
/// is stopped on the wire. What a preview asks before a live update.
pub fn dry_run(opts: &CheckpointOptions) -> Result<DryRunReport> {
    let mut o = opts.clone();
    o.dry_run = true;
    // As a migration does: the VMA flags read while the tree runs, so that the freeze
    // is as long as a migration's last one would be.
    if o.vm_flags.is_none() && vmflags::fast().is_none() {
        let pids = freeze::descendants(Pid::from_raw(opts.pid));
        o.vm_flags = Some(std::sync::Arc::new(vmflags::VmFlagsAhead::read(&pids)));
    }
    match checkpoint_held(&o) {
        Err(DumpError::DryRun(r)) => Ok(*r),
        Err(e) => Err(e),
        // Not reached: the tree resumes as the checkpoint is dropped.
        Ok(_) => Err(DumpError::Unsupported {
            pid: opts.pid,
            what: "a dry run held a checkpoint".into(),
        }),
    }
}

/// Freezes the tree at `pid`, through `cgroup` or the tree's own cgroup when it is
/// alone there (so nothing forks while it is seized), else with ptrace alone. Returns
/// the tree, every thread in a ptrace stop, and how it was stopped.
fn freeze_tree(pid: Pid, cgroup: Option<&std::path::Path>) -> Result<(FrozenTree, &'static str)> {
    let cgroup = match cgroup {
        Some(dir) => Some(dir.to_path_buf()),
        None => cgroup::alone_in(pid, &freeze::descendants(pid)),
    };
    let mut frozen_cgroup = cgroup
        .as_deref()
        .map(|d| cgroup::CgroupFreeze::freeze(pid, d))
        .transpose()?;
    let tree = FrozenTree::freeze(pid, || match &mut frozen_cgroup {
        Some(c) if c.version() == cgroup::Version::V1 => c.thaw(),
        _ => Ok(()),
    })?;
    // Every thread is in a ptrace stop now, which holds it after the thaw.
    let freezer = match frozen_cgroup {
        Some(mut c) => {
            c.thaw()?;
            match c.version() {
                cgroup::Version::V1 => "cgroup-v1",
                cgroup::Version::V2 => "cgroup",
            }
        }
        None => "ptrace",
    };
    Ok((tree, freezer))
}

/// A random id for a new image (the time, should /dev/urandom be unreadable).
pub(crate) fn new_image_id() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

fn inventory(
    pid: i32,
    opts: &CheckpointOptions,
    processes: usize,
    tcp: &inet::TcpCapture,
) -> Inventory {
    let mut features = vec![if processes > 1 {
        "process-tree"
    } else {
        "single-process"
    }
    .to_string()];
    if opts.compression != Compression::None {
        features.push("zstd-pages".into());
    }
    Inventory {
        shell_job: opts.shell_job,
        net_lock: match opts.after {
            AfterDump::Kill => tcp.net_lock(),
            _ => None,
        },
        ..new_inventory(pid, features)
    }
}

/// An inventory for a new image of `root_pid` using `features`: who wrote it, on what,
/// when, with a fresh id; no parent, lock or tracker yet.
pub(crate) fn new_inventory(root_pid: i32, features: Vec<String>) -> Inventory {
    Inventory {
        format_version: FORMAT_VERSION as u32,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        root_pid,
        page_size: kext_shim::PAGE_SIZE as u32,
        features,
        frozen_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        shell_job: false,
        net_lock: None,
        image_id: new_image_id(),
        parent: None,
        tracker: None,
        pages_in_source: None,
    }
}
