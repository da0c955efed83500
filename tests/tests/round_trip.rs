#![forbid(unsafe_code)]
//! Checkpoint → kill → restore → the workload verifies itself, for each kind of state.

use mcr_tests::*;
use std::path::Path;

fn run(name: &str, args: &[&str], cwd: Option<&Path>) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, &workload_bin(name), args, cwd);
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0, "{name} exit status after PASS");
    v
}

#[test]
fn counter_keeps_counting() {
    let v = run("counter", &[], None);
    eprintln!("{v}");
}

#[test]
fn memory_64mib_with_recent_writes_brk_and_mmap_after_restore() {
    run("memory", &["64"], None);
}

#[test]
fn fpu_and_avx_registers_survive_a_blocking_read() {
    run("fpu", &[], None);
}

#[test]
fn files_offsets_append_devices_cwd_umask() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).expect("mkdir");
    run("files", &[dir.to_str().expect("utf-8")], None);
}

#[test]
fn signals_handlers_altstack_pending_and_limits() {
    run("signals", &[], None);
}

#[test]
fn nanosleep_is_not_cut_short() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, &workload_bin("sleeper"), &["1500"], None);
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    let slept = r.lines.expect_prefix("SLEPT");
    let v = r.check();
    assert_pass(&v);
    eprintln!("{slept}; {v}");
}

#[test]
fn compression_none_and_levels_round_trip() {
    for level in ["none", "fast", "3"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut g = Guard::new();
        let p = Proc::start(&mut g, &workload_bin("memory"), &["16"], None);
        let mut r = round_trip(
            &mut g,
            p,
            &tmp.path().join("img"),
            &["--compress", level],
            &[],
        );
        assert_pass(&r.check());
    }
}

#[test]
fn leave_running_then_restore_meets_the_taken_pid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("img");
    let mut g = Guard::new();
    let mut p = Proc::start(&mut g, &workload_bin("memory"), &["16"], None);
    checkpoint(p.pid, &dir, &["--leave-running"]);
    // The original keeps running and is intact.
    let out = mcr(&[
        "restore",
        "-D",
        dir.to_str().expect("utf-8"),
        "--shell-job",
        "-d",
    ]);
    assert_fails(&out, 7, &[&format!("pid {}", p.pid), "taken"]);
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn leave_stopped_stays_stopped_until_continued() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut p = Proc::start(&mut g, &workload_bin("counter"), &[], None);
    checkpoint(p.pid, &tmp.path().join("img"), &["--leave-stopped"]);
    let st = kext_state(p.pid);
    assert_eq!(st, 'T', "state after --leave-stopped");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    assert_pass(&p.check());
}

fn kext_state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    s[s.rfind(')').expect(")") + 2..]
        .chars()
        .next()
        .expect("state")
}

/// What /proc says a process is: cmdline, environ, exe, auxv, comm and the mm bounds.
fn identity(pid: i32) -> Vec<String> {
    let f = |n: &str| {
        std::fs::read(format!("/proc/{pid}/{n}"))
            .map(|b| format!("{n}: {b:?}"))
            .expect(n)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
    // proc(5) numbering: start_code 26, end_code 27, start_stack 28, 45..=51 data/brk/arg/env.
    let mm: Vec<&str> = [26, 27, 28, 45, 46, 47, 48, 49, 50, 51]
        .iter()
        .map(|&n| fields[n - 3])
        .collect();
    vec![
        f("cmdline"),
        f("environ"),
        f("auxv"),
        f("comm"),
        format!(
            "exe: {:?}",
            std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe")
        ),
        format!("mm: {mm:?}"),
    ]
}

#[test]
fn identity_cmdline_environ_exe_auxv_and_mm_bounds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new(workload_bin("counter"));
    cmd.arg("an-argument").env("MCR_TEST_MARK", "kept");
    let p = Proc::spawn(&mut g, cmd, Some("READY"));
    let before = identity(p.pid);
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    assert_eq!(identity(r.pid), before);
    assert_pass(&r.check());
}

#[test]
fn unprivileged_credentials_come_back() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new(workload_bin("counter"));
    cmd.uid(65534).gid(65534).current_dir("/");
    let p = Proc::spawn(&mut g, cmd, Some("READY"));
    let ids = |pid: i32| -> Vec<String> {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        st.lines()
            .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:"))
            .map(str::to_string)
            .collect()
    };
    let before = ids(p.pid);
    assert!(before[0].contains("65534"), "{before:?}");
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    assert_eq!(ids(r.pid), before);
    assert_pass(&r.check());
}

#[test]
fn four_threads_blocked_in_futex_poll_nanosleep_keep_tids_and_state() {
    let v = run("threads", &[], None);
    eprintln!("{v}");
}

#[test]
fn process_tree_with_groups_sessions_and_a_shared_file_offset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let v = run("tree", &[data.to_str().expect("utf-8")], None);
    eprintln!("{v}");
}

#[test]
fn eventfd_timerfd_signalfd_and_epoll_come_back_with_their_state() {
    let v = run("objects", &[], None);
    eprintln!("{v}");
}

/// A cgroup directory of our own (v2, or in the v1 freezer hierarchy), removed when
/// dropped (once empty).
struct Cgroup(std::path::PathBuf);

impl Cgroup {
    fn new(name: &str) -> Cgroup {
        Self::under(name, |fs, _| fs == "cgroup2")
    }

    fn new_v1_freezer(name: &str) -> Cgroup {
        Self::under(name, |fs, opts| {
            fs == "cgroup" && opts.split(',').any(|o| o == "freezer")
        })
    }

