//! Kernel constants that libc does not carry yet (Debian 12's uapi headers predate them),
//! declared once here.

/// Syscall restart codes a task shows in `rax` when it was stopped inside a syscall.
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;

pub const NT_X86_XSTATE: libc::c_int = 0x202;
pub const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
pub const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
pub const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
pub const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

pub const RSEQ_FLAG_UNREGISTER: u64 = 1;

pub const PR_SET_MM: u64 = 35;
pub const PR_SET_MM_MAP: u64 = 14;
pub const PR_SET_MM_MAP_SIZE: u64 = 15;

pub const ARCH_MAP_VDSO_64: u64 = 0x2003;

pub const CLONE_ARGS_SIZE_VER2: usize = 88;

/// PAGEMAP_SCAN (Linux 6.7+) and its categories.
pub const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610; // _IOWR('f', 16, struct pm_scan_arg)
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
pub const UFFD_API: u64 = 0xaa;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00; // _IOWR(0xaa, 0, struct uffdio_register)
pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01; // _IOR(0xaa, 1, struct uffdio_range)
pub const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06; // _IOWR(0xaa, 6, struct uffdio_writeprotect)
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02; // _IOR(0xaa, 2, struct uffdio_range)
pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03; // _IOWR(0xaa, 3, struct uffdio_copy)
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04; // _IOWR(0xaa, 4, struct uffdio_zeropage)
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Bits of a /proc/PID/pagemap entry.
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE_OR_SHARED: u64 = 1 << 61;
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// A copy of `fd` numbered `floor` or above (close-on-exec), or why not.
pub fn dup_above(fd: std::os::fd::RawFd, floor: i32) -> crate::Result<std::os::fd::OwnedFd> {
    // SAFETY: fcntl F_DUPFD_CLOEXEC takes no pointers; a bad fd is an EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
    crate::check(r as libc::c_long, || {
        format!("fcntl(F_DUPFD_CLOEXEC, {floor})")
    })?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(r) })
}
