//! The README documents every data-plane counter: the metric family it is exported as,
//! and its label value there, appear in the metrics table.

use lb_common::consts::{Counter, DecapCounter};
use lb_userspace::metrics::counter_metric;

fn metrics_section() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    readme
        .split("\n## Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Metrics section")
        .to_owned()
}

#[test]
fn every_counter_has_a_readme_row() {
    let metrics = metrics_section();
    let mut missing = Vec::new();
    for c in Counter::ALL {
        let (family, label) = counter_metric(c);
        let row = metrics.lines().find(|l| l.contains(&format!("`{family}`")));
        let documented = row.is_some_and(|row| {
            label.is_none_or(|(name, value)| {
                row.contains(&format!("{name}={value}")) || row.contains(&format!("|{value}"))
            })
        });
        if !documented {
            missing.push(format!("{} ({family} {label:?})", c.name()));
        }
    }
    // Backends' counters: one family, `result` = the counter's name.
    for c in DecapCounter::ALL {
        if !metrics.contains(&format!("|{}", c.name()))
            && !metrics.contains(&format!("={}", c.name()))
        {
            missing.push(c.name().to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "counters without a README metrics row: {missing:?}"
    );
}
