//! The `--dask-*` options: registration and reading.

use crate::user_error;
use dask_spank_common::names::PoolName;
use dask_spank_common::{ClusterName, Role};
use slurm_spank::{SpankHandle, SpankOption};
use std::error::Error;
use std::path::PathBuf;

pub const ROLE: &str = "dask-role";
pub const CLUSTER: &str = "dask-cluster";
pub const ENV: &str = "dask-env";
pub const POOL: &str = "dask-pool";

pub fn register(spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
    let opts = [
        SpankOption::new(ROLE)
            .takes_value("scheduler|worker")
            .usage("[dask-spank] Run a Dask scheduler or worker in this job (no job script needed)"),
        SpankOption::new(CLUSTER)
            .takes_value("name")
            .usage("[dask-spank] Dask cluster this job belongs to (default: default)"),
        SpankOption::new(ENV)
            .takes_value("path")
            .usage("[dask-spank] venv or conda prefix whose python has distributed (default: python3 on PATH)"),
        SpankOption::new(POOL)
            .takes_value("name")
            .usage("[dask-spank] Worker pool of this worker job (default: the default pool)"),
    ];
    for o in opts {
        spank.register_option(o)?;
    }
    Ok(())
}

/// The validated values of the options for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaskOptions {
    pub role: Role,
    pub cluster: ClusterName,
    pub env: Option<PathBuf>,
    /// `--dask-pool` (None: the default pool).
    pub pool: Option<PoolName>,
}

impl DaskOptions {
    /// Parse raw option values. `Ok(None)` when `--dask-role` is absent and
    /// the job is none of ours.
    pub fn parse(
        role: Option<&str>,
        cluster: Option<&str>,
        env: Option<&str>,
        pool: Option<&str>,
    ) -> Result<Option<DaskOptions>, String> {
        let Some(role) = role else {
            if cluster.is_some() || env.is_some() || pool.is_some() {
                return Err(
                    "--dask-cluster, --dask-env and --dask-pool need --dask-role=scheduler|worker"
                        .into(),
                );
            }
            return Ok(None);
        };
        let role: Role = role.parse().map_err(|e| format!("{e}"))?;
        let cluster: ClusterName = match cluster {
            Some(c) => c.parse().map_err(|e| format!("{e}"))?,
            None => ClusterName::default(),
        };
        let env = match env {
            None => None,
            Some(e) if e.starts_with('/') => Some(PathBuf::from(e)),
            Some(e) => return Err(format!("--dask-env={e}: must be an absolute path")),
        };
        let pool = match pool {
            None => None,
            Some(p) => PoolName::parse_opt(p).map_err(|e| format!("{e}"))?,
        };
        if let (Role::Scheduler, Some(p)) = (role, &pool) {
            return Err(format!(
                "--dask-pool={p} is for worker jobs: a scheduler belongs to no pool"
            ));
        }
        Ok(Some(DaskOptions {
            role,
            cluster,
            env,
            pool,
        }))
    }

    pub fn read(spank: &SpankHandle) -> Result<Option<DaskOptions>, Box<dyn Error>> {
        let get = |name: &str| -> Result<Option<String>, Box<dyn Error>> {
            Ok(spank
                .get_option_value(name)
                .map_err(|e| user_error(format!("--{name}: {e}")))?
                .map(|v| v.into_owned()))
        };
        let (r, c, e, p) = (get(ROLE)?, get(CLUSTER)?, get(ENV)?, get(POOL)?);
        Self::parse(r.as_deref(), c.as_deref(), e.as_deref(), p.as_deref()).map_err(user_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_options() {
        assert_eq!(DaskOptions::parse(None, None, None, None), Ok(None));
        let o = DaskOptions::parse(Some("worker"), Some("ana"), Some("/opt/env"), None)
            .unwrap() // ok: test
            .unwrap(); // ok: test
        assert_eq!(o.role, Role::Worker);
        assert_eq!(o.cluster.as_str(), "ana");
        assert_eq!(o.env, Some(PathBuf::from("/opt/env")));
        assert_eq!(
            DaskOptions::parse(Some("bogus"), None, None, None),
            Err("--dask-role=bogus: must be one of scheduler, worker".into())
        );
        assert_eq!(
            DaskOptions::parse(Some("worker"), Some("a/b"), None, None),
            Err("--dask-cluster=a/b: may only contain letters, digits, '-', '_' and '.'".into())
        );
        assert_eq!(
            DaskOptions::parse(Some("worker"), None, Some("env"), None),
            Err("--dask-env=env: must be an absolute path".into())
        );
        assert!(DaskOptions::parse(None, Some("x"), None, None).is_err());
    }
}
