//! The address space: the stub's own memory goes, the vDSO moves to where the image
//! had it, every VMA is made again and filled, and the mm fields are set.

use super::build::{find_gap, Ctx, Later, SCRATCH_PAGES};
use super::files::FdNumbers;
use super::shared::{Backing, Placement};
use super::source::{Read, SourceMemory};
use super::{RestoreError, Result, StepContext};
use crate::image::pages::CHUNK_PAGES;
use crate::image::{Codec, Image};
use crate::model::{ProcessImage, Vma, VmaKind};
use crate::ranges::{intersect, merge, subtract, union};
use kext_shim::mem::write_remote_ranges;
use kext_shim::procfs::{self, MapEntry};
use kext_shim::{sys, PAGE_SIZE};

/// The three vDSO parts, as (name, kind) in their kernel order.
pub(super) const VDSO_PARTS: [(&str, VmaKind); 3] = [
    ("[vvar]", VmaKind::Vvar),
    ("[vvar_vclock]", VmaKind::VvarVclock),
    ("[vdso]", VmaKind::Vdso),
];

/// Refuses an image whose vDSO does not match this kernel's, before any process exists.
pub(super) fn check_vdso_layout(p: &ProcessImage) -> Result<()> {
    let ours = procfs::read_layout(kext_shim::Pid::this())
        .step(p.pid, || "reading our own maps".into())?;
    for (name, kind) in VDSO_PARTS {
        let theirs = p.mm.vmas.iter().find(|v| v.kind == kind).map(Vma::len);
        let mine = ours.iter().find(|m| m.path == name).map(MapEntry::len);
        if theirs.is_some() && theirs != mine {
            return Err(RestoreError::Incompatible {
                pid: p.pid,
                what: format!(
                    "{name} is {} KiB in the image but {} KiB on this kernel",
                    theirs.unwrap_or(0) / 1024,
                    mine.unwrap_or(0) / 1024
                ),
            });
        }
    }
    Ok(())
}

/// A SysV segment attached where the kernel likes, the part this VMA had moved into
/// place (mremap of a shared mapping with an old size of 0 makes another mapping of the
/// same pages, still an attach of the segment), then the temporary attach dropped. This
/// copes with VMAs split by mprotect or partly unmapped.
fn attach_sysv(cx: &mut Ctx, v: &Vma, id: i32, later: &mut Later) -> Result<()> {
    let flags = if v.writable() { 0 } else { libc::SHM_RDONLY }
        | if v.prot & libc::PROT_EXEC != 0 {
            libc::SHM_EXEC
        } else {
            0
        };
    let at = cx.call(
        libc::SYS_shmat,
        [id as u64, 0, flags as u64, 0, 0, 0],
        || format!("shmat of SysV segment {id}"),
    )?;
    cx.call(
        libc::SYS_mremap,
        [
            at + v.offset,
            0,
            v.len(),
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            v.start,
            0,
        ],
        || format!("placing SysV segment {id} at {:#x}", v.start),
    )?;
    cx.call(libc::SYS_shmdt, [at, 0, 0, 0, 0, 0], || {
        format!("dropping the temporary attach of SysV segment {id}")
    })?;
    let attached = if v.writable() {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    } | (v.prot & libc::PROT_EXEC);
    if v.prot != attached {
        cx.inj
            .mprotect(v.start, v.len(), v.prot)
            .step(cx.pid, || format!("protecting {:#x}-{:#x}", v.start, v.end))?;
    }
    advise(v, later);
    Ok(())
}

/// Unmaps everything the stub inherited from us except the vDSO parts and the shared
/// memory objects prepared for the image.
pub(super) fn teardown(maps: &[MapEntry], shared: &Placement, later: &mut Later) {
    for m in maps {
        if matches!(
            m.path.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
        ) || shared.iter().any(|p| match p.at {
            Backing::Region { base, len } => m.start >= base && m.end <= base + len,
            Backing::Memfd { .. } => false,
        }) {
            continue;
        }
        later.push(
            libc::SYS_munmap,
            [m.start, m.len(), 0, 0, 0, 0],
            format!("unmapping inherited {:#x}-{:#x} {}", m.start, m.end, m.path),
        );
    }
}

