//! The process as a whole: identity, credentials, limits, signals, threads.

use super::freeze::{Frozen, FrozenThread};
use super::parasite::ThreadAnswers;
use super::{fds, mm, parasite, DumpError, Result, StepContext};
use crate::model::{
    Creds, FileRef, Namespaces, PosixTimer, ProcessImage, Rseq, Siginfo, ThreadImage,
};
use kext_shim::procfs::{self, FileIdentity, Stat, Status};
use kext_shim::{ptrace, Errno, Pid};

/// Refuses what cannot be dumped before anything is touched.
pub fn precheck(pid: Pid) -> Result<()> {
    let raw = pid.as_raw();
    if raw <= 0 {
        return Err(DumpError::NoProcess(raw));
    }
    let status = Status::read(pid).map_err(|e| match e.errno() {
        Some(Errno::ENOENT) | Some(Errno::ESRCH) => DumpError::NoProcess(raw),
        _ => DumpError::Kernel {
            pid: raw,
            step: "reading its status".into(),
            source: e,
        },
    })?;
    // A pid that names a thread rather than a process shows a different Tgid.
    if status.number("Tgid").ok() != Some(raw as u64) {
        return Err(DumpError::NoProcess(raw));
    }
    let me = std::process::id() as i32;
    let mut p = me;
    while p > 1 {
        if p == raw {
            return Err(DumpError::Refused {
                pid: raw,
                what: "mcr itself or one of its ancestors".into(),
            });
        }
        p = Stat::read(Pid::from_raw(p))
            .map(|s| s.field(4) as i32)
            .unwrap_or(0);
    }
    match status.state().unwrap_or('?') {
        'Z' => {
            return Err(DumpError::Refused {
                pid: raw,
                what: "a zombie".into(),
            })
        }
        't' => {
            return Err(DumpError::Unsupported {
                pid: raw,
                what: "the process is already being traced by another program".into(),
            })
        }
        _ => {}
    }
    if status.get("TracerPid").is_some_and(|t| t != "0") {
        return Err(DumpError::Unsupported {
            pid: raw,
            what: format!(
                "the process is being traced by pid {}",
                status.get("TracerPid").unwrap_or("?")
            ),
        });
    }
    Ok(())
}

/// Describes the frozen process. Injects a few syscalls; the caller puts registers back.
pub fn collect(
    frozen: &mut Frozen,
    shell_job: bool,
    ahead: Option<&super::vmflags::VmFlagsAhead>,
) -> Result<ProcessImage> {
    let pid = frozen.pid;
    let raw = pid.as_raw();
    let mut posix_timers = read_posix_timers(pid)?;
    let status = Status::read(pid).step(pid, || "reading status".into())?;
    let stat = Stat::read(pid).step(pid, || "reading stat".into())?;

    let shared_pending = ptrace::peek_siginfo(pid, true)
        .step(pid, || "reading process-wide pending signals".into())?;
    let maps = super::vmflags::maps_of(pid, ahead)
        .step(pid, || "reading its VMAs and their flags".into())?;
    let handled = status.hex("SigCgt").unwrap_or(!0) | status.hex("SigIgn").unwrap_or(!0);
    let ids: Vec<i32> = posix_timers.iter().map(|t| t.id).collect();
    let fd_numbers = procfs::list_fds(pid).step(pid, || "listing fds".into())?;
    let answers = parasite::ask(frozen, &maps, handled, &ids, &fd_numbers)?;
    for (t, &(interval_ns, value_ns)) in posix_timers.iter_mut().zip(&answers.posix_timers) {
        t.interval_ns = interval_ns;
        t.value_ns = value_ns;
    }
    let mut threads = Vec::with_capacity(frozen.threads.len());
    for (t, a) in frozen.threads.iter().zip(&answers.threads) {
        threads.push(thread(pid, t, a)?);
    }
    let mm = mm::collect(pid, &maps, &stat, answers.brk)?;
    let fds = fds::collect(pid, shell_job, &answers.fds)?;

    let numbers = |k: &'static str| status.numbers(k).step(pid, || format!("parsing {k}"));
    let ids = |v: Vec<u64>| -> [u32; 4] {
        let mut a = [0u32; 4];
        for (d, s) in a.iter_mut().zip(v) {
            *d = s as u32;
        }
        a
    };
    let cwd_link = format!("/proc/{pid}/cwd");
    let cwd = FileRef {
        path: procfs::read_link(&cwd_link).step(pid, || "reading cwd".into())?,
        identity: FileIdentity::of_path(&cwd_link)
            .step(pid, || "stat of cwd".into())?
            .into(),
    };
    let root =
        procfs::read_link(&format!("/proc/{pid}/root")).step(pid, || "reading root".into())?;
    Ok(ProcessImage {
        pid: raw,
        ppid: stat.field(4) as i32,
        pgid: stat.field(5) as i32,
        sid: stat.field(6) as i32,
        comm: stat.comm.clone(),
        creds: Creds {
            uids: ids(numbers("Uid")?),
            gids: ids(numbers("Gid")?),
            groups: status
                .numbers("Groups")
                .unwrap_or_default()
                .into_iter()
                .map(|g| g as u32)
                .collect(),
        },
        threads,
        mm,
        fds,
        cwd,
        root,
        umask: status.octal("Umask").step(pid, || "parsing Umask".into())?,
        dumpable: answers.dumpable,
        child_subreaper: answers.child_subreaper,
        pdeathsig: answers.pdeathsig,
        itimers: answers.itimers,
        posix_timers,
        namespaces: Namespaces::default(),
        personality: procfs::read_personality(pid).step(pid, || "reading personality".into())?,
        rlimits: procfs::read_limits(pid).step(pid, || "reading limits".into())?,
        sigactions: answers.sigactions,
        shared_pending: shared_pending
            .into_iter()
            .map(|s| Siginfo(s.to_vec()))
            .collect(),
    })
}

