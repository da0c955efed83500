//! Which pages another process wrote since a point in time: userfaultfd write-protection
//! in async mode, read back with PAGEMAP_SCAN (Linux 6.7+).
//!
//! The userfaultfd is made inside the tracked process by an injected syscall, so its
//! registrations belong to that process's mm, and taken out with pidfd_getfd. In async
//! mode the kernel resolves each write fault itself (the writer never waits for us) and
//! only clears the page's protection: a page is *written* when it is no longer
//! protected. The registrations live as long as some process holds the userfaultfd;
//! when the last copy closes, they go, and the process is as it was.
//!
//! Only the kernel knows what is still tracked: a VMA made later (mmap, a moved mremap,
//! a fork's copy) is not registered, and a scan of it with PM_SCAN_CHECK_WPASYNC fails
//! with EPERM, which [`written`] turns into `None`: "not tracked, take all of it".

use crate::inject::Injector;
use crate::mem::{Pagemap, ScanQuery};
use crate::{check, pidfd, sys, Errno, Pid, Result};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// A userfaultfd of our own made with `flags`, and the features this kernel offers,
/// which must include `need` (named so in the error).
pub(crate) fn own_userfaultfd(
    flags: libc::c_int,
    need: u64,
    named: &str,
) -> std::result::Result<(OwnedFd, u64), String> {
    // SAFETY: userfaultfd takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", Errno::last()));
    }
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    let fd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
    let mut api = Api {
        api: sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one struct uffdio_api.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api) };
    if r < 0 {
        return Err(format!("UFFDIO_API: {}", Errno::last()));
    }
    if api.features & need != need {
        return Err(format!(
            "userfaultfd features {:#x} lack {named}",
            api.features
        ));
    }
    Ok((fd, api.features))
}

/// Makes a userfaultfd inside the stopped process behind `inj` (kernel-mode: the
/// process's privilege decides), takes it out and asks it for `features`. The
/// process's own copy is closed again before this returns, whatever happened.
pub(crate) fn made_inside(
    inj: &mut Injector,
    pidfd: &OwnedFd,
    features: u64,
    named: &str,
) -> Result<OwnedFd> {
    let pid = inj.pid();
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let remote = inj.call(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0], || {
        "userfaultfd(O_CLOEXEC|O_NONBLOCK)".into()
    })? as i32;
    let taken = pidfd::pidfd_getfd(pidfd, pid, remote);
    let closed = inj.close(remote);
    let uffd = taken?;
    closed?;
    let mut api = Api {
        api: sys::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one struct uffdio_api, which lives on
    // our stack for the call.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_API, &mut api) };
    check(r as libc::c_long, || {
        format!("ioctl(UFFDIO_API, {named}) on the userfaultfd of pid {pid}")
    })?;
    Ok(uffd)
}

/// Registers `[start, end)` of `pid`'s memory with its userfaultfd `uffd` in `mode`.
pub(crate) fn register(
    uffd: &OwnedFd,
    pid: Pid,
    (start, end): (u64, u64),
    mode: u64,
    named: &str,
) -> Result<()> {
    let mut reg = Register {
        range: Range {
            start,
            len: end - start,
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register on our stack.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_REGISTER, &mut reg) };
    check(r as libc::c_long, || {
        format!("ioctl(UFFDIO_REGISTER, {named}) of {start:#x}-{end:#x} in pid {pid}")
    })?;
    Ok(())
}

/// A userfaultfd of another process, in write-protect async mode.
pub struct WriteTracker {
    pid: Pid,
    uffd: OwnedFd,
}

impl WriteTracker {
    /// Makes a userfaultfd inside the stopped process behind `inj` and takes it out.
    /// The process's own copy is closed again before this returns, whatever happened.
    pub fn inject(inj: &mut Injector, pidfd: &OwnedFd) -> Result<Self> {
        let uffd = made_inside(
            inj,
            pidfd,
            sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED,
            "WP_ASYNC|WP_UNPOPULATED",
        )?;
        Ok(Self {
            pid: inj.pid(),
            uffd,
        })
    }

