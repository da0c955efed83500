//! Unix sockets: what sock_diag says of them (type, state, name, peer), and reading
//! what is queued on one without taking it.

use crate::pidfd::{pidfd_getfd, pidfd_open};
use crate::{check, Errno, Pid, Result, SysError};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One unix socket, as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    pub ino: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    /// TCP-style state: 1 established, 7 unconnected, 10 listening.
    pub state: u8,
    /// Bound name: a path, or `@name` for the abstract namespace.
    pub name: Option<String>,
    pub peer: Option<u64>,
    /// For a listener: connections waiting to be accepted, and the backlog it was given.
    /// For any other socket: bytes (or for a datagram socket, the first message's)
    /// waiting to be read, and bytes sent not yet taken by the peer.
    pub pending: u32,
    pub backlog: u32,
    /// For a listener: the waiting connections' own sockets, oldest first.
    pub icons: Vec<u64>,
}

const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UDIAG_SHOW_ICONS: u32 = 8;
const UNIX_DIAG_ICONS: u16 = 3;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// Every unix socket of the network namespace, by inode.
pub fn unix_sockets() -> Result<BTreeMap<u64, UnixSocket>> {
    // unix_diag_req: family, protocol, pad, states, ino, show, cookie.
    let mut req = [0u8; 24];
    req[0] = libc::AF_UNIX as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req[12..16].copy_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_ICONS).to_ne_bytes(),
    );
    req[16..24].copy_from_slice(&[0xff; 8]);
    let mut out = BTreeMap::new();
    crate::sockdiag::dump(&req, |m| {
        if m.len() < 16 {
            return;
        }
        let mut s = UnixSocket {
            ino: u32_at(m, 4) as u64,
            kind: m[1] as i32,
            state: m[2],
            name: None,
            peer: None,
            pending: 0,
            backlog: 0,
            icons: Vec::new(),
        };
        for (aty, data) in crate::sockdiag::attrs(&m[16..]) {
            match aty {
                UNIX_DIAG_NAME if !data.is_empty() => {
                    s.name = Some(if data[0] == 0 {
                        format!("@{}", String::from_utf8_lossy(&data[1..]))
                    } else {
                        String::from_utf8_lossy(data)
                            .trim_end_matches('\0')
                            .to_string()
                    })
                }
                UNIX_DIAG_PEER if data.len() >= 4 => s.peer = Some(u32_at(data, 0) as u64),
                UNIX_DIAG_ICONS => {
                    s.icons = data.chunks_exact(4).map(|c| u32_at(c, 0) as u64).collect()
                }
                UNIX_DIAG_RQLEN if data.len() >= 8 => {
                    s.pending = u32_at(data, 0);
                    s.backlog = u32_at(data, 4);
                }
                _ => {}
            }
        }
        out.insert(s.ino, s);
    })?;
    Ok(out)
}

/// Sets SO_PEEK_OFF on `sock` (`on` names it): 0 makes each MSG_PEEK walk on past what
/// it read, -1 turns that off again.
pub(crate) fn set_peek_off(sock: std::os::fd::RawFd, v: i32, on: &str) -> Result<()> {
    // SAFETY: setsockopt reads one int.
    let r = unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&v as *const i32).cast(),
            4,
        )
    };
    check(r as libc::c_long, || format!("SO_PEEK_OFF on {on}")).map(|_| ())
}

/// The messages queued for reading on fd `fd` of `pid` (a stream's bytes as one), left
/// in place: they are peeked with SO_PEEK_OFF walking the queue, which is put back to
/// off after. Refuses sockets with file descriptors in flight.
pub fn peek_queue(pid: Pid, fd: i32, stream: bool) -> Result<Vec<Vec<u8>>> {
    let pidfd = pidfd_open(pid)?;
    let s = pidfd_getfd(&pidfd, pid, fd)?;
    let raw = s.as_raw_fd();
    let on = format!("fd {fd} of pid {pid}");
    let set_peek_off = |v: i32| set_peek_off(raw, v, &on);
    set_peek_off(0)?;
    let res = (|| {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut cmsg = [0u8; 256];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr points at our iovec and control buffer, both live.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = cmsg.len();
            // SAFETY: recvmsg fills the buffers msg points at, within their lengths.
            let n = unsafe { libc::recvmsg(raw, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EAGAIN {
                    return Ok(out);
                }
                return Err(SysError::new(format!("peeking fd {fd} of pid {pid}"), e).into());
            }
            if msg.msg_controllen > 0 {
                return Err(crate::Error::Unexpected {
                    pid: pid.as_raw(),
                    what: format!("fd {fd} has file descriptors or credentials in flight"),
                });
            }
            if n == 0 && stream {
                return Ok(out);
            }
            if n == 0 {
                // An empty datagram does not move the peek offset: we could not get past it.
                return Err(crate::Error::Unexpected {
                    pid: pid.as_raw(),
                    what: format!(
                        "fd {fd} has an empty datagram queued, which cannot be read in place"
                    ),
                });
            }
            out.push(buf[..n as usize].to_vec());
        }
    })();
    let reset = set_peek_off(-1);
    let q = res?;
    reset?;
    Ok(q)
}

