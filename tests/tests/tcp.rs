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

fn ruleset() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let name = image_table(&img);
    assert!(
        !tables().contains(&format!("table inet {name}")),
        "{name} remains"
    );
    assert_eq!(find_holder(&name), None, "the holder of {name} remains");
}

/// Many busy connections of one service (fds installed and epoll refilled in batches
/// at restore): every client checks every echo on its own connection across the move.
#[test]
fn thirty_two_busy_connections_all_keep_talking_across_checkpoint_and_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut p = Proc::start_until(
        &mut g,
        &mcr_bin(),
        &["demo-workload", "--echo-conns", "32"],
        None,
        None,
    );
    let port: u16 = p.lines.expect_prefix("PORT")[5..]
        .trim()
        .parse()
        .expect("a port");
    // The service starts echoing once all have connected.
    let conns: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connecting"))
        .collect();
    let clients: Vec<Client> = conns.into_iter().map(Client::start).collect();
    let clients: Vec<Client> = clients.into_iter().map(|c| c.wait_trips(10)).collect();
    let img = tmp.path().join("img");
    let _r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    // Every client moves on first: a connection closed makes the service end.
    let clients: Vec<Client> = clients.into_iter().map(|c| c.wait_trips(10)).collect();
    // finish() fails the test if an echo ever came wrong.
    let _conns: Vec<_> = clients.into_iter().map(Client::finish).collect();
}

/// The table an image's connections are stopped by; the image names its holder too.
fn image_table(img: &std::path::Path) -> String {
    let show = mcr(&["show", "--json", "-D", img.to_str().expect("utf-8")]);
    let json = String::from_utf8_lossy(&show.stdout);
    let lock = json
        .split("\"net_lock\":")
        .nth(1)
        .expect("the image has a lock");
    assert!(lock.contains("\"holder_pid\":"), "no packet holder: {lock}");
    lock.split("\"table\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the image names its table")
        .to_string()
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

/// Starts a dump that stalls once it has stopped the connection on the wire; returns
/// it and the name of its table.
// Returned to the caller, which kills and reaps it.
#[allow(clippy::zombie_processes)]
fn stalled_dump(p: &Proc, img: &std::path::Path) -> (std::process::Child, String) {
    let mut dump = std::process::Command::new(mcr_bin())
        .args(["checkpoint", "-t", &p.pid.to_string(), "-D"])
        .arg(img)
        .args(["--shell-job", "--tcp-established"])
        .env("MCR_FAULT", "dump-stall-after-lock")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mcr checkpoint");
    // It has stopped the connection once its table is there, marked as its dump's.
    let mark = format!("chain dump_{}", dump.id());
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        if let Some(t) = ruleset().split("table inet ").find(|t| t.contains(&mark)) {
            let name = t.split_whitespace().next().expect("a name").to_string();
            return (dump, name);
        }
        if Instant::now() > deadline {
            let _ = dump.kill();
            let _ = dump.wait();
            panic!("mcr never stopped the connection");
        }
        std::thread::yield_now();
    }
}

/// The pid of the process holding the packets of `table`: the dump makes the table,
/// then starts it.
fn holder_of(table: &str) -> i32 {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        if let Some(pid) = find_holder(table) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no process holds the packets of {table}"
        );
        std::thread::yield_now();
    }
}

fn find_holder(table: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"hold-packets"[..]) && args.contains(&table.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn mcr_and_its_packet_holder_killed_mid_dump_leave_the_connection_running_and_no_table_for_good() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut p, c) = echo_service(&mut g, &[]);
    let client = Client::start(c);
    let client = client.wait_trips(10);
    let (mut dump, table) = stalled_dump(&p, &tmp.path().join("img"));
    // The worst case: both die at once, and nobody lifts the lock.
    let holder = holder_of(&table);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder),
        nix::sys::signal::SIGKILL,
    )
    .expect("SIGKILL the holder");
    dump.kill().expect("SIGKILL mcr");
    dump.wait().expect("reaping mcr");
    // The workload runs on (ptrace let it go with its tracer), its connection stopped
    // by the table left behind, until the next mcr run removes it (this one, or one of
    // a test running beside this one, which says so instead).
    let out = mcr(&["check"]);
    assert!(out.status.success());
    assert!(
        !tables().contains(&format!("table inet {table}")),
        "{table} remains"
    );
    let client = client.wait_trips(10);
    let (_, _conn) = client.finish();
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn mcr_killed_mid_dump_leaves_its_holder_to_deliver_the_packets_and_lift_the_lock() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut p, c) = echo_service(&mut g, &[]);
    let client = Client::start(c);
    let client = client.wait_trips(10);
    let (mut dump, table) = stalled_dump(&p, &tmp.path().join("img"));
    let holder = holder_of(&table);
    dump.kill().expect("SIGKILL mcr");
    dump.wait().expect("reaping mcr");
    // The holder sees its dump gone: it delivers what the client sent meanwhile to
    // the running workload, removes the table and ends, with no mcr run needed.
    let pidfd = kext_shim::pidfd::pidfd_open(nix::unistd::Pid::from_raw(holder))
        .expect("pidfd of the holder");
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&pidfd),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).expect("poll");
    assert_eq!(n, 1, "the holder did not end");
    assert!(
        !tables().contains(&format!("table inet {table}")),
        "{table} remains"
    );
    let client = client.wait_trips(10);
    let (_, _conn) = client.finish();
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

