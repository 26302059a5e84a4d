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
    /// A worker job's pool (`--dask-pool`), unset for the default pool.
    pub const POOL: &str = "DASK_SPANK_POOL";
    pub const ENV: &str = "DASK_SPANK_ENV";
    pub const AGENT_SOCKET: &str = "DASK_SPANK_AGENT_SOCKET";
    pub const LOG: &str = "DASK_SPANK_LOG";
    /// Overrides `$HOME/.dask-spank` as the root of per-user cluster state.
    pub const HOME: &str = "DASK_SPANK_HOME";
    /// `required` or `off`: the site's `tls` policy, for the job's attach.
    pub const TLS: &str = "DASK_SPANK_TLS";
    /// The keeper's successor lead and the workers' lifetime margin (s).
    pub const SUCCESSOR_LEAD: &str = "DASK_SPANK_SUCCESSOR_LEAD";
    pub const LIFETIME_MARGIN: &str = "DASK_SPANK_LIFETIME_MARGIN";
    /// Seconds the job's attach waits for a restarted node agent before it
    /// stops the job's dask processes itself (`agent_restart_grace`).
    pub const AGENT_GRACE: &str = "DASK_SPANK_AGENT_GRACE";
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

/// The files of a cluster directory, by name: the one definition of its
/// layout, which the Python package checks it follows (`dask-spank
/// layout`). The directory is private to its owner (0700), its files 0600.
pub mod layout {
    /// The dask-format scheduler file (`Client(scheduler_file=...)`),
    /// written by the dask scheduler.
    pub const SCHEDULER_FILE: &str = "scheduler.json";
    /// The cluster's state (`ClusterState`), kept by the scheduler job.
    pub const STATE_FILE: &str = "state.json";
    /// One report per job (`JobReport`), written by each job.
    pub const JOBS_DIR: &str = "jobs";
    /// The worker submission options of `up`, reused by the keeper.
    pub const WORKER_ARGS: &str = "worker-args.json";
    /// The user's intention for the cluster's size (`up`, `scale`,
    /// `adapt`, `down`), which the scheduler job's keeper holds.
    pub const TARGET: &str = "target.json";
    /// What the keeper sees and did last.
    pub const KEEPER: &str = "keeper.json";
    /// The worker pools other than the default one: `pools/<pool>/` holds
    /// that pool's `target.json` and `worker-args.json` (the default
    /// pool's stay at the top, so a cluster without pools reads as before).
    pub const POOLS_DIR: &str = "pools";
    /// The dashboard's token, made by each scheduler job (0600): the
    /// scheduler's and workers' HTTP servers answer only requests that
    /// carry it (python/dask_spank/boot.py), so the dashboard, its logs,
    /// exceptions and call stacks are the owner's alone.
    pub const DASHBOARD_TOKEN: &str = "dashboard.token";
    /// The keeper's dask helper, written by the scheduler job's runtime
    /// and run from here (a file: `ps` shows its name, not its text).
    pub const KEEPER_HELPER: &str = "keeper-helper.py";
    /// The dask worker names connected to the scheduler (`Connected`),
    /// written every few seconds by the keeper, a dask client of the
    /// scheduler: the scheduler's HTTP `identity.json` cannot be used, it
    /// fails while workers report metrics with tuple keys (any computation).
    pub const CONNECTED: &str = "connected.json";
    /// The cluster's own certificate authority (its key is not kept), and
    /// the certificate and key it signed, made by the scheduler job:
    /// scheduler, workers and clients all present that certificate and
    /// accept only peers signed by that authority.
    pub const TLS_CA: &str = "ca.pem";
    pub const TLS_CERT: &str = "tls.pem";
    pub const TLS_KEY: &str = "tls.key";
    /// Every entry, for `dask-spank layout`.
    pub const ALL: &[(&str, &str)] = &[
        ("scheduler_file", SCHEDULER_FILE),
        ("state_file", STATE_FILE),
        ("jobs_dir", JOBS_DIR),
        ("worker_args", WORKER_ARGS),
        ("target", TARGET),
        ("keeper", KEEPER),
        ("pools_dir", POOLS_DIR),
        ("connected", CONNECTED),
        ("keeper_helper", KEEPER_HELPER),
        ("dashboard_token", DASHBOARD_TOKEN),
        ("tls_ca", TLS_CA),
        ("tls_cert", TLS_CERT),
        ("tls_key", TLS_KEY),
    ];
}

/// The dask-format scheduler file (`Client(scheduler_file=...)`).
pub fn scheduler_file(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join(layout::SCHEDULER_FILE)
}

/// The variable that tells a cluster's dask processes where the dashboard
/// token is (the path only: they read the file, as its user).
pub const DASHBOARD_TOKEN_VAR: &str = "DASK_SPANK_DASHBOARD_TOKEN_FILE";

/// The environment that makes a dask process's HTTP server private.
pub fn dashboard_env(cluster_dir: &Path) -> (String, String) {
    (
        DASHBOARD_TOKEN_VAR.to_string(),
        cluster_dir
            .join(layout::DASHBOARD_TOKEN)
            .to_string_lossy()
            .into_owned(),
    )
}

/// The cluster's TLS files: authority, certificate, key.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn tls_files(cluster_dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: cluster_dir.join(layout::TLS_CA),
        cert: cluster_dir.join(layout::TLS_CERT),
        key: cluster_dir.join(layout::TLS_KEY),
    }
}

impl TlsFiles {
    /// The dask configuration, as environment variables, that makes a
    /// scheduler, worker or client talk TLS with these credentials only.
    pub fn dask_env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (
                "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION".to_string(),
                "True".to_string(),
            ),
            (
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE".to_string(),
                self.ca.to_string_lossy().into_owned(),
            ),
        ];
        for who in ["SCHEDULER", "WORKER", "CLIENT"] {
            v.push((
                format!("DASK_DISTRIBUTED__COMM__TLS__{who}__CERT"),
                self.cert.to_string_lossy().into_owned(),
            ));
            v.push((
                format!("DASK_DISTRIBUTED__COMM__TLS__{who}__KEY"),
                self.key.to_string_lossy().into_owned(),
            ));
        }
        v
    }

    pub fn all_exist(&self) -> bool {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .all(|p| p.is_file())
    }
}

/// Create a cluster directory (and the dask-spank directories above it,
/// under `user_root`), private to its owner whatever the umask: another
/// user must not read its scheduler file or its key.
pub fn make_private_dir(user_root: &Path, cluster_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(cluster_dir)?;
    let mut d = cluster_dir;
    loop {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        match d.parent() {
            Some(p) if d != user_root && p.starts_with(user_root) => d = p,
            _ => return Ok(()),
        }
    }
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
    fn cluster_directories_are_private_whatever_the_umask() {
        use std::os::unix::fs::MetadataExt;
        let root = std::env::temp_dir().join(format!("dsp-paths-{}", std::process::id()));
        let dir = cluster_dir(&root, &"ana".parse().unwrap());
        make_private_dir(&root, &dir).unwrap();
        for d in [&dir, &root.join("clusters"), &root] {
            assert_eq!(
                std::fs::metadata(d).unwrap().mode() & 0o777,
                0o700,
                "{}",
                d.display()
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

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
            tls_files(&d).key,
            PathBuf::from("/h/.dask-spank/clusters/ana/tls.key")
        );
        let env = tls_files(&d).dask_env();
        assert!(env.contains(&(
            "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY".into(),
            "/h/.dask-spank/clusters/ana/tls.key".into()
        )));
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
