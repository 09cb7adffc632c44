//! The YAML config: shipped configs are valid, broken ones are refused with every problem
//! as `file:line:column: message`, defaults are filled in, and no input makes it panic.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::consts::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS};
use lb_userspace::config::{
    CheckKind, Config, Forwarding, Global, HealthCheck, Protocol, WhenNoBackend, XdpModeConfig,
    describe,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

fn repo_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn broken_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

fn parse_ok(text: &str) -> Config {
    Config::parse(text, "test.yaml").unwrap_or_else(|e| panic!("config refused:\n{e}"))
}

fn parse_err(text: &str) -> Vec<String> {
    match Config::parse(text, "test.yaml") {
        Ok(config) => panic!("config accepted: {config:#?}"),
        Err(e) => e.lines(),
    }
}

/// Each broken file and the exact lines it must produce.
const BROKEN: &[(&str, &[&str])] = &[
    (
        "announce_main_table.yaml",
        &[
            "announce_main_table.yaml:4:10: invalid table \"254\" in announce: table 254 is the kernel's main table: choose another (e.g. 200)",
        ],
    ),
    (
        "backend_name_conflict.yaml",
        &[
            "backend_name_conflict.yaml:20:15: pool \"api\" has backend 10.100.0.11 named \"be9\" here but \"be1\" in pool \"web\" (line 16)",
        ],
    ),
    (
        "control_group_unknown.yaml",
        &[
            "control_group_unknown.yaml:2:18: invalid control_group \"no-such-group-here\" in global: no such group on this host",
        ],
    ),
    (
        "duplicate_backend_in_pool.yaml",
        &[
            "duplicate_backend_in_pool.yaml:13:18: duplicate backend 10.100.0.11 in pool \"web\" (first defined at line 11)",
        ],
    ),
    (
        "duplicate_key.yaml",
        &[
            "duplicate_key.yaml:4:5: duplicate key \"xdp_mode\" in interface (first defined at line 3)",
        ],
    ),
    (
        "duplicate_vip.yaml",
        &["duplicate_vip.yaml:9:5: duplicate vip 10.200.0.1:80/tcp (first defined at line 4)"],
    ),
    (
        "duplicate_vip_name.yaml",
        &["duplicate_vip_name.yaml:9:11: duplicate vip name \"web\" (first defined at line 4)"],
    ),
    (
        "encap_prefix_host_bits.yaml",
        &[
            "encap_prefix_host_bits.yaml:2:20: invalid encap_source_v4 \"172.16.0.1/16\" in global: host bits are set; did you mean 172.16.0.0/16?",
        ],
    ),
    (
        "family_mismatch.yaml",
        &[
            "family_mismatch.yaml:5:14: vip \"web\" is IPv6 but pool \"web6\" has IPv4 backend 10.100.0.11 (line 12): IPIP and GUE cannot carry IPv6 in IPv4; use IPv6 backends, or forwarding l2_dsr",
        ],
    ),
    (
        "gue_options.yaml",
        &[
            "gue_options.yaml:2:13: invalid gue_port \"0\" in global: expected an integer from 1 to 65535",
            "gue_options.yaml:6:14: vip \"[fd00:200::1]:80/tcp\" is IPv6 but pool \"web\" has IPv4 backend 10.100.0.11 (line 19): IPIP and GUE cannot carry IPv6 in IPv4; use IPv6 backends, or forwarding l2_dsr",
            "gue_options.yaml:14:17: invalid forwarding \"geu\" in vip: expected ipip, l2_dsr or gue; did you mean \"gue\"?",
        ],
    ),
    (
        "hash_modes.yaml",
        &[
            "hash_modes.yaml:8:11: vip \"10.200.0.1:80/tcp\" has port 80: hash dport would send every flow to one backend; it is for any-port vips (port 0)",
            "hash_modes.yaml:13:11: invalid hash \"dports\" in vip: expected 5-tuple, source or dport; did you mean \"dport\"?",
        ],
    ),
    (
        "http_section_with_tcp_check.yaml",
        &[
            "http_section_with_tcp_check.yaml:11:7: http section in health_check is only valid with kind http (kind is tcp)",
        ],
    ),
    (
        "icmp_options.yaml",
        &[
            "icmp_options.yaml:2:14: invalid icmp_rate \"0\" in global: expected an integer from 1 to 1000000",
            "icmp_options.yaml:3:14: invalid icmp_echo \"on\" in global: expected true or false",
            "icmp_options.yaml:11:16: invalid icmp_echo \"ture\" in vip: expected true or false; did you mean \"true\"?",
        ],
    ),
    (
        "max_backends_too_small.yaml",
        &[
            "max_backends_too_small.yaml:2:17: 2 pool members need max_backends of at least 3 (id 0 is reserved), but it is 2",
        ],
    ),
    (
        "max_vips_too_small.yaml",
        &["max_vips_too_small.yaml:2:13: 2 vips do not fit in max_vips 1"],
    ),
    (
        "missing_port.yaml",
        &["missing_port.yaml:4:5: missing key \"port\" in vip"],
    ),
    (
        "next_program_relative.yaml",
        &[
            "next_program_relative.yaml:3:19: invalid next_program \"firewall\" in interface: must be an absolute path",
        ],
    ),
    (
        "no_interfaces.yaml",
        &["no_interfaces.yaml:1:1: interfaces must list at least one interface"],
    ),
    (
        "port_out_of_range.yaml",
        &[
            "port_out_of_range.yaml:5:11: invalid port \"70000\" in vip: expected an integer from 0 to 65535",
        ],
    ),
    (
        "second_chance_too_long.yaml",
        &[
            "second_chance_too_long.yaml:2:18: invalid second_chance \"2d\" in global: must be at most 1day (0 turns it off)",
        ],
    ),
    (
        "several_problems.yaml",
        &[
            "several_problems.yaml:2:14: invalid hash_seed \"0x1_0000_0000\" in global: expected an integer from 0 to 0xffffffff",
            "several_problems.yaml:3:19: invalid metrics_listen \"localhost\" in global: expected an address and port, such as 127.0.0.1:61100 or [::1]:61100",
            "several_problems.yaml:6:15: invalid xdp_mode \"nativ\" in interface: expected native, generic or auto; did you mean \"native\"?",
            "several_problems.yaml:9:14: vip \"web\" is IPv6 but pool \"web6\" has IPv4 backend 10.100.0.11 (line 21): IPIP and GUE cannot carry IPv6 in IPv4; use IPv6 backends, or forwarding l2_dsr",
            "several_problems.yaml:14:14: invalid address \"10.200.0.300\" in vip: expected an IPv4 or IPv6 address",
            "several_problems.yaml:17:11: vip \"dns\" uses unknown pool \"missing\"; pools are \"web6\"",
            "several_problems.yaml:22:17: invalid weight \"-1\" in backend: expected an integer from 0 to 4294967295",
            "several_problems.yaml:24:7: missing key \"port\" in health_check (needed for kind http)",
            "several_problems.yaml:25:17: invalid interval \"5ms\" in health_check: must be at least 10ms",
            "several_problems.yaml:26:15: invalid jitter \"60%\" in health_check: expected a percentage from 0% to 50%, such as 10%",
            "several_problems.yaml:28:24: invalid expect_status \"399-200\" in health_check.http: the range is empty: 399 is above 200",
            "several_problems.yaml:29:7: udp section in health_check is only valid with kind udp (kind is http)",
        ],
    ),
    (
        "syntax_error.yaml",
        &["syntax_error.yaml:6:13: invalid YAML: illegal placement of ':' indicator"],
    ),
    (
        "table_size_not_prime.yaml",
        &[
            "table_size_not_prime.yaml:7:17: table size 65536 is not prime; nearest primes are 65521 and 65537",
        ],
    ),
    (
        "timeout_not_below_interval.yaml",
        &[
            "timeout_not_below_interval.yaml:15:17: interval 200ms in health_check must be longer than timeout 500ms (the default); set a shorter timeout",
        ],
    ),
    (
        "unknown_key_no_suggestion.yaml",
        &[
            "unknown_key_no_suggestion.yaml:7:5: unknown key \"colour\" in vip; valid keys are name, address, port, protocol, forwarding, table_size, pool, when_no_backend, icmp_echo, hash, fragments",
        ],
    ),
    (
        "unknown_key_typo.yaml",
        &[
            "unknown_key_typo.yaml:12:9: unknown key \"adress\" in backend, did you mean \"address\"?",
        ],
    ),
    (
        "unknown_pool.yaml",
        &["unknown_pool.yaml:8:11: vip \"web\" uses unknown pool \"wbe\", did you mean \"web\"?"],
    ),
    (
        "vips_not_a_list.yaml",
        &[
            "vips_not_a_list.yaml:4:3: invalid vips at the top level: expected a sequence, found a mapping",
        ],
    ),
];

#[test]
fn every_shipped_config_is_valid() {
    let files = yaml_files(&repo_config_dir());
    for required in ["lb.example.yaml", "lb.minimal.yaml", "demo.yaml"] {
        assert!(
            files.iter().any(|f| f.ends_with(required)),
            "config/{required} is missing"
        );
    }
    for file in files {
        if let Err(e) = Config::load(&file) {
            panic!("{} is refused:\n{e}", file.display());
        }
    }
}

#[test]
fn every_broken_file_reports_exactly_its_problems() {
    let files = yaml_files(&broken_dir());
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let listed: Vec<&str> = BROKEN.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names, listed,
        "every file in tests/data/config needs its expected messages in BROKEN (sorted by name)"
    );
    let mut failures = Vec::new();
    for (name, expected) in BROKEN {
        let text = fs::read_to_string(broken_dir().join(name)).expect("readable test file");
        match Config::parse(&text, name) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if e.lines() != *expected => {
                failures.push(format!(
                    "{name}: got\n{e}\nexpected\n{}",
                    expected.join("\n")
                ));
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_counts_backends_as_the_reconciler_does() {
    // One address in two pools is two Backends (health and drains are per pool): check
    // refuses what the daemon could not apply, instead of retrying it forever.
    let yaml = "global:\n  max_backends: 2\ninterfaces:\n  - name: eth0\nvips: []\npools:\n  \
                a:\n    backends:\n      - address: 10.0.0.1\n  b:\n    backends:\n      \
                - address: 10.0.0.1\n";
    let problems = parse_err(yaml);
    assert_eq!(
        problems,
        [
            "test.yaml:2:17: 2 pool members need max_backends of at least 3 (id 0 is reserved), but it is 2"
        ]
    );
    let config = parse_ok(&yaml.replace("max_backends: 2", "max_backends: 3"));
    let mut reconciler = lb_userspace::reconcile::Reconciler::new(
        lb_userspace::reconcile::DryRun,
        Default::default(),
    );
    reconciler
        .apply(&config)
        .expect("what check accepts, the reconciler applies");
}

#[test]
fn announce_takes_a_table_the_kernel_does_not_use_itself() {
    let base = "interfaces:\n  - name: eth0\nvips: []\n";
    let config = parse_ok(&format!("{base}announce:\n  table: 200\n"));
    assert_eq!(config.announce.map(|a| a.table), Some(200));
    assert_eq!(parse_ok(base).announce, None, "off by default");
    for (table, name) in [("253", "default"), ("255", "local"), ("0", "")] {
        let problems = parse_err(&format!("{base}announce:\n  table: {table}\n"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("test.yaml:5:10: invalid table \"")
                && problems[0].contains(name),
            "{problems:?}"
        );
    }
    let problems = parse_err(&format!("{base}announce:\n  tabel: 200\n"));
    assert!(
        problems
            .iter()
            .any(|p| p.contains("did you mean") || p.contains("table")),
        "{problems:?}"
    );
}

#[test]
fn problems_are_sorted_by_position_one_line_each() {
    let text = fs::read_to_string(broken_dir().join("several_problems.yaml")).expect("test file");
    let error = Config::parse(&text, "several_problems.yaml").expect_err("refused");
    let positions: Vec<_> = error.problems().iter().map(|p| p.pos).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
    assert_eq!(error.to_string().lines().count(), error.problems().len());
}

#[test]
fn load_names_the_path_in_errors() {
    let path = broken_dir().join("missing_port.yaml");
    let error = Config::load(&path).expect_err("refused");
    assert_eq!(
        error.to_string(),
        format!("{}:4:5: missing key \"port\" in vip", path.display())
    );

    let missing = broken_dir().join("no-such-file.yaml");
    let error = Config::load(&missing).expect_err("no file");
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display())),
        "{error}"
    );
}

#[test]
fn minimal_config_gets_every_default() {
    let config = Config::load(&repo_config_dir().join("lb.minimal.yaml")).expect("valid");
    assert_eq!(
        config.global,
        Global {
            hash_seed: 0,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            conntrack_idle: lb_common::consts::DEFAULT_CONNTRACK_IDLE,
            flow_cache_entries: lb_common::consts::DEFAULT_FLOW_CACHE_ENTRIES,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            metrics_listen: "127.0.0.1:61100".parse::<SocketAddr>().expect("address"),
            encap_source_v4: (Ipv4Addr::new(172, 16, 0, 0), 16),
            encap_source_v6: ("fd00:ffff::".parse::<Ipv6Addr>().expect("address"), 96),
            pin_path: PathBuf::from("/sys/fs/bpf/mlb"),
            second_chance: std::time::Duration::from_secs(300),
            control_group: None,
            icmp_echo: true,
            icmp_rate: 1000,
            gue_port: 6080,
        }
    );
    assert_eq!(config.interfaces.len(), 1);
    assert_eq!(config.interfaces[0].name, "eth0");
    assert_eq!(config.interfaces[0].xdp_mode, XdpModeConfig::Auto);

    let [vip] = config.vips.as_slice() else {
        panic!("one vip expected: {:?}", config.vips)
    };
    assert_eq!(vip.name, "10.200.0.1:80/tcp");
    assert_eq!(vip.forwarding, Forwarding::Ipip);
    assert_eq!(vip.when_no_backend, WhenNoBackend::Drop);
    assert!(vip.icmp_echo);
    assert_eq!((vip.table_size, vip.table_size_auto), (65_537, true));
    assert_eq!(vip.protocol.number(), 6);

    let pool = &config.pools["web"];
    assert_eq!(pool.health_check, HealthCheck::default());
    assert_eq!(pool.health_check.kind, CheckKind::None);
    for backend in &pool.backends {
        assert_eq!(backend.weight, 1);
        assert_eq!(backend.name, backend.address.to_string());
    }
}

#[test]
fn demo_config_matches_the_testbed() {
    let config = Config::load(&repo_config_dir().join("demo.yaml")).expect("valid");
    assert_eq!(config.global.hash_seed, 0x5eed);
    assert_eq!(config.interfaces[0].xdp_mode, XdpModeConfig::Native);
    let vip = &config.vips[0];
    assert_eq!(vip.endpoint(), "10.200.0.1:80/tcp");
    let pool = &config.pools[&vip.pool];
    let backends: Vec<(String, String)> = pool
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.address.to_string()))
        .collect();
    assert_eq!(
        backends,
        [
            ("be1".to_owned(), "10.100.0.11".to_owned()),
            ("be2".to_owned(), "10.100.0.12".to_owned()),
            ("be3".to_owned(), "10.100.0.13".to_owned()),
        ]
    );
    let check = &pool.health_check;
    assert_eq!(
        check.kind,
        CheckKind::Http {
            path: "/".to_owned(),
            host: None,
            status: 200..=399
        }
    );
    assert_eq!(check.port, 80);
    assert_eq!(check.interval, Duration::from_millis(200));
    assert_eq!(check.timeout, Duration::from_millis(100));
    assert_eq!((check.rise, check.fall), (2, 2));
}

