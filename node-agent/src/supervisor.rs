//! The nanny: runs one job's dask process, restarts a crashed worker with
//! capped exponential backoff, gives up on a crash loop, terminates a
//! worker over its memory limit, retires workers before the walltime, and
//! stops everything when told to. One task per job; each child is reaped
//! through its own handle (tokio), never with a blanket `waitpid(-1)`.

use crate::dask_cmd::{command, lifetime, DaskSettings, Limits};
use crate::forkserver::{self, ForkServer};
use crate::jobenv::JobEnv;
use crate::joblog::JobLog;
use crate::restart::{CrashLog, Decision, RestartPolicy};
use crate::server::Agent;
use crate::spawn::{spawn, Identity, SpawnRequest};
use dask_spank_common::messages::Attach;
use dask_spank_common::paths::scheduler_file;
use dask_spank_common::policy::WorkerStart;
use dask_spank_common::{JobSpec, Role};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
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

pub struct JobRun {
    pub spec: JobSpec,
    /// What `dask-spank attach` sent, its environment taken out into `env`.
    pub attach: Attach,
    pub env: JobEnv,
    pub log: JobLog,
    pub settings: DaskSettings,
    /// The job's memory in MiB, as Slurm granted it (0: unknown).
    pub mem_mb: u64,
    /// When workers must have retired (walltime minus a margin).
    pub retire_at: Option<Instant>,
    pub cgroup_procs: Option<PathBuf>,
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

/// The running dask process of one start: a child of the agent, or a
/// worker forked by the job's fork server.
pub enum Proc<'a> {
    Exec(tokio::process::Child),
    Forked {
        pid: i32,
        server: &'a mut ForkServer,
    },
}

impl Proc<'_> {
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Proc::Exec(c) => c.wait().await,
            Proc::Forked { pid, server } => {
                let pid = *pid;
                // The server reports how its worker ended; one that does not
                // (it runs user code) is not waited for forever.
                tokio::select! {
                    st = server.wait(pid) => st,
                    _ = forkserver::gone_for(pid, Duration::from_secs(2)) => Err(std::io::Error::other(format!(
                        "worker pid {pid} is gone and the fork server did not report how it ended"
                    ))),
                }
            }
        }
    }

    /// Signal a process group of this start: any for our own child; for a
    /// forked worker, only while it is one (see `ForkServer::owns`).
    fn signal_group(&self, pgid: i32, sig: Signal) -> nix::Result<()> {
        match self {
            Proc::Forked { server, .. } if !server.owns(pgid) => Err(nix::errno::Errno::ESRCH),
            _ => killpg(Pid::from_raw(pgid), sig),
        }
    }
}

