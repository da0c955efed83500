//! The demo's workload and its client: a TCP service that streams numbered lines,
//! each carrying the greeting its disk holds right then, and a client outside the
//! partition that counts them, checks that none is lost or repeated, and measures
//! the longest silence, which is the blackout as the client sees it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The files of the demo's disk besides liveupdate itself.
pub const SAMPLE_FILES: &[(&str, &str)] =
    &[("/etc/demo/greeting", "hello from the original disk\n")];

/// How often the service sends a line.
pub const PERIOD: Duration = Duration::from_millis(2);

/// What the demo service is to be.
#[derive(Debug, Clone)]
pub struct Service {
    pub port: u16,
    /// The file each line's greeting is read from.
    pub greeting: PathBuf,
    /// Memory to keep, and how much of it to rewrite a second.
    pub mib: usize,
    pub dirty_mib_s: f64,
    /// A file to append each line's number to, held open for it, as a service that
    /// logs to its disk does.
    pub log: Option<PathBuf>,
}

/// Serves every client that connects, each on a thread of its own, for ever; with
/// `mib`, keeps that much memory and rewrites `dirty_mib_s` of it a second, as a
/// bigger workload would.
pub fn service(s: &Service) -> std::io::Result<()> {
    let (port, mib, dirty_mib_s) = (s.port, s.mib, s.dirty_mib_s);
    let log = match &s.log {
        Some(p) => Some(std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ))),
        None => None,
    };
    // Its memory is all there before it takes a client: what a preview measures then
    // is the workload at work, not one still filling itself.
    let mem = vec![1u8; mib << 20];
    let l = TcpListener::bind(("0.0.0.0", port))?;
    println!("demo service: listening on port {port}");
    if mib > 0 {
        std::thread::spawn(move || churn(mem, dirty_mib_s));
    }
    for c in l.incoming() {
        let c = c?;
        let (greeting, log) = (s.greeting.clone(), log.clone());
        std::thread::spawn(move || stream(c, &greeting, log.as_deref()));
    }
    Ok(())
}

/// Writes one byte in each of `dirty_mib_s` MiB of pages of `mem` a second, round
/// it, a millisecond's share at a time.
fn churn(mut mem: Vec<u8>, dirty_mib_s: f64) {
    const PAGE: usize = 4096;
    let pages = mem.len() / PAGE;
    let per_ms = (dirty_mib_s * 256.0 / 1000.0).max(0.0);
    let (mut owed, mut at, mut n) = (0.0f64, 0usize, 0u8);
    let start = Instant::now();
    let mut tick = 0u64;
    loop {
        owed += per_ms;
        while owed >= 1.0 {
            mem[at * PAGE] = n;
            at = (at + 1) % pages;
            if at == 0 {
                n = n.wrapping_add(1);
            }
            owed -= 1.0;
        }
        tick += 1;
        // Paced by the clock, not by the sleeps: a pause (a blackout) is not made up.
        let next = start + Duration::from_millis(tick);
        match next.checked_duration_since(Instant::now()) {
            Some(d) => std::thread::sleep(d),
            None => tick = start.elapsed().as_millis() as u64,
        }
    }
}

fn stream(mut c: TcpStream, greeting: &Path, log: Option<&std::sync::Mutex<std::fs::File>>) {
    let _ = c.set_nodelay(true);
    for n in 0u64.. {
        // Read each time: a fix that changes it shows without a restart.
        let g = std::fs::read_to_string(greeting).unwrap_or_else(|_| "-".into());
        if writeln!(c, "{n} {}", g.trim()).is_err() {
            return;
        }
        if let Some(l) = log {
            let mut f = l.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{n}");
        }
        std::thread::sleep(PERIOD);
    }
}

/// What the client saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub lines: u64,
    /// Lines out of order (lost or repeated): must be 0.
    pub broken: u64,
    pub longest_gap: Duration,
    /// When that silence ended (wall clock), to set beside the operation's log.
    pub gap_ended: Option<std::time::SystemTime>,
    /// Every silence of more than four periods: (when it ended, ms since the epoch;
    /// how long).
    pub silences: Vec<(u64, Duration)>,
    /// The greeting of the first line, and of the last.
    pub first: String,
    pub last: String,
}

