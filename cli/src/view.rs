//! What the user sees of a cluster: one row per job, from squeue (pending
//! and running jobs), the jobs' own reports (failures and ends, also after
//! Slurm forgot the job) and the scheduler's list of connected workers.

use crate::slurm::QueuedJob;
use dask_spank_common::names::DEFAULT_POOL;
use dask_spank_common::records::{ClusterState, JobReport, ReportState};
use dask_spank_common::slurm_state::SlurmState;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub job: String,
    pub role: String,
    /// A worker's pool (`default` for the default pool and the scheduler).
    pub pool: String,
    pub state: RowState,
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub cluster: String,
    pub scheduler: Option<Row>,
    pub workers: Vec<Row>,
    pub connected: usize,
    pub pending: usize,
    pub running: usize,
    pub failed: usize,
    pub ended: usize,
    /// The same counts for each pool of worker jobs, `default` included.
    pub pools: BTreeMap<String, PoolCounts>,
    pub scheduler_address: Option<String>,
    pub dashboard_address: Option<String>,
    /// The dashboard's status page with the cluster's token (the only way
    /// in: see python/dask_spank/boot.py).
    pub dashboard_link: Option<String>,
    pub scheduler_file: String,
}

/// Where a job of the cluster stands, as `status` shows it (and `--json`
/// writes it: the lower-case word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowState {
    /// In the queue.
    Pending,
    /// Running; a worker not (yet) connected to the scheduler.
    Running,
    /// A worker job whose worker is connected to the scheduler.
    Connected,
    /// It failed, by its report, or it left without one.
    Failed,
    /// It ended normally (or is completing).
    Ended,
    /// Another Slurm state of a queued job, in lower case (`suspended`).
    Other(String),
}

impl RowState {
    pub fn as_str(&self) -> &str {
        match self {
            RowState::Pending => "pending",
            RowState::Running => "running",
            RowState::Connected => "connected",
            RowState::Failed => "failed",
            RowState::Ended => "ended",
            RowState::Other(s) => s,
        }
    }

    /// The state a word names (`failed`), else another state of that name.
    fn from_word(word: String) -> RowState {
        match word.as_str() {
            "pending" => RowState::Pending,
            "running" => RowState::Running,
            "connected" => RowState::Connected,
            "failed" => RowState::Failed,
            "ended" => RowState::Ended,
            _ => RowState::Other(word),
        }
    }

    /// Failed or ended: the job will not be a worker (again).
    pub fn is_over(&self) -> bool {
        matches!(self, RowState::Failed | RowState::Ended)
    }
}

impl From<ReportState> for RowState {
    fn from(s: ReportState) -> RowState {
        match s {
            ReportState::Running => RowState::Running,
            ReportState::Failed => RowState::Failed,
            ReportState::Ended => RowState::Ended,
        }
    }
}

impl std::fmt::Display for RowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for RowState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A pool's worker jobs, counted as the cluster's are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolCounts {
    pub connected: usize,
    pub pending: usize,
    pub running: usize,
    pub failed: usize,
    pub ended: usize,
    /// All but those ended (`ClusterView::total`).
    pub total: usize,
}

fn counts<'a>(rows: impl Iterator<Item = &'a Row>) -> PoolCounts {
    let mut c = PoolCounts::default();
    for r in rows {
        match r.state {
            RowState::Connected => c.connected += 1,
            RowState::Pending => c.pending += 1,
            RowState::Running => c.running += 1,
            RowState::Failed => c.failed += 1,
            RowState::Ended => c.ended += 1,
            RowState::Other(_) => {}
        }
        if r.state != RowState::Ended {
            c.total += 1;
        }
    }
    c
}

impl ClusterView {
    /// Worker jobs that count towards the cluster's size: all but those that
    /// ended normally (cancelled by `scale`, retired at their walltime).
    /// Failed jobs count: they are workers the user asked for and lacks.
    pub fn total(&self) -> usize {
        self.workers.len() - self.ended
    }

    /// The view of one pool's worker jobs only (`wait --pool`).
    pub fn of_pool(mut self, pool: &str) -> ClusterView {
        self.workers.retain(|r| r.pool == pool);
        let c = counts(self.workers.iter());
        (
            self.connected,
            self.pending,
            self.running,
            self.failed,
            self.ended,
        ) = (c.connected, c.pending, c.running, c.failed, c.ended);
        self.pools.retain(|p, _| p == pool);
        self
    }

