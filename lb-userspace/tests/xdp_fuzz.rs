//! Differential fuzzing of `lb_ingress`: random frames and mutations of well-formed ones
//! (bit flips, truncations, length and offset edits, IPv4 option and IPv6 extension-header
//! soup, VLAN stacks, ICMP errors quoting arbitrary packets) run through the real program by
//! BPF_PROG_TEST_RUN, and held to `lb_testbed::model`: same action, same output bytes, same
//! counters. A frame the model calls malformed is never forwarded. Forwarded flows run
//! again once cached, so the fast path is held to the same answers as the full path.
//! Some Vips have a previous table (second chance; one of them expires and comes back as
//! the run goes), so moved TCP flows are chained, and the model says exactly when and how.
//!
//! Budget: `MLB_FUZZ_SECONDS` (default 20; `cargo xtask fuzz xdp --minutes N` sets it), seed
//! `MLB_FUZZ_SEED` (default: from the clock, printed). Frames under
//! `tests/data/fuzz/xdp/*.hex` (one hex frame a line) are replayed first. Needs root.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use lb_common::{conntrack, consts::prog_names, hash::Flow};
use lb_testbed::{
    lab::{
        Lab, VIP_ANY_PORT_DSR, VIP_EMPTY_DROP, VIP_MIXED, VIP_SOURCE_HASH, VIP_SOURCE_HASH6,
        VIP_TCP, VIP_UDP, VIP_V6, deltas,
    },
    model::{Chained, Decision, Model},
    packets::*,
};
use rand::{Rng, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};

