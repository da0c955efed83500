//! `liveupdate preview`: every precondition of a live update checked and printed as
//! `PASSED:` or `FAILED:`, and estimates computed from the live workload, changing
//! nothing. Measured, not assumed: the workload's resident memory; its dirty rate,
//! sampled over a second with mcr's write tracking (a pre-dump into a tmpfs, then
//! `mcr written`, which reads the writes back without freezing it); the copy
//! bandwidth the pre-dump reached; and its processes, fds and connections, as three
//! dry-run checkpoints found them (each frozen a few milliseconds, nothing written).

use crate::console::{self, Request};
use crate::partition::Partition;
use crate::update::Plan;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One precondition.
#[derive(Debug, Clone)]
pub struct Check {
    pub passed: bool,
    pub what: String,
}

/// What the workload looks like and what moving it should cost.
#[derive(Debug, Clone, Default)]
pub struct Estimates {
    pub rss_bytes: u64,
    pub dirty_bytes_per_s: f64,
    pub copy_bytes_per_s: f64,
    pub processes: u64,
    pub fds: u64,
    pub connections: u64,
    /// Freeze and look at the state, as the dry run measured it.
    pub freeze_and_collect_ms: f64,
    pub last_round_bytes: f64,
    pub rounds: u32,
    pub blackout_ms: f64,
    /// What `blackout_ms` adds up, (part, ms).
    pub blackout_parts: Vec<(&'static str, f64)>,
    pub total_s: f64,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
}

impl Estimates {
    /// `blackout_parts` as an operator reads them: "mcr 6.1, freeze and state 2.0, ...".
    pub fn parts_text(&self) -> String {
        self.blackout_parts
            .iter()
            .map(|(k, ms)| format!("{k} {ms:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Default)]
pub struct Preview {
    pub checks: Vec<Check>,
    pub estimates: Option<Estimates>,
}

impl Preview {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    fn check(&mut self, passed: bool, what: impl Into<String>) -> bool {
        self.checks.push(Check {
            passed,
            what: what.into(),
        });
        passed
    }
}

const MIB: f64 = (1 << 20) as f64;

/// What mcr's pre-copy rounds leave for the blackout, and what the rounds cost, as
/// mcr decides (migrate::converged): the first round copies everything; each next
/// one what was written during the last; it stops after a round (past the first)
/// that took no longer than the blackout asked for, or that did not shrink by a
/// fifth, or at eight. Returns (rounds, bytes left for the blackout, seconds).
fn rounds(rss: f64, dirty: f64, bw: f64, floor_s: f64, max_blackout_s: f64) -> (u32, f64, f64) {
    let mut size = rss;
    let mut total = 0.0;
    let mut n = 0;
    loop {
        // A round's copy, and its fixed cost (the freeze, the tracking).
        let t = size / bw + floor_s;
        total += t;
        n += 1;
        let next = dirty * t;
        let shrank_not = n > 1 && next * 5.0 > size * 4.0;
        if (n > 1 && t <= max_blackout_s) || shrank_not || n == 8 {
            return (n, next, total);
        }
        size = next;
    }
}

fn sh_out(cmd: &mut Command) -> Result<(bool, String, String), String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    Ok((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).trim().to_string(),
    ))
}

/// `field` of /proc/meminfo, in bytes.
fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The files the workload has mapped or open, as we name them.
/// Files the workload holds all the while we look. A file opened for an instant, read and
/// closed (the demo reads its greeting for every line it sends), is no clash: the workload
/// reads the fix after the move. Seen in every one of a few looks a few milliseconds apart,
/// it is held, or opened so often that the checkpoint would likely find it open too.
fn held_files(pids: &[i32]) -> Vec<(i32, String)> {
    const LOOKS: usize = 5;
    let mut held = held_files_now(pids);
    for _ in 1..LOOKS {
        if held.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(3));
        let now = held_files_now(pids);
        held.retain(|h| now.binary_search(h).is_ok());
    }
    held
}

fn held_files_now(pids: &[i32]) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for &pid in pids {
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            for l in maps.lines() {
                if let Some(p) = l.split_whitespace().nth(5).filter(|p| p.starts_with('/')) {
                    out.push((pid, p.to_string()));
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    out.push((pid, t.display().to_string()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The regular files on the workload's root (`root`, as the host sees it) that its
/// processes hold open for writing or map shared and writable, each once with its
/// size: the mirror copies each up when the restore opens it so, in the blackout.
fn written_files(pids: &[i32], root: &Path) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    // (the path the workload knows it by, one to stat it through from here): the
    // path resolved here may be another file, the one under the partition's bind.
    let mut found: Vec<(PathBuf, PathBuf)> = Vec::new();
    for &pid in pids {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                let flags = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .ok()
                .and_then(|t| {
                    let l = t.lines().find(|l| l.starts_with("flags:"))?;
                    u32::from_str_radix(l["flags:".len()..].trim(), 8).ok()
                });
                let writes =
                    flags.is_some_and(|f| f & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32);
                if let (true, Ok(t)) = (writes, std::fs::read_link(fd.path())) {
                    found.push((t, fd.path()));
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            for l in maps.lines() {
                let mut w = l.split_whitespace();
                let (range, perms) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
                if perms.as_bytes().get(1) == Some(&b'w') && perms.ends_with('s') {
                    if let Some(p) = w.nth(3).filter(|p| p.starts_with('/')) {
                        found.push((
                            PathBuf::from(p),
                            PathBuf::from(format!("/proc/{pid}/map_files/{range}")),
                        ));
                    }
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    found
        .into_iter()
        .filter(|(p, _)| p.starts_with(root))
        .filter_map(|(p, through)| {
            let m = std::fs::metadata(&through).ok()?;
            (m.is_file() && seen.insert((m.dev(), m.ino()))).then_some((p, m.len()))
        })
        .collect()
}

/// Free bytes of the file system holding `dir` (or its nearest existing parent).
fn free_bytes(dir: &Path) -> Option<u64> {
    let mut d = dir.to_path_buf();
    while !d.exists() {
        d = d.parent()?.to_path_buf();
    }
    let s = nix::sys::statvfs::statvfs(&d).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Checks and estimates for moving partition `plan.partition` with `plan.fix`.
pub fn run(plan: &Plan, max_blackout_ms: u64) -> Preview {
    let mut pv = Preview::default();
    // The lock: free, and held while we look, so that no operation starts meanwhile.
    let _lock = match crate::lock::OpLock::take(&plan.state, "preview", "liveupdate preview") {
        Ok(t) => {
            pv.check(true, "no other live update holds the lock");
            Some(t)
        }
        Err(e) => {
            pv.check(false, e.to_string());
            None
        }
    };
    look(plan, max_blackout_ms, pv)
}

/// The checks and estimates of [`run`], for an operation that holds the lock.
pub fn within(plan: &Plan, max_blackout_ms: u64) -> Preview {
    let mut pv = Preview::default();
    pv.check(true, "this operation holds the lock");
    look(plan, max_blackout_ms, pv)
}

fn look(plan: &Plan, max_blackout_ms: u64, mut pv: Preview) -> Preview {
    let token = match crate::token::current(&plan.state) {
        Ok(t) => {
            pv.check(
                true,
                format!(
                    "console token for {}, valid until {}",
                    t.user,
                    crate::journal::utc(t.expires)
                ),
            );
            Some(t.secret)
        }
        Err(e) => {
            pv.check(false, format!("console token: {e}"));
            None
        }
    };
    let parts =
        token
            .as_ref()
            .and_then(|t| match console::call(&plan.console, t, &Request::List) {
                Ok(p) => {
                    pv.check(
                        true,
                        format!(
                            "console {} answers ({} partitions)",
                            plan.console.display(),
                            p.len()
                        ),
                    );
                    Some(p)
                }
                Err(e) => {
                    pv.check(false, e.to_string());
                    None
                }
            });
    let partition: Option<Partition> = parts.as_ref().and_then(|ps| {
        let p = ps.iter().find(|p| p.name == plan.partition).cloned();
        match &p {
            Some(p) if p.init.is_some() => {
                pv.check(
                    true,
                    format!(
                        "partition {} (id {}) runs, pid {}",
                        p.name,
                        p.id,
                        p.init.unwrap_or(0)
                    ),
                );
            }
            Some(p) => {
                pv.check(false, format!("partition {} runs nothing to move", p.name));
            }
            None => {
                pv.check(
                    false,
                    format!("no partition {:?} on the console", plan.partition),
                );
            }
        }
        p.filter(|p| p.init.is_some())
    });
    if let (Some(ps), Some(id)) = (&parts, plan.partition_id) {
        match ps.iter().find(|p| p.id == id) {
            Some(p) => pv.check(
                false,
                format!(
                    "partition id {id} asked for the surrogate is taken by {}",
                    p.name
                ),
            ),
            None => pv.check(true, format!("partition id {id} is free for the surrogate")),
        };
    }

    // The fix.
    let bundle = match &plan.fix {
        Some(f) => match crate::fix::open(f) {
            Ok(b) => {
                pv.check(
                    true,
                    format!("fix {}: every checksum verified", b.manifest.label),
                );
                pv.check(
                    b.manifest.lu_capable,
                    format!(
                        "fix {} is {}live-update capable",
                        b.manifest.label,
                        if b.manifest.lu_capable { "" } else { "not " }
                    ),
                );
                Some(b)
            }
            Err(e) => {
                pv.check(false, format!("fix {}: {e}", f.display()));
                None
            }
        },
        None => None,
    };

    // The machine and mcr.
    let (ok, out, err) = sh_out(Command::new(&plan.mcr).args(["check", "--json"])).unwrap_or((
        false,
        String::new(),
        format!("running {}", plan.mcr.display()),
    ));
    match serde_json::from_str::<serde_json::Value>(&out) {
        Ok(v) => {
            let missing: Vec<String> = v["features"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["required"] == true && f["present"] != true)
                .map(|f| f["feature"].as_str().unwrap_or("?").to_string())
                .collect();
            pv.check(
                ok && missing.is_empty(),
                if missing.is_empty() {
                    "mcr check: every kernel feature the move needs is present".to_string()
                } else {
                    format!("mcr check: missing {}", missing.join(", "))
                },
            );
        }
        Err(_) => {
            pv.check(false, format!("mcr check: {err}"));
        }
    }

    let Some(p) = partition else {
        return pv;
    };
    let init = p.init.unwrap_or(0);
    let members = std::fs::read_to_string(p.cgroup.join("cgroup.procs"))
        .map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|_| vec![init]);

    // The workload resumes on a mirror of its root and the fix's files are put in
    // place after: what it holds, it keeps as it was. Said, for the operator to know
    // that such a process runs the old file until it opens it again.
    if let Some(b) = &bundle {
        let held = held_files(&members);
        let mut kept = Vec::new();
        for f in &b.manifest.files {
            let at = p.mount_at.join(f.target.trim_start_matches('/'));
            let at = at.display().to_string();
            if let Some((pid, _)) = held.iter().find(|(_, h)| *h == at) {
                kept.push(format!("{} (pid {pid})", f.target));
            }
        }
        pv.check(
            true,
            if kept.is_empty() {
                "the fix replaces no file the workload has open or mapped".to_string()
            } else {
                format!(
                    "the fix replaces {}, which the workload has open or mapped: it keeps the file it has until it opens it again",
                    kept.join(", ")
                )
            },
        );
    }

    // Could it be checkpointed? Asked of the live tree, from its network namespace.
    // Three times, for the freeze's length, the middle one: one of five 1 GiB previews
    // here measured 13.4 ms where the others measured 2.2-3.3 (the host's, not mcr's),
    // and the blackout estimate with it was twice the blackout.
    let mut dry: Option<serde_json::Value> = None;
    let mut frozen: Vec<f64> = Vec::new();
    let mut collect: Vec<f64> = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = sh_out(p.in_netns().arg(&plan.mcr).args([
            "checkpoint",
            "-t",
            &init.to_string(),
            "--dry-run",
            "--tcp-established",
            "--json",
        ]));
        let wall_ms = t.elapsed().as_secs_f64() * 1e3;
        match out {
            Ok((true, out, _)) => {
                let d: Option<serde_json::Value> = serde_json::from_str(&out).ok();
                frozen.push(
                    d.as_ref()
                        .and_then(|d| d["frozen_ms"].as_f64())
                        .unwrap_or(wall_ms),
                );
                collect.push(d.as_ref().map_or(0.0, collect_ms));
                dry = d;
            }
            Ok((false, _, err)) => {
                pv.check(false, format!("the workload cannot be checkpointed: {err}"));
                dry = None;
                break;
            }
            Err(e) => {
                pv.check(false, format!("mcr checkpoint --dry-run: {e}"));
                dry = None;
                break;
            }
        }
    }
    let frozen_ms = middle(&mut frozen);
    let collect_ms = middle(&mut collect);
    if let Some(d) = &dry {
        pv.check(
            true,
            format!(
                "every process of the workload can be checkpointed: {} processes, {} threads, {} fds, {} TCP connections",
                d["processes"], d["threads"], d["fds"], d["tcp_connections"]
            ),
        );
    }

    // The applications.
    // The disk's files as the host sees them: `mount_at` is where the partition's
    // processes see them, which on the host is the original's disk after an update.
    let root = crate::disk::files(&p.disk).unwrap_or_else(|_| p.mount_at.clone());
    match crate::notify::tell(
        &root,
        crate::notify::Event::Preview,
        &label(&bundle),
        plan.notify_timeout,
    ) {
        Ok(answers) => {
            for (app, a) in &answers {
                let stops = a.stops(crate::notify::Event::Preview);
                pv.check(!stops, format!("application {app}: {a:?}"));
            }
            if answers.is_empty() {
                pv.check(true, "no application asked to be told");
            }
        }
        Err(e) => {
            pv.check(false, format!("telling the applications: {e}"));
        }
    }

    // Resources for a second copy.
    let rss: u64 = members.iter().map(|&m| rss_of(m)).sum();
    let (disk_bytes, _) = crate::disk::usage(&p.disk);
    // None for a move onto a kept disk: no clone.
    let clone_method = match &plan.onto {
        Some(_) => None,
        None => Some(crate::disk::probe(&p.disk, &plan.clone_dir)),
    };
    let free = free_bytes(&plan.clone_dir).unwrap_or(0);
    if let Some(onto) = &plan.onto {
        pv.check(
            crate::disk::kind(onto).is_ok(),
            format!(
                "disk: the fix's files are taken back from {}, kept",
                onto.display()
            ),
        );
    } else {
        pv.check(
            true,
            format!(
                "disk: the clone will be made by {} (tried in {})",
                clone_method.map_or("-", crate::disk::Method::name),
                plan.clone_dir.display()
            ),
        );
        pv.check(
            free > disk_bytes,
            format!(
                "disk: the clone needs {:.1} MiB at most (less by reflink or overlayfs), {:.1} MiB free at {}",
                disk_bytes as f64 / MIB,
                free as f64 / MIB,
                plan.clone_dir.display()
            ),
        );
    }
    let mirrors = crate::disk::can_mirror(&p.disk, &plan.mirror_dir);
    pv.check(
        mirrors.is_ok(),
        match mirrors {
            Ok(()) => format!(
                "disk: the mirror of the original root can be made in {} (an overlay: only what the workload writes after the freeze is its own)",
                plan.mirror_dir.display()
            ),
            Err(e) => format!(
                "disk: no mirror of the original root in {}: {e}",
                plan.mirror_dir.display()
            ),
        },
    );
    // The destination's copy, and the rounds staged in a tmpfs on the way.
    let memory_bytes = 2 * rss;
    let avail = meminfo("MemAvailable").unwrap_or(0);
    pv.check(
        avail > memory_bytes,
        format!(
            "memory: a second copy needs {:.1} MiB, {:.1} MiB available",
            memory_bytes as f64 / MIB,
            avail as f64 / MIB
        ),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    // The surrogate's copy runs beside the workload: refused on a machine so busy
    // that pre-copy would stretch (and the workload with it), not on a busy one.
    let busy = load >= 4.0 * cpus as f64;
    pv.check(
        !busy,
        format!(
            "CPU: {cpus} online, load {load:.2}{}",
            if busy {
                ": too busy for the surrogate's copy"
            } else {
                ": room for the surrogate's copy"
            }
        ),
    );

    // The dirty rate over a second, and the bandwidth of copying it.
    let sample = sample_writes(plan, &p, Duration::from_secs(1));
    let Sample {
        bandwidth: bw,
        dirty,
        scan_ms,
    } = match sample {
        Ok(s) => s,
        Err(e) => {
            pv.check(false, format!("sampling the workload's writes: {e}"));
            return pv;
        }
    };
    // Each file the workload writes through is copied up into the mirror's layer
    // when the restore opens it, frozen: at the rate a copy into that layer goes.
    let written = written_files(&members, &p.mount_at);
    let copy_up_bytes: u64 = written.iter().map(|w| w.1).sum();
    let copy_up_ms = if copy_up_bytes == 0 {
        0.0
    } else {
        match crate::disk::copy_rate(&plan.mirror_dir) {
            Ok(rate) => copy_up_bytes as f64 / rate * 1e3,
            Err(e) => {
                pv.check(
                    false,
                    format!("disk: timing a copy in {}: {e}", plan.mirror_dir.display()),
                );
                0.0
            }
        }
    };
    {
        let within = copy_up_ms <= max_blackout_ms as f64;
        let mut files: Vec<String> = written
            .iter()
            .take(5)
            .map(|(f, b)| {
                let f = f.strip_prefix(&p.mount_at).unwrap_or(f);
                format!("/{} {:.1} MiB", f.display(), *b as f64 / MIB)
            })
            .collect();
        if written.len() > files.len() {
            files.push("...".into());
        }
        let what = match (written.is_empty(), within) {
            (true, _) => "the workload writes through no file of its root: the mirror copies nothing in the blackout".to_string(),
            (false, ok) => format!(
                "the workload writes through {} file(s) of its root ({}): the mirror copies them into its layer in the blackout, about {copy_up_ms:.1} ms{}",
                written.len(),
                files.join(", "),
                if ok { String::new() } else { format!(", more than the {max_blackout_ms} ms allowed") }
            ),
        };
        pv.check(within, what);
    }
    let d = dry.unwrap_or_default();
    let num = |k: &str| d[k].as_u64().unwrap_or(0);
    // A round's fixed cost: the freeze to start its tracking, and the exchange.
    let floor_s = 0.005;
    let (n, last, pre_s) = rounds(rss as f64, dirty, bw, floor_s, max_blackout_ms as f64 / 1e3);
    let copy_ms = last / bw * 1e3;
    let processes = num("processes").max(1);
    let connections = num("tcp_connections");
    // The blackout, each part from what was measured here: mcr's own fixed cost (a
    // probe moved below), the workload's freeze and state (the dry run, per
    // process), that state made again at the destination (as long as its collection
    // took: the demo's destination spent 1.0-2.6 ms opening its files and restoring
    // its state where the dry run collected it in 1.3-2.7, 7 runs; without it the
    // estimate's median was 29% short), the last dump's scan of its writes, the last
    // pages out and in (twice their copy time), and the address moved (timed below).
    // The wire lock comes off after the resume: not part of it.
    let spawn_ms = time_spawn(Command::new("ip").args(["-o", "link", "show", "lo"])) * 2.0
        + time_spawn(
            Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("liveupdate")))
                .arg("--help"),
        );
    // The address move inside the blackout, timed for real: the very request the
    // operation makes of the console then, for the partition that holds the address
    // (which changes nothing but the host's neighbour entry, set to what it is).
    let go_ms = token.as_ref().map_or(0.0, |t| {
        let at = Instant::now();
        let req = Request::TakeAddress {
            name: p.name.clone(),
        };
        match console::call(&plan.console, t, &req) {
            Ok(_) => at.elapsed().as_secs_f64() * 1e3,
            Err(_) => 0.0,
        }
    });
    // What mcr's own blackout costs on this machine now, moving a process that has
    // next to nothing: measured by moving one (a sleep of ours) through mcr receive.
    // Three times, the middle one: a single move of a sleep varied by half here.
    let mut probes: Vec<f64> = (0..3).filter_map(|_| probe_blackout(plan)).collect();
    let engine_ms = if probes.is_empty() {
        frozen_ms * 2.0
    } else {
        middle(&mut probes)
    };
    // The last dump walks the page tables of all the tracked memory, frozen, to read
    // its writes back without protecting them again: that walk, timed by `mcr
    // written` (0.6-0.9 ms at 1 GiB here).
    let final_scan_ms = scan_ms;
    let blackout_ms = engine_ms
        + frozen_ms * processes as f64
        + collect_ms * processes as f64
        + final_scan_ms
        + 2.0 * copy_ms
        + go_ms
        + copy_up_ms;
    let mut blackout_parts = vec![
        ("mcr", engine_ms),
        ("freeze and state", frozen_ms * processes as f64),
        ("state made again", collect_ms * processes as f64),
        ("scan", final_scan_ms),
        ("last pages", 2.0 * copy_ms),
        ("address", go_ms),
    ];
    if copy_up_ms > 0.0 {
        blackout_parts.push(("files into the mirror", copy_up_ms));
    }
    // A copy goes at the copy bandwidth; a reflink or an overlay is a few ms.
    let clone_s = match clone_method {
        Some(crate::disk::Method::Copy) => disk_bytes as f64 / bw.max(1.0),
        Some(_) => 0.005,
        None => 0.0,
    };
    // Making the surrogate (eight ip commands), starting the receiver (four tools)
    // and mcr, the notices, releasing the original, and the console's part in each:
    // about two dozen programs started, each as long as the three timed above took
    // apiece.
    let partitions_s = 24.0 * spawn_ms / 3.0 / 1e3;
    // The rounds' copies are the destination's: it reads the pages from the workload
    // as each round lists them (on one host, as here), so the first round's copy in
    // `pre_s` is its fill. (Copied into staging first, it was one copy more: 1 GiB
    // was estimated at 1.05-1.27 s against 0.59-0.64 s measured, 5 runs.)
    // The original's end frees its memory before mcr returns, mcr helping its exit
    // (process_mrelease): about 15 GiB a second here (60-70 ms at 1 GiB, 250-310 at 4).
    let teardown_s = rss as f64 / (15.0 * (1u64 << 30) as f64);
    let total_s = clone_s + partitions_s + pre_s + blackout_ms / 1e3 + teardown_s;
    pv.estimates = Some(Estimates {
        rss_bytes: rss,
        dirty_bytes_per_s: dirty,
        copy_bytes_per_s: bw,
        processes,
        fds: num("fds"),
        connections,
        freeze_and_collect_ms: frozen_ms,
        last_round_bytes: last,
        rounds: n,
        blackout_ms,
        blackout_parts,
        total_s,
        disk_bytes,
        memory_bytes,
    });
    pv
}

/// The middle one of a few samples (0 for none).
fn middle(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// How long a dry run took to collect the state, frozen (its "collect state" step).
fn collect_ms(dry: &serde_json::Value) -> f64 {
    dry["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["step"] == "collect state")
        .filter_map(|s| s["ms"].as_f64())
        .sum()
}

/// mcr's blackout moving a sleep of ours, in ms: the engine's fixed cost here, now.
fn probe_blackout(plan: &Plan) -> Option<f64> {
    let tmp = tempfile::Builder::new()
        .prefix("liveupdate-probe-")
        .tempdir()
        .ok()?;
    let sock = tmp.path().join("probe.sock");
    let pidfile = tmp.path().join("probe.pid");
    // Moved as the operation moves the workload: told READY inside the blackout, it
    // goes on at our GO (the address's move is timed on its own). Made before the
    // processes, so that a failure here leaves none behind; close-on-exec until mcr
    // migrate, as the sleep must not hold it.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().ok()?;
    let mut recv = Command::new(&plan.mcr)
        .args(["receive", "--pidns", "-d", "--pidfile"])
        .arg(&pidfile)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut sleeper = match Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(s) => s,
        Err(_) => {
            let _ = (recv.kill(), recv.wait());
            return None;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if !sock.exists() {
        eprintln!("liveupdate: preview: the probe's mcr receive did not listen in 5 s");
        let _ = (recv.kill(), recv.wait(), sleeper.kill(), sleeper.wait());
        return None;
    }
    if nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&theirs),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .is_err()
    {
        let _ = (recv.kill(), recv.wait(), sleeper.kill(), sleeper.wait());
        return None;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs).to_string();
    let goer = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let mut line = String::new();
        let _ = std::io::BufReader::new(&ours).read_line(&mut line);
        if line == "READY\n" {
            let _ = (&ours).write_all(b"GO\n");
        }
    });
    // Bounded: a preview must not hang on its probe.
    let out = Command::new("timeout")
        .arg("10")
        .arg(&plan.mcr)
        .args(["migrate", "-t", &sleeper.id().to_string(), "--json", "--to"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--at-ready-fd", &fd])
        .stdin(Stdio::null())
        .output();
    // Its end closed: a goer still waiting for READY sees the end.
    drop(theirs);
    let _ = goer.join();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // Done, it has returned (-d) or is about to; failed, it may wait for ever.
    let _ = crate::reap::end_within(&mut recv, Duration::from_secs(2));
    if let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let out = out.ok()?;
    if !out.status.success() {
        // The estimate does without it (see the caller); the operator is told why.
        eprintln!(
            "liveupdate: preview: the probe's move failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["blackout_ms"].as_f64()
}

fn label(b: &Option<crate::fix::Bundle>) -> String {
    b.as_ref().map_or("-".into(), |b| b.manifest.label.clone())
}

/// How long starting `cmd` and its end take, in ms (the median of three).
fn time_spawn(cmd: &mut Command) -> f64 {
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let s = Instant::now();
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

/// Two pre-dumps `over` apart into a tmpfs: the bandwidth of the first (bytes a
/// second), and the bytes a second written between them. The tracking ends with us.
/// What two pre-dumps a second apart measured.
struct Sample {
    /// Bytes a second the first copied.
    bandwidth: f64,
    /// Bytes a second written between them.
    dirty: f64,
    /// How long the walk that reads the writes back took (as the last dump does it).
    scan_ms: f64,
}

fn sample_writes(plan: &Plan, p: &Partition, over: Duration) -> Result<Sample, String> {
    let init = p.init.unwrap_or(0);
    let tmp = tempfile::Builder::new()
        .prefix("liveupdate-preview-")
        .tempdir_in("/dev/shm")
        .map_err(|e| format!("a tmpfs directory: {e}"))?;
    // Tracking starts with the pre-dump's freeze, a moment after this.
    let t = Instant::now();
    // From its network namespace, which mcr wants to be its own.
    let first = match sh_out(
        p.in_netns()
            .arg(&plan.mcr)
            .args([
                "pre-dump",
                "-t",
                &init.to_string(),
                "--compress",
                "none",
                "--json",
                "-D",
            ])
            .arg(tmp.path().join("a")),
    )? {
        (true, out, _) => {
            serde_json::from_str::<serde_json::Value>(&out).map_err(|e| e.to_string())?
        }
        (false, _, err) => return Err(err),
    };
    std::thread::sleep(over);
    // Its writes since, read while it runs: nothing frozen, nothing protected again.
    let written =
        sh_out(Command::new(&plan.mcr).args(["written", "-t", &init.to_string(), "--json"]));
    // The pre-dump's walks of the page tables to protect them (frozen for some, the
    // rest once it ran on).
    let step = |name: &str| {
        first["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["step"] == name)
            .and_then(|s| s["ms"].as_f64())
            .unwrap_or(0.0)
    };
    let elapsed = t.elapsed().as_secs_f64();
    if let Some(h) = first["holder_pid"].as_i64() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let written: serde_json::Value = match written? {
        (true, out, _) => serde_json::from_str(&out).map_err(|e| e.to_string())?,
        (false, _, err) => return Err(err),
    };
    let copy_ms = first["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["step"] == "copy pages")
        .and_then(|s| s["ms"].as_f64())
        .unwrap_or(1.0)
        .max(0.001);
    let bw = first["raw_bytes"].as_f64().unwrap_or(0.0) / (copy_ms / 1e3);
    // Untracked memory would be copied whole every round: as good as all written.
    let dirty = (written["written_bytes"].as_f64().unwrap_or(0.0)
        + written["untracked_bytes"].as_f64().unwrap_or(0.0))
        / elapsed;
    Ok(Sample {
        bandwidth: bw.max(1.0),
        dirty,
        // The very walk the last dump makes, frozen, to read the writes back.
        scan_ms: written["scan_ms"]
            .as_f64()
            .unwrap_or(step("track writes") / 4.0),
    })
}

#[cfg(test)]
mod tests {
    use super::{held_files, rounds};

    #[test]
    fn a_file_opened_for_an_instant_is_not_held_one_kept_open_is() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, read) = (dir.path().join("kept"), dir.path().join("read"));
        std::fs::write(&kept, "k").unwrap();
        std::fs::write(&read, "r").unwrap();
        let _open = std::fs::File::open(&kept).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // As the demo service does (read, close, 2 ms, again), but kept open 100 µs as a
        // preempted reader would be on a busy machine: one look in 20 sees it.
        let reader = {
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let f = std::fs::File::open(&read);
                    std::thread::sleep(std::time::Duration::from_micros(100));
                    drop(f);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let me = std::process::id() as i32;
        let (kept, read) = (kept.display().to_string(), read.display().to_string());
        for _ in 0..30 {
            let held = held_files(&[me]);
            assert!(held.iter().any(|(_, f)| *f == kept), "{held:?}");
            assert!(!held.iter().any(|(_, f)| *f == read), "{held:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
    }

    #[test]
    fn rounds_shrink_until_the_last_fits_or_stops_shrinking() {
        let (gib, mib) = ((1u64 << 30) as f64, (1u64 << 20) as f64);
        // 1 GiB at 1 GiB/s, writing 32 MiB/s: 1 s; 32 MiB (31 ms, too long); 1 MiB
        // (1 ms, fits), leaving what was written during it.
        let (n, last, total) = rounds(gib, 32.0 * mib, gib, 0.0, 0.020);
        assert_eq!(n, 3);
        assert!((last - 32.0 * 1024.0).abs() < 1.0, "{last}");
        assert!(
            (total - (1.0 + 1.0 / 32.0 + 1.0 / 1024.0)).abs() < 1e-9,
            "{total}"
        );
        // Writing as fast as it copies: the second round does not shrink; it stops.
        let (n, last, _) = rounds(gib, gib, gib, 0.0, 0.020);
        assert_eq!(n, 2);
        assert!(last >= gib);
    }
}
