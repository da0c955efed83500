//! The live update itself (`liveupdate run`, and `rollback`, which is the same move
//! back onto the kept disk): clone the partition's disk, apply the fix to the clone,
//! make the surrogate on it, tell the applications, move the workload with mcr, and
//! release the original.
//!
//! Until mcr commits, every failure puts things back as they were: the workload runs
//! on in the original partition (mcr resumes it), whose disk was never touched; the
//! surrogate and the clone are removed; the names are given back. After the commit
//! the workload is the surrogate's, and what is left to do (the original's shutdown)
//! is reported if it fails, never undone.

use crate::console::{self, Request};
use crate::journal::{Journal, Kind};
use crate::partition::{NewPartition, Partition};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The suffix the original partition takes while the surrogate takes its name.
pub const ORIGINAL_SUFFIX: &str = "_lu0";

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{phase}: {why}")]
    Failed { phase: &'static str, why: String },
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

impl UpdateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            UpdateError::Lock(_) => 3,
            UpdateError::Failed { .. } => 1,
        }
    }
}

fn failed(phase: &'static str) -> impl Fn(String) -> UpdateError {
    move |why| UpdateError::Failed { phase, why }
}

/// What to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// liveupdate's state: lock, journal, operation logs and records.
    pub state: PathBuf,
    pub console: PathBuf,
    pub partition: String,
    /// The fix bundle; none for a rollback.
    pub fix: Option<PathBuf>,
    /// A rollback's kept original: the root the fix was applied over, where the files
    /// it replaced are taken back from.
    pub onto: Option<PathBuf>,
    /// A rollback's fix, to take off a mirror of the workload's root.
    pub remove_fix: Option<String>,
    /// Where clones are made (`disks: clone` of the configuration).
    pub clone_dir: PathBuf,
    /// Where mirrors of the original root are made (`disks: mirror`).
    pub mirror_dir: PathBuf,
    /// The id asked for the surrogate.
    pub partition_id: Option<u16>,
    pub mcr: PathBuf,
    pub max_blackout_ms: u64,
    /// The applications' answer time.
    pub notify_timeout: Duration,
    /// Commands (`sh -c`) run before the blackout and after resume.
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
}

/// What an operation did, for the operator and for a rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub partition: String,
    pub fix: Option<String>,
    /// The disk it ran on before, kept.
    pub original_disk: PathBuf,
    /// The disk it runs on now: a mirror of the root it ran on (a live rollback's
    /// too, the fix taken off there; a cold rollback's: the kept root itself).
    pub disk: PathBuf,
    /// The patched clone, where the fix was applied first (its scripts run, its
    /// failures caught before any blackout); nothing boots from it, the kernel being
    /// the host's, and it is kept.
    #[serde(default)]
    pub clone: Option<PathBuf>,
    pub clone_method: Option<String>,
    pub surrogate_id: u16,
    pub blackout_ms: f64,
    pub total_ms: f64,
    /// mcr's report of the move.
    pub migration: serde_json::Value,
    /// What the preview before it estimated.
    #[serde(default)]
    pub estimated_blackout_ms: Option<f64>,
    #[serde(default)]
    pub estimated_total_s: Option<f64>,
    /// When the move began and ended (ms since the epoch, wall clock), to tell what a
    /// client saw during it from what it saw during the preview before.
    #[serde(default)]
    pub moved_between_ms: (u64, u64),
    /// What went otherwise after the commit point (the workload moved all the same).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Record {
    /// Written as `record.json` in the operation's log directory, where
    /// [`last_record`] finds it.
    fn save(&self, dir: &Path) {
        let _ = std::fs::write(
            dir.join("record.json"),
            serde_json::to_vec_pretty(self).expect("serializes"),
        );
    }
}

/// The operation's log: every step, timestamped, in its own directory; and the
/// phase lines the operator sees.
pub struct Log {
    file: std::fs::File,
    start: Instant,
    pub dir: PathBuf,
    quiet: bool,
}

