//! The cluster's state record, in the per-user cluster directory, written by
//! user-side processes only (root may not write into an NFS home):
//!
//! * `jobs/<label>.json`: each job's own report (running, failed with the
//!   reason, ended), written by its `dask-spank attach`. Worker jobs on any
//!   node report this way through the shared file system, as the scheduler
//!   file already travels.
//! * `state.json`: written every few seconds by the scheduler job's attach:
//!   scheduler and dashboard addresses, the scheduler file, and the workers
//!   connected to the scheduler (from its `/json/identity.json`).

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
    /// dask worker names connected to the scheduler.
    pub connected: Vec<String>,
    pub updated: u64,
}

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
    cluster_dir.join("jobs")
}

pub fn state_file(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("state.json")
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

/// Forget the reports of an earlier cluster of the same name.
pub fn clear(cluster_dir: &Path) {
    let _ = std::fs::remove_dir_all(jobs_dir(cluster_dir));
    let _ = std::fs::remove_file(state_file(cluster_dir));
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
