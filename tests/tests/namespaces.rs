#![forbid(unsafe_code)]
//! Namespaces: a tree restored into new ones, and trees that had their own.

use mcr_tests::*;

/// The pids of `pid` in each pid namespace it is in, outermost first (`NSpid:`).
fn ns_pids(pid: i32) -> Vec<i32> {
    let v = ns_pids_or_empty(pid);
    assert!(!v.is_empty(), "no NSpid for {pid}");
    v
}

/// The `tree` workload (leading its own session) started in `tmp` and checkpointed
/// there with --leave-running: it, its pids, and the image.
fn tree_dumped_running(
    g: &mut Guard,
    tmp: &std::path::Path,
) -> (Proc, Vec<i32>, std::path::PathBuf) {
    let data = tmp.join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let p = Proc::start(
        g,
        &workload_bin("tree"),
        &[data.to_str().expect("utf-8"), "own-session"],
        None,
    );
    let tree = tree_pids(p.pid);
    for &t in &tree[1..] {
        g.add(t);
    }
    let img = tmp.join("img");
    checkpoint(p.pid, &img, &["--leave-running"]);
    (p, tree, img)
}

/// Like [`ns_pids`], for a process that may be gone.
fn ns_pids_or_empty(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| {
            st.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn a_tree_restored_into_a_new_pid_namespace_runs_beside_the_original() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (mut p, tree, img) = tree_dumped_running(&mut g, tmp.path());
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

#[test]
fn the_init_of_a_pid_namespace_and_its_tree_come_back_as_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new("unshare");
    // --kill-child: if the test fails early, the namespace goes with unshare.
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(workload_bin("tree"))
        .args([data.to_str().expect("utf-8"), "own-session"]);
    let mut outer = Proc::spawn(&mut g, cmd, Some("READY"));
    let tree = tree_pids(outer.pid);
    for &t in &tree[1..] {
        g.add(t);
    }
    let root = tree[1];
    assert_eq!(ns_pids(root)[1..], [1]);
    let img = tmp.path().join("img");
    checkpoint(root, &img, &[]);
    outer.wait();
    let out = mcr(&["show", "-D", img.to_str().expect("utf-8")]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("process 1 (tree) ppid 0 pgid 1 sid 1"),
        "{shown}"
    );
    let mut r = restore(&mut g, &img, &[]);
    assert_eq!(
        ns_pids(r.pid)[1..],
        [1],
        "the root is the namespace's init again"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/pid", r.pid)).expect("ns"),
        std::fs::read_link("/proc/self/ns/pid").expect("ns")
    );
    // Its /proc is its own namespace's again: pid 1 there is the tree's root.
    let stat = std::fs::read_to_string(format!("/proc/{}/root/proc/1/stat", r.pid))
        .expect("their /proc/1/stat");
    assert!(stat.starts_with("1 (tree)"), "{stat}");
    let v = r.check();
    assert_pass(&v);
    assert!(v.contains("pids=1,"), "{v}");
    assert_eq!(r.wait(), 0);
}

/// `counter` as the init of new pid and mount namespaces, after `setup` ran there.
fn counter_in_own_namespaces(g: &mut Guard, setup: &str) -> (Proc, i32) {
    let script = format!("{setup} && exec {}", workload_bin("counter").display());
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        &script,
    ]);
    let outer = Proc::spawn(g, cmd, Some("READY"));
    let root = tree_pids(outer.pid)[1];
    g.add(root);
    (outer, root)
}

