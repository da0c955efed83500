//! Readers of /proc/PID: what a task is, maps, fds, limits, mounts.

mod maps;
mod misc;

pub use maps::{read_layout, read_maps, MapEntry};
pub use misc::*;
