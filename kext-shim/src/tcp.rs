//! Established TCP connections through TCP_REPAIR: the state a connection is made of,
//! read from a socket in repair mode, and a new socket put in that state without a
//! packet on the wire. The sequence was checked on this kernel by
//! shared/kernel-probes/t5_tcp_repair.c.

use crate::{check, Error, Result};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERMITTED: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// What an established connection is, besides its socket options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpState {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The next sequence number to receive (rcv_nxt), and to send (write_seq).
    pub recv_seq: u32,
    pub send_seq: u32,
    /// Received, not yet read by the program.
    pub recv_queue: Vec<u8>,
    /// Written by the program, not yet acknowledged; its last `unsent` bytes were
    /// never sent at all.
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    pub mss: u32,
    /// TCPI_OPT_* negotiated at the handshake, and the window scales.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    /// TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    pub sndbuf: i32,
    pub rcvbuf: i32,
    /// Half-closed: our FIN was sent (FIN_WAIT1/2, LAST_ACK, CLOSING), the peer's was
    /// received (CLOSE_WAIT, LAST_ACK, CLOSING). The sequence numbers above leave
    /// both FINs out: they count data only.
    pub fin_sent: bool,
    pub fin_received: bool,
}

/// TCP states, as tcp_info and sock_diag give them.
pub const ESTABLISHED: u8 = 1;
pub const FIN_WAIT1: u8 = 4;
pub const FIN_WAIT2: u8 = 5;
pub const CLOSE_WAIT: u8 = 8;
pub const LAST_ACK: u8 = 9;
pub const CLOSING: u8 = 11;

/// The states a connection can be taken in: open, or closed on one side or both with
/// the fd still open.
pub fn can_take(state: u8) -> bool {
    matches!(
        state,
        ESTABLISHED | FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | LAST_ACK | CLOSING
    )
}

fn set_int(sock: &impl AsRawFd, level: i32, name: i32, v: i32, what: &str) -> Result<()> {
    // SAFETY: setsockopt reads one int from `v`.
    let r =
        unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, (&v as *const i32).cast(), 4) };
    check(r as libc::c_long, || what.to_string()).map(|_| ())
}

fn get_bytes(
    sock: &impl AsRawFd,
    level: i32,
    name: i32,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    let mut l = len as libc::socklen_t;
    // SAFETY: getsockopt writes at most `l` bytes into `b`.
    let r =
        unsafe { libc::getsockopt(sock.as_raw_fd(), level, name, b.as_mut_ptr().cast(), &mut l) };
    check(r as libc::c_long, || what.to_string())?;
    b.truncate(l as usize);
    Ok(b)
}

fn get_u32(sock: &impl AsRawFd, level: i32, name: i32, what: &str) -> Result<u32> {
    let b = get_bytes(sock, level, name, 4, what)?;
    Ok(u32::from_ne_bytes(b[..4].try_into().map_err(|_| {
        Error::Unexpected {
            pid: 0,
            what: format!("{what}: short answer"),
        }
    })?))
}

fn ioctl_int(sock: &impl AsRawFd, req: libc::c_ulong, what: &str) -> Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into `v`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    check(r as libc::c_long, || what.to_string())?;
    Ok(v as u32)
}

/// Puts a socket in repair mode (or takes it out): while on, nothing is sent or
/// answered, and a close is silent, with neither FIN nor RST.
pub fn set_repair(sock: &impl AsRawFd, on: bool) -> Result<()> {
    let v = if on { TCP_REPAIR_ON } else { TCP_REPAIR_OFF };
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        v,
        "setsockopt(TCP_REPAIR)",
    )
}

/// Closes a connection silently and at once. A close takes the connection off the
/// kernel's tables only with the last copy of its fd, and a child forked meanwhile
/// by any thread of the process holds one until it execs: the connection made again
/// on the same addresses then fails with EADDRNOTAVAIL. A disconnect in repair mode
/// takes it off at once, still sending nothing.
pub fn forget(sock: OwnedFd) -> Result<()> {
    set_repair(&sock, true)?;
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: the address is a whole sockaddr of the length given, read by the call.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    check(r as libc::c_long, || {
        "connect(AF_UNSPEC) in repair mode".into()
    })?;
    Ok(())
}

fn select_queue(sock: &impl AsRawFd, q: i32) -> Result<()> {
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        q,
        "setsockopt(TCP_REPAIR_QUEUE)",
    )
}

