//! Partitions: Linux sandboxes a workload runs in and moves between.
//!
//! A partition has its own mount, pid, uts, ipc and network namespaces and a cgroup
//! (v2) of its own, a root disk (a directory tree or an image, see `disk.rs`) and an
//! address on the console's bridge. The address belongs to the partition, not to its
//! sandbox: a live update moves it to the surrogate with the workload.
//!
//! Its processes see their root at `mount_at`, a bind mount of the disk in their own
//! mount namespace. A surrogate's disk is a mirror of the original's (an overlay on
//! it, see `disk::mirror`), bound there, so the workload keeps every path it had and
//! every file it holds (mcr restores a tree's own binds from what the restorer sees
//! there).
//!
//! Everything here goes through tools (`ip`, `nsenter`, `unshare`) and cgroupfs; the
//! console (`console.rs`) is the one that calls it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("partition {0:?} does not exist")]
    NoSuch(String),
    #[error("partition name {0:?} is taken")]
    NameTaken(String),
    #[error("partition id {id} is taken by {by:?}")]
    IdTaken { id: u16, by: String },
    #[error("partition {name:?}: {what}")]
    Refused { name: String, what: String },
    #[error("partition {name:?}: {step}: `{command}` failed: {why}")]
    Tool {
        name: String,
        step: String,
        command: String,
        why: String,
    },
    #[error("partition {name:?}: {step}: {source}")]
    Kernel {
        name: String,
        step: String,
        #[source]
        source: kext_shim::Error,
    },
    #[error("partition {name:?}: {step}: {path}: {source}")]
    Io {
        name: String,
        step: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the console's partition table is damaged: {why}")]
    Damaged { path: String, why: String },
}

type Result<T> = std::result::Result<T, PartitionError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Made (namespaces' network, cgroup), nothing running in it.
    Defined,
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub id: u16,
    pub name: String,
    /// Its root disk.
    pub disk: PathBuf,
    /// Where its processes see their root (a bind of `disk`).
    pub mount_at: PathBuf,
    /// Its address with prefix (`10.88.0.12/24`); on its interface while it holds it.
    pub address: String,
    pub state: State,
    /// Its pid 1, as the host sees it, while running.
    pub init: Option<i32>,
    /// Whether the address is on its interface now.
    pub holds_address: bool,
    /// Its network namespace, as `ip netns` names it.
    pub netns: String,
    /// Its cgroup (v2) directory.
    pub cgroup: PathBuf,
    /// What its pid 1 was started as (a cold restart starts it again).
    #[serde(default)]
    pub command: Vec<String>,
    /// Its interface's MAC, which the host's neighbour entry for its address is set
    /// to when it takes the address.
    #[serde(default)]
    pub mac: String,
}

impl Partition {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// `nsenter` into its network namespace, the program and its arguments to follow:
    /// mcr wants the workload's own namespace, and so do the partition's processes.
    pub fn in_netns(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()));
        cmd
    }

    /// The address without its prefix length.
    pub fn ip(&self) -> &str {
        self.address.split('/').next().unwrap_or(&self.address)
    }

    /// Its address and prefix length, if IPv4 as partitions' are.
    pub fn ipv4(&self) -> Option<(std::net::Ipv4Addr, u8)> {
        let (ip, prefix) = self.address.split_once('/')?;
        Some((
            ip.parse().ok()?,
            prefix.parse().ok().filter(|&n: &u8| n <= 32)?,
        ))
    }
}

/// What a new partition is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPartition {
    pub name: String,
    pub disk: PathBuf,
    /// The id asked for; the lowest free one otherwise.
    pub id: Option<u16>,
    /// Its own address; one of the bridge's subnet by id otherwise.
    pub address: Option<String>,
    /// Where its processes see their root; its disk's path otherwise.
    pub mount_at: Option<PathBuf>,
    /// What its workload was started as, when it moves in from another partition.
    #[serde(default)]
    pub command: Vec<String>,
}

/// The host side: where partitions attach, and where their cgroups and table live.
#[derive(Debug, Clone)]
pub struct Host {
    /// The console's state directory (`console/partitions.json` in it).
    pub state: PathBuf,
    pub bridge: String,
    /// The bridge's address with prefix: partitions' addresses are in its subnet.
    pub gateway: String,
    /// The cgroup v2 directory partitions' cgroups are made in.
    pub cgroups: PathBuf,
}

/// The first cgroup v2 mount of this mount namespace.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (right.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

