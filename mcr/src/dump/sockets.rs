//! Unix sockets, decided for the whole tree: what each one is connected to says how a
//! restore makes it again. Queues are peeked, never taken.

use super::fds::externalize;
use super::{Result, StepContext};
use crate::model::{FdKind, ProcessImage, SocketLink, UnixSocketImage};
use kext_shim::unix::UnixSocket;
use kext_shim::Pid;
use std::collections::BTreeMap;

const LISTENING: u8 = 10;

/// sock_diag's table of unix sockets, read once per dump (and not at all for a tree
/// without sockets): the inet pass uses it to leave unix sockets alone.
pub fn unix_table(procs: &[ProcessImage]) -> Result<BTreeMap<u64, UnixSocket>> {
    if socket_holders(procs).is_empty() {
        return Ok(BTreeMap::new());
    }
    let root = Pid::from_raw(procs.first().map_or(0, |p| p.pid));
    kext_shim::unix::unix_sockets().step(root, || "listing unix sockets (sock_diag)".into())
}

/// Each socket not decided yet (still an [`FdKind::UnixSocket`]), with one (pid, fd)
/// holding it.
pub(super) fn socket_holders(procs: &[ProcessImage]) -> BTreeMap<u64, (i32, i32)> {
    let mut holders = BTreeMap::new();
    for p in procs {
        for e in &p.fds {
            if let FdKind::UnixSocket { ino } = e.kind {
                holders.entry(ino).or_insert((p.pid, e.fd));
            }
        }
    }
    holders
}

