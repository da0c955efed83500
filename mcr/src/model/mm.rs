//! An address space: its VMAs, the mm fields the kernel keeps about it, and where its
//! pages went in the image.

use super::FileRef;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmImage {
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    /// The auxiliary vector, as (type, value) words ending with AT_NULL.
    pub auxv: Vec<u64>,
    pub exe: FileRef,
    /// Files backing mappings; `VmaKind::File` indexes into this table.
    pub files: Vec<FileRef>,
    /// Set when the pages of some VMAs that were not written since the parent image was
    /// taken are in the parent image only.
    pub parent: Option<ParentPages>,
}

/// Ranges (whole VMAs) of an address space whose pages missing from this image are the
/// parent image's, owned there by process `pid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentPages {
    pub pid: i32,
    /// Sorted, disjoint `[start, end)` ranges.
    pub ranges: Vec<(u64, u64)>,
}

/// The fields PR_SET_MM_MAP sets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub shared: bool,
    pub kind: VmaKind,
    /// Offset into the backing file, in bytes.
    pub offset: u64,
    /// Advice and flags to re-apply (MADV_* semantics).
    pub advice: VmaAdvice,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn writable(&self) -> bool {
        self.prot & libc::PROT_WRITE != 0
    }

    /// Private anonymous memory: the only kind whose every change a write tracker sees,
    /// and so the only kind a warm restore keeps from one round to the next. Shared
    /// memory is copied whole, and so are private file mappings (their copied-on-write
    /// pages): MADV_DONTNEED there brings the file's bytes back without a write, and
    /// the kernel keeps such pages marked as protected.
    pub fn private_anonymous(&self) -> bool {
        !self.shared && self.kind == VmaKind::Anonymous
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private anonymous memory (including `[heap]` and `[stack]`, told by the mm fields).
    Anonymous,
    /// MAP_SHARED|MAP_ANONYMOUS memory: a shmem object that nothing names, maybe shared
    /// with other processes of the tree; `shmem` is its inode (see `Snapshot::shmem`).
    SharedAnonymous {
        shmem: u64,
    },
    /// A mapping of a memfd (see `Snapshot::shmem`, which holds its pages).
    Memfd {
        ino: u64,
    },
    /// An attached SysV shared memory segment of the tree's ipc namespace (see
    /// `Snapshot::shmem`, which holds its pages).
    SysvShm {
        id: i32,
    },
    /// A file mapping; the index is into `MmImage::files`.
    File(u32),
    Vdso,
    Vvar,
    VvarVclock,
}

/// VmFlags worth carrying over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmaAdvice {
    pub grows_down: bool,
    pub hugepage: bool,
    pub no_hugepage: bool,
    pub dont_dump: bool,
    pub dont_fork: bool,
    pub wipe_on_fork: bool,
    pub mergeable: bool,
}

/// A shared anonymous memory object: its pages are stored once, whoever maps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmemObject {
    pub ino: u64,
    pub size: u64,
    /// Set when the object is a memfd rather than anonymous shared memory.
    pub memfd: Option<Memfd>,
    /// Set when it is a SysV shared memory segment (`ino` is then its id).
    pub sysv: Option<SysvPerm>,
}

/// A SysV IPC object's key, id, owner and mode (SHM_DEST and SHM_LOCKED kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvPerm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// What makes a memfd one: its name and its seals (F_SEAL_*).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memfd {
    pub name: String,
    pub seals: u32,
}
