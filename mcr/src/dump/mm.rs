//! The address space: classifying VMAs and copying the pages that only memory holds.

use super::{DumpError, Result, StepContext};
use crate::image::pages::CHUNK_PAGES;
use crate::image::{ImageWriter, CHUNK_PREFIX};
use crate::model::{
    FdKind, FileRef, Memfd, MmFields, MmImage, ProcessImage, ShmemObject, Vma, VmaAdvice, VmaKind,
};
use crate::par;
use kext_shim::mem::{
    data_ranges, read_remote, read_remote_scattered, zero_pfn, Pagemap, PagemapEntry, ProcMem,
};
use kext_shim::procfs::{self, FileIdentity, MapEntry, Stat};
use kext_shim::{Pid, PAGE_SIZE};
use std::os::unix::fs::FileExt;

pub fn collect(pid: Pid, maps: &[MapEntry], stat: &Stat, brk: u64) -> Result<MmImage> {
    let raw = pid.as_raw();
    let mut files: Vec<FileRef> = Vec::new();
    // A file is mapped by several VMAs (text, data, relro...): stat'ed once, by its
    // device and inode in maps, in the blackout as elsewhere.
    let mut seen: Vec<((u32, u32, u64), FileIdentity)> = Vec::new();
    let mut vmas = Vec::with_capacity(maps.len());
    for m in maps {
        let unsupported = |why: &str| DumpError::Unsupported {
            pid: raw,
            what: format!("mapping {:#x}-{:#x} {}: {why}", m.start, m.end, m.path),
        };
        if m.path == "[vsyscall]" {
            continue;
        }
        let kind = match m.path.as_str() {
            "[vdso]" => VmaKind::Vdso,
            "[vvar]" => VmaKind::Vvar,
            "[vvar_vclock]" => VmaKind::VvarVclock,
            _ if m.has_flag("io") || m.has_flag("pf") => {
                return Err(unsupported(
                    "device memory (VM_IO/VM_PFNMAP) cannot be dumped",
                ))
            }
            // Before the anonymous kinds: the first segment's id (its inode) is 0.
            p if p.starts_with("/SYSV") && m.shared => VmaKind::SysvShm { id: m.inode as i32 },
            _ if m.inode == 0 && !m.shared => VmaKind::Anonymous,
            p if m.shared && (m.inode == 0 || p.starts_with("/dev/zero")) => {
                VmaKind::SharedAnonymous { shmem: m.inode }
            }
            p if p.starts_with("/memfd:") => VmaKind::Memfd { ino: m.inode },
            p if p.ends_with(" (deleted)") => {
                return Err(unsupported("the mapped file was deleted"))
            }
            _ => {
                let key = (m.dev_major, m.dev_minor, m.inode);
                let ident = match seen.iter().find(|s| s.0 == key) {
                    Some(s) => s.1,
                    None => {
                        let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                        let ident = FileIdentity::of_path(&link)
                            .step(pid, || format!("stat of mapped file {}", m.path))?;
                        if ident.ino != m.inode {
                            return Err(unsupported("the file changed while being dumped"));
                        }
                        seen.push((key, ident));
                        ident
                    }
                };
                match ident.mode & libc::S_IFMT {
                    libc::S_IFREG => {}
                    // A private /dev/zero mapping is plain anonymous memory.
                    libc::S_IFCHR if !m.shared && m.path == "/dev/zero" => {
                        vmas.push(vma(m, VmaKind::Anonymous));
                        continue;
                    }
                    _ => return Err(unsupported("only regular files can be mapped")),
                }
                let idx = match files
                    .iter()
                    .position(|f| f.identity.dev == ident.dev && f.identity.ino == ident.ino)
                {
                    Some(i) => i,
                    None => {
                        files.push(FileRef {
                            path: m.path.clone(),
                            identity: ident.into(),
                        });
                        files.len() - 1
                    }
                };
                VmaKind::File(idx as u32)
            }
        };
        vmas.push(vma(m, kind));
    }
    let exe_link = format!("/proc/{pid}/exe");
    let exe = FileRef {
        path: procfs::read_link(&exe_link).step(pid, || "reading exe".into())?,
        identity: FileIdentity::of_path(&exe_link)
            .step(pid, || "stat of exe".into())?
            .into(),
    };
    Ok(MmImage {
        vmas,
        fields: MmFields {
            start_code: stat.field(26),
            end_code: stat.field(27),
            start_stack: stat.field(28),
            start_data: stat.field(45),
            end_data: stat.field(46),
            start_brk: stat.field(47),
            brk,
            arg_start: stat.field(48),
            arg_end: stat.field(49),
            env_start: stat.field(50),
            env_end: stat.field(51),
        },
        auxv: procfs::read_auxv(pid).step(pid, || "reading auxv".into())?,
        exe,
        files,
        parent: None,
    })
}

