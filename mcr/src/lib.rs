#![forbid(unsafe_code)]
//! mcr: checkpoint and restore of Linux processes.
//!
//! [`model`] is the frozen workload as plain data; [`image`] encodes it to an image
//! directory; [`dump`] builds it from a live process; [`restore`] brings it back.

pub mod check;
pub mod dump;
pub mod fault;
pub mod image;
pub mod model;
pub mod netlock;
mod par;
pub mod restore;
pub mod show;