/// Well-formed frames of every kind the fixtures cover: the mutations start from these.
fn seeds(mac: [u8; 6], rng: &mut StdRng) -> Vec<Vec<u8>> {
    let client = IpAddr::V4(Ipv4Addr::new(10, 50, rng.random(), rng.random()));
    let client6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, rng.random(), 7));
    let port: u16 = rng.random_range(1024..65535);
    let (vip, vip6) = (ip("10.200.0.1"), ip("fd00:200::1"));
    let mut out = vec![];
    for syn in [true, false] {
        out.push(tcp(mac, client, port, vip, 80, syn));
        out.push(tcp(mac, client, port, ip("10.200.0.2"), rng.random(), syn));
        out.push(tcp(mac, client, port, ip("10.200.0.3"), 80, syn));
        out.push(tcp(mac, client, port, ip("10.200.0.4"), 80, syn));
        out.push(tcp(mac, client6, port, vip6, 80, syn));
        out.push(tcp(mac, client, port, ip("10.111.0.1"), 22, syn));
    }
    out.push(udp(mac, client, port, vip, 53));
    // IPv4 Vips with IPv6 backends (IPIP and L2 DSR).
    out.push(tcp(mac, client, port, ip("10.200.0.8"), 80, rng.random()));
    out.push(tcp(mac, client, port, ip("10.200.0.9"), 80, rng.random()));
    // The hash-mode Vips: source (v4, v6) and destination port.
    out.push(tcp(mac, client, port, ip("10.200.0.5"), 80, rng.random()));
    out.push(tcp(mac, client6, port, ip("fd00:200::2"), 80, rng.random()));
    out.push(udp(mac, client, port, ip("10.200.0.6"), rng.random()));
    out.push(udp(mac, client6, port, vip6, 53));
    for dst in [vip, ip("10.200.0.2"), vip6] {
        let src = if dst.is_ipv4() { client } else { client6 };
        out.push(icmp_echo(
            (lb_testbed::lab::CLIENT_MAC, mac),
            src,
            dst,
            9,
            false,
        ));
    }
    out.push(icmp4_frag_needed(
        mac,
        Ipv4Addr::new(10, 99, 0, 1),
        client,
        port,
        vip,
        80,
    ));
    out.push(icmp6_too_big(
        mac,
        "fd00:99::1".parse().unwrap(),
        client6,
        port,
        vip6,
        80,
    ));
    out.push(arp(mac));
    out
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    if at + 2 <= f.len() {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Offset of the IP header and its version, following any 802.1Q tags.
fn l3_of(f: &[u8]) -> (usize, u16) {
    let mut at = 12;
    while at + 2 <= f.len() && be16(f, at) == 0x8100 {
        at += 4;
    }
    if at + 2 > f.len() {
        return (at, 0);
    }
    (at + 2, be16(f, at))
}

/// A length or offset field near its right value, or anything.
fn nudge(rng: &mut impl Rng, v: u16) -> u16 {
    match rng.random_range(0..4) {
        0 => rng.random(),
        1 => v.wrapping_add(rng.random_range(1..64)),
        2 => v.wrapping_sub(rng.random_range(1..64)),
        _ => [0, 1, 4, 8, 20, 40, 0xFFFF][rng.random_range(0..7)],
    }
}

fn mutate(rng: &mut StdRng, mut f: Vec<u8>, seeds: &[Vec<u8>], mac: [u8; 6]) -> Vec<u8> {
    let (l3, proto) = l3_of(&f);
    match rng.random_range(0..11) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..f.len());
                f[at] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let at = rng.random_range(12.min(f.len() - 1)..f.len());
            f[at] = rng.random();
        }
        2 => f.truncate(rng.random_range(14..=f.len())),
        3 => f.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        4 if proto == 0x0800 && f.len() >= l3 + 20 => match rng.random_range(0..4) {
            0 => {
                let v = nudge(rng, be16(&f, l3 + 2));
                put16(&mut f, l3 + 2, v)
            }
            1 => f[l3] = 0x40 | rng.random_range(0..16),
            2 => put16(&mut f, l3 + 6, rng.random()),
            _ => f[l3 + 9] = *[1, 6, 17, 4, 41, 58, rng.random()].choose(rng).unwrap(),
        },
        4 if proto == 0x86DD && f.len() >= l3 + 40 => {
            if rng.random() {
                {
                    let v = nudge(rng, be16(&f, l3 + 4));
                    put16(&mut f, l3 + 4, v)
                };
            } else {
                f[l3 + 6] = *[0, 6, 17, 43, 44, 58, 59, 60, 135, rng.random()]
                    .choose(rng)
                    .unwrap();
            }
        }
        5 => {
            // L4 header fields: TCP data offset and flags, UDP length.
            let l4 = if proto == 0x0800 && f.len() > l3 {
                l3 + (f[l3] & 0x0F) as usize * 4
            } else {
                l3 + 40
            };
            if l4 + 14 <= f.len() {
                match rng.random_range(0..3) {
                    0 => f[l4 + 12] = rng.random_range(0..16) << 4,
                    1 => f[l4 + 13] = rng.random(),
                    _ => {
                        let v = nudge(rng, be16(&f, l4 + 4));
                        put16(&mut f, l4 + 4, v)
                    }
                }
            }
        }
        6 if proto == 0x0800 && f.len() >= l3 + 20 => {
            // IPv4 options: random bytes, header length and total length grown to match
            // (or not).
            let words = rng.random_range(1..=10);
            let ihl = (f[l3] & 0x0F) as usize;
            let opts: Vec<u8> = (0..words * 4).map(|_| rng.random()).collect();
            let at = (l3 + ihl * 4).min(f.len());
            f.splice(at..at, opts);
            f[l3] = 0x40 | ((ihl + words) as u8 & 0x0F);
            if rng.random_bool(0.8) {
                let len = be16(&f, l3 + 2).wrapping_add(words as u16 * 4);
                put16(&mut f, l3 + 2, len);
            }
        }
        7 if proto == 0x86DD && f.len() >= l3 + 40 => {
            // An extension header chain in front of L4.
            for _ in 0..rng.random_range(1..4) {
                let kind = *[
                    0,
                    43,
                    44,
                    60,
                    51,
                    135,
                    139,
                    140,
                    59,
                    6,
                    17,
                    58,
                    rng.random(),
                ]
                .choose(rng)
                .unwrap();
                let next = f[l3 + 6];
                let len = 8 * rng.random_range(1..4);
                let mut ext = vec![next, (len / 8 - 1) as u8];
                ext.extend((2..len).map(|_| rng.random::<u8>()));
                f.splice(l3 + 40..l3 + 40, ext);
                f[l3 + 6] = kind;
                let payload = be16(&f, l3 + 4).wrapping_add(len as u16);
                put16(&mut f, l3 + 4, payload);
            }
        }
        8 => {
            for _ in 0..rng.random_range(1..4) {
                f = with_vlan(&f, rng.random());
            }
        }
        9 => {
            // An ICMP error to a Vip quoting (part of) any frame's IP packet.
            let quoted = seeds.choose(rng).unwrap();
            let quoted = mutate(rng, quoted.clone(), seeds, mac);
            let (ql3, qproto) = l3_of(&quoted);
            let body = quoted.get(ql3..).unwrap_or_default();
            let body = &body[..rng.random_range(0..=body.len().min(96))];
            f = if qproto == 0x86DD || rng.random_bool(0.3) {
                let mut out = vec![];
                etherparse::PacketBuilder::ethernet2(lb_testbed::lab::CLIENT_MAC, mac)
                    .ipv6(
                        [0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                        {
                            let IpAddr::V6(v) = ip("fd00:200::1") else {
                                unreachable!()
                            };
                            v.octets()
                        },
                        64,
                    )
                    .icmpv6_raw(*[2, 1, 128].choose(rng).unwrap(), 0, [0, 0, 5, 0])
                    .write(&mut out, body)
                    .unwrap();
                out
            } else {
                let mut out = vec![];
                let vip = *[[10, 200, 0, 1], [10, 200, 0, 2], [10, 200, 0, 9]]
                    .choose(rng)
                    .unwrap();
                etherparse::PacketBuilder::ethernet2(lb_testbed::lab::CLIENT_MAC, mac)
                    .ipv4([10, 99, 0, 1], vip, 64)
                    .icmpv4_raw(3, *[4, 4, 3, 1].choose(rng).unwrap(), [0, 0, 5, 0xdc])
                    .write(&mut out, body)
                    .unwrap();
                out
            };
        }
        _ => {
            // A random frame of a random EtherType.
            let len = rng.random_range(14..200);
            f = (0..len).map(|_| rng.random()).collect();
            let ethertype = *[0x0800u16, 0x86DD, 0x8100, rng.random()]
                .choose(rng)
                .unwrap();
            put16(&mut f, 12, ethertype);
            if ethertype == 0x0800 && rng.random() && len > 34 {
                f[14] = 0x45;
                put16(&mut f, 16, (len - 14) as u16);
                f[30..34].copy_from_slice(&[10, 200, 0, rng.random_range(1..5)]);
            }
        }
    }
    f
}

