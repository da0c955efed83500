//! Staging directories of a migration's two ends (on /dev/shm by default, so their
//! images live in memory). Each holds an `owner` file naming the process that made it
//! (pid and start time); one whose owner is gone (killed, or died of a failed
//! migration) is removed by the next `mcr migrate` or `mcr receive` that looks there.
//! Left alone, they add up: a few abandoned 4 GiB migrations fill a 24 GiB VM.

use kext_shim::procfs::Stat;
use kext_shim::Pid;
use std::path::Path;

const OWNER: &str = "owner";
/// The prefixes of the directories that are ours.
pub const PREFIXES: [&str; 2] = ["mcr-migrate-", "mcr-receive-"];

/// A new directory under `parent`, named `prefix`..., marked as ours.
pub fn make(parent: &Path, prefix: &str) -> std::io::Result<tempfile::TempDir> {
    remove_stale(parent);
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
    let me = Pid::this();
    let start = Stat::read(me).map(|s| s.field(22)).unwrap_or(0);
    std::fs::write(dir.path().join(OWNER), format!("{} {start}\n", me.as_raw()))?;
    Ok(dir)
}

/// Removes the directories of ours under `parent` whose owner no longer runs.
pub fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Ok(mark) = std::fs::read_to_string(e.path().join(OWNER)) else {
            // Being made this very moment, or not ours after all: left alone.
            continue;
        };
        let mut it = mark.split_whitespace().map(|w| w.parse::<u64>().ok());
        let (Some(Some(pid)), Some(Some(start))) = (it.next(), it.next()) else {
            continue;
        };
        let alive = Stat::read(Pid::from_raw(pid as i32))
            .is_ok_and(|st| st.state() != 'Z' && st.field(22) == start);
        if !alive {
            tracing::info!(dir = %e.path().display(), "removing a dead migration's staging");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
