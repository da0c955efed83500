//! Unix98 pseudo-terminals: reading a pty's state through its master (and a slave if
//! one is open), and making a pty with a given index again.

use crate::{check, Error, Result, SysError};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the kernel's `struct termios2`, kept as raw bytes.
pub const TERMIOS_LEN: usize = std::mem::size_of::<libc::termios2>();

/// What a pty carries besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyState {
    /// The slave's termios (line discipline settings the programs on it see).
    pub termios: Vec<u8>,
    /// The master's own termios.
    pub master_termios: Vec<u8>,
    /// rows, cols, xpixel, ypixel.
    pub winsize: [u16; 4],
    /// TIOCSPTLCK: the slave cannot be opened.
    pub locked: bool,
    /// TIOCPKT packet mode on the master.
    pub packet: bool,
    /// Bytes written on the slave side not yet read from the master.
    pub to_master: u32,
    /// Bytes written on the master side not yet read from the slave (when a slave was
    /// given to look through).
    pub to_slave: u32,
}

fn ioctl(fd: &impl AsRawFd, req: libc::Ioctl, arg: *mut libc::c_void, what: &str) -> Result<()> {
    // SAFETY: every caller passes a pointer to a local of the size `req` reads or
    // writes, or null for requests that take none.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    check(r as libc::c_long, || what.to_string()).map(|_| ())
}

fn get_int(fd: &impl AsRawFd, req: libc::Ioctl, what: &str) -> Result<i32> {
    let mut v: libc::c_int = 0;
    ioctl(fd, req, (&mut v as *mut libc::c_int).cast(), what)?;
    Ok(v)
}

fn set_int(fd: &impl AsRawFd, req: libc::Ioctl, v: i32, what: &str) -> Result<()> {
    let mut v: libc::c_int = v;
    ioctl(fd, req, (&mut v as *mut libc::c_int).cast(), what)
}

fn get_termios(fd: &impl AsRawFd, what: &str) -> Result<Vec<u8>> {
    let mut t = vec![0u8; TERMIOS_LEN];
    ioctl(fd, libc::TCGETS2, t.as_mut_ptr().cast(), what)?;
    Ok(t)
}

fn set_termios(fd: &impl AsRawFd, t: &[u8], what: &str) -> Result<()> {
    if t.len() != TERMIOS_LEN {
        return Err(Error::Unexpected {
            pid: 0,
            what: format!("{what}: termios of {} bytes, want {TERMIOS_LEN}", t.len()),
        });
    }
    let mut t = t.to_vec();
    ioctl(fd, libc::TCSETS2, t.as_mut_ptr().cast(), what)
}

/// The index (N of /dev/pts/N) of the pty whose master `fd` is.
pub fn index(master: &impl AsRawFd) -> Result<u32> {
    get_int(master, libc::TIOCGPTN, "TIOCGPTN").map(|n| n as u32)
}

/// Reads a pty's state through its master and, if given, one of its slaves.
pub fn read_state(master: &OwnedFd, slave: Option<&OwnedFd>) -> Result<PtyState> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    ioctl(
        master,
        libc::TIOCGWINSZ,
        (&mut ws as *mut libc::winsize).cast(),
        "TIOCGWINSZ",
    )?;
    // The slave's termios live in its tty, read through a slave; with none open in the
    // tree, the master's are what there is.
    let termios = match slave {
        Some(s) => get_termios(s, "TCGETS2 on the slave")?,
        None => get_termios(master, "TCGETS2 on the master")?,
    };
    Ok(PtyState {
        termios,
        master_termios: get_termios(master, "TCGETS2 on the master")?,
        winsize: [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel],
        locked: get_int(master, libc::TIOCGPTLCK, "TIOCGPTLCK")? != 0,
        packet: get_int(master, libc::TIOCGPKT, "TIOCGPKT")? != 0,
        to_master: get_int(master, libc::FIONREAD, "FIONREAD on the master")? as u32,
        to_slave: match slave {
            Some(s) => get_int(s, libc::FIONREAD, "FIONREAD on the slave")? as u32,
            None => 0,
        },
    })
}

/// Opens `ptmx` until the kernel hands out pty `index`, which it does lowest-free first:
/// the ptys opened on the way are closed again. Fails with EBUSY when `index` is taken
/// here.
pub fn open_index(ptmx: &str, index: u32) -> Result<std::fs::File> {
    let mut spare = Vec::new();
    loop {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(ptmx)
            .map_err(|e| Error::io(ptmx, e))?;
        let got = self::index(&f)?;
        if got == index {
            return Ok(f);
        }
        if got > index || spare.len() > 4096 {
            return Err(SysError::new(
                format!("opening pty {index} through {ptmx} (the kernel gave {got})"),
                crate::Errno::EBUSY,
            )
            .into());
        }
        spare.push(f);
    }
}

/// Unlocks the slave of `master` (so it can be opened), or locks it again.
pub fn set_locked(master: &impl AsRawFd, locked: bool) -> Result<()> {
    set_int(master, libc::TIOCSPTLCK, locked as i32, "TIOCSPTLCK")
}

/// Gives a new pty the settings of `st`: termios on both sides, window size, packet
/// mode. The lock is left to the caller (a locked slave cannot be opened).
pub fn apply_state(
    master: &impl AsRawFd,
    slave: &impl AsRawFd,
    termios: &[u8],
    master_termios: &[u8],
    winsize: [u16; 4],
    packet: bool,
) -> Result<()> {
    set_termios(slave, termios, "TCSETS2 on the slave")?;
    set_termios(master, master_termios, "TCSETS2 on the master")?;
    let mut ws = libc::winsize {
        ws_row: winsize[0],
        ws_col: winsize[1],
        ws_xpixel: winsize[2],
        ws_ypixel: winsize[3],
    };
    ioctl(
        master,
        libc::TIOCSWINSZ,
        (&mut ws as *mut libc::winsize).cast(),
        "TIOCSWINSZ",
    )?;
    set_int(master, libc::TIOCPKT, packet as i32, "TIOCPKT")
}