/// Copies `len` bytes off the selected queue without taking them.
fn peek(sock: &impl AsRawFd, len: u32, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    if len == 0 {
        return Ok(b);
    }
    // SAFETY: recv writes at most `len` bytes into `b`.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let n = check(n as libc::c_long, || format!("peeking the {what} queue"))? as usize;
    if n != b.len() {
        return Err(Error::Unexpected {
            pid: 0,
            what: format!("the {what} queue holds {n} bytes, not {len}"),
        });
    }
    Ok(b)
}

/// Reads an established connection's state from `sock`, which must be in repair mode.
/// Nothing is taken from it: it can be let go as it was.
pub fn read_state(sock: &OwnedFd) -> Result<TcpState> {
    let tcp = libc::IPPROTO_TCP;
    // tcp_info: the state at byte 0, options at byte 5, the window scales in byte 6.
    let info = get_bytes(sock, tcp, libc::TCP_INFO, 104, "TCP_INFO")?;
    let state = info[0];
    let fin_sent = matches!(state, FIN_WAIT1 | FIN_WAIT2 | LAST_ACK | CLOSING);
    let fin_received = matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING);
    let inq = ioctl_int(sock, SIOCINQ, "SIOCINQ")?;
    let mut outq = ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")?;
    let mut unsent = ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")?;
    select_queue(sock, TCP_RECV_QUEUE)?;
    let mut recv_seq = get_u32(sock, tcp, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (receive)")?;
    let recv_queue = peek(sock, inq, "receive")?;
    select_queue(sock, TCP_SEND_QUEUE)?;
    let mut send_seq = get_u32(sock, tcp, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (send)")?;
    if fin_received {
        recv_seq = recv_seq.wrapping_sub(1);
    }
    if fin_sent {
        send_seq = send_seq.wrapping_sub(1);
        // A FIN not yet acknowledged counts in the queue lengths, but holds no byte.
        if matches!(state, FIN_WAIT1 | LAST_ACK | CLOSING) && outq > 0 {
            outq -= 1;
            unsent = unsent.saturating_sub(1);
        }
    }
    let send_queue = peek(sock, outq, "send")?;
    select_queue(sock, TCP_NO_QUEUE)?;
    let w = get_bytes(sock, tcp, libc::TCP_REPAIR_WINDOW, 20, "TCP_REPAIR_WINDOW")?;
    let word = |i: usize| u32::from_ne_bytes(w[i * 4..i * 4 + 4].try_into().expect("4"));
    let sol = libc::SOL_SOCKET;
    Ok(TcpState {
        local: crate::inet::local_addr(sock)?,
        peer: crate::inet::peer_addr(sock)?,
        recv_seq,
        send_seq,
        recv_queue,
        send_queue,
        unsent,
        mss: get_u32(sock, tcp, libc::TCP_MAXSEG, "TCP_MAXSEG")?,
        options: info[5],
        snd_wscale: info[6] & 0xf,
        rcv_wscale: info[6] >> 4,
        timestamp: get_u32(sock, tcp, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?,
        // rcv_wup may not pass rcv_nxt, which leaves the peer's FIN out now.
        window: [
            word(0),
            word(1),
            word(2),
            word(3),
            if fin_received && word(4) == recv_seq.wrapping_add(1) {
                recv_seq
            } else {
                word(4)
            },
        ],
        sndbuf: get_u32(sock, sol, libc::SO_SNDBUF, "SO_SNDBUF")? as i32,
        rcvbuf: get_u32(sock, sol, libc::SO_RCVBUF, "SO_RCVBUF")? as i32,
        fin_sent,
        fin_received,
    })
}

fn send_all(sock: &OwnedFd, mut data: &[u8], what: &str) -> Result<()> {
    while !data.is_empty() {
        // SAFETY: send reads at most `data.len()` bytes from `data`.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        let n = check(n as libc::c_long, || format!("refilling the {what} queue"))? as usize;
        data = &data[n..];
    }
    Ok(())
}

/// Makes the connection `st` again on a new socket, without a packet on the wire: in
/// repair mode the sequence numbers and queues are set, bind and connect only set the
/// addresses, and the options negotiated at the handshake are given back. `before`
/// runs on the socket first (the program's socket options, but SO_REUSEADDR, which
/// repair mode overrides: set it on the result). The bytes never sent, and the peer's
/// FIN, are left for [`finish`]. `foreign` runs only if the local address is not this
/// host's (yet): it makes the socket able to use it, and the bind is tried again.
pub fn restore(
    st: &TcpState,
    before: impl FnOnce(&OwnedFd) -> Result<()>,
    foreign: impl FnOnce(&OwnedFd) -> Result<()>,
) -> Result<OwnedFd> {
    let family = match st.local {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let sock = crate::inet::socket(family, libc::IPPROTO_TCP)?;
    let tcp = libc::IPPROTO_TCP;
    // Before repair mode: entering it forces address reuse (the listener may hold the
    // port), which SO_REUSEADDR would undo; leaving it clears reuse again.
    before(&sock)?;
    set_repair(&sock, true)?;
    let sol = libc::SOL_SOCKET;
    set_int(
        &sock,
        sol,
        libc::SO_SNDBUFFORCE,
        st.sndbuf / 2,
        "SO_SNDBUFFORCE",
    )?;
    set_int(
        &sock,
        sol,
        libc::SO_RCVBUFFORCE,
        st.rcvbuf / 2,
        "SO_RCVBUFFORCE",
    )?;
    // Each queue selected as few times as may be: the receive queue last, as its
    // bytes go in first once connected.
    select_queue(&sock, TCP_SEND_QUEUE)?;
    let seq = st.send_seq.wrapping_sub(st.send_queue.len() as u32);
    set_int(
        &sock,
        tcp,
        libc::TCP_QUEUE_SEQ,
        seq as i32,
        "TCP_QUEUE_SEQ (send)",
    )?;
    select_queue(&sock, TCP_RECV_QUEUE)?;
    let seq = st.recv_seq.wrapping_sub(st.recv_queue.len() as u32);
    set_int(
        &sock,
        tcp,
        libc::TCP_QUEUE_SEQ,
        seq as i32,
        "TCP_QUEUE_SEQ (receive)",
    )?;
    bind_maybe_foreign(&sock, &st.local, foreign)?;
    crate::inet::connect(&sock, &st.peer)?;
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, st.mss]];
    if st.options & TCPI_OPT_WSCALE != 0 {
        opts.push([
            TCPOPT_WINDOW,
            st.snd_wscale as u32 | (st.rcv_wscale as u32) << 16,
        ]);
    }
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    if st.options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERMITTED, 0]);
    }
    // SAFETY: setsockopt reads `opts.len()` tcp_repair_opt pairs of u32 from `opts`.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            tcp,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * 8) as libc::socklen_t,
        )
    };
    check(r as libc::c_long, || {
        "setsockopt(TCP_REPAIR_OPTIONS)".into()
    })?;
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        set_int(
            &sock,
            tcp,
            libc::TCP_TIMESTAMP,
            st.timestamp as i32,
            "TCP_TIMESTAMP",
        )?;
    }
    send_all(&sock, &st.recv_queue, "receive")?;
    select_queue(&sock, TCP_SEND_QUEUE)?;
    let sent = st.send_queue.len() - st.unsent as usize;
    send_all(&sock, &st.send_queue[..sent], "send")?;
    set_window(&sock, &st.window)?;
    if st.fin_sent && st.unsent == 0 {
        // With the send queue selected, the FIN is queued as already sent, after the
        // data; the peer acknowledges it again when it comes round once more.
        shutdown_write(&sock)?;
    }
    // The queue left selected means nothing out of repair mode.
    set_repair(&sock, false)?;
    Ok(sock)
}

