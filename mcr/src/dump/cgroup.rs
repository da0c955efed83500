//! Freezing through cgroup v2: when the tree is alone in its cgroup, `cgroup.freeze`
//! stops every task at once in the kernel, and the seize that follows finds them still.
//! The cgroup is thawed once every thread sits in a ptrace stop, which holds them.

use super::{DumpError, Result};
use kext_shim::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A frozen cgroup; dropped (or thawed) it runs again.
pub struct CgroupFreeze {
    dir: PathBuf,
    frozen: bool,
}

fn err(pid: Pid, step: String, e: std::io::Error, path: &Path) -> DumpError {
    DumpError::Kernel {
        pid: pid.as_raw(),
        step,
        source: kext_shim::Error::io(path.display().to_string(), e),
    }
}

impl CgroupFreeze {
    /// Freezes `dir` and waits until the kernel reports it frozen.
    pub fn freeze(pid: Pid, dir: &Path) -> Result<Self> {
        let knob = dir.join("cgroup.freeze");
        std::fs::write(&knob, "1").map_err(|e| err(pid, "freezing its cgroup".into(), e, &knob))?;
        let f = CgroupFreeze {
            dir: dir.to_path_buf(),
            frozen: true,
        };
        // cgroup.events says "frozen 1" once every task is frozen; poll(POLLPRI) on it
        // wakes late here, so re-read it.
        let events = dir.join("cgroup.events");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&events)
                .map_err(|e| err(pid, "reading cgroup.events".into(), e, &events))?;
            if text.lines().any(|l| l.trim() == "frozen 1") {
                return Ok(f);
            }
            if Instant::now() > deadline {
                return Err(DumpError::Kernel {
                    pid: pid.as_raw(),
                    step: format!("freezing cgroup {}", dir.display()),
                    source: kext_shim::Error::Unexpected {
                        pid: pid.as_raw(),
                        what: "not frozen after 5 s".into(),
                    },
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    pub fn thaw(mut self) -> Result<()> {
        self.frozen = false;
        let knob = self.dir.join("cgroup.freeze");
        std::fs::write(&knob, "0")
            .map_err(|e| err(Pid::from_raw(0), "thawing the cgroup".into(), e, &knob))
    }
}

impl Drop for CgroupFreeze {
    fn drop(&mut self) {
        if self.frozen {
            let knob = self.dir.join("cgroup.freeze");
            if let Err(e) = std::fs::write(&knob, "0") {
                tracing::error!("thawing {}: {e}", knob.display());
            }
        }
    }
}

/// The cgroup v2 directory of `pid`, if it is not the root cgroup and holds nothing but
/// `pid` and its descendants (and no cgroups below it): then freezing it freezes
/// exactly the tree.
pub fn alone_in(pid: Pid, tree: &[Pid]) -> Option<PathBuf> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    if rel == "/" {
        return None;
    }
    let mounts = kext_shim::procfs::read_mountinfo(Pid::this()).ok()?;
    let mount = mounts.iter().find(|m| m.fs_type == "cgroup2")?;
    let dir = Path::new(&mount.mount_point).join(rel.trim_start_matches('/'));
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let mut members: Vec<i32> = procs
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut ours: Vec<i32> = tree.iter().map(|p| p.as_raw()).collect();
    members.sort_unstable();
    ours.sort_unstable();
    let nested = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .any(|e| e.path().join("cgroup.procs").exists());
    (members == ours && !nested).then_some(dir)
}