impl Log {
    fn open(dir: PathBuf, quiet: bool) -> std::io::Result<Log> {
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))?;
        Ok(Log {
            file,
            start: Instant::now(),
            dir,
            quiet,
        })
    }

    /// A phase line, to the operator and the log.
    pub fn phase(&mut self, line: &str) {
        if !self.quiet {
            println!("{line}");
        }
        self.note(line);
    }

    /// A detail, to the log only.
    pub fn note(&mut self, line: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(
            self.file,
            "{}.{:03} +{:.3}s {line}",
            crate::journal::utc(now.as_secs()),
            now.subsec_millis(),
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// What goes in on the mirror once the workload runs there.
enum Pending {
    Fix(crate::fix::Staged),
    /// A rollback's: the fix's label, its removal.
    Removal(String, crate::fix::Removal),
}

/// What has been made so far, undone in reverse when the operation fails before the
/// commit.
#[derive(Default)]
struct Undo {
    renamed: Option<(String, String)>,
    surrogate: Option<String>,
    clone: Option<PathBuf>,
    mirror: Option<PathBuf>,
}

struct Ctx<'a> {
    plan: &'a Plan,
    token: String,
    log: Log,
}

impl Ctx<'_> {
    fn ask(&self, req: &Request) -> Result<Vec<Partition>, String> {
        console::call(&self.plan.console, &self.token, req).map_err(|e| e.to_string())
    }

    fn undo(&mut self, u: &mut Undo) {
        if let Some(s) = u.surrogate.take() {
            match self.ask(&Request::Destroy { name: s.clone() }) {
                Ok(_) => self.phase(&format!("Removed the surrogate partition {s}.")),
                Err(e) => self.phase(&format!("WARNING: the surrogate {s} is left: {e}")),
            }
        }
        if let Some((now, was)) = u.renamed.take() {
            match self.ask(&Request::Rename {
                from: now.clone(),
                to: was.clone(),
            }) {
                Ok(_) => self.log.note(&format!("renamed {now} back to {was}")),
                Err(e) => self.phase(&format!("WARNING: partition {now} is not {was} again: {e}")),
            }
        }
        if let Some(c) = u.clone.take() {
            if let Err(e) = crate::disk::remove(&c) {
                self.phase(&format!("WARNING: the clone {} is left: {e}", c.display()));
            }
        }
        if let Some(m) = u.mirror.take() {
            if let Err(e) = crate::disk::remove(&m) {
                self.phase(&format!("WARNING: the mirror {} is left: {e}", m.display()));
            }
        }
    }

    fn phase(&mut self, line: &str) {
        self.log.phase(line);
    }
}

/// The running partition called `name`.
fn running(parts: &[Partition], name: &str) -> Result<Partition, String> {
    let p = parts
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("no partition {name:?} on the console"))?;
    if p.init.is_none() {
        return Err(format!("partition {name:?} runs nothing to move"));
    }
    Ok(p.clone())
}

