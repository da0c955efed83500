#![forbid(unsafe_code)]
//! Process trees and multi-threaded processes: checkpoint, restore, and the freeze alone
//! (from the first seize to every thread of every process stopped). Shapes: a parent
//! and two children with 64 MiB each, one 4-thread process with 256 MiB, and 8
//! processes x 4 threads with 32 MiB each.
//!
//! `cargo bench -p mcr-bench --bench tree`

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use mcr::dump::{AfterDump, CheckpointOptions, CheckpointReport};
use mcr::image::Compression;
use mcr_bench::{image_root, RestoreTarget, Workload};
use std::time::Duration;

/// (processes, threads per process, MiB per process)
const SHAPES: [(usize, usize, usize); 3] = [(3, 1, 64), (1, 4, 256), (8, 4, 32)];

fn step(r: &CheckpointReport, name: &str) -> Duration {
    r.steps
        .iter()
        .find(|s| s.0 == name)
        .map(|s| s.1)
        .unwrap_or_default()
}

fn trees(c: &mut Criterion) {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    for (procs, threads, mib) in SHAPES {
        tree(c, procs, threads, mib);
    }
}

fn tree(c: &mut Criterion, procs: usize, threads: usize, mib: usize) {
    let mut g = c.benchmark_group(format!("tree_{procs}x{threads}x{mib}MiB"));
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    let w = Workload::start_tree(mib, procs, threads);
    let dir = tempfile::tempdir_in(image_root()).expect("tempdir");
    let dump = |i: u64, after| {
        let img = dir.path().join(format!("img{i}"));
        let r = mcr::dump::checkpoint(&CheckpointOptions {
            pid: w.pid,
            dir: img.clone(),
            after,
            shell_job: true,
            compression: Compression::None,
            freeze_cgroup: None,
            tcp_established: false,
            prev: None,
            prev_held_pids: vec![],
            seen: Vec::new(),
            vm_flags: None,
            lazy: false,
            hot: Vec::new(),
            dry_run: false,
            pages_in_source: false,
        })
        .expect("checkpoint");
        (img, r)
    };
    for (name, pick) in [("checkpoint", "total"), ("freeze", "freeze")] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let (img, r) = dump(i, AfterDump::LeaveRunning);
                    total += step(&r, pick);
                    std::fs::remove_dir_all(img).expect("removing the image");
                }
                total
            })
        });
    }
    let pids = mcr_bench::tree_pids(w.pid);
    assert_eq!(pids.len(), procs, "the workload tree");
    let (img, _) = dump(u64::MAX, AfterDump::Kill);
    drop(w);
    // Its children were reparented to us (the subreaper) when it was killed.
    for p in pids {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(p), None);
    }
    let target = RestoreTarget::new(&img);
    g.bench_function("restore", |b| b.iter_custom(|iters| target.time(iters)));
    g.finish();
}

criterion_group!(benches, trees);
criterion_main!(benches);