/// Three network namespaces: the service's (A), the surrogate (B) and the client's
/// (C), where a bridge joins a veth to each of the others. Deleted when dropped.
struct Net {
    names: [String; 3],
    /// Tells its namespaces and links from those of another test of this process.
    id: u32,
}

static NETS: AtomicU64 = AtomicU64::new(0);

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("running ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

const SERVICE: &str = "10.77.0.10";

impl Net {
    fn new() -> Net {
        let id = (std::process::id() % 10_000) * 10 + NETS.fetch_add(1, Ordering::Relaxed) as u32;
        let names = [
            format!("mcra{id}"),
            format!("mcrb{id}"),
            format!("mcrc{id}"),
        ];
        let [a, b, c] = &names;
        for n in &names {
            ip(&["netns", "add", n]);
        }
        let net = Net {
            names: names.clone(),
            id,
        };
        ip(&["-n", c, "link", "add", "br0", "type", "bridge"]);
        for (ns, end) in [(a, "a"), (b, "b")] {
            let (inner, outer) = (format!("v{end}{id}"), format!("w{end}{id}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["link", "set", &outer, "netns", c]);
            ip(&["-n", c, "link", "set", &outer, "master", "br0", "up"]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", c, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        // The surrogate has an address of its own, as a partition would: its routes are
        // there before the service address moves in.
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            "10.77.0.11/24",
            "dev",
            &format!("vb{id}"),
        ]);
        ip(&["-n", c, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            &format!("{SERVICE}/24"),
            "dev",
            &format!("va{id}"),
        ]);
        net
    }

    /// Checkpoints `p` from inside A (where its tree lives), then moves the service
    /// address to B; the `nsenter` prefix of A, for the restore.
    fn checkpoint_in_a(&self, p: &mut Proc, img: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let enter_a = self.enter(0);
        let out = std::process::Command::new(&enter_a[0])
            .args(&enter_a[1..])
            .arg(mcr_bin())
            .args(["checkpoint", "-t", &p.pid.to_string(), "-D"])
            .arg(img)
            .arg("--shell-job")
            .args(extra)
            .output()
            .expect("mcr checkpoint");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(p.wait(), 128 + libc::SIGKILL);
        self.move_address();
        enter_a
    }

    fn path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.names[i])
    }

    /// `nsenter --net=...` for namespace `i`.
    fn enter(&self, i: usize) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path(i))]
    }

    /// The shell commands of [`move_address`](Self::move_address).
    fn move_address_commands(&self) -> String {
        let (id, [a, b, c]) = (self.id, &self.names);
        format!(
            "ip -n {a} addr del {SERVICE}/24 dev va{id} && ip -n {b} addr add {SERVICE}/24 dev vb{id} && ip -n {c} neigh flush dev br0"
        )
    }

    /// Moves the service address from A to B, and makes the client ask who has it.
    fn move_address(&self) {
        let id = self.id;
        let addr = format!("{SERVICE}/24");
        ip(&[
            "-n",
            &self.names[0],
            "addr",
            "del",
            &addr,
            "dev",
            &format!("va{id}"),
        ]);
        ip(&[
            "-n",
            &self.names[1],
            "addr",
            "add",
            &addr,
            "dev",
            &format!("vb{id}"),
        ]);
        ip(&["-n", &self.names[2], "neigh", "flush", "dev", "br0"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// tcpecho in A, its client in C (its socket made by a thread that joined C), talking
/// for `trips` echoes.
fn echo_in_a(g: &mut Guard, net: &Net, trips: u64) -> (Proc, Client) {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", net.path(0)))
        .arg(workload_bin("tcpecho"))
        .args(["0", SERVICE]);
    let mut p = Proc::spawn(g, cmd, None);
    let port: u16 = p.lines.expect_prefix("PORT")[5..]
        .trim()
        .parse()
        .expect("port");
    let c_ns = std::fs::File::open(net.path(2)).expect("netns C");
    let c = std::thread::spawn(move || {
        nix::sched::setns(c_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns C");
        TcpStream::connect((SERVICE, port)).expect("connecting from C")
    })
    .join()
    .expect("client thread");
    p.lines.expect_prefix("READY");
    (p, Client::start(c).wait_trips(trips))
}

fn nft_tables_in(net: &Net, i: usize) -> String {
    let mut cmd = net.enter(i);
    cmd.extend(["nft", "list", "tables"].map(String::from));
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_service_moves_to_another_network_namespace_and_its_client_keeps_talking() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new();
    let mut g = Guard::new();
    let (mut p, client) = echo_in_a(&mut g, &net, 100);

    // Checkpoint in A (where the tree lives), restore into B, the address moved.
    let img = tmp.path().join("img");
    let enter_a = net.checkpoint_in_a(&mut p, &img, &["--tcp-established"]);
    let prefix: Vec<&str> = enter_a.iter().map(String::as_str).collect();
    let b = net.path(1);
    let mut r = restore_via(&mut g, &prefix, &img, &["--tcp-established", "--netns", &b]);
    // /run/netns/B is a bind mount of the namespace's inode.
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&b).expect("B"));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/net", r.pid)).expect("its netns"),
        std::path::PathBuf::from(format!("net:[{ino}]")),
        "the restored service is not in B"
    );
    let client = client.wait_trips(100);
    let (worst, _conn) = client.finish();
    eprintln!("longest wait for an echo across the move between namespaces: {worst:?}");
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
    for i in 0..2 {
        let t = nft_tables_in(&net, i);
        assert!(
            !t.contains("mcr_"),
            "namespace {i} keeps tables of ours: {t}"
        );
    }
}

#[test]
fn a_restore_without_the_flag_is_refused_and_keeps_the_connection_blocked_for_a_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (p, c) = echo_service(&mut g, &["0"]);
    let client = Client::start(c).wait_trips(10);
    let img = tmp.path().join("img");
    checkpoint(p.pid, &img, &["--tcp-established"]);
    let mut p = p;
    p.wait();
    // Between the two, the connection stays stopped, and the client's packets held.
    let table = image_table(&img);
    let still_held = || {
        assert!(
            tables().contains(&format!("table inet {table}")),
            "{table} is gone before the restore"
        );
        assert!(
            find_holder(&table).is_some(),
            "the holder of {table} is gone"
        );
    };
    still_held();
    let out = mcr(&[
        "restore",
        "-D",
        img.to_str().expect("utf-8"),
        "--shell-job",
        "-d",
    ]);
    assert_fails(&out, 5, &["restore with --tcp-established"]);
    still_held();
    let mut r = restore(&mut g, &img, &["--tcp-established"]);
    let (_, _conn) = client.wait_trips(10).finish();
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}

