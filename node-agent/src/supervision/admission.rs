//! The authoritative policy check, done by the agent before it starts any
//! dask process: the node's policy (sent by the plugin from the node's
//! root-owned plugstack.conf) against what the job really got. A user who
//! submitted with a private plugstack.conf is caught here.
//!
//! Where each fact comes from (never from text or variables the user sets):
//! * uid, gid, cpus, memory: slurmstepd itself (the plugin's registration);
//! * partition, account, licences, tasks, nodes, time limit and time left,
//!   job name: slurmctld, in one `squeue` call (`slurm`).

use crate::spawning::spawn::Starter;
use crate::supervision::slurm::{self, ControllerFacts, FactsError};
use dask_spank_common::policy::{check_job, JobFacts};
use dask_spank_common::slurm_state::SlurmState;
use dask_spank_common::JobSpec;

/// What the agent needs to know about an admitted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Memory granted on this node, MiB (0: unknown).
    pub mem_mb: u64,
    /// Walltime left, seconds (None: unlimited).
    pub remaining_s: Option<u64>,
}

/// Why a job does not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refused by the site policy before any dask process started: {0}")]
    Policy(String),
    #[error("could not check the job with Slurm before starting dask (ask your site administrator if this persists): {0}")]
    Slurm(String),
}

impl From<FactsError> for Refusal {
    fn from(e: FactsError) -> Refusal {
        match e {
            FactsError::Name { .. } => Refusal::Policy(e.to_string()),
            FactsError::Slurm(s) => Refusal::Slurm(s),
        }
    }
}

/// Check the controller's facts and the registration against the policy.
pub fn decide(
    spec: &JobSpec,
    f: &ControllerFacts,
    primary_group: &str,
) -> Result<Admitted, Refusal> {
    if f.job_id != spec.job_id || f.uid != spec.uid {
        return Err(Refusal::Slurm(format!(
            "slurmctld describes job {} of uid {}, not job {} of uid {}",
            f.job_id, f.uid, spec.job_id, spec.uid
        )));
    }
    if SlurmState::parse(&f.state) != SlurmState::Running {
        return Err(Refusal::Slurm(format!(
            "slurmctld says job {} is {}, not RUNNING",
            spec.job_id, f.state
        )));
    }
    let facts = JobFacts {
        partition: f.partition.clone(),
        account: f.account.clone(),
        licenses: f.licenses.clone(),
        num_tasks: f.num_tasks,
        num_nodes: f.num_nodes,
        cpus: spec.cpus,
        mem_mb: spec.mem_mb,
        time_limit_s: f.time_limit_s,
        gres: f.gres.clone(),
    };
    check_job(
        spec.role,
        spec.pool.as_ref(),
        &facts,
        &spec.policy,
        primary_group,
    )
    .map_err(Refusal::Policy)?;
    Ok(Admitted {
        mem_mb: spec.mem_mb,
        remaining_s: f.time_left_s,
    })
}

/// `Ok` to start, `Err` with the reason to refuse.
pub async fn admit(via: &Starter, spec: &JobSpec) -> Result<Admitted, Refusal> {
    // The pool is in the name: a job whose name and `--dask-pool` disagree
    // (a private plugstack.conf) is refused, so the keeper and `status`
    // can take a job's pool from its name.
    let name = dask_spank_common::names::pool_job_name(
        spec.role,
        spec.cluster.as_str(),
        spec.pool.as_ref(),
    );
    let facts = slurm::job_facts(
        via,
        &spec.label(),
        &name,
        (spec.role.as_str(), spec.cluster.as_str()),
    )
    .await?;
    decide(spec, &facts, &dask_spank_common::sys::group_name(spec.gid))
}

/// Control-plane benchmarks only (`run --stub-command`): the facts the
/// plugin registered, without asking slurmctld about a job it never saw.
pub fn from_registration(spec: &JobSpec) -> Admitted {
    Admitted {
        mem_mb: spec.mem_mb,
        remaining_s: spec.time_limit_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        serde_json::from_str(include_str!("../../testdata/spec.json")).expect("spec")
        // ok: test
    }

    fn facts(s: &JobSpec) -> ControllerFacts {
        ControllerFacts {
            job_id: s.job_id,
            uid: s.uid,
            num_nodes: 1,
            num_tasks: 1,
            time_limit_s: Some(3600),
            time_left_s: Some(3000),
            state: "RUNNING".into(),
            partition: s.policy.role(s.role).partition.clone().unwrap_or_default(),
            licenses: s.policy.role(s.role).licenses.clone(),
            account: s.policy.expected_account("grp").unwrap_or_default(),
            gres: vec![],
        }
    }

    #[test]
    fn a_conforming_job_is_admitted_with_its_time_left() {
        let s = spec();
        let a = decide(&s, &facts(&s), "grp").unwrap();
        assert_eq!(a.remaining_s, Some(3000));
    }

    #[test]
    fn a_pools_gres_and_the_sites_pool_rules_are_checked() {
        let mut s = spec();
        s.role = dask_spank_common::Role::Worker;
        s.policy.pools.gres = dask_spank_common::pool_policy::Allowed::None;
        let mut f = facts(&s);
        f.partition = s.policy.worker.partition.clone().unwrap_or_default();
        f.licenses = s.policy.worker.licenses.clone();
        assert!(decide(&s, &f, "grp").is_ok());
        f.gres = dask_spank_common::pool_policy::parse_gres_list("gpu:1").unwrap();
        let e = decide(&s, &f, "grp").unwrap_err().to_string();
        assert!(e.ends_with("gres gpu:1 is not allowed: this site gives dask jobs no generic resources (gres=none)"), "{e}");
        s.policy.pools.gres = Default::default();
        s.policy.pools.pools = dask_spank_common::pool_policy::Allowed::None;
        s.pool = Some("gpu".parse().unwrap());
        let e = decide(&s, &f, "grp").unwrap_err().to_string();
        assert!(
            e.ends_with("--dask-pool=gpu is not allowed: worker_pools=none"),
            "{e}"
        );
    }

    #[test]
    fn another_job_or_user_or_state_is_a_slurm_error_and_violations_are_policy() {
        let s = spec();
        let mut f = facts(&s);
        f.uid += 1;
        assert!(matches!(decide(&s, &f, "grp"), Err(Refusal::Slurm(_))));
        let mut f = facts(&s);
        f.state = "COMPLETING".into();
        assert!(matches!(decide(&s, &f, "grp"), Err(Refusal::Slurm(_))));
        let mut f = facts(&s);
        f.time_limit_s = None;
        let e = decide(&s, &f, "grp").unwrap_err();
        assert!(matches!(e, Refusal::Policy(_)));
        assert!(
            e.to_string().starts_with("refused by the site policy"),
            "{e}"
        );
    }
}
