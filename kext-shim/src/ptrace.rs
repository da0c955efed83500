//! ptrace: attaching, stopping, and reading or writing a stopped task's CPU and signal state.

use crate::sys;
use crate::{check, Errno, Error, Pid, Result, SysError};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

/// The general-purpose registers as PTRACE_GETREGS sees them (x86_64).
pub type Regs = libc::user_regs_struct;

/// Number of 64-bit words in [`Regs`], in declaration order.
pub const REGS_WORDS: usize = 27;

/// Where `rsp` is among [`regs_to_words`]'s words.
pub const RSP_WORD: usize = 19;

/// Flattens registers into words, in the kernel's `user_regs_struct` order.
pub fn regs_to_words(r: &Regs) -> [u64; REGS_WORDS] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// The inverse of [`regs_to_words`].
pub fn regs_from_words(w: &[u64; REGS_WORDS]) -> Regs {
    Regs {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    }
}

/// Rewrites registers taken while the task was stopped inside a syscall so that, once set
/// back on a *new* task, execution re-enters that syscall or sees EINTR, as the kernel would
/// have done for the original. Returns true if anything changed.
///
/// `-ERESTART_RESTARTBLOCK` cannot be restarted on another task (its restart block lives in
/// the old task_struct), so it becomes `-EINTR`; programs that sleep with a remainder
/// (nanosleep) then continue with the time left, which the kernel already wrote back.
pub fn fixup_syscall_restart(r: &mut Regs) -> bool {
    if (r.orig_rax as i64) < 0 {
        return false;
    }
    let changed = match -(r.rax as i64) {
        sys::ERESTARTNOHAND | sys::ERESTARTSYS | sys::ERESTARTNOINTR => {
            r.rax = r.orig_rax;
            r.rip -= 2;
            true
        }
        sys::ERESTART_RESTARTBLOCK => {
            r.rax = (-libc::EINTR) as i64 as u64;
            true
        }
        _ => false,
    };
    // The new task must not apply restart logic a second time.
    r.orig_rax = u64::MAX;
    changed
}

fn ptrace_raw(
    req: libc::c_uint,
    pid: Pid,
    addr: usize,
    data: usize,
    what: &'static str,
) -> Result<libc::c_long> {
    // SAFETY: every caller passes either plain integers or pointers to live buffers of the
    // size the request expects; ptrace does not retain them past the call.
    let r = unsafe {
        libc::ptrace(
            req,
            pid.as_raw(),
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    check(r, || format!("ptrace({what}) pid {pid}"))
}

/// Attaches without stopping the task, with the options we rely on.
pub fn seize(pid: Pid) -> Result<()> {
    ptrace_raw(
        libc::PTRACE_SEIZE,
        pid,
        0,
        libc::PTRACE_O_TRACESYSGOOD as usize,
        "PTRACE_SEIZE",
    )?;
    Ok(())
}

pub fn interrupt(pid: Pid) -> Result<()> {
    ptrace_raw(libc::PTRACE_INTERRUPT, pid, 0, 0, "PTRACE_INTERRUPT")?;
    Ok(())
}

/// Detaches, delivering `sig` (0 for none).
pub fn detach(pid: Pid, sig: i32) -> Result<()> {
    ptrace_raw(libc::PTRACE_DETACH, pid, 0, sig as usize, "PTRACE_DETACH")?;
    Ok(())
}

pub fn cont(pid: Pid, sig: i32) -> Result<()> {
    ptrace_raw(libc::PTRACE_CONT, pid, 0, sig as usize, "PTRACE_CONT")?;
    Ok(())
}

pub fn singlestep(pid: Pid) -> Result<()> {
    ptrace_raw(libc::PTRACE_SINGLESTEP, pid, 0, 0, "PTRACE_SINGLESTEP")?;
    Ok(())
}

/// How a traced task reported in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stopped: signal-delivery, group or event stop, with the signal number.
    Stopped {
        sig: i32,
        event: i32,
    },
    Exited(i32),
    Killed(i32),
}

/// Waits for the next report of a traced task.
pub fn wait(pid: Pid) -> Result<Stop> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, sig)) => {
                return Ok(Stop::Stopped {
                    sig: sig as i32,
                    event: 0,
                })
            }
            Ok(WaitStatus::PtraceEvent(_, sig, ev)) => {
                return Ok(Stop::Stopped {
                    sig: sig as i32,
                    event: ev,
                })
            }
            Ok(WaitStatus::PtraceSyscall(_)) => {
                return Ok(Stop::Stopped {
                    sig: libc::SIGTRAP | 0x80,
                    event: 0,
                })
            }
            Ok(WaitStatus::Exited(_, code)) => return Ok(Stop::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Stop::Killed(sig as i32)),
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SysError::new(format!("waitpid pid {pid}"), e).into()),
        }
    }
}

/// Waits until the task is in a ptrace stop; an exit is an error naming the pid.
pub fn wait_stopped(pid: Pid) -> Result<(i32, i32)> {
    match wait(pid)? {
        Stop::Stopped { sig, event } => Ok((sig, event)),
        Stop::Exited(c) => Err(Error::Unexpected {
            pid: pid.as_raw(),
            what: format!("exited with status {c} while being traced"),
        }),
        Stop::Killed(s) => Err(Error::Unexpected {
            pid: pid.as_raw(),
            what: format!("killed by signal {s} while being traced"),
        }),
    }
}

