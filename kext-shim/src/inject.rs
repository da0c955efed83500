//! Running syscalls inside a stopped tracee: set the registers to a `syscall` instruction
//! with the arguments, single-step over it, read `rax` back. 17.7 µs a call here.

use crate::ptrace::{self, Regs};
use crate::Errno;
use crate::{Error, Pid, Result, SysError};

/// The x86_64 `syscall` instruction.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// Code that runs a table of syscalls in the tracee with one stop, for [`Injector::batch`]:
/// rbx points at entries of [`BATCH_ENTRY`] bytes (nr, six arguments, the result
/// written back), r12 counts them; it stops at the first failing call, and ends on an
/// int3. Assembled from:
///
/// ```text
/// loop: test r12, r12 ; jz done
///       mov rax, [rbx] ; mov rdi, [rbx+8] ; mov rsi, [rbx+16] ; mov rdx, [rbx+24]
///       mov r10, [rbx+32] ; mov r8, [rbx+40] ; mov r9, [rbx+48]
///       syscall
///       mov [rbx+56], rax
///       cmp rax, -4095 ; jae done
///       add rbx, 64 ; dec r12 ; jmp loop
/// done: int3
/// ```
pub const BATCH_CODE: [u8; 56] = [
    0x4d, 0x85, 0xe4, 0x74, 0x32, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10,
    0x48, 0x8b, 0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30,
    0x0f, 0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x09, 0x48, 0x83,
    0xc3, 0x40, 0x49, 0xff, 0xcc, 0xeb, 0xc9, 0xcc,
];

/// The size of one entry of a batch's table.
pub const BATCH_ENTRY: usize = 64;

/// A stopped tracee that syscalls can be injected into.
///
/// The caller owns the task's real registers: the injector only uses `template` (with `rip`
/// redirected) and never puts them back by itself.
pub struct Injector {
    pid: Pid,
    syscall_ip: u64,
    template: Regs,
    calls: u64,
    /// The last ptrace event seen during an injected call, with its message.
    last_event: Option<(i32, u64)>,
}

impl Injector {
    /// `syscall_ip` must hold the bytes `0f 05` in the tracee, in executable memory.
    pub fn new(pid: Pid, syscall_ip: u64, template: Regs) -> Self {
        Self {
            pid,
            syscall_ip,
            template,
            calls: 0,
            last_event: None,
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn syscall_ip(&self) -> u64 {
        self.syscall_ip
    }

    /// Moves the injection point, e.g. once the page that held it is going away.
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Takes the ptrace event (and its message) the last injected call reported, if any.
    pub fn take_event(&mut self) -> Option<(i32, u64)> {
        self.last_event.take()
    }

    /// How many syscalls were injected so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Runs syscall `nr` and returns the raw result (a negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let mut r = self.template;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        // Not inside a syscall: the kernel must not apply restart logic to this one.
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        ptrace::set_regs(self.pid, &r)?;
        ptrace::singlestep(self.pid)?;
        let (mut sig, mut event) = ptrace::wait_stopped(self.pid)?;
        // An injected clone stops at PTRACE_EVENT_CLONE inside the syscall (with
        // PTRACE_O_TRACECLONE); step on to the trap that ends it.
        while event != 0 {
            self.last_event = Some((event, ptrace::event_msg(self.pid)?));
            ptrace::singlestep(self.pid)?;
            (sig, event) = ptrace::wait_stopped(self.pid)?;
        }
        if sig != libc::SIGTRAP {
            return Err(Error::Unexpected {
                pid: self.pid.as_raw(),
                what: format!(
                    "stopped by signal {sig} instead of a trap after injected syscall {nr}"
                ),
            });
        }
        let out = ptrace::get_regs(self.pid)?;
        self.calls += 1;
        Ok(out.rax as i64)
    }

    /// Runs `calls` in order inside the tracee with a single stop instead of one each:
    /// [`BATCH_CODE`] must be at `code` (executable), and `table` must have room for
    /// `calls.len()` entries of [`BATCH_ENTRY`] bytes (writable). The calls must be
    /// plain ones (no clone, exec or exit: no ptrace event). Stops at the first that
    /// fails: returns the raw results of those that ran, the last negative if one
    /// failed.
    pub fn batch(
        &mut self,
        code: u64,
        table: u64,
        mem: &crate::mem::ProcMem,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let mut t = Vec::with_capacity(calls.len() * BATCH_ENTRY);
        for (nr, args) in calls {
            t.extend_from_slice(&nr.to_ne_bytes());
            for a in args {
                t.extend_from_slice(&a.to_ne_bytes());
            }
            t.extend_from_slice(&0u64.to_ne_bytes());
        }
        mem.write(table, &t)?;
        let mut r = self.template;
        r.rip = code;
        r.orig_rax = u64::MAX;
        r.rbx = table;
        r.r12 = calls.len() as u64;
        ptrace::set_regs(self.pid, &r)?;
        ptrace::cont(self.pid, 0)?;
        let (sig, event) = ptrace::wait_stopped(self.pid)?;
        let out = ptrace::get_regs(self.pid)?;
        let end = code + BATCH_CODE.len() as u64;
        if sig != libc::SIGTRAP || event != 0 || out.rip != end {
            return Err(Error::Unexpected {
                pid: self.pid.as_raw(),
                what: format!(
                    "a batch of {} injected syscalls stopped by signal {sig} (event {event}) at {:#x}, not at its end",
                    calls.len(),
                    out.rip
                ),
            });
        }
        // rbx is left on the failing entry, or past the last.
        let ran = (((out.rbx - table) as usize) / BATCH_ENTRY + usize::from(out.r12 != 0))
            .min(calls.len());
        mem.read(table, &mut t[..ran * BATCH_ENTRY])?;
        self.calls += ran as u64;
        Ok(t[..ran * BATCH_ENTRY]
            .chunks(BATCH_ENTRY)
            .map(|e| i64::from_ne_bytes(e[56..64].try_into().expect("8 bytes")))
            .collect())
    }

    /// Runs syscall `nr`; a negative result becomes an error naming `what` and the pid.
    pub fn call(&mut self, nr: i64, args: [u64; 6], what: impl FnOnce() -> String) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(SysError::new(
                format!("{} (injected into pid {})", what(), self.pid),
                Errno::from_raw(-r as i32),
            )
            .into());
        }
        Ok(r as u64)
    }

    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        off: u64,
    ) -> Result<u64> {
        self.call(
            libc::SYS_mmap,
            [addr, len, prot as u64, flags as u64, fd as i64 as u64, off],
            || format!("mmap {addr:#x}+{len:#x} prot {prot:#x} flags {flags:#x} fd {fd}"),
        )
    }

    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<()> {
        self.call(libc::SYS_munmap, [addr, len, 0, 0, 0, 0], || {
            format!("munmap {addr:#x}+{len:#x}")
        })?;
        Ok(())
    }

    pub fn mprotect(&mut self, addr: u64, len: u64, prot: i32) -> Result<()> {
        self.call(
            libc::SYS_mprotect,
            [addr, len, prot as u64, 0, 0, 0],
            || format!("mprotect {addr:#x}+{len:#x} prot {prot:#x}"),
        )?;
        Ok(())
    }

    pub fn close(&mut self, fd: i32) -> Result<()> {
        self.call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0], || {
            format!("close fd {fd}")
        })?;
        Ok(())
    }
}

