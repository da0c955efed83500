//! Another process's memory: process_vm_readv/writev, /proc/PID/mem, /proc/PID/pagemap
//! and PAGEMAP_SCAN.

use crate::sys;
use crate::{Errno, Error, Pid, Result, SysError, PAGE_SIZE};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The kernel takes at most this many iovecs per process_vm_* call (UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

/// Reads `buf.len()` bytes at `addr` of `pid` with process_vm_readv, in as many calls as
/// it takes. A short read (an unmapped or unreadable page) is an error naming the address.
pub fn read_remote(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let len = buf.len() - done;
        let remote = [RemoteIoVec {
            base: (addr as usize) + done,
            len,
        }];
        let mut local = [IoSliceMut::new(&mut buf[done..])];
        match process_vm_readv(pid, &mut local, &remote) {
            Ok(0) => {
                return Err(Error::Unexpected {
                    pid: pid.as_raw(),
                    what: format!(
                        "process_vm_readv at {:#x}: nothing readable",
                        addr + done as u64
                    ),
                })
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(SysError::new(
                    format!(
                        "process_vm_readv pid {pid} at {:#x}+{len:#x}",
                        addr + done as u64
                    ),
                    e,
                )
                .into())
            }
        }
    }
    Ok(())
}

/// Reads scattered remote ranges into one local buffer, in order; `ranges` are
/// (address, length) pairs whose lengths add up to `buf.len()`.
pub fn read_remote_ranges(pid: Pid, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(ranges.len());
    let mut rest = buf;
    for &(_, len) in ranges {
        let (b, tail) = rest.split_at_mut(len);
        bufs.push(b);
        rest = tail;
    }
    read_remote_scattered(pid, ranges, &mut bufs)
}

/// Reads each remote range into its own local buffer (`bufs[i]` takes `ranges[i]`,
/// of the same length), [`MAX_IOV`] ranges a call: scattered single pages cost one
/// syscall per thousand instead of one each.
pub fn read_remote_scattered(
    pid: Pid,
    ranges: &[(u64, usize)],
    bufs: &mut [&mut [u8]],
) -> Result<()> {
    debug_assert_eq!(ranges.len(), bufs.len());
    for (rs, bs) in ranges.chunks(MAX_IOV).zip(bufs.chunks_mut(MAX_IOV)) {
        let total: usize = rs.iter().map(|r| r.1).sum();
        let remote: Vec<RemoteIoVec> = rs
            .iter()
            .map(|&(a, l)| RemoteIoVec {
                base: a as usize,
                len: l,
            })
            .collect();
        let n = {
            let mut local: Vec<IoSliceMut> = bs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            loop {
                match process_vm_readv(pid, &mut local, &remote) {
                    Err(Errno::EINTR) => continue,
                    r => break r,
                }
            }
        }
        .map_err(|e| {
            SysError::new(
                format!("process_vm_readv pid {pid} ({} ranges)", rs.len()),
                e,
            )
        })?;
        if n != total {
            // A partial read stops at the first range that faulted: retry range by range
            // so the error names it.
            for (&(a, _), b) in rs.iter().zip(bs.iter_mut()) {
                read_remote(pid, a, b)?;
            }
        }
    }
    Ok(())
}

/// Writes `data` at `addr` of `pid` with process_vm_writev (writable pages only).
pub fn write_remote(pid: Pid, addr: u64, data: &[u8]) -> Result<()> {
    write_remote_ranges(pid, &[(addr, data)])
}

/// Writes each (address, bytes) pair into `pid`, batching up to [`MAX_IOV`] per call.
pub fn write_remote_ranges(pid: Pid, ranges: &[(u64, &[u8])]) -> Result<()> {
    for chunk in ranges.chunks(MAX_IOV) {
        let remote: Vec<RemoteIoVec> = chunk
            .iter()
            .map(|&(a, d)| RemoteIoVec {
                base: a as usize,
                len: d.len(),
            })
            .collect();
        let local: Vec<IoSlice> = chunk.iter().map(|&(_, d)| IoSlice::new(d)).collect();
        let total: usize = chunk.iter().map(|r| r.1.len()).sum();
        let n = loop {
            match process_vm_writev(pid, &local, &remote) {
                Err(Errno::EINTR) => continue,
                r => break r,
            }
        }
        .map_err(|e| {
            SysError::new(
                format!("process_vm_writev pid {pid} ({} ranges)", chunk.len()),
                e,
            )
        })?;
        if n == total {
            continue;
        }
        // A partial write stops inside one range: finish range by range, so a failure
        // names its address.
        let mut skip = n;
        for &(a, d) in chunk {
            if skip >= d.len() {
                skip -= d.len();
                continue;
            }
            write_one(pid, a + skip as u64, &d[skip..])?;
            skip = 0;
        }
    }
    Ok(())
}