/// Waits until a client thread counting in `trips` made `n` more, while it runs.
fn wait_for_trips<T>(trips: &AtomicU64, client: &std::thread::JoinHandle<T>, n: u64) {
    let target = trips.load(Ordering::Relaxed) + n;
    let deadline = Instant::now() + LINE_TIMEOUT;
    while trips.load(Ordering::Relaxed) < target {
        assert!(!client.is_finished(), "the client stopped");
        assert!(Instant::now() < deadline, "the client made no progress");
        std::thread::yield_now();
    }
}

/// A port nobody listens on now, for programs that cannot be told to pick one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Connects once `port` listens: the program binds it in its own time.
fn connect_when_listening(port: u16) -> TcpStream {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::yield_now();
            }
            Err(e) => panic!("nothing listens on {port}: {e}"),
        }
    }
}

#[test]
fn socat_relaying_to_cat_keeps_its_client_across_the_move() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let port = free_port();
    let listen = format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr");
    let p = Proc::start_until(
        &mut g,
        std::path::Path::new("socat"),
        &[&listen, "EXEC:cat"],
        None,
        None,
    );
    let c = connect_when_listening(port);
    // Echoes come back once socat has forked cat: the tree is whole.
    let client = Client::start(c).wait_trips(100);
    assert_eq!(tree_pids(p.pid).len(), 2, "socat and its cat");
    let img = tmp.path().join("img");
    let mut r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    let (worst, conn) = client.wait_trips(100).finish();
    eprintln!("socat: longest wait for an echo across the move: {worst:?}");
    // A close is an EOF for socat, which closes cat's input and ends as cat ends.
    drop(conn);
    assert_eq!(r.wait(), 0);
}

