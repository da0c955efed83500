//! Rebuilding the stub into the dumped process by syscall injection.
//!
//! Order matters: rseq goes first (its area is about to vanish), then a scratch page the
//! injector can live in, then the stub's own memory, then the image's. Files are used by
//! number before the fd table is rearranged; credentials go last among privileged calls;
//! the scratch page is unmapped from inside itself, and the registers set after that.

use super::files::FdNumbers;
use super::shared::{Backing, Placement};
use super::stub::Stub;
use super::{RestoreError, Result, StepContext};
use crate::image::Image;
use crate::model::{LockKind, ProcessImage, ThreadImage, Vma, VmaKind};
use kext_shim::inject::Injector;
use kext_shim::mem::{write_remote_ranges, ProcMem};
use kext_shim::procfs::{self, MapEntry, Status};
use kext_shim::{ptrace, sys, PAGE_SIZE};
use std::time::{Duration, Instant};

const SCRATCH_PAGES: u64 = 2;

/// The three vDSO parts, as (name, kind) in their kernel order.
const VDSO_PARTS: [(&str, VmaKind); 3] = [
    ("[vvar]", VmaKind::Vvar),
    ("[vvar_vclock]", VmaKind::VvarVclock),
    ("[vdso]", VmaKind::Vdso),
];

/// Refuses an image whose vDSO does not match this kernel's, before any process exists.
pub fn check_vdso_layout(p: &ProcessImage) -> Result<()> {
    let ours =
        procfs::read_maps(kext_shim::Pid::this()).step(p.pid, || "reading our own maps".into())?;
    for (name, kind) in VDSO_PARTS {
        let theirs = p.mm.vmas.iter().find(|v| v.kind == kind).map(Vma::len);
        let mine = ours.iter().find(|m| m.path == name).map(MapEntry::len);
        if theirs.is_some() && theirs != mine {
            return Err(RestoreError::Incompatible {
                pid: p.pid,
                what: format!(
                    "{name} is {} KiB in the image but {} KiB on this kernel",
                    theirs.unwrap_or(0) / 1024,
                    mine.unwrap_or(0) / 1024
                ),
            });
        }
    }
    Ok(())
}

/// Lowest address at or above `from` where `len` bytes (plus a guard page each side)
/// touch none of `used`.
pub(crate) fn find_gap(used: &[(u64, u64)], len: u64, from: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = used.to_vec();
    v.sort_unstable();
    let mut cand = from;
    for &(s, e) in &v {
        if e + PAGE_SIZE <= cand {
            continue;
        }
        if cand + len + PAGE_SIZE <= s {
            return Some(cand);
        }
        cand = cand.max(e + PAGE_SIZE);
    }
    (cand + len < 0x7fff_f000_0000).then_some(cand)
}

struct Ctx<'a> {
    pid: i32,
    /// Injects into the thread being worked on: the leader, or another one swapped in
    /// by `with_thread`.
    inj: Injector,
    /// The other threads, once created, by their index in the image.
    others: Vec<(usize, Injector)>,
    /// Writable scratch memory in the stub, for syscall arguments.
    data: u64,
    mem: ProcMem,
    steps: &'a mut Vec<(&'static str, Duration)>,
}

impl Ctx<'_> {
    fn call(&mut self, nr: i64, args: [u64; 6], what: impl Fn() -> String + Clone) -> Result<u64> {
        let w = what.clone();
        self.inj.call(nr, args, what).step(self.pid, w)
    }

    /// Puts `bytes` in the scratch data page and returns its address.
    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        debug_assert!(bytes.len() as u64 <= PAGE_SIZE);
        self.mem
            .write(self.data, bytes)
            .step(self.pid, || "writing syscall arguments".into())?;
        Ok(self.data)
    }

    /// Runs `f` with the injector of thread `idx` (0 is the leader).
    fn with_thread<T>(&mut self, idx: usize, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if idx == 0 {
            return f(self);
        }
        let slot = self
            .others
            .iter()
            .position(|(i, _)| *i == idx)
            .expect("thread was created");
        std::mem::swap(&mut self.inj, &mut self.others[slot].1);
        let r = f(self);
        std::mem::swap(&mut self.inj, &mut self.others[slot].1);
        r
    }

    fn timed<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let t = Instant::now();
        let r = f(self)?;
        tracing::debug!(pid = self.pid, step = name, injected = self.inj.calls(), elapsed = ?t.elapsed());
        self.steps.push((name, t.elapsed()));
        Ok(r)
    }
}

