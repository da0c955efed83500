//! Root disks: clones to apply a fix to, mirrors for the workload to resume on, and
//! the sample disk of the demo.
//!
//! A disk is a directory tree, or an image: a file holding a file system (ext4,
//! xfs or btrfs), which [`files`] attaches to a loop device and mounts under
//! [`MOUNTS`], one place per image, in the host's mount namespace. A partition's
//! processes see that mount bound at their root (under [`ROOTS`] unless told
//! otherwise); it is unmounted by [`release`]
//! when no partition uses the image any more, and its loop device goes with it.
//!
//! A clone keeps every file's type, mode, owner and mtime (mcr checks what the
//! workload holds open against the dump by type, size and mtime); it shares blocks
//! with the original where the file system can (reflink), and copies them
//! otherwise. An image in use is frozen while it is copied: the copy is then of a
//! consistent file system, and the workload's writes wait for the thaw instead of
//! being half in it.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cloning {from} to {to}: {why}")]
    Clone {
        from: String,
        to: String,
        why: String,
    },
    #[error("sample disk {path}: {why}")]
    Sample { path: String, why: String },
    #[error("disk {path}: {step}: {why}")]
    Image {
        path: String,
        step: &'static str,
        why: String,
    },
}

/// Where images are mounted on the host.
pub const MOUNTS: &str = "/run/liveupdate/disks";
/// Where partitions on images see their root, by default.
pub const ROOTS: &str = "/run/liveupdate/roots";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tree,
    Image,
    /// A disk as an overlay on another (a clone of a tree, or a mirror): a directory
    /// holding [`OVERLAY_MARK`] (the disk under it), the `upper` and `work`
    /// directories, and `merged`, where the overlay is mounted.
    Overlay,
}

/// The file that makes a directory an overlay; it holds the path of the disk under it
/// (a tree, an image, or an overlay whose layers it then sees through).
pub const OVERLAY_MARK: &str = "liveupdate-overlay";

/// What `disk` is, or why it is neither.
pub fn kind(disk: &Path) -> Result<Kind, DiskError> {
    let err = |why: String| DiskError::Image {
        path: disk.display().to_string(),
        step: "looking at it",
        why,
    };
    let m = std::fs::metadata(disk).map_err(|e| err(e.to_string()))?;
    if m.is_dir() && disk.join(OVERLAY_MARK).is_file() {
        Ok(Kind::Overlay)
    } else if m.is_dir() {
        Ok(Kind::Tree)
    } else if m.is_file() {
        Ok(Kind::Image)
    } else {
        Err(err(
            "neither a directory nor a file holding a file system image".into(),
        ))
    }
}

/// The file system in `image`, by its superblock's magic: the type mount(2) is told.
fn fs_type(image: &Path) -> Result<&'static str, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).map_err(|e| e.to_string())?;
    let mut at = |offset: u64, len: usize| -> Vec<u8> {
        let mut b = vec![0u8; len];
        match f
            .seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut b))
        {
            Ok(()) => b,
            Err(_) => Vec::new(),
        }
    };
    if at(1024 + 56, 2) == [0x53, 0xef] {
        // ext2 and ext3 too: the ext4 driver mounts them.
        Ok("ext4")
    } else if at(0, 4) == b"XFSB" {
        Ok("xfs")
    } else if at(65536 + 64, 8) == b"_BHRfS_M" {
        Ok("btrfs")
    } else {
        Err("no ext2/3/4, xfs or btrfs superblock in it".into())
    }
}

/// Where [`files`] mounts `image` (a canonical path).
pub fn mount_point(image: &Path) -> PathBuf {
    Path::new(MOUNTS).join(place_name(image))
}

/// Where the processes of a partition on `image` see their root unless told
/// otherwise. Not its mount point: bound onto itself there, the partition's root
/// would look to mcr like the host's mount, not a bind of the partition's own, and a
/// move onto a clone would need the very same files.
pub fn root_point(image: &Path) -> PathBuf {
    Path::new(ROOTS).join(place_name(image))
}

