//! Fix bundles: what a live update applies to the clone of the root disk.
//!
//! A bundle is a zstd-compressed tar (`tar --zstd -tf FIX` lists it) holding
//! `MANIFEST.json` first: the fix's label and abstract, whether it can be applied by a
//! live update (`lu_capable`: a fix to the kernel itself cannot), and each file with
//! the path it replaces in the root and its SHA-256; then the files (`files/N`) and the
//! optional scripts run in the clone before and after the files go in (`scripts/pre`,
//! `scripts/post`). A bundle is read whole and every checksum checked before anything
//! of it is used; a fix applied to a root is recorded under
//! `ROOT/var/lib/liveupdate/fixes/LABEL/` with its state (AIX's emgr codes).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "MANIFEST.json";
/// Where a root keeps the record of its fixes.
pub const RECORDS: &str = "var/lib/liveupdate/fixes";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub label: String,
    #[serde(rename = "abstract")]
    pub summary: String,
    pub lu_capable: bool,
    pub files: Vec<FileEntry>,
    /// Run in the clone (chrooted) before the files go in, and after.
    pub pre: bool,
    pub post: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The absolute path it takes in the root.
    pub target: String,
    pub mode: u32,
    pub size: u64,
    pub sha256: String,
}

/// A fix's state on a root, as AIX's `emgr -l` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// S: applied whole.
    Stable,
    /// I: being applied (a crash left it so).
    Installing,
    /// B: its application failed part way.
    Broken,
    /// R: being removed.
    Removing,
}

impl State {
    pub fn code(self) -> char {
        match self {
            State::Stable => 'S',
            State::Installing => 'I',
            State::Broken => 'B',
            State::Removing => 'R',
        }
    }

    fn parse(s: &str) -> Option<State> {
        match s.trim() {
            "S" => Some(State::Stable),
            "I" => Some(State::Installing),
            "B" => Some(State::Broken),
            "R" => Some(State::Removing),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FixError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a fix bundle: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path}: {member} (for {target}) has SHA-256 {got}, the manifest says {want}: the bundle is damaged")]
    Checksum {
        path: String,
        member: String,
        target: String,
        want: String,
        got: String,
    },
    #[error("{what}")]
    Bad { what: String },
    #[error(
        "fix {label}: the {which} script failed ({status}); the fix is marked broken (B) in {root}"
    )]
    Script {
        label: String,
        which: &'static str,
        status: String,
        root: String,
    },
}

impl FixError {
    /// 2 bad arguments, 3 a damaged bundle, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            FixError::Bad { .. } => 2,
            FixError::Corrupt { .. } | FixError::Checksum { .. } => 3,
            _ => 1,
        }
    }
}

type Result<T> = std::result::Result<T, FixError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FixError + '_ {
    move |source| FixError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A label names a directory of the records: letters, digits, `.`, `_`, `-`.
fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label.len() <= 64
        && label != "."
        && label != ".."
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FixError::Bad {
            what: format!("fix label {label:?}: 1 to 64 letters, digits, '.', '_' or '-'"),
        })
    }
}

/// Targets a fix may have: absolute paths without `..`, each once (two entries of one
/// target would share the file staged beside it).
fn check_targets<'a>(
    targets: impl IntoIterator<Item = &'a str>,
) -> std::result::Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for t in targets {
        if !t.starts_with('/') || t.split('/').any(|c| c == "..") || t.trim_matches('/').is_empty()
        {
            return Err(format!("target {t:?}: an absolute path without '..'"));
        }
        if !seen.insert(t.trim_end_matches('/')) {
            return Err(format!("target {t:?} twice"));
        }
    }
    Ok(())
}

