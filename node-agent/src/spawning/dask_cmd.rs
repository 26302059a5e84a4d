//! The command lines of the dask processes the agent runs.

use crate::spawning::python_boot;
use dask_spank_common::paths::{scheduler_file, tls_files};
use dask_spank_common::policy::TlsMode;
use dask_spank_common::{JobSpec, Role};
use std::path::Path;

/// `-c BOOT MODULE`: the arguments before the dask command's own.
const LEAD_ARGS: usize = 3;

/// The dask command's own arguments (what a fork server's worker gets),
/// without the Python boot that precedes them.
pub fn dask_args(args: &[String]) -> &[String] {
    args.get(LEAD_ARGS..).unwrap_or_default()
}

/// Where an exec'd dask command finds its scheduler file: the boot puts
/// `--scheduler-file PATH` back into its arguments (python/dask_spank/boot.py).
pub const SCHEDULER_FILE_VAR: &str = "DASK_SPANK_SCHEDULER_FILE";

/// The arguments an exec'd dask command is started with: its scheduler
/// file (the longest word, a path in the user's home) moves to the
/// environment, so that `ps` shows a short line whatever the path; the
/// job's log shows the whole command (`args`).
pub fn exec_form(args: &[String]) -> (Vec<String>, Option<(String, String)>) {
    let Some(i) = args.iter().position(|a| a == "--scheduler-file") else {
        return (args.to_vec(), None);
    };
    let Some(path) = args.get(i + 1) else {
        return (args.to_vec(), None);
    };
    let mut short = args[..i].to_vec();
    short.extend_from_slice(&args[i + 2..]);
    (short, Some((SCHEDULER_FILE_VAR.to_string(), path.clone())))
}

/// The environment the boot needs (for a dask command, not a stub).
pub fn boot_env() -> (&'static str, &'static str) {
    python_boot::DASK.env()
}

/// Agent-wide settings that shape dask command lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaskSettings {
    /// Address dask servers bind to (`--host`); `None` lets dask choose.
    pub host: Option<String>,
    /// Benchmarks and tests of the control plane only (`run --stub-command`):
    /// run this program and arguments instead of dask, and take the job's
    /// facts from its registration instead of asking slurmctld.
    pub stub: Option<Vec<String>>,
}

/// Per-start values the agent computes from what Slurm granted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// The job's memory in MiB (0: unknown, dask picks).
    pub mem_mb: u64,
    /// Seconds before the worker retires (before the walltime).
    pub lifetime_s: Option<u64>,
}

/// Program and arguments. The program is `<env>/bin/python` for
/// `--dask-env`, else `python3` looked up on the job's PATH.
pub fn command(
    spec: &JobSpec,
    cluster_dir: &Path,
    s: &DaskSettings,
    limits: Limits,
) -> (String, Vec<String>) {
    if let Some([program, args @ ..]) = s.stub.as_deref() {
        return (program.clone(), args.to_vec());
    }
    let python = match &spec.env_prefix {
        Some(p) => p.join("bin/python").to_string_lossy().into_owned(),
        None => "python3".to_string(),
    };
    let sched_file = scheduler_file(cluster_dir).to_string_lossy().into_owned();
    let mut args: Vec<String> = python_boot::DASK.args().into();
    let mut push = |a: &[&str]| args.extend(a.iter().map(|x| x.to_string()));
    match spec.role {
        Role::Scheduler => {
            push(&["dask-scheduler", "--scheduler-file", &sched_file]);
            push(&["--port", "0"]);
            let dash = match &s.host {
                Some(h) => format!("{h}:0"),
                None => ":0".into(),
            };
            push(&["--dashboard-address", &dash]);
            push(&[
                "--idle-timeout",
                &format!("{}s", spec.policy.idle_timeout_s),
            ]);
        }
        Role::Worker => {
            push(&["dask-worker", "--scheduler-file", &sched_file]);
            push(&["--name", &format!("{}-{}", spec.cluster, spec.label())]);
            push(&["--nthreads", &spec.cpus.max(1).to_string()]);
            let mem = if limits.mem_mb > 0 {
                format!("{}MiB", limits.mem_mb)
            } else {
                "auto".into()
            };
            push(&["--memory-limit", &mem]);
            // The agent is the nanny.
            push(&["--no-nanny"]);
            push(&[
                "--death-timeout",
                &spec.policy.nanny.death_timeout_s.to_string(),
            ]);
            if let Some(l) = limits.lifetime_s {
                push(&["--lifetime", &format!("{l}s")]);
            }
        }
    }
    // A worker takes its protocol from its scheduler's address (tls://),
    // and the TLS environment requires encryption: only the scheduler
    // needs to be told (a shorter worker command line for `ps`).
    if spec.policy.tls == TlsMode::Required && spec.role == Role::Scheduler {
        args.extend(["--protocol".into(), "tls".into()]);
    }
    if let Some(h) = &s.host {
        args.extend(["--host".into(), h.clone()]);
    }
    (python, args)
}

