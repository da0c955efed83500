//! `mcr receive`: the destination of a migration. It takes one migration, stores its
//! images as they arrive, restores the last one (which reads the rest from the chain)
//! and tells the source whether the workload runs here.

use super::wire::{self, FileHeader, ImageDone};
use super::{MigrateError, Result};
use crate::image::Image;
use crate::restore::{restore_with, RestoreOptions, Restored, WarmTree};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;
use transport::{FrameReader, FrameWriter, Listener};

pub struct ReceiveOptions {
    /// How to restore (its `dir` is ignored: the images arrive in `workdir`).
    pub restore: RestoreOptions,
    /// Where the images are kept; a fresh temporary directory if None. Removed after.
    pub workdir: Option<PathBuf>,
    /// Build the tree from the rounds as they arrive (warm restore); false makes it
    /// only from the final image, as `mcr restore` does.
    pub warm: bool,
}

fn protocol(pid: i32, what: impl Into<String>) -> MigrateError {
    MigrateError::Protocol {
        pid,
        what: what.into(),
    }
}

/// Takes one migration on `listener` and restores it.
pub fn receive(listener: &Listener, opts: &ReceiveOptions) -> Result<Restored> {
    let stream = listener
        .accept()
        .map_err(|source| MigrateError::Transport {
            pid: 0,
            step: "accepting the source".into(),
            source,
        })?;
    let back = stream
        .try_clone()
        .map_err(|source| MigrateError::Transport {
            pid: 0,
            step: "accepting the source".into(),
            source,
        })?;
    let mut r = FrameReader::new(stream, "from the source");
    let mut w = FrameWriter::new(back, transport::Compression::Off, "to the source");
    let tx = |pid: i32, step: &'static str| {
        move |source| MigrateError::Transport {
            pid,
            step: step.into(),
            source,
        }
    };
    let hello: wire::Hello = match r.recv().map_err(tx(0, "reading the greeting"))? {
        Some(f) if f.kind == wire::HELLO => {
            wire::parse(f.kind, f.payload).map_err(|w| protocol(0, w))?
        }
        _ => return Err(protocol(0, "the source did not greet")),
    };
    let pid = hello.root_pid;
    if hello.protocol != wire::PROTOCOL {
        return Err(protocol(
            pid,
            format!(
                "the source speaks migration protocol {}, this mcr {}",
                hello.protocol,
                wire::PROTOCOL
            ),
        ));
    }
    let temp;
    let root = match &opts.workdir {
        Some(d) => d.clone(),
        None => {
            temp = super::staging::make(&super::default_staging(), "mcr-receive-")
                .map_err(|e| protocol(pid, format!("making a work directory: {e}")))?;
            temp.path().to_path_buf()
        }
    };
    let link = sees(&hello.staging, &root);
    let read_source = reads(&hello);
    wire::send_json(&mut w, wire::WELCOME, &wire::Welcome { link, read_source })
        .map_err(tx(pid, "welcoming the source"))?;
    let staging = link.then(|| PathBuf::from(&hello.staging.path));
    // Started now, not in the blackout: a process takes 0.3 ms or more to start here.
    let mut early_watchdog = match hello.post_copy {
        true => Some(super::postcopy::Watchdog::start().map_err(|why| protocol(pid, why))?),
        false => None,
    };
    let warm_opts = opts.warm.then_some(&opts.restore);
    let taken = take_images(&mut r, &mut w, &root, staging.as_deref(), pid, warm_opts);
    let result = taken.and_then(|(last, opened, warm, lazy)| {
        let mut ro = opts.restore.clone();
        ro.dir = root.join(&last);
        let t = Instant::now();
        // From here a thread reads the source: the commit for us, pages for the pager.
        let w = std::sync::Arc::new(std::sync::Mutex::new(w));
        let wake = std::sync::Arc::new(
            nix::sys::eventfd::EventFd::from_value_and_flags(
                0,
                nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                    | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
            )
            .map_err(|e| protocol(pid, format!("making an eventfd: {e}")))?,
        );
        let (to_main, from_demux) = std::sync::mpsc::channel();
        let (to_pager, pager_rx) = std::sync::mpsc::channel();
        demux(r, to_main, to_pager, wake.clone());
        let watchdog = match (lazy.is_some(), early_watchdog.take()) {
            (true, Some(w)) => Some(w),
            (true, None) => {
                Some(super::postcopy::Watchdog::start().map_err(|why| protocol(pid, why))?)
            }
            (false, w) => {
                if let Some(w) = w {
                    w.done();
                }
                None
            }
        };
        let pager = lazy.zip(watchdog).map(|(lazy, watchdog)| {
            let (made_tx, made_rx) = std::sync::mpsc::channel();
            ro.lazy = Some(std::sync::Arc::new(crate::restore::lazy::LazyRestore {
                runs: lazy.processes.into_iter().collect(),
                made: std::sync::Mutex::new(made_tx),
                wake: wake.clone(),
                held: Default::default(),
            }));
            let pager = super::postcopy::Pager {
                runs: ro.lazy.as_ref().expect("just set").runs.clone(),
                made: made_rx,
                from_source: pager_rx,
                wake: wake.clone(),
                w: w.clone(),
                watchdog,
            };
            std::thread::spawn(move || pager.run())
        });
        let send = |kind: u16, v: &dyn erased::Json| {
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            v.send(&mut w, kind)
        };
        // Held whole until the source has stopped the original for good.
        let mut gate = || -> std::result::Result<(), String> {
            send(wire::READY, &()).map_err(|e| e.to_string())?;
            match from_demux.recv() {
                Ok(Ok(Some(k))) if k == wire::COMMIT => Ok(()),
                Ok(Ok(Some(k))) => Err(format!("the source sent kind {k} instead of a commit")),
                Ok(Ok(None)) | Err(_) => {
                    Err("the source ended the stream instead of committing".into())
                }
                Ok(Err(e)) => Err(format!("the source went away before committing: {e}")),
            }
        };
        let restored = restore_with(&ro, opened, &mut gate, warm.tree);
        // Kept (with what the restore left in it) until every page is in place.
        let lazy_kept = ro.lazy.take();
        drop(ro);
        let restored = restored.map(|mut done| {
            if done.cold_because.is_none() {
                done.cold_because = warm.cold_because;
            }
            done
        });
        match restored {
            Ok(done) => {
                send(
                    wire::RESTORED,
                    &wire::Restored {
                        pid: done.pid,
                        restore_ms: t.elapsed().as_secs_f64() * 1e3,
                        warm: done.warm_rounds.is_some(),
                        cold_because: done.cold_because.clone(),
                        gone_from_source: done.gone_from_source,
                        steps: done
                            .steps
                            .iter()
                            .map(|(k, d)| ((*k).to_string(), d.as_secs_f64() * 1e3))
                            .collect(),
                    },
                )
                .map_err(tx(pid, "telling the source the workload runs here"))?;
                let mut done = done;
                done.settle();
                if let Some(pager) = pager {
                    let paged = pager
                        .join()
                        .unwrap_or_else(|_| Err("the pager panicked".into()));
                    drop(lazy_kept);
                    if let Err(why) = paged {
                        // It would read zeros where its pages should be: it must not
                        // run on.
                        kill_tree(done.child);
                        return Err(MigrateError::LostSource {
                            pid,
                            here: done.pid,
                            why,
                        });
                    }
                }
                Ok(done)
            }
            Err(e) => {
                let _ = send(
                    wire::FAILED,
                    &wire::Failed {
                        error: e.to_string(),
                    },
                );
                Err(e.into())
            }
        }
    });
    if opts.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// Whether this process sees the source's staging directory itself, on the filesystem
