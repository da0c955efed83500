//! Rebuilding the stub into the dumped process by syscall injection.
//!
//! Order matters: rseq goes first (its area is about to vanish), then a scratch page the
//! injector can live in, then the stub's own memory, then the image's. Files are used by
//! number before the fd table is rearranged; credentials go last among privileged calls;
//! the scratch page is unmapped from inside itself, and the registers set after that.

use super::files::FdNumbers;
use super::memory::{fill, map_vma, move_vdso, set_mm, teardown, Scope};
use super::shared::{Backing, Placement};
use super::state::{
    fill_epolls, queue_pending, raise_nofile, set_creds, set_fds, set_foreground, set_itimers,
    set_posix_timers, set_rlimits, set_signals, take_locks,
};
use super::stub::Stub;
use super::threads::{create_threads, set_cpu_state, set_thread_state};
use super::{RestoreError, Result, StepContext};
use crate::image::Image;
use crate::model::ProcessImage;
use kext_shim::inject::Injector;
use kext_shim::mem::ProcMem;
use kext_shim::procfs;
use kext_shim::{ptrace, sys, PAGE_SIZE};
use std::time::{Duration, Instant};

/// The scratch memory in a stub: a code page (a syscall instruction at 0, the batch
/// code at [`BATCH_AT`]), a data page for arguments, a page for a batch's table.
pub(super) const SCRATCH_PAGES: u64 = 3;
const BATCH_AT: u64 = 16;

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

/// Calls whose results nothing needs, held to run in one batch ([`Ctx::run`]) before
/// anything that must see their effect.
#[derive(Default)]
pub(super) struct Later(Vec<(i64, [u64; 6], String)>);

impl Later {
    pub(super) fn push(&mut self, nr: i64, args: [u64; 6], what: String) {
        self.0.push((nr, args, what));
    }
}

pub(super) struct Ctx<'a> {
    /// The process as we see it (ptrace, /proc).
    pub(super) pid: i32,
    /// Its pid as it sees itself, which syscalls made inside it take: the image's.
    /// Different from `pid` in a new pid namespace.
    pub(super) vpid: i32,
    /// Injects into the thread being worked on: the leader, or another one swapped in
    /// by `with_thread`.
    pub(super) inj: Injector,
    /// The other threads, once created, by their index in the image.
    pub(super) others: Vec<(usize, Injector)>,
    /// Writable scratch memory in the stub, for syscall arguments.
    pub(super) data: u64,
    pub(super) mem: ProcMem,
    pub(super) steps: &'a mut Vec<(&'static str, Duration)>,
}

