//! The nanny: runs one job's dask process, restarts a crashed worker with
//! capped exponential backoff, gives up on a crash loop, terminates a
//! worker over its memory limit, retires workers before the walltime, and
//! stops everything when told to. One task per job.
//!
//! It sees only its own job ([`Context`]): the job's handle in the table,
//! the metrics, the node's memory watchdog and the scheduler address the
//! job's attach process reported. Starting, waiting for and stopping
//! processes is `process`'s business; when to restart is `restart`'s.

use crate::spawning::child::Child;
use crate::spawning::dask_cmd::{
    boot_env, command, dask_args, exec_form, lifetime, site_env, DaskSettings, Limits,
    RESTART_EXIT, STARTUP_FAILED_EXIT,
};
use crate::spawning::forkserver::ForkServer;
use crate::spawning::jobenv::JobEnv;
use crate::spawning::joblog::JobLog;
use crate::spawning::process::Proc;
use crate::spawning::spawn::{spawn, Identity, SpawnError, SpawnRequest, Starter};
use crate::supervision::jobs::{JobHandle, Stop, StopRx};
use crate::supervision::memwatch::MemWatch;
use crate::supervision::metrics::{Gauge, Metrics};
use crate::supervision::restart::{CrashLog, Decision, RestartPolicy, StartFailures};
use crate::system::procfs::{self, ProcId};
use crate::system::reach;
use crate::system::rlimits::Rlimit;
use crate::system::statefile::Running;
use dask_spank_common::messages::ProcIdent;
use dask_spank_common::policy::WorkerStart;
use dask_spank_common::{JobSpec, JobState, Role};
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::watch;

/// How long a process gets between SIGTERM and SIGKILL when its job stops.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping worker may outlive its scheduler, and how often the
/// scheduler is looked for meanwhile.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);
const ORPHAN_POLL: Duration = Duration::from_millis(250);
/// How long one connection attempt to the scheduler may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker that exited with its scheduler silent (no connection,
/// no refusal) waits for an answer before it leaves instead of starting
/// again: a live scheduler can be silent while hundreds of starting workers
/// fill its accept queue (`reach::gone`). A cancelled scheduler's port
/// refuses at once, so its workers do not wait for this.
const SILENT_SCHEDULER_GRACE: Duration = Duration::from_secs(15);
/// The same after a memory kill (the process is already misbehaving).
const MEMORY_KILL_GRACE: Duration = Duration::from_secs(2);

/// What a supervisor tells the job's attach process (through its
/// connection): what it must stop itself, and keep, should the agent go
/// away for good or come back.
pub enum Notice {
    /// The job's process groups now (their leaders).
    Processes(Vec<ProcIdent>),
    /// The agent's end of the fork server's control socket.
    HoldFd(OwnedFd),
}

/// What a supervisor may touch besides its own job's processes.
pub struct Context {
    pub job: JobHandle,
    pub metrics: Arc<Metrics>,
    pub memwatch: Arc<MemWatch>,
    /// The scheduler's address, as the job's attach process last read it.
    pub scheduler: watch::Receiver<Option<String>>,
    pub notify: mpsc::UnboundedSender<Notice>,
    /// How processes are started (the spawner, the deadline).
    pub starter: Arc<Starter>,
}

