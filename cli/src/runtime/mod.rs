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
use dask_spank_common::paths::{cluster_dir, make_private_dir, scheduler_file, tls_files, vars};
use dask_spank_common::records::{now, ClusterDir, ClusterState, JobReport, ReportState};
use dask_spank_common::schedfile::SchedulerInfo;
use dask_spank_common::{ClusterName, Role};
use session::{Finished, Session};
use std::path::PathBuf;
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
    let state = if end.exit_code == 0 {
        ReportState::Ended
    } else {
        ReportState::Failed
    };
    let _ = job
        .dir
        .write_report(&job.report(state, Some(end.reason.clone())));
    if end.agent_lost {
        return Err(end.reason);
    }
    eprintln!("dask-spank: {} finished: {}", job.role, end.reason);
    Ok(end.exit_code)
}

/// Follow the agent to the end of the job's dask processes, reattaching
/// after an agent restart; a worker job meanwhile reports its scheduler's
/// address, once the cluster's credentials exist too (the agent starts a
/// TLS worker only then).
async fn follow(job: &Job, session: &mut Session) -> Finished {
    let sched_file = scheduler_file(job.dir.path());
    let creds = job.tls.then(|| tls_files(job.dir.path()));
    let mut reported = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let lost = {
            let (notices, writer) = session.parts();
            let finished = notices.finished();
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    r = &mut finished => break r,
                    _ = tick.tick(), if job.role == Role::Worker => {
                        let ready = creds.as_ref().is_none_or(|c| c.all_exist());
                        let info = ready.then(|| SchedulerInfo::read(&sched_file)).flatten();
                        if let Some(info) = info.filter(|i| i.address != reported) {
                            // A write that failed or timed out may have left
                            // half a frame: the connection is done for.
                            match session::report_scheduler(writer, &info.address).await {
                                Ok(()) => reported = info.address,
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
