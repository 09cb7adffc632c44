//! A userspace model of `lb_ingress`'s decision for the fixture lab, written from the
//! README's rules rather than from the data plane's code: what the program does with a
//! frame (pass, drop, forward to which backend), which counter says why, and the bytes it
//! sends. The differential fuzzer holds the real program to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    conntrack::Way,
    consts::vip_flags,
    hash::{Flow, HashMode, vip_filter_bit},
    types::VipFilter,
};

use std::collections::HashMap;

use lb_common::maglev::MaglevTable;

use crate::{
    lab::{ENCAP_SRC4, ENCAP_SRC6, LabBackend, LabVip, NO_ECHO_ADDR, SEED},
    packets::{encap_src4, encap_src6, expect_4in6, expect_ip6ip6_at, expect_ipip_at, expect_l2},
};

/// What the program must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `XDP_PASS`, untouched, counted by this counter.
    Pass(&'static str),
    /// `XDP_DROP`, counted by this counter; `extra` counters bumped on the way.
    Drop(&'static str, Vec<&'static str>),
    /// `XDP_PASS` of a Vip with no backend (after a conntrack miss was counted).
    PassNoBackend(Vec<&'static str>),
    /// A fragment to an address with a `fragments: track` Vip: what it gets depends on
    /// the fragments seen before (the fixtures hold those to exact outcomes).
    Stateful,
    /// `XDP_TX` of the program's own answer (an echo reply), exactly these bytes.
    Reply(Vec<u8>),
    /// `XDP_TX` to `backend` with exactly these bytes.
    Forward {
        backend: u32,
        output: Vec<u8>,
        icmp_error: bool,
        /// The Flow a connection-table entry is made for (none for an ICMP error).
        flow: Option<Flow>,
        /// What second chance sends instead when the flow has no connection-table entry.
        chained: Option<Chained>,
        /// Decided by a connection-table way (counted as a hit).
        entry: bool,
    },
}

/// A packet sent to its current Backend with its previous one attached (second chance).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chained {
    pub previous: u32,
    pub vip: u32,
    /// Outer header to the current Backend, middle one to `previous`, then the packet.
    pub output: Vec<u8>,
}

impl Decision {
    /// A frame the README calls malformed: never forwarded.
    pub fn malformed(&self) -> bool {
        matches!(
            self,
            Decision::Pass("pass_malformed") | Decision::Drop("drop_malformed", _)
        )
    }
}

struct Parsed {
    flow: Flow,
    syn: bool,
    icmp_error: bool,
}

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}

fn v4(b: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]))
}

fn v6(b: &[u8], at: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&b[at..at + 16]).unwrap(),
    ))
}

/// The lab's Vips, Backends, tables and address filter, fixed for a run (borrowed field
/// by field, so the lab's data plane stays free to run packets).
pub struct Model<'a> {
    pub vips: &'a [LabVip],
    pub backends: &'a [LabBackend],
    pub tables: &'a HashMap<u32, MaglevTable>,
    /// The previous tables the data plane holds now (second chance); the fuzzer adds and
    /// removes them as it goes.
    pub prev_tables: HashMap<u32, MaglevTable>,
    pub lb_mac: [u8; 6],
    pub filter: VipFilter,
}