/// Signal a process group until it is gone: SIGTERM, then SIGKILL after
/// `grace`, then whatever is left of the group. With `cluster_dir` (a
/// worker's), SIGKILL also comes once its scheduler has been unreachable
/// for `ORPHAN_GRACE`: a worker hands its data to the others as it closes,
/// and with its scheduler gone (a whole cluster cancelled at once) there is
/// nothing to hand over and its close can hang on the lost connection.
pub async fn stop_group(
    pgid: i32,
    child: &mut Proc<'_>,
    grace: Duration,
    cluster_dir: Option<&Path>,
    log: &JobLog,
) {
    let _ = child.signal_group(pgid, Signal::SIGTERM);
    let orphaned = async {
        match cluster_dir {
            Some(dir) => loop {
                tokio::time::sleep(ORPHAN_POLL).await;
                if !Box::pin(scheduler_reachable(dir)).await {
                    tokio::time::sleep(ORPHAN_GRACE).await;
                    return format!("outlived its scheduler by {}s", ORPHAN_GRACE.as_secs());
                }
            },
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        r = tokio::time::timeout(grace, child.wait()) => r.err().map(|_| format!("still running {}s", grace.as_secs())),
        why = orphaned => Some(why),
    };
    if let Some(why) = why {
        log.line(&format!(
            "process group {pgid} {why} after SIGTERM: sending SIGKILL"
        ));
        let _ = child.signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    reap_group(pgid, child, log).await;
}

/// Kill what is left of a process group after its leader exited.
pub async fn reap_group(pgid: i32, child: &Proc<'_>, log: &JobLog) {
    for i in 0..100 {
        let sig = if i == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        match child.signal_group(pgid, sig) {
            Err(nix::errno::Errno::ESRCH) => return,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    log.line(&format!("process group {pgid} survived SIGKILL for 5s"));
}

/// Whether the scheduler in the cluster's scheduler file accepts TCP
/// connections. A worker that fails while its scheduler is gone is not
/// restarted: it would only wait out its death timeout again.
async fn scheduler_reachable(cluster_dir: &Path) -> bool {
    let Ok(text) = tokio::fs::read_to_string(scheduler_file(cluster_dir)).await else {
        return false;
    };
    let Some(addr) = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("address")?.as_str().map(str::to_string))
    else {
        return false;
    };
    let Some(hostport) = addr.strip_prefix("tcp://") else {
        return true; // not TCP: cannot tell, assume reachable
    };
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(hostport)
        )
        .await,
        Ok(Ok(_))
    )
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Stopped(String),
    MemoryKill(u64),
}

/// Fork a worker from the job's fork server, starting the server first if
/// there is none or it died. Arguments: those after `-m <module>`.
async fn start_forked<'s>(
    agent: &Agent,
    job_id: u32,
    server: &'s mut Option<ForkServer>,
    req: &SpawnRequest<'_>,
    log: &JobLog,
) -> std::io::Result<Proc<'s>> {
    if let Some(dead) = server.take_if(|s| !s.alive()) {
        log.line("the fork server died: starting a new one");
        shutdown_server(agent, dead, log).await;
    }
    if server.is_none() {
        let s = ForkServer::spawn(req)?;
        agent.jobs.add_pgid(job_id, s.pid);
        agent.metrics.forkservers_running.fetch_add(1, Relaxed);
        log.line(&format!(
            "fork server started, pid {}: {} (imports distributed once; workers are forked from it)",
            s.pid, req.program
        ));
        *server = Some(s);
    }
    let Some(s) = server.as_mut() else {
        return Err(std::io::Error::other("no fork server"));
    };
    let pid = s.fork(req.args.get(2..).unwrap_or_default()).await?;
    Ok(Proc::Forked { pid, server: s })
}

/// Run the job's dask process until it ends for good or `stop` fires.
pub async fn run(
    agent: Arc<Agent>,
    run: JobRun,
    mut stop: watch::Receiver<Option<String>>,
) -> Outcome {
    let mut server = None;
    let outcome = supervise(&agent, &run, &mut stop, &mut server).await;
    if let Some(s) = server {
        shutdown_server(&agent, s, &run.log).await;
    }
    outcome
}

/// Stop a fork server: closing its socket makes it kill what it forked and
/// leave; its process group gets the usual SIGTERM, grace, SIGKILL.
async fn shutdown_server(agent: &Agent, s: ForkServer, log: &JobLog) {
    agent.metrics.forkservers_running.fetch_sub(1, Relaxed);
    let (child, pid) = s.close();
    Box::pin(stop_group(
        pid,
        &mut Proc::Exec(child),
        STOP_GRACE,
        None,
        log,
    ))
    .await;
}

