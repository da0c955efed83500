//! Addresses and neighbour entries over rtnetlink, in this network namespace or in
//! another one, without starting `ip`: moving a service address inside a blackout
//! is then a few messages, not three programs.
//!
//! A netlink socket acts in the namespace it was made in, so one for another
//! namespace is made by a thread that enters it (and ends there); so is the
//! interface's index looked up, which only means something in its namespace.

use crate::netlink::{send, socket_for, wait_acks};
use crate::{Error, Result, SysError};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWNEIGH: u16 = 28;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_REACHABLE: u16 = 0x02;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

/// A route netlink socket and an interface, both of one network namespace.
pub struct Link {
    sock: OwnedFd,
    index: u32,
    /// For messages: the interface, and the namespace when not ours.
    name: String,
}

fn attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(data);
    b.resize((b.len() + 3) & !3, 0);
}

fn message(ty: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&[0u8; 8]); // sequence and port: the kernel's to fill
    m.extend_from_slice(body);
    m
}

fn index_of(ifname: &str, what: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname).map_err(|_| Error::Unexpected {
        pid: std::process::id() as i32,
        what: format!("{what}: an interface name with a nul byte"),
    })?;
    // SAFETY: a nul-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(SysError::new(
            format!("{what}: if_nametoindex({ifname})"),
            crate::Errno::last(),
        )
        .into());
    }
    Ok(index)
}

impl Link {
    /// Interface `ifname` of this network namespace.
    pub fn here(ifname: &str) -> Result<Self> {
        Ok(Self {
            sock: socket_for(NETLINK_ROUTE, "NETLINK_ROUTE")?,
            index: index_of(ifname, ifname)?,
            name: ifname.to_string(),
        })
    }

    /// Interface `ifname` of the network namespace `netns` names (a /run/netns file).
    pub fn in_netns(netns: &Path, ifname: &str) -> Result<Self> {
        let name = format!("{ifname} in {}", netns.display());
        let ns =
            std::fs::File::open(netns).map_err(|e| Error::io(netns.display().to_string(), e))?;
        let ifname = ifname.to_string();
        let n = name.clone();
        std::thread::spawn(move || -> Result<(OwnedFd, u32)> {
            // This thread stays in the namespace and ends: nothing else runs on it.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| SysError::new(format!("setns into the namespace of {n}"), e))?;
            Ok((
                socket_for(NETLINK_ROUTE, "NETLINK_ROUTE")?,
                index_of(&ifname, &n)?,
            ))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Unexpected {
                pid: std::process::id() as i32,
                what: format!("the thread that entered the namespace of {name} panicked"),
            })
        })
        .map(|(sock, index)| Self { sock, index, name })
    }

    fn address(&self, ty: u16, flags: u16, ip: Ipv4Addr, prefix: u8) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, prefix, 0, 0];
        body.extend_from_slice(&self.index.to_ne_bytes());
        attr(&mut body, IFA_LOCAL, &ip.octets());
        attr(&mut body, IFA_ADDRESS, &ip.octets());
        message(ty, flags, &body)
    }

    /// Adds `ip/prefix`; an address already there is an error (EEXIST).
    pub fn add_address(&self, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let what = format!("adding {ip}/{prefix} to {}", self.name);
        send(
            &self.sock,
            &self.address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, ip, prefix),
            &what,
        )?;
        wait_acks(&self.sock, 1, &what)
    }

    pub fn delete_address(&self, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let what = format!("removing {ip}/{prefix} from {}", self.name);
        send(&self.sock, &self.address(RTM_DELADDR, 0, ip, prefix), &what)?;
        wait_acks(&self.sock, 1, &what)
    }

    /// Says `ip` is at `mac` on this interface, reachable now.
    pub fn replace_neighbour(&self, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let what = format!("pointing {ip} at {mac:02x?} on {}", self.name);
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        body.extend_from_slice(&self.index.to_ne_bytes());
        body.extend_from_slice(&NUD_REACHABLE.to_ne_bytes());
        body.extend_from_slice(&[0, 0]); // flags, type
        attr(&mut body, NDA_DST, &ip.octets());
        attr(&mut body, NDA_LLADDR, &mac);
        send(
            &self.sock,
            &message(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &body),
            &what,
        )?;
        wait_acks(&self.sock, 1, &what)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(args: &[&str]) -> String {
        let o = Command::new("ip").args(args).output().expect("ip");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A namespace (with a veth pair in it), removed when dropped.
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn moves_an_address_and_a_neighbour_in_another_namespace() {
        let ns = Ns(format!("rtnl-test-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&[
            "-n", &ns.0, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        ip(&["-n", &ns.0, "link", "set", "d0", "up"]);
        let link = Link::in_netns(&Path::new("/run/netns").join(&ns.0), "d0").unwrap();
        let a: Ipv4Addr = "10.201.0.7".parse().unwrap();
        link.add_address(a, 24).unwrap();
        assert!(ip(&["-n", &ns.0, "addr", "show", "d0"]).contains("10.201.0.7/24"));
        // Twice is refused, with the kernel's reason.
        let again = link.add_address(a, 24).unwrap_err();
        assert_eq!(again.errno(), Some(crate::Errno::EEXIST), "{again}");
        let mac = parse_mac("02:4c:0a:c9:00:08").unwrap();
        link.replace_neighbour("10.201.0.8".parse().unwrap(), mac)
            .unwrap();
        let neigh = ip(&["-n", &ns.0, "neigh", "show", "dev", "d0"]);
        assert!(
            neigh.contains("10.201.0.8 lladdr 02:4c:0a:c9:00:08"),
            "{neigh}"
        );
        link.delete_address(a, 24).unwrap();
        assert!(!ip(&["-n", &ns.0, "addr", "show", "d0"]).contains("10.201.0.7"));
        // Our own namespace was never touched.
        assert!(!ip(&["addr"]).contains("10.201.0.7"));
    }

    #[test]
    fn macs_parse_whole_or_not_at_all() {
        assert_eq!(
            parse_mac("02:4c:0a:4d:00:01"),
            Some([2, 0x4c, 10, 0x4d, 0, 1])
        );
        assert_eq!(parse_mac("02:4c:0a:4d:00"), None);
        assert_eq!(parse_mac("02:4c:0a:4d:00:01:02"), None);
        assert_eq!(parse_mac("zz:4c:0a:4d:00:01"), None);
    }
}
