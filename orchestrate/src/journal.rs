//! The operations journal (`liveupdate log`): one entry for the start, the success or
//! the failure of every operation, in the manner of AIX's error report: an identifier,
//! a time, a type, the resource it concerns and a description.
//!
//! On disk: one line per entry, fields separated by tabs, appended with a single
//! write (O_APPEND), so that a crash leaves at worst a last line cut short, which the
//! reader names and skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Start,
    Success,
    Failure,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Start => "S",
            Kind::Success => "I",
            Kind::Failure => "E",
        }
    }

    fn from_code(c: &str) -> Option<Kind> {
        match c {
            "S" => Some(Kind::Start),
            "I" => Some(Kind::Success),
            "E" => Some(Kind::Failure),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The operation's identifier (`LU0001`, ...): its start, success and failure share it.
    pub id: String,
    /// Seconds since the epoch, UTC.
    pub time: u64,
    pub kind: Kind,
    /// What it concerns: a partition, a fix.
    pub resource: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What a journal holds: its entries, oldest first, and the lines that could not be
/// read (number, why).
pub struct Read {
    pub entries: Vec<Entry>,
    pub bad: Vec<(usize, String)>,
}

/// The journal file in `dir`.
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn at(dir: &Path) -> Journal {
        Journal {
            path: dir.join("journal"),
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> JournalError + '_ {
        |source| JournalError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Every entry, and the lines that could not be read. A journal not written yet is
    /// empty.
    pub fn read(&self) -> Result<Read, JournalError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.io()(e)),
        };
        let mut entries = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            match parse_line(line) {
                Some(e) => entries.push(e),
                None => bad.push((i + 1, format!("not a journal entry: {line:?}"))),
            }
        }
        Ok(Read { entries, bad })
    }

    /// The identifier for a new operation: one past the highest so far.
    pub fn next_id(&self) -> Result<String, JournalError> {
        let last = self
            .read()?
            .entries
            .iter()
            .filter_map(|e| e.id.strip_prefix("LU")?.parse::<u32>().ok())
            .max()
            .unwrap_or(0);
        Ok(format!("LU{:04}", last + 1))
    }

    /// Appends `e` in one write.
    pub fn append(&self, e: &Entry) -> Result<(), JournalError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let line = format!(
            "{}\t{}\t{}\t{}\t{}\n",
            e.id,
            e.time,
            e.kind.code(),
            escape(&e.resource),
            escape(&e.description)
        );
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(self.io())?;
        f.write_all(line.as_bytes()).map_err(self.io())
    }

    /// Appends an entry of `kind` for operation `id`, timed now.
    pub fn record(
        &self,
        id: &str,
        kind: Kind,
        resource: &str,
        description: &str,
    ) -> Result<(), JournalError> {
        self.append(&Entry {
            id: id.to_string(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            kind,
            resource: resource.to_string(),
            description: description.to_string(),
        })
    }
}

/// Tabs and line ends inside a field would break the line apart.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

fn parse_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split('\t').collect();
    let [id, time, kind, resource, description] = f[..] else {
        return None;
    };
    Some(Entry {
        id: id.to_string(),
        time: time.parse().ok()?,
        kind: Kind::from_code(kind)?,
        resource: unescape(resource),
        description: unescape(description),
    })
}

/// `time` (seconds since the epoch) as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(time: u64) -> String {
    let (days, secs) = ((time / 86_400) as i64, time % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The journal for a person: a header, then one line per entry.
pub fn report(entries: &[Entry]) -> String {
    let mut out = format!(
        "{:<8} {:<20} {} {:<16} {}\n",
        "IDENT", "TIMESTAMP", "T", "RESOURCE", "DESCRIPTION"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<8} {:<20} {} {:<16} {}\n",
            e.id,
            utc(e.time),
            e.kind.code(),
            e.resource,
            e.description.replace('\n', " / ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_come_out_as_the_calendar_has_them() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_142_614), "2026-12-01T16:30:14Z");
    }

    #[test]
    fn entries_come_back_in_order_with_ids_counting_up() {
        let dir = std::env::temp_dir().join(format!("lu-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::at(&dir);
        assert_eq!(j.next_id().unwrap(), "LU0001");
        j.record(
            "LU0001",
            Kind::Start,
            "partition 2",
            "fix IJ1\tapplied\nlive",
        )
        .unwrap();
        j.record("LU0001", Kind::Failure, "partition 2", "clone: disk full")
            .unwrap();
        assert_eq!(j.next_id().unwrap(), "LU0002");
        // A crash in the middle of a write leaves a line cut short: named, skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("journal"))
            .unwrap()
            .write_all(b"LU0002\t17961")
            .unwrap();
        let Read { entries, bad } = j.read().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].description, "fix IJ1\tapplied\nlive");
        assert_eq!(entries[1].kind, Kind::Failure);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 3);
        let r = report(&entries);
        assert!(r.lines().nth(2).unwrap().contains("E partition 2"), "{r}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
