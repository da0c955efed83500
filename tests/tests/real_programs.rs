#![forbid(unsafe_code)]
//! Programs we did not write, and a restore under another root.

use mcr_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PYTHON_LOOP: &str = r#"
import select, sys
N = 200000
state = {i: i * i for i in range(N)}
n = 0
sys.stdout.write("READY\n"); sys.stdout.flush()
while True:
    n += 1
    k = n % N
    state[k] = k * k
    r, _, _ = select.select([sys.stdin], [], [], 0)
    if r:
        break
sys.stdin.readline()
ok = n > 0 and all(state[i] == i * i for i in range(N))
print(("PASS" if ok else "FAIL") + " python iterations=%d" % n, flush=True)
"#;

#[test]
fn python3_interpreter_keeps_its_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", PYTHON_LOOP], None);
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
    eprintln!("{v}");
}

const PYTHON_THREADS: &str = r#"
import queue, sys, threading
q = queue.Queue()
done = []
def worker(n):
    total = 0
    while True:
        item = q.get()
        if item is None:
            break
        total += item * n
    done.append((n, total))
threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2, 3)]
for t in threads:
    t.start()
sys.stdout.write("READY\n"); sys.stdout.flush()
sys.stdin.readline()
for i in range(3000):
    q.put(i % 10)
for _ in threads:
    q.put(None)
for t in threads:
    t.join()
grand = sum(t for _, t in done)
ok = len(done) == 3 and grand > 0
print(("PASS" if ok else "FAIL") + " python threads total=%d" % grand, flush=True)
"#;

#[test]
fn python3_threads_and_queue_survive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", PYTHON_THREADS], None);
    let threads = std::fs::read_dir(format!("/proc/{}/task", p.pid))
        .expect("task")
        .count();
    assert_eq!(threads, 4, "python should run 4 threads");
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
}

/// sha256 of 1 GiB of "y\n", as `yes | head -c 1G | sha256sum` prints it.
const YES_1G_SHA256: &str = "d18e25082e4fcac81874c54428fad07ff6346942d33770fee2d806f5b8251940";

#[test]
fn shell_pipeline_loses_and_doubles_no_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start_until(
        &mut g,
        Path::new("sh"),
        &["-c", "yes | head -c 1G | sha256sum"],
        None,
        None,
    );
    // Mid-stream: the shell and its three children all exist, bytes are flowing.
    let deadline = Instant::now() + LINE_TIMEOUT;
    while tree_pids(p.pid).len() < 4 {
        assert!(Instant::now() < deadline, "the pipeline never started");
        std::thread::yield_now();
    }
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    let line = r.lines.next_line().expect("sha256sum output");
    assert_eq!(
        line.split_whitespace().next(),
        Some(YES_1G_SHA256),
        "digest after restore"
    );
    assert_eq!(r.wait(), 0, "sh exit status");
}

/// Waits until `pid` sits in clock_nanosleep (syscall 230), read from /proc.
fn wait_in_nanosleep(pid: i32) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.split(' ').next() == Some("230") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pid} never reached nanosleep: {sc}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn coreutils_sleep_still_exits_at_the_right_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let t0 = Instant::now();
    let mut p = Proc::start_until(&mut g, Path::new("sleep"), &["2"], None, None);
    wait_in_nanosleep(p.pid);
    let pid = p.pid;
    checkpoint(pid, &tmp.path().join("img"), &[]);
    assert_eq!(p.wait(), 128 + libc::SIGKILL);
    let mut r = restore(&mut g, &tmp.path().join("img"), &[]);
    assert_eq!(r.pid, pid);
    assert_eq!(r.wait(), 0, "sleep exit status");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "sleep 2 ended after {took:?}"
    );
    eprintln!("sleep 2 took {took:?} across checkpoint/restore");
}

/// Copies every file the image needs (from `mcr show --json`) under `root`, keeping
/// mtimes, as an operator would prepare a mirror of the original root.
fn mirror_needed_files(img: &Path, root: &Path) {
    let out = mcr(&["show", "--json", "-D", img.to_str().expect("utf-8")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    std::fs::create_dir_all(root).expect("mkdir root");
    // Paths appear as "path":"/..." in the JSON; every one of them is needed.
    let mut paths: Vec<&str> = text
        .split("\"path\":\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    for p in paths {
        let meta = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        if meta.is_dir() {
            std::fs::create_dir_all(root.join(p.trim_start_matches('/'))).expect("mkdir");
            continue;
        }
        let dest = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        let st = Command::new("cp")
            .args(["-a", p])
            .arg(&dest)
            .status()
            .expect("cp");
        assert!(st.success(), "cp -a {p} {}", dest.display());
    }
}

#[test]
fn restore_under_root_into_a_copy_of_the_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut r, root) = files_restored_under_root(&mut g, tmp.path(), &[]);
    let seen_root = std::fs::read_link(format!("/proc/{}/root", r.pid)).expect("readlink root");
    assert_eq!(seen_root, root);
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}

