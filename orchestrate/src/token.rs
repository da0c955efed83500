//! The console's credentials: `liveupdate console auth` stores a token for a user with a
//! time to live (the file `console/token` of the state directory, 0600, written whole
//! or not at all); the console takes a request only with that token, before it
//! expires. A console on another host checks against its own copy.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The token file, under the state directory.
pub const FILE: &str = "console/token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no console token in {path}: run liveupdate console auth")]
    Missing { path: String },
    #[error("{path}: not a console token file ({what})")]
    Damaged { path: String, what: String },
    #[error("the console token of {user} expired at {at}: run liveupdate console auth again")]
    Expired { user: String, at: String },
    #[error("wrong console token")]
    Wrong,
    #[error("{path} is readable by others (mode {mode:04o}): a token must be 0600")]
    Exposed { path: String, mode: u32 },
}

/// A stored token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub user: String,
    pub secret: String,
    /// Seconds since the epoch.
    pub expires: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn path_in(state: &Path) -> PathBuf {
    state.join(FILE)
}

/// Issues a token for `user` valid `ttl` seconds and stores it, replacing any other.
pub fn issue(state: &Path, user: &str, ttl: u64) -> Result<Token, TokenError> {
    let path = path_in(state);
    let io = |source| TokenError::Io {
        path: path.display().to_string(),
        source,
    };
    if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::Damaged {
            path: path.display().to_string(),
            what: format!("user {user:?} must be a single word"),
        });
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(io)?;
    let t = Token {
        user: user.into(),
        secret: raw.iter().map(|b| format!("{b:02x}")).collect(),
        expires: now().saturating_add(ttl),
    };
    let dir = path.parent().expect("console/token has a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    // Whole or not at all: written beside it, then renamed over it.
    let tmp = dir.join("token.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    writeln!(f, "{}\t{}\t{}", t.user, t.secret, t.expires).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(t)
}

/// The stored token, if it is still valid.
pub fn current(state: &Path) -> Result<Token, TokenError> {
    use std::os::unix::fs::PermissionsExt;
    let path = path_in(state);
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TokenError::Missing { path: shown })
        }
        Err(source) => {
            return Err(TokenError::Io {
                path: shown,
                source,
            })
        }
    };
    let mode = std::fs::metadata(&path)
        .map_err(|source| TokenError::Io {
            path: shown.clone(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed { path: shown, mode });
    }
    let fields: Vec<&str> = text.trim_end().split('\t').collect();
    let [user, secret, expires] = fields[..] else {
        return Err(TokenError::Damaged {
            path: shown,
            what: format!("{} fields, not 3", fields.len()),
        });
    };
    let expires: u64 = expires.parse().map_err(|_| TokenError::Damaged {
        path: shown.clone(),
        what: format!("expiry {expires:?}"),
    })?;
    if expires <= now() {
        return Err(TokenError::Expired {
            user: user.into(),
            at: crate::journal::utc(expires),
        });
    }
    Ok(Token {
        user: user.into(),
        secret: secret.into(),
        expires,
    })
}

/// Checks a token presented to the console: its user if it is the stored one, valid.
pub fn check(state: &Path, presented: &str) -> Result<String, TokenError> {
    let t = current(state)?;
    // Every byte compared whatever the first difference, so that timing tells nothing.
    let (a, b) = (t.secret.as_bytes(), presented.trim().as_bytes());
    let differ = a.len() != b.len() || a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) != 0;
    if differ {
        Err(TokenError::Wrong)
    } else {
        Ok(t.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_while_valid_and_a_wrong_or_expired_one_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let t = issue(tmp.path(), "hscroot", 3600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(check(tmp.path(), &t.secret).unwrap(), "hscroot");
        assert!(matches!(check(tmp.path(), "0123"), Err(TokenError::Wrong)));
        let mut other = t.secret.clone();
        other.replace_range(0..1, if other.starts_with('0') { "1" } else { "0" });
        assert!(matches!(check(tmp.path(), &other), Err(TokenError::Wrong)));
        // A token whose time is up is refused by name.
        let old = issue(tmp.path(), "hscroot", 0).unwrap();
        let e = check(tmp.path(), &old.secret).unwrap_err();
        assert!(matches!(e, TokenError::Expired { .. }), "{e}");
        // Loosened by hand: refused.
        issue(tmp.path(), "hscroot", 60).unwrap();
        std::fs::set_permissions(
            tmp.path().join(FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            current(tmp.path()),
            Err(TokenError::Exposed { .. })
        ));
        let none = tempfile::tempdir().unwrap();
        assert!(matches!(
            current(none.path()),
            Err(TokenError::Missing { .. })
        ));
    }
}
