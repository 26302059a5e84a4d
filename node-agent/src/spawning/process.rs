//! The dask process of one start and how it ends: waiting for it,
//! signalling its process group, stopping it (SIGTERM, grace, SIGKILL) and
//! cleaning up after it.
//!
//! Process groups are named by something that cannot be reused:
//! * a process the agent started itself is a [`Child`]: its group is
//!   signalled with `killpg` only until it is reaped;
//! * a worker forked by a job's fork server is reaped by the server (user
//!   code). Its group is signalled member by member through
//!   `procfs::signal_group_if`, and only members of the server's session
//!   (the server is the agent's unreaped child) owned by the job's user.

use crate::spawning::child::Child;
use crate::spawning::forkserver::ForkServer;
use crate::spawning::joblog::JobLog;
use crate::system::procfs::{self, ProcId};
use nix::sys::signal::Signal;
use std::future::Future;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

/// The running dask process of one start: a child of the agent, or a
/// worker forked by the job's fork server.
pub enum Proc<'a> {
    Exec(Child),
    Forked {
        id: ProcId,
        uid: u32,
        server: &'a mut ForkServer,
    },
}

impl Proc<'_> {
    pub fn pid(&self) -> i32 {
        match self {
            Proc::Exec(c) => c.pid(),
            Proc::Forked { id, .. } => id.pid,
        }
    }

    /// The processes whose memory is this start's: the worker, and the
    /// fork server it shares the job's memory with.
    pub fn job_pids(&self) -> Vec<i32> {
        match self {
            Proc::Exec(c) => vec![c.pid()],
            Proc::Forked { id, server, .. } => vec![id.pid, server.pid()],
        }
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Proc::Exec(c) => c.exited().await,
            Proc::Forked { id, server, .. } => {
                let id = *id;
                // The server reports how its worker ended; one that does not
                // (it runs user code) is not waited for forever.
                tokio::select! {
                    st = server.wait(id.pid) => st,
                    _ = gone_for(id, Duration::from_secs(2)) => Err(io::Error::other(format!(
                        "worker pid {} is gone and the fork server did not report how it ended", id.pid
                    ))),
                }
            }
        }
    }

    /// Signal the process group of this start.
    pub fn signal_group(&self, sig: Signal) {
        match self {
            Proc::Exec(c) => c.signal_group(sig),
            Proc::Forked { id, uid, server } => {
                let (session, uid) = (server.pid(), *uid);
                procfs::signal_group_if(id.pid, sig as i32, |st, owner| {
                    st.session == session && owner == uid
                });
            }
        }
    }

    /// After its leader exited: give what is left of its group a moment
    /// after SIGTERM, kill the rest, and reap the leader.
    ///
    /// The first look may be a shared one up to 100 ms old (see
    /// `group_members`): a member it misses gets no grace, only the SIGKILL
    /// that every group gets at the end (safe: the leader is not reaped
    /// yet, so its group id cannot name anybody else's processes). The
    /// looks that decide on waiting and on the log line are fresh.
    pub async fn clean_up(mut self, log: &JobLog) {
        let pid = self.pid();
        let fresh = Duration::ZERO;
        if procfs::group_members(pid, pid, Duration::from_millis(100)) > 0 {
            self.signal_group(Signal::SIGTERM);
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if procfs::group_members(pid, pid, fresh) == 0 {
                    break;
                }
            }
            if procfs::group_members(pid, pid, fresh) > 0 {
                log.line(&format!(
                    "processes left in group {pid} after its leader exited: SIGKILL"
                ));
            }
        }
        self.signal_group(Signal::SIGKILL);
        if let Proc::Exec(c) = &mut self {
            c.reap();
        }
    }

    /// Stop it: SIGTERM to its group, SIGKILL after `grace` or as soon as
    /// `hurry` resolves (with the reason), then clean up.
    pub async fn stop(
        mut self,
        grace: Duration,
        hurry: impl Future<Output = String>,
        log: &JobLog,
    ) {
        let pid = self.pid();
        self.signal_group(Signal::SIGTERM);
        let why = tokio::select! {
            r = tokio::time::timeout(grace, self.wait()) => r.err().map(|_| format!("still running {}s", grace.as_secs())),
            why = hurry => Some(why),
        };
        if let Some(why) = why {
            log.line(&format!(
                "process group {pid} {why} after SIGTERM: sending SIGKILL"
            ));
            self.signal_group(Signal::SIGKILL);
            let _ = tokio::time::timeout(grace, self.wait()).await;
        }
        self.clean_up(log).await;
    }
}

/// Resolves once the process `id` is gone (reaped), plus `grace`.
pub async fn gone_for(id: ProcId, grace: Duration) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let zombie = procfs::stat(id.pid).is_ok_and(|s| s.start == id.start && s.state == 'Z');
        if zombie || !procfs::exists(id) {
            tokio::time::sleep(grace).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Child {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", script]);
        // SAFETY: setsid in the forked child, as spawn does.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid().map(|_| ()).map_err(io::Error::from)
            });
        }
        Child::new(cmd.spawn().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn exit_is_seen_without_reaping_then_the_group_is_killed() {
        // The leader leaves a member behind in its group.
        let mut c = sh("sleep 30 & echo $! > /dev/null; exit 3");
        let st = c.exited().await.unwrap();
        assert_eq!(st.code(), Some(3));
        let pid = c.pid();
        // Not reaped: still a zombie with its pid.
        assert_eq!(procfs::stat(pid).unwrap().state, 'Z');
        assert_eq!(procfs::group_members(pid, pid, Duration::ZERO), 1);
        let log = JobLog::discard();
        Proc::Exec(c).clean_up(&log).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(procfs::group_members(pid, pid, Duration::ZERO), 0);
        assert!(procfs::stat(pid).is_err(), "reaped");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm() {
        let c = sh("trap '' TERM; sleep 30 & wait");
        let pid = c.pid();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = JobLog::discard();
        let t0 = std::time::Instant::now();
        Proc::Exec(c)
            .stop(Duration::from_millis(300), std::future::pending(), &log)
            .await;
        assert!(t0.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(procfs::group_members(pid, 0, Duration::ZERO), 0);
    }
}
