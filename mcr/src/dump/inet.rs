//! TCP and UDP sockets: listeners and UDP sockets are made again as they were bound;
//! established TCP connections are taken with --tcp-established (see [`TcpCapture`]),
//! and otherwise named and refused.

use super::fds::externalize;
use super::{DumpError, Result, StepContext};
use crate::model::{FdKind, InetSocketImage, NetLockImage, ProcessImage};
use crate::netlock::WireLock;
use kext_shim::inet::{self, InetSocket, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN};
use kext_shim::Pid;

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
pub fn resolve(
    procs: &mut [ProcessImage],
    shell_job: bool,
    tcp_established: bool,
    unix: &std::collections::BTreeMap<u64, kext_shim::unix::UnixSocket>,
) -> Result<(Vec<InetSocketImage>, TcpCapture)> {
    let mut capture = TcpCapture::default();
    let holders = super::sockets::socket_holders(procs);
    if holders.is_empty() {
        return Ok((Vec::new(), capture));
    }
    let root = Pid::from_raw(procs.first().map(|p| p.pid).unwrap_or(0));
    let mut out = Vec::new();
    let mut established = Vec::new();
    let mut fresh = inet::FreshOptions::default();
    let mut pidfds = std::collections::BTreeMap::new();
    for (&ino, &(pid, fd)) in &holders {
        // Unix sockets are left for their own pass.
        if unix.contains_key(&ino) {
            continue;
        }
        let at = Pid::from_raw(pid);
        let pidfd = match pidfds.entry(pid) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(kext_shim::pidfd::pidfd_open(at).step(at, || "pidfd_open".into())?)
            }
        };
        let sock = kext_shim::pidfd::pidfd_getfd(pidfd, at, fd)
            .step(at, || format!("taking a copy of fd {fd} (socket:[{ino}])"))?;
        // Read from the socket, not from sock_diag: the cost is the tree's sockets,
        // not the host's.
        let described = inet::describe(&sock, ino)
            .step(at, || format!("reading socket fd {fd} (socket:[{ino}])"))?;
        // Of another family: left for the unix pass, which names it.
        let Some(s) = described else { continue };
        let s = &s;
        let key = format!("socket:[{ino}]");
        let is_it = |k: &FdKind| matches!(k, FdKind::UnixSocket { ino: i } if *i == ino);
        let tcp = s.protocol == libc::IPPROTO_TCP;
        let mut held = None;
        let refusal = match (tcp, s.state) {
            (true, TCP_LISTEN) if s.rqueue > 0 && !tcp_established => {
                let waiting: Vec<String> = inet::waiting_connections(&s.local)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| format!("{} -> {}", c.peer, c.local))
                    .collect();
                Some(format!(
                    "a listening {} with {} connections waiting to be accepted{}, which are only taken with --tcp-established",
                    describe(s),
                    s.rqueue,
                    if waiting.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", waiting.join(", "))
                    }
                ))
            }
            (true, TCP_LISTEN | TCP_CLOSE) => None,
            (true, state) if tcp_established && kext_shim::tcp::can_take(state) => {
                held = Some((s.local, s.peer));
                None
            }
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
            (false, _) => None,
        };
        if let Some(why) = refusal {
            externalize(procs, shell_job, &key, &why, is_it)?;
            continue;
        }
        let options = inet::changed_options(&sock, s.family, s.protocol, &mut fresh)
            .step(at, || format!("reading the options of fd {fd} ({key})"))?;
        let datagrams = if !tcp && s.rqueue > 0 {
            match inet::peek_datagrams(&sock) {
                Ok(q) => q,
                Err(e) => {
                    externalize(
                        procs,
                        shell_job,
                        &key,
                        &format!("a {}: {e}", describe(s)),
                        is_it,
                    )?;
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        if tcp && s.state == TCP_LISTEN && s.rqueue > 0 {
            // Out of the queue and into our hands; put back should the dump not go on.
            let taken = inet::accept_waiting(&sock).step(at, || {
                format!(
                    "taking the connections waiting on fd {fd} ({})",
                    describe(s)
                )
            })?;
            for conn in taken {
                let addrs = inet::local_addr(&conn).and_then(|l| Ok((l, inet::peer_addr(&conn)?)));
                let (local, peer) = addrs.step(at, || {
                    format!("a connection waiting on fd {fd} ({})", describe(s))
                })?;
                capture.waiting.push(Waiting {
                    listener: ino,
                    pid,
                    local,
                    peer,
                    sock: Some(conn),
                    repair: false,
                    state: None,
                });
            }
        }
        if let Some((local, peer)) = held {
            let reuse = options
                .iter()
                .find(|(l, n, _)| (*l, *n) == (libc::SOL_SOCKET, libc::SO_REUSEADDR))
                .map(|(_, _, v)| v.clone());
            capture.conns.push(Held {
                ino,
                pid,
                fd,
                local,
                peer,
                sock,
                repair: false,
                reuse,
            });
        }
        out.push(InetSocketImage {
            ino,
            family: s.family,
            protocol: s.protocol,
            local: (s.local.port() != 0).then_some(s.local),
            peer: (!tcp && s.state == TCP_ESTABLISHED).then_some(s.peer),
            listen: (tcp && s.state == TCP_LISTEN).then_some(s.wqueue),
            options,
            tcp: None,
            datagrams,
            waiting: Vec::new(),
        });
        for p in procs.iter_mut() {
            for e in p.fds.iter_mut().filter(|e| is_it(&e.kind)) {
                e.kind = FdKind::InetSocket { ino };
            }
        }
    }
    if !established.is_empty() {
        let why = if tcp_established {
            "not yet open, which are not supported yet"
        } else {
            "which are only taken with --tcp-established"
        };
        return Err(DumpError::Unsupported {
            pid: root.as_raw(),
            what: format!(
                "{} TCP connections, {why}: {}",
                established.len(),
                established.join(", ")
            ),
        });
    }
    Ok((out, capture))
}

/// An established connection being taken: who holds it, and our copy of its socket.
struct Held {
    ino: u64,
    pid: i32,
    fd: i32,
    local: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    sock: std::os::fd::OwnedFd,
    /// Put in repair mode by us.
    repair: bool,
    /// The program's SO_REUSEADDR, which leaving repair mode clears.
    reuse: Option<Vec<u8>>,
}

/// A connection that waited in a listener's queue, taken out of it by us.
struct Waiting {
    /// The listener's inode.
    listener: u64,
    pid: i32,
    local: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    /// Ours alone: closed in repair mode, it goes without a word.
    sock: Option<std::os::fd::OwnedFd>,
    repair: bool,
    state: Option<kext_shim::tcp::TcpState>,
}

/// The established connections of a dump, and those waiting in its listeners' queues,
/// from the moment they are stopped on the wire to the moment they are handed to the
/// image (or let go as they were). Dropped before that, it takes every socket out of
/// repair mode, puts the waiting ones back in their queues, and lifts the lock,
/// delivering what the peers sent meanwhile: the workload's connections go on as if
/// nothing happened.
#[derive(Default)]
pub struct TcpCapture {
    conns: Vec<Held>,
    waiting: Vec<Waiting>,
    lock: Option<WireLock>,
    /// A lock made ready for connections there turned out to be none of.
    spare: Option<crate::netlock::Ready>,
}

impl TcpCapture {
    /// Established connections taken, and those waiting to be accepted.
    pub fn connections(&self) -> usize {
        self.conns.len() + self.waiting.len()
    }

    /// Stops the connections on the wire: nothing reaches the sockets or leaves them
    /// until they are let go or made again. `ready`: the lock prepared before the
    /// freeze (kept until the capture goes if there is nothing to lock).
    pub fn lock(&mut self, root: Pid, ready: Option<crate::netlock::Ready>) -> Result<()> {
        if self.conns.is_empty() && self.waiting.is_empty() {
            // Kept to be reaped later: waiting for its end here would be in the freeze.
            self.spare = ready.map(|mut r| {
                r.abandon();
                r
            });
            return Ok(());
        }
        let conns: Vec<_> = self.tuples();
        let ready = ready.unwrap_or_else(|| {
            let tag = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            crate::netlock::Ready::new(tag)
        });
        let lock = ready.lock(&conns).step(root, || {
            "stopping the TCP connections on the wire (nftables)".into()
        })?;
        self.lock = Some(lock);
        Ok(())
    }

    /// Puts each socket in repair mode and reads its state into its image. Done last,
    /// once the packets are stopped and just before the image is written: a crash of
    /// ours from here on would leave a socket in repair mode.
    pub fn read(&mut self, images: &mut [InetSocketImage]) -> Result<()> {
        for c in &mut self.conns {
            let at = Pid::from_raw(c.pid);
            kext_shim::tcp::set_repair(&c.sock, true).step(at, || {
                format!("putting {} -> {} in repair mode", c.local, c.peer)
            })?;
            c.repair = true;
            let st = kext_shim::tcp::read_state(&c.sock).step(at, || {
                format!("reading TCP connection {} -> {}", c.local, c.peer)
            })?;
            if let Some(img) = images.iter_mut().find(|i| i.ino == c.ino) {
                img.tcp = Some(st.into());
            }
        }
        for w in &mut self.waiting {
            let st = w.read().step(Pid::from_raw(w.pid), || {
                format!(
                    "reading TCP connection {} -> {} (waiting to be accepted)",
                    w.local, w.peer
                )
            })?;
            if let Some(img) = images.iter_mut().find(|i| i.ino == w.listener) {
                img.waiting.push(st.into());
            }
        }
        Ok(())
    }

    fn tuples(&self) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        let held = self.conns.iter().map(|c| (c.local, c.peer));
        held.chain(self.waiting.iter().map(|w| (w.local, w.peer)))
            .collect()
    }

    /// What the image keeps of the lock, if there are connections to hold.
    pub fn net_lock(&self) -> Option<NetLockImage> {
        self.lock.as_ref().map(WireLock::image)
    }

    /// A migration's commit point: the lock passes to the image (the destination lifts
    /// it), while the sockets stay ours in repair mode, for [`hand_over`](Self::hand_over)
    /// or, should the destination fail after all, to go on here.
    pub fn hand_lock_over(&mut self) -> Result<()> {
        let pid = self.pid();
        match self.lock.take() {
            Some(l) => l.keep().step(Pid::from_raw(pid), || {
                "handing the TCP connections' lock to the destination".into()
            }),
            None => Ok(()),
        }
    }

    /// After the workload was killed: its sockets close silently as our copies go, and
    /// the lock passes to the image, for the restore to lift.
    pub fn hand_over(mut self) -> Result<()> {
        let pid = self.pid();
        // Closed in repair mode: neither FIN nor RST.
        self.conns.clear();
        self.waiting.clear();
        match self.lock.take() {
            Some(l) => l.keep().step(Pid::from_raw(pid), || {
                "handing the TCP connections' lock to the image".into()
            }),
            None => Ok(()),
        }
    }
}

