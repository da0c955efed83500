//! Live migration: `mcr migrate` (the source) and `mcr receive` (the destination).
//!
//! The source copies the tree's memory in pre-copy rounds while it runs (each round a
//! pre-dump holding what was written since the one before), until what is left to send
//! fits the blackout asked for or stops shrinking; then it freezes the tree, sends the
//! last image (the pages written since the last round and every other kind of state)
//! and waits. The destination restores the chain; once the workload runs there, it
//! says so, and only then does the source kill the original. Any failure before that
//! resumes the original as it was, its write tracking ended.
//!
//! The rounds travel as image files (by hard link on one host); the destination builds
//! the tree from the first and fills it as the others arrive (warm restore, `receive`).
//! With post-copy the last pages come after the workload resumed there (`postcopy`).

pub mod local;
pub mod postcopy;
pub mod receive;
mod staging;
pub mod wire;

use crate::dump::predump::{pre_dump_round, PreDumpOptions};
use crate::dump::{checkpoint_held, track, AfterDump, CheckpointOptions, DumpError};
use crate::image::Compression;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use transport::{Addr, FrameReader, FrameWriter, Stream};

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub pid: i32,
    pub to: Addr,
    pub shell_job: bool,
    /// The blackout to aim for: pre-copy goes on until the last round would fit it.
    pub max_blackout: Duration,
    /// At most this many pre-copy rounds; 0 is stop-and-copy (everything moves in the
    /// blackout), for comparison.
    pub max_rounds: u32,
    pub freeze_cgroup: Option<PathBuf>,
    /// Where the images are made before they are sent (a tmpfs is best).
    pub staging: Option<PathBuf>,
    /// Take established TCP connections (stopped on the wire from the freeze until the
    /// destination made them again).
    pub tcp_established: bool,
    /// Once the destination is ready and the original frozen, before the commit:
    /// where the operator moves what mcr does not (the service address). If it fails,
    /// the migration is abandoned and the original resumes.
    pub at_ready: Option<AtReady>,
    /// Resume at the destination before the last pages are there: they are left
    /// missing and handed out on first touch, and pushed meanwhile.
    pub post_copy: bool,
    /// Copy the pages into staging (the rounds' and the last image's) even when the
    /// destination could read them from the workload itself (on this host): to
    /// compare, or to keep each image whole.
    pub copy_pages: bool,
}

/// Who is told, inside the blackout, that the destination is ready.
#[derive(Debug, Clone)]
pub enum AtReady {
    /// A shell command (`sh -c`), which must succeed.
    Command(String),
    /// The program that started us, on a unix socket it gave us: we write `READY`
    /// and a newline, and go on when it answers `GO` and a newline. Anything else,
    /// or nothing within [`AT_READY_PATIENCE`], abandons the migration. No program
    /// starts inside the blackout: on this machine a `sh -c` of a small program
    /// alone is 2-4 ms of it.
    Peer(std::sync::Arc<std::os::unix::net::UnixStream>),
}

/// How long the blackout waits for an [`AtReady::Peer`]'s answer.
pub const AT_READY_PATIENCE: Duration = Duration::from_secs(30);

impl AtReady {
    /// The socket inherited as fd `fd`, for [`AtReady::Peer`].
    pub fn peer_fd(fd: i32) -> std::result::Result<AtReady, String> {
        let own =
            kext_shim::sys::dup_above(fd, 3).map_err(|e| format!("--at-ready-fd {fd}: {e}"))?;
        // The number inherited stays open, owned by no one: no child of ours may keep
        // the peer's socket alive after we are gone.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| format!("--at-ready-fd {fd}: {e}"))?;
        let s = std::os::unix::net::UnixStream::from(own);
        s.set_read_timeout(Some(AT_READY_PATIENCE))
            .map_err(|e| format!("--at-ready-fd {fd}: not a unix socket ({e})"))?;
        Ok(AtReady::Peer(std::sync::Arc::new(s)))
    }

    fn name(&self) -> String {
        match self {
            AtReady::Command(c) => format!("the --at-ready command {c:?}"),
            AtReady::Peer(_) => "the peer on --at-ready-fd".into(),
        }
    }

