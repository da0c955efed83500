#![forbid(unsafe_code)]
//! Bad input gets a clear error naming the pid, the step and the resource, a non-zero
//! exit, and loses nothing: the workload keeps running, or nothing half-made survives.

use mcr_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| !st[st.rfind(')').unwrap_or(0)..].starts_with(") Z"))
        .unwrap_or(false)
}

/// A pid that no process has: one we just created and reaped.
fn free_pid() -> i32 {
    let mut c = Command::new("true").spawn().expect("spawning true");
    let pid = c.id() as i32;
    c.wait().expect("wait");
    pid
}

#[test]
fn missing_pid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pid = free_pid();
    let out = mcr(&[
        "checkpoint",
        "-t",
        &pid.to_string(),
        "-D",
        s(&tmp.path().join("img")),
    ]);
    assert_fails(&out, 3, &[&format!("pid {pid}"), "no such process"]);
    assert!(
        !tmp.path().join("img").exists(),
        "no image directory is left behind"
    );
}

#[test]
fn kernel_thread_cannot_be_traced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // pid 2 is kthreadd: a kernel thread, which ptrace refuses.
    assert_eq!(
        std::fs::read_to_string("/proc/2/comm")
            .expect("comm")
            .trim(),
        "kthreadd"
    );
    let out = mcr(&["checkpoint", "-t", "2", "-D", s(&tmp.path().join("img"))]);
    assert_fails(&out, 4, &["pid 2", "cannot trace", "PTRACE_SEIZE"]);
}

#[test]
fn process_traced_by_someone_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = Proc::start(&mut g, &workload_bin("counter"), &[], None);
    nix::sys::ptrace::seize(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::ptrace::Options::empty(),
    )
    .expect("seize");
    let out = mcr(&[
        "checkpoint",
        "-t",
        &p.pid.to_string(),
        "-D",
        s(&tmp.path().join("img")),
    ]);
    assert_fails(&out, 5, &[&format!("pid {}", p.pid), "traced by pid"]);
}

/// Starts the memory workload, runs a checkpoint that must fail, checks the workload is
/// intact afterwards.
fn failing_checkpoint(
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    code: i32,
    needles: &[&str],
) {
    let mut g = Guard::new();
    let mut p = Proc::start(&mut g, &workload_bin("memory"), &["16"], None);
    let pid = p.pid.to_string();
    let mut args = vec!["checkpoint", "-t", &pid, "-D", s(dir), "--shell-job"];
    args.extend_from_slice(extra);
    let out = Command::new(mcr_bin())
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("mcr");
    let mut n = needles.to_vec();
    let pid_s = format!("pid {pid}");
    n.push(&pid_s);
    assert_fails(&out, code, &n);
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn images_dir_not_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("something"), "x").expect("write");
    failing_checkpoint(tmp.path(), &[], &[], 6, &["not empty"]);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(at).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", s(at)])
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t tmpfs -o {opts}");
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn images_dir_not_writable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = Mount::tmpfs(&tmp.path().join("ro"), "ro,size=1m");
    failing_checkpoint(&m.0, &[], &[], 6, &["not writable"]);
}

#[test]
fn images_dir_runs_out_of_space() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = Mount::tmpfs(&tmp.path().join("small"), "size=2m");
    let dir = m.0.join("img");
    failing_checkpoint(&dir, &["--compress", "none"], &[], 6, &["No space left"]);
    assert!(!dir.exists(), "the partial image is removed");
}

#[test]
fn checkpoint_failing_late_leaves_the_workload_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("img");
    failing_checkpoint(
        &dir,
        &[],
        &[("MCR_FAULT", "dump-after-pages")],
        1,
        &["fault injected"],
    );
    assert!(!dir.exists(), "the partial image is removed");
}

/// A checkpointed (killed) counter whose image is in `dir`; returns its pid.
fn dumped_counter(dir: &Path) -> i32 {
    let mut g = Guard::new();
    let mut p = Proc::start(&mut g, &workload_bin("counter"), &[], None);
    checkpoint(p.pid, dir, &[]);
    p.wait();
    p.pid
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn corrupt_image_is_refused_before_any_process_exists() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = dumped_counter(&img);
    for file in ["inventory", "core", "pages"] {
        let len = std::fs::metadata(img.join(file)).expect("stat").len() as usize;
        for at in [0, 5, 9, len / 2, len - 1] {
            let bad = tmp.path().join(format!("bad-{file}-{at}"));
            copy_dir(&img, &bad);
            let mut bytes = std::fs::read(bad.join(file)).expect("read");
            bytes[at] ^= 0x40;
            std::fs::write(bad.join(file), bytes).expect("write");
            let out = mcr(&["restore", "-D", s(&bad), "--shell-job", "-d"]);
            assert_fails(&out, 6, &[file]);
            assert!(
                !alive(pid),
                "a process was created from a corrupt image ({file} byte {at})"
            );
        }
    }
    // The intact image still restores: the refusals above were about the damage.
    let mut g = Guard::new();
    let mut r = restore(&mut g, &img, &[]);
    assert_pass(&r.check());
}

