//! Post-copy: the destination runs before the last pages arrive.
//!
//! The source's last image leaves out the pages of private anonymous memory written
//! since the last round (all of them, without pre-copy) and lists them ([`wire::LAZY`]).
//! The destination leaves them missing, under a userfaultfd per process (see
//! `restore::lazy`), and its [`Pager`] places each one: on first touch, asking the
//! source for it ([`wire::PAGE_WANTED`]), and as the source pushes them all, from the
//! moment the workload runs there. The source's [`Server`] reads them from the
//! original, which stays frozen (and never runs again) until the destination says every
//! page is in place ([`wire::ALL_IN`]); only then does it die.
//!
//! The one risk: should the source die, or the link break, before every page is in
//! place, the workload cannot go on; the destination kills it and says so by name.

use super::wire::{self, Writer};
use crate::dump::LazyPages;
use crate::restore::lazy::Made;
use kext_shim::lazy::{Event, LazyFd, Placed};
use kext_shim::PAGE_SIZE;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pages sent for one request: the one asked for and those after it in its run, which
/// the next touches are likely to want.
const AROUND: u64 = 16;
/// Pages of one pushed frame.
const PUSH: u64 = 256;

/// What the source's server is told.
pub enum ToServer {
    /// The destination waits for the page at `(pid, addr)`.
    Wanted(i32, u64),
    /// The workload runs there: push everything left.
    Push,
}

/// What the source's server did.
#[derive(Debug, Default, Clone)]
pub struct Served {
    pub pages: u64,
    pub wanted: u64,
    /// From the push's start to the last page sent.
    pub push: Duration,
}

/// The source's side: hands out the pages of `lazy` from the frozen original.
pub struct Server {
    lazy: Vec<LazyPages>,
    sent: BTreeSet<(i32, u64)>,
    served: Served,
}

impl Server {
    pub fn new(lazy: Vec<LazyPages>) -> Self {
        Self {
            lazy,
            sent: BTreeSet::new(),
            served: Served::default(),
        }
    }

    pub fn pages(&self) -> u64 {
        self.lazy.iter().flat_map(|l| &l.runs).map(|r| r.1).sum()
    }

    /// Answers requests until told to push, then pushes what is left, answering
    /// requests first, and says PAGES_DONE. Ends early, with an error, if the link
    /// fails; ends quietly if told nothing more (the migration was abandoned).
    pub fn run(mut self, w: &Mutex<Writer>, rx: Receiver<ToServer>) -> Result<Served, String> {
        if let Err(e) = kext_shim::lazy::serve_first() {
            tracing::info!("the page server runs at ordinary priority: {e}");
        }
        let mut pushing = None;
        let mut next = (0usize, 0usize, 0u64);
        loop {
            let msg = if pushing.is_some() {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(Duration::from_secs(3600)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Ok(self.served),
                }
            };
            match msg {
                Some(ToServer::Wanted(pid, addr)) => {
                    self.served.wanted += 1;
                    self.answer(w, pid, addr)?;
                    continue;
                }
                Some(ToServer::Push) => {
                    crate::fault::stall(crate::fault::MIGRATE_STALL_IN_POST_COPY);
                    pushing.get_or_insert_with(Instant::now);
                    continue;
                }
                None => {}
            }
            // One frame of the push, then the requests again.
            let Some((pid, host, addr, n)) = self.next_unsent(&mut next) else {
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                w.send(wire::PAGES_DONE, &[])
                    .and_then(|_| w.flush())
                    .map_err(|e| format!("saying every page was sent: {e}"))?;
                self.served.push = pushing.map(|t: Instant| t.elapsed()).unwrap_or_default();
                return Ok(self.served);
            };
            // Scattered pages (a dirty set is) go many runs to a frame.
            let mut runs = vec![(addr, n)];
            let mut total = n;
            while total < PUSH {
                match self.next_unsent(&mut next) {
                    Some((p, _, a, k)) if p == pid => {
                        runs.push((a, k));
                        total += k;
                    }
                    Some(other) => {
                        // Another process's: the next frame's first, from there.
                        self.send(w, pid, host, &runs)?;
                        runs = vec![(other.2, other.3)];
                        self.send(w, other.0, other.1, &runs)?;
                        runs.clear();
                        break;
                    }
                    None => break,
                }
            }
            if !runs.is_empty() {
                self.send(w, pid, host, &runs)?;
            }
        }
    }

