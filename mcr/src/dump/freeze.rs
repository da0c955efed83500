//! Holding a process still for the dump, every thread of it, and letting it go exactly
//! as it was.

use super::{AfterDump, DumpError, Result, StepContext};
use crate::model::ZombieImage;
use kext_shim::ptrace::{self, Regs};
use kext_shim::{Errno, Pid};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;

pub(super) const PTRACE_EVENT_STOP: i32 = 128;

/// One stopped thread and the registers it stopped with (what it resumes with).
pub struct FrozenThread {
    pub tid: Pid,
    pub regs: Regs,
}

/// A seized process with every thread stopped. Dropped without
/// [`release`](Self::release), each thread gets its registers back and is detached, so a
/// failed checkpoint leaves the process running as before.
pub struct Frozen {
    pub pid: Pid,
    /// The thread-group leader first, then the others by tid.
    pub threads: Vec<FrozenThread>,
    /// Seized but not yet seen stopped: detached on drop, registers untouched.
    pending: Vec<Pid>,
    released: bool,
}

impl Frozen {
    /// Seizes and interrupts every thread listed now, without waiting for the stops, so
    /// that a whole tree's threads stop at once instead of one after another.
    pub fn start(pid: Pid) -> Result<Self> {
        let mut f = Frozen {
            pid,
            threads: Vec::new(),
            pending: Vec::new(),
            released: false,
        };
        f.interrupt_new()?;
        Ok(f)
    }

    /// Seizes and interrupts threads not seen yet; says whether there were any.
    fn interrupt_new(&mut self) -> Result<bool> {
        let pid = self.pid;
        let tids = kext_shim::procfs::threads(pid).map_err(|e| match e.errno() {
            Some(Errno::ENOENT) => DumpError::NoProcess(pid.as_raw()),
            _ => DumpError::Kernel {
                pid: pid.as_raw(),
                step: "listing threads".into(),
                source: e,
            },
        })?;
        let new: Vec<Pid> = tids
            .into_iter()
            .map(Pid::from_raw)
            .filter(|t| !self.threads.iter().any(|x| x.tid == *t) && !self.pending.contains(t))
            .collect();
        for &t in &new {
            match ptrace::seize(t) {
                Ok(()) => self.pending.push(t),
                // Exited since we listed it.
                Err(e) if e.errno() == Some(Errno::ESRCH) && t != pid => continue,
                Err(e) if e.errno() == Some(Errno::ESRCH) => {
                    return Err(DumpError::NoProcess(pid.as_raw()))
                }
                Err(source) => {
                    return Err(DumpError::Trace {
                        pid: pid.as_raw(),
                        source,
                    })
                }
            }
            ptrace::interrupt(t).step(pid, || format!("interrupting thread {t}"))?;
        }
        Ok(!new.is_empty())
    }

    /// Waits for every interrupted thread to stop, then re-lists the threads until no
    /// new one appears (a thread may clone while we work; a stopped one cannot).
    pub fn settle(&mut self) -> Result<()> {
        let pid = self.pid;
        loop {
            while let Some(&t) = self.pending.first() {
                match wait_interrupt_stop(t) {
                    Ok(()) => {}
                    Err(_)
                        if t != pid
                            && !std::path::Path::new(&format!("/proc/{pid}/task/{t}")).exists() =>
                    {
                        self.pending.remove(0);
                        continue;
                    }
                    Err(e) => {
                        return Err(e).step(pid, || format!("waiting for thread {t} to stop"))
                    }
                }
                let regs =
                    ptrace::get_regs(t).step(pid, || format!("reading registers of thread {t}"))?;
                self.pending.remove(0);
                self.threads.push(FrozenThread { tid: t, regs });
            }
            if !self.interrupt_new()? {
                break;
            }
        }
        self.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        if self.threads.first().map(|t| t.tid) != Some(pid) {
            return Err(DumpError::NoProcess(pid.as_raw()));
        }
        Ok(())
    }

    /// The thread-group leader.
    pub fn leader(&self) -> &FrozenThread {
        &self.threads[0]
    }

    fn restore_regs(&self) -> Result<()> {
        for t in &self.threads {
            ptrace::set_regs(t.tid, &t.regs).step(self.pid, || {
                format!("restoring registers of thread {}", t.tid)
            })?;
        }
        Ok(())
    }

