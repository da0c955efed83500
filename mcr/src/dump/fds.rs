//! The fd table.

use super::{DumpError, Result, StepContext};
use crate::model::{FdEntry, FdKind, FileRef, ProcessImage};
use kext_shim::procfs::{self, FileIdentity};
use kext_shim::Pid;

/// Terminal majors: /dev/tty*, /dev/console and ptmx (4, 5), Unix98 pty slaves (136-143).
fn is_terminal(rdev: u64) -> bool {
    let major = nix::sys::stat::major(rdev);
    major == 4 || major == 5 || (136..=143).contains(&major)
}

pub fn collect(pid: Pid, shell_job: bool) -> Result<Vec<FdEntry>> {
    let raw = pid.as_raw();
    let fds = procfs::list_fds(pid).step(pid, || "listing fds".into())?;
    let mut out = Vec::with_capacity(fds.len());
    // Objects behind stdio: with --shell-job they belong to the caller, and so does any
    // other fd that refers to the same object.
    let mut stdio_keys = Vec::new();
    for fd in fds {
        let link_path = format!("/proc/{pid}/fd/{fd}");
        let link = procfs::read_link(&link_path).step(pid, || format!("reading fd {fd}"))?;
        let info =
            procfs::read_fdinfo(pid, fd).step(pid, || format!("reading fdinfo of fd {fd}"))?;
        let ident =
            FileIdentity::of_path(&link_path).step(pid, || format!("stat of fd {fd} ({link})"))?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
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
                return Err(unsupported("this kind of object is not supported yet"))
            }
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
            libc::S_IFCHR if is_terminal(ident.rdev) => external(&mut stdio_keys)
                .ok_or_else(|| unsupported("a terminal; dump it as a shell job (--shell-job)"))?,
            libc::S_IFCHR => FdKind::CharDevice {
                file: file(),
                pos: info.pos,
            },
            libc::S_IFIFO | libc::S_IFSOCK => external(&mut stdio_keys).ok_or_else(|| {
                unsupported(
                    "pipes and sockets are supported only as a shell job's stdio (--shell-job)",
                )
            })?,
            _ => return Err(unsupported("this kind of file is not supported")),
        };
        out.push(FdEntry {
            fd,
            flags,
            cloexec,
            ofd: 0,
            kind,
        });
    }
    Ok(out)
}

/// Numbers the open file descriptions of every process of the image: two fds that kcmp
/// says are one description (dup'd, or inherited through fork) get one number, so that
/// restore opens the file once and they share an offset again.
pub fn number_file_descriptions(procs: &mut [ProcessImage]) -> Result<()> {
    // (identity, pid, fd, number) of every description seen so far.
    let mut seen: Vec<(crate::model::FileIdentity, i32, i32, u32)> = Vec::new();
    let mut next = 0u32;
    for p in procs.iter_mut() {
        let pid = Pid::from_raw(p.pid);
        for e in p.fds.iter_mut() {
            let ident = match &e.kind {
                FdKind::Regular { file, .. }
                | FdKind::CharDevice { file, .. }
                | FdKind::Directory { file } => file.identity,
                FdKind::External { .. } => continue,
            };
            let mut found = None;
            for &(id, opid, ofd, n) in &seen {
                if id.dev == ident.dev && id.ino == ident.ino && id.rdev == ident.rdev {
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
                seen.push((ident, p.pid, e.fd, next));
                next
            });
        }
    }
    Ok(())
}