#[test]
fn example_config_sets_every_kind_of_check() {
    let config = Config::load(&repo_config_dir().join("lb.example.yaml")).expect("valid");
    let kinds: Vec<&str> = config
        .pools
        .values()
        .map(|p| p.health_check.kind.keyword())
        .collect();
    assert_eq!(kinds, ["udp", "http", "tcp"]);
    assert_eq!(
        config.pools["dns"].health_check.kind,
        CheckKind::Udp {
            send: b"ping".to_vec(),
            expect: Some(b"pong".to_vec())
        }
    );
    let web6 = config.vips.iter().find(|v| v.name == "web6").expect("web6");
    assert_eq!(web6.endpoint(), "[fd00:200::1]:443/tcp");
    assert_eq!(web6.when_no_backend, WhenNoBackend::Pass);
}

const ONE_VIP: &str = "\
interfaces:
  - name: eth0
vips:
  - address: 10.200.0.1
    port: 80
    protocol: tcp
    pool: web
";

#[test]
fn more_backends_than_table_slots_is_refused() {
    let mut text = format!(
        "{}    table_size: 251\npools:\n  web:\n    backends:\n",
        ONE_VIP
    );
    for i in 0..252 {
        text.push_str(&format!(
            "      - address: 10.100.{}.{}\n",
            i / 200,
            i % 200 + 1
        ));
    }
    assert_eq!(
        parse_err(&text),
        [
            "test.yaml:8:17: table size 251 is smaller than the number of backends (252); \
          use a prime of at least 100 slots per backend (auto size: 65537)"
        ]
    );
}

