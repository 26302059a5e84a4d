//! Dask roles and cluster names.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a dask-spank job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Scheduler,
    Worker,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Scheduler, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
        }
    }
}

/// The Slurm job name of a cluster's jobs of one role,
/// `dask-<role>-<cluster>`: it identifies them in squeue and on the node.
/// The jobs of a worker pool other than the default one are named
/// `dask-worker-<cluster>@<pool>` (see [`pool_job_name`]).
pub fn job_name(role: Role, cluster: &str) -> String {
    format!("dask-{role}-{cluster}")
}

/// Separates a cluster from its pool in a job name: a cluster name never
/// holds it, so `dask-worker-a.b@gpu` reads one way only.
pub const POOL_SEPARATOR: char = '@';

/// The job name of a cluster's worker jobs of one pool. The pool is in the
/// job name, not in a free-text field (comment, environment), because the
/// name is structured data that the plugin sets at submit and the node
/// agent checks against the job's `--dask-pool` before any dask process
/// starts: the keeper, `status` and `ls` can trust it, and `squeue -n
/// dask-worker-ana@gpu` lists one pool. The default pool keeps the plain
/// name, so clusters without pools look as they always did.
pub fn pool_job_name(role: Role, cluster: &str, pool: Option<&PoolName>) -> String {
    match pool {
        Some(p) if role == Role::Worker => format!("dask-{role}-{cluster}{POOL_SEPARATOR}{p}"),
        _ => job_name(role, cluster),
    }
}

/// `1234_5` for an array task (array job id and task id), the job id
/// otherwise: the name of a job in logs, dask worker names and file names.
pub fn job_label(job_id: u32, array_job_id: Option<u32>, array_task_id: Option<u32>) -> String {
    match (array_job_id, array_task_id) {
        (Some(a), Some(t)) => format!("{a}_{t}"),
        _ => job_id.to_string(),
    }
}

/// The role, cluster and pool (None: the default pool) of a dask-spank
/// job name (`pool_job_name`'s inverse).
pub fn parse_pool_job_name(name: &str) -> Option<(Role, &str, Option<&str>)> {
    let (role, rest) = Role::ALL.iter().find_map(|r| {
        name.strip_prefix("dask-")?
            .strip_prefix(r.as_str())?
            .strip_prefix('-')
            .filter(|c| !c.is_empty())
            .map(|c| (*r, c))
    })?;
    match rest.split_once(POOL_SEPARATOR) {
        None => Some((role, rest, None)),
        Some((c, p)) if role == Role::Worker && !c.is_empty() && p.parse::<PoolName>().is_ok() => {
            Some((role, c, Some(p)))
        }
        Some(_) => None,
    }
}

/// The role and cluster of a dask-spank job name (`job_name`'s inverse;
/// a pool's workers are the cluster's too).
pub fn parse_job_name(name: &str) -> Option<(Role, &str)> {
    parse_pool_job_name(name).map(|(r, c, _)| (r, c))
}

/// Whether a Slurm job name is one that dask-spank gives its jobs.
pub fn is_job_name(name: &str) -> bool {
    parse_job_name(name).is_some()
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("--dask-role={0}: must be one of scheduler, worker")]
    BadRole(String),
    #[error("--dask-cluster={0}: {1}")]
    BadCluster(String, &'static str),
    #[error("--dask-pool={0}: {1}")]
    BadPool(String, &'static str),
}

impl FromStr for Role {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scheduler" => Ok(Role::Scheduler),
            "worker" => Ok(Role::Worker),
            other => Err(NameError::BadRole(other.to_string())),
        }
    }
}

/// A validated cluster name: it becomes a directory name and part of job
/// names, so it is restricted to a portable, shell-safe charset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

pub const DEFAULT_CLUSTER: &str = "default";
pub const MAX_CLUSTER_LEN: usize = 64;

impl ClusterName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ClusterName {
    fn default() -> Self {
        ClusterName(DEFAULT_CLUSTER.to_string())
    }
}

impl FromStr for ClusterName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| Err(NameError::BadCluster(s.to_string(), why));
        if s.is_empty() {
            return bad("must not be empty");
        }
        if s.len() > MAX_CLUSTER_LEN {
            return bad("must be at most 64 characters");
        }
        if !s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
            return bad("must start with a letter or a digit");
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad("may only contain letters, digits, '-', '_' and '.'");
        }
        Ok(ClusterName(s.to_string()))
    }
}

