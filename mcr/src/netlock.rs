//! The wire lock: from the freeze until they are made again, a dump's TCP connections
//! are stopped on the wire by an nftables table of ours, and what their peers send is
//! held in a packet queue instead of dropped. The peer's packets are delivered the
//! moment the connections exist again, so the peer sees a pause as long as the
//! blackout, not one of its retransmission timeouts (200 ms at least, then doubling).
//!
//! The queue outlives `mcr checkpoint`: a small process of ours, the holder (`mcr
//! hold-packets`), keeps its socket from the lock until the restore tells it what to
//! do, and it alone opens and removes the table then:
//!
//! ```text
//!  mcr checkpoint        holder                         mcr restore
//!  lock: queue, table ─▶ holds (stdin open)
//!  ├ dump fails / runs on: stdin closed ─▶ deliver, remove table, exit
//!  └ workload killed: "keep" ─▶ holds, waits ─── SIGUSR1 (same netns): deliver
//!                                            └── SIGUSR2 (elsewhere, failed): drop
//! ```
//!
//! Every path ends with the table gone: a holder that dies leaves its packets to the
//! kernel, which drops them (the peer retransmits), and the table to the next mcr
//! run (while dumping) or to the restore. Without a packet queue in the kernel the
//! table drops instead of holding, as before.

use crate::model::NetLockImage;
use kext_shim::nfqueue::{PacketQueue, Verdict};
use kext_shim::nft::{self, Inbound};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The first queue number tried; the next free one is taken.
const FIRST_QUEUE: u16 = 0x6d63;
/// How long a holder keeps packets for a restore that does not come.
pub const MAX_HOLD: Duration = Duration::from_secs(600);
/// How long a restore or a dump waits for the holder to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// The connections of a dump, locked on the wire.
pub struct WireLock {
    pub table: String,
    holder: Option<Child>,
    /// Handed to the image: it outlives us.
    kept: bool,
}

