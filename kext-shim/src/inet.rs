//! TCP and UDP sockets (IPv4 and IPv6): what sock_diag says of them, their socket
//! options, and making one again (bound, listening or connected).

use crate::{check, Result};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One TCP or UDP socket, as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    pub ino: u64,
    /// AF_INET or AF_INET6.
    pub family: i32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: i32,
    /// TCP state (1 established, 7 closed, 10 listening, ...); for UDP, 1 when connected.
    pub state: u8,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Listener: connections waiting to be accepted, and its backlog. Otherwise bytes
    /// waiting to be read and bytes not yet acknowledged (TCP) or sent (UDP).
    pub rqueue: u32,
    pub wqueue: u32,
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// The name of a TCP state, for messages.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown state",
    }
}

fn addr(family: i32, port_be: &[u8], ip: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([port_be[0], port_be[1]]);
    let ip = if family == libc::AF_INET6 {
        let b: [u8; 16] = ip[..16].try_into().expect("16 bytes");
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
    };
    SocketAddr::new(ip, port)
}

/// The connections waiting in the accept queue of the TCP listener `on`: established
/// (or closed by their peer since), on its address, and held by no fd yet.
pub fn waiting_connections(on: &SocketAddr) -> Result<Vec<InetSocket>> {
    Ok(all_inet_sockets()?
        .into_iter()
        .filter(|s| {
            s.ino == 0
                && s.protocol == libc::IPPROTO_TCP
                && matches!(s.state, TCP_ESTABLISHED | crate::tcp::CLOSE_WAIT)
                && s.local.port() == on.port()
                && (on.ip().is_unspecified() || s.local.ip() == on.ip())
        })
        .collect())
}

/// Every TCP and UDP socket sock_diag shows, those no fd holds too.
fn all_inet_sockets() -> Result<Vec<InetSocket>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for protocol in [libc::IPPROTO_TCP, libc::IPPROTO_UDP] {
            // inet_diag_req_v2: family, protocol, ext, pad, states, then a zero sockid.
            let mut req = [0u8; 56];
            req[0] = family as u8;
            req[1] = protocol as u8;
            // Every state but TIME_WAIT: no fd holds those, and a busy host has many
            // (a hundred connections closed leave a hundred for a minute).
            let states: u32 = !(1 << 6);
            req[4..8].copy_from_slice(&states.to_ne_bytes());
            crate::sockdiag::dump(&req, |m| {
                if m.len() < 72 {
                    return;
                }
                let u32_at = |i: usize| u32::from_ne_bytes(m[i..i + 4].try_into().expect("4"));
                out.push(InetSocket {
                    ino: u32_at(68) as u64,
                    family,
                    protocol,
                    state: m[1],
                    local: addr(family, &m[4..6], &m[8..24]),
                    peer: addr(family, &m[6..8], &m[24..40]),
                    rqueue: u32_at(56),
                    wqueue: u32_at(60),
                });
            })?;
        }
    }
    Ok(out)
}

/// Takes every connection waiting in the queue of `listener` (a copy of a frozen
/// program's listener: no one else accepts from it meanwhile), in queue order, without
/// ever blocking or touching the flags the program's file shares.
pub fn accept_waiting(listener: &OwnedFd) -> Result<Vec<OwnedFd>> {
    let mut out = Vec::new();
    loop {
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd given.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        check(r as libc::c_long, || "poll on a listener".into())?;
        if r == 0 || p.revents & libc::POLLIN == 0 {
            return Ok(out);
        }
        // SAFETY: no address is asked for; the fd is the listener's.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        check(fd as libc::c_long, || {
            "accepting a waiting connection".into()
        })?;
        // SAFETY: a fresh fd the kernel just returned, owned by no one else.
        out.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Socket options worth carrying, as (level, name). Buffers are handled apart (they
/// are set with the *BUFFORCE options, which take half the value read).
pub const OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IP, libc::IP_TRANSPARENT),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
];

