//! The workload model: plain data describing a frozen process tree.
//!
//! Dump fills it, restore reads it, the image codec writes and reads it. No I/O here.

mod fd;
mod mm;
mod task;

pub use fd::*;
pub use mm::*;
pub use task::*;

use serde::{Deserialize, Serialize};

/// What an image holds besides its pages: the processes and their state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub inventory: Inventory,
    /// Parents before their children; the first is the root of the tree.
    pub processes: Vec<ProcessImage>,
    pub pipes: Vec<PipeImage>,
    /// Page chunks owned by `-1 - i` hold the pages of object `i`.
    pub shmem: Vec<ShmemObject>,
    /// After the processes: each one's parent is among them.
    pub zombies: Vec<ZombieImage>,
    pub unix: Vec<UnixSocketImage>,
    pub ptys: Vec<PtyImage>,
    pub inet: Vec<InetSocketImage>,
}

/// Who wrote an image, where, and what it needs to be read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub format_version: u32,
    pub tool_version: String,
    pub kernel_release: String,
    pub arch: String,
    /// The root of the tree: the pid the dump was asked for, or its number in the
    /// tree's own pid namespace if it had one.
    pub root_pid: i32,
    pub page_size: u32,
    /// Features the image uses; a reader refuses one it does not know.
    pub features: Vec<String>,
    /// Wall-clock time of the freeze, in milliseconds since the epoch.
    pub frozen_at_ms: u64,
    /// How the process tree was stopped for the dump.
    pub shell_job: bool,
    /// What holds the image's TCP connections still on the wire until they are
    /// restored; the restore removes it.
    pub net_lock: Option<NetLockImage>,
    /// Random, to tell this image from any other: a child image names its parent by it.
    pub image_id: u64,
    /// The image that holds the pages this one does not (see `MmImage::parent`).
    pub parent: Option<ParentImage>,
    /// What keeps tracking the tree's writes since this image was taken, for the next
    /// image to hold only the pages written since.
    pub tracker: Option<TrackerImage>,
    /// A same-host migration's pre-copy round whose pages were not copied: they are
    /// read where they are, in the source's memory (see `PagesInSource`).
    pub pages_in_source: Option<PagesInSource>,
}

/// The processes whose memory holds an image's pages ([`PAGES_IN_SOURCE`] chunks).
/// They run on while it is read: what it gets is at least as new as the round, and a
/// write since is tracked for the next one, as when the round copies while they run.
/// Such an image is good only while they live, on this boot, in this pid namespace.
///
/// [`PAGES_IN_SOURCE`]: crate::image::PAGES_IN_SOURCE
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesInSource {
    /// /proc/sys/kernel/random/boot_id when the round was made.
    pub boot_id: String,
    pub procs: Vec<SourceProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceProcess {
    /// As the image names it.
    pub pid: i32,
    /// As the pid namespace of the mcr that made the image sees it.
    pub host_pid: i32,
    /// Field 22 of its /proc/PID/stat, in clock ticks since boot.
    pub start: u64,
}

/// Where an image's parent is and which one it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentImage {
    /// The parent's directory, relative to this image's (so a chain of sibling
    /// directories can be moved together), or absolute.
    pub dir: String,
    pub image_id: u64,
}

/// A process of mcr's holding the userfaultfds that track the tree's writes. Its
/// registrations end with it, so it is the tracking: a scan is trusted only while this
/// very process (pid and start time) lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerImage {
    pub holder_pid: i32,
    /// Field 22 of its /proc/PID/stat, in clock ticks since boot.
    pub holder_start: u64,
    /// The pids whose writes it tracks.
    pub pids: Vec<i32>,
}

/// An nftables table (inet family) of ours stopping the image's connections, and the
/// process holding what their peers sent meanwhile, if the kernel could queue it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetLockImage {
    pub table: String,
    pub holder_pid: Option<i32>,
    /// The network namespace (inode) of the table and the holder's queue.
    pub netns: u64,
}

/// A file the image refers to, and what it looked like at dump time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Absolute path as seen from the dumper's root.
    pub path: String,
    pub identity: FileIdentity,
}

/// Enough of `stat` to tell whether a file is still the one that was dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl From<kext_shim::procfs::FileIdentity> for FileIdentity {
    fn from(f: kext_shim::procfs::FileIdentity) -> Self {
        Self {
            dev: f.dev,
            ino: f.ino,
            mode: f.mode,
            rdev: f.rdev,
            size: f.size,
            mtime_sec: (f.mtime_ns.div_euclid(1_000_000_000)) as i64,
            mtime_nsec: (f.mtime_ns.rem_euclid(1_000_000_000)) as u32,
        }
    }
}

impl FileIdentity {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}