fn run(name: &str, step: &str, cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PartitionError::Tool {
            name: name.into(),
            step: step.into(),
            command: shown.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PartitionError::Tool {
            name: name.into(),
            step: step.into(),
            command: shown,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(name: &str, step: &str, args: &[&str]) -> Result<String> {
    run(name, step, Command::new("ip").args(args))
}

impl Host {
    pub fn table_path(&self) -> PathBuf {
        self.state.join("console/partitions.json")
    }

    pub fn load(&self) -> Result<Vec<Partition>> {
        let path = self.table_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PartitionError::Damaged {
                path: path.display().to_string(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(PartitionError::Io {
                name: "-".into(),
                step: "reading the partition table".into(),
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes the table whole or not at all.
    pub fn save(&self, parts: &[Partition]) -> Result<()> {
        let path = self.table_path();
        let io = |source| PartitionError::Io {
            name: "-".into(),
            step: "writing the partition table".into(),
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().expect("under the state directory");
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("json.new");
        let body = serde_json::to_vec_pretty(parts).expect("a table serializes");
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn ensure_bridge(&self) -> Result<()> {
        let br = &self.bridge;
        if Path::new("/sys/class/net").join(br).exists() {
            return Ok(());
        }
        ip(
            "-",
            "making the bridge",
            &["link", "add", br, "type", "bridge"],
        )?;
        // A bridge takes the lowest MAC of its ports unless given one: a surrogate's
        // port joining would change it, and every partition's cached neighbour entry
        // for the gateway would point nowhere until it timed out.
        let gw: std::net::Ipv4Addr = self
            .gateway
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| PartitionError::Refused {
                name: "-".into(),
                what: format!("gateway {:?} is not an IPv4 ADDR/PREFIX", self.gateway),
            })?;
        let o = gw.octets();
        let mac = format!("02:4c:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        ip(
            "-",
            "giving the bridge its address",
            &["link", "set", br, "address", &mac],
        )?;
        ip(
            "-",
            "addressing the bridge",
            &["addr", "add", &self.gateway, "dev", br],
        )?;
        ip("-", "bringing the bridge up", &["link", "set", br, "up"])?;
        Ok(())
    }

    /// An address of the bridge's subnet for partition `id` (its `.10 + id`).
    fn address_for(&self, id: u16) -> Result<String> {
        let (gw, prefix) = self
            .gateway
            .split_once('/')
            .unwrap_or((&self.gateway, "24"));
        let mut octets: Vec<u8> = gw.split('.').filter_map(|o| o.parse().ok()).collect();
        if octets.len() != 4 || prefix != "24" || id > 240 {
            return Err(PartitionError::Refused {
                name: format!("#{id}"),
                what: format!(
                    "no address to hand out from {} for id {id}: give one",
                    self.gateway
                ),
            });
        }
        octets[3] = 10 + id as u8;
        let o = &octets;
        Ok(format!("{}.{}.{}.{}/{prefix}", o[0], o[1], o[2], o[3]))
    }

    /// Makes a partition: its network namespace on the bridge and its cgroup.
    pub fn create(&self, parts: &mut Vec<Partition>, req: &NewPartition) -> Result<Partition> {
        let name = &req.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(PartitionError::Refused {
                name: name.clone(),
                what: "a name is 1 to 64 of [A-Za-z0-9_.-]".into(),
            });
        }
        if parts.iter().any(|p| &p.name == name) {
            return Err(PartitionError::NameTaken(name.clone()));
        }
        let id = match req.id {
            Some(id) => {
                if let Some(p) = parts.iter().find(|p| p.id == id) {
                    return Err(PartitionError::IdTaken {
                        id,
                        by: p.name.clone(),
                    });
                }
                if id == 0 {
                    return Err(PartitionError::Refused {
                        name: name.clone(),
                        what: "partition ids start at 1".into(),
                    });
                }
                id
            }
            None => (1..=u16::MAX)
                .find(|i| !parts.iter().any(|p| p.id == *i))
                .expect("fewer than 65535 partitions"),
        };
        let image = match crate::disk::kind(&req.disk) {
            Ok(k) => k == crate::disk::Kind::Image,
            Err(e) => {
                return Err(PartitionError::Refused {
                    name: name.clone(),
                    what: e.to_string(),
                })
            }
        };
        let address = match &req.address {
            Some(a) => a.clone(),
            None => self.address_for(id)?,
        };
        // An address given is the operator's: a surrogate is made with the one it takes
        // over. One handed out must be nobody's.
        let wanted = address.split('/').next().unwrap_or("");
        if let Some(p) = parts.iter().find(|p| p.ip() == wanted) {
            if req.address.is_none() {
                return Err(PartitionError::Refused {
                    name: name.clone(),
                    what: format!("address {address} belongs to partition {:?}", p.name),
                });
            }
        }
        let disk = req.disk.canonicalize().unwrap_or_else(|_| req.disk.clone());
        // An image's processes see it where it is mounted, unless told otherwise.
        let mount_at = match &req.mount_at {
            Some(m) => m.clone(),
            None if image => crate::disk::root_point(&disk),
            None => disk.clone(),
        };
        let p = Partition {
            id,
            name: name.clone(),
            disk,
            mount_at,
            address,
            state: State::Defined,
            init: None,
            holds_address: false,
            netns: format!("{}-{id}", self.bridge),
            cgroup: self.cgroups.join(format!("p{id}")),
            command: req.command.clone(),
            mac: String::new(),
        };
        self.ensure_bridge()?;
        let mut p = p;
        match self.make_sandbox(&p) {
            Ok(mac) => p.mac = mac,
            Err(e) => {
                self.unmake_sandbox(&p);
                return Err(e);
            }
        }
        parts.push(p.clone());
        self.save(parts)?;
        Ok(p)
    }

    /// Its network namespace, interface on the bridge, routes and cgroup; the
    /// interface's MAC.
    fn make_sandbox(&self, p: &Partition) -> Result<String> {
        let (n, ns) = (p.name.as_str(), p.netns.clone());
        let outer = format!("{}h{}", self.bridge, p.id);
        ip(n, "making its network namespace", &["netns", "add", &ns])?;
        ip(
            n,
            "making its interface",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(
            n,
            "attaching it to the bridge",
            &["link", "set", &outer, "master", &self.bridge, "up"],
        )?;
        ip(
            n,
            "bringing its interfaces up",
            &["-n", &ns, "link", "set", "lo", "up"],
        )?;
        ip(
            n,
            "bringing its interfaces up",
            &["-n", &ns, "link", "set", "eth0", "up"],
        )?;
        // Routes before any address: a surrogate makes the workload's connections
        // again (from an address that is not yet its) before the address moves in.
        let gw = self.gateway.split('/').next().unwrap_or(&self.gateway);
        ip(
            n,
            "routing to the bridge",
            &[
                "-n",
                &ns,
                "route",
                "add",
                &subnet(&self.gateway)?,
                "dev",
                "eth0",
            ],
        )?;
        ip(
            n,
            "routing through the bridge",
            &[
                "-n", &ns, "route", "add", "default", "via", gw, "dev", "eth0", "onlink",
            ],
        )?;
        let cg = p.cgroup.clone();
        std::fs::create_dir_all(&cg).map_err(|source| PartitionError::Io {
            name: n.into(),
            step: "making its cgroup".into(),
            path: cg.display().to_string(),
            source,
        })?;
        let link = ip(
            n,
            "reading its interface",
            &["-n", &ns, "-o", "link", "show", "eth0"],
        )?;
        link.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(String::from)
            .ok_or_else(|| PartitionError::Refused {
                name: n.into(),
                what: format!("its interface has no MAC: {link}"),
            })
    }

    /// Best effort: what `make_sandbox` made, gone.
    fn unmake_sandbox(&self, p: &Partition) {
        let _ = ip(&p.name, "-", &["netns", "del", &p.netns.clone()]);
        let _ = std::fs::remove_dir(p.cgroup.clone());
    }

    /// Puts the partition's address on its interface, takes it off wherever else it
    /// is, and points the host's neighbour entry for it at this interface. At a live
    /// update this is inside the blackout: the three change at once.
    pub fn take_address(&self, parts: &mut [Partition], name: &str) -> Result<()> {
        let i = find(parts, name)?;
        let p = parts[i].clone();
        let holders: Vec<usize> = (0..parts.len())
            .filter(|&j| j != i && parts[j].holds_address && parts[j].ip() == p.ip())
            .collect();
        let kernel = |who: &str, step: &'static str| {
            let who = who.to_string();
            move |source| PartitionError::Kernel {
                name: who.clone(),
                step: step.into(),
                source,
            }
        };
        let (ip, prefix) = p.ipv4().ok_or_else(|| PartitionError::Refused {
            name: name.into(),
            what: format!("its address {:?} is not IPv4/prefix", p.address),
        })?;
        // Inside a migration's blackout: messages, not programs (an `ip` each cost
        // 7-12 ms together here).
        if !p.holds_address {
            kext_shim::rtnl::Link::in_netns(&p.netns_path(), "eth0")
                .and_then(|l| l.add_address(ip, prefix))
                .map_err(kernel(name, "taking its address"))?;
        }
        for &j in &holders {
            let o = &parts[j];
            let (oip, oprefix) = o.ipv4().unwrap_or((ip, prefix));
            kext_shim::rtnl::Link::in_netns(&o.netns_path(), "eth0")
                .and_then(|l| l.delete_address(oip, oprefix))
                .map_err(kernel(&o.name, "giving up the address"))?;
        }
        // The host's entry for the address names the new interface at once, rather
        // than being flushed after the change and asked for again.
        match kext_shim::rtnl::parse_mac(&p.mac) {
            Some(mac) => kext_shim::rtnl::Link::here(&self.bridge)
                .and_then(|l| l.replace_neighbour(ip, mac))
                .map_err(kernel(name, "pointing the host at it"))?,
            None => {
                self::ip(
                    name,
                    "pointing the host at it",
                    &["neigh", "flush", "dev", &self.bridge, "to", p.ip()],
                )?;
            }
        }
        for j in holders {
            parts[j].holds_address = false;
        }
        parts[i].holds_address = true;
        self.save(parts)
    }

    /// Starts `command` (a path inside its disk, and arguments) as the partition's
    /// pid 1, chrooted at `mount_at` in its new namespaces and cgroup, its stdio on
    /// its /dev/null. Returns once it runs.
    pub fn start(
        &self,
        parts: &mut [Partition],
        name: &str,
        command: &[String],
    ) -> Result<Partition> {
        let i = find(parts, name)?;
        let p = parts[i].clone();
        if p.state == State::Running {
            return Err(PartitionError::Refused {
                name: name.into(),
                what: format!("is running already (pid {})", p.init.unwrap_or(0)),
            });
        }
        let Some(first) = command.first() else {
            return Err(PartitionError::Refused {
                name: name.into(),
                what: "no command to start".into(),
            });
        };
        let files = crate::disk::files(&p.disk).map_err(|e| PartitionError::Refused {
            name: name.into(),
            what: e.to_string(),
        })?;
        let inside = files.join(first.trim_start_matches('/'));
        std::fs::create_dir_all(&p.mount_at).map_err(|source| PartitionError::Io {
            name: name.into(),
            step: "making the place its root is seen at".into(),
            path: p.mount_at.display().to_string(),
            source,
        })?;
        if !inside.is_file() {
            return Err(PartitionError::Refused {
                name: name.into(),
                what: format!("{first} is not a file on its disk ({})", inside.display()),
            });
        }
        self.take_address(parts, name)?;
        let me = std::env::current_exe().map_err(|source| PartitionError::Io {
            name: name.into(),
            step: "finding liveupdate itself".into(),
            path: "/proc/self/exe".into(),
            source,
        })?;
        let mut cmd = p.in_netns();
        cmd.args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--uts",
            "--ipc",
            "--pid",
            "--fork",
        ])
        .arg(me)
        .arg("partition-init")
        .arg("--name")
        .arg(&p.name)
        .arg("--disk")
        .arg(&files)
        .arg("--mount-at")
        .arg(&p.mount_at)
        .arg("--cgroup")
        .arg(p.cgroup.clone())
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| PartitionError::Tool {
            name: name.into(),
            step: "starting its init".into(),
            command: "nsenter ... unshare ... liveupdate partition-init".into(),
            why: e.to_string(),
        })?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut out, &mut line);
        if !line.starts_with("READY") {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(PartitionError::Refused {
                name: name.into(),
                what: format!("its init did not start: {}", err.trim()),
            });
        }
        // unshare waits for its child; whoever reaps it, nothing waits on us.
        std::thread::spawn(move || child.wait());
        let init = self
            .members(&p)?
            .first()
            .copied()
            .ok_or_else(|| PartitionError::Refused {
                name: name.into(),
                what: "its init left its cgroup".into(),
            })?;
        parts[i].state = State::Running;
        parts[i].init = Some(init);
        parts[i].command = command.to_vec();
        self.save(parts)?;
        Ok(parts[i].clone())
    }

    /// The pids in the partition's cgroup.
    pub fn members(&self, p: &Partition) -> Result<Vec<i32>> {
        let f = p.cgroup.clone().join("cgroup.procs");
        let s = std::fs::read_to_string(&f).map_err(|source| PartitionError::Io {
            name: p.name.clone(),
            step: "reading its cgroup".into(),
            path: f.display().to_string(),
            source,
        })?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// A workload moved in: the tree at `init` (already in its cgroup) is its now.
    pub fn adopt(&self, parts: &mut [Partition], name: &str, init: i32) -> Result<Partition> {
        let i = find(parts, name)?;
        if !self.members(&parts[i])?.contains(&init) {
            return Err(PartitionError::Refused {
                name: name.into(),
                what: format!("pid {init} is not in its cgroup"),
            });
        }
        parts[i].state = State::Running;
        parts[i].init = Some(init);
        self.save(parts)?;
        Ok(parts[i].clone())
    }

    /// Kills everything in it (cgroup.kill) and waits until its cgroup is empty.
    pub fn stop(&self, parts: &mut [Partition], name: &str) -> Result<Partition> {
        let i = find(parts, name)?;
        let p = parts[i].clone();
        let io = |step: &str, path: &Path, source| PartitionError::Io {
            name: name.into(),
            step: step.into(),
            path: path.display().to_string(),
            source,
        };
        let cg = p.cgroup.clone();
        if cg.exists() {
            let kill = cg.join("cgroup.kill");
            std::fs::write(&kill, "1").map_err(|e| io("killing its processes", &kill, e))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.members(&p)?.is_empty() {
                if Instant::now() > deadline {
                    return Err(PartitionError::Refused {
                        name: name.into(),
                        what: format!("processes {:?} outlived cgroup.kill", self.members(&p)?),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        parts[i].state = State::Defined;
        parts[i].init = None;
        self.save(parts)?;
        Ok(parts[i].clone())
    }

    pub fn rename(&self, parts: &mut [Partition], from: &str, to: &str) -> Result<Partition> {
        let i = find(parts, from)?;
        if parts.iter().any(|p| p.name == to) {
            return Err(PartitionError::NameTaken(to.into()));
        }
        parts[i].name = to.into();
        self.save(parts)?;
        Ok(parts[i].clone())
    }

    /// Stops it if it runs, then removes its namespaces, cgroup and entry. Its disk
    /// stays: disks are the operation's, not the console's.
    pub fn destroy(&self, parts: &mut Vec<Partition>, name: &str) -> Result<Partition> {
        self.stop(parts, name)?;
        let i = find(parts, name)?;
        let p = parts[i].clone();
        // Its interface goes at once; the namespace's own end goes with the namespace,
        // which the kernel tears down later: a partition made next with the same id
        // would meet the old name.
        let _ = ip(
            name,
            "removing its interface",
            &["link", "del", &format!("{}h{}", self.bridge, p.id)],
        );
        ip(
            name,
            "removing its network namespace",
            &["netns", "del", &p.netns.clone()],
        )?;
        let cg = p.cgroup.clone();
        remove_cgroup(&cg).map_err(|source| PartitionError::Io {
            name: name.into(),
            step: "removing its cgroup".into(),
            path: cg.display().to_string(),
            source,
        })?;
        parts.remove(i);
        self.save(parts)?;
        // An image no partition uses any more is unmounted (its namespaces ended
        // with its processes); one another partition still runs on stays.
        if p.mount_at.starts_with(crate::disk::ROOTS)
            && !parts.iter().any(|o| o.mount_at == p.mount_at)
        {
            let _ = std::fs::remove_dir(&p.mount_at);
        }
        // So is what it rested on (the original root under a mirror), unless it is
        // still used or rested on.
        // (An overlay rests on another's layer, not on its mount: only an image under
        // a mirror must stay mounted.)
        let used = |d: &Path| {
            let image = crate::disk::kind(d).ok() == Some(crate::disk::Kind::Image);
            parts.iter().any(|o| {
                o.disk == d || (image && crate::disk::rests_on(&o.disk).iter().any(|u| u == d))
            })
        };
        let mut disks = vec![p.disk.clone()];
        disks.extend(crate::disk::rests_on(&p.disk));
        for d in disks.iter().filter(|d| !used(d)) {
            crate::disk::release(d).map_err(|e| PartitionError::Refused {
                name: name.into(),
                what: e.to_string(),
            })?;
        }
        Ok(p)
    }
}

/// Removes an empty cgroup directory (if it is there). Its last tasks may still be
/// on their way out of it (EBUSY) a moment after they left cgroup.procs.
pub fn remove_cgroup(cg: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.exists() {
        match std::fs::remove_dir(cg) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The network of an IPv4 `ADDR/PREFIX` (`10.88.0.1/24` is `10.88.0.0/24`).
fn subnet(cidr: &str) -> Result<String> {
    let bad = || PartitionError::Refused {
        name: "-".into(),
        what: format!("{cidr:?} is not an IPv4 ADDR/PREFIX"),
    };
    let (a, p) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let len: u32 = p.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Ok(format!(
        "{}/{len}",
        std::net::Ipv4Addr::from(u32::from(addr) & mask)
    ))
}

fn find(parts: &[Partition], name: &str) -> Result<usize> {
    parts
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| PartitionError::NoSuch(name.into()))
}

/// What `liveupdate partition-init` is told: run as pid 1 of a partition's new
/// namespaces, not yet in its root.
pub struct InitPlan<'a> {
    pub name: &'a str,
    pub disk: &'a Path,
    pub mount_at: &'a Path,
    pub cgroup: &'a Path,
    pub command: &'a [String],
}

/// Sets the partition up from inside and becomes its command: into its cgroup
/// before anything forks, its disk bound at `mount_at`, its host name, chrooted
/// there, stdio on its /dev/null. Prints `READY` on the way, for the console.
pub fn init(plan: &InitPlan) -> Result<std::convert::Infallible> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let name = plan.name;
    let sys = |step: &str, path: &Path, e: nix::errno::Errno| PartitionError::Io {
        name: name.into(),
        step: step.into(),
        path: path.display().to_string(),
        source: std::io::Error::from(e),
    };
    let procs = plan.cgroup.join("cgroup.procs");
    // "0" is the writer, whatever its pid is in there.
    std::fs::write(&procs, "0").map_err(|source| PartitionError::Io {
        name: name.into(),
        step: "entering its cgroup".into(),
        path: procs.display().to_string(),
        source,
    })?;
    // The host's named network namespaces come and go; a copy of them here would be
    // mounts the partition has and the host no longer does.
    let _ = umount2("/run/netns", MntFlags::MNT_DETACH);
    mount(
        Some(plan.disk),
        plan.mount_at,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| sys("binding its disk", plan.mount_at, e))?;
    nix::unistd::sethostname(name).map_err(|e| sys("setting its host name", Path::new("-"), e))?;
    // Nothing of whoever started the console goes into the partition: every other fd
    // closes at the exec. (Read before the chroot: its disk may have no /proc.)
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = fds
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            // A number that closed since (the directory's own) is EBADF: no matter.
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
    nix::unistd::chroot(plan.mount_at).map_err(|e| sys("entering its root", plan.mount_at, e))?;
    nix::unistd::chdir("/").map_err(|e| sys("entering its root", Path::new("/"), e))?;
    // A proc of its own pid namespace, where its disk has a place for one: mounted by
    // its pid 1, in its mount namespace, so the host's /proc is never in there.
    if Path::new("/proc").is_dir() {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| sys("mounting its /proc", Path::new("/proc"), e))?;
    }
    // Its output goes nowhere: a file of its disk that it writes would differ from
    // the kept original's, and a live rollback onto that disk would be refused.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| PartitionError::Io {
            name: name.into(),
            step: "opening its /dev/null".into(),
            path: "/dev/null".into(),
            source,
        })?;
    println!("READY");
    use std::os::fd::AsRawFd;
    for to in 0..3 {
        nix::unistd::dup2(null.as_raw_fd(), to)
            .map_err(|e| sys("redirecting its output", Path::new("/dev/null"), e))?;
    }
    let argv: Vec<std::ffi::CString> = plan
        .command
        .iter()
        .map(|a| std::ffi::CString::new(a.as_bytes()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| PartitionError::Refused {
            name: name.into(),
            what: "a NUL in its command".into(),
        })?;
    let e = nix::unistd::execv(&argv[0], &argv).unwrap_err();
    Err(sys("starting its command", Path::new(&plan.command[0]), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_names_its_subnet() {
        assert_eq!(subnet("10.88.0.1/24").unwrap(), "10.88.0.0/24");
        assert_eq!(subnet("192.168.7.200/16").unwrap(), "192.168.0.0/16");
        assert_eq!(subnet("10.1.2.3/0").unwrap(), "0.0.0.0/0");
        assert!(subnet("10.1.2.3").is_err());
        assert!(subnet("10.1.2/24").is_err());
    }
}
