//! SysV IPC objects (shared memory, semaphore sets, message queues) of another
//! process's ipc namespace: read whole, and made again with the same ids in a new one.
//!
//! Every call runs on a short-lived thread that joined the namespace (see
//! `clone::in_namespace_of`): the objects, /proc/sysvipc and the ipc sysctls a thread
//! sees are those of its own ipc namespace.

use crate::clone::in_namespace_of;
use crate::{check, Error, Pid, Result};

/// Who owns an object and who may use it. `mode` keeps SHM_DEST and SHM_LOCKED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// Marked for removal (IPC_RMID) while still attached.
pub const SHM_DEST: u32 = 0o1000;
pub const SHM_LOCKED: u32 = 0o2000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shm {
    pub perm: Perm,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sem {
    pub perm: Perm,
    pub values: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub perm: Perm,
    pub qbytes: u64,
    /// (mtype, text), oldest first.
    pub messages: Vec<(i64, Vec<u8>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    pub shm: Vec<Shm>,
    pub sem: Vec<Sem>,
    pub msg: Vec<Msg>,
    /// The namespace's limits (`kernel.shmmax`, `kernel.msgmnb`, `kernel.sem`, ...),
    /// as (name under /proc/sys/kernel, value).
    pub limits: Vec<(String, String)>,
}

/// Not shm_rmid_forced: set, it would destroy the segments made here, still attached
/// by no one, as soon as the thread that made them ends.
const LIMITS: &[&str] = &[
    "shmmax", "shmall", "shmmni", "msgmax", "msgmnb", "msgmni", "sem",
];

fn perm_of(p: &libc::ipc_perm, id: i32) -> Perm {
    Perm {
        key: p.__key,
        id,
        uid: p.uid,
        gid: p.gid,
        mode: p.mode as u32,
    }
}

/// The ids listed in /proc/sysvipc/`kind` (second column).
fn ids(kind: &str) -> Result<Vec<i32>> {
    let path = format!("/proc/sysvipc/{kind}");
    let t = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    t.lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Parse {
                    path: path.clone(),
                    what: "sysvipc id",
                    line: l.to_string(),
                })
        })
        .collect()
}

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/kernel/{name}")
}

/// Reads every object of the ipc namespace of `pid`. `shm_data` gets each segment's
/// bytes (attached read-only for the call) with its index in `Objects::shm`.
pub fn read(
    pid: Pid,
    mut shm_data: impl FnMut(usize, &[u8]) -> Result<()> + Send,
) -> Result<Objects> {
    in_namespace_of(pid, "ipc", libc::CLONE_NEWIPC, move || {
        let mut out = Objects::default();
        for name in LIMITS {
            let p = sysctl_path(name);
            let v = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            out.limits.push((name.to_string(), v.trim().to_string()));
        }
        for id in ids("shm")? {
            // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
            let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: `ds` outlives the call.
            let r = unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) };
            check(r as libc::c_long, || {
                format!("shmctl(IPC_STAT) of segment {id}")
            })?;
            let shm = Shm {
                perm: perm_of(&ds.shm_perm, id),
                size: ds.shm_segsz as u64,
            };
            let n = out.shm.len();
            with_attached(id, true, |at| {
                // SAFETY: the segment is attached read-only at `at` for `size` bytes
                // during this call, and only read.
                let bytes = unsafe { std::slice::from_raw_parts(at, shm.size as usize) };
                shm_data(n, bytes)
            })?;
            out.shm.push(shm);
        }
        for id in ids("sem")? {
            // SAFETY: semid_ds is plain data; IPC_STAT fills it.
            let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: the variadic argument is the `struct semid_ds *` IPC_STAT wants.
            let r = unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) };
            check(r as libc::c_long, || {
                format!("semctl(IPC_STAT) of set {id}")
            })?;
            let mut values = vec![0u16; ds.sem_nsems as usize];
            // SAFETY: GETALL writes sem_nsems shorts into `values`.
            let r = unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) };
            check(r as libc::c_long, || format!("semctl(GETALL) of set {id}"))?;
            out.sem.push(Sem {
                perm: perm_of(&ds.sem_perm, id),
                values,
            });
        }
        let msgmax: usize = out
            .limits
            .iter()
            .find(|(k, _)| k == "msgmax")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(8192);
        for id in ids("msg")? {
            // SAFETY: msqid_ds is plain data; IPC_STAT fills it.
            let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: `ds` outlives the call.
            let r = unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) };
            check(r as libc::c_long, || {
                format!("msgctl(IPC_STAT) of queue {id}")
            })?;
            let mut messages = Vec::new();
            let mut buf = vec![0u8; 8 + msgmax];
            for i in 0..ds.msg_qnum as i64 {
                // MSG_COPY reads message number i and leaves the queue as it is.
                // SAFETY: `buf` holds a long and msgmax bytes of text, as told.
                let n = unsafe {
                    libc::msgrcv(
                        id,
                        buf.as_mut_ptr().cast(),
                        msgmax,
                        i,
                        libc::IPC_NOWAIT | libc::MSG_COPY,
                    )
                };
                check(n as libc::c_long, || {
                    format!("msgrcv(MSG_COPY) of message {i} of queue {id}")
                })?;
                let mtype = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
                messages.push((mtype, buf[8..8 + n as usize].to_vec()));
            }
            out.msg.push(Msg {
                perm: perm_of(&ds.msg_perm, id),
                qbytes: ds.msg_qbytes as u64,
                messages,
            });
        }
        Ok(out)
    })
}

