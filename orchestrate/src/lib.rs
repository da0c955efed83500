#![forbid(unsafe_code)]
//! The live-update operation around mcr (issue 6): what to move where, and the operator
//! kept informed and safe. So far: its configuration (`config`).

pub mod config;