/// Moves the stub's vDSO parts to where the image had them (or drops them if it had
/// none). mremap keeps them working: the kernel follows the move.
pub(super) fn move_vdso(
    cx: &mut Ctx,
    maps: &[MapEntry],
    p: &ProcessImage,
    used: &[(u64, u64)],
    scratch: u64,
) -> Result<()> {
    let mut moves = Vec::new();
    for (name, kind) in VDSO_PARTS {
        let Some(m) = maps.iter().find(|m| m.path == name) else {
            continue;
        };
        match p.mm.vmas.iter().find(|v| v.kind == kind) {
            Some(v) if v.start != m.start => moves.push((m.start, v.start, m.len())),
            Some(_) => {}
            None => cx
                .inj
                .munmap(m.start, m.len())
                .step(cx.pid, || format!("unmapping {name}"))?,
        }
    }
    let overlaps = moves.iter().any(|&(_, to, len)| {
        moves
            .iter()
            .any(|&(from, _, l2)| to < from + l2 && from < to + len)
    });
    if overlaps {
        // Park them out of the way first.
        let total: u64 = moves.iter().map(|m| m.2).sum();
        let mut u = used.to_vec();
        u.push((scratch, scratch + SCRATCH_PAGES * PAGE_SIZE));
        let mut park = find_gap(&u, total, 1 << 32).ok_or_else(|| RestoreError::Incompatible {
            pid: cx.pid,
            what: "no room to move the vDSO".into(),
        })?;
        for m in moves.iter_mut() {
            mremap(cx, m.0, park, m.2)?;
            m.0 = park;
            park += m.2;
        }
    }
    for (from, to, len) in moves {
        mremap(cx, from, to, len)?;
    }
    Ok(())
}

pub(super) fn mremap(cx: &mut Ctx, from: u64, to: u64, len: u64) -> Result<()> {
    cx.call(
        libc::SYS_mremap,
        [
            from,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            to,
            0,
        ],
        || format!("mremap vDSO part {from:#x} -> {to:#x}"),
    )?;
    Ok(())
}

/// Maps `v` again. Plain mappings (and their advice) are left in `later`, for one
/// batch; the others run at once, after what `later` held.
pub(super) fn map_vma(
    cx: &mut Ctx,
    v: &Vma,
    fds: &FdNumbers,
    shared: &Placement,
    later: &mut Later,
) -> Result<()> {
    let share = if v.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let grow = if v.advice.grows_down {
        libc::MAP_GROWSDOWN
    } else {
        0
    };
    let (flags, fd, off) = match v.kind {
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock => return Ok(()),
        VmaKind::Anonymous => (share | libc::MAP_ANONYMOUS, -1, 0),
        VmaKind::Memfd { ino } => {
            let fd =
                super::shared::memfd_fd(shared, ino).ok_or_else(|| RestoreError::Incompatible {
                    pid: cx.pid,
                    what: format!("memfd {ino} is missing from the image"),
                })?;
            (share, fd, v.offset)
        }
        VmaKind::SharedAnonymous { shmem } => {
            cx.run(later)?;
            let base = shared
                .iter()
                .find_map(|p| match p.at {
                    Backing::Region { base, .. } if p.ino == shmem => Some(base),
                    _ => None,
                })
                .ok_or_else(|| RestoreError::Incompatible {
                    pid: cx.pid,
                    what: format!("shared memory object {shmem} is missing from the image"),
                })?;
            cx.call(
                libc::SYS_mremap,
                [
                    base + v.offset,
                    0,
                    v.len(),
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    v.start,
                    0,
                ],
                || format!("mapping shared object {shmem} at {:#x}", v.start),
            )?;
            if v.prot != libc::PROT_READ | libc::PROT_WRITE {
                cx.inj
                    .mprotect(v.start, v.len(), v.prot)
                    .step(cx.pid, || format!("protecting {:#x}-{:#x}", v.start, v.end))?;
            }
            advise(v, later);
            return Ok(());
        }
        VmaKind::SysvShm { id } => {
            cx.run(later)?;
            return attach_sysv(cx, v, id, later);
        }
        VmaKind::File(i) => (share, fds.map_fds[i as usize], v.offset),
    };
    let flags = flags | grow | libc::MAP_FIXED_NOREPLACE;
    later.push(
        libc::SYS_mmap,
        [
            v.start,
            v.len(),
            v.prot as u64,
            flags as u64,
            fd as i64 as u64,
            off,
        ],
        format!("recreating mapping {:#x}-{:#x}", v.start, v.end),
    );
    advise(v, later);
    Ok(())
}

