#![forbid(unsafe_code)]
//! The `mcr` command line.

use clap::{Parser, Subcommand};
use mcr::dump::{AfterDump, CheckpointOptions};
use mcr::image::{Compression, Image};
use mcr::restore::RestoreOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod demo;

#[derive(Parser)]
#[command(
    name = "mcr",
    version,
    about = "Checkpoint and restore Linux processes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to restore: `mcr restore`'s options, and `mcr receive`'s.
#[derive(clap::Args)]
struct RestoreArgs {
    /// Chroot the process here and reopen its files under it.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Return once the process runs instead of waiting for it to exit.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Write the restored pid here.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Bind the process's outside stdio to ours.
    #[arg(long)]
    shell_job: bool,
    /// Restore into a new pid namespace, where the tree keeps its pids whatever runs
    /// here; an init of ours is its pid 1 unless the tree's root was one.
    #[arg(long)]
    pidns: bool,
    /// Restore into a new mount namespace whose root is --root (pivot_root), with a
    /// proc of its own under --pidns.
    #[arg(long)]
    mntns: bool,
    /// Make the image's established TCP connections again.
    #[arg(long)]
    tcp_established: bool,
    /// Restore into this network namespace (/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Our mount namespace was made for the tree (its own binds in place): it
    /// becomes the tree's, instead of a new one. What the tree had made fresh (its
    /// proc, an empty tmpfs) the tree's first process mounts there.
    #[arg(long)]
    inherit_mntns: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl RestoreArgs {
    fn options(&self, dir: PathBuf) -> RestoreOptions {
        let mut o = RestoreOptions::new(dir);
        o.root = self.root.clone();
        o.shell_job = self.shell_job;
        o.pidns = self.pidns;
        o.mntns = self.mntns;
        o.tcp_established = self.tcp_established;
        o.netns = self.netns.clone();
        o.inherit_mntns = self.inherit_mntns;
        o
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a process, write its image, then kill it (or leave it running or stopped).
    Checkpoint {
        /// The process to checkpoint.
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// Images directory: created 0700, or an empty one.
        #[arg(short = 'D', long = "images-dir", required_unless_present = "dry_run")]
        dir: Option<PathBuf>,
        /// Freeze, look at everything a checkpoint would take, refuse what it would
        /// refuse, and resume: nothing written, no connection stopped (exit 0: it can).
        #[arg(long)]
        dry_run: bool,
        #[arg(long, conflicts_with = "leave_stopped")]
        leave_running: bool,
        #[arg(long)]
        leave_stopped: bool,
        /// The process's stdio (terminal, pipes) belongs to the caller and is rebound at restore.
        #[arg(long)]
        shell_job: bool,
        /// Freeze through this cgroup v2 directory or v1 freezer cgroup (it must hold the
        /// tree and nothing else); by default the tree's own, when it is alone there.
        #[arg(long)]
        freeze_cgroup: Option<PathBuf>,
        /// Take established TCP connections along (TCP_REPAIR); their packets are
        /// held (nftables, a packet queue) until the restore. Without it they are refused by name.
        #[arg(long)]
        tcp_established: bool,
        /// Page compression: none, fast, or a zstd level 1..19. None by default: the
        /// pages are compressed while the tree is frozen, at about 300 MB/s here, which
        /// is slower than writing them (1.4 ms of blackout for 400 KiB).
        #[arg(long, default_value = "none", value_parser = Compression::parse)]
        compress: Compression,
        /// A pre-dump of this tree: pages not written since it was taken stay there,
        /// and the restore reads them from it.
        #[arg(long)]
        prev_images_dir: Option<PathBuf>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Copy a running tree's memory and track its writes, so the checkpoint that
    /// follows (with --prev-images-dir) holds only the pages written since.
    PreDump {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// Images directory: created 0700, or an empty one.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// The previous pre-dump: this one holds only the pages written since it.
        #[arg(long)]
        prev_images_dir: Option<PathBuf>,
        #[arg(long)]
        freeze_cgroup: Option<PathBuf>,
        /// Page compression: fast by default, as a pre-dump copies while the tree runs.
        #[arg(long, default_value = "fast", value_parser = Compression::parse)]
        compress: Compression,
        #[arg(long)]
        json: bool,
    },
    /// How much of the tree at PID was written since a pre-dump began tracking it
    /// (its holder still running), read without freezing it.
    Written {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        #[arg(long)]
        json: bool,
    },
    /// Move a running tree to `mcr receive` elsewhere: pre-copy rounds while it runs,
    /// then a short freeze; the original is killed once it runs at the destination.
    Migrate {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// The destination: unix:PATH or tcp:HOST:PORT where `mcr receive` listens.
        #[arg(long)]
        to: String,
        #[arg(long)]
        shell_job: bool,
        /// Pre-copy until the last round would take about this long.
        #[arg(long, default_value_t = 20)]
        max_blackout_ms: u64,
        #[arg(long, default_value_t = 8)]
        max_rounds: u32,
        #[arg(long)]
        freeze_cgroup: Option<PathBuf>,
        /// Where the rounds' images are made before they are sent (default /dev/shm).
        #[arg(long)]
        staging: Option<PathBuf>,
        /// Take established TCP connections along (the destination needs it too).
        #[arg(long)]
        tcp_established: bool,
        /// A shell command run once the destination is ready and the original frozen,
        /// before the commit (moving the service address, say); failing, it aborts.
        #[arg(long, conflicts_with = "at_ready_fd")]
        at_ready: Option<String>,
        /// The same, told to whoever holds the other end of unix socket FD (which we
        /// inherited): we write `READY\n` and go on at `GO\n`; anything else, or
        /// nothing within 30 s, aborts. No program starts inside the blackout.
        #[arg(long, value_name = "FD")]
        at_ready_fd: Option<i32>,
        /// Resume at the destination before the last pages are there (post-copy): they
        /// come on first touch, and are pushed meanwhile; the original dies once every
        /// page is in place.
        #[arg(long)]
        post_copy: bool,
        /// Copy the pages into staging (each round's and the last image's), as for
        /// another host, even when the destination here can read them from the
        /// workload itself; to compare.
        #[arg(long)]
        copy_pages: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take one migration from `mcr migrate` and restore it here.
    Receive {
        /// unix:PATH or tcp:HOST:PORT.
        #[arg(long)]
        listen: String,
        /// Keep the images here instead of a temporary directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Make the tree only from the final image, not from the rounds as they come
        /// (a warm restore); for comparison.
        #[arg(long)]
        cold: bool,
        #[command(flatten)]
        how: RestoreArgs,
    },
    /// Bring a process back from an image, with the same pid.
    Restore {
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        #[command(flatten)]
        how: RestoreArgs,
    },
    /// Print an image.
    Show {
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Probe every kernel feature the engine uses.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Start a sample workload, migrate it live on this host, and report its blackout.
    Demo {
        /// Memory the sample workload keeps, in MiB.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// How fast it rewrites its memory, in MiB a second.
        #[arg(long, default_value_t = 32.0)]
        dirty_mib_s: f64,
    },
    /// Holds a dump's TCP packets for its restore (started by checkpoint, not for
    /// direct use).
    #[command(hide = true)]
    HoldPackets {
        /// The packet queue's socket, inherited.
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        queue: u16,
        /// The nftables table whose queue it is.
        #[arg(long)]
        table: String,
        #[arg(long, default_value_t = mcr::netlock::MAX_HOLD.as_secs())]
        max_hold_secs: u64,
    },
    /// Holds a pre-dump's write tracking until the next image (started by pre-dump,
    /// not for direct use).
    #[command(hide = true)]
    HoldTracker {
        #[arg(long, value_delimiter = ',')]
        fds: Vec<i32>,
        #[arg(long, value_delimiter = ',')]
        pids: Vec<i32>,
    },
    /// Keeps a post-copy's userfaultfds for `mcr receive`, and kills the workload should
    /// the receiver die before every page is in (started by receive, not for direct use).
    #[command(hide = true)]
    HoldLazy {
        #[arg(long)]
        fd: i32,
    },
    /// The sample workload `demo` runs (not for direct use).
    #[command(hide = true)]
    DemoWorkload {
        /// Memory per process, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Processes in the tree (this one and its children).
        #[arg(long, default_value_t = 1)]
        procs: usize,
        /// Threads per process, each rewriting its share of the memory.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run as one of the children: no protocol, just keep writing.
        #[arg(long)]
        child: bool,
        /// Be a TCP echo service for this many connections instead (prints its port).
        #[arg(long)]
        echo_conns: Option<usize>,
        /// Rewrite this many MiB a second (default: as fast as it can).
        #[arg(long)]
        dirty_mib_s: Option<f64>,
    },
}

fn steps_json(steps: &[(&'static str, Duration)]) -> serde_json::Value {
    steps
        .iter()
        .map(|(n, d)| serde_json::json!({"step": n, "ms": d.as_secs_f64() * 1e3}))
        .collect()
}

fn steps_text(steps: &[(&'static str, Duration)]) -> String {
    steps
        .iter()
        .map(|(n, d)| format!("{n} {:.2} ms", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Tables of ours left by an mcr that died while dumping: their connections would stay
/// blocked for good.
fn remove_stale_tables() {
    match kext_shim::nft::remove_stale() {
        Ok(gone) => {
            for t in gone {
                eprintln!(
                    "mcr: removed nftables table {t}, left by an mcr that died while dumping"
                );
            }
        }
        Err(e) => eprintln!("mcr: warning: removing stale nftables tables: {e}"),
    }
}

fn fail(e: &dyn std::error::Error, code: i32) -> ExitCode {
    let mut msg = format!("mcr: error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        // thiserror's transparent and `{source}` messages often repeat the cause.
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(&format!(": {t}"));
        }
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Checkpoint {
            pid,
            dir,
            leave_running,
            leave_stopped,
            shell_job,
            compress,
            freeze_cgroup,
            tcp_established,
            prev_images_dir,
            json,
            dry_run,
        } => {
            let after = if leave_running {
                AfterDump::LeaveRunning
            } else if leave_stopped {
                AfterDump::LeaveStopped
            } else {
                AfterDump::Kill
            };
            remove_stale_tables();
            // A dry run writes nothing; the writer still wants a place.
            let scratch = match dir {
                Some(_) => None,
                None => match tempfile::Builder::new()
                    .prefix("mcr-dry-run-")
                    .tempdir_in("/dev/shm")
                {
                    Ok(t) => Some(t),
                    Err(e) => return fail(&e, 1),
                },
            };
            let dir = match (dir, &scratch) {
                (Some(d), _) => d,
                (None, Some(t)) => t.path().join("img"),
                (None, None) => {
                    eprintln!("mcr: error: pid {pid}: no images directory (-D)");
                    return ExitCode::from(2);
                }
            };
            let opts = CheckpointOptions {
                pid,
                dir,
                after,
                shell_job,
                compression: compress,
                freeze_cgroup,
                tcp_established,
                prev: prev_images_dir,
                prev_held_pids: vec![],
                seen: Vec::new(),
                vm_flags: None,
                lazy: false,
                hot: Vec::new(),
                dry_run,
                pages_in_source: false,
            };
            if dry_run {
                return match mcr::dump::dry_run(&opts) {
                    Ok(r) => {
                        let ms = r.frozen_for.as_secs_f64() * 1e3;
                        if json {
                            let v = serde_json::json!({
                                "pid": r.pid, "processes": r.processes, "threads": r.threads,
                                "fds": r.fds, "tcp_connections": r.tcp_connections,
                                "mapped_bytes": r.mapped_bytes, "frozen_ms": ms,
                                "steps": steps_json(&r.steps),
                            });
                            println!("{v}");
                        } else {
                            eprintln!(
                                "mcr: pid {} can be checkpointed: {} processes, {} threads, {} fds, {} established TCP connections, {:.1} MiB mapped; frozen {ms:.2} ms to look",
                                r.pid, r.processes, r.threads, r.fds, r.tcp_connections,
                                r.mapped_bytes as f64 / (1 << 20) as f64
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e, e.exit_code()),
                };
            }
            match mcr::dump::checkpoint(&opts) {
                Ok(r) => {
                    if json {
                        let v = serde_json::json!({
                            "pid": r.pid,
                            "pages": r.stats.pages,
                            "raw_bytes": r.stats.raw_bytes,
                            "stored_bytes": r.stats.stored_bytes,
                            "frozen_ms": r.frozen_for.as_secs_f64() * 1e3,
                            "freezer": r.freezer,
                            "steps": steps_json(&r.steps),
                        });
                        println!("{v}");
                    } else {
                        eprintln!(
                            "mcr: checkpointed pid {}: {} pages ({:.1} MiB, {:.1} MiB stored), frozen {:.2} ms; {}",
                            r.pid,
                            r.stats.pages,
                            r.stats.raw_bytes as f64 / (1 << 20) as f64,
                            r.stats.stored_bytes as f64 / (1 << 20) as f64,
                            r.frozen_for.as_secs_f64() * 1e3,
                            steps_text(&r.steps)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::PreDump {
            pid,
            dir,
            prev_images_dir,
            freeze_cgroup,
            compress,
            json,
        } => {
            let opts = mcr::dump::predump::PreDumpOptions {
                pid,
                dir,
                prev: prev_images_dir,
                compression: compress,
                freeze_cgroup,
                pages_in_source: false,
                seen: Vec::new(),
            };
            match mcr::dump::predump::pre_dump(&opts) {
                Ok(r) => {
                    if json {
                        let v = serde_json::json!({
                            "pid": r.pid,
                            "pages": r.stats.pages,
                            "raw_bytes": r.stats.raw_bytes,
                            "stored_bytes": r.stats.stored_bytes,
                            "frozen_ms": r.frozen_for.as_secs_f64() * 1e3,
                            "tracked_vmas": r.tracked_vmas,
                            "untracked_vmas": r.untracked_vmas,
                            "holder_pid": r.holder_pid,
                            "steps": steps_json(&r.steps),
                        });
                        println!("{v}");
                    } else {
                        eprintln!(
                            "mcr: pre-dumped pid {}: {} pages ({:.1} MiB), frozen {:.2} ms; writes to {} VMAs tracked by pid {}; {}",
                            r.pid,
                            r.stats.pages,
                            r.stats.raw_bytes as f64 / (1 << 20) as f64,
                            r.frozen_for.as_secs_f64() * 1e3,
                            r.tracked_vmas,
                            r.holder_pid.unwrap_or(0),
                            steps_text(&r.steps)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::Written { pid, json } => {
            match mcr::dump::track::written_now(kext_shim::Pid::from_raw(pid)) {
                Ok(w) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"pid": pid, "written_bytes": w.written, "tracked_bytes": w.tracked, "untracked_bytes": w.untracked, "scan_ms": w.scan.as_secs_f64() * 1e3})
                        );
                    } else {
                        let mib = |b: u64| b as f64 / (1 << 20) as f64;
                        eprintln!(
                        "mcr: pid {pid}: {:.1} MiB written of {:.1} MiB tracked ({:.1} MiB untracked)",
                        mib(w.written),
                        mib(w.tracked),
                        mib(w.untracked)
                    );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::Migrate {
            pid,
            to,
            shell_job,
            max_blackout_ms,
            max_rounds,
            freeze_cgroup,
            staging,
            tcp_established,
            at_ready,
            at_ready_fd,
            post_copy,
            copy_pages,
            json,
        } => {
            let to = match two_way(&to) {
                Ok(a) => a,
                Err(e) => return fail(&e, 2),
            };
            let at_ready = match (at_ready, at_ready_fd) {
                (Some(c), _) => Some(mcr::migrate::AtReady::Command(c)),
                (None, Some(fd)) => match mcr::migrate::AtReady::peer_fd(fd) {
                    Ok(a) => Some(a),
                    Err(e) => return fail(&std::io::Error::other(e), 2),
                },
                (None, None) => None,
            };
            let opts = mcr::migrate::MigrateOptions {
                pid,
                to,
                shell_job,
                max_blackout: Duration::from_millis(max_blackout_ms),
                max_rounds,
                freeze_cgroup,
                staging,
                tcp_established,
                at_ready,
                post_copy,
                copy_pages,
            };
            match mcr::migrate::migrate(&opts) {
                Ok(r) => {
                    print_migration(&r, json);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::Receive {
            listen,
            workdir,
            cold,
            how,
        } => {
            let listener = match two_way(&listen).and_then(|a| transport::Listener::bind(&a)) {
                Ok(l) => l,
                Err(e) => return fail(&e, 2),
            };
            if let Ok(a) = listener.local_addr() {
                eprintln!("mcr: receiving on {a}");
            }
            let opts = mcr::migrate::receive::ReceiveOptions {
                restore: how.options(PathBuf::new()),
                workdir,
                warm: !cold,
            };
            let r = mcr::migrate::receive::receive(&listener, &opts);
            drop(listener);
            remove_stale_tables();
            match r {
                Ok(r) => restored(&r, "received and restored", &how),
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::HoldTracker { fds, pids } => mcr::dump::track::hold_main(&fds, &pids),
        Cmd::HoldLazy { fd } => mcr::migrate::postcopy::watchdog_main(fd),
        Cmd::Restore { dir, how } => {
            let opts = how.options(dir);
            let r = mcr::restore::restore(&opts);
            // After the restore, not before: the blackout is no place for it.
            remove_stale_tables();
            match r {
                Ok(r) => restored(&r, "restored", &how),
                Err(e) => fail(&e, e.exit_code()),
            }
        }
        Cmd::Show { dir, json } => match Image::open(&dir) {
            Ok(img) => {
                if json {
                    println!("{}", mcr::show::json(&img));
                } else {
                    print!("{}", mcr::show::text(&img));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, 6),
        },
        Cmd::Check { json } => {
            remove_stale_tables();
            let (features, ok) = mcr::check::run();
            if json {
                let v: Vec<_> = features
                    .iter()
                    .map(|f| serde_json::json!({"feature": f.name, "required": f.required, "present": f.present, "detail": f.detail}))
                    .collect();
                println!("{}", serde_json::json!({"ok": ok, "features": v}));
            } else {
                print!("{}", mcr::check::render(&features));
                println!(
                    "{}",
                    if ok {
                        "Looks good."
                    } else {
                        "Required features are missing."
                    }
                );
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Demo { mib, dirty_mib_s } => demo::run(mib, dirty_mib_s),
        Cmd::HoldPackets {
            fd,
            queue,
            table,
            max_hold_secs,
        } => mcr::netlock::hold_main(fd, queue, &table, Duration::from_secs(max_hold_secs)),
        Cmd::DemoWorkload {
            mib,
            procs,
            threads,
            child,
            echo_conns,
            dirty_mib_s,
        } => match echo_conns {
            Some(n) => demo::echo_service(n),
            None => demo::workload(mib, procs, threads, child, dirty_mib_s),
        },
    }
}

fn print_migration(r: &mcr::migrate::MigrateReport, json: bool) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if json {
        let rounds: Vec<_> = r
            .rounds
            .iter()
            .map(|x| {
                serde_json::json!({
                    "pages": x.pages, "bytes": x.bytes, "dump_ms": ms(x.dump),
                    "send_ms": ms(x.send), "frozen_ms": ms(x.frozen),
                    "apply_ms": ms(x.apply), "waited_ms": ms(x.waited), "scans": x.scans,
                })
            })
            .collect();
        let v = serde_json::json!({
            "pid": r.pid,
            "new_pid": r.new_pid,
            "rounds": rounds,
            "final_pages": r.final_pages,
            "final_bytes": r.final_bytes,
            "final_steps": r.final_steps.iter().map(|(k, d)| ((*k).to_string(), serde_json::json!(ms(*d)))).collect::<serde_json::Map<_, _>>(),
            "blackout_ms": ms(r.blackout),
            "blackout_began_ms": r.blackout_began
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "linked": r.linked,
            "destination_steps": r.destination_steps,
            "warm": r.warm,
            "cold_because": r.cold_because,
            "pages_in_source": r.pages_in_source,
            "gone_from_source": r.gone_from_source,
            "blackout": {
                "freeze_and_dump_ms": ms(r.freeze_and_dump),
                "transfer_ms": ms(r.transfer),
                "restore_ms": ms(r.restore),
                "commit_ms": ms(r.commit),
            },
            "total_ms": ms(r.total),
            "post_copy": r.post_copy.as_ref().map(|p| serde_json::json!({
                "pages": p.pages, "wanted": p.wanted, "sent": p.sent, "all_in_ms": ms(p.all_in),
            })),
        });
        println!("{v}");
        return;
    }
    for (i, x) in r.rounds.iter().enumerate() {
        let waited = match x.scans {
            0 => String::new(),
            n => format!(
                " (waited {:.0} ms for the destination, scanning the writes {n} times)",
                ms(x.waited)
            ),
        };
        if r.pages_in_source {
            eprintln!(
                "mcr: round {i}: {} pages ({:.1} MiB) left in the workload, listed in {:.1} ms, read from it and in place there in {:.1} ms, frozen {:.2} ms{waited}",
                x.pages,
                (x.pages * kext_shim::PAGE_SIZE) as f64 / (1 << 20) as f64,
                ms(x.dump),
                ms(x.apply),
                ms(x.frozen)
            );
            continue;
        }
        eprintln!(
            "mcr: round {i}: {} pages ({:.1} MiB) copied in {:.1} ms, sent in {:.1} ms, in place there in {:.1} ms, frozen {:.2} ms{waited}",
            x.pages,
            x.bytes as f64 / (1 << 20) as f64,
            ms(x.dump),
            ms(x.send),
            ms(x.apply),
            ms(x.frozen)
        );
    }
    match &r.cold_because {
        None if r.warm => {
            eprintln!("mcr: restored warm: the destination built the tree from the rounds")
        }
        Some(why) => eprintln!("mcr: restored cold: {why}"),
        None => {}
    }
    if r.gone_from_source > 0 {
        eprintln!(
            "mcr: {} runs of pages were unmapped in the workload before the destination read them; the next round said what is there now",
            r.gone_from_source
        );
    }
    eprintln!(
        "mcr: migrated pid {} (now pid {} there): blackout {:.1} ms (freeze and dump {:.1}, transfer {:.1}, restore {:.1}, commit {:.1}); last round {} pages; total {:.1} ms",
        r.pid,
        r.new_pid,
        ms(r.blackout),
        ms(r.freeze_and_dump),
        ms(r.transfer),
        ms(r.restore),
        ms(r.commit),
        r.final_pages,
        ms(r.total)
    );
    if let Some(p) = &r.post_copy {
        eprintln!(
            "mcr: post-copy: {} pages left out of the last image, every one in place {:.1} ms after the workload resumed ({} asked for at first touch)",
            p.pages,
            ms(p.all_in),
            p.wanted
        );
    }
}

/// An address a migration can talk both ways on: unix or TCP, not a file.
fn two_way(s: &str) -> Result<transport::Addr, transport::TransportError> {
    match transport::Addr::parse(s)? {
        transport::Addr::File(_) => Err(transport::TransportError::BadAddress(format!(
            "{s:?}: a migration needs answers from its destination: use unix:PATH or tcp:HOST:PORT"
        ))),
        a => Ok(a),
    }
}

/// After a restore (or a migration received): the pidfile, the report, and unless
/// detached, like `criu restore` without -d, staying the parent and passing its exit on.
fn restored(r: &mcr::restore::Restored, what: &str, how: &RestoreArgs) -> ExitCode {
    if let Some(p) = &how.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", r.pid)) {
            eprintln!("mcr: warning: writing pidfile {}: {e}", p.display());
        }
    }
    if how.json {
        let v = serde_json::json!({"pid": r.pid, "pages": r.pages, "steps": steps_json(&r.steps)});
        println!("{v}");
    } else {
        eprintln!(
            "mcr: {what} pid {}: {} pages; {}",
            r.pid,
            r.pages,
            steps_text(&r.steps)
        );
    }
    if how.detach {
        return ExitCode::SUCCESS;
    }
    match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r.child), None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => ExitCode::from(c as u8),
        Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => ExitCode::from(128 + s as u8),
        _ => ExitCode::SUCCESS,
    }
}
