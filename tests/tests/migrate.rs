#![forbid(unsafe_code)]
//! Live migration on one host: `mcr migrate` to an `mcr receive` that restores into a
//! new pid namespace (the original's pids are taken until the commit). The workload
//! (`churn`) rewrites its memory throughout and checks every byte at the destination.
//! Every failure before the commit must leave the original running, untracked.

use mcr_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Output;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn migrate(pid: i32, to: &str, extra: &[&str]) -> Output {
    let pid_s = pid.to_string();
    let mut args = vec!["migrate", "-t", &pid_s, "--to", to, "--shell-job"];
    args.extend_from_slice(extra);
    mcr(&args)
}

/// The original ran on: it answers, passes its own check, and nothing tracks it.
fn runs_on_untouched(mut p: Proc) {
    assert!(running(p.pid), "the original is gone");
    // The tracking ends with the holder, which the failed migration stopped.
    assert!(
        !tracked_anywhere(p.pid),
        "write tracking left in the workload"
    );
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn a_workload_moves_to_the_destination_and_the_original_dies_after() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("mig.sock");
    let to = format!("unix:{}", s(&sock));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "32");
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let out = migrate(p.pid, &to, &["--json"]);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    let rounds = report["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty(), "{report}");
    // The destination built the tree from the rounds and finished it from the last
    // image (warm restore).
    assert_eq!(report["warm"], true, "{report}");
    assert!(
        rounds.iter().all(|r| r["apply_ms"].as_f64().is_some()),
        "{report}"
    );
    assert!(
        rounds[0]["pages"].as_u64().unwrap() >= 32 * 256,
        "the first round copies it all: {report}"
    );
    assert!(
        report["final_pages"].as_u64().unwrap() < rounds[0]["pages"].as_u64().unwrap() / 4,
        "the last image holds what was written since: {report}"
    );
    for k in [
        "freeze_and_dump_ms",
        "transfer_ms",
        "restore_ms",
        "commit_ms",
    ] {
        assert!(report["blackout"][k].as_f64().is_some(), "{k}: {report}");
    }
    assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
    let mut moved = recv.workload(&mut g);
    assert_ne!(moved.pid, p.pid);
    assert_eq!(report["new_pid"].as_i64().unwrap() as i32, moved.pid);
    assert_pass(&moved.check());
}

/// A partition's tree is the init of its own pid namespace: the rounds name it as it
/// sees itself, as the checkpoint does, so the destination builds it from them, and
/// its writes are followed from one round to the next by those names.
#[test]
fn the_init_of_its_own_pid_namespace_moves_warm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("mig.sock");
    let to = format!("unix:{}", s(&sock));
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(workload_bin("churn"))
        .args([s(&tmp.path().join("churn-file")), "16", "4"]);
    let mut outer = Proc::spawn(&mut g, cmd, Some("READY"));
    let root = tree_pids(outer.pid)[1];
    g.add(root);
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &[], &[]);
    let out = migrate(root, &to, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(report["warm"], true, "{report}");
    // Its writes were tracked from round to round: the last image holds only those.
    let first = report["rounds"][0]["pages"]
        .as_u64()
        .expect("a first round");
    assert!(first >= 16 * 256, "{report}");
    assert!(
        report["final_pages"].as_u64().expect("final pages") < first / 4,
        "every round copied it all: {report}"
    );
    outer.wait();
    let mut moved = recv.workload(&mut g);
    let nspid = std::fs::read_to_string(format!("/proc/{}/status", moved.pid)).expect("status");
    assert!(
        nspid
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "{nspid}"
    );
    assert_pass(&moved.check());
}

#[test]
fn a_destination_that_cannot_restore_leaves_the_original_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "8");
    let mut recv = Receiver::start(
        &to,
        &tmp.path().join("pid"),
        &["--pidns"],
        &[("MCR_FAULT", "restore-after-fill")],
    );
    let out = migrate(p.pid, &to, &[]);
    assert_fails(
        &out,
        10,
        &["destination failed", "fault injected", "runs on here"],
    );
    assert_eq!(recv.wait(), 1);
    runs_on_untouched(p);
}

#[test]
fn a_destination_without_pid_namespace_meets_the_taken_pid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "4");
    // On one host the original holds its pid until the commit: the restore must refuse.
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &[], &[]);
    let out = migrate(p.pid, &to, &[]);
    assert_fails(&out, 10, &[&format!("pid {}", p.pid), "taken"]);
    assert_eq!(recv.wait(), 7);
    runs_on_untouched(p);
}

