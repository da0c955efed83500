#![forbid(unsafe_code)]
//! Harness for the integration tests: start real workloads, drive `mcr` on them, and
//! make sure every process a test started dies with it, pass or fail.
//!
//! Workloads speak a line protocol on their stdio (see `workloads/README.md`): `READY`
//! once set up, then `CHECK` from us, answered by `PASS ...` or `FAIL ...`.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long any one protocol line may take before the test gives up.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The `mcr` binary next to the test binary (target/<profile>/mcr).
pub fn mcr_bin() -> PathBuf {
    built_bin("mcr")
}

/// A binary of the workspace next to the test binary (target/<profile>/NAME).
pub fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --release --workspace --bins)",
        bin.display()
    );
    bin
}

/// A compiled workload program.
pub fn workload_bin(name: &str) -> PathBuf {
    Path::new(env!("MCR_WORKLOADS")).join(name)
}

/// Restored processes are re-parented to us when `mcr restore -d` exits, so that tests
/// can reap them and read their exit status.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        // Fds the test runner inherited (from a CI shell, say) must not leak into the
        // workloads, whose every fd is dumped.
        kext_shim::procfs::cloexec_inherited_fds().expect("marking inherited fds close-on-exec");
    });
}

/// Kills every registered pid when dropped, so no workload outlives a failed test.
#[derive(Default)]
pub struct Guard {
    pids: Vec<i32>,
}

impl Guard {
    pub fn new() -> Self {
        become_subreaper();
        Self::default()
    }

    pub fn add(&mut self, pid: i32) {
        self.pids.push(pid);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for &p in &self.pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Line reader with a deadline over a child's stdout.
pub struct Lines {
    out: std::fs::File,
    buf: Vec<u8>,
}

impl Lines {
    /// Over a child's stdout or stderr, or any pipe end.
    pub fn new(out: impl Into<std::os::fd::OwnedFd>) -> Self {
        Self {
            out: std::fs::File::from(out.into()),
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; None on EOF. Panics after `LINE_TIMEOUT`.
    pub fn next_line(&mut self) -> Option<String> {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no line from the workload within {LINE_TIMEOUT:?}"
            );
            let mut fds = [PollFd::new(self.out.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).expect("timeout");
            match poll(&mut fds, ms) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => panic!("poll: {e}"),
            }
            let mut chunk = [0u8; 4096];
            let n = self.out.read(&mut chunk).expect("reading workload stdout");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads lines until one starts with `prefix`; returns it.
    pub fn expect_prefix(&mut self, prefix: &str) -> String {
        loop {
            match self.next_line() {
                Some(l) if l.starts_with(prefix) => return l,
                Some(_) => continue,
                None => panic!("EOF before a line starting with {prefix:?}"),
            }
        }
    }
}

/// A process the test talks to: a freshly started workload, or a restored one.
pub struct Proc {
    pub pid: i32,
    pub stdin: ChildStdin,
    pub lines: Lines,
    /// The std Child when we spawned it directly (so `wait` reaps it).
    child: Option<Child>,
}

impl Proc {
    /// Starts `bin args` with piped stdio in `cwd` and waits for its READY line.
    pub fn start(guard: &mut Guard, bin: &Path, args: &[&str], cwd: Option<&Path>) -> Proc {
        Self::start_until(guard, bin, args, cwd, Some("READY"))
    }

    /// Like [`start`](Self::start), waiting for a line starting with `ready` if given.
    pub fn start_until(
        guard: &mut Guard,
        bin: &Path,
        args: &[&str],
        cwd: Option<&Path>,
        ready: Option<&str>,
    ) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        Self::spawn(guard, cmd, ready)
    }

    /// Spawns `cmd` with piped stdio and waits for a line starting with `ready` if given.
    pub fn spawn(guard: &mut Guard, mut cmd: Command, ready: Option<&str>) -> Proc {
        become_subreaper();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // A pipe, never our own stderr: that may be a log file that keeps growing,
            // which restore would rightly call a changed file.
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id() as i32;
        guard.add(pid);
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = Lines::new(child.stdout.take().expect("stdout"));
        if let Some(ready) = ready {
            lines.expect_prefix(ready);
        }
        Proc {
            pid,
            stdin,
            lines,
            child: Some(child),
        }
    }

    /// Sends a line to the process.
    pub fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("writing to the workload");
        self.stdin.flush().expect("flushing");
    }

    /// Sends CHECK and returns the verdict line.
    pub fn check(&mut self) -> String {
        self.send("CHECK");
        self.lines.expect_prefix_any(&["PASS", "FAIL"])
    }

    /// Waits for the process to end; returns its exit code (128+signal if killed).
    pub fn wait(&mut self) -> i32 {
        if let Some(c) = self.child.as_mut() {
            let st = c.wait().expect("wait");
            return st.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + st.signal().unwrap_or(0)
            });
        }
        wait_pid(self.pid)
    }
}

