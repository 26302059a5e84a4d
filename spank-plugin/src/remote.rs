//! Remote context: slurmstepd on the compute node. Registers the job with
//! the node agent and tells it when the job ends.
//!
//! Errors here cannot be shown to the user from init_post_opt, so they are
//! kept and printed from `task_init`, which runs in the batch task with its
//! stdout/stderr already connected to the job's log file, and which then
//! fails the task.

use crate::options::DaskOptions;
use crate::user_error;
use dask_spank_common::client::{Client, ClientError};
use dask_spank_common::config::Config;
use dask_spank_common::paths::{agent_socket, vars};
use dask_spank_common::{JobSpec, Request, Response};
use slurm_spank::SpankHandle;
use std::error::Error;
use std::path::PathBuf;

/// Step id of a batch script (SLURM_BATCH_SCRIPT in slurm.h).
const BATCH_STEP: u32 = 0xffff_fffb;
/// "No value" markers Slurm uses for unset array ids.
const NO_VAL: u32 = 0xffff_fffe;

#[derive(Default)]
pub struct RemoteState {
    /// A failure to report to the user from the task.
    error: Option<String>,
    /// Set once the agent accepted the job: (job id, socket, timeout).
    registered: Option<(u32, PathBuf, std::time::Duration)>,
}

fn build_spec(
    spank: &SpankHandle,
    opts: &DaskOptions,
    cfg: &Config,
) -> Result<JobSpec, Box<dyn Error>> {
    let job_id = spank.job_id()?;
    let uid = spank.job_uid()?;
    let array_id = spank.job_array_id().unwrap_or(0);
    let task_id = spank.job_array_task_id().unwrap_or(NO_VAL);
    let (array_job_id, array_task_id) = if array_id != 0 && task_id != NO_VAL && task_id != u32::MAX
    {
        (Some(array_id), Some(task_id))
    } else {
        (None, None)
    };
    // From the uid: SLURM_JOB_USER is in the job's environment, which the
    // submitter controls.
    let user = dask_spank_common::sys::user_name(uid);
    let submit_dir = match spank.getenv("SLURM_SUBMIT_DIR") {
        Ok(Some(d)) if d.starts_with('/') => PathBuf::from(d),
        _ => PathBuf::from("/"),
    };
    Ok(JobSpec {
        job_id,
        array_job_id,
        array_task_id,
        uid,
        gid: spank.job_gid()?,
        groups: spank.job_supplementary_gids().unwrap_or_default(),
        user,
        role: opts.role,
        cluster: opts.cluster.clone(),
        env_prefix: opts.env.clone(),
        cpus: u32::from(spank.job_ncpus().unwrap_or(1)).max(1),
        mem_mb: spank.job_alloc_mem().unwrap_or(0),
        time_limit_s: None,
        submit_dir,
        // slurmstepd's own environment, never the job's (the user's).
        node: dask_spank_common::sys::slurm_node_name(),
        stepd_pid: std::process::id() as i32,
        policy: cfg.policy.clone(),
        pool: opts.pool.clone(),
    })
}

impl RemoteState {
    pub fn start(
        &mut self,
        spank: &mut SpankHandle,
        cfg: Result<Config, Box<dyn Error>>,
        opts: &DaskOptions,
    ) {
        // Only the batch step runs dask; steps launched inside the job do not.
        if spank.job_stepid().ok() != Some(BATCH_STEP) {
            return;
        }
        if let Err(e) = self.try_start(spank, cfg, opts) {
            let msg = crate::told(e.as_ref());
            slurm_spank::spank_log_error!("{msg}");
            self.error = Some(msg);
        }
    }

    fn try_start(
        &mut self,
        spank: &mut SpankHandle,
        cfg: Result<Config, Box<dyn Error>>,
        opts: &DaskOptions,
    ) -> Result<(), Box<dyn Error>> {
        let cfg = cfg?;
        let spec = build_spec(spank, opts, &cfg)?;
        let socket = agent_socket(&cfg.agent_dir, &spec.node);
        let job_id = spec.job_id;
        let node = spec.node.clone();
        let agent_dir = cfg.agent_dir.clone();
        let no_socket = !socket.exists();
        let unavailable = |e: &dyn Error| {
            user_error(if no_socket {
                format!(
                    "no dask-spank node agent on {node}: {} does not exist (the agent is not running, or its --agent-dir is not agent_dir={}); the node's health check drains it; resubmit the job",
                    socket.display(),
                    agent_dir.display()
                )
            } else {
                format!(
                    "the dask-spank node agent on {node} does not answer ({e}); the node's health check drains it; resubmit the job"
                )
            })
        };
        let mut client =
            Client::connect(&socket, "spank", cfg.agent_timeout).map_err(|e| unavailable(&e))?;
        match client.call(&Request::Register(Box::new(spec))) {
            Ok(Response::Ok) => {}
            Ok(other) => {
                return Err(user_error(ClientError::unexpected(other).to_string()));
            }
            Err(e) => return Err(user_error(format!("node agent refused the job: {e}"))),
        }
        self.registered = Some((job_id, socket.clone(), cfg.agent_timeout));
        let env = [
            (vars::ROLE, opts.role.as_str().to_string()),
            (vars::CLUSTER, opts.cluster.to_string()),
            // Always set: a DASK_SPANK_POOL from the submitter's environment
            // must not move a default-pool job into a pool.
            (
                vars::POOL,
                opts.pool
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            ),
            (vars::AGENT_SOCKET, socket.to_string_lossy().into_owned()),
            (vars::TLS, cfg.policy.tls.as_str().to_string()),
            (
                vars::SUCCESSOR_LEAD,
                cfg.policy.nanny.successor_lead_s.to_string(),
            ),
            (
                vars::LIFETIME_MARGIN,
                cfg.policy.nanny.lifetime_margin_s.to_string(),
            ),
            (
                vars::AGENT_GRACE,
                cfg.agent_restart_grace.as_secs().to_string(),
            ),
        ];
        for (k, v) in env {
            spank.setenv(k, v, true)?;
        }
        if let Some(e) = &opts.env {
            spank.setenv(vars::ENV, e, true)?;
        }
        Ok(())
    }

    /// Called in the batch task (as the user, stdout = the job log).
    pub fn report_in_task(&self) -> Result<(), Box<dyn Error>> {
        match &self.error {
            None => Ok(()),
            Some(msg) => {
                eprintln!("{msg}");
                Err(user_error("job refused before any dask process started"))
            }
        }
    }

    /// The job step is over: make sure the agent stops everything it runs.
    pub fn finish(&mut self) {
        let Some((job_id, socket, timeout)) = self.registered.take() else {
            return;
        };
        let res = Client::connect(&socket, "spank", timeout).and_then(|mut c| {
            c.call(&Request::JobEnd {
                job_id,
                reason: "job step ended".into(),
            })
        });
        if let Err(e) = res {
            slurm_spank::spank_log_error!(
                "dask-spank: job {job_id}: could not tell the node agent that the job ended: {e}"
            );
        }
    }
}