fn vma(m: &MapEntry, kind: VmaKind) -> Vma {
    Vma {
        start: m.start,
        end: m.end,
        prot: m.prot(),
        shared: m.shared,
        kind,
        offset: m.offset,
        advice: VmaAdvice {
            grows_down: m.has_flag("gd"),
            hugepage: m.has_flag("hg"),
            no_hugepage: m.has_flag("nh"),
            dont_dump: m.has_flag("dd"),
            dont_fork: m.has_flag("dc"),
            wipe_on_fork: m.has_flag("wf"),
            mergeable: m.has_flag("mg"),
        },
    }
}

/// Whether a page of this VMA holds data that only memory has.
fn page_needed(kind: VmaKind, shared: bool, e: PagemapEntry, zero: Option<u64>) -> bool {
    match kind {
        VmaKind::Anonymous => e.swapped() || (e.present() && Some(e.pfn()) != zero),
        // Page-cache pages come back from the file; copies made on write do not.
        VmaKind::File(_) | VmaKind::Memfd { .. } if !shared => {
            e.swapped() || (e.present() && !e.file_or_shared())
        }
        _ => false,
    }
}

/// A run of needed pages: at most one chunk, all in one VMA.
/// Runs read with one process_vm_readv at most.
const BATCH_JOBS: usize = 512;

pub struct Job {
    pub addr: u64,
    pub pages: usize,
    readable: bool,
}

/// The pages of one process to copy, and the VMAs whose other pages are the parent
/// image's.
pub struct PagePlan {
    jobs: Vec<Job>,
    /// Sorted `[start, end)` of every VMA whose pages were chosen as written since the
    /// parent image.
    pub inherited: Vec<(u64, u64)>,
    /// VMAs (indexes into the MmImage) whose pages are still to be chosen from pagemap.
    rest: Vec<usize>,
}

/// Post-copy leaves to first touch only VMAs of at least this many pages (1 MiB).
pub const LAZY_MIN_VMA_PAGES: u64 = 256;

/// At most this many pages (2 MiB) of those written in both intervals go in the
/// blackout; more, and none do (see `take_lazy`).
const HOT_MAX_PAGES: usize = 512;

/// How much of a thread's stack above its stack pointer post-copy sends in the
/// blackout: the frames it returns into first.
const HOT_STACK_BYTES: u64 = 64 * PAGE_SIZE;

impl PagePlan {
    /// Takes out of the plan the runs in private anonymous memory the process can
    /// write (what post-copy hands out on first touch) and returns them as `(address,
    /// pages)`, adjacent runs joined.
    ///
    /// Not the pages it is sure to touch first, each of which would cost the resumed
    /// workload a round trip to the source: those near a thread's stack pointer
    /// (`stack_pointers`), any of a VMA smaller than [`LAZY_MIN_VMA_PAGES`] (its
    /// globals, TLS, a small heap), and those the last pre-copy round saw written too
    /// (`hot`, sorted): written in both intervals, a page is hot (a counter, an index),
    /// where a page of a large area written once is touched again only by chance.
    /// What is left to first touch is that chance. More than [`HOT_MAX_PAGES`] such
    /// pages are no hot few: then none is sent for being one.
    pub fn take_lazy(
        &mut self,
        mm: &MmImage,
        stack_pointers: &[u64],
        hot: &[(u64, u64)],
    ) -> Vec<(u64, u64)> {
        // Inside the freeze, with a job per dirty page run: the VMAs are in address
        // order (as maps lists them), so each is found by bisection.
        let lazy_vma = |addr: u64| {
            let i = mm.vmas.partition_point(|v| v.end <= addr);
            mm.vmas.get(i).is_some_and(|v| {
                v.start <= addr
                    && v.kind == VmaKind::Anonymous
                    && !v.shared
                    && v.prot & (libc::PROT_READ | libc::PROT_WRITE)
                        == libc::PROT_READ | libc::PROT_WRITE
                    && v.len() >= LAZY_MIN_VMA_PAGES * PAGE_SIZE
            })
        };
        let in_hot = |start: u64, end: u64| {
            let i = hot.partition_point(|r| r.1 <= start);
            hot.get(i).is_some_and(|r| r.0 < end)
        };
        // A workload that rewrites much of its memory has no few hot pages: then the
        // pages of both intervals are many (1 GiB at 256 MiB/s: a blackout of 1.4 s
        // copying them), and go to first touch like the rest.
        let hot_pages: usize = self
            .jobs
            .iter()
            .filter(|j| in_hot(j.addr, j.addr + j.pages as u64 * PAGE_SIZE))
            .map(|j| j.pages)
            .sum();
        let rewritten = |start: u64, end: u64| hot_pages <= HOT_MAX_PAGES && in_hot(start, end);
        let sure_to_touch = |j: &Job| {
            let end = j.addr + j.pages as u64 * PAGE_SIZE;
            rewritten(j.addr, end)
                || stack_pointers.iter().any(|&sp| {
                    let low = (sp & !(PAGE_SIZE - 1)).saturating_sub(PAGE_SIZE);
                    j.addr < sp.saturating_add(HOT_STACK_BYTES) && low < end
                })
        };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        self.jobs.retain(|j| {
            if !j.readable || !lazy_vma(j.addr) || sure_to_touch(j) {
                return true;
            }
            match runs.last_mut() {
                Some((a, n)) if *a + *n * PAGE_SIZE == j.addr => *n += j.pages as u64,
                _ => runs.push((j.addr, j.pages as u64)),
            }
            false
        });
        runs
    }

