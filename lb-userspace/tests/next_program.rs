//! `interfaces[].next_program` on the real daemon: a counting XDP program chained after
//! `lb_ingress` sees the packets not for a Vip (ping and TCP to the load balancer's own
//! address) and none of a Vip's; a reload to a missing or non-XDP pin is refused and the
//! chain stays, also while the daemon is dead and after its restart; a reload without the
//! option ends it. And the data plane's rare events
//! (aya-log) reach the daemon's log. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_testbed::{
    daemon::{DaemonBed, connect},
    next::CountNext,
    packets::XDP_PASS,
    status_counter,
};

const VIPS: &str =
    "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";
const NOT_FOR_A_VIP: [&str; 4] = [
    "pass_not_ip",
    "pass_not_vip",
    "pass_malformed",
    "pass_vip_other",
];

fn config(bed: &DaemonBed, next_program: Option<&Path>) -> String {
    let yaml = bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1)], ""));
    match next_program {
        Some(path) => yaml.replace(
            "    xdp_mode: native\n",
            &format!(
                "    xdp_mode: native\n    next_program: {}\n",
                path.display()
            ),
        ),
        None => yaml,
    }
}

/// Reloads `yaml` by SIGHUP (the file watcher may be first); waits for `marker` in the log.
fn reload(bed: &DaemonBed, yaml: &str, marker: &str) {
    let seen = bed.log_text().matches(marker).count();
    bed.write_config(yaml);
    bed.signal("-HUP");
    bed.wait_for(marker, Duration::from_secs(10), || {
        bed.log_text().matches(marker).count() > seen
    });
}

/// The data plane's packets not for a Vip, from `mlb status`.
fn not_for_a_vip(bed: &DaemonBed) -> u64 {
    let status = bed.status_text();
    NOT_FOR_A_VIP
        .iter()
        .map(|c| status_counter(&status, c))
        .sum()
}

fn ping(bed: &DaemonBed, count: u32) {
    let lb = bed.bed.lb.addr4.to_string();
    let count = count.to_string();
    let args = ["-q", "-c", &count, "-i", "0.02", "-W", "1", &lb];
    let out = bed
        .bed
        .client
        .netns
        .command("ping")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ping {lb}: {out:?}");
}

/// One TCP exchange with a listener in the load balancer's own namespace (not a Vip).
fn tcp_to_lb(bed: &DaemonBed, listener: &TcpListener) {
    let addr = listener.local_addr().unwrap();
    let server = std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&buf).unwrap();
        });
        bed.bed
            .client
            .netns
            .enter(|| {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                stream.write_all(b"hello")?;
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf)?;
                std::io::Result::Ok(buf)
            })
            .unwrap()
            .unwrap();
        server.join()
    });
    server.unwrap();
}

