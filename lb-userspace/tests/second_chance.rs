//! Second chance with the real daemon, real backends and real TCP connections: a load
//! balancer that lost its maps after a table change breaks none of the connections that
//! started under the previous table; without second chance, the moved ones break. Spoofed
//! encapsulated packets never reach a backend's sockets. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, TcpStream, UdpSocket},
    time::Duration,
};

use lb_common::consts::DecapCounter;
use lb_testbed::daemon::{DaemonBed, connect};

const CONNECTIONS: usize = 60;
const VIPS: &str =
    "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";

/// Sends a line on each connection; the ones that did not come back from their backend.
fn broken(bed: &DaemonBed, conns: &mut [(TcpStream, String)], tag: &str) -> Vec<String> {
    bed.bed
        .client
        .netns
        .enter(|| {
            conns
                .iter_mut()
                .enumerate()
                .filter_map(|(i, (stream, name))| {
                    let reply = writeln!(stream, "{tag}-{i}").and_then(|()| {
                        let mut line = String::new();
                        BufReader::new(&*stream).read_line(&mut line)?;
                        Ok(line)
                    });
                    match reply {
                        Ok(line) if line.starts_with(&format!("{name} ")) => None,
                        Ok(line) => Some(format!("{name}: answered {line:?}")),
                        Err(e) => Some(format!("{name}: {e}")),
                    }
                })
                .collect()
        })
        .unwrap()
}

fn with_second_chance(yaml: String, setting: &str) -> String {
    yaml.replacen(
        "global:\n",
        &format!("global:\n  second_chance: {setting}\n"),
        1,
    )
}

/// Opens long-lived connections over backends 1-3, adds backend 4 (the table changes),
/// then detaches the daemon (every map lost) and starts it again: the number of
/// connections that break.
fn maps_lost_after_a_table_change(second_chance: &str) -> (usize, DaemonBed, Vec<(u16, String)>) {
    let ((broken, bed), backends) = maps_lost_after(
        second_chance,
        &[(1, 1), (2, 1), (3, 1)],
        &[(1, 1), (2, 1), (3, 1), (4, 1)],
    );
    (broken, bed, backends)
}

/// Opens long-lived connections over `before`, changes the pool to `after`, then
/// detaches the daemon (every map lost) and starts it again: the connections that broke,
/// and the backend of each connection.
fn maps_lost_after(
    second_chance: &str,
    before: &[(usize, u32)],
    after: &[(usize, u32)],
) -> ((usize, DaemonBed), Vec<(u16, String)>) {
    let mut bed = DaemonBed::new(4);
    let config = |bed: &DaemonBed, members: &[(usize, u32)]| {
        with_second_chance(
            bed.config_yaml(VIPS, &bed.pool_yaml("web", members, "")),
            second_chance,
        )
    };
    bed.write_config(&config(&bed, before));
    bed.start_daemon();
    let mut conns: Vec<(TcpStream, String)> = bed
        .bed
        .client
        .netns
        .enter(|| (0..CONNECTIONS).map(|_| connect(bed.vip(80))).collect())
        .unwrap();
    bed.write_config(&config(&bed, after));
    bed.signal("-HUP");
    for (i, _) in after {
        bed.wait_for_health(&format!("be{i}"), "web", "up", Duration::from_secs(20));
    }
    bed.wait_for("the new table", Duration::from_secs(20), || {
        bed.status_text().contains("second chance") || second_chance == "0"
    });
    assert_eq!(
        broken(&bed, &mut conns, "added"),
        Vec::<String>::new(),
        "the connection table keeps them"
    );

    bed.stop_daemon("-TERM");
    let detach = bed.mlb(&["detach"]);
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    bed.start_daemon();
    let broken = broken(&bed, &mut conns, "after");
    eprintln!(
        "second_chance {second_chance}: {} of {CONNECTIONS} broken: {broken:?}",
        broken.len()
    );
    let backends = conns
        .iter()
        .map(|(stream, name)| (stream.local_addr().unwrap().port(), name.clone()))
        .collect();
    ((broken.len(), bed), backends)
}

