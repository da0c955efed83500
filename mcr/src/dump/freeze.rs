//! Holding a process still for the dump, and letting it go exactly as it was.

use super::{AfterDump, DumpError, Result, StepContext};
use kext_shim::ptrace::{self, Regs};
use kext_shim::{Errno, Pid};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;

const PTRACE_EVENT_STOP: i32 = 128;

/// A seized, stopped process. Dropped without [`release`](Self::release), it gets its
/// registers back and is detached, so a failed checkpoint leaves it running as before.
pub struct Frozen {
    pub pid: Pid,
    /// Registers at the stop, untouched; what the workload resumes with.
    pub regs: Regs,
    /// Set once the stop was seen, so Drop knows it may set registers back.
    stopped: bool,
    released: bool,
}

impl Frozen {
    pub fn freeze(pid: Pid) -> Result<Self> {
        let raw = pid.as_raw();
        ptrace::seize(pid).map_err(|source| match source.errno() {
            Some(Errno::ESRCH) => DumpError::NoProcess(raw),
            _ => DumpError::Trace { pid: raw, source },
        })?;
        let mut f = Frozen {
            pid,
            regs: zero_regs(),
            stopped: false,
            released: false,
        };
        ptrace::interrupt(pid).step(pid, || "interrupting it".into())?;
        loop {
            let (sig, event) =
                ptrace::wait_stopped(pid).step(pid, || "waiting for it to stop".into())?;
            if event == PTRACE_EVENT_STOP {
                break;
            }
            // A signal arrived before our interrupt took effect: let it be delivered as
            // it would have been, then the interrupt stop follows.
            ptrace::cont(pid, sig).step(pid, || format!("passing signal {sig} on"))?;
        }
        f.regs = ptrace::get_regs(pid).step(pid, || "reading registers".into())?;
        f.stopped = true;
        Ok(f)
    }

    /// Lets the workload go after a successful dump.
    pub fn release(mut self, after: AfterDump) -> Result<()> {
        let pid = self.pid;
        self.released = true;
        match after {
            AfterDump::Kill => {
                // Detach into a group stop and kill it there: it runs no instruction after
                // its image was taken, and we never reap it (its parent may be waiting).
                let pidfd =
                    kext_shim::pidfd::pidfd_open(pid).step(pid, || "opening a pidfd".into())?;
                ptrace::set_regs(pid, &self.regs).step(pid, || "restoring registers".into())?;
                ptrace::detach(pid, libc::SIGSTOP).step(pid, || "detaching stopped".into())?;
                kext_shim::clone::kill(pid, libc::SIGKILL).step(pid, || "killing it".into())?;
                // A pidfd turns readable once the process has exited.
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                loop {
                    match poll(&mut fds, PollTimeout::from(5000u16)) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Ok(0) => {
                            return Err(DumpError::Kernel {
                                pid: pid.as_raw(),
                                step: "waiting for it to die".into(),
                                source: kext_shim::Error::Unexpected {
                                    pid: pid.as_raw(),
                                    what: "still alive 5 s after SIGKILL".into(),
                                },
                            })
                        }
                        _ => break,
                    }
                }
                Ok(())
            }
            AfterDump::LeaveRunning => {
                ptrace::set_regs(pid, &self.regs).step(pid, || "restoring registers".into())?;
                ptrace::detach(pid, 0).step(pid, || "detaching".into())
            }
            AfterDump::LeaveStopped => {
                ptrace::set_regs(pid, &self.regs).step(pid, || "restoring registers".into())?;
                ptrace::detach(pid, libc::SIGSTOP).step(pid, || "detaching stopped".into())?;
                // The stop happens once the task runs again to take SIGSTOP; promise it
                // has happened by the time we return.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while kext_shim::procfs::Stat::read(pid)
                    .is_ok_and(|s| !matches!(s.state(), 'T' | 't'))
                {
                    if std::time::Instant::now() > deadline {
                        return Err(DumpError::Kernel {
                            pid: pid.as_raw(),
                            step: "waiting for it to stop".into(),
                            source: kext_shim::Error::Unexpected {
                                pid: pid.as_raw(),
                                what: "not stopped 2 s after SIGSTOP".into(),
                            },
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Ok(())
            }
        }
    }
}

fn zero_regs() -> Regs {
    kext_shim::ptrace::regs_from_words(&[0; kext_shim::ptrace::REGS_WORDS])
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if !self.stopped {
            // Never seen stopped: nothing of ours to undo; exiting detaches us anyway.
            let _ = ptrace::detach(self.pid, 0);
            return;
        }
        if let Err(e) = ptrace::set_regs(self.pid, &self.regs) {
            tracing::error!(pid = self.pid.as_raw(), "putting registers back: {e}");
        }
        if let Err(e) = ptrace::detach(self.pid, 0) {
            tracing::error!(pid = self.pid.as_raw(), "detaching: {e}");
        }
    }
}