#[test]
fn a_mount_namespace_comes_back_with_its_binds_and_file_systems() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::create_dir(&b).expect("mkdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mut g = Guard::new();
    let setup = format!(
        "mount --bind {} {} && mount -t tmpfs -o size=1m,mode=700 scratch {}",
        a.display(),
        b.display(),
        mnt.display()
    );
    let (mut outer, root) = counter_in_own_namespaces(&mut g, &setup);
    let img = tmp.path().join("img");
    checkpoint(root, &img, &[]);
    outer.wait();
    let out = mcr(&["show", "-D", img.to_str().expect("utf-8")]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("mount {}: bind of {}", b.display(), a.display())),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("mount {}: new tmpfs", mnt.display())),
        "{shown}"
    );
    let mut r = restore(&mut g, &img, &[]);
    // The bind shows what we write on its source; the tmpfs is there with its options.
    std::fs::write(a.join("note"), "through the bind").expect("write");
    let seen = std::fs::read_to_string(format!("/proc/{}/root{}/note", r.pid, b.display()))
        .expect("the bind inside");
    assert_eq!(seen, "through the bind");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", r.pid)).expect("mountinfo");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == mnt.to_str())
        .unwrap_or_else(|| panic!("no tmpfs at {}: {mounts}", mnt.display()));
    assert!(
        line.contains("tmpfs scratch") && line.contains("size=1024k") && line.contains("mode=700"),
        "{line}"
    );
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .expect("ours")
        .contains(mnt.to_str().expect("utf-8")));
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}

/// A partition's way of moving onto a clone of its disk: its directory, a bind mount of
/// itself in its own mount namespace, comes back in place from wherever the restorer
/// sees that directory: here, a copy bound over it in the restorer's own namespace.
#[test]
fn a_bind_mount_of_its_own_comes_back_from_what_the_restorer_sees_there() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (disk, clone) = (tmp.path().join("disk"), tmp.path().join("clone"));
    std::fs::create_dir(&disk).expect("mkdir");
    let mut g = Guard::new();
    let script = format!(
        "mount --bind {0} {0} && exec {1} {0} --moved",
        disk.display(),
        workload_bin("files").display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut p = Proc::spawn(&mut g, cmd, Some("READY"));
    let img = tmp.path().join("img");
    checkpoint(p.pid, &img, &[]);
    p.wait();
    let shown = String::from_utf8_lossy(&mcr(&["show", "-D", img.to_str().expect("utf-8")]).stdout)
        .into_owned();
    let bind = format!("mount {0}: bind of {0}", disk.display());
    assert!(shown.contains(&bind), "{shown}");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&disk)
        .arg(&clone)
        .status()
        .expect("cp");
    assert!(st.success());
    let enter = format!(
        "mount --bind {} {} && exec \"$0\" \"$@\"",
        clone.display(),
        disk.display()
    );
    let prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &enter,
    ];
    let mut r = restore_via(&mut g, &prefix, &img, &[]);
    // What it sees at its directory is the clone now, and not the disk.
    std::fs::write(clone.join("note"), "from the clone").expect("write");
    let seen = std::fs::read_to_string(format!("/proc/{}/root{}/note", r.pid, disk.display()))
        .expect("the note through its mount");
    assert_eq!(seen, "from the clone");
    assert!(!disk.join("note").exists());
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
    // Its log went on in the clone's copy.
    let log = |d: &std::path::Path| std::fs::metadata(d.join("log")).expect("log").len();
    assert!(
        log(&clone) > log(&disk),
        "{} vs {}",
        log(&clone),
        log(&disk)
    );
}

#[test]
fn a_tmpfs_holding_files_is_refused_and_the_workload_runs_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mut g = Guard::new();
    let setup = format!(
        "mount -t tmpfs scratch {0} && echo kept > {0}/file",
        mnt.display()
    );
    let (mut outer, root) = counter_in_own_namespaces(&mut g, &setup);
    let img = tmp.path().join("img");
    let out = mcr(&[
        "checkpoint",
        "-t",
        &root.to_string(),
        "-D",
        img.to_str().expect("utf-8"),
        "--shell-job",
    ]);
    assert_fails(
        &out,
        5,
        &[
            &format!("pid {root}"),
            mnt.to_str().expect("utf-8"),
            "holding files",
        ],
    );
    assert_pass(&outer.check());
    assert_eq!(outer.wait(), 0);
}

