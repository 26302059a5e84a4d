//! The job-side runtime: what runs inside every dask-spank job as its
//! user, from `exec dask-spank attach` to the job's end, on one event loop.
//!
//! It owns, for its job:
//! * the session with the node agent (`session`): the hand-over, the
//!   agent's notices, the reattach after an agent restart, and stopping
//!   the job's processes if no agent comes back;
//! * the job's report in the cluster's records (`dask_spank_common::records`),
//!   and for a scheduler job the cluster's state (its addresses, every 2 s);
//! * for a worker job, the scheduler's address, which it reads from the
//!   scheduler file as the user and reports to the agent; and the shape of
//!   the cluster's worker jobs, if it is the first (`shape`);
//! * for a scheduler job, the cluster's keeper (`keeper`), which holds the
//!   cluster's size and supervises the keeper's Python helper;
//! * the job's end: the agent's word, or SIGTERM from Slurm (scancel,
//!   walltime), when a kept cluster's worker jobs end with its scheduler.
//!
//! Rust owns every rule and record; Python runs only as the keeper's dask
//! helper, a client of the scheduler.

mod keeper;
mod session;
mod shape;

use dask_spank_common::messages::Attach;
use dask_spank_common::names::PoolName;
use dask_spank_common::paths::{
    cluster_dir, make_private_dir, scheduler_file, tls_files, vars, TlsFiles,
};
use dask_spank_common::records::{now, ClusterDir, ClusterState, JobReport, ReportState};
use dask_spank_common::schedfile::SchedulerInfo;
use dask_spank_common::{ClusterName, Role};
use session::{Finished, Session};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// What the job is, from the environment Slurm and the plugin gave it.
struct Job {
    id: u32,
    role: Role,
    cluster: ClusterName,
    /// A worker job's pool (None: the default pool).
    pool: Option<PoolName>,
    socket: PathBuf,
    dir: ClusterDir,
    tls: bool,
    grace: Duration,
}

fn need(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| {
        format!("{name} is not set: run `dask-spank attach` only inside a job submitted with --dask-role")
    })
}

fn env_id(name: &str) -> Option<u32> {
    std::env::var(name).ok()?.parse().ok()
}

impl Job {
    fn from_env() -> Result<Job, String> {
        let id: u32 = need("SLURM_JOB_ID")?
            .parse()
            .map_err(|_| "SLURM_JOB_ID is not a number".to_string())?;
        let role: Role = need(vars::ROLE)?.parse().map_err(|e| format!("{e}"))?;
        let cluster: ClusterName = need(vars::CLUSTER)?.parse().map_err(|e| format!("{e}"))?;
        // Set by the plugin for every job (empty: the default pool).
        let pool = match std::env::var(vars::POOL) {
            Ok(p) if !p.is_empty() => Some(p.parse().map_err(|e| format!("{e}"))?),
            _ => None,
        };
        let socket = PathBuf::from(need(vars::AGENT_SOCKET)?);
        let root = crate::cluster::root()?;
        let dir = cluster_dir(&root, &cluster);
        make_private_dir(&root, &dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Job {
            id,
            role,
            cluster,
            pool,
            socket,
            dir: ClusterDir(dir),
            tls: std::env::var(vars::TLS).map_or(true, |v| v != "off"),
            grace: std::env::var(vars::AGENT_GRACE)
                .ok()
                .and_then(|s| s.parse().ok())
                .map_or(Duration::from_secs(30), Duration::from_secs),
        })
    }

    fn report(&self, state: ReportState, reason: Option<String>) -> JobReport {
        JobReport {
            job_id: self.id,
            label: dask_spank_common::names::job_label(
                self.id,
                env_id("SLURM_ARRAY_JOB_ID"),
                env_id("SLURM_ARRAY_TASK_ID"),
            ),
            role: self.role.to_string(),
            state,
            reason,
            node: std::env::var("SLURMD_NODENAME").unwrap_or_default(),
            log: std::fs::read_link("/proc/self/fd/1")
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            updated: now(),
            pool: self.pool.as_ref().map(|p| p.to_string()),
        }
    }

    /// A scheduler job starts afresh: no earlier scheduler's state or
    /// file (it would send workers to a dead address), and the cluster's
    /// TLS credentials.
    fn prepare_scheduler(&self) -> Result<(), String> {
        self.dir.clear_scheduler_state();
        let f = scheduler_file(self.dir.path());
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the old {}: {e}", f.display())),
        }
        if self.tls {
            crate::tls::ensure(self.dir.path(), self.cluster.as_str())?;
        }
        dashboard_token(self.dir.path())
    }
}