/// Reads lines from `c` until `stop` says so; counts and checks them.
pub fn count(c: TcpStream, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<Seen> {
    count_with(c, stop, &mut |_| {})
}

/// [`count`], calling `each` with the number of lines had so far after every line.
fn count_with(
    c: TcpStream,
    stop: &std::sync::atomic::AtomicBool,
    each: &mut dyn FnMut(u64),
) -> std::io::Result<Seen> {
    use std::sync::atomic::Ordering;
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut r = BufReader::new(c);
    let mut seen = Seen::default();
    let mut last = Instant::now();
    let mut line = String::new();
    let mut want = 0u64;
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err(std::io::Error::other("the service closed the connection")),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if seen.lines > 0 {
            if now - last > 4 * PERIOD {
                let end = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                seen.silences.push((end, now - last));
            }
            if now - last > seen.longest_gap {
                seen.longest_gap = now - last;
                seen.gap_ended = Some(std::time::SystemTime::now());
            }
        }
        last = now;
        let (n, g) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.trim_end(), ""));
        if n.parse::<u64>().ok() != Some(want) {
            seen.broken += 1;
        }
        want = n.parse::<u64>().map_or(want + 1, |n| n + 1);
        if seen.lines == 0 {
            seen.first = g.to_string();
        }
        seen.last = g.to_string();
        seen.lines += 1;
        each(seen.lines);
    }
    Ok(seen)
}

/// Where the demo keeps everything unless told.
pub const DIR: &str = "/var/lib/liveupdate/demo";

/// What `liveupdate demo` is told.
pub struct DemoPlan {
    pub dir: PathBuf,
    pub mcr: PathBuf,
    /// The bridge and its address: the demo's own, apart from a real console's.
    pub bridge: String,
    pub gateway: String,
    pub max_blackout_ms: u64,
    /// The service's memory, and how much of it it rewrites a second.
    pub mib: usize,
    pub dirty_mib_s: f64,
    /// The partition's disk an ext4 image, not a directory tree.
    pub image: bool,
}

/// What the demo saw.
pub struct DemoReport {
    pub record: crate::update::Record,
    pub seen: Seen,
}

/// A console of the demo's own, as a child; killed when dropped.
struct ConsoleChild(std::process::Child);

impl Drop for ConsoleChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The console's partitions, destroyed when dropped (their disks stay, for a look).
struct Made<'a> {
    socket: &'a Path,
    token: String,
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        use crate::console::Request;
        let listed =
            crate::console::call(self.socket, &self.token, &Request::List).unwrap_or_default();
        for p in listed {
            let _ =
                crate::console::call(self.socket, &self.token, &Request::Destroy { name: p.name });
        }
    }
}

fn step<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |why| format!("{what}: {why}")
}

