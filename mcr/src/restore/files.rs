//! Reopening what the process had open or mapped, under the restore root, and checking
//! each is the file that was dumped. Done before the stub exists, which inherits them.

use super::root::RestoreRoot;
use super::shared::Placement;
use super::{RestoreError, Result};
use crate::model::{
    EpollTarget, FdKind, FileIdentity, FileLock, FileRef, LockKind, ProcessImage, Snapshot, VmaKind,
};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Files opened for the stubs of a whole tree; each stub finds them at the same fd
/// numbers (the root stub inherits them from us, its children from it).
pub struct FilePlan {
    owned: Vec<OwnedFd>,
    /// Open file description number (see `FdEntry::ofd`) -> our fd: opened once, so the
    /// processes that shared it share it again.
    ofds: BTreeMap<u32, i32>,
    /// Pipe inode -> (our read end, our write end), refilled with what was in flight.
    pipes: BTreeMap<u64, (i32, i32)>,
    /// Unix socket inode (listeners too) -> our socket standing for it, refilled.
    sockets: BTreeMap<u64, i32>,
    /// Pty index -> (our master, a slave of ours if it is a session's terminal).
    ptys: BTreeMap<u32, (i32, Option<i32>)>,
    per_process: Vec<FdNumbers>,
    /// Above every fd number of the image.
    floor: i32,
    /// The TCP connections made, for the restore to finish or silence.
    pub connections: super::sockets::Connections,
}

/// Just the numbers, once the files themselves were handed to the stub.
#[derive(Debug, Clone, Default)]
pub struct FdNumbers {
    pub map_fds: Vec<i32>,
    pub exe_fd: i32,
    pub cwd_fd: i32,
    /// In a mount namespace made for it: its cwd as it names it from inside (see
    /// `build::set_cwd`).
    pub cwd_inside: Option<String>,
    pub fds: Vec<(i32, i32, bool)>,
    /// Epoll instances this process fills: (its fd number, what it watches).
    pub epolls: Vec<(i32, Vec<EpollTarget>)>,
    /// Locks this process takes again: (its fd number, the lock). A flock or OFD lock
    /// goes with the first holder of its open file description only.
    pub locks: Vec<(i32, FileLock)>,
    /// For a session leader whose controlling terminal is a pty of the image: a slave of
    /// it (our fd number, which the stub inherited) and the foreground process group.
    pub ctty: Option<(i32, i32)>,
}

/// Each process's cwd as it names it, below its own root; none outside that root.
pub fn name_cwds_inside(numbers: &mut [FdNumbers], procs: &[ProcessImage]) {
    for (n, p) in numbers.iter_mut().zip(procs) {
        let rel = Path::new(&p.cwd.path).strip_prefix(&p.root).ok();
        n.cwd_inside = rel.map(|r| Path::new("/").join(r).display().to_string());
    }
}

impl FilePlan {
    /// Per process, in image order.
    pub fn numbers(&self) -> Vec<FdNumbers> {
        self.per_process.clone()
    }

    /// Every fd this plan holds for the stubs, by its number here.
    pub fn ours(&self) -> Vec<i32> {
        self.owned.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Keeps `f` for the stubs, numbered above every fd number the image uses when
    /// it can be: the stubs then dup each straight to its number (see `set_fds`).
    fn keep(&mut self, f: impl Into<OwnedFd>) -> i32 {
        let mut fd: OwnedFd = f.into();
        if fd.as_raw_fd() < self.floor {
            if let Ok(high) = kext_shim::sys::dup_above(fd.as_raw_fd(), self.floor) {
                fd = high;
            }
        }
        let n = fd.as_raw_fd();
        self.owned.push(fd);
        n
    }
}

/// Flags that only matter at creation, or that we set ourselves.
const CREATION_FLAGS: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC;

struct Ctx<'a> {
    pid: i32,
    root: &'a RestoreRoot,
}

