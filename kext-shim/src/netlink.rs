//! Netfilter's netlink (nfnetlink): messages built as bytes, sent in one batch, and
//! every answer checked. Shared by the nftables rules and the packet queue.

use crate::{check, Errno, Result, SysError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NETLINK_NETFILTER: i32 = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 1 << 15;

/// Attributes of one message, appended in order; nests are closed by the closure.
#[derive(Default)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    pub fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let b = &mut self.0;
        b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(data);
        b.resize((b.len() + 3) & !3, 0);
        self
    }

    /// A nul-terminated string, as nftables names are.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.bytes(ty, &v)
    }

    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn nest(&mut self, ty: u16, inner: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut a = Attrs::default();
        inner(&mut a);
        self.bytes(ty | NLA_F_NESTED, &a.0)
    }
}

/// One nfnetlink message: type `subsys << 8 | msg`, netlink flags, and the nfgenmsg
/// header's family and resource id.
pub fn message(subsys: u16, msg: u16, flags: u16, family: u8, res_id: u16, a: &Attrs) -> Vec<u8> {
    let len = 16 + 4 + a.0.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&(subsys << 8 | msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(&a.0);
    m
}

pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// The (type, payload) attributes in `b`, nest flag cleared.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let alen = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let aty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if alen < 4 || alen > b.len() {
            return None;
        }
        let data = &b[4..alen];
        b = &b[((alen + 3) & !3).min(b.len())..];
        Some((aty, data))
    })
}

/// A netfilter netlink socket.
pub fn socket() -> Result<OwnedFd> {
    socket_for(NETLINK_NETFILTER, "NETLINK_NETFILTER")
}

/// A netlink socket of `protocol` (`name` for messages).
pub fn socket_for(protocol: i32, name: &str) -> Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    check(fd as libc::c_long, || format!("socket({name})"))?;
    // SAFETY: a fresh fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn send(sock: &OwnedFd, buf: &[u8], what: &str) -> Result<()> {
    // SAFETY: sending our own buffer of the stated length to the kernel.
    let n = unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    check(n as libc::c_long, || what.to_string()).map(|_| ())
}

/// Receives answers, handing each message (type, payload after the netlink header) to
/// `each`, until `each` says it has what it waited for. An error answer ends it.
pub fn receive(sock: &OwnedFd, what: &str, mut each: impl FnMut(u16, &[u8]) -> bool) -> Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into our own buffer of the stated length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = check(n as libc::c_long, || format!("{what}: recv"))? as usize;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32_at(&buf, off) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                break;
            }
            let body = &buf[off + 16..off + len];
            if ty == NLMSG_ERROR && body.len() >= 4 {
                let errno = -(u32_at(body, 0) as i32);
                if errno != 0 {
                    return Err(SysError::new(what.to_string(), Errno::from_raw(errno)).into());
                }
            }
            if each(ty, body) {
                return Ok(());
            }
            off += (len + 3) & !3;
        }
    }
}

/// Receives until `acks` acknowledgements came (or an error did).
pub fn wait_acks(sock: &OwnedFd, mut acks: usize, what: &str) -> Result<()> {
    if acks == 0 {
        return Ok(());
    }
    receive(sock, what, |ty, _| {
        if ty == NLMSG_ERROR {
            acks -= 1;
        }
        acks == 0
    })
}

/// Receives a dump's answers, each message's payload to `each`, until its end.
pub fn dump_answers(sock: &OwnedFd, what: &str, mut each: impl FnMut(&[u8])) -> Result<()> {
    receive(sock, what, |ty, body| {
        if ty == NLMSG_DONE {
            return true;
        }
        if ty != NLMSG_ERROR {
            each(body);
        }
        false
    })
}
