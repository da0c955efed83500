//! The operation's configuration, in the stanza format of AIX's `lvupdate.data`:
//!
//! ```text
//! general:
//!     mode = preview
//! disks:
//!     clone = /var/lib/liveupdate/clone
//! ```
//!
//! A stanza starts at the beginning of a line and ends with `:`; its attributes are
//! indented `name = value` lines; `#` starts a comment line. Every problem of a file is
//! reported at once, each with its line number, so that an operator fixes them in one
//! go.

use std::fmt;
use std::path::{Path, PathBuf};

/// The template shipped with `liveupdate` (`liveupdate config template`).
pub const TEMPLATE: &str = include_str!("../lvupdate.template");

/// Where `liveupdate` looks for its configuration unless told.
pub const DEFAULT_PATH: &str = "/etc/liveupdate/lvupdate.data";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub general: General,
    pub disks: Disks,
    pub console: Console,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct General {
    pub mode: Mode,
    /// Refuse the operation when a loaded kernel module is not known to survive it.
    pub kext_check: bool,
    /// Commands (`sh -c`) run before the blackout and after the workload resumed.
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Check everything and estimate; change nothing.
    Preview,
    /// Clone, fix, start the surrogate, move the workload, release the original.
    Automated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    /// The directory the root is cloned in for the fix (a tree or an image file).
    pub clone: PathBuf,
    /// The directory the mirror of the original root, which the workload resumes
    /// on, is made in.
    pub mirror: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Console {
    /// The console's unix socket.
    pub address: PathBuf,
    pub user: String,
    /// The partition id asked for the surrogate; the console chooses when absent.
    pub partition_id: Option<u16>,
}

/// One thing wrong with a configuration file, at a line of it (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub what: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", invalid(path, problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn invalid(path: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| p.at(path)).collect();
    format!(
        "{path}: {} problem{}:\n{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        lines.join("\n")
    )
}

impl Problem {
    /// `path:line: what`, as compilers write it.
    pub fn at(&self, path: &str) -> String {
        match self.line {
            0 => format!("{path}: {}", self.what),
            n => format!("{path}:{n}: {}", self.what),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Preview => "preview",
            Mode::Automated => "automated",
        })
    }
}

/// The stanzas and their attributes, and which attributes must be there.
const SCHEMA: &[(&str, &[(&str, bool)])] = &[
    (
        "general",
        &[
            ("mode", true),
            ("kext_check", false),
            ("pre_hook", false),
            ("post_hook", false),
        ],
    ),
    ("disks", &[("clone", true), ("mirror", true)]),
    (
        "console",
        &[("address", true), ("user", true), ("partition_id", false)],
    ),
];

/// A stanza as written: its name, its line, its attributes.
struct Stanza<'a> {
    name: &'a str,
    line: usize,
    attrs: Vec<(&'a str, Written)>,
}

/// A value as written, with its line.
#[derive(Debug, Clone)]
struct Written {
    line: usize,
    value: String,
}

/// Reads and checks the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: shown.clone(),
        source,
    })?;
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: shown,
        problems,
    })
}

