//! What to probe: one probe per distinct (address, check settings), shared by every pool
//! that checks that address the same way (as Maglev does), so a Backend in ten pools is
//! not probed ten times.

use std::{collections::HashMap, net::IpAddr};

use super::probe::Probe;
use crate::config::{Config, HealthCheck};

/// A Backend of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub pool: String,
    /// The Backend's name (for logs).
    pub name: String,
    /// Its state when the checks start.
    pub up: bool,
}

/// One probe stream and the pools its results count for.
#[derive(Clone, Debug)]
pub struct Target {
    pub address: IpAddr,
    pub check: HealthCheck,
    pub probe: Probe,
    /// In pool-name order.
    pub members: Vec<Member>,
}

/// Every check of a config.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Backends of pools with `kind: none`: always up.
    pub unchecked: Vec<(IpAddr, Member)>,
}

impl Plan {
    /// The checks of `config`; Backends in `initial_down` (pool, address) start down.
    pub fn new(config: &Config, initial_down: &[(String, IpAddr)]) -> Self {
        let mut plan = Plan::default();
        // Keyed by the address and the check's Debug text: `HealthCheck` holds an f64 (no
        // Hash), and Debug prints floats exactly (shortest round-trip form).
        let mut index: HashMap<(IpAddr, String), usize> = HashMap::new();
        for (pool_name, pool) in &config.pools {
            for backend in &pool.backends {
                let member = Member {
                    pool: pool_name.clone(),
                    name: backend.name.clone(),
                    up: !initial_down
                        .iter()
                        .any(|(p, a)| p == pool_name && *a == backend.address),
                };
                let check = &pool.health_check;
                let Some(probe) = Probe::new(check, backend.address) else {
                    plan.unchecked.push((backend.address, member));
                    continue;
                };
                let key = (backend.address, format!("{check:?}"));
                match index.get(&key) {
                    Some(&i) => plan.targets[i].members.push(member),
                    None => {
                        index.insert(key, plan.targets.len());
                        plan.targets.push(Target {
                            address: backend.address,
                            check: check.clone(),
                            probe,
                            members: vec![member],
                        });
                    }
                }
            }
        }
        plan
    }

    /// Every (pool, address) with its starting state.
    pub fn backends(&self) -> impl Iterator<Item = ((String, IpAddr), bool)> + '_ {
        let checked = self.targets.iter().flat_map(|t| {
            t.members
                .iter()
                .map(|m| ((m.pool.clone(), t.address), m.up))
        });
        let unchecked = self
            .unchecked
            .iter()
            .map(|(address, m)| ((m.pool.clone(), *address), true));
        checked.chain(unchecked)
    }
}
