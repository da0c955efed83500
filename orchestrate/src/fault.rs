//! Failures on demand, for the tests of what a failed operation leaves:
//! `LIVEUPDATE_FAULT=PHASE` makes the operation fail at that phase (clone, fix-apply,
//! surrogate, pre-copy, blackout), as a real failure there would.

const VAR: &str = "LIVEUPDATE_FAULT";

pub fn armed(phase: &str) -> bool {
    std::env::var(VAR).is_ok_and(|v| v == phase)
}

/// An error at `phase` when it is the one armed.
pub fn point(phase: &str) -> Result<(), String> {
    if armed(phase) {
        Err(format!("fault injected at {phase} ({VAR})"))
    } else {
        Ok(())
    }
}
