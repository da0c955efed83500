//! One live-update operation at a time: a lock file held with flock for as long as
//! the operation runs, naming its holder (pid, operation, command). The kernel lets go
//! of the lock when the holder dies, however it dies, so a lock file whose lock is free
//! is the mark of an operation that crashed: the next one is told, to clean up after it.

use nix::fcntl::{Flock, FlockArg};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Who holds (or held) the lock, as its file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub operation: String,
    pub command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another live update holds {path}: operation {} ({}), pid {}", .holder.operation, .holder.command, .holder.pid)]
    Held { path: String, holder: Holder },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The lock, held until dropped (then its file says nobody).
pub struct OpLock {
    file: Flock<std::fs::File>,
    path: PathBuf,
}

/// The lock taken, and the operation that held it last and died without letting go
/// (its half-made work is for the caller to clean up).
pub struct Taken {
    pub lock: OpLock,
    pub crashed: Option<Holder>,
}

impl OpLock {
    /// Takes the lock in `dir` for `operation` (run as `command`), or says who has it.
    pub fn take(dir: &Path, operation: &str, command: &str) -> Result<Taken, LockError> {
        let path = dir.join("liveupdate.lock");
        let shown = path.display().to_string();
        let io = |source| LockError::Io {
            path: shown.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = read_holder(&mut f).unwrap_or(Holder {
                    pid: 0,
                    operation: "unknown".into(),
                    command: "(its lock file says nothing)".into(),
                });
                return Err(LockError::Held {
                    path: shown,
                    holder,
                });
            }
            Err((_, e)) => return Err(io(std::io::Error::from(e))),
        };
        // Free, but not empty: the last holder died holding it.
        let crashed = read_holder(&mut file);
        let me = format!("{}\n{operation}\n{command}\n", std::process::id());
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(me.as_bytes()).map_err(io)?;
        Ok(Taken {
            lock: OpLock { file, path },
            crashed,
        })
    }
}

impl Drop for OpLock {
    fn drop(&mut self) {
        // Emptied before the flock goes: an empty file is a lock let go properly.
        if let Err(e) = self.file.set_len(0) {
            eprintln!("liveupdate: emptying {}: {e}", self.path.display());
        }
    }
}

fn read_holder(f: &mut std::fs::File) -> Option<Holder> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    let mut l = s.lines();
    Some(Holder {
        pid: l.next()?.parse().ok()?,
        operation: l.next()?.to_string(),
        command: l.next().unwrap_or("").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lu-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_operation_is_refused_naming_the_holder() {
        let d = dir("second");
        let first = OpLock::take(&d, "LU0001", "liveupdate run").unwrap();
        assert!(first.crashed.is_none());
        let e = OpLock::take(&d, "LU0002", "liveupdate preview")
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("LU0001") && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        drop(first);
        let again = OpLock::take(&d, "LU0002", "liveupdate preview").unwrap();
        assert!(again.crashed.is_none(), "a lock let go is not a crash");
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A holder killed with SIGKILL leaves its name in the file and the lock free.
    #[test]
    fn a_holder_that_died_is_reported_to_the_next_one() {
        let d = dir("crash");
        std::fs::create_dir_all(&d).unwrap();
        // A child process takes the lock (flock is per open file), then is killed.
        let script = format!(
            "exec 9>>{p}; flock -n 9; printf '4242\\nLU0007\\nliveupdate run\\n' > {p}; echo taken; exec sleep 60",
            p = d.join("liveupdate.lock").display()
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 6];
        out.read_exact(&mut b).unwrap();
        assert!(OpLock::take(&d, "LU0008", "liveupdate run").is_err());
        child.kill().unwrap();
        child.wait().unwrap();
        let t = OpLock::take(&d, "LU0008", "liveupdate run").unwrap();
        let c = t.crashed.clone().expect("the crash is reported");
        assert_eq!((c.pid, c.operation.as_str()), (4242, "LU0007"));
        drop(t);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
