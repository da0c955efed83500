//! Pipes: reading what is in flight without taking it, and sizing them.

use crate::pidfd::{pidfd_getfd, pidfd_open};
use crate::{check, Errno, Pid, Result, SysError};
use nix::fcntl::{fcntl, tee, FcntlArg, SpliceFFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Bytes waiting in a pipe (FIONREAD).
pub fn bytes_queued(fd: &impl AsRawFd) -> Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    check(r as libc::c_long, || {
        format!("ioctl(FIONREAD) on fd {}", fd.as_raw_fd())
    })?;
    Ok(n as usize)
}

/// The capacity of a pipe in bytes.
pub fn capacity(fd: &impl AsFd) -> Result<usize> {
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .map(|n| n as usize)
        .map_err(|e| SysError::new("fcntl(F_GETPIPE_SZ)", e).into())
}

/// Sets a pipe's capacity (at most fs.pipe-max-size without CAP_SYS_RESOURCE).
pub fn set_capacity(fd: &impl AsFd, bytes: usize) -> Result<()> {
    fcntl(
        fd.as_fd().as_raw_fd(),
        FcntlArg::F_SETPIPE_SZ(bytes as libc::c_int),
    )
    .map(|_| ())
    .map_err(|e| SysError::new(format!("fcntl(F_SETPIPE_SZ, {bytes})"), e).into())
}

/// The capacity of the pipe whose read end is fd `fd` of `pid`, and the bytes in it,
/// left where they are: tee copies them into a pipe of ours without consuming them.
pub fn peek(pid: Pid, fd: i32) -> Result<(usize, Vec<u8>)> {
    let pidfd = pidfd_open(pid)?;
    let theirs = pidfd_getfd(&pidfd, pid, fd)?;
    let cap = capacity(&theirs)?;
    let queued = bytes_queued(&theirs)?;
    if queued == 0 {
        return Ok((cap, Vec::new()));
    }
    let (r, w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe().map_err(|e| SysError::new("pipe for peeking", e))?;
    if capacity(&w)? < queued {
        set_capacity(&w, cap)?;
    }
    // tee duplicates from the head of the pipe every time, so one call must take all.
    let copied = loop {
        match tee(&theirs, &w, queued, SpliceFFlags::SPLICE_F_NONBLOCK) {
            Err(Errno::EINTR) => continue,
            Ok(n) => break n,
            Err(e) => return Err(SysError::new(format!("tee from fd {fd} of pid {pid}"), e).into()),
        }
    };
    let mut data = vec![0u8; copied];
    let mut got = 0;
    while got < copied {
        match nix::unistd::read(r.as_raw_fd(), &mut data[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SysError::new("reading the peeked pipe", e).into()),
        }
    }
    data.truncate(got);
    if got != queued {
        return Err(crate::Error::Unexpected {
            pid: pid.as_raw(),
            what: format!("pipe at fd {fd} holds {queued} bytes, could copy {got}"),
        });
    }
    Ok((cap, data))
}
