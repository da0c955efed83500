//! Holding TCP connections still on the wire while they move: nftables rules in a table
//! of our own stop each connection's packets both ways, so that the peer never draws a
//! reset from a socket that is not there yet. What the peer sends is held in a packet
//! queue ([`crate::nfqueue`]) when there is one, to be delivered the moment the
//! connection is made again, and dropped otherwise (the peer then retransmits).
//!
//! The rules are written over netlink, in one batch per change, so a lock costs no
//! process and no parse. A table is named `mcr_*`, and holds an empty chain
//! `dump_<pid>` naming the mcr process that dumps under it. A table whose dumping mcr
//! is gone was left by a crash: [`remove_stale`] removes it, unless an empty chain
//! `image` says it was handed to an image, which only its restore (or the operator)
//! removes.

use crate::netlink::{self, Attrs};
use crate::{Errno, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFT_REG32_00: u32 = 8;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_MARK: u32 = 3;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_QUEUE_NUM: u16 = 1;
const NFTA_QUEUE_TOTAL: u16 = 2;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_LOCAL_OUT: u32 = 3;
const NFPROTO_INET: u8 = 1;
/// Ahead of conntrack and of every usual filter.
const PRIORITY: i32 = -300;
const DUMP_MARK: &str = "dump_";
const IMAGE_MARK: &str = "image";

/// What becomes of the peer's packets while the connections are locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Drop,
    /// Held in this packet queue.
    Queue(u16),
}

/// How this kernel queues packets from nftables: its own `queue` expression, or the
/// xtables NFQUEUE target through nft_compat (kernels built without NFT_QUEUE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueExpr {
    Native,
    Compat,
}

/// 0 not yet known, 1 native, 2 compat.
static QUEUE_EXPR: AtomicU8 = AtomicU8::new(0);

fn nft_msg(msg: u16, flags: i32, a: &Attrs) -> Vec<u8> {
    let f = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16;
    netlink::message(NFNL_SUBSYS_NFTABLES, msg, f, NFPROTO_INET, 0, a)
}

/// Sends `msgs` as one transaction: all of them happen, or none.
fn batch(msgs: &[Vec<u8>], what: &str) -> Result<()> {
    let sock = netlink::socket()?;
    let edge = |ty: u16| {
        let mut m = netlink::message(
            0,
            ty,
            libc::NLM_F_REQUEST as u16,
            0,
            NFNL_SUBSYS_NFTABLES,
            &Attrs::default(),
        );
        // Batch delimiters carry their type whole, not as subsystem and message.
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m
    };
    let mut buf = edge(NFNL_MSG_BATCH_BEGIN);
    for m in msgs {
        buf.extend_from_slice(m);
    }
    buf.extend_from_slice(&edge(NFNL_MSG_BATCH_END));
    netlink::send(&sock, &buf, what)?;
    netlink::wait_acks(&sock, msgs.len(), what)
}

fn table_msg(msg: u16, name: &str) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, name);
    nft_msg(msg, libc::NLM_F_CREATE, &a)
}

fn chain_msg(table: &str, chain: &str, hook: Option<u32>) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, chain);
    if let Some(h) = hook {
        a.nest(NFTA_CHAIN_HOOK, |n| {
            n.be32(NFTA_HOOK_HOOKNUM, h)
                .be32(NFTA_HOOK_PRIORITY, PRIORITY as u32);
        })
        .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, "filter");
    }
    nft_msg(NFT_MSG_NEWCHAIN, libc::NLM_F_CREATE, &a)
}

fn expr(list: &mut Attrs, name: &str, data: impl FnOnce(&mut Attrs)) {
    list.nest(NFTA_LIST_ELEM, |e| {
        e.str(NFTA_EXPR_NAME, name).nest(NFTA_EXPR_DATA, data);
    });
}

fn load_meta(list: &mut Attrs, key: u32) {
    expr(list, "meta", |d| {
        d.be32(NFTA_META_DREG, NFT_REG_1).be32(NFTA_META_KEY, key);
    });
}