/// Checks a configuration's text: the configuration, or every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut bad = |line: usize, what: String| problems.push(Problem { line, what });
    let mut seen: Vec<Stanza> = Vec::new();
    let mut current: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indented = raw.starts_with([' ', '\t']);
        if !indented {
            let Some(name) = trimmed.strip_suffix(':').map(str::trim) else {
                bad(
                    n,
                    format!("{trimmed:?} is neither a stanza (name:) nor an indented attribute"),
                );
                current = None;
                continue;
            };
            let Some((known, _)) = SCHEMA.iter().find(|(s, _)| *s == name) else {
                bad(
                    n,
                    format!(
                        "unknown stanza {name:?} (known: {})",
                        names(SCHEMA.iter().map(|s| s.0))
                    ),
                );
                current = None;
                continue;
            };
            if let Some(first) = seen.iter().find(|s| s.name == *known) {
                let first = first.line;
                bad(n, format!("stanza {name}: again (first at line {first})"));
                current = None;
                continue;
            }
            seen.push(Stanza {
                name: known,
                line: n,
                attrs: Vec::new(),
            });
            current = Some(seen.len() - 1);
            continue;
        }
        let Some(at) = current else {
            bad(n, format!("{trimmed:?} is outside any stanza"));
            continue;
        };
        let Some((key, value)) = trimmed.split_once('=') else {
            bad(n, format!("{trimmed:?}: expected name = value"));
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let stanza = seen[at].name;
        let attrs = SCHEMA
            .iter()
            .find(|(s, _)| *s == stanza)
            .map_or(&[][..], |s| s.1);
        let Some((known, _)) = attrs.iter().find(|(k, _)| *k == key) else {
            bad(
                n,
                format!(
                    "unknown attribute {key:?} in stanza {stanza}: (known: {})",
                    names(attrs.iter().map(|a| a.0))
                ),
            );
            continue;
        };
        if value.is_empty() {
            bad(n, format!("{stanza}: {key} has no value"));
            continue;
        }
        if let Some((_, w)) = seen[at].attrs.iter().find(|(k, _)| k == known) {
            bad(
                n,
                format!("{stanza}: {key} again (first at line {})", w.line),
            );
            continue;
        }
        seen[at].attrs.push((
            known,
            Written {
                line: n,
                value: value.to_string(),
            },
        ));
    }
    let last = text.lines().count();
    // What each stanza must have.
    for (stanza, attrs) in SCHEMA {
        match seen.iter().find(|s| s.name == *stanza) {
            None => bad(last.max(1), format!("stanza {stanza}: is missing")),
            Some(s) => {
                for (key, required) in attrs.iter() {
                    if *required && !s.attrs.iter().any(|(k, _)| k == key) {
                        bad(s.line, format!("stanza {stanza}: lacks {key}"));
                    }
                }
            }
        }
    }
    let get = |stanza: &str, key: &str| -> Option<Written> {
        seen.iter()
            .find(|s| s.name == stanza)
            .and_then(|s| s.attrs.iter().find(|(k, _)| *k == key))
            .map(|(_, w)| w.clone())
    };
    let mode = get("general", "mode").and_then(|w| match w.value.as_str() {
        "preview" => Some(Mode::Preview),
        "automated" => Some(Mode::Automated),
        v => {
            bad(
                w.line,
                format!("general: mode is {v:?}: expected preview or automated"),
            );
            None
        }
    });
    let kext_check = match get("general", "kext_check") {
        None => Some(true),
        Some(w) => match w.value.as_str() {
            "yes" => Some(true),
            "no" => Some(false),
            v => {
                bad(
                    w.line,
                    format!("general: kext_check is {v:?}: expected yes or no"),
                );
                None
            }
        },
    };
    let mut absolute = |stanza: &str, key: &str| -> Option<(PathBuf, usize)> {
        let w = get(stanza, key)?;
        let p = PathBuf::from(&w.value);
        if p.is_absolute() {
            Some((p, w.line))
        } else {
            bad(
                w.line,
                format!(
                    "{stanza}: {key} is {:?}: expected an absolute path",
                    w.value
                ),
            );
            None
        }
    };
    let clone = absolute("disks", "clone");
    let mirror = absolute("disks", "mirror");
    if let (Some((c, _)), Some((m, line))) = (&clone, &mirror) {
        if c == m || c.starts_with(m) || m.starts_with(c) {
            bad(
                *line,
                format!(
                    "disks: the mirror {} and the clone {} overlap: each needs its own place",
                    m.display(),
                    c.display()
                ),
            );
        }
    }
    let address = get("console", "address").and_then(|w| {
        match w.value.strip_prefix("unix:").map(PathBuf::from) {
            Some(p) if p.is_absolute() => Some(p),
            _ => {
                bad(
                    w.line,
                    format!(
                        "console: address is {:?}: expected unix:/ABSOLUTE/PATH",
                        w.value
                    ),
                );
                None
            }
        }
    });
    let user = get("console", "user").and_then(|w| {
        if w.value.chars().any(char::is_whitespace) {
            bad(
                w.line,
                format!("console: user {:?} has blanks in it", w.value),
            );
            None
        } else {
            Some(w.value)
        }
    });
    let partition_id = match get("console", "partition_id") {
        None => Some(None),
        Some(w) => match w.value.parse::<u16>() {
            Ok(id) if id > 0 => Some(Some(id)),
            _ => {
                bad(
                    w.line,
                    format!("console: partition_id is {:?}: expected 1..65535", w.value),
                );
                None
            }
        },
    };
    match (mode, kext_check, clone, mirror, address, user, partition_id) {
        (
            Some(mode),
            Some(kext_check),
            Some(clone),
            Some(mirror),
            Some(address),
            Some(user),
            Some(partition_id),
        ) if problems.is_empty() => Ok(Config {
            general: General {
                mode,
                kext_check,
                pre_hook: get("general", "pre_hook").map(|w| w.value),
                post_hook: get("general", "post_hook").map(|w| w.value),
            },
            disks: Disks {
                clone: clone.0,
                mirror: mirror.0,
            },
            console: Console {
                address,
                user,
                partition_id,
            },
        }),
        _ => {
            problems.sort_by_key(|p| p.line);
            Err(problems)
        }
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_a_valid_configuration() {
        let c = parse(TEMPLATE).unwrap();
        assert_eq!(c.general.mode, Mode::Preview);
        assert!(c.general.kext_check);
        assert_eq!(c.disks.clone, PathBuf::from("/var/lib/liveupdate/clone"));
        assert_eq!(
            c.console.address,
            PathBuf::from("/run/liveupdate/console.sock")
        );
        assert_eq!(c.console.partition_id, Some(2));
    }

    const GOOD: &str = "general:\n  mode = automated\n  kext_check = no\ndisks:\n  clone = /c\n  mirror = /m\nconsole:\n  address = unix:/s\n  user = op\n";

    #[test]
    fn optional_attributes_take_their_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.general.mode, Mode::Automated);
        assert!(!c.general.kext_check);
        assert_eq!(c.console.partition_id, None);
        let c = parse(&GOOD.replace("  kext_check = no\n", "")).unwrap();
        assert!(c.general.kext_check);
    }

    /// Every problem comes back at once, by line, in line order.
    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "\
# a comment
general:
    mode = sometimes
    colour = blue
