//! What only the process itself can tell: signal actions, each thread's alternate signal
//! stack and clear_child_tid, its brk and dumpable flag. Learned by injecting a few
//! syscalls, with a scratch page that is gone again before the process resumes, and
//! every signal blocked meanwhile so none is consumed.

use super::freeze::Frozen;
use super::{Result, StepContext};
use crate::model::{AltStack, SigAction};
use kext_shim::dirty::WriteTracker;
use kext_shim::inject::{find_syscall_insn, Injector};
use kext_shim::mem::read_remote;
use kext_shim::procfs::MapEntry;
use kext_shim::{ptrace, Pid, PAGE_SIZE};

/// Per-thread answers, in the order of `Frozen::threads`.
pub struct ThreadAnswers {
    pub altstack: AltStack,
    /// set_tid_address: the word the kernel clears (and futex-wakes) when the thread
    /// exits; pthread_join relies on it.
    pub clear_child_tid: u64,
}

pub struct Answers {
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
pub fn ask(frozen: &Frozen, maps: &[MapEntry], handled: u64, timers: &[i32]) -> Result<Answers> {
    let ip = syscall_ip(frozen.pid, maps)?;
    session(frozen, |_| ask_with(frozen, ip, handled, timers))
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

fn ask_with(frozen: &Frozen, ip: u64, handled: u64, timers: &[i32]) -> Result<Answers> {
    let pid = frozen.pid;
    let mut inj = Injector::new(pid, ip, frozen.leader().regs);
    let scratch = inj
        .mmap(
            0,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .step(pid, || "mapping a scratch page".into())?;
    let read = |len: usize| -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        read_remote(pid, scratch, &mut b).step(pid, || "reading the scratch page".into())?;
        Ok(b)
    };
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
    let res = (|| {
        let mut sigactions = vec![SigAction::default(); 64];
        for sig in 1..=64u64 {
            if handled & (1 << (sig - 1)) == 0 {
                continue;
            }
            inj.call(libc::SYS_rt_sigaction, [sig, 0, scratch, 8, 0, 0], || {
                format!("rt_sigaction({sig}) query")
            })
            .step(pid, || format!("reading the action of signal {sig}"))?;
            let b = read(32)?;
            sigactions[sig as usize - 1] = SigAction {
                handler: word(&b, 0),
                flags: word(&b, 1),
                restorer: word(&b, 2),
                mask: word(&b, 3),
            };
        }
        let brk = inj
            .call(libc::SYS_brk, [0; 6], || "brk(0)".into())
            .step(pid, || "reading brk".into())?;
        let dumpable = inj
            .call(
                libc::SYS_prctl,
                [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
                || "prctl(PR_GET_DUMPABLE)".into(),
            )
            .step(pid, || "reading the dumpable flag".into())? as u32;
        // Both write an int where the second argument points.
        let mut get_int = |option: i32, what: &'static str| -> Result<i32> {
            inj.call(
                libc::SYS_prctl,
                [option as u64, scratch, 0, 0, 0, 0],
                || format!("prctl({what})"),
            )
            .step(pid, || format!("reading {what}"))?;
            let b = read(4)?;
            Ok(i32::from_ne_bytes(b[..4].try_into().expect("4 bytes")))
        };
        let child_subreaper = get_int(libc::PR_GET_CHILD_SUBREAPER, "PR_GET_CHILD_SUBREAPER")? != 0;
        let pdeathsig = get_int(libc::PR_GET_PDEATHSIG, "PR_GET_PDEATHSIG")?;
        let mut itimers = [(0u64, 0u64); 3];
        for (which, slot) in itimers.iter_mut().enumerate() {
            inj.call(
                libc::SYS_getitimer,
                [which as u64, scratch, 0, 0, 0, 0],
                || format!("getitimer({which})"),
            )
            .step(pid, || format!("reading interval timer {which}"))?;
            let b = read(32)?;
            let us = |i: usize| word(&b, i) * 1_000_000 + word(&b, i + 1);
            *slot = (us(0), us(2));
        }
        let mut posix_timers = Vec::with_capacity(timers.len());
        for &id in timers {
            inj.call(
                libc::SYS_timer_gettime,
                [id as u64, scratch, 0, 0, 0, 0],
                || format!("timer_gettime({id})"),
            )
            .step(pid, || format!("reading POSIX timer {id}"))?;
            let b = read(32)?;
            let ns = |i: usize| word(&b, i) * 1_000_000_000 + word(&b, i + 1);
            posix_timers.push((ns(0), ns(2)));
        }
        let mut threads = Vec::with_capacity(frozen.threads.len());
        for t in &frozen.threads {
            let tid = t.tid;
            let mut ti = Injector::new(tid, ip, t.regs);
            ti.call(libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0], || {
                "sigaltstack query".into()
            })
            .step(pid, || {
                format!("reading the alternate signal stack of {tid}")
            })?;
            let b = read(24)?;
            let altstack = AltStack {
                sp: word(&b, 0),
                flags: i32::from_ne_bytes(b[8..12].try_into().expect("4")),
                size: word(&b, 2),
            };
            ti.call(
                libc::SYS_prctl,
                [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
                || "prctl(PR_GET_TID_ADDRESS)".into(),
            )
            .step(pid, || format!("reading clear_child_tid of {tid}"))?;
            let clear_child_tid = word(&read(8)?, 0);
            threads.push(ThreadAnswers {
                altstack,
                clear_child_tid,
            });
        }
        Ok(Answers {
            sigactions,
            brk,
            dumpable,
            child_subreaper,
            pdeathsig,
            itimers,
            posix_timers,
            threads,
        })
    })();
    let unmapped = inj
        .munmap(scratch, PAGE_SIZE)
        .step(pid, || "unmapping the scratch page".into());
    let a = res?;
    unmapped?;
    Ok(a)
}
