//! Unix sockets made again as they were connected: listeners first, then bound
//! sockets, then connections (pairs, accepted ones, ones still waiting in a listener's
//! queue, datagram sockets connected by name), each refilled with what waited on it.

use super::{RestoreError, Result};
use crate::model::{FdKind, InetSocketImage, ProcessImage, SocketLink, UnixSocketImage};
use kext_shim::anon::send_all;
use kext_shim::inet;
use kext_shim::unix;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

/// Socket inode -> our socket standing for it.
pub type Sockets = BTreeMap<u64, OwnedFd>;

/// A restored TCP connection: a copy of its socket and the state it was made from.
pub struct RestoredConn {
    sock: OwnedFd,
    state: kext_shim::tcp::TcpState,
    pid: i32,
}

/// A listener made again, with the connections that waited in its queue.
struct Listener {
    sock: OwnedFd,
    waiting: Vec<kext_shim::tcp::TcpState>,
    pid: i32,
}

/// The restore's connections, until it succeeds. Should it fail, they are put back in
/// repair mode before anything closes them: they go silently, as the dump's did, and
/// stay whole on the peers' side for another restore.
#[derive(Default)]
pub struct Connections {
    conns: Vec<RestoredConn>,
    listeners: Vec<Listener>,
    /// Where they were made, if not in our network namespace.
    pub netns: Option<std::path::PathBuf>,
    /// A table of ours stopping the waiting connections on the wire where the image's
    /// lock does not (another network namespace), from their listener's making to
    /// their return to its queue.
    own_lock: Option<String>,
    requeued: bool,
    pub done: bool,
}

impl Connections {
    /// Runs `f` in the network namespace the connections were made in: raw packets
    /// and nftables act on a namespace's stack.
    fn in_their_netns<T: Send>(
        &self,
        f: impl FnOnce() -> kext_shim::Result<T> + Send,
    ) -> kext_shim::Result<T> {
        match &self.netns {
            Some(ns) => kext_shim::clone::in_netns(&ns.display().to_string(), f),
            None => f(),
        }
    }

    /// The connections that waited in listeners' queues go back there, before any
    /// packet their peers sent meanwhile is let through (a listener would answer it
    /// with a reset): the program's accept() finds them as it left them.
    pub fn requeue(&mut self) -> Result<()> {
        if self.listeners.is_empty() {
            return Ok(());
        }
        let mut failed = None;
        let own = self.own_lock.clone();
        let listeners = &self.listeners;
        let r = self.in_their_netns(|| {
            'all: for l in listeners {
                for st in &l.waiting {
                    if let Err(e) = kext_shim::tcp::requeue(st) {
                        failed = Some((l.pid, st.peer, st.local, e));
                        break 'all;
                    }
                }
            }
            // The peers may talk now: what we send them passes again at once (the
            // table goes once the processes run).
            match &own {
                Some(t) => kext_shim::nft::open(t),
                None => Ok(()),
            }
        });
        self.requeued = true;
        if let Some((pid, peer, local, source)) = failed {
            return Err(RestoreError::Kernel {
                pid,
                step: format!("putting {peer} -> {local} back in its listener's queue"),
                source,
            });
        }
        let pid = self.listeners[0].pid;
        r.map_err(|source| RestoreError::Kernel {
            pid,
            step: "letting the waiting connections talk (nftables)".into(),
            source,
        })
    }

    /// The last of each, once it may talk on the wire: never-sent bytes, shutdowns,
    /// the peers' FINs (see kext_shim::tcp::finish).
    pub fn finish(&self) -> Result<()> {
        let mut todo = self
            .conns
            .iter()
            .filter(|c| kext_shim::tcp::unfinished(&c.state))
            .peekable();
        if todo.peek().is_none() {
            return Ok(());
        }
        let mut failed = None;
        let r = self.in_their_netns(|| {
            for c in todo {
                if let Err(e) = kext_shim::tcp::finish(&c.sock, &c.state) {
                    failed = Some((c, e));
                    break;
                }
            }
            Ok(())
        });
        if let Some((c, e)) = failed {
            return Err(RestoreError::Kernel {
                pid: c.pid,
                step: format!("finishing {} -> {}", c.state.local, c.state.peer),
                source: e,
            });
        }
        r.map_err(|source| RestoreError::Kernel {
            pid: self.conns[0].pid,
            step: "finishing the connections".into(),
            source,
        })
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        if !self.done && self.requeued {
            // Taken out of the queues again before the listeners close (which would
            // reset them), and closed in repair mode.
            for l in &self.listeners {
                let taken = kext_shim::inet::accept_waiting(&l.sock);
                for c in taken.into_iter().flatten() {
                    if let Err(e) = kext_shim::tcp::set_repair(&c, true) {
                        tracing::error!("a waiting connection: back to repair mode: {e}");
                    }
                }
            }
        }
        if let Some(t) = self.own_lock.take() {
            if let Err(e) = self.in_their_netns(|| kext_shim::nft::unlock(&t)) {
                tracing::error!("removing nftables table {t}: {e}");
            }
        }
        if self.done {
            return;
        }
        for c in &self.conns {
            if let Err(e) = kext_shim::tcp::set_repair(&c.sock, true) {
                tracing::error!(
                    "{} -> {}: back to repair mode: {e}",
                    c.state.local,
                    c.state.peer
                );
            }
        }
    }
}

