//! The Slurm commands the CLI uses: plain sbatch, squeue and scancel, so
//! that everything it does can also be done by hand.

use dask_spank_common::names::{is_job_name, parse_pool_job_name, pool_job_name, PoolName};
use dask_spank_common::scontrol::field;
use dask_spank_common::slurm_state::SlurmState;
use dask_spank_common::Role;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one Slurm command may take. A controller that does not answer
/// must not hang a keeper, a worker job's start or a user's notebook: past
/// this the command is killed and the caller told.
pub const SLURM_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `cmd` (stdin closed) to its end, within `timeout`; its output.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    // Both pipes are drained as they fill, so a chatty command never blocks.
    fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                // Not reaped yet: the pid is still this child's.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{name} did not answer in {timeout:?} (is slurmctld reachable?)"
                ));
            }
            Err(e) => return Err(format!("{name}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// One line of squeue about a dask-spank job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    /// `1234` or `1234_5` (array task), as squeue -r prints it.
    pub label: String,
    pub name: String,
    pub state: SlurmState,
    pub node: String,
    pub reason: String,
    /// When it was submitted, in seconds since the epoch (squeue asked with
    /// `SLURM_TIME_FORMAT=%s`: no time zone to guess, and whatever the
    /// user's own `SLURM_TIME_FORMAT` says).
    pub submit: Option<u64>,
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_default()
}

pub fn parse_squeue(out: &str) -> Vec<QueuedJob> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() >= 6).then(|| QueuedJob {
                label: f[0].trim().into(),
                name: f[1].trim().into(),
                state: SlurmState::parse(f[2].trim()),
                node: f[3].trim().into(),
                reason: f[4].trim().into(),
                submit: f[5].trim().parse().ok(),
            })
        })
        .collect()
}

/// Whether a job name is one of `cluster`'s jobs, of any role and pool.
pub fn of_cluster(name: &str, cluster: &str) -> bool {
    parse_pool_job_name(name).is_some_and(|(_, c, _)| c == cluster)
}

/// The user's dask-spank jobs, of one cluster or all (`None`). Not by
/// `squeue -n`: a cluster's pools have job names of their own
/// (`dask-worker-ana@gpu`), some perhaps submitted by hand, so the user's
/// jobs are read and the cluster's picked by name.
pub fn squeue(cluster: Option<&str>) -> Result<Vec<QueuedJob>, String> {
    let mut cmd = Command::new("squeue");
    cmd.env("SLURM_TIME_FORMAT", "%s")
        .args(["-h", "-r", "-u", &user(), "-o", "%i|%j|%T|%N|%r|%V"]);
    let out = output_within(&mut cmd, SLURM_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "squeue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let jobs = parse_squeue(&String::from_utf8_lossy(&out.stdout));
    Ok(jobs
        .into_iter()
        .filter(|j| match cluster {
            Some(c) => of_cluster(&j.name, c),
            None => is_job_name(&j.name),
        })
        .collect())
}

/// A worker job of a cluster, for its keeper: label, pool, state, time
/// limit and time used (`squeue -o %i|%j|%T|%l|%M`; None: unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptJob {
    pub label: String,
    /// None: the default pool.
    pub pool: Option<String>,
    pub state: SlurmState,
    pub limit_s: Option<u64>,
    pub used_s: u64,
}

/// `cluster`'s worker jobs in squeue's lines (other jobs left out).
pub fn parse_kept(out: &str, cluster: &str) -> Vec<KeptJob> {
    use dask_spank_common::units::parse_time_s;
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let [label, name, state, limit, used] = f.as_slice() else {
                return None;
            };
            let pool = match parse_pool_job_name(name.trim())? {
                (Role::Worker, c, pool) if c == cluster => pool.map(str::to_string),
                _ => return None,
            };
            Some(KeptJob {
                label: label.trim().into(),
                pool,
                state: SlurmState::parse(state.trim()),
                limit_s: parse_time_s(limit)?,
                used_s: parse_time_s(used).flatten().unwrap_or(0),
            })
        })
        .collect()
}