    /// The next run of unsent pages of the push, at most PUSH long.
    fn next_unsent(&self, at: &mut (usize, usize, u64)) -> Option<(i32, i32, u64, u64)> {
        loop {
            let (p, r, off) = *at;
            let l = self.lazy.get(p)?;
            let Some(&(start, n)) = l.runs.get(r) else {
                *at = (p + 1, 0, 0);
                continue;
            };
            if off >= n {
                *at = (p, r + 1, 0);
                continue;
            }
            let first = start + off * PAGE_SIZE;
            if self.sent.contains(&(l.pid, first)) {
                at.2 += 1;
                continue;
            }
            let mut len = 1;
            while off + len < n
                && len < PUSH
                && !self.sent.contains(&(l.pid, first + len * PAGE_SIZE))
            {
                len += 1;
            }
            at.2 += len;
            return Some((l.pid, l.host, first, len));
        }
    }

    /// Sends the page at `addr` of `pid` and the unsent ones after it in its run.
    fn answer(&mut self, w: &Mutex<Writer>, pid: i32, addr: u64) -> Result<(), String> {
        let Some(l) = self.lazy.iter().find(|l| l.pid == pid) else {
            return Ok(());
        };
        let Some(&(start, n)) = l
            .runs
            .iter()
            .find(|&&(s, n)| s <= addr && addr < s + n * PAGE_SIZE)
        else {
            return Ok(());
        };
        if self.sent.contains(&(pid, addr)) {
            return Ok(());
        }
        let end = start + n * PAGE_SIZE;
        let mut len = 1;
        while addr + len * PAGE_SIZE < end
            && len < AROUND
            && !self.sent.contains(&(pid, addr + len * PAGE_SIZE))
        {
            len += 1;
        }
        let host = l.host;
        self.send(w, pid, host, &[(addr, len)])
    }

    /// Sends the runs `(addr, pages)` of `pid` (`host` here) in one frame.
    fn send(
        &mut self,
        w: &Mutex<Writer>,
        pid: i32,
        host: i32,
        runs: &[(u64, u64)],
    ) -> Result<(), String> {
        let mut frame = wire::pages_header(pid, runs);
        let head = frame.len();
        let n: u64 = runs.iter().map(|r| r.1).sum();
        frame.resize(head + (n * PAGE_SIZE) as usize, 0);
        let ranges: Vec<(u64, usize)> = runs
            .iter()
            .map(|&(a, k)| (a, (k * PAGE_SIZE) as usize))
            .collect();
        kext_shim::mem::read_remote_ranges(
            kext_shim::Pid::from_raw(host),
            &ranges,
            &mut frame[head..],
        )
        .map_err(|e| format!("reading {n} pages of pid {host}: {e}"))?;
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        w.send(wire::PAGES, &frame)
            .and_then(|_| w.flush())
            .map_err(|e| format!("sending {n} pages of pid {pid}: {e}"))?;
        for &(a, k) in runs {
            for i in 0..k {
                self.sent.insert((pid, a + i * PAGE_SIZE));
            }
        }
        self.served.pages += n;
        Ok(())
    }
}

/// What the destination's pager is given.
pub enum ToPager {
    /// Pages from the source: `(pid, addr, bytes)`.
    Pages(i32, u64, Vec<u8>),
    /// Every page has been sent.
    Done,
    /// The link to the source is gone, with why.
    Lost(String),
}

/// One userfaultfd being served and the pages still missing behind it, keyed both
/// ways: by where they are now (faults) and by where the source has them (arrivals).
struct Served1 {
    fd: LazyFd,
    by_here: BTreeMap<u64, (i32, u64)>,
    by_source: BTreeMap<(i32, u64), u64>,
}

impl Served1 {
    fn new(fd: LazyFd, pid: i32, runs: &[(u64, u64)]) -> Self {
        let mut s = Served1 {
            fd,
            by_here: BTreeMap::new(),
            by_source: BTreeMap::new(),
        };
        for &(a, n) in runs {
            for i in 0..n {
                let at = a + i * PAGE_SIZE;
                s.by_here.insert(at, (pid, at));
                s.by_source.insert((pid, at), at);
            }
        }
        s
    }

