//! `dask-spank attach`: the last line of a dask-spank job script.
//!
//! Runs as the user inside the batch job. It hands the job over to the node
//! agent with this process's environment and working directory (so a
//! script that activated a conda env or venv passes it on), and the job's
//! log file (its own stdout, opened by Slurm as the user). Then it waits:
//! its exit code is the outcome of the dask processes. When Slurm kills it
//! (scancel, walltime), the agent sees the connection close and stops them.

use dask_spank_common::client::Client;
use dask_spank_common::messages::{Attach, Rlimit};
use dask_spank_common::paths::{cluster_dir, scheduler_file, user_root, vars};
use dask_spank_common::{ClusterName, Request, Response, Role};
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
    let root = user_root(
        std::env::var(vars::HOME).ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    )
    .ok_or("neither DASK_SPANK_HOME nor HOME is set: cannot place the cluster directory")?;
    let dir = cluster_dir(&root, &cluster);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if role == Role::Scheduler {
        // A file left by an earlier scheduler of this cluster would send
        // workers to a dead address.
        let f = scheduler_file(&dir);
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the old {}: {e}", f.display())),
        }
    }
    let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut c =
        Client::connect(&socket, "attach", Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let req = Request::Attach(Attach {
        job_id,
        cwd,
        env,
        cluster_dir: dir,
        rlimits: rlimits(),
    });
    match c.call(&req).map_err(|e| e.to_string())? {
        Response::SendLogFd => {}
        other => return Err(format!("node agent: unexpected reply {other:?}")),
    }
    c.send_fd(1).map_err(|e| e.to_string())?;
    match c.recv().map_err(|e| e.to_string())? {
        Response::Attached => {}
        Response::Error { message } => return Err(format!("node agent refused: {message}")),
        other => return Err(format!("node agent: unexpected reply {other:?}")),
    }
    c.wait_forever().map_err(|e| e.to_string())?;
    match c.recv() {
        Ok(Response::Finished { exit_code, reason }) => {
            eprintln!("dask-spank: {role} finished: {reason}");
            Ok(exit_code)
        }
        Ok(other) => Err(format!("node agent: unexpected reply {other:?}")),
        Err(e) => Err(format!("lost the node agent: {e}")),
    }
}

/// This job's resource limits, for the dask processes the agent starts.
fn rlimits() -> Vec<Rlimit> {
    use nix::sys::resource::{getrlimit, Resource};
    let all = [
        Resource::RLIMIT_AS,
        Resource::RLIMIT_CORE,
        Resource::RLIMIT_CPU,
        Resource::RLIMIT_DATA,
        Resource::RLIMIT_FSIZE,
        Resource::RLIMIT_MEMLOCK,
        Resource::RLIMIT_NOFILE,
        Resource::RLIMIT_NPROC,
        Resource::RLIMIT_STACK,
    ];
    all.iter()
        .filter_map(|r| {
            getrlimit(*r).ok().map(|(soft, hard)| Rlimit {
                resource: *r as i32,
                soft,
                hard,
            })
        })
        .collect()
}