/// Re-applies the VMA's madvise flags (in `later`).
pub(super) fn advise(v: &Vma, later: &mut Later) {
    let a = v.advice;
    for (on, advice) in [
        (a.hugepage, libc::MADV_HUGEPAGE),
        (a.no_hugepage, libc::MADV_NOHUGEPAGE),
        (a.dont_dump, libc::MADV_DONTDUMP),
        (a.dont_fork, libc::MADV_DONTFORK),
        (a.wipe_on_fork, libc::MADV_WIPEONFORK),
        (a.mergeable, libc::MADV_MERGEABLE),
    ] {
        if on {
            later.push(
                libc::SYS_madvise,
                [v.start, v.len(), advice as u64, 0, 0, 0],
                format!("madvise({advice}) on {:#x}-{:#x}", v.start, v.end),
            );
        }
    }
}

/// Which pages of a chain to write. A cold restore writes them all; a warm one keeps
/// what an earlier round already put in place.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Scope<'a> {
    /// Where the newest image's own pages go (None: everywhere it has them).
    pub newest: Option<&'a [(u64, u64)]>,
    /// Where the older images' pages go (None: wherever the chain says they hold).
    pub older: Option<&'a [(u64, u64)]>,
    /// The source runs meanwhile (a pre-copy round's pages): pages left in it and
    /// unmapped there since are no error, they are returned as [`Filled::gone`] (the
    /// next round says what is there now); and the copy leaves the workload a core
    /// (see [`crate::par::beside_workload`]).
    pub source_runs: bool,
}

/// What [`fill`] wrote.
#[derive(Debug, Default)]
pub(super) struct Filled {
    pub pages: u64,
    /// Runs of pages it could not read, as they were unmapped in the source since
    /// (see [`Scope::source_runs`]).
    pub gone: Vec<(u64, u64)>,
}

/// Copies the newest image's pages in, and those its parents (`chain[1..]`, parent
/// first) hold for it: each parent's only where every image below it says the pages
/// are the parent's, and where no newer image had the page, so every page is written
/// once, from its newest copy.
pub(super) fn fill(
    cx: &mut Ctx,
    p: &ProcessImage,
    chain: &[&Image],
    scope: Scope,
) -> Result<Filled> {
    let Some((&image, parents)) = chain.split_first() else {
        return Ok(Filled::default());
    };
    let gone = scope.source_runs.then(|| std::sync::Mutex::new(Vec::new()));
    let mut layers: Vec<Layer> = vec![(image, p.pid, scope.newest.map(<[_]>::to_vec))];
    let mut mm = &p.mm;
    let mut allowed: Option<Vec<(u64, u64)>> = None;
    for (&parent, &child) in parents.iter().zip(chain) {
        let Some(pp) = &mm.parent else { break };
        // Narrowed to `older` from the first parent on: a warm update's is a few
        // fresh VMAs, where the chain below is a list of every page a round did not
        // write (150k runs at 4 GiB after a long wait), walked once per parent in the
        // blackout otherwise.
        let next = match (&allowed, scope.older) {
            (None, None) => pp.ranges.clone(),
            (None, Some(o)) => intersect(&pp.ranges, o),
            (Some(a), _) => intersect(a, &pp.ranges),
        };
        if next.is_empty() {
            break;
        }
        let Some(q) = parent.snapshot.processes.iter().find(|q| q.pid == pp.pid) else {
            return Err(RestoreError::Image(crate::image::ImageError::Corrupt {
                path: parent.dir.join("core").display().to_string(),
                offset: 0,
                what: format!(
                    "no pid {}, whose pages {} counts on",
                    pp.pid,
                    child.dir.display()
                ),
            }));
        };
        layers.push((parent, pp.pid, Some(next.clone())));
        allowed = Some(next);
        mm = &q.mm;
    }
    let mut pages = 0;
    // What newer layers wrote, sorted and merged.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (i, (img, owner, allowed)) in layers.iter().enumerate() {
        let mine = img.runs_of(*owner);
        let here = match allowed {
            // The newest image's pages go wherever it is allowed.
            Some(a) if i == 0 => Some(intersect(mine, a)),
            // A parent's where no newer image had them.
            Some(a) => Some(subtract(&intersect(mine, a), &covered)),
            None => None,
        };
        if here.as_ref().is_none_or(|h| !h.is_empty()) {
            pages += fill_layer(cx, p, img, *owner, here.as_deref(), gone.as_ref())?;
        }
        // Each parent's allowed ranges lie within those of the layer before it (from
        // the first parent on): what is covered matters there only, which keeps this
        // short where a chain of thousands of runs meets a few new VMAs.
        covered = match allowed {
            Some(a) if i > 0 => union(&covered, &intersect(mine, a)),
            _ => union(&covered, mine),
        };
    }
    let gone = gone.map_or_else(Vec::new, |g| {
        g.into_inner().unwrap_or_else(|e| e.into_inner())
    });
    Ok(Filled {
        pages,
        gone: merge(gone),
    })
}