pub fn rebuild(
    stub: &Stub,
    p: &ProcessImage,
    image: &Image,
    fds: &FdNumbers,
    shared: &Placement,
    steps: &mut Vec<(&'static str, Duration)>,
    pages: &mut u64,
) -> Result<Vec<kext_shim::Pid>> {
    let pid = stub.pid;
    let raw = pid.as_raw();
    // Nothing may be delivered while the process is half-built.
    ptrace::set_sigmask(pid, !0).step(raw, || "blocking signals".into())?;
    let maps = procfs::read_maps(pid).step(raw, || "reading the new process's maps".into())?;
    let mem = ProcMem::open(pid).step(raw, || "opening /proc/PID/mem".into())?;
    let mut cx = Ctx {
        pid: raw,
        inj: super::stub::fresh_injector(pid)?,
        others: Vec::new(),
        data: 0,
        mem,
        steps,
    };

    // The stub inherited our rseq registration; its area is about to be unmapped.
    let rs = ptrace::rseq_config(pid).step(raw, || "reading rseq".into())?;
    if rs.area != 0 {
        cx.call(
            libc::SYS_rseq,
            [
                rs.area,
                rs.size as u64,
                sys::RSEQ_FLAG_UNREGISTER,
                rs.signature as u64,
                0,
                0,
            ],
            || "rseq unregister".into(),
        )?;
    }

    // Scratch: one page holding `syscall`, one for arguments, away from both layouts.
    let mut used: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    used.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
    let scratch = find_gap(&used, SCRATCH_PAGES * PAGE_SIZE, 1 << 32)
        .or_else(|| find_gap(&used, SCRATCH_PAGES * PAGE_SIZE, 1 << 20))
        .ok_or_else(|| RestoreError::Incompatible {
            pid: raw,
            what: "no room for a scratch page".into(),
        })?;
    cx.inj
        .mmap(
            scratch,
            SCRATCH_PAGES * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
        .step(raw, || "mapping the scratch page".into())?;
    cx.mem
        .write(scratch, &[0x0f, 0x05, 0xcc, 0xcc])
        .step(raw, || "writing the syscall instruction".into())?;
    cx.inj
        .mprotect(scratch, PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC)
        .step(raw, || "protecting the scratch page".into())?;
    cx.inj.set_syscall_ip(scratch);
    cx.data = scratch + PAGE_SIZE;

    cx.timed("rebuild memory map", |cx| {
        teardown(cx, &maps, shared)?;
        move_vdso(cx, &maps, p, &used, scratch)?;
        for v in &p.mm.vmas {
            map_vma(cx, v, fds, shared)?;
        }
        // Every part of the shared objects this process had is mapped again: the
        // inherited whole ones go.
        for placed in shared {
            if let Backing::Region { base, len } = placed.at {
                cx.inj
                    .munmap(base, len)
                    .step(cx.pid, || format!("unmapping shared object at {base:#x}"))?;
            }
        }
        Ok(())
    })?;
    *pages = cx.timed("fill memory", |cx| fill(cx, p, image))?;
    if crate::fault::armed(crate::fault::RESTORE_AFTER_FILL) {
        return Err(RestoreError::FaultInjected {
            pid: raw,
            point: crate::fault::RESTORE_AFTER_FILL,
        });
    }
    cx.timed("restore process state", |cx| {
        set_mm(cx, p, fds)?;
        cx.call(libc::SYS_fchdir, [fds.cwd_fd as u64, 0, 0, 0, 0, 0], || {
            "fchdir to cwd".into()
        })?;
        // Every fd number must be allowed while the table is rebuilt; the process's own
        // limits (perhaps below its highest fd) follow.
        raise_nofile(cx)?;
        set_fds(cx, fds)?;
        fill_epolls(cx, fds)?;
        take_locks(cx, fds)?;
        set_rlimits(cx, p)?;
        cx.call(libc::SYS_umask, [p.umask as u64, 0, 0, 0, 0, 0], || {
            "umask".into()
        })?;
        cx.call(
            libc::SYS_personality,
            [p.personality as u64, 0, 0, 0, 0, 0],
            || "personality".into(),
        )?;
        set_signals(cx, p)?;
        cx.call(
            libc::SYS_prctl,
            [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
            || "clearing the parent-death signal".into(),
        )?;
        // Threads are cloned from the leader, so they share what it has set so far;
        // per-thread state follows in each, then credentials (after which clone3 could
        // no longer choose tids).
        set_itimers(cx, p)?;
        create_threads(cx, p)?;
        // After the threads: a timer may signal one of them.
        set_posix_timers(cx, p)?;
        queue_pending(cx, p)?;
        for (i, t) in p.threads.iter().enumerate() {
            cx.with_thread(i, |cx| set_thread_state(cx, t))?;
        }
        for i in 0..p.threads.len() {
            cx.with_thread(i, |cx| set_creds(cx, p))?;
        }
        cx.call(
            libc::SYS_prctl,
            [libc::PR_SET_DUMPABLE as u64, p.dumpable as u64, 0, 0, 0, 0],
            || format!("prctl(PR_SET_DUMPABLE, {})", p.dumpable),
        )?;
        // Last injected call: the scratch page unmaps itself. The single-step trap fires
        // on the way out of the syscall, before the vanished next instruction is fetched.
        let r = cx
            .inj
            .raw(
                libc::SYS_munmap,
                [scratch, SCRATCH_PAGES * PAGE_SIZE, 0, 0, 0, 0],
            )
            .step(raw, || "unmapping the scratch page".into())?;
        if r != 0 {
            return Err(RestoreError::Kernel {
                pid: raw,
                step: "unmapping the scratch page".into(),
                source: kext_shim::Error::Unexpected {
                    pid: raw,
                    what: format!("munmap returned {r}"),
                },
            });
        }
        for t in &p.threads {
            set_cpu_state(raw, t)?;
        }
        Ok(())
    })?;
    Ok(p.threads
        .iter()
        .map(|t| kext_shim::Pid::from_raw(t.tid))
        .collect())
}

/// Registers, xsave area and signal mask: the last thing each thread gets.
fn set_cpu_state(raw: i32, t: &ThreadImage) -> Result<()> {
    let tid = kext_shim::Pid::from_raw(t.tid);
    let words: [u64; ptrace::REGS_WORDS] =
        t.regs[..]
            .try_into()
            .map_err(|_| RestoreError::Incompatible {
                pid: raw,
                what: format!(
                    "{} register words for thread {tid} in the image, expected {}",
                    t.regs.len(),
                    ptrace::REGS_WORDS
                ),
            })?;
    let mut regs = ptrace::regs_from_words(&words);
    ptrace::fixup_syscall_restart(&mut regs);
    ptrace::set_regs(tid, &regs).step(raw, || format!("setting registers of thread {tid}"))?;
    ptrace::set_xstate(tid, &t.xstate)
        .step(raw, || format!("setting the xsave area of thread {tid}"))?;
    ptrace::set_sigmask(tid, t.blocked)
        .step(raw, || format!("setting the signal mask of thread {tid}"))?;
    Ok(())
}

/// Clones every thread but the leader with its own tid. Each stops at birth (we trace
/// clones), before running an instruction, and waits for its state.
fn create_threads(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    const FLAGS: u64 = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    for (i, t) in p.threads.iter().enumerate().skip(1) {
        let tid_at = cx.data + 512;
        let mut args = Vec::with_capacity(516);
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size, cgroup.
        for w in [FLAGS, 0, 0, 0, 0, 0, 0, 0, tid_at, 1, 0] {
            args.extend_from_slice(&w.to_ne_bytes());
        }
        args.resize(512, 0);
        args.extend_from_slice(&t.tid.to_ne_bytes());
        let addr = cx.put(&args)?;
        let got = cx
            .inj
            .call(libc::SYS_clone3, [addr, 88, 0, 0, 0, 0], || {
                format!("clone3 thread {}", t.tid)
            })
            .map_err(|e| match e.errno() {
                Some(kext_shim::Errno::EEXIST) => RestoreError::PidTaken {
                    pid: t.tid,
                    by: "another task (needed as a thread id)".into(),
                },
                _ => RestoreError::Kernel {
                    pid: cx.pid,
                    step: format!("creating thread {}", t.tid),
                    source: e,
                },
            })?;
        cx.inj.take_event();
        let tid = kext_shim::Pid::from_raw(got as i32);
        match ptrace::wait(tid).step(cx.pid, || format!("waiting for new thread {tid}"))? {
            ptrace::Stop::Stopped { .. } => {}
            other => {
                return Err(super::stub::not_stopped(
                    cx.pid,
                    &format!("thread {tid}"),
                    other,
                ))
            }
        }
        let regs =
            ptrace::get_regs(tid).step(cx.pid, || format!("reading registers of thread {tid}"))?;
        cx.others
            .push((i, Injector::new(tid, cx.inj.syscall_ip(), regs)));
    }
    Ok(())
}

/// Per-thread kernel state: robust list, clear_child_tid, alternate stack, rseq, name.
fn set_thread_state(cx: &mut Ctx, t: &ThreadImage) -> Result<()> {
    let tid = t.tid;
    // Always set: the leader inherited ours, which point into memory that is gone.
    let (head, len) = t.robust_list;
    let len = if len == 0 { 24 } else { len };
    cx.call(libc::SYS_set_robust_list, [head, len, 0, 0, 0, 0], || {
        format!("set_robust_list of thread {tid}")
    })?;
    cx.call(
        libc::SYS_set_tid_address,
        [t.clear_child_tid, 0, 0, 0, 0, 0],
        || format!("set_tid_address of thread {tid}"),
    )?;
    set_altstack(cx, t)?;
    if let Some(r) = t.rseq {
        cx.call(
            libc::SYS_rseq,
            [r.area, r.size as u64, 0, r.signature as u64, 0, 0],
            || format!("rseq register at {:#x} for thread {tid}", r.area),
        )?;
    }
    let mut comm = t.comm.as_bytes()[..t.comm.len().min(15)].to_vec();
    comm.push(0);
    let addr = cx.put(&comm)?;
    cx.call(
        libc::SYS_prctl,
        [libc::PR_SET_NAME as u64, addr, 0, 0, 0, 0],
        || format!("prctl(PR_SET_NAME) of thread {tid}"),
    )?;
    Ok(())
}

/// Unmaps everything the stub inherited from us except the vDSO parts and the shared
/// memory objects prepared for the image.
fn teardown(cx: &mut Ctx, maps: &[MapEntry], shared: &Placement) -> Result<()> {
    for m in maps {
        if matches!(
            m.path.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
        ) || shared.iter().any(|p| match p.at {
            Backing::Region { base, len } => m.start >= base && m.end <= base + len,
            Backing::Memfd { .. } => false,
        }) {
            continue;
        }
        cx.inj.munmap(m.start, m.len()).step(cx.pid, || {
            format!("unmapping inherited {:#x}-{:#x} {}", m.start, m.end, m.path)
        })?;
    }
    Ok(())
}

/// Moves the stub's vDSO parts to where the image had them (or drops them if it had
/// none). mremap keeps them working: the kernel follows the move.
fn move_vdso(
    cx: &mut Ctx,
    maps: &[MapEntry],
    p: &ProcessImage,
    used: &[(u64, u64)],
    scratch: u64,
) -> Result<()> {
    let mut moves = Vec::new();
    for (name, kind) in VDSO_PARTS {
        let Some(m) = maps.iter().find(|m| m.path == name) else {
            continue;
        };
        match p.mm.vmas.iter().find(|v| v.kind == kind) {
            Some(v) if v.start != m.start => moves.push((m.start, v.start, m.len())),
            Some(_) => {}
            None => cx
                .inj
                .munmap(m.start, m.len())
                .step(cx.pid, || format!("unmapping {name}"))?,
        }
    }
    let overlaps = moves.iter().any(|&(_, to, len)| {
        moves
            .iter()
            .any(|&(from, _, l2)| to < from + l2 && from < to + len)
    });
    if overlaps {
        // Park them out of the way first.
        let total: u64 = moves.iter().map(|m| m.2).sum();
        let mut u = used.to_vec();
        u.push((scratch, scratch + SCRATCH_PAGES * PAGE_SIZE));
        let mut park = find_gap(&u, total, 1 << 32).ok_or_else(|| RestoreError::Incompatible {
            pid: cx.pid,
            what: "no room to move the vDSO".into(),
        })?;
        for m in moves.iter_mut() {
            mremap(cx, m.0, park, m.2)?;
            m.0 = park;
            park += m.2;
        }
    }
    for (from, to, len) in moves {
        mremap(cx, from, to, len)?;
    }
    Ok(())
}

fn mremap(cx: &mut Ctx, from: u64, to: u64, len: u64) -> Result<()> {
    cx.call(
        libc::SYS_mremap,
        [
            from,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            to,
            0,
        ],
        || format!("mremap vDSO part {from:#x} -> {to:#x}"),
    )?;
    Ok(())
}

fn map_vma(cx: &mut Ctx, v: &Vma, fds: &FdNumbers, shared: &Placement) -> Result<()> {
    let share = if v.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let grow = if v.advice.grows_down {
        libc::MAP_GROWSDOWN
    } else {
        0
    };
    let (flags, fd, off) = match v.kind {
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock => return Ok(()),
        VmaKind::Anonymous => (share | libc::MAP_ANONYMOUS, -1, 0),
        VmaKind::Memfd { ino } => {
            let fd =
                super::shared::memfd_fd(shared, ino).ok_or_else(|| RestoreError::Incompatible {
                    pid: cx.pid,
                    what: format!("memfd {ino} is missing from the image"),
                })?;
            (share, fd, v.offset)
        }
        VmaKind::SharedAnonymous { shmem } => {
            let base = shared
                .iter()
                .find_map(|p| match p.at {
                    Backing::Region { base, .. } if p.ino == shmem => Some(base),
                    _ => None,
                })
                .ok_or_else(|| RestoreError::Incompatible {
                    pid: cx.pid,
                    what: format!("shared memory object {shmem} is missing from the image"),
                })?;
            cx.call(
                libc::SYS_mremap,
                [
                    base + v.offset,
                    0,
                    v.len(),
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    v.start,
                    0,
                ],
                || format!("mapping shared object {shmem} at {:#x}", v.start),
            )?;
            if v.prot != libc::PROT_READ | libc::PROT_WRITE {
                cx.inj
                    .mprotect(v.start, v.len(), v.prot)
                    .step(cx.pid, || format!("protecting {:#x}-{:#x}", v.start, v.end))?;
            }
            return advise(cx, v);
        }
        VmaKind::File(i) => (share, fds.map_fds[i as usize], v.offset),
    };
    cx.inj
        .mmap(
            v.start,
            v.len(),
            v.prot,
            flags | grow | libc::MAP_FIXED_NOREPLACE,
            fd,
            off,
        )
        .step(cx.pid, || {
            format!("recreating mapping {:#x}-{:#x}", v.start, v.end)
        })?;
    advise(cx, v)
}

/// Re-applies the VMA's madvise flags.
fn advise(cx: &mut Ctx, v: &Vma) -> Result<()> {
    let a = v.advice;
    for (on, advice) in [
        (a.hugepage, libc::MADV_HUGEPAGE),
        (a.no_hugepage, libc::MADV_NOHUGEPAGE),
        (a.dont_dump, libc::MADV_DONTDUMP),
        (a.dont_fork, libc::MADV_DONTFORK),
        (a.wipe_on_fork, libc::MADV_WIPEONFORK),
        (a.mergeable, libc::MADV_MERGEABLE),
    ] {
        if on {
            cx.call(
                libc::SYS_madvise,
                [v.start, v.len(), advice as u64, 0, 0, 0],
                || format!("madvise({advice}) on {:#x}-{:#x}", v.start, v.end),
            )?;
        }
    }
    Ok(())
}

/// Copies the image's pages in: process_vm_writev where the mapping is writable,
/// /proc/PID/mem (which ignores protections) where it is not, on every core: the cost
/// is the first touch of the new pages, which scales with cores.
fn fill(cx: &mut Ctx, p: &ProcessImage, image: &Image) -> Result<u64> {
    let pid = kext_shim::Pid::from_raw(cx.pid);
    let raw = cx.pid;
    let chunks: Vec<_> = image.chunks_of(p.pid).collect();
    let pages: u64 = chunks.iter().map(|c| c.n_pages as u64).sum();
    let mem = &cx.mem;
    crate::par::for_each(
        &chunks,
        crate::par::workers_for(pages * PAGE_SIZE),
        Vec::new,
        |buf, c| {
            let end = c.addr + c.len_bytes() as u64;
            let v =
                p.mm.vmas
                    .iter()
                    .find(|v| v.start <= c.addr && end <= v.end)
                    .expect("checked when the image was opened");
            let data = c.pages(buf).map_err(|e| {
                RestoreError::Image(crate::image::ImageError::Corrupt {
                    path: image.dir.join("pages").display().to_string(),
                    offset: 0,
                    what: format!("chunk at {:#x}: {e}", c.addr),
                })
            })?;
            if v.writable() {
                write_remote_ranges(pid, &[(c.addr, data)])
            } else {
                mem.write(c.addr, data)
            }
            .step(raw, || format!("writing pages at {:#x}", c.addr))
        },
    )?;
    Ok(pages)
}

/// PR_SET_MM_MAP: code/data/brk/stack/arg/env bounds, auxv and the exe link at once.
fn set_mm(cx: &mut Ctx, p: &ProcessImage, fds: &FdNumbers) -> Result<()> {
    let f = &p.mm.fields;
    let auxv_off = 128u64;
    let auxv: Vec<u8> = p.mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if auxv.len() as u64 + auxv_off > PAGE_SIZE {
        return Err(RestoreError::Incompatible {
            pid: cx.pid,
            what: format!("auxv of {} bytes is too large", auxv.len()),
        });
    }
    let mut b = Vec::with_capacity(auxv_off as usize + auxv.len());
    for w in [
        f.start_code,
        f.end_code,
        f.start_data,
        f.end_data,
        f.start_brk,
        f.brk,
        f.start_stack,
        f.arg_start,
        f.arg_end,
        f.env_start,
        f.env_end,
        cx.data + auxv_off,
    ] {
        b.extend_from_slice(&w.to_ne_bytes());
    }
    b.extend_from_slice(&(auxv.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(fds.exe_fd as u32).to_ne_bytes());
    let size = b.len() as u64;
    b.resize(auxv_off as usize, 0);
    b.extend_from_slice(&auxv);
    let addr = cx.put(&b)?;
    cx.call(
        libc::SYS_prctl,
        [sys::PR_SET_MM, sys::PR_SET_MM_MAP, addr, size, 0, 0],
        || {
            format!(
                "prctl(PR_SET_MM_MAP) with brk {:#x} and exe {}",
                f.brk, p.mm.exe.path
            )
        },
    )?;
    Ok(())
}

fn raise_nofile(cx: &mut Ctx) -> Result<()> {
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
    Ok(())
}

fn set_rlimits(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    let ours = procfs::read_limits(kext_shim::Pid::from_raw(cx.pid))
        .step(cx.pid, || "reading limits".into())?;
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
        let addr = cx.put(&b)?;
        cx.call(libc::SYS_prlimit64, [0, res as u64, addr, 0, 0, 0], || {
            format!("prlimit64 resource {res}")
        })?;
    }
    Ok(())
}

/// Moves every fd to its number: first everything we need above all numbers in play,
/// then close the rest, then dup each to its target.
fn set_fds(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
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
        let flag = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        cx.call(
            libc::SYS_dup3,
            [parked, target as u64, flag, 0, 0, 0],
            || format!("dup3 to fd {target}"),
        )?;
    }
    cx.call(
        libc::SYS_close_range,
        [base as u64, u32::MAX as u64, 0, 0, 0, 0],
        || "close_range of the parking area".into(),
    )?;
    Ok(())
}

/// Adds each epoll's interest list from inside the process, now that every fd has its
/// number. struct epoll_event is packed on x86_64: events u32, then data u64.
fn fill_epolls(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    for (epfd, targets) in &fds.epolls {
        for t in targets {
            let mut ev = Vec::with_capacity(12);
            ev.extend_from_slice(&t.events.to_ne_bytes());
            ev.extend_from_slice(&t.data.to_ne_bytes());
            let addr = cx.put(&ev)?;
            cx.call(
                libc::SYS_epoll_ctl,
                [
                    *epfd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    t.fd as u64,
                    addr,
                    0,
                    0,
                ],
                || format!("epoll_ctl(ADD) of fd {} to epoll fd {epfd}", t.fd),
            )?;
        }
    }
    Ok(())
}

/// Takes every lock the process held again, without waiting: one held by somebody
/// else now is an error, not a hang.
fn take_locks(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
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

fn set_signals(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    let pid = kext_shim::Pid::from_raw(cx.pid);
    let st = Status::read(pid).step(cx.pid, || "reading status".into())?;
    let ours = st.hex("SigCgt").unwrap_or(!0) | st.hex("SigIgn").unwrap_or(!0);
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
        let addr = cx.put(&b)?;
        cx.call(libc::SYS_rt_sigaction, [sig, addr, 0, 8, 0, 0], || {
            format!("rt_sigaction({sig})")
        })?;
    }
    Ok(())
}

fn set_altstack(cx: &mut Ctx, t: &ThreadImage) -> Result<()> {
    let s = t.altstack;
    let disabled = s.flags & libc::SS_DISABLE != 0;
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&(if disabled { 0 } else { s.sp }).to_ne_bytes());
    // SS_ONSTACK only reports; SS_AUTODISARM is the one flag to carry.
    let flags = if disabled {
        libc::SS_DISABLE
    } else {
        s.flags & (1 << 31)
    };
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(if disabled { 0 } else { s.size }).to_ne_bytes());
    let addr = cx.put(&b)?;
    cx.call(libc::SYS_sigaltstack, [addr, 0, 0, 0, 0, 0], || {
        format!("sigaltstack of thread {}", t.tid)
    })?;
    Ok(())
}