impl Lines {
    fn expect_prefix_any(&mut self, prefixes: &[&str]) -> String {
        loop {
            match self.next_line() {
                Some(l) if prefixes.iter().any(|p| l.starts_with(p)) => return l,
                Some(_) => continue,
                None => panic!("EOF before a verdict line"),
            }
        }
    }
}

/// Reaps `pid` (our child or, as subreaper, our orphaned descendant).
pub fn wait_pid(pid: i32) -> i32 {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    }
}

/// Runs `mcr ARGS` to completion and returns its output.
pub fn mcr(args: &[&str]) -> Output {
    Command::new(mcr_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running mcr")
}

/// Asserts `mcr` failed with `code` and a message containing every one of `needles`.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit; stderr: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "mcr panicked: {err}");
}

/// Checkpoints `pid` as a shell job (its stdio are our pipes) and asserts success.
pub fn checkpoint(pid: i32, dir: &Path, extra: &[&str]) {
    let pid_s = pid.to_string();
    let mut args = vec![
        "checkpoint",
        "-t",
        &pid_s,
        "-D",
        dir.to_str().expect("utf-8 path"),
        "--shell-job",
    ];
    args.extend_from_slice(extra);
    let out = mcr(&args);
    assert!(
        out.status.success(),
        "checkpoint of {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restores the image in `dir` as a shell job with fresh pipes and returns the
/// restored process, already registered with `guard`.
pub fn restore(guard: &mut Guard, dir: &Path, extra: &[&str]) -> Proc {
    restore_via(guard, &[], dir, extra)
}

/// Like [`restore`], with `mcr` run through `prefix` (`nsenter --net=...`, say).
pub fn restore_via(guard: &mut Guard, prefix: &[&str], dir: &Path, extra: &[&str]) -> Proc {
    become_subreaper();
    let pidfile = dir.with_extension("pid");
    // Not a pipe: the restored process inherits this as its stderr and would hold the
    // pipe open for as long as it lives.
    let errfile = dir.with_extension("stderr");
    let errf = std::fs::File::create(&errfile).expect("creating the restore stderr file");
    let mut cmd = mcr_via(prefix);
    cmd.args(["restore", "-D"])
        .arg(dir)
        .args(["--shell-job", "-d", "--pidfile"])
        .arg(&pidfile)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(errf);
    let mut child = cmd.spawn().expect("spawning mcr restore");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let st = child.wait().expect("waiting for mcr restore");
    let err = std::fs::read_to_string(&errfile).unwrap_or_default();
    assert!(st.success(), "mcr restore failed: {err}");
    let pid = read_pidfile(&pidfile);
    guard.add(pid);
    Proc {
        pid,
        stdin,
        lines: Lines::new(stdout),
        child: None,
    }
}

/// The pid `mcr restore --pidfile` (or `receive`) wrote.
fn read_pidfile(p: &Path) -> i32 {
    std::fs::read_to_string(p)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid in pidfile")
}

/// `mcr`, run through `prefix` (`nsenter --net=...`, say) when not empty.
pub fn mcr_via(prefix: &[&str]) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(mcr_bin());
            c
        }
        None => Command::new(mcr_bin()),
    }
}

