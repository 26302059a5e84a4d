//! The shape of a cluster's worker jobs, for the keeper to submit more of
//! the same: what `up` recorded, or else what the cluster's first worker
//! job submitted by hand looks like (`sbatch --dask-role=worker --mem=5G
//! --cpus-per-task=2 --partition=…`), read from Slurm (`scontrol show
//! job`) by that job's own attach and recorded in `worker-args.json`.
//! Replacements, successors and `scale` then keep the shape.

use dask_spank_common::names::{pool_job_name, PoolName};
use dask_spank_common::paths::vars;
use dask_spank_common::records::{ClusterDir, WorkerArgs};
use dask_spank_common::scontrol::field;
use dask_spank_common::{ClusterName, Role};

/// The sbatch options that give another job the shape of the job that
/// `scontrol -o show job` describes in `text` (without `--array`).
pub fn args_of(
    text: &str,
    cluster: &ClusterName,
    pool: Option<&PoolName>,
    env: Option<&str>,
) -> Vec<String> {
    let set = |k: &str| field(text, k).filter(|v| !v.is_empty() && *v != "(null)" && *v != "N/A");
    let mut a = vec![
        "--dask-role=worker".to_string(),
        format!("--dask-cluster={cluster}"),
    ];
    if let Some(p) = pool {
        a.push(format!("--dask-pool={p}"));
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        a.push(format!("--dask-env={e}"));
    }
    let mut opt = |flag: &str, v: Option<&str>| {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    };
    opt("partition", set("Partition"));
    opt("account", set("Account"));
    opt("qos", set("QOS"));
    opt("time", set("TimeLimit").filter(|t| *t != "UNLIMITED"));
    opt("cpus-per-task", set("CPUs/Task"));
    match (set("MinMemoryNode"), set("MinMemoryCPU")) {
        (Some(m), _) => opt("mem", Some(m)),
        (None, Some(m)) => opt("mem-per-cpu", Some(m)),
        _ => {}
    }
    opt(
        "gres",
        set("TresPerNode")
            .map(|g| g.strip_prefix("gres:").unwrap_or(g))
            .map(|g| g.replace(",gres:", ","))
            .as_deref(),
    );
    opt("constraint", set("Features"));
    opt("licenses", set("Licenses"));
    // A job script of the user's own (the plugin supplies one otherwise).
    if let Some(script) = set("Command").filter(|c| c.starts_with('/')) {
        opt("chdir", set("WorkDir"));
        a.push(script.to_string());
    }
    a
}

/// Record the shape of this worker job, if its pool has none yet. (Its
/// dask worker resources are not Slurm's to tell: such a pool, submitted
/// by hand, keeps a fixed size, it cannot adapt.)
pub fn record_if_first(
    dir: &ClusterDir,
    cluster: &ClusterName,
    pool: Option<&PoolName>,
    job_id: u32,
) {
    if dir.worker_args_of(pool).is_some() {
        return;
    }
    let out = crate::slurm::output_within(
        std::process::Command::new("scontrol").args(["-o", "show", "job", &job_id.to_string()]),
        std::time::Duration::from_secs(30),
    );
    let Ok(out) = out else { return };
    let text = String::from_utf8_lossy(&out.stdout);
    // Only a job of this cluster's (and pool's) name speaks for its workers.
    let name = pool_job_name(Role::Worker, cluster.as_str(), pool);
    if field(&text, "JobName") != Some(name.as_str()) {
        return;
    }
    let env = std::env::var(vars::ENV).ok();
    let args = args_of(&text, cluster, pool, env.as_deref());
    let _ = dir.write_worker_args_of(
        pool,
        &WorkerArgs {
            args,
            source: format!("job {job_id}"),
            ..Default::default()
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_submitted_worker_jobs_shape() {
        let c: ClusterName = "ana".parse().unwrap();
        let text = "JobId=183 JobName=dask-worker-ana UserId=u(1) Account=phys QOS=(null) \
            TimeLimit=00:03:00 Partition=htc NumCPUs=2 CPUs/Task=2 MinMemoryNode=5G \
            TresPerNode=gres:gpu:1 Features=(null) Licenses=sps Command=(null) WorkDir=/w";
        assert_eq!(
            args_of(text, &c, None, Some("/envs/a")),
            [
                "--dask-role=worker",
                "--dask-cluster=ana",
                "--dask-env=/envs/a",
                "--partition=htc",
                "--account=phys",
                "--time=00:03:00",
                "--cpus-per-task=2",
                "--mem=5G",
                "--gres=gpu:1",
                "--licenses=sps"
            ]
        );
        let own = "JobName=dask-worker-ana TimeLimit=UNLIMITED MinMemoryCPU=2G \
                   Command=/home/u/w.sh WorkDir=/home/u/run";
        assert_eq!(
            args_of(own, &c, None, None),
            [
                "--dask-role=worker",
                "--dask-cluster=ana",
                "--mem-per-cpu=2G",
                "--chdir=/home/u/run",
                "/home/u/w.sh"
            ]
        );
        let gpu: PoolName = "gpu".parse().unwrap();
        let pooled = "JobName=dask-worker-ana@gpu TresPerNode=gres:gpu:1";
        assert_eq!(
            args_of(pooled, &c, Some(&gpu), None),
            [
                "--dask-role=worker",
                "--dask-cluster=ana",
                "--dask-pool=gpu",
                "--gres=gpu:1"
            ]
        );
    }
}