/// What a previous agent left running for the job, to adopt.
pub struct Adoption {
    pub running: Running,
    /// The fork server's control socket, from the job's attach process.
    pub forkserver_fd: Option<OwnedFd>,
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
    /// After an agent restart: what runs already.
    pub adopt: Option<Adoption>,
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

/// The scheduler's `host:port`, once known (not while it may still be
/// starting).
fn scheduler_hostport(addr: &watch::Receiver<Option<String>>) -> Option<String> {
    let a = addr.borrow();
    let a = a.as_deref()?;
    Some(
        a.split_once("://")
            .map(|(_, hp)| hp)
            .unwrap_or(a)
            .to_string(),
    )
}

/// Whether the scheduler has gone, asked the way the job's user would
/// (`reach`): its port refuses, or it stays silent for
/// `SILENT_SCHEDULER_GRACE`. `false` while no address is known.
async fn scheduler_gone(addr: &watch::Receiver<Option<String>>, spec: &JobSpec) -> bool {
    match scheduler_hostport(addr) {
        Some(hp) => {
            reach::gone(
                &hp,
                spec.uid,
                spec.gid,
                SILENT_SCHEDULER_GRACE,
                PROBE_TIMEOUT,
            )
            .await
        }
        None => false,
    }
}

/// Resolves (with the reason) once the scheduler has been unreachable for
/// `ORPHAN_GRACE`: a stopping worker then has nobody to hand its data to,
/// and its close can hang on the lost connection.
async fn orphaned(addr: watch::Receiver<Option<String>>, spec: &JobSpec) -> String {
    loop {
        tokio::time::sleep(ORPHAN_POLL).await;
        let Some(hp) = scheduler_hostport(&addr) else {
            continue;
        };
        if reach::probe(&hp, spec.uid, spec.gid, PROBE_TIMEOUT).await != reach::Reply::Answered {
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

/// Whether the job's worker is forked from a fork server (else exec'd).
fn forked(run: &JobRun) -> bool {
    run.spec.role == Role::Worker
        && run.spec.policy.nanny.start == WorkerStart::Forkserver
        && run.settings.stub.is_none()
}

/// Start the job's dask process: exec it, or fork it from the job's fork
/// server (started first if there is none or it died).
async fn start<'s>(
    ctx: &Context,
    run: &JobRun,
    req: &SpawnRequest<'_>,
    server: &'s mut Option<Server>,
) -> Result<Proc<'s>, SpawnError> {
    if !forked(run) {
        let (args, sched_file) = exec_form(req.args);
        let mut env = req.extra_env.to_vec();
        if let Some((k, v)) = &sched_file {
            env.push((k, v));
        }
        let short = SpawnRequest {
            args: &args,
            extra_env: &env,
            ..*req
        };
        return spawn(&short).await.map(Proc::Exec);
    }
    if server.as_ref().is_some_and(|s| !s.server.alive()) {
        run.log.line("the fork server died: starting a new one");
        if let Some(dead) = server.take() {
            shutdown_server(dead, &run.log).await;
        }
    }
    if server.is_none() {
        let s = ForkServer::spawn(req).await?;
        if let Ok(fd) = s.control_fd() {
            let _ = ctx.notify.send(Notice::HoldFd(fd));
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
        return Err(std::io::Error::other("no fork server").into());
    };
    let id = s.server.fork(dask_args(req.args)).await?;
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

/// What was adopted: an exec'd process, or a worker of the fork server
/// (which then sits in the supervisor's server slot).
enum Adopted {
    Exec(Child),
    Forked(ProcId),
}

/// Adopt what a previous agent left running, if it still runs.
fn adopt(
    ctx: &Context,
    run: &JobRun,
    a: Adoption,
    server: &mut Option<Server>,
) -> std::io::Result<Adopted> {
    let uid = run.spec.uid;
    let Some(fs) = a.running.forkserver else {
        return Child::adopt(a.running.dask, uid).map(Adopted::Exec);
    };
    let fd = a.forkserver_fd.ok_or_else(|| {
        std::io::Error::other("the job's attach process did not keep the fork server's socket")
    })?;
    let forkserver = ForkServer::adopt(fd, fs, uid, a.running.dask.pid)?;
    if !procfs::exists(a.running.dask) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the worker is gone",
        ));
    }
    if let Ok(fd) = forkserver.control_fd() {
        let _ = ctx.notify.send(Notice::HoldFd(fd));
    }
    *server = Some(Server {
        server: forkserver,
        _running: Gauge::up(&ctx.metrics, |m| &m.forkservers_running),
    });
    Ok(Adopted::Forked(a.running.dask))
}

/// Count and log what became of a process a previous agent left.
fn log_adoption(ctx: &Context, run: &JobRun, pid: i32, adopted: &std::io::Result<Adopted>) {
    match adopted {
        Ok(_) => {
            ctx.metrics.adopted.fetch_add(1, Relaxed);
            run.log.line(&format!(
                "{} adopted, pid {pid} (it ran on while the node agent restarted)",
                run.spec.role
            ));
        }
        // It ended while no agent ran: a crash like any other.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            run.log.line(&format!(
                "the {} (pid {pid}) ended while the node agent was away; starting it again",
                run.spec.role
            ));
        }
        Err(e) => {
            ctx.metrics.lost.fetch_add(1, Relaxed);
            run.log.line(&format!(
                "the {} (pid {pid}) could not be adopted: {e}; starting it again",
                run.spec.role
            ));
        }
    }
}

