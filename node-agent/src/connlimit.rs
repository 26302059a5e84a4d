//! Bounds on connections that have not been authenticated yet (handshake
//! and first request): the socket is world-writable, so every local user
//! can open connections. Each uid may have a few in that phase, all users
//! together a few hundred; root (slurmstepd registering a burst of jobs)
//! is not limited. A connection whose attach was accepted leaves this
//! count: it lives as long as its job, and jobs are bounded by Slurm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Unauthenticated connections of one uid at a time.
pub const PER_UID: usize = 16;
/// Unauthenticated connections of all non-root uids at a time.
pub const TOTAL: usize = 256;

#[derive(Default)]
pub struct ConnLimits {
    /// Open connections per uid, and their sum.
    counts: Mutex<(HashMap<u32, usize>, usize)>,
}

/// One unauthenticated connection; released when dropped.
pub struct Permit {
    limits: Option<Arc<ConnLimits>>,
    uid: u32,
}

impl ConnLimits {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<u32, usize>, usize)> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for a new connection of `uid`, or the reason there is none.
    pub fn try_acquire(self: &Arc<Self>, uid: u32) -> Result<Permit, String> {
        if uid == 0 {
            return Ok(Permit { limits: None, uid });
        }
        let mut c = self.lock();
        let mine = c.0.get(&uid).copied().unwrap_or(0);
        if mine >= PER_UID {
            return Err(format!(
                "uid {uid} has {mine} connections in progress with the node agent (at most {PER_UID})"
            ));
        }
        if c.1 >= TOTAL {
            return Err(format!(
                "the node agent has {TOTAL} connections in progress; try again"
            ));
        }
        *c.0.entry(uid).or_default() += 1;
        c.1 += 1;
        Ok(Permit {
            limits: Some(self.clone()),
            uid,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut c = l.lock();
            if let Some(n) = c.0.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    c.0.remove(&self.uid);
                }
            }
            c.1 -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_uid_and_total_bounds() {
        let l = Arc::new(ConnLimits::default());
        let mine: Vec<_> = (0..PER_UID)
            .map(|_| l.try_acquire(1000).ok().unwrap())
            .collect();
        assert!(l.try_acquire(1000).err().unwrap().contains("uid 1000"));
        assert!(l.try_acquire(1001).is_ok());
        drop(mine);
        assert!(l.try_acquire(1000).is_ok());
        let many: Vec<_> = (0..TOTAL)
            .map(|i| l.try_acquire(2000 + i as u32).ok().unwrap())
            .collect();
        assert!(l.try_acquire(5).is_err());
        assert!(l.try_acquire(0).is_ok(), "root is not limited");
        drop(many);
        assert_eq!(l.lock().1, 0);
        assert!(l.lock().0.is_empty());
    }
}