    pub fn bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.pages as u64 * PAGE_SIZE).sum()
    }

    /// The pages planned, as sorted `[start, end)` runs, adjacent ones joined.
    /// The planned runs as chunks would hold them: (address, pages), each at most
    /// [`CHUNK_PAGES`].
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.jobs.iter().map(|j| (j.addr, j.pages as u32))
    }

    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for j in &self.jobs {
            let end = j.addr + j.pages as u64 * PAGE_SIZE;
            match runs.last_mut() {
                Some(last) if last.1 == j.addr => last.1 = end,
                _ => runs.push((j.addr, end)),
            }
        }
        runs.sort_unstable();
        runs
    }
}

/// The runs of a VMA written since the parent image, or None to take all it holds.
pub type WrittenSince<'a> = dyn Fn(&Vma) -> Result<Option<Vec<(u64, u64)>>> + 'a;

/// Chooses the pages to copy: for each VMA `written` knows, the pages written since
/// (whatever they hold now: a page dropped since reads as zeros and must say so); for
/// the others, every page that only memory holds.
pub fn plan_pages(pid: Pid, mm: &MmImage, written: &WrittenSince) -> Result<PagePlan> {
    let mut plan = plan_written(mm, written)?;
    plan.choose_rest(pid, mm)?;
    Ok(plan)
}

/// The first half of [`plan_pages`]: the written runs, which must be read while the
/// tracking that knows them holds. The rest can be chosen later, once tracking (of
/// the next round) began, even while the process runs.
pub fn plan_written(mm: &MmImage, written: &WrittenSince) -> Result<PagePlan> {
    let mut plan = PagePlan {
        jobs: Vec::new(),
        inherited: Vec::new(),
        rest: Vec::new(),
    };
    for (i, v) in mm.vmas.iter().enumerate() {
        // Shared memory is dumped once per object (see `dump_shared_memory`); shared
        // file mappings live in their files.
        if matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock) || v.shared {
            continue;
        }
        let readable = v.prot & libc::PROT_READ != 0;
        let Some(runs) = written(v)? else {
            plan.rest.push(i);
            continue;
        };
        plan.inherited.push((v.start, v.end));
        for (start, end) in runs {
            let (start, end) = (start.max(v.start), end.min(v.end));
            let mut at = start;
            while at < end {
                let pages = ((end - at) / PAGE_SIZE).min(CHUNK_PAGES as u64) as usize;
                plan.jobs.push(Job {
                    addr: at,
                    pages,
                    readable,
                });
                at += pages as u64 * PAGE_SIZE;
            }
        }
    }
    Ok(plan)
}

