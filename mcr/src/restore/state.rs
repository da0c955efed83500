//! Process state set by injection once memory is back: fds, limits, signals, timers,
//! locks, epoll interest lists, session and group, credentials.

use super::build::Ctx;
use super::files::FdNumbers;
use super::{RestoreError, Result, StepContext};
use crate::model::{LockKind, ProcessImage};
use kext_shim::inject::Injector;
use kext_shim::procfs::{self, Status};

/// Returns the stub's limits as they were read, hard ones untouched since: for
/// [`set_rlimits`], which need not read them again.
pub(super) fn raise_nofile(cx: &mut Ctx) -> Result<Vec<(u64, u64)>> {
    let ours = procfs::read_limits(kext_shim::Pid::from_raw(cx.pid))
        .step(cx.pid, || "reading limits".into())?;
    let hard = ours[libc::RLIMIT_NOFILE as usize].1;
    let b: Vec<u8> = [hard, hard].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let addr = cx.put(&b)?;
    cx.call(
        libc::SYS_prlimit64,
        [0, libc::RLIMIT_NOFILE as u64, addr, 0, 0, 0],
        || "raising RLIMIT_NOFILE for the fd table".into(),
    )?;
    Ok(ours)
}

/// `ours`: the stub's limits, whose hard ones bound what can be set.
pub(super) fn set_rlimits(cx: &mut Ctx, p: &ProcessImage, ours: &[(u64, u64)]) -> Result<()> {
    let mut calls = Vec::new();
    for (res, (&(soft, hard), &(_, cur_hard))) in p.rlimits.iter().zip(ours.iter()).enumerate() {
        // Without CAP_SYS_RESOURCE a hard limit can only go down.
        let hard2 = if hard > cur_hard {
            tracing::warn!(
                pid = cx.pid,
                resource = res,
                "hard limit {hard} exceeds ours ({cur_hard}); keeping ours"
            );
            cur_hard
        } else {
            hard
        };
        let mut b = Vec::new();
        b.extend_from_slice(&soft.min(hard2).to_ne_bytes());
        b.extend_from_slice(&hard2.to_ne_bytes());
        calls.push((libc::SYS_prlimit64, [0, res as u64, 0, 0, 0, 0], b));
    }
    cx.batch_with_data(&calls, 2, |i| format!("prlimit64 resource {i}"))
}

/// Moves every fd to its number: first everything we need above all numbers in play,
/// then close the rest, then dup each to its target.
pub(super) fn set_fds(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    let highest_target = fds.fds.iter().map(|&(t, _, _)| t).max();
    let lowest_source = fds.fds.iter().map(|&(_, s, _)| s).min();
    if let (Some(t), Some(s)) = (highest_target, lowest_source) {
        if s > t {
            // Ours are all above its numbers already (see FilePlan::keep): close what
            // is below them, dup each to its number, close ours.
            cx.call(
                libc::SYS_close_range,
                [0, (s - 1) as u64, 0, 0, 0, 0],
                || "close_range below our fds".into(),
            )?;
            // One stop for them all: a hundred connections cost one.
            let calls: Vec<_> = fds
                .fds
                .iter()
                .map(|&(target, src, cloexec)| dup3_call(src as u64, target, cloexec))
                .chain([(
                    libc::SYS_close_range,
                    [s as u64, u32::MAX as u64, 0, 0, 0, 0],
                )])
                .collect();
            return cx.batch(&calls, |i| match fds.fds.get(i) {
                Some(&(target, _, _)) => format!("dup3 to fd {target}"),
                None => "close_range of our fds".into(),
            });
        }
    }
    let open_now =
        procfs::list_fds(kext_shim::Pid::from_raw(cx.pid)).step(cx.pid, || "listing fds".into())?;
    let base = fds
        .fds
        .iter()
        .flat_map(|&(t, s, _)| [t, s])
        .chain(open_now.iter().copied())
        .max()
        .unwrap_or(0)
        + 1;
    let mut moved: Vec<(i32, u64)> = Vec::new();
    for &(_, src, _) in &fds.fds {
        if moved.iter().any(|&(s, _)| s == src) {
            continue;
        }
        let n = cx.call(
            libc::SYS_fcntl,
            [src as u64, libc::F_DUPFD as u64, base as u64, 0, 0, 0],
            || format!("fcntl(F_DUPFD) of fd {src}"),
        )?;
        moved.push((src, n));
    }
    cx.call(
        libc::SYS_close_range,
        [0, (base - 1) as u64, 0, 0, 0, 0],
        || "close_range below the parking area".into(),
    )?;
    for &(target, src, cloexec) in &fds.fds {
        let parked = moved
            .iter()
            .find(|&&(s, _)| s == src)
            .expect("parked above")
            .1;
        dup3(cx, parked, target, cloexec)?;
    }
    cx.call(
        libc::SYS_close_range,
        [base as u64, u32::MAX as u64, 0, 0, 0, 0],
        || "close_range of the parking area".into(),
    )?;
    Ok(())
}

