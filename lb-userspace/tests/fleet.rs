//! A real fleet in network namespaces: a router running BIRD with the kernel's ECMP
//! (L4 hash), three load balancers each running the real mlb daemon and BIRD, three
//! backends running real TCP servers (`lb_userspace::fleet`).

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use lb_userspace::fleet::{Fleet, HOLD_TIME};

/// Fleets are heavy (seven namespaces, four BIRDs, three daemons): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Three load balancers in front of backends 1-3, all announcing.
fn fleet() -> Fleet {
    let mut fleet = Fleet::new(env!("CARGO_BIN_EXE_mlb").as_ref(), 3, 4).expect("fleet");
    let pools = fleet.pool_yaml(&[1, 2, 3]);
    for i in 0..3 {
        fleet.write_config(i, &pools).unwrap();
        fleet.start_daemon(i).unwrap_or_else(|e| panic!("{e}"));
    }
    if fleet
        .wait_for_next_hops(&[0, 1, 2], Duration::from_secs(20))
        .is_none()
    {
        panic!(
            "the router did not learn the vip from all three: {:?}\n{}\n{}\n{}\n{}\nlb1 table: {}\n{}",
            fleet.router_next_hops(),
            fleet.router_birdc_route(),
            fleet.birdc(None, &["show", "protocols", "all"]),
            fleet.birdc(Some(0), &["show", "protocols"]),
            fleet.birdc(Some(0), &["show", "route", "all"]),
            fleet.announced_routes(0),
            fleet.log_text(0)
        );
    }
    fleet
}

#[test]
fn the_router_learns_the_vip_from_every_load_balancer() {
    let _serial = serial();
    let fleet = fleet();
    let birdc = fleet.router_birdc_route();
    for lb in &fleet.lbs {
        assert!(
            birdc.contains(&format!("via {}", lb.host.addr4)),
            "birdc names {}: {birdc}",
            lb.host.addr4
        );
    }
    for i in 0..3 {
        let routes = fleet.announced_routes(i);
        assert!(
            routes.contains("10.200.0.1 dev lo proto 250"),
            "lb{}: {routes}",
            i + 1
        );
        let status = fleet.status(i).unwrap();
        assert!(
            status.contains("announce 10.200.0.1 (table 200): announced"),
            "{status}"
        );
    }
    let _ = HOLD_TIME;
}
