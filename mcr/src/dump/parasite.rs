//! What only the process itself can tell: signal actions, each thread's alternate signal
//! stack and clear_child_tid, its brk and dumpable flag, timers, and its fds' flags and
//! identities. Learned by injecting syscalls, in one batch per task, with a scratch
//! mapping that is gone again before the process resumes, and every signal blocked
//! meanwhile so none is consumed.

use super::freeze::Frozen;
use super::{Result, StepContext};
use crate::model::{AltStack, SigAction};
use kext_shim::dirty::WriteTracker;
use kext_shim::inject::{find_syscall_insn, Injector, BATCH_CODE, BATCH_ENTRY};
use kext_shim::mem::{read_remote, ProcMem};
use kext_shim::procfs::{FileIdentity, MapEntry};
use kext_shim::{ptrace, Pid, PAGE_SIZE};

/// Per-thread answers, in the order of `Frozen::threads`.
pub struct ThreadAnswers {
    pub altstack: AltStack,
    /// set_tid_address: the word the kernel clears (and futex-wakes) when the thread
    /// exits; pthread_join relies on it.
    pub clear_child_tid: u64,
}

/// What the process says of one of its fds (F_GETFD, F_GETFL, fstat).
#[derive(Debug, Clone, Copy)]
pub struct FdAnswer {
    pub fd: i32,
    pub cloexec: bool,
    /// The open file description's flags, as fdinfo shows them.
    pub flags: u32,
    pub ident: FileIdentity,
}

pub struct Answers {
    /// One per fd asked about, in the order asked.
    pub fds: Vec<FdAnswer>,
    /// Index n holds signal n+1.
    pub sigactions: Vec<SigAction>,
    pub brk: u64,
    /// PR_GET_DUMPABLE: a credential change at restore resets it, so it is set back.
    pub dumpable: u32,
    /// PR_GET_CHILD_SUBREAPER and PR_GET_PDEATHSIG.
    pub child_subreaper: bool,
    pub pdeathsig: i32,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF as (interval, value) in microseconds.
    pub itimers: [(u64, u64); 3],
    /// (interval, time left) in ns of each POSIX timer asked about, in order.
    pub posix_timers: Vec<(u64, u64)>,
    pub threads: Vec<ThreadAnswers>,
}

/// Locates a `syscall` instruction in the process's vDSO.
pub fn syscall_ip(pid: Pid, maps: &[MapEntry]) -> Result<u64> {
    let vdso =
        maps.iter()
            .find(|m| m.path == "[vdso]")
            .ok_or_else(|| super::DumpError::Unsupported {
                pid: pid.as_raw(),
                what: "the process has no [vdso] to inject syscalls through".into(),
            })?;
    let mut bytes = vec![0u8; vdso.len() as usize];
    read_remote(pid, vdso.start, &mut bytes).step(pid, || "reading [vdso]".into())?;
    find_syscall_insn(&bytes, vdso.start).ok_or_else(|| super::DumpError::Unsupported {
        pid: pid.as_raw(),
        what: "no syscall instruction in [vdso]".into(),
    })
}

/// `handled` is the set of signals (bit n-1 for signal n) whose action is not the default.
pub fn ask(
    frozen: &Frozen,
    maps: &[MapEntry],
    handled: u64,
    timers: &[i32],
    fds: &[i32],
) -> Result<Answers> {
    let ip = syscall_ip(frozen.pid, maps)?;
    session(frozen, |_| ask_with(frozen, ip, handled, timers, fds))
}

/// Makes a userfaultfd inside the process that tracks its writes from now on (once its
/// VMAs are registered), and takes it out.
pub fn write_tracker(frozen: &Frozen, maps: &[MapEntry]) -> Result<WriteTracker> {
    let pid = frozen.pid;
    let ip = syscall_ip(pid, maps)?;
    let pidfd = kext_shim::pidfd::pidfd_open(pid).step(pid, || "opening a pidfd".into())?;
    session(frozen, |_| {
        let mut inj = Injector::new(pid, ip, frozen.leader().regs);
        WriteTracker::inject(&mut inj, &pidfd).step(pid, || "making a userfaultfd in it".into())
    })
}