#[derive(Default)]
struct Tally {
    executions: u64,
    by_outcome: BTreeMap<String, u64>,
    failures: Vec<String>,
    /// Flows forwarded unchained, so that this CPU's flow cache may hold them after their
    /// connection-table way is gone: then they are not chained.
    tracked: HashSet<Flow>,
}

/// Previous tables (second chance), as backend ids of the lab, for the Vips the model
/// must judge: a moved slot whose previous Backend is up (1, 2), down (6), of the other
/// family (4 for an IPv4 Vip, 1 for an IPv6 one); Vips that never chain (UDP, L2 DSR, no
/// current Backend); an IPv4 Vip whose current Backends are IPv6. `VIP_V6`'s expires and
/// comes back during the run.
const PREVIOUS: &[(u32, &[u32])] = &[
    (VIP_TCP, &[1, 2, 6]),
    (VIP_UDP, &[1, 2]),
    (VIP_ANY_PORT_DSR, &[1]),
    (VIP_V6, &[4]),
    (VIP_EMPTY_DROP, &[1, 2]),
    (VIP_SOURCE_HASH, &[2, 4]),
    (VIP_SOURCE_HASH6, &[5, 1]),
    (VIP_MIXED, &[1, 2]),
];

const CHAINED_COUNTERS: [&str; 4] = [
    "conntrack_miss",
    "conntrack_miss_non_syn",
    "second_chance",
    "tx",
];

/// Whether both buckets `flow` may live in are full (no way left for a new entry).
fn buckets_full(dp: &lb_userspace::dataplane::Dataplane, flow: &Flow) -> bool {
    let seed = dp.conntrack_seed().unwrap();
    let place = conntrack::place(
        flow.conntrack_hash(seed),
        dp.capacities().conntrack_buckets() - 1,
    );
    [place.first, place.second]
        .iter()
        .all(|&i| dp.conntrack_bucket(i).unwrap().ways.iter().all(|&w| w != 0))
}

/// Packets chained for Vip `vip` and for previous Backend `previous` so far.
fn chained_counts(dp: &lb_userspace::dataplane::Dataplane, c: &Chained) -> (u64, u64) {
    (
        dp.chained(true, c.vip + 1).unwrap()[c.vip as usize],
        dp.chained(false, c.previous + 1).unwrap()[c.previous as usize],
    )
}

