//! Threads: cloned from the leader with their tids, and the per-thread state each
//! gets by injection into itself (robust list, clear_child_tid, altstack, rseq, name);
//! registers, xsave and mask go last.

use super::build::Ctx;
use super::{RestoreError, Result, StepContext};
use crate::model::{ProcessImage, ThreadImage};
use kext_shim::inject::Injector;
use kext_shim::ptrace;

/// Registers, xsave area and signal mask: the last thing each thread gets.
pub(super) fn set_cpu_state(raw: i32, tid: kext_shim::Pid, t: &ThreadImage) -> Result<()> {
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
pub(super) fn create_threads(cx: &mut Ctx, p: &ProcessImage) -> Result<()> {
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
        // Ours to trace by the tid we see, which the event reports; clone3 returned
        // the one the process sees.
        let tid = match cx.inj.take_event() {
            Some((_, msg)) => kext_shim::Pid::from_raw(msg as i32),
            None => kext_shim::Pid::from_raw(got as i32),
        };
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
/// The thread's own kernel state (robust list, clear-tid address, signal stack, rseq,
/// name), in one batch of injected calls: each alone waits for the thread to run.
pub(super) fn set_thread_state(cx: &mut Ctx, t: &ThreadImage) -> Result<()> {
    let tid = t.tid;
    // The arguments that are buffers share the data page: the signal stack, then the
    // name.
    let mut data = altstack_arg(t);
    let name_at = data.len().next_multiple_of(8);
    data.resize(name_at, 0);
    data.extend_from_slice(&t.comm.as_bytes()[..t.comm.len().min(15)]);
    data.push(0);
    let at = cx.put(&data)?;
    // Always set: the leader inherited ours, which point into memory that is gone.
    let (head, len) = t.robust_list;
    let len = if len == 0 { 24 } else { len };
    let mut calls = vec![
        (libc::SYS_set_robust_list, [head, len, 0, 0, 0, 0]),
        (
            libc::SYS_set_tid_address,
            [t.clear_child_tid, 0, 0, 0, 0, 0],
        ),
        (libc::SYS_sigaltstack, [at, 0, 0, 0, 0, 0]),
        (
            libc::SYS_prctl,
            [libc::PR_SET_NAME as u64, at + name_at as u64, 0, 0, 0, 0],
        ),
    ];
    let mut what = vec![
        format!("set_robust_list of thread {tid}"),
        format!("set_tid_address of thread {tid}"),
        format!("sigaltstack of thread {tid}"),
        format!("prctl(PR_SET_NAME) of thread {tid}"),
    ];
    if let Some(r) = t.rseq {
        calls.push((
            libc::SYS_rseq,
            [r.area, r.size as u64, 0, r.signature as u64, 0, 0],
        ));
        what.push(format!("rseq register at {:#x} for thread {tid}", r.area));
    }
    cx.batch(&calls, |i| what[i].clone())
}

/// sigaltstack's argument for the stack the thread had.
fn altstack_arg(t: &ThreadImage) -> Vec<u8> {
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
    b
}
