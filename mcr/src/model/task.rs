//! A process and its threads: CPU state, signals, credentials, limits.

use super::{FdEntry, FileRef, MmImage};
use serde::{Deserialize, Serialize};

/// One process of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub creds: Creds,
    pub threads: Vec<ThreadImage>,
    pub mm: MmImage,
    pub fds: Vec<FdEntry>,
    pub cwd: FileRef,
    /// The process's root directory, as a path from the dumper's root ("/" if not chrooted).
    pub root: String,
    pub umask: u32,
    pub personality: u32,
    /// PR_GET_DUMPABLE (0, 1 or 2).
    pub dumpable: u32,
    /// PR_SET_CHILD_SUBREAPER: orphans below it are re-parented to it.
    pub child_subreaper: bool,
    /// PR_SET_PDEATHSIG: the signal it gets when its parent dies (0: none).
    pub pdeathsig: i32,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF as (interval, time left) in
    /// microseconds; the time left counts from the restore.
    pub itimers: [(u64, u64); 3],
    /// timer_create timers, with their ids.
    pub posix_timers: Vec<PosixTimer>,
    /// Namespaces of its own that the tree lives in (set on the root only).
    pub namespaces: Namespaces,
    /// (soft, hard) per RLIMIT_*, in kernel order; u64::MAX is unlimited.
    pub rlimits: Vec<(u64, u64)>,
    /// Index n holds the action of signal n+1.
    pub sigactions: Vec<SigAction>,
    /// Signals queued for the whole process, as raw siginfo.
    pub shared_pending: Vec<Siginfo>,
}

/// Real, effective, saved and filesystem ids, plus supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Creds {
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

/// One thread: registers, FPU, and per-thread signal state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadImage {
    pub tid: i32,
    pub comm: String,
    /// `user_regs_struct` words as taken at the stop, before any restart fix-up.
    pub regs: Vec<u64>,
    /// The whole XSAVE area (standard format), set back whole.
    pub xstate: Vec<u8>,
    pub blocked: u64,
    pub pending: Vec<Siginfo>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    /// set_tid_address: cleared and futex-woken by the kernel when the thread exits.
    pub clear_child_tid: u64,
    /// set_robust_list: (head, length).
    pub robust_list: (u64, u64),
}

/// A raw 128-byte siginfo, as the kernel queues it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Siginfo(pub Vec<u8>);

impl Siginfo {
    pub fn signo(&self) -> i32 {
        i32::from_ne_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

/// The kernel's `struct sigaction` for x86_64 (handler, flags, restorer, mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl SigAction {
    pub fn is_default(&self) -> bool {
        *self == SigAction::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// A registered rseq area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub area: u64,
    pub size: u32,
    pub signature: u32,
}

/// A child that has exited but was not reaped yet: its parent will want its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZombieImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The status waitpid will report (exit code << 8, or the killing signal).
    pub status: i32,
}

/// A POSIX timer (timer_create): its id, clock, how it notifies, and when it fires next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signo: i32,
    /// sigev_value, handed to the signal handler.
    pub value: u64,
    /// SIGEV_SIGNAL (0), SIGEV_NONE (1) or SIGEV_THREAD_ID (4).
    pub notify: i32,
    /// The thread signalled, for SIGEV_THREAD_ID.
    pub tid: i32,
    /// Period and time left, in ns; time left counts from the restore.
    pub interval_ns: u64,
    pub value_ns: u64,
}

/// The namespaces a tree had of its own, made again around it at restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    /// Host and domain name, when it had its own uts namespace.
    pub uts: Option<(String, String)>,
    /// Its own ipc namespace, with its semaphores, message queues and limits (its
    /// shared memory segments are in `Snapshot::shmem`).
    pub ipc: Option<IpcNs>,
    /// It had a pid namespace of its own: every pid in the image is as it saw them
    /// there (the root is 1 when it was that namespace's init).
    pub pid: bool,
    /// Its own mount namespace, as the difference from the dumper's.
    pub mnt: Option<MountNs>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcNs {
    /// (name under /proc/sys/kernel, value): shmmax, msgmnb, sem, ...
    pub limits: Vec<(String, String)>,
    pub sem: Vec<SysvSem>,
    pub msg: Vec<SysvMsg>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvSem {
    pub perm: super::SysvPerm,
    pub values: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvMsg {
    pub perm: super::SysvPerm,
    pub qbytes: u64,
    /// (mtype, text), oldest first.
    pub messages: Vec<(i64, Vec<u8>)>,
}

/// A mount namespace, told as what it had beyond the one of the process that dumped it
/// (which a new namespace at restore starts as a copy of) and what it had removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountNs {
    /// Mount points it had unmounted, detached again.
    pub detached: Vec<String>,
    /// Mounts it had that the dumper lacked, parents first.
    pub mounts: Vec<MountSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Where, as the tree sees it.
    pub target: String,
    pub source: MountSource,
    /// MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC and the atime flags it had.
    pub flags: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A new instance of a file system that holds nothing to keep (proc, sysfs,
    /// mqueue, cgroup2, devpts, an empty tmpfs), with its source name and options.
    Fresh {
        fs_type: String,
        device: String,
        options: String,
    },
    /// A bind mount of this path of the dumper's.
    Bind { from: String },
}