fn write_one(pid: Pid, addr: u64, data: &[u8]) -> Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let remote = [RemoteIoVec {
            base: addr as usize + done,
            len: data.len() - done,
        }];
        match process_vm_writev(pid, &[IoSlice::new(&data[done..])], &remote) {
            Ok(0) => {
                return Err(Error::Unexpected {
                    pid: pid.as_raw(),
                    what: format!(
                        "process_vm_writev at {:#x}: nothing writable",
                        addr + done as u64
                    ),
                })
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(SysError::new(
                    format!("process_vm_writev pid {pid} at {:#x}", addr + done as u64),
                    e,
                )
                .into())
            }
        }
    }
    Ok(())
}

/// /proc/PID/mem: reaches pages whatever their protection (the kernel uses FOLL_FORCE),
/// which process_vm_* cannot.
pub struct ProcMem {
    pid: Pid,
    file: File,
}

impl ProcMem {
    pub fn open(pid: Pid) -> Result<Self> {
        let path = format!("/proc/{pid}/mem");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self { pid, file })
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, addr).map_err(|e| {
            Error::io(
                format!("/proc/{}/mem at {addr:#x}+{:#x}", self.pid, buf.len()),
                e,
            )
        })
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, addr).map_err(|e| {
            Error::io(
                format!("/proc/{}/mem at {addr:#x}+{:#x}", self.pid, data.len()),
                e,
            )
        })
    }
}

/// One page's entry in /proc/PID/pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    pub fn present(self) -> bool {
        self.0 & sys::PM_PRESENT != 0
    }
    pub fn swapped(self) -> bool {
        self.0 & sys::PM_SWAP != 0
    }
    /// A page-cache or shared-anonymous page rather than a private anonymous one.
    pub fn file_or_shared(self) -> bool {
        self.0 & sys::PM_FILE_OR_SHARED != 0
    }
    pub fn pfn(self) -> u64 {
        self.0 & sys::PM_PFN_MASK
    }
}

/// /proc/PID/pagemap, read a range at a time.
pub struct Pagemap {
    pid: Pid,
    file: File,
}

impl Pagemap {
    pub fn open(pid: Pid) -> Result<Self> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path).map_err(|e| Error::io(path, e))?;
        Ok(Self { pid, file })
    }

    /// The entries of every page in `[start, end)`.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<PagemapEntry>> {
        let n = ((end - start) / PAGE_SIZE) as usize;
        let mut raw = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut raw, start / PAGE_SIZE * 8)
            .map_err(|e| Error::io(format!("/proc/{}/pagemap at {start:#x}", self.pid), e))?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| PagemapEntry(u64::from_ne_bytes(c.try_into().expect("8 bytes"))))
            .collect())
    }

    /// Page ranges of `[start, end)` matching the PAGEMAP_SCAN categories: each returned
    /// region is `(start, end, categories)`. Needs Linux 6.7+.
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        anyof: u64,
        ret_mask: u64,
    ) -> Result<Vec<(u64, u64, u64)>> {
        self.scan_with(
            start,
            end,
            ScanQuery {
                anyof,
                return_mask: ret_mask,
                ..ScanQuery::default()
            },
        )
    }

    /// PAGEMAP_SCAN with every knob: see [`ScanQuery`].
    pub fn scan_with(&self, start: u64, end: u64, q: ScanQuery) -> Result<Vec<(u64, u64, u64)>> {
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Region {
            start: u64,
            end: u64,
            categories: u64,
        }
        #[repr(C)]
        struct Arg {
            size: u64,
            flags: u64,
            start: u64,
            end: u64,
            walk_end: u64,
            vec: u64,
            vec_len: u64,
            max_pages: u64,
            category_inverted: u64,
            category_mask: u64,
            category_anyof_mask: u64,
            return_mask: u64,
        }
        let mut out = Vec::new();
        let mut regions = vec![Region::default(); 512];
        let mut cursor = start;
        while cursor < end {
            let mut arg = Arg {
                size: std::mem::size_of::<Arg>() as u64,
                flags: q.flags,
                start: cursor,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: q.all_of,
                category_anyof_mask: q.anyof,
                return_mask: q.return_mask,
            };
            // SAFETY: `arg` is a properly sized pm_scan_arg whose `vec` points at
            // `regions`, which has room for `vec_len` entries and outlives the call.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), sys::PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(SysError::new(
                    format!("ioctl(PAGEMAP_SCAN) pid {} at {cursor:#x}", self.pid),
                    Errno::last(),
                )
                .into());
            }
            out.extend(
                regions[..n as usize]
                    .iter()
                    .map(|r| (r.start, r.end, r.categories)),
            );
            if arg.walk_end <= cursor {
                break;
            }
            cursor = arg.walk_end;
        }
        Ok(out)
    }
}

