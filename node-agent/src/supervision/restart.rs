//! When to restart a dead worker, and when to give up. Pure, so the state
//! machine is tested without spawning anything.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// The first crash in the window restarts at once (as the Nanny does);
    /// the second waits `base`, then the delay doubles.
    pub base: Duration,
    /// Upper bound of the delay.
    pub cap: Duration,
    /// Give up after this many crashes within `window`.
    pub max_crashes: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            max_crashes: 5,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart(Duration),
    /// Too many crashes: stop, with the reason.
    GiveUp(String),
}

/// Crash history of one supervised process.
#[derive(Debug, Default)]
pub struct CrashLog {
    crashes: Vec<Instant>,
}

impl CrashLog {
    /// Record a crash at `now` and decide what to do.
    pub fn record(&mut self, policy: &RestartPolicy, now: Instant) -> Decision {
        self.crashes.push(now);
        self.crashes
            .retain(|t| now.saturating_duration_since(*t) <= policy.window);
        let n = self.crashes.len();
        if n >= policy.max_crashes {
            return Decision::GiveUp(format!(
                "gave up after {n} crashes within {}s",
                policy.window.as_secs()
            ));
        }
        if n <= 1 {
            return Decision::Restart(Duration::ZERO);
        }
        let factor = 1u32 << (n - 2).min(16);
        Decision::Restart(policy.base.saturating_mul(factor).min(policy.cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_gives_up() {
        let p = RestartPolicy::default();
        let mut log = CrashLog::default();
        let t0 = Instant::now();
        let ds: Vec<_> = (0..5)
            .map(|i| log.record(&p, t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(ds[0], Decision::Restart(Duration::ZERO));
        assert_eq!(ds[1], Decision::Restart(Duration::from_millis(100)));
        assert_eq!(ds[3], Decision::Restart(Duration::from_millis(400)));
        assert_eq!(
            ds[4],
            Decision::GiveUp("gave up after 5 crashes within 60s".into())
        );
    }

    #[test]
    fn old_crashes_are_forgotten_and_delay_is_capped() {
        let p = RestartPolicy {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(15),
            max_crashes: 4,
            window: Duration::from_secs(60),
        };
        let mut log = CrashLog::default();
        let t0 = Instant::now();
        log.record(&p, t0);
        log.record(&p, t0 + Duration::from_secs(1));
        assert_eq!(
            log.record(&p, t0 + Duration::from_secs(2)),
            Decision::Restart(Duration::from_secs(15))
        );
        // Two minutes later the window is empty again.
        assert_eq!(
            log.record(&p, t0 + Duration::from_secs(121)),
            Decision::Restart(Duration::ZERO)
        );
    }
}
