//! `dask-spank policy`: the site's policy for dask jobs (defaults and
//! limits per role), as the plugin applies it: read from the plugin itself
//! through a dry run of a submission, so it is what sbatch enforces.

use crate::cluster::Res;
use crate::slurm;

/// Show the site's defaults and limits for dask jobs.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank policy")]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Res {
    let args = ["--dask-role=worker", "--dask-cluster=policy"].map(String::from);
    let v = slurm::sbatch_dry_run(&args)?;
    let policy = v["policy"].as_object().cloned().unwrap_or_default();
    if a.json {
        println!("{}", serde_json::Value::Object(policy));
        return Ok(());
    }
    for (title, prefix) in [("scheduler jobs", "scheduler_"), ("worker jobs", "worker_")] {
        println!("{title}:");
        for (k, val) in policy.iter().filter(|(k, _)| k.starts_with(prefix)) {
            println!("  {:<24} {}", k, val.as_str().unwrap_or_default());
        }
    }
    println!("every dask job:");
    for (k, val) in policy
        .iter()
        .filter(|(k, _)| !k.starts_with("scheduler_") && !k.starts_with("worker_"))
    {
        println!("  {:<24} {}", k, val.as_str().unwrap_or_default());
    }
    Ok(())
}
