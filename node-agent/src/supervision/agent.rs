//! The agent's shared state, below the server and the supervisors: the job
//! table, the settings that shape dask command lines, the metrics, the
//! node's one memory watchdog, and the tasks to wait for at shutdown.
//!
//! The server holds an `Arc<Agent>`; a supervisor gets only what it needs
//! (`supervisor::Context`): its job's handle, the metrics and the watchdog.

use crate::spawning::dask_cmd::DaskSettings;
use crate::spawning::spawn::Starter;
use crate::supervision::jobs::Jobs;
use crate::supervision::memwatch::MemWatch;
use crate::supervision::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Agent {
    pub jobs: Jobs,
    pub settings: DaskSettings,
    pub metrics: Arc<Metrics>,
    pub memwatch: Arc<MemWatch>,
    /// How processes are started: the spawner and the start deadline.
    pub starter: Arc<Starter>,
    /// Every connection handler (hence every supervisor) runs in here.
    pub tasks: TaskTracker,
    /// Cancelled when the agent shuts down.
    pub shutdown: CancellationToken,
}

impl Agent {
    pub fn new(jobs: Jobs, settings: DaskSettings, starter: Starter) -> Arc<Agent> {
        Arc::new(Agent {
            jobs,
            settings,
            starter: Arc::new(starter),
            metrics: Arc::default(),
            memwatch: Arc::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// Stop every job's processes, failing the jobs with `reason`, and
    /// wait, at most `bound`, until every supervisor has finished (their
    /// stops take up to `STOP_GRACE`). Whether they all did.
    pub async fn shut_down(&self, reason: &str, bound: Duration) -> bool {
        self.shutdown.cancel();
        self.jobs.fail_all(reason);
        self.tasks.close();
        tokio::time::timeout(bound, self.tasks.wait()).await.is_ok()
    }
}