/// `pid` and all its descendants, read from /proc.
pub fn tree_pids(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<i32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Reaps the killed descendants of a checkpointed tree: as subreaper we inherit them,
/// and their pids must be free again for the restore.
fn reap_descendants(pids: &[i32]) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    for &p in pids {
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                Instant::now() < deadline,
                "pid {p} of the dumped tree never went away"
            );
            match waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => std::thread::yield_now(),
                Ok(_) => {}
            }
        }
    }
}

/// Checkpoint (kill), reap, restore: the usual round trip. Returns the restored process.
pub fn round_trip(
    guard: &mut Guard,
    mut p: Proc,
    dir: &Path,
    ckpt_extra: &[&str],
    restore_extra: &[&str],
) -> Proc {
    let pid = p.pid;
    let tree = tree_pids(pid);
    for &t in &tree[1..] {
        guard.add(t);
    }
    checkpoint(pid, dir, ckpt_extra);
    let code = p.wait();
    assert_eq!(
        code,
        128 + libc::SIGKILL,
        "the checkpointed process should have been killed"
    );
    reap_descendants(&tree[1..]);
    let r = restore(guard, dir, restore_extra);
    assert_eq!(r.pid, pid, "restored with another pid");
    r
}

/// Asserts a verdict line is a PASS.
pub fn assert_pass(verdict: &str) {
    assert!(verdict.starts_with("PASS"), "workload verdict: {verdict}");
}

