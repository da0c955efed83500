//! `mcr demo`: the main job on a built-in default. Starts a sample workload that keeps
//! writing its memory, migrates it live to an `mcr receive` on this host, and reports
//! the rounds, the blackout's parts and what the workload verified and measured.

use mcr::migrate::local::{line_starting, LocalDestination};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

const PAGE_WORDS: usize = 512;

fn word(page: usize, gen: u32, i: usize) -> u64 {
    let x = (page as u64) << 32 | gen as u64;
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// The sample workload: rewrites pages of `mib` MiB in a pseudo-random order, checks
/// stdin between batches, and on `CHECK` verifies every page and reports the longest
/// pause it saw between two batches (its blackout), on the wall clock.
/// A TCP echo service for benchmarks: listens on 127.0.0.1, prints `PORT <n>`, accepts
/// `conns` connections and echoes on all of them until killed.
pub fn echo_service(conns: usize) -> ExitCode {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let run = || -> std::io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        println!("PORT {}", l.local_addr()?.port());
        std::io::stdout().flush()?;
        let mut socks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            socks.push(s);
        }
        let mut buf = [0u8; 4096];
        loop {
            let mut fds: Vec<nix::poll::PollFd> = socks
                .iter()
                .map(|s| nix::poll::PollFd::new(s.as_fd(), nix::poll::PollFlags::POLLIN))
                .collect();
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<usize> = fds
                .iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            for i in ready {
                let n = socks[i].read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                socks[i].write_all(&buf[..n])?;
            }
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo service: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn workload(
    mib: usize,
    procs: usize,
    threads: usize,
    child: bool,
    dirty_mib_s: Option<f64>,
) -> ExitCode {
    // The rest of the tree: children that only keep writing (for benchmarks of trees).
    let mut kids = Vec::new();
    if !child {
        let me = std::env::current_exe().ok();
        for _ in 1..procs {
            let Some(exe) = me.as_ref() else { break };
            let spawned = std::process::Command::new(exe)
                .args([
                    "demo-workload",
                    "--child",
                    "--mib",
                    &mib.to_string(),
                    "--threads",
                    &threads.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match spawned {
                Ok(c) => kids.push(c),
                Err(_) => return ExitCode::from(1),
            }
        }
    }
    // Threads beyond the first own a share each and rewrite it forever.
    let share = mib / threads.max(1);
    for t in 1..threads.max(1) {
        std::thread::spawn(move || {
            let mut mem = vec![0u64; (share.max(1) << 20) / 8];
            let mut x = 0x9e37_79b9u64 + t as u64;
            loop {
                for chunk in mem.chunks_mut(PAGE_WORDS) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    chunk.fill(x);
                }
            }
        });
    }
    if child {
        let mut mem = vec![0u64; (share.max(1) << 20) / 8];
        let mut x = 1u64;
        loop {
            for chunk in mem.chunks_mut(PAGE_WORDS) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                chunk.fill(x);
            }
        }
    }
    let code = verified_workload(share.max(1), dirty_mib_s);
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    code
}

/// The demo's own process: writes `mib` MiB (at `dirty_mib_s`, or as fast as it can)
/// and verifies it on CHECK. Its loop reads both clocks each turn; the longest gap
/// between two turns on either is its blackout (a restore into a time namespace could
/// hide a pause from the monotonic clock, a clock step could fake one on the other).
fn verified_workload(mib: usize, dirty_mib_s: Option<f64>) -> ExitCode {
    let pages = mib.max(1) * 256;
    let mut mem = vec![0u64; pages * PAGE_WORDS];
    let mut gens = vec![0u32; pages];
    for p in 0..pages {
        for i in 0..PAGE_WORDS {
            mem[p * PAGE_WORDS + i] = word(p, 0, i);
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    let stdin = std::io::stdin();
    let (mut x, mut iterations) = (0x2545_f491_4f6c_dd1du64, 0u64);
    let (mut gap_rt, mut gap_mono) = (Duration::ZERO, Duration::ZERO);
    // When the longest of them ended, on the wall clock: to set beside a migration's.
    let mut gap_ended = SystemTime::UNIX_EPOCH;
    let (mut last_rt, mut last_mono) = (SystemTime::now(), Instant::now());
    // The longest gap once the host's steal is taken out of it, and when it ended.
    let (mut own_gap, mut own_gap_ended) = (Duration::ZERO, SystemTime::UNIX_EPOCH);
    let mut last_turn = Turn::now();
    // Pages a second, and where the paced writes stand.
    let rate = dirty_mib_s.map(|r| r * 256.0);
    let (start, mut written) = (Instant::now(), 0f64);
    loop {
        let batch = match rate {
            None => 64,
            Some(r) => {
                let due = r * start.elapsed().as_secs_f64();
                // Behind by more than a millisecond's worth (after a pause): drop it,
                // catching up would be a pause of its own.
                if due - written > r / 1000.0 + 1.0 {
                    written = due - r / 1000.0;
                }
                let n = (due - written).floor().max(0.0);
                written += n;
                n as usize
            }
        };
        for _ in 0..batch {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x % pages as u64) as usize;
            gens[p] += 1;
            for i in 0..PAGE_WORDS {
                mem[p * PAGE_WORDS + i] = word(p, gens[p], i);
            }
            iterations += 1;
        }
        let (rt, mono) = (SystemTime::now(), Instant::now());
        let gap = rt
            .duration_since(last_rt)
            .unwrap_or_default()
            .max(mono - last_mono);
        if gap > gap_rt.max(gap_mono) {
            gap_ended = rt;
        }
        let turn = Turn::now();
        let own = turn.own_part_of(&last_turn, gap);
        if own > own_gap {
            (own_gap, own_gap_ended) = (own, rt);
        }
        last_turn = turn;
        gap_rt = gap_rt.max(rt.duration_since(last_rt).unwrap_or_default());
        gap_mono = gap_mono.max(mono - last_mono);
        (last_rt, last_mono) = (rt, mono);
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            break;
        }
    }
    let mut line = String::new();
    let _ = stdin.lock().read_line(&mut line);
    let bad = (0..pages)
        .filter(|&p| (0..PAGE_WORDS).any(|i| mem[p * PAGE_WORDS + i] != word(p, gens[p], i)))
        .count();
    let verdict = if bad == 0 { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "{verdict} {pages} pages verified ({bad} wrong), {iterations} page writes, longest pause {:.2} ms (realtime {:.2} ms, monotonic {:.2} ms), ended at {} ms since the epoch; without the host's steal {:.2} ms, ended at {} ms",
        gap_rt.max(gap_mono).as_secs_f64() * 1e3,
        gap_rt.as_secs_f64() * 1e3,
        gap_mono.as_secs_f64() * 1e3,
        epoch_ms(gap_ended),
        own_gap.as_secs_f64() * 1e3,
        epoch_ms(own_gap_ended),
    );
    let _ = out.flush();
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// What the loop's thread knows of itself at one turn: the time it has run (its CPU
/// clock) and how often it was switched out. On this KVM guest the kernel accounts the
/// host's steal (the vCPU not run by the host) out of a task's run time, so a gap in
/// which the thread was never switched out, yet ran for less than the gap, lost the
/// rest to the host: no process of this VM, mcr included, had the CPU. Every other gap
/// counts whole (a freeze, the blackout, a wait for the CPU or for a lock, a fault that
/// ran long), and so does one across a restore, where both counters start again.
struct Turn {
    cpu: Option<Duration>,
    switches: Option<i64>,
}

impl Turn {
    fn now() -> Turn {
        use nix::sys::resource::{getrusage, UsageWho};
        use nix::time::{clock_gettime, ClockId};
        Turn {
            cpu: clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
                .ok()
                .map(Duration::from),
            switches: getrusage(UsageWho::RUSAGE_THREAD)
                .ok()
                .map(|u| u.voluntary_context_switches() + u.involuntary_context_switches()),
        }
    }

    /// The part of `gap`, from `before` to this turn, that was not the host's.
    fn own_part_of(&self, before: &Turn, gap: Duration) -> Duration {
        match (before.cpu, self.cpu, before.switches, self.switches) {
            (Some(c0), Some(c1), Some(s0), Some(s1)) if s1 == s0 && c1 >= c0 => gap.min(c1 - c0),
            _ => gap,
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub fn run(mib: usize, dirty_mib_s: f64) -> ExitCode {
    match demo(mib, dirty_mib_s) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mcr demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn demo(mib: usize, dirty_mib_s: f64) -> Result<bool, Box<dyn std::error::Error>> {
    kext_shim::procfs::cloexec_inherited_fds()?;
    // The moved workload's pid namespace init is re-parented to us when `mcr receive`
    // exits: we reap it.
    nix::sys::prctl::set_child_subreaper(true)?;
    let me = std::env::current_exe()?;
    println!(
        "mcr demo: live-migrate a workload that keeps {mib} MiB and rewrites {dirty_mib_s} MiB/s of it"
    );
    let t = Instant::now();
    let mut child = Command::new(&me)
        .args(["demo-workload", "--mib", &mib.to_string()])
        .args(["--dirty-mib-s", &dirty_mib_s.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    line_starting(&mut out, "READY")?;
    println!("  workload pid {pid} ready in {}", ms(t.elapsed()));

    // The destination: another mcr, restoring into a pid namespace of its own (the
    // workload's pid is still taken here until the move commits).
    let dest = LocalDestination::start(&me)?;
    println!(
        "  destination: mcr receive on {}, into a new pid namespace",
        dest.addr
    );

    let r = mcr::migrate::migrate(&mcr::migrate::MigrateOptions {
        pid,
        to: transport::Addr::parse(&dest.addr)?,
        shell_job: true,
        max_blackout: Duration::from_millis(20),
        max_rounds: 8,
        freeze_cgroup: None,
        staging: None,
        tcp_established: false,
        at_ready: None,
        post_copy: false,
        copy_pages: false,
    })?;
    child.wait()?;
    for (i, x) in r.rounds.iter().enumerate() {
        println!(
            "  pre-copy round {i}: {} pages ({:.1} MiB) in {} while it ran (frozen {})",
            x.pages,
            x.bytes as f64 / (1 << 20) as f64,
            ms(x.dump + x.send),
            ms(x.frozen)
        );
    }
    println!(
        "  blackout: {} pages moved with the rest of its state: freeze and dump {}, transfer {}, restore there {}, original killed {}",
        r.final_pages,
        ms(r.freeze_and_dump),
        ms(r.transfer),
        ms(r.restore),
        ms(r.commit)
    );
    let moved = dest.finish()?;
    println!(
        "  workload pid {pid} now runs as pid {} (pid {pid} in its namespace); migration took {}",
        moved.pid,
        ms(r.total)
    );

    let (verdict, code) = moved.check()?;
    println!("  workload says: {verdict}");
    if let Some(p) = verdict.split("longest pause ").nth(1) {
        println!("  blackout the workload saw (longest pause of its clock loop): {p}");
    }
    let ok = verdict.starts_with("PASS") && code == Some(0);
    println!("mcr demo: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(cpu_ms: u64, switches: i64) -> Turn {
        Turn {
            cpu: Some(Duration::from_millis(cpu_ms)),
            switches: Some(switches),
        }
    }

    #[test]
    fn only_a_gap_never_switched_out_loses_the_hosts_part() {
        let gap = Duration::from_millis(30);
        // Ran 2 ms of 30 and never left the CPU: the host had it.
        assert_eq!(
            turn(12, 4).own_part_of(&turn(10, 4), gap),
            Duration::from_millis(2)
        );
        // Switched out (frozen, waiting for the CPU or a lock): all of it counts.
        assert_eq!(turn(12, 5).own_part_of(&turn(10, 4), gap), gap);
        // Across a restore both counters start again: all of it counts.
        assert_eq!(turn(1, 0).own_part_of(&turn(10, 4), gap), gap);
        // Ran the whole gap (a long fault, say): all of it.
        assert_eq!(turn(50, 4).own_part_of(&turn(10, 4), gap), gap);
        let unknown = Turn {
            cpu: None,
            switches: None,
        };
        assert_eq!(unknown.own_part_of(&turn(10, 4), gap), gap);
    }

    #[test]
    fn the_threads_own_clock_advances_while_it_runs() {
        let a = Turn::now();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = Turn::now();
        assert!(b.cpu.unwrap() > a.cpu.unwrap());
        assert!(b.switches.unwrap() >= a.switches.unwrap());
    }
}