/// Runs `f`, which injects syscalls into the process, with every signal of every thread
/// blocked, and puts each thread back in its stop afterwards.
fn session<T>(frozen: &Frozen, f: impl FnOnce(&Frozen) -> Result<T>) -> Result<T> {
    let pid = frozen.pid;
    let mut masks = Vec::with_capacity(frozen.threads.len());
    for t in &frozen.threads {
        masks.push(
            ptrace::get_sigmask(t.tid)
                .step(pid, || format!("reading the signal mask of {}", t.tid))?,
        );
    }
    let res = (|| {
        for t in &frozen.threads {
            ptrace::set_sigmask(t.tid, !0).step(pid, || {
                format!("blocking signals of {} for injection", t.tid)
            })?;
        }
        f(frozen)
    })();
    // Whatever happened, the masks go back before anything else.
    let mut restored = Ok(());
    for (t, m) in frozen.threads.iter().zip(masks) {
        if let Err(e) = ptrace::set_sigmask(t.tid, m) {
            restored = Err(e).step(pid, || format!("restoring the signal mask of {}", t.tid));
        }
    }
    let out = res?;
    restored?;
    for t in &frozen.threads {
        back_to_our_stop(pid, t.tid, &t.regs)?;
    }
    Ok(out)
}

/// Puts a thread the injector used back in a stop of our own (PTRACE_EVENT_STOP) with
/// its own registers. Left in the injector's single-step trap, it would be killed by
/// that SIGTRAP if we died before letting it go; from this stop it simply runs on.
/// The interrupt is taken before any signal is dequeued: no user code runs.
fn back_to_our_stop(pid: Pid, tid: Pid, regs: &ptrace::Regs) -> Result<()> {
    let step = || format!("putting thread {tid} back in its stop");
    ptrace::set_regs(tid, regs).step(pid, step)?;
    ptrace::interrupt(tid).step(pid, step)?;
    ptrace::cont(tid, 0).step(pid, step)?;
    let (sig, event) = ptrace::wait_stopped(tid).step(pid, step)?;
    if event != super::freeze::PTRACE_EVENT_STOP {
        return Err(super::DumpError::Kernel {
            pid: pid.as_raw(),
            step: step(),
            source: kext_shim::Error::Unexpected {
                pid: tid.as_raw(),
                what: format!("stopped with signal {sig} (event {event}) instead"),
            },
        });
    }
    Ok(())
}

/// Queries laid out for one batch: each call, what it is (for an error), and where the
/// bytes it writes go in the data area (an offset, placed once the area is mapped).
#[derive(Default)]
struct Queries {
    calls: Vec<Query>,
    data_len: u64,
}

struct Query {
    nr: i64,
    args: [u64; 6],
    /// Which argument points into the data area, and at which offset.
    out: Option<(usize, u64)>,
    what: &'static str,
    of: u64,
}