/// A fresh dashboard token for this scheduler job (0600, in the private
/// cluster directory): its dashboard answers only those who read it.
fn dashboard_token(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(dask_spank_common::paths::layout::DASHBOARD_TOKEN);
    dask_spank_common::files::write_atomic(&path, token.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `dask-spank attach`: the exit code of the job's dask process.
pub fn attach() -> Result<i32, String> {
    let job = Job::from_env()?;
    if job.role == Role::Scheduler {
        job.prepare_scheduler()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(run(job))
}

async fn run(job: Job) -> Result<i32, String> {
    let attach = Attach {
        job_id: job.id,
        cwd: std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?,
        env: std::env::vars().collect(),
        cluster_dir: job.dir.path().to_path_buf(),
        reattach: false,
        forkserver_fd: false,
    };
    let mut signals = Signals::new()?;
    let mut session = Session::open(job.socket.clone(), attach)
        .await
        .map_err(|e| e.to_string())?;
    let _ = job
        .dir
        .write_report(&job.report(ReportState::Running, None));
    let keeper = (job.role == Role::Scheduler).then(|| start_scheduler_duties(&job));
    if job.role == Role::Worker {
        // Off the runtime: a slow controller must not hold the job's
        // signals or its session.
        let (dir, cluster, pool, id) = (
            job.dir.clone(),
            job.cluster.clone(),
            job.pool.clone(),
            job.id,
        );
        tokio::task::spawn_blocking(move || {
            shape::record_if_first(&dir, &cluster, pool.as_ref(), id)
        });
    }
    let end = tokio::select! {
        end = follow(&job, &mut session) => end,
        sig = signals.recv() => {
            end_of_job(&job, keeper);
            let reason = format!("the job was cancelled or reached its time limit ({sig})");
            let _ = job.dir.write_report(&job.report(ReportState::Ended, Some(reason)));
            std::process::exit(128 + sig as i32);
        }
    };
    end_of_job(&job, keeper);
    let state = end_state(end.exit_code);
    let _ = job
        .dir
        .write_report(&job.report(state, Some(end.reason.clone())));
    if end.agent_lost {
        return Err(end.reason);
    }
    eprintln!("dask-spank: {} finished: {}", job.role, end.reason);
    Ok(end.exit_code)
}

/// How often a worker job looks for its scheduler's address (a scheduler
/// that came up or moved) to report it to the agent, which checks with it
/// whether a worker that ended or is stopping still has a scheduler. The
/// worker's start does not wait for it (the boot code waits for the
/// scheduler file itself); until 8181eba the agent held a TLS worker until
/// this report, and the first look came every 200 ms.
const REPORT_POLL: Duration = Duration::from_secs(1);

/// Follow the agent to the end of the job's dask processes, reattaching
/// after an agent restart; a worker job meanwhile reports its scheduler's
/// address, over TLS once the cluster's credentials exist too.
async fn follow(job: &Job, session: &mut Session) -> Finished {
    let sched_file = scheduler_file(job.dir.path());
    let creds = job.tls.then(|| tls_files(job.dir.path()));
    let mut reported = String::new();
    let mut tick = tokio::time::interval(REPORT_POLL);
    loop {
        let lost = {
            let (notices, writer) = session.parts();
            let finished = notices.finished();
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    r = &mut finished => break r,
                    _ = tick.tick(), if job.role == Role::Worker => {
                        if let Some(address) = address_to_report(&sched_file, creds.as_ref(), &reported) {
                            // A write that failed or timed out may have left
                            // half a frame: the connection is done for.
                            match session::report_scheduler(writer, &address).await {
                                Ok(()) => reported = address,
                                Err(e) => break Err(e),
                            }
                        }
                    }
                }
            }
        };
        let lost = match lost {
            Ok(done) => return done,
            Err(e) => e,
        };
        eprintln!(
            "dask-spank: lost the node agent ({lost}); the dask processes run on: waiting up to {}s for the agent to come back",
            job.grace.as_secs()
        );
        match session.reattach(job.grace).await {
            Ok(()) => {
                eprintln!("dask-spank: handed the job over to the node agent again");
                reported.clear();
            }
            Err(why) => {
                session.stop_groups().await;
                return Finished {
                    exit_code: 1,
                    reason: format!(
                        "lost the node agent: {why}; the job's dask processes were stopped"
                    ),
                    agent_lost: true,
                };
            }
        }
    }
}

/// The scheduler's address a worker job has to report, if there is a new
/// one: the scheduler file's, once the cluster's credentials exist too
/// (`creds`, with TLS), and not the one `reported` already. Apart from
/// `follow` so that the rule is tested without an agent.
fn address_to_report(
    sched_file: &Path,
    creds: Option<&TlsFiles>,
    reported: &str,
) -> Option<String> {
    let ready = creds.is_none_or(|c| c.all_exist());
    let info = ready.then(|| SchedulerInfo::read(sched_file)).flatten();
    info.filter(|i| i.address != reported).map(|i| i.address)
}

/// How the job's report records its end: a non-zero exit code is a
/// failure. Apart from `run` so that the rule is tested.
fn end_state(exit_code: i32) -> ReportState {
    if exit_code == 0 {
        ReportState::Ended
    } else {
        ReportState::Failed
    }
}

/// The scheduler job's keeper, and the cluster's state every 2 s (the
/// scheduler's addresses, which also tell the keeper's helper where to
/// connect).
fn start_scheduler_duties(job: &Job) -> tokio::task::JoinHandle<()> {
    let (connect_tx, connect_rx) = watch::channel(None);
    let (dir, cluster, id) = (job.dir.clone(), job.cluster.clone(), job.id);
    tokio::spawn(async move {
        let sched_file = scheduler_file(dir.path());
        let tls = tls_files(dir.path());
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let Some(info) = SchedulerInfo::read(&sched_file) else {
                continue;
            };
            // dask writes it with the umask's mode; the directory is
            // private anyway, the file is made so too.
            let _ = std::fs::set_permissions(
                &sched_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            );
            let _ = dir.write_state(&ClusterState {
                cluster: cluster.to_string(),
                scheduler_job: id.to_string(),
                dashboard_address: info.dashboard_url(),
                scheduler_address: info.address.clone(),
                scheduler_file: sched_file.clone(),
                updated: now(),
            });
            let order = keeper::connect_order(&info.address, &tls);
            connect_tx.send_if_modified(|o| {
                let new = o.as_ref() != Some(&order);
                *o = Some(order);
                new
            });
        }
    });
    let k = keeper::Keeper::new(job.cluster.clone(), job.dir.clone());
    tokio::spawn(k.run(connect_rx))
}

