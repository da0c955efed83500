//! clone3 with `set_tid`: creating a process with the exact pid a restore needs.

use crate::{check, Errno, Error, Pid, Result, SysError};
use std::ffi::CString;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Where and how a restore stub starts.
#[derive(Debug, Clone, Default)]
pub struct StubSpec {
    /// The pid it must have (0: whatever the kernel picks).
    pub pid: i32,
    /// Directory to chroot into before stopping (already resolved by the caller).
    pub chroot: Option<String>,
    /// CLONE_NEW* flags: namespaces the stub starts (uts, ipc, pid, mnt).
    pub namespaces: u64,
    /// With CLONE_NEWNS: what the stub mounts, in order, before its chroot.
    pub mounts: Vec<MountOp>,
    /// An fd of ours on a network namespace the stub joins first.
    pub netns: Option<i32>,
}

/// The exit code of a stub that could not join its network namespace.
pub const NETNS_FAILED: i32 = 125;

/// One step of setting up a new mount namespace, done by the stub itself at birth
/// (before it stops), so that a fresh proc belongs to its pid namespace.
#[derive(Debug, Clone)]
pub enum MountOp {
    /// mount(2) as given.
    Mount {
        source: Option<String>,
        target: String,
        fs_type: Option<String>,
        flags: u64,
        data: Option<String>,
    },
    /// umount2(target, MNT_DETACH); a target that is not a mount (any more) is fine.
    Detach(String),
    /// Makes `dir` (a mount point) the root: pivot_root there and detach the old root.
    PivotRoot(String),
}

impl std::fmt::Display for MountOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountOp::Mount {
                source,
                target,
                fs_type,
                flags,
                data,
            } => write!(
                f,
                "mount({}, {target}, {}, {flags:#x}, {})",
                source.as_deref().unwrap_or("none"),
                fs_type.as_deref().unwrap_or("none"),
                data.as_deref().unwrap_or("")
            ),
            MountOp::Detach(t) => write!(f, "umount2({t}, MNT_DETACH)"),
            MountOp::PivotRoot(d) => write!(f, "pivot_root into {d}"),
        }
    }
}

/// [`MountOp`] with its strings ready for raw syscalls in the child.
enum RawMountOp {
    Mount([Option<CString>; 4], u64),
    Detach(CString),
    PivotRoot(CString),
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Unexpected {
        pid: 0,
        what: format!("path {s:?} has a NUL byte"),
    })
}

impl RawMountOp {
    fn new(op: &MountOp) -> Result<Self> {
        let opt = |s: &Option<String>| s.as_deref().map(cstring).transpose();
        Ok(match op {
            MountOp::Mount {
                source,
                target,
                fs_type,
                flags,
                data,
            } => RawMountOp::Mount(
                [
                    opt(source)?,
                    Some(cstring(target)?),
                    opt(fs_type)?,
                    opt(data)?,
                ],
                *flags,
            ),
            MountOp::Detach(t) => RawMountOp::Detach(cstring(t)?),
            MountOp::PivotRoot(d) => RawMountOp::PivotRoot(cstring(d)?),
        })
    }

    /// Runs in the child: raw syscalls only. Returns 0 or an errno.
    fn run(&self) -> i32 {
        let p = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: every pointer is a NUL-terminated string (or null) that lives in the
        // child's copy of our memory for the duration of the call.
        unsafe {
            let r = match self {
                RawMountOp::Mount(a, flags) => libc::syscall(
                    libc::SYS_mount,
                    p(&a[0]),
                    p(&a[1]),
                    p(&a[2]),
                    *flags as libc::c_ulong,
                    p(&a[3]),
                ),
                RawMountOp::Detach(t) => {
                    let r = libc::syscall(libc::SYS_umount2, t.as_ptr(), libc::MNT_DETACH);
                    let e = *libc::__errno_location();
                    if r != 0 && (e == libc::EINVAL || e == libc::ENOENT) {
                        0
                    } else {
                        r
                    }
                }
                RawMountOp::PivotRoot(d) => {
                    if libc::syscall(libc::SYS_chdir, d.as_ptr()) != 0
                        || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
                        || libc::syscall(libc::SYS_umount2, c".".as_ptr(), libc::MNT_DETACH) != 0
                    {
                        -1
                    } else {
                        libc::syscall(libc::SYS_chdir, c"/".as_ptr())
                    }
                }
            };
            if r == 0 {
                0
            } else {
                *libc::__errno_location()
            }
        }
    }
}

/// How the birth of a stub went wrong before it could stop: the mount step that
/// failed (index into [`StubSpec::mounts`]) and its errno. Read after the stub exited
/// with [`MOUNT_FAILED`].
pub struct StubReport(std::os::fd::OwnedFd);

