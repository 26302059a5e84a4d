//! `dask-spank scale`: record how many worker jobs the cluster (or one of
//! its pools) keeps; its scheduler job submits or cancels them (and
//! replaces those that fail or retire for their walltime).

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::pools::known_pool;
use crate::view::{ClusterView, RowState};
use dask_spank_common::records::Target;

/// Have N worker jobs (kept by the scheduler job).
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  dask-spank scale ana 200\n  dask-spank scale ana 4 --pool gpu"
)]
pub struct Args {
    pub name: String,
    pub workers: u32,
    /// The pool to size (default: the default pool).
    #[arg(long)]
    pub pool: Option<String>,
}

pub fn run(a: Args) -> Res {
    let (c, n) = (parse_name(&a.name)?, a.workers);
    let v = view(&c)?;
    if v.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let dir = records_of(&c)?;
    let pool = known_pool(&dir, c.as_str(), a.pool.as_deref())?;
    dir.write_target_of(pool.as_ref(), &Target::Workers { workers: n })
        .map_err(|e| format!("cannot record the target: {e}"))?;
    let name = pool.as_ref().map_or("default", |p| p.as_str());
    let have = active_in(&v, name);
    let of = pool.map(|p| format!(" of pool {p}")).unwrap_or_default();
    println!("cluster '{c}': target {n} worker jobs{of} (it has {have}); the scheduler job submits or cancels them");
    Ok(())
}

/// The worker jobs of pool `name` on their way or at work (pending,
/// running, connected), as `scale` reports them. Apart from `run` to be
/// tested.
fn active_in(v: &ClusterView, name: &str) -> usize {
    v.workers
        .iter()
        .filter(|r| r.pool == name)
        .filter(|r| {
            matches!(
                r.state,
                RowState::Pending | RowState::Running | RowState::Connected
            )
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::QueuedJob;
    use dask_spank_common::records::{JobReport, ReportState};
    use dask_spank_common::slurm_state::SlurmState;

    fn q(label: &str, name: &str, state: &str) -> QueuedJob {
        QueuedJob {
            label: label.into(),
            name: name.into(),
            state: SlurmState::parse(state),
            node: String::new(),
            reason: String::new(),
            submit: None,
        }
    }

    fn ended(label: &str, state: ReportState) -> JobReport {
        JobReport {
            job_id: 99,
            label: label.into(),
            role: "worker".into(),
            state,
            reason: None,
            node: "n1".into(),
            log: None,
            updated: 0,
            pool: None,
        }
    }

    #[test]
    fn a_pool_has_its_pending_running_and_connected_jobs_not_those_over() {
        let queued = [
            q("10", "dask-scheduler-ana", "RUNNING"),
            q("11_1", "dask-worker-ana", "RUNNING"),
            q("11_2", "dask-worker-ana", "PENDING"),
            q("11_3", "dask-worker-ana", "RUNNING"),
            q("11_4", "dask-worker-ana", "SUSPENDED"),
            q("12_1", "dask-worker-ana@gpu", "PENDING"),
        ];
        let reports = [
            ended("11_5", ReportState::Failed),
            ended("11_6", ReportState::Ended),
        ];
        let connected = ["ana-11_1".to_string()];
        let v = crate::view::build(
            "ana",
            &queued,
            &reports,
            None,
            &connected,
            "/f".into(),
            None,
        );
        assert_eq!(v.workers.len(), 7);
        assert_eq!(active_in(&v, "default"), 3);
        assert_eq!(active_in(&v, "gpu"), 1);
        assert_eq!(active_in(&v, "big"), 0);
    }
}