    fn run(&self, pid: i32) -> Result<()> {
        let s = match self {
            AtReady::Command(cmd) => return run_hook(pid, cmd, &self.name()),
            AtReady::Peer(s) => s,
        };
        use std::io::{BufRead, Write};
        let failed = |why: String| MigrateError::Hook {
            pid,
            cmd: self.name(),
            why,
        };
        (&**s)
            .write_all(b"READY\n")
            .map_err(|e| failed(format!("telling it: {e}")))?;
        let mut line = String::new();
        std::io::BufReader::new(&**s)
            .read_line(&mut line)
            .map_err(|e| failed(format!("no answer: {e}")))?;
        match line.trim_end_matches('\n') {
            "GO" => Ok(()),
            "" => Err(failed("it closed the socket without an answer".into())),
            other => Err(failed(format!("it answered {other:?}"))),
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone)]
pub struct Round {
    pub pages: u64,
    pub bytes: u64,
    /// Copying (the pre-dump) and sending it.
    pub dump: Duration,
    pub send: Duration,
    /// How long the tree was frozen for it.
    pub frozen: Duration,
    /// How long the destination took to put it in place, as it measured it.
    pub apply: Duration,
    /// How long it waited, before it began, for the destination to catch up.
    pub waited: Duration,
    /// How many times it scanned the running tree's writes meanwhile.
    pub scans: u32,
}

/// What a migration did, with its blackout split into its parts.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    pub pid: i32,
    /// The root's pid at the destination, as its host sees it.
    pub new_pid: i32,
    pub rounds: Vec<Round>,
    /// Final image: freezing and dumping, sending, the destination's restore, and
    /// from its answer to the original's end.
    pub freeze_and_dump: Duration,
    pub final_pages: u64,
    pub final_bytes: u64,
    /// The final checkpoint's own steps (freeze, collect state, dump pages, ...).
    pub final_steps: Vec<(&'static str, Duration)>,
    /// The destination's restore steps, (name, ms), as it measured them.
    pub destination_steps: Vec<(String, f64)>,
    pub transfer: Duration,
    pub restore: Duration,
    pub commit: Duration,
    /// The images went by hard link (one host, one filesystem), not as bytes.
    pub linked: bool,
    /// The destination finished the tree it built from the rounds; or it restored
    /// cold, for this reason.
    pub warm: bool,
    pub cold_because: Option<String>,
    /// The rounds left their pages in the workload for the destination to read.
    pub pages_in_source: bool,
    /// See [`wire::Restored::gone_from_source`].
    pub gone_from_source: u64,
    /// From the freeze to the destination's word that the workload runs there, as the
    /// source measured it (the original's end comes after).
    pub blackout: Duration,
    /// When it began, on the wall clock.
    pub blackout_began: std::time::SystemTime,
    pub total: Duration,
    /// With post-copy: what was left out of the last image and how it went.
    pub post_copy: Option<PostCopyReport>,
}

/// A post-copy's pages after the blackout.
#[derive(Debug, Clone)]
pub struct PostCopyReport {
    /// Left out of the last image.
    pub pages: u64,
    /// Sent on the destination's request (a touch that had to wait).
    pub wanted: u64,
    /// Sent in all (requests included).
    pub sent: u64,
    /// From the workload's resumption there to the destination's word that every page
    /// is in place.
    pub all_in: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Dump(#[from] DumpError),
    #[error("pid {pid}: {step}: {source}")]
    Transport {
        pid: i32,
        step: String,
        #[source]
        source: transport::TransportError,
    },
    #[error("pid {pid}: the destination failed to restore it: {why}; it runs on here")]
    Destination { pid: i32, why: String },
    #[error("pid {pid}: {what}")]
    Protocol { pid: i32, what: String },
    #[error("pid {pid}: {why}; migration abandoned, it runs on here (try again)")]
    Changed { pid: i32, why: String },
    #[error("pid {pid}: at ready, {cmd} failed ({why}); migration abandoned, it runs on here")]
    Hook { pid: i32, cmd: String, why: String },
    #[error("pid {pid}: the destination was told to take over, then went silent ({why}); it may run there: the original is left stopped (SIGCONT resumes it, SIGKILL ends it)")]
    InDoubt { pid: i32, why: String },
    #[error("{0}")]
    Restore(#[from] crate::restore::RestoreError),
    #[error("pid {pid}: post-copy: the workload runs at the destination, but {why}; the original is left stopped (its memory is the only whole copy)")]
    PostCopyLost { pid: i32, why: String },
    #[error(
        "pid {pid}: {why}; the workload here (pid {here}) was killed, as it missed pages only the source had"
    )]
    LostSource { pid: i32, here: i32, why: String },
}

impl MigrateError {
    pub fn exit_code(&self) -> i32 {
        match self {
            MigrateError::Dump(e) => e.exit_code(),
            MigrateError::Restore(e) => e.exit_code(),
            MigrateError::Transport { .. } | MigrateError::Protocol { .. } => 9,
            MigrateError::Destination { .. } => 10,
            MigrateError::InDoubt { .. }
            | MigrateError::PostCopyLost { .. }
            | MigrateError::LostSource { .. } => 11,
            MigrateError::Hook { .. } => 12,
            MigrateError::Changed { .. } => 13,
        }
    }
}

pub type Result<T> = std::result::Result<T, MigrateError>;

pub fn migrate(opts: &MigrateOptions) -> Result<MigrateReport> {
    let pid = opts.pid;
    let t0 = Instant::now();
    let tx = |step: &str| {
        let step = step.to_string();
        move |source| MigrateError::Transport {
            pid,
            step: step.clone(),
            source,
        }
    };
    // Loaded while the tree runs: the blackout then reads the VMA flags in microseconds.
    crate::dump::vmflags::fast();
    let stream = Stream::connect(&opts.to).map_err(tx("connecting to the destination"))?;
    let back = stream
        .try_clone()
        .map_err(tx("connecting to the destination"))?;
    let mut w = FrameWriter::new(stream, transport::Compression::Auto(1), opts.to.to_string());
    let (to_server, server_rx) = std::sync::mpsc::channel();
    let mut r = Answers::start(
        FrameReader::new(back, opts.to.to_string()),
        to_server.clone(),
    );
    let staging = match &opts.staging {
        Some(d) => staging::make(d, "mcr-migrate-"),
        None => staging::make(&default_staging(), "mcr-migrate-"),
    }
    .map_err(|e| MigrateError::Protocol {
        pid,
        what: format!("making a staging directory: {e}"),
    })?;
    let here = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(staging.path()).map_err(|e| MigrateError::Protocol {
            pid,
            what: format!("{}: {e}", staging.path().display()),
        })?;
        wire::Staging {
            path: staging.path().display().to_string(),
            dev: m.dev(),
            ino: m.ino(),
            boot_id: kext_shim::procfs::boot_id(),
        }
    };
    wire::send_json(
        &mut w,
        wire::HELLO,
        &wire::Hello {
            protocol: wire::PROTOCOL,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            root_pid: pid,
            root_start: kext_shim::procfs::Stat::read(kext_shim::Pid::from_raw(pid))
                .map_or(0, |s| s.field(22)),
            staging: here,
            post_copy: opts.post_copy,
        },
    )
    .map_err(tx("greeting the destination"))?;
    // On one host, with the same filesystem under both, the images go by hard link: no
    // byte of them crosses the socket, and no page of them is stored twice.
    let welcome: wire::Welcome = wire::parse(wire::WELCOME, &expect(&mut r, pid, wire::WELCOME)?)
        .map_err(|what| MigrateError::Protocol { pid, what })?;
    let link = welcome.link;
    // On one host the rounds leave their pages where they are, for the destination to
    // read once from the workload: no staging copy, no staging memory.
    let in_source = welcome.read_source && !opts.copy_pages;
    let send = |w: &mut wire::Writer, dir: &Path, name: &str, last: bool| {
        wire::send_image(w, dir, name, last, link).map_err(|what| MigrateError::Protocol {
            pid,
            what: format!("sending image {name}: {what}"),
        })
    };