impl PagePlan {
    /// Adds every page that only memory holds in the VMAs left to choose.
    pub fn choose_rest(&mut self, pid: Pid, mm: &MmImage) -> Result<()> {
        let pagemap = Pagemap::open(pid).step(pid, || "opening pagemap".into())?;
        let zero = zero_pfn();
        let rest = std::mem::take(&mut self.rest);
        // VMAs side by side (a library's text, data, relro...) are read in one go: a
        // read a VMA was most of this in the blackout.
        let mut spans: Vec<(u64, u64, Vec<PagemapEntry>)> = Vec::new();
        let mut k = 0;
        while k < rest.len() {
            let mut end = k + 1;
            while end < rest.len() && mm.vmas[rest[end]].start == mm.vmas[rest[end - 1]].end {
                end += 1;
            }
            let (s, e) = (mm.vmas[rest[k]].start, mm.vmas[rest[end - 1]].end);
            let entries = pagemap
                .read(s, e)
                .step(pid, || format!("reading pagemap of {s:#x}-{e:#x}"))?;
            spans.push((s, e, entries));
            k = end;
        }
        for i in rest {
            let v = &mm.vmas[i];
            let readable = v.prot & libc::PROT_READ != 0;
            let span = spans
                .iter()
                .find(|sp| sp.0 <= v.start && v.end <= sp.1)
                .expect("every VMA of the rest lies in a span read above");
            let from = ((v.start - span.0) / PAGE_SIZE) as usize;
            let entries = span
                .2
                .get(from..from + (v.len() / PAGE_SIZE) as usize)
                .ok_or_else(|| DumpError::Kernel {
                    pid: pid.as_raw(),
                    step: format!("reading pagemap of {:#x}-{:#x}", v.start, v.end),
                    source: kext_shim::Error::Unexpected {
                        pid: pid.as_raw(),
                        what: "pagemap gave fewer entries than pages".into(),
                    },
                })?;
            let mut i = 0usize;
            while i < entries.len() {
                if !page_needed(v.kind, v.shared, entries[i], zero) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < entries.len()
                    && (i - first) < CHUNK_PAGES
                    && page_needed(v.kind, v.shared, entries[i], zero)
                {
                    i += 1;
                }
                self.jobs.push(Job {
                    addr: v.start + first as u64 * PAGE_SIZE,
                    pages: i - first,
                    readable,
                });
            }
        }
        Ok(())
    }
}

/// What to do with a run that could not be read (the process runs and unmapped or
/// protected it meanwhile): skip it after making sure no later image relies on it, or
/// (None) fail.
pub type OnFault<'a> = Option<&'a (dyn Fn(&Job) -> Result<()> + Sync)>;

/// Lists the planned pages in the image without copying them: they stay in `pid`'s
/// memory, for a destination on this host to read (see `PagesInSource`).
pub fn list_pages(pid: Pid, owner: i32, plan: &PagePlan, w: &ImageWriter) -> Result<()> {
    for (addr, pages) in plan.chunks() {
        w.write_in_source(owner, addr, pages)
            .map_err(|source| DumpError::Image {
                pid: pid.as_raw(),
                source,
            })?;
    }
    Ok(())
}