/// A destination that takes `keep` bytes of the stream, then goes away.
/// A destination that welcomes the source (images as bytes, not links), takes `keep`
/// bytes of the stream, then goes away.
fn dying_destination(sock: &Path, keep: usize) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).expect("bind");
    std::thread::spawn(move || {
        let (c, _) = l.accept().expect("accept");
        let mut w = transport::FrameWriter::new(
            c.try_clone().expect("clone"),
            transport::Compression::Off,
            "to the source",
        );
        // Frame 0 of our direction: WELCOME (13).
        w.send(13, br#"{"link":false}"#).expect("welcome");
        let mut c = c;
        let mut got = vec![0u8; keep];
        let _ = c.read_exact(&mut got);
    })
}

#[test]
fn a_destination_dying_during_pre_copy_leaves_the_original_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("mig.sock");
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "16");
    let dest = dying_destination(&sock, 3 << 20);
    let out = migrate(p.pid, &format!("unix:{}", s(&sock)), &[]);
    assert_fails(
        &out,
        9,
        &[&format!("pid {}", p.pid), "sending image round-0"],
    );
    dest.join().expect("destination thread");
    runs_on_untouched(p);
}

/// Relays the source's bytes to the real destination with one byte flipped at
/// `flip_at`, and the answers back.
fn corrupting_relay(front: &Path, back: &Path, flip_at: usize) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(front).expect("bind");
    let back = back.to_path_buf();
    std::thread::spawn(move || {
        let (mut src, _) = l.accept().expect("accept");
        let mut dst = UnixStream::connect(&back).expect("connect to the destination");
        let (mut src2, mut dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let answers = std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst2, &mut src2);
        });
        let mut at = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (at..at + n).contains(&flip_at) {
                buf[flip_at - at] ^= 0x40;
            }
            at += n;
            if dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = dst.shutdown(std::net::Shutdown::Write);
        let _ = answers.join();
    })
}

#[test]
fn a_corrupted_frame_is_caught_and_the_original_runs_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (front, back) = (tmp.path().join("front.sock"), tmp.path().join("back.sock"));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "8");
    // A work directory on another filesystem than the source's staging (/dev/shm): the
    // images cross the stream as bytes, not as links.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let mut recv = Receiver::start(
        &format!("unix:{}", s(&back)),
        &tmp.path().join("pid"),
        &["--pidns", "--workdir", s(&work)],
        &[],
    );
    let relay = corrupting_relay(&front, &back, 1 << 20);
    // Pages in the stream, not left in the workload for the destination to read.
    let out = migrate(p.pid, &format!("unix:{}", s(&front)), &["--copy-pages"]);
    assert!(!out.status.success(), "a corrupted migration succeeded");
    assert_eq!(recv.wait(), 9);
    let err = recv.stderr.expect_prefix("mcr: error");
    assert!(err.contains("crc mismatch"), "{err}");
    relay.join().expect("relay");
    runs_on_untouched(p);
}

#[test]
fn bad_destinations_are_refused_before_anything_happens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "1");
    let out = migrate(p.pid, "carrier-pigeon:home", &[]);
    assert_fails(&out, 2, &["unknown scheme"]);
    let out = migrate(p.pid, &format!("file:{}", s(&tmp.path().join("f"))), &[]);
    assert_fails(&out, 2, &["use unix:PATH or tcp:HOST:PORT"]);
    let out = migrate(
        p.pid,
        &format!("unix:{}", s(&tmp.path().join("nobody"))),
        &[],
    );
    assert_fails(&out, 9, &["connecting to the destination"]);
    runs_on_untouched(p);
}

