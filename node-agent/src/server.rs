//! The agent's Unix socket: handshake, authentication by peer credentials,
//! and dispatch of requests.
//!
//! Who may do what:
//! * `Register` and `JobEnd`: root only (the plugin, inside slurmstepd).
//! * `Attach`: the job's own user, from a process of that job (a descendant
//!   of the job's slurmstepd).
//! * `Ping`: anybody. `Status`: anybody, for their own jobs (root: all).
//! * `Metrics`: root only.

use crate::dask_cmd::DaskSettings;
use crate::jobenv::JobEnv;
use crate::joblog::JobLog;
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::supervisor::{self, JobRun};
use crate::wire;
use dask_spank_common::messages::{Attach, Hello};
use dask_spank_common::{Request, Response, PROTOCOL_VERSION};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

/// Bound on every read of a request and on the handshake.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Agent {
    pub jobs: Jobs,
    pub settings: DaskSettings,
    pub metrics: Metrics,
    pub memwatch: Arc<crate::memwatch::MemWatch>,
}

pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent).await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn reply(s: &mut UnixStream, r: &Response) -> Result<(), String> {
    wire::write(s, r).await.map_err(|e| e.to_string())
}

async fn refuse(s: &mut UnixStream, msg: String) -> Result<(), String> {
    tracing::warn!("refused: {msg}");
    reply(
        s,
        &Response::Error {
            message: msg.clone(),
        },
    )
    .await?;
    Err(msg)
}

