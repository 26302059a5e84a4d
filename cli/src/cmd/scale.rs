//! `dask-spank scale`: submit or cancel worker jobs.

use super::up::{worker_args_file, WorkerArgs};
use crate::cluster::{parse_name, unknown, view, Res};
use crate::slurm;
use crate::view::Row;

/// Submit or cancel worker jobs to have N of them.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank scale ana 200")]
pub struct Args {
    pub name: String,
    pub workers: u32,
}

pub fn run(a: Args) -> Res {
    let (c, n) = (parse_name(&a.name)?, a.workers);
    let v = view(&c)?;
    if v.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let active: Vec<&Row> = v
        .workers
        .iter()
        .filter(|r| matches!(r.state.as_str(), "pending" | "running" | "connected"))
        .collect();
    let have = active.len() as u32;
    if n > have {
        let args = std::fs::read(worker_args_file(&c)?)
            .ok()
            .and_then(|b| serde_json::from_slice::<WorkerArgs>(&b).ok())
            .map(|w| w.args)
            .unwrap_or_else(|| vec!["--dask-role=worker".into(), format!("--dask-cluster={c}")]);
        let mut a = args;
        a.push(format!("--array=1-{}", n - have));
        let id = slurm::sbatch(&a)?;
        println!("cluster '{c}': {have} -> {n} worker jobs (submitted array {id})");
    } else if n < have {
        // Pending jobs go first, then the most recent running ones.
        let mut victims: Vec<&Row> = active.clone();
        victims.sort_by_key(|r| (r.state != "pending", std::cmp::Reverse(job_key(&r.job))));
        let ids: Vec<String> = victims
            .iter()
            .take((have - n) as usize)
            .map(|r| r.job.clone())
            .collect();
        slurm::scancel(&ids)?;
        println!(
            "cluster '{c}': {have} -> {n} worker jobs (cancelled {})",
            ids.join(" ")
        );
    } else {
        println!("cluster '{c}': already {n} worker jobs");
    }
    Ok(())
}

fn job_key(label: &str) -> (u64, u64) {
    let mut it = label.split('_').map(|x| x.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}
