//! The `Attach` request: the job's own `dask-spank attach` (as the user,
//! inside the job) hands the job over. In order:
//!   1. the job's rule: its user, from a process of the job (`Jobs::attach`);
//!   2. what the agent takes from the attaching process itself, never from
//!      the message: the job's cgroups and resource limits (a pidfd proves
//!      they were read from that very process);
//!   3. the job's log descriptor, which must be a file;
//!   4. the site policy against what Slurm granted (`admission`);
//!   5. the supervisor runs while this connection relays the scheduler
//!      addresses the job reports; the connection's end (the job script is
//!      gone: scancel, walltime) stops the job's processes.

use crate::socket::access::Peer;
use crate::socket::conn::{refuse, reply, MAX_REQUEST, OPEN_TIMEOUT, WRITE_TIMEOUT};
use crate::socket::connlimit::Permit;
use crate::spawning::jobenv::JobEnv;
use crate::spawning::joblog::JobLog;
use crate::supervision::admission::{self, Admitted, Refusal};
use crate::supervision::agent::Agent;
use crate::supervision::jobs::JobHandle;
use crate::supervision::jobs::StopRx;
use crate::supervision::supervisor::{self, Adoption, Context, JobRun, Notice, Outcome};
use crate::system::rlimits::{self, Rlimit};
use crate::system::userio;
use crate::system::wire::UserConn;
use crate::{system::cgroup, system::fdcheck, system::procfs, system::wire};
use dask_spank_common::messages::Attach;
use dask_spank_common::{JobSpec, JobState, Response, SessionRequest};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::sync::watch;

/// Longest scheduler address accepted from a job.
const MAX_ADDRESS: usize = 256;

/// What the agent reads from the attaching process itself.
struct Captured {
    cgroups: Vec<PathBuf>,
    rlimits: Vec<Rlimit>,
}

/// The job's cgroups and limits, read from the attaching process, which
/// `pidfd` names: if it is still alive after the reads, they were its own
/// (its pid cannot have been reused meanwhile).
fn capture(pidfd: &std::os::fd::OwnedFd, peer: &Peer) -> Result<Captured, String> {
    let cgroups = cgroup::job_cgroups(peer.pid)?;
    let rlimits = rlimits::of_process(peer.pid)
        .map_err(|e| format!("cannot read the resource limits of pid {}: {e}", peer.pid))?;
    procfs::pidfd_signal(pidfd, 0)
        .map_err(|_| format!("the attaching process (pid {}) is gone", peer.pid))?;
    Ok(Captured { cgroups, rlimits })
}

/// How long the type of a job's log file may take to read (from memory;
/// see `fdcheck::file_type`).
const LOG_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The job's log descriptor, passed with SCM_RIGHTS after `SendLogFd` by
/// `peer`: refused on a file system a user's daemon serves, or unless it
/// is a file (see `fdcheck`). Held as a `UserFd` from the moment it
/// arrives: even a refused one is closed off the event loop.
async fn receive_log(s: &mut UnixStream, spec: &JobSpec, peer: &Peer) -> Result<JobLog, String> {
    reply(s, &Response::SendLogFd).await?;
    let fd = match tokio::time::timeout(OPEN_TIMEOUT, wire::recv_fd(s, spec.uid)).await {
        Ok(Ok(fd)) => fd,
        Ok(Err(e)) => {
            return Err(format!(
                "job {}: no log file descriptor received: {e}",
                spec.job_id
            ))
        }
        Err(_) => {
            return Err(format!(
                "job {}: no log file descriptor received in time",
                spec.job_id
            ))
        }
    };
    let job = |e: String| format!("job {}: {e}", spec.job_id);
    let Some(raw) = fd.borrow() else {
        return Err(job("no log file descriptor".into()));
    };
    let link = fdcheck::link(raw);
    fdcheck::check_log(raw, peer.pid).map_err(job)?;
    let probe = fd.clone();
    let kind = userio::call(spec.uid, LOG_CHECK_TIMEOUT, move || {
        probe.borrow().map(fdcheck::file_type)
    })
    .await;
    match kind {
        Some(Some(Ok(kind))) => fdcheck::judge_type(&link, kind).map_err(job)?,
        Some(_) => {
            return Err(job(format!(
                "cannot read the type of the job's output {link}"
            )))
        }
        None => {
            return Err(job(format!(
                "the job's output {link} did not answer within {}s: its file system hangs",
                LOG_CHECK_TIMEOUT.as_secs()
            )))
        }
    }
    Ok(JobLog::new(fd, spec.label()))
}