/// The exit code of a stub whose mount setup failed.
pub const MOUNT_FAILED: i32 = 124;

impl StubReport {
    pub fn mount_failure(&self) -> Option<(usize, Errno)> {
        let mut b = [0u8; 8];
        // SAFETY: reads into a local buffer from an fd we own.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                b.as_mut_ptr().cast(),
                8,
            )
        };
        (n == 8).then(|| {
            let i = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let e = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
            (i, Errno::from_raw(e))
        })
    }
}

/// Forks a restore stub with pid `spec.pid`: a copy of the calling process that chroots as
/// asked, arranges to die with its parent, makes itself traced by the caller and stops
/// with SIGSTOP. The caller then rebuilds it by injecting syscalls. Every fd of the caller
/// is inherited, which is how restore hands files to the stub.
///
/// Fails with EEXIST when the pid is taken and EINVAL when it is above pid_max.
pub fn spawn_stub(spec: &StubSpec) -> Result<(Pid, StubReport)> {
    let root = spec
        .chroot
        .as_deref()
        .map(|r| {
            CString::new(r).map_err(|_| Error::Unexpected {
                pid: spec.pid,
                what: format!("root path {r:?} has a NUL byte"),
            })
        })
        .transpose()?;
    let mounts = spec
        .mounts
        .iter()
        .map(RawMountOp::new)
        .collect::<Result<Vec<_>>>()?;
    let mut ends = [0; 2];
    // SAFETY: pipe2 fills the two ints of `ends`.
    let r = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    check(r as libc::c_long, || "pipe2 for the stub's report".into())?;
    // SAFETY: both fds were just created and are owned by nothing else.
    let (report, tell) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(ends[0]),
            std::os::fd::OwnedFd::from_raw_fd(ends[1]),
        )
    };
    let parent = std::process::id() as libc::c_long;
    let tids = [spec.pid];
    // pid 0 means any pid (used by probes).
    let args = CloneArgs {
        flags: spec.namespaces,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if spec.pid > 0 {
            tids.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(spec.pid > 0),
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM or a new stack behaves like fork: the child gets a
    // copy of our address space and returns 0 here. `args` and `tids` outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // Child: only raw syscalls from here, no allocation or locks (another thread of
        // the parent may have held them at fork time). In a new pid namespace our
        // parent lives outside it and getppid() says 0.
        let parent = if spec.namespaces & libc::CLONE_NEWPID as u64 != 0 {
            0
        } else {
            parent
        };
        stub_child(
            root.as_ref(),
            parent,
            &mounts,
            std::os::fd::AsRawFd::as_raw_fd(&tell),
            spec.netns,
        );
    }
    check(r, || {
        format!("clone3(set_tid={}) for the restore stub", spec.pid)
    })?;
    Ok((Pid::from_raw(r as i32), StubReport(report)))
}

fn stub_child(
    root: Option<&CString>,
    parent: libc::c_long,
    mounts: &[RawMountOp],
    tell: libc::c_int,
    netns: Option<i32>,
) -> ! {
    // SAFETY: plain syscalls on values that live in this (copied) address space; the
    // child never returns into Rust code that could observe a half-forked state.
    unsafe {
        let mut code = 0;
        if let Some(fd) = netns {
            if libc::syscall(libc::SYS_setns, fd, libc::CLONE_NEWNET) != 0 {
                libc::syscall(libc::SYS_exit_group, NETNS_FAILED as libc::c_long);
            }
        }
        for (i, op) in mounts.iter().enumerate() {
            let e = op.run();
            if e != 0 {
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&(i as u32).to_ne_bytes());
                b[4..].copy_from_slice(&e.to_ne_bytes());
                libc::write(tell, b.as_ptr().cast(), 8);
                libc::syscall(libc::SYS_exit_group, MOUNT_FAILED as libc::c_long);
            }
        }
        if let Some(root) = root {
            if libc::syscall(libc::SYS_chroot, root.as_ptr()) != 0
                || libc::syscall(libc::SYS_chdir, c"/".as_ptr()) != 0
            {
                code = 120;
            }
        }
        if code == 0 {
            libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before PDEATHSIG was armed.
            if libc::syscall(libc::SYS_getppid) != parent {
                code = 121;
            } else if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                code = 122;
            } else {
                libc::syscall(
                    libc::SYS_kill,
                    libc::syscall(libc::SYS_getpid),
                    libc::SIGSTOP,
                );
                // Only reached if the controller resumed us without rebuilding us.
                code = 123;
            }
        }
        libc::syscall(libc::SYS_exit_group, code);
        libc::abort()
    }
}