/// Binds `sock` to `local`; if the address is not this host's, runs `foreign` (which
/// lets the socket use it) and binds again.
pub fn bind_maybe_foreign(
    sock: &OwnedFd,
    local: &SocketAddr,
    foreign: impl FnOnce(&OwnedFd) -> Result<()>,
) -> Result<()> {
    match crate::inet::bind(sock, local) {
        Err(e) if e.errno() == Some(crate::Errno::EADDRNOTAVAIL) => {
            foreign(sock)?;
            crate::inet::bind(sock, local)
        }
        r => r,
    }
}

/// Whether [`finish`] has anything to do for `st`.
pub fn unfinished(st: &TcpState) -> bool {
    st.unsent > 0 || st.fin_received
}

/// The last of a restore, once the connection may talk on the wire: what the program
/// had written but the kernel never sent is queued (and the program's shutdown behind
/// it), and the peer's FIN, if it had come, comes again where our data ends. Done
/// while the connection is still stopped on the wire, they would wait for a
/// retransmission timeout (a second, on a socket made this way), or, the FIN, be lost
/// for good with the queue that held it.
pub fn finish(sock: &OwnedFd, st: &TcpState) -> Result<()> {
    let sent = st.send_queue.len() - st.unsent as usize;
    send_all(sock, &st.send_queue[sent..], "never-sent part of the send")?;
    if st.fin_sent && st.unsent > 0 {
        shutdown_write(sock)?;
    }
    if st.fin_received {
        crate::inet::inject_tcp_fin(st)?;
    }
    Ok(())
}