/// of `workdir` (so that its files can be linked in).
fn sees(s: &wire::Staging, workdir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(dir), Ok(work)) = (std::fs::metadata(&s.path), std::fs::metadata(workdir)) else {
        return false;
    };
    !s.boot_id.is_empty()
        && s.boot_id == kext_shim::procfs::boot_id()
        && (dir.dev(), dir.ino()) == (s.dev, s.ino)
        && work.dev() == s.dev
}

/// Whether this process sees the source's root process itself (on this boot, in this
/// pid namespace) and may read its memory.
fn reads(h: &wire::Hello) -> bool {
    let pid = kext_shim::Pid::from_raw(h.root_pid);
    !h.staging.boot_id.is_empty()
        && h.staging.boot_id == kext_shim::procfs::boot_id()
        && kext_shim::procfs::Stat::read(pid).is_ok_and(|s| s.field(22) == h.root_start)
        // The access process_vm_readv asks for, as opening /proc/PID/mem does.
        && std::fs::File::open(format!("/proc/{}/mem", h.root_pid)).is_ok()
}

/// The tree built from the rounds so far, or why there is none.
#[derive(Default)]
struct Warm {
    tree: Option<WarmTree>,
    cold_because: Option<String>,
}

impl Warm {
    /// Puts the round just opened (the last of `opened`) into the tree, making the tree
    /// from it if it is the first. A failure only costs the warmth: the tree is killed
    /// and the checkpoint will be restored cold.
    fn take(&mut self, opts: &RestoreOptions, opened: &[Image]) {
        if self.cold_because.is_some() {
            return;
        }
        let Some(newest) = opened.last() else { return };
        let chain = chain_of(newest, opened);
        let done = match self.tree.as_mut() {
            Some(tree) => tree.apply(&chain).map(|_| ()),
            None => {
                crate::fault::wait(crate::fault::RECEIVE_WAIT_BEFORE_WARM);
                WarmTree::start(opts, &chain).map(|t| self.tree = Some(t))
            }
        };
        if let Err(e) = done {
            tracing::info!("restoring cold: {e}");
            self.tree = None;
            self.cold_because = Some(e.to_string());
        }
    }
}

