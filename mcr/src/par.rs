//! A small work-sharing loop: page copies are bound by page faults and memcpy, which
//! scale with cores, so the big copies of dump and restore run on every core.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Workers for a job of `bytes`: one for small jobs (a thread costs more than it saves),
/// else one per core, at most four.
pub fn workers_for(bytes: u64) -> usize {
    if bytes < 8 << 20 {
        return 1;
    }
    cores().min(4)
}

/// The cores this process may use. std reads the cgroup's CPU quota files to say so,
/// each time (0.1 ms, asked in the blackout): read once.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// [`workers_for`], for a copy made while the workload runs: at most one per core
/// but one. A copy thread that shares a core with a busy workload thread takes whole
/// ticks of it in turn (4 ms at HZ=250), which the workload sees as pauses: measured
/// here, a 1 GiB first round filled on both cores paused a workload that dirties 32
/// MiB/s for 4 ms every 8 ms. (SCHED_IDLE copiers fared worse: a new thread of that
/// class still takes one whole tick, and one starved beside the workload holds its
/// piece of the copy back.)
pub fn beside_workload(bytes: u64) -> usize {
    workers_for(bytes).min(cores().saturating_sub(1)).max(1)
}

/// Runs `f` on every item, spread over `workers` threads, each with its own state made
/// by `init`. Stops at the first error and returns it.
pub fn for_each<T, S, E>(
    items: &[T],
    workers: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &T) -> Result<(), E> + Sync,
) -> Result<(), E>
where
    T: Sync,
    E: Send,
{
    if workers <= 1 || items.len() <= 1 {
        let mut s = init();
        return items.iter().try_for_each(|it| f(&mut s, it));
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(items.len()) {
            scope.spawn(|| {
                let mut s = init();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(it) = items.get(i) else { break };
                    if let Err(e) = f(&mut s, it) {
                        stop.store(true, Ordering::Relaxed);
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_every_item_once_and_stops_on_error() {
        let items: Vec<u64> = (0..1000).collect();
        let sum = AtomicUsize::new(0);
        for_each(
            &items,
            3,
            || (),
            |_, &i| {
                sum.fetch_add(i as usize, Ordering::Relaxed);
                Ok::<(), ()>(())
            },
        )
        .unwrap();
        assert_eq!(sum.into_inner(), 999 * 1000 / 2);
        let r = for_each(
            &items,
            3,
            || (),
            |_, &i| if i == 500 { Err(i) } else { Ok(()) },
        );
        assert_eq!(r, Err(500));
    }
}
