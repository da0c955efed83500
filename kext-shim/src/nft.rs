//! Holding TCP connections still on the wire while they move: nftables rules in a table
//! of our own drop each connection's packets both ways, so that the peer retransmits
//! into the gap instead of drawing a reset from a socket that is not there yet.
//!
//! Tables are named `mcr_dump_<pid>` while the mcr process `pid` dumps, and
//! `mcr_image_<n>` once handed to an image for its restore to remove. A dump table
//! whose mcr is gone was left by a crash: [`remove_stale`] removes it.

use crate::{Error, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

const PREFIX_DUMP: &str = "mcr_dump_";

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("nft (install nftables)", e))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| Error::io("nft stdin", e))?;
    let out = child.wait_with_output().map_err(|e| Error::io("nft", e))?;
    if !out.status.success() {
        return Err(Error::Unexpected {
            pid: 0,
            what: format!(
                "nft failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The name of the table the mcr process `pid` locks connections with while it dumps.
pub fn dump_table(pid: u32) -> String {
    format!("{PREFIX_DUMP}{pid}")
}

/// Creates table `name` dropping every packet of each (local, peer) connection, both
/// ways, ahead of any other filter.
pub fn lock(name: &str, conns: &[(SocketAddr, SocketAddr)]) -> Result<()> {
    let mut s = format!(
        "table inet {name} {{\n\
         chain in {{ type filter hook input priority -300; policy accept; }}\n\
         chain out {{ type filter hook output priority -300; policy accept; }}\n}}\n"
    );
    for (l, p) in conns {
        let ip = if l.is_ipv4() { "ip" } else { "ip6" };
        let (la, pa) = (l.ip(), p.ip());
        let (lp, pp) = (l.port(), p.port());
        s.push_str(&format!(
            "add rule inet {name} in {ip} saddr {pa} {ip} daddr {la} tcp sport {pp} tcp dport {lp} drop\n\
             add rule inet {name} out {ip} saddr {la} {ip} daddr {pa} tcp sport {lp} tcp dport {pp} drop\n"
        ));
    }
    nft(&s)
}

/// Removes table `name`; one that is not there is fine.
pub fn unlock(name: &str) -> Result<()> {
    if !tables()?.iter().any(|t| t == name) {
        return Ok(());
    }
    nft(&format!("delete table inet {name}\n"))
}

/// The inet tables of ours (named `mcr_*`).
pub fn tables() -> Result<Vec<String>> {
    let out = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .map_err(|e| Error::io("nft (install nftables)", e))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("mcr_"))
        .map(str::to_string)
        .collect())
}

/// Removes the dump tables whose mcr process is gone (it crashed or was killed while
/// dumping), so that no connection stays blocked for good. Without nft there is none.
pub fn remove_stale() -> Result<Vec<String>> {
    let Ok(all) = tables() else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for t in all {
        let Some(pid) = t
            .strip_prefix(PREFIX_DUMP)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A reused pid keeps the table until that process ends too: late, not never.
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            nft(&format!("delete table inet {t}\n"))?;
            removed.push(t);
        }
    }
    Ok(removed)
}
