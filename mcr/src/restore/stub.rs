//! The process being restored, from its clone3 birth until it is let go. Dropped before
//! [`Stub::release`], it is killed and reaped: a failed restore leaves nothing behind.

use super::{RestoreError, Result, StepContext};
use kext_shim::clone::{spawn_stub, MountOp, StubSpec, MOUNT_FAILED, NETNS_FAILED};
use kext_shim::inject::{find_syscall_insn, Injector};
use kext_shim::mem::{read_remote, ProcMem};
use kext_shim::{procfs, ptrace, Errno, Pid};

pub struct Stub {
    pub pid: Pid,
    released: bool,
}

impl Stub {
    /// `namespaces` are CLONE_NEW* flags for namespaces the stub starts.
    /// `mounts` set up its new mount namespace (with CLONE_NEWNS).
    pub fn spawn(
        pid: i32,
        chroot: Option<String>,
        namespaces: u64,
        mounts: Vec<MountOp>,
        netns: Option<i32>,
    ) -> Result<Stub> {
        let spec = StubSpec {
            pid,
            chroot: chroot.clone(),
            namespaces,
            mounts,
            netns,
        };
        let (child, report) = spawn_stub(&spec).map_err(|e| match e.errno() {
            Some(Errno::EEXIST) => RestoreError::PidTaken {
                pid,
                by: "another process".into(),
            },
            Some(Errno::EINVAL) => RestoreError::Incompatible {
                pid,
                what: format!(
                    "pid {pid} cannot be created here (pid_max is {})",
                    kext_shim::clone::pid_max().unwrap_or(0)
                ),
            },
            _ => RestoreError::Kernel {
                pid,
                step: "creating the process".into(),
                source: e,
            },
        })?;
        let stub = Stub {
            pid: child,
            released: false,
        };
        match ptrace::wait(child).step(pid, || "waiting for the new process to stop".into())? {
            ptrace::Stop::Stopped { sig, .. } if sig == libc::SIGSTOP => {
                // Threads it clones are ours from birth; all of it dies if we do.
                ptrace::set_options(child, STUB_OPTIONS)
                    .step(pid, || "setting ptrace options".into())?;
                Ok(stub)
            }
            ptrace::Stop::Exited(120) => Err(RestoreError::File {
                pid,
                what: "root".into(),
                path: chroot.unwrap_or_default(),
                why: "cannot chroot there".into(),
            }),
            ptrace::Stop::Exited(NETNS_FAILED) => Err(RestoreError::Incompatible {
                pid,
                what: "cannot join the network namespace given with --netns".into(),
            }),
            ptrace::Stop::Exited(MOUNT_FAILED) => {
                let (i, errno) = report
                    .mount_failure()
                    .unwrap_or((usize::MAX, kext_shim::Errno::UnknownErrno));
                let op = spec
                    .mounts
                    .get(i)
                    .map_or_else(|| "a mount".into(), |m| m.to_string());
                Err(RestoreError::Kernel {
                    pid,
                    step: "setting up its mount namespace".into(),
                    source: kext_shim::SysError::new(op, errno).into(),
                })
            }
            other => Err(not_stopped(pid, "the new process", other)),
        }
    }

    /// Detaches every thread: the process runs from the registers it was given.
    pub fn release(mut self, threads: &[Pid]) -> Result<Pid> {
        let pid = self.pid;
        for &t in threads {
            ptrace::detach(t, 0).step(pid.as_raw(), || format!("resuming thread {t}"))?;
        }
        self.released = true;
        Ok(pid)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let _ = kext_shim::clone::kill(self.pid, libc::SIGKILL);
        reap_killed(self.pid);
    }
}

/// Reaps a killed stub. The init of a pid namespace does not finish dying until every
/// process of the namespace is reaped, and those traced by us are ours to reap first:
/// so reap its descendants as they die too, or we would wait for each other.
fn reap_killed(pid: Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match waitpid(pid, Some(flags)) {
            Ok(WaitStatus::StillAlive) => {}
            _ => return,
        }
        let mut todo = vec![pid];
        while let Some(p) = todo.pop() {
            for kid in procfs::children(p).unwrap_or_default() {
                let kid = Pid::from_raw(kid);
                let _ = waitpid(kid, Some(flags));
                todo.push(kid);
            }
        }
        if std::time::Instant::now() > deadline {
            tracing::error!(%pid, "a killed restore stub would not die");
            return;
        }
        std::thread::yield_now();
    }
}

/// A new task reported something other than its birth stop.
pub fn not_stopped(pid: i32, what: &str, got: ptrace::Stop) -> RestoreError {
    RestoreError::Kernel {
        pid,
        step: format!("starting {what}"),
        source: kext_shim::Error::Unexpected {
            pid,
            what: format!("reported {got:?} instead of stopping"),
        },
    }
}