fn name_of(s: &UnixSocket) -> String {
    s.name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

/// What each unix socket of the tree is:
/// - a listener (bound, listening) becomes an fd of its own kind, with its name;
/// - a connected pair with both ends inside is made again as a pair, or, when one end
///   was accepted from a listener of the tree, by connecting and accepting again;
/// - a connection still waiting in a listener's queue is connected again, not accepted;
/// - a datagram socket connected to a bound one (inside or out) is connected by name;
/// - an unconnected one is made and bound as it was.
///
/// Anything else is a shell job's stdio, or refused by name.
/// `all` is sock_diag's table of unix sockets (see [`unix_table`]).
pub fn resolve(
    procs: &mut [ProcessImage],
    shell_job: bool,
    all: &BTreeMap<u64, UnixSocket>,
) -> Result<Vec<UnixSocketImage>> {
    let holders = socket_holders(procs);
    if holders.is_empty() {
        return Ok(Vec::new());
    }
    let listeners: BTreeMap<u64, &UnixSocket> = holders
        .keys()
        .filter_map(|i| all.get(i))
        .filter(|s| s.state == LISTENING && s.name.is_some())
        .map(|s| (s.ino, s))
        .collect();
    let listener_named = |name: &Option<String>| {
        name.as_ref().and_then(|n| {
            listeners
                .values()
                .find(|l| l.name.as_ref() == Some(n))
                .map(|l| l.ino)
        })
    };
    // A connection waiting in a listener's queue, by its client's socket (sock_diag
    // names the client, not the socket the connection will be accepted as).
    let waiting: BTreeMap<u64, u64> = listeners
        .values()
        .flat_map(|l| l.icons.iter().map(|&c| (c, l.ino)))
        .collect();

    let mut out = Vec::new();
    let mut pending = Vec::new();
    for (&ino, &(pid, fd)) in &holders {
        let key = format!("socket:[{ino}]");
        let refuse = |why: String| (key.clone(), why);
        let decided: std::result::Result<Option<SocketLink>, (String, String)> = (|| {
            let Some(s) = all.get(&ino) else {
                return Err(refuse(
                    "a socket of a family not supported yet (only unix, TCP and UDP ones are)"
                        .into(),
                ));
            };
            if s.state == LISTENING {
                if s.name.is_none() {
                    return Err(refuse("an unnamed listening unix socket".into()));
                }
                // Every waiting connection must come from the tree, with nothing sent yet
                // (what the client sent is charged to it until the server reads it).
                for c in &s.icons {
                    if !holders.contains_key(c) {
                        return Err(refuse(format!(
                            "a listening unix socket{} with a connection waiting from outside the tree",
                            name_of(s)
                        )));
                    }
                    if all.get(c).is_some_and(|x| x.backlog > 0) {
                        return Err(refuse(format!(
                            "a listening unix socket{} with a waiting connection that already sent data",
                            name_of(s)
                        )));
                    }
                }
                return Ok(None);
            }
            let stream = s.kind != libc::SOCK_DGRAM;
            let link = match s.peer {
                _ if waiting.contains_key(&ino) => SocketLink::Client {
                    listener: waiting[&ino],
                    accepted: None,
                },
                None => SocketLink::Unconnected,
                // sock_diag names no peer once the other end is gone.
                Some(0) if stream => SocketLink::PeerClosed,
                Some(p) if holders.contains_key(&p) => {
                    let ps = all.get(&p);
                    let peer_name = ps.and_then(|x| x.name.clone());
                    if stream {
                        if listener_named(&s.name).is_some() {
                            SocketLink::Accepted { client: p }
                        } else if let Some(l) = listener_named(&peer_name) {
                            SocketLink::Client {
                                listener: l,
                                accepted: Some(p),
                            }
                        } else if s.name.is_none() && peer_name.is_none() {
                            SocketLink::Pair { peer: p }
                        } else {
                            return Err(refuse(format!(
                                "a unix socket{} connected to one{} that no listener of the tree accepted",
                                name_of(s),
                                peer_name.map(|n| format!(" ({n})")).unwrap_or_default()
                            )));
                        }
                    } else if s.name.is_none()
                        && peer_name.is_none()
                        && ps.and_then(|x| x.peer) == Some(ino)
                    {
                        SocketLink::Pair { peer: p }
                    } else if let Some(n) = peer_name {
                        SocketLink::ConnectedTo { name: n }
                    } else {
                        return Err(refuse(
                            "a datagram socket connected to an unnamed one it is not paired with"
                                .into(),
                        ));
                    }
                }
                Some(p) => match all.get(&p).and_then(|x| x.name.clone()) {
                    Some(n) if !stream => SocketLink::ConnectedTo { name: n },
                    n => {
                        return Err(refuse(format!(
                            "a unix socket whose peer{} is outside the tree",
                            n.map(|n| format!(" ({n})")).unwrap_or_default()
                        )))
                    }
                },
            };
            Ok(Some(link))
        })();
        let link = match decided {
            Ok(Some(l)) => l,
            Ok(None) => {
                let s = &all[&ino];
                let name = s.name.clone().unwrap_or_default();
                let mode = if name.starts_with('@') {
                    0
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::metadata(&name)
                        .map(|m| m.permissions().mode())
                        .unwrap_or(0)
                };
                let listener = FdKind::UnixListener {
                    ino,
                    kind: s.kind,
                    name,
                    backlog: s.backlog,
                    mode,
                };
                for p in procs.iter_mut() {
                    for e in p.fds.iter_mut() {
                        if matches!(e.kind, FdKind::UnixSocket { ino: i } if i == ino) {
                            e.kind = listener.clone();
                        }
                    }
                }
                continue;
            }
            Err((key, why)) => {
                externalize(
                    procs,
                    shell_job,
                    &key,
                    &why,
                    |k| matches!(k, FdKind::UnixSocket { ino: i } if *i == ino),
                )?;
                continue;
            }
        };
        let s = &all[&ino];
        let stream = s.kind == libc::SOCK_STREAM;
        // An unconnected stream socket has nothing to read (and recv says EINVAL).
        let queue = if s.kind != libc::SOCK_DGRAM && link == SocketLink::Unconnected {
            Vec::new()
        } else {
            kext_shim::unix::peek_queue(Pid::from_raw(pid), fd, stream)
                .step(Pid::from_raw(pid), || {
                    format!("reading what is queued on fd {fd} ({key})")
                })?
        };
        // What waits on it is sent again at restore: by its peer for a pair or an
        // accepted connection, else by a stand-in to its name, which a connected
        // datagram socket would refuse (only its peer may send to it).
        let refill_ok = match &link {
            SocketLink::Pair { .. }
            | SocketLink::Accepted { .. }
            | SocketLink::PeerClosed
            | SocketLink::Client {
                accepted: Some(_), ..
            } => true,
            SocketLink::Unconnected => s.name.is_some() && !stream,
            SocketLink::ConnectedTo { .. } | SocketLink::Client { accepted: None, .. } => false,
        };
        if !queue.is_empty() && !refill_ok {
            externalize(
                procs,
                shell_job,
                &key,
                &format!(
                    "a unix socket{} with {} messages waiting that cannot be sent to it again",
                    name_of(s),
                    queue.len()
                ),
                |k| matches!(k, FdKind::UnixSocket { ino: i } if *i == ino),
            )?;
            continue;
        }
        let img = UnixSocketImage {
            ino,
            kind: s.kind,
            name: s.name.clone(),
            link,
            queue,
        };
        // Waiting connections go last, in their listener's queue order.
        match &img.link {
            SocketLink::Client { accepted: None, .. } => pending.push(img),
            _ => out.push(img),
        }
    }
    let order = |i: &UnixSocketImage| {
        listeners
            .values()
            .find_map(|l| l.icons.iter().position(|&c| c == i.ino))
            .unwrap_or(usize::MAX)
    };
    pending.sort_by_key(order);
    out.extend(pending);
    Ok(out)
}
