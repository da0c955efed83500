//! The fd table.

use super::parasite::FdAnswer;
use super::{DumpError, Result, StepContext};
use crate::model::{
    EpollTarget, FdEntry, FdKind, FileLock, FileRef, InotifyWatch, LockKind, PipeImage,
    ProcessImage,
};
use kext_shim::procfs::{self, FileIdentity};
use kext_shim::Pid;
use std::collections::BTreeMap;

/// Terminal majors: /dev/tty*, /dev/console and ptmx (4, 5), Unix98 pty slaves (136-143).
fn is_terminal(rdev: u64) -> bool {
    let major = nix::sys::stat::major(rdev);
    major == 4 || major == 5 || (136..=143).contains(&major)
}

/// Devices an open of which is as good as any other: /dev/null, zero, full, random and
/// urandom hold no state of the opener's. Any other (kvm, tun, fuse, a disk...) does.
fn is_stateless_device(rdev: u64) -> bool {
    nix::sys::stat::major(rdev) == 1 && [3, 5, 7, 8, 9].contains(&nix::sys::stat::minor(rdev))
}

/// The pty multiplexer, /dev/ptmx or a devpts's ptmx: each open is a new pty's master.
fn is_ptmx(rdev: u64) -> bool {
    nix::sys::stat::major(rdev) == 5 && nix::sys::stat::minor(rdev) == 2
}

/// A Unix98 pty slave (`/dev/pts/N`): its index.
pub(super) fn pty_slave_index(rdev: u64, path: &str) -> Option<u32> {
    let major = nix::sys::stat::major(rdev);
    if !(136..=143).contains(&major) {
        return None;
    }
    path.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .or(Some(
            ((major - 136) * 256 + nix::sys::stat::minor(rdev)) as u32,
        ))
}

