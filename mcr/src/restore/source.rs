//! Pages left in the source's memory: a same-host migration's pre-copy rounds record
//! where the pages are, and the destination reads them from the running source itself
//! (see [`crate::model::PagesInSource`]): one copy of each page instead of a copy into
//! staging and another out of it, and no staging memory to allocate.
//!
//! A run may be gone by the time it is read (unmapped or moved since the round): the
//! next round says what is there now (see `warm::update`). Anything else (another
//! process at the pid, a dead source, another boot) is an error.

use super::{RestoreError, Result};
use crate::image::Image;
use crate::model::SourceProcess;
use kext_shim::mem::{read_remote, read_remote_ranges, ProcMem};
use kext_shim::{procfs, Errno, Pid};
use std::os::fd::OwnedFd;

/// One source process, checked to be the one the image names.
pub struct SourceMemory {
    pid: Pid,
    /// Held so that its end shows, whatever the pid becomes afterwards.
    pidfd: OwnedFd,
    /// For pages process_vm_readv may not read (protected since), opened at the first.
    mem: std::sync::OnceLock<std::result::Result<ProcMem, String>>,
    image: String,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Whole,
    /// Not mapped in the source any more.
    Gone,
}

fn stale(image: &Image, pid: i32, why: String) -> RestoreError {
    RestoreError::Incompatible {
        pid,
        what: format!(
            "image {} leaves its pages in the source's memory, but {why}",
            image.dir.display()
        ),
    }
}

impl SourceMemory {
    /// The process whose memory holds the pages `owner` has in `image`, or None if the
    /// image holds them itself.
    pub fn of(image: &Image, owner: i32) -> Result<Option<SourceMemory>> {
        let Some(at) = &image.snapshot.inventory.pages_in_source else {
            return Ok(None);
        };
        if at.boot_id != procfs::boot_id() {
            return Err(stale(image, owner, "it was made on another boot".into()));
        }
        let Some(&SourceProcess {
            host_pid, start, ..
        }) = at.procs.iter().find(|p| p.pid == owner)
        else {
            return Err(stale(image, owner, format!("it names no process {owner}")));
        };
        let pid = Pid::from_raw(host_pid);
        let pidfd = kext_shim::pidfd::pidfd_open(pid)
            .map_err(|e| stale(image, owner, format!("pid {host_pid}: {e}")))?;
        // Checked after the pidfd is taken: the pid cannot change hands in between.
        let now = procfs::Stat::read(pid).map(|s| s.field(22)).ok();
        if now != Some(start) {
            return Err(stale(
                image,
                owner,
                format!("pid {host_pid} is no longer the process it was made of"),
            ));
        }
        Ok(Some(SourceMemory {
            pid,
            pidfd,
            mem: std::sync::OnceLock::new(),
            image: image.dir.display().to_string(),
        }))
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<Read> {
        let raw = self.pid.as_raw();
        let Err(e) = read_remote(self.pid, addr, buf) else {
            return Ok(Read::Whole);
        };
        if e.errno() == Some(Errno::ESRCH) {
            return Err(self.ended());
        }
        // Unreadable to process_vm_readv: protected since, or unmapped. /proc/PID/mem
        // reads through protections.
        let mem = match self
            .mem
            .get_or_init(|| ProcMem::open(self.pid).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(_) if kext_shim::pidfd::exited(&self.pidfd) => return Err(self.ended()),
            Err(why) => {
                return Err(RestoreError::Incompatible {
                    pid: raw,
                    what: format!(
                        "reading its pages at {addr:#x} (image {}): {why}",
                        self.image
                    ),
                })
            }
        };
        match mem.read(addr, buf) {
            Ok(()) => Ok(Read::Whole),
            Err(_) if !kext_shim::pidfd::exited(&self.pidfd) => Ok(Read::Gone),
            Err(_) => Err(self.ended()),
        }
    }

    /// Reads each (address, length) run into `buf`, one after the other, in a few
    /// calls; false if one of them could not be read (see [`Self::read`] for which).
    pub fn read_many(&self, runs: &[(u64, usize)], buf: &mut [u8]) -> Result<bool> {
        match read_remote_ranges(self.pid, runs, buf) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ESRCH) => Err(self.ended()),
            Err(_) => Ok(false),
        }
    }

    /// Confirms that what was read came from the process the image names: it has not
    /// ended (a pid is reused only after its end).
    pub fn confirm(&self) -> Result<()> {
        if kext_shim::pidfd::exited(&self.pidfd) {
            return Err(self.ended());
        }
        Ok(())
    }

    fn ended(&self) -> RestoreError {
        RestoreError::Incompatible {
            pid: self.pid.as_raw(),
            what: format!(
                "the source process ended while its pages (image {}) were read",
                self.image
            ),
        }
    }
}
