//! Failures on demand, for the tests of what a failed operation leaves:
//! `LIVEUPDATE_FAULT=PHASE` makes the operation fail at that phase (clone,
//! clone-frozen: while the original image is frozen for its copy, fix-apply,
//! surrogate, pre-copy, blackout), as a real failure there would;
//! `LIVEUPDATE_FAULT=stall-PHASE` stops it there for good (saying `STALLED at
//! PHASE` on stdout), for a test to kill it.

const VAR: &str = "LIVEUPDATE_FAULT";

pub fn armed(phase: &str) -> bool {
    std::env::var(VAR).is_ok_and(|v| v == phase)
}

/// An error at `phase` when it is the one armed.
pub fn point(phase: &str) -> Result<(), String> {
    if armed(&format!("stall-{phase}")) {
        use std::io::Write;
        println!("STALLED at {phase}");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::park();
        }
    }
    if armed(phase) {
        Err(format!("fault injected at {phase} ({VAR})"))
    } else {
        Ok(())
    }
}
