//! Warm restore: a migration's destination makes the tree from the first pre-copy round
//! and fills its memory as the rounds arrive, so that the blackout has only the last
//! round's pages and the state that is not memory left to do.
//!
//! What a round can carry is private anonymous memory, whose every write the source
//! tracks: a VMA there at the same place round after round keeps its pages, and gets
//! only those written since (and loses those dropped since). Everything else (file
//! mappings, shared memory, fds, signals, credentials, threads, registers) is made at
//! the end from the checkpoint, as a cold restore makes it.
//!
//! The stubs get no fds while warm: the files are opened only from the checkpoint. Each
//! stub keeps a pidfd of ours instead, inherited at its birth, and takes the files from
//! us with pidfd_getfd at the numbers we hold them at, as if it had inherited them.
//!
//! A tree that changed shape meanwhile (a process more or less, a new session, other
//! namespaces) is not warm any more: it is killed and the checkpoint restored cold.

use super::build::{self, Ctx, Later, SCRATCH_PAGES};
use super::files::FdNumbers;
use super::memory::{self, fill, map_vma, Scope};
use super::shared::{Backing, Placement};
use super::stub::Stub;
use super::{
    check_tree, open_netns, restore_root, spawn_tree, RestoreError, RestoreOptions, Result,
    StepContext, Tree,
};
use crate::image::Image;
use crate::model::{MountNs, ProcessImage, Snapshot, Vma, VmaKind};
use kext_shim::inject::Injector;
use kext_shim::mem::ProcMem;
use kext_shim::{procfs, Pid, PAGE_SIZE};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A tree being built ahead of its checkpoint. Dropped, it kills every process of it.
pub struct WarmTree {
    shape: Shape,
    /// Ours, at the same number in every stub (see the module's comment).
    pidfd: OwnedFd,
    init: Option<(Stub, Injector)>,
    procs: Vec<WarmProc>,
    /// The image whose memory the tree holds now.
    holds: u64,
    /// Rounds applied, pages written, and how long it took, in all.
    pub rounds: u32,
    pub pages: u64,
    pub busy: Duration,
}

/// One process of the tree: a stub emptied of our memory, holding a scratch page and
/// the private anonymous VMAs of the last round.
pub(super) struct WarmProc {
    stub: Stub,
    vpid: i32,
    scratch: u64,
    /// Through its scratch page; out while a `Ctx` has it.
    inj: Option<Injector>,
    anon: Vec<Vma>,
    /// Runs of pages a round left in the source that were unmapped there when read.
    gone: u64,
    /// Where its vDSO parts went (they cannot move again).
    vdso: Vec<(VmaKind, u64)>,
}

/// What a tree was made with, and so what it cannot change without being made again.
#[derive(Debug, PartialEq)]
struct Shape {
    /// pid, ppid, pgid, sid, root.
    procs: Vec<(i32, i32, i32, i32, String)>,
    uts: Option<(String, String)>,
    ipc: bool,
    pid: bool,
    mnt: Option<MountNs>,
}

