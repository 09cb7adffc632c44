//! The connection table on the real XDP object (BPF_PROG_TEST_RUN): flows sharing a
//! bucket, floods, idle expiry, two CPUs racing on one bucket. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_common::{
    conntrack::{WAYS, Way, place},
    consts::PROTO_TCP,
    hash::Flow,
    types::ConntrackBucket,
};
use lb_testbed::{
    lab::{CONNTRACK_SEED, Lab, VIP_TCP, deltas},
    packets::{XDP_TX, ip, tcp},
};
use lb_userspace::dataplane::{Capacities, test_run_fd};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

const VIP: &str = "10.200.0.1";

fn flow(src: IpAddr, sport: u16) -> Flow {
    Flow {
        src,
        dst: ip(VIP),
        sport,
        dport: 80,
        proto: PROTO_TCP,
    }
}

/// The IPIP outer destination: the backend an IPv4 packet was sent to.
fn backend_of(packet: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        <[u8; 4]>::try_from(&packet[30..34]).unwrap(),
    ))
}

/// A small table (128 buckets) behind a one-slot flow cache, so that established packets
/// really read the connection table.
fn small_lab(conntrack_idle: u32) -> Lab {
    Lab::with_capacities(Capacities {
        max_vips: 16,
        max_backends: 64,
        conntrack_entries: 1024,
        conntrack_idle,
        flow_cache_entries: 1,
    })
}

/// Sends one packet of `f` (SYN or ACK) and returns the backend id it went to.
fn send(lab: &mut Lab, f: &Flow, syn: bool) -> u32 {
    let out = lab.run(&tcp(lab.lb_mac, f.src, f.sport, f.dst, 80, syn));
    assert_eq!(out.action, XDP_TX, "{f:?}");
    lab.backend_by_addr(backend_of(&out.packet))
        .expect("a known backend")
        .id
}

/// A table for the Vip with only the backend that neither of `ids` is.
fn other_backend(ids: &[u32]) -> u32 {
    (1..=3).find(|b| !ids.contains(b)).expect("a third backend")
}

#[test]
fn two_flows_in_one_bucket_both_keep_their_backends() {
    let mut lab = small_lab(60);
    let mask = lab.dataplane.capacities().conntrack_buckets() - 1;
    let client = ip("10.50.0.7");
    let a = flow(client, 50_000);
    let home = place(a.conntrack_hash(CONNTRACK_SEED), mask).first;
    let a_backend = lab.predict(VIP_TCP, &a);
    // Another flow whose first bucket is A's, on another backend.
    let b = (50_001..u16::MAX)
        .map(|p| flow(client, p))
        .find(|b| {
            place(b.conntrack_hash(CONNTRACK_SEED), mask).first == home
                && lab.predict(VIP_TCP, b) != a_backend
        })
        .expect("a flow sharing A's bucket");
    let b_backend = lab.predict(VIP_TCP, &b);
    // B's other bucket full of active flows, so that B must share A's.
    let other = place(b.conntrack_hash(CONNTRACK_SEED), mask);
    let now = lab.dataplane.conntrack_now().expect("the kernel's clock");
    let mut full = ConntrackBucket::default();
    for (i, way) in full.ways.iter_mut().enumerate() {
        *way = Way {
            tag: 0x1000 + i as u64,
            backend: 3,
            vip: 0,
            generation: 0,
            age: now,
        }
        .pack();
    }
    lab.dataplane
        .set_conntrack_bucket(other.second, &full)
        .unwrap();
    assert_eq!(send(&mut lab, &a, true), a_backend);
    assert_eq!(send(&mut lab, &b, true), b_backend);
    let bucket = lab.dataplane.conntrack_bucket(home).unwrap();
    assert_eq!(
        bucket.ways.iter().filter(|w| **w != 0).count(),
        2,
        "both in one bucket: {bucket:x?}"
    );
    assert_eq!(
        lab.dataplane.conntrack(&a).unwrap().map(|w| w.backend),
        Some(a_backend)
    );
    assert_eq!(
        lab.dataplane.conntrack(&b).unwrap().map(|w| w.backend),
        Some(b_backend)
    );

    // A new table that sends new flows to neither: both stay where they are.
    lab.set_table(VIP_TCP, &[other_backend(&[a_backend, b_backend])]);
    for _ in 0..3 {
        assert_eq!(send(&mut lab, &a, false), a_backend, "flow A moved");
        assert_eq!(send(&mut lab, &b, false), b_backend, "flow B moved");
    }
}