/// The site's environment of a dask process, set by the agent over the
/// job's own (the site's policy is not the user's to turn off): the
/// cluster's TLS credentials (and nothing but TLS), the dashboard's token,
/// a scheduler's no-client timeout. The agent only names the files; dask
/// reads them, as the user.
pub fn site_env(spec: &JobSpec, cluster_dir: &Path) -> Vec<(String, String)> {
    let mut env = match spec.policy.tls {
        TlsMode::Required => tls_files(cluster_dir).dask_env(),
        TlsMode::Off => vec![],
    };
    // And the dashboard's token: HTTP is private to the owner either way.
    env.push(dask_spank_common::paths::dashboard_env(cluster_dir));
    // The boot code closes a scheduler no client used for this long.
    if spec.role == Role::Scheduler && spec.policy.no_client_timeout_s > 0 {
        env.push((
            NO_CLIENT_TIMEOUT_ENV.to_string(),
            spec.policy.no_client_timeout_s.to_string(),
        ));
    }
    env
}

/// Seconds without a client after which the scheduler closes
/// (python/dask_spank/boot.py reads it).
pub const NO_CLIENT_TIMEOUT_ENV: &str = "DASK_SPANK_NO_CLIENT_TIMEOUT";

pub use dask_spank_common::policy::worker_lifetime_s as lifetime;

