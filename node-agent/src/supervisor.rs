//! The nanny: runs one job's dask process, restarts a crashed worker with
//! capped exponential backoff, gives up on a crash loop, terminates a
//! worker over its memory limit, retires workers before the walltime, and
//! stops everything when told to. One task per job.
//!
//! It sees only its own job ([`Context`]): the job's handle in the table,
//! the metrics, the node's memory watchdog and the scheduler address the
//! job's attach process reported. Starting, waiting for and stopping
//! processes is `process`'s business; when to restart is `restart`'s.

use crate::dask_cmd::{command, lifetime, tls_env, DaskSettings, Limits};
use crate::forkserver::ForkServer;
use crate::jobenv::JobEnv;
use crate::joblog::JobLog;
use crate::jobs::{JobHandle, Stop, StopRx};
use crate::memwatch::MemWatch;
use crate::metrics::{Gauge, Metrics};
use crate::process::Proc;
use crate::procfs;
use crate::restart::{CrashLog, Decision, RestartPolicy};
use crate::rlimits::Rlimit;
use crate::spawn::{spawn, Identity, SpawnRequest};
use dask_spank_common::policy::{TlsMode, WorkerStart};
use dask_spank_common::{JobSpec, JobState, Role};
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a process gets between SIGTERM and SIGKILL when its job stops.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping worker may outlive its scheduler, and how often the
/// scheduler is looked for meanwhile.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);
const ORPHAN_POLL: Duration = Duration::from_millis(250);
/// The same after a memory kill (the process is already misbehaving).
const MEMORY_KILL_GRACE: Duration = Duration::from_secs(2);

/// What a supervisor may touch besides its own job's processes.
pub struct Context {
    pub job: JobHandle,
    pub metrics: Arc<Metrics>,
    pub memwatch: Arc<MemWatch>,
    /// The scheduler's address, as the job's attach process last read it.
    pub scheduler: watch::Receiver<Option<String>>,
}

/// Everything about one job's run, fixed at attach.
pub struct JobRun {
    pub spec: JobSpec,
    pub cwd: PathBuf,
    pub cluster_dir: PathBuf,
    pub env: JobEnv,
    pub log: JobLog,
    pub settings: DaskSettings,
    /// The job's memory in MiB, as Slurm granted it (0: unknown).
    pub mem_mb: u64,
    /// When workers must have retired (walltime minus a margin).
    pub retire_at: Option<Instant>,
    /// The job's cgroups (`cgroup.procs` files) and resource limits.
    pub cgroups: Vec<PathBuf>,
    pub rlimits: Vec<Rlimit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: i32,
    pub reason: String,
}

pub fn describe(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "unknown status".into(),
    }
}

/// Whether the scheduler accepts TCP connections: `None` when no address
/// is known yet (the scheduler may still be starting).
async fn scheduler_reachable(addr: &watch::Receiver<Option<String>>) -> Option<bool> {
    let hostport = {
        let a = addr.borrow();
        let a = a.as_deref()?;
        a.split_once("://")
            .map(|(_, hp)| hp)
            .unwrap_or(a)
            .to_string()
    };
    let connect = tokio::net::TcpStream::connect(hostport);
    Some(matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    ))
}

/// Resolves (with the reason) once the scheduler has been unreachable for
/// `ORPHAN_GRACE`: a stopping worker then has nobody to hand its data to,
/// and its close can hang on the lost connection.
async fn orphaned(addr: watch::Receiver<Option<String>>) -> String {
    loop {
        tokio::time::sleep(ORPHAN_POLL).await;
        if scheduler_reachable(&addr).await == Some(false) {
            tokio::time::sleep(ORPHAN_GRACE).await;
            return format!("outlived its scheduler by {}s", ORPHAN_GRACE.as_secs());
        }
    }
}

/// The job's fork server, with its gauge.
struct Server {
    server: ForkServer,
    _running: Gauge,
}

/// Stop a fork server: closing its socket makes it kill what it forked and
/// leave; its process group gets the usual SIGTERM, grace, SIGKILL.
async fn shutdown_server(s: Server, log: &JobLog) {
    let child = s.server.close();
    Proc::Exec(child)
        .stop(STOP_GRACE, std::future::pending(), log)
        .await;
}

