//! `dask-spank scale`: record how many worker jobs the cluster (or one of
//! its pools) keeps; its scheduler job submits or cancels them (and
//! replaces those that fail or retire for their walltime).

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::pools::known_pool;
use crate::view::RowState;
use dask_spank_common::records::Target;

/// Have N worker jobs (kept by the scheduler job).
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  dask-spank scale ana 200\n  dask-spank scale ana 4 --pool gpu"
)]
pub struct Args {
    pub name: String,
    pub workers: u32,
    /// The pool to size (default: the default pool).
    #[arg(long)]
    pub pool: Option<String>,
}

pub fn run(a: Args) -> Res {
    let (c, n) = (parse_name(&a.name)?, a.workers);
    let v = view(&c)?;
    if v.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let dir = records_of(&c)?;
    let pool = known_pool(&dir, c.as_str(), a.pool.as_deref())?;
    dir.write_target_of(pool.as_ref(), &Target::Workers { workers: n })
        .map_err(|e| format!("cannot record the target: {e}"))?;
    let name = pool.as_ref().map_or("default", |p| p.as_str());
    let have = v
        .workers
        .iter()
        .filter(|r| r.pool == name)
        .filter(|r| {
            matches!(
                r.state,
                RowState::Pending | RowState::Running | RowState::Connected
            )
        })
        .count();
    let of = pool.map(|p| format!(" of pool {p}")).unwrap_or_default();
    println!("cluster '{c}': target {n} worker jobs{of} (it has {have}); the scheduler job submits or cancels them");
    Ok(())
}
