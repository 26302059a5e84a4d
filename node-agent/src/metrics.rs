//! Node metrics in Prometheus text format, served through the agent socket
//! (`dask-node-agent metrics`, root only) and, if the admin asks for it with
//! `--metrics-addr`, over HTTP on a loopback address. These are node-wide
//! counts with no user's names in them; the admin guide says that every
//! local user can read them over HTTP.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

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
    pub connections_refused: AtomicU64,
    pub adopted: AtomicU64,
    pub lost: AtomicU64,
}

/// Which gauge a [`Gauge`] holds up.
pub type Which = fn(&Metrics) -> &AtomicI64;

/// One unit of a gauge for as long as it lives: whatever path a supervisor
/// takes out, the gauge comes down exactly once.
pub struct Gauge {
    metrics: Arc<Metrics>,
    which: Which,
}

impl Gauge {
    pub fn up(metrics: &Arc<Metrics>, which: Which) -> Gauge {
        which(metrics).fetch_add(1, Relaxed);
        Gauge {
            metrics: metrics.clone(),
            which,
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.which)(&self.metrics).fetch_sub(1, Relaxed);
    }
}

/// One exported series: name, Prometheus type, help text and how to read it.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Metrics) -> i64,
);

/// Every series the agent exports, in the order they are rendered.
const SERIES: &[Series] = &[
    (
        "workers_running",
        "gauge",
        "Dask worker processes running.",
        |m| m.workers_running.load(Relaxed),
    ),
    (
        "schedulers_running",
        "gauge",
        "Dask scheduler processes running.",
        |m| m.schedulers_running.load(Relaxed),
    ),
    (
        "forkservers_running",
        "gauge",
        "Fork servers running (worker_start=forkserver), one per worker job.",
        |m| m.forkservers_running.load(Relaxed),
    ),
    (
        "worker_restarts_total",
        "counter",
        "Worker restarts after a crash or a memory kill.",
        |m| m.restarts.load(Relaxed) as i64,
    ),
    (
        "memory_kills_total",
        "counter",
        "Workers terminated for exceeding their memory limit.",
        |m| m.memory_kills.load(Relaxed) as i64,
    ),
    (
        "crash_loop_giveups_total",
        "counter",
        "Workers not restarted any more after too many crashes.",
        |m| m.crash_loop_giveups.load(Relaxed) as i64,
    ),
    (
        "refused_total",
        "counter",
        "Jobs refused by the site policy on this node.",
        |m| m.refused.load(Relaxed) as i64,
    ),
    (
        "registrations_total",
        "counter",
        "Job registrations received.",
        |m| m.registrations.load(Relaxed) as i64,
    ),
    (
        "connections_refused_total",
        "counter",
        "Socket connections refused for exceeding the connection limits.",
        |m| m.connections_refused.load(Relaxed) as i64,
    ),
    (
        "adopted_total",
        "counter",
        "Dask processes adopted from a previous agent (a restart or an upgrade).",
        |m| m.adopted.load(Relaxed) as i64,
    ),
    (
        "starts_stuck",
        "gauge",
        "Starts abandoned at --start-timeout whose process has not ended yet (blocked on a file system that does not answer).",
        |_| crate::spawn::stuck_total() as i64,
    ),
    (
        "user_io_threads",
        "gauge",
        "Threads writing to or closing users' descriptors now (many: a file system that does not answer).",
        |_| crate::userio::threads() as i64,
    ),
    (
        "lost_total",
        "counter",
        "Dask processes a previous agent left that could not be adopted (expected 0).",
        |m| m.lost.load(Relaxed) as i64,
    ),
];

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
        for (name, kind, help, read) in SERIES {
            put(name, kind, help, read(self));
        }
        let _ = writeln!(
            out,
            "# HELP dask_spank_build_info The agent's version and commit."
        );
        let _ = writeln!(out, "# TYPE dask_spank_build_info gauge");
        let _ = writeln!(
            out,
            "dask_spank_build_info{{version=\"{}\"}} 1",
            dask_spank_common::build_info::VERSION
        );
        out
    }
}

/// Concurrent HTTP scrapes served at most; more wait in the backlog.
const MAX_SCRAPES: usize = 8;

/// Answer every connection with the metrics (HTTP/1.0, any path): enough
/// for Prometheus, curl and node_exporter-style scrapers. Bounded: a few
/// scrapes at a time, each with a deadline; accept errors back off.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    jobs: crate::jobs::Jobs,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut s = match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // EMFILE and friends: do not spin.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (metrics, jobs) = (metrics.clone(), jobs.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = async {
                let mut buf = [0u8; 2048];
                // Read the request head (bounded), then answer.
                let _ = s.read(&mut buf).await;
                let body = metrics.render(jobs.len());
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
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
        assert!(t.contains("dask_spank_build_info{version="));
    }

    #[test]
    fn gauges_come_down_when_their_guard_goes() {
        let m = Arc::new(Metrics::default());
        let g = Gauge::up(&m, |m| &m.workers_running);
        let h = Gauge::up(&m, |m| &m.workers_running);
        assert_eq!(m.workers_running.load(Relaxed), 2);
        drop(g);
        drop(h);
        assert_eq!(m.workers_running.load(Relaxed), 0);
    }
}