/// GETs `path` again and again over one keep-alive connection, checking each body,
/// until told to stop; the longest wait for a response.
fn http_client(
    mut c: TcpStream,
    path: String,
    body: Vec<u8>,
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicU64>,
) -> Result<Duration, String> {
    c.set_read_timeout(Some(LINE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut worst = Duration::ZERO;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        c.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut b = [0u8; 65536];
            let n = c.read(&mut b).map_err(|e| format!("response: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            buf.extend_from_slice(&b[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") || head.to_lowercase().contains("connection: close") {
            return Err(format!("unexpected response: {head}"));
        }
        while buf.len() < head_end + body.len() {
            let mut b = [0u8; 65536];
            let n = c.read(&mut b).map_err(|e| format!("body: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection mid-body".into());
            }
            buf.extend_from_slice(&b[..n]);
        }
        if buf[head_end..head_end + body.len()] != body[..] {
            return Err("a body came back different".into());
        }
        buf.drain(..head_end + body.len());
        worst = worst.max(t0.elapsed());
        trips.fetch_add(1, Ordering::Relaxed);
    }
    Ok(worst)
}

#[test]
fn python_http_server_keeps_a_keep_alive_client_across_the_move() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("site");
    std::fs::create_dir(&site).expect("site dir");
    let body: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.join("data.bin"), &body).expect("data.bin");
    let mut g = Guard::new();
    // Its request log would fill a pipe nobody reads: to /dev/null.
    let serve = format!(
        "exec python3 -u -m http.server -p HTTP/1.1 -b 127.0.0.1 -d {} 0 2>/dev/null",
        site.display()
    );
    let p = Proc::start_until(
        &mut g,
        std::path::Path::new("sh"),
        &["-c", &serve],
        None,
        Some("Serving HTTP"),
    );
    let port = listening_port(p.pid);
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let (stop, trips) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = {
        let (stop, trips, body) = (stop.clone(), trips.clone(), body.clone());
        std::thread::spawn(move || http_client(c, "/data.bin".into(), body, stop, trips))
    };
    let wait_for = |n: u64| wait_for_trips(&trips, &client, n);
    wait_for(20);
    let img = tmp.path().join("img");
    let mut r = round_trip(
        &mut g,
        p,
        &img,
        &["--tcp-established"],
        &["--tcp-established"],
    );
    wait_for(20);
    stop.store(true, Ordering::Relaxed);
    let worst = client
        .join()
        .expect("client thread")
        .expect("the client saw an error");
    eprintln!("http.server: longest wait for a response across the move: {worst:?}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), nix::sys::signal::SIGKILL);
    assert_eq!(r.wait(), 128 + libc::SIGKILL);
}

/// The TCP port `pid` listens on (IPv4).
fn listening_port(pid: i32) -> u16 {
    bound_port(pid, &["tcp"], Some("0A"))
}

/// A UDP service that reads nothing until told GO, then echoes what waits to whoever
/// sent it; after that, it echoes forever.
const PY_UDP_ECHO: &str = r#"
import socket, sys
fam = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print("PORT %d" % s.getsockname()[1], flush=True)
print("READY", flush=True)
if sys.stdin.readline().strip() == "GO":
    while True:
        d, a = s.recvfrom(65536)
        s.sendto(d, a)
"#;

fn udp_echo_queued_across_the_move(host: &str, family: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut p = Proc::start_until(
        &mut g,
        std::path::Path::new("python3"),
        &["-c", PY_UDP_ECHO, host, family],
        None,
        Some("PORT"),
    );
    p.lines.expect_prefix("READY");
    let port = listening_udp_port(p.pid);
    let c = std::net::UdpSocket::bind((host, 0)).expect("client socket");
    let sent: [&[u8]; 3] = [b"first", b"second datagram", b"3"];
    for d in sent {
        c.send_to(d, (host, port)).expect("sending");
    }
    // Queued, unread, when the service is dumped: they come back from their sender.
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    r.send("GO");
    c.set_read_timeout(Some(LINE_TIMEOUT)).expect("timeout");
    for d in sent {
        let mut b = [0u8; 64];
        let (n, from) = c.recv_from(&mut b).expect("an echo");
        assert_eq!(&b[..n], d, "echoed out of order or changed");
        assert_eq!(from.port(), port);
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), nix::sys::signal::SIGKILL);
    r.wait();
}

#[test]
fn udp_datagrams_waiting_to_be_read_come_back_from_their_senders() {
    udp_echo_queued_across_the_move("127.0.0.1", "4");
}

#[test]
fn udp_datagrams_waiting_come_back_over_ipv6_too() {
    udp_echo_queued_across_the_move("::1", "6");
}

/// The UDP port `pid` has bound (either family).
fn listening_udp_port(pid: i32) -> u16 {
    bound_port(pid, &["udp", "udp6"], None)
}

/// The port of the first socket of `pid` in its network namespace's tables
/// (/proc/PID/net/...), in `state` if given.
fn bound_port(pid: i32, tables: &[&str], state: Option<&str>) -> u16 {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .map(|s| s.trim_end_matches(']').to_string())
        })
        .collect();
    for t in tables {
        let table =
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).expect("a /proc/net table");
        for l in table.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && state.is_none_or(|s| f[3] == s) && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().expect("port");
                return u16::from_str_radix(port, 16).expect("hex port");
            }
        }
    }
    panic!("pid {pid} has no socket in {tables:?}");
}

#[test]
fn a_udp_service_moves_to_another_network_namespace_and_its_client_keeps_asking() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new();
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", net.path(0)))
        .args(["python3", "-c", PY_UDP_ECHO, SERVICE, "4"]);
    let mut p = Proc::spawn(&mut g, cmd, Some("PORT"));
    p.lines.expect_prefix("READY");
    p.send("GO");
    let port = listening_udp_port(p.pid);
    // The client in C asks with numbered requests, asking again after 20 ms without
    // an answer (UDP loses what the gap holds), and checks every answer.
    let c_ns = std::fs::File::open(net.path(2)).expect("netns C");
    let (stop, trips) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = {
        let (stop, trips) = (stop.clone(), trips.clone());
        std::thread::spawn(move || -> Result<Duration, String> {
            nix::sched::setns(c_ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let c = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            c.connect((SERVICE, port)).map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(Duration::from_millis(20)))
                .map_err(|e| e.to_string())?;
            let mut worst = Duration::ZERO;
            let mut i = 0u64;
            let began = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if began.elapsed() > LINE_TIMEOUT * 4 {
                    return Err("no end in sight".into());
                }
                let t0 = Instant::now();
                loop {
                    c.send(&i.to_be_bytes()).map_err(|e| e.to_string())?;
                    let mut b = [0u8; 8];
                    match c.recv(&mut b) {
                        Ok(8) if u64::from_be_bytes(b) == i => break,
                        // A late answer to an earlier request.
                        Ok(8) if u64::from_be_bytes(b) < i => continue,
                        Ok(n) => return Err(format!("answer to {i}: {n} bytes {b:?}")),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        // An ICMP error while the address moves.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(format!("answer to {i}: {e}")),
                    }
                }
                worst = worst.max(t0.elapsed());
                i += 1;
                trips.store(i, Ordering::Relaxed);
            }
            Ok(worst)
        })
    };
    let wait_for = |n: u64| wait_for_trips(&trips, &client, n);
    wait_for(100);
    let img = tmp.path().join("img");
    let enter_a = net.checkpoint_in_a(&mut p, &img, &[]);
    let prefix: Vec<&str> = enter_a.iter().map(String::as_str).collect();
    let mut r = restore_via(&mut g, &prefix, &img, &["--netns", &net.path(1)]);
    wait_for(100);
    stop.store(true, Ordering::Relaxed);
    let worst = client
        .join()
        .expect("client")
        .expect("the client saw an error");
    eprintln!("UDP: longest wait for an answer across the move between namespaces: {worst:?}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), nix::sys::signal::SIGKILL);
    r.wait();
}

