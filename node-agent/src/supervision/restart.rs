//! When to restart a dead worker, and when to give up. Pure, so the state
//! machine is tested without spawning anything.

use std::hash::{Hash, Hasher};
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

/// The delays of a worker that never started (it gave up reaching its
/// scheduler within its death timeout, or failed starting): the node or
/// the scheduler cannot take it now, and starting it again at once is one
/// more Python start on the cores that were too busy, for every worker of
/// the array at the same moment (a restart storm: docs/performance.md, run
/// H). So it waits about as long as its failed start took (at least 5 s:
/// the node needed longer than that; a fixed 5 s was nothing beside
/// starts of minutes there, run J), doubling with each failure in a row,
/// up to 5 min, less up to half by a hash of the job and the attempt, so
/// that an array's workers come back spread out; a worker that started
/// (then ended: a crash or a restart) forgets them.
#[derive(Debug, Default)]
pub struct StartFailures {
    failures: u32,
}

impl StartFailures {
    pub const BASE: Duration = Duration::from_secs(5);
    pub const CAP: Duration = Duration::from_secs(300);

    /// One more failure to start of the job `key`, a start that took
    /// `took`: how long to wait.
    pub fn record(&mut self, key: &str, took: Duration) -> Duration {
        let full = took
            .max(Self::BASE)
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::CAP);
        self.failures = self.failures.saturating_add(1);
        full.saturating_sub(full.mul_f64(spread(key, self.failures) / 2.0))
    }

    /// The worker started: the next failure to start is a first one again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1) fixed by `key` and `attempt` (SipHash with fixed
/// keys: the same on every node and every agent release that builds with
/// the same std, which only the spread depends on).
fn spread(key: &str, attempt: u32) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, attempt).hash(&mut h);
    (h.finish() % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_never_started_waits_longer_each_time_spread_by_job() {
        let quick = Duration::from_secs(1);
        let mut f = StartFailures::default();
        let ds: Vec<_> = (0..9).map(|_| f.record("4242_7", quick)).collect();
        for (i, d) in ds.iter().enumerate() {
            let full = (StartFailures::BASE * (1 << i)).min(StartFailures::CAP);
            assert!(
                *d <= full && *d >= full / 2,
                "attempt {i}: {d:?} of {full:?}"
            );
        }
        assert!(ds[8] >= Duration::from_secs(150), "capped at 5 min: {ds:?}");
        f.reset();
        assert!(f.record("4242_7", quick) <= StartFailures::BASE);
        // A start that took 80 s to fail waits 40 to 80 s, then 80 to 160.
        let mut f = StartFailures::default();
        let slow = Duration::from_secs(80);
        let (a, b) = (f.record("4242_7", slow), f.record("4242_7", slow));
        assert!(a >= slow / 2 && a <= slow, "{a:?}");
        assert!(b >= slow && b <= slow * 2, "{b:?}");
        // An array's workers do not come back together.
        let firsts: std::collections::BTreeSet<_> = (0..64)
            .map(|i| StartFailures::default().record(&format!("4242_{i}"), quick))
            .collect();
        assert!(firsts.len() > 32, "{firsts:?}");
        let (lo, hi) = (firsts.first().unwrap(), firsts.last().unwrap());
        assert!(
            hi.saturating_sub(*lo) > Duration::from_secs(1),
            "{lo:?}..{hi:?}"
        );
    }

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