async fn handle(mut s: UnixStream, agent: Arc<Agent>) -> Result<(), String> {
    let cred = s.peer_cred().map_err(|e| e.to_string())?;
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    let hello: Hello = match tokio::time::timeout(REQUEST_TIMEOUT, wire::read(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            return refuse(
                &mut s,
                format!("bad handshake from uid {uid} pid {pid}: {e}"),
            )
            .await
        }
        Err(_) => return Err(format!("no handshake from uid {uid} pid {pid}")),
    };
    if hello.version != PROTOCOL_VERSION {
        return refuse(
            &mut s,
            format!(
                "protocol version {} is not supported (this agent speaks version {PROTOCOL_VERSION}); install matching dask-spank versions",
                hello.version
            ),
        )
        .await;
    }
    reply(
        &mut s,
        &Response::Welcome {
            version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let req: Request = match tokio::time::timeout(REQUEST_TIMEOUT, wire::read(&mut s)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return refuse(&mut s, format!("bad request from uid {uid} pid {pid}: {e}")).await
        }
        Err(_) => return Err(format!("no request from uid {uid} pid {pid}")),
    };
    match req {
        Request::Ping => reply(&mut s, &Response::Ok).await,
        Request::Status => {
            let jobs = agent.jobs.statuses(if uid == 0 { None } else { Some(uid) });
            reply(&mut s, &Response::Status { jobs }).await
        }
        Request::Metrics => {
            if uid != 0 {
                return refuse(
                    &mut s,
                    format!(
                        "uid {uid} (pid {pid}) may not read metrics over the socket: only root may"
                    ),
                )
                .await;
            }
            let text = agent.metrics.render(agent.jobs.len());
            reply(&mut s, &Response::Metrics { text }).await
        }
        Request::Register(spec) => {
            if uid != 0 {
                return refuse(
                    &mut s,
                    format!(
                        "uid {uid} (pid {pid}) may not register jobs: only root (slurmstepd) may"
                    ),
                )
                .await;
            }
            tracing::info!(job = spec.job_id, label = %spec.label(), user = %spec.user, role = %spec.role, cluster = %spec.cluster, "registered");
            agent.metrics.registrations.fetch_add(1, Relaxed);
            agent.jobs.register(*spec);
            reply(&mut s, &Response::Ok).await
        }
        Request::JobEnd { job_id, reason } => {
            if uid != 0 {
                return refuse(
                    &mut s,
                    format!("uid {uid} (pid {pid}) may not end jobs: only root (slurmstepd) may"),
                )
                .await;
            }
            let known = agent.jobs.end(job_id, &reason);
            tracing::info!(job = job_id, known, "job ended: {reason}");
            reply(&mut s, &Response::Ok).await
        }
        Request::Attach(a) => Box::pin(attach(s, agent, a, uid, pid)).await,
    }
}

async fn attach(
    mut s: UnixStream,
    agent: Arc<Agent>,
    mut a: Attach,
    uid: u32,
    pid: i32,
) -> Result<(), String> {
    let job_id = a.job_id;
    let (spec, stop) = match agent.jobs.attach(job_id, uid, pid) {
        Ok(x) => x,
        Err(e) => return refuse(&mut s, e.to_string()).await,
    };
    reply(&mut s, &Response::SendLogFd).await?;
    let fd = match tokio::time::timeout(REQUEST_TIMEOUT, wire::recv_fd(&s)).await {
        Ok(Ok(fd)) => fd,
        Ok(Err(e)) => {
            agent.jobs.stop(job_id, "attach failed");
            return refuse(
                &mut s,
                format!("job {job_id}: no log file descriptor received: {e}"),
            )
            .await;
        }
        Err(_) => {
            agent.jobs.stop(job_id, "attach failed");
            return refuse(
                &mut s,
                format!("job {job_id}: no log file descriptor received in time"),
            )
            .await;
        }
    };
    reply(&mut s, &Response::Attached).await?;
    let log = JobLog::new(fd, spec.label());
    log.line(&format!(
        "{} job {} of cluster '{}' on {} (user {}, {} cpus, {} MiB)",
        spec.role,
        spec.label(),
        spec.cluster,
        spec.node,
        spec.user,
        spec.cpus,
        spec.mem_mb
    ));
    let admitted = match if agent.settings.stub.is_some() {
        Ok(crate::admission::from_registration(&spec))
    } else {
        // Boxed: the admission's futures (scontrol, squeue) would
        // otherwise be part of this job's task for its whole life.
        Box::pin(crate::admission::admit(&spec)).await
    } {
        Ok(a) => a,
        Err(why) => {
            let reason =
                format!("refused by the site policy before any dask process started: {why}");
            log.line(&reason);
            agent.metrics.refused.fetch_add(1, Relaxed);
            agent.jobs.update(job_id, |st| {
                st.state = "refused".into();
                st.reason = Some(reason.clone());
            });
            let _ = reply(
                &mut s,
                &Response::Finished {
                    exit_code: 1,
                    reason,
                },
            )
            .await;
            return Ok(());
        }
    };
    let env = JobEnv::new(std::mem::take(&mut a.env), spec.env_prefix.as_deref());
    let run = JobRun {
        env,
        retire_at: supervisor::retire_at(admitted.remaining_s, spec.policy.nanny.lifetime_margin_s),
        mem_mb: if admitted.mem_mb > 0 {
            admitted.mem_mb
        } else {
            spec.mem_mb
        },
        cgroup_procs: crate::cgroup::job_cgroup_procs(pid),
        spec,
        attach: a,
        log,
        settings: agent.settings.clone(),
    };
    let mut task = tokio::spawn(supervisor::run(agent.clone(), run, stop));
    let mut byte = [0u8; 1];
    let outcome = tokio::select! {
        res = &mut task => res.map_err(|e| e.to_string())?,
        _ = s.read(&mut byte) => {
            // The job script (hence attach) is gone: scancel, walltime, or
            // the user killed it. Stop the dask processes.
            agent.jobs.stop(job_id, "the job script ended (cancelled, timed out or killed)");
            task.await.map_err(|e| e.to_string())?
        }
    };
    let _ = reply(
        &mut s,
        &Response::Finished {
            exit_code: outcome.exit_code,
            reason: outcome.reason,
        },
    )
    .await;
    Ok(())
}
