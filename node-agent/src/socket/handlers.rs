//! One function per control request (an attach is `attach`'s: it is not a
//! `Request`). The access rule
//! was checked before (`access`); each handler returns the reply, or the
//! one-line reason of a refusal.

use crate::socket::access::Peer;
use crate::supervision::agent::Agent;
use crate::system::procfs;
use dask_spank_common::{JobSpec, Request, Response};
use std::sync::atomic::Ordering::Relaxed;

pub fn handle(req: Request, peer: &Peer, agent: &Agent) -> Result<Response, String> {
    match req {
        Request::Ping => Ok(Response::Ok),
        Request::Status => Ok(status(peer, agent)),
        Request::Metrics => Ok(metrics(agent)),
        Request::Register(spec) => register(*spec, agent),
        Request::JobEnd { job_id, reason } => Ok(job_end(job_id, &reason, agent)),
        Request::StopJobs { reason } => {
            tracing::warn!(
                "stopping every job: {}",
                crate::spawning::joblog::escape(&reason)
            );
            agent.jobs.fail_all(&reason);
            Ok(Response::Ok)
        }
    }
}

/// Root sees every job, a user their own.
fn status(peer: &Peer, agent: &Agent) -> Response {
    let uid = (peer.uid != 0).then_some(peer.uid);
    Response::Status {
        jobs: agent.jobs.statuses(uid),
    }
}

fn metrics(agent: &Agent) -> Response {
    Response::Metrics {
        text: agent.metrics.render(agent.jobs.len()),
    }
}

/// A dask job's slurmstepd started on this node. Its user's name is looked
/// up here, from the uid: the job's environment is the user's to set.
fn register(mut spec: JobSpec, agent: &Agent) -> Result<Response, String> {
    let stepd = procfs::proc_id(spec.stepd_pid).map_err(|e| {
        format!(
            "job {}: slurmstepd pid {} is not running: {e}",
            spec.job_id, spec.stepd_pid
        )
    })?;
    spec.user = dask_spank_common::sys::user_name(spec.uid);
    tracing::info!(job = spec.job_id, label = %spec.label(), user = %spec.user, role = %spec.role, cluster = %spec.cluster, "registered");
    agent.metrics.registrations.fetch_add(1, Relaxed);
    agent.jobs.register(spec, stepd);
    Ok(Response::Ok)
}

fn job_end(job_id: u32, reason: &str, agent: &Agent) -> Response {
    let known = agent.jobs.end(job_id, reason);
    tracing::info!(
        job = job_id,
        known,
        "job ended: {}",
        crate::spawning::joblog::escape(reason)
    );
    Response::Ok
}
