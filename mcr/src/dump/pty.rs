//! Pseudo-terminals: one whose master is inside the tree is part of the image, with its
//! settings and the session it controls; a slave whose master is outside is the shell
//! job's terminal, or refused.

use super::{DumpError, Result, StepContext};
use crate::model::{FdKind, ProcessImage, PtyImage};
use kext_shim::pidfd::{pidfd_getfd, pidfd_open};
use kext_shim::procfs::Stat;
use kext_shim::Pid;
use std::os::fd::OwnedFd;

fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    let p = Pid::from_raw(pid);
    pidfd_open(p)
        .and_then(|h| pidfd_getfd(&h, p, fd))
        .step(p, || format!("taking a copy of fd {fd}"))
}

/// The pty index of a controlling terminal as /proc/PID/stat encodes it (tty_nr), if
/// it is a Unix98 pty slave.
fn ctty_index(tty_nr: u64) -> Option<u32> {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    (136..=143)
        .contains(&major)
        .then_some(((major - 136) * 256 + minor) as u32)
}

pub fn resolve(procs: &mut [ProcessImage], shell_job: bool) -> Result<Vec<PtyImage>> {
    let mut masters: Vec<(u32, i32, i32)> = Vec::new();
    for p in procs.iter() {
        for e in &p.fds {
            if let FdKind::PtyMaster { index } = e.kind {
                if !masters.iter().any(|m| m.0 == index) {
                    masters.push((index, p.pid, e.fd));
                }
            }
        }
    }
    // Slaves of ptys whose master is elsewhere: the job's terminal, or refused.
    for p in procs.iter_mut() {
        let stdio: Vec<String> = p
            .fds
            .iter()
            .filter(|e| e.fd <= 2)
            .filter_map(|e| match &e.kind {
                FdKind::PtySlave { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        for e in p.fds.iter_mut() {
            let FdKind::PtySlave { index, path } = &e.kind else {
                continue;
            };
            if masters.iter().any(|m| m.0 == *index) {
                continue;
            }
            if shell_job && stdio.contains(path) {
                e.kind = FdKind::External { key: path.clone() };
                continue;
            }
            return Err(DumpError::Unsupported {
                pid: p.pid,
                what: format!(
                    "fd {} is {path}, a terminal whose master is outside the tree{}",
                    e.fd,
                    if shell_job {
                        ""
                    } else {
                        "; dump it as a shell job (--shell-job)"
                    }
                ),
            });
        }
    }
    let mut out = Vec::with_capacity(masters.len());
    for &(index, pid, fd) in &masters {
        let master = take_fd(pid, fd)?;
        let slave = procs.iter().find_map(|p| {
            p.fds.iter().find_map(|e| match e.kind {
                FdKind::PtySlave { index: i, .. } if i == index => Some((p.pid, e.fd)),
                _ => None,
            })
        });
        let slave = slave.map(|(p, f)| take_fd(p, f)).transpose()?;
        let st = kext_shim::pty::read_state(&master, slave.as_ref())
            .step(Pid::from_raw(pid), || {
                format!("reading the state of pty {index}")
            })?;
        if st.to_master > 0 || st.to_slave > 0 {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "fd {fd} is the master of pty {index}, which has {} bytes in flight; \
                     they cannot be kept yet",
                    st.to_master + st.to_slave
                ),
            });
        }
        let mut session = None;
        for p in procs.iter() {
            let at = Pid::from_raw(p.pid);
            let stat = Stat::read(at).step(at, || "reading stat".into())?;
            if p.pid == p.sid && ctty_index(stat.field(7)) == Some(index) {
                session = Some((p.pid, stat.field(8) as i32));
            }
        }
        let ptmx = kext_shim::procfs::read_link(&format!("/proc/{pid}/fd/{fd}"))
            .step(Pid::from_raw(pid), || format!("reading fd {fd}"))?;
        out.push(PtyImage {
            index,
            ptmx,
            termios: st.termios,
            master_termios: st.master_termios,
            winsize: st.winsize,
            locked: st.locked,
            packet: st.packet,
            session,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::ctty_index;

    #[test]
    fn decodes_tty_nr() {
        // /dev/pts/3 and /dev/pts/300, as the kernel's new_encode_dev writes them.
        assert_eq!(ctty_index((136 << 8) | 3), Some(3));
        assert_eq!(
            ctty_index((136 << 8) | (300 & 0xff) | ((300 & !0xff) << 12)),
            Some(300)
        );
        assert_eq!(ctty_index(4 << 8), None);
    }
}