/// Start the job's dask process, or adopt it: the process, and what to log.
async fn launch<'s>(
    ctx: &Context,
    run: &JobRun,
    server: &'s mut Option<Server>,
    adoption: Option<Adoption>,
    n: u32,
) -> Result<Proc<'s>, (JobState, Outcome)> {
    if let Some(a) = adoption {
        let pid = a.running.dask.pid;
        let adopted = adopt(ctx, run, a, server);
        log_adoption(ctx, run, pid, &adopted);
        match adopted {
            Ok(Adopted::Exec(c)) => return Ok(Proc::Exec(c)),
            Ok(Adopted::Forked(id)) => {
                // Every path returns here: the borrow of the server slot
                // is returned with the worker.
                return match server.as_mut() {
                    Some(s) => Ok(Proc::Forked {
                        id,
                        uid: run.spec.uid,
                        server: &mut s.server,
                    }),
                    None => Err(finished(
                        JobState::Failed,
                        1,
                        "the adopted fork server is gone".into(),
                    )),
                };
            }
            Err(_) => {}
        }
    }
    start_afresh(ctx, run, server, n).await
}

/// Start the job's dask process (the `n`th start of the job).
async fn start_afresh<'s>(
    ctx: &Context,
    run: &JobRun,
    server: &'s mut Option<Server>,
    n: u32,
) -> Result<Proc<'s>, (JobState, Outcome)> {
    let lifetime_s = worker_lifetime(run).map_err(|r| finished(JobState::Finished, 0, r))?;
    let limits = Limits {
        mem_mb: run.mem_mb,
        lifetime_s,
    };
    let (program, args) = command(&run.spec, &run.cluster_dir, &run.settings, limits);
    let output = run
        .log
        .fd()
        .map_err(|e| finished(JobState::Failed, 1, format!("cannot use the job log: {e}")))?;
    let tls = site_env(&run.spec, &run.cluster_dir);
    let mut extra_env: Vec<(&str, &str)> =
        tls.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // An exec'd dask command's boot program, which it pops: not for a stub,
    // nor for a fork server, whose workers would inherit it.
    if !forked(run) && run.settings.stub.is_none() {
        extra_env.push(boot_env());
    }
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
        output,
        rlimits: &run.rlimits,
        cgroup_procs: &run.cgroups,
        stdin: None,
        extra_env: &extra_env,
        // The scheduler writes the scheduler file: private to the user.
        umask: (run.spec.role == Role::Scheduler).then_some(0o077),
        via: &ctx.starter,
    };
    match start(ctx, run, &req, server).await {
        Ok(p) => {
            log_start(run, &p, n, &program, &args);
            Ok(p)
        }
        Err(e) => {
            let reason = format!("cannot start {program}: {e}");
            run.log.line(&reason);
            Err(finished(JobState::Failed, 1, reason))
        }
    }
}

