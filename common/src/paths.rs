//! Where things live: the agent's socket, per-user cluster directories,
//! scheduler files and job logs. One place, so that the plugin, the agent
//! and the CLI always agree.

use crate::names::{ClusterName, Role};
use std::path::{Path, PathBuf};

/// Default directory of the agent's socket and state (a tmpfs on real sites).
pub const DEFAULT_AGENT_DIR: &str = "/run/dask-spank";

/// Environment variables the plugin sets for the job's tasks.
pub mod vars {
    pub const ROLE: &str = "DASK_SPANK_ROLE";
    pub const CLUSTER: &str = "DASK_SPANK_CLUSTER";
    pub const ENV: &str = "DASK_SPANK_ENV";
    pub const AGENT_SOCKET: &str = "DASK_SPANK_AGENT_SOCKET";
    pub const LOG: &str = "DASK_SPANK_LOG";
    /// Overrides `$HOME/.dask-spank` as the root of per-user cluster state.
    pub const HOME: &str = "DASK_SPANK_HOME";
}

/// The agent's socket for `node`. Keyed by node name because several slurmd
/// (hence several agents) may share one host in test setups.
pub fn agent_socket(agent_dir: &Path, node: &str) -> PathBuf {
    agent_dir.join(format!("agent-{node}.sock"))
}

/// Root of a user's dask-spank state: `$DASK_SPANK_HOME`, else `$HOME/.dask-spank`.
pub fn user_root(dask_spank_home: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    match (dask_spank_home, home) {
        (Some(d), _) if !d.is_empty() => Some(PathBuf::from(d)),
        (_, Some(h)) if !h.is_empty() => Some(Path::new(h).join(".dask-spank")),
        _ => None,
    }
}

pub fn cluster_dir(user_root: &Path, cluster: &ClusterName) -> PathBuf {
    user_root.join("clusters").join(cluster.as_str())
}

/// The dask-format scheduler file (`Client(scheduler_file=...)`).
pub fn scheduler_file(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("scheduler.json")
}

/// Job output pattern given to sbatch (`--output`), relative to the submit
/// directory: `log/dask-worker-%A_%a.log` for arrays, `log/dask-worker-%j.log`.
pub fn log_pattern(log_dir: &str, role: Role, array: bool) -> String {
    let ids = if array { "%A_%a" } else { "%j" };
    format!("{log_dir}/dask-{role}-{ids}.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_root_prefers_the_override() {
        assert_eq!(
            user_root(Some("/scratch/x"), Some("/home/a")),
            Some(PathBuf::from("/scratch/x"))
        );
        assert_eq!(
            user_root(None, Some("/home/a")),
            Some(PathBuf::from("/home/a/.dask-spank"))
        );
        assert_eq!(user_root(Some(""), None), None);
    }

    #[test]
    fn layout() {
        let c: ClusterName = "ana".parse().unwrap();
        let d = cluster_dir(Path::new("/h/.dask-spank"), &c);
        assert_eq!(d, PathBuf::from("/h/.dask-spank/clusters/ana"));
        assert_eq!(
            scheduler_file(&d),
            PathBuf::from("/h/.dask-spank/clusters/ana/scheduler.json")
        );
        assert_eq!(
            agent_socket(Path::new("/run/dask-spank"), "n1"),
            PathBuf::from("/run/dask-spank/agent-n1.sock")
        );
        assert_eq!(
            log_pattern("log", Role::Worker, true),
            "log/dask-worker-%A_%a.log"
        );
        assert_eq!(
            log_pattern("log", Role::Scheduler, false),
            "log/dask-scheduler-%j.log"
        );
    }
}
