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
    let all =
        inet::inet_sockets().step(root, || "listing TCP and UDP sockets (sock_diag)".into())?;
    let mut out = Vec::new();
    let mut established = Vec::new();
    let mut fresh = inet::FreshOptions::default();
    let mut pidfds = std::collections::BTreeMap::new();
    for (&ino, &(pid, fd)) in &holders {
        let unlisted;
        let s = match all.get(&ino) {
            Some(s) => s,
            // Unix sockets are left for their own pass.
            None if unix.contains_key(&ino) => continue,
            None => {
                // Never bound: in no table; its family tells.
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
        let at = Pid::from_raw(pid);
        let mut held = None;
        let refusal = match (tcp, s.state) {
            (true, TCP_LISTEN) if s.rqueue > 0 => {
                let waiting: Vec<String> = inet::waiting_connections(&s.local)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| format!("{} -> {}", c.peer, c.local))
                    .collect();
                Some(format!(
                    "a listening {} with {} connections waiting to be accepted{}, which are not supported yet",
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
        let pidfd = match pidfds.entry(pid) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(kext_shim::pidfd::pidfd_open(at).step(at, || "pidfd_open".into())?)
            }
        };
        let sock = kext_shim::pidfd::pidfd_getfd(pidfd, at, fd)
            .step(at, || format!("taking a copy of fd {fd} ({key})"))?;
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

/// The established connections of a dump, from the moment they are stopped on the
/// wire to the moment they are handed to the image (or let go as they were).
/// Dropped before that, it takes every socket out of repair mode and lifts the lock,
/// delivering what the peers sent meanwhile: the workload's connections go on as if
/// nothing happened.
#[derive(Default)]
pub struct TcpCapture {
    conns: Vec<Held>,
    lock: Option<WireLock>,
}

impl TcpCapture {
    /// Stops the connections on the wire: nothing reaches the sockets or leaves them
    /// until they are let go or made again.
    pub fn lock(&mut self, root: Pid) -> Result<()> {
        if self.conns.is_empty() {
            return Ok(());
        }
        let conns: Vec<_> = self.conns.iter().map(|c| (c.local, c.peer)).collect();
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lock = WireLock::lock(&conns, tag).step(root, || {
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
        Ok(())
    }

    /// What the image keeps of the lock, if there are connections to hold.
    pub fn net_lock(&self) -> Option<NetLockImage> {
        self.lock.as_ref().map(WireLock::image)
    }

    /// A migration's commit point: the lock passes to the image (the destination lifts
    /// it), while the sockets stay ours in repair mode, for [`hand_over`](Self::hand_over)
    /// or, should the destination fail after all, to go on here.
    pub fn hand_lock_over(&mut self) -> Result<()> {
        let pid = self.conns.first().map_or(0, |c| c.pid);
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
        let pid = self.conns.first().map_or(0, |c| c.pid);
        // Closed in repair mode: neither FIN nor RST.
        self.conns.clear();
        match self.lock.take() {
            Some(l) => l.keep().step(Pid::from_raw(pid), || {
                "handing the TCP connections' lock to the image".into()
            }),
            None => Ok(()),
        }
    }
}

impl Drop for TcpCapture {
    fn drop(&mut self) {
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