/// The exit code of a worker that its scheduler removed while it ran
/// (`client.restart()`), which the agent restarts in place: the boot code
/// sets it (python/dask_spank/boot.py, `RESTART_EXIT`).
pub const RESTART_EXIT: i32 = 75;
/// The exit code of a worker that never started (distributed closed it
/// with a `failure-to-start-...` reason: it timed out reaching its
/// scheduler, or failed starting), which the agent restarts after a growing
/// delay (`supervision::restart::StartFailures`): the boot code sets it.
pub const STARTUP_FAILED_EXIT: i32 = 76;

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
            pool: None,
            env_prefix: Some("/opt/env".into()),
            cpus: 2,
            mem_mb: 0,
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
            stub: None,
        };
        let l = Limits {
            mem_mb: 3072,
            lifetime_s: Some(6900),
        };
        let (p, a) = command(&spec(Role::Worker), Path::new("/c"), &s, l);
        assert_eq!(p, "/opt/env/bin/python");
        assert_eq!(
            a.join(" "),
            "-c import os;exec(os.environ.pop('DASK_SPANK_BOOT')) dask-worker --scheduler-file /c/scheduler.json --name ana-5_2 \
             --nthreads 2 --memory-limit 3072MiB --no-nanny --death-timeout 60 --lifetime 6900s --host 127.0.0.1"
        );
    }

    #[test]
    fn scheduler_command() {
        let mut sp = spec(Role::Scheduler);
        sp.env_prefix = None;
        let (p, a) = command(
            &sp,
            Path::new("/c"),
            &DaskSettings::default(),
            Limits::default(),
        );
        assert_eq!(p, "python3");
        assert_eq!(
            a.join(" "),
            "-c import os;exec(os.environ.pop('DASK_SPANK_BOOT')) dask-scheduler --scheduler-file /c/scheduler.json --port 0 --dashboard-address :0 --idle-timeout 7200s --protocol tls"
        );
    }

    #[test]
    fn tls_off_is_plain_tcp_and_required_names_the_cluster_files() {
        let mut sp = spec(Role::Worker);
        let env = site_env(&sp, Path::new("/c"));
        assert!(env.contains(&(
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION".into(),
            "True".into()
        )));
        assert!(env.contains(&(
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE".into(),
            "/c/ca.pem".into()
        )));
        sp.policy.tls = TlsMode::Off;
        let plain = site_env(&sp, Path::new("/c"));
        assert_eq!(
            plain,
            [(
                "DASK_SPANK_DASHBOARD_TOKEN_FILE".to_string(),
                "/c/dashboard.token".to_string()
            )]
        );
        let (_, a) = command(
            &sp,
            Path::new("/c"),
            &DaskSettings::default(),
            Limits::default(),
        );
        assert!(!a.contains(&"tls".to_string()));
    }

    #[test]
    fn stub_command_replaces_dask() {
        let s = DaskSettings {
            host: None,
            stub: Some(vec!["/bin/sleep".into(), "infinity".into()]),
        };
        let (p, a) = command(&spec(Role::Worker), Path::new("/c"), &s, Limits::default());
        assert_eq!(
            (p.as_str(), a),
            ("/bin/sleep", vec!["infinity".to_string()])
        );
    }

    #[test]
    fn the_boot_runs_the_module_after_the_workaround() {
        let (_, a) = command(
            &spec(Role::Worker),
            Path::new("/c"),
            &DaskSettings::default(),
            Limits::default(),
        );
        assert_eq!(a[2], "dask-worker");
        assert_eq!(
            dask_args(&a)[..2],
            ["--scheduler-file", "/c/scheduler.json"]
        );
        assert_eq!(boot_env().0, python_boot::DASK.var);
    }

    #[test]
    fn the_boot_code_exits_with_the_agents_restart_codes() {
        let boot = include_str!("../../../python/dask_spank/boot.py");
        for (name, code) in [
            ("RESTART_EXIT", RESTART_EXIT),
            ("STARTUP_FAILED_EXIT", STARTUP_FAILED_EXIT),
        ] {
            assert!(
                boot.contains(&format!("\n{name} = {code}\n")),
                "python/dask_spank/boot.py must set {name} = {code}"
            );
        }
        let state = dask_spank_common::paths::layout::STATE_FILE;
        assert!(
            boot.contains(&format!("\nSTATE_FILE = \"{state}\"\n")),
            "python/dask_spank/boot.py must set STATE_FILE = \"{state}\""
        );
    }

    #[test]
    fn an_execd_command_finds_its_scheduler_file_in_the_environment() {
        let args: Vec<String> = [
            "-c",
            "x",
            "dask-worker",
            "--scheduler-file",
            "/h/s.json",
            "--name",
            "a",
        ]
        .map(String::from)
        .to_vec();
        let (short, env) = exec_form(&args);
        assert_eq!(short, ["-c", "x", "dask-worker", "--name", "a"]);
        assert_eq!(
            env,
            Some((SCHEDULER_FILE_VAR.to_string(), "/h/s.json".to_string()))
        );
        let boot = include_str!("../../../python/dask_spank/boot.py");
        assert!(boot.contains(&format!("os.environ.pop(\"{SCHEDULER_FILE_VAR}\"")));
        let stub = ["sleep".to_string()];
        assert_eq!(exec_form(&stub), (stub.to_vec(), None));
    }

    #[test]
    fn lifetimes() {
        assert_eq!(lifetime(7200, 300), 6900);
    }
}
