//! The nanny: runs one job's dask process, restarts a crashed worker with
//! capped exponential backoff, gives up on a crash loop, and stops
//! everything when told to. One task per job; each child is reaped through
//! its own handle (tokio), never with a blanket `waitpid(-1)`.

use crate::dask_cmd::{command, DaskSettings};
use crate::joblog::JobLog;
use crate::restart::{CrashLog, Decision, RestartPolicy};
use crate::spawn::{spawn, Identity, SpawnRequest};
use dask_spank_common::messages::Attach;
use dask_spank_common::{JobSpec, Role};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Environment the Nanny sets before starting a worker; a value the job
/// already has wins.
const SPAWN_DEFAULTS: &[(&str, &str)] = &[
    ("MALLOC_TRIM_THRESHOLD_", "65536"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
];

pub struct JobRun {
    pub spec: JobSpec,
    pub attach: Attach,
    pub log: JobLog,
    pub settings: DaskSettings,
    pub policy: RestartPolicy,
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

fn job_env(run: &JobRun) -> Vec<(String, String)> {
    let mut env = run.attach.env.clone();
    for (k, v) in SPAWN_DEFAULTS {
        if !env.iter().any(|(ek, _)| ek == k) {
            env.push((k.to_string(), v.to_string()));
        }
    }
    if let Some(prefix) = &run.spec.env_prefix {
        let bin = prefix.join("bin").to_string_lossy().into_owned();
        match env.iter_mut().find(|(k, _)| k == "PATH") {
            Some((_, p)) => *p = format!("{bin}:{p}"),
            None => env.push(("PATH".into(), bin)),
        }
    }
    env
}

/// Signal a process group until it is gone: SIGTERM, then SIGKILL after
/// `grace`. Returns once no process of the group is left (or after a last
/// bounded wait, logging what survived).
pub async fn stop_group(
    pgid: i32,
    child: &mut tokio::process::Child,
    grace: Duration,
    log: &JobLog,
) {
    let pg = Pid::from_raw(pgid);
    let _ = killpg(pg, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        log.line(&format!(
            "process group {pgid} still running {}s after SIGTERM: sending SIGKILL",
            grace.as_secs()
        ));
        let _ = killpg(pg, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    reap_group(pgid, log).await;
}

/// Kill what is left of a process group after its leader exited.
pub async fn reap_group(pgid: i32, log: &JobLog) {
    let pg = Pid::from_raw(pgid);
    for i in 0..100 {
        match killpg(
            pg,
            if i == 0 {
                Signal::SIGTERM
            } else {
                Signal::SIGKILL
            },
        ) {
            Err(nix::errno::Errno::ESRCH) => return,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    log.line(&format!("process group {pgid} survived SIGKILL for 5s"));
}

/// Run the job's dask process until it ends for good or `stop` fires.
pub async fn run(run: JobRun, mut stop: watch::Receiver<Option<String>>) -> Outcome {
    let (program, args) = command(&run.spec, &run.attach.cluster_dir, &run.settings);
    let env = job_env(&run);
    let identity = Identity {
        uid: run.spec.uid,
        gid: run.spec.gid,
        groups: run.spec.groups.clone(),
    };
    let role = run.spec.role;
    let log = &run.log;
    let mut crashes = CrashLog::default();
    let mut starts = 0u32;
    loop {
        if let Some(reason) = stop.borrow().clone() {
            return Outcome {
                exit_code: 0,
                reason,
            };
        }
        let output = match log.fd() {
            Ok(fd) => fd,
            Err(e) => {
                return Outcome {
                    exit_code: 1,
                    reason: format!("cannot use the job log: {e}"),
                }
            }
        };
        let spawned = spawn(&SpawnRequest {
            program: &program,
            args: &args,
            env: &env,
            cwd: &run.attach.cwd,
            identity: &identity,
            output: &output,
        });
        drop(output);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start {program}: {e}");
                log.line(&reason);
                return Outcome {
                    exit_code: 1,
                    reason,
                };
            }
        };
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        starts += 1;
        let what = if starts == 1 { "started" } else { "restarted" };
        log.line(&format!(
            "{role} {what}, pid {pid}: {program} {}",
            args.join(" ")
        ));
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                let desc = status.as_ref().map(describe).unwrap_or_else(|e| e.to_string());
                reap_group(pid, log).await;
                if let Some(reason) = stop.borrow().clone() {
                    log.line(&format!("{role} exited ({desc}) while stopping: {reason}"));
                    return Outcome { exit_code: 0, reason };
                }
                let ok = status.as_ref().map(|s| s.success()).unwrap_or(false);
                if role == Role::Scheduler || ok {
                    let reason = format!("{role} exited ({desc}) after {}s", started.elapsed().as_secs());
                    log.line(&reason);
                    let exit_code = status.ok().and_then(|s| s.code()).unwrap_or(1);
                    return Outcome { exit_code, reason };
                }
                match crashes.record(&run.policy, Instant::now()) {
                    Decision::Restart(delay) => {
                        log.line(&format!("worker died ({desc}); restarting in {:.1}s", delay.as_secs_f64()));
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    Decision::GiveUp(why) => {
                        let reason = format!("worker died ({desc}); {why}; not restarting");
                        log.line(&reason);
                        return Outcome { exit_code: 1, reason };
                    }
                }
            }
            _ = stop.changed() => {
                let reason = stop.borrow().clone().unwrap_or_else(|| "stopped".into());
                log.line(&format!("stopping {role} (pid {pid}): {reason}"));
                stop_group(pid, &mut child, STOP_GRACE, log).await;
                log.line(&format!("{role} stopped"));
                return Outcome { exit_code: 0, reason };
            }
        }
    }
}