pub fn collect(pid: Pid, shell_job: bool, answers: &[FdAnswer]) -> Result<Vec<FdEntry>> {
    let raw = pid.as_raw();
    let dirs = procfs::FdDirs::open(pid).step(pid, || "opening /proc/PID/fd".into())?;
    let mut out = Vec::with_capacity(answers.len());
    // Objects behind stdio: with --shell-job they belong to the caller, and so does any
    // other fd that refers to the same object.
    let mut stdio_keys = Vec::new();
    for a in answers {
        let fd = a.fd;
        let ident = a.ident;
        // A socket's link only names its inode (an O_PATH fd of a socket file names
        // its path); a service with a hundred connections has a hundred of them.
        let socket =
            ident.mode & libc::S_IFMT == libc::S_IFSOCK && a.flags & libc::O_PATH as u32 == 0;
        let link = if socket {
            format!("socket:[{}]", ident.ino)
        } else {
            dirs.link(fd).step(pid, || format!("reading fd {fd}"))?
        };
        // Read even for a socket or a pipe, whose fdinfo has nothing else to tell
        // unless a lock sits on it (flock works on both): /proc/locks, which would
        // tell once for all, costs 8 ms here (it takes file_rwsem for writing).
        let info = dirs
            .info(fd)
            .step(pid, || format!("reading fdinfo of fd {fd}"))?;
        let plain =
            socket || ident.mode & libc::S_IFMT == libc::S_IFIFO && link.starts_with("pipe:[");
        // The identity of a socket or pipe is its inode alone.
        let ident = if plain {
            FileIdentity {
                ino: ident.ino,
                mode: ident.mode,
                ..FileIdentity::default()
            }
        } else {
            ident
        };
        let cloexec = a.cloexec;
        let flags = a.flags & !(libc::O_CLOEXEC as u32);
        let unsupported = |why: &str| DumpError::Unsupported {
            pid: raw,
            what: format!("fd {fd} is {link}: {why}"),
        };
        let file = || FileRef {
            path: link.clone(),
            identity: ident.into(),
        };
        let external = |stdio_keys: &mut Vec<String>| -> Option<FdKind> {
            if shell_job && (fd <= 2 || stdio_keys.contains(&link)) {
                if fd <= 2 {
                    stdio_keys.push(link.clone());
                }
                Some(FdKind::External { key: link.clone() })
            } else {
                None
            }
        };
        let kind = match ident.mode & libc::S_IFMT {
            _ if link.starts_with("anon_inode:") => {
                anon_object(pid, fd, &link, &info).map_err(|why| unsupported(&why))?
            }
            libc::S_IFREG if link.starts_with("/memfd:") => FdKind::Memfd {
                ino: ident.ino,
                pos: info.pos,
            },
            libc::S_IFREG => {
                if link.ends_with(" (deleted)") {
                    return Err(unsupported("the file was deleted"));
                }
                FdKind::Regular {
                    file: file(),
                    pos: info.pos,
                }
            }
            libc::S_IFDIR => FdKind::Directory { file: file() },
            // Whether a pty is inside the image is decided for the whole tree (see
            // `pty::resolve`).
            libc::S_IFCHR if is_ptmx(ident.rdev) => FdKind::PtyMaster {
                index: info
                    .extra
                    .get("tty-index")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| unsupported("a pty master without a tty-index"))?,
            },
            libc::S_IFCHR if pty_slave_index(ident.rdev, &link).is_some() => {
                if fd <= 2 {
                    stdio_keys.push(link.clone());
                }
                FdKind::PtySlave {
                    index: pty_slave_index(ident.rdev, &link).unwrap_or_default(),
                    path: link.clone(),
                }
            }
            libc::S_IFCHR if is_terminal(ident.rdev) => external(&mut stdio_keys)
                .ok_or_else(|| unsupported("a terminal; dump it as a shell job (--shell-job)"))?,
            libc::S_IFCHR if is_stateless_device(ident.rdev) => FdKind::CharDevice {
                file: file(),
                pos: info.pos,
            },
            libc::S_IFCHR => {
                return Err(unsupported(&format!(
                    "a device ({}:{}) whose state cannot be restored",
                    nix::sys::stat::major(ident.rdev),
                    nix::sys::stat::minor(ident.rdev)
                )))
            }
            // An anonymous pipe: whether it is inside the image is decided for the whole
            // tree, once every process's fds are known (see `resolve_pipes`).
            libc::S_IFIFO if link.starts_with("pipe:[") => FdKind::Pipe {
                ino: ident.ino,
                read_end: flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32,
            },
            // A socket: which ones the image can hold is decided for the whole tree too
            // (see `resolve_sockets`).
            libc::S_IFSOCK if link.starts_with("socket:[") => FdKind::UnixSocket { ino: ident.ino },
            libc::S_IFIFO => FdKind::Fifo {
                file: file(),
                read_end: flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32,
            },
            libc::S_IFSOCK => external(&mut stdio_keys).ok_or_else(|| {
                unsupported("this socket is not supported yet, except as a shell job's stdio")
            })?,
            _ => return Err(unsupported("this kind of file is not supported")),
        };
        let locks = parse_locks(&info.text).map_err(|why| unsupported(&why))?;
        out.push(FdEntry {
            fd,
            flags,
            cloexec,
            ofd: 0,
            kind,
            locks,
        });
    }
    Ok(out)
}

