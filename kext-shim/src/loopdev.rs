//! Loop devices and file system freezing: what a partition's image disk needs.
//!
//! An image disk is a file holding a file system. A loop device shows it as a block
//! device, which can then be mounted. The device is attached with autoclear, so it
//! lets go of the image by itself once its last user (the mount) goes: a crash
//! between attach and mount, or a mount never unmounted by hand, leaves no device
//! behind for anyone to clean.
//!
//! Freezing a mounted file system flushes it and holds every writer until it is
//! thawed: its image is then consistent, and can be copied while the workload runs.

use crate::{check, Errno, Error, Result, SysError};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

// include/uapi/linux/loop.h
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
// include/uapi/linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop device showing an image, held open: with autoclear it would let go of the
/// image at once if nothing else held it, so mount it before dropping this.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    fd: OwnedFd,
}

impl AsRawFd for LoopDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn open(path: &Path, write: bool) -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(path.display().to_string(), e))
}

/// Attaches `image` to a free loop device, with autoclear.
pub fn attach(image: &Path, read_only: bool) -> Result<LoopDevice> {
    let ctl = open(Path::new("/dev/loop-control"), true)?;
    let file = open(image, !read_only)?;
    let mut info = LoopInfo64 {
        device: 0,
        inode: 0,
        rdevice: 0,
        offset: 0,
        sizelimit: 0,
        number: 0,
        encrypt_type: 0,
        encrypt_key_size: 0,
        flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
        file_name: [0; LO_NAME_SIZE],
        crypt_name: [0; LO_NAME_SIZE],
        encrypt_key: [0; 32],
        init: [0; 2],
    };
    // Only a label for tools (the kernel keeps the real path for backing_file): its
    // last 63 bytes, which name the file.
    let name = image.as_os_str().as_encoded_bytes();
    let tail = &name[name.len().saturating_sub(LO_NAME_SIZE - 1)..];
    info.file_name[..tail.len()].copy_from_slice(tail);
    let config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // Another attach may take the device we were told is free between the two
    // calls: then the next one.
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        let n = check(n as libc::c_long, || "ioctl(LOOP_CTL_GET_FREE)".into())?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let fd = open(&path, true)?;
        // SAFETY: the argument is a whole loop_config, only read by the call; the fd
        // in it stays open until the call returns (the device takes its own reference).
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r == 0 {
            return Ok(LoopDevice { path, fd });
        }
        let errno = Errno::last();
        if errno != Errno::EBUSY {
            return Err(SysError::new(
                format!(
                    "ioctl(LOOP_CONFIGURE) of {} with {}",
                    path.display(),
                    image.display()
                ),
                errno,
            )
            .into());
        }
    }
    Err(Error::Unexpected {
        pid: std::process::id() as i32,
        what: format!(
            "attaching {}: every free loop device was taken first",
            image.display()
        ),
    })
}

/// The file loop device `device` (`/dev/loopN`) shows, if it shows one. A file
/// removed since ends in ` (deleted)`.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// A file system frozen: every write to it waits until this is dropped.
#[derive(Debug)]
pub struct Frozen {
    dir: std::fs::File,
    path: PathBuf,
    thawed: bool,
}

/// Freezes the file system mounted at `dir`, after flushing it to its device.
pub fn freeze(dir: &Path) -> Result<Frozen> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    // SAFETY: FIFREEZE takes no pointer (its int argument is unused).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) };
    check(r as libc::c_long, || {
        format!("ioctl(FIFREEZE) of {}", dir.display())
    })?;
    Ok(Frozen {
        dir: f,
        path: dir.to_path_buf(),
        thawed: false,
    })
}

fn thaw_fd(f: &std::fs::File) -> std::result::Result<bool, Errno> {
    // SAFETY: FITHAW takes no pointer (its int argument is unused).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FITHAW as _, 0) };
    match r {
        0 => Ok(true),
        // Not frozen.
        _ if Errno::last() == Errno::EINVAL => Ok(false),
        _ => Err(Errno::last()),
    }
}

impl Frozen {
    /// Thaws it, saying so if it fails (dropping it thaws it too, silently).
    pub fn thaw(mut self) -> Result<()> {
        // Once, whatever it returns: a second thaw could undo someone else's freeze.
        self.thawed = true;
        thaw_fd(&self.dir).map(drop).map_err(|errno| {
            SysError::new(format!("ioctl(FITHAW) of {}", self.path.display()), errno).into()
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = thaw_fd(&self.dir);
        }
    }
}

/// Thaws the file system at `dir` if it is frozen (whoever froze it died before
/// thawing it): whether it was.
pub fn thaw(dir: &Path) -> Result<bool> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    thaw_fd(&f)
        .map_err(|errno| SysError::new(format!("ioctl(FITHAW) of {}", dir.display()), errno).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, MsFlags};

    /// An ext4 image with one file in it, made by mkfs.ext4.
    fn image(dir: &Path) -> PathBuf {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "from the image\n").unwrap();
        let img = dir.join("disk.img");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("16M")
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
        img
    }

    fn wait_detached(dev: &Path, img: &Path) {
        let t = std::time::Instant::now();
        while backing_file(dev).is_some_and(|b| b == img) {
            assert!(
                t.elapsed().as_secs() < 10,
                "{} kept {}",
                dev.display(),
                img.display()
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn an_image_mounts_freezes_thaws_and_its_device_goes_with_the_mount() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path()).canonicalize().unwrap();
        let at = dir.path().join("mnt");
        std::fs::create_dir(&at).unwrap();
        let dev = attach(&img, false).unwrap();
        assert_eq!(backing_file(&dev.path).as_deref(), Some(img.as_path()));
        // A failed assertion below must not leave the mount (and its device) behind.
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&at);
        mount(
            Some(&dev.path),
            &at,
            Some("ext4"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let path = dev.path.clone();
        drop(dev);
        assert_eq!(
            std::fs::read_to_string(at.join("etc/hello")).unwrap(),
            "from the image\n"
        );
        let frozen = freeze(&at).unwrap();
        // Frozen already: a second freeze is refused, and nothing of ours thawed it.
        assert_eq!(freeze(&at).unwrap_err().errno(), Some(Errno::EBUSY));
        frozen.thaw().unwrap();
        assert!(!thaw(&at).unwrap(), "thawed twice");
        // A freeze whose maker is gone (a crash) is undone by a thaw of the place.
        let st = std::process::Command::new("fsfreeze")
            .arg("--freeze")
            .arg(&at)
            .status()
            .expect("fsfreeze");
        assert!(st.success());
        assert!(thaw(&at).unwrap());
        std::fs::write(at.join("etc/after"), "written after the thaw").unwrap();
        // Lazily: a child another test's thread forks holds our fds until it execs.
        nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH).unwrap();
        wait_detached(&path, &img);
    }

    #[test]
    fn a_device_not_mounted_lets_go_of_its_image_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path()).canonicalize().unwrap();
        let dev = attach(&img, true).unwrap();
        let path = dev.path.clone();
        drop(dev);
        wait_detached(&path, &img);
    }

    #[test]
    fn a_missing_image_names_itself() {
        let e = attach(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    }
}