/// Runs `f` with the address segment `id` is attached at, in this process, for the call.
fn with_attached<T>(id: i32, readonly: bool, f: impl FnOnce(*mut u8) -> Result<T>) -> Result<T> {
    let flags = if readonly { libc::SHM_RDONLY } else { 0 };
    // SAFETY: attaching at an address the kernel picks touches none of our memory.
    let at = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    if at as isize == -1 {
        return Err(
            crate::SysError::new(format!("shmat of segment {id}"), crate::Errno::last()).into(),
        );
    }
    let r = f(at.cast());
    // SAFETY: `at` is the address shmat returned; `f`, the only user, has returned.
    unsafe { libc::shmdt(at) };
    r
}

/// Sets the id the next object of `kind` gets (`shm`, `sem`, `msg`).
fn next_id(kind: &str, id: i32) -> Result<()> {
    let p = sysctl_path(&format!("{kind}_next_id"));
    std::fs::write(&p, id.to_string()).map_err(|e| Error::io(&p, e))
}

fn expect_id(what: &str, want: i32, got: libc::c_int) -> Result<()> {
    check(got as libc::c_long, || format!("{what} for id {want}"))?;
    if got != want {
        return Err(Error::Unexpected {
            pid: 0,
            what: format!("{what} made id {got}, not {want}"),
        });
    }
    Ok(())
}

fn set_perm(p: &mut libc::ipc_perm, perm: &Perm) {
    p.uid = perm.uid;
    p.gid = perm.gid;
    p.mode = (perm.mode & 0o777) as libc::c_ushort;
}

