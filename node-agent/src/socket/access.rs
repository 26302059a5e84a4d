//! Who may send which request: one rule per request kind, checked in one
//! place before any handler runs.
//!
//! * `Register`, `JobEnd`, `Metrics`: root only (the plugin in slurmstepd,
//!   and the admin).
//! * `Ping`, `Status`: anybody (`Status` shows a user their own jobs only).
//! * `Attach`: anybody here; the job's own rule (its user, from a process of
//!   the job) is checked against the job table (`Jobs::attach`).
//!
//! What an attached connection sends afterwards (`SessionRequest`) is not
//! an opening: it does not decode as one.

use dask_spank_common::{Opening, Request};
use std::fmt;

/// The peer of a connection, from the kernel (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} (pid {})", self.uid, self.pid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Anybody,
    Root,
}

/// The rule of a request kind, and what it is called in refusals.
pub fn rule(req: &Opening) -> (Who, &'static str) {
    let req = match req {
        Opening::Attach(_) => return (Who::Anybody, "attach"),
        Opening::Request(r) => r,
    };
    match req {
        Request::Register(_) => (Who::Root, "register jobs"),
        Request::JobEnd { .. } => (Who::Root, "end jobs"),
        Request::Metrics => (Who::Root, "read metrics over the socket"),
        Request::StopJobs { .. } => (Who::Root, "stop every job"),
        Request::Ping => (Who::Anybody, "ping"),
        Request::Status => (Who::Anybody, "read the status"),
    }
}

/// `Err` with the one-line refusal when `peer` may not send `req`.
pub fn check(req: &Opening, peer: &Peer) -> Result<(), String> {
    let (who, what) = rule(req);
    match who {
        Who::Anybody => Ok(()),
        Who::Root if peer.uid == 0 => Ok(()),
        Who::Root => Err(format!(
            "{peer} may not {what}: only root (slurmstepd, the admin) may"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_only_requests_are_refused_to_users_with_the_reason() {
        let user = Peer { uid: 1000, pid: 7 };
        let root = Peer { uid: 0, pid: 1 };
        let end = Request::JobEnd {
            job_id: 1,
            reason: "x".into(),
        };
        for req in [Request::Metrics, end].map(Opening::from) {
            assert!(check(&req, &root).is_ok());
            let e = check(&req, &user).unwrap_err();
            assert!(
                e.starts_with("uid 1000 (pid 7) may not") && e.contains("only root"),
                "{e}"
            );
        }
        assert!(check(&Request::Ping.into(), &user).is_ok());
        assert!(check(&Request::Status.into(), &user).is_ok());
    }
}
