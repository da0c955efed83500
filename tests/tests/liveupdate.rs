#![forbid(unsafe_code)]
//! `liveupdate`: partitions on a console of the test's own, the demo service in one,
//! a client outside counting what it receives, and live updates that move it.

use mcr_tests::*;
use orchestrate::demo::Seen;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

static LABS: AtomicU32 = AtomicU32::new(0);

/// A console with its own bridge, subnet, state and disks, all gone when dropped.
struct Lab {
    dir: tempfile::TempDir,
    bridge: String,
    subnet: u32,
    console: Child,
}

fn liveupdate() -> Command {
    Command::new(built_bin("liveupdate"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Lab {
    fn new() -> Lab {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        // Apart from another run's labs and from each other: a /24 each.
        let subnet = (std::process::id() % 40) * 6 + n;
        let bridge = format!("lut{}{n}", std::process::id() % 10_000);
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let out = liveupdate()
            .args(["console", "auth", "--user", "tester", "--dir"])
            .arg(&state)
            .output()
            .expect("liveupdate console auth");
        assert!(out.status.success(), "{}", text(&out));
        let mut console = liveupdate()
            .args(["console", "serve", "--socket"])
            .arg(dir.path().join("console.sock"))
            .arg("--state")
            .arg(&state)
            .args([
                "--bridge",
                &bridge,
                "--gateway",
                &format!("10.91.{subnet}.1/24"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("liveupdate console serve");
        let mut lines = Lines::new(console.stdout.take().expect("piped"));
        lines.expect_prefix("liveupdate: console serving");
        let lab = Lab {
            dir,
            bridge,
            subnet,
            console,
        };
        std::fs::write(
            lab.config(),
            format!(
                "general:\n    mode = automated\n    kext_check = no\ndisks:\n    clone = {}\n    mirror = {}\nconsole:\n    address = unix:{}\n    user = tester\n",
                lab.path("clones").display(),
                lab.path("mirror").display(),
                lab.path("console.sock").display()
            ),
        )
        .expect("config");
        lab
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self) -> PathBuf {
        self.path("lvupdate.data")
    }

    /// `liveupdate ARGS` with the lab's console and state.
    fn lu(&self, args: &[&str]) -> Output {
        self.lu_env(args, &[])
    }

    fn lu_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = liveupdate();
        // Before a `--` that ends them.
        let k = if args[0] == "partition" { 2 } else { 1 };
        c.args(&args[..k])
            .args(self.reach(args[0]))
            .args(&args[k..]);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).output().expect("liveupdate")
    }

    /// The options that say where the console and the state are, for `cmd`.
    fn reach(&self, cmd: &str) -> Vec<String> {
        let state = self.path("state").display().to_string();
        match cmd {
            "partition" => vec![
                "--console".into(),
                self.path("console.sock").display().to_string(),
                "--state".into(),
                state,
            ],
            "run" | "rollback" | "preview" => vec![
                "--config".into(),
                self.config().display().to_string(),
                "--state".into(),
                state,
            ],
            "log" => vec!["--dir".into(), state],
            _ => vec![],
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.lu(args);
        assert!(
            o.status.success(),
            "liveupdate {}: {}",
            args.join(" "),
            text(&o)
        );
        text(&o)
    }

    /// `fix list` of a root: the fixes on record there with their states.
    fn fixes_on(&self, root: &Path) -> String {
        self.ok(&["fix", "list", "--root", &root.display().to_string()])
    }

    /// The console's table, as `partition list` prints it: (name, state, init) rows.
    fn list(&self) -> Vec<(String, String, String)> {
        self.ok(&["partition", "list"])
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].to_string(), f[2].to_string(), f[3].to_string())
            })
            .collect()
    }

    /// A partition running the demo service on a sample disk; its address.
    fn service(&self, name: &str) -> String {
        let disk = self.path(&format!("disks/{name}"));
        let d = disk.display().to_string();
        self.ok(&["disk", "sample", &d]);
        self.start_service(name, &d)
    }

    /// The same on a sample disk that is an ext4 image.
    fn service_on_image(&self, name: &str) -> (String, PathBuf) {
        let disk = self.path(&format!("disks/{name}.img"));
        let d = disk.display().to_string();
        self.ok(&["disk", "sample", "--image", &d]);
        (self.start_service(name, &d), disk)
    }

    fn start_service(&self, name: &str, d: &str) -> String {
        self.start_service_with(name, d, &[])
    }

    /// The service with `extra` arguments.
    fn start_service_with(&self, name: &str, d: &str, extra: &[&str]) -> String {
        self.ok(&["partition", "create", name, "--disk", d]);
        let mut args = vec![
            "partition",
            "start",
            name,
            "--",
            "/bin/liveupdate",
            "demo-service",
            "--port",
            "7000",
        ];
        args.extend(extra);
        self.ok(&args);
        format!("10.91.{}.{}", self.subnet, 11)
    }

    /// A fix bundle that changes the service's greeting; its directory.
    fn fix(&self, label: &str, extra: &[&str]) -> PathBuf {
        let dir = self.path("fixes");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let g = dir.join(format!("{label}.greeting"));
        std::fs::write(&g, format!("hello from {label}\n")).expect("greeting");
        let out = dir.join(format!("{label}.tar.zst"));
        let mut args = vec![
            "fix".to_string(),
            "create".into(),
            "-o".into(),
            out.display().to_string(),
            "--label".into(),
            label.into(),
            "--abstract".into(),
            "a new greeting".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("{}:/etc/demo/greeting", g.display()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&refs);
        dir
    }

    /// Fix EXE-1, which replaces the binary the service runs with `exe`; its directory.
    fn exe_fix(&self, exe: &[u8]) -> PathBuf {
        let dir = self.path("fixes");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("liveupdate");
        std::fs::write(&file, exe).expect("write");
        self.ok(&[
            "fix",
            "create",
            "-o",
            &dir.join("EXE-1.tar.zst").display().to_string(),
            "--label",
            "EXE-1",
            "--abstract",
            "a new binary for the service",
            &format!("{}:/bin/liveupdate", file.display()),
        ]);
        dir
    }

    /// `liveupdate run` of FIX-1 on svc, stopped at `phase` and killed there (SIGKILL).
    fn killed_at(&self, phase: &str) {
        let dir = self.path("fixes").display().to_string();
        let mut c = liveupdate();
        c.args(["run", "-d", &dir, "FIX-1", "-p", "svc"])
            .args(self.reach("run"))
            .env("LIVEUPDATE_FAULT", format!("stall-{phase}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut stalled = c.spawn().expect("liveupdate run");
        let mut lines = Lines::new(stalled.stdout.take().expect("piped"));
        lines.expect_prefix(&format!("STALLED at {phase}"));
        stalled.kill().expect("SIGKILL");
        stalled.wait().expect("reaped");
    }

    fn run(&self, fix: &str, env: &[(&str, &str)]) -> Output {
        let dir = self.path("fixes").display().to_string();
        self.lu_env(&["run", "-d", &dir, fix, "-p", "svc"], env)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (name, _, _) in self.list() {
            let _ = self.lu(&["partition", "destroy", &name]);
        }
        let _ = self.console.kill();
        let _ = self.console.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        if let Some(cg) = orchestrate::partition::cgroup2_mount() {
            let _ = orchestrate::partition::remove_cgroup(
                &cg.join(format!("liveupdate-{}", self.bridge)),
            );
        }
    }
}

/// A client outside every partition, reading the service's numbered lines.
struct Client {
    stop: Arc<AtomicBool>,
    got: mpsc::Receiver<u64>,
    thread: std::thread::JoinHandle<std::io::Result<Seen>>,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let mut c = None;
        for _ in 0..500 {
            match TcpStream::connect((addr, 7000)) {
                Ok(s) => {
                    c = Some(s);
                    break;
                }
                // The service binds a moment after its partition started.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let c = c.unwrap_or_else(|| panic!("no demo service at {addr}:7000"));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, got) = mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::spawn(move || orchestrate::demo::count_reporting(c, &s, tx));
        let client = Client { stop, got, thread };
        client.wait_lines(50);
        client
    }

    /// Waits for `n` more lines (in fifties).
    fn wait_lines(&self, n: u64) {
        for _ in 0..n.div_ceil(50) {
            if self.got.recv_timeout(Duration::from_secs(10)).is_err() {
                let sh = |c: &str| {
                    let o = Command::new("sh").args(["-c", c]).output().expect("sh");
                    format!(
                        "$ {c}\n{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                };
                panic!(
                    "the client stopped receiving lines\n{}\n{}\n{}\n{}",
                    sh("ss -tnio dst 10.91.0.0/16"),
                    sh("for n in $(ip netns list | awk '{print $1}' | grep ^lut); do echo == $n; ip -n $n -br addr; ip netns exec $n nft list ruleset; ip -n $n neigh; done"),
                    sh("ip neigh | grep 10.91"),
                    sh("for p in $(cat /sys/fs/cgroup/unified/liveupdate-lut*/p*/cgroup.procs); do for t in /proc/$p/task/*; do echo $t $(cat $t/stat | cut -d' ' -f3) $(cat $t/wchan) $(cat $t/syscall); done; ip netns identify $p; done; for n in $(ip netns list | awk '{print $1}' | grep ^lut); do echo == $n; ip netns exec $n ss -tnio; done")
                );
            }
        }
    }

    fn finish(self) -> Seen {
        self.wait_lines(50);
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("client thread")
            .expect("the client's connection")
    }
}

fn journal(lab: &Lab) -> String {
    lab.ok(&["log"])
}

#[test]
fn a_live_update_moves_the_service_onto_a_mirror_of_its_root_with_the_fix_and_back_by_rollback() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    let client = Client::connect(&addr);
    let before = lab.list();
    // Its /proc is its pid namespace's: its pid 1 is the service.
    let own_proc = |init: &str| {
        let inside = format!("/proc/{init}/root/proc/1/cmdline");
        std::fs::read_to_string(&inside).unwrap_or_else(|e| panic!("{inside}: {e}"))
    };
    assert!(own_proc(&before[0].2).contains("demo-service"));
    let o = lab.run("FIX-1", &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for phase in [
        "Cloning the root disk of svc",
        "Applying fix FIX-1 to the clone",
        "Mirroring the root disk of svc",
        "1 file(s) of fix FIX-1 beside their targets",
        "Started the surrogate partition svc (id 2) from the clone",
        "the original is now svc_lu0 (id 1)",
        "moved:",
        "Installed fix FIX-1 on the mirror: 1 file(s) in place, state S",
        "Shut down the original partition svc_lu0",
        "succeeded: blackout",
    ] {
        assert!(out.contains(phase), "no {phase:?} in {out}");
    }
    client.wait_lines(100);
    let after = lab.list();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!((&after[0].0[..], &after[0].1[..]), ("svc", "Running"));
    assert_ne!(after[0].2, before[0].2, "a new pid 1, in the surrogate");
    assert!(
        own_proc(&after[0].2).contains("demo-service"),
        "no /proc moved"
    );
    // The clone and the mirror the workload runs on have the fix on record; the
    // original disk has not.
    for root in ["clones/svc-LU0001", "mirror/svc-LU0001"] {
        let fixes = lab.fixes_on(&lab.path(root));
        assert!(
            fixes.contains("FIX-1") && fixes.contains(" S"),
            "{root}: {fixes}"
        );
    }
    let fixes = lab.fixes_on(&lab.path("disks/svc"));
    assert!(!fixes.contains("FIX-1"), "{fixes}");
    let j = journal(&lab);
    assert!(j.contains("LU0001") && j.contains("FIX-1"), "{j}");

    // Again, from the mirror: its own mirror is one overlay over both layers.
    lab.fix("FIX-2", &[]);
    let o = lab.run("FIX-2", &[]);
    assert!(o.status.success(), "{}", text(&o));
    client.wait_lines(100);
    let fixes = lab.fixes_on(&lab.path("mirror/svc-LU0002"));
    assert!(
        fixes.contains("FIX-1") && fixes.contains("FIX-2"),
        "{fixes}"
    );
    // Rolled back: FIX-2 comes off a mirror of the second one, its file as the first
    // mirror (the root it went over) has it.
    let o = lab.lu(&["rollback", "-p", "svc"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("Removed fix FIX-2 from the mirror: 1 file(s) put back"),
        "{out}"
    );
    let fixes = lab.fixes_on(&lab.path("mirror/svc-LU0003"));
    assert!(
        fixes.contains("FIX-1") && !fixes.contains("FIX-2"),
        "{fixes}"
    );
    // Nothing to roll back after a rollback.
    let o = lab.lu(&["rollback", "-p", "svc"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("applied no fix: nothing to roll back"),
        "{}",
        text(&o)
    );
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "lines lost or repeated: {seen:?}");
    assert_eq!(seen.first, "hello from the original disk");
    assert_eq!(seen.last, "hello from FIX-1", "{seen:?}");
    let j = journal(&lab);
    assert!(j.contains("LU0003") && j.contains("rollback"), "{j}");
    assert_eq!(
        orchestrate::disk::mounted_at(&lab.path("mirror/svc-LU0002")),
        None,
        "the mirror rolled back from is left mounted"
    );
}

/// An image disk: mounted from a loop device while a partition uses it, frozen while
/// it is copied into the clone (a run killed then leaves it frozen, and the next run
/// thaws it). The workload resumes on a mirror of it: what was written to it during
/// the move is there, what is written after stays in the mirror, and the image is
/// unmounted once no partition uses it or rests on it.
#[test]
fn a_partition_on_an_image_disk_moves_onto_a_mirror_with_every_write_and_back() {
    let lab = Lab::new();
    let (addr, img) = lab.service_on_image("svc");
    let at = orchestrate::disk::mounted_at(&img).expect("the image mounted");
    lab.fix("FIX-1", &[]);
    let client = Client::connect(&addr);
    lab.killed_at("clone-frozen");
    // A writer of the original's disk waits on the freeze the killed run left...
    let (wrote, written) = mpsc::channel();
    let file = at.join("tmp/written-while-frozen");
    std::thread::spawn(move || {
        let _ = wrote.send(std::fs::write(&file, "after the thaw").is_ok());
    });
    // ...and a write to it after the clone and the mirror are made, as the workload's
    // own would be, just before the blackout.
    let cfg = std::fs::read_to_string(lab.config()).expect("config");
    let late = at.join("tmp/written-during-the-move");
    std::fs::write(
        lab.config(),
        cfg.replace(
            "kext_check = no\n",
            &format!(
                "kext_check = no\n    pre_hook = echo late > {}\n",
                late.display()
            ),
        ),
    )
    .expect("config");
    let o = lab.run("FIX-1", &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // ...until the next run thaws it.
    assert!(out.contains("was left frozen: thawed"), "{out}");
    assert_eq!(written.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert!(
        out.contains("cloned by ") && out.contains(": an image,") && out.contains("frozen for"),
        "{out}"
    );
    client.wait_lines(100);
    // LU0001 was the run killed.
    let clone = lab.path("clones/svc-LU0002");
    assert!(clone.is_file(), "the clone is an image too");
    assert_eq!(orchestrate::disk::mounted_at(&clone), None, "left mounted");
    let fixes = lab.fixes_on(&clone);
    assert!(fixes.contains("FIX-1"), "{fixes}");
    // The workload's root is the mirror: the late write is there (the clone, made
    // before, has not got it), and so is the fix.
    let mirror = lab.path("mirror/svc-LU0002");
    let root = orchestrate::disk::mounted_at(&mirror).expect("the mirror mounted");
    assert_eq!(
        std::fs::read_to_string(root.join("tmp/written-during-the-move")).expect("late"),
        "late\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/demo/greeting")).expect("greeting"),
        "hello from FIX-1\n"
    );
    let fixes = lab.fixes_on(&mirror);
    assert!(fixes.contains("FIX-1"), "{fixes}");
    // The original partition is gone, but the mirror rests on its image: mounted
    // still, with what was written to it, never the fix, nor what the mirror writes.
    assert_eq!(
        orchestrate::disk::mounted_at(&img).as_deref(),
        Some(at.as_path())
    );
    std::fs::write(root.join("tmp/after"), "the mirror's").expect("write");
    assert!(!at.join("tmp/after").exists());
    let fixes = lab.fixes_on(&img);
    assert!(!fixes.contains("FIX-1"), "{fixes}");

    // Rolled back live, onto a mirror of the mirror with the fix off: the greeting is
    // the original's again, and what was written on the first mirror is there still.
    let o = lab.lu(&["rollback", "-p", "svc"]);
    assert!(o.status.success(), "{}", text(&o));
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "lines lost or repeated: {seen:?}");
    assert_eq!(seen.last, "hello from the original disk", "{seen:?}");
    assert_eq!(orchestrate::disk::mounted_at(&mirror), None);
    let now = orchestrate::disk::mounted_at(&lab.path("mirror/svc-LU0003")).expect("mounted");
    assert_eq!(
        std::fs::read_to_string(now.join("tmp/after")).expect("kept"),
        "the mirror's"
    );
    let back = orchestrate::disk::mounted_at(&img).expect("the original mounted still");
    assert_eq!(
        std::fs::read_to_string(back.join("tmp/written-while-frozen")).expect("written"),
        "after the thaw"
    );
    lab.ok(&["partition", "destroy", "svc"]);
    assert_eq!(orchestrate::disk::mounted_at(&img), None);
}

#[test]
fn a_failure_at_every_phase_before_the_commit_leaves_the_workload_where_it_was() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    let client = Client::connect(&addr);
    let before = lab.list();
    for phase in [
        "clone",
        "fix-apply",
        "mirror",
        "surrogate",
        "pre-copy",
        "blackout",
    ] {
        let o = lab.run("FIX-1", &[("LIVEUPDATE_FAULT", phase)]);
        let out = text(&o);
        assert!(!o.status.success(), "{phase}: {out}");
        assert!(out.contains("FAILED"), "{phase}: {out}");
        assert!(
            out.contains("the workload runs on in partition svc"),
            "{out}"
        );
        assert_eq!(lab.list(), before, "after a failure at {phase}");
        client.wait_lines(50);
        for made in ["clones", "mirror"] {
            let left = std::fs::read_dir(lab.path(made)).map_or(0, |d| d.count());
            assert_eq!(left, 0, "{made}: left after a failure at {phase}");
        }
        // The original root as it was: nothing of the fix in it, staged or on record.
        let etc: Vec<_> = std::fs::read_dir(lab.path("disks/svc/etc/demo"))
            .expect("etc/demo")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(etc, ["greeting"], "after a failure at {phase}");
        assert!(
            !lab.path("disks/svc/var/lib/liveupdate").exists(),
            "{phase}"
        );
    }
    let j = journal(&lab);
    assert_eq!(j.matches("fault injected at").count(), 5, "{j}");
    assert!(
        j.contains("mcr migrate"),
        "the blackout's failure is mcr's: {j}"
    );
    // The lock went with each: the real thing runs now.
    let o = lab.run("FIX-1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "{seen:?}");
    assert_eq!(seen.last, "hello from FIX-1");
}

#[test]
fn fixes_that_are_not_live_update_capable_or_corrupt_are_refused_and_nothing_moves() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("KERNEL-1", &["--not-lu-capable"]);
    let dir = lab.fix("BROKEN-1", &[]);
    // One byte of the compressed bundle changed: its checksum (or zstd's) says so.
    let b = dir.join("BROKEN-1.tar.zst");
    let mut bytes = std::fs::read(&b).expect("bundle");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&b, bytes).expect("write");
    let client = Client::connect(&addr);
    let before = lab.list();
    let o = lab.run("KERNEL-1", &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not live-update capable"), "{}", text(&o));
    let o = lab.run("BROKEN-1", &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("FAILED"), "{}", text(&o));
    assert_eq!(lab.list(), before);
    let seen = client.finish();
    assert_eq!(seen.broken, 0);
    assert_eq!(seen.last, "hello from the original disk");
}

#[test]
fn the_console_refuses_a_wrong_or_expired_token_a_taken_id_and_a_taken_name() {
    let lab = Lab::new();
    let disk = lab.path("disks/a");
    std::fs::create_dir_all(&disk).expect("mkdir");
    let d = disk.display().to_string();
    lab.ok(&["partition", "create", "a", "--disk", &d, "--id", "7"]);
    let o = lab.lu(&["partition", "create", "b", "--disk", &d, "--id", "7"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(
        text(&o).contains("partition id 7 is taken by \"a\""),
        "{}",
        text(&o)
    );
    let o = lab.lu(&["partition", "create", "a", "--disk", &d]);
    assert!(
        text(&o).contains("partition name \"a\" is taken"),
        "{}",
        text(&o)
    );
    // A token made elsewhere is not the console's.
    let other = tempfile::tempdir().expect("tempdir");
    let out = liveupdate()
        .args(["console", "auth", "--user", "intruder", "--dir"])
        .arg(other.path())
        .output()
        .expect("auth");
    assert!(out.status.success());
    let o = liveupdate()
        .args(["partition", "list", "--console"])
        .arg(lab.path("console.sock"))
        .arg("--state")
        .arg(other.path())
        .output()
        .expect("list");
    assert_eq!(o.status.code(), Some(6));
    assert!(
        text(&o).contains("refused: wrong console token"),
        "{}",
        text(&o)
    );
    // The console's own, expired.
    let state = lab.path("state");
    let out = liveupdate()
        .args([
            "console",
            "auth",
            "--user",
            "tester",
            "--ttl-secs",
            "0",
            "--dir",
        ])
        .arg(&state)
        .output()
        .expect("auth");
    assert!(out.status.success());
    let o = lab.lu(&["partition", "list"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(text(&o).contains("expired"), "{}", text(&o));
    let out = liveupdate()
        .args(["console", "auth", "--user", "tester", "--dir"])
        .arg(&state)
        .output()
        .expect("auth");
    assert!(out.status.success());
    assert_eq!(lab.list().len(), 1);
}

#[test]
fn a_killed_liveupdate_is_cleaned_up_after_by_the_next_run() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    let client = Client::connect(&addr);
    let before = lab.list();
    lab.killed_at("pre-copy");
    // Half made: the surrogate under the name, the original renamed.
    let names: Vec<String> = lab.list().into_iter().map(|p| p.0).collect();
    assert!(names.contains(&"svc_lu0".to_string()), "{names:?}");
    client.wait_lines(50);
    let o = lab.run("FIX-1", &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("died holding the lock"), "{out}");
    assert!(out.contains("removing the half-made surrogate"), "{out}");
    let after = lab.list();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, before[0].0);
    // The killed run's clone and mirror went; this run's are the workload's.
    assert!(!lab.path("clones/svc-LU0001").exists());
    assert!(!lab.path("mirror/svc-LU0001").exists());
    assert!(lab.path("mirror/svc-LU0002").exists());
    let seen = client.finish();
    assert_eq!(seen.broken, 0);
    assert_eq!(seen.last, "hello from FIX-1");
}

#[test]
fn the_demo_moves_its_service_live_and_its_client_sees_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = LABS.fetch_add(1, Ordering::Relaxed);
    let bridge = format!("lud{}{n}", std::process::id() % 10_000);
    let out = liveupdate()
        .arg("demo")
        .arg("--dir")
        .arg(tmp.path().join("demo"))
        .args(["--bridge", &bridge, "--gateway", "10.92.0.1/24"])
        .output()
        .expect("liveupdate demo");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("liveupdate demo: PASSED"), "{t}");
    assert!(t.contains("lost or repeated     0"), "{t}");
    assert!(
        t.contains("greeting after       \"hello after fix DEMO-1\""),
        "{t}"
    );
    assert!(!Path::new(&format!("/sys/class/net/{bridge}")).exists());
    let cg = orchestrate::partition::cgroup2_mount().expect("cgroup2");
    assert!(
        !cg.join(format!("liveupdate-{bridge}")).exists(),
        "the demo left its cgroup"
    );
}

#[test]
fn preview_checks_everything_estimates_from_the_workload_and_changes_nothing() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    // Replaces the very binary the service runs: said, not refused.
    let dir = lab.exe_fix(b"not the same");
    let client = Client::connect(&addr);
    let before = lab.list();
    let d = dir.display().to_string();
    let o = lab.lu(&["preview", "-d", &d, "FIX-1", "-p", "svc"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    for line in [
        "PASSED: no other live update holds the lock",
        "PASSED: console token for tester",
        "PASSED: partition svc (id 1) runs",
        "PASSED: fix FIX-1: every checksum verified",
        "PASSED: fix FIX-1 is live-update capable",
        "PASSED: the fix replaces no file the workload has open or mapped",
        "PASSED: every process of the workload can be checkpointed: 1 processes",
        "1 TCP connections",
        "PASSED: disk: the clone needs",
        "PASSED: memory: a second copy needs",
        "dirty rate",
        "copy bandwidth",
        "blackout ",
        "total time",
    ] {
        assert!(out.contains(line), "no {line:?} in {out}");
    }
    let o = lab.lu(&["preview", "-d", &d, "EXE-1", "-p", "svc"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("PASSED: the fix replaces /bin/liveupdate (pid")
            && text(&o).contains("it keeps the file it has until it opens it again"),
        "{}",
        text(&o)
    );
    // The surrogate's id, asked for in the configuration, is the original's.
    let cfg = std::fs::read_to_string(lab.config()).expect("config");
    std::fs::write(lab.config(), format!("{cfg}    partition_id = 1\n")).expect("config");
    let o = lab.lu(&["preview", "-d", &d, "FIX-1", "-p", "svc"]);
    assert!(
        text(&o).contains("FAILED: partition id 1 asked for the surrogate is taken by svc"),
        "{}",
        text(&o)
    );
    // Run refuses it too (its own preview), and nothing is made.
    let o = lab.run("FIX-1", &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("partition id 1 asked for the surrogate is taken by svc"),
        "{}",
        text(&o)
    );
    assert_eq!(lab.list(), before);
    std::fs::write(lab.config(), &cfg).expect("config");
    // A token the console does not know: refused in preview and in run.
    let other = tempfile::tempdir().expect("tempdir");
    let auth = liveupdate()
        .args(["console", "auth", "--user", "intruder", "--dir"])
        .arg(other.path())
        .output()
        .expect("auth");
    assert!(auth.status.success());
    let config = lab.config().display().to_string();
    let as_other = |cmd: &str, fix: &str| {
        liveupdate()
            .args([
                cmd, "-d", &d, fix, "-p", "svc", "--config", &config, "--state",
            ])
            .arg(other.path())
            .output()
            .expect("liveupdate")
    };
    let o = as_other("preview", "FIX-1");
    assert!(text(&o).contains("FAILED: console"), "{}", text(&o));
    assert!(text(&o).contains("wrong console token"), "{}", text(&o));
    let o = as_other("run", "FIX-1");
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong console token"), "{}", text(&o));
    // Nothing moved, nothing stopped.
    assert_eq!(lab.list(), before);
    let j = journal(&lab);
    assert!(
        j.contains("partition id 1 asked for the surrogate is taken"),
        "{j}"
    );
    let seen = client.finish();
    assert_eq!(seen.broken, 0);
    assert_eq!(seen.last, "hello from the original disk");
}

/// A fix may replace the very binary the workload runs: the workload resumes on the
/// mirror with the binary it had mapped, and the fix is in place beside it after.
#[test]
fn a_fix_of_the_binary_the_workload_runs_goes_in_and_the_workload_keeps_its_own() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.exe_fix(b"the fixed binary");
    let client = Client::connect(&addr);
    let o = lab.run("EXE-1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    client.wait_lines(100);
    let pid = lab.list()[0].2.clone();
    let running = std::fs::read(format!("/proc/{pid}/exe")).expect("its binary");
    let had = std::fs::read(lab.path("disks/svc/bin/liveupdate")).expect("the original's");
    assert!(
        running == had,
        "the workload's binary is not the one it had"
    );
    let root = orchestrate::disk::mounted_at(&lab.path("mirror/svc-LU0001")).expect("mounted");
    assert_eq!(
        std::fs::read(root.join("bin/liveupdate")).expect("the mirror's"),
        b"the fixed binary"
    );
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "{seen:?}");
}

/// What fails after the commit point (here the post hook) leaves the workload moved:
/// the operation says so in a WARNING line, on record, in the journal and by exit 5.
#[test]
fn a_failure_after_the_commit_point_is_a_warning_and_the_workload_moved() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    let cfg = std::fs::read_to_string(lab.config()).expect("config");
    std::fs::write(
        lab.config(),
        cfg.replace(
            "kext_check = no\n",
            "kext_check = no\n    post_hook = false\n",
        ),
    )
    .expect("config");
    let client = Client::connect(&addr);
    let o = lab.run("FIX-1", &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(5), "{out}");
    assert!(
        out.contains("WARNING: post hook \"false\" failed")
            && out.contains("succeeded with 1 warning(s)")
            && out.contains("Installed fix FIX-1 on the mirror"),
        "{out}"
    );
    client.wait_lines(100);
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.path("state/logs/LU0001/record.json")).expect("record"),
    )
    .expect("json");
    assert_eq!(rec["warnings"].as_array().map(Vec::len), Some(1), "{rec}");
    let j = journal(&lab);
    assert!(j.contains("1 warning(s): post hook"), "{j}");
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "{seen:?}");
}

/// A service that logs to its own disk: every line it logged, while the move ran too,
/// is in the log on the mirror, in order, none missing. Grown past what the blackout
/// has room to copy into the mirror, the log is refused in preview.
#[test]
fn a_service_logging_to_its_disk_moves_with_every_line_of_its_log() {
    let lab = Lab::new();
    let disk = lab.path("disks/svc");
    let d = disk.display().to_string();
    lab.ok(&["disk", "sample", &d]);
    let addr = lab.start_service_with("svc", &d, &["--log", "/var/log/demo.log"]);
    lab.fix("FIX-1", &[]);
    let client = Client::connect(&addr);
    let dir = lab.path("fixes").display().to_string();
    let o = lab.lu(&["preview", "-d", &dir, "FIX-1", "-p", "svc"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(
            "PASSED: the workload writes through 1 file(s) of its root (/var/log/demo.log"
        ),
        "{out}"
    );
    let o = lab.run("FIX-1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    client.wait_lines(100);
    let seen = client.finish();
    assert_eq!(seen.broken, 0, "{seen:?}");
    let root = orchestrate::disk::mounted_at(&lab.path("mirror/svc-LU0001")).expect("mounted");
    let numbers = |f: &Path| -> Vec<u64> {
        std::fs::read_to_string(f)
            .expect("the log")
            .lines()
            .map(|l| l.parse().expect("a number"))
            .collect()
    };
    let log = numbers(&root.join("var/log/demo.log"));
    assert!(
        log.iter().copied().eq(0..log.len() as u64),
        "lines missing or out of order in the log: {} lines",
        log.len()
    );
    // The last line sent may not be logged yet; every one before it is.
    assert!(
        log.len() as u64 + 1 >= seen.lines,
        "{} logged, {} sent",
        log.len(),
        seen.lines
    );
    // The original's log ends where the move did, a prefix of the mirror's.
    let before = numbers(&disk.join("var/log/demo.log"));
    assert!(
        !before.is_empty() && before.len() < log.len(),
        "{} then {}",
        before.len(),
        log.len()
    );

    // Rolled back live: the log it holds comes along again, every line in it.
    let client = Client::connect(&addr);
    let o = lab.lu(&["rollback", "-p", "svc"]);
    assert!(o.status.success(), "{}", text(&o));
    let seen = client.finish();
    assert_eq!(
        (seen.broken, &seen.last[..]),
        (0, "hello from the original disk"),
        "{seen:?}"
    );
    let root = orchestrate::disk::mounted_at(&lab.path("mirror/svc-LU0002")).expect("mounted");
    let after = numbers(&root.join("var/log/demo.log"));
    assert_eq!(
        after.iter().filter(|&&n| n == 0).count(),
        2,
        "a run of lines for each client"
    );
    let second = after.iter().rposition(|&n| n == 0).expect("a second run");
    assert_eq!(
        &after[..log.len()],
        &log[..],
        "the first client's lines kept"
    );
    assert!(
        after[second..]
            .iter()
            .copied()
            .eq(0..(after.len() - second) as u64),
        "lines of the second client missing or out of order"
    );

    // 64 MiB more: copying that into the next mirror does not fit in 20 ms.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("var/log/demo.log"))
        .expect("the log");
    std::io::Write::write_all(&mut f, &vec![b'x'; 64 << 20]).expect("grown");
    let o = lab.lu(&["preview", "-d", &dir, "FIX-1", "-p", "svc"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "FAILED: the workload writes through 1 file(s) of its root (/var/log/demo.log 64."
        ) && out.contains("more than the 20 ms allowed"),
        "{out}"
    );
}

#[test]
fn a_full_disk_is_refused_in_preview_and_in_run_and_nothing_moves() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    // A clone directory with room for far less than the disk (30 MiB of liveupdate).
    let clones = lab.path("clones");
    std::fs::create_dir_all(&clones).expect("mkdir");
    let mnt = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "small"])
        .arg(&clones)
        .status()
        .expect("mount");
    assert!(mnt.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(clones.clone());
    let client = Client::connect(&addr);
    let before = lab.list();
    let d = lab.path("fixes").display().to_string();
    let o = lab.lu(&["preview", "-d", &d, "FIX-1", "-p", "svc"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("FAILED: disk: the clone needs"),
        "{}",
        text(&o)
    );
    let o = lab.run("FIX-1", &[]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("FAILED: disk: the clone needs"), "{out}");
    assert!(
        out.contains("the workload runs on in partition svc"),
        "{out}"
    );
    assert_eq!(lab.list(), before);
    assert_eq!(
        std::fs::read_dir(&clones).expect("clones").count(),
        0,
        "a clone is left"
    );
    let seen = client.finish();
    assert_eq!(seen.broken, 0);
}

#[test]
fn a_cold_rollback_starts_the_workload_again_on_the_kept_disk() {
    let lab = Lab::new();
    let addr = lab.service("svc");
    lab.fix("FIX-1", &[]);
    let o = lab.run("FIX-1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let moved = lab.list();
    let o = lab.lu(&["rollback", "-p", "svc", "--cold"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("cold rollback of partition svc"), "{out}");
    let after = lab.list();
    assert_eq!(after.len(), 1);
    assert_eq!((&after[0].0[..], &after[0].1[..]), ("svc", "Running"));
    assert_ne!(after[0].2, moved[0].2, "started again: another pid");
    // A new client: the service of the kept disk, from the start.
    let seen = Client::connect(&addr).finish();
    assert_eq!(seen.broken, 0);
    assert_eq!(seen.first, "hello from the original disk");
    assert!(journal(&lab).contains("cold rollback"), "{}", journal(&lab));
}