impl Ctx<'_> {
    pub(super) fn call(
        &mut self,
        nr: i64,
        args: [u64; 6],
        what: impl Fn() -> String + Clone,
    ) -> Result<u64> {
        let w = what.clone();
        self.inj.call(nr, args, what).step(self.pid, w)
    }

    /// Runs `calls` in the process with as few stops as the table page allows (see
    /// kext_shim::inject::Injector::batch); the first that fails is an error named by
    /// `what` (its index), and the rest do not run.
    pub(super) fn batch(
        &mut self,
        calls: &[(i64, [u64; 6])],
        what: impl Fn(usize) -> String,
    ) -> Result<()> {
        self.batch_results(calls, what).map(drop)
    }

    /// [`batch`](Self::batch), returning what each call returned.
    pub(super) fn batch_results(
        &mut self,
        calls: &[(i64, [u64; 6])],
        what: impl Fn(usize) -> String,
    ) -> Result<Vec<u64>> {
        use kext_shim::inject::BATCH_ENTRY;
        let scratch = self.data - PAGE_SIZE;
        let per = PAGE_SIZE as usize / BATCH_ENTRY;
        let mut out = Vec::with_capacity(calls.len());
        for (n, chunk) in calls.chunks(per).enumerate() {
            let done = self
                .inj
                .batch(scratch + BATCH_AT, self.data + PAGE_SIZE, &self.mem, chunk)
                .step(self.pid, || format!("{} (a batch)", what(n * per)))?;
            if let Some(&r) = done.last().filter(|&&r| (-4095..0).contains(&r)) {
                let i = n * per + done.len() - 1;
                return Err(RestoreError::Kernel {
                    pid: self.pid,
                    step: what(i),
                    source: kext_shim::SysError::new(
                        format!("injected into pid {}", self.pid),
                        kext_shim::Errno::from_raw(-r as i32),
                    )
                    .into(),
                });
            }
            out.extend(done.into_iter().map(|r| r as u64));
        }
        Ok(out)
    }

    /// Runs the calls `later` holds, in one batch, and empties it.
    pub(super) fn run(&mut self, later: &mut Later) -> Result<()> {
        let calls: Vec<_> = later.0.iter().map(|(nr, a, _)| (*nr, *a)).collect();
        let r = self.batch(&calls, |i| later.0[i].2.clone());
        later.0.clear();
        r
    }

    /// [`batch`](Self::batch) for calls that each take a buffer: `calls[i].2` is put
    /// in the data page and its address passed as argument `arg`.
    pub(super) fn batch_with_data(
        &mut self,
        calls: &[(i64, [u64; 6], Vec<u8>)],
        arg: usize,
        what: impl Fn(usize) -> String,
    ) -> Result<()> {
        let mut from = 0;
        while from < calls.len() {
            let mut data = Vec::new();
            let mut chunk = Vec::new();
            for (nr, args, bytes) in &calls[from..] {
                // Aligned, as the kernel would have them.
                let at = data.len().next_multiple_of(8);
                if at + bytes.len() > PAGE_SIZE as usize
                    || chunk.len() == PAGE_SIZE as usize / kext_shim::inject::BATCH_ENTRY
                {
                    break;
                }
                data.resize(at, 0);
                data.extend_from_slice(bytes);
                let mut a = *args;
                a[arg] = self.data + at as u64;
                chunk.push((*nr, a));
            }
            self.put(&data)?;
            let n = chunk.len();
            self.batch(&chunk, |i| what(from + i))?;
            from += n;
        }
        Ok(())
    }

    /// Puts `bytes` in the scratch data page and returns its address.
    pub(super) fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        debug_assert!(bytes.len() as u64 <= PAGE_SIZE);
        self.mem
            .write(self.data, bytes)
            .step(self.pid, || "writing syscall arguments".into())?;
        Ok(self.data)
    }

    /// Runs `f` with the injector of thread `idx` (0 is the leader).
    pub(super) fn with_thread<T>(
        &mut self,
        idx: usize,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
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

    /// Every thread as we see it, leader first, in image order.
    fn host_tids(&self) -> Vec<kext_shim::Pid> {
        let mut v = vec![kext_shim::Pid::from_raw(self.pid)];
        let mut others: Vec<_> = self.others.iter().map(|(i, j)| (*i, j.pid())).collect();
        others.sort_unstable_by_key(|(i, _)| *i);
        v.extend(others.into_iter().map(|(_, t)| t));
        v
    }

    pub(super) fn timed<T>(
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

/// A fresh stub made ready to be rebuilt: signals blocked, an injector through its vDSO.
pub(super) fn start<'a>(
    stub: &Stub,
    vpid: i32,
    steps: &'a mut Vec<(&'static str, Duration)>,
) -> Result<Ctx<'a>> {
    let pid = stub.pid;
    let raw = pid.as_raw();
    // Nothing may be delivered while the process is half-built.
    ptrace::set_sigmask(pid, !0).step(raw, || "blocking signals".into())?;
    let mem = ProcMem::open(pid).step(raw, || "opening /proc/PID/mem".into())?;
    Ok(Ctx {
        pid: raw,
        vpid,
        inj: super::stub::fresh_injector(pid)?,
        others: Vec::new(),
        data: 0,
        mem,
        steps,
    })
}

