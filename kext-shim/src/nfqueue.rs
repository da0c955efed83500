//! An NFQUEUE (nfnetlink_queue) that holds packets instead of dropping them: an nft
//! `queue` verdict parks each packet in the kernel, with a message to this socket, until
//! we say what becomes of it. While a connection moves, its peer's packets wait here and
//! are delivered the moment the connection is made again, so the peer never has to wait
//! for its retransmission timer. When the socket closes unanswered, the kernel drops
//! what it holds: the same as a drop rule, never worse.

use crate::netlink::{self, u32_at, Attrs};
use crate::{check, Errno, Result, SysError};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// Packets the kernel parks for us before it drops the next ones.
const MAX_HELD: u32 = 65536;

/// What becomes of the packets held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// On their way, as if they had just arrived.
    Accept,
    /// Gone; their senders retransmit.
    Drop,
}

/// A bound queue and what it has seen.
#[derive(Debug)]
pub struct PacketQueue {
    sock: OwnedFd,
    num: u16,
    /// The id of the last packet announced; the kernel numbers them from 1 upwards.
    last_id: Option<u32>,
    held: u64,
}

impl AsFd for PacketQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl PacketQueue {
    /// Binds the first free queue number among the 256 from `first` on. A number
    /// bound by another socket answers EPERM (EBUSY on older kernels), as does a
    /// caller without CAP_NET_ADMIN: hence the bound on the search.
    pub fn bind_free(first: u16) -> Result<PacketQueue> {
        let mut num = first;
        loop {
            match Self::bind(num) {
                Err(e)
                    if matches!(e.errno(), Some(Errno::EBUSY | Errno::EPERM))
                        && num < first.saturating_add(255) =>
                {
                    num += 1
                }
                r => return r,
            }
        }
    }