/// Numbers the open file descriptions of every process of the image: two fds that kcmp
/// says are one description (dup'd, or inherited through fork) get one number, so that
/// restore opens the file once and they share an offset again.
pub fn number_file_descriptions(procs: &mut [ProcessImage]) -> Result<()> {
    // Every description seen so far, with one fd that holds it.
    struct Seen {
        /// (dev, ino, rdev) for files, (MAX, ino, end) for pipes.
        object: (u64, u64, u64),
        pid: i32,
        fd: i32,
        number: u32,
    }
    let mut seen: Vec<Seen> = Vec::new();
    let mut next = 0u32;
    for p in procs.iter_mut() {
        let pid = Pid::from_raw(p.pid);
        for e in p.fds.iter_mut() {
            let object = match &e.kind {
                FdKind::Regular { file, .. }
                | FdKind::CharDevice { file, .. }
                | FdKind::Directory { file } => {
                    (file.identity.dev, file.identity.ino, file.identity.rdev)
                }
                FdKind::Pipe { ino, read_end } => (u64::MAX, *ino, *read_end as u64),
                FdKind::Fifo { file, read_end } => {
                    (u64::MAX - 4, file.identity.ino, *read_end as u64)
                }
                FdKind::Memfd { ino, .. } => (u64::MAX - 2, *ino, 0),
                FdKind::UnixSocket { ino } => (u64::MAX - 3, *ino, 0),
                FdKind::UnixListener { ino, .. } => (u64::MAX - 5, *ino, 0),
                FdKind::InetSocket { ino } => (u64::MAX - 8, *ino, 0),
                // One anon inode serves every eventfd (and the like): kcmp tells them apart,
                // but only within one kind, so a process full of them is not compared
                // pairwise across kinds while it is frozen.
                FdKind::Inotify { .. } => (u64::MAX - 1, 0, 0),
                FdKind::EventFd { .. } => (u64::MAX - 1, 1, 0),
                FdKind::TimerFd { .. } => (u64::MAX - 1, 2, 0),
                FdKind::SignalFd { .. } => (u64::MAX - 1, 3, 0),
                FdKind::Epoll { .. } => (u64::MAX - 1, 4, 0),
                FdKind::PtyMaster { index } => (u64::MAX - 6, *index as u64, 0),
                FdKind::PtySlave { index, .. } => (u64::MAX - 7, *index as u64, 0),
                FdKind::External { .. } => continue,
            };
            let mut found = None;
            for &Seen {
                object: obj,
                pid: opid,
                fd: ofd,
                number: n,
            } in &seen
            {
                if obj == object {
                    let same = kext_shim::pidfd::same_file_description(
                        Pid::from_raw(opid),
                        ofd,
                        pid,
                        e.fd,
                    )
                    .step(pid, || {
                        format!("comparing fd {} with fd {ofd} of pid {opid}", e.fd)
                    })?;
                    if same {
                        found = Some(n);
                        break;
                    }
                }
            }
            e.ofd = found.unwrap_or_else(|| {
                next += 1;
                seen.push(Seen {
                    object,
                    pid: p.pid,
                    fd: e.fd,
                    number: next,
                });
                next
            });
        }
    }
    Ok(())
}

/// Decides, for the whole tree, what each pipe is. With both ends inside, it is part of
/// the image: its capacity and the bytes in flight are read (without taking them) from
/// one reader. With one end outside, it belongs to whoever started the job: a shell
/// job's stdio, rebound at restore; anything else is refused, naming it.
pub fn resolve_pipes(procs: &mut [ProcessImage], shell_job: bool) -> Result<Vec<PipeImage>> {
    /// Who holds a pipe's ends: a (pid, fd) reading it, and whether anyone writes.
    #[derive(Default)]
    struct Ends {
        reader: Option<(i32, i32)>,
        writer: bool,
    }
    let mut ends: BTreeMap<u64, Ends> = BTreeMap::new();
    let mut fifos: BTreeMap<u64, FileRef> = BTreeMap::new();
    for p in procs.iter() {
        for e in &p.fds {
            let (ino, read_end) = match &e.kind {
                FdKind::Pipe { ino, read_end } => (*ino, *read_end),
                FdKind::Fifo { file, read_end } => {
                    fifos.insert(file.identity.ino, file.clone());
                    (file.identity.ino, *read_end)
                }
                _ => continue,
            };
            {
                let s = ends.entry(ino).or_default();
                if read_end {
                    s.reader.get_or_insert((p.pid, e.fd));
                } else {
                    s.writer = true;
                }
            }
        }
    }
    let mut pipes = Vec::new();
    for (&ino, ends) in &ends {
        if let (Some((pid, fd)), true) = (ends.reader, ends.writer) {
            let (cap, data) = kext_shim::pipe::peek(Pid::from_raw(pid), fd)
                .step(Pid::from_raw(pid), || {
                    format!("reading what is in flight in pipe:[{ino}] (fd {fd})")
                })?;
            pipes.push(PipeImage {
                ino,
                fifo: fifos.get(&ino).cloned(),
                capacity: cap as u32,
                data,
            });
            continue;
        }
        let key = fifos
            .get(&ino)
            .map(|f| f.path.clone())
            .unwrap_or_else(|| format!("pipe:[{ino}]"));
        externalize(
            procs,
            shell_job,
            &key,
            "whose other end is outside the tree",
            |k| match k {
                FdKind::Pipe { ino: i, .. } => *i == ino,
                FdKind::Fifo { file, .. } => file.identity.ino == ino,
                _ => false,
            },
        )?;
    }
    Ok(pipes)
}