/// Makes every socket of the image, in the current network namespace. `lock_netns`:
/// where the image's wire lock is, if it has one.
pub fn make(
    procs: &[ProcessImage],
    images: &[UnixSocketImage],
    inet: &[InetSocketImage],
    root: &super::root::RestoreRoot,
    lock_netns: Option<u64>,
) -> Result<(Sockets, Connections)> {
    let pid = procs.first().map(|p| p.pid).unwrap_or(0);
    let at = |name: &str| match name.strip_prefix('@') {
        Some(_) => name.to_string(),
        None => root.join(name).display().to_string(),
    };
    let mut made = Sockets::new();
    let mut conns = Connections::default();
    // Listeners and other bound sockets before the connections: a connection made
    // again leaves repair mode without address reuse, and a listener bound after it to
    // the same port would meet EADDRINUSE. (Inode order, the image's, says nothing of
    // which came first.)
    let (plain, connected): (Vec<_>, Vec<_>) = inet.iter().partition(|s| s.tcp.is_none());
    for s in plain.into_iter().chain(connected) {
        // Converted once: the queues it carries may be megabytes.
        let state = s.tcp.as_ref().map(kext_shim::tcp::TcpState::from);
        let sock = make_inet(pid, s, state.as_ref())?;
        // Ours, to act on it (and to finish, requeue or silence it) once the process
        // holds the original.
        let copy = |what: &str| {
            sock.try_clone().map_err(|e| RestoreError::File {
                pid,
                what: what.into(),
                path: format!("socket:[{}]", s.ino),
                why: format!("dup: {e}"),
            })
        };
        if let Some(state) = state {
            let copy = copy("TCP socket")?;
            conns.conns.push(RestoredConn {
                sock: copy,
                state,
                pid,
            });
        }
        if !s.waiting.is_empty() {
            let copy = copy("TCP listener")?;
            conns.listeners.push(Listener {
                sock: copy,
                waiting: s
                    .waiting
                    .iter()
                    .map(kext_shim::tcp::TcpState::from)
                    .collect(),
                pid,
            });
        }
        made.insert(s.ino, sock);
    }
    let here = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
    };
    if !conns.listeners.is_empty() && lock_netns != Some(here()) {
        // Made before the service address comes: from then on, what the peers send
        // must not meet a listener without their connections (it answers resets).
        let tuples: Vec<_> = conns
            .listeners
            .iter()
            .flat_map(|l| l.waiting.iter().map(|w| (w.local, w.peer)))
            .collect();
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let table = kext_shim::nft::table_name(tag);
        let me = Some(std::process::id());
        kext_shim::nft::lock(&table, &tuples, kext_shim::nft::Inbound::Drop, me).map_err(|e| {
            RestoreError::Kernel {
                pid,
                step: "stopping the waiting connections on the wire (nftables)".into(),
                source: e,
            }
        })?;
        conns.own_lock = Some(table);
    }
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for p in procs {
        for e in &p.fds {
            let FdKind::UnixListener {
                ino,
                kind,
                name,
                backlog,
                mode,
            } = &e.kind
            else {
                continue;
            };
            if made.contains_key(ino) {
                continue;
            }
            let path = at(name);
            let err = |why: String| RestoreError::File {
                pid: p.pid,
                what: format!("fd {} (listening unix socket)", e.fd),
                path: path.clone(),
                why,
            };
            let sock = unix::listen(*kind, &path, *backlog).map_err(|e| err(e.to_string()))?;
            if *mode != 0 {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode & 0o7777))
                    .map_err(|e| err(format!("chmod: {e}")))?;
            }
            made.insert(*ino, sock);
            names.insert(*ino, path);
        }
    }
    let find = |ino: u64| images.iter().find(|s| s.ino == ino);
    let err = |s: &UnixSocketImage, why: String| RestoreError::File {
        pid,
        what: "unix socket".into(),
        path: format!(
            "socket:[{}]{}",
            s.ino,
            s.name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ),
        why,
    };
    let bound = |s: &UnixSocketImage| -> Result<OwnedFd> {
        let sock = unix::socket(s.kind).map_err(|e| err(s, e.to_string()))?;
        if let Some(n) = &s.name {
            unix::bind(&sock, &at(n)).map_err(|e| err(s, e.to_string()))?;
        }
        Ok(sock)
    };
    // Every socket that others may connect to by name exists before any connects.
    for s in images {
        if matches!(
            s.link,
            SocketLink::Unconnected | SocketLink::ConnectedTo { .. }
        ) {
            made.insert(s.ino, bound(s)?);
        }
    }
    for s in images {
        let err = |why: String| err(s, why);
        match &s.link {
            SocketLink::Unconnected => {
                if !s.queue.is_empty() {
                    let name = s.name.as_deref().map(at).unwrap_or_default();
                    unix::send_to(s.kind, &name, &s.queue)
                        .map_err(|e| err(format!("refilling: {e}")))?;
                }
            }
            SocketLink::ConnectedTo { name } => {
                unix::connect(&made[&s.ino], &at(name)).map_err(|e| err(e.to_string()))?;
            }
            SocketLink::Pair { peer } => {
                if made.contains_key(&s.ino) {
                    continue;
                }
                let other =
                    find(*peer).ok_or_else(|| err("its peer is not in the image".into()))?;
                let (a, b) = kext_shim::anon::socketpair(s.kind).map_err(|e| err(e.to_string()))?;
                // What waits on one end was sent from the other.
                refill(&b, s).map_err(&err)?;
                refill(&a, other).map_err(&err)?;
                made.insert(s.ino, a);
                made.insert(*peer, b);
            }
            SocketLink::Client { listener, accepted } => {
                let sock = bound(s)?;
                let lname = names.get(listener).ok_or_else(|| {
                    err(format!(
                        "its listener socket:[{listener}] is not in the image"
                    ))
                })?;
                // A full queue must fail, not hang us.
                nonblocking(&sock, true).map_err(&err)?;
                unix::connect(&sock, lname).map_err(|e| err(e.to_string()))?;
                nonblocking(&sock, false).map_err(&err)?;
                if let Some(a) = accepted {
                    let server = unix::accept(&made[listener]).map_err(|e| err(e.to_string()))?;
                    let other = find(*a)
                        .ok_or_else(|| err("its accepted end is not in the image".into()))?;
                    refill(&server, s).map_err(&err)?;
                    refill(&sock, other).map_err(&err)?;
                    made.insert(*a, server);
                }
                made.insert(s.ino, sock);
            }
            // Made with its client.
            SocketLink::Accepted { .. } => {}
            SocketLink::PeerClosed => {
                let (a, b) = kext_shim::anon::socketpair(s.kind).map_err(|e| err(e.to_string()))?;
                refill(&b, s).map_err(&err)?;
                made.insert(s.ino, a);
            }
        }
    }
    Ok((made, conns))
}