    // Pre-copy. The rounds' userfaultfds stay here, tracking without a pause from one
    // round to the next; dropped (on failure too), they end the tracking.
    let mut trackers = Vec::new();
    let mut rounds: Vec<Round> = Vec::new();
    // How many of them the destination has put in place.
    let mut applied = 0;
    let mut prev: Option<PathBuf> = None;
    let mut last_copied = None;
    // Waited for the destination after the round before, when it seemed to fit.
    let mut waited_then = Duration::ZERO;
    // What scans of the running tree found while waiting, for the next image.
    let mut seen = Seen::default();
    while (rounds.len() as u32) < opts.max_rounds {
        // One round in flight at most: a source far ahead of the destination would
        // wait for it all at the end, and what was written meanwhile would make a big
        // last round (measured: 1 GiB at 256 MiB/s, rounds down to 6 MiB, then 540).
        // Scanned meanwhile, so that this round, frozen, finds only what was written
        // since the last scan: the freeze then depends on the dirty rate, not on how
        // long the destination took.
        let t = Instant::now();
        while applied + 1 < rounds.len() {
            match r.applied(pid, Wait::Up(SCAN_WHILE_WAITING))? {
                Some(a) => note_applied(&mut rounds, &mut applied, a),
                None => seen.scan(&trackers),
            }
        }
        let waited = t.elapsed() + std::mem::take(&mut waited_then);
        let name = format!("round-{}", rounds.len());
        let dir = staging.path().join(&name);
        let t = Instant::now();
        let (mut rep, kept) = pre_dump_round(
            &PreDumpOptions {
                pid,
                dir: dir.clone(),
                prev: prev.clone(),
                compression: Compression::None,
                freeze_cgroup: opts.freeze_cgroup.clone(),
                pages_in_source: in_source,
                seen: std::mem::take(&mut seen.runs),
            },
            std::mem::take(&mut trackers),
        )?;
        trackers = kept;
        let dump = t.elapsed();
        last_copied = Some(std::mem::take(&mut rep.copied));
        let t = Instant::now();
        let bytes = send(&mut w, &dir, &name, false)?;
        let send_time = t.elapsed();
        if let Some(p) = prev.as_ref().filter(|_| !link) {
            // The destination has it; this side needs only the newest round. (Links
            // are made as the destination reads the stream: their files stay until the
            // end.)
            let _ = std::fs::remove_dir_all(p);
        }
        rounds.push(Round {
            pages: rep.stats.pages,
            bytes,
            dump,
            send: send_time,
            frozen: rep.frozen_for,
            apply: Duration::ZERO,
            waited,
            scans: std::mem::take(&mut seen.scans),
        });
        // The next round begins while the destination puts this one in place: its
        // answers are taken as they come.
        while let Some(a) = r.applied(pid, Wait::No)? {
            note_applied(&mut rounds, &mut applied, a);
        }
        prev = Some(dir);
        crate::fault::stall(crate::fault::MIGRATE_STALL_AFTER_ROUND);
        crate::fault::wait(crate::fault::MIGRATE_WAIT_AFTER_ROUND);
        let verdict = converged(&rounds, opts.max_rounds, opts.max_blackout, in_source);
        if verdict != Converged::No {
            // Not before every round is in place there, or the blackout would wait for
            // it; what is written meanwhile needs one more round if that was long and
            // the rounds were converging.
            let t = Instant::now();
            while applied < rounds.len() {
                match r.applied(pid, Wait::Up(SCAN_WHILE_WAITING))? {
                    Some(a) => note_applied(&mut rounds, &mut applied, a),
                    None => seen.scan(&trackers),
                }
            }
            if verdict == Converged::GivesUp || t.elapsed() <= opts.max_blackout {
                break;
            }
            // The next round holds what was written meanwhile, which says nothing of
            // whether the rounds shrink.
            waited_then = t.elapsed();
        }
    }
    while applied < rounds.len() {
        match r.applied(pid, Wait::Up(SCAN_WHILE_WAITING))? {
            Some(a) => note_applied(&mut rounds, &mut applied, a),
            None => seen.scan(&trackers),
        }
    }