fn own_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A lock made ready before the freeze: its queue bound and its holder started (an
/// exec, 0.4-2 ms here, that the freeze need not wait for), so that locking is only
/// the table. Dropped unused, its holder goes.
pub struct Ready {
    table: String,
    /// The queue's number; the holder alone has its socket.
    queue: Option<u16>,
    holder: Option<Child>,
}

impl Ready {
    pub fn new(tag: u64) -> Ready {
        let table = nft::table_name(tag);
        let (queue, holder) = match PacketQueue::bind_free(FIRST_QUEUE) {
            Ok(q) => match spawn_holder(&q, &table) {
                // Our copy of the queue closes here: the holder has it.
                Ok(c) => (Some(q.num()), Some(c)),
                Err(e) => {
                    tracing::warn!(
                        "starting the packet holder: {e}; the peers' packets are dropped"
                    );
                    (None, None)
                }
            },
            Err(e) => {
                tracing::warn!("no packet queue ({e}): the peers' packets are dropped, not held");
                (None, None)
            }
        };
        Ready {
            table,
            queue,
            holder,
        }
    }

    /// Locks `conns` (local, peer) under the table: their inbound packets go to the
    /// holder when the kernel can queue them, are dropped otherwise.
    pub fn lock(mut self, conns: &[(SocketAddr, SocketAddr)]) -> kext_shim::Result<WireLock> {
        let t0 = Instant::now();
        let me = std::process::id();
        let inbound = self.queue.map_or(Inbound::Drop, Inbound::Queue);
        let locked = match (self.queue, nft::lock(&self.table, conns, inbound, Some(me))) {
            // A kernel with nfqueue but without a way to queue from nftables: drop.
            (Some(_), Err(e)) => {
                tracing::warn!("queueing from nftables: {e}; the peers' packets are dropped");
                self.stop_holder();
                nft::lock(&self.table, conns, Inbound::Drop, Some(me))
            }
            (_, r) => r,
        };
        locked?;
        tracing::debug!(us = t0.elapsed().as_micros() as u64, "table made");
        Ok(WireLock {
            table: self.table.clone(),
            holder: self.holder.take(),
            kept: false,
        })
    }

    /// Not needed after all: its holder is told to go now (it holds nothing), and
    /// reaped when this is dropped, by then without a wait.
    pub fn abandon(&mut self) {
        if let Some(c) = self.holder.as_mut() {
            let _ = c.kill();
        }
    }

    fn stop_holder(&mut self) {
        // It holds nothing yet: no table sends it packets.
        if let Some(mut c) = self.holder.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        self.stop_holder();
    }
}

impl WireLock {
    /// What the image keeps of the lock, for its restore.
    pub fn image(&self) -> NetLockImage {
        NetLockImage {
            table: self.table.clone(),
            holder_pid: self.holder.as_ref().map(|c| c.id() as i32),
            netns: own_netns(),
        }
    }

    /// The dump is over and the workload is gone: the lock now belongs to the image,
    /// and outlives us until the restore removes it.
    pub fn keep(mut self) -> kext_shim::Result<()> {
        if let Some(mut c) = self.holder.take() {
            if let Some(mut stdin) = c.stdin.take() {
                // A holder that died already left its packets to the kernel: dropped.
                let _ = stdin.write_all(b"keep\n");
            }
        }
        self.kept = true;
        nft::disown(&self.table)
    }
}

impl Drop for WireLock {
    /// The dump failed or leaves the workload running: the connections go on, with
    /// what their peers sent meanwhile. The sockets must be out of repair mode by now.
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(mut c) = self.holder.take() {
            drop(c.stdin.take());
            if !wait_child(&mut c, SETTLE_WAIT) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Err(e) = nft::unlock(&self.table) {
            tracing::error!("removing nftables table {}: {e}", self.table);
        }
    }
}

fn wait_child(c: &mut Child, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// Starts `mcr hold-packets` with the queue's socket, inherited across exec under its
/// number here.
fn spawn_holder(q: &PacketQueue, table: &str) -> std::io::Result<Child> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let fd = q.fd();
    let exe = crate::mcr_exe()?;
    let flags = |f| fcntl(fd, FcntlArg::F_SETFD(f)).map_err(std::io::Error::from);
    // Inherited by this one child: nothing else is spawned meanwhile.
    flags(FdFlag::empty())?;
    let child = Command::new(exe)
        .args(["hold-packets", "--fd", &fd.to_string()])
        .args(["--queue", &q.num().to_string(), "--table", table])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn();
    flags(FdFlag::FD_CLOEXEC)?;
    child
}

/// The restore's end of the lock. Once the connections exist again in the lock's
/// network namespace, [`Release::open`] lets packets through and has the holder
/// deliver what their peers sent meanwhile, just before the processes run; dropped
/// after [`Release::done`], it waits for the holder to be done and makes sure the table
/// is gone. A restore that made the connections in another namespace (where the
/// packets held here have no socket to go to) has what was held dropped instead. One
/// that failed before the connections could talk leaves the lock as it was, for the
/// next restore.
pub struct Release {
    lock: Option<NetLockImage>,
    /// The connections are made in the lock's network namespace.
    here: bool,
    /// The holder, once told.
    told: Option<std::os::fd::OwnedFd>,
    /// The restore succeeded.
    done: bool,
}

impl Release {
    /// `target_netns`: where the restore makes the connections (inode), if not ours.
    pub fn new(lock: Option<NetLockImage>, target_netns: Option<u64>) -> Release {
        let here = lock
            .as_ref()
            .is_some_and(|l| target_netns.unwrap_or_else(own_netns) == l.netns);
        Release {
            lock,
            here,
            told: None,
            done: false,
        }
    }

    /// The restore succeeded: the lock is lifted as it goes.
    pub fn done(&mut self) {
        self.done = true;
    }

    /// The connections exist: packets pass both ways from now on, and the held ones
    /// are on their way. Does not wait for the holder.
    pub fn open(&mut self) {
        let Some(l) = &self.lock else { return };
        if !self.here {
            return;
        }
        if let Err(e) = nft::open(&l.table) {
            tracing::error!("opening nftables table {}: {e}", l.table);
        }
        if let Some(pid) = l.holder_pid {
            match tell_holder(pid, &l.table, Signal::SIGUSR1) {
                Ok(fd) => self.told = Some(fd),
                Err(e) => tracing::warn!("packet holder {pid} of {}: {e}", l.table),
            }
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let Some(l) = self.lock.take() else { return };
        if !self.done && self.told.is_none() {
            // Failed before the connections could talk: they went silently, and stay
            // whole for another restore, their peers' packets held meanwhile.
            eprintln!(
                "mcr: the image's TCP connections stay stopped on the wire for another \
                 restore (nftables table inet {}); `nft delete table inet {}` lets them go",
                l.table, l.table
            );
            return;
        }
        if self.told.is_none() {
            if let Some(pid) = l.holder_pid {
                match tell_holder(pid, &l.table, Signal::SIGUSR2) {
                    Ok(fd) => self.told = Some(fd),
                    Err(e) => tracing::warn!("packet holder {pid} of {}: {e}", l.table),
                }
            }
        }
        // The holder removes the table once it is done.
        if let Some(pidfd) = self.told.take() {
            let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            let ms = SETTLE_WAIT.as_millis() as u16;
            if matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(1)) {
                return;
            }
            tracing::warn!("packet holder of {} did not end in time", l.table);
        }
        if let Err(e) = nft::unlock(&l.table) {
            tracing::error!("removing nftables table {}: {e}", l.table);
        }
    }
}

/// Signals the holder of `table` (if `pid` still is that); a pidfd on it, which reads
/// ready once it has ended, child of ours or not.
fn tell_holder(pid: i32, table: &str, sig: Signal) -> Result<std::os::fd::OwnedFd, String> {
    let p = kext_shim::Pid::from_raw(pid);
    let pidfd = kext_shim::pidfd::pidfd_open(p).map_err(|e| e.to_string())?;
    // Checked after the pidfd is taken: the pid cannot change hands in between.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| e.to_string())?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if !args.contains(&&b"hold-packets"[..]) || !args.contains(&table.as_bytes()) {
        return Err("gone (its pid is another process now)".into());
    }
    nix::sys::signal::kill(p, sig).map_err(|e| e.to_string())?;
    Ok(pidfd)
}

