//! `mcr demo`: the main job on a built-in default. Starts a sample workload that keeps
//! writing its memory, checkpoints it, kills it, restores it, and reports what the
//! workload verified and how long each step took.

use mcr::dump::{AfterDump, CheckpointOptions};
use mcr::image::Compression;
use mcr::restore::RestoreOptions;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
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

pub fn workload(mib: usize, procs: usize, threads: usize, child: bool) -> ExitCode {
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
    let code = verified_workload(share.max(1));
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    code
}

/// The demo's own process: writes `mib` MiB and verifies it on CHECK.
fn verified_workload(mib: usize) -> ExitCode {
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
    let (mut x, mut iterations, mut max_gap) = (0x2545_f491_4f6c_dd1du64, 0u64, Duration::ZERO);
    let mut last = SystemTime::now();
    loop {
        for _ in 0..64 {
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
        let now = SystemTime::now();
        max_gap = max_gap.max(now.duration_since(last).unwrap_or_default());
        last = now;
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
        "{verdict} {pages} pages verified ({bad} wrong), {iterations} page writes, longest pause {:.1} ms",
        max_gap.as_secs_f64() * 1e3
    );
    let _ = out.flush();
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn steps(s: &[(&'static str, Duration)]) -> String {
    s.iter()
        .filter(|(n, _)| *n != "total")
        .map(|(n, d)| format!("{n} {}", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn total(s: &[(&'static str, Duration)]) -> Duration {
    s.iter()
        .find(|s| s.0 == "total")
        .map(|s| s.1)
        .unwrap_or_default()
}

pub fn run(mib: usize) -> ExitCode {
    match demo(mib) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mcr demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn demo(mib: usize) -> Result<bool, Box<dyn std::error::Error>> {
    kext_shim::procfs::cloexec_inherited_fds()?;
    // The restored workload is our child: no reparenting needed to reap it.
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("image");
    println!("mcr demo: checkpoint, kill and restore a workload that keeps writing {mib} MiB");
    let t = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["demo-workload", "--mib", &mib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "READY" {
        return Err(format!("workload said {line:?}").into());
    }
    println!("  workload pid {pid} ready in {}", ms(t.elapsed()));

    let ck = mcr::dump::checkpoint(&CheckpointOptions {
        pid,
        dir: dir.clone(),
        after: AfterDump::Kill,
        shell_job: true,
        compression: Compression::FAST,
        freeze_cgroup: None,
        tcp_established: false,
        prev: None,
    })?;
    child.wait()?;
    println!(
        "  checkpoint: {} pages ({:.1} MiB, {:.1} MiB stored) in {} [{}]; pid {pid} killed",
        ck.stats.pages,
        ck.stats.raw_bytes as f64 / (1 << 20) as f64,
        ck.stats.stored_bytes as f64 / (1 << 20) as f64,
        ms(total(&ck.steps)),
        steps(&ck.steps)
    );

    let (in_r, in_w) = nix::unistd::pipe()?;
    let (out_r, out_w) = nix::unistd::pipe()?;
    let mut opts = RestoreOptions::new(&dir);
    opts.shell_job = true;
    opts.stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), 2];
    let r = mcr::restore::restore(&opts)?;
    drop((in_r, out_w));
    println!(
        "  restore: pid {} back with {} pages in {} [{}]",
        r.pid,
        r.pages,
        ms(total(&r.steps)),
        steps(&r.steps)
    );

    let mut w = std::fs::File::from(in_w);
    writeln!(w, "CHECK")?;
    let mut verdict = String::new();
    BufReader::new(std::fs::File::from(out_r)).read_line(&mut verdict)?;
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r.child), None)?;
    println!("  workload says: {}", verdict.trim());
    if let Some(p) = verdict.split("longest pause ").nth(1) {
        println!(
            "  blackout (longest pause the workload saw, wall clock): {}",
            p.trim()
        );
    }
    let ok =
        verdict.starts_with("PASS") && matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0));
    println!("mcr demo: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
