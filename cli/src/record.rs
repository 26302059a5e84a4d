//! The cluster's state record, in the per-user cluster directory, written by
//! user-side processes only (root may not write into an NFS home):
//!
//! * `jobs/<label>.json`: each job's own report (running, failed with the
//!   reason, ended), written by its `dask-spank attach`. Worker jobs on any
//!   node report this way through the shared file system, as the scheduler
//!   file already travels.
//! * `state.json`: written every few seconds by the scheduler job's attach:
//!   scheduler and dashboard addresses, the scheduler file.
//! * `connected.json`: the workers connected to the scheduler, written every
//!   few seconds by the scheduler job's keeper (a dask client).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub job_id: u32,
    pub label: String,
    pub role: String,
    /// running, failed, ended
    pub state: String,
    pub reason: Option<String>,
    pub node: String,
    pub log: Option<String>,
    pub updated: u64,
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

/// The workers connected to the scheduler, as its keeper last saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// dask worker names.
    pub workers: Vec<String>,
    pub updated: u64,
}

/// A keeper that has not written for this long is gone (its scheduler job
/// with it, or its Python failed): its list says nothing any more.
const CONNECTED_FRESH_S: u64 = 30;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write a record atomically, private to the user, creating its directory.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    dask_spank_common::files::write_json_atomic(path, v, 0o600)
}

pub fn jobs_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join(dask_spank_common::paths::layout::JOBS_DIR)
}

pub fn state_file(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join(dask_spank_common::paths::layout::STATE_FILE)
}

pub fn write_report(cluster_dir: &Path, r: &JobReport) {
    let _ = write_json(&jobs_dir(cluster_dir).join(format!("{}.json", r.label)), r);
}

pub fn read_reports(cluster_dir: &Path) -> Vec<JobReport> {
    let Ok(rd) = std::fs::read_dir(jobs_dir(cluster_dir)) else {
        return vec![];
    };
    let mut v: Vec<JobReport> = rd
        .flatten()
        .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    v.sort_by(|a, b| a.label.cmp(&b.label));
    v
}

pub fn read_state(cluster_dir: &Path) -> Option<ClusterState> {
    serde_json::from_slice(&std::fs::read(state_file(cluster_dir)).ok()?).ok()
}

fn connected_file(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join(dask_spank_common::paths::layout::CONNECTED)
}

/// The connected workers' names, if the keeper's list is fresh.
pub fn read_connected(cluster_dir: &Path) -> Vec<String> {
    std::fs::read(connected_file(cluster_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Connected>(&b).ok())
        .filter(|c| now().saturating_sub(c.updated) <= CONNECTED_FRESH_S)
        .map(|c| c.workers)
        .unwrap_or_default()
}

/// Forget the reports of an earlier cluster of the same name.
pub fn clear(cluster_dir: &Path) {
    let _ = std::fs::remove_dir_all(jobs_dir(cluster_dir));
    clear_scheduler_state(cluster_dir);
}

/// Forget what an earlier scheduler of this cluster saw: its address would
/// send workers to a dead scheduler, its workers are not this one's.
pub fn clear_scheduler_state(cluster_dir: &Path) {
    let _ = std::fs::remove_file(state_file(cluster_dir));
    let _ = std::fs::remove_file(connected_file(cluster_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_clear() {
        let d = std::env::temp_dir().join(format!("dsp-rec-{}", std::process::id()));
        let r = JobReport {
            job_id: 5,
            label: "4_1".into(),
            role: "worker".into(),
            state: "failed".into(),
            reason: Some("boom".into()),
            node: "n1".into(),
            log: None,
            updated: 1,
        };
        write_report(&d, &r);
        std::fs::write(jobs_dir(&d).join("junk.json"), b"{").unwrap();
        assert_eq!(read_reports(&d), vec![r]);
        clear(&d);
        assert!(read_reports(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