/// Empties the fresh stub's address space for `p`: rseq off, a scratch page of ours
/// (returned) where neither layout has anything, everything it inherited from us gone
/// but the shared objects, the vDSO moved where `p` had it.
pub(super) fn clear_space(cx: &mut Ctx, p: &ProcessImage, shared: &Placement) -> Result<u64> {
    let pid = kext_shim::Pid::from_raw(cx.pid);
    let raw = cx.pid;
    let maps = procfs::read_layout(pid).step(raw, || "reading the new process's maps".into())?;
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
    let mut used: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    used.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
    let scratch = new_scratch(cx, &used)?;
    let mut later = Later::default();
    teardown(&maps, shared, &mut later);
    cx.run(&mut later)?;
    move_vdso(cx, &maps, p, &used, scratch)?;
    Ok(scratch)
}

/// Maps a scratch area where `used` has nothing: one page holding `syscall`, which the
/// injector goes through from now on, one for arguments. Returns its address.
pub(super) fn new_scratch(cx: &mut Ctx, used: &[(u64, u64)]) -> Result<u64> {
    let raw = cx.pid;
    let scratch = find_gap(used, SCRATCH_PAGES * PAGE_SIZE, 1 << 32)
        .or_else(|| find_gap(used, SCRATCH_PAGES * PAGE_SIZE, 1 << 20))
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
    let mut code = vec![0x0f, 0x05, 0xcc, 0xcc];
    code.resize(BATCH_AT as usize, 0xcc);
    code.extend_from_slice(&kext_shim::inject::BATCH_CODE);
    cx.mem
        .write(scratch, &code)
        .step(raw, || "writing the syscall instruction".into())?;
    cx.inj
        .mprotect(scratch, PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC)
        .step(raw, || "protecting the scratch page".into())?;
    cx.inj.set_syscall_ip(scratch);
    cx.data = scratch + PAGE_SIZE;
    Ok(scratch)
}