impl Waiting {
    /// The connection's state, read in repair mode (once).
    fn read(&mut self) -> kext_shim::Result<kext_shim::tcp::TcpState> {
        if let Some(st) = &self.state {
            return Ok(st.clone());
        }
        let sock = self.sock.as_ref().expect("ours until put back");
        kext_shim::tcp::set_repair(sock, true)?;
        self.repair = true;
        let st = kext_shim::tcp::read_state(sock)?;
        self.state = Some(st.clone());
        Ok(st)
    }

    /// Back in its listener's queue, as it was.
    fn put_back(&mut self) -> kext_shim::Result<()> {
        let st = self.read()?;
        // Silent: in repair mode.
        self.sock = None;
        kext_shim::tcp::requeue(&st)
    }
}

impl TcpCapture {
    fn pid(&self) -> i32 {
        let waiting = self.waiting.first().map(|w| w.pid);
        self.conns.first().map(|c| c.pid).or(waiting).unwrap_or(0)
    }

    /// The waiting connections back in their queues, in order, while what this host
    /// sends their peers is still dropped (by a lock of their own if the dump did not
    /// get as far as its lock).
    fn put_back_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let own = match &self.lock {
            Some(_) => None,
            None => {
                let tag = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let table = kext_shim::nft::table_name(tag);
                let locked = kext_shim::nft::lock(
                    &table,
                    &self.tuples(),
                    kext_shim::nft::Inbound::Drop,
                    Some(std::process::id()),
                );
                match locked {
                    Ok(()) => Some(table),
                    Err(e) => {
                        tracing::warn!("stopping the waiting connections on the wire: {e}");
                        None
                    }
                }
            }
        };
        for w in &mut self.waiting {
            if let Err(e) = w.put_back() {
                tracing::error!(
                    pid = w.pid,
                    "{} -> {}, waiting to be accepted, is lost: {e}",
                    w.peer,
                    w.local
                );
            }
        }
        self.waiting.clear();
        if let Some(t) = own {
            if let Err(e) = kext_shim::nft::unlock(&t) {
                tracing::error!("removing nftables table {t}: {e}");
            }
        }
    }
}

impl Drop for TcpCapture {
    fn drop(&mut self) {
        self.put_back_waiting();
        for c in self.conns.iter().filter(|c| c.repair) {
            let back = kext_shim::tcp::set_repair(&c.sock, false).and_then(|_| match &c.reuse {
                Some(v) => inet::set_option(&c.sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, v),
                None => Ok(()),
            });
            if let Err(e) = back {
                tracing::error!(
                    pid = c.pid,
                    fd = c.fd,
                    "taking a socket out of repair mode: {e}"
                );
            }
        }
        // Out of repair mode first: the packets held are delivered as the lock goes.
        self.lock = None;
    }
}
