//! The one place mcr talks to the kernel.
//!
//! Everything here is a thin, typed wrapper over a kernel interface: ptrace and syscall
//! injection, /proc readers, remote memory, clone3 with `set_tid`, pidfds and feature
//! probes. It knows nothing of images or policy: callers above it decide what to dump and
//! how to restore it. Every `unsafe` block of the project lives in this crate and carries a
//! `// SAFETY:` comment.

pub mod anon;
pub mod btf;
pub mod clone;
pub mod dirty;
pub mod filemap;
pub mod inet;
pub mod inject;
pub mod lazy;
pub mod loopdev;
pub mod mem;
pub mod netlink;
pub mod nfqueue;
pub mod nft;
pub mod pidfd;
pub mod pipe;
pub mod probe;
pub mod procfs;
pub mod ptrace;
pub mod pty;
pub mod rtnl;
pub mod sockdiag;
pub mod sys;
pub mod sysv;
pub mod tcp;
pub mod unix;
pub mod vmaiter;

pub use nix::errno::Errno;
pub use nix::unistd::Pid;

/// A kernel call that failed: which call, on what, and the errno it returned.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {errno}")]
pub struct SysError {
    /// The call and its object, e.g. `ptrace(PTRACE_SEIZE) pid 4121`.
    pub what: String,
    pub errno: Errno,
}

impl SysError {
    pub fn new(what: impl Into<String>, errno: Errno) -> Self {
        Self {
            what: what.into(),
            errno,
        }
    }
}

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse {what}: {line:?}")]
    Parse {
        path: String,
        what: &'static str,
        line: String,
    },
    #[error("pid {pid}: {what}")]
    Unexpected { pid: i32, what: String },
}

impl Error {
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The errno behind this error, if it came from the kernel.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Sys(e) => Some(e.errno),
            Error::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns a raw libc return value into a `Result`, naming the call on failure.
pub(crate) fn check(ret: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long> {
    if ret < 0 {
        Err(SysError::new(what(), Errno::last()).into())
    } else {
        Ok(ret)
    }
}

pub const PAGE_SIZE: u64 = 4096;