/// The pages of `v` that the newest image of a chain says are neither its own nor
/// left to its parent: written since, then dropped, so they must read as zero.
pub(super) fn dropped_since(p: &ProcessImage, image: &Image, v: &Vma) -> Vec<(u64, u64)> {
    let whole = [(v.start, v.end)];
    let mine = intersect(image.runs_of(p.pid), &whole);
    let kept = match &p.mm.parent {
        Some(pp) => union(&mine, &intersect(&pp.ranges, &whole)),
        None => mine,
    };
    subtract(&whole, &kept)
}

/// An image, the pid whose pages there are wanted, and where they may go (None: all).
type Layer<'a> = (&'a Image, i32, Option<Vec<(u64, u64)>>);

/// Copies in the pages `owner` has in `image` (within `allowed`, when given):
/// process_vm_writev where the mapping is writable, /proc/PID/mem (which ignores
/// protections) where it is not, on every core: the cost is the first touch of the new
/// pages, which scales with cores. Pages the image left in the source are read from
/// there, many runs a call; those unmapped there since go to `gone`, if given (a
/// round's, while the workload runs: then on every core but one).
fn fill_layer(
    cx: &mut Ctx,
    p: &ProcessImage,
    image: &Image,
    owner: i32,
    allowed: Option<&[(u64, u64)]>,
    gone: Option<&std::sync::Mutex<Vec<(u64, u64)>>>,
) -> Result<u64> {
    let pid = kext_shim::Pid::from_raw(cx.pid);
    let raw = cx.pid;
    let pieces_of = |addr: u64, end: u64| match allowed {
        None => vec![(addr, end)],
        Some(a) => intersect(&[(addr, end)], a),
    };
    let mut pages = 0u64;
    let mut work: Vec<Work> = Vec::new();
    let mut batch: Vec<(u64, u64)> = Vec::new();
    let mut batch_pages = 0;
    for c in image.chunks_of(owner) {
        let pieces = pieces_of(c.addr, c.addr + c.len_bytes() as u64);
        if pieces.is_empty() {
            continue;
        }
        pages += c.n_pages as u64;
        if c.codec != Codec::InSource {
            work.push(Work::Stored(c));
            continue;
        }
        // A later round's pages are often single ones all over: a few syscalls for
        // a thousand of them, not two each.
        for piece in pieces {
            if batch.len() == kext_shim::mem::MAX_IOV || batch_pages >= CHUNK_PAGES {
                work.push(Work::InSource(std::mem::take(&mut batch)));
                batch_pages = 0;
            }
            batch_pages += ((piece.1 - piece.0) / PAGE_SIZE) as usize;
            batch.push(piece);
        }
    }
    if !batch.is_empty() {
        work.push(Work::InSource(batch));
    }
    // Checked once per layer that has pages there, not for every layer.
    let source = if work.iter().any(|w| matches!(w, Work::InSource(_))) {
        SourceMemory::of(image, owner)?
    } else {
        None
    };
    let mem = &cx.mem;
    let corrupt = |what: String| {
        RestoreError::Image(crate::image::ImageError::Corrupt {
            path: image.dir.join("pages").display().to_string(),
            offset: 0,
            what,
        })
    };
    // Thousands of runs a call, in processes of thousands of VMAs: looked up by halves.
    let mut vmas: Vec<&Vma> = p.mm.vmas.iter().collect();
    vmas.sort_unstable_by_key(|v| v.start);
    let vma_of = |s: u64, e: u64| {
        vmas.get(vmas.partition_point(|v| v.end <= s))
            .filter(|v| v.start <= s && e <= v.end)
            .ok_or_else(|| {
                corrupt(format!(
                    "pages {s:#x}..{e:#x} lie outside pid {}'s VMAs",
                    p.pid
                ))
            })
    };
    let put = |ranges: &[(u64, &[u8])]| -> Result<()> {
        let mut writable = Vec::with_capacity(ranges.len());
        for &(s, piece) in ranges {
            if vma_of(s, s + piece.len() as u64)?.writable() {
                writable.push((s, piece));
            } else {
                mem.write(s, piece)
                    .step(raw, || format!("writing pages at {s:#x}"))?;
            }
        }
        write_remote_ranges(pid, &writable).step(raw, || {
            format!(
                "writing {} runs of pages from {:#x}",
                writable.len(),
                writable.first().map_or(0, |w| w.0)
            )
        })
    };
    let workers = match gone {
        // A round's: the workload runs meanwhile.
        Some(_) => crate::par::beside_workload(pages * PAGE_SIZE),
        None => crate::par::workers_for(pages * PAGE_SIZE),
    };
    crate::par::for_each(
        &work,
        workers,
        || (Vec::new(), Vec::new()),
        |(buf, read), w| {
            let pieces = match w {
                Work::Stored(c) => {
                    let data = c
                        .pages(buf)
                        .map_err(|e| corrupt(format!("chunk at {:#x}: {e}", c.addr)))?;
                    let end = c.addr + c.len_bytes() as u64;
                    let ranges: Vec<(u64, &[u8])> = pieces_of(c.addr, end)
                        .into_iter()
                        .map(|(s, e)| (s, &data[(s - c.addr) as usize..(e - c.addr) as usize]))
                        .collect();
                    return put(&ranges);
                }
                Work::InSource(pieces) => pieces,
            };
            let Some(src) = &source else {
                return Err(corrupt(format!(
                    "pages at {:#x} are left in a source the image does not name",
                    pieces[0].0
                )));
            };
            let lens: Vec<(u64, usize)> =
                pieces.iter().map(|&(s, e)| (s, (e - s) as usize)).collect();
            read.resize(lens.iter().map(|l| l.1).sum(), 0);
            let whole = src.read_many(&lens, read)?;
            let mut ranges: Vec<(u64, &[u8])> = Vec::with_capacity(pieces.len());
            let mut rest = &mut read[..];
            for &(s, len) in &lens {
                let (piece, tail) = rest.split_at_mut(len);
                rest = tail;
                // One run of them could not be read: each is read alone.
                if !whole && src.read(s, piece)? == Read::Gone {
                    let Some(g) = gone else {
                        return Err(RestoreError::Incompatible {
                            pid: p.pid,
                            what: format!(
                                "pages {s:#x}..{:#x} of image {} are no longer mapped in the source",
                                s + len as u64,
                                image.dir.display()
                            ),
                        });
                    };
                    g.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((s, s + len as u64));
                    continue;
                }
                ranges.push((s, piece));
            }
            put(&ranges)
        },
    )?;
    if let Some(src) = &source {
        src.confirm()?;
    }
    Ok(pages)
}