impl Queries {
    /// Adds a call whose argument `arg` points at `len` bytes of its own; returns their
    /// offset in the data area.
    fn with_out(
        &mut self,
        nr: i64,
        args: [u64; 6],
        arg: usize,
        len: u64,
        q: (&'static str, u64),
    ) -> u64 {
        let at = self.data_len;
        self.data_len += len.next_multiple_of(8);
        self.calls.push(Query {
            nr,
            args,
            out: Some((arg, at)),
            what: q.0,
            of: q.1,
        });
        at
    }

    /// Adds a call answering in its result alone; returns its index.
    fn plain(&mut self, nr: i64, args: [u64; 6], q: (&'static str, u64)) -> usize {
        self.calls.push(Query {
            nr,
            args,
            out: None,
            what: q.0,
            of: q.1,
        });
        self.calls.len() - 1
    }

    fn table_len(&self) -> u64 {
        (self.calls.len() * BATCH_ENTRY) as u64
    }

    /// Runs every call in one stop of `inj`'s task: the table at `table`, the data area
    /// at `data`. Returns each call's result and the data area's bytes.
    fn run(
        &self,
        inj: &mut Injector,
        mem: &ProcMem,
        (code, table, data): (u64, u64, u64),
    ) -> Result<(Vec<u64>, Vec<u8>)> {
        let pid = inj.pid();
        let calls: Vec<(i64, [u64; 6])> = self
            .calls
            .iter()
            .map(|q| {
                let mut args = q.args;
                if let Some((i, at)) = q.out {
                    args[i] = data + at;
                }
                (q.nr, args)
            })
            .collect();
        let results = inj.batch(code, table, mem, &calls).step(pid, || {
            format!("running a batch of {} queries", calls.len())
        })?;
        if let Some((i, &r)) = results
            .iter()
            .enumerate()
            .find(|(_, &r)| (-4095..0).contains(&r))
        {
            let q = &self.calls[i];
            return Err(kext_shim::Error::from(kext_shim::SysError::new(
                format!("{} {} (injected)", q.what, q.of),
                kext_shim::Errno::from_raw(-r as i32),
            )))
            .step(pid, || format!("reading {} {}", q.what, q.of));
        }
        let mut bytes = vec![0u8; self.data_len as usize];
        mem.read(data, &mut bytes)
            .step(pid, || "reading the answers of the injected queries".into())?;
        Ok((results.into_iter().map(|r| r as u64).collect(), bytes))
    }
}

/// The calls of the process itself, then each thread's, then back: every question is
/// asked in one batch per task (one stop each, not one per syscall), through a scratch
/// mapping holding the batch code, the call table and the answers.
fn ask_with(
    frozen: &Frozen,
    ip: u64,
    handled: u64,
    timers: &[i32],
    fds: &[i32],
) -> Result<Answers> {
    let pid = frozen.pid;
    let word = |b: &[u8], at: u64, i: usize| {
        let o = at as usize + i * 8;
        u64::from_ne_bytes(b[o..o + 8].try_into().expect("8"))
    };
    let mut q = Queries::default();
    let sigs: Vec<(u64, u64)> = (1..=64u64)
        .filter(|sig| handled & (1 << (sig - 1)) != 0)
        .map(|sig| {
            let at = q.with_out(
                libc::SYS_rt_sigaction,
                [sig, 0, 0, 8, 0, 0],
                2,
                32,
                ("the action of signal", sig),
            );
            (sig, at)
        })
        .collect();
    let brk = q.plain(libc::SYS_brk, [0; 6], ("brk", 0));
    let dumpable = q.plain(
        libc::SYS_prctl,
        [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
        ("the dumpable flag", 0),
    );
    // Both write an int where the second argument points.
    let subreaper = q.with_out(
        libc::SYS_prctl,
        [libc::PR_GET_CHILD_SUBREAPER as u64, 0, 0, 0, 0, 0],
        1,
        4,
        ("PR_GET_CHILD_SUBREAPER", 0),
    );
    let pdeathsig = q.with_out(
        libc::SYS_prctl,
        [libc::PR_GET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
        1,
        4,
        ("PR_GET_PDEATHSIG", 0),
    );
    let itimers: Vec<u64> = (0..3u64)
        .map(|which| {
            q.with_out(
                libc::SYS_getitimer,
                [which, 0, 0, 0, 0, 0],
                1,
                32,
                ("interval timer", which),
            )
        })
        .collect();
    let ptimers: Vec<u64> = timers
        .iter()
        .map(|&id| {
            q.with_out(
                libc::SYS_timer_gettime,
                [id as u64, 0, 0, 0, 0, 0],
                1,
                32,
                ("POSIX timer", id as u64),
            )
        })
        .collect();
    // Asked here rather than read from each fdinfo: a socket or a pipe has nothing
    // else to tell there, and a service with a hundred connections has a hundred.
    let fd_queries: Vec<(i32, usize, usize, u64)> = fds
        .iter()
        .map(|&fd| {
            let f = fd as u64;
            let getfd = q.plain(
                libc::SYS_fcntl,
                [f, libc::F_GETFD as u64, 0, 0, 0, 0],
                ("the fd flags of fd", f),
            );
            let getfl = q.plain(
                libc::SYS_fcntl,
                [f, libc::F_GETFL as u64, 0, 0, 0, 0],
                ("the file flags of fd", f),
            );
            let stat = q.with_out(
                libc::SYS_fstat,
                [f, 0, 0, 0, 0, 0],
                1,
                FileIdentity::STAT_LEN as u64,
                ("the identity of fd", f),
            );
            (fd, getfd, getfl, stat)
        })
        .collect();
    let mut per_thread = Queries::default();
    let altstack = per_thread.with_out(
        libc::SYS_sigaltstack,
        [0; 6],
        1,
        24,
        ("the alternate signal stack", 0),
    );
    let tid_address = per_thread.with_out(
        libc::SYS_prctl,
        [libc::PR_GET_TID_ADDRESS as u64, 0, 0, 0, 0, 0],
        1,
        8,
        ("clear_child_tid", 0),
    );

    let table_len = q
        .table_len()
        .max(per_thread.table_len())
        .next_multiple_of(8);
    let len =
        PAGE_SIZE + (table_len + q.data_len.max(per_thread.data_len)).next_multiple_of(PAGE_SIZE);
    let mut inj = Injector::new(pid, ip, frozen.leader().regs);
    let scratch = inj
        .mmap(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .step(pid, || "mapping a scratch area".into())?;
    let res = (|| {
        let mem = ProcMem::open(pid).step(pid, || "opening /proc/PID/mem".into())?;
        mem.write(scratch, &BATCH_CODE)
            .step(pid, || "writing the batch code".into())?;
        inj.mprotect(scratch, PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC)
            .step(pid, || "protecting the batch code".into())?;
        let at = (
            scratch,
            scratch + PAGE_SIZE,
            scratch + PAGE_SIZE + table_len,
        );
        let (r, b) = q.run(&mut inj, &mem, at)?;
        let mut sigactions = vec![SigAction::default(); 64];
        for &(sig, o) in &sigs {
            sigactions[sig as usize - 1] = SigAction {
                handler: word(&b, o, 0),
                flags: word(&b, o, 1),
                restorer: word(&b, o, 2),
                mask: word(&b, o, 3),
            };
        }
        let int = |o: u64| i32::from_ne_bytes(b[o as usize..o as usize + 4].try_into().expect("4"));
        let us = |o: u64, i: usize| word(&b, o, i) * 1_000_000 + word(&b, o, i + 1);
        let ns = |o: u64, i: usize| word(&b, o, i) * 1_000_000_000 + word(&b, o, i + 1);
        let mut threads = Vec::with_capacity(frozen.threads.len());
        for t in &frozen.threads {
            let mut ti = Injector::new(t.tid, ip, t.regs);
            let (_, tb) = per_thread.run(&mut ti, &mem, at)?;
            threads.push(ThreadAnswers {
                altstack: AltStack {
                    sp: word(&tb, altstack, 0),
                    flags: i32::from_ne_bytes(
                        tb[altstack as usize + 8..altstack as usize + 12]
                            .try_into()
                            .expect("4"),
                    ),
                    size: word(&tb, altstack, 2),
                },
                clear_child_tid: word(&tb, tid_address, 0),
            });
        }
        Ok(Answers {
            sigactions,
            brk: r[brk],
            dumpable: r[dumpable] as u32,
            child_subreaper: int(subreaper) != 0,
            pdeathsig: int(pdeathsig),
            itimers: [0, 1, 2].map(|i| (us(itimers[i], 0), us(itimers[i], 2))),
            posix_timers: ptimers.iter().map(|&o| (ns(o, 0), ns(o, 2))).collect(),
            threads,
            fds: fd_queries
                .iter()
                .map(|&(fd, getfd, getfl, stat)| {
                    let o = stat as usize;
                    FdAnswer {
                        fd,
                        cloexec: r[getfd] & libc::FD_CLOEXEC as u64 != 0,
                        flags: r[getfl] as u32,
                        ident: FileIdentity::of_stat_bytes(&b[o..o + FileIdentity::STAT_LEN])
                            .expect("room for a whole stat"),
                    }
                })
                .collect(),
        })
    })();
    let unmapped = inj
        .munmap(scratch, len)
        .step(pid, || "unmapping the scratch area".into());
    let a = res?;
    unmapped?;
    Ok(a)
}