/// Two half-closed connections: A, whose client closed its side after "bye" (CLOSE_WAIT
/// here), and B, on which we sent "hello" and closed our side (FIN_WAIT2 here).
const PY_HALF_CLOSED: &str = r#"
import socket, sys
l = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
l.bind((sys.argv[1], 0))
l.listen(4)
print("PORT %d" % l.getsockname()[1], flush=True)
a, _ = l.accept()
b, _ = l.accept()
b.sendall(b"hello")
b.shutdown(socket.SHUT_WR)
print("READY", flush=True)
sys.stdin.readline()
got_a = a.recv(100)
eof_a = a.recv(100)
a.sendall(b"ack")
a.close()
late = b.recv(100)
eof_b = b.recv(100)
try:
    b.send(b"x")
    epipe = False
except BrokenPipeError:
    epipe = True
ok = got_a == b"bye" and eof_a == b"" and late == b"late" and eof_b == b"" and epipe
print(("PASS" if ok else "FAIL") + " a=%r,%r b=%r,%r epipe=%s" % (got_a, eof_a, late, eof_b, epipe), flush=True)
"#;

/// The state (/proc/net/tcp{,6}) of our loopback socket bound to `local`.
fn tcp_state_of(local: std::net::SocketAddr) -> Option<String> {
    let (table, lo) = if local.is_ipv4() {
        ("/proc/net/tcp", "0100007F")
    } else {
        ("/proc/net/tcp6", "00000000000000000000000001000000")
    };
    let me = format!("{lo}:{:04X}", local.port());
    std::fs::read_to_string(table)
        .expect("a /proc/net/tcp table")
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[1] == me)
        .map(|f| f[3].clone())
}

fn wait_state(c: &TcpStream, state: &str) {
    let local = c.local_addr().expect("local address");
    let deadline = Instant::now() + LINE_TIMEOUT;
    while tcp_state_of(local).as_deref() != Some(state) {
        assert!(
            Instant::now() < deadline,
            "{local} never reached state {state}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn half_closed_connections_come_back_half_closed() {
    half_closed("127.0.0.1");
}

#[test]
fn half_closed_connections_come_back_half_closed_over_ipv6() {
    half_closed("::1");
}

fn half_closed(host: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut p = Proc::start_until(
        &mut g,
        std::path::Path::new("python3"),
        &["-c", PY_HALF_CLOSED, host],
        None,
        None,
    );
    let port: u16 = p.lines.expect_prefix("PORT")[5..]
        .trim()
        .parse()
        .expect("a port");
    let mut a = TcpStream::connect((host, port)).expect("connecting A");
    a.write_all(b"bye").expect("bye");
    a.shutdown(std::net::Shutdown::Write)
        .expect("closing our side of A");
    let mut b = TcpStream::connect((host, port)).expect("connecting B");
    p.lines.expect_prefix("READY");
    // Our end of A in FIN_WAIT2: the service has our FIN (CLOSE_WAIT). Our end of B in
    // CLOSE_WAIT: the service sent its FIN, and we acknowledged it (FIN_WAIT2 there).
    wait_state(&a, "05");
    wait_state(&b, "08");
    let mut r = round_trip(
        &mut g,
        p,
        &tmp.path().join("img"),
        &["--tcp-established"],
        &["--tcp-established"],
    );
    r.send("CHECK");
    a.set_read_timeout(Some(LINE_TIMEOUT)).expect("timeout");
    b.set_read_timeout(Some(LINE_TIMEOUT)).expect("timeout");
    let mut got = Vec::new();
    a.read_to_end(&mut got).expect("reading A to its end");
    assert_eq!(got, b"ack");
    let mut got = Vec::new();
    b.read_to_end(&mut got).expect("reading B to its end");
    assert_eq!(got, b"hello");
    b.write_all(b"late").expect("late");
    drop(b);
    let v = r.lines.expect_prefix("");
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
}

#[test]
fn a_failed_restore_leaves_the_connection_held_and_a_second_one_brings_it_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (p, c) = echo_service(&mut g, &["0"]);
    let (ours, theirs) = (
        c.local_addr().expect("address"),
        c.peer_addr().expect("address"),
    );
    // Idle while it moves: nothing waits on the service's side, which would
    // otherwise close with a reset rather than a FIN.
    let (_, c) = Client::start(c).wait_trips(10).finish();
    let img = tmp.path().join("img");
    checkpoint(p.pid, &img, &["--tcp-established"]);
    let mut p = p;
    p.wait();
    let table = image_table(&img);
    // The restore dies once the connection exists again, before it could talk: it
    // goes silently (back in repair mode), and its lock stays.
    let out = std::process::Command::new(mcr_bin())
        .args(["restore", "-D", img.to_str().expect("utf-8")])
        .args(["--shell-job", "--tcp-established", "-d"])
        .env("MCR_FAULT", "restore-after-fill")
        .output()
        .expect("mcr restore");
    assert_fails(&out, 1, &["fault injected", "stay stopped on the wire"]);
    assert!(
        tables().contains(&format!("table inet {table}")),
        "{table} is gone after the failed restore"
    );
    assert!(
        find_holder(&table).is_some(),
        "the holder of {table} is gone"
    );
    // No socket of the service's side is left closing (and sending its FIN later).
    let hex = |a: std::net::SocketAddr| format!("0100007F:{:04X}", a.port());
    let left = std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == hex(theirs) && f[2] == hex(ours)
        });
    assert!(!left, "the failed restore left {theirs} -> {ours} closing");
    let mut r = restore(&mut g, &img, &["--tcp-established"]);
    let (_, _conn) = Client::start(c).wait_trips(10).finish();
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
    assert!(
        !tables().contains(&format!("table inet {table}")),
        "{table} remains"
    );
}