/// Runs one frame and holds it to the model; `Some` if it was forwarded.
fn check(
    dp: &mut lb_userspace::dataplane::Dataplane,
    ifindex: u32,
    model: &Model,
    frame: &[u8],
    tally: &mut Tally,
) -> Option<()> {
    // What the connection table holds for the frame's flow, as the program will find it.
    let want = model.decide_with(frame, &|flow| dp.conntrack(flow).unwrap());
    let chain = match &want {
        Decision::Forward {
            chained: Some(c), ..
        } => Some(c),
        _ => None,
    };
    let chained_before = chain.map(|c| chained_counts(dp, c));
    let before = dp.counters().unwrap();
    let out = dp
        .test_run(prog_names::LB_INGRESS, frame, ifindex, 1)
        .unwrap();
    let after = dp.counters().unwrap();
    let chained_after = chain.map(|c| chained_counts(dp, c));
    tally.executions += 1;
    let mut got = deltas(&before, &after);
    got.sort();
    let sorted = |mut v: Vec<(&'static str, u64)>| {
        v.sort();
        v
    };
    let ones = |names: Vec<&'static str>| sorted(names.into_iter().map(|n| (n, 1)).collect());
    let mut was_chained = false;
    let problem = match &want {
        Decision::Pass(counter) => {
            (out.action != XDP_PASS || out.packet != frame || got != ones(vec![counter]))
                .then(|| format!("want PASS untouched, [{counter}]"))
        }
        Decision::PassNoBackend(extra) => {
            let mut names = extra.clone();
            names.push("pass_no_backend");
            (out.action != XDP_PASS || out.packet != frame || got != ones(names.clone()))
                .then(|| format!("want PASS untouched, {names:?}"))
        }
        Decision::Drop(counter, extra) => {
            let mut names = extra.clone();
            names.push(counter);
            (out.action != XDP_DROP || got != ones(names.clone()))
                .then(|| format!("want DROP, {names:?}"))
        }
        Decision::Stateful => None,
        Decision::Reply(output) => {
            (out.action != XDP_TX || out.packet != *output || got != ones(vec!["icmp_echo_reply"]))
                .then(|| "want TX of the echo reply, [icmp_echo_reply]".to_owned())
        }
        Decision::Forward {
            backend,
            output,
            icmp_error,
            flow,
            chained,
            entry,
        } => {
            let plain = if *icmp_error {
                vec![ones(vec!["icmp_to_backend", "tx"])]
            } else if *entry {
                vec![ones(vec!["conntrack_hit", "tx"])]
            } else if chained.is_some() {
                // Only a connection-table entry (or the flow cache) keeps it unchained.
                vec![ones(vec!["conntrack_hit", "tx"])]
            } else {
                vec![
                    ones(vec!["conntrack_hit", "tx"]),
                    ones(vec!["conntrack_miss", "tx"]),
                    ones(vec!["conntrack_miss", "conntrack_miss_non_syn", "tx"]),
                ]
            };
            // A miss whose two candidate buckets are full of active flows is sent without an
            // entry, and counted (README: the connection table).
            let insert_failed = !*icmp_error
                && !*entry
                && got.contains(&("conntrack_insert_fail", 1))
                && flow.is_some_and(|f| buckets_full(dp, &f))
                && plain.contains(
                    &got.iter()
                        .copied()
                        .filter(|(c, _)| *c != "conntrack_insert_fail")
                        .collect(),
                );
            let sent_plain = out.action == XDP_TX
                && out.packet == *output
                && (plain.contains(&got) || insert_failed);
            // Chained: both headers exact, counted once globally, for its Vip and for the
            // previous Backend.
            was_chained = chained.as_ref().is_some_and(|c| {
                out.action == XDP_TX
                    && out.packet == c.output
                    && got == ones(CHAINED_COUNTERS.to_vec())
                    && chained_after
                        == chained_before.map(|(vip, previous)| (vip + 1, previous + 1))
            });
            let tracked = flow.is_some_and(|f| tally.tracked.contains(&f));
            match chained {
                None if !sent_plain => {
                    Some(format!("want TX to backend {backend}, one of {plain:?}"))
                }
                Some(c) if !(was_chained || tracked && sent_plain) => Some(format!(
                    "want TX to backend {backend} chained to {} {CHAINED_COUNTERS:?} \
                     (the flow {}), out {}",
                    c.previous,
                    if tracked {
                        "may be in the flow cache: or plain, [conntrack_hit, tx]"
                    } else {
                        "has no entry"
                    },
                    hex(&c.output)
                )),
                _ => {
                    if !was_chained && let Some(f) = flow {
                        tally.tracked.insert(*f);
                    }
                    None
                }
            }
        }
    };
    if want.malformed() && out.action == XDP_TX {
        tally
            .failures
            .push(format!("malformed frame forwarded: {}", hex(frame)));
    }
    let key = match &want {
        Decision::Pass(c) => format!("pass {c}"),
        Decision::PassNoBackend(_) => "pass pass_no_backend".into(),
        Decision::Drop(c, _) => format!("drop {c}"),
        Decision::Reply(_) => "tx echo_reply".into(),
        Decision::Stateful => "stateful fragment (not checked)".into(),
        Decision::Forward { .. } if was_chained => "tx chained".into(),
        Decision::Forward { icmp_error, .. } => {
            format!("tx{}", if *icmp_error { " icmp" } else { "" })
        }
    };
    *tally.by_outcome.entry(key).or_default() += 1;
    if let Some(problem) = problem {
        tally.failures.push(format!(
            "{problem}\n  got {} {got:?}\n  frame {}\n  out   {}",
            out.action,
            hex(frame),
            hex(&out.packet)
        ));
    }
    matches!(want, Decision::Forward { .. }).then_some(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(line: &str) -> Vec<u8> {
    (0..line.len() / 2)
        .map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// Frames that once broke the model or the program, kept for every run.
fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/xdp");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    let mut frames = vec![];
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        frames.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(unhex),
        );
    }
    frames
}