fn dup3_call(src: u64, target: i32, cloexec: bool) -> (i64, [u64; 6]) {
    let flag = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
    (libc::SYS_dup3, [src, target as u64, flag, 0, 0, 0])
}

fn dup3(cx: &mut Ctx, src: u64, target: i32, cloexec: bool) -> Result<()> {
    let flag = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
    cx.call(libc::SYS_dup3, [src, target as u64, flag, 0, 0, 0], || {
        format!("dup3 to fd {target}")
    })
    .map(|_| ())
}

/// Adds each epoll's interest list from inside the process, now that every fd has its
/// number. struct epoll_event is packed on x86_64: events u32, then data u64.
pub(super) fn fill_epolls(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    const EVENT: usize = 12;
    let all: Vec<_> = fds
        .epolls
        .iter()
        .flat_map(|(epfd, targets)| targets.iter().map(move |t| (*epfd, t)))
        .collect();
    // The events go in the data page, a batch of calls for each pageful.
    for chunk in all.chunks(kext_shim::PAGE_SIZE as usize / EVENT) {
        let mut ev = Vec::with_capacity(chunk.len() * EVENT);
        for (_, t) in chunk {
            ev.extend_from_slice(&t.events.to_ne_bytes());
            ev.extend_from_slice(&t.data.to_ne_bytes());
        }
        let base = cx.put(&ev)?;
        let calls: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, (epfd, t))| {
                let at = base + (i * EVENT) as u64;
                let add = libc::EPOLL_CTL_ADD as u64;
                (
                    libc::SYS_epoll_ctl,
                    [*epfd as u64, add, t.fd as u64, at, 0, 0],
                )
            })
            .collect();
        cx.batch(&calls, |i| {
            let (epfd, t) = chunk[i];
            format!("epoll_ctl(ADD) of fd {} to epoll fd {epfd}", t.fd)
        })?;
    }
    Ok(())
}

/// Takes every lock the process held again, without waiting: one held by somebody
/// else now is an error, not a hang.
pub(super) fn take_locks(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    for &(fd, l) in &fds.locks {
        let what = || format!("taking its {:?} lock on fd {fd} again", l.kind);
        let r = match l.kind {
            LockKind::Flock => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB;
                cx.inj
                    .raw(libc::SYS_flock, [fd as u64, op as u64, 0, 0, 0, 0])
                    .step(cx.pid, what)?
            }
            LockKind::Ofd | LockKind::Posix => {
                // struct flock: l_type i16, l_whence i16, pad, l_start i64, l_len i64,
                // l_pid i32, pad.
                let mut b = [0u8; 32];
                let ty = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                } as i16;
                b[0..2].copy_from_slice(&ty.to_ne_bytes());
                b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
                b[8..16].copy_from_slice(&(l.start as i64).to_ne_bytes());
                let len = l.end.map(|e| e + 1 - l.start).unwrap_or(0);
                b[16..24].copy_from_slice(&(len as i64).to_ne_bytes());
                let addr = cx.put(&b)?;
                let cmd = if l.kind == LockKind::Ofd {
                    libc::F_OFD_SETLK
                } else {
                    libc::F_SETLK
                };
                cx.inj
                    .raw(libc::SYS_fcntl, [fd as u64, cmd as u64, addr, 0, 0, 0])
                    .step(cx.pid, what)?
            }
        };
        if r < 0 {
            let errno = kext_shim::Errno::from_raw(-r as i32);
            return Err(RestoreError::File {
                pid: cx.pid,
                what: format!("fd {fd}"),
                path: format!("/proc/{}/fd/{fd}", cx.pid),
                why: match errno {
                    kext_shim::Errno::EAGAIN | kext_shim::Errno::EACCES => {
                        format!("its {:?} lock is held by another process now", l.kind)
                    }
                    e => format!("cannot take its {:?} lock again: {e}", l.kind),
                },
            });
        }
    }
    Ok(())
}