    // Without the BPF reader: read while the tree runs, confirmed while it is frozen
    // and the destination works.
    let ahead = (!trackers.is_empty() && crate::dump::vmflags::fast().is_none()).then(|| {
        let pids: Vec<_> = trackers.iter().map(|t| t.pid()).collect();
        std::sync::Arc::new(crate::dump::vmflags::VmFlagsAhead::read(&pids))
    });
    // Post-copy sends in the blackout what the last round saw written again (a first
    // round took everything: not then).
    let hot = match last_copied {
        Some(c) if opts.post_copy && rounds.len() > 1 => c,
        _ => Vec::new(),
    };
    crate::fault::wait(crate::fault::MIGRATE_WAIT_BEFORE_FREEZE);
    // The blackout.
    let t_black = Instant::now();
    let blackout_began = std::time::SystemTime::now();
    let dir = staging.path().join("final");
    let mut held = checkpoint_held(&CheckpointOptions {
        pid,
        dir: dir.clone(),
        after: AfterDump::Kill,
        shell_job: opts.shell_job,
        compression: Compression::None,
        freeze_cgroup: opts.freeze_cgroup.clone(),
        tcp_established: opts.tcp_established,
        prev: prev.clone(),
        prev_held_pids: trackers.iter().map(|t| t.pid().as_raw()).collect(),
        seen: std::mem::take(&mut seen.runs),
        vm_flags: ahead.clone(),
        lazy: opts.post_copy,
        hot,
        dry_run: false,
        // Read by the destination from the frozen original, which stays frozen until
        // the destination has it all.
        pages_in_source: in_source,
    })?;
    let freeze_and_dump = t_black.elapsed();
    let t = Instant::now();
    if opts.post_copy {
        let lazy = wire::Lazy {
            processes: held.lazy.iter().map(|l| (l.pid, l.runs.clone())).collect(),
        };
        wire::send_json(&mut w, wire::LAZY, &lazy)
            .map_err(tx("listing the pages left to post-copy"))?;
    }
    let final_bytes = send(&mut w, &dir, "final", true)?;
    let transfer = t.elapsed();
    // From here the writer is shared with the post-copy server, which answers the
    // destination's first touches (even during its restore) from the frozen original.
    let w = std::sync::Arc::new(std::sync::Mutex::new(w));
    let server = opts.post_copy.then(|| {
        let s = postcopy::Server::new(held.lazy.clone());
        let pages = s.pages();
        let w = w.clone();
        (pages, std::thread::spawn(move || s.run(&w, server_rx)))
    });

