#![forbid(unsafe_code)]
//! mcr: checkpoint and restore of Linux processes.
//!
//! [`model`] is the frozen workload as plain data; [`image`] encodes it to an image
//! directory; [`dump`] builds it from a live process; [`restore`] brings it back.

pub mod check;
pub mod dump;
pub mod fault;
pub mod image;
pub mod migrate;
pub mod model;
pub mod netlock;
mod par;
pub mod ranges;
pub mod restore;
pub mod show;

/// The `mcr` binary, for the helper processes it starts (`hold-packets`,
/// `hold-tracker`): this program, unless a program using the library names it in
/// `MCR_EXE`.
pub(crate) fn mcr_exe() -> std::io::Result<std::path::PathBuf> {
    match std::env::var_os("MCR_EXE") {
        Some(e) => Ok(std::path::PathBuf::from(e)),
        None => std::env::current_exe(),
    }
}