/// One thread's CPU and signal state, as ptrace and the parasite saw it.
fn thread(pid: Pid, t: &FrozenThread, a: &ThreadAnswers) -> Result<ThreadImage> {
    let tid = t.tid;
    let step = |what: &str| format!("reading the {what} of thread {tid}");
    let rseq = ptrace::rseq_config(tid).step(pid, || step("rseq registration"))?;
    let comm = procfs::read_text(&format!("/proc/{pid}/task/{tid}/comm"), 64)
        .map(|c| c.trim_end_matches('\n').to_string())
        .unwrap_or_default();
    Ok(ThreadImage {
        tid: tid.as_raw(),
        comm,
        regs: ptrace::regs_to_words(&t.regs).to_vec(),
        xstate: ptrace::get_xstate(tid).step(pid, || step("xsave area"))?,
        blocked: ptrace::get_sigmask(tid).step(pid, || step("signal mask"))?,
        pending: ptrace::peek_siginfo(tid, false)
            .step(pid, || step("pending signals"))?
            .into_iter()
            .map(|s| Siginfo(s.to_vec()))
            .collect(),
        altstack: a.altstack,
        rseq: (rseq.area != 0).then_some(Rseq {
            area: rseq.area,
            size: rseq.size,
            signature: rseq.signature,
        }),
        clear_child_tid: a.clear_child_tid,
        robust_list: ptrace::robust_list(tid).step(pid, || step("robust futex list"))?,
    })
}

/// /proc/PID/timers: `ID:`, `signal: SIGNO/VALUE`, `notify: KIND/pid.N`, `ClockID:`.
fn read_posix_timers(pid: Pid) -> Result<Vec<PosixTimer>> {
    let path = format!("/proc/{pid}/timers");
    let text = procfs::read_text(&path, 4096).unwrap_or_default();
    let mut out: Vec<PosixTimer> = Vec::new();
    let bad = |line: &str| DumpError::Kernel {
        pid: pid.as_raw(),
        step: "reading its POSIX timers".into(),
        source: kext_shim::Error::Parse {
            path: path.clone(),
            what: "timers line",
            line: line.into(),
        },
    };
    for line in text.lines() {
        let (k, v) = line.split_once(':').ok_or_else(|| bad(line))?;
        let v = v.trim();
        if k == "ID" {
            out.push(PosixTimer {
                id: v.parse().map_err(|_| bad(line))?,
                clock: 0,
                signo: 0,
                value: 0,
                notify: 0,
                tid: 0,
                interval_ns: 0,
                value_ns: 0,
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad(line))?;
        match k {
            "signal" => {
                let (s, val) = v.split_once('/').ok_or_else(|| bad(line))?;
                t.signo = s.parse().map_err(|_| bad(line))?;
                t.value = u64::from_str_radix(val, 16).map_err(|_| bad(line))?;
            }
            "notify" => {
                let (kind, who) = v.split_once('/').ok_or_else(|| bad(line))?;
                t.notify = match kind {
                    "signal" => 0,
                    "none" => 1,
                    "thread" => 4,
                    _ => return Err(bad(line)),
                };
                let n = who
                    .rsplit('.')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if t.notify == 4 {
                    t.tid = n;
                }
            }
            "ClockID" => t.clock = v.parse().map_err(|_| bad(line))?,
            _ => {}
        }
    }
    Ok(out)
}

/// Which namespaces the tree has of its own, all made again at restore but the network
/// one, which is refused by name, as is a tree spread over several of a kind.
pub fn namespaces(procs: &[ProcessImage]) -> Result<Namespaces> {
    let me = Pid::this();
    let root = Pid::from_raw(procs[0].pid);
    let ns = |pid: Pid, kind: &str| {
        kext_shim::clone::namespace(pid, kind).step(pid, || format!("reading its {kind} namespace"))
    };
    let mut out = Namespaces::default();
    for kind in ["uts", "ipc", "pid", "mnt", "net"] {
        let theirs = ns(root, kind)?;
        for p in &procs[1..] {
            if ns(Pid::from_raw(p.pid), kind)? != theirs {
                return Err(DumpError::Unsupported {
                    pid: p.pid,
                    what: format!("it is in another {kind} namespace than the root of the tree; nested namespaces are not supported yet"),
                });
            }
        }
        if theirs == ns(me, kind)? {
            continue;
        }
        match kind {
            "uts" => out.uts = Some(kext_shim::clone::uts_names(root).step(root, || "reading its host name".into())?),
            // Its objects are read with the pages (see `ipc::dump`).
            "ipc" => out.ipc = Some(Default::default()),
            "pid" => out.pid = true,
            "mnt" => out.mnt = Some(super::mntns::describe(root)?),
            _ => {
                return Err(DumpError::Unsupported {
                    pid: root.as_raw(),
                    what: format!("it lives in a {kind} namespace of its own ({theirs}), which is not supported yet"),
                })
            }
        }
    }
    Ok(out)
}
