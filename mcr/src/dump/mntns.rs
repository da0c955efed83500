//! A tree's own mount namespace, described as its difference from ours: a new namespace
//! at restore starts as a copy of the restorer's, which is where that difference is
//! applied again.

use super::{DumpError, Result, StepContext};
use crate::model::{MountNs, MountSource, MountSpec};
use kext_shim::procfs::{read_mountinfo, MountInfo};
use kext_shim::Pid;

/// File systems a new instance of which is as good as the old one.
const FRESH: &[&str] = &["proc", "sysfs", "mqueue", "cgroup2", "devpts", "tmpfs"];

fn key(m: &MountInfo) -> (&str, u32, u32, &str) {
    (&m.mount_point, m.dev_major, m.dev_minor, &m.root)
}

/// Per-mount flags from the mount options (`rw,nosuid,nodev,relatime`).
fn flags(options: &str) -> u64 {
    options
        .split(',')
        .map(|o| match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "strictatime" => libc::MS_STRICTATIME,
            _ => 0,
        })
        .fold(0, |a, f| a | f)
}

/// Mount point `m` of a tree chrooted at `top` (which its mountinfo shows relative to
/// that root), as we name it.
fn from_chroot(top: &str, m: &str) -> String {
    match m {
        "/" => top.to_string(),
        m => format!("{}{m}", top.trim_end_matches('/')),
    }
}

/// Whether mount point `m` is `top` or below it.
fn at_or_below(top: &str, m: &str) -> bool {
    top == "/" || std::path::Path::new(m).starts_with(top)
}

pub fn describe(root: Pid) -> Result<MountNs> {
    let all_ours = read_mountinfo(Pid::this()).step(root, || "reading our mounts".into())?;
    let mut theirs = read_mountinfo(root).step(root, || "reading its mounts".into())?;
    // A tree chrooted in its namespace sees (and its mountinfo shows) only the mounts
    // at and below its root, named from there: those are the ones that matter to it,
    // compared with ours there.
    let top = kext_shim::procfs::read_link(&format!("/proc/{root}/root"))
        .step(root, || "reading its root".into())?;
    let ours: Vec<&MountInfo> = if top == "/" {
        all_ours.iter().collect()
    } else {
        for m in &mut theirs {
            m.mount_point = from_chroot(&top, &m.mount_point);
        }
        all_ours
            .iter()
            .filter(|o| at_or_below(&top, &o.mount_point))
            .collect()
    };
    let refuse = |m: &MountInfo, why: &str| DumpError::Unsupported {
        pid: root.as_raw(),
        what: format!(
            "its mount namespace has {} ({} from {}) {why}",
            m.mount_point, m.fs_type, m.source
        ),
    };
    let mut out = MountNs::default();
    let gone: Vec<&MountInfo> = ours
        .iter()
        .copied()
        .filter(|o| !theirs.iter().any(|t| key(t) == key(o)))
        .collect();
    // Only the topmost: detaching a mount takes the ones below it along.
    for g in &gone {
        if !gone.iter().any(|p| p.id == g.parent) {
            out.detached.push(g.mount_point.clone());
        }
    }
    for m in theirs
        .iter()
        .filter(|t| !ours.iter().any(|o| key(o) == key(t)))
    {
        if m.mount_point == "/" && top == "/" {
            return Err(refuse(
                m,
                "as its root: a tree that pivoted its root is not supported yet",
            ));
        }
        let source = if FRESH.contains(&m.fs_type.as_str()) && m.root == "/" {
            if m.fs_type == "tmpfs" {
                let inside = format!("/proc/{root}/root{}", m.mount_point);
                let empty = std::fs::read_dir(&inside)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if !empty {
                    return Err(refuse(m, "holding files, whose content is not kept yet"));
                }
            }
            let options = m
                .super_options
                .split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .collect::<Vec<_>>()
                .join(",");
            MountSource::Fresh {
                fs_type: m.fs_type.clone(),
                device: m.source.clone(),
                options,
            }
        } else {
            // A bind of something we can reach: a mount of ours of the same device whose
            // root holds theirs.
            let from = all_ours
                .iter()
                .filter(|o| o.dev_major == m.dev_major && o.dev_minor == m.dev_minor)
                .find_map(|o| {
                    let rest = if o.root == "/" {
                        Some(m.root.as_str())
                    } else {
                        m.root
                            .strip_prefix(o.root.as_str())
                            .filter(|r| r.is_empty() || r.starts_with('/'))
                    }?;
                    let base = o.mount_point.trim_end_matches('/');
                    Some(format!("{base}{rest}"))
                })
                .ok_or_else(|| refuse(m, "which is not a file system we can mount again"))?;
            MountSource::Bind { from }
        };
        out.mounts.push(MountSpec {
            target: m.mount_point.clone(),
            source,
            flags: flags(&m.options),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{at_or_below, flags, from_chroot};

    #[test]
    fn a_chrooted_trees_mount_points_are_named_from_our_root() {
        assert_eq!(from_chroot("/srv/p1", "/"), "/srv/p1");
        assert_eq!(from_chroot("/srv/p1", "/proc"), "/srv/p1/proc");
        assert!(at_or_below("/srv/p1", "/srv/p1/proc"));
        assert!(at_or_below("/srv/p1", "/srv/p1"));
        assert!(!at_or_below("/srv/p1", "/srv/p10"));
        assert!(!at_or_below("/srv/p1", "/proc"));
        assert!(at_or_below("/", "/proc"));
    }

    #[test]
    fn mount_options_become_flags() {
        assert_eq!(
            flags("ro,nosuid,nodev,relatime"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV
        );
        assert_eq!(flags("rw"), 0);
    }
}