/// A scheduler address as dask writes it, of a sane length.
fn valid_address(a: &str) -> bool {
    a.len() <= MAX_ADDRESS
        && (a.starts_with("tcp://") || a.starts_with("tls://"))
        && a.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !a.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub async fn run(
    s: UserConn,
    agent: Arc<Agent>,
    a: Attach,
    peer: Peer,
    permit: Permit,
) -> Result<(), String> {
    // What comes before supervision is boxed, and gone once it is done:
    // its futures (the checks, the descriptors, the admission) would
    // otherwise stay part of this connection's task for the job's whole
    // life, and an agent holds thousands of jobs that spend it in `relay`.
    let (s, supervised) = match Box::pin(accept(s, &agent, a, peer, permit)).await? {
        Some((s, accepted)) => (s, start_supervisor(&agent, accepted)),
        None => return Ok(()),
    };
    relay(s, agent, supervised).await
}

/// Everything up to the supervisor's start: `None` when the attach was
/// refused (and told so).
async fn accept(
    mut s: UserConn,
    agent: &Arc<Agent>,
    a: Attach,
    peer: Peer,
    permit: Permit,
) -> Result<Option<(UserConn, Accepted)>, String> {
    let Ok(pidfd) = procfs::pidfd_open(peer.pid) else {
        refuse(
            &mut s,
            format!("the attaching process (pid {}) is gone", peer.pid),
        )
        .await?;
        return Ok(None);
    };
    let (spec, job, stop, running) = match agent.jobs.attach(a.job_id, peer.uid, peer.pid) {
        Ok(x) => x,
        Err(e) => {
            refuse(&mut s, e.to_string()).await?;
            return Ok(None);
        }
    };
    // From here on the connection is the job's, bounded by Slurm's jobs.
    drop(permit);
    let prepared = match capture(&pidfd, &peer) {
        Ok(c) => receive_fds(&mut s, &spec, &peer, a.forkserver_fd)
            .await
            .map(|fds| (c, fds)),
        Err(e) => Err(format!("job {}: {e}", spec.job_id)),
    };
    let (captured, (log, forkserver_fd)) = match prepared {
        Ok(x) => x,
        Err(e) => {
            job.finished(JobState::Failed, &e);
            agent.jobs.stop(spec.job_id, "attach failed");
            refuse(&mut s, e).await?;
            return Ok(None);
        }
    };
    reply(&mut s, &Response::Attached).await?;
    log_attached(&log, &spec, a.reattach);
    let admitted = if agent.settings.stub.is_some() {
        Ok(admission::from_registration(&spec))
    } else {
        admission::admit(&agent.starter, &spec).await
    };
    match admitted {
        Ok(admitted) => {
            let adopt = running.map(|running| Adoption {
                running,
                forkserver_fd,
            });
            Ok(Some((
                s,
                Accepted {
                    a,
                    spec,
                    job,
                    stop,
                    captured,
                    log,
                    admitted,
                    adopt,
                },
            )))
        }
        Err(refusal) => {
            refused(s, agent, &job, &log, refusal).await?;
            Ok(None)
        }
    }
}

/// The job log's first line from the agent.
fn log_attached(log: &JobLog, spec: &JobSpec, reattach: bool) {
    let again = if reattach {
        " (attached again after an agent restart)"
    } else {
        ""
    };
    log.line(&format!(
        "{} job {} of cluster '{}' on {} (user {}, {} cpus, {} MiB){again}",
        spec.role,
        spec.label(),
        spec.cluster,
        spec.node,
        spec.user,
        spec.cpus,
        spec.mem_mb
    ));
}

/// The job's log, and on reattach the fork server's control socket.
async fn receive_fds(
    s: &mut UnixStream,
    spec: &JobSpec,
    peer: &Peer,
    forkserver: bool,
) -> Result<(JobLog, Option<OwnedFd>), String> {
    let log = receive_log(s, spec, peer).await?;
    if !forkserver {
        return Ok((log, None));
    }
    match tokio::time::timeout(OPEN_TIMEOUT, wire::recv_fd(s, spec.uid)).await {
        // A socket costs nothing to use or close; anything else stays the
        // user's and is closed off the event loop.
        Ok(Ok(fd)) => match fd.into_socket() {
            Some(sock) => Ok((log, Some(sock))),
            None => Err(format!(
                "job {}: the fork server's descriptor passed back is not a socket",
                spec.job_id
            )),
        },
        _ => Err(format!(
            "job {}: the fork server's socket was announced but not passed",
            spec.job_id
        )),
    }
}

async fn refused(
    mut s: UserConn,
    agent: &Agent,
    job: &JobHandle,
    log: &JobLog,
    refusal: Refusal,
) -> Result<(), String> {
    let reason = refusal.to_string();
    log.line(&reason);
    if matches!(refusal, Refusal::Policy(_)) {
        agent.metrics.refused.fetch_add(1, Relaxed);
    }
    job.finished(JobState::Refused, &reason);
    let _ = reply(
        &mut s,
        &Response::Finished {
            exit_code: 1,
            reason,
        },
    )
    .await;
    Ok(())
}

/// Everything about an attach the agent accepted.
struct Accepted {
    a: Attach,
    spec: JobSpec,
    job: JobHandle,
    stop: StopRx,
    captured: Captured,
    log: JobLog,
    admitted: Admitted,
    adopt: Option<Adoption>,
}

/// What the connection relays between the job's attach process and its
/// supervisor, once that runs.
struct Supervised {
    job_id: u32,
    task: tokio::task::JoinHandle<Outcome>,
    scheduler: watch::Sender<Option<String>>,
    notices: mpsc::UnboundedReceiver<Notice>,
}

/// Start the job's supervisor (its own task).
fn start_supervisor(agent: &Agent, acc: Accepted) -> Supervised {
    let job_id = acc.spec.job_id;
    let (scheduler, addr_rx) = watch::channel(None);
    let (notify, notices) = mpsc::unbounded_channel();
    let nanny = &acc.spec.policy.nanny;
    // Boxed: a task holds its future's arguments for its whole life, and
    // the job's run is the largest of them.
    let run = Box::new(JobRun {
        env: JobEnv::new(acc.a.env, acc.spec.env_prefix.as_deref()),
        cwd: acc.a.cwd,
        cluster_dir: acc.a.cluster_dir,
        retire_at: supervisor::retire_at(acc.admitted.remaining_s, nanny.lifetime_margin_s),
        mem_mb: if acc.admitted.mem_mb > 0 {
            acc.admitted.mem_mb
        } else {
            acc.spec.mem_mb
        },
        cgroups: acc.captured.cgroups,
        rlimits: acc.captured.rlimits,
        adopt: acc.adopt,
        spec: acc.spec,
        log: acc.log,
        settings: agent.settings.clone(),
    });
    let ctx = Context {
        job: acc.job,
        metrics: agent.metrics.clone(),
        memwatch: agent.memwatch.clone(),
        scheduler: addr_rx,
        notify,
        starter: agent.starter.clone(),
    };
    Supervised {
        job_id,
        task: agent.tasks.spawn(supervisor::run(ctx, run, acc.stop)),
        scheduler,
        notices,
    }
}

/// For the job's life: the scheduler addresses its attach process reports
/// go to the supervisor, the supervisor's notices to the attach process;
/// the connection's end stops the job. Then the job's outcome, told.
async fn relay(mut s: UserConn, agent: Arc<Agent>, mut sup: Supervised) -> Result<(), String> {
    let mut open = true;
    // Keeps a frame read in part while a notice is told (cancel safe).
    let mut frames = wire::FrameReader::new(s.uid());
    let outcome = loop {
        tokio::select! {
            res = &mut sup.task => break res.unwrap_or_else(|e| Outcome { exit_code: 1, reason: format!("the supervisor failed: {e}") }),
            Some(n) = sup.notices.recv(), if open => {
                if let Err(e) = Box::pin(tell(&mut s, n)).await {
                    tracing::debug!(job = sup.job_id, "cannot tell the job's attach process: {e}");
                }
            }
            msg = frames.next::<SessionRequest>(&s, MAX_REQUEST), if open => match msg {
                Ok(SessionRequest::SchedulerAddress { address }) if valid_address(&address) => {
                    sup.scheduler.send_replace(Some(address));
                }
                other => {
                    // The job script (hence attach) is gone: scancel,
                    // walltime, or the user killed it; or it talks nonsense.
                    open = false;
                    let why = match other {
                        Err(dask_spank_common::frame::FrameError::Closed) => "the job script ended (cancelled, timed out or killed)".to_string(),
                        Err(e) => format!("the job's attach connection broke: {e}"),
                        Ok(_) => "the job's attach process sent an invalid message".to_string(),
                    };
                    agent.jobs.stop(sup.job_id, &why);
                }
            },
        }
    };
    let _ = Box::pin(reply(
        &mut s,
        &Response::Finished {
            exit_code: outcome.exit_code,
            reason: outcome.reason,
        },
    ))
    .await;
    Ok(())
}

/// Pass a supervisor's notice to the job's attach process.
async fn tell(s: &mut UnixStream, n: Notice) -> Result<(), String> {
    match n {
        Notice::Processes(groups) => reply(s, &Response::Processes { groups }).await,
        Notice::HoldFd(fd) => {
            reply(s, &Response::HoldFd).await?;
            tokio::time::timeout(WRITE_TIMEOUT, wire::send_fd(s, &fd))
                .await
                .map_err(|_| "the attach process did not take the descriptor in time".to_string())?
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_addresses() {
        assert!(valid_address("tcp://127.0.0.1:40123"));
        assert!(valid_address("tls://n1.example.org:8786"));
        assert!(valid_address("tcp://[::1]:8786"));
        assert!(!valid_address("tcp://127.0.0.1"));
        assert!(!valid_address("http://x:80"));
        assert!(!valid_address("tcp://a b:80"));
        assert!(!valid_address(&format!("tcp://{}:80", "x".repeat(300))));
    }
}