    pub fn percent_connected(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            100.0 * self.connected as f64 / self.total() as f64
        }
    }
}

fn role_of(name: &str) -> &'static str {
    match dask_spank_common::names::parse_job_name(name) {
        Some((role, _)) => role.as_str(),
        None => "worker",
    }
}

fn pool_of(name: &str) -> String {
    dask_spank_common::names::parse_pool_job_name(name)
        .and_then(|(_, _, p)| p)
        .unwrap_or(DEFAULT_POOL)
        .to_string()
}

/// The row of a job that has left the queue, from its own report.
fn reported_row(r: &JobReport) -> Row {
    // A job that left the queue while its report still says "running"
    // never said goodbye: its node (or its batch script) died with it.
    let (state, reason) = if r.state == ReportState::Running {
        (
            RowState::Failed,
            format!(
                "lost: the job ended without a report from {} (node failure?)",
                r.node
            ),
        )
    } else {
        (r.state.into(), r.reason.clone().unwrap_or_default())
    };
    Row {
        job: r.label.clone(),
        role: r.role.clone(),
        pool: r.pool.clone().unwrap_or_else(|| DEFAULT_POOL.into()),
        state,
        node: r.node.clone(),
        reason,
    }
}

/// The row of a queued job: squeue's state, refined by the job's report
/// (failed) and the scheduler's list of connected workers.
fn queued_row(cluster: &str, q: &QueuedJob, reports: &[JobReport], connected: &[String]) -> Row {
    let role = role_of(&q.name).to_string();
    let report = reports.iter().find(|r| r.label == q.label);
    let (state, reason) = match &q.state {
        SlurmState::Pending => (RowState::Pending, q.reason.clone()),
        // Leaving the queue: counts as ended, like the job it will be.
        SlurmState::Completing => (RowState::Ended, "completing".to_string()),
        SlurmState::Running | SlurmState::Configuring => {
            let name = format!("{cluster}-{}", q.label);
            match report {
                Some(r) if r.state == ReportState::Failed => {
                    (RowState::Failed, r.reason.clone().unwrap_or_default())
                }
                _ if role == "worker" && connected.contains(&name) => {
                    (RowState::Connected, String::new())
                }
                _ => (RowState::Running, String::new()),
            }
        }
        // In lower case; squeue's FAILED is failed.
        SlurmState::Other(other) => (RowState::from_word(other.to_lowercase()), q.reason.clone()),
    };
    let reason = if reason == "None" {
        String::new()
    } else {
        reason
    };
    Row {
        job: q.label.clone(),
        role,
        pool: pool_of(&q.name),
        state,
        node: q.node.clone(),
        reason,
    }
}

/// The rows (in job order) split into the scheduler job's and the workers'.
fn by_role(rows: BTreeMap<String, Row>) -> (Option<Row>, Vec<Row>) {
    let mut scheduler = None;
    let mut workers = Vec::new();
    for (_, r) in rows {
        if r.role == "scheduler" {
            // The newest scheduler job is the cluster's.
            scheduler = Some(r);
        } else {
            workers.push(r);
        }
    }
    (scheduler, workers)
}