/// A listener with connections it has not accepted yet: on CHECK it accepts two and
/// reads what each sent.
const PY_PENDING: &str = r#"
import socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4)
print("PORT %d" % l.getsockname()[1], flush=True)
print("READY", flush=True)
sys.stdin.readline()
got = sorted(l.accept()[0].recv(10) for _ in range(2))
print(("PASS" if got == [b"one", b"two"] else "FAIL") + " %r" % got, flush=True)
"#;

#[test]
fn without_the_flag_connections_waiting_to_be_accepted_are_refused_by_name_and_the_service_runs_on()
{
    let mut g = Guard::new();
    let mut p = Proc::start_until(
        &mut g,
        std::path::Path::new("python3"),
        &["-c", PY_PENDING],
        None,
        None,
    );
    let port: u16 = p.lines.expect_prefix("PORT")[5..]
        .trim()
        .parse()
        .expect("a port");
    p.lines.expect_prefix("READY");
    let mut one = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let mut two = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    one.write_all(b"one").expect("one");
    two.write_all(b"two").expect("two");
    let names = [one.local_addr(), two.local_addr()].map(|a| format!("{} ->", a.expect("address")));
    assert_refused(
        p,
        &[
            "2 connections waiting to be accepted",
            &names[0],
            &names[1],
            "only taken with --tcp-established",
        ],
    );
}

/// A service blocked in accept(): it serves two connections (echoing what each sent
/// first), then on CHECK says whether it got both.
const PY_ACCEPTING: &str = r#"
import socket, sys
host = sys.argv[1]
l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
l.bind((host, 0))
l.listen(4)
print("PORT %d" % l.getsockname()[1], flush=True)
print("READY", flush=True)
got, keep = [], []
for _ in range(2):
    c = l.accept()[0]
    d = c.recv(10)
    c.sendall(b"echo " + d)
    got.append(d)
    keep.append(c)
sys.stdin.readline()
got.sort()
print(("PASS" if got == [b"one", b"two"] else "FAIL") + " %r" % got, flush=True)
"#;

/// How many connections wait in the queue of the listener on `port`, each with `n`
/// bytes to read (`net`/tcp{,6}: established, held by no fd).
fn waiting_on(net: &str, port: u16, n: usize) -> usize {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|f| {
            let t = std::fs::read_to_string(format!("{net}/{f}")).unwrap_or_default();
            t.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let queued = |q: &str| q.split(':').nth(1).map(|r| usize::from_str_radix(r, 16));
            f.len() > 9
                && f[1].ends_with(&format!(":{port:04X}"))
                && f[3] == "01"
                && queued(f[4]) == Some(Ok(n))
                && f[9] == "0"
        })
        .count()
}

/// Runs `cmd` (an mcr that freezes the service `p` and waits there: MCR_FAULT
/// dump-wait-after-freeze); while the service is frozen, two clients made by
/// `connect` connect and send, and the dump goes on once both wait in the queue.
/// Returns the clients, mcr's output, and the prefix of its tables' names.
fn connect_while_frozen(
    p: &Proc,
    mut cmd: std::process::Command,
    port: u16,
    connect: impl Fn() -> TcpStream,
) -> (Vec<TcpStream>, std::process::Output, String) {
    let mut dump = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mcr");
    // Its tables are named after it.
    let ours = format!("mcr_{}_", dump.id());
    let mut err = Lines::new(dump.stderr.take().expect("stderr"));
    err.expect_prefix("mcr: waiting at dump-wait-after-freeze");
    let clients: Vec<TcpStream> = ["one", "two"]
        .iter()
        .map(|m| {
            let mut c = connect();
            c.write_all(m.as_bytes()).expect("sending");
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            c
        })
        .collect();
    let t = Instant::now();
    while waiting_on(&format!("/proc/{}/net", p.pid), port, 3) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the connections never queued"
        );
        std::thread::yield_now();
    }
    dump.stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let mut rest = String::new();
    while let Some(l) = err.next_line() {
        rest.push_str(&l);
        rest.push('\n');
    }
    let mut out = dump.wait_with_output().expect("mcr");
    out.stderr = rest.into_bytes();
    (clients, out, ours)
}