pub(super) fn set_signals(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    let pid = kext_shim::Pid::from_raw(cx.pid);
    let st = Status::read(pid).step(cx.pid, || "reading status".into())?;
    let ours = st.hex("SigCgt").unwrap_or(!0) | st.hex("SigIgn").unwrap_or(!0);
    let mut calls = Vec::new();
    for sig in 1..=64u64 {
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let a = p
            .sigactions
            .get(sig as usize - 1)
            .copied()
            .unwrap_or_default();
        if a.is_default() && ours & (1 << (sig - 1)) == 0 {
            continue;
        }
        let mut b = Vec::with_capacity(32);
        for w in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        calls.push((libc::SYS_rt_sigaction, [sig, 0, 0, 8, 0, 0], b));
    }
    cx.batch_with_data(&calls, 1, |i| format!("rt_sigaction({})", calls[i].1[0]))
}

/// Interval timers, armed for the time they had left.
pub(super) fn set_itimers(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    for (which, &(interval, value)) in p.itimers.iter().enumerate() {
        if value == 0 && interval == 0 {
            continue;
        }
        let mut b = Vec::with_capacity(32);
        for w in [
            interval / 1_000_000,
            interval % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        let addr = cx.put(&b)?;
        cx.call(
            libc::SYS_setitimer,
            [which as u64, addr, 0, 0, 0, 0],
            || format!("setitimer({which})"),
        )?;
    }
    Ok(())
}

/// POSIX timers with their ids (PR_TIMER_CREATE_RESTORE_IDS makes timer_create take
/// the id it is given), armed for the time they had left.
pub(super) fn set_posix_timers(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    cx.call(
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
        || "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)".into(),
    )?;
    for t in &p.posix_timers {
        // struct sigevent: sigev_value u64, sigev_signo i32, sigev_notify i32, then the
        // union whose first int is the thread id; the timer id goes after it.
        let mut b = vec![0u8; 64];
        b[0..8].copy_from_slice(&t.value.to_ne_bytes());
        b[8..12].copy_from_slice(&t.signo.to_ne_bytes());
        b[12..16].copy_from_slice(&t.notify.to_ne_bytes());
        b[16..20].copy_from_slice(&t.tid.to_ne_bytes());
        b.extend_from_slice(&t.id.to_ne_bytes());
        let ev = cx.put(&b)?;
        cx.call(
            libc::SYS_timer_create,
            [t.clock as u64, ev, ev + 64, 0, 0, 0],
            || format!("timer_create with id {}", t.id),
        )?;
        if t.value_ns != 0 {
            let mut its = Vec::with_capacity(32);
            for w in [
                t.interval_ns / 1_000_000_000,
                t.interval_ns % 1_000_000_000,
                t.value_ns / 1_000_000_000,
                t.value_ns % 1_000_000_000,
            ] {
                its.extend_from_slice(&w.to_ne_bytes());
            }
            let a = cx.put(&its)?;
            cx.call(
                libc::SYS_timer_settime,
                [t.id as u64, 0, a, 0, 0, 0],
                || format!("timer_settime of timer {}", t.id),
            )?;
        }
    }
    cx.call(
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
        || "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)".into(),
    )?;
    Ok(())
}

/// Queued signals go back in order; every signal is blocked until the registers are
/// set, so none is delivered early.
pub(super) fn queue_pending(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    for si in &p.shared_pending {
        let addr = cx.put(&si.0)?;
        cx.call(
            libc::SYS_rt_sigqueueinfo,
            [cx.vpid as u64, si.signo() as u64, addr, 0, 0, 0],
            || format!("re-queueing process signal {}", si.signo()),
        )?;
    }
    for t in &p.threads {
        for si in &t.pending {
            let addr = cx.put(&si.0)?;
            cx.call(
                libc::SYS_rt_tgsigqueueinfo,
                [cx.vpid as u64, t.tid as u64, si.signo() as u64, addr, 0, 0],
                || format!("re-queueing signal {} of thread {}", si.signo(), t.tid),
            )?;
        }
    }
    Ok(())
}

/// Session and process group, set while the stub is fresh and before it forks its
/// children, which inherit them. A leader of its session or group makes a new one; a
/// member joins the group of its leader in the image if that exists by now; otherwise
/// it stays in ours (a shell job's group, say).
pub(super) fn early_init(inj: &mut Injector, ids: Ids, procs: &[ProcessImage]) -> Result<()> {
    let Ids { pid, pgid, sid } = ids;
    let call = |inj: &mut Injector, nr: i64, a: [u64; 6], what: &'static str| {
        inj.call(nr, a, || what.into()).step(pid, || what.into())
    };
    if sid == pid {
        call(inj, libc::SYS_setsid, [0; 6], "setsid")?;
    } else if pgid == pid {
        call(inj, libc::SYS_setpgid, [0; 6], "setpgid")?;
    } else if procs.iter().any(|q| q.pid == pgid) {
        let now = call(inj, libc::SYS_getpgid, [0; 6], "getpgid")?;
        if now != pgid as u64 {
            call(
                inj,
                libc::SYS_setpgid,
                [0, pgid as u64, 0, 0, 0, 0],
                "setpgid to its group",
            )?;
        }
    }
    Ok(())
}

