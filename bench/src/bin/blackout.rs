#![forbid(unsafe_code)]
//! The blackout harness: migrates a workload of a given size and dirty rate on this host
//! (`mcr migrate` to `mcr receive --pidns`, the CLI as an operator runs it), and asks the
//! workload itself how long its longest pause was (the largest gap between two turns of
//! its clock loop, on CLOCK_REALTIME and CLOCK_MONOTONIC, the larger counted) after it
//! checked every page of its memory. Over a grid of sizes, rates and modes; writes the
//! runs and medians as JSON and draws an SVG of blackout against size.
//!
//! ```text
//! cargo run --release -p mcr-bench --bin blackout -- [--sizes 16,64,256,1024]
//!     [--rates 0,32] [--modes stop-and-copy,pre-copy] [--runs 5] [--out DIR]
//! ```
//!
//! Modes: stop-and-copy, pre-copy, post-copy, post-copy-only; `MODE-staged` is MODE
//! with the pages copied into staging as for another host (`--copy-pages`).

use clap::Parser;
use mcr::migrate::local::{
    line_starting, reported_own_pause_ms, reported_pause_end_ms, reported_pause_ms,
    LocalDestination,
};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Parser)]
struct Args {
    /// Workload sizes, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256, 1024])]
    sizes: Vec<usize>,
    /// Dirty rates, MiB/s.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 32.0])]
    rates: Vec<f64>,
    #[arg(long, value_delimiter = ',', default_values_t = ["stop-and-copy".to_string(), "pre-copy".to_string()])]
    modes: Vec<String>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where blackout.json and blackout.svg go.
    #[arg(long, default_value = "target/blackout")]
    out: PathBuf,
}

/// One migration, as measured.
#[derive(Clone)]
struct Run {
    size: usize,
    rate: f64,
    mode: String,
    /// What the workload saw.
    pause_ms: f64,
    /// The same with the host's steal taken out of each gap of the workload's loop: a
    /// gap in which its thread was never switched out counts only the time it ran.
    own_pause_ms: Option<f64>,
    own_in_blackout: Option<bool>,
    own_ended_after_ms: Option<f64>,
    /// Whether that pause overlapped mcr's blackout (from the freeze to the
    /// destination's word), or fell elsewhere in the migration.
    in_blackout: Option<bool>,
    /// When it ended, in ms after the blackout began (negative: before).
    ended_after_ms: Option<f64>,
    /// The most time any one vCPU of this VM was ready but not run by the host during
    /// the migration (/proc/stat steal, 10 ms ticks): a pause outside the blackout
    /// with as much steal is the host's.
    steal_ms: Option<f64>,
    /// What the source measured, and its report.
    report: serde_json::Value,
}

fn one(mcr: &std::path::Path, size: usize, rate: f64, mode: &str) -> Result<Run, String> {
    let e = |what: &'static str| move |x: std::io::Error| format!("{what}: {x}");
    let mut w = Command::new(mcr)
        .args(["demo-workload", "--mib", &size.to_string()])
        .args(["--dirty-mib-s", &rate.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(e("starting the workload"))?;
    let pid = w.id() as i32;
    let mut out = BufReader::new(w.stdout.take().ok_or("no stdout")?);
    line_starting(&mut out, "READY").map_err(e("waiting for the workload"))?;
    let dest = LocalDestination::start(mcr).map_err(e("starting mcr receive"))?;
    let steal_before = steal_ms();
    let mut cmd = Command::new(mcr);
    cmd.args(["migrate", "-t", &pid.to_string(), "--to", &dest.addr])
        .args(["--shell-job", "--json"]);
    // The pages copied into staging, as for another host, instead of read by the
    // destination from the workload: for comparison.
    let mode = match mode.strip_suffix("-staged") {
        Some(m) => {
            cmd.arg("--copy-pages");
            m
        }
        None => mode,
    };
    match mode {
        "stop-and-copy" => {
            cmd.args(["--max-rounds", "0"]);
        }
        // Pre-copy rounds, then the last pages after the workload resumed.
        "post-copy" => {
            cmd.arg("--post-copy");
        }
        // No round at all: every page after the workload resumed (CRIU's lazy pages).
        "post-copy-only" => {
            cmd.args(["--max-rounds", "0", "--post-copy"]);
        }
        _ => {}
    }
    let m = cmd.output().map_err(e("running mcr migrate"))?;
    let steal = steal_ms()
        .zip(steal_before)
        .map(|(a, b)| a.iter().zip(&b).map(|(a, b)| a - b).fold(0.0, f64::max));
    if !m.status.success() {
        dest.abandon();
        let _ = w.kill();
        let _ = w.wait();
        return Err(format!(
            "mcr migrate failed: {}",
            String::from_utf8_lossy(&m.stderr)
        ));
    }
    let _ = w.wait();
    let report: serde_json::Value =
        serde_json::from_slice(&m.stdout).map_err(|x| format!("migrate --json: {x}"))?;
    let moved = dest.finish().map_err(e("the destination"))?;
    let (verdict, code) = moved.check().map_err(e("asking the workload"))?;
    if !verdict.starts_with("PASS") || code != Some(0) {
        return Err(format!("the workload says: {verdict} (exit {code:?})"));
    }
    let pause_ms = reported_pause_ms(&verdict).ok_or(format!("no pause in {verdict:?}"))?;
    let pause_end = reported_pause_end_ms(&verdict);
    let (ended_after_ms, in_blackout) = placed(pause_end, pause_ms, &report);
    let own = reported_own_pause_ms(&verdict);
    let (own_ended_after_ms, own_in_blackout) =
        placed(own.map(|o| o.1), own.map_or(0.0, |o| o.0), &report);
    Ok(Run {
        size,
        rate,
        mode: mode.into(),
        pause_ms,
        own_pause_ms: own.map(|o| o.0),
        own_in_blackout,
        own_ended_after_ms,
        in_blackout,
        ended_after_ms,
        steal_ms: steal,
        report,
    })
}

/// Where a pause of the workload ended, in ms after mcr's blackout began, and whether
/// it overlapped the blackout (from the freeze to the destination's word).
fn placed(
    end: Option<u64>,
    pause_ms: f64,
    report: &serde_json::Value,
) -> (Option<f64>, Option<bool>) {
    let (Some(end), Some(began), Some(blackout)) = (
        end.map(|e| e as f64),
        report["blackout_began_ms"].as_f64(),
        report["blackout_ms"].as_f64(),
    ) else {
        return (None, None);
    };
    // Both on this host's wall clock, to the millisecond.
    (
        Some(end - began),
        Some(end - pause_ms <= began + blackout + 1.0 && end + 1.0 >= began),
    )
}

/// Each CPU's steal time so far, in ms (/proc/stat `cpuN` lines, eighth field).
fn steal_ms() -> Option<Vec<f64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let tick_ms = 1e3 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as f64;
    Some(
        stat.lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .filter_map(|l| l.split_whitespace().nth(8)?.parse::<f64>().ok())
            .map(|t| t * tick_ms)
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The smallest and the largest.
fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    })
}

