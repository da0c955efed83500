//! `mcr show`: an image for a person (text) or a program (JSON).

use crate::image::Image;
use crate::model::{FdKind, SocketLink, VmaKind};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Pages stored per (pid, VMA start).
fn stored_pages(image: &Image) -> BTreeMap<(i32, u64), u64> {
    let mut m = BTreeMap::new();
    for p in &image.snapshot.processes {
        for c in image.chunks_of(p.pid) {
            if let Some(v) =
                p.mm.vmas
                    .iter()
                    .find(|v| v.start <= c.addr && c.addr < v.end)
            {
                *m.entry((p.pid, v.start)).or_insert(0) += c.n_pages as u64;
            }
        }
    }
    m
}

pub fn json(image: &Image) -> serde_json::Value {
    let pages = stored_pages(image);
    let stored: Vec<_> = pages
        .iter()
        .map(|((pid, start), n)| json!({"pid": pid, "vma_start": start, "pages": n}))
        .collect();
    json!({
        "snapshot": image.snapshot,
        "stored_pages": stored,
    })
}

/// One TCP or UDP socket of the image, for a person.
fn inet_line(i: &crate::model::InetSocketImage) -> String {
    let at = i
        .local
        .map(|a| format!(" on {a}"))
        .unwrap_or_else(|| " never bound".into());
    let mut line = match (&i.tcp, i.protocol == libc::IPPROTO_TCP) {
        (Some(c), _) => {
            let state = match (c.fin_sent, c.fin_received) {
                (false, false) => "established",
                (true, false) => "established, our side closed",
                (false, true) => "established, the peer's side closed",
                (true, true) => "closed both ways, fd still open",
            };
            format!(
                "TCP {} -> {}: {state}; {} bytes to read, {} to send ({} never sent)",
                c.local,
                c.peer,
                c.recv_queue.len(),
                c.send_queue.len(),
                c.unsent
            )
        }
        (None, true) => match i.listen {
            Some(b) if i.waiting.is_empty() => format!("TCP listener{at}, backlog {b}"),
            Some(b) => format!(
                "TCP listener{at}, backlog {b}; waiting to be accepted: {}",
                i.waiting
                    .iter()
                    .map(|c| format!("{} ({} bytes to read)", c.peer, c.recv_queue.len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("TCP socket{at}"),
        },
        (None, false) => format!(
            "UDP socket{at}{}; {} datagrams waiting",
            i.peer
                .map(|p| format!(", connected to {p}"))
                .unwrap_or_default(),
            i.datagrams.len()
        ),
    };
    if !i.options.is_empty() {
        line.push_str(&format!("; {} options set", i.options.len()));
    }
    line
}

pub fn text(image: &Image) -> String {
    let s = &image.snapshot;
    let inv = &s.inventory;
    let pages = stored_pages(image);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "image format {} by mcr {} on Linux {} {}; root pid {}; features {}{}",
        inv.format_version,
        inv.tool_version,
        inv.kernel_release,
        inv.arch,
        inv.root_pid,
        inv.features.join(","),
        if inv.shell_job { "; shell job" } else { "" }
    );
    if let Some(p) = &inv.parent {
        let _ = writeln!(
            o,
            "pages not written since are in parent image {:#x} at {} (relative to this one)",
            p.image_id, p.dir
        );
    }
    if let Some(at) = &inv.pages_in_source {
        let procs: Vec<String> = at
            .procs
            .iter()
            .map(|p| format!("{} (pid {} here)", p.pid, p.host_pid))
            .collect();
        let _ = writeln!(
            o,
            "its pages are not stored but listed: they are in the memory of processes {}, a migration's source, while they live",
            procs.join(", ")
        );
    }
    if let Some(t) = &inv.tracker {
        let _ = writeln!(
            o,
            "writes of pids {:?} tracked since, by holder pid {} (kill it to end the tracking)",
            t.pids, t.holder_pid
        );
    }
    if let Some(p0) = s.processes.first() {
        namespaces(&mut o, &p0.namespaces);
    }
    for p in &s.processes {
        let total: u64 = pages
            .iter()
            .filter(|((pid, _), _)| *pid == p.pid)
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            o,
            "\nprocess {} ({}) ppid {} pgid {} sid {} uid {} gid {}; {} pages stored ({:.1} MiB)",
            p.pid,
            p.comm,
            p.ppid,
            p.pgid,
            p.sid,
            p.creds.uids[0],
            p.creds.gids[0],
            total,
            total as f64 * 4096.0 / (1 << 20) as f64
        );
        let _ = writeln!(
            o,
            "  cwd {}  root {}  umask {:03o}  exe {}",
            p.cwd.path, p.root, p.umask, p.mm.exe.path
        );
        for t in &p.threads {
            let r = |i: usize| t.regs.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "  thread {}: rip {:#x} rsp {:#x} orig_rax {} rax {} blocked {:#x} pending {} rseq {}",
                t.tid,
                r(16),
                r(19),
                r(15) as i64,
                r(10) as i64,
                t.blocked,
                t.pending.len(),
                t.rseq.map(|x| format!("{:#x}", x.area)).unwrap_or_else(|| "none".into())
            );
        }
        let _ = writeln!(o, "  mappings:");
        for v in &p.mm.vmas {
            let prot = format!(
                "{}{}{}{}",
                if v.prot & libc::PROT_READ != 0 {
                    'r'
                } else {
                    '-'
                },
                if v.writable() { 'w' } else { '-' },
                if v.prot & libc::PROT_EXEC != 0 {
                    'x'
                } else {
                    '-'
                },
                if v.shared { 's' } else { 'p' }
            );
            let what = match v.kind {
                VmaKind::Anonymous
                    if v.start <= p.mm.fields.start_brk
                        && p.mm.fields.start_brk < v.end.max(v.start + 1) =>
                {
                    "[heap]".to_string()
                }
                VmaKind::Anonymous
                    if v.start <= p.mm.fields.start_stack && p.mm.fields.start_stack < v.end =>
                {
                    "[stack]".to_string()
                }
                VmaKind::Anonymous => "anonymous".into(),
                VmaKind::SharedAnonymous { shmem } => format!("shared anonymous (shmem {shmem})"),
                VmaKind::Memfd { ino } => format!("memfd (inode {ino})"),
                VmaKind::SysvShm { id } => format!("SysV shared memory segment {id}"),
                VmaKind::File(i) => {
                    p.mm.files
                        .get(i as usize)
                        .map(|f| f.path.clone())
                        .unwrap_or_default()
                }
                VmaKind::Vdso => "[vdso]".into(),
                VmaKind::Vvar => "[vvar]".into(),
                VmaKind::VvarVclock => "[vvar_vclock]".into(),
            };
            let n = pages.get(&(p.pid, v.start)).copied().unwrap_or(0);
            let inherited =
                p.mm.parent
                    .as_ref()
                    .is_some_and(|pp| pp.ranges.iter().any(|&(s, e)| s <= v.start && v.end <= e));
            let _ = writeln!(
                o,
                "    {:016x}-{:016x} {prot} {:>8} pages stored  {what}{}",
                v.start,
                v.end,
                n,
                if inherited {
                    " (the rest in the parent)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(o, "  fds:");
        for f in &p.fds {
            let what = match &f.kind {
                FdKind::Regular { file, pos } => format!("{} at {pos}", file.path),
                FdKind::CharDevice { file, .. } => file.path.clone(),
                FdKind::Directory { file } => format!("{} (directory)", file.path),
                FdKind::PtyMaster { index } => format!("pty {index} master"),
                FdKind::InetSocket { ino } => format!("socket:[{ino}] (TCP/UDP)"),
                FdKind::PtySlave { path, .. } => format!("{path} (pty slave)"),
                FdKind::External { key } => format!("{key} (outside the image)"),
                FdKind::Memfd { ino, pos } => format!("memfd (inode {ino}) at {pos}"),
                FdKind::Fifo { file, read_end } => {
                    format!(
                        "fifo {} {} end",
                        file.path,
                        if *read_end { "read" } else { "write" }
                    )
                }
                FdKind::UnixListener { name, backlog, .. } => {
                    format!("unix socket listening on {name} (backlog {backlog})")
                }
                FdKind::UnixSocket { ino } => {
                    format!("unix socket:[{ino}] (pair inside the image)")
                }
                FdKind::EventFd { count, semaphore } => {
                    format!(
                        "eventfd count {count}{}",
                        if *semaphore { " (semaphore)" } else { "" }
                    )
                }
                FdKind::TimerFd {
                    clockid,
                    value_ns,
                    interval_ns,
                    ticks,
                } => format!(
                    "timerfd clock {clockid}, next in {:.3} s, every {:.3} s, {ticks} unread",
                    *value_ns as f64 / 1e9,
                    *interval_ns as f64 / 1e9
                ),
                FdKind::SignalFd { mask } => format!("signalfd mask {mask:#x}"),
                FdKind::Inotify { watches } => format!(
                    "inotify watching {:?}",
                    watches.iter().map(|w| w.path.as_str()).collect::<Vec<_>>()
                ),
                FdKind::Epoll { targets } => format!(
                    "epoll watching fds {:?}",
                    targets.iter().map(|t| t.fd).collect::<Vec<_>>()
                ),
                FdKind::Pipe { ino, read_end } => {
                    format!(
                        "pipe:[{ino}] {} end",
                        if *read_end { "read" } else { "write" }
                    )
                }
            };
            let _ = writeln!(
                o,
                "    {:>4} flags {:o}{} {what}",
                f.fd,
                f.flags,
                if f.cloexec { " cloexec" } else { "" }
            );
        }
        let handled: Vec<String> = p
            .sigactions
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.is_default())
            .map(|(i, a)| match a.handler {
                0 => format!("{}:default", i + 1),
                1 => format!("{}:ignore", i + 1),
                h => format!("{}:{h:#x}", i + 1),
            })
            .collect();
        let _ = writeln!(
            o,
            "  signal actions: {}",
            if handled.is_empty() {
                "all default".into()
            } else {
                handled.join(" ")
            }
        );
    }
    for (i, obj) in s.shmem.iter().enumerate() {
        let owner = -1 - i as i32;
        let stored: u64 = image
            .chunks()
            .filter(|c| c.pid == owner)
            .map(|c| c.n_pages as u64)
            .sum();
        let what = match (&obj.memfd, &obj.sysv) {
            (Some(m), _) => format!("memfd {:?} (seals {:#x})", m.name, m.seals),
            (None, Some(p)) => format!(
                "SysV shared memory segment {} (key {:#x}, owner {}:{}, mode {:o})",
                p.id, p.key, p.uid, p.gid, p.mode
            ),
            (None, None) => "shared anonymous memory".into(),
        };
        let _ = writeln!(
            o,
            "\n{what}, inode {}: {} bytes, {stored} pages stored",
            obj.ino, obj.size
        );
    }
    for p in &s.pipes {
        let name = p
            .fifo
            .as_ref()
            .map(|f| f.path.clone())
            .unwrap_or_else(|| format!("pipe:[{}]", p.ino));
        let _ = writeln!(
            o,
            "\n{name}: capacity {}, {} bytes in flight",
            p.capacity,
            p.data.len()
        );
    }
    for u in &s.unix {
        let bytes: usize = u.queue.iter().map(Vec::len).sum();
        let link = match &u.link {
            SocketLink::Unconnected => "unconnected".to_string(),
            SocketLink::Pair { peer } => format!("paired with socket:[{peer}]"),
            SocketLink::Client {
                listener,
                accepted: Some(a),
            } => format!("connected to listener socket:[{listener}], accepted as socket:[{a}]"),
            SocketLink::Client {
                listener,
                accepted: None,
            } => format!("waiting in the queue of listener socket:[{listener}]"),
            SocketLink::Accepted { client } => format!("accepted from socket:[{client}]"),
            SocketLink::ConnectedTo { name } => format!("connected to {name}"),
            SocketLink::PeerClosed => "connected, its peer closed".to_string(),
        };
        let kind = match u.kind {
            libc::SOCK_STREAM => "stream",
            libc::SOCK_DGRAM => "dgram",
            libc::SOCK_SEQPACKET => "seqpacket",
            _ => "unknown type",
        };
        let _ = writeln!(
            o,
            "\nunix {kind} socket:[{}]{}: {link}; {} messages, {bytes} bytes queued",
            u.ino,
            u.name
                .as_deref()
                .map(|n| format!(" bound to {n}"))
                .unwrap_or_default(),
            u.queue.len()
        );
    }
    for i in &s.inet {
        let _ = writeln!(o, "\n{}", inet_line(i));
    }
    if let Some(l) = &inv.net_lock {
        let _ = writeln!(
            o,
            "\nconnections stopped on the wire by nftables table inet {} (netns {}){}",
            l.table,
            l.netns,
            l.holder_pid
                .map(|p| format!(", their peers' packets held by pid {p}"))
                .unwrap_or_else(|| ", their peers' packets dropped".into())
        );
    }
    for t in &s.ptys {
        let _ = writeln!(
            o,
            "\npty {} (through {}): {}x{}{}{}{}",
            t.index,
            t.ptmx,
            t.winsize[1],
            t.winsize[0],
            if t.locked { ", locked" } else { "" },
            if t.packet { ", packet mode" } else { "" },
            match t.session {
                Some((leader, fg)) => {
                    format!(", terminal of session {leader} (foreground group {fg})")
                }
                None => String::new(),
            }
        );
    }
    for z in &s.zombies {
        let _ = writeln!(
            o,
            "\nzombie {} (child of {}): wait status {:#x}",
            z.pid, z.ppid, z.status
        );
    }
    o
}

fn namespaces(o: &mut String, ns: &crate::model::Namespaces) {
    let mut own = Vec::new();
    if ns.pid {
        own.push("pid".to_string());
    }
    if let Some(m) = &ns.mnt {
        own.push(format!(
            "mnt ({} mounts of its own, {} removed)",
            m.mounts.len(),
            m.detached.len()
        ));
    }
    if let Some((host, _)) = &ns.uts {
        own.push(format!("uts (host name {host})"));
    }
    if let Some(ipc) = &ns.ipc {
        own.push(format!(
            "ipc ({} semaphore sets, {} message queues)",
            ipc.sem.len(),
            ipc.msg.len()
        ));
    }
    if own.is_empty() {
        return;
    }
    let _ = writeln!(o, "namespaces of its own: {}", own.join(", "));
    for m in ns.mnt.iter().flat_map(|m| &m.mounts) {
        let what = match &m.source {
            crate::model::MountSource::Fresh {
                fs_type, options, ..
            } => format!("new {fs_type} {options}"),
            crate::model::MountSource::Bind { from } => format!("bind of {from}"),
        };
        let _ = writeln!(
            o,
            "  mount {}: {} flags {:#x}",
            m.target,
            what.trim(),
            m.flags
        );
    }
    for d in ns.mnt.iter().flat_map(|m| &m.detached) {
        let _ = writeln!(o, "  unmounted {d}");
    }
    for s in ns.ipc.iter().flat_map(|i| &i.sem) {
        let _ = writeln!(
            o,
            "  semaphore set {} (key {:#x}, mode {:o}): {:?}",
            s.perm.id, s.perm.key, s.perm.mode, s.values
        );
    }
    for q in ns.ipc.iter().flat_map(|i| &i.msg) {
        let bytes: usize = q.messages.iter().map(|(_, t)| t.len()).sum();
        let _ = writeln!(
            o,
            "  message queue {} (key {:#x}, mode {:o}): {} messages, {bytes} bytes",
            q.perm.id,
            q.perm.key,
            q.perm.mode,
            q.messages.len()
        );
    }
}