/// Builds a partition with the demo service on a sample disk, connects a client to
/// it from outside, live-updates it with a fix that changes the service's greeting,
/// and reports what the client saw.
pub fn run(plan: &DemoPlan) -> Result<DemoReport, String> {
    use crate::console::Request;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = &plan.dir;
    if dir.exists() {
        // A run that died may have left its disks mounted, mirrors (on the rest) first.
        for d in ["mirrors", "clones", "disks"] {
            if let Ok(rd) = std::fs::read_dir(dir.join(d)) {
                for e in rd.flatten() {
                    let _ = crate::disk::release(&e.path());
                }
            }
        }
        std::fs::remove_dir_all(dir).map_err(step("clearing the demo's directory"))?;
    }
    let state = dir.join("state");
    let socket = dir.join("console.sock");
    let exe = std::env::current_exe().map_err(|e| format!("finding liveupdate: {e}"))?;
    let token = crate::token::issue(&state, "demo", 3600).map_err(|e| e.to_string())?;
    println!(
        "liveupdate demo: console token for demo stored in {}",
        state.display()
    );

    let mut child = std::process::Command::new(&exe)
        .args(["console", "serve", "--socket"])
        .arg(&socket)
        .arg("--state")
        .arg(&state)
        .args(["--bridge", &plan.bridge, "--gateway", &plan.gateway])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(step("starting the console"))?;
    let mut first = String::new();
    let _ = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first);
    let _console = ConsoleChild(child);
    if !first.contains("serving") {
        return Err("the console did not start (see its stderr above)".into());
    }
    let made = Made {
        socket: &socket,
        token: token.secret.clone(),
    };
    let ask = |req: &Request| {
        crate::console::call(&socket, &token.secret, req).map_err(|e| e.to_string())
    };

    let disk = if plan.image {
        let disk = dir.join("disks/demo.img");
        crate::disk::sample_image(&disk, &exe, SAMPLE_FILES).map_err(|e| e.to_string())?;
        disk
    } else {
        let disk = dir.join("disks/demo");
        crate::disk::sample(&disk, &exe, SAMPLE_FILES).map_err(|e| e.to_string())?;
        disk
    };
    let fixes = dir.join("fixes");
    std::fs::create_dir_all(&fixes).map_err(step("making the fix directory"))?;
    let greeting = fixes.join("greeting");
    std::fs::write(&greeting, "hello after fix DEMO-1\n").map_err(step("writing the fix"))?;
    let bundle = fixes.join("DEMO-1.tar.zst");
    crate::fix::create(
        &bundle,
        &crate::fix::NewFix {
            label: "DEMO-1".into(),
            summary: "a new greeting for the demo service".into(),
            lu_capable: true,
            files: vec![(greeting, "/etc/demo/greeting".into())],
            pre: None,
            post: None,
        },
    )
    .map_err(|e| e.to_string())?;

    let parts = ask(&Request::Create(crate::partition::NewPartition {
        name: "demo".into(),
        disk: disk.clone(),
        id: None,
        address: None,
        mount_at: None,
        command: Vec::new(),
    }))?;
    let address = parts[0].ip().to_string();
    let port = 7000u16;
    ask(&Request::Start {
        name: "demo".into(),
        command: [
            "/bin/liveupdate",
            "demo-service",
            "--port",
            "7000",
            "--mib",
            &plan.mib.to_string(),
            "--dirty-mib-s",
            &plan.dirty_mib_s.to_string(),
        ]
        .map(String::from)
        .to_vec(),
    })?;
    println!(
        "liveupdate demo: partition demo (id {}) runs the demo service at {address}:{port}",
        parts[0].id
    );

    let conn = connect(&address, port)?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || count_reporting(conn, &stop, tx))
    };
    // Some lines before the update, some after: the client's view spans both.
    wait_lines(&rx, 100)?;

    let update = crate::update::Plan {
        state: state.clone(),
        console: socket.clone(),
        partition: "demo".into(),
        fix: Some(bundle),
        remove_fix: None,
        onto: None,
        clone_dir: dir.join("clones"),
        mirror_dir: dir.join("mirrors"),
        partition_id: None,
        mcr: plan.mcr.clone(),
        max_blackout_ms: plan.max_blackout_ms,
        notify_timeout: Duration::from_secs(5),
        pre_hook: None,
        post_hook: None,
    };
    let record = crate::update::run(&update, "liveupdate demo", false).map_err(|e| e.to_string());
    let after = record.is_ok().then(|| {
        wait_lines(&rx, 200).map_err(|e| {
            let show = |args: &[&str]| {
                std::process::Command::new(args[0])
                    .args(&args[1..])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            format!(
                "{e}; neighbours: {}; connection: {}",
                show(&["ip", "neigh", "show", "dev", &plan.bridge]).trim(),
                show(&["ss", "-tnio", "dst", &address]).trim()
            )
        })
    });
    stop.store(true, Ordering::Relaxed);
    let seen = client
        .join()
        .map_err(|_| "the client thread panicked".to_string())?
        .map_err(step("the client"))?;
    let record = record?;
    if let Some(Err(e)) = after {
        return Err(format!("{e} ({} lines in all)", seen.lines));
    }
    drop(made);
    drop(_console);
    // What the console made for the demo's partitions goes with it.
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &plan.bridge])
        .status();
    if let Some(cg) = crate::partition::cgroup2_mount() {
        let _ = crate::partition::remove_cgroup(&cg.join(format!("liveupdate-{}", plan.bridge)));
    }
    Ok(DemoReport { record, seen })
}

fn connect(address: &str, port: u16) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect((address, port)) {
            Ok(c) => return Ok(c),
            // The service binds just after its partition started.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(format!(
                    "connecting to the demo service at {address}:{port}: {e}"
                ))
            }
        }
    }
}

/// [`count`], saying on `tx` how many lines it has had every 50.
pub fn count_reporting(
    c: TcpStream,
    stop: &std::sync::atomic::AtomicBool,
    tx: std::sync::mpsc::Sender<u64>,
) -> std::io::Result<Seen> {
    count_with(c, stop, &mut |n| {
        if n % 50 == 0 {
            let _ = tx.send(n);
        }
    })
}

/// Waits until the client has had `n` more lines.
fn wait_lines(rx: &std::sync::mpsc::Receiver<u64>, n: u64) -> Result<(), String> {
    let mut got = 0;
    while got < n {
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the client stopped receiving lines".to_string())?;
        got += 50;
    }
    Ok(())
}

impl Seen {
    /// The longest silence that ended between `from` and `to` (ms since the epoch),
    /// or that began before `to` and ended up to a second after it.
    pub fn longest_within(&self, from: u64, to: u64) -> Duration {
        self.silences
            .iter()
            .filter(|(end, d)| {
                let start = end.saturating_sub(d.as_millis() as u64);
                *end >= from && start <= to
            })
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }
}