/// A bucket's eighth word is its prefetch word: a SYN writes it (to start loading the line
/// before its insert reads it), and nothing reads it as a way. An entry planted there for a
/// flow, naming another backend, is not followed.
#[test]
fn prefetch_word_is_written_by_a_syn_and_never_taken_for_a_way() {
    let mut lab = small_lab(60);
    let mask = lab.dataplane.capacities().conntrack_buckets() - 1;
    let a = flow(ip("10.50.0.9"), 41_000);
    let home = place(a.conntrack_hash(CONNTRACK_SEED), mask);
    let a_backend = lab.predict(VIP_TCP, &a);
    let now = lab.dataplane.conntrack_now().expect("the kernel's clock");
    let planted = Way {
        tag: home.tag,
        backend: other_backend(&[a_backend]),
        vip: 0,
        generation: 0,
        age: now,
    }
    .pack();
    let mut bucket = ConntrackBucket {
        prefetch: planted,
        ..Default::default()
    };
    lab.dataplane
        .set_conntrack_bucket(home.first, &bucket)
        .unwrap();
    // An ACK of the unknown flow: steered by the table, not by the planted word.
    assert_eq!(send(&mut lab, &a, false), a_backend);
    assert_eq!(
        lab.dataplane.conntrack(&a).unwrap().map(|w| w.backend),
        Some(a_backend)
    );
    // A SYN of another flow of that bucket overwrites the prefetch word.
    bucket = lab.dataplane.conntrack_bucket(home.first).unwrap();
    bucket.prefetch = planted;
    lab.dataplane
        .set_conntrack_bucket(home.first, &bucket)
        .unwrap();
    let b = (41_001..u16::MAX)
        .map(|p| flow(ip("10.50.0.9"), p))
        .find(|b| place(b.conntrack_hash(CONNTRACK_SEED), mask).first == home.first)
        .expect("a flow of the same bucket");
    send(&mut lab, &b, true);
    let after = lab.dataplane.conntrack_bucket(home.first).unwrap();
    assert_eq!(
        after.prefetch, 0,
        "the SYN wrote the prefetch word: {after:x?}"
    );
    assert_eq!(
        after.ways.iter().filter(|w| **w != 0).count(),
        2,
        "{after:x?}"
    );
}