    /// Takes over fd `fd` of this process, inherited across exec from whoever made the
    /// tracker of `pid`. Refused unless it is a userfaultfd.
    pub fn from_inherited(pid: Pid, fd: RawFd) -> Result<Self> {
        let link = crate::procfs::read_link(&format!("/proc/self/fd/{fd}"))?;
        if link != "anon_inode:[userfaultfd]" {
            return Err(crate::Error::Unexpected {
                pid: pid.as_raw(),
                what: format!("inherited fd {fd} is {link}, not a userfaultfd"),
            });
        }
        // SAFETY: the fd is open (its link was just read), is a userfaultfd, and was
        // inherited for us alone: nothing else in this process owns it.
        let uffd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        Ok(Self { pid, uffd })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// The userfaultfd, to be kept open (by whoever outlives us) as long as the tracking
    /// should last.
    pub fn into_fd(self) -> OwnedFd {
        self.uffd
    }

    /// Starts tracking `[start, end)`, which must be one private VMA or several: registers
    /// it and write-protects every page, so the next write to any page marks it.
    /// EBUSY means another userfaultfd (the process's own) has it already.
    pub fn track(&self, start: u64, end: u64) -> Result<()> {
        register(
            &self.uffd,
            self.pid,
            (start, end),
            sys::UFFDIO_REGISTER_MODE_WP,
            "WP",
        )?;
        let mut wp = WriteProtect {
            range: Range {
                start,
                len: end - start,
            },
            mode: sys::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one struct uffdio_writeprotect on
        // our stack.
        let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), sys::UFFDIO_WRITEPROTECT, &mut wp) };
        check(r as libc::c_long, || {
            format!(
                "ioctl(UFFDIO_WRITEPROTECT) of {start:#x}-{end:#x} in pid {}",
                self.pid
            )
        })?;
        Ok(())
    }

    /// Stops tracking `[start, end)`: later scans of it answer "not tracked".
    pub fn untrack(&self, start: u64, end: u64) -> Result<()> {
        let mut range = Range {
            start,
            len: end - start,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range on our stack.
        let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), sys::UFFDIO_UNREGISTER, &mut range) };
        check(r as libc::c_long, || {
            format!(
                "ioctl(UFFDIO_UNREGISTER) of {start:#x}-{end:#x} in pid {}",
                self.pid
            )
        })?;
        Ok(())
    }
}

