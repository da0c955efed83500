//! The smaller /proc/PID files: status, stat, fdinfo, limits, mountinfo, auxv, links.

use crate::{Error, Pid, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

/// A /proc file, whole. Not std::fs::read_to_string, which asks a file's size and
/// position first (statx, lseek) to size its buffer: /proc says 0, so it reads 32
/// bytes, then 32, 64, 128... (nine reads for a small process's maps), and these reads
/// happen inside the freeze, a few per fd.
fn read(path: &str) -> Result<String> {
    read_text(path, 4096)
}

/// A /proc (or sysfs, cgroupfs) file, whole, into a buffer of `hint` bytes to begin
/// with: one read where it is big enough (see [`read`] for why not std's).
pub fn read_text(path: &str, hint: usize) -> Result<String> {
    String::from_utf8(read_bytes(path, hint)?).map_err(|_| Error::Parse {
        path: path.to_string(),
        what: "text",
        line: String::new(),
    })
}

/// [`read_text`] for bytes.
pub fn read_bytes(path: &str, hint: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut b = Vec::with_capacity(hint);
    f.take(u64::MAX)
        .read_to_end(&mut b)
        .map_err(|e| Error::io(path, e))?;
    Ok(b)
}

fn parse_err(path: &str, what: &'static str, line: &str) -> Error {
    Error::Parse {
        path: path.to_string(),
        what,
        line: line.to_string(),
    }
}

/// /proc/PID/status as `Key -> value` (value trimmed).
#[derive(Debug, Clone)]
pub struct Status {
    path: String,
    fields: BTreeMap<String, String>,
}

impl Status {
    pub fn read(pid: Pid) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let text = read(&path)?;
        let fields = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Ok(Self { path, fields })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    fn field(&self, key: &'static str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| parse_err(&self.path, key, "(missing)"))
    }

    /// A whitespace-separated list of decimal numbers (Uid, Gid, Groups, NSpid).
    pub fn numbers(&self, key: &'static str) -> Result<Vec<u64>> {
        let v = self.field(key)?;
        v.split_whitespace()
            .map(|n| n.parse().map_err(|_| parse_err(&self.path, key, v)))
            .collect()
    }

    /// A hexadecimal mask (SigBlk, SigCgt, SigIgn, ShdPnd, CapEff).
    pub fn hex(&self, key: &'static str) -> Result<u64> {
        let v = self.field(key)?;
        u64::from_str_radix(v, 16).map_err(|_| parse_err(&self.path, key, v))
    }

    /// An octal value (Umask).
    pub fn octal(&self, key: &'static str) -> Result<u32> {
        let v = self.field(key)?;
        u32::from_str_radix(v, 8).map_err(|_| parse_err(&self.path, key, v))
    }

    pub fn number(&self, key: &'static str) -> Result<u64> {
        let v = self.field(key)?;
        let n = v.split_whitespace().next().unwrap_or("");
        n.parse().map_err(|_| parse_err(&self.path, key, v))
    }

    /// The one-letter state (R, S, D, T, t, Z, ...).
    pub fn state(&self) -> Result<char> {
        let v = self.field("State")?;
        v.chars()
            .next()
            .ok_or_else(|| parse_err(&self.path, "State", v))
    }
}

/// /proc/PID/stat, split after the command name so its spaces do not matter.
#[derive(Debug, Clone)]
pub struct Stat {
    pub comm: String,
    /// Fields from number 3 (state) on; `field(n)` uses the man page's numbering.
    rest: Vec<String>,
}

impl Stat {
    pub fn read(pid: Pid) -> Result<Self> {
        let path = format!("/proc/{pid}/stat");
        let text = read(&path)?;
        let open = text
            .find('(')
            .ok_or_else(|| parse_err(&path, "comm", &text))?;
        let close = text
            .rfind(')')
            .ok_or_else(|| parse_err(&path, "comm", &text))?;
        Ok(Self {
            comm: text[open + 1..close].to_string(),
            rest: text[close + 1..]
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        })
    }

    /// Field `n` as proc(5) numbers them (1 = pid, 2 = comm, 3 = state, ...).
    pub fn field(&self, n: usize) -> u64 {
        self.rest
            .get(n.saturating_sub(3))
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0) as u64
    }

    pub fn state(&self) -> char {
        self.rest
            .first()
            .and_then(|s| s.chars().next())
            .unwrap_or('?')
    }
}

