#![forbid(unsafe_code)]
//! The live-update operation around mcr (issue 6): what to move where, and the operator
//! kept informed and safe. So far: its configuration (`config`), the lock that keeps
//! to one operation at a time (`lock`), the operations journal (`journal`), fix
//! bundles (`fix`), the applications told, who may refuse (`notify`), and the
//! console's token (`token`).

pub mod config;
pub mod console;
pub mod demo;
pub mod disk;
pub mod fault;
pub mod fix;
pub mod journal;
pub mod lock;
pub mod notify;
pub mod partition;
pub mod preview;
pub mod reap;
pub mod token;
pub mod update;

/// Where the lock, the journal and the operations' logs live unless told.
pub const STATE_DIR: &str = "/var/lib/liveupdate";