    let t = Instant::now();
    // Whole there and held: READY. Anything else and `held` resumes the original as it
    // goes, and `trackers` end its tracking.
    expect(&mut r, pid, wire::READY)?;
    if let Some(Err(why)) = ahead.map(|a| a.confirm()) {
        // Before the commit point: the original resumes as it was.
        return Err(MigrateError::Changed { pid, why });
    }
    crate::fault::stall(crate::fault::MIGRATE_STALL_AT_READY);
    if let Some(a) = &opts.at_ready {
        a.run(pid)?;
    }
    // The commit point: from here the original never runs again on its own, even if
    // we die; before it, it resumes as it was (a tracer's death lets it go).
    held.stop_for_good()?;
    crate::fault::stall(crate::fault::MIGRATE_STALL_AT_COMMIT);
    // A poisoned writer only means a thread died mid-frame: the stream says so.
    let committed = wire::send_json(
        &mut w.lock().unwrap_or_else(|e| e.into_inner()),
        wire::COMMIT,
        &(),
    )
    .map_err(tx("committing"))
    .and_then(|_| expect(&mut r, pid, wire::RESTORED));
    let restored: wire::Restored = match committed {
        Ok(payload) => wire::parse(wire::RESTORED, &payload)
            .map_err(|what| MigrateError::Protocol { pid, what })?,
        // It said it could not: it killed what it made, and the original goes on.
        Err(e @ MigrateError::Destination { .. }) => {
            held.resume_stopped()?;
            return Err(e);
        }
        // It may run there now, or not: the original stays stopped, for the operator.
        Err(e) => {
            held.release(AfterDump::LeaveStopped, true)?;
            return Err(MigrateError::InDoubt {
                pid,
                why: e.to_string(),
            });
        }
    };
    let restore = t.elapsed();
    // The workload runs at the destination.
    let blackout = t_black.elapsed();
    let post_copy = match server {
        None => None,
        Some((pages, server)) => {
            let t = Instant::now();
            crate::fault::wait(crate::fault::MIGRATE_WAIT_IN_POST_COPY);
            let _ = to_server.send(postcopy::ToServer::Push);
            let served = server
                .join()
                .map_err(|_| "the page server panicked".to_string())
                .and_then(|r| r)
                .and_then(|s| {
                    expect(&mut r, pid, wire::ALL_IN)
                        .map(|_| s)
                        .map_err(|e| e.to_string())
                });
            match served {
                Ok(s) => Some(PostCopyReport {
                    pages,
                    wanted: s.wanted,
                    sent: s.pages,
                    all_in: t.elapsed(),
                }),
                Err(why) => {
                    held.release(AfterDump::LeaveStopped, true)?;
                    return Err(MigrateError::PostCopyLost { pid, why });
                }
            }
        }
    };
    let t = Instant::now();
    let final_pages = held.report.stats.pages;
    let final_steps = held.report.steps.clone();
    held.release(AfterDump::Kill, true)?;
    drop(trackers);
    let commit = t.elapsed();
    if let Ok(w) = std::sync::Arc::try_unwrap(w) {
        let _ = w.into_inner().map(|w| w.finish());
    }
    Ok(MigrateReport {
        pid,
        new_pid: restored.pid,
        rounds,
        freeze_and_dump,
        final_pages,
        final_bytes,
        final_steps,
        transfer,
        restore,
        commit,
        blackout,
        blackout_began,
        linked: link,
        destination_steps: restored.steps,
        warm: restored.warm,
        cold_because: restored.cold_because,
        pages_in_source: in_source,
        gone_from_source: restored.gone_from_source,
        total: t0.elapsed(),
        post_copy,
    })
}

