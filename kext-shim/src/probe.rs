//! Feature probes: ask the kernel whether each interface mcr uses works here, never assume.

use crate::clone::{kill, spawn_stub, StubSpec};
use crate::inject::{find_syscall_insn, Injector};
use crate::mem::{read_remote, Pagemap, ProcMem};
use crate::procfs::read_maps;
use crate::{ptrace, sys, Pid};
use std::os::fd::AsRawFd;

/// One probed interface.
#[derive(Debug, Clone)]
pub struct Feature {
    pub name: &'static str,
    /// The engine cannot checkpoint or restore without it.
    pub required: bool,
    pub present: bool,
    /// Why it is missing, or a detail worth showing.
    pub detail: String,
}

fn feature(name: &'static str, required: bool, r: Result<String, String>) -> Feature {
    match r {
        Ok(detail) => Feature {
            name,
            required,
            present: true,
            detail,
        },
        Err(detail) => Feature {
            name,
            required,
            present: false,
            detail,
        },
    }
}

/// Probes every feature. Forks one short-lived traced child for the ptrace ones.
pub fn probe_all() -> Vec<Feature> {
    let mut out = Vec::new();
    out.push(feature(
        "clone3 set_tid",
        true,
        crate::clone::probe_set_tid()
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    ));
    out.extend(probe_tracee());
    out.push(feature("PAGEMAP_SCAN", false, probe_pagemap_scan()));
    out.push(feature(
        "userfaultfd write-protect async",
        false,
        probe_uffd_wp_async(),
    ));
    out.push(feature(
        "userfaultfd missing (post-copy)",
        false,
        crate::lazy::supported()
            .map(|f| format!("features {f:#x}; fork, remap, remove and unmap events")),
    ));
    out.push(feature("soft-dirty", false, probe_soft_dirty()));
    out.push(feature(
        "BPF task_vma iterator",
        false,
        crate::vmaiter::shared()
            .map(|_| "VMA flags without a page-table walk; read like smaps here".to_string())
            .map_err(str::to_string),
    ));
    out.push(feature("pidfd_open and pidfd_getfd", true, probe_pidfd()));
    out.push(feature("vDSO", true, probe_vdso()));
    out.push(feature("cgroup v2 freezer", false, probe_cgroup_freeze()));
    out.push(feature(
        "sock_diag for unix sockets",
        false,
        crate::unix::unix_sockets()
            .map(|m| format!("{} sockets", m.len()))
            .map_err(|e| e.to_string()),
    ));
    out.push(feature(
        "nftables lock on TCP connections",
        false,
        crate::nft::tables()
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    ));
    out.push(feature(
        "nfqueue: peers' packets held",
        false,
        crate::nft::probe_queue()
            .map(str::to_string)
            .map_err(|e| e.to_string()),
    ));
    out
}

