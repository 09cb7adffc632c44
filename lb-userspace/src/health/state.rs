//! The health of one Backend in one pool: consecutive-result thresholds (`rise`, `fall`)
//! and flap damping. Pure: time comes in as an argument, so tests drive it exactly.
//!
//! Flap damping: a Backend whose state would change more than
//! [`Damping::max_transitions`] times within [`Damping::window`] is held down for a
//! back-off ([`Damping::hold`], doubling with every further hold up to
//! [`Damping::max_hold`]) before it may come up again. The transition that crosses the
//! limit starts the hold: if it is a fall the Backend goes down and is held; if it is a
//! rise it is refused. The flapping history is cleared when a hold starts (the hold pays
//! for it); the back-off returns to [`Damping::hold`] once the Backend has stayed up for a
//! whole window.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::probe::Failure;

/// Flap-damping settings (the same for every pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damping {
    /// State changes allowed within `window`; one more starts a hold.
    pub max_transitions: usize,
    pub window: Duration,
    /// First hold; each further hold doubles it.
    pub hold: Duration,
    /// Longest hold.
    pub max_hold: Duration,
}

impl Damping {
    /// The daemon's settings: more than 4 changes within 30 s hold the Backend down for
    /// 10 s, then 20 s, 40 s, ... up to 5 minutes.
    pub const DEFAULT: Damping = Damping {
        max_transitions: 4,
        window: Duration::from_secs(30),
        hold: Duration::from_secs(10),
        max_hold: Duration::from_secs(300),
    };

    /// No damping at all.
    pub const OFF: Damping = Damping {
        max_transitions: usize::MAX,
        window: Duration::ZERO,
        hold: Duration::ZERO,
        max_hold: Duration::ZERO,
    };
}

impl Default for Damping {
    fn default() -> Self {
        Damping::DEFAULT
    }
}

/// A state change decided by [`BackendHealth::observe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub up: bool,
    /// "connection refused", "HTTP 500", "2 consecutive checks passed", ...
    pub reason: String,
}

/// What one check result did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub transition: Option<Transition>,
    /// A flap-damping hold started now, for this long.
    pub hold_started: Option<Duration>,
    /// Changes within the window that started the hold (for the log).
    pub flaps: usize,
}

/// The health of one Backend in one pool.
#[derive(Clone, Debug)]
pub struct BackendHealth {
    up: bool,
    rise: u32,
    fall: u32,
    damping: Damping,
    successes: u32,
    failures: u32,
    /// When each recent state change happened (within the damping window).
    recent: VecDeque<Instant>,
    held_until: Option<Instant>,
    next_hold: Duration,
    transitions: u64,
    damped: u64,
}

impl BackendHealth {
    pub fn new(up: bool, rise: u32, fall: u32, damping: Damping) -> Self {
        Self {
            up,
            rise: rise.max(1),
            fall: fall.max(1),
            damping,
            successes: 0,
            failures: 0,
            recent: VecDeque::new(),
            held_until: None,
            next_hold: damping.hold,
            transitions: 0,
            damped: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Held down by flap damping at `now`.
    pub fn is_held(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|until| now < until)
    }

    /// State changes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Holds started so far.
    pub fn damped(&self) -> u64 {
        self.damped
    }

    /// Takes one check result, at `now`, into account.
    pub fn observe(&mut self, now: Instant, result: Result<(), &Failure>) -> Step {
        while self
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.damping.window)
        {
            self.recent.pop_front();
        }
        if self.up && self.recent.is_empty() {
            self.next_hold = self.damping.hold;
        }
        let mut step = Step::default();
        match (self.up, result) {
            (true, Ok(())) => self.failures = 0,
            (false, Err(_)) => self.successes = 0,
            (true, Err(failure)) => {
                self.failures += 1;
                if self.failures >= self.fall {
                    self.set(false, now);
                    let mut reason = failure.to_string();
                    if self.recent.len() > self.damping.max_transitions {
                        self.start_hold(now, &mut step);
                        reason += &format!(
                            "; flapping: held down for {}",
                            humantime::format_duration(step.hold_started.unwrap_or_default())
                        );
                    }
                    step.transition = Some(Transition { up: false, reason });
                }
            }
            (false, Ok(())) => {
                self.successes = self.successes.saturating_add(1);
                if self.successes >= self.rise && !self.is_held(now) {
                    if self.recent.len() + 1 > self.damping.max_transitions {
                        self.start_hold(now, &mut step);
                    } else {
                        self.set(true, now);
                        let reason = if self.rise == 1 {
                            "check passed".to_owned()
                        } else {
                            format!("{} consecutive checks passed", self.rise)
                        };
                        step.transition = Some(Transition { up: true, reason });
                    }
                }
            }
        }
        step
    }

    fn set(&mut self, up: bool, now: Instant) {
        self.up = up;
        self.successes = 0;
        self.failures = 0;
        self.transitions += 1;
        self.recent.push_back(now);
    }