/// `newest` and the images of `pool` it builds on, newest first.
fn chain_of<'a>(newest: &'a Image, pool: &'a [Image]) -> Vec<&'a Image> {
    let mut chain = vec![newest];
    while let Some(want) = &chain[chain.len() - 1].snapshot.inventory.parent {
        match pool
            .iter()
            .find(|i| i.snapshot.inventory.image_id == want.image_id)
        {
            // A chain is no longer than the rounds: a loop would repeat one.
            Some(p) if chain.len() <= pool.len() => chain.push(p),
            _ => break,
        }
    }
    chain
}

/// Stores the images until the last one (linking them from `staging` when the source
/// sends links); returns its name, the others opened and checked as they came (during
/// pre-copy, not during the blackout), and with `warm` the tree built from them. Each
/// round is answered with APPLIED once it is in place.
fn take_images(
    r: &mut wire::Reader,
    w: &mut wire::Writer,
    root: &Path,
    staging: Option<&Path>,
    pid: i32,
    warm: Option<&RestoreOptions>,
) -> Result<(String, Vec<Image>, Warm, Option<wire::Lazy>)> {
    let mut tree = Warm::default();
    let mut opened = Vec::new();
    let mut lazy = None;
    let tx = |source| MigrateError::Transport {
        pid,
        step: "receiving the images".into(),
        source,
    };
    let mut current: Option<(std::fs::File, FileHeader, u64)> = None;
    loop {
        let Some(f) = r.recv().map_err(tx)? else {
            return Err(protocol(
                pid,
                "the source ended the stream before the last image",
            ));
        };
        match f.kind {
            wire::FILE => {
                if current.is_some() {
                    return Err(protocol(pid, "a file began before the last one was whole"));
                }
                let h: FileHeader = wire::parse(f.kind, f.payload).map_err(|w| protocol(pid, w))?;
                let dir = root.join(safe_name(pid, &h.image)?);
                if !dir.exists() {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dir)
                        .map_err(|e| protocol(pid, format!("{}: {e}", dir.display())))?;
                }
                let path = dir.join(safe_name(pid, &h.name)?);
                if let Some(want) = h.linked {
                    link_in(pid, staging, &h, want, &path)?;
                    continue;
                }
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| protocol(pid, format!("{}: {e}", path.display())))?;
                // An empty file is whole at once.
                if h.size > 0 {
                    current = Some((file, h, 0));
                }
            }
            wire::DATA => {
                let Some((file, h, got)) = current.as_mut() else {
                    return Err(protocol(pid, "file data outside a file"));
                };
                *got += f.payload.len() as u64;
                if *got > h.size {
                    return Err(protocol(pid, format!("{} runs past its size", h.name)));
                }
                file.write_all(f.payload)
                    .map_err(|e| protocol(pid, format!("writing {}: {e}", h.name)))?;
                if *got == h.size {
                    current = None;
                }
            }
            wire::IMAGE => {
                let d: ImageDone = wire::parse(f.kind, f.payload).map_err(|w| protocol(pid, w))?;
                if let Some((_, h, got)) = &current {
                    // A file announced empty is whole at once.
                    if !(h.size == 0 && *got == 0) {
                        return Err(protocol(
                            pid,
                            format!("image {} ended inside {}", d.image, h.name),
                        ));
                    }
                    current = None;
                }
                let name = safe_name(pid, &d.image)?.to_string();
                if d.last {
                    return Ok((name, opened, tree, lazy));
                }
                opened
                    .push(Image::open(&root.join(&name)).map_err(|e| {
                        protocol(pid, format!("round {name} arrived damaged: {e}"))
                    })?);
                let t = Instant::now();
                match warm {
                    Some(opts) => tree.take(opts, &opened),
                    None => tree.cold_because = Some("warm restore is off".into()),
                }
                let applied = wire::Applied {
                    warm: tree.tree.is_some(),
                    apply_ms: t.elapsed().as_secs_f64() * 1e3,
                    cold_because: tree.cold_because.clone(),
                };
                wire::send_json(w, wire::APPLIED, &applied).map_err(|source| {
                    MigrateError::Transport {
                        pid,
                        step: "telling the source a round is in place".into(),
                        source,
                    }
                })?;
            }
            wire::LAZY => {
                lazy = Some(wire::parse(f.kind, f.payload).map_err(|w| protocol(pid, w))?);
            }
            k => return Err(protocol(pid, format!("unexpected frame kind {k}"))),
        }
    }
}