fn equals(list: &mut Attrs, value: &[u8]) {
    compare(list, NFT_CMP_EQ, value)
}

fn compare(list: &mut Attrs, op: u32, value: &[u8]) {
    expr(list, "cmp", |d| {
        d.be32(NFTA_CMP_SREG, NFT_REG_1)
            .be32(NFTA_CMP_OP, op)
            .nest(NFTA_CMP_DATA, |v| {
                v.bytes(NFTA_DATA_VALUE, value);
            });
    });
}

fn verdict(list: &mut Attrs, code: u32) {
    expr(list, "immediate", |d| {
        d.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
            .nest(NFTA_IMMEDIATE_DATA, |v| {
                v.nest(NFTA_DATA_VERDICT, |c| {
                    c.be32(NFTA_VERDICT_CODE, code);
                });
            });
    });
}

fn ip_bytes(a: &SocketAddr) -> Vec<u8> {
    match a {
        SocketAddr::V4(v) => v.ip().octets().to_vec(),
        SocketAddr::V6(v) => v.ip().octets().to_vec(),
    }
}

/// Where a connection's fields go in a set key, in 4-byte registers: the peer's
/// address and port, then ours. (offset, length) of each in the network or transport
/// header, for a packet from the peer; one to the peer has them the other way round.
struct KeyLayout {
    nfproto: u8,
    addr_len: u32,
    saddr_at: u32,
    daddr_at: u32,
    set: &'static str,
    set_id: u32,
}

const V4: KeyLayout = KeyLayout {
    nfproto: libc::AF_INET as u8,
    addr_len: 4,
    saddr_at: 12,
    daddr_at: 16,
    set: "conns4",
    set_id: 1,
};
const V6: KeyLayout = KeyLayout {
    nfproto: libc::AF_INET6 as u8,
    addr_len: 16,
    saddr_at: 8,
    daddr_at: 24,
    set: "conns6",
    set_id: 2,
};
/// nft's type ids for a key's fields, for `nft list` to print the set (6 bits each).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;

impl KeyLayout {
    fn key_len(&self) -> u32 {
        2 * (self.addr_len + 4)
    }

    fn key_type(&self) -> u32 {
        let a = if self.addr_len == 4 {
            TYPE_IPV4_ADDR
        } else {
            TYPE_IPV6_ADDR
        };
        [a, TYPE_INET_SERVICE, a, TYPE_INET_SERVICE]
            .iter()
            .fold(0, |t, f| t << 6 | f)
    }

    /// The key of connection (local, peer): each port in a register of its own.
    fn key(&self, local: &SocketAddr, peer: &SocketAddr) -> Vec<u8> {
        let mut k = Vec::new();
        for a in [peer, local] {
            k.extend_from_slice(&ip_bytes(a));
            k.extend_from_slice(&a.port().to_be_bytes());
            k.extend_from_slice(&[0, 0]);
        }
        k
    }
}

fn set_msg(table: &str, l: &KeyLayout) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_SET_TABLE, table)
        .str(NFTA_SET_NAME, l.set)
        .be32(NFTA_SET_FLAGS, 0)
        .be32(NFTA_SET_KEY_TYPE, l.key_type())
        .be32(NFTA_SET_KEY_LEN, l.key_len())
        .be32(NFTA_SET_ID, l.set_id);
    nft_msg(NFT_MSG_NEWSET, libc::NLM_F_CREATE, &a)
}

fn elements_msg(table: &str, l: &KeyLayout, keys: &[Vec<u8>]) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_SET_ELEM_LIST_TABLE, table)
        .str(NFTA_SET_ELEM_LIST_SET, l.set)
        .be32(NFTA_SET_ELEM_LIST_SET_ID, l.set_id)
        .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
            for k in keys {
                list.nest(NFTA_LIST_ELEM, |e| {
                    e.nest(NFTA_SET_ELEM_KEY, |v| {
                        v.bytes(NFTA_DATA_VALUE, k);
                    });
                });
            }
        });
    nft_msg(NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE, &a)
}

