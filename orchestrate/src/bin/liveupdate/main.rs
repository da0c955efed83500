#![forbid(unsafe_code)]
//! `liveupdate`: the operator's command for a live update of a running partition.

use clap::{Parser, Subcommand};
use orchestrate::{config, fix, notify, token};
use std::path::PathBuf;
use std::process::ExitCode;

mod operations;
mod partitions;

#[derive(Parser)]
#[command(
    name = "liveupdate",
    about = "Live update of a running partition, on top of mcr"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The operation's configuration (lvupdate.data).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Fix bundles: make one, show one, apply one to a root, list a root's fixes.
    Fix {
        #[command(subcommand)]
        cmd: FixCmd,
    },
    /// Tells the applications of a partition of an event (PREVIEW, PRE, POST) and
    /// prints their answers; exit 4 if one refuses where it may.
    Notify {
        event: String,
        /// The partition's root.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The fix, as the applications are told.
        #[arg(long, default_value = "-")]
        label: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// The console's credentials.
    Console {
        #[command(subcommand)]
        cmd: ConsoleCmd,
    },
    /// Automated mode: clone the partition's disk, apply FIX to the clone, start the
    /// surrogate on it, move the workload live, release the original.
    Run {
        /// Where the fix bundles are.
        #[arg(short = 'd', long)]
        fixdir: PathBuf,
        fix: String,
        #[command(flatten)]
        common: operations::Common,
    },
    /// Checks every precondition of `run` (PASSED/FAILED lines) and estimates the
    /// blackout, total time, disk and memory from the live workload; changes nothing.
    Preview {
        #[arg(short = 'd', long)]
        fixdir: PathBuf,
        fix: String,
        #[command(flatten)]
        common: operations::Common,
    },
    /// Moves the workload back live onto the disk the last live update kept; with
    /// --cold, stops it and starts it again there instead.
    Rollback {
        #[arg(long)]
        cold: bool,
        #[command(flatten)]
        common: operations::Common,
    },
    /// Builds a partition running a TCP service with a client outside that counts what
    /// it receives, live-updates it with a sample fix, and prints what happened.
    Demo {
        #[arg(long, default_value = orchestrate::demo::DIR)]
        dir: PathBuf,
        #[arg(long)]
        mcr: Option<PathBuf>,
        #[arg(long, default_value = "lud0")]
        bridge: String,
        #[arg(long, default_value = "10.88.0.1/24")]
        gateway: String,
        #[arg(long, default_value_t = 20)]
        max_blackout_ms: u64,
        /// Memory the demo service keeps, in MiB (0: only what it needs).
        #[arg(long, default_value_t = 0)]
        mib: usize,
        /// How much of it the service rewrites a second, in MiB.
        #[arg(long, default_value_t = 0.0)]
        dirty_mib_s: f64,
        /// The partition's disk an ext4 image on a loop device, not a directory.
        #[arg(long)]
        image: bool,
    },
    /// Partitions, through the console.
    Partition {
        #[command(subcommand)]
        cmd: partitions::PartitionCmd,
    },
    /// Run by the console as a partition's pid 1: sets it up, then becomes COMMAND.
    #[command(hide = true)]
    PartitionInit {
        #[arg(long)]
        name: String,
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        mount_at: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Root disks: clone one (reflink, overlayfs or a copy), or make the sample.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// The demo's workload: streams numbered lines with GREETING's content.
    #[command(hide = true)]
    DemoService {
        #[arg(long, default_value_t = 7000)]
        port: u16,
        #[arg(long, default_value = "/etc/demo/greeting")]
        greeting: PathBuf,
        /// Memory to keep, in MiB.
        #[arg(long, default_value_t = 0)]
        mib: usize,
        /// How much of it to rewrite a second, in MiB.
        #[arg(long, default_value_t = 0.0)]
        dirty_mib_s: f64,
        /// A file to append each line's number to, held open (a log on its disk).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// The journal: the start, success or failure of every operation.
    Log {
        /// Where liveupdate keeps its state.
        #[arg(long, default_value = orchestrate::STATE_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Clones FROM into TO (which must not exist), keeping modes, owners and mtimes:
    /// a tree by reflink, else as an overlay on it (mounted at TO/merged), else a
    /// copy; an image by a copy of its file, frozen meanwhile if it is in use.
    Clone { from: PathBuf, to: PathBuf },
    /// Makes the demo's sample disk at PATH: liveupdate itself, its libraries, a
    /// /dev/null and /etc/demo/greeting; a directory, or with --image an ext4 image.
    Sample {
        path: PathBuf,
        #[arg(long)]
        image: bool,
    },
}

#[derive(Subcommand)]
enum ConsoleCmd {
    /// The console service: partitions made, started, listed, renamed, destroyed.
    Serve(partitions::Serve),
    /// Stores a new token for USER, valid TTL seconds (0600, replacing the last one).
    Auth {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[arg(long, default_value = orchestrate::STATE_DIR)]
        dir: PathBuf,
    },
    /// Says whether the stored token is present and valid (exit 5 if not).
    Status {
        #[arg(long, default_value = orchestrate::STATE_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum FixCmd {
    /// Makes a bundle from files here and the paths they replace in a root.
    Create {
        /// The bundle to write (a .tar.zst).
        #[arg(short = 'o', long)]
        out: PathBuf,
        #[arg(long)]
        label: String,
        #[arg(long = "abstract")]
        summary: String,
        /// A fix that a live update cannot apply (the kernel's own, say).
        #[arg(long)]
        not_lu_capable: bool,
        /// Scripts run chrooted in the clone, before and after the files go in.
        #[arg(long)]
        pre: Option<PathBuf>,
        #[arg(long)]
        post: Option<PathBuf>,
        /// FILE:/TARGET/PATH, one or more.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Shows a bundle's attributes, after checking every file's checksum.
    Show { file: PathBuf },
    /// Applies a bundle to a root (a clone of a partition's root disk: a directory or
    /// an image).
    Apply {
        file: PathBuf,
        #[arg(long)]
        root: PathBuf,
    },
    /// The fixes applied to a root (a directory or an image), with their state codes
    /// (S stable, I being applied, B broken).
    List {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Checks a configuration: PASSED with what it says, or every problem by line.
    Check {
        #[arg(default_value = config::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Prints a commented template to start from.
    Template,
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Console {
            cmd: ConsoleCmd::Serve(s),
        } => partitions::serve(s),
        Cmd::Partition { cmd } => partitions::partition(cmd),
        Cmd::Run {
            fixdir,
            fix,
            common,
        } => operations::run(common, fixdir, fix),
        Cmd::Rollback { cold, common } => operations::rollback(common, cold),
        Cmd::Preview {
            fixdir,
            fix,
            common,
        } => operations::preview(common, fixdir, fix),
        Cmd::Demo {
            dir,
            mcr,
            bridge,
            gateway,
            max_blackout_ms,
            mib,
            dirty_mib_s,
            image,
        } => operations::demo(orchestrate::demo::DemoPlan {
            dir,
            mcr: operations::mcr_beside(mcr),
            bridge,
            gateway,
            max_blackout_ms,
            mib,
            dirty_mib_s,
            image,
        }),
        Cmd::Disk { cmd } => {
            let done = match cmd {
                DiskCmd::Clone { from, to } => orchestrate::disk::clone(&from, &to).map(|c| {
                    let (bytes, files) = orchestrate::disk::usage(&to);
                    let frozen = c.frozen.map_or(String::new(), |f| {
                        format!(", frozen {:.0} ms", f.as_secs_f64() * 1e3)
                    });
                    println!(
                        "liveupdate: cloned {} to {} by {} ({files} files, {bytes} bytes{frozen})",
                        from.display(),
                        to.display(),
                        c.method.name()
                    );
                }),
                DiskCmd::Sample { path, image } => std::env::current_exe()
                    .map_err(|e| orchestrate::disk::DiskError::Sample {
                        path: path.display().to_string(),
                        why: e.to_string(),
                    })
                    .and_then(|exe| {
                        let files = orchestrate::demo::SAMPLE_FILES;
                        if image {
                            orchestrate::disk::sample_image(&path, &exe, files)
                        } else {
                            orchestrate::disk::sample(&path, &exe, files)
                        }
                    }),
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("liveupdate: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::DemoService {
            port,
            greeting,
            mib,
            dirty_mib_s,
            log,
        } => match orchestrate::demo::service(&orchestrate::demo::Service {
            port,
            greeting,
            mib,
            dirty_mib_s,
            log,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("liveupdate: demo service: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::PartitionInit {
            name,
            disk,
            mount_at,
            cgroup,
            command,
        } => {
            let plan = orchestrate::partition::InitPlan {
                name: &name,
                disk: &disk,
                mount_at: &mount_at,
                cgroup: &cgroup,
                command: &command,
            };
            let Err(e) = orchestrate::partition::init(&plan);
            eprintln!("liveupdate: partition-init: {e}");
            ExitCode::from(1)
        }
        Cmd::Console {
            cmd:
                ConsoleCmd::Auth {
                    user,
                    ttl_secs,
                    dir,
                },
        } => match token::issue(&dir, &user, ttl_secs) {
            Ok(t) => {
                println!(
                    "liveupdate: console token for {} stored in {}, valid until {}",
                    t.user,
                    dir.join(token::FILE).display(),
                    orchestrate::journal::utc(t.expires)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Console {
            cmd: ConsoleCmd::Status { dir },
        } => match token::current(&dir) {
            Ok(t) => {
                println!(
                    "PASSED: console token for {}, valid until {}",
                    t.user,
                    orchestrate::journal::utc(t.expires)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("FAILED: {e}");
                ExitCode::from(5)
            }
        },
        Cmd::Notify {
            event,
            root,
            label,
            timeout_ms,
        } => {
            let Some(e) = notify::Event::parse(&event) else {
                eprintln!("liveupdate: {event:?}: expected PREVIEW, PRE or POST");
                return ExitCode::from(2);
            };
            let patience = std::time::Duration::from_millis(timeout_ms);
            match notify::tell(&root, e, &label, patience) {
                Ok(answers) => {
                    let mut stopped = false;
                    for (app, a) in &answers {
                        let (verdict, said) = match a {
                            notify::Answer::Ok => ("PASSED", "ready".to_string()),
                            notify::Answer::Gone => {
                                ("PASSED", "not listening any more (skipped)".into())
                            }
                            notify::Answer::Veto(why) => ("FAILED", format!("refuses: {why}")),
                            notify::Answer::Silent(why) => ("FAILED", why.clone()),
                        };
                        let verdict = if a.stops(e) || verdict == "PASSED" {
                            verdict
                        } else {
                            "NOTE"
                        };
                        stopped |= a.stops(e);
                        println!("{verdict}: application {app} ({}): {said}", e.name());
                    }
                    if answers.is_empty() {
                        println!(
                            "PASSED: no application asked to be told ({})",
                            root.join(notify::DIR).display()
                        );
                    }
                    if stopped {
                        ExitCode::from(4)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(err) => {
                    eprintln!("liveupdate: {}: {err}", root.join(notify::DIR).display());
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Fix { cmd } => match fix_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Log { dir } => match orchestrate::journal::Journal::at(&dir).read() {
            Ok(read) => {
                print!("{}", orchestrate::journal::report(&read.entries));
                for (line, why) in read.bad {
                    eprintln!(
                        "liveupdate: {}: line {line}: {why}",
                        dir.join("journal").display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Config {
            cmd: ConfigCmd::Template,
        } => {
            print!("{}", config::TEMPLATE);
            ExitCode::SUCCESS
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => match config::load(&file) {
            Ok(c) => {
                println!("PASSED: configuration {}", file.display());
                println!(
                    "  mode {}, kext_check {}",
                    c.general.mode,
                    yes(c.general.kext_check)
                );
                println!(
                    "  clone {}, mirror {}",
                    c.disks.clone.display(),
                    c.disks.mirror.display()
                );
                println!(
                    "  console unix:{} as {}, partition id {}",
                    c.console.address.display(),
                    c.console.user,
                    c.console
                        .partition_id
                        .map_or("chosen by the console".into(), |i| i.to_string())
                );
                ExitCode::SUCCESS
            }
            Err(config::ConfigError::Invalid { path, problems }) => {
                for p in &problems {
                    println!("FAILED: {}", p.at(&path));
                }
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn fix_cmd(cmd: FixCmd) -> Result<(), fix::FixError> {
    match cmd {
        FixCmd::Create {
            out,
            label,
            summary,
            not_lu_capable,
            pre,
            post,
            files,
        } => {
            let files = files
                .iter()
                .map(|f| match f.split_once(':') {
                    Some((src, target)) => Ok((PathBuf::from(src), target.to_string())),
                    None => Err(fix::FixError::Bad {
                        what: format!("{f:?}: expected FILE:/TARGET/PATH"),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let m = fix::create(
                &out,
                &fix::NewFix {
                    label,
                    summary,
                    lu_capable: !not_lu_capable,
                    files,
                    pre,
                    post,
                },
            )?;
            println!(
                "liveupdate: wrote fix {} ({} files) to {}",
                m.label,
                m.files.len(),
                out.display()
            );
        }
        FixCmd::Show { file } => {
            let b = fix::open(&file)?;
            let m = &b.manifest;
            println!("LABEL:        {}", m.label);
            println!("ABSTRACT:     {}", m.summary);
            println!("LU CAPABLE:   {}", yes(m.lu_capable));
            println!("PRE SCRIPT:   {}", yes(m.pre));
            println!("POST SCRIPT:  {}", yes(m.post));
            println!("FILES:        {}", m.files.len());
            for f in &m.files {
                println!(
                    "    {}  {:04o}  {} bytes  sha256 {}",
                    f.target, f.mode, f.size, f.sha256
                );
            }
            println!("CHECKSUMS:    verified");
        }
        FixCmd::Apply { file, root } => {
            let b = fix::open(&file)?;
            let i = on_files(&root, |files| fix::apply(&b, files))?;
            println!(
                "liveupdate: fix {} applied to {} (state {})",
                i.label,
                root.display(),
                i.state.code()
            );
        }
        FixCmd::List { root } => {
            let l = on_files(&root, fix::list)?;
            println!("ID  STATE  LABEL             INSTALL TIME (UTC)      ABSTRACT");
            for (n, i) in l.iter().enumerate() {
                println!(
                    "{:<3} {:<6} {:<17} {:<23} {}",
                    n + 1,
                    i.state.code(),
                    i.label,
                    orchestrate::journal::utc(i.time),
                    i.summary
                );
            }
            if l.is_empty() {
                println!("(no fix applied to {})", root.display());
            }
        }
    }
    Ok(())
}

/// `f` on the files of `root`: a directory, or an image mounted for the while (and
/// left mounted if it was).
fn on_files<T>(
    root: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> Result<T, fix::FixError>,
) -> Result<T, fix::FixError> {
    use orchestrate::disk;
    let bad = |e: disk::DiskError| fix::FixError::Bad {
        what: e.to_string(),
    };
    let mounted = disk::mounted_at(root).is_some();
    let files = disk::files(root).map_err(bad)?;
    let r = f(&files);
    if !mounted {
        disk::release(root).map_err(bad)?;
    }
    r
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
