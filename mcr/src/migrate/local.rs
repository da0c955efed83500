//! A destination on this host, for the demo and the blackout harness: an `mcr receive`
//! child restoring into a pid namespace of its own (the original holds its pids until
//! the commit), whose stdio become the moved workload's (it is a shell job).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// `mcr receive` listening on a unix socket of a temporary directory.
pub struct LocalDestination {
    child: Child,
    /// Where `mcr migrate --to` points.
    pub addr: String,
    pidfile: PathBuf,
    _dir: tempfile::TempDir,
}

/// The workload once it runs at the destination.
pub struct MovedWorkload {
    /// As this host sees it.
    pub pid: i32,
    /// The init of its pid namespace, which ends as the workload ends.
    pub init: i32,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
}

fn err(what: impl Into<String>) -> std::io::Error {
    std::io::Error::other(what.into())
}

/// Reads lines until one starts with `prefix`.
pub fn line_starting(r: &mut impl BufRead, prefix: &str) -> std::io::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(err(format!("ended before a line starting with {prefix:?}")));
        }
        if line.starts_with(prefix) {
            return Ok(line.trim_end().to_string());
        }
    }
}

impl LocalDestination {
    /// Starts `mcr` (the binary at `exe`) receiving, and waits until it listens. The
    /// caller should be a child subreaper, to reap the namespace's init later.
    pub fn start(exe: &Path) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mcr-dest-").tempdir()?;
        let addr = format!("unix:{}", dir.path().join("migrate.sock").display());
        let pidfile = dir.path().join("pid");
        let mut child = Command::new(exe)
            .args(["receive", "--listen", &addr, "--pidns", "--shell-job", "-d"])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut errs = BufReader::new(child.stderr.take().ok_or_else(|| err("no stderr"))?);
        line_starting(&mut errs, "mcr: receiving on")?;
        // Drained from here on, so the destination never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while errs.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Ok(Self {
            child,
            addr,
            pidfile,
            _dir: dir,
        })
    }

    /// Once the migration committed: waits for `mcr receive` and returns the workload.
    pub fn finish(mut self) -> std::io::Result<MovedWorkload> {
        // Taken before the wait, which would close them: they are the workload's now.
        let stdin = self.child.stdin.take().ok_or_else(|| err("no stdin"))?;
        let stdout = BufReader::new(self.child.stdout.take().ok_or_else(|| err("no stdout"))?);
        let status = self.child.wait()?;
        if !status.success() {
            return Err(err(format!("mcr receive ended with {status}")));
        }
        let pid: i32 = std::fs::read_to_string(&self.pidfile)?
            .trim()
            .parse()
            .map_err(|_| err("bad pidfile"))?;
        let init = std::fs::read_to_string(format!("/proc/{pid}/stat"))?
            .rsplit(") ")
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| err("cannot read the moved workload's parent"))?;
        Ok(MovedWorkload {
            pid,
            init,
            stdin,
            stdout,
        })
    }

    /// Gives up: the destination is killed.
    pub fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MovedWorkload {
    /// Sends CHECK; returns the verdict line and the exit status of the namespace's
    /// init (the workload's own, once it ended after answering).
    pub fn check(mut self) -> std::io::Result<(String, Option<i32>)> {
        writeln!(self.stdin, "CHECK")?;
        let verdict = line_starting(&mut self.stdout, "")?;
        let code = match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.init), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => Some(c),
            _ => None,
        };
        Ok((verdict, code))
    }
}

/// When the longest pause a demo workload reported ended, in ms since the epoch.
pub fn reported_pause_end_ms(verdict: &str) -> Option<u64> {
    verdict
        .split("ended at ")
        .nth(1)?
        .split(" ms")
        .next()?
        .parse()
        .ok()
}

/// The longest pause a demo workload reported in its verdict, in ms.
pub fn reported_pause_ms(verdict: &str) -> Option<f64> {
    verdict
        .split("longest pause ")
        .nth(1)?
        .split(" ms")
        .next()?
        .parse()
        .ok()
}

/// The longest pause a demo workload reported once the host's steal is taken out of
/// each gap (the part in which its thread, never switched out, did not run), in ms,
/// and when it ended, in ms since the epoch.
pub fn reported_own_pause_ms(verdict: &str) -> Option<(f64, u64)> {
    let own = verdict.split("without the host's steal ").nth(1)?;
    Some((
        own.split(" ms").next()?.parse().ok()?,
        reported_pause_end_ms(own)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_says_how_long_its_longest_pause_was_and_when_it_ended() {
        let v = "PASS 256 pages verified (0 wrong), 10 page writes, longest pause 4.25 ms (realtime 4.25 ms, monotonic 4.10 ms), ended at 1796176681546 ms since the epoch; without the host's steal 3.50 ms, ended at 1796176681540 ms";
        assert_eq!(reported_pause_ms(v), Some(4.25));
        assert_eq!(reported_pause_end_ms(v), Some(1_796_176_681_546));
        assert_eq!(reported_own_pause_ms(v), Some((3.5, 1_796_176_681_540)));
        assert_eq!(
            reported_pause_end_ms("PASS ... longest pause 4.25 ms"),
            None
        );
    }
}
