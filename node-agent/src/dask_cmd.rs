//! The command lines of the dask processes the agent runs.

use dask_spank_common::paths::scheduler_file;
use dask_spank_common::{JobSpec, Role};
use std::path::Path;

/// Agent-wide settings that shape dask command lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaskSettings {
    /// Address dask servers bind to (`--host`); `None` lets dask choose.
    pub host: Option<String>,
    /// Seconds a worker waits for an unreachable scheduler before leaving.
    pub death_timeout_s: u64,
}

impl Default for DaskSettings {
    fn default() -> Self {
        DaskSettings {
            host: None,
            death_timeout_s: 60,
        }
    }
}

/// Program and arguments. The program is `<env>/bin/python` for
/// `--dask-env`, else `python3` looked up on the job's PATH.
pub fn command(spec: &JobSpec, cluster_dir: &Path, s: &DaskSettings) -> (String, Vec<String>) {
    let python = match &spec.env_prefix {
        Some(p) => p.join("bin/python").to_string_lossy().into_owned(),
        None => "python3".to_string(),
    };
    let sched_file = scheduler_file(cluster_dir).to_string_lossy().into_owned();
    let mut args: Vec<String> = vec!["-m".into()];
    match spec.role {
        Role::Scheduler => {
            args.push("distributed.cli.dask_scheduler".into());
            args.extend([
                "--scheduler-file".into(),
                sched_file,
                "--port".into(),
                "0".into(),
            ]);
            let dash = match &s.host {
                Some(h) => format!("{h}:0"),
                None => ":0".into(),
            };
            args.extend(["--dashboard-address".into(), dash]);
            args.extend([
                "--idle-timeout".into(),
                format!("{}s", spec.policy.idle_timeout_s),
            ]);
        }
        Role::Worker => {
            args.push("distributed.cli.dask_worker".into());
            args.extend(["--scheduler-file".into(), sched_file]);
            args.extend([
                "--name".into(),
                format!("{}-{}", spec.cluster, spec.label()),
            ]);
            args.extend(["--nthreads".into(), spec.cpus.max(1).to_string()]);
            let mem = if spec.mem_mb > 0 {
                format!("{}MiB", spec.mem_mb)
            } else {
                "auto".into()
            };
            args.extend(["--memory-limit".into(), mem]);
            // The agent is the nanny.
            args.push("--no-nanny".into());
            args.extend(["--death-timeout".into(), s.death_timeout_s.to_string()]);
        }
    }
    if let Some(h) = &s.host {
        args.extend(["--host".into(), h.clone()]);
    }
    (python, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(role: Role) -> JobSpec {
        JobSpec {
            job_id: 7,
            array_job_id: Some(5),
            array_task_id: Some(2),
            uid: 1000,
            gid: 1000,
            groups: vec![],
            user: "u".into(),
            role,
            cluster: "ana".parse().unwrap(),
            env_prefix: Some("/opt/env".into()),
            cpus: 2,
            mem_mb: 3072,
            time_limit_s: None,
            submit_dir: "/w".into(),
            node: "n1".into(),
            stepd_pid: 1,
            policy: Default::default(),
        }
    }

    #[test]
    fn worker_command() {
        let s = DaskSettings {
            host: Some("127.0.0.1".into()),
            death_timeout_s: 30,
        };
        let (p, a) = command(&spec(Role::Worker), Path::new("/c"), &s);
        assert_eq!(p, "/opt/env/bin/python");
        assert_eq!(
            a.join(" "),
            "-m distributed.cli.dask_worker --scheduler-file /c/scheduler.json --name ana-5_2 \
             --nthreads 2 --memory-limit 3072MiB --no-nanny --death-timeout 30 --host 127.0.0.1"
        );
    }

    #[test]
    fn scheduler_command() {
        let mut sp = spec(Role::Scheduler);
        sp.env_prefix = None;
        let (p, a) = command(&sp, Path::new("/c"), &DaskSettings::default());
        assert_eq!(p, "python3");
        assert_eq!(
            a.join(" "),
            "-m distributed.cli.dask_scheduler --scheduler-file /c/scheduler.json --port 0 --dashboard-address :0 --idle-timeout 7200s"
        );
    }
}