#[test]
fn truncated_image_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = dumped_counter(&img);
    let bytes = std::fs::read(img.join("pages")).expect("read");
    std::fs::write(img.join("pages"), &bytes[..bytes.len() - 20]).expect("write");
    let out = mcr(&["restore", "-D", s(&img), "--shell-job", "-d"]);
    assert_fails(&out, 6, &["pages", "truncated"]);
    assert!(!alive(pid));
    let out = mcr(&["show", "-D", s(&img)]);
    assert_fails(&out, 6, &["pages"]);
}

#[test]
fn image_from_a_newer_or_older_format_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = dumped_counter(&img);
    let mut bytes = std::fs::read(img.join("inventory")).expect("read");
    bytes[4] += 1;
    std::fs::write(img.join("inventory"), &bytes).expect("write");
    let out = mcr(&["restore", "-D", s(&img), "--shell-job", "-d"]);
    assert_fails(&out, 6, &["inventory", "is newer"]);
    bytes[4] -= 2;
    std::fs::write(img.join("inventory"), &bytes).expect("write");
    let out = mcr(&["restore", "-D", s(&img), "--shell-job", "-d"]);
    assert_fails(&out, 6, &["inventory", "is older"]);
    assert!(!alive(pid));
}

#[test]
fn file_missing_under_root() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = dumped_counter(&img);
    let root = tmp.path().join("emptyroot");
    std::fs::create_dir(&root).expect("mkdir");
    let out = mcr(&[
        "restore",
        "-D",
        s(&img),
        "--shell-job",
        "-d",
        "--root",
        s(&root),
    ]);
    assert_fails(&out, 8, &[&format!("pid {pid}"), "No such file"]);
    assert!(!alive(pid));
}

#[test]
fn file_changed_since_the_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let img = tmp.path().join("img");
    let mut g = Guard::new();
    let mut p = Proc::start(&mut g, &workload_bin("files"), &[s(&data)], None);
    checkpoint(p.pid, &img, &[]);
    p.wait();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("data"))
        .expect("open");
    std::io::Write::write_all(&mut f, b"more").expect("append");
    let out = mcr(&["restore", "-D", s(&img), "--shell-job", "-d"]);
    assert_fails(
        &out,
        8,
        &[
            &format!("pid {}", p.pid),
            "data",
            "changed since the checkpoint",
        ],
    );
    assert!(!alive(p.pid));
}

#[test]
fn restore_failing_late_kills_what_it_made() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    let pid = dumped_counter(&img);
    let out = Command::new(mcr_bin())
        .args(["restore", "-D", s(&img), "--shell-job", "-d"])
        .env("MCR_FAULT", "restore-after-fill")
        .output()
        .expect("mcr");
    assert_fails(&out, 1, &[&format!("pid {pid}"), "fault injected"]);
    assert!(!alive(pid), "the half-made process survived");
    let mut g = Guard::new();
    let mut r = restore(&mut g, &img, &[]);
    assert_pass(&r.check());
}

#[test]
fn a_network_namespace_of_its_own_is_refused_and_the_workload_keeps_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").arg(workload_bin("counter"));
    let mut p = Proc::spawn(&mut g, cmd, Some("READY"));
    let pid = p.pid.to_string();
    let out = mcr(&[
        "checkpoint",
        "-t",
        &pid,
        "-D",
        s(&tmp.path().join("img")),
        "--shell-job",
    ]);
    assert_fails(
        &out,
        5,
        &[&format!("pid {pid}"), "net namespace of its own"],
    );
    assert_pass(&p.check());
}

#[test]
fn a_pty_with_bytes_in_flight_is_refused_and_the_workload_runs_on() {
    let mut g = Guard::new();
    let script = "import os, pty, sys\n\
                  m, s = pty.openpty()\n\
                  os.write(m, b'typed ahead\\n')\n\
                  print('READY', flush=True)\n\
                  sys.stdin.readline()\n\
                  print('PASS' if os.read(s, 100) == b'typed ahead\\n' else 'FAIL', flush=True)\n";
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", script], None);
    assert_refused(p, &["master of pty", "bytes in flight"]);
}

