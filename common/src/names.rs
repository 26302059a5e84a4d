//! Dask roles and cluster names.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a dask-spank job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
pub fn job_name(role: Role, cluster: &str) -> String {
    format!("dask-{role}-{cluster}")
}

/// `1234_5` for an array task (array job id and task id), the job id
/// otherwise: the name of a job in logs, dask worker names and file names.
pub fn job_label(job_id: u32, array_job_id: Option<u32>, array_task_id: Option<u32>) -> String {
    match (array_job_id, array_task_id) {
        (Some(a), Some(t)) => format!("{a}_{t}"),
        _ => job_id.to_string(),
    }
}

/// Whether a Slurm job name is one that dask-spank gives its jobs.
pub fn is_job_name(name: &str) -> bool {
    Role::ALL
        .iter()
        .any(|r| name.starts_with(&format!("dask-{r}-")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_name_role_and_cluster() {
        assert_eq!(job_name(Role::Worker, "ana"), "dask-worker-ana");
        assert!(is_job_name("dask-scheduler-ana") && is_job_name("dask-worker-x"));
        assert!(!is_job_name("interactive") && !is_job_name("dask-other-x"));
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
