//! Waiting for a child that should end by itself, without ever waiting for ever.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Gives `child` until `within` to end, then kills it; its status either way.
pub fn end_within(child: &mut Child, within: Duration) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + within;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    child.wait()
}
