//! Restore: bring a process back from an image, with its pid, at the same addresses,
//! optionally chrooted under another root.
//!
//! The controller (this process) forks a stub with clone3 `set_tid`, then rebuilds it
//! from outside by injecting syscalls (see DESIGN.md): the stub's own memory is unmapped,
//! every VMA recreated and filled, fds, signals, limits and credentials set, and finally
//! the registers. A failure at any step kills the stub: nothing half-made survives.

mod build;
mod files;
pub mod lazy;
mod memory;
mod root;
mod shared;
mod sockets;
mod source;
mod state;
mod stub;
mod threads;
mod warm;

pub use warm::WarmTree;

use root::RestoreRoot;

use crate::image::{Image, ImageError};
use crate::model::{MountNs, MountSource};
use kext_shim::clone::MountOp;
use kext_shim::procfs::Stat;
use kext_shim::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Chroot the process here and reopen every file under it.
    pub root: Option<PathBuf>,
    /// Bind fds that were outside the image (a shell job's stdio) to `stdio`.
    pub shell_job: bool,
    /// Our fds that stand for the image's 0, 1, 2 with `shell_job` (normally 0, 1, 2).
    pub stdio: [i32; 3],
    /// How long to wait for a pid still held by a zombie before calling it taken.
    pub pid_wait: Duration,
    /// Restore into a new pid namespace even if the tree had none of its own: its pids
    /// are then free whatever runs here.
    pub pidns: bool,
    /// Restore into a new mount namespace even if the tree had none of its own; its
    /// root is `root`, pivoted into rather than chrooted.
    pub mntns: bool,
    /// Make the image's established TCP connections again (TCP_REPAIR).
    pub tcp_established: bool,
    /// Restore into this network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`):
    /// the processes live there and their sockets are made there.
    pub netns: Option<PathBuf>,
    /// Post-copy: pages left missing, served on first touch by whoever holds this.
    pub lazy: Option<std::sync::Arc<lazy::LazyRestore>>,
    /// Our mount namespace was made for the tree (by whoever runs us): it becomes
    /// the tree's, instead of a new one with the image's differences. The files the
    /// tree gets are then on its own mounts, which outlive us, and a later dump names
    /// them as it sees them.
    pub inherit_mntns: bool,
}

impl RestoreOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            root: None,
            shell_job: false,
            stdio: [0, 1, 2],
            pid_wait: Duration::from_secs(2),
            pidns: false,
            mntns: false,
            tcp_established: false,
            netns: None,
            lazy: None,
            inherit_mntns: false,
        }
    }
}

/// A restored, running process (our child) and how long each step took.
#[derive(Debug)]
pub struct Restored {
    /// The tree's root, as we see it.
    pub pid: i32,
    /// Our child, whose end is the tree's end: the root, or the init of the new pid
    /// namespace made for it (which ends the way the root does).
    pub child: i32,
    pub pages: u64,
    pub steps: Vec<(&'static str, Duration)>,
    /// Made warm: the pre-copy rounds it was built from.
    pub warm_rounds: Option<u32>,
    /// A warm tree was offered and could not be used, for this reason.
    pub cold_because: Option<String>,
    /// See [`WarmTree::gone_from_source`].
    pub gone_from_source: u64,
    /// The connections' lock, open since before the resume, still to be removed (see
    /// [`Restored::settle`]).
    lock: Option<LockRelease>,
}

/// The wire lock's last step, after the workload runs: its holder told, and waited
/// for while it delivers what it held and removes the lock.
struct LockRelease {
    /// Held for its drop, which does the work.
    _release: crate::netlock::Release,
}

impl std::fmt::Debug for LockRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockRelease")
    }
}

