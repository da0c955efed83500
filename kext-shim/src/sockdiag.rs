//! sock_diag over netlink: the kernel's table of sockets of one family, as raw
//! messages for the family's own parser (unix, inet).

use crate::{check, Errno, Result, SysError};
use std::os::fd::AsRawFd;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// Sends `req` (a family's diag request, without the netlink header) as a dump request
/// and hands each answer's payload to `each`.
pub fn dump(req: &[u8], mut each: impl FnMut(&[u8])) -> Result<()> {
    let sock = crate::netlink::socket_for(NETLINK_SOCK_DIAG, "NETLINK_SOCK_DIAG")?;
    let len = 16 + req.len();
    let mut msg = vec![0u8; len];
    msg[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    msg[16..].copy_from_slice(req);
    // SAFETY: sending our own buffer of the stated length.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    check(n as libc::c_long, || "send(sock_diag request)".into())?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into our own buffer of the stated length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = check(n as libc::c_long, || "recv(sock_diag)".into())? as usize;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32_at(&buf, off) as usize;
            let ty = u16_at(&buf, off + 4);
            if len < 16 || off + len > n {
                break;
            }
            if ty == NLMSG_DONE {
                return Ok(());
            }
            if ty == NLMSG_ERROR {
                let errno = -(u32_at(&buf, off + 16) as i32);
                return Err(SysError::new("sock_diag dump", Errno::from_raw(errno)).into());
            }
            each(&buf[off + 16..off + len]);
            off += (len + 3) & !3;
        }
    }
}

/// The (type, payload) attributes after a diag message's fixed part.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let alen = u16_at(b, 0) as usize;
        let aty = u16_at(b, 2);
        if alen < 4 || alen > b.len() {
            return None;
        }
        let data = &b[4..alen];
        b = &b[((alen + 3) & !3).min(b.len())..];
        Some((aty, data))
    })
}
