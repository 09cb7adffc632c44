//! Route health injection: which Vips this box announces, transitions, maintenance, and
//! failed netlink calls.

use std::{collections::BTreeMap, net::IpAddr, sync::Mutex};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::announce::Decision;

pub struct AnnounceMetrics {
    announced: IntGaugeVec,
    transitions: IntCounterVec,
    maintenance: IntGauge,
    errors: IntCounter,
    /// Vip names with an `announced` series now.
    vips: Mutex<Vec<String>>,
}

impl AnnounceMetrics {
    pub fn new(registry: &Registry) -> Self {
        let announced = IntGaugeVec::new(
            Opts::new(
                "mlb_vip_announced",
                "1 while this load balancer announces the Vip's address (route in the announce table), else 0.",
            ),
            &["vip"],
        )
        .expect("valid");
        let transitions = IntCounterVec::new(
            Opts::new(
                "mlb_vip_announce_transitions_total",
                "Announce (to=announced) and withdraw (to=withdrawn) transitions of a Vip's address.",
            ),
            &["vip", "to"],
        )
        .expect("valid");
        let maintenance = IntGauge::new(
            "mlb_maintenance",
            "1 while the host is in maintenance (every Vip withdrawn, forwarding goes on).",
        )
        .expect("valid");
        let errors = IntCounter::new(
            "mlb_announce_errors_total",
            "Failed netlink calls while keeping the announce table (retried).",
        )
        .expect("valid");
        for c in [
            Box::new(announced.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(transitions.clone()),
            Box::new(maintenance.clone()),
            Box::new(errors.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            announced,
            transitions,
            maintenance,
            errors,
            vips: Mutex::new(Vec::new()),
        }
    }

    /// The decisions now in force (`None`: announcing is off); `changed` lists the Vip
    /// names whose address changed state since the last call, with the new state.
    pub fn set(
        &self,
        decisions: Option<&BTreeMap<IpAddr, Decision>>,
        maintenance: bool,
        changed: &[(String, bool)],
    ) {
        self.maintenance.set(i64::from(maintenance));
        let mut vips = self.vips.lock().unwrap_or_else(|e| e.into_inner());
        let now: Vec<(String, bool)> = decisions
            .into_iter()
            .flat_map(|d| d.values())
            .flat_map(|d| d.vips.iter().map(|v| (v.clone(), d.announced)))
            .collect();
        for gone in vips.iter().filter(|v| !now.iter().any(|(n, _)| n == *v)) {
            let _ = self.announced.remove_label_values(&[gone]);
        }
        for (vip, announced) in &now {
            self.announced
                .with_label_values(&[vip])
                .set(i64::from(*announced));
        }
        for (vip, announced) in changed {
            let to = if *announced { "announced" } else { "withdrawn" };
            self.transitions.with_label_values(&[vip, to]).inc();
        }
        *vips = now.into_iter().map(|(v, _)| v).collect();
    }

    pub fn error(&self) {
        self.errors.inc();
    }
}
