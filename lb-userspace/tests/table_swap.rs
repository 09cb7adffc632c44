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

#[test]
fn a_batch_swaps_every_vips_table_and_each_sees_its_own() {
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/mlb-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let mut dataplane = Dataplane::load_pinned(
        Capacities {
            max_vips: 256,
            max_backends: 16,
            conntrack_entries: 1024,
            ..Default::default()
        },
        &pin,
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
    let batch: Vec<(u32, &maglev::MaglevTable)> = (0..256)
        .map(|id| (id, if id % 2 == 0 { &two } else { &other }))
        .collect();
    let started = Instant::now();
    dataplane.install_tables(&batch).unwrap();
    let batched = started.elapsed();
    eprintln!("one swap: {single:?}; 256 swaps in one batch: {batched:?}");

    let pinned = Pinned::open(&pin);
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
    let _ = std::fs::remove_dir_all(&pin);
}
