//! The connection table's insert and lookup rules (the functions the kernel program runs,
//! here over memory of our own, with a model clock) against an ideal LRU of the same
//! capacity, on the same trace of connections: how many connections lose their entry
//! while they are still talking.
//!
//! Run with `--nocapture` to see the table of losses per load.

use std::collections::{BTreeMap, HashMap};

use lb_common::{
    conntrack::{self, WAYS, Way},
    types::ConntrackBucket,
};

/// Deterministic xorshift, so the trace is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One packet: a connection id and its hash; `first` for its first packet.
struct Packet {
    flow: u64,
    hash: u64,
    first: bool,
}

/// Connections arriving at `rate` per tick, living an exponential time of mean `life`
/// ticks, each sending a packet every `period` ticks. Returns packets per tick.
fn trace(ticks: u32, rate: f64, life: f64, period: u32, rng: &mut Rng) -> Vec<Vec<Packet>> {
    let mut out: Vec<Vec<Packet>> = (0..ticks).map(|_| Vec::new()).collect();
    let mut id = 0u64;
    let mut carry = 0.0;
    for t in 0..ticks {
        carry += rate;
        while carry >= 1.0 {
            carry -= 1.0;
            id += 1;
            let hash = rng.next();
            let lifetime = (-rng.unit().max(1e-12).ln() * life) as u32;
            let mut s = t;
            while s < ticks && s <= t + lifetime {
                out[s as usize].push(Packet {
                    flow: id,
                    hash,
                    first: s == t,
                });
                s += period;
            }
        }
    }
    out
}

/// Connections that lost their entry at some packet after their first (the ones a table
/// change would then break), for the bucketed table; and connections that never got one
/// (the table was full of active ones: steered by their Maglev table all along).
fn table_losses(packets: &[Vec<Packet>], buckets: u32, idle: u64) -> (usize, usize) {
    let mut table = vec![ConntrackBucket::default(); buckets as usize];
    let mask = buckets - 1;
    let mut had_entry: HashMap<u64, bool> = HashMap::new();
    let mut lost = std::collections::HashSet::new();
    for (t, tick) in packets.iter().enumerate() {
        let now = t as u64 & conntrack::AGE_MASK;
        for p in tick {
            let place = conntrack::place(p.hash, mask);
            let first: *mut ConntrackBucket = &mut table[place.first as usize];
            let second: *mut ConntrackBucket = &mut table[place.second as usize];
            // SAFETY: buckets of our own table.
            let found = unsafe {
                conntrack::find(first, place.tag).or_else(|| conntrack::find(second, place.tag))
            };
            match found {
                Some((way, word)) => unsafe {
                    conntrack::store(way, conntrack::with_age(word, now))
                },
                None => {
                    if !p.first && had_entry.get(&p.flow) == Some(&true) {
                        lost.insert(p.flow);
                    }
                    let word = Way {
                        tag: place.tag,
                        backend: 1,
                        vip: 0,
                        generation: 0,
                        age: now,
                    }
                    .pack();
                    // SAFETY: as above.
                    let inserted = unsafe {
                        match conntrack::choose(first, second, place.tag, now, idle) {
                            Some(i) => {
                                conntrack::store(conntrack::way_at(first, second, i), word);
                                true
                            }
                            None => false,
                        }
                    };
                    let entry = had_entry.entry(p.flow).or_default();
                    *entry |= inserted;
                }
            }
        }
    }
    let untracked = had_entry.values().filter(|had| !**had).count();
    (lost.len(), untracked)
}

/// The same for an ideal LRU of `capacity` exact entries.
fn lru_losses(packets: &[Vec<Packet>], capacity: usize) -> usize {
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut order: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seq = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut lost = std::collections::HashSet::new();
    for tick in packets {
        for p in tick {
            seq += 1;
            match last.insert(p.flow, seq) {
                Some(old) => {
                    order.remove(&old);
                }
                None => {
                    if !p.first && seen.contains(&p.flow) {
                        lost.insert(p.flow);
                    }
                    if last.len() > capacity {
                        let (_, victim) = order.pop_first().expect("a victim");
                        last.remove(&victim);
                    }
                }
            }
            seen.insert(p.flow);
            order.insert(seq, p.flow);
        }
    }
    lost.len()
}

#[test]
fn losses_against_an_ideal_lru_of_the_same_capacity() {
    let buckets = 128u32;
    let capacity = buckets as usize * WAYS;
    let (period, life) = (10u32, 400.0);
    // Idle after 3 periods of silence (the model clock ticks once per age unit).
    let idle = 3 * period as u64;
    println!("load  connections  lost (table)  never tracked (table)  lost (ideal LRU)");
    for load in [0.5, 0.8, 0.9, 1.5, 3.0] {
        let mut rng = Rng(0x5eed_0000 + (load * 10.0) as u64);
        // Active connections ≈ rate × life; the table holds `capacity` of them.
        let rate = load * capacity as f64 / life;
        let packets = trace(20 * life as u32, rate, life, period, &mut rng);
        let connections = packets.iter().flatten().filter(|p| p.first).count();
        let (table, untracked) = table_losses(&packets, buckets, idle);
        let lru = lru_losses(&packets, capacity);
        println!("{load:>4}  {connections:>11}  {table:>12}  {untracked:>21}  {lru:>16}");
        let share = |n: usize| n as f64 / connections as f64;
        if load <= 0.9 {
            // Below capacity an ideal LRU loses nothing. The table loses no entry either;
            // the price of two 8-way candidates is the connections that find both full
            // (ended ones stay `idle` ticks more, so 0.9 is ~0.97 of the ways in use):
            // measured 0.01% / 0.9% / 3.5% at 0.5 / 0.8 / 0.9.
            let bound = if load <= 0.8 { 0.015 } else { 0.05 };
            assert!(
                table == 0 && share(untracked) <= share(lru) + bound,
                "load {load}: table lost {table} and left {untracked} untracked, LRU lost {lru} of {connections}"
            );
        } else {
            // Above capacity an LRU evicts talking connections round-robin; the table
            // keeps them and leaves the new ones without an entry. Even counting those
            // as lost, it loses fewer.
            assert!(
                table < lru / 4 && table + untracked < lru,
                "load {load}: table lost {table}, LRU {lru} of {connections}"
            );
        }
    }
}
