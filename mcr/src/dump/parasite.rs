//! What only the process itself can tell: signal actions, its alternate signal stack and
//! its brk. Learned by injecting a few syscalls, with a scratch page that is gone again
//! before the process resumes, and every signal blocked meanwhile so none is consumed.

use super::{Result, StepContext};
use crate::model::{AltStack, SigAction};
use kext_shim::inject::{find_syscall_insn, Injector};
use kext_shim::mem::read_remote;
use kext_shim::procfs::MapEntry;
use kext_shim::ptrace::{self, Regs};
use kext_shim::{Pid, PAGE_SIZE};

pub struct Answers {
    /// Index n holds signal n+1.
    pub sigactions: Vec<SigAction>,
    pub altstack: AltStack,
    pub brk: u64,
    /// PR_GET_DUMPABLE: a credential change at restore resets it, so it is set back.
    pub dumpable: u32,
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
pub fn ask(pid: Pid, regs: &Regs, maps: &[MapEntry], handled: u64) -> Result<Answers> {
    let ip = syscall_ip(pid, maps)?;
    let mask = ptrace::get_sigmask(pid).step(pid, || "reading the signal mask".into())?;
    ptrace::set_sigmask(pid, !0).step(pid, || "blocking signals for injection".into())?;
    let mut inj = Injector::new(pid, ip, *regs);
    let res = ask_with(&mut inj, handled);
    // Whatever happened, the mask goes back before anything else.
    let restored = ptrace::set_sigmask(pid, mask).step(pid, || "restoring the signal mask".into());
    let answers = res?;
    restored?;
    Ok(answers)
}

fn ask_with(inj: &mut Injector, handled: u64) -> Result<Answers> {
    let pid = inj.pid();
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
            let mut b = [0u8; 32];
            read_remote(pid, scratch, &mut b).step(pid, || "reading the scratch page".into())?;
            let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
            sigactions[sig as usize - 1] = SigAction {
                handler: w(0),
                flags: w(1),
                restorer: w(2),
                mask: w(3),
            };
        }
        inj.call(libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0], || {
            "sigaltstack query".into()
        })
        .step(pid, || "reading the alternate signal stack".into())?;
        let mut b = [0u8; 24];
        read_remote(pid, scratch, &mut b).step(pid, || "reading the scratch page".into())?;
        let altstack = AltStack {
            sp: u64::from_ne_bytes(b[0..8].try_into().expect("8")),
            flags: i32::from_ne_bytes(b[8..12].try_into().expect("4")),
            size: u64::from_ne_bytes(b[16..24].try_into().expect("8")),
        };
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
        Ok(Answers {
            sigactions,
            altstack,
            brk,
            dumpable,
        })
    })();
    let unmapped = inj
        .munmap(scratch, PAGE_SIZE)
        .step(pid, || "unmapping the scratch page".into());
    let a = res?;
    unmapped?;
    Ok(a)
}
