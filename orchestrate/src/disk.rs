//! Root disks: clones for the surrogate, and the sample disk of the demo.
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
}

/// What `disk` is, or why it is neither.
pub fn kind(disk: &Path) -> Result<Kind, DiskError> {
    let err = |why: String| DiskError::Image {
        path: disk.display().to_string(),
        step: "looking at it",
        why,
    };
    let m = std::fs::metadata(disk).map_err(|e| err(e.to_string()))?;
    if m.is_dir() {
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

/// Where `image`'s file system is mounted in our mount namespace, if it is (at its
/// place of [`mount_point`], from a loop device showing it).
pub fn mounted_at(image: &Path) -> Option<PathBuf> {
    let image = image.canonicalize().ok()?;
    let at = mount_point(&image);
    let mounts = kext_shim::procfs::read_mountinfo(kext_shim::Pid::this()).ok()?;
    mounts
        .iter()
        .rev()
        .find(|m| Path::new(&m.mount_point) == at)
        .filter(|m| {
            kext_shim::loopdev::backing_file(Path::new(&m.source)).as_deref()
                == Some(image.as_path())
        })
        .map(|_| at)
}

/// The directory `disk`'s files are at: the tree itself, or its image's file system,
/// mounted if it is not yet.
pub fn files(disk: &Path) -> Result<PathBuf, DiskError> {
    if kind(disk)? == Kind::Tree {
        return Ok(disk.to_path_buf());
    }
    if let Some(at) = mounted_at(disk) {
        return Ok(at);
    }
    let err = |step: &'static str, why: String| DiskError::Image {
        path: disk.display().to_string(),
        step,
        why,
    };
    let image = disk
        .canonicalize()
        .map_err(|e| err("finding it", e.to_string()))?;
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

/// Unmounts an image's file system from the host, if it is mounted; nothing for a
/// tree. Partitions' namespaces that still bind it keep it until they end.
pub fn release(disk: &Path) -> Result<(), DiskError> {
    if kind(disk)? == Kind::Tree {
        return Ok(());
    }
    let Some(at) = mounted_at(disk) else {
        return Ok(());
    };
    nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH).map_err(|e| DiskError::Image {
        path: disk.display().to_string(),
        step: "unmounting it",
        why: format!("{}: {e}", at.display()),
    })?;
    let _ = std::fs::remove_dir(&at);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Blocks shared with the original until either side writes them.
    Reflink,
    Copy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Reflink => "reflink",
            Method::Copy => "copy",
        }
    }
}

/// What a disk takes: for a tree, the bytes in its regular files and how many files;
/// for an image, the bytes its file holds (holes left out), and 1.
pub fn usage(disk: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(disk) {
        Ok(m) if m.is_file() => (m.blocks() * 512, 1),
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
        Err(_) if !disk.exists() => Ok(()),
        Err(e) => return Err(e),
    };
    removed.map_err(|e| err(e.to_string()))
}

/// Thaws an image's file system that a clone froze and a crash left frozen: whether
/// it was frozen.
pub fn thaw(disk: &Path) -> Result<bool, DiskError> {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cloned {
    pub method: Method,
    /// How long the original's file system was frozen for it (an image in use).
    pub frozen: Option<std::time::Duration>,
}

/// Clones `from` into `to` (which must not exist): a tree into a tree, an image into
/// an image file.
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
            Kind::Tree => std::fs::remove_dir_all(to),
            Kind::Image => std::fs::remove_file(to),
        };
    };
    let copy = || -> Result<Method, DiskError> {
        for (method, flag) in [
            (Method::Reflink, "--reflink=always"),
            (Method::Copy, "--reflink=never"),
        ] {
            let out = Command::new("cp")
                .args(["-a", "--sparse=always", "--no-target-directory", flag])
                .arg(from)
                .arg(to)
                .output()
                .map_err(|e| err(format!("running cp: {e}")))?;
            if out.status.success() {
                return Ok(method);
            }
            gone();
            if method == Method::Copy {
                return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
        }
        unreachable!("the copy either succeeds or is an error")
    };
    let Some(at) = mounted_at(from) else {
        return copy().map(|method| Cloned {
            method,
            frozen: None,
        });
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
    })
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