pub fn build(
    cluster: &str,
    queued: &[QueuedJob],
    reports: &[JobReport],
    state: Option<&ClusterState>,
    connected: &[String],
    scheduler_file: String,
    token: Option<&str>,
) -> ClusterView {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for r in reports {
        rows.insert(r.label.clone(), reported_row(r));
    }
    for q in queued {
        rows.insert(q.label.clone(), queued_row(cluster, q, reports, connected));
    }
    let (scheduler, workers) = by_role(rows);
    let all = counts(workers.iter());
    let mut pools = BTreeMap::new();
    for r in &workers {
        pools
            .entry(r.pool.clone())
            .or_insert_with(|| counts(workers.iter().filter(|w| w.pool == r.pool)));
    }
    ClusterView {
        cluster: cluster.to_string(),
        connected: all.connected,
        pending: all.pending,
        running: all.running,
        failed: all.failed,
        ended: all.ended,
        pools,
        scheduler,
        workers,
        scheduler_address: state.map(|s| s.scheduler_address.clone()),
        dashboard_address: state.and_then(|s| s.dashboard_address.clone()),
        dashboard_link: state
            .and_then(|s| s.dashboard_address.as_deref())
            .map(|d| match token {
                Some(t) => format!("{d}/status?token={t}"),
                None => format!("{d}/status"),
            }),
        scheduler_file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_states_are_written_as_the_lower_case_word() {
        let states = [
            (RowState::Pending, "pending"),
            (RowState::Running, "running"),
            (RowState::Connected, "connected"),
            (RowState::Failed, "failed"),
            (RowState::Ended, "ended"),
            (RowState::Other("suspended".into()), "suspended"),
        ];
        for (s, word) in states {
            assert_eq!(serde_json::to_value(&s).unwrap(), serde_json::json!(word));
            assert_eq!(s.to_string(), word);
            assert_eq!(s.is_over(), word == "failed" || word == "ended");
        }
        // status pads the column.
        assert_eq!(format!("{:<10}|", RowState::Ended), "ended     |");
        assert_eq!(RowState::from(ReportState::Failed), RowState::Failed);
        // Another Slurm state of a queued job, in lower case.
        let row =
            |state: &str| queued_row("ana", &q("11_1", "dask-worker-ana", state, "x"), &[], &[]);
        assert_eq!(row("FAILED").state, RowState::Failed);
        assert_eq!(row("SUSPENDED").state, RowState::Other("suspended".into()));
        assert_eq!(row("SUSPENDED").reason, "x");
    }

    fn q(label: &str, name: &str, state: &str, reason: &str) -> QueuedJob {
        QueuedJob {
            label: label.into(),
            name: name.into(),
            state: state.into(),
            node: if state == "RUNNING" {
                "n1".into()
            } else {
                String::new()
            },
            reason: reason.into(),
            submit: None,
        }
    }

    #[test]
    fn merges_queue_reports_and_connections() {
        let queued = vec![
            q("10", "dask-scheduler-ana", "RUNNING", "None"),
            q("11_1", "dask-worker-ana", "RUNNING", "None"),
            q("11_2", "dask-worker-ana", "RUNNING", "None"),
            q("11_3", "dask-worker-ana", "PENDING", "Resources"),
            q("12_1", "dask-worker-ana@gpu", "RUNNING", "None"),
        ];
        let reports = vec![
            JobReport {
                job_id: 14,
                label: "11_2".into(),
                role: "worker".into(),
                state: ReportState::Failed,
                reason: Some("worker died (exit code 1); gave up".into()),
                node: "n1".into(),
                log: None,
                updated: 0,
                pool: None,
            },
            JobReport {
                job_id: 15,
                label: "11_4".into(),
                role: "worker".into(),
                state: ReportState::Failed,
                reason: Some("refused".into()),
                node: "n2".into(),
                log: None,
                updated: 0,
                pool: Some("gpu".into()),
            },
        ];
        let state = ClusterState {
            cluster: "ana".into(),
            scheduler_job: "10".into(),
            scheduler_address: "tcp://x:1".into(),
            dashboard_address: Some("http://x:2".into()),
            scheduler_file: "/f".into(),
            updated: 0,
        };
        let connected = ["ana-11_1".to_string(), "ana-12_1".to_string()];
        let v = build(
            "ana",
            &queued,
            &reports,
            Some(&state),
            &connected,
            "/f".into(),
            Some("t0k"),
        );
        assert_eq!(
            v.dashboard_link.as_deref(),
            Some("http://x:2/status?token=t0k")
        );

        let states: Vec<(&str, &str)> = v
            .workers
            .iter()
            .map(|r| (r.job.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("11_1", "connected"),
                ("11_2", "failed"),
                ("11_3", "pending"),
                ("11_4", "failed"),
                ("12_1", "connected")
            ]
        );
        assert_eq!(v.workers[2].reason, "Resources");
        assert_eq!((v.connected, v.pending, v.failed, v.total()), (2, 1, 2, 5));
        assert_eq!(v.percent_connected(), 40.0);
        // Per pool: the gpu pool's jobs by their name, or their report.
        let gpu = &v.pools["gpu"];
        assert_eq!((gpu.connected, gpu.failed, gpu.total), (1, 1, 2));
        let default = &v.pools["default"];
        assert_eq!(
            (
                default.connected,
                default.pending,
                default.failed,
                default.total
            ),
            (1, 1, 1, 3)
        );
        assert_eq!(v.workers[4].pool, "gpu");
        let g = v.clone().of_pool("gpu");
        assert_eq!((g.connected, g.failed, g.total()), (1, 1, 2));
        assert_eq!(g.percent_connected(), 50.0);
        assert_eq!(v.scheduler.unwrap().state, RowState::Running);
    }
}