#[test]
fn the_demo_migrates_its_workload_and_the_workload_passes() {
    let out = mcr(&["demo", "--mib", "16"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("pre-copy round 0"), "{text}");
    assert!(text.contains("workload says: PASS"), "{text}");
    assert!(text.contains("blackout the workload saw"), "{text}");
    assert!(text.trim_end().ends_with("mcr demo: PASS"), "{text}");
}

/// Memory past the size from which the scan of written pages is split over the cores
/// (128 MiB, dump/track.rs), written fast: a write in any piece that a round or the
/// last image missed fails the workload's check of every page.
#[test]
fn a_workload_whose_scan_is_split_over_the_cores_loses_not_one_write() {
    let out = mcr(&["demo", "--mib", "320", "--dirty-mib-s", "128"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("pre-copy round 1"), "{text}");
    assert!(text.contains("workload says: PASS"), "{text}");
}

/// Runs `mcr migrate` with `MCR_FAULT=point`, waits until it stalls there, and kills it
/// with SIGKILL.
fn migrate_killed_at(pid: i32, to: &str, point: &str) {
    let mut m = std::process::Command::new(mcr_bin())
        .args(["migrate", "-t", &pid.to_string(), "--to", to, "--shell-job"])
        .env("MCR_FAULT", point)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mcr migrate");
    let mut err = Lines::new(m.stderr.take().expect("stderr"));
    err.expect_prefix(&format!("mcr: stalled at {point}"));
    m.kill().expect("SIGKILL");
    m.wait().expect("reaping mcr migrate");
}

#[test]
fn migrate_killed_before_the_commit_point_leaves_the_original_running() {
    for point in ["migrate-stall-after-round", "migrate-stall-at-ready"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
        let mut g = Guard::new();
        let p = start_churn(&mut g, tmp.path(), "8");
        let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
        migrate_killed_at(p.pid, &to, point);
        // The destination saw the source go and dropped what it had made.
        assert_ne!(recv.wait(), 0, "{point}: the destination went on alone");
        assert!(
            !tmp.path().join("pid").exists(),
            "{point}: something was restored"
        );
        wait_running(p.pid);
        runs_on_untouched(p);
    }
}

/// The program that started mcr, told at ready on a socket it gave (`--at-ready-fd`),
/// decides inside the blackout: GO moves the workload; anything else, or a socket
/// closed unanswered, abandons the move and the original runs on.
#[test]
fn the_peer_told_at_ready_decides_whether_the_move_goes_on() {
    for answer in ["NO not now\n", "", "GO\n"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
        let mut g = Guard::new();
        let mut p = start_churn(&mut g, tmp.path(), "8");
        let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .expect("inheritable");
        let peer = std::thread::spawn(move || {
            let mut ours = ours;
            let mut told = [0u8; 6];
            ours.read_exact(&mut told).expect("READY");
            assert_eq!(&told, b"READY\n");
            ours.write_all(answer.as_bytes()).expect("answer");
        });
        let out = migrate(p.pid, &to, &["--at-ready-fd", &fd.to_string()]);
        drop(theirs);
        peer.join().expect("peer");
        let err = String::from_utf8_lossy(&out.stderr);
        if answer == "GO\n" {
            assert!(out.status.success(), "migrate failed: {err}");
            assert_eq!(p.wait(), 128 + libc::SIGKILL);
            let mut moved = recv.workload(&mut g);
            assert_pass(&moved.check());
            continue;
        }
        assert!(!out.status.success(), "{answer:?}: it moved");
        let why = match answer {
            "" => "closed the socket without an answer".to_string(),
            a => format!("answered {:?}", a.trim_end()),
        };
        assert!(err.contains(&why), "{answer:?}: {err}");
        assert_ne!(recv.wait(), 0, "{answer:?}: the destination went on alone");
        wait_running(p.pid);
        runs_on_untouched(p);
    }
    // Not a socket: refused before anything happens.
    let out = mcr(&[
        "migrate",
        "-t",
        "1",
        "--to",
        "unix:/nonexistent",
        "--at-ready-fd",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn migrate_killed_after_the_commit_point_leaves_the_original_stopped_not_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "8");
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    migrate_killed_at(p.pid, &to, "migrate-stall-at-commit");
    // Never told to take over, the destination dropped its copy...
    assert_ne!(recv.wait(), 0);
    assert!(!tmp.path().join("pid").exists());
    // ...and the original, stopped for good, does not run on by itself: nothing ran twice.
    wait_state(p.pid, 'T');
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    runs_on_untouched(p);
}

#[test]
fn twenty_migrations_in_a_row_lose_not_one_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "8");
    let first = p.pid;
    for i in 0..20 {
        let to = format!("unix:{}", s(&tmp.path().join(format!("mig{i}.sock"))));
        let pidfile = tmp.path().join(format!("pid{i}"));
        // Every other move with its images as bytes (a work directory on another
        // filesystem than /dev/shm), the others by link.
        let work = tmp.path().join(format!("work{i}"));
        std::fs::create_dir(&work).expect("mkdir");
        let extra: &[&str] = if i % 2 == 0 {
            &["--pidns", "--workdir", s(&work)]
        } else {
            &["--pidns"]
        };
        let recv = Receiver::start(&to, &pidfile, extra, &[]);
        let out = migrate(p.pid, &to, &["--json"]);
        assert!(
            out.status.success(),
            "migration {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
        assert_eq!(report["linked"], i % 2 == 1, "{report}");
        let moved = recv.workload(&mut g);
        // It kept its pid, as it sees it, through every move.
        let nspid = std::fs::read_to_string(format!("/proc/{}/status", moved.pid))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:").map(str::to_string))
            .expect("NSpid");
        assert_eq!(
            nspid.split_whitespace().last(),
            Some(first.to_string().as_str()),
            "migration {i}: {nspid}"
        );
        p = moved;
    }
    let v = p.check();
    assert_pass(&v);
}

/// Migrates `p` pausing after each round the destination put in place, where `between`
/// may change the workload (it is told how many rounds went before); returns the report.
fn migrate_changed_between_rounds(
    p: &mut Proc,
    to: &str,
    between: impl FnMut(&mut Proc, usize),
) -> serde_json::Value {
    let out = migrate_pausing_at(p, to, "migrate-wait-after-round", between);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json")
}

/// Runs `mcr migrate --json` on `p` with `MCR_FAULT=point`, a wait point: each time it
/// waits there, `at` may change the workload (it is told how many times it waited).
fn migrate_pausing_at(
    p: &mut Proc,
    to: &str,
    point: &str,
    mut at: impl FnMut(&mut Proc, usize),
) -> Output {
    use std::process::{Command, Stdio};
    let mut m = Command::new(mcr_bin())
        .args([
            "migrate",
            "-t",
            &p.pid.to_string(),
            "--to",
            to,
            "--shell-job",
        ])
        .args(["--json", "--max-rounds", "3"])
        .env("MCR_FAULT", point)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mcr migrate");
    let mut stdin = m.stdin.take().expect("stdin");
    let mut err = Lines::new(m.stderr.take().expect("stderr"));
    let mut said = Vec::new();
    let mut rounds = 0;
    while let Some(line) = err.next_line() {
        // The first of the points is where it waits.
        let waits = point.split(',').next().unwrap_or(point);
        if line.starts_with(&format!("mcr: waiting at {waits}")) {
            rounds += 1;
            at(p, rounds);
            stdin.write_all(b"\n").expect("letting mcr migrate go on");
        } else {
            said.push(line);
        }
    }
    let mut out = m.wait_with_output().expect("mcr migrate");
    out.stderr = said.join("\n").into_bytes();
    out
}

#[test]
fn the_tree_built_from_the_rounds_follows_its_memory_changing_shape() {
    // Between rounds: pages dropped, a region unmapped and mapped elsewhere, one moved
    // by mremap, a file page dropped, the heap grown, a write through mprotect. The
    // destination's tree must follow each, or the workload's own check fails.
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "16");
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let report = migrate_changed_between_rounds(&mut p, &to, |p, _| {
        p.send("CHURN");
        p.lines.expect_prefix("CHURNED");
    });
    assert!(
        report["rounds"].as_array().expect("rounds").len() >= 2,
        "{report}"
    );
    assert_eq!(report["warm"], true, "{report}");
    assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
    let mut moved = recv.workload(&mut g);
    assert_pass(&moved.check());
}

#[test]
fn pages_a_round_left_in_the_workload_and_unmapped_before_they_were_read_come_again() {
    // On one host a round's pages stay in the workload until the destination reads
    // them. Here it reshapes its memory (regions unmapped, moved, remapped) after the
    // first round and before the destination reads it: what is gone there is left to
    // the next round, the tree stays warm, and the workload's own check passes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "16");
    let mut recv = Receiver::start(
        &to,
        &tmp.path().join("pid"),
        &["--pidns"],
        &[("MCR_FAULT", "receive-wait-before-warm")],
    );
    let pid = p.pid;
    let m = std::thread::spawn(move || migrate(pid, &to, &["--json", "--max-rounds", "3"]));
    recv.stderr
        .expect_prefix("mcr: waiting at receive-wait-before-warm");
    p.send("CHURN");
    p.lines.expect_prefix("CHURNED");
    recv.tell("");
    let out = m.join().expect("mcr migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(report["pages_in_source"], true, "{report}");
    assert_eq!(report["warm"], true, "{report}");
    assert!(
        report["gone_from_source"].as_u64() > Some(0),
        "nothing was gone: {report}"
    );
    assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
    let mut moved = recv.workload(&mut g);
    assert_pass(&moved.check());
}

/// While the destination is busy (held here before it takes the first round), the
/// source scans the running workload's writes every 250 ms, protecting them again as
/// it reads them, so that its next round's frozen scan finds only what came since.
/// The workload reshapes its memory between those scans (pages dropped, regions
/// unmapped and mapped again at the same place, moved) while it rewrites pages: every
/// write still arrives. The pages are copied at each round, as for another host: left
/// in the workload, they would be read after the hold, and a write the scans protected
/// and then forgot would come along all the same.
#[test]
fn writes_scanned_while_the_destination_is_busy_all_arrive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "16");
    let mut recv = Receiver::start(
        &to,
        &tmp.path().join("pid"),
        &["--pidns"],
        &[("MCR_FAULT", "receive-wait-before-warm")],
    );
    let mut m = std::process::Command::new(mcr_bin())
        .args(["migrate", "-t", &p.pid.to_string(), "--to", &to])
        .args(["--shell-job", "--json", "--max-rounds", "4", "--copy-pages"])
        .env("MCR_LOG", "mcr=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mcr migrate");
    let mut err = Lines::new(m.stderr.take().expect("stderr"));
    let mut scanned = || loop {
        match err.next_line() {
            Some(l) if l.contains("of the writes while waiting for the destination") => break,
            Some(_) => continue,
            None => panic!("mcr migrate ended before it scanned while waiting"),
        }
    };
    recv.stderr
        .expect_prefix("mcr: waiting at receive-wait-before-warm");
    for _ in 0..3 {
        scanned();
        p.send("CHURN");
        p.lines.expect_prefix("CHURNED");
    }
    scanned();
    recv.tell("");
    let drain = std::thread::spawn(move || while err.next_line().is_some() {});
    let out = m.wait_with_output().expect("mcr migrate");
    drain.join().expect("stderr");
    assert!(out.status.success(), "mcr migrate failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    let scans: u64 = report["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .filter_map(|r| r["scans"].as_u64())
        .sum();
    assert!(scans >= 4, "{report}");
    assert_eq!(report["warm"], true, "{report}");
    assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
    let mut moved = recv.workload(&mut g);
    assert_pass(&moved.check());
}

#[test]
fn a_tree_that_forks_between_rounds_is_restored_cold_and_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "8");
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let report = migrate_changed_between_rounds(&mut p, &to, |p, round| {
        if round == 1 {
            p.send("FORK");
            p.lines.expect_prefix("FORKED");
        }
    });
    assert_eq!(report["warm"], false, "{report}");
    let why = report["cold_because"].as_str().unwrap_or_default();
    assert!(why.contains("changed shape"), "{report}");
    let mut moved = recv.workload(&mut g);
    // The child came along: the tree is whole.
    assert_eq!(tree_pids(moved.pid).len(), 2, "{report}");
    assert_pass(&moved.check());
}

