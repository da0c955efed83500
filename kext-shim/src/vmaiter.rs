//! Each VMA's flags read straight from the kernel's `vm_area_struct` by a BPF
//! `task_vma` iterator: time in the number of VMAs, not in the pages they hold.
//!
//! A checkpoint needs a few VmFlags (growing down, madvise advice, VM_IO) that
//! /proc/PID/maps leaves out; /proc/PID/smaps has them but walks every page table to
//! count pages first: 16-18 ms for 1 GiB resident on this machine, inside the freeze.
//! The iterator program here writes `(vm_start, vm_end, vm_flags)` per VMA of one
//! task; the offsets come from this kernel's BTF.
//!
//! `vm_flags` bits are the kernel's internals, not an ABI. So [`VmaIter::load`] checks
//! them first against smaps in our own process, with a VMA made for each flag it
//! reads, and refuses to serve (the caller falls back to smaps) on any disagreement.
//! Loading needs CAP_BPF and CAP_PERFMON.

use crate::btf::Btf;
use crate::procfs::{self, MapEntry};
use crate::{check, Errno, Error, Pid, Result, SysError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// The flags a checkpoint reads, as smaps names them, and their `vm_flags` bit on
/// x86_64 (include/linux/mm.h), checked at load time.
pub const FLAGS: [(&str, u64); 9] = [
    ("gd", 0x100),       // VM_GROWSDOWN
    ("pf", 0x400),       // VM_PFNMAP
    ("io", 0x4000),      // VM_IO
    ("dc", 0x20000),     // VM_DONTCOPY (MADV_DONTFORK)
    ("wf", 0x200_0000),  // VM_WIPEONFORK
    ("dd", 0x400_0000),  // VM_DONTDUMP
    ("hg", 0x2000_0000), // VM_HUGEPAGE
    ("nh", 0x4000_0000), // VM_NOHUGEPAGE
    ("mg", 0x8000_0000), // VM_MERGEABLE
];

/// More than a process may have (vm.max_map_count is 65530 by default): past it the
/// iterator is not trusted.
const MAX_VMAS: usize = 1 << 20;

/// One VMA as the iterator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

/// The names, among [`FLAGS`], of the bits set in `flags`.
pub fn mnemonics(flags: u64) -> Vec<String> {
    FLAGS
        .iter()
        .filter(|(_, bit)| flags & bit != 0)
        .map(|(name, _)| name.to_string())
        .collect()
}

// bpf(2) commands, program and attach types (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: i32 = 5;
const BPF_LINK_CREATE: i32 = 28;
const BPF_ITER_CREATE: i32 = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
const BPF_FUNC_SEQ_WRITE: i32 = 127;

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
}

#[repr(C)]
#[derive(Default)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
}

/// `union bpf_iter_link_info`'s task member, padded to the union's size.
#[repr(C)]
#[derive(Default)]
struct TaskIterInfo {
    tid: u32,
    pid: u32,
    pid_fd: u32,
    _pad: u32,
}