/// The address of what the init of a restored tree's new pid namespace runs, for a
/// stub (a copy of us, so the address holds there too) to be pointed at with its first
/// argument the pid, in the namespace, of the tree's root.
pub fn pidns_init_entry() -> u64 {
    pidns_init as *const () as u64
}

/// Reaps every child and orphan of the namespace; when the tree's root ends, ends the
/// same way (exit code, or 128 + signal), which takes what is left of the namespace
/// with it, as for any pid namespace whose init dies.
extern "C" fn pidns_init(root: libc::c_long) -> ! {
    // SAFETY: raw syscalls with a status word on our own stack. This runs in a stub that
    // is a fork of mcr, on a stack and thread-local area copied from it.
    unsafe {
        let mut status: libc::c_int = 0;
        loop {
            let r = libc::syscall(
                libc::SYS_wait4,
                -1 as libc::c_long,
                &mut status as *mut libc::c_int,
                libc::__WALL,
                0 as libc::c_long,
            );
            if r == root {
                let sig = status & 0x7f;
                let code = if sig == 0 {
                    (status >> 8) & 0xff
                } else {
                    128 + sig
                };
                libc::syscall(libc::SYS_exit_group, code as libc::c_long);
            } else if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::syscall(libc::SYS_exit_group, 0 as libc::c_long);
            }
        }
    }
}

/// The kernel's pid_max.
pub fn pid_max() -> Result<i32> {
    let p = "/proc/sys/kernel/pid_max";
    let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    t.trim().parse().map_err(|_| Error::Parse {
        path: p.into(),
        what: "pid_max",
        line: t,
    })
}

/// Sends a signal; ESRCH is not an error.
pub fn kill(pid: Pid, sig: i32) -> Result<()> {
    // SAFETY: kill takes no pointers.
    let r = unsafe { libc::kill(pid.as_raw(), sig) };
    if r < 0 && Errno::last() != Errno::ESRCH {
        return Err(SysError::new(format!("kill({pid}, {sig})"), Errno::last()).into());
    }
    Ok(())
}

/// Asks clone3 for our own pid: EEXIST proves `set_tid` is understood, without forking.
pub fn probe_set_tid() -> std::result::Result<(), Errno> {
    let tids = [std::process::id() as i32];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: this call cannot succeed (our own pid is taken), so no child is created;
    // the pointers outlive it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match (r, Errno::last()) {
        (0, _) => {
            // Unreachable in practice; never let a child run on.
            // SAFETY: exit_group takes no pointers.
            unsafe { libc::syscall(libc::SYS_exit_group, 0) };
            Ok(())
        }
        (r, _) if r > 0 => Ok(()),
        (_, Errno::EEXIST) => Ok(()),
        (_, e) => Err(e),
    }
}

/// The namespace `pid` is in, of kind `kind` (`uts`, `ipc`, ...), as its /proc link
/// names it (`uts:[4026531838]`).
pub fn namespace(pid: Pid, kind: &str) -> Result<String> {
    crate::procfs::read_link(&format!("/proc/{pid}/ns/{kind}"))
}

/// Runs `f` on a short-lived thread that has joined the `kind` namespace (`ipc`, `uts`)
/// of `pid`: namespaces of those kinds are per thread, so ours stay as they are.
pub(crate) fn in_namespace_of<T: Send>(
    pid: Pid,
    kind: &str,
    flag: libc::c_int,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    in_namespace(&format!("/proc/{pid}/ns/{kind}"), flag, f)
}

/// Runs `f` on a short-lived thread that joined the network namespace at `path` (a
/// /run/netns/NAME or /proc/PID/ns/net): sockets it makes live there.
pub fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    in_namespace(path, libc::CLONE_NEWNET, f)
}

fn in_namespace<T: Send>(
    path: &str,
    flag: libc::c_int,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let ns = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns takes no pointers; it changes this thread's namespace only,
            // and the thread ends right after.
            let r = unsafe { libc::setns(ns.as_raw_fd(), flag) };
            check(r as libc::c_long, || {
                format!("setns into the namespace {path}")
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Unexpected {
                pid: 0,
                what: format!("a thread in the namespace {path} panicked"),
            })
        })
    })
}

/// The host and domain names in the uts namespace of `pid`.
pub fn uts_names(pid: Pid) -> Result<(String, String)> {
    in_namespace_of(pid, "uts", libc::CLONE_NEWUTS, || {
        // SAFETY: utsname is plain data; zeroed is a valid value.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uname fills `u`, which outlives the call.
        check(unsafe { libc::uname(&mut u) } as libc::c_long, || {
            "uname".into()
        })?;
        let s = |f: &[libc::c_char]| {
            let b: Vec<u8> = f
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        };
        Ok((s(&u.nodename), s(&u.domainname)))
    })
}