/// The user's worker jobs of `cluster`, of every pool, for its keeper
/// (one squeue for all pools: see `squeue`).
pub fn worker_jobs(cluster: &str) -> Result<Vec<KeptJob>, String> {
    let mut cmd = Command::new("squeue");
    cmd.args(["-h", "-r", "-u", &user()])
        .args(["-o", "%i|%j|%T|%l|%M"])
        .env_clear()
        .envs(clean_env());
    let out = output_within(&mut cmd, SLURM_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "squeue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_kept(&String::from_utf8_lossy(&out.stdout), cluster))
}

/// This process's environment minus what describes its own job (a
/// scheduler job's keeper submits workers: they must not inherit the
/// scheduler job's SLURM_* or DASK_SPANK_* settings). The user's own
/// DASK_SPANK_HOME stays (the workers must find the cluster), and
/// SLURM_CONF (the same Slurm).
pub fn clean_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            let ours = k.starts_with("DASK_SPANK_") && k != dask_spank_common::paths::vars::HOME;
            let slurms = k.starts_with("SLURM_") && k != "SLURM_CONF";
            !ours && !slurms
        })
        .collect()
}

/// What the plugin would submit for `args` (`DASK_SPANK_DRY_RUN`): the
/// command line with the site's defaults in, the job's option values, and
/// the site policy, as the plugin's JSON. Nothing is submitted.
pub fn sbatch_dry_run(args: &[String]) -> Result<serde_json::Value, String> {
    let out = output_within(
        Command::new("sbatch")
            .args(args)
            .env("DASK_SPANK_DRY_RUN", "1"),
        SLURM_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "sbatch {} would fail: {}",
            args.join(" "),
            err.lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    serde_json::from_str(text.trim()).map_err(|e| {
        format!("the dask-spank plugin said something else than its dry run ({e}): {text}")
    })
}

/// Submit with sbatch, with the environment `env` (None: this
/// process's); returns the job id. sbatch's (or the plugin's) own message
/// reaches the user on failure.
pub fn sbatch_in(args: &[String], env: Option<&[(String, String)]>) -> Result<String, String> {
    let mut cmd = Command::new("sbatch");
    if let Some(env) = env {
        cmd.env_clear().envs(env.iter().cloned());
    }
    // A DASK_SPANK_DRY_RUN left in the user's environment would have the
    // plugin plan the job instead of submitting it.
    cmd.env_remove("DASK_SPANK_DRY_RUN")
        .arg("--parsable")
        .args(args);
    let out = output_within(&mut cmd, SLURM_TIMEOUT)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| {
                !l.contains("required plugin") && !l.contains("Failed to initialize plugin stack")
            })
            .collect();
        return Err(format!(
            "sbatch {} failed: {}",
            args.join(" "),
            lines.join("; ")
        ));
    }
    job_id_of(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("sbatch {} said no job id: {:?}", args.join(" "), out.stdout))
}

/// The job id in `sbatch --parsable`'s output (`1234` or `1234;cluster`).
fn job_id_of(out: &str) -> Option<String> {
    let id = out.trim().split(';').next()?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
}

/// Whether sbatch's error is a queue limit of the user's association or
/// QOS (MaxSubmitJobs and the like): Slurm's text for ESLURM_ACCOUNTING_POLICY
/// and the QOS/association submit-limit reasons. Such a refusal passes
/// when the user's other jobs end or the limit is raised.
pub fn is_queue_limit(err: &str) -> bool {
    err.contains("accounting/QOS policy") || err.contains("MaxSubmitJob")
}