/// /proc/PID/fdinfo/FD.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    /// Open flags (O_*), octal in the file.
    pub flags: u32,
    pub mnt_id: u64,
    pub ino: u64,
    /// Every other `key: value` line, for object-specific fields (eventfd-count, ...).
    pub extra: BTreeMap<String, String>,
    /// The whole text, for objects with repeated lines (an epoll's `tfd:` lines).
    pub text: String,
}

pub fn read_fdinfo(pid: Pid, fd: i32) -> Result<FdInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = read(&path)?;
    parse_fdinfo(&path, text)
}

fn parse_fdinfo(path: &str, text: String) -> Result<FdInfo> {
    let mut info = FdInfo {
        text: text.clone(),
        ..FdInfo::default()
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "pos" => info.pos = v.parse().map_err(|_| parse_err(path, "pos", line))?,
            "flags" => {
                info.flags =
                    u32::from_str_radix(v, 8).map_err(|_| parse_err(path, "flags", line))?
            }
            "mnt_id" => info.mnt_id = v.parse().map_err(|_| parse_err(path, "mnt_id", line))?,
            "ino" => info.ino = v.parse().map_err(|_| parse_err(path, "ino", line))?,
            _ => {
                info.extra.insert(k.to_string(), v.to_string());
            }
        }
    }
    Ok(info)
}

/// A process's /proc fd and fdinfo directories, opened once: each fd read through
/// them costs a lookup of its number only, not a walk of /proc/PID and its
/// permission check (a hundred sockets are read inside the freeze).
pub struct FdDirs {
    pid: Pid,
    fd: std::os::fd::OwnedFd,
    info: std::os::fd::OwnedFd,
}

impl FdDirs {
    pub fn open(pid: Pid) -> Result<FdDirs> {
        let dir = |name: &str| -> Result<std::os::fd::OwnedFd> {
            let path = format!("/proc/{pid}/{name}");
            std::fs::File::open(&path)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| Error::io(&path, e))
        };
        Ok(FdDirs {
            pid,
            fd: dir("fd")?,
            info: dir("fdinfo")?,
        })
    }

    /// What fd `fd` points at (`/proc/PID/fd/FD`).
    pub fn link(&self, fd: i32) -> Result<String> {
        use std::os::fd::AsRawFd;
        nix::fcntl::readlinkat(Some(self.fd.as_raw_fd()), fd.to_string().as_str())
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| {
                let path = format!("/proc/{}/fd/{fd}", self.pid);
                Error::io(&path, std::io::Error::from(e))
            })
    }

    /// `/proc/PID/fdinfo/FD`.
    pub fn info(&self, fd: i32) -> Result<FdInfo> {
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let path = format!("/proc/{}/fdinfo/{fd}", self.pid);
        let raw = nix::fcntl::openat(
            Some(self.info.as_raw_fd()),
            fd.to_string().as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::io(&path, std::io::Error::from(e)))?;
        // SAFETY: a fresh fd openat just returned, owned by no one else.
        let f = unsafe { std::fs::File::from_raw_fd(raw) };
        let mut text = String::with_capacity(4096);
        f.take(u64::MAX)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(&path, e))?;
        parse_fdinfo(&path, text)
    }
}

/// The open fd numbers of `pid`, ascending.
pub fn list_fds(pid: Pid) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&path)
        .map_err(|e| Error::io(&path, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// This boot's id (/proc/sys/kernel/random/boot_id), empty if unreadable: a pid or a
/// start time means something only on the boot that gave it.
pub fn boot_id() -> String {
    // Fixed until the next boot, and asked in every blackout: read once.
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// The target of a /proc symlink (`exe`, `cwd`, `root`, `fd/N`).
pub fn read_link(path: &str) -> Result<String> {
    std::fs::read_link(path)
        .map_err(|e| Error::io(path, e))
        .map(|p| p.to_string_lossy().into_owned())
}

/// What identifies a file across a checkpoint: where it lives and whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            mode: m.mode(),
            rdev: m.rdev(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }

    /// Follows the link (e.g. /proc/PID/fd/N) to the object itself.
    pub fn of_path(path: &str) -> Result<Self> {
        let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::of_metadata(&m))
    }

    /// Room for the `struct stat` that [`FileIdentity::of_stat_bytes`] reads: what an
    /// fstat injected into a process writes.
    pub const STAT_LEN: usize = std::mem::size_of::<libc::stat>();

    /// The identity in a `struct stat` as the kernel wrote it (None if `b` is short).
    pub fn of_stat_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::STAT_LEN {
            return None;
        }
        // SAFETY: `b` holds at least a whole `struct stat`, plain integers for which any
        // bit pattern is valid; read_unaligned copes with the buffer's alignment.
        let st: libc::stat = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        Some(Self {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
        })
    }
}

