//! A process the agent started itself, named so that its pid and process
//! group id cannot be reused under the agent's feet: it is watched through
//! a pidfd and reaped only after its group has had its last signal. An
//! unreaped process keeps its pid, so until then its group id cannot be
//! given to anybody else's group, and `killpg` is safe.

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;

/// A process the agent started (a direct child, leader of its own group).
pub struct Child {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    /// How it ended, once it did (it is not reaped yet).
    status: Option<ExitStatus>,
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

impl Child {
    pub fn new(c: std::process::Child) -> io::Result<Child> {
        let pid = c.id() as i32;
        // Nobody but us waits for our children: until we reap it, `pid`
        // names this process, even if it already exited.
        let pidfd = crate::procfs::pidfd_open(pid)?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and names
        // the same pidfd until the AsyncFd is dropped.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Child {
            pid,
            pidfd,
            status: None,
            reaped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How it ended, if it did, without reaping it.
    fn peek(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = peek_pidfd(self.pidfd.get_ref());
        }
        self.status
    }

    /// Wait until it exits. It is not reaped: its pid and group id stay ours.
    pub async fn exited(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.peek() {
            return Ok(st);
        }
        loop {
            // A pidfd turns readable when its process exits.
            let mut ready = self.pidfd.readable().await?;
            match peek_pidfd(self.pidfd.get_ref()) {
                Some(st) => {
                    self.status = Some(st);
                    return Ok(st);
                }
                None => ready.clear_ready(),
            }
        }
    }

    /// Signal its whole process group (safe until it is reaped).
    pub fn signal_group(&self, sig: Signal) {
        if !self.reaped {
            let _ = killpg(Pid::from_raw(self.pid), sig);
        }
    }

    /// Reap it (after `exited`): its pid may now be reused.
    pub fn reap(&mut self) {
        if !self.reaped && self.status.is_some() {
            let _ = waitpid(Pid::from_raw(self.pid), None);
            self.reaped = true;
        }
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