#[test]
fn auto_table_size_grows_with_the_pool() {
    let mut text = format!("{ONE_VIP}pools:\n  web:\n    backends:\n");
    for i in 0..700 {
        text.push_str(&format!(
            "      - address: 10.100.{}.{}\n",
            i / 200,
            i % 200 + 1
        ));
    }
    let config = parse_ok(&text);
    assert_eq!(config.vips[0].table_size, 131_071);
    assert!(config.vips[0].table_size_auto);
}

#[test]
fn gue_forwarding_and_its_port() {
    let text = format!(
        "global:\n  gue_port: 5555\n{}    forwarding: gue\npools:\n  web:\n    backends:\n      - address: fd00:100::11\n",
        ONE_VIP
    );
    let config = parse_ok(&text);
    assert_eq!(config.global.gue_port, 5555);
    assert_eq!(config.vips[0].forwarding, Forwarding::Gue);
    // An IPv4 Vip may have IPv6 backends in GUE (IPv4 in UDP over IPv6).
    assert_eq!(
        config.vips[0].flags() & lb_common::consts::vip_flags::GUE,
        lb_common::consts::vip_flags::GUE
    );
    assert!(describe(&config).contains("gue"), "{}", describe(&config));
}

#[test]
fn a_backend_named_in_one_pool_keeps_its_name_in_another() {
    let text = "\
interfaces: [{name: eth0}]
vips: []
pools:
  a:
    backends: [{address: 10.0.0.1, name: alpha}]
  b:
    backends: [{address: 10.0.0.1, weight: 3}]
";
    let config = parse_ok(text);
    assert_eq!(config.pools["b"].backends[0].name, "alpha");
    assert_eq!(config.pools["b"].backends[0].weight, 3);
    assert_eq!(config.backend_addresses(), [IpAddr::from([10, 0, 0, 1])]);
}