#[test]
fn a_next_program_counts_the_traffic_not_for_a_vip_until_a_reload_removes_it() {
    let mut bed = DaemonBed::new(2);
    let pin = Path::new("/sys/fs/bpf").join(format!(
        "{}-count-next",
        bed.pin_dir.file_name().unwrap().to_str().unwrap()
    ));
    let mut next = CountNext::load(XDP_PASS);
    next.pin(&pin);
    bed.write_config(&config(&bed, Some(&pin)));
    bed.start_daemon();
    let lb_addr = SocketAddr::new(bed.bed.lb.addr4, 0);
    let listener = bed
        .bed
        .lb
        .netns
        .enter(|| TcpListener::bind(lb_addr))
        .unwrap()
        .unwrap();

    // Not for a Vip: chained, and what the next program returns (XDP_PASS) holds.
    let before = next.count();
    ping(&bed, 20);
    assert!(
        next.count() >= before + 20,
        "{} after 20 pings",
        next.count() - before
    );
    let before = next.count();
    tcp_to_lb(&bed, &listener);
    assert!(
        next.count() >= before + 3,
        "{} after a TCP exchange",
        next.count() - before
    );

    // A Vip's traffic is not chained: every packet it counted, the load balancer counted
    // as not for a Vip (polled: a stray IPv6 or ARP packet may fall between the reads).
    let before = (next.count(), status_counter(&bed.status_text(), "tx"));
    let names: Vec<String> = bed
        .bed
        .client
        .netns
        .enter(|| (0..30).map(|_| connect(bed.vip(80)).1).collect())
        .unwrap();
    assert_eq!(names.len(), 30);
    let forwarded = status_counter(&bed.status_text(), "tx") - before.1;
    assert!(forwarded >= 90, "{forwarded} Vip packets forwarded");
    bed.wait_for(
        "count_next == packets not for a Vip",
        Duration::from_secs(5),
        || next.count() == not_for_a_vip(&bed),
    );
    assert!(
        next.count() - before.0 < 10,
        "Vip packets reached the next program"
    );

    // A missing pin, then a map's pin: refused, and the chain in force stays.
    let missing = bed.dir.join("no-such-program");
    let map = bed.pin_dir.join("CONFIG");
    reload(
        &bed,
        &config(&bed, Some(&missing)),
        "nothing is pinned there",
    );
    reload(
        &bed,
        &config(&bed, Some(&map)),
        "a pinned BPF map or link, not a program",
    );
    assert!(bed.log_text().contains("config refused"));
    let before = next.count();
    ping(&bed, 10);
    assert!(next.count() >= before + 10);

    // The chain is pinned: it runs while the daemon is dead, and a new one keeps it.
    bed.stop_daemon("-KILL");
    let before = next.count();
    ping(&bed, 10);
    assert!(
        next.count() >= before + 10,
        "daemon dead: {}",
        next.count() - before
    );
    // (The file still holds the refused config, which a start refuses too.)
    bed.write_config(&config(&bed, Some(&pin)));
    bed.start_daemon();
    let before = next.count();
    ping(&bed, 10);
    assert!(
        next.count() >= before + 10,
        "restarted: {}",
        next.count() - before
    );

    // One interface, so its program sits in lb_ingress's own slot: nothing per interface.
    let slots = MapData::from_pin(bed.pin_dir.join("NEXT_SLOTS")).unwrap();
    let mut slots: HashMap<_, u32, u32> = HashMap::try_from(Map::HashMap(slots)).unwrap();
    assert_eq!(slots.keys().count(), 0);

    // A second interface (a veth pair of its own) without one: `lb_next` chooses per interface.
    let lb = &bed.bed.lb.netns;
    lb.ip(&["link", "add", "nx0", "type", "veth", "peer", "name", "nx1"])
        .unwrap();
    lb.ip(&["link", "set", "nx0", "up"]).unwrap();
    let two = config(&bed, Some(&pin))
        .replace("vips:\n", "  - name: nx0\n    xdp_mode: generic\nvips:\n");
    reload(&bed, &two, "reloaded");
    let ifindex = bed.bed.lb.netns.ifindex("eth0").unwrap();
    assert_eq!(slots.get(&ifindex, 0).unwrap(), 1);
    let before = next.count();
    ping(&bed, 10);
    assert!(
        next.count() >= before + 10,
        "per interface: {}",
        next.count() - before
    );

    // A rare event reaches the daemon's log (aya-log): the interface made to name an
    // empty slot behind the daemon's back, as only a bug of its own could.
    slots.insert(ifindex, 5, 0).unwrap();
    ping(&bed, 3);
    bed.wait_for(
        "the data plane's error in the log",
        Duration::from_secs(5),
        || {
            bed.log_text().contains(&format!(
                "interface {ifindex} names empty next program slot 5"
            ))
        },
    );

    // Removed by a reload: the kernel gets those packets again, the program none.
    reload(&bed, &config(&bed, None), "reloaded");
    let before = (next.count(), not_for_a_vip(&bed));
    ping(&bed, 20);
    tcp_to_lb(&bed, &listener);
    assert_eq!(next.count(), before.0);
    assert!(not_for_a_vip(&bed) >= before.1 + 23);
}