enum Stop {
    Pass(&'static str),
    Drop(&'static str),
    Reply(Vec<u8>),
    Stateful,
}

impl<'a> Model<'a> {
    fn is_vip_addr(&self, addr: IpAddr) -> bool {
        self.vips.iter().any(|v| v.addr == addr)
    }

    /// Some Vip on `addr` tracks fragments.
    fn tracks_fragments(&self, addr: IpAddr) -> bool {
        self.vips
            .iter()
            .any(|v| v.addr == addr && v.flags & vip_flags::FRAGMENTS_TRACK != 0)
    }

    /// Turns what parsing found into what a packet past the address pre-filter gets: a
    /// drop, or a pass for another protocol, only when its address really is a Vip's.
    fn confirm(&self, dst: IpAddr, stop: Stop) -> Stop {
        match stop {
            Stop::Drop(_) | Stop::Pass("pass_vip_other") if !self.is_vip_addr(dst) => {
                Stop::Pass("pass_not_vip")
            }
            other => other,
        }
    }

    /// The decision for `frame` when the connection table holds no way of its flow.
    pub fn decide(&self, frame: &[u8]) -> Decision {
        self.decide_with(frame, &|_| None)
    }

    /// The decision for `frame`, `entry` giving the way the connection table holds for a
    /// Flow (`Dataplane::conntrack`: whichever way has its tag in one of its two buckets,
    /// which may be another flow's, the table's documented false match).
    pub fn decide_with(&self, frame: &[u8], entry: &dyn Fn(&Flow) -> Option<Way>) -> Decision {
        match self.parse(frame) {
            Err(Stop::Pass(c)) => Decision::Pass(c),
            Err(Stop::Drop(c)) => Decision::Drop(c, vec![]),
            Err(Stop::Reply(bytes)) => Decision::Reply(bytes),
            Err(Stop::Stateful) => Decision::Stateful,
            Ok((l3, parsed)) => self.select(frame, l3, &parsed, entry),
        }
    }

    fn parse(&self, f: &[u8]) -> Result<(usize, Parsed), Stop> {
        let mut proto = be16(f, 12);
        let mut l3 = 14;
        if proto == 0x8100 {
            if f.len() < 18 {
                return Err(Stop::Pass("pass_malformed"));
            }
            proto = be16(f, 16);
            l3 = 18;
        }
        match proto {
            0x0800 => self.parse_v4(f, l3).map(|p| (l3, p)),
            0x86DD => self.parse_v6(f, l3).map(|p| (l3, p)),
            _ => Err(Stop::Pass("pass_not_ip")),
        }
    }

    fn parse_v4(&self, f: &[u8], l3: usize) -> Result<Parsed, Stop> {
        if f.len() < l3 + 20 {
            return Err(Stop::Pass("pass_malformed"));
        }
        let ihl = (f[l3] & 0x0F) as usize * 4;
        let tot_len = be16(f, l3 + 2);
        if f[l3] >> 4 != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > f.len() {
            return Err(Stop::Pass("pass_malformed"));
        }
        let dst = v4(f, l3 + 16);
        if !self.filter.contains(vip_filter_bit(dst)) {
            return Err(Stop::Pass("pass_not_vip"));
        }
        let fragment = be16(f, l3 + 6) & 0x3FFF != 0;
        if fragment && self.tracks_fragments(dst) {
            return Err(Stop::Stateful);
        }
        if fragment {
            return Err(self.confirm(dst, Stop::Drop("drop_fragment")));
        }
        let (l4, end, proto) = (l3 + ihl, l3 + tot_len, f[l3 + 9]);
        let result = if proto == 1 && f.len() >= l4 + 8 && f[l4] == 8 {
            self.echo(f, l3, l4, end, dst)
        } else if proto == 1 {
            icmp_error(f, l4, end, false)
        } else {
            ports(f, proto, l4, end).map(|(sport, dport, syn)| Parsed {
                flow: Flow {
                    src: v4(f, l3 + 12),
                    dst,
                    sport,
                    dport,
                    proto,
                },
                syn,
                icmp_error: false,
            })
        };
        result.map_err(|stop| self.confirm(dst, stop))
    }

    fn parse_v6(&self, f: &[u8], l3: usize) -> Result<Parsed, Stop> {
        if f.len() < l3 + 40 {
            return Err(Stop::Pass("pass_malformed"));
        }
        let end = l3 + 40 + be16(f, l3 + 4);
        if f[l3] >> 4 != 6 || end > f.len() {
            return Err(Stop::Pass("pass_malformed"));
        }
        let dst = v6(f, l3 + 24);
        if !self.filter.contains(vip_filter_bit(dst)) {
            return Err(Stop::Pass("pass_not_vip"));
        }
        let (l4, next) = (l3 + 40, f[l3 + 6]);
        let result = match next {
            44 if self.tracks_fragments(dst) => Err(Stop::Stateful),
            44 => Err(Stop::Drop("drop_fragment")),
            0 | 43 | 60 | 51 | 135 | 139 | 140 => Err(Stop::Drop("drop_ipv6_ext")),
            58 if f.len() >= l4 + 8 && f[l4] == 128 => self.echo(f, l3, l4, end, dst),
            58 => icmp_error(f, l4, end, true),
            proto => ports(f, proto, l4, end).map(|(sport, dport, syn)| Parsed {
                flow: Flow {
                    src: v6(f, l3 + 8),
                    dst,
                    sport,
                    dport,
                    proto,
                },
                syn,
                icmp_error: false,
            }),
        };
        result.map_err(|stop| self.confirm(dst, stop))
    }

    /// An echo request (IP header at `l3`, ICMP at `l4`, IP packet ending at `end`) to
    /// `dst`: answered unless `dst` is the lab's address without `icmp_echo`.
    fn echo(
        &self,
        f: &[u8],
        l3: usize,
        l4: usize,
        end: usize,
        dst: IpAddr,
    ) -> Result<Parsed, Stop> {
        if !self.is_vip_addr(dst) {
            return Err(Stop::Pass("pass_not_vip"));
        }
        if dst == NO_ECHO_ADDR.parse::<IpAddr>().unwrap() {
            return Err(Stop::Pass("pass_vip_other"));
        }
        if l4 + 8 > end {
            return Err(Stop::Drop("drop_malformed"));
        }
        Err(Stop::Reply(echo_reply(f, l3, l4)))
    }

    /// The Vip id of a flow: exact (address, port, protocol), else the address's any-port
    /// Vip of that protocol.
    fn vip_of(&self, flow: &Flow) -> Result<u32, Stop> {
        let vips = self.vips;
        if let Some(v) = vips
            .iter()
            .find(|v| v.addr == flow.dst && v.port == flow.dport && v.proto == flow.proto)
        {
            return Ok(v.id);
        }
        if !self.is_vip_addr(flow.dst) {
            return Err(Stop::Pass("pass_not_vip"));
        }
        vips.iter()
            .find(|v| {
                v.addr == flow.dst
                    && v.port == 0
                    && v.proto == flow.proto
                    && matches!(flow.proto, 6 | 17)
            })
            .map(|v| v.id)
            .ok_or(Stop::Pass("pass_vip_other"))
    }

    fn select(
        &self,
        frame: &[u8],
        l3: usize,
        p: &Parsed,
        entry: &dyn Fn(&Flow) -> Option<Way>,
    ) -> Decision {
        // A way that holds (its Vip and Backend there, the Backend up) decides before the
        // Vip is looked up; a SYN starts afresh.
        if let Some(decision) = (!p.syn)
            .then(|| entry(&p.flow))
            .flatten()
            .and_then(|way| self.by_way(frame, l3, p, &way))
        {
            return decision;
        }
        let vip = match self.vip_of(&p.flow) {
            Ok(vip) => vip,
            Err(Stop::Pass(c)) => return Decision::Pass(c),
            Err(Stop::Drop(c)) => return Decision::Drop(c, vec![]),
            Err(Stop::Reply(bytes)) => return Decision::Reply(bytes),
            Err(Stop::Stateful) => return Decision::Stateful,
        };
        // Counted only on a connection-table miss; a hit of a flow the fuzzer sent before
        // counts a hit instead. The caller allows for both.
        let mut miss = vec![];
        if !p.icmp_error {
            miss.push("conntrack_miss");
            if p.flow.proto == 6 && !p.syn {
                miss.push("conntrack_miss_non_syn");
            }
        }
        let v = self.vips.iter().find(|v| v.id == vip).unwrap();
        if v.backends.is_empty() {
            return if v.flags & vip_flags::PASS_WHEN_EMPTY != 0 {
                Decision::PassNoBackend(miss)
            } else {
                Decision::Drop("drop_no_backend", miss)
            };
        }
        let hash = p.flow.hash(SEED);
        let slot_hash = p.flow.table_hash(HashMode::of(v.flags), SEED);
        let backend = self.tables[&vip].lookup(slot_hash);
        let b = self.backend(backend);
        let output = self.encapsulate(frame, l3, v, b, hash, p.flow.dst);
        let chained = self.previous(v, b, slot_hash, p).map(|previous| Chained {
            previous: previous.id,
            vip,
            output: self.chain(frame, l3, b, previous, hash),
        });
        Decision::Forward {
            backend,
            output,
            icmp_error: p.icmp_error,
            flow: (!p.icmp_error).then_some(p.flow),
            chained,
            entry: false,
        }
    }

    /// Forwarding along a connection-table way, by its Vip's flags to its Backend; `None`
    /// if the way does not hold (the lab never changes generations: only up matters).
    fn by_way(&self, frame: &[u8], l3: usize, p: &Parsed, way: &Way) -> Option<Decision> {
        let v = self.vips.iter().find(|v| v.id == way.vip)?;
        let b = self.backends.iter().find(|b| b.id == way.backend && b.up)?;
        let hash = p.flow.hash(SEED);
        Some(Decision::Forward {
            backend: b.id,
            output: self.encapsulate(frame, l3, v, b, hash, v.addr),
            icmp_error: p.icmp_error,
            flow: (!p.icmp_error).then_some(p.flow),
            chained: None,
            entry: true,
        })
    }

    fn backend(&self, id: u32) -> &LabBackend {
        self.backends.iter().find(|b| b.id == id).unwrap()
    }

    /// The frame as sent to backend `b` of Vip `v` (to `dst`, the Vip's address).
    fn encapsulate(
        &self,
        frame: &[u8],
        l3: usize,
        v: &LabVip,
        b: &LabBackend,
        hash: u32,
        dst: IpAddr,
    ) -> Vec<u8> {
        if v.flags & vip_flags::L2_DSR != 0 {
            return expect_l2(frame, self.lb_mac, b.mac);
        }
        match b.addr {
            IpAddr::V4(to) => {
                let src = encap_src4(ENCAP_SRC4, hash);
                expect_ipip_at(frame, l3, self.lb_mac, b.mac, src, to.octets())
            }
            IpAddr::V6(to) if dst.is_ipv4() => {
                // An IPv4 Vip with IPv6 backends: IPv4-in-IPv6.
                let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
                expect_4in6(frame, l3, self.lb_mac, b.mac, src, to.octets(), hash)
            }
            IpAddr::V6(to) => {
                let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
                expect_ip6ip6_at(frame, l3, self.lb_mac, b.mac, src, to.octets(), hash)
            }
        }
    }

    /// Second chance (README "Running a fleet"): the Backend that Vip `v`'s previous table
    /// gives a TCP packet that is not a SYN nor an ICMP error, when the Vip encapsulates,
    /// the Backend differs from the current one `b`, is up, and both are of the Vip's
    /// family (an IPv4 Vip's IPv6 Backend has no IPv4 header to chain in).
    fn previous(
        &self,
        v: &LabVip,
        b: &LabBackend,
        slot_hash: u32,
        p: &Parsed,
    ) -> Option<&LabBackend> {
        if p.flow.proto != 6 || p.syn || p.icmp_error || v.flags & vip_flags::L2_DSR != 0 {
            return None;
        }
        let id = self.prev_tables.get(&v.id)?.lookup(slot_hash);
        let previous = self.backends.iter().find(|b| b.id == id)?;
        let family = |a: IpAddr| a.is_ipv6();
        (previous.id != b.id
            && previous.up
            && family(previous.addr) == family(v.addr)
            && family(b.addr) == family(v.addr))
        .then_some(previous)
    }

    /// The chained frame: an outer header to the current Backend `b`, a middle one to
    /// `previous`, both from the flow's encapsulation source, then the client's packet.
    fn chain(
        &self,
        frame: &[u8],
        l3: usize,
        b: &LabBackend,
        previous: &LabBackend,
        hash: u32,
    ) -> Vec<u8> {
        match (b.addr, previous.addr) {
            (IpAddr::V4(to), IpAddr::V4(via)) => {
                let src = encap_src4(ENCAP_SRC4, hash);
                let middle = expect_ipip_at(frame, l3, self.lb_mac, b.mac, src, via.octets());
                expect_ipip_at(&middle, l3, self.lb_mac, b.mac, src, to.octets())
            }
            (IpAddr::V6(to), IpAddr::V6(via)) => {
                let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
                let middle =
                    expect_ip6ip6_at(frame, l3, self.lb_mac, b.mac, src, via.octets(), hash);
                expect_ip6ip6_at(&middle, l3, self.lb_mac, b.mac, src, to.octets(), hash)
            }
            _ => unreachable!("chained only within the Vip's family"),
        }
    }
}

/// Ports and SYN of a TCP or UDP header at `l4` that must end by `end` (the IP payload's
/// end): a TCP header with its options, a UDP datagram of its stated length.
fn ports(f: &[u8], proto: u8, l4: usize, end: usize) -> Result<(u16, u16, bool), Stop> {
    let malformed = Stop::Drop("drop_malformed");
    let hlen = match proto {
        6 => 20,
        17 => 8,
        _ => return Err(Stop::Pass("pass_vip_other")),
    };
    if l4 + hlen > f.len() {
        return Err(malformed);
    }
    let (sport, dport) = (be16(f, l4) as u16, be16(f, l4 + 2) as u16);
    if proto == 6 {
        let doff = (f[l4 + 12] >> 4) as usize * 4;
        if doff < 20 || l4 + doff > end {
            return Err(malformed);
        }
        Ok((sport, dport, f[l4 + 13] & 0x02 != 0))
    } else {
        let len = be16(f, l4 + 4);
        if len < 8 || l4 + len > end {
            return Err(malformed);
        }
        Ok((sport, dport, false))
    }
}

/// ICMP "fragmentation needed" (v4) / ICMPv6 "packet too big": the quoted packet (the
/// backend's reply) reversed is the client's Flow. Other ICMP goes to the local stack.
fn icmp_error(f: &[u8], l4: usize, end: usize, v6: bool) -> Result<Parsed, Stop> {
    let malformed = Stop::Drop("drop_malformed");
    if l4 + 8 > f.len() {
        return Err(malformed);
    }
    let wanted = if v6 {
        f[l4] == 2
    } else {
        f[l4] == 3 && f[l4 + 1] == 4
    };
    if !wanted {
        return Err(Stop::Pass("pass_vip_other"));
    }
    let inner = l4 + 8;
    let ip_len = if v6 { 40 } else { 20 };
    if inner + ip_len + 4 > f.len() || inner + ip_len + 4 > end {
        return Err(malformed);
    }
    if !v6 && f[inner] != 0x45 {
        return Err(malformed);
    }
    let (src, dst, proto) = if v6 {
        (v6_at(f, inner + 8), v6_at(f, inner + 24), f[inner + 6])
    } else {
        (v4(f, inner + 12), v4(f, inner + 16), f[inner + 9])
    };
    let ports = inner + ip_len;
    Ok(Parsed {
        flow: Flow {
            src: dst,
            dst: src,
            sport: be16(f, ports + 2) as u16,
            dport: be16(f, ports) as u16,
            proto,
        },
        syn: false,
        icmp_error: true,
    })
}

/// One's-complement checksum `check` after the 16-bit word `old` became `new` (RFC 1624).
fn csum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The echo reply to the request in `f`: MACs and addresses swapped, TTL / hop limit 64,
/// type 0 / 129, both checksums updated for what changed.
fn echo_reply(f: &[u8], l3: usize, l4: usize) -> Vec<u8> {
    let mut r = f.to_vec();
    r[0..6].copy_from_slice(&f[6..12]);
    r[6..12].copy_from_slice(&f[0..6]);
    let word = |r: &[u8], at: usize| u16::from_be_bytes([r[at], r[at + 1]]);
    let put = |r: &mut Vec<u8>, at: usize, v: u16| r[at..at + 2].copy_from_slice(&v.to_be_bytes());
    let reply_type = if f[l3] >> 4 == 4 {
        r[l3 + 12..l3 + 16].copy_from_slice(&f[l3 + 16..l3 + 20]);
        r[l3 + 16..l3 + 20].copy_from_slice(&f[l3 + 12..l3 + 16]);
        let old = word(f, l3 + 8);
        r[l3 + 8] = 64;
        let check = csum_update(word(f, l3 + 10), old, word(&r, l3 + 8));
        put(&mut r, l3 + 10, check);
        0
    } else {
        r[l3 + 8..l3 + 24].copy_from_slice(&f[l3 + 24..l3 + 40]);
        r[l3 + 24..l3 + 40].copy_from_slice(&f[l3 + 8..l3 + 24]);
        r[l3 + 7] = 64;
        129
    };
    let old = word(f, l4);
    r[l4] = reply_type;
    let check = csum_update(word(f, l4 + 2), old, word(&r, l4));
    put(&mut r, l4 + 2, check);
    r
}

fn v6_at(f: &[u8], at: usize) -> IpAddr {
    v6(f, at)
}
