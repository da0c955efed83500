//! Open file descriptors.

use super::FileRef;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: i32,
    /// open(2) flags without O_CLOEXEC.
    pub flags: u32,
    pub cloexec: bool,
    /// The open file description behind the fd, numbered across the whole image: fds
    /// with the same number share one offset and one set of flags (dup, fork).
    pub ofd: u32,
    pub kind: FdKind,
    /// Locks held through this fd (flock and OFD locks belong to its open file
    /// description, POSIX locks to the process).
    pub locks: Vec<FileLock>,
}

/// A lock on a file, as /proc/PID/fdinfo shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub kind: LockKind,
    pub write: bool,
    pub start: u64,
    /// Last byte locked; None to the end of the file.
    pub end: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Flock,
    Ofd,
    Posix,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A regular file, reopened by path at its offset.
    Regular {
        file: FileRef,
        pos: u64,
    },
    Directory {
        file: FileRef,
    },
    /// A character device (/dev/null, /dev/zero, ...), reopened by path.
    CharDevice {
        file: FileRef,
        pos: u64,
    },
    /// One end of a pipe whose both ends are inside the image; `ino` names the pipe
    /// (see `Snapshot::pipes`).
    Pipe {
        ino: u64,
        read_end: bool,
    },
    /// A named pipe, reopened by path; like a pipe, its bytes in flight are in
    /// `Snapshot::pipes` when both ends are inside the image.
    Fifo {
        file: FileRef,
        read_end: bool,
    },
    /// A listening unix socket bound to `name` (a path, or `@name` for the abstract
    /// namespace), with no connection waiting; `mode` is its socket file's.
    UnixListener {
        ino: u64,
        kind: i32,
        name: String,
        backlog: u32,
        mode: u32,
    },
    /// A unix socket other than a listener (see `Snapshot::unix`).
    UnixSocket {
        ino: u64,
    },
    /// A TCP or UDP socket (see `Snapshot::inet`).
    InetSocket {
        ino: u64,
    },
    /// A memfd (see `Snapshot::shmem`), at its offset.
    Memfd {
        ino: u64,
        pos: u64,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    /// Time left to the next expiry and the period, in ns; expirations not yet read.
    TimerFd {
        clockid: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// An inotify instance and its watches (by watch descriptor, which restore keeps).
    Inotify {
        watches: Vec<InotifyWatch>,
    },
    SignalFd {
        mask: u64,
    },
    /// An epoll instance and its interest list, by the fd numbers its owner used.
    Epoll {
        targets: Vec<EpollTarget>,
    },
    /// The master of a pseudo-terminal inside the image (see `Snapshot::ptys`).
    PtyMaster {
        index: u32,
    },
    /// A slave of a pseudo-terminal whose master is inside the image, reopened by its
    /// path (`/dev/pts/N`).
    PtySlave {
        index: u32,
        path: String,
    },
    /// Something outside the dumped tree (a shell job's terminal or pipe), identified by
    /// the kernel's name for it (`pipe:[1234]`, `/dev/pts/3`). Restore binds it to an fd
    /// the restorer was given.
    External {
        key: String,
    },
}

/// A pipe with both ends in the image, and what was in flight in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeImage {
    pub ino: u64,
    /// The named pipe on disk, for a FIFO.
    pub fifo: Option<FileRef>,
    pub capacity: u32,
    pub data: Vec<u8>,
}

/// One fd an epoll instance watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

/// A unix socket that is not a listener, with what was waiting to be read on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocketImage {
    pub ino: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    /// Its bound name (a path, or `@name`); an accepted connection has its listener's.
    pub name: Option<String>,
    pub link: SocketLink,
    /// Messages (a stream's bytes, in pieces) queued for this end to read.
    pub queue: Vec<Vec<u8>>,
}