async fn supervise(
    agent: &Arc<Agent>,
    run: &JobRun,
    stop: &mut watch::Receiver<Option<String>>,
    server: &mut Option<ForkServer>,
) -> Outcome {
    let identity = Identity {
        uid: run.spec.uid,
        gid: run.spec.gid,
        groups: run.spec.groups.clone(),
    };
    let role = run.spec.role;
    let job_id = run.spec.job_id;
    let nanny = &run.spec.policy.nanny;
    let policy = RestartPolicy {
        max_crashes: nanny.restart_max as usize,
        window: Duration::from_secs(nanny.restart_window_s),
        ..RestartPolicy::default()
    };
    let mem_kill_mb = (role == Role::Worker && run.mem_mb > 0)
        .then(|| run.mem_mb * nanny.memory_kill_percent as u64 / 100);
    let log = &run.log;
    let running_gauge = match role {
        Role::Scheduler => &agent.metrics.schedulers_running,
        Role::Worker => &agent.metrics.workers_running,
    };
    let mut crashes = CrashLog::default();
    let mut starts = 0u32;
    // Benchmark stubs (`--stub-command`) are not Python: always exec them.
    let forked = role == Role::Worker
        && nanny.start == WorkerStart::Forkserver
        && run.settings.stub.is_none();
    let finish = |state: &str, exit_code: i32, reason: String| {
        agent.jobs.update(job_id, |s| {
            s.state = state.into();
            s.pid = None;
            s.reason = Some(reason.clone());
        });
        Outcome { exit_code, reason }
    };
    loop {
        if let Some(reason) = stop.borrow().clone() {
            return finish("finished", 0, reason);
        }
        let lifetime_s = match run.retire_at {
            Some(t) if role == Role::Worker => {
                let left = t.saturating_duration_since(Instant::now()).as_secs();
                if left < 5 {
                    let reason = "the job's walltime is near: worker not restarted".to_string();
                    log.line(&reason);
                    return finish("finished", 0, reason);
                }
                Some(left)
            }
            _ => None,
        };
        let (program, args) = command(
            &run.spec,
            &run.attach.cluster_dir,
            &run.settings,
            Limits {
                mem_mb: run.mem_mb,
                lifetime_s,
            },
        );
        let output = match log.fd() {
            Ok(fd) => fd,
            Err(e) => return finish("failed", 1, format!("cannot use the job log: {e}")),
        };
        let req = SpawnRequest {
            program: &program,
            args: &args,
            env: &run.env,
            cwd: &run.attach.cwd,
            identity: &identity,
            output: &output,
            rlimits: &run.attach.rlimits,
            cgroup_procs: run.cgroup_procs.as_deref(),
            stdin: None,
            extra_env: &[],
        };
        let started = if forked {
            start_forked(agent, job_id, server, &req, log).await
        } else {
            spawn(&req).map(Proc::Exec)
        };
        drop(req);
        drop(output);
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start {program}: {e}");
                log.line(&reason);
                return finish("failed", 1, reason);
            }
        };
        let pid = match &child {
            Proc::Exec(c) => c.id().map(|p| p as i32).unwrap_or(0),
            Proc::Forked { pid, .. } => *pid,
        };
        agent.jobs.add_pgid(job_id, pid);
        agent.jobs.update(job_id, |s| {
            s.state = "running".into();
            s.pid = Some(pid);
        });
        running_gauge.fetch_add(1, Relaxed);
        starts += 1;
        let what = if starts == 1 { "started" } else { "restarted" };
        match &child {
            Proc::Exec(_) => log.line(&format!(
                "{role} {what}, pid {pid}: {program} {}",
                args.join(" ")
            )),
            Proc::Forked { server, .. } => log.line(&format!(
                "{role} {what}, pid {pid}, forked by the fork server (pid {}): dask-worker {}",
                server.pid,
                args.get(2..).unwrap_or_default().join(" ")
            )),
        }
        let started = Instant::now();
        // Watched by the node's one memory watchdog until this start ends.
        let (_watching, mut over) = match mem_kill_mb {
            Some(limit) => {
                let (g, rx) = agent.memwatch.watch(pid, limit);
                (Some(g), Some(rx))
            }
            None => (None, None),
        };
        let ended = tokio::select! {
            status = child.wait() => Ended::Exited(status),
            _ = stop.changed() => {
                Ended::Stopped(stop.borrow().clone().unwrap_or_else(|| "stopped".into()))
            }
            Some(Ok(rss)) = async { match over.as_mut() { Some(rx) => Some(rx.await), None => None } } => {
                Ended::MemoryKill(rss)
            }
        };
        let desc = match ended {
            Ended::Stopped(reason) => {
                log.line(&format!("stopping {role} (pid {pid}): {reason}"));
                agent.jobs.update(job_id, |s| s.state = "stopping".into());
                let workers_scheduler =
                    (role == Role::Worker).then_some(run.attach.cluster_dir.as_path());
                Box::pin(stop_group(
                    pid,
                    &mut child,
                    STOP_GRACE,
                    workers_scheduler,
                    log,
                ))
                .await;
                running_gauge.fetch_sub(1, Relaxed);
                log.line(&format!("{role} stopped"));
                return finish("finished", 0, reason);
            }
            Ended::MemoryKill(rss) => {
                let desc = format!(
                    "memory kill: {rss} MiB resident exceeds {}% of the job's {} MiB",
                    nanny.memory_kill_percent, run.mem_mb
                );
                log.line(&format!("{desc}: terminating the worker"));
                Box::pin(stop_group(pid, &mut child, MEMORY_KILL_GRACE, None, log)).await;
                agent.metrics.memory_kills.fetch_add(1, Relaxed);
                agent.jobs.update(job_id, |s| s.memory_kills += 1);
                running_gauge.fetch_sub(1, Relaxed);
                desc
            }
            Ended::Exited(status) => {
                running_gauge.fetch_sub(1, Relaxed);
                let desc = status
                    .as_ref()
                    .map(describe)
                    .unwrap_or_else(|e| e.to_string());
                Box::pin(reap_group(pid, &child, log)).await;
                if let Some(reason) = stop.borrow().clone() {
                    log.line(&format!("{role} exited ({desc}) while stopping: {reason}"));
                    return finish("finished", 0, reason);
                }
                let ok = status.as_ref().map(|s| s.success()).unwrap_or(false);
                if role == Role::Scheduler || ok {
                    let reason = format!(
                        "{role} exited ({desc}) after {}s",
                        started.elapsed().as_secs()
                    );
                    log.line(&reason);
                    let code = status.ok().and_then(|s| s.code()).unwrap_or(1);
                    return finish(if code == 0 { "finished" } else { "failed" }, code, reason);
                }
                if !Box::pin(scheduler_reachable(&run.attach.cluster_dir)).await {
                    let reason = format!("worker exited ({desc}) and its scheduler is unreachable: the worker leaves");
                    log.line(&reason);
                    return finish("finished", 0, reason);
                }
                format!("worker died ({desc})")
            }
        };
        match crashes.record(&policy, Instant::now()) {
            Decision::Restart(delay) => {
                log.line(&format!(
                    "{desc}; restarting in {:.1}s",
                    delay.as_secs_f64()
                ));
                agent.metrics.restarts.fetch_add(1, Relaxed);
                agent.jobs.update(job_id, |s| {
                    s.state = "restarting".into();
                    s.pid = None;
                    s.restarts += 1;
                    s.reason = Some(desc.clone());
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
            Decision::GiveUp(why) => {
                let reason = format!("{desc}; {why}; not restarting");
                log.line(&reason);
                agent.metrics.crash_loop_giveups.fetch_add(1, Relaxed);
                return finish("failed", 1, reason);
            }
        }
    }
}

/// When workers of a job must retire: its remaining walltime less the
/// policy's margin (see `dask_cmd::lifetime`).
pub fn retire_at(remaining_s: Option<u64>, margin_s: u64) -> Option<Instant> {
    remaining_s.map(|r| Instant::now() + Duration::from_secs(lifetime(r, margin_s)))
}
