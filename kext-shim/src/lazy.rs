//! Memory another process gets on first touch (post-copy): a userfaultfd in missing
//! mode, made inside the process by an injected syscall and taken out with pidfd_getfd,
//! so that its registrations belong to that process's mm. A touch of a registered page
//! that is not there stops the toucher (in user mode or inside a syscall) until we
//! place the page (UFFDIO_COPY) or a zero page; the process's forks, mremaps, and
//! MADV_DONTNEED or munmap of registered memory are told to us as events, the toucher
//! waiting meanwhile. Closing the last copy of the userfaultfd ends it all: the
//! registrations go and a missing page is an ordinary zero page again.

use crate::inject::Injector;
use crate::{check, sys, Errno, Pid, Result};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// What the process did, as its userfaultfd tells.
#[derive(Debug)]
pub enum Event {
    /// A thread touched `addr` (page-aligned here), which is missing, and waits.
    Fault { addr: u64, write: bool },
    /// The process forked: the child's registrations are on this new userfaultfd, its
    /// missing pages those the parent had.
    Fork(LazyFd),
    /// `[from, from+len)` moved to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was dropped (MADV_DONTNEED, MADV_REMOVE): it reads as zeros now.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// How placing a page went.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed {
    Done,
    /// Something is there already (a zero page placed for a fault, or the page itself).
    Already,
    /// No registered mapping there any more, or the process is gone.
    Gone,
    /// The process's memory is changing (a fork, a remap, a drop): read its events,
    /// then try again. Part of a run may be in place already.
    Retry,
}

/// A userfaultfd of another process in missing mode, with its non-cooperative events.
#[derive(Debug)]
pub struct LazyFd {
    pid: Pid,
    uffd: OwnedFd,
}

impl LazyFd {
    /// Makes the userfaultfd inside the stopped process behind `inj` (which must be
    /// privileged enough for one that also catches the kernel's own accesses: a read()
    /// into a missing page waits for it like the process's own touch) and takes it out.
    /// The process's copy is closed again before this returns, whatever happened.
    pub fn inject(inj: &mut Injector, pidfd: &OwnedFd) -> Result<Self> {
        let uffd = crate::dirty::made_inside(
            inj,
            pidfd,
            sys::UFFD_FEATURE_EVENT_FORK
                | sys::UFFD_FEATURE_EVENT_REMAP
                | sys::UFFD_FEATURE_EVENT_REMOVE
                | sys::UFFD_FEATURE_EVENT_UNMAP,
            "missing mode with fork, remap, remove and unmap events",
        )?;
        Ok(Self {
            pid: inj.pid(),
            uffd,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Registers `[start, end)` (whole private anonymous VMAs): its missing pages are
    /// ours to place from now on.
    pub fn register(&self, start: u64, end: u64) -> Result<()> {
        crate::dirty::register(
            &self.uffd,
            self.pid,
            (start, end),
            sys::UFFDIO_REGISTER_MODE_MISSING,
            "missing",
        )
    }

    /// Places `data` (whole pages) at `dst`, waking whoever waits on them.
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<Placed> {
        let mut c = Copy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        self.place(|| {
            c.copy = 0;
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which `data` holds, and
            // reads and writes one struct uffdio_copy on our stack.
            unsafe { libc::ioctl(self.uffd.as_raw_fd(), sys::UFFDIO_COPY, &mut c) }
        })
        .map_err(|e| {
            self.err(
                e,
                format!("ioctl(UFFDIO_COPY) of {} bytes at {dst:#x}", data.len()),
            )
        })
    }

    /// Places zero pages over `[addr, addr+len)`, waking whoever waits on them.
    pub fn zero(&self, addr: u64, len: u64) -> Result<Placed> {
        let mut z = ZeroPage {
            range: Range { start: addr, len },
            mode: 0,
            zeropage: 0,
        };
        self.place(|| {
            z.zeropage = 0;
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one struct uffdio_zeropage on
            // our stack.
            unsafe { libc::ioctl(self.uffd.as_raw_fd(), sys::UFFDIO_ZEROPAGE, &mut z) }
        })
        .map_err(|e| self.err(e, format!("ioctl(UFFDIO_ZEROPAGE) at {addr:#x}")))
    }

    /// Wakes whoever waits on `[addr, addr+len)`, which is there already.
    pub fn wake(&self, addr: u64, len: u64) -> Result<()> {
        let mut range = Range { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one struct uffdio_range on our stack.
        let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), sys::UFFDIO_WAKE, &mut range) };
        match check(r as libc::c_long, String::new) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(Errno::ENOENT) || e.errno() == Some(Errno::ESRCH) => Ok(()),
            Err(e) => Err(self.err(
                e.errno().unwrap_or(Errno::EIO),
                format!("ioctl(UFFDIO_WAKE) at {addr:#x}"),
            )),
        }
    }

