//! The authoritative policy check, done by the agent before it starts any
//! dask process: the node's policy (sent by the plugin from the node's
//! root-owned plugstack.conf) against what slurmctld granted the job. A
//! user who submitted with a private plugstack.conf is caught here.

use crate::slurm;
use dask_spank_common::policy::check_job;
use dask_spank_common::units::parse_time_s;
use dask_spank_common::{JobSpec, Role};

/// What the agent needs to know about an admitted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Memory granted on this node, MiB.
    pub mem_mb: u64,
    /// Walltime left, seconds (None: unlimited).
    pub remaining_s: Option<u64>,
}

/// `Ok` to start, `Err(reason)` to refuse.
pub async fn admit(spec: &JobSpec) -> Result<Admitted, String> {
    let fields = slurm::show_job(spec.job_id).await?;
    let (facts, name) = slurm::facts(&fields)?;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(spec.gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| spec.gid.to_string());
    check_job(spec.role, &facts, &spec.policy, &group)?;
    // The job name identifies a cluster's jobs in squeue (and below).
    let want = dask_spank_common::names::job_name(spec.role, spec.cluster.as_str());
    if name != want {
        return Err(format!(
            "job name {name} is not allowed: dask-spank jobs of cluster {} are named {want}",
            spec.cluster
        ));
    }
    if spec.role == Role::Worker {
        let max = spec.policy.max_worker_jobs as usize;
        let running = slurm::running_jobs_named(&spec.user, &want).await?;
        if running > max {
            return Err(format!(
                "max_worker_jobs={max} reached: {} other worker jobs of cluster {} are running",
                running - 1,
                spec.cluster
            ));
        }
    }
    let run_s = fields
        .get("RunTime")
        .and_then(|r| parse_time_s(r).flatten())
        .unwrap_or(0);
    Ok(Admitted {
        mem_mb: facts.mem_mb,
        remaining_s: facts.time_limit_s.map(|t| t.saturating_sub(run_s)),
    })
}

/// Control-plane benchmarks only (`run --stub-command`): the facts the
/// plugin registered, without asking slurmctld about a job it never saw.
pub fn from_registration(spec: &JobSpec) -> Admitted {
    Admitted {
        mem_mb: spec.mem_mb,
        remaining_s: spec.time_limit_s,
    }
}
