#![forbid(unsafe_code)]
//! Shared pieces of the benchmarks: the sample workload and where images go.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

/// The `mcr` binary of this build (target/<profile>/mcr), from a bench (in
/// target/<profile>/deps) or from a binary of ours (in target/<profile>).
pub fn mcr_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("target/<profile>");
    let bin = match dir.join("mcr") {
        b if b.exists() => b,
        _ => dir.parent().expect("target/<profile>").join("mcr"),
    };
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release -p mcr",
        bin.display()
    );
    bin
}

/// Images go to tmpfs, as the figures in the README assume.
pub fn image_root() -> PathBuf {
    PathBuf::from("/dev/shm")
}

/// `mcr demo-workload`: `mib` MiB of incompressible memory, rewritten continuously.
pub struct Workload {
    pub child: Child,
    pub pid: i32,
    /// Held open so the workload never sees EOF and keeps running.
    _stdin: ChildStdin,
}

impl Workload {
    pub fn start(mib: usize) -> Workload {
        Self::start_tree(mib, 1, 1)
    }

    /// A tree of `procs` processes with `threads` threads each, `mib` MiB per process.
    pub fn start_tree(mib: usize, procs: usize, threads: usize) -> Workload {
        kext_shim::procfs::cloexec_inherited_fds().expect("marking inherited fds close-on-exec");
        let mut child = Command::new(mcr_bin())
            .args([
                "demo-workload",
                "--mib",
                &mib.to_string(),
                "--procs",
                &procs.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the workload");
        let stdin = child.stdin.take().expect("stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("reading READY");
        assert_eq!(line.trim(), "READY");
        Workload {
            pid: child.id() as i32,
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` and its descendants, parents first.
pub fn tree_pids(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(
            kext_shim::procfs::children(nix::unistd::Pid::from_raw(out[i])).unwrap_or_default(),
        );
        i += 1;
    }
    out
}

/// Kills a restored tree and reaps what is ours to reap (we are its subreaper).
pub fn kill_tree(pid: i32) {
    let pids = tree_pids(pid);
    for &p in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for &p in &pids {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(p), None);
    }
}

/// What a restore benchmark restores into: the image's shell-job stdio bound to a pipe we
/// keep open (so the workload never sees EOF) and /dev/null.
pub struct RestoreTarget {
    pub opts: mcr::restore::RestoreOptions,
    _stdin: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    _null: std::fs::File,
}

impl RestoreTarget {
    pub fn new(img: &std::path::Path) -> RestoreTarget {
        use std::os::fd::AsRawFd;
        let stdin = nix::unistd::pipe().expect("pipe");
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        let mut opts = mcr::restore::RestoreOptions::new(img);
        opts.shell_job = true;
        opts.stdio = [stdin.0.as_raw_fd(), null.as_raw_fd(), null.as_raw_fd()];
        RestoreTarget {
            opts,
            _stdin: stdin,
            _null: null,
        }
    }

    /// Restores `iters` times, timing only the restores; each restored tree is killed.
    pub fn time(&self, iters: u64) -> std::time::Duration {
        let mut total = std::time::Duration::ZERO;
        for _ in 0..iters {
            let t = std::time::Instant::now();
            let r = mcr::restore::restore(&self.opts).expect("restore");
            total += t.elapsed();
            kill_tree(r.pid);
        }
        total
    }
}
