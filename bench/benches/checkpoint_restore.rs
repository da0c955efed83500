#![forbid(unsafe_code)]
//! Checkpoint and restore of one process with 16, 256 and 1024 MiB of incompressible
//! private memory, images on tmpfs, no compression.
//!
//! `cargo bench -p mcr-bench --bench checkpoint_restore`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use mcr::dump::{AfterDump, CheckpointOptions};
use mcr::image::Compression;
use mcr_bench::{image_root, RestoreTarget, Workload};
use std::time::{Duration, Instant};

const SIZES_MIB: [usize; 3] = [16, 256, 1024];

/// Each iteration takes milliseconds to a second: ten flat samples are plenty.
fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    g
}

fn checkpoint(c: &mut Criterion) {
    let mut g = group(c, "checkpoint");
    for mib in SIZES_MIB {
        let w = Workload::start(mib);
        let dir = tempfile::tempdir_in(image_root()).expect("tempdir");
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &mib,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        let img = dir.path().join(format!("img{i}"));
                        let opts = CheckpointOptions {
                            pid: w.pid,
                            dir: img.clone(),
                            after: AfterDump::LeaveRunning,
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
                        };
                        let t = Instant::now();
                        mcr::dump::checkpoint(&opts).expect("checkpoint");
                        total += t.elapsed();
                        std::fs::remove_dir_all(&img).expect("removing the image");
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

fn restore(c: &mut Criterion) {
    let mut g = group(c, "restore");
    for mib in SIZES_MIB {
        let dir = tempfile::tempdir_in(image_root()).expect("tempdir");
        let img = dir.path().join("img");
        let mut w = Workload::start(mib);
        mcr::dump::checkpoint(&CheckpointOptions {
            pid: w.pid,
            dir: img.clone(),
            after: AfterDump::Kill,
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
        let _ = w.child.wait();
        let target = RestoreTarget::new(&img);
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &mib,
            |b, _| b.iter_custom(|iters| target.time(iters)),
        );
    }
    g.finish();
}

criterion_group!(benches, checkpoint, restore);
criterion_main!(benches);