/// Options every stub is traced with: the tasks it clones or forks are ours from birth,
/// and all of them die if we do.
pub const STUB_OPTIONS: i32 =
    libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_EXITKILL;

/// An injector for a stub that is still a copy of us: it goes through the `syscall`
/// instruction of the stub's own vDSO.
pub fn fresh_injector(pid: Pid) -> Result<Injector> {
    let raw = pid.as_raw();
    let maps = procfs::read_layout(pid).step(raw, || "reading the new process's maps".into())?;
    let vdso =
        maps.iter()
            .find(|m| m.path == "[vdso]")
            .ok_or_else(|| RestoreError::Incompatible {
                pid: raw,
                what: "this kernel gives processes no [vdso]".into(),
            })?;
    let mut bytes = vec![0u8; vdso.len() as usize];
    read_remote(pid, vdso.start, &mut bytes).step(raw, || "reading [vdso]".into())?;
    let ip = find_syscall_insn(&bytes, vdso.start).ok_or_else(|| RestoreError::Incompatible {
        pid: raw,
        what: "no syscall instruction in [vdso]".into(),
    })?;
    let regs = ptrace::get_regs(pid).step(raw, || "reading the new process's registers".into())?;
    Ok(Injector::new(pid, ip, regs))
}

impl Stub {
    /// Forks a child stub with pid `pid` from this (still fresh) stub, so that the child's
    /// parent is this process. It stops at birth, traced by us like its parent.
    pub fn fork_child(&self, inj: &mut Injector, pid: i32) -> Result<Stub> {
        let raw = self.pid.as_raw();
        // clone_args and the tid go below the stub's stack pointer: it is a copy of our
        // own stack, mapped and unused there.
        let regs = ptrace::get_regs(self.pid).step(raw, || "reading registers".into())?;
        let at = (regs.rsp - 1024) & !15;
        let mut args = Vec::with_capacity(96);
        // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        // set_tid, set_tid_size, cgroup
        for w in [0, 0, 0, 0, libc::SIGCHLD as u64, 0, 0, 0, at + 88, 1, 0] {
            args.extend_from_slice(&w.to_ne_bytes());
        }
        args.extend_from_slice(&(pid as u64).to_ne_bytes());
        ProcMem::open(self.pid)
            .and_then(|m| m.write(at, &args))
            .step(raw, || "writing clone3 arguments".into())?;
        let child = inj
            .call(libc::SYS_clone3, [at, 88, 0, 0, 0, 0], || {
                format!("clone3 of child {pid}")
            })
            .map_err(|e| match e.errno() {
                Some(Errno::EEXIST) => RestoreError::PidTaken {
                    pid,
                    by: "another process".into(),
                },
                _ => RestoreError::Kernel {
                    pid: raw,
                    step: format!("forking child {pid}"),
                    source: e,
                },
            })?;
        // The event names the child as we see it; clone3's result is its pid in its
        // own namespace, which differs in a new pid namespace.
        let child = match inj.take_event() {
            Some((_, msg)) => Pid::from_raw(msg as i32),
            None => Pid::from_raw(child as i32),
        };
        let stub = Stub {
            pid: child,
            released: false,
        };
        match ptrace::wait(child).step(pid, || "waiting for the new child to stop".into())? {
            ptrace::Stop::Stopped { .. } => {
                ptrace::set_options(child, STUB_OPTIONS)
                    .step(pid, || "setting ptrace options".into())?;
                Ok(stub)
            }
            other => Err(not_stopped(pid, "the new child", other)),
        }
    }
}