#[test]
fn sysv_segments_semaphores_and_queues_of_its_ipc_namespace_come_back_with_their_ids() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("--ipc").arg(workload_bin("sysv"));
    let outer = Proc::spawn(&mut g, cmd, Some("READY"));
    // unshare execs the workload: same process.
    let img = tmp.path().join("img");
    let mut r = round_trip(&mut g, outer, &img, &[], &[]);
    let out = mcr(&["show", "-D", img.to_str().expect("utf-8")]);
    let shown = String::from_utf8_lossy(&out.stdout);
    for want in [
        "SysV shared memory segment 0 (key 0x5157",
        "semaphore set 0 (key 0x5345, mode 600): [5, 0, 42]",
        "message queue 0 (key 0x4d53, mode 600): 3 messages, 303 bytes",
    ] {
        assert!(shown.contains(want), "{want:?} not in: {shown}");
    }
    let v = r.check();
    assert_pass(&v);
    assert_eq!(r.wait(), 0);
}

#[test]
fn sysv_memory_of_the_hosts_ipc_namespace_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    // Without unshare --ipc the workload's objects are the host's.
    remove_host_objects();
    let mut p = Proc::start(&mut g, &workload_bin("sysv"), &[], None);
    let tree = tree_pids(p.pid);
    for &t in &tree[1..] {
        g.add(t);
    }
    let img = tmp.path().join("img");
    let out = mcr(&[
        "checkpoint",
        "-t",
        &p.pid.to_string(),
        "-D",
        img.to_str().expect("utf-8"),
        "--shell-job",
    ]);
    assert_fails(
        &out,
        5,
        &[
            &format!("pid {}", p.pid),
            "SysV shared memory segment",
            "unshare --ipc",
        ],
    );
    assert_pass(&p.check());
    assert_eq!(p.wait(), 0);
    remove_host_objects();
}

/// The host-namespace run leaves its keyed objects behind (they outlive processes).
fn remove_host_objects() {
    for (kind, key) in [
        ("-M", "0x5157"),
        ("-M", "0x5158"),
        ("-S", "0x5345"),
        ("-Q", "0x4d53"),
    ] {
        let _ = std::process::Command::new("ipcrm")
            .args([kind, key])
            .status();
    }
}

#[test]
fn a_restore_into_a_new_pid_namespace_failing_late_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let (p, _, img) = tree_dumped_running(&mut g, tmp.path());
    // Fails after the whole namespace (init and tree) exists: all of it must go.
    let out = std::process::Command::new(mcr_bin())
        .args([
            "restore",
            "-D",
            img.to_str().expect("utf-8"),
            "--shell-job",
            "--pidns",
        ])
        .env("MCR_FAULT", "restore-after-fill")
        .output()
        .expect("mcr");
    assert_fails(&out, 1, &["fault injected"]);
    // No process anywhere is the tree's root again in a namespace of its own.
    let survivors: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&q| {
            let ids = ns_pids_or_empty(q);
            ids.len() == 2 && ids[1] == p.pid
        })
        .collect();
    assert!(
        survivors.is_empty(),
        "the failed restore left {survivors:?}"
    );
    let mut r = restore(&mut g, &img, &["--pidns"]);
    g.add(parent_of(r.pid));
    assert_pass(&r.check());
}

#[test]
fn a_tree_in_its_own_pid_mount_uts_and_ipc_namespaces_comes_back_in_new_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut g = Guard::new();
    let script = format!(
        "hostname lu-partition && exec {}",
        workload_bin("sysv").display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--uts",
        "--ipc",
        "sh",
        "-c",
        &script,
    ]);
    let mut outer = Proc::spawn(&mut g, cmd, Some("READY"));
    let root = tree_pids(outer.pid)[1];
    g.add(root);
    let img = tmp.path().join("img");
    checkpoint(root, &img, &[]);
    outer.wait();
    let mut r = restore(&mut g, &img, &[]);
    assert_eq!(ns_pids(r.pid)[1..], [1]);
    for kind in ["pid", "mnt", "uts", "ipc"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{}/ns/{kind}", r.pid)).expect("ns"),
            std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns"),
            "the restored tree shares our {kind} namespace"
        );
    }
    let out = std::process::Command::new("nsenter")
        .args(["-t", &r.pid.to_string(), "-u", "hostname"])
        .output()
        .expect("nsenter");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lu-partition");
    assert_pass(&r.check());
    assert_eq!(r.wait(), 0);
}