#[test]
fn one_name_for_two_addresses_is_refused() {
    let text = "\
interfaces: [{name: eth0}]
vips: []
pools:
  a:
    backends:
      - {address: 10.0.0.1, name: be1}
      - {address: 10.0.0.2, name: be1}
";
    assert_eq!(
        parse_err(text),
        [
            "test.yaml:7:35: backend name \"be1\" is used for 10.0.0.2 here and for 10.0.0.1 in pool \"a\" (line 6)"
        ]
    );
}

#[test]
fn check_sub_sections_and_ports_follow_the_kind() {
    let pool = |check: &str| {
        format!(
            "interfaces: [{{name: eth0}}]\nvips: []\npools:\n  p:\n    backends: []\n    health_check:\n{check}"
        )
    };
    assert_eq!(
        parse_err(&pool("      kind: udp\n      port: 53\n")),
        ["test.yaml:7:7: missing key \"udp\" in health_check (kind udp needs a payload to send)"]
    );
    assert_eq!(
        parse_err(&pool("      kind: tcp\n      port: 0\n")),
        ["test.yaml:8:13: invalid port \"0\" in health_check: expected an integer from 1 to 65535"]
    );
    assert_eq!(
        parse_err(&pool("      port: 80\n")),
        ["test.yaml:7:7: missing key \"kind\" in health_check"]
    );
    assert_eq!(
        parse_err(&pool(
            "      kind: tcp\n      port: 80\n      timeout: 2s\n      interval: 1s\n"
        )),
        ["test.yaml:9:16: timeout 2s in health_check must be shorter than interval 1s"]
    );
    // Kind none needs nothing else.
    let config = parse_ok(&pool("      kind: none\n"));
    assert_eq!(config.pools["p"].health_check.kind, CheckKind::None);
}

