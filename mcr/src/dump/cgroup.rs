//! Freezing through a cgroup: when the tree is alone in its cgroup, the kernel stops
//! every task at once, so none can fork or clone while the tree is seized.
//!
//! - cgroup v2 `cgroup.freeze` parks tasks where a ptrace interrupt still reaches them:
//!   the cgroup is thawed once every thread sits in a ptrace stop, which holds them.
//! - The v1 freezer (`freezer.state`) parks them where nothing reaches them: every
//!   thread is seized and interrupted while frozen, then the cgroup is thawed, and each
//!   stops on its way out.

use super::{DumpError, Result};
use kext_shim::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A frozen cgroup; dropped (or thawed) it runs again.
pub struct CgroupFreeze {
    dir: PathBuf,
    version: Version,
    frozen: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The knob, and what to write to it to freeze and to thaw.
    fn knob(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Version::V1 => ("freezer.state", "FROZEN", "THAWED"),
            Version::V2 => ("cgroup.freeze", "1", "0"),
        }
    }
}

fn err(pid: Pid, step: String, e: std::io::Error, path: &Path) -> DumpError {
    DumpError::Kernel {
        pid: pid.as_raw(),
        step,
        source: kext_shim::Error::io(path.display().to_string(), e),
    }
}

impl CgroupFreeze {
    /// Freezes `dir` (a cgroup v2 directory or a v1 freezer one) and waits until the
    /// kernel reports it frozen.
    pub fn freeze(pid: Pid, dir: &Path) -> Result<Self> {
        let version = if dir.join("cgroup.freeze").exists() {
            Version::V2
        } else if dir.join("freezer.state").exists() {
            Version::V1
        } else {
            return Err(DumpError::Refused {
                pid: pid.as_raw(),
                what: format!(
                    "through {}: it is neither a cgroup v2 directory nor a v1 freezer cgroup",
                    dir.display()
                ),
            });
        };
        let (name, freeze, _) = version.knob();
        let knob = dir.join(name);
        std::fs::write(&knob, freeze)
            .map_err(|e| err(pid, "freezing its cgroup".into(), e, &knob))?;
        let f = CgroupFreeze {
            dir: dir.to_path_buf(),
            version,
            frozen: true,
        };
        // v2's cgroup.events says "frozen 1" once every task is frozen (poll(POLLPRI)
        // on it wakes late here, so re-read it); v1's state goes FREEZING, then FROZEN.
        let (status, done) = match version {
            Version::V2 => (dir.join("cgroup.events"), "frozen 1"),
            Version::V1 => (knob.clone(), "FROZEN"),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&status)
                .map_err(|e| err(pid, "reading the freezer state".into(), e, &status))?;
            if text.lines().any(|l| l.trim() == done) {
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

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn thaw(&mut self) -> Result<()> {
        self.frozen = false;
        let (name, _, thaw) = self.version.knob();
        let knob = self.dir.join(name);
        std::fs::write(&knob, thaw)
            .map_err(|e| err(Pid::from_raw(0), "thawing the cgroup".into(), e, &knob))
    }
}

impl Drop for CgroupFreeze {
    fn drop(&mut self) {
        if self.frozen {
            let (name, _, thaw) = self.version.knob();
            let knob = self.dir.join(name);
            if let Err(e) = std::fs::write(&knob, thaw) {
                tracing::error!("thawing {}: {e}", knob.display());
            }
        }
    }
}

/// The cgroup of `pid` that freezing would stop exactly the tree with: its cgroup v2
/// directory, or else its v1 freezer one, if that is not a root cgroup and holds
/// nothing but `pid` and its descendants (and no cgroups below it).
pub fn alone_in(pid: Pid, tree: &[Pid]) -> Option<PathBuf> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = kext_shim::procfs::read_mountinfo(Pid::this()).ok()?;
    let v2 = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|rel| {
            let mount = mounts.iter().find(|m| m.fs_type == "cgroup2")?;
            holds_only(&mount.mount_point, rel, tree)
        });
    v2.or_else(|| {
        let rel = cg.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, rel) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "freezer")
                .then_some(rel)
        })?;
        let mount = mounts.iter().find(|m| {
            m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "freezer")
        })?;
        holds_only(&mount.mount_point, rel, tree)
    })
}

/// `mount/rel` if it is not the root and its members are exactly `tree`.
fn holds_only(mount: &str, rel: &str, tree: &[Pid]) -> Option<PathBuf> {
    if rel == "/" {
        return None;
    }
    let dir = Path::new(mount).join(rel.trim_start_matches('/'));
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