    fn forget(&mut self, start: u64, end: u64) {
        let gone: Vec<u64> = self.by_here.range(start..end).map(|(&a, _)| a).collect();
        for a in gone {
            if let Some(src) = self.by_here.remove(&a) {
                self.by_source.remove(&src);
            }
        }
    }

    /// Places what this one still misses of the source's pages `bytes` at `(pid,
    /// addr)`, each stretch that lies together here in one copy. False: try again
    /// once the events are read (what was placed is not placed twice).
    fn place(&mut self, pid: i32, addr: u64, bytes: &[u8]) -> Result<bool, String> {
        let n = bytes.len() as u64 / PAGE_SIZE;
        let page = |k: u64| &bytes[(k * PAGE_SIZE) as usize..((k + 1) * PAGE_SIZE) as usize];
        let mut k = 0;
        while k < n {
            let Some(&here) = self.by_source.get(&(pid, addr + k * PAGE_SIZE)) else {
                k += 1;
                continue;
            };
            let mut len = 1;
            while k + len < n
                && self.by_source.get(&(pid, addr + (k + len) * PAGE_SIZE))
                    == Some(&(here + len * PAGE_SIZE))
            {
                len += 1;
            }
            let span = &bytes[(k * PAGE_SIZE) as usize..((k + len) * PAGE_SIZE) as usize];
            match self.fd.copy(here, span).map_err(|e| e.to_string())? {
                Placed::Retry => return Ok(false),
                // One of them is there already (a zero page placed meanwhile, say):
                // page by page.
                Placed::Already if len > 1 => {
                    for j in 0..len {
                        match self
                            .fd
                            .copy(here + j * PAGE_SIZE, page(k + j))
                            .map_err(|e| e.to_string())?
                        {
                            Placed::Retry => return Ok(false),
                            _ => self.placed(pid, addr + (k + j) * PAGE_SIZE),
                        }
                    }
                }
                _ => {
                    for j in 0..len {
                        self.placed(pid, addr + (k + j) * PAGE_SIZE);
                    }
                }
            }
            k += len;
        }
        Ok(true)
    }

    fn placed(&mut self, pid: i32, src: u64) {
        if let Some(here) = self.by_source.remove(&(pid, src)) {
            self.by_here.remove(&here);
        }
    }
}

/// What the pager did.
#[derive(Debug, Default, Clone)]
pub struct Paged {
    /// Touches of missing pages.
    pub faults: u64,
    /// Of those, on pages never written (answered with zeros).
    pub zero_pages: u64,
    /// Pages placed (in every process that missed them).
    pub placed: u64,
    /// From the start to every page in place.
    pub took: Duration,
}

/// The destination's side: serves every process's userfaultfd until every page left
/// missing is in place.
pub struct Pager {
    pub runs: BTreeMap<i32, Vec<(u64, u64)>>,
    pub made: Receiver<Made>,
    pub from_source: Receiver<ToPager>,
    /// Written to whenever something is sent on `from_source` or `made`, to wake the poll.
    pub wake: Arc<nix::sys::eventfd::EventFd>,
    pub w: Arc<Mutex<Writer>>,
    /// Holds a copy of every userfaultfd, should we die (see [`Watchdog`]).
    pub watchdog: Watchdog,
}