/// TCP_REPAIR off without the window probe it would send: the socket below must stay
/// silent.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCP_INFO_CLOSE: u8 = 7;

/// Puts the connection `st`, taken out of its listener's accept queue, back into the
/// queue of the listener that now has its local address, as the same connection: the
/// program's next accept() returns it with its sequence numbers, options and the bytes
/// that waited on it, and its peer never knows. Nothing lets a program place a socket
/// in a queue, so the kernel is made to: a handshake is played on the listener in the
/// peer's name (raw packets, marked [`crate::inet::INJECTED_MARK`]) so that the child it
/// makes is the connection's, and its sequence number is chosen through a TIME_WAIT
/// socket of the same four addresses, whose ISN for the next SYN the kernel derives
/// from (tw_snd_nxt + 65537): that TIME_WAIT is made here, in repair mode, where our
/// FIN is queued as sent and the peer's is handed over. The peer's timestamps are
/// given as 0, which PAWS takes as "none yet" until the peer's next packet; ours
/// continue, the offset being the kernel's for the address pair. Checked on this
/// kernel before it was written (IPv4 and IPv6).
///
/// The listener must exist and the local address be on this host, and whatever this
/// host sends the peer meanwhile must be dropped (the wire lock does): the SYN-ACK,
/// ACKs of the TIME_WAIT. A connection the program had written to is not a waiting
/// one, and is refused.
pub fn requeue(st: &TcpState) -> Result<()> {
    let what = || {
        format!(
            "putting {} -> {} back in its listener's queue",
            st.peer, st.local
        )
    };
    if !st.send_queue.is_empty() || st.fin_sent {
        return Err(Error::Unexpected {
            pid: 0,
            what: format!("{}: it holds data of ours, it was never waiting", what()),
        });
    }
    // The first byte waiting, and ours: the handshake ends exactly there.
    let first = st.recv_seq.wrapping_sub(st.recv_queue.len() as u32);
    let ours = st.send_seq;
    // tw_snd_nxt is one past our FIN: ISN = maker's send_seq + 1 + 65537 = ours - 1.
    let maker_send = ours.wrapping_sub(65539);
    // Behind the SYN's sequence number, which a TIME_WAIT must see as new.
    let maker_recv = first.wrapping_sub(1000);
    let family = match st.local {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let tcp = libc::IPPROTO_TCP;
    let maker = crate::inet::socket(family, tcp)?;
    set_repair(&maker, true)?;
    crate::inet::bind(&maker, &st.local)?;
    select_queue(&maker, TCP_RECV_QUEUE)?;
    set_int(
        &maker,
        tcp,
        libc::TCP_QUEUE_SEQ,
        maker_recv as i32,
        "TCP_QUEUE_SEQ",
    )?;
    select_queue(&maker, TCP_SEND_QUEUE)?;
    set_int(
        &maker,
        tcp,
        libc::TCP_QUEUE_SEQ,
        maker_send as i32,
        "TCP_QUEUE_SEQ",
    )?;
    select_queue(&maker, TCP_NO_QUEUE)?;
    crate::inet::connect(&maker, &st.peer)?;
    set_window(&maker, &[maker_recv, 65535, 65535, 65535, maker_recv])?;
    // Our FIN, queued as sent: FIN_WAIT1 without a packet.
    select_queue(&maker, TCP_SEND_QUEUE)?;
    shutdown_write(&maker)?;
    select_queue(&maker, TCP_NO_QUEUE)?;
    set_int(
        &maker,
        tcp,
        libc::TCP_REPAIR,
        TCP_REPAIR_OFF_NO_WP,
        "TCP_REPAIR",
    )?;
    use crate::inet::{inject_tcp, Segment, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN};
    let seg = |seq, ack, flags, window, options, data| Segment {
        seq,
        ack,
        flags,
        window,
        options,
        data,
    };
    // The peer's FIN, acknowledging ours: TIME_WAIT.
    let fin = seg(
        maker_recv,
        maker_send.wrapping_add(1),
        TCP_FIN | TCP_ACK,
        65535,
        &[],
        &[],
    );
    inject_tcp(&st.peer, &st.local, &fin)?;
    wait_for(|| Ok(get_bytes(&maker, tcp, libc::TCP_INFO, 8, "TCP_INFO")?[0] == TCP_INFO_CLOSE))
        .map_err(|e| Error::Unexpected {
            pid: 0,
            what: format!("{}: no TIME_WAIT ({e})", what()),
        })?;
    drop(maker);
    // The SYN, with what the original handshake agreed on.
    let ts = st.options & TCPI_OPT_TIMESTAMPS != 0;
    let mut syn_opts = vec![TCPOPT_MAXSEG as u8, 4];
    syn_opts.extend_from_slice(&(st.mss.min(u16::MAX as u32) as u16).to_be_bytes());
    if st.options & TCPI_OPT_SACK != 0 {
        syn_opts.extend_from_slice(&[1, 1, TCPOPT_SACK_PERMITTED as u8, 2]);
    }
    let stamps = [1, 1, TCPOPT_TIMESTAMP as u8, 10, 0, 0, 0, 0, 0, 0, 0, 0];
    if ts {
        syn_opts.extend_from_slice(&stamps);
    }
    if st.options & TCPI_OPT_WSCALE != 0 {
        syn_opts.extend_from_slice(&[1, TCPOPT_WINDOW as u8, 3, st.snd_wscale]);
    }
    let syn = seg(first.wrapping_sub(1), 0, TCP_SYN, 65535, &syn_opts, &[]);
    inject_tcp(&st.peer, &st.local, &syn)?;
    let ack_opts: &[u8] = if ts { &stamps } else { &[] };
    let scale = if st.options & TCPI_OPT_WSCALE != 0 {
        st.snd_wscale
    } else {
        0
    };
    let window = (st.window[1] >> scale).min(u16::MAX as u32) as u16;
    let ack = seg(first, ours, TCP_ACK, window, ack_opts, &[]);
    inject_tcp(&st.peer, &st.local, &ack)?;
    // What waited, in segments the size the peer sent.
    let mut seq = first;
    for chunk in st.recv_queue.chunks(st.mss.max(536) as usize) {
        let data = seg(seq, ours, TCP_ACK | TCP_PSH, window, ack_opts, chunk);
        inject_tcp(&st.peer, &st.local, &data)?;
        seq = seq.wrapping_add(chunk.len() as u32);
    }
    if st.fin_received {
        let fin = seg(seq, ours, TCP_FIN | TCP_ACK, window, ack_opts, &[]);
        inject_tcp(&st.peer, &st.local, &fin)?;
    }
    // Back in the queue, whole (sock_diag counts a FIN among the bytes to read).
    let want_state = if st.fin_received {
        CLOSE_WAIT
    } else {
        ESTABLISHED
    };
    let canonical = |a: &SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    wait_for(|| {
        Ok(crate::inet::waiting_connections(&st.local)?
            .iter()
            .any(|c| {
                canonical(&c.peer) == canonical(&st.peer)
                    && c.state == want_state
                    && c.rqueue as usize == st.recv_queue.len() + st.fin_received as usize
            }))
    })
    .map_err(|e| Error::Unexpected {
        pid: 0,
        what: format!(
            "{}: it did not come back whole ({e}); is {} on this host, and its listener listening?",
            what(),
            st.local.ip()
        ),
    })
}

/// Waits for `done` (the kernel handles our packets in the sender's context, so this
/// is normally at once), for a second at most.
fn wait_for(mut done: impl FnMut() -> Result<bool>) -> std::result::Result<(), String> {
    let t = std::time::Instant::now();
    loop {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) if t.elapsed() < std::time::Duration::from_secs(1) => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Ok(false) => return Err("not after 1 s".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
fn set_window(sock: &OwnedFd, window: &[u32; 5]) -> Result<()> {
    let w: Vec<u8> = window.iter().flat_map(|v| v.to_ne_bytes()).collect();
    // SAFETY: setsockopt reads the 20-byte tcp_repair_window from `w`.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            w.as_ptr().cast(),
            w.len() as libc::socklen_t,
        )
    };
    check(r as libc::c_long, || "setsockopt(TCP_REPAIR_WINDOW)".into()).map(|_| ())
}

fn shutdown_write(sock: &OwnedFd) -> Result<()> {
    // SAFETY: shutdown takes no pointers.
    let r = unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
    check(r as libc::c_long, || "shutdown(SHUT_WR)".into()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Connections waiting in a listener's queue (IPv4 and IPv6, one half-closed by
    /// its client) are taken out, closed silently and put back: the listener's next
    /// accepts return them, in order, whole, and their clients talk on with them.
    #[test]
    fn waiting_connections_are_put_back_in_their_listeners_queue() {
        for host in ["127.0.0.1", "::1"] {
            let l = TcpListener::bind((host, 0)).unwrap();
            let here = l.local_addr().unwrap();
            let mut a = TcpStream::connect(here).unwrap();
            let mut b = TcpStream::connect(here).unwrap();
            a.write_all(b"first, waiting").unwrap();
            b.write_all(b"second").unwrap();
            b.shutdown(std::net::Shutdown::Write).unwrap();
            // Wait until both sit in the queue with their bytes (and b's FIN).
            let queued = |c: &TcpStream, n: u32, state: u8| {
                let peer = c.local_addr().unwrap();
                crate::inet::waiting_connections(&here)
                    .unwrap()
                    .iter()
                    .any(|w| w.peer == peer && w.rqueue == n && w.state == state)
            };
            // sock_diag counts a FIN received in the bytes waiting.
            let t = std::time::Instant::now();
            while !(queued(&a, 14, ESTABLISHED) && queued(&b, 7, CLOSE_WAIT)) {
                assert!(t.elapsed().as_secs() < 5, "the connections never queued");
                std::thread::yield_now();
            }
            let fd: OwnedFd = l.try_clone().unwrap().into();
            let taken = crate::inet::accept_waiting(&fd).unwrap();
            assert_eq!(taken.len(), 2);
            let mut states = Vec::new();
            for t in &taken {
                set_repair(t, true).unwrap();
                states.push(read_state(t).unwrap());
            }
            assert_eq!(states[0].peer, a.local_addr().unwrap());
            assert!(states[1].fin_received);
            let table = format!("mcr_test_requeue_{}", std::process::id());
            let conns: Vec<_> = states.iter().map(|s| (s.local, s.peer)).collect();
            crate::nft::lock(&table, &conns, crate::nft::Inbound::Drop, None).unwrap();
            // Closed in repair mode: nothing goes on the wire.
            for t in taken {
                forget(t).unwrap();
            }
            let back: Vec<_> = states.iter().map(requeue).collect();
            crate::nft::unlock(&table).unwrap();
            for r in back {
                r.unwrap();
            }
            for (c, want) in [(&mut a, &b"first, waiting"[..]), (&mut b, b"second")] {
                let (mut s, peer) = l.accept().unwrap();
                assert_eq!(peer, c.local_addr().unwrap());
                let mut got = vec![0u8; want.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, want);
                s.write_all(b"answer").unwrap();
                let mut six = [0u8; 6];
                c.read_exact(&mut six).unwrap();
                assert_eq!(&six, b"answer");
            }
            a.write_all(b"more").unwrap();
        }
    }

    /// A live loopback connection: one end is read, closed silently and made again;
    /// its peer sees both queues intact and carries on.
    #[test]
    fn a_connection_is_made_again_with_both_queues() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut a, _) = l.accept().unwrap();
        c.write_all(b"waiting for a").unwrap();
        a.write_all(b"waiting for c").unwrap();
        // Wait until c's bytes sit in a's receive queue.
        let mut b = [0u8; 13];
        while a.peek(&mut b).unwrap() < b.len() {}
        let fd: OwnedFd = a.try_clone().unwrap().into();
        set_repair(&fd, true).unwrap();
        let st = read_state(&fd).unwrap();
        assert_eq!(st.recv_queue, b"waiting for a");
        assert_eq!(st.local, l.local_addr().unwrap());
        assert_eq!(st.peer, c.local_addr().unwrap());
        drop(a);
        forget(fd).unwrap();
        let a2 = restore(&st, |_| Ok(()), |_| Ok(())).unwrap();
        finish(&a2, &st).unwrap();
        let mut a2 = TcpStream::from(a2);
        let mut got = [0u8; 13];
        a2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"waiting for a");
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"waiting for c");
        c.write_all(b"after").unwrap();
        a2.write_all(b"back!").unwrap();
        let mut five = [0u8; 5];
        a2.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"after");
        c.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"back!");
    }
}
