//! Where a checkpoint takes each VMA's flags from, without walking page tables while
//! the tree is frozen.
//!
//! A checkpoint needs each VMA's VmFlags (growing down, madvise flags, VM_IO), which
//! /proc/PID/maps leaves out; /proc/PID/smaps has them but walks every page table:
//! 16-18 ms for 1 GiB here, inside the freeze (and inside a migration's blackout).
//!
//! First choice, [`kext_shim::vmaiter`]: a BPF iterator reads the flags from the
//! kernel's VMAs themselves, in microseconds whatever the size (75 us against 16.6 ms
//! for smaps at 1 GiB, `cargo bench --bench vma_flags`), exact at the moment of the
//! freeze. It needs CAP_BPF and CAP_PERFMON and a kernel whose flag bits it knows.
//!
//! Without it a migration reads smaps while the tree still runs, and the checkpoint
//! takes the flags from there for every VMA still the same (same range, permissions,
//! offset and file); a process with any other VMA has its smaps read after all. A flag
//! changed in between without changing the layout (an madvise over a whole VMA) would
//! go unseen, so the flags are confirmed from smaps once more, on threads started once
//! the checkpoint's parasite is gone (a smaps walk holds the mmap lock the parasite's
//! mmap waits for), while the pages are copied, sent and restored: a difference
//! abandons the migration before its commit point.

use kext_shim::procfs::{self, MapEntry};
use kext_shim::vmaiter::VmaIter;
use kext_shim::Pid;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// The BPF reader of VMA flags, loaded (and checked) on first use: called before a
/// freeze, so that its loading is not part of one. None says to use smaps.
pub fn fast() -> Option<&'static VmaIter> {
    if crate::fault::armed(crate::fault::VMA_ITER_UNAVAILABLE) {
        return None;
    }
    match kext_shim::vmaiter::shared() {
        Ok(it) => Some(it),
        Err(why) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| tracing::info!("VMA flags come from smaps: {why}"));
            None
        }
    }
}

/// The VMAs of frozen `pid` with their flags: from the BPF reader, else from what was
/// read `ahead`, else from its smaps.
pub fn maps_of(pid: Pid, ahead: Option<&VmFlagsAhead>) -> kext_shim::Result<Vec<MapEntry>> {
    if let Some(it) = fast() {
        match it.maps(pid) {
            Ok(m) => return Ok(m),
            // A leader that exited before its threads has no VMAs to list, say.
            Err(e) => tracing::debug!(pid = pid.as_raw(), "VMA flags from smaps: {e}"),
        }
    }
    match ahead {
        Some(a) => a.maps_of(pid),
        None => procfs::read_maps(pid),
    }
}

/// Each process's smaps, read ahead of the freeze.
#[derive(Debug, Default)]
pub struct VmFlagsAhead {
    read: BTreeMap<i32, Vec<MapEntry>>,
    /// The layouts the checkpoint took with flags from here, to confirm.
    used: Mutex<Vec<(i32, Vec<MapEntry>)>>,
    /// The confirmations under way.
    checks: Mutex<Vec<JoinHandle<Result<(), String>>>>,
}

/// Everything but what smaps alone tells.
fn same_vma(a: &MapEntry, b: &MapEntry) -> bool {
    (
        a.start, a.end, a.read, a.write, a.exec, a.shared, a.offset, a.inode,
    ) == (
        b.start, b.end, b.read, b.write, b.exec, b.shared, b.offset, b.inode,
    ) && (a.dev_major, a.dev_minor, &a.path) == (b.dev_major, b.dev_minor, &b.path)
}

/// The entry of `list` (in address order, as /proc lists them) that is the same VMA
/// as `m`: a binary search, since this runs inside the blackout for every VMA.
fn find_same<'a>(list: &'a [MapEntry], m: &MapEntry) -> Option<&'a MapEntry> {
    let i = list.binary_search_by_key(&m.start, |a| a.start).ok()?;
    Some(&list[i]).filter(|a| same_vma(a, m))
}

impl VmFlagsAhead {
    /// Reads the smaps of `pids` (host pids) as they run. One that cannot be read is
    /// left out: its checkpoint reads its own.
    pub fn read(pids: &[Pid]) -> Self {
        let read = pids
            .iter()
            .filter_map(|&p| procfs::read_maps(p).ok().map(|m| (p.as_raw(), m)))
            .collect();
        Self {
            read,
            used: Mutex::default(),
            checks: Mutex::default(),
        }
    }

    /// The VMAs of frozen `pid` with their flags: from its maps and the flags read
    /// ahead when every VMA is still the same, else from its smaps.
    pub fn maps_of(&self, pid: Pid) -> kext_shim::Result<Vec<MapEntry>> {
        if let Some(ahead) = self.read.get(&pid.as_raw()) {
            let mut layout = procfs::read_layout(pid)?;
            let found = layout.iter_mut().all(|m| match find_same(ahead, m) {
                Some(a) => {
                    m.flags = a.flags.clone();
                    m.anon_huge_kb = a.anon_huge_kb;
                    true
                }
                None => false,
            });
            if found {
                self.used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((pid.as_raw(), layout.clone()));
                return Ok(layout);
            }
        }
        procfs::read_maps(pid)
    }

    /// Starts confirming the flags taken from here, each process on a thread of its
    /// own; the tree must stay frozen until [`confirm`](Self::confirm) returns.
    pub fn start_confirming(&self) {
        let used = std::mem::take(&mut *self.used.lock().unwrap_or_else(|e| e.into_inner()));
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        for (pid, layout) in used {
            checks.push(std::thread::spawn(move || confirm(pid, &layout)));
        }
    }

    /// Waits for every confirmation (the tree must be frozen until then) and says
    /// which VMA's flags changed, if one did.
    pub fn confirm(&self) -> Result<(), String> {
        let checks = std::mem::take(&mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()));
        for c in checks {
            c.join()
                .unwrap_or_else(|_| Err("the check of VMA flags panicked".into()))?;
        }
        Ok(())
    }
}

/// The flags a checkpoint reads (see `mm::collect`); others (`uw`, `ac`...) may
/// differ without harm.
const READ_FLAGS: [&str; 9] = ["gd", "hg", "nh", "dd", "dc", "wf", "mg", "io", "pf"];

/// Reads the smaps of frozen `pid` again and compares the flags of every VMA of `used`
/// (the layout its checkpoint took) with them. VMAs the checkpoint maps in it for a
/// moment (its parasite's) are not the process's and are passed over.
fn confirm(pid: i32, used: &[MapEntry]) -> Result<(), String> {
    let now = procfs::read_maps(Pid::from_raw(pid))
        .map_err(|e| format!("pid {pid}: reading its smaps again: {e}"))?;
    let read = |m: &MapEntry| READ_FLAGS.map(|f| m.has_flag(f));
    for m in &now {
        let Some(then) = find_same(used, m) else {
            continue;
        };
        if read(then) != read(m) {
            return Err(format!(
                "pid {pid}: the flags of {:#x}-{:#x} changed just before the freeze ({} now)",
                m.start,
                m.end,
                m.flags.join(" ")
            ));
        }
    }
    Ok(())
}
