//! `liveupdate console serve` and `liveupdate partition ...`: the console, and the
//! operator's requests to it.

use clap::Subcommand;
use orchestrate::console::{self, Request};
use orchestrate::partition::{Host, NewPartition, Partition};
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the console listens unless told.
pub const SOCKET: &str = "/run/liveupdate/console.sock";

#[derive(clap::Args)]
pub struct Reach {
    /// The console's socket.
    #[arg(long, default_value = SOCKET)]
    pub console: PathBuf,
    /// Where the console token is (liveupdate console auth).
    #[arg(long, default_value = orchestrate::STATE_DIR)]
    pub state: PathBuf,
}

#[derive(clap::Args)]
pub struct Serve {
    #[arg(long, default_value = SOCKET)]
    pub socket: PathBuf,
    /// Its state: the token it checks, the partition table.
    #[arg(long, default_value = orchestrate::STATE_DIR)]
    pub state: PathBuf,
    /// The host bridge partitions attach to (made if missing).
    #[arg(long, default_value = "lubr0")]
    pub bridge: String,
    /// The bridge's address; partitions get addresses of its /24 by id.
    #[arg(long, default_value = "10.88.0.1/24")]
    pub gateway: String,
}

#[derive(Subcommand)]
pub enum PartitionCmd {
    /// Makes a partition (network namespace on the bridge, cgroup) on a root disk.
    Create {
        name: String,
        /// Its root disk: a directory tree, or a file holding an ext4, xfs or btrfs
        /// image (mounted from a loop device while a partition uses it).
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        id: Option<u16>,
        /// ADDR/PREFIX; one of the bridge's by id otherwise.
        #[arg(long)]
        address: Option<String>,
        /// Where its processes see their root; its disk's path otherwise.
        #[arg(long)]
        mount_at: Option<PathBuf>,
        #[command(flatten)]
        reach: Reach,
    },
    /// Starts COMMAND (a path on its disk) as its pid 1.
    Start {
        name: String,
        #[command(flatten)]
        reach: Reach,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    List {
        #[command(flatten)]
        reach: Reach,
    },
    Rename {
        from: String,
        to: String,
        #[command(flatten)]
        reach: Reach,
    },
    /// Puts its address on its interface, taking it off the partition that had it.
    TakeAddress {
        name: String,
        #[command(flatten)]
        reach: Reach,
    },
    /// Kills everything in it; it stays defined.
    Stop {
        name: String,
        #[command(flatten)]
        reach: Reach,
    },
    /// Stops it and removes it (its disk stays).
    Destroy {
        name: String,
        #[command(flatten)]
        reach: Reach,
    },
}

/// Asks the console with the stored token.
pub fn ask(reach: &Reach, req: &Request) -> Result<Vec<Partition>, String> {
    let token = orchestrate::token::current(&reach.state).map_err(|e| e.to_string())?;
    console::call(&reach.console, &token.secret, req).map_err(|e| e.to_string())
}

pub fn table(parts: &[Partition]) {
    println!("ID    NAME                 STATE     INIT     ADDRESS            DISK");
    for p in parts {
        println!(
            "{:<5} {:<20} {:<9} {:<8} {:<18} {}",
            p.id,
            p.name,
            format!("{:?}", p.state),
            p.init.map_or("-".into(), |i| i.to_string()),
            format!(
                "{}{}",
                p.address,
                if p.holds_address { "" } else { " (off)" }
            ),
            p.disk.display()
        );
    }
}

pub fn partition(cmd: PartitionCmd) -> ExitCode {
    let (reach, req) = match cmd {
        PartitionCmd::Create {
            name,
            disk,
            id,
            address,
            mount_at,
            reach,
        } => (
            reach,
            Request::Create(NewPartition {
                name,
                disk,
                id,
                address,
                mount_at,
                command: Vec::new(),
            }),
        ),
        PartitionCmd::Start {
            name,
            reach,
            command,
        } => (reach, Request::Start { name, command }),
        PartitionCmd::List { reach } => (reach, Request::List),
        PartitionCmd::Rename { from, to, reach } => (reach, Request::Rename { from, to }),
        PartitionCmd::Stop { name, reach } => (reach, Request::Stop { name }),
        PartitionCmd::TakeAddress { name, reach } => (reach, Request::TakeAddress { name }),
        PartitionCmd::Destroy { name, reach } => (reach, Request::Destroy { name }),
    };
    match ask(&reach, &req) {
        Ok(parts) => {
            table(&parts);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("liveupdate: {e}");
            ExitCode::from(6)
        }
    }
}

pub fn serve(s: Serve) -> ExitCode {
    let Some(cg2) = orchestrate::partition::cgroup2_mount() else {
        eprintln!("liveupdate: console: no cgroup v2 mount here, which partitions need");
        return ExitCode::from(1);
    };
    let host = Host {
        cgroups: cg2.join(format!("liveupdate-{}", s.bridge)),
        state: s.state,
        bridge: s.bridge,
        gateway: s.gateway,
    };
    match console::Console::bind(host, &s.socket) {
        Ok(c) => {
            // The line a supervisor (or a test) waits for.
            println!("liveupdate: console serving {}", s.socket.display());
            c.serve()
        }
        Err(e) => {
            eprintln!("liveupdate: {e}");
            ExitCode::from(6)
        }
    }
}