#[test]
fn keys_are_checked_in_every_section() {
    let text = "\
globl: {}
interfaces: [{name: eth0, mode: native}]
vips: []
pools:
  p:
    backend: []
";
    assert_eq!(
        parse_err(text),
        [
            "test.yaml:1:1: unknown key \"globl\" at the top level, did you mean \"global\"?",
            "test.yaml:2:27: unknown key \"mode\" in interface; valid keys are name, xdp_mode, next_program",
            "test.yaml:6:5: unknown key \"backend\" in pool \"p\", did you mean \"backends\"?",
        ]
    );
}

#[test]
fn an_empty_file_says_what_is_missing() {
    assert_eq!(
        parse_err("# nothing yet\n"),
        [
            "test.yaml:2:1: missing key \"interfaces\" at the top level",
            "test.yaml:2:1: missing key \"vips\" at the top level",
        ]
    );
    assert_eq!(
        parse_err("- eth0\n"),
        [
            "test.yaml:1:1: expected a mapping with the keys global, interfaces, announce, vips, pools, found a sequence"
        ]
    );
}

#[test]
fn equal_configs_compare_equal_and_changes_show() {
    let text = fs::read_to_string(repo_config_dir().join("lb.example.yaml")).expect("example");
    let a = parse_ok(&text);
    let b = parse_ok(&text);
    assert_eq!(a, b);
    let changed = parse_ok(&text.replacen("weight: 2", "weight: 5", 1));
    assert_ne!(a.pools["web"], changed.pools["web"]);
    assert_eq!(a.vips, changed.vips);
}