/// Copies the planned pages into the image, reading and writing on every core.
/// `owner` names the process in the image (its pid as the tree sees it).
pub fn copy_pages(
    pid: Pid,
    owner: i32,
    plan: &PagePlan,
    w: &ImageWriter,
    on_fault: OnFault,
) -> Result<()> {
    let raw = pid.as_raw();
    let jobs = &plan.jobs;
    // process_vm_readv honours protections; /proc/PID/mem does not.
    let procmem = if jobs.iter().any(|j| !j.readable) {
        Some(ProcMem::open(pid).step(pid, || "opening /proc/PID/mem".into())?)
    } else {
        None
    };
    // Readable runs go in batches read with one process_vm_readv each: a round's or a
    // checkpoint's written pages are often single pages spread all over.
    let mut batches: Vec<&[Job]> = Vec::new();
    let mut i = 0;
    while i < jobs.len() {
        let mut end = i + 1;
        let mut pages = jobs[i].pages;
        while jobs[i].readable
            && end < jobs.len()
            && jobs[end].readable
            && end - i < BATCH_JOBS
            && pages + jobs[end].pages <= CHUNK_PAGES
        {
            pages += jobs[end].pages;
            end += 1;
        }
        batches.push(&jobs[i..end]);
        i = end;
    }
    // A round's copy (the one told what to do with runs gone) is made while the tree runs.
    let workers = match on_fault {
        Some(_) => par::beside_workload(plan.bytes()),
        None => par::workers_for(plan.bytes()),
    };
    par::for_each(
        &batches,
        workers,
        || vec![0u8; BATCH_JOBS * CHUNK_PREFIX + CHUNK_PAGES * PAGE_SIZE as usize],
        |buf, batch| {
            // Each run's pages right after room for its chunk's header.
            let mut slots: Vec<&mut [u8]> = Vec::with_capacity(batch.len());
            let mut rest = &mut buf[..];
            for j in batch.iter() {
                let (slot, tail) = rest.split_at_mut(CHUNK_PREFIX + j.pages * PAGE_SIZE as usize);
                slots.push(slot);
                rest = tail;
            }
            let read = match &procmem {
                Some(m) if !batch[0].readable => {
                    m.read(batch[0].addr, &mut slots[0][CHUNK_PREFIX..])
                }
                _ => {
                    let ranges: Vec<(u64, usize)> = batch
                        .iter()
                        .map(|j| (j.addr, j.pages * PAGE_SIZE as usize))
                        .collect();
                    let mut datas: Vec<&mut [u8]> =
                        slots.iter_mut().map(|s| &mut s[CHUNK_PREFIX..]).collect();
                    read_remote_scattered(pid, &ranges, &mut datas)
                }
            };
            if let Err(e) = read {
                let Some(skip) = on_fault else {
                    return Err(e).step(pid, || {
                        format!(
                            "reading memory at {:#x} ({} runs)",
                            batch[0].addr,
                            batch.len()
                        )
                    });
                };
                // Run by run, to keep what can be read and skip what went away.
                for (j, slot) in batch.iter().zip(slots.iter_mut()) {
                    match read_remote(pid, j.addr, &mut slot[CHUNK_PREFIX..]) {
                        Ok(()) => w
                            .write_chunk(owner, j.addr, slot)
                            .map_err(|source| DumpError::Image { pid: raw, source })?,
                        Err(_) => skip(j)?,
                    }
                }
                return Ok(());
            }
            for (j, slot) in batch.iter().zip(slots.iter_mut()) {
                w.write_chunk(owner, j.addr, slot)
                    .map_err(|source| DumpError::Image { pid: raw, source })?;
            }
            Ok(())
        },
    )
}

/// Where to read a shared memory object from: a path that opens it.
struct Source {
    pid: Pid,
    ino: u64,
    path: String,
    /// The memfd name, for memfds.
    memfd: Option<String>,
}

/// The memfd name in a `/memfd:NAME (deleted)` link or maps path.
fn memfd_name(path: &str) -> String {
    path.trim_start_matches("/memfd:")
        .trim_end_matches(" (deleted)")
        .to_string()
}

