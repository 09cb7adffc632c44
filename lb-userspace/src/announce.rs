//! Route health injection: which Vip addresses this load balancer announces, and a task
//! that keeps the kernel's announce table equal to that set.
//!
//! The daemon does not speak BGP. It keeps one host route (`/32`, `/128`, `dev lo`) per
//! announced address in the config's `announce.table`; a BGP daemon exports that table to
//! the routers (BIRD's `kernel` protocol with `learn`, FRR's `redistribute table`). A route
//! is the unit a router can steer, so an address is announced only while *every* Vip on it
//! can be served (as vc5 does): a box that can serve only some of an address's services
//! would attract traffic it drops, while boxes that can serve them all exist. Addresses are
//! withdrawn in maintenance, and on `mlb detach`; a stop or crash leaves the routes, as it
//! leaves the program attached, so the data plane keeps serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::Config,
    netlink::{Netlink, NetlinkError},
};

/// How often the table is compared with the wanted routes even without a change (repairs
/// a route someone removed, or a failed netlink call).
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);
/// Wait after a failed netlink call before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why an address is announced or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Every Vip on it has a usable backend.
    Servable,
    /// These Vips (names) have no usable backend.
    NoUsableBackend(Vec<String>),
    /// The host is in maintenance (`mlb maintenance on`).
    Maintenance,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Servable => write!(f, "every vip on it has a usable backend"),
            Reason::NoUsableBackend(vips) => {
                write!(f, "no usable backend for vip {}", vips.join(", "))
            }
            Reason::Maintenance => write!(f, "maintenance"),
        }
    }
}

/// The decision for one Vip address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub announced: bool,
    pub reason: Reason,
    /// The names of the Vips on this address.
    pub vips: Vec<String>,
}

/// What to announce, per Vip address of `config`: `empty` holds the endpoints of Vips
/// whose table has no usable backend.
pub fn decide(
    config: &Config,
    empty: &BTreeSet<String>,
    maintenance: bool,
) -> BTreeMap<IpAddr, Decision> {
    let mut by_addr: BTreeMap<IpAddr, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for vip in &config.vips {
        let (names, unservable) = by_addr.entry(vip.address).or_default();
        names.push(vip.name.clone());
        if empty.contains(&vip.endpoint()) {
            unservable.push(vip.name.clone());
        }
    }
    by_addr
        .into_iter()
        .map(|(addr, (vips, unservable))| {
            let reason = if maintenance {
                Reason::Maintenance
            } else if !unservable.is_empty() {
                Reason::NoUsableBackend(unservable)
            } else {
                Reason::Servable
            };
            let decision = Decision {
                announced: reason == Reason::Servable,
                reason,
                vips,
            };
            (addr, decision)
        })
        .collect()
}

/// The routes wanted in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Wanted {
    /// `None`: announcing is off (routes left in an earlier table are removed).
    table: Option<u32>,
    routes: BTreeSet<IpAddr>,
}

/// Keeps the announce table in line with the wanted routes, on a task of its own, so that
/// netlink calls never hold up the daemon loop. Errors are logged, counted and retried.
pub struct Announcer {
    wanted: watch::Sender<Wanted>,
    errors: Arc<dyn Fn() + Send + Sync>,
    netlink: Netlink,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the task; `errors` is called on every failed netlink call.
    pub fn start(netlink: Netlink, errors: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (wanted, rx) = watch::channel(Wanted::default());
        let task = tokio::spawn(keep(netlink.clone(), rx, Arc::clone(&errors)));
        Self {
            wanted,
            errors,
            netlink,
            task,
        }
    }

    /// Wants exactly `routes` in `table` (`None`: announcing off).
    pub fn set(&self, table: Option<u32>, routes: BTreeSet<IpAddr>) {
        self.wanted.send_if_modified(|w| {
            let new = Wanted { table, routes };
            let changed = *w != new;
            *w = new;
            changed
        });
    }

    /// Stops the task and removes every route of ours from `table` (detach).
    pub async fn withdraw_all(self, table: u32) {
        self.task.abort();
        if let Err(e) = sync(&self.netlink, table, &BTreeSet::new()).await {
            (self.errors)();
            warn!(error = %e, table, "withdrawing the vip routes");
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        // A stop leaves the routes in place (the data plane keeps serving).
        self.task.abort();
    }
}

async fn keep(
    netlink: Netlink,
    mut wanted: watch::Receiver<Wanted>,
    errors: Arc<dyn Fn() + Send + Sync>,
) {
    // The table the last sync wrote to, so that a table change or `announce` turned off
    // cleans up after itself.
    let mut last_table: Option<u32> = None;
    loop {
        let now = wanted.borrow_and_update().clone();
        let mut result = Ok(());
        if let Some(old) = last_table.filter(|t| Some(*t) != now.table) {
            result = sync(&netlink, old, &BTreeSet::new()).await;
            if result.is_ok() {
                info!(table = old, "announce table left: its vip routes removed");
            }
        }
        if let (Ok(()), Some(table)) = (&result, now.table) {
            result = sync(&netlink, table, &now.routes).await;
        }
        let wait = match result {
            Ok(()) => {
                last_table = now.table;
                REPAIR_INTERVAL
            }
            Err(e) => {
                errors();
                warn!(error = %e, "announce: netlink failed; retrying");
                RETRY_AFTER
            }
        };
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Makes mlb's routes in `table` exactly `routes`.
async fn sync(
    netlink: &Netlink,
    table: u32,
    routes: &BTreeSet<IpAddr>,
) -> Result<(), NetlinkError> {
    let present: BTreeSet<IpAddr> = netlink.routes(table).await?.into_iter().collect();
    for addr in routes.difference(&present) {
        netlink.add_route(table, *addr).await?;
    }
    for addr in present.difference(routes) {
        netlink.del_route(table, *addr).await?;
    }
    Ok(())
}

/// Removes mlb's routes from `table`, without a daemon (for `mlb detach`).
pub fn withdraw_blocking(table: u32) -> Result<(), NetlinkError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let netlink = Netlink::connect()?;
        sync(&netlink, table, &BTreeSet::new()).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "interfaces:\n  - name: eth0\nvips:\n  - name: web\n    address: 10.200.0.1\n    \
             port: 80\n    protocol: tcp\n    pool: p\n  - name: dns\n    address: 10.200.0.1\n    \
             port: 53\n    protocol: udp\n    pool: p\n  - name: other\n    address: 10.200.0.2\n    \
             port: 80\n    protocol: tcp\n    pool: p\npools:\n  p:\n    backends:\n      \
             - address: 10.0.0.1\n",
            "test.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    #[test]
    fn an_address_is_announced_while_every_vip_on_it_is_servable() {
        let config = config();
        let all = decide(&config, &BTreeSet::new(), false);
        assert!(all.values().all(|d| d.announced), "{all:?}");
        assert_eq!(all[&addr("10.200.0.1")].vips, ["web", "dns"]);

        let empty = BTreeSet::from(["10.200.0.1:53/udp".to_owned()]);
        let some = decide(&config, &empty, false);
        let first = &some[&addr("10.200.0.1")];
        assert!(!first.announced);
        assert_eq!(first.reason, Reason::NoUsableBackend(vec!["dns".into()]));
        assert!(some[&addr("10.200.0.2")].announced, "other addresses stay");
    }

    #[test]
    fn maintenance_withdraws_everything() {
        let decided = decide(&config(), &BTreeSet::new(), true);
        assert_eq!(decided.len(), 2);
        for d in decided.values() {
            assert!(!d.announced);
            assert_eq!(d.reason, Reason::Maintenance);
        }
    }
}