impl Shape {
    /// What of `self` is not as `then` was, for the operator.
    fn differs(&self, then: &Shape) -> Option<String> {
        if self.procs != then.procs {
            let ids = |s: &Shape| {
                s.procs
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            return Some(format!("processes {} were {}", ids(self), ids(then)));
        }
        if self.uts != then.uts {
            return Some("its host name".into());
        }
        if (self.ipc, self.pid) != (then.ipc, then.pid) {
            return Some("its ipc or pid namespace".into());
        }
        if self.mnt != then.mnt {
            return Some(format!("its mounts {:?} were {:?}", self.mnt, then.mnt));
        }
        None
    }

    fn of(snap: &Snapshot) -> Shape {
        let ns = &snap.processes[0].namespaces;
        Shape {
            procs: snap
                .processes
                .iter()
                .map(|p| (p.pid, p.ppid, p.pgid, p.sid, p.root.clone()))
                .collect(),
            uts: ns.uts.clone(),
            ipc: ns.ipc.is_some(),
            pid: ns.pid,
            mnt: ns.mnt.clone(),
        }
    }
}

fn not_warm(snap: &Snapshot, why: impl Into<String>) -> RestoreError {
    RestoreError::Incompatible {
        pid: snap.inventory.root_pid,
        what: format!("cannot restore warm: {}", why.into()),
    }
}

/// Why a tree cannot be kept warm at all, if it cannot.
fn unwarmable(snap: &Snapshot) -> Option<String> {
    if !snap.zombies.is_empty() {
        // Zombies are forked by their parents, which are no longer copies of us.
        return Some("the tree has zombies".into());
    }
    if !snap.shmem.is_empty()
        || snap.processes.iter().any(|p| {
            p.mm.vmas
                .iter()
                .any(|v| matches!(v.kind, VmaKind::SharedAnonymous { .. }))
        })
    {
        // Shared anonymous memory reaches the stubs by inheritance at their birth.
        return Some("the tree shares anonymous memory".into());
    }
    None
}

impl WarmTree {
    /// Makes the tree of the first round `chain[0]` (whose parents follow it, if it has
    /// any) and fills its memory.
    pub fn start(opts: &RestoreOptions, chain: &[&Image]) -> Result<WarmTree> {
        let t = Instant::now();
        let snap = &chain[0].snapshot;
        check_tree(snap)?;
        if let Some(why) = unwarmable(snap) {
            return Err(not_warm(snap, why));
        }
        let p0 = &snap.processes[0];
        memory::check_vdso_layout(p0)?;
        let pidfd = kext_shim::pidfd::pidfd_open(Pid::this())
            .step(p0.pid, || "opening a pidfd of ours for the stubs".into())?;
        let root = restore_root(opts, snap)?;
        let netns = open_netns(opts, p0.pid)?;
        let Tree {
            mut init, stubs, ..
        } = spawn_tree(opts, snap, &root, None, netns.as_ref())?;
        drop(netns);
        if let Some((init, inj)) = init.as_mut() {
            // It needs none of ours: the tree's files come to the tree only.
            inj.call(
                libc::SYS_close_range,
                [0, u32::MAX as u64, 0, 0, 0, 0],
                || "close_range of every fd".into(),
            )
            .step(init.pid.as_raw(), || {
                "closing the fds the namespace init inherited".into()
            })?;
        }
        let mut procs = Vec::with_capacity(stubs.len());
        let keep = pidfd.as_raw_fd() as u64;
        for (stub, p) in stubs.into_iter().zip(&snap.processes) {
            let mut steps = Vec::new();
            let mut cx = build::start(&stub, p.pid, &mut steps)?;
            let below = (keep > 0).then(|| (0, keep - 1));
            for (from, to) in below.into_iter().chain([(keep + 1, u32::MAX as u64)]) {
                cx.call(libc::SYS_close_range, [from, to, 0, 0, 0, 0], || {
                    "close_range of the fds it inherited".into()
                })?;
            }
            let scratch = build::clear_space(&mut cx, p, &Vec::new())?;
            let inj = Some(cx.inj);
            procs.push(WarmProc {
                stub,
                vpid: p.pid,
                scratch,
                inj,
                anon: Vec::new(),
                gone: 0,
                vdso: vdso_of(p),
            });
        }
        let mut tree = WarmTree {
            shape: Shape::of(snap),
            pidfd,
            init,
            procs,
            holds: 0,
            rounds: 0,
            pages: 0,
            busy: t.elapsed(),
        };
        tree.apply(chain)?;
        Ok(tree)
    }

