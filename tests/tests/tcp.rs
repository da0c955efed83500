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
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the service");
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
    fn wait_trips(&self, n: u64) {
        let target = self.trips.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + LINE_TIMEOUT;
        while self.trips.load(Ordering::Relaxed) < target {
            assert!(!self.thread.is_finished(), "the client stopped");
            assert!(Instant::now() < deadline, "the client made no progress");
            std::thread::yield_now();
        }
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
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (p, c) = echo_service(&mut g, &[]);
    let client = Client::start(c);
    client.wait_trips(100);
    // The client sends throughout: its packets are dropped until the restore.
    let img = tmp.path().join("img");
    let mut r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    client.wait_trips(100);
    let (worst, _conn) = client.finish();
    eprintln!("longest wait for an echo across the move: {worst:?}");
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
    assert!(tables().is_empty(), "tables of ours remain: {:?}", tables());
}