/// Makes `objects` again, ids and all, in the (new, empty) ipc namespace of `pid`.
/// `shm_data` fills each segment, by index. Segments that were marked for removal are
/// not removed yet: see [`remove_marked`].
pub fn create(
    pid: Pid,
    objects: &Objects,
    mut shm_data: impl FnMut(usize, &mut [u8]) -> Result<()> + Send,
) -> Result<()> {
    in_namespace_of(pid, "ipc", libc::CLONE_NEWIPC, move || {
        for (name, v) in &objects.limits {
            let p = sysctl_path(name);
            std::fs::write(&p, v).map_err(|e| Error::io(&p, e))?;
        }
        for (i, s) in objects.shm.iter().enumerate() {
            let p = &s.perm;
            next_id("shm", p.id)?;
            // SAFETY: shmget takes no pointers.
            let id = unsafe {
                libc::shmget(
                    p.key,
                    s.size as usize,
                    (p.mode & 0o777) as i32 | libc::IPC_CREAT | libc::IPC_EXCL,
                )
            };
            expect_id("shmget", p.id, id)?;
            with_attached(id, false, |at| {
                // SAFETY: the new segment is attached writable at `at` for `size` bytes
                // during this call, and nothing else refers to that mapping.
                let bytes = unsafe { std::slice::from_raw_parts_mut(at, s.size as usize) };
                shm_data(i, bytes)
            })?;
            // SAFETY: shmid_ds is plain data; IPC_STAT fills it and IPC_SET reads it.
            let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: `ds` outlives both calls.
            let r = unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) };
            check(r as libc::c_long, || {
                format!("shmctl(IPC_STAT) of segment {id}")
            })?;
            set_perm(&mut ds.shm_perm, p);
            // SAFETY: as above.
            let r = unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) };
            check(r as libc::c_long, || {
                format!("shmctl(IPC_SET) of segment {id}")
            })?;
            if p.mode & SHM_LOCKED != 0 {
                // SAFETY: SHM_LOCK takes no buffer.
                let r = unsafe { libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) };
                check(r as libc::c_long, || {
                    format!("shmctl(SHM_LOCK) of segment {id}")
                })?;
            }
        }
        for s in &objects.sem {
            let p = &s.perm;
            next_id("sem", p.id)?;
            // SAFETY: semget takes no pointers.
            let id = unsafe {
                libc::semget(
                    p.key,
                    s.values.len() as i32,
                    (p.mode & 0o777) as i32 | libc::IPC_CREAT | libc::IPC_EXCL,
                )
            };
            expect_id("semget", p.id, id)?;
            // SAFETY: SETALL reads one short per semaphore of the set from `values`.
            let r = unsafe { libc::semctl(id, 0, libc::SETALL, s.values.as_ptr()) };
            check(r as libc::c_long, || format!("semctl(SETALL) of set {id}"))?;
            // SAFETY: semid_ds is plain data.
            let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: the variadic argument is the `struct semid_ds *` both commands want.
            let r = unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) };
            check(r as libc::c_long, || {
                format!("semctl(IPC_STAT) of set {id}")
            })?;
            set_perm(&mut ds.sem_perm, p);
            // SAFETY: as above.
            let r = unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) };
            check(r as libc::c_long, || format!("semctl(IPC_SET) of set {id}"))?;
        }
        for q in &objects.msg {
            let p = &q.perm;
            next_id("msg", p.id)?;
            // SAFETY: msgget takes no pointers.
            let id = unsafe {
                libc::msgget(
                    p.key,
                    (p.mode & 0o777) as i32 | libc::IPC_CREAT | libc::IPC_EXCL,
                )
            };
            expect_id("msgget", p.id, id)?;
            // SAFETY: msqid_ds is plain data.
            let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: `ds` outlives both calls.
            let r = unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) };
            check(r as libc::c_long, || {
                format!("msgctl(IPC_STAT) of queue {id}")
            })?;
            // Room for every message first: the queue may have been allowed more than
            // the default.
            set_perm(&mut ds.msg_perm, p);
            ds.msg_qbytes = q.qbytes as _;
            // SAFETY: as above.
            let r = unsafe { libc::msgctl(id, libc::IPC_SET, &mut ds) };
            check(r as libc::c_long, || {
                format!("msgctl(IPC_SET) of queue {id}")
            })?;
            for (mtype, text) in &q.messages {
                let mut buf = Vec::with_capacity(8 + text.len());
                buf.extend_from_slice(&mtype.to_ne_bytes());
                buf.extend_from_slice(text);
                // SAFETY: `buf` is a long followed by text.len() bytes, as told.
                let r =
                    unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) };
                check(r as libc::c_long, || format!("msgsnd to queue {id}"))?;
            }
        }
        Ok(())
    })
}

/// Removes the segments that were marked for removal, once the processes that had them
/// attached have them again: they vanish with the last detach, as before.
pub fn remove_marked(pid: Pid, objects: &Objects) -> Result<()> {
    in_namespace_of(pid, "ipc", libc::CLONE_NEWIPC, || {
        for s in objects.shm.iter().filter(|s| s.perm.mode & SHM_DEST != 0) {
            // SAFETY: IPC_RMID takes no buffer.
            let r = unsafe { libc::shmctl(s.perm.id, libc::IPC_RMID, std::ptr::null_mut()) };
            check(r as libc::c_long, || {
                format!("shmctl(IPC_RMID) of segment {}", s.perm.id)
            })?;
        }
        Ok(())
    })
}
