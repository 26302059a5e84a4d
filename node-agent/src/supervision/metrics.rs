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
        "Connections refused for exceeding the connection limits (the agent socket's, and the metrics port's).",
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
        |_| crate::spawning::spawn::stuck_total() as i64,
    ),
    (
        "user_io_threads",
        "gauge",
        "Threads writing to or closing users' descriptors now (many: a file system that does not answer).",
        |_| crate::system::userio::threads() as i64,
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

/// How long a client has to send its request head. Scrapers send it at
/// once; a connection that sends nothing is closed then, having held
/// nothing but its place among `MAX_OPEN`.
const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// How long writing the answer may take (a client that does not read).
const WRITE_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request head read; the rest is not looked at.
const MAX_HEAD: usize = 2048;
/// Connections open at once (each a task, a descriptor and a few KiB for
/// at most `HEAD_DEADLINE` + `WRITE_DEADLINE`). One over it is closed at
/// once: the connections already open are served, and a scrape coming
/// after the flood's first second finds places again.
const MAX_OPEN: usize = 2048;

/// Answer every connection with the metrics (HTTP/1.0, any path): enough
/// for Prometheus, curl and node_exporter-style scrapers.
///
/// Any local user can connect, so nothing a connection does may delay
/// another's scrape: no connection waits for another, each is answered as
/// soon as its request head is in (rendering is cheap), and each has
/// deadlines. What is bounded is how many are open at once; accept errors
/// back off.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    jobs: crate::supervision::jobs::Jobs,
) {
    serve_bounded(listener, metrics, jobs, MAX_OPEN).await
}

async fn serve_bounded(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    jobs: crate::supervision::jobs::Jobs,
    max_open: usize,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(max_open));
    let mut backoff = Duration::from_millis(10);
    loop {
        let s = match listener.accept().await {
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
        let Ok(place) = open.clone().try_acquire_owned() else {
            // Dropping it closes it.
            metrics.connections_refused.fetch_add(1, Relaxed);
            continue;
        };
        let (metrics, jobs) = (metrics.clone(), jobs.clone());
        tokio::spawn(async move {
            let _place = place;
            answer(s, &metrics, &jobs).await;
        });
    }
}

/// Wait (at most `HEAD_DEADLINE`) for the request head, then answer.
async fn answer(
    mut s: tokio::net::TcpStream,
    metrics: &Metrics,
    jobs: &crate::supervision::jobs::Jobs,
) {
    use tokio::io::AsyncWriteExt;
    match tokio::time::timeout(HEAD_DEADLINE, read_head(&mut s)).await {
        Ok(Ok(true)) => {}
        // Nothing came in time, or the client left or failed: no answer.
        _ => return,
    }
    let body = metrics.render(jobs.len());
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_DEADLINE, s.write_all(reply.as_bytes())).await;
}

/// Read a request head: up to its blank line, `MAX_HEAD` bytes, or the
/// client's end of writing. Whether anything came.
async fn read_head(s: &mut tokio::net::TcpStream) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; MAX_HEAD];
    let mut n = 0;
    loop {
        let got = s.read(&mut buf[n..]).await?;
        if got == 0 {
            return Ok(n > 0);
        }
        n += got;
        let head = &buf[..n];
        let ended =
            head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n");
        if ended || n == buf.len() {
            return Ok(true);
        }
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
    fn the_admin_guide_names_every_metric() {
        let guide = include_str!("../../../docs/admin.md");
        let names = SERIES.iter().map(|s| s.0).chain(["jobs", "build_info"]);
        for name in names {
            assert!(
                guide.contains(&format!("`dask_spank_{name}")),
                "docs/admin.md does not name dask_spank_{name}"
            );
        }
    }

    /// GET the metrics at `addr`: the reply ("" if the connection was
    /// closed or reset first) and how long it took.
    async fn scrape(addr: std::net::SocketAddr) -> (String, Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let t0 = std::time::Instant::now();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut reply = Vec::new();
        let sent = c
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await;
        if sent.is_err() || c.read_to_end(&mut reply).await.is_err() {
            reply.clear();
        }
        (String::from_utf8(reply).unwrap(), t0.elapsed())
    }

    async fn server(max_open: usize) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let jobs = crate::supervision::jobs::Jobs::new(None);
        tokio::spawn(serve_bounded(
            l,
            Arc::new(Metrics::default()),
            jobs,
            max_open,
        ));
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_delay_a_scrape() {
        let addr = server(MAX_OPEN).await;
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Half a request head, too.
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut partial, b"GET /met")
            .await
            .unwrap();
        let (reply, took) = tokio::time::timeout(Duration::from_secs(5), scrape(addr))
            .await
            .expect("a scrape answered within 5 s");
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert!(reply.contains("\ndask_spank_jobs 0\n"), "{reply}");
        assert!(took < Duration::from_millis(500), "took {took:?}");
        // The idle ones are closed after the head deadline, unanswered.
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(
            HEAD_DEADLINE * 3,
            tokio::io::AsyncReadExt::read(&mut idle[0], &mut buf),
        )
        .await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    }

    #[tokio::test]
    async fn connections_over_the_bound_are_closed_at_once() {
        let addr = server(4).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted and closed at once: an answer of nothing, well before
        // the head deadline.
        let t0 = std::time::Instant::now();
        let (reply, _) = scrape(addr).await;
        assert_eq!(reply, "");
        assert!(t0.elapsed() < HEAD_DEADLINE / 2);
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (reply, _) = scrape(addr).await;
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
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