/// `image`'s name, and a hash of its path so that two images of the same name do
/// not meet.
fn place_name(image: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(image.as_os_str().as_encoded_bytes());
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = name.chars().take(64).collect();
    format!("{name}-{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
}

/// Where an image's or an overlay's file system is mounted in our mount namespace,
/// if it is: for an image at its place of [`mount_point`] from a loop device showing
/// it, for an overlay at its `merged` with its `upper`. None for a tree.
pub fn mounted_at(disk: &Path) -> Option<PathBuf> {
    let kind = kind(disk).ok()?;
    let disk = disk.canonicalize().ok()?;
    let at = match kind {
        Kind::Tree => return None,
        Kind::Image => mount_point(&disk),
        Kind::Overlay => disk.join("merged"),
    };
    let mounts = kext_shim::procfs::read_mountinfo(kext_shim::Pid::this()).ok()?;
    let m = mounts
        .iter()
        .rev()
        .find(|m| Path::new(&m.mount_point) == at)?;
    let ours = match kind {
        Kind::Image => {
            kext_shim::loopdev::backing_file(Path::new(&m.source)).as_deref() == Some(&disk)
        }
        _ => {
            let upper = format!("upperdir={}", disk.join("upper").display());
            m.fs_type == "overlay" && m.super_options.split(',').any(|o| o == upper)
        }
    };
    ours.then_some(at)
}

/// The directory `disk`'s files are at: the tree itself, or its image's or overlay's
/// file system, mounted if it is not yet.
pub fn files(disk: &Path) -> Result<PathBuf, DiskError> {
    let kind = kind(disk)?;
    if kind == Kind::Tree {
        return Ok(disk.to_path_buf());
    }
    if let Some(at) = mounted_at(disk) {
        return Ok(at);
    }
    if kind == Kind::Overlay {
        return mount_overlay(disk);
    }
    let (image, err) = located(disk)?;
    let fs = fs_type(&image).map_err(|why| err("reading its superblock", why))?;
    let at = mount_point(&image);
    std::fs::create_dir_all(&at).map_err(|e| err("making its mount point", e.to_string()))?;
    // Something else there (a mount of an image since removed, say): not ours to keep.
    let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
    let dev = kext_shim::loopdev::attach(&image, false)
        .map_err(|e| err("attaching it to a loop device", e.to_string()))?;
    nix::mount::mount(
        Some(&dev.path),
        &at,
        Some(fs),
        nix::mount::MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| {
        err(
            "mounting it",
            format!("{} ({fs}) at {}: {e}", dev.path.display(), at.display()),
        )
    })?;
    // Held by the mount now: the device goes when the mount does.
    drop(dev);
    Ok(at)
}

/// `disk`'s canonical path, and how to say what failed at a step of mounting it.
fn located(
    disk: &Path,
) -> Result<(PathBuf, impl Fn(&'static str, String) -> DiskError + '_), DiskError> {
    let err = move |step: &'static str, why: String| DiskError::Image {
        path: disk.display().to_string(),
        step,
        why,
    };
    let at = disk
        .canonicalize()
        .map_err(|e| err("finding it", e.to_string()))?;
    Ok((at, err))
}

/// The disk overlay `disk` is on, as its mark says.
fn under(disk: &Path) -> Result<PathBuf, DiskError> {
    let (d, err) = located(disk)?;
    let lower = std::fs::read_to_string(d.join(OVERLAY_MARK))
        .map_err(|e| err("reading which disk it is over", e.to_string()))?;
    Ok(PathBuf::from(lower.trim_end_matches('\n')))
}

/// The disks overlay `disk` rests on, nearest first: what must stay (and stay
/// mounted, for an image) while it is used. Nothing for a tree or an image.
pub fn rests_on(disk: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut at = disk.to_path_buf();
    while kind(&at).ok() == Some(Kind::Overlay) {
        let Ok(d) = under(&at) else { break };
        if all.contains(&d) || all.len() > 64 {
            break;
        }
        all.push(d.clone());
        at = d;
    }
    all
}

/// The lower layers of overlay `disk`, top first. An overlay on an overlay takes
/// that one's layer and what is under it, not its mount: stacked mounts stop at a
/// depth of two, a list of layers does not.
fn lower_layers(disk: &Path) -> Result<Vec<PathBuf>, DiskError> {
    let mut layers = Vec::new();
    let mut at = under(disk)?;
    loop {
        match kind(&at)? {
            Kind::Overlay => {
                layers.push(at.canonicalize().unwrap_or(at.clone()).join("upper"));
                at = under(&at)?;
            }
            _ => {
                layers.push(files(&at)?);
                return Ok(layers);
            }
        }
        if layers.len() > 64 {
            return Err(DiskError::Image {
                path: disk.display().to_string(),
                step: "finding its layers",
                why: "more than 64 overlays under it (each live update on it adds one, and \
                      a mount's options hold a page of text, about 64 layers' paths): copy \
                      its files to a directory and start a partition on that"
                    .into(),
            });
        }
    }
}

/// Mounts overlay `disk` at its `merged`.
fn mount_overlay(disk: &Path) -> Result<PathBuf, DiskError> {
    let (d, err) = located(disk)?;
    let lowers = lower_layers(&d)?;
    let (upper, work, merged) = (d.join("upper"), d.join("work"), d.join("merged"));
    for dir in lowers.iter().chain([&upper, &work]) {
        let text = dir.display().to_string();
        // The option string's own separators, which mount(2) does not let us escape.
        if text.contains([',', ':', '\\']) || !dir.is_absolute() {
            return Err(err(
                "mounting it",
                format!("{text}: a path with ',', ':' or '\\' cannot be an overlay's layer"),
            ));
        }
    }
    let shown = |d: &PathBuf| d.display().to_string();
    let options = [
        format!(
            "lowerdir={}",
            lowers.iter().map(shown).collect::<Vec<_>>().join(":")
        ),
        format!("upperdir={}", shown(&upper)),
        format!("workdir={}", shown(&work)),
        // A mirror's lower is another mirror's upper, in use while the workload runs
        // on the first: a kernel whose overlays index by default (overlay.index=Y)
        // refuses that with EBUSY, and the index is no use here (no hard links are
        // copied up apart).
        "index=off".to_string(),
    ];
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOATIME,
        Some(options.join(",").as_str()),
    )
    .map_err(|e| {
        err(
            "mounting it",
            format!("overlay {} at {}: {e}", options.join(","), merged.display()),
        )
    })?;
    Ok(merged)
}

