//! The process as a whole: identity, credentials, limits, signals, threads.

use super::freeze::{Frozen, FrozenThread};
use super::parasite::ThreadAnswers;
use super::{fds, mm, parasite, DumpError, Result, StepContext};
use crate::model::{Creds, FileRef, ProcessImage, Rseq, Siginfo, ThreadImage};
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
pub fn collect(frozen: &mut Frozen, shell_job: bool) -> Result<ProcessImage> {
    let pid = frozen.pid;
    let raw = pid.as_raw();
    let timers = std::fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default();
    if let Some(id) = timers.lines().find_map(|l| l.strip_prefix("ID: ")) {
        return Err(DumpError::Unsupported {
            pid: raw,
            what: format!("POSIX timer {id} (timer_create) is not supported yet"),
        });
    }
    let status = Status::read(pid).step(pid, || "reading status".into())?;
    let stat = Stat::read(pid).step(pid, || "reading stat".into())?;

    let shared_pending = ptrace::peek_siginfo(pid, true)
        .step(pid, || "reading process-wide pending signals".into())?;
    let maps = procfs::read_maps(pid).step(pid, || "reading smaps".into())?;
    let handled = status.hex("SigCgt").unwrap_or(!0) | status.hex("SigIgn").unwrap_or(!0);
    let answers = parasite::ask(frozen, &maps, handled)?;
    let mut threads = Vec::with_capacity(frozen.threads.len());
    for (t, a) in frozen.threads.iter().zip(&answers.threads) {
        threads.push(thread(pid, t, a)?);
    }
    let mm = mm::collect(pid, &maps, &stat, answers.brk)?;
    let fds = fds::collect(pid, shell_job)?;

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
        itimers: answers.itimers,
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
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
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