impl Ctx<'_> {
    fn err(&self, what: &str, path: &Path, why: impl Into<String>) -> RestoreError {
        RestoreError::File {
            pid: self.pid,
            what: what.into(),
            path: path.display().to_string(),
            why: why.into(),
        }
    }

    fn open(&self, what: &str, f: &FileRef, flags: u32) -> Result<File> {
        let path = self.root.join(&f.path);
        let acc = flags as i32 & libc::O_ACCMODE;
        let mut o = OpenOptions::new();
        o.read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
            .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
            .custom_flags(flags as i32 & !(CREATION_FLAGS | libc::O_ACCMODE | libc::O_APPEND))
            .append(flags as i32 & libc::O_APPEND != 0);
        let file = o
            .open(&path)
            .map_err(|e| self.err(what, &path, e.to_string()))?;
        let meta = file
            .metadata()
            .map_err(|e| self.err(what, &path, e.to_string()))?;
        let now: FileIdentity = kext_shim::procfs::FileIdentity::of_metadata(&meta).into();
        self.check_identity(what, &path, &f.identity, &now, self.root.in_place(&f.path))?;
        Ok(file)
    }

    fn check_identity(
        &self,
        what: &str,
        path: &Path,
        then: &FileIdentity,
        now: &FileIdentity,
        strict: bool,
    ) -> Result<()> {
        let changed =
            |why: String| Err(self.err(what, path, format!("changed since the checkpoint: {why}")));
        if then.file_type() != now.file_type() {
            return changed(format!(
                "file type {:o} is now {:o}",
                then.file_type(),
                now.file_type()
            ));
        }
        match then.file_type() {
            libc::S_IFCHR | libc::S_IFBLK if then.rdev != now.rdev => {
                return changed(format!("device {:#x} is now {:#x}", then.rdev, now.rdev));
            }
            libc::S_IFREG => {
                if then.size != now.size {
                    return changed(format!("size {} is now {}", then.size, now.size));
                }
                if (then.mtime_sec, then.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
                    return changed(format!(
                        "mtime {}.{:09} is now {}.{:09}",
                        then.mtime_sec, then.mtime_nsec, now.mtime_sec, now.mtime_nsec
                    ));
                }
            }
            _ => {}
        }
        if strict && then.file_type() != libc::S_IFCHR && (then.dev, then.ino) != (now.dev, now.ino)
        {
            return changed(format!(
                "inode {}:{} is now {}:{}",
                then.dev, then.ino, now.dev, now.ino
            ));
        }
        Ok(())
    }
}