    /// Runs a placing ioctl. EAGAIN (the mm is changing until its event is read) is
    /// the caller's to handle: looping here would wait for ourselves.
    fn place(&self, mut ioctl: impl FnMut() -> libc::c_int) -> std::result::Result<Placed, Errno> {
        loop {
            if ioctl() == 0 {
                return Ok(Placed::Done);
            }
            return match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => Ok(Placed::Retry),
                Errno::EEXIST => Ok(Placed::Already),
                // No VMA, no longer registered, or the mm is gone.
                Errno::ENOENT | Errno::ESRCH | Errno::EINVAL => Ok(Placed::Gone),
                e => Err(e),
            };
        }
    }

    fn err(&self, errno: Errno, what: String) -> crate::Error {
        crate::SysError::new(format!("{what} in pid {}", self.pid), errno).into()
    }

    /// Every event waiting now (none if none: the fd does not block).
    pub fn events(&self) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 32 * 16];
        loop {
            // SAFETY: read writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EAGAIN {
                    return Ok(out);
                }
                if e == Errno::EINTR {
                    continue;
                }
                return Err(self.err(e, "reading the userfaultfd".into()));
            }
            if n == 0 {
                return Ok(out);
            }
            for m in buf[..n as usize].chunks_exact(32) {
                let word = |i: usize| {
                    u64::from_ne_bytes(m[8 + i * 8..16 + i * 8].try_into().expect("8 bytes"))
                };
                out.push(match m[0] {
                    sys::UFFD_EVENT_PAGEFAULT => Event::Fault {
                        addr: word(1) & !(crate::PAGE_SIZE - 1),
                        // UFFD_PAGEFAULT_FLAG_WRITE
                        write: word(0) & 1 != 0,
                    },
                    sys::UFFD_EVENT_FORK => {
                        let fd = u32::from_ne_bytes(m[8..12].try_into().expect("4 bytes")) as i32;
                        // SAFETY: the kernel installed this fd in our table for the
                        // child's userfaultfd as the event was read; no one else owns it.
                        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
                        Event::Fork(LazyFd {
                            pid: self.pid,
                            uffd,
                        })
                    }
                    sys::UFFD_EVENT_REMAP => Event::Remap {
                        from: word(0),
                        to: word(1),
                        len: word(2),
                    },
                    sys::UFFD_EVENT_REMOVE => Event::Remove {
                        start: word(0),
                        end: word(1),
                    },
                    sys::UFFD_EVENT_UNMAP => Event::Unmap {
                        start: word(0),
                        end: word(1),
                    },
                    other => {
                        return Err(crate::Error::Unexpected {
                            pid: self.pid.as_raw(),
                            what: format!("userfaultfd event {other:#x}"),
                        })
                    }
                });
            }
            if (n as usize) < buf.len() {
                return Ok(out);
            }
        }
    }
}