/// eventfd, timerfd, signalfd and epoll, read from their fdinfo.
fn anon_object(
    pid: Pid,
    fd: i32,
    link: &str,
    info: &kext_shim::procfs::FdInfo,
) -> std::result::Result<FdKind, String> {
    let field = |k: &str| {
        info.extra
            .get(k)
            .map(String::as_str)
            .ok_or(format!("fdinfo lacks {k}"))
    };
    let hex = |k: &str| {
        field(k)
            .and_then(|v| u64::from_str_radix(v.trim(), 16).map_err(|_| format!("bad {k}: {v}")))
    };
    let dec = |k: &str| {
        field(k).and_then(|v| v.trim().parse::<u64>().map_err(|_| format!("bad {k}: {v}")))
    };
    // "(sec, nsec)"
    let pair = |k: &str| -> std::result::Result<u64, String> {
        let v = field(k)?;
        let (a, b) = v
            .trim_matches(|c| c == '(' || c == ')' || c == ' ')
            .split_once(',')
            .ok_or(format!("bad {k}: {v}"))?;
        let n = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("bad {k}: {v}"));
        Ok(n(a)? * 1_000_000_000 + n(b)?)
    };
    match link {
        "anon_inode:[eventfd]" => Ok(FdKind::EventFd {
            count: hex("eventfd-count")?,
            semaphore: dec("eventfd-semaphore").unwrap_or(0) != 0,
        }),
        "anon_inode:[timerfd]" => Ok(FdKind::TimerFd {
            clockid: dec("clockid")? as i32,
            value_ns: pair("it_value")?,
            interval_ns: pair("it_interval")?,
            ticks: dec("ticks")?,
        }),
        "anon_inode:[signalfd]" => Ok(FdKind::SignalFd {
            mask: hex("sigmask")?,
        }),
        "anon_inode:[eventpoll]" => {
            let mut targets = Vec::new();
            for line in info.text.lines().filter(|l| l.starts_with("tfd:")) {
                // tfd: %8d events: %8x data: %16llx  pos:... ino:... sdev:...
                let w: Vec<&str> = line.split_whitespace().collect();
                let get = |name: &str| {
                    w.iter()
                        .position(|x| *x == name)
                        .and_then(|i| w.get(i + 1))
                        .copied()
                };
                let bad = || format!("bad epoll line: {line}");
                targets.push(EpollTarget {
                    fd: get("tfd:").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
                    events: get("events:")
                        .and_then(|v| u32::from_str_radix(v, 16).ok())
                        .ok_or_else(bad)?,
                    data: get("data:")
                        .and_then(|v| u64::from_str_radix(v, 16).ok())
                        .ok_or_else(bad)?,
                });
            }
            Ok(FdKind::Epoll { targets })
        }
        "anon_inode:inotify" => {
            inotify(pid, fd, &info.text).map(|watches| FdKind::Inotify { watches })
        }
        _ => Err("this kind of object is not supported yet".into()),
    }
}

