//! The probe loop of one target: wait (interval ± jitter), probe under the shared
//! concurrency limit, feed every pool's state machine, send the transitions.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng as _, rngs::SmallRng};
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use super::{
    HealthEvent,
    plan::Target,
    state::{BackendHealth, Damping},
    stats::{HealthStats, Observation, Observer},
};

/// What every target's task shares.
pub(super) struct Shared {
    /// Probes in flight, across all targets.
    pub semaphore: Semaphore,
    pub stats: HealthStats,
    pub observer: Option<Observer>,
    pub events: mpsc::Sender<HealthEvent>,
    pub damping: Damping,
}

/// One wait between checks: `interval × (1 ± jitter·u)`, `u` uniform in `[-1, 1]`.
pub fn jittered(interval: Duration, jitter: f64, rng: &mut impl Rng) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    if jitter == 0.0 {
        return interval;
    }
    interval.mul_f64(1.0 + jitter * rng.random_range(-1.0..=1.0))
}

/// Probes `target` until the task is aborted or the event receiver is gone.
pub(super) async fn run(target: Target, shared: Arc<Shared>) {
    let Target {
        address,
        check,
        probe,
        members,
    } = target;
    let mut rng = SmallRng::from_os_rng();
    let pools: Vec<String> = members.iter().map(|m| m.pool.clone()).collect();
    let mut states: Vec<BackendHealth> = members
        .iter()
        .map(|m| BackendHealth::new(m.up, check.rise, check.fall, shared.damping))
        .collect();
    // A random phase, so that checks of many targets do not run in lockstep.
    let mut next = Instant::now() + check.interval.mul_f64(rng.random::<f64>());
    loop {
        tokio::time::sleep_until(next.into()).await;
        let permit = shared
            .semaphore
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let began = Instant::now();
        let result = probe.run().await;
        let now = Instant::now();
        drop(permit);
        let latency = now - began;
        next = began + jittered(check.interval, check.jitter, &mut rng);
        let result = result.as_ref().copied();
        shared.stats.record_probe(result);
        if let Some(observer) = &shared.observer {
            observer(&Observation {
                pools: &pools,
                address,
                port: check.port,
                kind: check.kind.keyword(),
                latency,
                result,
            });
        }
        for (member, state) in members.iter().zip(&mut states) {
            let step = state.observe(now, result);
            shared.stats.record_check(
                &member.pool,
                address,
                latency,
                result,
                (state.is_up(), state.is_held(now)),
                &step,
            );
            if let Some(hold) = step.hold_started {
                warn!(
                    pool = %member.pool,
                    backend = %address,
                    name = %member.name,
                    flaps = step.flaps,
                    window = %humantime::format_duration(shared.damping.window),
                    hold = %humantime::format_duration(hold),
                    "flapping backend: held down"
                );
            }
            let Some(transition) = step.transition else {
                continue;
            };
            let state = if transition.up { "up" } else { "down" };
            if transition.up {
                info!(pool = %member.pool, backend = %address, name = %member.name, %state,
                    reason = %transition.reason, latency_us = latency.as_micros() as u64,
                    "health check: backend up");
            } else {
                warn!(pool = %member.pool, backend = %address, name = %member.name, %state,
                    reason = %transition.reason, latency_us = latency.as_micros() as u64,
                    "health check: backend down");
            }
            let event = HealthEvent {
                pool: member.pool.clone(),
                address,
                up: transition.up,
                reason: transition.reason,
                detected_at: now,
            };
            if shared.events.send(event).await.is_err() {
                return;
            }
        }
    }
}
