//! Fault injection for tests of the failure paths: `MCR_FAULT=point[,point...]` makes
//! the named step fail as if the kernel had refused it, so tests can check that a failed
//! checkpoint leaves the workload running and a failed restore leaves nothing behind.

/// Points that can fail on request.
pub const DUMP_AFTER_PAGES: &str = "dump-after-pages";
pub const RESTORE_AFTER_FILL: &str = "restore-after-fill";
/// Past the gate of a migration's destination (after COMMIT), before the release.
pub const RESTORE_AFTER_GATE: &str = "restore-after-gate";
/// Not a failure: the dump stops for good right after it blocked the TCP connections,
/// so that a test can kill mcr there, as a crash would.
pub const DUMP_STALL_AFTER_LOCK: &str = "dump-stall-after-lock";
/// Not a failure: `mcr migrate` stops for good after its first pre-copy round went out.
pub const MIGRATE_STALL_AFTER_ROUND: &str = "migrate-stall-after-round";
/// Not a failure: `mcr migrate` stops for good once the destination said it is ready,
/// before anything stops the original for good.
pub const MIGRATE_STALL_AT_READY: &str = "migrate-stall-at-ready";
/// Not a failure: `mcr migrate` stops for good once the original is stopped for good,
/// before it tells the destination to take over.
pub const MIGRATE_STALL_AT_COMMIT: &str = "migrate-stall-at-commit";
/// Not a failure: `mcr migrate --post-copy` stops handing out pages for good once the
/// workload runs at the destination, before every page is there.
pub const MIGRATE_STALL_IN_POST_COPY: &str = "migrate-stall-in-post-copy";
/// Not a failure: `mcr migrate --post-copy` waits for a line on stdin once the workload
/// runs at the destination, before it pushes the pages (those asked for still come),
/// so that a test can have the workload change its memory while pages are missing.
pub const MIGRATE_WAIT_IN_POST_COPY: &str = "migrate-wait-in-post-copy";
/// Not a failure: `mcr migrate` waits for a line on its stdin after each pre-copy round
/// went out, so that a test can change the workload between rounds.
pub const MIGRATE_WAIT_AFTER_ROUND: &str = "migrate-wait-after-round";

/// Not a failure: `mcr receive` waits for a line on stdin before it builds the tree
/// from the first round, so that a test can change the workload between a round and
/// the destination's reading of the pages it left in the workload.
pub const RECEIVE_WAIT_BEFORE_WARM: &str = "receive-wait-before-warm";

/// Not a failure: the dump waits for a line on stdin once the tree is frozen, before
/// it looks at anything, so that a test can act on the frozen tree (connect to it).
pub const DUMP_WAIT_AFTER_FREEZE: &str = "dump-wait-after-freeze";

/// Not a failure: `mcr migrate` waits for a line on stdin after it read the tree's VMA
/// flags, just before the blackout's freeze.
pub const MIGRATE_WAIT_BEFORE_FREEZE: &str = "migrate-wait-before-freeze";

/// Not a failure: VMA flags come from smaps, as on a kernel without the BPF reader
/// (see `dump::vmflags`), so that tests reach that path here too.
pub const VMA_ITER_UNAVAILABLE: &str = "vma-iter-unavailable";

/// Waits for a line on stdin (or its end) if `point` was asked for, saying so on stderr
/// first.
pub fn wait(point: &str) {
    if armed(point) {
        eprintln!("mcr: waiting at {point} (MCR_FAULT)");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// Stops this thread for good if `point` was asked for, saying so on stderr first (a
/// test waits for that line).
pub fn stall(point: &str) {
    if armed(point) {
        eprintln!("mcr: stalled at {point} (MCR_FAULT)");
        loop {
            std::thread::park();
        }
    }
}

/// Whether `point` was asked to fail.
pub fn armed(point: &str) -> bool {
    std::env::var("MCR_FAULT").is_ok_and(|v| v.split(',').any(|p| p.trim() == point))
}