/// A TCP listener or UDP socket with the options the program had set, bound (with
/// SO_REUSEADDR for the bind only, unless it had it: a port the original's connections
/// left in TIME_WAIT is free to take again), listening or connected as it was.
/// IP_TRANSPARENT (IPv6 sockets honour it too) lets a socket bind, and a repaired
/// connection route, from its address before the address is there: a migration moves
/// the service address only once the destination is ready, after its sockets were
/// made. (IP_ANY_SOURCE allows the bind, but the connection's route lookup then fails
/// with ENETUNREACH.) Set only when a bind without it finds the address missing (two
/// setsockopt a connection fewer in place), and back to the program's own value
/// right after.
const ANY_SOURCE: (i32, i32) = (libc::IPPROTO_IP, libc::IP_TRANSPARENT);

/// The value the program had for an option: the image holds those it changed.
fn theirs(s: &InetSocketImage, opt: (i32, i32)) -> Vec<u8> {
    s.options
        .iter()
        .find(|(l, n, _)| (*l, *n) == opt)
        .map_or(0i32.to_ne_bytes().to_vec(), |(_, _, v)| v.clone())
}

fn make_inet(
    pid: i32,
    s: &InetSocketImage,
    conn: Option<&kext_shim::tcp::TcpState>,
) -> Result<OwnedFd> {
    let err = |why: String| RestoreError::File {
        pid,
        what: "TCP/UDP socket".into(),
        path: format!(
            "socket:[{}]{}",
            s.ino,
            s.local.map(|a| format!(" ({a})")).unwrap_or_default()
        ),
        why,
    };
    let k = |e: kext_shim::Error| err(e.to_string());
    let reuse = (libc::SOL_SOCKET, libc::SO_REUSEADDR);
    if let Some(conn) = conn {
        // The program's options first, then the connection, in repair mode, then
        // SO_REUSEADDR, which repair mode overrode.
        let foreign = std::cell::Cell::new(false);
        let sock = kext_shim::tcp::restore(
            conn,
            |sock| {
                for (level, name, value) in &s.options {
                    if (*level, *name) != reuse {
                        inet::set_option(sock, *level, *name, value)?;
                    }
                }
                Ok(())
            },
            |sock| {
                foreign.set(true);
                inet::set_option(sock, ANY_SOURCE.0, ANY_SOURCE.1, &1i32.to_ne_bytes())
            },
        )
        .map_err(|e| err(format!("{} -> {}: {e}", conn.local, conn.peer)))?;
        if foreign.get() {
            inet::set_option(&sock, ANY_SOURCE.0, ANY_SOURCE.1, &theirs(s, ANY_SOURCE))
                .map_err(k)?;
        }
        if let Some((_, _, v)) = s.options.iter().find(|(l, n, _)| (*l, *n) == reuse) {
            inet::set_option(&sock, reuse.0, reuse.1, v).map_err(k)?;
        }
        return Ok(sock);
    }
    let sock = inet::socket(s.family, s.protocol).map_err(k)?;
    for (level, name, value) in &s.options {
        if (*level, *name) != reuse {
            inet::set_option(&sock, *level, *name, value).map_err(k)?;
        }
    }
    if let Some(local) = &s.local {
        inet::set_option(&sock, reuse.0, reuse.1, &1i32.to_ne_bytes()).map_err(k)?;
        let foreign = std::cell::Cell::new(false);
        kext_shim::tcp::bind_maybe_foreign(&sock, local, |sock| {
            foreign.set(true);
            inet::set_option(sock, ANY_SOURCE.0, ANY_SOURCE.1, &1i32.to_ne_bytes())
        })
        .map_err(k)?;
        inet::set_option(&sock, reuse.0, reuse.1, &theirs(s, reuse)).map_err(k)?;
        if foreign.get() {
            inet::set_option(&sock, ANY_SOURCE.0, ANY_SOURCE.1, &theirs(s, ANY_SOURCE))
                .map_err(k)?;
        }
    }
    if let Some(backlog) = s.listen {
        inet::listen(&sock, backlog).map_err(k)?;
    }
    if let Some(peer) = &s.peer {
        inet::connect(&sock, peer).map_err(k)?;
    }
    if !s.datagrams.is_empty() {
        refill_datagrams(&sock, s).map_err(|e| err(format!("refilling its datagrams: {e}")))?;
    }
    Ok(sock)
}