/// What a PAGEMAP_SCAN asks for: pages having every category of `all_of` and, when
/// `anyof` is not 0, one of `anyof`; `flags` are the PM_SCAN_* flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub flags: u64,
    pub all_of: u64,
    pub anyof: u64,
    pub return_mask: u64,
}

/// The page frame number of the kernel's shared zero page, as our own pagemap shows it,
/// or None when pagemap hides PFNs from us (no CAP_SYS_ADMIN). Anonymous pages that were
/// only ever read map it and need not be dumped.
pub fn zero_pfn() -> Option<u64> {
    // The same page until the next boot, and asked in every blackout (a mapping, a
    // pagemap opened and read, an unmapping): found once.
    static PFN: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *PFN.get_or_init(find_zero_pfn)
}

fn find_zero_pfn() -> Option<u64> {
    // SAFETY: a fresh private anonymous page that nothing else refers to; we read it once
    // (which maps the zero page) and unmap it before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        std::ptr::read_volatile(p as *const u8);
        let addr = p as u64;
        let e = Pagemap::open(Pid::this())
            .and_then(|pm| pm.read(addr, addr + PAGE_SIZE))
            .ok();
        libc::munmap(p, PAGE_SIZE as usize);
        let e = *e?.first()?;
        (e.present() && e.pfn() != 0).then(|| e.pfn())
    }
}

/// The pidfd that names the calling process itself, for calls that take one (6.13+).
pub const PIDFD_SELF: i32 = -10000;

/// Whether process_madvise takes MADV_DONTNEED for the calling process itself (named
/// by [`PIDFD_SELF`]): then a process made to run it drops many runs of pages in one
/// call instead of one madvise each (another process's MADV_DONTNEED it refuses, with
/// EINVAL). Tried once, on a page of ours.
pub fn dontneed_many_at_once() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let len = PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous page of ours, which nothing else refers
        // to; the iovec points into it for the call's duration; unmapped after.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return false;
            }
            let iov = libc::iovec {
                iov_base: p,
                iov_len: len,
            };
            let r = libc::syscall(
                libc::SYS_process_madvise,
                PIDFD_SELF,
                &iov as *const libc::iovec,
                1usize,
                libc::MADV_DONTNEED,
                0u32,
            );
            libc::munmap(p, len);
            r == len as libc::c_long
        }
    })
}

/// A MAP_SHARED|MAP_ANONYMOUS region of our own: a shared memory object that processes
/// forked from us inherit, and can map again elsewhere with mremap.
pub struct SharedRegion {
    addr: u64,
    len: usize,
}

impl SharedRegion {
    /// Maps `len` bytes at exactly `addr` (which must be free).
    pub fn map_at(addr: u64, len: usize) -> Result<Self> {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a fresh shared
        // anonymous region aliases nothing of ours.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(
                SysError::new(format!("mmap shared {addr:#x}+{len:#x}"), Errno::last()).into(),
            );
        }
        if p as u64 != addr {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and may place it elsewhere.
            // SAFETY: unmapping the region we were just given.
            unsafe { libc::munmap(p, len) };
            return Err(SysError::new(format!("mmap shared at {addr:#x}"), Errno::EEXIST).into());
        }
        Ok(Self { addr, len })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for `len` bytes for as long as `self`
        // lives, and `&mut self` makes this the only reference to it here.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region we mapped; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Byte ranges holding data in a file (SEEK_DATA/SEEK_HOLE), up to `size`.
pub fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek takes no pointers.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            if Errno::last() == Errno::ENXIO {
                break;
            }
            return Err(SysError::new("lseek(SEEK_DATA)", Errno::last()).into());
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(SysError::new("lseek(SEEK_HOLE)", Errno::last()).into());
        }
        out.push((start as u64, (end as u64).min(size)));
        pos = end;
    }
    Ok(out)
}
