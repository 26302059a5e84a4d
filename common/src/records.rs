//! The records of a cluster directory, one typed definition each, used by
//! the CLI, the job-side runtime of `dask-spank attach` (which writes most
//! of them) and, through `dask-spank status --json`, the Python package.
//! The file names are [`crate::paths::layout`]'s.
//!
//! Written atomically (`files::write_json_atomic`, 0600) by user-side
//! processes only: root may not write into an NFS home, and the directory
//! is private to its owner. Read with a size bound (`files::read_small_file`):
//! a record that is missing, too large or unreadable reads as absent.
//!
//! * `jobs/<label>.json` ([`JobReport`]): each job's own report, written by
//!   its attach; worker jobs on any node report through the shared file
//!   system, as the scheduler file travels.
//! * `state.json` ([`ClusterState`]): the scheduler job's addresses.
//! * `connected.json` ([`Connected`]): the workers connected to the
//!   scheduler, from the keeper's dask helper.
//! * `target.json` ([`Target`]): the user's intention (`up`, `scale`,
//!   `adapt`, `down`).
//! * `worker-args.json` ([`WorkerArgs`]): how worker jobs are submitted.
//! * `keeper.json` ([`KeeperStatus`]): what the keeper saw and did last.
//! * `pools/<pool>/target.json` and `pools/<pool>/worker-args.json`: the
//!   same two records for each worker pool other than the default one
//!   (`ClusterDir::target_of`, `worker_args_of`).

use crate::files::{read_small_file, write_json_atomic};
use crate::names::PoolName;
use crate::paths::layout;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest record read.
const MAX_RECORD: usize = 1 << 20;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a job stands, by its own report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportState {
    Running,
    Failed,
    Ended,
}

impl ReportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Running => "running",
            ReportState::Failed => "failed",
            ReportState::Ended => "ended",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub job_id: u32,
    pub label: String,
    pub role: String,
    pub state: ReportState,
    pub reason: Option<String>,
    pub node: String,
    /// The job's log file, as its attach saw it.
    pub log: Option<String>,
    pub updated: u64,
    /// Its worker pool (`--dask-pool`; None: the default pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster: String,
    pub scheduler_job: String,
    pub scheduler_address: String,
    pub dashboard_address: Option<String>,
    pub scheduler_file: PathBuf,
    pub updated: u64,
}

/// The workers connected to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// dask worker names.
    pub workers: Vec<String>,
    pub updated: u64,
}

/// A connected list older than this says nothing any more (its keeper is
/// gone, or its helper).
pub const CONNECTED_FRESH_S: u64 = 30;

/// The user's intention for the cluster's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    /// Keep this many worker jobs.
    Workers { workers: u32 },
    /// dask's adaptive target, between a minimum and a maximum.
    Adapt { adapt: [u32; 2] },
    /// The cluster is going down: submit nothing more.
    Down { down: bool },
}

impl Target {
    /// Whether the keeper holds the cluster's size: then the worker jobs
    /// are the keeper's to end with the scheduler job.
    pub fn is_kept(&self) -> bool {
        !matches!(self, Target::Down { .. })
    }
}

/// How worker jobs of the cluster are submitted (sbatch options, without
/// `--array`): recorded by `up`, or by the first worker job of a cluster
/// submitted by hand; reused by `scale`, replacements and successors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerArgs {
    pub args: Vec<String>,
    /// Variables for the worker jobs' environment (the dask worker options
    /// `up` takes: resources, local directory, preloads, and the user's
    /// `--export`), set in sbatch's environment: sbatch's own `--export`
    /// cannot carry a value with a comma.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Who recorded them (`up`, `job 1234`).
    #[serde(default)]
    pub source: String,
    /// The dask worker resources each of these jobs offers (`GPU`, 1.0),
    /// as set in `env`: the keeper sizes an adaptive pool by the tasks
    /// that ask for them.
    #[serde(default)]
    pub resources: Vec<(String, f64)>,
}