/// Opens every file the processes need, checking identities. With `shell_job`, fds
/// that were outside the image are bound to the given stand-ins for 0, 1, 2.
/// With `netns`, sockets are made in that network namespace.
pub fn open_all(
    snap: &Snapshot,
    placement: &Placement,
    root: &RestoreRoot,
    shell_job: Option<[i32; 3]>,
    netns: Option<&Path>,
) -> Result<FilePlan> {
    let (procs, pipes, ptys) = (&snap.processes, &snap.pipes, &snap.ptys);
    let floor = procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|e| e.fd))
        .max()
        .unwrap_or(0)
        + 1;
    let mut plan = FilePlan {
        floor,
        owned: Vec::new(),
        ofds: BTreeMap::new(),
        pipes: BTreeMap::new(),
        sockets: BTreeMap::new(),
        ptys: BTreeMap::new(),
        per_process: Vec::new(),
        connections: Default::default(),
    };
    let pid = procs.first().map(|p| p.pid).unwrap_or(0);
    for t in ptys {
        let ptmx = root.join(&t.ptmx);
        let err = |why: String| RestoreError::File {
            pid,
            what: format!("pty {}", t.index),
            path: ptmx.display().to_string(),
            why,
        };
        let master = kext_shim::pty::open_index(&ptmx.display().to_string(), t.index)
            .map_err(|e| err(e.to_string()))?;
        kext_shim::pty::set_locked(&master, false).map_err(|e| err(e.to_string()))?;
        let slave_path = root.join(&pty_slave_path(&t.ptmx, t.index));
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)
            .map_err(|e| err(format!("opening {}: {e}", slave_path.display())))?;
        kext_shim::pty::apply_state(
            &master,
            &slave,
            &t.termios,
            &t.master_termios,
            t.winsize,
            t.packet,
        )
        .map_err(|e| err(e.to_string()))?;
        let m = plan.keep(master);
        let s = t.session.map(|_| plan.keep(slave));
        plan.ptys.insert(t.index, (m, s));
    }
    let lock_netns = snap.inventory.net_lock.as_ref().map(|l| l.netns);
    let make = || super::sockets::make(procs, &snap.unix, &snap.inet, root, lock_netns);
    let sockets = match netns {
        None => make()?,
        Some(ns) => {
            let mut out = None;
            let pid = procs.first().map_or(0, |p| p.pid);
            kext_shim::clone::in_netns(&ns.display().to_string(), || {
                out = Some(make());
                Ok(())
            })
            .map_err(|e| RestoreError::File {
                pid,
                what: "network namespace".into(),
                path: ns.display().to_string(),
                why: e.to_string(),
            })?;
            out.expect("ran")?
        }
    };
    let (sockets, mut connections) = sockets;
    connections.netns = netns.map(Path::to_path_buf);
    plan.connections = connections;
    for (ino, sock) in sockets {
        let n = plan.keep(sock);
        plan.sockets.insert(ino, n);
    }
    for pipe in pipes {
        let pid = procs.first().map(|p| p.pid).unwrap_or(0);
        if let Some(f) = &pipe.fifo {
            // A named pipe: opened read-write without blocking, which keeps it alive
            // (and lets the writers open without a reader), then refilled.
            let cx = Ctx { pid, root };
            let keeper = cx.open("fifo", f, (libc::O_RDWR | libc::O_NONBLOCK) as u32)?;
            kext_shim::pipe::set_capacity(&keeper, pipe.capacity as usize)
                .map_err(|e| cx.err("fifo", Path::new(&f.path), e.to_string()))?;
            (&keeper)
                .write_all(&pipe.data)
                .map_err(|e| cx.err("fifo", Path::new(&f.path), format!("refilling: {e}")))?;
            plan.keep(keeper);
            continue;
        }
        let err = |why: String| RestoreError::File {
            pid,
            what: "pipe".into(),
            path: format!("pipe:[{}]", pipe.ino),
            why,
        };
        let (r, w) = nix::unistd::pipe().map_err(|e| err(e.to_string()))?;
        kext_shim::pipe::set_capacity(&w, pipe.capacity as usize)
            .map_err(|e| err(e.to_string()))?;
        // Never more than the capacity it came from: this cannot block.
        let mut f = std::fs::File::from(w);
        std::io::Write::write_all(&mut f, &pipe.data)
            .map_err(|e| err(format!("refilling: {e}")))?;
        let rn = plan.keep(r);
        let wn = plan.keep(OwnedFd::from(f));
        plan.pipes.insert(pipe.ino, (rn, wn));
    }
    for p in procs {
        let mut n = open_process(&mut plan, procs, p, placement, root, shell_job)?;
        n.ctty = ptys.iter().find_map(|t| match t.session {
            Some((leader, fg)) if leader == p.pid => plan.ptys[&t.index].1.map(|s| (s, fg)),
            _ => None,
        });
        plan.per_process.push(n);
    }
    // Slaves are open now: a pty that was locked is locked again.
    for t in ptys.iter().filter(|t| t.locked) {
        let (m, _) = plan.ptys[&t.index];
        let master = plan
            .owned
            .iter()
            .find(|o| o.as_raw_fd() == m)
            .expect("the plan owns its ptys");
        kext_shim::pty::set_locked(master, true).map_err(|e| RestoreError::File {
            pid,
            what: format!("pty {}", t.index),
            path: t.ptmx.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(plan)
}

/// The slave of pty `index` next to the multiplexer it was made through: `/dev/pts/N`
/// for `/dev/ptmx`, `DIR/N` for a devpts's own `DIR/ptmx`.
fn pty_slave_path(ptmx: &str, index: u32) -> String {
    match ptmx.strip_suffix("/ptmx") {
        Some(dir) if dir.ends_with("/pts") => format!("{dir}/{index}"),
        _ => format!("/dev/pts/{index}"),
    }
}

fn open_process(
    plan: &mut FilePlan,
    procs: &[ProcessImage],
    p: &ProcessImage,
    placement: &Placement,
    root: &RestoreRoot,
    shell_job: Option<[i32; 3]>,
) -> Result<FdNumbers> {
    let cx = Ctx { pid: p.pid, root };
    let mut nums = FdNumbers {
        map_fds: Vec::new(),
        exe_fd: -1,
        cwd_fd: -1,
        cwd_inside: None,
        fds: Vec::new(),
        epolls: Vec::new(),
        locks: Vec::new(),
        ctty: None,
    };
    for (i, f) in p.mm.files.iter().enumerate() {
        // A shared mapping may be written through (now, or after an mprotect), which
        // takes a file opened for writing; a read-only file stays mapped read-only.
        let shared =
            p.mm.vmas
                .iter()
                .any(|v| v.shared && v.kind == VmaKind::File(i as u32));
        let what = format!("mapped file {}", f.path);
        let file = match shared {
            true => cx
                .open(&what, f, libc::O_RDWR as u32)
                .or_else(|_| cx.open(&what, f, libc::O_RDONLY as u32))?,
            false => cx.open(&what, f, libc::O_RDONLY as u32)?,
        };
        let n = plan.keep(file);
        nums.map_fds.push(n);
    }
    let exe = cx.open("executable", &p.mm.exe, libc::O_RDONLY as u32)?;
    // The stub starts as a copy of us, so its exe link already names our binary. When
    // that is the image's too (mcr restoring an mcr-run workload), leave it: the kernel
    // refuses to replace an exe link while that file is mapped, even by itself.
    let ours = std::fs::metadata("/proc/self/exe").ok();
    let theirs = exe.metadata().ok();
    let same = match (ours, theirs) {
        (Some(a), Some(b)) => {
            use std::os::unix::fs::MetadataExt;
            (a.dev(), a.ino()) == (b.dev(), b.ino())
        }
        _ => false,
    };
    nums.exe_fd = if same { -1 } else { plan.keep(exe) };
    let cwd = cx.open("cwd", &p.cwd, (libc::O_RDONLY | libc::O_DIRECTORY) as u32)?;
    nums.cwd_fd = plan.keep(cwd);

    for e in &p.fds {
        let what = format!("fd {}", e.fd);
        let nonblock = e.flags as i32 & libc::O_NONBLOCK;
        let shared = plan.ofds.contains_key(&e.ofd);
        for l in &e.locks {
            if l.kind == LockKind::Posix || !shared {
                nums.locks.push((e.fd, *l));
            }
        }
        if let Some(&n) = plan.ofds.get(&e.ofd) {
            nums.fds.push((e.fd, n, e.cloexec));
            continue;
        }
        let src = match &e.kind {
            FdKind::Regular { file, pos } | FdKind::CharDevice { file, pos } => {
                let mut f = cx.open(&what, file, e.flags)?;
                // Seeking a character device may be refused (and means nothing then).
                if matches!(e.kind, FdKind::Regular { .. }) || *pos != 0 {
                    if let Err(err) = f.seek(SeekFrom::Start(*pos)) {
                        if matches!(e.kind, FdKind::Regular { .. }) {
                            return Err(cx.err(
                                &what,
                                Path::new(&file.path),
                                format!("seek to {pos}: {err}"),
                            ));
                        }
                    }
                }
                plan.keep(f)
            }
            FdKind::Directory { file } => {
                let f = cx.open(&what, file, e.flags | libc::O_DIRECTORY as u32)?;
                plan.keep(f)
            }
            FdKind::Fifo { file, .. } => {
                // Never blocks (the keeper above is a reader and a writer); the fd gets
                // its own flags back after.
                let f = cx.open(&what, file, e.flags | libc::O_NONBLOCK as u32)?;
                let fl = nix::fcntl::OFlag::from_bits_truncate(e.flags as i32 & libc::O_NONBLOCK);
                nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(
                    |err| cx.err(&what, Path::new(&file.path), format!("F_SETFL: {err}")),
                )?;
                plan.keep(f)
            }
            FdKind::UnixListener { ino, name, .. } => {
                let &fd = plan.sockets.get(ino).ok_or_else(|| {
                    cx.err(&what, Path::new(name), "is not among the image's sockets")
                })?;
                let fl = nix::fcntl::OFlag::from_bits_truncate(e.flags as i32 & libc::O_NONBLOCK);
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl))
                    .map_err(|err| cx.err(&what, Path::new(name), format!("F_SETFL: {err}")))?;
                fd
            }
            FdKind::InetSocket { ino } | FdKind::UnixSocket { ino } => {
                let name = format!("socket:[{ino}]");
                let &fd = plan.sockets.get(ino).ok_or_else(|| {
                    cx.err(&what, Path::new(&name), "is not among the image's sockets")
                })?;
                let fl = nix::fcntl::OFlag::from_bits_truncate(e.flags as i32 & libc::O_NONBLOCK);
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl))
                    .map_err(|err| cx.err(&what, Path::new(&name), format!("F_SETFL: {err}")))?;
                fd
            }
            FdKind::Memfd { ino, pos } => {
                let name = format!("memfd (inode {ino})");
                let fd = super::shared::memfd_fd(placement, *ino)
                    .ok_or_else(|| cx.err(&what, Path::new(&name), "is missing from the image"))?;
                // A new open file description of the same memfd, with this fd's flags.
                let acc = e.flags as i32 & libc::O_ACCMODE;
                let mut f = OpenOptions::new()
                    .read(acc != libc::O_WRONLY)
                    .write(acc != libc::O_RDONLY)
                    .custom_flags(e.flags as i32 & libc::O_NONBLOCK)
                    .append(e.flags as i32 & libc::O_APPEND != 0)
                    .open(format!("/proc/self/fd/{fd}"))
                    .map_err(|err| cx.err(&what, Path::new(&name), err.to_string()))?;
                f.seek(SeekFrom::Start(*pos)).map_err(|err| {
                    cx.err(&what, Path::new(&name), format!("seek to {pos}: {err}"))
                })?;
                plan.keep(f)
            }
            FdKind::EventFd { count, semaphore } => {
                let fl = if *semaphore { libc::EFD_SEMAPHORE } else { 0 } | nonblock;
                plan.keep(
                    kext_shim::anon::eventfd(*count, fl)
                        .map_err(|err| cx.err(&what, Path::new("eventfd"), err.to_string()))?,
                )
            }
            FdKind::TimerFd {
                clockid,
                value_ns,
                interval_ns,
                ticks,
            } => plan.keep(
                kext_shim::anon::timerfd(*clockid, nonblock, *value_ns, *interval_ns, *ticks)
                    .map_err(|err| cx.err(&what, Path::new("timerfd"), err.to_string()))?,
            ),
            FdKind::Inotify { watches } => {
                let ino = kext_shim::anon::inotify(libc::O_NONBLOCK)
                    .map_err(|err| cx.err(&what, Path::new("inotify"), err.to_string()))?;
                for w in watches {
                    let path = root.join(&w.path);
                    let p = path.display().to_string();
                    // Descriptors are handed out in increasing order: take and drop
                    // ones until the watch gets the number it had.
                    loop {
                        let got = kext_shim::anon::inotify_add(&ino, &p, w.mask)
                            .map_err(|err| cx.err(&what, &path, err.to_string()))?;
                        if got == w.wd {
                            break;
                        }
                        if got > w.wd {
                            return Err(cx.err(
                                &what,
                                &path,
                                format!("watch descriptor {got} came back instead of {}", w.wd),
                            ));
                        }
                        kext_shim::anon::inotify_rm(&ino, got)
                            .map_err(|err| cx.err(&what, &path, err.to_string()))?;
                    }
                }
                // The watches dropped on the way each queued an IN_IGNORED: read them off,
                // then give the fd its own blocking mode.
                let mut junk = [0u8; 4096];
                while nix::unistd::read(ino.as_raw_fd(), &mut junk).is_ok_and(|n| n > 0) {}
                let fl = nix::fcntl::OFlag::from_bits_truncate(nonblock);
                nix::fcntl::fcntl(ino.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(
                    |err| cx.err(&what, Path::new("inotify"), format!("F_SETFL: {err}")),
                )?;
                plan.keep(ino)
            }
            FdKind::SignalFd { mask } => plan.keep(
                kext_shim::anon::signalfd(*mask, nonblock)
                    .map_err(|err| cx.err(&what, Path::new("signalfd"), err.to_string()))?,
            ),
            FdKind::Epoll { targets } => {
                // Its interest list is added inside the process, by the fd numbers it
                // used: epoll keys its entries by (file, fd number).
                nums.epolls.push((e.fd, targets.clone()));
                plan.keep(
                    kext_shim::anon::epoll(0)
                        .map_err(|err| cx.err(&what, Path::new("epoll"), err.to_string()))?,
                )
            }
            FdKind::Pipe { ino, read_end } => {
                let pipe = format!("pipe:[{ino}]");
                let &(r, w) = plan.pipes.get(ino).ok_or_else(|| {
                    cx.err(&what, Path::new(&pipe), "is not among the image's pipes")
                })?;
                let end = if *read_end { r } else { w };
                let fl = nix::fcntl::OFlag::from_bits_truncate(e.flags as i32 & libc::O_NONBLOCK);
                nix::fcntl::fcntl(end, nix::fcntl::FcntlArg::F_SETFL(fl))
                    .map_err(|err| cx.err(&what, Path::new(&pipe), format!("F_SETFL: {err}")))?;
                end
            }
            FdKind::PtyMaster { index } => {
                let name = format!("pty {index}");
                let &(m, _) = plan.ptys.get(index).ok_or_else(|| {
                    cx.err(&what, Path::new(&name), "is not among the image's ptys")
                })?;
                let fl = nix::fcntl::OFlag::from_bits_truncate(e.flags as i32 & libc::O_NONBLOCK);
                nix::fcntl::fcntl(m, nix::fcntl::FcntlArg::F_SETFL(fl))
                    .map_err(|err| cx.err(&what, Path::new(&name), format!("F_SETFL: {err}")))?;
                m
            }
            FdKind::PtySlave { path, .. } => {
                let at = root.join(path);
                let acc = e.flags as i32 & libc::O_ACCMODE;
                let f = OpenOptions::new()
                    .read(acc != libc::O_WRONLY)
                    .write(acc != libc::O_RDONLY)
                    .custom_flags(
                        e.flags as i32 & !(CREATION_FLAGS | libc::O_ACCMODE) | libc::O_NOCTTY,
                    )
                    .open(&at)
                    .map_err(|err| cx.err(&what, &at, err.to_string()))?;
                plan.keep(f)
            }
            FdKind::External { key } => {
                let Some(stdio_fds) = shell_job else {
                    return Err(cx.err(
                        &what,
                        Path::new(key),
                        "was outside the image (a shell job's stdio); restore with --shell-job",
                    ));
                };
                // The lowest stdio fd that had the same object stands in for it (in
                // this process, else in any process of the tree).
                let stdio = std::iter::once(p)
                    .chain(procs.iter())
                    .flat_map(|q| q.fds.iter())
                    .find(|x| {
                        x.fd <= 2 && matches!(&x.kind, FdKind::External { key: k } if k == key)
                    })
                    .map(|x| stdio_fds[x.fd as usize])
                    .ok_or_else(|| {
                        cx.err(
                            &what,
                            Path::new(key),
                            "is outside the image and not one of the shell job's stdio",
                        )
                    })?;
                if nix::fcntl::fcntl(stdio, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                    return Err(cx.err(
                        &what,
                        Path::new(key),
                        format!("stands for our fd {stdio}, which is not open"),
                    ));
                }
                // A copy, numbered out of the way like the rest (see FilePlan::keep).
                match kext_shim::sys::dup_above(stdio, plan.floor) {
                    Ok(copy) => plan.keep(copy),
                    Err(_) => stdio,
                }
            }
        };
        if !matches!(e.kind, FdKind::External { .. }) {
            plan.ofds.insert(e.ofd, src);
        }
        nums.fds.push((e.fd, src, e.cloexec));
    }
    Ok(nums)
}