/// `mcr checkpoint --tcp-established` of `p`, with `faults`.
fn checkpoint_cmd(p: &Proc, img: &std::path::Path, faults: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(mcr_bin());
    cmd.args(["checkpoint", "-t", &p.pid.to_string(), "-D"])
        .arg(img)
        .args(["--shell-job", "--tcp-established"])
        .env("MCR_FAULT", faults);
    cmd
}

/// PY_ACCEPTING listening on `host`, started through `prefix` (nsenter) if given.
fn accepting_service(g: &mut Guard, prefix: &[String], host: &str) -> (Proc, u16) {
    let mut cmd = std::process::Command::new(prefix.first().map_or("python3", |s| s.as_str()));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg("python3");
    }
    cmd.args(["-c", PY_ACCEPTING, host]);
    let mut p = Proc::spawn(g, cmd, None);
    let port: u16 = p.lines.expect_prefix("PORT")[5..]
        .trim()
        .parse()
        .expect("a port");
    p.lines.expect_prefix("READY");
    (p, port)
}

fn no_tables_of(ours: &str) {
    let left: Vec<String> = tables().into_iter().filter(|t| t.contains(ours)).collect();
    assert!(left.is_empty(), "tables of ours remain: {left:?}");
}

/// Each client gets its echo: the service accepted it.
fn echoed(clients: &mut [TcpStream]) {
    for (c, m) in clients.iter_mut().zip(["one", "two"]) {
        let mut got = [0u8; 8];
        c.read_exact(&mut got).expect("the echo");
        assert_eq!(&got, format!("echo {m}").as_bytes());
    }
}

/// PY_ACCEPTING on `host`, checkpointed (with `faults`) while two local clients
/// connect to the frozen service.
fn dump_while_two_connect(
    g: &mut Guard,
    host: &str,
    img: &std::path::Path,
    faults: &str,
) -> (Proc, Vec<TcpStream>, std::process::Output, String) {
    let (p, port) = accepting_service(g, &[], host);
    let cmd = checkpoint_cmd(&p, img, faults);
    let (clients, out, ours) = connect_while_frozen(&p, cmd, port, || {
        TcpStream::connect((host, port)).expect("connecting")
    });
    (p, clients, out, ours)
}

fn waiting_connections_come_back_in_the_queue(host: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let mut g = Guard::new();
    let (mut p, mut clients, out, ours) =
        dump_while_two_connect(&mut g, host, &img, "dump-wait-after-freeze");
    assert!(
        out.status.success(),
        "checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.wait(), 128 + libc::SIGKILL);
    let shown = mcr(&["show", "-D", img.to_str().expect("utf-8")]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    let first = clients[0].local_addr().expect("address").to_string();
    assert!(
        shown.contains("waiting to be accepted") && shown.contains(&first),
        "{shown}"
    );
    let mut r = restore(&mut g, &img, &["--tcp-established"]);
    echoed(&mut clients);
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
    no_tables_of(&ours);
}

#[test]
fn a_service_blocked_in_accept_finds_the_two_connections_that_waited_after_the_restore() {
    waiting_connections_come_back_in_the_queue("127.0.0.1");
}

#[test]
fn the_same_over_ipv6_for_connections_that_waited() {
    waiting_connections_come_back_in_the_queue("::1");
}

#[test]
fn a_failed_dump_puts_the_connections_it_took_back_in_the_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let mut g = Guard::new();
    let faults = "dump-wait-after-freeze,dump-after-pages";
    let (mut p, mut clients, out, ours) = dump_while_two_connect(&mut g, "127.0.0.1", &img, faults);
    assert_fails(&out, 1, &["fault injected"]);
    echoed(&mut clients);
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
    no_tables_of(&ours);
}

#[test]
fn connections_waiting_to_be_accepted_follow_a_live_migration_to_another_namespace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new();
    let mut g = Guard::new();
    let enter_a = net.enter(0);
    let (mut p, port) = accepting_service(&mut g, &enter_a, SERVICE);
    let to = format!("unix:{}", tmp.path().join("mig.sock").display());
    let prefix: Vec<&str> = enter_a.iter().map(String::as_str).collect();
    let recv = Receiver::start_via(
        &prefix,
        &to,
        &tmp.path().join("pid"),
        &["--pidns", "--tcp-established", "--netns", &net.path(1)],
        &[],
    );
    let mut cmd = std::process::Command::new(&enter_a[0]);
    cmd.args(&enter_a[1..])
        .arg(mcr_bin())
        .args(["migrate", "-t", &p.pid.to_string(), "--to", &to])
        .args(["--shell-job", "--tcp-established", "--at-ready"])
        .arg(net.move_address_commands())
        .env("MCR_FAULT", "dump-wait-after-freeze");
    let c_ns = net.path(2);
    let (mut clients, out, _) = connect_while_frozen(&p, cmd, port, || {
        let c_ns = std::fs::File::open(&c_ns).expect("netns C");
        std::thread::spawn(move || {
            nix::sched::setns(c_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns C");
            TcpStream::connect((SERVICE, port)).expect("connecting from C")
        })
        .join()
        .expect("client thread")
    });
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.wait(), 128 + libc::SIGKILL);
    let mut moved = recv.workload(&mut g);
    echoed(&mut clients);
    assert_pass(&moved.check());
    for i in 0..2 {
        let t = nft_tables_in(&net, i);
        assert!(
            !t.contains("mcr_"),
            "namespace {i} keeps tables of ours: {t}"
        );
    }
}