/// Start the job's dask process: exec it, or fork it from the job's fork
/// server (started first if there is none or it died).
async fn start<'s>(
    ctx: &Context,
    run: &JobRun,
    req: &SpawnRequest<'_>,
    server: &'s mut Option<Server>,
) -> std::io::Result<Proc<'s>> {
    let forked = run.spec.role == Role::Worker
        && run.spec.policy.nanny.start == WorkerStart::Forkserver
        && run.settings.stub.is_none();
    if !forked {
        return spawn(req).map(Proc::Exec);
    }
    if server.as_ref().is_some_and(|s| !s.server.alive()) {
        run.log.line("the fork server died: starting a new one");
        if let Some(dead) = server.take() {
            shutdown_server(dead, &run.log).await;
        }
    }
    if server.is_none() {
        let s = ForkServer::spawn(req)?;
        if let Ok(id) = procfs::proc_id(s.pid()) {
            ctx.job.started_helper(id);
        }
        run.log.line(&format!(
            "fork server started, pid {}: {} (imports distributed once; workers are forked from it)",
            s.pid(),
            req.program
        ));
        *server = Some(Server {
            server: s,
            _running: Gauge::up(&ctx.metrics, |m| &m.forkservers_running),
        });
    }
    let Some(s) = server.as_mut() else {
        return Err(std::io::Error::other("no fork server"));
    };
    let id = s.server.fork(req.args.get(2..).unwrap_or_default()).await?;
    Ok(Proc::Forked {
        id,
        uid: run.spec.uid,
        server: &mut s.server,
    })
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Stopped(Stop),
    MemoryKill(u64),
}

/// How one start of the dask process ended. `Ok(desc)`: a worker crash to
/// count; `Err(outcome)`: the job's dask processes are over.
async fn one_start(
    ctx: &Context,
    run: &JobRun,
    stop: &mut StopRx,
    server: &mut Option<Server>,
    n: u32,
) -> Result<String, (JobState, Outcome)> {
    let (role, log) = (run.spec.role, &run.log);
    let lifetime_s = worker_lifetime(run).map_err(|r| finished(JobState::Finished, 0, r))?;
    let (program, args) = command(
        &run.spec,
        &run.cluster_dir,
        &run.settings,
        Limits {
            mem_mb: run.mem_mb,
            lifetime_s,
        },
    );
    let output = log
        .fd()
        .map_err(|e| finished(JobState::Failed, 1, format!("cannot use the job log: {e}")))?;
    let tls = tls_env(&run.spec, &run.cluster_dir);
    let extra_env: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let identity = Identity {
        uid: run.spec.uid,
        gid: run.spec.gid,
        groups: run.spec.groups.clone(),
    };
    let req = SpawnRequest {
        program: &program,
        args: &args,
        env: &run.env,
        cwd: &run.cwd,
        identity: &identity,
        output: &output,
        rlimits: &run.rlimits,
        cgroup_procs: &run.cgroups,
        stdin: None,
        extra_env: &extra_env,
        // The scheduler writes the scheduler file: private to the user.
        umask: (run.spec.role == Role::Scheduler).then_some(0o077),
    };
    let mut proc = match start(ctx, run, &req, server).await {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("cannot start {program}: {e}");
            log.line(&reason);
            return Err(finished(JobState::Failed, 1, reason));
        }
    };
    let pid = proc.pid();
    if let Ok(id) = procfs::proc_id(pid) {
        ctx.job.running(id);
    }
    let _running = Gauge::up(
        &ctx.metrics,
        match role {
            Role::Scheduler => |m: &Metrics| &m.schedulers_running,
            Role::Worker => |m: &Metrics| &m.workers_running,
        },
    );
    log_start(run, &proc, n, &program, &args);
    let started = Instant::now();
    let ended = watch_until_end(ctx, run, &mut proc, stop).await;
    conclude(ctx, run, stop, proc, ended, started).await
}