/// One option's raw value (an int, a linger, a timeval, a device name).
fn get_option(sock: &impl AsRawFd, level: i32, name: i32) -> Option<Vec<u8>> {
    get_option_len(sock, level, name, 64)
}

fn get_option_len(sock: &impl AsRawFd, level: i32, name: i32, max: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0).then(|| buf[..len as usize].to_vec())
}

/// The values of `OPTIONS` on a fresh socket, per (family, protocol), read once.
#[derive(Default)]
pub struct FreshOptions(BTreeMap<(i32, i32), Vec<Option<Vec<u8>>>>);

impl FreshOptions {
    fn of(&mut self, family: i32, protocol: i32) -> Result<&[Option<Vec<u8>>]> {
        use std::collections::btree_map::Entry;
        Ok(match self.0.entry((family, protocol)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let fresh = socket(family, protocol)?;
                e.insert(
                    OPTIONS
                        .iter()
                        .map(|&(level, name)| get_option(&fresh, level, name))
                        .collect(),
                )
            }
        })
    }
}

/// The options of `OPTIONS` (that apply to it) of `sock`, a copy of a program's
/// socket, whose values differ from those of a fresh socket of the same kind: what
/// the program set.
pub fn changed_options(
    sock: &OwnedFd,
    family: i32,
    protocol: i32,
    fresh: &mut FreshOptions,
) -> Result<Vec<(i32, i32, Vec<u8>)>> {
    let defaults = fresh.of(family, protocol)?;
    let mut out = Vec::new();
    for (&(level, name), default) in OPTIONS.iter().zip(defaults) {
        if level == libc::IPPROTO_TCP && protocol != libc::IPPROTO_TCP
            || level == libc::IPPROTO_IPV6 && family != libc::AF_INET6
        {
            continue;
        }
        let Some(v) = get_option(sock, level, name) else {
            continue;
        };
        if default.as_ref() != Some(&v) {
            out.push((level, name, v));
        }
    }
    Ok(out)
}

