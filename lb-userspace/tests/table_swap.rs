//! Swapping many Vips' MaglevTables at once (a backend shared by every Vip going down):
//! one batch on the real kernel's array-of-maps, each Vip seeing its own new table.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use lb_common::maglev::{self, MaglevBackend};
use lb_userspace::{
    dataplane::{Capacities, Dataplane},
    pinned::Pinned,
};

/// Removes the pins on drop, when an assertion fails too.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_batch_swaps_every_vips_table_and_each_sees_its_own() {
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/mlb-swap-{}",
        std::process::id()
    )));
    let pin = &pins.0;
    let _ = std::fs::remove_dir_all(pin);
    let mut dataplane = Dataplane::load_pinned(
        Capacities {
            max_vips: 256,
            max_backends: 16,
            conntrack_entries: 1024,
            ..Default::default()
        },
        pin,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let backend =
        |id: u32| MaglevBackend::new(id, IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)), 1);
    let three = maglev::build(&[backend(1), backend(2), backend(3)], 65_537, 7);
    let two = maglev::build(&[backend(1), backend(3)], 65_537, 7);
    let other = maglev::build(&[backend(4), backend(5)], 65_537, 7);

    let started = Instant::now();
    for id in 0..16 {
        dataplane.install_table(id, &three).unwrap();
    }
    let single = started.elapsed() / 16;
    let all_three: Vec<(u32, &maglev::MaglevTable)> = (0..256).map(|id| (id, &three)).collect();
    dataplane.install_tables(&all_three).unwrap();
    let batch: Vec<(u32, &maglev::MaglevTable)> = (0..256)
        .map(|id| (id, if id % 2 == 0 { &two } else { &other }))
        .collect();
    // The last Vip of the batch, watched from another thread: when do packets see its new
    // table, against when the syscall returns (after the kernel's RCU grace period)?
    let hash = (0..u32::MAX)
        .step_by(7919)
        .find(|h| {
            let slot = lb_common::hash::table_slot(*h, 65_537) as usize;
            three.slots()[slot] != other.slots()[slot]
        })
        .expect("a slot where the tables differ");
    let watched = other.slots()[lb_common::hash::table_slot(hash, 65_537) as usize];
    let watcher = {
        let pin = pin.clone();
        std::thread::spawn(move || {
            let pinned = Pinned::open(&pin);
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some((_, _, backend))) = pinned.table_slot(255, hash)
                    && backend == watched
                {
                    return Some(Instant::now());
                }
            }
            None
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let started = Instant::now();
    dataplane.install_tables(&batch).unwrap();
    let batched = started.elapsed();
    let live = watcher.join().unwrap().expect("vip 255 got its new table") - started;
    eprintln!(
        "one swap: {single:?}; 256 swaps in one batch: syscall returned after {batched:?}, the last vip's table live after {live:?}"
    );
    assert!(live <= batched, "live before the syscall returns");

    let pinned = Pinned::open(pin);
    for id in [0u32, 1, 2, 128, 255] {
        let expected = if id % 2 == 0 { &two } else { &other };
        for hash in [0u32, 0x1234_5678, 0xdead_beef, u32::MAX] {
            let (size, slot, backend) = pinned.table_slot(id, hash).unwrap().expect("installed");
            assert_eq!(size, 65_537);
            assert_eq!(
                backend,
                expected.slots()[slot as usize],
                "vip {id} hash {hash:#x}"
            );
        }
    }
    drop(pinned);
    drop(dataplane);
}