#[test]
fn a_flag_changed_just_before_the_freeze_is_carried() {
    // An madvise over a whole VMA changes no layout: only its flags, read from the
    // kernel's VMAs at the freeze (BPF), see it.
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "8");
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let mut at = 0;
    let out = migrate_pausing_at(&mut p, &to, "migrate-wait-before-freeze", |p, _| {
        p.send("DONTFORK");
        let line = p.lines.expect_prefix("MARKED");
        let hex = line.trim_start_matches("MARKED 0x").trim();
        at = u64::from_str_radix(hex, 16).expect("the guarded region's address");
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut moved = recv.workload(&mut g);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", moved.pid)).expect("smaps");
    let flags = smaps_flags_at(&smaps, at).expect("the guarded region, moved");
    assert!(flags.split_whitespace().any(|f| f == "dc"), "{flags}");
    assert_pass(&moved.check());
}

/// The VmFlags line of the VMA starting at `at`.
fn smaps_flags_at(smaps: &str, at: u64) -> Option<String> {
    let mut here = false;
    for line in smaps.lines() {
        if let Some(range) = line
            .split(' ')
            .next()
            .filter(|r| r.contains('-') && !r.ends_with(':'))
        {
            here = range
                .split('-')
                .next()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                == Some(at);
        } else if let Some(f) = line.strip_prefix("VmFlags:").filter(|_| here) {
            return Some(f.to_string());
        }
    }
    None
}

#[test]
fn without_the_bpf_reader_a_flag_changed_just_before_the_freeze_abandons_the_migration() {
    // Then the blackout takes VMA flags from smaps read before the freeze (smaps is
    // slow) and confirms them while frozen: the confirmation sees the madvise.
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "8");
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let out = migrate_pausing_at(
        &mut p,
        &to,
        "migrate-wait-before-freeze,vma-iter-unavailable",
        |p, _| {
            p.send("DONTFORK");
            p.lines.expect_prefix("MARKED");
        },
    );
    assert_fails(&out, 13, &["flags of", "changed", "runs on here"]);
    assert_ne!(recv.wait(), 0, "the destination went on alone");
    assert!(!tmp.path().join("pid").exists(), "something was restored");
    wait_running(p.pid);
    runs_on_untouched(p);
}

