//! Applications told of a live update, and asked whether they can take it.
//!
//! The protocol, for the authors of applications: a process that wants to be told
//! listens on a unix stream socket in `/run/liveupdate/notify/` of its partition (its
//! name, say `myapp.sock`, names it in reports). For each event `liveupdate` connects,
//! writes one line, `EVENT LABEL\n` (`EVENT` one of [`Event`]'s names, `LABEL` the
//! fix's), and reads one line back within the time allowed (5 s unless told): `OK`, or
//! `VETO reason` to refuse. A veto stops a preview (`PREVIEW`) or the operation before
//! its blackout (`PRE`); after the move (`POST`) it is only reported. A socket nobody
//! listens on any more is skipped, and said so; an application that does not answer in
//! time counts as a refusal before the blackout, since the operation cannot know it is
//! ready.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where, under a partition's root, applications listen.
pub const DIR: &str = "run/liveupdate/notify";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A preview: can the application take this fix live?
    Preview,
    /// The blackout is about to begin.
    Pre,
    /// The workload runs on the surrogate.
    Post,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Preview => "PREVIEW",
            Event::Pre => "PRE",
            Event::Post => "POST",
        }
    }

    pub fn parse(s: &str) -> Option<Event> {
        [Event::Preview, Event::Pre, Event::Post]
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(s))
    }

    /// Whether a refusal stops the operation.
    pub fn may_veto(self) -> bool {
        self != Event::Post
    }
}

/// One application's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Veto(String),
    /// Listening no more (its socket is left over).
    Gone,
    /// Connected, but said nothing (or nothing we understand) in time.
    Silent(String),
}

impl Answer {
    /// Whether this answer stops an operation at `e`.
    pub fn stops(&self, e: Event) -> bool {
        e.may_veto() && matches!(self, Answer::Veto(_) | Answer::Silent(_))
    }
}

/// Tells every application listening under `root` of `event` for fix `label`, one
/// after the other in name order; returns each one's name and answer.
pub fn tell(
    root: &Path,
    event: Event,
    label: &str,
    patience: Duration,
) -> std::io::Result<Vec<(String, Answer)>> {
    let dir = root.join(DIR);
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| {
                use std::os::unix::fs::FileTypeExt;
                e.file_type().is_ok_and(|t| t.is_socket())
            })
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let answer = ask(&dir.join(&name), event, label, patience);
        out.push((name.trim_end_matches(".sock").to_string(), answer));
    }
    Ok(out)
}

fn ask(sock: &Path, event: Event, label: &str, patience: Duration) -> Answer {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Answer::Gone,
        Err(e) => return Answer::Silent(format!("connecting: {e}")),
    };
    let _ = s.set_read_timeout(Some(patience));
    let _ = s.set_write_timeout(Some(patience));
    if let Err(e) = writeln!(s, "{} {label}", event.name()) {
        return Answer::Silent(format!("telling it: {e}"));
    }
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => Answer::Silent("it hung up without an answer".into()),
        Ok(_) => {
            let line = line.trim_end();
            if line == "OK" {
                Answer::Ok
            } else if let Some(why) = line.strip_prefix("VETO") {
                Answer::Veto(why.trim().to_string())
            } else {
                Answer::Silent(format!("it answered {line:?}, neither OK nor VETO"))
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Answer::Silent(format!("no answer in {patience:?}"))
        }
        Err(e) => Answer::Silent(format!("reading its answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// An application answering `reply` (None: never) to one event; returns what it
    /// was told.
    fn app(dir: &Path, name: &str, reply: Option<&'static str>) -> std::thread::JoinHandle<String> {
        let l = UnixListener::bind(dir.join(name)).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut told = String::new();
            BufReader::new(&s).read_line(&mut told).unwrap();
            match reply {
                Some(r) => writeln!(&s, "{r}").unwrap(),
                // Holds the line open without a word until we give up.
                None => {
                    let mut more = String::new();
                    let _ = BufReader::new(&s).read_line(&mut more);
                }
            }
            told
        })
    }

    #[test]
    fn every_application_is_asked_and_a_veto_or_silence_stops_the_blackout() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = app(&dir, "db.sock", Some("OK"));
        let veto = app(&dir, "queue.sock", Some("VETO draining 3 jobs"));
        let mute = app(&dir, "slow.sock", None);
        // A socket left by an application that is gone.
        drop(UnixListener::bind(dir.join("old.sock")).unwrap());
        let got = tell(
            tmp.path(),
            Event::Pre,
            "IJ12345s1a",
            Duration::from_millis(300),
        )
        .unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["db", "old", "queue", "slow"]);
        assert_eq!(got[0].1, Answer::Ok);
        assert_eq!(got[1].1, Answer::Gone);
        assert_eq!(got[2].1, Answer::Veto("draining 3 jobs".into()));
        assert!(matches!(got[3].1, Answer::Silent(_)), "{:?}", got[3].1);
        assert!(got[2].1.stops(Event::Pre) && got[3].1.stops(Event::Preview));
        assert!(
            !got[2].1.stops(Event::Post),
            "after the move a veto is only reported"
        );
        assert_eq!(ok.join().unwrap(), "PRE IJ12345s1a\n");
        assert_eq!(veto.join().unwrap(), "PRE IJ12345s1a\n");
        mute.join().unwrap();
    }
}