impl Pager {
    /// Serves until every page is in place (then closes the userfaultfds, which ends
    /// their hold on the workload, and says ALL_IN) or the source is lost (an error
    /// naming how much is missing: the workload cannot go on).
    pub fn run(self) -> Result<Paged, String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if let Err(e) = kext_shim::lazy::serve_first() {
            tracing::info!("the pager runs at ordinary priority: {e}");
        }
        let t0 = Instant::now();
        let mut fds: Vec<Served1> = Vec::new();
        let mut queue: std::collections::VecDeque<(i32, u64, Vec<u8>)> = Default::default();
        let mut zero_later: Vec<(usize, u64)> = Vec::new();
        let mut wanted: BTreeSet<(i32, u64)> = BTreeSet::new();
        let mut done = false;
        let mut paged = Paged::default();
        let send = |kind: u16, payload: &[u8]| -> Result<(), String> {
            let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
            w.send(kind, payload)
                .and_then(|_| w.flush())
                .map_err(|e| format!("post-copy lost its source (writing to it: {e})"))
        };
        let missing = |fds: &[Served1]| fds.iter().map(|s| s.by_here.len()).sum::<usize>();
        loop {
            while let Ok(m) = self.made.try_recv() {
                self.watchdog.keep(m.host, &m.fd)?;
                let runs = self.runs.get(&m.pid).map_or(&[][..], |r| &r[..]);
                fds.push(Served1::new(m.fd, m.pid, runs));
            }
            loop {
                match self.from_source.try_recv() {
                    Ok(ToPager::Pages(pid, addr, bytes)) => queue.push_back((pid, addr, bytes)),
                    Ok(ToPager::Done) => done = true,
                    Ok(ToPager::Lost(why)) => {
                        return Err(format!(
                            "post-copy lost its source with {} pages not yet in place ({why})",
                            missing(&fds)
                        ))
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) if done => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        return Err(format!(
                            "post-copy lost its source with {} pages not yet in place",
                            missing(&fds)
                        ))
                    }
                }
            }
            // Events first: a placing that meets a changing mm waits for them.
            let mut i = 0;
            while i < fds.len() {
                for e in fds[i].fd.events().map_err(|e| e.to_string())? {
                    match e {
                        Event::Fault { addr, .. } => {
                            paged.faults += 1;
                            match fds[i].by_here.get(&addr).copied() {
                                Some(src) if wanted.insert(src) => {
                                    send(wire::PAGE_WANTED, &wire::page_header(src.0, src.1))?
                                }
                                Some(_) => {}
                                // Never written, or placed already (the toucher raced with
                                // it): a zero page, or a wake-up.
                                None => zero_later.push((i, addr)),
                            }
                        }
                        Event::Fork(child) => {
                            self.watchdog.keep(0, &child)?;
                            // The child misses what the parent misses now.
                            let s = Served1 {
                                fd: child,
                                by_here: fds[i].by_here.clone(),
                                by_source: fds[i].by_source.clone(),
                            };
                            fds.push(s);
                        }
                        Event::Remap { from, to, len } => {
                            let s = &mut fds[i];
                            let moved: Vec<(u64, (i32, u64))> = s
                                .by_here
                                .range(from..from + len)
                                .map(|(&a, &src)| (a, src))
                                .collect();
                            for (a, _) in &moved {
                                s.by_here.remove(a);
                            }
                            for (a, src) in moved {
                                let there = a - from + to;
                                s.by_here.insert(there, src);
                                s.by_source.insert(src, there);
                            }
                        }
                        // Dropped by the workload: it reads zeros there now, and the page
                        // must not come back.
                        Event::Remove { start, end } | Event::Unmap { start, end } => {
                            fds[i].forget(start, end)
                        }
                    }
                }
                i += 1;
            }
            let mut retry = false;
            zero_later.retain(|&(i, addr)| {
                let fd = &fds[i].fd;
                match fd.zero(addr, PAGE_SIZE) {
                    Ok(Placed::Done) => {
                        paged.zero_pages += 1;
                        false
                    }
                    Ok(Placed::Already) => {
                        let _ = fd.wake(addr, PAGE_SIZE);
                        false
                    }
                    Ok(Placed::Retry) => {
                        retry = true;
                        true
                    }
                    Ok(Placed::Gone) | Err(_) => false,
                }
            });
            // One frame at a time, between two reads of the events: a toucher waiting
            // is answered before a long push is placed.
            if let Some((pid, addr, bytes)) = queue.pop_front() {
                let mut all = true;
                for s in fds.iter_mut() {
                    all &= s.place(pid, addr, &bytes)?;
                }
                if all {
                    let n = bytes.len() as u64 / PAGE_SIZE;
                    for k in 0..n {
                        wanted.remove(&(pid, addr + k * PAGE_SIZE));
                    }
                    paged.placed += n;
                } else {
                    retry = true;
                    queue.push_front((pid, addr, bytes));
                }
            }
            if done && queue.is_empty() && zero_later.is_empty() && missing(&fds) == 0 {
                // Closing them, and the watchdog's copies, ends the registrations: from
                // here the workload owes us nothing.
                drop(fds);
                self.watchdog.done();
                send(wire::ALL_IN, &[])?;
                paged.took = t0.elapsed();
                return Ok(paged);
            }
            let mut polls: Vec<PollFd> = fds
                .iter()
                .map(|s| PollFd::new(s.fd.as_fd(), PollFlags::POLLIN))
                .collect();
            polls.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
            let wait = if retry {
                1u16
            } else if !queue.is_empty() {
                0
            } else {
                100
            };
            let _ = poll(&mut polls, PollTimeout::from(wait));
            let woken = polls[fds.len()].revents().is_some_and(|r| !r.is_empty());
            drop(polls);
            if woken {
                let _ = self.wake.read();
            }
        }
    }
}