#[test]
fn a_dead_migrations_staging_is_removed_by_the_next_one() {
    // Staging lives in memory (/dev/shm): an abandoned migration's would stay for good.
    let tmp = tempfile::tempdir().expect("tempdir");
    let staging = tmp.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let start_of = |pid: u32| -> String {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        st.rsplit(") ")
            .next()
            .expect("stat")
            .split_whitespace()
            .nth(19)
            .expect("starttime")
            .to_string()
    };
    // One whose owner has ended, and one whose owner (this test) runs.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let gone_pid = gone.id();
    let gone_start = start_of(gone_pid);
    gone.wait().expect("reaping true");
    let dead = staging.join("mcr-migrate-dead");
    let alive = staging.join("mcr-receive-alive");
    for (dir, mark) in [
        (&dead, format!("{gone_pid} {gone_start}\n")),
        (
            &alive,
            format!("{} {}\n", std::process::id(), start_of(std::process::id())),
        ),
    ] {
        std::fs::create_dir(dir).expect("mkdir");
        std::fs::write(dir.join("pages"), vec![0u8; 4096]).expect("write");
        std::fs::write(dir.join("owner"), mark).expect("write");
    }
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "4");
    let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let out = migrate(p.pid, &to, &["--staging", s(&staging)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dead.exists(),
        "the dead migration's staging is still there"
    );
    assert!(alive.exists(), "a live one's staging was removed");
    assert_eq!(p.wait(), 128 + libc::SIGKILL);
    let mut moved = recv.workload(&mut g);
    assert_pass(&moved.check());
}

