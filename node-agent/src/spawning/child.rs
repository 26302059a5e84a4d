//! A process that leads a process group of a job, watched through a pidfd,
//! and named so that pid reuse cannot turn a signal against somebody else.
//!
//! * One the agent started itself is its child: it is reaped only after
//!   its group has had its last signal. An unreaped process keeps its pid,
//!   so until then its group id cannot be given to anybody else's group,
//!   and `killpg` is safe.
//! * One adopted from a previous agent (which died or was restarted) is
//!   not: its end is seen through the pidfd (how it ended is lost), and its
//!   group is signalled member by member, through pidfds, and only members
//!   owned by the job's user that started after it (`procfs::signal_if`).

use crate::system::procfs::{self, ProcId};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;

/// Whose child it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Started by this agent.
    Own,
    /// Adopted; its group may only be signalled in members of `uid`
    /// started after the leader.
    Adopted { uid: u32, start: u64 },
}

pub struct Child {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    origin: Origin,
    /// How it ended, once it did (it is not reaped yet).
    status: Option<ExitStatus>,
    /// An adopted process ended (its status is lost).
    gone: bool,
    reaped: bool,
}

fn exit_status(ws: WaitStatus) -> Option<ExitStatus> {
    match ws {
        WaitStatus::Exited(_, code) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
        WaitStatus::Signaled(_, sig, core) => Some(ExitStatus::from_raw(
            sig as i32 | if core { 0x80 } else { 0 },
        )),
        _ => None,
    }
}

/// How the child of `pidfd` ended, if it did, without reaping it.
fn peek_pidfd(pidfd: &OwnedFd) -> Option<ExitStatus> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
    waitid(Id::PIDFd(pidfd.as_fd()), flags)
        .ok()
        .and_then(exit_status)
}

fn register(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and names the
    // same pidfd until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// The error of waiting for an adopted process: it ended, status unknown.
pub fn status_lost() -> io::Error {
    io::Error::other("exit status unknown: it was started by a previous node agent")
}

impl Child {
    pub fn new(c: std::process::Child) -> io::Result<Child> {
        Child::own(c.id() as i32)
    }

    /// The agent's own child `pid` (made by the spawner, or by `Command`).
    pub fn own(pid: i32) -> io::Result<Child> {
        // Nobody but us waits for our children: until we reap it, `pid`
        // names this process, even if it already exited.
        let pidfd = register(procfs::pidfd_open(pid)?)?;
        Ok(Child {
            pid,
            pidfd,
            origin: Origin::Own,
            status: None,
            gone: false,
            reaped: false,
        })
    }

    /// Adopt the process `id` of user `uid`, started by a previous agent,
    /// if it still runs.
    pub fn adopt(id: ProcId, uid: u32) -> io::Result<Child> {
        let gone = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {} is gone", id.pid),
            )
        };
        let pidfd = procfs::pidfd_open(id.pid).map_err(|_| gone())?;
        // The pidfd names whatever has the pid now: check it is ours, then
        // that it still lives (so the check was about it).
        let st = procfs::stat(id.pid).map_err(|_| gone())?;
        let owner = procfs::owner(id.pid).map_err(|_| gone())?;
        if st.start != id.start || st.state == 'Z' || owner != uid {
            return Err(gone());
        }
        procfs::pidfd_signal(&pidfd, 0).map_err(|_| gone())?;

        Ok(Child {
            pid: id.pid,
            pidfd: register(pidfd)?,
            origin: Origin::Adopted {
                uid,
                start: id.start,
            },
            status: None,
            gone: false,
            reaped: true,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_adopted(&self) -> bool {
        matches!(self.origin, Origin::Adopted { .. })
    }

    /// How it ended, if it did, without reaping it.
    fn peek(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() && self.origin == Origin::Own {
            self.status = peek_pidfd(self.pidfd.get_ref());
        }
        self.status
    }

    /// Wait until it exits. It is not reaped: its pid and group id stay ours.
    pub async fn exited(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.peek() {
            return Ok(st);
        }
        if self.gone {
            return Err(status_lost());
        }
        loop {
            // A pidfd turns readable when its process exits.
            let mut ready = self.pidfd.readable().await?;
            if let Origin::Adopted { start, .. } = self.origin {
                // Readiness alone is not proof: check the process itself.
                let alive =
                    procfs::stat(self.pid).is_ok_and(|s| s.start == start && s.state != 'Z');
                if !alive {
                    self.gone = true;
                    return Err(status_lost());
                }
                ready.clear_ready();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }

            match peek_pidfd(self.pidfd.get_ref()) {
                Some(st) => {
                    self.status = Some(st);
                    return Ok(st);
                }
                None => ready.clear_ready(),
            }
        }
    }

    /// Signal its whole process group.
    pub fn signal_group(&self, sig: Signal) {
        match self.origin {
            // Safe until it is reaped.
            Origin::Own if !self.reaped => {
                let _ = killpg(Pid::from_raw(self.pid), sig);
            }
            Origin::Own => {}
            Origin::Adopted { uid, start } => {
                let _ = procfs::pidfd_signal(self.pidfd.get_ref(), sig as i32);
                procfs::signal_group_if(self.pid, sig as i32, |st, owner| {
                    owner == uid && st.start >= start
                });
            }
        }
    }

    /// SIGKILL the process itself (not its group: a process that has not
    /// called setsid yet shares its maker's group).
    pub fn kill(&self) {
        let _ = procfs::pidfd_signal(self.pidfd.get_ref(), Signal::SIGKILL as i32);
    }

    /// Reap it (after `exited`): its pid may now be reused.
    pub fn reap(&mut self) {
        if !self.reaped && self.status.is_some() {
            let _ = waitpid(Pid::from_raw(self.pid), None);
            self.reaped = true;
        }
    }

    /// Leave it running for the next agent (a handover): nothing is
    /// signalled or reaped when this is dropped.
    pub fn release(mut self) {
        self.reaped = true;
        self.origin = Origin::Adopted { uid: 0, start: 0 };
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // Dropped without an orderly end (a task cancelled at shutdown):
        // nothing of its group may outlive it.
        self.signal_group(Signal::SIGKILL);
        if self.peek().is_some() {
            self.reap();
            return;
        }
        let pid = self.pid;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // SIGKILLed: it exits promptly; reap it off this path.
            rt.spawn_blocking(move || waitpid(Pid::from_raw(pid), None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_adopted_process_is_watched_and_signalled_by_identity() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let id = procfs::proc_id(pid).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        assert!(
            Child::adopt(
                ProcId {
                    pid,
                    start: id.start + 1
                },
                uid
            )
            .is_err(),
            "another start time"
        );
        let mut adopted = Child::adopt(id, uid).unwrap();
        assert!(adopted.is_adopted());
        adopted.signal_group(Signal::SIGTERM);
        let e = adopted.exited().await.unwrap_err();
        assert!(e.to_string().contains("status unknown"));
        c.wait().unwrap();
        assert!(Child::adopt(id, uid).is_err(), "gone");
    }
}