#[test]
fn a_load_balancer_that_lost_its_maps_breaks_no_connection_with_second_chance() {
    let (without, _, _) = maps_lost_after_a_table_change("0");
    assert!(
        without > 0,
        "without second chance the moved connections must break, or this test proves nothing"
    );
    let (with, bed, connections) = maps_lost_after_a_table_change("5m");
    assert_eq!(
        with, 0,
        "with second chance none breaks ({without} without)"
    );
    // `mlb trace` names the previous backend of the connections it chains, and only
    // theirs.
    let mut traced = 0;
    for (port, backend) in &connections {
        let port = port.to_string();
        let out = bed.mlb(&[
            "trace",
            "--src",
            "10.100.0.2",
            "--sport",
            &port,
            "--dst",
            "10.200.0.1",
            "--dport",
            "80",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("second chance: previous backend"))
        {
            assert!(
                line.contains(&format!("{backend} ")),
                "{port} on {backend}: {text}"
            );
            traced += 1;
        }
    }
    assert!(traced > 0, "no connection chained by trace's account");
    // They were chained: the load balancer attached the previous backend, the new
    // backend sent them on.
    let status = bed.status_text();
    assert!(status.contains("second chance: previous table"), "{status}");
    let counters = bed.decap_counters();
    assert!(
        counters[DecapCounter::ChainedForwarded as usize]
            + counters[DecapCounter::ChainedForwardedByKernel as usize]
            > 0,
        "{counters:?}"
    );
    assert!(status.contains("second_chance="), "{status}");
}

#[test]
fn a_removed_backend_keeps_its_connections_through_a_load_balancer_that_lost_its_maps() {
    let ((broken, bed), backends) = maps_lost_after(
        "5m",
        &[(1, 1), (2, 1), (3, 1), (4, 1)],
        &[(1, 1), (2, 1), (3, 1)],
    );
    let on_removed = backends.iter().filter(|(_, b)| b == "be4").count();
    assert!(on_removed > 0, "some connection was on be4: {backends:?}");
    assert_eq!(broken, 0, "{on_removed} connections on the removed be4");
    let status = bed.status_text();
    assert!(status.contains("RETIRED"), "{status}");
}

#[test]
fn second_chance_expires() {
    let mut bed = DaemonBed::new(3);
    let config = |bed: &DaemonBed, members: &[(usize, u32)]| {
        with_second_chance(
            bed.config_yaml(VIPS, &bed.pool_yaml("web", members, "")),
            "2s",
        )
    };
    bed.write_config(&config(&bed, &[(1, 1), (2, 1)]));
    bed.start_daemon();
    bed.write_config(&config(&bed, &[(1, 1), (2, 1), (3, 1)]));
    bed.signal("-HUP");
    bed.wait_for_health("be3", "web", "up", Duration::from_secs(20));
    assert!(bed.status_text().contains("second chance: previous table"));
    let saved = lb_userspace::second_chance::path(&bed.pin_dir);
    assert!(saved.exists(), "{}", saved.display());
    // Dropped on the daemon's 5 s timer once 2 s have passed: the data plane, the status
    // and the saved file.
    bed.wait_for(
        "the previous table to expire",
        Duration::from_secs(15),
        || !bed.status_text().contains("second chance: previous table"),
    );
    assert!(!saved.exists());
    let trace = bed.mlb(&[
        "trace",
        "--src",
        "10.100.0.2",
        "--sport",
        "40000",
        "--dst",
        "10.200.0.1",
        "--dport",
        "80",
    ]);
    let trace = String::from_utf8_lossy(&trace.stdout);
    assert!(!trace.contains("second chance"), "{trace}");
}

/// An IPIP packet from `outer_src` to `backend`, holding a UDP datagram from the client
/// (`client:sport`) to the Vip's port 53.
fn ipip_udp(outer_src: Ipv4Addr, backend: Ipv4Addr, client: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv4(client.octets(), [10, 200, 0, 1], 64)
        .udp(sport, 53)
        .write(&mut inner, b"who")
        .unwrap();
    let mut packet = Vec::new();
    let mut outer = etherparse::Ipv4Header::new(
        inner.len() as u16,
        64,
        etherparse::IpNumber::IPV4,
        outer_src.octets(),
        backend.octets(),
    )
    .unwrap();
    outer.header_checksum = outer.calc_header_checksum();
    outer.write(&mut packet).unwrap();
    packet.extend_from_slice(&inner);
    packet
}

/// Sends `packet` (a whole IPv4 packet, any source) from a raw socket.
fn send_raw(packet: &[u8], dst: Ipv4Addr) {
    // SAFETY: plain socket calls on a socket this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        libc::close(fd);
        assert_eq!(
            sent,
            packet.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn encapsulated_packets_from_outside_the_load_balancers_never_reach_a_socket() {
    let bed = DaemonBed::new(1);
    let IpAddr::V4(backend) = bed.bed.backends[0].addr4 else {
        panic!("v4")
    };
    let IpAddr::V4(client) = bed.bed.client.addr4 else {
        panic!("v4")
    };
    // The backend's UDP server on the Vip answers the client directly (DSR); a reply
    // means the datagram reached its socket.
    let answered = |outer_src: Ipv4Addr, sport: u16| -> bool {
        bed.bed
            .client
            .netns
            .enter(|| {
                let socket = UdpSocket::bind((client, sport)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                send_raw(&ipip_udp(outer_src, backend, client, sport), backend);
                let mut buf = [0; 64];
                socket.recv(&mut buf).is_ok()
            })
            .unwrap()
    };
    let drops = |bed: &DaemonBed| bed.decap_counters()[DecapCounter::DropSource as usize];
    // From a load balancer's prefix (172.16.0.0/16, the default encap_source_v4):
    // delivered, answered.
    assert!(
        answered(Ipv4Addr::new(172, 16, 3, 4), 41_000),
        "a load balancer's packet"
    );
    // From the client's own address: dropped and counted, never answered.
    let before = drops(&bed);
    assert!(
        !answered(client, 41_001),
        "a spoofed packet reached the server"
    );
    assert_eq!(drops(&bed), before + 1);
}

#[test]
fn mlb_backend_attaches_lb_decap_with_its_sources_and_detaches() {
    let netns = lb_testbed::netns::Netns::new("mlb-be").unwrap();
    netns
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])
        .unwrap();
    netns.ip(&["link", "set", "eth0", "up"]).unwrap();
    netns.ip(&["link", "set", "eth1", "up"]).unwrap();
    let pin = format!("/sys/fs/bpf/mlb-test-backend-{}", std::process::id());
    let mlb = |args: &[&str]| {
        let out = netns
            .command_net_only(env!("CARGO_BIN_EXE_mlb"))
            .arg("backend")
            .args(args)
            .args(["--pin-path", &pin])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let xdp_on = || {
        let out = netns
            .command_net_only("ip")
            .args(["link", "show", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    let (ok, text) = mlb(&["attach", "--interface", "eth0", "--lb-source", "172.16/16"]);
    assert!(
        !ok && text.contains("172.16"),
        "a bad prefix is refused: {text}"
    );
    let (ok, text) = mlb(&[
        "attach",
        "--interface",
        "eth0",
        "--lb-source",
        "172.16.0.0/16",
        "--xdp-mode",
        "native",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("accepting encapsulated packets from 172.16.0.0/16 (GUE on UDP port 6080)"),
        "{text}"
    );
    assert!(xdp_on());
    // Again, with another prefix: the program is swapped in place, the link stays.
    let (ok, text) = mlb(&[
        "attach",
        "--interface",
        "eth0",
        "--lb-source",
        "172.16.0.0/16",
        "--lb-source",
        "fd00:ffff::/96",
        "--gue-port",
        "0",
    ]);
    assert!(ok && text.contains("swapped in place"), "{text}");
    assert!(text.contains("(no GUE)"), "{text}");
    let (ok, text) = mlb(&["status", "--prometheus"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("mlb_decap_packets_total{result=\"drop_source\"} 0"),
        "{text}"
    );
    let (ok, text) = mlb(&["detach", "--interface", "eth0"]);
    assert!(ok, "{text}");
    assert!(!xdp_on(), "still attached after detach");
    assert!(!std::path::Path::new(&pin).exists());
}