/// The job ends: the keeper stops (its helper with it), and the worker
/// jobs of a kept cluster end with their scheduler job.
fn end_of_job(job: &Job, keeper: Option<tokio::task::JoinHandle<()>>) {
    if let Some(k) = keeper {
        k.abort();
        keeper::helper::kill_running();
        keeper::end_of_cluster(&job.cluster, &job.dir);
    }
}

/// SIGTERM (scancel, walltime: Slurm signals the job's batch process),
/// SIGINT and SIGHUP.
struct Signals(Vec<tokio::signal::unix::Signal>);

impl Signals {
    fn new() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ];
        kinds
            .iter()
            .map(|k| signal(*k).map_err(|e| format!("cannot handle signals: {e}")))
            .collect::<Result<_, _>>()
            .map(Signals)
    }

    /// The next signal, as its number.
    async fn recv(&mut self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        let [t, i, h] = &mut self.0[..] else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = t.recv() => Signal::SIGTERM,
            _ = i.recv() => Signal::SIGINT,
            _ = h.recv() => Signal::SIGHUP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_spank_common::awire;
    use dask_spank_common::{Response, SessionRequest};
    use session::tests::{attach_req, greet, socket_path, take_over};
    use std::os::unix::fs::PermissionsExt;
    use tokio::net::UnixListener;

    /// A job of cluster `ana` whose directory is fresh and private, and
    /// whose agent socket is `socket`.
    fn job(tag: &str, role: Role, socket: PathBuf) -> Job {
        let dir = std::env::temp_dir().join(format!("dsp-rt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        Job {
            id: 7,
            role,
            cluster: "ana".parse().unwrap(),
            pool: Some("gpu".parse().unwrap()),
            socket,
            dir: ClusterDir(dir),
            tls: false,
            grace: Duration::from_millis(300),
        }
    }

    #[test]
    fn a_scheduler_job_starts_without_its_predecessors_state_and_with_a_fresh_token() {
        let mut j = job("prepare", Role::Scheduler, "/none".into());
        let d = j.dir.path().to_path_buf();
        for f in ["state.json", "connected.json", "scheduler.json"] {
            std::fs::write(d.join(f), "{}").unwrap();
        }
        j.prepare_scheduler().unwrap();
        for f in ["state.json", "connected.json", "scheduler.json"] {
            assert!(!d.join(f).exists(), "{f} is left");
        }
        let token = j.dir.dashboard_token().unwrap();
        assert_eq!(token.len(), 48);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        let token_file = d.join(dask_spank_common::paths::layout::DASHBOARD_TOKEN);
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Again, with nothing to remove and with TLS: a new token, and the
        // cluster's credentials.
        j.tls = true;
        j.prepare_scheduler().unwrap();
        assert_ne!(j.dir.dashboard_token().unwrap(), token);
        assert!(tls_files(&d).all_exist());
    }

    #[test]
    fn a_jobs_report_says_its_role_pool_state_and_reason_and_failure_is_a_non_zero_exit() {
        let j = job("report", Role::Worker, "/none".into());
        let r = j.report(end_state(2), Some("worker died".into()));
        assert_eq!(r.job_id, 7);
        assert_eq!(r.role, "worker");
        assert_eq!(r.pool.as_deref(), Some("gpu"));
        assert_eq!(r.state, ReportState::Failed);
        assert_eq!(r.reason.as_deref(), Some("worker died"));
        assert!(now().saturating_sub(r.updated) <= 1);
        assert_eq!(end_state(0), ReportState::Ended);
        assert_eq!(end_state(-9), ReportState::Failed);
        // The records read it back by its label.
        j.dir.write_report(&r).unwrap();
        assert_eq!(j.dir.reports(), [r]);
    }

    #[test]
    fn a_worker_reports_a_new_address_once_the_credentials_exist() {
        let j = job("address", Role::Worker, "/none".into());
        let d = j.dir.path();
        let sf = scheduler_file(d);
        let creds = tls_files(d);
        assert_eq!(address_to_report(&sf, None, ""), None, "no scheduler file");
        std::fs::write(&sf, r#"{"address": "tls://n1:8786"}"#).unwrap();
        assert_eq!(
            address_to_report(&sf, None, "").as_deref(),
            Some("tls://n1:8786")
        );
        assert_eq!(address_to_report(&sf, None, "tls://n1:8786"), None);
        // With TLS: not before all three credentials are there.
        std::fs::write(&creds.key, "k").unwrap();
        std::fs::write(&creds.cert, "c").unwrap();
        assert_eq!(address_to_report(&sf, Some(&creds), ""), None);
        std::fs::write(&creds.ca, "a").unwrap();
        assert_eq!(
            address_to_report(&sf, Some(&creds), "tcp://old:1").as_deref(),
            Some("tls://n1:8786")
        );
    }

    #[tokio::test]
    async fn a_worker_job_tells_its_scheduler_and_ends_with_the_agents_word() {
        let path = socket_path("follow");
        let l = UnixListener::bind(&path).unwrap();
        let j = job("follow", Role::Worker, path.clone());
        let sf = scheduler_file(j.dir.path());
        std::fs::write(&sf, r#"{"address": "tcp://n1:8786"}"#).unwrap();
        let agent = async {
            let (mut s, _, _) = greet(&l).await;
            take_over(&mut s, false).await;
            let got: SessionRequest = awire::read(&mut s, 1 << 20).await.unwrap();
            let end = Response::Finished {
                exit_code: 0,
                reason: "done".into(),
            };
            awire::write(&mut s, &end).await.unwrap();
            (s, got)
        };
        let client = async {
            let mut session = Session::open(path.clone(), attach_req()).await.unwrap();
            follow(&j, &mut session).await
        };
        let ((_s, got), end) = tokio::join!(agent, client);
        let want = SessionRequest::SchedulerAddress {
            address: "tcp://n1:8786".into(),
        };
        assert_eq!(got, want);
        let done = Finished {
            exit_code: 0,
            reason: "done".into(),
            agent_lost: false,
        };
        assert_eq!(end, done);
    }

    #[tokio::test]
    async fn an_agent_that_does_not_come_back_fails_the_job_as_lost() {
        let path = socket_path("gone");
        let l = UnixListener::bind(&path).unwrap();
        let j = job("gone", Role::Scheduler, path.clone());
        let agent = async {
            let (mut s, _, _) = greet(&l).await;
            take_over(&mut s, false).await;
            s
        };
        let (s, session) = tokio::join!(agent, Session::open(path.clone(), attach_req()));
        let mut session = session.unwrap();
        drop((s, l));
        std::fs::remove_file(&path).unwrap();
        let end = follow(&j, &mut session).await;
        assert_eq!(end.exit_code, 1);
        assert!(end.agent_lost);
        assert!(
            end.reason
                .starts_with("lost the node agent: it did not come back within 0s ("),
            "{}",
            end.reason
        );
        assert!(end
            .reason
            .ends_with("; the job's dask processes were stopped"));
    }
}