/// The keeper's dask helper, as the runtime supervising it sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperStatus {
    pub running: bool,
    pub pid: Option<u32>,
    /// Restarts since the keeper started.
    pub restarts: u32,
    /// How it ended last, and when.
    pub last_death: Option<String>,
    /// When it is started again (epoch seconds), while it is down.
    pub next_start: Option<u64>,
}

/// What the keeper saw and did last of one worker pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolKeeperStatus {
    /// The number of worker jobs it aims at.
    pub target: u32,
    pub intention: Target,
    pub pending: u32,
    pub running: u32,
    /// Running workers whose successor is due (they retire for their walltime).
    pub retiring: u32,
    pub connected: u32,
    /// Why the pool is short of its target (a refused submission).
    pub short_reason: Option<String>,
}

/// What the keeper saw and did last: the default pool's status (its
/// fields at the top of `keeper.json`, as before pools), the other pools'
/// by name, and its helper's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperStatus {
    #[serde(flatten)]
    pub default: PoolKeeperStatus,
    #[serde(default)]
    pub helper: HelperStatus,
    pub updated: u64,
    /// The other pools', by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, PoolKeeperStatus>,
}

/// A cluster's directory and its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDir(pub PathBuf);

fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&read_small_file(path, MAX_RECORD).ok()?).ok()
}

fn write<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    write_json_atomic(path, v, 0o600)
}