pub fn get_regs(pid: Pid) -> Result<Regs> {
    let mut r = std::mem::MaybeUninit::<Regs>::zeroed();
    ptrace_raw(
        libc::PTRACE_GETREGS,
        pid,
        0,
        r.as_mut_ptr() as usize,
        "PTRACE_GETREGS",
    )?;
    // SAFETY: zero-initialised plain integers, then filled by the kernel.
    Ok(unsafe { r.assume_init() })
}

pub fn set_regs(pid: Pid, r: &Regs) -> Result<()> {
    ptrace_raw(
        libc::PTRACE_SETREGS,
        pid,
        0,
        r as *const Regs as usize,
        "PTRACE_SETREGS",
    )?;
    Ok(())
}

/// The whole XSAVE area (x87, SSE, AVX, PKRU, ...) in the standard format.
pub fn get_xstate(pid: Pid) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        libc::PTRACE_GETREGSET,
        pid,
        sys::NT_X86_XSTATE as usize,
        &mut iov as *mut libc::iovec as usize,
        "PTRACE_GETREGSET NT_X86_XSTATE",
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Sets the XSAVE area; the kernel wants it whole, as `get_xstate` returned it.
pub fn set_xstate(pid: Pid, xstate: &[u8]) -> Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    ptrace_raw(
        libc::PTRACE_SETREGSET,
        pid,
        sys::NT_X86_XSTATE as usize,
        &mut iov as *mut libc::iovec as usize,
        "PTRACE_SETREGSET NT_X86_XSTATE",
    )?;
    Ok(())
}

/// The blocked-signal mask as a bit set (bit n-1 = signal n).
pub fn get_sigmask(pid: Pid) -> Result<u64> {
    let mut mask = 0u64;
    ptrace_raw(
        sys::PTRACE_GETSIGMASK,
        pid,
        8,
        &mut mask as *mut u64 as usize,
        "PTRACE_GETSIGMASK",
    )?;
    Ok(mask)
}

pub fn set_sigmask(pid: Pid, mask: u64) -> Result<()> {
    ptrace_raw(
        sys::PTRACE_SETSIGMASK,
        pid,
        8,
        &mask as *const u64 as usize,
        "PTRACE_SETSIGMASK",
    )?;
    Ok(())
}

/// A queued signal, as the raw 128-byte siginfo the kernel keeps.
pub type RawSiginfo = [u8; 128];

/// Signal number of a raw siginfo.
pub fn siginfo_signo(si: &RawSiginfo) -> i32 {
    i32::from_ne_bytes([si[0], si[1], si[2], si[3]])
}

/// Every queued signal of the thread (or, with `shared`, of the thread group), in order.
pub fn peek_siginfo(pid: Pid, shared: bool) -> Result<Vec<RawSiginfo>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    let mut buf = vec![[0u8; 128]; 32];
    loop {
        let args = Args {
            off: out.len() as u64,
            flags: if shared {
                sys::PTRACE_PEEKSIGINFO_SHARED
            } else {
                0
            },
            nr: buf.len() as i32,
        };
        let n = ptrace_raw(
            sys::PTRACE_PEEKSIGINFO,
            pid,
            &args as *const Args as usize,
            buf.as_mut_ptr() as usize,
            "PTRACE_PEEKSIGINFO",
        )? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// A thread's rseq registration (PTRACE_GET_RSEQ_CONFIGURATION).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    pub area: u64,
    pub size: u32,
    pub signature: u32,
    pub flags: u32,
}

pub fn rseq_config(pid: Pid) -> Result<RseqConfig> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    ptrace_raw(
        sys::PTRACE_GET_RSEQ_CONFIGURATION,
        pid,
        std::mem::size_of::<Conf>(),
        &mut c as *mut Conf as usize,
        "PTRACE_GET_RSEQ_CONFIGURATION",
    )?;
    Ok(RseqConfig {
        area: c.ptr,
        size: c.size,
        signature: c.sig,
        flags: c.flags,
    })
}

/// Makes the calling process traced by its parent. Used by a restore stub right after
/// clone3, before it stops itself.
pub fn traceme_raw() -> libc::c_long {
    // SAFETY: PTRACE_TRACEME takes no pointers.
    unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) }
}

/// Sets ptrace options (PTRACE_O_*) on a tracee in a ptrace stop.
pub fn set_options(pid: Pid, options: i32) -> Result<()> {
    ptrace_raw(
        libc::PTRACE_SETOPTIONS,
        pid,
        0,
        options as usize,
        "PTRACE_SETOPTIONS",
    )?;
    Ok(())
}

/// The new thread's tid reported with a PTRACE_EVENT_CLONE stop.
pub fn event_msg(pid: Pid) -> Result<u64> {
    let mut msg: libc::c_ulong = 0;
    ptrace_raw(
        libc::PTRACE_GETEVENTMSG,
        pid,
        0,
        &mut msg as *mut libc::c_ulong as usize,
        "PTRACE_GETEVENTMSG",
    )?;
    Ok(msg as u64)
}

/// A thread's robust futex list (head address, length), read from outside with
/// get_robust_list, which needs ptrace access to it.
pub fn robust_list(tid: Pid) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: the kernel writes one pointer-sized head and one size_t into our locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    };
    check(r, || format!("get_robust_list tid {tid}"))?;
    Ok((head, len as u64))
}