    fn detach_all(&self) -> Result<()> {
        for t in &self.threads {
            ptrace::detach(t.tid, 0).step(self.pid, || format!("detaching thread {}", t.tid))?;
        }
        Ok(())
    }

    /// Lets the process go after a successful dump.
    pub fn release(mut self, after: AfterDump) -> Result<()> {
        let pid = self.pid;
        self.released = true;
        self.restore_regs()?;
        match after {
            AfterDump::LeaveRunning => self.detach_all(),
            AfterDump::LeaveStopped => {
                // Queued while every thread is still in a ptrace stop: each one takes it
                // on its way out, before any instruction of its own.
                kext_shim::clone::kill(pid, libc::SIGSTOP)
                    .step(pid, || "sending SIGSTOP".into())?;
                self.detach_all()?;
                wait_stopped(pid)
            }
            AfterDump::Kill => {
                // Stop it before detaching, then kill it there: it runs no instruction
                // after its image was taken, and we never reap it (its parent may wait).
                let pidfd =
                    kext_shim::pidfd::pidfd_open(pid).step(pid, || "opening a pidfd".into())?;
                kext_shim::clone::kill(pid, libc::SIGSTOP)
                    .step(pid, || "sending SIGSTOP".into())?;
                self.detach_all()?;
                kext_shim::clone::kill(pid, libc::SIGKILL).step(pid, || "killing it".into())?;
                // Only hastens what its exit does anyway (the wait below is what tells
                // it is gone): a refusal changes nothing but the time.
                if let Err(e) = kext_shim::pidfd::release_memory(&pidfd, pid) {
                    tracing::debug!(pid = pid.as_raw(), "its memory left to its exit: {e}");
                }
                // A pidfd turns readable once the process has exited.
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                loop {
                    match poll(&mut fds, PollTimeout::from(5000u16)) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Ok(0) => {
                            return Err(unexpected(
                                pid,
                                "waiting for it to die",
                                "still alive 5 s after SIGKILL",
                            ))
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
    }
}

fn unexpected(pid: Pid, step: &str, what: &str) -> DumpError {
    DumpError::Kernel {
        pid: pid.as_raw(),
        step: step.into(),
        source: kext_shim::Error::Unexpected {
            pid: pid.as_raw(),
            what: what.into(),
        },
    }
}

/// `root` and its descendants as /proc lists them now, parents first (racy while they
/// run; the freeze re-checks once they are stopped).
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        // Zombies cannot be seized: the re-listing records them.
        let kids = kext_shim::procfs::children(out[i]).unwrap_or_default();
        out.extend(kids.into_iter().map(Pid::from_raw).filter(|&k| alive(k)));
        i += 1;
    }
    out
}

/// Parent-first order of the frozen processes, from their (now final) children lists.
fn descendants_of_frozen(root: Pid, procs: &[Frozen]) -> Vec<Pid> {
    descendants(root)
        .into_iter()
        .filter(|p| procs.iter().any(|f| f.pid == *p))
        .collect()
}

fn alive(pid: Pid) -> bool {
    kext_shim::procfs::Stat::read(pid).is_ok_and(|s| s.state() != 'Z')
}

/// Waits for the PTRACE_INTERRUPT stop, passing on any signal that arrives first.
fn wait_interrupt_stop(t: Pid) -> kext_shim::Result<()> {
    loop {
        let (sig, event) = ptrace::wait_stopped(t)?;
        if event == PTRACE_EVENT_STOP {
            return Ok(());
        }
        // A signal arrived before our interrupt took effect: deliver it as it would have
        // been; the interrupt stop follows.
        ptrace::cont(t, sig)?;
    }
}

/// Returns once the group stop has happened (the state reads T).
fn wait_stopped(pid: Pid) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while kext_shim::procfs::Stat::read(pid).is_ok_and(|s| !matches!(s.state(), 'T' | 't')) {
        if std::time::Instant::now() > deadline {
            return Err(unexpected(
                pid,
                "waiting for it to stop",
                "not stopped 2 s after SIGSTOP",
            ));
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Ok(())
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        for t in &self.threads {
            if let Err(e) = ptrace::set_regs(t.tid, &t.regs) {
                tracing::error!(
                    pid = self.pid.as_raw(),
                    tid = t.tid.as_raw(),
                    "putting registers back: {e}"
                );
            }
            if let Err(e) = ptrace::detach(t.tid, 0) {
                tracing::error!(
                    pid = self.pid.as_raw(),
                    tid = t.tid.as_raw(),
                    "detaching: {e}"
                );
            }
        }
        for &t in &self.pending {
            // Never seen stopped: nothing of ours to undo; exiting detaches us anyway.
            let _ = ptrace::detach(t, 0);
        }
    }
}

/// Every process of a tree, frozen: the root first, each parent before its children.
pub struct FrozenTree {
    pub procs: Vec<Frozen>,
    /// Children that exited and were not reaped: they cannot be frozen, only described.
    pub zombies: Vec<ZombieImage>,
}

impl FrozenTree {
    /// Freezes `root` and every descendant. All threads of every process known are
    /// interrupted before any stop is waited for: on a loaded machine an interrupted
    /// thread stops only when it next gets a CPU, and it gets one soonest when every
    /// thread that could run instead is stopping too. Once the known processes are
    /// stopped (and so cannot fork), their children are listed again and any new one is
    /// frozen the same way, until none appears.
    ///
    /// `interrupted` runs once, after the first wave is interrupted and before any stop
    /// is waited for (a v1 freezer is thawed there).
    pub fn freeze(root: Pid, mut interrupted: impl FnMut() -> Result<()>) -> Result<Self> {
        let mut tree = FrozenTree {
            procs: Vec::new(),
            zombies: Vec::new(),
        };
        let mut wave = descendants(root);
        let mut first_wave = true;
        while !wave.is_empty() {
            let first = tree.procs.len();
            let t = std::time::Instant::now();
            for &p in &wave {
                match Frozen::start(p) {
                    Ok(f) => tree.procs.push(f),
                    // A descendant that exited meanwhile: its parent's re-listing below
                    // finds it as a zombie, or not at all.
                    Err(DumpError::NoProcess(_)) if p != root => {}
                    Err(e) => return Err(e),
                }
            }
            if std::mem::take(&mut first_wave) {
                interrupted()?;
            }
            let interrupted = t.elapsed();
            let mut i = first;
            while i < tree.procs.len() {
                match tree.procs[i].settle() {
                    Ok(()) => i += 1,
                    Err(_) if tree.procs[i].pid != root && !alive(tree.procs[i].pid) => {
                        tree.procs.remove(i);
                    }
                    Err(e) => return Err(e),
                }
            }
            tracing::debug!(processes = wave.len(), ?interrupted, stopped = ?t.elapsed(), "froze");
            // Every process is stopped now: its children list is final.
            let mut next = Vec::new();
            for f in &tree.procs {
                let parent = f.pid;
                let kids = kext_shim::procfs::children(parent)
                    .step(parent, || "listing children".into())?;
                for k in kids {
                    let kid = Pid::from_raw(k);
                    if tree.procs.iter().any(|f| f.pid == kid)
                        || tree.zombies.iter().any(|z| z.pid == k)
                    {
                        continue;
                    }
                    let stat =
                        kext_shim::procfs::Stat::read(kid).step(kid, || "reading stat".into())?;
                    if stat.state() == 'Z' {
                        // Field 52 is the status waitpid will report.
                        tree.zombies.push(ZombieImage {
                            pid: k,
                            ppid: parent.as_raw(),
                            pgid: stat.field(5) as i32,
                            sid: stat.field(6) as i32,
                            status: stat.field(52) as i32,
                        });
                    } else {
                        next.extend(descendants(kid));
                    }
                }
            }
            wave = next;
        }
        // Parents before children, as restore forks them.
        let order = descendants_of_frozen(root, &tree.procs);
        tree.procs
            .sort_by_key(|f| order.iter().position(|&p| p == f.pid).unwrap_or(usize::MAX));
        Ok(tree)
    }

    /// Lets every process go, children first.
    pub fn release(self, after: AfterDump) -> Result<()> {
        let mut first_err = Ok(());
        for f in self.procs.into_iter().rev() {
            if let Err(e) = f.release(after) {
                if first_err.is_ok() {
                    first_err = Err(e);
                }
            }
        }
        first_err
    }
}
