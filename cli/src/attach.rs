//! `dask-spank attach`: the last line of a dask-spank job script.
//!
//! Runs as the user inside the batch job. It hands the job over to the node
//! agent with this process's environment and working directory (so a
//! script that activated a conda env or venv passes it on), and the job's
//! log file (its own stdout, opened by Slurm as the user). Then it waits:
//! its exit code is the outcome of the dask processes. When Slurm kills it
//! (scancel, walltime), the agent sees the connection close and stops them.

use crate::record::{now, state_file, write_report, ClusterState, JobReport};
use crate::session::Session;
use dask_spank_common::client::Client;
use dask_spank_common::files::write_json_atomic;
use dask_spank_common::messages::Attach;
use dask_spank_common::paths::{
    cluster_dir, make_private_dir, scheduler_file, tls_files, vars, TlsFiles,
};
use dask_spank_common::schedfile::SchedulerInfo;
use dask_spank_common::{ClusterName, Request, Role};
use std::path::PathBuf;
use std::time::Duration;

fn need(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| {
        format!("{name} is not set: run `dask-spank attach` only inside a job submitted with --dask-role")
    })
}

pub fn run() -> Result<i32, String> {
    let job_id: u32 = need("SLURM_JOB_ID")?
        .parse()
        .map_err(|_| "SLURM_JOB_ID is not a number".to_string())?;
    let role: Role = need(vars::ROLE)?.parse().map_err(|e| format!("{e}"))?;
    let cluster: ClusterName = need(vars::CLUSTER)?.parse().map_err(|e| format!("{e}"))?;
    let socket = PathBuf::from(need(vars::AGENT_SOCKET)?);
    let root = crate::cluster::root()?;
    let dir = cluster_dir(&root, &cluster);
    make_private_dir(&root, &dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tls = std::env::var(vars::TLS).map_or(true, |v| v != "off");
    if role == Role::Scheduler {
        // A file left by an earlier scheduler of this cluster would send
        // workers to a dead address.
        crate::record::clear_scheduler_state(&dir);
        let f = scheduler_file(&dir);
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the old {}: {e}", f.display())),
        }
        if tls {
            crate::tls::ensure(&dir, cluster.as_str())?;
        }
    }
    let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let attach = Attach {
        job_id,
        cwd,
        env,
        cluster_dir: dir.clone(),
        reattach: false,
        forkserver_fd: false,
    };
    let mut session = Session::open(socket, attach)?;
    let mut report = JobReport {
        job_id,
        label: dask_spank_common::names::job_label(
            job_id,
            env_id("SLURM_ARRAY_JOB_ID"),
            env_id("SLURM_ARRAY_TASK_ID"),
        ),
        role: role.to_string(),
        state: "running".into(),
        reason: None,
        node: std::env::var("SLURMD_NODENAME").unwrap_or_default(),
        log: std::fs::read_link("/proc/self/fd/1")
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
        updated: now(),
    };
    write_report(&dir, &report);
    // The keeper before the signal thread: the scheduler job's end
    // (signal or not) ends the worker jobs it held.
    let keeper = (role == Role::Scheduler)
        .then(|| crate::keeper::start(&cluster, &dir, job_id))
        .flatten();
    let end_keeper = {
        let (cluster, dir) = (cluster.clone(), dir.clone());
        move || {
            if let Some(k) = keeper {
                k.end(&cluster, &dir)
            }
        }
    };
    on_signal_report_end(&dir, &report, end_keeper.clone());
    if role == Role::Scheduler {
        let (dir, cluster, job) = (dir.clone(), cluster.to_string(), job_id.to_string());

        std::thread::spawn(move || keep_state(&dir, &cluster, &job));
    }
    // A worker tells each agent it is handed to where its scheduler is.
    let reporter = {
        let dir = dir.clone();
        move |tx: Client| {
            if role == Role::Worker {
                let (f, creds) = (scheduler_file(&dir), tls.then(|| tls_files(&dir)));
                std::thread::spawn(move || report_scheduler(tx, &f, creds.as_ref()));
            }
        }
    };
    if let Some(tx) = session.sender() {
        reporter(tx);
    }
    let grace = std::env::var(vars::AGENT_GRACE)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs);
    let (code, reason) = session.follow(grace, reporter);
    end_keeper();
    report.state = if code == 0 { "ended" } else { "failed" }.into();
    report.reason = Some(reason.clone());
    report.updated = now();
    write_report(&dir, &report);
    if code == 0 {
        eprintln!("dask-spank: {role} finished: {reason}");
        Ok(0)
    } else if reason.starts_with("lost the node agent") {
        Err(reason)
    } else {
        eprintln!("dask-spank: {role} finished: {reason}");
        Ok(code)
    }
}

/// scancel and the time limit reach this process (the job's batch process)
/// as SIGTERM: end the keeper's worker jobs (scheduler job), record that
/// the job ended, then exit. Closing the agent
/// connection on exit makes the agent stop the dask processes.
fn on_signal_report_end(
    dir: &std::path::Path,
    report: &JobReport,
    end_keeper: impl FnOnce() + Send + 'static,
) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    // Blocked here, before any other thread exists, so that only the
    // waiting thread below receives them.
    if set.thread_block().is_err() {
        return;
    }
    let (dir, mut report) = (dir.to_path_buf(), report.clone());
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            end_keeper();
            report.state = "ended".into();
            report.reason = Some(format!(
                "the job was cancelled or reached its time limit ({sig})"
            ));
            report.updated = now();
            write_report(&dir, &report);
            std::process::exit(128 + sig as i32);
        }
    });
}

fn env_id(name: &str) -> Option<u32> {
    std::env::var(name).ok()?.parse().ok()
}

/// A worker job's side: tell the agent where the scheduler is, each time
/// the scheduler file names a new address. The file is the user's, read by
/// the user (this process); the agent only connects to the address to
/// know whether the scheduler is still there. With TLS, the address is
/// sent once the cluster's credentials exist too (the scheduler job makes
/// them): the agent starts the worker only then.
fn report_scheduler(mut agent: Client, sched_file: &std::path::Path, creds: Option<&TlsFiles>) {
    let mut last = String::new();
    loop {
        let ready = creds.is_none_or(TlsFiles::all_exist);
        if let Some(info) = ready.then(|| SchedulerInfo::read(sched_file)).flatten() {
            if info.address != last {
                let req = Request::SchedulerAddress {
                    address: info.address.clone(),
                };
                if agent.send(&req).is_err() {
                    return;
                }
                last = info.address;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The scheduler job's side of the cluster state record: every 2 s, the
/// scheduler's address into `state.json` (the keeper lists the connected
/// workers).
fn keep_state(dir: &std::path::Path, cluster: &str, job: &str) {
    let sched_file = scheduler_file(dir);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let Some(info) = SchedulerInfo::read(&sched_file) else {
            continue;
        };
        // dask writes it with the umask's mode; the directory is private
        // anyway, the file is made so too.
        let _ = std::fs::set_permissions(
            &sched_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        );
        let state = ClusterState {
            cluster: cluster.to_string(),
            scheduler_job: job.to_string(),
            dashboard_address: info.dashboard_url(),
            scheduler_address: info.address,
            scheduler_file: sched_file.clone(),
            updated: now(),
        };
        let _ = write_json_atomic(&state_file(dir), &state, 0o600);
    }
}
