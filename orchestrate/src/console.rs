//! The console (the HMC of a partition): a small service on a unix socket that makes,
//! starts, lists, renames, stops and destroys partitions and hands out their ids.
//!
//! Protocol: one request per connection, a JSON line
//! `{"token": "...", "op": "create", ...}`; one answer line, `{"ok": [partitions]}`
//! (those the request touched, or all of them for `list`) or `{"error": "..."}`.
//! Every request carries the token `liveupdate console auth` stored; a wrong or
//! expired one is refused. Nothing here assumes the caller is on this host.

use crate::partition::{Host, NewPartition, Partition, PartitionError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Create(NewPartition),
    Start {
        name: String,
        command: Vec<String>,
    },
    List,
    Rename {
        from: String,
        to: String,
    },
    Stop {
        name: String,
    },
    Destroy {
        name: String,
    },
    /// A workload moved in: the tree at `init` is the partition's.
    Adopt {
        name: String,
        init: i32,
    },
    /// The partition's address onto its interface, off any other's.
    TakeAddress {
        name: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    token: String,
    #[serde(flatten)]
    req: Request,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Ok(Vec<Partition>),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console {socket}: {why}")]
    Unreachable { socket: String, why: String },
    #[error("console {socket}: {why}")]
    Refused { socket: String, why: String },
    #[error("another console serves {state}: {why}")]
    Busy { state: String, why: String },
    #[error("console {socket}: {source}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// Asks the console at `socket`; its answer, or its refusal by reason.
pub fn call(socket: &Path, token: &str, req: &Request) -> Result<Vec<Partition>, ConsoleError> {
    let shown = socket.display().to_string();
    let mut s = UnixStream::connect(socket).map_err(|e| ConsoleError::Unreachable {
        socket: shown.clone(),
        why: format!("{e} (is `liveupdate console serve` running?)"),
    })?;
    let io = |source| ConsoleError::Io {
        socket: shown.clone(),
        source,
    };
    let mut line = serde_json::to_vec(&Envelope {
        token: token.into(),
        req: req.clone(),
    })
    .expect("a request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str::<Answer>(&answer) {
        Ok(Answer::Ok(parts)) => Ok(parts),
        Ok(Answer::Error(why)) => Err(ConsoleError::Refused { socket: shown, why }),
        Err(e) => Err(ConsoleError::Refused {
            socket: shown,
            why: format!("no answer ({e}): {answer:?}"),
        }),
    }
}

/// The console's service, held until dropped.
pub struct Console {
    host: Host,
    listener: UnixListener,
    socket: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Console {
    /// Takes the state directory (one console per table) and listens on `socket`.
    pub fn bind(host: Host, socket: &Path) -> Result<Console, ConsoleError> {
        let state = host.state.join("console");
        let io = |source| ConsoleError::Io {
            socket: socket.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&state).map_err(io)?;
        let lock_path = state.join("console.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| ConsoleError::Busy {
                state: state.display().to_string(),
                why: e.to_string(),
            })?;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Ours now that we hold the lock: a socket left there is a dead console's.
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(Console {
            host,
            listener,
            socket: socket.into(),
            _lock: lock,
        })
    }

    /// Answers requests, one at a time, for ever.
    pub fn serve(&self) -> ! {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.answer(&s) {
                        note(&format!("a request went unanswered: {e}"));
                    }
                }
                Err(e) => note(&format!("accept: {e}")),
            }
        }
    }

    fn answer(&self, s: &UnixStream) -> std::io::Result<()> {
        let mut line = String::new();
        // A request is a line of JSON: a megabyte is more than any.
        BufReader::new(std::io::Read::take(s, 1 << 20)).read_line(&mut line)?;
        let answer = match serde_json::from_str::<Envelope>(&line) {
            Err(e) => Answer::Error(format!("not a request: {e}")),
            Ok(env) => match crate::token::check(&self.host.state, &env.token) {
                Err(e) => Answer::Error(format!("refused: {e}")),
                Ok(_user) => match self.run(&env.req) {
                    Ok(parts) => Answer::Ok(parts),
                    Err(e) => Answer::Error(e.to_string()),
                },
            },
        };
        let mut out = serde_json::to_vec(&answer).expect("an answer serializes");
        out.push(b'\n');
        (&*s).write_all(&out)
    }

    fn run(&self, req: &Request) -> Result<Vec<Partition>, PartitionError> {
        let h = &self.host;
        let mut parts = h.load()?;
        let one = |p: Partition| vec![p];
        Ok(match req {
            Request::Create(new) => one(h.create(&mut parts, new)?),
            Request::Start { name, command } => one(h.start(&mut parts, name, command)?),
            Request::List => parts,
            Request::Rename { from, to } => one(h.rename(&mut parts, from, to)?),
            Request::Stop { name } => one(h.stop(&mut parts, name)?),
            Request::Destroy { name } => one(h.destroy(&mut parts, name)?),
            Request::Adopt { name, init } => one(h.adopt(&mut parts, name, *init)?),
            Request::TakeAddress { name } => {
                h.take_address(&mut parts, name)?;
                parts.into_iter().filter(|p| &p.name == name).collect()
            }
        })
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The console runs detached from any terminal: its notes go to stderr, which the
/// operator redirects.
fn note(what: &str) {
    eprintln!("liveupdate console: {what}");
}