/// Runs the operator's command; its failure abandons the migration.
fn run_hook(pid: i32, cmd: &str, name: &str) -> Result<()> {
    use std::os::fd::AsFd;
    // Its output is for the operator, on stderr: our stdout may be a --json report.
    let out = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .status()
        .map_err(|e| MigrateError::Hook {
            pid,
            cmd: name.into(),
            why: e.to_string(),
        })?;
    if !st.success() {
        return Err(MigrateError::Hook {
            pid,
            cmd: name.into(),
            why: st.to_string(),
        });
    }
    Ok(())
}

/// The destination's answers, read on a thread of their own, so that pre-copy can go
/// on while the destination puts a round in place and take its answer when it comes.
struct Answers {
    rx: std::sync::mpsc::Receiver<transport::Result<Option<Frame>>>,
}

/// A frame's kind and payload, owned.
type Frame = (u16, Vec<u8>);

/// How long to wait for an answer.
#[derive(Clone, Copy)]
enum Wait {
    No,
    Up(Duration),
    Forever,
}

/// How often the source scans the running tree's writes while it waits for the
/// destination (see [`track::scan_running`]): at 32 MiB/s, a few thousand pages a
/// scan, where a 4 GiB round after the first one's 8 s fill found 256k.
const SCAN_WHILE_WAITING: Duration = Duration::from_millis(250);

/// What the scans made while waiting found, for the next round.
#[derive(Default)]
struct Seen {
    /// Per host pid, sorted runs.
    runs: Vec<(i32, Vec<(u64, u64)>)>,
    scans: u32,
}