/// Unmounts an image's or overlay's file system from the host, if it is mounted;
/// nothing for a tree. Partitions' namespaces that still bind it keep it until they
/// end.
pub fn release(disk: &Path) -> Result<(), DiskError> {
    let kind = kind(disk)?;
    let Some(at) = mounted_at(disk) else {
        return Ok(());
    };
    nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH).map_err(|e| DiskError::Image {
        path: disk.display().to_string(),
        step: "unmounting it",
        why: format!("{}: {e}", at.display()),
    })?;
    if kind == Kind::Image {
        let _ = std::fs::remove_dir(&at);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Blocks shared with the original until either side writes them.
    Reflink,
    /// An overlay on the original tree: what the clone writes goes to its own layer,
    /// and until then it sees the original's files as they are, written or not.
    Overlay,
    Copy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Reflink => "reflink",
            Method::Overlay => "overlayfs",
            Method::Copy => "copy",
        }
    }
}

/// What a copy of a disk takes: for a tree, the bytes in its regular files and how
/// many files; for an image, the bytes its file holds (holes left out), and 1; for an
/// overlay, what it shows (only its own layer while it is not mounted).
pub fn usage(disk: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    match kind(disk) {
        Ok(Kind::Image) => std::fs::metadata(disk).map_or((0, 0), |m| (m.blocks() * 512, 1)),
        Ok(Kind::Overlay) => tree_usage(&mounted_at(disk).unwrap_or_else(|| disk.join("upper"))),
        _ => tree_usage(disk),
    }
}