/// The destination's guard against its own death. A userfaultfd closed with pages still
/// missing turns them into zero pages, silently: should `mcr receive` die during a
/// post-copy, the workload would run on with holes in its memory. So a small process of
/// ours (`mcr hold-lazy`) keeps a copy of every userfaultfd from the moment it is made:
/// touches of missing pages then wait instead, and once it sees the receiver gone
/// without a word that every page is in place, it kills every process it was told of,
/// and their descendants, before its copies close.
pub struct Watchdog {
    sock: std::os::fd::OwnedFd,
    child: std::process::Child,
}

impl Watchdog {
    pub fn start() -> Result<Watchdog, String> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        use std::os::fd::AsRawFd;
        let (ours, theirs) = kext_shim::unix::seqpacket_pair().map_err(|e| e.to_string())?;
        let fd = theirs.as_raw_fd();
        // Inherited by this one child: nothing else is spawned meanwhile.
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| e.to_string())?;
        let child = crate::mcr_exe()
            .and_then(|exe| {
                std::process::Command::new(exe)
                    .args(["hold-lazy", "--fd", &fd.to_string()])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .current_dir("/")
                    .spawn()
            })
            .map_err(|e| format!("starting mcr hold-lazy: {e}"))?;
        drop(theirs);
        Ok(Watchdog { sock: ours, child })
    }

    /// Hands over a copy of `fd`, the userfaultfd of `host` (a pid here; 0 for a
    /// child forked meanwhile, found as a descendant).
    pub fn keep(&self, host: i32, fd: &LazyFd) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        kext_shim::unix::send_with_fds(&self.sock, &host.to_le_bytes(), &[fd.as_fd().as_raw_fd()])
            .map_err(|e| format!("handing a userfaultfd to mcr hold-lazy: {e}"))
    }

    /// Every page is in place: it lets its copies go and ends quietly.
    pub fn done(mut self) {
        let _ = kext_shim::unix::send_with_fds(&self.sock, b"done", &[]);
        let _ = self.child.wait();
    }
}

/// `mcr hold-lazy`: keeps the userfaultfds sent on `fd` until told "done"; if the
/// sender goes first, kills the processes they belong to, and their descendants.
pub fn watchdog_main(fd: i32) -> std::process::ExitCode {
    // Out of the terminal's job control: a ^C meant for mcr receive is not for us.
    let _ = nix::unistd::setsid();
    let sock = match kext_shim::unix::inherited_socket(fd) {
        Ok(s) => s,
        Err(_) => return std::process::ExitCode::from(1),
    };
    let mut kept = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    loop {
        let mut buf = [0u8; 16];
        let (n, fds) = kext_shim::unix::recv_with_fds(&sock, &mut buf).unwrap_or((0, Vec::new()));
        kept.extend(fds);
        match &buf[..n] {
            b"done" => return std::process::ExitCode::SUCCESS,
            [a, b, c, d] => pids.push(i32::from_le_bytes([*a, *b, *c, *d])),
            // The receiver is gone.
            [] => break,
            _ => {}
        }
    }
    if kept.is_empty() {
        // Gone before post-copy began: nothing of ours to guard.
        return std::process::ExitCode::SUCCESS;
    }
    for root in pids.into_iter().filter(|&p| p > 0) {
        for p in kext_shim::procfs::descendants(kext_shim::Pid::from_raw(root)) {
            let _ = kext_shim::clone::kill(kext_shim::Pid::from_raw(p), libc::SIGKILL);
        }
    }
    // Our copies close last, once nothing is left to read zeros from them.
    drop(kept);
    std::process::ExitCode::from(1)
}