/// Dumps every shared memory object of the tree once (anonymous shared memory and
/// memfds, mapped or only open), from the object itself, so pages no process has
/// mapped right now are kept too. Chunks are owned by `-1 - index`.
pub fn dump_shared_memory(procs: &[ProcessImage], w: &ImageWriter) -> Result<Vec<ShmemObject>> {
    let mut sources: Vec<Source> = Vec::new();
    for p in procs {
        let pid = Pid::from_raw(p.pid);
        for v in &p.mm.vmas {
            let (ino, memfd) = match v.kind {
                VmaKind::SharedAnonymous { shmem } => (shmem, None),
                VmaKind::Memfd { ino } => (ino, Some(String::new())),
                _ => continue,
            };
            let path = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
            let memfd =
                memfd.map(|_| memfd_name(&kext_shim::procfs::read_link(&path).unwrap_or_default()));
            sources.push(Source {
                pid,
                ino,
                path,
                memfd,
            });
        }
        for e in &p.fds {
            if let FdKind::Memfd { ino, .. } = e.kind {
                let path = format!("/proc/{pid}/fd/{}", e.fd);
                let name = memfd_name(&kext_shim::procfs::read_link(&path).unwrap_or_default());
                sources.push(Source {
                    pid,
                    ino,
                    path,
                    memfd: Some(name),
                });
            }
        }
    }
    let mut objects: Vec<ShmemObject> = Vec::new();
    if sources.is_empty() {
        // No MiB of buffer to map and unmap in the blackout for nothing.
        return Ok(objects);
    }
    let mut buf = vec![0u8; CHUNK_PREFIX + CHUNK_PAGES * PAGE_SIZE as usize];
    for src in &sources {
        if objects.iter().any(|o| o.ino == src.ino) {
            continue;
        }
        let (pid, link) = (src.pid, &src.path);
        let file = std::fs::File::open(link)
            .map_err(|e| kext_shim::Error::io(link, e))
            .step(pid, || format!("opening shared memory {link}"))?;
        let size = file
            .metadata()
            .map_err(|e| kext_shim::Error::io(link, e))
            .step(pid, || "stat of shared memory".into())?
            .len();
        let memfd = match &src.memfd {
            None => None,
            Some(name) => {
                let seals = nix::fcntl::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    nix::fcntl::FcntlArg::F_GET_SEALS,
                )
                .map_err(|e| kext_shim::SysError::new(format!("F_GET_SEALS on {link}"), e).into())
                .step(pid, || "reading memfd seals".into())?;
                Some(Memfd {
                    name: name.clone(),
                    seals: seals as u32,
                })
            }
        };
        let owner = -1 - objects.len() as i32;
        objects.push(ShmemObject {
            ino: src.ino,
            size,
            memfd,
            sysv: None,
        });
        let ranges =
            data_ranges(&file, size).step(pid, || format!("finding the data of {link}"))?;
        for (start, end) in ranges {
            let (start, end) = (
                start & !(PAGE_SIZE - 1),
                (end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1),
            );
            let mut at = start;
            while at < end {
                let len = (end - at).min(CHUNK_PAGES as u64 * PAGE_SIZE) as usize;
                let b = &mut buf[..CHUNK_PREFIX + len];
                // The last page may run past the end of a memfd: the rest reads as zeros.
                let data = &mut b[CHUNK_PREFIX..];
                data.fill(0);
                let want = ((size.saturating_sub(at)) as usize).min(len);
                file.read_exact_at(&mut data[..want], at)
                    .map_err(|e| kext_shim::Error::io(link, e))
                    .step(pid, || format!("reading shared memory at offset {at:#x}"))?;
                w.write_chunk(owner, at, b)
                    .map_err(|source| DumpError::Image {
                        pid: pid.as_raw(),
                        source,
                    })?;
                at += len as u64;
            }
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn anon(start: u64, pages: u64) -> Vma {
        Vma {
            start,
            end: start + pages * P,
            prot: libc::PROT_READ | libc::PROT_WRITE,
            shared: false,
            kind: VmaKind::Anonymous,
            offset: 0,
            advice: VmaAdvice::default(),
        }
    }

    fn mm_of(vmas: Vec<Vma>) -> MmImage {
        MmImage {
            vmas,
            fields: MmFields::default(),
            auxv: vec![],
            exe: FileRef {
                path: "/bin/x".into(),
                identity: Default::default(),
            },
            files: vec![],
            parent: None,
        }
    }

    #[test]
    fn post_copy_leaves_only_cold_pages_of_large_areas_to_first_touch() {
        let (big, small, stack) = (
            anon(0x10_0000, 1024),
            anon(0x100_0000, 16),
            anon(0x7f00_0000_0000, 512),
        );
        let mm = mm_of(vec![big.clone(), small.clone(), stack.clone()]);
        let page = |v: &Vma, i: u64| (v.start + i * P, v.start + (i + 1) * P);
        let written = |v: &Vma| -> Result<Option<Vec<(u64, u64)>>> {
            Ok(Some(match v.start {
                s if s == big.start => vec![page(&big, 1), page(&big, 10)],
                s if s == small.start => vec![page(&small, 0)],
                _ => vec![page(&stack, 100), page(&stack, 300)],
            }))
        };
        let mut plan = plan_written(&mm, &written).unwrap();
        let sp = stack.start + 100 * P + 0x80;
        // Page 10 of the big area was written in the last round too.
        let lazy = plan.take_lazy(&mm, &[sp], &[page(&big, 10)]);
        assert_eq!(lazy, vec![(big.start + P, 1), (stack.start + 300 * P, 1)]);
        let eager: Vec<u64> = plan.jobs.iter().map(|j| j.addr).collect();
        assert_eq!(
            eager,
            vec![big.start + 10 * P, small.start, stack.start + 100 * P]
        );
    }

    #[test]
    fn a_workload_rewriting_much_has_no_hot_pages() {
        let big = anon(0x10_0000, 4096);
        let mm = mm_of(vec![big.clone()]);
        // Every other page written, in the last round and since.
        let runs: Vec<(u64, u64)> = (0..4096)
            .step_by(2)
            .map(|i| (big.start + i * P, big.start + (i + 1) * P))
            .collect();
        let written = |_: &Vma| -> Result<Option<Vec<(u64, u64)>>> { Ok(Some(runs.clone())) };
        let mut plan = plan_written(&mm, &written).unwrap();
        let lazy = plan.take_lazy(&mm, &[], &runs);
        assert_eq!(lazy.len(), 2048, "all of them left to first touch");
        assert!(plan.jobs.is_empty());
    }
}