fn tree_usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() {
            let (b, n) = tree_usage(&e.path());
            total = (total.0 + b, total.1 + n);
        } else if m.is_file() {
            total = (total.0 + m.len(), total.1 + 1);
        }
    }
    total
}

/// Removes a disk: its image's mount first, then the file or the tree.
pub fn remove(disk: &Path) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Image {
        path: disk.display().to_string(),
        step: "removing it",
        why,
    };
    let removed = match kind(disk) {
        Ok(Kind::Tree) => std::fs::remove_dir_all(disk),
        Ok(Kind::Image) => {
            release(disk)?;
            std::fs::remove_file(disk)
        }
        Ok(Kind::Overlay) => {
            release(disk)?;
            std::fs::remove_dir_all(disk)
        }
        Err(_) if !disk.exists() => Ok(()),
        Err(e) => return Err(e),
    };
    removed.map_err(|e| err(e.to_string()))
}

/// Thaws an image's file system that a clone froze and a crash left frozen: whether
/// it was frozen.
pub fn thaw(disk: &Path) -> Result<bool, DiskError> {
    if kind(disk)? != Kind::Image {
        return Ok(false);
    }
    match mounted_at(disk) {
        Some(at) => kext_shim::loopdev::thaw(&at).map_err(|e| DiskError::Image {
            path: disk.display().to_string(),
            step: "thawing it",
            why: e.to_string(),
        }),
        None => Ok(false),
    }
}

/// How a clone was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloned {
    pub method: Method,
    /// How long the original's file system was frozen for it (an image in use).
    pub frozen: Option<std::time::Duration>,
    /// Why a tree copied was not made an overlay.
    pub no_overlay: Option<String>,
}