    /// Brings the tree's memory to that of the round `chain[0]` (its parents after it).
    pub fn apply(&mut self, chain: &[&Image]) -> Result<u64> {
        let t = Instant::now();
        let snap = &chain[0].snapshot;
        if let Some(what) = Shape::of(snap).differs(&self.shape) {
            return Err(not_warm(
                snap,
                format!("the tree changed shape since the first round ({what})"),
            ));
        }
        let continues = chain
            .get(1)
            .is_some_and(|parent| parent.snapshot.inventory.image_id == self.holds);
        let mut pages = 0;
        for (w, p) in self.procs.iter_mut().zip(&snap.processes) {
            let mut steps = Vec::new();
            let mut cx = w.ctx(&mut steps)?;
            let r = update(&mut cx, w, p, chain, continues, None);
            w.inj = Some(cx.inj);
            pages += r?;
        }
        self.holds = snap.inventory.image_id;
        self.rounds += 1;
        self.pages += pages;
        self.busy += t.elapsed();
        Ok(pages)
    }

    /// Whether the checkpoint `snap` can be finished on this tree; why not, if not.
    pub(super) fn fits(
        &self,
        snap: &Snapshot,
        numbers: &[FdNumbers],
        placement: &Placement,
    ) -> std::result::Result<(), String> {
        if let Some(why) = unwarmable(snap) {
            return Err(why);
        }
        if let Some(what) = Shape::of(snap).differs(&self.shape) {
            return Err(format!(
                "the tree changed shape since the first round ({what})"
            ));
        }
        if placement
            .iter()
            .any(|p| matches!(p.at, Backing::Region { .. }))
        {
            return Err("the tree shares anonymous memory".into());
        }
        if numbers.iter().any(|n| n.ctty.is_some()) {
            // A terminal is taken before the session's other processes are forked.
            return Err("a session of the tree has a controlling terminal".into());
        }
        for (w, p) in self.procs.iter().zip(&snap.processes) {
            if vdso_of(p) != w.vdso {
                return Err(format!("pid {} moved its vDSO", p.pid));
            }
        }
        Ok(())
    }

    /// Runs of pages a round left in the source that were unmapped there by the time
    /// they were read, in all rounds (the next round said what is there).
    pub fn gone_from_source(&self) -> u64 {
        self.procs.iter().map(|p| p.gone).sum()
    }

    pub(super) fn into_parts(self) -> (Option<(Stub, Injector)>, Vec<WarmProc>, OwnedFd, u64) {
        (self.init, self.procs, self.pidfd, self.holds)
    }
}

impl WarmProc {
    pub(super) fn pid(&self) -> Pid {
        self.stub.pid
    }