/// A python workload with a unix socket of `kind` connected to `path` (ours).
fn connected_to_us(g: &mut Guard, kind: &str, path: &Path, send: &str) -> Proc {
    let script = format!(
        "import socket, sys\n\
         s = socket.socket(socket.AF_UNIX, socket.{kind})\n\
         s.connect({path:?})\n\
         s.send(b'{send}')\n\
         print('READY', flush=True)\n\
         sys.stdin.readline()\n\
         s.send(b'after')\n\
         print('PASS', flush=True)\n",
        path = s(path)
    );
    Proc::start(g, Path::new("python3"), &["-c", &script], None)
}

#[test]
fn a_stream_socket_connected_outside_the_tree_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("ours.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let mut g = Guard::new();
    let mut p = connected_to_us(&mut g, "SOCK_STREAM", &path, "before");
    let (mut conn, _) = listener.accept().expect("accept");
    let img = tmp.path().join("img");
    let out = mcr(&[
        "checkpoint",
        "-t",
        &p.pid.to_string(),
        "-D",
        s(&img),
        "--shell-job",
    ]);
    assert_fails(
        &out,
        5,
        &[&format!("pid {}", p.pid), "peer", "outside the tree"],
    );
    assert_pass(&p.check());
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).expect("read");
    assert_eq!(got, "beforeafter", "the connection carried on untouched");
    assert_eq!(p.wait(), 0);
}

#[test]
fn a_datagram_socket_connected_outside_is_connected_again_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("log.sock");
    let ours = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    let mut g = Guard::new();
    let p = connected_to_us(&mut g, "SOCK_DGRAM", &path, "before");
    let mut buf = [0u8; 16];
    let n = ours.recv(&mut buf).expect("recv");
    assert_eq!(&buf[..n], b"before");
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    assert_pass(&r.check());
    let n = ours.recv(&mut buf).expect("recv");
    assert_eq!(&buf[..n], b"after", "the restored socket sends to us again");
    assert_eq!(r.wait(), 0);
}

#[test]
fn a_device_with_state_of_its_own_is_refused_by_name() {
    let mut g = Guard::new();
    let script = "import os, sys\n\
                  kvm = os.open('/dev/kvm', os.O_RDWR)\n\
                  print('READY', flush=True)\n\
                  sys.stdin.readline()\n\
                  print('PASS', flush=True)\n";
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", script], None);
    assert_refused(p, &["/dev/kvm", "whose state cannot be restored"]);
}

#[test]
fn established_tcp_connections_are_refused_naming_each_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let script = "import socket, sys\n\
                  l = socket.create_server(('127.0.0.1', 0))\n\
                  c = socket.create_connection(l.getsockname())\n\
                  a, _ = l.accept()\n\
                  print('READY', c.getsockname()[1], l.getsockname()[1], flush=True)\n\
                  sys.stdin.readline()\n\
                  c.sendall(b'still here')\n\
                  print('PASS' if a.recv(100) == b'still here' else 'FAIL', flush=True)\n";
    let mut p = Proc::start_until(&mut g, Path::new("python3"), &["-c", script], None, None);
    let ready = p.lines.expect_prefix("READY");
    let ports: Vec<&str> = ready.split(' ').skip(1).collect();
    let (client, server) = (ports[0], ports[1]);
    let img = tmp.path().join("img");
    let out = mcr(&[
        "checkpoint",
        "-t",
        &p.pid.to_string(),
        "-D",
        s(&img),
        "--shell-job",
    ]);
    assert_fails(
        &out,
        5,
        &[
            "2 TCP connections, which are only taken with --tcp-established",
            &format!("127.0.0.1:{client} -> 127.0.0.1:{server} (ESTABLISHED"),
            &format!("127.0.0.1:{server} -> 127.0.0.1:{client} (ESTABLISHED"),
        ],
    );
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn a_netlink_socket_is_refused_by_name() {
    let mut g = Guard::new();
    let script = "import socket, sys\n\
                  n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n\
                  print('READY', flush=True)\n\
                  sys.stdin.readline()\n\
                  print('PASS', flush=True)\n";
    let p = Proc::start(&mut g, Path::new("python3"), &["-c", script], None);
    assert_refused(p, &["a socket of a family not supported yet"]);
}