impl TryFrom<String> for ClusterName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ClusterName> for String {
    fn from(c: ClusterName) -> String {
        c.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated worker pool name (`--dask-pool`): part of job names and a
/// directory name in the cluster's directory. `default` is the default
/// pool (today's workers), which has no name of its own, so it is not a
/// `PoolName`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "String", into = "String")]
pub struct PoolName(String);

pub const DEFAULT_POOL: &str = "default";
pub const MAX_POOL_LEN: usize = 32;

impl PoolName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `None` for `default` (the default pool), else the validated name.
    pub fn parse_opt(s: &str) -> Result<Option<PoolName>, NameError> {
        if s == DEFAULT_POOL {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }
}

impl FromStr for PoolName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| Err(NameError::BadPool(s.to_string(), why));
        if s.is_empty() {
            return bad("must not be empty");
        }
        if s.len() > MAX_POOL_LEN {
            return bad("must be at most 32 characters");
        }
        if !s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
            return bad("must start with a letter");
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("may only contain letters, digits, '-' and '_'");
        }
        if s == DEFAULT_POOL {
            return bad("is the default pool: leave --dask-pool out");
        }
        Ok(PoolName(s.to_string()))
    }
}

impl TryFrom<String> for PoolName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PoolName> for String {
    fn from(p: PoolName) -> String {
        p.0
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_name_role_and_cluster() {
        assert_eq!(job_name(Role::Worker, "ana"), "dask-worker-ana");
        assert!(is_job_name("dask-scheduler-ana") && is_job_name("dask-worker-x"));
        assert!(!is_job_name("interactive") && !is_job_name("dask-other-x"));
        assert_eq!(
            parse_job_name("dask-worker-a-b"),
            Some((Role::Worker, "a-b"))
        );
        assert_eq!(
            parse_job_name("dask-scheduler-ana"),
            Some((Role::Scheduler, "ana"))
        );
        assert_eq!(parse_job_name("dask-worker-"), None);
    }

    #[test]
    fn pool_job_names_name_role_cluster_and_pool() {
        let gpu: PoolName = "gpu".parse().unwrap();
        assert_eq!(
            pool_job_name(Role::Worker, "a.b", Some(&gpu)),
            "dask-worker-a.b@gpu"
        );
        assert_eq!(pool_job_name(Role::Worker, "ana", None), "dask-worker-ana");
        // A scheduler belongs to no pool.
        assert_eq!(
            pool_job_name(Role::Scheduler, "ana", Some(&gpu)),
            "dask-scheduler-ana"
        );
        assert_eq!(
            parse_pool_job_name("dask-worker-a.b@gpu"),
            Some((Role::Worker, "a.b", Some("gpu")))
        );
        assert_eq!(
            parse_pool_job_name("dask-worker-ana"),
            Some((Role::Worker, "ana", None))
        );
        assert_eq!(
            parse_job_name("dask-worker-ana@gpu"),
            Some((Role::Worker, "ana"))
        );
        for bad in [
            "dask-worker-ana@",
            "dask-worker-@gpu",
            "dask-worker-ana@g/u",
            "dask-scheduler-ana@gpu",
            "dask-worker-ana@gpu@x",
            "dask-worker-ana@default",
        ] {
            assert_eq!(parse_pool_job_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn pool_names() {
        for ok in ["gpu", "high-mem", "a_1"] {
            assert!(ok.parse::<PoolName>().is_ok(), "{ok}");
        }
        let cases = [
            ("", "--dask-pool=: must not be empty"),
            ("1gpu", "--dask-pool=1gpu: must start with a letter"),
            (
                "g.pu",
                "--dask-pool=g.pu: may only contain letters, digits, '-' and '_'",
            ),
            (
                "g@x",
                "--dask-pool=g@x: may only contain letters, digits, '-' and '_'",
            ),
            (
                "default",
                "--dask-pool=default: is the default pool: leave --dask-pool out",
            ),
        ];
        for (bad, want) in cases {
            assert_eq!(bad.parse::<PoolName>().unwrap_err().to_string(), want);
        }
        assert!("x".repeat(33).parse::<PoolName>().is_err());
        assert_eq!(PoolName::parse_opt("default"), Ok(None));
        assert_eq!(PoolName::parse_opt("gpu").unwrap().unwrap().as_str(), "gpu");
        let r: Result<PoolName, _> = serde_json::from_str("\"../x\"");
        assert!(r.is_err());
    }

    #[test]
    fn roles_parse_and_reject_with_the_allowed_values() {
        assert_eq!("worker".parse::<Role>(), Ok(Role::Worker));
        assert_eq!("scheduler".parse::<Role>(), Ok(Role::Scheduler));
        let e = "bogus".parse::<Role>().unwrap_err().to_string();
        assert_eq!(e, "--dask-role=bogus: must be one of scheduler, worker");
        assert!("Worker".parse::<Role>().is_err());
    }

    #[test]
    fn cluster_names() {
        for ok in ["ana", "a", "my-cluster_2.x", "0abc"] {
            assert!(ok.parse::<ClusterName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a/b",
            "a b",
            "../x",
            "é",
            &"x".repeat(65),
        ] {
            let e = bad.parse::<ClusterName>().unwrap_err().to_string();
            assert!(e.starts_with("--dask-cluster="), "{e}");
        }
        assert_eq!(ClusterName::default().as_str(), "default");
    }

    #[test]
    fn cluster_name_is_validated_when_deserialized() {
        let r: Result<ClusterName, _> = serde_json::from_str("\"../etc\"");
        assert!(r.is_err());
    }
}