/// Cancel every job of the user named as the cluster's worker jobs, of
/// the default pool and of `pools` (those not submitted yet cannot be:
/// stop the submitter first). By name, not by id: a job submitted a
/// moment ago goes too. Waits at most `timeout` for each scancel: it runs
/// while Slurm ends the scheduler job.
pub fn scancel_workers(
    cluster: &str,
    pools: &[PoolName],
    timeout: std::time::Duration,
) -> Result<(), String> {
    let names = std::iter::once(None)
        .chain(pools.iter().map(Some))
        .map(|p| pool_job_name(Role::Worker, cluster, p));
    let mut errors = vec![];
    for name in names {
        let out = output_within(
            Command::new("scancel").args(["--user", &user(), "--name", &name]),
            timeout,
        )?;
        if !out.status.success() {
            errors.push(format!(
                "scancel --name {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

pub fn scancel(ids: &[String]) -> Result<(), String> {
    scancel_cmd(ids, Command::new("scancel"))
}

/// `scancel` with the environment `env`.
pub fn scancel_in(ids: &[String], env: &[(String, String)]) -> Result<(), String> {
    let mut cmd = Command::new("scancel");
    cmd.env_clear().envs(env.iter().cloned());
    scancel_cmd(ids, cmd)
}

fn scancel_cmd(ids: &[String], mut cmd: Command) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let out = output_within(cmd.args(ids), SLURM_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "scancel failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Why a job that left the queue ended: its state and the last lines of
/// its log (`scontrol show job` keeps it a few minutes after the end).
pub fn job_end(job: &str) -> Option<String> {
    let out = output_within(
        Command::new("scontrol").args(["-o", "show", "job", job]),
        SLURM_TIMEOUT,
    )
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let state = field(&text, "JobState")?;
    if SlurmState::parse(state).is_live() {
        return None;
    }
    let tail = field(&text, "StdOut")
        .and_then(|l| std::fs::read_to_string(l).ok())
        .map(|t| why_it_ended(&t))
        .unwrap_or_default();
    Some(format!("the scheduler job {job} ended {state}: {tail}"))
}

/// The lines of a job's log that say why it ended: the last two of ours
/// (the plugin's and the agent's say what to do), else its last two.
/// Slurm's own closing lines ("spank plugin stack failed") say nothing.
fn why_it_ended(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let ours: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("dask-spank"))
        .collect();
    let pick = if ours.is_empty() { &lines } else { &ours };
    pick[pick.len().saturating_sub(2)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_number_is_a_job_id() {
        assert_eq!(job_id_of("1234\n").as_deref(), Some("1234"));
        assert_eq!(job_id_of("1234;cl2\n").as_deref(), Some("1234"));
        assert_eq!(job_id_of("{\"scheduler\": {}}"), None);
        assert_eq!(job_id_of(""), None);
    }

    #[test]
    fn a_command_past_its_time_is_killed() {
        let t0 = Instant::now();
        let err =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("sleep did not answer in 300ms"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let out = output_within(
            Command::new("sh").args(["-c", "head -c 200000 /dev/zero; echo err >&2"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            (out.stdout.len(), out.stderr.as_slice()),
            (200000, &b"err\n"[..])
        );
    }

    #[test]
    fn queue_limits_are_told_from_other_refusals() {
        assert!(is_queue_limit(
            "sbatch --array=1-4 failed: sbatch: error: Batch job submission failed: \
             Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)"
        ));
        assert!(!is_queue_limit(
            "sbatch failed: sbatch: error: dask-spank: --dask-worker-mem=64G exceeds worker_mem_max=32G"
        ));
        assert!(!is_queue_limit(
            "sbatch failed: sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
        ));
    }

    #[test]
    fn the_reason_a_job_ended_is_our_last_lines() {
        let log = "dask-spank: no dask-spank node agent on n1: resubmit the job\n\
                   slurmstepd-n1: error: dask-spank: job refused before any dask process started\n\
                   slurmstepd-n1: error: spank: required plugin spank_dask.so: task_init() failed with rc=-1\n\
                   slurmstepd-n1: error: Failed to invoke spank plugin stack\n";
        assert_eq!(
            why_it_ended(log),
            "dask-spank: no dask-spank node agent on n1: resubmit the job | \
             slurmstepd-n1: error: dask-spank: job refused before any dask process started"
        );
        assert_eq!(why_it_ended("a\n\nb\nc\n"), "b | c");
    }

    #[test]
    fn kept_jobs_lines() {
        let j = parse_kept(
            "12_3|dask-worker-ana|RUNNING|2:00:00|1:05\n\
             12_4|dask-worker-ana@gpu|PENDING|UNLIMITED|0:00\n\
             13|dask-worker-anb|RUNNING|UNLIMITED|0:00\n\
             14|dask-scheduler-ana|RUNNING|UNLIMITED|0:00\nbad|x\n",
            "ana",
        );
        assert_eq!(
            j,
            [
                KeptJob {
                    label: "12_3".into(),
                    pool: None,
                    state: "RUNNING".into(),
                    limit_s: Some(7200),
                    used_s: 65
                },
                KeptJob {
                    label: "12_4".into(),
                    pool: Some("gpu".into()),
                    state: "PENDING".into(),
                    limit_s: None,
                    used_s: 0
                }
            ]
        );
    }

    #[test]
    fn squeue_lines() {
        let j = parse_squeue("12_3|dask-worker-ana|RUNNING|n1|None|1796485230\nbad\n");
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].submit, Some(1796485230));
        assert_eq!(j[0].label, "12_3");
        assert_eq!(j[0].state, SlurmState::Running);
        assert!(of_cluster("dask-worker-ana@gpu", "ana"));
        assert!(of_cluster("dask-scheduler-ana", "ana"));
        assert!(!of_cluster("dask-worker-anb", "ana") && !of_cluster("ana", "ana"));
    }
}