fn run_hook(log: &mut Log, what: &str, cmd: &Option<String>) -> Result<(), String> {
    let Some(cmd) = cmd else { return Ok(()) };
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what} hook {cmd:?}: {e}"))?;
    log.note(&format!(
        "{what} hook {cmd:?}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ));
    if !out.status.success() {
        return Err(format!("{what} hook {cmd:?} failed ({})", out.status));
    }
    Ok(())
}

/// Runs the operation; its record once the workload runs in the surrogate.
pub fn run(plan: &Plan, command: &str, quiet: bool) -> Result<Record, UpdateError> {
    let what = if plan.fix.is_some() {
        "run"
    } else {
        "rollback"
    };
    let taken = crate::lock::OpLock::take(&plan.state, what, command)?;
    let journal = Journal::at(&plan.state);
    let id = journal
        .next_id()
        .map_err(|e| failed("journal")(e.to_string()))?;
    let log = Log::open(plan.state.join("logs").join(&id), quiet)
        .map_err(|e| failed("log")(e.to_string()))?;
    let token = crate::token::current(&plan.state).map_err(|e| failed("console")(e.to_string()))?;
    let mut cx = Ctx {
        plan,
        token: token.secret,
        log,
    };
    if let Some(h) = taken.crashed {
        cx.phase(&format!(
            "NOTE: operation of pid {} ({}) died holding the lock; cleaning up after it.",
            h.pid, h.operation
        ));
        recover(&mut cx);
    }
    let label = match &plan.fix {
        Some(f) => crate::fix::open(f)
            .map(|b| b.manifest.label)
            .unwrap_or_else(|_| f.display().to_string()),
        None => "rollback".into(),
    };
    let resource = format!("partition {}", plan.partition);
    let _ = journal.record(&id, Kind::Start, &resource, &format!("{what} {label}"));
    cx.phase(&format!(
        "liveupdate: operation {id}: {what} of partition {} ({label})",
        plan.partition
    ));
    // As AIX's automated mode does: every check of a preview first, and its
    // estimates, which the measured move is then printed beside.
    cx.phase("Checking the preconditions and estimating (as liveupdate preview) ...");
    let pv = crate::preview::within(plan, plan.max_blackout_ms);
    for c in &pv.checks {
        let line = format!(
            "  {}: {}",
            if c.passed { "PASSED" } else { "FAILED" },
            c.what
        );
        if c.passed {
            cx.log.note(&line);
        } else {
            cx.phase(&line);
        }
    }
    if let Some(e) = &pv.estimates {
        cx.phase(&format!(
            "  estimated: {} pre-copy round(s), blackout {:.1} ms ({}), total {:.2} s",
            e.rounds,
            e.blackout_ms,
            e.parts_text(),
            e.total_s
        ));
    }
    let mut undo = Undo::default();
    let r = match pv.checks.iter().find(|c| !c.passed) {
        Some(c) => Err(failed("preview")(c.what.clone())),
        // Timed from here, as the estimate is.
        None => {
            let from = epoch_ms();
            move_workload(&mut cx, &id, &label, &mut undo, Instant::now()).map(|mut rec| {
                rec.moved_between_ms = (from, epoch_ms());
                rec
            })
        }
    };
    let r = r.map(|mut rec| {
        if let Some(e) = &pv.estimates {
            rec.estimated_blackout_ms = Some(e.blackout_ms);
            rec.estimated_total_s = Some(e.total_s);
            cx.phase(&format!(
                "liveupdate: measured against the estimates: blackout {:.1} ms (estimated {:.1}), total {:.2} s (estimated {:.2})",
                rec.blackout_ms,
                e.blackout_ms,
                rec.total_ms / 1e3,
                e.total_s
            ));
            rec.save(&cx.log.dir);
        }
        rec
    });
    match r {
        Ok(rec) => {
            let _ = journal.record(
                &id,
                Kind::Success,
                &resource,
                &format!(
                    "{what} {label}: blackout {:.1} ms, total {:.2} s{}",
                    rec.blackout_ms,
                    rec.total_ms / 1e3,
                    match rec.warnings.first() {
                        None => String::new(),
                        Some(w) => format!(
                            "; {} warning(s): {w}{}",
                            rec.warnings.len(),
                            if rec.warnings.len() > 1 { "; ..." } else { "" }
                        ),
                    }
                ),
            );
            Ok(rec)
        }
        Err(e) => {
            cx.undo(&mut undo);
            let _ = std::fs::remove_file(current_path(&plan.state));
            let _ = journal.record(
                &id,
                Kind::Failure,
                &resource,
                &format!("{what} {label}: {e}"),
            );
            cx.phase(&format!(
                "liveupdate: operation {id} FAILED: {e}; the workload runs on in partition {}",
                plan.partition
            ));
            Err(e)
        }
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The last operation that moved partition `name` (its record), if any.
pub fn last_record(state: &Path, name: &str) -> Option<Record> {
    let rd = std::fs::read_dir(state.join("logs")).ok()?;
    rd.flatten()
        .filter_map(|e| std::fs::read(e.path().join("record.json")).ok())
        .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
        .filter(|r| r.partition == name)
        .max_by(|a, b| a.id.cmp(&b.id))
}

/// The half-made work of the operation under way, should liveupdate die.
#[derive(Debug, Serialize, Deserialize)]
struct Current {
    partition: String,
    original_name: String,
    surrogate: Option<String>,
    clone: Option<PathBuf>,
    #[serde(default)]
    mirror: Option<PathBuf>,
}

fn current_path(state: &Path) -> PathBuf {
    state.join("current.json")
}

fn save_current(state: &Path, c: &Current) {
    let tmp = state.join("current.json.new");
    if std::fs::write(&tmp, serde_json::to_vec(c).expect("serializes")).is_ok() {
        let _ = std::fs::rename(&tmp, current_path(state));
    }
}

/// After a crash: if the original still runs, what the operation made goes; if the
/// workload made it to the surrogate, the original (which mcr killed) is released.
fn recover(cx: &mut Ctx) {
    let path = current_path(&cx.plan.state);
    let Ok(b) = std::fs::read(&path) else { return };
    let Ok(cur) = serde_json::from_slice::<Current>(&b) else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let parts = cx.ask(&Request::List).unwrap_or_default();
    let alive = |n: &str| {
        parts
            .iter()
            .find(|p| p.name == n)
            .and_then(|p| p.init)
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    let renamed = format!("{}{ORIGINAL_SUFFIX}", cur.original_name);
    // Killed while it copied the original's image: its writers wait on the freeze.
    for p in parts
        .iter()
        .filter(|p| p.name == cur.original_name || p.name == renamed)
    {
        match crate::disk::thaw(&p.disk) {
            Ok(true) => cx.phase(&format!(
                "NOTE: the file system of {}'s disk {} was left frozen: thawed.",
                p.name,
                p.disk.display()
            )),
            Ok(false) => {}
            Err(e) => cx.phase(&format!("WARNING: {e}")),
        }
    }
    let mut undo = Undo::default();
    if parts.iter().any(|p| p.name == renamed) && alive(&renamed) {
        undo.surrogate = cur.surrogate.clone();
        undo.renamed = Some((renamed, cur.original_name.clone()));
        undo.clone = cur.clone.clone();
        undo.mirror = cur.mirror.clone();
        cx.phase("NOTE: the original partition still runs: removing the half-made surrogate.");
    } else if alive(&cur.original_name) && cur.surrogate.as_deref() != Some(&cur.original_name) {
        undo.surrogate = cur.surrogate.clone();
        undo.clone = cur.clone.clone();
        undo.mirror = cur.mirror.clone();
    }
    cx.undo(&mut undo);
    let _ = std::fs::remove_file(&path);
}

fn move_workload(
    cx: &mut Ctx,
    id: &str,
    label: &str,
    undo: &mut Undo,
    t0: Instant,
) -> Result<Record, UpdateError> {
    let plan = cx.plan;
    let name = plan.partition.clone();
    let parts = cx.ask(&Request::List).map_err(failed("console"))?;
    let original = running(&parts, &name).map_err(failed("validation"))?;
    let bundle = match &plan.fix {
        Some(f) => {
            let b = crate::fix::open(f).map_err(|e| failed("fix")(e.to_string()))?;
            if !b.manifest.lu_capable {
                return Err(failed("fix")(format!(
                    "fix {} is not live-update capable (LU CAPABLE: no)",
                    b.manifest.label
                )));
            }
            Some(b)
        }
        None => None,
    };
    let mut current = Current {
        partition: name.clone(),
        original_name: name.clone(),
        surrogate: None,
        clone: None,
        mirror: None,
    };
    save_current(&plan.state, &current);

    // The surrogate's disk.
    let t = Instant::now();
    let (disk, method) = match &plan.onto {
        Some(d) => (d.clone(), None),
        None => {
            let to = plan.clone_dir.join(format!("{name}-{id}"));
            cx.phase(&format!(
                "Cloning the root disk of {name} ({}) to {} ...",
                original.disk.display(),
                to.display()
            ));
            crate::fault::point("clone").map_err(failed("clone"))?;
            // Named before it exists: a crash while the original is frozen for it
            // leaves the next run both to thaw and to remove.
            current.clone = Some(to.clone());
            save_current(&plan.state, &current);
            let c = crate::disk::clone(&original.disk, &to).map_err(|e| {
                let _ = crate::disk::remove(&to);
                failed("clone")(e.to_string())
            })?;
            undo.clone = Some(to.clone());
            if let Some(why) = &c.no_overlay {
                cx.log.note(&format!("no overlay clone: {why}"));
            }
            let (bytes, files) = crate::disk::usage(&to);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let mib = bytes as f64 / (1 << 20) as f64;
            cx.phase(&match crate::disk::kind(&to) {
                Ok(crate::disk::Kind::Overlay) => format!(
                    "  cloned by overlayfs on the original in {ms:.0} ms: {files} files, {mib:.1} MiB, its own writes in a layer of its own"
                ),
                Ok(crate::disk::Kind::Image) => format!(
                    "  cloned by {}: an image, {mib:.1} MiB in {ms:.0} ms{}",
                    c.method.name(),
                    c.frozen.map_or(String::new(), |f| format!(
                        ", the original's file system frozen for {:.0} ms",
                        f.as_secs_f64() * 1e3
                    ))
                ),
                _ => format!(
                    "  cloned by {}: {files} files, {mib:.1} MiB in {ms:.0} ms",
                    c.method.name()
                ),
            });
            (to, Some(c.method))
        }
    };
    if let Some(b) = &bundle {
        cx.phase(&format!("Applying fix {label} to the clone ..."));
        crate::fault::point("fix-apply").map_err(failed("fix apply"))?;
        let root = crate::disk::files(&disk).map_err(|e| failed("fix apply")(e.to_string()))?;
        let i = crate::fix::apply(b, &root).map_err(|e| failed("fix apply")(e.to_string()))?;
        cx.phase(&format!(
            "  {} file(s) in place, state {}",
            b.manifest.files.len(),
            i.state.code()
        ));
    }
    // The workload's root on the surrogate: a mirror of the original's, which shows
    // every write made to it up to the freeze (nothing the workload wrote during the
    // move is left behind, and every file it holds is the one it had), with the
    // fix's files beside their targets, put in place once it runs there. A live
    // rollback's is a mirror of the current root too, the fix's files to be put back
    // as the kept root has them (moving onto that root itself would lose what the
    // workload wrote since).
    let to = plan.mirror_dir.join(format!("{name}-{id}"));
    match &bundle {
        // The clone has shown the fix applies; mounted for that, it goes down.
        Some(_) => {
            let _ = crate::disk::release(&disk);
        }
        None if plan.remove_fix.is_none() => {
            return Err(failed("validation")(
                "a rollback names the fix to take off".into(),
            ))
        }
        None => {}
    }
    cx.phase(&format!(
        "Mirroring the root disk of {name} to {} ...",
        to.display()
    ));
    crate::fault::point("mirror").map_err(failed("mirror"))?;
    current.mirror = Some(to.clone());
    save_current(&plan.state, &current);
    let t = Instant::now();
    crate::disk::mirror(&original.disk, &to).map_err(|e| failed("mirror")(e.to_string()))?;
    undo.mirror = Some(to.clone());
    let root = crate::disk::files(&to).map_err(|e| failed("mirror")(e.to_string()))?;
    let mirrored_ms = t.elapsed().as_secs_f64() * 1e3;
    let pending = match (&bundle, &plan.remove_fix) {
        (Some(b), _) => {
            let staged =
                crate::fix::stage(b, &root).map_err(|e| failed("mirror")(e.to_string()))?;
            cx.phase(&format!(
                "  mirrored by overlayfs in {mirrored_ms:.0} ms: the original's files as they are, until the freeze; {} file(s) of fix {label} beside their targets",
                staged.files()
            ));
            Pending::Fix(staged)
        }
        (None, Some(fix)) => {
            // Read, not run on: mounted for the reading only, if it was not.
            let was_mounted = crate::disk::mounted_at(&disk).is_some();
            let kept = crate::disk::files(&disk).map_err(|e| failed("mirror")(e.to_string()))?;
            let removal = crate::fix::stage_removal(fix, &root, &kept);
            if !was_mounted {
                if let Err(e) = crate::disk::release(&disk) {
                    cx.log.note(&format!("releasing {}: {e}", disk.display()));
                }
            }
            let removal = removal.map_err(|e| failed("mirror")(e.to_string()))?;
            cx.phase(&format!(
                "  mirrored by overlayfs in {mirrored_ms:.0} ms: the workload's files as they are, until the freeze; {} file(s) of fix {fix} to be put back as {} has them",
                removal.files(),
                disk.display()
            ));
            Pending::Removal(fix.clone(), removal)
        }
        (None, None) => unreachable!("refused above"),
    };
    let root_disk = to;

    // The surrogate takes the name; the original is kept under another.
    let kept = format!("{name}{ORIGINAL_SUFFIX}");
    cx.ask(&Request::Rename {
        from: name.clone(),
        to: kept.clone(),
    })
    .map_err(failed("surrogate"))?;
    undo.renamed = Some((kept.clone(), name.clone()));
    current.surrogate = Some(name.clone());
    save_current(&plan.state, &current);
    crate::fault::point("surrogate").map_err(failed("surrogate start"))?;
    let made = cx
        .ask(&Request::Create(NewPartition {
            name: name.clone(),
            disk: root_disk.clone(),
            id: plan.partition_id,
            address: Some(original.address.clone()),
            mount_at: Some(original.mount_at.clone()),
            command: original.command.clone(),
        }))
        .map_err(failed("surrogate start"))?;
    undo.surrogate = Some(name.clone());
    let surrogate = made
        .into_iter()
        .next()
        .ok_or_else(|| failed("surrogate start")("the console made nothing".into()))?;
    cx.phase(&format!(
        "Started the surrogate partition {name} (id {}) {}; the original is now {kept} (id {}).",
        surrogate.id,
        match &pending {
            Pending::Fix(_) => format!(
                "from the clone {}, the workload's root there the mirror",
                disk.display()
            ),
            Pending::Removal(..) => "on the mirror".to_string(),
        },
        original.id
    ));

    // The applications.
    notify(cx, &original, crate::notify::Event::Pre, label)?;
    run_hook(&mut cx.log, "pre", &plan.pre_hook).map_err(failed("notify"))?;

    // The move.
    cx.phase(&format!(
        "Moving the workload (pid {}) to the surrogate ...",
        original.init.unwrap_or(0)
    ));
    let (report, new_pid) = migrate(cx, &original, &surrogate, &kept)?;
    // Committed: the workload is the surrogate's from here.
    undo.surrogate = None;
    undo.renamed = None;
    undo.clone = None;
    undo.mirror = None;
    let blackout = report["blackout_ms"].as_f64().unwrap_or(0.0);
    let rounds = report["rounds"].as_array().map_or(0, |r| r.len());
    cx.phase(&format!(
        "  moved: {rounds} pre-copy round(s), blackout {blackout:.1} ms (freeze and dump {:.1}, transfer {:.1}, restore {:.1}, commit {:.1}); now pid {new_pid} there",
        report["blackout"]["freeze_and_dump_ms"].as_f64().unwrap_or(0.0),
        report["blackout"]["transfer_ms"].as_f64().unwrap_or(0.0),
        report["blackout"]["restore_ms"].as_f64().unwrap_or(0.0),
        report["blackout"]["commit_ms"].as_f64().unwrap_or(0.0),
    ));
    // What went otherwise after the commit point: the workload runs there all the
    // same, and the operation says so (on record, in the journal, in its exit code).
    let mut warnings: Vec<String> = Vec::new();
    let mut warn = |cx: &mut Ctx, what: String| {
        cx.phase(&format!("WARNING: {what}"));
        warnings.push(what);
    };
    if let Err(e) = cx.ask(&Request::Adopt {
        name: name.clone(),
        init: new_pid,
    }) {
        warn(
            cx,
            format!("the console did not take pid {new_pid} as {name}'s: {e}"),
        );
    }
    let mut rec = Record {
        id: id.into(),
        partition: name.clone(),
        fix: plan.fix.as_ref().map(|_| label.to_string()),
        original_disk: original.disk.clone(),
        disk: root_disk,
        clone: bundle.as_ref().map(|_| disk.clone()),
        clone_method: method.map(|m| m.name().to_string()),
        surrogate_id: surrogate.id,
        blackout_ms: blackout,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        migration: report,
        estimated_blackout_ms: None,
        estimated_total_s: None,
        moved_between_ms: (0, 0),
        warnings: Vec::new(),
    };
    // On record before the half-made work's note goes: a crash from here on leaves
    // the workload moved, and the next rollback must start from this operation.
    rec.save(&cx.log.dir);
    let _ = std::fs::remove_file(current_path(&plan.state));
    match pending {
        Pending::Fix(s) => match s.commit() {
            Ok(i) => cx.phase(&format!(
                "Installed fix {label} on the mirror: {} file(s) in place{}, state {}; a file the workload holds stays the one it had until it opens it again.",
                bundle.as_ref().map_or(0, |b| b.manifest.files.len()),
                match bundle.as_ref().map(|b| (b.pre.is_some(), b.post.is_some())) {
                    Some((true, true)) => " between its pre and post scripts",
                    Some((true, false)) => " after its pre script",
                    Some((false, true)) => " before its post script",
                    _ => "",
                },
                i.state.code()
            )),
            Err(e) => warn(
                cx,
                format!(
                    "fix {label} is not in place on the mirror ({e}); the clone {} has it",
                    disk.display()
                ),
            ),
        },
        Pending::Removal(fix, r) => {
            let n = r.files();
            match r.commit() {
                Ok(()) => cx.phase(&format!(
                    "Removed fix {fix} from the mirror: {n} file(s) put back as {} has them.",
                    disk.display()
                )),
                Err(e) => warn(
                    cx,
                    format!(
                        "fix {fix} is not all taken off the mirror ({e}); see its state in `liveupdate fix list`"
                    ),
                ),
            }
        }
    }
    if let Err(e) = notify(cx, &surrogate, crate::notify::Event::Post, label) {
        warn(cx, e.to_string());
    }
    if let Err(e) = run_hook(&mut cx.log, "post", &plan.post_hook) {
        warn(cx, e.to_string());
    }
    match cx.ask(&Request::Destroy { name: kept.clone() }) {
        Ok(_) => cx.phase(&format!(
            "Shut down the original partition {kept}; its disk {} is kept for a rollback{}.",
            original.disk.display(),
            ", under the mirror the workload runs on"
        )),
        Err(e) => warn(cx, format!("the original partition {kept} is left: {e}")),
    }
    let total = t0.elapsed().as_secs_f64() * 1e3;
    rec.total_ms = total;
    rec.warnings = warnings;
    rec.save(&cx.log.dir);
    cx.phase(&format!(
        "liveupdate: operation {id} succeeded{}: blackout {blackout:.1} ms, total {:.2} s; log in {}",
        match rec.warnings.len() {
            0 => String::new(),
            n => format!(" with {n} warning(s) above"),
        },
        total / 1e3,
        cx.log.dir.display()
    ));
    Ok(rec)
}

fn notify(
    cx: &mut Ctx,
    p: &Partition,
    e: crate::notify::Event,
    label: &str,
) -> Result<(), UpdateError> {
    let root = crate::disk::files(&p.disk).map_err(|err| failed("notify")(err.to_string()))?;
    let answers = crate::notify::tell(&root, e, label, cx.plan.notify_timeout)
        .map_err(|err| failed("notify")(err.to_string()))?;
    for (app, a) in &answers {
        cx.log
            .note(&format!("application {app} ({}): {a:?}", e.name()));
        if a.stops(e) {
            return Err(failed("notify")(format!(
                "application {app} refuses ({}): {a:?}",
                e.name()
            )));
        }
    }
    if !answers.is_empty() {
        cx.phase(&format!(
            "  {} application(s) told ({})",
            answers.len(),
            e.name()
        ));
    }
    Ok(())
}

/// `mcr receive` in the surrogate (its network namespace and cgroup, its disk bound
/// where the workload sees its root), `mcr migrate` from the original's network
/// namespace, the address moved inside the blackout. mcr's report and the new pid.
fn migrate(
    cx: &mut Ctx,
    original: &Partition,
    surrogate: &Partition,
    kept: &str,
) -> Result<(serde_json::Value, i32), UpdateError> {
    let plan = cx.plan;
    let work = cx.log.dir.clone();
    let sock = work.join("mcr.sock");
    let pidfile = work.join("new.pid");
    // Left by a try before this one.
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&pidfile);
    let cgroup = surrogate.cgroup.clone();
    // The receiver's mount namespace becomes the workload's (--inherit-mntns): made
    // as a partition's is (see partition::init), with the clone at its root's path.
    let files =
        crate::disk::files(&surrogate.disk).map_err(|e| failed("pre-copy")(e.to_string()))?;
    let setup = format!(
        "echo 0 > {} && {{ umount -l /run/netns 2>/dev/null; true; }} && mount --bind {} {} && exec \"$0\" \"$@\"",
        sh_quote(&cgroup.join("cgroup.procs").display().to_string()),
        sh_quote(&files.display().to_string()),
        sh_quote(&surrogate.mount_at.display().to_string()),
    );
    let recv_err = std::fs::File::create(work.join("receive.stderr"))
        .map_err(|e| failed("pre-copy")(e.to_string()))?;
    let mut recv = surrogate
        .in_netns()
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &setup,
        ])
        .arg(&plan.mcr)
        .args(["receive", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args([
            "--tcp-established",
            "--inherit-mntns",
            "-d",
            "--json",
            "--pidfile",
        ])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(recv_err)
        .spawn()
        .map_err(|e| failed("pre-copy")(format!("starting mcr receive: {e}")))?;
    // It listens once the socket exists; gone before that, it failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = recv.try_wait() {
            let err = std::fs::read_to_string(work.join("receive.stderr")).unwrap_or_default();
            return Err(failed("pre-copy")(format!(
                "mcr receive ended ({st}): {}",
                err.trim()
            )));
        }
        if Instant::now() > deadline {
            let _ = recv.kill();
            let _ = recv.wait();
            return Err(failed("pre-copy")(
                "mcr receive did not listen in 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    crate::fault::point("pre-copy").map_err(|e| {
        let _ = recv.kill();
        let _ = recv.wait();
        failed("pre-copy")(e)
    })?;
    // Inside the blackout mcr says READY on this socket, and goes on at GO: the
    // console moves the address meanwhile, asked from here. No program starts in the
    // blackout (a `liveupdate partition take-address` was 2-4 ms of it).
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| failed("pre-copy")(format!("a socket for mcr: {e}")))?;
    // The one fd of ours mcr keeps across its exec, at the number it is told.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&theirs),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| failed("pre-copy")(format!("a socket for mcr: {e}")))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mover = {
        let (console, token) = (plan.console.clone(), cx.token.clone());
        let name = surrogate.name.clone();
        let fault = crate::fault::armed("blackout");
        std::thread::spawn(move || -> Result<Option<Duration>, String> {
            use std::io::{BufRead, Write};
            let mut line = String::new();
            std::io::BufReader::new(&ours)
                .read_line(&mut line)
                .map_err(|e| format!("reading mcr's READY: {e}"))?;
            // mcr ended before the blackout: it says why.
            if line != "READY\n" {
                return Ok(None);
            }
            let t = Instant::now();
            let answer = match fault {
                true => "NO LIVEUPDATE_FAULT=blackout\n".to_string(),
                false => match console::call(&console, &token, &Request::TakeAddress { name }) {
                    Ok(_) => "GO\n".to_string(),
                    Err(e) => format!("NO the console did not move the address: {e}\n"),
                },
            };
            (&ours)
                .write_all(answer.as_bytes())
                .map_err(|e| format!("answering mcr: {e}"))?;
            Ok(Some(t.elapsed()))
        })
    };
    let init = original.init.unwrap_or(0);
    cx.log.note(&format!(
        "mcr migrate -t {init} (partition {kept}), at ready: the console moves the address of {}",
        surrogate.name
    ));
    let out = original
        .in_netns()
        .arg(&plan.mcr)
        .args(["migrate", "-t", &init.to_string(), "--to"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--tcp-established", "--json", "--max-blackout-ms"])
        .arg(plan.max_blackout_ms.to_string())
        .args(["--at-ready-fd", &fd.to_string()])
        .stdin(Stdio::null())
        .output();
    // Its end closed: a mover still waiting for READY sees the end.
    drop(theirs);
    match mover.join() {
        Ok(Ok(Some(took))) => cx.log.note(&format!(
            "at ready: the address moved in {:.2} ms",
            took.as_secs_f64() * 1e3
        )),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => cx.log.note(&format!("at ready: {e}")),
        Err(_) => cx.log.note("at ready: the mover panicked"),
    }
    let out = out.map_err(|e| failed("pre-copy")(format!("running mcr migrate: {e}")))?;
    // Moved, it has returned or is about to (-d). Refused before it connected (or
    // lost), it would wait for a connection for ever: what it made dies with it.
    let within = Duration::from_secs(if out.status.success() { 30 } else { 2 });
    let recv_status = crate::reap::end_within(&mut recv, within);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    cx.log.note(&format!("mcr migrate: {} {err}", out.status));
    cx.log.note(&format!(
        "mcr receive: {recv_status:?} {}",
        std::fs::read_to_string(work.join("receive.stderr"))
            .unwrap_or_default()
            .trim()
    ));
    if !out.status.success() {
        return Err(failed("blackout")(format!("mcr migrate: {err}")));
    }
    // Committed whatever its report says: from here nothing is undone.
    let report: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(r) => r,
        Err(e) => {
            cx.phase(&format!(
                "WARNING: mcr migrate's report is unreadable ({e}); it moved"
            ));
            serde_json::Value::Null
        }
    };
    let new_pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| report["new_pid"].as_i64().unwrap_or(0) as i32);
    Ok((report, new_pid))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A cold rollback: the partition's workload is stopped and started again from the
/// beginning on `onto` (the disk a live update kept), under the same name, address
/// and command. What the workload held in memory is lost, as with a reboot.
pub fn cold_rollback(plan: &Plan, onto: &Path, command: &str) -> Result<Partition, UpdateError> {
    let _taken = crate::lock::OpLock::take(&plan.state, "rollback --cold", command)?;
    let journal = Journal::at(&plan.state);
    let id = journal
        .next_id()
        .map_err(|e| failed("journal")(e.to_string()))?;
    let resource = format!("partition {}", plan.partition);
    let _ = journal.record(&id, Kind::Start, &resource, "cold rollback");
    let r = (|| {
        let token =
            crate::token::current(&plan.state).map_err(|e| failed("console")(e.to_string()))?;
        let ask = |req: &Request| {
            console::call(&plan.console, &token.secret, req).map_err(|e| e.to_string())
        };
        let parts = ask(&Request::List).map_err(failed("console"))?;
        let p = parts
            .iter()
            .find(|p| p.name == plan.partition)
            .cloned()
            .ok_or_else(|| failed("validation")(format!("no partition {:?}", plan.partition)))?;
        if p.command.is_empty() {
            return Err(failed("validation")(format!(
                "partition {} has no command on record to start again",
                p.name
            )));
        }
        println!(
            "liveupdate: operation {id}: cold rollback of partition {} onto {}",
            p.name,
            onto.display()
        );
        ask(&Request::Destroy {
            name: p.name.clone(),
        })
        .map_err(failed("stop"))?;
        println!(
            "Stopped partition {} (pid {}).",
            p.name,
            p.init.unwrap_or(0)
        );
        ask(&Request::Create(NewPartition {
            name: p.name.clone(),
            disk: onto.to_path_buf(),
            id: Some(p.id),
            address: Some(p.address.clone()),
            mount_at: Some(p.mount_at.clone()),
            command: p.command.clone(),
        }))
        .map_err(failed("restart"))?;
        let started = ask(&Request::Start {
            name: p.name.clone(),
            command: p.command.clone(),
        })
        .map_err(failed("restart"))?;
        let s = started
            .into_iter()
            .next()
            .ok_or_else(|| failed("restart")("the console started nothing".into()))?;
        println!(
            "Started partition {} again on {}: pid {}.",
            s.name,
            onto.display(),
            s.init.unwrap_or(0)
        );
        Ok(s)
    })();
    match &r {
        Ok(_) => {
            let _ = journal.record(&id, Kind::Success, &resource, "cold rollback");
        }
        Err(e) => {
            let _ = journal.record(
                &id,
                Kind::Failure,
                &resource,
                &format!("cold rollback: {e}"),
            );
        }
    }
    r
}
