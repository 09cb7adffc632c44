//! `mlb check` on the shipped configs and on broken ones (no root needed).

use std::process::Command;

fn mlb_check(path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mlb"))
        .arg("check")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_passes_on_every_shipped_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = mlb_check(&path);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "config/ holds the example, minimal and demo configs"
    );
}

#[test]
fn check_fails_on_broken_configs_naming_file_line_and_problem() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config");
    for (file, expected) in [
        ("duplicate_vip.yaml", "duplicate vip"),
        ("unknown_key_typo.yaml", "did you mean"),
        ("table_size_not_prime.yaml", "is not prime"),
        ("family_mismatch.yaml", "IPv4"),
    ] {
        let out = mlb_check(&dir.join(file));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} must fail");
        assert!(
            stderr.contains(&format!("{file}:")),
            "{file}: the file is named: {stderr}"
        );
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
}