/// The identities of a start's process-group leaders: its dask process,
/// and its fork server.
fn leaders(proc: &Proc<'_>) -> (Option<ProcId>, Option<ProcId>) {
    let id = |pid| procfs::proc_id(pid).ok();
    match proc {
        Proc::Exec(c) => (id(c.pid()), None),
        Proc::Forked { id: w, server, .. } => (Some(*w), id(server.pid())),
    }
}

/// Why a worker is started again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Again {
    /// It crashed (or was killed for its memory): counted, backed off.
    Crash(String),
    /// It never started (distributed gave up reaching its scheduler, or
    /// failed starting), after trying this long: counted as a crash, and
    /// restarted after `StartFailures`' growing delay at least.
    NotStarted(String, Duration),
    /// Its scheduler removed it while it ran (`client.restart()`): at once,
    /// in place, not counted as a crash while it is not too often.
    Asked(String),
}

/// In-place restarts a worker gets without counting as crashes: at most 10
/// a minute (more is a loop of its own making: counted as crashes).
fn asked_policy() -> RestartPolicy {
    RestartPolicy {
        max_crashes: 11,
        window: Duration::from_secs(60),
        ..RestartPolicy::default()
    }
}

/// How one start of the dask process ended. `Ok(again)`: the worker is to
/// be started again; `Err(outcome)`: the job's dask processes are over.
async fn one_start(
    ctx: &Context,
    run: &JobRun,
    stop: &mut StopRx,
    server: &mut Option<Server>,
    adoption: Option<Adoption>,
    n: u32,
) -> Result<Again, (JobState, Outcome)> {
    // The start and the end of a start are boxed: their futures (spawning,
    // the fork server, the stop sequence) would otherwise be part of this
    // job's task for its whole life, and an agent holds thousands of jobs
    // that spend it in `watch_until_end`.
    let mut proc = Box::pin(launch(ctx, run, server, adoption, n)).await?;
    if let (Some(dask), fs) = leaders(&proc) {
        ctx.job.running(dask, fs);
        let ids = std::iter::once(dask).chain(fs).collect();
        let _ = ctx.notify.send(Notice::Processes(ids));
    }
    let _running = Gauge::up(
        &ctx.metrics,
        match run.spec.role {
            Role::Scheduler => |m: &Metrics| &m.schedulers_running,
            Role::Worker => |m: &Metrics| &m.workers_running,
        },
    );
    let started = Instant::now();
    let ended = watch_until_end(ctx, run, &mut proc, stop).await;
    Box::pin(conclude(ctx, run, stop, proc, ended, started)).await
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
) -> Result<Again, (JobState, Outcome)> {
    let (role, log, pid) = (run.spec.role, &run.log, proc.pid());
    match ended {
        Ended::Stopped(reason) => {
            log.line(&format!("stopping {role} (pid {pid}): {}", reason.reason));
            ctx.job.set_state(JobState::Stopping);
            let hurry = async {
                match role {
                    Role::Worker => orphaned(ctx.scheduler.clone(), &run.spec).await,
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
            Ok(Again::Crash(desc))
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
            dask_args(args).join(" ")
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
) -> Result<Again, (JobState, Outcome)> {
    let (role, log) = (run.spec.role, &run.log);
    let desc = status
        .as_ref()
        .map(describe)
        .unwrap_or_else(|e| e.to_string());
    let stopping = |stop: &StopRx| {
        let reason = stop.borrow().clone()?;
        log.line(&format!(
            "{role} exited ({desc}) while stopping: {}",
            reason.reason
        ));
        Some(stopped(reason))
    };
    if let Some(s) = stopping(stop) {
        return Err(s);
    }
    let code = status.as_ref().ok().and_then(|s| s.code());
    if role == Role::Worker && code == Some(RESTART_EXIT) {
        return Ok(Again::Asked(
            "its scheduler removed the running worker (client.restart())".into(),
        ));
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
    // A stop asked for while the scheduler is probed ends the probe (a
    // closed channel does not: that branch is then disabled).
    let gone = {
        let mut asked = stop.clone();
        tokio::select! {
            gone = scheduler_gone(&ctx.scheduler, &run.spec) => gone,
            Ok(()) = asked.changed() => false,
        }
    };
    if let Some(s) = stopping(stop) {
        return Err(s);
    }
    if gone {
        let reason =
            format!("worker exited ({desc}) and its scheduler is unreachable: the worker leaves");
        log.line(&reason);
        return Err(finished(JobState::Finished, 0, reason));
    }
    if code == Some(STARTUP_FAILED_EXIT) {
        // Set by the boot code, in the user's process: a user who fakes it
        // only slows the restarts of their own worker.
        let took = started.elapsed();
        return Ok(Again::NotStarted(
            format!(
                "worker did not start: it timed out reaching its scheduler or failed starting ({desc}) after {}s",
                took.as_secs()
            ),
            took,
        ));
    }
    Ok(Again::Crash(format!("worker died ({desc})")))
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

/// Run the job's dask process until it ends for good or `stop` fires.
///
/// A worker is started at once, also before its scheduler is up (Slurm
/// starts a cluster's jobs in any order): its Python imports while the
/// scheduler starts, then waits for the scheduler file (the boot code,
/// python/dask_spank/boot.py), which the scheduler job writes after the
/// cluster's TLS credentials. The agent once held a TLS worker's start
/// until the job's attach reported the scheduler: every waiting worker of
/// a node then started at the same instant, and each import came after
/// the scheduler's instead of beside it.
pub async fn run(ctx: Context, mut run: Box<JobRun>, mut stop: StopRx) -> Outcome {
    let nanny = &run.spec.policy.nanny;
    let policy = RestartPolicy {
        max_crashes: nanny.restart_max as usize,
        window: Duration::from_secs(nanny.restart_window_s),
        ..RestartPolicy::default()
    };
    let mut crashes = CrashLog::default();
    let mut asked = CrashLog::default();
    let mut not_started = StartFailures::default();
    let key = run.spec.job_id.to_string();
    let mut server = None;
    let mut starts = 0;
    let (state, outcome) = loop {
        if let Some(reason) = stop.borrow().clone() {
            break stopped(reason);
        }
        starts += 1;
        let adoption = run.adopt.take();
        let again = one_start(&ctx, &run, &mut stop, &mut server, adoption, starts).await;
        // The least delay before the next start: only for a worker that
        // never started; one that did forgets the earlier failures.
        let floor = match &again {
            Ok(Again::NotStarted(_, took)) => not_started.record(&key, *took),
            _ => {
                not_started.reset();
                Duration::ZERO
            }
        };
        let desc = match again {
            Ok(Again::Asked(why)) => match asked.record(&asked_policy(), Instant::now()) {
                Decision::Restart(_) => {
                    run.log.line(&format!("{why}: restarting it in place"));
                    ctx.metrics.restarts.fetch_add(1, Relaxed);
                    ctx.job.restarting(&why);
                    continue;
                }
                Decision::GiveUp(_) => format!("{why}, more than 10 times a minute"),
            },
            Ok(Again::Crash(desc) | Again::NotStarted(desc, _)) => desc,
            Err(end) => break end,
        };
        match crashes.record(&policy, Instant::now()) {
            Decision::Restart(delay) => {
                let delay = delay.max(floor);
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
        Box::pin(shutdown_server(s, &run.log)).await;
    }
    ctx.job.not_running();
    let _ = ctx.notify.send(Notice::Processes(vec![]));
    ctx.job.finished(state, &outcome.reason);
    outcome
}

/// When workers of a job must retire: its remaining walltime less the
/// policy's margin (see `dask_cmd::lifetime`).
pub fn retire_at(remaining_s: Option<u64>, margin_s: u64) -> Option<Instant> {
    remaining_s.map(|r| Instant::now() + Duration::from_secs(lifetime(r, margin_s)))
}