/// A new TCP (stream) or UDP (datagram) socket, close-on-exec.
pub fn socket(family: i32, protocol: i32) -> Result<OwnedFd> {
    let kind = if protocol == libc::IPPROTO_TCP {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
    check(fd as libc::c_long, || format!("socket({family}, {kind})"))?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets one option from its raw value; the buffer sizes through *BUFFORCE (the value
/// read back is twice what was asked for, which is what *BUFFORCE takes).
pub fn set_option(sock: &OwnedFd, level: i32, name: i32, value: &[u8]) -> Result<()> {
    let (name, value) = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_SNDBUF | libc::SO_RCVBUF) if value.len() == 4 => {
            let v = i32::from_ne_bytes(value.try_into().expect("4 bytes")) / 2;
            let force = if name == libc::SO_SNDBUF {
                libc::SO_SNDBUFFORCE
            } else {
                libc::SO_RCVBUFFORCE
            };
            (force, v.to_ne_bytes().to_vec())
        }
        _ => (name, value.to_vec()),
    };
    // SAFETY: setsockopt reads `value.len()` bytes from `value`.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    check(r as libc::c_long, || format!("setsockopt({level}, {name})")).map(|_| ())
}

fn with_sockaddr<T>(
    a: &SocketAddr,
    f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> T,
) -> T {
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            f(
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            f(
                (&sin6 as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

pub fn bind(sock: &OwnedFd, a: &SocketAddr) -> Result<()> {
    // SAFETY: the address points to a sockaddr of the stated length for the call.
    let r = with_sockaddr(a, |p, l| unsafe { libc::bind(sock.as_raw_fd(), p, l) });
    check(r as libc::c_long, || format!("bind to {a}")).map(|_| ())
}

pub fn connect(sock: &OwnedFd, a: &SocketAddr) -> Result<()> {
    // SAFETY: the address points to a sockaddr of the stated length for the call.
    let r = with_sockaddr(a, |p, l| unsafe { libc::connect(sock.as_raw_fd(), p, l) });
    check(r as libc::c_long, || format!("connect to {a}")).map(|_| ())
}

pub fn listen(sock: &OwnedFd, backlog: u32) -> Result<()> {
    // SAFETY: listen takes no pointers.
    let r = unsafe { libc::listen(sock.as_raw_fd(), backlog as i32) };
    check(r as libc::c_long, || format!("listen({backlog})")).map(|_| ())
}

/// What sock_diag would say of the socket `sock` (a copy of one of a process's fds,
/// inode `ino`), read from the socket itself: its family and protocol, addresses, TCP
/// state, and for a listener the connections waiting and its backlog. None for a
/// socket that is neither TCP nor UDP over IPv4 or IPv6. A few syscalls per socket
/// of the tree, where sock_diag costs as many sockets as the host has (a hundred
/// connections: 1.1-1.3 ms of dumps inside the freeze).
pub fn describe(sock: &OwnedFd, ino: u64) -> Result<Option<InetSocket>> {
    let int = |level: i32, name: i32, what: &str| -> Result<i32> {
        let v = get_option(sock, level, name).ok_or_else(|| {
            crate::SysError::new(format!("getsockopt({what})"), crate::Errno::last())
        })?;
        Ok(i32::from_ne_bytes(v[..4].try_into().expect("4 bytes")))
    };
    let family = int(libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    let protocol = int(libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    if ![libc::AF_INET, libc::AF_INET6].contains(&family)
        || ![libc::IPPROTO_TCP, libc::IPPROTO_UDP].contains(&protocol)
    {
        return Ok(None);
    }
    let any = if family == libc::AF_INET6 {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let local = local_addr(sock)?;
    // Not connected: ENOTCONN.
    let peer = peer_addr(sock).ok();
    let (state, rqueue, wqueue) = if protocol == libc::IPPROTO_TCP {
        // tcp_info: the state at byte 0; tcpi_unacked (24) and tcpi_sacked (28) are a
        // listener's waiting connections and backlog.
        let info = get_option_len(sock, libc::IPPROTO_TCP, libc::TCP_INFO, 104)
            .ok_or_else(|| crate::SysError::new("getsockopt(TCP_INFO)", crate::Errno::last()))?;
        let word = |i: usize| u32::from_ne_bytes(info[i..i + 4].try_into().expect("4 bytes"));
        if info[0] == TCP_LISTEN {
            (info[0], word(24), word(28))
        } else {
            (info[0], 0, 0)
        }
    } else {
        let state = if peer.is_some() {
            TCP_ESTABLISHED
        } else {
            TCP_CLOSE
        };
        // Said to hold something: its datagrams are peeked (with their senders), which
        // finds out; a byte count could not tell a zero-length datagram from none.
        (state, 1, 0)
    };
    Ok(Some(InetSocket {
        ino,
        family,
        protocol,
        state,
        local,
        peer: peer.unwrap_or(any),
        rqueue,
        wqueue,
    }))
}

/// A sockaddr_in or sockaddr_in6 as a `SocketAddr` (None for other families).
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it can.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The datagrams waiting on UDP socket `sock` (a copy of a program's), with who sent
/// each, left in place: peeked with SO_PEEK_OFF walking the queue, put back to off
/// after.
pub fn peek_datagrams(sock: &OwnedFd) -> Result<Vec<(SocketAddr, Vec<u8>)>> {
    let raw = sock.as_raw_fd();
    let set_peek_off = |v: i32| crate::unix::set_peek_off(raw, v, "a UDP socket");
    set_peek_off(0)?;
    let res = (|| {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most buf.len() bytes into buf and at most
            // `len` bytes of address into `from`.
            let n = unsafe {
                libc::recvfrom(
                    raw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = crate::Errno::last();
                if e == crate::Errno::EAGAIN {
                    return Ok(out);
                }
                return Err(crate::SysError::new("peeking a UDP queue", e).into());
            }
            if n == 0 {
                // An empty datagram does not move the peek offset: no way past it.
                return Err(crate::Error::Unexpected {
                    pid: 0,
                    what: "an empty datagram is queued, which cannot be read in place".into(),
                });
            }
            let src = from_sockaddr(&from).ok_or_else(|| crate::Error::Unexpected {
                pid: 0,
                what: "a datagram from an address of another family".into(),
            })?;
            out.push((src, buf[..n as usize].to_vec()));
        }
    })();
    let reset = set_peek_off(-1);
    let q = res?;
    reset?;
    Ok(q)
}

/// Hands `to` (a local address) a UDP datagram as if `from` had sent it, through a raw
/// socket of the current network namespace: it arrives as any datagram would, so a
/// program replying to its sender replies to `from`.
pub fn inject_udp(from: &SocketAddr, to: &SocketAddr, payload: &[u8]) -> Result<()> {
    let len = 8 + payload.len();
    let mut udp = Vec::with_capacity(len);
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&(len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // A UDP checksum of 0 means none, which IPv4 allows and IPv6 does not.
    let checksum_at = from.is_ipv6().then_some(6);
    inject(from, to, libc::IPPROTO_UDP as u8, udp, checksum_at)
}

/// Hands the socket made again from `st` its peer's FIN, as the peer sent it: at the
/// end of the data, acknowledging what the peer had acknowledged.
pub fn inject_tcp_fin(st: &crate::tcp::TcpState) -> Result<()> {
    let acked = st.send_seq.wrapping_sub(st.send_queue.len() as u32);
    // TCP_REPAIR_WINDOW's snd_wnd is the peer's window, unscaled.
    let window = (st.window[1] >> st.snd_wscale).min(u16::MAX as u32) as u16;
    let seg = Segment {
        seq: st.recv_seq,
        ack: acked,
        flags: TCP_FIN | TCP_ACK,
        window,
        options: &[],
        data: &[],
    };
    inject_tcp(&st.peer, &st.local, &seg)
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment to hand a local socket as if its peer had sent it.
pub struct Segment<'a> {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Already padded to a multiple of 4 bytes.
    pub options: &'a [u8],
    pub data: &'a [u8],
}

/// Sends `seg` from `from` to `to` (a local address) through a raw socket, marked as
/// ours ([`INJECTED_MARK`]).
pub fn inject_tcp(from: &SocketAddr, to: &SocketAddr, seg: &Segment) -> Result<()> {
    let mut tcp = Vec::with_capacity(20 + seg.options.len() + seg.data.len());
    tcp.extend_from_slice(&from.port().to_be_bytes());
    tcp.extend_from_slice(&to.port().to_be_bytes());
    tcp.extend_from_slice(&seg.seq.to_be_bytes());
    tcp.extend_from_slice(&seg.ack.to_be_bytes());
    let words = (20 + seg.options.len()) / 4;
    tcp.extend_from_slice(&[(words as u8) << 4, seg.flags]);
    tcp.extend_from_slice(&seg.window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(seg.options);
    tcp.extend_from_slice(seg.data);
    inject(from, to, libc::IPPROTO_TCP as u8, tcp, Some(16))
}

/// The internet checksum of a pseudo-header (`from`, `to`, `proto`) and `l4`.
fn l4_checksum(from: &IpAddr, to: &IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    };
    let octets = |a: &IpAddr| match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    add(&octets(from));
    add(&octets(to));
    add(&[0, proto]);
    add(&(l4.len() as u16).to_be_bytes());
    add(l4);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// The mark of every packet mcr hands a socket in a peer's name: the wire lock's rules
/// let these pass ("mcr" in ASCII).
pub const INJECTED_MARK: u32 = 0x006d_6372;

/// Sends `l4` (a transport header and payload, its checksum filled in at
/// `checksum_at` if given) from `from` to `to` through a raw socket: it enters this
/// network namespace's stack as a packet from `from` would.
fn inject(
    from: &SocketAddr,
    to: &SocketAddr,
    proto: u8,
    mut l4: Vec<u8>,
    checksum_at: Option<usize>,
) -> Result<()> {
    // A dual-stack socket's IPv4 peers wear mapped addresses; on the wire they are IPv4.
    let canonical = |a: &SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (from, to) = match (canonical(from), canonical(to)) {
        (f @ SocketAddr::V4(_), t @ SocketAddr::V4(_)) => (f, t),
        _ => (*from, *to),
    };
    let (from, to) = (&from, &to);
    if let Some(at) = checksum_at {
        let ck = l4_checksum(&from.ip(), &to.ip(), proto, &l4);
        l4[at..at + 2].copy_from_slice(&ck.to_be_bytes());
    }
    let (family, packet) = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // Length, header checksum and id are the kernel's to fill in (IP_HDRINCL).
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&l4);
            (libc::AF_INET, p)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&l4);
            (libc::AF_INET6, p)
        }
        _ => {
            return Err(crate::Error::Unexpected {
                pid: 0,
                what: format!("a packet from {from} to {to}: the families differ"),
            })
        }
    };
    // SAFETY: socket takes no pointers.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    check(fd as libc::c_long, || {
        "socket(SOCK_RAW, IPPROTO_RAW)".into()
    })?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    let raw = unsafe { OwnedFd::from_raw_fd(fd) };
    if family == libc::AF_INET6 {
        const IPV6_HDRINCL: i32 = 36;
        let on: i32 = 1;
        // SAFETY: setsockopt reads one int.
        let r = unsafe {
            libc::setsockopt(
                raw.as_raw_fd(),
                libc::IPPROTO_IPV6,
                IPV6_HDRINCL,
                (&on as *const i32).cast(),
                4,
            )
        };
        check(r as libc::c_long, || "setsockopt(IPV6_HDRINCL)".into())?;
    }
    let mark = INJECTED_MARK;
    // SAFETY: setsockopt reads one u32.
    let r = unsafe {
        libc::setsockopt(
            raw.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            4,
        )
    };
    check(r as libc::c_long, || "setsockopt(SO_MARK)".into())?;
    // The destination's port means nothing to a raw socket.
    let dest = SocketAddr::new(to.ip(), 0);
    // SAFETY: the address points to a sockaddr of the stated length; the packet is
    // our own buffer.
    let n = with_sockaddr(&dest, |p, l| unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            p,
            l,
        ) as i32
    });
    check(n as libc::c_long, || {
        format!("sending a packet from {from} to {to} (raw)")
    })?;
    Ok(())
}

/// The address `sock` is bound to.
pub fn local_addr(sock: &impl AsRawFd) -> Result<SocketAddr> {
    sock_addr(sock, false)
}

/// The address `sock` is connected to.
pub fn peer_addr(sock: &impl AsRawFd) -> Result<SocketAddr> {
    sock_addr(sock, true)
}

fn sock_addr(sock: &impl AsRawFd, peer: bool) -> Result<SocketAddr> {
    let mut ss: libc::sockaddr_storage = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: the call writes at most `len` bytes of address into `ss`.
    let r = unsafe {
        if peer {
            libc::getpeername(sock.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(sock.as_raw_fd(), p, &mut len)
        }
    };
    check(r as libc::c_long, || {
        if peer {
            "getpeername".into()
        } else {
            "getsockname".into()
        }
    })?;
    from_sockaddr(&ss).ok_or_else(|| crate::Error::Unexpected {
        pid: 0,
        what: "a TCP socket with an address of another family".into(),
    })
}

fn unsafe_zeroed() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}
