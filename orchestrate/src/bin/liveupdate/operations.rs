//! `liveupdate run` and `liveupdate rollback`: the operation, from the command line.

use orchestrate::config;
use orchestrate::update::{self, Plan};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Common {
    /// The partition whose workload moves.
    #[arg(short = 'p', long)]
    pub partition: String,
    /// The operation's configuration.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[arg(long, default_value = orchestrate::STATE_DIR)]
    pub state: PathBuf,
    /// mcr; the one beside liveupdate, or on the PATH.
    #[arg(long)]
    pub mcr: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub max_blackout_ms: u64,
    /// How long applications have to answer a notice.
    #[arg(long, default_value_t = 5000)]
    pub notify_timeout_ms: u64,
}

/// mcr beside our own binary, or the PATH's.
pub fn mcr_beside(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("mcr")))
            .filter(|m| m.is_file())
            .unwrap_or_else(|| PathBuf::from("mcr"))
    })
}

/// FIX in FIXDIR: a bundle file, by its name or with `.tar.zst` added.
pub fn find_fix(dir: &Path, fix: &str) -> Result<PathBuf, String> {
    [dir.join(fix), dir.join(format!("{fix}.tar.zst"))]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no fix {fix:?} in {}", dir.display()))
}

fn plan(
    c: Common,
    fix: Option<PathBuf>,
    onto: Option<PathBuf>,
    remove_fix: Option<String>,
) -> Result<Plan, String> {
    let cfg = config::load(&c.config).map_err(|e| e.to_string())?;
    Ok(Plan {
        state: c.state,
        console: cfg.console.address,
        partition: c.partition,
        fix,
        onto,
        remove_fix,
        clone_dir: cfg.disks.clone,
        mirror_dir: cfg.disks.mirror,
        partition_id: cfg.console.partition_id,
        mcr: mcr_beside(c.mcr),
        max_blackout_ms: c.max_blackout_ms,
        notify_timeout: Duration::from_millis(c.notify_timeout_ms),
        pre_hook: cfg.general.pre_hook,
        post_hook: cfg.general.post_hook,
    })
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Exit 5: the workload moved, but not all went as asked after that (a fix not in
/// place, an original not shut down, ...: the WARNING lines, on record).
fn finish(r: Result<update::Record, update::UpdateError>) -> ExitCode {
    match r {
        Ok(rec) if !rec.warnings.is_empty() => ExitCode::from(5),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liveupdate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn run(c: Common, fixdir: PathBuf, fix: String) -> ExitCode {
    let p = find_fix(&fixdir, &fix).and_then(|f| plan(c, Some(f), None, None));
    match p {
        Ok(p) => finish(update::run(&p, &command_line(), false)),
        Err(e) => {
            eprintln!("liveupdate: {e}");
            ExitCode::from(2)
        }
    }
}

pub fn rollback(c: Common, cold: bool) -> ExitCode {
    let state = c.state.clone();
    let last = match update::last_record(&state, &c.partition) {
        Some(r) => r,
        None => {
            eprintln!(
                "liveupdate: no live update of partition {} to roll back in {}",
                c.partition,
                state.join("logs").display()
            );
            return ExitCode::from(2);
        }
    };
    // Live, the fix comes off a mirror of the root the workload has now, which keeps
    // what it wrote since; the kept root itself would not (mcr would find a file it
    // holds changed, or it would lose it). Cold, it starts again on the kept root.
    let Some(fix) = last.fix.clone() else {
        eprintln!(
            "liveupdate: the last operation on partition {} ({}) applied no fix: nothing to roll back",
            c.partition, last.id
        );
        return ExitCode::from(2);
    };
    if cold {
        println!(
            "liveupdate: rolling partition {} back, cold, onto {} (kept by operation {})",
            c.partition,
            last.original_disk.display(),
            last.id
        );
    } else {
        println!(
            "liveupdate: rolling partition {} back live: fix {fix} off, its files as {} (kept by operation {}) has them",
            c.partition,
            last.original_disk.display(),
            last.id
        );
    }
    match plan(c, None, Some(last.original_disk.clone()), Some(fix)) {
        Ok(p) if cold => match update::cold_rollback(&p, &last.original_disk, &command_line()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("liveupdate: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Ok(p) => finish(update::run(&p, &command_line(), false)),
        Err(e) => {
            eprintln!("liveupdate: {e}");
            ExitCode::from(2)
        }
    }
}

pub fn demo(plan: orchestrate::demo::DemoPlan) -> ExitCode {
    match orchestrate::demo::run(&plan) {
        Ok(r) => {
            let s = &r.seen;
            println!();
            println!("The client's view (outside the partition, connected throughout):");
            println!("  lines received       {}", s.lines);
            println!("  lost or repeated     {}", s.broken);
            println!(
                "  longest silence      {:.1} ms (one line every {} ms)",
                s.longest_gap.as_secs_f64() * 1e3,
                orchestrate::demo::PERIOD.as_millis()
            );
            let (from, to) = r.record.moved_between_ms;
            println!(
                "  during the move      {:.1} ms at the longest (before it, the preview's samples freeze it too)",
                s.longest_within(from, to)
                    .max(orchestrate::demo::PERIOD)
                    .as_secs_f64()
                    * 1e3
            );
            println!("  greeting before      {:?}", s.first);
            println!("  greeting after       {:?}", s.last);
            println!(
                "liveupdate demo: blackout {:.1} ms (mcr), total {:.2} s",
                r.record.blackout_ms,
                r.record.total_ms / 1e3
            );
            if let (Some(b), Some(t)) = (r.record.estimated_blackout_ms, r.record.estimated_total_s)
            {
                println!(
                    "liveupdate demo: estimated by the preview: blackout {:.1} ms ({:+.0}%), total {:.2} s ({:+.0}%)",
                    b,
                    (b / r.record.blackout_ms - 1.0) * 100.0,
                    t,
                    (t * 1e3 / r.record.total_ms - 1.0) * 100.0
                );
            }
            if s.broken > 0 || s.first == s.last {
                println!("liveupdate demo: FAILED: the client saw a broken stream or no fix");
                return ExitCode::from(1);
            }
            println!("liveupdate demo: PASSED");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("liveupdate demo: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn preview(c: Common, fixdir: PathBuf, fix: String) -> ExitCode {
    let max = c.max_blackout_ms;
    let p = find_fix(&fixdir, &fix).and_then(|f| plan(c, Some(f), None, None));
    let p = match p {
        Ok(p) => p,
        Err(e) => {
            println!("FAILED: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "liveupdate preview: partition {}, fix {}",
        p.partition,
        p.fix
            .as_ref()
            .map_or("-".into(), |f| f.display().to_string())
    );
    let pv = orchestrate::preview::run(&p, max);
    for c in &pv.checks {
        println!("{}: {}", if c.passed { "PASSED" } else { "FAILED" }, c.what);
    }
    if let Some(e) = &pv.estimates {
        let mib = |b: f64| b / (1 << 20) as f64;
        println!();
        println!("Estimates, from the live workload:");
        println!(
            "  resident memory        {:.1} MiB",
            mib(e.rss_bytes as f64)
        );
        println!(
            "  dirty rate             {:.1} MiB/s (sampled over a second)",
            mib(e.dirty_bytes_per_s)
        );
        println!(
            "  copy bandwidth         {:.0} MiB/s (measured)",
            mib(e.copy_bytes_per_s)
        );
        println!(
            "  processes, fds, TCP    {}, {}, {}",
            e.processes, e.fds, e.connections
        );
        println!(
            "  pre-copy               {} round(s), {:.2} MiB left for the blackout",
            e.rounds,
            mib(e.last_round_bytes)
        );
        println!(
            "  blackout               {:.1} ms ({})",
            e.blackout_ms,
            e.parts_text()
        );
        println!("  total time             {:.2} s", e.total_s);
        println!(
            "  disk needed            {:.1} MiB (at most; less by reflink)",
            mib(e.disk_bytes as f64)
        );
        println!(
            "  memory needed          {:.1} MiB",
            mib(e.memory_bytes as f64)
        );
    }
    if pv.passed() {
        println!("liveupdate preview: PASSED: the live update can go ahead");
        ExitCode::SUCCESS
    } else {
        println!("liveupdate preview: FAILED: see the FAILED lines");
        ExitCode::from(1)
    }
}
