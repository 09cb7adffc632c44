//! Fuzz targets (proptest) for the YAML loader and validator: arbitrary bytes, documents
//! built from the config's own keys with arbitrary values, and splices into the shipped
//! and broken configs. No input panics or takes long, and every refusal names
//! `file:line:column`. Cases: `MLB_FUZZ_CASES` (default 2000 per target; `cargo xtask fuzz
//! config --cases N`). Inputs that once failed live in `tests/data/fuzz/config/` and are
//! replayed first; proptest also keeps its shrunk seeds in `tests/config_fuzz.regressions`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_userspace::config::Config;
use proptest::{prelude::*, test_runner::FileFailurePersistence};

/// Far above what any config here takes to parse (well under a millisecond).
const SLOW: Duration = Duration::from_millis(500);

fn cases() -> u32 {
    std::env::var("MLB_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        ..ProptestConfig::default()
    }
}

/// Parses `bytes` as the daemon would read them from a file: refusals are well formed,
/// nothing is slow.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let result = Config::from_bytes(bytes, Path::new("fuzz.yaml"));
    let took = started.elapsed();
    prop_assert!(took < SLOW, "took {took:?}");
    if let Err(e) = result {
        prop_assert!(!e.problems().is_empty(), "a refusal without a problem");
        for line in e.lines() {
            let rest = line.strip_prefix("fuzz.yaml:");
            let pos: Vec<&str> = rest.map(|r| r.splitn(3, ':').collect()).unwrap_or_default();
            prop_assert!(
                pos.len() == 3
                    && pos[0].parse::<u32>().is_ok()
                    && pos[1].parse::<u32>().is_ok()
                    && pos[2].starts_with(' ')
                    && !pos[2].trim().is_empty(),
                "not file:line:column: message: {line:?}"
            );
            prop_assert!(!line.contains('\n'));
        }
    }
    Ok(())
}

fn dir_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == ext));
    files.sort();
    files
}

fn originals() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir_files(&root.join("../config"), "yaml")
        .into_iter()
        .chain(dir_files(&root.join("tests/data/config"), "yaml"))
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

#[test]
fn the_regression_corpus_is_refused_or_accepted_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/config");
    for file in dir_files(&dir, "yaml") {
        let bytes = std::fs::read(&file).unwrap();
        check(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// A scalar of the kinds the config's values take, valid or not.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("~".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("0x{n:x}")),
        any::<f64>().prop_map(|n| n.to_string()),
        "[0-9]{1,4}(ms|s|m|h|%|us)?",
        "(tcp|udp|http|none|ipip|l2_dsr|drop|pass|auto|native|generic|yes|true|null)",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?(:[0-9]{1,6})?",
        "[0-9a-f:]{2,20}(/[0-9]{1,3})?",
        "\"[^\"\\\\]{0,20}\"",
        ".{0,12}",
    ]
}

const KEYS: &[&str] = &[
    "global",
    "hash_seed",
    "conntrack_entries",
    "max_vips",
    "max_backends",
    "metrics_listen",
    "encap_source_v4",
    "encap_source_v6",
    "pin_path",
    "interfaces",
    "name",
    "xdp_mode",
    "vips",
    "address",
    "port",
    "protocol",
    "forwarding",
    "table_size",
    "pool",
    "when_no_backend",
    "pools",
    "backends",
    "weight",
    "health_check",
    "kind",
    "interval",
    "timeout",
    "rise",
    "fall",
    "jitter",
    "http",
    "path",
    "host",
    "expect_status",
    "udp",
    "send",
    "expect",
    "announce",
];

/// A YAML tree of the config's keys with arbitrary scalars, lists and maps.
fn document() -> impl Strategy<Value = String> {
    let leaf = scalar().boxed();
    let tree = leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec((prop::sample::select(KEYS), inner.clone()), 1..6).prop_map(
                |entries| {
                    let mut out = String::new();
                    for (key, value) in entries {
                        let value = value.replace('\n', "\n  ");
                        out += &format!("\n{key}: {value}");
                    }
                    out.replace('\n', "\n  ")
                }
            ),
            prop::collection::vec(inner, 0..4).prop_map(|items| {
                let mut out = String::new();
                for item in items {
                    out += &format!("\n- {}", item.replace('\n', "\n  "));
                }
                out.replace('\n', "\n  ")
            }),
        ]
    });
    prop::collection::vec((prop::sample::select(KEYS), tree), 1..6).prop_map(|top| {
        top.into_iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect::<String>()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn documents_of_config_keys_are_accepted_or_refused_cleanly(text in document()) {
        check(text.as_bytes())?;
    }

    #[test]
    fn spliced_shipped_configs_are_accepted_or_refused_cleanly(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), 0usize..12, prop_oneof![
                scalar(),
                "[ \\n\\t:\\-\\[\\]{}&*!|>#]{1,4}",
            ]),
            1..6,
        ),
    ) {
        let originals = originals();
        let mut text: Vec<char> = pick.get(&originals).chars().collect();
        for (at, cut, piece) in edits {
            let at = at.index(text.len() + 1);
            let cut = cut.min(text.len() - at);
            text.splice(at..at + cut, piece.chars());
        }
        let text: String = text.into_iter().collect();
        check(text.as_bytes())?;
    }
}
