#![forbid(unsafe_code)]
//! Namespaces: a tree restored into new ones, and trees that had their own.

use mcr_tests::*;

/// The pids of `pid` in each pid namespace it is in, outermost first (`NSpid:`).
fn ns_pids(pid: i32) -> Vec<i32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    st.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid line")
        .split_whitespace()
        .map(|n| n.parse().expect("pid"))
        .collect()
}

fn parent_of(pid: i32) -> i32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &st[st.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("ppid")
}

#[test]
fn a_tree_restored_into_a_new_pid_namespace_runs_beside_the_original() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let mut g = Guard::new();
    let mut p = Proc::start(
        &mut g,
        &workload_bin("tree"),
        &[data.to_str().expect("utf-8"), "own-session"],
        None,
    );
    let tree = tree_pids(p.pid);
    for &t in &tree[1..] {
        g.add(t);
    }
    let img = tmp.path().join("img");
    checkpoint(p.pid, &img, &["--leave-running"]);
    // Every pid of the image is still taken here: only a new namespace frees them.
    let mut r = restore(&mut g, &img, &["--pidns"]);
    let init = parent_of(r.pid);
    g.add(init);
    assert_ne!(r.pid, p.pid);
    assert_eq!(
        ns_pids(r.pid),
        vec![r.pid, p.pid],
        "pids of the restored root"
    );
    assert_eq!(ns_pids(init)[1..], [1], "the namespace's init");
    for &t in &tree[1..] {
        if std::path::Path::new(&format!("/proc/{t}")).exists() {
            assert!(
                tree_pids(r.pid)
                    .iter()
                    .any(|&q| ns_pids(q).last() == Some(&t)),
                "pid {t} of the tree is missing from the new namespace"
            );
        }
    }
    let v = r.check();
    assert_pass(&v);
    assert!(v.contains(&format!("pids={}", p.pid)), "{v}");
    // The init ends the way the root did.
    assert_eq!(wait_pid(init), 0);
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
}

#[test]
fn own_uts_and_ipc_namespaces_are_made_again_with_the_host_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let counter = workload_bin("counter");
    let script = format!("hostname mcr-test-host && exec {}", counter.display());
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--uts", "--ipc", "sh", "-c", &script]);
    let p = Proc::spawn(&mut g, cmd, Some("READY"));
    let ours = std::fs::read_link("/proc/self/ns/uts").expect("our uts ns");
    let mut r = round_trip(&mut g, p, &tmp.path().join("img"), &[], &[]);
    for kind in ["uts", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{}/ns/{kind}", r.pid)).expect("ns link");
        let mine = std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns link");
        assert_ne!(
            theirs, mine,
            "the restored process shares our {kind} namespace"
        );
    }
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/uts", r.pid)).expect("ns"),
        ours
    );
    let out = std::process::Command::new("nsenter")
        .args(["-t", &r.pid.to_string(), "-u", "hostname"])
        .output()
        .expect("nsenter");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mcr-test-host");
    assert_pass(&r.check());
}