/// 60 connections that keep talking, then a flood of 10× the table's capacity in fresh
/// SYNs: no connection loses its entry (checked by a table change after the flood), the
/// flood is still forwarded, and what found no room is counted.
#[test]
fn flood_of_ten_times_capacity_evicts_no_active_connection() {
    let mut lab = small_lab(60);
    let capacity = lab.dataplane.capacities().conntrack_buckets() as usize * WAYS;
    let mut rng = StdRng::seed_from_u64(13);
    let active: Vec<Flow> = (0..60)
        .map(|i| flow(ip(&format!("10.50.1.{}", i + 1)), 40_000 + i))
        .collect();
    let homes: Vec<u32> = active
        .iter()
        .map(|f| {
            let b = send(&mut lab, f, true);
            assert_eq!(send(&mut lab, f, false), b);
            b
        })
        .collect();

    let before = lab.counters();
    let flood = 10 * capacity;
    for i in 0..flood {
        let src = IpAddr::V4(Ipv4Addr::new(10, 60, rng.random(), rng.random()));
        let f = flow(src, rng.random_range(1024..65535));
        send(&mut lab, &f, true);
        if i % 100 == 0 {
            // A connection talks now and then, as a request every 100 ms would.
            let k = (i / 100) % active.len();
            assert_eq!(send(&mut lab, &active[k], false), homes[k]);
        }
    }
    let flooded = deltas(&before, &lab.counters());
    let failed = flooded
        .iter()
        .find(|(c, _)| *c == "conntrack_insert_fail")
        .map_or(0, |(_, n)| *n);
    assert!(
        failed as usize > flood / 2,
        "the flood should have found the table full: {flooded:?}"
    );
    let occupied: usize = (0..lab.dataplane.capacities().conntrack_buckets())
        .map(|i| {
            let b = lab.dataplane.conntrack_bucket(i).unwrap();
            b.ways.iter().filter(|w| **w != 0).count()
        })
        .sum();
    assert!(
        occupied > capacity * 95 / 100,
        "{occupied} of {capacity} ways used"
    );

    // A new table sends new flows elsewhere; every connection stays on its backend.
    lab.set_table(VIP_TCP, &[1]);
    let broken: Vec<&Flow> = active
        .iter()
        .zip(&homes)
        .filter(|(f, home)| send(&mut lab, f, false) != **home)
        .map(|(f, _)| f)
        .collect();
    assert!(
        broken.is_empty(),
        "{} of 60 connections lost their entry to the flood: {broken:?}",
        broken.len()
    );
}

/// Entries idle longer than `conntrack_idle` make room for new flows; a flow that keeps
/// sending keeps its entry.
#[test]
fn idle_entries_expire_and_make_room() {
    let mut lab = small_lab(1);
    let capacity = lab.dataplane.capacities().conntrack_buckets() as usize * WAYS;
    let keeper = flow(ip("10.50.2.1"), 45_000);
    let keeper_home = send(&mut lab, &keeper, true);
    let mut rng = StdRng::seed_from_u64(14);
    let fresh = |rng: &mut StdRng| {
        let src = IpAddr::V4(Ipv4Addr::new(10, 61, rng.random(), rng.random()));
        flow(src, rng.random_range(1024..65535))
    };
    let old: Vec<Flow> = (0..2 * capacity).map(|_| fresh(&mut rng)).collect();
    for f in &old {
        send(&mut lab, f, true);
    }
    let before = lab.counters();
    send(&mut lab, &fresh(&mut rng), true);
    assert!(
        deltas(&before, &lab.counters()).contains(&("conntrack_insert_fail", 1))
            || lab.dataplane.conntrack(&keeper).unwrap().is_some(),
        "the table should be full"
    );

    // 1.5 s pass; only the keeper talks.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(send(&mut lab, &keeper, false), keeper_home);
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = lab.counters();
    for _ in 0..capacity / 2 {
        send(&mut lab, &fresh(&mut rng), true);
    }
    let after = deltas(&before, &lab.counters());
    assert!(
        !after.iter().any(|(c, _)| *c == "conntrack_insert_fail"),
        "idle entries should have made room: {after:?}"
    );
    let left = old
        .iter()
        .filter(|f| lab.dataplane.conntrack(f).unwrap().is_some())
        .count();
    assert!(
        left < capacity,
        "{left} idle flows kept their entries after {} new ones",
        capacity / 2
    );
    lab.set_table(VIP_TCP, &[other_backend(&[keeper_home])]);
    assert_eq!(
        send(&mut lab, &keeper, false),
        keeper_home,
        "the keeper lost its entry"
    );
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}"
        );
    }
}