/// The `lock:` lines of an fdinfo: `lock:\t1: FLOCK  ADVISORY  WRITE 27570 fe:00:123 0 EOF`.
/// Lines with `->` are waiters, not holders.
fn parse_locks(fdinfo: &str) -> std::result::Result<Vec<FileLock>, String> {
    let mut out = Vec::new();
    for line in fdinfo
        .lines()
        .filter(|l| l.starts_with("lock:") && !l.contains("->"))
    {
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("cannot read its lock: {line}");
        if w.len() < 9 {
            return Err(bad());
        }
        let kind = match w[2] {
            "FLOCK" => LockKind::Flock,
            "OFDLCK" => LockKind::Ofd,
            "POSIX" => LockKind::Posix,
            other => return Err(format!("holds a {other} lock, which is not supported yet")),
        };
        out.push(FileLock {
            kind,
            write: w[4] == "WRITE",
            start: w[7].parse().map_err(|_| bad())?,
            end: if w[8] == "EOF" {
                None
            } else {
                Some(w[8].parse().map_err(|_| bad())?)
            },
        });
    }
    Ok(out)
}

/// Turns every fd matching `is_it` into the shell job's: allowed when dumping a shell job
/// and the object is one of the job's stdio, refused by name otherwise.
pub(super) fn externalize(
    procs: &mut [ProcessImage],
    shell_job: bool,
    key: &str,
    why: &str,
    is_it: impl Fn(&FdKind) -> bool,
) -> Result<()> {
    let is_stdio = procs
        .iter()
        .any(|p| p.fds.iter().any(|e| e.fd <= 2 && is_it(&e.kind)));
    for p in procs.iter_mut() {
        for e in p.fds.iter_mut().filter(|e| is_it(&e.kind)) {
            if !(shell_job && is_stdio) {
                return Err(DumpError::Unsupported {
                    pid: p.pid,
                    what: format!(
                        "fd {} is {key}, {why}{}",
                        e.fd,
                        if shell_job || !is_stdio {
                            ""
                        } else {
                            "; it is the job's stdio: dump it as a shell job (--shell-job)"
                        }
                    ),
                });
            }
            e.kind = FdKind::External {
                key: key.to_string(),
            };
        }
    }
    Ok(())
}

/// An inotify instance's watches, from its fdinfo: each names its file by a handle,
/// opened again through a mount of its filesystem to learn the path.
fn inotify(pid: Pid, fd: i32, fdinfo: &str) -> std::result::Result<Vec<InotifyWatch>, String> {
    let theirs = kext_shim::pidfd::pidfd_open(pid)
        .and_then(|p| kext_shim::pidfd::pidfd_getfd(&p, pid, fd))
        .map_err(|e| e.to_string())?;
    if kext_shim::pipe::bytes_queued(&theirs).map_err(|e| e.to_string())? > 0 {
        return Err("inotify events are waiting to be read; they cannot be kept yet".into());
    }
    let mounts = procfs::read_mountinfo(Pid::this()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for line in fdinfo.lines().filter(|l| l.starts_with("inotify ")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .ok_or_else(|| format!("bad inotify line: {line}"))
        };
        let hex = |k: &str| {
            field(k)
                .and_then(|v| u64::from_str_radix(v, 16).map_err(|_| format!("bad {k} in {line}")))
        };
        let sdev = hex("sdev:")?;
        let (major, minor) = ((sdev >> 20) as u32, (sdev & 0xfffff) as u32);
        let mount = mounts
            .iter()
            .find(|m| m.dev_major == major && m.dev_minor == minor)
            .ok_or_else(|| format!("no mount of device {major}:{minor} for an inotify watch"))?;
        let handle = field("f_handle:")?;
        let bytes: Vec<u8> = (0..handle.len() / 2)
            .map(|i| u8::from_str_radix(&handle[2 * i..2 * i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("bad handle in {line}"))?;
        let path = kext_shim::anon::path_of_handle(
            &mount.mount_point,
            hex("fhandle-type:")? as i32,
            &bytes,
        )
        .map_err(|e| format!("finding the file of an inotify watch: {e}"))?;
        out.push(InotifyWatch {
            wd: hex("wd:")? as i32,
            path,
            mask: hex("mask:")? as u32,
        });
    }
    out.sort_by_key(|w| w.wd);
    Ok(out)
}