/// Resource limits as /proc/PID/limits shows them, in RLIMIT_* order. Reading them this
/// way needs no privilege over the task, unlike prlimit64.
pub fn read_limits(pid: Pid) -> Result<Vec<(u64, u64)>> {
    let path = format!("/proc/{pid}/limits");
    let text = read(&path)?;
    let parse = |s: &str, line: &str| -> Result<u64> {
        let s = s.trim();
        if s == "unlimited" {
            Ok(u64::MAX)
        } else {
            s.parse().map_err(|_| parse_err(&path, "limit", line))
        }
    };
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        // Fixed columns: name 26, soft 21, hard 21, units.
        if line.len() < 47 {
            return Err(parse_err(&path, "limit", line));
        }
        let soft = &line[26..47];
        let hard = line[47..].split_whitespace().next().unwrap_or("");
        out.push((parse(soft, line)?, parse(hard, line)?));
    }
    Ok(out)
}

/// The auxiliary vector the task was started with, as (type, value) words.
pub fn read_auxv(pid: Pid) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/auxv");
    let raw = read_bytes(&path, 1024)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// /proc/PID/personality.
pub fn read_personality(pid: Pid) -> Result<u32> {
    let path = format!("/proc/{pid}/personality");
    let t = read(&path)?;
    u32::from_str_radix(t.trim(), 16).map_err(|_| parse_err(&path, "personality", &t))
}

/// One line of /proc/PID/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u64,
    pub parent: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub root: String,
    pub mount_point: String,
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// The file system's own options (`rw,size=1024k,mode=755`).
    pub super_options: String,
}

pub fn read_mountinfo(pid: Pid) -> Result<Vec<MountInfo>> {
    let path = format!("/proc/{pid}/mountinfo");
    let text = read(&path)?;
    text.lines()
        .map(|line| {
            let bad = || parse_err(&path, "mountinfo line", line);
            let (pre, post) = line.split_once(" - ").ok_or_else(bad)?;
            let f: Vec<&str> = pre.split(' ').collect();
            let g: Vec<&str> = post.split(' ').collect();
            if f.len() < 6 || g.len() < 2 {
                return Err(bad());
            }
            let (maj, min) = f[2].split_once(':').ok_or_else(bad)?;
            Ok(MountInfo {
                id: f[0].parse().map_err(|_| bad())?,
                parent: f[1].parse().map_err(|_| bad())?,
                dev_major: maj.parse().map_err(|_| bad())?,
                dev_minor: min.parse().map_err(|_| bad())?,
                root: unescape(f[3]),
                mount_point: unescape(f[4]),
                options: f[5].to_string(),
                fs_type: g[0].to_string(),
                source: unescape(g[1]),
                super_options: g.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Marks every fd above 2 that this process inherited close-on-exec, so that programs
/// it starts (workloads to be checkpointed, whose every fd is dumped) get only stdio.
pub fn cloexec_inherited_fds() -> Result<()> {
    let path = "/proc/self/fd";
    let dir = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    for fd in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if fd > 2 {
            // The fd of the directory listing itself is gone by now: EBADF is fine.
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
        }
    }
    Ok(())
}

/// `pid` and every process under it, parents before their children (those that went
/// meanwhile are skipped).
pub fn descendants(pid: Pid) -> Vec<i32> {
    let mut all = vec![pid.as_raw()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(c) = children(Pid::from_raw(all[i])) {
            all.extend(c);
        }
        i += 1;
    }
    all
}

/// Children of every thread of `pid` (from /proc/PID/task/*/children).
pub fn children(pid: Pid) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in threads(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/children");
        let text = read(&path)?;
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse::<i32>().ok()),
        );
    }
    Ok(out)
}

/// Thread ids of `pid`, ascending.
pub fn threads(pid: Pid) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    let mut v: Vec<i32> = std::fs::read_dir(&path)
        .map_err(|e| Error::io(&path, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_status_stat_limits() {
        let me = Pid::this();
        let st = Status::read(me).unwrap();
        assert_eq!(st.numbers("Uid").unwrap().len(), 4);
        assert!(st.octal("Umask").is_ok());
        let stat = Stat::read(me).unwrap();
        assert_eq!(stat.field(1), 0, "field 1 is before comm and not kept");
        assert!(stat.field(26) > 0, "start_code");
        let lim = read_limits(me).unwrap();
        assert_eq!(lim.len(), 16);
        assert!(read_auxv(me).unwrap().len() >= 2);
        assert!(!read_mountinfo(me).unwrap().is_empty());
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
