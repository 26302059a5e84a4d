//! The cluster's keeper (`keeper.py`): started by the scheduler job's
//! attach, as the user, with the job's own Python (the one that runs the
//! scheduler, so it has distributed). Its output goes to the scheduler
//! job's log. It lives in the job: Slurm ends it with the job.

use dask_spank_common::paths::vars;
use dask_spank_common::ClusterName;
use std::path::Path;
use std::process::{Command, Stdio};

/// The keeper is a dask client of its cluster: the TLS workaround of every
/// dask process (python/dask_spank/tls_eof.py) comes first.
const PROGRAM: &str = concat!(
    include_str!("../../python/dask_spank/tls_eof.py"),
    include_str!("keeper.py")
);

/// The job's Python: `--dask-env`'s, else `python3` on the job's PATH.
fn python() -> String {
    match std::env::var(vars::ENV) {
        Ok(e) if !e.is_empty() => format!("{e}/bin/python"),
        _ => "python3".into(),
    }
}

fn env_secs(name: &str, default: u64) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| v.parse::<u64>().is_ok())
        .unwrap_or_else(|| default.to_string())
}

/// Start the keeper of `cluster` (cluster directory `dir`) for the
/// scheduler job `job_id`; a failure to start is reported, not fatal.
pub fn start(cluster: &ClusterName, dir: &Path, job_id: u32) {
    let res = Command::new(python())
        .args(["-c", PROGRAM, cluster.as_str()])
        .arg(dir)
        .args([
            env_secs(vars::SUCCESSOR_LEAD, 600),
            env_secs(vars::LIFETIME_MARGIN, 300),
            job_id.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn();
    if let Err(e) = res {
        eprintln!(
            "dask-spank: cannot start the cluster's keeper ({}): {e}; its size is not kept",
            python()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_keeper_is_python_that_compiles() {
        let ok = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; compile(sys.stdin.read(), 'keeper.py', 'exec')",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .map(|mut i| i.write_all(super::PROGRAM.as_bytes()));
                c.wait()
            });
        assert!(ok.map(|s| s.success()).unwrap_or(false));
    }
}