/// What to do once a start ended: stop what is left of it, and tell the
/// nanny loop whether this was a crash to count or the end.
async fn conclude(
    ctx: &Context,
    run: &JobRun,
    stop: &StopRx,
    proc: Proc<'_>,
    ended: Ended,
    started: Instant,
) -> Result<String, (JobState, Outcome)> {
    let (role, log, pid) = (run.spec.role, &run.log, proc.pid());
    match ended {
        Ended::Stopped(reason) => {
            log.line(&format!("stopping {role} (pid {pid}): {}", reason.reason));
            ctx.job.set_state(JobState::Stopping);
            let hurry = async {
                match role {
                    Role::Worker => orphaned(ctx.scheduler.clone()).await,
                    Role::Scheduler => std::future::pending().await,
                }
            };
            proc.stop(STOP_GRACE, hurry, log).await;
            log.line(&format!("{role} stopped"));
            Err(stopped(reason))
        }
        Ended::MemoryKill(rss) => {
            let desc = format!(
                "memory kill: {rss} MiB resident exceeds {}% of the job's {} MiB",
                run.spec.policy.nanny.memory_kill_percent, run.mem_mb
            );
            log.line(&format!("{desc}: terminating the worker"));
            proc.stop(MEMORY_KILL_GRACE, std::future::pending(), log)
                .await;
            ctx.metrics.memory_kills.fetch_add(1, Relaxed);
            ctx.job.memory_killed();
            Ok(desc)
        }
        Ended::Exited(status) => {
            proc.clean_up(log).await;
            exited(ctx, run, stop, status, started).await
        }
    }
}

/// A worker's `--lifetime`: what is left before it must retire, or the
/// reason not to start it at all (its walltime is near).
fn worker_lifetime(run: &JobRun) -> Result<Option<u64>, String> {
    match run.retire_at {
        Some(t) if run.spec.role == Role::Worker => {
            let left = t.saturating_duration_since(Instant::now()).as_secs();
            if left < 5 {
                let reason = "the job's walltime is near: worker not restarted".to_string();
                run.log.line(&reason);
                return Err(reason);
            }
            Ok(Some(left))
        }
        _ => Ok(None),
    }
}

fn log_start(run: &JobRun, proc: &Proc<'_>, n: u32, program: &str, args: &[String]) {
    let (role, pid) = (run.spec.role, proc.pid());
    let what = if n == 1 { "started" } else { "restarted" };
    match proc {
        Proc::Exec(_) => run.log.line(&format!(
            "{role} {what}, pid {pid}: {program} {}",
            args.join(" ")
        )),
        Proc::Forked { server, .. } => run.log.line(&format!(
            "{role} {what}, pid {pid}, forked by the fork server (pid {}): dask-worker {}",
            server.pid(),
            args.get(2..).unwrap_or_default().join(" ")
        )),
    }
}

/// Until the process exits, the job is stopped, or the watchdog finds the
/// worker over its memory limit.
async fn watch_until_end(
    ctx: &Context,
    run: &JobRun,
    proc: &mut Proc<'_>,
    stop: &mut StopRx,
) -> Ended {
    let nanny = &run.spec.policy.nanny;
    let limit = (run.spec.role == Role::Worker && run.mem_mb > 0)
        .then(|| run.mem_mb * nanny.memory_kill_percent as u64 / 100);
    // Watched by the node's one memory watchdog until this start ends.
    let (_watching, mut over) = match limit {
        Some(l) => {
            let (g, rx) = ctx.memwatch.watch(&proc.job_pids(), l);
            (Some(g), Some(rx))
        }
        None => (None, None),
    };
    tokio::select! {
        status = proc.wait() => Ended::Exited(status),
        _ = stop.changed() => Ended::Stopped(current_stop(stop)),
        Some(Ok(rss)) = async { match over.as_mut() { Some(rx) => Some(rx.await), None => None } } => Ended::MemoryKill(rss),
    }
}

/// The dask process exited by itself: a crash to count, or the end.
async fn exited(
    ctx: &Context,
    run: &JobRun,
    stop: &StopRx,
    status: std::io::Result<ExitStatus>,
    started: Instant,
) -> Result<String, (JobState, Outcome)> {
    let (role, log) = (run.spec.role, &run.log);
    let desc = status
        .as_ref()
        .map(describe)
        .unwrap_or_else(|e| e.to_string());
    if let Some(reason) = stop.borrow().clone() {
        log.line(&format!(
            "{role} exited ({desc}) while stopping: {}",
            reason.reason
        ));
        return Err(stopped(reason));
    }
    let ok = status.as_ref().map(|s| s.success()).unwrap_or(false);
    if role == Role::Scheduler || ok {
        let reason = format!(
            "{role} exited ({desc}) after {}s",
            started.elapsed().as_secs()
        );
        log.line(&reason);
        let code = status.ok().and_then(|s| s.code()).unwrap_or(1);
        let state = if code == 0 {
            JobState::Finished
        } else {
            JobState::Failed
        };
        return Err(finished(state, code, reason));
    }
    if scheduler_reachable(&ctx.scheduler).await == Some(false) {
        let reason =
            format!("worker exited ({desc}) and its scheduler is unreachable: the worker leaves");
        log.line(&reason);
        return Err(finished(JobState::Finished, 0, reason));
    }
    Ok(format!("worker died ({desc})"))
}

