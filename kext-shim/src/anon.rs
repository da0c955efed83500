//! Kernel objects behind anon_inode fds that restore recreates: eventfd, timerfd,
//! signalfd, epoll.

use crate::{check, Result, SysError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn owned(r: libc::c_long, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    let fd = check(r, what)?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// eventfd with its counter; `flags` are EFD_* (EFD_SEMAPHORE, EFD_NONBLOCK).
pub fn eventfd(count: u64, flags: i32) -> Result<OwnedFd> {
    if count > u32::MAX as u64 {
        // eventfd(2) takes a 32-bit start value; add the rest by writing.
        let fd = eventfd(0, flags)?;
        nix::unistd::write(&fd, &count.to_ne_bytes())
            .map_err(|e| SysError::new("write to eventfd", e))?;
        return Ok(fd);
    }
    // SAFETY: eventfd2 takes no pointers.
    owned(
        unsafe { libc::syscall(libc::SYS_eventfd2, count as libc::c_uint, flags) },
        || format!("eventfd({count})"),
    )
}

/// A timerfd on `clockid`, armed relative to now (0 leaves it disarmed), with `ticks`
/// expirations already counted and not yet read.
pub fn timerfd(
    clockid: i32,
    flags: i32,
    value_ns: u64,
    interval_ns: u64,
    ticks: u64,
) -> Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers.
    let fd = owned(
        unsafe { libc::syscall(libc::SYS_timerfd_create, clockid, flags) },
        || format!("timerfd_create(clock {clockid})"),
    )?;
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timerfd_settime,
            fd.as_raw_fd(),
            0,
            &spec,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    };
    check(r, || "timerfd_settime".into())?;
    if ticks > 0 {
        // TFD_IOC_SET_TICKS = _IOW('T', 0, u64)
        const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
        // SAFETY: the ioctl reads one u64 from `ticks`.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) };
        check(r as libc::c_long, || format!("TFD_IOC_SET_TICKS {ticks}"))?;
    }
    Ok(fd)
}

/// A signalfd for the signals in `mask` (bit n-1 for signal n).
pub fn signalfd(mask: u64, flags: i32) -> Result<OwnedFd> {
    // SAFETY: the kernel reads an 8-byte sigset from `mask`.
    owned(
        unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, 8usize, flags) },
        || format!("signalfd({mask:#x})"),
    )
}

/// An empty epoll instance; its interest list is filled by the process that owns the
/// target fds.
pub fn epoll(flags: i32) -> Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers.
    owned(
        unsafe { libc::syscall(libc::SYS_epoll_create1, flags) },
        || "epoll_create1".into(),
    )
}

/// A connected pair of unix sockets of `kind` (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET).
pub fn socketpair(kind: i32) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: the kernel writes two fds into `fds`.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    check(r as libc::c_long, || format!("socketpair(AF_UNIX, {kind})"))?;
    // SAFETY: two fresh fds the kernel just returned, owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `messages` on `fd` (a stream's pieces back to back; datagrams one by one).
pub fn send_all(fd: &OwnedFd, messages: &[Vec<u8>], stream: bool) -> Result<()> {
    for m in messages {
        let mut off = 0;
        loop {
            // SAFETY: sending from our own buffer of the stated length.
            let n = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    m[off..].as_ptr().cast(),
                    m.len() - off,
                    libc::MSG_DONTWAIT,
                )
            };
            let n = check(n as libc::c_long, || {
                format!("send of {} bytes", m.len() - off)
            })? as usize;
            off += n;
            if !stream || off >= m.len() {
                break;
            }
        }
    }
    Ok(())
}

/// The path of a file named by a file handle (as inotify's fdinfo shows them), looked up
/// through `mount_dir`, a directory of the same filesystem. Needs CAP_DAC_READ_SEARCH.
pub fn path_of_handle(mount_dir: &str, handle_type: i32, handle: &[u8]) -> Result<String> {
    let dir = std::fs::File::open(mount_dir).map_err(|e| crate::Error::io(mount_dir, e))?;
    // struct file_handle: handle_bytes u32, handle_type i32, then the bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: `fh` is a complete struct file_handle of the length it declares.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            dir.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    let fd = owned(r, || format!("open_by_handle_at under {mount_dir}"))?;
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    crate::procfs::read_link(&link)
}

/// A new inotify instance.
pub fn inotify(flags: i32) -> Result<OwnedFd> {
    // SAFETY: inotify_init1 takes no pointers.
    owned(
        unsafe { libc::syscall(libc::SYS_inotify_init1, flags) },
        || "inotify_init1".into(),
    )
}

/// Adds a watch and returns its watch descriptor.
pub fn inotify_add(fd: &OwnedFd, path: &str, mask: u32) -> Result<i32> {
    let c = std::ffi::CString::new(path).map_err(|_| crate::Error::Unexpected {
        pid: 0,
        what: format!("path {path:?} has a NUL byte"),
    })?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    check(r as libc::c_long, || format!("inotify_add_watch {path}")).map(|w| w as i32)
}

pub fn inotify_rm(fd: &OwnedFd, wd: i32) -> Result<()> {
    // SAFETY: inotify_rm_watch takes no pointers.
    let r = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    check(r as libc::c_long, || format!("inotify_rm_watch {wd}")).map(|_| ())
}
