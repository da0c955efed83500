//! The process being restored, from its clone3 birth until it is let go. Dropped before
//! [`Stub::release`], it is killed and reaped: a failed restore leaves nothing behind.

use super::{RestoreError, Result, StepContext};
use kext_shim::clone::{spawn_stub, StubSpec};
use kext_shim::{ptrace, Errno, Pid};

pub struct Stub {
    pub pid: Pid,
    released: bool,
}

impl Stub {
    pub fn spawn(pid: i32, chroot: Option<String>) -> Result<Stub> {
        let spec = StubSpec {
            pid,
            chroot: chroot.clone(),
        };
        let child = spawn_stub(&spec).map_err(|e| match e.errno() {
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
                ptrace::set_options(child, libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL)
                    .step(pid, || "setting ptrace options".into())?;
                Ok(stub)
            }
            ptrace::Stop::Exited(120) => Err(RestoreError::File {
                pid,
                what: "root".into(),
                path: chroot.unwrap_or_default(),
                why: "cannot chroot there".into(),
            }),
            other => Err(RestoreError::Kernel {
                pid,
                step: "starting the new process".into(),
                source: kext_shim::Error::Unexpected {
                    pid,
                    what: format!("reported {other:?} instead of stopping"),
                },
            }),
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
        let _ = nix::sys::wait::waitpid(self.pid, Some(nix::sys::wait::WaitPidFlag::__WALL));
    }
}
