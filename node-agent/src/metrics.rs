//! Node metrics in Prometheus text format, served on a loopback address
//! (`--metrics-addr`) and through the agent socket (`dask-node-agent metrics`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub workers_running: AtomicI64,
    pub schedulers_running: AtomicI64,
    pub forkservers_running: AtomicI64,
    pub restarts: AtomicU64,
    pub memory_kills: AtomicU64,
    pub crash_loop_giveups: AtomicU64,
    pub refused: AtomicU64,
    pub registrations: AtomicU64,
}

impl Metrics {
    pub fn render(&self, jobs: usize) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP dask_spank_{name} {help}");
            let _ = writeln!(out, "# TYPE dask_spank_{name} {kind}");
            let _ = writeln!(out, "dask_spank_{name} {v}");
        };
        put(
            "jobs",
            "gauge",
            "Jobs registered with this node agent.",
            jobs as i64,
        );
        put(
            "workers_running",
            "gauge",
            "Dask worker processes running.",
            self.workers_running.load(Relaxed),
        );
        put(
            "schedulers_running",
            "gauge",
            "Dask scheduler processes running.",
            self.schedulers_running.load(Relaxed),
        );
        put(
            "forkservers_running",
            "gauge",
            "Fork servers running (worker_start=forkserver), one per worker job.",
            self.forkservers_running.load(Relaxed),
        );
        put(
            "worker_restarts_total",
            "counter",
            "Worker restarts after a crash or a memory kill.",
            self.restarts.load(Relaxed) as i64,
        );
        put(
            "memory_kills_total",
            "counter",
            "Workers terminated for exceeding their memory limit.",
            self.memory_kills.load(Relaxed) as i64,
        );
        put(
            "crash_loop_giveups_total",
            "counter",
            "Workers not restarted any more after too many crashes.",
            self.crash_loop_giveups.load(Relaxed) as i64,
        );
        put(
            "refused_total",
            "counter",
            "Jobs refused by the site policy on this node.",
            self.refused.load(Relaxed) as i64,
        );
        put(
            "registrations_total",
            "counter",
            "Job registrations received.",
            self.registrations.load(Relaxed) as i64,
        );
        out
    }
}

/// Answer every connection with the metrics (HTTP/1.0, any path): enough
/// for Prometheus, curl and node_exporter-style scrapers.
pub async fn serve(listener: tokio::net::TcpListener, agent: std::sync::Arc<crate::server::Agent>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // Read the request head (bounded), then answer.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf)).await;
            let body = agent.metrics.render(agent.jobs.len());
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let m = Metrics::default();
        m.restarts.fetch_add(2, Relaxed);
        m.workers_running.fetch_add(3, Relaxed);
        let t = m.render(4);
        assert!(t.contains(
            "# TYPE dask_spank_worker_restarts_total counter\ndask_spank_worker_restarts_total 2\n"
        ));
        assert!(t.contains("dask_spank_workers_running 3\n"));
        assert!(t.contains("dask_spank_jobs 4\n"));
    }
}
