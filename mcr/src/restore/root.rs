//! Where the image's paths are found at restore: under `--root` (a mirror of the
//! dumper's `/`), and how strictly a file found there must match the one dumped.
//!
//! In place (no `--root`), a file must be the very one dumped (the same inode), except
//! below the tree's own bind mounts: those are made again from what their source is
//! where the restore runs, which may be another disk with the same files. A partition
//! moves onto a clone of its disk this way: its root is a bind mount in its own mount
//! namespace, and the restore runs where the clone is bound at that path. Below them,
//! as under `--root`, type, size and mtime must match.

use crate::model::{MountNs, MountSource};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub(crate) struct RestoreRoot {
    /// Absolute; `/` when restoring in place.
    pub dir: PathBuf,
    /// The mount points of the tree's own bind mounts.
    binds: Vec<PathBuf>,
}

impl RestoreRoot {
    pub fn new(dir: PathBuf, mnt: Option<&MountNs>) -> RestoreRoot {
        let binds = mnt
            .into_iter()
            .flat_map(|n| &n.mounts)
            .filter(|m| matches!(m.source, MountSource::Bind { .. }))
            .map(|m| PathBuf::from(&m.target))
            .collect();
        RestoreRoot { dir, binds }
    }

    /// Where the image's `path` is for the restorer.
    pub fn join(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }

    /// Whether the file at the image's `path` must be the very one that was dumped
    /// (the same inode), not only one like it.
    pub fn in_place(&self, path: &str) -> bool {
        self.dir == Path::new("/") && !self.binds.iter().any(|b| Path::new(path).starts_with(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MountSpec;

    #[test]
    fn below_its_own_binds_a_file_in_place_need_only_look_the_same() {
        let mnt = MountNs {
            mounts: vec![MountSpec {
                target: "/srv/p1".into(),
                source: MountSource::Bind {
                    from: "/srv/p1".into(),
                },
                flags: 0,
            }],
            ..Default::default()
        };
        let r = RestoreRoot::new(PathBuf::from("/"), Some(&mnt));
        assert!(!r.in_place("/srv/p1/bin/sh"));
        assert!(!r.in_place("/srv/p1"));
        // A sibling whose name only starts the same is not below it.
        assert!(r.in_place("/srv/p10/x"));
        assert!(r.in_place("/etc/hosts"));
        let moved = RestoreRoot::new(PathBuf::from("/mirror"), None);
        assert!(!moved.in_place("/etc/hosts"));
        assert_eq!(moved.join("/etc/hosts"), Path::new("/mirror/etc/hosts"));
    }
}