/// Migrates `pid` with its connections from A into B (and a pid namespace: its pids
/// are taken here until the commit): `mcr receive` (with `env`) and `mcr migrate` (with
/// `extra`) both run in A, where the connection is stopped on the wire.
fn migrate_in_a(
    net: &Net,
    tmp: &std::path::Path,
    pid: i32,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (std::process::Output, Receiver) {
    let to = format!("unix:{}", tmp.join("mig.sock").display());
    let enter_a = net.enter(0);
    let prefix: Vec<&str> = enter_a.iter().map(String::as_str).collect();
    let recv = Receiver::start_via(
        &prefix,
        &to,
        &tmp.join("pid"),
        &["--pidns", "--tcp-established", "--netns", &net.path(1)],
        env,
    );
    let out = std::process::Command::new(&enter_a[0])
        .args(&enter_a[1..])
        .arg(mcr_bin())
        .args(["migrate", "-t", &pid.to_string(), "--to", &to])
        .args(["--shell-job", "--tcp-established"])
        .args(extra)
        .output()
        .expect("mcr migrate");
    (out, recv)
}

#[test]
fn a_service_migrates_live_to_another_network_namespace_and_its_client_keeps_talking() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new();
    let mut g = Guard::new();
    let (mut p, client) = echo_in_a(&mut g, &net, 100);

    // The address follows the workload into B once the destination is ready.
    let b = net.path(1);
    let moves = net.move_address_commands();
    let (out, recv) = migrate_in_a(&net, tmp.path(), p.pid, &[], &["--at-ready", &moves]);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.wait(), 128 + libc::SIGKILL);
    let mut moved = recv.workload(&mut g);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&b).expect("B"));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/net", moved.pid)).expect("its netns"),
        std::path::PathBuf::from(format!("net:[{ino}]")),
        "the migrated service is not in B"
    );
    let (worst, _conn) = client.wait_trips(100).finish();
    eprintln!("longest wait for an echo across the live migration: {worst:?}");
    assert_pass(&moved.check());
    for i in 0..2 {
        let t = nft_tables_in(&net, i);
        assert!(
            !t.contains("mcr_"),
            "namespace {i} keeps tables of ours: {t}"
        );
    }
}

#[test]
fn a_destination_failing_after_the_commit_gives_the_connection_back_to_the_original() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new();
    let mut g = Guard::new();
    let (mut p, client) = echo_in_a(&mut g, &net, 50);
    // The address stays in A: the original is where the client must find it again.
    let (out, mut recv) = migrate_in_a(
        &net,
        tmp.path(),
        p.pid,
        &[("MCR_FAULT", "restore-after-gate")],
        &[],
    );
    assert_fails(&out, 10, &["destination failed", "restore-after-gate"]);
    assert_eq!(recv.wait(), 1);
    let (worst, _conn) = client.wait_trips(50).finish();
    eprintln!("longest wait for an echo across the failed migration: {worst:?}");
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
    for i in 0..2 {
        let t = nft_tables_in(&net, i);
        assert!(
            !t.contains("mcr_"),
            "namespace {i} keeps tables of ours: {t}"
        );
    }
}

/// A preview's question: could it be checkpointed? Answered frozen for a moment, with
/// nothing written and no connection stopped; refused by name as a checkpoint would be.
#[test]
fn a_dry_run_says_what_a_checkpoint_would_refuse_and_the_service_talks_throughout() {
    let mut g = Guard::new();
    let (mut p, c) = echo_service(&mut g, &["0"]);
    let port = c.peer_addr().expect("peer").port();
    let client = Client::start(c).wait_trips(20);
    let pid = p.pid.to_string();
    let out = mcr(&["checkpoint", "-t", &pid, "--dry-run", "--shell-job"]);
    assert_fails(
        &out,
        5,
        &[&format!("pid {pid}"), "only taken with --tcp-established"],
    );
    let out = mcr(&[
        "checkpoint",
        "-t",
        &pid,
        "--dry-run",
        "--shell-job",
        "--tcp-established",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(v["tcp_connections"], 1, "{v}");
    assert_eq!(v["processes"], 1, "{v}");
    // Other tests' locks may come and go meanwhile; none may name this service.
    let rules = ruleset();
    let named = rules
        .match_indices(&format!(". {port}"))
        .any(|(i, m)| !rules[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
    assert!(!named, "a dry run stopped connections: {rules}");
    let client = client.wait_trips(20);
    let (_, _conn) = client.finish();
    assert_pass(&p.check());
    drop(_conn);
    assert_eq!(p.wait(), 0);
}