    /// In the first mount whose (fs type, super options) `pick` accepts.
    fn under(name: &str, pick: impl Fn(&str, &str) -> bool) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mount = mounts
            .lines()
            .find(|l| {
                l.split(" - ").nth(1).is_some_and(|t| {
                    let f: Vec<&str> = t.split(' ').collect();
                    f.len() > 2 && pick(f[0], f[2])
                })
            })
            .and_then(|l| l.split(' ').nth(4))
            .expect("the cgroup hierarchy is mounted");
        let dir = std::path::Path::new(mount).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("creating a cgroup");
        Cgroup(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_tree_alone_in_a_v1_freezer_cgroup_is_frozen_through_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let cg = Cgroup::new_v1_freezer("mcr-test-v1");
    let mut g = Guard::new();
    // The whole tree is born in the cgroup: the parent joins it before it forks.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} {}",
        cg.0.display(),
        workload_bin("tree").display(),
        data.display()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &script]);
    let mut p = Proc::spawn(&mut g, cmd, Some("READY"));
    let tree = tree_pids(p.pid);
    for &t in &tree[1..] {
        g.add(t);
    }
    let img = tmp.path().join("img");
    let pid = p.pid.to_string();
    let out = mcr(&[
        "checkpoint",
        "-t",
        &pid,
        "-D",
        img.to_str().expect("utf-8"),
        "--shell-job",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("\"freezer\":\"cgroup-v1\""), "{report}");
    let state = std::fs::read_to_string(cg.0.join("freezer.state")).expect("freezer.state");
    assert_eq!(state.trim(), "THAWED");
    p.wait();
    // Its killed children are ours to reap (we are their subreaper).
    for &t in &tree[1..] {
        wait_pid(t);
    }
    let mut r = restore(&mut g, &img, &[]);
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}

#[test]
fn a_tree_alone_in_its_cgroup_is_frozen_through_it() {
    for explicit in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup::new(if explicit {
            "mcr-test-explicit"
        } else {
            "mcr-test-auto"
        });
        let mut g = Guard::new();
        let mut p = Proc::start(&mut g, &workload_bin("threads"), &[], None);
        std::fs::write(cg.0.join("cgroup.procs"), p.pid.to_string()).expect("moving the workload");
        let img = tmp.path().join("img");
        let pid = p.pid.to_string();
        let mut args = vec![
            "checkpoint",
            "-t",
            &pid,
            "-D",
            img.to_str().expect("utf-8"),
            "--shell-job",
            "--json",
        ];
        let cgdir = cg.0.to_str().expect("utf-8").to_string();
        if explicit {
            args.extend(["--freeze-cgroup", &cgdir]);
        }
        let out = mcr(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains("\"freezer\":\"cgroup\""), "{report}");
        p.wait();
        let frozen = std::fs::read_to_string(cg.0.join("cgroup.freeze")).expect("cgroup.freeze");
        assert_eq!(frozen.trim(), "0", "the cgroup is thawed");
        let mut r = restore(&mut g, &img, &[]);
        assert_pass(&r.check());
        assert_eq!(r.wait(), 0);
    }
}

#[test]
fn unix_socket_pairs_keep_what_is_queued_and_message_boundaries() {
    let v = run("sockets", &[], None);
    eprintln!("{v}");
}

/// What a restore makes must itself be a faithful process: dump it again.
#[test]
fn restored_processes_can_be_checkpointed_and_restored_again() {
    for name in ["tree", "threads", "objects", "sockets"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let args: &[&str] = if name == "tree" {
            &[data.to_str().expect("utf-8")]
        } else {
            &[]
        };
        let mut g = Guard::new();
        let p = Proc::start(&mut g, &workload_bin(name), args, None);
        let r1 = round_trip(&mut g, p, &tmp.path().join("img1"), &[], &[]);
        let mut r2 = round_trip(&mut g, r1, &tmp.path().join("img2"), &[], &[]);
        let v = r2.check();
        assert!(v.starts_with("PASS"), "{name} after two round trips: {v}");
        assert_eq!(r2.wait(), 0);
    }
}

#[test]
fn a_pty_pair_inside_the_tree_keeps_its_index_settings_and_session() {
    let v = run("pty", &[], None);
    eprintln!("{v}");
}

#[test]
fn unix_sockets_accepted_waiting_bound_and_connected_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let v = run("usock", &[tmp.path().to_str().expect("utf-8")], None);
    eprintln!("{v}");
}

#[test]
fn tcp_listeners_and_udp_sockets_come_back_bound_with_their_options() {
    let v = run("inet", &[], None);
    eprintln!("{v}");
}

/// One end of a socket pair whose other end the program closed after writing to it:
/// what was written is read, then end of file, and a write fails with EPIPE.
const PY_PEER_CLOSED: &str = r#"
import socket, sys
a, b = socket.socketpair()
b.sendall(b"left behind")
b.close()
print("READY", flush=True)
sys.stdin.readline()
got = a.recv(100)
eof = a.recv(100)
try:
    a.send(b"x")
    pipe = False
except BrokenPipeError:
    pipe = True
ok = got == b"left behind" and eof == b"" and pipe
print(("PASS" if ok else "FAIL") + " got=%r eof=%r epipe=%s" % (got, eof, pipe), flush=True)
"#;

#[test]
fn a_socket_pair_whose_peer_was_closed_keeps_what_it_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", PY_PEER_CLOSED], None);
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}
