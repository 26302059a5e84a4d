//! A user's cluster as the commands see it: its name, its private
//! directory, and its view (queue, reports, connections).

use crate::slurm::squeue;
use crate::view::{build, ClusterView};
use dask_spank_common::paths::{cluster_dir, make_private_dir, scheduler_file, user_root, vars};
use dask_spank_common::records::ClusterDir;
use dask_spank_common::ClusterName;
use std::path::PathBuf;

pub type Res = Result<(), String>;

pub fn parse_name(name: &str) -> Result<ClusterName, String> {
    name.parse().map_err(|e| format!("{e}"))
}

/// `$DASK_SPANK_HOME`, else `$HOME/.dask-spank`.
pub fn root() -> Result<PathBuf, String> {
    user_root(
        std::env::var(vars::HOME).ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    )
    .ok_or_else(|| {
        "neither DASK_SPANK_HOME nor HOME is set: cannot place the cluster directory".into()
    })
}

pub fn dir_of(c: &ClusterName) -> Result<PathBuf, String> {
    Ok(cluster_dir(&root()?, c))
}

/// The cluster's directory with its records.
pub fn records_of(c: &ClusterName) -> Result<ClusterDir, String> {
    dir_of(c).map(ClusterDir)
}

/// The cluster's directory, created private to the user if missing.
pub fn private_dir_of(c: &ClusterName) -> Result<PathBuf, String> {
    let dir = dir_of(c)?;
    make_private_dir(&root()?, &dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn view(c: &ClusterName) -> Result<ClusterView, String> {
    let dir = records_of(c)?;
    let queued = squeue(Some(c.as_str()))?;
    Ok(build(
        c.as_str(),
        &queued,
        &dir.reports(),
        dir.state().as_ref(),
        &dir.connected(),
        scheduler_file(dir.path()).to_string_lossy().into_owned(),
        dir.dashboard_token().as_deref(),
    ))
}

pub fn known(v: &ClusterView) -> bool {
    v.scheduler.is_some() || !v.workers.is_empty()
}

pub fn unknown(c: &ClusterName) -> String {
    format!("unknown cluster '{c}': no job and no record of it (dask-spank ls lists your clusters)")
}

/// How to connect, printed by `up` and `wait`.
pub fn print_connect(c: &ClusterName, sf: &str) {
    println!("scheduler file: {sf}");
    println!("connect from Python (TLS credentials included):");
    println!("    from dask_spank import connect");
    println!("    client = connect(\"{c}\")");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::QueuedJob;
    use dask_spank_common::records::{JobReport, ReportState};
    use dask_spank_common::slurm_state::SlurmState;

    fn view_of(queued: &[(&str, &str)], reports: &[JobReport]) -> ClusterView {
        let queued: Vec<QueuedJob> = queued
            .iter()
            .map(|(label, name)| QueuedJob {
                label: label.to_string(),
                name: name.to_string(),
                state: SlurmState::Pending,
                node: String::new(),
                reason: String::new(),
                submit: None,
            })
            .collect();
        build("ana", &queued, reports, None, &[], "/f".into(), None)
    }

    #[test]
    fn a_cluster_is_known_by_a_job_in_the_queue_or_a_report() {
        assert!(!known(&view_of(&[], &[])));
        assert!(known(&view_of(&[("10", "dask-scheduler-ana")], &[])));
        assert!(known(&view_of(&[("11_1", "dask-worker-ana@gpu")], &[])));
        let failed = JobReport {
            job_id: 12,
            label: "12".into(),
            role: "worker".into(),
            state: ReportState::Failed,
            reason: Some("refused".into()),
            node: "n1".into(),
            log: None,
            updated: 0,
            pool: None,
        };
        assert!(known(&view_of(&[], &[failed])));
    }

    #[test]
    fn names_are_checked_and_an_unknown_cluster_says_what_to_do() {
        let c = parse_name("ana-2.b_c").unwrap();
        assert_eq!(c.as_str(), "ana-2.b_c");
        assert!(parse_name("").unwrap_err().contains("must not be empty"));
        assert!(parse_name("a/b")
            .unwrap_err()
            .starts_with("--dask-cluster=a/b: "));
        assert_eq!(
            unknown(&c),
            "unknown cluster 'ana-2.b_c': no job and no record of it \
             (dask-spank ls lists your clusters)"
        );
    }
}