/// Reads the source from now on: pages and their end go to the pager (waking it),
/// every other frame's kind to the main thread (a commit); the stream's end or failure
/// to both.
fn demux(
    mut r: wire::Reader,
    to_main: std::sync::mpsc::Sender<transport::Result<Option<u16>>>,
    to_pager: std::sync::mpsc::Sender<super::postcopy::ToPager>,
    wake: std::sync::Arc<nix::sys::eventfd::EventFd>,
) {
    use super::postcopy::ToPager;
    std::thread::spawn(move || {
        // Pages for the pager come through here first.
        let _ = kext_shim::lazy::serve_first();
        loop {
            let pager = |m: ToPager| {
                let _ = to_pager.send(m);
                let _ = wake.write(1);
            };
            match r.recv() {
                Ok(Some(f)) if f.kind == wire::PAGES => match wire::parse_pages(f.payload) {
                    Ok((pid, runs)) => {
                        for (addr, bytes) in runs {
                            let _ = to_pager.send(ToPager::Pages(pid, addr, bytes.to_vec()));
                        }
                        let _ = wake.write(1);
                    }
                    Err(why) => {
                        pager(ToPager::Lost(why));
                        return;
                    }
                },
                Ok(Some(f)) if f.kind == wire::PAGES_DONE => pager(ToPager::Done),
                Ok(Some(f)) => {
                    let _ = to_main.send(Ok(Some(f.kind)));
                }
                Ok(None) => {
                    pager(ToPager::Lost("the source ended the stream".into()));
                    let _ = to_main.send(Ok(None));
                    return;
                }
                Err(e) => {
                    pager(ToPager::Lost(e.to_string()));
                    let _ = to_main.send(Err(e));
                    return;
                }
            }
        }
    });
}

/// Kills the tree restored at `root` (the init of its pid namespace, or its root).
fn kill_tree(root: i32) {
    for p in kext_shim::procfs::descendants(kext_shim::Pid::from_raw(root)) {
        let _ = kext_shim::clone::kill(kext_shim::Pid::from_raw(p), libc::SIGKILL);
    }
}

/// A message that can be sent as JSON without knowing its type (the gate and the
/// answers share one sender).
mod erased {
    pub trait Json {
        fn send(&self, w: &mut super::wire::Writer, kind: u16) -> transport::Result<()>;
    }
    impl<T: serde::Serialize> Json for T {
        fn send(&self, w: &mut super::wire::Writer, kind: u16) -> transport::Result<()> {
            super::wire::send_json(w, kind, self)
        }
    }
}

/// Links the staged file `h` in at `path`, after checking it is the very file sent.
fn link_in(
    pid: i32,
    staging: Option<&Path>,
    h: &FileHeader,
    want: (u64, u64),
    path: &Path,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(staging) = staging else {
        return Err(protocol(pid, "a file sent as a link, which was not agreed"));
    };
    let from = staging
        .join(safe_name(pid, &h.image)?)
        .join(safe_name(pid, &h.name)?);
    std::fs::hard_link(&from, path)
        .map_err(|e| protocol(pid, format!("linking {}: {e}", from.display())))?;
    let m =
        std::fs::metadata(path).map_err(|e| protocol(pid, format!("{}: {e}", path.display())))?;
    if (m.dev(), m.ino()) != want || m.len() != h.size {
        return Err(protocol(
            pid,
            format!("{} is not the file the source staged", from.display()),
        ));
    }
    Ok(())
}

/// A single path component, never `..` or absolute: the source names files only
/// inside the work directory.
fn safe_name(pid: i32, n: &str) -> Result<&str> {
    let ok = !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0');
    if ok {
        Ok(n)
    } else {
        Err(protocol(pid, format!("refusing the file name {n:?}")))
    }
}