/// A TCP listener or a UDP socket (established TCP connections need TCP_REPAIR and
/// are refused for now): made again, bound, listening or connected as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetSocketImage {
    pub ino: u64,
    /// AF_INET or AF_INET6.
    pub family: i32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: i32,
    /// The address it was bound to, if any.
    pub local: Option<std::net::SocketAddr>,
    /// The peer of a connected UDP socket.
    pub peer: Option<std::net::SocketAddr>,
    /// The backlog of a listener.
    pub listen: Option<u32>,
    /// Options the program changed from a fresh socket's: (level, name, raw value).
    pub options: Vec<(i32, i32, Vec<u8>)>,
    /// An established connection (taken with --tcp-established).
    pub tcp: Option<TcpConnImage>,
    /// UDP: the datagrams waiting to be read, in order, with who sent each.
    pub datagrams: Vec<(std::net::SocketAddr, Vec<u8>)>,
    /// A listener: the connections waiting to be accepted, in queue order (taken with
    /// --tcp-established), put back in its queue at restore.
    pub waiting: Vec<TcpConnImage>,
}

/// An established TCP connection as TCP_REPAIR reads it (see kext_shim::tcp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnImage {
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    pub recv_seq: u32,
    pub send_seq: u32,
    pub recv_queue: Vec<u8>,
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    pub mss: u32,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    pub window: [u32; 5],
    pub sndbuf: i32,
    pub rcvbuf: i32,
    /// Half-closed: our FIN went out, the peer's came in (seqs count data only).
    pub fin_sent: bool,
    pub fin_received: bool,
}

impl From<kext_shim::tcp::TcpState> for TcpConnImage {
    fn from(s: kext_shim::tcp::TcpState) -> Self {
        Self {
            local: s.local,
            peer: s.peer,
            recv_seq: s.recv_seq,
            send_seq: s.send_seq,
            recv_queue: s.recv_queue,
            send_queue: s.send_queue,
            unsent: s.unsent,
            mss: s.mss,
            options: s.options,
            snd_wscale: s.snd_wscale,
            rcv_wscale: s.rcv_wscale,
            timestamp: s.timestamp,
            window: s.window,
            sndbuf: s.sndbuf,
            rcvbuf: s.rcvbuf,
            fin_sent: s.fin_sent,
            fin_received: s.fin_received,
        }
    }
}

impl From<&TcpConnImage> for kext_shim::tcp::TcpState {
    fn from(s: &TcpConnImage) -> Self {
        Self {
            local: s.local,
            peer: s.peer,
            recv_seq: s.recv_seq,
            send_seq: s.send_seq,
            recv_queue: s.recv_queue.clone(),
            send_queue: s.send_queue.clone(),
            unsent: s.unsent,
            mss: s.mss,
            options: s.options,
            snd_wscale: s.snd_wscale,
            rcv_wscale: s.rcv_wscale,
            timestamp: s.timestamp,
            window: s.window,
            sndbuf: s.sndbuf,
            rcvbuf: s.rcvbuf,
            fin_sent: s.fin_sent,
            fin_received: s.fin_received,
        }
    }
}

/// What a unix socket is connected to, which says how it is made again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketLink {
    Unconnected,
    /// One end of a pair made together (socketpair); `peer` is the other end.
    Pair {
        peer: u64,
    },
    /// Connected to listener `listener` (an fd of the tree): accepted as socket
    /// `accepted`, or still waiting in the listener's queue.
    Client {
        listener: u64,
        accepted: Option<u64>,
    },
    /// The accepted end of `client`'s connection, made along with it.
    Accepted {
        client: u64,
    },
    /// A datagram socket connected to the one bound to `name`.
    ConnectedTo {
        name: String,
    },
    /// A connected stream socket whose peer was closed: what it left is read, then
    /// end of file; a write gets EPIPE.
    PeerClosed,
}

/// A pseudo-terminal with its master inside the image: made again with its index, so
/// that `/dev/pts/N` names it still.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyImage {
    pub index: u32,
    /// The multiplexer its master was opened through (`/dev/ptmx`).
    pub ptmx: String,
    /// The slave's `struct termios2`, and the master's.
    pub termios: Vec<u8>,
    pub master_termios: Vec<u8>,
    /// rows, cols, xpixel, ypixel.
    pub winsize: [u16; 4],
    pub locked: bool,
    pub packet: bool,
    /// The session it is the controlling terminal of (its leader's pid), and that
    /// session's foreground process group.
    pub session: Option<(i32, i32)>,
}

/// One inotify watch: its descriptor, the path watched and the event mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub path: String,
    pub mask: u32,
}
