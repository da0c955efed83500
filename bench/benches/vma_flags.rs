#![forbid(unsafe_code)]
//! Reading every VMA's flags of a process holding 1 GiB: /proc/PID/smaps (walks the
//! page tables), the BPF task_vma iterator (`kext_shim::vmaiter`), and /proc/PID/maps
//! without flags (the floor). The checkpoint reads one of the first two while frozen.
//!
//! `cargo bench -p mcr-bench --bench vma_flags`

use criterion::{criterion_group, criterion_main, Criterion};
use kext_shim::{procfs, vmaiter, Pid};

fn flags(c: &mut Criterion) {
    let mut held = Vec::new();
    for mib in [64usize, 1024] {
        // Resident: every page written once.
        let mut m = memmap2::MmapMut::map_anon(mib << 20).expect("mapping");
        for p in m.chunks_mut(4096) {
            p[0] = 1;
        }
        held.push(m);
        let total: usize = held.iter().map(|m| m.len() >> 20).sum();
        let mut g = c.benchmark_group(format!("vma_flags_{total}MiB"));
        let me = Pid::this();
        g.bench_function("smaps", |b| {
            b.iter(|| procfs::read_maps(me).expect("smaps"))
        });
        let it = vmaiter::shared().expect("the VMA iterator");
        g.bench_function("bpf_iter", |b| b.iter(|| it.maps(me).expect("iterator")));
        g.bench_function("maps_only", |b| {
            b.iter(|| procfs::read_layout(me).expect("maps"))
        });
        g.finish();
    }
}

criterion_group!(benches, flags);
criterion_main!(benches);