fn load_payload_to(list: &mut Attrs, reg: u32, base: u32, offset: u32, len: u32) {
    expr(list, "payload", |d| {
        d.be32(NFTA_PAYLOAD_DREG, reg)
            .be32(NFTA_PAYLOAD_BASE, base)
            .be32(NFTA_PAYLOAD_OFFSET, offset)
            .be32(NFTA_PAYLOAD_LEN, len);
    });
}

/// A rule matching TCP packets of the connections in `l`'s set, from the peers
/// (`inbound`) or to them, and what it does with them.
fn rule(table: &str, chain: &str, l: &KeyLayout, inbound: bool, act: Action) -> Vec<u8> {
    let mut list = Attrs::default();
    load_meta(&mut list, NFT_META_NFPROTO);
    equals(&mut list, &[l.nfproto]);
    load_meta(&mut list, NFT_META_L4PROTO);
    equals(&mut list, &[libc::IPPROTO_TCP as u8]);
    if inbound {
        // What mcr itself hands a socket in the peer's name (crate::inet's raw
        // packets) passes: a connection put back in its listener's queue is made so.
        load_meta(&mut list, NFT_META_MARK);
        compare(
            &mut list,
            NFT_CMP_NEQ,
            &crate::inet::INJECTED_MARK.to_ne_bytes(),
        );
    }
    // The peer's address and port first: the source of a packet from the peer.
    let (peer_addr, peer_port, our_addr, our_port) = if inbound {
        (l.saddr_at, 0, l.daddr_at, 2)
    } else {
        (l.daddr_at, 2, l.saddr_at, 0)
    };
    let mut reg = NFT_REG32_00;
    for (addr, port) in [(peer_addr, peer_port), (our_addr, our_port)] {
        load_payload_to(&mut list, reg, NFT_PAYLOAD_NETWORK_HEADER, addr, l.addr_len);
        reg += l.addr_len / 4;
        load_payload_to(&mut list, reg, NFT_PAYLOAD_TRANSPORT_HEADER, port, 2);
        reg += 1;
    }
    expr(&mut list, "lookup", |d| {
        d.str(NFTA_LOOKUP_SET, l.set)
            .be32(NFTA_LOOKUP_SET_ID, l.set_id)
            .be32(NFTA_LOOKUP_SREG, NFT_REG32_00);
    });
    match act {
        Action::Drop => verdict(&mut list, NF_DROP),
        Action::Queue(num, QueueExpr::Native) => expr(&mut list, "queue", |d| {
            d.bytes(NFTA_QUEUE_NUM, &num.to_be_bytes())
                .bytes(NFTA_QUEUE_TOTAL, &1u16.to_be_bytes());
        }),
        Action::Queue(num, QueueExpr::Compat) => expr(&mut list, "target", |d| {
            // struct xt_NFQ_info_v3: queuenum, queues_total, flags; padded to 8.
            let mut info = num.to_ne_bytes().to_vec();
            info.extend_from_slice(&1u16.to_ne_bytes());
            info.extend_from_slice(&[0; 4]);
            d.str(NFTA_TARGET_NAME, "NFQUEUE")
                .be32(NFTA_TARGET_REV, 3)
                .bytes(NFTA_TARGET_INFO, &info);
        }),
    }
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, table)
        .str(NFTA_RULE_CHAIN, chain)
        .bytes(NFTA_RULE_EXPRESSIONS | netlink::NLA_F_NESTED, &list.0);
    nft_msg(NFT_MSG_NEWRULE, libc::NLM_F_CREATE | libc::NLM_F_APPEND, &a)
}

#[derive(Clone, Copy)]
enum Action {
    Drop,
    Queue(u16, QueueExpr),
}

/// The name of a new table for connections locked by this mcr process.
pub fn table_name(tag: u64) -> String {
    format!("mcr_{}_{tag}", std::process::id())
}

/// The marker chain naming the mcr process `pid` that dumps under a table.
fn dump_mark(pid: u32) -> String {
    format!("{DUMP_MARK}{pid}")
}