/// A new unix socket of `kind` (close-on-exec).
pub fn socket(kind: i32) -> Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    check(fd as libc::c_long, || "socket(AF_UNIX)".into())?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `name` (a path, or `@name` in the abstract namespace) as a sockaddr_un and its length.
fn sockaddr(name: &str) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, abstract_) = match name.strip_prefix('@') {
        Some(n) => (n.as_bytes(), true),
        None => (name.as_bytes(), false),
    };
    let off = usize::from(abstract_);
    if bytes.len() + off >= addr.sun_path.len() {
        return Err(crate::Error::Unexpected {
            pid: 0,
            what: format!("socket name {name:?} is too long"),
        });
    }
    for (i, &b) in bytes.iter().enumerate() {
        addr.sun_path[i + off] = b as libc::c_char;
    }
    let len =
        std::mem::size_of::<libc::sa_family_t>() + off + bytes.len() + usize::from(!abstract_);
    Ok((addr, len as libc::socklen_t))
}

/// Binds `sock` to `name`. A stale socket file at the path (left by the socket this one
/// replaces) is removed first.
pub fn bind(sock: &OwnedFd, name: &str) -> Result<()> {
    let (addr, len) = sockaddr(name)?;
    if !name.starts_with('@') {
        if let Ok(m) = std::fs::symlink_metadata(name) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(name);
            }
        }
    }
    // SAFETY: `addr` is a sockaddr_un and `len` does not exceed it.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    check(r as libc::c_long, || format!("bind to {name}")).map(|_| ())
}

/// A unix socket of `kind` bound to `name` and listening with `backlog`.
pub fn listen(kind: i32, name: &str, backlog: u32) -> Result<OwnedFd> {
    let sock = socket(kind)?;
    bind(&sock, name)?;
    // SAFETY: listen takes no pointers.
    let r = unsafe { libc::listen(sock.as_raw_fd(), backlog as i32) };
    check(r as libc::c_long, || format!("listen on {name}"))?;
    Ok(sock)
}

/// Connects `sock` to `name`; for a stream or seqpacket listener the connection waits
/// in its queue until accepted (the socket must not block: a full queue is an error).
pub fn connect(sock: &OwnedFd, name: &str) -> Result<()> {
    let (addr, len) = sockaddr(name)?;
    // SAFETY: `addr` is a sockaddr_un and `len` does not exceed it.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    check(r as libc::c_long, || format!("connect to {name}")).map(|_| ())
}

/// Takes the oldest waiting connection off `listener`.
pub fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    // SAFETY: accept4 may take null address pointers.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    check(fd as libc::c_long, || "accept4".into())?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends each of `messages` to the socket bound to `name`, from a fresh unnamed socket
/// of `kind`.
pub fn send_to(kind: i32, name: &str, messages: &[Vec<u8>]) -> Result<()> {
    let sock = socket(kind)?;
    let (addr, len) = sockaddr(name)?;
    for m in messages {
        // SAFETY: sending our own buffer to `addr`, a sockaddr_un of length `len`.
        let r = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                libc::MSG_DONTWAIT,
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        check(r as libc::c_long, || format!("sendto {name}"))?;
    }
    Ok(())
}

/// A connected pair of SOCK_SEQPACKET sockets, close-on-exec: messages keep their
/// bounds, and a closed end reads as 0 at the other (a datagram pair never ends).
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| SysError::new("socketpair(AF_UNIX, SOCK_SEQPACKET)", e).into())
}

/// Sends `data` with copies of `fds` (SCM_RIGHTS).
pub fn send_with_fds(sock: &impl AsRawFd, data: &[u8], fds: &[i32]) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map(|_| ())
        .map_err(|e| SysError::new("sendmsg(SCM_RIGHTS)", e).into())
}

/// Receives one message into `buf` and the fds that came with it (at most 16);
/// `(0, [])` once the other end is closed.
pub fn recv_with_fds(sock: &impl AsRawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 16]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    loop {
        let m = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SysError::new("recvmsg(SCM_RIGHTS)", e).into()),
            Ok(m) => m,
        };
        let mut fds = Vec::new();
        for c in m
            .cmsgs()
            .map_err(|e| SysError::new("recvmsg: control data", e))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for f in raw {
                    // SAFETY: the kernel installed this fd in our table for this
                    // message as it was read; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(f) });
                }
            }
        }
        return Ok((m.bytes, fds));
    }
}

/// Takes over fd `fd`, inherited across exec for this process alone; refused unless it
/// is a unix socket.
pub fn inherited_socket(fd: i32) -> Result<OwnedFd> {
    let link = crate::procfs::read_link(&format!("/proc/self/fd/{fd}"))?;
    if !link.starts_with("socket:[") {
        return Err(crate::Error::Unexpected {
            pid: Pid::this().as_raw(),
            what: format!("inherited fd {fd} is {link}, not a socket"),
        });
    }
    // SAFETY: the fd is open (its link was just read), is a socket, and was inherited
    // for us alone: nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