#[test]
fn describe_lists_vips_backends_and_unused_pools() {
    let text = format!(
        "{ONE_VIP}pools:\n  web:\n    backends:\n      - {{address: 10.100.0.11, name: be1, weight: 0}}\n  spare:\n    backends: []\n"
    );
    let summary = describe(&parse_ok(&text));
    for needle in [
        "10.200.0.1:80/tcp  ipip, table 65537 (auto), pool web",
        "be1  10.100.0.11  weight 0 (draining)",
        "spare: 0 backends; health check none (backends always up)  (unused: no vip refers to it)",
    ] {
        assert!(summary.contains(needle), "{needle:?} not in:\n{summary}");
    }
}

#[test]
fn vip_flags_follow_its_settings() {
    use lb_common::consts::vip_flags;
    let text = format!(
        "{}    forwarding: l2_dsr\n    when_no_backend: pass\npools:\n  web:\n    backends: []\n",
        ONE_VIP
            .replace("10.200.0.1", "fd00::1")
            .replace("tcp", "udp")
    );
    let vip = &parse_ok(&text).vips[0];
    assert_eq!(vip.protocol, Protocol::Udp);
    assert_eq!(
        vip.flags(),
        vip_flags::ACTIVE | vip_flags::IPV6 | vip_flags::L2_DSR | vip_flags::PASS_WHEN_EMPTY
    );
}