disks:
    clone = relative/dir
    mirror = /m
    mirror = /m2
stray line
console:
    address = tcp:host:1
    user = an operator
    partition_id = 0
extra:
    a = b
";
        let p = parse(text).unwrap_err();
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.what.as_str())).collect();
        let want = [
            (
                3,
                "general: mode is \"sometimes\": expected preview or automated",
            ),
            (
                4,
                "unknown attribute \"colour\" in stanza general: (known: mode, kext_check, pre_hook, post_hook)",
            ),
            (
                6,
                "disks: clone is \"relative/dir\": expected an absolute path",
            ),
            (8, "disks: mirror again (first at line 7)"),
            (
                9,
                "\"stray line\" is neither a stanza (name:) nor an indented attribute",
            ),
            (
                11,
                "console: address is \"tcp:host:1\": expected unix:/ABSOLUTE/PATH",
            ),
            (12, "console: user \"an operator\" has blanks in it"),
            (13, "console: partition_id is \"0\": expected 1..65535"),
            (
                14,
                "unknown stanza \"extra\" (known: general, disks, console)",
            ),
            (15, "\"a = b\" is outside any stanza"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn missing_stanzas_and_attributes_are_named() {
        let p = parse("general:\n  mode = preview\ndisks:\n  clone = /c\n").unwrap_err();
        let got: Vec<String> = p.iter().map(|p| p.at("f")).collect();
        assert_eq!(
            got,
            [
                "f:3: stanza disks: lacks mirror",
                "f:4: stanza console: is missing"
            ]
        );
    }

    #[test]
    fn a_mirror_inside_the_clone_is_refused() {
        let p = parse(&GOOD.replace("mirror = /m", "mirror = /c/m")).unwrap_err();
        assert_eq!(p.len(), 1);
        assert!(p[0].what.contains("overlap"), "{:?}", p[0]);
    }

    #[test]
    fn a_repeated_stanza_is_refused() {
        let p = parse(&format!("{GOOD}disks:\n  clone = /x\n")).unwrap_err();
        assert_eq!(p[0].line, 10);
        assert_eq!(p[0].what, "stanza disks: again (first at line 4)");
    }

    #[test]
    fn the_error_names_the_file_and_counts_the_problems() {
        let dir = std::env::temp_dir().join(format!("lvupdate-{}", std::process::id()));
        std::fs::write(&dir, "general:\n  mode = never\n").unwrap();
        let e = load(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        let path = dir.display().to_string();
        assert!(
            e.starts_with(&format!("{path}: 3 problems:\n{path}:2: ")),
            "{e}"
        );
        assert!(
            e.contains(&format!("{path}:2: general: mode is \"never\"")),
            "{e}"
        );
    }
}