impl Stub {
    /// Ends this fresh stub the way the zombie it stands for ended, leaving a zombie with
    /// that status for its parent to reap. We, its tracer, see it die but do not reap it.
    pub fn die_as(mut self, inj: &mut Injector, vpid: i32, status: i32) -> Result<()> {
        let pid = self.pid;
        let raw = pid.as_raw();
        let mut regs = ptrace::get_regs(pid).step(raw, || "reading registers".into())?;
        regs.rip = inj.syscall_ip();
        regs.orig_rax = u64::MAX;
        let signal = status & 0x7f;
        if signal == 0 {
            regs.rax = libc::SYS_exit_group as u64;
            regs.rdi = ((status >> 8) & 0xff) as u64;
        } else {
            // No core file from a stand-in: RLIMIT_CORE 0, written below its stack.
            let at = (regs.rsp - 1024) & !15;
            ProcMem::open(pid)
                .and_then(|m| m.write(at, &[0u8; 16]))
                .step(raw, || "writing prlimit arguments".into())?;
            inj.call(
                libc::SYS_prlimit64,
                [0, libc::RLIMIT_CORE as u64, at, 0, 0, 0],
                || "prlimit64(RLIMIT_CORE, 0)".into(),
            )
            .step(raw, || "dropping the core limit".into())?;
            // SIG_DFL: a zeroed kernel sigaction.
            ProcMem::open(pid)
                .and_then(|m| m.write(at, &[0u8; 32]))
                .step(raw, || "writing sigaction arguments".into())?;
            inj.call(
                libc::SYS_rt_sigaction,
                [signal as u64, at, 0, 8, 0, 0],
                || format!("rt_sigaction({signal}, SIG_DFL)"),
            )
            .step(raw, || "resetting the signal".into())?;
            ptrace::set_sigmask(pid, 0).step(raw, || "unblocking signals".into())?;
            regs.rax = libc::SYS_kill as u64;
            regs.rdi = vpid as u64;
            regs.rsi = signal as u64;
        }
        ptrace::set_regs(pid, &regs).step(raw, || "setting registers".into())?;
        ptrace::cont(pid, 0).step(raw, || "letting it end".into())?;
        // The signal it sends itself stops it for us first; pass it on.
        while let ptrace::Stop::Stopped { sig, .. } =
            ptrace::wait(pid).step(raw, || "waiting for it to end".into())?
        {
            ptrace::cont(pid, sig).step(raw, || format!("delivering signal {sig}"))?;
        }
        self.released = true;
        Ok(())
    }
}

impl Stub {
    /// Names the new uts namespace this fresh stub started, from inside it.
    pub fn set_uts(&self, inj: &mut Injector, hostname: &str, domainname: &str) -> Result<()> {
        let raw = self.pid.as_raw();
        let regs = ptrace::get_regs(self.pid).step(raw, || "reading registers".into())?;
        let at = (regs.rsp - 1024) & !15;
        let mem = ProcMem::open(self.pid).step(raw, || "opening /proc/PID/mem".into())?;
        for (nr, name, what) in [
            (libc::SYS_sethostname, hostname, "sethostname"),
            (libc::SYS_setdomainname, domainname, "setdomainname"),
        ] {
            mem.write(at, name.as_bytes())
                .step(raw, || format!("writing the {what} argument"))?;
            inj.call(nr, [at, name.len() as u64, 0, 0, 0, 0], || {
                format!("{what}({name:?})")
            })
            .step(raw, || format!("naming its uts namespace ({what})"))?;
        }
        Ok(())
    }
}

impl Stub {
    /// Turns this fresh stub, pid 1 of the tree's new pid namespace and parent of its
    /// root, into the namespace's init, in two steps: here it lets go of everything it
    /// inherited from us (fds, shared objects, the parent-death signal), by syscalls
    /// made inside it, which need a core: done before the tree is released, they do not
    /// wait for one behind the workload. [`Self::start_init`] then sets it reaping.
    pub fn prepare_init(&self, inj: &mut Injector, inherited: &[(u64, u64)]) -> Result<()> {
        let raw = self.pid.as_raw();
        inj.call(
            libc::SYS_close_range,
            [0, u32::MAX as u64, 0, 0, 0, 0],
            || "close_range of every fd".into(),
        )
        .step(raw, || {
            "closing the fds the namespace init inherited".into()
        })?;
        for &(base, len) in inherited {
            inj.munmap(base, len)
                .step(raw, || format!("unmapping shared object at {base:#x}"))?;
        }
        inj.call(
            libc::SYS_prctl,
            [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
            || "clearing the parent-death signal".into(),
        )
        .step(raw, || "letting the namespace init outlive us".into())?;
        Ok(())
    }

    /// Once [`Self::prepare_init`] ran, starts the init: it reaps until the root, pid
    /// `root` in the namespace, ends, then ends the same way. Ptrace alone, which the
    /// init need not run for.
    pub fn start_init(mut self, root: i32) -> Result<Pid> {
        let pid = self.pid;
        let raw = pid.as_raw();
        ptrace::set_sigmask(pid, 0).step(raw, || "unblocking signals".into())?;
        let mut regs = ptrace::get_regs(pid).step(raw, || "reading registers".into())?;
        regs.rip = kext_shim::clone::pidns_init_entry();
        regs.rdi = root as u64;
        // As if just called: the stack 16-aligned before the return address.
        regs.rsp = ((regs.rsp - 4096) & !15) - 8;
        regs.orig_rax = u64::MAX;
        ptrace::set_regs(pid, &regs).step(raw, || "setting registers".into())?;
        ptrace::detach(pid, 0).step(raw, || "starting the namespace init".into())?;
        self.released = true;
        Ok(pid)
    }
}