/// Every error line is `origin:line[:column]: message` on one line.
fn assert_well_formed(error: &lb_userspace::config::ConfigError, input: &str) {
    assert!(!error.problems().is_empty(), "no problems for {input:?}");
    for line in error.lines() {
        assert!(line.starts_with("fuzz.yaml:"), "{line:?} for {input:?}");
        assert!(!line.contains('\n'), "{line:?} for {input:?}");
    }
}

#[test]
fn garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    // Random bytes, biased towards what YAML gives meaning to.
    const ALPHABET: &[u8] = b" \n\t-:?,[]{}#&*!|>'\"%@`\\0123456789abcdefxyz.~/";
    for _ in 0..3000 {
        let len = rng.random_range(0..200);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.random_bool(0.9) {
                    ALPHABET[rng.random_range(0..ALPHABET.len())]
                } else {
                    rng.random()
                }
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Config::parse(&text, "fuzz.yaml") {
            assert_well_formed(&e, &text);
        }
    }
}

#[test]
fn mutated_configs_never_panic() {
    let mut rng = StdRng::seed_from_u64(42);
    let originals: Vec<String> = yaml_files(&repo_config_dir())
        .into_iter()
        .chain(yaml_files(&broken_dir()))
        .map(|f| fs::read_to_string(f).expect("readable"))
        .collect();
    const PIECES: &[&str] = &[
        "",
        " ",
        "\n",
        "-",
        ":",
        "- ",
        ": ",
        "0",
        "0x",
        "-1",
        "99999999999999999999",
        "~",
        "[",
        "]",
        "{",
        "}",
        "&a",
        "*a",
        "!!int",
        "auto",
        "tcp",
        "http",
        "1s",
        "0ms",
        "50%",
        "::",
        "10.0.0.1",
        "fd00::1",
        "/",
        "\t",
        "é",
        "'",
        "\"",
    ];
    for _ in 0..3000 {
        let mut text: Vec<char> = originals[rng.random_range(0..originals.len())]
            .chars()
            .collect();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..=text.len());
            let cut = rng.random_range(0..=(text.len() - at).min(8));
            let piece = PIECES[rng.random_range(0..PIECES.len())];
            text.splice(at..at + cut, piece.chars());
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = Config::parse(&text, "fuzz.yaml") {
            assert_well_formed(&e, &text);
        }
    }
}

#[test]
fn alias_bombs_and_deep_nesting_are_refused() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let lines = match Config::parse(&bomb, "bomb.yaml") {
        Ok(_) => panic!("alias bomb accepted"),
        Err(e) => e.lines(),
    };
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("invalid YAML"), "{lines:?}");

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(Config::parse(&deep, "deep.yaml").is_err());
    let deep_block: String = (0..2000)
        .map(|i| format!("{}k:\n", " ".repeat(i)))
        .collect();
    assert!(Config::parse(&deep_block, "deep.yaml").is_err());
}