/// Rebuilds a fresh stub into `p` whole (a cold restore); returns its threads.
#[allow(clippy::too_many_arguments)]
pub fn rebuild(
    stub: &Stub,
    p: &ProcessImage,
    image: &Image,
    fds: &FdNumbers,
    shared: &Placement,
    lazy: Option<&super::lazy::LazyRestore>,
    steps: &mut Vec<(&'static str, Duration)>,
    pages: &mut u64,
) -> Result<Vec<kext_shim::Pid>> {
    let mut cx = start(stub, p.pid, steps)?;
    let scratch = cx.timed("rebuild memory map", |cx| {
        let scratch = clear_space(cx, p, shared)?;
        let mut later = Later::default();
        for v in &p.mm.vmas {
            map_vma(cx, v, fds, shared, &mut later)?;
        }
        cx.run(&mut later)?;
        // Every part of the shared objects this process had is mapped again: the
        // inherited whole ones go.
        for placed in shared {
            if let Backing::Region { base, len } = placed.at {
                cx.inj
                    .munmap(base, len)
                    .step(cx.pid, || format!("unmapping shared object at {base:#x}"))?;
            }
        }
        Ok(scratch)
    })?;
    let chain: Vec<&Image> = std::iter::once(image).chain(&image.parents).collect();
    *pages = cx.timed("fill memory", |cx| {
        fill(cx, p, &chain, Scope::default()).map(|f| f.pages)
    })?;
    finish(cx, p, image, fds, scratch, lazy)
}

/// Everything but memory, once memory is in place; the scratch page goes last and the
/// registers are set. Returns the threads, leader first.
/// Our fd of its cwd was opened on a mount of our namespace. In a mount namespace of
/// its own that mount is not its, and a process standing there cannot name where it
/// is (getcwd fails with ENOENT). Its path from inside reaches the same directory
/// through its own mounts: that is taken when it is the one we opened and checked
/// (same device and inode), and the fd otherwise.
fn set_cwd(cx: &mut Ctx, fds: &FdNumbers) -> Result<()> {
    // In the data page: the path, then "." at DOT, then two struct stat.
    const DOT: usize = 2040;
    const STAT_LEN: usize = std::mem::size_of::<libc::stat>();
    let fchdir = |cx: &mut Ctx| {
        cx.call(libc::SYS_fchdir, [fds.cwd_fd as u64, 0, 0, 0, 0, 0], || {
            "fchdir to cwd".into()
        })
        .map(drop)
    };
    let Some(path) = fds.cwd_inside.as_deref().filter(|p| p.len() < DOT) else {
        return fchdir(cx);
    };
    let mut data = path.as_bytes().to_vec();
    data.resize(DOT, 0);
    data.extend_from_slice(b".\0\0\0\0\0\0\0");
    let at = cx.put(&data)?;
    let (dot, ours) = (at + DOT as u64, at + DOT as u64 + 8);
    let theirs = ours + STAT_LEN as u64;
    let what = || "checking its cwd against ours".to_string();
    cx.call(libc::SYS_fstat, [fds.cwd_fd as u64, ours, 0, 0, 0, 0], what)?;
    if cx
        .inj
        .raw(libc::SYS_chdir, [at, 0, 0, 0, 0, 0])
        .step(cx.pid, what)?
        != 0
    {
        return fchdir(cx);
    }
    let here = [libc::AT_FDCWD as u64, dot, theirs, 0, 0, 0];
    cx.call(libc::SYS_newfstatat, here, what)?;
    let mut buf = vec![0u8; 2 * STAT_LEN];
    cx.mem
        .read(ours, &mut buf)
        .step(cx.pid, || "reading back the stat of its cwd".into())?;
    // st_dev and st_ino lead struct stat on x86_64.
    let id = |b: &[u8]| (b[..8].to_vec(), b[8..16].to_vec());
    if id(&buf[..STAT_LEN]) != id(&buf[STAT_LEN..]) {
        return fchdir(cx);
    }
    Ok(())
}

pub(super) fn finish(
    mut cx: Ctx,
    p: &ProcessImage,
    image: &Image,
    fds: &FdNumbers,
    scratch: u64,
    lazy: Option<&super::lazy::LazyRestore>,
) -> Result<Vec<kext_shim::Pid>> {
    let raw = cx.pid;
    if crate::fault::armed(crate::fault::RESTORE_AFTER_FILL) {
        return Err(RestoreError::FaultInjected {
            pid: raw,
            point: crate::fault::RESTORE_AFTER_FILL,
        });
    }
    if let Some(l) = lazy {
        cx.timed("leave pages to post-copy", |cx| {
            super::lazy::leave_missing(cx, p, l)
        })?;
    }
    cx.timed("restore process state", |cx| {
        set_mm(cx, p, fds)?;
        set_cwd(cx, fds)?;
        // Every fd number must be allowed while the table is rebuilt; the process's own
        // limits (perhaps below its highest fd) follow.
        let limits = raise_nofile(cx)?;
        // While the stub still has our fds: a slave of its terminal to act on it with.
        set_foreground(cx, fds)?;
        set_fds(cx, fds)?;
        fill_epolls(cx, fds)?;
        take_locks(cx, fds)?;
        set_rlimits(cx, p, &limits)?;
        set_signals(cx, p)?;
        // The stub's own (set so that it dies with us) goes; a process of the tree
        // gets its own back, but not the root, whose parent is the restorer: it would
        // be signalled as soon as `mcr restore -d` exits.
        let is_root = image.snapshot.processes.first().map(|q| q.pid) == Some(p.pid);
        let pdeathsig = if is_root { 0 } else { p.pdeathsig };
        // In one batch: each call alone waits for the process to run.
        let mut calls = vec![
            (libc::SYS_umask, [p.umask as u64, 0, 0, 0, 0, 0]),
            (libc::SYS_personality, [p.personality as u64, 0, 0, 0, 0, 0]),
            (
                libc::SYS_prctl,
                [libc::PR_SET_PDEATHSIG as u64, pdeathsig as u64, 0, 0, 0, 0],
            ),
        ];
        let mut what = vec![
            "umask".to_string(),
            "personality".into(),
            format!("prctl(PR_SET_PDEATHSIG, {pdeathsig})"),
        ];
        if p.child_subreaper {
            calls.push((
                libc::SYS_prctl,
                [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0],
            ));
            what.push("prctl(PR_SET_CHILD_SUBREAPER)".into());
        }
        cx.batch(&calls, |i| what[i].clone())?;
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
        let tids = cx.host_tids();
        for (t, &tid) in p.threads.iter().zip(&tids) {
            set_cpu_state(raw, tid, t)?;
        }
        Ok(tids)
    })
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
