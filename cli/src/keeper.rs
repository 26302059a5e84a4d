//! The cluster's keeper (`keeper.py`): started by the scheduler job's
//! attach, as the user, with the job's own Python (the one that runs the
//! scheduler, so it has distributed). Its output goes to the scheduler
//! job's log. It lives in the job: Slurm ends it with the job. When the
//! scheduler job ends (scancel, time limit, a failed scheduler), the
//! worker jobs the keeper held end with it (`Keeper::end`): a pending
//! successor would otherwise start for a scheduler that is gone.

use dask_spank_common::paths::vars;
use dask_spank_common::ClusterName;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// A started keeper: its process group (the keeper and an sbatch it runs).
#[derive(Debug, Clone, Copy)]
pub struct Keeper {
    pgid: i32,
}

impl Keeper {
    /// The scheduler job is ending: stop the keeper and any submission it
    /// has in flight, then cancel the cluster's worker jobs (successors
    /// included), if the keeper held the cluster's size. A cluster without
    /// a target (plain sbatch) keeps its workers, which leave by their
    /// death timeout; `down` cancels them itself.
    pub fn end(&self, cluster: &ClusterName, dir: &Path) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        // Our own child's group (process_group(0) at spawn): nothing else.
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        if !crate::target::is_kept(dir) {
            return;
        }
        match crate::slurm::scancel_workers(cluster.as_str(), Duration::from_secs(5)) {
            Ok(()) => eprintln!(
                "dask-spank: the scheduler job ends: its cluster's worker jobs were cancelled (successors included)"
            ),
            Err(e) => eprintln!(
                "dask-spank: the scheduler job ends: cannot cancel its cluster's worker jobs ({e}); \
                 they leave after their death timeout"
            ),
        }
    }
}

/// Start the keeper of `cluster` (cluster directory `dir`) for the
/// scheduler job `job_id`; a failure to start is reported, not fatal.
pub fn start(cluster: &ClusterName, dir: &Path, job_id: u32) -> Option<Keeper> {
    use std::os::unix::process::CommandExt;
    let res = Command::new(python())
        .args(["-c", PROGRAM, cluster.as_str()])
        .arg(dir)
        .args([
            env_secs(vars::SUCCESSOR_LEAD, 600),
            env_secs(vars::LIFETIME_MARGIN, 300),
            job_id.to_string(),
        ])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    match res {
        Ok(child) => i32::try_from(child.id()).ok().map(|pgid| Keeper { pgid }),
        Err(e) => {
            eprintln!(
                "dask-spank: cannot start the cluster's keeper ({}): {e}; its size is not kept",
                python()
            );
            None
        }
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
