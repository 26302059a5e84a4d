//! `dask-spank down`: cancel every job of a cluster, and check.

use crate::cluster::{parse_name, records_of, unknown, Res};
use crate::slurm::{self, squeue, QueuedJob};
use dask_spank_common::paths::scheduler_file;
use dask_spank_common::records::Target;
use dask_spank_common::slurm_state::SlurmState;
use std::time::{Duration, Instant};

/// Cancel every job of the cluster and check that none is left.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank down ana")]
pub struct Args {
    pub name: String,
    /// Seconds to wait for the jobs to leave the queue.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub fn run(a: Args) -> Res {
    let (c, timeout_s) = (parse_name(&a.name)?, a.timeout);
    let queued = squeue(Some(c.as_str()))?;
    let dir = records_of(&c)?;
    if queued.is_empty() && dir.reports().is_empty() {
        return Err(unknown(&c));
    }
    // First: the scheduler job's keeper submits nothing more.
    let _ = crate::target::record(&dir, &Target::Down { down: true });
    let ids: Vec<String> = queued.iter().map(|q| q.label.clone()).collect();
    slurm::scancel(&ids)?;
    let start = Instant::now();

    loop {
        let left = squeue(Some(c.as_str()))?;
        if left.is_empty() {
            break;
        }
        // Anything submitted while we cancelled (a keeper's last step) goes too.
        let _ = slurm::scancel(&late_jobs(&left, &ids));
        if start.elapsed() > Duration::from_secs(timeout_s) {
            let l: Vec<String> = left
                .iter()
                .map(|q| format!("{} ({})", q.label, q.state))
                .collect();
            return Err(format!(
                "cluster '{c}': jobs still in the queue after {timeout_s}s: {}",
                l.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A later cluster of the same name starts from a clean record, and
    // not from "down" or the old target (the keeper went with the
    // scheduler job).
    let _ = std::fs::remove_file(scheduler_file(dir.path()));
    dir.clear_all();
    println!(
        "cluster '{c}' is down: {} jobs cancelled, none left in the queue",
        ids.len()
    );
    Ok(())
}

/// The jobs still queued that were not among those cancelled (`ids`) and
/// are pending: submitted while `down` cancelled. Apart from `run` to be
/// tested.
fn late_jobs(left: &[QueuedJob], ids: &[String]) -> Vec<String> {
    left.iter()
        .filter(|q| !ids.contains(&q.label) && q.state == SlurmState::Pending)
        .map(|q| q.label.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(label: &str, state: SlurmState) -> QueuedJob {
        QueuedJob {
            label: label.into(),
            name: "dask-worker-ana".into(),
            state,
            node: String::new(),
            reason: String::new(),
            submit: None,
        }
    }

    #[test]
    fn only_jobs_pending_and_not_cancelled_already_are_late() {
        let left = [
            q("10", SlurmState::Completing),
            q("11_1", SlurmState::Pending),
            q("13_1", SlurmState::Pending),
            q("13_2", SlurmState::Configuring),
            q("14", SlurmState::Running),
        ];
        let ids = ["10".to_string(), "11_1".to_string()];
        assert_eq!(late_jobs(&left, &ids), ["13_1"]);
        assert!(late_jobs(&[], &ids).is_empty());
    }
}