/// Two CPUs at once, all in one pair of buckets: one CPU keeps established flows talking
/// (refreshing their ways) while the other inserts new flows into the same buckets. A
/// packet may lose its entry to the race and be steered by the table, but must never go
/// to a backend that neither its table nor its own entry named.
#[test]
fn two_cpus_racing_on_one_bucket_never_misroute() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut lab = small_lab(60);
    let mask = lab.dataplane.capacities().conntrack_buckets() - 1;
    let home = place(
        flow(ip("10.50.3.1"), 1).conntrack_hash(CONNTRACK_SEED),
        mask,
    );
    let in_home = |f: &Flow| {
        let p = place(f.conntrack_hash(CONNTRACK_SEED), mask);
        p.first == home.first || p.first == home.second
    };
    let mut candidates = (1024..u16::MAX).map(|p| flow(ip("10.50.3.1"), p));
    let old: Vec<Flow> = candidates.by_ref().filter(in_home).take(6).collect();
    // With the old ones, they fill the two buckets (16 ways): every later SYN rewrites its
    // own way while the other CPU reads and refreshes the ways beside it.
    let new: Vec<Flow> = candidates.filter(in_home).take(10).collect();
    let old_homes: Vec<u32> = old.iter().map(|f| send(&mut lab, f, true)).collect();
    let before_table = lab.tables[&VIP_TCP].clone();
    lab.set_table(VIP_TCP, &[2, 3]);
    let after_table = lab.tables[&VIP_TCP].clone();
    let seed = lb_testbed::lab::SEED;

    let fd = lab.dataplane.program_fd("lb_ingress").unwrap();
    let (mac, ifindex) = (lab.lb_mac, lab.ifindex);
    let netns = format!("/var/run/netns/{}", lab.netns.name());
    let run = |cpu: usize, packets: Vec<(Flow, bool)>| {
        let fd = &fd;
        let netns = &netns;
        move || {
            pin_to_cpu(cpu % cpus);
            let ns = std::fs::File::open(netns).unwrap();
            // SAFETY: setns on this thread only.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET,) },
                0
            );
            use std::os::fd::AsFd as _;
            packets
                .into_iter()
                .map(|(f, syn)| {
                    let pkt = tcp(mac, f.src, f.sport, f.dst, 80, syn);
                    let (action, out) = test_run_fd(fd.as_fd(), &pkt, ifindex).unwrap();
                    (f, syn, action, backend_of(&out))
                })
                .collect::<Vec<_>>()
        }
    };
    let talk: Vec<(Flow, bool)> = (0..4000).map(|i| (old[i % old.len()], false)).collect();
    let insert: Vec<(Flow, bool)> = (0..2000)
        .flat_map(|i| {
            let f = new[i % new.len()];
            [(f, true), (f, false)]
        })
        .collect();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(run(0, talk));
        let b = s.spawn(run(1, insert));
        (a.join().unwrap(), b.join().unwrap())
    });
    let addr_of = |id: u32| lab.backend(id).addr;
    let mut misrouted = Vec::new();
    for (f, syn, action, to) in a.iter().chain(&b) {
        assert_eq!(*action, XDP_TX);
        let by_new_table = addr_of(after_table.lookup(f.hash(seed)));
        let by_entry = old
            .iter()
            .position(|o| o == f)
            .map(|i| addr_of(old_homes[i]));
        let allowed = if *syn {
            *to == by_new_table
        } else {
            *to == by_new_table || by_entry == Some(*to)
        };
        if !allowed {
            misrouted.push((f, *syn, *to));
        }
    }
    assert!(
        misrouted.is_empty(),
        "{} packets went where neither their table nor their entry said: {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    // The old flows were established under the first table: check it was different
    // enough to matter.
    assert!(
        old.iter()
            .any(|f| before_table.lookup(f.hash(seed)) != after_table.lookup(f.hash(seed))),
        "the table change moved none of the old flows"
    );
}

