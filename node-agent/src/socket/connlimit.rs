//! Bounds on what one uid can make the agent hold through its socket,
//! which is world-writable, so every local user can open connections.
//!
//! * Connections in progress: from the handshake until the reply to the
//!   first request is written (or its deadline passed). Each uid may have
//!   a few, all users together a few hundred; root (slurmstepd registering
//!   a burst of jobs) is not limited. A connection whose attach was
//!   accepted leaves this count: it lives as long as its job, and jobs are
//!   bounded by Slurm.
//! * Bytes of replies being written: a reply a peer does not read is held
//!   until its deadline, and a `status` of a user with thousands of jobs is
//!   a megabyte. A uid with replies in flight gets another only within
//!   `REPLY_BYTES_PER_UID` (one reply alone is always written, whatever
//!   its size).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Connections in progress of one uid at a time.
pub const PER_UID: usize = 16;
/// Connections in progress of all non-root uids at a time.
pub const TOTAL: usize = 256;
/// Bytes of replies being written to one uid's connections at a time.
pub const REPLY_BYTES_PER_UID: usize = 4 << 20;

#[derive(Default)]
pub struct ConnLimits {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Connections in progress per uid, and their sum.
    conns: HashMap<u32, usize>,
    total: usize,
    /// Bytes of replies being written per uid.
    reply_bytes: HashMap<u32, usize>,
}

/// One connection in progress; released when dropped.
pub struct Permit {
    limits: Option<Arc<ConnLimits>>,
    uid: u32,
}

/// The bytes of one reply being written; released when dropped.
pub struct ReplyBytes {
    limits: Option<Arc<ConnLimits>>,
    uid: u32,
    len: usize,
}

impl ConnLimits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for a new connection of `uid`, or the reason there is none.
    pub fn try_acquire(self: &Arc<Self>, uid: u32) -> Result<Permit, String> {
        if uid == 0 {
            return Ok(Permit { limits: None, uid });
        }
        let mut c = self.lock();
        let mine = c.conns.get(&uid).copied().unwrap_or(0);
        if mine >= PER_UID {
            return Err(format!(
                "uid {uid} has {mine} connections in progress with the node agent (at most {PER_UID})"
            ));
        }
        if c.total >= TOTAL {
            return Err(format!(
                "the node agent has {TOTAL} connections in progress; try again"
            ));
        }
        *c.conns.entry(uid).or_default() += 1;
        c.total += 1;
        Ok(Permit {
            limits: Some(self.clone()),
            uid,
        })
    }
}

impl Permit {
    /// Room for a reply of `len` bytes to this connection, or the reason
    /// there is none.
    pub fn reserve_reply(&self, len: usize) -> Result<ReplyBytes, String> {
        let uid = self.uid;
        let Some(limits) = &self.limits else {
            return Ok(ReplyBytes {
                limits: None,
                uid,
                len,
            });
        };
        let mut c = limits.lock();
        let held = c.reply_bytes.get(&uid).copied().unwrap_or(0);
        if held > 0 && held + len > REPLY_BYTES_PER_UID {
            return Err(format!(
                "uid {uid} has {held} bytes of replies from the node agent not read yet (at most {REPLY_BYTES_PER_UID}, this one is {len}); read them first"
            ));
        }
        *c.reply_bytes.entry(uid).or_default() += len;
        Ok(ReplyBytes {
            limits: Some(limits.clone()),
            uid,
            len,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut c = l.lock();
            if let Some(n) = c.conns.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    c.conns.remove(&self.uid);
                }
            }
            c.total -= 1;
        }
    }
}

impl Drop for ReplyBytes {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut c = l.lock();
            if let Some(n) = c.reply_bytes.get_mut(&self.uid) {
                *n = n.saturating_sub(self.len);
                if *n == 0 {
                    c.reply_bytes.remove(&self.uid);
                }
            }
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
        assert_eq!(l.lock().total, 0);
        assert!(l.lock().conns.is_empty());
    }

    #[test]
    fn replies_in_flight_are_bounded_per_uid() {
        let l = Arc::new(ConnLimits::default());
        let (a, b) = (l.try_acquire(1000).unwrap(), l.try_acquire(1000).unwrap());
        // One reply alone is written whatever its size.
        let big = a.reserve_reply(REPLY_BYTES_PER_UID + 1).unwrap();
        let e = b.reserve_reply(1).err().unwrap();
        assert!(
            e.starts_with("uid 1000 has 4194305 bytes of replies"),
            "{e}"
        );
        // Others' are not affected, nor root's.
        let other = l.try_acquire(1001).unwrap();
        let _o = other.reserve_reply(REPLY_BYTES_PER_UID).unwrap();
        let root = l.try_acquire(0).unwrap();
        let _r = root.reserve_reply(usize::MAX / 2).unwrap();
        drop(big);
        let halves: Vec<_> = (0..2)
            .map(|_| b.reserve_reply(REPLY_BYTES_PER_UID / 2).unwrap())
            .collect();
        assert!(a.reserve_reply(1).is_err());
        drop(halves);
        assert!(!l.lock().reply_bytes.contains_key(&1000));
    }
}