/// What one worker of [`fill_layer`] does at a time.
enum Work<'a> {
    Stored(crate::image::PageChunk<'a>),
    /// Runs of pages to read from the source.
    InSource(Vec<(u64, u64)>),
}

/// PR_SET_MM_MAP: code/data/brk/stack/arg/env bounds, auxv and the exe link at once.
pub(super) fn set_mm(cx: &mut Ctx, p: &ProcessImage, fds: &FdNumbers) -> Result<()> {
    let f = &p.mm.fields;
    let auxv_off = 128u64;
    let auxv: Vec<u8> = p.mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if auxv.len() as u64 + auxv_off > PAGE_SIZE {
        return Err(RestoreError::Incompatible {
            pid: cx.pid,
            what: format!("auxv of {} bytes is too large", auxv.len()),
        });
    }
    let mut b = Vec::with_capacity(auxv_off as usize + auxv.len());
    for w in [
        f.start_code,
        f.end_code,
        f.start_data,
        f.end_data,
        f.start_brk,
        f.brk,
        f.start_stack,
        f.arg_start,
        f.arg_end,
        f.env_start,
        f.env_end,
        cx.data + auxv_off,
    ] {
        b.extend_from_slice(&w.to_ne_bytes());
    }
    b.extend_from_slice(&(auxv.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(fds.exe_fd as u32).to_ne_bytes());
    let size = b.len() as u64;
    b.resize(auxv_off as usize, 0);
    b.extend_from_slice(&auxv);
    let addr = cx.put(&b)?;
    cx.call(
        libc::SYS_prctl,
        [sys::PR_SET_MM, sys::PR_SET_MM_MAP, addr, size, 0, 0],
        || {
            format!(
                "prctl(PR_SET_MM_MAP) with brk {:#x} and exe {}",
                f.brk, p.mm.exe.path
            )
        },
    )?;
    Ok(())
}
