//! `dask-spank adapt`: let the scheduler job size the cluster (or one of
//! its pools) with dask's adaptive target, between a minimum and a maximum
//! of worker jobs.

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::pools::known_pool;
use dask_spank_common::records::Target;

/// Size the cluster with dask's adaptive logic, run in the scheduler job.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  dask-spank adapt ana 0 16\n  dask-spank adapt ana 0 4 --pool gpu"
)]
pub struct Args {
    pub name: String,
    pub minimum: u32,
    pub maximum: u32,
    /// The pool to size, by the tasks that ask for its worker resources
    /// (default: the default pool, by dask's adaptive target).
    #[arg(long)]
    pub pool: Option<String>,
}

pub fn run(a: Args) -> Res {
    let c = parse_name(&a.name)?;
    if a.minimum > a.maximum {
        return Err(format!(
            "minimum {} exceeds maximum {}",
            a.minimum, a.maximum
        ));
    }
    if view(&c)?.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let dir = records_of(&c)?;
    let pool = known_pool(&dir, c.as_str(), a.pool.as_deref())?;
    if let Some(p) = &pool {
        // Its tasks are told by the resources they ask for: without any,
        // the pool cannot be sized by them.
        if dir
            .worker_args_of(Some(p))
            .is_none_or(|w| w.resources.is_empty())
        {
            return Err(format!(
                "--pool {p}: pool {p} offers no dask worker resources (resources=NAME=AMOUNT), \
                 so no task asks for it: give it a fixed size (dask-spank scale {c} N --pool {p})"
            ));
        }
    }
    dir.write_target_of(
        pool.as_ref(),
        &Target::Adapt {
            adapt: [a.minimum, a.maximum],
        },
    )
    .map_err(|e| format!("cannot record the target: {e}"))?;
    let by = match &pool {
        Some(p) => format!(" of pool {p}, as many as the tasks asking for its resources fill"),
        None => ", as dask's adaptive target says".into(),
    };
    println!(
        "cluster '{c}': between {} and {} worker jobs{by}; the scheduler job keeps it",
        a.minimum, a.maximum
    );
    Ok(())
}