/// One line of the plot: a mode at a rate, (size MiB, median pause ms) per size.
struct Line {
    name: String,
    points: Vec<(usize, f64)>,
}

/// Blackout (ms, log scale) against size (MiB, log scale), one line per mode and rate.
fn svg(cells: &[Line]) -> String {
    let (w, h, l, r, t, b) = (720.0, 440.0, 70.0, 200.0, 30.0, 50.0);
    let xs: Vec<f64> = cells
        .iter()
        .flat_map(|c| c.points.iter().map(|p| (p.0 as f64).log2()))
        .collect();
    let ys: Vec<f64> = cells
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1.max(0.1).log10()))
        .collect();
    let (x0, x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let (y0, y1) = (
        ys.iter().copied().fold(f64::INFINITY, f64::min).floor(),
        ys.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
    );
    let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 + 1.0));
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    s += &format!(
        "<text x='{}' y='18' text-anchor='middle'>blackout seen by the workload (median) against its size</text>\n",
        (w - r + l) / 2.0
    );
    let mut e = y0 as i32;
    while e as f64 <= y1 {
        let y = py(e as f64);
        s += &format!("<line x1='{l}' x2='{}' y1='{y}' y2='{y}' stroke='#ddd'/><text x='{}' y='{}' text-anchor='end'>{} ms</text>\n", w - r, l - 6.0, y + 4.0, 10f64.powi(e));
        e += 1;
    }
    let mut xi = x0.floor();
    while xi <= x1 {
        let x = px(xi);
        s += &format!("<line x1='{x}' x2='{x}' y1='{t}' y2='{}' stroke='#eee'/><text x='{x}' y='{}' text-anchor='middle'>{} MiB</text>\n", h - b, h - b + 18.0, 2f64.powf(xi));
        xi += 1.0;
    }
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    for (i, Line { name, points: pts }) in cells.iter().enumerate() {
        let c = colours[i % colours.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{},{}", px((p.0 as f64).log2()), py(p.1.max(0.1).log10())))
            .collect();
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').expect("x,y");
            s += &format!("<circle cx='{x}' cy='{y}' r='3' fill='{c}'/>\n");
        }
        let ly = t + 20.0 + i as f64 * 18.0;
        s += &format!("<line x1='{}' x2='{}' y1='{ly}' y2='{ly}' stroke='{c}' stroke-width='2'/><text x='{}' y='{}'>{name}</text>\n", w - r + 10.0, w - r + 30.0, w - r + 35.0, ly + 4.0);
    }
    s + "</svg>\n"
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mcr = mcr_bench::mcr_bin();
    kext_shim::procfs::cloexec_inherited_fds().expect("marking inherited fds close-on-exec");
    // The moved workloads' namespace inits come to us to be reaped.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    let mut runs: Vec<Run> = Vec::new();
    let mut failures = Vec::new();
    let mut cells = Vec::new();
    let mut rows = Vec::new();
    // The modes take turns, run by run, so that a slow spell of the machine falls on
    // all of them and their ratios hold.
    let mut done: std::collections::HashMap<(usize, usize, usize), Vec<Run>> = Default::default();
    for (ri, &rate) in args.rates.iter().enumerate() {
        for (si, &size) in args.sizes.iter().enumerate() {
            for _ in 0..args.runs {
                for (mi, mode) in args.modes.iter().enumerate() {
                    match one(&mcr, size, rate, mode) {
                        Ok(r) => done.entry((mi, ri, si)).or_default().push(r),
                        // Recorded, and the grid goes on: one cell the machine cannot
                        // hold (4 GiB rewritten fast) says nothing about the others.
                        Err(e) => {
                            eprintln!("blackout: {mode} {size} MiB at {rate} MiB/s: {e}");
                            failures.push(serde_json::json!({
                                "mode": mode, "size_mib": size, "rate_mib_s": rate,
                                "error": e,
                            }));
                        }
                    }
                }
            }
        }
    }
    for (mi, mode) in args.modes.iter().enumerate() {
        for (ri, &rate) in args.rates.iter().enumerate() {
            let mut pts = Vec::new();
            for (si, &size) in args.sizes.iter().enumerate() {
                let these = done.remove(&(mi, ri, si)).unwrap_or_default();
                if these.is_empty() {
                    continue;
                }
                let pause = median(these.iter().map(|r| r.pause_ms).collect());
                let total = median(
                    these
                        .iter()
                        .filter_map(|r| r.report["total_ms"].as_f64())
                        .collect(),
                );
                let part = |k: &str| {
                    median(
                        these
                            .iter()
                            .filter_map(|r| r.report["blackout"][k].as_f64())
                            .collect(),
                    )
                };
                let (dump, transfer, restore) = (
                    part("freeze_and_dump_ms"),
                    part("transfer_ms"),
                    part("restore_ms"),
                );
                let (lo, hi) = range(these.iter().map(|r| r.pause_ms));
                let blackout = median(
                    these
                        .iter()
                        .filter_map(|r| r.report["blackout_ms"].as_f64())
                        .collect(),
                );
                let own: Vec<f64> = these.iter().filter_map(|r| r.own_pause_ms).collect();
                let (own_lo, own_hi) = range(own.iter().copied());
                let own = median(own);
                let own_inside = these
                    .iter()
                    .filter(|r| r.own_in_blackout == Some(true))
                    .count();
                let inside = these.iter().filter(|r| r.in_blackout == Some(true)).count();
                let steal = these.iter().filter_map(|r| r.steal_ms).fold(0.0, f64::max);
                println!(
                    "{mode:>13} {size:>5} MiB {rate:>6} MiB/s: pause {pause:8.1} ms ({lo:.1}-{hi:.1}), without the host's steal {own:.1} ms ({own_lo:.1}-{own_hi:.1}), in the blackout in {inside} and {own_inside} of {}; the source's blackout {blackout:.1} ms (dump {dump:.1}, transfer {transfer:.1}, restore {restore:.1}); total {total:.0} ms; host steal up to {steal:.0} ms",
                    these.len()
                );
                rows.push(serde_json::json!({
                    "mode": mode, "size_mib": size, "rate_mib_s": rate, "runs": these.len(),
                    "median_pause_ms": pause, "min_pause_ms": lo, "max_pause_ms": hi,
                    "median_pause_without_steal_ms": own, "min_pause_without_steal_ms": own_lo,
                    "max_pause_without_steal_ms": own_hi,
                    "pauses_without_steal_in_blackout": own_inside,
                    "median_total_ms": total,
                    "median_freeze_and_dump_ms": dump, "median_transfer_ms": transfer,
                    "median_restore_ms": restore, "median_blackout_ms": blackout,
                    "pauses_in_blackout": inside, "max_steal_ms": steal,
                }));
                pts.push((size, pause));
                runs.extend(these);
            }
            cells.push(Line {
                name: format!("{mode}, {rate} MiB/s"),
                points: pts,
            });
        }
    }
    let all: Vec<_> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "mode": r.mode, "size_mib": r.size, "rate_mib_s": r.rate,
                "pause_ms": r.pause_ms, "pause_without_steal_ms": r.own_pause_ms,
                "pause_without_steal_in_blackout": r.own_in_blackout,
                "pause_without_steal_ended_after_blackout_began_ms": r.own_ended_after_ms,
                "pause_in_blackout": r.in_blackout,
                "pause_ended_after_blackout_began_ms": r.ended_after_ms,
                "steal_ms": r.steal_ms,
                "report": r.report,
            })
        })
        .collect();
    let failed = !failures.is_empty();
    let doc = serde_json::json!({"medians": rows, "runs": all, "failures": failures});
    if let Err(e) = std::fs::create_dir_all(&args.out)
        .and_then(|_| std::fs::write(args.out.join("blackout.json"), format!("{doc:#}\n")))
        .and_then(|_| std::fs::write(args.out.join("blackout.svg"), svg(&cells)))
    {
        eprintln!("blackout: writing {}: {e}", args.out.display());
        return std::process::ExitCode::FAILURE;
    }
    println!(
        "blackout: wrote {0}/blackout.json and {0}/blackout.svg",
        args.out.display()
    );
    if failed {
        eprintln!("blackout: some runs failed (see \"failures\" in the JSON)");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