/// Asserts that checkpointing `p` (as a shell job) is refused as unsupported (exit 5)
/// with a message naming its pid and containing every one of `needles`, and that the
/// workload then runs on and passes its own check.
pub fn assert_refused(mut p: Proc, needles: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = p.pid.to_string();
    let out = mcr(&[
        "checkpoint",
        "-t",
        &pid,
        "-D",
        img.to_str().expect("utf-8"),
        "--shell-job",
    ]);
    let mut all = vec![format!("pid {pid}")];
    all.extend(needles.iter().map(|n| n.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert_fails(&out, 5, &all);
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0, "the workload's exit status after its check");
}

/// The parent of `pid`, from /proc/PID/stat.
pub fn parent_of(pid: i32) -> i32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &st[st.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("ppid")
}

/// `mcr receive` waiting for a migration, its stdio pipes of ours (a shell job's stdio
/// become these once the workload runs there).
pub struct Receiver {
    child: Child,
    stdin: ChildStdin,
    stdout: std::process::ChildStdout,
    pub stderr: Lines,
    pidfile: PathBuf,
}

impl Receiver {
    /// Starts `mcr receive --listen ADDR --shell-job -d` with `extra` and waits until it
    /// listens. `env` is set for it (MCR_FAULT, say).
    pub fn start(listen: &str, pidfile: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_via(&[], listen, pidfile, extra, env)
    }

    /// Like [`start`](Self::start), with `mcr` run through `prefix` (`nsenter ...`).
    pub fn start_via(
        prefix: &[&str],
        listen: &str,
        pidfile: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        become_subreaper();
        let mut cmd = mcr_via(prefix);
        cmd.args([
            "receive",
            "--listen",
            listen,
            "--shell-job",
            "-d",
            "--pidfile",
        ])
        .arg(pidfile)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning mcr receive");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = Lines::new(child.stderr.take().expect("stderr"));
        stderr.expect_prefix("mcr: receiving on");
        Receiver {
            child,
            stdin,
            stdout,
            stderr,
            pidfile: pidfile.to_path_buf(),
        }
    }

    /// The pid of `mcr receive`.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for `mcr receive` to end; returns its exit code.
    pub fn wait(&mut self) -> i32 {
        self.child
            .wait()
            .expect("waiting for mcr receive")
            .code()
            .unwrap_or(-1)
    }

    /// Writes `line` on its stdin: what lets it go on at a wait point (MCR_FAULT).
    pub fn tell(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("writing to mcr receive");
    }

    /// Says `line` to the workload it runs already (a shell job's stdio are ours) and
    /// returns its answer, the first line starting with `prefix`.
    pub fn ask(&mut self, line: &str, prefix: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("writing to the workload");
        use std::os::fd::AsFd;
        let out = self
            .stdout
            .as_fd()
            .try_clone_to_owned()
            .expect("the workload's stdout");
        // It answers one line a question: nothing is left behind in this reader.
        Lines::new(out).expect_prefix(prefix)
    }

    /// Waits for `mcr receive` to end; returns its exit code and what it said on
    /// stderr after it began listening.
    pub fn wait_with_stderr(&mut self) -> (i32, String) {
        let code = self.wait();
        let mut said = String::new();
        while let Some(l) = self.stderr.next_line() {
            said.push_str(&l);
            said.push('\n');
        }
        (code, said)
    }

    /// Once it succeeded: the migrated workload, registered with `guard`, and so is
    /// the init of the pid namespace it was restored into, if it is not that init.
    pub fn workload(mut self, guard: &mut Guard) -> Proc {
        let code = self.wait();
        assert_eq!(code, 0, "mcr receive failed");
        let pid = read_pidfile(&self.pidfile);
        guard.add(pid);
        let init = parent_of(pid);
        if init != std::process::id() as i32 {
            guard.add(init);
        }
        Proc {
            pid,
            stdin: self.stdin,
            lines: Lines::new(self.stdout),
            child: None,
        }
    }
}

/// Whether the kernel still tracks writes to any private VMA of `pid`.
pub fn tracked_anywhere(pid: i32) -> bool {
    let p = kext_shim::Pid::from_raw(pid);
    let pm = kext_shim::mem::Pagemap::open(p).expect("pagemap");
    kext_shim::procfs::read_maps(p)
        .expect("maps")
        .iter()
        .filter(|m| !m.shared && !m.path.starts_with('['))
        .any(|m| {
            kext_shim::dirty::written(&pm, m.start, m.end, false)
                .expect("scan")
                .is_some()
        })
}

/// Running, not gone or a zombie (the holder is re-parented to us, the subreaper).
pub fn running(pid: i32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z')
}

/// Waits (10 s at most) until `pid` has exited.
pub fn wait_gone(pid: i32) {
    let pidfd = kext_shim::pidfd::pidfd_open(kext_shim::Pid::from_raw(pid));
    if let Ok(fd) = pidfd {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).expect("poll");
    }
}

/// Starts the `churn` workload with `mib` MiB, the file it maps privately made in `dir`.
pub fn start_churn(g: &mut Guard, dir: &Path, mib: &str) -> Proc {
    start_churn_at(g, dir, mib, "4")
}

/// Like [`start_churn`], rewriting `rate` pages a millisecond.
pub fn start_churn_at(g: &mut Guard, dir: &Path, mib: &str, rate: &str) -> Proc {
    let file = dir.join(format!("churn-file-{mib}"));
    Proc::start(
        g,
        &workload_bin("churn"),
        &[file.to_str().expect("utf-8 path"), mib, rate],
        None,
    )
}

/// The state letter of `pid` in /proc/PID/stat.
pub fn proc_state(pid: i32) -> Option<char> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    st.rsplit(") ").next()?.chars().next()
}

/// Waits until `pid` is in state `want` (a process let go by a dying tracer takes a
/// moment to get there).
pub fn wait_state(pid: i32, want: char) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    while proc_state(pid) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never got to state {want}: {:?}",
            proc_state(pid)
        );
        std::thread::yield_now();
    }
}

/// Waits until `pid` is out of every stop (traced or not).
pub fn wait_running(pid: i32) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    while matches!(proc_state(pid), Some('t' | 'T')) {
        assert!(Instant::now() < deadline, "pid {pid} stays stopped");
        std::thread::yield_now();
    }
}