impl Seen {
    fn scan(&mut self, trackers: &[kext_shim::dirty::WriteTracker]) {
        let mut pages = 0;
        let t0 = Instant::now();
        for t in trackers {
            let p = t.pid();
            // Gone, or gone since the maps were read: its tracker ends with the next
            // round, which does not find it.
            let found = match track::scan_running(p) {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(pid = p.as_raw(), "not scanned while waiting: {e}");
                    continue;
                }
            };
            pages += found
                .iter()
                .map(|r| (r.1 - r.0) / kext_shim::PAGE_SIZE)
                .sum::<u64>();
            match self.runs.iter_mut().find(|r| r.0 == p.as_raw()) {
                Some(r) => r.1 = crate::ranges::union(&r.1, &found),
                None => self.runs.push((p.as_raw(), found)),
            }
        }
        self.scans += 1;
        tracing::debug!(
            "scan {} of the writes while waiting for the destination: {pages} pages in {:?}",
            self.scans,
            t0.elapsed()
        );
    }
}

impl Answers {
    /// Post-copy's requests go to `pages`, the rest to [`Answers::next`].
    fn start(mut r: wire::Reader, pages: std::sync::mpsc::Sender<postcopy::ToServer>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            let got = r.recv().map(|f| f.map(|f| (f.kind, f.payload.to_vec())));
            if let Ok(Some((wire::PAGE_WANTED, p))) = &got {
                if let Ok((pid, addr, _)) = wire::parse_page_header(p) {
                    let _ = pages.send(postcopy::ToServer::Wanted(pid, addr));
                }
                continue;
            }
            let more = matches!(got, Ok(Some(_)));
            if tx.send(got).is_err() || !more {
                return;
            }
        });
        Self { rx }
    }

    /// The next answer; None when none came in the time `wait` allows.
    fn next(&self, pid: i32, wait: Wait) -> Result<Option<Frame>> {
        use std::sync::mpsc::RecvTimeoutError;
        let got = match wait {
            Wait::Forever => self.rx.recv().ok(),
            Wait::No => match self.rx.try_recv() {
                Ok(got) => Some(got),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            },
            Wait::Up(d) => match self.rx.recv_timeout(d) {
                Ok(got) => Some(got),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        match got {
            Some(Ok(Some(f))) => Ok(Some(f)),
            Some(Err(source)) => Err(MigrateError::Transport {
                pid,
                step: "waiting for the destination".into(),
                source,
            }),
            Some(Ok(None)) | None => Err(MigrateError::Protocol {
                pid,
                what: "the destination hung up without an answer".into(),
            }),
        }
    }

    /// The destination's word that the next round is in place, if it came in the
    /// time `wait` allows.
    fn applied(&self, pid: i32, wait: Wait) -> Result<Option<wire::Applied>> {
        let Some((kind, payload)) = self.next(pid, wait)? else {
            return Ok(None);
        };
        let payload = answer(pid, wire::APPLIED, kind, payload)?;
        wire::parse(wire::APPLIED, &payload)
            .map(Some)
            .map_err(|what| MigrateError::Protocol { pid, what })
    }
}

fn note_applied(rounds: &mut [Round], applied: &mut usize, a: wire::Applied) {
    if let Some(r) = rounds.get_mut(*applied) {
        r.apply = Duration::from_secs_f64(a.apply_ms.max(0.0) / 1e3);
    }
    *applied += 1;
}

/// Reads the destination's next answer, which must be of `kind`; returns its payload.
fn expect(r: &mut Answers, pid: i32, kind: u16) -> Result<Vec<u8>> {
    let (got, payload) = r.next(pid, Wait::Forever)?.expect("blocking");
    answer(pid, kind, got, payload)
}

/// The payload of an answer of kind `got`, which should be `kind`: FAILED is the
/// destination's refusal, anything else a protocol error.
fn answer(pid: i32, kind: u16, got: u16, payload: Vec<u8>) -> Result<Vec<u8>> {
    match got {
        k if k == kind => Ok(payload),
        wire::FAILED => {
            let why = wire::parse::<wire::Failed>(got, &payload)
                .map(|m| m.error)
                .unwrap_or_else(|e| e);
            Err(MigrateError::Destination { pid, why })
        }
        k => Err(MigrateError::Protocol {
            pid,
            what: format!("unexpected answer of kind {k} (expected {kind})"),
        }),
    }
}

/// Whether to stop pre-copying, and why.
#[derive(Debug, PartialEq)]
enum Converged {
    No,
    /// The last round took no longer than the blackout asked for: the next one,
    /// holding what was written meanwhile, would be about as long.
    Fits,
    /// Enough rounds; or they stopped shrinking (by a fifth); or those after the first
    /// have sent as much as the first: they are not converging, and their images are
    /// all kept until the end (by link, or at the destination), so more would only
    /// cost memory.
    GivesUp,
}

/// Whether to stop pre-copy after `rounds`. Sizes are in pages: a round that left its
/// pages in the source (`in_source`) is a list of a few bytes whatever it lists, and
/// its pages are copied by the destination (its `apply`, once known), not by us.
fn converged(
    rounds: &[Round],
    max_rounds: u32,
    max_blackout: Duration,
    in_source: bool,
) -> Converged {
    let Some(last) = rounds.last() else {
        return Converged::No;
    };
    if rounds.len() as u32 >= max_rounds {
        return Converged::GivesUp;
    }
    // The first round is everything: it says nothing about the dirty rate.
    let Some(before) = rounds.iter().rev().nth(1) else {
        return Converged::No;
    };
    let since_first: u64 = rounds[1..].iter().map(|r| r.pages).sum();
    // A round that mostly waited for the destination (its first fill of a big
    // workload) holds the writes of that wait: it says the destination was slow, not
    // that the rounds stopped converging.
    let shrank_not = last.pages * 5 > before.pages * 4 && last.waited <= last.dump + last.send;
    let copy = last.dump
        + last.send
        + if in_source {
            last.apply
        } else {
            Duration::ZERO
        };
    if shrank_not || since_first >= rounds[0].pages {
        Converged::GivesUp
    } else if copy <= max_blackout {
        Converged::Fits
    } else {
        Converged::No
    }
}

/// A tmpfs when there is one: staging images on disk would only slow the rounds.
fn default_staging() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(pages: u64, bytes: u64, ms: u64, apply_ms: u64, waited_ms: u64) -> Round {
        Round {
            pages,
            bytes,
            dump: Duration::from_millis(ms),
            send: Duration::ZERO,
            frozen: Duration::ZERO,
            apply: Duration::from_millis(apply_ms),
            waited: Duration::from_millis(waited_ms),
            scans: 0,
        }
    }

    #[test]
    fn rounds_left_in_the_source_are_judged_by_their_pages_and_the_destinations_copy() {
        let limit = Duration::from_millis(20);
        // 1 GiB listed in 50 KiB, then rounds of single pages listed in 48 bytes each:
        // by bytes the third would hold more than the first and give up.
        let first = round(262_144, 50 << 10, 45, 600, 0);
        let rounds = [
            first.clone(),
            round(800, 38 << 10, 3, 5, 0),
            round(7_000, 330 << 10, 7, 50, 0),
        ];
        assert_eq!(
            converged(&rounds, 8, limit, true),
            Converged::GivesUp,
            "it grew: by pages too"
        );
        let rounds = [
            first.clone(),
            round(7_000, 330 << 10, 7, 50, 0),
            round(900, 42 << 10, 3, 0, 0),
        ];
        // Listed in 3 ms, but copied where? Not known yet: fits by what is known, and
        // the caller waits for the destination before it decides.
        assert_eq!(converged(&rounds, 8, limit, true), Converged::Fits);
        let rounds = [
            first.clone(),
            round(7_000, 330 << 10, 7, 50, 0),
            round(5_000, 240 << 10, 3, 40, 0),
        ];
        assert_eq!(
            converged(&rounds, 8, limit, true),
            Converged::No,
            "the copy takes 43 ms"
        );
        // A round taken after a long wait for the destination says nothing of shrinking.
        let rounds = [
            first,
            round(800, 38 << 10, 3, 5, 0),
            round(60_000, 3 << 20, 50, 0, 8_000),
        ];
        assert_eq!(converged(&rounds, 8, limit, true), Converged::No);
        assert_eq!(
            converged(&rounds, 3, limit, true),
            Converged::GivesUp,
            "the last round allowed"
        );
    }
}