/// Interval timers, armed for the time they had left.
fn set_itimers(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
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
fn set_posix_timers(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
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
fn queue_pending(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
    for si in &p.shared_pending {
        let addr = cx.put(&si.0)?;
        cx.call(
            libc::SYS_rt_sigqueueinfo,
            [cx.pid as u64, si.signo() as u64, addr, 0, 0, 0],
            || format!("re-queueing process signal {}", si.signo()),
        )?;
    }
    for t in &p.threads {
        for si in &t.pending {
            let addr = cx.put(&si.0)?;
            cx.call(
                libc::SYS_rt_tgsigqueueinfo,
                [cx.pid as u64, t.tid as u64, si.signo() as u64, addr, 0, 0],
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
pub fn early_init(inj: &mut Injector, ids: Ids, procs: &[ProcessImage]) -> Result<()> {
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

fn set_creds(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::find_gap;

    #[test]
    fn gap_skips_used_ranges_with_guards() {
        let used = [(0x10000, 0x20000), (0x22000, 0x30000)];
        assert_eq!(find_gap(&used, 0x1000, 0x10000), Some(0x31000));
        assert_eq!(find_gap(&used, 0x1000, 0x0), Some(0x0));
        assert_eq!(find_gap(&[], 0x2000, 0x5000), Some(0x5000));
    }
}