/// The page runs of `[start, end)` written since they were last protected, or None when
/// some of the range is not tracked (by any userfaultfd in async write-protect mode).
/// With `reprotect`, the runs returned are protected again in the same walk, so a write
/// racing with the scan is either reported now or marks the page for the next scan.
///
/// Pages dropped with MADV_DONTNEED are reported as written: they read as zeros (or as
/// the file) now, whatever they held before.
pub fn written(
    pm: &Pagemap,
    start: u64,
    end: u64,
    reprotect: bool,
) -> Result<Option<Vec<(u64, u64)>>> {
    let flags = sys::PM_SCAN_CHECK_WPASYNC
        | if reprotect {
            sys::PM_SCAN_WP_MATCHING
        } else {
            0
        };
    let q = ScanQuery {
        flags,
        all_of: sys::PAGE_IS_WRITTEN,
        anyof: 0,
        return_mask: sys::PAGE_IS_WRITTEN,
    };
    match pm.scan_with(start, end, q) {
        Ok(regions) => {
            let mut runs: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
            for (s, e, _) in regions {
                match runs.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => runs.push((s, e)),
                }
            }
            Ok(Some(runs))
        }
        Err(e) if e.errno() == Some(Errno::EPERM) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The userfaultfd features, if this kernel can track another process's writes this way: a userfaultfd
/// grants WP_ASYNC and WP_UNPOPULATED, and PAGEMAP_SCAN exists.
pub fn supported() -> std::result::Result<u64, String> {
    let (_fd, features) = own_userfaultfd(
        libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY,
        sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED,
        "WP_ASYNC|WP_UNPOPULATED",
    )?;
    let api = Api {
        api: sys::UFFD_API,
        features,
        ioctls: 0,
    };
    let pm = Pagemap::open(Pid::this()).map_err(|e| e.to_string())?;
    let page = crate::PAGE_SIZE;
    let here = &api as *const Api as u64 & !(page - 1);
    pm.scan(
        here,
        here + page,
        sys::PAGE_IS_PRESENT,
        sys::PAGE_IS_PRESENT,
    )
    .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
    Ok(api.features)
}

impl std::fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WriteTracker(pid {}, uffd {})",
            self.pid,
            self.uffd.as_raw_fd()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::{spawn_stub, StubSpec};
    use crate::mem::{read_remote, write_remote};
    use crate::PAGE_SIZE;

    use crate::inject::tests::Stub;

    fn injector(pid: Pid) -> Injector {
        crate::inject::tests::stub_injector(pid)
    }

    /// The process itself writes 16 bytes at `addr` (the kernel's copy to user memory,
    /// in the process's own context).
    fn process_writes(inj: &mut Injector, addr: u64) {
        inj.call(
            libc::SYS_clock_gettime,
            [libc::CLOCK_REALTIME as u64, addr, 0, 0, 0, 0],
            || "clock_gettime".into(),
        )
        .unwrap();
    }

    const P: u64 = PAGE_SIZE;

    #[test]
    fn reports_exactly_the_pages_written_since_protection() {
        let (pid, _) = spawn_stub(&StubSpec::default()).unwrap();
        let _stub = Stub(pid);
        let mut inj = injector(pid);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let a = inj.mmap(0, 64 * P, rw, anon, -1, 0).unwrap();
        let fresh = inj.mmap(0, 16 * P, rw, anon, -1, 0).unwrap();
        write_remote(pid, a, &vec![0x5a; 64 * P as usize]).unwrap();

        let t = WriteTracker::inject(&mut inj, &pidfd::pidfd_open(pid).unwrap()).unwrap();
        t.track(a, a + 64 * P).unwrap();
        t.track(fresh, fresh + 16 * P).unwrap();
        let pm = Pagemap::open(pid).unwrap();
        assert_eq!(written(&pm, a, a + 64 * P, false).unwrap(), Some(vec![]));

        process_writes(&mut inj, a + 3 * P + 8);
        process_writes(&mut inj, a + 10 * P);
        // A write from outside (ptrace, process_vm_writev) takes the same fault.
        write_remote(pid, a + 40 * P + 100, &[1; 2 * P as usize]).unwrap();
        inj.call(
            libc::SYS_madvise,
            [a + 20 * P, P, libc::MADV_DONTNEED as u64, 0, 0, 0],
            || "madvise".into(),
        )
        .unwrap();
        // A page never touched before tracking began (WP_UNPOPULATED).
        process_writes(&mut inj, fresh + 5 * P);
        let expect = vec![
            (a + 3 * P, a + 4 * P),
            (a + 10 * P, a + 11 * P),
            (a + 20 * P, a + 21 * P),
            (a + 40 * P, a + 43 * P),
        ];
        assert_eq!(
            written(&pm, a, a + 64 * P, false).unwrap(),
            Some(expect.clone())
        );
        // Reading does not re-protect; a re-protecting scan reports the same once.
        assert_eq!(written(&pm, a, a + 64 * P, true).unwrap(), Some(expect));
        assert_eq!(written(&pm, a, a + 64 * P, false).unwrap(), Some(vec![]));
        assert_eq!(
            written(&pm, fresh, fresh + 16 * P, false).unwrap(),
            Some(vec![(fresh + 5 * P, fresh + 6 * P)])
        );
        // Reads mark nothing.
        let mut b = vec![0u8; 64 * P as usize];
        read_remote(pid, a, &mut b).unwrap();
        assert_eq!(written(&pm, a, a + 64 * P, false).unwrap(), Some(vec![]));

        // A VMA made after tracking began is not tracked, and says so.
        let later = inj.mmap(0, 4 * P, rw, anon, -1, 0).unwrap();
        assert_eq!(written(&pm, later, later + 4 * P, false).unwrap(), None);
        // Neither is a tracked VMA moved elsewhere.
        let moved = inj
            .call(
                libc::SYS_mremap,
                [
                    fresh,
                    16 * P,
                    16 * P,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    later + 64 * P,
                    0,
                ],
                || "mremap".into(),
            )
            .unwrap();
        assert_eq!(written(&pm, moved, moved + 16 * P, false).unwrap(), None);

        // Once the last copy of the userfaultfd is closed, nothing is tracked any more.
        drop(t);
        assert_eq!(written(&pm, a, a + 64 * P, false).unwrap(), None);
        process_writes(&mut inj, a + 7 * P);
    }

    #[test]
    fn a_second_tracker_of_the_same_memory_is_refused() {
        let (pid, _) = spawn_stub(&StubSpec::default()).unwrap();
        let _stub = Stub(pid);
        let mut inj = injector(pid);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let a = inj
            .mmap(0, 4 * P, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            .unwrap();
        let pidfd = pidfd::pidfd_open(pid).unwrap();
        let one = WriteTracker::inject(&mut inj, &pidfd).unwrap();
        one.track(a, a + 4 * P).unwrap();
        let two = WriteTracker::inject(&mut inj, &pidfd).unwrap();
        let e = two.track(a, a + 4 * P).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EBUSY), "{e}");
        one.untrack(a, a + 4 * P).unwrap();
        two.track(a, a + 4 * P).unwrap();
    }
}