/// `target` (absolute) inside `root`, the directories on the way resolved as if
/// `root` were `/` (a link to `/usr/lib` means the root's, and `..` stops at it): in
/// a running workload's root (a mirror) the workload may have made any link, and the
/// host must not follow one out of the root. The last part is not followed: a fix
/// replaces a link with its file.
fn inside(root: &Path, target: &str) -> Result<PathBuf> {
    let mut todo: Vec<String> = target.split('/').rev().map(String::from).collect();
    let mut at: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => at.push(c),
        }
        if todo.iter().all(|c| c.is_empty() || c == ".") {
            break;
        }
        let here: PathBuf = at.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let Ok(link) = std::fs::read_link(&here) else {
            continue;
        };
        links += 1;
        if links > 40 {
            return Err(FixError::Bad {
                what: format!("{}: too many links on the way to {target}", here.display()),
            });
        }
        at.pop();
        if link.is_absolute() {
            at.clear();
        }
        let link = link.to_string_lossy().into_owned();
        todo.extend(link.split('/').rev().map(String::from));
    }
    Ok(at.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// What a new bundle holds.
pub struct NewFix {
    pub label: String,
    pub summary: String,
    pub lu_capable: bool,
    /// `(file here, absolute target path in the root)`.
    pub files: Vec<(PathBuf, String)>,
    pub pre: Option<PathBuf>,
    pub post: Option<PathBuf>,
}

/// Writes the bundle `out`; returns its manifest.
pub fn create(out: &Path, fix: &NewFix) -> Result<Manifest> {
    use std::os::unix::fs::PermissionsExt;
    check_label(&fix.label)?;
    let mut files = Vec::new();
    let mut members: Vec<(String, Vec<u8>, u32)> = Vec::new();
    check_targets(fix.files.iter().map(|(_, t)| t.as_str()))
        .map_err(|what| FixError::Bad { what })?;
    for (i, (src, target)) in fix.files.iter().enumerate() {
        let data = std::fs::read(src).map_err(io(src))?;
        let mode = std::fs::metadata(src)
            .map_err(io(src))?
            .permissions()
            .mode()
            & 0o7777;
        files.push(FileEntry {
            target: target.clone(),
            mode,
            size: data.len() as u64,
            sha256: sha256(&data),
        });
        members.push((format!("files/{i}"), data, mode));
    }
    for (name, script) in [("scripts/pre", &fix.pre), ("scripts/post", &fix.post)] {
        if let Some(p) = script {
            members.push((name.into(), std::fs::read(p).map_err(io(p))?, 0o755));
        }
    }
    let manifest = Manifest {
        label: fix.label.clone(),
        summary: fix.summary.clone(),
        lu_capable: fix.lu_capable,
        files,
        pre: fix.pre.is_some(),
        post: fix.post.is_some(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("plain data serializes");
    let file = std::fs::File::create(out).map_err(io(out))?;
    let enc = zstd::Encoder::new(file, 3).map_err(io(out))?;
    let mut tar = tar::Builder::new(enc);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut put = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(now);
        h.set_cksum();
        tar.append_data(&mut h, name, data).map_err(io(out))
    };
    put(MANIFEST, &json, 0o644)?;
    for (name, data, mode) in &members {
        put(name, data, *mode)?;
    }
    let enc = tar.into_inner().map_err(io(out))?;
    enc.finish().map_err(io(out))?;
    Ok(manifest)
}

/// A bundle read whole, every checksum checked.
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// The files' bytes, in the manifest's order.
    pub files: Vec<Vec<u8>>,
    pub pre: Option<Vec<u8>>,
    pub post: Option<Vec<u8>>,
}

pub fn open(path: &Path) -> Result<Bundle> {
    let shown = path.display().to_string();
    let corrupt = |what: String| FixError::Corrupt {
        path: shown.clone(),
        what,
    };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let dec = zstd::Decoder::new(file).map_err(|e| corrupt(format!("not zstd: {e}")))?;
    let mut tar = tar::Archive::new(dec);
    let mut members: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let entries = tar
        .entries()
        .map_err(|e| corrupt(format!("not a tar archive: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| corrupt(format!("a damaged member: {e}")))?;
        let name = e
            .path()
            .map_err(|e| corrupt(format!("a member's name: {e}")))?
            .display()
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)
            .map_err(|e| corrupt(format!("{name}: {e}")))?;
        if members.insert(name.clone(), data).is_some() {
            return Err(corrupt(format!("{name} twice")));
        }
    }
    let json = members
        .remove(MANIFEST)
        .ok_or_else(|| corrupt(format!("no {MANIFEST}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| corrupt(format!("{MANIFEST}: {e}")))?;
    check_label(&manifest.label).map_err(|e| corrupt(e.to_string()))?;
    let mut files = Vec::with_capacity(manifest.files.len());
    for (i, f) in manifest.files.iter().enumerate() {
        let member = format!("files/{i}");
        let data = members
            .remove(&member)
            .ok_or_else(|| corrupt(format!("{member} (for {}) is missing", f.target)))?;
        let got = sha256(&data);
        if got != f.sha256 || data.len() as u64 != f.size {
            return Err(FixError::Checksum {
                path: shown,
                member,
                target: f.target.clone(),
                want: f.sha256.clone(),
                got,
            });
        }
        files.push(data);
    }
    check_targets(manifest.files.iter().map(|f| f.target.as_str())).map_err(corrupt)?;
    let mut script = |want: bool, name: &str| -> Result<Option<Vec<u8>>> {
        match (want, members.remove(name)) {
            (true, Some(s)) => Ok(Some(s)),
            (true, None) => Err(corrupt(format!("{name} is missing"))),
            (false, Some(_)) => Err(corrupt(format!("{name} is not in the manifest"))),
            (false, None) => Ok(None),
        }
    };
    let pre = script(manifest.pre, "scripts/pre")?;
    let post = script(manifest.post, "scripts/post")?;
    if let Some(extra) = members.keys().next() {
        return Err(corrupt(format!("{extra} is not in the manifest")));
    }
    Ok(Bundle {
        path: path.to_path_buf(),
        manifest,
        files,
        pre,
        post,
    })
}

/// A fix as a root records it.
#[derive(Debug, Clone)]
pub struct Installed {
    pub label: String,
    pub summary: String,
    pub state: State,
    /// Seconds since the epoch, when it was applied.
    pub time: u64,
}

fn record_dir(root: &Path, label: &str) -> PathBuf {
    root.join(RECORDS).join(label)
}

fn set_state(dir: &Path, s: State, time: u64) -> Result<()> {
    let path = dir.join("state");
    let tmp = dir.join("state.new");
    std::fs::write(&tmp, format!("{}\n{time}\n", s.code())).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Applies `b` to the root `root` (a clone): the pre script, the files (each written
/// beside its target and renamed over it, with its mode), the post script; recorded
/// as installing (I) first, then stable (S), or broken (B) if a step failed.
pub fn apply(b: &Bundle, root: &Path) -> Result<Installed> {
    stage(b, root)?.commit()
}

/// Writes `b`'s files into the root `root` beside their targets, recorded as
/// installing; [`Staged::commit`] then does the rest of [`apply`]. In a running
/// workload's root, that is how a package manager updates a live system: a process
/// that holds a target keeps the file it had, and the next open gets the fix's.
pub fn stage(b: &Bundle, root: &Path) -> Result<Staged> {
    let (dir, time) = begin(b, root)?;
    write_beside(b, root, dir.clone(), time).inspect_err(|_| {
        let _ = set_state(&dir, State::Broken, time);
    })
}

/// A fix's files beside their targets, not yet in place, nor its scripts run.
#[derive(Debug)]
pub struct Staged {
    root: PathBuf,
    label: String,
    summary: String,
    pre: Option<Vec<u8>>,
    post: Option<Vec<u8>>,
    record: PathBuf,
    time: u64,
    moves: Moves,
}

impl Staged {
    /// The pre script, every file in place, the post script: recorded stable, or
    /// broken if a step failed.
    pub fn commit(self) -> Result<Installed> {
        let steps = || -> Result<()> {
            if let Some(s) = &self.pre {
                run_script(&self.root, &self.label, "pre", s)?;
            }
            self.put_in_place()?;
            if let Some(s) = &self.post {
                run_script(&self.root, &self.label, "post", s)?;
            }
            Ok(())
        };
        if let Err(e) = steps() {
            let _ = set_state(&self.record, State::Broken, self.time);
            self.moves.discard();
            return Err(e);
        }
        set_state(&self.record, State::Stable, self.time)?;
        Ok(Installed {
            label: self.label,
            summary: self.summary,
            state: State::Stable,
            time: self.time,
        })
    }

    /// How many files it puts in place.
    pub fn files(&self) -> usize {
        self.moves.0.len()
    }

    fn put_in_place(&self) -> Result<()> {
        self.moves.put_in_place()
    }
}

/// Stages the removal of fix `label` from the root `root` (a running workload's): each
/// file it put in written beside its target as the file `originals` (the root it was
/// applied over) has there, or, where that has none, the target to be removed;
/// recorded as removing (R). [`Removal::commit`] puts them in place, as [`stage`]'s
/// commit does, and takes the fix off the record. Its scripts are not undone.
pub fn stage_removal(label: &str, root: &Path, originals: &Path) -> Result<Removal> {
    check_label(label)?;
    let record = record_dir(root, label);
    let m: Manifest = std::fs::read(record.join(MANIFEST))
        .ok()
        .and_then(|j| serde_json::from_slice(&j).ok())
        .ok_or_else(|| FixError::Bad {
            what: format!("fix {label} is not on record in {}", root.display()),
        })?;
    // A record the workload could have written: its targets checked as a bundle's.
    check_targets(m.files.iter().map(|f| f.target.as_str())).map_err(|what| FixError::Bad {
        what: format!("fix {label}'s record in {}: {what}", root.display()),
    })?;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    set_state(&record, State::Removing, time)?;
    let mut moves = Moves::default();
    for f in &m.files {
        let (target, was) = match (inside(root, &f.target), inside(originals, &f.target)) {
            (Ok(t), Ok(w)) => (t, w),
            (Err(e), _) | (_, Err(e)) => {
                moves.discard();
                return Err(e);
            }
        };
        match std::fs::symlink_metadata(&was) {
            Ok(meta) if meta.is_file() || meta.file_type().is_symlink() => {
                // As it was: a symlink as a symlink, a file with its owner, mode,
                // times and attributes.
                let tmp = beside(&target);
                let copied = copy_as_is(&was, &tmp);
                moves.0.push(Move::Put { tmp, target });
                if let Err(e) = copied {
                    moves.discard();
                    return Err(e);
                }
            }
            _ => moves.0.push(Move::Remove(target)),
        }
    }
    Ok(Removal {
        record,
        time,
        moves,
    })
}

/// `from` copied to `to` with everything it has, a symlink not followed (`cp -a`).
fn copy_as_is(from: &Path, to: &Path) -> Result<()> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io(from))?;
    if out.status.success() {
        return Ok(());
    }
    Err(FixError::Bad {
        what: format!(
            "copying {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// A fix's removal, staged.
#[derive(Debug)]
pub struct Removal {
    record: PathBuf,
    time: u64,
    moves: Moves,
}

impl Removal {
    /// Puts every original back, and the fix off the record.
    pub fn commit(self) -> Result<()> {
        if let Err(e) = self.moves.put_in_place() {
            let _ = set_state(&self.record, State::Broken, self.time);
            self.moves.discard();
            return Err(e);
        }
        std::fs::remove_dir_all(&self.record).map_err(io(&self.record))
    }

    /// How many files it puts back or removes.
    pub fn files(&self) -> usize {
        self.moves.0.len()
    }
}

/// What goes in place at a commit.
#[derive(Debug)]
enum Move {
    /// A file written beside its target, renamed over it.
    Put { tmp: PathBuf, target: PathBuf },
    /// A target the root had not: removed.
    Remove(PathBuf),
}

#[derive(Debug, Default)]
struct Moves(Vec<Move>);

impl Moves {
    fn put_in_place(&self) -> Result<()> {
        for m in &self.0 {
            match m {
                Move::Put { tmp, target } => std::fs::rename(tmp, target).map_err(io(target))?,
                Move::Remove(target) => match std::fs::remove_file(target) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(target)(e))
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }

    /// What did not go in is not left beside its target.
    fn discard(&self) {
        for m in &self.0 {
            if let Move::Put { tmp, .. } = m {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// Where a file to go over `target` is written first.
fn beside(target: &Path) -> PathBuf {
    target.with_file_name(format!(
        ".{}.liveupdate",
        target
            .file_name()
            .map_or("new".into(), |n| n.to_string_lossy())
    ))
}

/// Refuses a fix `root` has applied already, and records it there as installing: its
/// record's directory and the time.
fn begin(b: &Bundle, root: &Path) -> Result<(PathBuf, u64)> {
    let m = &b.manifest;
    let dir = record_dir(root, &m.label);
    if let Ok(s) = std::fs::read_to_string(dir.join("state")) {
        if State::parse(s.lines().next().unwrap_or("")) == Some(State::Stable) {
            return Err(FixError::Bad {
                what: format!("fix {} is already applied to {}", m.label, root.display()),
            });
        }
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let manifest = dir.join(MANIFEST);
    std::fs::write(
        &manifest,
        serde_json::to_vec_pretty(m).expect("plain data serializes"),
    )
    .map_err(io(&manifest))?;
    set_state(&dir, State::Installing, time)?;
    Ok((dir, time))
}

/// Each of `b`'s files written beside its target, with its mode; none of them, if
/// one could not be (a full disk, say).
fn write_beside(b: &Bundle, root: &Path, record: PathBuf, time: u64) -> Result<Staged> {
    use std::os::unix::fs::PermissionsExt;
    let mut moves = Moves::default();
    for (f, data) in b.manifest.files.iter().zip(&b.files) {
        let target = match inside(root, &f.target) {
            Ok(t) => t,
            Err(e) => {
                moves.discard();
                return Err(e);
            }
        };
        let parent = target.parent().unwrap_or(root);
        let tmp = beside(&target);
        let written = std::fs::create_dir_all(parent)
            .map_err(io(parent))
            .and_then(|()| std::fs::write(&tmp, data).map_err(io(&tmp)))
            .and_then(|()| {
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(f.mode))
                    .map_err(io(&tmp))
            });
        moves.0.push(Move::Put { tmp, target });
        if let Err(e) = written {
            moves.discard();
            return Err(e);
        }
    }
    Ok(Staged {
        root: root.to_path_buf(),
        label: b.manifest.label.clone(),
        summary: b.manifest.summary.clone(),
        pre: b.pre.clone(),
        post: b.post.clone(),
        record,
        time,
        moves,
    })
}

/// Runs a script chrooted in `root`, with `/bin/sh` of the root reading it on stdin.
fn run_script(root: &Path, label: &str, which: &'static str, script: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-s"])
        .env("LIVEUPDATE_FIX", label)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(io(Path::new("chroot")))?;
    let fed = child
        .stdin
        .take()
        .expect("piped")
        .write_all(script)
        .map_err(io(Path::new("chroot")));
    let st = child.wait().map_err(io(Path::new("chroot")))?;
    fed?;
    if st.success() {
        Ok(())
    } else {
        Err(FixError::Script {
            label: label.into(),
            which,
            status: st.to_string(),
            root: root.display().to_string(),
        })
    }
}

/// The fixes recorded on `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<Installed>> {
    let dir = root.join(RECORDS);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io(&dir))?;
        let d = e.path();
        let m = d.join(MANIFEST);
        let Ok(json) = std::fs::read(&m) else {
            continue;
        };
        let Ok(man) = serde_json::from_slice::<Manifest>(&json) else {
            continue;
        };
        let st = std::fs::read_to_string(d.join("state")).unwrap_or_default();
        let mut lines = st.lines();
        out.push(Installed {
            label: man.label,
            summary: man.summary,
            // No state written: the application died before its first step.
            state: lines
                .next()
                .and_then(State::parse)
                .unwrap_or(State::Installing),
            time: lines.next().and_then(|t| t.parse().ok()).unwrap_or(0),
        });
    }
    out.sort_by(|a, b| (a.time, &a.label).cmp(&(b.time, &b.label)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removal_refused(label: &str, root: &Path, originals: &Path) -> String {
        stage_removal(label, root, originals)
            .unwrap_err()
            .to_string()
    }

    /// The bundle of [`new_fix`], made in `dir`.
    fn bundle(dir: &Path) -> PathBuf {
        let fix = dir.join("fix.tar.zst");
        create(&fix, &new_fix(dir)).unwrap();
        fix
    }

    fn new_fix(dir: &Path) -> NewFix {
        std::fs::write(dir.join("lib"), b"the fixed library").unwrap();
        std::fs::write(dir.join("conf"), b"fixed = yes\n").unwrap();
        NewFix {
            label: "IJ12345s1a".into(),
            summary: "Fixes the library".into(),
            lu_capable: true,
            files: vec![
                (dir.join("lib"), "/usr/lib/libfixed.so.1".into()),
                (dir.join("conf"), "/etc/fixed.conf".into()),
            ],
            pre: None,
            post: None,
        }
    }

    /// Staged in a running root, a fix is installing until it commits; then a file
    /// held open across the commit is still the one it was, and the next open is the
    /// fix's.
    #[test]
    fn a_staged_fix_goes_in_at_commit_and_what_is_held_stays_as_it_was() {
        use std::io::Read;
        let tmp = tempfile::tempdir().unwrap();
        let fix = bundle(tmp.path());
        let b = open(&fix).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/fixed.conf"), b"fixed = no\n").unwrap();
        let mut held = std::fs::File::open(root.join("etc/fixed.conf")).unwrap();
        let staged = stage(&b, &root).unwrap();
        assert_eq!(staged.files(), 2);
        let state = || list(&root).unwrap()[0].state;
        assert_eq!(state(), State::Installing);
        assert_eq!(
            std::fs::read(root.join("etc/fixed.conf")).unwrap(),
            b"fixed = no\n",
            "in place before the commit"
        );
        assert!(!root.join("usr/lib/libfixed.so.1").exists());
        assert_eq!(staged.commit().unwrap().state, State::Stable);
        assert_eq!(state(), State::Stable);
        assert_eq!(
            std::fs::read(root.join("etc/fixed.conf")).unwrap(),
            b"fixed = yes\n"
        );
        let mut was = Vec::new();
        held.read_to_end(&mut was).unwrap();
        assert_eq!(was, b"fixed = no\n");
        assert!(stage(&b, &root).is_err(), "applied already");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("etc"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".liveupdate"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// Staged, a fix's scripts wait for the commit too: the pre script then sees the
    /// root as it was, the post script the fix in place.
    #[test]
    fn a_staged_fixs_scripts_run_at_its_commit_around_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        root_with_shell(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/fixed.conf"), "fixed = no\n").unwrap();
        let mut f = new_fix(tmp.path());
        for (which, to) in [("pre", "/pre-saw"), ("post", "/post-saw")] {
            std::fs::write(
                tmp.path().join(which),
                format!("read l < /etc/fixed.conf; echo \"$l\" > {to}\n"),
            )
            .unwrap();
        }
        f.pre = Some(tmp.path().join("pre"));
        f.post = Some(tmp.path().join("post"));
        let fix = tmp.path().join("fix.tar.zst");
        create(&fix, &f).unwrap();
        let staged = stage(&open(&fix).unwrap(), &root).unwrap();
        assert!(!root.join("pre-saw").exists(), "run at the stage");
        staged.commit().unwrap();
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
        assert_eq!(read("pre-saw"), "fixed = no\n");
        assert_eq!(read("post-saw"), "fixed = yes\n");
    }

    /// Removed from a root, a fix puts back each file it replaced as the root it was
    /// applied over has it, removes the ones that root had not, and is off the record:
    /// all at the commit.
    #[test]
    fn a_fix_removed_puts_back_what_it_replaced_at_the_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let fix = bundle(tmp.path());
        let (before, root) = (tmp.path().join("before"), tmp.path().join("root"));
        for r in [&before, &root] {
            std::fs::create_dir_all(r.join("etc")).unwrap();
            std::fs::write(r.join("etc/fixed.conf"), b"fixed = no\n").unwrap();
        }
        apply(&open(&fix).unwrap(), &root).unwrap();
        std::fs::write(root.join("etc/other"), b"written since").unwrap();
        let r = stage_removal("IJ12345s1a", &root, &before).unwrap();
        assert_eq!(r.files(), 2);
        assert_eq!(list(&root).unwrap()[0].state, State::Removing);
        assert!(
            root.join("usr/lib/libfixed.so.1").exists(),
            "removed at the stage"
        );
        r.commit().unwrap();
        assert_eq!(
            std::fs::read(root.join("etc/fixed.conf")).unwrap(),
            b"fixed = no\n"
        );
        assert!(!root.join("usr/lib/libfixed.so.1").exists());
        assert_eq!(
            std::fs::read(root.join("etc/other")).unwrap(),
            b"written since"
        );
        assert!(list(&root).unwrap().is_empty());
        let e = removal_refused("IJ12345s1a", &root, &before);
        assert!(e.contains("not on record"), "{e}");
    }

    #[test]
    fn a_removal_puts_a_link_back_as_a_link_and_a_file_with_its_owner() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let fix = bundle(tmp.path());
        let (before, root) = (tmp.path().join("before"), tmp.path().join("root"));
        for r in [&before, &root] {
            std::fs::create_dir_all(r.join("etc")).unwrap();
            std::fs::create_dir_all(r.join("usr/lib")).unwrap();
            std::fs::write(r.join("etc/fixed.conf"), b"fixed = no\n").unwrap();
            std::os::unix::fs::chown(r.join("etc/fixed.conf"), Some(4321), Some(4322)).unwrap();
            std::os::unix::fs::symlink("libfixed.so.1.2", r.join("usr/lib/libfixed.so.1")).unwrap();
        }
        apply(&open(&fix).unwrap(), &root).unwrap();
        assert!(root.join("usr/lib/libfixed.so.1").is_file());
        stage_removal("IJ12345s1a", &root, &before)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(
            std::fs::read_link(root.join("usr/lib/libfixed.so.1")).unwrap(),
            Path::new("libfixed.so.1.2")
        );
        let m = std::fs::metadata(root.join("etc/fixed.conf")).unwrap();
        assert_eq!((m.uid(), m.gid()), (4321, 4322));
    }

    #[test]
    fn a_link_on_the_way_is_followed_inside_the_root_never_out_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(inside(&root, "/lib/x").unwrap(), root.join("usr/lib/x"));
        assert_eq!(inside(&root, "/up/etc/x").unwrap(), root.join("etc/x"));
        // The last part is the target itself: replaced, not followed.
        assert_eq!(inside(&root, "/lib").unwrap(), root.join("lib"));
        let e = inside(&root, "/loop/x").unwrap_err().to_string();
        assert!(e.contains("too many links"), "{e}");
    }

    #[test]
    fn a_target_twice_or_a_record_that_leaves_the_root_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = new_fix(tmp.path());
        f.files
            .push((tmp.path().join("conf"), "/etc/fixed.conf".into()));
        let e = create(&tmp.path().join("fix.tar.zst"), &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        // A record in a running root that the workload rewrote.
        let fix = tmp.path().join("ok.tar.zst");
        create(&fix, &new_fix(tmp.path())).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        apply(&open(&fix).unwrap(), &root).unwrap();
        let rec = record_dir(&root, "IJ12345s1a").join(MANIFEST);
        let j = std::fs::read_to_string(&rec).unwrap();
        std::fs::write(&rec, j.replace("/etc/fixed.conf", "/../../etc/passwd")).unwrap();
        let e = removal_refused("IJ12345s1a", &root, tmp.path());
        assert!(e.contains("without '..'"), "{e}");
        let e = removal_refused("../x", &root, tmp.path());
        assert!(e.contains("fix label"), "{e}");
    }

    #[test]
    fn a_bundle_reads_back_as_made_and_applies_to_a_root_on_record() {
        let tmp = tempfile::tempdir().unwrap();
        let fix = tmp.path().join("fix.tar.zst");
        let made = create(&fix, &new_fix(tmp.path())).unwrap();
        let b = open(&fix).unwrap();
        assert_eq!(b.manifest, made);
        assert_eq!(b.files[0], b"the fixed library");
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        apply(&b, &root).unwrap();
        assert_eq!(
            std::fs::read(root.join("usr/lib/libfixed.so.1")).unwrap(),
            b"the fixed library"
        );
        let l = list(&root).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].label.as_str(), l[0].state),
            ("IJ12345s1a", State::Stable)
        );
        // Twice is refused by name.
        let again = apply(&b, &root).unwrap_err().to_string();
        assert!(again.contains("already applied"), "{again}");
    }

    #[test]
    fn a_damaged_file_in_a_bundle_is_named_before_anything_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let fix = bundle(tmp.path());
        // Rewrite the archive with one file's bytes changed, the manifest kept.
        let raw = zstd::decode_all(std::fs::File::open(&fix).unwrap()).unwrap();
        let at = raw
            .windows(17)
            .position(|w| w == b"the fixed library")
            .unwrap();
        let mut bad = raw.clone();
        bad[at] = b'T';
        // The tar header's own checksum covers the header, not the data.
        std::fs::write(&fix, zstd::encode_all(&bad[..], 3).unwrap()).unwrap();
        let e = open(&fix).err().expect("a damaged bundle");
        assert!(matches!(e, FixError::Checksum { .. }), "{e}");
        let said = e.to_string();
        assert!(said.contains("/usr/lib/libfixed.so.1"), "{said}");
        assert_eq!(e.exit_code(), 3);
        std::fs::write(&fix, b"not a bundle").unwrap();
        assert_eq!(open(&fix).err().unwrap().exit_code(), 3);
    }

    /// A root with a shell in it, as a clone of a real root disk has: /bin/sh and the
    /// libraries it loads, copied from ours.
    fn root_with_shell(root: &Path) {
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let ldd = std::process::Command::new("ldd").arg(&sh).output().unwrap();
        let mut files = vec![sh.clone()];
        for l in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
        for f in files {
            let to = root.join(f.strip_prefix("/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&f, &to).unwrap();
        }
        std::fs::create_dir_all(root.join("bin")).unwrap();
        if !root.join("bin/sh").exists() {
            std::os::unix::fs::symlink(&sh, root.join("bin/sh")).unwrap();
        }
    }

    #[test]
    fn scripts_run_in_the_root_and_a_failing_one_marks_the_fix_broken() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        root_with_shell(&root);
        let mut f = new_fix(tmp.path());
        // Run chrooted: "/" is the root, and the file is there after the pre script.
        std::fs::write(
            tmp.path().join("pre"),
            "echo pre $LIVEUPDATE_FIX > /pre-ran\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("post"),
            "test -f /usr/lib/libfixed.so.1 && echo post > /post-ran\n",
        )
        .unwrap();
        f.pre = Some(tmp.path().join("pre"));
        f.post = Some(tmp.path().join("post"));
        let fix = tmp.path().join("fix.tar.zst");
        create(&fix, &f).unwrap();
        apply(&open(&fix).unwrap(), &root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("pre-ran")).unwrap(),
            "pre IJ12345s1a\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("post-ran")).unwrap(),
            "post\n"
        );
        // A pre script that fails: nothing of the fix goes in, and it is marked broken.
        let root2 = tmp.path().join("root2");
        root_with_shell(&root2);
        std::fs::write(tmp.path().join("pre"), "exit 3\n").unwrap();
        f.label = "IJ99999s1a".into();
        create(&fix, &f).unwrap();
        let e = apply(&open(&fix).unwrap(), &root2).unwrap_err();
        assert!(matches!(e, FixError::Script { which: "pre", .. }), "{e}");
        assert!(!root2.join("usr/lib/libfixed.so.1").exists());
        assert!(!root2.join("usr/lib/.libfixed.so.1.liveupdate").exists());
        let l = list(&root2).unwrap();
        assert_eq!(
            (l[0].label.as_str(), l[0].state),
            ("IJ99999s1a", State::Broken)
        );
    }
}