/// `mcr hold-packets`: holds queue `num` (inherited as `fd`) for the dump's lock on
/// `table`, until told what to do with its packets. Not for people.
pub fn hold_main(fd: i32, num: u16, table: &str, max_hold: Duration) -> ExitCode {
    // Out of the terminal's job control: a ^C meant for mcr checkpoint is not for us.
    let _ = nix::unistd::setsid();
    let mut q = match PacketQueue::from_inherited(fd, num) {
        Ok(q) => q,
        Err(_) => return ExitCode::from(1),
    };
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    if mask.thread_block().is_err() {
        return ExitCode::from(1);
    }
    let Ok(sigs) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC) else {
        return ExitCode::from(1);
    };
    let deadline = Instant::now() + max_hold;
    let mut kept = false;
    let mut opened = false;
    let mut stdin = std::io::stdin();
    let verdict = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // No restore came: the kernel drops what we held as we go, and the table
            // stays, still stopping the connections, for the restore to remove.
            return ExitCode::SUCCESS;
        }
        let ms = left.as_millis().min(60_000) as u16;
        let stdin_fd = std::io::stdin();
        let mut fds = vec![
            PollFd::new(q.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigs.as_fd(), PollFlags::POLLIN),
        ];
        if !kept {
            fds.push(PollFd::new(stdin_fd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break Verdict::Drop,
        }
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        };
        let (queued, signalled, told) = (ready(0), ready(1), ready(2));
        drop(fds);
        if queued && q.drain().is_err() {
            break Verdict::Drop;
        }
        if signalled {
            match sigs.read_signal() {
                Ok(Some(s)) if s.ssi_signo == Signal::SIGUSR1 as u32 => {
                    // The restore opened the table already: deliver at once.
                    opened = true;
                    break Verdict::Accept;
                }
                Ok(Some(s)) if s.ssi_signo == Signal::SIGHUP as u32 => {}
                Ok(Some(_)) => break Verdict::Drop,
                _ => {}
            }
        }
        if told {
            let mut b = [0u8; 16];
            match stdin.read(&mut b) {
                Ok(n) if n > 0 && b[..n].starts_with(b"keep") => kept = true,
                // The dump ended without handing over (failed, ran on, or died): the
                // workload has its connections; they get their packets.
                _ => break Verdict::Accept,
            }
        }
    };
    settle(&mut q, table, verdict, opened);
    ExitCode::SUCCESS
}

/// Delivers (the table opened first, so nothing new is queued behind our back: by the
/// restore that signalled us, `opened`, or here) or drops what is held, then removes
/// the table.
fn settle(q: &mut PacketQueue, table: &str, verdict: Verdict, opened: bool) {
    if verdict == Verdict::Accept && (opened || nft::open(table).is_ok()) {
        let _ = q.settle(Verdict::Accept);
    }
    // Removing the table drops whatever is still queued.
    let _ = nft::unlock(table);
}