    /// Binds queue `num` of this network namespace, copying no payload (only the ids
    /// matter) and holding up to [`MAX_HELD`] packets.
    pub fn bind(num: u16) -> Result<PacketQueue> {
        let sock = netlink::socket()?;
        // Room for every announcement: one that does not fit costs its packet.
        let big: libc::c_int = 8 << 20;
        // SAFETY: setsockopt reads one int; CAP_NET_ADMIN lets it pass rmem_max.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                4,
            )
        };
        let mut q = PacketQueue {
            sock,
            num,
            last_id: None,
            held: 0,
        };
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        let mut a = Attrs::default();
        a.bytes(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])
            .bytes(NFQA_CFG_PARAMS, &params)
            .be32(NFQA_CFG_QUEUE_MAXLEN, MAX_HELD);
        q.request(NFQNL_MSG_CONFIG, &a, "binding")?;
        Ok(q)
    }

    /// Takes a queue bound by another process (inherited as `fd`).
    pub fn from_inherited(fd: RawFd, num: u16) -> Result<PacketQueue> {
        let st =
            nix::sys::stat::fstat(fd).map_err(|e| SysError::new(format!("fstat(fd {fd})"), e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(SysError::new(format!("fd {fd} is not a socket"), Errno::ENOTSOCK).into());
        }
        // SAFETY: the caller hands us this fd, inherited for us alone.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PacketQueue {
            sock,
            num,
            last_id: None,
            held: 0,
        })
    }

    pub fn num(&self) -> u16 {
        self.num
    }

    /// How many packets were announced so far.
    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one nfqueue message with an ack asked for, and waits for the ack (reading
    /// past any packet announcements).
    fn request(&mut self, msg: u16, attrs: &Attrs, what: &str) -> Result<()> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let m = netlink::message(NFNL_SUBSYS_QUEUE, msg, flags, 0, self.num, attrs);
        let num = self.num;
        let what = || format!("nfqueue {num}: {what}");
        // SAFETY: sending our own buffer of the stated length to the kernel.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        check(n as libc::c_long, what)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: receiving into our own buffer of the stated length.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = check(n as libc::c_long, what)? as usize;
            if let Some(errno) = self.parse(&buf[..n]) {
                return match errno {
                    0 => Ok(()),
                    e => Err(SysError::new(what(), Errno::from_raw(e)).into()),
                };
            }
        }
    }

    /// Reads the messages in `b`: packet announcements are counted; an ack or error
    /// gives its (positive) errno.
    fn parse(&mut self, b: &[u8]) -> Option<i32> {
        let mut off = 0;
        let mut ack = None;
        while off + 16 <= b.len() {
            let len = u32_at(b, off) as usize;
            let ty = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
            if len < 16 || off + len > b.len() {
                break;
            }
            if ty == NLMSG_ERROR && len >= 20 {
                ack = Some(-(u32_at(b, off + 16) as i32));
            } else if ty == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET && len >= 20 {
                for (aty, data) in netlink::attrs(&b[off + 20..off + len]) {
                    if aty & 0x7fff == NFQA_PACKET_HDR && data.len() >= 4 {
                        let id = u32::from_be_bytes(data[..4].try_into().expect("4"));
                        self.last_id = Some(id);
                        self.held += 1;
                    }
                }
            }
            off += (len + 3) & !3;
        }
        ack
    }

    /// Reads every announcement waiting on the socket, without blocking.
    pub fn drain(&mut self) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: receiving into our own buffer of the stated length.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return match Errno::last() {
                    Errno::EAGAIN => Ok(()),
                    // Announcements were lost, and with them their packets: the kernel
                    // dropped what it could not announce. The rest is still held.
                    Errno::ENOBUFS => continue,
                    e => Err(SysError::new(format!("nfqueue {}: recv", self.num), e).into()),
                };
            }
            let _ = self.parse(&buf[..n as usize]);
        }
    }

    /// Settles every packet held so far at once. The caller stops new packets from
    /// coming first (the rules that queue them are gone), so that none is left behind.
    pub fn settle(&mut self, verdict: Verdict) -> Result<()> {
        self.drain()?;
        let Some(id) = self.last_id else {
            return Ok(());
        };
        let v = match verdict {
            Verdict::Accept => NF_ACCEPT,
            Verdict::Drop => NF_DROP,
        };
        let mut hdr = v.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        let mut a = Attrs::default();
        a.bytes(NFQA_VERDICT_HDR, &hdr);
        self.request(NFQNL_MSG_VERDICT_BATCH, &a, "settling the packets held")?;
        self.last_id = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    fn wait_readable(fd: RawFd) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(r, 1, "nothing was queued");
    }

    /// In a network namespace of its own (a thread's): a connection stopped with its
    /// inbound packets queued, read and made again on a new socket as a restore
    /// would; what the peer sent meanwhile is on the new socket the moment the queue
    /// accepts it (a retransmission would have been held too).
    #[test]
    fn a_held_packet_reaches_the_socket_made_again_when_accepted() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(st.success());
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, _) = l.accept().unwrap();
            let mut q = PacketQueue::bind_free(4000).unwrap();
            let conn = (a.local_addr().unwrap(), a.peer_addr().unwrap());
            let inbound = crate::nft::Inbound::Queue(q.num());
            crate::nft::lock("mcr_t", &[conn], inbound, Some(1)).unwrap();
            assert_eq!(
                crate::nft::dumping().unwrap(),
                vec![("mcr_t".to_string(), 1)]
            );
            c.write_all(b"held").unwrap();
            wait_readable(q.fd());
            q.drain().unwrap();
            assert!(q.held() >= 1);
            let fd: OwnedFd = a.try_clone().unwrap().into();
            crate::tcp::set_repair(&fd, true).unwrap();
            let st = crate::tcp::read_state(&fd).unwrap();
            assert!(st.recv_queue.is_empty(), "the packet was not held");
            drop(a);
            crate::tcp::forget(fd).unwrap();
            let a2 = TcpStream::from(crate::tcp::restore(&st, |_| Ok(()), |_| Ok(())).unwrap());
            crate::nft::disown("mcr_t").unwrap();
            assert!(crate::nft::dumping().unwrap().is_empty());
            crate::nft::open("mcr_t").unwrap();
            q.settle(Verdict::Accept).unwrap();
            a2.set_nonblocking(true).unwrap();
            let mut b = [0u8; 4];
            assert_eq!(a2.peek(&mut b).expect("delivered by the verdict"), 4);
            assert_eq!(&b, b"held");
            crate::nft::unlock("mcr_t").unwrap();
            assert!(crate::nft::tables().unwrap().is_empty());
            crate::nft::unlock("mcr_t").unwrap();
        })
        .join()
        .unwrap();
    }
}