/// `mcr migrate --post-copy --max-rounds 0` of `pid` with MCR_FAULT=`point`, its stdin
/// ours, once it said it stopped there; with its stderr, for what it says next.
fn post_copy_stopped_at(pid: i32, to: &str, point: &str) -> (std::process::Child, Lines) {
    let mut m = std::process::Command::new(mcr_bin())
        .args(["migrate", "-t", &pid.to_string(), "--to", to, "--shell-job"])
        .args(["--post-copy", "--max-rounds", "0"])
        .env("MCR_FAULT", point)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mcr migrate");
    let mut err = Lines::new(m.stderr.take().expect("stderr"));
    let how = if point.contains("-stall-") {
        "stalled"
    } else {
        "waiting"
    };
    err.expect_prefix(&format!("mcr: {how} at {point}"));
    (m, err)
}

#[test]
fn post_copy_resumes_before_the_last_pages_and_every_byte_arrives() {
    for (extra, all) in [
        (&["--post-copy", "--json"][..], false),
        // No round at all: every page comes after the workload resumed.
        (&["--post-copy", "--max-rounds", "0", "--json"][..], true),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
        let mut g = Guard::new();
        let mut p = start_churn(&mut g, tmp.path(), "32");
        let recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
        let out = migrate(p.pid, &to, extra);
        assert!(
            out.status.success(),
            "{extra:?}: migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
        let pc = &report["post_copy"];
        let pages = pc["pages"].as_u64().expect("post_copy.pages");
        assert!(
            pages > 0,
            "{extra:?}: nothing was left to post-copy: {report}"
        );
        if all {
            assert!(
                pages >= 32 * 256,
                "{extra:?}: without rounds the workload's memory is all left to it: {report}"
            );
        }
        assert!(pc["sent"].as_u64().unwrap() >= pages, "{extra:?}: {report}");
        assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
        let mut moved = recv.workload(&mut g);
        // Every byte it wrote, before and after the freeze, is there.
        assert_pass(&moved.check());
    }
}

#[test]
fn a_source_lost_during_post_copy_is_named_and_the_incomplete_workload_killed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "8");
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let (mut m, _err) = post_copy_stopped_at(p.pid, &to, "migrate-stall-in-post-copy");
    m.kill().expect("SIGKILL");
    m.wait().expect("reaping mcr migrate");
    // The destination says what it lost and does not let the workload run on with
    // pages missing.
    let (code, stderr) = recv.wait_with_stderr();
    assert_eq!(code, 11, "{stderr}");
    for want in ["post-copy lost its source", "was killed"] {
        assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
    }
    let moved: i32 = stderr
        .split("the workload here (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid named in {stderr:?}"));
    g.add(moved);
    wait_gone(moved);
    // The original, stopped for good at the commit, holds the only whole copy.
    wait_state(p.pid, 'T');
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    runs_on_untouched(p);
}