fn bpf<T>(cmd: i32, attr: &mut T, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised repr(C) prefix of `union bpf_attr` for
    // `cmd`, its size passed with it; pointers inside it point at memory that outlives
    // the call. The kernel zero-extends a shorter attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    let fd = check(fd, what)?;
    // SAFETY: bpf(2) returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | (src << 4)) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

// Opcodes used below (BPF_CLASS | BPF_OP/BPF_MODE | BPF_SRC/BPF_SIZE).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
const JEQ_IMM: u8 = 0x15;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// The program: for each VMA, `bpf_seq_write(ctx->meta->seq, {start, end, flags}, 24)`.
/// Its context is `struct bpf_iter__task_vma { meta; task; vma; }`, three pointers.
fn program(start: i16, end: i16, flags: i16) -> Vec<u64> {
    vec![
        insn(MOV64_REG, 6, 1, 0, 0),  // r6 = ctx
        insn(LDX_DW, 7, 6, 16, 0),    // r7 = ctx->vma
        insn(JEQ_IMM, 7, 0, 12, 0),   // the last call has no VMA: to the exit
        insn(LDX_DW, 2, 7, start, 0), // the record, on the stack
        insn(STX_DW, 10, 2, -24, 0),
        insn(LDX_DW, 2, 7, end, 0),
        insn(STX_DW, 10, 2, -16, 0),
        insn(LDX_DW, 2, 7, flags, 0),
        insn(STX_DW, 10, 2, -8, 0),
        insn(LDX_DW, 1, 6, 0, 0),     // r1 = ctx->meta
        insn(LDX_DW, 1, 1, 0, 0),     // r1 = meta->seq
        insn(MOV64_REG, 2, 10, 0, 0), // r2 = the record
        insn(ADD64_IMM, 2, 0, 0, -24),
        insn(MOV64_IMM, 3, 0, 0, 24), // r3 = its size
        insn(CALL, 0, 0, 0, BPF_FUNC_SEQ_WRITE),
        insn(MOV64_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The loaded iterator program.
#[derive(Debug)]
pub struct VmaIter {
    prog: OwnedFd,
}

fn unavailable(what: impl Into<String>) -> Error {
    Error::Unexpected {
        pid: std::process::id() as i32,
        what: what.into(),
    }
}

impl VmaIter {
    /// Loads the program for this kernel and checks its reading against smaps.
    pub fn load() -> Result<Self> {
        let btf = Btf::vmlinux()?;
        let field = |name: &str| -> Result<i16> {
            match btf.int_member("vm_area_struct", name) {
                Some((off, 8)) => {
                    i16::try_from(off).map_err(|_| unavailable(format!("{name} at {off}")))
                }
                _ => Err(unavailable(format!(
                    "this kernel's BTF has no 8-byte vm_area_struct.{name}"
                ))),
            }
        };
        let insns = program(field("vm_start")?, field("vm_end")?, field("vm_flags")?);
        let target = btf
            .func("bpf_iter_task_vma")
            .ok_or_else(|| unavailable("this kernel has no task_vma BPF iterator"))?;
        drop(btf);
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..7].copy_from_slice(b"mcr_vma");
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_ITER,
            attach_btf_id: target,
            ..Default::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut attr, || {
            "bpf(BPF_PROG_LOAD) of the task_vma iterator".into()
        })
        .map_err(|e| match e {
            // The verifier says why in its log; its last lines are the reason.
            Error::Sys(s) if s.errno == Errno::EACCES || s.errno == Errno::EINVAL => {
                let text =
                    String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
                        .into_owned();
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                SysError::new(
                    format!("{} (verifier: {})", s.what, tail.join(" / ")),
                    s.errno,
                )
                .into()
            }
            e => e,
        })?;
        let it = Self { prog };
        it.check_against_smaps()?;
        Ok(it)
    }

    /// Every VMA of process `pid` (a host pid), in address order.
    pub fn vmas(&self, pid: Pid) -> Result<Vec<Vma>> {
        // Only the task named, not every thread of its process: each would list the
        // same mm again.
        let mut info = TaskIterInfo {
            tid: pid.as_raw() as u32,
            ..Default::default()
        };
        let mut attr = LinkCreate {
            prog_fd: self.prog.as_raw_fd() as u32,
            attach_type: BPF_TRACE_ITER,
            iter_info: &mut info as *mut TaskIterInfo as u64,
            iter_info_len: std::mem::size_of::<TaskIterInfo>() as u32,
            ..Default::default()
        };
        let link = bpf(BPF_LINK_CREATE, &mut attr, || {
            format!("bpf(BPF_LINK_CREATE) of the task_vma iterator for pid {pid}")
        })?;
        let mut attr = IterCreate {
            link_fd: link.as_raw_fd() as u32,
            flags: 0,
        };
        let iter = bpf(BPF_ITER_CREATE, &mut attr, || {
            format!("bpf(BPF_ITER_CREATE) for pid {pid}")
        })?;
        let mut f = std::fs::File::from(iter);
        // Larger than the kernel's seq_file buffer (8 pages): most processes' VMAs come
        // in one read.
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        let mut vmas: Vec<Vma> = Vec::new();
        let word = |c: &[u8], i: usize| {
            u64::from_ne_bytes(c[8 * i..8 * i + 8].try_into().expect("8 bytes"))
        };
        'read: loop {
            let n = std::io::Read::read(&mut f, &mut buf)
                .map_err(|e| Error::io(format!("the VMA iterator of pid {pid}"), e))?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            let whole = pending.len() / 24 * 24;
            for c in pending[..whole].chunks_exact(24) {
                let v = Vma {
                    start: word(c, 0),
                    end: word(c, 1),
                    flags: word(c, 2),
                };
                // An iterator of one task read in more than one piece does not stop
                // after its last VMA: it starts over from where a piece ended, for
                // ever (seen on 6.18). The list is whole at the first step back.
                if vmas.last().is_some_and(|last| v.start <= last.start) {
                    pending.clear();
                    break 'read;
                }
                vmas.push(v);
            }
            pending.drain(..whole);
            if vmas.len() > MAX_VMAS {
                return Err(unavailable(format!(
                    "pid {pid}: the VMA iterator gave more than {MAX_VMAS} VMAs"
                )));
            }
        }
        if !pending.is_empty() {
            return Err(unavailable(format!(
                "pid {pid}: the VMA iterator ended inside a record"
            )));
        }
        Ok(vmas)
    }

    /// Every mapping of `pid` as [`procfs::read_maps`] gives it (its layout from
    /// /proc/PID/maps, the [`FLAGS`] among its VmFlags) without walking a page table.
    /// THP use is left at 0. The layout and the iterator must agree VMA for VMA.
    pub fn maps(&self, pid: Pid) -> Result<Vec<MapEntry>> {
        let mut layout = procfs::read_layout(pid)?;
        let vmas = self.vmas(pid)?;
        let mut it = vmas.iter().peekable();
        for m in &mut layout {
            // The vsyscall page is not one of the mm's VMAs: maps adds it at the end.
            if m.path == "[vsyscall]" {
                continue;
            }
            match it.next() {
                Some(v) if (v.start, v.end) == (m.start, m.end) => m.flags = mnemonics(v.flags),
                other => {
                    return Err(Error::Unexpected {
                        pid: pid.as_raw(),
                        what: format!(
                            "its maps list {:#x}-{:#x} where the VMA iterator saw {:?}: the layout changed between the two reads",
                            m.start, m.end, other
                        ),
                    })
                }
            }
        }
        if let Some(v) = it.next() {
            return Err(Error::Unexpected {
                pid: pid.as_raw(),
                what: format!("the VMA iterator saw {v:?}, which its maps do not list"),
            });
        }
        Ok(layout)
    }

    /// Makes a VMA for each of [`FLAGS`] that an madvise sets, then compares what the
    /// iterator reads of this process's VMAs with what smaps prints. Every flag must
    /// have been seen set at least once (`gd` on our stack, `pf io` on [vvar]).
    ///
    /// Only the VMAs no other thread of ours can change are compared: the test VMAs,
    /// the stack and [vvar]. Our other threads map, unmap and madvise all the while
    /// (mcr's copy workers, or the other tests), and a VMA of theirs that changed
    /// between the two reads would fail the check for a reason that is not the
    /// kernel's.
    fn check_against_smaps(&self) -> Result<()> {
        let advice = [
            libc::MADV_HUGEPAGE,
            libc::MADV_NOHUGEPAGE,
            libc::MADV_DONTDUMP,
            libc::MADV_DONTFORK,
            libc::MADV_WIPEONFORK,
            libc::MADV_MERGEABLE,
        ];
        let page = crate::PAGE_SIZE as usize;
        let mut made = Vec::new();
        for a in advice {
            let mut m = memmap2::MmapMut::map_anon(4 * page)
                .map_err(|e| unavailable(format!("mapping a test VMA: {e}")))?;
            let base = m.as_mut_ptr();
            // A page of no access on each side, so that the VMA advised cannot merge
            // with a neighbour another thread advised the same way.
            // SAFETY: the first and last pages of the mapping just made, owned by `m`
            // and never touched.
            let fenced = unsafe {
                libc::mprotect(base.cast(), page, libc::PROT_NONE) == 0
                    && libc::mprotect(base.add(3 * page).cast(), page, libc::PROT_NONE) == 0
            };
            if !fenced {
                return Err(unavailable(format!(
                    "fencing a test VMA: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: the two middle pages of the mapping owned by `m`; the advice
            // changes only flags of them, never what they hold or where.
            let r = unsafe { libc::madvise(base.add(page).cast(), 2 * page, a) };
            // Without KSM or THP in this kernel that flag is never seen: fine.
            if r == 0 {
                made.push(m);
            }
        }
        let me = Pid::this();
        let smaps = procfs::read_maps(me)?;
        let vmas = self.vmas(me)?;
        let test_vma = |m: &MapEntry| {
            made.iter().any(|t| {
                let at = t.as_ptr() as u64 + page as u64;
                (m.start, m.end) == (at, at + 2 * page as u64)
            })
        };
        let mut checked = 0;
        let mut seen = [false; FLAGS.len()];
        for m in &smaps {
            let ours = test_vma(m);
            if !(ours || m.path == "[stack]" || m.path.starts_with("[vvar")) {
                continue;
            }
            let Some(v) = vmas.iter().find(|v| (v.start, v.end) == (m.start, m.end)) else {
                return Err(unavailable(format!(
                    "the VMA iterator does not list {:#x}-{:#x} ({}), which smaps does",
                    m.start, m.end, m.path
                )));
            };
            checked += usize::from(ours);
            let got = mnemonics(v.flags);
            for (i, (name, _)) in FLAGS.iter().enumerate() {
                let (want, has) = (m.has_flag(name), got.iter().any(|g| g == name));
                if want != has {
                    return Err(unavailable(format!(
                        "the VMA iterator reads {name} {} for {:#x}-{:#x}, smaps says {}: this kernel's vm_flags bits are not the ones known here",
                        if has { "set" } else { "clear" },
                        m.start,
                        m.end,
                        m.flags.join(" ")
                    )));
                }
                seen[i] |= want;
            }
        }
        if checked != made.len() {
            return Err(unavailable(format!(
                "smaps lists {checked} of the {} test VMAs",
                made.len()
            )));
        }
        drop(made);
        let unseen: Vec<&str> = FLAGS
            .iter()
            .zip(seen)
            .filter(|(_, s)| !s)
            .map(|((n, _), _)| *n)
            .filter(|n| !["hg", "nh", "mg"].contains(n))
            .collect();
        if !unseen.is_empty() {
            return Err(unavailable(format!(
                "could not check the VMA iterator's reading of {}",
                unseen.join(" ")
            )));
        }
        Ok(())
    }
}

/// The iterator, loaded and checked once per process; `Err` says why there is none
/// (then smaps it is).
pub fn shared() -> std::result::Result<&'static VmaIter, &'static str> {
    static IT: OnceLock<std::result::Result<VmaIter, String>> = OnceLock::new();
    IT.get_or_init(|| VmaIter::load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by each test here: the one that makes 3000 VMAs would otherwise change
    /// our layout under the others for as long as it runs.
    static LAYOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn layout() -> std::sync::MutexGuard<'static, ()> {
        LAYOUT.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Our own maps through the iterator: the other tests' threads map and unmap
    /// meanwhile, which `maps` reports as a changed layout.
    fn own_maps(it: &VmaIter) -> Vec<MapEntry> {
        let mut last = None;
        for _ in 0..50 {
            match it.maps(Pid::this()) {
                Ok(m) => return m,
                Err(e) => last = Some(e),
            }
        }
        panic!("{last:?}");
    }

    #[test]
    fn loads_and_reads_like_smaps_here() {
        let _layout = layout();
        let it = VmaIter::load().unwrap();
        let me = Pid::this();
        let fast = own_maps(&it);
        let slow = procfs::read_maps(me).unwrap();
        let stack = fast.iter().find(|m| m.path == "[stack]").unwrap();
        assert!(stack.has_flag("gd"));
        // Same layout, same flags of ours, VMA for VMA (threads' stacks may differ).
        for m in &slow {
            if let Some(f) = fast.iter().find(|f| (f.start, f.end) == (m.start, m.end)) {
                for (name, _) in FLAGS {
                    assert_eq!(f.has_flag(name), m.has_flag(name), "{name} of {m:?}");
                }
            }
        }
    }

    /// mcr loads the iterator while its copy workers map and unmap: their churn is
    /// no reason to fall back to smaps.
    #[test]
    fn loads_while_another_thread_maps_and_unmaps() {
        let _layout = layout();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut m = memmap2::MmapMut::map_anon(3 * crate::PAGE_SIZE as usize).unwrap();
                    // SAFETY: our own fresh mapping; only its flags change.
                    let r = unsafe {
                        libc::madvise(m.as_mut_ptr().cast(), m.len(), libc::MADV_DONTFORK)
                    };
                    assert_eq!(r, 0);
                    drop(m);
                    rounds += 1;
                }
                rounds
            })
        };
        for _ in 0..10 {
            VmaIter::load().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(churn.join().unwrap() > 0);
    }

    #[test]
    fn a_flag_set_after_load_is_read_at_once() {
        let _layout = layout();
        let it = shared().unwrap();
        let mut m = memmap2::MmapMut::map_anon(4 * crate::PAGE_SIZE as usize).unwrap();
        let at = m.as_ptr() as u64;
        let before = it.vmas(Pid::this()).unwrap();
        let v = before.iter().find(|v| v.start <= at && at < v.end).unwrap();
        assert_eq!(v.flags & 0x20000, 0);
        // SAFETY: the whole of our own fresh mapping; only its flags change.
        let r = unsafe { libc::madvise(m.as_mut_ptr().cast(), m.len(), libc::MADV_DONTFORK) };
        assert_eq!(r, 0);
        let after = own_maps(it);
        let e = after.iter().find(|e| e.start <= at && at < e.end).unwrap();
        assert!(e.has_flag("dc"), "{e:?}");
    }

    #[test]
    fn no_such_task_is_an_error_not_an_empty_list() {
        let _layout = layout();
        let it = shared().unwrap();
        // Beyond pid_max: no task has it.
        assert!(it.maps(Pid::from_raw(1 << 30)).is_err());
    }

    #[test]
    fn a_list_longer_than_one_read_comes_whole_and_once() {
        let _layout = layout();
        // 3000 VMAs: 72 KB of records, more than the kernel hands out in one read.
        let it = shared().unwrap();
        let pages = 6000;
        let mut m = memmap2::MmapMut::map_anon(pages * crate::PAGE_SIZE as usize).unwrap();
        for i in (0..pages).step_by(2) {
            let at = m[i * crate::PAGE_SIZE as usize..].as_mut_ptr();
            // SAFETY: one page of our own mapping; made read-only, never touched again.
            let r =
                unsafe { libc::mprotect(at.cast(), crate::PAGE_SIZE as usize, libc::PROT_READ) };
            assert_eq!(r, 0);
        }
        let me = Pid::this();
        let vmas = it.vmas(me).unwrap();
        assert!(vmas.len() > 6000, "{} VMAs", vmas.len());
        assert!(vmas.windows(2).all(|w| w[0].end <= w[1].start));
        // The layout, VMA for VMA.
        own_maps(it);
        drop(m);
    }
}