#[test]
fn restore_into_a_new_mount_namespace_rooted_at_the_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut r, root) = files_restored_under_root(&mut g, tmp.path(), &["--mntns", "--pidns"]);
    let init = parent_of(r.pid);
    g.add(init);
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt ns");
    assert_ne!(ns(&r.pid.to_string()), ns("self"));
    // Pivoted, not chrooted: the copy is its whole world, with a proc of its own whose
    // pid 1 is the namespace's init.
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", r.pid)).expect("mountinfo");
    let top = mounts.lines().next().expect("a mount");
    assert!(top.contains(root.to_str().expect("utf-8")), "{top}");
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(4) == Some("/tmp")),
        "our mounts are still there: {mounts}"
    );
    let init_stat = std::fs::read_to_string(format!("/proc/{}/root/proc/1/stat", r.pid))
        .expect("/proc/1/stat inside");
    assert!(init_stat.starts_with("1 "), "{init_stat}");
    assert_pass(&r.check());
    assert_eq!(wait_pid(init), 0, "the init ends as the root did");
}

/// The `files` workload, checkpointed, the files it needs copied under a new root in
/// `tmp`, and restored there with `extra` options. Returns it and the canonical root.
fn files_restored_under_root(g: &mut Guard, tmp: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let data = tmp.join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let img = tmp.join("img");
    let root = tmp.join("root");
    let mut p = Proc::start(
        g,
        &workload_bin("files"),
        &[data.to_str().expect("utf-8"), "--moved"],
        None,
    );
    checkpoint(p.pid, &img, &[]);
    p.wait();
    mirror_needed_files(&img, &root);
    std::fs::create_dir_all(root.join("proc")).expect("mkdir proc");
    let mut args = vec!["--root", root.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let r = restore(g, &img, &args);
    (r, root.canonicalize().expect("canonical root"))
}

#[test]
fn a_bash_job_tree_waits_for_its_restored_child() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    // A subshell reading the job's stdin (through fd 3: bash gives background jobs
    // /dev/null otherwise), and bash in `wait` for it.
    let script =
        "exec 3<&0; (read line <&3; echo \"child got $line\") & echo READY; wait; echo parent done";
    let p = Proc::start(&mut g, Path::new("bash"), &["-c", script], None);
    let deadline = Instant::now() + LINE_TIMEOUT;
    while tree_pids(p.pid).len() < 2 || !in_syscall(tree_pids(p.pid)[1], 0) {
        assert!(
            Instant::now() < deadline,
            "the subshell never blocked in read"
        );
        std::thread::yield_now();
    }
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    r.send("CHECK");
    assert_eq!(r.lines.next_line().as_deref(), Some("child got CHECK"));
    assert_eq!(r.lines.next_line().as_deref(), Some("parent done"));
    assert_eq!(r.wait(), 0);
}

/// Whether `pid` sits in syscall `nr` (from /proc/PID/syscall).
fn in_syscall(pid: i32, nr: u32) -> bool {
    let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    sc.split(' ').next() == Some(&nr.to_string())
}

/// The controlling terminal of `pid` as a pty index, from /proc/PID/stat (tty_nr).
fn ctty_pts(pid: i32) -> Option<u32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &st[st.rfind(')')? + 2..];
    let tty: u64 = after.split(' ').nth(4)?.parse().ok()?;
    let (major, minor) = ((tty >> 8) & 0xfff, (tty & 0xff) | ((tty >> 12) & 0xfff00));
    (major == 136).then_some(minor as u32)
}

#[test]
fn a_shell_job_on_a_terminal_comes_back_on_the_restorers_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let counter = workload_bin("counter");
    // script gives the job a pty; sh, the session leader, stays outside the dump.
    let job = format!("sh -c '{}; echo job over'", counter.display());
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &job, "/dev/null"]);
    let mut outer = Proc::spawn(&mut g, cmd, Some("READY"));
    let pid = *tree_pids(outer.pid)
        .iter()
        .find(|&&p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == counter))
        .expect("the counter under script");
    g.add(pid);
    let before = ctty_pts(pid).expect("the job has a pty as its terminal");
    let img = tmp.path().join("img");
    checkpoint(pid, &img, &[]);
    outer.lines.expect_prefix("job over");
    assert_eq!(outer.wait(), 0);

    // Restored from another terminal (not the same one again: the old index is held
    // now), the job's stdio and terminal are that one.
    let _hold = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ptmx")
        .expect("opening a pty");
    let restore = format!(
        "{} restore --shell-job -D {}",
        mcr_bin().display(),
        img.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &restore, "/dev/null"]);
    let mut r = Proc::spawn(&mut g, cmd, Some("mcr: restored pid"));
    let now = ctty_pts(pid).expect("the restored job has a pty as its terminal");
    let fd0 = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("fd 0");
    assert_eq!(
        fd0,
        Path::new(&format!("/dev/pts/{now}")),
        "stdio is the new terminal"
    );
    assert_ne!(now, before);
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0, "mcr restore passes the job's exit code on");
}
