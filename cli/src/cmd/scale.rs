//! `dask-spank scale`: record how many worker jobs the cluster keeps; its
//! scheduler job submits or cancels them (and replaces those that fail or
//! retire for their walltime).

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::target::record;
use dask_spank_common::records::Target;

/// Have N worker jobs (kept by the scheduler job).
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
    record(&records_of(&c)?, &Target::Workers { workers: n })?;
    let have = v
        .workers
        .iter()
        .filter(|r| matches!(r.state.as_str(), "pending" | "running" | "connected"))
        .count();
    println!("cluster '{c}': target {n} worker jobs (it has {have}); the scheduler job submits or cancels them");
    Ok(())
}