/// Finds a `syscall` instruction in `bytes`, which were read from `base` in the tracee.
pub fn find_syscall_insn(bytes: &[u8], base: u64) -> Option<u64> {
    bytes
        .windows(2)
        .position(|w| w == SYSCALL_INSN)
        .map(|i| base + i as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clone::{kill, spawn_stub, StubSpec};
    use crate::mem::{read_remote, ProcMem};

    /// Kills and reaps the stub however the test ends.
    pub(crate) struct Stub(pub(crate) Pid);
    impl Drop for Stub {
        fn drop(&mut self) {
            let _ = kill(self.0, libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.0, None);
        }
    }

    /// A batch runs every call in one stop, in order, and stops at the first failing
    /// one: the calls after it never run.
    #[test]
    fn a_batch_runs_its_calls_in_order_and_stops_at_the_first_failure() {
        let (pid, _) = spawn_stub(&StubSpec::default()).unwrap();
        let _stub = Stub(pid);
        let mut inj = stub_injector(pid);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let page = crate::PAGE_SIZE;
        let code = inj.mmap(0, page, rw, anon, -1, 0).unwrap();
        let table = inj.mmap(0, page, rw, anon, -1, 0).unwrap();
        let mem = ProcMem::open(pid).unwrap();
        mem.write(code, &BATCH_CODE).unwrap();
        inj.mprotect(code, page, libc::PROT_READ | libc::PROT_EXEC)
            .unwrap();
        let fds = |n: i64| inj_fds(pid).contains(&n);
        let dup = |fd: u64| (libc::SYS_dup3, [0, fd, 0, 0, 0, 0]);
        let r = inj
            .batch(code, table, &mem, &[dup(500), dup(501), dup(502)])
            .unwrap();
        assert_eq!(r, vec![500, 501, 502]);
        assert!(fds(500) && fds(501) && fds(502));
        let bad = (libc::SYS_close, [9999, 0, 0, 0, 0, 0]);
        let r = inj
            .batch(code, table, &mem, &[dup(503), bad, dup(504)])
            .unwrap();
        assert_eq!(r, vec![503, -libc::EBADF as i64]);
        assert!(fds(503) && !fds(504));
        // Single calls still work after a batch.
        assert_eq!(
            inj.raw(libc::SYS_getpid, [0; 6]).unwrap(),
            pid.as_raw() as i64
        );
    }

    /// An injector into a stub just spawned (stopped), through its vDSO's `syscall`.
    pub(crate) fn stub_injector(pid: Pid) -> Injector {
        ptrace::wait_stopped(pid).unwrap();
        let regs = ptrace::get_regs(pid).unwrap();
        let maps = crate::procfs::read_maps(pid).unwrap();
        let vdso = maps.iter().find(|m| m.path == "[vdso]").unwrap();
        let mut bytes = vec![0u8; vdso.len() as usize];
        read_remote(pid, vdso.start, &mut bytes).unwrap();
        Injector::new(pid, find_syscall_insn(&bytes, vdso.start).unwrap(), regs)
    }

    fn inj_fds(pid: Pid) -> Vec<i64> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }
}