/// The stop asked for (a stop without a reason cannot happen: the
/// channel only ever goes from none to some).
fn current_stop(stop: &StopRx) -> Stop {
    stop.borrow().clone().unwrap_or(Stop {
        reason: "stopped".into(),
        failure: false,
    })
}

/// How a stopped job ends: failed when the agent stopped it for its own
/// reasons (its jobs must not look COMPLETED), finished otherwise.
fn stopped(s: Stop) -> (JobState, Outcome) {
    if s.failure {
        finished(JobState::Failed, 1, s.reason)
    } else {
        finished(JobState::Finished, 0, s.reason)
    }
}

fn finished(state: JobState, exit_code: i32, reason: String) -> (JobState, Outcome) {
    (state, Outcome { exit_code, reason })
}

/// A TLS worker needs the cluster's credentials, which its scheduler job
/// makes: wait until the job's attach reports the scheduler (it does once
/// the credentials exist), or the job is stopped (the reason).
async fn wait_for_scheduler(
    ctx: &mut Context,
    run: &JobRun,
    stop: &mut StopRx,
) -> Result<(), Stop> {
    if run.spec.role != Role::Worker
        || run.spec.policy.tls != TlsMode::Required
        || run.settings.stub.is_some()
    {
        return Ok(());
    }
    if ctx.scheduler.borrow().is_none() {
        run.log.line("waiting for the cluster's scheduler and TLS credentials (made by its scheduler job) before starting the worker");
    }
    loop {
        if ctx.scheduler.borrow().is_some() {
            return Ok(());
        }
        tokio::select! {
            r = ctx.scheduler.changed() => if r.is_err() {
                return Err(Stop { reason: "the job's attach connection ended".into(), failure: false });
            },
            _ = stop.changed() => return Err(current_stop(stop)),
        }
    }
}

/// Run the job's dask process until it ends for good or `stop` fires.
pub async fn run(mut ctx: Context, run: JobRun, mut stop: StopRx) -> Outcome {
    if let Err(s) = wait_for_scheduler(&mut ctx, &run, &mut stop).await {
        let (state, outcome) = stopped(s);
        ctx.job.finished(state, &outcome.reason);
        return outcome;
    }
    let nanny = &run.spec.policy.nanny;
    let policy = RestartPolicy {
        max_crashes: nanny.restart_max as usize,
        window: Duration::from_secs(nanny.restart_window_s),
        ..RestartPolicy::default()
    };
    let mut crashes = CrashLog::default();
    let mut server = None;
    let mut starts = 0;
    let (state, outcome) = loop {
        if let Some(reason) = stop.borrow().clone() {
            break stopped(reason);
        }
        starts += 1;
        let desc = match one_start(&ctx, &run, &mut stop, &mut server, starts).await {
            Ok(desc) => desc,
            Err(end) => break end,
        };
        match crashes.record(&policy, Instant::now()) {
            Decision::Restart(delay) => {
                run.log.line(&format!(
                    "{desc}; restarting in {:.1}s",
                    delay.as_secs_f64()
                ));
                ctx.metrics.restarts.fetch_add(1, Relaxed);
                ctx.job.restarting(&desc);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
            Decision::GiveUp(why) => {
                let reason = format!("{desc}; {why}; not restarting");
                run.log.line(&reason);
                ctx.metrics.crash_loop_giveups.fetch_add(1, Relaxed);
                break finished(JobState::Failed, 1, reason);
            }
        }
    };
    if let Some(s) = server {
        shutdown_server(s, &run.log).await;
    }
    ctx.job.finished(state, &outcome.reason);
    outcome
}

/// When workers of a job must retire: its remaining walltime less the
/// policy's margin (see `dask_cmd::lifetime`).
pub fn retire_at(remaining_s: Option<u64>, margin_s: u64) -> Option<Instant> {
    remaining_s.map(|r| Instant::now() + Duration::from_secs(lifetime(r, margin_s)))
}
