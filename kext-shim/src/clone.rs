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
}

/// Forks a restore stub with pid `spec.pid`: a copy of the calling process that chroots as
/// asked, arranges to die with its parent, makes itself traced by the caller and stops
/// with SIGSTOP. The caller then rebuilds it by injecting syscalls. Every fd of the caller
/// is inherited, which is how restore hands files to the stub.
///
/// Fails with EEXIST when the pid is taken and EINVAL when it is above pid_max.
pub fn spawn_stub(spec: &StubSpec) -> Result<Pid> {
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
    let parent = std::process::id() as libc::c_long;
    let tids = [spec.pid];
    // pid 0 means any pid (used by probes).
    let args = CloneArgs {
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
        // the parent may have held them at fork time).
        stub_child(root.as_ref(), parent);
    }
    check(r, || {
        format!("clone3(set_tid={}) for the restore stub", spec.pid)
    })?;
    Ok(Pid::from_raw(r as i32))
}

fn stub_child(root: Option<&CString>, parent: libc::c_long) -> ! {
    // SAFETY: plain syscalls on values that live in this (copied) address space; the
    // child never returns into Rust code that could observe a half-forked state.
    unsafe {
        let mut code = 0;
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

/// Whether `pid` is free right now (racy, for messages only).
pub fn pid_in_use(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
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