/// Clones `from` into `to` (which must not exist). A tree is reflinked where the file
/// system can, else made an overlay on it, else copied; an image is copied (reflinked
/// where it can) into an image file, frozen meanwhile if it is in use; an overlay is
/// cloned as an overlay on the same layers (else copied into a tree, its files as
/// they are now).
pub fn clone(from: &Path, to: &Path) -> Result<Cloned, DiskError> {
    let err = |why: String| DiskError::Clone {
        from: from.display().to_string(),
        to: to.display().to_string(),
        why,
    };
    let kind = kind(from)?;
    if to.exists() {
        return Err(err("the target exists".into()));
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    let gone = || {
        let _ = match kind {
            Kind::Image => std::fs::remove_file(to),
            _ => std::fs::remove_dir_all(to),
        };
    };
    // cp -a of `source` to `to`, blocks shared or not.
    let cp = |source: &Path, reflink: bool| -> Result<(), DiskError> {
        let out = Command::new("cp")
            .args(["-a", "--sparse=always", "--no-target-directory"])
            .arg(if reflink {
                "--reflink=always"
            } else {
                "--reflink=never"
            })
            .arg(source)
            .arg(to)
            .output()
            .map_err(|e| err(format!("running cp: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        gone();
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    };
    let done = |method| Cloned {
        method,
        frozen: None,
        no_overlay: None,
    };
    match kind {
        // Over its layers, flattened: as cheap as the first, at any depth.
        Kind::Overlay => {
            let why = match overlay(from, to) {
                Ok(()) => return Ok(done(Method::Overlay)),
                Err(why) => why,
            };
            let _ = release(to);
            gone();
            let files = files(from)?;
            return cp(&files, false).map(|()| Cloned {
                method: Method::Copy,
                frozen: None,
                no_overlay: Some(why),
            });
        }
        Kind::Tree => {
            if cp(from, true).is_ok() {
                return Ok(done(Method::Reflink));
            }
            let why = match overlay(from, to) {
                Ok(()) => return Ok(done(Method::Overlay)),
                Err(why) => why,
            };
            gone();
            return cp(from, false).map(|()| Cloned {
                method: Method::Copy,
                frozen: None,
                no_overlay: Some(why),
            });
        }
        Kind::Image => {}
    }
    let copy = || {
        cp(from, true)
            .map(|()| Method::Reflink)
            .or_else(|_| cp(from, false).map(|()| Method::Copy))
    };
    let Some(at) = mounted_at(from) else {
        return copy().map(done);
    };
    let frozen = kext_shim::loopdev::freeze(&at).map_err(|e| err(e.to_string()))?;
    let since = std::time::Instant::now();
    let made = crate::fault::point("clone-frozen")
        .map_err(err)
        .and_then(|()| copy());
    let held = since.elapsed();
    if let Err(e) = frozen.thaw() {
        gone();
        return Err(err(format!("the original stays frozen: {e}")));
    }
    made.map(|method| Cloned {
        method,
        frozen: Some(held),
        no_overlay: None,
    })
}

/// How [`clone`] would clone `from` into `dir` now, found out without copying it: a
/// reflink of one of its files (the image itself), then an overlay on it, each made
/// in a scratch directory in `dir` and removed.
pub fn probe(from: &Path, dir: &Path) -> Method {
    let Ok(kind) = kind(from) else {
        return Method::Copy;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return Method::Copy;
    }
    clear_probes(dir);
    let Ok(scratch) = tempfile::Builder::new().prefix(".probe-").tempdir_in(dir) else {
        return Method::Copy;
    };
    let sample = match kind {
        Kind::Image => Some(from.to_path_buf()),
        Kind::Tree => first_file(from),
        // Its clone is an overlay on its layers, or a copy.
        Kind::Overlay => None,
    };
    let reflinks = sample.is_some_and(|f| {
        Command::new("cp")
            .arg("--reflink=always")
            .arg(&f)
            .arg(scratch.path().join("reflink"))
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if reflinks {
        return Method::Reflink;
    }
    if kind != Kind::Image {
        let o = scratch.path().join("overlay");
        let made = overlay(from, &o).is_ok();
        let _ = release(&o);
        if made {
            return Method::Overlay;
        }
    }
    Method::Copy
}

/// What a probe killed half-way left in `dir`: its scratch, perhaps with an overlay
/// mounted.
fn clear_probes(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".probe-") {
            let _ = release(&e.path().join("overlay"));
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A regular file somewhere under `dir`.
fn first_file(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let m = e.path().symlink_metadata().ok()?;
        if m.is_file() {
            return Some(e.path());
        }
        if m.is_dir() {
            if let Some(f) = first_file(&e.path()) {
                return Some(f);
            }
        }
    }
    None
}

/// Makes `at` a mirror of disk `of` (a tree, an image or an overlay): an overlay
/// that shows `of`'s files as they are, written or not, and keeps what is written
/// through it in a layer of its own, so that `of` is left as it was.
pub fn mirror(of: &Path, at: &Path) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Clone {
        from: of.display().to_string(),
        to: at.display().to_string(),
        why,
    };
    if at.exists() {
        return Err(err("the target exists".into()));
    }
    overlay(of, at).map_err(|why| {
        let _ = release(at);
        let _ = std::fs::remove_dir_all(at);
        err(why)
    })
}

/// Whether a mirror of `of` can be made in `dir`: one made in a scratch directory
/// there, mounted, and removed.
pub fn can_mirror(of: &Path, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    clear_probes(dir);
    let scratch = tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(dir)
        .map_err(|e| e.to_string())?;
    let at = scratch.path().join("overlay");
    let made = mirror(of, &at).map_err(|e| e.to_string());
    let _ = release(&at);
    made
}

/// Bytes a second a file is copied into `dir` and made durable, as an overlay copies
/// a file up into its layer there: 16 MiB timed from a file in the page cache.
pub fn copy_rate(dir: &Path) -> Result<f64, String> {
    const SIZE: usize = 16 << 20;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let scratch = tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(dir)
        .map_err(|e| e.to_string())?;
    let (from, to) = (scratch.path().join("from"), scratch.path().join("to"));
    // Not zeros: a file system may store those as holes.
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&from, &data).map_err(|e| e.to_string())?;
    let t = std::time::Instant::now();
    std::fs::copy(&from, &to).map_err(|e| e.to_string())?;
    std::fs::File::open(&to)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    Ok(SIZE as f64 / t.elapsed().as_secs_f64().max(1e-6))
}

/// Makes `to` an overlay on disk `from`, and mounts it once to know it works (the
/// file system under `to` may be one an overlay's upper layer cannot be on).
fn overlay(from: &Path, to: &Path) -> Result<(), String> {
    let lower = from.canonicalize().map_err(|e| e.to_string())?;
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(to.join(d)).map_err(|e| e.to_string())?;
    }
    // The top of the overlay is the original's: its mode and owner.
    let top = files(&lower)
        .and_then(|f| {
            std::fs::metadata(&f).map_err(|e| DiskError::Image {
                path: f.display().to_string(),
                step: "looking at it",
                why: e.to_string(),
            })
        })
        .map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::set_permissions(to.join("upper"), top.permissions()).map_err(|e| e.to_string())?;
        nix::unistd::chown(
            &to.join("upper"),
            Some(nix::unistd::Uid::from_raw(top.uid())),
            Some(nix::unistd::Gid::from_raw(top.gid())),
        )
        .map_err(|e| e.to_string())?;
    }
    std::fs::write(to.join(OVERLAY_MARK), format!("{}\n", lower.display()))
        .map_err(|e| e.to_string())?;
    mount_overlay(to).map(drop).map_err(|e| e.to_string())
}

/// The shared libraries `exe` needs, as `ldd` lists them (absolute paths).
fn libraries(exe: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A small root disk at `dir` for the demo: `exe` (with its libraries) as
/// `/bin/liveupdate`, a /dev/null, and `files` (path inside, content).
pub fn sample(dir: &Path, exe: &Path, files: &[(&str, &str)]) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Sample {
        path: dir.display().to_string(),
        why,
    };
    let put = |from: &Path, inside: &Path| -> Result<(), DiskError> {
        let to = dir.join(inside.strip_prefix("/").unwrap_or(inside));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| err(e.to_string()))?;
        }
        std::fs::copy(from, &to)
            .map(drop)
            .map_err(|e| err(format!("{}: {e}", from.display())))
    };
    for d in ["bin", "dev", "etc", "tmp", "var/log", "proc"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| err(e.to_string()))?;
    }
    put(exe, Path::new("/bin/liveupdate"))?;
    for lib in libraries(exe).map_err(err)? {
        put(&lib, &lib)?;
    }
    let null = dir.join("dev/null");
    if !null.exists() {
        nix::sys::stat::mknod(
            &null,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .map_err(|e| err(format!("mknod dev/null: {e}")))?;
    }
    for (inside, content) in files {
        let to = dir.join(inside.trim_start_matches('/'));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| err(e.to_string()))?;
        }
        std::fs::write(&to, content).map_err(|e| err(format!("{inside}: {e}")))?;
    }
    Ok(())
}

