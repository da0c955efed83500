//! A tree in a pid namespace of its own is written as it sees itself: every pid, group
//! and session in the image is its number in that namespace, which a restore into a new
//! one gives back.

use super::{Result, StepContext};
use crate::model::{ProcessImage, PtyImage, ZombieImage};
use kext_shim::procfs::Status;
use kext_shim::Pid;
use std::collections::HashMap;

/// Pids as we see them, mapped to what the tree sees.
pub struct PidView {
    pids: HashMap<i32, i32>,
    /// (group, session) of each process and zombie, as the tree sees them (0: outside).
    ids: HashMap<i32, (i32, i32)>,
}

/// The last (innermost) number of a `NS*:` status line.
fn inner(st: &Status, key: &'static str, pid: Pid) -> Result<i32> {
    let v = st
        .numbers(key)
        .step(pid, || format!("reading {key} from its status"))?;
    Ok(v.last().copied().unwrap_or(0) as i32)
}

impl PidView {
    pub fn read(procs: &[ProcessImage], zombies: &[ZombieImage]) -> Result<PidView> {
        let mut view = PidView {
            pids: HashMap::new(),
            ids: HashMap::new(),
        };
        let leaders = procs
            .iter()
            .map(|p| p.pid)
            .chain(zombies.iter().map(|z| z.pid));
        for pid in leaders {
            let at = Pid::from_raw(pid);
            let st = Status::read(at).step(at, || "reading its status".into())?;
            view.pids.insert(pid, inner(&st, "NSpid", at)?);
            let ids = (inner(&st, "NSpgid", at)?, inner(&st, "NSsid", at)?);
            view.ids.insert(pid, ids);
        }
        for p in procs {
            for t in p.threads.iter().skip(1) {
                let at = Pid::from_raw(t.tid);
                let st = Status::read(at).step(at, || "reading its status".into())?;
                view.pids.insert(t.tid, inner(&st, "NSpid", at)?);
            }
        }
        Ok(view)
    }

    /// The number the tree sees for `pid`, which is ours.
    pub fn pid(&self, pid: i32) -> i32 {
        self.pids.get(&pid).copied().unwrap_or(0)
    }

    /// Rewrites every pid of the description in the tree's numbers. A parent outside
    /// the tree (the root's) is 0, as the namespace sees it.
    pub fn translate(
        &self,
        procs: &mut [ProcessImage],
        zombies: &mut [ZombieImage],
        ptys: &mut [PtyImage],
    ) {
        for t in ptys.iter_mut() {
            if let Some((leader, fg)) = &mut t.session {
                *leader = self.pid(*leader);
                *fg = self.pid(*fg);
            }
        }
        for p in procs.iter_mut() {
            (p.pgid, p.sid) = self.ids[&p.pid];
            p.pid = self.pid(p.pid);
            p.ppid = self.pid(p.ppid);
            for t in &mut p.threads {
                t.tid = self.pid(t.tid);
            }
            for t in &mut p.posix_timers {
                if t.tid != 0 {
                    t.tid = self.pid(t.tid);
                }
            }
        }
        for z in zombies.iter_mut() {
            (z.pgid, z.sid) = self.ids[&z.pid];
            z.pid = self.pid(z.pid);
            z.ppid = self.pid(z.ppid);
        }
    }
}