/// A SYN whose bucket and tag a live flow already holds (tags are 21 bits, so a flood of
/// fresh SYNs meets some) never takes the way from it: it follows that flow's Backend when
/// the flow is of its Vip, goes without an entry when it is another Vip's, and takes the
/// way only when its Backend is down.
#[test]
fn a_syn_never_takes_the_way_of_a_live_flow() {
    let mut lab = small_lab(60);
    let mask = lab.dataplane.capacities().conntrack_buckets() - 1;
    let client = ip("10.50.0.11");
    let now = lab.dataplane.conntrack_now().expect("the kernel's clock");
    // Plants `way` with `f`'s tag as the only word of `f`'s first bucket.
    let plant = |lab: &mut Lab, f: &Flow, way: Way| {
        let home = place(f.conntrack_hash(CONNTRACK_SEED), mask);
        let mut bucket = ConntrackBucket::default();
        bucket.ways[0] = Way {
            tag: home.tag,
            age: now,
            ..way
        }
        .pack();
        lab.dataplane
            .set_conntrack_bucket(home.first, &bucket)
            .unwrap();
    };
    let counted = |lab: &Lab, before: &[u64], name: &str| {
        deltas(before, &lab.counters())
            .iter()
            .find(|(c, _)| *c == name)
            .map_or(0, |(_, n)| *n)
    };

    // A live flow T of the Vip, on another backend than S's table slot.
    let s = flow(client, 42_000);
    let s_backend = lab.predict(VIP_TCP, &s);
    let t = (42_001..u16::MAX)
        .map(|p| flow(client, p))
        .find(|t| lab.predict(VIP_TCP, t) != s_backend)
        .expect("a flow on another backend");
    let t_backend = send(&mut lab, &t, true);
    let t_way = lab.dataplane.conntrack(&t).unwrap().expect("T's way");
    plant(&mut lab, &s, t_way);
    let before = lab.counters();
    assert_eq!(send(&mut lab, &s, true), t_backend, "S follows the way");
    assert_eq!(send(&mut lab, &s, false), t_backend, "and stays");
    assert_eq!(counted(&lab, &before, "conntrack_shared"), 1);
    assert_eq!(
        lab.dataplane.conntrack(&s).unwrap().map(|w| w.backend),
        Some(t_backend),
        "T keeps its way"
    );

    // A live flow of another Vip (10.200.0.5:80, hashed by source) under S2's tag.
    let other = Flow {
        dst: ip("10.200.0.5"),
        ..flow(ip("10.50.0.12"), 43_000)
    };
    let out = lab.run(&tcp(
        lab.lb_mac,
        other.src,
        other.sport,
        other.dst,
        80,
        true,
    ));
    assert_eq!(out.action, XDP_TX);
    let other_way = lab.dataplane.conntrack(&other).unwrap().expect("its way");
    let s2 = flow(client, 44_000);
    plant(&mut lab, &s2, other_way);
    let before = lab.counters();
    assert_eq!(send(&mut lab, &s2, true), lab.predict(VIP_TCP, &s2));
    assert_eq!(counted(&lab, &before, "conntrack_insert_fail"), 1);
    assert_eq!(
        lab.dataplane.conntrack(&s2).unwrap(),
        Some(Way {
            tag: place(s2.conntrack_hash(CONNTRACK_SEED), mask).tag,
            age: now,
            ..other_way
        }),
        "the other Vip's flow keeps its way"
    );

    // T's backend down: its way is dead, and S3's SYN takes it.
    let s3 = (45_000..u16::MAX)
        .map(|p| flow(client, p))
        .find(|f| lab.predict(VIP_TCP, f) != t_backend)
        .expect("a flow off T's backend");
    plant(&mut lab, &s3, t_way);
    lab.set_backend_up(t_backend, false);
    let s3_backend = send(&mut lab, &s3, true);
    assert_ne!(s3_backend, t_backend);
    assert_eq!(
        lab.dataplane.conntrack(&s3).unwrap().map(|w| w.backend),
        Some(s3_backend)
    );
}
