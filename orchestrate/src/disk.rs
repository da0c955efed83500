//! Root disks: clones for the surrogate, and the sample disk of the demo.
//!
//! A disk is a directory tree. A clone keeps every file's type, mode, owner and
//! mtime (mcr checks what the workload holds open against the dump by type, size
//! and mtime); it shares blocks with the original where the file system can
//! (reflink), and copies them otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cloning {from} to {to}: {why}")]
    Clone {
        from: String,
        to: String,
        why: String,
    },
    #[error("sample disk {path}: {why}")]
    Sample { path: String, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Blocks shared with the original until either side writes them.
    Reflink,
    Copy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Reflink => "reflink",
            Method::Copy => "copy",
        }
    }
}

/// Bytes in the regular files under `dir`, and how many files.
pub fn usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() {
            let (b, n) = usage(&e.path());
            total = (total.0 + b, total.1 + n);
        } else if m.is_file() {
            total = (total.0 + m.len(), total.1 + 1);
        }
    }
    total
}

/// Clones `from` into `to` (which must not exist).
pub fn clone(from: &Path, to: &Path) -> Result<Method, DiskError> {
    let err = |why: String| DiskError::Clone {
        from: from.display().to_string(),
        to: to.display().to_string(),
        why,
    };
    if to.exists() {
        return Err(err("the target exists".into()));
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    for (method, flag) in [
        (Method::Reflink, "--reflink=always"),
        (Method::Copy, "--reflink=never"),
    ] {
        let out = Command::new("cp")
            .args(["-a", "--no-target-directory", flag])
            .arg(from)
            .arg(to)
            .output()
            .map_err(|e| err(format!("running cp: {e}")))?;
        if out.status.success() {
            return Ok(method);
        }
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let _ = std::fs::remove_dir_all(to);
        if method == Method::Copy {
            return Err(err(why));
        }
    }
    unreachable!("the copy either succeeds or is an error")
}

/// The shared libraries `exe` needs, as `ldd` lists them (absolute paths).
fn libraries(exe: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A small root disk at `dir` for the demo: `exe` (with its libraries) as
/// `/bin/liveupdate`, a /dev/null, and `files` (path inside, content).
pub fn sample(dir: &Path, exe: &Path, files: &[(&str, &str)]) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Sample {
        path: dir.display().to_string(),
        why,
    };
    let put = |from: &Path, inside: &Path| -> Result<(), DiskError> {
        let to = dir.join(inside.strip_prefix("/").unwrap_or(inside));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| err(e.to_string()))?;
        }
        std::fs::copy(from, &to)
            .map(drop)
            .map_err(|e| err(format!("{}: {e}", from.display())))
    };
    for d in ["bin", "dev", "etc", "tmp", "var/log", "proc"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| err(e.to_string()))?;
    }
    put(exe, Path::new("/bin/liveupdate"))?;
    for lib in libraries(exe).map_err(err)? {
        put(&lib, &lib)?;
    }
    let null = dir.join("dev/null");
    if !null.exists() {
        nix::sys::stat::mknod(
            &null,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .map_err(|e| err(format!("mknod dev/null: {e}")))?;
    }
    for (inside, content) in files {
        let to = dir.join(inside.trim_start_matches('/'));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| err(e.to_string()))?;
        }
        std::fs::write(&to, content).map_err(|e| err(format!("{inside}: {e}")))?;
    }
    Ok(())
}
