#![forbid(unsafe_code)]
//! The pause a TCP peer sees while its service is checkpointed and restored in place:
//! an echo service (`mcr demo-workload --echo-conns N`) with N established
//! connections, every one of them kept busy by a client that sends a numbered message
//! and waits for its echo, then the next. `mcr checkpoint --tcp-established` kills the
//! service, `mcr restore --tcp-established` brings it back; the figure is the longest
//! wait any client had for an echo, and every echo is checked.
//!
//! `cargo bench -p mcr-bench --bench tcp_pause` (`TCP_PAUSE_STEPS=1`: each command's
//! steps, from its --json report, on stderr)

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use mcr_bench::{image_root, kill_tree, mcr_bin};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNS: [usize; 2] = [1, 100];

/// What the clients saw: round trips per connection, and the longest wait.
#[derive(Default)]
struct Seen {
    trips: Vec<u64>,
    worst: Duration,
    error: Option<String>,
}

/// Drives every connection from one thread until `stop`.
fn drive(mut conns: Vec<TcpStream>, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let n = conns.len();
    let mut next = vec![0u64; n];
    let mut sent_at = vec![Instant::now(); n];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); n];
    let fail = |e: String| seen.lock().expect("seen").error = Some(e);
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_nonblocking(true).expect("nonblocking");
        c.set_nodelay(true).expect("nodelay");
        if let Err(e) = c.write_all(&0u64.to_be_bytes()) {
            return fail(format!("conn {i}: send 0: {e}"));
        }
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<PollFd> = conns
            .iter()
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, PollTimeout::from(100u16)).is_err() {
            continue;
        }
        let ready: Vec<usize> = (0..n)
            .filter(|&i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut s = seen.lock().expect("seen");
        for i in ready {
            match conns[i].read(&mut buf) {
                Ok(0) => return s.error = Some(format!("conn {i}: closed by the service")),
                Ok(k) => got[i].extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return s.error = Some(format!("conn {i}: {e}")),
            }
            while got[i].len() >= 8 {
                let v = u64::from_be_bytes(got[i][..8].try_into().expect("8"));
                got[i].drain(..8);
                if v != next[i] {
                    return s.error = Some(format!("conn {i}: echo {} came as {v}", next[i]));
                }
                s.worst = s.worst.max(sent_at[i].elapsed());
                s.trips[i] += 1;
                next[i] += 1;
                sent_at[i] = Instant::now();
                if let Err(e) = conns[i].write_all(&next[i].to_be_bytes()) {
                    return s.error = Some(format!("conn {i}: send {}: {e}", next[i]));
                }
            }
        }
    }
}

/// Waits until every connection made `more` round trips past `from`.
fn wait_trips(seen: &Mutex<Seen>, from: &[u64], more: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        {
            let s = seen.lock().expect("seen");
            if let Some(e) = &s.error {
                panic!("a client failed: {e}");
            }
            if s.trips.iter().zip(from).all(|(t, f)| *t >= f + more) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the clients stopped making progress"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs mcr with no stdio to speak of: a shell job restored takes mcr's own, and
/// would keep a pipe of ours open for good (its report goes to a file).
fn mcr(args: &[&str]) {
    let steps = std::env::var_os("TCP_PAUSE_STEPS").is_some();
    let report = tempfile::NamedTempFile::new().expect("a report file");
    let mut cmd = Command::new(mcr_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if steps {
        cmd.arg("--json")
            .stdout(report.reopen().expect("the report file"));
    }
    let t = Instant::now();
    let st = cmd.status().expect("running mcr");
    let wall = t.elapsed();
    assert!(st.success(), "mcr {} failed", args.join(" "));
    if steps {
        let json = std::fs::read_to_string(report.path()).unwrap_or_default();
        eprintln!(
            "mcr {} ({wall:?} from spawn to exit): {}",
            args[0],
            json.trim()
        );
    }
}

/// One checkpoint and restore in place of a service with `n` busy connections; the
/// longest wait any client had.
fn pause_once(n: usize, img: &std::path::Path) -> Duration {
    let mut service = Command::new(mcr_bin())
        .args(["demo-workload", "--echo-conns", &n.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the echo service");
    let mut line = String::new();
    BufReader::new(service.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("reading PORT");
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .expect("PORT n");
    let conns: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connecting"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen {
        trips: vec![0; n],
        ..Seen::default()
    }));
    let driver = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || drive(conns, stop, seen))
    };
    wait_trips(&seen, &vec![0; n], 20);
    // Only the move counts: the wait before it was the warm-up's.
    let before = {
        let mut s = seen.lock().expect("seen");
        s.worst = Duration::ZERO;
        s.trips.clone()
    };
    let pid = service.id().to_string();
    let dir = img.to_str().expect("utf-8");
    mcr(&[
        "checkpoint",
        "-t",
        &pid,
        "-D",
        dir,
        "--shell-job",
        "--tcp-established",
    ]);
    let _ = service.wait();
    let pidfile = img.with_extension("pid");
    let pf = pidfile.to_str().expect("utf-8");
    mcr(&[
        "restore",
        "-D",
        dir,
        "--shell-job",
        "--tcp-established",
        "-d",
        "--pidfile",
        pf,
    ]);
    wait_trips(&seen, &before, 20);
    let worst = seen.lock().expect("seen").worst;
    if std::env::var_os("TCP_PAUSE_STEPS").is_some() {
        eprintln!("longest wait for an echo: {worst:?}");
    }
    stop.store(true, Ordering::Relaxed);
    driver.join().expect("the clients");
    let restored: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("a pid");
    kill_tree(restored);
    let _ = std::fs::remove_dir_all(img);
    let _ = std::fs::remove_file(&pidfile);
    worst
}

fn pauses(c: &mut Criterion) {
    // The restored service is orphaned by mcr restore -d: ours to reap.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    // Cargo's jobserver pipe would be the service's too, and refused as outside it.
    kext_shim::procfs::cloexec_inherited_fds().expect("marking inherited fds close-on-exec");
    let dir = tempfile::tempdir_in(image_root()).expect("tempdir");
    let mut g = c.benchmark_group("tcp_pause");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(100));
    for n in CONNS {
        g.bench_function(format!("{n}_conns_client_pause"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|i| pause_once(n, &dir.path().join(format!("img{n}_{i}"))))
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pauses);
criterion_main!(benches);