/// The sample disk as an image at `image` (which must not exist): the tree
/// [`sample`] makes, in an ext4 file system with room to spare, made by mkfs.ext4.
pub fn sample_image(image: &Path, exe: &Path, files: &[(&str, &str)]) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Sample {
        path: image.display().to_string(),
        why,
    };
    if image.exists() {
        return Err(err("exists already".into()));
    }
    let tmp = tempfile::tempdir().map_err(|e| err(format!("a scratch directory: {e}")))?;
    let tree = tmp.path().join("tree");
    sample(&tree, exe, files)?;
    let (bytes, files) = tree_usage(&tree);
    // Twice the files, for a fix's new ones and the metadata, and 16 MiB.
    let mib = (2 * bytes + files * 4096) / (1 << 20) + 16;
    if let Some(p) = image.parent() {
        std::fs::create_dir_all(p).map_err(|e| err(e.to_string()))?;
    }
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(image)
        .arg(format!("{mib}M"))
        .output()
        .map_err(|e| err(format!("running mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(err(format!(
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_clones_mounts_and_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        // Any program will do as the sample's liveupdate.
        sample_image(&img, Path::new("/bin/true"), &[("/etc/greeting", "hi\n")]).unwrap();
        assert_eq!(kind(&img).unwrap(), Kind::Image);
        assert!(sample_image(&img, Path::new("/bin/true"), &[]).is_err());
        let copy = dir.path().join("clones/root-1.img");
        // A failed assertion below must not leave the mounts (and devices) behind.
        struct Release<'a>(&'a Path, &'a Path);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let _ = release(self.0);
                let _ = release(self.1);
            }
        }
        let _release = Release(&img, &copy);
        let at = files(&img).unwrap();
        assert_eq!(files(&img).unwrap(), at, "mounted once");
        assert_eq!(
            std::fs::read_to_string(at.join("etc/greeting")).unwrap(),
            "hi\n"
        );
        // In use: cloned frozen, and the clone is a file system of its own.
        let c = clone(&img, &copy).unwrap();
        assert!(c.frozen.is_some(), "{c:?}");
        assert!(!kext_shim::loopdev::thaw(&at).unwrap(), "left frozen");
        let at2 = files(&copy).unwrap();
        assert_ne!(at2, at);
        std::fs::write(at2.join("etc/greeting"), "changed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(at.join("etc/greeting")).unwrap(),
            "hi\n"
        );
        remove(&copy).unwrap();
        assert!(!copy.exists() && !at2.exists());
        release(&img).unwrap();
        assert_eq!(mounted_at(&img), None);
        release(&img).unwrap();
        // Not in use: copied as it is.
        let c = clone(&img, &copy).unwrap();
        assert_eq!(c.frozen, None);
        remove(&copy).unwrap();
    }

    /// A tree on a file system without reflinks (ext4, tmpfs) is cloned as an overlay:
    /// at once, seeing the original's writes until it writes the file itself.
    #[test]
    fn a_tree_is_cloned_as_an_overlay_that_sees_the_original_until_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("root");
        sample(&tree, Path::new("/bin/true"), &[("/etc/greeting", "hi\n")]).unwrap();
        let copy = dir.path().join("clones/root-1");
        struct Release<'a>(&'a Path);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let _ = release(self.0);
            }
        }
        let _release = Release(&copy);
        let c = clone(&tree, &copy).unwrap();
        if c.method == Method::Reflink {
            // This file system shares blocks: no overlay to test here.
            return;
        }
        assert_eq!(c.method, Method::Overlay, "{c:?}");
        assert_eq!(probe(&tree, &dir.path().join("clones")), Method::Overlay);
        assert_eq!(
            std::fs::read_dir(dir.path().join("clones"))
                .unwrap()
                .count(),
            1,
            "the probe left something"
        );
        assert_eq!(kind(&copy).unwrap(), Kind::Overlay);
        let at = files(&copy).unwrap();
        assert_eq!(mounted_at(&copy).as_deref(), Some(at.as_path()));
        let greeting = |root: &Path| std::fs::read_to_string(root.join("etc/greeting")).unwrap();
        assert_eq!(greeting(&at), "hi\n");
        std::fs::write(tree.join("etc/greeting"), "written by the original\n").unwrap();
        assert_eq!(greeting(&at), "written by the original\n");
        std::fs::write(at.join("etc/greeting"), "the clone's\n").unwrap();
        assert_eq!(greeting(&tree), "written by the original\n");
        assert_eq!(greeting(&at), "the clone's\n");
        assert_eq!(
            tree_usage(&copy.join("upper")).1,
            1,
            "only the file it wrote is its own"
        );
        // Released, it mounts again from what it keeps; cloned, it is an overlay on
        // both layers, which sees what the first had written.
        release(&copy).unwrap();
        assert_eq!(mounted_at(&copy), None);
        assert_eq!(greeting(&files(&copy).unwrap()), "the clone's\n");
        let second = dir.path().join("clones/root-2");
        assert_eq!(probe(&copy, &dir.path().join("clones")), Method::Overlay);
        assert_eq!(clone(&copy, &second).unwrap().method, Method::Overlay);
        assert_eq!(kind(&second).unwrap(), Kind::Overlay);
        assert_eq!(greeting(&files(&second).unwrap()), "the clone's\n");
        remove(&second).unwrap();
        remove(&copy).unwrap();
        assert!(!copy.exists());
    }

    /// A mirror of an image shows what is written to the image, keeps what is written
    /// through it to itself, and a mirror of that mirror sees both through one overlay
    /// (its layers listed, not its mount stacked).
    #[test]
    fn a_mirror_shows_its_originals_writes_and_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        sample_image(&img, Path::new("/bin/true"), &[("/etc/greeting", "hi\n")]).unwrap();
        let img = img.canonicalize().unwrap();
        let (m1, m2) = (dir.path().join("mirror/1"), dir.path().join("mirror/2"));
        struct Release(Vec<PathBuf>);
        impl Drop for Release {
            fn drop(&mut self) {
                for d in &self.0 {
                    let _ = release(d);
                }
            }
        }
        let _release = Release(vec![m2.clone(), m1.clone(), img.clone()]);
        assert!(can_mirror(&img, &dir.path().join("mirror")).is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path().join("mirror"))
                .unwrap()
                .count(),
            0,
            "the probe left something"
        );
        mirror(&img, &m1).unwrap();
        assert!(mirror(&img, &m1).is_err(), "made twice");
        assert_eq!(kind(&m1).unwrap(), Kind::Overlay);
        assert_eq!(rests_on(&m1), vec![img.clone()]);
        let (o, a) = (files(&img).unwrap(), files(&m1).unwrap());
        let read = |root: &Path, f: &str| std::fs::read_to_string(root.join(f)).ok();
        std::fs::write(o.join("etc/greeting"), "written by the original\n").unwrap();
        std::fs::write(o.join("tmp/new"), "made by the original\n").unwrap();
        assert_eq!(
            read(&a, "etc/greeting").unwrap(),
            "written by the original\n"
        );
        assert_eq!(read(&a, "tmp/new").unwrap(), "made by the original\n");
        std::fs::write(a.join("tmp/mirrors"), "the mirror's\n").unwrap();
        assert_eq!(
            read(&o, "tmp/mirrors"),
            None,
            "the original is left as it was"
        );

        mirror(&m1, &m2).unwrap();
        assert_eq!(rests_on(&m2), vec![m1.canonicalize().unwrap(), img.clone()]);
        let b = files(&m2).unwrap();
        assert_eq!(read(&b, "tmp/mirrors").unwrap(), "the mirror's\n");
        assert_eq!(read(&b, "tmp/new").unwrap(), "made by the original\n");
        let mounts = kext_shim::procfs::read_mountinfo(kext_shim::Pid::this()).unwrap();
        let m = mounts
            .iter()
            .find(|m| Path::new(&m.mount_point) == b)
            .expect("mounted");
        let lower = format!(
            "lowerdir={}:{}",
            m1.canonicalize().unwrap().join("upper").display(),
            o.display()
        );
        assert!(
            m.super_options.split(',').any(|x| x == lower),
            "{}",
            m.super_options
        );
        for d in [&m2, &m1] {
            remove(d).unwrap();
            assert!(!d.exists());
        }
        release(&img).unwrap();
        assert_eq!(mounted_at(&img), None);
    }

    #[test]
    fn what_is_no_disk_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.img");
        std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
        let e = files(&junk).unwrap_err().to_string();
        assert!(e.contains("no ext2/3/4, xfs or btrfs superblock"), "{e}");
        assert!(kind(&dir.path().join("none")).is_err());
        assert!(kind(Path::new("/dev/null"))
            .unwrap_err()
            .to_string()
            .contains("neither a directory"));
    }
}