/// A process's place in the job-control world.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub pid: i32,
    pub pgid: i32,
    pub sid: i32,
}

impl From<&ProcessImage> for Ids {
    fn from(p: &ProcessImage) -> Self {
        Ids {
            pid: p.pid,
            pgid: p.pgid,
            sid: p.sid,
        }
    }
}

pub(super) fn set_creds(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    let c = &p.creds;
    if c.uids == [0; 4] && c.gids == [0; 4] && c.groups.is_empty() {
        return Ok(());
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let addr = cx.put(&groups)?;
    cx.call(
        libc::SYS_setgroups,
        [c.groups.len() as u64, addr, 0, 0, 0, 0],
        || "setgroups".into(),
    )?;
    cx.call(
        libc::SYS_setresgid,
        [
            c.gids[0] as u64,
            c.gids[1] as u64,
            c.gids[2] as u64,
            0,
            0,
            0,
        ],
        || "setresgid".into(),
    )?;
    cx.call(
        libc::SYS_setresuid,
        [
            c.uids[0] as u64,
            c.uids[1] as u64,
            c.uids[2] as u64,
            0,
            0,
            0,
        ],
        || "setresuid".into(),
    )?;
    Ok(())
}

/// A session leader takes its pty as controlling terminal again, right after it made
/// its session and before it forks: a process gets its terminal at fork, from its
/// parent, so the rest of the session must come after.
pub(super) fn take_ctty(inj: &mut Injector, pid: i32, fds: &FdNumbers) -> Result<()> {
    let Some((slave, _)) = fds.ctty else {
        return Ok(());
    };
    inj.call(
        libc::SYS_ioctl,
        [slave as u64, libc::TIOCSCTTY, 0, 0, 0, 0],
        || "ioctl(TIOCSCTTY) on its terminal".into(),
    )
    .step(pid, || "taking its controlling terminal".into())?;
    Ok(())
}

/// The session leader gives its terminal back its foreground process group, once every
/// group of the tree exists.
pub(super) fn set_foreground(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    let Some((slave, fg)) = fds.ctty else {
        return Ok(());
    };
    if fg > 0 {
        let addr = cx.put(&fg.to_ne_bytes())?;
        cx.call(
            libc::SYS_ioctl,
            [slave as u64, libc::TIOCSPGRP, addr, 0, 0, 0],
            || format!("ioctl(TIOCSPGRP, {fg}) on its terminal"),
        )?;
    }
    Ok(())
}