    fn ctx<'a>(&mut self, steps: &'a mut Vec<(&'static str, Duration)>) -> Result<Ctx<'a>> {
        let raw = self.stub.pid.as_raw();
        let inj = self.inj.take().ok_or_else(|| RestoreError::Aborted {
            pid: self.vpid,
            why: "a step of the warm tree failed before".into(),
        })?;
        Ok(Ctx {
            pid: raw,
            vpid: self.vpid,
            inj,
            others: Vec::new(),
            data: self.scratch + PAGE_SIZE,
            mem: ProcMem::open(self.stub.pid).step(raw, || "opening /proc/PID/mem".into())?,
            steps,
        })
    }

    /// Finishes the process from its checkpoint `chain[0]`: our files taken in (`ours`,
    /// by their numbers here), memory brought up to date and the rest mapped, then
    /// everything that is not memory. Returns the stub and its threads.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        mut self,
        p: &ProcessImage,
        chain: &[&Image],
        continues: bool,
        fds: &FdNumbers,
        shared: &Placement,
        pidfd: i32,
        ours: &[i32],
        lazy: Option<&super::lazy::LazyRestore>,
        steps: &mut Vec<(&'static str, Duration)>,
        pages: &mut u64,
    ) -> Result<(Stub, Vec<Pid>)> {
        let mut cx = self.ctx(steps)?;
        cx.timed("take the files", |cx| take_files(cx, pidfd, ours))?;
        *pages = cx.timed("bring memory up to date", |cx| {
            update(cx, &mut self, p, chain, continues, Some((fds, shared)))
        })?;
        let scratch = self.scratch;
        let threads = build::finish(cx, p, chain[0], fds, scratch, lazy)?;
        Ok((self.stub, threads))
    }
}

/// Our fds `ours` taken into the stub at the same numbers: a pidfd_getfd each, then a
/// dup3 and a close where it landed elsewhere, all in one batch. Where each lands is
/// known beforehand (the lowest free number, and the stub does nothing meanwhile), and
/// checked afterwards.
fn take_files(cx: &mut Ctx, pidfd: i32, ours: &[i32]) -> Result<()> {
    let open = procfs::list_fds(Pid::from_raw(cx.pid)).step(cx.pid, || "listing its fds".into())?;
    let mut calls = Vec::new();
    let mut what = Vec::new();
    let mut expect = Vec::new();
    for (n, got) in landings(&open, ours) {
        expect.push((calls.len(), got));
        calls.push((libc::SYS_pidfd_getfd, [pidfd as u64, n as u64, 0, 0, 0, 0]));
        what.push(format!("pidfd_getfd of our fd {n}"));
        if got != n {
            calls.push((libc::SYS_dup3, [got as u64, n as u64, 0, 0, 0, 0]));
            what.push(format!("dup3 of fd {got} to fd {n}"));
            calls.push((libc::SYS_close, [got as u64, 0, 0, 0, 0, 0]));
            what.push(format!("closing fd {got}"));
        }
    }
    let results = cx.batch_results(&calls, |i| what[i].clone())?;
    for (i, got) in expect {
        if results[i] != got as u64 {
            return Err(RestoreError::Kernel {
                pid: cx.pid,
                step: "taking our files in".into(),
                source: kext_shim::Error::Unexpected {
                    pid: cx.pid,
                    what: format!(
                        "{} landed on fd {}, not on fd {got}: its fds changed meanwhile",
                        what[i], results[i]
                    ),
                },
            });
        }
    }
    Ok(())
}

/// For each fd of `ours` in turn, where pidfd_getfd puts it in a process whose fds are
/// `open`: the lowest number free then. A copy that lands elsewhere is moved to its
/// number, which frees the place it landed on.
fn landings(open: &[i32], ours: &[i32]) -> Vec<(i32, i32)> {
    let mut used: std::collections::BTreeSet<i32> = open.iter().copied().collect();
    let mut out = Vec::with_capacity(ours.len());
    for &n in ours {
        let got = (0..).find(|f| !used.contains(f)).expect("a free fd number");
        used.insert(n);
        out.push((n, got));
    }
    out
}

fn vdso_of(p: &ProcessImage) -> Vec<(VmaKind, u64)> {
    p.mm.vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .map(|v| (v.kind, v.start))
        .collect()
}

/// Brings one process's private anonymous memory to that of `chain[0]`: a VMA it holds
/// at the same place keeps its pages (`continues`: they are those of `chain[1]`) and
/// gets those written since; any other is made again and filled from the whole chain.
/// With `rest` (the checkpoint's files and shared objects), every other VMA is mapped
/// and filled too.
fn update(
    cx: &mut Ctx,
    w: &mut WarmProc,
    p: &ProcessImage,
    chain: &[&Image],
    continues: bool,
    rest: Option<(&FdNumbers, &Placement)>,
) -> Result<u64> {
    let image = chain[0];
    let scratch_len = SCRATCH_PAGES * PAGE_SIZE;
    if p.mm
        .vmas
        .iter()
        .any(|v| v.start < w.scratch + scratch_len && w.scratch < v.end)
    {
        // The process maps something where our scratch page is: it moves.
        let pid = Pid::from_raw(cx.pid);
        let mut used: Vec<(u64, u64)> = procfs::read_layout(pid)
            .step(cx.pid, || "reading its maps".into())?
            .iter()
            .map(|m| (m.start, m.end))
            .collect();
        used.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
        let old = w.scratch;
        w.scratch = build::new_scratch(cx, &used)?;
        cx.inj
            .munmap(old, scratch_len)
            .step(cx.pid, || "unmapping the old scratch page".into())?;
    }
    let same = |a: &Vma, b: &Vma| {
        (a.start, a.end, a.advice.grows_down) == (b.start, b.end, b.advice.grows_down)
    };
    let want: Vec<&Vma> = p.mm.vmas.iter().filter(|v| v.private_anonymous()).collect();
    for a in &w.anon {
        if !(continues && want.iter().any(|v| same(a, v))) {
            cx.inj
                .munmap(a.start, a.len())
                .step(cx.pid, || format!("unmapping {:#x}-{:#x}", a.start, a.end))?;
        }
    }
    let none = FdNumbers::default();
    let mut later = Later::default();
    let mut fresh: Vec<(u64, u64)> = Vec::new();
    for v in &want {
        let held = w.anon.iter().find(|a| continues && same(a, v));
        let Some(a) = held else {
            map_vma(cx, v, &none, &Vec::new(), &mut later)?;
            fresh.push((v.start, v.end));
            continue;
        };
        if a.prot != v.prot {
            later.push(
                libc::SYS_mprotect,
                [v.start, v.len(), v.prot as u64, 0, 0, 0],
                format!("protecting {:#x}-{:#x}", v.start, v.end),
            );
        }
        if rest.is_some() {
            // A round's VMAs carry no advice; the checkpoint's do.
            memory::advise(v, &mut later);
        }
        for (s, e) in memory::dropped_since(p, image, v) {
            later.push(
                libc::SYS_madvise,
                [s, e - s, libc::MADV_DONTNEED as u64, 0, 0, 0],
                format!("dropping pages {s:#x}-{e:#x}, dropped since"),
            );
        }
    }
    let newest: Option<Vec<(u64, u64)>> = match rest {
        Some((fds, shared)) => {
            for v in p.mm.vmas.iter().filter(|v| !v.private_anonymous()) {
                map_vma(cx, v, fds, shared, &mut later)?;
                fresh.push((v.start, v.end));
            }
            None
        }
        // Only what this tree holds: the rest waits for the checkpoint.
        None => Some(want.iter().map(|v| (v.start, v.end)).collect()),
    };
    cx.run(&mut later)?;
    fresh.sort_unstable();
    let filled = fill(
        cx,
        p,
        chain,
        Scope {
            newest: newest.as_deref(),
            older: Some(&fresh),
            // The last image's pages are those of a frozen source: all must be there.
            source_runs: rest.is_none(),
        },
    )?;
    // What the pages there should be comes with the next round: a run unmapped in the
    // source (or moved) since took its VMA's write tracking along (mremap drops the
    // registration too), so whatever is at that place at the next round is new to the
    // tracking and sent whole, or is no VMA and is unmapped here.
    if !filled.gone.is_empty() {
        tracing::debug!(
            pid = p.pid,
            runs = filled.gone.len(),
            "pages unmapped in the source since their round"
        );
    }
    w.gone += filled.gone.len() as u64;
    w.anon = want.into_iter().cloned().collect();
    Ok(filled.pages)
}

#[cfg(test)]
mod tests {
    use super::landings;

    #[test]
    fn each_fd_taken_lands_on_the_lowest_free_number_and_frees_it_when_moved() {
        // The stub holds our pidfd at 5; we hand it 0, 1, 2, 11 and 3.
        assert_eq!(
            landings(&[5], &[0, 1, 2, 11, 3]),
            vec![(0, 0), (1, 1), (2, 2), (11, 3), (3, 3)]
        );
        // Numbers it holds already are skipped; a move onto one of them replaces it.
        assert_eq!(landings(&[0, 1], &[1, 4]), vec![(1, 2), (4, 2)]);
        assert_eq!(landings(&[], &[]), vec![]);
    }
}