impl ClusterDir {
    pub fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.file(layout::JOBS_DIR)
    }

    pub fn write_report(&self, r: &JobReport) -> std::io::Result<()> {
        write(&self.jobs_dir().join(format!("{}.json", r.label)), r)
    }

    /// Every job's report, by label.
    pub fn reports(&self) -> Vec<JobReport> {
        let Ok(rd) = std::fs::read_dir(self.jobs_dir()) else {
            return vec![];
        };
        let mut v: Vec<JobReport> = rd
            .flatten()
            .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
            .filter_map(|e| read(&e.path()))
            .collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    pub fn state(&self) -> Option<ClusterState> {
        read(&self.file(layout::STATE_FILE))
    }

    pub fn write_state(&self, s: &ClusterState) -> std::io::Result<()> {
        write(&self.file(layout::STATE_FILE), s)
    }

    /// The connected workers' names, if the list is fresh.
    pub fn connected(&self) -> Vec<String> {
        read::<Connected>(&self.file(layout::CONNECTED))
            .filter(|c| now().saturating_sub(c.updated) <= CONNECTED_FRESH_S)
            .map(|c| c.workers)
            .unwrap_or_default()
    }

    pub fn write_connected(&self, c: &Connected) -> std::io::Result<()> {
        write(&self.file(layout::CONNECTED), c)
    }

    pub fn target(&self) -> Option<Target> {
        read(&self.file(layout::TARGET))
    }

    /// When the target was last recorded (to tell a `down` of this
    /// cluster from one a past cluster of the name left).
    pub fn target_mtime(&self) -> Option<SystemTime> {
        std::fs::metadata(self.file(layout::TARGET))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn write_target(&self, t: &Target) -> std::io::Result<()> {
        write(&self.file(layout::TARGET), t)
    }

    /// Whether the keeper holds the cluster's size.
    pub fn is_kept(&self) -> bool {
        self.target().is_some_and(|t| t.is_kept())
    }

    pub fn worker_args(&self) -> Option<WorkerArgs> {
        read(&self.file(layout::WORKER_ARGS))
    }

    pub fn write_worker_args(&self, a: &WorkerArgs) -> std::io::Result<()> {
        write(&self.file(layout::WORKER_ARGS), a)
    }

    /// Where a pool's records are: the top for the default pool (None),
    /// `pools/<pool>/` for another (a `PoolName` is a safe file name).
    fn pool_file(&self, pool: Option<&PoolName>, name: &str) -> PathBuf {
        match pool {
            None => self.file(name),
            Some(p) => self.0.join(layout::POOLS_DIR).join(p.as_str()).join(name),
        }
    }

    /// A pool's target (None: the default pool's, `target()`).
    pub fn target_of(&self, pool: Option<&PoolName>) -> Option<Target> {
        read(&self.pool_file(pool, layout::TARGET))
    }

    pub fn write_target_of(&self, pool: Option<&PoolName>, t: &Target) -> std::io::Result<()> {
        write(&self.pool_file(pool, layout::TARGET), t)
    }

    /// A pool's worker options (None: the default pool's, `worker_args()`).
    pub fn worker_args_of(&self, pool: Option<&PoolName>) -> Option<WorkerArgs> {
        read(&self.pool_file(pool, layout::WORKER_ARGS))
    }

    pub fn write_worker_args_of(
        &self,
        pool: Option<&PoolName>,
        a: &WorkerArgs,
    ) -> std::io::Result<()> {
        write(&self.pool_file(pool, layout::WORKER_ARGS), a)
    }

    /// The pools other than the default one that have a record, by name.
    pub fn pools(&self) -> Vec<PoolName> {
        let Ok(rd) = std::fs::read_dir(self.0.join(layout::POOLS_DIR)) else {
            return vec![];
        };
        let mut v: Vec<PoolName> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        v.sort();
        v
    }

    /// The dashboard's token (see `paths::layout::DASHBOARD_TOKEN`).
    pub fn dashboard_token(&self) -> Option<String> {
        let t = read_small_file(&self.file(layout::DASHBOARD_TOKEN), 256).ok()?;
        let t = String::from_utf8(t).ok()?.trim().to_string();
        (!t.is_empty()).then_some(t)
    }

    pub fn keeper(&self) -> Option<KeeperStatus> {
        read(&self.file(layout::KEEPER))
    }

    pub fn write_keeper(&self, k: &KeeperStatus) -> std::io::Result<()> {
        write(&self.file(layout::KEEPER), k)
    }

    /// Forget what an earlier scheduler of this cluster saw: its address
    /// would send workers to a dead scheduler, its workers are not this
    /// one's.
    pub fn clear_scheduler_state(&self) {
        let _ = std::fs::remove_file(self.file(layout::STATE_FILE));
        let _ = std::fs::remove_file(self.file(layout::CONNECTED));
    }

    /// Forget an earlier cluster of the same name: its reports and state.
    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(self.jobs_dir());
        self.clear_scheduler_state();
    }

    /// Forget the pools' records (a new cluster of the name has its own).
    pub fn clear_pools(&self) {
        let _ = std::fs::remove_dir_all(self.file(layout::POOLS_DIR));
    }

    /// Forget the cluster's size too: the target, the keeper's report and
    /// the worker options (a later cluster of the name starts afresh).
    pub fn clear_all(&self) {
        self.clear();
        for f in [layout::TARGET, layout::KEEPER, layout::WORKER_ARGS] {
            let _ = std::fs::remove_file(self.file(f));
        }
        self.clear_pools();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> ClusterDir {
        ClusterDir(std::env::temp_dir().join(format!("dsp-rec-{tag}-{}", std::process::id())))
    }

    #[test]
    fn the_keepers_record_keeps_the_default_pools_fields_at_the_top() {
        let mut k = KeeperStatus {
            default: PoolKeeperStatus {
                target: 3,
                intention: Target::Workers { workers: 3 },
                pending: 1,
                running: 2,
                retiring: 0,
                connected: 2,
                short_reason: None,
            },
            helper: HelperStatus::default(),
            updated: 7,
            pools: BTreeMap::new(),
        };
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(v["target"], 3);
        assert_eq!(v["connected"], 2);
        assert!(
            v.get("default").is_none() && v.get("pools").is_none(),
            "{v}"
        );
        k.pools.insert("gpu".into(), k.default.clone());
        let back: KeeperStatus = serde_json::from_value(serde_json::to_value(&k).unwrap()).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn reports_round_trip_and_clear() {
        let d = dir("reports");
        let r = JobReport {
            job_id: 5,
            label: "4_1".into(),
            role: "worker".into(),
            state: ReportState::Failed,
            reason: Some("boom".into()),
            node: "n1".into(),
            log: None,
            updated: 1,
            pool: None,
        };
        d.write_report(&r).unwrap();
        std::fs::write(d.jobs_dir().join("junk.json"), b"{").unwrap();
        assert_eq!(d.reports(), vec![r]);
        let text = std::fs::read_to_string(d.jobs_dir().join("4_1.json")).unwrap();
        assert!(text.contains("\"state\": \"failed\""), "{text}");
        d.clear();
        assert!(d.reports().is_empty());
        std::fs::remove_dir_all(d.path()).unwrap();
    }

    #[test]
    fn targets_keep_their_json_form() {
        assert_eq!(
            serde_json::to_string(&Target::Workers { workers: 4 }).unwrap(),
            r#"{"workers":4}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Adapt { adapt: [0, 16] }).unwrap(),
            r#"{"adapt":[0,16]}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Down { down: true }).unwrap(),
            r#"{"down":true}"#
        );
        let d = dir("target");
        assert!(!d.is_kept());
        d.write_target(&Target::Adapt { adapt: [0, 2] }).unwrap();
        assert!(d.is_kept());
        d.write_target(&Target::Down { down: true }).unwrap();
        assert!(!d.is_kept());
        d.clear_all();
        assert_eq!(d.target(), None);
        std::fs::remove_dir_all(d.path()).unwrap();
    }

    #[test]
    fn each_pool_has_its_records_and_the_default_pool_keeps_the_old_files() {
        let d = dir("pools");
        let gpu: PoolName = "gpu".parse().unwrap();
        d.write_target(&Target::Workers { workers: 3 }).unwrap();
        d.write_target_of(Some(&gpu), &Target::Adapt { adapt: [0, 2] })
            .unwrap();
        let args = WorkerArgs {
            args: vec!["--dask-pool=gpu".into()],
            resources: vec![("GPU".into(), 1.0)],
            ..Default::default()
        };
        d.write_worker_args_of(Some(&gpu), &args).unwrap();
        assert_eq!(d.target_of(None), Some(Target::Workers { workers: 3 }));
        assert_eq!(d.target(), Some(Target::Workers { workers: 3 }));
        assert_eq!(
            d.target_of(Some(&gpu)),
            Some(Target::Adapt { adapt: [0, 2] })
        );
        assert_eq!(d.worker_args_of(Some(&gpu)), Some(args));
        assert_eq!(d.worker_args(), None);
        assert!(d.path().join("pools/gpu/target.json").is_file());
        std::fs::create_dir_all(d.path().join("pools/not.a.pool")).unwrap();
        assert_eq!(d.pools(), vec![gpu]);
        // An old record (no resources) still reads.
        std::fs::write(d.path().join("worker-args.json"), br#"{"args": ["x"]}"#).unwrap();
        assert_eq!(d.worker_args().unwrap().resources, vec![]);
        d.clear_all();
        assert!(d.pools().is_empty());
        std::fs::remove_dir_all(d.path()).unwrap();
    }

    #[test]
    fn a_stale_connected_list_says_nothing() {
        let d = dir("connected");
        d.write_connected(&Connected {
            workers: vec!["ana-1".into()],
            updated: now(),
        })
        .unwrap();
        assert_eq!(d.connected(), vec!["ana-1".to_string()]);
        d.write_connected(&Connected {
            workers: vec!["ana-1".into()],
            updated: now() - CONNECTED_FRESH_S - 1,
        })
        .unwrap();
        assert!(d.connected().is_empty());
        std::fs::remove_dir_all(d.path()).unwrap();
    }
}
