//! TCP and UDP sockets: listeners and UDP sockets are made again as they were bound;
//! established TCP connections are named and refused until TCP_REPAIR takes them.

use super::fds::externalize;
use super::{DumpError, Result, StepContext};
use crate::model::{FdKind, InetSocketImage, ProcessImage};
use kext_shim::inet::{self, InetSocket, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN};
use kext_shim::Pid;
use std::collections::BTreeMap;

fn describe(s: &InetSocket) -> String {
    let proto = if s.protocol == libc::IPPROTO_TCP {
        "TCP"
    } else {
        "UDP"
    };
    format!("{proto} socket on {}", s.local)
}

/// Turns every TCP or UDP socket fd of the tree into an [`FdKind::InetSocket`] with its
/// image, or refuses it by name. Sockets of other families are left for the unix pass.
pub fn resolve(procs: &mut [ProcessImage], shell_job: bool) -> Result<Vec<InetSocketImage>> {
    let mut holders: BTreeMap<u64, (i32, i32)> = BTreeMap::new();
    for p in procs.iter() {
        for e in &p.fds {
            if let FdKind::UnixSocket { ino } = e.kind {
                holders.entry(ino).or_insert((p.pid, e.fd));
            }
        }
    }
    if holders.is_empty() {
        return Ok(Vec::new());
    }
    let root = Pid::from_raw(procs.first().map(|p| p.pid).unwrap_or(0));
    let all =
        inet::inet_sockets().step(root, || "listing TCP and UDP sockets (sock_diag)".into())?;
    let mut out = Vec::new();
    let mut established = Vec::new();
    for (&ino, &(pid, fd)) in &holders {
        let unlisted;
        let s = match all.get(&ino) {
            Some(s) => s,
            None => {
                // Never bound: in no table. Unix sockets are left for their own pass.
                let at = Pid::from_raw(pid);
                let (family, protocol) = inet::domain_of(at, fd)
                    .step(at, || format!("reading the family of fd {fd}"))?;
                let inet_family = family == libc::AF_INET || family == libc::AF_INET6;
                if !inet_family || ![libc::IPPROTO_TCP, libc::IPPROTO_UDP].contains(&protocol) {
                    continue;
                }
                let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
                unlisted = InetSocket {
                    ino,
                    family,
                    protocol,
                    state: TCP_CLOSE,
                    local: any,
                    peer: any,
                    rqueue: 0,
                    wqueue: 0,
                };
                &unlisted
            }
        };
        let key = format!("socket:[{ino}]");
        let is_it = |k: &FdKind| matches!(k, FdKind::UnixSocket { ino: i } if *i == ino);
        let tcp = s.protocol == libc::IPPROTO_TCP;
        let refusal = match (tcp, s.state) {
            (true, TCP_LISTEN) if s.rqueue > 0 => Some(format!(
                "a listening {} with {} connections waiting to be accepted, which are not supported yet",
                describe(s),
                s.rqueue
            )),
            (true, TCP_LISTEN | TCP_CLOSE) => None,
            (true, state) => {
                let stdio = procs
                    .iter()
                    .any(|p| p.fds.iter().any(|e| e.fd <= 2 && is_it(&e.kind)));
                if shell_job && stdio {
                    externalize(procs, shell_job, &key, "", is_it)?;
                } else {
                    established.push(format!(
                        "{} -> {} ({}, pid {pid} fd {fd})",
                        s.local,
                        s.peer,
                        inet::tcp_state_name(state)
                    ));
                }
                continue;
            }
            (false, _) if s.rqueue > 0 => Some(format!(
                "a {} with datagrams waiting to be read, which are not kept yet",
                describe(s)
            )),
            (false, _) => None,
        };
        if let Some(why) = refusal {
            externalize(procs, shell_job, &key, &why, is_it)?;
            continue;
        }
        let options = inet::changed_options(Pid::from_raw(pid), fd, s.family, s.protocol)
            .step(Pid::from_raw(pid), || {
                format!("reading the options of fd {fd} ({key})")
            })?;
        out.push(InetSocketImage {
            ino,
            family: s.family,
            protocol: s.protocol,
            local: (s.local.port() != 0).then_some(s.local),
            peer: (!tcp && s.state == TCP_ESTABLISHED).then_some(s.peer),
            listen: (tcp && s.state == TCP_LISTEN).then_some(s.wqueue),
            options,
        });
        for p in procs.iter_mut() {
            for e in p.fds.iter_mut().filter(|e| is_it(&e.kind)) {
                e.kind = FdKind::InetSocket { ino };
            }
        }
    }
    if !established.is_empty() {
        return Err(DumpError::Unsupported {
            pid: root.as_raw(),
            what: format!(
                "{} TCP connections, which need --tcp-established (not supported yet): {}",
                established.len(),
                established.join(", ")
            ),
        });
    }
    Ok(out)
}
