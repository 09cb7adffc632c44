//! The operator test, in namespaces: 60 long-lived connections (a request every
//! 100 ms each) through the real daemon, L2 DSR, a 4096-entry connection table; a flood of
//! ~60× the table in SYNs from random sources (raw frames, as `hping3 -S --rand-source
//! --flood` sends them); then a backend is added by reload, which moves the table.
//! Before the connection table of our own, 3–8 of the 60 broke. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_testbed::daemon::{DaemonBed, VIP, connect};

const CONNECTIONS: usize = 60;
const ENTRIES: usize = 4096;
/// SYNs of the flood: ~60× the table.
const FLOOD: usize = 250_000;

/// What the daemon knows of the connections that broke: `mlb trace` of each (its
/// connection-table way and table slot), `mlb status` and the daemon's log, for a failure
/// message.
fn report(bed: &DaemonBed, conns: &[(TcpStream, String)], broken: &[String]) -> String {
    let mut text = format!("{broken:?}\n");
    for line in broken {
        let Some(i) = line.split(' ').next().and_then(|i| i.parse::<usize>().ok()) else {
            continue;
        };
        let Ok(local) = conns[i].0.local_addr() else {
            continue;
        };
        let (src, sport) = (local.ip().to_string(), local.port().to_string());
        let args = [
            "trace", "--src", &src, "--sport", &sport, "--dst", VIP, "--dport", "80",
        ];
        let out = bed.mlb(&args);
        text += &format!(
            "mlb trace of {i} ({local}):\n{}{}\n",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text += &String::from_utf8_lossy(&bed.mlb(&["status"]).stdout);
    text + "\ndaemon log:\n" + &bed.log_text()
}

/// One request on every connection: `Err` for each that broke or moved.
fn requests(conns: &mut [(TcpStream, String)], tag: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (i, (stream, name)) in conns.iter_mut().enumerate() {
        let reply = writeln!(stream, "{tag}-{i}").and_then(|_| {
            let mut line = String::new();
            BufReader::new(&*stream).read_line(&mut line)?;
            Ok(line)
        });
        match reply {
            Ok(line) if line.split(' ').next() == Some(name.as_str()) => {}
            Ok(line) => broken.push(format!("{i} ({name}) answered {line:?}")),
            Err(e) => broken.push(format!("{i} ({name}): {e}")),
        }
    }
    broken
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// SYNs to the Vip from random sources, sent as raw frames on the client's NIC to the load
/// balancer's MAC; stops after `count` frames or when `stop` is set. Returns frames sent.
fn flood(lb_mac: [u8; 6], count: usize, stop: &AtomicBool) -> usize {
    const ETH_P_ALL: u16 = 0x0003;
    // SAFETY: plain socket calls on a socket this function owns.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(fd)
    };
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    assert_ne!(ifindex, 0, "eth0 in the client namespace");
    // SAFETY: a zeroed sockaddr_ll with its fields set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&lb_mac);
    let vip: Ipv4Addr = VIP.parse().unwrap();
    let mut frame = [0u8; 54];
    frame[0..6].copy_from_slice(&lb_mac);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x0f, 0x01]);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&40u16.to_be_bytes());
    frame[22] = 64;
    frame[23] = 6;
    frame[30..34].copy_from_slice(&vip.octets());
    frame[36..38].copy_from_slice(&80u16.to_be_bytes());
    frame[46] = 5 << 4;
    frame[47] = 0x02; // SYN
    frame[48..50].copy_from_slice(&64240u16.to_be_bytes());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut sent = 0;
    while sent < count && !stop.load(Ordering::Relaxed) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let src = [
            10,
            60 + (state >> 56) as u8 % 4,
            (state >> 48) as u8,
            (state >> 40) as u8,
        ];
        frame[26..30].copy_from_slice(&src);
        frame[34..36].copy_from_slice(&((state >> 16) as u16 | 1024).to_be_bytes());
        frame[24..26].fill(0);
        let c = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        // SAFETY: a valid buffer and address of their lengths.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n == frame.len() as isize {
            sent += 1;
        }
    }
    sent
}

#[test]
fn syn_flood_then_reload_breaks_no_connection() {
    let mut bed = DaemonBed::new(3);
    let vips = "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    \
                pool: web\n    forwarding: l2_dsr\n";
    let config = |bed: &DaemonBed, members: &[(usize, u32)]| {
        bed.config_yaml(vips, &bed.pool_yaml("web", members, ""))
            .replace(
                "conntrack_entries: 65536",
                &format!("conntrack_entries: {ENTRIES}"),
            )
    };
    bed.write_config(&config(&bed, &[(1, 1), (2, 1)]));
    bed.start_daemon();
    let lb_mac = bed.bed.lb.netns.mac("eth0").unwrap();
    let vip = bed.vip(80);
    let client = &bed.bed.client.netns;
    let mut conns: Vec<(TcpStream, String)> = client
        .enter(|| (0..CONNECTIONS).map(|_| connect(vip)).collect())
        .unwrap();
    assert!(requests(&mut conns, "before").is_empty());

    // The flood, while every connection sends a request every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let (sent, broken_during) = std::thread::scope(|s| {
        let flooder = {
            let stop = stop.clone();
            s.spawn(move || client.enter(|| flood(lb_mac, FLOOD, &stop)).unwrap())
        };
        let mut broken = Vec::new();
        while !flooder.is_finished() && started.elapsed() < Duration::from_secs(10) {
            broken.extend(client.enter(|| requests(&mut conns, "flood")).unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        (flooder.join().unwrap(), broken)
    });
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        sent >= 10 * ENTRIES,
        "the flood sent only {sent} SYNs in {seconds:.1} s"
    );
    assert!(
        broken_during.is_empty(),
        "during the flood: {}",
        report(&bed, &conns, &broken_during)
    );
    let status = String::from_utf8_lossy(&bed.mlb(&["status"]).stdout).into_owned();
    let failed: u64 = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("conntrack_insert_fail="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        failed > 0,
        "{sent} SYNs should have filled a {ENTRIES}-entry table: {status}"
    );

    eprintln!(
        "flood: {sent} SYNs in {seconds:.1} s ({:.0}× the table), {failed} found no room",
        sent as f64 / ENTRIES as f64
    );

    // A third backend by reload: the table moves; the connections must not.
    bed.write_config(&config(&bed, &[(1, 1), (2, 1), (3, 1)]));
    bed.wait_for("the reload", Duration::from_secs(5), || {
        bed.log_text().matches("reloaded:").count() >= 1
    });
    let broken = client.enter(|| requests(&mut conns, "after")).unwrap();
    assert!(
        broken.is_empty(),
        "{} of {CONNECTIONS} connections broke after a flood of {sent} SYNs ({seconds:.1} s) \
         and a reload: {}",
        broken.len(),
        report(&bed, &conns, &broken)
    );
    // And the reload took: new connections reach the new backend once its checks pass.
    bed.wait_for("new flows on be3", Duration::from_secs(10), || {
        client
            .enter(|| (0..30).any(|_| connect(vip).1 == "be3"))
            .unwrap()
    });
    let broken = client.enter(|| requests(&mut conns, "later")).unwrap();
    assert!(
        broken.is_empty(),
        "after be3 came up: {}",
        report(&bed, &conns, &broken)
    );
}
