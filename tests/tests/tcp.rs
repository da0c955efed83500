#![forbid(unsafe_code)]
//! Established TCP connections across checkpoint and restore (--tcp-established): the
//! peer, outside the dumped tree, sees a pause and nothing else.

use mcr_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts `tcpecho ARGS` and connects to it; returns it once it is READY.
fn echo_service(g: &mut Guard, args: &[&str]) -> (Proc, TcpStream) {
    let mut p = Proc::start_until(g, &workload_bin("tcpecho"), args, None, None);
    let line = p.lines.expect_prefix("PORT");
    let port: u16 = line[5..].trim().parse().expect("a port number");
    let host = if args.get(1) == Some(&"6") {
        "::1"
    } else {
        "127.0.0.1"
    };
    let c = TcpStream::connect((host, port)).expect("connecting to the service");
    p.lines.expect_prefix("READY");
    (p, c)
}

fn tables() -> Vec<String> {
    let out = std::process::Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("mcr_"))
        .map(str::to_string)
        .collect()
}

/// A client that sends numbered 8-byte messages and checks each echo, without pause,
/// until told to stop; it reports round trips and the longest wait for an echo.
struct Client {
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<(Duration, TcpStream), String>>,
}

impl Client {
    fn start(mut c: TcpStream) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let trips = Arc::new(AtomicU64::new(0));
        let (s, t) = (stop.clone(), trips.clone());
        let thread = std::thread::spawn(move || {
            c.set_read_timeout(Some(LINE_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut worst = Duration::ZERO;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                c.write_all(&i.to_be_bytes())
                    .map_err(|e| format!("send {i}: {e}"))?;
                let mut b = [0u8; 8];
                c.read_exact(&mut b).map_err(|e| format!("echo {i}: {e}"))?;
                if u64::from_be_bytes(b) != i {
                    return Err(format!("echo {i} came back as {}", u64::from_be_bytes(b)));
                }
                worst = worst.max(t0.elapsed());
                i += 1;
                t.store(i, Ordering::Relaxed);
            }
            Ok((worst, c))
        });
        Client {
            stop,
            trips,
            thread,
        }
    }

    /// Waits until `n` more round trips were made.
    fn wait_trips(self, n: u64) -> Self {
        let target = self.trips.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + LINE_TIMEOUT;
        while self.trips.load(Ordering::Relaxed) < target {
            if self.thread.is_finished() {
                let why = self.thread.join().expect("client thread").err();
                panic!("the client stopped: {why:?}");
            }
            assert!(Instant::now() < deadline, "the client made no progress");
            std::thread::yield_now();
        }
        self
    }

    /// Stops it; the connection stays open (a close is an EOF for the service).
    fn finish(self) -> (Duration, TcpStream) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("client thread")
            .expect("the client saw an error")
    }
}

#[test]
fn an_echo_client_outside_the_tree_keeps_talking_across_checkpoint_and_restore() {
    echo_across_the_move(&["0"]);
}

#[test]
fn the_same_over_ipv6() {
    echo_across_the_move(&["0", "6"]);
}

fn echo_across_the_move(args: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (p, c) = echo_service(&mut g, args);
    let client = Client::start(c);
    let client = client.wait_trips(100);
    // The client sends throughout: its packets are dropped until the restore.
    let img = tmp.path().join("img");
    let mut r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    let client = client.wait_trips(100);
    let (worst, _conn) = client.finish();
    eprintln!("longest wait for an echo across the move: {worst:?}");
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
    // The image's table held the connection until the restore, which removed it.
    let show = mcr(&["show", "--json", "-D", img.to_str().expect("utf-8")]);
    let json = String::from_utf8_lossy(&show.stdout);
    let name = json
        .split("\"net_lock\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the image names its table");
    assert!(
        !tables().contains(&format!("table inet {name}")),
        "{name} remains"
    );
}

#[test]
fn a_million_bytes_waiting_to_be_sent_arrive_after_the_move() {
    const BYTES: usize = 1 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    // The client reads nothing until after the restore: most of the megabyte sits in
    // the service's send queue, part of it never sent.
    let (p, mut c) = echo_service(&mut g, &[&BYTES.to_string()]);
    let img = tmp.path().join("img");
    let mut r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    c.set_read_timeout(Some(LINE_TIMEOUT)).expect("timeout");
    let mut got = vec![0u8; BYTES];
    c.read_exact(&mut got).expect("reading the megabyte");
    let bad = got
        .iter()
        .enumerate()
        .filter(|(i, &b)| b != (i % 251) as u8)
        .count();
    assert_eq!(bad, 0, "{bad} bytes of the megabyte differ");
    let client = Client::start(c);
    let client = client.wait_trips(10);
    let (_, _conn) = client.finish();
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}

#[test]
fn mcr_killed_mid_dump_leaves_the_connection_running_and_no_table_for_good() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut p, c) = echo_service(&mut g, &[]);
    let client = Client::start(c);
    let client = client.wait_trips(10);
    let img = tmp.path().join("img");
    let mut dump = std::process::Command::new(mcr_bin())
        .args(["checkpoint", "-t", &p.pid.to_string(), "-D"])
        .arg(&img)
        .args(["--shell-job", "--tcp-established"])
        .env("MCR_FAULT", "dump-stall-after-lock")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mcr checkpoint");
    // It has blocked the connection once its table is there.
    let table = format!("table inet mcr_dump_{}", dump.id());
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !tables().contains(&table) {
        assert!(
            Instant::now() < deadline,
            "mcr never blocked the connection"
        );
        std::thread::yield_now();
    }
    dump.kill().expect("SIGKILL mcr");
    dump.wait().expect("reaping mcr");
    // The workload runs on (ptrace let it go with its tracer), its connection blocked
    // by the table left behind, until the next mcr run removes it.
    let out = mcr(&["check"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("left by an mcr that died"));
    assert!(!tables().contains(&table), "{table} remains");
    let client = client.wait_trips(10);
    let (_, _conn) = client.finish();
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}
