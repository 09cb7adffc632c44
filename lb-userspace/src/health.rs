//! Health checks (placeholder: every Backend stays up; the health-check issue replaces
//! this with real TCP / HTTP / UDP checks behind the same interface).

use std::net::IpAddr;

use tokio::sync::mpsc;

use crate::config::Config;

/// A Backend of a pool changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub pool: String,
    pub address: IpAddr,
    pub up: bool,
    /// Why: "timeout", "connection refused", "HTTP 500", "2 checks passed", ...
    pub reason: String,
}

/// The running checks of one config.
pub struct Checker {
    _events: Option<mpsc::Sender<HealthEvent>>,
}

impl Checker {
    /// Starts checking every Backend of `config` (inside a tokio runtime); transitions
    /// arrive on `events`. Backends start up.
    pub fn start(_config: &Config, events: mpsc::Sender<HealthEvent>) -> Self {
        Self { _events: Some(events) }
    }

    /// A checker that checks nothing.
    pub fn idle() -> Self {
        Self { _events: None }
    }

    /// Stops every check.
    pub fn stop(self) {}
}