/// Whether this kernel serves missing pages with the events post-copy follows: asks
/// UFFDIO_API of a userfaultfd of our own what it offers (kernel-mode, as post-copy's
/// are).
pub fn supported() -> std::result::Result<u64, String> {
    crate::dirty::own_userfaultfd(
        libc::O_CLOEXEC | libc::O_NONBLOCK,
        sys::UFFD_FEATURE_EVENT_FORK
            | sys::UFFD_FEATURE_EVENT_REMAP
            | sys::UFFD_FEATURE_EVENT_REMOVE
            | sys::UFFD_FEATURE_EVENT_UNMAP,
        "the fork, remap, remove and unmap events",
    )
    .map(|(_, features)| features)
}

/// Gives the calling thread a larger share of the cores (nice -10): a thread serving
/// missing pages is what the workload's touches wait for, and on a busy machine an
/// ordinary thread may wait tens of ms for a core. Not a real-time class: its pushes
/// must not starve the workload it serves.
pub fn serve_first() -> Result<()> {
    // SAFETY: gettid takes no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority takes no pointers; `tid` names the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -10) };
    check(r as libc::c_long, || "setpriority(-10)".into()).map(|_| ())
}

impl AsFd for LazyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::{spawn_stub, StubSpec};
    use crate::inject::tests::{stub_injector, Stub};
    use crate::PAGE_SIZE;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    /// A touch of a registered page that is missing waits for the page we place and
    /// sees it; one we answer with a zero page reads zeros. The touch here is the
    /// kernel's own, inside a syscall: rt_sigprocmask reading the new mask from it.
    #[test]
    fn a_missing_page_waits_for_the_page_placed_and_a_zero_page_reads_zeros() {
        let (pid, _) = spawn_stub(&StubSpec::default()).unwrap();
        let _stub = Stub(pid);
        let mut inj = stub_injector(pid);
        let area = inj
            .mmap(
                0,
                2 * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
            .unwrap();
        let pidfd = crate::pidfd::pidfd_open(pid).unwrap();
        let lazy = LazyFd::inject(&mut inj, &pidfd).unwrap();
        lazy.register(area, area + 2 * PAGE_SIZE).unwrap();
        let mask: u64 = 0x5a5a_0000 | 1 << (libc::SIGUSR1 - 1);
        let server = std::thread::spawn(move || {
            let mut served = Vec::new();
            while served.len() < 2 {
                let mut fds = [PollFd::new(lazy.as_fd(), PollFlags::POLLIN)];
                assert_eq!(
                    poll(&mut fds, PollTimeout::from(5000u16)).unwrap(),
                    1,
                    "no fault came"
                );
                for e in lazy.events().unwrap() {
                    match e {
                        Event::Fault { addr, .. } if addr == area => {
                            let mut page = vec![0u8; PAGE_SIZE as usize];
                            page[..8].copy_from_slice(&mask.to_ne_bytes());
                            assert_eq!(lazy.copy(addr, &page).unwrap(), Placed::Done);
                            served.push(addr);
                        }
                        Event::Fault { addr, .. } => {
                            assert_eq!(lazy.zero(addr, PAGE_SIZE).unwrap(), Placed::Done);
                            served.push(addr);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            (lazy, served)
        });
        let setmask = |inj: &mut Injector, at: u64| {
            inj.call(
                libc::SYS_rt_sigprocmask,
                [libc::SIG_SETMASK as u64, at, 0, 8, 0, 0],
                || "rt_sigprocmask".into(),
            )
            .unwrap();
        };
        setmask(&mut inj, area);
        assert_eq!(crate::ptrace::get_sigmask(pid).unwrap(), mask);
        setmask(&mut inj, area + PAGE_SIZE);
        assert_eq!(crate::ptrace::get_sigmask(pid).unwrap(), 0);
        let (lazy, served) = server.join().unwrap();
        assert_eq!(served, vec![area, area + PAGE_SIZE]);
        assert_eq!(
            lazy.copy(area, &[0u8; PAGE_SIZE as usize]).unwrap(),
            Placed::Already
        );
    }
}
