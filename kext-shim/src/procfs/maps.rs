//! /proc/PID/smaps: every VMA with all the fields of its maps line and its VmFlags.

use crate::{Error, Pid, Result};

/// One VMA as /proc/PID/smaps describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path, `[heap]`-style label, or empty for anonymous memory. A ` (deleted)`
    /// suffix is kept as the kernel printed it.
    pub path: String,
    /// Two-letter VmFlags (`rd`, `gd`, `hg`, ...).
    pub flags: Vec<String>,
    /// Kilobytes of anonymous transparent huge pages.
    pub anon_huge_kb: u64,
}

impl MapEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// `prot` bits for mmap/mprotect.
    pub fn prot(&self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }
}

/// Parses one maps line (`start-end perms offset maj:min inode   path`).
pub fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut rest = line;
    let mut field = || {
        let t = rest.trim_start_matches(' ');
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        f
    };
    let range = field();
    let perms = field().as_bytes().to_vec();
    let offset = field();
    let dev = field();
    let inode = field();
    let path = rest.trim_start_matches(' ').to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    if perms.len() != 4 {
        return None;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
        flags: Vec::new(),
        anon_huge_kb: 0,
    })
}

/// Every VMA of `pid`, in address order, from /proc/PID/smaps.
/// Every mapping with its VmFlags and THP use, from /proc/PID/smaps. That walks the page
/// tables of every VMA: ~30 ms for 1 GiB resident here. See [`read_layout`].
pub fn read_maps(pid: Pid) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/smaps");
    let text = super::read_text(&path, 256 << 10)?;
    parse_smaps(&text).map_err(|line| Error::Parse {
        path,
        what: "smaps line",
        line,
    })
}

/// Every mapping from /proc/PID/maps, without VmFlags or THP use (left empty): the
/// layout alone, in microseconds whatever the process's size.
pub fn read_layout(pid: Pid) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
    let text = super::read_text(&path, 32 << 10)?;
    parse_smaps(&text).map_err(|line| Error::Parse {
        path,
        what: "maps line",
        line,
    })
}

/// Parses smaps text (or maps text: the same header lines); on failure returns the
/// offending line.
pub fn parse_smaps(text: &str) -> std::result::Result<Vec<MapEntry>, String> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        // Header lines start with a hex range; field lines with `Name:`.
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.push(parse_maps_line(line).ok_or_else(|| line.to_string())?);
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            if let Some(m) = out.last_mut() {
                m.flags = v.split_whitespace().map(str::to_string).collect();
            }
        } else if let Some(v) = line.strip_prefix("AnonHugePages:") {
            if let Some(m) = out.last_mut() {
                m.anon_huge_kb = v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|_| line.to_string())?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_with_spaces_in_path() {
        let m = parse_maps_line(
            "7f00a000-7f00c000 rw-s 00001000 fd:01 1234                       /tmp/a b (deleted)",
        )
        .unwrap();
        assert_eq!(
            (m.start, m.end, m.offset, m.inode),
            (0x7f00a000, 0x7f00c000, 0x1000, 1234)
        );
        assert!(m.read && m.write && !m.exec && m.shared);
        assert_eq!((m.dev_major, m.dev_minor), (0xfd, 1));
        assert_eq!(m.path, "/tmp/a b (deleted)");
    }

    #[test]
    fn parses_anonymous_and_flags() {
        let t = "00400000-00401000 r-xp 00000000 00:00 0 \nRss: 4 kB\nAnonHugePages:  2048 kB\nVmFlags: rd ex mr mw me gd \n";
        let v = parse_smaps(t).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path, "");
        assert!(v[0].has_flag("gd"));
        assert_eq!(v[0].anon_huge_kb, 2048);
    }

    #[test]
    fn own_maps_have_stack_and_vdso() {
        let v = read_maps(Pid::this()).unwrap();
        assert!(v.iter().any(|m| m.path == "[stack]" && m.has_flag("gd")));
        assert!(v.iter().any(|m| m.path == "[vdso]"));
    }
}