#[test]
fn xdp_program_matches_the_model_on_random_and_mutated_frames() {
    let seconds: u64 = std::env::var("MLB_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("MLB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("xdp fuzz: seed {seed} (MLB_FUZZ_SEED), {seconds} s (MLB_FUZZ_SECONDS)");
    let mut lab = Lab::new();
    for (vip, members) in PREVIOUS {
        lab.set_prev_table(*vip, Some(members));
    }
    let v6_previous = lab.prev_tables[&VIP_V6].clone();
    let filter = lab.dataplane.global().unwrap().vip_filter;
    let mut model = Model {
        vips: &lab.vips,
        backends: &lab.backends,
        tables: &lab.tables,
        prev_tables: lab.prev_tables.clone(),
        lb_mac: lab.lb_mac,
        filter,
    };
    let (mac, ifindex) = (lab.lb_mac, lab.ifindex);
    let dataplane = &mut lab.dataplane;
    let started = Instant::now();
    let tally = lab
        .netns
        .enter(|| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut tally = Tally::default();
            for frame in corpus() {
                check(dataplane, ifindex, &model, &frame, &mut tally);
            }
            let deadline = started + Duration::from_secs(seconds);
            while Instant::now() < deadline && tally.failures.len() < 20 {
                // Now and then VIP_V6's previous table expires, or is back (a swap costs a
                // grace period: not every round).
                if rng.random_ratio(1, 8) {
                    if model.prev_tables.remove(&VIP_V6).is_some() {
                        dataplane.remove_prev_table(VIP_V6).unwrap();
                    } else {
                        dataplane
                            .install_prev_tables(&[(VIP_V6, &v6_previous)])
                            .unwrap();
                        model.prev_tables.insert(VIP_V6, v6_previous.clone());
                    }
                }
                let seeds = seeds(mac, &mut rng);
                for _ in 0..64 {
                    let base = seeds.choose(&mut rng).unwrap();
                    // Half the time the base flow first gets cached, so the mutant meets
                    // the fast path where it can.
                    if rng.random() {
                        for _ in 0..2 {
                            check(dataplane, ifindex, &model, base, &mut tally);
                        }
                    }
                    let mut frame = base.clone();
                    for _ in 0..rng.random_range(1..=3) {
                        frame = mutate(&mut rng, frame, &seeds, mac);
                    }
                    if frame.len() < 14 {
                        continue;
                    }
                    frame.truncate(1600);
                    // Forwarded: again, now from the flow cache or the connection table.
                    if check(dataplane, ifindex, &model, &frame, &mut tally).is_some() {
                        check(dataplane, ifindex, &model, &frame, &mut tally);
                    }
                }
            }
            tally
        })
        .unwrap();
    let elapsed = started.elapsed();
    eprintln!(
        "xdp fuzz: {} executions in {:.1} s ({:.0}/s); outcomes {:?}",
        tally.executions,
        elapsed.as_secs_f64(),
        tally.executions as f64 / elapsed.as_secs_f64(),
        tally.by_outcome
    );
    assert!(
        tally.failures.is_empty(),
        "{} frame(s) where the program and the model disagree (seed {seed}; add the frame \
         to tests/data/fuzz/xdp/ once fixed):\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    // The budget reached every kind of decision: the model is not vacuous.
    for outcome in [
        "pass pass_not_ip",
        "pass pass_not_vip",
        "pass pass_malformed",
        "pass pass_vip_other",
        "drop drop_malformed",
        "drop drop_fragment",
        "drop drop_ipv6_ext",
        "drop drop_no_backend",
        "tx",
        "tx icmp",
        "tx chained",
    ] {
        assert!(
            tally.by_outcome.contains_key(outcome),
            "no frame reached {outcome}: {:?}",
            tally.by_outcome
        );
    }
}