    fn start_hold(&mut self, now: Instant, step: &mut Step) {
        step.flaps = self.recent.len().max(self.damping.max_transitions + 1);
        step.hold_started = Some(self.next_hold);
        self.held_until = Some(now + self.next_hold);
        self.next_hold = (self.next_hold * 2).min(self.damping.max_hold);
        self.damped += 1;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn fail() -> &'static Failure {
        &Failure::Refused
    }

    #[test]
    fn goes_down_on_the_fall_th_failure_and_up_on_the_rise_th_success() {
        let t = Instant::now();
        let mut h = BackendHealth::new(true, 2, 3, Damping::OFF);
        assert_eq!(h.observe(t, Err(fail())).transition, None);
        assert_eq!(h.observe(t, Err(fail())).transition, None);
        let down = h
            .observe(t, Err(fail()))
            .transition
            .expect("down on the 3rd failure");
        assert_eq!(
            down,
            Transition {
                up: false,
                reason: "connection refused".into()
            }
        );
        assert_eq!(h.observe(t, Ok(())).transition, None);
        let up = h
            .observe(t, Ok(()))
            .transition
            .expect("up on the 2nd success");
        assert_eq!(
            up,
            Transition {
                up: true,
                reason: "2 consecutive checks passed".into()
            }
        );
        assert_eq!(h.transitions(), 2);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t = Instant::now();
        let mut h = BackendHealth::new(true, 2, 2, Damping::OFF);
        for _ in 0..10 {
            assert_eq!(h.observe(t, Err(fail())).transition, None);
            assert_eq!(h.observe(t, Ok(())).transition, None);
        }
        assert!(h.is_up());
    }

    #[test]
    fn fifth_change_within_the_window_holds_the_backend_down_with_doubling_back_off() {
        let damping = Damping {
            max_transitions: 4,
            window: Duration::from_secs(30),
            hold: Duration::from_secs(10),
            max_hold: Duration::from_secs(25),
        };
        let t0 = Instant::now();
        let mut h = BackendHealth::new(true, 1, 1, damping);
        let mut t = t0;
        // down, up, down, up: four changes, allowed.
        for up in [false, true, false, true] {
            t += 100 * MS;
            let step = h.observe(t, if up { Ok(()) } else { Err(fail()) });
            assert_eq!(step.transition.map(|s| s.up), Some(up));
            assert_eq!(step.hold_started, None);
        }
        // The fifth (a fall) goes down and starts a 10 s hold.
        t += 100 * MS;
        let step = h.observe(t, Err(fail()));
        assert_eq!(step.hold_started, Some(Duration::from_secs(10)));
        assert_eq!(step.flaps, 5);
        assert!(step.transition.unwrap().reason.contains("flapping"));
        // Passing checks during the hold change nothing.
        for _ in 0..50 {
            t += 100 * MS;
            assert_eq!(h.observe(t, Ok(())), Step::default());
        }
        assert!(!h.is_up() && h.is_held(t));
        // After the hold, the next passing check brings it up.
        t = t0 + Duration::from_millis(500) + Duration::from_secs(10);
        assert_eq!(h.observe(t, Ok(())).transition.map(|s| s.up), Some(true));
        // Flapping again within the window: the next hold is 20 s, then capped at 25 s.
        let mut holds = Vec::new();
        for i in 0..12 {
            t += 100 * MS;
            let step = h.observe(t, if i % 2 == 0 { Err(fail()) } else { Ok(()) });
            holds.extend(step.hold_started);
            if let Some(hold) = step.hold_started {
                t += hold;
            }
        }
        assert_eq!(holds, [Duration::from_secs(20), Duration::from_secs(25)]);
        assert_eq!(h.damped(), 3);
    }

    #[test]
    fn a_rise_that_would_exceed_the_limit_is_refused_and_held() {
        let damping = Damping {
            max_transitions: 1,
            ..Damping::DEFAULT
        };
        let t = Instant::now();
        let mut h = BackendHealth::new(true, 1, 1, damping);
        assert!(h.observe(t, Err(fail())).transition.is_some());
        let step = h.observe(t + MS, Ok(()));
        assert_eq!(step.transition, None);
        assert_eq!(step.hold_started, Some(damping.hold));
        // The log counts the refused rise with the fall: 2 changes, over the limit of 1.
        assert_eq!(step.flaps, 2);
        assert!(!h.is_up());
    }

    #[test]
    fn back_off_returns_to_the_first_hold_after_a_stable_window() {
        let damping = Damping {
            max_transitions: 1,
            ..Damping::DEFAULT
        };
        let mut t = Instant::now();
        let mut h = BackendHealth::new(true, 1, 1, damping);
        h.observe(t, Err(fail()));
        assert_eq!(
            h.observe(t, Ok(())).hold_started,
            Some(Duration::from_secs(10))
        );
        t += Duration::from_secs(10);
        assert!(h.observe(t, Ok(())).transition.is_some_and(|s| s.up));
        t += Duration::from_secs(31);
        h.observe(t, Ok(()));
        h.observe(t, Err(fail()));
        assert_eq!(
            h.observe(t, Ok(())).hold_started,
            Some(Duration::from_secs(10))
        );
    }
}