#[test]
fn a_workload_changing_its_memory_and_forking_while_pages_are_missing_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let mut p = start_churn(&mut g, tmp.path(), "16");
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    // Every page left to post-copy, and none pushed until we say: the workload's
    // touches fetch what they need meanwhile.
    let (mut m, _err) = post_copy_stopped_at(p.pid, &to, "migrate-wait-in-post-copy");
    // Pages dropped, regions unmapped, mapped afresh and moved, the heap grown, then a
    // fork: each told to the pager while most pages are still missing.
    recv.ask("CHURN", "CHURNED");
    recv.ask("CHURN", "CHURNED");
    let forked = recv.ask("FORK", "FORKED");
    let kid: i32 = forked
        .trim_start_matches("FORKED ")
        .trim()
        .parse()
        .expect("FORKED PID");
    assert!(kid > 0, "{forked}");
    writeln!(m.stdin.as_mut().expect("stdin"), "go").expect("releasing the push");
    let st = m.wait().expect("mcr migrate");
    assert!(st.success(), "mcr migrate: {st}");
    assert_eq!(p.wait(), 128 + libc::SIGKILL, "the original was not killed");
    let mut moved = recv.workload(&mut g);
    assert_pass(&moved.check());
}

/// The processes under `root` (itself included) whose comm is `comm`.
fn descendants_named(root: i32, comm: &str) -> Vec<i32> {
    kext_shim::procfs::descendants(kext_shim::Pid::from_raw(root))
        .into_iter()
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

#[test]
fn a_receiver_killed_during_post_copy_takes_the_incomplete_workload_with_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let to = format!("unix:{}", s(&tmp.path().join("mig.sock")));
    let mut g = Guard::new();
    let p = start_churn(&mut g, tmp.path(), "8");
    let mut recv = Receiver::start(&to, &tmp.path().join("pid"), &["--pidns"], &[]);
    let (mut m, mut err) = post_copy_stopped_at(p.pid, &to, "migrate-wait-in-post-copy");
    // The workload runs there, most of its pages still missing.
    recv.ask("CHURN", "CHURNED");
    let moved = descendants_named(recv.pid(), "churn");
    assert_eq!(moved.len(), 1, "the moved workload: {moved:?}");
    g.add(moved[0]);
    // The receiver dies: its userfaultfds would have closed into zero pages; the
    // watchdog holding their copies kills the workload instead.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(recv.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    recv.wait();
    wait_gone(moved[0]);
    assert!(
        !running(moved[0]),
        "the workload runs on with pages missing"
    );
    // The source, let go, finds the destination gone and names the loss.
    writeln!(m.stdin.as_mut().expect("stdin"), "go").expect("releasing the push");
    let st = m.wait().expect("mcr migrate");
    assert_eq!(st.code(), Some(11), "mcr migrate: {st}");
    let mut said = String::new();
    while let Some(l) = err.next_line() {
        said.push_str(&l);
    }
    assert!(said.contains("post-copy"), "{said}");
    wait_state(p.pid, 'T');
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    runs_on_untouched(p);
}