impl Restored {
    /// Removes the connections' lock (a step of its own: the workload runs already,
    /// and whoever waits for it to run need not wait for this).
    pub fn settle(&mut self) {
        if let Some(l) = self.lock.take() {
            let t = Instant::now();
            drop(l);
            self.steps
                .push(("remove the connections' lock", t.elapsed()));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading the image: {0}")]
    Image(#[from] ImageError),
    #[error("pid {pid} is taken by {by}; it must be free to restore with the same pid")]
    PidTaken { pid: i32, by: String },
    #[error("pid {pid}: {what}: {path}: {why}")]
    File {
        pid: i32,
        what: String,
        path: String,
        why: String,
    },
    #[error("pid {pid}: fault injected at {point} (MCR_FAULT)")]
    FaultInjected { pid: i32, point: &'static str },
    #[error("pid {pid}: not released: {why}")]
    Aborted { pid: i32, why: String },
    #[error("pid {pid}: {what}")]
    Incompatible { pid: i32, what: String },
    #[error("pid {pid}: {step}: {source}")]
    Kernel {
        pid: i32,
        step: String,
        #[source]
        source: kext_shim::Error,
    },
}

impl RestoreError {
    /// The process exit code `mcr restore` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RestoreError::Image(_) => 6,
            RestoreError::PidTaken { .. } => 7,
            RestoreError::File { .. } => 8,
            RestoreError::Incompatible { .. } => 5,
            RestoreError::Kernel { .. }
            | RestoreError::FaultInjected { .. }
            | RestoreError::Aborted { .. } => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, RestoreError>;

pub(crate) trait StepContext<T> {
    fn step(self, pid: i32, step: impl FnOnce() -> String) -> Result<T>;
}

impl<T> StepContext<T> for kext_shim::Result<T> {
    fn step(self, pid: i32, step: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RestoreError::Kernel {
            pid,
            step: step(),
            source,
        })
    }
}

/// Restores the image in `opts.dir`. The process is left running as our child.
pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let mut r = restore_with(opts, Vec::new(), &mut || Ok(()), None)?;
    r.settle();
    Ok(r)
}

/// Like [`restore`], given images of the chain already opened and checked (a
/// migration's rounds, checked as they arrived): those the chain names are used
/// instead of being read again. `gate` runs once the tree is whole, just before it is
/// released: an error there kills it instead (a migration's source did not commit).
/// `warm` is the tree a migration built from its rounds, finished rather than made
/// again if the checkpoint still fits it.
pub fn restore_with(
    opts: &RestoreOptions,
    opened: Vec<Image>,
    gate: &mut dyn FnMut() -> std::result::Result<(), String>,
    warm: Option<WarmTree>,
) -> Result<Restored> {
    let mut steps = Vec::new();
    let t0 = Instant::now();
    let mut image = Image::open(&opts.dir)?;
    image.load_parents_from(opened)?;
    let snap = &image.snapshot;
    if snap
        .inventory
        .features
        .iter()
        .any(|f| f == crate::image::PRE_DUMP)
    {
        return Err(RestoreError::Incompatible {
            pid: snap.inventory.root_pid,
            what: format!(
                "{} is a pre-dump (memory only); restore the checkpoint taken with --prev-images-dir",
                opts.dir.display()
            ),
        });
    }
    steps.push(("read and check image", t0.elapsed()));
    // Asked before anything else: a forgotten flag must not cost the connections.
    let taken = snap
        .inet
        .iter()
        .map(|s| s.tcp.as_ref().or(s.waiting.first()));
    if let Some(c) = taken.flatten().next() {
        if !opts.tcp_established {
            return Err(RestoreError::Incompatible {
                pid: snap.inventory.root_pid,
                what: format!(
                    "the image holds established TCP connections ({} -> {}, ...); restore with --tcp-established",
                    c.local, c.peer
                ),
            });
        }
    }
    // The image's connections stay stopped on the wire until they exist again here;
    // should the restore fail before that, they stay stopped for the next one.
    let target_netns = opts.netns.as_ref().map(|p| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map_or(0, |m| m.ino())
    });
    let mut release = crate::netlock::Release::new(snap.inventory.net_lock.clone(), target_netns);
    check_tree(snap)?;
    let procs = &snap.processes;
    let p0 = &procs[0];
    let root = restore_root(opts, snap)?;
    let t = Instant::now();
    // Shared memory objects and memfds first: fds of memfds are reopened from them.
    let objects = shared::prepare(&image)?;
    let placement = shared::placement(&objects);
    let mut plan = files::open_all(
        snap,
        &placement,
        &root,
        opts.shell_job.then_some(opts.stdio),
        opts.netns.as_deref(),
    )?;
    // Dropped before the plan and the stubs, should the restore fail.
    let mut connections = std::mem::take(&mut plan.connections);
    // Held open until the first stub joined it: the stubs inherit our fds.
    let netns = open_netns(opts, p0.pid)?;
    steps.push(("open files", t.elapsed()));
    let mut numbers = plan.numbers();
    if (p0.namespaces.mnt.is_some() || opts.mntns) && !opts.inherit_mntns {
        files::name_cwds_inside(&mut numbers, procs);
    }
    memory::check_vdso_layout(p0)?;

    let chain: Vec<&Image> = std::iter::once(&image).chain(&image.parents).collect();
    let mut cold_because = None;
    let warm = warm.and_then(|w| match w.fits(snap, &numbers, &placement) {
        Ok(()) => Some(w),
        Err(why) => {
            tracing::info!(pid = p0.pid, "the warm tree cannot be used: {why}");
            cold_because = Some(why);
            // Dropped: every process of it is killed.
            None
        }
    });
    let warm_rounds = warm.as_ref().map(|w| w.rounds);
    let gone_from_source = warm.as_ref().map_or(0, |w| w.gone_from_source());

    let t = Instant::now();
    let mut pages = 0;
    let mut threads = Vec::new();
    let (mut init, stubs, sysv) = match warm {
        None => {
            let tree = spawn_tree(opts, snap, &root, Some(&numbers), netns.as_ref())?;
            drop(netns);
            let sysv = shared::make_sysv(&image, tree.first)?;
            let Tree { init, stubs, .. } = tree;
            // The stubs hold their own copies now.
            drop(plan);
            drop(objects);
            steps.push(("create processes", t.elapsed()));
            for ((stub, p), nums) in stubs.iter().zip(procs).zip(&numbers) {
                threads.push(build::rebuild(
                    stub,
                    p,
                    &image,
                    nums,
                    &placement,
                    opts.lazy.as_deref(),
                    &mut steps,
                    &mut pages,
                )?);
            }
            (init, stubs, sysv)
        }
        Some(w) => {
            drop(netns);
            let (init, procs_warm, pidfd, holds) = w.into_parts();
            let first = match &init {
                Some((s, _)) => s.pid,
                None => procs_warm[0].pid(),
            };
            let sysv = shared::make_sysv(&image, first)?;
            let continues = image
                .parents
                .first()
                .is_some_and(|p| p.snapshot.inventory.image_id == holds);
            let mut ours = plan.ours();
            ours.extend(placement.iter().filter_map(|placed| match placed.at {
                shared::Backing::Memfd { fd } => Some(fd),
                shared::Backing::Region { .. } => None,
            }));
            let mut stubs = Vec::with_capacity(procs_warm.len());
            for ((wp, p), nums) in procs_warm.into_iter().zip(procs).zip(&numbers) {
                let mut n = 0;
                let (stub, th) = wp.finish(
                    p,
                    &chain,
                    continues,
                    nums,
                    &placement,
                    std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                    &ours,
                    opts.lazy.as_deref(),
                    &mut steps,
                    &mut n,
                )?;
                pages += n;
                stubs.push(stub);
                threads.push(th);
            }
            // The stubs took their own copies.
            drop(plan);
            drop(objects);
            (init, stubs, sysv)
        }
    };
    if let Some(objects) = &sysv {
        kext_shim::sysv::remove_marked(stubs[0].pid, objects).step(p0.pid, || {
            "removing SysV segments marked for removal".into()
        })?;
    }
    // A migration's source says whether to go on: the restore's own work is done.
    let t = Instant::now();
    gate().map_err(|why| RestoreError::Aborted { pid: p0.pid, why })?;
    steps.push(("wait for the go", t.elapsed()));
    if crate::fault::armed(crate::fault::RESTORE_AFTER_GATE) {
        return Err(RestoreError::FaultInjected {
            pid: p0.pid,
            point: crate::fault::RESTORE_AFTER_GATE,
        });
    }
    let t = Instant::now();
    // The connections talk again before the processes run, so that neither what the
    // peers sent meanwhile nor what the processes send first waits on the wire.
    connections.requeue()?;
    release.open();
    connections.finish()?;
    let root_pid = stubs[0].pid.as_raw();
    if let Some((init, inj)) = &mut init {
        let inherited: Vec<(u64, u64)> = placement
            .iter()
            .filter_map(|placed| match placed.at {
                shared::Backing::Region { base, len } => Some((base, len)),
                _ => None,
            })
            .collect();
        init.prepare_init(inj, &inherited)?;
    }
    // Children first: a parent never runs while a child of its is still half-made.
    for (stub, th) in stubs.into_iter().zip(threads).rev() {
        stub.release(&th)?;
    }
    let child = match init {
        Some((init, _)) => init.start_init(p0.pid)?.as_raw(),
        None => root_pid,
    };
    connections.done = true;
    release.done();
    steps.push(("resume", t.elapsed()));
    // After the processes run: the lock was opened before; removing it is the
    // caller's, once it said the workload runs (see `Restored::settle`).
    let lock = snap
        .inventory
        .net_lock
        .is_some()
        .then_some(LockRelease { _release: release });
    steps.push(("total", t0.elapsed()));
    drop(chain);
    // Unmapping the images' pages takes tens of ms at a GiB (33 ms for a 256 MiB
    // chain here): not before the caller can say that the workload runs. During a
    // post-copy not at all: it holds our mmap lock that long, and the pager, whose
    // copies read our memory, would stall with the workload waiting on it (70 ms
    // measured at 1 GiB); the pager's owner drops it once every page is in.
    match &opts.lazy {
        Some(l) => l.keep(Box::new(image)),
        None => {
            std::thread::spawn(move || drop(image));
        }
    }
    Ok(Restored {
        pid: root_pid,
        child,
        pages,
        steps,
        warm_rounds,
        cold_because,
        gone_from_source,
        lock,
    })
}

fn fresh_mount(
    root: &Path,
    target: &str,
    fs_type: &str,
    device: &str,
    flags: u64,
    options: &str,
) -> MountOp {
    MountOp::Mount {
        source: Some(device.to_string()),
        target: root
            .join(target.trim_start_matches('/'))
            .display()
            .to_string(),
        fs_type: Some(fs_type.to_string()),
        flags,
        data: (!options.is_empty()).then(|| options.to_string()),
    }
}

/// The tree's file systems made fresh (proc, an empty tmpfs...), for a first stub in
/// a namespace that has the rest.
fn fresh_mounts(root: &Path, mnt: Option<&MountNs>) -> Vec<MountOp> {
    mnt.into_iter()
        .flat_map(|n| &n.mounts)
        .filter_map(|m| match &m.source {
            MountSource::Fresh {
                fs_type,
                device,
                options,
            } => Some(fresh_mount(
                root, &m.target, fs_type, device, m.flags, options,
            )),
            MountSource::Bind { .. } => None,
        })
        .collect()
}

/// How the first stub makes its new mount namespace: nothing of it propagates back to
/// ours; the tree's mounts are made again under `root` (binds from under `root` too, as
/// files are reopened there), with a proc of its own for a new pid namespace; then
/// `root` becomes the root.
fn mount_plan(root: &Path, mnt: Option<&MountNs>, fresh_proc: bool) -> Vec<MountOp> {
    let under = |t: &str| root.join(t.trim_start_matches('/')).display().to_string();
    let mount =
        |source: Option<&str>, target: String, fs: Option<&str>, flags, data: Option<&str>| {
            MountOp::Mount {
                source: source.map(String::from),
                target,
                fs_type: fs.map(String::from),
                flags,
                data: data.filter(|d| !d.is_empty()).map(String::from),
            }
        };
    let mut ops = vec![mount(
        None,
        "/".into(),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )];
    let pivot = root != Path::new("/");
    if pivot {
        let r = root.display().to_string();
        ops.push(mount(
            Some(&r),
            r.clone(),
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        ));
    }
    let mut has_proc = false;
    if let Some(mnt) = mnt {
        ops.extend(mnt.detached.iter().map(|d| MountOp::Detach(under(d))));
        for m in &mnt.mounts {
            match &m.source {
                MountSource::Fresh {
                    fs_type,
                    device,
                    options,
                } => {
                    has_proc |= fs_type == "proc" && m.target == "/proc";
                    ops.push(fresh_mount(
                        root, &m.target, fs_type, device, m.flags, options,
                    ));
                }
                MountSource::Bind { from } => {
                    ops.push(mount(
                        Some(&under(from)),
                        under(&m.target),
                        None,
                        libc::MS_BIND | libc::MS_REC,
                        None,
                    ));
                    if m.flags != 0 {
                        ops.push(mount(
                            None,
                            under(&m.target),
                            None,
                            libc::MS_REMOUNT | libc::MS_BIND | m.flags,
                            None,
                        ));
                    }
                }
            }
        }
    }
    if fresh_proc && !has_proc && root.join("proc").is_dir() {
        ops.push(mount(
            Some("proc"),
            under("/proc"),
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ));
    }
    if pivot {
        ops.push(MountOp::PivotRoot(root.display().to_string()));
    }
    ops
}

/// Where the stub chroots: the restore root, then the process's own root inside it.
fn chroot_dir(root: &Path, proc_root: &str) -> Option<String> {
    let inner = proc_root.trim_start_matches('/');
    if root == Path::new("/") && inner.is_empty() {
        return None;
    }
    Some(root.join(inner).display().to_string())
}

/// Waits while `pid` is held by a zombie (its parent may reap lazily), then insists it
/// is free.
fn wait_for_pid(pid: i32, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        let Ok(stat) = Stat::read(Pid::from_raw(pid)) else {
            return Ok(());
        };
        if stat.state() == 'Z' && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        return Err(RestoreError::PidTaken {
            pid,
            by: format!("{} (state {})", stat.comm, stat.state()),
        });
    }
}

/// The tree as fresh stubs, each still a copy of us, to be rebuilt.
pub(crate) struct Tree {
    /// The first stub made, whose namespaces the others share.
    pub first: Pid,
    /// An init of ours, with the injector it was made with, when the tree gets a new
    /// pid namespace its root was not the init of.
    pub init: Option<(stub::Stub, kext_shim::inject::Injector)>,
    /// The tree's processes, in image order.
    pub stubs: Vec<stub::Stub>,
}

/// Makes every process of `snap` as a fresh stub with its pid, session and group, in
/// the namespaces it needs, each forked by its parent after that parent took its
/// session and group, so the children inherit them. With `numbers`, session leaders
/// take their terminal too (a warm tree, made before the files are open, has none).
pub(crate) fn spawn_tree(
    opts: &RestoreOptions,
    snap: &crate::model::Snapshot,
    restore_root: &RestoreRoot,
    numbers: Option<&[files::FdNumbers]>,
    netns: Option<&std::fs::File>,
) -> Result<Tree> {
    let procs = &snap.processes;
    let p0 = &procs[0];
    let ns = &p0.namespaces;
    let new_pidns = ns.pid || opts.pidns;
    if !new_pidns {
        for p in procs {
            for t in &p.threads {
                wait_for_pid(t.tid, opts.pid_wait)?;
            }
            // A pre-dump's record has no threads: its leader stands for them.
            if p.threads.is_empty() {
                wait_for_pid(p.pid, opts.pid_wait)?;
            }
        }
        for z in &snap.zombies {
            wait_for_pid(z.pid, opts.pid_wait)?;
        }
    }
    let flags = if ns.uts.is_some() {
        libc::CLONE_NEWUTS as u64
    } else {
        0
    } | if ns.ipc.is_some() {
        libc::CLONE_NEWIPC as u64
    } else {
        0
    } | if new_pidns {
        libc::CLONE_NEWPID as u64
    } else {
        0
    };
    let new_mntns = (ns.mnt.is_some() || opts.mntns) && !opts.inherit_mntns;
    let root = restore_root.dir.as_path();
    let (flags, mounts, chroot) = if new_mntns {
        (
            flags | libc::CLONE_NEWNS as u64,
            mount_plan(root, ns.mnt.as_ref(), new_pidns),
            // Pivoted into the restore root: only the process's own chroot is left.
            chroot_dir(Path::new("/"), &p0.root),
        )
    } else if opts.inherit_mntns {
        // The namespace was made for the tree, its binds in place; a file system made
        // fresh for it (the proc of its pid namespace) only its first process can make.
        (
            flags,
            fresh_mounts(root, ns.mnt.as_ref()),
            chroot_dir(root, &p0.root),
        )
    } else {
        (flags, Vec::new(), chroot_dir(root, &p0.root))
    };
    let ctty = |inj: &mut kext_shim::inject::Injector, i: usize, pid: i32| match numbers {
        Some(n) => state::take_ctty(inj, pid, &n[i]),
        None => Ok(()),
    };
    // In a new pid namespace the first process is its pid 1: the root itself when it
    // was an init, otherwise an init of ours that forks the root with its pid.
    let first = stub::Stub::spawn(
        if new_pidns { 0 } else { p0.pid },
        chroot,
        flags,
        mounts,
        netns.map(std::os::fd::AsRawFd::as_raw_fd),
    )?;
    let first_pid = first.pid;
    let mut inj = stub::fresh_injector(first.pid)?;
    if let Some((host, domain)) = &ns.uts {
        first.set_uts(&mut inj, host, domain)?;
    }
    let mut init = None;
    let mut stubs = if new_pidns && p0.pid != 1 {
        let root = first.fork_child(&mut inj, p0.pid)?;
        init = Some((first, inj));
        inj = stub::fresh_injector(root.pid)?;
        vec![root]
    } else {
        vec![first]
    };
    state::early_init(&mut inj, p0.into(), procs)?;
    ctty(&mut inj, 0, p0.pid)?;
    for (i, p) in procs.iter().enumerate().skip(1) {
        let parent = procs
            .iter()
            .position(|q| q.pid == p.ppid)
            .expect("checked by check_tree");
        let mut inj = stub::fresh_injector(stubs[parent].pid)?;
        let child = stubs[parent].fork_child(&mut inj, p.pid)?;
        let mut cinj = stub::fresh_injector(child.pid)?;
        state::early_init(&mut cinj, p.into(), procs)?;
        ctty(&mut cinj, i, p.pid)?;
        stubs.push(child);
    }
    // Zombies: forked by their parent like any child, then ended with their status.
    for z in &snap.zombies {
        let parent = procs.iter().position(|q| q.pid == z.ppid).ok_or_else(|| {
            RestoreError::Incompatible {
                pid: z.pid,
                what: format!("zombie {} has no parent {} in the image", z.pid, z.ppid),
            }
        })?;
        let mut inj = stub::fresh_injector(stubs[parent].pid)?;
        let zs = stubs[parent].fork_child(&mut inj, z.pid)?;
        let mut zinj = stub::fresh_injector(zs.pid)?;
        let ids = state::Ids {
            pid: z.pid,
            pgid: z.pgid,
            sid: z.sid,
        };
        state::early_init(&mut zinj, ids, procs)?;
        zs.die_as(&mut zinj, z.pid, z.status)?;
    }
    Ok(Tree {
        first: first_pid,
        init,
        stubs,
    })
}

/// What every restore needs of an image's tree before it makes anything: a root, each
/// parent before its children, and this machine's architecture.
pub(crate) fn check_tree(snap: &crate::model::Snapshot) -> Result<()> {
    let procs = &snap.processes;
    let Some(p0) = procs.first() else {
        return Err(RestoreError::Incompatible {
            pid: snap.inventory.root_pid,
            what: "the image holds no process".into(),
        });
    };
    for (i, p) in procs.iter().enumerate().skip(1) {
        if !procs[..i].iter().any(|q| q.pid == p.ppid) {
            return Err(RestoreError::Incompatible {
                pid: p.pid,
                what: format!("its parent {} does not come before it in the image", p.ppid),
            });
        }
    }
    if snap.inventory.arch != std::env::consts::ARCH {
        return Err(RestoreError::Incompatible {
            pid: p0.pid,
            what: format!(
                "the image is for {}, this machine is {}",
                snap.inventory.arch,
                std::env::consts::ARCH
            ),
        });
    }
    Ok(())
}

/// The restore root, made absolute (`/` without `--root`), with the external mounts.
pub(crate) fn restore_root(
    opts: &RestoreOptions,
    snap: &crate::model::Snapshot,
) -> Result<RestoreRoot> {
    let p0 = &snap.processes[0];
    let pid = p0.pid;
    let dir = match &opts.root {
        Some(r) => r.canonicalize().map_err(|e| RestoreError::File {
            pid,
            what: "restore root".into(),
            path: r.display().to_string(),
            why: e.to_string(),
        })?,
        None => PathBuf::from("/"),
    };
    if opts.inherit_mntns {
        check_inherited_mounts(pid, p0.namespaces.mnt.as_ref())?;
    }
    Ok(RestoreRoot::new(dir, p0.namespaces.mnt.as_ref()))
}

/// With `inherit_mntns`, our namespace must have the tree's own mounts where it had
/// them: it was made for it.
fn check_inherited_mounts(pid: i32, mnt: Option<&MountNs>) -> Result<()> {
    let Some(mnt) = mnt else {
        return Err(RestoreError::Incompatible {
            pid,
            what: "--inherit-mntns: the tree had no mount namespace of its own".into(),
        });
    };
    let ours =
        kext_shim::procfs::read_mountinfo(Pid::this()).map_err(|e| RestoreError::Incompatible {
            pid,
            what: format!("--inherit-mntns: reading our mounts: {e}"),
        })?;
    // What is made fresh for it, the first stub makes (see `fresh_mounts`).
    for m in mnt
        .mounts
        .iter()
        .filter(|m| matches!(m.source, MountSource::Bind { .. }))
    {
        if !ours.iter().any(|o| o.mount_point == m.target) {
            return Err(RestoreError::Incompatible {
                pid,
                what: format!(
                    "--inherit-mntns: the tree had a mount at {} and our namespace has none",
                    m.target
                ),
            });
        }
    }
    Ok(())
}

/// The network namespace of `--netns`, opened for the first stub to join.
pub(crate) fn open_netns(opts: &RestoreOptions, pid: i32) -> Result<Option<std::fs::File>> {
    opts.netns
        .as_ref()
        .map(|p| {
            std::fs::File::open(p).map_err(|e| RestoreError::File {
                pid,
                what: "network namespace".into(),
                path: p.display().to_string(),
                why: e.to_string(),
            })
        })
        .transpose()
}
