//! The keeper's dask helper (`helper.py`), supervised: written into the
//! cluster's directory as a file (so `ps` shows `python3 <dir>/keeper-
//! helper.py`, not its text), run with the job's own Python (the one that
//! runs the scheduler: it has distributed), in its own process group, its
//! stderr into the scheduler job's log. It speaks JSON lines (see the
//! file). When it dies, its death is logged and it is started again after
//! `decide::helper_delay` (1 s, doubling while it keeps dying); meanwhile
//! `status` says the cluster is not fully kept.

use super::decide::{self, Demand, Worker};
use dask_spank_common::paths::vars;
use dask_spank_common::records::{now, HelperStatus};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The helper's program: the TLS workaround every dask process of a
/// cluster runs (python/dask_spank/tls_eof.py), then the helper itself.
pub const PROGRAM: &str = concat!(
    include_str!("../../../../python/dask_spank/tls_eof.py"),
    include_str!("helper.py")
);
/// The running helper's process group (0: none), for `kill_running`.
static RUNNING: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Kill the running helper (the job is ending; the process exits next,
/// without running destructors).
pub fn kill_running() {
    let pgid = RUNNING.swap(0, std::sync::atomic::Ordering::SeqCst);
    if pgid > 0 {
        // Our own child's group (process_group(0) at its start).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Longest line taken from the helper (a state of 3000 workers is about
/// 300 kB).
const MAX_LINE: usize = 4 << 20;

/// What the helper says.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Said {
    State {
        workers: BTreeMap<String, WorkerSaid>,
        adaptive_target: u32,
        /// The tasks asking for worker resources (see `decide::Demand`).
        #[serde(default)]
        restricted: u32,
        #[serde(default)]
        resources: BTreeMap<String, f64>,
        #[serde(default)]
        threads: u32,
    },
    Retired(serde::de::IgnoredAny),
    Error(String),
}

#[derive(Debug, Deserialize)]
struct WorkerSaid {
    address: String,
    keys: u64,
}

/// What the scheduler looks like, as the helper last said.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerView {
    pub workers: BTreeMap<String, Worker>,
    pub demand: Demand,
    /// When it was said (epoch seconds).
    pub at: u64,
}

/// An event of the helper.
pub enum Event {
    View(SchedulerView),
    /// Workers it was told to retire are retired.
    Retired,
    Error(String),
    /// It died (how).
    Died(String),
}

/// The job's Python: `--dask-env`'s, else `python3` on the job's PATH.
pub fn python() -> String {
    match std::env::var(vars::ENV) {
        Ok(e) if !e.is_empty() => format!("{e}/bin/python"),
        _ => "python3".into(),
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

pub struct Helper {
    file: PathBuf,
    tick_s: f64,
    running: Option<Running>,
    /// Deaths, epoch seconds, the last minute's.
    deaths: Vec<u64>,
    pub status: HelperStatus,
}

impl Helper {
    /// A helper to be run from `dir/name` (written at each start).
    pub fn new(dir: &Path, name: &str, tick_s: f64) -> Helper {
        Helper {
            file: dir.join(name),
            tick_s,
            running: None,
            deaths: vec![],
            status: HelperStatus::default(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// When to start it (epoch seconds): now if it never ran.
    pub fn start_at(&self) -> u64 {
        self.status.next_start.unwrap_or(0)
    }

    /// Start it (the caller checked `start_at`). Its failure to start is a
    /// death like another.
    pub fn start(&mut self) -> Result<u32, String> {
        let started = dask_spank_common::files::write_atomic(&self.file, PROGRAM.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write {}: {e}", self.file.display()))
            .and_then(|()| {
                Command::new(python())
                    .arg(&self.file)
                    .arg(self.tick_s.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .process_group(0)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", python()))
            });
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                self.died(e.clone());
                return Err(e);
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no pipes to the helper".into());
        };
        let pid = child.id().unwrap_or(0);
        RUNNING.store(pid as i32, std::sync::atomic::Ordering::SeqCst);
        self.running = Some(Running {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
        self.status.running = true;
        self.status.pid = Some(pid);
        self.status.next_start = None;
        Ok(pid)
    }

    /// Record a death: when to start again.
    fn died(&mut self, how: String) -> u64 {
        let t = now();
        self.deaths
            .retain(|&d| t.saturating_sub(d) <= decide::HELPER_WINDOW_S);
        self.deaths.push(t);
        let delay = decide::helper_delay(&self.deaths, t);
        self.status = HelperStatus {
            running: false,
            pid: None,
            restarts: self.status.restarts + 1,
            last_death: Some(how),
            next_start: Some(t + delay),
        };
        self.running = None;
        RUNNING.store(0, std::sync::atomic::Ordering::SeqCst);
        delay
    }

    /// Send an order (a JSON object); a helper that cannot take it is
    /// treated as dead by the next `event`.
    pub async fn send(&mut self, order: &serde_json::Value) {
        if let Some(r) = self.running.as_mut() {
            let mut line = order.to_string();
            line.push('\n');
            let _ = r.stdin.write_all(line.as_bytes()).await;
        }
    }

    /// The helper's next event. Pending forever while it is not running.
    pub async fn event(&mut self) -> Event {
        let Some(r) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let line = match r.lines.next_line().await {
            Ok(Some(line)) => line,
            // Its end: how it ended.
            Ok(None) | Err(_) => {
                let how = match r.child.wait().await {
                    Ok(st) => describe(st),
                    Err(e) => e.to_string(),
                };
                let delay = self.died(how.clone());
                return Event::Died(format!("{how}; starting it again in {delay}s"));
            }
        };
        if line.len() > MAX_LINE {
            return Event::Error("the helper sent an overlong line".into());
        }
        match serde_json::from_str::<Said>(&line) {
            Ok(Said::State {
                workers,
                adaptive_target,
                restricted,
                resources,
                threads,
            }) => {
                // Amounts that are no numbers of tasks are dropped.
                let resources = resources
                    .into_iter()
                    .filter(|(_, a)| a.is_finite() && *a >= 0.0)
                    .collect();
                let demand = Demand {
                    adaptive_target,
                    restricted,
                    resources,
                    workers: workers.len() as u32,
                    threads,
                };
                let workers = workers
                    .into_iter()
                    .map(|(n, w)| {
                        let w = Worker {
                            address: w.address,
                            keys: w.keys,
                        };
                        (n, w)
                    })
                    .collect();
                Event::View(SchedulerView {
                    workers,
                    demand,
                    at: now(),
                })
            }
            Ok(Said::Retired(_)) => Event::Retired,
            Ok(Said::Error(e)) => Event::Error(e),
            Err(e) => Event::Error(format!("bad line from the helper: {e}")),
        }
    }

    /// Kill it (the keeper ends).
    pub async fn stop(&mut self) {
        if let Some(mut r) = self.running.take() {
            RUNNING.store(0, std::sync::atomic::Ordering::SeqCst);
            let _ = r.child.kill().await;
        }
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_is_python_that_compiles() {
        assert!(dask_spank_common::testing::python_compiles(PROGRAM));
    }

    #[test]
    fn what_the_helper_says_is_typed() {
        let s: Said = serde_json::from_str(
            r#"{"state": {"workers": {"ana-1": {"address": "tls://a:1", "keys": 3}}, "adaptive_target": 2}}"#,
        )
        .unwrap();
        assert!(matches!(
            s,
            Said::State {
                adaptive_target: 2,
                restricted: 0,
                ..
            }
        ));
        let s: Said = serde_json::from_str(
            r#"{"state": {"workers": {}, "adaptive_target": 1, "restricted": 3, "resources": {"GPU": 3.0}, "threads": 4}}"#,
        )
        .unwrap();
        let Said::State { resources, .. } = s else {
            panic!("{s:?}")
        };
        assert_eq!(resources["GPU"], 3.0);
        let r: Said = serde_json::from_str(r#"{"retired": ["tls://a:1"]}"#).unwrap();
        assert!(matches!(r, Said::Retired(_)));
        assert!(serde_json::from_str::<Said>(r#"{"exploded": 1}"#).is_err());
    }
}