/// Hands `sock` (`s` made again) what waited on it, each datagram from its sender.
fn refill_datagrams(sock: &OwnedFd, s: &InetSocketImage) -> kext_shim::Result<()> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let here = inet::local_addr(sock)?;
    for (from, data) in &s.datagrams {
        // A dual-stack socket saw IPv4 senders as mapped addresses: they come as IPv4.
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let ip = match (from.ip(), here.ip()) {
            (IpAddr::V4(_), IpAddr::V4(a)) if !a.is_unspecified() => IpAddr::V4(a),
            (IpAddr::V4(_), IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
                IpAddr::V4(a.to_ipv4_mapped().expect("mapped"))
            }
            (IpAddr::V4(_), _) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (IpAddr::V6(_), IpAddr::V6(a)) if !a.is_unspecified() => IpAddr::V6(a),
            (IpAddr::V6(_), _) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        inet::inject_udp(&from, &SocketAddr::new(ip, here.port()), data)?;
    }
    Ok(())
}

/// Sends what waits on `s` through `from`, its peer.
fn refill(from: &OwnedFd, s: &UnixSocketImage) -> std::result::Result<(), String> {
    send_all(from, &s.queue, s.kind == libc::SOCK_STREAM).map_err(|e| format!("refilling: {e}"))
}

fn nonblocking(sock: &OwnedFd, on: bool) -> std::result::Result<(), String> {
    let fl = if on {
        nix::fcntl::OFlag::O_NONBLOCK
    } else {
        nix::fcntl::OFlag::empty()
    };
    nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl))
        .map(|_| ())
        .map_err(|e| format!("F_SETFL: {e}"))
}