/// Creates table `name` stopping every packet of each (local, peer) connection, both
/// ways, ahead of any other filter: what we would send is dropped, what the peer sends
/// is dropped or queued (`inbound`). `dumper` marks the table as this mcr's while it
/// dumps, for [`remove_stale`].
pub fn lock(
    name: &str,
    conns: &[(SocketAddr, SocketAddr)],
    inbound: Inbound,
    dumper: Option<u32>,
) -> Result<()> {
    make(name, conns, inbound, dumper, true)
}

/// [`lock`], or (`hooked` false) the same table with its chains hooked nowhere: it
/// stops nothing, and removing it drops no packet that anyone holds.
fn make(
    name: &str,
    conns: &[(SocketAddr, SocketAddr)],
    inbound: Inbound,
    dumper: Option<u32>,
    hooked: bool,
) -> Result<()> {
    let with = |q: QueueExpr| {
        let hook = |h| hooked.then_some(h);
        let mut m = vec![
            table_msg(NFT_MSG_NEWTABLE, name),
            chain_msg(name, "in", hook(NF_INET_LOCAL_IN)),
            chain_msg(name, "out", hook(NF_INET_LOCAL_OUT)),
        ];
        if let Some(pid) = dumper {
            m.push(chain_msg(name, &dump_mark(pid), None));
        }
        let act = match inbound {
            Inbound::Drop => Action::Drop,
            Inbound::Queue(n) => Action::Queue(n, q),
        };
        // One set of connections per family and a rule each way: the cost of a lock
        // hardly grows with the connections (200 rules took 3.1 ms).
        for l in [&V4, &V6] {
            let keys: Vec<Vec<u8>> = conns
                .iter()
                .filter(|(c, _)| (l.addr_len == 4) == c.is_ipv4())
                .map(|(c, p)| l.key(c, p))
                .collect();
            if keys.is_empty() {
                continue;
            }
            m.push(set_msg(name, l));
            m.push(elements_msg(name, l, &keys));
            m.push(rule(name, "in", l, true, act));
            m.push(rule(name, "out", l, false, Action::Drop));
        }
        batch(&m, &format!("nftables: creating table {name}"))
    };
    if inbound == Inbound::Drop {
        return with(QueueExpr::Native);
    }
    match QUEUE_EXPR.load(Ordering::Relaxed) {
        1 => with(QueueExpr::Native),
        2 => with(QueueExpr::Compat),
        _ => {
            // The xtables target when the kernel has it registered (built in or
            // loaded): asking for an expression it lacks costs a failed module load
            // (16 ms here) before the ENOENT.
            let xt = std::fs::read_to_string("/proc/net/ip_tables_targets")
                .is_ok_and(|t| t.lines().any(|l| l == "NFQUEUE"));
            let order = if xt {
                [QueueExpr::Compat, QueueExpr::Native]
            } else {
                [QueueExpr::Native, QueueExpr::Compat]
            };
            let q = match with(order[0]) {
                Err(e) if e.errno() == Some(Errno::ENOENT) => with(order[1]).map(|_| order[1]),
                r => r.map(|_| order[0]),
            }?;
            let code = if q == QueueExpr::Native { 1 } else { 2 };
            QUEUE_EXPR.store(code, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// The table is no longer a dump's but its image's: it outlives the mcr that made it.
/// Marked by a chain added, not the dump's removed: a change that removes anything
/// waits for an RCU grace period (10-20 ms here), one that adds does not.
pub fn disown(name: &str) -> Result<()> {
    batch(
        &[chain_msg(name, IMAGE_MARK, None)],
        &format!("nftables: handing table {name} to its image"),
    )
}

/// Lets packets pass again, at once: an accept ahead of the rules (removing them would
/// wait for a grace period), and without unhooking the chains, since the kernel drops
/// every queued packet when a hook goes, and those are the ones to deliver.
pub fn open(name: &str) -> Result<()> {
    let accept = |chain: &str| {
        let mut list = Attrs::default();
        verdict(&mut list, NF_ACCEPT);
        let mut a = Attrs::default();
        a.str(NFTA_RULE_TABLE, name)
            .str(NFTA_RULE_CHAIN, chain)
            .bytes(NFTA_RULE_EXPRESSIONS | netlink::NLA_F_NESTED, &list.0);
        // Without NLM_F_APPEND a rule goes first.
        nft_msg(NFT_MSG_NEWRULE, libc::NLM_F_CREATE, &a)
    };
    batch(
        &[accept("in"), accept("out")],
        &format!("nftables: opening table {name}"),
    )
}

/// Removes table `name`; one that is not there is fine.
pub fn unlock(name: &str) -> Result<()> {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, name);
    match batch(
        &[nft_msg(NFT_MSG_DELTABLE, 0, &a)],
        &format!("nftables: removing table {name}"),
    ) {
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(()),
        r => r,
    }
}

/// Every (table, chain) of the inet family.
fn chains() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    list(NFT_MSG_GETCHAIN, "chains", |attrs| {
        if let (Some(t), Some(c)) = (name(attrs, NFTA_CHAIN_TABLE), name(attrs, NFTA_CHAIN_NAME)) {
            out.push((t, c));
        }
    })?;
    Ok(out)
}

/// The inet tables of ours (named `mcr_*`).
pub fn tables() -> Result<Vec<String>> {
    let mut out = Vec::new();
    list(NFT_MSG_GETTABLE, "tables", |attrs| {
        if let Some(n) = name(attrs, NFTA_TABLE_NAME).filter(|n| n.starts_with("mcr_")) {
            out.push(n);
        }
    })?;
    Ok(out)
}

/// Dumps the inet family's objects of one kind (`msg`, a GET message), handing each
/// one's attributes to `each`.
fn list(msg: u16, what: &str, mut each: impl FnMut(&[u8])) -> Result<()> {
    let sock = netlink::socket()?;
    let f = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let m = netlink::message(
        NFNL_SUBSYS_NFTABLES,
        msg,
        f,
        NFPROTO_INET,
        0,
        &Attrs::default(),
    );
    let what = format!("nftables: listing {what}");
    netlink::send(&sock, &m, &what)?;
    // After the nfgenmsg header.
    netlink::dump_answers(&sock, &what, |body| each(body.get(4..).unwrap_or_default()))
}

/// The string attribute `ty` among `attrs`, without its nul.
fn name(attrs: &[u8], ty: u16) -> Option<String> {
    netlink::attrs(attrs).find(|(t, _)| *t == ty).map(|(_, v)| {
        String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    })
}

/// The tables of ours that an mcr process is dumping under (not yet handed to an
/// image), with its pid.
pub fn dumping() -> Result<Vec<(String, u32)>> {
    let all = chains()?;
    let imaged = |t: &str| all.iter().any(|(u, c)| u == t && c == IMAGE_MARK);
    Ok(all
        .iter()
        .filter(|(t, _)| t.starts_with("mcr_") && !imaged(t))
        .filter_map(|(t, c)| Some((t.clone(), c.strip_prefix(DUMP_MARK)?.parse().ok()?)))
        .collect())
}

/// Removes the tables whose dumping mcr is gone (it crashed or was killed while
/// dumping), so that no connection stays blocked for good.
pub fn remove_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (t, pid) in dumping()? {
        // A reused pid keeps the table until that process ends too: late, not never.
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            unlock(&t)?;
            removed.push(t);
        }
    }
    Ok(removed)
}

/// Whether packets can be held here: a queue bound, and a rule queueing to it accepted.
/// Says which way the rule queues. Its table is hooked nowhere: removing a hooked one
/// would drop the packets a migration running beside us holds.
pub fn probe_queue() -> Result<&'static str> {
    let q = crate::nfqueue::PacketQueue::bind_free(0x7000)?;
    let name = format!("mcr_probe_{}", std::process::id());
    let nowhere: SocketAddr = ([127, 0, 0, 1], 9).into();
    let r = make(
        &name,
        &[(nowhere, nowhere)],
        Inbound::Queue(q.num()),
        None,
        false,
    );
    unlock(&name)?;
    r?;
    Ok(match QUEUE_EXPR.load(Ordering::Relaxed) {
        1 => "nftables queue expression",
        _ => "xtables NFQUEUE target through nft_compat",
    })
}