fn probe_tracee() -> Vec<Feature> {
    let names: [(&'static str, bool); 8] = [
        ("ptrace seize and interrupt", true),
        ("ptrace NT_X86_XSTATE regset", true),
        ("ptrace sigmask and PEEKSIGINFO", true),
        ("ptrace rseq configuration", true),
        ("syscall injection", true),
        ("PR_SET_MM_MAP", true),
        ("process_vm_readv", true),
        ("/proc/PID/mem and pagemap", true),
    ];
    let stub = match spawn_stub(&StubSpec::default()).map(|(pid, _)| pid) {
        Ok(p) => p,
        Err(e) => {
            return names
                .iter()
                .map(|&(n, r)| feature(n, r, Err(format!("cannot fork a probe child: {e}"))))
                .collect()
        }
    };
    let results = tracee_checks(stub);
    let _ = kill(stub, libc::SIGKILL);
    let _ = nix::sys::wait::waitpid(stub, None);
    names
        .iter()
        .zip(results)
        .map(|(&(n, r), res)| feature(n, r, res))
        .collect()
}

fn tracee_checks(pid: Pid) -> Vec<Result<String, String>> {
    let s = |e: crate::Error| e.to_string();
    let mut out = Vec::new();
    let stopped = ptrace::wait_stopped(pid).map_err(s);
    out.push(stopped.clone().map(|(sig, _)| format!("stopped by {sig}")));
    if stopped.is_err() {
        return vec![Err("probe child did not stop".into()); 8];
    }
    out.push(
        ptrace::get_xstate(pid)
            .map(|x| format!("{} bytes", x.len()))
            .map_err(s),
    );
    out.push(
        ptrace::get_sigmask(pid)
            .and_then(|_| ptrace::peek_siginfo(pid, true))
            .map(|_| String::new())
            .map_err(s),
    );
    out.push(
        ptrace::rseq_config(pid)
            .map(|c| format!("area {:#x} size {}", c.area, c.size))
            .map_err(s),
    );
    let inj = (|| -> Result<(Injector, u64), crate::Error> {
        let regs = ptrace::get_regs(pid)?;
        let maps = read_maps(pid)?;
        let vdso = maps
            .iter()
            .find(|m| m.path == "[vdso]")
            .ok_or(crate::Error::Unexpected {
                pid: pid.as_raw(),
                what: "no [vdso]".into(),
            })?;
        let mut bytes = vec![0u8; vdso.len() as usize];
        read_remote(pid, vdso.start, &mut bytes)?;
        let ip = find_syscall_insn(&bytes, vdso.start).ok_or(crate::Error::Unexpected {
            pid: pid.as_raw(),
            what: "no syscall instruction in [vdso]".into(),
        })?;
        let mut inj = Injector::new(pid, ip, regs);
        let got = inj.call(libc::SYS_getpid, [0; 6], || "getpid".into())?;
        if got != pid.as_raw() as u64 {
            return Err(crate::Error::Unexpected {
                pid: pid.as_raw(),
                what: format!("injected getpid returned {got}"),
            });
        }
        Ok((inj, regs.rsp))
    })();
    match inj {
        Err(e) => {
            out.push(Err(e.to_string()));
            out.push(Err("needs syscall injection".into()));
        }
        Ok((mut inj, rsp)) => {
            out.push(Ok(String::new()));
            // PR_SET_MM_MAP_SIZE writes the struct size below the stub's stack pointer.
            let addr = (rsp - 512) & !7;
            out.push(
                inj.call(
                    libc::SYS_prctl,
                    [sys::PR_SET_MM, sys::PR_SET_MM_MAP_SIZE, addr, 0, 0, 0],
                    || "prctl(PR_SET_MM_MAP_SIZE)".into(),
                )
                .and_then(|_| {
                    let mut b = [0u8; 4];
                    read_remote(pid, addr, &mut b)?;
                    Ok(format!(
                        "struct prctl_mm_map is {} bytes",
                        u32::from_ne_bytes(b)
                    ))
                })
                .map_err(s),
            );
        }
    }
    out.push({
        let mut b = [0u8; 8];
        let regs = ptrace::get_regs(pid).map_err(s);
        regs.and_then(|r| {
            read_remote(pid, r.rsp, &mut b)
                .map(|_| String::new())
                .map_err(s)
        })
    });
    out.push(
        ProcMem::open(pid)
            .and_then(|m| {
                let r = ptrace::get_regs(pid)?;
                let mut b = [0u8; 8];
                m.read(r.rsp, &mut b)?;
                m.write(r.rsp, &b)?;
                Pagemap::open(pid)?.read(r.rsp & !4095, (r.rsp & !4095) + 4096)
            })
            .map(|_| String::new())
            .map_err(s),
    );
    out
}

fn probe_pagemap_scan() -> Result<String, String> {
    let pm = Pagemap::open(Pid::this()).map_err(|e| e.to_string())?;
    let x = 0u64;
    let page = (&x as *const u64 as u64) & !4095;
    pm.scan(
        page,
        page + 4096,
        sys::PAGE_IS_PRESENT,
        sys::PAGE_IS_PRESENT,
    )
    .map(|r| format!("{} region(s) on our stack", r.len()))
    .map_err(|e| e.to_string())
}

fn probe_uffd_wp_async() -> Result<String, String> {
    crate::dirty::supported().map(|f| format!("features {f:#x}; tracks another process's writes"))
}

fn probe_soft_dirty() -> Result<String, String> {
    // clear_refs accepts "4" even on kernels built without soft-dirty, so look for the
    // bit itself: clear, write a page, and see whether pagemap marks it.
    std::fs::write("/proc/self/clear_refs", "4").map_err(|e| format!("clear_refs 4: {e}"))?;
    let mut page = vec![0u8; 2 * crate::PAGE_SIZE as usize];
    let addr = (page.as_ptr() as u64 + crate::PAGE_SIZE - 1) & !(crate::PAGE_SIZE - 1);
    let off = (addr - page.as_ptr() as u64) as usize;
    page[off] = 1;
    std::hint::black_box(&mut page);
    let e = Pagemap::open(Pid::this())
        .and_then(|p| p.read(addr, addr + crate::PAGE_SIZE))
        .map_err(|e| e.to_string())?;
    if e.first().is_some_and(|e| e.0 & (1 << 55) != 0) {
        Ok(String::new())
    } else {
        Err("written page not marked soft-dirty (CONFIG_MEM_SOFT_DIRTY off)".into())
    }
}

fn probe_pidfd() -> Result<String, String> {
    let me = Pid::this();
    let pidfd = crate::pidfd::pidfd_open(me).map_err(|e| e.to_string())?;
    crate::pidfd::pidfd_getfd(&pidfd, me, pidfd.as_raw_fd())
        .map(|_| String::new())
        .map_err(|e| e.to_string())
}

fn probe_vdso() -> Result<String, String> {
    let maps = read_maps(Pid::this()).map_err(|e| e.to_string())?;
    let parts: Vec<String> = maps
        .iter()
        .filter(|m| matches!(m.path.as_str(), "[vvar]" | "[vvar_vclock]" | "[vdso]"))
        .map(|m| format!("{} {} KiB", m.path, m.len() / 1024))
        .collect();
    if parts.iter().any(|p| p.starts_with("[vdso]")) {
        Ok(parts.join(", "))
    } else {
        Err("no [vdso] mapping".into())
    }
}

fn probe_cgroup_freeze() -> Result<String, String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let rel = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 membership")?;
    let mounts = crate::procfs::read_mountinfo(Pid::this()).map_err(|e| e.to_string())?;
    let m = mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2")
        .ok_or("cgroup2 not mounted")?;
    let dir = format!("{}{}", m.mount_point, rel);
    let f = format!("{}/cgroup.freeze", dir.trim_end_matches('/'));
    if std::path::Path::new(&f).exists()
        || std::path::Path::new(&m.mount_point)
            .join("cgroup.controllers")
            .exists()
    {
        Ok(format!("cgroup2 at {}", m.mount_point))
    } else {
        Err(format!("{f} missing"))
    }
}
